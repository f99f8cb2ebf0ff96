//! The `presence-privacy` invariant: no device learns the presence of a user it may not see.
//!
//! Checked from outside the gateway, on what crosses the wire:
//! - **The rule, kept apart.** The world keeps its own ledger of who added, blocked and hid
//!   from whom ([`Ledger`]), built from the contact requests the nodes send
//!   (`ContactChange`, `PresenceUpdate`), each applied when the gateway releases its answer
//!   (a `Contacts` naming the request, so after its commit). The ledger applies the rule as
//!   the issue states it, not the gateway's code: a watcher may see a user only if each added
//!   the other, the user is not invisible, and neither blocked the other.
//! - **Safety.** Every `PresenceNotify` the gateway releases is checked against the ledger at
//!   that moment: an entry other than `unknown` about a user the watcher may not see fails
//!   the run, and so does a value that is not one of the coarse buckets (the wire has no
//!   other resolution: this catches a change that adds one).
//! - **Across domains.** The target's gateway decides what a watcher of another domain may
//!   see, and tells the watcher's gateway over the link. Each state it tells is checked against
//!   the ledger when the batch that made it is durable and released (read from the batch's
//!   writes to the link outbox, never from the gateway's memory). Each gateway decides its own
//!   user's part of the rule, and learns the other's over the link, late by the link's delay.
//!   So the target's gateway is held to its user's part: anything but `unknown` requires the
//!   target to add the watcher, be visible and not block them; `asking` fails (only a
//!   watcher's gateway says that, of another domain's user). The watcher's gateway is held
//!   to the watcher's part when it tells its devices (the watcher adds the target and does
//!   not block them), and to what it heard: a state other than `unknown` or `asking` must be
//!   one the target's gateway told for that watcher. A block made while a state was on its way
//!   is the link's delay, not a leak.
//! - **Liveness.** After heal, each node's view of every user on its watchlist is what the
//!   rule allows: `online` for users it may see (every device is up by then), `unknown` for
//!   the rest, whatever their domain (never still `asking`).
//!
//! The report counts what was told (`presence-told`, `presence-hidden`, and
//! `presence-told-abroad` for states told over links) and the refusals (`contact-refused`), so
//! a scrape scenario shows its bots were refused.

use std::collections::{BTreeMap, BTreeSet};

use sund_model::env::{WriteBatch, WriteOp};
use sund_model::federation::entry::Entry;
use sund_model::federation::link::FEDERATION_OUTBOX_TABLE;
use sund_model::ids::UserId;
use sund_model::node::social::NodeSocial;
use sund_model::wire::payload::{ContactAction, Seen};
use sund_model::wire::{Frame, Opcode, Payload, PAYLOAD_BYTES_MAX};

use super::{Machine, World};
use crate::network::ActorIndex;
use crate::scenario::Invariant;

/// Who added, blocked and hid from whom, as the gateway answered it.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    added: BTreeSet<(UserId, UserId)>,
    blocked: BTreeSet<(UserId, UserId)>,
    invisible: BTreeSet<UserId>,
}

/// A change a node asked for, waiting for the gateway's answer.
#[derive(Clone, Copy, Debug)]
enum Asked {
    Contact(UserId, ContactAction),
    Invisible(bool),
}

impl Ledger {
    fn apply(&mut self, user: UserId, asked: Asked) {
        match asked {
            Asked::Contact(other, ContactAction::Add) => {
                self.added.insert((user, other));
                self.blocked.remove(&(user, other));
            }
            Asked::Contact(other, ContactAction::Remove) => {
                self.added.remove(&(user, other));
            }
            Asked::Contact(other, ContactAction::Block) => {
                self.blocked.insert((user, other));
                self.added.remove(&(user, other));
            }
            Asked::Contact(other, ContactAction::Unblock) => {
                self.blocked.remove(&(user, other));
            }
            Asked::Invisible(true) => {
                self.invisible.insert(user);
            }
            Asked::Invisible(false) => {
                self.invisible.remove(&user);
            }
        }
    }

