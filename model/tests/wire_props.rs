//! Property tests of the wire format: every frame round-trips, and no input makes the decoder
//! panic.

use proptest::prelude::*;
use sund_model::ids::{ConversationId, DeviceId};
use sund_model::wire::payload::*;
use sund_model::wire::{
    Frame, FrameDecoder, FrameHeader, Opcode, Payload, Routing, WireError, HEADER_BYTES,
    PAYLOAD_BYTES_MAX,
};

fn bytes16() -> impl Strategy<Value = [u8; 16]> {
    any::<[u8; 16]>()
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,64}"
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..512)
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        (
            proptest::collection::vec(
                (
                    bytes16(),
                    any::<u64>(),
                    proptest::option::of(bytes16()),
                    proptest::option::of(any::<u64>()),
                    proptest::option::of(bytes16()),
                    proptest::option::of(any::<[u64; 2]>())
                ),
                0..8
            ),
            any::<[u8; 32]>(),
            proptest::option::of(any::<[u8; 32]>()),
            proptest::option::of(bytes16()),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(
                |(cs, device_key, resume_token, user, certificate, generation)| Payload::Hello(
                    Hello {
                        cursors: cs
                            .into_iter()
                            .map(|(conversation, seq, last, since, since_run, skipped)| {
                                Cursor {
                                    conversation,
                                    seq,
                                    last,
                                    since,
                                    since_run,
                                    skipped,
                                }
                            })
                            .collect(),
                        device_key,
                        resume_token,
                        user,
                        certificate: certificate.map(Into::into),
                        generation,
                    }
                )
            ),
        any::<[u8; 32]>().prop_map(|nonce| Payload::Challenge(Challenge { nonce })),
        (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(a, b)| {
            let mut signature = [0u8; 64];
            signature[..32].copy_from_slice(&a);
            signature[32..].copy_from_slice(&b);
            Payload::Proof(Proof { signature })
        }),
        (any::<u32>(), any::<[u8; 32]>(), any::<u32>()).prop_map(|(ms, resume_token, ttl)| {
            Payload::HelloOk(HelloOk {
                heartbeat_interval_ms: ms,
                resume_token,
                resume_token_ttl_s: ttl,
                external_sender: None,
                peer_roots: None,
                peer_crls: None,
            })
        }),
        any::<u64>().prop_map(|nonce| Payload::Heartbeat(Heartbeat {
            nonce,
            crl_version: None,
            presence: None,
            peer_roots: None,
            peer_crls: None,
            contacts: None,
        })),
        (any::<u64>(), proptest::option::of(any::<u64>())).prop_map(|(nonce, crl_version)| {
            Payload::HeartbeatAck(Heartbeat {
                nonce,
                crl_version,
                presence: crl_version.map(|v| v / 2),
                peer_roots: None,
                peer_crls: crl_version.map(|v| v ^ 1),
                contacts: None,
            })
        }),
        (any::<u16>(), text(), any::<Option<u32>>()).prop_map(|(code, message, retry_after_ms)| {
            Payload::Goodbye(Goodbye {
                code,
                message,
                retry_after_ms,
            })
        }),
        (
            any::<u16>(),
            text(),
            proptest::option::of(bytes16()),
            proptest::option::of(bytes16()),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<bool>())
        )
            .prop_map(|(code, message, msg_id, after, retry_after_ms, held)| {
                Payload::Error(ErrorReport {
                    code,
                    message,
                    msg_id,
                    after,
                    retry_after_ms,
                    held,
                })
            }),
        (
            bytes16(),
            body(),
            proptest::option::of(body()),
            proptest::option::of(bytes16())
        )
            .prop_map(|(msg_id, body, welcome, after)| {
                Payload::Send(Send {
                    msg_id,
                    body,
                    welcome: welcome.map(Into::into),
                    after,
                })
            }),
        bytes16().prop_map(|msg_id| Payload::SendAck(SendAck { msg_id })),
        (bytes16(), body()).prop_map(|(msg_id, body)| Payload::Deliver(Deliver { msg_id, body })),
        Just(Payload::Ack(Ack {})),
        any::<u64>().prop_map(|from_seq| Payload::ReplayRequest(ReplayRequest { from_seq })),
        (
            proptest::collection::vec(body(), 0..4),
            proptest::option::of(body())
        )
            .prop_map(|(packages, last_resort)| {
                Payload::KeyPackageUpload(KeyPackageUpload {
                    packages: packages.into_iter().map(Into::into).collect(),
                    last_resort: last_resort.map(Into::into),
                })
            }),
        (
            proptest::collection::vec(bytes16(), 0..4),
            proptest::option::of("[a-z0-9.-]{1,40}")
        )
            .prop_map(|(users, domain)| {
                Payload::KeyPackageFetch(KeyPackageFetch {
                    users: users.into_iter().map(Into::into).collect(),
                    domain,
                })
            }),
        (
            proptest::collection::vec((bytes16(), bytes16(), body(), any::<bool>()), 0..4),
            proptest::collection::vec(bytes16(), 0..4)
        )
            .prop_map(|(found, exhausted)| {
                Payload::KeyPackages(KeyPackages {
                    found: found
                        .into_iter()
                        .map(|(user, device, package, last_resort)| FetchedKeyPackage {
                            user: user.into(),
                            device: device.into(),
                            package: package.into(),
                            last_resort,
                        })
                        .collect(),
                    exhausted: exhausted.into_iter().map(Into::into).collect(),
                })
            }),
        (any::<u32>(), any::<bool>(), any::<u32>()).prop_map(
            |(remaining, last_resort, replenish_below)| {
                Payload::KeyPackageCount(KeyPackageCount {
                    remaining,
                    last_resort,
                    replenish_below,
                })
            }
        ),
        (
            any::<u64>(),
            any::<u8>(),
            body(),
            proptest::collection::vec((bytes16(), bytes16()), 0..4)
        )
            .prop_map(|(seq, kind, welcome, members)| {
                Payload::Welcome(Welcome {
                    seq,
                    kind,
                    welcome: welcome.into(),
                    members: members
                        .into_iter()
                        .map(|(device, user)| RosterEntry {
                            device: device.into(),
                            user: user.into(),
                        })
                        .collect(),
                })
            }),
        any::<u64>().prop_map(|seq| Payload::Removed(Removed { seq })),
        Just(Payload::Leave(Leave {})),
        (any::<[u8; 32]>(), bytes16(), bytes16(), any::<[u8; 32]>()).prop_map(
            |(device_key, user, token, half)| {
                let mut proof = [0u8; 64];
                proof[..32].copy_from_slice(&half);
                Payload::Register(Register {
                    device_key,
                    user,
                    token,
                    proof,
                })
            }
        ),
        (body(), any::<[u8; 32]>(), proptest::option::of(body())).prop_map(
            |(certificate, root_key, voucher)| {
                let mut certificate = certificate;
                certificate.truncate(CERTIFICATE_BYTES_MAX);
                let voucher = voucher.map(|mut v| {
                    v.truncate(CERTIFICATE_BYTES_MAX);
                    v.into()
                });
                Payload::Certificate(Certificate {
                    certificate: certificate.into(),
                    root_key,
                    voucher,
                })
            }
        ),
        (bytes16(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(secret, expires, half)| {
            let mut signature = [0u8; 64];
            signature[32..].copy_from_slice(&half);
            Payload::PairVouch(PairVouch {
                secret,
                expires,
                signature,
            })
        }),
        bytes16().prop_map(|secret| Payload::PairVouched(PairVouched { secret })),
        Just(Payload::RenewCertificate(RenewCertificate {})),
        body().prop_map(|mut certificate| {
            certificate.truncate(CERTIFICATE_BYTES_MAX);
            Payload::DeviceLinked(DeviceLinked {
                certificate: certificate.into(),
            })
        }),
        (any::<u64>(), proptest::option::of(any::<bool>())).prop_map(|(have_version, peers)| {
            Payload::CrlFetch(CrlFetch {
                have_version,
                peers,
            })
        }),
        body().prop_map(|crl| Payload::Crl(Crl { crl: crl.into() })),
        Just(Payload::TrustRootFetch(TrustRootFetch {})),
        (any::<[u8; 32]>(), "[a-z0-9.-]{1,40}")
            .prop_map(|(key, domain)| Payload::TrustRoot(TrustRoot { key, domain })),
        (
            bytes16(),
            proptest::collection::vec((any::<[u8; 32]>(), any::<u32>()), 0..6)
        )
            .prop_map(|(upload, chunks)| Payload::UploadOpen(UploadOpen {
                upload,
                chunks: chunks
                    .into_iter()
                    .map(|(id, len)| ListedChunkWire { id, len })
                    .collect(),
            })),
        (bytes16(), ids32())
            .prop_map(|(upload, missing)| Payload::UploadStatus(UploadStatus { upload, missing })),
        (bytes16(), any::<[u8; 32]>(), any::<u32>())
            .prop_map(|(upload, id, len)| Payload::Chunk(ChunkHead { upload, id, len })),
        (bytes16(), any::<[u8; 32]>())
            .prop_map(|(upload, id)| Payload::ChunkAck(ChunkAck { upload, id })),
        (bytes16(), ids32())
            .prop_map(|(upload, ids)| Payload::ChunkRequest(ChunkRequest { upload, ids })),
        (bytes16(), ids32()).prop_map(|(upload, ids)| Payload::ChunksUnavailable(
            ChunksUnavailable { upload, ids }
        )),
        bytes16().prop_map(|upload| Payload::FileFetched(FileFetched { upload })),
        proptest::collection::vec(any::<u8>(), 0..200).prop_map(|message| {
            Payload::FederationHello(FederationHello {
                message: message.into(),
            })
        }),
        proptest::collection::vec(any::<u8>(), 0..200)
            .prop_map(|body| Payload::FederationForward(FederationForward { body: body.into() })),
        (
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(gap, crl)| Payload::FederationAck(FederationAck { gap, crl })),
        any::<bool>().prop_map(|invisible| Payload::PresenceUpdate(PresenceUpdate { invisible })),
        ids16().prop_map(|users| Payload::PresenceSubscribe(PresenceSubscribe { users })),
        proptest::collection::vec((bytes16(), any::<u8>()), 0..6).prop_map(|entries| {
            Payload::PresenceNotify(PresenceNotify {
                entries: entries
                    .into_iter()
                    .map(|(user, seen)| PresenceEntry {
                        user: user.into(),
                        seen,
                    })
                    .collect(),
                number: 1,
            })
        }),
        (
            bytes16(),
            any::<u8>(),
            proptest::option::of("[a-z0-9.-]{0,40}")
        )
            .prop_map(
                |(user, action, domain)| Payload::ContactChange(ContactChange {
                    user: user.into(),
                    action,
                    domain
                })
            ),
        Just(Payload::ContactsFetch(ContactsFetch {})),
        (ids16(), ids16(), ids16(), ids16(), any::<bool>()).prop_map(
            |(contacts, incoming, outgoing, blocked, invisible)| Payload::Contacts(Contacts {
                contacts,
                incoming,
                outgoing,
                blocked,
                invisible,
            })
        ),
    ]
}

