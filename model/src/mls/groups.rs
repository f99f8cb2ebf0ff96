//! A device's MLS groups: DMs and rooms as the node sees them.
//!
//! Each conversation that is a group has an entry here with a persisted status:
//!
//! - `Synchronized`: in the group at the MLS group's epoch, no commit of ours outstanding;
//! - `PendingCommit`: our commit for an epoch is out. It is applied only when it comes back from
//!   the gateway with its seq (echo before apply, RFC 9750); if the gateway answers
//!   `stale_epoch`, or another member's commit for that epoch arrives first, it is dropped and the
//!   change it carried is retried in the new epoch;
//! - `PendingWelcome`: we lost the race to create the conversation and wait for the winner's
//!   Welcome;
//! - `Removed`: a commit removed this device.
//!
//! Changes are queued as intents and made one commit at a time. A commit removes at most one
//! device (see `mls` on hash-seed ordering), so removing a user with several devices takes one
//! commit per device. Every commit declares what it does in its authenticated data
//! ([`GroupOps`]); receivers check the declaration against the commit before merging it.
//!
//! The disconnected state of the state machine is the node's link, not a group status:
//! while offline, nothing here changes, and intents wait.
//!
//! Every operation hands openmls's writes and the entry's record to the node's write batch, so
//! the group state, the cursor and the outbox change in one store commit.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use minicbor::bytes::ByteArray;
use minicbor::{Decode, Encode};
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;

use super::device::DeviceMls;
use super::key_packages::credential_with_key;
use super::{group_config_with_external_sender, join_config, sender_ratchet};
use crate::env::{StoreError, StoreRead, Table, WriteBatch};
use crate::ids::{ConversationId, DeviceId, MsgId, UserId};
use crate::mls::group_ops::{AddedDevice, GroupKind, GroupOps, Role, RoleChange};
use crate::time::Instant;
use crate::trust::credential::device_of_identity;
use crate::wire::payload::{FetchedKeyPackage, RosterEntry, Welcome, FETCH_USERS_MAX};

/// How long a proposed removal may wait per rank before the next member commits it (see
/// `DeviceGroups::take_over_stalled_proposals`).
pub const PROPOSAL_TAKEOVER: core::time::Duration = core::time::Duration::from_secs(10);

/// How long a leave request waits for its removal before it is asked again.
pub const LEAVE_RESEND: core::time::Duration = core::time::Duration::from_secs(3);

/// Table of the node's group entries: conversation id → CBOR record.
pub const NODE_GROUPS_TABLE: Table = Table("node_groups");
/// Table of the plaintexts of our own messages until they come back sequenced: msg id →
/// plaintext (we cannot decrypt our own MLS messages).
pub const NODE_SENT_TABLE: Table = Table("node_sent");

/// Where this device stands in a group.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum GroupStatus {
    /// In the group, no commit of ours outstanding.
    #[n(0)]
    Synchronized,
    /// Our commit for `epoch` is out as `msg_id`.
    #[n(1)]
    PendingCommit {
        /// The commit's message id.
        #[n(0)]
        msg_id: ByteArray<16>,
        /// The epoch it was made in.
        #[n(1)]
        epoch: u64,
        /// Its declaration (applied to the roster when it is merged).
        #[n(2)]
        ops: Vec<u8>,
        /// True if the commit creates the conversation.
        #[n(3)]
        creating: bool,
        /// True if it only commits proposals the gateway made (the front intent waits).
        #[n(4)]
        pending_only: bool,
        /// The intent it carries out (done when the commit comes back).
        #[n(5)]
        intent: Option<Intent>,
    },
    /// Waiting for a Welcome (we lost the race to create the conversation).
    #[n(2)]
    PendingWelcome,
    /// A commit at `seq` removed this device.
    #[n(3)]
    Removed {
        /// The removing commit's seq.
        #[n(0)]
        seq: u64,
    },
}

