//! Contacts, blocks and invisibility: who may learn whose presence and reach whom.
//!
//! Per user, the gateway holds the users it *added* (asked to be contacts, or accepted), the
//! users it *blocked*, and whether it is *invisible*. Two users are contacts when each added
//! the other; a request is an add not yet returned. Nothing else: the names people give each
//! other, and the fingerprints they verified, stay on their devices.
//!
//! What this allows ([`Social::may_see`]): a watcher learns a user's presence only if they are
//! contacts, the user is not invisible, and neither blocked the other. A blocked user's
//! requests are not shown to the one who blocked them, and a user's KeyPackages are not
//! handed to anyone they blocked (so nobody can start a DM with, or add to a room, a user who
//! blocked them). A block also ends the contact on the blocker's side.
//!
//! **Across domains.** Each gateway holds its own users' relations, and a mirror of what users
//! of peer domains told about this gateway's users: when a user adds or stops adding someone
//! of another domain, its gateway tells that domain's gateway
//! ([`crate::federation::entry::Entry::Contact`]), which records it as the foreign user's add
//! (their record names their domain, [`Social::domain_of`]). Mutuality, requests and what a
//! block hides then follow from the same records as at home. A block is told too
//! ([`crate::federation::entry::Entry::Block`]) so that the blocked user's gateway enforces
//! it (no invitation from the blocked user passes its authority); its listings never show it
//! to the blocked user, who sees only that the add is gone.
//!
//! Durable: one record per user in [`SOCIAL_TABLE`], rewritten whole on each change (at most
//! `contacts_max` entries, so a record stays a few tens of KiB).

use std::collections::{BTreeMap, BTreeSet};

use minicbor::bytes::ByteArray;
use minicbor::{Decode, Encode};

use super::refusal::Refusal;
use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::ids::UserId;
use crate::wire::payload::{ContactAction, Contacts, ErrorCode, CONTACTS_LEN_MAX};

/// Table of users' relations: user id → [`SocialRecord`].
pub const SOCIAL_TABLE: Table = Table("social");

/// The most users of one peer domain whose adds this gateway mirrors: what a peer tells can
/// name users this gateway never met (their requests wait here until the user's first device
/// comes), so this bounds what a hostile peer can make it store.
pub const FOREIGN_USERS_PER_PEER_MAX: usize = 100_000;

/// One user's relations as stored.
#[derive(Encode, Decode, Clone, Debug, Default, PartialEq, Eq)]
#[cbor(map)]
struct SocialRecord {
    #[n(0)]
    added: Vec<ByteArray<16>>,
    #[n(1)]
    blocked: Vec<ByteArray<16>>,
    #[n(2)]
    invisible: bool,
    /// A user of another domain: that domain (its `added` mirrors what its gateway told).
    #[n(3)]
    domain: Option<String>,
}

/// One user's relations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Relations {
    added: BTreeSet<UserId>,
    blocked: BTreeSet<UserId>,
    invisible: bool,
    /// `Some` for a user of another domain (see the module docs).
    domain: Option<String>,
}

impl Relations {
    fn len(&self) -> usize {
        self.added.len() + self.blocked.len()
    }

    fn record(&self) -> SocialRecord {
        let ids =
            |set: &BTreeSet<UserId>| set.iter().map(|u| ByteArray::from(u.to_bytes())).collect();
        SocialRecord {
            added: ids(&self.added),
            blocked: ids(&self.blocked),
            invisible: self.invisible,
            domain: self.domain.clone(),
        }
    }
}

/// Counters for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SocialStats {
    /// Contact requests taken (adds of someone not added before).
    pub requests: u64,
    /// Blocks taken.
    pub blocks: u64,
    /// Changes refused because a user's list was full.
    pub lists_full: u64,
    /// Adds and removes told to other domains' gateways.
    pub told_abroad: u64,
    /// Adds and removes other domains' gateways told, taken.
    pub taken_from_abroad: u64,
    /// Told from abroad and dropped: about a user this gateway does not hold, by a user of
    /// this domain or known at another, or past the foreign user's request rate.
    pub dropped_from_abroad: u64,
}

