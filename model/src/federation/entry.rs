//! What travels in the entries of a federation link (see [`super::link`]) for conversations
//! that span domains: one authority (the conversation's home gateway) sequences, every other
//! gateway with members keeps a replica of the log and serves its own devices from it.
//!
//! - [`Entry::Open`]: the authority tells a member gateway that the conversation exists and
//!   which of that gateway's devices are in it;
//! - [`Entry::Relay`]: a member gateway hands the authority a message one of its devices sent;
//! - [`Entry::Sequenced`]: the authority gives a member gateway the message it sequenced at a
//!   seq (every one, in order: the link delivers entries once and in order, so the replica's
//!   log is the authority's); it travels only in a signed [`Entry::Bundle`];
//! - [`Entry::Answer`]: the authority's answer to a relayed message (its seq, or a refusal),
//!   which the member gateway passes to the device.
//!
//! Authority handover (issue 15, step 5; see `gateway::handover`):
//!
//! - [`Entry::Handover`]: the old authority, its log frozen at `last_seq`, gives the new one
//!   the conversation's members, signed;
//! - [`Entry::Moved`]: the new authority tells every member gateway (the old one too) with the
//!   certificate both signed;
//! - [`Entry::Following`]: a member gateway tells the new authority where its replica ends, so
//!   that the new authority sends it everything after, then every message it sequences;
//! - [`Entry::Declined`]: the gateway asked to take a conversation over cannot; the old
//!   authority takes it back.
//!
//! Trust across domains (issue 15, step 4; see `gateway::peer_crls`):
//!
//! - [`Entry::Revocations`]: a gateway's current CRL, signed by its domain's trust root, with
//!   that root's key (which the receiver checks against the fingerprint it pins). The only
//!   entry about no conversation.
//!
//! KeyPackages across domains (issue 15, step 3; see `gateway::foreign_fetch`):
//!
//! - [`Entry::KeyPackageRequest`]: a gateway asks a peer, for one of its devices, for one
//!   KeyPackage of each device of some of the peer's users (the DM or room that device is
//!   making adds them);
//! - [`Entry::KeyPackages`]: the peer's answer, by the request's id: the packages it took
//!   from its directory, or that its limit for the asking gateway refused the request.
//!
//! MLS conversations across domains (issue 15, step 3):
//!
//! - [`Entry::Welcome`]: the authority tells a member gateway that a commit it sequenced at
//!   `seq` added these devices of that gateway's domain, with the MLS Welcome for them; the
//!   member gateway keeps a replica of the conversation from then on and puts the Welcome in
//!   each device's inbox.
//!
//! - [`Entry::Removed`]: the authority tells a member gateway that a commit it sequenced at
//!   `seq` removed these devices of that gateway's domain.
//! - [`Entry::Leave`]: a member gateway's device asks to leave; the authority proposes its
//!   removal.
//! - A relayed commit ([`Entry::Relay`] with `welcome` or `vouched`) carries the Welcome for
//!   the devices it adds and, for those of the relaying gateway's domain, their users.
//! - [`Entry::DmClaim`]: a gateway asks the other user's gateway whether one of its devices
//!   may make the DM between them, homed at the asker (a DM's id follows from its two users,
//!   so both sides could make it at once; see `gateway::dm_claims`);
//! - [`Entry::DmClaimAnswer`]: the answer: granted, made (or being made) at the answerer, or
//!   refused.
//! - [`Entry::Contact`]: a user of the sender's domain added, or stopped adding, a user of
//!   the receiver's as a contact (`gateway::social`, "Across domains").
//! - [`Entry::Block`]: a user of the sender's domain blocked, or unblocked, a user of the
//!   receiver's (whose gateway then refuses invitations from the blocked user to them).
//!
//! Presence across domains (see `gateway::presence_abroad`):
//!
//! - [`Entry::PresenceWatch`]: a session at the sender's gateway watches (or no longer
//!   watches) a user of the receiver's, for a user of the sender's domain;
//! - [`Entry::PresenceReset`]: the sender forgets every watch it made before (sent when a
//!   link comes up, before the watches it holds now);
//! - [`Entry::PresenceState`]: the watched user's state as the receiver may tell that
//!   watcher, at each watch and each change.
//!
//! Batching:
//!
//! - [`Entry::Bundle`]: the entries a gateway produced for one peer in one batch (one commit),
//!   carried as one link entry (one outbox row, one cursor step, one acknowledgement), with
//!   one signature of the sender's link key over every [`Entry::Sequenced`] in it (see
//!   [`bundle_statement`]): a message's proof of who ordered it is that signature and its
//!   siblings' statements.
//!
//! The encoding is hand-written and bounded: a version byte, a kind byte, fixed-size fields, and
//! lengths checked against what is left; trailing bytes are refused.

use bytes::Bytes;

use crate::codec::Reader;
use crate::identity::DevicePublicKey;
use crate::ids::{ConversationId, DeviceId, MsgId, UserId};
use crate::wire::payload::{ErrorCode, Seen};

/// The first byte of every entry of this format (a text or anything else is not an entry).
pub const ENTRY_VERSION: u8 = 0xE1;
/// The most devices an [`Entry::Open`] names.
pub const OPEN_MEMBERS_MAX: usize = 10_000;
/// The longest refusal message an [`Entry::Answer`] carries, in bytes.
pub const ANSWER_MESSAGE_MAX: usize = 1024;

const KIND_OPEN: u8 = 1;
const KIND_RELAY: u8 = 2;
const KIND_SEQUENCED: u8 = 3;
const KIND_ANSWER: u8 = 4;
const KIND_HANDOVER: u8 = 5;
const KIND_MOVED: u8 = 6;
const KIND_FOLLOWING: u8 = 7;
const KIND_DECLINED: u8 = 8;
const KIND_REVOCATIONS: u8 = 9;
const KIND_BUNDLE: u8 = 10;
const KIND_KEY_PACKAGE_REQUEST: u8 = 11;
const KIND_KEY_PACKAGES: u8 = 12;
const KIND_WELCOME: u8 = 13;
/// A relay with a Welcome or vouched devices (one without is [`KIND_RELAY`], as before).
const KIND_RELAY_COMMIT: u8 = 14;
const KIND_REMOVED: u8 = 15;
const KIND_LEAVE: u8 = 16;
const KIND_DM_CLAIM: u8 = 17;
const KIND_DM_CLAIM_ANSWER: u8 = 18;
/// A handover of an MLS conversation: [`KIND_HANDOVER`]'s fields, then its [`MlsHandover`].
const KIND_HANDOVER_MLS: u8 = 19;
const KIND_EXTERNAL_KEY: u8 = 20;
const KIND_CONTACT: u8 = 21;
const KIND_PRESENCE_WATCH: u8 = 22;
const KIND_PRESENCE_RESET: u8 = 23;
const KIND_PRESENCE_STATE: u8 = 24;
const KIND_BLOCK: u8 = 25;

/// The longest group record an MLS handover carries (`gateway::groups::GroupState::encode`:
/// about 100 bytes per member device).
pub const HANDOVER_GROUP_BYTES_MAX: usize = 640 * 1024;
/// The longest MLS proposal an MLS handover carries (one external sender: a few hundred).
pub const HANDOVER_PROPOSAL_BYTES_MAX: usize = 4 * 1024;

/// The most devices a relayed commit vouches for: as many as a commit adds.
pub const RELAY_VOUCHED_MAX: usize = crate::mls::group_ops::ADDED_MAX;

/// The most users one KeyPackage request names: as many as a device's fetch may.
pub use crate::wire::payload::FETCH_USERS_MAX;
/// The most devices' packages one answer carries: past them, devices are left out as if they
/// had none (their user's other devices are enough to start; they join by a later commit).
pub const FETCH_DEVICES_MAX: usize = 48;
/// The largest KeyPackage an answer carries, in bytes (what a directory accepts by default).
pub const FETCHED_PACKAGE_BYTES_MAX: usize = 16 * 1024;

/// The most entries an [`Entry::Bundle`] carries.
pub const BUNDLE_ENTRIES_MAX: usize = 1024;
/// What an [`Entry::Bundle`] adds to its entries' bytes: its header (version, kind, signature
/// flag and signature, count) and a length before each entry.
pub const BUNDLE_HEADER_BYTES: usize = 1 + 1 + 1 + 64 + 2;
/// What each entry in a bundle adds: its length.
pub const BUNDLE_ENTRY_OVERHEAD: usize = 4;

/// The longest CRL an [`Entry::Revocations`] carries, in bytes: a CRL of
/// [`crate::trust::CRL_ENTRIES_MAX`] devices and its header.
pub const REVOCATIONS_CRL_MAX: usize = crate::trust::CRL_ENTRIES_MAX * 16 + 512;

/// The most domains an [`Entry::Handover`] names members of.
pub const HANDOVER_DOMAINS_MAX: usize = 64;
/// The longest domain name an entry carries, in bytes (as DNS allows).
pub const DOMAIN_MAX: usize = 253;

