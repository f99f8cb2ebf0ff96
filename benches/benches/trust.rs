//! Session authentication at the gateway: checking a device certificate (decode, root
//! signature, domain, validity, CRL lookup), and a whole session opening through the gateway
//! state machine (hello with certificate, challenge, proof, HelloOk; no I/O, no commit).
//!
//! The figure that matters: session authentications per second at the gateway.

use std::collections::BTreeSet;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sund_model::gateway::{Gateway, GatewayConfig, GatewayInput, GatewayOutput};
use sund_model::identity::DeviceKey;
use sund_model::ids::{ConnectionId, UserId};
use sund_model::testing::{drain_gateway, TestDevice, TestEntropy as Counter};
use sund_model::time::Instant;
use sund_model::trust::{register_message, RegistrationAuthority};
use sund_model::wire::{Frame, Payload, PAYLOAD_BYTES_MAX};

const NOW: Instant = Instant(1_800_000_000_000_000);

/// An authority with `revoked` devices on its CRL and one valid certificate for `device`.
fn authority(revoked: usize, device: &DeviceKey) -> (RegistrationAuthority, Vec<u8>) {
    let mut writes = sund_model::env::WriteBatch::default();
    let mut ra = RegistrationAuthority::create("example.org", NOW, &mut Counter(1), &mut writes);
    let proof = device.sign(&register_message(&[0; 16], &device.public(), UserId(1)));
    let cert = ra
        .register(
            NOW,
            device.public(),
            UserId(1),
            [0; 16],
            &proof,
            true,
            &mut writes,
        )
        .unwrap();
    let mut victims = BTreeSet::new();
    for i in 0..revoked {
        let key = DeviceKey::from_seed((i as u64 + 10).to_le_bytes().repeat(4).try_into().unwrap());
        let proof = key.sign(&register_message(&[0; 16], &key.public(), UserId(2)));
        ra.register(
            NOW,
            key.public(),
            UserId(2),
            [0; 16],
            &proof,
            true,
            &mut writes,
        )
        .unwrap();
        victims.insert(key.device_id());
    }
    for v in victims {
        ra.revoke(NOW, v, &mut writes).unwrap();
    }
    (ra, cert.encode())
}

fn certificate_check(c: &mut Criterion) {
    let device = DeviceKey::from_seed([1; 32]);
    let mut group = c.benchmark_group("certificate_check");
    group.throughput(Throughput::Elements(1));
    for revoked in [0usize, 1_000] {
        let (ra, cert) = authority(revoked, &device);
        group.bench_function(format!("crl_{revoked}_revoked"), |b| {
            b.iter(|| black_box(ra.check(NOW, black_box(&cert), &device.public()).unwrap()))
        });
    }
    // Reference: one bare strict Ed25519 verification with the key already parsed.
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let verifying = key.verifying_key();
    use ed25519_dalek::Signer;
    let signature = key.sign(b"a certificate body of about ninety bytes, as signed by the root");
    group.bench_function("bare_ed25519_verify_strict", |b| {
        b.iter(|| {
            black_box(verifying.verify_strict(
                black_box(b"a certificate body of about ninety bytes, as signed by the root"),
                &signature,
            ))
        })
    });
    group.finish();
}

/// One session opening: accept, hello with certificate, challenge, proof, HelloOk, close.
fn session_open(c: &mut Criterion) {
    let config = GatewayConfig {
        open_enrolment: true,
        ..GatewayConfig::default()
    };
    let mut gateway = Gateway::new(config, NOW, Box::new(Counter(7)));
    let mut store = sund_model::env::MemStore::default();
    let key = DeviceKey::from_seed([3; 32]);
    let device = TestDevice {
        key: key.clone(),
        user: UserId(key.device_id().0),
    };
    // Register once.
    gateway.handle(NOW, GatewayInput::Accepted(ConnectionId(1)));
    gateway.handle(
        NOW,
        GatewayInput::Frame(ConnectionId(1), device.register([0; 16])),
    );
    let certificate = drain_gateway(&mut gateway, &mut store)
        .into_iter()
        .find_map(|out| match out {
            GatewayOutput::Send(_, bytes) => match Frame::decode(&bytes, PAYLOAD_BYTES_MAX) {
                Ok(Frame {
                    payload: Payload::Certificate(c),
                    ..
                }) => Some(Vec::from(c.certificate)),
                _ => None,
            },
            _ => None,
        })
        .expect("registered");
    gateway.handle(NOW, GatewayInput::Closed(ConnectionId(1)));
    let hello = device.hello(Some(certificate), vec![], None, None);
    let mut next = 2u64;
    let mut group = c.benchmark_group("session_open");
    group.throughput(Throughput::Elements(1));
    group.bench_function("hello_challenge_proof", |b| {
        b.iter(|| {
            let conn = ConnectionId(next);
            next += 1;
            gateway.handle(NOW, GatewayInput::Accepted(conn));
            gateway.handle(NOW, GatewayInput::Frame(conn, hello.clone()));
            let mut nonce = None;
            for out in drain_gateway(&mut gateway, &mut store) {
                if let GatewayOutput::Send(_, bytes) = out {
                    if let Ok(f) = Frame::decode(&bytes, PAYLOAD_BYTES_MAX) {
                        if let Payload::Challenge(ch) = f.payload {
                            nonce = Some(ch.nonce);
                        }
                    }
                }
            }
            gateway.handle(
                NOW,
                GatewayInput::Frame(conn, device.proof(&nonce.expect("a challenge"))),
            );
            while let Some(ready) = gateway.poll_ready() {
                black_box(ready.split());
            }
            gateway.handle(NOW, GatewayInput::Closed(conn));
        })
    });
    group.finish();
}

criterion_group!(benches, certificate_check, session_open);
criterion_main!(benches);
