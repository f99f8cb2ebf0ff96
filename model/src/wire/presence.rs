//! Payloads of contacts and presence (opcodes `0x04xx`).
//!
//! Contacts are pairs of users who each added the other. The gateway keeps only user ids
//! (never the names people give each other, which stay on their devices) because it enforces
//! what contacts and blocks allow: whose presence a device may learn, who may fetch whose
//! KeyPackages (and so start a DM or add someone to a room). Every request names its request
//! id in the header's seq; the answer ([`Contacts`], or an `Error`) carries the same seq.
//!
//! Presence is never minute-exact on the wire: a [`Seen`] is "online" or a coarse bucket of
//! how long ago the user was last online, and it is [`Seen::Unknown`] for anyone who is not a
//! mutual contact of the watcher, is invisible, or blocked the watcher (or was blocked by it):
//! a watcher cannot tell those apart.

use minicbor::bytes::ByteArray;
use minicbor::{Decode, Encode};

/// Most users in one [`PresenceSubscribe`] on the wire (the gateway's configured cap is lower).
pub const WATCHLIST_LEN_MAX: usize = 4096;
/// Most users in each list of a [`Contacts`] answer, and most entries of a [`PresenceNotify`].
pub const CONTACTS_LEN_MAX: usize = 4096;

/// What a [`ContactChange`] asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum ContactAction {
    /// Ask to be contacts (or accept the other's request: each side adds the other).
    Add = 0,
    /// Stop being contacts, or withdraw or decline a request.
    Remove = 1,
    /// Block the user: no presence either way, no KeyPackages of yours for them, their
    /// requests hidden. Removes them as a contact.
    Block = 2,
    /// Unblock the user (they are not a contact again until both add each other).
    Unblock = 3,
}

impl ContactAction {
    /// The action for a wire value.
    pub fn from_u8(value: u8) -> Option<ContactAction> {
        [
            ContactAction::Add,
            ContactAction::Remove,
            ContactAction::Block,
            ContactAction::Unblock,
        ]
        .into_iter()
        .find(|a| *a as u8 == value)
    }
}

/// Node → gateway: change this device's user's relation to `user`.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct ContactChange {
    /// The other user.
    #[n(0)]
    pub user: ByteArray<16>,
    /// A [`ContactAction`] value.
    #[n(1)]
    pub action: u8,
    /// The other user's domain when it is not the device's own (a user id does not say):
    /// the gateway tells that domain's gateway of adds and removes, so that contacts span
    /// domains. Absent for a user of the device's domain, or one the gateway already knows
    /// (someone who asked from another domain).
    #[n(2)]
    pub domain: Option<String>,
}

/// Node → gateway: be invisible (appear offline to everyone, while working normally) or not.
/// A setting of the user, for all of their devices; answered by [`Contacts`].
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct PresenceUpdate {
    /// True: invisible.
    #[n(0)]
    pub invisible: bool,
}

/// Node → gateway: send this user's contacts, requests and blocks ([`Contacts`]).
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cbor(map)]
pub struct ContactsFetch {}

/// Gateway → node: the user's relations as the gateway holds them, after a change or a fetch.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq, Default)]
#[cbor(map)]
pub struct Contacts {
    /// Mutual contacts (each added the other).
    #[n(0)]
    pub contacts: Vec<ByteArray<16>>,
    /// Users who asked to be contacts and were not added back (blocked users' requests are
    /// not listed).
    #[n(1)]
    pub incoming: Vec<ByteArray<16>>,
    /// Users this user asked who have not added back.
    #[n(2)]
    pub outgoing: Vec<ByteArray<16>>,
    /// Users this user blocked.
    #[n(3)]
    pub blocked: Vec<ByteArray<16>>,
    /// True if this user is invisible.
    #[n(4)]
    pub invisible: bool,
}

impl Contacts {
    /// A digest of the listing (BLAKE3 of its encoding, first eight bytes): gateway and
    /// device compare theirs through heartbeats.
    pub fn digest(&self) -> u64 {
        let bytes = minicbor::to_vec(self).expect("a listing encodes");
        let hash = blake3::hash(&bytes);
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        u64::from_le_bytes(first)
    }
}

