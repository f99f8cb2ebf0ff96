//! The chunk index as an uploader, a fetcher, a damaged disk and a restart exercise it.

use proptest::prelude::*;

use super::*;
use crate::env::{MemStore, Store};

const CONV: ConversationId = ConversationId(7);
const OTHER: ConversationId = ConversationId(8);
const ALICE: UserId = UserId(1);
const BOB: UserId = UserId(2);
const T0: Instant = Instant(1_000_000);

fn id(n: u8) -> ChunkId {
    ChunkId([n; 32])
}

fn listed(ns: &[u8], len: u32) -> Vec<ListedChunk> {
    ns.iter()
        .map(|&n| ListedChunk {
            id: id(n),
            sealed_len: len,
        })
        .collect()
}

fn members(ns: &[u128]) -> BTreeSet<DeviceId> {
    ns.iter().map(|&n| DeviceId(n)).collect()
}

fn blob(len: u32, fill: u8) -> Bytes {
    Bytes::from(vec![fill; len as usize])
}

/// An index whose every batch is committed to `store`, as a driver would.
struct Harness {
    index: ChunkIndex,
    store: MemStore,
}

impl Harness {
    fn new(limits: ChunkLimits) -> Harness {
        Harness {
            index: ChunkIndex::new(limits),
            store: MemStore::default(),
        }
    }

    fn run<T>(&mut self, f: impl FnOnce(&mut ChunkIndex, &mut WriteBatch) -> T) -> T {
        let mut writes = WriteBatch::default();
        let out = f(&mut self.index, &mut writes);
        self.store.commit(writes).unwrap();
        self.index.consistency().unwrap();
        out
    }

    fn open(
        &mut self,
        upload: u8,
        owner: UserId,
        chunks: &[ListedChunk],
    ) -> Result<Vec<ChunkId>, ChunkRefusal> {
        self.run(|index, writes| {
            index.open_upload(
                T0,
                UploadRequest {
                    conversation: CONV,
                    upload: UploadId([upload; 16]),
                    owner,
                    chunks,
                    members: members(&[10, 11]),
                },
                writes,
            )
        })
    }

    fn store_chunk(&mut self, upload: u8, n: u8, bytes: Bytes) -> Result<bool, ChunkRefusal> {
        self.store_as(ALICE, upload, n, bytes)
    }

    fn store_as(
        &mut self,
        owner: UserId,
        upload: u8,
        n: u8,
        bytes: Bytes,
    ) -> Result<bool, ChunkRefusal> {
        self.run(|index, writes| {
            index.store_chunk(CONV, owner, UploadId([upload; 16]), id(n), bytes, writes)
        })
    }

    fn read(&self, plan: &FetchPlan) -> Vec<u8> {
        self.store
            .get(BLOBS_TABLE, &plan.key)
            .unwrap()
            .expect("the blob is stored")
    }

    fn recovered(&self) -> ChunkIndex {
        ChunkIndex::recover(self.index.limits.clone(), &self.store).unwrap()
    }

    /// The same store after a restart: the index as recovered from it.
    fn recovered_harness(self) -> Harness {
        let index = self.recovered();
        Harness {
            index,
            store: self.store,
        }
    }
}

fn same(a: &ChunkIndex, b: &ChunkIndex) {
    assert_eq!(a.chunks, b.chunks);
    assert_eq!(a.uploads, b.uploads);
    assert_eq!(a.expiries, b.expiries);
    assert_eq!(a.uploads_open, b.uploads_open);
    assert_eq!(a.usage, b.usage);
    assert_eq!(a.dropping, b.dropping);
}

