//! MLS conversations with members of other domains (issue 15, step 3), as `impl Gateway`.
//!
//! - **At the authority** (the gateway that sequences the conversation, where it was made): a
//!   commit may add devices of another domain that this gateway learned of from that domain's
//!   KeyPackage answer (`foreign_fetch`): their user is what their gateway said, and a device
//!   its own domain revoked is refused. Once sequenced, such devices are not members here:
//!   the conversation spans domains (`spanning`), their gateway gets the commit's Welcome
//!   ([`Entry::Welcome`]) before the commit itself, and every message after, as for a plain
//!   conversation spanning domains.
//! - **At a member gateway**: a Welcome from a conversation's authority makes this gateway
//!   keep a replica of it (as `Entry::Open` does for a plain one), puts the Welcome in each
//!   named device's inbox and starts it reading after the commit that added it. What its
//!   devices send there is relayed to the authority, which admits an application message as
//!   it would its own devices' (the epoch must be the group's).
//!
//! Not built yet, and refused in words: commits by another domain's members (a relayed
//! message carries no Welcome), and removing another domain's members.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::foreign_fetch::ForeignFetches;
use super::registry::Registry;
use super::{Gateway, Refusal};
use crate::federation::entry::{Entry, Outcome, OPEN_MEMBERS_MAX};
use crate::gateway::groups::Change;
use crate::gateway::outgoing::STAGED_BYTES_MAX;
use crate::ids::{ConversationId, DeviceId, MsgId, UserId};
use crate::mls::commit_authority::{read_message, Kind};
use crate::mls::group_ops::GroupKind;
use crate::time::Instant;
use crate::wire::payload::ErrorCode;
use crate::wire::Routing;

/// What a Welcome entry adds to the Welcome's bytes, at most (its fixed fields and the
/// devices it names, at 16 bytes each).
const WELCOME_ENTRY_OVERHEAD: usize = 64;

/// The user of a group's member device: one registered here, or another domain's as its own
/// gateway said (what commits adding it are checked against).
pub(super) fn member_user(
    registry: &Registry,
    foreign: &ForeignFetches,
    device: DeviceId,
) -> Option<UserId> {
    registry
        .user_of(device)
        .or_else(|| foreign.foreign_device(device).map(|(user, _)| user))
}

impl Gateway {
    /// The domain of `device` if it is another domain's that this gateway learned of (a
    /// device registered here is never foreign).
    fn foreign_domain(&self, device: DeviceId) -> Option<&str> {
        if self.registry.user_of(device).is_some() {
            return None;
        }
        self.foreign_fetches
            .foreign_device(device)
            .map(|(_, domain)| domain)
    }

    /// Checks the part of an admitted commit that concerns other domains' devices: each one
    /// added is known from its gateway's answer and not revoked by its domain, the Welcome
    /// fits the link, and none is removed (not built yet).
    pub(super) fn check_foreign_change(
        &self,
        conv: ConversationId,
        msg_id: MsgId,
        change: &Change,
        welcome: Option<&Bytes>,
    ) -> Result<(), Refusal> {
        let refuse = |code: ErrorCode, message: String| {
            let routing = Routing {
                conversation: conv,
                ..Routing::default()
            };
            Refusal::error(code, message)
                .in_conversation(routing)
                .about(msg_id)
        };
        let mut added = 0usize;
        for (device, _, _) in &change.added {
            // The groups' check refused devices nobody named already.
            let Some(domain) = self.foreign_domain(*device) else {
                continue;
            };
            added += 1;
            if self.peer_crls.revokes(domain, *device) {
                return Err(refuse(
                    ErrorCode::Forbidden,
                    format!("device {device} was revoked by {domain} and cannot be added"),
                ));
            }
            if !self.federation.as_ref().is_some_and(|f| f.is_peer(domain)) {
                return Err(refuse(
                    ErrorCode::UnknownDomain,
                    format!("device {device} is of {domain}, which this gateway no longer federates with"),
                ));
            }
        }
        if added > OPEN_MEMBERS_MAX {
            return Err(refuse(
                ErrorCode::InvitationTooLarge,
                format!("a commit adds at most {OPEN_MEMBERS_MAX} devices of other domains"),
            ));
        }
        if added > 0
            && welcome
                .is_some_and(|w| w.len() + WELCOME_ENTRY_OVERHEAD + 16 * added > STAGED_BYTES_MAX)
        {
            return Err(refuse(
                ErrorCode::InvitationTooLarge,
                "the Welcome is too large to cross to another domain's gateway: add fewer devices at once".into(),
            ));
        }
        if let Some(device) = change
            .removed
            .iter()
            .find(|d| self.foreign_domain(**d).is_some())
        {
            return Err(refuse(
                ErrorCode::Forbidden,
                format!("device {device} is of another domain, and removing other domains' members is not built yet"),
            ));
        }
        Ok(())
    }

