//! The gateway state machine: a thin router over sub-machines that each own their state.
//!
//! Shape (quinn-proto / str0m style):
//! - getters take `&self` (`conversation_head`, `stats`, ...);
//! - [`Gateway::handle`] takes every input (a connection accepted or closed, a frame, an admin
//!   command) with the current time;
//! - [`Gateway::handle_timeout`] runs periodic work when [`Gateway::poll_timeout`] says so;
//! - [`Gateway::poll_ready`] hands out the writes and outputs produced since the last call.
//!
//! Drain rule: after every `handle` or `handle_timeout`, call `poll_ready` until it returns `None`
//! and re-read `poll_timeout`. Commit each `Ready`'s writes before releasing its outputs (see
//! [`crate::env::Ready`]): an acknowledgement never leaves before the message it acknowledges is
//! durable.
//!
//! The sub-machines, each with its tables and the store codec of its records:
//! - [`session`]: connections, the handshake (hello, challenge, proof), resume tokens, hello
//!   and idle timeouts;
//! - [`delivery`]: conversation logs ([`sequencer`]), each sender's order ([`sender_order`]),
//!   cursors, delivery windows (pump, rewind, acknowledge), device inboxes, garbage collection;
//! - [`registry`]: the registration authority (register, vouch, renew, revoke, CRL) and the
//!   binding of devices to users;
//! - [`groups`]: MLS conversations (commit admission, roles, the external sender, removals);
//! - [`key_packages`]: the KeyPackage directory;
//! - [`limits`]: rate limits per device and per user (abuse controls);
//! - [`social`]: contacts, blocks and invisibility (who may see whose presence, who may fetch
//!   whose KeyPackages);
//! - [`presence`]: who is online, last-seen times, and the watchlists told of them;
//! - [`files`]: the chunk index of file transfers (quota, references, uploads, damage at rest),
//!   and [`transfers`], its wire side (membership, answers, chunks to serve).
//!
//! This module only routes: it decodes a frame, asks the sub-machines, and carries effects that
//! span several of them (a commit that changes membership, a revocation). Every handler writes
//! into one effects sink ([`Effects`]); every error or goodbye the gateway sends goes through
//! `Gateway::refuse`, which sends it and counts it by code.

mod admin;
mod config;
mod contacts_abroad;
pub mod delivery;
pub mod dm_claims;
pub mod external_keys;
pub mod files;
pub mod foreign_fetch;
mod foreign_members;
pub mod groups;
pub mod handover;
pub mod held_entries;
pub mod held_sends;
pub mod key_packages;
pub mod limits;
pub mod links;
pub mod outgoing;
pub mod peer_crls;
pub mod peer_hints;
pub mod presence;
pub mod presence_abroad;
mod refusal;
pub mod registry;
mod relay;
pub mod sender_order;
pub mod sequencer;
pub mod session;
pub mod social;
pub mod spanning;
#[cfg(test)]
mod test_devices;
#[cfg(test)]
mod test_pair;
pub mod transfers;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::effects::Effects;
use crate::env::{Entropy, Ready, StoreError, StoreRead};
use crate::federation::entry::{statement_of, Entry};
use crate::federation::{EnqueueError, Federation, FederationInput, FederationOutput};
use crate::identity::{session_proof_message, DevicePublicKey};
use crate::ids::{ConnectionId, ConversationId, DeviceId, MsgId, UserId};
use crate::planted::PlantedBug;
use crate::time::Instant;
use crate::timers::{TimerName, TimerTable};
use crate::trust::{RegistrationAuthority, TrustRoot};
use crate::wire::payload::{
    Ack, Challenge, ContactAction, Cursor, ErrorCode, ErrorReport, Goodbye, Heartbeat, Hello,
    HelloOk, Proof, Send,
};
use crate::wire::{Frame, Payload, Routing};

use delivery::{AppendError, Delivery, DeliveryStats};
use groups::{GroupEffect, GroupState, Groups, Removal};
use key_packages::KeyPackageService;
use limits::Limits;
use presence::Presence;
use registry::Registry;
use sequencer::{Appended, ConversationLog};
use session::{Challenged, Resume, Sessions, Stage};
use social::Social;
use transfers::Transfers;

use held_sends::Holding;

/// What taking one device message did (see [`Gateway::accept_one`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Taken {
    /// Sequenced now, or earlier (a duplicate): what is held behind it may follow.
    Sequenced,
    /// Held until the message before it arrives.
    Held,
    /// Refused: what is held behind it cannot follow.
    Refused,
    /// Relayed to another domain's authority, which answers for it: what is held behind it
    /// may follow it there.
    Relayed,
}

pub use admin::{AdminAnswer, AdminCommand};
pub use config::GatewayConfig;
pub use delivery::{HistoryKind, LostHistory, CURSORS_TABLE, FENCE_MAX, INBOX_TABLE};
pub use refusal::{GatewayStats, Refusal, RefusalCounts};
pub use registry::USERS_TABLE;
pub use relay::SpanningStats;
pub use session::TOKENS_TABLE;
pub use transfers::{ChunkToServe, TransferStats};

/// Inputs to [`Gateway::handle`].
#[derive(Clone, Debug)]
pub enum GatewayInput {
    /// A node connected, from an address the driver does not give (no limits per address).
    Accepted(ConnectionId),
    /// A node connected from a source address (limits per address apply to it).
    AcceptedFrom(ConnectionId, limits::SourceAddress),
    /// A frame arrived on a connection's message stream.
    Frame(ConnectionId, Bytes),
    /// A chunk stream of a connection was read whole: its first frame (a `Chunk` head) and
    /// the bytes after it. The driver reads at most the head's `len` (checked with
    /// `ChunkHead::check_len` before reading) and hands over exactly what it read.
    Chunk {
        /// The connection.
        conn: ConnectionId,
        /// The encoded head frame.
        head: Bytes,
        /// The sealed chunk.
        body: Bytes,
    },
    /// A chunk the gateway asked the driver to serve ([`GatewayOutput::ServeChunk`]) failed
    /// its digest check when read: damaged at rest. It was not sent.
    ChunkDamaged(ChunkToServe),
    /// A connection is gone.
    Closed(ConnectionId),
    /// About a federation link (a connection to or from a peer gateway, never a device's):
    /// ignored when no peer is configured.
    Federation(FederationInput),
    /// An operator's command; its answer leaves as [`GatewayOutput::Admin`] with the same
    /// `request`, released by the commit that makes it true.
    Admin {
        /// Chosen by the driver to match the answer.
        request: u64,
        /// What to do.
        command: AdminCommand,
    },
}

/// Outputs released by a committed [`Ready`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewayOutput {
    /// Send an encoded frame on a connection.
    Send(ConnectionId, Bytes),
    /// Close a connection (after sending any frame queued before this output).
    Close(ConnectionId),
    /// The answer to an operator's command.
    Admin {
        /// The request it answers.
        request: u64,
        /// The answer.
        answer: AdminAnswer,
    },
    /// For the operator: a device's cursor showed that this gateway lost messages it had
    /// acknowledged (its disk lost writes it reported durable). Lost seqs are marked lost, and
    /// members are told as they reach them; a device whose history diverged was told; the disk
    /// needs looking at.
    HistoryLost(LostHistory),
    /// Read a chunk's blob from the store, check it (`files::verify_blob`), and send it to the
    /// connection on a chunk stream of its own: [`ChunkToServe::head`], then the bytes. A
    /// blob that fails the check is not sent but reported as [`GatewayInput::ChunkDamaged`].
    ServeChunk(ChunkToServe),
    /// For the operator: a handover this gateway started is done, or was declined (see
    /// [`handover`]). Drivers log it; the simulator reports its duration.
    HandedOver(handover::HandedOver),
    /// What the federation links ask or report (see [`crate::federation`]); only with
    /// federation peers configured.
    Federation(FederationOutput),
    /// For the operator: a peer domain's CRL was taken or refused (see [`peer_crls`]).
    PeerCrl(peer_crls::PeerCrlEvent),
    /// For the operator: the peer gateway of `peer` relays more than its limit here and the
    /// excess is refused (`peer_limited`); at most once a minute per peer while it lasts.
    PeerLimited {
        /// The peer's domain.
        peer: String,
        /// Its limit.
        rate: limits::Rate,
    },
    /// A peer gateway goes on relaying past the `peer_limited` hints it was given: its link's
    /// reading is paused for `pause` (told at most once a minute per peer while it lasts).
    PeerIgnoresHints {
        /// The peer's domain.
        peer: String,
        /// How long this pause is.
        pause: core::time::Duration,
    },
    /// Read nothing more from this connection for this long: its device (or, on a federation
    /// link, its peer gateway) was refused by a rate limit, and what it sends meanwhile would
    /// be refused too. The driver stops reading the connection's stream, so QUIC's flow
    /// control holds the sender back instead of the gateway decoding and refusing each frame;
    /// reading resumes in order, nothing is dropped.
    PauseReading(ConnectionId, core::time::Duration),
}

/// Shortest pause of reading after a rate-limit refusal: a device that ignores the hint then
/// costs the gateway at most one read of its stream per pause.
pub const READ_PAUSE_MIN: core::time::Duration = core::time::Duration::from_millis(200);
/// Longest pause of reading (and never more than a quarter of the session's, or the link's,
/// idle timeout).
pub const READ_PAUSE_MAX: core::time::Duration = core::time::Duration::from_secs(2);

/// The gateway's effects sink.
pub(crate) type Fx = Effects<GatewayOutput>;

impl Effects<GatewayOutput> {
    /// Queues a frame to `conn`, released with this batch's commit.
    pub(crate) fn send(&mut self, conn: ConnectionId, routing: Routing, payload: Payload) {
        self.hold(GatewayOutput::Send(
            conn,
            Frame::new(routing, payload).encode(),
        ));
    }
}

/// Time between two steps deleting chunks no upload references (each at most
/// [`files::CHUNK_DROP_STEP_BYTES`]): about 160 MiB a second, spread thinly enough that the
/// commits of messages between them stay short (freed pages cost the commits after them too).
pub const CHUNK_DROP_INTERVAL: core::time::Duration = core::time::Duration::from_millis(25);

/// What a device hears when its commit adds a user who blocked its user: the same words
/// wherever the block is found (the conversation's home, or the device's own gateway before
/// relaying), and never naming the block.
const NOT_ACCEPTED_FROM_YOU: &str = "a user this commit adds does not accept invitations from you";

/// The gateway's timers, in firing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatewayTimer {
    /// Housekeeping: hello and idle timeouts, stalled windows, inbox resends, a GC step,
    /// expired resume tokens.
    Tick,
    /// The next GC step while a step left a backlog.
    GcBacklog,
    /// The next step deleting chunks no upload references any more.
    ChunkDrop,
}

