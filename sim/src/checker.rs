//! Safety invariants, checked as events happen, and the convergence test of the liveness phase.
//!
//! The checker sees only what applications see (deliveries, acceptances) and what a gateway
//! reports about its log after a restart; it never reads a state machine's private state.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};

use sund_model::ids::{ConversationId, DeviceId, MsgId};

use crate::network::ActorIndex;
use crate::scenario::Invariant;

/// The first broken invariant of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant.
    pub invariant: Invariant,
    /// Broken during the run (safety) or not reached after heal (liveness).
    pub phase: Phase,
    /// Virtual time, microseconds.
    pub at_us: u64,
    /// What exactly happened, with names.
    pub detail: String,
}

impl Violation {
    /// What kind of failure this is, so that a shrinker keeps the failure it was given and does
    /// not drift to another of the same invariant (a stuck outbox is not a slow drain). `names`
    /// are the scenario's users, gateways and conversations: which of them fails, and every
    /// number, may change while the kind stays.
    pub fn kind(&self, names: &BTreeSet<String>) -> FailureKind {
        FailureKind {
            invariant: self.invariant,
            phase: self.phase,
            shape: shape(&self.detail, names),
        }
    }
}

/// A failure's invariant, phase and the shape of its detail (see [`Violation::kind`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailureKind {
    /// The invariant.
    pub invariant: Invariant,
    /// The phase.
    pub phase: Phase,
    /// The detail with every word holding a digit written `#` and every declared name `@`.
    pub shape: String,
}

