//! The real stack on loopback: `sund-gateway`'s driver (quinn + redb, durable) and `sund-node`
//! drivers, 200-byte messages. Beside it, in the same run, bare quinn (pipelined 200-byte frames
//! with 8-byte acks) and bare redb (batched durable commits), so our rate can be read as a
//! fraction of each.
//!
//! Run: `cargo bench -p sund-benches --bench stack`. Prints a table; asserts nothing.
//! `SUND_STACK=ingest` runs only the gateway-alone measurement; `SUND_STACK=ops` the operations
//! figures instead (metrics endpoint on and off, drain with 100 devices, backup of a million
//! messages with and without live traffic); `SUND_STACK=flood` the abuse-control figures
//! (well-behaved devices while bots flood, with the default rate limits and without);
//! `SUND_STACK=relay` the federation figure of issue 15 (protocol clients sending through a
//! relay gateway to another domain's, against the same clients at a single gateway).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use std::sync::Arc;

use sund_gateway::driver::{self, GatewayHandle, GatewayOptions};
use sund_model::gateway::limits::RateLimits;
use sund_model::gateway::{AdminCommand, GatewayConfig};
use sund_model::identity::DeviceKey;
use sund_model::ids::ConversationId;
use sund_model::node::NodeEvent;
use sund_node::device::Device;
use sund_node::driver::{self as node_driver, NodeHandle};
use sund_runtime::endpoint;
use sund_runtime::environment::Production;
use sund_runtime::tls::{certificate_pin, TlsIdentity};

const BODY: usize = 200;
/// Messages a fresh pair carries before a latency run is timed (see `main`).
const WARM_UP: usize = 20_000;

struct Setup {
    _dir: tempfile::TempDir,
    gateway: GatewayHandle,
    nodes: Vec<NodeHandle>,
}

/// A gateway on loopback with open enrolment, its data in `dir/gw`, without rate limits (the
/// capacity figures push single devices far past what a person sends).
async fn start_gateway(dir: &std::path::Path) -> GatewayHandle {
    start_gateway_limited(
        dir,
        RateLimits {
            sends: None,
            conversations: None,
            ..RateLimits::default()
        },
    )
    .await
}

/// As `start_gateway`, with these rate limits, but none on registrations: every bench device
/// registers from loopback, one address.
async fn start_gateway_limited(dir: &std::path::Path, limits: RateLimits) -> GatewayHandle {
    let limits = RateLimits {
        registrations: None,
        ..limits
    };
    let options = GatewayOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        environment: Arc::new(Production),
        data_dir: dir.join("gw"),
        config: GatewayConfig {
            open_enrolment: true,
            limits,
            ..GatewayConfig::default()
        },
        federation: None,
    };
    driver::start(options).await.unwrap()
}

/// A gateway and `n` devices; device i is alone in conversation `solo-i`, and all are in `all`.
async fn setup(n: usize) -> Setup {
    let dir = private_tempdir();
    let gateway = start_gateway(dir.path()).await;
    let cert = dir.path().join("gw/tls/cert.der");
    let mut nodes = Vec::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let device = Device::init(
            &dir.path().join(format!("d{i}")),
            &gateway.addr.to_string(),
            &cert,
            None,
            None,
        )
        .unwrap();
        let id = device.key.device_id();
        ids.push(id);
        gateway
            .admin(AdminCommand::CreateConversation(
                ConversationId::from_name(&format!("solo-{i}")),
                vec![id],
            ))
            .await;
        // The benchmark's application takes each message as it arrives: it does not ask the
        // node to keep delivered messages until taken (the `sund` CLI does, at one more put
        // per delivered message and a delete when it is printed).
        let mut options = device.options();
        options.hold_until_taken = false;
        nodes.push(node_driver::start(options).await.unwrap());
    }
    gateway
        .admin(AdminCommand::CreateConversation(
            ConversationId::from_name("pair"),
            ids[..2.min(n)].to_vec(),
        ))
        .await;
    Setup {
        _dir: dir,
        gateway,
        nodes,
    }
}

/// Every node sends `per_node` messages to its own conversation, `concurrency` at a time; returns
/// messages per second until the last is both acknowledged and delivered.
async fn throughput(nodes: &mut [NodeHandle], per_node: usize, concurrency: usize) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let conv = ConversationId::from_name(&format!("solo-{i}"));
        for t in 0..concurrency {
            let sender = node.sender();
            let count = per_node / concurrency + usize::from(t < per_node % concurrency);
            tasks.push(tokio::spawn(async move {
                for _ in 0..count {
                    sender
                        .send(conv, Bytes::from(vec![b'x'; BODY]))
                        .await
                        .unwrap()
                        .unwrap();
                }
            }));
        }
    }
    let sending = async {
        for t in tasks {
            t.await.unwrap();
        }
    };
    // The application takes its events while it sends: a node stops reading from the gateway
    // while its application leaves events untaken.
    let counting = async {
        for node in nodes.iter_mut() {
            // Each node is the only member of its conversation: a message is done when it is
            // both acknowledged and delivered back (durably) to its sender.
            let (mut accepted, mut delivered) = (0, 0);
            while accepted < per_node || delivered < per_node {
                match tokio::time::timeout(Duration::from_secs(60), node.events.recv()).await {
                    Ok(Some(NodeEvent::Accepted { .. })) => accepted += 1,
                    Ok(Some(NodeEvent::Delivered { .. })) => delivered += 1,
                    Ok(Some(_)) => {}
                    _ => panic!(
                        "stopped at {accepted} acknowledged, {delivered} delivered of {per_node}"
                    ),
                }
            }
        }
    };
    tokio::join!(sending, counting);
    (nodes.len() * per_node) as f64 / started.elapsed().as_secs_f64()
}

