//! MLS conversations in the simulated world: who creates them, what a `commit` action does,
//! and when a group has converged.
//!
//! A conversation declared with `kind room` or `kind dm` is created by its first member device
//! at [`CREATE_AT_US`], inviting the users of the other declared members. Devices whose
//! KeyPackages were not available then (not yet connected, frames lost) are brought in by later
//! `commit ... add` actions, which add every declared member missing from the committer's view.

use std::collections::BTreeMap;

use sund_model::gateway::Gateway;
use sund_model::ids::{ConversationId, DeviceId, UserId};
use sund_model::mls::device::DeviceMlsConfig;
use sund_model::mls::device_groups::{GroupStatus, Intent};
use sund_model::mls::group_ops::GroupKind;
use sund_model::mls::verified::VerifiedSignatures;
use sund_model::mls::{LifetimePolicy, Randomness};
use sund_model::node::NodeConfig;

use super::{EventKind, Machine, World};
use crate::network::ActorIndex;
use crate::scenario::{CommitKind, Scenario, Target, Tunables};

/// When the creator of each MLS conversation creates it (devices have connected and uploaded
/// their KeyPackages by then unless faults delayed them).
pub(super) const CREATE_AT_US: u64 = 1_000_000;

/// A declared conversation as the world tracks it.
pub(super) struct SimConversation {
    /// Its id (for an MLS conversation, known once its creator made it; 0 until then).
    pub id: ConversationId,
    /// Its authority gateway.
    pub gateway: ActorIndex,
    /// Declared member devices, sorted.
    pub members: Vec<ActorIndex>,
    /// `Some` for an MLS group.
    pub kind: Option<GroupKind>,
}

/// True if any conversation of the scenario is an MLS group: then every device runs MLS.
pub(super) fn uses_mls(scenario: &Scenario) -> bool {
    scenario.conversations.iter().any(|c| c.kind.is_some())
}

/// Gives a simulated device its user and a deterministic MLS configuration.
pub(super) fn enable_mls(
    config: &mut NodeConfig,
    user: UserId,
    tunables: &Tunables,
    verified: &VerifiedSignatures,
) {
    config.user = Some(user);
    config.mls = Some(DeviceMlsConfig {
        randomness: Randomness::Simulation,
        lifetime: LifetimePolicy::Unbounded,
        pool_target: tunables.key_packages.unwrap_or(20),
        decrypt_sample: tunables.decrypt_sample,
        verified: Some(verified.clone()),
    });
}

impl World {
    fn user_name(&self, a: ActorIndex) -> &str {
        let name = &self.actors[a as usize].name;
        name.split('/').next().unwrap_or(name)
    }

    /// True if every device of the user was revoked.
    fn user_revoked(&self, user: &str) -> bool {
        self.devices
            .iter()
            .filter(|&&d| self.user_name(d) == user)
            .all(|&d| self.is_revoked(d))
    }

    /// For each other user of a DM: whether every device of theirs was revoked, and whether
    /// they block its creator (as the gateway answered it).
    fn dm_others(&self, c: &SimConversation) -> Vec<(bool, bool)> {
        let own = self.user_name(c.members[0]);
        let own_id = super::federation::user_id(&self.scenario, own);
        c.members
            .iter()
            .map(|&m| self.user_name(m))
            .filter(|&name| name != own)
            .map(|name| {
                let id = super::federation::user_id(&self.scenario, name);
                (self.user_revoked(name), self.blocks_known(id, own_id))
            })
            .collect()
    }

    /// True if a group not created yet never will be, and nobody expects it: its creator was
    /// revoked before its creating commit reached the gateway, or (a DM) the other user's every
    /// device was, or the other user blocks the creator.
    fn creation_abandoned(&self, c: &SimConversation) -> bool {
        self.is_revoked(c.members[0])
            || (c.kind == Some(GroupKind::Dm)
                && self
                    .dm_others(c)
                    .iter()
                    .all(|&(revoked, blocks)| revoked || blocks))
    }

    /// True if a DM not created yet waits only on a block: the other user blocks its creator
    /// now, which an unblock may lift (then it is made).
    fn creation_blocked(&self, c: &SimConversation) -> bool {
        c.kind == Some(GroupKind::Dm)
            && !self.is_revoked(c.members[0])
            && self
                .dm_others(c)
                .iter()
                .any(|&(revoked, blocks)| !revoked && blocks)
    }

    /// The domain of `member`'s home gateway if it is another than `of`'s (a federating
    /// gateway's), else `None`.
    fn foreign_domain(&self, of: ActorIndex, member: ActorIndex) -> Option<String> {
        let (here, there) = (
            self.actors[of as usize].home,
            self.actors[member as usize].home,
        );
        if here == there {
            return None;
        }
        self.federation.domain(there)
    }

