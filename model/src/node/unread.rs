//! Messages delivered to this device that its application has not taken yet.
//!
//! A group message can be decrypted once only (its key is deleted as it is used), so a device
//! cannot leave a message at the gateway until its user has seen it: once decrypted and
//! acknowledged, the plaintext exists only here. An application that shows messages somewhere
//! that does not survive a crash (a terminal) runs its node with `hold_until_taken`: each
//! delivered message is written here in the batch that moves the cursor, stays until the
//! application says it took it ([`crate::node::Node::taken`]), and is delivered again, in seq
//! order, every time the node starts. An application whose history is committed with the
//! node's own state takes every message as it is released and needs none of this.

use std::collections::BTreeSet;

use bytes::Bytes;

use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::ids::{ConversationId, DeviceId, MsgId};

use super::NodeEvent;

/// Table of untaken messages: key `conversation(16) | seq(8, big-endian)`, value
/// `sender(16) | msg_id(16) | body`.
pub const NODE_UNREAD_TABLE: Table = Table("node_unread");

/// Bytes of a value before the body.
const VALUE_HEAD: usize = 32;

/// The untaken messages' keys (their bodies stay in the store). See the module docs.
#[derive(Clone, Debug, Default)]
pub struct Unread {
    held: BTreeSet<(ConversationId, u64)>,
}

fn key(conversation: ConversationId, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(24);
    key.extend_from_slice(&conversation.to_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn corrupt(reason: &str) -> StoreError {
    StoreError::Corrupt {
        table: NODE_UNREAD_TABLE.0,
        reason: reason.into(),
    }
}

impl Unread {
    /// Reads back what the application had not taken; the events to deliver again, in
    /// conversation and seq order.
    pub fn recover(store: &dyn StoreRead) -> Result<(Unread, Vec<NodeEvent>), StoreError> {
        let mut unread = Unread::default();
        let mut events = Vec::new();
        scan_all(store, NODE_UNREAD_TABLE, |key, value| {
            let (conversation, seq) = key
                .split_first_chunk::<16>()
                .and_then(|(c, s)| Some((c, <[u8; 8]>::try_from(s).ok()?)))
                .ok_or_else(|| corrupt("key length"))?;
            if value.len() < VALUE_HEAD {
                return Err(corrupt("value length"));
            }
            let conversation = ConversationId::from_bytes(*conversation);
            let seq = u64::from_be_bytes(seq);
            let sender = DeviceId::from_bytes(value[..16].try_into().expect("16 bytes"));
            let msg_id = MsgId::from_bytes(value[16..32].try_into().expect("16 bytes"));
            unread.held.insert((conversation, seq));
            events.push(NodeEvent::Delivered {
                conversation,
                seq,
                sender,
                msg_id,
                body: Bytes::copy_from_slice(&value[VALUE_HEAD..]),
            });
            Ok(())
        })?;
        Ok((unread, events))
    }

    /// Keeps a delivered message until it is taken.
    pub fn keep(&mut self, event: &NodeEvent, writes: &mut WriteBatch) {
        let NodeEvent::Delivered {
            conversation,
            seq,
            sender,
            msg_id,
            body,
        } = event
        else {
            debug_assert!(false, "only messages wait to be taken");
            return;
        };
        let mut value = Vec::with_capacity(VALUE_HEAD + body.len());
        value.extend_from_slice(&sender.to_bytes());
        value.extend_from_slice(&msg_id.to_bytes());
        value.extend_from_slice(body);
        writes.put(NODE_UNREAD_TABLE, key(*conversation, *seq), value);
        self.held.insert((*conversation, *seq));
    }

    /// The application took the message at `seq`: forget it. False if it was not held (taken
    /// already, or never kept).
    pub fn taken(
        &mut self,
        conversation: ConversationId,
        seq: u64,
        writes: &mut WriteBatch,
    ) -> bool {
        if !self.held.remove(&(conversation, seq)) {
            return false;
        }
        writes.delete(NODE_UNREAD_TABLE, key(conversation, seq));
        true
    }

    /// How many messages wait to be taken.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// True if none waits.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}
