//! Conversations that span domains (issue 15, step 3): which conversations this gateway is
//! the authority of and which other domains have members in them, and which it keeps a
//! replica of for its own devices, and whose authority that is.
//!
//! One authority per conversation: its home gateway sequences every message. A member
//! gateway relays its devices' messages there ([`crate::federation::entry::Entry::Relay`]),
//! receives every sequenced message in order ([`crate::federation::entry::Entry::Sequenced`])
//! into a replica of the log, and serves its devices from it with the usual windows, cursors
//! and replay. This module only keeps the roles, durably; the gateway routes by them.

use std::collections::{BTreeMap, BTreeSet};

use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::ids::{ConversationId, DeviceId, MsgId};
use crate::time::Instant;

/// One row per conversation spanning domains: key conversation (16); value a kind byte and
/// the role (see `encode_role`). Kinds 0 and 1 are the first format's (a replica and a home
/// without a term), read as term 0; rows are written in kinds 2 to 4.
pub const SPANNING_TABLE: Table = Table("spanning_conversations");

/// What a conversation's authority knows of it beyond its log: the other domains' members.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Home {
    /// How many times the conversation's authority has moved (0 where it was first shared);
    /// a handover certificate of an earlier term is stale.
    pub term: u64,
    /// Each other domain's member devices; that domain's gateway keeps a replica for them.
    pub members: BTreeMap<String, BTreeSet<DeviceId>>,
    /// Domains whose gateway has not said where its replica ends since this gateway became
    /// the authority by a handover: nothing goes to them until it has.
    pub waiting: BTreeSet<String>,
}

/// This gateway's part in a conversation that spans domains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Homed here: this gateway sequences it.
    Authority(Home),
    /// Homed here until the gateway of `to` takes it over: frozen, nothing is sequenced (sends
    /// are answered `authority_moving`). If `to` declines, this gateway is the authority again.
    Moving {
        /// The domain it is handed to.
        to: String,
        /// What this gateway knew as its authority.
        home: Home,
        /// When it froze (for how long a handover takes, across restarts too).
        since: Instant,
    },
    /// Homed at the gateway of `authority`; this gateway keeps a replica for its devices.
    Replica {
        /// The authority's domain.
        authority: String,
        /// The authority's term.
        term: u64,
        /// After a handover whose certificate came before the old authority's last messages
        /// (another link was faster): the old authority and its last seq. Its messages up to
        /// that seq are still taken from it; once the replica holds them all, this gateway
        /// tells the new authority where it ends, and the new one sends the rest.
        previous: Option<(String, u64)>,
    },
}

/// The roles of every conversation spanning domains.
#[derive(Clone, Debug, Default)]
pub struct Spanning {
    roles: BTreeMap<ConversationId, Role>,
    /// Messages relayed to an authority and not answered yet, with the domain relayed to (in
    /// memory: after a restart a device's next copy is relayed again, and the authority
    /// answers both).
    pending: BTreeMap<(ConversationId, DeviceId, MsgId), String>,
}

impl Spanning {
    /// Reads the roles back from `store`.
    pub fn recover(store: &dyn StoreRead) -> Result<Spanning, StoreError> {
        let mut roles = BTreeMap::new();
        scan_all(store, SPANNING_TABLE, |key, value| {
            let corrupt = || StoreError::Corrupt {
                table: SPANNING_TABLE.0,
                reason: "a role that does not decode".into(),
            };
            let key: [u8; 16] = key.try_into().map_err(|_| corrupt())?;
            let role = decode_role(value).ok_or_else(corrupt)?;
            roles.insert(ConversationId::from_bytes(key), role);
            Ok(())
        })?;
        Ok(Spanning {
            roles,
            pending: BTreeMap::new(),
        })
    }

    /// The domain whose gateway sequences `conv`, if this gateway keeps a replica of it.
    pub fn authority_of(&self, conv: ConversationId) -> Option<&str> {
        match self.roles.get(&conv) {
            Some(Role::Replica { authority, .. }) => Some(authority),
            _ => None,
        }
    }

