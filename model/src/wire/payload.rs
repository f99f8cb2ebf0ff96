//! CBOR payloads, one type per opcode whose feature has landed.
//!
//! Encoding: CBOR maps with small integer keys (minicbor's `#[cbor(map)]`), so that a later
//! version can add optional keys that older decoders skip. Routing data lives in the header and
//! is never repeated here. Lists carry a named maximum checked on decode.
//!
//! Why minicbor: it is maintained, `no_std`-capable, derives encoders with explicit stable field
//! indices (the wire contract stays visible in the source), decodes without pre-allocating from
//! untrusted length prefixes, and is fast; serde-based ciborium would hide the field numbering.

use minicbor::{Decode, Encode};

pub use super::files::{
    ChunkAck, ChunkHead, ChunkRequest, ChunksUnavailable, FileFetched, ListedChunkWire, UploadOpen,
    UploadStatus, CHUNK_REQUEST_IDS_MAX, UPLOAD_CHUNKS_MAX,
};
pub use super::presence::{
    ContactAction, ContactChange, Contacts, ContactsFetch, PresenceEntry, PresenceNotify,
    PresenceSubscribe, PresenceUpdate, Seen, CONTACTS_LEN_MAX, WATCHLIST_LEN_MAX,
};
use super::{Opcode, WireError};
use crate::ids::{ConversationId, MsgId};

/// Most conversation cursors one `Hello` may carry.
pub const CURSORS_LEN_MAX: usize = 4096;
/// Longest human-readable message in `Goodbye` and `Error`, in bytes.
pub const MESSAGE_BYTES_MAX: usize = 1024;
/// Most KeyPackages in one upload or one answer.
pub const KEY_PACKAGES_LEN_MAX: usize = 1024;
/// Most member devices a Welcome's roster lists (the largest group Sund serves).
pub const ROSTER_LEN_MAX: usize = 4096;
/// Most users in one KeyPackage fetch.
pub const FETCH_USERS_MAX: usize = 16;
/// Longest encoded device certificate (a 253-byte domain gives 408 bytes).
pub const CERTIFICATE_BYTES_MAX: usize = 512;
/// Longest domain name.
pub const DOMAIN_BYTES_MAX: usize = 253;

/// Resume position in one conversation: everything up to and including `seq` is processed.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct Cursor {
    /// The conversation.
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub conversation: [u8; 16],
    /// Highest seq processed.
    #[n(1)]
    pub seq: u64,
    /// The id of the message the device read at `seq`, if it read one there (not a gap, a
    /// Welcome or a loss notice). The gateway compares it with its own entry at `seq`: a
    /// different message means the device read history the gateway has since lost and
    /// replaced (a disk that lost writes it had reported durable), and the device is told.
    #[n(2)]
    #[cbor(with = "minicbor::bytes")]
    pub last: Option<[u8; 16]>,
    /// Where the device's cursor stood when it began reading in the gateway run its resume
    /// token names (the run of its last session): what it read after `since` came from that
    /// run. A gateway that lost those messages keeps the run with the seqs it marks lost, so
    /// that a device that read other messages there, from another run, is told.
    #[n(3)]
    pub since: Option<u64>,
    /// The stamp of the gateway run `since` refers to (a resume token's first 16 bytes), when
    /// it is not the run the resume token names: the device has not read under its latest
    /// token, so what it read after `since` came from the run of an earlier one.
    #[n(4)]
    #[cbor(with = "minicbor::bytes")]
    pub since_run: Option<[u8; 16]>,
    /// Seqs after `since` that the device moved over in that run without reading them (it was
    /// told they were lost, or past the replay window), first and last: they are not compared
    /// with what other devices read there.
    #[n(5)]
    pub skipped: Option<[u64; 2]>,
}

impl Cursor {
    /// A cursor for `conversation` at `seq`.
    pub fn new(conversation: ConversationId, seq: u64) -> Cursor {
        Cursor {
            conversation: conversation.to_bytes(),
            seq,
            last: None,
            since: None,
            since_run: None,
            skipped: None,
        }
    }

    /// A cursor at `seq`, where the device read the message `last`.
    pub fn read(conversation: ConversationId, seq: u64, last: Option<MsgId>) -> Cursor {
        Cursor {
            last: last.map(MsgId::to_bytes),
            ..Cursor::new(conversation, seq)
        }
    }

    /// The conversation id.
    pub fn conversation_id(&self) -> ConversationId {
        ConversationId::from_bytes(self.conversation)
    }
}

/// Node → gateway: open a session (the header's sender is the device id) and say where to
/// resume each conversation.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct Hello {
    /// Per-conversation resume positions; conversations not listed resume from the stored cursor.
    #[n(0)]
    pub cursors: Vec<Cursor>,
    /// The device's Ed25519 public key; the header's sender must be its device id.
    #[n(1)]
    #[cbor(with = "minicbor::bytes")]
    pub device_key: [u8; 32],
    /// A resume token from an earlier `HelloOk`: if still valid, the session opens without a
    /// challenge round trip.
    #[n(2)]
    #[cbor(with = "minicbor::bytes")]
    pub resume_token: Option<[u8; 32]>,
    /// The user this device belongs to, as its certificate says (kept for the log; the
    /// gateway trusts only the certificate).
    #[n(3)]
    #[cbor(with = "minicbor::bytes")]
    pub user: Option<[u8; 16]>,
    /// The device certificate (see `trust::DeviceCertificate`); a session needs one.
    #[n(4)]
    pub certificate: Option<minicbor::bytes::ByteVec>,
    /// One more than the number of this device's previous `Hello` (kept in its store): a
    /// number not above the last the gateway saw means a copy of the device's data (a clone or
    /// a restored backup) was used, which would reuse its encryption secrets.
    #[n(5)]
    pub generation: Option<u64>,
}

/// Node → gateway, before a session: issue a certificate for this device key. The header's
/// sender is the key's device id.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct Register {
    /// The device's Ed25519 public key.
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub device_key: [u8; 32],
    /// The user the device belongs to (the token's user).
    #[n(1)]
    #[cbor(with = "minicbor::bytes")]
    pub user: [u8; 16],
    /// The one-time enrolment token's secret (zeros under open enrolment).
    #[n(2)]
    #[cbor(with = "minicbor::bytes")]
    pub token: [u8; 16],
    /// The device key's signature over `trust::register_message(token, key, user)`.
    #[n(3)]
    #[cbor(with = "minicbor::bytes")]
    pub proof: [u8; 64],
}

