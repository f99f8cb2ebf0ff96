//! The outbox: messages this device sent that the gateway has not acknowledged yet.
//!
//! An entry is durable before `send` returns, is transmitted on every session that opens and
//! again `resend_after` after its last transmission, and leaves when the gateway acknowledges
//! it (or its own delivery comes back), or refuses it.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::ids::{ConversationId, DeviceId, MsgId};
use crate::time::Instant;
use crate::wire::payload::{Payload, Send};
use crate::wire::{Frame, Routing};

/// Table of unacknowledged messages: key `msg_id(16)`, value `conversation(16) ++ body`.
pub const OUTBOX_TABLE: Table = Table("outbox");
/// Table of the Welcomes that travel with outbox commits: key msg id, value Welcome bytes.
pub const OUTBOX_WELCOME_TABLE: Table = Table("outbox_welcome");

/// One unacknowledged message.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// Its conversation.
    pub conversation: ConversationId,
    /// The body as sent (ciphertext in a group).
    pub body: Bytes,
    /// The Welcome that travels with a commit adding devices.
    pub welcome: Option<Bytes>,
    /// When it last went out on a session (in memory only).
    last_sent: Option<Instant>,
}

/// The durable outbox. See the module docs.
#[derive(Clone, Debug)]
pub struct Outbox {
    entries: BTreeMap<MsgId, Outgoing>,
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
        scan_all(store, OUTBOX_TABLE, |key, value| {
            let (id, out) = decode(key, value)?;
            entries.insert(id, out);
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

    /// Every waiting message's id, in id order.
    pub fn ids(&self) -> Vec<MsgId> {
        self.entries.keys().copied().collect()
    }

    /// Messages not sent for `resend_after` (or never sent on this session), in id order.
    pub fn stale(&self, now: Instant, resend_after: core::time::Duration) -> Vec<MsgId> {
        self.entries
            .iter()
            .filter(|(_, o)| o.last_sent.is_none_or(|t| now >= t + resend_after))
            .map(|(id, _)| *id)
            .collect()
    }

    /// When the first transmitted message is due again, `resend_after` after it went out.
    pub fn next_resend(&self, resend_after: core::time::Duration) -> Option<Instant> {
        self.sent_order.first().map(|(at, _)| *at + resend_after)
    }

    /// Puts a message in the outbox and the writes that make it durable.
    pub fn insert(
        &mut self,
        msg_id: MsgId,
        conversation: ConversationId,
        body: Bytes,
        welcome: Option<Bytes>,
        writes: &mut WriteBatch,
    ) {
        let id = msg_id.to_bytes();
        let mut value = Vec::with_capacity(16 + body.len());
        value.extend_from_slice(&conversation.to_bytes());
        value.extend_from_slice(&body);
        writes.put(OUTBOX_TABLE, id.to_vec(), value);
        if let Some(welcome) = &welcome {
            writes.put(OUTBOX_WELCOME_TABLE, id.to_vec(), welcome.to_vec());
        }
        self.entries.insert(
            msg_id,
            Outgoing {
                conversation,
                body,
                welcome,
                last_sent: None,
            },
        );
        debug_assert!(
            self.entries.len() <= self.len_max + 1,
            "bounded by send's check"
        );
    }

    /// Takes a message out (acknowledged or refused), with the writes that delete it.
    pub fn remove(&mut self, msg_id: MsgId, writes: &mut WriteBatch) -> Option<Outgoing> {
        let out = self.entries.remove(&msg_id)?;
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

    /// The frame that transmits `msg_id` now, its conversation, and whether it went out before
    /// (a resend).
    pub fn transmit(
        &mut self,
        now: Instant,
        sender: DeviceId,
        msg_id: MsgId,
    ) -> (Bytes, ConversationId, bool) {
        let out = self
            .entries
            .get_mut(&msg_id)
            .expect("transmitting an outbox entry");
        let resend = out.last_sent.is_some();
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
        });
        let conversation = out.conversation;
        debug_assert!(
            self.sent_order.len() <= self.entries.len(),
            "one resend slot per entry"
        );
        (Frame::new(routing, payload).encode(), conversation, resend)
    }
}

fn decode(key: &[u8], value: &[u8]) -> Result<(MsgId, Outgoing), StoreError> {
    let id: [u8; 16] = key
        .try_into()
        .map_err(|_| corrupt(OUTBOX_TABLE, "key length"))?;
    if value.len() < 16 {
        return Err(corrupt(
            OUTBOX_TABLE,
            "value shorter than a conversation id",
        ));
    }
    let conversation = ConversationId::from_bytes(value[..16].try_into().expect("16 bytes"));
    let body = Bytes::copy_from_slice(&value[16..]);
    Ok((
        MsgId::from_bytes(id),
        Outgoing {
            conversation,
            body,
            welcome: None,
            last_sent: None,
        },
    ))
}