impl TimerName for GatewayTimer {
    const ALL: &'static [GatewayTimer] = &[
        GatewayTimer::Tick,
        GatewayTimer::GcBacklog,
        GatewayTimer::ChunkDrop,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// The gateway of one domain as a deterministic state machine. See the module docs.
pub struct Gateway {
    config: GatewayConfig,
    entropy: Box<dyn Entropy + core::marker::Send>,
    sessions: Sessions,
    delivery: Delivery,
    registry: Registry,
    groups: Groups,
    key_packages: KeyPackageService,
    transfers: Transfers,
    limits: Limits,
    /// The source address of each connection whose driver gave one (see [`limits`]).
    sources: BTreeMap<ConnectionId, limits::SourceAddress>,
    social: Social,
    presence: Presence,
    /// The time of the input being handled (for effects of a session's end, whose callers
    /// do not pass it).
    now: Instant,
    timers: TimerTable<GatewayTimer>,
    refusals: RefusalCounts,
    /// Links to peer gateways (`None`: no federation peer configured).
    federation: Option<Federation>,
    /// Conversations spanning domains: this gateway's role in each.
    spanning: spanning::Spanning,
    spanning_stats: relay::SpanningStats,
    /// Entries for peer gateways, queued on their links as bundles when a batch ends.
    outgoing: outgoing::Outgoing,
    handover_stats: handover::HandoverStats,
    /// The CRLs of the domains this gateway federates with.
    peer_crls: peer_crls::PeerCrls,
    /// KeyPackage fetches of other domains' users, at both ends.
    foreign_fetches: foreign_fetch::ForeignFetches,
    /// Which gateway makes each DM between users of two domains.
    dm_claims: dm_claims::DmClaims,
    /// The hints given to peers' relays past their limit, to tell a peer that ignores them.
    peer_hints: peer_hints::PeerHints,
    /// The hints other domains' authorities gave this gateway's devices, held to.
    held_hints: peer_hints::HeldHints,
    external_keys: external_keys::ExternalKeys,
    held_entries: held_entries::HeldEntries,
    /// Messages that came ahead of their sender's order (in memory; see `held_sends`).
    held_sends: held_sends::HeldSends,
    held_send_stats: held_sends::HeldSendStats,
    /// The peer roots last vouched for to devices (see `Gateway::peer_roots`).
    peer_roots: Option<crate::trust::peer_roots::PeerRoots>,
    /// The federation's count of roots learned when open sessions were last told the set.
    roots_told: u64,
    fx: Fx,
}

impl core::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Gateway")
            .field("conversations", &self.delivery.conversations().count())
            .field("sessions", &self.sessions.len())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway with empty storage and a new trust root (its records are the first writes
    /// `poll_ready` hands out). `entropy` supplies keys, challenge nonces and tokens.
    pub fn new(
        config: GatewayConfig,
        now: Instant,
        entropy: Box<dyn Entropy + core::marker::Send>,
    ) -> Gateway {
        let mut entropy = entropy;
        let mut fx = Fx::default();
        let registry = Registry::new(
            config.domain.clone(),
            config.open_enrolment,
            now,
            entropy.as_mut(),
            fx.writes(),
        );
        let mut gateway = Gateway::assemble(
            config.clone(),
            now,
            entropy,
            Sessions::default(),
            Delivery::new(config.delivery_limits()),
            registry,
            Groups::default(),
            KeyPackageService::new(config.directory.clone()),
            Transfers::new(config.files.clone()),
            (Social::default(), Presence::default()),
        );
        gateway.federation = links::start(
            &gateway.config,
            gateway.registry.authority(),
            &crate::env::MemStore::default(),
            now,
            gateway.entropy.as_mut(),
            fx.writes(),
        )
        .expect("an empty store reads without error");
        let nonce = gateway.draw_u64();
        gateway.delivery.start_run(nonce);
        gateway.fx = fx;
        gateway
    }

    /// A number from the gateway's entropy.
    fn draw_u64(&mut self) -> u64 {
        let mut bytes = [0u8; 8];
        self.entropy.fill_bytes(&mut bytes);
        u64::from_be_bytes(bytes)
    }

    /// Rebuilds a gateway from committed storage after a (re)start. Sessions start empty; resume
    /// tokens survive.
    pub fn recover(
        config: GatewayConfig,
        now: Instant,
        store: &dyn StoreRead,
        entropy: Box<dyn Entropy + core::marker::Send>,
    ) -> Result<Gateway, StoreError> {
        let mut entropy = entropy;
        let mut fx = Fx::default();
        let groups = Groups::recover(store)?;
        let delivery = Delivery::recover(config.delivery_limits(), store)?;
        let registry = Registry::recover(
            config.domain.clone(),
            config.open_enrolment,
            now,
            store,
            entropy.as_mut(),
            fx.writes(),
        )?;
        let key_packages = KeyPackageService::recover(config.directory.clone(), store)?;
        let sessions = Sessions::recover(store)?;
        let transfers = Transfers::recover(config.files.clone(), store)?;
        let social = (Social::recover(store)?, Presence::recover(store)?);
        let mut gateway = Gateway::assemble(
            config,
            now,
            entropy,
            sessions,
            delivery,
            registry,
            groups,
            key_packages,
            transfers,
            social,
        );
        gateway.federation = links::start(
            &gateway.config,
            gateway.registry.authority(),
            store,
            now,
            gateway.entropy.as_mut(),
            fx.writes(),
        )?;
        gateway.spanning = spanning::Spanning::recover(store)?;
        gateway.peer_crls = peer_crls::PeerCrls::recover(store)?;
        gateway.foreign_fetches = foreign_fetch::ForeignFetches::recover(store)?;
        gateway.dm_claims = dm_claims::DmClaims::recover(store)?;
        gateway.external_keys = external_keys::ExternalKeys::recover(store)?;
        gateway.held_entries = held_entries::HeldEntries::recover(store)?;
        if let Some(federation) = &mut gateway.federation {
            for (domain, crl) in gateway.peer_crls.held() {
                federation.set_crl_held(domain, crl.version);
            }
        }
        let awaiting: Vec<ConversationId> = gateway.spanning.awaiting_followers().collect();
        for conv in awaiting {
            gateway.delivery.keep_acknowledged(conv, true);
        }
        let nonce = gateway.draw_u64();
        gateway.delivery.start_run(nonce);
        gateway.fx = fx;
        Ok(gateway)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: GatewayConfig,
        now: Instant,
        entropy: Box<dyn Entropy + core::marker::Send>,
        sessions: Sessions,
        delivery: Delivery,
        registry: Registry,
        groups: Groups,
        key_packages: KeyPackageService,
        transfers: Transfers,
        (social, presence): (Social, Presence),
    ) -> Gateway {
        assert!(
            !config.tick_interval.is_zero(),
            "tick_interval must be positive"
        );
        let mut timers = TimerTable::default();
        timers.set(GatewayTimer::Tick, now + config.tick_interval);
        let limits = Limits::new(config.limits);
        let mut social = social;
        if config.planted == Some(PlantedBug::PresenceIgnoresInvisible) {
            // Planted by the simulator: never in a real gateway.
            social.plant_ignores_invisible();
        }
        let mut gateway = Gateway {
            timers,
            config,
            entropy,
            sessions,
            delivery,
            registry,
            groups,
            key_packages,
            transfers,
            limits,
            sources: BTreeMap::new(),
            social,
            presence,
            now,
            refusals: RefusalCounts::default(),
            federation: None,
            spanning: spanning::Spanning::default(),
            spanning_stats: relay::SpanningStats::default(),
            outgoing: outgoing::Outgoing::default(),
            handover_stats: handover::HandoverStats::default(),
            peer_crls: peer_crls::PeerCrls::default(),
            foreign_fetches: foreign_fetch::ForeignFetches::default(),
            dm_claims: dm_claims::DmClaims::default(),
            peer_hints: peer_hints::PeerHints::default(),
            held_hints: peer_hints::HeldHints::default(),
            external_keys: external_keys::ExternalKeys::default(),
            held_entries: held_entries::HeldEntries::default(),
            held_sends: held_sends::HeldSends::default(),
            held_send_stats: held_sends::HeldSendStats::default(),
            peer_roots: None,
            roots_told: 0,
            fx: Fx::default(),
        };
        // Chunks dropped before a restart whose steps had not come.
        gateway.arm_chunk_drop(now);
        gateway
    }

    // ---- getters ----

    /// True if `domain` is a configured federation peer of this gateway.
    pub fn federates_with(&self, domain: &str) -> bool {
        self.federation.as_ref().is_some_and(|f| f.is_peer(domain))
    }

    /// The domains conversations here span whose gateways this one does not federate with (its
    /// operator removed the peer from its configuration), with how many conversations span
    /// each: nothing goes to or comes from them until they are peers again.
    pub fn spans_without_peer(&self) -> BTreeMap<String, usize> {
        self.spanning
            .domains_spanned()
            .into_iter()
            .filter(|(domain, _)| !self.federates_with(domain))
            .map(|(domain, n)| (domain.to_string(), n))
            .collect()
    }

    /// The domain whose gateway sequences `conversation`, if this gateway only keeps a
    /// replica of it for its devices (a conversation spanning domains, homed elsewhere).
    pub fn replica_of(&self, conversation: ConversationId) -> Option<&str> {
        self.spanning.authority_of(conversation)
    }

    /// This gateway's role in `conversation` if it spans domains: its home (with the other
    /// domains' member devices), or a replica of one homed elsewhere.
    pub fn spanning_role(&self, conversation: ConversationId) -> Option<&spanning::Role> {
        self.spanning.role(conversation)
    }

    /// True if this gateway sequences `conversation` now: it holds its log, and neither keeps
    /// a replica of it for another domain's authority nor is handing it over (the simulator's
    /// `single-authority` invariant checks that at most one gateway does).
    pub fn sequences(&self, conversation: ConversationId) -> bool {
        self.delivery.contains(conversation)
            && self.spanning.authority_of(conversation).is_none()
            && self.spanning.moving_to(conversation).is_none()
    }

    /// This gateway's conversations that it sequences itself (all but the replicas and those
    /// it is handing over), with their heads.
    pub fn sequenced_heads(&self) -> impl Iterator<Item = (ConversationId, u64)> + '_ {
        self.delivery
            .conversations()
            .filter(|log| self.sequences(log.id()))
            .map(|log| (log.id(), log.head()))
    }