    /// `user`'s relations as a gateway should list them.
    fn listing(&self, user: UserId) -> Listing {
        let from = |pairs: &BTreeSet<(UserId, UserId)>| -> BTreeSet<UserId> {
            pairs
                .iter()
                .filter(|(a, _)| *a == user)
                .map(|(_, b)| *b)
                .collect()
        };
        let mine = from(&self.added);
        let blocked = from(&self.blocked);
        let by: BTreeSet<UserId> = self
            .added
            .iter()
            .filter(|(_, b)| *b == user)
            .map(|(a, _)| *a)
            .collect();
        Listing {
            contacts: mine.intersection(&by).copied().collect(),
            incoming: by
                .iter()
                .filter(|o| !mine.contains(o) && !blocked.contains(o))
                .copied()
                .collect(),
            outgoing: mine.difference(&by).copied().collect(),
            blocked,
            invisible: self.invisible.contains(&user),
        }
    }

    /// True if `watcher` adds `target` and does not block them: the part of the rule the
    /// watcher's own gateway decides.
    fn watcher_allows(&self, watcher: UserId, target: UserId) -> bool {
        self.added.contains(&(watcher, target)) && !self.blocked.contains(&(watcher, target))
    }

    /// True if `target` adds `watcher`, is visible and does not block them: the part of the
    /// rule the target's gateway decides.
    fn target_allows(&self, watcher: UserId, target: UserId) -> bool {
        watcher != target
            && self.added.contains(&(target, watcher))
            && !self.invisible.contains(&target)
            && !self.blocked.contains(&(target, watcher))
    }

    /// True if `a` blocks `b`.
    fn blocks(&self, a: UserId, b: UserId) -> bool {
        self.blocked.contains(&(a, b))
    }

    /// The rule: contacts both ways, visible, no block either way.
    pub(super) fn may_see(&self, watcher: UserId, target: UserId) -> bool {
        watcher != target
            && self.added.contains(&(watcher, target))
            && self.added.contains(&(target, watcher))
            && !self.invisible.contains(&target)
            && !self.blocked.contains(&(watcher, target))
            && !self.blocked.contains(&(target, watcher))
    }
}

/// One user's relations as a listing shows them, compared as sets.
#[derive(Debug, PartialEq, Eq)]
struct Listing {
    contacts: BTreeSet<UserId>,
    /// Users who asked and were not added back (blocked users' left out).
    incoming: BTreeSet<UserId>,
    /// Users asked who have not added back.
    outgoing: BTreeSet<UserId>,
    blocked: BTreeSet<UserId>,
    invisible: bool,
}

impl Listing {
    fn of(
        contacts: &[UserId],
        incoming: &[UserId],
        outgoing: &[UserId],
        blocked: &[UserId],
        invisible: bool,
    ) -> Listing {
        let set = |v: &[UserId]| v.iter().copied().collect();
        Listing {
            contacts: set(contacts),
            incoming: set(incoming),
            outgoing: set(outgoing),
            blocked: set(blocked),
            invisible,
        }
    }
}

/// What the world watches for `presence-privacy`.
#[derive(Debug, Default)]
pub(super) struct PresenceWatch {
    ledger: Ledger,
    /// Requests sent and not answered, by (connection, request id), with the device that
    /// sent each: an answer released after its connection closed (the gateway's commit
    /// outlasted it) still applies, though nobody hears it.
    asked: BTreeMap<(u64, u64), (ActorIndex, Asked)>,
    /// Every (watcher, target, state) a target's gateway told another domain's, after its
    /// check.
    told_abroad: BTreeSet<(UserId, UserId, Seen)>,
    /// The scenario changes contacts: the ledger is kept whatever is checked, for the world's
    /// own use (a creator leaves out who blocked them).
    contacts: bool,
}

impl PresenceWatch {
    /// Watches a scenario that changes contacts (`contacts`) or not.
    pub(super) fn new(contacts: bool) -> PresenceWatch {
        PresenceWatch {
            contacts,
            ..PresenceWatch::default()
        }
    }
}

/// The presence states a gateway's batch tells other domains' gateways: (watcher, target,
/// state) in each entry it writes to a link outbox.
pub(super) fn told_abroad(writes: &WriteBatch) -> Vec<(UserId, UserId, Seen)> {
    let mut told = Vec::new();
    for op in writes.ops() {
        let WriteOp::Put { table, value, .. } = op else {
            continue;
        };
        if *table != FEDERATION_OUTBOX_TABLE {
            continue;
        }
        let Ok(entry) = Entry::decode(value) else {
            continue;
        };
        for entry in entry.into_entries() {
            if let Entry::PresenceState {
                watcher,
                target,
                seen,
            } = entry
            {
                told.push((watcher, target, seen));
            }
        }
    }
    told
}