/// What a change did, for the router to tell the users concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Changed {
    /// The relation between the two users changed (not a repeat).
    pub changed: bool,
    /// An add of someone not added before: charge it as a contact request.
    pub new_request: bool,
}

/// The users' relations (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct Social {
    users: BTreeMap<UserId, Relations>,
    /// Reverse index: who added each user.
    added_by: BTreeMap<UserId, BTreeSet<UserId>>,
    /// How many users of each other domain are held (see [`FOREIGN_USERS_PER_PEER_MAX`]).
    foreign_users: BTreeMap<String, usize>,
    stats: SocialStats,
    /// Planted by the simulator only ([`crate::planted::PlantedBug::PresenceIgnoresInvisible`]).
    ignores_invisible: bool,
}

impl Social {
    /// Reads every user's relations back.
    pub fn recover(store: &dyn StoreRead) -> Result<Social, StoreError> {
        let mut social = Social::default();
        scan_all(store, SOCIAL_TABLE, |key, value| {
            let user: [u8; 16] = key.try_into().map_err(|_| StoreError::Corrupt {
                table: SOCIAL_TABLE.0,
                reason: "a social key is not a user id".into(),
            })?;
            let record = decode_record(value)?;
            let user = UserId::from_bytes(user);
            let relations = Relations {
                added: record
                    .added
                    .iter()
                    .map(|u| UserId::from_bytes(**u))
                    .collect(),
                blocked: record
                    .blocked
                    .iter()
                    .map(|u| UserId::from_bytes(**u))
                    .collect(),
                invisible: record.invisible,
                domain: record.domain,
            };
            for other in &relations.added {
                social.added_by.entry(*other).or_default().insert(user);
            }
            if let Some(domain) = &relations.domain {
                *social.foreign_users.entry(domain.clone()).or_default() += 1;
            }
            social.users.insert(user, relations);
            Ok(())
        })?;
        Ok(social)
    }

    /// True if each of `a` and `b` added the other.
    pub fn mutual(&self, a: UserId, b: UserId) -> bool {
        self.added(a, b) && self.added(b, a)
    }

    /// Plants the bug that forgets invisibility (the simulator's planted bugs; never in a real
    /// gateway).
    pub fn plant_ignores_invisible(&mut self) {
        self.ignores_invisible = true;
    }

    /// True if `user` has at least one contact (someone who may ever see its presence).
    pub fn has_contacts(&self, user: UserId) -> bool {
        let (Some(mine), Some(by)) = (self.users.get(&user), self.added_by.get(&user)) else {
            return false;
        };
        mine.added.iter().any(|o| by.contains(o))
    }

    /// True if `a` added `b`.
    pub fn added(&self, a: UserId, b: UserId) -> bool {
        self.users.get(&a).is_some_and(|r| r.added.contains(&b))
    }

    /// True if `a` blocked `b`.
    pub fn blocked(&self, a: UserId, b: UserId) -> bool {
        self.users.get(&a).is_some_and(|r| r.blocked.contains(&b))
    }

    /// The domain of `user` if it is a user of another domain that this gateway knows of
    /// (asked by, or asked for, one of its users).
    pub fn domain_of(&self, user: UserId) -> Option<&str> {
        self.users.get(&user).and_then(|r| r.domain.as_deref())
    }

    /// Records that `user` is a user of `domain`, as a user of this gateway named them (the
    /// device computed the id from the whole address, so its word wins). If another domain
    /// had claimed them, what it told of their adds and blocks is dropped: a peer cannot
    /// speak for another domain's users. True if the record changed.
    pub fn note_domain(&mut self, user: UserId, domain: &str, writes: &mut WriteBatch) -> bool {
        let relations = self.users.entry(user).or_default();
        if relations.domain.as_deref() == Some(domain) {
            return false;
        }
        let claimed = core::mem::take(&mut relations.added);
        relations.blocked.clear();
        if let Some(before) = relations.domain.replace(domain.to_string()) {
            if let Some(count) = self.foreign_users.get_mut(&before) {
                *count -= 1;
            }
        }
        *self.foreign_users.entry(domain.to_string()).or_default() += 1;
        writes.put(SOCIAL_TABLE, user.to_bytes().to_vec(), encode(relations));
        for other in claimed {
            if let Some(by) = self.added_by.get_mut(&other) {
                by.remove(&user);
                if by.is_empty() {
                    self.added_by.remove(&other);
                }
            }
        }
        true
    }

