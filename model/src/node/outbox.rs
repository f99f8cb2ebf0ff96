//! The outbox: messages this device sent that the gateway has not acknowledged yet.
//!
//! An entry is durable before `send` returns, is transmitted on every session that opens and
//! again `resend_after` after its last transmission, and leaves when the gateway acknowledges
//! it (or its own delivery comes back), or refuses it.
//!
//! Sender order: entries keep the order they were sent in, per conversation, and each
//! application message goes out naming the message it comes *after*: the application message
//! waiting before it, or for the first, the last one of this device the gateway is known to
//! have sequenced there. Group operations (commits) are not chained. The gateway sequences a message
//! only right after the one it names (see `gateway::sender_order`), so what the device sent
//! first is sequenced first whatever the network does. When the gateway answers that its last
//! is another message, what waits goes out again chained from that one; when it holds a
//! message that came before the one it names (`gateway::held_sends`), only that one goes
//! again ([`Outbox::missing_before`]).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::ids::{ConversationId, DeviceId, MsgId};
use crate::time::Instant;
use crate::wire::payload::{Payload, Send};
use crate::wire::{Frame, Routing};

/// Table of unacknowledged messages: key `msg_id(16)`, value
/// `conversation(16) ++ place(8, big-endian) ++ chained(1) ++ body`.
pub const OUTBOX_TABLE: Table = Table("outbox");
/// Table of the Welcomes that travel with outbox commits: key msg id, value Welcome bytes.
pub const OUTBOX_WELCOME_TABLE: Table = Table("outbox_welcome");
/// Table of the last message of this device each conversation's gateway is known to have
/// sequenced: key `conversation(16)`, value `seq(8, big-endian) ++ msg_id(16)`.
pub const SENDER_CHAIN_TABLE: Table = Table("node_sender_chain");

/// Bytes of an outbox value before the body.
const VALUE_HEAD: usize = 25;

/// The `after` of a device's first message to a conversation.
pub const NO_MESSAGE: MsgId = MsgId(0);

/// One unacknowledged message.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// Its conversation.
    pub conversation: ConversationId,
    /// Its place among the messages waiting in its conversation: they go out in place order.
    pub place: u64,
    /// An application message, chained in sender order (not a group operation).
    pub chained: bool,
    /// The body as sent (ciphertext in a group).
    pub body: Bytes,
    /// The Welcome that travels with a commit adding devices.
    pub welcome: Option<Bytes>,
    /// When it last went out on a session (in memory only).
    last_sent: Option<Instant>,
    /// It went out more than once in this run (in memory only): an answer cannot tell which
    /// copy it answers.
    sent_again: bool,
}

impl Outgoing {
    /// How long after it went out an answer came at `now`, if it went out once, so that the
    /// answer is to that copy (Karn's rule: an answer to one of several copies measures
    /// nothing).
    pub fn answered_once(&self, now: Instant) -> Option<core::time::Duration> {
        self.last_sent
            .filter(|_| !self.sent_again)
            .map(|at| now.saturating_since(at))
    }
}

/// The last message of this device known sequenced in a conversation, and its seq (0 when it
/// was learned from the gateway's answer rather than an acknowledgement).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sequenced {
    seq: u64,
    msg_id: MsgId,
}

/// The durable outbox. See the module docs.
#[derive(Clone, Debug)]
pub struct Outbox {
    entries: BTreeMap<MsgId, Outgoing>,
    /// Every entry by conversation and place: the order they go out in.
    order: BTreeMap<(ConversationId, u64), MsgId>,
    /// Per conversation, the last message of this device known sequenced.
    sequenced: BTreeMap<ConversationId, Sequenced>,
    /// Transmitted entries by when they last went out: the first is the next to resend.
    sent_order: BTreeSet<(Instant, MsgId)>,
    len_max: usize,
}

fn corrupt(table: Table, reason: &str) -> StoreError {
    StoreError::Corrupt {
        table: table.0,
        reason: reason.to_string(),
    }
}