    /// The old authority of `conv` and its last seq, while this replica still takes its last
    /// messages from it after a handover.
    pub fn previous_of(&self, conv: ConversationId) -> Option<(&str, u64)> {
        match self.roles.get(&conv) {
            Some(Role::Replica {
                previous: Some((domain, last)),
                ..
            }) => Some((domain, *last)),
            _ => None,
        }
    }

    /// The replica of `conv` holds every message of its old authority: it follows the new
    /// one alone from now on.
    pub fn caught_up(&mut self, conv: ConversationId, writes: &mut WriteBatch) {
        if let Some(Role::Replica {
            authority, term, ..
        }) = self.roles.get(&conv)
        {
            let role = Role::Replica {
                authority: authority.clone(),
                term: *term,
                previous: None,
            };
            self.put(conv, role, writes);
        }
    }

    /// The conversations homed here whose member gateways have not all said where their
    /// replica ends since this gateway took them over.
    pub fn awaiting_followers(&self) -> impl Iterator<Item = ConversationId> + '_ {
        self.roles.iter().filter_map(|(conv, role)| match role {
            Role::Authority(home) if !home.waiting.is_empty() => Some(*conv),
            _ => None,
        })
    }

    /// Since when `conv` is frozen here for a handover.
    pub fn frozen_since(&self, conv: ConversationId) -> Option<Instant> {
        match self.roles.get(&conv) {
            Some(Role::Moving { since, .. }) => Some(*since),
            _ => None,
        }
    }

    /// The domain `conv` is being handed to, if it is frozen here for a handover.
    pub fn moving_to(&self, conv: ConversationId) -> Option<&str> {
        match self.roles.get(&conv) {
            Some(Role::Moving { to, .. }) => Some(to),
            _ => None,
        }
    }

    /// What this gateway, the authority of `conv`, knows of its other domains.
    pub fn home(&self, conv: ConversationId) -> Option<&Home> {
        match self.roles.get(&conv) {
            Some(Role::Authority(home)) => Some(home),
            _ => None,
        }
    }

    /// The other domains with members in `conv`, if it is homed here and spans domains.
    pub fn foreign_domains(&self, conv: ConversationId) -> impl Iterator<Item = &str> + '_ {
        self.home(conv)
            .into_iter()
            .flat_map(|home| home.members.keys().map(String::as_str))
    }

    /// The domains that get each message sequenced in `conv`: its other domains, but those
    /// that have not said where their replica ends since a handover.
    pub fn fan_out_domains(&self, conv: ConversationId) -> impl Iterator<Item = &str> + '_ {
        self.home(conv).into_iter().flat_map(|home| {
            home.members
                .keys()
                .filter(|d| !home.waiting.contains(*d))
                .map(String::as_str)
        })
    }

    /// True if `device` of `domain` is a member of `conv`, homed here.
    pub fn is_foreign_member(&self, conv: ConversationId, domain: &str, device: DeviceId) -> bool {
        self.home(conv).is_some_and(|home| {
            home.members
                .get(domain)
                .is_some_and(|d| d.contains(&device))
        })
    }

    /// Every other domain the conversations here span, with how many of them span it: the
    /// member domains of those homed here (and where one is being handed), the authority of
    /// the replicas (and a previous one still sending its last messages).
    pub fn domains_spanned(&self) -> BTreeMap<&str, usize> {
        let mut spanned: BTreeMap<&str, usize> = BTreeMap::new();
        for role in self.roles.values() {
            let mut domains: BTreeSet<&str> = BTreeSet::new();
            match role {
                Role::Authority(home) => domains.extend(home.members.keys().map(String::as_str)),
                Role::Moving { to, home, .. } => {
                    domains.extend(home.members.keys().map(String::as_str));
                    domains.insert(to);
                }
                Role::Replica {
                    authority,
                    previous,
                    ..
                } => {
                    domains.insert(authority);
                    domains.extend(previous.as_ref().map(|(d, _)| d.as_str()));
                }
            }
            for domain in domains {
                *spanned.entry(domain).or_default() += 1;
            }
        }
        spanned
    }

    /// The role of `conv`, if it spans domains.
    pub fn role(&self, conv: ConversationId) -> Option<&Role> {
        self.roles.get(&conv)
    }

    /// The term of `conv`'s authority as this gateway knows it.
    pub fn term(&self, conv: ConversationId) -> Option<u64> {
        match self.roles.get(&conv)? {
            Role::Authority(home) | Role::Moving { home, .. } => Some(home.term),
            Role::Replica { term, .. } => Some(*term),
        }
    }

    /// True if this message was relayed and its answer has not come back.
    pub fn relay_pending(&self, conv: ConversationId, device: DeviceId, msg_id: MsgId) -> bool {
        self.pending.contains_key(&(conv, device, msg_id))
    }

    /// The domain this message was relayed to, if its answer has not come back.
    pub fn relayed_to(
        &self,
        conv: ConversationId,
        device: DeviceId,
        msg_id: MsgId,
    ) -> Option<&str> {
        self.pending
            .get(&(conv, device, msg_id))
            .map(String::as_str)
    }

    /// This message was relayed to `authority`.
    pub fn relayed(
        &mut self,
        conv: ConversationId,
        device: DeviceId,
        msg_id: MsgId,
        authority: &str,
    ) {
        self.pending
            .insert((conv, device, msg_id), authority.to_string());
    }

    /// The authority answered this message.
    pub fn answered(&mut self, conv: ConversationId, device: DeviceId, msg_id: MsgId) {
        self.pending.remove(&(conv, device, msg_id));
    }

    /// How many conversations span domains, as authority (or moving away) and as replica.
    pub fn counts(&self) -> (usize, usize) {
        let replicas = self
            .roles
            .values()
            .filter(|r| matches!(r, Role::Replica { .. }))
            .count();
        (self.roles.len() - replicas, replicas)
    }

    /// Every (conversation, device) of `domain` among the members of a conversation homed
    /// here.
    pub fn homed_members_of<'a>(
        &'a self,
        domain: &'a str,
    ) -> impl Iterator<Item = (ConversationId, DeviceId)> + 'a {
        self.roles.iter().flat_map(move |(conv, role)| {
            let devices = match role {
                Role::Authority(home) => home.members.get(domain),
                _ => None,
            };
            devices
                .into_iter()
                .flatten()
                .map(move |device| (*conv, *device))
        })
    }

    /// `conv`, homed here, gets these members of `domain`. Returns false (and changes nothing)
    /// if `conv` is a replica here or moving away: only its authority shares it.
    pub fn share(
        &mut self,
        conv: ConversationId,
        domain: &str,
        devices: &[DeviceId],
        writes: &mut WriteBatch,
    ) -> bool {
        let role = self
            .roles
            .entry(conv)
            .or_insert_with(|| Role::Authority(Home::default()));
        let Role::Authority(home) = role else {
            return false;
        };
        home.members
            .entry(domain.to_string())
            .or_default()
            .extend(devices.iter().copied());
        writes.put(SPANNING_TABLE, conv.to_bytes().to_vec(), encode_role(role));
        true
    }

    /// `conv`, homed here, no longer has `devices` of `domain` among its members (a commit
    /// removed them); a domain left with none gets nothing more (once it has followed, after
    /// a handover). Returns false (and changes nothing) if `conv` is not homed here.
    pub fn unshare(
        &mut self,
        conv: ConversationId,
        domain: &str,
        devices: &[DeviceId],
        writes: &mut WriteBatch,
    ) -> bool {
        let Some(role @ Role::Authority(_)) = self.roles.get_mut(&conv) else {
            return false;
        };
        let Role::Authority(home) = &mut *role else {
            unreachable!("matched above");
        };
        if let Some(members) = home.members.get_mut(domain) {
            for device in devices {
                members.remove(device);
            }
            // A domain that has not said where its replica ends since a handover stays
            // until it has: its departing devices still read up to the commit removing
            // them, which it gets when it follows, with all the rest.
            if members.is_empty() && !home.waiting.contains(domain) {
                home.members.remove(domain);
            }
        }
        writes.put(SPANNING_TABLE, conv.to_bytes().to_vec(), encode_role(role));
        true
    }

    /// `conv` is homed at `authority`'s gateway; this one keeps a replica. Returns false (and
    /// changes nothing) if `conv` is known here under another role or authority.
    pub fn follow(
        &mut self,
        conv: ConversationId,
        authority: &str,
        writes: &mut WriteBatch,
    ) -> bool {
        match self.roles.get(&conv) {
            Some(Role::Replica { authority: a, .. }) => a == authority,
            Some(Role::Authority(_) | Role::Moving { .. }) => false,
            None => {
                let role = Role::Replica {
                    authority: authority.to_string(),
                    term: 0,
                    previous: None,
                };
                self.put(conv, role, writes);
                true
            }
        }
    }

    /// A replica of `conv` that no device here is a member of any more follows `authority`
    /// from now on (a commit there adds devices of this domain again, and the conversation
    /// was handed over while this domain had none: nobody sent it the certificate). Returns
    /// false (and changes nothing) unless `conv` is a replica of another authority here.
    pub fn follow_anew(
        &mut self,
        conv: ConversationId,
        authority: &str,
        writes: &mut WriteBatch,
    ) -> bool {
        let other = matches!(
            self.roles.get(&conv),
            Some(Role::Replica { authority: a, .. }) if a != authority
        );
        if !other {
            return false;
        }
        // Followed as a conversation new here (its row is written again).
        self.roles.remove(&conv);
        self.follow(conv, authority, writes)
    }

    /// Freezes `conv`, homed here, at `now` for a handover to `to`'s gateway: its home, to
    /// hand over.
    pub fn freeze(
        &mut self,
        conv: ConversationId,
        to: &str,
        now: Instant,
        writes: &mut WriteBatch,
    ) -> Option<Home> {
        let Some(Role::Authority(home)) = self.roles.get(&conv) else {
            return None;
        };
        let home = home.clone();
        let role = Role::Moving {
            to: to.to_string(),
            home: home.clone(),
            since: now,
        };
        self.put(conv, role, writes);
        Some(home)
    }

    /// The handover of `conv` in `term` was declined: this gateway is its authority again.
    /// Returns false (and changes nothing) if it was not moving in that term.
    pub fn thaw(&mut self, conv: ConversationId, term: u64, writes: &mut WriteBatch) -> bool {
        match self.roles.get(&conv) {
            Some(Role::Moving { home, .. }) if home.term + 1 == term => {
                let role = Role::Authority(home.clone());
                self.put(conv, role, writes);
                true
            }
            _ => false,
        }
    }

    /// This gateway takes `conv` over in `term` with `members` of other domains; until each
    /// of those says where its replica ends, nothing goes to it.
    pub fn take_over(
        &mut self,
        conv: ConversationId,
        term: u64,
        members: BTreeMap<String, BTreeSet<DeviceId>>,
        writes: &mut WriteBatch,
    ) {
        let waiting = members.keys().cloned().collect();
        let role = Role::Authority(Home {
            term,
            members,
            waiting,
        });
        self.put(conv, role, writes);
    }

    /// `conv` moved to `to`'s gateway in `term`: this gateway keeps a replica and follows it
    /// (taking the old authority's last messages from it first, if `previous` names it; a
    /// conversation new here is known from then on, its log opened by the old authority's
    /// `Open` when that comes). Returns false (and changes nothing) unless the certificate is
    /// newer than what this gateway knows (a stale one from an earlier handover changes
    /// nothing).
    pub fn moved(
        &mut self,
        conv: ConversationId,
        term: u64,
        to: &str,
        previous: Option<(String, u64)>,
        writes: &mut WriteBatch,
    ) -> bool {
        if self.term(conv).is_some_and(|known| term <= known) {
            return false;
        }
        let role = Role::Replica {
            authority: to.to_string(),
            term,
            previous,
        };
        self.put(conv, role, writes);
        true
    }

    /// The gateway of `domain` said where its replica of `conv` ends: it gets every message
    /// from now on. Returns false if it was not waiting.
    pub fn following(
        &mut self,
        conv: ConversationId,
        domain: &str,
        writes: &mut WriteBatch,
    ) -> bool {
        let Some(Role::Authority(home)) = self.roles.get_mut(&conv) else {
            return false;
        };
        if !home.waiting.remove(domain) {
            return false;
        }
        if home.members.get(domain).is_some_and(BTreeSet::is_empty) {
            // Its last member devices were removed while it was waiting (see `unshare`):
            // it gets what it missed, and nothing more.
            home.members.remove(domain);
        }
        let role = self.roles[&conv].clone();
        self.put(conv, role, writes);
        true
    }

    fn put(&mut self, conv: ConversationId, role: Role, writes: &mut WriteBatch) {
        writes.put(SPANNING_TABLE, conv.to_bytes().to_vec(), encode_role(&role));
        self.roles.insert(conv, role);
    }
}