/// Gateway → node: the certificate a `Register` asked for, with the trust root that signed it.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct Certificate {
    /// The encoded `trust::DeviceCertificate`.
    #[n(0)]
    pub certificate: minicbor::bytes::ByteVec,
    /// The trust root's public key.
    #[n(1)]
    #[cbor(with = "minicbor::bytes")]
    pub root_key: [u8; 32],
    /// For a device that registered with a pairing code: the encoded certificate of the device
    /// that vouched for it (the new device checks it against the code).
    #[n(2)]
    pub voucher: Option<minicbor::bytes::ByteVec>,
}

/// Node → gateway, in a session: whoever presents `secret` before `expires` may register one
/// device of this device's user (see `trust::pairing`).
#[derive(Encode, Decode, Clone, PartialEq, Eq)]
#[cbor(map)]
pub struct PairVouch {
    /// The pairing code's one-time secret.
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub secret: [u8; 16],
    /// Unix seconds after which the code is refused (the gateway caps it at ten minutes).
    #[n(1)]
    pub expires: u64,
    /// The device key's signature over `trust::pairing::vouch_message`.
    #[n(2)]
    #[cbor(with = "minicbor::bytes")]
    pub signature: [u8; 64],
}

/// Gateway → node: the vouch for `secret` is stored.
#[derive(Encode, Decode, Clone, Copy, PartialEq, Eq)]
#[cbor(map)]
pub struct PairVouched {
    /// The secret vouched for.
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub secret: [u8; 16],
}

/// Gateway → node, in a session: the gateway's peer domains' roots changed (a link's
/// handshake proved one for the first time, or a peer's root was re-pinned), or the device
/// asked. Node → gateway, with no bytes: send the current set (the device's digest differs
/// from the one in the gateway's heartbeat).
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct PeerRootsUpdate {
    /// An encoded `trust::peer_roots::PeerRoots`, as in `HelloOk::peer_roots`.
    #[n(0)]
    pub roots: minicbor::bytes::ByteVec,
}

/// Node → gateway, in a session: renew this device's certificate; the gateway answers with a
/// `Certificate`, a new one if the current one is close to expiry.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cbor(map)]
pub struct RenewCertificate {}

// The secrets are credentials until used: never in logs.
impl core::fmt::Debug for PairVouch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "PairVouch {{ expires: {} }}", self.expires)
    }
}

impl core::fmt::Debug for PairVouched {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("PairVouched")
    }
}

/// Gateway → node: a new device registered with a pairing code this device vouched for.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct DeviceLinked {
    /// The new device's encoded certificate.
    #[n(0)]
    pub certificate: minicbor::bytes::ByteVec,
}

/// Node → gateway: send the current CRL if it is newer than `have_version`.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cbor(map)]
pub struct CrlFetch {
    /// The version the device holds.
    #[n(0)]
    pub have_version: u64,
    /// `Some(true)`: send the other domains' CRLs the gateway holds instead (the device's
    /// digest of them differs from the heartbeat's; on an open session only).
    #[n(1)]
    pub peers: Option<bool>,
}

/// Gateway → node: the current CRL (an answer to `CrlFetch`, or pushed on revocation).
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct Crl {
    /// The encoded `trust::Crl`.
    #[n(0)]
    pub crl: minicbor::bytes::ByteVec,
}

/// Node → gateway: send the trust root.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cbor(map)]
pub struct TrustRootFetch {}

/// Gateway → node: the domain's trust root.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct TrustRoot {
    /// The root's Ed25519 public key.
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub key: [u8; 32],
    /// The domain.
    #[n(1)]
    pub domain: String,
}

/// Gateway → node: prove you hold the device key by signing this nonce.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct Challenge {
    /// Fresh random bytes from the gateway's entropy.
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub nonce: [u8; 32],
}

/// Node → gateway: the device key's signature over the session proof message
/// (`identity::session_proof_message`).
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct Proof {
    /// Ed25519 signature.
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub signature: [u8; 64],
}

/// Gateway → node: the session is open.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct HelloOk {
    /// How often the node must send a heartbeat, in milliseconds.
    #[n(0)]
    pub heartbeat_interval_ms: u32,
    /// Present this in the next `Hello` to skip the challenge; it replaces any earlier token.
    #[n(1)]
    #[cbor(with = "minicbor::bytes")]
    pub resume_token: [u8; 32],
    /// Seconds the token stays valid.
    #[n(2)]
    pub resume_token_ttl_s: u32,
    /// The gateway's MLS signature key (Ed25519): groups list it as their external sender, so
    /// that the gateway can propose removals.
    #[n(3)]
    pub external_sender: Option<minicbor::bytes::ByteVec>,
    /// The trust roots of the domains the gateway federates with, signed by the device's own
    /// root (an encoded `trust::peer_roots::PeerRoots`): what the device checks other domains'
    /// members against. Absent without federation peers, and from older gateways.
    #[n(4)]
    pub peer_roots: Option<minicbor::bytes::ByteVec>,
    /// The digest of the other domains' CRL versions the gateway holds
    /// (`trust::versions_digest`), so that a device behind asks for them at once (absent when
    /// none revokes anything).
    #[n(5)]
    pub peer_crls: Option<u64>,
}

/// Either way: a liveness probe carrying a nonce the answer echoes.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct Heartbeat {
    /// Echoed in the answer.
    #[n(0)]
    pub nonce: u64,
    /// In a gateway's answer: the version of its current CRL, so that a device whose copy of a
    /// pushed CRL was lost fetches it.
    #[n(1)]
    pub crl_version: Option<u64>,
    /// In a gateway's answer, while the session watches presence: how many
    /// `PresenceNotify` frames it sent for the current watchlist, so that a device that
    /// missed one asks again (absent otherwise).
    #[n(2)]
    pub presence: Option<u64>,
    /// In a gateway's answer, when it vouches for peer roots: the digest of the set
    /// (`trust::peer_roots::PeerRoots::digest`), so that a device whose copy of a pushed set
    /// was lost asks for it again (absent otherwise).
    #[n(3)]
    pub peer_roots: Option<u64>,
    /// In a gateway's answer, when it holds other domains' CRLs that revoke anything: the
    /// digest of their versions (`trust::versions_digest`), so that a device that missed one
    /// asks for them (absent otherwise).
    #[n(4)]
    pub peer_crls: Option<u64>,
    /// In a gateway's answer, when the device's user has any contact, request or block: the
    /// digest of its listing ([`Contacts::digest`]), so that a device whose copy of a pushed
    /// listing was lost asks for it (absent otherwise).
    #[n(5)]
    pub contacts: Option<u64>,
}