/// A change this device wants to make to a group.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum Intent {
    /// Create the group and add every device of `users` (and our own other devices).
    #[n(0)]
    Create {
        /// Users whose devices join.
        #[n(0)]
        users: Vec<ByteArray<16>>,
    },
    /// Add every device of these users that is not yet a member.
    #[n(1)]
    AddUsers(#[n(0)] Vec<ByteArray<16>>),
    /// Remove every device of this user, one commit each.
    #[n(2)]
    RemoveUser(#[n(0)] ByteArray<16>),
    /// Remove one device.
    #[n(3)]
    RemoveDevice(#[n(0)] ByteArray<16>),
    /// Refresh our leaf (post-compromise security).
    #[n(4)]
    Update,
    /// Give a user a role.
    #[n(5)]
    SetRole(#[n(0)] ByteArray<16>, #[n(1)] u8),
    /// Ask the gateway to remove this device (it proposes the removal; a member commits it).
    #[n(6)]
    Leave,
    /// Commit the removals the gateway proposed (this device was chosen to).
    #[n(7)]
    CommitPending,
}

impl Intent {
    fn users(&self) -> Option<Vec<UserId>> {
        match self {
            Intent::Create { users } | Intent::AddUsers(users) => {
                Some(users.iter().map(|u| UserId::from_bytes(**u)).collect())
            }
            _ => None,
        }
    }
}

/// One group as this device keeps it.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct GroupEntry {
    /// DM or room (`GroupKind` as a number).
    #[n(0)]
    pub kind: u8,
    /// Where we stand.
    #[n(1)]
    pub status: GroupStatus,
    /// Changes still to make, in order.
    #[n(2)]
    pub intents: VecDeque<Intent>,
    /// Member devices and their users.
    #[n(3)]
    pub members: Vec<RosterEntry>,
    /// Retry the front intent only once the group has reached this epoch (after `stale_epoch`).
    #[n(4)]
    pub retry_at_epoch: u64,
}

impl GroupEntry {
    /// The kind, decoded.
    pub fn group_kind(&self) -> GroupKind {
        GroupKind::from_u8(self.kind).unwrap_or(GroupKind::Room)
    }

    fn user_of(&self, device: DeviceId) -> Option<UserId> {
        self.members
            .iter()
            .find(|m| DeviceId::from_bytes(*m.device) == device)
            .map(|m| UserId::from_bytes(*m.user))
    }

    fn apply_ops(&mut self, ops: &GroupOps) {
        for (device, user) in ops.added_devices() {
            if self.user_of(device).is_none() {
                self.members.push(RosterEntry {
                    device: device.to_bytes().into(),
                    user: user.to_bytes().into(),
                });
            }
        }
        let removed: BTreeSet<DeviceId> = ops.removed_devices().collect();
        self.members
            .retain(|m| !removed.contains(&DeviceId::from_bytes(*m.device)));
        self.members.sort_by_key(|m| *m.device);
    }
}

/// What the node must do for its groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupAction {
    /// Put this MLS message in the outbox under `msg_id` (a commit, with the Welcome for the
    /// devices it adds).
    Submit {
        /// Conversation.
        conversation: ConversationId,
        /// Chosen by the node before the commit was made.
        msg_id: MsgId,
        /// The commit.
        body: Bytes,
        /// Its Welcome.
        welcome: Option<Bytes>,
    },
    /// Ask the gateway to remove this device from `conversation`.
    Leave(ConversationId),
    /// Ask the gateway for KeyPackages of these users' devices; the answer names `request`.
    Fetch {
        /// Request id (the fetch frame's seq; the gateway echoes it).
        request: u64,
        /// Users whose devices are wanted.
        users: Vec<UserId>,
    },
    /// We joined at `seq`: the conversation's cursor moves there, and `seq` is acknowledged.
    Joined {
        /// Conversation.
        conversation: ConversationId,
        /// The seq of the commit that added us.
        seq: u64,
    },
    /// Acknowledge `seq` (a removal notice).
    Acknowledge {
        /// Conversation.
        conversation: ConversationId,
        /// The notice's seq.
        seq: u64,
    },
}

/// What processing one sequenced message gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Processed {
    /// An application message, decrypted (or our own, from the sent table).
    Message(Bytes),
    /// A commit was merged: the group is at `epoch`.
    Commit {
        /// The new epoch.
        epoch: u64,
        /// Devices it added.
        added: Vec<DeviceId>,
        /// Devices it removed.
        removed: Vec<DeviceId>,
    },
    /// The message could not be used; delivery goes on after it.
    Failed(String),
    /// An application message this device was not drawn to decrypt (simulation sampling).
    Skipped,
    /// The gateway proposed to remove `device`; the proposal waits for a commit.
    RemovalProposed {
        /// The device to be removed.
        device: DeviceId,
    },
    /// Nothing for the application (a message for a group we are not in any more).
    Nothing,
}

/// Why a group command was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// The device runs without MLS or without a user.
    #[error("this device has no MLS identity or no user; run `sund init --user NAME`")]
    NoIdentity,
    /// Not a group this device is in.
    #[error("{0} is not a conversation this device is in")]
    NotInGroup(ConversationId),
    /// A removal the gateway proposed waits for a member's commit; MLS allows no application
    /// message until then (RFC 9420 §12.2). Try again in a moment.
    #[error("a removal is being committed in {0}; try again in a moment")]
    ProposalPending(ConversationId),
    /// The group refused the operation.
    #[error("{0}")]
    Mls(String),
}

/// All of a device's groups.
pub struct DeviceGroups {
    device: DeviceId,
    user: Option<UserId>,
    entries: BTreeMap<ConversationId, GroupEntry>,
    groups: BTreeMap<ConversationId, MlsGroup>,
    sent: BTreeMap<MsgId, Bytes>,
    /// The gateway's signature key, named as external sender in the groups this device creates.
    gateway_key: Option<Vec<u8>>,
    /// When this device first saw each group's pending proposals (for the takeover rule).
    proposals_seen: BTreeMap<ConversationId, Instant>,
    /// When each leave request last went out (asked again after [`LEAVE_RESEND`]: a frame
    /// can be lost).
    leave_asked: BTreeMap<ConversationId, Instant>,
    /// KeyPackage fetches out: request id → conversation waiting, and when it was asked.
    fetches: BTreeMap<u64, (ConversationId, Instant)>,
    next_request: u64,
    /// Our application messages the gateway refused as made in an old epoch: encrypted again
    /// once the group reaches the epoch named (not persisted: after a restart, the resend is
    /// refused again and lands here again).
    stale_messages: BTreeMap<MsgId, (ConversationId, u64)>,
}

impl core::fmt::Debug for DeviceGroups {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeviceGroups")
            .field("entries", &self.entries.len())
            .field("fetches", &self.fetches)
            .finish_non_exhaustive()
    }
}

fn corrupt(table: Table, reason: String) -> StoreError {
    StoreError::Corrupt {
        table: table.0,
        reason,
    }
}

fn mls_error(e: impl core::fmt::Debug) -> GroupError {
    GroupError::Mls(format!("{e:?}"))
}

fn group_id(conv: ConversationId) -> GroupId {
    GroupId::from_slice(&conv.to_bytes())
}

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
        .map_err(mls_error)?;
    Ok((commit, welcome))
}

/// The group's member devices by leaf (a leaf whose credential names no Sund device is left
/// out).
fn devices_by_leaf(group: &MlsGroup) -> BTreeMap<LeafNodeIndex, DeviceId> {
    group
        .members()
        .filter_map(|m| Some((m.index, device_of(&m.credential)?)))
        .collect()
}

fn device_of(member_credential: &Credential) -> Option<DeviceId> {
    let basic = BasicCredential::try_from(member_credential.clone()).ok()?;
    device_of_identity(basic.identity())
}

