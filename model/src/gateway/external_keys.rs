//! The keys peers sign MLS proposals with as a group's external sender (issue 15, step 5).
//!
//! Handing an MLS conversation over moves its authority and with it the right to propose
//! removals: the group names its external sender's key, and only the old authority holds
//! that one. So the old authority signs a proposal naming the new one's key, and needs that
//! key before it freezes the log. Each gateway tells every configured peer its key once per
//! data directory ([`Entry::ExternalKey`], on the durable outbox, so it arrives however long
//! the link is down), and keeps the keys its peers told it.

use std::collections::{BTreeMap, BTreeSet};

use super::Gateway;
use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::federation::entry::Entry;

/// Peers this gateway has queued its key for: key the domain, value empty.
pub const EXTERNAL_KEY_TOLD_TABLE: Table = Table("external_key_told");
/// Keys peers told: key the domain, value the 32-byte Ed25519 key.
pub const PEER_EXTERNAL_KEYS_TABLE: Table = Table("peer_external_keys");

/// What this gateway told and was told. See the module docs.
#[derive(Debug, Default)]
pub struct ExternalKeys {
    told: BTreeSet<String>,
    peers: BTreeMap<String, [u8; 32]>,
    /// Every configured peer was told (memo, so that the check is free on every input).
    all_told: bool,
}

impl ExternalKeys {
    /// Reads both tables back.
    pub fn recover(store: &dyn StoreRead) -> Result<ExternalKeys, StoreError> {
        let mut keys = ExternalKeys::default();
        let text = |table: Table, key: &[u8]| {
            String::from_utf8(key.to_vec()).map_err(|_| StoreError::Corrupt {
                table: table.0,
                reason: "a domain that is not UTF-8".into(),
            })
        };
        scan_all(store, EXTERNAL_KEY_TOLD_TABLE, |key, _| {
            keys.told.insert(text(EXTERNAL_KEY_TOLD_TABLE, key)?);
            Ok(())
        })?;
        scan_all(store, PEER_EXTERNAL_KEYS_TABLE, |key, value| {
            let domain = text(PEER_EXTERNAL_KEYS_TABLE, key)?;
            let value: [u8; 32] = value.try_into().map_err(|_| StoreError::Corrupt {
                table: PEER_EXTERNAL_KEYS_TABLE.0,
                reason: format!("a key of {} bytes, want 32", value.len()),
            })?;
            keys.peers.insert(domain, value);
            Ok(())
        })?;
        Ok(keys)
    }

    /// The key `peer` told, if it did.
    pub fn of(&self, peer: &str) -> Option<[u8; 32]> {
        self.peers.get(peer).copied()
    }

    /// Keeps the key `peer` told (a peer whose data directory was reset tells a new one).
    pub fn learn(&mut self, peer: &str, key: [u8; 32], writes: &mut WriteBatch) {
        if self.peers.get(peer) == Some(&key) {
            return;
        }
        self.peers.insert(peer.to_string(), key);
        writes.put(
            PEER_EXTERNAL_KEYS_TABLE,
            peer.as_bytes().to_vec(),
            key.to_vec(),
        );
    }
}

impl Gateway {
    /// Queues this gateway's external-sender key for each configured peer not told yet.
    pub(super) fn announce_external_key(&mut self) {
        if self.external_keys.all_told || self.federation.is_none() {
            return;
        }
        let untold: Vec<String> = self
            .config
            .federation_peers
            .iter()
            .map(|p| p.domain.clone())
            .filter(|d| !self.external_keys.told.contains(d))
            .collect();
        if untold.is_empty() {
            self.external_keys.all_told = true;
            return;
        }
        let key = self
            .groups
            .external_key(self.entropy.as_mut(), self.fx.writes());
        let key: [u8; 32] = key
            .as_slice()
            .try_into()
            .expect("an Ed25519 public key has 32 bytes");
        let entry = Entry::ExternalKey { key };
        for domain in untold {
            // A configured peer, and an entry of 34 bytes: queued unless the outbox is
            // full, when it is tried again on the next input.
            if self.send_entry(&domain, &entry).is_ok() {
                self.fx.writes().put(
                    EXTERNAL_KEY_TOLD_TABLE,
                    domain.as_bytes().to_vec(),
                    Vec::new(),
                );
                self.external_keys.told.insert(domain);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{MemStore, Store};

    #[test]
    fn peers_keys_and_who_was_told_outlive_a_restart() {
        let mut store = MemStore::default();
        let mut keys = ExternalKeys::default();
        let mut writes = WriteBatch::default();
        keys.learn("b.example", [1; 32], &mut writes);
        keys.learn("b.example", [1; 32], &mut writes); // the same again writes nothing new
        writes.put(EXTERNAL_KEY_TOLD_TABLE, b"c.example".to_vec(), Vec::new());
        store.commit(writes).unwrap();
        let mut back = ExternalKeys::recover(&store).unwrap();
        assert_eq!(back.of("b.example"), Some([1; 32]));
        assert_eq!(back.of("c.example"), None);
        assert!(back.told.contains("c.example"));
        // A peer whose data directory was reset tells a new key.
        let mut writes = WriteBatch::default();
        back.learn("b.example", [2; 32], &mut writes);
        store.commit(writes).unwrap();
        assert_eq!(
            ExternalKeys::recover(&store).unwrap().of("b.example"),
            Some([2; 32])
        );
    }
}