/// One entry of a federation link about a conversation spanning domains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// From the authority: `conversation` is homed there, and these devices of the receiving
    /// gateway are members.
    Open {
        /// The conversation.
        conversation: ConversationId,
        /// The receiving gateway's member devices.
        members: Vec<DeviceId>,
    },
    /// From a member gateway: its device `sender` sent this message.
    Relay {
        /// The conversation.
        conversation: ConversationId,
        /// The device that sent it (a device of the relaying gateway's domain).
        sender: DeviceId,
        /// The sender's message id.
        msg_id: MsgId,
        /// The message it comes after, in its sender's order, if it names one.
        after: Option<MsgId>,
        /// Opaque content.
        body: Bytes,
        /// With an MLS commit that adds devices: their Welcome, which the authority hands to
        /// each added device's gateway once it has sequenced the commit.
        welcome: Option<Bytes>,
        /// With an MLS commit that adds devices of the relaying gateway's domain: their users,
        /// as that gateway (the authority on its own domain's devices) says (at most
        /// [`RELAY_VOUCHED_MAX`]).
        vouched: Vec<(DeviceId, UserId)>,
    },
    /// From the authority: the message it sequenced at `seq`. Taken only from a bundle whose
    /// signature covers its [`sequenced_statement`] (so whoever holds it can show who ordered
    /// it).
    Sequenced {
        /// The conversation.
        conversation: ConversationId,
        /// Its seq.
        seq: u64,
        /// The MLS epoch it was sequenced in (0 in a plain conversation).
        epoch: u64,
        /// The device that sent it.
        sender: DeviceId,
        /// The sender's message id.
        msg_id: MsgId,
        /// True if it named the message it comes after (its sender's order goes on from it).
        chained: bool,
        /// Opaque content.
        body: Bytes,
    },
    /// From the authority: what became of a relayed message.
    Answer {
        /// The conversation.
        conversation: ConversationId,
        /// The device that sent it.
        sender: DeviceId,
        /// The sender's message id.
        msg_id: MsgId,
        /// Sequenced, or refused.
        outcome: Outcome,
    },
    /// From the authority to the gateway it hands the conversation over to: its log is frozen
    /// at `last_seq` (every message up to it went to the receiver before this entry, on the
    /// same link), and these are the members of every domain, its own included. Signed by the
    /// sender's link key over the [`HandoverCertificate::statement`] naming the receiver.
    Handover {
        /// The conversation.
        conversation: ConversationId,
        /// The authority's term the receiver starts (one more than the sender's).
        term: u64,
        /// The last seq the sender sequenced.
        last_seq: u64,
        /// The MLS epoch the conversation is in (0 in a plain conversation).
        epoch: u64,
        /// Each domain's member devices (at most [`HANDOVER_DOMAINS_MAX`] domains and
        /// [`OPEN_MEMBERS_MAX`] devices in all).
        members: Vec<(String, Vec<DeviceId>)>,
        /// The sender's signature over the certificate's statement.
        signature: [u8; 64],
        /// For an MLS conversation: its group state and the proposal moving its external
        /// sender to the receiver.
        mls: Option<MlsHandover>,
    },
    /// From the new authority to each member gateway: the conversation moved.
    Moved {
        /// The conversation.
        conversation: ConversationId,
        /// Signed by both authorities.
        certificate: HandoverCertificate,
    },
    /// From a member gateway to the authority it now follows: its replica ends at `head`.
    Following {
        /// The conversation.
        conversation: ConversationId,
        /// The authority's term it follows.
        term: u64,
        /// The last seq of its replica.
        head: u64,
    },
    /// From the gateway a conversation was handed to: it does not take it over, and why.
    Declined {
        /// The conversation.
        conversation: ConversationId,
        /// The term that was offered.
        term: u64,
        /// In words (at most [`ANSWER_MESSAGE_MAX`] bytes).
        reason: String,
    },
    /// From any peer: its domain's current CRL (on each revocation, and again whenever the
    /// receiver's heartbeat shows an older version), with its trust root's key.
    Revocations {
        /// The sending domain's trust root key (the receiver checks its fingerprint).
        root: DevicePublicKey,
        /// The encoded `trust::Crl`, at most [`REVOCATIONS_CRL_MAX`] bytes.
        crl: Bytes,
    },
    /// From a gateway one of whose devices is adding users of the receiver's domain to a
    /// conversation: one KeyPackage of each of their devices, please.
    KeyPackageRequest {
        /// The asking gateway's id of the request (random), which the answer carries back.
        request: u64,
        /// The user the asking device belongs to: a user who blocked them is not handed out.
        requester: UserId,
        /// Users of the receiver's domain (at most [`FETCH_USERS_MAX`]).
        users: Vec<UserId>,
    },
    /// The answer to a [`Entry::KeyPackageRequest`].
    KeyPackages {
        /// The request's id.
        request: u64,
        /// What the receiver's directory gave.
        answer: FetchAnswer,
    },
    /// From the authority of an MLS conversation: the commit it sequenced at `seq` added
    /// `devices` of the receiving gateway's domain; they join from `welcome`.
    Welcome {
        /// The conversation.
        conversation: ConversationId,
        /// The seq of the commit that added them.
        seq: u64,
        /// The conversation's kind (`mls::group_ops::GroupKind` as a byte).
        kind: u8,
        /// The receiving gateway's devices the commit added (at most [`OPEN_MEMBERS_MAX`]).
        devices: Vec<DeviceId>,
        /// The MLS Welcome.
        welcome: Bytes,
    },
    /// From the authority of an MLS conversation: the commit it sequenced at `seq` (sent
    /// just after, if the receiving gateway keeps other member devices) removed `devices` of
    /// the receiving gateway's domain; each reads up to the seq before, then hears that it
    /// was removed.
    Removed {
        /// The conversation.
        conversation: ConversationId,
        /// The seq of the commit that removed them.
        seq: u64,
        /// The receiving gateway's devices it removed (at most [`OPEN_MEMBERS_MAX`]).
        devices: Vec<DeviceId>,
    },
    /// From a member gateway: its `device` asks to leave the MLS conversation (the authority
    /// proposes its removal as the group's external sender; a member commits it).
    Leave {
        /// The conversation.
        conversation: ConversationId,
        /// The device leaving (a device of the relaying gateway's domain).
        device: DeviceId,
    },
    /// From a peer: may one of its devices make the DM `conversation` between a user of its
    /// domain and one of this gateway's, homed there? Answered by [`Entry::DmClaimAnswer`].
    DmClaim {
        /// The DM (its id follows from its two users).
        conversation: ConversationId,
    },
    /// The answer to an [`Entry::DmClaim`] this gateway sent.
    DmClaimAnswer {
        /// The DM.
        conversation: ConversationId,
        /// What the peer decided.
        answer: DmClaimAnswer,
    },
    /// From any peer, once per data directory: the key it signs MLS proposals with as a
    /// group's external sender, which a gateway handing it an MLS conversation names in the
    /// group.
    ExternalKey {
        /// The Ed25519 public key.
        key: [u8; 32],
    },
    /// From any peer: `from`, a user of its domain, has added `to`, a user of the receiver's,
    /// as a contact (asked, or accepted their request) when `added`, or no longer has
    /// (removed, withdrew, declined or blocked: the receiver cannot tell which). The state
    /// after the change, so a repeat changes nothing.
    Contact {
        /// The user of the sender's domain.
        from: UserId,
        /// The user of the receiver's domain.
        to: UserId,
        /// Whether `from` adds `to` now.
        added: bool,
    },
    /// From any peer: `from`, a user of its domain, has blocked `to`, a user of the
    /// receiver's, when `blocked` (or has unblocked them). Sent after the [`Entry::Contact`]
    /// that withdrew `from`'s add. The receiver keeps it so that its authority refuses a
    /// commit by `to` adding `from` (KeyPackages fetched before the block), as a gateway does
    /// for its own users; it never shows it to `to`'s devices.
    Block {
        /// The user of the sender's domain who blocks.
        from: UserId,
        /// The user of the receiver's domain who is blocked.
        to: UserId,
        /// Whether `from` blocks `to` now.
        blocked: bool,
    },
    /// From any peer: a session there watches `target`, a user of the receiver's domain, for
    /// `watcher`, a user of the sender's (`on`), or no session there watches it for them any
    /// more. Answered with a [`Entry::PresenceState`] at each watch and each change after.
    PresenceWatch {
        /// The user of the sender's domain.
        watcher: UserId,
        /// The user of the receiver's domain.
        target: UserId,
        /// Whether it is watched now.
        on: bool,
    },
    /// From any peer: forget every [`Entry::PresenceWatch`] it sent before this one.
    PresenceReset,
    /// From any peer: what `watcher`, a user of the receiver's domain, may be told of
    /// `target`, a user of the sender's, as the sender decides it (contacts, blocks and
    /// invisibility are its user's to decide).
    PresenceState {
        /// The user of the receiver's domain.
        watcher: UserId,
        /// The user of the sender's domain.
        target: UserId,
        /// The state.
        seen: Seen,
    },
    /// From any peer: several entries, in the order the sender produced them, as one link
    /// entry. Never nested.
    Bundle {
        /// At most [`BUNDLE_ENTRIES_MAX`], none of them a bundle.
        entries: Vec<Entry>,
        /// The sender's link-key signature over the [`bundle_statement`] of the
        /// [`Entry::Sequenced`] among `entries` (`None` if there are none).
        signature: Option<[u8; 64]>,
    },
}

/// What an [`Entry::Handover`] of an MLS conversation adds: the gateway's view of the group,
/// and the old authority's proposal making the new one the group's external sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MlsHandover {
    /// The group as the old authority kept it (`gateway::groups::GroupState::encode`, at
    /// most [`HANDOVER_GROUP_BYTES_MAX`] bytes).
    pub group: Bytes,
    /// The key the proposal names (the receiver checks it is its own).
    pub external_key: [u8; 32],
    /// The MLS proposal, signed by the old authority as the group's external sender in the
    /// handover's epoch (at most [`HANDOVER_PROPOSAL_BYTES_MAX`] bytes): the receiver
    /// sequences it first, and every commit after must take it.
    pub proposal: Bytes,
    /// Each member device's last message in its sender order (the receiver's replica began
    /// where its first device joined, and may not hold it); at most [`OPEN_MEMBERS_MAX`].
    pub senders: Vec<(DeviceId, MsgId)>,
}

/// A gateway's answer to a peer's [`Entry::DmClaim`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmClaimAnswer {
    /// The DM is made (or being made) at the answering gateway: the asker's device joins it
    /// from its Welcome.
    MadeHere,
    /// The asker makes it; the answering gateway never will.
    Granted,
    /// The answering gateway takes no more claims from the asker.
    Refused,
}

impl DmClaimAnswer {
    fn to_u8(self) -> u8 {
        match self {
            DmClaimAnswer::MadeHere => 0,
            DmClaimAnswer::Granted => 1,
            DmClaimAnswer::Refused => 2,
        }
    }

