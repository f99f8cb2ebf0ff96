//! openmls's storage for one device: every MLS record in memory, with every change since the last
//! [`MlsStorage::take_writes`] buffered, so that all writes of one MLS operation land in one store
//! commit.
//!
//! openmls calls its `StorageProvider` many times during one operation (a commit writes the tree,
//! the group context, the epoch secrets, the key pairs, the group state, ...) and gives the
//! provider no transaction boundary. Writing each call through to the store would let a crash
//! leave a group half in the old epoch and half in the new one. Instead the records live in
//! memory, the keys touched since the last take are remembered together with their value at that
//! take, and the caller either moves the changes into its [`WriteBatch`] (`take_writes`) or rolls
//! them back after a failed operation (`discard_writes`).
//!
//! Record keys, in table [`MLS_TABLE`]:
//!
//! ```text
//! storage version (u16, big-endian) | label (ASCII) | 0x00 | serde_json of the openmls key
//! ```
//!
//! The label names the kind of record (`group_state`, `key_package`, ...); the zero byte ends it,
//! so no label can be mistaken for the start of another, and all records of one kind sort
//! together. The version comes first so that a future openmls storage version can be migrated by
//! scanning one prefix. Record keys made of several openmls keys (a queued proposal: group id and
//! proposal reference) encode them as one JSON array.
//!
//! Values are the MessagePack encoding (rmp-serde) of the openmls entity after a tag byte 0x01.
//! openmls's own in-memory provider uses JSON, which writes every secret byte as a decimal
//! number: at 1,000 members, storing the secret tree after each decrypted message took most of
//! the decryption's time. MessagePack still describes itself, as tls_codec's byte vectors
//! require when they are read back. Byte vectors (keys, hashes, public keys of every leaf of
//! the tree) are written as one MessagePack binary string each, not as an array of small
//! integers (serde's default for `Vec<u8>`, which cost a call and up to two bytes per byte);
//! reading accepts both forms, so values written as arrays by earlier versions still read, as
//! do values written as JSON (they never start with 0x01). A list (own leaf nodes,
//! queued proposal references, epoch key pairs) is one record holding an array of its
//! elements.

use std::collections::BTreeMap;

use bytes::Bytes;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openmls_traits::storage::{Entity, CURRENT_VERSION};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;

use super::verified::VerifiedSignatures;
use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};

/// First byte of a MessagePack value (JSON never starts with it).
const MSGPACK_TAG: u8 = 0x01;

/// Table holding every openmls storage record of a device: key = openmls storage key (see the
/// module documentation), value = tagged MessagePack (or JSON from earlier versions).
pub const MLS_TABLE: Table = Table("mls");

// One label per kind of record. Lower-case ASCII without a zero byte (checked by a test).
const KEY_PACKAGE: &str = "key_package";
const PSK: &str = "psk";
const ENCRYPTION_KEY_PAIR: &str = "encryption_key_pair";
const SIGNATURE_KEY_PAIR: &str = "signature_key_pair";
const EPOCH_KEY_PAIRS: &str = "epoch_key_pairs";
const TREE: &str = "tree";
const GROUP_CONTEXT: &str = "group_context";
const INTERIM_TRANSCRIPT_HASH: &str = "interim_transcript_hash";
const CONFIRMATION_TAG: &str = "confirmation_tag";
const JOIN_CONFIG: &str = "join_config";
const OWN_LEAF_NODES: &str = "own_leaf_nodes";
const GROUP_STATE: &str = "group_state";
const QUEUED_PROPOSAL: &str = "queued_proposal";
const PROPOSAL_REFS: &str = "proposal_refs";
const OWN_LEAF_INDEX: &str = "own_leaf_index";
const EPOCH_SECRETS: &str = "epoch_secrets";
const RESUMPTION_PSK_STORE: &str = "resumption_psk_store";
const MESSAGE_SECRETS: &str = "message_secrets";

/// Every label, so that recovery can reject records this code does not know.
const LABELS: [&str; 18] = [
    KEY_PACKAGE,
    PSK,
    ENCRYPTION_KEY_PAIR,
    SIGNATURE_KEY_PAIR,
    EPOCH_KEY_PAIRS,
    TREE,
    GROUP_CONTEXT,
    INTERIM_TRANSCRIPT_HASH,
    CONFIRMATION_TAG,
    JOIN_CONFIG,
    OWN_LEAF_NODES,
    GROUP_STATE,
    QUEUED_PROPOSAL,
    PROPOSAL_REFS,
    OWN_LEAF_INDEX,
    EPOCH_SECRETS,
    RESUMPTION_PSK_STORE,
    MESSAGE_SECRETS,
];