#[test]
fn an_upload_resumes_with_what_is_missing_and_a_member_fetches_what_was_stored() {
    let mut h = Harness::new(ChunkLimits::default());
    let chunks = listed(&[1, 2, 3], 1_000);
    assert_eq!(h.open(1, ALICE, &chunks), Ok(vec![id(1), id(2), id(3)]));
    assert_eq!(
        h.index.usage(ALICE),
        3_000,
        "charged at once: a reservation"
    );
    h.store_chunk(1, 1, blob(1_000, 1)).unwrap();
    // The uploader crashed here; opening the same upload again resumes it.
    let h2 = h.recovered();
    same(&h.index, &h2);
    assert_eq!(h.open(1, ALICE, &chunks), Ok(vec![id(2), id(3)]));
    h.store_chunk(1, 2, blob(1_000, 2)).unwrap();
    h.store_chunk(1, 3, blob(1_000, 3)).unwrap();
    assert_eq!(h.open(1, ALICE, &chunks), Ok(vec![]));

    let plan = h.index.admit_fetch(CONV, ALICE, id(2)).unwrap();
    let bytes = h.read(&plan);
    assert!(verify_blob(&plan, &bytes));
    assert_eq!(bytes, vec![2; 1_000]);
    // Another conversation sees nothing of it.
    assert_eq!(
        h.index.admit_fetch(OTHER, ALICE, id(2)),
        Err(ChunkRefusal::Unavailable(id(2)))
    );
}

#[test]
fn sending_again_uploads_nothing_and_charges_nothing() {
    let mut h = Harness::new(ChunkLimits::default());
    h.open(1, ALICE, &listed(&[1, 2], 500)).unwrap();
    h.store_chunk(1, 1, blob(500, 1)).unwrap();
    h.store_chunk(1, 2, blob(500, 2)).unwrap();
    // The same file again, and an edited one sharing chunk 2.
    assert_eq!(h.open(2, ALICE, &listed(&[1, 2], 500)), Ok(vec![]));
    assert_eq!(h.open(3, ALICE, &listed(&[2, 9], 500)), Ok(vec![id(9)]));
    assert_eq!(h.index.usage(ALICE), 1_500, "only what it added");
    assert_eq!(h.index.chunk(CONV, ALICE, id(2)).unwrap().refs, 3);
}

/// Every member knows a sender's secret (it is in the manifests), so it can compute the ids
/// of the sender's chunks. It must not be able to pin them, block them or poison them.
#[test]
fn another_member_cannot_borrow_block_or_poison_a_senders_chunks() {
    let mut h = Harness::new(ChunkLimits::default());
    // Bob lists Alice's future ids first, with a wrong length, and stores garbage there.
    assert_eq!(h.open(9, BOB, &listed(&[1], 77)), Ok(vec![id(1)]));
    h.store_as(BOB, 9, 1, blob(77, 0xee)).unwrap();
    // Alice's upload is not affected: her chunk is awaited from her, at her length.
    assert_eq!(h.open(1, ALICE, &listed(&[1], 500)), Ok(vec![id(1)]));
    assert_eq!(
        h.store_as(BOB, 1, 1, blob(500, 0xee)),
        Err(ChunkRefusal::NoSuchUpload),
        "nobody stores into another's upload"
    );
    h.store_chunk(1, 1, blob(500, 1)).unwrap();
    let plan = h.index.admit_fetch(CONV, ALICE, id(1)).unwrap();
    assert_eq!(h.read(&plan), vec![1; 500]);
    assert_eq!(h.index.usage(ALICE), 500);
    assert_eq!(h.index.usage(BOB), 77, "Bob pays for his own");
    // When Alice's upload is fetched, her chunk goes even though Bob listed the same id.
    for device in [10, 11] {
        h.run(|index, writes| index.fetched_all(CONV, UploadId([1; 16]), DeviceId(device), writes));
    }
    assert!(h.index.chunk(CONV, ALICE, id(1)).is_none());
    assert_eq!(h.index.usage(ALICE), 0);
}