const KIND_REPLICA_V1: u8 = 0;
const KIND_AUTHORITY_V1: u8 = 1;
const KIND_REPLICA: u8 = 2;
const KIND_AUTHORITY: u8 = 3;
const KIND_MOVING: u8 = 4;

/// `2 | term u64 | 0 | domain` for a replica (`2 | term | 1 | previous len u8 | previous |
/// its last seq u64 | domain` while it takes an old authority's last messages); `3 | term |
/// waiting count u8 | (domain len u8 |
/// domain)* | members` for an authority and `4 | term | to len u8 | to | waiting.. | members`
/// for one moving away, where members are `(domain len u8 | domain | count u32 | devices)*`.
fn encode_role(role: &Role) -> Vec<u8> {
    let mut out = Vec::new();
    match role {
        Role::Replica {
            authority,
            term,
            previous,
        } => {
            out.push(KIND_REPLICA);
            out.extend_from_slice(&term.to_be_bytes());
            match previous {
                None => out.push(0),
                Some((domain, last)) => {
                    out.push(1);
                    put_domain(&mut out, domain);
                    out.extend_from_slice(&last.to_be_bytes());
                }
            }
            out.extend_from_slice(authority.as_bytes());
        }
        Role::Authority(home) => {
            out.push(KIND_AUTHORITY);
            encode_home(home, None, &mut out);
        }
        Role::Moving { to, home, since } => {
            out.push(KIND_MOVING);
            encode_home(home, Some((to, *since)), &mut out);
        }
    }
    out
}

