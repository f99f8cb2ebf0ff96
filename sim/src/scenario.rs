//! The scenario DSL, version 1: line-oriented text describing topology, workload, faults over
//! time, duration and the invariants to check. The reference is in SIMULATION.md.
//!
//! Parsing is two steps: each line becomes a statement (syntax errors name file:line:column and
//! what was expected), then names are resolved against the declared topology (unknown names are
//! reported at the token that used them).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use sund_model::gateway::limits::Rate;
use sund_model::gateway::GatewayConfig;
use sund_model::mls::group_ops::GroupKind;
use sund_model::node::NodeConfig;
use sund_model::planted::PlantedBug;
use sund_model::wire::payload::ContactAction;

use crate::network::LinkProfile;

/// Most devices one scenario may declare (the simulator is sized for tens of thousands).
pub const DEVICES_MAX: u64 = 100_000;

/// A parse or resolution error, located in the scenario file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScenarioError {
    /// File the scenario came from.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// What was wrong, and what was expected.
    pub message: String,
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

impl std::error::Error for ScenarioError {}

/// Where a statement came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Span {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

/// A set of actors named in a statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// One gateway by name.
    Gateway(String),
    /// Every device of a user.
    User(String),
    /// One device: user and index.
    Device(String, u32),
    /// Every device of every user whose name starts with the prefix (`member*`).
    UserGlob(String),
    /// Every device.
    AllDevices,
    /// Every gateway.
    AllGateways,
    /// One device drawn from the fault stream each time the action runs.
    RandomDevice,
    /// One gateway drawn from the fault stream each time the action runs.
    RandomGateway,
}

/// Changes to a link profile; unset fields keep their value.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct ProfilePatch {
    /// One-way latency range, microseconds.
    pub latency_us: Option<(u64, u64)>,
    /// Loss probability.
    pub loss: Option<f64>,
    /// Duplication probability.
    pub duplicate: Option<f64>,
    /// Reordering probability.
    pub reorder: Option<f64>,
    /// Bits per second per direction (0: no limit).
    pub bandwidth_bps: Option<u64>,
}

impl ProfilePatch {
    /// Applies the patch to a profile.
    pub fn apply(&self, mut p: LinkProfile) -> LinkProfile {
        if let Some((lo, hi)) = self.latency_us {
            p.latency_us_min = lo;
            p.latency_us_max = hi;
        }
        if let Some(x) = self.loss {
            p.loss = x;
        }
        if let Some(x) = self.duplicate {
            p.duplicate = x;
        }
        if let Some(x) = self.reorder {
            p.reorder = x;
        }
        if let Some(x) = self.bandwidth_bps {
            p.bandwidth_bps = x;
        }
        p
    }
}

/// Kinds of MLS changes a future `commit` action may ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitKind {
    /// Add a device.
    Add,
    /// Remove a device.
    Remove,
    /// Update own leaf.
    Update,
    /// Leave (the gateway proposes the removal, a member commits it).
    Leave,
    /// Start the DM as if nobody had (a DM's id follows from its two users, so both may
    /// start it at once; the gateways make it once).
    Start,
    /// Make this user an admin of the room (who may then add anyone's devices and remove
    /// members').
    Admin(String),
}

/// Something done at a point in time.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Cut every pair between the two sets.
    Partition(Target, Target),
    /// Restore every pair between the two sets.
    Heal(Target, Target),
    /// Heal every cut, release every hold, clear link faults, restart crashed actors.
    HealAll,
    /// Cut a set from everyone.
    Isolate(Target),
    /// Undo `isolate`.
    Rejoin(Target),
    /// Queue frames between the two sets.
    Hold(Target, Target),
    /// Deliver what was queued.
    Release(Target, Target),
    /// Reset every connection of the set.
    Disconnect(Target),
    /// Crash the set (uncommitted writes are lost).
    Crash(Target),
    /// Restart crashed actors of the set from their disks.
    Restart(Target),
    /// Drain gateways as on SIGTERM: refuse new connections, say goodbye to every session
    /// (with the retry hint), commit what is in flight, stop.
    Drain(Target),
    /// Change the default link profile.
    Network(ProfilePatch),
    /// Change the profile between two sets.
    Link(Target, Target, ProfilePatch),
    /// Revoke a device's certificate (identity and trust issue).
    Revoke(Target),
    /// Hand a conversation's authority to another gateway (federation).
    Handover(String, String),
    /// The first gateway queues one entry for the second on their federation link (the two
    /// must be declared with `federate`).
    Relay(String, String),
    /// An MLS commit by a member.
    Commit(String, Target, CommitKind),
    /// Cut one direction: frames from the first set to the second are dropped.
    Block(Target, Target),
    /// Undo `block`.
    Unblock(Target, Target),
    /// The set's disks stop completing commits (a slow disk that stalls).
    StallDisk(Target),
    /// Undo `stall-disk`: what waited completes.
    ResumeDisk(Target),
    /// The set's disks are full: the next commit with writes fails, and the actor stops (as a
    /// real driver drops its machine and refuses connections) until `free-disk`.
    FillDisk(Target),
    /// Undo `fill-disk`: a stopped actor starts again from what is durable.
    FreeDisk(Target),
    /// The gateways' disks lie about fsync from now on: commits report durable (and release
    /// what they held) but stay in a volatile cache, so a crash loses every one since.
    LieDisk(Target),
    /// Undo `lie-disk`: the cache is flushed, and what was committed is durable again.
    HonestDisk(Target),
    /// The wall clock of the set jumps by this many microseconds; a running process keeps its
    /// monotonic time and reads the jump when it next starts.
    ClockJump(Target, i64),
    /// The set's clocks run this many parts per million fast (or slow) from now on.
    Drift(Target, i64),
    /// Each device of the set that is in the conversation sends a file of this many bytes
    /// (its content from the seed and the name; with `like`, the named file with bytes
    /// inserted in its middle, so that most chunks are shared).
    SendFile {
        /// Conversation name.
        conversation: String,
        /// Senders.
        from: Target,
        /// Size in bytes.
        size: usize,
        /// The file's name (also what `like` refers to).
        name: String,
        /// An earlier file this one is an edit of.
        like: Option<String>,
    },
    /// Each device of the first set adds (asks, or accepts), removes, blocks or unblocks the
    /// users of the second set's devices.
    Contact(Target, Target, ContactAction),
    /// Each device of the set makes its user invisible (`true`) or visible again.
    Invisible(Target, bool),
    /// Each device of the first set watches the presence of the second set's users (its
    /// watchlist from now on, in memory: a restarted node watches nobody).
    Watch(Target, Target),
}

/// Largest file a scenario sends (the simulation keeps files in memory).
pub const SIM_FILE_BYTES_MAX: usize = 64 << 20;

impl Action {
    /// The DSL keyword of the action.
    pub fn keyword(&self) -> &'static str {
        match self {
            Action::Partition(..) => "partition",
            Action::Heal(..) | Action::HealAll => "heal",
            Action::Isolate(_) => "isolate",
            Action::Rejoin(_) => "rejoin",
            Action::Hold(..) => "hold",
            Action::Release(..) => "release",
            Action::Disconnect(_) => "disconnect",
            Action::Crash(_) => "crash",
            Action::Restart(_) => "restart",
            Action::Drain(_) => "drain",
            Action::Network(_) => "network",
            Action::Link(..) => "link",
            Action::Revoke(_) => "revoke",
            Action::Handover(..) => "handover",
            Action::Relay(..) => "relay",
            Action::Commit(..) => "commit",
            Action::Block(..) => "block",
            Action::Unblock(..) => "unblock",
            Action::StallDisk(_) => "stall-disk",
            Action::ResumeDisk(_) => "resume-disk",
            Action::FillDisk(_) => "fill-disk",
            Action::FreeDisk(_) => "free-disk",
            Action::LieDisk(_) => "lie-disk",
            Action::HonestDisk(_) => "honest-disk",
            Action::ClockJump(..) => "clock",
            Action::Drift(..) => "drift",
            Action::SendFile { .. } => "send-file",
            Action::Contact(..) => "contact",
            Action::Invisible(..) => "invisible",
            Action::Watch(..) => "watch",
        }
    }
}

