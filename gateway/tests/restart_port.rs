//! A gateway started again on its port right after the previous one stopped: the port may
//! still be held for a moment by the previous endpoint's socket (it closes as that endpoint's
//! last task ends), and the start waits for it instead of failing. A port another process
//! keeps is still refused, in words.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sund_gateway::driver::{self, GatewayOptions};
use sund_model::gateway::GatewayConfig;
use sund_runtime::environment::Production;

fn options(dir: &std::path::Path, listen: SocketAddr) -> GatewayOptions {
    GatewayOptions {
        listen,
        environment: Arc::new(Production),
        data_dir: dir.join("gw"),
        config: GatewayConfig {
            open_enrolment: true,
            ..GatewayConfig::default()
        },
        federation: None,
    }
}

#[tokio::test]
async fn a_start_waits_for_a_port_released_a_moment_later() {
    let tmp = tempfile::tempdir().unwrap();
    let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    // The previous incarnation's socket, closed 300 ms into the start.
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
    });
    let gateway = driver::start(options(tmp.path(), addr)).await.unwrap();
    assert_eq!(gateway.addr, addr);
    release.await.unwrap();
    // And the same again after a clean shutdown, at once.
    gateway.shutdown().await.unwrap();
    let gateway = driver::start(options(tmp.path(), addr)).await.unwrap();
    assert_eq!(gateway.addr, addr);
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_port_another_process_keeps_is_refused_in_words() {
    let tmp = tempfile::tempdir().unwrap();
    let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let error = match driver::start(options(tmp.path(), addr)).await {
        Ok(_) => panic!("started on a port another socket holds"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains(&format!("cannot bind UDP {addr}"))
            && error.contains("is another process using the port?"),
        "{error}"
    );
    drop(held);
}