fn put_domain(out: &mut Vec<u8>, domain: &str) {
    assert!(domain.len() <= usize::from(u8::MAX), "domains are short");
    out.push(domain.len() as u8);
    out.extend_from_slice(domain.as_bytes());
}

fn encode_home(home: &Home, moving: Option<(&str, Instant)>, out: &mut Vec<u8>) {
    out.extend_from_slice(&home.term.to_be_bytes());
    if let Some((to, since)) = moving {
        out.extend_from_slice(&since.0.to_be_bytes());
        put_domain(out, to);
    }
    assert!(
        home.waiting.len() <= usize::from(u8::MAX),
        "bounded by a handover's domains"
    );
    out.push(home.waiting.len() as u8);
    for domain in &home.waiting {
        put_domain(out, domain);
    }
    encode_members(&home.members, out);
}

fn encode_members(members: &BTreeMap<String, BTreeSet<DeviceId>>, out: &mut Vec<u8>) {
    for (domain, devices) in members {
        put_domain(out, domain);
        out.extend_from_slice(&(devices.len() as u32).to_be_bytes());
        for device in devices {
            out.extend_from_slice(&device.to_bytes());
        }
    }
}

fn decode_role(value: &[u8]) -> Option<Role> {
    let (&kind, rest) = value.split_first()?;
    let term = |rest: &[u8]| -> Option<(u64, usize)> {
        Some((u64::from_be_bytes(rest.get(..8)?.try_into().ok()?), 8))
    };
    match kind {
        KIND_REPLICA_V1 => Some(Role::Replica {
            authority: String::from_utf8(rest.to_vec()).ok()?,
            term: 0,
            previous: None,
        }),
        KIND_AUTHORITY_V1 => Some(Role::Authority(Home {
            members: decode_members(rest)?,
            ..Home::default()
        })),
        KIND_REPLICA => {
            let (term, mut at) = term(rest)?;
            let previous = match *rest.get(at)? {
                0 => None,
                1 => {
                    let len = usize::from(*rest.get(at + 1)?);
                    let domain =
                        String::from_utf8(rest.get(at + 2..at + 2 + len)?.to_vec()).ok()?;
                    at += 1 + len;
                    let last = u64::from_be_bytes(rest.get(at + 1..at + 9)?.try_into().ok()?);
                    at += 8;
                    Some((domain, last))
                }
                _ => return None,
            };
            Some(Role::Replica {
                authority: String::from_utf8(rest.get(at + 1..)?.to_vec()).ok()?,
                term,
                previous,
            })
        }
        KIND_AUTHORITY | KIND_MOVING => {
            let (term, mut at) = term(rest)?;
            let domain = |at: &mut usize| -> Option<String> {
                let len = usize::from(*rest.get(*at)?);
                let text = rest.get(*at + 1..*at + 1 + len)?;
                *at += 1 + len;
                String::from_utf8(text.to_vec()).ok()
            };
            let moving = if kind == KIND_MOVING {
                let since = u64::from_be_bytes(rest.get(at..at + 8)?.try_into().ok()?);
                at += 8;
                Some((domain(&mut at)?, Instant(since)))
            } else {
                None
            };
            let count = *rest.get(at)?;
            at += 1;
            let waiting = (0..count)
                .map(|_| domain(&mut at))
                .collect::<Option<BTreeSet<_>>>()?;
            let home = Home {
                term,
                members: decode_members(&rest[at..])?,
                waiting,
            };
            Some(match moving {
                Some((to, since)) => Role::Moving { to, home, since },
                None => Role::Authority(home),
            })
        }
        _ => None,
    }
}

