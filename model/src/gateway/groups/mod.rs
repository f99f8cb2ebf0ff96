//! Conversations that are MLS groups, as the gateway sees them: kind, roles, member devices, the
//! commit authority, and the gateway as every group's external sender.
//!
//! The gateway never reads a commit's content; it enforces roles on the declaration each commit
//! carries ([`GroupOps`], see `mls::group_ops`):
//!
//! | who (the sender's user) | may add | may remove | may set roles |
//! |---|---|---|---|
//! | room owner | any user's devices | any device but the owner's own last one | yes |
//! | room admin | any user's devices | devices of members, and its own user's | no |
//! | room member | its own user's devices | its own user's devices | no |
//! | DM user | devices of the DM's two users | its own user's devices | no |
//!
//! A room always has an owner. When a commit (or a revocation's removal) takes away the last
//! device of the last owner, ownership passes by a fixed rule that every replica applies alike:
//! to the admin who joined the room first, and if there is none, to the member who joined
//! first (join order is the order of the commits that added each user's first device, and
//! within one commit the order it lists them; users who joined at the same moment before join
//! order was kept are ordered by user id).
//!
//! A commit removes at most one device: openmls orders several member-specific proposals by a
//! std hash map (see `mls`), and one per commit keeps every run reproducible.
//!
//! Admission ([`Groups::admit`]): after deduplication, every group message passes the commit
//! authority (the first commit per epoch wins; application messages only in the current epoch,
//! `stale_epoch` with the group's epoch in the error's header otherwise) and, for commits, the
//! role check. A commit that adds devices must carry their Welcome, and may not add a revoked
//! device.
//!
//! The gateway is also an external sender of every group (RFC 9420 §12.1.8.1): it signs Remove
//! proposals for a device that asked to leave or that its operator removes, one per epoch until
//! a commit removes it. Any member may commit such a pending removal whatever its role. To
//! address the device, the gateway keeps each member's leaf index: the creator sits at leaf 0,
//! and each commit declares the leaf of every device it adds (members check the declaration when
//! they merge the commit).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use minicbor::bytes::ByteArray;
use minicbor::{Decode, Encode};

use super::Refusal;
use crate::env::{Entropy, StoreError, StoreRead, Table, WriteBatch};
use crate::ids::{ConversationId, DeviceId, MsgId, UserId};
use crate::mls;
use crate::mls::commit_authority::{Admission, EpochAuthority, Kind};
use crate::mls::group_ops::{GroupKind, GroupOps, GroupRefusal, Role, RoleChange};
use crate::trust::Crl;
use crate::wire::payload::ErrorCode;
use crate::wire::Routing;
use openmls::prelude::{BasicCredential, Extension, Extensions, ExternalSender};

/// Store table of group records: conversation id → a `GroupRecord` in CBOR.
pub const GROUPS_TABLE: Table = Table("groups");

/// Table of the gateway's own keys: key `mls_signer`, value its MLS signing key's 32-byte seed
/// (the key it signs external proposals with).
pub const GATEWAY_KEYS_TABLE: Table = Table("gateway_keys");
const MLS_SIGNER_KEY: &[u8] = b"mls_signer";

/// What an accepted commit does once it has its seq.
pub struct GroupEffect {
    /// The group as the commit leaves it.
    pub state: GroupState,
    /// The membership and role changes.
    pub change: Change,
    /// The Welcome for the devices it adds.
    pub welcome: Option<Bytes>,
    /// The user who became the room's owner because the commit took the last owner's last
    /// device (the handover rule, see the module docs).
    pub new_owner: Option<UserId>,
    /// The domains the commit names for the devices it adds of another domain than its
    /// committer's (`GroupOps::domains`), which the gateway checks against what it knows.
    pub domains: Vec<(DeviceId, String)>,
    /// On a commit creating a DM with a user of another domain: that domain
    /// (`GroupOps::dm_with`).
    pub dm_with: Option<String>,
}

/// What a removal request leads to.
pub enum Removal {
    /// Nothing to do now (no such group or member, proposed already, or queued behind another
    /// removal of this epoch).
    Nothing,
    /// The device is the group's last member: it goes at once and the conversation is over.
    LastMember(Box<GroupEffect>),
    /// Propose it now (the caller sequences the proposal).
    Propose,
}

/// Counters of the groups sub-machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GroupStats {
    /// Commits accepted into MLS conversations.
    pub commits: u64,
    /// Commits refused as stale (another commit won the epoch).
    pub stale_commits: u64,
    /// Application messages refused as made in an earlier epoch (the sender re-encrypts).
    pub stale_messages: u64,
    /// Remove proposals the gateway sent as external sender.
    pub removals_proposed: u64,
    /// Rooms whose last owner went and whose ownership passed by the handover rule.
    pub ownership_handovers: u64,
}

