//! Writes seed inputs for the wire fuzz targets and copies the example scenarios:
//!
//! ```text
//! cargo run --manifest-path fuzz/seedgen/Cargo.toml --target-dir fuzz/target -- corpus scenarios
//! ```
//!
//! - `corpus/frame_decode/`: one valid frame per defined payload (plus signed and routed variants)
//!   and malformed frames (bad magic, version, flags, reserved word, unknown and reserved opcodes,
//!   truncated header and payload, oversized length, trailing bytes, bad CBOR);
//! - `corpus/payload_decode/`: two bytes (index into `Opcode::ALL`) + each payload's CBOR;
//! - `corpus/stream_decode/`: one chunk-size byte + several frames back to back;
//! - `corpus/scenario_parse/`: the `.sund` files of the scenarios directory.
//!
//! Seeds are named `seed-*`; `cargo fuzz cmin` later renames what it keeps to content hashes.

use std::fs;
use std::path::{Path, PathBuf};

use sund_model::ids::{ConversationId, DeviceId, UserId};
use sund_model::wire::payload::{
    Ack, Challenge, Cursor, Deliver, ErrorCode, ErrorReport, FetchedKeyPackage, Goodbye, Heartbeat,
    Hello, HelloOk, KeyPackageCount, KeyPackageFetch, KeyPackageUpload, KeyPackages, Leave, Proof,
    Removed, ReplayRequest, RosterEntry, Send, SendAck, Welcome, FETCH_USERS_MAX,
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
            }),
        ),
        (
            "hello-user",
            Payload::Hello(Hello {
                cursors: vec![Cursor::new(conv, 1)],
                device_key: [0x5c; 32],
                resume_token: None,
                user: Some(UserId::from_name("alice").to_bytes()),
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
            }),
        ),
        (
            "heartbeat",
            Payload::Heartbeat(Heartbeat { nonce: 0xdead_beef }),
        ),
        (
            "heartbeat-ack",
            Payload::HeartbeatAck(Heartbeat { nonce: 0 }),
        ),
        (
            "goodbye",
            Payload::Goodbye(Goodbye {
                code: ErrorCode::HeartbeatTimeout as u16,
                message: "no heartbeat in time".into(),
            }),
        ),
        (
            "error-msg-id",
            Payload::Error(ErrorReport {
                code: ErrorCode::NotMember as u16,
                message: "not a member of this conversation".into(),
                msg_id: Some([0x42; 16]),
            }),
        ),
        (
            "error-no-msg-id",
            Payload::Error(ErrorReport {
                code: ErrorCode::UnexpectedOpcode as u16,
                message: String::new(),
                msg_id: None,
            }),
        ),
        (
            "send",
            Payload::Send(Send {
                msg_id: [1; 16],
                body: b"hello, sund".to_vec(),
                welcome: None,
            }),
        ),
        (
            "send-empty-body",
            Payload::Send(Send {
                msg_id: [0; 16],
                body: vec![],
                welcome: None,
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
                    UserId::from_name("alice").to_bytes().into(),
                    UserId::from_name("bob").to_bytes().into(),
                ],
            }),
        ),
        (
            "key-packages",
            Payload::KeyPackages(KeyPackages {
                found: vec![
                    FetchedKeyPackage {
                        user: UserId::from_name("bob").to_bytes().into(),
                        device: DeviceId(0x0b0b).to_bytes().into(),
                        package: vec![0x6b; 120].into(),
                        last_resort: false,
                    },
                    FetchedKeyPackage {
                        user: UserId::from_name("bob").to_bytes().into(),
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
        ("leave", Payload::Leave(Leave {})),
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

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
}

fn main() {
    let mut args = std::env::args().skip(1);
    let corpus = PathBuf::from(args.next().unwrap_or_else(|| "corpus".into()));
    let scenarios = PathBuf::from(args.next().unwrap_or_else(|| "scenarios".into()));
    let dir = |name: &str| {
        let d = corpus.join(name);
        fs::create_dir_all(&d).expect("create corpus dir");
        d
    };

    // Every opcode whose payload is defined must have a seed: fail loudly when one is added.
    let seeded: Vec<Opcode> = payloads().iter().map(|(_, p)| p.opcode()).collect();
    for &opcode in Opcode::ALL {
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
            .map(|i| UserId::from_name(&format!("u{i}")).to_bytes().into())
            .collect(),
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
    let scenario_dir = dir("scenario_parse");
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

    dir("gateway_inputs");
    eprintln!("seeds written under {}", corpus.display());
}