    /// Splits an applied change into what concerns this gateway's devices and the devices
    /// of other domains it adds, by domain.
    pub(super) fn split_foreign(
        &self,
        mut change: Change,
    ) -> (Change, BTreeMap<String, Vec<DeviceId>>) {
        let mut foreign: BTreeMap<String, Vec<DeviceId>> = BTreeMap::new();
        change
            .added
            .retain(|(device, _, _)| match self.foreign_domain(*device) {
                Some(domain) => {
                    foreign.entry(domain.to_string()).or_default().push(*device);
                    false
                }
                None => true,
            });
        (change, foreign)
    }

    /// A commit sequenced at `seq` added `foreign` devices: their gateways get the Welcome
    /// (before the commit, which the fan-out sends next) and keep a replica from now on.
    pub(super) fn welcome_abroad(
        &mut self,
        conv: ConversationId,
        seq: u64,
        kind: u8,
        welcome: &Bytes,
        foreign: BTreeMap<String, Vec<DeviceId>>,
    ) {
        for (domain, devices) in foreign {
            let entry = Entry::Welcome {
                conversation: conv,
                seq,
                kind,
                devices: devices.clone(),
                welcome: welcome.clone(),
            };
            // Checked when admitted: a configured peer, an entry that fits.
            if self.send_entry(&domain, &entry).is_err() {
                self.spanning_stats.welcomes_unsent += 1;
                continue;
            }
            self.spanning_stats.welcomes_sent += 1;
            let shared = self
                .spanning
                .share(conv, &domain, &devices, self.fx.writes());
            debug_assert!(shared, "a conversation sequenced here is homed here");
        }
    }

    /// A Welcome from `peer` for devices of this gateway: a replica of the conversation is
    /// kept from now on (if `peer` is its authority, or it is new here), and each device
    /// gets the Welcome and reads after `seq`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_welcome_entry(
        &mut self,
        now: Instant,
        peer: &str,
        conv: ConversationId,
        seq: u64,
        kind: u8,
        devices: Vec<DeviceId>,
        welcome: Bytes,
    ) {
        let local = self.delivery.contains(conv) && self.spanning.role(conv).is_none();
        let Some(kind) = GroupKind::from_u8(kind) else {
            self.spanning_stats.entries_refused += 1;
            return;
        };
        if local || !self.spanning.follow(conv, peer, self.fx.writes()) {
            self.spanning_stats.entries_refused += 1;
            return;
        }
        let ours: Vec<DeviceId> = devices
            .into_iter()
            .filter(|d| self.registry.user_of(*d).is_some())
            .collect();
        self.delivery.ensure_log(conv);
        self.delivery.welcome_from_authority(
            now,
            conv,
            seq,
            kind,
            &welcome,
            &ours,
            &self.sessions,
            &mut self.fx,
        );
        self.spanning_stats.welcomes_taken += 1;
    }

    /// At the authority: whether a relayed message to an MLS conversation is admitted as its
    /// sender's own gateway would admit it here (`None`), or its refusal.
    pub(super) fn admit_relayed_group_message(
        &mut self,
        conv: ConversationId,
        sender: DeviceId,
        msg_id: MsgId,
        body: &[u8],
    ) -> Option<Outcome> {
        if !self.groups.contains(conv) {
            return None;
        }
        let refused = |code, message: String| {
            Some(Outcome::Refused {
                code,
                message,
                after: None,
            })
        };
        match read_message(body) {
            Ok((framing, _)) if framing.kind == Kind::Commit => {
                return refused(
                    ErrorCode::Forbidden,
                    "group changes by members of another domain than the conversation's home are not built yet".into(),
                );
            }
            Ok(_) => {}
            Err(e) => return refused(ErrorCode::InvalidGroupMessage, e.to_string()),
        }
        let duplicate = self
            .delivery
            .log(conv)
            .and_then(|log| log.duplicate_of(sender, msg_id))
            .is_some();
        let (registry, foreign) = (&self.registry, &self.foreign_fetches);
        let admitted = self.groups.admit(
            sender,
            conv,
            msg_id,
            body,
            None,
            duplicate,
            true,
            &|d| member_user(registry, foreign, d),
            None,
        );
        match admitted {
            Ok(_) => None,
            Err(refusal) if refusal.code == ErrorCode::StaleEpoch => Some(Outcome::Stale {
                message: refusal.message,
                epoch: refusal.routing.epoch,
            }),
            Err(refusal) => refused(refusal.code, refusal.message),
        }
    }
}