/// Machine-readable reasons for `Goodbye` and `Error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// A code this build does not know (kept for forward compatibility).
    Unknown = 0,
    /// The frame could not be decoded.
    MalformedFrame = 1,
    /// A frame other than `Hello` arrived before the session was open.
    NotAuthenticated = 2,
    /// The sender is not a member of the conversation.
    NotMember = 3,
    /// The conversation does not exist at this gateway.
    UnknownConversation = 4,
    /// No frame arrived within the heartbeat timeout.
    HeartbeatTimeout = 5,
    /// A newer session of the same device replaced this one.
    SessionReplaced = 6,
    /// The gateway is shutting down.
    ShuttingDown = 7,
    /// The opcode is not valid in this direction or state.
    UnexpectedOpcode = 8,
    /// The requested replay starts before the retained log.
    ReplayWindowExceeded = 9,
    /// The device key's proof did not verify, or the device id does not match the key.
    AuthenticationFailed = 10,
    /// The gateway does not admit this device key.
    DeviceNotAdmitted = 11,
    /// The resume token has expired: a challenge follows.
    ResumeTokenExpired = 12,
    /// The resume token is unknown or belongs to another device: a challenge follows.
    ResumeTokenInvalid = 13,
    /// Too many requests of this kind; the message says when to retry.
    RateLimited = 14,
    /// A KeyPackage upload was refused; nothing of it was stored.
    KeyPackageRejected = 15,
    /// The device is bound to another user than the one its hello names.
    UserMismatch = 16,
    /// An MLS commit or proposal for an epoch the group has left: another commit won; process
    /// it and retry (see `mls::commit_authority`).
    StaleEpoch = 17,
    /// The sender's role in the group does not allow this change (see `groups`).
    Forbidden = 18,
    /// An MLS message was malformed for this conversation, or its group operations did not
    /// match what the conversation allows.
    InvalidGroupMessage = 19,
    /// A session needs a device certificate: register first (`Register`).
    CertificateRequired = 20,
    /// The certificate is malformed, not signed by this gateway's root, or for another key.
    CertificateInvalid = 21,
    /// The certificate expired: register again.
    CertificateExpired = 22,
    /// The certificate is not valid yet (a clock is wrong).
    CertificateNotYetValid = 23,
    /// The certificate is for another domain.
    ForeignDomain = 24,
    /// The device is revoked: it will never open a session here again.
    DeviceRevoked = 25,
    /// The enrolment token is unknown, or for another user.
    EnrolmentTokenInvalid = 26,
    /// The enrolment token was already used.
    EnrolmentTokenUsed = 27,
    /// The enrolment token expired.
    EnrolmentTokenExpired = 28,
    /// A pairing vouch was refused (bad signature, expired, a secret in use, too many codes;
    /// `msg_id` is the first half of the vouch's signature), or a registration with a pairing
    /// code whose voucher was revoked since.
    PairingRefused = 29,
    /// A message came out of its sender's order in the conversation: it says it comes after
    /// another message than the last one the gateway sequenced from this device there (an
    /// earlier one has not arrived, or was refused). The error's `after` names that last one;
    /// send what waits again, chained from it.
    SenderOutOfOrder = 30,
    /// No device of a named user is registered at this gateway (a node's own verdict on a
    /// group change, from a KeyPackage fetch that found nothing).
    UnknownUser = 31,
    /// Another copy of this device's data (a clone of its directory, or a restored backup) has
    /// opened a session since this copy last did; this copy's encryption state is stale and
    /// must not be used again. Set the device up anew.
    DeviceStateCopied = 32,
    /// The gateway lost messages it had sequenced (its disk lost writes it had reported
    /// durable): the routing's seq is the first one after them, as for `ReplayWindowExceeded`.
    HistoryLost = 33,
    /// What this device read of a conversation up to the routing's seq is not what the gateway
    /// holds there: the gateway lost messages the device had read, and has since sequenced
    /// others at their seqs. The device keeps what it has and reads on after its cursor.
    HistoryDiverged = 34,
    /// A file upload would take its user past the storage quota; the message says how much is
    /// in use. Wait until members have fetched earlier files.
    QuotaExceeded = 35,
    /// A file upload was refused: an invalid chunk list, an upload id in use for another file,
    /// or too many uploads open at once; the message says which.
    UploadRefused = 36,
    /// The upload named is not open here (it completed or expired): open it again.
    NoSuchUpload = 37,
    /// A chunk's bytes were refused: not awaited by the upload, or not the declared length.
    ChunkRefused = 38,
    /// This device sent more messages than the gateway's per-device rate allows; the error's
    /// `retry_after_ms` says when the refused message will be taken. Nothing was stored:
    /// send it again then (nodes do so by themselves).
    SendsLimited = 39,
    /// This user created more conversations (DMs, rooms) than the gateway's per-user rate
    /// allows; `retry_after_ms` says when the next creation will be taken.
    ConversationsLimited = 40,
    /// This user sent more contact requests than the gateway's per-user rate allows;
    /// `retry_after_ms` says when the next will be taken.
    ContactsLimited = 41,
    /// A watchlist longer than the gateway allows; the message says the cap. Watch fewer.
    WatchlistTooLong = 42,
    /// This device changed its watchlist more often than the gateway's rate allows;
    /// `retry_after_ms` says when the next will be taken.
    PresenceLimited = 43,
    /// This user's contact list (contacts, requests and blocks) is full; the message says the
    /// cap. Remove someone first.
    ContactListFull = 44,
    /// This user invited more users into conversations than the gateway's per-user rate
    /// allows; `retry_after_ms` says when the refused commit will be taken (nodes send it
    /// again by themselves).
    InvitationsLimited = 45,
    /// A commit invites more users at once than the gateway's invitation burst; the message
    /// says the cap. Not retried: invite the others in later commits.
    InvitationTooLarge = 46,
    /// Too many devices registered from this network address (IPv4 address or IPv6 /64) for
    /// the gateway's rate; `retry_after_ms` says when the next registration will be taken.
    RegistrationsLimited = 47,
    /// The user creating a conversation, or one a commit adds, is in as many conversations as
    /// the gateway allows one user; the message says the cap. Not retried: leave one first.
    ConversationQuota = 48,
    /// The conversation's authority is moving to another domain's gateway (an operator's
    /// handover): nothing was stored. `retry_after_ms` says when to send it again (nodes do so
    /// by themselves); the message goes to the new authority then, in its place.
    AuthorityMoving = 49,
    /// The conversation's authority is another domain's gateway, and it takes no more of
    /// what this device's gateway relays for now (its limit per peer gateway): nothing was
    /// stored. `retry_after_ms` says when to send it again (nodes do so by themselves).
    PeerLimited = 50,
    /// A request names users of a domain this gateway does not federate with (its operator
    /// lists the peers it does in its configuration). Not retried.
    UnknownDomain = 51,
    /// The gateway of the domain a request names is not reachable now (its link is down):
    /// nothing was asked of it. `retry_after_ms` says when to ask again (nodes do so by
    /// themselves).
    PeerUnreachable = 52,
}

