//! Gateway-to-gateway links: one authenticated connection per configured peer domain, and a
//! durable outbox per peer whose entries reach the peer exactly once and in order, across
//! losses, disconnects and crashes of either side.
//!
//! - **Who dials.** Of two peers, the one whose domain sorts first dials; the other answers.
//!   The dialer reconnects with exponential backoff and jitter (from the injected entropy)
//!   after any failure; an answerer waits to be dialed, and its outbox fills meanwhile.
//! - **Authentication** is [`super::handshake`]: nothing but handshake frames is read on a
//!   connection before it completes, and a connection that does not complete in time is
//!   closed. The dialer treats the link as up only when the answerer's first cursor arrives
//!   (sent once the dialer's finish checked out), so no entry can overtake the finish.
//! - **Outbox.** [`Federation::enqueue`] numbers each entry (1, 2, … per peer, never reused:
//!   the last number is written with the entry) and keeps it durably until the peer
//!   acknowledges it. An entry is sent only once its write is durable, so a number is never
//!   seen by the peer with two bodies.
//! - **Receiving.** The receiver takes only the next number after its durable cursor: the
//!   entry is handed on (`Received`) in the same batch as the cursor moves, and acknowledged
//!   only after that commit. Older numbers are duplicates (acknowledged again), newer ones a
//!   gap (ignored: the sender goes back).
//! - **Sending** is go-back-N with a window: at most [`WINDOW`] unacknowledged entries in
//!   flight; if acknowledgements stop progressing for `resend_after`, everything past the
//!   last acknowledgement goes again. The receiver tells a gap at once (an acknowledgement
//!   naming the entry that arrived past its cursor, once per cursor), and the sender goes
//!   back then (once per acknowledgement it goes back from), so a lost entry costs a round
//!   trip rather than the resend timer. On every new connection, sending starts after the
//!   last acknowledgement.
//! - **Liveness.** Each side sends its cursor (`FederationAck`) every `heartbeat`; a link that
//!   hears nothing for `idle_timeout` is closed and (by the dialer) dialed again.
//!
//! A peer that acknowledges numbers this gateway never assigned has a cursor from an earlier
//! history of this outbox (this gateway's data was restored or reset): numbering continues
//! past the peer's cursor, so new entries are not taken for duplicates, and the event is
//! counted and reported.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use core::time::Duration;

use crate::effects::Effects;
use crate::env::{Entropy, Ready, StoreError, StoreRead, Table};
use crate::identity::DevicePublicKey;
use crate::ids::ConnectionId;
use crate::time::Instant;
use crate::trust::codec::put_domain;
use crate::wire::payload::{ErrorCode, FederationAck, FederationForward, FederationHello, Goodbye};
use crate::wire::{Frame, Payload, Routing, PAYLOAD_BYTES_MAX};

use super::handshake::{
    self, Answering, ChannelBinding, Dialing, FederationHandshakeError, LinkIdentity, PeerConfig,
};

/// Outbox entries: key (peer domain as length and bytes, seq as u64 BE), value the body.
pub const FEDERATION_OUTBOX_TABLE: Table = Table("federation_outbox");
/// Per peer: the last number assigned to an outbox entry (u64 BE).
pub const FEDERATION_NUMBERS_TABLE: Table = Table("federation_numbers");
/// Per peer: the receive cursor, the last entry taken from the peer (u64 BE).
pub const FEDERATION_CURSORS_TABLE: Table = Table("federation_cursors");
/// Each peer's trust root key, as its last handshake proved it (key: the domain; value: the
/// 32-byte key): the gateway vouches for it to its devices (`trust::peer_roots`) even while
/// the link is down. A row whose key no longer matches the configured fingerprint is ignored.
pub const FEDERATION_ROOTS_TABLE: Table = Table("federation_roots");

/// Most unacknowledged entries in flight on one link.
pub const WINDOW: u64 = 256;
/// The longest entry a link carries: one frame's payload, less room for the frame's own fields.
pub const ENTRY_BYTES_MAX: usize = PAYLOAD_BYTES_MAX as usize - 64;

/// The link timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkTimers {
    /// How often each side sends its cursor.
    pub heartbeat: Duration,
    /// A link that hears nothing this long is closed.
    pub idle_timeout: Duration,
    /// A handshake not finished this long after the connection opened is abandoned.
    pub handshake_timeout: Duration,
    /// Unacknowledged entries go again after acknowledgements stall this long.
    pub resend_after: Duration,
    /// First reconnect delay of a dialer.
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