/// Node 0 sends to node 1 at `rate` messages per second; returns (p50, p90, p99, max) of
/// send-to-delivery.
async fn latency(nodes: &mut [NodeHandle], rate: f64, count: usize) -> [Duration; 4] {
    let conv = ConversationId::from_name("pair");
    let origin = Instant::now();
    let sender = nodes[0].sender();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let send_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        for _ in 0..count {
            tick.tick().await;
            let stamp = origin.elapsed().as_micros() as u64;
            let mut body = stamp.to_be_bytes().to_vec();
            body.resize(BODY, b'x');
            let s = sender.clone();
            tokio::spawn(async move { s.send(conv, Bytes::from(body)).await.unwrap().unwrap() });
        }
    });
    let (first, rest) = nodes.split_at_mut(1);
    // The sender's application takes its own events too (acknowledgements, its echoes).
    let sender_events = &mut first[0].events;
    let draining = async { while sender_events.recv().await.is_some() {} };
    let mut samples = Vec::with_capacity(count);
    let measuring = async {
        while samples.len() < count {
            match tokio::time::timeout(Duration::from_secs(60), rest[0].events.recv()).await {
                Ok(Some(NodeEvent::Delivered {
                    conversation, body, ..
                })) if conversation == conv => {
                    let sent = u64::from_be_bytes(body[..8].try_into().unwrap());
                    samples.push(origin.elapsed().as_micros() as u64 - sent);
                }
                Ok(Some(_)) => {}
                _ => panic!("deliveries stopped at {}", samples.len()),
            }
        }
    };
    tokio::select! {
        _ = draining => unreachable!("the sender's events end only when it stops"),
        _ = measuring => {}
    }
    send_task.await.unwrap();
    if std::env::var_os("SUND_BENCH_SLOW").is_some() {
        // Where the slow deliveries fall in the run (by send order).
        let slow: Vec<usize> = (0..samples.len()).filter(|i| samples[*i] > 5_000).collect();
        eprintln!(
            "slow (>5 ms): {} of {}, at {:?}",
            slow.len(),
            samples.len(),
            slow.iter().step_by(10).collect::<Vec<_>>()
        );
    }
    samples.sort_unstable();
    let at = |q: f64| Duration::from_micros(samples[((samples.len() - 1) as f64 * q) as usize]);
    [at(0.50), at(0.90), at(0.99), at(1.0)]
}

/// A temporary directory only its owner may enter: the gateway and devices refuse data
/// directories other users can read (they hold secret keys).
fn private_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// Bare redb: `batches` durable commits of `per_batch` 200-byte inserts.
fn bare_redb(batches: usize, per_batch: usize) -> f64 {
    let dir = private_tempdir();
    let db = redb::Database::create(dir.path().join("bare.redb")).unwrap();
    let table: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("t");
    let value = vec![b'x'; BODY];
    let started = Instant::now();
    let mut key = 0u64;
    for _ in 0..batches {
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(table).unwrap();
            for _ in 0..per_batch {
                key += 1;
                t.insert(key.to_be_bytes().as_slice(), value.as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
    }
    (batches * per_batch) as f64 / started.elapsed().as_secs_f64()
}

/// Bare redb: the latency of `count` durable single-insert commits (the floor under any hop that
/// must be durable before it answers); returns (p50, p90, p99, max).
fn bare_redb_commit_latency(count: usize) -> [Duration; 4] {
    let dir = private_tempdir();
    let db = redb::Database::create(dir.path().join("bare.redb")).unwrap();
    let table: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("t");
    let value = vec![b'x'; BODY];
    let mut samples = Vec::with_capacity(count);
    for key in 0..count as u64 {
        let started = Instant::now();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(table).unwrap();
            t.insert(key.to_be_bytes().as_slice(), value.as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
        samples.push(started.elapsed());
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    [at(0.50), at(0.90), at(0.99), at(1.0)]
}

/// Bare quinn: one stream, 200-byte frames pipelined, an 8-byte ack per frame.
/// Bare quinn on loopback: `frames` 200-byte frames, each answered with an 8-byte ack. With
/// `coalesce`, the sender hands quinn every frame it has in one gathered write of up to 256
/// (as Sund's session writer does); without, one `write_all` per frame.
async fn bare_quinn(frames: usize, coalesce: bool) -> f64 {
    let dir = private_tempdir();
    let identity = TlsIdentity::load_or_create(dir.path()).unwrap();
    let server =
        endpoint::server_endpoint(&Production, "127.0.0.1:0".parse().unwrap(), &identity).unwrap();
    let addr: SocketAddr = server.local_addr().unwrap();
    tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let mut buf = vec![0u8; BODY];
        let mut n = 0u64;
        while recv.read_exact(&mut buf).await.is_ok() {
            n += 1;
            if send.write_all(&n.to_be_bytes()).await.is_err() {
                break;
            }
        }
    });
    let client = endpoint::client_endpoint(&Production, certificate_pin(&identity.cert)).unwrap();
    let conn = client.connect(addr, "sund-gateway").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let frame = Bytes::from(vec![b'x'; BODY]);
        if coalesce {
            let mut left = frames;
            while left > 0 {
                let n = left.min(256);
                let mut batch = vec![frame.clone(); n];
                send.write_all_chunks(&mut batch).await.unwrap();
                left -= n;
            }
        } else {
            for _ in 0..frames {
                send.write_all(&frame).await.unwrap();
            }
        }
        send
    });
    let mut ack = [0u8; 8];
    for _ in 0..frames {
        recv.read_exact(&mut ack).await.unwrap();
    }
    let rate = frames as f64 / started.elapsed().as_secs_f64();
    drop(writer.await.unwrap());
    rate
}

