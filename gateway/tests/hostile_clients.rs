//! The real gateway driver against QUIC clients that do not play by the rules: connections that
//! never log in, streams Sund does not use, too many connections, a peer that stops reading.
//! Each bounds something an attacker could otherwise hold without limit.

mod common;

use std::time::Duration;

use common::{client, connect, gateway, logged_in};
use sund_gateway::driver::CONNECTIONS_PER_ADDRESS_MAX;
use sund_model::identity::DeviceKey;
use sund_model::ids::UserId;
use sund_model::testing::TestDevice;
use sund_model::wire::payload::Heartbeat;
use sund_model::wire::{Frame, Payload, Routing};
use sund_runtime::chunk_stream::CHUNK_STREAMS_MAX;

/// Waits at most `within` for the gateway to close `conn`; why it closed.
async fn closed_within(conn: &quinn::Connection, within: Duration) -> quinn::ConnectionError {
    tokio::time::timeout(within, conn.closed())
        .await
        .expect("the gateway should have closed the connection by now")
}

#[tokio::test]
async fn a_connection_that_never_opens_a_stream_is_closed_at_the_hello_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway(dir.path(), Duration::from_millis(500)).await;
    let conn = connect(&client(&gateway), gateway.addr).await;
    let why = closed_within(&conn, Duration::from_secs(5)).await;
    assert!(
        matches!(why, quinn::ConnectionError::ApplicationClosed(_)),
        "closed by the gateway, not by an idle timeout: {why:?}"
    );
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stream_that_never_says_hello_is_closed_at_the_hello_timeout_whatever_it_sends() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway(dir.path(), Duration::from_millis(500)).await;
    let conn = connect(&client(&gateway), gateway.addr).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    // Half a frame header, then nothing: the gateway must not wait for the rest forever.
    send.write_all(b"SUND\x01").await.unwrap();
    let why = closed_within(&conn, Duration::from_secs(5)).await;
    assert!(
        matches!(why, quinn::ConnectionError::ApplicationClosed(_)),
        "{why:?}"
    );
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn datagrams_get_no_credit_and_chunk_streams_only_a_few_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway(dir.path(), Duration::from_secs(10)).await;
    let conn = connect(&client(&gateway), gateway.addr).await;
    assert_eq!(
        conn.max_datagram_size(),
        None,
        "the gateway accepts no datagrams"
    );
    let mut held = Vec::new();
    for _ in 0..CHUNK_STREAMS_MAX {
        held.push(conn.open_uni().await.unwrap());
    }
    let uni = tokio::time::timeout(Duration::from_millis(500), conn.open_uni()).await;
    assert!(
        uni.is_err(),
        "chunk stream {} must wait for credit while {CHUNK_STREAMS_MAX} are open",
        CHUNK_STREAMS_MAX + 1
    );
    // Sund's own stream still opens: one bidirectional stream per connection.
    assert!(conn.open_bi().await.is_ok());
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn connections_beyond_the_limit_per_address_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway(dir.path(), Duration::from_secs(60)).await;
    let endpoint = client(&gateway);
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS_PER_ADDRESS_MAX {
        held.push(connect(&endpoint, gateway.addr).await);
    }
    let refused = endpoint
        .connect(gateway.addr, "sund-gateway")
        .unwrap()
        .await;
    assert!(
        refused.is_err(),
        "connection {} from one address must be refused",
        CONNECTIONS_PER_ADDRESS_MAX + 1
    );
    // One goes, one more may come.
    held.pop().unwrap().close(0u32.into(), b"done");
    tokio::time::sleep(Duration::from_millis(200)).await;
    held.push(connect(&endpoint, gateway.addr).await);
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_peer_that_stops_reading_is_disconnected_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway(dir.path(), Duration::from_secs(10)).await;
    let key = DeviceKey::from_seed([7; 32]);
    let device = TestDevice {
        user: UserId(key.device_id().0),
        key,
    };
    let (conn, mut send, _recv_never_read) = logged_in(&gateway, &device).await;
    // Every heartbeat gets an answer; the peer reads none of them, so the answers pile up in
    // front of it until the gateway gives up on it.
    let beat = Frame::new(
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
    .encode();
    let flood = async {
        loop {
            if send.write_all(&beat).await.is_err() {
                return;
            }
        }
    };
    let why = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::select! {
            () = flood => conn.closed().await,
            why = conn.closed() => why,
        }
    })
    .await
    .expect("a peer that reads nothing must be cut off, not served forever");
    // Closed, or (when its close could not get past the full window) forgotten, which the
    // peer learns from the stateless reset its next packet gets.
    assert!(
        matches!(
            why,
            quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::Reset
        ),
        "{why:?}"
    );
    gateway.shutdown().await.unwrap();
}
