//! Presence: who is online, when each user was last seen, and the watchlists told of it.
//!
//! A user is *online* while one of its devices has an open session: the session is the lease.
//! It is renewed by every frame the device sends (heartbeats at least, every
//! `heartbeat_interval`), and it lapses when the gateway hears nothing for
//! `session_idle_timeout` (a device that went away without saying so) or the connection
//! closes. When the last session of a user ends, its *last seen* time is kept, rounded down
//! to the hour ([`LAST_SEEN_GRAIN`]): durable in [`LAST_SEEN_TABLE`], so a restarted gateway
//! still knows it, and never finer than the hour; only for users with at least one contact
//! (nobody else may ever be told it). Watchers learn only coarse buckets of it
//! ([`Seen`]), computed when they are told.
//!
//! Each session may hold one watchlist (at most `watchlist_max` users, each change charged to
//! the device's subscription limit). The gateway answers a watchlist with every listed user's
//! state, then pushes a user's new state to each session watching it when it changes: they go
//! online or offline, or a change of contacts, blocks or invisibility changes what a watcher
//! may see. Only changes are pushed (each watch remembers what it was told). A user that the
//! watcher may not see ([`super::social::Social::may_see`]) is [`Seen::Unknown`], whatever the
//! reason, so a watcher cannot tell "not a contact" from "invisible" or "blocked me".
//! Watchlists live in memory with their sessions: a node sends its watchlist again in each
//! new session. Buckets age as time passes (recently → within a week → …): the gateway's tick
//! looks for them at most once per [`LAST_SEEN_GRAIN`] ([`Presence::age`]) and pushes what
//! changed, so a watcher learns of it at most an hour late.
//!
//! A user of another domain is watched at their gateway, which decides what each watcher may
//! see and tells each change ([`super::presence_abroad`]); this gateway's users are watched
//! by peers' users the same way, and pushed to alike.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::presence_abroad::{PresenceAbroad, PresenceAbroadStats};
use super::refusal::Refusal;
use super::social::Social;
use super::Fx;
use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::ids::{ConnectionId, UserId};
use crate::time::Instant;
use crate::wire::payload::{ErrorCode, PresenceEntry, PresenceNotify, Seen};
use crate::wire::{Payload, Routing};

/// Table of last-seen times: user id → hour-rounded microseconds (8 bytes, little-endian).
pub const LAST_SEEN_TABLE: Table = Table("last_seen");

/// The finest resolution the gateway keeps of when a user was last seen.
pub const LAST_SEEN_GRAIN: Duration = Duration::from_secs(3600);

/// Counters for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PresenceStats {
    /// Watchlists taken.
    pub watchlists: u64,
    /// Watchlists refused for their length.
    pub watchlists_too_long: u64,
    /// Users' states told to watchers (entries in notifications, answers included).
    pub entries_told: u64,
    /// Users that went online (first session) or offline (last session ended).
    pub transitions: u64,
    /// Watches across domains.
    pub abroad: PresenceAbroadStats,
}

/// What one session watches, and what it was told of each.
#[derive(Clone, Debug)]
struct Watch {
    watcher: UserId,
    told: BTreeMap<UserId, Seen>,
    /// The watchlist's request id (the seq of every notification for it).
    request: u64,
    /// Notifications sent for it.
    sent: u64,
}

/// The presence sub-machine (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct Presence {
    online: BTreeMap<UserId, BTreeSet<ConnectionId>>,
    last_seen: BTreeMap<UserId, Instant>,
    watches: BTreeMap<ConnectionId, Watch>,
    /// Reverse index: the sessions watching each user.
    watchers: BTreeMap<UserId, BTreeSet<ConnectionId>>,
    /// When [`Presence::age`] next looks for buckets that aged (`None` until its first call).
    next_ageing: Option<Instant>,
    /// Watches across domains, both ways.
    abroad: PresenceAbroad,
    stats: PresenceStats,
}

fn round_down(at: Instant) -> Instant {
    let grain = u64::try_from(LAST_SEEN_GRAIN.as_micros()).expect("an hour fits");
    Instant(at.0 / grain * grain)
}

