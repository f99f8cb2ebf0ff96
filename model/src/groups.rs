//! Conversations that are MLS groups, as the gateway sees them: kind, roles, member devices and
//! the commit authority.
//!
//! The gateway never reads a commit's content. Each Sund commit declares what it does in its MLS
//! authenticated data ([`GroupOps`]): the AAD is signed by the committer, travels in the clear in
//! both MLS framings, and every member checks it against the commit it processes (a commit whose
//! declaration differs from its content is refused by every honest member). The gateway enforces
//! roles on the declaration:
//!
//! | who (the sender's user) | may add | may remove | may set roles |
//! |---|---|---|---|
//! | room owner | any user's devices | any device but the owner's own last one | yes |
//! | room admin | any user's devices | devices of members, and its own user's | no |
//! | room member | its own user's devices | its own user's devices | no |
//! | DM user | devices of the DM's two users | its own user's devices | no |
//!
//! A commit removes at most one device: openmls orders several member-specific proposals by a
//! std hash map (see `mls`), and one per commit keeps every run reproducible.
//!
//! The gateway is also an external sender of every group (RFC 9420 §12.1.8.1): it signs Remove
//! proposals for a device that asked to leave or that its operator removes. Any member may
//! commit such a pending removal whatever its role. To address the device, the gateway keeps
//! each member's leaf index: the creator sits at leaf 0, and each commit declares the leaf of
//! every device it adds (members check the declaration when they merge the commit).

use std::collections::{BTreeMap, BTreeSet};

use minicbor::bytes::ByteArray;
use minicbor::{Decode, Encode};

use crate::env::{StoreError, Table, WriteBatch};
use crate::ids::{ConversationId, DeviceId, UserId};
use crate::mls::authority::EpochAuthority;

/// Store table of group records: conversation id → [`GroupRecord`] CBOR.
pub const GROUPS_TABLE: Table = Table("groups");

/// Most devices one commit may add.
pub const ADDED_MAX: usize = 1024;
/// Most devices one commit may remove (see the module docs).
pub const REMOVED_MAX: usize = 1;
/// Most role changes in one commit.
pub const ROLES_MAX: usize = 64;

/// What a conversation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum GroupKind {
    /// Two users and all their devices.
    Dm = 1,
    /// Any number of users, with roles.
    Room = 2,
}

impl GroupKind {
    /// The kind for a wire value.
    pub fn from_u8(value: u8) -> Option<GroupKind> {
        match value {
            1 => Some(GroupKind::Dm),
            2 => Some(GroupKind::Room),
            _ => None,
        }
    }
}

impl core::fmt::Display for GroupKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            GroupKind::Dm => "dm",
            GroupKind::Room => "room",
        })
    }
}

/// A user's role in a room (in a DM both users are owners of their own devices only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Sends, adds and removes its own user's devices.
    Member = 0,
    /// Also adds anyone and removes members.
    Admin = 1,
    /// Also removes admins and sets roles.
    Owner = 2,
}

impl Role {
    /// The role for a wire value.
    pub fn from_u8(value: u8) -> Option<Role> {
        match value {
            0 => Some(Role::Member),
            1 => Some(Role::Admin),
            2 => Some(Role::Owner),
            _ => None,
        }
    }
}

impl core::fmt::Display for Role {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Owner => "owner",
        })
    }
}

/// A role given to a user by a commit.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct RoleChange {
    /// The user.
    #[n(0)]
    pub user: ByteArray<16>,
    /// The new role (`Role` as a number).
    #[n(1)]
    pub role: u8,
}

/// A device a commit adds, and the user it belongs to (checked by the gateway against the
/// device's binding, so every member learns who its new members are).
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct AddedDevice {
    /// The device.
    #[n(0)]
    pub device: ByteArray<16>,
    /// Its user.
    #[n(1)]
    pub user: ByteArray<16>,
    /// The MLS leaf index the device gets.
    #[n(2)]
    pub leaf: Option<u32>,
}

impl AddedDevice {
    /// A declaration for `device` of `user` at `leaf`.
    pub fn new(device: DeviceId, user: UserId, leaf: u32) -> AddedDevice {
        AddedDevice {
            device: ByteArray::from(device.to_bytes()),
            user: ByteArray::from(user.to_bytes()),
            leaf: Some(leaf),
        }
    }
}

/// What a Sund commit declares it does; carried as the commit's MLS authenticated data.
#[derive(Encode, Decode, Clone, Debug, Default, PartialEq, Eq)]
#[cbor(map)]
pub struct GroupOps {
    /// Set on the commit that creates the conversation: its kind (`GroupKind` as a number).
    #[n(0)]
    pub create: Option<u8>,
    /// Devices the commit adds.
    #[n(1)]
    pub added: Vec<AddedDevice>,
    /// Devices the commit removes (at most [`REMOVED_MAX`]).
    #[n(2)]
    pub removed: Vec<ByteArray<16>>,
    /// Role changes.
    #[n(3)]
    pub roles: Vec<RoleChange>,
}