impl Outbox {
    /// Reads the outbox back.
    pub fn recover(len_max: usize, store: &dyn StoreRead) -> Result<Outbox, StoreError> {
        assert!(len_max > 0, "outbox_len_max must be positive");
        let mut entries = BTreeMap::new();
        let mut order = BTreeMap::new();
        scan_all(store, OUTBOX_TABLE, |key, value| {
            let (id, out) = decode(key, value)?;
            if order.insert((out.conversation, out.place), id).is_some() {
                return Err(corrupt(OUTBOX_TABLE, "two entries share a place"));
            }
            entries.insert(id, out);
            Ok(())
        })?;
        let mut sequenced = BTreeMap::new();
        scan_all(store, SENDER_CHAIN_TABLE, |key, value| {
            let key = <[u8; 16]>::try_from(key);
            let value = <[u8; 24]>::try_from(value);
            let (Ok(key), Ok(value)) = (key, value) else {
                return Err(corrupt(SENDER_CHAIN_TABLE, "key or value length"));
            };
            let (seq, msg_id) = value.split_at(8);
            sequenced.insert(
                ConversationId::from_bytes(key),
                Sequenced {
                    seq: u64::from_be_bytes(seq.try_into().expect("8 bytes")),
                    msg_id: MsgId::from_bytes(msg_id.try_into().expect("16 bytes")),
                },
            );
            Ok(())
        })?;
        scan_all(store, OUTBOX_WELCOME_TABLE, |key, value| {
            let id: [u8; 16] = key
                .try_into()
                .map_err(|_| corrupt(OUTBOX_WELCOME_TABLE, "key length"))?;
            if let Some(out) = entries.get_mut(&MsgId::from_bytes(id)) {
                out.welcome = Some(Bytes::copy_from_slice(value));
            }
            Ok(())
        })?;
        Ok(Outbox {
            entries,
            order,
            sequenced,
            sent_order: BTreeSet::new(),
            len_max,
        })
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True if no more messages fit.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= self.len_max
    }

    /// The limit.
    pub fn len_max(&self) -> usize {
        self.len_max
    }

    /// A waiting message.
    pub fn get(&self, msg_id: MsgId) -> Option<&Outgoing> {
        self.entries.get(&msg_id)
    }

    /// Every waiting message's id, in conversation and place order.
    pub fn ids(&self) -> Vec<MsgId> {
        self.order.values().copied().collect()
    }

    /// The waiting messages of one conversation, in place order.
    pub fn ids_in(&self, conversation: ConversationId) -> Vec<MsgId> {
        self.order
            .range((conversation, 0)..=(conversation, u64::MAX))
            .map(|(_, id)| *id)
            .collect()
    }

    /// Messages not sent for `resend_after` (or never sent on this session), in conversation
    /// and place order.
    pub fn stale(&self, now: Instant, resend_after: core::time::Duration) -> Vec<MsgId> {
        self.order
            .values()
            .filter(|id| {
                self.entries[*id]
                    .last_sent
                    .is_none_or(|t| now >= t + resend_after)
            })
            .copied()
            .collect()
    }

    /// The last message of this device known sequenced in `conversation`.
    pub fn last_sequenced(&self, conversation: ConversationId) -> MsgId {
        self.sequenced
            .get(&conversation)
            .map_or(NO_MESSAGE, |s| s.msg_id)
    }

    /// The message `msg_id` comes after: the application message waiting before it in its
    /// conversation, or the last one known sequenced there; `None` for a group operation.
    pub fn after(&self, msg_id: MsgId) -> Option<MsgId> {
        let out = &self.entries[&msg_id];
        if !out.chained {
            return None;
        }
        let conv = out.conversation;
        let before = self
            .order
            .range((conv, 0)..(conv, out.place))
            .rev()
            .map(|(_, id)| *id)
            .find(|id| self.entries[id].chained);
        Some(before.unwrap_or_else(|| self.last_sequenced(conv)))
    }

    /// The gateway holds messages of `conversation` behind a gap: when their answers come
    /// says nothing of the round trip (Karn's rule, as for a message sent twice).
    pub fn answers_delayed(&mut self, conversation: ConversationId) {
        for (_, id) in self
            .order
            .range((conversation, 0)..=(conversation, u64::MAX))
        {
            if let Some(out) = self.entries.get_mut(id) {
                out.sent_again = true;
            }
        }
    }

    /// What a gateway that holds `held` (it came before the message it comes after) lacks:
    /// the application message waiting right before it, or `held` itself if none waits (its
    /// held copy was chained before the device learnt the gateway's last). `None` if that
    /// one may be on its way: it went out after `held` last did, and after `sent_by` (within
    /// a round trip). A message lost right before that one shows as the next gap, once this
    /// one arrives.
    pub fn missing_before(&self, held: MsgId, sent_by: Instant) -> Option<MsgId> {
        let out = self.entries.get(&held)?;
        if !out.chained {
            return None;
        }
        // Held back here since (a rate limit's pause): it goes again in its turn, with what
        // waits before it.
        let held_sent = out.last_sent?;
        let before = self
            .order
            .range((out.conversation, 0)..(out.conversation, out.place))
            .rev()
            .map(|(_, id)| *id)
            .find(|id| self.entries[id].chained)
            .unwrap_or(held);
        let sent = self.entries[&before].last_sent;
        sent.is_none_or(|at| at <= held_sent || at <= sent_by)
            .then_some(before)
    }

