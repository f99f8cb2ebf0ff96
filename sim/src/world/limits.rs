//! The `rate-limits` invariant: the gateway's per-device send limit bounds what a flooding
//! device gets sequenced, and leaves devices that send at an ordinary pace alone.
//!
//! Checked from outside the gateway, on what it releases:
//! - **Bounded.** A device's newly sequenced messages (the first acknowledgement the gateway
//!   releases for each conversation and seq of that device; retries answered from the
//!   deduplication record do not count) number at most `burst + rate × 2 s` in any one-second
//!   window: the limit admits at most `burst + rate × 1 s` in a second, and an admitted
//!   message's acknowledgement leaves when its commit is durable, up to a second later (the
//!   slack). A gateway's buckets live in memory, so its restart starts the windows afresh.
//! - **Unharmed** (`ordinary-unthrottled`, a separate invariant). A device whose `send` lines
//!   make at most half the limit's rate is never throttled (its node never reports
//!   `Throttled`). A device that comes back from an outage with more than a burst waiting may
//!   rightly be throttled, so only scenarios with short outages check this; swarms do not.
//!
//! - **Invitations.** The users a user's commits bring into conversations they were not in
//!   (the committer's own user never counts) number at most `burst + span / interval` over any
//!   span since the gateway started, measured on the gateway's clock when it admits each commit:
//!   the world compares the conversation's member users before and after the gateway reads the
//!   commit, without asking the gateway's limits what they charged.
//!
//! Every throttle is counted in the report's fault counts (`throttled`), so a scenario that
//! floods shows that the limit acted.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use sund_model::gateway::limits::Rate;
use sund_model::ids::{ConversationId, UserId};
use sund_model::wire::{Frame, Opcode, PAYLOAD_BYTES_MAX};

use super::{Machine, World};
use crate::network::ActorIndex;
use crate::scenario::Invariant;

/// Window of the bound, microseconds.
const WINDOW_US: u64 = 1_000_000;
/// Longest an admitted message's acknowledgement may trail its admission, microseconds.
const SLACK_US: u64 = 1_000_000;

/// One device's newly sequenced messages.
#[derive(Debug, Default)]
struct Sequenced {
    seen: BTreeSet<(ConversationId, u64)>,
    /// When each of the last window's first acknowledgements left the gateway.
    recent: VecDeque<u64>,
}

/// What the world watches for `rate-limits`.
#[derive(Debug, Default)]
pub(super) struct LimitWatch {
    rate: Option<Rate>,
    /// The gateways' limit on registrations per source address.
    registration_rate: Option<Rate>,
    /// Per address: when each device that connects from it registered, since the gateway
    /// last started.
    registrations: BTreeMap<core::net::Ipv4Addr, Vec<u64>>,
    /// Per device: the sends per 1,000 s its `send` lines make.
    planned_per_ks: BTreeMap<ActorIndex, u64>,
    sequenced: BTreeMap<ActorIndex, Sequenced>,
    /// The gateways' limit on invitations per user.
    invitation_rate: Option<Rate>,
    /// Per gateway and inviting user (each gateway charges whoever commits in the
    /// conversations it sequences, its own users or, relayed, other domains'): the gateway's
    /// clock (µs) at each invitation it admitted, since a gateway last started (one entry per
    /// invited user).
    invitations: BTreeMap<(ActorIndex, UserId), Vec<u64>>,
    /// Per gateway and conversation: the epoch and member users last seen there.
    rosters: BTreeMap<(ActorIndex, ConversationId), (u64, BTreeSet<UserId>)>,
}

/// A `Send` about to reach a gateway, as the invitation check needs it.
pub(super) struct PendingCommit {
    conv: ConversationId,
    inviter: UserId,
    /// The conversation's epoch before (`None`: not created yet).
    epoch: Option<u64>,
}

impl LimitWatch {
    /// Watches under the scenario's send limit and registration limit (`None`: off, nothing
    /// to bound).
    pub(super) fn new(rate: Option<Rate>, registration_rate: Option<Rate>) -> LimitWatch {
        LimitWatch {
            rate,
            registration_rate,
            ..LimitWatch::default()
        }
    }