    pub(super) fn node(&self, a: ActorIndex) -> Option<&sund_model::node::Node> {
        match &self.actors[a as usize].machine {
            Machine::Node(Some(n), _) => Some(n),
            _ => None,
        }
    }

    /// The creator of conversation `index` makes it now (or later, if it is down).
    pub(super) fn create_group(&mut self, index: usize) {
        let c = &self.conversations[index];
        let kind = c.kind.expect("an MLS conversation");
        let creator = c.members[0];
        let own = self.user_name(creator).to_string();
        let own_id = super::federation::user_id(&self.scenario, &own);
        let mut users: Vec<UserId> = Vec::new();
        // Users of other domains, by domain: their devices join through their own gateway.
        let mut foreign: BTreeMap<String, Vec<UserId>> = BTreeMap::new();
        for &m in &c.members {
            let name = self.user_name(m);
            let user = super::federation::user_id(&self.scenario, name);
            // A user whose every device was revoked cannot be invited (the gateway holds no
            // KeyPackage of theirs), nor one who blocked the creator (their gateway hands out
            // none); a person would create the room without them.
            if name == own
                || users.contains(&user)
                || self.user_revoked(name)
                || self.blocks_known(user, own_id)
            {
                continue;
            }
            match self.foreign_domain(creator, m) {
                Some(domain) => {
                    let of_domain = foreign.entry(domain).or_default();
                    if !of_domain.contains(&user) {
                        of_domain.push(user);
                    }
                }
                None => users.push(user),
            }
        }
        if self.creation_abandoned(c) {
            if self.creation_blocked(c) {
                // Asked again later: the block may be lifted.
                self.push(
                    self.now + CREATE_AT_US,
                    EventKind::CreateGroup {
                        conversation: index,
                    },
                );
            }
            return;
        }
        if !self.actors[creator as usize].up {
            self.push(
                self.now + CREATE_AT_US,
                EventKind::CreateGroup {
                    conversation: index,
                },
            );
            return;
        }
        let mut id = None;
        self.with_node(creator, |n, now| {
            id = match kind {
                GroupKind::Dm => match foreign.iter().next() {
                    Some((domain, other)) => n.create_dm_across(now, other[0], domain).ok(),
                    None => n.create_dm(now, users[0]).ok(),
                },
                GroupKind::Room => {
                    let id = n.create_room(now, &users).ok();
                    for (domain, users) in &foreign {
                        let add = Intent::AddForeign {
                            domain: domain.clone(),
                            users: users.iter().map(|u| u.to_bytes().into()).collect(),
                        };
                        if let Some(id) = id {
                            let _ = n.change_group(now, id, add);
                        }
                    }
                    id
                }
                // Scenario files name rooms and DMs only (the parser says so).
                GroupKind::Own => n.create_own(now).ok(),
            };
        });
        let id = id.expect("simulated devices have a user and MLS");
        self.conversations[index].id = id;
    }

    /// A creation refused because an invited user had no registered device yet (a device that
    /// enrols late): the creator tries again later, as a user would, until that user exists.
    pub(super) fn retry_unknown_user(&mut self, device: ActorIndex, conv: ConversationId) {
        let Some(index) = self
            .conversations
            .iter()
            .position(|c| c.id == conv && c.kind.is_some() && c.members[0] == device)
        else {
            return;
        };
        let forgotten = self
            .node(device)
            .and_then(|n| n.groups())
            .is_some_and(|g| g.entry(conv).is_none());
        if forgotten {
            self.push(
                self.now + CREATE_AT_US,
                EventKind::CreateGroup {
                    conversation: index,
                },
            );
        }
    }

