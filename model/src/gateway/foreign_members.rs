//! MLS conversations with members of other domains (issue 15, step 3), as `impl Gateway`.
//!
//! - **At the authority** (the gateway that sequences the conversation, where it was made): a
//!   commit may add devices of another domain that this gateway learned of from that domain's
//!   KeyPackage answer (`foreign_fetch`): their user is what their gateway said, and a device
//!   its own domain revoked is refused. Once sequenced, such devices are not members here:
//!   the conversation spans domains (`spanning`), their gateway gets the commit's Welcome
//!   ([`Entry::Welcome`]) before the commit itself, and every message after, as for a plain
//!   conversation spanning domains.
//! - **At a member gateway**: a Welcome from a conversation's authority makes this gateway
//!   keep a replica of it (as `Entry::Open` does for a plain one), puts the Welcome in each
//!   named device's inbox and starts it reading after the commit that added it. What its
//!   devices send there is relayed to the authority, which admits an application message as
//!   it would its own devices' (the epoch must be the group's).
//!
//! - **Commits by any member.** A member gateway relays a commit with its Welcome and, for
//!   each device of its own domain it adds, that device's user (it is the authority on its
//!   own domain's devices; [`Entry::Relay`]'s `vouched`). The authority admits it as it would
//!   its own devices' commit: roles, epochs, revocations by any domain. A device of a third
//!   domain is added only if the authority learned of it from that domain's own gateway
//!   (refused in words otherwise: a member of its domain or of the home adds it).
//! - **Removals.** A commit removing another domain's device is sequenced and fanned out as
//!   any; that domain's gateway hears [`Entry::Removed`] just before it: the device reads up
//!   to the commit and is told it was removed; a domain left with no member device gets
//!   nothing more. A device its own domain revokes is proposed for removal by the authority, as the
//!   group's external sender, as soon as that domain's CRL says so.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::foreign_fetch::ForeignFetches;
use super::registry::Registry;
use super::{Gateway, Refusal};
use crate::federation::entry::{Entry, Outcome, OPEN_MEMBERS_MAX};
use crate::gateway::groups::{Change, GroupEffect};
use crate::gateway::outgoing::STAGED_BYTES_MAX;
use crate::ids::{ConnectionId, ConversationId, DeviceId, MsgId, UserId};
use crate::mls::commit_authority::{read_message, Kind};
use crate::mls::group_ops::{GroupKind, GroupOps};
use crate::time::Instant;
use crate::wire::payload::ErrorCode;
use crate::wire::Routing;

/// What a Welcome entry adds to the Welcome's bytes, at most (its fixed fields and the
/// devices it names, at 16 bytes each).
const WELCOME_ENTRY_OVERHEAD: usize = 64;

/// What a commit does to other domains' devices, by domain.
#[derive(Debug, Default)]
pub(super) struct Abroad {
    /// Devices it adds; their gateway gets the Welcome.
    pub added: BTreeMap<String, Vec<DeviceId>>,
    /// Devices it removes; their gateway hears it after the commit.
    pub removed: BTreeMap<String, Vec<DeviceId>>,
}

/// The user of a group's member device: one registered here, or another domain's as its own
/// gateway said (what commits adding it are checked against).
pub(super) fn member_user(
    registry: &Registry,
    foreign: &ForeignFetches,
    device: DeviceId,
) -> Option<UserId> {
    registry
        .user_of(device)
        .or_else(|| foreign.foreign_device(device).map(|(user, _)| user))
}

impl Gateway {
    /// The domain of `device` if it is another domain's that this gateway learned of (a
    /// device registered here is never foreign).
    pub(super) fn foreign_domain(&self, device: DeviceId) -> Option<&str> {
        if self.registry.user_of(device).is_some() {
            return None;
        }
        self.foreign_fetches
            .foreign_device(device)
            .map(|(_, domain)| domain)
    }

