//! What a Sund commit declares about itself, and the vocabulary of groups both sides share.
//!
//! The gateway never reads a commit's content. Each Sund commit declares what it does in its MLS
//! authenticated data ([`GroupOps`]): the AAD is signed by the committer and travels in the clear
//! in both MLS framings. The gateway enforces roles on the declaration (`gateway::groups`), and
//! every member checks the declaration against the commit it processes before merging it (a
//! commit whose declaration differs from its content is refused by every honest member).

use minicbor::bytes::ByteArray;
use minicbor::{Decode, Encode};

use crate::ids::{DeviceId, UserId};

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
    /// One user's own devices, and nobody else: where the user's devices share what only the
    /// user should know (contact names, verification marks; see `node::contact_book`). Its id
    /// follows from the user (`node::own_id`), so every device names the same one.
    Own = 3,
}

impl GroupKind {
    /// The kind for a wire value.
    pub fn from_u8(value: u8) -> Option<GroupKind> {
        match value {
            1 => Some(GroupKind::Dm),
            2 => Some(GroupKind::Room),
            3 => Some(GroupKind::Own),
            _ => None,
        }
    }
}

impl core::fmt::Display for GroupKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            GroupKind::Dm => "dm",
            GroupKind::Room => "room",
            GroupKind::Own => "own",
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

impl Role {
    /// The role with its article, as a sentence names it ("an admin").
    pub fn with_article(self) -> &'static str {
        match self {
            Role::Member => "a member",
            Role::Admin => "an admin",
            Role::Owner => "an owner",
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
    /// The domain of each added device of another domain than the committer's, so that a
    /// member whose gateway has not vouched for that domain's root yet waits before
    /// processing the commit (processing it spends its key). `None` when there are none.
    #[n(4)]
    pub domains: Option<Vec<AddedDomain>>,
    /// On the commit creating a DM with a user of another domain: that domain, whose gateway
    /// the committer's gateway asks whether it makes the DM itself (`gateway::dm_claims`).
    #[n(5)]
    pub dm_with: Option<String>,
    /// On a commit taking the gateway's proposal to change the group's external sender (its
    /// authority was handed to another domain's gateway, `gateway::handover`): the new
    /// sender's 32-byte signature key, which members check against the proposal they commit.
    #[n(6)]
    pub external_sender: Option<ByteArray<32>>,
}

/// The domain of a device a commit adds (see [`GroupOps::domains`]).
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct AddedDomain {
    /// The device.
    #[n(0)]
    pub device: ByteArray<16>,
    /// Its domain.
    #[n(1)]
    pub domain: String,
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
        let domains = ops.domains.as_ref().map_or(0, Vec::len);
        if domains > ops.added.len()
            || ops
                .domains
                .iter()
                .flatten()
                .any(|d| d.domain.len() > crate::trust::DOMAIN_BYTES_MAX)
            || ops
                .dm_with
                .as_ref()
                .is_some_and(|d| d.len() > crate::trust::DOMAIN_BYTES_MAX)
        {
            return Err(GroupRefusal::Invalid(
                "a commit names more domains of added devices than it adds, or a domain longer than DNS allows".into(),
            ));
        }
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