    /// Also bounds invitations per user by `rate` (`None`: off).
    pub(super) fn with_invitations(mut self, rate: Option<Rate>) -> LimitWatch {
        self.invitation_rate = rate;
        self
    }

    /// `inviter` brought `count` users into a conversation at `now` on the gateway's clock: an
    /// error in words if more were admitted than the limit allows. For every earlier
    /// invitation since the gateway started, the ones from it to now number at most
    /// `burst + span / interval`, the interval being the limit's (its period over its count,
    /// in whole microseconds).
    pub(super) fn invited(
        &mut self,
        now: u64,
        gateway: ActorIndex,
        inviter: UserId,
        count: usize,
    ) -> Option<String> {
        let rate = self.invitation_rate?;
        if count == 0 {
            return None;
        }
        let times = self.invitations.entry((gateway, inviter)).or_default();
        times.extend(std::iter::repeat_n(now, count));
        let period_us = u64::try_from(rate.period.as_micros()).unwrap_or(u64::MAX);
        let interval_us = (period_us / u64::from(rate.count.max(1))).max(1);
        let n = times.len();
        times.iter().enumerate().find_map(|(i, &since)| {
            let span = now.saturating_sub(since);
            let admitted = (n - i) as u64;
            let bound = u64::from(rate.burst.max(1)) + span / interval_us;
            (admitted > bound).then(|| {
                format!(
                    "{inviter} invited {admitted} users within {:.1} s, more than the limit allows ({bound}: a burst of {} and {} per {:?})",
                    span as f64 / 1e6,
                    rate.burst,
                    rate.count,
                    rate.period
                )
            })
        })
    }

