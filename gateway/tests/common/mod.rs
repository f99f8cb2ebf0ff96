//! What the gateway's integration tests share: a gateway on loopback, raw QUIC clients, a
//! device logged in by hand.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sund_gateway::driver::{self, GatewayHandle, GatewayOptions};
use sund_model::gateway::GatewayConfig;
use sund_model::testing::TestDevice;
use sund_model::wire::{Frame, FrameDecoder, Payload, PAYLOAD_BYTES_MAX};
use sund_runtime::endpoint;
use sund_runtime::environment::Production;
use sund_runtime::tls::certificate_pin;

/// A gateway with open enrolment in `dir`.
pub async fn gateway(dir: &Path, hello_timeout: Duration) -> GatewayHandle {
    let options = GatewayOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        environment: Arc::new(Production),
        data_dir: dir.join("gw"),
        config: GatewayConfig {
            open_enrolment: true,
            hello_timeout,
            ..GatewayConfig::default()
        },
        federation: None,
    };
    driver::start(options).await.unwrap()
}

/// A QUIC client that pins `gateway`'s certificate.
pub fn client(gateway: &GatewayHandle) -> quinn::Endpoint {
    endpoint::client_endpoint(&Production, certificate_pin(&gateway.cert)).unwrap()
}

/// A new connection to `addr`.
pub async fn connect(endpoint: &quinn::Endpoint, addr: SocketAddr) -> quinn::Connection {
    endpoint
        .connect(addr, "sund-gateway")
        .unwrap()
        .await
        .unwrap()
}

/// Reads frames from a session stream.
pub struct Frames {
    decoder: FrameDecoder,
    pub recv: quinn::RecvStream,
}

impl Frames {
    pub fn new(recv: quinn::RecvStream) -> Frames {
        Frames {
            decoder: FrameDecoder::new(PAYLOAD_BYTES_MAX),
            recv,
        }
    }

    /// The next frame (panics after 10 s without one).
    pub async fn next(&mut self) -> Frame {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(frame) = self.decoder.next_frame_bytes().unwrap() {
                    return Frame::decode(&frame, PAYLOAD_BYTES_MAX).unwrap();
                }
                let chunk = self.recv.read_chunk(65536, true).await.unwrap().unwrap();
                self.decoder.push(&chunk.bytes);
            }
        })
        .await
        .expect("a frame within 10 s")
    }

    /// The next frame that is not a heartbeat answer or a KeyPackage count.
    pub async fn next_answer(&mut self) -> Payload {
        loop {
            let frame = self.next().await;
            match frame.payload {
                Payload::HeartbeatAck(_) | Payload::KeyPackageCount(_) | Payload::Crl(_) => {}
                other => return other,
            }
        }
    }
}

/// Registers `device` (open enrolment) and opens its session on a new connection; the
/// connection and its stream.
pub async fn logged_in(
    gateway: &GatewayHandle,
    device: &TestDevice,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let conn = connect(&client(gateway), gateway.addr).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut decoder = FrameDecoder::new(PAYLOAD_BYTES_MAX);
    let mut next = async |recv: &mut quinn::RecvStream| loop {
        if let Some(frame) = decoder.next_frame_bytes().unwrap() {
            return Frame::decode(&frame, PAYLOAD_BYTES_MAX).unwrap();
        }
        let chunk = recv.read_chunk(65536, true).await.unwrap().unwrap();
        decoder.push(&chunk.bytes);
    };
    send.write_all(&device.register([0; 16])).await.unwrap();
    let Payload::Certificate(certificate) = next(&mut recv).await.payload else {
        panic!("expected a certificate")
    };
    let hello = device.hello(Some(certificate.certificate.into()), vec![], None, None);
    send.write_all(&hello).await.unwrap();
    let Payload::Challenge(challenge) = next(&mut recv).await.payload else {
        panic!("expected a challenge")
    };
    send.write_all(&device.proof(&challenge.nonce))
        .await
        .unwrap();
    assert!(matches!(next(&mut recv).await.payload, Payload::HelloOk(_)));
    (conn, send, recv)
}