    /// The gateway sequenced application message `msg_id` of this device at `seq` (it was
    /// acknowledged, or came back as a delivery): later ones chain after it.
    pub fn sequenced(
        &mut self,
        conversation: ConversationId,
        msg_id: MsgId,
        seq: u64,
        writes: &mut WriteBatch,
    ) {
        let known = self.sequenced.get(&conversation).map_or(0, |s| s.seq);
        if seq > known {
            self.set_sequenced(conversation, Sequenced { seq, msg_id }, writes);
        }
    }

    /// The gateway says `last` is the last message of this device it sequenced in
    /// `conversation`, and it is not waiting here: chain after it from now on. False if that
    /// is already the chain's start.
    pub fn chain_after(
        &mut self,
        conversation: ConversationId,
        last: MsgId,
        writes: &mut WriteBatch,
    ) -> bool {
        if self.last_sequenced(conversation) == last {
            return false;
        }
        let seq = self.sequenced.get(&conversation).map_or(0, |s| s.seq);
        self.set_sequenced(conversation, Sequenced { seq, msg_id: last }, writes);
        true
    }

    fn set_sequenced(
        &mut self,
        conversation: ConversationId,
        sequenced: Sequenced,
        writes: &mut WriteBatch,
    ) {
        let mut value = Vec::with_capacity(24);
        value.extend_from_slice(&sequenced.seq.to_be_bytes());
        value.extend_from_slice(&sequenced.msg_id.to_bytes());
        writes.put(SENDER_CHAIN_TABLE, conversation.to_bytes().to_vec(), value);
        self.sequenced.insert(conversation, sequenced);
    }

    /// When the first transmitted message is due again, `resend_after` after it went out.
    pub fn next_resend(&self, resend_after: core::time::Duration) -> Option<Instant> {
        self.sent_order.first().map(|(at, _)| *at + resend_after)
    }

    /// Puts a message in the outbox, after every message waiting in its conversation, and the
    /// writes that make it durable.
    pub fn insert(
        &mut self,
        msg_id: MsgId,
        conversation: ConversationId,
        chained: bool,
        body: Bytes,
        welcome: Option<Bytes>,
        writes: &mut WriteBatch,
    ) {
        let place = self
            .order
            .range((conversation, 0)..=(conversation, u64::MAX))
            .next_back()
            .map_or(1, |((_, place), _)| place + 1);
        if let Some(welcome) = &welcome {
            writes.put(
                OUTBOX_WELCOME_TABLE,
                msg_id.to_bytes().to_vec(),
                welcome.to_vec(),
            );
        }
        let out = Outgoing {
            conversation,
            place,
            chained,
            body,
            welcome,
            last_sent: None,
            sent_again: false,
        };
        writes.put(OUTBOX_TABLE, msg_id.to_bytes().to_vec(), encode(&out));
        self.order.insert((conversation, place), msg_id);
        self.entries.insert(msg_id, out);
        debug_assert!(
            self.entries.len() <= self.len_max + 1,
            "bounded by send's check"
        );
        debug_assert_eq!(self.entries.len(), self.order.len());
    }

    /// Gives a waiting message a new body (encrypted again in a later epoch), keeping its place.
    pub fn replace_body(&mut self, msg_id: MsgId, body: Bytes, writes: &mut WriteBatch) -> bool {
        let Some(out) = self.entries.get_mut(&msg_id) else {
            return false;
        };
        out.body = body;
        writes.put(OUTBOX_TABLE, msg_id.to_bytes().to_vec(), encode(out));
        true
    }

    /// Takes a message out (acknowledged or refused), with the writes that delete it.
    pub fn remove(&mut self, msg_id: MsgId, writes: &mut WriteBatch) -> Option<Outgoing> {
        let out = self.entries.remove(&msg_id)?;
        self.order.remove(&(out.conversation, out.place));
        if let Some(at) = out.last_sent {
            self.sent_order.remove(&(at, msg_id));
        }
        let id = msg_id.to_bytes().to_vec();
        if out.welcome.is_some() {
            writes.delete(OUTBOX_WELCOME_TABLE, id.clone());
        }
        writes.delete(OUTBOX_TABLE, id);
        Some(out)
    }