/// The gateway's MLS conversations and its external-sender key. See the module docs.
#[derive(Default)]
pub struct Groups {
    groups: BTreeMap<ConversationId, GroupState>,
    /// For each user, how many groups hold at least one of its devices (derived from
    /// `groups`, kept in memory: the quota of conversations per user reads it).
    memberships: BTreeMap<UserId, u32>,
    /// The key the gateway signs external proposals with (made at the first session).
    signer: Option<openmls_basic_credential::SignatureKeyPair>,
    stats: GroupStats,
}

impl core::fmt::Debug for Groups {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Groups")
            .field("groups", &self.groups.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Groups {
    /// Reads the groups and the external-sender key back.
    pub fn recover(store: &dyn StoreRead) -> Result<Groups, StoreError> {
        let mut groups = Groups::default();
        crate::env::scan_all(store, GROUPS_TABLE, |key, value| {
            let (conv, state) = GroupState::decode(key, value)?;
            for user in state.users() {
                *groups.memberships.entry(user).or_default() += 1;
            }
            groups.groups.insert(conv, state);
            Ok(())
        })?;
        if let Some(seed) = store.get(GATEWAY_KEYS_TABLE, MLS_SIGNER_KEY)? {
            let seed: [u8; 32] = seed
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt {
                    table: GATEWAY_KEYS_TABLE.0,
                    reason: format!("MLS signing key of {} bytes, want 32", seed.len()),
                })?;
            groups.signer = Some(signer_from_seed(seed));
        }
        Ok(groups)
    }

    /// Kind, epoch, roles and devices of an MLS conversation.
    pub fn get(&self, conv: ConversationId) -> Option<&GroupState> {
        self.groups.get(&conv)
    }

    /// True if `conv` is an MLS conversation.
    pub fn contains(&self, conv: ConversationId) -> bool {
        self.groups.contains_key(&conv)
    }

    /// The groups `device` is a member of, in id order.
    pub fn groups_of(&self, device: DeviceId) -> Vec<ConversationId> {
        self.groups
            .iter()
            .filter(|(_, g)| g.devices().contains_key(&device))
            .map(|(&conv, _)| conv)
            .collect()
    }

    /// Each (conversation, member device) whose device `pick` chooses.
    pub fn members_where(
        &self,
        pick: impl Fn(DeviceId) -> bool,
    ) -> Vec<(ConversationId, DeviceId)> {
        self.groups
            .iter()
            .flat_map(|(&conv, g)| g.devices().keys().map(move |&d| (conv, d)))
            .filter(|&(_, d)| pick(d))
            .collect()
    }

    /// Counters.
    pub fn stats(&self) -> &GroupStats {
        &self.stats
    }

    /// Counts a commit sequenced.
    pub fn count_commit(&mut self) {
        self.stats.commits += 1;
    }

    /// The gateway's external-sender public key, made from the entropy on first use.
    pub fn external_key(&mut self, entropy: &mut dyn Entropy, writes: &mut WriteBatch) -> Vec<u8> {
        self.signer(entropy, writes).public().to_vec()
    }

    fn signer(
        &mut self,
        entropy: &mut dyn Entropy,
        writes: &mut WriteBatch,
    ) -> &openmls_basic_credential::SignatureKeyPair {
        self.signer.get_or_insert_with(|| {
            let mut seed = zeroize::Zeroizing::new([0u8; 32]);
            entropy.fill_bytes(seed.as_mut_slice());
            writes.put(GATEWAY_KEYS_TABLE, MLS_SIGNER_KEY.to_vec(), seed.to_vec());
            signer_from_seed(*seed)
        })
    }

    /// Decides on a message for an MLS conversation (or one a creating commit is about to make):
    /// a duplicate passes (it gets its original seq, never `stale_epoch`), then the commit
    /// authority and the roles. `Ok(Some(effect))` for a commit, to apply once sequenced.
    #[allow(clippy::too_many_arguments)]
    pub fn admit(
        &mut self,
        device: DeviceId,
        conv: ConversationId,
        msg_id: MsgId,
        body: &[u8],
        welcome: Option<Bytes>,
        duplicate: bool,
        has_log: bool,
        user_of: &dyn Fn(DeviceId) -> Option<UserId>,
        crl: Option<&Crl>,
    ) -> Result<Option<Box<GroupEffect>>, Refusal> {
        if duplicate {
            return Ok(None);
        }
        let refuse = |code: ErrorCode, message: String, epoch: u64| {
            let routing = Routing {
                conversation: conv,
                epoch,
                ..Routing::default()
            };
            Refusal::error(code, message)
                .in_conversation(routing)
                .about(msg_id)
        };
        let (framing, aad) = match mls::commit_authority::read_message(body) {
            Ok(read) => read,
            Err(_) if !self.groups.contains_key(&conv) => {
                let message = "no such conversation here".to_string();
                return Err(refuse(ErrorCode::UnknownConversation, message, 0));
            }
            Err(e) => return Err(refuse(ErrorCode::InvalidGroupMessage, e.to_string(), 0)),
        };
        if framing.group_id != conv.to_bytes() {
            let message = "the MLS group id differs from the conversation id".to_string();
            return Err(refuse(ErrorCode::InvalidGroupMessage, message, 0));
        }
        let current = self.groups.get(&conv).map(GroupState::epoch);
        match framing.kind {
            Kind::Application => match current {
                None => {
                    let message = "no such conversation here".to_string();
                    Err(refuse(ErrorCode::UnknownConversation, message, 0))
                }
                Some(epoch) if framing.epoch > epoch => {
                    let message = format!("epoch {} is ahead of the group's", framing.epoch);
                    Err(refuse(ErrorCode::InvalidGroupMessage, message, epoch))
                }
                Some(epoch) if framing.epoch < epoch => {
                    // Sequenced now, it would reach members (new ones among them) in a later
                    // epoch than it was made for: the sender encrypts it again.
                    self.stats.stale_messages += 1;
                    let message = format!(
                        "made in epoch {}, the group is at epoch {epoch}; encrypt it again",
                        framing.epoch
                    );
                    Err(refuse(ErrorCode::StaleEpoch, message, epoch))
                }
                Some(_) => Ok(None),
            },
            Kind::Proposal => {
                let message = "Sund members commit their changes; proposals by members are \
                               not accepted"
                    .to_string();
                Err(refuse(
                    ErrorCode::InvalidGroupMessage,
                    message,
                    current.unwrap_or(0),
                ))
            }
            Kind::Commit => {
                let ops = match GroupOps::decode(&aad) {
                    Ok(ops) => ops,
                    Err(e) => {
                        let epoch = current.unwrap_or(0);
                        return Err(refuse(ErrorCode::InvalidGroupMessage, e.to_string(), epoch));
                    }
                };
                let checked = self.check_commit(
                    device,
                    conv,
                    framing.epoch,
                    &ops,
                    welcome,
                    has_log,
                    user_of,
                    crl,
                );
                match checked {
                    Ok(effect) => Ok(Some(Box::new(effect))),
                    Err((code, message, epoch)) => {
                        if code == ErrorCode::StaleEpoch {
                            self.stats.stale_commits += 1;
                        }
                        Err(refuse(code, message, epoch))
                    }
                }
            }
        }
    }

    /// Checks a commit against the authority and the roles; on success returns the group as it
    /// will be after the commit.
    #[allow(clippy::too_many_arguments)]
    fn check_commit(
        &self,
        device: DeviceId,
        conv: ConversationId,
        epoch: u64,
        ops: &GroupOps,
        welcome: Option<Bytes>,
        has_log: bool,
        user_of: &dyn Fn(DeviceId) -> Option<UserId>,
        crl: Option<&Crl>,
    ) -> Result<GroupEffect, (ErrorCode, String, u64)> {
        let mut state = match (self.groups.get(&conv), ops.create) {
            (Some(state), None) => state.clone(),
            (Some(state), Some(_)) => {
                return Err((
                    ErrorCode::StaleEpoch,
                    "this conversation exists already; join it from its Welcome".into(),
                    state.epoch(),
                ))
            }
            (None, None) => {
                return Err((
                    ErrorCode::UnknownConversation,
                    "no such conversation here".into(),
                    0,
                ))
            }
            (None, Some(kind)) => {
                let Some(kind) = GroupKind::from_u8(kind) else {
                    let message = format!("unknown conversation kind {kind}");
                    return Err((ErrorCode::InvalidGroupMessage, message, 0));
                };
                if has_log {
                    let message = "an operator-made conversation has this id".into();
                    return Err((ErrorCode::InvalidGroupMessage, message, 0));
                }
                let Some(user) = user_of(device) else {
                    let message = "say which user this device belongs to before creating \
                                   conversations (sund init --user NAME)"
                        .into();
                    return Err((ErrorCode::Forbidden, message, 0));
                };
                if kind == GroupKind::Own && conv != crate::node::own_id(user) {
                    let message =
                        "the group of a user's own devices has the id that follows from the user"
                            .into();
                    return Err((ErrorCode::InvalidGroupMessage, message, 0));
                }
                GroupState::create(kind, device, user)
            }
        };
        let before = state.epoch();
        match state.authority_mut().admit(epoch, Kind::Commit) {
            Admission::Accept => {}
            Admission::Stale { current } => {
                let message = format!(
                    "a commit for epoch {epoch} was already accepted; the group is at epoch \
                     {current}"
                );
                return Err((ErrorCode::StaleEpoch, message, current));
            }
            Admission::Future { current } => {
                let message = format!("epoch {epoch} is ahead of the group's {current}");
                return Err((ErrorCode::InvalidGroupMessage, message, current));
            }
        }
        let change = state
            .check(device, ops, user_of)
            .map_err(|refusal| match refusal {
                GroupRefusal::Forbidden(m) => (ErrorCode::Forbidden, m, before),
                GroupRefusal::Invalid(m) => (ErrorCode::InvalidGroupMessage, m, before),
            })?;
        if !change.added.is_empty() && welcome.is_none() {
            let message = "a commit that adds devices must carry their Welcome".into();
            return Err((ErrorCode::InvalidGroupMessage, message, before));
        }
        if let Some(crl) = crl {
            if let Some((revoked, _, _)) = change
                .added
                .iter()
                .find(|(d, _, _)| crl.revoked.contains(d))
            {
                let message = format!("device {revoked} is revoked and cannot be added");
                return Err((ErrorCode::Forbidden, message, before));
            }
        }
        let declared = ops.external_sender.as_ref().map(|k| **k);
        if declared != state.external_pending {
            let message = match state.external_pending {
                // A member made it before reading the old authority's proposal: it commits
                // again once it has read it (the proposal is sequenced before any commit).
                Some(_) => {
                    "this conversation's authority moved here: the next commit takes the \
                            gateway's proposal of its new external sender; read on and commit again"
                        .to_string()
                }
                None => "the commit names an external sender no proposal waits for".to_string(),
            };
            let code = if state.external_pending.is_some() {
                ErrorCode::StaleEpoch
            } else {
                ErrorCode::InvalidGroupMessage
            };
            return Err((code, message, before));
        }
        state.external_pending = None;
        let new_owner = state.apply(&change);
        debug_assert!(state.epoch() > before, "an accepted commit moves the epoch");
        let domains = ops
            .domains
            .iter()
            .flatten()
            .map(|a| (DeviceId::from_bytes(*a.device), a.domain.clone()))
            .collect();
        let dm_with = ops.dm_with.clone().filter(|_| ops.create.is_some());
        Ok(GroupEffect {
            state,
            change,
            welcome,
            new_owner,
            domains,
            dm_with,
        })
    }

    /// Counts a room whose ownership passed by the handover rule.
    pub fn note_handover(&mut self) {
        self.stats.ownership_handovers += 1;
    }

    /// Keeps the group's state after an accepted commit (or a last member's departure).
    pub fn set_state(&mut self, conv: ConversationId, state: GroupState, writes: &mut WriteBatch) {
        if let Some(old) = self.groups.get(&conv) {
            // Epochs only move forward; a stored state that went back would let an old commit in.
            assert!(state.epoch() >= old.epoch(), "group epochs are monotonic");
        }
        state.persist(conv, writes);
        let before = self
            .groups
            .get(&conv)
            .map(GroupState::users)
            .unwrap_or_default();
        let after = state.users();
        for user in after.difference(&before) {
            *self.memberships.entry(*user).or_default() += 1;
        }
        for user in before.difference(&after) {
            let count = self
                .memberships
                .get_mut(user)
                .expect("a member's groups are counted");
            *count -= 1;
            if *count == 0 {
                self.memberships.remove(user);
            }
        }
        self.groups.insert(conv, state);
    }

    /// How many MLS conversations hold a device of `user`.
    pub fn conversations_of(&self, user: UserId) -> u32 {
        self.memberships.get(&user).copied().unwrap_or(0)
    }

    /// Records a request to remove `device` from `conv` (it leaves, is revoked, or the operator
    /// removes it) and says what to do now. Proposals are bound to their epoch and a commit
    /// holds at most one removal, so one is proposed per epoch; the others wait their turn.
    ///
    /// `revoked` says which devices will never commit again (revoked by their domain). When
    /// `device` is the last member that could, nobody is left to commit its removal: it goes
    /// at once, with the revoked ones, and the conversation is over (else it would ask to
    /// leave for good; swarm seed 704).
    pub fn request_removal(
        &mut self,
        conv: ConversationId,
        device: DeviceId,
        revoked: &dyn Fn(DeviceId) -> bool,
        writes: &mut WriteBatch,
    ) -> Removal {
        let Some(group) = self.groups.get_mut(&conv) else {
            return Removal::Nothing;
        };
        let last_able = group.devices().contains_key(&device)
            && group
                .devices()
                .keys()
                .all(|&other| other == device || revoked(other));
        if last_able {
            let mut state = group.clone();
            let change = Change {
                removed: state.devices().keys().copied().collect(),
                ..Change::default()
            };
            let new_owner = state.apply(&change);
            return Removal::LastMember(Box::new(GroupEffect {
                state,
                change,
                welcome: None,
                new_owner,
                domains: Vec::new(),
                dm_with: None,
            }));
        }
        let already = group.removals().contains(&device);
        let queued_behind = group.removals().first().copied();
        if !group.propose_removal(device) || already {
            return Removal::Nothing; // not a member, or proposed in this epoch already
        }
        group.persist(conv, writes);
        if queued_behind.is_some() {
            return Removal::Nothing; // proposed once the pending one is committed
        }
        Removal::Propose
    }

    /// The removal to propose next in `conv`'s new epoch, if one is pending.
    pub fn next_removal(&self, conv: ConversationId) -> Option<DeviceId> {
        self.groups.get(&conv)?.removals().first().copied()
    }

    /// The signed MLS Remove proposal for `device` in `conv`'s current epoch, if the device has
    /// a known leaf; counted as proposed.
    pub fn removal_proposal(
        &mut self,
        conv: ConversationId,
        device: DeviceId,
        entropy: &mut dyn Entropy,
        writes: &mut WriteBatch,
    ) -> Option<Bytes> {
        let group = self.groups.get(&conv)?;
        if group.external_pending.is_some() {
            // The group's external sender is still the old authority: proposed once a
            // commit has made it this gateway (`propose_next_removal` after each commit).
            return None;
        }
        let (leaf, epoch) = (group.leaf_of(device)?, group.epoch());
        let signer = self.signer(entropy, writes);
        let proposal = openmls::prelude::ExternalProposal::new_remove::<mls::MlsProvider>(
            openmls::prelude::LeafNodeIndex::new(leaf),
            openmls::prelude::GroupId::from_slice(&conv.to_bytes()),
            openmls::prelude::GroupEpoch::from(epoch),
            signer,
            openmls::prelude::SenderExtensionIndex::new(0),
        );
        // Signing with our own key cannot fail in practice; nothing to send if it does.
        let bytes = proposal.ok().and_then(|m| m.to_bytes().ok())?;
        self.stats.removals_proposed += 1;
        Some(Bytes::from(bytes))
    }
}

impl Groups {
    /// For a handover of `conv` to the gateway whose external-sender key is `to_key`: the
    /// signed MLS proposal (in the group's current epoch) that makes `to_key` the group's
    /// only external sender, or why there is none. The receiving gateway sequences it; the
    /// next commit must take it.
    pub fn external_sender_proposal(
        &mut self,
        conv: ConversationId,
        to_key: [u8; 32],
        entropy: &mut dyn Entropy,
        writes: &mut WriteBatch,
    ) -> Result<Bytes, String> {
        let Some(group) = self.groups.get(&conv) else {
            return Err("it is not an MLS conversation".into());
        };
        if group.external_pending.is_some() {
            return Err(
                "no commit has taken this gateway's key as the group's external sender \
                 since it took the conversation over; try again after the next commit"
                    .into(),
            );
        }
        let epoch = group.epoch();
        let signer = self.signer(entropy, writes);
        let sender = ExternalSender::new(
            to_key.to_vec().into(),
            BasicCredential::new(mls::GATEWAY_CREDENTIAL.to_vec()).into(),
        );
        let extensions = Extensions::single(Extension::ExternalSenders(vec![sender]))
            .map_err(|e| format!("external senders: {e}"))?;
        let proposal =
            openmls::prelude::ExternalProposal::new_group_context_extensions::<mls::MlsProvider>(
                extensions,
                openmls::prelude::GroupId::from_slice(&conv.to_bytes()),
                openmls::prelude::GroupEpoch::from(epoch),
                signer,
                openmls::prelude::SenderExtensionIndex::new(0),
            )
            .map_err(|e| format!("signing the proposal: {e}"))?;
        let bytes = proposal
            .to_bytes()
            .map_err(|e| format!("encoding the proposal: {e}"))?;
        Ok(Bytes::from(bytes))
    }

