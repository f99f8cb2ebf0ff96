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
//! Being disconnected is the node's link state, not a group status: while offline, nothing here
//! changes, and intents wait.
//!
//! Every operation hands openmls's writes and the entry's record to the node's write batch, so
//! the group state, the cursor and the outbox change in one store commit.

mod commit;
mod inbound;
mod messages;

pub use commit::FetchRefusal;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use minicbor::bytes::ByteArray;
use minicbor::{Decode, Encode};
use openmls::prelude::*;

use super::device::DeviceMls;
use crate::env::{StoreError, StoreRead, Table, WriteBatch};
use crate::ids::{ConversationId, DeviceId, MsgId, UserId};
use crate::mls::group_ops::{GroupKind, GroupOps, Role};
use crate::time::Instant;
use crate::trust::credential::{device_key_of_identity, device_of_identity};
use crate::wire::payload::{RosterEntry, FETCH_USERS_MAX};

/// How long a proposal of the gateway (a removal, or a new external sender) may wait per rank
/// before the next member commits it (see
/// `DeviceGroups::take_over_stalled_proposals`).
pub const PROPOSAL_TAKEOVER: core::time::Duration = core::time::Duration::from_secs(10);

/// How many times a conversation's KeyPackage fetch timeout doubles at most (16 times the
/// resend timeout: 48 s by default).
const FETCH_BACKOFF_MAX: u32 = 4;
/// How many fetches asked again per conversation still have their late answer taken.
const SUPERSEDED_MAX: usize = 4;

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
    /// Add every device of these users of another domain (whose gateway the own gateway asks
    /// for their KeyPackages), at most [`FETCH_USERS_MAX`].
    #[n(8)]
    AddForeign {
        /// Their domain.
        #[n(0)]
        domain: String,
        /// The users.
        #[n(1)]
        users: Vec<ByteArray<16>>,
    },
}

impl Intent {
    fn users(&self) -> Option<Vec<UserId>> {
        match self {
            Intent::Create { users }
            | Intent::AddUsers(users)
            | Intent::AddForeign { users, .. } => {
                Some(users.iter().map(|u| UserId::from_bytes(**u)).collect())
            }
            _ => None,
        }
    }

    /// The domain of the users it adds, if not the device's own.
    pub fn domain(&self) -> Option<String> {
        match self {
            Intent::AddForeign { domain, .. } => Some(domain.clone()),
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
    /// When this device first saw the group's pending proposals (µs, this device's clock),
    /// for the takeover rule: durable, so that a member whose every run is short (a `sund
    /// send` now and then) still comes to commit a proposal the chosen member leaves waiting.
    #[n(5)]
    pub proposals_seen_at: Option<u64>,
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
        /// Their domain, if not the device's own (the gateway asks that domain's).
        domain: Option<String>,
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
    /// The old authority proposed the new one as the group's external sender (a handover);
    /// the proposal waits for a commit.
    ExternalSenderProposed,
    /// The gateway proposed to remove `device`; the proposal waits for a commit.
    RemovalProposed {
        /// The device to be removed.
        device: DeviceId,
    },
    /// Nothing for the application (a message for a group we are not in any more).
    Nothing,
    /// Not processed yet: a commit adds a device certified by a domain whose root this
    /// device's gateway has not vouched for (yet). Delivery waits here until it has.
    Wait(String),
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
    /// A change the gateway proposed (a removal, or its key as the group's external sender
    /// after a handover) waits for a member's commit; MLS allows no application message until
    /// then (RFC 9420 §12.2). A member online commits it at once.
    #[error("{0} waits for a member to commit a change its gateway proposed (a removal, or the conversation's new home); try again in a moment")]
    ProposalPending(ConversationId),
    /// An MLS step failed.
    #[error("{0}")]
    Mls(MlsFailure),
    /// A member is certified by a domain whose root this device's gateway has not vouched for
    /// (yet: its link to that domain may not have come up): the Welcome waits at the gateway
    /// and is tried again when it comes again.
    #[error(
        "a member is certified by {0}, whose root this device's gateway has not vouched for (yet)"
    )]
    RootNotVouched(String),
}