impl Presence {
    /// Reads last-seen times back; nobody is online after a restart until they reconnect.
    pub fn recover(store: &dyn StoreRead) -> Result<Presence, StoreError> {
        let mut presence = Presence::default();
        scan_all(store, LAST_SEEN_TABLE, |key, value| {
            let corrupt = || StoreError::Corrupt {
                table: LAST_SEEN_TABLE.0,
                reason: "a last-seen record is not a user id and 8 bytes".into(),
            };
            let user: [u8; 16] = key.try_into().map_err(|_| corrupt())?;
            let at: [u8; 8] = value.try_into().map_err(|_| corrupt())?;
            presence
                .last_seen
                .insert(UserId::from_bytes(user), Instant(u64::from_le_bytes(at)));
            Ok(())
        })?;
        Ok(presence)
    }

    /// The counters.
    pub fn stats(&self) -> PresenceStats {
        PresenceStats {
            abroad: self.abroad.stats().clone(),
            ..self.stats.clone()
        }
    }

    /// Watches across domains.
    pub fn abroad(&self) -> &PresenceAbroad {
        &self.abroad
    }

    pub(super) fn abroad_mut(&mut self) -> &mut PresenceAbroad {
        &mut self.abroad
    }

    /// Users online now.
    pub fn online_users(&self) -> usize {
        self.online.len()
    }

    /// Sessions holding a watchlist, and the entries of all watchlists.
    pub fn watchlists(&self) -> (usize, usize) {
        let entries = self.watches.values().map(|w| w.told.len()).sum();
        (self.watches.len(), entries)
    }

    /// How many notifications the watchlist of the session on `conn` was sent, if it has one
    /// (told in heartbeats, so that a device that missed one asks again).
    pub fn notifications(&self, conn: ConnectionId) -> Option<u64> {
        self.watches.get(&conn).map(|w| w.sent)
    }

    /// What `watcher` may be told of `target` at `now`.
    pub fn seen(&self, now: Instant, watcher: UserId, target: UserId, social: &Social) -> Seen {
        if !social.may_see(watcher, target) {
            return Seen::Unknown;
        }
        if social.domain_of(target).is_some() {
            // Theirs to decide: what their gateway told (this gateway's rule agreed above).
            return self.abroad.told(watcher, target);
        }
        if self.online.contains_key(&target) {
            return Seen::Online;
        }
        match self.last_seen.get(&target) {
            Some(at) => Seen::last_online(now.saturating_since(*at)),
            None => Seen::Unknown,
        }
    }

    /// Keeps when `user` was last seen, if anyone may ever be told: a user without contacts
    /// leaves no last-seen time (nor a write on each connection).
    fn note_seen(&mut self, now: Instant, user: UserId, social: &Social, writes: &mut WriteBatch) {
        if !social.has_contacts(user) {
            return;
        }
        let at = round_down(now);
        if self.last_seen.insert(user, at) != Some(at) {
            writes.put(
                LAST_SEEN_TABLE,
                user.to_bytes().to_vec(),
                at.0.to_le_bytes().to_vec(),
            );
        }
    }

    /// A session of `user` opened on `conn`.
    pub fn opened(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        user: UserId,
        social: &Social,
        fx: &mut Fx,
    ) {
        let sessions = self.online.entry(user).or_default();
        let first = sessions.is_empty();
        sessions.insert(conn);
        // Kept at the session's start too, so a gateway that crashes while the user is online
        // still knows roughly when it last saw them.
        self.note_seen(now, user, social, fx.writes());
        if first {
            self.stats.transitions += 1;
            self.push(now, user, social, fx);
        }
    }

    /// The session on `conn` ended (`user`: its user, if it was open).
    pub fn closed(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        user: Option<UserId>,
        social: &Social,
        fx: &mut Fx,
    ) {
        for target in self.unwatch(conn) {
            self.sync_abroad(target, social);
        }
        let Some(user) = user else { return };
        let Some(sessions) = self.online.get_mut(&user) else {
            return;
        };
        if !sessions.remove(&conn) || !sessions.is_empty() {
            return;
        }
        self.online.remove(&user);
        self.note_seen(now, user, social, fx.writes());
        self.stats.transitions += 1;
        self.push(now, user, social, fx);
    }

    /// Forgets every watchlist (the gateway is shutting down and every session ends).
    pub fn drop_watches(&mut self) {
        self.watches.clear();
        self.watchers.clear();
        self.abroad.forget_asked();
    }