    /// A device connecting from `address` was told it is registered at `now`: an error in
    /// words if more registered from that address than the limit admits. For every earlier
    /// registration since the gateway started, the ones from it to now number at most
    /// `burst + rate × (span + slack)`: the bucket admits no more in any span, and a
    /// registration reaches its device after the gateway's commit and the network (the slack).
    pub(super) fn registered(&mut self, now: u64, address: core::net::Ipv4Addr) -> Option<String> {
        let rate = self.registration_rate?;
        let times = self.registrations.entry(address).or_default();
        times.push(now);
        let period_us = u64::try_from(rate.period.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let n = times.len();
        times.iter().enumerate().find_map(|(i, &since)| {
            let span = now - since + REGISTRATION_SLACK_US;
            let count = (n - i) as u64;
            let bound = u64::from(rate.burst) + u64::from(rate.count) * span / period_us;
            (count > bound).then(|| {
                format!(
                    "{count} devices from {address} registered within {:.1} s, more than the limit allows ({bound}: a burst of {} and {} per {:?}, with {} s of slack)",
                    (now - since) as f64 / 1e6,
                    rate.burst,
                    rate.count,
                    rate.period,
                    REGISTRATION_SLACK_US / 1_000_000
                )
            })
        })
    }

    /// `device` sends once per `period_us` (one of its `send` lines).
    pub(super) fn plan(&mut self, device: ActorIndex, period_us: u64) {
        let per_ks = 1_000_000_000 / period_us.max(1);
        *self.planned_per_ks.entry(device).or_default() += per_ks;
    }

    /// Whether `device` sends at most half the limit's rate (and so must never be throttled).
    pub(super) fn ordinary(&self, device: ActorIndex) -> bool {
        let Some(rate) = self.rate else {
            return true; // no limit: nobody is throttled
        };
        let limit_per_ks = u64::from(rate.count) * 1000 / rate.period.as_secs().max(1);
        self.planned_per_ks.get(&device).copied().unwrap_or(0) * 2 <= limit_per_ks
    }

    /// The gateway released an acknowledgement of `device`'s message at `seq` of `conv` at
    /// `now`: an error in words if it breaks the bound.
    pub(super) fn acknowledged(
        &mut self,
        now: u64,
        device: ActorIndex,
        conv: ConversationId,
        seq: u64,
    ) -> Option<String> {
        let rate = self.rate?;
        let entry = self.sequenced.entry(device).or_default();
        if !entry.seen.insert((conv, seq)) {
            return None; // a retry answered from the deduplication record
        }
        entry.recent.push_back(now);
        while entry.recent.front().is_some_and(|&t| t + WINDOW_US <= now) {
            entry.recent.pop_front();
        }
        let period_us = u64::try_from(rate.period.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let bound =
            u64::from(rate.burst) + u64::from(rate.count) * (WINDOW_US + SLACK_US) / period_us;
        let count = entry.recent.len() as u64;
        (count > bound).then(|| {
            format!(
                "{count} messages of one device sequenced within 1 s, more than the limit allows ({bound}: a burst of {} and {} per {:?}, with 1 s of slack)",
                rate.burst, rate.count, rate.period
            )
        })
    }

    /// A gateway (re)started with every bucket full.
    pub(super) fn gateway_started(&mut self) {
        for entry in self.sequenced.values_mut() {
            entry.recent.clear();
        }
        self.registrations.clear();
        self.invitations.clear();
        self.rosters.clear();
    }
}

/// Longest a registration's answer may trail its admission (the gateway's commit, then the
/// network), microseconds.
const REGISTRATION_SLACK_US: u64 = 2_000_000;

impl World {
    /// The address `node` connects from: its user's `address`, or one of its own (10.x.y.z
    /// from its index), so that per-address limits only meet devices a scenario puts together.
    pub(super) fn address_of(&self, node: ActorIndex) -> core::net::Ipv4Addr {
        if let Some(address) = self.shared_addresses.get(&node) {
            return *address;
        }
        let [_, b, c, d] = node.to_be_bytes();
        core::net::Ipv4Addr::new(10, b, c, d)
    }
}

impl World {
    /// A frame `gateway` releases on `conn`: an acknowledgement counts towards its device's
    /// bound (with `rate-limits` only).
    pub(super) fn check_rate_limit(&mut self, gateway: ActorIndex, conn: u64, frame: &[u8]) {
        if !self.scenario.invariants.contains(&Invariant::Limits) || frame.len() < 8 {
            return;
        }
        if u16::from_be_bytes([frame[6], frame[7]]) != Opcode::SendAck.to_u16() {
            return;
        }
        let Some(device) = self.network.peer_of(conn, gateway) else {
            return;
        };
        let Ok(ack) = Frame::decode(frame, PAYLOAD_BYTES_MAX) else {
            return;
        };
        let (conv, seq) = (ack.routing.conversation, ack.routing.seq);
        if let Some(detail) = self.limit_watch.acknowledged(self.now, device, conv, seq) {
            let name = &self.actors[device as usize].name;
            let detail = format!("{name}: {detail}");
            self.checker
                .fail_safety(Invariant::Limits, self.now, detail);
        }
    }
}

impl World {
    /// A frame about to reach `gateway` on `conn`: a `Send` is remembered (with the
    /// conversation's epoch and, if the world has not seen that epoch's members yet, its member
    /// users) for [`World::check_invitations`]. Only with `rate-limits` and an invitation limit.
    pub(super) fn commit_arriving(
        &mut self,
        gateway: ActorIndex,
        conn: u64,
        frame: &[u8],
    ) -> Option<PendingCommit> {
        if self.limit_watch.invitation_rate.is_none()
            || !self.scenario.invariants.contains(&Invariant::Limits)
            || frame.len() < 8
            || u16::from_be_bytes([frame[6], frame[7]]) != Opcode::Send.to_u16()
        {
            return None;
        }
        let device = self.network.peer_of(conn, gateway)?;
        let conv = Frame::decode(frame, PAYLOAD_BYTES_MAX)
            .ok()?
            .routing
            .conversation;
        self.pending_commit(gateway, conv, device)
    }

    /// Commits of other domains' devices in a federation frame about to reach `gateway`
    /// (relays, each entry on its own or in a bundle), remembered as a device's `Send` is
    /// by [`World::commit_arriving`]: the gateway charges their users too. Only with
    /// `rate-limits` and an invitation limit.
    pub(super) fn relayed_commits_arriving(
        &mut self,
        gateway: ActorIndex,
        frame: &[u8],
    ) -> Vec<PendingCommit> {
        use sund_model::federation::entry::Entry;
        use sund_model::mls::commit_authority::{read_message, Kind};
        use sund_model::wire::Payload;
        if self.limit_watch.invitation_rate.is_none()
            || !self.scenario.invariants.contains(&Invariant::Limits)
        {
            return Vec::new();
        }
        let Ok(Frame {
            payload: Payload::FederationForward(forward),
            ..
        }) = Frame::decode(frame, PAYLOAD_BYTES_MAX)
        else {
            return Vec::new();
        };
        let Ok(entry) = Entry::decode(&forward.body) else {
            return Vec::new();
        };
        let mut pending = Vec::new();
        for entry in entry.into_entries() {
            let Entry::Relay {
                conversation,
                sender,
                body,
                ..
            } = entry
            else {
                continue;
            };
            if !read_message(&body).is_ok_and(|(framing, _)| framing.kind == Kind::Commit) {
                continue;
            }
            let device = self
                .actors
                .iter()
                .position(|a| a.device == sender && matches!(a.machine, Machine::Node(..)));
            let Some(device) = device.and_then(|d| ActorIndex::try_from(d).ok()) else {
                continue;
            };
            pending.extend(self.pending_commit(gateway, conversation, device));
        }
        pending
    }

    /// A commit of `device` in `conv` about to reach `gateway`: the conversation's epoch
    /// there, and its member users if the world has not seen that epoch's yet.
    fn pending_commit(
        &mut self,
        gateway: ActorIndex,
        conv: ConversationId,
        device: ActorIndex,
    ) -> Option<PendingCommit> {
        let Machine::Gateway(Some(g), _) = &self.actors[gateway as usize].machine else {
            return None;
        };
        let group = g.group(conv);
        let epoch = group.map(|g| g.epoch());
        if let Some(group) = group {
            let seen = self.limit_watch.rosters.get(&(gateway, conv));
            if seen.is_none_or(|(e, _)| *e != group.epoch()) {
                self.limit_watch
                    .rosters
                    .insert((gateway, conv), (group.epoch(), group.users()));
            }
        }
        let name = &self.actors[device as usize].name;
        let user = name.split('/').next().unwrap_or(name);
        Some(PendingCommit {
            conv,
            inviter: super::federation::user_id(&self.scenario, user),
            epoch,
        })
    }

    /// After `gateway` read the frame of `pending`: if it admitted a commit (the epoch moved,
    /// or the conversation now exists), the member users it brought in count as invitations of
    /// the committer's user.
    pub(super) fn check_invitations(&mut self, gateway: ActorIndex, pending: PendingCommit) {
        let Machine::Gateway(Some(g), _) = &self.actors[gateway as usize].machine else {
            return;
        };
        let Some(group) = g.group(pending.conv) else {
            return;
        };
        if pending.epoch == Some(group.epoch()) {
            return;
        }
        let after = group.users();
        let before = match pending.epoch {
            Some(_) => self
                .limit_watch
                .rosters
                .get(&(gateway, pending.conv))
                .map(|(_, users)| users.clone())
                .unwrap_or_default(),
            None => BTreeSet::new(),
        };
        let invited = after
            .iter()
            .filter(|u| **u != pending.inviter && !before.contains(u))
            .count();
        self.limit_watch
            .rosters
            .insert((gateway, pending.conv), (group.epoch(), after));
        let now = self.local_now(gateway).0;
        if let Some(detail) = self
            .limit_watch
            .invited(now, gateway, pending.inviter, invited)
        {
            self.checker
                .fail_safety(Invariant::Limits, self.now, detail);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_past_the_bound_is_reported_and_retries_are_not_counted() {
        let mut watch = LimitWatch::new(Some(Rate::per_second(10, 5)), None);
        let conv = ConversationId::from_bytes([1; 16]);
        // Bound: 5 + 10 × 2 = 25 within a second.
        for seq in 1..=25 {
            assert_eq!(watch.acknowledged(seq * 10, 0, conv, seq), None);
        }
        assert_eq!(watch.acknowledged(300, 0, conv, 3), None, "a retry");
        assert!(watch.acknowledged(300, 0, conv, 26).is_some());
        watch.gateway_started();
        assert_eq!(watch.acknowledged(400, 0, conv, 27), None);
        assert_eq!(
            watch.acknowledged(2_000_000, 1, conv, 1),
            None,
            "another device has its own window"
        );
    }

    #[test]
    fn registrations_from_one_address_past_the_limit_are_reported() {
        // A burst of 3, then one a minute.
        let mut watch = LimitWatch::new(None, Some(Rate::per_hour(60, 3)));
        let home = core::net::Ipv4Addr::new(203, 0, 113, 7);
        for t in [0, 10, 20] {
            assert_eq!(watch.registered(t, home), None);
        }
        assert!(
            watch.registered(1_000_000, home).is_some(),
            "a fourth within a second"
        );
        let mut watch = LimitWatch::new(None, Some(Rate::per_hour(60, 3)));
        for t in [0, 10, 20, 60_000_000, 120_000_000] {
            assert_eq!(watch.registered(t, home), None, "at {t}");
        }
        assert_eq!(
            watch.registered(1_000, core::net::Ipv4Addr::new(10, 0, 0, 1)),
            None,
            "another address has its own bucket"
        );
        watch.gateway_started();
        for t in [130_000_000, 130_000_001, 130_000_002] {
            assert_eq!(
                watch.registered(t, home),
                None,
                "a restarted gateway's bucket is full"
            );
        }
    }

    #[test]
    fn invitations_past_the_burst_and_rate_are_reported_per_user() {
        // A burst of 3, then one every 10 s.
        let mut watch = LimitWatch::new(None, None).with_invitations(Some(Rate::per_hour(360, 3)));
        let alice = UserId::of("alice", "localhost");
        let bob = UserId::of("bob", "localhost");
        assert_eq!(watch.invited(0, 0, alice, 3), None, "the creation's burst");
        assert_eq!(
            watch.invited(10_000_000, 0, alice, 1),
            None,
            "one interval later"
        );
        assert_eq!(
            watch.invited(20_000_000, 0, alice, 0),
            None,
            "a commit inviting nobody"
        );
        assert_eq!(
            watch.invited(20_000_000, 0, bob, 3),
            None,
            "bob has his own"
        );
        assert_eq!(
            watch.invited(20_000_000, 1, alice, 3),
            None,
            "another gateway charges alice's commits there on its own"
        );
        let report = watch
            .invited(20_000_001, 0, alice, 2)
            .expect("two at once, one due");
        assert!(report.contains("invited 6 users within 20.0 s"), "{report}");
        watch.gateway_started();
        assert_eq!(
            watch.invited(20_000_002, 0, alice, 3),
            None,
            "a restart refills"
        );
        let mut off = LimitWatch::new(None, None);
        assert_eq!(
            off.invited(0, 0, alice, 1_000),
            None,
            "no limit, nothing to bound"
        );
    }

    #[test]
    fn ordinary_devices_send_at_most_half_the_limit() {
        let mut watch = LimitWatch::new(Some(Rate::per_second(20, 40)), None);
        watch.plan(1, 100_000); // 10/s
        watch.plan(2, 100_000);
        watch.plan(2, 1_000); // and 1,000/s
        assert!(watch.ordinary(1));
        assert!(!watch.ordinary(2));
        assert!(watch.ordinary(3), "sends nothing");
        assert!(LimitWatch::new(None, None).ordinary(2));
    }
}