    /// A creating commit refused as forbidden (it added a device revoked since the creator
    /// fetched its KeyPackage): the creator tries again, as a person told so would, and the
    /// new attempt leaves out users with no device left.
    pub(super) fn retry_refused_creation(&mut self, device: ActorIndex) {
        // Asked of the conversation's authority in the world's books: a room handed over to
        // another domain's gateway is not held at its creator's any more.
        let refused: Vec<usize> = self
            .conversations
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                c.kind.is_some()
                    && c.members[0] == device
                    && match &self.actors[c.gateway as usize].machine {
                        Machine::Gateway(Some(g), _) => g.group(c.id).is_none(),
                        _ => false,
                    }
            })
            .map(|(i, _)| i)
            .collect();
        for index in refused {
            self.push(
                self.now + CREATE_AT_US,
                EventKind::CreateGroup {
                    conversation: index,
                },
            );
        }
    }

    /// A creator that restarted without the group it was creating (the commit that wrote it
    /// was lost with a crash or a full disk) creates it again, as a person whose command
    /// failed would.
    pub(super) fn recreate_lost_groups(&mut self, device: ActorIndex) {
        // The node holds every group it ever told the gateway of (a creating commit leaves
        // only once the group is durable), so its own store says whether the creation was lost.
        let lost: Vec<usize> = self
            .conversations
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                c.kind.is_some()
                    && c.members[0] == device
                    && c.id != ConversationId(0)
                    && self
                        .node(device)
                        .and_then(|n| n.groups())
                        .is_some_and(|g| g.entry(c.id).is_none())
            })
            .map(|(i, _)| i)
            .collect();
        for index in lost {
            self.push(
                self.now + CREATE_AT_US,
                EventKind::CreateGroup {
                    conversation: index,
                },
            );
        }
    }

    /// `commit DM from WHO start`: each device of WHO not in the DM yet starts it with the
    /// DM's other user, as its creator does (both may at once; one DM results).
    fn start_dm(&mut self, index: usize, who: &Target) {
        let c = &self.conversations[index];
        if c.kind != Some(GroupKind::Dm) {
            return;
        }
        let declared = c.members.clone();
        for device in self.resolve(who) {
            let own = self.user_name(device).to_string();
            let Some(&other) = declared.iter().find(|&&m| self.user_name(m) != own) else {
                continue;
            };
            let user = super::federation::user_id(&self.scenario, self.user_name(other));
            let domain = self.foreign_domain(device, other);
            self.with_node(device, |n, now| {
                // A device in the DM already: creating it again is the same request.
                let _ = match &domain {
                    Some(domain) => n.create_dm_across(now, user, domain),
                    None => n.create_dm(now, user),
                };
            });
        }
    }

    /// An MLS conversation is not always homed at its declared gateway: a DM across domains
    /// is homed where the gateways' claims put it (the first domain when both users start it
    /// at once), and a handover moves any. Once `gateway` sequences a conversation that its
    /// gateway in the books does not, the books follow.
    pub(super) fn follow_group_homes(&mut self, gateway: ActorIndex) {
        if self.gateways.len() < 2 {
            return;
        }
        let Machine::Gateway(Some(g), _) = &self.actors[gateway as usize].machine else {
            return;
        };
        let moved: Vec<usize> = self
            .conversations
            .iter()
            .enumerate()
            .filter(|(_, c)| c.kind.is_some() && c.gateway != gateway && g.sequences(c.id))
            .map(|(i, _)| i)
            .collect();
        for index in moved {
            let declared = self.conversations[index].gateway;
            let declared_sequences = match &self.actors[declared as usize].machine {
                Machine::Gateway(Some(d), _) => d.sequences(self.conversations[index].id),
                _ => false,
            };
            if !declared_sequences {
                self.conversations[index].gateway = gateway;
            }
        }
    }

    /// True if `device` can send to conversation `index` now.
    pub(super) fn sends_to(&self, index: usize, device: ActorIndex) -> bool {
        let c = &self.conversations[index];
        if c.kind.is_none() {
            return c.members.binary_search(&device).is_ok();
        }
        self.node(device)
            .and_then(|n| n.groups()?.entry(c.id).map(|e| e.status.clone()))
            .is_some_and(|s| {
                matches!(
                    s,
                    GroupStatus::Synchronized | GroupStatus::PendingCommit { .. }
                )
            })
    }

    /// `commit CONV from WHO KIND`: each device of WHO that is in the group queues the change.
    pub(super) fn commit_action(&mut self, conv: &str, who: &Target, kind: CommitKind) {
        let index = self.conversation_ids[conv];
        if kind == CommitKind::Start {
            self.start_dm(index, who);
            return;
        }
        let id = self.conversations[index].id;
        let group_kind = self.conversations[index].kind;
        let declared = self.conversations[index].members.clone();
        for device in self.resolve(who) {
            if !self.sends_to(index, device) {
                continue;
            }
            let Some(members) = self
                .node(device)
                .and_then(|n| n.groups())
                .map(|g| g.mls_members(id))
            else {
                continue;
            };
            let me = self.actors[device as usize].device;
            let intent = match &kind {
                CommitKind::Update => Some(Intent::Update),
                CommitKind::Leave => Some(Intent::Leave),
                CommitKind::Start => unreachable!("handled above"),
                CommitKind::Admin(user) => {
                    let user = super::federation::user_id(&self.scenario, user);
                    let admin = sund_model::mls::group_ops::Role::Admin as u8;
                    Some(Intent::SetRole(user.to_bytes().into(), admin))
                }
                CommitKind::Add => {
                    // One intent per domain: this device's own, then each other one.
                    let mut users: BTreeMap<Option<String>, Vec<UserId>> = BTreeMap::new();
                    for &m in &declared {
                        let user = super::federation::user_id(&self.scenario, self.user_name(m));
                        let missing = !members.contains(&self.actors[m as usize].device);
                        let of_domain = users.entry(self.foreign_domain(device, m)).or_default();
                        if missing && !of_domain.contains(&user) {
                            of_domain.push(user);
                        }
                    }
                    let mut intents =
                        users
                            .into_iter()
                            .filter(|(_, u)| !u.is_empty())
                            .map(|(domain, users)| {
                                let users = users.iter().map(|u| u.to_bytes().into()).collect();
                                match domain {
                                    None => Intent::AddUsers(users),
                                    Some(domain) => Intent::AddForeign { domain, users },
                                }
                            });
                    let first = intents.next();
                    for later in intents {
                        self.with_node(device, |n, now| {
                            let _ = n.change_group(now, id, later);
                        });
                    }
                    first
                }
                CommitKind::Remove => {
                    // A DM member removes only its own user's devices; in a room, anyone but
                    // itself (the gateway refuses what its role does not allow).
                    let own = self.user_name(device).to_string();
                    let candidates: Vec<DeviceId> = declared
                        .iter()
                        .filter(|&&m| {
                            let d = self.actors[m as usize].device;
                            d != me
                                && members.contains(&d)
                                && (group_kind != Some(GroupKind::Dm) || self.user_name(m) == own)
                        })
                        .map(|&m| self.actors[m as usize].device)
                        .collect();
                    (!candidates.is_empty()).then(|| {
                        let pick = candidates[self.fault_rng.index(candidates.len())];
                        Intent::RemoveDevice(pick.to_bytes().into())
                    })
                }
            };
            if let Some(intent) = intent {
                self.with_node(device, |n, now| {
                    let _ = n.change_group(now, id, intent);
                });
            }
        }
    }

    /// Why an MLS conversation has not converged: every member device the gateway lists has
    /// read to the head, has nothing queued, and shares the gateway's epoch and one epoch
    /// authenticator.
    pub(super) fn group_not_converged(&self, c: &SimConversation, g: &Gateway) -> Option<String> {
        let conv = c.id;
        let Some(group) = g.group(conv) else {
            if self.creation_abandoned(c) {
                return None;
            }
            return Some(format!("{conv} was never created"));
        };
        let head = g.conversation_head(conv).unwrap_or(0);
        let mut agreed: Option<(String, Vec<u8>)> = None;
        for &device in group.devices().keys() {
            let Some(&a) = self
                .devices
                .iter()
                .find(|&&a| self.actors[a as usize].device == device)
            else {
                continue;
            };
            if self.is_revoked(a) {
                continue; // it never reads again; its removal is `crl-converge`'s business
            }
            let name = &self.actors[a as usize].name;
            let Some(node) = self.node(a) else {
                return Some(format!("{name} is down"));
            };
            let upto = self.checker.delivered_upto(a, conv);
            if upto != head {
                return Some(format!("{name} has read {conv} up to seq {upto} of {head}"));
            }
            let groups = node.groups().expect("simulated devices run MLS");
            let Some(entry) = groups.entry(conv) else {
                return Some(format!(
                    "{name} is a member of {conv} but has not joined it"
                ));
            };
            if entry.status != GroupStatus::Synchronized || !entry.intents.is_empty() {
                return Some(format!(
                    "{name} is {:?} with {} changes queued in {conv} (first {:?}); the gateway proposed removing {:?}",
                    entry.status,
                    entry.intents.len(),
                    entry.intents.front(),
                    group.removals()
                ));
            }
            let epoch = groups.epoch(conv).unwrap_or(0);
            if epoch != group.epoch() {
                return Some(format!(
                    "{name} is at epoch {epoch} of {conv}, the gateway at {}",
                    group.epoch()
                ));
            }
            let authenticator = groups.epoch_authenticator(conv).unwrap_or_default();
            match &agreed {
                None => agreed = Some((name.clone(), authenticator)),
                Some((first, a)) if *a != authenticator => {
                    return Some(format!(
                        "{name} and {first} disagree on the epoch authenticator of {conv} at epoch {epoch}"
                    ));
                }
                Some(_) => {}
            }
        }
        None
    }
}