    /// Ends the watch of the session on `conn`; returns the users it watched.
    fn unwatch(&mut self, conn: ConnectionId) -> Vec<UserId> {
        let Some(watch) = self.watches.remove(&conn) else {
            return Vec::new();
        };
        for target in watch.told.keys() {
            if let Some(set) = self.watchers.get_mut(target) {
                set.remove(&conn);
                if set.is_empty() {
                    self.watchers.remove(target);
                }
            }
        }
        watch.told.into_keys().collect()
    }

    /// Makes the watches asked of `target`'s gateway, if it is of another domain, those of
    /// the users with a session watching it here.
    fn sync_abroad(&mut self, target: UserId, social: &Social) {
        let domain = social.domain_of(target);
        let watchers: BTreeSet<UserId> = match (domain, self.watchers.get(&target)) {
            (Some(_), Some(conns)) => conns
                .iter()
                .filter_map(|c| self.watches.get(c).map(|w| w.watcher))
                .collect(),
            _ => BTreeSet::new(),
        };
        self.abroad.sync(target, domain, &watchers);
    }

    /// True if the session on `conn` watches under the request id `request` already: a
    /// watchlist with that id is a copy of the one it watches.
    pub fn is_watching(&self, conn: ConnectionId, request: u64) -> bool {
        self.watches
            .get(&conn)
            .is_some_and(|w| w.request == request)
    }

    /// Takes the watchlist of the session on `conn` (replacing its last) and answers it with
    /// every listed user's state, under the request id `request`.
    #[allow(clippy::too_many_arguments)]
    pub fn subscribe(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        watcher: UserId,
        users: &[UserId],
        watchlist_max: usize,
        request: u64,
        social: &Social,
        fx: &mut Fx,
    ) -> Result<(), Refusal> {
        let routing = Routing {
            seq: request,
            ..Routing::default()
        };
        let listed: BTreeSet<UserId> = users.iter().copied().collect();
        if listed.len() > watchlist_max {
            // The session asked for this list instead of its last: it watches nothing now.
            for target in self.unwatch(conn) {
                self.sync_abroad(target, social);
            }
            self.stats.watchlists_too_long += 1;
            return Err(Refusal::error(
                ErrorCode::WatchlistTooLong,
                format!(
                    "a watchlist of {} users; this gateway allows at most {watchlist_max}",
                    listed.len()
                ),
            )
            .in_conversation(routing));
        }
        let before = self.unwatch(conn);
        self.stats.watchlists += 1;
        // Watched first, so that users of other domains are asked of their gateways (and
        // answered as being asked) and those no longer watched are let go.
        let mut told = BTreeMap::new();
        for &target in &listed {
            told.insert(target, Seen::Unknown);
            self.watchers.entry(target).or_default().insert(conn);
        }
        self.watches.insert(
            conn,
            Watch {
                watcher,
                told,
                request,
                sent: 1,
            },
        );
        for target in before.into_iter().chain(listed.iter().copied()) {
            self.sync_abroad(target, social);
        }
        let mut entries = Vec::with_capacity(listed.len());
        for target in listed {
            let seen = self.seen(now, watcher, target, social);
            if let Some(watch) = self.watches.get_mut(&conn) {
                watch.told.insert(target, seen);
            }
            entries.push(PresenceEntry {
                user: target.to_bytes().into(),
                seen: seen as u8,
            });
        }
        self.stats.entries_told += entries.len() as u64;
        fx.send(
            conn,
            routing,
            Payload::PresenceNotify(PresenceNotify { entries, number: 1 }),
        );
        Ok(())
    }

    /// Tells watchers of the buckets that aged since they were told (a user last seen 3 days
    /// ago moves from recently to within a week without a word from its devices). Called on
    /// every tick; does its work at most once per [`LAST_SEEN_GRAIN`], the first time one
    /// grain after its first call, so a bucket is told at most that late.
    pub fn age(&mut self, now: Instant, social: &Social, fx: &mut Fx) {
        match self.next_ageing {
            Some(at) if now >= at => {}
            Some(_) => return,
            None => {
                self.next_ageing = Some(now + LAST_SEEN_GRAIN);
                return;
            }
        }
        self.next_ageing = Some(now + LAST_SEEN_GRAIN);
        let offline: BTreeSet<UserId> = self
            .watchers
            .keys()
            .copied()
            .chain(self.abroad.held_targets())
            .filter(|user| !self.online.contains_key(user))
            .collect();
        for target in offline {
            self.push(now, target, social, fx);
        }
    }

