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
//! the decryption's time. MessagePack writes a byte in one or two bytes and still describes
//! itself, as tls_codec's byte vectors require when they are read back. Values written as JSON
//! by earlier versions (they never start with 0x01) are still read. A list (own leaf nodes,
//! queued proposal references, epoch key pairs) is one record holding an array of its
//! elements.

use std::collections::BTreeMap;

use bytes::Bytes;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openmls_traits::storage::{traits, Entity, StorageProvider, CURRENT_VERSION};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;

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
    fn set(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        let previous = match value {
            Some(value) => self.values.insert(key.clone(), Bytes::from(value)),
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
        self.set(key, Some(bytes));
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
        })
    }

    /// Moves every change since the last take into `batch`, in key order: a put of the current
    /// value, or a delete if the record is gone. Commit the batch before anything that depends on
    /// the MLS operation leaves the device.
    pub fn take_writes(&self, batch: &mut WriteBatch) {
        let mut state = self.state_ignoring_poison();
        let undo = std::mem::take(&mut state.undo);
        for key in undo.into_keys() {
            match state.values.get(&key) {
                Some(value) => batch.put(MLS_TABLE, key, value.to_vec()),
                None => batch.delete(MLS_TABLE, key),
            }
        }
    }

    /// Rolls every record back to its value at the last take and forgets the changes. Used when
    /// an MLS operation fails half-way, so that its partial writes neither stay in memory nor
    /// reach the store.
    pub fn discard_writes(&self) {
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

/// The JSON encoding of a value openmls hands over.
fn encode(record: &'static str, value: &impl Serialize) -> Result<Vec<u8>, MlsStorageError> {
    let mut out = vec![MSGPACK_TAG];
    rmp_serde::encode::write(&mut out, value).map_err(|e| MlsStorageError::Serialization {
        record,
        reason: e.to_string(),
    })?;
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

impl StorageProvider<CURRENT_VERSION> for MlsStorage {
    type Error = MlsStorageError;

    //
    // Group state: writers.
    //

    fn write_mls_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        config: &MlsGroupJoinConfig,
    ) -> Result<(), Self::Error> {
        self.put(JOIN_CONFIG, group_id, config)
    }

    fn append_own_leaf_node<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        leaf_node: &LeafNode,
    ) -> Result<(), Self::Error> {
        self.push(OWN_LEAF_NODES, group_id, leaf_node)
    }

    /// Stores the proposal under (group, reference) and appends the reference to the group's
    /// queue. A reference already queued keeps its place instead of appearing twice: it is the
    /// proposal's hash, so the queue and the proposal records stay one-to-one.
    fn queue_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
        proposal: &QueuedProposal,
    ) -> Result<(), Self::Error> {
        let proposal_key = proposal_key(group_id, proposal_ref)?;
        let proposal_json = encode(QUEUED_PROPOSAL, proposal)?;
        let refs_key = storage_key(PROPOSAL_REFS, group_id)?;
        let ref_json = encode(PROPOSAL_REFS, proposal_ref)?;
        let mut state = self.write_state()?;
        let refs: Vec<ProposalRef> = state.get_list(PROPOSAL_REFS, &refs_key)?;
        let mut queued: Vec<&ProposalRef> = Vec::with_capacity(refs.len() + 1);
        let mut already_queued = false;
        for r in &refs {
            already_queued |= encode(PROPOSAL_REFS, r)? == ref_json;
            queued.push(r);
        }
        if !already_queued {
            queued.push(proposal_ref);
        }
        let refs_json = encode(PROPOSAL_REFS, &queued)?;
        state.set(refs_key, Some(refs_json));
        state.set(proposal_key, Some(proposal_json));
        Ok(())
    }

    fn write_tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        tree: &TreeSync,
    ) -> Result<(), Self::Error> {
        self.put(TREE, group_id, tree)
    }

    fn write_interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        interim_transcript_hash: &InterimTranscriptHash,
    ) -> Result<(), Self::Error> {
        self.put(INTERIM_TRANSCRIPT_HASH, group_id, interim_transcript_hash)
    }

    fn write_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_context: &GroupContext,
    ) -> Result<(), Self::Error> {
        self.put(GROUP_CONTEXT, group_id, group_context)
    }

    fn write_confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        confirmation_tag: &ConfirmationTag,
    ) -> Result<(), Self::Error> {
        self.put(CONFIRMATION_TAG, group_id, confirmation_tag)
    }

    fn write_group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_state: &GroupState,
    ) -> Result<(), Self::Error> {
        self.put(GROUP_STATE, group_id, group_state)
    }

    fn write_message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        message_secrets: &MessageSecrets,
    ) -> Result<(), Self::Error> {
        self.put(MESSAGE_SECRETS, group_id, message_secrets)
    }

    fn write_resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        resumption_psk_store: &ResumptionPskStore,
    ) -> Result<(), Self::Error> {
        self.put(RESUMPTION_PSK_STORE, group_id, resumption_psk_store)
    }

    fn write_own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        own_leaf_index: &LeafNodeIndex,
    ) -> Result<(), Self::Error> {
        self.put(OWN_LEAF_INDEX, group_id, own_leaf_index)
    }

    fn write_group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_epoch_secrets: &GroupEpochSecrets,
    ) -> Result<(), Self::Error> {
        self.put(EPOCH_SECRETS, group_id, group_epoch_secrets)
    }

    //
    // Crypto objects: writers.
    //

    fn write_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
        signature_key_pair: &SignatureKeyPair,
    ) -> Result<(), Self::Error> {
        self.put(SIGNATURE_KEY_PAIR, public_key, signature_key_pair)
    }

    fn write_encryption_key_pair<
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
        key_pair: &HpkeKeyPair,
    ) -> Result<(), Self::Error> {
        self.put(ENCRYPTION_KEY_PAIR, public_key, key_pair)
    }

    fn write_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
        key_pairs: &[HpkeKeyPair],
    ) -> Result<(), Self::Error> {
        self.put(EPOCH_KEY_PAIRS, &(group_id, epoch, leaf_index), &key_pairs)
    }

    fn write_key_package<
        HashReference: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &HashReference,
        key_package: &KeyPackage,
    ) -> Result<(), Self::Error> {
        self.put(KEY_PACKAGE, hash_ref, key_package)
    }

    fn write_psk<
        PskId: traits::PskId<CURRENT_VERSION>,
        PskBundle: traits::PskBundle<CURRENT_VERSION>,
    >(
        &self,
        psk_id: &PskId,
        psk: &PskBundle,
    ) -> Result<(), Self::Error> {
        self.put(PSK, psk_id, psk)
    }

    //
    // Group state: readers.
    //

    fn mls_group_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MlsGroupJoinConfig>, Self::Error> {
        self.get(JOIN_CONFIG, group_id)
    }

    fn own_leaf_nodes<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<LeafNode>, Self::Error> {
        self.get_list(OWN_LEAF_NODES, group_id)
    }

    fn queued_proposal_refs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<ProposalRef>, Self::Error> {
        self.get_list(PROPOSAL_REFS, group_id)
    }

    /// The queued proposals in queue order. A queued reference without its proposal record is
    /// corrupt state.
    fn queued_proposals<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<(ProposalRef, QueuedProposal)>, Self::Error> {
        let refs_key = storage_key(PROPOSAL_REFS, group_id)?;
        let state = self.read_state()?;
        let refs: Vec<ProposalRef> = state.get_list(PROPOSAL_REFS, &refs_key)?;
        let mut proposals = Vec::with_capacity(refs.len());
        for proposal_ref in refs {
            let key = proposal_key(group_id, &proposal_ref)?;
            let Some(proposal) = state.get(QUEUED_PROPOSAL, &key)? else {
                return Err(MlsStorageError::Corrupt {
                    record: QUEUED_PROPOSAL,
                    reason: "a queued proposal reference has no proposal".to_string(),
                });
            };
            proposals.push((proposal_ref, proposal));
        }
        Ok(proposals)
    }

    fn tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<TreeSync>, Self::Error> {
        self.get(TREE, group_id)
    }

    fn group_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupContext>, Self::Error> {
        self.get(GROUP_CONTEXT, group_id)
    }

    fn interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<InterimTranscriptHash>, Self::Error> {
        self.get(INTERIM_TRANSCRIPT_HASH, group_id)
    }

    fn confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ConfirmationTag>, Self::Error> {
        self.get(CONFIRMATION_TAG, group_id)
    }

    fn group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupState>, Self::Error> {
        self.get(GROUP_STATE, group_id)
    }

    fn message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MessageSecrets>, Self::Error> {
        self.get(MESSAGE_SECRETS, group_id)
    }

    fn resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ResumptionPskStore>, Self::Error> {
        self.get(RESUMPTION_PSK_STORE, group_id)
    }

    fn own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<LeafNodeIndex>, Self::Error> {
        self.get(OWN_LEAF_INDEX, group_id)
    }

    fn group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupEpochSecrets>, Self::Error> {
        self.get(EPOCH_SECRETS, group_id)
    }

    //
    // Crypto objects: readers.
    //

    fn signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<Option<SignatureKeyPair>, Self::Error> {
        self.get(SIGNATURE_KEY_PAIR, public_key)
    }

    fn encryption_key_pair<
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<Option<HpkeKeyPair>, Self::Error> {
        self.get(ENCRYPTION_KEY_PAIR, public_key)
    }

    fn encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<Vec<HpkeKeyPair>, Self::Error> {
        self.get_list(EPOCH_KEY_PAIRS, &(group_id, epoch, leaf_index))
    }

    fn key_package<
        KeyPackageRef: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<Option<KeyPackage>, Self::Error> {
        self.get(KEY_PACKAGE, hash_ref)
    }

    fn psk<PskBundle: traits::PskBundle<CURRENT_VERSION>, PskId: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskId,
    ) -> Result<Option<PskBundle>, Self::Error> {
        self.get(PSK, psk_id)
    }

    //
    // Group state: deleters.
    //

    /// Takes the reference out of the group's queue (deleting the queue once empty) and deletes
    /// the proposal record.
    fn remove_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
    ) -> Result<(), Self::Error> {
        let proposal_key = proposal_key(group_id, proposal_ref)?;
        let refs_key = storage_key(PROPOSAL_REFS, group_id)?;
        let ref_json = encode(PROPOSAL_REFS, proposal_ref)?;
        let mut state = self.write_state()?;
        let refs: Vec<ProposalRef> = state.get_list(PROPOSAL_REFS, &refs_key)?;
        let mut kept = Vec::with_capacity(refs.len());
        for r in &refs {
            if encode(PROPOSAL_REFS, r)? != ref_json {
                kept.push(r);
            }
        }
        let refs_json = if kept.is_empty() {
            None
        } else {
            Some(encode(PROPOSAL_REFS, &kept)?)
        };
        state.set(refs_key, refs_json);
        state.set(proposal_key, None);
        Ok(())
    }

    fn delete_own_leaf_nodes<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(OWN_LEAF_NODES, group_id)
    }

    fn delete_group_config<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(JOIN_CONFIG, group_id)
    }

    fn delete_tree<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(TREE, group_id)
    }

    fn delete_confirmation_tag<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(CONFIRMATION_TAG, group_id)
    }

    fn delete_group_state<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(GROUP_STATE, group_id)
    }

    fn delete_context<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(GROUP_CONTEXT, group_id)
    }

    fn delete_interim_transcript_hash<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(INTERIM_TRANSCRIPT_HASH, group_id)
    }

    fn delete_message_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(MESSAGE_SECRETS, group_id)
    }

    fn delete_all_resumption_psk_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(RESUMPTION_PSK_STORE, group_id)
    }

    fn delete_own_leaf_index<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(OWN_LEAF_INDEX, group_id)
    }

    fn delete_group_epoch_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.remove(EPOCH_SECRETS, group_id)
    }

    /// Deletes every queued proposal of the group and the queue itself.
    fn clear_proposal_queue<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        let refs_key = storage_key(PROPOSAL_REFS, group_id)?;
        let mut state = self.write_state()?;
        let refs: Vec<ProposalRef> = state.get_list(PROPOSAL_REFS, &refs_key)?;
        let proposal_keys = refs
            .iter()
            .map(|proposal_ref| proposal_key(group_id, proposal_ref))
            .collect::<Result<Vec<_>, _>>()?;
        for key in proposal_keys {
            state.set(key, None);
        }
        state.set(refs_key, None);
        Ok(())
    }

    //
    // Crypto objects: deleters.
    //

    fn delete_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<(), Self::Error> {
        self.remove(SIGNATURE_KEY_PAIR, public_key)
    }

    fn delete_encryption_key_pair<EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>>(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<(), Self::Error> {
        self.remove(ENCRYPTION_KEY_PAIR, public_key)
    }

    fn delete_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<(), Self::Error> {
        self.remove(EPOCH_KEY_PAIRS, &(group_id, epoch, leaf_index))
    }

    fn delete_key_package<KeyPackageRef: traits::HashReference<CURRENT_VERSION>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<(), Self::Error> {
        self.remove(KEY_PACKAGE, hash_ref)
    }

    fn delete_psk<PskKey: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskKey,
    ) -> Result<(), Self::Error> {
        self.remove(PSK, psk_id)
    }
}

