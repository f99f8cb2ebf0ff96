//! The node's side of contacts and presence: requests waiting for their answer, the
//! watchlist, and what the gateway last said of each watched user and of this user's contacts.
//!
//! Requests ([`ContactChange`], [`PresenceUpdate`], [`ContactsFetch`]) are kept until answered
//! and sent again in each new session, and after two heartbeats without an answer (each is
//! idempotent at the gateway: adding someone twice is one request). Their ids have the top bit set, so they never meet the ids of KeyPackage
//! fetches. The watchlist is sent in each new session; the gateway answers with every watched
//! user's state and pushes changes, numbered per watchlist: a late notification never
//! overwrites a newer one's entry, and when the heartbeat's count says one was missed (twice
//! in a row, so that one merely overtaken does not count), or the gateway holds no watchlist
//! for the session, the watchlist goes again. The application hears only changes
//! ([`NodeEvent::Presence`]), listings ([`NodeEvent::Contacts`]) and refusals
//! ([`NodeEvent::ContactsRefused`]). All of it lives in memory: the gateway holds the truth and
//! a new session asks for it again: the watchlist goes again, and a device that holds a
//! listing asks for the current one (unless a request in flight brings it), since changes made
//! while it was away (a block from another device of its user, a request from someone) were
//! pushed only to the devices in session then. Within a session, heartbeats carry the digest
//! of the user's listing: one that differs twice in a row from the last listing heard (a push
//! lost) makes the device ask for it.

use std::collections::{BTreeMap, BTreeSet};

use super::events::{ContactList, NodeEvent};
use super::NodeFx;
use crate::ids::{ConnectionId, UserId};
use crate::time::Instant;
use crate::wire::payload::{
    ContactAction, ContactChange, Contacts, ContactsFetch, ErrorCode, ErrorReport, Payload,
    PresenceNotify, PresenceSubscribe, PresenceUpdate, Seen,
};
use crate::wire::Routing;

/// The bit that marks a request id as this sub-machine's.
const REQUEST_BIT: u64 = 1 << 63;

/// Contacts and presence as this device knows them (see the module docs).
#[derive(Debug, Default)]
pub struct NodeSocial {
    next_request: u64,
    /// Requests not answered, with the heartbeat round they last went in.
    pending: BTreeMap<u64, (Payload, u64)>,
    /// Heartbeat answers heard (the clock of resends).
    round: u64,
    /// The current watchlist's request id and the round it went in.
    watch_request: Option<(u64, u64)>,
    /// Numbers of its notifications heard.
    heard: BTreeSet<u64>,
    /// Which notification last set each user's state.
    set_by: BTreeMap<UserId, u64>,
    /// The count a heartbeat claimed that was above what was heard.
    claimed: Option<u64>,
    watchlist: Vec<UserId>,
    seen: BTreeMap<UserId, Seen>,
    contacts: Option<ContactList>,
    /// The digest of the last listing ([`Contacts::digest`]).
    listing_digest: Option<u64>,
    /// A digest a heartbeat claimed that differs from the last listing's: asked for if the
    /// next one claims it too (a pushed listing may merely be on its way).
    listing_claimed: Option<u64>,
    /// The gateway's presence limit refused the watchlist: send it again then.
    watch_retry_at: Option<Instant>,
}

impl NodeSocial {
    /// Whether `request` is one of this sub-machine's ids.
    pub fn owns(request: u64) -> bool {
        request & REQUEST_BIT != 0
    }

    /// What the gateway last said of `user` (unknown if it said nothing).
    pub fn seen(&self, user: UserId) -> Seen {
        self.seen.get(&user).copied().unwrap_or(Seen::Unknown)
    }

    /// The last listing of this user's contacts, if one came.
    pub fn contacts(&self) -> Option<&ContactList> {
        self.contacts.as_ref()
    }

    /// The watchlist.
    pub fn watchlist(&self) -> &[UserId] {
        &self.watchlist
    }

