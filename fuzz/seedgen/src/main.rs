//! Writes seed inputs for the wire fuzz targets and copies the example scenarios:
//!
//! ```text
//! cargo run --manifest-path fuzz/seedgen/Cargo.toml --target-dir fuzz/target -- corpus scenarios [TARGET...]
//! ```
//!
//! With target names after the two directories, only those corpora are written (e.g.
//! `certificate_decode crl_decode`), so regenerating one target's seeds does not bring back the
//! seeds that `cmin` dropped from the others.
//!
//! - `corpus/frame_decode/`: one valid frame per defined payload (plus signed and routed variants)
//!   and malformed frames (bad magic, version, flags, reserved word, unknown and reserved opcodes,
//!   truncated header and payload, oversized length, trailing bytes, bad CBOR);
//! - `corpus/payload_decode/`: two bytes (index into `Opcode::ALL`) + each payload's CBOR;
//! - `corpus/stream_decode/`: one chunk-size byte + several frames back to back;
//! - `corpus/scenario_parse/`: the `.sund` files of the scenarios directory;
//! - `corpus/certificate_decode/`: device certificates signed by a `DeviceKey::from_seed` root
//!   (short and 253-byte domains, edge serials, users and validity periods) and malformed ones
//!   (truncated, wrong magic or format, bad domains, empty validity, trailing bytes);
//! - `corpus/crl_decode/`: signed CRLs with 0, 1, 3 and 100 entries and malformed ones
//!   (truncated, wrong magic or format, unsorted or repeated entries, counts beyond the limit or
//!   not matching the length).
//!
//! - `corpus/manifest_decode/`: file manifests (empty, one and three chunks, the longest and a
//!   non-ASCII name) and malformed ones (truncated, wrong magic or format, unsafe names, a
//!   lying size, a count beyond the limit, trailing bytes).
//!
//! Seeds are named `seed-*`; `cargo fuzz cmin` later renames what it keeps to content hashes.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use sund_model::identity::DeviceKey;
use sund_model::ids::{ConversationId, DeviceId, UserId};
use sund_model::trust::{Crl, DeviceCertificate, CRL_ENTRIES_MAX, DOMAIN_BYTES_MAX};
use sund_model::wire::payload::{
    Ack, Challenge, Cursor, Deliver, ErrorCode, ErrorReport, FetchedKeyPackage, Goodbye, Heartbeat,
    Hello, HelloOk, KeyPackageCount, KeyPackageFetch, KeyPackageUpload, KeyPackages, Leave, Proof,
    Removed, ReplayRequest, RosterEntry, Send, SendAck, Welcome, FETCH_USERS_MAX,
};
use sund_model::wire::payload::{
    Certificate, ChunkAck, ChunkHead, ChunkRequest, ChunksUnavailable, Crl as CrlPayload, CrlFetch,
    DeviceLinked, FileFetched, ListedChunkWire, PairVouch, PairVouched, Register,
    FederationAck, FederationForward, FederationHello, PeerRootsUpdate, RenewCertificate, TrustRoot, TrustRootFetch,
    UploadOpen, UploadStatus,
};
use sund_model::wire::payload::{
    ContactAction, ContactChange, Contacts, ContactsFetch, PresenceEntry, PresenceNotify,
    PresenceSubscribe, PresenceUpdate, Seen,
};
use sund_model::wire::{
    Frame, Opcode, Payload, Routing, WireError, HEADER_BYTES, PAYLOAD_BYTES_MAX,
};