    /// Forgets `conv` (its authority moved to another gateway, which holds its state now).
    pub fn forget(&mut self, conv: ConversationId, writes: &mut WriteBatch) {
        let Some(state) = self.groups.remove(&conv) else {
            return;
        };
        for user in state.users() {
            if let Some(count) = self.memberships.get_mut(&user) {
                *count -= 1;
                if *count == 0 {
                    self.memberships.remove(&user);
                }
            }
        }
        writes.delete(GROUPS_TABLE, conv.to_bytes().to_vec());
    }
}

/// An Ed25519 MLS signing key from its 32-byte seed.
fn signer_from_seed(seed: [u8; 32]) -> openmls_basic_credential::SignatureKeyPair {
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    openmls_basic_credential::SignatureKeyPair::from_raw(
        openmls_traits::types::SignatureScheme::ED25519,
        key.to_bytes().to_vec(),
        key.verifying_key().to_bytes().to_vec(),
    )
}

/// A checked change, ready to apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Devices joining, with their users and leaf indexes.
    pub added: Vec<(DeviceId, UserId, Option<u32>)>,
    /// Devices leaving.
    pub removed: Vec<DeviceId>,
    /// Role changes.
    pub roles: Vec<(UserId, Role)>,
}

/// One MLS conversation at the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupState {
    kind: GroupKind,
    authority: EpochAuthority,
    roles: BTreeMap<UserId, Role>,
    devices: BTreeMap<DeviceId, UserId>,
    leaves: BTreeMap<DeviceId, u32>,
    /// Devices the gateway proposed to remove (they asked to leave, or the operator removes
    /// them); cleared when a commit removes them.
    removals: BTreeSet<DeviceId>,
    /// Each member user's place in join order (smaller joined earlier), for owner handover.
    joined: BTreeMap<UserId, u64>,
    /// After an authority handover to this gateway: the key the group's external sender
    /// changes to (this gateway's) once a commit takes the old authority's proposal. Until
    /// then this gateway cannot propose removals, and every commit must take that proposal.
    external_pending: Option<[u8; 32]>,
}

