//! Entries of a conversation's new authority that wait until this gateway's replica holds
//! everything its old authority sequenced (issue 15, step 5).
//!
//! After a handover whose certificate arrived before the old authority's last messages (the
//! links are different, and either can be slower or cut), the replica takes those messages
//! from the old authority first, then tells the new one where it ends. Sequenced messages of
//! the new authority wait at the new authority until then; but an MLS commit it sequences
//! sends this gateway a Welcome or a removal notice at once, naming a seq past what the
//! replica holds, while a Welcome of the old authority naming an earlier seq may still be on
//! its way. Applied out of order, a device removed at seq 24 whose Welcome of seq 9 came
//! later would read on past its removal. So such entries are kept here, durably and in
//! order, and handed on once the replica has caught up.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::Gateway;
use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::federation::entry::Entry;
use crate::ids::ConversationId;
use crate::time::Instant;

/// Held entries: key conversation (16) | index (u32, big-endian); value the peer's domain
/// length (u8), the domain, then the entry's bytes.
pub const HELD_ENTRIES_TABLE: Table = Table("held_entries");

/// The most entries held for one conversation; more are refused (counted), as a peer that
/// sends that many notices before its handover completes misbehaves.
pub const HELD_PER_CONVERSATION_MAX: usize = 4096;

/// Entries held per conversation, in arrival order.
#[derive(Debug, Default)]
pub struct HeldEntries {
    held: BTreeMap<ConversationId, Vec<(String, Bytes)>>,
}

fn key(conv: ConversationId, index: usize) -> Vec<u8> {
    let mut key = conv.to_bytes().to_vec();
    key.extend_from_slice(&u32::try_from(index).unwrap_or(u32::MAX).to_be_bytes());
    key
}

impl HeldEntries {
    /// Reads the held entries back, in order.
    pub fn recover(store: &dyn StoreRead) -> Result<HeldEntries, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            table: HELD_ENTRIES_TABLE.0,
            reason: reason.to_string(),
        };
        let mut held = HeldEntries::default();
        scan_all(store, HELD_ENTRIES_TABLE, |k, value| {
            let id: [u8; 16] = k
                .get(..16)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| corrupt("a key shorter than a conversation id"))?;
            let (&len, rest) = value.split_first().ok_or_else(|| corrupt("an empty row"))?;
            let len = usize::from(len);
            let domain = rest
                .get(..len)
                .and_then(|d| String::from_utf8(d.to_vec()).ok())
                .ok_or_else(|| corrupt("a peer domain that does not read"))?;
            let entry = Bytes::copy_from_slice(&rest[len..]);
            held.held
                .entry(ConversationId::from_bytes(id))
                .or_default()
                .push((domain, entry));
            Ok(())
        })?;
        Ok(held)
    }

    /// Keeps `entry` from `peer` about `conv` until [`HeldEntries::release`]; false if
    /// [`HELD_PER_CONVERSATION_MAX`] are held already.
    pub fn hold(
        &mut self,
        conv: ConversationId,
        peer: &str,
        entry: Bytes,
        writes: &mut WriteBatch,
    ) -> bool {
        let list = self.held.entry(conv).or_default();
        if list.len() >= HELD_PER_CONVERSATION_MAX {
            return false;
        }
        let mut value = Vec::with_capacity(1 + peer.len() + entry.len());
        value.push(u8::try_from(peer.len()).expect("a domain is at most 253 bytes"));
        value.extend_from_slice(peer.as_bytes());
        value.extend_from_slice(&entry);
        writes.put(HELD_ENTRIES_TABLE, key(conv, list.len()), value);
        list.push((peer.to_string(), entry));
        true
    }

    /// The entries held for `conv`, in order; none are held after.
    pub fn release(
        &mut self,
        conv: ConversationId,
        writes: &mut WriteBatch,
    ) -> Vec<(String, Bytes)> {
        let list = self.held.remove(&conv).unwrap_or_default();
        for index in 0..list.len() {
            writes.delete(HELD_ENTRIES_TABLE, key(conv, index));
        }
        list
    }
}

impl Gateway {
    /// True (and the entry kept) if `entry` from `conv`'s authority `peer` must wait until
    /// the replica has caught up with the old authority (see the module docs).
    pub(super) fn hold_until_caught_up(&mut self, peer: &str, entry: &Entry) -> bool {
        let Some(conv) = entry.conversation() else {
            return false;
        };
        let notice = matches!(entry, Entry::Welcome { .. } | Entry::Removed { .. });
        let catching_up = self
            .spanning
            .previous_of(conv)
            .is_some_and(|(old, _)| old != peer);
        if !notice || !catching_up || self.spanning.authority_of(conv) != Some(peer) {
            return false;
        }
        if self
            .held_entries
            .hold(conv, peer, entry.encode(), self.fx.writes())
        {
            self.spanning_stats.entries_held += 1;
        } else {
            self.spanning_stats.entries_refused += 1;
        }
        true
    }

    /// The replica of `conv` caught up with its old authority: the new authority's held
    /// entries are taken now, in order.
    pub(super) fn release_held(&mut self, now: Instant, conv: ConversationId) {
        for (peer, bytes) in self.held_entries.release(conv, self.fx.writes()) {
            match Entry::decode(&bytes) {
                // Welcomes and removal notices: no signature to check.
                Ok(entry) => self.take_entry(now, &peer, entry, false),
                Err(_) => self.spanning_stats.entries_malformed += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{MemStore, Store};

    #[test]
    fn held_entries_come_back_in_order_after_a_restart_and_go_once_released() {
        let conv = ConversationId(0xC0);
        let mut store = MemStore::default();
        let mut held = HeldEntries::default();
        let mut writes = WriteBatch::default();
        let removed = Entry::Removed {
            conversation: conv,
            seq: 24,
            devices: vec![crate::ids::DeviceId(7)],
        };
        assert!(held.hold(conv, "a.example", removed.encode(), &mut writes));
        assert!(held.hold(
            conv,
            "a.example",
            Bytes::from_static(b"second"),
            &mut writes
        ));
        store.commit(writes).unwrap();
        let mut back = HeldEntries::recover(&store).unwrap();
        let mut writes = WriteBatch::default();
        let released = back.release(conv, &mut writes);
        assert_eq!(released.len(), 2);
        assert_eq!(released[0].0, "a.example");
        assert_eq!(Entry::decode(&released[0].1), Ok(removed));
        assert_eq!(&released[1].1[..], b"second");
        store.commit(writes).unwrap();
        assert!(HeldEntries::recover(&store)
            .unwrap()
            .release(conv, &mut WriteBatch::default())
            .is_empty());
        // Bounded per conversation.
        let mut held = HeldEntries::default();
        let mut writes = WriteBatch::default();
        for _ in 0..HELD_PER_CONVERSATION_MAX {
            assert!(held.hold(conv, "b.example", Bytes::new(), &mut writes));
        }
        assert!(!held.hold(conv, "b.example", Bytes::new(), &mut writes));
    }
}