fn ids16() -> impl Strategy<Value = Vec<minicbor::bytes::ByteArray<16>>> {
    proptest::collection::vec(bytes16().prop_map(Into::into), 0..6)
}

fn ids32() -> impl Strategy<Value = Vec<minicbor::bytes::ByteArray<32>>> {
    proptest::collection::vec(any::<[u8; 32]>().prop_map(Into::into), 0..6)
}

fn frame() -> impl Strategy<Value = Frame> {
    (
        any::<u128>(),
        any::<u128>(),
        any::<u64>(),
        any::<u64>(),
        proptest::option::of(any::<[u8; 32]>()),
        payload(),
    )
        .prop_map(|(conv, sender, seq, epoch, sig, payload)| Frame {
            routing: Routing {
                conversation: ConversationId(conv),
                sender: DeviceId(sender),
                seq,
                epoch,
            },
            signature: sig.map(|half| {
                let mut s = [0u8; 64];
                s[..32].copy_from_slice(&half);
                s[32..].copy_from_slice(&half);
                s
            }),
            payload,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_frame_round_trips(frame in frame()) {
        let bytes = frame.encode();
        let header = FrameHeader::parse(&bytes, PAYLOAD_BYTES_MAX).unwrap();
        prop_assert_eq!(header.opcode(), frame.opcode());
        prop_assert_eq!(header.payload_len() as usize, bytes.len() - HEADER_BYTES);
        let decoded = Frame::decode(&bytes, PAYLOAD_BYTES_MAX).unwrap();
        prop_assert_eq!(decoded, frame);
    }

    #[test]
    fn frames_survive_any_stream_split(frames in proptest::collection::vec(frame(), 1..6), cut in 1usize..300) {
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend_from_slice(&f.encode());
        }
        let mut decoder = FrameDecoder::new(PAYLOAD_BYTES_MAX);
        let mut out = Vec::new();
        for chunk in wire.chunks(cut) {
            decoder.push(chunk);
            while let Some(f) = decoder.next_frame().unwrap() {
                out.push(f);
            }
        }
        prop_assert_eq!(decoder.buffered(), 0);
        prop_assert_eq!(out, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = FrameHeader::parse(&data, PAYLOAD_BYTES_MAX);
        let _ = Frame::decode(&data, PAYLOAD_BYTES_MAX);
        for &op in Opcode::ALL {
            let _ = Payload::decode(op, &data);
        }
    }

    #[test]
    fn a_corrupted_header_never_panics(frame in frame(), at in 0usize..HEADER_BYTES, byte in any::<u8>()) {
        let mut bytes = frame.encode().to_vec();
        bytes[at] = byte;
        let _ = Frame::decode(&bytes, PAYLOAD_BYTES_MAX);
    }
}

fn valid_frame() -> Vec<u8> {
    Frame::new(
        Routing::default(),
        Payload::Heartbeat(Heartbeat {
            nonce: 1,
            crl_version: None,
            presence: None,
            peer_roots: None,
            peer_crls: None,
            contacts: None,
        }),
    )
    .encode()
    .to_vec()
}

#[test]
fn each_header_fault_has_its_own_error() {
    let good = valid_frame();
    assert!(matches!(
        Frame::decode(&good[..100], PAYLOAD_BYTES_MAX),
        Err(WireError::TruncatedHeader {
            got: 100,
            needed: 128
        })
    ));

    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(matches!(
        Frame::decode(&bad, PAYLOAD_BYTES_MAX),
        Err(WireError::BadMagic { .. })
    ));

    let mut bad = good.clone();
    bad[4] = 2;
    assert_eq!(
        Frame::decode(&bad, PAYLOAD_BYTES_MAX),
        Err(WireError::UnsupportedVersion {
            found: 2,
            supported: 1
        })
    );

    let mut bad = good.clone();
    bad[5] = 0x80;
    assert!(matches!(
        Frame::decode(&bad, PAYLOAD_BYTES_MAX),
        Err(WireError::UnknownFlags { found: 0x80, .. })
    ));

    let mut bad = good.clone();
    bad[15] = 1;
    assert_eq!(
        Frame::decode(&bad, PAYLOAD_BYTES_MAX),
        Err(WireError::ReservedNotZero { found: 1 })
    );

    let mut bad = good.clone();
    bad[6..8].copy_from_slice(&0x7777u16.to_be_bytes());
    assert_eq!(
        Frame::decode(&bad, PAYLOAD_BYTES_MAX),
        Err(WireError::UnknownOpcode { found: 0x7777 })
    );

    let mut bad = good.clone();
    bad[8..12].copy_from_slice(&(PAYLOAD_BYTES_MAX + 1).to_be_bytes());
    assert!(matches!(
        Frame::decode(&bad, PAYLOAD_BYTES_MAX),
        Err(WireError::PayloadTooLarge { .. })
    ));

    let mut bad = good.clone();
    bad.pop();
    assert!(matches!(
        Frame::decode(&bad, PAYLOAD_BYTES_MAX),
        Err(WireError::TruncatedPayload { .. })
    ));

    let mut bad = good.clone();
    bad.push(0);
    assert_eq!(
        Frame::decode(&bad, PAYLOAD_BYTES_MAX),
        Err(WireError::TrailingBytes { extra: 1 })
    );
}

#[test]
fn a_connection_limit_below_the_protocol_limit_is_enforced() {
    let frame = Frame::new(
        Routing::default(),
        Payload::Send(Send {
            msg_id: [1; 16],
            body: vec![0; 2000],
            welcome: None,
            after: Some([0; 16]),
        }),
    )
    .encode();
    assert!(matches!(
        Frame::decode(&frame, 1024),
        Err(WireError::PayloadTooLarge { max: 1024, .. })
    ));
    assert!(Frame::decode(&frame, 4096).is_ok());
}

#[test]
fn reserved_opcodes_parse_as_headers_but_have_no_payload_yet() {
    let mut bytes = valid_frame();
    bytes[6..8].copy_from_slice(&Opcode::ExternalProposal.to_u16().to_be_bytes());
    assert!(FrameHeader::parse(&bytes, PAYLOAD_BYTES_MAX).is_ok());
    assert_eq!(
        Frame::decode(&bytes, PAYLOAD_BYTES_MAX),
        Err(WireError::PayloadNotDefined(Opcode::ExternalProposal))
    );
}

#[test]
fn a_payload_for_the_wrong_opcode_is_malformed() {
    let mut bytes = Frame::new(
        Routing::default(),
        Payload::Send(Send {
            msg_id: [1; 16],
            body: vec![1],
            welcome: None,
            after: Some([0; 16]),
        }),
    )
    .encode()
    .to_vec();
    bytes[6..8].copy_from_slice(&Opcode::ReplayRequest.to_u16().to_be_bytes());
    assert!(matches!(
        Frame::decode(&bytes, PAYLOAD_BYTES_MAX),
        Err(WireError::MalformedPayload {
            opcode: Opcode::ReplayRequest,
            ..
        })
    ));
}

#[test]
fn too_many_cursors_are_refused() {
    let cursors = vec![
        Cursor {
            conversation: [0; 16],
            seq: 0,
            last: None,
            since: None,
            since_run: None,
            skipped: None,
        };
        CURSORS_LEN_MAX + 1
    ];
    let bytes = Frame::new(
        Routing::default(),
        Payload::Hello(Hello {
            cursors,
            device_key: [0; 32],
            resume_token: None,
            user: None,
            certificate: None,
            generation: None,
        }),
    )
    .encode();
    assert!(matches!(
        Frame::decode(&bytes, PAYLOAD_BYTES_MAX),
        Err(WireError::ListTooLong {
            field: "hello.cursors",
            ..
        })
    ));
}

#[test]
fn error_messages_say_what_to_do() {
    let e = WireError::UnsupportedVersion {
        found: 9,
        supported: 1,
    };
    assert_eq!(
        e.to_string(),
        "unsupported protocol version 9; this build speaks version 1: upgrade the older side"
    );
}

#[test]
fn too_many_fetched_users_are_refused() {
    let fetch = KeyPackageFetch {
        users: vec![[1u8; 16].into(); FETCH_USERS_MAX + 1],
        domain: None,
    };
    let bytes = Frame::new(Routing::default(), Payload::KeyPackageFetch(fetch)).encode();
    assert!(matches!(
        Frame::decode(&bytes, PAYLOAD_BYTES_MAX),
        Err(WireError::ListTooLong {
            field: "fetch.users",
            ..
        })
    ));
}

#[test]
fn bytes_after_the_cbor_item_of_a_payload_are_refused() {
    let payload = Payload::Ack(Ack {});
    let mut cbor = Vec::new();
    payload.encode(&mut cbor);
    assert!(Payload::decode(Opcode::Ack, &cbor).is_ok());
    cbor.push(0x00);
    let err = Payload::decode(Opcode::Ack, &cbor).unwrap_err();
    assert!(
        err.to_string().contains("1 bytes after the CBOR item"),
        "{err}"
    );
}

#[test]
fn a_byte_string_over_its_limit_is_counted_in_bytes() {
    let goodbye = Goodbye {
        code: 0,
        message: "x".repeat(MESSAGE_BYTES_MAX + 1),
        retry_after_ms: None,
    };
    let bytes = Frame::new(Routing::default(), Payload::Goodbye(goodbye)).encode();
    let err = Frame::decode(&bytes, PAYLOAD_BYTES_MAX).unwrap_err();
    assert!(matches!(
        err,
        WireError::BytesTooLong {
            field: "goodbye.message",
            ..
        }
    ));
    assert!(err.to_string().contains("bytes, more than"), "{err}");
}

#[test]
fn file_lists_over_their_limits_are_refused_on_decode() {
    let open = Payload::UploadOpen(UploadOpen {
        upload: [1; 16],
        chunks: vec![
            ListedChunkWire {
                id: [2; 32],
                len: 9
            };
            UPLOAD_CHUNKS_MAX + 1
        ],
    });
    let mut bytes = Vec::new();
    open.encode(&mut bytes);
    assert_eq!(
        Payload::decode(Opcode::UploadOpen, &bytes),
        Err(WireError::ListTooLong {
            field: "upload_open.chunks",
            len: UPLOAD_CHUNKS_MAX + 1,
            max: UPLOAD_CHUNKS_MAX,
        })
    );
    let request = Payload::ChunkRequest(ChunkRequest {
        upload: [1; 16],
        ids: vec![[3; 32].into(); CHUNK_REQUEST_IDS_MAX + 1],
    });
    let mut bytes = Vec::new();
    request.encode(&mut bytes);
    assert!(matches!(
        Payload::decode(Opcode::ChunkRequest, &bytes),
        Err(WireError::ListTooLong {
            field: "chunk_request.ids",
            ..
        })
    ));
    // The largest upload list still fits in one frame.
    let largest = Frame::new(
        Routing::default(),
        Payload::UploadOpen(UploadOpen {
            upload: [1; 16],
            chunks: vec![
                ListedChunkWire {
                    id: [2; 32],
                    len: u32::MAX
                };
                UPLOAD_CHUNKS_MAX
            ],
        }),
    );
    assert!(largest.encode().len() < PAYLOAD_BYTES_MAX as usize);
}

#[test]
fn a_chunk_head_must_announce_a_length_a_sealed_chunk_can_have() {
    let head = |len| ChunkHead {
        upload: [1; 16],
        id: [2; 32],
        len,
    };
    let max = sund_model::wire::files::sealed_chunk_bytes_max();
    assert!(head(1).check_len().is_ok());
    assert!(head(max).check_len().is_ok());
    assert!(head(0).check_len().is_err());
    assert!(head(max + 1).check_len().is_err());
}

#[test]
fn a_fetch_naming_a_domain_longer_than_dns_allows_is_refused() {
    let fetch = |len: usize| {
        Payload::KeyPackageFetch(KeyPackageFetch {
            users: vec![[1u8; 16].into()],
            domain: Some("a".repeat(len)),
        })
    };
    let decode = |payload: Payload| {
        let bytes = Frame::new(Routing::default(), payload).encode();
        Frame::decode(&bytes, PAYLOAD_BYTES_MAX).map(|f| f.payload)
    };
    assert!(decode(fetch(253)).is_ok());
    assert!(matches!(
        decode(fetch(254)),
        Err(WireError::BytesTooLong {
            field: "fetch.domain",
            ..
        })
    ));
}
