//! Refusals: the errors and goodbyes the gateway sends, decided by sub-machines and sent and
//! counted by the router alone; and the gateway's counters.

use super::delivery::DeliveryStats;
use super::groups::GroupStats;
use super::key_packages::KeyPackageStats;
use super::limits::LimitStats;
use super::presence::PresenceStats;
use super::registry::RegistryStats;
use super::session::SessionStats;
use super::social::SocialStats;
use super::transfers::TransferStats;
use crate::ids::{ConversationId, MsgId};
use crate::wire::payload::ErrorCode;
use crate::wire::Routing;

/// Slots of [`RefusalCounts`]: one per error code value (codes are below 64; a unit test
/// checks every known code fits).
const ERROR_CODE_SLOTS: usize = 64;

/// Errors and goodbyes sent, by code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefusalCounts([u64; ERROR_CODE_SLOTS]);

impl Default for RefusalCounts {
    fn default() -> Self {
        RefusalCounts([0; ERROR_CODE_SLOTS])
    }
}

impl RefusalCounts {
    /// How many were sent with `code`.
    pub fn get(&self, code: ErrorCode) -> u64 {
        self.0[usize::from(code as u16)]
    }

    /// How many were sent in all.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Every code sent at least once, with its count, in code order.
    pub fn iter(&self) -> impl Iterator<Item = (ErrorCode, u64)> + '_ {
        (0u16..)
            .zip(self.0)
            .filter(|(_, n)| *n > 0)
            .map(|(code, n)| (ErrorCode::from_u16(code), n))
    }

    pub(super) fn count(&mut self, code: ErrorCode) {
        let slot = usize::from(code as u16);
        assert!(slot < ERROR_CODE_SLOTS, "error codes fit the table");
        self.0[slot] += 1;
    }
}

/// Counters for logs and metrics, one set per sub-machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GatewayStats {
    /// Connections and sessions.
    pub sessions: SessionStats,
    /// Sequencing, delivery and garbage collection.
    pub delivery: DeliveryStats,
    /// Registration, revocation and CRLs.
    pub registry: RegistryStats,
    /// MLS conversations.
    pub groups: GroupStats,
    /// The KeyPackage directory.
    pub key_packages: KeyPackageStats,
    /// File transfers.
    pub transfers: TransferStats,
    /// Rate limits.
    pub limits: LimitStats,
    /// Contacts and blocks.
    pub social: SocialStats,
    /// Presence.
    pub presence: PresenceStats,
    /// Conversations spanning domains.
    pub spanning: super::relay::SpanningStats,
    /// Authority handovers, at either end.
    pub handover: super::handover::HandoverStats,
    /// CRLs exchanged with peer domains.
    pub peer_crls: super::peer_crls::PeerCrlStats,
    /// KeyPackage fetches across domains, at both ends.
    pub foreign_key_packages: super::foreign_fetch::ForeignFetchStats,
    /// Who makes each DM between users of two domains.
    pub dm_claims: super::dm_claims::DmClaimStats,
    /// Entries for peer gateways and the link entries (bundles) that carried them.
    pub outgoing: super::outgoing::OutgoingStats,
    /// Messages held until the gap before them in their sender's order filled.
    pub held_sends: super::held_sends::HeldSendStats,
    /// Errors and goodbyes sent, by code.
    #[serde(skip)]
    pub refusals: RefusalCounts,
}

/// An error or a goodbye for a connection: decided by a sub-machine, sent and counted by
/// `Gateway::refuse` alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub(super) code: ErrorCode,
    pub(super) message: String,
    pub(super) routing: Routing,
    /// As bytes (align 1) to keep `Refusal` small: it travels in every `Result` of the gateway.
    pub(super) msg_id: Option<[u8; 16]>,
    pub(super) detail: Detail,
    pub(super) ends_session: bool,
}

/// What a refusal adds for its code (never both, so one field keeps `Refusal` small; bytes,
/// align 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Detail {
    /// Nothing.
    None,
    /// `sender_out_of_order`: the message the refused one must come after.
    After([u8; 16]),
    /// A rate limit: milliseconds to wait before asking again (little-endian).
    RetryAfterMs([u8; 4]),
}

impl Detail {
    /// The message named, with `sender_out_of_order`.
    pub(super) fn after(self) -> Option<[u8; 16]> {
        match self {
            Detail::After(id) => Some(id),
            _ => None,
        }
    }