/// Why openmls's storage failed; openmls hands it back inside its own error types.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MlsStorageError {
    /// A key or value from openmls could not be encoded as JSON: a bug in openmls or in Sund.
    #[error("cannot encode MLS record `{record}`: {reason}")]
    Serialization {
        /// Label of the record.
        record: &'static str,
        /// serde_json's message.
        reason: String,
    },
    /// A stored value does not decode as what openmls asked for: the data directory is damaged
    /// or was written by an incompatible version.
    #[error("stored MLS record `{record}` is corrupt: {reason}; restore the data directory from a backup")]
    Corrupt {
        /// Label of the record.
        record: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// An earlier panic left the storage lock poisoned; the device must restart and recover.
    #[error("MLS storage is unusable after a panic; restart the device")]
    Poisoned,
}

/// openmls state of one device, kept in memory, with every change since the last
/// [`take_writes`](MlsStorage::take_writes) buffered so that all writes of one MLS operation land
/// in one store commit (openmls's `StorageProvider` has no transaction boundary).
///
/// Life cycle: [`new`](MlsStorage::new) for a new device or [`recover`](MlsStorage::recover) after
/// a restart; hand it to the openmls provider; after each MLS operation either
/// [`take_writes`](MlsStorage::take_writes) into the batch that commits the operation's outcome,
/// or [`discard_writes`](MlsStorage::discard_writes) if the operation failed.
#[derive(Debug, Default)]
pub struct MlsStorage {
    state: RwLock<State>,
    /// Under simulation, the memo that lets devices holding the same ratchet tree share one
    /// copy of its bytes (see [`MlsStorage::share_trees`]).
    shared: Option<VerifiedSignatures>,
}

/// The records and the changes since the last take.
///
/// Every critical section changes these maps only after its last fallible step, so a panic can
/// never leave them inconsistent with each other.
#[derive(Debug, Default)]
struct State {
    /// Every record: storage key → JSON value. Values are shared buffers, so remembering an
    /// old value for `undo` costs no copy (openmls rewrites large records, such as the secret
    /// tree of a 1,000-member group, on every message).
    values: BTreeMap<Vec<u8>, Bytes>,
    /// Every key written since the last take, with its value at that take (`None`: absent).
    undo: BTreeMap<Vec<u8>, Option<Bytes>>,
}

impl State {
    /// Sets (`Some`) or removes (`None`) one record, remembering its value at the last take the
    /// first time the key is touched since then.
    fn set(&mut self, key: Vec<u8>, value: Option<Bytes>) {
        let previous = match value {
            Some(value) => self.values.insert(key.clone(), value),
            None => self.values.remove(&key),
        };
        self.undo.entry(key).or_insert(previous);
    }

    /// Decodes the record under `key`, if present.
    fn get<V: DeserializeOwned>(
        &self,
        record: &'static str,
        key: &[u8],
    ) -> Result<Option<V>, MlsStorageError> {
        self.values
            .get(key)
            .map(|bytes| decode(record, bytes))
            .transpose()
    }

    /// Decodes the list under `key`; an absent list is empty.
    fn get_list<V: DeserializeOwned>(
        &self,
        record: &'static str,
        key: &[u8],
    ) -> Result<Vec<V>, MlsStorageError> {
        Ok(self.get(record, key)?.unwrap_or_default())
    }

    /// Appends `item` to the list under `key`. The list is decoded with the element's own type
    /// and written back whole; the lists openmls keeps are short (own leaf nodes, proposals).
    fn push<V: Serialize + DeserializeOwned>(
        &mut self,
        record: &'static str,
        key: Vec<u8>,
        item: &V,
    ) -> Result<(), MlsStorageError> {
        let list: Vec<V> = self.get_list(record, &key)?;
        let mut elements: Vec<&V> = list.iter().collect();
        elements.push(item);
        let bytes = encode(record, &elements)?;
        self.set(key, Some(Bytes::from(bytes)));
        Ok(())
    }
}