impl GroupOps {
    /// The CBOR bytes that go into the commit's authenticated data.
    pub fn encode(&self) -> Vec<u8> {
        minicbor::to_vec(self).expect("encoding into a Vec cannot fail")
    }

    /// Reads the declaration from a commit's authenticated data (empty data: no changes),
    /// checking its limits.
    pub fn decode(aad: &[u8]) -> Result<GroupOps, GroupRefusal> {
        if aad.is_empty() {
            return Ok(GroupOps::default());
        }
        let ops: GroupOps = minicbor::decode(aad)
            .map_err(|e| GroupRefusal::Invalid(format!("group operations: {e}")))?;
        let limits = [
            ("added", ops.added.len(), ADDED_MAX),
            ("removed", ops.removed.len(), REMOVED_MAX),
            ("roles", ops.roles.len(), ROLES_MAX),
        ];
        for (field, len, max) in limits {
            if len > max {
                return Err(GroupRefusal::Invalid(format!(
                    "a commit lists {len} {field} devices or roles; at most {max} are allowed"
                )));
            }
        }
        Ok(ops)
    }

    /// Devices added and their declared users, as ids.
    pub fn added_devices(&self) -> impl Iterator<Item = (DeviceId, UserId)> + '_ {
        self.added
            .iter()
            .map(|a| (DeviceId::from_bytes(*a.device), UserId::from_bytes(*a.user)))
    }

    /// Devices removed, as ids.
    pub fn removed_devices(&self) -> impl Iterator<Item = DeviceId> + '_ {
        self.removed.iter().map(|d| DeviceId::from_bytes(**d))
    }
}