/// When an action runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timing {
    /// Once.
    At(Duration),
    /// Repeatedly: first at `start`, then every `period` while before `stop`.
    Every {
        /// Period.
        period: Duration,
        /// First run.
        start: Duration,
        /// No run at or after this.
        stop: Duration,
        /// Each run is delayed by a random amount below this (from the fault stream).
        jitter: Duration,
    },
}

/// A scheduled action.
#[derive(Clone, Debug, PartialEq)]
pub struct Scheduled {
    /// When.
    pub timing: Timing,
    /// What.
    pub action: Action,
    /// Where in the file.
    pub span: Span,
}

/// A message workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// Conversation name.
    pub conversation: String,
    /// Senders.
    pub from: Target,
    /// Each sender sends once per period (first at a random phase).
    pub period: Duration,
    /// Body size in bytes.
    pub size: usize,
    /// First send no earlier than this.
    pub start: Duration,
    /// No send at or after this.
    pub stop: Duration,
    /// Where in the file.
    pub span: Span,
}

/// Invariants a scenario can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Invariant {
    /// No message the gateway acknowledged is lost (its seq never changes owner, and it reaches
    /// every member after heal).
    NoLoss,
    /// No message reaches an application twice.
    NoDuplicate,
    /// Each device sees each conversation in seq order without gaps.
    Order,
    /// After heal, every cursor reaches the head and every outbox empties within the bound.
    Converge,
    /// MLS: members share epoch and epoch authenticator after heal.
    EpochAgreement,
    /// MLS: every member decrypts every message sequenced while it is a member.
    Decrypt,
    /// A revoked device never completes authentication (trust issue).
    RevokedNeverAuthenticates,
    /// Every node holds the newest CRL after heal.
    CrlConverge,
    /// At most one authority per conversation at any time (federation).
    SingleAuthority,
    /// Every entry a gateway queued durably for a federation peer reaches it once, in order,
    /// with the body queued under its number; after heal every link is up and every outbox
    /// empty (see `world::federation`).
    FederationLinks,
    /// What one device sends to one conversation is sequenced in the order it was sent.
    /// Checked in every scenario, named or not.
    SenderOrder,
    /// No actor panics and the simulated disk takes every batch: a run that hits either ends
    /// as a failure with its seed and replay line, and the rest of a sweep goes on. Checked in
    /// every scenario, named or not.
    NoPanic,
    /// Every file a device completes is the file that was sent, completed once; after heal,
    /// every device that was a member when a file was sent and still is holds it complete,
    /// and the sender holds its verified receipt.
    Files,
    /// The gateway's per-device send limit bounds what a flooding device gets sequenced (see
    /// `world::limits`).
    Limits,
    /// Devices whose `send` lines make at most half the send limit's rate are never
    /// throttled. Only where outages are short: a device back from a long one with more than a
    /// burst waiting is rightly throttled.
    Unthrottled,
    /// Each gateway's limit per peer bounds the relays it lets through from each peer gateway
    /// (see `world::peer_limit`).
    PeerLimit,
    /// No device learns the presence of a user who is not its mutual contact, is invisible, or
    /// blocked it (or was blocked by it), judged by the contact changes the gateway answered;
    /// what it learns is only online or a coarse bucket; after heal, every watcher's view of
    /// each watched user is what that rule allows (see `world::presence`).
    PresencePrivacy,
    /// After heal, every gateway holds for each of its users the contacts, requests (both
    /// ways) and blocks that the answered contact changes of every domain's devices make:
    /// adds and removes across domains reached the other user's gateway (see
    /// `world::presence`).
    ContactsConverge,
    /// No gateway sequences or relays a commit adding a device of a user who blocked the
    /// committer's user once its own durable records hold the block (see `world::blocks`).
    BlocksHold,
}

impl Invariant {
    /// Every invariant with its DSL name.
    pub const ALL: &'static [(&'static str, Invariant)] = &[
        ("no-loss", Invariant::NoLoss),
        ("no-duplicate", Invariant::NoDuplicate),
        ("order", Invariant::Order),
        ("converge", Invariant::Converge),
        ("epoch-agreement", Invariant::EpochAgreement),
        ("decrypt", Invariant::Decrypt),
        (
            "revoked-never-authenticates",
            Invariant::RevokedNeverAuthenticates,
        ),
        ("crl-converge", Invariant::CrlConverge),
        ("single-authority", Invariant::SingleAuthority),
        ("federation-links", Invariant::FederationLinks),
        ("sender-order", Invariant::SenderOrder),
        ("no-panic", Invariant::NoPanic),
        ("files", Invariant::Files),
        ("rate-limits", Invariant::Limits),
        ("ordinary-unthrottled", Invariant::Unthrottled),
        ("peer-limit", Invariant::PeerLimit),
        ("presence-privacy", Invariant::PresencePrivacy),
        ("contacts-converge", Invariant::ContactsConverge),
        ("blocks-hold", Invariant::BlocksHold),
    ];

    /// The DSL name.
    pub fn name(self) -> &'static str {
        Invariant::ALL
            .iter()
            .find(|(_, i)| *i == self)
            .expect("every invariant is named")
            .0
    }

    /// True if this build can check it.
    pub fn implemented(self) -> bool {
        matches!(
            self,
            Invariant::NoLoss
                | Invariant::NoDuplicate
                | Invariant::Order
                | Invariant::Converge
                | Invariant::EpochAgreement
                | Invariant::Decrypt
                | Invariant::RevokedNeverAuthenticates
                | Invariant::CrlConverge
                | Invariant::SenderOrder
                | Invariant::NoPanic
                | Invariant::Files
                | Invariant::Limits
                | Invariant::Unthrottled
                | Invariant::PeerLimit
                | Invariant::PresencePrivacy
                | Invariant::ContactsConverge
                | Invariant::FederationLinks
                | Invariant::SingleAuthority
                | Invariant::BlocksHold
        )
    }
}

impl Tunables {
    /// Sets what this scenario's `config` lines name in a gateway's and a node's configuration
    /// (the model simulator's actors and the driver layer's drivers both take it from here).
    pub fn apply(&self, gateway: &mut GatewayConfig, node: &mut NodeConfig) {
        if let Some(h) = self.heartbeat {
            gateway.heartbeat_interval = h;
            node.heartbeat_interval = h;
        }
        if let Some(i) = self.idle_timeout {
            gateway.session_idle_timeout = i;
            node.idle_timeout = i;
            node.handshake_timeout = i;
        }
        if let Some(h) = self.handshake_timeout {
            node.handshake_timeout = h;
        }
        if let Some(r) = self.redeliver_after {
            gateway.redeliver_after = r;
        }
        if let Some(r) = self.resend_after {
            node.resend_after = r;
        }
        if let Some(w) = self.window {
            gateway.delivery_window = w;
        }
        if let Some(r) = self.retention {
            gateway.retention_max = r;
            gateway.dedup_retention = gateway.dedup_retention.max(r);
        }
        if let Some(m) = self.mailbox {
            gateway.mailbox_bytes_max = Some(m);
        }
        if let Some(b) = self.backoff_max {
            node.backoff_max = b.max(node.backoff_initial);
        }
        if let Some(rate) = self.send_limit {
            gateway.limits.sends = rate;
        }
        if let Some(rate) = self.conversation_limit {
            gateway.limits.conversations = rate;
        }
        if let Some(rate) = self.invitation_limit {
            gateway.limits.invitations = rate;
        }
        if let Some(rate) = self.registration_limit {
            gateway.limits.registrations = rate;
        }
        if let Some(rate) = self.contact_limit {
            gateway.limits.contact_requests = rate;
        }
        if let Some(rate) = self.watch_limit {
            gateway.limits.presence_subscriptions = rate;
        }
        if let Some(max) = self.watchlist_max {
            gateway.limits.watchlist_max = max;
        }
        if let Some(rate) = self.peer_limit {
            gateway.limits.peer_relays = rate;
        }
    }