    /// Requests not answered yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn request(&mut self, payload: Payload, conn: Option<ConnectionId>, fx: &mut NodeFx) -> u64 {
        self.next_request += 1;
        let id = REQUEST_BIT | self.next_request;
        if let Some(conn) = conn {
            send(conn, id, payload.clone(), fx);
        }
        self.pending.insert(id, (payload, self.round));
        id
    }

    /// Adds, removes, blocks or unblocks `user`; returns the request id its answer carries.
    pub fn change(
        &mut self,
        user: UserId,
        domain: Option<String>,
        action: ContactAction,
        conn: Option<ConnectionId>,
        fx: &mut NodeFx,
    ) -> u64 {
        let change = ContactChange {
            user: user.to_bytes().into(),
            action: action as u8,
            domain,
        };
        self.request(Payload::ContactChange(change), conn, fx)
    }

    /// Becomes invisible or visible.
    pub fn set_invisible(
        &mut self,
        invisible: bool,
        conn: Option<ConnectionId>,
        fx: &mut NodeFx,
    ) -> u64 {
        let update = PresenceUpdate { invisible };
        self.request(Payload::PresenceUpdate(update), conn, fx)
    }

    /// Asks for the listing.
    pub fn fetch(&mut self, conn: Option<ConnectionId>, fx: &mut NodeFx) -> u64 {
        self.request(Payload::ContactsFetch(ContactsFetch {}), conn, fx)
    }

    /// Watches `users` from now on (replacing the watchlist); sent now if a session is open,
    /// and in every session after.
    pub fn watch(&mut self, users: Vec<UserId>, conn: Option<ConnectionId>, fx: &mut NodeFx) {
        let mut users = users;
        users.sort_unstable();
        users.dedup();
        self.seen.retain(|u, _| users.binary_search(u).is_ok());
        self.watchlist = users;
        if let Some(conn) = conn {
            self.send_watchlist(conn, fx);
        }
    }

    fn send_watchlist(&mut self, conn: ConnectionId, fx: &mut NodeFx) {
        if self.watchlist.is_empty() {
            return;
        }
        self.next_request += 1;
        let id = REQUEST_BIT | self.next_request;
        self.watch_request = Some((id, self.round));
        self.heard.clear();
        self.set_by.clear();
        self.claimed = None;
        let subscribe = PresenceSubscribe {
            users: self.watchlist.iter().map(|u| u.to_bytes().into()).collect(),
        };
        send(conn, id, Payload::PresenceSubscribe(subscribe), fx);
    }

    /// When the refused watchlist goes again, if it was refused.
    pub fn watch_retry_at(&self) -> Option<Instant> {
        self.watch_retry_at
    }

    /// The retry time of a refused watchlist came: send it (in the open session, if any; a
    /// new session sends it anyway).
    pub fn retry_watch(&mut self, conn: Option<ConnectionId>, fx: &mut NodeFx) {
        self.watch_retry_at = None;
        if let Some(conn) = conn {
            self.send_watchlist(conn, fx);
        }
    }

    /// A session opened: what waits goes again, and the watchlist.
    pub fn session_opened(&mut self, conn: ConnectionId, fx: &mut NodeFx) {
        self.watch_retry_at = None;
        for (id, (payload, round)) in &mut self.pending {
            *round = self.round;
            send(conn, *id, payload.clone(), fx);
        }
        // Every request is answered with a listing: one in flight brings it.
        if self.contacts.is_some() && self.pending.is_empty() {
            self.request(Payload::ContactsFetch(ContactsFetch {}), Some(conn), fx);
        }
        self.watch_request = None;
        self.send_watchlist(conn, fx);
    }

    /// A heartbeat answer: requests unanswered for two rounds go again, and the watchlist if
    /// the gateway's count of its notifications says one was missed.
    pub fn on_heartbeat(
        &mut self,
        presence: Option<u64>,
        contacts: Option<u64>,
        conn: ConnectionId,
        fx: &mut NodeFx,
    ) {
        self.round += 1;
        let round = self.round;
        for (id, (payload, sent)) in &mut self.pending {
            if *sent + 2 <= round {
                *sent = round;
                send(conn, *id, payload.clone(), fx);
            }
        }
        // A listing pushed and lost: the gateway's digest differs twice in a row from the
        // last one heard (every request in flight brings a listing anyway). The gateway
        // gives none for a user without relations: an empty listing.
        let digest = contacts.or_else(|| self.listing_digest.map(|_| Contacts::default().digest()));
        match digest {
            Some(digest) if self.listing_digest != Some(digest) && self.pending.is_empty() => {
                if self.listing_claimed == Some(digest) {
                    self.listing_claimed = None;
                    self.request(Payload::ContactsFetch(ContactsFetch {}), Some(conn), fx);
                } else {
                    self.listing_claimed = Some(digest);
                }
            }
            _ => self.listing_claimed = None,
        }
        if self.watchlist.is_empty() || self.watch_retry_at.is_some() {
            return;
        }
        let heard = self.heard.len() as u64;
        let missed = match (presence, self.watch_request) {
            // The gateway holds none: the watchlist (or its session's) was lost.
            (None, Some((_, sent))) => sent + 2 <= round,
            (None, None) => true,
            (Some(count), _) if heard < count => {
                let again = self.claimed.is_some_and(|c| heard < c);
                self.claimed = Some(count);
                again
            }
            (Some(_), _) => {
                self.claimed = None;
                false
            }
        };
        if missed {
            self.send_watchlist(conn, fx);
        }
    }

    /// A listing came: the answer to `request`, or unasked (seq 0) after a change made
    /// elsewhere (another device of this user, or the other side of a request).
    pub fn on_contacts(&mut self, request: u64, listing: Contacts, fx: &mut NodeFx) {
        let answered = NodeSocial::owns(request) && self.pending.remove(&request).is_some();
        self.listing_digest = Some(listing.digest());
        let list = ContactList::from(listing);
        self.contacts = Some(list.clone());
        fx.event(NodeEvent::Contacts {
            request: answered.then_some(request),
            contacts: list,
        });
    }

    /// Watched users' states came (for the watchlist `request`); the application hears those
    /// that changed.
    pub fn on_presence(&mut self, request: u64, notify: PresenceNotify, fx: &mut NodeFx) {
        if self.watch_request.map(|(id, _)| id) != Some(request) {
            return; // for a watchlist replaced since
        }
        let number = notify.number;
        self.heard.insert(number);
        for entry in notify.entries {
            let user = UserId::from_bytes(*entry.user);
            if self.watchlist.binary_search(&user).is_err() {
                continue;
            }
            if self.set_by.get(&user).is_some_and(|n| *n > number) {
                continue; // overtaken by a newer notification
            }
            self.set_by.insert(user, number);
            let seen = Seen::from_u8(entry.seen);
            if self.seen.insert(user, seen) != Some(seen) {
                fx.event(NodeEvent::Presence { user, seen });
            }
        }
    }

    /// An error naming one of this sub-machine's requests: it is dropped and the application
    /// told; a watchlist refused by the presence limit goes again after the hint. True if the
    /// error was for this sub-machine.
    pub fn on_error(
        &mut self,
        now: Instant,
        request: u64,
        report: &ErrorReport,
        fx: &mut NodeFx,
    ) -> bool {
        if !NodeSocial::owns(request) {
            return false;
        }
        self.pending.remove(&request);
        if ErrorCode::from_u16(report.code) == ErrorCode::WatchlistTooLong {
            // Sending it again would be refused again: the application must choose a shorter
            // one. Nothing is watched until it does.
            self.watchlist.clear();
            self.seen.clear();
            self.watch_request = None;
        }
        if ErrorCode::from_u16(report.code) == ErrorCode::PresenceLimited {
            let wait = core::time::Duration::from_millis(u64::from(
                report.retry_after_ms.unwrap_or(60_000),
            ));
            self.watch_retry_at = Some(now + wait);
        }
        fx.event(NodeEvent::ContactsRefused {
            request,
            code: ErrorCode::from_u16(report.code),
            message: report.message.clone(),
            retry_after: report
                .retry_after_ms
                .map(|ms| core::time::Duration::from_millis(u64::from(ms))),
        });
        true
    }
}

