//! The exact bytes of representative frames. The wire format is a contract: a change here breaks
//! every deployed peer, so it must be deliberate (bump the version) and reviewed.

use sund_model::ids::{ConversationId, DeviceId};
use sund_model::wire::payload::*;
use sund_model::wire::{Frame, Payload, Routing};

fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .enumerate()
        .map(|(i, row)| {
            let cells: Vec<String> = row.iter().map(|b| format!("{b:02x}")).collect();
            format!("{:04x}: {}", i * 16, cells.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn routing() -> Routing {
    Routing {
        conversation: ConversationId(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10),
        sender: DeviceId(0xa1a2_a3a4_a5a6_a7a8_a9aa_abac_adae_afb0),
        seq: 42,
        epoch: 7,
    }
}

#[test]
fn send_frame_bytes() {
    let frame = Frame::new(
        routing(),
        Payload::Send(Send {
            msg_id: [0x11; 16],
            body: b"hello".to_vec(),
            welcome: None,
            after: Some([0; 16]),
        }),
    );
    insta::assert_snapshot!(hex(&frame.encode()));
}

#[test]
fn deliver_frame_bytes() {
    let frame = Frame::new(
        routing(),
        Payload::Deliver(Deliver {
            msg_id: [0x22; 16],
            body: vec![0xde, 0xad],
        }),
    );
    insta::assert_snapshot!(hex(&frame.encode()));
}

#[test]
fn hello_frame_bytes() {
    let r = Routing {
        sender: DeviceId(5),
        ..Routing::default()
    };
    let frame = Frame::new(
        r,
        Payload::Hello(Hello {
            cursors: vec![Cursor {
                conversation: [3; 16],
                seq: 9,
                last: Some([0x1d; 16]),
                since: Some(4),
                since_run: Some([0x5e; 16]),
                skipped: Some([6, 7]),
            }],
            device_key: [0x4b; 32],
            resume_token: Some([0x7e; 32]),
            user: Some([0x75; 16]),
            certificate: Some(vec![0xce; 8].into()),
            generation: Some(7),
        }),
    );
    insta::assert_snapshot!(hex(&frame.encode()));
}

#[test]
fn signed_goodbye_frame_bytes() {
    let mut frame = Frame::new(
        Routing::default(),
        Payload::Goodbye(Goodbye {
            code: ErrorCode::HeartbeatTimeout as u16,
            message: "no heartbeat".into(),
            retry_after_ms: None,
        }),
    );
    frame.signature = Some([0x5a; 64]);
    insta::assert_snapshot!(hex(&frame.encode()));
}

#[test]
fn ack_and_replay_request_bytes() {
    let ack = Frame::new(routing(), Payload::Ack(Ack {})).encode();
    let replay = Frame::new(
        routing(),
        Payload::ReplayRequest(ReplayRequest { from_seq: 40 }),
    )
    .encode();
    insta::assert_snapshot!(format!(
        "ack:\n{}\nreplay_request:\n{}",
        hex(&ack),
        hex(&replay)
    ));
}

/// `sender_out_of_order` as a refusal and as the notice of a held message (key 5, `held`).
#[test]
fn sender_order_error_bytes() {
    let report = |held| {
        Frame::new(
            routing(),
            Payload::Error(ErrorReport {
                code: ErrorCode::SenderOutOfOrder as u16,
                message: "held".into(),
                msg_id: Some([0x33; 16]),
                after: Some([0x11; 16]),
                retry_after_ms: None,
                held,
            }),
        )
        .encode()
    };
    insta::assert_snapshot!(format!(
        "refused:\n{}\nheld:\n{}",
        hex(&report(None)),
        hex(&report(Some(true)))
    ));
}

#[test]
fn handshake_frames_bytes() {
    let challenge = Frame::new(
        Routing::default(),
        Payload::Challenge(Challenge { nonce: [0xc4; 32] }),
    )
    .encode();
    let proof = Frame::new(
        Routing::default(),
        Payload::Proof(Proof {
            signature: [0x51; 64],
        }),
    )
    .encode();
    let ok = Frame::new(
        Routing::default(),
        Payload::HelloOk(HelloOk {
            heartbeat_interval_ms: 5000,
            resume_token: [0x70; 32],
            resume_token_ttl_s: 604_800,
            external_sender: None,
            peer_roots: None,
            peer_crls: None,
        }),
    )
    .encode();
    insta::assert_snapshot!(format!(
        "challenge:\n{}\nproof:\n{}\nhello_ok:\n{}",
        hex(&challenge),
        hex(&proof),
        hex(&ok)
    ));
}

#[test]
fn key_package_frames_bytes() {
    let upload = Frame::new(
        Routing::default(),
        Payload::KeyPackageUpload(KeyPackageUpload {
            packages: vec![vec![0xa1; 4].into(), vec![0xa2; 4].into()],
            last_resort: Some(vec![0x1f; 4].into()),
        }),
    )
    .encode();
    let fetch = Frame::new(
        Routing::default(),
        Payload::KeyPackageFetch(KeyPackageFetch {
            users: vec![[0xb0; 16].into()],
            domain: Some("b.example".into()),
        }),
    )
    .encode();
    let answer = Frame::new(
        Routing::default(),
        Payload::KeyPackages(KeyPackages {
            found: vec![FetchedKeyPackage {
                user: [0xb0; 16].into(),
                device: [0xd1; 16].into(),
                package: vec![0xa1; 4].into(),
                last_resort: false,
            }],
            exhausted: vec![[0xd2; 16].into()],
        }),
    )
    .encode();
    let count = Frame::new(
        Routing::default(),
        Payload::KeyPackageCount(KeyPackageCount {
            remaining: 7,
            last_resort: true,
            replenish_below: 10,
        }),
    )
    .encode();
    insta::assert_snapshot!(format!(
        "upload:\n{}\nfetch:\n{}\nkey_packages:\n{}\ncount:\n{}",
        hex(&upload),
        hex(&fetch),
        hex(&answer),
        hex(&count)
    ));
}

#[test]
fn group_frames_bytes() {
    let conv = ConversationId(0xc0);
    let commit = Frame::new(
        Routing {
            conversation: conv,
            sender: DeviceId(0xd1),
            ..Routing::default()
        },
        Payload::Send(Send {
            msg_id: [0x5e; 16],
            body: vec![0x00, 0x01, 0x00, 0x02],
            welcome: Some(vec![0x00, 0x01, 0x00, 0x03].into()),
            after: None,
        }),
    )
    .encode();
    let welcome = Frame::new(
        Routing {
            conversation: conv,
            seq: 7,
            ..Routing::default()
        },
        Payload::Welcome(Welcome {
            seq: 7,
            kind: 2,
            welcome: vec![0x00, 0x01, 0x00, 0x03].into(),
            members: vec![RosterEntry {
                device: [0xd1; 16].into(),
                user: [0xb0; 16].into(),
            }],
        }),
    )
    .encode();
    let removed = Frame::new(
        Routing {
            conversation: conv,
            seq: 9,
            ..Routing::default()
        },
        Payload::Removed(Removed { seq: 9 }),
    )
    .encode();
    let stale = Frame::new(
        Routing {
            conversation: conv,
            epoch: 4,
            ..Routing::default()
        },
        Payload::Error(ErrorReport {
            code: ErrorCode::StaleEpoch as u16,
            message: "a commit for epoch 3 was already accepted".into(),
            msg_id: Some([0x5e; 16]),
            after: None,
            retry_after_ms: None,
            held: None,
        }),
    )
    .encode();
    let leave = Frame::new(
        Routing {
            conversation: conv,
            ..Routing::default()
        },
        Payload::Leave(Leave {}),
    )
    .encode();
    let hello_ok = Frame::new(
        Routing::default(),
        Payload::HelloOk(HelloOk {
            heartbeat_interval_ms: 5_000,
            resume_token: [0x70; 32],
            resume_token_ttl_s: 604_800,
            external_sender: Some(vec![0xe5; 32].into()),
            peer_roots: None,
            peer_crls: None,
        }),
    )
    .encode();
    insta::assert_snapshot!(format!(
        "commit:\n{}\nwelcome:\n{}\nremoved:\n{}\nstale:\n{}\nleave:\n{}\nhello_ok with external sender:\n{}",
        hex(&commit),
        hex(&welcome),
        hex(&removed),
        hex(&stale),
        hex(&leave),
        hex(&hello_ok)
    ));
}

#[test]
fn trust_frames_bytes() {
    let sender = Routing {
        sender: DeviceId(5),
        ..Routing::default()
    };
    let register = Frame::new(
        sender,
        Payload::Register(Register {
            device_key: [0x4b; 32],
            user: [0x75; 16],
            token: [0x70; 16],
            proof: [0x51; 64],
        }),
    )
    .encode();
    let certificate = Frame::new(
        Routing::default(),
        Payload::Certificate(Certificate {
            certificate: vec![0xce; 8].into(),
            root_key: [0x52; 32],
            voucher: None,
        }),
    )
    .encode();
    let crl_fetch = Frame::new(
        Routing::default(),
        Payload::CrlFetch(CrlFetch {
            have_version: 3,
            peers: None,
        }),
    )
    .encode();
    let crl = Frame::new(
        Routing::default(),
        Payload::Crl(Crl {
            crl: vec![0xc1; 8].into(),
        }),
    )
    .encode();
    let root_fetch = Frame::new(
        Routing::default(),
        Payload::TrustRootFetch(TrustRootFetch {}),
    )
    .encode();
    let root = Frame::new(
        Routing::default(),
        Payload::TrustRoot(TrustRoot {
            key: [0x52; 32],
            domain: "example.org".into(),
        }),
    )
    .encode();
    insta::assert_snapshot!(format!(
        "register:\n{}\ncertificate:\n{}\ncrl_fetch:\n{}\ncrl:\n{}\ntrust_root_fetch:\n{}\ntrust_root:\n{}",
        hex(&register),
        hex(&certificate),
        hex(&crl_fetch),
        hex(&crl),
        hex(&root_fetch),
        hex(&root)
    ));
}

#[test]
fn pairing_frames() {
    let vouch = Frame::new(
        Routing::default(),
        Payload::PairVouch(PairVouch {
            secret: [0x5e; 16],
            expires: 1_700_000_600,
            signature: [0x51; 64],
        }),
    )
    .encode();
    let vouched = Frame::new(
        Routing::default(),
        Payload::PairVouched(PairVouched { secret: [0x5e; 16] }),
    )
    .encode();
    let certificate = Frame::new(
        Routing::default(),
        Payload::Certificate(Certificate {
            certificate: vec![0xce; 8].into(),
            root_key: [0x52; 32],
            voucher: Some(vec![0xcf; 8].into()),
        }),
    )
    .encode();
    let linked = Frame::new(
        Routing::default(),
        Payload::DeviceLinked(DeviceLinked {
            certificate: vec![0xce; 8].into(),
        }),
    )
    .encode();
    insta::assert_snapshot!(format!(
        "pair_vouch:\n{}\npair_vouched:\n{}\ncertificate_with_voucher:\n{}\ndevice_linked:\n{}",
        hex(&vouch),
        hex(&vouched),
        hex(&certificate),
        hex(&linked)
    ));
}

#[test]
fn file_frames_bytes() {
    let routed = |payload| {
        hex(&Frame::new(
            Routing {
                conversation: ConversationId(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10),
                ..Routing::default()
            },
            payload,
        )
        .encode())
    };
    let open = routed(Payload::UploadOpen(UploadOpen {
        upload: [0x55; 16],
        chunks: vec![ListedChunkWire {
            id: [0x01; 32],
            len: 1_048_592,
        }],
    }));
    let status = routed(Payload::UploadStatus(UploadStatus {
        upload: [0x55; 16],
        missing: vec![[0x01; 32].into()],
    }));
    let head = routed(Payload::Chunk(ChunkHead {
        upload: [0x55; 16],
        id: [0x01; 32],
        len: 1_048_592,
    }));
    let ack = routed(Payload::ChunkAck(ChunkAck {
        upload: [0x55; 16],
        id: [0x01; 32],
    }));
    let request = routed(Payload::ChunkRequest(ChunkRequest {
        upload: [0x55; 16],
        ids: vec![[0x01; 32].into()],
    }));
    let unavailable = routed(Payload::ChunksUnavailable(ChunksUnavailable {
        upload: [0x55; 16],
        ids: vec![[0x01; 32].into()],
    }));
    let fetched = routed(Payload::FileFetched(FileFetched { upload: [0x55; 16] }));
    insta::assert_snapshot!(format!(
        "upload_open:\n{open}\nupload_status:\n{status}\nchunk_head:\n{head}\nchunk_ack:\n{ack}\nchunk_request:\n{request}\nchunks_unavailable:\n{unavailable}\nfile_fetched:\n{fetched}"
    ));
}

#[test]
fn contact_and_presence_frames_bytes() {
    let request = |payload| {
        hex(&Frame::new(
            Routing {
                seq: 7,
                ..Routing::default()
            },
            payload,
        )
        .encode())
    };
    let change = request(Payload::ContactChange(ContactChange {
        user: [0x0b; 16].into(),
        action: ContactAction::Add as u8,
        domain: None,
    }));
    let update = request(Payload::PresenceUpdate(PresenceUpdate { invisible: true }));
    let fetch = request(Payload::ContactsFetch(ContactsFetch {}));
    let contacts = request(Payload::Contacts(Contacts {
        contacts: vec![[0x0b; 16].into()],
        incoming: vec![[0x0c; 16].into()],
        outgoing: vec![],
        blocked: vec![[0x0d; 16].into()],
        invisible: false,
    }));
    let subscribe = request(Payload::PresenceSubscribe(PresenceSubscribe {
        users: vec![[0x0b; 16].into()],
    }));
    let notify = request(Payload::PresenceNotify(PresenceNotify {
        entries: vec![PresenceEntry {
            user: [0x0b; 16].into(),
            seen: Seen::Recently as u8,
        }],
        number: 1,
    }));
    insta::assert_snapshot!(format!(
        "contact_change:\n{change}\npresence_update:\n{update}\ncontacts_fetch:\n{fetch}\ncontacts:\n{contacts}\npresence_subscribe:\n{subscribe}\npresence_notify:\n{notify}"
    ));
}

#[test]
fn federation_frames_bytes() {
    let at = |seq, payload| {
        hex(&Frame::new(
            Routing {
                seq,
                ..Routing::default()
            },
            payload,
        )
        .encode())
    };
    let hello = at(
        0,
        Payload::FederationHello(FederationHello {
            message: b"SFH\x01\x03".to_vec().into(),
        }),
    );
    let forward = at(
        7,
        Payload::FederationForward(FederationForward {
            body: b"entry".to_vec().into(),
        }),
    );
    let ack = at(7, Payload::FederationAck(FederationAck::default()));
    let gap = at(
        7,
        Payload::FederationAck(FederationAck {
            gap: Some(9),
            crl: None,
        }),
    );
    let beat = at(
        7,
        Payload::FederationAck(FederationAck {
            gap: None,
            crl: Some(3),
        }),
    );
    insta::assert_snapshot!(format!(
        "federation_hello:\n{hello}\nfederation_forward:\n{forward}\nfederation_ack:\n{ack}\nfederation_ack (gap):\n{gap}\nfederation_ack (heartbeat, CRL version 3 held):\n{beat}"
    ));
}