    /// How many users of `domain` this gateway holds.
    pub fn foreign_users(&self, domain: &str) -> usize {
        self.foreign_users.get(domain).copied().unwrap_or(0)
    }

    /// True if `user` has any relation held here (a listing with anything in it).
    pub fn has_relations(&self, user: UserId) -> bool {
        self.users.contains_key(&user) || self.added_by.contains_key(&user)
    }

    /// True if `user` is invisible.
    pub fn invisible(&self, user: UserId) -> bool {
        self.users.get(&user).is_some_and(|r| r.invisible)
    }

    /// Whether `watcher` may learn the presence of `target`: contacts, `target` visible, and
    /// no block either way.
    pub fn may_see(&self, watcher: UserId, target: UserId) -> bool {
        watcher != target
            && self.mutual(watcher, target)
            && (!self.invisible(target) || self.ignores_invisible)
            && !self.blocked(target, watcher)
            && !self.blocked(watcher, target)
    }

    /// Counts an add or remove told to another domain's gateway.
    pub fn count_told_abroad(&mut self) {
        self.stats.told_abroad += 1;
    }

    /// Counts an add or remove another domain's gateway told, taken.
    pub fn count_taken_from_abroad(&mut self) {
        self.stats.taken_from_abroad += 1;
    }

    /// Counts an add or remove another domain's gateway told, dropped.
    pub fn count_dropped_from_abroad(&mut self) {
        self.stats.dropped_from_abroad += 1;
    }

    /// The counters.
    pub fn stats(&self) -> &SocialStats {
        &self.stats
    }

    /// Users with any relation held here.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Whether an `action` by `user` on `other` would be a new contact request (to charge it
    /// before it is taken).
    pub fn is_new_request(&self, user: UserId, other: UserId, action: ContactAction) -> bool {
        action == ContactAction::Add && !self.added(user, other)
    }

    /// Takes `user`'s `action` on `other`; the record is rewritten in `writes`.
    pub fn change(
        &mut self,
        user: UserId,
        other: UserId,
        action: ContactAction,
        contacts_max: usize,
        writes: &mut WriteBatch,
    ) -> Result<Changed, Refusal> {
        if user == other {
            return Err(Refusal::error(
                ErrorCode::Forbidden,
                "that is this device's own user",
            ));
        }
        let relations = self.users.entry(user).or_default();
        let before = relations.clone();
        let grows = match action {
            ContactAction::Add => !relations.added.contains(&other),
            ContactAction::Block => !relations.blocked.contains(&other),
            ContactAction::Remove | ContactAction::Unblock => false,
        };
        if grows && relations.len() >= contacts_max {
            self.stats.lists_full += 1;
            return Err(Refusal::error(
                ErrorCode::ContactListFull,
                format!(
                    "this user's contacts, requests and blocks number {contacts_max}, the most this gateway keeps; remove someone first"
                ),
            ));
        }
        let new_request = action == ContactAction::Add && grows;
        match action {
            ContactAction::Add => {
                relations.added.insert(other);
                // Adding someone lifts a block on them: the two are exclusive.
                relations.blocked.remove(&other);
            }
            ContactAction::Remove => {
                relations.added.remove(&other);
            }
            ContactAction::Block => {
                relations.blocked.insert(other);
                relations.added.remove(&other);
            }
            ContactAction::Unblock => {
                relations.blocked.remove(&other);
            }
        }
        let changed = *relations != before;
        if changed {
            writes.put(SOCIAL_TABLE, user.to_bytes().to_vec(), encode(relations));
            if relations.added.contains(&other) {
                self.added_by.entry(other).or_default().insert(user);
            } else if let Some(by) = self.added_by.get_mut(&other) {
                by.remove(&user);
                if by.is_empty() {
                    self.added_by.remove(&other);
                }
            }
            if new_request {
                self.stats.requests += 1;
            }
            if action == ContactAction::Block {
                self.stats.blocks += 1;
            }
        }
        Ok(Changed {
            changed,
            new_request,
        })
    }