    /// The highest seq of a conversation, if it exists here.
    pub fn conversation_head(&self, conversation: ConversationId) -> Option<u64> {
        self.delivery.head(conversation)
    }

    /// Whether a notice that `device`'s history of `conversation` diverged waits for its
    /// acknowledgement (sent at each session until then).
    pub fn divergence_waiting(&self, device: DeviceId, conversation: ConversationId) -> bool {
        self.delivery.divergence_waiting(device, conversation)
    }

    /// The conversations this gateway is authority for, in id order.
    pub fn conversations(&self) -> impl Iterator<Item = &ConversationLog> {
        self.delivery.conversations()
    }

    /// The log of `conversation`, if it exists here (sequenced here or a replica).
    pub fn log(&self, conversation: ConversationId) -> Option<&ConversationLog> {
        self.delivery.log(conversation)
    }

    /// The durable acknowledgement cursor of a device in a conversation.
    pub fn cursor(&self, device: DeviceId, conversation: ConversationId) -> u64 {
        self.delivery.cursor(device, conversation)
    }

    /// Number of open connections (authenticated or not).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Counters of delivery (cheap: no copy of the other sub-machines' counters).
    pub fn delivery_stats(&self) -> &DeliveryStats {
        self.delivery.stats()
    }

    /// Counters.
    pub fn stats(&self) -> GatewayStats {
        GatewayStats {
            sessions: self.sessions.stats().clone(),
            delivery: self.delivery.stats().clone(),
            registry: self.registry.stats().clone(),
            groups: self.groups.stats().clone(),
            key_packages: self.key_packages.stats().clone(),
            transfers: self.transfers.stats().clone(),
            limits: self.limits.stats().clone(),
            social: self.social.stats().clone(),
            presence: self.presence.stats(),
            spanning: self.spanning_stats,
            handover: self.handover_stats,
            held_sends: self.held_send_stats,
            peer_crls: self.peer_crls.stats(),
            foreign_key_packages: self.foreign_fetches.stats(),
            dm_claims: self.dm_claims.stats(),
            outgoing: self.outgoing.stats(),
            refusals: self.refusals,
        }
    }

    /// Contacts, blocks and invisibility.
    pub fn social(&self) -> &Social {
        &self.social
    }

    /// Who is online, last-seen times and watchlists.
    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    /// Kind, epoch, roles and devices of an MLS conversation.
    pub fn group(&self, conversation: ConversationId) -> Option<&GroupState> {
        self.groups.get(conversation)
    }