/// Whole frames from a QUIC stream (the load client's reader).
struct FrameReader {
    stream: quinn::RecvStream,
    decoder: sund_model::wire::FrameDecoder,
}

impl FrameReader {
    fn new(stream: quinn::RecvStream) -> FrameReader {
        FrameReader {
            stream,
            decoder: sund_model::wire::FrameDecoder::new(sund_model::wire::PAYLOAD_BYTES_MAX),
        }
    }

    async fn next(&mut self) -> Result<Bytes, ()> {
        loop {
            if let Some(frame) = self.decoder.next_frame_bytes().map_err(|_| ())? {
                return Ok(frame);
            }
            match self.stream.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => self.decoder.push(&chunk.bytes),
                _ => return Err(()),
            }
        }
    }
}

/// A protocol client's session (no store): registers (the gateway runs open enrolment), then
/// opens the session with its certificate.
async fn open_session(
    addr: SocketAddr,
    cert: rustls::pki_types::CertificateDer<'static>,
    key: DeviceKey,
) -> (
    quinn::Connection,
    quinn::SendStream,
    FrameReader,
    sund_model::ids::DeviceId,
) {
    use sund_model::testing::TestDevice;
    use sund_model::wire::{Frame, Payload};
    let endpoint = endpoint::client_endpoint(&Production, certificate_pin(&cert)).unwrap();
    let conn = endpoint
        .connect(addr, "sund-gateway")
        .unwrap()
        .await
        .unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut reader = FrameReader::new(recv);
    let me = key.device_id();
    let device = TestDevice {
        key,
        user: sund_model::ids::UserId(me.0),
    };
    send.write_all(&device.register([0; 16])).await.unwrap();
    let answer = Frame::decode(&reader.next().await.unwrap(), u32::MAX).unwrap();
    let Payload::Certificate(certificate) = answer.payload else {
        panic!("expected a certificate: {:?}", answer.payload)
    };
    let hello = device.hello(Some(certificate.certificate.into()), vec![], None, None);
    send.write_all(&hello).await.unwrap();
    let challenge = Frame::decode(&reader.next().await.unwrap(), u32::MAX).unwrap();
    let Payload::Challenge(c) = challenge.payload else {
        panic!("expected a challenge")
    };
    send.write_all(&device.proof(&c.nonce)).await.unwrap();
    let ok = Frame::decode(&reader.next().await.unwrap(), u32::MAX).unwrap();
    assert!(matches!(ok.payload, Payload::HelloOk(_)));
    (conn, send, reader, me)
}

/// What one client of the flood figures saw.
#[derive(Default)]
struct FloodClient {
    /// Messages the gateway acknowledged.
    acknowledged: u64,
    /// Messages refused by a rate limit.
    refused: u64,
    /// Send-to-acknowledgement of each acknowledged message.
    latencies: Vec<Duration>,
    /// The gateway closed the connection (it stopped reading what it was sent).
    cut_off: bool,
    /// A write was still held back by flow control when the run ended (the gateway paused
    /// reading this client).
    held: bool,
}

