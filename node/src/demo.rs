//! `sund demo`: a gateway and three devices on loopback over real QUIC and redb. Alice creates
//! a room with Bob and Carol and a DM with Bob (MLS groups: Welcomes through the gateway),
//! encrypted messages flow, the gateway restarts, now federated with a second domain's
//! gateway: Dave of b.example and Alice talk in a room spanning the two domains, whose
//! authority is then handed over to b.example while both run, and a device b.example revokes is
//! refused by a.example too once its CRL arrives over the link; then they talk in an MLS DM
//! across the two domains, become contacts across them, and Alice sees Dave online as his
//! domain's gateway tells hers. Alice sends a file into the room (Bob and Carol fetch and verify it,
//! and sign receipts Alice verifies), and at the end both gateways' databases are searched for
//! every MLS message text and pieces of the file: the gateways stored ciphertext only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use std::sync::Arc;

use sund_gateway::driver::{self, GatewayHandle, GatewayOptions};
use sund_gateway::federation::FederationOptions;
use sund_model::federation::handshake::PeerConfig;
use sund_model::gateway::{AdminAnswer, AdminCommand, GatewayConfig};
use sund_model::ids::{ConversationId, DeviceId, UserId};
use sund_model::node::{ConnectionStatus, NodeEvent};
use sund_node::device::Device;
use sund_node::driver::{self as node_driver, GroupRequest, NodeHandle};
use sund_runtime::environment::Production;

const NAMES: [&str; 4] = ["alice", "bob", "carol", "dave"];
/// The first gateway's users; dave is of the second domain.
const FIRST_DOMAIN_USERS: usize = 3;
const DEADLINE: Duration = Duration::from_secs(60);
/// The two domains.
const DOMAIN_A: &str = "a.example";
const DOMAIN_B: &str = "b.example";
/// The plain room spanning the two domains.
const ACROSS: &str = "across-domains";

/// A gateway of `domain` with its data in `dir/name`, federating with `peer` if given (its
/// domain, root fingerprint and link address) on `link`.
async fn start_gateway(
    dir: &std::path::Path,
    name: &str,
    domain: &str,
    listen: SocketAddr,
    peer: Option<(&str, String, String)>,
    link: SocketAddr,
) -> Result<GatewayHandle, String> {
    let mut config = GatewayConfig {
        domain: domain.to_string(),
        ..GatewayConfig::default()
    };
    let federation = peer.map(|(domain, root_fingerprint, address)| {
        config.federation_peers.push(PeerConfig {
            domain: domain.to_string(),
            root_fingerprint,
        });
        FederationOptions {
            listen: link,
            peers: BTreeMap::from([(domain.to_string(), address)]),
        }
    });
    let options = GatewayOptions {
        listen,
        environment: Arc::new(Production),
        data_dir: dir.join(name),
        config,
        federation,
    };
    driver::start(options)
        .await
        .map_err(|e| format!("gateway {domain}: {e}"))
}

/// A free UDP port on loopback, for a federation endpoint a peer must know before it starts.
fn free_udp_addr() -> Result<SocketAddr, String> {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map_err(|e| format!("no free UDP port on loopback: {e}"))
}

/// The gateway's trust-root fingerprint (what a peer's operator pins).
async fn fingerprint(gateway: &GatewayHandle) -> Result<String, String> {
    gateway
        .admin_client()
        .inspect(|g, _| g.trust_root().fingerprint())
        .await
        .ok_or_else(|| "the gateway stopped".to_string())
}

/// Sets a device up at `gateway` (certificate from `cert`) with a one-time enrolment token.
async fn enrol(
    dir: &std::path::Path,
    gateway: &GatewayHandle,
    cert: &std::path::Path,
    name: &str,
) -> Result<Device, String> {
    let token = gateway
        .enrolment_token(name)
        .await
        .ok_or("the gateway stopped")?;
    Device::init(
        &dir.join(name),
        &gateway.addr.to_string(),
        cert,
        Some(name),
        Some(&token.to_text()),
    )
    .map_err(|e| e.to_string())
}

