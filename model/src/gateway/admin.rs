//! The operator's commands: inputs like any other, whose answers leave as outputs released by
//! the commit that makes them true (a token printed is a token stored; a CRL version shown is
//! a CRL on disk).

use super::{Gateway, GatewayInput, GatewayOutput};
use crate::address::Address;
use crate::env::{Store, StoreError};
use crate::ids::{ConversationId, DeviceId};
use crate::time::Instant;
use crate::trust::EnrolmentToken;

/// A command of the gateway's operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminCommand {
    /// A one-time token that lets one new device of this user register: a user name of this
    /// gateway's domain, or a whole address in it (`alice` or `alice@a.example`; another
    /// domain's users are enrolled by their own gateway).
    IssueEnrolmentToken(String),
    /// Revoke a device: a new CRL goes to every connected device, the device's sessions close,
    /// it never opens another, and the gateway proposes its removal from each of its groups.
    RevokeDevice(DeviceId),
    /// Remove a device from an MLS conversation (the gateway proposes it as the group's
    /// external sender; the next committing member commits it).
    RemoveDevice(ConversationId, DeviceId),
    /// Create a plain conversation with these member devices (idempotent; members are added;
    /// an empty list creates nothing).
    CreateConversation(ConversationId, Vec<DeviceId>),
    /// Share a plain conversation homed here with these member devices of another domain:
    /// that domain's gateway (a federation peer) keeps a replica for them, and relays their
    /// messages here to be sequenced (idempotent; members are added).
    ShareConversation {
        /// The conversation, homed here.
        conversation: ConversationId,
        /// The peer's domain.
        domain: String,
        /// Its member devices.
        members: Vec<DeviceId>,
    },
    /// Hand the authority of `conversation`, homed here, over to the gateway of `to`, which
    /// keeps a replica of it: the log freezes (sends are answered `authority_moving`) until
    /// `to` takes it over or declines (issue 15, step 5; see `gateway::handover`).
    Handover {
        /// The conversation, homed here.
        conversation: ConversationId,
        /// The domain whose gateway becomes its authority.
        to: String,
    },
    /// Make the enrolment token or pairing code with this id
    /// ([`crate::trust::token_id`]) expire now.
    ExpireToken([u8; 8]),
}

/// The answer to an [`AdminCommand`], released with the commit that holds its effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminAnswer {
    /// The token to hand to the new device (`EnrolmentToken::to_text`), for this address.
    EnrolmentToken(EnrolmentToken, Address),
    /// No token: the user is not one this gateway enrols; `why` says what to do.
    EnrolmentRefused {
        /// Why, in words.
        why: String,
    },
    /// The device is revoked in this CRL version (newly, or `already` before).
    Revoked {
        /// The device.
        device: DeviceId,
        /// The CRL version that lists it.
        crl_version: u64,
        /// True if it was revoked before this command.
        already: bool,
    },
    /// The device has no certificate from this gateway: nothing to revoke.
    UnknownDevice(DeviceId),
    /// The removal is proposed (or was already) in the group.
    RemovalRequested {
        /// The conversation.
        conversation: ConversationId,
        /// The device.
        device: DeviceId,
    },
    /// The device is not a member of that MLS conversation.
    NotInGroup {
        /// The conversation.
        conversation: ConversationId,
        /// The device.
        device: DeviceId,
    },
    /// The token expired now (or had already): as it was before.
    TokenExpired(crate::trust::TokenSummary),
    /// No token has that id (never issued, or expired and forgotten).
    UnknownToken([u8; 8]),
    /// The conversation is shared with this many member devices of `domain`.
    ConversationShared {
        /// The conversation.
        conversation: ConversationId,
        /// The peer's domain.
        domain: String,
        /// Member devices of that domain named by the command.
        members: usize,
    },
    /// The conversation was not shared; `why` says what to do.
    ShareRefused {
        /// The conversation.
        conversation: ConversationId,
        /// Why, in words.
        why: String,
    },
    /// The conversation is frozen at `last_seq` and offered to `to`'s gateway; it is the
    /// authority once it has signed (`admin list` shows "moving to" until then).
    HandoverStarted {
        /// The conversation.
        conversation: ConversationId,
        /// The domain it is handed to.
        to: String,
        /// The last seq sequenced here.
        last_seq: u64,
    },
    /// The conversation was not handed over; `why` says what to do.
    HandoverRefused {
        /// The conversation.
        conversation: ConversationId,
        /// Why, in words.
        why: String,
    },
    /// The plain conversation exists with this many member devices.
    ConversationCreated {
        /// The conversation.
        conversation: ConversationId,
        /// Its member devices now.
        members: usize,
    },
}