impl ErrorCode {
    /// Its name as the protocol documents and metrics label it: `sends_limited`.
    pub fn name(self) -> String {
        let mut out = String::new();
        for (i, c) in format!("{self:?}").chars().enumerate() {
            if c.is_ascii_uppercase() {
                if i > 0 {
                    out.push('_');
                }
                out.push(c.to_ascii_lowercase());
            } else {
                out.push(c);
            }
        }
        out
    }

    /// The code for a wire value; unknown values map to `Unknown`.
    pub fn from_u16(value: u16) -> ErrorCode {
        use ErrorCode::*;
        [
            MalformedFrame,
            NotAuthenticated,
            NotMember,
            UnknownConversation,
            HeartbeatTimeout,
            SessionReplaced,
            ShuttingDown,
            UnexpectedOpcode,
            ReplayWindowExceeded,
            AuthenticationFailed,
            DeviceNotAdmitted,
            ResumeTokenExpired,
            ResumeTokenInvalid,
            RateLimited,
            KeyPackageRejected,
            UserMismatch,
            StaleEpoch,
            Forbidden,
            InvalidGroupMessage,
            CertificateRequired,
            CertificateInvalid,
            CertificateExpired,
            CertificateNotYetValid,
            ForeignDomain,
            DeviceRevoked,
            EnrolmentTokenInvalid,
            EnrolmentTokenUsed,
            EnrolmentTokenExpired,
            PairingRefused,
            SenderOutOfOrder,
            UnknownUser,
            DeviceStateCopied,
            HistoryLost,
            HistoryDiverged,
            QuotaExceeded,
            UploadRefused,
            NoSuchUpload,
            ChunkRefused,
            SendsLimited,
            ConversationsLimited,
            ContactsLimited,
            WatchlistTooLong,
            PresenceLimited,
            ContactListFull,
            InvitationsLimited,
            InvitationTooLarge,
            RegistrationsLimited,
            ConversationQuota,
            AuthorityMoving,
            PeerLimited,
            UnknownDomain,
            PeerUnreachable,
        ]
        .into_iter()
        .find(|c| *c as u16 == value)
        .unwrap_or(Unknown)
    }
}

/// Either way: the sender ends the session.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct Goodbye {
    /// An [`ErrorCode`] value.
    #[n(0)]
    pub code: u16,
    /// For people and logs; never holds message content.
    #[n(1)]
    pub message: String,
    /// Sent by a gateway going away on purpose (`shutting_down`): wait at least this long, plus
    /// a random share of it, before reconnecting (milliseconds), so that its devices come back
    /// spread out rather than all at once. Absent from older peers and other goodbyes.
    #[n(2)]
    pub retry_after_ms: Option<u32>,
}

/// Either way: a request failed; the session stays open.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct ErrorReport {
    /// An [`ErrorCode`] value.
    #[n(0)]
    pub code: u16,
    /// For people and logs; never holds message content.
    #[n(1)]
    pub message: String,
    /// The message the error refers to, if any.
    #[n(2)]
    #[cbor(with = "minicbor::bytes")]
    pub msg_id: Option<[u8; 16]>,
    /// With `sender_out_of_order`: the id of the last message from the device the gateway
    /// sequenced in the conversation (all zeros: none), which the next must come after.
    #[n(3)]
    #[cbor(with = "minicbor::bytes")]
    pub after: Option<[u8; 16]>,
    /// With a rate-limit refusal (`sends_limited`, `conversations_limited`, `rate_limited`):
    /// milliseconds until the gateway will take the request; send it again no earlier.
    /// Absent from other errors and from older gateways.
    #[n(4)]
    pub retry_after_ms: Option<u32>,
    /// With `sender_out_of_order`: true if the gateway did not refuse the message but keeps it,
    /// and sequences it as soon as the messages before it arrive (see
    /// `gateway::held_sends`): send again only those waiting before it. Absent (false) from
    /// refusals and from older gateways, and then everything waiting goes again.
    #[n(5)]
    pub held: Option<bool>,
}

/// Node → gateway: a message for the conversation named in the header.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct Send {
    /// Sender-chosen random id; the gateway deduplicates on it.
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub msg_id: [u8; 16],
    /// Opaque content: an MLS message in a group conversation.
    #[n(1)]
    #[cbor(with = "minicbor::bytes")]
    pub body: Vec<u8>,
    /// With a commit that adds devices: the MLS Welcome the gateway puts in each added device's
    /// inbox.
    #[n(2)]
    pub welcome: Option<minicbor::bytes::ByteVec>,
    /// For an application message: the id of the device's application message that this one
    /// comes after (all zeros: the first). The gateway sequences it only right after that one,
    /// so a device's messages are sequenced in the order it sent them (see
    /// `gateway::sender_order`). `None` for group operations (commits), which the MLS commit
    /// authority orders instead.
    #[n(3)]
    #[cbor(with = "minicbor::bytes")]
    pub after: Option<[u8; 16]>,
}