    /// `msg_id` did not reach the sequencer (a rate limit refused it, or it was held back):
    /// it counts as never sent, so it goes with the next resend, in its place.
    pub fn unsend(&mut self, msg_id: MsgId) {
        if let Some(out) = self.entries.get_mut(&msg_id) {
            if let Some(at) = out.last_sent.take() {
                self.sent_order.remove(&(at, msg_id));
            }
        }
    }

    /// True if some entry waits that is not in flight (never sent, or held back).
    pub fn has_unsent(&self) -> bool {
        self.sent_order.len() < self.entries.len()
    }

    /// True if fewer than `n` entries wait before `msg_id` in its conversation.
    pub fn is_leading(&self, msg_id: MsgId, n: usize) -> bool {
        let Some(out) = self.entries.get(&msg_id) else {
            return false;
        };
        let conv = out.conversation;
        self.order
            .range((conv, 0)..(conv, out.place))
            .take(n)
            .count()
            < n
    }

    /// Per conversation, those of its first `n` entries that are not in flight, in order.
    pub fn leading_unsent(&self, n: usize) -> Vec<MsgId> {
        let mut out = Vec::new();
        let mut current = None;
        let mut taken = 0;
        for (&(conv, _), &id) in &self.order {
            if current != Some(conv) {
                current = Some(conv);
                taken = 0;
            }
            if taken < n {
                taken += 1;
                if self.entries[&id].last_sent.is_none() {
                    out.push(id);
                }
            }
        }
        out
    }

    /// The frame that transmits `msg_id` now, its conversation, and whether it went out before
    /// (a resend).
    pub fn transmit(
        &mut self,
        now: Instant,
        sender: DeviceId,
        msg_id: MsgId,
    ) -> (Bytes, ConversationId, bool) {
        let after = self.after(msg_id);
        let out = self
            .entries
            .get_mut(&msg_id)
            .expect("transmitting an outbox entry");
        let resend = out.last_sent.is_some();
        out.sent_again |= resend;
        if let Some(at) = out.last_sent.replace(now) {
            self.sent_order.remove(&(at, msg_id));
        }
        self.sent_order.insert((now, msg_id));
        let routing = Routing {
            conversation: out.conversation,
            sender,
            ..Routing::default()
        };
        let payload = Payload::Send(Send {
            welcome: out.welcome.as_ref().map(|w| w.to_vec().into()),
            msg_id: msg_id.to_bytes(),
            body: out.body.to_vec(),
            after: after.map(MsgId::to_bytes),
        });
        let conversation = out.conversation;
        debug_assert!(
            self.sent_order.len() <= self.entries.len(),
            "one resend slot per entry"
        );
        (Frame::new(routing, payload).encode(), conversation, resend)
    }
}

fn encode(out: &Outgoing) -> Vec<u8> {
    let mut value = Vec::with_capacity(VALUE_HEAD + out.body.len());
    value.extend_from_slice(&out.conversation.to_bytes());
    value.extend_from_slice(&out.place.to_be_bytes());
    value.push(u8::from(out.chained));
    value.extend_from_slice(&out.body);
    value
}

fn decode(key: &[u8], value: &[u8]) -> Result<(MsgId, Outgoing), StoreError> {
    let id: [u8; 16] = key
        .try_into()
        .map_err(|_| corrupt(OUTBOX_TABLE, "key length"))?;
    if value.len() < VALUE_HEAD {
        return Err(corrupt(
            OUTBOX_TABLE,
            "value shorter than a conversation id, a place and a flag",
        ));
    }
    let conversation = ConversationId::from_bytes(value[..16].try_into().expect("16 bytes"));
    let place = u64::from_be_bytes(value[16..24].try_into().expect("8 bytes"));
    let chained = match value[24] {
        0 => false,
        1 => true,
        _ => return Err(corrupt(OUTBOX_TABLE, "chained flag")),
    };
    let body = Bytes::copy_from_slice(&value[VALUE_HEAD..]);
    Ok((
        MsgId::from_bytes(id),
        Outgoing {
            conversation,
            place,
            chained,
            body,
            welcome: None,
            last_sent: None,
            sent_again: false,
        },
    ))
}