/// Starts a device's node for this run only.
async fn start_node(device: &Device) -> Result<NodeHandle, String> {
    // The demo's devices live for one run in a temporary directory: nothing is kept for a
    // later one.
    let options = node_driver::NodeOptions {
        hold_until_taken: false,
        timers: None,
        ..device.options()
    };
    node_driver::start(options).await.map_err(|e| e.to_string())
}

/// Runs the demo; an error means something did not arrive exactly once.
pub async fn run() -> Result<(), String> {
    let dir =
        tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("valid");
    let a_link = free_udp_addr()?;
    let gateway = start_gateway(dir.path(), "gateway", DOMAIN_A, loopback, None, a_link).await?;
    let addr = gateway.addr;
    say!(
        "[gateway] {DOMAIN_A} listening on {addr} over QUIC, data in {}",
        dir.path().join("gateway").display()
    );
    let cert = dir.path().join("gateway/tls/cert.der");

    let mut devices = Vec::new();
    let mut names = BTreeMap::new();
    for name in &NAMES[..FIRST_DOMAIN_USERS] {
        let device = enrol(dir.path(), &gateway, &cert, name).await?;
        names.insert(device.key.device_id(), *name);
        say!(
            "[{name:<7}] device {} of {} set up with a one-time enrolment token",
            device.key.device_id(),
            device
                .user
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default()
        );
        devices.push(device);
    }
    let mut nodes = Vec::new();
    for device in &devices {
        nodes.push(start_node(device).await?);
    }
    let mut transcript = Transcript {
        names,
        conversations: BTreeMap::new(),
        members: BTreeMap::new(),
        delivered: BTreeMap::new(),
        connected: BTreeMap::new(),
        listings: BTreeMap::new(),
        presence: BTreeMap::new(),
    };
    // Everyone connects and uploads KeyPackages; then Alice creates the room and the DM.
    transcript.wait_connected(&mut nodes).await?;
    let bob = UserId::of("bob", DOMAIN_A);
    let carol = UserId::of("carol", DOMAIN_A);
    let room = group(&nodes[0], GroupRequest::Room(vec![bob, carol])).await?;
    let dm = group(&nodes[0], GroupRequest::Dm(bob)).await?;
    transcript.conversations.insert(room, "demo-room");
    transcript.conversations.insert(dm, "alice-bob");
    transcript.members.insert(room, vec![0, 1, 2]);
    transcript.members.insert(dm, vec![0, 1]);
    say!("[alice  ] creates MLS room demo-room (bob, carol) and a DM with bob");
    let mut expected: BTreeMap<(usize, ConversationId), u64> = BTreeMap::new();
    // Each group's first commit (seq 1) reaches its creator; the others join from Welcomes.
    expected.insert((0, room), 1);
    expected.insert((0, dm), 1);
    for (who, conv) in [(1, room), (2, room), (1, dm)] {
        expected.insert((who, conv), 1);
    }
    transcript.wait(&mut nodes, &expected).await?;

    let first = [
        (0, room, "hello everyone"),
        (1, room, "hi alice!"),
        (0, dm, "just between us, bob"),
        (2, room, "carol here"),
    ];
    for (who, conv, text) in first {
        send(&nodes[who], who, conv, text, &mut expected, &transcript).await?;
    }
    transcript.wait(&mut nodes, &expected).await?;

    // A second domain: b.example's gateway, which federates with this one as two operators
    // link theirs (each pins the other's root fingerprint).
    let a_root = fingerprint(&gateway).await?;
    let b_link = free_udp_addr()?;
    let peer_a = Some((DOMAIN_A, a_root, a_link.to_string()));
    let b = start_gateway(dir.path(), "gateway-b", DOMAIN_B, loopback, peer_a, b_link).await?;
    let b_root = fingerprint(&b).await?;
    say!(
        "[gateway] {DOMAIN_B} listening on {}, its federation link on {b_link}; each pins the other's root",
        b.addr
    );

    say!("[gateway] graceful restart: drain, stop, start again from the same data directory, now federating with {DOMAIN_B}");
    let stats = gateway.shutdown().await.map_err(|e| e.to_string())?;
    say!(
        "[gateway] stopped after sequencing {} messages and taking {} MLS KeyPackages from the devices; restarting",
        stats.delivery.sequenced, stats.key_packages.uploaded
    );
    let peer_b = Some((DOMAIN_B, b_root, b_link.to_string()));
    let gateway = start_gateway(dir.path(), "gateway", DOMAIN_A, addr, peer_b, a_link).await?;

    let (dave, across_texts) =
        across_domains(dir.path(), &gateway, &b, &mut nodes, &mut transcript).await?;

    let second = [
        (1, room, "did the gateway just restart?"),
        (0, room, "it did, and nothing was lost"),
        (1, dm, "see you later"),
    ];
    for (who, conv, text) in second {
        send(&nodes[who], who, conv, text, &mut expected, &transcript).await?;
    }
    transcript.wait(&mut nodes, &expected).await?;

    let file =
        send_file_into_room(dir.path(), &devices[0], &mut nodes, room, &mut transcript).await?;

    let total: u64 = transcript.delivered.values().map(|v| v.len() as u64).sum();
    for node in nodes {
        node.stop().await.map_err(|e| e.to_string())?;
    }
    gateway.shutdown().await.map_err(|e| e.to_string())?;
    b.shutdown().await.map_err(|e| e.to_string())?;
    let mut texts: Vec<&[u8]> = first
        .iter()
        .chain(second.iter())
        .map(|m| m.2.as_bytes())
        .chain(across_texts.iter().map(|t| t.as_bytes()))
        .collect();
    let messages = texts.len();
    // The file's name, and 64 bytes from each of its first, middle and last parts.
    let quarter = file.len() / 4;
    texts.push(FILE_NAME.as_bytes());
    for at in [16, 2 * quarter, file.len() - 80] {
        texts.push(&file[at..at + 64]);
    }
    search_gateway_database(
        &dir.path().join("gateway/gateway.redb"),
        DOMAIN_A,
        &texts,
        &format!("all {messages} MLS message texts, the file's name and pieces of its bytes"),
        &devices,
    )?;
    let across: Vec<&[u8]> = across_texts.iter().map(|t| t.as_bytes()).collect();
    search_gateway_database(
        &dir.path().join("gateway-b/gateway.redb"),
        DOMAIN_B,
        &across,
        &format!("the {} texts of the DM across domains", across.len()),
        std::slice::from_ref(&dave),
    )?;
    say!("demo: {total} deliveries (messages, commits, a file and its receipts), each exactly once and in seq order; the gateway restart lost nothing");
    Ok(())
}