impl GroupState {
    /// A new group whose creating commit (epoch 0) comes next, with its creator as sole member.
    pub fn create(kind: GroupKind, creator: DeviceId, user: UserId) -> GroupState {
        GroupState {
            kind,
            authority: EpochAuthority::new(0),
            roles: BTreeMap::from([(user, Role::Owner)]),
            devices: BTreeMap::from([(creator, user)]),
            leaves: BTreeMap::from([(creator, 0)]),
            removals: BTreeSet::new(),
            joined: BTreeMap::from([(user, 0)]),
            external_pending: None,
        }
    }

    /// The key the group's external sender changes to once a commit takes the proposal
    /// naming it, if that proposal waits (see `gateway::handover`).
    pub fn external_pending(&self) -> Option<[u8; 32]> {
        self.external_pending
    }

    /// After a handover to this gateway: commits must take the old authority's proposal
    /// making `key` the group's external sender.
    pub fn expect_external_sender(&mut self, key: [u8; 32]) {
        self.external_pending = Some(key);
    }

    /// DM or room.
    pub fn kind(&self) -> GroupKind {
        self.kind
    }

    /// The commit authority (epoch).
    pub fn authority_mut(&mut self) -> &mut EpochAuthority {
        &mut self.authority
    }

    /// The epoch the next commit must be made in.
    pub fn epoch(&self) -> u64 {
        self.authority.epoch()
    }

