//! Presence across domains: a session here watching a user of another domain, and a peer's
//! sessions watching users of this one.
//!
//! The target's gateway decides what a watcher may be told: it holds the target's adds,
//! blocks and invisibility, and the mirror of the watcher's add ([`super::social`], "Across
//! domains"). So the watcher's gateway does not cache presence; it subscribes:
//!
//! - When the first session here watching a user of another domain starts for one of this
//!   gateway's users, that domain's gateway is told ([`Entry::PresenceWatch`] on), and told
//!   again (off) when the last such session stops. One watch per (watcher, target), however
//!   many of the watcher's devices watch.
//! - The target's gateway answers each watch with the state the watcher may see, and sends it
//!   again at each change ([`Entry::PresenceState`]): the target going online or offline, a
//!   bucket ageing, a contact change, a block, invisibility. A user the watcher may not see is
//!   [`Seen::Unknown`], as at home.
//! - The watcher's gateway keeps the last state told per watch and tells its sessions as at
//!   home, where its own rule agrees too (the watcher's add and block are its to decide, so a
//!   remove here hides the target at once, before the peer hears of it). Until the first
//!   answer the state is [`Seen::Asking`], so that a device can wait a moment for it rather
//!   than show `unknown` for a contact who is online.
//!
//! Watches live in memory at both ends, like watchlists. A link that goes down ends them: the
//! watcher's gateway forgets the states it was told (its sessions hear `unknown`, since
//! nothing can be known across a cut link), and the target's gateway forgets the peer's
//! watches. When the link comes up again the watcher's gateway sends
//! [`Entry::PresenceReset`] (if it ever asked that peer for a watch since it started), then a
//! watch for each it holds, and hears every state afresh. Nothing is sent for a peer whose
//! link is down: what would be said is said again when it comes up. So a restart of either
//! side, a connection replaced without a cut seen at one end, or entries queued before a cut,
//! leave nothing stale behind.
//!
//! A peer speaks only for its own users, about this domain's: a watch for a user who has
//! devices here or is known at another domain, of a user known to be of another domain, or
//! past [`HELD_WATCHES_PER_PEER_MAX`] for the peer, is dropped and counted; so is a state for
//! a watch this gateway did not make with that peer (a late one after the watch ended, or a
//! lie).

use std::collections::{BTreeMap, BTreeSet};

use super::Gateway;
use crate::federation::entry::Entry;
use crate::ids::UserId;
use crate::time::Instant;
use crate::wire::payload::Seen;

/// The most watches one peer's users may hold of this gateway's users: a bound on what a
/// hostile peer can make it keep in memory (each is a few dozen bytes).
pub const HELD_WATCHES_PER_PEER_MAX: usize = 200_000;

/// Counters for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PresenceAbroadStats {
    /// Watches of other domains' users asked of their gateways (on and off).
    pub watches_sent: u64,
    /// States of this gateway's users told to peers' watchers.
    pub states_sent: u64,
    /// Peers' watches taken.
    pub watches_taken: u64,
    /// States told by peers, taken.
    pub states_taken: u64,
    /// Told by peers and dropped (see the module docs).
    pub dropped: u64,
}

/// Both directions' watches (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct PresenceAbroad {
    /// This gateway's users watched by peers' users: target → (peer, watcher) → the state
    /// last told.
    held: BTreeMap<UserId, BTreeMap<(String, UserId), Seen>>,
    /// How many of `held` each peer made.
    held_per_peer: BTreeMap<String, usize>,
    /// Other domains' users watched by this gateway's: (target, watcher) → the target's
    /// domain and the state its gateway last told.
    asked: BTreeMap<(UserId, UserId), (String, Seen)>,
    /// Entries for peers, in the order made; the gateway sends them at the end of the batch
    /// to peers whose link is up.
    outgoing: Vec<(String, Entry)>,
    /// Peers whose link is up.
    up: BTreeSet<String>,
    /// Peers asked for a watch since this gateway started: only they can hold watches of
    /// its that a reset must end (a restart cuts the links, and a peer forgets a cut link's
    /// watches), so a link to any other comes up without a word.
    watched_at: BTreeSet<String>,
    stats: PresenceAbroadStats,
}

impl PresenceAbroad {
    /// The counters.
    pub fn stats(&self) -> &PresenceAbroadStats {
        &self.stats
    }