fn opcode(frame: &[u8]) -> Option<u16> {
    (frame.len() >= 8).then(|| u16::from_be_bytes([frame[6], frame[7]]))
}

impl World {
    /// The user a device's sessions are bound to (its certificate's user).
    pub(super) fn user_id_of(&self, device: ActorIndex) -> Option<UserId> {
        match &self.actors[device as usize].machine {
            Machine::Node(_, config) => Some(config.certificate_user()),
            Machine::Gateway(..) => None,
        }
    }

    /// True if `presence-privacy` is checked.
    pub(super) fn checks_presence(&self) -> bool {
        self.scenario
            .invariants
            .contains(&Invariant::PresencePrivacy)
    }

    /// The domain of the gateway serving `user`'s devices (`None` if it has none, or its
    /// gateway does not federate).
    fn domain_of_user(&self, user: UserId) -> Option<String> {
        let device = self
            .devices
            .iter()
            .find(|&&d| self.user_id_of(d) == Some(user))?;
        self.federation.domain(self.actors[*device as usize].home)
    }

    /// `gateway` made durable a batch telling other domains' gateways `told`: each state is
    /// one the ledger allows now, its answers in the batch released.
    pub(super) fn check_told_abroad(
        &mut self,
        gateway: ActorIndex,
        told: Vec<(UserId, UserId, Seen)>,
    ) {
        for (watcher, target, seen) in told {
            *self.faults.entry("presence-told-abroad").or_default() += 1;
            let allowed = match seen {
                Seen::Unknown => true,
                Seen::Asking => false,
                _ => self.presence_watch.ledger.target_allows(watcher, target),
            };
            if !allowed {
                let detail = format!(
                    "{} told another domain's gateway that {} may see {} as {}, which its own user does not allow (no add of the watcher, invisible, or a block) or only a watcher's gateway says",
                    self.actors[gateway as usize].name,
                    self.name_of_user(watcher),
                    self.name_of_user(target),
                    seen.describe()
                );
                self.checker
                    .fail_safety(Invariant::PresencePrivacy, self.now, detail);
            }
            self.presence_watch
                .told_abroad
                .insert((watcher, target, seen));
        }
    }

    /// True if an invariant needs the ledger of contact changes.
    fn keeps_ledger(&self) -> bool {
        let wanted = &self.scenario.invariants;
        self.presence_watch.contacts
            || wanted.contains(&Invariant::PresencePrivacy)
            || wanted.contains(&Invariant::ContactsConverge)
    }

    /// True if `blocker` blocks `blocked`, as the gateway answered it (known only in scenarios
    /// that change contacts).
    pub(super) fn blocks_known(&self, blocker: UserId, blocked: UserId) -> bool {
        self.presence_watch.ledger.blocks(blocker, blocked)
    }

    /// A user as the scenario names it: its first device's name without the device number.
    pub(super) fn name_of_user(&self, user: UserId) -> String {
        self.devices
            .iter()
            .find(|&&d| self.user_id_of(d) == Some(user))
            .map_or_else(
                || user.to_string(),
                |&d| {
                    let name = &self.actors[d as usize].name;
                    name.split('/').next().unwrap_or(name).to_string()
                },
            )
    }

    /// A node sent `frame` on `conn`: remember a contact or visibility change until it is
    /// answered.
    pub(super) fn note_social_request(&mut self, device: ActorIndex, conn: u64, frame: &[u8]) {
        if !self.keeps_ledger() {
            return;
        }
        let op = opcode(frame);
        if op != Some(Opcode::ContactChange.to_u16()) && op != Some(Opcode::PresenceUpdate.to_u16())
        {
            return;
        }
        let Ok(frame) = Frame::decode(frame, PAYLOAD_BYTES_MAX) else {
            return;
        };
        let asked = match frame.payload {
            Payload::ContactChange(change) => match ContactAction::from_u8(change.action) {
                Some(action) => Asked::Contact(UserId::from_bytes(*change.user), action),
                None => return,
            },
            Payload::PresenceUpdate(update) => Asked::Invisible(update.invisible),
            _ => return,
        };
        self.presence_watch
            .asked
            .insert((conn, frame.routing.seq), (device, asked));
    }