    /// Makes `user` invisible or visible; true if that changed it.
    pub fn set_invisible(
        &mut self,
        user: UserId,
        invisible: bool,
        writes: &mut WriteBatch,
    ) -> bool {
        let relations = self.users.entry(user).or_default();
        if relations.invisible == invisible {
            return false;
        }
        relations.invisible = invisible;
        writes.put(SOCIAL_TABLE, user.to_bytes().to_vec(), encode(relations));
        true
    }

    /// `user`'s relations as the wire lists them. Each list is cut at the wire's maximum:
    /// requests come from others, and thousands of bots asking one user must not make a
    /// listing that user's devices refuse to decode (the oldest ids in id order are kept;
    /// a user's own lists are below `contacts_max` anyway).
    pub fn listing(&self, user: UserId) -> Contacts {
        let ids = |it: &mut dyn Iterator<Item = UserId>| -> Vec<ByteArray<16>> {
            it.take(CONTACTS_LEN_MAX)
                .map(|u| ByteArray::from(u.to_bytes()))
                .collect()
        };
        let empty = Relations::default();
        let mine = self.users.get(&user).unwrap_or(&empty);
        let no_one = BTreeSet::new();
        let by = self.added_by.get(&user).unwrap_or(&no_one);
        Contacts {
            contacts: ids(&mut mine.added.iter().copied().filter(|o| by.contains(o))),
            incoming: ids(&mut by
                .iter()
                .copied()
                .filter(|o| !mine.added.contains(o) && !mine.blocked.contains(o))),
            outgoing: ids(&mut mine.added.iter().copied().filter(|o| !by.contains(o))),
            blocked: ids(&mut mine.blocked.iter().copied()),
            invisible: mine.invisible,
        }
    }
}

fn decode_record(value: &[u8]) -> Result<SocialRecord, StoreError> {
    minicbor::decode(value).map_err(|e| StoreError::Corrupt {
        table: SOCIAL_TABLE.0,
        reason: format!("a social record does not decode: {e}"),
    })
}

fn encode(relations: &Relations) -> Vec<u8> {
    minicbor::to_vec(relations.record()).expect("encoding into a Vec cannot fail")
}