/// Which MLS step failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlsStep {
    /// Reading a message, Welcome or KeyPackage.
    Decode,
    /// Checking a KeyPackage, a credential or a certificate binding.
    Verify,
    /// Creating a group.
    Create,
    /// Making a commit.
    Commit,
    /// Encrypting an application message.
    Encrypt,
    /// Encoding an outgoing message.
    Encode,
    /// Joining from a Welcome.
    Join,
}

impl core::fmt::Display for MlsStep {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            MlsStep::Decode => "decoding",
            MlsStep::Verify => "verifying",
            MlsStep::Create => "creating the group",
            MlsStep::Commit => "making a commit",
            MlsStep::Encrypt => "encrypting",
            MlsStep::Encode => "encoding",
            MlsStep::Join => "joining",
        })
    }
}

/// An MLS step that failed, with openmls's own explanation (its `Display`, never key material).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{step}: {message}")]
pub struct MlsFailure {
    /// The step.
    pub step: MlsStep,
    /// What went wrong.
    pub message: String,
}

impl GroupError {
    /// A failure of `step` explained by `message`.
    fn mls(step: MlsStep, message: impl Into<String>) -> GroupError {
        GroupError::Mls(MlsFailure {
            step,
            message: message.into(),
        })
    }
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
    /// When this member takes over each stalled proposal not yet due (rebuilt by every drive).
    takeover_due: BTreeMap<ConversationId, Instant>,
    /// When each leave request last went out (asked again after [`LEAVE_RESEND`]: a frame
    /// can be lost).
    leave_asked: BTreeMap<ConversationId, Instant>,
    /// When each DM whose creation lost (`PendingWelcome`) was first seen waiting for the
    /// winner's Welcome (in memory: after a restart the wait starts again).
    welcome_waits: BTreeMap<ConversationId, Instant>,
    /// KeyPackage fetches out: request id → conversation waiting, and when it was asked.
    fetches: BTreeMap<u64, (ConversationId, Instant)>,
    /// Fetches asked again after their timeout: their answer is still taken if it comes
    /// first (a fetch of another domain's users crosses two gateways and their link, which
    /// may take longer than the timeout; dropping late answers would ask for ever).
    superseded: BTreeMap<u64, ConversationId>,
    /// How many times in a row each conversation's fetch went unanswered: its next timeout
    /// doubles each time (each fetch takes one-time packages at the answering gateway).
    fetch_tries: BTreeMap<ConversationId, u32>,
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

/// Turns an openmls error of `step` into a [`GroupError`].
fn mls_error<E: core::fmt::Display>(step: MlsStep) -> impl Fn(E) -> GroupError {
    move |e| GroupError::mls(step, e.to_string())
}

fn group_id(conv: ConversationId) -> GroupId {
    GroupId::from_slice(&conv.to_bytes())
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
    mls.verify_member(basic_identity(credential)?.identity(), signature_key)
}

/// A leaf's credential as the basic credential every Sund device uses.
fn basic_identity(credential: &Credential) -> Result<BasicCredential, String> {
    BasicCredential::try_from(credential.clone())
        .map_err(|_| "a credential that is not a basic credential".to_string())
}

/// As [`verify_leaf`], but a revoked certificate passes (every other check stays): the check
/// a member makes of the devices another member's commit adds. The committer checked them
/// against its own CRL, and the gateway against the newest, when the commit was sequenced;
/// a device revoked since is in the group until a member commits the removal the gateway
/// proposes for it, and can open no session meanwhile. Refusing the commit instead would cut
/// this member off from the group for good (found by the simulator's swarm). A committer
/// that adds a device it knows to be revoked is a malicious member, who could hand the
/// group's secrets out anyway.
fn verify_added_leaf(
    mls: &DeviceMls,
    credential: &Credential,
    signature_key: &[u8],
) -> Result<Option<UserId>, String> {
    mls.verify_member_at_join(basic_identity(credential)?.identity(), signature_key)
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
                .map_err(|e| corrupt(super::MLS_TABLE, format!("group {conv}: {e}")))?;
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
            welcome_waits: BTreeMap::new(),
            takeover_due: BTreeMap::new(),
            fetches: BTreeMap::new(),
            superseded: BTreeMap::new(),
            fetch_tries: BTreeMap::new(),
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

    /// The certified device keys of a group's members, by device (from their leaves'
    /// credentials, checked when each joined): what safety numbers are made of.
    pub fn member_keys(
        &self,
        conv: ConversationId,
    ) -> Option<BTreeMap<DeviceId, crate::identity::DevicePublicKey>> {
        let group = self.groups.get(&conv)?;
        Some(
            group
                .members()
                .filter_map(|m| {
                    let basic = BasicCredential::try_from(m.credential).ok()?;
                    let key = device_key_of_identity(basic.identity())?;
                    Some((key.device_id(), key))
                })
                .collect(),
        )
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

    /// The device key of `device` as its leaf in `conv` names it (from its certificate, checked
    /// when it joined), to verify what it signs with its device key (a file receipt).
    pub fn member_key(
        &self,
        conv: ConversationId,
        device: DeviceId,
    ) -> Option<crate::identity::DevicePublicKey> {
        self.groups.get(&conv)?.members().find_map(|m| {
            let basic = BasicCredential::try_from(m.credential.clone()).ok()?;
            (device_of_identity(basic.identity())? == device)
                .then(|| crate::trust::credential::device_key_of_identity(basic.identity()))
                .flatten()
        })
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
            proposals_seen_at: None,
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
            Intent::AddForeign { domain, users } if users.len() > FETCH_USERS_MAX => {
                for chunk in users.chunks(FETCH_USERS_MAX) {
                    entry.intents.push_back(Intent::AddForeign {
                        domain: domain.clone(),
                        users: chunk.to_vec(),
                    });
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
        self.superseded.clear();
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
    pub fn fetch_refused(&mut self, request: u64) -> Option<ConversationId> {
        let conv = self.fetches.remove(&request).map(|(conv, _)| conv);
        conv.or(self.superseded.remove(&request))
    }

    /// The conversation fetch `request` (the current one, or one asked again since) was for;
    /// every fetch for it is then answered.
    pub(super) fn take_fetch(&mut self, request: u64) -> Option<ConversationId> {
        let conv = match self.fetches.remove(&request) {
            Some((conv, _)) => conv,
            None => self.superseded.remove(&request)?,
        };
        self.fetches.retain(|_, (c, _)| *c != conv);
        self.superseded.retain(|_, c| *c != conv);
        self.fetch_tries.remove(&conv);
        Some(conv)
    }

    /// A fetch was refused for good (a domain the gateway does not federate with): the change
    /// waiting for it is dropped (a conversation it was to create is forgotten). Returns the
    /// conversation, if the fetch was still awaited.
    pub fn fetch_failed(
        &mut self,
        request: u64,
        writes: &mut WriteBatch,
    ) -> Option<ConversationId> {
        let conv = self.take_fetch(request)?;
        let entry = self.entries.get_mut(&conv)?;
        let creating = matches!(entry.intents.front(), Some(Intent::Create { .. }))
            && !self.groups.contains_key(&conv);
        if creating {
            self.entries.remove(&conv);
            writes.delete(NODE_GROUPS_TABLE, conv.to_bytes().to_vec());
        } else {
            entry.intents.pop_front();
            self.persist(conv, writes);
        }
        Some(conv)
    }

    /// Fetches unanswered for their timeout (`timeout`, doubled for each time the
    /// conversation's fetch already went unanswered, at most [`FETCH_BACKOFF_MAX`] times) are
    /// asked again; an answer to the old one is still taken.
    pub fn expire_fetches(&mut self, now: Instant, timeout: core::time::Duration) {
        let expired: Vec<(u64, ConversationId)> = self
            .fetches
            .iter()
            .filter(|(_, (conv, asked))| now >= self.fetch_deadline(*conv, *asked, timeout))
            .map(|(request, (conv, _))| (*request, *conv))
            .collect();
        for (request, conv) in expired {
            self.fetches.remove(&request);
            // A few late answers are waited for; older ones are given up.
            if self.superseded.values().filter(|c| **c == conv).count() >= SUPERSEDED_MAX {
                if let Some(oldest) = self
                    .superseded
                    .iter()
                    .find(|(_, c)| **c == conv)
                    .map(|(r, _)| *r)
                {
                    self.superseded.remove(&oldest);
                }
            }
            self.superseded.insert(request, conv);
            let tries = self.fetch_tries.entry(conv).or_default();
            *tries = tries.saturating_add(1);
        }
    }

    /// When a fetch for `conv` asked at `asked` is asked again.
    fn fetch_deadline(
        &self,
        conv: ConversationId,
        asked: Instant,
        timeout: core::time::Duration,
    ) -> Instant {
        let tries = self
            .fetch_tries
            .get(&conv)
            .copied()
            .unwrap_or(0)
            .min(FETCH_BACKOFF_MAX);
        asked + timeout * (1u32 << tries)
    }

    /// True if the front intent of `conv` can go now (`drive` moves it).
    fn movable(&self, conv: ConversationId) -> bool {
        self.entries.get(&conv).is_some_and(|e| {
            e.status == GroupStatus::Synchronized
                && !e.intents.is_empty()
                && !self.fetching(conv)
                && self.epoch(conv).unwrap_or(0) >= e.retry_at_epoch
        })
    }

    /// When the groups next need driving while a session is open: a KeyPackage fetch to give
    /// up on after `fetch_timeout`, a leave request to ask again, a stalled proposal this member
    /// takes over, a DM to create again after `welcome_patience` without its Welcome. `None`
    /// if nothing waits on time.
    pub fn next_deadline(
        &self,
        fetch_timeout: core::time::Duration,
        welcome_patience: core::time::Duration,
    ) -> Option<Instant> {
        let fetches = self
            .fetches
            .values()
            .map(|(conv, asked)| self.fetch_deadline(*conv, *asked, fetch_timeout));
        let leaves = self
            .leave_asked
            .iter()
            .filter(|(conv, _)| {
                self.movable(**conv) && self.entries[*conv].intents.front() == Some(&Intent::Leave)
            })
            .map(|(_, asked)| *asked + LEAVE_RESEND);
        let takeovers = self.takeover_due.values().copied();
        let welcomes = self
            .welcome_waits
            .iter()
            .filter(|(conv, _)| {
                self.entries
                    .get(*conv)
                    .is_some_and(|e| e.status == GroupStatus::PendingWelcome)
            })
            .map(|(_, since)| *since + welcome_patience);
        fetches.chain(leaves).chain(takeovers).chain(welcomes).min()
    }

    /// A DM whose creation lost to another's (`stale_epoch`) waits for the winner's Welcome.
    /// If none comes within `patience` — the winning device went away before its gateway made
    /// the DM, and that gateway's grant lapses (`gateway::dm_claims`) — this device creates it
    /// again, and the gateways decide anew where it is made. Within one domain a creation that
    /// did land is refused `stale_epoch` again, and the wait starts over.
    fn revive_unwelcomed_dms(
        &mut self,
        now: Instant,
        patience: core::time::Duration,
        writes: &mut WriteBatch,
    ) {
        let waiting: Vec<ConversationId> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.status == GroupStatus::PendingWelcome && e.kind == GroupKind::Dm as u8
            })
            .map(|(conv, _)| *conv)
            .collect();
        self.welcome_waits.retain(|conv, _| waiting.contains(conv));
        for conv in waiting {
            let since = *self.welcome_waits.entry(conv).or_insert(now);
            if now.saturating_since(since) < patience {
                continue;
            }
            let entry = self.entries.get_mut(&conv).expect("listed above");
            let Some(Intent::AddUsers(users)) = entry.intents.front().cloned() else {
                continue; // not a creation that lost (nothing to make again)
            };
            self.welcome_waits.remove(&conv);
            entry.intents[0] = Intent::Create { users };
            entry.status = GroupStatus::Synchronized;
            entry.retry_at_epoch = 0;
            self.persist(conv, writes);
        }
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
        welcome_patience: core::time::Duration,
        next_id: &mut dyn FnMut() -> MsgId,
        writes: &mut WriteBatch,
    ) -> Vec<GroupAction> {
        let mut actions = Vec::new();
        self.revive_unwelcomed_dms(now, welcome_patience, writes);
        self.take_over_stalled_proposals(now, writes);
        let ready: Vec<ConversationId> = self
            .entries
            .iter()
            .filter(|(conv, _)| self.movable(**conv))
            .map(|(conv, _)| *conv)
            .collect();
        for conv in ready {
            // An intent that turns out to need nothing (its target already gone) is dropped
            // and the next one goes at once: a backlog built while the device was paced drains
            // in one go, not one intent per heartbeat.
            while self.movable(conv) {
                let intents = self.entries[&conv].intents.len();
                let intent = self.entries[&conv].intents[0].clone();
                if intent == Intent::Leave {
                    let asked = self.leave_asked.get(&conv).copied();
                    if asked.is_none_or(|t| now.saturating_since(t) >= LEAVE_RESEND) {
                        self.leave_asked.insert(conv, now);
                        actions.push(GroupAction::Leave(conv));
                    }
                    break;
                }
                let pending = self
                    .groups
                    .get(&conv)
                    .is_some_and(|g| g.pending_proposals().next().is_some());
                if let Some(users) = intent.users().filter(|_| !pending) {
                    let request = self.next_request;
                    self.next_request += 1;
                    self.fetches.insert(request, (conv, now));
                    let domain = intent.domain();
                    actions.push(GroupAction::Fetch {
                        request,
                        users,
                        domain,
                    });
                    break;
                }
                if let Some(action) = self.commit(now, conv, &[], mls, next_id(), writes) {
                    actions.push(action);
                    break;
                }
                if self.entries.get(&conv).map_or(0, |e| e.intents.len()) >= intents {
                    break; // nothing was dropped: wait for what it waits on
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
        let mut seen_now = Vec::new();
        self.takeover_due.clear();
        for (conv, group) in &self.groups {
            let proposed: BTreeSet<LeafNodeIndex> = group
                .pending_proposals()
                .filter_map(|p| match p.proposal() {
                    Proposal::Remove(r) => Some(r.removed()),
                    _ => None,
                })
                .collect();
            if group.pending_proposals().next().is_none() {
                continue;
            }
            let Some(entry) = self.entries.get_mut(conv) else {
                continue;
            };
            let since = match entry.proposals_seen_at {
                Some(at) => Instant(at),
                None => {
                    entry.proposals_seen_at = Some(now.0);
                    seen_now.push(*conv);
                    now
                }
            };
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
            } else {
                self.takeover_due.insert(*conv, since + wait);
            }
        }
        // Proposals committed since: the next ones are timed from when they are seen.
        for (conv, entry) in &mut self.entries {
            let waiting = self
                .groups
                .get(conv)
                .is_some_and(|g| g.pending_proposals().next().is_some());
            if entry.proposals_seen_at.is_some() && !waiting {
                entry.proposals_seen_at = None;
                seen_now.push(*conv);
            }
        }
        for conv in seen_now {
            self.persist(conv, writes);
        }
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