fn payloads() -> Vec<(&'static str, Payload)> {
    let conv = ConversationId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
    vec![
        (
            "hello-empty",
            Payload::Hello(Hello {
                cursors: vec![],
                device_key: [7; 32],
                resume_token: None,
                user: None,
                certificate: None,
                generation: None,
            }),
        ),
        (
            "hello-cursors-resume",
            Payload::Hello(Hello {
                cursors: vec![
                    Cursor::new(conv, 7),
                    Cursor::new(ConversationId(2), u64::MAX),
                ],
                device_key: [0xee; 32],
                resume_token: Some([0x11; 32]),
                user: None,
                certificate: None,
                generation: None,
            }),
        ),
        (
            "hello-user",
            Payload::Hello(Hello {
                cursors: vec![Cursor::new(conv, 1)],
                device_key: [0x5c; 32],
                resume_token: None,
                user: Some(UserId::of("alice", "localhost").to_bytes()),
                certificate: None,
                generation: Some(3),
            }),
        ),
        (
            "challenge",
            Payload::Challenge(Challenge { nonce: [0x33; 32] }),
        ),
        (
            "proof",
            Payload::Proof(Proof {
                signature: [0x44; 64],
            }),
        ),
        (
            "hello-ok",
            Payload::HelloOk(HelloOk {
                heartbeat_interval_ms: 5_000,
                resume_token: [0x22; 32],
                resume_token_ttl_s: 3_600,
                external_sender: None,
                peer_roots: None,
                peer_crls: None,
            }),
        ),
        (
            "heartbeat",
            Payload::Heartbeat(Heartbeat {
                nonce: 0xdead_beef,
                crl_version: None,
                presence: None,
                peer_roots: None,
                peer_crls: None,
                contacts: None,
            }),
        ),
        (
            "heartbeat-ack",
            Payload::HeartbeatAck(Heartbeat {
                nonce: 0,
                crl_version: None,
                presence: Some(3),
                peer_roots: None,
                peer_crls: None,
                contacts: None,
            }),
        ),
        (
            "goodbye",
            Payload::Goodbye(Goodbye {
                code: ErrorCode::HeartbeatTimeout as u16,
                message: "no heartbeat in time".into(),
                retry_after_ms: None,
            }),
        ),
        (
            "error-msg-id",
            Payload::Error(ErrorReport {
                code: ErrorCode::NotMember as u16,
                message: "not a member of this conversation".into(),
                msg_id: Some([0x42; 16]),
                after: None,
                retry_after_ms: None,
                held: None,
            }),
        ),
        (
            "error-no-msg-id",
            Payload::Error(ErrorReport {
                code: ErrorCode::UnexpectedOpcode as u16,
                message: String::new(),
                msg_id: None,
                after: None,
                retry_after_ms: None,
                held: None,
            }),
        ),
        (
            "send",
            Payload::Send(Send {
                msg_id: [1; 16],
                body: b"hello, sund".to_vec(),
                welcome: None,
                after: Some([0; 16]),
            }),
        ),
        (
            "send-empty-body",
            Payload::Send(Send {
                msg_id: [0; 16],
                body: vec![],
                welcome: None,
                after: Some([0; 16]),
            }),
        ),
        ("send-ack", Payload::SendAck(SendAck { msg_id: [9; 16] })),
        (
            "deliver",
            Payload::Deliver(Deliver {
                msg_id: [3; 16],
                body: vec![0xab; 200],
            }),
        ),
        ("ack", Payload::Ack(Ack {})),
        (
            "replay-request",
            Payload::ReplayRequest(ReplayRequest { from_seq: 42 }),
        ),
        (
            "key-package-upload",
            Payload::KeyPackageUpload(KeyPackageUpload {
                packages: vec![vec![0x00, 0x01, 0x00, 0x01].into(), vec![0x6b; 300].into()],
                last_resort: Some(vec![0x4c; 64].into()),
            }),
        ),
        (
            "key-package-upload-empty",
            Payload::KeyPackageUpload(KeyPackageUpload::default()),
        ),
        (
            "key-package-fetch",
            Payload::KeyPackageFetch(KeyPackageFetch {
                users: vec![
                    UserId::of("alice", "localhost").to_bytes().into(),
                    UserId::of("bob", "localhost").to_bytes().into(),
                ],
                domain: None,
            }),
        ),
        (
            "key-package-fetch-foreign",
            Payload::KeyPackageFetch(KeyPackageFetch {
                users: vec![UserId::of("bob", "b.example").to_bytes().into()],
                domain: Some("b.example".into()),
            }),
        ),
        (
            "key-packages",
            Payload::KeyPackages(KeyPackages {
                found: vec![
                    FetchedKeyPackage {
                        user: UserId::of("bob", "localhost").to_bytes().into(),
                        device: DeviceId(0x0b0b).to_bytes().into(),
                        package: vec![0x6b; 120].into(),
                        last_resort: false,
                    },
                    FetchedKeyPackage {
                        user: UserId::of("bob", "localhost").to_bytes().into(),
                        device: DeviceId(0x0b0c).to_bytes().into(),
                        package: vec![0x4c; 80].into(),
                        last_resort: true,
                    },
                ],
                exhausted: vec![DeviceId(0x0b0d).to_bytes().into()],
            }),
        ),
        (
            "key-package-count",
            Payload::KeyPackageCount(KeyPackageCount {
                remaining: 3,
                last_resort: true,
                replenish_below: 10,
            }),
        ),
        (
            "send-commit-with-welcome",
            Payload::Send(Send {
                msg_id: [2; 16],
                body: vec![0x00, 0x01, 0x00, 0x03, 0x00],
                welcome: Some(vec![0x00, 0x01, 0x00, 0x03].into()),
                after: None,
            }),
        ),
        (
            "welcome",
            Payload::Welcome(Welcome {
                seq: 1,
                kind: 2,
                welcome: vec![0x00, 0x01, 0x00, 0x03].into(),
                members: vec![RosterEntry {
                    device: [0xd1; 16].into(),
                    user: [0xb0; 16].into(),
                }],
            }),
        ),
        ("removed", Payload::Removed(Removed { seq: 9 })),
        (
            "pair-vouch",
            Payload::PairVouch(PairVouch {
                secret: [0x5c; 16],
                expires: 1_800_000_000,
                signature: [0x56; 64],
            }),
        ),
        (
            "pair-vouched",
            Payload::PairVouched(PairVouched { secret: [0x5c; 16] }),
        ),
        (
            "device-linked",
            Payload::DeviceLinked(DeviceLinked {
                certificate: vec![0xce; 160].into(),
            }),
        ),
        (
            "renew-certificate",
            Payload::RenewCertificate(RenewCertificate {}),
        ),
        ("leave", Payload::Leave(Leave {})),
        (
            "upload-open",
            Payload::UploadOpen(UploadOpen {
                upload: [0x55; 16],
                chunks: vec![
                    ListedChunkWire {
                        id: [0x01; 32],
                        len: 1 << 20,
                    },
                    ListedChunkWire {
                        id: [0x02; 32],
                        len: 262_160,
                    },
                ],
            }),
        ),
        (
            "upload-status",
            Payload::UploadStatus(UploadStatus {
                upload: [0x55; 16],
                missing: vec![[0x02; 32].into()],
            }),
        ),
        (
            "chunk-head",
            Payload::Chunk(ChunkHead {
                upload: [0x55; 16],
                id: [0x01; 32],
                len: 1 << 20,
            }),
        ),
        (
            "chunk-ack",
            Payload::ChunkAck(ChunkAck {
                upload: [0x55; 16],
                id: [0x01; 32],
            }),
        ),
        (
            "chunk-request",
            Payload::ChunkRequest(ChunkRequest {
                upload: [0x55; 16],
                ids: vec![[0x01; 32].into(), [0x02; 32].into()],
            }),
        ),
        (
            "chunks-unavailable",
            Payload::ChunksUnavailable(ChunksUnavailable {
                upload: [0x55; 16],
                ids: vec![[0x02; 32].into()],
            }),
        ),
        (
            "file-fetched",
            Payload::FileFetched(FileFetched { upload: [0x55; 16] }),
        ),
        (
            "contact-change",
            Payload::ContactChange(ContactChange {
                user: [0x0b; 16].into(),
                action: ContactAction::Block as u8,
                domain: Some("b.example".into()),
            }),
        ),
        (
            "contacts-fetch",
            Payload::ContactsFetch(ContactsFetch {}),
        ),
        (
            "contacts",
            Payload::Contacts(Contacts {
                contacts: vec![[0x0b; 16].into()],
                incoming: vec![[0x0c; 16].into()],
                outgoing: vec![[0x0d; 16].into()],
                blocked: vec![[0x0e; 16].into()],
                invisible: true,
            }),
        ),
        (
            "presence-update",
            Payload::PresenceUpdate(PresenceUpdate { invisible: true }),
        ),
        (
            "presence-subscribe",
            Payload::PresenceSubscribe(PresenceSubscribe {
                users: vec![[0x0b; 16].into(), [0x0c; 16].into()],
            }),
        ),
        (
            "presence-notify",
            Payload::PresenceNotify(PresenceNotify {
                entries: vec![PresenceEntry {
                    user: [0x0b; 16].into(),
                    seen: Seen::WithinWeek as u8,
                }],
                number: 2,
            }),
        ),
        (
            "register",
            Payload::Register(Register {
                device_key: [0x4b; 32],
                user: [0x75; 16],
                token: [0x70; 16],
                proof: [0x51; 64],
            }),
        ),
        (
            "certificate",
            Payload::Certificate(Certificate {
                certificate: vec![0xce; 160].into(),
                root_key: [0x52; 32],
                voucher: None,
            }),
        ),
        (
            "crl-fetch",
            Payload::CrlFetch(CrlFetch { have_version: 3, peers: None }),
        ),
        (
            "crl",
            Payload::Crl(CrlPayload {
                crl: vec![0xc1; 120].into(),
            }),
        ),
        (
            "trust-root-fetch",
            Payload::TrustRootFetch(TrustRootFetch {}),
        ),
        (
            "trust-root",
            Payload::TrustRoot(TrustRoot {
                key: [0x52; 32],
                domain: "example.org".into(),
            }),
        ),
        (
            "peer-roots",
            Payload::PeerRoots(PeerRootsUpdate {
                roots: b"SPR\x01\x09a.example\x00".to_vec().into(),
            }),
        ),
        (
            "federation-hello",
            Payload::FederationHello(FederationHello {
                message: b"SFH\x01\x01 a handshake message".to_vec().into(),
            }),
        ),
        (
            "federation-forward",
            Payload::FederationForward(FederationForward {
                body: vec![0xE1, 4, 0xC0].into(),
            }),
        ),
        (
            "federation-ack",
            Payload::FederationAck(FederationAck {
                gap: Some(7),
                crl: Some(3),
            }),
        ),
    ]
}