/// `detail` with its numbers and names abstracted: words (letters, digits, `_`, `-`, `.`)
/// holding a digit become `#`, declared names `@`; everything else stays.
fn shape(detail: &str, names: &BTreeSet<String>) -> String {
    let mut out = String::with_capacity(detail.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.is_empty() {
            return;
        }
        if word.bytes().any(|b| b.is_ascii_digit()) {
            out.push('#');
        } else if names.contains(word.as_str()) {
            out.push('@');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in detail.chars() {
        if c.is_alphanumeric() || matches!(c, '_' | '-' | '.') {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// Which phase of a run a violation belongs to (see SIMULATION.md, "Two phases").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A safety invariant broke during the run.
    Safety,
    /// The system did not converge within the liveness bound after heal.
    Liveness,
}

/// Counters of what applications saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckerStats {
    /// Messages acknowledged to their senders.
    pub accepted: u64,
    /// Messages delivered to applications (all devices).
    pub delivered: u64,
    /// Messages skipped because retention dropped them before a device came back.
    pub expired: u64,
    /// Group messages a member could not decrypt or apply.
    pub undecryptable: u64,
    /// Commits applied by members (each member's application counts once).
    pub commits_applied: u64,
    /// Devices that joined a group from a Welcome.
    pub joins: u64,
    /// Devices told a commit removed them.
    pub removals: u64,
    /// Group messages members skipped (decryption sampling); included in `delivered`.
    pub skipped: u64,
    /// Acknowledged messages a gateway lost with writes its disk had reported durable.
    pub lost_by_disk: u64,
    /// Seqs devices were told the gateway lost.
    pub told_lost: u64,
    /// Times a device was told its history diverged from the gateway's.
    pub told_diverged: u64,
}

/// Watches application-visible events for broken invariants.
#[derive(Debug)]
pub struct Checker {
    enabled: BTreeSet<Invariant>,
    /// True if the scenario sets a retention limit, so gaps reported by the gateway are policy.
    gaps_allowed: bool,
    /// Who owns each assigned seq, as first seen by anyone.
    owners: BTreeMap<(ConversationId, u64), (DeviceId, MsgId)>,
    /// Acknowledged messages and their seq.
    accepted: BTreeMap<(ConversationId, DeviceId, MsgId), u64>,
    /// Highest seq delivered per device and conversation.
    delivered_upto: BTreeMap<(ActorIndex, ConversationId), u64>,
    /// The seq of the Welcome each device last joined each group from.
    joined_at: BTreeMap<(ActorIndex, ConversationId), u64>,
    /// Removals of each device from each group, as members applied the commits.
    removals_seen: BTreeMap<(ConversationId, DeviceId), BTreeSet<u64>>,
    /// The seq each delivered message was seen at, to catch one message under two seqs. One
    /// entry per message, not per device and message: a per-device set held 360 million
    /// entries (about 20 GB) after the hour of the 1,000-member room.
    delivered_seqs: BTreeMap<(ConversationId, DeviceId, MsgId), u64>,
    /// Each application send, numbered in the order its device made it.
    sent: BTreeMap<(ConversationId, DeviceId, MsgId), u64>,
    /// Sends per device: how many so far.
    sends_made: BTreeMap<DeviceId, u64>,
    /// The seq each sequenced send got, by sender and conversation, in send order.
    sequenced: BTreeMap<(ConversationId, DeviceId), BTreeMap<u64, u64>>,
    /// Seqs a gateway gave out and then lost with writes its disk had reported durable
    /// (`lie-disk`, then a crash), per conversation: from its recovered head to its head at the
    /// crash. Applications may hear of those seqs late (a device whose disk stalled releases
    /// its events when it resumes) as the lost messages or as the ones given those seqs since,
    /// so there the first owner of a seq is not the only one; members may be told of a loss
    /// there (and only there).
    lost: BTreeMap<ConversationId, BTreeSet<u64>>,
    /// What each device read at each seq of a lost region: two devices that read different
    /// messages at one seq hold a fork, and one of them must have been told
    /// ([`Checker::silent_fork`]).
    lost_reads: BTreeMap<(ConversationId, u64), BTreeMap<ActorIndex, (DeviceId, MsgId)>>,
    /// Devices that read a seq the gateway then lost.
    read_lost: BTreeSet<(ActorIndex, ConversationId)>,
    /// Up to which seq each device was told its history diverged from the gateway's.
    told_diverged: BTreeMap<(ActorIndex, ConversationId), u64>,
    violation: Option<Violation>,
    stats: CheckerStats,
}

impl Checker {
    /// A checker for the scenario's invariants.
    pub fn new(enabled: BTreeSet<Invariant>, gaps_allowed: bool) -> Checker {
        Checker {
            enabled,
            gaps_allowed,
            owners: BTreeMap::new(),
            accepted: BTreeMap::new(),
            delivered_upto: BTreeMap::new(),
            joined_at: BTreeMap::new(),
            removals_seen: BTreeMap::new(),
            delivered_seqs: BTreeMap::new(),
            sent: BTreeMap::new(),
            sends_made: BTreeMap::new(),
            sequenced: BTreeMap::new(),
            lost: BTreeMap::new(),
            lost_reads: BTreeMap::new(),
            read_lost: BTreeSet::new(),
            told_diverged: BTreeMap::new(),
            violation: None,
            stats: CheckerStats::default(),
        }
    }

    /// The first violation, if any.
    pub fn violation(&self) -> Option<&Violation> {
        self.violation.as_ref()
    }

    /// Counters.
    pub fn stats(&self) -> &CheckerStats {
        &self.stats
    }

    /// Highest seq a device has delivered in a conversation.
    pub fn delivered_upto(&self, device: ActorIndex, conversation: ConversationId) -> u64 {
        self.delivered_upto
            .get(&(device, conversation))
            .copied()
            .unwrap_or(0)
    }

    /// Every acknowledged message's conversation and seq.
    pub fn accepted(&self) -> impl Iterator<Item = (ConversationId, u64)> + '_ {
        self.accepted.iter().map(|((c, _, _), s)| (*c, *s))
    }

    fn fail(&mut self, invariant: Invariant, at_us: u64, detail: String) {
        self.record(invariant, Phase::Safety, at_us, detail);
    }

    /// Keeps the first violation of an enabled invariant.
    fn record(&mut self, invariant: Invariant, phase: Phase, at_us: u64, detail: String) {
        if self.violation.is_none() && self.enabled.contains(&invariant) {
            self.violation = Some(Violation {
                invariant,
                phase,
                at_us,
                detail,
            });
        }
    }

    /// True if `seq` of `conv` is in a region a gateway lost.
    fn in_lost(&self, conv: ConversationId, seq: u64) -> bool {
        self.lost.get(&conv).is_some_and(|l| l.contains(&seq))
    }

    #[allow(clippy::too_many_arguments)]
    fn claim(
        &mut self,
        at_us: u64,
        conv: ConversationId,
        seq: u64,
        sender: DeviceId,
        msg_id: MsgId,
        who: &str,
        reader: Option<ActorIndex>,
    ) {
        if self.in_lost(conv, seq) {
            if let Some(device) = reader {
                self.lost_reads
                    .entry((conv, seq))
                    .or_default()
                    .insert(device, (sender, msg_id));
            }
            return;
        }
        match self.owners.entry((conv, seq)) {
            Entry::Occupied(owner) if *owner.get() != (sender, msg_id) => {
                let owner = *owner.get();
                self.fail(
                    Invariant::NoLoss,
                    at_us,
                    format!("{who}: seq {seq} of {conv} carries {msg_id} from {sender}, but it was first seen carrying {} from {}: an acknowledged message was overwritten", owner.1, owner.0),
                )
            }
            Entry::Occupied(_) => {}
            Entry::Vacant(vacant) => {
                vacant.insert((sender, msg_id));
                self.check_sender_order(at_us, conv, seq, sender, msg_id, who);
            }
        }
    }

    /// An application asked its device to send `msg_id` (and the device took it).
    pub fn on_sent(&mut self, conv: ConversationId, sender: DeviceId, msg_id: MsgId) {
        let made = self.sends_made.entry(sender).or_default();
        *made += 1;
        self.sent.insert((conv, sender, msg_id), *made);
    }

    /// A send got its seq: it must sit after every earlier send of its device to the
    /// conversation and before every later one.
    fn check_sender_order(
        &mut self,
        at_us: u64,
        conv: ConversationId,
        seq: u64,
        sender: DeviceId,
        msg_id: MsgId,
        who: &str,
    ) {
        let Some(&index) = self.sent.get(&(conv, sender, msg_id)) else {
            return; // not an application send (a commit, a re-sent Welcome...)
        };
        let order = self.sequenced.entry((conv, sender)).or_default();
        let before = order.range(..index).next_back().map(|(&i, &s)| (i, s));
        let after = order.range(index + 1..).next().map(|(&i, &s)| (i, s));
        order.insert(index, seq);
        let broken = match (before, after) {
            (Some((i, s)), _) if s > seq => Some((i, s, "before")),
            (_, Some((i, s))) if s < seq => Some((i, s, "after")),
            _ => None,
        };
        if let Some((other, other_seq, relation)) = broken {
            self.fail(
                Invariant::SenderOrder,
                at_us,
                format!("{who}: {msg_id}, send #{index} of {sender} to {conv}, got seq {seq}, but its send #{other}, made {relation} it, got seq {other_seq}: the device's messages were sequenced out of the order it sent them"),
            );
        }
    }

    /// The gateway acknowledged `msg_id` from `sender` at `seq`.
    pub fn on_accepted(
        &mut self,
        at_us: u64,
        who: &str,
        conv: ConversationId,
        sender: DeviceId,
        msg_id: MsgId,
        seq: u64,
    ) {
        self.stats.accepted += 1;
        if let Some(&earlier) = self.accepted.get(&(conv, sender, msg_id)) {
            if earlier != seq && !self.in_lost(conv, earlier) && !self.in_lost(conv, seq) {
                self.fail(
                    Invariant::NoDuplicate,
                    at_us,
                    format!("{who}: {msg_id} was acknowledged at seq {earlier} and again at seq {seq}: the gateway sequenced a retry twice"),
                );
            }
            return;
        }
        self.accepted.insert((conv, sender, msg_id), seq);
        self.claim(at_us, conv, seq, sender, msg_id, who, None);
    }

    /// A device's application received a message.
    #[allow(clippy::too_many_arguments)]
    pub fn on_delivered(
        &mut self,
        at_us: u64,
        device: ActorIndex,
        who: &str,
        conv: ConversationId,
        seq: u64,
        sender: DeviceId,
        msg_id: MsgId,
    ) {
        self.stats.delivered += 1;
        // One search of each map per delivery (this runs for every message at every member).
        let upto = {
            let slot = self.delivered_upto.entry((device, conv)).or_insert(0);
            let upto = *slot;
            *slot = seq.max(upto);
            upto
        };
        if seq <= upto {
            self.fail(
                Invariant::NoDuplicate,
                at_us,
                format!("{who}: seq {seq} of {conv} delivered again (already up to {upto})"),
            );
        } else if seq != upto + 1 {
            self.fail(
                Invariant::Order,
                at_us,
                format!(
                    "{who}: seq {seq} of {conv} delivered after {upto}: a gap in delivery order"
                ),
            );
        }
        let twice = match self.delivered_seqs.entry((conv, sender, msg_id)) {
            Entry::Vacant(vacant) => {
                vacant.insert(seq);
                None
            }
            Entry::Occupied(mut seen) => {
                let first = *seen.get();
                // A message the gateway lost after delivering it, retried by its sender, gets
                // another seq: the devices that read it before read it again.
                let lost = |s| self.lost.get(&conv).is_some_and(|l| l.contains(&s));
                if first == seq {
                    None
                } else if lost(first) || lost(seq) {
                    seen.insert(seq);
                    None
                } else {
                    Some(first)
                }
            }
        };
        if let Some(first) = twice {
            self.fail(
                Invariant::NoDuplicate,
                at_us,
                format!("{who}: {msg_id} from {sender} delivered as seq {seq} of {conv}, but it was delivered as seq {first} before: the gateway sequenced one message twice"),
            );
        }
        self.claim(at_us, conv, seq, sender, msg_id, who, Some(device));
    }

    /// A device that restarted delivers `seq` of `conv` again. A driver that keeps deliveries
    /// until its application takes them (`hold_until_taken`) delivers again, after a crash,
    /// whatever it had not yet durably marked taken: that is at-least-once to the application by
    /// design. The replay must start at a seq this device already had, and run on in order
    /// from there; `claim` still checks that every seq is the same message as before. Used by
    /// the driver layer (`sund-sim-drivers`), whose devices are real processes.
    pub fn on_replay_after_restart(&mut self, device: ActorIndex, conv: ConversationId, seq: u64) {
        let upto = self.delivered_upto(device, conv);
        if seq >= 1 && seq <= upto {
            self.delivered_upto.insert((device, conv), seq - 1);
        }
    }

    /// A device joined an MLS conversation from a Welcome: it reads the conversation from
    /// `seq + 1` on (what came before is not for it).
    pub fn on_joined(&mut self, device: ActorIndex, conv: ConversationId, seq: u64) {
        self.stats.joins += 1;
        self.joined_at.insert((device, conv), seq);
        let upto = self.delivered_upto(device, conv);
        self.delivered_upto.insert((device, conv), seq.max(upto));
    }

    /// A member applied a commit (it is also delivered, as its seq).
    pub fn on_commit_applied(&mut self) {
        self.stats.commits_applied += 1;
    }

    /// A member skipped a message it was not drawn to decrypt.
    pub fn on_skipped(&mut self) {
        self.stats.skipped += 1;
    }

    /// A member applied the commit at `seq` of `conv`, which removed these devices.
    pub fn on_group_changed(&mut self, conv: ConversationId, seq: u64, removed: &[DeviceId]) {
        for &device in removed {
            self.removals_seen
                .entry((conv, device))
                .or_default()
                .insert(seq);
        }
    }

    /// A device was told the commit at `seq` removed it from `conv`: every message sequenced
    /// while it was a member must have reached it first. Its membership ended at its first
    /// removal after the Welcome it joined from: a device removed, added again and removed
    /// again while away never joined from the Welcome in between, and the notice it gets
    /// names the last removal.
    pub fn on_removed(
        &mut self,
        at_us: u64,
        device: ActorIndex,
        device_id: DeviceId,
        who: &str,
        conv: ConversationId,
        seq: u64,
    ) {
        self.stats.removals += 1;
        let upto = self.delivered_upto(device, conv);
        let joined = self.joined_at.get(&(device, conv)).copied().unwrap_or(0);
        let seq = self
            .removals_seen
            .get(&(conv, device_id))
            .and_then(|r| r.range(joined + 1..).next().copied())
            .map_or(seq, |first| first.min(seq));
        if upto + 1 < seq {
            self.fail(
                Invariant::Decrypt,
                at_us,
                format!(
                    "{who}: removed from {conv} by the commit at seq {seq}, but only seqs up to {upto} reached it: {}..={} were sequenced while it was a member",
                    upto + 1,
                    seq - 1
                ),
            );
        }
        self.delivered_upto.insert((device, conv), seq.max(upto));
    }

    /// A device durably moved its cursor in `conv` to `cursor` in a batch whose events were
    /// just released: every seq up to it must have reached its application as an event.
    pub fn on_cursor_committed(
        &mut self,
        at_us: u64,
        device: ActorIndex,
        who: &str,
        conv: ConversationId,
        cursor: u64,
    ) {
        let upto = self.delivered_upto(device, conv);
        if cursor > upto {
            self.fail(
                Invariant::NoLoss,
                at_us,
                format!(
                    "{who}: its cursor in {conv} moved to {cursor}, but its application heard of seqs up to {upto} only: {}..={cursor} were consumed without an event",
                    upto + 1
                ),
            );
        }
    }

    /// A member could not decrypt or apply the message at `seq`.
    pub fn on_undecryptable(
        &mut self,
        at_us: u64,
        device: ActorIndex,
        who: &str,
        conv: ConversationId,
        seq: u64,
        reason: &str,
    ) {
        self.stats.undecryptable += 1;
        // The seq is consumed all the same: delivery goes on after it.
        let upto = self.delivered_upto(device, conv);
        self.delivered_upto.insert((device, conv), seq.max(upto));
        self.fail(
            Invariant::Decrypt,
            at_us,
            format!("{who}: seq {seq} of {conv} could not be decrypted or applied: {reason}"),
        );
    }

    /// A device was told that `from..=to` expired before it could fetch them.
    pub fn on_gap(
        &mut self,
        at_us: u64,
        device: ActorIndex,
        who: &str,
        conv: ConversationId,
        from: u64,
        to: u64,
    ) {
        let upto = self.delivered_upto(device, conv);
        if !self.gaps_allowed {
            self.fail(Invariant::NoLoss, at_us, format!("{who}: seqs {from}..={to} of {conv} expired undelivered, and the scenario sets no retention limit"));
        } else {
            self.skip_told(at_us, device, who, conv, from, to, "gap");
        }
        self.stats.expired += to.saturating_sub(from) + 1;
        self.delivered_upto.insert((device, conv), to.max(upto));
    }

    /// A device was told `from..=to` of `conv` are gone (a `kind`: gap or loss): the report
    /// must start right after what it has.
    #[allow(clippy::too_many_arguments)]
    fn skip_told(
        &mut self,
        at_us: u64,
        device: ActorIndex,
        who: &str,
        conv: ConversationId,
        from: u64,
        to: u64,
        kind: &str,
    ) {
        let upto = self.delivered_upto(device, conv);
        if from != upto + 1 || to < from {
            self.fail(
                Invariant::Order,
                at_us,
                format!("{who}: a {kind} {from}..={to} of {conv} reported after {upto}"),
            );
        }
    }

    /// A gateway restarted after its disk lost writes it had reported durable (`lie-disk`):
    /// what it had sequenced beyond each recovered head is gone. That is the fault, not a bug
    /// of the protocol; what the protocol must do about it is checked from here on: those seqs
    /// are never given to other messages ([`Checker::claim`]), members are told of the loss
    /// only there ([`Checker::on_history_lost`]), and a message retried by its sender may be
    /// sequenced again.
    pub fn on_gateway_lost_writes(
        &mut self,
        heads: &BTreeMap<ConversationId, u64>,
        crash_heads: &BTreeMap<ConversationId, u64>,
    ) {
        for (&conv, &head) in heads {
            // The region: every seq given out before the crash and not kept. What applications
            // saw sets its end where the crash's own record is short of it.
            let seen = self
                .owners
                .range((conv, head + 1)..=(conv, u64::MAX))
                .map(|((_, s), _)| *s)
                .chain(
                    self.accepted
                        .iter()
                        .filter(|((c, _, _), _)| *c == conv)
                        .map(|(_, &s)| s),
                )
                .max()
                .unwrap_or(0);
            let end = crash_heads.get(&conv).copied().unwrap_or(0).max(seen);
            if end <= head {
                continue;
            }
            self.lost.entry(conv).or_default().extend(head + 1..=end);
            // Who read what there: each device read the seqs up to its cursor as their owner.
            for (&(device, c), &upto) in &self.delivered_upto {
                if c != conv || upto <= head {
                    continue;
                }
                self.read_lost.insert((device, conv));
                for ((_, seq), owner) in self.owners.range((conv, head + 1)..=(conv, upto)) {
                    self.lost_reads
                        .entry((conv, *seq))
                        .or_default()
                        .insert(device, *owner);
                }
            }
            let gone: Vec<(ConversationId, u64)> = self
                .owners
                .range((conv, head + 1)..=(conv, u64::MAX))
                .map(|(&k, _)| k)
                .collect();
            for key in gone {
                self.owners.remove(&key);
            }
            let accepted: Vec<_> = self
                .accepted
                .iter()
                .filter(|((c, _, _), &s)| *c == conv && s > head)
                .map(|(&k, _)| k)
                .collect();
            for key in accepted {
                self.accepted.remove(&key);
                self.stats.lost_by_disk += 1;
            }
            self.delivered_seqs
                .retain(|(c, _, _), s| *c != conv || *s <= head);
            for ((c, _), order) in self.sequenced.iter_mut() {
                if *c == conv {
                    order.retain(|_, s| *s <= head);
                }
            }
        }
    }

    /// A device was told that `from..=to` of `conv` were lost by the gateway: only seqs the
    /// gateway really lost (or never gave out, after them) may be reported so, in order.
    pub fn on_history_lost(
        &mut self,
        at_us: u64,
        device: ActorIndex,
        who: &str,
        conv: ConversationId,
        from: u64,
        to: u64,
    ) {
        let upto = self.delivered_upto(device, conv);
        let lost = self.lost.get(&conv);
        let unlost = (from..=to)
            .find(|s| lost.is_none_or(|l| !l.contains(s)) && self.owners.contains_key(&(conv, *s)));
        if let Some(seq) = unlost {
            self.fail(
                Invariant::NoLoss,
                at_us,
                format!("{who}: told seqs {from}..={to} of {conv} were lost by the gateway, but seq {seq} was not lost: it was delivered elsewhere"),
            );
        } else if lost.is_none() {
            self.fail(
                Invariant::NoLoss,
                at_us,
                format!("{who}: told seqs {from}..={to} of {conv} were lost by the gateway, whose disk never lost a write"),
            );
        } else {
            self.skip_told(at_us, device, who, conv, from, to, "loss");
        }
        self.stats.told_lost += to.saturating_sub(from) + 1;
        self.delivered_upto.insert((device, conv), to.max(upto));
    }

    /// A device was told that what it read of `conv` up to `upto` is not what the gateway holds.
    pub fn on_history_diverged(
        &mut self,
        at_us: u64,
        device: ActorIndex,
        who: &str,
        conv: ConversationId,
        upto: u64,
    ) {
        if !self.read_lost.contains(&(device, conv)) && !self.lost.contains_key(&conv) {
            self.fail(
                Invariant::NoLoss,
                at_us,
                format!("{who}: told its history of {conv} up to seq {upto} diverged, but it never read a message the gateway lost"),
            );
        }
        self.stats.told_diverged += 1;
        let told = self.told_diverged.entry((device, conv)).or_default();
        *told = (*told).max(upto);
    }

    /// Two devices that read different messages at one seq of a lost region, neither of them
    /// told that its history diverged there: a silent fork. Checked when a run ends, since a
    /// device learns of it only when it next opens a session.
    pub fn silent_fork(&self, name: &dyn Fn(ActorIndex) -> String) -> Option<String> {
        for (&(conv, seq), reads) in &self.lost_reads {
            let untold: Vec<(ActorIndex, (DeviceId, MsgId))> = reads
                .iter()
                .filter(|(d, _)| {
                    self.told_diverged
                        .get(&(**d, conv))
                        .is_none_or(|&told| told < seq)
                })
                .map(|(&d, &m)| (d, m))
                .collect();
            if let Some((a, b)) = untold
                .iter()
                .zip(untold.iter().skip(1))
                .find(|(a, b)| a.1 != b.1)
            {
                return Some(format!(
                    "{} read {} from {} and {} read {} from {} at seq {seq} of {conv}, which the gateway had lost, and neither was told its history diverged (a silent fork)",
                    name(a.0),
                    a.1 .1,
                    a.1 .0,
                    name(b.0),
                    b.1 .1,
                    b.1 .0
                ));
            }
        }
        None
    }

    /// A gateway restarted and reports the heads of its conversations.
    pub fn on_gateway_recovered(
        &mut self,
        at_us: u64,
        who: &str,
        heads: &BTreeMap<ConversationId, u64>,
    ) {
        let lost: Option<(ConversationId, u64, u64)> = self
            .accepted
            .iter()
            .filter_map(|((c, _, _), &s)| heads.get(c).map(|&h| (*c, s, h)))
            .find(|&(_, s, h)| s > h);
        if let Some((conv, seq, head)) = lost {
            self.fail(
                Invariant::NoLoss,
                at_us,
                format!("{who} restarted with {conv} at head {head}, but seq {seq} had been acknowledged: an acknowledged message was lost"),
            );
        }
    }

    /// Records a safety failure the world found itself (outside application events).
    pub fn fail_safety(&mut self, invariant: Invariant, at_us: u64, detail: String) {
        self.fail(invariant, at_us, detail);
    }

    /// Records a liveness failure found by the world's convergence probe.
    pub fn fail_liveness(&mut self, at_us: u64, detail: String) {
        let invariant = if self.enabled.contains(&Invariant::Converge) {
            Invariant::Converge
        } else {
            Invariant::NoLoss
        };
        self.record(invariant, Phase::Liveness, at_us, detail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_keeps_its_kind_when_numbers_and_names_change_not_its_words() {
        let names: BTreeSet<String> = ["alice", "bob", "gw", "room"].map(String::from).into();
        let failing = |detail: &str| Violation {
            invariant: Invariant::Converge,
            phase: Phase::Liveness,
            at_us: 7,
            detail: detail.into(),
        };
        let stuck = failing("no events left and not converged: alice/2 still has 939 unacknowledged messages in its outbox").kind(&names);
        assert_eq!(
            stuck.shape,
            "no events left and not converged: @/# still has # unacknowledged messages in its outbox"
        );
        let smaller = failing("no events left and not converged: bob/1 still has 12 unacknowledged messages in its outbox");
        assert_eq!(
            smaller.kind(&names),
            stuck,
            "other device, other count: same kind"
        );
        let other = failing(
            "no events left and not converged: bob/1 has delivered conv:9f3a up to seq 3 of 40",
        );
        assert_ne!(other.kind(&names), stuck, "another reason is another kind");
        let safety = Violation {
            phase: Phase::Safety,
            ..smaller
        };
        assert_ne!(safety.kind(&names), stuck, "another phase is another kind");
    }

    fn checker() -> Checker {
        Checker::new(Invariant::ALL.iter().map(|(_, i)| *i).collect(), false)
    }

    const C: ConversationId = ConversationId(1);

    #[test]
    fn a_redelivered_seq_is_a_duplicate() {
        let mut c = checker();
        c.on_delivered(1, 0, "a/0", C, 1, DeviceId(5), MsgId(1));
        c.on_delivered(2, 0, "a/0", C, 1, DeviceId(5), MsgId(1));
        assert_eq!(c.violation().unwrap().invariant, Invariant::NoDuplicate);
    }

    #[test]
    fn a_restarted_device_may_replay_what_it_had_but_not_skip_or_change_it() {
        let deliver = |c: &mut Checker, seq: u64| {
            c.on_delivered(seq, 0, "a/0", C, seq, DeviceId(5), MsgId(seq.into()));
        };
        let mut c = checker();
        (1..=5).for_each(|seq| deliver(&mut c, seq));
        // After a restart the replay starts at 3 and runs on in order.
        c.on_replay_after_restart(0, C, 3);
        (3..=7).for_each(|seq| deliver(&mut c, seq));
        assert!(c.violation().is_none(), "{:?}", c.violation());
        // A replay that is not one (past what the device had) does not rewind anything.
        c.on_replay_after_restart(0, C, 9);
        deliver(&mut c, 9);
        assert_eq!(c.violation().unwrap().invariant, Invariant::Order);

        // A replayed seq must be the same message as before.
        let mut c = checker();
        (1..=3).for_each(|seq| deliver(&mut c, seq));
        c.on_replay_after_restart(0, C, 2);
        c.on_delivered(9, 0, "a/0", C, 2, DeviceId(5), MsgId(99));
        assert!(c.violation().is_some(), "seq 2 was another message");
    }

    #[test]
    fn one_message_under_two_seqs_is_a_duplicate_even_at_two_devices() {
        let mut c = checker();
        c.on_delivered(1, 0, "a/0", C, 1, DeviceId(5), MsgId(1));
        c.on_delivered(2, 0, "a/0", C, 2, DeviceId(5), MsgId(2));
        c.on_delivered(3, 1, "b/0", C, 1, DeviceId(5), MsgId(1));
        assert!(
            c.violation().is_none(),
            "the same seq at another device is fine"
        );
        c.on_delivered(4, 1, "b/0", C, 2, DeviceId(5), MsgId(1));
        assert_eq!(c.violation().unwrap().invariant, Invariant::NoDuplicate);
    }

    #[test]
    fn a_skipped_seq_breaks_order() {
        let mut c = checker();
        c.on_delivered(1, 0, "a/0", C, 2, DeviceId(5), MsgId(1));
        assert_eq!(c.violation().unwrap().invariant, Invariant::Order);
    }

    #[test]
    fn an_overwritten_seq_is_a_loss() {
        let mut c = checker();
        c.on_accepted(1, "a/0", C, DeviceId(5), MsgId(1), 1);
        c.on_delivered(2, 3, "b/0", C, 1, DeviceId(6), MsgId(9));
        assert_eq!(c.violation().unwrap().invariant, Invariant::NoLoss);
    }

    /// Devices 0 and 1 read seqs 1..=3; the gateway's lying disk kept only seq 1.
    fn lost_two_and_three() -> Checker {
        let mut c = checker();
        for seq in 1..=3 {
            c.on_accepted(seq, "a/0", C, DeviceId(5), MsgId(seq.into()), seq);
            for d in 0..=1 {
                c.on_delivered(seq, d, "r", C, seq, DeviceId(5), MsgId(seq.into()));
            }
        }
        let heads = [(C, 1)].into_iter().collect();
        c.on_gateway_lost_writes(&heads, &[(C, 3)].into_iter().collect());
        c.on_gateway_recovered(10, "gw", &heads);
        c
    }

    fn name(a: ActorIndex) -> String {
        format!("d{a}")
    }

    #[test]
    fn a_loss_by_a_lying_disk_is_not_a_bug_but_a_seq_read_as_two_messages_untold_is() {
        let mut c = lost_two_and_three();
        assert!(
            c.violation().is_none(),
            "the disk lost them: {:?}",
            c.violation()
        );
        assert_eq!(c.stats().lost_by_disk, 2);
        // Device 2 never read 2..=3 and is told they are lost.
        c.on_history_lost(20, 2, "d2", C, 1, 3);
        assert_eq!(
            c.violation().unwrap().invariant,
            Invariant::NoLoss,
            "seq 1 was not lost"
        );
        let mut c = lost_two_and_three();
        c.on_delivered(20, 2, "d2", C, 1, DeviceId(5), MsgId(1));
        c.on_history_lost(21, 2, "d2", C, 3, 3);
        assert_eq!(
            c.violation().unwrap().invariant,
            Invariant::Order,
            "2 skipped"
        );
        let mut c = lost_two_and_three();
        c.on_delivered(20, 2, "d2", C, 1, DeviceId(5), MsgId(1));
        c.on_history_lost(20, 2, "d2", C, 2, 3);
        assert!(c.violation().is_none(), "{:?}", c.violation());
        assert!(
            c.silent_fork(&name).is_none(),
            "nobody read another message"
        );
        // Seq 2 goes to another message, which device 2 reads: device 0 and 1 hold a fork.
        c.on_delivered(30, 2, "d2", C, 4, DeviceId(6), MsgId(9));
        c.on_delivered(31, 3, "d3", C, 1, DeviceId(5), MsgId(1));
        c.on_delivered(32, 3, "d3", C, 2, DeviceId(6), MsgId(8));
        let fork = c.silent_fork(&name).expect("a silent fork");
        assert!(fork.contains("seq 2"), "{fork}");
        // Told, devices 0 and 1 hold it knowingly.
        c.on_history_diverged(40, 0, "d0", C, 3);
        assert!(c.silent_fork(&name).is_some(), "device 1 is not told yet");
        c.on_history_diverged(41, 1, "d1", C, 2);
        assert!(c.silent_fork(&name).is_none(), "{:?}", c.silent_fork(&name));
        assert!(c.violation().is_none(), "{:?}", c.violation());
    }

    #[test]
    fn a_loss_or_divergence_reported_where_the_disk_lost_nothing_is_a_bug() {
        let mut c = checker();
        c.on_delivered(1, 0, "d0", C, 1, DeviceId(5), MsgId(1));
        c.on_history_lost(2, 1, "d1", C, 1, 1);
        assert_eq!(c.violation().unwrap().invariant, Invariant::NoLoss);
        let mut c = checker();
        c.on_history_diverged(2, 0, "d0", C, 1);
        assert_eq!(c.violation().unwrap().invariant, Invariant::NoLoss);
    }

    #[test]
    fn a_gateway_that_forgot_an_acknowledged_seq_lost_it() {
        let mut c = checker();
        c.on_accepted(1, "a/0", C, DeviceId(5), MsgId(1), 1);
        c.on_gateway_recovered(2, "gw", &[(C, 0)].into_iter().collect());
        assert_eq!(c.violation().unwrap().invariant, Invariant::NoLoss);
    }

    #[test]
    fn sends_sequenced_out_of_the_order_they_were_made_break_sender_order() {
        let mut c = checker();
        let (me, other) = (DeviceId(5), DeviceId(6));
        for id in 1..=3 {
            c.on_sent(C, me, MsgId(id));
        }
        c.on_sent(C, other, MsgId(9));
        c.on_accepted(1, "a/0", C, me, MsgId(1), 1);
        c.on_accepted(2, "b/0", C, other, MsgId(9), 2);
        c.on_accepted(3, "a/0", C, me, MsgId(3), 3);
        assert!(
            c.violation().is_none(),
            "a gap for a send still in flight is fine"
        );
        c.on_accepted(4, "a/0", C, me, MsgId(2), 4);
        let v = c.violation().expect("send #2 after send #3");
        assert_eq!(v.invariant, Invariant::SenderOrder);
        assert!(v.detail.contains("send #2"), "{}", v.detail);
    }

    #[test]
    fn a_removal_before_everything_sequenced_while_a_member_arrived_is_a_decrypt_failure() {
        let mut c = checker();
        c.on_delivered(1, 0, "a/0", C, 1, DeviceId(5), MsgId(1));
        c.on_removed(2, 0, DeviceId(7), "a/0", C, 2);
        assert!(c.violation().is_none(), "everything before seq 2 arrived");
        let mut c = checker();
        c.on_delivered(1, 0, "a/0", C, 1, DeviceId(5), MsgId(1));
        c.on_removed(2, 0, DeviceId(7), "a/0", C, 4);
        let v = c.violation().expect("seqs 2 and 3 never arrived");
        assert_eq!(v.invariant, Invariant::Decrypt);
        assert!(v.detail.contains("2..=3"), "{}", v.detail);
    }

    /// Found by the swarm (seed 1716): removed at seq 2, added again at 3 and removed at 4
    /// while away, a device never joined from the Welcome in between; its membership ended at
    /// seq 2, whatever seq its notice names.
    #[test]
    fn a_device_removed_twice_while_away_needs_only_what_came_before_its_first_removal() {
        let me = DeviceId(7);
        let mut c = checker();
        c.on_delivered(1, 0, "a/0", C, 1, DeviceId(5), MsgId(1));
        c.on_group_changed(C, 2, &[me]);
        c.on_group_changed(C, 4, &[me]);
        c.on_removed(5, 0, me, "a/0", C, 4);
        assert!(c.violation().is_none(), "{:?}", c.violation());
        // Without the first removal on record, seqs 2 and 3 would be owed.
        let mut c = checker();
        c.on_delivered(1, 0, "a/0", C, 1, DeviceId(5), MsgId(1));
        c.on_group_changed(C, 4, &[me]);
        c.on_removed(5, 0, me, "a/0", C, 4);
        assert!(c.violation().is_some());
    }

    #[test]
    fn a_cursor_past_what_the_application_heard_is_a_loss() {
        let mut c = checker();
        c.on_delivered(1, 0, "a/0", C, 1, DeviceId(5), MsgId(1));
        c.on_cursor_committed(2, 0, "a/0", C, 1);
        assert!(c.violation().is_none());
        c.on_cursor_committed(3, 0, "a/0", C, 2);
        let v = c.violation().expect("seq 2 consumed without an event");
        assert_eq!(v.invariant, Invariant::NoLoss);
    }

    #[test]
    fn disabled_invariants_are_not_reported() {
        let mut c = Checker::new([Invariant::NoLoss].into_iter().collect(), false);
        c.on_delivered(1, 0, "a/0", C, 2, DeviceId(5), MsgId(1));
        assert!(c.violation().is_none());
    }
}