    /// The users with at least one device in the group.
    pub fn users(&self) -> BTreeSet<UserId> {
        self.devices.values().copied().collect()
    }

    /// Member devices and their users.
    pub fn devices(&self) -> &BTreeMap<DeviceId, UserId> {
        &self.devices
    }

    /// The MLS leaf index of a member device, if known.
    pub fn leaf_of(&self, device: DeviceId) -> Option<u32> {
        self.leaves.get(&device).copied()
    }

    /// Devices with a removal proposed by the gateway and not yet committed.
    pub fn removals(&self) -> &BTreeSet<DeviceId> {
        &self.removals
    }

    /// Records that the gateway proposes to remove `device`; false if it is not a member with a
    /// known leaf.
    pub fn propose_removal(&mut self, device: DeviceId) -> bool {
        if !self.leaves.contains_key(&device) || !self.devices.contains_key(&device) {
            return false;
        }
        self.removals.insert(device);
        true
    }

    /// A user's role, if the user has a device in the group.
    pub fn role(&self, user: UserId) -> Option<Role> {
        self.roles.get(&user).copied()
    }

    /// Checks a commit's declaration against the sender's role. `user_of` names the user each
    /// device is bound to.
    pub fn check(
        &self,
        sender: DeviceId,
        ops: &GroupOps,
        user_of: impl Fn(DeviceId) -> Option<UserId>,
    ) -> Result<Change, GroupRefusal> {
        let Some(&sender_user) = self.devices.get(&sender) else {
            return Err(GroupRefusal::Forbidden(
                "this device is not a member of the group".into(),
            ));
        };
        let role = self
            .roles
            .get(&sender_user)
            .copied()
            .unwrap_or(Role::Member);
        let mut change = Change::default();
        let mut users_after: BTreeMap<UserId, ()> = self.roles.keys().map(|u| (*u, ())).collect();
        for (device, declared) in ops.added_devices() {
            let Some(user) = user_of(device) else {
                return Err(GroupRefusal::Invalid(format!(
                    "{device} has never said which user it belongs to"
                )));
            };
            if user != declared {
                return Err(GroupRefusal::Invalid(format!(
                    "{device} belongs to {user}, not to {declared}"
                )));
            }
            if self.devices.contains_key(&device)
                || change.added.iter().any(|(d, _, _)| *d == device)
            {
                return Err(GroupRefusal::Invalid(format!(
                    "{device} is already a member"
                )));
            }
            let allowed = match (self.kind, role) {
                (GroupKind::Dm, _) => users_after.contains_key(&user) || users_after.len() < 2,
                (GroupKind::Own, _) => user == sender_user,
                (GroupKind::Room, Role::Owner | Role::Admin) => true,
                (GroupKind::Room, Role::Member) => user == sender_user,
            };
            if !allowed {
                let why = match self.kind {
                    GroupKind::Dm => "a DM holds two users; create a room for more".to_string(),
                    GroupKind::Own => {
                        "the group of a user's own devices holds no one else".to_string()
                    }
                    GroupKind::Room => {
                        format!("{} may add only its own devices", role.with_article())
                    }
                };
                return Err(GroupRefusal::Forbidden(format!("adding {device}: {why}")));
            }
            users_after.insert(user, ());
            let leaf = ops
                .added
                .iter()
                .find(|a| DeviceId::from_bytes(*a.device) == device)
                .and_then(|a| a.leaf);
            change.added.push((device, user, leaf));
        }
        for device in ops.removed_devices() {
            let Some(&user) = self.devices.get(&device) else {
                return Err(GroupRefusal::Invalid(format!("{device} is not a member")));
            };
            let target_role = self.roles.get(&user).copied().unwrap_or(Role::Member);
            let allowed = user == sender_user
                || self.removals.contains(&device)
                || match (self.kind, role) {
                    (GroupKind::Dm | GroupKind::Own, _) => false,
                    (GroupKind::Room, Role::Owner) => true,
                    (GroupKind::Room, Role::Admin) => target_role == Role::Member,
                    (GroupKind::Room, Role::Member) => false,
                };
            if !allowed {
                return Err(GroupRefusal::Forbidden(format!(
                    "removing {device}: {} may not remove a device of {}",
                    role.with_article(),
                    target_role.with_article()
                )));
            }
            let asked = self.removals.contains(&device);
            if !asked && user == sender_user && role == Role::Owner && self.kind == GroupKind::Room
            {
                let others = self
                    .devices
                    .iter()
                    .filter(|(d, u)| **u == user && **d != device);
                if others.count() == 0 && self.devices.len() > 1 {
                    return Err(GroupRefusal::Forbidden(
                        "the owner's last device cannot leave a room that has other members; \
                         make another user owner first"
                            .into(),
                    ));
                }
            }
            change.removed.push(device);
        }
        for rc in &ops.roles {
            let user = UserId::from_bytes(*rc.user);
            let Some(new_role) = Role::from_u8(rc.role) else {
                return Err(GroupRefusal::Invalid(format!("unknown role {}", rc.role)));
            };
            if self.kind != GroupKind::Room || role != Role::Owner {
                return Err(GroupRefusal::Forbidden(
                    "only a room's owner sets roles".into(),
                ));
            }
            if !users_after.contains_key(&user) {
                return Err(GroupRefusal::Invalid(format!("{user} is not in the room")));
            }
            if user == sender_user && new_role != Role::Owner {
                let owners = self.roles.values().filter(|r| **r == Role::Owner).count();
                if owners <= 1 {
                    return Err(GroupRefusal::Forbidden(
                        "a room keeps at least one owner".into(),
                    ));
                }
            }
            change.roles.push((user, new_role));
        }
        Ok(change)
    }