#[test]
fn the_quota_refuses_with_the_numbers_and_changes_nothing() {
    let limits = ChunkLimits {
        quota_bytes_per_user: 2_500,
        ..ChunkLimits::default()
    };
    let mut h = Harness::new(limits);
    h.open(1, ALICE, &listed(&[1, 2], 1_000)).unwrap();
    let before = h.store.records().count();
    let err = h.open(2, ALICE, &listed(&[3, 4], 1_000)).unwrap_err();
    assert_eq!(
        err,
        ChunkRefusal::QuotaExceeded {
            needed: 2_000,
            used: 2_000,
            quota: 2_500
        }
    );
    assert!(
        err.to_string().contains("wait until members have fetched"),
        "{err}"
    );
    assert_eq!(h.store.records().count(), before);
    assert_eq!(h.index.usage(ALICE), 2_000);
    // Chunks already listed cost nothing again, so this one fits (chunk 1 is still awaited:
    // whichever upload brings its bytes first, they are stored once).
    let mut list = listed(&[1], 1_000);
    list.extend(listed(&[5], 500));
    assert_eq!(h.open(3, ALICE, &list), Ok(vec![id(1), id(5)]));
    assert!(
        matches!(
            h.open(4, ALICE, &listed(&[1], 999)),
            Err(ChunkRefusal::BadList(_))
        ),
        "an id names one content, so one length"
    );
    assert_eq!(h.index.usage(ALICE), 2_500);
}

#[test]
fn bytes_are_taken_only_for_an_awaited_chunk_at_its_declared_length() {
    let mut h = Harness::new(ChunkLimits::default());
    h.open(1, ALICE, &listed(&[1, 2], 100)).unwrap();
    assert_eq!(
        h.store_chunk(9, 1, blob(100, 0)),
        Err(ChunkRefusal::NoSuchUpload)
    );
    assert_eq!(
        h.store_chunk(1, 3, blob(100, 0)),
        Err(ChunkRefusal::NotAwaited(id(3)))
    );
    assert_eq!(
        h.store_chunk(1, 1, blob(99, 0)),
        Err(ChunkRefusal::WrongLength {
            id: id(1),
            declared: 100,
            got: 99
        })
    );
    assert_eq!(h.store_chunk(1, 1, blob(100, 1)), Ok(true));
    let digest = h.index.chunk(CONV, ALICE, id(1)).unwrap().digest;
    assert_eq!(
        h.store_chunk(1, 1, blob(100, 6)),
        Ok(false),
        "a copy of a stored chunk is acknowledged"
    );
    assert_eq!(
        h.index.chunk(CONV, ALICE, id(1)).unwrap().digest,
        digest,
        "stored once, never replaced"
    );
    assert_eq!(
        h.index.admit_fetch(CONV, ALICE, id(2)),
        Err(ChunkRefusal::Unavailable(id(2))),
        "awaited, not fetchable"
    );
}

#[test]
fn bad_lists_and_reused_ids_are_refused() {
    let mut h = Harness::new(ChunkLimits::default());
    let nobody = h.run(|index, writes| {
        let request = UploadRequest {
            conversation: CONV,
            upload: UploadId([1; 16]),
            owner: ALICE,
            chunks: &listed(&[1], 10),
            members: BTreeSet::new(),
        };
        index.open_upload(T0, request, writes)
    });
    assert!(matches!(nobody, Err(ChunkRefusal::BadList(_))));
    assert!(matches!(
        h.open(1, ALICE, &[]),
        Err(ChunkRefusal::BadList(_))
    ));
    assert!(matches!(
        h.open(1, ALICE, &listed(&[1, 1], 10)),
        Err(ChunkRefusal::BadList(_))
    ));
    assert!(matches!(
        h.open(1, ALICE, &listed(&[1], 0)),
        Err(ChunkRefusal::BadList(_))
    ));
    assert!(matches!(
        h.open(1, ALICE, &listed(&[1], u32::MAX)),
        Err(ChunkRefusal::BadList(_))
    ));
    h.open(1, ALICE, &listed(&[1], 10)).unwrap();
    assert_eq!(
        h.open(1, ALICE, &listed(&[2], 10)),
        Err(ChunkRefusal::UploadIdReused)
    );
    assert_eq!(
        h.open(1, BOB, &listed(&[1], 10)),
        Err(ChunkRefusal::UploadIdReused)
    );
}

