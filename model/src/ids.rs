//! Identifiers that travel on the wire and index state.
//!
//! Device and conversation ids are 128-bit so that they fill the header's routing fields and can
//! later be derived from key material (a device id from a hash of its public key) without
//! changing the frame format.

use core::fmt;

macro_rules! id128 {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u128);

        impl $name {
            /// The id as 16 big-endian bytes, as it appears in a frame.
            pub fn to_bytes(self) -> [u8; 16] {
                self.0.to_be_bytes()
            }

            /// The id from 16 big-endian bytes.
            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(u128::from_be_bytes(bytes))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{:032x}"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    };
}

id128!(
    /// One device of one user: the unit that authenticates, holds keys and acknowledges messages.
    DeviceId,
    "dev:"
);
id128!(
    /// One conversation (a DM or a room): one ordered log with one authority gateway.
    ConversationId,
    "conv:"
);
id128!(
    /// A sender-chosen random message id; the gateway deduplicates on (conversation, sender, id).
    MsgId,
    "msg:"
);

id128!(
    /// One person (or service account) owning one or more devices; KeyPackage fetches and DMs
    /// address users, and each of a user's devices is a separate MLS member.
    UserId,
    "user:"
);

/// One transport connection as the driver names it; only unique within one driver.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ConnectionId(pub u64);

impl ConversationId {
    /// The id of a conversation named by people (`"team-room"`): the first 16 bytes of SHA-256
    /// over a context string and the name. Gateways and nodes derive the same id independently.
    pub fn from_name(name: &str) -> ConversationId {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(b"sund/conversation/v1")
            .chain_update(name.as_bytes())
            .finalize();
        ConversationId::from_bytes(digest[..16].try_into().expect("16 of 32 bytes"))
    }
}