    /// Applies a checked change: devices join and leave, roles change; a user with no device
    /// left loses its role. A room left without an owner gets one by the handover rule (see
    /// the module docs); the user who became owner that way is returned.
    pub fn apply(&mut self, change: &Change) -> Option<UserId> {
        for (device, user, leaf) in &change.added {
            let previous = self.devices.insert(*device, *user);
            debug_assert!(previous.is_none(), "checked: not yet a member");
            if let Some(leaf) = leaf {
                self.leaves.insert(*device, *leaf);
            }
            let default = match self.kind {
                GroupKind::Dm | GroupKind::Own => Role::Owner,
                GroupKind::Room => Role::Member,
            };
            self.roles.entry(*user).or_insert(default);
            if !self.joined.contains_key(user) {
                let next = self.joined.values().max().map_or(0, |m| m + 1);
                self.joined.insert(*user, next);
            }
        }
        for device in &change.removed {
            self.leaves.remove(device);
            self.removals.remove(device);
            if let Some(user) = self.devices.remove(device) {
                if !self.devices.values().any(|u| *u == user) {
                    self.roles.remove(&user);
                    self.joined.remove(&user);
                }
            }
        }
        for (user, role) in &change.roles {
            if self.roles.contains_key(user) {
                self.roles.insert(*user, *role);
            }
        }
        let handed_over = self.hand_over_ownership();
        assert!(
            self.kind != GroupKind::Room
                || self.roles.is_empty()
                || self.roles.values().any(|r| *r == Role::Owner),
            "a room with members always has an owner"
        );
        handed_over
    }