#[test]
fn a_chunk_damaged_at_rest_is_caught_on_read_and_uploaded_again() {
    let mut h = Harness::new(ChunkLimits::default());
    let chunks = listed(&[1], 64);
    h.open(1, ALICE, &chunks).unwrap();
    h.store_chunk(1, 1, blob(64, 1)).unwrap();
    let plan = h.index.admit_fetch(CONV, ALICE, id(1)).unwrap();
    let mut bytes = h.read(&plan);
    bytes[10] ^= 0x40; // a flipped bit on the gateway's disk
    assert!(!verify_blob(&plan, &bytes));
    h.run(|index, writes| index.damaged(CONV, ALICE, id(1), writes));
    assert!(h.store.get(BLOBS_TABLE, &plan.key).unwrap().is_none());
    assert_eq!(
        h.index.admit_fetch(CONV, ALICE, id(1)),
        Err(ChunkRefusal::Unavailable(id(1)))
    );
    assert_eq!(
        h.open(1, ALICE, &chunks),
        Ok(vec![id(1)]),
        "the uploader is asked again"
    );
    h.store_chunk(1, 1, blob(64, 1)).unwrap();
    let plan = h.index.admit_fetch(CONV, ALICE, id(1)).unwrap();
    assert!(verify_blob(&plan, &h.read(&plan)));
    assert_eq!(h.index.usage(ALICE), 64, "charged once throughout");
}

#[test]
fn chunks_go_when_every_member_has_fetched_them_and_not_before() {
    let mut h = Harness::new(ChunkLimits::default());
    h.open(1, ALICE, &listed(&[1, 2], 100)).unwrap();
    h.open(2, ALICE, &listed(&[2, 3], 100)).unwrap();
    for n in [1, 2, 3] {
        let upload = if n == 3 { 2 } else { 1 };
        h.store_chunk(upload, n, blob(100, n)).unwrap();
    }
    h.run(|index, writes| index.fetched_all(CONV, UploadId([1; 16]), DeviceId(10), writes));
    assert!(
        h.index.upload(CONV, UploadId([1; 16])).is_some(),
        "device 11 is still pending"
    );
    h.run(|index, writes| index.fetched_all(CONV, UploadId([1; 16]), DeviceId(11), writes));
    assert!(h.index.upload(CONV, UploadId([1; 16])).is_none());
    assert!(
        h.index.chunk(CONV, ALICE, id(1)).is_none(),
        "only upload 1 listed it"
    );
    assert_eq!(
        h.index.chunk(CONV, ALICE, id(2)).unwrap().refs,
        1,
        "upload 2 still lists it"
    );
    assert_eq!(h.index.usage(ALICE), 200);
    // A member that leaves is no longer waited for.
    h.run(|index, writes| index.member_removed(CONV, DeviceId(10), writes));
    h.run(|index, writes| index.member_removed(CONV, DeviceId(11), writes));
    assert_eq!(h.index.chunk_count(), 0);
    assert_eq!(h.index.usage(ALICE), 0, "uncharged at once");
    assert_eq!(h.index.dropping(), 3, "their blobs go in steps");
    assert_eq!(h.store.table_len(BLOBS_TABLE), 3);
    assert_eq!(
        h.run(|index, writes| index.drop_step(writes)),
        3,
        "300 bytes fit one step"
    );
    assert_eq!(h.store.table_len(BLOBS_TABLE), 0, "no orphan blobs");
    assert_eq!(h.store.table_len(CHUNKS_TABLE), 0);
    assert_eq!(h.store.table_len(UPLOADS_TABLE), 0);
}

#[test]
fn dropping_goes_in_bounded_steps_survives_a_restart_and_a_chunk_listed_again_is_taken_back() {
    let mut h = Harness::new(ChunkLimits::default());
    // Ten chunks of 1.5 MiB: a step deletes at most CHUNK_DROP_STEP_BYTES of them.
    let len = 3 << 19;
    let ns: Vec<u8> = (1..=10).collect();
    h.open(1, ALICE, &listed(&ns, len)).unwrap();
    for &n in &ns {
        h.store_chunk(1, n, blob(len, n)).unwrap();
    }
    for device in [10, 11] {
        h.run(|index, writes| index.fetched_all(CONV, UploadId([1; 16]), DeviceId(device), writes));
    }
    assert_eq!(h.index.usage(ALICE), 0);
    assert_eq!(h.index.dropping(), 10);
    let per_step = (CHUNK_DROP_STEP_BYTES / u64::from(len)) as usize;
    assert_eq!(per_step, 2);
    assert_eq!(h.run(|index, writes| index.drop_step(writes)), per_step);
    assert_eq!(h.store.table_len(BLOBS_TABLE), 8);

    // A restart resumes the dropping where it was.
    let mut h = h.recovered_harness();
    assert_eq!(h.index.dropping(), 8);
    assert_eq!(h.index.usage(ALICE), 0);

    // The same file sent again: what is still there is taken back, charged again, and not
    // awaited; only what went must be uploaded.
    let missing = h.open(2, ALICE, &listed(&ns, len)).unwrap();
    assert_eq!(
        missing,
        vec![id(1), id(2)],
        "the first step deleted these two"
    );
    assert_eq!(h.index.dropping(), 0);
    assert_eq!(h.index.usage(ALICE), 10 * u64::from(len));
    let plan = h.index.admit_fetch(CONV, ALICE, id(7)).unwrap();
    assert!(
        verify_blob(&plan, &h.read(&plan)),
        "taken back bytes and all"
    );
    h.index.consistency().unwrap();
    same(&h.index, &h.recovered());
}