fn send(conn: ConnectionId, request: u64, payload: Payload, fx: &mut NodeFx) {
    let routing = Routing {
        seq: request,
        ..Routing::default()
    };
    fx.send(conn, routing, payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MemStore;
    use crate::node::NodeOutput;
    use crate::wire::payload::PresenceEntry;
    use crate::wire::{Frame, PAYLOAD_BYTES_MAX};

    const CONN: ConnectionId = ConnectionId(5);

    fn u(n: u8) -> UserId {
        UserId::from_bytes([n; 16])
    }

    /// The frames sent and the events told, in order.
    fn drain(fx: &mut NodeFx) -> (Vec<Frame>, Vec<NodeEvent>) {
        let (mut frames, mut events) = (Vec::new(), Vec::new());
        while let Some(ready) = fx.take_ready() {
            for output in ready.commit(&mut MemStore::default()).unwrap() {
                match output {
                    NodeOutput::Send(_, bytes) => {
                        frames.push(Frame::decode(&bytes, PAYLOAD_BYTES_MAX).unwrap());
                    }
                    NodeOutput::Event(e) => events.push(e),
                    _ => {}
                }
            }
        }
        (frames, events)
    }

    fn notify(number: u64, entries: &[(UserId, Seen)]) -> PresenceNotify {
        PresenceNotify {
            entries: entries
                .iter()
                .map(|(user, seen)| PresenceEntry {
                    user: user.to_bytes().into(),
                    seen: *seen as u8,
                })
                .collect(),
            number,
        }
    }

    fn error(code: ErrorCode) -> ErrorReport {
        ErrorReport {
            code: code as u16,
            message: "no".into(),
            msg_id: None,
            after: None,
            retry_after_ms: Some(1_000),
            held: None,
        }
    }

    #[test]
    fn a_late_notification_never_overwrites_a_newer_one_and_a_missed_one_brings_the_watchlist_again(
    ) {
        let mut social = NodeSocial::default();
        let mut fx = NodeFx::default();
        social.watch(vec![u(2)], Some(CONN), &mut fx);
        let (frames, _) = drain(&mut fx);
        let request = frames[0].routing.seq;
        assert!(NodeSocial::owns(request));
        social.on_presence(request, notify(1, &[(u(2), Seen::Unknown)]), &mut fx);
        social.on_presence(request, notify(3, &[(u(2), Seen::Online)]), &mut fx);
        social.on_presence(request, notify(2, &[(u(2), Seen::Recently)]), &mut fx);
        assert_eq!(social.seen(u(2)), Seen::Online, "the late one is ignored");
        social.on_presence(request + 1, notify(4, &[(u(2), Seen::LongAgo)]), &mut fx);
        assert_eq!(social.seen(u(2)), Seen::Online, "another watchlist's");
        drain(&mut fx);
        // The gateway sent 4: one is missing. Once is not enough (it may be overtaken)...
        social.on_heartbeat(Some(4), None, CONN, &mut fx);
        assert!(drain(&mut fx).0.is_empty());
        // ... twice is.
        social.on_heartbeat(Some(4), None, CONN, &mut fx);
        let (frames, _) = drain(&mut fx);
        assert!(matches!(
            frames[..],
            [Frame {
                payload: Payload::PresenceSubscribe(_),
                ..
            }]
        ));
    }

    #[test]
    fn unanswered_requests_go_again_and_a_too_long_watchlist_is_dropped() {
        let mut social = NodeSocial::default();
        let mut fx = NodeFx::default();
        let id = social.change(u(3), None, ContactAction::Add, Some(CONN), &mut fx);
        assert_eq!(drain(&mut fx).0.len(), 1);
        social.on_heartbeat(None, None, CONN, &mut fx);
        assert!(drain(&mut fx).0.is_empty(), "one round is not yet a loss");
        social.on_heartbeat(None, None, CONN, &mut fx);
        let (frames, _) = drain(&mut fx);
        assert_eq!(frames.len(), 1, "sent again");
        assert_eq!(frames[0].routing.seq, id);
        social.on_contacts(id, Contacts::default(), &mut fx);
        let (_, events) = drain(&mut fx);
        assert!(matches!(events[..], [NodeEvent::Contacts { request: Some(r), .. }] if r == id));
        assert_eq!(social.pending(), 0);

        social.watch(vec![u(2), u(3)], Some(CONN), &mut fx);
        let (frames, _) = drain(&mut fx);
        let request = frames[0].routing.seq;
        let report = error(ErrorCode::WatchlistTooLong);
        assert!(social.on_error(crate::time::Instant(0), request, &report, &mut fx));
        assert!(social.watchlist().is_empty());
        for _ in 0..4 {
            social.on_heartbeat(None, None, CONN, &mut fx);
        }
        assert!(
            drain(&mut fx).0.is_empty(),
            "a list the gateway refused for its length is not sent again"
        );
    }

    #[test]
    fn a_new_session_asks_for_the_listing_changed_while_the_device_was_away() {
        let mut social = NodeSocial::default();
        let mut fx = NodeFx::default();
        social.session_opened(CONN, &mut fx);
        assert!(
            drain(&mut fx).0.is_empty(),
            "a device that never held a listing asks for none"
        );
        let id = social.fetch(Some(CONN), &mut fx);
        drain(&mut fx);
        social.on_contacts(id, Contacts::default(), &mut fx);
        drain(&mut fx);
        // Away and back: the listing may have changed meanwhile.
        social.session_opened(CONN, &mut fx);
        let (frames, _) = drain(&mut fx);
        assert!(
            matches!(&frames[..], [f] if matches!(f.payload, Payload::ContactsFetch(_))),
            "{frames:?}"
        );
        // A change in flight brings a listing: no fetch beside it.
        let mut social = NodeSocial::default();
        let id = social.fetch(Some(CONN), &mut fx);
        social.on_contacts(id, Contacts::default(), &mut fx);
        social.change(u(3), None, ContactAction::Add, None, &mut fx);
        drain(&mut fx);
        social.session_opened(CONN, &mut fx);
        let (frames, _) = drain(&mut fx);
        assert!(
            matches!(&frames[..], [f] if matches!(f.payload, Payload::ContactChange(_))),
            "{frames:?}"
        );
    }

    #[test]
    fn a_listing_lost_in_a_session_is_asked_for_when_two_heartbeats_say_it_changed() {
        let mut social = NodeSocial::default();
        let mut fx = NodeFx::default();
        let id = social.fetch(Some(CONN), &mut fx);
        let before = Contacts::default();
        social.on_contacts(id, before.clone(), &mut fx);
        drain(&mut fx);
        // The same listing: nothing to ask.
        for _ in 0..3 {
            social.on_heartbeat(None, Some(before.digest()), CONN, &mut fx);
        }
        assert!(drain(&mut fx).0.is_empty());
        // A push was lost: the first heartbeat may have overtaken it, the second asks.
        let after = Contacts {
            incoming: vec![u(7).to_bytes().into()],
            ..Contacts::default()
        };
        social.on_heartbeat(None, Some(after.digest()), CONN, &mut fx);
        assert!(
            drain(&mut fx).0.is_empty(),
            "one heartbeat may have overtaken it"
        );
        social.on_heartbeat(None, Some(after.digest()), CONN, &mut fx);
        let (frames, _) = drain(&mut fx);
        assert!(
            matches!(&frames[..], [f] if matches!(f.payload, Payload::ContactsFetch(_))),
            "{frames:?}"
        );
        // Its answer settles it.
        social.on_contacts(frames[0].routing.seq, after.clone(), &mut fx);
        drain(&mut fx);
        for _ in 0..3 {
            social.on_heartbeat(None, Some(after.digest()), CONN, &mut fx);
        }
        assert!(drain(&mut fx).0.is_empty());
        // The request was withdrawn and its push lost: no digest now means an empty listing.
        social.on_heartbeat(None, None, CONN, &mut fx);
        social.on_heartbeat(None, None, CONN, &mut fx);
        let (frames, _) = drain(&mut fx);
        assert!(
            matches!(&frames[..], [f] if matches!(f.payload, Payload::ContactsFetch(_))),
            "{frames:?}"
        );
    }
}