    /// The per-device send limit the gateways of this scenario apply.
    pub fn send_rate(&self) -> Option<Rate> {
        self.send_limit
            .unwrap_or(sund_model::gateway::limits::RateLimits::default().sends)
    }

    /// The per-user invitation limit the gateways of this scenario apply.
    pub fn invitation_rate(&self) -> Option<Rate> {
        self.invitation_limit
            .unwrap_or(sund_model::gateway::limits::RateLimits::default().invitations)
    }

    /// The per-address registration limit the gateways of this scenario apply.
    pub fn registration_rate(&self) -> Option<Rate> {
        self.registration_limit
            .unwrap_or(sund_model::gateway::limits::RateLimits::default().registrations)
    }
}

/// A declared user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserDecl {
    /// Name.
    pub name: String,
    /// Devices.
    pub devices: u32,
    /// Home gateway name.
    pub gateway: String,
    /// The network address every device of the user connects from (`None`: an address of
    /// each device's own), which the gateways' per-address limits see.
    pub address: Option<core::net::Ipv4Addr>,
}

/// A declared conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct ConversationDecl {
    /// Name.
    pub name: String,
    /// An MLS group (DM or room) created by its first member device, or `None` for a plain
    /// conversation the operator creates.
    pub kind: Option<GroupKind>,
    /// Member sets.
    pub members: Vec<Target>,
    /// Authority gateway name.
    pub gateway: String,
    /// Where in the file.
    pub span: Span,
}

/// Protocol tunables a scenario may set.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Tunables {
    /// Heartbeat interval.
    pub heartbeat: Option<Duration>,
    /// Idle timeout (node and gateway).
    pub idle_timeout: Option<Duration>,
    /// Node handshake timeout.
    pub handshake_timeout: Option<Duration>,
    /// Gateway redelivery delay.
    pub redeliver_after: Option<Duration>,
    /// Node resend delay.
    pub resend_after: Option<Duration>,
    /// Gateway delivery window.
    pub window: Option<u64>,
    /// MLS: about how many members decrypt each application message (large rooms).
    pub decrypt_sample: Option<u32>,
    /// MLS: how many one-time KeyPackages each device keeps at the gateway.
    pub key_packages: Option<usize>,
    /// Node reconnect backoff cap.
    pub backoff_max: Option<Duration>,
    /// Gateway retention limit: older messages are dropped even if unacknowledged.
    pub retention: Option<Duration>,
    /// Gateway mailbox quota: most bytes kept for one device that has not read them.
    pub mailbox: Option<u64>,
    /// Gateway rate limit on messages per device (`Some(None)`: off).
    pub send_limit: Option<Option<Rate>>,
    /// Gateway rate limit on conversations created per user (`Some(None)`: off).
    pub conversation_limit: Option<Option<Rate>>,
    /// Gateway rate limit on registrations per source address (`Some(None)`: off).
    pub registration_limit: Option<Option<Rate>>,
    /// Gateway rate limit on users invited per user, per hour (`Some(None)`: off).
    pub invitation_limit: Option<Option<Rate>>,
    /// Gateway rate limit on contact requests per user, per day (`Some(None)`: off).
    pub contact_limit: Option<Option<Rate>>,
    /// Gateway rate limit on watchlists per device, per hour (`Some(None)`: off).
    pub watch_limit: Option<Option<Rate>>,
    /// Gateway cap on a watchlist's length.
    pub watchlist_max: Option<u32>,
    /// Gateway rate limit on messages relayed per peer gateway (`Some(None)`: off).
    pub peer_limit: Option<Option<Rate>>,
}

/// A whole parsed and resolved scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// Name (the `name` line, else the file stem).
    pub name: String,
    /// The file it came from.
    pub file: String,
    /// Seed used when the command line gives none.
    pub seed: u64,
    /// Length of the workload-and-faults phase.
    pub duration: Duration,
    /// Bound on the convergence phase after heal.
    pub liveness: Duration,
    /// Gateways in declaration order.
    pub gateways: Vec<String>,
    /// Pairs of gateways linked by federation (`federate A B`), each pair once.
    pub federations: Vec<(String, String)>,
    /// Users in declaration order.
    pub users: Vec<UserDecl>,
    /// Conversations.
    pub conversations: Vec<ConversationDecl>,
    /// Default link profile.
    pub network: LinkProfile,
    /// Per-pair link profiles set at the start.
    pub links: Vec<(Target, Target, ProfilePatch)>,
    /// Commit latency per set.
    pub disks: Vec<(Target, Duration)>,
    /// Clock skew per set, microseconds (signed).
    pub skews: Vec<(Target, i64)>,
    /// Protocol tunables.
    pub tunables: Tunables,
    /// Message workloads.
    pub workloads: Vec<Workload>,
    /// Faults and other actions over time.
    pub schedule: Vec<Scheduled>,
    /// Invariants to check.
    pub invariants: BTreeSet<Invariant>,
    /// A deliberate protocol bug planted in every gateway and device (`plant NAME`), to show
    /// that the simulator finds it; `None` in every scenario CI runs as a check.
    pub planted: Option<PlantedBug>,
}

// ---------------------------------------------------------------- lexing

#[derive(Clone, Debug)]
struct Token<'a> {
    text: &'a str,
    column: usize,
}

struct Line<'a> {
    file: &'a str,
    number: usize,
    tokens: Vec<Token<'a>>,
    pos: usize,
    end_column: usize,
}