/// A protocol client that sends into `conv` for `length`: paced at `rate` messages a second
/// (a well-behaved device, each message chained after the one before), or (`rate` `None`) as
/// fast as the stream takes them, unchained so that no refusal stops the next, and resending
/// nothing it is refused (a bot).
async fn flood_client(
    addr: SocketAddr,
    cert: rustls::pki_types::CertificateDer<'static>,
    key: DeviceKey,
    conv: ConversationId,
    rate: Option<f64>,
    length: Duration,
) -> FloodClient {
    use sund_model::wire::payload::ErrorCode;
    use sund_model::wire::{Frame, Payload};
    let (conn, mut send, mut reader, me) = open_session(addr, cert, key).await;
    let sent_at: Arc<std::sync::Mutex<BTreeMap<u64, Instant>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reading = {
        let (sent_at, done) = (sent_at.clone(), done.clone());
        tokio::spawn(async move {
            let mut seen = FloodClient::default();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let bytes =
                    match tokio::time::timeout(Duration::from_millis(200), reader.next()).await {
                        Ok(Ok(bytes)) => bytes,
                        // The stream ended (the gateway cut this client off): nothing more
                        // comes, and asking again at once would spin.
                        Ok(Err(())) => break,
                        Err(_) => continue,
                    };
                let frame = Frame::decode(&bytes, u32::MAX).unwrap();
                match frame.payload {
                    Payload::SendAck(ack) => {
                        let n = u64::from_be_bytes(ack.msg_id[..8].try_into().unwrap());
                        if let Some(at) = sent_at.lock().unwrap().remove(&n) {
                            seen.latencies.push(at.elapsed());
                            seen.acknowledged += 1;
                        }
                    }
                    Payload::Error(e) if ErrorCode::from_u16(e.code) == ErrorCode::SendsLimited => {
                        seen.refused += 1;
                    }
                    _ => {}
                }
            }
            seen
        })
    };
    let started = Instant::now();
    let mut n = 0u64;
    let mut previous = [0u8; 16];
    let mut cut_off = false;
    let mut held = false;
    while started.elapsed() < length {
        n += 1;
        if let Some(rate) = rate {
            let due = started + Duration::from_secs_f64(n as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let mut msg_id = [0u8; 16];
        msg_id[..8].copy_from_slice(&n.to_be_bytes());
        msg_id[8..].copy_from_slice(&me.0.to_be_bytes()[..8]);
        let after = rate.is_some().then_some(previous);
        previous = msg_id;
        let frame = send_frame(conv, me, msg_id, after);
        sent_at.lock().unwrap().insert(n, Instant::now());
        let left = length.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, send.write_all(&frame.encode())).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                // The gateway cut this client off (a bot that does not read what it is sent).
                cut_off = true;
                break;
            }
            Err(_) => {
                // Held back by flow control to the end (the gateway stopped reading it).
                held = true;
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = reading.await.unwrap();
    seen.cut_off = cut_off;
    seen.held = held;
    conn.close(0u32.into(), b"done");
    seen
}

/// A `Send` of a 200-byte body from `me` into `conv`.
fn send_frame(
    conv: ConversationId,
    me: sund_model::ids::DeviceId,
    msg_id: [u8; 16],
    after: Option<[u8; 16]>,
) -> sund_model::wire::Frame {
    use sund_model::wire::payload::Send;
    use sund_model::wire::{Frame, Payload, Routing};
    Frame::new(
        Routing {
            conversation: conv,
            sender: me,
            ..Routing::default()
        },
        Payload::Send(Send {
            msg_id,
            body: vec![b'x'; BODY],
            welcome: None,
            after,
        }),
    )
}

/// One flood round's figures.
struct FloodRound {
    /// What the well-behaved got acknowledged, per second.
    ordinary: f64,
    /// Their p99 send-to-acknowledgement.
    ordinary_p99: Duration,
    /// What the bots got acknowledged, per second.
    bots: f64,
    /// Bot messages refused by the limit.
    refused: u64,
    /// Connections the gateway cut off: well-behaved, bots.
    cut_off: [u32; 2],
    /// Clients held back by flow control at the end: well-behaved, bots.
    held: [u32; 2],
}

/// Well-behaved clients (`ordinary`, each at `rate` messages a second, in conversations of
/// their own) for `length`, with `bots` flooding clients beside them, against a gateway with
/// `limits`.
async fn flood_round(
    ordinary: usize,
    rate: f64,
    bots: usize,
    limits: RateLimits,
    length: Duration,
) -> FloodRound {
    let dir = private_tempdir();
    let gateway = start_gateway_limited(dir.path(), limits).await;
    let conversations = load_conversations(&gateway, ordinary + bots, false).await;
    let tasks: Vec<_> = conversations
        .iter()
        .enumerate()
        .map(|(i, (k, conv))| {
            let rate = (i < ordinary).then_some(rate);
            tokio::spawn(flood_client(
                gateway.addr,
                gateway.cert.clone(),
                k.clone(),
                *conv,
                rate,
                length,
            ))
        })
        .collect();
    let mut good = FloodClient::default();
    let mut bad = FloodClient::default();
    let mut cut_off = [0u32; 2];
    let mut held = [0u32; 2];
    for (i, t) in tasks.into_iter().enumerate() {
        let seen = t.await.unwrap();
        let bot = i >= ordinary;
        let into = if bot { &mut bad } else { &mut good };
        into.acknowledged += seen.acknowledged;
        into.refused += seen.refused;
        into.latencies.extend(seen.latencies);
        cut_off[usize::from(bot)] += u32::from(seen.cut_off);
        held[usize::from(bot)] += u32::from(seen.held);
    }
    gateway.shutdown().await.unwrap();
    good.latencies.sort();
    let secs = length.as_secs_f64();
    FloodRound {
        ordinary: good.acknowledged as f64 / secs,
        ordinary_p99: good
            .latencies
            .get(good.latencies.len() * 99 / 100)
            .copied()
            .unwrap_or_default(),
        bots: bad.acknowledged as f64 / secs,
        refused: bad.refused,
        cut_off,
        held,
    }
}

/// The abuse-control figures of issue 19: what well-behaved devices get while bots flood, with
/// the default limits and without any (printed; asserts nothing). `SUND_FLOOD_SECS` sets the
/// length of each run (default 10).
async fn floods() {
    let secs = std::env::var("SUND_FLOOD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let (ordinary, rate, bots, length) = (100, 20.0, 10, Duration::from_secs(secs));
    let off = RateLimits {
        sends: None,
        conversations: None,
        ..RateLimits::default()
    };
    for round in 1..=5 {
        let quiet = flood_round(ordinary, rate, 0, RateLimits::default(), length).await;
        let limited = flood_round(ordinary, rate, bots, RateLimits::default(), length).await;
        let open = flood_round(ordinary, rate, bots, off, length).await;
        let show = |r: &FloodRound| {
            format!(
                "{:.0} msg/s = {:.1} % (p99 {:.1?}; bots got {:.0} msg/s, {} refused, cut off: {} bots, {} others; held back by flow control at the end: {} bots, {} others)",
                r.ordinary,
                100.0 * r.ordinary / quiet.ordinary,
                r.ordinary_p99,
                r.bots,
                r.refused,
                r.cut_off[1],
                r.cut_off[0],
                r.held[1],
                r.held[0]
            )
        };
        println!(
            "round {round}: {ordinary} devices at {rate}/s alone: {:.0} msg/s (p99 {:.1?}); with {bots} bots, default limits: {}; no limits: {}",
            quiet.ordinary,
            quiet.ordinary_p99,
            show(&limited),
            show(&open)
        );
    }
}

/// A minimal protocol client (no store): authenticates, pipelines `count` Send frames, acks its
/// echoes, and returns when every Send is acknowledged. It measures the gateway alone, as 100
/// real devices (each with its own disk) would load it.
async fn load_client(
    addr: SocketAddr,
    cert: rustls::pki_types::CertificateDer<'static>,
    key: DeviceKey,
    conv: ConversationId,
    count: usize,
) {
    use sund_model::wire::payload::Ack;
    use sund_model::wire::{Frame, Payload, Routing};
    let (conn, mut send, mut reader, me) = open_session(addr, cert, key).await;
    // Reader: count acknowledgements, ask the writer to ack echoes.
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let reading = tokio::spawn(async move {
        let mut acked = 0;
        while acked < count {
            let frame = Frame::decode(&reader.next().await.unwrap(), u32::MAX).unwrap();
            match frame.payload {
                Payload::SendAck(_) => acked += 1,
                Payload::Deliver(_) => {
                    let _ = ack_tx.send(frame.routing.seq);
                }
                _ => {}
            }
        }
    });
    let mut last_ack = 0;
    let mut after = [0u8; 16];
    for i in 0..count {
        let mut msg_id = [0u8; 16];
        msg_id[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
        let frame = send_frame(conv, me, msg_id, Some(after));
        after = msg_id;
        send.write_all(&frame.encode()).await.unwrap();
        while let Ok(seq) = ack_rx.try_recv() {
            last_ack = last_ack.max(seq);
        }
        if last_ack > 0 && i % 32 == 0 {
            let ack = Frame::new(
                Routing {
                    conversation: conv,
                    seq: last_ack,
                    ..Routing::default()
                },
                Payload::Ack(Ack {}),
            );
            send.write_all(&ack.encode()).await.unwrap();
        }
    }
    reading.await.unwrap();
    conn.close(0u32.into(), b"done");
}

/// The gateway driver alone under `clients` protocol clients sending `per_client` messages each.
async fn gateway_ingest(clients: usize, per_client: usize) -> f64 {
    let dir = private_tempdir();
    let gateway = start_gateway(dir.path()).await;
    let conversations = load_conversations(&gateway, clients, false).await;
    let rate = ingest(&gateway, &conversations, per_client).await;
    gateway.shutdown().await.unwrap();
    rate
}

/// One conversation per load client; with `retained`, each also holds a member that never
/// connects, so the gateway keeps every message (nothing is acknowledged by all members).
async fn load_conversations(
    gateway: &GatewayHandle,
    clients: usize,
    retained: bool,
) -> Vec<(DeviceKey, ConversationId)> {
    let silent = DeviceKey::from_seed([0xee; 32]).device_id();
    let mut out = Vec::new();
    for i in 0..clients {
        let key = DeviceKey::from_seed([i as u8 + 1; 32]);
        let conv = ConversationId::from_name(&format!("load-{i}"));
        let mut members = vec![key.device_id()];
        if retained {
            members.push(silent);
        }
        gateway
            .admin(AdminCommand::CreateConversation(conv, members))
            .await;
        out.push((key, conv));
    }
    out
}

/// Every client sends `per_client` messages; the rate over all of them.
async fn ingest(
    gateway: &GatewayHandle,
    conversations: &[(DeviceKey, ConversationId)],
    per_client: usize,
) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = conversations
        .iter()
        .map(|(k, conv)| {
            tokio::spawn(load_client(
                gateway.addr,
                gateway.cert.clone(),
                k.clone(),
                *conv,
                per_client,
            ))
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (conversations.len() * per_client) as f64 / started.elapsed().as_secs_f64()
}

/// Gateway alone with its metrics endpoint served and scraped every `every` (as Prometheus
/// would, only more often), against the same without an endpoint.
async fn ingest_with_metrics(clients: usize, per_client: usize, every: Option<Duration>) -> f64 {
    let dir = private_tempdir();
    let gateway = start_gateway(dir.path()).await;
    let conversations = load_conversations(&gateway, clients, false).await;
    let scraper = match every {
        Some(every) => {
            let endpoint = sund_gateway::metrics::listen(
                "127.0.0.1:0".parse().unwrap(),
                gateway.admin_client(),
                gateway.stage_histograms(),
            )
            .await
            .unwrap();
            let addr = endpoint.addr;
            let task = tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                loop {
                    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                    stream
                        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                        .await
                        .unwrap();
                    let mut text = Vec::new();
                    stream.read_to_end(&mut text).await.unwrap();
                    assert!(text.starts_with(b"HTTP/1.1 200"));
                    tokio::time::sleep(every).await;
                }
            });
            Some((endpoint, task))
        }
        None => None,
    };
    let rate = ingest(&gateway, &conversations, per_client).await;
    if let Some((endpoint, task)) = scraper {
        task.abort();
        drop(endpoint);
    }
    gateway.shutdown().await.unwrap();
    rate
}

/// The operations figures of issue 18 (printed; asserts nothing).
async fn operations() {
    // Metrics endpoint off and on, alternating, same gateway-alone load.
    for round in 1..=5 {
        let off = ingest_with_metrics(100, 1_000, None).await;
        let on = ingest_with_metrics(100, 1_000, Some(Duration::from_millis(250))).await;
        println!(
            "metrics round {round}: off {off:.0} msg/s, on (scraped every 250 ms) {on:.0} msg/s ({:+.1} %)",
            100.0 * (on - off) / off
        );
    }
    // Drain: from the signal to a stopped gateway with 100 devices connected.
    for round in 1..=3 {
        let hundred = setup(100).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let sessions = hundred
            .gateway
            .admin_client()
            .inspect(|g, _| g.session_count())
            .await
            .unwrap_or(0);
        let started = Instant::now();
        hundred.gateway.shutdown().await.unwrap();
        println!(
            "drain round {round}: {sessions} sessions open, SIGTERM-equivalent to stopped in {:.0?}",
            started.elapsed()
        );
        for node in hundred.nodes {
            let _ = node.stop().await;
        }
    }
    // Backup of a gateway holding a million messages: idle, then under live traffic.
    let dir = private_tempdir();
    let gateway = start_gateway(dir.path()).await;
    let conversations = load_conversations(&gateway, 100, true).await;
    let fill = ingest(&gateway, &conversations, 10_000).await;
    let retained: u64 = gateway
        .admin_client()
        .inspect(|g, _| g.conversations().map(|l| l.retained() as u64).sum())
        .await
        .unwrap();
    println!("backup: filled {retained} retained messages at {fill:.0} msg/s");
    let data_dir = dir.path().join("gw");
    for round in 1..=3 {
        let dest = dir.path().join(format!("idle-{round}.backup"));
        let took = timed_backup(gateway.admin_client(), data_dir.clone(), dest.clone()).await;
        let size = std::fs::metadata(&dest).unwrap().len();
        std::fs::remove_file(&dest).unwrap();
        println!(
            "backup round {round}, idle: {took:.1?} for {:.0} MiB",
            size as f64 / (1 << 20) as f64
        );
    }
    for round in 1..=3 {
        // The same rounds of 100 messages per client (each round connects anew) for 3 s
        // without a backup, then while one runs.
        let started = Instant::now();
        let mut sent = 0usize;
        while started.elapsed() < Duration::from_secs(3) {
            ingest(&gateway, &conversations, 100).await;
            sent += conversations.len() * 100;
        }
        let alone = sent as f64 / started.elapsed().as_secs_f64();
        let dest = dir.path().join(format!("live-{round}.backup"));
        let backup = tokio::spawn(timed_backup(
            gateway.admin_client(),
            data_dir.clone(),
            dest.clone(),
        ));
        // Live traffic for as long as the backup runs.
        let started = Instant::now();
        let mut sent = 0usize;
        while !backup.is_finished() {
            ingest(&gateway, &conversations, 100).await;
            sent += conversations.len() * 100;
        }
        let during = sent as f64 / started.elapsed().as_secs_f64();
        let took = backup.await.unwrap();
        std::fs::remove_file(&dest).unwrap();
        println!(
            "backup round {round}, under load: {took:.1?}; live traffic {during:.0} msg/s during it against {alone:.0} msg/s just before"
        );
    }
    gateway.shutdown().await.unwrap();
}

/// One backup as `admin backup` takes it (on a low-priority thread), timed.
async fn timed_backup(
    admin: sund_gateway::driver::AdminClient,
    data_dir: std::path::PathBuf,
    dest: std::path::PathBuf,
) -> Duration {
    let reader = admin.reader().await.unwrap();
    let started = Instant::now();
    sund_runtime::background::run("sund-backup", move || {
        sund_gateway::backup::backup(&reader, &data_dir, &dest).unwrap()
    })
    .await
    .unwrap();
    started.elapsed()
}

/// A gateway of `domain` on loopback (open enrolment, no rate limits), its data in
/// `dir/name`, federating with `peer` (its domain, root fingerprint and link address) on
/// `link` if given.
async fn start_federated(
    dir: &std::path::Path,
    name: &str,
    domain: &str,
    link: SocketAddr,
    peer: Option<(&str, String, SocketAddr)>,
) -> GatewayHandle {
    use sund_gateway::federation::FederationOptions;
    use sund_model::federation::handshake::PeerConfig;
    let mut config = GatewayConfig {
        domain: domain.to_string(),
        open_enrolment: true,
        limits: RateLimits {
            sends: None,
            conversations: None,
            registrations: None,
            peer_relays: None,
            ..RateLimits::default()
        },
        ..GatewayConfig::default()
    };
    let federation = peer.map(|(domain, root_fingerprint, address)| {
        config.federation_peers.push(PeerConfig {
            domain: domain.to_string(),
            root_fingerprint,
        });
        FederationOptions {
            listen: link,
            peers: BTreeMap::from([(domain.to_string(), address.to_string())]),
        }
    });
    let options = GatewayOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        environment: Arc::new(Production),
        data_dir: dir.join(name),
        config,
        federation,
    };
    driver::start(options).await.unwrap()
}

fn free_udp_addr() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .unwrap()
}