    /// The gateway released `frame` to `conn`: apply an answered change, check a presence
    /// notification against the ledger.
    pub(super) fn check_presence(&mut self, gateway: ActorIndex, conn: u64, frame: &[u8]) {
        if !self.keeps_ledger() {
            return;
        }
        let op = opcode(frame);
        let contacts = op == Some(Opcode::Contacts.to_u16());
        let notify = op == Some(Opcode::PresenceNotify.to_u16())
            && self
                .scenario
                .invariants
                .contains(&Invariant::PresencePrivacy);
        let error = op == Some(Opcode::Error.to_u16());
        if !(contacts || notify || error) {
            return;
        }
        let Ok(frame) = Frame::decode(frame, PAYLOAD_BYTES_MAX) else {
            return;
        };
        match frame.payload {
            Payload::Contacts(_) => {
                // The answer applies even if its connection closed meanwhile: the gateway
                // committed the change before releasing it.
                if let Some((device, asked)) =
                    self.presence_watch.asked.remove(&(conn, frame.routing.seq))
                {
                    if let Some(user) = self.user_id_of(device) {
                        self.presence_watch.ledger.apply(user, asked);
                    }
                }
            }
            Payload::Error(_) if NodeSocial::owns(frame.routing.seq) => {
                self.presence_watch.asked.remove(&(conn, frame.routing.seq));
                *self.faults.entry("contact-refused").or_default() += 1;
            }
            Payload::PresenceNotify(notify) => {
                let Some(device) = self.network.peer_of(conn, gateway) else {
                    return; // a closed connection: nobody hears it
                };
                let Some(watcher) = self.user_id_of(device) else {
                    return;
                };
                for entry in notify.entries {
                    let target = UserId::from_bytes(*entry.user);
                    let seen = Seen::from_u8(entry.seen);
                    let name = &self.actors[device as usize].name;
                    if seen as u8 != entry.seen {
                        let detail = format!(
                            "{name} was told presence value {} of {target}: not one of the coarse buckets",
                            entry.seen
                        );
                        self.checker
                            .fail_safety(Invariant::PresencePrivacy, self.now, detail);
                    }
                    if seen == Seen::Unknown {
                        *self.faults.entry("presence-hidden").or_default() += 1;
                        continue;
                    }
                    *self.faults.entry("presence-told").or_default() += 1;
                    let here = self.federation.domain(gateway);
                    let abroad = self.domain_of_user(target) != here;
                    let why = if abroad {
                        let told = self
                            .presence_watch
                            .told_abroad
                            .contains(&(watcher, target, seen));
                        let allows = self.presence_watch.ledger.watcher_allows(watcher, target);
                        if !allows {
                            Some("although it does not add them, or blocks them")
                        } else if seen != Seen::Asking && !told {
                            Some("which their gateway never told for it")
                        } else {
                            None
                        }
                    } else if seen == Seen::Asking {
                        Some("a state only told of another domain's users")
                    } else if !self.presence_watch.ledger.may_see(watcher, target) {
                        Some("although it may not see them (not mutual contacts, invisible, or blocked)")
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        let detail =
                            format!("{name} was told {target} is {} {why}", seen.describe());
                        self.checker
                            .fail_safety(Invariant::PresencePrivacy, self.now, detail);
                    }
                }
            }
            _ => {}
        }
    }

    /// After heal: why some gateway's listing of one of its users differs from what the
    /// answered changes of every domain's devices make (`contacts-converge`).
    pub(super) fn contacts_not_converged(&self) -> Option<String> {
        if !self
            .scenario
            .invariants
            .contains(&Invariant::ContactsConverge)
        {
            return None;
        }
        fn ids<T: core::ops::Deref<Target = [u8; 16]>>(list: &[T]) -> Vec<UserId> {
            list.iter().map(|u| UserId::from_bytes(**u)).collect()
        }
        let mut users: BTreeSet<(ActorIndex, UserId)> = BTreeSet::new();
        for &d in &self.devices {
            if let Some(user) = self.user_id_of(d) {
                users.insert((self.actors[d as usize].home, user));
            }
        }
        for (gateway, user) in users {
            let Machine::Gateway(Some(g), _) = &self.actors[gateway as usize].machine else {
                continue; // down at the end: the connection check reports it
            };
            let listing = g.social().listing(user);
            let held = Listing::of(
                &ids(&listing.contacts),
                &ids(&listing.incoming),
                &ids(&listing.outgoing),
                &ids(&listing.blocked),
                listing.invisible,
            );
            // Each of the user's devices in session that holds a listing holds this one: a
            // change was pushed to those in session, and one back from away asks again.
            for &d in &self.devices {
                if self.actors[d as usize].home != gateway || self.user_id_of(d) != Some(user) {
                    continue;
                }
                let Machine::Node(Some(node), _) = &self.actors[d as usize].machine else {
                    continue;
                };
                let (Some(list), true) = (node.social().contacts(), node.is_connected()) else {
                    continue; // none held, or not connected (the connection check reports it)
                };
                let shown = Listing::of(
                    &list.contacts,
                    &list.incoming,
                    &list.outgoing,
                    &list.blocked,
                    list.invisible,
                );
                if shown != held {
                    return Some(format!(
                        "{} shows {}'s relations as {}, where {} lists {}",
                        self.actors[d as usize].name,
                        self.name_of_user(user),
                        self.describe_listing(&shown),
                        self.actors[gateway as usize].name,
                        self.describe_listing(&held),
                    ));
                }
            }
            let expected = self.presence_watch.ledger.listing(user);
            if held != expected {
                return Some(format!(
                    "{} lists {} with {}; the answered changes make {}",
                    self.actors[gateway as usize].name,
                    self.name_of_user(user),
                    self.describe_listing(&held),
                    self.describe_listing(&expected),
                ));
            }
        }
        None
    }