/// Gateway → node: the message with this id is durably sequenced at the header's seq.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct SendAck {
    /// The acknowledged message.
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub msg_id: [u8; 16],
}

/// Gateway → node: one sequenced message (conversation, sender and seq in the header).
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct Deliver {
    /// The sender's message id.
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub msg_id: [u8; 16],
    /// Opaque content.
    #[n(1)]
    #[cbor(with = "minicbor::bytes")]
    pub body: Vec<u8>,
}

/// Node → gateway: everything up to the header's seq is processed (the mailbox cursor).
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cbor(map)]
pub struct Ack {}

/// Node → gateway: resend the header's conversation from `from_seq` on (a gap was seen).
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct ReplayRequest {
    /// First seq wanted.
    #[n(0)]
    pub from_seq: u64,
}

/// Node → gateway: add KeyPackages to this device's pool (all or nothing).
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq, Default)]
#[cbor(map)]
pub struct KeyPackageUpload {
    /// One-time packages (TLS-encoded MLS KeyPackages).
    #[n(0)]
    pub packages: Vec<minicbor::bytes::ByteVec>,
    /// A new last-resort package replacing the device's previous one, if any.
    #[n(1)]
    pub last_resort: Option<minicbor::bytes::ByteVec>,
}

/// Node → gateway: one KeyPackage for each device of each user (the requesting device excluded).
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq, Default)]
#[cbor(map)]
pub struct KeyPackageFetch {
    /// The users whose devices to fetch.
    #[n(0)]
    pub users: Vec<minicbor::bytes::ByteArray<16>>,
    /// The users' domain, if not the gateway's own: the gateway asks that domain's gateway
    /// and answers `unknown_domain` if it does not federate with it, `peer_unreachable` if its link is down. Absent from
    /// older nodes: the gateway's own domain.
    #[n(1)]
    pub domain: Option<String>,
}

/// One device's KeyPackage in an answer.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct FetchedKeyPackage {
    /// The owner.
    #[n(0)]
    pub user: minicbor::bytes::ByteArray<16>,
    /// The device.
    #[n(1)]
    pub device: minicbor::bytes::ByteArray<16>,
    /// The TLS-encoded KeyPackage.
    #[n(2)]
    pub package: minicbor::bytes::ByteVec,
    /// True if the device's pool was empty and this is its (reusable) last-resort package.
    #[n(3)]
    pub last_resort: bool,
}

/// Gateway → node: the answer to a [`KeyPackageFetch`].
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq, Default)]
#[cbor(map)]
pub struct KeyPackages {
    /// One package per device that had one.
    #[n(0)]
    pub found: Vec<FetchedKeyPackage>,
    /// Devices with no package at all: the conversation starts without them.
    #[n(1)]
    pub exhausted: Vec<minicbor::bytes::ByteArray<16>>,
}

/// Gateway → node: how many of this device's KeyPackages remain (after an upload, when a
/// session opens, and when fetches take the pool below the replenish threshold).
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cbor(map)]
pub struct KeyPackageCount {
    /// One-time packages left.
    #[n(0)]
    pub remaining: u32,
    /// True if the device has a last-resort package.
    #[n(1)]
    pub last_resort: bool,
    /// Upload more when `remaining` is below this.
    #[n(2)]
    pub replenish_below: u32,
}

/// Gateway → node: this device was added to the conversation named in the header. It joins
/// from `welcome` and reads the conversation from `seq + 1` on. Repeated until the device
/// acknowledges `seq` in that conversation.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct Welcome {
    /// The seq of the commit that added the device.
    #[n(0)]
    pub seq: u64,
    /// What kind of conversation (`groups::GroupKind` as a number).
    #[n(1)]
    pub kind: u8,
    /// The TLS-encoded MLS Welcome message.
    #[n(2)]
    pub welcome: minicbor::bytes::ByteVec,
    /// Every member device and its user, as the gateway knows them (MLS credentials name devices
    /// only).
    #[n(3)]
    pub members: Vec<RosterEntry>,
}

/// A member device of a group and its user.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct RosterEntry {
    /// The device.
    #[n(0)]
    pub device: minicbor::bytes::ByteArray<16>,
    /// Its user.
    #[n(1)]
    pub user: minicbor::bytes::ByteArray<16>,
}

/// Gateway → node: the commit at `seq` removed this device from the conversation named in the
/// header. Repeated until the device acknowledges `seq` in that conversation.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct Removed {
    /// The seq of the removing commit.
    #[n(0)]
    pub seq: u64,
}

/// Node → gateway: please remove this device from the conversation named in the header.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cbor(map)]
pub struct Leave {}

/// Longest federation handshake message (two domain names, a certificate, keys, a signature).
pub const FEDERATION_HANDSHAKE_BYTES_MAX: usize = 1_024;

/// Gateway → gateway: one step of the link's mutual authentication
/// (`crate::federation::handshake`), whose bytes sign and verify on their own.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct FederationHello {
    /// The handshake message.
    #[n(0)]
    pub message: minicbor::bytes::ByteVec,
}

/// Gateway → gateway: one entry of the sender's durable outbox for this peer, numbered by the
/// header's seq (1, 2, … per direction of a link, never reused).
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct FederationForward {
    /// What the entry carries (opaque to the link).
    #[n(0)]
    pub body: minicbor::bytes::ByteVec,
}

/// Gateway → gateway: every entry up to the header's seq is durable at the receiver.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cbor(map)]
pub struct FederationAck {
    /// Set when an entry of this number arrived past the receiver's cursor (one before it
    /// was lost): the sender goes back to the entry after the cursor now instead of waiting
    /// for its resend timer. Absent from heartbeats and ordinary acknowledgements.
    #[n(0)]
    pub gap: Option<u64>,
    /// In heartbeats and the first acknowledgement of a link: the version of the receiver's
    /// CRL this gateway holds, so that a receiver whose newer CRL did not arrive (or was lost
    /// with the peer's data) sends it again.
    #[n(1)]
    pub crl: Option<u64>,
}