/// Dave, of b.example, and Alice talk in a room homed at a.example and shared with b.example
/// (a plain conversation its operator makes); then a.example's operator hands its authority
/// over to b.example while both run, and they talk on. Then Alice starts an MLS DM with
/// dave@b.example (his KeyPackage fetched through both gateways and checked against the root
/// a.example's root vouches for), and they write to each other end to end encrypted. Returns
/// Dave's device and the DM's texts (which no gateway's database may hold).
async fn across_domains(
    dir: &std::path::Path,
    a: &GatewayHandle,
    b: &GatewayHandle,
    nodes: &mut Vec<NodeHandle>,
    transcript: &mut Transcript,
) -> Result<(Device, Vec<&'static str>), String> {
    let linked = |gateway: &GatewayHandle, peer: &'static str| {
        let admin = gateway.admin_client();
        async move {
            admin
                .inspect(move |g, _| g.federation().is_some_and(|f| f.is_up(peer)))
                .await
                .unwrap_or(false)
        }
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !linked(a, DOMAIN_B).await {
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "the link {DOMAIN_A} -> {DOMAIN_B} did not come up within {DEADLINE:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    say!("[gateway] {DOMAIN_A} and {DOMAIN_B} linked, each having proved its domain with a key its root certified");
    let dave = enrol(dir, b, &dir.join("gateway-b/tls/cert.der"), "dave").await?;
    let dave_id = dave.key.device_id();
    transcript.names.insert(dave_id, "dave");
    say!(
        "[dave   ] device {dave_id} of {} set up at {DOMAIN_B}'s gateway (a different person than a dave of {DOMAIN_A} would be)",
        dave.user.as_ref().map(ToString::to_string).unwrap_or_default()
    );
    nodes.push(start_node(&dave).await?);
    transcript.wait_connected(nodes).await?;

    let room = ConversationId::from_name(ACROSS);
    let alice = *transcript
        .names
        .iter()
        .find(|(_, n)| **n == "alice")
        .expect("alice is set up")
        .0;
    let answer = a
        .admin(AdminCommand::CreateConversation(room, vec![alice]))
        .await;
    if !matches!(answer, Some(AdminAnswer::ConversationCreated { .. })) {
        return Err(format!("{ACROSS} was not created: {answer:?}"));
    }
    let share = AdminCommand::ShareConversation {
        conversation: room,
        domain: DOMAIN_B.into(),
        members: vec![dave_id],
    };
    let answer = a.admin(share).await;
    if !matches!(answer, Some(AdminAnswer::ConversationShared { .. })) {
        return Err(format!("{ACROSS} was not shared: {answer:?}"));
    }
    transcript.conversations.insert(room, ACROSS);
    transcript.members.insert(room, vec![0, 3]);
    say!("[gateway] {DOMAIN_A}'s operator makes {ACROSS} (a plain room, not end-to-end encrypted) and shares it with dave's device: {DOMAIN_A} orders it, {DOMAIN_B} relays dave's messages and serves him a copy");
    let mut expected = BTreeMap::new();
    for (who, text) in [(0, "hello, b.example"), (3, "hello from b.example")] {
        send(&nodes[who], who, room, text, &mut expected, transcript).await?;
        transcript.wait(nodes, &expected).await?;
    }
    revoked_across_domains(dir, b, a).await?;

    let answer = a
        .admin(AdminCommand::Handover {
            conversation: room,
            to: DOMAIN_B.into(),
        })
        .await;
    let Some(AdminAnswer::HandoverStarted { last_seq, .. }) = answer else {
        return Err(format!("{ACROSS} was not handed over: {answer:?}"));
    };
    let started = tokio::time::Instant::now();
    let deadline = started + DEADLINE;
    loop {
        let home = a
            .admin_client()
            .inspect(move |g, _| g.replica_of(room).map(str::to_string))
            .await
            .flatten();
        if home.as_deref() == Some(DOMAIN_B) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "{DOMAIN_B} did not take {ACROSS} over within {DEADLINE:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    say!(
        "[gateway] {DOMAIN_A} hands {ACROSS} over to {DOMAIN_B}: frozen at seq {last_seq}, {DOMAIN_B} orders it {} ms later (a certificate both signed)",
        started.elapsed().as_millis()
    );
    for (who, text) in [(0, "after the handover"), (3, "ordered here now")] {
        send(&nodes[who], who, room, text, &mut expected, transcript).await?;
        transcript.wait(nodes, &expected).await?;
    }

    // An MLS DM across the two domains: its creating commit (seq 1, alice alone), then the
    // commit adding dave's device (seq 2), from which he joins by the Welcome a.example sends
    // b.example for him.
    let dave_user = UserId::of("dave", DOMAIN_B);
    say!("[alice  ] starts an MLS DM with dave@{DOMAIN_B}: his KeyPackage comes through both gateways, checked against the root {DOMAIN_A}'s root vouches for; he joins from the Welcome {DOMAIN_A} sends {DOMAIN_B}");
    let dm = group(
        &nodes[0],
        GroupRequest::DmAcross(dave_user, DOMAIN_B.into()),
    )
    .await?;
    transcript.conversations.insert(dm, "alice-dave");
    transcript.members.insert(dm, vec![0, 3]);
    expected.insert((0, dm), 2);
    expected.insert((3, dm), 1);
    transcript.wait(nodes, &expected).await?;
    let texts = ["hello dave, end to end", "hello alice, across domains"];
    for (who, text) in [(0, texts[0]), (3, texts[1])] {
        send(&nodes[who], who, dm, text, &mut expected, transcript).await?;
        transcript.wait(nodes, &expected).await?;
    }
    contacts_across_domains(nodes, transcript, dave_user).await?;
    Ok((dave, texts.to_vec()))
}

/// Alice asks dave@b.example to be contacts and he accepts, each through their own gateway,
/// which tells the other's over the link; then Alice watches his presence, which b.example's
/// gateway decides (his adds, blocks and invisibility are his domain's to hold) and tells.
async fn contacts_across_domains(
    nodes: &mut [NodeHandle],
    transcript: &mut Transcript,
    dave: UserId,
) -> Result<(), String> {
    use sund_model::wire::payload::{ContactAction, Seen};
    use sund_node::driver::SocialRequest;
    let alice = UserId::of("alice", DOMAIN_A);
    async fn social(node: &NodeHandle, request: SocialRequest) -> Result<(), String> {
        node.social(request)
            .await
            .map(|_| ())
            .map_err(|e| format!("a contact request failed: {e}"))
    }
    social(
        &nodes[0],
        SocialRequest::Change(dave, Some(DOMAIN_B.into()), ContactAction::Add),
    )
    .await?;
    say!("[alice  ] asks dave@{DOMAIN_B} to be contacts: {DOMAIN_A}'s gateway tells {DOMAIN_B}'s");
    transcript
        .wait_until(nodes, "dave to see alice's request", |t| {
            t.listings
                .get(&3)
                .is_some_and(|l| l.incoming.contains(&alice))
        })
        .await?;
    social(
        &nodes[3],
        SocialRequest::Change(alice, Some(DOMAIN_A.into()), ContactAction::Add),
    )
    .await?;
    transcript
        .wait_until(nodes, "alice and dave to be contacts", |t| {
            t.listings
                .get(&0)
                .is_some_and(|l| l.contacts.contains(&dave))
        })
        .await?;
    say!("[dave   ] accepts: alice@{DOMAIN_A} and dave@{DOMAIN_B} are contacts on both gateways");
    social(&nodes[0], SocialRequest::Watch(vec![dave])).await?;
    transcript
        .wait_until(nodes, "alice to see dave online", |t| {
            t.presence.get(&(0, dave)) == Some(&Seen::Online)
        })
        .await?;
    say!("[alice  ] sees dave@{DOMAIN_B} online: {DOMAIN_A}'s gateway watches him at {DOMAIN_B}'s, which decides what she may see and tells each change");
    Ok(())
}

/// Trust across domains: dave's old phone, set up at b.example, is revoked there; a.example
/// (the home of the room spanning both) takes b.example's new CRL over the link and from then
/// on refuses that device: sharing the room with it is refused.
async fn revoked_across_domains(
    dir: &std::path::Path,
    b: &GatewayHandle,
    a: &GatewayHandle,
) -> Result<(), String> {
    let token = b
        .enrolment_token("dave")
        .await
        .ok_or("the gateway stopped")?;
    let phone = Device::init(
        &dir.join("dave-old-phone"),
        &b.addr.to_string(),
        &dir.join("gateway-b/tls/cert.der"),
        Some("dave"),
        Some(&token.to_text()),
    )
    .map_err(|e| e.to_string())?;
    let phone_id = phone.key.device_id();
    // Its first session registers it at b.example.
    let mut node = start_node(&phone).await?;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match node.events.try_recv() {
            Ok(NodeEvent::Status(ConnectionStatus::Connected)) => break,
            Ok(_) => continue,
            Err(_) if tokio::time::Instant::now() > deadline => {
                return Err(format!(
                    "dave's old phone did not connect within {DEADLINE:?}"
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let answer = b.admin(AdminCommand::RevokeDevice(phone_id)).await;
    let Some(AdminAnswer::Revoked { crl_version, .. }) = answer else {
        return Err(format!("dave's old phone was not revoked: {answer:?}"));
    };
    let revoked = tokio::time::Instant::now();
    loop {
        let taken = a
            .admin_client()
            .inspect(move |g, _| g.peer_crls().revokes(DOMAIN_B, phone_id))
            .await
            .unwrap_or(false);
        if taken {
            break;
        }
        if tokio::time::Instant::now() > revoked + DEADLINE {
            return Err(format!(
                "{DOMAIN_A} did not take {DOMAIN_B}'s CRL version {crl_version} within {DEADLINE:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let taken_ms = revoked.elapsed().as_millis();
    let share = AdminCommand::ShareConversation {
        conversation: ConversationId::from_name(ACROSS),
        domain: DOMAIN_B.into(),
        members: vec![phone_id],
    };
    let why = match a.admin(share).await {
        Some(AdminAnswer::ShareRefused { why, .. }) => why,
        other => {
            return Err(format!(
                "{DOMAIN_A} shared {ACROSS} with a device {DOMAIN_B} revoked: {other:?}"
            ))
        }
    };
    say!("[gateway] {DOMAIN_B} revokes dave's old phone; {DOMAIN_A} holds {DOMAIN_B}'s CRL version {crl_version} {taken_ms} ms later and refuses to share {ACROSS} with it: {why}");
    let _ = node.stop().await;
    Ok(())
}

/// The demo's file.
const FILE_NAME: &str = "report.bin";
/// Its size: a few chunks.
const FILE_BYTES: usize = 3_000_000;

/// Alice sends a file into the room; Bob's and Carol's devices fetch it, verify every chunk
/// and save it; each signs a receipt, which Alice's device verifies. Returns the file's bytes.
async fn send_file_into_room(
    dir: &std::path::Path,
    alice: &Device,
    nodes: &mut [NodeHandle],
    room: ConversationId,
    transcript: &mut Transcript,
) -> Result<Vec<u8>, String> {
    use sund_model::files::{stream_chunker, FileName, FileSecret, ManifestBuilder};
    // Bytes that do not repeat, so that the chunker cuts them as it would a real file.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..FILE_BYTES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let files = dir.join("files");
    let saved = dir.join("saved");
    for d in [&files, &saved] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let path = files.join(FILE_NAME);
    std::fs::write(&path, &data).map_err(|e| format!("{}: {e}", path.display()))?;
    let secret = FileSecret::for_conversation(&alice.key, room);
    let name = FileName::new(FILE_NAME).map_err(|e| e.to_string())?;
    let mut builder = ManifestBuilder::new(name, secret.clone());
    for chunk in stream_chunker(&secret, &data[..]) {
        let chunk = chunk.map_err(|e| e.to_string())?;
        builder.push(&chunk).map_err(|e| e.to_string())?;
    }
    let manifest = builder.finish();
    let chunks = manifest.chunks.len();
    let source = path.to_str().ok_or("a temporary path that is not UTF-8")?;
    nodes[0]
        .send_file(room, manifest, Bytes::from(source.to_string()))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    say!(
        "[alice  ] -> demo-room: a file, {FILE_NAME} ({} MB in {chunks} chunks, each sealed; the name and key travel inside an MLS message)",
        FILE_BYTES / 1_000_000
    );
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut saved_by = Vec::new();
    let mut receipts = Vec::new();
    while saved_by.len() < 2 || receipts.len() < 2 {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("the file did not arrive within {DEADLINE:?}: saved by {saved_by:?}, receipts from {receipts:?}"));
        }
        for i in 0..nodes.len() {
            while let Ok(event) = nodes[i].events.try_recv() {
                let me = NAMES[i];
                match event {
                    NodeEvent::FileOffered { digest, .. } => {
                        nodes[i]
                            .fetch_file(room, digest)
                            .await
                            .map_err(|e| e.to_string())?;
                        say!("[{me:<7}] fetches {FILE_NAME}: only the chunks it lacks");
                    }
                    NodeEvent::FileComplete { digest, .. } => {
                        let into = saved.join(me);
                        std::fs::create_dir_all(&into)
                            .map_err(|e| format!("{}: {e}", into.display()))?;
                        let written = nodes[i]
                            .save_file(room, digest, into)
                            .await
                            .map_err(|e| e.to_string())??;
                        let back = std::fs::read(&written)
                            .map_err(|e| format!("{}: {e}", written.display()))?;
                        if back != data {
                            return Err(format!("{me} saved other bytes than alice sent"));
                        }
                        say!("[{me:<7}] has {FILE_NAME}: every chunk verified, saved whole, the same bytes");
                        saved_by.push(me);
                    }
                    NodeEvent::FileFailed { reason, .. } => {
                        return Err(format!("{me} could not fetch the file: {reason}"));
                    }
                    NodeEvent::FileReceipt {
                        device, verified, ..
                    } => {
                        let who = transcript.names.get(&device).copied().unwrap_or("?");
                        if !verified {
                            return Err(format!("{me} could not verify {who}'s receipt"));
                        }
                        say!("[{me:<7}] {FILE_NAME} delivered to {who}, verified (a receipt signed with {who}'s device key)");
                        receipts.push(who);
                    }
                    other => transcript.record(i, other)?,
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(data)
}

/// Asks for a group and returns its conversation.
async fn group(node: &NodeHandle, request: GroupRequest) -> Result<ConversationId, String> {
    node.group(request)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// Reads the gateway's database file and looks for every message text: none may be there. As a
/// control, the device ids the gateway does store in the clear must be found.
fn search_gateway_database(
    path: &std::path::Path,
    domain: &str,
    texts: &[&[u8]],
    described: &str,
    devices: &[Device],
) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    let control = devices
        .iter()
        .all(|d| contains(&d.key.device_id().to_bytes()));
    if !control {
        return Err("the search does not find what the gateway stores in the clear".into());
    }
    if let Some(text) = texts.iter().find(|t| contains(t)) {
        return Err(format!(
            "the gateway's database holds the plaintext {:?}",
            String::from_utf8_lossy(text)
        ));
    }
    say!(
        "[gateway] {domain} searched its database ({} KiB) for {described}: none found, only ciphertext",
        bytes.len() / 1024,
    );
    Ok(())
}

async fn send(
    node: &NodeHandle,
    who: usize,
    conv: ConversationId,
    text: &str,
    expected: &mut BTreeMap<(usize, ConversationId), u64>,
    transcript: &Transcript,
) -> Result<(), String> {
    node.send(conv, Bytes::from(text.to_string()))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    say!(
        "[{:<7}] -> {}: {text}",
        NAMES[who],
        transcript.conversations[&conv]
    );
    for &m in &transcript.members[&conv] {
        *expected.entry((m, conv)).or_default() += 1;
    }
    Ok(())
}

struct Transcript {
    names: BTreeMap<DeviceId, &'static str>,
    conversations: BTreeMap<ConversationId, &'static str>,
    /// Each conversation's member devices (by index in `NAMES`).
    members: BTreeMap<ConversationId, Vec<usize>>,
    /// Per (device, conversation): the seqs delivered (messages and commits), in order.
    delivered: BTreeMap<(usize, ConversationId), Vec<u64>>,
    /// Devices whose session is open.
    connected: BTreeMap<usize, bool>,
    /// Each device's last contact listing.
    listings: BTreeMap<usize, sund_model::node::ContactList>,
    /// What each device was last told of each watched user's presence.
    presence: BTreeMap<(usize, UserId), sund_model::wire::payload::Seen>,
}

impl Transcript {
    /// Waits until every device has a session, and a little longer for its KeyPackages.
    async fn wait_connected(&mut self, nodes: &mut [NodeHandle]) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.connected.values().filter(|c| **c).count() < nodes.len() {
            for (i, node) in nodes.iter_mut().enumerate() {
                while let Ok(event) = node.events.try_recv() {
                    self.record(i, event)?;
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "the devices did not all connect within {DEADLINE:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(())
    }

    /// Drains events until every device has every message it should, checking order and
    /// uniqueness as it goes.
    async fn wait(
        &mut self,
        nodes: &mut [NodeHandle],
        expected: &BTreeMap<(usize, ConversationId), u64>,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let done = expected
                .iter()
                .all(|(k, n)| self.delivered.get(k).map_or(0, |v| v.len() as u64) >= *n);
            if done {
                return Ok(());
            }
            for (i, node) in nodes.iter_mut().enumerate() {
                while let Ok(event) = node.events.try_recv() {
                    self.record(i, event)?;
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("not everything arrived within {DEADLINE:?}: expected {expected:?}, delivered {:?}", self.delivered));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Takes every device's events until `done` holds of what they told (`what`: for the
    /// error if it never does).
    async fn wait_until(
        &mut self,
        nodes: &mut [NodeHandle],
        what: &str,
        done: impl Fn(&Transcript) -> bool,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !done(self) {
            for (i, node) in nodes.iter_mut().enumerate() {
                while let Ok(event) = node.events.try_recv() {
                    self.record(i, event)?;
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("waited {DEADLINE:?} for {what}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn name_of(&self, conversation: ConversationId) -> &'static str {
        self.conversations
            .get(&conversation)
            .copied()
            .unwrap_or("?")
    }

    fn record(&mut self, device: usize, event: NodeEvent) -> Result<(), String> {
        let me = NAMES[device];
        match event {
            NodeEvent::Delivered {
                conversation,
                seq,
                sender,
                body,
                ..
            } => {
                let seqs = self.delivered.entry((device, conversation)).or_default();
                // A plain conversation starts at seq 1; an MLS one at the commit that made or
                // joined it (`Joined`, `GroupChanged`).
                if seqs.last().map_or(seq != 1, |&last| seq != last + 1) {
                    return Err(format!(
                        "{me} got seq {seq} of {conversation} after {seqs:?}"
                    ));
                }
                seqs.push(seq);
                let from = self.names.get(&sender).copied().unwrap_or("?");
                let what = if let Some(Ok(file)) = sund_model::files::FileMessage::decode(&body) {
                    format!("a file, {}", file.manifest.name.as_str())
                } else if sund_model::node::files::Receipt::decode_message(&body).is_some() {
                    "a file receipt".to_string()
                } else if sund_model::node::told_names::is_roster(&body) {
                    "the members' names".to_string()
                } else {
                    crate::display::body(&body)
                };
                say!(
                    "[{me:<7}] <- {} seq {seq} from {from}: {what}",
                    self.name_of(conversation),
                );
            }
            NodeEvent::Joined {
                conversation, seq, ..
            } => {
                // A joiner reads from the commit that added it on.
                self.delivered
                    .entry((device, conversation))
                    .or_default()
                    .push(seq);
                say!(
                    "[{me:<7}] joined {} from its Welcome (the commit at seq {seq})",
                    self.name_of(conversation)
                );
            }
            NodeEvent::GroupChanged {
                conversation,
                seq,
                epoch,
                added,
                ..
            } => {
                let seqs = self.delivered.entry((device, conversation)).or_default();
                seqs.push(seq);
                let added: Vec<&str> = added
                    .iter()
                    .map(|d| self.names.get(d).copied().unwrap_or("?"))
                    .collect();
                if added.is_empty() {
                    say!(
                        "[{me:<7}] {} is at epoch {epoch}: made, with no other device yet",
                        self.name_of(conversation)
                    );
                } else {
                    say!(
                        "[{me:<7}] {} is at epoch {epoch}: added {}",
                        self.name_of(conversation),
                        added.join(", ")
                    );
                }
            }
            NodeEvent::Undecryptable { reason, .. } => {
                return Err(format!("{me} could not decrypt a message: {reason}"))
            }
            NodeEvent::Status(status) => {
                self.connected
                    .insert(device, status == ConnectionStatus::Connected);
                say!("[{me:<7}] connection {status:?}");
            }
            NodeEvent::Refused { message, .. } => {
                return Err(format!("{me} was refused: {message}"))
            }
            NodeEvent::Contacts { contacts, .. } => {
                self.listings.insert(device, contacts);
            }
            NodeEvent::Presence { user, seen } => {
                self.presence.insert((device, user), seen);
            }
            NodeEvent::ContactsRefused { message, .. } => {
                return Err(format!("{me}'s contact request was refused: {message}"))
            }
            _ => {}
        }
        Ok(())
    }
}