    /// Tells each session watching `target` its new state, where it changed, and each peer
    /// watching it for one of its users; and makes the watches asked abroad of `target` those
    /// of its watchers here.
    pub fn push(&mut self, now: Instant, target: UserId, social: &Social, fx: &mut Fx) {
        self.sync_abroad(target, social);
        for (peer, watcher) in self.abroad.holders(target) {
            let seen = self.seen(now, watcher, target, social);
            self.abroad.tell(&peer, watcher, target, seen, false);
        }
        let Some(conns) = self.watchers.get(&target) else {
            return;
        };
        let states: Vec<(ConnectionId, Seen)> = conns
            .iter()
            .map(|conn| {
                let watch = self
                    .watches
                    .get(conn)
                    .expect("the reverse index names only watching sessions");
                (*conn, self.seen(now, watch.watcher, target, social))
            })
            .collect();
        for (conn, seen) in states {
            let watch = self
                .watches
                .get_mut(&conn)
                .expect("the reverse index names only watching sessions");
            let told = watch.told.insert(target, seen);
            if told == Some(seen) {
                continue;
            }
            self.stats.entries_told += 1;
            watch.sent += 1;
            let entries = vec![PresenceEntry {
                user: target.to_bytes().into(),
                seen: seen as u8,
            }];
            let routing = Routing {
                seq: watch.request,
                ..Routing::default()
            };
            let notify = PresenceNotify {
                entries,
                number: watch.sent,
            };
            fx.send(conn, routing, Payload::PresenceNotify(notify));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::payload::ContactAction;
    use crate::wire::Frame;

    fn u(n: u8) -> UserId {
        UserId::from_bytes([n; 16])
    }

    fn hours(h: u64) -> Instant {
        Instant(h * 3_600_000_000 + 17)
    }

    /// Every presence entry sent, as (connection, user, state).
    fn told(fx: &mut Fx) -> Vec<(u64, UserId, Seen)> {
        let mut out = Vec::new();
        while let Some(ready) = fx.take_ready() {
            let outputs = ready.commit(&mut crate::env::MemStore::default()).unwrap();
            for output in outputs {
                if let super::super::GatewayOutput::Send(conn, bytes) = output {
                    let frame = Frame::decode(&bytes, crate::wire::PAYLOAD_BYTES_MAX).unwrap();
                    if let Payload::PresenceNotify(n) = frame.payload {
                        for e in n.entries {
                            out.push((conn.0, UserId::from_bytes(*e.user), Seen::from_u8(e.seen)));
                        }
                    }
                }
            }
        }
        out
    }

    fn contacts(pairs: &[(u8, u8)]) -> Social {
        let mut social = Social::default();
        let mut w = WriteBatch::default();
        for (a, b) in pairs {
            social
                .change(u(*a), u(*b), ContactAction::Add, 10, &mut w)
                .unwrap();
            social
                .change(u(*b), u(*a), ContactAction::Add, 10, &mut w)
                .unwrap();
        }
        social
    }

    #[test]
    fn watchers_see_contacts_online_then_a_coarse_bucket_and_strangers_never() {
        let social = contacts(&[(1, 2)]);
        let mut p = Presence::default();
        let mut fx = Fx::default();
        // u1 watches u2 and u3 (not a contact) from conn 10; u3 watches u2 from conn 30.
        p.subscribe(
            hours(0),
            ConnectionId(10),
            u(1),
            &[u(2), u(3)],
            8,
            1,
            &social,
            &mut fx,
        )
        .unwrap();
        p.subscribe(
            hours(0),
            ConnectionId(30),
            u(3),
            &[u(2)],
            8,
            1,
            &social,
            &mut fx,
        )
        .unwrap();
        assert_eq!(
            told(&mut fx),
            vec![
                (10, u(2), Seen::Unknown),
                (10, u(3), Seen::Unknown),
                (30, u(2), Seen::Unknown)
            ]
        );
        p.opened(hours(1), ConnectionId(20), u(2), &social, &mut fx);
        assert_eq!(told(&mut fx), vec![(10, u(2), Seen::Online)]);
        p.opened(hours(1), ConnectionId(21), u(2), &social, &mut fx);
        p.closed(hours(2), ConnectionId(20), Some(u(2)), &social, &mut fx);
        assert!(told(&mut fx).is_empty(), "still online on another device");
        p.closed(hours(2), ConnectionId(21), Some(u(2)), &social, &mut fx);
        assert_eq!(told(&mut fx), vec![(10, u(2), Seen::Recently)]);
        assert_eq!(p.seen(hours(24 * 5), u(1), u(2), &social), Seen::WithinWeek);
        assert_eq!(p.seen(hours(24 * 5), u(3), u(2), &social), Seen::Unknown);
    }

    #[test]
    fn buckets_that_age_are_pushed_within_an_hour_and_only_when_they_change() {
        let social = contacts(&[(1, 2)]);
        let mut p = Presence::default();
        let mut fx = Fx::default();
        p.opened(hours(0), ConnectionId(20), u(2), &social, &mut fx);
        p.closed(hours(1), ConnectionId(20), Some(u(2)), &social, &mut fx);
        p.subscribe(
            hours(2),
            ConnectionId(10),
            u(1),
            &[u(2)],
            8,
            1,
            &social,
            &mut fx,
        )
        .unwrap();
        assert_eq!(told(&mut fx), vec![(10, u(2), Seen::Recently)]);
        // Every tick calls `age`; it looks once an hour.
        let mut pushed = Vec::new();
        for minute in (2 * 60)..(24 * 40 * 60) {
            p.age(Instant(minute * 60_000_000 + 17), &social, &mut fx);
            pushed.extend(told(&mut fx).into_iter().map(|t| (minute / 60, t)));
        }
        assert_eq!(
            pushed,
            vec![
                // Last seen in hour 1: past 72 hours from hour 74 on (the hour is rounded down).
                (74, (10, u(2), Seen::WithinWeek)),
                (24 * 7 + 2, (10, u(2), Seen::WithinMonth)),
                (24 * 30 + 2, (10, u(2), Seen::LongAgo)),
            ],
            "each change once, at most an hour late"
        );
    }

    #[test]
    fn a_too_long_watchlist_is_refused_and_a_closed_session_forgets_its_watch() {
        let social = contacts(&[(1, 2)]);
        let mut p = Presence::default();
        let mut fx = Fx::default();
        let refused = p
            .subscribe(
                hours(0),
                ConnectionId(10),
                u(1),
                &[u(2), u(3), u(4)],
                2,
                9,
                &social,
                &mut fx,
            )
            .unwrap_err();
        assert_eq!(refused.code(), ErrorCode::WatchlistTooLong);
        p.subscribe(
            hours(0),
            ConnectionId(10),
            u(1),
            &[u(2)],
            2,
            9,
            &social,
            &mut fx,
        )
        .unwrap();
        p.closed(hours(0), ConnectionId(10), Some(u(1)), &social, &mut fx);
        told(&mut fx);
        assert_eq!(p.watchlists(), (0, 0));
        p.opened(hours(1), ConnectionId(20), u(2), &social, &mut fx);
        assert!(told(&mut fx).is_empty());
    }

    #[test]
    fn last_seen_is_kept_to_the_hour_and_survives_a_restart() {
        use crate::env::MemStore;
        let social = contacts(&[(1, 2)]);
        let mut p = Presence::default();
        let mut fx = Fx::default();
        p.opened(hours(5), ConnectionId(20), u(2), &social, &mut fx);
        p.closed(hours(6), ConnectionId(20), Some(u(2)), &social, &mut fx);
        let mut store = MemStore::default();
        while let Some(ready) = fx.take_ready() {
            ready.commit(&mut store).unwrap();
        }
        let back = Presence::recover(&store).unwrap();
        assert_eq!(back.last_seen.get(&u(2)), Some(&Instant(6 * 3_600_000_000)));
        assert_eq!(
            back.seen(hours(6 + 24 * 10), u(1), u(2), &social),
            Seen::WithinMonth
        );
        assert_eq!(back.online_users(), 0);
    }
}