/// Checks the certificate binding of a device's leaf (see `trust::credential`): its user, or
/// `None` if this device cannot check yet (no trust root pinned).
fn verify_leaf(
    mls: &DeviceMls,
    credential: &Credential,
    signature_key: &[u8],
) -> Result<Option<UserId>, String> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| "a credential that is not a basic credential".to_string())?;
    mls.verify_member(basic.identity(), signature_key)
}

impl DeviceGroups {
    /// Loads every group entry, the MLS groups behind them, and our unsent plaintexts.
    pub fn recover(
        device: DeviceId,
        user: Option<UserId>,
        store: &dyn StoreRead,
        mls: &DeviceMls,
    ) -> Result<DeviceGroups, StoreError> {
        let mut entries = BTreeMap::new();
        crate::env::scan_all(store, NODE_GROUPS_TABLE, |key, value| {
            let id: [u8; 16] = key
                .try_into()
                .map_err(|_| corrupt(NODE_GROUPS_TABLE, "key length".into()))?;
            let entry: GroupEntry = minicbor::decode(value)
                .map_err(|e| corrupt(NODE_GROUPS_TABLE, format!("entry: {e}")))?;
            entries.insert(ConversationId::from_bytes(id), entry);
            Ok(())
        })?;
        let mut sent = BTreeMap::new();
        crate::env::scan_all(store, NODE_SENT_TABLE, |key, value| {
            let id: [u8; 16] = key
                .try_into()
                .map_err(|_| corrupt(NODE_SENT_TABLE, "key length".into()))?;
            sent.insert(MsgId::from_bytes(id), Bytes::copy_from_slice(value));
            Ok(())
        })?;
        let mut groups = BTreeMap::new();
        for (conv, entry) in &entries {
            if matches!(
                entry.status,
                GroupStatus::PendingWelcome | GroupStatus::Removed { .. }
            ) {
                continue;
            }
            let loaded = MlsGroup::load(mls.provider().storage(), &group_id(*conv))
                .map_err(|e| corrupt(super::MLS_TABLE, format!("group {conv}: {e:?}")))?;
            match loaded {
                Some(group) => {
                    groups.insert(*conv, group);
                }
                // Asked for, not made yet: the group is created with its first commit.
                None if entry.status == GroupStatus::Synchronized
                    && matches!(entry.intents.front(), Some(Intent::Create { .. })) => {}
                None => {
                    return Err(corrupt(
                        super::MLS_TABLE,
                        format!("group {conv} is missing"),
                    ))
                }
            }
        }
        Ok(DeviceGroups {
            device,
            user,
            entries,
            groups,
            sent,
            gateway_key: None,
            leave_asked: BTreeMap::new(),
            proposals_seen: BTreeMap::new(),
            fetches: BTreeMap::new(),
            next_request: 1,
            stale_messages: BTreeMap::new(),
        })
    }

    /// The entry of a conversation, if it is a group this device knows.
    pub fn entry(&self, conv: ConversationId) -> Option<&GroupEntry> {
        self.entries.get(&conv)
    }

    /// Every group conversation this device knows, with its entry.
    pub fn entries(&self) -> impl Iterator<Item = (&ConversationId, &GroupEntry)> {
        self.entries.iter()
    }

    /// The MLS epoch of a group we are in.
    pub fn epoch(&self, conv: ConversationId) -> Option<u64> {
        self.groups.get(&conv).map(|g| g.epoch().as_u64())
    }

    /// The epoch authenticator (members agree on it exactly when they share the epoch's state).
    pub fn epoch_authenticator(&self, conv: ConversationId) -> Option<Vec<u8>> {
        self.groups
            .get(&conv)
            .map(|g| g.epoch_authenticator().as_slice().to_vec())
    }

