//! Making commits: the front intent of a group (create, add, remove, update, set a role), or
//! the removals the gateway proposed; and what happens when the gateway refuses one.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use minicbor::bytes::ByteArray;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;

use super::{
    device_of, devices_by_leaf, free_leaves, group_id, mls_error, verify_leaf, DeviceGroups,
    GroupAction, GroupError, GroupStatus, Intent, MlsStep,
};
use crate::env::WriteBatch;
use crate::ids::{ConversationId, DeviceId, MsgId, UserId};
use crate::mls::device::DeviceMls;
use crate::mls::group_ops::{AddedDevice, GroupOps, RoleChange};
use crate::mls::key_packages::credential_with_key;
use crate::mls::{group_config_with_external_sender, sender_ratchet};
use crate::time::Instant;
use crate::wire::payload::FetchedKeyPackage;

/// A commit removing one device, declared in its authenticated data.
fn remove_one(
    group: &mut MlsGroup,
    mls: &DeviceMls,
    ops: &mut GroupOps,
    device: DeviceId,
    leaf: LeafNodeIndex,
) -> Result<(MlsMessageOut, Option<MlsMessageOut>), GroupError> {
    ops.removed.push(ByteArray::from(device.to_bytes()));
    group.set_aad(GroupOps::encode(ops));
    let (commit, welcome, _) = group
        .remove_members(mls.provider(), mls.signer(), &[leaf])
        .map_err(mls_error(MlsStep::Commit))?;
    Ok((commit, welcome))
}

/// A change dropped because some users it adds could not be added: no device of theirs is
/// known, or (another domain's) none of their packages could be checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRefusal {
    /// The conversation.
    pub conversation: ConversationId,
    /// The users left out.
    pub users: Vec<UserId>,
    /// Why their packages could not be used, if packages came.
    pub why: Option<String>,
    /// Their domain, if not the device's own.
    pub domain: Option<String>,
}

/// The packages whose credential this device can check and whose user is the one the answer
/// names, and the first reason another was left out.
fn checked_packages(
    found: &[FetchedKeyPackage],
    mls: &DeviceMls,
) -> (Vec<FetchedKeyPackage>, Option<String>) {
    let mut checked = Vec::with_capacity(found.len());
    let mut why = None;
    for fetched in found {
        let verdict = KeyPackageIn::tls_deserialize_exact(&fetched.package[..])
            .map_err(|e| format!("a KeyPackage that does not decode: {e}"))
            .and_then(|p| {
                let leaf = p.unverified_credential();
                verify_leaf(mls, &leaf.credential, leaf.signature_key.as_slice())
            });
        match verdict {
            Ok(Some(user)) if user == UserId::from_bytes(*fetched.user) => {
                checked.push(fetched.clone());
            }
            Ok(Some(_)) => {
                why.get_or_insert_with(|| "a KeyPackage certified for another user".to_string());
            }
            Ok(None) => {
                why.get_or_insert_with(|| {
                    "this device has no trust root yet to check it against".to_string()
                });
            }
            Err(e) => {
                why.get_or_insert(e);
            }
        }
    }
    (checked, why)
}