    fn from_u8(byte: u8) -> Option<DmClaimAnswer> {
        Some(match byte {
            0 => DmClaimAnswer::MadeHere,
            1 => DmClaimAnswer::Granted,
            2 => DmClaimAnswer::Refused,
            _ => return None,
        })
    }
}

/// Proof that a conversation's authority moved: both gateways signed, each with its link key,
/// that `from` sequenced up to `last_seq` and `to` sequences from the next seq, in `term`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandoverCertificate {
    /// The new authority's term (one more than the old one's).
    pub term: u64,
    /// The old authority's domain.
    pub from: String,
    /// The new authority's domain.
    pub to: String,
    /// The last seq the old authority sequenced.
    pub last_seq: u64,
    /// The MLS epoch at the handover (0 in a plain conversation).
    pub epoch: u64,
    /// The old authority's signature over [`HandoverCertificate::statement`].
    pub from_signature: [u8; 64],
    /// The new authority's signature over the same statement.
    pub to_signature: [u8; 64],
}

impl HandoverCertificate {
    /// What both authorities sign, under a context of its own.
    pub fn statement(
        conversation: ConversationId,
        term: u64,
        from: &str,
        to: &str,
        last_seq: u64,
        epoch: u64,
    ) -> [u8; 32] {
        let mut statement =
            blake3::Hasher::new_derive_key("sund federation: authority handed over, v1");
        statement.update(&conversation.to_bytes());
        statement.update(&term.to_be_bytes());
        for domain in [from, to] {
            statement.update(&(domain.len() as u64).to_be_bytes());
            statement.update(domain.as_bytes());
        }
        statement.update(&last_seq.to_be_bytes());
        statement.update(&epoch.to_be_bytes());
        *statement.finalize().as_bytes()
    }
}

/// A peer's answer to a KeyPackage request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchAnswer {
    /// The packages taken from the peer's directory (one-time ones are gone there now).
    Found {
        /// At most [`FETCH_DEVICES_MAX`] packages, each at most [`FETCHED_PACKAGE_BYTES_MAX`]
        /// bytes.
        packages: Vec<ForeignPackage>,
        /// Devices with no package at all (at most [`FETCH_DEVICES_MAX`]).
        exhausted: Vec<DeviceId>,
    },
    /// The peer's limit for requests from the asking gateway refused it; nothing was taken.
    Limited {
        /// When it may be asked again, in milliseconds.
        retry_after_ms: u32,
    },
}

/// One device's KeyPackage in a [`FetchAnswer::Found`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignPackage {
    /// Its user.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
    /// The TLS-encoded MLS KeyPackage.
    pub package: Bytes,
    /// True if it is the device's last-resort package (its pool was empty).
    pub last_resort: bool,
}

/// What the authority did with a relayed message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Sequenced at this seq (now or earlier: a copy gets its original seq).
    Sequenced(u64),
    /// Refused.
    Refused {
        /// Why, as the device will hear it.
        code: ErrorCode,
        /// In words (at most [`ANSWER_MESSAGE_MAX`] bytes).
        message: String,
        /// With `sender_out_of_order`: the message it must come after.
        after: Option<MsgId>,
    },
    /// Refused `stale_epoch`: made in an epoch the group has left (it is at `epoch` now); the
    /// device encrypts it again once it is there.
    Stale {
        /// In words (at most [`ANSWER_MESSAGE_MAX`] bytes).
        message: String,
        /// The group's epoch at the authority.
        epoch: u64,
    },
    /// Refused for now by a rate limit (`peer_limited`): the device sends it again after
    /// `retry_after_ms`.
    Limited {
        /// Why, as the device will hear it.
        code: ErrorCode,
        /// In words (at most [`ANSWER_MESSAGE_MAX`] bytes).
        message: String,
        /// When it may be sent again, in milliseconds.
        retry_after_ms: u32,
    },
}

/// Why bytes are not an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// Not this format's version byte.
    #[error("not a conversation entry (version byte {0:#04x})")]
    NotAnEntry(u8),
    /// An unknown kind.
    #[error("unknown entry kind {0}")]
    UnknownKind(u8),
    /// Shorter than its fields say.
    #[error("the entry ends early")]
    Truncated,
    /// A count or length over its bound.
    #[error("a count or length in the entry is over its bound")]
    TooLong,
    /// Bytes after the last field.
    #[error("bytes after the entry's last field")]
    Trailing,
    /// A flag byte that is neither 0 nor 1.
    #[error("a flag byte of {0} in the entry")]
    BadFlag(u8),
    /// A refusal message that is not UTF-8.
    #[error("a refusal message that is not UTF-8")]
    NotUtf8,
    /// A bundle inside a bundle.
    #[error("a bundle inside a bundle")]
    Nested,
    /// A DM claim's answer byte that names no answer.
    #[error("a DM claim answer of {0}")]
    UnknownClaimAnswer(u8),
}

impl Entry {
    /// The conversation it is about (`None` for [`Entry::Revocations`] and the KeyPackage
    /// entries, which are about none, and for an [`Entry::Bundle`], which may be about
    /// several).
    pub fn conversation(&self) -> Option<ConversationId> {
        Some(match self {
            Entry::Open { conversation, .. }
            | Entry::Relay { conversation, .. }
            | Entry::Sequenced { conversation, .. }
            | Entry::Answer { conversation, .. }
            | Entry::Handover { conversation, .. }
            | Entry::Moved { conversation, .. }
            | Entry::Following { conversation, .. }
            | Entry::Declined { conversation, .. }
            | Entry::Welcome { conversation, .. }
            | Entry::Removed { conversation, .. }
            | Entry::Leave { conversation, .. }
            | Entry::DmClaim { conversation }
            | Entry::DmClaimAnswer { conversation, .. } => *conversation,
            Entry::Revocations { .. }
            | Entry::ExternalKey { .. }
            | Entry::Contact { .. }
            | Entry::Block { .. }
            | Entry::PresenceWatch { .. }
            | Entry::PresenceReset
            | Entry::PresenceState { .. }
            | Entry::KeyPackageRequest { .. }
            | Entry::KeyPackages { .. }
            | Entry::Bundle { .. } => return None,
        })
    }

    /// The entries it carries: a bundle's, or itself.
    pub fn into_entries(self) -> Vec<Entry> {
        match self {
            Entry::Bundle { entries, .. } => entries,
            other => vec![other],
        }
    }