impl Gateway {
    /// Carries out an operator's command; its answer (tagged `request`) is released with the
    /// commit of its writes.
    pub(super) fn admin(&mut self, now: Instant, request: u64, command: AdminCommand) {
        let answer = match command {
            AdminCommand::IssueEnrolmentToken(user) => {
                let domain = self.registry.authority().root().domain.clone();
                match Address::parse(&user, &domain) {
                    Err(e) => AdminAnswer::EnrolmentRefused { why: e.to_string() },
                    Ok(address) if address.domain() != domain => AdminAnswer::EnrolmentRefused {
                        why: format!(
                            "{address} is a user of {}, and this gateway enrols users of {domain}: its own gateway's operator issues tokens for it",
                            address.domain()
                        ),
                    },
                    Ok(address) => {
                        let token = self.registry.issue_enrolment_token(
                            now,
                            address.user(),
                            self.entropy.as_mut(),
                            self.fx.writes(),
                        );
                        AdminAnswer::EnrolmentToken(token, address)
                    }
                }
            }
            AdminCommand::RevokeDevice(device) => {
                let known = self.registry.authority().certificate_of(device).is_some();
                if !known {
                    AdminAnswer::UnknownDevice(device)
                } else {
                    let already = self.registry.crl().revoked.contains(&device);
                    self.revoke(now, device);
                    AdminAnswer::Revoked {
                        device,
                        crl_version: self.registry.crl().version,
                        already,
                    }
                }
            }
            AdminCommand::RemoveDevice(conversation, device) => {
                let member = self
                    .groups
                    .get(conversation)
                    .is_some_and(|g| g.devices().contains_key(&device));
                if member {
                    self.propose_removal(now, conversation, device);
                    AdminAnswer::RemovalRequested {
                        conversation,
                        device,
                    }
                } else {
                    AdminAnswer::NotInGroup {
                        conversation,
                        device,
                    }
                }
            }
            AdminCommand::CreateConversation(conversation, members) => {
                let (_, members) = self.split_revoked(&members);
                self.delivery
                    .add_plain_members(now, conversation, &members, self.fx.writes());
                // A member online now reads what the conversation holds at once.
                self.delivery
                    .pump_members(now, conversation, &self.sessions, &mut self.fx);
                let members = self
                    .delivery
                    .log(conversation)
                    .map_or(0, |log| log.members().len());
                AdminAnswer::ConversationCreated {
                    conversation,
                    members,
                }
            }
            AdminCommand::ShareConversation {
                conversation,
                domain,
                members,
            } => self.share_conversation(conversation, &domain, members),
            AdminCommand::Handover { conversation, to } => {
                self.start_handover(now, conversation, &to)
            }
            AdminCommand::ExpireToken(id) => {
                match self.registry.expire_token(now, id, self.fx.writes()) {
                    Some(token) => AdminAnswer::TokenExpired(token),
                    None => AdminAnswer::UnknownToken(id),
                }
            }
        };
        self.fx.hold(GatewayOutput::Admin { request, answer });
    }

    /// Runs an operator's command synchronously: handles it, commits everything pending into
    /// `store`, and returns its answer (released by that commit) with the other outputs the
    /// commit released. For a stopped gateway (the offline `sund-gateway admin`), set-up code
    /// and tests.
    pub fn run_admin(
        &mut self,
        now: Instant,
        command: AdminCommand,
        store: &mut dyn Store,
    ) -> Result<(AdminAnswer, Vec<GatewayOutput>), StoreError> {
        const REQUEST: u64 = u64::MAX;
        self.handle(
            now,
            GatewayInput::Admin {
                request: REQUEST,
                command,
            },
        );
        let mut answer = None;
        let mut others = Vec::new();
        while let Some(ready) = self.poll_ready() {
            for output in ready.commit(store)? {
                match output {
                    GatewayOutput::Admin {
                        request: REQUEST,
                        answer: a,
                    } => answer = Some(a),
                    other => others.push(other),
                }
            }
        }
        let answer = answer.expect("every admin command is answered in its own batch");
        Ok((answer, others))
    }
}