    /// Watches held for peers, and watches asked of them.
    pub fn watches(&self) -> (usize, usize) {
        (self.held_per_peer.values().sum(), self.asked.len())
    }

    /// What the target's gateway last told of `target` for `watcher` (unknown if nothing).
    pub(super) fn told(&self, watcher: UserId, target: UserId) -> Seen {
        self.asked
            .get(&(target, watcher))
            .map_or(Seen::Unknown, |(_, seen)| *seen)
    }

    /// Makes the watches asked of `target`'s domain (`domain`: `None` for a user of this
    /// one) those of `watchers`, the users with a session watching `target`.
    pub(super) fn sync(
        &mut self,
        target: UserId,
        domain: Option<&str>,
        watchers: &BTreeSet<UserId>,
    ) {
        let range = (target, UserId::from_bytes([0; 16]))..=(target, UserId::from_bytes([!0; 16]));
        let ended: Vec<(UserId, String)> = self
            .asked
            .range(range)
            .filter(|((_, w), (d, _))| Some(d.as_str()) != domain || !watchers.contains(w))
            .map(|((_, w), (d, _))| (*w, d.clone()))
            .collect();
        for (watcher, at) in ended {
            self.asked.remove(&(target, watcher));
            self.watch(at, watcher, target, false);
        }
        let Some(domain) = domain else { return };
        for &watcher in watchers {
            if let std::collections::btree_map::Entry::Vacant(slot) =
                self.asked.entry((target, watcher))
            {
                // Until the answer: asking, if the link is up to carry the watch (else
                // nothing can be known, and the watch goes when the link comes up).
                let state = if self.up.contains(domain) {
                    Seen::Asking
                } else {
                    Seen::Unknown
                };
                slot.insert((domain.to_string(), state));
                self.watch(domain.to_string(), watcher, target, true);
            }
        }
    }

    fn watch(&mut self, peer: String, watcher: UserId, target: UserId, on: bool) {
        self.stats.watches_sent += 1;
        if !self.watched_at.contains(&peer) {
            self.watched_at.insert(peer.clone());
        }
        self.outgoing.push((
            peer,
            Entry::PresenceWatch {
                watcher,
                target,
                on,
            },
        ));
    }

    /// The entries made since the last call.
    pub(super) fn take_outgoing(&mut self) -> Vec<(String, Entry)> {
        core::mem::take(&mut self.outgoing)
    }

    /// Every session is ending (the gateway shuts down): the watches asked end with them,
    /// unsaid (the links close too, and peers forget them then).
    pub(super) fn forget_asked(&mut self) {
        self.asked.clear();
    }

    /// The link to `peer` came up: a reset, then every watch asked of it.
    pub(super) fn link_up(&mut self, peer: &str) {
        self.up.insert(peer.to_string());
        if self.watched_at.contains(peer) {
            self.outgoing.push((peer.to_string(), Entry::PresenceReset));
        }
        let asked: Vec<(UserId, UserId)> = self
            .asked
            .iter()
            .filter(|(_, (d, _))| d == peer)
            .map(|(k, _)| *k)
            .collect();
        for (target, watcher) in asked {
            self.watch(peer.to_string(), watcher, target, true);
        }
    }

    /// The link to `peer` went down: its watches here end, and what it told is forgotten.
    /// Returns the targets whose watchers here must hear it.
    pub(super) fn link_down(&mut self, peer: &str) -> Vec<UserId> {
        self.up.remove(peer);
        self.forget_peer(peer);
        let mut targets = Vec::new();
        for ((target, _), (domain, seen)) in &mut self.asked {
            if domain == peer && *seen != Seen::Unknown {
                *seen = Seen::Unknown;
                targets.push(*target);
            }
        }
        targets.dedup();
        targets
    }

    fn forget_peer(&mut self, peer: &str) {
        self.held.retain(|_, watches| {
            watches.retain(|(p, _), _| p != peer);
            !watches.is_empty()
        });
        self.held_per_peer.remove(peer);
    }

