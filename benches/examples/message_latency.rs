//! Message latency between two existing devices (set up with the `sund` CLI), for
//! `scripts/file-bench.sh`: device A sends `COUNT` messages at `RATE` per second into `CONV`
//! (a name as `sund send` takes it, e.g. `@bob`), each carrying its send time; device B takes
//! them as they arrive and the send-to-delivery times are printed as p50, p90, p99 and max.
//! Both devices run in this process, so their clocks are one clock. With `STOP_FILE` set, it
//! stops sending early once that file exists (a script touches it when what it measures beside
//! the messages is over) and reports on the messages sent until then. With `SLOW_MS` set, each
//! message slower than that is printed on stderr with its wall-clock send time.
//!
//! ```text
//! cargo run --release -p sund-benches --example message_latency DIR_A DIR_B CONV COUNT RATE [LABEL]
//! ```

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sund_model::node::{ConnectionStatus, NodeEvent};
use sund_node::device::Device;
use sund_node::driver as node_driver;

/// Bytes of each message (its first eight carry the send time).
const BODY: usize = 200;

fn usage() -> ! {
    eprintln!("usage: message_latency DIR_A DIR_B CONV COUNT RATE [LABEL]");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        usage();
    }
    let count: usize = args[3].parse().unwrap_or_else(|_| usage());
    let rate: f64 = args[4].parse().unwrap_or_else(|_| usage());
    let label = args.get(5).cloned().unwrap_or_else(|| "messages".into());
    let a = Device::load(args[0].as_ref()).expect("device A's data dir");
    let b = Device::load(args[1].as_ref()).expect("device B's data dir");
    let conversation = a.resolve_conversation(&args[2]);
    // This program takes every event as it comes: nothing needs holding until taken.
    let mut options = a.options();
    options.hold_until_taken = false;
    let mut sender_node = node_driver::start(options).await.expect("device A starts");
    let mut options = b.options();
    options.hold_until_taken = false;
    let mut receiver = node_driver::start(options).await.expect("device B starts");

    // Timed from when both are connected, so that no sample holds a connection set-up.
    for node in [&mut sender_node, &mut receiver] {
        loop {
            match tokio::time::timeout(Duration::from_secs(30), node.events.recv()).await {
                Ok(Some(NodeEvent::Status(ConnectionStatus::Connected))) => break,
                Ok(Some(_)) => {}
                _ => panic!("a device did not connect within 30 s"),
            }
        }
    }
    let origin = Instant::now();
    let wall_origin = std::time::SystemTime::now();
    // SLOW_MS: print each message slower than this, with its wall-clock send time.
    let slow_us: Option<u64> = std::env::var("SLOW_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| ms * 1000);
    let sender = sender_node.sender();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let stop_file = std::env::var_os("STOP_FILE").map(std::path::PathBuf::from);
    // How many were sent, and whether the sending is over.
    let sent = Arc::new(AtomicUsize::new(0));
    let sending_over = Arc::new(AtomicBool::new(false));
    let (sent_by_task, over_by_task) = (sent.clone(), sending_over.clone());
    let sending = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        for _ in 0..count {
            tick.tick().await;
            if stop_file.as_ref().is_some_and(|f| f.exists()) {
                break;
            }
            let mut body = (origin.elapsed().as_micros() as u64).to_be_bytes().to_vec();
            body.resize(BODY, b'x');
            let s = sender.clone();
            tokio::spawn(async move { s.send(conversation, Bytes::from(body)).await });
            sent_by_task.fetch_add(1, Ordering::SeqCst);
        }
        over_by_task.store(true, Ordering::SeqCst);
    });
    let draining = async { while sender_node.events.recv().await.is_some() {} };
    let mut samples: Vec<u64> = Vec::with_capacity(count);
    let measuring = async {
        let mut last_arrival = Instant::now();
        // Until the sending is over and every message sent has arrived.
        while !(sending_over.load(Ordering::SeqCst) && samples.len() >= sent.load(Ordering::SeqCst))
        {
            match tokio::time::timeout(Duration::from_millis(100), receiver.events.recv()).await {
                Ok(Some(NodeEvent::Delivered {
                    conversation: c,
                    body,
                    ..
                })) if c == conversation && body.len() == BODY => {
                    let sent = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
                    let took = origin.elapsed().as_micros() as u64 - sent;
                    if slow_us.is_some_and(|slow| took >= slow) {
                        // When, on the wall clock, so that a script can line it up with what
                        // else ran.
                        let at = wall_origin + Duration::from_micros(sent);
                        let at = at
                            .duration_since(std::time::UNIX_EPOCH)
                            .expect("after 1970");
                        eprintln!(
                            "slow: sent at {:.3} took {:.1} ms",
                            at.as_secs_f64(),
                            took as f64 / 1000.0
                        );
                    }
                    samples.push(took);
                    last_arrival = Instant::now();
                }
                Ok(Some(_)) => {}
                Ok(None) => panic!("device B stopped after {} messages", samples.len()),
                Err(_) if last_arrival.elapsed() > Duration::from_secs(120) => {
                    panic!("no message for 120 s after {}", samples.len())
                }
                Err(_) => {}
            }
        }
    };
    tokio::select! {
        _ = draining => panic!("device A stopped"),
        _ = measuring => {}
    }
    sending.await.expect("the sending task");
    let count = samples.len();
    assert!(count > 0, "no message was sent");
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    println!(
        "{label}: {count} at {rate}/s: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        at(0.50),
        at(0.90),
        at(0.99),
        at(1.0)
    );
}