    /// Member devices as MLS sees them.
    pub fn mls_members(&self, conv: ConversationId) -> Vec<DeviceId> {
        self.groups
            .get(&conv)
            .map(|g| {
                g.members()
                    .filter_map(|m| device_of(&m.credential))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// True if `conv` is a group conversation (so messages are MLS).
    pub fn is_group(&self, conv: ConversationId) -> bool {
        self.entries.contains_key(&conv)
    }

    fn persist(&self, conv: ConversationId, writes: &mut WriteBatch) {
        let entry = &self.entries[&conv];
        let value = minicbor::to_vec(entry).expect("encoding into a Vec cannot fail");
        writes.put(NODE_GROUPS_TABLE, conv.to_bytes().to_vec(), value);
    }

    /// Starts a new conversation: the group is created, and every device of `users` (and our
    /// own other devices) added, when the KeyPackages arrive.
    pub fn create(
        &mut self,
        conv: ConversationId,
        kind: GroupKind,
        users: &[UserId],
        writes: &mut WriteBatch,
    ) -> Result<(), GroupError> {
        let Some(user) = self.user else {
            return Err(GroupError::NoIdentity);
        };
        if self.entries.contains_key(&conv) {
            return Ok(()); // creating the same DM twice is the same request
        }
        let mut wanted: Vec<ByteArray<16>> = Vec::new();
        for u in [&user].into_iter().chain(users) {
            let u = ByteArray::from(u.to_bytes());
            if !wanted.contains(&u) {
                wanted.push(u);
            }
        }
        // One fetch names at most FETCH_USERS_MAX users: the creating commit adds the first
        // ones, later commits the rest.
        let mut chunks = wanted.chunks(FETCH_USERS_MAX);
        let first = chunks.next().unwrap_or_default().to_vec();
        let mut intents = VecDeque::from([Intent::Create { users: first }]);
        intents.extend(chunks.map(|c| Intent::AddUsers(c.to_vec())));
        let entry = GroupEntry {
            kind: kind as u8,
            status: GroupStatus::Synchronized,
            intents,
            members: vec![RosterEntry {
                device: self.device.to_bytes().into(),
                user: user.to_bytes().into(),
            }],
            retry_at_epoch: 0,
        };
        self.entries.insert(conv, entry);
        self.persist(conv, writes);
        Ok(())
    }

    /// Queues a change to a group we are in.
    pub fn request(
        &mut self,
        conv: ConversationId,
        intent: Intent,
        writes: &mut WriteBatch,
    ) -> Result<(), GroupError> {
        let entry = self
            .entries
            .get_mut(&conv)
            .filter(|e| !matches!(e.status, GroupStatus::Removed { .. }))
            .ok_or(GroupError::NotInGroup(conv))?;
        match intent {
            Intent::AddUsers(users) if users.len() > FETCH_USERS_MAX => {
                for chunk in users.chunks(FETCH_USERS_MAX) {
                    entry.intents.push_back(Intent::AddUsers(chunk.to_vec()));
                }
            }
            intent => entry.intents.push_back(intent),
        }
        self.persist(conv, writes);
        Ok(())
    }

    /// The connection dropped: outstanding fetches will not be answered, leave requests are
    /// asked again.
    pub fn connection_lost(&mut self) {
        self.fetches.clear();
        self.leave_asked.clear();
    }

    /// The gateway's external-sender key (from its `HelloOk`).
    pub fn set_gateway_key(&mut self, key: Option<Vec<u8>>) {
        self.gateway_key = key;
    }

    /// See [`DeviceGroups::set_gateway_key`].
    pub fn gateway_key(&self) -> Option<&[u8]> {
        self.gateway_key.as_deref()
    }

    /// A fetch was refused (rate limit): the conversation waiting for it tries again at its
    /// next chance.
    pub fn fetch_refused(&mut self, request: u64) {
        self.fetches.remove(&request);
    }

    /// Forgets fetches unanswered for `timeout` (a frame was lost), so they are asked again.
    pub fn expire_fetches(&mut self, now: Instant, timeout: core::time::Duration) {
        self.fetches
            .retain(|_, (_, asked)| now.saturating_since(*asked) < timeout);
    }

    fn fetching(&self, conv: ConversationId) -> bool {
        self.fetches.values().any(|(c, _)| *c == conv)
    }

    /// Moves every group whose front intent can go now: a fetch for adds, or a commit. `next_id`
    /// gives message ids for commits.
    pub fn drive(
        &mut self,
        now: Instant,
        mls: &DeviceMls,
        next_id: &mut dyn FnMut() -> MsgId,
        writes: &mut WriteBatch,
    ) -> Vec<GroupAction> {
        let mut actions = Vec::new();
        self.take_over_stalled_proposals(now, writes);
        let ready: Vec<ConversationId> = self
            .entries
            .iter()
            .filter(|(conv, e)| {
                e.status == GroupStatus::Synchronized
                    && !e.intents.is_empty()
                    && !self.fetching(**conv)
                    && self.epoch(**conv).unwrap_or(0) >= e.retry_at_epoch
            })
            .map(|(conv, _)| *conv)
            .collect();
        for conv in ready {
            let intent = self.entries[&conv].intents[0].clone();
            if intent == Intent::Leave {
                let asked = self.leave_asked.get(&conv).copied();
                if asked.is_none_or(|t| now.saturating_since(t) >= LEAVE_RESEND) {
                    self.leave_asked.insert(conv, now);
                    actions.push(GroupAction::Leave(conv));
                }
                continue;
            }
            let pending = self
                .groups
                .get(&conv)
                .is_some_and(|g| g.pending_proposals().next().is_some());
            match intent.users().filter(|_| !pending) {
                Some(users) => {
                    let request = self.next_request;
                    self.next_request += 1;
                    self.fetches.insert(request, (conv, now));
                    actions.push(GroupAction::Fetch { request, users });
                }
                None => {
                    if let Some(action) = self.commit(now, conv, &[], mls, next_id(), writes) {
                        actions.push(action);
                    }
                }
            }
        }
        actions
    }

    /// When a proposed removal waits longer than [`PROPOSAL_TAKEOVER`] times this member's rank
    /// among the possible committers (the member with the lowest leaf is rank 0 and commits at
    /// once), this member commits it: a chosen committer that stays offline stalls nobody for
    /// long, and only one member at a time steps in.
    fn take_over_stalled_proposals(&mut self, now: Instant, writes: &mut WriteBatch) {
        let mut due = Vec::new();
        for (conv, group) in &self.groups {
            let proposed: BTreeSet<LeafNodeIndex> = group
                .pending_proposals()
                .filter_map(|p| match p.proposal() {
                    Proposal::Remove(r) => Some(r.removed()),
                    _ => None,
                })
                .collect();
            if proposed.is_empty() {
                continue;
            }
            let since = *self.proposals_seen.entry(*conv).or_insert(now);
            let rank = devices_by_leaf(group)
                .into_iter()
                .filter(|(leaf, _)| !proposed.contains(leaf))
                .position(|(_, d)| d == self.device);
            let Some(rank) = rank.filter(|r| *r > 0) else {
                continue;
            };
            let wait = PROPOSAL_TAKEOVER.saturating_mul(u32::try_from(rank).unwrap_or(u32::MAX));
            if now.saturating_since(since) >= wait {
                due.push(*conv);
            }
        }
        self.proposals_seen.retain(|conv, _| {
            self.groups
                .get(conv)
                .is_some_and(|g| g.pending_proposals().next().is_some())
        });
        for conv in due {
            let Some(entry) = self.entries.get_mut(&conv) else {
                continue;
            };
            if entry.intents.front() != Some(&Intent::CommitPending) {
                entry.intents.push_front(Intent::CommitPending);
                self.persist(conv, writes);
            }
        }
    }

    /// KeyPackages arrived for fetch `request`: the waiting conversation commits.
    pub fn on_key_packages(
        &mut self,
        now: Instant,
        request: u64,
        found: &[FetchedKeyPackage],
        mls: &DeviceMls,
        msg_id: MsgId,
        writes: &mut WriteBatch,
    ) -> Option<GroupAction> {
        let (conv, _) = self.fetches.remove(&request)?;
        let ready = self
            .entries
            .get(&conv)
            .is_some_and(|e| e.status == GroupStatus::Synchronized && !e.intents.is_empty());
        if !ready {
            return None;
        }
        self.commit(now, conv, found, mls, msg_id, writes)
    }

    /// Makes the commit for the front intent of `conv` (with `found` packages for adds).
    fn commit(
        &mut self,
        now: Instant,
        conv: ConversationId,
        found: &[FetchedKeyPackage],
        mls: &DeviceMls,
        msg_id: MsgId,
        writes: &mut WriteBatch,
    ) -> Option<GroupAction> {
        let result = self.try_commit(now, conv, found, mls, msg_id);
        match result {
            Ok(Some((body, welcome, ops, creating, pending_only))) => {
                mls.provider().take_writes(writes);
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
                mls.provider().take_writes(writes);
                let entry = self.entries.get_mut(&conv).expect("entry exists");
                entry.intents.pop_front();
                self.persist(conv, writes);
                None
            }
            Err(_) => {
                // The intent cannot be carried out (for example a package that does not
                // verify): drop it rather than retry forever.
                mls.provider().discard_writes();
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
            .map_err(mls_error)?;
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
            ..GroupOps::default()
        };
        let commit = match intent {
            Intent::Create { .. } | Intent::AddUsers(_) => {
                let occupied: BTreeSet<u32> = members.values().map(|l| l.u32()).collect();
                let mut free = free_leaves(occupied);
                let mut packages = Vec::new();
                for fetched in found {
                    let device = DeviceId::from_bytes(*fetched.device);
                    if device == self.device || members.contains_key(&device) {
                        continue;
                    }
                    let Ok(package) = KeyPackageIn::tls_deserialize_exact(&fetched.package[..])
                        .map_err(mls_error)
                        .and_then(|p| {
                            p.validate(provider.crypto(), ProtocolVersion::Mls10)
                                .map_err(mls_error)
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
                    packages.push(package);
                }
                if packages.is_empty() && !creating {
                    return Ok(None);
                }
                group.set_aad(ops.encode());
                if packages.is_empty() {
                    let bundle = group
                        .self_update(provider, signer, LeafNodeParameters::default())
                        .map_err(mls_error)?;
                    (bundle.into_commit(), None)
                } else {
                    let (commit, welcome, _) = group
                        .add_members(provider, signer, &packages)
                        .map_err(mls_error)?;
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
                    return Err(GroupError::Mls(
                        "a member cannot commit its own removal".into(),
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
                    .map_err(mls_error)?;
                (bundle.into_commit(), None)
            }
        };
        let (commit, welcome) = commit;
        let body = commit.to_bytes().map_err(mls_error)?;
        let welcome = match welcome {
            Some(w) => Some(Bytes::from(w.to_bytes().map_err(mls_error)?)),
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
        if group.pending_proposals().next().is_none() {
            return Ok(None);
        }
        let ops = GroupOps {
            removed: removed
                .iter()
                .map(|d| ByteArray::from(d.to_bytes()))
                .collect(),
            ..GroupOps::default()
        };
        group.set_aad(ops.encode());
        let bundle = group
            .self_update(mls.provider(), mls.signer(), LeafNodeParameters::default())
            .map_err(mls_error)?;
        let body = bundle.into_commit().to_bytes().map_err(mls_error)?;
        Ok(Some((Bytes::from(body), None, ops.encode(), false, true)))
    }

    /// Encrypts an application message for `conv`; its plaintext is kept until it comes back
    /// sequenced.
    pub fn encrypt(
        &mut self,
        conv: ConversationId,
        msg_id: MsgId,
        plaintext: &[u8],
        mls: &DeviceMls,
        writes: &mut WriteBatch,
    ) -> Result<Bytes, GroupError> {
        let group = self
            .groups
            .get_mut(&conv)
            .filter(|_| {
                matches!(
                    self.entries.get(&conv).map(|e| &e.status),
                    Some(GroupStatus::Synchronized | GroupStatus::PendingCommit { .. })
                )
            })
            .ok_or(GroupError::NotInGroup(conv))?;
        let message = group
            .create_message(mls.provider(), mls.signer(), plaintext)
            .map_err(|e| match e {
                CreateMessageError::GroupStateError(MlsGroupStateError::PendingProposal) => {
                    GroupError::ProposalPending(conv)
                }
                other => mls_error(other),
            });
        match message.and_then(|m| m.to_bytes().map_err(mls_error)) {
            Ok(bytes) => {
                mls.provider().take_writes(writes);
                self.sent.insert(msg_id, Bytes::copy_from_slice(plaintext));
                writes.put(
                    NODE_SENT_TABLE,
                    msg_id.to_bytes().to_vec(),
                    plaintext.to_vec(),
                );
                Ok(Bytes::from(bytes))
            }
            Err(e) => {
                mls.provider().discard_writes();
                Err(e)
            }
        }
    }

    /// True if `msg_id` is one of our application messages not yet back from the gateway.
    pub fn is_own_message(&self, msg_id: MsgId) -> bool {
        self.sent.contains_key(&msg_id)
    }

    /// The gateway refused our application message as made before `epoch`: it is encrypted
    /// again once the group is there ([`DeviceGroups::reencrypt_ready`]). `sent_in` is the epoch
    /// of the copy in the outbox: a refusal of an older copy, already replaced, changes nothing.
    pub fn message_stale(
        &mut self,
        conv: ConversationId,
        msg_id: MsgId,
        epoch: u64,
        sent_in: Option<u64>,
    ) {
        if sent_in.is_some_and(|e| e >= epoch) {
            return;
        }
        self.stale_messages.insert(msg_id, (conv, epoch));
    }

    /// Encrypts again, in the group's current epoch, every stale message whose group has
    /// reached the epoch the gateway named. Returns `(msg_id, conversation, new body)`, or an
    /// error for a message that can no longer be sent (we left the group).
    #[allow(clippy::type_complexity)]
    pub fn reencrypt_ready(
        &mut self,
        mls: &DeviceMls,
        writes: &mut WriteBatch,
    ) -> Vec<(MsgId, ConversationId, Result<Bytes, GroupError>)> {
        let ready: Vec<(MsgId, ConversationId)> = self
            .stale_messages
            .iter()
            .filter(|(_, (conv, epoch))| {
                self.epoch(*conv).is_none_or(|e| e >= *epoch) || !self.is_member(*conv)
            })
            .map(|(id, (conv, _))| (*id, *conv))
            .collect();
        let mut done = Vec::new();
        for (msg_id, conv) in ready {
            let Some(plaintext) = self.sent.get(&msg_id).cloned() else {
                self.stale_messages.remove(&msg_id);
                continue;
            };
            let result = self.encrypt(conv, msg_id, &plaintext, mls, writes);
            if matches!(result, Err(GroupError::ProposalPending(_))) {
                continue; // once the removal is committed
            }
            self.stale_messages.remove(&msg_id);
            done.push((msg_id, conv, result));
        }
        done
    }

    fn is_member(&self, conv: ConversationId) -> bool {
        self.groups.contains_key(&conv)
            && self.entries.get(&conv).is_some_and(|e| {
                matches!(
                    e.status,
                    GroupStatus::Synchronized | GroupStatus::PendingCommit { .. }
                )
            })
    }

    /// Our message `msg_id` will never be sequenced (refused): forget its plaintext.
    pub fn forget_sent(&mut self, msg_id: MsgId, writes: &mut WriteBatch) {
        self.stale_messages.remove(&msg_id);
        if self.sent.remove(&msg_id).is_some() {
            writes.delete(NODE_SENT_TABLE, msg_id.to_bytes().to_vec());
        }
    }

    /// The gateway refused our commit `msg_id`: with `stale_epoch`, another commit won `epoch`;
    /// we drop ours and retry the change once we have processed up to `current`. With any other
    /// refusal the change itself is not allowed, and is dropped. Returns the refused intent.
    pub fn on_commit_refused(
        &mut self,
        conv: ConversationId,
        msg_id: MsgId,
        stale: bool,
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
        if creating {
            // Another device created this conversation first: its Welcome will bring us in.
            if let Some(mut group) = self.groups.remove(&conv) {
                let _ = group.delete(mls.provider().storage());
            }
            entry.status = GroupStatus::PendingWelcome;
            if let Some(Intent::Create { users }) = entry.intents.front().cloned() {
                entry.intents[0] = Intent::AddUsers(users);
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
        mls.provider().take_writes(writes);
        self.persist(conv, writes);
        refused
    }

    /// A Welcome from our inbox: join the group, unless we are in it already.
    /// `cursor` is how far this device has read the conversation: a Welcome beyond it means a
    /// commit removed the device (its notice was overtaken) and another added it back.
    pub fn on_welcome(
        &mut self,
        conv: ConversationId,
        notice: &Welcome,
        cursor: u64,
        mls: &DeviceMls,
        writes: &mut WriteBatch,
    ) -> Result<GroupAction, GroupError> {
        let (seq, kind, welcome, roster) = (
            notice.seq,
            notice.kind,
            &notice.welcome[..],
            &notice.members[..],
        );
        let joined = GroupAction::Joined {
            conversation: conv,
            seq,
        };
        let member = self.entries.get(&conv).is_some_and(|e| {
            matches!(
                e.status,
                GroupStatus::Synchronized
                    | GroupStatus::PendingCommit {
                        creating: false,
                        ..
                    }
            )
        });
        if member && self.groups.contains_key(&conv) && cursor >= seq {
            return Ok(GroupAction::Acknowledge {
                conversation: conv,
                seq,
            });
        }
        let provider = mls.provider();
        let sampling = mls.decrypt_sample().is_some();
        if let Some(mut lost) = self.groups.remove(&conv) {
            // Our own group lost the race to create this conversation: its records make way for
            // the group we join under the same id.
            let _ = lost.delete(provider.storage());
        }
        let result = MlsMessageIn::tls_deserialize_exact(welcome)
            .map_err(mls_error)
            .and_then(|m| match m.extract() {
                MlsMessageBodyIn::Welcome(w) => Ok(w),
                _ => Err(GroupError::Mls("not a Welcome".into())),
            })
            .and_then(|w| {
                StagedWelcome::new_from_welcome(
                    provider,
                    &join_config(sender_ratchet(sampling)),
                    w,
                    None,
                )
                .map_err(mls_error)
            })
            .and_then(|staged| staged.into_group(provider).map_err(mls_error));
        let group = match result {
            Ok(group) => group,
            Err(e) => {
                provider.discard_writes();
                return Err(e);
            }
        };
        // Every member of the group joined must be certified and bound to its MLS key.
        let uncertified = group.members().find_map(|m| {
            verify_leaf(mls, &m.credential, m.signature_key.as_slice())
                .err()
                .map(|e| (m.index, e))
        });
        if let Some((leaf, reason)) = uncertified {
            provider.discard_writes();
            return Err(GroupError::Mls(format!(
                "the group's member at leaf {} fails its certificate check: {reason}",
                leaf.u32()
            )));
        }
        provider.take_writes(writes);
        self.groups.insert(conv, group);
        let intents = self
            .entries
            .get(&conv)
            .map(|e| e.intents.clone())
            .unwrap_or_default();
        let mut members = roster.to_vec();
        members.sort_by_key(|m| *m.device);
        self.entries.insert(
            conv,
            GroupEntry {
                kind,
                status: GroupStatus::Synchronized,
                intents,
                members,
                retry_at_epoch: 0,
            },
        );
        self.persist(conv, writes);
        Ok(joined)
    }

    /// A notice from our inbox: the commit at `seq` removed this device. Returns the
    /// acknowledgement to send, and whether this is news (not a repeated notice).
    pub fn on_removed(
        &mut self,
        conv: ConversationId,
        seq: u64,
        mls: &DeviceMls,
        writes: &mut WriteBatch,
    ) -> (GroupAction, bool) {
        let ack = GroupAction::Acknowledge {
            conversation: conv,
            seq,
        };
        let Some(entry) = self.entries.get_mut(&conv) else {
            return (ack, false);
        };
        if matches!(entry.status, GroupStatus::Removed { .. }) {
            return (ack, false);
        }
        entry.status = GroupStatus::Removed { seq };
        entry.intents.clear();
        if let Some(mut group) = self.groups.remove(&conv) {
            let _ = group.delete(mls.provider().storage());
            mls.provider().take_writes(writes);
        }
        self.persist(conv, writes);
        (ack, true)
    }

    /// Processes the message sequenced at `seq` in a group conversation.
    #[allow(clippy::too_many_arguments)]
    pub fn on_deliver(
        &mut self,
        conv: ConversationId,
        seq: u64,
        sender: DeviceId,
        msg_id: MsgId,
        body: &[u8],
        mls: &DeviceMls,
        writes: &mut WriteBatch,
    ) -> Processed {
        if sender == self.device {
            return self.on_own_message(conv, msg_id, mls, writes);
        }
        let Some(group) = self.groups.get_mut(&conv) else {
            return Processed::Nothing;
        };
        let provider = mls.provider();
        let message = match MlsMessageIn::tls_deserialize_exact(body)
            .map_err(mls_error)
            .and_then(|m| m.try_into_protocol_message().map_err(mls_error))
        {
            Ok(message) => message,
            Err(e) => return Processed::Failed(e.to_string()),
        };
        if let Some(sample) = mls.decrypt_sample() {
            // The roster's size (counting MLS members would copy every leaf).
            let members = self.entries.get(&conv).map_or(1, |e| e.members.len()) as u64;
            if message.content_type() == ContentType::Application
                && !drawn(conv, seq, self.device, members, sample)
            {
                return Processed::Skipped;
            }
        }
        let epoch_before = group.epoch().as_u64();
        let processed = match group.process_message(provider, message) {
            Ok(processed) => processed,
            Err(e) => {
                provider.discard_writes();
                return Processed::Failed(format!("{e:?}"));
            }
        };
        let aad = processed.aad().to_vec();
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(m) => {
                provider.take_writes(writes);
                Processed::Message(Bytes::from(m.into_bytes()))
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let ops = match GroupOps::decode(&aad) {
                    Ok(ops) => ops,
                    Err(e) => {
                        provider.discard_writes();
                        return Processed::Failed(e.to_string());
                    }
                };
                let members: BTreeMap<LeafNodeIndex, DeviceId> = devices_by_leaf(group);
                let added: BTreeSet<DeviceId> = staged
                    .add_proposals()
                    .filter_map(|p| {
                        device_of(p.add_proposal().key_package().leaf_node().credential())
                    })
                    .collect();
                let removed: BTreeSet<DeviceId> = staged
                    .remove_proposals()
                    .filter_map(|p| members.get(&p.remove_proposal().removed()).copied())
                    .collect();
                let declared_added: BTreeSet<DeviceId> =
                    ops.added_devices().map(|(d, _)| d).collect();
                // Every device added must be certified, bound to its MLS key, unrevoked, and of
                // the user the commit declares.
                let declared_users: BTreeMap<DeviceId, UserId> = ops.added_devices().collect();
                for p in staged.add_proposals() {
                    let leaf = p.add_proposal().key_package().leaf_node();
                    let device = device_of(leaf.credential());
                    let checked =
                        verify_leaf(mls, leaf.credential(), leaf.signature_key().as_slice());
                    let refusal = match (device, checked) {
                        (_, Err(e)) => Some(e),
                        (Some(d), Ok(Some(user))) if declared_users.get(&d) != Some(&user) => {
                            Some(format!("{d} is certified for another user than declared"))
                        }
                        _ => None,
                    };
                    if let Some(reason) = refusal {
                        provider.discard_writes();
                        return Processed::Failed(format!(
                            "a commit by {sender} adds a device that fails its certificate check: {reason}"
                        ));
                    }
                }
                let declared_removed: BTreeSet<DeviceId> = ops.removed_devices().collect();
                if added != declared_added || removed != declared_removed {
                    provider.discard_writes();
                    return Processed::Failed(format!(
                        "a commit by {sender} declares other membership changes than it makes"
                    ));
                }
                let self_removed = staged.self_removed();
                // Another member's commit for this epoch won over ours: drop ours, retry later.
                let entry = self.entries.get_mut(&conv).expect("group has an entry");
                if matches!(entry.status, GroupStatus::PendingCommit { .. }) {
                    let _ = group.clear_pending_commit(provider.storage());
                    entry.status = GroupStatus::Synchronized;
                }
                if let Err(e) = group.merge_staged_commit(provider, *staged) {
                    provider.discard_writes();
                    return Processed::Failed(format!("{e:?}"));
                }
                provider.take_writes(writes);
                entry.apply_ops(&ops);
                // The gateway addresses its removals by the leaves commits declare.
                let leaves: BTreeMap<DeviceId, u32> = devices_by_leaf(group)
                    .into_iter()
                    .map(|(leaf, device)| (device, leaf.u32()))
                    .collect();
                let wrong_leaf = ops
                    .added
                    .iter()
                    .find(|a| {
                        a.leaf.is_some()
                            && leaves.get(&DeviceId::from_bytes(*a.device)).copied() != a.leaf
                    })
                    .map(|a| DeviceId::from_bytes(*a.device));
                let epoch = group.epoch().as_u64();
                debug_assert_eq!(epoch, epoch_before + 1, "a commit advances one epoch");
                if self_removed {
                    entry.status = GroupStatus::Removed { seq: 0 };
                    entry.intents.clear();
                    self.groups.remove(&conv);
                }
                self.persist(conv, writes);
                if let Some(device) = wrong_leaf {
                    return Processed::Failed(format!(
                        "a commit by {sender} declares another leaf for {device} than it gives it"
                    ));
                }
                Processed::Commit {
                    epoch,
                    added: declared_added.into_iter().collect(),
                    removed: declared_removed.into_iter().collect(),
                }
            }
            ProcessedMessageContent::ProposalMessage(queued)
                if matches!(queued.sender(), Sender::External(_)) =>
            {
                let Proposal::Remove(remove) = queued.proposal() else {
                    provider.discard_writes();
                    return Processed::Failed("the gateway proposes removals only".into());
                };
                let removed = remove.removed();
                let members: BTreeMap<LeafNodeIndex, DeviceId> = devices_by_leaf(group);
                let Some(&device) = members.get(&removed) else {
                    provider.discard_writes();
                    return Processed::Failed("a removal of an empty leaf".into());
                };
                if let Err(e) = group.store_pending_proposal(provider.storage(), *queued) {
                    provider.discard_writes();
                    return Processed::Failed(format!("{e:?}"));
                }
                provider.take_writes(writes);
                // One member commits it: the one with the lowest leaf, other than the leaver.
                let committer = members.iter().find(|(leaf, _)| **leaf != removed);
                let entry = self.entries.get_mut(&conv).expect("group has an entry");
                if committer.is_some_and(|(_, d)| *d == self.device)
                    && entry.intents.front() != Some(&Intent::CommitPending)
                {
                    entry.intents.push_front(Intent::CommitPending);
                    self.persist(conv, writes);
                }
                Processed::RemovalProposed { device }
            }
            other => {
                provider.discard_writes();
                Processed::Failed(format!(
                    "{} messages are not used by Sund",
                    match other {
                        ProcessedMessageContent::ProposalMessage(_) => "member proposal",
                        ProcessedMessageContent::ExternalJoinProposalMessage(_) => "join proposal",
                        _ => "such",
                    }
                ))
            }
        }
    }

    /// Our own message came back sequenced: a commit is applied now (echo before apply); an
    /// application message is handed back from the sent table.
    fn on_own_message(
        &mut self,
        conv: ConversationId,
        msg_id: MsgId,
        mls: &DeviceMls,
        writes: &mut WriteBatch,
    ) -> Processed {
        if let Some(plaintext) = self.sent.remove(&msg_id) {
            writes.delete(NODE_SENT_TABLE, msg_id.to_bytes().to_vec());
            return Processed::Message(plaintext);
        }
        let Some(entry) = self.entries.get_mut(&conv) else {
            return Processed::Nothing;
        };
        let GroupStatus::PendingCommit {
            msg_id: pending,
            ops,
            intent,
            ..
        } = &entry.status
        else {
            return Processed::Nothing;
        };
        if **pending != msg_id.to_bytes() {
            return Processed::Nothing;
        }
        let carried = intent.clone();
        let ops = GroupOps::decode(ops).unwrap_or_default();
        let Some(group) = self.groups.get_mut(&conv) else {
            return Processed::Nothing;
        };
        let provider = mls.provider();
        if let Err(e) = group.merge_pending_commit(provider) {
            provider.discard_writes();
            return Processed::Failed(format!("merging our own commit: {e:?}"));
        }
        provider.take_writes(writes);
        entry.apply_ops(&ops);
        entry.status = GroupStatus::Synchronized;
        entry.retry_at_epoch = 0;
        // The intent the commit carried out is done (a user removal goes on until none of the
        // user's devices is left); a commit of the gateway's proposals settles the request to
        // commit them.
        let done = match carried {
            Some(Intent::RemoveUser(_)) => None,
            Some(intent) => Some(intent),
            None => Some(Intent::CommitPending),
        };
        if let Some(done) = done {
            if let Some(at) = entry.intents.iter().position(|i| *i == done) {
                entry.intents.remove(at);
            }
        }
        let epoch = group.epoch().as_u64();
        self.persist(conv, writes);
        Processed::Commit {
            epoch,
            added: ops.added_devices().map(|(d, _)| d).collect(),
            removed: ops.removed_devices().collect(),
        }
    }

    /// A user's role, as this device last set it (the gateway holds the authoritative roles).
    pub fn role_change(user: UserId, role: Role) -> Intent {
        Intent::SetRole(ByteArray::from(user.to_bytes()), role as u8)
    }
}

/// Whether `device` is among the about `sample` of `members` devices drawn to decrypt the
/// message at `seq` (see [`super::device::DeviceMlsConfig::decrypt_sample`]).
fn drawn(conv: ConversationId, seq: u64, device: DeviceId, members: u64, sample: u32) -> bool {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"sund/decrypt-sample/v1")
        .chain_update(conv.to_bytes())
        .chain_update(seq.to_be_bytes())
        .chain_update(device.to_bytes())
        .finalize();
    let draw = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    draw % members.max(1) < u64::from(sample)
}

/// The leaf indexes new members get, in the order they are added (RFC 9420 §12.1.1: the leftmost
/// blank leaf, else a new leaf at the right edge), given the occupied ones.
fn free_leaves(occupied: BTreeSet<u32>) -> impl Iterator<Item = u32> {
    (0u32..).filter(move |leaf| !occupied.contains(leaf))
}