impl MlsStorage {
    /// Empty storage, for a device that has no MLS state yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads every record of [`MLS_TABLE`], after a restart. Nothing is pending afterwards.
    ///
    /// Keys must carry openmls's current storage version and a known label, and values must be
    /// well-formed (MessagePack, or JSON from earlier versions); anything else is reported as corrupt rather than surfacing later in the
    /// middle of an MLS operation.
    pub fn recover(store: &dyn StoreRead) -> Result<Self, StoreError> {
        let mut values = BTreeMap::new();
        scan_all(store, MLS_TABLE, |key, value| {
            let Some(record) = label_of(key) else {
                return Err(corrupt_on_disk(format!(
                    "key {key:02x?} is not an openmls storage version {CURRENT_VERSION} record"
                )));
            };
            if let Err(e) = decode::<IgnoredAny>(record, value) {
                return Err(corrupt_on_disk(format!(
                    "value of a `{record}` record does not decode: {e}"
                )));
            }
            values.insert(key.to_vec(), Bytes::copy_from_slice(value));
            Ok(())
        })?;
        Ok(MlsStorage {
            state: RwLock::new(State {
                values,
                undo: BTreeMap::new(),
            }),
            shared: None,
        })
    }

    /// Stores each ratchet tree written from now on as one copy shared through `memo` with
    /// every device that holds the same bytes. Every member of a group holds the same public
    /// tree; a simulated 1,000-member room kept a thousand copies of it (half a megabyte
    /// each). Production devices never share (`None`).
    pub fn share_trees(&mut self, memo: Option<VerifiedSignatures>) {
        self.shared = memo;
    }

    /// Moves every change since the last take into `batch`, in key order: a put of the current
    /// value, or a delete if the record is gone. Commit the batch before anything that depends on
    /// the MLS operation leaves the device.
    pub(crate) fn take_writes(&self, batch: &mut WriteBatch) {
        let mut state = self.state_ignoring_poison();
        let undo = std::mem::take(&mut state.undo);
        for key in undo.into_keys() {
            match state.values.get(&key) {
                Some(value) => batch.put(MLS_TABLE, key, value.clone()),
                None => batch.delete(MLS_TABLE, key),
            }
        }
    }

    /// Rolls every record back to its value at the last take and forgets the changes. Used when
    /// an MLS operation fails half-way, so that its partial writes neither stay in memory nor
    /// reach the store.
    pub(crate) fn discard_writes(&self) {
        let mut state = self.state_ignoring_poison();
        let undo = std::mem::take(&mut state.undo);
        for (key, original) in undo {
            match original {
                Some(value) => state.values.insert(key, value),
                None => state.values.remove(&key),
            };
        }
    }

    /// True if some record changed since the last take, so a commit is due.
    pub fn has_pending(&self) -> bool {
        !self.state_ignoring_poison().undo.is_empty()
    }

    /// Number of records held, for tests and diagnostics.
    pub fn len(&self) -> usize {
        self.state_ignoring_poison().values.len()
    }

    /// True if no record is held (a device that never touched MLS).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The state for openmls's reads.
    fn read_state(&self) -> Result<RwLockReadGuard<'_, State>, MlsStorageError> {
        self.state.read().map_err(|_| MlsStorageError::Poisoned)
    }

    /// The state for openmls's writes.
    fn write_state(&self) -> Result<RwLockWriteGuard<'_, State>, MlsStorageError> {
        self.state.write().map_err(|_| MlsStorageError::Poisoned)
    }

    /// The state for the driver's own bookkeeping, which must work even after a panic so that a
    /// failed operation can be discarded: the maps are consistent whenever a panic can happen
    /// (see [`State`]), so a poisoned lock is read through.
    fn state_ignoring_poison(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes one record.
    fn put(
        &self,
        record: &'static str,
        id: &impl Serialize,
        value: &impl Serialize,
    ) -> Result<(), MlsStorageError> {
        let key = storage_key(record, id)?;
        let value = encode(record, value)?;
        let value = match &self.shared {
            Some(memo) if record == TREE => memo.share(value),
            _ => Bytes::from(value),
        };
        self.write_state()?.set(key, Some(value));
        Ok(())
    }

    /// Reads one record.
    fn get<V: DeserializeOwned>(
        &self,
        record: &'static str,
        id: &impl Serialize,
    ) -> Result<Option<V>, MlsStorageError> {
        let key = storage_key(record, id)?;
        self.read_state()?.get(record, &key)
    }

    /// Reads one list record; an absent list is empty.
    fn get_list<V: DeserializeOwned>(
        &self,
        record: &'static str,
        id: &impl Serialize,
    ) -> Result<Vec<V>, MlsStorageError> {
        let key = storage_key(record, id)?;
        self.read_state()?.get_list(record, &key)
    }

    /// Deletes one record; deleting an absent record is not an error.
    fn remove(&self, record: &'static str, id: &impl Serialize) -> Result<(), MlsStorageError> {
        let key = storage_key(record, id)?;
        self.write_state()?.set(key, None);
        Ok(())
    }

    /// Appends `item` to a list record.
    fn push<V: Entity<CURRENT_VERSION>>(
        &self,
        record: &'static str,
        id: &impl Serialize,
        item: &V,
    ) -> Result<(), MlsStorageError> {
        let key = storage_key(record, id)?;
        self.write_state()?.push(record, key, item)
    }
}

