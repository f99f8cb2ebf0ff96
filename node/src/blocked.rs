//! Hiding the messages of users this user blocked, in rooms still shared with them, for
//! `sund follow` and `sund chat`: the list kept on the device from the start, then the
//! gateway's listings as they come (kept on the device in turn).

use std::collections::BTreeSet;

use sund_model::ids::{DeviceId, UserId};
use sund_model::node::ContactList;
use sund_node::device::Device;

use crate::group_commands::Members;

/// What the user is told the first time a message is hidden.
const HIDDEN: &str = "a message from a user you blocked is hidden (and every one after it); `sund contacts unblock NAME` shows theirs again";

/// The users whose messages are hidden, and whether the user was told.
pub(crate) struct Blocked {
    users: BTreeSet<UserId>,
    told: bool,
}

impl Blocked {
    /// The list kept on the device.
    pub(crate) fn load(device: &Device) -> Blocked {
        Blocked {
            users: device.blocked_users(),
            told: false,
        }
    }

    /// Takes the gateway's latest listing, and keeps its blocks on the device.
    pub(crate) fn update(&mut self, device: &Device, list: &ContactList) -> Result<(), String> {
        self.users = list.blocked.iter().copied().collect();
        device
            .set_blocked_users(&self.users)
            .map_err(|e| e.to_string())
    }

    /// True if a message from `sender` is hidden.
    pub(crate) fn hides(&self, sender: DeviceId, members: &Members) -> bool {
        members
            .get(&sender)
            .is_some_and(|user| self.users.contains(user))
    }

    /// The words to show when a message is hidden: the first time only.
    pub(crate) fn notice(&mut self) -> Option<&'static str> {
        (!std::mem::replace(&mut self.told, true)).then_some(HIDDEN)
    }
}