/// Why the gateway refused a group message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GroupRefusal {
    /// The sender's role does not allow the change.
    #[error("{0}")]
    Forbidden(String),
    /// The message or its declaration is malformed or inconsistent with the group.
    #[error("{0}")]
    Invalid(String),
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
        }
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
                (GroupKind::Room, Role::Owner | Role::Admin) => true,
                (GroupKind::Room, Role::Member) => user == sender_user,
            };
            if !allowed {
                let why = match self.kind {
                    GroupKind::Dm => "a DM holds two users; create a room for more".to_string(),
                    GroupKind::Room => format!("a {role} may add only its own devices"),
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
                    (GroupKind::Dm, _) => false,
                    (GroupKind::Room, Role::Owner) => true,
                    (GroupKind::Room, Role::Admin) => target_role == Role::Member,
                    (GroupKind::Room, Role::Member) => false,
                };
            if !allowed {
                return Err(GroupRefusal::Forbidden(format!(
                    "removing {device}: a {role} may not remove a device of a {target_role}"
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
    /// left loses its role.
    pub fn apply(&mut self, change: &Change) {
        for (device, user, leaf) in &change.added {
            let previous = self.devices.insert(*device, *user);
            debug_assert!(previous.is_none(), "checked: not yet a member");
            if let Some(leaf) = leaf {
                self.leaves.insert(*device, *leaf);
            }
            let default = match self.kind {
                GroupKind::Dm => Role::Owner,
                GroupKind::Room => Role::Member,
            };
            self.roles.entry(*user).or_insert(default);
        }
        for device in &change.removed {
            self.leaves.remove(device);
            self.removals.remove(device);
            if let Some(user) = self.devices.remove(device) {
                if !self.devices.values().any(|u| *u == user) {
                    self.roles.remove(&user);
                }
            }
        }
        for (user, role) in &change.roles {
            if self.roles.contains_key(user) {
                self.roles.insert(*user, *role);
            }
        }
    }

    /// Adds the write that persists this group.
    pub fn persist(&self, conv: ConversationId, batch: &mut WriteBatch) {
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
        };
        let value = minicbor::to_vec(&record).expect("encoding into a Vec cannot fail");
        batch.put(GROUPS_TABLE, conv.to_bytes().to_vec(), value);
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
        let record: GroupRecord =
            minicbor::decode(value).map_err(|e| corrupt(format!("record: {e}")))?;
        let kind = GroupKind::from_u8(record.kind)
            .ok_or_else(|| corrupt(format!("unknown kind {}", record.kind)))?;
        let mut roles = BTreeMap::new();
        for rc in record.roles {
            let role = Role::from_u8(rc.role)
                .ok_or_else(|| corrupt(format!("unknown role {}", rc.role)))?;
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
        let state = GroupState {
            kind,
            authority: EpochAuthority::new(record.epoch),
            roles,
            devices,
            leaves,
            removals,
        };
        Ok((ConversationId::from_bytes(id), state))
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::WriteOp;

    fn d(n: u128) -> DeviceId {
        DeviceId(n)
    }

    fn u(n: u128) -> UserId {
        UserId(n)
    }

    /// Devices 1x belong to user 1, 2x to user 2, 3x to user 3.
    fn user_of(device: DeviceId) -> Option<UserId> {
        Some(u(device.0 / 10))
    }

    fn ops(added: &[u128], removed: &[u128]) -> GroupOps {
        GroupOps {
            create: None,
            added: added
                .iter()
                .enumerate()
                .map(|(i, n)| AddedDevice::new(d(*n), user_of(d(*n)).unwrap(), i as u32 + 1))
                .collect(),
            removed: removed
                .iter()
                .map(|n| ByteArray::from(d(*n).to_bytes()))
                .collect(),
            roles: Vec::new(),
        }
    }

    fn room() -> GroupState {
        let mut g = GroupState::create(GroupKind::Room, d(10), u(1));
        let change = g
            .check(d(10), &ops(&[11, 20, 21, 30], &[]), user_of)
            .unwrap();
        g.apply(&change);
        g
    }

    #[test]
    fn owner_adds_anyone_member_only_own_devices() {
        let g = room();
        assert_eq!(g.role(u(2)), Some(Role::Member));
        assert!(g.check(d(20), &ops(&[22], &[]), user_of).is_ok());
        assert!(matches!(
            g.check(d(20), &ops(&[40], &[]), user_of),
            Err(GroupRefusal::Forbidden(_))
        ));
        assert!(matches!(
            g.check(d(20), &ops(&[11], &[]), user_of),
            Err(GroupRefusal::Invalid(_))
        ));
    }

    #[test]
    fn removal_follows_roles() {
        let mut g = room();
        // A member removes its own device, not another user's.
        assert!(g.check(d(20), &ops(&[], &[21]), user_of).is_ok());
        assert!(matches!(
            g.check(d(20), &ops(&[], &[30]), user_of),
            Err(GroupRefusal::Forbidden(_))
        ));
        // An admin removes members but not the owner.
        let promote = GroupOps {
            roles: vec![RoleChange {
                user: ByteArray::from(u(2).to_bytes()),
                role: Role::Admin as u8,
            }],
            ..GroupOps::default()
        };
        assert!(matches!(
            g.check(d(30), &promote, user_of),
            Err(GroupRefusal::Forbidden(_))
        ));
        let change = g.check(d(10), &promote, user_of).unwrap();
        g.apply(&change);
        assert_eq!(g.role(u(2)), Some(Role::Admin));
        assert!(g.check(d(20), &ops(&[], &[30]), user_of).is_ok());
        assert!(matches!(
            g.check(d(20), &ops(&[], &[10]), user_of),
            Err(GroupRefusal::Forbidden(_))
        ));
        // Removing a user's last device drops its role.
        let change = g.check(d(10), &ops(&[], &[30]), user_of).unwrap();
        g.apply(&change);
        assert_eq!(g.role(u(3)), None);
    }

    #[test]
    fn a_dm_holds_two_users() {
        let mut g = GroupState::create(GroupKind::Dm, d(10), u(1));
        let change = g.check(d(10), &ops(&[11, 20, 21], &[]), user_of).unwrap();
        g.apply(&change);
        assert!(matches!(
            g.check(d(20), &ops(&[30], &[]), user_of),
            Err(GroupRefusal::Forbidden(_))
        ));
        // Either user adds a new device of either user; removes only its own.
        assert!(g.check(d(20), &ops(&[12], &[]), user_of).is_ok());
        assert!(g.check(d(20), &ops(&[], &[21]), user_of).is_ok());
        assert!(matches!(
            g.check(d(20), &ops(&[], &[11]), user_of),
            Err(GroupRefusal::Forbidden(_))
        ));
    }

    #[test]
    fn declarations_are_bounded_and_checked() {
        let g = room();
        let two_removes = ops(&[], &[20, 21]).encode();
        assert!(matches!(
            GroupOps::decode(&two_removes),
            Err(GroupRefusal::Invalid(_))
        ));
        assert!(GroupOps::decode(&[0xff, 0x00]).is_err());
        assert_eq!(GroupOps::decode(&[]).unwrap(), GroupOps::default());
        // Unbound device, non-member sender.
        assert!(g.check(d(10), &ops(&[11], &[]), |_| None).is_err());
        assert!(matches!(
            g.check(d(99), &ops(&[], &[]), user_of),
            Err(GroupRefusal::Forbidden(_))
        ));
        // The owner's last device cannot leave while others stay.
        let mut g = room();
        let change = g.check(d(10), &ops(&[], &[11]), user_of).unwrap();
        g.apply(&change);
        assert!(matches!(
            g.check(d(10), &ops(&[], &[10]), user_of),
            Err(GroupRefusal::Forbidden(_))
        ));
    }

    #[test]
    fn records_round_trip() {
        let g = room();
        let mut batch = WriteBatch::default();
        g.persist(ConversationId(5), &mut batch);
        let Some(WriteOp::Put { key, value, .. }) = batch.ops().first().cloned() else {
            panic!("one put");
        };
        let (key, value) = (&key[..], &value[..]);
        let (conv, back) = GroupState::decode(key, value).unwrap();
        assert_eq!(conv, ConversationId(5));
        assert_eq!(back, g);
        assert!(GroupState::decode(key, &[0xa0]).is_err());
        assert!(GroupState::decode(&[1, 2], value).is_err());
    }
}