/// The storage key of record `record` for openmls key `id` (see the module documentation).
fn storage_key(record: &'static str, id: &impl Serialize) -> Result<Vec<u8>, MlsStorageError> {
    debug_assert!(LABELS.contains(&record));
    let mut key = Vec::with_capacity(2 + record.len() + 1 + 32);
    key.extend_from_slice(&CURRENT_VERSION.to_be_bytes());
    key.extend_from_slice(record.as_bytes());
    key.push(0);
    serde_json::to_writer(&mut key, id).map_err(|e| MlsStorageError::Serialization {
        record,
        reason: e.to_string(),
    })?;
    Ok(key)
}

/// The label of a stored key, if it is a current-version record of a known kind.
fn label_of(key: &[u8]) -> Option<&'static str> {
    let rest = key.strip_prefix(&CURRENT_VERSION.to_be_bytes()[..])?;
    let end = rest.iter().position(|&b| b == 0)?;
    let label = &rest[..end];
    LABELS.into_iter().find(|l| l.as_bytes() == label)
}

/// The stored encoding of a value openmls hands over: [`MSGPACK_TAG`], then MessagePack with
/// every non-empty sequence of bytes (a `Vec<u8>` or `&[u8]`) as one binary string rather
/// than an array of integers.
fn encode(record: &'static str, value: &impl Serialize) -> Result<Vec<u8>, MlsStorageError> {
    let mut out = vec![MSGPACK_TAG];
    let mut serializer = rmp_serde::Serializer::new(&mut out)
        .with_bytes(rmp_serde::config::BytesMode::ForceIterables);
    value
        .serialize(&mut serializer)
        .map_err(|e| MlsStorageError::Serialization {
            record,
            reason: e.to_string(),
        })?;
    // The buffer grew by doubling; the value is kept (in memory and in the store) as it is.
    out.shrink_to_fit();
    Ok(out)
}

/// Decodes a stored value: MessagePack after [`MSGPACK_TAG`], or JSON as written by earlier
/// versions (a JSON value never starts with that byte). Bytes that do not decode are corrupt,
/// never a panic.
fn decode<V: DeserializeOwned>(record: &'static str, bytes: &[u8]) -> Result<V, MlsStorageError> {
    let decoded = match bytes.split_first() {
        Some((&MSGPACK_TAG, rest)) => rmp_serde::from_slice(rest).map_err(|e| e.to_string()),
        _ => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
    };
    decoded.map_err(|reason| MlsStorageError::Corrupt { record, reason })
}

/// A corrupt record found while recovering.
fn corrupt_on_disk(reason: String) -> StoreError {
    StoreError::Corrupt {
        table: MLS_TABLE.0,
        reason,
    }
}

/// The record key of a queued proposal: group id and proposal reference, as one JSON array.
fn proposal_key(
    group_id: &impl Serialize,
    proposal_ref: &impl Serialize,
) -> Result<Vec<u8>, MlsStorageError> {
    storage_key(QUEUED_PROPOSAL, &(group_id, proposal_ref))
}

mod provider_impl;
#[cfg(test)]
mod tests;