    /// Checks the part of an admitted commit that concerns other domains' devices: each one
    /// added is known from its gateway and not revoked by its domain, the commit names the
    /// domain of each it adds of another domain than `committer`'s (its members wait for
    /// that domain's root by it) and names no other, and the Welcome fits the link.
    pub(super) fn check_foreign_change(
        &self,
        conv: ConversationId,
        msg_id: MsgId,
        effect: &GroupEffect,
        committer: &str,
    ) -> Result<(), Refusal> {
        let (change, welcome) = (&effect.change, effect.welcome.as_ref());
        let refuse = |code: ErrorCode, message: String| {
            let routing = Routing {
                conversation: conv,
                ..Routing::default()
            };
            Refusal::error(code, message)
                .in_conversation(routing)
                .about(msg_id)
        };
        let mut added = 0usize;
        for (device, _, _) in &change.added {
            // The groups' check refused devices nobody named already.
            let Some(domain) = self.foreign_domain(*device) else {
                continue;
            };
            added += 1;
            if self.peer_crls.revokes(domain, *device) {
                return Err(refuse(
                    ErrorCode::Forbidden,
                    format!("device {device} was revoked by {domain} and cannot be added"),
                ));
            }
            if !self.federation.as_ref().is_some_and(|f| f.is_peer(domain)) {
                return Err(refuse(
                    ErrorCode::UnknownDomain,
                    format!("device {device} is of {domain}, which this gateway no longer federates with"),
                ));
            }
        }
        let home = self.config.domain.as_str();
        let mut named: BTreeMap<DeviceId, &str> = BTreeMap::new();
        for (device, domain) in &effect.domains {
            if named.insert(*device, domain).is_some() {
                return Err(refuse(
                    ErrorCode::InvalidGroupMessage,
                    format!("the commit names the domain of {device} twice"),
                ));
            }
        }
        for (device, _, _) in &change.added {
            let domain = self.foreign_domain(*device).unwrap_or(home);
            let expected = (domain != committer).then_some(domain);
            let declared = named.remove(device);
            if declared != expected {
                let message = match expected {
                    Some(domain) => format!(
                        "{device} is a device of {domain}, and the commit must name that domain for it"
                    ),
                    None => format!("the commit names a domain for {device}, a device of {domain}, the committer's own"),
                };
                return Err(refuse(ErrorCode::InvalidGroupMessage, message));
            }
        }
        if let Some(device) = named.keys().next() {
            return Err(refuse(
                ErrorCode::InvalidGroupMessage,
                format!("the commit names the domain of {device}, which it does not add"),
            ));
        }
        if added > OPEN_MEMBERS_MAX {
            return Err(refuse(
                ErrorCode::InvitationTooLarge,
                format!("a commit adds at most {OPEN_MEMBERS_MAX} devices of other domains"),
            ));
        }
        if added > 0
            && welcome
                .is_some_and(|w| w.len() + WELCOME_ENTRY_OVERHEAD + 16 * added > STAGED_BYTES_MAX)
        {
            return Err(refuse(
                ErrorCode::InvitationTooLarge,
                "the Welcome is too large to cross to another domain's gateway: add fewer devices at once".into(),
            ));
        }
        Ok(())
    }

    /// Splits an applied change into what concerns this gateway's devices and what it does to
    /// other domains' devices, by domain.
    pub(super) fn split_foreign(&self, mut change: Change) -> (Change, Abroad) {
        let mut abroad = Abroad::default();
        change
            .added
            .retain(|(device, _, _)| match self.foreign_domain(*device) {
                Some(domain) => {
                    let devices = abroad.added.entry(domain.to_string()).or_default();
                    devices.push(*device);
                    false
                }
                None => true,
            });
        change
            .removed
            .retain(|device| match self.foreign_domain(*device) {
                Some(domain) => {
                    let devices = abroad.removed.entry(domain.to_string()).or_default();
                    devices.push(*device);
                    false
                }
                None => true,
            });
        (change, abroad)
    }

    /// A commit sequenced at `seq` removed `removed` devices of other domains: each domain's
    /// gateway hears it before the commit (which its removed devices never read), and a
    /// domain with none left gets nothing more, that commit included.
    pub(super) fn remove_abroad(
        &mut self,
        conv: ConversationId,
        seq: u64,
        removed: BTreeMap<String, Vec<DeviceId>>,
    ) {
        for (domain, devices) in removed {
            let entry = Entry::Removed {
                conversation: conv,
                seq,
                devices: devices.clone(),
            };
            // A configured peer with members here; an entry of a few devices.
            if self.send_entry(&domain, &entry).is_ok() {
                self.spanning_stats.removals_sent += 1;
            }
            self.spanning
                .unshare(conv, &domain, &devices, self.fx.writes());
        }
    }

    /// From the authority of `conv`: its commit at `seq` (which comes next) removed
    /// `devices`; this gateway's among them read up to the one before and hear that they were
    /// removed.
    pub(super) fn on_removed_entry(
        &mut self,
        now: Instant,
        conv: ConversationId,
        seq: u64,
        devices: Vec<DeviceId>,
    ) {
        let ours: Vec<DeviceId> = devices
            .into_iter()
            .filter(|d| self.registry.user_of(*d).is_some())
            .collect();
        self.delivery
            .removed_by_authority(now, conv, seq, &ours, &self.sessions, &mut self.fx);
        let (revoked, _) = self.split_revoked(&ours);
        self.delivery
            .revoked_departed(conv, &revoked, &self.sessions, &mut self.fx);
        self.spanning_stats.removals_taken += 1;
    }

    /// A device of this gateway asks to leave `conv`, homed at another domain's gateway: the
    /// request goes there (the device hears of its removal as any member does).
    pub(super) fn relay_leave(
        &mut self,
        conn: ConnectionId,
        device: DeviceId,
        conv: ConversationId,
    ) {
        let routing = Routing {
            conversation: conv,
            ..Routing::default()
        };
        let member = self
            .delivery
            .log(conv)
            .is_some_and(|log| log.is_member(device));
        let authority = self.spanning.authority_of(conv).map(str::to_string);
        let refusal = match authority {
            _ if !member => {
                Refusal::error(ErrorCode::NotMember, "this device is not in that group")
            }
            None => return,
            Some(authority) => {
                let leave = Entry::Leave {
                    conversation: conv,
                    device,
                };
                match self.send_entry(&authority, &leave) {
                    Ok(()) => return,
                    Err(error) => Refusal::error(
                        ErrorCode::PeerUnreachable,
                        format!("this conversation is homed at {authority}, and the request to leave cannot go there: {error}"),
                    )
                    .retry_after(core::time::Duration::from_secs(10)),
                }
            }
        };
        self.refuse(conn, refusal.in_conversation(routing));
    }