impl DeviceGroups {
    /// KeyPackages arrived for fetch `request`: the waiting conversation commits. If the
    /// gateway knows no device of a user the change names (nothing found, nothing exhausted),
    /// the change is dropped (a conversation it was to create is forgotten) and `Err` names the
    /// conversation and those users: a user who does not exist is an error, not an empty add.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub fn on_key_packages(
        &mut self,
        now: Instant,
        request: u64,
        found: &[FetchedKeyPackage],
        exhausted: usize,
        mls: &DeviceMls,
        msg_id: MsgId,
        writes: &mut WriteBatch,
    ) -> Result<Option<GroupAction>, FetchRefusal> {
        let Some(conv) = self.take_fetch(request) else {
            return Ok(None);
        };
        let ready = self
            .entries
            .get(&conv)
            .is_some_and(|e| e.status == GroupStatus::Synchronized && !e.intents.is_empty());
        if !ready {
            return Ok(None);
        }
        // Another domain's packages are checked here, before anything is made: a user none
        // of whose devices this device can check (its gateway vouched for no root of that
        // domain, or the packages are not that domain's) is an error the user hears, not an
        // add that silently adds nobody.
        let domain = self.entries[&conv].intents.front().and_then(Intent::domain);
        let foreign = domain.is_some();
        let (checked, why) = if foreign {
            checked_packages(found, mls)
        } else {
            (found.to_vec(), None)
        };
        let found = &checked[..];
        if exhausted == 0 || why.is_some() {
            let unknown = self.unknown_users(conv, found);
            if !unknown.is_empty() {
                let entry = self.entries.get_mut(&conv).expect("ready above");
                let creating = matches!(entry.intents.front(), Some(Intent::Create { .. }))
                    && !self.groups.contains_key(&conv);
                if creating {
                    self.entries.remove(&conv);
                    writes.delete(super::NODE_GROUPS_TABLE, conv.to_bytes().to_vec());
                } else {
                    entry.intents.pop_front();
                    self.persist(conv, writes);
                }
                return Err(FetchRefusal {
                    conversation: conv,
                    users: unknown,
                    why,
                    domain,
                });
            }
        }
        Ok(self.commit(now, conv, found, mls, msg_id, writes))
    }

    /// The users the front intent of `conv` adds (other than this device's own) of whom
    /// `found` holds no device.
    fn unknown_users(&self, conv: ConversationId, found: &[FetchedKeyPackage]) -> Vec<UserId> {
        let users = match self.entries[&conv].intents.front() {
            Some(
                Intent::Create { users }
                | Intent::AddUsers(users)
                | Intent::AddForeign { users, .. },
            ) => users,
            _ => return Vec::new(),
        };
        users
            .iter()
            .map(|u| UserId::from_bytes(**u))
            .filter(|u| Some(*u) != self.user)
            .filter(|u| !found.iter().any(|f| UserId::from_bytes(*f.user) == *u))
            .collect()
    }

    /// Makes the commit for the front intent of `conv` (with `found` packages for adds).
    pub(super) fn commit(
        &mut self,
        now: Instant,
        conv: ConversationId,
        found: &[FetchedKeyPackage],
        mls: &DeviceMls,
        msg_id: MsgId,
        writes: &mut WriteBatch,
    ) -> Option<GroupAction> {
        let transaction = mls.provider().transaction();
        let result = self.try_commit(now, conv, found, mls, msg_id);
        match result {
            Ok(Some((body, welcome, ops, creating, pending_only))) => {
                transaction.commit(writes);
                let epoch = self.epoch(conv).unwrap_or(0);
                let entry = self.entries.get_mut(&conv).expect("entry exists");
                let intent = (!pending_only).then(|| entry.intents[0].clone());
                entry.status = GroupStatus::PendingCommit {
                    msg_id: msg_id.to_bytes().into(),
                    epoch,
                    ops,
                    creating,
                    pending_only,
                    intent,
                };
                self.persist(conv, writes);
                Some(GroupAction::Submit {
                    conversation: conv,
                    msg_id,
                    body,
                    welcome,
                })
            }
            Ok(None) => {
                // Nothing left to do for this intent (everyone is in, or the target is gone).
                transaction.commit(writes);
                let entry = self.entries.get_mut(&conv).expect("entry exists");
                entry.intents.pop_front();
                self.persist(conv, writes);
                None
            }
            Err(_) => {
                // The intent cannot be carried out (for example a package that does not
                // verify): drop it rather than retry forever.
                drop(transaction);
                let entry = self.entries.get_mut(&conv).expect("entry exists");
                entry.intents.pop_front();
                self.persist(conv, writes);
                None
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn try_commit(
        &mut self,
        now: Instant,
        conv: ConversationId,
        found: &[FetchedKeyPackage],
        mls: &DeviceMls,
        _msg_id: MsgId,
    ) -> Result<Option<(Bytes, Option<Bytes>, Vec<u8>, bool, bool)>, GroupError> {
        let provider = mls.provider();
        let signer = mls.signer();
        let entry = &self.entries[&conv];
        let intent = entry.intents[0].clone();
        let creating = matches!(intent, Intent::Create { .. }) && !self.groups.contains_key(&conv);
        if let Some(commit) = self.commit_pending(conv, mls)? {
            // Removals the gateway proposed go first, alone: a commit removes one device, and
            // the intent's own change follows in the next epoch.
            return Ok(Some(commit));
        }
        if intent == Intent::CommitPending {
            return Ok(None); // someone else committed them already
        }
        if creating {
            let config = group_config_with_external_sender(
                mls.lifetime_policy(),
                now,
                self.gateway_key.as_deref(),
                sender_ratchet(mls.decrypt_sample().is_some()),
            );
            let group = MlsGroup::new_with_group_id(
                provider,
                signer,
                &config,
                group_id(conv),
                credential_with_key(mls.identity(), signer),
            )
            .map_err(mls_error(MlsStep::Create))?;
            self.groups.insert(conv, group);
        }
        let entry = &self.entries[&conv];
        let group = self
            .groups
            .get_mut(&conv)
            .ok_or(GroupError::NotInGroup(conv))?;
        let members: BTreeMap<DeviceId, LeafNodeIndex> = devices_by_leaf(group)
            .into_iter()
            .map(|(leaf, device)| (device, leaf))
            .collect();
        let mut ops = GroupOps {
            create: creating.then_some(entry.kind),
            dm_with: creating.then(|| dm_with(entry)).flatten(),
            ..GroupOps::default()
        };
        let commit = match intent {
            Intent::Create { .. } | Intent::AddUsers(_) | Intent::AddForeign { .. } => {
                let occupied: BTreeSet<u32> = members.values().map(|l| l.u32()).collect();
                let mut free = free_leaves(occupied);
                let mut packages = Vec::new();
                for fetched in found {
                    let device = DeviceId::from_bytes(*fetched.device);
                    if device == self.device || members.contains_key(&device) {
                        continue;
                    }
                    let Ok(package) = KeyPackageIn::tls_deserialize_exact(&fetched.package[..])
                        .map_err(mls_error(MlsStep::Decode))
                        .and_then(|p| {
                            p.validate(provider.crypto(), ProtocolVersion::Mls10)
                                .map_err(mls_error(MlsStep::Verify))
                        })
                    else {
                        continue; // a bad package leaves its device out, not the others
                    };
                    let leaf_node = package.leaf_node();
                    if device_of(leaf_node.credential()) != Some(device) {
                        continue;
                    }
                    let user = UserId::from_bytes(*fetched.user);
                    // The package must be certified for the user the gateway says it is of.
                    match verify_leaf(
                        mls,
                        leaf_node.credential(),
                        leaf_node.signature_key().as_slice(),
                    ) {
                        Ok(None) => {}
                        Ok(Some(certified)) if certified == user => {}
                        Ok(Some(_)) | Err(_) => continue,
                    }
                    let leaf = free.next().expect("an endless supply of leaves");
                    ops.added.push(AddedDevice::new(device, user, leaf));
                    if let Some(domain) = intent.domain() {
                        ops.domains.get_or_insert_with(Vec::new).push(
                            crate::mls::group_ops::AddedDomain {
                                device: ByteArray::from(device.to_bytes()),
                                domain,
                            },
                        );
                    }
                    packages.push(package);
                }
                if packages.is_empty() && !creating {
                    return Ok(None);
                }
                group.set_aad(ops.encode());
                if packages.is_empty() {
                    let bundle = group
                        .self_update(provider, signer, LeafNodeParameters::default())
                        .map_err(mls_error(MlsStep::Commit))?;
                    (bundle.into_commit(), None)
                } else {
                    let (commit, welcome, _) = group
                        .add_members(provider, signer, &packages)
                        .map_err(mls_error(MlsStep::Commit))?;
                    (commit, Some(welcome))
                }
            }
            Intent::RemoveUser(user) => {
                let user = UserId::from_bytes(*user);
                let target = entry
                    .members
                    .iter()
                    .map(|m| (DeviceId::from_bytes(*m.device), UserId::from_bytes(*m.user)))
                    .filter(|(d, u)| *u == user && *d != self.device)
                    .find_map(|(d, _)| members.get(&d).map(|leaf| (d, *leaf)));
                let Some((device, leaf)) = target else {
                    return Ok(None);
                };
                remove_one(group, mls, &mut ops, device, leaf)?
            }
            Intent::RemoveDevice(device) => {
                let device = DeviceId::from_bytes(*device);
                let Some(leaf) = members.get(&device).copied() else {
                    return Ok(None);
                };
                if device == self.device {
                    return Err(GroupError::mls(
                        MlsStep::Commit,
                        "a member cannot commit its own removal",
                    ));
                }
                remove_one(group, mls, &mut ops, device, leaf)?
            }
            Intent::Leave | Intent::CommitPending => return Ok(None),
            Intent::Update | Intent::SetRole(..) => {
                if let Intent::SetRole(user, role) = intent {
                    ops.roles.push(RoleChange { user, role });
                }
                group.set_aad(ops.encode());
                let bundle = group
                    .self_update(provider, signer, LeafNodeParameters::default())
                    .map_err(mls_error(MlsStep::Commit))?;
                (bundle.into_commit(), None)
            }
        };
        let (commit, welcome) = commit;
        let body = commit.to_bytes().map_err(mls_error(MlsStep::Encode))?;
        let welcome = match welcome {
            Some(w) => Some(Bytes::from(
                w.to_bytes().map_err(mls_error(MlsStep::Encode))?,
            )),
            None => None,
        };
        Ok(Some((
            Bytes::from(body),
            welcome,
            ops.encode(),
            creating,
            false,
        )))
    }

    /// If the gateway's proposals wait in `conv`, commits them (and nothing else).
    #[allow(clippy::type_complexity)]
    fn commit_pending(
        &mut self,
        conv: ConversationId,
        mls: &DeviceMls,
    ) -> Result<Option<(Bytes, Option<Bytes>, Vec<u8>, bool, bool)>, GroupError> {
        let Some(group) = self.groups.get_mut(&conv) else {
            return Ok(None);
        };
        let by_leaf: BTreeMap<LeafNodeIndex, DeviceId> = devices_by_leaf(group);
        let removed: Vec<DeviceId> = group
            .pending_proposals()
            .filter_map(|p| match p.proposal() {
                Proposal::Remove(r) => by_leaf.get(&r.removed()).copied(),
                _ => None,
            })
            .collect();
        let external_sender = group.pending_proposals().find_map(|p| match p.proposal() {
            Proposal::GroupContextExtensions(gce) => {
                super::inbound::proposed_external_sender(gce.extensions())
            }
            _ => None,
        });
        if group.pending_proposals().next().is_none() {
            return Ok(None);
        }
        let ops = GroupOps {
            removed: removed
                .iter()
                .map(|d| ByteArray::from(d.to_bytes()))
                .collect(),
            external_sender: external_sender.map(ByteArray::from),
            ..GroupOps::default()
        };
        group.set_aad(ops.encode());
        let bundle = group
            .self_update(mls.provider(), mls.signer(), LeafNodeParameters::default())
            .map_err(mls_error(MlsStep::Commit))?;
        let body = bundle
            .into_commit()
            .to_bytes()
            .map_err(mls_error(MlsStep::Encode))?;
        Ok(Some((Bytes::from(body), None, ops.encode(), false, true)))
    }

    /// The gateway refused our commit `msg_id`: with `stale_epoch`, another commit won `epoch`;
    /// we drop ours and retry the change once we have processed up to `current`. With any other
    /// refusal the change itself is not allowed, and is dropped. Returns the refused intent.
    ///
    /// A commit that *creates* the conversation: `stale_epoch` means another device created it
    /// first (its Welcome will bring us in); `forbidden` (a device it added was revoked
    /// meanwhile: the gateway has dropped that device's packages, and our CRL names it by now)
    /// means it is made again from freshly fetched packages; anything else ends the request,
    /// and the conversation is forgotten (it never existed).
    #[allow(clippy::too_many_arguments)]
    pub fn on_commit_refused(
        &mut self,
        conv: ConversationId,
        msg_id: MsgId,
        stale: bool,
        forbidden: bool,
        current: u64,
        mls: &DeviceMls,
        writes: &mut WriteBatch,
    ) -> Option<Intent> {
        let entry = self.entries.get_mut(&conv)?;
        let GroupStatus::PendingCommit {
            msg_id: pending,
            creating,
            ..
        } = &entry.status
        else {
            return None;
        };
        if **pending != msg_id.to_bytes() {
            return None;
        }
        let creating = *creating;
        let transaction = mls.provider().transaction();
        if creating {
            if let Some(mut group) = self.groups.remove(&conv) {
                let _ = group.delete(mls.provider().storage());
            }
            if stale {
                // Another device created this conversation first: its Welcome will bring us in.
                entry.status = GroupStatus::PendingWelcome;
                if let Some(Intent::Create { users }) = entry.intents.front().cloned() {
                    entry.intents[0] = Intent::AddUsers(users);
                }
            } else if forbidden {
                // Asked for, not made: the creation starts again (fetch, commit).
                entry.status = GroupStatus::Synchronized;
                transaction.commit(writes);
                self.persist(conv, writes);
                return None;
            } else {
                let refused = entry.intents.pop_front();
                self.entries.remove(&conv);
                transaction.commit(writes);
                writes.delete(super::NODE_GROUPS_TABLE, conv.to_bytes().to_vec());
                return refused;
            }
        } else {
            if let Some(group) = self.groups.get_mut(&conv) {
                let _ = group.clear_pending_commit(mls.provider().storage());
            }
            entry.status = GroupStatus::Synchronized;
        }
        let refused = if stale || creating {
            entry.retry_at_epoch = current;
            None
        } else {
            entry.intents.pop_front()
        };
        transaction.commit(writes);
        self.persist(conv, writes);
        refused
    }
}

/// The other domain of a DM this device is making with a user of another domain: the domain
/// of the users its queued changes add (the creating commit adds only our own devices).
fn dm_with(entry: &super::GroupEntry) -> Option<String> {
    if entry.kind != crate::mls::group_ops::GroupKind::Dm as u8 {
        return None;
    }
    entry.intents.iter().find_map(Intent::domain)
}