fn decode_members(mut rest: &[u8]) -> Option<BTreeMap<String, BTreeSet<DeviceId>>> {
    let mut members = BTreeMap::new();
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len);
        let domain = String::from_utf8(tail.get(..len)?.to_vec()).ok()?;
        let count = u32::from_be_bytes(tail.get(len..len + 4)?.try_into().ok()?) as usize;
        let start = len + 4;
        let end = start.checked_add(count.checked_mul(16)?)?;
        let devices = tail
            .get(start..end)?
            .chunks_exact(16)
            .map(|c| DeviceId::from_bytes(c.try_into().expect("16 bytes")))
            .collect();
        members.insert(domain, devices);
        rest = &tail[end..];
    }
    Some(members)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{commit_durably, MemStore};

    #[test]
    fn roles_survive_a_restart_and_do_not_change_hands() {
        let mut spanning = Spanning::default();
        let mut writes = WriteBatch::default();
        let homed = ConversationId(1);
        let followed = ConversationId(2);
        assert!(spanning.share(homed, "b.example", &[DeviceId(7), DeviceId(8)], &mut writes));
        assert!(spanning.share(homed, "c.example", &[DeviceId(9)], &mut writes));
        assert!(spanning.follow(followed, "b.example", &mut writes));
        // Only the authority shares; a replica follows one authority.
        assert!(!spanning.share(followed, "c.example", &[DeviceId(1)], &mut writes));
        assert!(!spanning.follow(followed, "c.example", &mut writes));
        assert!(!spanning.follow(homed, "b.example", &mut writes));
        assert!(spanning.follow(followed, "b.example", &mut writes));

        let mut store = MemStore::default();
        commit_durably(&mut store, writes).expect("commits");
        let back = Spanning::recover(&store).expect("reads");
        assert_eq!(back.roles, spanning.roles);
        assert_eq!(back.authority_of(followed), Some("b.example"));
        assert_eq!(back.authority_of(homed), None);
        assert!(back.is_foreign_member(homed, "b.example", DeviceId(8)));
        assert!(!back.is_foreign_member(homed, "c.example", DeviceId(8)));
        assert_eq!(
            back.foreign_domains(homed).collect::<Vec<_>>(),
            ["b.example", "c.example"]
        );
        assert_eq!(back.counts(), (1, 1));
    }

    #[test]
    fn a_handover_freezes_thaws_or_moves_and_a_stale_certificate_changes_nothing() {
        let mut spanning = Spanning::default();
        let mut writes = WriteBatch::default();
        let conv = ConversationId(1);
        spanning.share(conv, "b.example", &[DeviceId(7)], &mut writes);
        spanning.share(conv, "c.example", &[DeviceId(9)], &mut writes);
        let home = spanning
            .freeze(conv, "b.example", Instant(7), &mut writes)
            .unwrap();
        assert_eq!(home.term, 0);
        assert_eq!(spanning.moving_to(conv), Some("b.example"));
        assert!(!spanning.share(conv, "b.example", &[DeviceId(8)], &mut writes));
        assert!(spanning
            .freeze(conv, "c.example", Instant(7), &mut writes)
            .is_none());
        // Declined in term 1: the authority again, as it was.
        assert!(!spanning.thaw(conv, 2, &mut writes));
        assert!(spanning.thaw(conv, 1, &mut writes));
        assert_eq!(spanning.home(conv), Some(&home));
        // Handed over in term 1; a certificate of term 1 again, or older, changes nothing.
        spanning
            .freeze(conv, "b.example", Instant(7), &mut writes)
            .unwrap();
        assert!(spanning.moved(conv, 1, "b.example", None, &mut writes));
        assert!(!spanning.moved(conv, 1, "c.example", None, &mut writes));
        assert_eq!(spanning.previous_of(conv), None);
        assert_eq!(spanning.authority_of(conv), Some("b.example"));
        // Taken back over in term 2 with the others waiting until they say where they are.
        let members = BTreeMap::from([
            ("b.example".to_string(), BTreeSet::from([DeviceId(7)])),
            ("c.example".to_string(), BTreeSet::from([DeviceId(9)])),
        ]);
        spanning.take_over(conv, 2, members, &mut writes);
        assert_eq!(spanning.fan_out_domains(conv).count(), 0);
        assert!(spanning.following(conv, "c.example", &mut writes));
        assert!(!spanning.following(conv, "c.example", &mut writes));
        assert_eq!(
            spanning.fan_out_domains(conv).collect::<Vec<_>>(),
            ["c.example"]
        );
        // A replica that takes an old authority's last messages first, until it holds them.
        let other = ConversationId(2);
        spanning.follow(other, "a.example", &mut writes);
        let previous = Some(("a.example".to_string(), 41));
        assert!(spanning.moved(other, 1, "c.example", previous, &mut writes));
        assert_eq!(spanning.previous_of(other), Some(("a.example", 41)));
        let mut store = MemStore::default();
        commit_durably(&mut store, writes).expect("commits");
        let back = Spanning::recover(&store).expect("reads");
        assert_eq!(back.roles, spanning.roles);
        assert_eq!(back.term(conv), Some(2));
        assert_eq!(back.previous_of(other), Some(("a.example", 41)));
        let mut back = back;
        let mut writes = WriteBatch::default();
        back.caught_up(other, &mut writes);
        assert_eq!(back.previous_of(other), None);
        assert_eq!(back.authority_of(other), Some("c.example"));
        // A row of the first format reads as term 0.
        assert_eq!(
            decode_role(&[0, b'a']),
            Some(Role::Replica {
                authority: "a".into(),
                term: 0,
                previous: None
            })
        );
    }

    #[test]
    fn every_domain_spanned_is_counted_once_per_conversation() {
        let mut spanning = Spanning::default();
        let mut writes = WriteBatch::default();
        spanning.share(
            ConversationId(1),
            "b.example",
            &[DeviceId(7), DeviceId(8)],
            &mut writes,
        );
        spanning.share(ConversationId(1), "c.example", &[DeviceId(9)], &mut writes);
        spanning.share(ConversationId(2), "b.example", &[DeviceId(7)], &mut writes);
        spanning.follow(ConversationId(3), "c.example", &mut writes);
        spanning.share(ConversationId(4), "d.example", &[DeviceId(6)], &mut writes);
        spanning.freeze(ConversationId(4), "e.example", Instant(7), &mut writes);
        let spanned = spanning.domains_spanned();
        assert_eq!(
            spanned.into_iter().collect::<Vec<_>>(),
            vec![
                ("b.example", 2),
                ("c.example", 2),
                ("d.example", 1),
                ("e.example", 1)
            ]
        );
    }

    #[test]
    fn a_damaged_row_is_refused_not_misread() {
        for value in [
            &[][..],
            &[2][..],
            &[3, 0, 0, 0, 0, 0, 0, 0, 1, 1][..],
            &[9][..],
            &[1, 9, b'a'][..],
            &[1, 1, b'a', 0, 0, 0, 2][..],
        ] {
            assert_eq!(decode_role(value), None, "{value:?}");
        }
    }
}
