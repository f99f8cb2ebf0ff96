//! Sender order: a device's messages to a conversation are sequenced in the order it sent them.
//!
//! Each application message names the message it comes *after*: the device's previous
//! application message to the conversation still waiting for the gateway's answer, or, if none
//! waits, the last one it knows the gateway sequenced (see `node::outbox`). Group operations
//! (commits) name none and are not part of the chain: the MLS commit authority orders them, and
//! a message waiting for its group's next epoch must not hold up the commit that makes it. The gateway keeps the id of the last
//! message it sequenced from each device in each conversation, durably with the log entry, and
//! sequences a new message only if it comes after exactly that one. Anything else is refused
//! with `sender_out_of_order` naming the last one, and the device sends what waits again,
//! chained from it:
//!
//! - an earlier message lost or overtaken on the way: it is among what waits, and goes first;
//! - an earlier message refused for good (the device dropped it): the next now comes after
//!   the last sequenced one;
//! - a message the gateway sequenced but the device forgot (it crashed before writing it): the
//!   device takes it as its last and chains after it.
//!
//! Every waiting message but the first is chained to the one before it, so none can be
//! sequenced before an earlier one, whatever copies are still on the way. Message ids are
//! random and never reused, so a chain cannot be confused by a crash. Duplicates are recognised
//! by message id before any of this and keep their original seq. A refused message consumes
//! nothing: one refused as stale is encrypted again and keeps its place.

use std::collections::BTreeMap;

use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::ids::{ConversationId, DeviceId, MsgId};

/// Table of sender order: key `conversation(16) ++ device(16)`, value the id (16) of the last
/// message sequenced from the device in the conversation.
pub const SENDER_ORDER_TABLE: Table = Table("sender_order");

/// The `after` of a device's first message to a conversation.
pub const NO_MESSAGE: MsgId = MsgId(0);

fn key(conv: ConversationId, device: DeviceId) -> Vec<u8> {
    let mut key = Vec::with_capacity(32);
    key.extend_from_slice(&conv.to_bytes());
    key.extend_from_slice(&device.to_bytes());
    key
}

/// The last message sequenced from every (conversation, device). See the module docs.
#[derive(Clone, Debug, Default)]
pub struct SenderOrder {
    last: BTreeMap<(ConversationId, DeviceId), MsgId>,
}

impl SenderOrder {
    /// Reads the table back.
    pub fn recover(store: &dyn StoreRead) -> Result<SenderOrder, StoreError> {
        let mut last = BTreeMap::new();
        scan_all(store, SENDER_ORDER_TABLE, |key, value| {
            let parsed = key.split_first_chunk::<16>().and_then(|(conv, device)| {
                Some((
                    ConversationId::from_bytes(*conv),
                    DeviceId::from_bytes(device.try_into().ok()?),
                    MsgId::from_bytes(value.try_into().ok()?),
                ))
            });
            let Some((conv, device, msg_id)) = parsed else {
                return Err(StoreError::Corrupt {
                    table: SENDER_ORDER_TABLE.0,
                    reason: "key or value length".into(),
                });
            };
            last.insert((conv, device), msg_id);
            Ok(())
        })?;
        Ok(SenderOrder { last })
    }

    /// The last message sequenced from `device` in `conv` ([`NO_MESSAGE`]: none yet).
    pub fn last(&self, conv: ConversationId, device: DeviceId) -> MsgId {
        self.last
            .get(&(conv, device))
            .copied()
            .unwrap_or(NO_MESSAGE)
    }

    /// Whether a new (not duplicate) message that comes `after` may be sequenced now; `Err`
    /// names the message it must come after instead.
    pub fn check(&self, conv: ConversationId, device: DeviceId, after: MsgId) -> Result<(), MsgId> {
        let last = self.last(conv, device);
        if after == last {
            Ok(())
        } else {
            Err(last)
        }
    }

    /// `msg_id` of `device` was sequenced in `conv`: the next must come after it, durably with
    /// the log entry.
    pub fn sequenced(
        &mut self,
        conv: ConversationId,
        device: DeviceId,
        msg_id: MsgId,
        writes: &mut WriteBatch,
    ) {
        assert_ne!(msg_id, NO_MESSAGE, "a sequenced message has an id");
        self.last.insert((conv, device), msg_id);
        writes.put(
            SENDER_ORDER_TABLE,
            key(conv, device),
            msg_id.to_bytes().to_vec(),
        );
    }

    /// Rows held (one per device that sent in a conversation).
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// True if no device sent anything yet.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MemStore;

    const C: ConversationId = ConversationId(1);
    const D: DeviceId = DeviceId(2);

    #[test]
    fn a_message_is_taken_only_right_after_the_last_and_the_last_survives_recovery() {
        let mut order = SenderOrder::default();
        assert_eq!(order.check(C, D, NO_MESSAGE), Ok(()));
        assert_eq!(order.check(C, D, MsgId(7)), Err(NO_MESSAGE), "a gap");
        let mut store = MemStore::default();
        let mut writes = WriteBatch::default();
        order.sequenced(C, D, MsgId(7), &mut writes);
        order.sequenced(C, D, MsgId(9), &mut writes);
        crate::env::Store::commit(&mut store, writes).unwrap();
        let order = SenderOrder::recover(&store).unwrap();
        assert_eq!(order.check(C, D, MsgId(9)), Ok(()));
        assert_eq!(order.check(C, D, MsgId(7)), Err(MsgId(9)), "a stale chain");
        assert_eq!(order.check(C, DeviceId(3), NO_MESSAGE), Ok(()));
    }
}