    /// Every user a device is bound to, in id order.
    pub fn users(&self) -> impl Iterator<Item = UserId> + '_ {
        self.registry.users()
    }

    /// The devices bound to `user`.
    pub fn devices_of(&self, user: UserId) -> impl Iterator<Item = DeviceId> + '_ {
        self.registry.devices_of(user)
    }

    /// One-time KeyPackages `device` has in the directory.
    pub fn key_packages_left(&self, device: DeviceId) -> usize {
        self.key_packages.directory().remaining(device)
    }

    /// Devices whose KeyPackage pool is below the replenish threshold.
    pub fn key_package_pools_low(&self) -> usize {
        self.key_packages.directory().pools_low()
    }

    /// The file transfers' chunk index.
    pub fn chunk_index(&self) -> &files::ChunkIndex {
        self.transfers.index()
    }

    /// The registration authority (admin listings).
    pub fn registration_authority(&self) -> &RegistrationAuthority {
        self.registry.authority()
    }

    /// When `handle_timeout` must next be called: the earliest of every timer.
    pub fn poll_timeout(&self) -> Instant {
        let next = self.timers.next().expect("the tick is always armed");
        match self.federation.as_ref().and_then(Federation::poll_timeout) {
            Some(links) => next.min(links),
            None => next,
        }
    }

    /// When a link's handshake proved a peer root the gateway did not hold, every open
    /// session hears the new set (a device that opened its session before would otherwise
    /// meet that domain's members without their root).
    pub(super) fn tell_new_peer_roots(&mut self) {
        let learned = self
            .federation
            .as_ref()
            .map_or(0, Federation::roots_learned);
        if learned == self.roots_told {
            return;
        }
        self.roots_told = learned;
        let Some(set) = self
            .peer_roots()
            .map(crate::trust::peer_roots::PeerRoots::encode)
        else {
            return;
        };
        for conn in self.sessions.open_connections() {
            let update = crate::wire::payload::PeerRootsUpdate {
                roots: set.clone().into(),
            };
            self.fx
                .send(conn, Routing::default(), Payload::PeerRoots(update));
        }
    }

    /// The writes and outputs produced so far, or `None` if there are none.
    pub fn poll_ready(&mut self) -> Option<Ready<GatewayOutput>> {
        self.tell_new_peer_roots();
        // Sender order is written once per batch, atomically with the entries it names.
        self.delivery.flush_sender_order(self.fx.writes());
        // So is what the batch produced for each peer gateway, as one bundle per peer.
        self.send_presence_abroad();
        self.flush_outgoing();
        let own = self.fx.take_ready();
        let links = self
            .federation
            .as_mut()
            .and_then(Federation::poll_ready)
            .map(|r| r.map(GatewayOutput::Federation));
        match (own, links) {
            (Some(mut own), Some(links)) => {
                own.merge(links);
                Some(own)
            }
            (own, links) => own.or(links),
        }
    }

    /// The federation links, if peers are configured.
    pub fn federation(&self) -> Option<&Federation> {
        self.federation.as_ref()
    }

    /// Queues `body` for the peer gateway of `domain` on its link as an entry of its own
    /// (see [`Federation::enqueue`]), after whatever this batch staged for it. The gateway's
    /// own entries go through [`Gateway::send_entry`].
    pub fn federation_enqueue(
        &mut self,
        now: Instant,
        domain: &str,
        body: Bytes,
    ) -> Result<u64, EnqueueError> {
        self.flush_outgoing();
        match &mut self.federation {
            Some(federation) => federation.enqueue(now, domain, body),
            None => Err(EnqueueError::UnknownPeer(domain.to_string())),
        }
    }

    /// Stages `entry` for the peer gateway of `domain`: it leaves in this batch's bundle for
    /// that peer (see [`outgoing`]), in order. Refused now if `domain` is not a peer or the
    /// entry cannot fit in a link entry.
    pub(super) fn send_entry(&mut self, domain: &str, entry: &Entry) -> Result<(), EnqueueError> {
        self.stage_encoded(domain, entry.encode(), statement_of(entry))
    }

    /// [`Gateway::send_entry`] for an entry already encoded, with its sequenced statement if
    /// it is a sequenced message.
    pub(super) fn stage_encoded(
        &mut self,
        domain: &str,
        bytes: Bytes,
        statement: Option<[u8; 32]>,
    ) -> Result<(), EnqueueError> {
        let Some(federation) = &self.federation else {
            return Err(EnqueueError::UnknownPeer(domain.to_string()));
        };
        federation.check_entry(domain, bytes.len())?;
        if bytes.len() > outgoing::STAGED_BYTES_MAX {
            return Err(EnqueueError::TooLarge(bytes.len()));
        }
        self.outgoing.stage(domain, bytes, statement);
        Ok(())
    }

    /// Queues what this batch staged for each peer, bundled and signed.
    fn flush_outgoing(&mut self) {
        if self.outgoing.is_empty() {
            return;
        }
        let Some(federation) = &mut self.federation else {
            return;
        };
        let now = self.now;
        let taken = self.outgoing.take(|statement| federation.sign(statement));
        for (peer, bodies) in taken {
            for body in bodies {
                let queued = federation.enqueue(now, &peer, body);
                debug_assert!(queued.is_ok(), "checked when staged: {queued:?}");
            }
        }
    }

    /// The CRLs of peer domains this gateway holds.
    pub fn peer_crls(&self) -> &peer_crls::PeerCrls {
        &self.peer_crls
    }

    /// The registration authority's trust root.
    pub fn trust_root(&self) -> &TrustRoot {
        self.registry.trust_root()
    }

    // ---- commands ----

    /// Graceful shutdown: says goodbye to every session (`ShuttingDown`) and every federation
    /// link, and closes them. The driver commits and flushes the resulting `Ready` before it
    /// stops.
    pub fn shut_down(&mut self, now: Instant) {
        self.now = now;
        // Every session ends: nobody is left to tell who went offline.
        self.presence.drop_watches();
        self.flush_outgoing();
        if let Some(federation) = &mut self.federation {
            federation.shut_down();
        }
        let conns: Vec<ConnectionId> = self.sessions.connections().map(|(c, _)| c).collect();
        for conn in conns {
            let goodbye = Refusal::goodbye(
                ErrorCode::ShuttingDown,
                "the gateway is shutting down; reconnect shortly",
            );
            self.refuse(conn, goodbye);
        }
    }

    // ---- inputs ----

    /// Feeds one input. Then drain [`Gateway::poll_ready`].
    pub fn handle(&mut self, now: Instant, input: GatewayInput) {
        self.now = now;
        match input {
            GatewayInput::Accepted(conn) => self.sessions.accept(now, conn),
            GatewayInput::AcceptedFrom(conn, source) => {
                self.sessions.accept(now, conn);
                self.sources.insert(conn, source);
            }
            GatewayInput::Frame(conn, bytes) => self.handle_frame(now, conn, &bytes),
            GatewayInput::Closed(conn) => self.forget_session(conn),
            GatewayInput::Chunk { conn, head, body } => self.handle_chunk(now, conn, &head, body),
            GatewayInput::ChunkDamaged(serve) => {
                let uploader: Vec<ConnectionId> = self
                    .registry
                    .devices_of(serve.owner)
                    .filter_map(|d| self.sessions.online(d))
                    .collect();
                self.transfers.damaged(&serve, &uploader, &mut self.fx);
            }
            GatewayInput::Admin { request, command } => self.admin(now, request, command),
            GatewayInput::Federation(input) => {
                if let Some(federation) = &mut self.federation {
                    federation.handle(now, input);
                }
                self.take_link_changes(now);
                self.take_federated_entries(now);
                self.push_crl_where_behind();
                self.announce_external_key();
            }
        }
        self.arm_chunk_drop(now);
    }

    /// Arms the chunk-drop step if chunks wait for one and it is not armed.
    fn arm_chunk_drop(&mut self, now: Instant) {
        let waiting = self.transfers.index().dropping() > 0;
        match (waiting, self.timers.get(GatewayTimer::ChunkDrop)) {
            (true, None) => self
                .timers
                .set(GatewayTimer::ChunkDrop, now + CHUNK_DROP_INTERVAL),
            (false, Some(_)) => self.timers.clear(GatewayTimer::ChunkDrop),
            _ => {}
        }
    }

    /// Runs every timer due at `now`: the housekeeping tick (idle sessions, missing `Hello`s,
    /// stalled delivery windows, inbox resends, a GC step, expired resume tokens), GC steps
    /// ahead of it while there is a backlog, and steps deleting chunks no upload references.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if let Some(federation) = &mut self.federation {
            if federation.poll_timeout().is_some_and(|at| at <= now) {
                federation.handle_timeout(now);
            }
        }
        self.take_link_changes(now);
        self.take_federated_entries(now);
        self.push_crl_where_behind();
        self.announce_external_key();
        for name in self.timers.due(now) {
            match name {
                GatewayTimer::Tick => self.tick(now),
                GatewayTimer::GcBacklog => {
                    // The tick may have run this step already.
                    if self.delivery.gc_again_at().is_some_and(|at| at <= now) {
                        self.delivery.collect_garbage(now, self.fx.writes());
                    }
                }
                GatewayTimer::ChunkDrop => {
                    self.timers.clear(GatewayTimer::ChunkDrop);
                    self.transfers.drop_step(&mut self.fx);
                }
            }
            self.timers
                .set_or_clear(GatewayTimer::GcBacklog, self.delivery.gc_again_at());
        }
        self.arm_chunk_drop(now);
        debug_assert!(
            self.poll_timeout() > now,
            "every timer that fired is re-armed"
        );
    }

    fn tick(&mut self, now: Instant) {
        self.timers
            .set(GatewayTimer::Tick, now + self.config.tick_interval);
        let to_close = self.sessions.timed_out(
            now,
            self.config.hello_timeout,
            self.config.session_idle_timeout,
        );
        for (conn, code, why) in to_close {
            self.refuse(conn, Refusal::goodbye(code, why));
        }
        for (conn, conv) in self.delivery.stalled(now) {
            self.delivery.rewind(now, conn, conv, None, &mut self.fx);
        }
        self.delivery
            .resend_inbox(now, &self.sessions, &self.groups, &mut self.fx);
        self.delivery.collect_garbage(now, self.fx.writes());
        self.sessions
            .expire_tokens(now, self.config.gc_batch_max, self.fx.writes());
        self.transfers.expire(now, &mut self.fx);
        self.limits.forget_idle(now);
        self.foreign_fetches.forget_idle(now);
        let sessions = &self.sessions;
        self.foreign_fetches
            .forget_stale(now, &|conn, device| sessions.online(device) == Some(conn));
        self.presence.age(now, &self.social, &mut self.fx);
    }

    fn handle_frame(&mut self, now: Instant, conn: ConnectionId, bytes: &[u8]) {
        let Some(stage) = self.sessions.heard(now, conn) else {
            return; // a frame raced with the close of its connection
        };
        let frame = match Frame::decode(bytes, self.config.payload_bytes_max) {
            Ok(frame) => frame,
            Err(error) => {
                let goodbye = Refusal::goodbye(ErrorCode::MalformedFrame, error.to_string());
                self.refuse(conn, goodbye);
                return;
            }
        };
        let routing = frame.routing;
        let fx = &mut self.fx;
        let result = match (stage, frame.payload) {
            (Stage::AwaitingHello, Payload::Hello(hello)) => {
                self.handle_hello(now, conn, routing.sender, hello);
                Ok(())
            }
            (Stage::AwaitingProof, Payload::Proof(proof)) => {
                self.handle_proof(now, conn, proof);
                Ok(())
            }
            // The device sent its `Hello` again for want of an answer: the challenge (or its
            // proof) was lost on the way. The same challenge again.
            (Stage::AwaitingProof, Payload::Hello(_)) => {
                match self.sessions.pending_challenge(conn, routing.sender) {
                    Some(nonce) => {
                        let challenge = Payload::Challenge(Challenge { nonce });
                        self.fx.send(conn, Routing::default(), challenge);
                        Ok(())
                    }
                    None => Err(Refusal::goodbye(
                        ErrorCode::NotAuthenticated,
                        "answer the challenge of the hello before",
                    )),
                }
            }
            // The proof of a challenge that went twice (so did the `Hello`): the first opened
            // the session, and this one changes nothing.
            (Stage::Open(_), Payload::Proof(_)) => Ok(()),
            (Stage::AwaitingHello, Payload::Register(register)) => {
                if let Some(&source) = self.sources.get(&conn) {
                    if let Err(limited) = self.limits.admit_registration(now, source) {
                        let message = format!(
                            "too many devices registered from this network address: at most {}",
                            limits::describe(limited.rate)
                        );
                        let refusal = Refusal::goodbye(ErrorCode::RegistrationsLimited, message)
                            .retry_after(limited.retry_after);
                        self.refuse(conn, refusal);
                        return;
                    }
                }
                let sessions = &self.sessions;
                let sender = routing.sender;
                self.registry
                    .register(now, conn, sender, register, sessions, fx)
            }
            (_, Payload::TrustRootFetch(_)) => {
                if self.sessions.lookup_allowed(conn) {
                    self.registry.send_trust_root(conn, fx);
                    Ok(())
                } else {
                    Err(Refusal::goodbye(
                        ErrorCode::RateLimited,
                        "too many trust root requests on one connection",
                    ))
                }
            }
            (
                Stage::Open(_),
                Payload::CrlFetch(crate::wire::payload::CrlFetch {
                    peers: Some(true), ..
                }),
            ) => {
                // The device's digest of other domains' CRLs differs from the heartbeat's.
                self.send_peer_crls(conn);
                Ok(())
            }
            (stage, Payload::CrlFetch(fetch)) => {
                let open = matches!(stage, Stage::Open(_));
                if open || self.sessions.lookup_allowed(conn) {
                    self.registry
                        .send_crl_if_newer(conn, fetch.have_version, fx);
                    Ok(())
                } else {
                    Err(Refusal::goodbye(
                        ErrorCode::RateLimited,
                        "too many CRL requests before a session; open one",
                    ))
                }
            }
            // One device per session: a second Hello would leave the first device's routing
            // pointing at a session that is no longer its own.
            (Stage::Open(_), Payload::Hello(_)) => Err(Refusal::error(
                ErrorCode::UnexpectedOpcode,
                "this session is already open",
            )),
            (Stage::AwaitingHello | Stage::AwaitingProof, _) => Err(Refusal::goodbye(
                ErrorCode::NotAuthenticated,
                "say hello first",
            )),
            (Stage::Open(device), payload) => {
                self.handle_session_frame(now, conn, device, routing, payload)
            }
        };
        if let Err(refusal) = result {
            self.refuse(conn, refusal);
        }
    }

    /// A frame on an open session.
    fn handle_session_frame(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        routing: Routing,
        payload: Payload,
    ) -> Result<(), Refusal> {
        if let Payload::PeerRoots(_) = payload {
            // The device missed a pushed set (its digest differs from the heartbeat's).
            if let Some(set) = self
                .peer_roots()
                .map(crate::trust::peer_roots::PeerRoots::encode)
            {
                let update = crate::wire::payload::PeerRootsUpdate { roots: set.into() };
                self.fx
                    .send(conn, Routing::default(), Payload::PeerRoots(update));
            }
            return Ok(());
        }
        let (peer_roots, peer_crls, contacts) = match payload {
            Payload::Heartbeat(_) => (
                self.peer_roots()
                    .map(crate::trust::peer_roots::PeerRoots::digest),
                self.peer_crls.digest(),
                self.registry
                    .user_of(device)
                    .filter(|u| self.social.has_relations(*u))
                    .map(|u| self.social.listing(u).digest()),
            ),
            _ => (None, None, None),
        };
        let fx = &mut self.fx;
        match payload {
            Payload::Heartbeat(beat) => {
                let ack = Heartbeat {
                    nonce: beat.nonce,
                    crl_version: Some(self.registry.crl().version),
                    presence: self.presence.notifications(conn),
                    peer_roots,
                    peer_crls,
                    contacts,
                };
                fx.send(conn, Routing::default(), Payload::HeartbeatAck(ack));
                Ok(())
            }
            Payload::HeartbeatAck(_) => Ok(()),
            Payload::Send(send) => {
                self.accept_message(now, conn, device, routing.conversation, send);
                Ok(())
            }
            Payload::Ack(Ack {}) => {
                let (conv, seq) = (routing.conversation, routing.seq);
                let group = self.groups.get(conv);
                self.delivery
                    .acknowledge(now, conn, device, conv, seq, group, fx)
            }
            Payload::Leave(_) if self.spanning.authority_of(routing.conversation).is_some() => {
                self.relay_leave(conn, device, routing.conversation);
                Ok(())
            }
            Payload::Leave(_) => {
                let conv = routing.conversation;
                let member = self
                    .groups
                    .get(conv)
                    .is_some_and(|g| g.devices().contains_key(&device));
                if !member {
                    let routing = Routing {
                        conversation: conv,
                        ..Routing::default()
                    };
                    return Err(Refusal::error(
                        ErrorCode::NotMember,
                        "this device is not in that group",
                    )
                    .in_conversation(routing));
                }
                self.propose_removal(now, conv, device);
                Ok(())
            }
            Payload::ReplayRequest(request) => {
                let conv = routing.conversation;
                self.delivery
                    .rewind(now, conn, conv, Some(request.from_seq), fx);
                Ok(())
            }
            Payload::PairVouch(vouch) => self.registry.vouch(now, conn, device, vouch, fx),
            Payload::RenewCertificate(_) => self.registry.renew(now, conn, device, fx),
            Payload::KeyPackageUpload(upload) => self.key_packages.upload(conn, device, upload, fx),
            Payload::KeyPackageFetch(fetch)
                if fetch
                    .domain
                    .as_deref()
                    .is_some_and(|d| d != self.config.domain) =>
            {
                self.ask_peer_for_key_packages(now, conn, device, routing.seq, fetch)
            }
            Payload::KeyPackageFetch(fetch) => {
                let registry = &self.registry;
                let sessions = &self.sessions;
                let social = &self.social;
                let requester = registry
                    .user_of(device)
                    .filter(|_| self.config.planted != Some(PlantedBug::BlocksIgnored));
                // A user's KeyPackages are not handed to anyone they blocked: nobody starts a
                // DM with, or adds to a room, someone who blocked them.
                let reachable = |user| requester.is_none_or(|r| !social.blocked(user, r));
                self.key_packages.fetch(
                    now,
                    conn,
                    device,
                    fetch,
                    routing.seq,
                    &|user| {
                        if reachable(user) {
                            registry.devices_of(user).collect()
                        } else {
                            Vec::new()
                        }
                    },
                    &|d| sessions.online(d),
                    fx,
                )
            }
            Payload::UploadOpen(open) => {
                let owner = owner_of(&self.registry, device)?;
                let conv = routing.conversation;
                let members = self.delivery.log(conv).map(|log| log.members());
                self.transfers
                    .open(now, conn, device, owner, conv, members, open, fx)
            }
            Payload::ChunkRequest(request) => {
                let conv = routing.conversation;
                let members = self.delivery.log(conv).map(|log| log.members());
                self.transfers
                    .request(conn, device, conv, members, request, fx)
            }
            Payload::FileFetched(fetched) => {
                self.transfers
                    .fetched(routing.conversation, device, fetched, fx);
                Ok(())
            }
            Payload::Chunk(_) => Err(Refusal::error(
                ErrorCode::UnexpectedOpcode,
                "a chunk travels on a stream of its own, not in the message stream",
            )),
            Payload::ContactChange(change) => {
                self.change_contact(now, conn, device, routing, change)
            }
            Payload::ContactsFetch(_) => {
                let user = owner_of(&self.registry, device)?;
                let listing = self.social.listing(user);
                let routing = Routing {
                    seq: routing.seq,
                    ..Routing::default()
                };
                fx.send(conn, routing, Payload::Contacts(listing));
                Ok(())
            }
            Payload::PresenceUpdate(update) => {
                let user = owner_of(&self.registry, device)?;
                let changed = self
                    .social
                    .set_invisible(user, update.invisible, self.fx.writes());
                self.answer_contacts(conn, user, routing.seq);
                if changed {
                    self.tell_contacts(user, Some(conn));
                    self.presence.push(now, user, &self.social, &mut self.fx);
                }
                Ok(())
            }
            Payload::PresenceSubscribe(subscribe) => {
                let user = owner_of(&self.registry, device)?;
                let request = Routing {
                    seq: routing.seq,
                    ..Routing::default()
                };
                if self.presence.is_watching(conn, routing.seq) {
                    // A copy (the network duplicated it): the watch goes on as it is. Taken
                    // anew it would number its notifications from 1 again, and a device that
                    // then missed one could not tell (presence-scrape seed 1000).
                    return Ok(());
                }
                if let Err(limited) = self.limits.admit_subscription(now, device) {
                    return Err(Refusal::error(
                        ErrorCode::PresenceLimited,
                        format!(
                            "too many watchlists from this device: at most {}",
                            limits::describe(limited.rate)
                        ),
                    )
                    .in_conversation(request)
                    .retry_after(limited.retry_after));
                }
                let users: Vec<UserId> = subscribe
                    .users
                    .iter()
                    .map(|u| UserId::from_bytes(**u))
                    .collect();
                let max = self.config.limits.watchlist_max as usize;
                self.presence.subscribe(
                    now,
                    conn,
                    user,
                    &users,
                    max,
                    routing.seq,
                    &self.social,
                    &mut self.fx,
                )
            }
            Payload::Goodbye(_) => {
                fx.hold(GatewayOutput::Close(conn));
                self.forget_session(conn);
                Ok(())
            }
            other => Err(Refusal::error(
                ErrorCode::UnexpectedOpcode,
                format!("{:?} is not accepted by a gateway", other.opcode()),
            )),
        }
    }

    // ---- files ----

    /// A whole chunk stream: its head frame, checked like any frame, then the bytes.
    fn handle_chunk(&mut self, now: Instant, conn: ConnectionId, head: &[u8], body: Bytes) {
        let Some(stage) = self.sessions.heard(now, conn) else {
            return; // the stream raced with the close of its connection
        };
        let Stage::Open(device) = stage else {
            let goodbye = Refusal::goodbye(ErrorCode::NotAuthenticated, "say hello first");
            self.refuse(conn, goodbye);
            return;
        };
        let result = match Frame::decode(head, self.config.payload_bytes_max) {
            Err(error) => Err(Refusal::error(ErrorCode::MalformedFrame, error.to_string())),
            Ok(Frame {
                routing,
                payload: Payload::Chunk(chunk),
                ..
            }) => owner_of(&self.registry, device).and_then(|owner| {
                let conv = routing.conversation;
                let members = self.delivery.log(conv).map(|log| log.members());
                self.transfers.chunk(
                    conn,
                    device,
                    owner,
                    conv,
                    members,
                    chunk,
                    body,
                    &mut self.fx,
                )
            }),
            Ok(other) => Err(Refusal::error(
                ErrorCode::UnexpectedOpcode,
                format!(
                    "a chunk stream starts with a Chunk frame, not {:?}",
                    other.opcode()
                ),
            )),
        };
        if let Err(refusal) = result {
            self.refuse(conn, refusal);
        }
    }

    // ---- sessions ----

    /// Checks the key and certificate, then resumes with a valid token or sends a challenge.
    fn handle_hello(&mut self, now: Instant, conn: ConnectionId, device: DeviceId, hello: Hello) {
        let key = DevicePublicKey(hello.device_key);
        if key.device_id() != device {
            let goodbye = Refusal::goodbye(
                ErrorCode::AuthenticationFailed,
                "the sender device id does not match the device key",
            );
            self.refuse(conn, goodbye);
            return;
        }
        let user = match self.registry.check_hello(
            now,
            &key,
            hello.certificate.as_deref().map(|c| &c[..]),
            hello.user.map(UserId::from_bytes),
        ) {
            Ok(user) => Some(user),
            Err(refusal) => {
                self.refuse(conn, refusal);
                return;
            }
        };
        if let Some(token) = hello.resume_token {
            match self.sessions.check_resume(now, device, &token) {
                Resume::Valid => {
                    self.sessions.count_opening(true);
                    self.open_session(
                        now,
                        conn,
                        device,
                        &hello.cursors,
                        user,
                        hello.generation,
                        Some(token),
                    );
                    return;
                }
                Resume::Expired => self.refuse(
                    conn,
                    Refusal::error(
                        ErrorCode::ResumeTokenExpired,
                        "resume token expired; answer the challenge",
                    ),
                ),
                Resume::Invalid => self.refuse(
                    conn,
                    Refusal::error(
                        ErrorCode::ResumeTokenInvalid,
                        "resume token unknown or not yours; answer the challenge",
                    ),
                ),
            }
        }
        let mut nonce = [0u8; 32];
        self.entropy.fill_bytes(&mut nonce);
        let challenged = Challenged {
            device,
            key,
            nonce,
            cursors: hello.cursors,
            user,
            generation: hello.generation,
            token: hello.resume_token,
        };
        self.sessions.challenge(conn, challenged);
        self.fx.send(
            conn,
            Routing::default(),
            Payload::Challenge(Challenge { nonce }),
        );
    }

    fn handle_proof(&mut self, now: Instant, conn: ConnectionId, proof: Proof) {
        let challenged = self
            .sessions
            .take_challenge(conn)
            .expect("the stage said a challenge is out");
        let message = session_proof_message(&challenged.nonce, challenged.device);
        if !challenged.key.verify(&message, &proof.signature) {
            let goodbye = Refusal::goodbye(
                ErrorCode::AuthenticationFailed,
                "the proof does not verify against the device key",
            );
            self.refuse(conn, goodbye);
            return;
        }
        self.sessions.count_opening(false);
        let Challenged {
            device,
            cursors,
            user,
            generation,
            token,
            ..
        } = challenged;
        self.open_session(now, conn, device, &cursors, user, generation, token);
    }

    /// Opens the authenticated session of `device`, unless its `Hello` came from a stale copy
    /// of the device's data (`generation` not above the last one seen). `token`: the resume
    /// token the `Hello` presented, valid or not (it names the device's last session's run).
    #[allow(clippy::too_many_arguments)]
    fn open_session(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        cursors: &[Cursor],
        user: Option<UserId>,
        generation: Option<u64>,
        token: Option<[u8; 32]>,
    ) {
        // The certificate was checked at `Hello`; a revocation that came while the device was
        // answering its challenge must still keep it out.
        if self.registry.crl().check(device).is_err() {
            let goodbye = Refusal::goodbye(ErrorCode::DeviceRevoked, "this device was revoked");
            self.refuse(conn, goodbye);
            return;
        }
        if let Some(generation) = generation {
            if let Err(last) =
                self.sessions
                    .advance_generation(device, generation, self.fx.writes())
            {
                let goodbye = Refusal::goodbye(
                    ErrorCode::DeviceStateCopied,
                    format!(
                        "session {generation} of this device, but session {last} was opened already: another copy of this device's data was used since"
                    ),
                );
                self.refuse(conn, goodbye);
                return;
            }
        }
        if let Err(refusal) = self
            .registry
            .bind_at_session(device, user, self.fx.writes())
        {
            self.refuse(conn, refusal);
            return;
        }
        let replaced = self.sessions.open(conn, device);
        if let Some(user) = self.registry.user_of(device) {
            // Before the replaced session ends, so its end is no moment offline.
            self.presence
                .opened(now, conn, user, &self.social, &mut self.fx);
        }
        if let Some(old) = replaced {
            let goodbye = Refusal::goodbye(
                ErrorCode::SessionReplaced,
                "a newer session replaced this one",
            );
            self.refuse(old, goodbye);
        }
        let findings = self.delivery.open_session(
            now,
            conn,
            device,
            cursors,
            token.as_ref(),
            self.fx.writes(),
        );
        let stamp = self.delivery.token_stamp(self.fx.writes());
        let token = self.sessions.issue_token(
            now,
            device,
            self.config.resume_token_ttl,
            &stamp,
            self.entropy.as_mut(),
            self.fx.writes(),
        );
        let interval_ms =
            u32::try_from(self.config.heartbeat_interval.as_millis()).unwrap_or(u32::MAX);
        let ttl_s = u32::try_from(self.config.resume_token_ttl.as_secs()).unwrap_or(u32::MAX);
        let external_sender = self
            .groups
            .external_key(self.entropy.as_mut(), self.fx.writes());
        let peer_roots = self.peer_roots().map(|set| set.encode().into());
        let ok = HelloOk {
            heartbeat_interval_ms: interval_ms,
            resume_token: token,
            resume_token_ttl_s: ttl_s,
            external_sender: Some(external_sender.into()),
            peer_roots,
            peer_crls: self.peer_crls.digest(),
        };
        self.fx.send(conn, Routing::default(), Payload::HelloOk(ok));
        for finding in findings {
            // A divergence notice waits in the device's inbox, sent below.
            self.fx.hold(GatewayOutput::HistoryLost(finding));
            if finding.kind == HistoryKind::Lost {
                // The head moved: members waiting at the old one hear of the loss now.
                self.delivery
                    .pump_members(now, finding.conversation, &self.sessions, &mut self.fx);
            }
        }
        self.key_packages.send_count(conn, device, &mut self.fx);
        self.delivery
            .send_inbox(now, conn, device, &self.groups, &mut self.fx);
        self.delivery
            .settle_departures(now, conn, device, &self.groups, &mut self.fx);
        self.delivery.pump_session(now, conn, &mut self.fx);
    }

    /// Sends an error or a goodbye and counts it; a goodbye also closes the connection and
    /// forgets its session.
    fn refuse(&mut self, conn: ConnectionId, refusal: Refusal) {
        self.refusals.count(refusal.code);
        let message =
            crate::codec::truncate_utf8(&refusal.message, crate::wire::payload::MESSAGE_BYTES_MAX);
        let payload = if refusal.ends_session {
            Payload::Goodbye(Goodbye {
                code: refusal.code as u16,
                message: message.to_string(),
                // Going away on purpose: the devices' reconnects are spread over a window.
                retry_after_ms: if refusal.code == ErrorCode::ShuttingDown {
                    Some(
                        u32::try_from(self.config.shutdown_retry_after.as_millis())
                            .unwrap_or(u32::MAX),
                    )
                } else {
                    refusal.detail.retry_after_ms()
                },
            })
        } else {
            Payload::Error(ErrorReport {
                code: refusal.code as u16,
                message: message.to_string(),
                msg_id: refusal.msg_id,
                after: refusal.detail.after(),
                retry_after_ms: refusal.detail.retry_after_ms(),
                held: None,
            })
        };
        self.fx.send(conn, refusal.routing, payload);
        if refusal.ends_session {
            self.fx.hold(GatewayOutput::Close(conn));
            self.forget_session(conn);
        } else if let (
            ErrorCode::SendsLimited
            | ErrorCode::ConversationsLimited
            | ErrorCode::InvitationsLimited,
            Some(ms),
        ) = (refusal.code, refusal.detail.retry_after_ms())
        {
            // Never near the idle timeout: a paused session is heard from by nothing.
            let pause = core::time::Duration::from_millis(u64::from(ms))
                .max(READ_PAUSE_MIN)
                .min(READ_PAUSE_MAX)
                .min(self.config.session_idle_timeout / 4);
            self.fx.hold(GatewayOutput::PauseReading(conn, pause));
        }
    }

    fn forget_session(&mut self, conn: ConnectionId) {
        self.sources.remove(&conn);
        let device = self.sessions.device(conn);
        if let Some(device) = device {
            let let_go = self.held_sends.session_ended(device, conn);
            self.held_send_stats.let_go += let_go as u64;
        }
        let user = device.and_then(|d| self.registry.user_of(d));
        if self.sessions.forget(conn) {
            self.delivery.close_session(conn);
            let now = self.now;
            self.presence
                .closed(now, conn, user, &self.social, &mut self.fx);
        }
    }

    // ---- contacts and presence ----

    /// A contact change: add (or accept), remove, block, unblock. Answered with the user's
    /// listing; the other user's devices and the user's other devices hear their new listing,
    /// and watchers of either hear what changed for them.
    fn change_contact(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        routing: Routing,
        change: crate::wire::payload::ContactChange,
    ) -> Result<(), Refusal> {
        let request = Routing {
            seq: routing.seq,
            ..Routing::default()
        };
        let user = owner_of(&self.registry, device)?;
        let other = UserId::from_bytes(*change.user);
        let Some(action) = ContactAction::from_u8(change.action) else {
            return Err(Refusal::error(
                ErrorCode::MalformedFrame,
                format!("unknown contact action {}", change.action),
            )
            .in_conversation(request));
        };
        let abroad = self
            .contact_domain(other, change.domain.as_deref(), action)
            .map_err(|r| r.in_conversation(request))?;
        if self.social.is_new_request(user, other, action) {
            if let Err(limited) = self.limits.admit_contact_request(now, user) {
                return Err(Refusal::error(
                    ErrorCode::ContactsLimited,
                    format!(
                        "too many contact requests from this user: at most {}",
                        limits::describe(limited.rate)
                    ),
                )
                .in_conversation(request)
                .retry_after(limited.retry_after));
            }
        }
        let max = self.config.limits.contacts_max as usize;
        let was_added = self.social.added(user, other);
        let was_blocked = self.social.blocked(user, other);
        let changed = self
            .social
            .change(user, other, action, max, self.fx.writes())
            .map_err(|r| r.in_conversation(request))?;
        if let Some(domain) = abroad {
            self.tell_contact_abroad(&domain, user, other, was_added, was_blocked);
        }
        self.answer_contacts(conn, user, routing.seq);
        if changed.changed {
            self.tell_contacts(user, Some(conn));
            self.tell_contacts(other, Some(conn));
            self.presence.push(now, user, &self.social, &mut self.fx);
            self.presence.push(now, other, &self.social, &mut self.fx);
        }
        Ok(())
    }

    /// Sends `user`'s listing to `conn` as the answer to `request`.
    fn answer_contacts(&mut self, conn: ConnectionId, user: UserId, request: u64) {
        let routing = Routing {
            seq: request,
            ..Routing::default()
        };
        let listing = self.social.listing(user);
        self.fx.send(conn, routing, Payload::Contacts(listing));
    }

    /// Sends `user`'s listing, unasked (seq 0), to each of its devices in session but `except`.
    fn tell_contacts(&mut self, user: UserId, except: Option<ConnectionId>) {
        let conns: Vec<ConnectionId> = self
            .registry
            .devices_of(user)
            .filter_map(|d| self.sessions.online(d))
            .filter(|c| Some(*c) != except)
            .collect();
        if conns.is_empty() {
            return;
        }
        let listing = self.social.listing(user);
        for conn in conns {
            self.fx
                .send(conn, Routing::default(), Payload::Contacts(listing.clone()));
        }
    }

    // ---- messages ----

    /// Charges a new message to its device's send limit, and a message to a conversation that
    /// does not exist yet (a creating commit) to its user's conversation limit. A retry of a
    /// message already sequenced costs nothing: the deduplication record answers it.
    fn charge_message(
        &mut self,
        now: Instant,
        device: DeviceId,
        conv: ConversationId,
        msg_id: MsgId,
    ) -> Result<(), Refusal> {
        let log = self.delivery.log(conv);
        if log.is_some_and(|log| log.duplicate_of(device, msg_id).is_some()) {
            return Ok(());
        }
        let routing = Routing {
            conversation: conv,
            ..Routing::default()
        };
        let refusal = |code, what: &str, limited: limits::Limited| {
            let message = format!("{what}: at most {}", limits::describe(limited.rate));
            if limited.cut_off {
                let message = format!("{message}; it went on sending while told to wait");
                return Refusal::goodbye(code, message).retry_after(limited.retry_after);
            }
            Refusal::error(code, message)
                .in_conversation(routing)
                .about(msg_id)
                .retry_after(limited.retry_after)
        };
        let admitted = self.limits.admit_send(now, device);
        if self.config.planted == Some(PlantedBug::SendLimitIgnored) {
            // Planted by the simulator: never in a real gateway.
            return Ok(());
        }
        if let Err(limited) = admitted {
            let what = "too many messages from this device";
            return Err(refusal(ErrorCode::SendsLimited, what, limited));
        }
        Ok(())
    }

    /// Charges a creating commit to its user's rate of new conversations. Only a commit that
    /// creates one is charged: a message to a conversation that does not exist creates none
    /// (it is refused as unknown), and must not use up its user's creations (a device sending
    /// into a conversation its gateway did not know yet could not start a DM for an hour).
    fn charge_creation(
        &mut self,
        now: Instant,
        device: DeviceId,
        conv: ConversationId,
        msg_id: MsgId,
    ) -> Result<(), Refusal> {
        let Some(user) = self.registry.user_of(device) else {
            return Ok(());
        };
        if self.config.planted == Some(PlantedBug::SendLimitIgnored) {
            // Planted by the simulator: never in a real gateway.
            return Ok(());
        }
        match self.limits.admit_conversation(now, user) {
            Ok(()) => Ok(()),
            Err(limited) => {
                let message = format!(
                    "too many new conversations from this user: at most {}",
                    limits::describe(limited.rate)
                );
                if limited.cut_off {
                    let message = format!("{message}; it went on sending while told to wait");
                    return Err(Refusal::goodbye(ErrorCode::ConversationsLimited, message)
                        .retry_after(limited.retry_after));
                }
                let routing = Routing {
                    conversation: conv,
                    ..Routing::default()
                };
                Err(Refusal::error(ErrorCode::ConversationsLimited, message)
                    .in_conversation(routing)
                    .about(msg_id)
                    .retry_after(limited.retry_after))
            }
        }
    }

    /// True if one of the users a commit of `inviter` adds (other than `inviter`) blocked
    /// `inviter`, as this gateway knows: its own users' blocks, and other domains' users'
    /// blocks of its own users as their gateways told it ([`contacts_abroad`]).
    pub(super) fn refuses_adds_by(
        &self,
        inviter: UserId,
        mut added: impl Iterator<Item = UserId>,
    ) -> bool {
        if self.config.planted == Some(PlantedBug::BlocksIgnored) {
            return false;
        }
        added.any(|user| user != inviter && self.social.blocked(user, inviter))
    }

    /// Checks the users a commit invites (see [`limits`]): a creator and every invited user
    /// below the quota of conversations, and the committer's user may invite that many now.
    /// Adding a user's devices to a conversation the user is in already, or one's own
    /// devices, invites nobody. Whatever the membership, no device of a user who blocked the
    /// committer's user is added (the KeyPackage directory hands none out; this catches
    /// the ones fetched before the block).
    ///
    /// A commit relayed from another domain (`device` is a member device of that domain) is
    /// checked alike, its user charged here: each gateway bounds the invitations into the
    /// conversations it sequences, whoever's they are.
    fn admit_invitations(
        &mut self,
        now: Instant,
        device: DeviceId,
        conv: ConversationId,
        msg_id: MsgId,
        change: &groups::Change,
    ) -> Result<(), Refusal> {
        let group = self.groups.get(conv);
        let ours = self.registry.user_of(device);
        let Some(inviter) = ours.or_else(|| group.and_then(|g| g.devices().get(&device).copied()))
        else {
            return Ok(());
        };
        let quota = self.config.limits.conversations_max;
        let routing = Routing {
            conversation: conv,
            epoch: group.map_or(0, GroupState::epoch),
            ..Routing::default()
        };
        let over_quota = |what: String| {
            Err(Refusal::error(ErrorCode::ConversationQuota, what)
                .in_conversation(routing)
                .about(msg_id))
        };
        if group.is_none() && self.groups.conversations_of(inviter) >= quota {
            return over_quota(format!(
                "you are in as many conversations as this gateway allows one user ({quota}): leave one first"
            ));
        }
        let added_users = change.added.iter().map(|&(_, user, _)| user);
        if self.refuses_adds_by(inviter, added_users) {
            return Err(Refusal::error(ErrorCode::Forbidden, NOT_ACCEPTED_FROM_YOU)
                .in_conversation(routing)
                .about(msg_id));
        }
        let invited: BTreeSet<UserId> = change
            .added
            .iter()
            .map(|&(_, user, _)| user)
            .filter(|&user| user != inviter)
            .filter(|&user| group.is_none_or(|g| !g.devices().values().any(|&u| u == user)))
            .collect();
        if invited.is_empty() {
            return Ok(());
        }
        if invited
            .iter()
            .any(|&user| self.groups.conversations_of(user) >= quota)
        {
            return over_quota(format!(
                "a user this commit adds is in as many conversations as this gateway allows one user ({quota})"
            ));
        }
        let count = u32::try_from(invited.len()).unwrap_or(u32::MAX);
        let admitted = self.limits.admit_invitations(now, inviter, count);
        if self.config.planted == Some(PlantedBug::InvitationLimitIgnored) {
            // Planted by the simulator: never in a real gateway.
            return Ok(());
        }
        match admitted {
            Ok(()) => Ok(()),
            Err(limited) if limited.cut_off => {
                let message = format!(
                    "this commit invites {count} users; at most {} may be invited at once: \
                     invite the others in later commits",
                    limited.rate.burst
                );
                Err(Refusal::error(ErrorCode::InvitationTooLarge, message)
                    .in_conversation(routing)
                    .about(msg_id))
            }
            Err(limited) => {
                // A relayed commit's sender hears which domain's gateway counts.
                let into = match ours {
                    Some(_) => String::new(),
                    None => format!(" into conversations homed at {}", self.config.domain),
                };
                let message = format!(
                    "too many invitations from this user{into}: at most {}",
                    limits::describe(limited.rate)
                );
                Err(Refusal::error(ErrorCode::InvitationsLimited, message)
                    .in_conversation(routing)
                    .about(msg_id)
                    .retry_after(limited.retry_after))
            }
        }
    }

    /// Takes one message of a device in `conv`: relays it to its authority, holds it until
    /// the gap before it in its sender's order fills, sequences it, or refuses it.
    fn accept_one(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        conv: ConversationId,
        send: Send,
    ) -> Taken {
        let msg_id = send.msg_id();
        if msg_id == sender_order::NO_MESSAGE {
            // All zeros means "no message" in sender order (what `after` names before a
            // device's first message): a message under it would be its own predecessor.
            let routing = Routing {
                conversation: conv,
                ..Routing::default()
            };
            let refusal = Refusal::error(ErrorCode::MalformedFrame, refusal::ZERO_MESSAGE_ID)
                .in_conversation(routing);
            self.refuse(conn, refusal);
            return Taken::Refused;
        }
        if let Some(authority) = self.spanning.authority_of(conv) {
            let authority = authority.to_string();
            return self.relay_send(now, conn, device, conv, send, authority);
        }
        if let Some(to) = self.spanning.moving_to(conv) {
            let refusal = Refusal::authority_moving(conv, msg_id, to);
            self.refuse(conn, refusal);
            return Taken::Refused;
        }
        let after = send.after.map(MsgId::from_bytes);
        if let Err(last) = self
            .delivery
            .check_sender_order(conv, device, msg_id, after)
        {
            // Ahead of its sender's order: held if what it comes after may still come (a
            // message the gateway never sequenced); refused if the device is behind (it names
            // one sequenced before its last) or the bounds are reached.
            if let Some(taken) = self.hold_ahead(now, conn, device, conv, after, last, send) {
                return taken;
            }
            self.refuse(
                conn,
                Refusal::out_of_sender_order(conv, msg_id, after, last),
            );
            return Taken::Refused;
        }
        if self.config.planted == Some(PlantedBug::DedupForgets) {
            // Planted by the simulator: never in a real gateway.
            self.delivery.forget_old_duplicate(conv, device, msg_id);
        }
        if let Err(refusal) = self.charge_message(now, device, conv, msg_id) {
            self.refuse(conn, refusal);
            return Taken::Refused;
        }
        let welcome = send.welcome.map(|w| Bytes::from(Vec::from(w)));
        let body = send.body;
        let plain = self.delivery.contains(conv) && !self.groups.contains(conv);
        let mut effect = None;
        if !plain {
            let duplicate = self
                .delivery
                .log(conv)
                .and_then(|log| log.duplicate_of(device, msg_id))
                .is_some();
            let (registry, foreign) = (&self.registry, &self.foreign_fetches);
            let admitted = self.groups.admit(
                device,
                conv,
                msg_id,
                &body,
                welcome,
                duplicate,
                self.delivery.contains(conv),
                &|d| foreign_members::member_user(registry, foreign, d),
                Some(registry.crl()),
            );
            match admitted {
                Ok(admitted) => effect = admitted,
                Err(refusal) => {
                    self.refuse(conn, refusal);
                    return Taken::Refused;
                }
            }
            if let Some(effect) = &effect {
                let home = self.config.domain.clone();
                if let Err(refusal) = self.check_foreign_change(conv, msg_id, effect, &home) {
                    self.refuse(conn, refusal);
                    return Taken::Refused;
                }
            }
            // A creating commit (checked once: nothing below makes the log before it is time).
            let creating = effect.as_deref().filter(|_| !self.delivery.contains(conv));
            if let Some(creating) = creating {
                // A DM with another domain's user: that domain's gateway must not make it too.
                let claimed = self.claim_dm(now, conv, msg_id, creating);
                let charged =
                    claimed.and_then(|()| self.charge_creation(now, device, conv, msg_id));
                if let Err(refusal) = charged {
                    self.refuse(conn, refusal);
                    return Taken::Refused;
                }
            }
            let creating = creating.is_some();
            if let Some(change) = effect.as_ref().map(|e| &e.change) {
                if let Err(refusal) = self.admit_invitations(now, device, conv, msg_id, change) {
                    self.refuse(conn, refusal);
                    return Taken::Refused;
                }
            }
            if creating {
                // A creating commit: the conversation starts with its creator as sole member,
                // and the commit adds the others.
                self.dm_claims.created(conv);
                self.delivery
                    .create_group_log(now, conn, conv, device, self.fx.writes());
            }
        }
        let appended = self.delivery.append(
            now,
            device,
            conv,
            msg_id,
            after.is_some(),
            Bytes::from(body),
            self.fx.writes(),
        );
        let seq = match appended {
            Ok(Appended::New(seq)) => {
                self.sequenced(now, conv, seq, after.is_some(), effect.take().map(|e| *e));
                seq
            }
            Ok(Appended::Duplicate(seq)) => seq,
            Err(error) => {
                let (code, message) = match error {
                    AppendError::UnknownConversation => {
                        (ErrorCode::UnknownConversation, "no such conversation here")
                    }
                    AppendError::NotMember => {
                        (ErrorCode::NotMember, "not a member of this conversation")
                    }
                };
                self.refuse(conn, Refusal::error(code, message).about(msg_id));
                return Taken::Refused;
            }
        };
        let routing = Routing {
            conversation: conv,
            seq,
            ..Routing::default()
        };
        let ack = crate::wire::payload::SendAck {
            msg_id: msg_id.to_bytes(),
        };
        if self.config.planted == Some(PlantedBug::GatewayAckBeforeCommit) {
            // Planted by the simulator: never in a real gateway.
            let frame = crate::wire::Frame::new(routing, Payload::SendAck(ack)).encode();
            self.fx.eager(GatewayOutput::Send(conn, frame));
        } else {
            self.fx.send(conn, routing, Payload::SendAck(ack));
        }
        self.delivery
            .pump_members(now, conv, &self.sessions, &mut self.fx);
        Taken::Sequenced
    }

    /// Takes a device's message in `conv` (see [`Gateway::accept_one`]), then, once it is
    /// sequenced (or relayed), each message held behind it in its sender's order, down the
    /// chain; if it is refused, what was held behind it is let go and the device told to send
    /// again from its last sequenced message (see `held_sends`).
    fn accept_message(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        conv: ConversationId,
        send: Send,
    ) {
        self.take_chain(now, device, conv, held_sends::HeldSend { conn, send });
    }

    /// A message of `device` in `conv` was sequenced (or relayed) by another path than a
    /// `Send` of its own (a replica took it from the authority): what is held behind it
    /// follows, down the chain.
    pub(super) fn take_held_behind(
        &mut self,
        now: Instant,
        device: DeviceId,
        conv: ConversationId,
        msg_id: MsgId,
    ) {
        if let Some(next) = self.held_sends.release(device, conv, msg_id) {
            self.held_send_stats.taken += 1;
            self.take_chain(now, device, conv, next);
        }
    }

    /// Takes `first`, then what is held behind each message taken (see
    /// [`Gateway::accept_message`]).
    fn take_chain(
        &mut self,
        now: Instant,
        device: DeviceId,
        conv: ConversationId,
        first: held_sends::HeldSend,
    ) {
        let mut next = Some(first);
        while let Some(held_sends::HeldSend { conn, send }) = next.take() {
            let msg_id = send.msg_id();
            let chained = send.after.is_some();
            match self.accept_one(now, conn, device, conv, send) {
                // Relayed: the conversation's authority moved to another domain's gateway
                // while messages were held here; they follow it there, in order.
                Taken::Sequenced | Taken::Relayed if chained => {
                    next = self.held_sends.release(device, conv, msg_id);
                    if next.is_some() {
                        self.held_send_stats.taken += 1;
                    }
                }
                Taken::Refused if chained => self.let_go_behind(device, conv, msg_id),
                Taken::Sequenced | Taken::Refused | Taken::Held | Taken::Relayed => {}
            }
        }
    }

    /// A message of `device` in `conv` that came ahead of its sender's order (`after` is not
    /// its last sequenced, `last`): held if what it comes after may still come (a message
    /// never sequenced; `Some(Taken::Held)`), the device told of each gap it should fill.
    /// `None` if it must be refused: the device is behind (it names one sequenced before its
    /// last, or none), or the bounds are reached.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn hold_ahead(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        conv: ConversationId,
        after: Option<MsgId>,
        last: MsgId,
        send: Send,
    ) -> Option<Taken> {
        let ahead = after.filter(|&a| {
            a != sender_order::NO_MESSAGE && !self.delivery.is_sequenced(conv, device, a)
        })?;
        match self.held_sends.hold(now, conn, device, conv, ahead, send) {
            Holding::Tell(gaps) => {
                self.held_send_stats.held += 1;
                for (head, missing) in gaps {
                    self.held_send_stats.gaps_told += 1;
                    self.tell_sender_gap(conn, conv, head, missing, last);
                }
                Some(Taken::Held)
            }
            Holding::Quiet => {
                self.held_send_stats.held += 1;
                Some(Taken::Held)
            }
            Holding::Full => {
                self.held_send_stats.full += 1;
                None
            }
        }
    }

    /// Tells a device that its `msg_id` in `conv` is held: it comes after `ahead`, which has
    /// not arrived, and the last message sequenced from it there is `last`. The notice names
    /// `msg_id` (the device knows what it comes after), the way a refusal would.
    fn tell_sender_gap(
        &mut self,
        conn: ConnectionId,
        conv: ConversationId,
        msg_id: MsgId,
        ahead: MsgId,
        last: MsgId,
    ) {
        let routing = Routing {
            conversation: conv,
            ..Routing::default()
        };
        let report = ErrorReport {
            code: ErrorCode::SenderOutOfOrder as u16,
            message: refusal::held_message(ahead, last),
            msg_id: Some(msg_id.to_bytes()),
            after: Some(last.to_bytes()),
            retry_after_ms: None,
            held: Some(true),
        };
        self.fx.send(conn, routing, Payload::Error(report));
    }

    /// `msg_id` of `device` in `conv` was refused: what was held behind it cannot come in
    /// order. It is let go, and the device told (as if it had been refused on arrival) to send
    /// everything waiting again, chained from its last sequenced message.
    fn let_go_behind(&mut self, device: DeviceId, conv: ConversationId, msg_id: MsgId) {
        let (first, let_go) = self.held_sends.refused(device, conv, msg_id);
        self.held_send_stats.let_go += let_go as u64;
        if let Some(first) = first {
            let last = self.delivery.sender_last(conv, device);
            let after = first.send.after.map(MsgId::from_bytes);
            let refusal = Refusal::out_of_sender_order(conv, first.send.msg_id(), after, last);
            self.refuse(first.conn, refusal);
        }
    }

    /// A message (a local device's or a relayed one) was sequenced at `seq` in `conv`: a
    /// commit's `effect` applies, then the message goes to each other domain with members.
    fn sequenced(
        &mut self,
        now: Instant,
        conv: ConversationId,
        seq: u64,
        chained: bool,
        effect: Option<GroupEffect>,
    ) {
        let commit = effect.is_some();
        if let Some(effect) = effect {
            self.groups.count_commit();
            self.apply_group_effect(now, conv, seq, effect);
        }
        self.fan_out(conv, seq, chained);
        if commit {
            // After the commit went out: other domains' replicas take seqs in order.
            self.propose_next_removal(now, conv);
        }
    }

    /// Proposals are bound to their epoch: what a commit did not remove is proposed again in
    /// the new one, one device per epoch (a commit holds at most one removal).
    fn propose_next_removal(&mut self, now: Instant, conv: ConversationId) {
        if let Some(device) = self.groups.next_removal(conv) {
            self.issue_removal(now, conv, device);
        }
    }

    /// Applies an accepted commit sequenced at `seq`: the group's new state, the members it
    /// adds (cursor at `seq`, a Welcome in their inbox; other domains' get theirs through
    /// their gateway) and removes (a notice in theirs); the caller proposes the next pending
    /// removal once the commit went out. Other domains' gateways hear of their devices it adds and removes
    /// before the commit itself (as a removed device here, one removed there never reads it).
    fn apply_group_effect(
        &mut self,
        now: Instant,
        conv: ConversationId,
        seq: u64,
        effect: GroupEffect,
    ) {
        let GroupEffect {
            state,
            change,
            welcome,
            new_owner,
            domains: _,
            dm_with: _,
        } = effect;
        if new_owner.is_some() {
            self.groups.note_handover();
        }
        self.groups.set_state(conv, state, self.fx.writes());
        for &device in &change.removed {
            self.transfers.member_removed(conv, device, &mut self.fx);
        }
        // Devices of other domains join and leave through their own gateway, which keeps a
        // replica.
        let (change, abroad) = self.split_foreign(change);
        let group = self.groups.get(conv).expect("set above");
        self.delivery.apply_membership(
            now,
            conv,
            seq,
            &change,
            welcome.as_ref(),
            group,
            &self.sessions,
            &mut self.fx,
        );
        let (revoked, _) = self.split_revoked(&change.removed);
        self.delivery
            .revoked_departed(conv, &revoked, &self.sessions, &mut self.fx);
        if !abroad.added.is_empty() {
            let kind = group.kind() as u8;
            let welcome = welcome.expect("checked: adds carry a Welcome");
            self.welcome_abroad(conv, seq, kind, &welcome, abroad.added);
        }
        self.remove_abroad(conv, seq, abroad.removed);
    }

    /// Asks for `device` to leave `conv`: proposed as the group's external sender now, or once
    /// the removal pending in this epoch is committed.
    fn propose_removal(&mut self, now: Instant, conv: ConversationId, device: DeviceId) {
        if let Some(to) = self.spanning.moving_to(conv).map(str::to_string) {
            // Frozen for a handover: nothing is sequenced here. Kept in the group state, to
            // be proposed after the next commit if the peer declines and this gateway is the
            // authority again; the gateway it goes to holds the group state it was given,
            // and hears of a device of this domain as of one leaving (of another domain's
            // revoked device, from that domain's CRL).
            let _ = self
                .groups
                .request_removal(conv, device, &|_| false, self.fx.writes());
            if self.registry.user_of(device).is_some() {
                let leave = Entry::Leave {
                    conversation: conv,
                    device,
                };
                // A configured peer: the handover went to it.
                let _ = self.send_entry(&to, &leave);
            }
            return;
        }
        // The group's devices revoked by their domain: they will never commit again.
        let revoked: BTreeSet<DeviceId> = self
            .groups
            .get(conv)
            .map(|group| {
                group
                    .devices()
                    .keys()
                    .copied()
                    .filter(|&d| {
                        self.registry.crl().revoked.contains(&d)
                            || self
                                .foreign_domain(d)
                                .is_some_and(|domain| self.peer_crls.revokes(domain, d))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let removal =
            self.groups
                .request_removal(conv, device, &|d| revoked.contains(&d), self.fx.writes());
        match removal {
            Removal::Nothing => {}
            Removal::LastMember(effect) => {
                let head = self.delivery.head(conv).unwrap_or(0);
                self.apply_group_effect(now, conv, head, *effect);
                self.propose_next_removal(now, conv);
            }
            Removal::Propose => self.issue_removal(now, conv, device),
        }
    }

    /// Sequences the Remove proposal for `device` in the group's current epoch.
    fn issue_removal(&mut self, now: Instant, conv: ConversationId, device: DeviceId) {
        let Some(proposal) =
            self.groups
                .removal_proposal(conv, device, self.entropy.as_mut(), self.fx.writes())
        else {
            return;
        };
        self.sequence_proposal(now, conv, proposal);
    }

    /// Sequences an MLS proposal this gateway signed (or was handed) as the group's external
    /// sender, under a fresh id, and hands it to members here and abroad: the commit that
    /// follows refers to it. Returns its seq.
    pub(super) fn sequence_proposal(
        &mut self,
        now: Instant,
        conv: ConversationId,
        proposal: Bytes,
    ) -> u64 {
        let mut id = [0u8; 16];
        self.entropy.fill_bytes(&mut id);
        let seq = self.delivery.append_by_authority(
            now,
            conv,
            MsgId::from_bytes(id),
            proposal,
            self.fx.writes(),
        );
        self.fan_out(conv, seq, false);
        self.delivery
            .pump_members(now, conv, &self.sessions, &mut self.fx);
        seq
    }

    /// The peer roots this gateway's root vouches for to its devices (`None` before any
    /// handshake proved one): signed again only when the set changes.
    fn peer_roots(&mut self) -> Option<&crate::trust::peer_roots::PeerRoots> {
        let roots = self.federation.as_ref()?.peer_roots();
        if roots.is_empty() {
            return None;
        }
        if self
            .peer_roots
            .as_ref()
            .is_none_or(|signed| signed.roots != roots)
        {
            self.peer_roots = Some(self.registry.authority().vouch_peer_roots(roots));
        }
        self.peer_roots.as_ref()
    }

    /// Revokes `device`: new CRL to every session, the device's sessions and resume token end,
    /// its KeyPackages go, and a removal is proposed in each of its groups.
    fn revoke(&mut self, now: Instant, device: DeviceId) {
        if !self.registry.revoke(now, device, self.fx.writes()) {
            return; // revoked already, or never registered here
        }
        // Every peer domain refuses it from now on: behind what the device sent before.
        let peers: Vec<String> = self
            .config
            .federation_peers
            .iter()
            .map(|p| p.domain.clone())
            .collect();
        self.push_crl(&peers);
        self.sessions.drop_device_token(device, self.fx.writes());
        // Nobody may add it to a group again.
        self.key_packages.forget(device, self.fx.writes());
        let open: Vec<(ConnectionId, Option<DeviceId>)> = self.sessions.connections().collect();
        for (conn, holder) in open {
            if holder == Some(device) {
                let goodbye = Refusal::goodbye(ErrorCode::DeviceRevoked, "this device was revoked");
                self.refuse(conn, goodbye);
            } else if holder.is_some() {
                self.registry.send_crl(conn, &mut self.fx);
            }
        }
        for conv in self.groups.groups_of(device) {
            self.propose_removal(now, conv, device);
        }
        let groups = &self.groups;
        self.delivery.drop_revoked_member(
            device,
            |conv| groups.get(conv).is_some(),
            &self.sessions,
            &mut self.fx,
        );
    }

    /// `devices` split into those this gateway revoked and the rest (a plain conversation
    /// made or opened here never lists a revoked one again; a group's revoked members depart
    /// at once).
    pub(super) fn split_revoked(&self, devices: &[DeviceId]) -> (Vec<DeviceId>, Vec<DeviceId>) {
        let crl = self.registry.crl();
        devices.iter().partition(|d| crl.revoked.contains(d))
    }
}

/// The user a session's device belongs to (every open session's device is bound to one).
fn owner_of(registry: &Registry, device: DeviceId) -> Result<UserId, Refusal> {
    registry.user_of(device).ok_or_else(|| {
        Refusal::error(
            ErrorCode::DeviceNotAdmitted,
            "this device is not bound to a user here",
        )
    })
}