async fn root_fingerprint(gateway: &GatewayHandle) -> String {
    gateway
        .admin_client()
        .inspect(|g, _| g.trust_root().fingerprint())
        .await
        .unwrap()
}

/// Issue 15's relay figure, one round: `clients` protocol clients each send `per_client`
/// messages (pipelined, as in the gateway-alone figure) into a conversation of their own
/// with one more member that never connects (so both gateways keep every message).
/// **Single**: the clients are devices of a.example, their conversations homed there.
/// **Relayed**: the clients are devices of b.example, their conversations homed at a.example:
/// b.example relays each message over the federation link, a.example sequences it and answers
/// through b.example, and sends it back over the link to b.example's copy, from which the
/// client gets its echo. Both in the same run, on the same two gateways; returns (single,
/// relayed) in messages per second.
async fn relay_round(clients: usize, per_client: usize) -> (f64, f64) {
    let dir = private_tempdir();
    let (a_link, b_link) = (free_udp_addr(), free_udp_addr());
    // First starts, to read each root's fingerprint as the operators would.
    let a = start_federated(dir.path(), "a", "a.example", a_link, None).await;
    let b = start_federated(dir.path(), "b", "b.example", b_link, None).await;
    let (fa, fb) = (root_fingerprint(&a).await, root_fingerprint(&b).await);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    let a = start_federated(
        dir.path(),
        "a",
        "a.example",
        a_link,
        Some(("b.example", fb, b_link)),
    )
    .await;
    let b = start_federated(
        dir.path(),
        "b",
        "b.example",
        b_link,
        Some(("a.example", fa, a_link)),
    )
    .await;
    let up = |g: &GatewayHandle, peer: &'static str| {
        let admin = g.admin_client();
        async move {
            admin
                .inspect(move |g, _| g.federation().is_some_and(|f| f.is_up(peer)))
                .await
                .unwrap_or(false)
        }
    };
    while !(up(&a, "b.example").await && up(&b, "a.example").await) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let single = load_conversations(&a, clients, true).await;
    let single_rate = ingest(&a, &single, per_client).await;

    let silent = DeviceKey::from_seed([0xee; 32]).device_id();
    let mut relayed = Vec::new();
    for i in 0..clients {
        let key = DeviceKey::from_seed([0x80 + i as u8; 32]);
        let conv = ConversationId::from_name(&format!("relayed-{i}"));
        a.admin(AdminCommand::CreateConversation(conv, vec![silent]))
            .await;
        a.admin(AdminCommand::ShareConversation {
            conversation: conv,
            domain: "b.example".into(),
            members: vec![key.device_id()],
        })
        .await;
        relayed.push((key, conv));
    }
    // b.example keeps a copy of each before the clients send.
    let convs: Vec<ConversationId> = relayed.iter().map(|(_, c)| *c).collect();
    loop {
        let convs = convs.clone();
        let ready = b
            .admin_client()
            .inspect(move |g, _| convs.iter().all(|c| g.replica_of(*c) == Some("a.example")))
            .await
            .unwrap_or(false);
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let relayed_rate = ingest(&b, &relayed, per_client).await;
    let a = a.shutdown().await.unwrap().outgoing;
    let b = b.shutdown().await.unwrap().outgoing;
    println!(
        "  link entries: a.example {} carrying {} entries ({} signatures), b.example {} carrying {}",
        a.link_entries, a.entries, a.signatures, b.link_entries, b.entries
    );
    (single_rate, relayed_rate)
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    if std::env::var("SUND_STACK").as_deref() == Ok("relay") {
        for round in 1..=5 {
            let (single, relayed) = runtime.block_on(relay_round(100, 500));
            println!(
                "round {round}: single gateway {single:.0} msg/s, through a relay {relayed:.0} msg/s ({:.0} %)",
                100.0 * relayed / single
            );
        }
        return;
    }
    // `SUND_STACK=ingest` runs the gateway-alone measurement only (for profiling).
    if std::env::var("SUND_STACK").as_deref() == Ok("ingest") {
        let rate = runtime.block_on(gateway_ingest(100, 1_000));
        println!("gateway alone, 100 protocol clients: {rate:.0} msg/s");
        return;
    }
    if std::env::var("SUND_STACK").as_deref() == Ok("ops") {
        runtime.block_on(operations());
        return;
    }
    if std::env::var("SUND_STACK").as_deref() == Ok("flood") {
        runtime.block_on(floods());
        return;
    }
    let mut results: BTreeMap<&str, String> = BTreeMap::new();
    let mut stages: Vec<String> = Vec::new();
    runtime.block_on(async {
        let quinn_rate = bare_quinn(200_000, false).await;
        results.insert(
            "a bare quinn, 200 B frames + 8 B acks, one write each",
            format!("{quinn_rate:.0} frames/s"),
        );
        let quinn_coalesced = bare_quinn(400_000, true).await;
        results.insert(
            "a bare quinn, 200 B frames + 8 B acks, gathered writes",
            format!("{quinn_coalesced:.0} frames/s"),
        );
        let redb_rate = bare_redb(200, 512);
        results.insert(
            "b bare redb, durable commits of 512 x 200 B",
            format!("{redb_rate:.0} inserts/s"),
        );

        let [p50, p90, p99, max] = bare_redb_commit_latency(3_000);
        results.insert(
            "b bare redb, one durable commit",
            format!("p50 {p50:.2?}, p90 {p90:.2?}, p99 {p99:.2?}, max {max:.2?}"),
        );

        let mut one = setup(2).await;
        let rate1 = throughput(&mut one.nodes[..1], 20_000, 64).await;
        results.insert(
            "c sund, 1 sending node",
            format!(
                "{rate1:.0} msg/s ({:.1}% of quinn, {:.1}% of redb)",
                100.0 * rate1 / quinn_rate,
                100.0 * rate1 / redb_rate
            ),
        );
        let show = |[p50, p90, p99, max]: [Duration; 4]| {
            format!("p50 {p50:.2?}, p90 {p90:.2?}, p99 {p99:.2?}, max {max:.2?}")
        };
        for node in one.nodes {
            node.stop().await.unwrap();
        }
        one.gateway.shutdown().await.unwrap();
        // Each latency run on a fresh gateway and pair of nodes, so that the stage figures
        // (where the time goes) are those of that run alone.
        for (key, rate, count) in [
            ("e sund, latency at half the 1-node rate", rate1 / 2.0, 10_000),
            ("g sund, latency at 1,000 msg/s", 1_000.0, 3_000),
        ] {
            let mut pair = setup(2).await;
            // Steady state: both sessions open and their setup (registration, KeyPackage
            // upload and checks) done, and the fresh databases grown to their working size (a
            // new redb file stalls commits while it grows, at about every doubling of what it
            // holds), before the first timed message. The stages then start afresh.
            tokio::time::sleep(Duration::from_secs(2)).await;
            latency(&mut pair.nodes, rate1 / 2.0, WARM_UP).await;
            pair.gateway.reset_stages();
            for node in &pair.nodes {
                node.reset_stages();
            }
            let figures = latency(&mut pair.nodes, rate, count).await;
            results.insert(key, show(figures));
            let gw = pair.gateway.stages();
            let rx = pair.nodes[1].stages();
            stages.push(format!(
                "{}:\n  gateway: queued {} | machine {} | commit wait {} | fsync {} | writes/commit {} | release {}\n  receiver: queued {} | machine {} | commit wait {} | fsync {}",
                &key[2..], gw.queued, gw.machine, gw.commit_wait, gw.fsync, gw.commit_writes, gw.release,
                rx.queued, rx.machine, rx.commit_wait, rx.fsync
            ));
            for node in pair.nodes {
                node.stop().await.unwrap();
            }
            let counters = pair.gateway.shutdown().await.unwrap();
            let refusals: Vec<String> = counters
                .refusals
                .iter()
                .map(|(code, n)| format!("{code:?} {n}"))
                .collect();
            if !refusals.is_empty() {
                stages.push(format!("  gateway refusals: {}", refusals.join(", ")));
            }
        }

        let ingest = gateway_ingest(100, 1_000).await;
        results.insert(
            "f gateway alone, 100 protocol clients",
            format!(
                "{ingest:.0} msg/s ({:.1}% of quinn, {:.1}% of redb)",
                100.0 * ingest / quinn_rate,
                100.0 * ingest / redb_rate
            ),
        );

        let mut hundred = setup(100).await;
        let rate100 = throughput(&mut hundred.nodes, 200, 4).await;
        results.insert(
            "d sund, 100 sending nodes",
            format!(
                "{rate100:.0} msg/s ({:.1}% of quinn, {:.1}% of redb)",
                100.0 * rate100 / quinn_rate,
                100.0 * rate100 / redb_rate
            ),
        );
        for node in hundred.nodes {
            node.stop().await.unwrap();
        }
        hundred.gateway.shutdown().await.unwrap();
    });
    for (name, value) in results {
        println!("{:<46} {value}", &name[2..]);
    }
    println!("\nstages (microseconds; writes per commit):");
    for line in stages {
        println!("{line}");
    }
}
