//! Bare quinn on loopback, the baseline of the file transfer figures: `BYTES` (default 1 GiB)
//! written on one unidirectional stream in 1 MiB writes and read to the end, with Sund's
//! endpoint configuration (the same TLS, transport and socket set-up as the gateway's).
//!
//! ```text
//! cargo run --release -p sund-benches --example quinn_bulk [BYTES]
//! ```

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

use sund_runtime::endpoint;
use sund_runtime::environment::Production;
use sund_runtime::tls::{certificate_pin, TlsIdentity};

#[tokio::main]
async fn main() {
    let total: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("a byte count"))
        .unwrap_or(1 << 30);
    let dir = tempfile::tempdir().unwrap();
    // The TLS identity must live in a private directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let identity = TlsIdentity::load_or_create(dir.path()).unwrap();
    let server =
        endpoint::server_endpoint(&Production, "127.0.0.1:0".parse().unwrap(), &identity).unwrap();
    let addr: SocketAddr = server.local_addr().unwrap();
    let reader = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let mut recv = conn.accept_uni().await.unwrap();
        let mut got = 0u64;
        while let Some(chunk) = recv.read_chunk(1 << 20, true).await.unwrap() {
            got += chunk.bytes.len() as u64;
        }
        got
    });
    let client = endpoint::client_endpoint(&Production, certificate_pin(&identity.cert)).unwrap();
    let conn = client.connect(addr, "sund-gateway").unwrap().await.unwrap();
    let started = Instant::now();
    let mut send = conn.open_uni().await.unwrap();
    let block = vec![0x5au8; 1 << 20];
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(block.len() as u64) as usize;
        send.write_all(&block[..n]).await.unwrap();
        sent += n as u64;
    }
    send.finish().unwrap();
    let got = reader.await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(got, total);
    println!(
        "bare quinn, one stream: {} MiB in {secs:.2} s = {:.0} MiB/s",
        total >> 20,
        total as f64 / secs / f64::from(1 << 20)
    );
}