    /// A listing in the scenario's names, for a failure's words.
    fn describe_listing(&self, listing: &Listing) -> String {
        let names = |set: &BTreeSet<UserId>| -> Vec<String> {
            set.iter().map(|u| self.name_of_user(*u)).collect()
        };
        format!(
            "contacts {:?}, asked by {:?}, asking {:?}, blocked {:?}, invisible {}",
            names(&listing.contacts),
            names(&listing.incoming),
            names(&listing.outgoing),
            names(&listing.blocked),
            listing.invisible
        )
    }

    /// After heal: why some node's view of a watched user is not what the rule allows.
    pub(super) fn presence_not_converged(&self) -> Option<String> {
        if !self
            .scenario
            .invariants
            .contains(&Invariant::PresencePrivacy)
        {
            return None;
        }
        // Each user's devices, found once (the watchlists below name thousands of users).
        let mut devices_of: BTreeMap<UserId, Vec<ActorIndex>> = BTreeMap::new();
        for &t in &self.devices {
            if let Some(user) = self.user_id_of(t) {
                devices_of.entry(user).or_default().push(t);
            }
        }
        for &d in &self.devices {
            let Machine::Node(Some(node), _) = &self.actors[d as usize].machine else {
                continue;
            };
            if !node.is_connected() {
                continue; // the connection check reports it
            }
            let watcher = node.user();
            for &target in node.social().watchlist() {
                let target_devices: &[ActorIndex] =
                    devices_of.get(&target).map_or(&[], Vec::as_slice);
                let target_online = target_devices.iter().any(|&t| {
                    matches!(&self.actors[t as usize].machine, Machine::Node(Some(n), _) if n.is_connected())
                });
                let expected = if !self.presence_watch.ledger.may_see(watcher, target) {
                    Seen::Unknown
                } else if target_online {
                    Seen::Online
                } else {
                    continue; // the connection check reports it
                };
                let seen = node.social().seen(target);
                if seen != expected {
                    let name = target_devices
                        .first()
                        .map_or("?", |&t| self.actors[t as usize].name.as_str());
                    return Some(format!(
                        "{} sees {target} ({name}) as {}, expected {}",
                        self.actors[d as usize].name,
                        seen.describe(),
                        expected.describe()
                    ));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(n: u8) -> UserId {
        UserId::from_bytes([n; 16])
    }

    #[test]
    fn the_ledger_sees_only_visible_mutual_contacts_without_blocks() {
        let mut l = Ledger::default();
        l.apply(u(1), Asked::Contact(u(2), ContactAction::Add));
        assert!(!l.may_see(u(1), u(2)));
        l.apply(u(2), Asked::Contact(u(1), ContactAction::Add));
        assert!(l.may_see(u(1), u(2)) && l.may_see(u(2), u(1)));
        l.apply(u(2), Asked::Invisible(true));
        assert!(!l.may_see(u(1), u(2)) && l.may_see(u(2), u(1)));
        l.apply(u(2), Asked::Invisible(false));
        l.apply(u(1), Asked::Contact(u(2), ContactAction::Block));
        assert!(!l.may_see(u(1), u(2)) && !l.may_see(u(2), u(1)));
        l.apply(u(1), Asked::Contact(u(2), ContactAction::Unblock));
        assert!(!l.may_see(u(2), u(1)), "the block ended the contact");
    }
}