/// A decoded payload: one variant per opcode whose payload is defined.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Payload {
    Hello(Hello),
    Challenge(Challenge),
    Proof(Proof),
    HelloOk(HelloOk),
    Heartbeat(Heartbeat),
    HeartbeatAck(Heartbeat),
    Goodbye(Goodbye),
    Error(ErrorReport),
    Send(Send),
    SendAck(SendAck),
    Deliver(Deliver),
    Ack(Ack),
    ReplayRequest(ReplayRequest),
    KeyPackageUpload(KeyPackageUpload),
    KeyPackageFetch(KeyPackageFetch),
    KeyPackages(KeyPackages),
    KeyPackageCount(KeyPackageCount),
    Welcome(Welcome),
    Removed(Removed),
    Leave(Leave),
    Register(Register),
    Certificate(Certificate),
    CrlFetch(CrlFetch),
    Crl(Crl),
    TrustRootFetch(TrustRootFetch),
    TrustRoot(TrustRoot),
    PairVouch(PairVouch),
    PairVouched(PairVouched),
    DeviceLinked(DeviceLinked),
    RenewCertificate(RenewCertificate),
    PeerRoots(PeerRootsUpdate),
    UploadOpen(UploadOpen),
    UploadStatus(UploadStatus),
    Chunk(ChunkHead),
    ChunkAck(ChunkAck),
    ChunkRequest(ChunkRequest),
    ChunksUnavailable(ChunksUnavailable),
    FileFetched(FileFetched),
    PresenceUpdate(PresenceUpdate),
    PresenceSubscribe(PresenceSubscribe),
    PresenceNotify(PresenceNotify),
    ContactChange(ContactChange),
    ContactsFetch(ContactsFetch),
    Contacts(Contacts),
    FederationHello(FederationHello),
    FederationForward(FederationForward),
    FederationAck(FederationAck),
}

/// Decodes exactly one CBOR item that fills `bytes`: anything after it is refused, so one
/// frame cannot carry data a decoder would silently ignore.
fn decode_as<'b, T: Decode<'b, ()>>(opcode: Opcode, bytes: &'b [u8]) -> Result<T, WireError> {
    let malformed = |reason: String| WireError::MalformedPayload { opcode, reason };
    let mut decoder = minicbor::Decoder::new(bytes);
    let value = decoder.decode().map_err(|e| malformed(e.to_string()))?;
    let extra = bytes.len() - decoder.position();
    if extra > 0 {
        return Err(malformed(format!("{extra} bytes after the CBOR item")));
    }
    Ok(value)
}

fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), WireError> {
    if len > max {
        return Err(WireError::ListTooLong { field, len, max });
    }
    Ok(())
}

fn check_bytes(field: &'static str, len: usize, max: usize) -> Result<(), WireError> {
    if len > max {
        return Err(WireError::BytesTooLong { field, len, max });
    }
    Ok(())
}

impl Payload {
    /// The opcode this payload travels under.
    pub fn opcode(&self) -> Opcode {
        match self {
            Payload::Hello(_) => Opcode::Hello,
            Payload::Challenge(_) => Opcode::Challenge,
            Payload::Proof(_) => Opcode::Proof,
            Payload::HelloOk(_) => Opcode::HelloOk,
            Payload::Heartbeat(_) => Opcode::Heartbeat,
            Payload::HeartbeatAck(_) => Opcode::HeartbeatAck,
            Payload::Goodbye(_) => Opcode::Goodbye,
            Payload::Error(_) => Opcode::Error,
            Payload::Send(_) => Opcode::Send,
            Payload::SendAck(_) => Opcode::SendAck,
            Payload::Deliver(_) => Opcode::Deliver,
            Payload::Ack(_) => Opcode::Ack,
            Payload::ReplayRequest(_) => Opcode::ReplayRequest,
            Payload::KeyPackageUpload(_) => Opcode::KeyPackageUpload,
            Payload::KeyPackageFetch(_) => Opcode::KeyPackageFetch,
            Payload::KeyPackages(_) => Opcode::KeyPackages,
            Payload::KeyPackageCount(_) => Opcode::KeyPackageCount,
            Payload::Welcome(_) => Opcode::Welcome,
            Payload::Removed(_) => Opcode::Removed,
            Payload::Leave(_) => Opcode::Leave,
            Payload::Register(_) => Opcode::Register,
            Payload::Certificate(_) => Opcode::Certificate,
            Payload::CrlFetch(_) => Opcode::CrlFetch,
            Payload::Crl(_) => Opcode::Crl,
            Payload::TrustRootFetch(_) => Opcode::TrustRootFetch,
            Payload::TrustRoot(_) => Opcode::TrustRoot,
            Payload::PairVouch(_) => Opcode::PairVouch,
            Payload::PairVouched(_) => Opcode::PairVouched,
            Payload::DeviceLinked(_) => Opcode::DeviceLinked,
            Payload::RenewCertificate(_) => Opcode::RenewCertificate,
            Payload::PeerRoots(_) => Opcode::PeerRoots,
            Payload::UploadOpen(_) => Opcode::UploadOpen,
            Payload::UploadStatus(_) => Opcode::UploadStatus,
            Payload::Chunk(_) => Opcode::Chunk,
            Payload::ChunkAck(_) => Opcode::ChunkAck,
            Payload::ChunkRequest(_) => Opcode::ChunkRequest,
            Payload::ChunksUnavailable(_) => Opcode::ChunksUnavailable,
            Payload::FileFetched(_) => Opcode::FileFetched,
            Payload::FederationHello(_) => Opcode::FederationHello,
            Payload::FederationForward(_) => Opcode::FederationForward,
            Payload::FederationAck(_) => Opcode::FederationAck,
            Payload::PresenceUpdate(_) => Opcode::PresenceUpdate,
            Payload::PresenceSubscribe(_) => Opcode::PresenceSubscribe,
            Payload::PresenceNotify(_) => Opcode::PresenceNotify,
            Payload::ContactChange(_) => Opcode::ContactChange,
            Payload::ContactsFetch(_) => Opcode::ContactsFetch,
            Payload::Contacts(_) => Opcode::Contacts,
        }
    }