    /// The entry's bytes.
    pub fn encode(&self) -> Bytes {
        let mut out = vec![ENTRY_VERSION];
        match self {
            Entry::Open {
                conversation,
                members,
            } => {
                debug_assert!(members.len() <= OPEN_MEMBERS_MAX, "bounded by the caller");
                out.push(KIND_OPEN);
                out.extend_from_slice(&conversation.to_bytes());
                put_devices(&mut out, members);
            }
            Entry::Relay {
                conversation,
                sender,
                msg_id,
                after,
                body,
                welcome,
                vouched,
            } => {
                let plain = welcome.is_none() && vouched.is_empty();
                out.push(if plain { KIND_RELAY } else { KIND_RELAY_COMMIT });
                out.extend_from_slice(&conversation.to_bytes());
                out.extend_from_slice(&sender.to_bytes());
                out.extend_from_slice(&msg_id.to_bytes());
                put_optional_id(&mut out, *after);
                put_body(&mut out, body);
                if !plain {
                    assert!(vouched.len() <= RELAY_VOUCHED_MAX, "bounded by the caller");
                    match welcome {
                        None => out.push(0),
                        Some(welcome) => {
                            out.push(1);
                            put_body(&mut out, welcome);
                        }
                    }
                    out.extend_from_slice(&(vouched.len() as u16).to_be_bytes());
                    for (device, user) in vouched {
                        out.extend_from_slice(&device.to_bytes());
                        out.extend_from_slice(&user.to_bytes());
                    }
                }
            }
            Entry::Sequenced {
                conversation,
                seq,
                epoch,
                sender,
                msg_id,
                chained,
                body,
            } => {
                out.push(KIND_SEQUENCED);
                out.extend_from_slice(&conversation.to_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&epoch.to_be_bytes());
                out.extend_from_slice(&sender.to_bytes());
                out.extend_from_slice(&msg_id.to_bytes());
                out.push(u8::from(*chained));
                put_body(&mut out, body);
            }
            Entry::Answer {
                conversation,
                sender,
                msg_id,
                outcome,
            } => {
                out.push(KIND_ANSWER);
                out.extend_from_slice(&conversation.to_bytes());
                out.extend_from_slice(&sender.to_bytes());
                out.extend_from_slice(&msg_id.to_bytes());
                match outcome {
                    Outcome::Sequenced(seq) => {
                        out.push(0);
                        out.extend_from_slice(&seq.to_be_bytes());
                    }
                    Outcome::Refused {
                        code,
                        message,
                        after,
                    } => {
                        out.push(1);
                        out.extend_from_slice(&(*code as u16).to_be_bytes());
                        put_optional_id(&mut out, *after);
                        put_words(&mut out, message);
                    }
                    Outcome::Stale { message, epoch } => {
                        out.push(3);
                        out.extend_from_slice(&epoch.to_be_bytes());
                        put_words(&mut out, message);
                    }
                    Outcome::Limited {
                        code,
                        message,
                        retry_after_ms,
                    } => {
                        out.push(2);
                        out.extend_from_slice(&(*code as u16).to_be_bytes());
                        out.extend_from_slice(&retry_after_ms.to_be_bytes());
                        put_words(&mut out, message);
                    }
                }
            }
            Entry::Handover {
                conversation,
                term,
                last_seq,
                epoch,
                members,
                signature,
                mls,
            } => {
                debug_assert!(
                    members.len() <= HANDOVER_DOMAINS_MAX,
                    "bounded by the caller"
                );
                out.push(if mls.is_some() {
                    KIND_HANDOVER_MLS
                } else {
                    KIND_HANDOVER
                });
                out.extend_from_slice(&conversation.to_bytes());
                for n in [term, last_seq, epoch] {
                    out.extend_from_slice(&n.to_be_bytes());
                }
                out.push(members.len() as u8);
                for (domain, devices) in members {
                    put_domain(&mut out, domain);
                    put_devices(&mut out, devices);
                }
                out.extend_from_slice(signature);
                if let Some(mls) = mls {
                    debug_assert!(
                        mls.group.len() <= HANDOVER_GROUP_BYTES_MAX
                            && mls.proposal.len() <= HANDOVER_PROPOSAL_BYTES_MAX,
                        "bounded by the caller"
                    );
                    put_body(&mut out, &mls.group);
                    out.extend_from_slice(&mls.external_key);
                    put_body(&mut out, &mls.proposal);
                    debug_assert!(
                        mls.senders.len() <= OPEN_MEMBERS_MAX,
                        "bounded by the caller"
                    );
                    out.extend_from_slice(&(mls.senders.len() as u32).to_be_bytes());
                    for (device, last) in &mls.senders {
                        out.extend_from_slice(&device.to_bytes());
                        out.extend_from_slice(&last.to_bytes());
                    }
                }
            }
            Entry::ExternalKey { key } => {
                out.push(KIND_EXTERNAL_KEY);
                out.extend_from_slice(key);
            }
            Entry::Contact { from, to, added } => {
                out.push(KIND_CONTACT);
                out.extend_from_slice(&from.to_bytes());
                out.extend_from_slice(&to.to_bytes());
                out.push(u8::from(*added));
            }
            Entry::Block { from, to, blocked } => {
                out.push(KIND_BLOCK);
                out.extend_from_slice(&from.to_bytes());
                out.extend_from_slice(&to.to_bytes());
                out.push(u8::from(*blocked));
            }
            Entry::PresenceWatch {
                watcher,
                target,
                on,
            } => {
                out.push(KIND_PRESENCE_WATCH);
                out.extend_from_slice(&watcher.to_bytes());
                out.extend_from_slice(&target.to_bytes());
                out.push(u8::from(*on));
            }
            Entry::PresenceReset => out.push(KIND_PRESENCE_RESET),
            Entry::PresenceState {
                watcher,
                target,
                seen,
            } => {
                out.push(KIND_PRESENCE_STATE);
                out.extend_from_slice(&watcher.to_bytes());
                out.extend_from_slice(&target.to_bytes());
                out.push(*seen as u8);
            }
            Entry::Moved {
                conversation,
                certificate: c,
            } => {
                out.push(KIND_MOVED);
                out.extend_from_slice(&conversation.to_bytes());
                out.extend_from_slice(&c.term.to_be_bytes());
                put_domain(&mut out, &c.from);
                put_domain(&mut out, &c.to);
                out.extend_from_slice(&c.last_seq.to_be_bytes());
                out.extend_from_slice(&c.epoch.to_be_bytes());
                out.extend_from_slice(&c.from_signature);
                out.extend_from_slice(&c.to_signature);
            }
            Entry::Following {
                conversation,
                term,
                head,
            } => {
                out.push(KIND_FOLLOWING);
                out.extend_from_slice(&conversation.to_bytes());
                out.extend_from_slice(&term.to_be_bytes());
                out.extend_from_slice(&head.to_be_bytes());
            }
            Entry::Declined {
                conversation,
                term,
                reason,
            } => {
                out.push(KIND_DECLINED);
                out.extend_from_slice(&conversation.to_bytes());
                out.extend_from_slice(&term.to_be_bytes());
                put_words(&mut out, reason);
            }
            Entry::Revocations { root, crl } => {
                debug_assert!(crl.len() <= REVOCATIONS_CRL_MAX, "bounded by the CRL's");
                out.push(KIND_REVOCATIONS);
                out.extend_from_slice(&root.0);
                put_body(&mut out, crl);
            }
            Entry::Welcome {
                conversation,
                seq,
                kind,
                devices,
                welcome,
            } => {
                debug_assert!(devices.len() <= OPEN_MEMBERS_MAX, "bounded by the caller");
                out.push(KIND_WELCOME);
                out.extend_from_slice(&conversation.to_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.push(*kind);
                put_devices(&mut out, devices);
                put_body(&mut out, welcome);
            }
            Entry::Leave {
                conversation,
                device,
            } => {
                out.push(KIND_LEAVE);
                out.extend_from_slice(&conversation.to_bytes());
                out.extend_from_slice(&device.to_bytes());
            }
            Entry::DmClaim { conversation } => {
                out.push(KIND_DM_CLAIM);
                out.extend_from_slice(&conversation.to_bytes());
            }
            Entry::DmClaimAnswer {
                conversation,
                answer,
            } => {
                out.push(KIND_DM_CLAIM_ANSWER);
                out.extend_from_slice(&conversation.to_bytes());
                out.push(answer.to_u8());
            }
            Entry::Removed {
                conversation,
                seq,
                devices,
            } => {
                debug_assert!(devices.len() <= OPEN_MEMBERS_MAX, "bounded by the caller");
                out.push(KIND_REMOVED);
                out.extend_from_slice(&conversation.to_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                put_devices(&mut out, devices);
            }
            Entry::KeyPackageRequest {
                request,
                requester,
                users,
            } => {
                assert!(users.len() <= FETCH_USERS_MAX, "bounded by the caller");
                out.push(KIND_KEY_PACKAGE_REQUEST);
                out.extend_from_slice(&request.to_be_bytes());
                out.extend_from_slice(&requester.to_bytes());
                out.push(users.len() as u8);
                for user in users {
                    out.extend_from_slice(&user.to_bytes());
                }
            }
            Entry::KeyPackages { request, answer } => {
                out.push(KIND_KEY_PACKAGES);
                out.extend_from_slice(&request.to_be_bytes());
                match answer {
                    FetchAnswer::Found {
                        packages,
                        exhausted,
                    } => {
                        assert!(
                            packages.len() <= FETCH_DEVICES_MAX
                                && exhausted.len() <= FETCH_DEVICES_MAX,
                            "bounded by the caller"
                        );
                        out.push(0);
                        out.push(packages.len() as u8);
                        for p in packages {
                            assert!(
                                p.package.len() <= FETCHED_PACKAGE_BYTES_MAX,
                                "bounded by the directory"
                            );
                            out.extend_from_slice(&p.user.to_bytes());
                            out.extend_from_slice(&p.device.to_bytes());
                            out.push(u8::from(p.last_resort));
                            out.extend_from_slice(&(p.package.len() as u16).to_be_bytes());
                            out.extend_from_slice(&p.package);
                        }
                        out.push(exhausted.len() as u8);
                        for device in exhausted {
                            out.extend_from_slice(&device.to_bytes());
                        }
                    }
                    FetchAnswer::Limited { retry_after_ms } => {
                        out.push(1);
                        out.extend_from_slice(&retry_after_ms.to_be_bytes());
                    }
                }
            }
            Entry::Bundle { entries, signature } => {
                let parts: Vec<Bytes> = entries.iter().map(Entry::encode).collect();
                return encode_bundle(&parts, *signature);
            }
        }
        Bytes::from(out)
    }

    /// Reads an entry; never panics, allocates only what the input holds.
    pub fn decode(bytes: &[u8]) -> Result<Entry, EntryError> {
        let mut r = Reader::new(bytes);
        let version = r.u8().ok_or(EntryError::Truncated)?;
        if version != ENTRY_VERSION {
            return Err(EntryError::NotAnEntry(version));
        }
        if bytes.get(1) != Some(&KIND_BUNDLE) {
            return Entry::decode_one(bytes);
        }
        r.u8();
        let signature = match r.u8().ok_or(EntryError::Truncated)? {
            0 => None,
            1 => Some(r.array::<64>().ok_or(EntryError::Truncated)?),
            other => return Err(EntryError::BadFlag(other)),
        };
        let count = usize::from(u16::from_be_bytes(
            r.array::<2>().ok_or(EntryError::Truncated)?,
        ));
        if count > BUNDLE_ENTRIES_MAX {
            return Err(EntryError::TooLong);
        }
        // Each entry takes at least its length and two bytes.
        if r.remaining() < count * (BUNDLE_ENTRY_OVERHEAD + 2) {
            return Err(EntryError::Truncated);
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let len = r.u32().ok_or(EntryError::Truncated)? as usize;
            let part = r.take(len).ok_or(EntryError::Truncated)?;
            if part.get(1) == Some(&KIND_BUNDLE) {
                return Err(EntryError::Nested);
            }
            entries.push(Entry::decode_one(part)?);
        }
        if r.remaining() != 0 {
            return Err(EntryError::Trailing);
        }
        Ok(Entry::Bundle { entries, signature })
    }

    /// Reads an entry that is not a bundle.
    fn decode_one(bytes: &[u8]) -> Result<Entry, EntryError> {
        let mut r = Reader::new(bytes);
        let version = r.u8().ok_or(EntryError::Truncated)?;
        if version != ENTRY_VERSION {
            return Err(EntryError::NotAnEntry(version));
        }
        let kind = r.u8().ok_or(EntryError::Truncated)?;
        if kind == KIND_REVOCATIONS {
            let root = DevicePublicKey(r.array::<32>().ok_or(EntryError::Truncated)?);
            let len = r.u32().ok_or(EntryError::Truncated)? as usize;
            if len > REVOCATIONS_CRL_MAX {
                return Err(EntryError::TooLong);
            }
            let crl = Bytes::copy_from_slice(r.take(len).ok_or(EntryError::Truncated)?);
            if r.remaining() != 0 {
                return Err(EntryError::Trailing);
            }
            return Ok(Entry::Revocations { root, crl });
        }
        if kind == KIND_EXTERNAL_KEY {
            let key = r.array::<32>().ok_or(EntryError::Truncated)?;
            if r.remaining() != 0 {
                return Err(EntryError::Trailing);
            }
            return Ok(Entry::ExternalKey { key });
        }
        if kind == KIND_CONTACT || kind == KIND_BLOCK {
            let from = UserId::from_bytes(id(&mut r)?);
            let to = UserId::from_bytes(id(&mut r)?);
            let flag = match r.u8().ok_or(EntryError::Truncated)? {
                0 => false,
                1 => true,
                other => return Err(EntryError::BadFlag(other)),
            };
            if r.remaining() != 0 {
                return Err(EntryError::Trailing);
            }
            return Ok(if kind == KIND_CONTACT {
                Entry::Contact {
                    from,
                    to,
                    added: flag,
                }
            } else {
                Entry::Block {
                    from,
                    to,
                    blocked: flag,
                }
            });
        }
        if let Some(entry) = decode_presence(kind, &mut r)? {
            if r.remaining() != 0 {
                return Err(EntryError::Trailing);
            }
            return Ok(entry);
        }
        if kind == KIND_KEY_PACKAGE_REQUEST || kind == KIND_KEY_PACKAGES {
            let entry = decode_key_packages(kind, &mut r)?;
            if r.remaining() != 0 {
                return Err(EntryError::Trailing);
            }
            return Ok(entry);
        }
        let conversation = ConversationId::from_bytes(id(&mut r)?);
        let entry = match kind {
            KIND_OPEN => {
                let members = devices(&mut r, OPEN_MEMBERS_MAX)?;
                Entry::Open {
                    conversation,
                    members,
                }
            }
            KIND_RELAY | KIND_RELAY_COMMIT => {
                let sender = DeviceId::from_bytes(id(&mut r)?);
                let msg_id = MsgId::from_bytes(id(&mut r)?);
                let after = optional_id(&mut r)?;
                let body = body(&mut r)?;
                let (welcome, vouched) = if kind == KIND_RELAY {
                    (None, Vec::new())
                } else {
                    relayed_commit(&mut r)?
                };
                Entry::Relay {
                    conversation,
                    sender,
                    msg_id,
                    after,
                    body,
                    welcome,
                    vouched,
                }
            }
            KIND_SEQUENCED => Entry::Sequenced {
                conversation,
                seq: r.u64().ok_or(EntryError::Truncated)?,
                epoch: r.u64().ok_or(EntryError::Truncated)?,
                sender: DeviceId::from_bytes(id(&mut r)?),
                msg_id: MsgId::from_bytes(id(&mut r)?),
                chained: match r.u8().ok_or(EntryError::Truncated)? {
                    0 => false,
                    1 => true,
                    other => return Err(EntryError::BadFlag(other)),
                },
                body: body(&mut r)?,
            },
            KIND_ANSWER => {
                let sender = DeviceId::from_bytes(id(&mut r)?);
                let msg_id = MsgId::from_bytes(id(&mut r)?);
                let outcome = match r.u8().ok_or(EntryError::Truncated)? {
                    0 => Outcome::Sequenced(r.u64().ok_or(EntryError::Truncated)?),
                    1 => {
                        let code = r.array::<2>().ok_or(EntryError::Truncated)?;
                        let code = ErrorCode::from_u16(u16::from_be_bytes(code));
                        let after = optional_id(&mut r)?;
                        let message = words(&mut r)?;
                        Outcome::Refused {
                            code,
                            message,
                            after,
                        }
                    }
                    2 => {
                        let code = r.array::<2>().ok_or(EntryError::Truncated)?;
                        let code = ErrorCode::from_u16(u16::from_be_bytes(code));
                        let retry_after_ms = r.u32().ok_or(EntryError::Truncated)?;
                        Outcome::Limited {
                            code,
                            message: words(&mut r)?,
                            retry_after_ms,
                        }
                    }
                    3 => {
                        let epoch = r.u64().ok_or(EntryError::Truncated)?;
                        Outcome::Stale {
                            message: words(&mut r)?,
                            epoch,
                        }
                    }
                    other => return Err(EntryError::BadFlag(other)),
                };
                Entry::Answer {
                    conversation,
                    sender,
                    msg_id,
                    outcome,
                }
            }
            KIND_HANDOVER | KIND_HANDOVER_MLS => {
                let term = r.u64().ok_or(EntryError::Truncated)?;
                let last_seq = r.u64().ok_or(EntryError::Truncated)?;
                let epoch = r.u64().ok_or(EntryError::Truncated)?;
                let domains = usize::from(r.u8().ok_or(EntryError::Truncated)?);
                if domains > HANDOVER_DOMAINS_MAX {
                    return Err(EntryError::TooLong);
                }
                let mut members = Vec::with_capacity(domains);
                let mut devices_in_all = 0usize;
                for _ in 0..domains {
                    let domain = domain(&mut r)?;
                    let devices = devices(&mut r, OPEN_MEMBERS_MAX - devices_in_all)?;
                    devices_in_all += devices.len();
                    members.push((domain, devices));
                }
                let signature = r.array::<64>().ok_or(EntryError::Truncated)?;
                let mls = if kind == KIND_HANDOVER_MLS {
                    let group = bounded_body(&mut r, HANDOVER_GROUP_BYTES_MAX)?;
                    let external_key = r.array::<32>().ok_or(EntryError::Truncated)?;
                    let proposal = bounded_body(&mut r, HANDOVER_PROPOSAL_BYTES_MAX)?;
                    let count = r.u32().ok_or(EntryError::Truncated)? as usize;
                    if count > OPEN_MEMBERS_MAX {
                        return Err(EntryError::TooLong);
                    }
                    if r.remaining() < count * 32 {
                        return Err(EntryError::Truncated);
                    }
                    let mut senders = Vec::with_capacity(count);
                    for _ in 0..count {
                        let device = DeviceId::from_bytes(id(&mut r)?);
                        let last = MsgId::from_bytes(id(&mut r)?);
                        senders.push((device, last));
                    }
                    Some(MlsHandover {
                        group,
                        external_key,
                        proposal,
                        senders,
                    })
                } else {
                    None
                };
                Entry::Handover {
                    conversation,
                    term,
                    last_seq,
                    epoch,
                    members,
                    signature,
                    mls,
                }
            }
            KIND_MOVED => Entry::Moved {
                conversation,
                certificate: HandoverCertificate {
                    term: r.u64().ok_or(EntryError::Truncated)?,
                    from: domain(&mut r)?,
                    to: domain(&mut r)?,
                    last_seq: r.u64().ok_or(EntryError::Truncated)?,
                    epoch: r.u64().ok_or(EntryError::Truncated)?,
                    from_signature: r.array::<64>().ok_or(EntryError::Truncated)?,
                    to_signature: r.array::<64>().ok_or(EntryError::Truncated)?,
                },
            },
            KIND_FOLLOWING => Entry::Following {
                conversation,
                term: r.u64().ok_or(EntryError::Truncated)?,
                head: r.u64().ok_or(EntryError::Truncated)?,
            },
            KIND_DECLINED => Entry::Declined {
                conversation,
                term: r.u64().ok_or(EntryError::Truncated)?,
                reason: words(&mut r)?,
            },
            KIND_WELCOME => Entry::Welcome {
                conversation,
                seq: r.u64().ok_or(EntryError::Truncated)?,
                kind: r.u8().ok_or(EntryError::Truncated)?,
                devices: devices(&mut r, OPEN_MEMBERS_MAX)?,
                welcome: body(&mut r)?,
            },
            KIND_LEAVE => Entry::Leave {
                conversation,
                device: DeviceId::from_bytes(id(&mut r)?),
            },
            KIND_REMOVED => Entry::Removed {
                conversation,
                seq: r.u64().ok_or(EntryError::Truncated)?,
                devices: devices(&mut r, OPEN_MEMBERS_MAX)?,
            },
            KIND_DM_CLAIM => Entry::DmClaim { conversation },
            KIND_DM_CLAIM_ANSWER => {
                let byte = r.u8().ok_or(EntryError::Truncated)?;
                Entry::DmClaimAnswer {
                    conversation,
                    answer: DmClaimAnswer::from_u8(byte)
                        .ok_or(EntryError::UnknownClaimAnswer(byte))?,
                }
            }
            other => return Err(EntryError::UnknownKind(other)),
        };
        if r.remaining() != 0 {
            return Err(EntryError::Trailing);
        }
        Ok(entry)
    }
}

/// What a relayed commit adds after the relay's body: its Welcome, and the users of the
/// relaying domain's devices it adds.
type RelayedCommit = (Option<Bytes>, Vec<(DeviceId, UserId)>);

/// Reads [`RelayedCommit`]; allocates only what the input holds.
fn relayed_commit(r: &mut Reader<'_>) -> Result<RelayedCommit, EntryError> {
    let welcome = match r.u8().ok_or(EntryError::Truncated)? {
        0 => None,
        1 => Some(body(r)?),
        other => return Err(EntryError::BadFlag(other)),
    };
    let count = usize::from(u16::from_be_bytes(
        r.array::<2>().ok_or(EntryError::Truncated)?,
    ));
    if count > RELAY_VOUCHED_MAX {
        return Err(EntryError::TooLong);
    }
    if r.remaining() < count * 32 {
        return Err(EntryError::Truncated);
    }
    let vouched = (0..count)
        .map(|_| Ok((DeviceId::from_bytes(id(r)?), UserId::from_bytes(id(r)?))))
        .collect::<Result<_, EntryError>>()?;
    Ok((welcome, vouched))
}

/// A presence entry's fields after its kind byte (`None`: not a presence kind).
fn decode_presence(kind: u8, r: &mut Reader<'_>) -> Result<Option<Entry>, EntryError> {
    let entry = match kind {
        KIND_PRESENCE_RESET => Entry::PresenceReset,
        KIND_PRESENCE_WATCH | KIND_PRESENCE_STATE => {
            let watcher = UserId::from_bytes(id(r)?);
            let target = UserId::from_bytes(id(r)?);
            let flag = r.u8().ok_or(EntryError::Truncated)?;
            if kind == KIND_PRESENCE_WATCH {
                let on = match flag {
                    0 => false,
                    1 => true,
                    other => return Err(EntryError::BadFlag(other)),
                };
                Entry::PresenceWatch {
                    watcher,
                    target,
                    on,
                }
            } else {
                let seen = Seen::from_u8(flag);
                if seen as u8 != flag {
                    return Err(EntryError::BadFlag(flag));
                }
                Entry::PresenceState {
                    watcher,
                    target,
                    seen,
                }
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(entry))
}

/// The fields of a KeyPackage request or answer after its kind byte.
fn decode_key_packages(kind: u8, r: &mut Reader<'_>) -> Result<Entry, EntryError> {
    let request = r.u64().ok_or(EntryError::Truncated)?;
    if kind == KIND_KEY_PACKAGE_REQUEST {
        let requester = UserId::from_bytes(id(r)?);
        let count = usize::from(r.u8().ok_or(EntryError::Truncated)?);
        if count > FETCH_USERS_MAX {
            return Err(EntryError::TooLong);
        }
        let users = (0..count)
            .map(|_| id(r).map(UserId::from_bytes))
            .collect::<Result<_, _>>()?;
        return Ok(Entry::KeyPackageRequest {
            request,
            requester,
            users,
        });
    }
    let answer = match r.u8().ok_or(EntryError::Truncated)? {
        0 => {
            let count = usize::from(r.u8().ok_or(EntryError::Truncated)?);
            if count > FETCH_DEVICES_MAX {
                return Err(EntryError::TooLong);
            }
            let mut packages = Vec::new();
            for _ in 0..count {
                let user = UserId::from_bytes(id(r)?);
                let device = DeviceId::from_bytes(id(r)?);
                let last_resort = match r.u8().ok_or(EntryError::Truncated)? {
                    0 => false,
                    1 => true,
                    other => return Err(EntryError::BadFlag(other)),
                };
                let len = usize::from(u16::from_be_bytes(
                    r.array::<2>().ok_or(EntryError::Truncated)?,
                ));
                if len > FETCHED_PACKAGE_BYTES_MAX {
                    return Err(EntryError::TooLong);
                }
                let package = Bytes::copy_from_slice(r.take(len).ok_or(EntryError::Truncated)?);
                packages.push(ForeignPackage {
                    user,
                    device,
                    package,
                    last_resort,
                });
            }
            let count = usize::from(r.u8().ok_or(EntryError::Truncated)?);
            if count > FETCH_DEVICES_MAX {
                return Err(EntryError::TooLong);
            }
            let exhausted = (0..count)
                .map(|_| id(r).map(DeviceId::from_bytes))
                .collect::<Result<_, _>>()?;
            FetchAnswer::Found {
                packages,
                exhausted,
            }
        }
        1 => FetchAnswer::Limited {
            retry_after_ms: r.u32().ok_or(EntryError::Truncated)?,
        },
        other => return Err(EntryError::BadFlag(other)),
    };
    Ok(Entry::KeyPackages { request, answer })
}

/// What an authority signs for each message it sequences: the conversation, the seq, the
/// epoch and a digest of the message (its sender, its id and its body), under a context of
/// its own so that no other signature of the link key can be taken for one.
pub fn sequenced_statement(
    conversation: ConversationId,
    seq: u64,
    epoch: u64,
    sender: DeviceId,
    msg_id: MsgId,
    body: &[u8],
) -> [u8; 32] {
    let mut message = blake3::Hasher::new();
    message.update(&sender.to_bytes());
    message.update(&msg_id.to_bytes());
    message.update(body);
    let mut statement =
        blake3::Hasher::new_derive_key("sund federation: sequenced by the authority, v1");
    statement.update(&conversation.to_bytes());
    statement.update(&seq.to_be_bytes());
    statement.update(&epoch.to_be_bytes());
    statement.update(message.finalize().as_bytes());
    *statement.finalize().as_bytes()
}

/// What the sender of a bundle signs: the [`sequenced_statement`] of every
/// [`Entry::Sequenced`] in it, in order, under a context of its own.
pub fn bundle_statement(statements: &[[u8; 32]]) -> [u8; 32] {
    let mut bundle = blake3::Hasher::new_derive_key("sund federation: sequenced bundle, v1");
    bundle.update(&(statements.len() as u64).to_be_bytes());
    for statement in statements {
        bundle.update(statement);
    }
    *bundle.finalize().as_bytes()
}

/// The [`sequenced_statement`] of an entry if it is an [`Entry::Sequenced`].
pub fn statement_of(entry: &Entry) -> Option<[u8; 32]> {
    match entry {
        Entry::Sequenced {
            conversation,
            seq,
            epoch,
            sender,
            msg_id,
            body,
            ..
        } => Some(sequenced_statement(
            *conversation,
            *seq,
            *epoch,
            *sender,
            *msg_id,
            body,
        )),
        _ => None,
    }
}

/// A bundle of entries already encoded (none of them a bundle, at most
/// [`BUNDLE_ENTRIES_MAX`]), signed or not: the link entry a gateway queues for a peer.
pub fn encode_bundle(parts: &[Bytes], signature: Option<[u8; 64]>) -> Bytes {
    assert!(parts.len() <= BUNDLE_ENTRIES_MAX, "bounded by the caller");
    let len = BUNDLE_HEADER_BYTES
        + parts
            .iter()
            .map(|p| p.len() + BUNDLE_ENTRY_OVERHEAD)
            .sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.push(ENTRY_VERSION);
    out.push(KIND_BUNDLE);
    match signature {
        Some(signature) => {
            out.push(1);
            out.extend_from_slice(&signature);
        }
        None => out.push(0),
    }
    out.extend_from_slice(&(parts.len() as u16).to_be_bytes());
    for part in parts {
        debug_assert_ne!(part.get(1), Some(&KIND_BUNDLE), "bundles are not nested");
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    Bytes::from(out)
}

/// A count (u32) and that many device ids.
fn put_devices(out: &mut Vec<u8>, devices: &[DeviceId]) {
    out.extend_from_slice(&(devices.len() as u32).to_be_bytes());
    for device in devices {
        out.extend_from_slice(&device.to_bytes());
    }
}

/// A count of at most `max` and that many device ids; allocates only what the input holds.
fn devices(r: &mut Reader<'_>, max: usize) -> Result<Vec<DeviceId>, EntryError> {
    let count = r.u32().ok_or(EntryError::Truncated)? as usize;
    if count > max {
        return Err(EntryError::TooLong);
    }
    if r.remaining() < count * 16 {
        return Err(EntryError::Truncated);
    }
    (0..count)
        .map(|_| id(r).map(DeviceId::from_bytes))
        .collect()
}

/// Words cut at a character boundary to [`ANSWER_MESSAGE_MAX`] bytes, after their u16 length.
fn put_words(out: &mut Vec<u8>, words: &str) {
    let words = crate::codec::truncate_utf8(words, ANSWER_MESSAGE_MAX);
    out.extend_from_slice(&(words.len() as u16).to_be_bytes());
    out.extend_from_slice(words.as_bytes());
}

/// A refusal's or a decline's words: a u16 length (at most [`ANSWER_MESSAGE_MAX`]), UTF-8.
fn words(r: &mut Reader<'_>) -> Result<String, EntryError> {
    let len = r.array::<2>().ok_or(EntryError::Truncated)?;
    let len = usize::from(u16::from_be_bytes(len));
    if len > ANSWER_MESSAGE_MAX {
        return Err(EntryError::TooLong);
    }
    let text = r.take(len).ok_or(EntryError::Truncated)?;
    Ok(core::str::from_utf8(text)
        .map_err(|_| EntryError::NotUtf8)?
        .to_string())
}

fn put_domain(out: &mut Vec<u8>, domain: &str) {
    assert!(
        domain.len() <= DOMAIN_MAX,
        "domains are checked when configured"
    );
    out.push(domain.len() as u8);
    out.extend_from_slice(domain.as_bytes());
}

fn domain(r: &mut Reader<'_>) -> Result<String, EntryError> {
    let len = usize::from(r.u8().ok_or(EntryError::Truncated)?);
    if len > DOMAIN_MAX {
        return Err(EntryError::TooLong);
    }
    let text = r.take(len).ok_or(EntryError::Truncated)?;
    Ok(core::str::from_utf8(text)
        .map_err(|_| EntryError::NotUtf8)?
        .to_string())
}

fn id(r: &mut Reader<'_>) -> Result<[u8; 16], EntryError> {
    r.array::<16>().ok_or(EntryError::Truncated)
}

fn put_optional_id(out: &mut Vec<u8>, id: Option<MsgId>) {
    match id {
        Some(id) => {
            out.push(1);
            out.extend_from_slice(&id.to_bytes());
        }
        None => out.push(0),
    }
}

fn optional_id(r: &mut Reader<'_>) -> Result<Option<MsgId>, EntryError> {
    match r.u8().ok_or(EntryError::Truncated)? {
        0 => Ok(None),
        1 => Ok(Some(MsgId::from_bytes(id(r)?))),
        other => Err(EntryError::BadFlag(other)),
    }
}

fn put_body(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
}

fn body(r: &mut Reader<'_>) -> Result<Bytes, EntryError> {
    let len = r.u32().ok_or(EntryError::Truncated)? as usize;
    let bytes = r.take(len).ok_or(EntryError::Truncated)?;
    Ok(Bytes::copy_from_slice(bytes))
}

/// [`body`], refused if longer than `max`.
fn bounded_body(r: &mut Reader<'_>, max: usize) -> Result<Bytes, EntryError> {
    let len = r.u32().ok_or(EntryError::Truncated)? as usize;
    if len > max {
        return Err(EntryError::TooLong);
    }
    let bytes = r.take(len).ok_or(EntryError::Truncated)?;
    Ok(Bytes::copy_from_slice(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id16() -> impl Strategy<Value = u128> {
        any::<u128>()
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            any::<u64>().prop_map(Outcome::Sequenced),
            (0u16..50, "[ -~]{0,60}", proptest::option::of(id16())).prop_map(
                |(code, message, after)| Outcome::Refused {
                    code: ErrorCode::from_u16(code),
                    message,
                    after: after.map(MsgId),
                }
            ),
            ("[ -~]{0,60}", any::<u64>())
                .prop_map(|(message, epoch)| Outcome::Stale { message, epoch }),
            (0u16..60, "[ -~]{0,60}", any::<u32>()).prop_map(|(code, message, retry_after_ms)| {
                Outcome::Limited {
                    code: ErrorCode::from_u16(code),
                    message,
                    retry_after_ms,
                }
            }),
        ]
    }

    /// Any entry, bundles of any other entries among them.
    fn entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            4 => single(),
            1 => (
                proptest::collection::vec(single(), 0..6),
                proptest::option::of(any::<[u8; 32]>())
            )
                .prop_map(|(entries, half)| Entry::Bundle {
                    entries,
                    signature: half.map(|half| {
                        let mut signature = [5u8; 64];
                        signature[..32].copy_from_slice(&half);
                        signature
                    }),
                }),
        ]
    }

    /// Any entry but a bundle.
    fn single() -> impl Strategy<Value = Entry> {
        let body = proptest::collection::vec(any::<u8>(), 0..200).prop_map(Bytes::from);
        prop_oneof![
            (id16(), proptest::collection::vec(id16(), 0..20)).prop_map(|(c, m)| Entry::Open {
                conversation: ConversationId(c),
                members: m.into_iter().map(DeviceId).collect(),
            }),
            (
                id16(),
                id16(),
                id16(),
                proptest::option::of(id16()),
                body.clone(),
                proptest::option::of(body.clone()),
                proptest::collection::vec((id16(), id16()), 0..4),
            )
                .prop_map(|(c, s, m, a, body, welcome, vouched)| Entry::Relay {
                    conversation: ConversationId(c),
                    sender: DeviceId(s),
                    msg_id: MsgId(m),
                    after: a.map(MsgId),
                    body,
                    welcome,
                    vouched: vouched
                        .into_iter()
                        .map(|(d, u)| (DeviceId(d), UserId(u)))
                        .collect(),
                }),
            (
                id16(),
                any::<(u64, u64, bool)>(),
                id16(),
                id16(),
                body.clone(),
            )
                .prop_map(|(c, (seq, epoch, chained), s, m, body)| {
                    Entry::Sequenced {
                        conversation: ConversationId(c),
                        seq,
                        epoch,
                        sender: DeviceId(s),
                        msg_id: MsgId(m),
                        chained,
                        body,
                    }
                }),
            any::<[u8; 32]>().prop_map(|key| Entry::ExternalKey { key }),
            (id16(), id16(), any::<bool>()).prop_map(|(f, t, added)| Entry::Contact {
                from: UserId(f),
                to: UserId(t),
                added,
            }),
            (id16(), id16(), any::<bool>()).prop_map(|(f, t, blocked)| Entry::Block {
                from: UserId(f),
                to: UserId(t),
                blocked,
            }),
            (id16(), id16(), any::<bool>()).prop_map(|(w, t, on)| Entry::PresenceWatch {
                watcher: UserId(w),
                target: UserId(t),
                on,
            }),
            Just(Entry::PresenceReset),
            (id16(), id16(), 0u8..7).prop_map(|(w, t, seen)| Entry::PresenceState {
                watcher: UserId(w),
                target: UserId(t),
                seen: Seen::from_u8(seen),
            }),
            (id16(), id16(), id16(), outcome()).prop_map(|(c, s, m, outcome)| Entry::Answer {
                conversation: ConversationId(c),
                sender: DeviceId(s),
                msg_id: MsgId(m),
                outcome,
            }),
            (
                id16(),
                any::<(u64, u64, u64)>(),
                proptest::collection::vec(
                    ("[a-z.]{0,20}", proptest::collection::vec(id16(), 0..5)),
                    0..4
                ),
                any::<[u8; 32]>(),
                proptest::option::of((
                    body.clone(),
                    any::<[u8; 32]>(),
                    body.clone(),
                    proptest::collection::vec((id16(), id16()), 0..4)
                )),
            )
                .prop_map(|(c, (term, last_seq, epoch), members, half, mls)| {
                    let mut signature = [7u8; 64];
                    signature[32..].copy_from_slice(&half);
                    Entry::Handover {
                        conversation: ConversationId(c),
                        term,
                        last_seq,
                        epoch,
                        members: members
                            .into_iter()
                            .map(|(d, m)| (d, m.into_iter().map(DeviceId).collect()))
                            .collect(),
                        signature,
                        mls: mls.map(|(group, external_key, proposal, senders)| MlsHandover {
                            group,
                            external_key,
                            proposal,
                            senders: senders
                                .into_iter()
                                .map(|(d, m)| (DeviceId(d), MsgId(m)))
                                .collect(),
                        }),
                    }
                }),
            (
                id16(),
                any::<(u64, u64, u64)>(),
                "[a-z.é]{0,30}",
                "[a-z.]{0,30}",
                any::<([u8; 32], [u8; 32])>()
            )
                .prop_map(|(c, (term, last_seq, epoch), from, to, (a, b))| {
                    let (mut from_signature, mut to_signature) = ([1u8; 64], [2u8; 64]);
                    from_signature[..32].copy_from_slice(&a);
                    to_signature[32..].copy_from_slice(&b);
                    Entry::Moved {
                        conversation: ConversationId(c),
                        certificate: HandoverCertificate {
                            term,
                            from,
                            to,
                            last_seq,
                            epoch,
                            from_signature,
                            to_signature,
                        },
                    }
                }),
            (id16(), any::<(u64, u64)>()).prop_map(|(c, (term, head))| Entry::Following {
                conversation: ConversationId(c),
                term,
                head,
            }),
            (id16(), any::<u64>(), "[ -~]{0,60}").prop_map(|(c, term, reason)| {
                Entry::Declined {
                    conversation: ConversationId(c),
                    term,
                    reason,
                }
            }),
            (any::<[u8; 32]>(), body.clone()).prop_map(|(root, crl)| Entry::Revocations {
                root: DevicePublicKey(root),
                crl,
            }),
            (
                any::<u64>(),
                id16(),
                proptest::collection::vec(id16(), 0..=FETCH_USERS_MAX)
            )
                .prop_map(|(request, requester, users)| Entry::KeyPackageRequest {
                    request,
                    requester: UserId(requester),
                    users: users.into_iter().map(UserId).collect(),
                }),
            (any::<u64>(), fetch_answer(body.clone()))
                .prop_map(|(request, answer)| Entry::KeyPackages { request, answer }),
            (
                id16(),
                any::<(u64, u8)>(),
                proptest::collection::vec(id16(), 0..8),
                body
            )
                .prop_map(|(c, (seq, kind), devices, welcome)| Entry::Welcome {
                    conversation: ConversationId(c),
                    seq,
                    kind,
                    devices: devices.into_iter().map(DeviceId).collect(),
                    welcome,
                }),
            (id16(), id16()).prop_map(|(c, d)| Entry::Leave {
                conversation: ConversationId(c),
                device: DeviceId(d),
            }),
            id16().prop_map(|c| Entry::DmClaim {
                conversation: ConversationId(c),
            }),
            (id16(), 0u8..3).prop_map(|(c, a)| Entry::DmClaimAnswer {
                conversation: ConversationId(c),
                answer: DmClaimAnswer::from_u8(a).expect("0..3"),
            }),
            (
                id16(),
                any::<u64>(),
                proptest::collection::vec(id16(), 0..8)
            )
                .prop_map(|(c, seq, devices)| Entry::Removed {
                    conversation: ConversationId(c),
                    seq,
                    devices: devices.into_iter().map(DeviceId).collect(),
                }),
        ]
    }

    fn fetch_answer(body: impl Strategy<Value = Bytes>) -> impl Strategy<Value = FetchAnswer> {
        let package = (id16(), id16(), body, any::<bool>()).prop_map(
            |(user, device, package, last_resort)| ForeignPackage {
                user: UserId(user),
                device: DeviceId(device),
                package,
                last_resort,
            },
        );
        prop_oneof![
            (
                proptest::collection::vec(package, 0..6),
                proptest::collection::vec(id16(), 0..6)
            )
                .prop_map(|(packages, exhausted)| FetchAnswer::Found {
                    packages,
                    exhausted: exhausted.into_iter().map(DeviceId).collect(),
                }),
            any::<u32>().prop_map(|retry_after_ms| FetchAnswer::Limited { retry_after_ms }),
        ]
    }

    proptest! {
        #[test]
        fn every_entry_reads_back_as_itself(entry in entry()) {
            let bytes = entry.encode();
            prop_assert_eq!(Entry::decode(&bytes), Ok(entry.clone()));
            // Every proper prefix is refused, never misread.
            for cut in 0..bytes.len() {
                prop_assert!(Entry::decode(&bytes[..cut]).is_err(), "prefix of {cut} bytes read");
            }
            let mut longer = bytes.to_vec();
            longer.push(0);
            prop_assert_eq!(Entry::decode(&longer), Err(EntryError::Trailing));
        }

        #[test]
        fn any_bytes_decode_or_are_refused_without_panicking(
            bytes in proptest::collection::vec(any::<u8>(), 0..300)
        ) {
            if let Ok(entry) = Entry::decode(&bytes) {
                prop_assert_eq!(Entry::decode(&entry.encode()), Ok(entry));
            }
        }
    }

    #[test]
    fn presence_entries_refuse_flags_and_states_they_do_not_know() {
        let watch = Entry::PresenceWatch {
            watcher: UserId(1),
            target: UserId(2),
            on: true,
        };
        let mut bytes = watch.encode().to_vec();
        *bytes.last_mut().unwrap() = 2;
        assert_eq!(Entry::decode(&bytes), Err(EntryError::BadFlag(2)));
        let state = Entry::PresenceState {
            watcher: UserId(1),
            target: UserId(2),
            seen: Seen::Asking,
        };
        let mut bytes = state.encode().to_vec();
        assert_eq!(Entry::decode(&bytes), Ok(state));
        *bytes.last_mut().unwrap() = 7;
        assert_eq!(Entry::decode(&bytes), Err(EntryError::BadFlag(7)));
        assert_eq!(
            Entry::decode(&[ENTRY_VERSION, KIND_PRESENCE_RESET, 0]),
            Err(EntryError::Trailing)
        );
    }

    #[test]
    fn key_package_entries_refuse_counts_and_packages_over_their_bounds() {
        let request = |users: usize| {
            let mut bytes = vec![ENTRY_VERSION, KIND_KEY_PACKAGE_REQUEST];
            bytes.extend_from_slice(&7u64.to_be_bytes());
            bytes.extend_from_slice(&[1; 16]);
            bytes.push(users as u8);
            bytes.extend(std::iter::repeat_n(2u8, users * 16));
            bytes
        };
        assert!(matches!(
            Entry::decode(&request(FETCH_USERS_MAX)),
            Ok(Entry::KeyPackageRequest { users, .. }) if users.len() == FETCH_USERS_MAX
        ));
        assert_eq!(
            Entry::decode(&request(FETCH_USERS_MAX + 1)),
            Err(EntryError::TooLong)
        );
        let answer = |devices: usize, len: usize| {
            let mut bytes = vec![ENTRY_VERSION, KIND_KEY_PACKAGES];
            bytes.extend_from_slice(&7u64.to_be_bytes());
            bytes.push(0);
            bytes.push(devices as u8);
            for _ in 0..devices {
                bytes.extend_from_slice(&[3; 32]);
                bytes.push(0);
                bytes.extend_from_slice(&(len as u16).to_be_bytes());
                bytes.extend(std::iter::repeat_n(4u8, len));
            }
            bytes.push(0);
            bytes
        };
        assert!(Entry::decode(&answer(FETCH_DEVICES_MAX, 10)).is_ok());
        assert!(Entry::decode(&answer(1, FETCHED_PACKAGE_BYTES_MAX)).is_ok());
        assert_eq!(
            Entry::decode(&answer(FETCH_DEVICES_MAX + 1, 10)),
            Err(EntryError::TooLong)
        );
        assert_eq!(
            Entry::decode(&answer(1, FETCHED_PACKAGE_BYTES_MAX + 1)),
            Err(EntryError::TooLong)
        );
        // The largest answer fits a link entry, with room for a bundle around it.
        let largest = Entry::KeyPackages {
            request: 1,
            answer: FetchAnswer::Found {
                packages: vec![
                    ForeignPackage {
                        user: UserId(1),
                        device: DeviceId(2),
                        package: Bytes::from(vec![0; FETCHED_PACKAGE_BYTES_MAX]),
                        last_resort: false,
                    };
                    FETCH_DEVICES_MAX
                ],
                exhausted: vec![DeviceId(3); FETCH_DEVICES_MAX],
            },
        };
        assert!(largest.encode().len() <= crate::gateway::outgoing::STAGED_BYTES_MAX);
    }

    #[test]
    fn a_relay_keeps_its_first_format_unless_it_carries_a_commits_parts() {
        let plain = Entry::Relay {
            conversation: ConversationId(1),
            sender: DeviceId(2),
            msg_id: MsgId(3),
            after: None,
            body: Bytes::from_static(b"m"),
            welcome: None,
            vouched: Vec::new(),
        };
        let bytes = plain.encode();
        assert_eq!(
            bytes[1], KIND_RELAY,
            "a gateway of the first format reads it"
        );
        let Entry::Relay { body, .. } = plain.clone() else {
            unreachable!()
        };
        let commit = Entry::Relay {
            conversation: ConversationId(1),
            sender: DeviceId(2),
            msg_id: MsgId(3),
            after: None,
            body,
            welcome: Some(Bytes::from_static(b"w")),
            vouched: vec![(DeviceId(4), UserId(5))],
        };
        let bytes = commit.encode();
        assert_eq!(bytes[1], KIND_RELAY_COMMIT);
        assert_eq!(Entry::decode(&bytes), Ok(commit));
        // More vouched devices than a commit adds: refused before they are read.
        let mut long = bytes[..bytes.len() - 34].to_vec();
        long.extend_from_slice(&((RELAY_VOUCHED_MAX + 1) as u16).to_be_bytes());
        assert_eq!(Entry::decode(&long), Err(EntryError::TooLong));
        // Fewer than it says: truncated, not a panic.
        let mut short = bytes.to_vec();
        short.truncate(short.len() - 1);
        assert_eq!(Entry::decode(&short), Err(EntryError::Truncated));
        // A welcome flag that is neither 0 nor 1.
        let mut flag = bytes[..bytes.len() - 34 - 5 - 1].to_vec();
        flag.push(2);
        assert_eq!(Entry::decode(&flag), Err(EntryError::BadFlag(2)));
    }

    #[test]
    fn a_text_is_not_an_entry_and_counts_are_bounded() {
        assert_eq!(
            Entry::decode(b"gwa -> gwb #1"),
            Err(EntryError::NotAnEntry(b'g'))
        );
        let mut open = vec![ENTRY_VERSION, KIND_OPEN];
        open.extend_from_slice(&[0; 16]);
        open.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(Entry::decode(&open), Err(EntryError::TooLong));
        let mut open = vec![ENTRY_VERSION, KIND_OPEN];
        open.extend_from_slice(&[0; 16]);
        open.extend_from_slice(&5u32.to_be_bytes());
        open.extend_from_slice(&[0; 16]);
        assert_eq!(Entry::decode(&open), Err(EntryError::Truncated));
    }

    #[test]
    fn a_crl_over_its_bound_is_refused_before_anything_is_read() {
        let mut revocations = vec![ENTRY_VERSION, KIND_REVOCATIONS];
        revocations.extend_from_slice(&[3; 32]);
        revocations.extend_from_slice(&(REVOCATIONS_CRL_MAX as u32 + 1).to_be_bytes());
        assert_eq!(Entry::decode(&revocations), Err(EntryError::TooLong));
        let entry = Entry::Revocations {
            root: DevicePublicKey([3; 32]),
            crl: Bytes::from(vec![9; REVOCATIONS_CRL_MAX]),
        };
        assert_eq!(Entry::decode(&entry.encode()), Ok(entry.clone()));
        assert_eq!(entry.conversation(), None);
        let mut trailing = entry.encode().to_vec();
        trailing.push(0);
        assert_eq!(Entry::decode(&trailing), Err(EntryError::Trailing));
    }

    #[test]
    fn bundles_are_bounded_and_never_nested() {
        let inner = Entry::Following {
            conversation: ConversationId(1),
            term: 2,
            head: 3,
        };
        let bundle = Entry::Bundle {
            entries: vec![inner.clone(), inner.clone()],
            signature: None,
        };
        assert_eq!(Entry::decode(&bundle.encode()), Ok(bundle.clone()));
        assert_eq!(bundle.conversation(), None);
        // A bundle in a bundle.
        let inside = bundle.encode();
        let mut nested = vec![ENTRY_VERSION, KIND_BUNDLE, 0, 0, 1];
        nested.extend_from_slice(&(inside.len() as u32).to_be_bytes());
        nested.extend_from_slice(&inside);
        assert_eq!(Entry::decode(&nested), Err(EntryError::Nested));
        // A count over the bound is refused before anything is read.
        let mut many = vec![ENTRY_VERSION, KIND_BUNDLE, 0];
        many.extend_from_slice(&(BUNDLE_ENTRIES_MAX as u16 + 1).to_be_bytes());
        assert_eq!(Entry::decode(&many), Err(EntryError::TooLong));
        // A count the bytes cannot hold.
        let mut short = vec![ENTRY_VERSION, KIND_BUNDLE, 0];
        short.extend_from_slice(&1000u16.to_be_bytes());
        short.extend_from_slice(&[0; 100]);
        assert_eq!(Entry::decode(&short), Err(EntryError::Truncated));
        // A bad signature flag.
        let mut flag = bundle.encode().to_vec();
        flag[2] = 2;
        assert_eq!(Entry::decode(&flag), Err(EntryError::BadFlag(2)));
        // An inner entry that is not one.
        let bad = encode_bundle(&[Bytes::from_static(b"text")], None);
        assert_eq!(Entry::decode(&bad), Err(EntryError::NotAnEntry(b't')));
        // Its header is what BUNDLE_HEADER_BYTES says, with a signature.
        let parts = [inner.encode()];
        let signed = encode_bundle(&parts, Some([1; 64]));
        assert_eq!(
            signed.len(),
            BUNDLE_HEADER_BYTES + BUNDLE_ENTRY_OVERHEAD + parts[0].len()
        );
    }

    #[test]
    fn a_bundle_statement_covers_every_sequenced_entry_and_its_order() {
        let one = sequenced_statement(ConversationId(1), 1, 0, DeviceId(2), MsgId(3), b"a");
        let two = sequenced_statement(ConversationId(1), 2, 0, DeviceId(2), MsgId(4), b"b");
        let both = bundle_statement(&[one, two]);
        assert_ne!(both, bundle_statement(&[two, one]));
        assert_ne!(both, bundle_statement(&[one]));
        assert_ne!(bundle_statement(&[]), bundle_statement(&[one]));
        let entry = Entry::Sequenced {
            conversation: ConversationId(1),
            seq: 1,
            epoch: 0,
            sender: DeviceId(2),
            msg_id: MsgId(3),
            chained: true,
            body: Bytes::from_static(b"a"),
        };
        assert_eq!(statement_of(&entry), Some(one));
        assert_eq!(
            statement_of(&Entry::Following {
                conversation: ConversationId(1),
                term: 1,
                head: 1
            }),
            None
        );
    }

    #[test]
    fn a_long_refusal_message_is_cut_at_a_character_boundary() {
        let entry = Entry::Answer {
            conversation: ConversationId(1),
            sender: DeviceId(2),
            msg_id: MsgId(3),
            outcome: Outcome::Refused {
                code: ErrorCode::NotMember,
                message: "é".repeat(ANSWER_MESSAGE_MAX),
                after: None,
            },
        };
        let Ok(Entry::Answer {
            outcome: Outcome::Refused { message, .. },
            ..
        }) = Entry::decode(&entry.encode())
        else {
            panic!("reads back");
        };
        assert_eq!(message.len(), ANSWER_MESSAGE_MAX);
    }
}