impl<'a> Line<'a> {
    fn new(file: &'a str, number: usize, text: &'a str) -> Line<'a> {
        let text = match text.find('#') {
            Some(i) => &text[..i],
            None => text,
        };
        let mut tokens = Vec::new();
        let mut start = None;
        for (i, ch) in text.char_indices() {
            if ch.is_whitespace() {
                if let Some(s) = start.take() {
                    tokens.push(Token {
                        text: &text[s..i],
                        column: text[..s].chars().count() + 1,
                    });
                }
            } else if start.is_none() {
                start = Some(i);
            }
        }
        if let Some(s) = start {
            tokens.push(Token {
                text: &text[s..],
                column: text[..s].chars().count() + 1,
            });
        }
        Line {
            file,
            number,
            tokens,
            pos: 0,
            end_column: text.trim_end().chars().count() + 1,
        }
    }

    fn error_at(&self, column: usize, message: String) -> ScenarioError {
        ScenarioError {
            file: self.file.to_string(),
            line: self.number,
            column,
            message,
        }
    }

    fn span(&self) -> Span {
        Span {
            line: self.number,
            column: self.tokens.first().map_or(1, |t| t.column),
        }
    }

    fn peek(&self) -> Option<&Token<'a>> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self, expected: &str) -> Result<Token<'a>, ScenarioError> {
        match self.tokens.get(self.pos) {
            Some(t) => {
                self.pos += 1;
                Ok(t.clone())
            }
            None => Err(self.error_at(
                self.end_column,
                format!("expected {expected}, found end of line"),
            )),
        }
    }

    fn keyword(&mut self, word: &str) -> Result<(), ScenarioError> {
        let t = self.next(&format!("`{word}`"))?;
        if t.text != word {
            return Err(self.error_at(t.column, format!("expected `{word}`, found `{}`", t.text)));
        }
        Ok(())
    }

    fn accept(&mut self, word: &str) -> bool {
        if self.peek().is_some_and(|t| t.text == word) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn finish(&self) -> Result<(), ScenarioError> {
        match self.peek() {
            Some(t) => Err(self.error_at(
                t.column,
                format!("expected end of line, found `{}`", t.text),
            )),
            None => Ok(()),
        }
    }

    fn name(&mut self, what: &str) -> Result<String, ScenarioError> {
        let t = self.next(what)?;
        if !t
            .text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            || !t.text.starts_with(|c: char| c.is_ascii_alphabetic())
        {
            return Err(self.error_at(
                t.column,
                format!("expected {what} (letters, digits, `-`, `_`, starting with a letter), found `{}`", t.text),
            ));
        }
        Ok(t.text.to_string())
    }

    /// `off`, or `COUNT [burst B]` (a burst of COUNT when not given): a gateway rate limit,
    /// COUNT per the period `make` gives.
    fn rate(&mut self, make: fn(u32, u32) -> Rate) -> Result<Option<Rate>, ScenarioError> {
        if self.accept("off") {
            return Ok(None);
        }
        let t = self.next("a rate limit")?;
        let count = t.text.replace('_', "").parse::<u64>().map_err(|_| {
            self.error_at(
                t.column,
                format!(
                    "expected a rate limit (how many per period, like `20 burst 40`, or `off`), found `{}`",
                    t.text
                ),
            )
        })?;
        let count = count.clamp(1, 1_000_000) as u32;
        let burst = if self.accept("burst") {
            self.integer("a burst size")?.clamp(1, 1_000_000) as u32
        } else {
            count
        };
        Ok(Some(make(count, burst)))
    }

    fn integer(&mut self, what: &str) -> Result<u64, ScenarioError> {
        let t = self.next(what)?;
        t.text.replace('_', "").parse::<u64>().map_err(|_| {
            self.error_at(
                t.column,
                format!("expected {what} (a whole number), found `{}`", t.text),
            )
        })
    }

    fn duration(&mut self, what: &str) -> Result<Duration, ScenarioError> {
        let t = self.next(what)?;
        parse_duration(t.text).ok_or_else(|| {
            self.error_at(
                t.column,
                format!(
                    "expected {what} like `250ms`, `5s`, `2m`, found `{}`",
                    t.text
                ),
            )
        })
    }

    fn signed_duration_us(&mut self, what: &str) -> Result<i64, ScenarioError> {
        let t = self.next(what)?;
        let (sign, rest) = match t.text.as_bytes().first() {
            Some(b'-') => (-1, &t.text[1..]),
            Some(b'+') => (1, &t.text[1..]),
            _ => (1, t.text),
        };
        let d = parse_duration(rest).ok_or_else(|| {
            self.error_at(
                t.column,
                format!("expected {what} like `+250ms` or `-1s`, found `{}`", t.text),
            )
        })?;
        Ok(sign * i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
    }

    fn probability(&mut self, what: &str) -> Result<f64, ScenarioError> {
        let t = self.next(what)?;
        let value = match t.text.strip_suffix('%') {
            Some(pct) => pct.parse::<f64>().ok().map(|p| p / 100.0),
            None => t.text.parse::<f64>().ok(),
        };
        match value {
            Some(p) if (0.0..=1.0).contains(&p) => Ok(p),
            _ => Err(self.error_at(
                t.column,
                format!(
                    "expected {what} like `5%` or `0.05` (between 0 and 1), found `{}`",
                    t.text
                ),
            )),
        }
    }

    fn latency_range(&mut self) -> Result<(u64, u64), ScenarioError> {
        let t = self.next("a latency range like `1ms..5ms`")?;
        let parsed = match t.text.split_once("..") {
            Some((lo, hi)) => parse_duration(lo).zip(parse_duration(hi)),
            None => parse_duration(t.text).map(|d| (d, d)),
        };
        match parsed {
            Some((lo, hi)) if lo <= hi => Ok((micros(lo), micros(hi))),
            _ => Err(self.error_at(
                t.column,
                format!(
                    "expected a latency range like `1ms..5ms` (low <= high), found `{}`",
                    t.text
                ),
            )),
        }
    }

    fn target(&mut self) -> Result<(Target, usize), ScenarioError> {
        let t = self
            .next("a target (gateway, user, user/N, prefix*, all-devices, random-device, ...)")?;
        let target = match t.text {
            "all-devices" => Target::AllDevices,
            "all-gateways" => Target::AllGateways,
            "random-device" => Target::RandomDevice,
            "random-gateway" => Target::RandomGateway,
            text => {
                if let Some(prefix) = text.strip_suffix('*') {
                    Target::UserGlob(prefix.to_string())
                } else if let Some((user, index)) = text.split_once('/') {
                    let index = index.parse::<u32>().map_err(|_| {
                        self.error_at(
                            t.column,
                            format!("expected a device like `alice/0`, found `{text}`"),
                        )
                    })?;
                    Target::Device(user.to_string(), index)
                } else {
                    // Gateway or user: resolved against the topology later.
                    Target::User(text.to_string())
                }
            }
        };
        Ok((target, t.column))
    }

    /// `unlimited`, or bits per second: `64kbit`, `10mbit`, `1gbit`, `9600bit`.
    fn bandwidth(&mut self) -> Result<u64, ScenarioError> {
        let what = "a bandwidth (`unlimited`, or bits per second like `64kbit`, `10mbit`)";
        let t = self.next(what)?;
        if t.text == "unlimited" {
            return Ok(0);
        }
        let rate = parse_bandwidth(t.text).ok_or_else(|| {
            self.error_at(t.column, format!("expected {what}, found `{}`", t.text))
        })?;
        Ok(rate)
    }

    /// A per-million rate with its sign: `+200ppm`, `-50ppm`, `0ppm`.
    fn ppm(&mut self) -> Result<i64, ScenarioError> {
        let what = "a clock rate like `+200ppm` or `-50ppm`";
        let t = self.next(what)?;
        let value = t
            .text
            .strip_suffix("ppm")
            .and_then(|n| n.strip_prefix('+').unwrap_or(n).parse::<i64>().ok())
            .filter(|v| v.abs() <= 100_000)
            .ok_or_else(|| {
                self.error_at(
                    t.column,
                    format!("expected {what} (at most 100000), found `{}`", t.text),
                )
            })?;
        Ok(value)
    }

    fn profile_patch(&mut self) -> Result<ProfilePatch, ScenarioError> {
        let mut patch = ProfilePatch::default();
        let mut any = false;
        while let Some(t) = self.peek().cloned() {
            match t.text {
                "latency" => {
                    self.pos += 1;
                    patch.latency_us = Some(self.latency_range()?);
                }
                "loss" => {
                    self.pos += 1;
                    patch.loss = Some(self.probability("a loss probability")?);
                }
                "duplicate" => {
                    self.pos += 1;
                    patch.duplicate = Some(self.probability("a duplication probability")?);
                }
                "reorder" => {
                    self.pos += 1;
                    patch.reorder = Some(self.probability("a reordering probability")?);
                }
                "bandwidth" => {
                    self.pos += 1;
                    patch.bandwidth_bps = Some(self.bandwidth()?);
                }
                other => {
                    return Err(self.error_at(
                        t.column,
                        format!(
                            "expected `latency`, `loss`, `duplicate`, `reorder` or `bandwidth`, found `{other}`"
                        ),
                    ))
                }
            }
            any = true;
        }
        if !any {
            return Err(self.error_at(
                self.end_column,
                "expected `latency`, `loss`, `duplicate`, `reorder` or `bandwidth`, found end of line".into(),
            ));
        }
        Ok(patch)
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Parses a bandwidth in bits per second: `9600bit`, `64kbit`, `10mbit`, `1gbit` (positive).
pub fn parse_bandwidth(text: &str) -> Option<u64> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let scale = match unit {
        "bit" => 1,
        "kbit" => 1_000,
        "mbit" => 1_000_000,
        "gbit" => 1_000_000_000,
        _ => return None,
    };
    number.checked_mul(scale).filter(|&bps| bps > 0)
}

/// Parses `250us`, `10ms`, `1.5s`, `2m`, `1h`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.replace('_', "").parse().ok()?;
    let scale_us = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    let us = number * scale_us;
    if !(0.0..=1e15).contains(&us) {
        return None;
    }
    Some(Duration::from_micros(us.round() as u64))
}

// ---------------------------------------------------------------- parsing

/// A value and the column where it appeared.
type At<T> = (T, usize);

struct PendingUser {
    name: String,
    devices: u32,
    gateway: Option<At<String>>,
    address: Option<core::net::Ipv4Addr>,
    span: Span,
}

struct PendingConversation {
    name: String,
    kind: Option<GroupKind>,
    members: Vec<At<Target>>,
    gateway: Option<At<String>>,
    span: Span,
}

struct PendingAction {
    scheduled: Scheduled,
    targets: Vec<At<Target>>,
    names: Vec<At<String>>,
}

struct Builder {
    name: Option<String>,
    seed: u64,
    duration: Option<Duration>,
    liveness: Duration,
    gateways: Vec<(String, Span)>,
    federations: Vec<(String, usize, String, usize, Span)>,
    users: Vec<PendingUser>,
    conversations: Vec<PendingConversation>,
    network: LinkProfile,
    links: Vec<(Target, usize, Target, usize, ProfilePatch, Span)>,
    disks: Vec<(Target, usize, Duration, Span)>,
    skews: Vec<(Target, usize, i64, Span)>,
    tunables: Tunables,
    workloads: Vec<(Workload, String, usize, usize)>,
    schedule: Vec<PendingAction>,
    invariants: BTreeSet<Invariant>,
    planted: Option<PlantedBug>,
}

/// Parses and resolves a scenario. `file` is used in error messages and as the default name.
pub fn parse(file: &str, text: &str) -> Result<Scenario, ScenarioError> {
    let mut b = Builder {
        name: None,
        seed: 1,
        duration: None,
        liveness: Duration::from_secs(60),
        gateways: Vec::new(),
        federations: Vec::new(),
        users: Vec::new(),
        conversations: Vec::new(),
        network: LinkProfile::default(),
        links: Vec::new(),
        disks: Vec::new(),
        skews: Vec::new(),
        tunables: Tunables::default(),
        workloads: Vec::new(),
        schedule: Vec::new(),
        invariants: BTreeSet::new(),
        planted: None,
    };
    let mut last_line = 1;
    for (index, raw) in text.lines().enumerate() {
        last_line = index + 1;
        let mut line = Line::new(file, index + 1, raw);
        if line.tokens.is_empty() {
            continue;
        }
        statement(&mut b, &mut line)?;
    }
    resolve(file, b, last_line)
}

fn statement(b: &mut Builder, line: &mut Line<'_>) -> Result<(), ScenarioError> {
    let span = line.span();
    let head = line.next("a statement")?;
    match head.text {
        "name" => b.name = Some(line.name("a scenario name")?),
        "seed" => b.seed = line.integer("a seed")?,
        "duration" => b.duration = Some(line.duration("a duration")?),
        "liveness" => {
            line.keyword("within")?;
            b.liveness = line.duration("a liveness bound")?;
        }
        "gateway" => {
            let name = line.name("a gateway name")?;
            b.gateways.push((name, span));
        }
        "federate" => {
            let first_col = line.peek().map_or(line.end_column, |t| t.column);
            let first = line.name("a gateway name")?;
            let second_col = line.peek().map_or(line.end_column, |t| t.column);
            let second = line.name("a second gateway name")?;
            b.federations
                .push((first, first_col, second, second_col, span));
        }
        "user" | "users" => {
            let plural = head.text == "users";
            let name = line.name(if plural { "a user name prefix" } else { "a user name" })?;
            let count = if plural {
                line.keyword("count")?;
                line.integer("a user count")?
            } else {
                1
            };
            let mut devices = 1;
            let mut gateway = None;
            let mut address = None;
            while let Some(t) = line.peek().cloned() {
                match t.text {
                    "address" => {
                        line.pos += 1;
                        let word = line.next("an IPv4 address")?;
                        address = Some(word.text.parse::<core::net::Ipv4Addr>().map_err(|_| {
                            line.error_at(word.column, format!("expected an IPv4 address such as 203.0.113.7, found `{}`", word.text))
                        })?);
                    }
                    "devices" => {
                        line.pos += 1;
                        devices = line.integer("a device count")?;
                        if devices == 0 || devices > 64 {
                            return Err(line.error_at(t.column, "a user has 1 to 64 devices".into()));
                        }
                    }
                    "gateway" => {
                        line.pos += 1;
                        let col = line.peek().map_or(line.end_column, |t| t.column);
                        gateway = Some((line.name("a gateway name")?, col));
                    }
                    other => {
                        return Err(line.error_at(t.column, format!("expected `devices`, `gateway` or `address`, found `{other}`")))
                    }
                }
            }
            if count == 0 || count > 100_000 {
                return Err(line.error_at(head.column, "a user group has 1 to 100000 users".into()));
            }
            let declared: u64 = b.users.iter().map(|u| u64::from(u.devices)).sum();
            if declared + count * devices > DEVICES_MAX {
                return Err(line.error_at(
                    head.column,
                    format!("this would make {} devices; a scenario has at most {DEVICES_MAX}", declared + count * devices),
                ));
            }
            for i in 0..count {
                let user = if plural { format!("{name}{i}") } else { name.clone() };
                b.users.push(PendingUser { name: user, devices: devices as u32, gateway: gateway.clone(), address, span });
            }
        }
        "conversation" => {
            let name = line.name("a conversation name")?;
            let mut members = Vec::new();
            let mut gateway = None;
            if line.accept("gateway") {
                let col = line.peek().map_or(line.end_column, |t| t.column);
                gateway = Some((line.name("a gateway name")?, col));
            }
            let mut kind = None;
            if line.accept("kind") {
                let word = line.next("a conversation kind (room, dm or own)")?;
                kind = Some(match word.text {
                    "room" => GroupKind::Room,
                    "dm" => GroupKind::Dm,
                    "own" => GroupKind::Own,
                    other => {
                        return Err(line.error_at(
                            word.column,
                            format!("unknown conversation kind `{other}`; expected room, dm or own"),
                        ))
                    }
                });
            }
            line.keyword("members")?;
            while line.peek().is_some() {
                members.push(line.target()?);
            }
            if members.is_empty() {
                return Err(line.error_at(line.end_column, "expected at least one member, found end of line".into()));
            }
            b.conversations.push(PendingConversation { name, kind, members, gateway, span });
        }
        "network" => b.network = line.profile_patch()?.apply(b.network),
        "link" => {
            let (a, ca) = line.target()?;
            let (c, cc) = line.target()?;
            let patch = line.profile_patch()?;
            b.links.push((a, ca, c, cc, patch, span));
        }
        "disk" => {
            let (t, col) = line.target()?;
            line.keyword("commit")?;
            let d = line.duration("a commit latency")?;
            b.disks.push((t, col, d, span));
        }
        "skew" => {
            let (t, col) = line.target()?;
            let s = line.signed_duration_us("a clock offset")?;
            b.skews.push((t, col, s, span));
        }
        "plant" => {
            let name = line.next("a planted bug")?;
            let bug = PlantedBug::parse(name.text).ok_or_else(|| {
                let known: Vec<&str> = PlantedBug::ALL.iter().map(|(n, _)| *n).collect();
                line.error_at(
                    name.column,
                    format!(
                        "unknown planted bug `{}`; expected one of: {}",
                        name.text,
                        known.join(", ")
                    ),
                )
            })?;
            b.planted = Some(bug);
        }
        "config" => {
            let key = line.next("a tunable")?;
            match key.text {
                "heartbeat" => b.tunables.heartbeat = Some(line.duration("a heartbeat interval")?),
                "idle-timeout" => b.tunables.idle_timeout = Some(line.duration("an idle timeout")?),
                "handshake-timeout" => b.tunables.handshake_timeout = Some(line.duration("a handshake timeout")?),
                "redeliver-after" => b.tunables.redeliver_after = Some(line.duration("a redelivery delay")?),
                "resend-after" => b.tunables.resend_after = Some(line.duration("a resend delay")?),
                "backoff-max" => b.tunables.backoff_max = Some(line.duration("a backoff cap")?),
                "window" => b.tunables.window = Some(line.integer("a delivery window")?.max(1)),
                "decrypt-sample" => b.tunables.decrypt_sample = Some(u32::try_from(line.integer("a number of members")?).unwrap_or(u32::MAX)),
                "key-packages" => b.tunables.key_packages = Some(line.integer("a KeyPackage pool size")?.clamp(1, 1000) as usize),
                "retention" => b.tunables.retention = Some(line.duration("a retention limit")?),
                "mailbox" => b.tunables.mailbox = Some(line.integer("a mailbox quota in bytes")?.max(1)),
                "send-limit" => b.tunables.send_limit = Some(line.rate(Rate::per_second)?),
                "conversation-limit" => b.tunables.conversation_limit = Some(line.rate(Rate::per_hour)?),
                "invitation-limit" => b.tunables.invitation_limit = Some(line.rate(Rate::per_hour)?),
                "registration-limit" => b.tunables.registration_limit = Some(line.rate(Rate::per_hour)?),
                "contact-limit" => b.tunables.contact_limit = Some(line.rate(Rate::per_day)?),
                "watch-limit" => b.tunables.watch_limit = Some(line.rate(Rate::per_hour)?),
                "peer-limit" => b.tunables.peer_limit = Some(line.rate(Rate::per_second)?),
                "watchlist-max" => {
                    b.tunables.watchlist_max =
                        Some(u32::try_from(line.integer("most users in a watchlist")?).unwrap_or(u32::MAX))
                }
                other => {
                    return Err(line.error_at(
                        key.column,
                        format!("expected `heartbeat`, `idle-timeout`, `handshake-timeout`, `redeliver-after`, `resend-after`, `backoff-max`, `window`, `retention`, `mailbox`, `decrypt-sample`, `key-packages`, `send-limit`, `conversation-limit`, `invitation-limit`, `registration-limit`, `contact-limit`, `watch-limit`, `peer-limit` or `watchlist-max`, found `{other}`"),
                    ))
                }
            }
        }
        "send" => {
            let col = line.peek().map_or(line.end_column, |t| t.column);
            let conversation = line.name("a conversation name")?;
            line.keyword("from")?;
            let (from, from_col) = line.target()?;
            line.keyword("every")?;
            let period = line.duration("a send period")?;
            if period.is_zero() {
                return Err(line.error_at(line.end_column, "a send period must be positive".into()));
            }
            let mut size = 200;
            let mut start = Duration::ZERO;
            let mut stop = Duration::MAX;
            while let Some(t) = line.peek().cloned() {
                line.pos += 1;
                match t.text {
                    "size" => size = line.integer("a body size in bytes")? as usize,
                    "start" => start = line.duration("a start time")?,
                    "stop" => stop = line.duration("a stop time")?,
                    other => return Err(line.error_at(t.column, format!("expected `size`, `start` or `stop`, found `{other}`"))),
                }
            }
            if size > 512 * 1024 {
                return Err(line.error_at(head.column, "a simulated message body is at most 524288 bytes".into()));
            }
            b.workloads.push((Workload { conversation: String::new(), from, period, size, start, stop, span }, conversation, col, from_col));
        }
        "at" | "every" => {
            let timing = if head.text == "at" {
                Timing::At(line.duration("a time")?)
            } else {
                let period = line.duration("a period")?;
                if period.is_zero() {
                    return Err(line.error_at(head.column, "a period must be positive".into()));
                }
                let mut start = Duration::ZERO;
                let mut stop = Duration::MAX;
                let mut jitter = Duration::ZERO;
                loop {
                    if line.accept("start") {
                        start = line.duration("a start time")?;
                    } else if line.accept("stop") {
                        stop = line.duration("a stop time")?;
                    } else if line.accept("jitter") {
                        jitter = line.duration("a jitter")?;
                    } else {
                        break;
                    }
                }
                Timing::Every { period, start, stop, jitter }
            };
            let (action, targets, names) = action(line)?;
            b.schedule.push(PendingAction { scheduled: Scheduled { timing, action, span }, targets, names });
        }
        "check" => {
            if line.peek().is_none() {
                return Err(line.error_at(line.end_column, "expected an invariant name, found end of line".into()));
            }
            while let Some(t) = line.peek().cloned() {
                line.pos += 1;
                let Some((_, inv)) = Invariant::ALL.iter().find(|(n, _)| *n == t.text) else {
                    let known: Vec<&str> = Invariant::ALL.iter().map(|(n, _)| *n).collect();
                    return Err(line.error_at(t.column, format!("unknown invariant `{}`; known: {}", t.text, known.join(", "))));
                };
                b.invariants.insert(*inv);
            }
        }
        other => {
            return Err(line.error_at(
                head.column,
                format!("unknown statement `{other}`; expected one of: name, seed, duration, liveness, gateway, federate, user, users, conversation, network, link, disk, skew, config, send, at, every, check, plant"),
            ))
        }
    }
    line.finish()
}

type ActionParts = (Action, Vec<At<Target>>, Vec<At<String>>);

fn action(line: &mut Line<'_>) -> Result<ActionParts, ScenarioError> {
    let head = line.next("an action")?;
    let mut targets = Vec::new();
    let mut names = Vec::new();
    let one = |line: &mut Line<'_>,
               targets: &mut Vec<(Target, usize)>|
     -> Result<Target, ScenarioError> {
        let (t, c) = line.target()?;
        targets.push((t.clone(), c));
        Ok(t)
    };
    let action = match head.text {
        "partition" => Action::Partition(one(line, &mut targets)?, one(line, &mut targets)?),
        "heal" => {
            if line.accept("all") {
                Action::HealAll
            } else {
                Action::Heal(one(line, &mut targets)?, one(line, &mut targets)?)
            }
        }
        "isolate" => Action::Isolate(one(line, &mut targets)?),
        "rejoin" => Action::Rejoin(one(line, &mut targets)?),
        "hold" => Action::Hold(one(line, &mut targets)?, one(line, &mut targets)?),
        "release" => Action::Release(one(line, &mut targets)?, one(line, &mut targets)?),
        "disconnect" => Action::Disconnect(one(line, &mut targets)?),
        "crash" => Action::Crash(one(line, &mut targets)?),
        "restart" => Action::Restart(one(line, &mut targets)?),
        "drain" => Action::Drain(one(line, &mut targets)?),
        "network" => Action::Network(line.profile_patch()?),
        "link" => {
            let a = one(line, &mut targets)?;
            let c = one(line, &mut targets)?;
            Action::Link(a, c, line.profile_patch()?)
        }
        "revoke" => Action::Revoke(one(line, &mut targets)?),
        "contact" => {
            let verb = line.next("`add`, `remove`, `block` or `unblock`")?;
            let action = match verb.text {
                "add" => ContactAction::Add,
                "remove" => ContactAction::Remove,
                "block" => ContactAction::Block,
                "unblock" => ContactAction::Unblock,
                other => {
                    return Err(line.error_at(
                        verb.column,
                        format!("expected `add`, `remove`, `block` or `unblock`, found `{other}`"),
                    ))
                }
            };
            Action::Contact(one(line, &mut targets)?, one(line, &mut targets)?, action)
        }
        "invisible" => {
            let verb = line.next("`on` or `off`")?;
            let on = match verb.text {
                "on" => true,
                "off" => false,
                other => {
                    return Err(line.error_at(
                        verb.column,
                        format!("expected `on` or `off`, found `{other}`"),
                    ))
                }
            };
            Action::Invisible(one(line, &mut targets)?, on)
        }
        "watch" => Action::Watch(one(line, &mut targets)?, one(line, &mut targets)?),
        "block" => Action::Block(one(line, &mut targets)?, one(line, &mut targets)?),
        "unblock" => Action::Unblock(one(line, &mut targets)?, one(line, &mut targets)?),
        "stall-disk" => Action::StallDisk(one(line, &mut targets)?),
        "resume-disk" => Action::ResumeDisk(one(line, &mut targets)?),
        "fill-disk" => Action::FillDisk(one(line, &mut targets)?),
        "free-disk" => Action::FreeDisk(one(line, &mut targets)?),
        "lie-disk" => Action::LieDisk(one(line, &mut targets)?),
        "honest-disk" => Action::HonestDisk(one(line, &mut targets)?),
        "clock" => {
            let t = one(line, &mut targets)?;
            Action::ClockJump(t, line.signed_duration_us("a clock jump")?)
        }
        "drift" => {
            let t = one(line, &mut targets)?;
            Action::Drift(t, line.ppm()?)
        }
        "relay" => {
            let gcol = line.peek().map_or(line.end_column, |t| t.column);
            let from = line.name("a gateway name")?;
            targets.push((Target::Gateway(from.clone()), gcol));
            line.keyword("to")?;
            let tcol = line.peek().map_or(line.end_column, |t| t.column);
            let to = line.name("a gateway name")?;
            targets.push((Target::Gateway(to.clone()), tcol));
            Action::Relay(from, to)
        }
        "handover" => {
            let col = line.peek().map_or(line.end_column, |t| t.column);
            let conv = line.name("a conversation name")?;
            names.push((conv.clone(), col));
            line.keyword("to")?;
            let gcol = line.peek().map_or(line.end_column, |t| t.column);
            let gw = line.name("a gateway name")?;
            targets.push((Target::Gateway(gw.clone()), gcol));
            Action::Handover(conv, gw)
        }
        "commit" => {
            let col = line.peek().map_or(line.end_column, |t| t.column);
            let conv = line.name("a conversation name")?;
            names.push((conv.clone(), col));
            line.keyword("from")?;
            let who = one(line, &mut targets)?;
            let kind_token = line.next("`add`, `remove`, `update`, `leave`, `start` or `admin USER`")?;
            let kind = match kind_token.text {
                "add" => CommitKind::Add,
                "remove" => CommitKind::Remove,
                "update" => CommitKind::Update,
                "leave" => CommitKind::Leave,
                "start" => CommitKind::Start,
                "admin" => {
                    let col = line.peek().map_or(line.end_column, |t| t.column);
                    let user = line.name("a user name")?;
                    targets.push((Target::User(user.clone()), col));
                    CommitKind::Admin(user)
                }
                other => return Err(line.error_at(kind_token.column, format!("expected `add`, `remove`, `update`, `leave`, `start` or `admin USER`, found `{other}`"))),
            };
            Action::Commit(conv, who, kind)
        }
        "send-file" => {
            let col = line.peek().map_or(line.end_column, |t| t.column);
            let conversation = line.name("a conversation name")?;
            names.push((conversation.clone(), col));
            line.keyword("from")?;
            let from = one(line, &mut targets)?;
            line.keyword("size")?;
            let size_col = line.peek().map_or(line.end_column, |t| t.column);
            let size = line.integer("a file size in bytes")? as usize;
            if size == 0 || size > SIM_FILE_BYTES_MAX {
                return Err(line.error_at(
                    size_col,
                    format!("a file is 1 to {SIM_FILE_BYTES_MAX} bytes here"),
                ));
            }
            line.keyword("name")?;
            let name = line.name("a file name")?;
            let like = if line.peek().is_some() {
                line.keyword("like")?;
                Some(line.name("the name of an earlier file")?)
            } else {
                None
            };
            Action::SendFile {
                conversation,
                from,
                size,
                name,
                like,
            }
        }
        other => {
            return Err(line.error_at(
                head.column,
                format!("unknown action `{other}`; expected one of: partition, heal, isolate, rejoin, hold, release, block, unblock, disconnect, crash, restart, drain, stall-disk, resume-disk, fill-disk, free-disk, lie-disk, honest-disk, clock, drift, network, link, revoke, handover, relay, commit, send-file, contact, invisible, watch"),
            ))
        }
    };
    Ok((action, targets, names))
}

// ---------------------------------------------------------------- resolution

fn resolve(file: &str, b: Builder, last_line: usize) -> Result<Scenario, ScenarioError> {
    let err = |span: Span, column: usize, message: String| ScenarioError {
        file: file.to_string(),
        line: span.line,
        column,
        message,
    };
    let Some(duration) = b.duration else {
        return Err(ScenarioError {
            file: file.to_string(),
            line: last_line,
            column: 1,
            message: "missing `duration <time>`: every scenario says how long its workload runs"
                .into(),
        });
    };
    if b.gateways.is_empty() {
        return Err(ScenarioError {
            file: file.to_string(),
            line: last_line,
            column: 1,
            message: "missing `gateway <name>`: a scenario needs at least one gateway".into(),
        });
    }
    let mut gateway_names = BTreeSet::new();
    for (g, span) in &b.gateways {
        if !gateway_names.insert(g.clone()) {
            return Err(err(
                *span,
                span.column,
                format!("gateway `{g}` is declared twice"),
            ));
        }
    }
    let mut federations: Vec<(String, String)> = Vec::new();
    for (first, first_col, second, second_col, span) in &b.federations {
        for (g, col) in [(first, first_col), (second, second_col)] {
            if !gateway_names.contains(g) {
                return Err(err(*span, *col, format!("unknown gateway `{g}`")));
            }
        }
        if first == second {
            return Err(err(
                *span,
                *second_col,
                format!("`federate {first} {second}`: a gateway does not federate with itself"),
            ));
        }
        let pair = (
            first.clone().min(second.clone()),
            first.clone().max(second.clone()),
        );
        if federations.contains(&pair) {
            return Err(err(
                *span,
                span.column,
                format!("`federate {first} {second}` is declared twice"),
            ));
        }
        federations.push(pair);
    }
    let default_gateway =
        |span: Span, given: &Option<(String, usize)>| -> Result<String, ScenarioError> {
            match given {
                Some((g, col)) if gateway_names.contains(g) => Ok(g.clone()),
                Some((g, col)) => Err(err(span, *col, format!("unknown gateway `{g}`"))),
                None if b.gateways.len() == 1 => Ok(b.gateways[0].0.clone()),
                None => Err(err(
                    span,
                    span.column,
                    "several gateways are declared: say which with `gateway <name>`".into(),
                )),
            }
        };
    let mut users = Vec::new();
    let mut user_devices = BTreeMap::new();
    for PendingUser {
        name,
        devices,
        gateway,
        address,
        span,
    } in &b.users
    {
        if gateway_names.contains(name) || user_devices.insert(name.clone(), *devices).is_some() {
            return Err(err(
                *span,
                span.column,
                format!("name `{name}` is declared twice"),
            ));
        }
        users.push(UserDecl {
            name: name.clone(),
            devices: *devices,
            gateway: default_gateway(*span, gateway)?,
            address: *address,
        });
    }
    // Gateways and users share one namespace, so `User(name)` may really name a gateway.
    let fix = |t: Target, span: Span, col: usize| -> Result<Target, ScenarioError> {
        match t {
            Target::User(n) if gateway_names.contains(&n) => Ok(Target::Gateway(n)),
            Target::User(n) if user_devices.contains_key(&n) => Ok(Target::User(n)),
            Target::User(n) => Err(err(span, col, format!("unknown gateway or user `{n}`"))),
            Target::Device(u, i) => match user_devices.get(&u) {
                Some(&d) if i < d => Ok(Target::Device(u, i)),
                Some(&d) => Err(err(
                    span,
                    col,
                    format!("user `{u}` has {d} devices (numbered from 0); there is no `{u}/{i}`"),
                )),
                None => Err(err(span, col, format!("unknown user `{u}`"))),
            },
            Target::UserGlob(p) if user_devices.keys().any(|u| u.starts_with(&p)) => {
                Ok(Target::UserGlob(p))
            }
            Target::UserGlob(p) => Err(err(span, col, format!("no user name starts with `{p}`"))),
            Target::Gateway(g) if gateway_names.contains(&g) => Ok(Target::Gateway(g)),
            Target::Gateway(g) => Err(err(span, col, format!("unknown gateway `{g}`"))),
            other => Ok(other),
        }
    };
    let mut conversations = Vec::new();
    // Each conversation's home gateway and its members' gateways.
    let mut conversation_gateways: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut conversation_names = BTreeSet::new();
    for PendingConversation {
        name,
        kind,
        members,
        gateway,
        span,
    } in b.conversations
    {
        if !conversation_names.insert(name.clone()) {
            return Err(err(
                span,
                span.column,
                format!("conversation `{name}` is declared twice"),
            ));
        }
        let mut resolved = Vec::new();
        for (t, col) in members {
            let t = fix(t, span, col)?;
            if matches!(
                t,
                Target::Gateway(_)
                    | Target::AllGateways
                    | Target::RandomGateway
                    | Target::RandomDevice
            ) {
                return Err(err(
                    span,
                    col,
                    "conversation members are users or devices".into(),
                ));
            }
            if kind == Some(GroupKind::Own) {
                let user = match &t {
                    Target::User(u) | Target::Device(u, _) => Some(u.as_str()),
                    _ => None,
                };
                let first = resolved.first().and_then(|f: &Target| match f {
                    Target::User(u) | Target::Device(u, _) => Some(u.as_str()),
                    _ => None,
                });
                if user.is_none() || (first.is_some() && first != user) {
                    return Err(err(
                        span,
                        col,
                        "the group of a user's own devices (`kind own`) holds the devices of one user only".into(),
                    ));
                }
            }
            resolved.push(t);
        }
        let home = default_gateway(span, &gateway)?;
        // Members homed at other gateways: a plain conversation spans domains through
        // federation links; an MLS one does not yet.
        let homes: BTreeSet<&str> = resolved
            .iter()
            .flat_map(|t| {
                users.iter().filter(move |u| match t {
                    Target::User(n) | Target::Device(n, _) => u.name == *n,
                    Target::UserGlob(p) => u.name.starts_with(p.as_str()),
                    _ => true,
                })
            })
            .map(|u| u.gateway.as_str())
            .filter(|g| *g != home)
            .collect();
        let mut holders: BTreeSet<String> = homes.iter().map(|g| g.to_string()).collect();
        holders.insert(home.clone());
        conversation_gateways.insert(name.clone(), holders);
        for other in homes {
            let linked = federations
                .iter()
                .any(|(a, b)| (a == &home && b == other) || (a == other && b == &home));
            if !linked {
                return Err(err(
                    span,
                    span.column,
                    format!("conversation `{name}` is homed at `{home}` and has members at `{other}`: add `federate {home} {other}`"),
                ));
            }
        }
        conversations.push(ConversationDecl {
            gateway: home,
            name,
            kind,
            members: resolved,
            span,
        });
    }
    let check_conv = |name: &str, span: Span, col: usize| -> Result<(), ScenarioError> {
        if conversation_names.contains(name) {
            Ok(())
        } else {
            Err(err(span, col, format!("unknown conversation `{name}`")))
        }
    };
    let mut links = Vec::new();
    for (a, ca, c, cc, patch, span) in b.links {
        links.push((fix(a, span, ca)?, fix(c, span, cc)?, patch));
    }
    let disks = b
        .disks
        .into_iter()
        .map(|(t, c, d, span)| Ok((fix(t, span, c)?, d)))
        .collect::<Result<_, _>>()?;
    let skews = b
        .skews
        .into_iter()
        .map(|(t, c, s, span)| Ok((fix(t, span, c)?, s)))
        .collect::<Result<_, _>>()?;
    let mut workloads = Vec::new();
    for (mut w, conv, col, from_col) in b.workloads {
        check_conv(&conv, w.span, col)?;
        w.conversation = conv;
        w.from = fix(w.from, w.span, from_col)?;
        workloads.push(w);
    }
    let mut schedule = Vec::new();
    let file_names: BTreeSet<String> = b
        .schedule
        .iter()
        .filter_map(|p| match &p.scheduled.action {
            Action::SendFile { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect();
    for PendingAction {
        scheduled: mut s,
        targets,
        names,
    } in b.schedule
    {
        for (name, col) in &names {
            check_conv(name, s.span, *col)?;
        }
        let mut cols = targets.iter().map(|(_, c)| *c);
        let mut f = |t: &mut Target| -> Result<(), ScenarioError> {
            let col = cols.next().unwrap_or(s.span.column);
            *t = fix(t.clone(), s.span, col)?;
            Ok(())
        };
        match &mut s.action {
            Action::Partition(a, c)
            | Action::Heal(a, c)
            | Action::Hold(a, c)
            | Action::Release(a, c)
            | Action::Block(a, c)
            | Action::Unblock(a, c)
            | Action::Contact(a, c, _)
            | Action::Watch(a, c)
            | Action::Link(a, c, _) => {
                f(a)?;
                f(c)?;
            }
            Action::Isolate(a)
            | Action::Rejoin(a)
            | Action::Disconnect(a)
            | Action::Crash(a)
            | Action::Restart(a)
            | Action::StallDisk(a)
            | Action::ResumeDisk(a)
            | Action::FillDisk(a)
            | Action::FreeDisk(a)
            | Action::ClockJump(a, _)
            | Action::Drift(a, _)
            | Action::Invisible(a, _)
            | Action::Revoke(a) => f(a)?,
            Action::LieDisk(a) | Action::HonestDisk(a) => {
                f(a)?;
                if !matches!(
                    a,
                    Target::Gateway(_) | Target::AllGateways | Target::RandomGateway
                ) {
                    return Err(err(
                        s.span,
                        s.span.column,
                        format!(
                            "`{}` takes gateways: a device whose disk lies is not modelled yet",
                            s.action.keyword()
                        ),
                    ));
                }
            }
            Action::Drain(a) => {
                f(a)?;
                if !matches!(
                    a,
                    Target::Gateway(_) | Target::AllGateways | Target::RandomGateway
                ) {
                    return Err(err(
                        s.span,
                        s.span.column,
                        "`drain` takes gateways (a device is stopped with `crash`)".to_string(),
                    ));
                }
            }
            Action::Handover(conv, g) => {
                let mut t = Target::Gateway(g.clone());
                f(&mut t)?;
                let holds = conversation_gateways
                    .get(conv)
                    .is_some_and(|gateways| gateways.contains(g));
                if !holds {
                    return Err(err(
                        s.span,
                        s.span.column,
                        format!("`handover {conv} to {g}`: no member of `{conv}` is at `{g}`; hand it to a gateway that keeps a copy (its home or a member's gateway)"),
                    ));
                }
            }
            Action::Relay(from, to) => {
                let linked = federations
                    .iter()
                    .any(|(a, c)| (a == from && c == to) || (a == to && c == from));
                if !linked {
                    return Err(err(
                        s.span,
                        s.span.column,
                        format!("`relay {from} to {to}`: the two gateways are not linked; add `federate {from} {to}`"),
                    ));
                }
            }
            Action::Commit(_, who, kind) => {
                f(who)?;
                if let CommitKind::Admin(user) = kind {
                    // A user, never a gateway (they share one namespace).
                    let mut named = Target::User(user.clone());
                    f(&mut named)?;
                    if !matches!(named, Target::User(_)) {
                        let col = cols.next().unwrap_or(s.span.column);
                        return Err(err(
                            s.span,
                            col,
                            format!("`{user}` is a gateway; `admin` names a user"),
                        ));
                    }
                }
            }
            Action::SendFile { from, like, .. } => {
                if let Some(like) = like {
                    let known = file_names.contains(like);
                    if !known {
                        return Err(ScenarioError {
                            file: file.to_string(),
                            line: s.span.line,
                            column: s.span.column,
                            message: format!(
                                "`like {like}`: no `send-file ... name {like}` in this scenario"
                            ),
                        });
                    }
                }
                f(from)?
            }
            Action::HealAll | Action::Network(_) => {}
        }
        schedule.push(s);
    }
    let name = b.name.unwrap_or_else(|| {
        let stem = file.rsplit('/').next().unwrap_or(file);
        stem.strip_suffix(".sund").unwrap_or(stem).to_string()
    });
    let mut invariants = if b.invariants.is_empty() {
        [
            Invariant::NoLoss,
            Invariant::NoDuplicate,
            Invariant::Order,
            Invariant::Converge,
        ]
        .into_iter()
        .collect()
    } else {
        b.invariants
    };
    // A user's promise, not a protocol option: every scenario checks it.
    invariants.insert(Invariant::SenderOrder);
    invariants.insert(Invariant::NoPanic);
    Ok(Scenario {
        name,
        file: file.to_string(),
        seed: b.seed,
        duration,
        liveness: b.liveness,
        gateways: b.gateways.into_iter().map(|(g, _)| g).collect(),
        federations,
        users,
        conversations,
        network: b.network,
        links,
        disks,
        skews,
        tunables: b.tunables,
        workloads,
        schedule,
        invariants,
        planted: b.planted,
    })
}