#[cfg(test)]
mod tests {
    use openmls::prelude::hash_ref::ProposalRef;
    use openmls::prelude::*;
    use openmls_basic_credential::SignatureKeyPair;
    use openmls_rust_crypto::RustCrypto;

    use super::*;
    use crate::env::{MemStore, Store, WriteOp};

    /// An openmls provider on [`MlsStorage`], with RustCrypto's crypto and OS randomness (tests
    /// only: the device provider draws from the injected entropy).
    struct TestProvider {
        crypto: RustCrypto,
        storage: MlsStorage,
    }

    impl OpenMlsProvider for TestProvider {
        type CryptoProvider = RustCrypto;
        type RandProvider = RustCrypto;
        type StorageProvider = MlsStorage;

        fn storage(&self) -> &MlsStorage {
            &self.storage
        }

        fn crypto(&self) -> &RustCrypto {
            &self.crypto
        }

        fn rand(&self) -> &RustCrypto {
            &self.crypto
        }
    }

    const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

    fn group(name: &str) -> GroupId {
        GroupId::from_slice(name.as_bytes())
    }

    fn write_index(storage: &MlsStorage, group_id: &GroupId, index: u32) {
        storage
            .write_own_leaf_index(group_id, &LeafNodeIndex::new(index))
            .unwrap();
    }