/// Node → gateway: this session's watchlist (replacing any earlier one); the gateway answers
/// with a [`PresenceNotify`] of every listed user's state, then pushes changes.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq, Default)]
#[cbor(map)]
pub struct PresenceSubscribe {
    /// The users to watch.
    #[n(0)]
    pub users: Vec<ByteArray<16>>,
}

/// How recently a user was seen, in the only resolution the gateway ever tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Seen {
    /// Not a mutual contact, invisible, blocked either way, or never seen: nothing to tell.
    Unknown = 0,
    /// A device of the user has a session now.
    Online = 1,
    /// Last online within three days.
    Recently = 2,
    /// Last online within a week.
    WithinWeek = 3,
    /// Last online within a month.
    WithinMonth = 4,
    /// Last online more than a month ago.
    LongAgo = 5,
    /// A user of another domain whose gateway was asked and has not answered yet (the
    /// watcher's own gateway found nothing against it). A device waits a moment for the
    /// answer before it shows a state.
    Asking = 6,
}

impl Seen {
    /// The state for a wire value (unknown values: [`Seen::Unknown`]).
    pub fn from_u8(value: u8) -> Seen {
        [
            Seen::Online,
            Seen::Recently,
            Seen::WithinWeek,
            Seen::WithinMonth,
            Seen::LongAgo,
            Seen::Asking,
        ]
        .into_iter()
        .find(|s| *s as u8 == value)
        .unwrap_or(Seen::Unknown)
    }

    /// The bucket of a user last online `ago`.
    pub fn last_online(ago: core::time::Duration) -> Seen {
        const DAY: u64 = 24 * 3600;
        match ago.as_secs() {
            s if s <= 3 * DAY => Seen::Recently,
            s if s <= 7 * DAY => Seen::WithinWeek,
            s if s <= 30 * DAY => Seen::WithinMonth,
            _ => Seen::LongAgo,
        }
    }

    /// In words, as the CLI shows it.
    pub fn describe(self) -> &'static str {
        match self {
            Seen::Unknown => "unknown",
            Seen::Online => "online",
            Seen::Recently => "last seen recently",
            Seen::WithinWeek => "last seen within a week",
            Seen::WithinMonth => "last seen within a month",
            Seen::LongAgo => "last seen a long time ago",
            Seen::Asking => "not known yet (their domain's gateway has not answered)",
        }
    }
}

/// One watched user's state.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct PresenceEntry {
    /// The user.
    #[n(0)]
    pub user: ByteArray<16>,
    /// A [`Seen`] value.
    #[n(1)]
    pub seen: u8,
}

/// Gateway → node: states of watched users (all of them after a subscribe, changes after).
/// The header's seq is the request id of the watchlist it belongs to; `number` counts the
/// notifications of that watchlist from 1 (the answer), so that a device can put late ones
/// behind newer ones and tell, from the heartbeat's count, that it missed one.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq, Default)]
#[cbor(map)]
pub struct PresenceNotify {
    /// The states.
    #[n(0)]
    pub entries: Vec<PresenceEntry>,
    /// This notification's number within its watchlist, from 1.
    #[n(1)]
    pub number: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_coarse_and_ordered() {
        use core::time::Duration;
        let h = |hours: u64| Duration::from_secs(hours * 3600);
        assert_eq!(Seen::last_online(h(0)), Seen::Recently);
        assert_eq!(Seen::last_online(h(72)), Seen::Recently);
        assert_eq!(Seen::last_online(h(73)), Seen::WithinWeek);
        assert_eq!(Seen::last_online(h(24 * 8)), Seen::WithinMonth);
        assert_eq!(Seen::last_online(h(24 * 31)), Seen::LongAgo);
        for value in 0..=255u8 {
            let seen = Seen::from_u8(value);
            assert!(value > 6 || seen as u8 == value);
        }
        for value in 0..=255u8 {
            if let Some(a) = ContactAction::from_u8(value) {
                assert_eq!(a as u8, value);
            } else {
                assert!(value > 3);
            }
        }
    }
}