    /// If this room has members but no owner, makes the earliest-joined admin owner, or else
    /// the earliest-joined member.
    fn hand_over_ownership(&mut self) -> Option<UserId> {
        if self.kind != GroupKind::Room
            || self.roles.is_empty()
            || self.roles.values().any(|r| *r == Role::Owner)
        {
            return None;
        }
        let order = |user: &UserId| (self.joined.get(user).copied().unwrap_or(0), *user);
        let earliest = |wanted: Option<Role>| {
            self.roles
                .iter()
                .filter(|(_, r)| wanted.is_none_or(|w| **r == w))
                .map(|(u, _)| *u)
                .min_by_key(order)
        };
        let heir = earliest(Some(Role::Admin)).or_else(|| earliest(None))?;
        self.roles.insert(heir, Role::Owner);
        Some(heir)
    }

    /// Adds the write that persists this group.
    pub fn persist(&self, conv: ConversationId, batch: &mut WriteBatch) {
        batch.put(GROUPS_TABLE, conv.to_bytes().to_vec(), self.encode());
    }

    /// The group as CBOR: its store record, which a handover carries too.
    pub fn encode(&self) -> Vec<u8> {
        let record = GroupRecord {
            kind: self.kind as u8,
            epoch: self.authority.epoch(),
            roles: self
                .roles
                .iter()
                .map(|(u, r)| RoleChange {
                    user: ByteArray::from(u.to_bytes()),
                    role: *r as u8,
                })
                .collect(),
            devices: self
                .devices
                .iter()
                .map(|(d, u)| DeviceRecord {
                    device: ByteArray::from(d.to_bytes()),
                    user: ByteArray::from(u.to_bytes()),
                    leaf: self.leaves.get(d).copied(),
                })
                .collect(),
            removals: self
                .removals
                .iter()
                .map(|d| ByteArray::from(d.to_bytes()))
                .collect(),
            joined: Some(
                self.joined
                    .iter()
                    .map(|(u, order)| JoinedRecord {
                        user: ByteArray::from(u.to_bytes()),
                        order: *order,
                    })
                    .collect(),
            ),
            external_sender: self.external_pending.map(ByteArray::from),
        };
        minicbor::to_vec(&record).expect("encoding into a Vec cannot fail")
    }