    /// The peers' watchers of `target`, a user of this gateway.
    pub(super) fn holders(&self, target: UserId) -> Vec<(String, UserId)> {
        self.held
            .get(&target)
            .map(|w| w.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Users of this gateway watched by peers (for ageing).
    pub(super) fn held_targets(&self) -> impl Iterator<Item = UserId> + '_ {
        self.held.keys().copied()
    }

    /// Tells `peer` that `watcher` may see `target` as `seen`, if it changed since the last
    /// time (`always`: even if not, as the answer to a watch).
    pub(super) fn tell(
        &mut self,
        peer: &str,
        watcher: UserId,
        target: UserId,
        seen: Seen,
        always: bool,
    ) {
        let Some(told) = self
            .held
            .get_mut(&target)
            .and_then(|w| w.get_mut(&(peer.to_string(), watcher)))
        else {
            return;
        };
        if *told == seen && !always {
            return;
        }
        *told = seen;
        self.stats.states_sent += 1;
        self.outgoing.push((
            peer.to_string(),
            Entry::PresenceState {
                watcher,
                target,
                seen,
            },
        ));
    }

    /// `peer` watches `target` for `watcher` (checked by the caller), or stops. True if it is
    /// watched now and must be answered.
    fn take_watch(&mut self, peer: &str, watcher: UserId, target: UserId, on: bool) -> bool {
        let key = (peer.to_string(), watcher);
        if !on {
            let removed = self.held.get_mut(&target).and_then(|w| w.remove(&key));
            if removed.is_some() {
                if let Some(count) = self.held_per_peer.get_mut(peer) {
                    *count -= 1;
                }
            }
            if self.held.get(&target).is_some_and(BTreeMap::is_empty) {
                self.held.remove(&target);
            }
            self.stats.watches_taken += 1;
            return false;
        }
        let watches = self.held.entry(target).or_default();
        if !watches.contains_key(&key) {
            let count = self.held_per_peer.entry(peer.to_string()).or_default();
            if *count >= HELD_WATCHES_PER_PEER_MAX {
                if watches.is_empty() {
                    self.held.remove(&target);
                }
                self.stats.dropped += 1;
                return false;
            }
            *count += 1;
            watches.insert(key, Seen::Unknown);
        }
        self.stats.watches_taken += 1;
        true
    }

    /// `peer` told `seen` of `target` for `watcher`: kept if this gateway asked it that.
    fn take_state(&mut self, peer: &str, watcher: UserId, target: UserId, seen: Seen) -> bool {
        match self.asked.get_mut(&(target, watcher)) {
            Some((domain, told)) if domain == peer => {
                *told = seen;
                self.stats.states_taken += 1;
                true
            }
            _ => {
                self.stats.dropped += 1;
                false
            }
        }
    }

    fn count_dropped(&mut self) {
        self.stats.dropped += 1;
    }
}

impl Gateway {
    /// Sends what presence made for peers in this batch, to those whose link is up.
    pub(super) fn send_presence_abroad(&mut self) {
        for (peer, entry) in self.presence.abroad_mut().take_outgoing() {
            let up = self.federation.as_ref().is_some_and(|f| f.is_up(&peer));
            if up {
                // Too large or an unknown peer cannot happen for these small entries to a
                // configured peer; if it did, the state would be said again on the next up.
                let _ = self.send_entry(&peer, &entry);
            }
        }
    }

    /// The federation's links came up or went down since the last call.
    pub(super) fn take_link_changes(&mut self, now: Instant) {
        while let Some((peer, up)) = self
            .federation
            .as_mut()
            .and_then(crate::federation::Federation::take_link_change)
        {
            if up {
                self.presence.abroad_mut().link_up(&peer);
            } else {
                for target in self.presence.abroad_mut().link_down(&peer) {
                    self.presence.push(now, target, &self.social, &mut self.fx);
                }
            }
        }
    }

    /// `peer` watches `target`, a user of this domain, for `watcher`, a user of its own (or
    /// no longer does).
    pub(super) fn on_presence_watch(
        &mut self,
        now: Instant,
        peer: &str,
        watcher: UserId,
        target: UserId,
        on: bool,
    ) {
        let ours = self.registry.devices_of(watcher).next().is_some();
        let claimed_elsewhere = self.social.domain_of(watcher).is_some_and(|d| d != peer);
        let target_abroad = self.social.domain_of(target).is_some();
        if ours || claimed_elsewhere || target_abroad || watcher == target {
            self.presence.abroad_mut().count_dropped();
            return;
        }
        if self
            .presence
            .abroad_mut()
            .take_watch(peer, watcher, target, on)
        {
            let seen = self.presence.seen(now, watcher, target, &self.social);
            self.presence
                .abroad_mut()
                .tell(peer, watcher, target, seen, true);
        }
    }