#[test]
fn a_chunk_listed_again_with_another_length_while_dropping_is_refused() {
    let mut h = Harness::new(ChunkLimits::default());
    h.open(1, ALICE, &listed(&[1], 100)).unwrap();
    h.store_chunk(1, 1, blob(100, 1)).unwrap();
    for device in [10, 11] {
        h.run(|index, writes| index.fetched_all(CONV, UploadId([1; 16]), DeviceId(device), writes));
    }
    assert_eq!(h.index.dropping(), 1);
    assert!(matches!(
        h.open(2, ALICE, &listed(&[1], 99)),
        Err(ChunkRefusal::BadList(_))
    ));
    assert_eq!(h.index.dropping(), 1, "left to its step");
}

#[test]
fn retention_ends_uploads_when_due_and_only_then() {
    let limits = ChunkLimits {
        retention: Duration::from_secs(60),
        ..ChunkLimits::default()
    };
    let mut h = Harness::new(limits);
    h.open(1, ALICE, &listed(&[1], 100)).unwrap();
    assert_eq!(h.index.next_expiry(), Some(T0 + Duration::from_secs(60)));
    assert_eq!(
        h.run(|index, writes| index.handle_timeout(T0 + Duration::from_secs(59), writes)),
        0
    );
    assert_eq!(
        h.run(|index, writes| index.handle_timeout(T0 + Duration::from_secs(60), writes)),
        1
    );
    assert_eq!(h.index.chunk_count(), 0);
    assert_eq!(h.index.next_expiry(), None);
}

#[test]
fn too_many_open_uploads_are_refused() {
    let limits = ChunkLimits {
        uploads_per_user_max: 2,
        ..ChunkLimits::default()
    };
    let mut h = Harness::new(limits);
    h.open(1, ALICE, &listed(&[1], 10)).unwrap();
    h.open(2, ALICE, &listed(&[2], 10)).unwrap();
    assert_eq!(
        h.open(3, ALICE, &listed(&[3], 10)),
        Err(ChunkRefusal::TooManyUploads { max: 2 })
    );
    assert!(h.open(3, BOB, &listed(&[3], 10)).is_ok());
}

#[test]
fn a_corrupt_record_stops_recovery_with_the_table_named() {
    let mut store = MemStore::default();
    let mut writes = WriteBatch::default();
    writes.put(
        CHUNKS_TABLE,
        chunk_key(&(CONV, ALICE, id(1))).to_vec(),
        vec![1, 2, 3],
    );
    store.commit(writes).unwrap();
    let err = ChunkIndex::recover(ChunkLimits::default(), &store).unwrap_err();
    assert!(err.to_string().contains("file_chunks"), "{err}");
}