    /// Appends the CBOR encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let result = match self {
            Payload::Hello(p) => minicbor::encode(p, &mut *out),
            Payload::Challenge(p) => minicbor::encode(p, &mut *out),
            Payload::Proof(p) => minicbor::encode(p, &mut *out),
            Payload::HelloOk(p) => minicbor::encode(p, &mut *out),
            Payload::Heartbeat(p) | Payload::HeartbeatAck(p) => minicbor::encode(p, &mut *out),
            Payload::Goodbye(p) => minicbor::encode(p, &mut *out),
            Payload::Error(p) => minicbor::encode(p, &mut *out),
            Payload::Send(p) => minicbor::encode(p, &mut *out),
            Payload::SendAck(p) => minicbor::encode(p, &mut *out),
            Payload::Deliver(p) => minicbor::encode(p, &mut *out),
            Payload::Ack(p) => minicbor::encode(p, &mut *out),
            Payload::ReplayRequest(p) => minicbor::encode(p, &mut *out),
            Payload::KeyPackageUpload(p) => minicbor::encode(p, &mut *out),
            Payload::KeyPackageFetch(p) => minicbor::encode(p, &mut *out),
            Payload::KeyPackages(p) => minicbor::encode(p, &mut *out),
            Payload::KeyPackageCount(p) => minicbor::encode(p, &mut *out),
            Payload::Welcome(p) => minicbor::encode(p, &mut *out),
            Payload::Removed(p) => minicbor::encode(p, &mut *out),
            Payload::Leave(p) => minicbor::encode(p, &mut *out),
            Payload::Register(p) => minicbor::encode(p, &mut *out),
            Payload::Certificate(p) => minicbor::encode(p, &mut *out),
            Payload::CrlFetch(p) => minicbor::encode(p, &mut *out),
            Payload::Crl(p) => minicbor::encode(p, &mut *out),
            Payload::TrustRootFetch(p) => minicbor::encode(p, &mut *out),
            Payload::TrustRoot(p) => minicbor::encode(p, &mut *out),
            Payload::PairVouch(p) => minicbor::encode(p, &mut *out),
            Payload::PairVouched(p) => minicbor::encode(p, &mut *out),
            Payload::DeviceLinked(p) => minicbor::encode(p, &mut *out),
            Payload::RenewCertificate(p) => minicbor::encode(p, &mut *out),
            Payload::PeerRoots(p) => minicbor::encode(p, &mut *out),
            Payload::UploadOpen(p) => minicbor::encode(p, &mut *out),
            Payload::UploadStatus(p) => minicbor::encode(p, &mut *out),
            Payload::Chunk(p) => minicbor::encode(p, &mut *out),
            Payload::ChunkAck(p) => minicbor::encode(p, &mut *out),
            Payload::ChunkRequest(p) => minicbor::encode(p, &mut *out),
            Payload::ChunksUnavailable(p) => minicbor::encode(p, &mut *out),
            Payload::FileFetched(p) => minicbor::encode(p, &mut *out),
            Payload::FederationHello(p) => minicbor::encode(p, &mut *out),
            Payload::FederationForward(p) => minicbor::encode(p, &mut *out),
            Payload::FederationAck(p) => minicbor::encode(p, &mut *out),
            Payload::PresenceUpdate(p) => minicbor::encode(p, &mut *out),
            Payload::PresenceSubscribe(p) => minicbor::encode(p, &mut *out),
            Payload::PresenceNotify(p) => minicbor::encode(p, &mut *out),
            Payload::ContactChange(p) => minicbor::encode(p, &mut *out),
            Payload::ContactsFetch(p) => minicbor::encode(p, &mut *out),
            Payload::Contacts(p) => minicbor::encode(p, &mut *out),
        };
        result.expect("encoding into a Vec cannot fail");
    }

    /// Decodes the payload of a frame with `opcode`, checking list and text limits.
    pub fn decode(opcode: Opcode, bytes: &[u8]) -> Result<Payload, WireError> {
        let payload = match opcode {
            Opcode::Hello => {
                let p: Hello = decode_as(opcode, bytes)?;
                check_len("hello.cursors", p.cursors.len(), CURSORS_LEN_MAX)?;
                let certificate = p.certificate.as_ref().map_or(0, |c| c.len());
                check_bytes("hello.certificate", certificate, CERTIFICATE_BYTES_MAX)?;
                Payload::Hello(p)
            }
            Opcode::Challenge => Payload::Challenge(decode_as(opcode, bytes)?),
            Opcode::Proof => Payload::Proof(decode_as(opcode, bytes)?),
            Opcode::HelloOk => Payload::HelloOk(decode_as(opcode, bytes)?),
            Opcode::Heartbeat => Payload::Heartbeat(decode_as(opcode, bytes)?),
            Opcode::HeartbeatAck => Payload::HeartbeatAck(decode_as(opcode, bytes)?),
            Opcode::Goodbye => {
                let p: Goodbye = decode_as(opcode, bytes)?;
                check_bytes("goodbye.message", p.message.len(), MESSAGE_BYTES_MAX)?;
                Payload::Goodbye(p)
            }
            Opcode::Error => {
                let p: ErrorReport = decode_as(opcode, bytes)?;
                check_bytes("error.message", p.message.len(), MESSAGE_BYTES_MAX)?;
                Payload::Error(p)
            }
            Opcode::Send => Payload::Send(decode_as(opcode, bytes)?),
            Opcode::SendAck => Payload::SendAck(decode_as(opcode, bytes)?),
            Opcode::Deliver => Payload::Deliver(decode_as(opcode, bytes)?),
            Opcode::Ack => Payload::Ack(decode_as(opcode, bytes)?),
            Opcode::ReplayRequest => Payload::ReplayRequest(decode_as(opcode, bytes)?),
            Opcode::KeyPackageUpload => {
                let p: KeyPackageUpload = decode_as(opcode, bytes)?;
                check_len("upload.packages", p.packages.len(), KEY_PACKAGES_LEN_MAX)?;
                Payload::KeyPackageUpload(p)
            }
            Opcode::KeyPackageFetch => {
                let p: KeyPackageFetch = decode_as(opcode, bytes)?;
                check_len("fetch.users", p.users.len(), FETCH_USERS_MAX)?;
                if let Some(domain) = &p.domain {
                    check_bytes("fetch.domain", domain.len(), crate::trust::DOMAIN_BYTES_MAX)?;
                }
                Payload::KeyPackageFetch(p)
            }
            Opcode::KeyPackages => {
                let p: KeyPackages = decode_as(opcode, bytes)?;
                check_len("key_packages.found", p.found.len(), KEY_PACKAGES_LEN_MAX)?;
                check_len(
                    "key_packages.exhausted",
                    p.exhausted.len(),
                    KEY_PACKAGES_LEN_MAX,
                )?;
                Payload::KeyPackages(p)
            }
            Opcode::KeyPackageCount => Payload::KeyPackageCount(decode_as(opcode, bytes)?),
            Opcode::Welcome => {
                let p: Welcome = decode_as(opcode, bytes)?;
                check_len("welcome.members", p.members.len(), ROSTER_LEN_MAX)?;
                Payload::Welcome(p)
            }
            Opcode::Removed => Payload::Removed(decode_as(opcode, bytes)?),
            Opcode::Leave => Payload::Leave(decode_as(opcode, bytes)?),
            Opcode::Register => Payload::Register(decode_as(opcode, bytes)?),
            Opcode::Certificate => {
                let p: Certificate = decode_as(opcode, bytes)?;
                check_bytes("certificate", p.certificate.len(), CERTIFICATE_BYTES_MAX)?;
                let voucher = p.voucher.as_ref().map_or(0, |c| c.len());
                check_bytes("certificate.voucher", voucher, CERTIFICATE_BYTES_MAX)?;
                Payload::Certificate(p)
            }
            Opcode::CrlFetch => Payload::CrlFetch(decode_as(opcode, bytes)?),
            Opcode::Crl => Payload::Crl(decode_as(opcode, bytes)?),
            Opcode::TrustRootFetch => Payload::TrustRootFetch(decode_as(opcode, bytes)?),
            Opcode::TrustRoot => {
                let p: TrustRoot = decode_as(opcode, bytes)?;
                check_bytes("trust_root.domain", p.domain.len(), DOMAIN_BYTES_MAX)?;
                Payload::TrustRoot(p)
            }
            Opcode::PairVouch => Payload::PairVouch(decode_as(opcode, bytes)?),
            Opcode::PairVouched => Payload::PairVouched(decode_as(opcode, bytes)?),
            Opcode::DeviceLinked => {
                let p: DeviceLinked = decode_as(opcode, bytes)?;
                check_bytes(
                    "device_linked.certificate",
                    p.certificate.len(),
                    CERTIFICATE_BYTES_MAX,
                )?;
                Payload::DeviceLinked(p)
            }
            Opcode::RenewCertificate => Payload::RenewCertificate(decode_as(opcode, bytes)?),
            Opcode::PeerRoots => {
                let p: PeerRootsUpdate = decode_as(opcode, bytes)?;
                check_bytes(
                    "peer_roots.roots",
                    p.roots.len(),
                    crate::trust::peer_roots::PEER_ROOTS_BYTES_MAX,
                )?;
                Payload::PeerRoots(p)
            }
            Opcode::UploadOpen => {
                let p: UploadOpen = decode_as(opcode, bytes)?;
                check_len("upload_open.chunks", p.chunks.len(), UPLOAD_CHUNKS_MAX)?;
                Payload::UploadOpen(p)
            }
            Opcode::UploadStatus => {
                let p: UploadStatus = decode_as(opcode, bytes)?;
                check_len("upload_status.missing", p.missing.len(), UPLOAD_CHUNKS_MAX)?;
                Payload::UploadStatus(p)
            }
            Opcode::Chunk => Payload::Chunk(decode_as(opcode, bytes)?),
            Opcode::ChunkAck => Payload::ChunkAck(decode_as(opcode, bytes)?),
            Opcode::ChunkRequest => {
                let p: ChunkRequest = decode_as(opcode, bytes)?;
                check_len("chunk_request.ids", p.ids.len(), CHUNK_REQUEST_IDS_MAX)?;
                Payload::ChunkRequest(p)
            }
            Opcode::ChunksUnavailable => {
                let p: ChunksUnavailable = decode_as(opcode, bytes)?;
                check_len("chunks_unavailable.ids", p.ids.len(), CHUNK_REQUEST_IDS_MAX)?;
                Payload::ChunksUnavailable(p)
            }
            Opcode::FileFetched => Payload::FileFetched(decode_as(opcode, bytes)?),
            Opcode::FederationHello => {
                let p: FederationHello = decode_as(opcode, bytes)?;
                check_bytes(
                    "federation_hello.message",
                    p.message.len(),
                    FEDERATION_HANDSHAKE_BYTES_MAX,
                )?;
                Payload::FederationHello(p)
            }
            Opcode::FederationForward => Payload::FederationForward(decode_as(opcode, bytes)?),
            Opcode::FederationAck => Payload::FederationAck(decode_as(opcode, bytes)?),
            Opcode::PresenceUpdate => Payload::PresenceUpdate(decode_as(opcode, bytes)?),
            Opcode::PresenceSubscribe => {
                let p: PresenceSubscribe = decode_as(opcode, bytes)?;
                check_len("presence_subscribe.users", p.users.len(), WATCHLIST_LEN_MAX)?;
                Payload::PresenceSubscribe(p)
            }
            Opcode::PresenceNotify => {
                let p: PresenceNotify = decode_as(opcode, bytes)?;
                check_len("presence_notify.entries", p.entries.len(), CONTACTS_LEN_MAX)?;
                Payload::PresenceNotify(p)
            }
            Opcode::ContactChange => Payload::ContactChange(decode_as(opcode, bytes)?),
            Opcode::ContactsFetch => Payload::ContactsFetch(decode_as(opcode, bytes)?),
            Opcode::Contacts => {
                let p: Contacts = decode_as(opcode, bytes)?;
                for (field, list) in [
                    ("contacts.contacts", &p.contacts),
                    ("contacts.incoming", &p.incoming),
                    ("contacts.outgoing", &p.outgoing),
                    ("contacts.blocked", &p.blocked),
                ] {
                    check_len(field, list.len(), CONTACTS_LEN_MAX)?;
                }
                Payload::Contacts(p)
            }
            reserved => return Err(WireError::PayloadNotDefined(reserved)),
        };
        debug_assert_eq!(payload.opcode(), opcode);
        Ok(payload)
    }
}

impl Send {
    /// The message id as a typed id.
    pub fn msg_id(&self) -> MsgId {
        MsgId::from_bytes(self.msg_id)
    }
}