impl Default for LinkTimers {
    fn default() -> Self {
        LinkTimers {
            heartbeat: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            resend_after: Duration::from_secs(2),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// What the driver tells the federation machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FederationInput {
    /// A connection this gateway dialed to `peer` opened.
    Connected {
        /// The peer dialed.
        peer: String,
        /// The new connection.
        conn: ConnectionId,
        /// Its channel binding ([`handshake::ChannelBinding`]).
        binding: ChannelBinding,
    },
    /// Dialing `peer` failed.
    ConnectFailed {
        /// The peer dialed.
        peer: String,
    },
    /// A peer gateway opened a connection to this one (not yet authenticated), with the
    /// connection's channel binding.
    Accepted(ConnectionId, ChannelBinding),
    /// A connection closed.
    Closed(ConnectionId),
    /// A frame arrived on a connection.
    Frame(ConnectionId, Bytes),
}

/// What the federation machine asks of its driver, or reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FederationOutput {
    /// Dial `peer` (at its configured address), then report `Connected` or `ConnectFailed`.
    Connect {
        /// The peer to dial.
        peer: String,
    },
    /// Send a frame on a connection.
    Send(ConnectionId, Bytes),
    /// Close a connection.
    Close(ConnectionId),
    /// An entry from `peer`, durable here: hand it on (it is never handed on twice).
    Received {
        /// The sending domain.
        peer: String,
        /// Its number on the link.
        seq: u64,
        /// The entry.
        body: Bytes,
    },
    /// The link to `peer` is authenticated and up.
    LinkUp {
        /// The peer.
        peer: String,
    },
    /// The link to `peer` went down.
    LinkDown {
        /// The peer.
        peer: String,
        /// Why, in words.
        reason: String,
        /// True if the peer said it was shutting down (a stop or restart its operator asked
        /// for): expected, not a fault.
        graceful: bool,
    },
    /// `peer` had taken entries up to `peer_cursor`, past this gateway's last number: this
    /// gateway's data is older than the peer's view of it (restored or reset). Numbering
    /// continues after the peer's cursor; what the peer took under the old numbers is not
    /// known here. An operator should hear of it.
    HistoryBehind {
        /// The peer.
        peer: String,
        /// The peer's cursor.
        peer_cursor: u64,
    },
    /// A connection was refused (authentication failed, or it broke the protocol).
    Refused {
        /// The connection.
        conn: ConnectionId,
        /// Why, in words (no secrets).
        reason: String,
    },
}

/// Why an entry could not be queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    /// The domain is not a configured peer.
    #[error("domain `{0}` is not a federation peer of this gateway; its operator must add it to [[federation.peer]]")]
    UnknownPeer(String),
    /// The entry does not fit in one frame.
    #[error("an entry of {0} bytes does not fit in one federation frame")]
    TooLarge(usize),
}

/// Counters for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FederationStats {
    /// Links that came up.
    pub links_up: u64,
    /// Links that went down.
    pub links_down: u64,
    /// Connections refused at authentication.
    pub handshakes_refused: u64,
    /// Connections closed for a frame outside the protocol.
    pub protocol_errors: u64,
    /// Entries sent again (go-back-N).
    pub resent: u64,
    /// Times this side went back at once on the peer's report of a gap.
    pub fast_resends: u64,
    /// Duplicate entries received (already taken).
    pub duplicates: u64,
    /// Entries received past a gap (ignored).
    pub gaps: u64,
    /// Peers that acknowledged numbers this gateway never assigned.
    pub cursor_ahead: u64,
}

/// One link as an operator sees it ([`Federation::links`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkReport {
    /// The peer's domain.
    pub domain: String,
    /// The peer's trust-root fingerprint, as configured.
    pub root_fingerprint: String,
    /// True if this gateway dials (its domain sorts first).
    pub dials: bool,
    /// `up`, `down`, `dialing` or `authenticating`.
    pub state: &'static str,
    /// Entries numbered for the peer so far.
    pub numbered: u64,
    /// The highest the peer acknowledged.
    pub acknowledged: u64,
    /// Entries queued, not yet acknowledged.
    pub queued: usize,
    /// The last entry taken from the peer.
    pub taken: u64,
    /// Dials that failed since the link was last up.
    pub failed_attempts: u32,
    /// Time since the peer was last heard.
    pub silent_for: Duration,
    /// The version of the peer's CRL this gateway holds (0: none yet).
    pub crl_held: u64,
    /// The version of this gateway's CRL the peer last said it holds.
    pub peer_holds_crl: Option<u64>,
    /// Messages the peer relayed that this gateway refused by its limit per peer, since it
    /// started.
    pub relays_limited: u64,
    /// Messages the peer relayed that this gateway's limit per peer let through (to be
    /// sequenced, answered as copies or refused for other reasons), since it started.
    pub relays_admitted: u64,
    /// Of the refused, relays that came before the hint an earlier refusal gave (the peer
    /// ignores its hints: its link's reading was paused), since it started.
    pub relays_past_hint: u64,
}

enum LinkState {
    /// Not connected; a dialer dials again at `retry_at`.
    Down { retry_at: Instant },
    /// Dial asked for, not yet connected.
    Dialing { since: Instant },
    /// This gateway dialed and sent its hello.
    Hello {
        conn: ConnectionId,
        since: Instant,
        dialing: Dialing,
    },
    /// This gateway dialed, checked the reply and sent its finish; the link is up when the
    /// answerer's first cursor arrives (it sends it once the finish checked out), so nothing
    /// is forwarded that could overtake the finish.
    Finishing { conn: ConnectionId, since: Instant },
    /// Authenticated.
    Up { conn: ConnectionId },
}

struct Link {
    peer: PeerConfig,
    dials: bool,
    state: LinkState,
    /// Last number assigned.
    numbered: u64,
    /// Unacknowledged entries, durable.
    outbox: BTreeMap<u64, Bytes>,
    /// Highest number the peer acknowledged.
    acked: u64,
    /// Highest number sent on the current connection.
    sent: u64,
    /// Last entry taken from the peer (durable once its batch commits).
    cursor: u64,
    /// The cursor at which this side last told the peer of a gap (once per cursor).
    gap_told: Option<u64>,
    /// The acknowledgement this side last went back from on a peer's gap (once per
    /// acknowledgement: the peer's later gap reports about the same loss change nothing).
    went_back_from: Option<u64>,
    last_heard: Instant,
    last_beat: Instant,
    last_progress: Instant,
    attempts: u32,
    /// The peer's link key, from its certificate in the last handshake: it signs what the
    /// peer sequences.
    peer_key: Option<DevicePublicKey>,
    /// The peer's trust root key, from its last handshake (or the store), checked against the
    /// pinned fingerprint.
    peer_root: Option<DevicePublicKey>,
    /// The version of the peer's CRL this gateway holds (told in heartbeats).
    crl_held: u64,
    /// The version of this gateway's CRL the peer last said it holds.
    peer_holds_crl: Option<u64>,
    /// The version of this gateway's CRL last queued for the peer since the link came up.
    crl_pushed: Option<u64>,
    /// Relays from the peer refused by the gateway's limit per peer (in memory).
    relays_limited: u64,
    /// Relays from the peer its limit per peer let through (in memory).
    relays_admitted: u64,
    /// Refused relays from the peer that came before their hint (in memory).
    relays_past_hint: u64,
}