    /// From `peer`: its `device` asks to leave `conv`, homed here: proposed for removal, as a
    /// device of this gateway's would be.
    pub(super) fn on_leave_entry(
        &mut self,
        now: Instant,
        peer: &str,
        conv: ConversationId,
        device: DeviceId,
    ) {
        let member = self.spanning.is_foreign_member(conv, peer, device)
            && self
                .groups
                .get(conv)
                .is_some_and(|g| g.devices().contains_key(&device));
        if !member {
            self.spanning_stats.entries_refused += 1;
            return;
        }
        self.propose_removal(now, conv, device);
    }

    /// `peer`'s new CRL revokes devices: each that is a member of a conversation homed here
    /// is proposed for removal, as for a device this gateway revoked.
    pub(super) fn remove_revoked_abroad(&mut self, now: Instant, peer: &str) {
        let revoked: Vec<(ConversationId, DeviceId)> = self.groups.members_where(|device| {
            self.foreign_domain(device) == Some(peer) && self.peer_crls.revokes(peer, device)
        });
        for (conv, device) in revoked {
            self.propose_removal(now, conv, device);
        }
        // A plain conversation has no commits: its home drops the device from its members
        // of `peer` at once (nothing is fanned out to `peer` for it any more once it was the
        // last of them).
        let plain: Vec<(ConversationId, DeviceId)> = self
            .spanning
            .homed_members_of(peer)
            .filter(|(conv, device)| {
                self.groups.get(*conv).is_none() && self.peer_crls.revokes(peer, *device)
            })
            .collect();
        for (conv, device) in plain {
            let homed = self
                .spanning
                .unshare(conv, peer, &[device], self.fx.writes());
            debug_assert!(homed, "listed as homed here");
            self.spanning_stats.revoked_unshared += 1;
        }
    }

    /// A commit sequenced at `seq` added `foreign` devices: their gateways get the Welcome
    /// (before the commit, which the fan-out sends next) and keep a replica from now on.
    pub(super) fn welcome_abroad(
        &mut self,
        conv: ConversationId,
        seq: u64,
        kind: u8,
        welcome: &Bytes,
        foreign: BTreeMap<String, Vec<DeviceId>>,
    ) {
        for (domain, devices) in foreign {
            let entry = Entry::Welcome {
                conversation: conv,
                seq,
                kind,
                devices: devices.clone(),
                welcome: welcome.clone(),
            };
            // Checked when admitted: a configured peer, an entry that fits.
            if self.send_entry(&domain, &entry).is_err() {
                self.spanning_stats.welcomes_unsent += 1;
                continue;
            }
            self.spanning_stats.welcomes_sent += 1;
            let shared = self
                .spanning
                .share(conv, &domain, &devices, self.fx.writes());
            debug_assert!(shared, "a conversation sequenced here is homed here");
        }
    }