#[derive(Clone, Debug)]
enum Op {
    Open {
        upload: u8,
        owner: bool,
        chunks: Vec<u8>,
    },
    Store {
        upload: u8,
        owner: bool,
        chunk: u8,
        short: bool,
    },
    Damage {
        owner: bool,
        chunk: u8,
    },
    Fetched {
        upload: u8,
        device: u8,
    },
    Removed {
        device: u8,
    },
    Tick {
        seconds: u16,
    },
    DropStep,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            0u8..6,
            any::<bool>(),
            proptest::collection::vec(0u8..12, 1..5)
        )
            .prop_map(|(upload, owner, chunks)| Op::Open {
                upload,
                owner,
                chunks
            }),
        (
            0u8..6,
            any::<bool>(),
            0u8..12,
            proptest::bool::weighted(0.1)
        )
            .prop_map(|(upload, owner, chunk, short)| Op::Store {
                upload,
                owner,
                chunk,
                short,
            }),
        (any::<bool>(), 0u8..12).prop_map(|(owner, chunk)| Op::Damage { owner, chunk }),
        (0u8..6, 0u8..3).prop_map(|(upload, device)| Op::Fetched { upload, device }),
        (0u8..3).prop_map(|device| Op::Removed { device }),
        (0u16..400).prop_map(|seconds| Op::Tick { seconds }),
        Just(Op::DropStep),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever happens, references and usage add up, no blob outlives its record, a stored
    /// chunk always verifies, and a restart recovers exactly the live index.
    #[test]
    fn references_usage_and_recovery_hold_under_any_sequence(ops in proptest::collection::vec(op(), 1..60)) {
        let limits = ChunkLimits {
            quota_bytes_per_user: 5_000,
            retention: Duration::from_secs(600),
            uploads_per_user_max: 4,
        };
        let mut h = Harness::new(limits);
        let mut now = T0;
        for op in ops {
            match op {
                Op::Open { upload, owner, mut chunks } => {
                    chunks.sort_unstable();
                    chunks.dedup();
                    let owner = if owner { ALICE } else { BOB };
                    let list: Vec<_> = chunks.iter().map(|&n| ListedChunk { id: id(n), sealed_len: 100 + u32::from(n) }).collect();
                    let request = UploadRequest {
                        conversation: CONV,
                        upload: UploadId([upload; 16]),
                        owner,
                        chunks: &list,
                        members: members(&[0, 1, 2]),
                    };
                    let _ = h.run(|index, writes| index.open_upload(now, request, writes));
                }
                Op::Store { upload, owner, chunk, short } => {
                    let len = 100 + u32::from(chunk) - u32::from(short);
                    let owner = if owner { ALICE } else { BOB };
                    let _ = h.store_as(owner, upload, chunk, blob(len, chunk));
                }
                Op::Damage { owner, chunk } => {
                    let owner = if owner { ALICE } else { BOB };
                    h.run(|index, writes| index.damaged(CONV, owner, id(chunk), writes))
                }
                Op::Fetched { upload, device } => h.run(|index, writes| index.fetched_all(CONV, UploadId([upload; 16]), DeviceId(u128::from(device)), writes)),
                Op::Removed { device } => h.run(|index, writes| index.member_removed(CONV, DeviceId(u128::from(device)), writes)),
                Op::Tick { seconds } => {
                    now = now + Duration::from_secs(u64::from(seconds));
                    h.run(|index, writes| index.handle_timeout(now, writes));
                }
                Op::DropStep => {
                    h.run(|index, writes| index.drop_step(writes));
                }
            }
            h.index.consistency().map_err(TestCaseError::fail)?;
            prop_assert!(h.index.usage(ALICE) <= 5_000 && h.index.usage(BOB) <= 5_000);
            prop_assert_eq!(
                h.store.table_len(BLOBS_TABLE),
                h.index.chunks.values().filter(|r| r.digest.is_some()).count() + h.index.dropping()
            );
            for n in 0..12 {
                for owner in [ALICE, BOB] {
                    if let Ok(plan) = h.index.admit_fetch(CONV, owner, id(n)) {
                        prop_assert!(verify_blob(&plan, &h.read(&plan)));
                    }
                }
            }
        }
        same(&h.index, &h.recovered());
        // Once the steps are through, no blob outlives its chunk.
        while h.index.dropping() > 0 {
            h.run(|index, writes| index.drop_step(writes));
        }
        prop_assert_eq!(
            h.store.table_len(BLOBS_TABLE),
            h.index.chunks.values().filter(|r| r.digest.is_some()).count()
        );
        same(&h.index, &h.recovered());
    }
}
