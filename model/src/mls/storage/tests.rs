use openmls::prelude::hash_ref::ProposalRef;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::RustCrypto;

use super::*;
use crate::env::{MemStore, Store, WriteOp};
use openmls_traits::storage::StorageProvider;

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
            value: vec![MSGPACK_TAG, 2].into(),
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
        SignatureKeyPair::read(&recovered, signer.public(), signer.signature_scheme()).is_some()
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

#[test]
fn byte_vectors_are_stored_as_binary_strings_and_arrays_of_integers_still_read() {
    let bytes: Vec<u8> = (0..=255).collect();
    let stored = encode(TREE, &bytes).unwrap();
    // Tag, bin16 marker, two length bytes, the bytes themselves.
    assert_eq!(stored[..4], [MSGPACK_TAG, 0xc5, 0x01, 0x00]);
    assert_eq!(stored.len(), 4 + 256);
    assert_eq!(decode::<Vec<u8>>(TREE, &stored).unwrap(), bytes);
    // What earlier versions wrote: an array holding one integer per byte.
    let mut earlier = vec![MSGPACK_TAG];
    rmp_serde::encode::write(&mut earlier, &bytes).unwrap();
    assert_eq!(earlier[1], 0xdc, "array16");
    assert_eq!(decode::<Vec<u8>>(TREE, &earlier).unwrap(), bytes);
    // An empty vector and a vector of wider integers stay arrays.
    assert_eq!(
        decode::<Vec<u8>>(TREE, &encode(TREE, &Vec::<u8>::new()).unwrap()).unwrap(),
        b""
    );
    let wide = vec![1u16, 300, 7];
    assert_eq!(
        decode::<Vec<u16>>(TREE, &encode(TREE, &wide).unwrap()).unwrap(),
        wide
    );
}

#[test]
fn a_group_stored_with_binary_strings_reloads_whole() {
    let provider = TestProvider {
        crypto: RustCrypto::default(),
        storage: MlsStorage::new(),
    };
    let (signer, credential) = alice(&provider);
    let mut group = new_group(&provider, &signer, credential);
    group
        .self_update(&provider, &signer, LeafNodeParameters::default())
        .unwrap();
    group.merge_pending_commit(&provider).unwrap();
    let mut store = MemStore::default();
    commit(&provider.storage, &mut store);
    let recovered = MlsStorage::recover(&store).unwrap();
    let loaded = MlsGroup::load(&recovered, group.group_id())
        .unwrap()
        .expect("the group is stored");
    assert_eq!(loaded.epoch(), group.epoch());
    assert_eq!(
        loaded.epoch_authenticator().as_slice(),
        group.epoch_authenticator().as_slice()
    );
    assert_eq!(loaded.export_ratchet_tree(), group.export_ratchet_tree());
}