/// An accepted connection, not yet authenticated.
enum Pending {
    AwaitHello {
        since: Instant,
        binding: ChannelBinding,
    },
    AwaitFinish {
        since: Instant,
        answering: Answering,
    },
}

/// The federation sub-machine of a gateway: its links to every configured peer.
pub struct Federation {
    me: LinkIdentity,
    peers: Vec<PeerConfig>,
    timers: LinkTimers,
    links: BTreeMap<String, Link>,
    pending: BTreeMap<ConnectionId, Pending>,
    entropy: Box<dyn Entropy + Send>,
    fx: Effects<FederationOutput>,
    stats: FederationStats,
    /// Entries received since the gateway last took them ([`Federation::take_arrived`]).
    arrived: VecDeque<(String, Bytes)>,
    /// Links that came up (`true`) or went down since the gateway last took them
    /// ([`Federation::take_link_change`]).
    link_changes: VecDeque<(String, bool)>,
    /// How many times a handshake proved a peer root this machine did not hold (in memory:
    /// the gateway compares it with what it last told its devices).
    roots_learned: u64,
}

fn peer_key(domain: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + domain.len());
    put_domain(&mut key, domain);
    key
}

fn entry_key(domain: &str, seq: u64) -> Vec<u8> {
    let mut key = peer_key(domain);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn read_u64(value: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = value
        .try_into()
        .map_err(|_| StoreError::Damaged("a federation number is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(bytes))
}

fn frame(routing: Routing, payload: Payload) -> Bytes {
    Frame::new(routing, payload).encode()
}

fn with_seq(seq: u64) -> Routing {
    Routing {
        seq,
        ..Routing::default()
    }
}

impl Link {
    /// A heartbeat: the cursor goes in the routing; this carries the CRL version held.
    fn beat(&self) -> FederationAck {
        FederationAck {
            gap: None,
            crl: Some(self.crl_held),
        }
    }
}

/// True if `root`'s fingerprint is the one configured for `peer`.
fn pins(peer: &PeerConfig, root: DevicePublicKey) -> bool {
    crate::trust::TrustRoot {
        key: root,
        domain: peer.domain.clone(),
    }
    .fingerprint()
    .eq_ignore_ascii_case(&peer.root_fingerprint)
}

impl Federation {
    /// Recovers the links to `peers` from what `store` holds (outboxes, numbers, cursors).
    pub fn recover(
        me: LinkIdentity,
        peers: Vec<PeerConfig>,
        timers: LinkTimers,
        entropy: Box<dyn Entropy + Send>,
        store: &dyn StoreRead,
        now: Instant,
    ) -> Result<Federation, StoreError> {
        let mut links = BTreeMap::new();
        for peer in &peers {
            let key = peer_key(&peer.domain);
            let numbered = store
                .get(FEDERATION_NUMBERS_TABLE, &key)?
                .map_or(Ok(0), |v| read_u64(&v))?;
            let cursor = store
                .get(FEDERATION_CURSORS_TABLE, &key)?
                .map_or(Ok(0), |v| read_u64(&v))?;
            let mut outbox = BTreeMap::new();
            let mut damaged = None;
            store.scan_from(FEDERATION_OUTBOX_TABLE, &key, &mut |k, v| {
                if !k.starts_with(&key) {
                    return core::ops::ControlFlow::Break(());
                }
                match k[key.len()..].try_into() {
                    Ok(seq) => {
                        outbox.insert(u64::from_be_bytes(seq), Bytes::copy_from_slice(v));
                    }
                    Err(_) => damaged = Some("an outbox key is not a peer and a number"),
                }
                core::ops::ControlFlow::Continue(())
            })?;
            if let Some(what) = damaged {
                return Err(StoreError::Damaged(what.into()));
            }
            if outbox
                .keys()
                .next_back()
                .is_some_and(|&last| last > numbered)
            {
                return Err(StoreError::Damaged(format!(
                    "the federation outbox for {} holds entries past its last number",
                    peer.domain
                )));
            }
            let acked = outbox.keys().next().map_or(numbered, |&first| first - 1);
            let peer_root = match store.get(FEDERATION_ROOTS_TABLE, peer.domain.as_bytes())? {
                Some(bytes) => {
                    let key = DevicePublicKey(bytes.as_slice().try_into().map_err(|_| {
                        StoreError::Damaged(format!(
                            "the stored trust root of {} is not a key",
                            peer.domain
                        ))
                    })?);
                    // Re-pinned since: the stored key is not this peer's any more.
                    pins(peer, key).then_some(key)
                }
                None => None,
            };
            links.insert(
                peer.domain.clone(),
                Link {
                    dials: me.domain < peer.domain,
                    peer: peer.clone(),
                    state: LinkState::Down { retry_at: now },
                    numbered,
                    outbox,
                    acked,
                    sent: acked,
                    cursor,
                    gap_told: None,
                    went_back_from: None,
                    last_heard: now,
                    last_beat: now,
                    last_progress: now,
                    attempts: 0,
                    peer_key: None,
                    peer_root,
                    crl_held: 0,
                    peer_holds_crl: None,
                    crl_pushed: None,
                    relays_limited: 0,
                    relays_admitted: 0,
                    relays_past_hint: 0,
                },
            );
        }
        let mut federation = Federation {
            me,
            peers,
            timers,
            links,
            pending: BTreeMap::new(),
            entropy,
            fx: Effects::default(),
            stats: FederationStats::default(),
            arrived: VecDeque::new(),
            link_changes: VecDeque::new(),
            roots_learned: 0,
        };
        federation.handle_timeout(now);
        Ok(federation)
    }

    /// Queues `body` for `peer`: it reaches the peer once, after every entry queued before it.
    /// Returns its number on the link.
    pub fn enqueue(&mut self, now: Instant, peer: &str, body: Bytes) -> Result<u64, EnqueueError> {
        self.check_entry(peer, body.len())?;
        let link = self.links.get_mut(peer).expect("checked above");
        link.numbered += 1;
        let seq = link.numbered;
        self.fx
            .put(FEDERATION_OUTBOX_TABLE, entry_key(peer, seq), body.to_vec());
        self.fx.put(
            FEDERATION_NUMBERS_TABLE,
            peer_key(peer),
            seq.to_be_bytes().to_vec(),
        );
        link.outbox.insert(seq, body);
        self.pump(now, peer);
        Ok(seq)
    }

    /// Whether an entry of `len` bytes can be queued for `peer`: the peer is configured and
    /// the entry fits in one frame.
    pub fn check_entry(&self, peer: &str, len: usize) -> Result<(), EnqueueError> {
        if !self.links.contains_key(peer) {
            return Err(EnqueueError::UnknownPeer(peer.to_string()));
        }
        if len > ENTRY_BYTES_MAX {
            return Err(EnqueueError::TooLarge(len));
        }
        Ok(())
    }

    /// Handles one input.
    pub fn handle(&mut self, now: Instant, input: FederationInput) {
        match input {
            FederationInput::Connected {
                peer,
                conn,
                binding,
            } => self.connected(now, &peer, conn, binding),
            FederationInput::ConnectFailed { peer } => {
                if let Some(link) = self.links.get_mut(&peer) {
                    if matches!(link.state, LinkState::Dialing { .. }) {
                        self.down(now, &peer, "could not connect".into());
                    }
                }
            }
            FederationInput::Accepted(conn, binding) => {
                self.pending.insert(
                    conn,
                    Pending::AwaitHello {
                        since: now,
                        binding,
                    },
                );
            }
            FederationInput::Closed(conn) => {
                self.pending.remove(&conn);
                if let Some(peer) = self.peer_on(conn) {
                    self.down(now, &peer, "the connection closed".into());
                }
            }
            FederationInput::Frame(conn, bytes) => self.frame(now, conn, &bytes),
        }
    }

    /// Fires what is due: dials, heartbeats, resends, timeouts.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<ConnectionId> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                let since = match p {
                    Pending::AwaitHello { since, .. } | Pending::AwaitFinish { since, .. } => {
                        *since
                    }
                };
                now.saturating_since(since) >= self.timers.handshake_timeout
            })
            .map(|(c, _)| *c)
            .collect();
        for conn in expired {
            self.pending.remove(&conn);
            self.refuse(conn, "the handshake did not finish in time".into());
        }
        let peers: Vec<String> = self.links.keys().cloned().collect();
        for peer in peers {
            let timers = self.timers;
            let link = self.links.get_mut(&peer).expect("listed");
            match &link.state {
                LinkState::Down { retry_at } if link.dials && now >= *retry_at => {
                    link.state = LinkState::Dialing { since: now };
                    self.fx
                        .hold(FederationOutput::Connect { peer: peer.clone() });
                }
                LinkState::Dialing { since }
                    if now.saturating_since(*since) >= timers.handshake_timeout =>
                {
                    self.down(now, &peer, "connecting took too long".into());
                }
                LinkState::Hello { conn, since, .. } | LinkState::Finishing { conn, since }
                    if now.saturating_since(*since) >= timers.handshake_timeout =>
                {
                    let conn = *conn;
                    self.fx.hold(FederationOutput::Close(conn));
                    self.down(now, &peer, "the peer did not answer the handshake".into());
                }
                LinkState::Up { conn } => {
                    let conn = *conn;
                    if now.saturating_since(link.last_heard) >= timers.idle_timeout {
                        self.fx.hold(FederationOutput::Close(conn));
                        self.down(now, &peer, "the peer went silent".into());
                        continue;
                    }
                    if now.saturating_since(link.last_beat) >= timers.heartbeat {
                        link.last_beat = now;
                        let ack = frame(with_seq(link.cursor), Payload::FederationAck(link.beat()));
                        self.fx.hold(FederationOutput::Send(conn, ack));
                    }
                    if link.sent > link.acked
                        && now.saturating_since(link.last_progress) >= timers.resend_after
                    {
                        self.stats.resent += link.sent - link.acked;
                        link.sent = link.acked;
                        link.last_progress = now;
                        self.pump(now, &peer);
                    }
                }
                _ => {}
            }
        }
    }

    /// When [`Self::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = &self.timers;
        let pending = self.pending.values().map(|p| match p {
            Pending::AwaitHello { since, .. } | Pending::AwaitFinish { since, .. } => {
                *since + t.handshake_timeout
            }
        });
        let links = self.links.values().filter_map(|l| match &l.state {
            LinkState::Down { retry_at } => l.dials.then_some(*retry_at),
            LinkState::Dialing { since }
            | LinkState::Hello { since, .. }
            | LinkState::Finishing { since, .. } => Some(*since + t.handshake_timeout),
            LinkState::Up { .. } => {
                let mut due = (l.last_heard + t.idle_timeout).min(l.last_beat + t.heartbeat);
                if l.sent > l.acked {
                    due = due.min(l.last_progress + t.resend_after);
                }
                Some(due)
            }
        });
        pending.chain(links).min()
    }

    /// This gateway's link key (certified by its root; its peers learn it in the handshake).
    pub fn link_key(&self) -> DevicePublicKey {
        self.me.key.public()
    }

    /// Tests: as if `peer` had proved `key` in a handshake, on a link that just came up (on a
    /// connection of its own number, far from any device's).
    #[cfg(test)]
    pub(crate) fn assume_peer_key(&mut self, peer: &str, key: DevicePublicKey) {
        if let Some(link) = self.links.get_mut(peer) {
            link.peer_key = Some(key);
            link.state = LinkState::Up {
                conn: ConnectionId(u64::MAX - 1),
            };
            link.crl_pushed = None;
        }
    }

    /// Tests: as if the link to `peer` (assumed by [`Federation::assume_peer_key`]) came up
    /// again (`up`) or went down, as the gateway hears of it.
    #[cfg(test)]
    pub(crate) fn assume_link_change(&mut self, peer: &str, up: bool) {
        if let Some(link) = self.links.get_mut(peer) {
            link.state = if up {
                LinkState::Up {
                    conn: ConnectionId(u64::MAX - 1),
                }
            } else {
                LinkState::Down {
                    retry_at: Instant(u64::MAX),
                }
            };
            self.link_changes.push_back((peer.to_string(), up));
        }
    }

    /// Tests: as if a handshake with `peer` had proved its root `root`.
    #[cfg(test)]
    pub(crate) fn assume_peer_root(&mut self, peer: &str, root: DevicePublicKey) {
        if let Some(link) = self.links.get_mut(peer) {
            link.peer_root = Some(root);
        }
    }

    /// Tests: as if no handshake had ever proved `peer`'s root.
    #[cfg(test)]
    pub(crate) fn forget_peer_root(&mut self, peer: &str) {
        if let Some(link) = self.links.get_mut(peer) {
            link.peer_root = None;
        }
    }

    /// Signs `message` with this gateway's link key (what it sequences for its peers).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.me.key.sign(message)
    }

    /// The gateway is stopping on purpose: each peer whose link is up is told so (a goodbye
    /// with `shutting_down`) and the connection closed, so that the peer takes the link's end
    /// as expected rather than as a fault. Nothing durable changes.
    pub fn shut_down(&mut self) {
        let goodbye = frame(
            Routing::default(),
            Payload::Goodbye(Goodbye {
                code: ErrorCode::ShuttingDown as u16,
                message: "the gateway is shutting down".into(),
                retry_after_ms: None,
            }),
        );
        for link in self.links.values() {
            if let LinkState::Up { conn } = link.state {
                self.fx.hold(FederationOutput::Send(conn, goodbye.clone()));
                self.fx.hold(FederationOutput::Close(conn));
            }
        }
    }

    /// Records the version of `peer`'s CRL this gateway holds, told to the peer in heartbeats.
    pub fn set_crl_held(&mut self, peer: &str, version: u64) {
        if let Some(link) = self.links.get_mut(peer) {
            link.crl_held = version;
        }
    }

    /// The peers whose link is up and that said they hold an older version of this gateway's
    /// CRL than `version`, unless it was queued for them since their link came up. The gateway
    /// queues it and calls [`Federation::crl_queued`].
    pub fn crl_behind(&self, version: u64) -> Vec<String> {
        self.links
            .iter()
            .filter(|(_, l)| matches!(l.state, LinkState::Up { .. }))
            .filter(|(_, l)| l.peer_holds_crl.is_some_and(|held| held < version))
            .filter(|(_, l)| l.crl_pushed.is_none_or(|pushed| pushed < version))
            .map(|(peer, _)| peer.clone())
            .collect()
    }

    /// The gateway refused a relay from `peer` by its limit per peer (counted for
    /// [`LinkReport::relays_limited`]).
    pub fn count_relay_limited(&mut self, peer: &str) {
        if let Some(link) = self.links.get_mut(peer) {
            link.relays_limited += 1;
        }
    }

    /// The connection of the link to `peer` if it is up, and how long the link may stay
    /// silent before it is closed: what a pause of its reading must stay well within.
    pub fn up_link(&self, peer: &str) -> Option<(ConnectionId, Duration)> {
        match self.links.get(peer)?.state {
            LinkState::Up { conn } => Some((conn, self.timers.idle_timeout)),
            _ => None,
        }
    }

    /// A relay from `peer` refused by the limit per peer came before the hint an earlier
    /// refusal gave (counted for [`LinkReport::relays_past_hint`]).
    pub fn count_relay_past_hint(&mut self, peer: &str) {
        if let Some(link) = self.links.get_mut(peer) {
            link.relays_past_hint += 1;
        }
    }

    /// The gateway's limit per peer let a relay from `peer` through (counted for
    /// [`LinkReport::relays_admitted`]).
    pub fn count_relay_admitted(&mut self, peer: &str) {
        if let Some(link) = self.links.get_mut(peer) {
            link.relays_admitted += 1;
        }
    }

    /// This gateway's CRL `version` was queued for `peer`.
    pub fn crl_queued(&mut self, peer: &str, version: u64) {
        if let Some(link) = self.links.get_mut(peer) {
            link.crl_pushed = Some(version);
        }
    }

    /// True if `root` is the trust root key whose fingerprint this gateway pins for `peer`.
    pub fn pins_root(&self, peer: &str, root: DevicePublicKey) -> bool {
        self.peers.iter().any(|p| p.domain == peer && pins(p, root))
    }

    /// How many times a handshake proved a peer root not held before (since this machine
    /// started): when it moves, the set the gateway vouches for changed.
    pub fn roots_learned(&self) -> u64 {
        self.roots_learned
    }

    /// Each peer's trust root key that a handshake proved (now or before a restart), by
    /// domain: what the gateway's own root vouches for to its devices.
    pub fn peer_roots(&self) -> BTreeMap<String, DevicePublicKey> {
        self.links
            .iter()
            .filter_map(|(domain, link)| link.peer_root.map(|root| (domain.clone(), root)))
            .collect()
    }

    fn heard_crl(&mut self, peer: &str, held: Option<u64>) {
        if let (Some(link), Some(held)) = (self.links.get_mut(peer), held) {
            link.peer_holds_crl = Some(held);
        }
    }

    /// The link key `peer` proved in its last handshake (known once a link came up since
    /// this gateway started; entries arrive only on such a link).
    pub fn peer_key(&self, peer: &str) -> Option<DevicePublicKey> {
        self.links.get(peer).and_then(|l| l.peer_key)
    }

    /// The next entry received from a peer that the gateway has not taken yet, with the
    /// peer's domain. The gateway takes each while handling the input that brought it, so
    /// that what it does with the entry commits with the cursor that marks it received.
    pub fn take_arrived(&mut self) -> Option<(String, Bytes)> {
        self.arrived.pop_front()
    }

    /// The next link that came up (`true`) or went down, oldest first. The gateway takes
    /// each while handling the input that caused it, before the entries it brought.
    pub fn take_link_change(&mut self) -> Option<(String, bool)> {
        self.link_changes.pop_front()
    }

    /// What accumulated since the last call: writes to commit, and the outputs they release.
    pub fn poll_ready(&mut self) -> Option<Ready<FederationOutput>> {
        self.fx.take_ready()
    }

    /// The counters.
    pub fn stats(&self) -> FederationStats {
        self.stats
    }

    /// True if `peer` is a configured federation peer.
    pub fn is_peer(&self, peer: &str) -> bool {
        self.links.contains_key(peer)
    }

    /// True if the link to `peer` is authenticated and up.
    pub fn is_up(&self, peer: &str) -> bool {
        self.links
            .get(peer)
            .is_some_and(|l| matches!(l.state, LinkState::Up { .. }))
    }

    /// The last number given to an entry for `peer` (0: none yet).
    pub fn numbered(&self, peer: &str) -> u64 {
        self.links.get(peer).map_or(0, |l| l.numbered)
    }

    /// Every configured link as an operator sees it, by domain.
    pub fn links(&self, now: Instant) -> Vec<LinkReport> {
        self.links
            .iter()
            .map(|(domain, l)| LinkReport {
                domain: domain.clone(),
                root_fingerprint: l.peer.root_fingerprint.clone(),
                dials: l.dials,
                state: match l.state {
                    LinkState::Down { .. } => "down",
                    LinkState::Dialing { .. } => "dialing",
                    LinkState::Hello { .. } | LinkState::Finishing { .. } => "authenticating",
                    LinkState::Up { .. } => "up",
                },
                numbered: l.numbered,
                acknowledged: l.acked,
                queued: l.outbox.len(),
                taken: l.cursor,
                failed_attempts: l.attempts,
                silent_for: now.saturating_since(l.last_heard),
                crl_held: l.crl_held,
                peer_holds_crl: l.peer_holds_crl,
                relays_limited: l.relays_limited,
                relays_past_hint: l.relays_past_hint,
                relays_admitted: l.relays_admitted,
            })
            .collect()
    }

    /// Entries queued for `peer` and not yet acknowledged.
    pub fn queued(&self, peer: &str) -> usize {
        self.links.get(peer).map_or(0, |l| l.outbox.len())
    }

    fn peer_on(&self, conn: ConnectionId) -> Option<String> {
        self.links.iter().find_map(|(domain, l)| match &l.state {
            LinkState::Hello { conn: c, .. }
            | LinkState::Finishing { conn: c, .. }
            | LinkState::Up { conn: c }
                if *c == conn =>
            {
                Some(domain.clone())
            }
            _ => None,
        })
    }

    fn connected(&mut self, now: Instant, peer: &str, conn: ConnectionId, binding: ChannelBinding) {
        let Some(link) = self.links.get_mut(peer) else {
            self.fx.hold(FederationOutput::Close(conn));
            return;
        };
        if !matches!(link.state, LinkState::Dialing { .. }) {
            self.fx.hold(FederationOutput::Close(conn)); // a late dial: not wanted any more
            return;
        }
        let (dialing, hello) =
            handshake::dial(&self.me, &link.peer, binding, self.entropy.as_mut());
        link.state = LinkState::Hello {
            conn,
            since: now,
            dialing,
        };
        let hello = FederationHello {
            message: hello.into(),
        };
        self.fx.hold(FederationOutput::Send(
            conn,
            frame(Routing::default(), Payload::FederationHello(hello)),
        ));
    }

    fn frame(&mut self, now: Instant, conn: ConnectionId, bytes: &[u8]) {
        let decoded = match Frame::decode(bytes, PAYLOAD_BYTES_MAX) {
            Ok(f) => f,
            Err(e) => return self.protocol_error(now, conn, format!("an unreadable frame: {e}")),
        };
        if self.pending.contains_key(&conn) {
            return self.pending_frame(now, conn, decoded);
        }
        let Some(peer) = self.peer_on(conn) else {
            return; // a connection already given up: nothing on it counts
        };
        let link = self.links.get_mut(&peer).expect("found");
        link.last_heard = now;
        match (&link.state, decoded.payload) {
            (LinkState::Hello { .. }, Payload::FederationHello(reply)) => {
                let LinkState::Hello { dialing, .. } =
                    core::mem::replace(&mut link.state, LinkState::Finishing { conn, since: now })
                else {
                    unreachable!("matched above")
                };
                match dialing.finish(&self.me, &reply.message, now) {
                    Ok((finish, peer_key, peer_root)) => {
                        link.peer_key = Some(peer_key);
                        if link.peer_root != Some(peer_root) {
                            link.peer_root = Some(peer_root);
                            let domain = link.peer.domain.as_bytes().to_vec();
                            self.fx.writes().put(
                                FEDERATION_ROOTS_TABLE,
                                domain,
                                peer_root.0.to_vec(),
                            );
                            self.roots_learned += 1;
                        }
                        let finish = FederationHello {
                            message: finish.into(),
                        };
                        self.fx.hold(FederationOutput::Send(
                            conn,
                            frame(Routing::default(), Payload::FederationHello(finish)),
                        ));
                    }
                    Err(e) => {
                        self.stats.handshakes_refused += 1;
                        self.fx.hold(FederationOutput::Refused {
                            conn,
                            reason: e.to_string(),
                        });
                        self.fx.hold(FederationOutput::Close(conn));
                        self.down(now, &peer, format!("authentication failed: {e}"));
                    }
                }
            }
            (LinkState::Up { .. }, Payload::FederationForward(forward)) => {
                self.forwarded(
                    &peer,
                    conn,
                    decoded.routing.seq,
                    Bytes::from(Vec::from(forward.body)),
                );
            }
            (LinkState::Up { .. }, Payload::FederationAck(ack)) => {
                self.heard_crl(&peer, ack.crl);
                self.acknowledged(now, &peer, decoded.routing.seq, ack.gap.is_some());
            }
            (LinkState::Up { conn }, Payload::Goodbye(_)) => {
                // The peer is stopping on purpose: its entries wait in the outboxes of both.
                let conn = *conn;
                self.fx.hold(FederationOutput::Close(conn));
                let reason = "the peer gateway shut down; the link comes back when it does";
                self.went_down(now, &peer, reason.into(), true);
            }
            (LinkState::Finishing { .. }, Payload::FederationAck(ack)) => {
                // The answerer checked the finish: up, and its cursor trims the outbox.
                self.up(now, &peer, conn);
                self.heard_crl(&peer, ack.crl);
                self.acknowledged(now, &peer, decoded.routing.seq, false);
            }
            // A copy of a handshake message (the network duplicated it), or a frame of the
            // other side that overtook the last handshake step: nothing to act on. (QUIC keeps
            // a stream in order and never duplicates; the simulator's network does both.)
            (LinkState::Hello { .. } | LinkState::Finishing { .. }, _)
            | (LinkState::Up { .. }, Payload::FederationHello(_)) => {}
            (_, other) => {
                let what = format!("a {:?} frame out of place", other.opcode());
                self.protocol_error(now, conn, what);
            }
        }
    }

    fn pending_frame(&mut self, now: Instant, conn: ConnectionId, decoded: Frame) {
        let Payload::FederationHello(hello) = decoded.payload else {
            self.pending.remove(&conn);
            let what = format!(
                "a {:?} frame before authentication",
                decoded.payload.opcode()
            );
            return self.protocol_error(now, conn, what);
        };
        let step = self.pending.remove(&conn).expect("checked");
        match step {
            Pending::AwaitHello { binding, .. } => {
                match handshake::answer(
                    &self.me,
                    &self.peers,
                    &hello.message,
                    binding,
                    now,
                    self.entropy.as_mut(),
                ) {
                    Ok((answering, reply)) => {
                        let reply = FederationHello {
                            message: reply.into(),
                        };
                        self.fx.hold(FederationOutput::Send(
                            conn,
                            frame(Routing::default(), Payload::FederationHello(reply)),
                        ));
                        self.pending.insert(
                            conn,
                            Pending::AwaitFinish {
                                since: now,
                                answering,
                            },
                        );
                    }
                    Err(e) => self.refused(conn, &e),
                }
            }
            Pending::AwaitFinish { since, answering } if handshake::is_hello(&hello.message) => {
                // A copy of the hello already answered.
                self.pending
                    .insert(conn, Pending::AwaitFinish { since, answering });
            }
            Pending::AwaitFinish { answering, .. } => match answering.finish(&hello.message) {
                Ok((peer, peer_key, peer_root)) => {
                    let link = self.links.get_mut(&peer).expect("answer found the peer");
                    link.peer_key = Some(peer_key);
                    if link.peer_root != Some(peer_root) {
                        link.peer_root = Some(peer_root);
                        self.fx.writes().put(
                            FEDERATION_ROOTS_TABLE,
                            peer.as_bytes().to_vec(),
                            peer_root.0.to_vec(),
                        );
                        self.roots_learned += 1;
                    }
                    match link.state {
                        LinkState::Hello { conn: old, .. }
                        | LinkState::Finishing { conn: old, .. }
                        | LinkState::Up { conn: old } => {
                            // The peer dialed again: the new connection replaces the old.
                            self.fx.hold(FederationOutput::Close(old));
                        }
                        LinkState::Down { .. } | LinkState::Dialing { .. } => {}
                    }
                    link.last_heard = now;
                    self.up(now, &peer, conn);
                }
                Err(e) => self.refused(conn, &e),
            },
        }
    }

    fn refused(&mut self, conn: ConnectionId, error: &FederationHandshakeError) {
        self.stats.handshakes_refused += 1;
        self.refuse(conn, error.to_string());
    }

    fn refuse(&mut self, conn: ConnectionId, reason: String) {
        self.fx.hold(FederationOutput::Refused { conn, reason });
        self.fx.hold(FederationOutput::Close(conn));
    }

    fn protocol_error(&mut self, now: Instant, conn: ConnectionId, what: String) {
        self.stats.protocol_errors += 1;
        self.pending.remove(&conn);
        self.refuse(conn, what.clone());
        if let Some(peer) = self.peer_on(conn) {
            self.down(now, &peer, what);
        }
    }

    fn up(&mut self, now: Instant, peer: &str, conn: ConnectionId) {
        let link = self.links.get_mut(peer).expect("a configured peer");
        link.state = LinkState::Up { conn };
        link.attempts = 0;
        link.sent = link.acked;
        link.last_heard = now;
        link.last_beat = now;
        link.last_progress = now;
        self.stats.links_up += 1;
        link.crl_pushed = None;
        // The cursor first, so the peer trims what this side already holds.
        let ack = frame(with_seq(link.cursor), Payload::FederationAck(link.beat()));
        self.fx.hold(FederationOutput::Send(conn, ack));
        self.fx.hold(FederationOutput::LinkUp {
            peer: peer.to_string(),
        });
        self.link_changes.push_back((peer.to_string(), true));
        self.pump(now, peer);
    }

    fn down(&mut self, now: Instant, peer: &str, reason: String) {
        self.went_down(now, peer, reason, false);
    }

    fn went_down(&mut self, now: Instant, peer: &str, reason: String, graceful: bool) {
        let delay = {
            let link = self.links.get_mut(peer).expect("a configured peer");
            let was_up = matches!(link.state, LinkState::Up { .. });
            link.attempts = link.attempts.saturating_add(1);
            let base = self
                .timers
                .backoff_initial
                .saturating_mul(1u32 << link.attempts.min(16).saturating_sub(1))
                .min(self.timers.backoff_max);
            if was_up {
                self.stats.links_down += 1;
            }
            base
        };
        // Full jitter over the upper half: [delay/2, delay].
        let half = delay / 2;
        let jitter_us = u64::try_from(half.as_micros()).unwrap_or(u64::MAX).max(1);
        let jitter = Duration::from_micros(self.entropy.next_u64() % jitter_us);
        let link = self.links.get_mut(peer).expect("a configured peer");
        if matches!(link.state, LinkState::Up { .. }) {
            self.fx.hold(FederationOutput::LinkDown {
                peer: peer.to_string(),
                reason,
                graceful,
            });
            self.link_changes.push_back((peer.to_string(), false));
        }
        link.state = LinkState::Down {
            retry_at: now + half + jitter,
        };
        link.sent = link.acked;
        link.gap_told = None;
        link.went_back_from = None;
    }

    fn forwarded(&mut self, peer: &str, conn: ConnectionId, seq: u64, body: Bytes) {
        let link = self.links.get_mut(peer).expect("a configured peer");
        if seq <= link.cursor {
            self.stats.duplicates += 1;
        } else if seq == link.cursor + 1 {
            link.cursor = seq;
            self.fx.put(
                FEDERATION_CURSORS_TABLE,
                peer_key(peer),
                seq.to_be_bytes().to_vec(),
            );
            self.arrived.push_back((peer.to_string(), body.clone()));
            self.fx.hold(FederationOutput::Received {
                peer: peer.to_string(),
                seq,
                body,
            });
        } else {
            self.stats.gaps += 1;
            if link.gap_told == Some(link.cursor) {
                return; // told already: the sender is going back
            }
            link.gap_told = Some(link.cursor);
            // Held: it names the cursor, which must be durable first.
            let ack = frame(
                with_seq(link.cursor),
                Payload::FederationAck(FederationAck {
                    gap: Some(seq),
                    crl: None,
                }),
            );
            self.fx.hold(FederationOutput::Send(conn, ack));
            return;
        }
        // Held: it leaves after the cursor's write is durable.
        let ack = frame(
            with_seq(link.cursor),
            Payload::FederationAck(FederationAck::default()),
        );
        self.fx.hold(FederationOutput::Send(conn, ack));
    }

    fn acknowledged(&mut self, now: Instant, peer: &str, upto: u64, gap: bool) {
        let link = self.links.get_mut(peer).expect("a configured peer");
        if upto > link.numbered {
            // The peer holds a cursor from an earlier history of this outbox.
            self.stats.cursor_ahead += 1;
            link.numbered = upto;
            let stale: Vec<u64> = link.outbox.keys().copied().collect();
            for seq in stale {
                // Numbers the peer already took for other entries: these can never arrive
                // under them. Queued again under new numbers.
                let body = link.outbox.remove(&seq).expect("listed");
                self.fx
                    .delete(FEDERATION_OUTBOX_TABLE, entry_key(peer, seq));
                link.numbered += 1;
                let fresh = link.numbered;
                self.fx.put(
                    FEDERATION_OUTBOX_TABLE,
                    entry_key(peer, fresh),
                    body.to_vec(),
                );
                link.outbox.insert(fresh, body);
            }
            let numbered = link.numbered;
            self.fx.put(
                FEDERATION_NUMBERS_TABLE,
                peer_key(peer),
                numbered.to_be_bytes().to_vec(),
            );
            link.acked = upto;
            link.sent = upto;
            self.fx.hold(FederationOutput::HistoryBehind {
                peer: peer.to_string(),
                peer_cursor: upto,
            });
            self.pump(now, peer);
            return;
        }
        if upto <= link.acked {
            let lost = gap && upto == link.acked && link.sent > link.acked;
            if lost && link.went_back_from != Some(upto) {
                // The peer got an entry past one it lost: everything after its cursor goes
                // again now.
                link.went_back_from = Some(upto);
                self.stats.fast_resends += 1;
                self.stats.resent += link.sent - link.acked;
                link.sent = link.acked;
                link.last_progress = now;
                self.pump(now, peer);
            }
            return;
        }
        let done: Vec<u64> = link.outbox.range(..=upto).map(|(&s, _)| s).collect();
        for seq in done {
            link.outbox.remove(&seq);
            self.fx
                .delete(FEDERATION_OUTBOX_TABLE, entry_key(peer, seq));
        }
        link.acked = upto;
        link.sent = link.sent.max(upto);
        link.last_progress = now;
        self.pump(now, peer);
    }

    /// Sends what the window allows on an up link.
    fn pump(&mut self, _now: Instant, peer: &str) {
        let link = self.links.get_mut(peer).expect("a configured peer");
        let LinkState::Up { conn } = link.state else {
            return;
        };
        while link.sent < link.numbered && link.sent - link.acked < WINDOW {
            let seq = link.sent + 1;
            let Some(body) = link.outbox.get(&seq) else {
                debug_assert!(false, "entry {seq} past the acknowledgement is queued");
                break;
            };
            let forward = FederationForward {
                body: body.to_vec().into(),
            };
            // Held: an entry leaves only once its number is durable here.
            self.fx.hold(FederationOutput::Send(
                conn,
                frame(with_seq(seq), Payload::FederationForward(forward)),
            ));
            link.sent = seq;
        }
    }
}