/// The users a stored [`SOCIAL_TABLE`] record says its user blocked: for an observer of the
/// store (the simulator's `blocks-hold` invariant judges a gateway by what it made durable).
pub fn blocked_in_record(value: &[u8]) -> Result<Vec<UserId>, StoreError> {
    Ok(decode_record(value)?
        .blocked
        .iter()
        .map(|u| UserId::from_bytes(**u))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{MemStore, Store};

    fn u(n: u8) -> UserId {
        UserId::from_bytes([n; 16])
    }

    fn ids(list: &[ByteArray<16>]) -> Vec<UserId> {
        list.iter().map(|b| UserId::from_bytes(**b)).collect()
    }

    #[test]
    fn a_stored_record_tells_whom_its_user_blocked() {
        let mut social = Social::default();
        let mut w = WriteBatch::default();
        social
            .change(u(1), u(2), ContactAction::Block, 10, &mut w)
            .unwrap();
        social
            .change(u(1), u(3), ContactAction::Add, 10, &mut w)
            .unwrap();
        let crate::env::WriteOp::Put { value, .. } = w.ops().last().expect("a record") else {
            panic!("a put");
        };
        assert_eq!(blocked_in_record(value).unwrap(), vec![u(2)]);
        assert!(blocked_in_record(&[0xff, 0x00]).is_err(), "not a record");
    }

    #[test]
    fn contacts_are_mutual_adds_and_blocks_hide_requests_and_presence() {
        let mut social = Social::default();
        let mut w = WriteBatch::default();
        let first = social
            .change(u(1), u(2), ContactAction::Add, 10, &mut w)
            .unwrap();
        assert!(first.new_request && first.changed);
        assert!(!social.may_see(u(1), u(2)) && !social.may_see(u(2), u(1)));
        assert_eq!(ids(&social.listing(u(2)).incoming), vec![u(1)]);
        assert_eq!(ids(&social.listing(u(1)).outgoing), vec![u(2)]);
        let again = social
            .change(u(1), u(2), ContactAction::Add, 10, &mut w)
            .unwrap();
        assert!(
            !again.new_request && !again.changed,
            "a repeat is no new request"
        );
        social
            .change(u(2), u(1), ContactAction::Add, 10, &mut w)
            .unwrap();
        assert!(social.may_see(u(1), u(2)) && social.may_see(u(2), u(1)));
        assert_eq!(ids(&social.listing(u(1)).contacts), vec![u(2)]);
        social.set_invisible(u(2), true, &mut w);
        assert!(!social.may_see(u(1), u(2)) && social.may_see(u(2), u(1)));
        social.set_invisible(u(2), false, &mut w);
        social
            .change(u(2), u(1), ContactAction::Block, 10, &mut w)
            .unwrap();
        assert!(!social.may_see(u(1), u(2)) && !social.may_see(u(2), u(1)));
        assert!(social.blocked(u(2), u(1)));
        assert!(
            social.listing(u(2)).incoming.is_empty(),
            "a blocked user's request is hidden"
        );
        social
            .change(u(2), u(1), ContactAction::Unblock, 10, &mut w)
            .unwrap();
        assert!(
            !social.mutual(u(1), u(2)),
            "unblocking does not make a contact again"
        );
        assert_eq!(ids(&social.listing(u(2)).incoming), vec![u(1)]);
        assert!(social
            .change(u(1), u(1), ContactAction::Add, 10, &mut w)
            .is_err());
    }

    #[test]
    fn a_full_list_refuses_growth_but_not_removal() {
        let mut social = Social::default();
        let mut w = WriteBatch::default();
        social
            .change(u(1), u(2), ContactAction::Add, 2, &mut w)
            .unwrap();
        social
            .change(u(1), u(3), ContactAction::Block, 2, &mut w)
            .unwrap();
        let full = social
            .change(u(1), u(4), ContactAction::Add, 2, &mut w)
            .unwrap_err();
        assert_eq!(full.code(), ErrorCode::ContactListFull);
        social
            .change(u(1), u(2), ContactAction::Remove, 2, &mut w)
            .unwrap();
        social
            .change(u(1), u(4), ContactAction::Add, 2, &mut w)
            .unwrap();
        assert_eq!(social.stats().lists_full, 1);
    }

    #[test]
    fn a_flood_of_requests_never_makes_a_listing_the_wire_refuses() {
        let mut social = Social::default();
        let mut w = WriteBatch::default();
        let victim = UserId::from_bytes([0xff; 16]);
        for n in 0..(CONTACTS_LEN_MAX as u32 + 10) {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&n.to_le_bytes());
            let bot = UserId::from_bytes(id);
            social
                .change(bot, victim, ContactAction::Add, 10, &mut w)
                .unwrap();
        }
        let listing = social.listing(victim);
        assert_eq!(listing.incoming.len(), CONTACTS_LEN_MAX);
        let frame = crate::wire::Frame::new(
            crate::wire::Routing::default(),
            crate::wire::Payload::Contacts(listing),
        )
        .encode();
        crate::wire::Frame::decode(&frame, crate::wire::PAYLOAD_BYTES_MAX)
            .expect("the victim's devices can read it");
    }

    #[test]
    fn relations_survive_a_restart() {
        let mut social = Social::default();
        let mut w = WriteBatch::default();
        social
            .change(u(1), u(2), ContactAction::Add, 10, &mut w)
            .unwrap();
        social
            .change(u(2), u(1), ContactAction::Add, 10, &mut w)
            .unwrap();
        social
            .change(u(3), u(1), ContactAction::Block, 10, &mut w)
            .unwrap();
        social.set_invisible(u(2), true, &mut w);
        let mut store = MemStore::default();
        store.commit(w).unwrap();
        let back = Social::recover(&store).unwrap();
        for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1)] {
            assert_eq!(back.mutual(u(a), u(b)), social.mutual(u(a), u(b)));
            assert_eq!(back.may_see(u(a), u(b)), social.may_see(u(a), u(b)));
            assert_eq!(back.listing(u(a)), social.listing(u(a)));
        }
        assert!(back.blocked(u(3), u(1)) && back.invisible(u(2)));
    }
}