    fn read_index(storage: &MlsStorage, group_id: &GroupId) -> Option<u32> {
        storage
            .own_leaf_index::<GroupId, LeafNodeIndex>(group_id)
            .unwrap()
            .map(|index| index.u32())
    }

    fn index_key(group_id: &GroupId) -> Vec<u8> {
        storage_key(OWN_LEAF_INDEX, group_id).unwrap()
    }

    /// The key a batch write goes to.
    fn op_key(op: &WriteOp) -> &[u8] {
        match op {
            WriteOp::Put { key, .. } | WriteOp::Delete { key, .. } => key,
        }
    }

    /// Number of records of one kind.
    fn records(storage: &MlsStorage, label: &str) -> usize {
        let state = storage.read_state().unwrap();
        let labels = state.values.keys().map(|key| label_of(key));
        labels.filter(|l| *l == Some(label)).count()
    }

    /// Takes the pending writes and commits them, as a device does after an MLS operation.
    fn commit(storage: &MlsStorage, store: &mut MemStore) -> WriteBatch {
        let mut batch = WriteBatch::default();
        storage.take_writes(&mut batch);
        store.commit(batch.clone()).unwrap();
        batch
    }

    /// Alice: a signer kept in `provider`'s storage and her credential.
    fn alice(provider: &TestProvider) -> (SignatureKeyPair, CredentialWithKey) {
        let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).unwrap();
        signer.store(provider.storage()).unwrap();
        let credential = CredentialWithKey {
            credential: BasicCredential::new(b"alice".to_vec()).into(),
            signature_key: signer.public().into(),
        };
        (signer, credential)
    }

    fn new_group(
        provider: &TestProvider,
        signer: &SignatureKeyPair,
        credential: CredentialWithKey,
    ) -> MlsGroup {
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .build();
        MlsGroup::new(provider, signer, &config, credential).unwrap()
    }

    #[test]
    fn labels_are_distinct_and_cannot_run_into_the_openmls_key() {
        for (i, label) in LABELS.iter().enumerate() {
            assert!(!label.is_empty());
            assert!(label.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
            assert!(!LABELS[..i].contains(label), "duplicate label {label}");
        }
        let key = index_key(&group("g"));
        assert_eq!(&key[..2], &CURRENT_VERSION.to_be_bytes());
        assert_eq!(&key[2..17], b"own_leaf_index\0");
        assert_eq!(label_of(&key), Some(OWN_LEAF_INDEX));
    }

    #[test]
    fn values_written_as_json_by_earlier_versions_still_read() {
        assert_eq!(decode::<u32>(OWN_LEAF_INDEX, b"7").unwrap(), 7);
        assert_eq!(decode::<u32>(OWN_LEAF_INDEX, &[MSGPACK_TAG, 7]).unwrap(), 7);
        assert_eq!(encode(OWN_LEAF_INDEX, &7u32).unwrap(), vec![MSGPACK_TAG, 7]);
        for bad in [
            &b""[..],
            &[MSGPACK_TAG][..],
            &[MSGPACK_TAG, 0xc1][..],
            &b"{"[..],
        ] {
            assert!(matches!(
                decode::<u32>(OWN_LEAF_INDEX, bad),
                Err(MlsStorageError::Corrupt { .. })
            ));
        }
    }

    #[test]
    fn writes_reach_the_batch_once_with_the_last_value_and_deletes_as_deletes() {
        let storage = MlsStorage::new();
        assert!(storage.is_empty() && !storage.has_pending());
        let (g1, g2) = (group("g1"), group("g2"));

        write_index(&storage, &g1, 1);
        write_index(&storage, &g1, 2);
        write_index(&storage, &g2, 3);
        storage.delete_own_leaf_index(&g2).unwrap();
        assert_eq!(read_index(&storage, &g1), Some(2), "reads see the writes");
        assert_eq!(read_index(&storage, &g2), None);
        assert!(storage.has_pending());

        let mut batch = WriteBatch::default();
        storage.take_writes(&mut batch);
        let mut expected = vec![
            WriteOp::Put {
                table: MLS_TABLE,
                key: index_key(&g1),
                value: vec![MSGPACK_TAG, 2],
            },
            WriteOp::Delete {
                table: MLS_TABLE,
                key: index_key(&g2),
            },
        ];
        expected.sort_by(|a, b| op_key(a).cmp(op_key(b)));
        assert_eq!(batch.ops(), expected.as_slice(), "in key order");
        assert!(!storage.has_pending());
        assert_eq!(storage.len(), 1);

        let mut again = WriteBatch::default();
        storage.take_writes(&mut again);
        assert!(again.is_empty(), "each write is taken once");
        assert_eq!(
            read_index(&storage, &g1),
            Some(2),
            "taking keeps the values"
        );
    }

    #[test]
    fn recover_after_commit_restores_the_same_records() {
        let storage = MlsStorage::new();
        let mut store = MemStore::default();
        let (g1, g2, g3) = (group("g1"), group("g2"), group("g3"));
        write_index(&storage, &g1, 1);
        write_index(&storage, &g2, 2);
        commit(&storage, &mut store);
        write_index(&storage, &g3, 3);
        storage.delete_own_leaf_index(&g1).unwrap();
        commit(&storage, &mut store);

        let recovered = MlsStorage::recover(&store).unwrap();
        assert!(!recovered.has_pending());
        assert_eq!(recovered.len(), 2);
        assert_eq!(store.table_len(MLS_TABLE), 2);
        for g in [&g1, &g2, &g3] {
            assert_eq!(read_index(&recovered, g), read_index(&storage, g));
        }
        assert_eq!(read_index(&recovered, &g1), None);
    }

    #[test]
    fn discard_restores_every_record_to_its_value_at_the_last_take() {
        let storage = MlsStorage::new();
        let mut store = MemStore::default();
        let (kept, created, deleted) = (group("kept"), group("created"), group("deleted"));
        write_index(&storage, &kept, 1);
        write_index(&storage, &deleted, 2);
        commit(&storage, &mut store);

        // A failed operation: overwrites, creates, deletes, then gives up.
        write_index(&storage, &kept, 10);
        write_index(&storage, &kept, 11);
        write_index(&storage, &created, 20);
        storage.delete_own_leaf_index(&deleted).unwrap();
        storage.discard_writes();

        assert_eq!(read_index(&storage, &kept), Some(1));
        assert_eq!(
            read_index(&storage, &created),
            None,
            "a new key is gone again"
        );
        assert_eq!(read_index(&storage, &deleted), Some(2));
        assert_eq!(storage.len(), 2);
        assert!(!storage.has_pending());
        let mut batch = WriteBatch::default();
        storage.take_writes(&mut batch);
        assert!(
            batch.is_empty(),
            "nothing of the failed operation is written"
        );
    }

    #[test]
    fn an_undecodable_stored_value_is_an_error_not_a_panic() {
        let g = group("g");
        let mut store = MemStore::default();
        let mut batch = WriteBatch::default();
        batch.put(MLS_TABLE, index_key(&g), b"\"not an index\"".to_vec());
        batch.put(
            MLS_TABLE,
            storage_key(OWN_LEAF_NODES, &g).unwrap(),
            b"[1,2]".to_vec(),
        );
        store.commit(batch).unwrap();

        let storage = MlsStorage::recover(&store).unwrap();
        let error = storage
            .own_leaf_index::<GroupId, LeafNodeIndex>(&g)
            .unwrap_err();
        assert!(matches!(
            error,
            MlsStorageError::Corrupt {
                record: OWN_LEAF_INDEX,
                ..
            }
        ));
        assert!(storage.own_leaf_nodes::<GroupId, LeafNode>(&g).is_err());
    }

    #[test]
    fn recover_rejects_records_it_cannot_have_written() {
        let cases: [(&str, Vec<u8>, Vec<u8>); 3] = [
            ("not JSON", index_key(&group("g")), b"{torn".to_vec()),
            (
                "unknown label",
                b"\x00\x01nonsense\x00\"g\"".to_vec(),
                b"1".to_vec(),
            ),
            (
                "another storage version",
                b"\x00\x02tree\x00\"g\"".to_vec(),
                b"1".to_vec(),
            ),
        ];
        for (case, key, value) in cases {
            let mut store = MemStore::default();
            let mut batch = WriteBatch::default();
            batch.put(MLS_TABLE, key, value);
            store.commit(batch).unwrap();
            let result = MlsStorage::recover(&store);
            assert!(
                matches!(result, Err(StoreError::Corrupt { table: "mls", .. })),
                "{case}"
            );
        }
    }

    #[test]
    fn an_openmls_group_survives_commit_and_recover() {
        let provider = TestProvider {
            crypto: RustCrypto::default(),
            storage: MlsStorage::new(),
        };
        let (signer, credential) = alice(&provider);
        let key_package = KeyPackage::builder()
            .build(CIPHERSUITE, &provider, &signer, credential.clone())
            .unwrap();
        let mut group = new_group(&provider, &signer, credential);
        group
            .self_update(&provider, &signer, LeafNodeParameters::default())
            .unwrap();
        group.merge_pending_commit(&provider).unwrap();
        group
            .propose_self_update(&provider, &signer, LeafNodeParameters::default())
            .unwrap();
        assert_eq!(group.epoch(), GroupEpoch::from(1));
        let mut store = MemStore::default();
        commit(&provider.storage, &mut store);

        let recovered = MlsStorage::recover(&store).unwrap();
        assert_eq!(recovered.len(), provider.storage.len());
        let loaded = MlsGroup::load(&recovered, group.group_id())
            .unwrap()
            .expect("the group is stored");
        assert_eq!(loaded.epoch(), group.epoch());
        assert_eq!(loaded.own_leaf_index(), group.own_leaf_index());
        assert_eq!(loaded.pending_proposals().count(), 1);
        assert_eq!(
            loaded.export_secret(provider.crypto(), "sund test", b"", 32),
            group.export_secret(provider.crypto(), "sund test", b"", 32),
            "the same epoch secrets"
        );
        let hash_ref = key_package
            .key_package()
            .hash_ref(provider.crypto())
            .unwrap();
        assert!(recovered
            .key_package::<KeyPackageRef, KeyPackageBundle>(&hash_ref)
            .unwrap()
            .is_some());
        assert!(
            SignatureKeyPair::read(&recovered, signer.public(), signer.signature_scheme())
                .is_some()
        );

        let mut loaded = loaded;
        loaded.clear_pending_proposals(&recovered).unwrap();
        assert!(recovered
            .queued_proposal_refs::<GroupId, ProposalRef>(group.group_id())
            .unwrap()
            .is_empty());
        assert_eq!(
            recovered.len(),
            provider.storage.len() - 2,
            "proposal and queue"
        );
    }

    #[test]
    fn a_removed_proposal_leaves_the_queue_and_its_record() {
        let provider = TestProvider {
            crypto: RustCrypto::default(),
            storage: MlsStorage::new(),
        };
        let (signer, credential) = alice(&provider);
        let mut group = new_group(&provider, &signer, credential);
        let (_, first) = group
            .propose_self_update(&provider, &signer, LeafNodeParameters::default())
            .unwrap();
        let (_, second) = group
            .propose_self_update(&provider, &signer, LeafNodeParameters::default())
            .unwrap();
        let group_id = group.group_id().clone();
        let queue = |storage: &MlsStorage| {
            storage
                .queued_proposal_refs::<GroupId, ProposalRef>(&group_id)
                .unwrap()
        };
        assert_eq!(queue(&provider.storage), [first.clone(), second.clone()]);

        group
            .remove_pending_proposal(provider.storage(), &first)
            .unwrap();
        assert_eq!(queue(&provider.storage), std::slice::from_ref(&second));
        let queued = provider
            .storage
            .queued_proposals::<GroupId, ProposalRef, QueuedProposal>(&group_id)
            .unwrap();
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].0, second);
        assert_eq!(records(&provider.storage, QUEUED_PROPOSAL), 1);

        group
            .remove_pending_proposal(provider.storage(), &second)
            .unwrap();
        assert!(queue(&provider.storage).is_empty());
        assert_eq!(records(&provider.storage, QUEUED_PROPOSAL), 0);
        assert_eq!(
            records(&provider.storage, PROPOSAL_REFS),
            0,
            "no empty queue left"
        );
    }

    #[test]
    fn a_discarded_openmls_operation_leaves_the_group_at_the_last_take() {
        let provider = TestProvider {
            crypto: RustCrypto::default(),
            storage: MlsStorage::new(),
        };
        let (signer, credential) = alice(&provider);
        let mut group = new_group(&provider, &signer, credential);
        let mut store = MemStore::default();
        commit(&provider.storage, &mut store);

        group
            .self_update(&provider, &signer, LeafNodeParameters::default())
            .unwrap();
        group.merge_pending_commit(&provider).unwrap();
        assert!(provider.storage.has_pending());
        provider.storage.discard_writes();

        let loaded = MlsGroup::load(&provider.storage, group.group_id())
            .unwrap()
            .expect("the group is stored");
        assert_eq!(loaded.epoch(), GroupEpoch::from(0));
        assert!(loaded.pending_commit().is_none());
        let recovered = MlsStorage::recover(&store).unwrap();
        assert_eq!(recovered.len(), provider.storage.len());
    }
}