fn routing() -> Routing {
    Routing {
        conversation: ConversationId(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
        sender: DeviceId(0x0a0b),
        seq: 17,
        epoch: 3,
    }
}

fn encoded(payload: &Payload) -> Vec<u8> {
    let mut out = Vec::new();
    payload.encode(&mut out);
    out
}

fn opcode_index(opcode: Opcode) -> u16 {
    Opcode::ALL
        .iter()
        .position(|o| *o == opcode)
        .expect("opcode in ALL") as u16
}

/// A header-only frame with the given raw opcode and payload length (no validation).
fn raw_header(opcode: u16, payload_len: u32) -> Vec<u8> {
    let mut h = Frame::new(Routing::default(), Payload::Ack(Ack {}))
        .encode()
        .to_vec();
    h.truncate(HEADER_BYTES);
    h[6..8].copy_from_slice(&opcode.to_be_bytes());
    h[8..12].copy_from_slice(&payload_len.to_be_bytes());
    h
}

/// Writes `seed-{name}` into `dir`; `None` is a corpus not selected on the command line.
fn write(dir: &Option<PathBuf>, name: &str, bytes: &[u8]) {
    if let Some(dir) = dir {
        fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
    }
}

/// File manifests: an empty file, one chunk, a few chunks, the longest name, and malformed
/// ones (truncated, wrong magic or format, unsafe names, lying sizes, counts that do not match).
fn manifest_seeds(dir: &Option<PathBuf>) {
    use sund_model::files::{seal_file, FileName, FileSecret};
    let secret = FileSecret::from_bytes([9; 32]);
    let sealed = |name: &str, data: &[u8]| {
        let (manifest, _) = seal_file(FileName::new(name).expect("seed name"), secret.clone(), data)
            .expect("seed file");
        manifest.encode()
    };
    let pattern = |len: usize| (0..len).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>();
    let one = sealed("notes.txt", b"hello");
    write(dir, "manifest-empty", &sealed("empty", &[]));
    write(dir, "manifest-one-chunk", &one);
    write(dir, "manifest-three-chunks", &sealed("video.mp4", &pattern(9 << 20)));
    write(dir, "manifest-longest-name", &sealed(&"n".repeat(255), b"x"));
    write(dir, "manifest-unicode-name", &sealed("f\u{e9}vrier \u{1f4c4}.pdf", b"pdf"));
    write(dir, "manifest-truncated", &one[..one.len() - 3]);
    let mut wrong = one.clone();
    wrong[0] = b'X';
    write(dir, "manifest-wrong-magic", &wrong);
    let mut wrong = one.clone();
    wrong[3] = 2;
    write(dir, "manifest-wrong-format", &wrong);
    let name_at = 3 + 1 + 8 + 32 + 1;
    for (label, byte) in [("slash", b'/'), ("backslash", b'\\'), ("nul", 0u8), ("dot", b'.')] {
        let mut unsafe_name = sealed("ab", b"y");
        unsafe_name[name_at] = byte;
        if label == "dot" {
            unsafe_name[name_at + 1] = b'.';
        }
        write(dir, &format!("manifest-name-{label}"), &unsafe_name);
    }
    let mut lying = one.clone();
    lying[4 + 7] ^= 1;
    write(dir, "manifest-lying-size", &lying);
    let mut count = one.clone();
    let at = count.len() - 36 - 4;
    count[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    write(dir, "manifest-count-too-large", &count);
    let mut extra = one.clone();
    extra.push(0);
    write(dir, "manifest-trailing-byte", &extra);
}

/// The root key every seed certificate and CRL is signed with.
fn root_key() -> DeviceKey {
    DeviceKey::from_seed([7; 32])
}

/// A 253-byte (`DOMAIN_BYTES_MAX`) domain: four labels of lower-case letters.
fn longest_domain() -> String {
    let domain = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    assert_eq!(domain.len(), DOMAIN_BYTES_MAX);
    domain
}

/// 1 Jan 2026, seconds since the Unix epoch (production clocks start at the epoch).
const JAN_2026_S: u64 = 1_767_225_600;

fn certificate_seeds(dir: &Option<PathBuf>) {
    let root = root_key();
    let long = longest_domain();
    let year = 365 * 24 * 3600;
    let device = |n: u8| DeviceKey::from_seed([n; 32]).public();
    let valid: Vec<(&str, DeviceCertificate)> = vec![
        (
            "example-org",
            DeviceCertificate::issue(&root, "example.org", 42, device(1), UserId(9), 1_000, 2_000),
        ),
        (
            "one-letter-domain-serial-0-user-0",
            DeviceCertificate::issue(&root, "a", 0, device(2), UserId(0), 0, 1),
        ),
        (
            "longest-domain",
            DeviceCertificate::issue(
                &root,
                &long,
                7,
                device(3),
                UserId::of("alice", "localhost"),
                JAN_2026_S - 3_600,
                JAN_2026_S - 3_600 + year,
            ),
        ),
        (
            "backdated-year-named-user",
            DeviceCertificate::issue(
                &root,
                "sund-1.local",
                1,
                device(4),
                UserId::of("bob", "localhost"),
                JAN_2026_S - 3_600,
                JAN_2026_S - 3_600 + year,
            ),
        ),
        (
            "max-serial-max-user-whole-clock",
            DeviceCertificate::issue(
                &root,
                "example.org",
                u64::MAX,
                device(5),
                UserId(u128::MAX),
                0,
                u64::MAX,
            ),
        ),
        (
            "last-second-of-the-clock",
            DeviceCertificate::issue(
                &root,
                "0-9.example",
                1 << 32,
                device(6),
                UserId(1 << 64),
                u64::MAX - 1,
                u64::MAX,
            ),
        ),
        (
            "signed-by-another-root",
            DeviceCertificate::issue(
                &DeviceKey::from_seed([8; 32]),
                "example.org",
                43,
                device(1),
                UserId(9),
                1_000,
                2_000,
            ),
        ),
    ];
    for (name, cert) in &valid {
        let bytes = cert.encode();
        assert_eq!(DeviceCertificate::decode(&bytes).as_ref(), Ok(cert));
        write(dir, name, &bytes);
    }

    // Byte offsets of the encoding: "SDC" | format | serial | key | user | not before |
    // not after | domain length | domain | signature.
    const FORMAT_AT: usize = 3;
    const NOT_BEFORE_AT: usize = 4 + 8 + 32 + 16;
    const NOT_AFTER_AT: usize = NOT_BEFORE_AT + 8;
    const DOMAIN_LEN_AT: usize = NOT_AFTER_AT + 8;
    let base = valid[0].1.encode();
    let bad = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = base.clone();
        f(&mut b);
        assert!(DeviceCertificate::decode(&b).is_err(), "{name} decodes");
        write(dir, name, &b);
    };
    bad("empty", &|b| b.clear());
    bad("magic-only", &|b| b.truncate(3));
    bad("truncated-in-serial", &|b| b.truncate(FORMAT_AT + 5));
    bad("truncated-in-domain", &|b| b.truncate(DOMAIN_LEN_AT + 4));
    bad("truncated-signature", &|b| {
        b.pop();
    });
    bad("trailing-byte", &|b| b.push(0));
    bad("wrong-magic", &|b| b[0] = b'X');
    bad("crl-magic", &|b| b[..3].copy_from_slice(b"SDR"));
    bad("format-0", &|b| b[FORMAT_AT] = 0);
    bad("format-2", &|b| b[FORMAT_AT] = 2);
    bad("empty-domain", &|b| {
        let end = DOMAIN_LEN_AT + 1 + usize::from(b[DOMAIN_LEN_AT]);
        b.drain(DOMAIN_LEN_AT + 1..end);
        b[DOMAIN_LEN_AT] = 0;
    });
    bad("upper-case-domain", &|b| b[DOMAIN_LEN_AT + 1] = b'E');
    bad("non-utf8-domain", &|b| b[DOMAIN_LEN_AT + 1] = 0xff);
    bad("domain-length-past-end", &|b| b[DOMAIN_LEN_AT] = 0xff);
    bad("empty-validity", &|b| {
        let not_before: [u8; 8] = b[NOT_BEFORE_AT..NOT_AFTER_AT].try_into().unwrap();
        b[NOT_AFTER_AT..DOMAIN_LEN_AT].copy_from_slice(&not_before);
    });
    bad("validity-backwards", &|b| {
        b[NOT_BEFORE_AT..NOT_AFTER_AT].copy_from_slice(&u64::MAX.to_be_bytes());
    });
    // A 254-byte domain of valid characters: one byte over `DOMAIN_BYTES_MAX`.
    let mut too_long = valid[2].1.encode();
    too_long.insert(DOMAIN_LEN_AT + 1, b'a');
    too_long[DOMAIN_LEN_AT] = (DOMAIN_BYTES_MAX + 1) as u8;
    assert!(DeviceCertificate::decode(&too_long).is_err());
    write(dir, "domain-254-bytes", &too_long);
    // Signed, but with an empty validity period (`issue` does not check it; `decode` does).
    let empty = DeviceCertificate::issue(&root, "example.org", 44, device(1), UserId(9), 5, 5);
    assert!(DeviceCertificate::decode(&empty.encode()).is_err());
    write(dir, "signed-empty-validity", &empty.encode());
}

fn peer_roots_seeds(dir: &Option<PathBuf>) {
    use std::collections::BTreeMap;
    use sund_model::trust::peer_roots::{PeerRoots, PEER_ROOTS_MAX};
    let root = root_key();
    let key = |n: u8| DeviceKey::from_seed([n; 32]).public();
    let valid: Vec<(&str, PeerRoots)> = vec![
        ("none", PeerRoots::issue(&root, "a.example", BTreeMap::new())),
        (
            "two",
            PeerRoots::issue(
                &root,
                "a.example",
                BTreeMap::from([("b.example".into(), key(2)), ("c.example".into(), key(3))]),
            ),
        ),
        (
            "most",
            PeerRoots::issue(
                &root,
                &longest_domain(),
                (0..PEER_ROOTS_MAX)
                    .map(|i| (format!("peer-{i:02}.example"), key(i as u8)))
                    .collect(),
            ),
        ),
    ];
    for (name, set) in &valid {
        let bytes = set.encode();
        assert_eq!(PeerRoots::decode(&bytes).as_ref(), Ok(set));
        write(dir, name, &bytes);
    }
    // "SPR" 1 | issuer length | issuer | count | entries | signature.
    let two = valid[1].1.encode();
    let count_at = 4 + 1 + "a.example".len();
    let entry = 1 + "b.example".len() + 32;
    let bad = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = two.clone();
        f(&mut b);
        assert!(PeerRoots::decode(&b).is_err(), "{name} decodes");
        write(dir, name, &b);
    };
    bad("empty", &|b| b.clear());
    bad("truncated-signature", &|b| {
        b.pop();
    });
    bad("trailing-byte", &|b| b.push(0));
    bad("wrong-magic", &|b| b[0] = b'X');
    bad("count-one-more", &|b| b[count_at] = 3);
    bad("count-over-limit", &|b| b[count_at] = PEER_ROOTS_MAX as u8 + 1);
    bad("entries-swapped", &|b| {
        let first = count_at + 1;
        b[first..first + 2 * entry].rotate_left(entry)
    });
    bad("issuer-as-peer", &|b| {
        b[count_at + 2..count_at + 2 + 9].copy_from_slice(b"a.example")
    });
    bad("upper-case-domain", &|b| b[count_at + 2] = b'B');
}