    /// The retry hint, with a rate limit.
    pub(super) fn retry_after_ms(self) -> Option<u32> {
        match self {
            Detail::RetryAfterMs(ms) => Some(u32::from_le_bytes(ms)),
            _ => None,
        }
    }
}

impl Refusal {
    /// A request failed; the session stays open.
    pub(crate) fn error(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
            routing: Routing::default(),
            msg_id: None,
            detail: Detail::None,
            ends_session: false,
        }
    }

    /// The gateway ends the session (and closes the connection).
    pub(crate) fn goodbye(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            ends_session: true,
            ..Refusal::error(code, message)
        }
    }

    /// With routing (conversation, and for `stale_epoch` the group's epoch).
    pub(crate) fn in_conversation(self, routing: Routing) -> Refusal {
        Refusal { routing, ..self }
    }

    /// Naming the message the refused one must come after (`sender_out_of_order`).
    pub(crate) fn after(self, last: MsgId) -> Refusal {
        Refusal {
            detail: Detail::After(last.to_bytes()),
            ..self
        }
    }

    /// Telling the device when to ask again (a rate limit's hint, rounded up to whole
    /// milliseconds so that a retry at the hint is never early).
    pub(crate) fn retry_after(self, wait: core::time::Duration) -> Refusal {
        let ms = wait.as_micros().div_ceil(1000);
        let ms = u32::try_from(ms).unwrap_or(u32::MAX);
        Refusal {
            detail: Detail::RetryAfterMs(ms.to_le_bytes()),
            ..self
        }
    }

    /// Naming the message it refuses.
    pub(crate) fn about(self, msg_id: MsgId) -> Refusal {
        Refusal {
            msg_id: Some(msg_id.to_bytes()),
            ..self
        }
    }

    /// Its code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// `authority_moving`: `conversation` is being handed over to `to`'s gateway; the device
    /// sends `msg_id` again after [`super::handover::HANDOVER_RETRY`].
    pub(crate) fn authority_moving(
        conversation: ConversationId,
        msg_id: MsgId,
        to: &str,
    ) -> Refusal {
        let routing = Routing {
            conversation,
            ..Routing::default()
        };
        Refusal::error(ErrorCode::AuthorityMoving, authority_moving_message(to))
            .in_conversation(routing)
            .about(msg_id)
            .retry_after(super::handover::HANDOVER_RETRY)
    }

    /// `sender_out_of_order`: a message of a device in `conversation` names `after` as the
    /// one it comes after, but the last one sequenced from that device is `last`.
    pub(crate) fn out_of_sender_order(
        conversation: ConversationId,
        msg_id: MsgId,
        after: Option<MsgId>,
        last: MsgId,
    ) -> Refusal {
        let routing = Routing {
            conversation,
            ..Routing::default()
        };
        Refusal::error(
            ErrorCode::SenderOutOfOrder,
            out_of_sender_order_message(after, last),
        )
        .in_conversation(routing)
        .about(msg_id)
        .after(last)
    }
}

/// What a device hears when its message names `after` but the last one sequenced from it is
/// `last` (at its gateway, or at the conversation's home through a relay).
pub(crate) fn out_of_sender_order_message(after: Option<MsgId>, last: MsgId) -> String {
    format!(
        "this message comes after {}, but the last one sequenced from this device here is {last}",
        after.unwrap_or_default()
    )
}

/// What a device hears when its message came ahead of `ahead`, which has not arrived, and the
/// gateway holds it until it does (`sender_out_of_order` with `held`).
pub(crate) fn held_message(ahead: MsgId, last: MsgId) -> String {
    format!(
        "this message comes after {ahead}, which has not arrived (the last one sequenced from this device here is {last}): it is held until that one comes"
    )
}

/// What a device hears when its message's id is all zeros (which means "no message" in
/// sender order).
pub(crate) const ZERO_MESSAGE_ID: &str =
    "a message id of all zeros is reserved: choose a random one";

/// The words of `authority_moving`, wherever the conversation is frozen.
pub(crate) fn authority_moving_message(to: &str) -> String {
    format!("this conversation's authority is moving to {to}; the message was not stored, send it again shortly")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_has_a_slot() {
        let mut counts = RefusalCounts::default();
        for value in 0..=u16::MAX {
            let code = ErrorCode::from_u16(value);
            if code as u16 == value {
                counts.count(code);
                assert_eq!(counts.get(code), 1, "{code:?}");
            }
        }
    }
}