    /// A Welcome from `peer` for devices of this gateway: a replica of the conversation is
    /// kept from now on (if `peer` is its authority, or it is new here), and each device
    /// gets the Welcome and reads after `seq`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_welcome_entry(
        &mut self,
        now: Instant,
        peer: &str,
        conv: ConversationId,
        seq: u64,
        kind: u8,
        devices: Vec<DeviceId>,
        welcome: Bytes,
    ) {
        let local = self.delivery.contains(conv) && self.spanning.role(conv).is_none();
        let Some(kind) = GroupKind::from_u8(kind) else {
            self.spanning_stats.entries_refused += 1;
            return;
        };
        // After a handover whose certificate came first, the old authority's last Welcomes
        // (of commits up to the seq it handed over at) still come from it.
        let from_previous = self
            .spanning
            .previous_of(conv)
            .is_some_and(|(domain, last)| domain == peer && seq <= last);
        // A domain left with no member devices hears nothing more, handovers included: a
        // Welcome from another gateway than the one its replica knew is that conversation's
        // new authority bringing it back.
        let left = self
            .delivery
            .log(conv)
            .is_some_and(|log| log.members().is_empty());
        if left && !local && !from_previous {
            self.spanning.follow_anew(conv, peer, self.fx.writes());
        }
        if local || !(from_previous || self.spanning.follow(conv, peer, self.fx.writes())) {
            self.spanning_stats.entries_refused += 1;
            return;
        }
        let ours: Vec<DeviceId> = devices
            .into_iter()
            .filter(|d| self.registry.user_of(*d).is_some())
            .collect();
        self.delivery.ensure_log(conv);
        self.delivery.welcome_from_authority(
            now,
            conv,
            seq,
            kind,
            &welcome,
            &ours,
            &self.sessions,
            &mut self.fx,
        );
        self.spanning_stats.welcomes_taken += 1;
    }

    /// At the authority: whether a message `peer` relayed to an MLS conversation is admitted
    /// as its sender's own gateway would admit it here, and a commit's effect (`Ok(None)` for
    /// an application message, a copy, or a plain conversation), or its refusal. A commit's
    /// devices of `peer`'s domain are known by what `peer` vouched.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn admit_relayed_group_message(
        &mut self,
        peer: &str,
        conv: ConversationId,
        sender: DeviceId,
        msg_id: MsgId,
        body: &[u8],
        welcome: Option<Bytes>,
        vouched: &[(DeviceId, UserId)],
    ) -> Result<Option<Box<GroupEffect>>, Outcome> {
        if !self.groups.contains(conv) {
            return Ok(None);
        }
        let refused = |code, message: String| Outcome::Refused {
            code,
            message,
            after: None,
        };
        let commit = match read_message(body) {
            Ok((framing, aad)) if framing.kind == Kind::Commit => Some(aad),
            Ok(_) => None,
            Err(e) => return Err(refused(ErrorCode::InvalidGroupMessage, e.to_string())),
        };
        let duplicate = self
            .delivery
            .log(conv)
            .and_then(|log| log.duplicate_of(sender, msg_id))
            .is_some();
        // What `peer` says of its own domain's devices, and only of those this gateway knows
        // of no other way.
        let (registry, foreign) = (&self.registry, &self.foreign_fetches);
        let vouched: BTreeMap<DeviceId, UserId> = vouched
            .iter()
            .filter(|(device, _)| member_user(registry, foreign, *device).is_none())
            .copied()
            .collect();
        if let (Some(aad), false) = (&commit, duplicate) {
            if let Ok(ops) = GroupOps::decode(aad) {
                let unknown = ops.added_devices().map(|(d, _)| d).find(|d| {
                    member_user(registry, foreign, *d).is_none() && !vouched.contains_key(d)
                });
                if let Some(device) = unknown {
                    return Err(refused(
                        ErrorCode::Forbidden,
                        format!(
                            "adding {device}: this conversation's home gateway has not learned which user it belongs to from its own domain; a member of that domain, or one at the conversation's home, adds it"
                        ),
                    ));
                }
            }
        }
        let user_of =
            |d: DeviceId| member_user(registry, foreign, d).or_else(|| vouched.get(&d).copied());
        let admitted = self.groups.admit(
            sender,
            conv,
            msg_id,
            body,
            welcome,
            duplicate,
            true,
            &user_of,
            Some(registry.crl()),
        );
        let effect = match admitted {
            Ok(effect) => effect,
            Err(refusal) if refusal.code == ErrorCode::StaleEpoch => {
                return Err(Outcome::Stale {
                    message: refusal.message,
                    epoch: refusal.routing.epoch,
                })
            }
            Err(refusal) => return Err(refused(refusal.code, refusal.message)),
        };
        let Some(effect) = effect else {
            return Ok(None);
        };
        // The devices of `peer` it adds are known here from now on, as `peer` said.
        for (device, user, _) in &effect.change.added {
            if vouched.contains_key(device) {
                self.foreign_fetches
                    .learn(*device, *user, peer, self.fx.writes());
            }
        }
        if let Err(refusal) = self.check_foreign_change(conv, msg_id, &effect, peer) {
            return Err(refused(refusal.code, refusal.message));
        }
        Ok(Some(effect))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::test_devices::{added_by_commits, device, read, run, Device};
    use super::super::test_pair::{Pair, DOMAINS, NOW};
    use crate::federation::entry::Entry;
    use crate::gateway::AdminCommand;
    use crate::ids::{ConversationId, UserId};
    use crate::mls::device_groups::Intent;
    use crate::node::NodeEvent;
    use crate::wire::payload::ErrorCode;
    use crate::wire::Payload;

    fn alice() -> UserId {
        UserId::of("alice", DOMAINS[0])
    }

    fn bob() -> UserId {
        UserId::of("bob", DOMAINS[1])
    }

    #[test]
    fn a_dm_with_another_domains_user_reaches_him_through_his_gateway_both_ways() {
        let mut w = Pair::new();
        let mut devices = vec![device(0, 61, alice()), device(1, 62, bob())];
        run(&mut w, &mut devices);
        let bob_device = devices[1].node.device();
        assert!(
            w.gateways[1]
                .0
                .key_packages
                .directory()
                .remaining(bob_device)
                > 0,
            "bob's device uploaded its packages"
        );
        let conv = devices[0]
            .node
            .create_dm_across(NOW, bob(), DOMAINS[1])
            .unwrap();
        run(&mut w, &mut devices);
        let fetched = devices[0].sent.iter().any(|f| {
            matches!(&f.payload, Payload::KeyPackageFetch(fetch)
                if fetch.domain.as_deref() == Some(DOMAINS[1]))
        });
        assert!(fetched, "alice's device asked for b.example's packages");
        // The commit adding bob's device, with its Welcome: his package passed the check
        // against b.example's root, which a.example's root vouched for.
        let commits = added_by_commits(&devices[0]);
        assert!(
            commits.contains(&(vec![bob_device], true)),
            "{commits:?} {:?}",
            devices[0].events
        );
        // a.example took bob's user from b.example's answer, sequenced the commit and
        // sent the Welcome to b.example, which keeps a replica: bob's device joined,
        // checking alice's credential against a.example's root as b.example vouched.
        let joined = devices[1].events.iter().any(|e| {
            matches!(e, crate::node::NodeEvent::Joined { conversation, .. } if *conversation == conv)
        });
        assert!(joined, "{:?}", devices[1].events);
        let a = w.gateways[0].0.stats().spanning;
        let b = w.gateways[1].0.stats().spanning;
        assert_eq!((a.welcomes_sent, b.welcomes_taken), (1, 1));
        assert_eq!(
            w.gateways[0].0.spanning.authority_of(conv),
            None,
            "homed at a"
        );
        assert_eq!(
            w.gateways[1].0.spanning.authority_of(conv),
            Some(DOMAINS[0])
        );
        // Messages both ways, end to end encrypted, in order.
        for text in ["hello bob", "from a.example"] {
            devices[0]
                .node
                .send(NOW, conv, bytes::Bytes::from_static(text.as_bytes()))
                .unwrap();
        }
        devices[1]
            .node
            .send(NOW, conv, bytes::Bytes::from_static(b"hi alice"))
            .unwrap();
        run(&mut w, &mut devices);
        assert_eq!(
            read(&devices[1], conv, &devices[0]),
            [&b"hello bob"[..], &b"from a.example"[..]]
        );
        assert_eq!(read(&devices[0], conv, &devices[1]), [&b"hi alice"[..]]);
        // Each reads its own messages back too, in the one order the authority gave.
        assert_eq!(read(&devices[1], conv, &devices[1]), [&b"hi alice"[..]]);
        assert!(
            w.gateways[0].0.stats().spanning.relays_taken >= 1,
            "bob's message was relayed to the authority"
        );
    }

    #[test]
    fn without_a_vouched_root_a_dm_with_another_domains_user_is_refused_in_words() {
        let mut w = Pair::new();
        w.gateways[0]
            .0
            .federation
            .as_mut()
            .unwrap()
            .forget_peer_root(DOMAINS[1]);
        let mut devices = vec![device(0, 61, alice()), device(1, 62, bob())];
        run(&mut w, &mut devices);
        devices[0]
            .node
            .create_dm_across(NOW, bob(), DOMAINS[1])
            .unwrap();
        run(&mut w, &mut devices);
        let refused = devices[0].events.iter().find_map(|e| match e {
            crate::node::NodeEvent::GroupChangeRefused { message, .. } => Some(message.clone()),
            _ => None,
        });
        let refused = refused.expect("alice hears that bob was not added");
        assert!(refused.contains("could be checked"), "{refused}");
        assert!(
            added_by_commits(&devices[0])
                .iter()
                .all(|(added, _)| added.is_empty()),
            "nobody of b.example was added"
        );
    }

    /// What `d` heard refused of its group changes, in words.
    fn refusals(d: &Device) -> Vec<String> {
        d.events
            .iter()
            .filter_map(|e| match e {
                NodeEvent::GroupChangeRefused { message, .. } => Some(message.clone()),
                _ => None,
            })
            .collect()
    }

    fn said(d: &mut Device, conv: ConversationId, text: &'static str) {
        d.node
            .send(NOW, conv, Bytes::from_static(text.as_bytes()))
            .unwrap();
    }

    fn removed_from(d: &Device, conv: ConversationId) -> bool {
        d.events.iter().any(
            |e| matches!(e, NodeEvent::RemovedFrom { conversation, .. } if *conversation == conv),
        )
    }

    /// alice (owner) and carol of a.example and bob of b.example in a room homed at a.example.
    fn room_across(w: &mut Pair, devices: &mut [Device]) -> ConversationId {
        run(w, devices);
        let carol = devices[2].node.user();
        let conv = devices[0].node.create_room(NOW, &[carol]).unwrap();
        run(w, devices);
        let invite = Intent::AddForeign {
            domain: DOMAINS[1].into(),
            users: vec![bob().to_bytes().into()],
        };
        devices[0].node.change_group(NOW, conv, invite).unwrap();
        run(w, devices);
        said(&mut devices[0], conv, "welcome, bob");
        said(&mut devices[1], conv, "thanks");
        run(w, devices);
        for reader in [1, 2] {
            assert_eq!(
                read(&devices[reader], conv, &devices[0]),
                [&b"welcome, bob"[..]]
            );
        }
        for reader in [0, 2] {
            assert_eq!(read(&devices[reader], conv, &devices[1]), [&b"thanks"[..]]);
        }
        conv
    }

    #[test]
    fn a_member_of_another_domain_commits_through_its_gateway_and_adds_its_own_devices() {
        let mut w = Pair::new();
        let carol = UserId::of("carol", DOMAINS[0]);
        let mut devices = vec![
            device(0, 71, alice()),
            device(1, 72, bob()),
            device(0, 73, carol),
        ];
        let conv = room_across(&mut w, &mut devices);
        let epoch = |w: &Pair| w.gateways[0].0.group(conv).unwrap().epoch();
        let before = epoch(&w);
        // Bob refreshes his keys: a commit relayed from b.example, sequenced at a.example.
        devices[1]
            .node
            .change_group(NOW, conv, Intent::Update)
            .unwrap();
        run(&mut w, &mut devices);
        assert!(
            refusals(&devices[1]).is_empty(),
            "{:?}",
            refusals(&devices[1])
        );
        assert_eq!(epoch(&w), before + 1);
        let bob_phone = devices[1].node.device();
        for reader in [0, 2] {
            let applied = devices[reader].events.iter().any(
                |e| matches!(e, NodeEvent::GroupChanged { sender, .. } if *sender == bob_phone),
            );
            assert!(applied, "reader {reader} applied bob's commit");
        }
        said(&mut devices[0], conv, "after bob's update");
        run(&mut w, &mut devices);
        assert_eq!(
            read(&devices[1], conv, &devices[0]),
            [&b"welcome, bob"[..], &b"after bob's update"[..]]
        );
        // Bob's new laptop joins, added by his phone: b.example vouches that it is bob's, and
        // a.example sends its Welcome back there.
        devices.push(device(1, 74, bob()));
        run(&mut w, &mut devices);
        let laptop = devices[3].node.device();
        let add_own = Intent::AddUsers(vec![bob().to_bytes().into()]);
        devices[1].node.change_group(NOW, conv, add_own).unwrap();
        run(&mut w, &mut devices);
        assert!(
            refusals(&devices[1]).is_empty(),
            "{:?}",
            refusals(&devices[1])
        );
        let joined = devices[3]
            .events
            .iter()
            .any(|e| matches!(e, NodeEvent::Joined { conversation, .. } if *conversation == conv));
        assert!(joined, "{:?}", devices[3].events);
        assert_eq!(
            w.gateways[0].0.foreign_fetches.foreign_device(laptop),
            Some((bob(), DOMAINS[1]))
        );
        said(&mut devices[2], conv, "hello, laptop");
        run(&mut w, &mut devices);
        assert_eq!(
            read(&devices[3], conv, &devices[2]),
            [&b"hello, laptop"[..]]
        );
        // The authority's own roles still hold for a relayed commit: bob, a member, may not
        // remove carol's device.
        let carol_device = devices[2].node.device();
        let remove = Intent::RemoveDevice(carol_device.to_bytes().into());
        devices[1].node.change_group(NOW, conv, remove).unwrap();
        run(&mut w, &mut devices);
        let refused = refusals(&devices[1]);
        assert!(
            refused.iter().any(|m| m.contains("may not remove")),
            "{refused:?}"
        );
        assert!(w.gateways[0]
            .0
            .group(conv)
            .unwrap()
            .devices()
            .contains_key(&carol_device));
    }

    #[test]
    fn a_relayed_commit_adding_a_device_the_home_knows_nothing_of_is_refused_in_words() {
        let mut w = Pair::new();
        let carol = UserId::of("carol", DOMAINS[0]);
        let mut devices = vec![
            device(0, 101, alice()),
            device(1, 102, bob()),
            device(0, 103, carol),
        ];
        let conv = room_across(&mut w, &mut devices);
        devices.push(device(1, 104, bob()));
        run(&mut w, &mut devices);
        // b.example says nothing of the devices bob's commit adds (as for a device of a
        // third domain, which b.example is not the authority on).
        w.rewrite = Some(|entry| match entry {
            Entry::Relay {
                conversation,
                sender,
                msg_id,
                after,
                body,
                welcome,
                vouched: _,
            } => Entry::Relay {
                conversation,
                sender,
                msg_id,
                after,
                body,
                welcome,
                vouched: Vec::new(),
            },
            other => other,
        });
        let add_own = Intent::AddUsers(vec![bob().to_bytes().into()]);
        devices[1].node.change_group(NOW, conv, add_own).unwrap();
        run(&mut w, &mut devices);
        let refused = refusals(&devices[1]);
        assert!(
            refused
                .iter()
                .any(|m| m.contains("has not learned which user it belongs to")),
            "{refused:?}"
        );
        let laptop = devices[3].node.device();
        assert!(!w.gateways[0]
            .0
            .group(conv)
            .unwrap()
            .devices()
            .contains_key(&laptop));
        assert_eq!(w.gateways[0].0.foreign_fetches.foreign_device(laptop), None);
        // The room goes on.
        said(&mut devices[1], conv, "still here");
        run(&mut w, &mut devices);
        assert_eq!(
            read(&devices[0], conv, &devices[1]),
            [&b"thanks"[..], &b"still here"[..]]
        );
    }

    #[test]
    fn a_commit_must_name_exactly_the_other_domains_of_the_devices_it_adds() {
        let mut w = Pair::new();
        let carol = UserId::of("carol", DOMAINS[0]);
        let mut devices = vec![
            device(0, 111, alice()),
            device(1, 112, bob()),
            device(0, 113, carol),
        ];
        run(&mut w, &mut devices);
        let conv = devices[0].node.create_room(NOW, &[]).unwrap();
        run(&mut w, &mut devices);
        // carol is of alice's own domain: a commit naming a domain for her device would make
        // members wait for a root they need not (and a wrong one, for ever).
        let odd = Intent::AddForeign {
            domain: DOMAINS[0].into(),
            users: vec![carol.to_bytes().into()],
        };
        devices[0].node.change_group(NOW, conv, odd).unwrap();
        run(&mut w, &mut devices);
        let refused = refusals(&devices[0]);
        assert!(
            refused.iter().any(|m| m.contains("the committer's own")),
            "{refused:?} {:?}",
            devices[0].events
        );
        let carol_device = devices[2].node.device();
        assert!(!w.gateways[0]
            .0
            .group(conv)
            .unwrap()
            .devices()
            .contains_key(&carol_device));
        // Named as they should be, the same users join.
        let right = Intent::AddUsers(vec![carol.to_bytes().into()]);
        devices[0].node.change_group(NOW, conv, right).unwrap();
        run(&mut w, &mut devices);
        assert!(w.gateways[0]
            .0
            .group(conv)
            .unwrap()
            .devices()
            .contains_key(&carol_device));
    }

    #[test]
    fn another_domains_devices_leave_when_removed_when_they_ask_and_when_their_domain_revokes_them()
    {
        let mut w = Pair::new();
        let carol = UserId::of("carol", DOMAINS[0]);
        let mut devices = vec![
            device(0, 81, alice()),
            device(1, 82, bob()),
            device(0, 83, carol),
            device(1, 84, bob()),
        ];
        let conv = room_across(&mut w, &mut devices);
        let (phone, laptop) = (devices[1].node.device(), devices[3].node.device());
        let members_at_b = |w: &Pair| {
            w.gateways[0]
                .0
                .spanning
                .home(conv)
                .and_then(|h| h.members.get(DOMAINS[1]).cloned())
                .unwrap_or_default()
        };
        assert_eq!(members_at_b(&w).len(), 2, "both of bob's devices joined");
        // Alice, the owner, removes bob's phone: b.example hears it after the commit, the phone
        // reads up to it and learns it was removed; the laptop stays.
        let remove = Intent::RemoveDevice(phone.to_bytes().into());
        devices[0].node.change_group(NOW, conv, remove).unwrap();
        run(&mut w, &mut devices);
        assert!(removed_from(&devices[1], conv), "{:?}", devices[1].events);
        assert!(!removed_from(&devices[3], conv));
        assert_eq!(w.gateways[1].0.stats().spanning.removals_taken, 1);
        assert_eq!(members_at_b(&w).into_iter().collect::<Vec<_>>(), [laptop]);
        said(&mut devices[0], conv, "phone gone");
        run(&mut w, &mut devices);
        assert_eq!(
            read(&devices[3], conv, &devices[0]),
            [&b"welcome, bob"[..], &b"phone gone"[..]]
        );
        assert_eq!(read(&devices[1], conv, &devices[0]), [&b"welcome, bob"[..]]);
        // b.example revokes the laptop: its CRL reaches a.example, which proposes the removal as
        // the group's external sender; a member commits it.
        w.admin(1, AdminCommand::RevokeDevice(laptop));
        run(&mut w, &mut devices);
        assert_eq!(w.gateways[0].0.groups.stats().removals_proposed, 1);
        assert!(!w.gateways[0]
            .0
            .group(conv)
            .unwrap()
            .devices()
            .contains_key(&laptop));
        assert!(members_at_b(&w).is_empty());
        assert_eq!(
            w.gateways[0].0.spanning.fan_out_domains(conv).count(),
            0,
            "b.example gets nothing more"
        );
        said(&mut devices[0], conv, "just us");
        run(&mut w, &mut devices);
        assert_eq!(
            read(&devices[2], conv, &devices[0]),
            [&b"welcome, bob"[..], &b"phone gone"[..], &b"just us"[..]]
        );
    }

    #[test]
    fn a_device_of_another_domain_leaves_a_room_by_asking_its_gateway() {
        let mut w = Pair::new();
        let carol = UserId::of("carol", DOMAINS[0]);
        let mut devices = vec![
            device(0, 91, alice()),
            device(1, 92, bob()),
            device(0, 93, carol),
        ];
        let conv = room_across(&mut w, &mut devices);
        devices[1]
            .node
            .change_group(NOW, conv, Intent::Leave)
            .unwrap();
        run(&mut w, &mut devices);
        assert!(
            refusals(&devices[1]).is_empty(),
            "{:?}",
            refusals(&devices[1])
        );
        assert!(removed_from(&devices[1], conv), "{:?}", devices[1].events);
        let phone = devices[1].node.device();
        assert!(!w.gateways[0]
            .0
            .group(conv)
            .unwrap()
            .devices()
            .contains_key(&phone));
        said(&mut devices[2], conv, "bye bob");
        run(&mut w, &mut devices);
        assert_eq!(read(&devices[0], conv, &devices[2]), [&b"bye bob"[..]]);
        assert!(read(&devices[1], conv, &devices[2]).is_empty());
    }

    /// [`room_across`], and alice makes bob an admin (who may add anyone).
    fn admin_abroad(w: &mut Pair, devices: &mut [Device]) -> ConversationId {
        let conv = room_across(w, devices);
        let admin = Intent::SetRole(
            bob().to_bytes().into(),
            crate::mls::group_ops::Role::Admin as u8,
        );
        devices[0].node.change_group(NOW, conv, admin).unwrap();
        run(w, devices);
        conv
    }

    /// alice (owner) and carol of a.example, bob of b.example made an admin, in a room homed
    /// at a.example; dave of a.example, in no room, blocks bob. KeyPackage requests reach
    /// a.example as from someone else (as if bob's device had fetched dave's packages before
    /// the block), and `rewrite` may change more.
    fn dave_blocks_an_admin_abroad(
        rewrite: fn(Entry) -> Entry,
    ) -> (Pair, Vec<Device>, ConversationId) {
        let mut w = Pair::new();
        let carol = UserId::of("carol", DOMAINS[0]);
        let dave = UserId::of("dave", DOMAINS[0]);
        let mut devices = vec![
            device(0, 111, alice()),
            device(1, 112, bob()),
            device(0, 113, carol),
            device(0, 114, dave),
        ];
        let conv = admin_abroad(&mut w, &mut devices);
        w.rewrite = Some(rewrite);
        devices[3].node.change_contact_abroad(
            NOW,
            bob(),
            Some(DOMAINS[1].into()),
            crate::wire::payload::ContactAction::Block,
        );
        run(&mut w, &mut devices);
        assert!(w.gateways[0].0.social.blocked(dave, bob()));
        let add_dave = Intent::AddForeign {
            domain: DOMAINS[0].into(),
            users: vec![dave.to_bytes().into()],
        };
        devices[1].node.change_group(NOW, conv, add_dave).unwrap();
        run(&mut w, &mut devices);
        (w, devices, conv)
    }

    /// Stands in for packages bob's device fetched before dave's block.
    fn fetched_before_the_block(entry: Entry) -> Entry {
        match entry {
            Entry::KeyPackageRequest { request, users, .. } => Entry::KeyPackageRequest {
                request,
                requester: UserId::of("someone", DOMAINS[1]),
                users,
            },
            other => other,
        }
    }

    fn refused_as_blocked(w: &Pair, devices: &[Device], conv: ConversationId) {
        let refused = refusals(&devices[1]);
        assert!(
            refused
                .iter()
                .any(|m| m.contains("does not accept invitations from you")),
            "{refused:?}"
        );
        assert!(
            refused.iter().all(|m| !m.contains("block")),
            "the block is never named: {refused:?}"
        );
        let dave_device = devices[3].node.device();
        assert!(!w.gateways[0]
            .0
            .group(conv)
            .unwrap()
            .devices()
            .contains_key(&dave_device));
        let joined = devices[3]
            .events
            .iter()
            .any(|e| matches!(e, NodeEvent::Joined { conversation, .. } if *conversation == conv));
        assert!(!joined, "{:?}", devices[3].events);
    }

    #[test]
    fn a_commit_adding_someone_who_blocked_its_sender_is_refused_by_the_senders_own_gateway() {
        let (mut w, mut devices, conv) = dave_blocks_an_admin_abroad(fetched_before_the_block);
        // b.example, told of dave's block, refuses bob's commit before relaying it: the home of
        // a room of a third domain would know nothing of the block.
        assert!(w.gateways[1]
            .0
            .social
            .blocked(UserId::of("dave", DOMAINS[0]), bob()));
        refused_as_blocked(&w, &devices, conv);
        assert_eq!(w.gateways[1].0.stats().spanning.relays_blocked, 1);
        assert_eq!(
            w.gateways[0].0.stats().spanning.relays_refused,
            0,
            "never relayed"
        );
        // The room goes on, and bob may still add someone else's devices.
        said(&mut devices[1], conv, "still here");
        run(&mut w, &mut devices);
        assert_eq!(
            read(&devices[0], conv, &devices[1]),
            [&b"thanks"[..], &b"still here"[..]]
        );
    }

    #[test]
    fn a_relayed_commit_adding_someone_who_blocked_its_sender_is_refused_at_the_home() {
        // b.example never hears of the block (as a gateway of an older version would not),
        // so it relays: a.example, dave's own gateway and the room's home, refuses in the
        // same words.
        fn block_untold(entry: Entry) -> Entry {
            match fetched_before_the_block(entry) {
                Entry::Block { from, to, .. } => Entry::Block {
                    from,
                    to,
                    blocked: false,
                },
                other => other,
            }
        }
        let (w, devices, conv) = dave_blocks_an_admin_abroad(block_untold);
        assert!(!w.gateways[1]
            .0
            .social
            .blocked(UserId::of("dave", DOMAINS[0]), bob()));
        refused_as_blocked(&w, &devices, conv);
        assert_eq!(w.gateways[1].0.stats().spanning.relays_blocked, 0);
        assert_eq!(w.gateways[0].0.stats().spanning.relays_refused, 1);
    }

    #[test]
    fn a_relayed_commit_is_charged_to_its_senders_user_at_the_home() {
        use crate::gateway::limits::{Limits, Rate, RateLimits};
        let mut w = Pair::new();
        let (dave, erin) = (
            UserId::of("dave", DOMAINS[0]),
            UserId::of("erin", DOMAINS[0]),
        );
        let mut devices = vec![
            device(0, 121, alice()),
            device(1, 122, bob()),
            device(0, 123, UserId::of("carol", DOMAINS[0])),
            device(0, 124, dave),
            device(0, 125, erin),
        ];
        let conv = admin_abroad(&mut w, &mut devices);
        // a.example lets a user invite one user at once, then one a minute.
        w.gateways[0].0.limits = Limits::new(RateLimits {
            invitations: Some(Rate::per_hour(60, 1)),
            ..RateLimits::default()
        });
        let add = |user: UserId| Intent::AddForeign {
            domain: DOMAINS[0].into(),
            users: vec![user.to_bytes().into()],
        };
        devices[1].node.change_group(NOW, conv, add(dave)).unwrap();
        run(&mut w, &mut devices);
        assert!(
            refusals(&devices[1]).is_empty(),
            "{:?}",
            refusals(&devices[1])
        );
        let members = |w: &Pair| w.gateways[0].0.group(conv).unwrap().users();
        assert!(members(&w).contains(&dave));
        // The second invitation within the minute: refused with the time to wait, as at home.
        devices[1].node.change_group(NOW, conv, add(erin)).unwrap();
        run(&mut w, &mut devices);
        let throttled = devices[1].events.iter().any(|e| {
            matches!(e, NodeEvent::Throttled { code: ErrorCode::InvitationsLimited, retry_after, message }
                if *retry_after > core::time::Duration::from_secs(50)
                    && message.contains("too many invitations from this user into conversations homed at a.example"))
        });
        assert!(throttled, "{:?}", devices[1].events);
        assert!(!members(&w).contains(&erin));
        assert_eq!(w.gateways[0].0.limits.stats().invitations_limited, 1);
        // The device pauses as it would at home; its gateway holds nothing back for it (as
        // it does when the home is past its limit for the whole peer).
        let bob_phone = devices[1].node.device();
        assert_eq!(w.gateways[1].0.held_hints.wait(NOW, bob_phone, conv), None);
    }
}