    /// Reads a persisted group back.
    pub fn decode(key: &[u8], value: &[u8]) -> Result<(ConversationId, GroupState), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            table: GROUPS_TABLE.0,
            reason,
        };
        let id: [u8; 16] = key
            .try_into()
            .map_err(|_| corrupt(format!("key of {} bytes, want 16", key.len())))?;
        let state = GroupState::decode_record(value).map_err(corrupt)?;
        Ok((ConversationId::from_bytes(id), state))
    }

    /// Reads a group's CBOR record ([`GroupState::encode`]), or says what is wrong with it.
    pub fn decode_record(value: &[u8]) -> Result<GroupState, String> {
        let record: GroupRecord =
            minicbor::decode(value).map_err(|e| format!("group record: {e}"))?;
        let kind = GroupKind::from_u8(record.kind)
            .ok_or_else(|| format!("unknown conversation kind {}", record.kind))?;
        let mut roles = BTreeMap::new();
        for rc in record.roles {
            let role = Role::from_u8(rc.role).ok_or_else(|| format!("unknown role {}", rc.role))?;
            roles.insert(UserId::from_bytes(*rc.user), role);
        }
        let devices = record
            .devices
            .iter()
            .map(|d| (DeviceId::from_bytes(*d.device), UserId::from_bytes(*d.user)))
            .collect();
        let leaves = record
            .devices
            .iter()
            .filter_map(|d| Some((DeviceId::from_bytes(*d.device), d.leaf?)))
            .collect();
        let removals = record
            .removals
            .iter()
            .map(|d| DeviceId::from_bytes(**d))
            .collect();
        let joined = record
            .joined
            .unwrap_or_default()
            .iter()
            .map(|j| (UserId::from_bytes(*j.user), j.order))
            .collect();
        let state = GroupState {
            kind,
            authority: EpochAuthority::new(record.epoch),
            roles,
            devices,
            leaves,
            removals,
            joined,
            external_pending: record.external_sender.map(|k| *k),
        };
        Ok(state)
    }
}

#[derive(Encode, Decode)]
#[cbor(map)]
struct DeviceRecord {
    #[n(0)]
    device: ByteArray<16>,
    #[n(1)]
    user: ByteArray<16>,
    #[n(2)]
    leaf: Option<u32>,
}

#[derive(Encode, Decode)]
#[cbor(map)]
struct GroupRecord {
    #[n(0)]
    kind: u8,
    #[n(1)]
    epoch: u64,
    #[n(2)]
    roles: Vec<RoleChange>,
    #[n(3)]
    devices: Vec<DeviceRecord>,
    #[n(4)]
    removals: Vec<ByteArray<16>>,
    /// Join order of member users (absent in records written before it was kept).
    #[n(5)]
    joined: Option<Vec<JoinedRecord>>,
    /// The external sender the group changes to once a commit takes its proposal (absent
    /// unless a handover made this gateway the authority and no commit followed yet).
    #[n(6)]
    external_sender: Option<ByteArray<32>>,
}

#[derive(Encode, Decode)]
#[cbor(map)]
struct JoinedRecord {
    #[n(0)]
    user: ByteArray<16>,
    #[n(1)]
    order: u64,
}

#[cfg(test)]
mod tests;