    /// `peer` forgets every watch it made here.
    pub(super) fn on_presence_reset(&mut self, peer: &str) {
        self.presence.abroad_mut().forget_peer(peer);
    }

    /// `peer` says what `watcher`, a user of this domain, may see of `target`, one of its.
    pub(super) fn on_presence_state(
        &mut self,
        now: Instant,
        peer: &str,
        watcher: UserId,
        target: UserId,
        seen: Seen,
    ) {
        if self
            .presence
            .abroad_mut()
            .take_state(peer, watcher, target, seen)
        {
            self.presence.push(now, target, &self.social, &mut self.fx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_pair::{frames, Pair, DOMAINS, NOW};
    use super::super::GatewayInput;
    use crate::federation::entry::Entry;
    use crate::ids::{ConnectionId, UserId};
    use crate::testing::drain_gateway;
    use crate::wire::payload::{
        ContactAction, ContactChange, Payload, PresenceSubscribe, PresenceUpdate, Seen,
    };
    use crate::wire::{Frame, Routing};

    fn alice() -> UserId {
        UserId::of("alice", "a.example")
    }

    fn bob() -> UserId {
        UserId::of("bob", "b.example")
    }

    /// Sends `payload` on `conn` at gateway `at` under the request id `id`; what the gateway
    /// sent on `conn`.
    fn send_as(
        w: &mut Pair,
        at: usize,
        conn: ConnectionId,
        id: u64,
        payload: Payload,
    ) -> Vec<Payload> {
        let frame = Frame::new(
            Routing {
                seq: 1 << 63 | id,
                ..Routing::default()
            },
            payload,
        );
        let (g, store) = &mut w.gateways[at];
        g.handle(NOW, GatewayInput::Frame(conn, frame.encode()));
        frames(&drain_gateway(g, store), conn)
    }

    /// [`send_as`] under a fixed request id (answers to other requests than watchlists do not
    /// depend on it).
    fn send(w: &mut Pair, at: usize, conn: ConnectionId, payload: Payload) -> Vec<Payload> {
        send_as(w, at, conn, 7, payload)
    }

    /// The presence states among `payloads`, in order.
    fn states(payloads: &[Payload]) -> Vec<(UserId, Seen)> {
        payloads
            .iter()
            .filter_map(|p| match p {
                Payload::PresenceNotify(n) => Some(n.entries.clone()),
                _ => None,
            })
            .flatten()
            .map(|e| (UserId::from_bytes(*e.user), Seen::from_u8(e.seen)))
            .collect()
    }

    /// Hands on every entry both ways until none is left; the states gateway `at` told `conn`
    /// meanwhile.
    fn settle_told(w: &mut Pair, at: usize, conn: ConnectionId) -> Vec<(UserId, Seen)> {
        w.released = [Vec::new(), Vec::new()];
        while !w.settle().is_empty() {}
        states(&frames(&w.released[at], conn))
    }

    /// Every presence entry handed on by [`Pair::settle`] until none is left.
    fn settle_entries(w: &mut Pair) -> Vec<Entry> {
        let mut all = Vec::new();
        loop {
            let handed = w.settle();
            if handed.is_empty() {
                return all;
            }
            all.extend(
                handed
                    .into_iter()
                    .flat_map(Entry::into_entries)
                    .filter(|e| {
                        matches!(
                            e,
                            Entry::PresenceWatch { .. }
                                | Entry::PresenceReset
                                | Entry::PresenceState { .. }
                        )
                    }),
            );
        }
    }

    /// The link between the two gateways comes up (`up`) or goes down, as both hear of it.
    fn link(w: &mut Pair, up: bool) {
        for (i, (g, store)) in w.gateways.iter_mut().enumerate() {
            g.federation
                .as_mut()
                .unwrap()
                .assume_link_change(DOMAINS[1 - i], up);
            g.take_link_changes(NOW);
            drain_gateway(g, store);
        }
    }

    fn change(w: &mut Pair, at: usize, conn: ConnectionId, other: UserId, action: ContactAction) {
        let domain = Some(DOMAINS[1 - at].to_string());
        let change = ContactChange {
            user: other.to_bytes().into(),
            action: action as u8,
            domain,
        };
        send(w, at, conn, Payload::ContactChange(change));
        while !w.settle().is_empty() {}
    }

    /// A watchlist of `users` from `conn`, under a request id of its own (one under the same
    /// id as the session's last is a copy); the answer's states.
    fn watch(w: &mut Pair, at: usize, conn: ConnectionId, users: &[UserId]) -> Vec<(UserId, Seen)> {
        let subscribe = PresenceSubscribe {
            users: users.iter().map(|u| u.to_bytes().into()).collect(),
        };
        w.requests += 1;
        let id = 1000 + w.requests;
        states(&send_as(
            w,
            at,
            conn,
            id,
            Payload::PresenceSubscribe(subscribe),
        ))
    }

    /// alice at a.example and bob at b.example, contacts, each in session; the link up.
    fn contacts() -> (Pair, ConnectionId, ConnectionId) {
        let mut w = Pair::new();
        link(&mut w, true);
        let (a_conn, _) = w.open_session(0, 1, alice());
        let (b_conn, _) = w.open_session(1, 2, bob());
        change(&mut w, 0, a_conn, bob(), ContactAction::Add);
        change(&mut w, 1, b_conn, alice(), ContactAction::Add);
        (w, a_conn, b_conn)
    }

    #[test]
    fn a_contact_abroad_is_watched_at_their_gateway_and_each_change_is_told() {
        let (mut w, a_conn, b_conn) = contacts();
        // alice watches bob: asking until his gateway answers, then online.
        assert_eq!(
            watch(&mut w, 0, a_conn, &[bob()]),
            vec![(bob(), Seen::Asking)]
        );
        assert_eq!(settle_told(&mut w, 0, a_conn), vec![(bob(), Seen::Online)]);
        // bob's session ends: last seen recently.
        let (g, store) = &mut w.gateways[1];
        g.handle(NOW, GatewayInput::Closed(b_conn));
        drain_gateway(g, store);
        assert_eq!(
            settle_told(&mut w, 0, a_conn),
            vec![(bob(), Seen::Recently)]
        );
        // bob comes back and goes invisible: alice is told online, then unknown.
        let (b_conn, _) = w.open_session(1, 3, bob());
        send(
            &mut w,
            1,
            b_conn,
            Payload::PresenceUpdate(PresenceUpdate { invisible: true }),
        );
        assert_eq!(
            settle_told(&mut w, 0, a_conn),
            vec![(bob(), Seen::Online), (bob(), Seen::Unknown)]
        );
        send(
            &mut w,
            1,
            b_conn,
            Payload::PresenceUpdate(PresenceUpdate { invisible: false }),
        );
        assert_eq!(settle_told(&mut w, 0, a_conn), vec![(bob(), Seen::Online)]);
        // alice's only watching session ends: her gateway ends the watch at bob's.
        let (g, store) = &mut w.gateways[0];
        g.handle(NOW, GatewayInput::Closed(a_conn));
        drain_gateway(g, store);
        assert_eq!(
            settle_entries(&mut w),
            vec![Entry::PresenceWatch {
                watcher: alice(),
                target: bob(),
                on: false
            }]
        );
        assert_eq!(w.gateways[1].0.presence.abroad().watches(), (0, 0));
        assert_eq!(w.gateways[0].0.presence.abroad().watches(), (0, 0));
    }

    #[test]
    fn one_watch_per_watcher_however_many_devices_watch() {
        let (mut w, a_conn, _) = contacts();
        let (a2_conn, _) = w.open_session(0, 4, alice());
        watch(&mut w, 0, a_conn, &[bob()]);
        watch(&mut w, 0, a2_conn, &[bob()]);
        let entries = settle_entries(&mut w);
        let watches = entries
            .iter()
            .filter(|e| matches!(e, Entry::PresenceWatch { on: true, .. }))
            .count();
        assert_eq!(watches, 1, "{entries:?}");
        assert_eq!(w.gateways[1].0.presence.abroad().watches(), (1, 0));
        // The second device's session hears bob's state from the first answer.
        assert_eq!(
            watch(&mut w, 0, a2_conn, &[bob()]),
            vec![(bob(), Seen::Online)]
        );
        // One device stops watching: the watch stays for the other.
        watch(&mut w, 0, a_conn, &[]);
        assert!(settle_entries(&mut w).is_empty());
    }

    #[test]
    fn a_block_or_a_remove_hides_the_contact_abroad() {
        let (mut w, a_conn, b_conn) = contacts();
        watch(&mut w, 0, a_conn, &[bob()]);
        assert_eq!(settle_told(&mut w, 0, a_conn), vec![(bob(), Seen::Online)]);
        // bob blocks alice: his gateway says unknown, hers learns his add is gone.
        change(&mut w, 1, b_conn, alice(), ContactAction::Block);
        let (g, _) = &w.gateways[0];
        assert_eq!(
            g.presence.seen(NOW, alice(), bob(), &g.social),
            Seen::Unknown
        );
        change(&mut w, 1, b_conn, alice(), ContactAction::Unblock);
        change(&mut w, 1, b_conn, alice(), ContactAction::Add);
        let (g, _) = &w.gateways[0];
        assert_eq!(
            g.presence.seen(NOW, alice(), bob(), &g.social),
            Seen::Online
        );
        // alice removes bob: hidden at once, by her own gateway's rule.
        let change_frame = ContactChange {
            user: bob().to_bytes().into(),
            action: ContactAction::Remove as u8,
            domain: None,
        };
        let told = states(&send(
            &mut w,
            0,
            a_conn,
            Payload::ContactChange(change_frame),
        ));
        assert_eq!(told, vec![(bob(), Seen::Unknown)]);
    }

    #[test]
    fn a_cut_link_forgets_what_was_told_and_a_new_one_asks_again() {
        let (mut w, a_conn, _) = contacts();
        watch(&mut w, 0, a_conn, &[bob()]);
        assert_eq!(settle_told(&mut w, 0, a_conn), vec![(bob(), Seen::Online)]);
        // The link goes down: nothing can be known across it.
        w.released = [Vec::new(), Vec::new()];
        let (g, store) = &mut w.gateways[0];
        g.federation
            .as_mut()
            .unwrap()
            .assume_link_change("b.example", false);
        g.take_link_changes(NOW);
        let told = states(&frames(&drain_gateway(g, store), a_conn));
        assert_eq!(told, vec![(bob(), Seen::Unknown)]);
        let (g, store) = &mut w.gateways[1];
        g.federation
            .as_mut()
            .unwrap()
            .assume_link_change("a.example", false);
        g.take_link_changes(NOW);
        drain_gateway(g, store);
        assert_eq!(
            g.presence.abroad().watches(),
            (0, 0),
            "the peer's watches end"
        );
        // It comes up: a reset, the watch again, and bob's state afresh.
        link(&mut w, true);
        let entries = settle_entries(&mut w);
        assert_eq!(
            entries[..2],
            [
                Entry::PresenceReset,
                Entry::PresenceWatch {
                    watcher: alice(),
                    target: bob(),
                    on: true
                }
            ]
        );
        let (g, _) = &w.gateways[0];
        assert_eq!(
            g.presence.seen(NOW, alice(), bob(), &g.social),
            Seen::Online
        );
    }

    #[test]
    fn a_peer_speaks_only_for_its_own_users_of_this_domains_users() {
        let (mut w, a_conn, _) = contacts();
        let carol = UserId::of("carol", "c.example");
        let (g, store) = &mut w.gateways[0];
        let lies = [
            // a watch for alice, a user with devices here.
            Entry::PresenceWatch {
                watcher: alice(),
                target: alice(),
                on: true,
            },
            // a watch of bob, a user of b.example itself.
            Entry::PresenceWatch {
                watcher: carol,
                target: bob(),
                on: true,
            },
            // a state alice's gateway never asked for.
            Entry::PresenceState {
                watcher: alice(),
                target: bob(),
                seen: Seen::Online,
            },
        ];
        for lie in lies {
            g.handle_entry(NOW, "b.example", lie);
            let told = states(&frames(&drain_gateway(g, store), a_conn));
            assert!(told.is_empty(), "{told:?}");
        }
        assert_eq!(g.presence.abroad().stats().dropped, 3);
        assert_eq!(g.presence.abroad().watches(), (0, 0));
        assert_eq!(
            g.presence.seen(NOW, alice(), bob(), &g.social),
            Seen::Unknown
        );
    }
}