fn crl_seeds(dir: &Option<PathBuf>) {
    let root = root_key();
    let ids = |ids: &[u128]| ids.iter().map(|&d| DeviceId(d)).collect::<BTreeSet<_>>();
    let hundred: BTreeSet<DeviceId> = (1..=100u8)
        .map(|n| DeviceKey::from_seed([n; 32]).device_id())
        .collect();
    assert_eq!(hundred.len(), 100);
    let valid: Vec<(&str, Crl)> = vec![
        (
            "empty-version-0",
            Crl::issue(&root, "example.org", 0, JAN_2026_S, BTreeSet::new()),
        ),
        (
            "one-entry",
            Crl::issue(&root, "example.org", 1, JAN_2026_S + 60, ids(&[5])),
        ),
        (
            "three-entries",
            Crl::issue(&root, "example.org", 3, 100, ids(&[5, 1, 9])),
        ),
        (
            "three-edge-ids-longest-domain",
            Crl::issue(
                &root,
                &longest_domain(),
                u64::MAX,
                u64::MAX,
                ids(&[0, 1 << 64, u128::MAX]),
            ),
        ),
        (
            "hundred-entries",
            Crl::issue(&root, "sund-1.local", 100, JAN_2026_S + 3_600, hundred),
        ),
        (
            "one-letter-domain",
            Crl::issue(&root, "a", 2, 0, ids(&[7, 8])),
        ),
        (
            "signed-by-another-root",
            Crl::issue(
                &DeviceKey::from_seed([8; 32]),
                "example.org",
                9,
                100,
                ids(&[1]),
            ),
        ),
    ];
    for (name, crl) in &valid {
        let bytes = crl.encode();
        assert_eq!(Crl::decode(&bytes).as_ref(), Ok(crl));
        write(dir, name, &bytes);
    }

    // "SDR" | format | version | issued at | domain length | domain | count | ids | signature.
    const FORMAT_AT: usize = 3;
    const DOMAIN_LEN_AT: usize = 4 + 8 + 8;
    let three = valid[2].1.encode();
    let count_at = DOMAIN_LEN_AT + 1 + usize::from(three[DOMAIN_LEN_AT]);
    let first_entry = count_at + 4;
    let bad = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = three.clone();
        f(&mut b);
        assert!(Crl::decode(&b).is_err(), "{name} decodes");
        write(dir, name, &b);
    };
    bad("empty", &|b| b.clear());
    bad("magic-only", &|b| b.truncate(3));
    bad("truncated-in-count", &|b| b.truncate(count_at + 2));
    bad("truncated-in-entries", &|b| b.truncate(first_entry + 20));
    bad("truncated-signature", &|b| {
        b.pop();
    });
    bad("trailing-byte", &|b| b.push(0));
    bad("wrong-magic", &|b| b[0] = b'X');
    bad("certificate-magic", &|b| b[..3].copy_from_slice(b"SDC"));
    bad("format-0", &|b| b[FORMAT_AT] = 0);
    bad("format-2", &|b| b[FORMAT_AT] = 2);
    bad("unsorted-entries", &|b| {
        b[first_entry..first_entry + 32].rotate_left(16)
    });
    bad("repeated-entry", &|b| {
        let first: [u8; 16] = b[first_entry..first_entry + 16].try_into().unwrap();
        b[first_entry + 16..first_entry + 32].copy_from_slice(&first);
    });
    bad("count-one-more", &|b| {
        b[count_at..first_entry].copy_from_slice(&4u32.to_be_bytes())
    });
    bad("count-one-less", &|b| {
        b[count_at..first_entry].copy_from_slice(&2u32.to_be_bytes())
    });
    bad("count-over-limit", &|b| {
        b[count_at..first_entry].copy_from_slice(&(CRL_ENTRIES_MAX as u32 + 1).to_be_bytes())
    });
    bad("count-u32-max", &|b| {
        b[count_at..first_entry].copy_from_slice(&u32::MAX.to_be_bytes())
    });
    bad("count-at-limit-without-entries", &|b| {
        b[count_at..first_entry].copy_from_slice(&(CRL_ENTRIES_MAX as u32).to_be_bytes())
    });
    bad("upper-case-domain", &|b| b[DOMAIN_LEN_AT + 1] = b'E');
    bad("empty-domain", &|b| {
        b.drain(DOMAIN_LEN_AT + 1..count_at);
        b[DOMAIN_LEN_AT] = 0;
    });
    bad("domain-length-past-end", &|b| b[DOMAIN_LEN_AT] = 0xff);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let corpus = PathBuf::from(args.next().unwrap_or_else(|| "corpus".into()));
    let scenarios = PathBuf::from(args.next().unwrap_or_else(|| "scenarios".into()));
    // Target names to write; none means all of them.
    let only: Vec<String> = args.collect();
    // The corpus directory of `name`, or `None` if it was not selected.
    let dir = |name: &str| {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            return None;
        }
        let d = corpus.join(name);
        fs::create_dir_all(&d).expect("create corpus dir");
        Some(d)
    };

    // Every opcode whose payload is defined must have a seed: fail loudly when one is added
    // (checked when a wire corpus is written).
    let wire_selected = only.is_empty()
        || only
            .iter()
            .any(|o| ["frame_decode", "payload_decode", "stream_decode"].contains(&o.as_str()));
    let seeded: Vec<Opcode> = payloads().iter().map(|(_, p)| p.opcode()).collect();
    for &opcode in Opcode::ALL.iter().filter(|_| wire_selected) {
        let defined = !matches!(
            Payload::decode(opcode, &[0xa0]),
            Err(WireError::PayloadNotDefined(_))
        );
        assert!(
            !defined || seeded.contains(&opcode),
            "{opcode:?} has a payload but no seed: add one to payloads()"
        );
    }

    // ---- frame_decode
    let frames_dir = dir("frame_decode");
    let mut valid_frames = Vec::new();
    for (name, payload) in payloads() {
        let plain = Frame::new(Routing::default(), payload.clone())
            .encode()
            .to_vec();
        write(&frames_dir, name, &plain);
        let mut routed = Frame::new(routing(), payload.clone());
        routed.signature = Some([0x5a; 64]);
        write(
            &frames_dir,
            &format!("{name}-signed-routed"),
            &routed.encode(),
        );
        valid_frames.push(plain);
    }
    let hello = valid_frames[0].clone();
    let send_payload = payloads()
        .into_iter()
        .find(|(name, _)| *name == "send")
        .expect("a send seed")
        .1;
    let send = Frame::new(routing(), send_payload).encode().to_vec();
    let bad = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = send.clone();
        f(&mut b);
        write(&frames_dir, name, &b);
    };
    bad("bad-magic", &|b| b[0] = b'X');
    bad("bad-version", &|b| b[4] = 2);
    bad("unknown-flags", &|b| b[5] = 0x80);
    bad("reserved-not-zero", &|b| b[15] = 1);
    bad("unknown-opcode", &|b| {
        b[6..8].copy_from_slice(&0x7777u16.to_be_bytes())
    });
    bad("truncated-header", &|b| b.truncate(HEADER_BYTES - 1));
    bad("truncated-payload", &|b| {
        b.pop();
    });
    bad("trailing-bytes", &|b| b.push(0));
    bad("oversized-length", &|b| {
        b[8..12].copy_from_slice(&(PAYLOAD_BYTES_MAX + 1).to_be_bytes())
    });
    bad("max-length", &|b| {
        b[8..12].copy_from_slice(&PAYLOAD_BYTES_MAX.to_be_bytes())
    });
    bad("payload-not-cbor-map", &|b| {
        let last = b.len() - 1;
        b[HEADER_BYTES] = 0x40; // an empty byte string, not a map
        b.truncate(last.max(HEADER_BYTES + 1));
        let len = (b.len() - HEADER_BYTES) as u32;
        b[8..12].copy_from_slice(&len.to_be_bytes());
    });
    bad("opcode-mismatch", &|b| {
        b[6..8].copy_from_slice(&Opcode::Deliver.to_u16().to_be_bytes())
    });
    write(
        &frames_dir,
        "reserved-opcode-resume",
        &raw_header(Opcode::Resume.to_u16(), 0),
    );
    write(&frames_dir, "empty", &[]);
    write(
        &frames_dir,
        "header-only-ack-no-payload",
        &raw_header(Opcode::Ack.to_u16(), 0),
    );

    // ---- payload_decode
    let payload_dir = dir("payload_decode");
    for (name, payload) in payloads() {
        let mut b = opcode_index(payload.opcode()).to_be_bytes().to_vec();
        b.extend(encoded(&payload));
        write(&payload_dir, name, &b);
    }
    let cbor_for = |name: &str, opcode: Opcode, cbor: &[u8]| {
        let mut b = opcode_index(opcode).to_be_bytes().to_vec();
        b.extend_from_slice(cbor);
        write(&payload_dir, name, &b);
    };
    // Unknown map key 9 (must be skipped), indefinite-length map, wrong types, huge lengths.
    cbor_for(
        "heartbeat-extra-key",
        Opcode::Heartbeat,
        &[0xa2, 0x00, 0x01, 0x09, 0x63, b'a', b'b', b'c'],
    );
    cbor_for(
        "heartbeat-indefinite-map",
        Opcode::Heartbeat,
        &[0xbf, 0x00, 0x05, 0xff],
    );
    cbor_for(
        "heartbeat-wrong-type",
        Opcode::Heartbeat,
        &[0xa1, 0x00, 0x61, b'x'],
    );
    cbor_for(
        "hello-huge-array",
        Opcode::Hello,
        &[
            0xa1, 0x00, 0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ],
    );
    cbor_for(
        "send-huge-bytes",
        Opcode::Send,
        &[
            0xa2, 0x00, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x5b, 0x7f,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ],
    );
    cbor_for(
        "goodbye-bad-utf8",
        Opcode::Goodbye,
        &[0xa2, 0x00, 0x01, 0x01, 0x62, 0xff, 0xfe],
    );
    cbor_for("ack-empty-input", Opcode::Ack, &[]);
    // One user more than a fetch may name (the limit is checked after decoding).
    let too_many = Payload::KeyPackageFetch(KeyPackageFetch {
        users: (0..=FETCH_USERS_MAX)
            .map(|i| UserId::of(&format!("u{i}"), "localhost").to_bytes().into())
            .collect(),
        domain: None,
    });
    cbor_for(
        "fetch-too-many-users",
        Opcode::KeyPackageFetch,
        &encoded(&too_many),
    );
    // A 15-byte user id where 16 are required.
    let mut short_user = vec![0xa1, 0x00, 0x81, 0x4f];
    short_user.extend_from_slice(&[0x75; 15]);
    cbor_for("fetch-short-user", Opcode::KeyPackageFetch, &short_user);
    // An upload whose package list claims 2^64-1 entries.
    cbor_for(
        "upload-huge-array",
        Opcode::KeyPackageUpload,
        &[
            0xa1, 0x00, 0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ],
    );
    // A count whose flag is an integer, not a bool.
    cbor_for(
        "key-package-count-wrong-type",
        Opcode::KeyPackageCount,
        &[0xa2, 0x00, 0x01, 0x01, 0x01],
    );
    cbor_for("reserved-chunk", Opcode::Chunk, &[0xa0]);

    // ---- stream_decode
    let stream_dir = dir("stream_decode");
    let all: Vec<u8> = valid_frames.concat();
    for chunk in [1u8, 7, 64, 128, 255] {
        let mut b = vec![chunk];
        b.extend_from_slice(&all);
        write(&stream_dir, &format!("all-frames-chunk-{chunk}"), &b);
    }
    let mut b = vec![13u8];
    b.extend_from_slice(&hello);
    b.extend_from_slice(&send[..HEADER_BYTES + 3]);
    write(&stream_dir, "frame-then-partial", &b);
    let mut b = vec![200u8];
    b.extend_from_slice(&hello);
    let mut broken = send.clone();
    broken[0] = 0;
    b.extend_from_slice(&broken);
    b.extend_from_slice(&hello);
    write(&stream_dir, "frame-then-lost-sync", &b);
    let mut b = vec![50u8];
    b.extend_from_slice(&raw_header(Opcode::Send.to_u16(), PAYLOAD_BYTES_MAX));
    b.extend_from_slice(&[0xa0; 300]);
    write(&stream_dir, "max-length-header-waits", &b);

    // ---- scenario_parse
    if let Some(scenario_dir) = dir("scenario_parse") {
        let mut copied = 0;
        for entry in fs::read_dir(&scenarios).expect("read scenarios dir") {
            let path = entry.expect("dir entry").path();
            if path.extension().is_some_and(|e| e == "sund") {
                let name = path
                    .file_name()
                    .expect("file name")
                    .to_string_lossy()
                    .into_owned();
                fs::copy(&path, scenario_dir.join(format!("seed-{name}"))).expect("copy scenario");
                copied += 1;
            }
        }
        assert!(copied > 0, "no .sund files in {}", scenarios.display());
    }

    // ---- certificate_decode, crl_decode
    certificate_seeds(&dir("certificate_decode"));
    crl_seeds(&dir("crl_decode"));

    // ---- peer_roots_decode
    peer_roots_seeds(&dir("peer_roots_decode"));

    // ---- manifest_decode
    manifest_seeds(&dir("manifest_decode"));

    dir("gateway_inputs");
    eprintln!("seeds written under {}", corpus.display());
}
