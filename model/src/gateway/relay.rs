//! Routing for conversations that span domains (issue 15, step 3; roles in [`super::spanning`],
//! entries in [`crate::federation::entry`]).
//!
//! - At a **member gateway**, a device's message to a conversation homed elsewhere is checked
//!   here as any message is (member of the replica, rate limits), then relayed to the
//!   authority; the device's acknowledgement (or refusal) is the authority's answer, passed
//!   on. Nothing is sequenced here: the replica only takes what the authority sequenced, in
//!   its order, and serves this gateway's devices from it.
//! - At the **authority**, a relayed message goes through the same sender-order check,
//!   deduplication and sequencing as a local one; every message sequenced in a conversation
//!   with members elsewhere goes to each of their gateways in the same commit.
//!
//! Entries ride the federation links, which hand each on once and in order, durably on both
//! sides: what a gateway does with an entry commits with the cursor that marks it received.

use bytes::Bytes;

use super::refusal::{out_of_sender_order_message, ZERO_MESSAGE_ID};
use super::{AdminAnswer, Gateway, GatewayOutput, Refusal, Taken};
use crate::federation::entry::{
    bundle_statement, sequenced_statement, statement_of, Entry, Outcome, OPEN_MEMBERS_MAX,
    RELAY_VOUCHED_MAX,
};
use crate::gateway::sender_order;
use crate::gateway::sequencer::Appended;
use crate::ids::{ConnectionId, ConversationId, DeviceId, MsgId, UserId};
use crate::mls::commit_authority::{read_message, Kind};
use crate::mls::group_ops::GroupOps;
use crate::time::Instant;
use crate::wire::payload::{ContactAction, ErrorCode, Payload, Send, SendAck};
use crate::wire::Routing;

/// Counters of conversations spanning domains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpanningStats {
    /// Devices' messages relayed to another domain's gateway.
    pub relayed: u64,
    /// Copies of messages a device sent again while their relay still waited for its answer
    /// (not queued again).
    pub relays_coalesced: u64,
    /// Relayed messages this gateway (the authority) sequenced or answered as copies.
    pub relays_taken: u64,
    /// Relayed messages this gateway (the authority) refused.
    pub relays_refused: u64,
    /// Relayed messages this gateway (the authority) refused for now because their peer
    /// gateway relayed more than its limit (`peer_limited`, also counted in the limits).
    pub relays_limited: u64,
    /// Of those, relays that came before the hint an earlier refusal gave the same sender in
    /// the same conversation, well after that refusal: their peer ignores its hints, and its
    /// link's reading was paused (`gateway::peer_hints`).
    pub relays_past_hint: u64,
    /// Messages of this gateway's devices not relayed because the conversation's authority
    /// had told the device to wait (`peer_limited`) and its time had not come: refused here
    /// with the time left.
    pub relays_held: u64,
    /// Commits of this gateway's devices not relayed because they add a device of a user who
    /// blocked the sender's user (`forbidden`, as the conversation's home would answer).
    pub relays_blocked: u64,

    /// Sequenced messages sent to member gateways.
    pub fanned_out: u64,
    /// Answers from an authority passed on to a device online here.
    pub answers_passed: u64,
    /// Sequenced messages whose signature was not the authority's link key's.
    pub signatures_refused: u64,
    /// Welcomes and removal notices of a new authority held until this gateway's replica
    /// caught up with the old one (`held_entries`).
    pub entries_held: u64,
    /// Welcomes sent to member gateways for their devices an MLS commit added here.
    pub welcomes_sent: u64,
    /// Welcomes that could not be queued for a member gateway (its link refused the entry).
    pub welcomes_unsent: u64,
    /// Welcomes from an authority put in this gateway's devices' inboxes.
    pub welcomes_taken: u64,
    /// Commits relayed from member gateways that this gateway (the authority) sequenced.
    pub commits_relayed: u64,
    /// Removals of member gateways' devices told to those gateways.
    pub removals_sent: u64,
    /// Removals of this gateway's devices an authority told of.
    pub removals_taken: u64,
    /// Entries that did not decode.
    pub entries_malformed: u64,
    /// Entries refused: from a gateway that is not the conversation's authority, or about a
    /// conversation this gateway does not hold in that role.
    pub entries_refused: u64,
    /// Devices of another domain dropped from a plain conversation homed here once their
    /// domain's CRL revoked them.
    pub revoked_unshared: u64,
}

/// A message a member gateway relayed, as its entry carried it.
pub(super) struct Relayed {
    sender: DeviceId,
    msg_id: MsgId,
    after: Option<MsgId>,
    body: Bytes,
    welcome: Option<Bytes>,
    vouched: Vec<(DeviceId, UserId)>,
}

/// The devices an MLS commit in `body` declares it adds, with their declared users; empty
/// for any other message. A declaration that does not decode is the authority's to refuse.
fn added_by_commit(body: &[u8]) -> Vec<(DeviceId, UserId)> {
    let Ok((framing, aad)) = read_message(body) else {
        return Vec::new();
    };
    if framing.kind != Kind::Commit {
        return Vec::new();
    }
    GroupOps::decode(&aad).map_or_else(|_| Vec::new(), |ops| ops.added_devices().collect())
}

impl Gateway {
    /// Operator (or the simulator's set-up): `conv`, homed here, gets these member devices
    /// of `domain`; that domain's gateway is told to keep a replica for them. A conversation
    /// new here is created (with no member device of this gateway yet).
    pub(super) fn share_conversation(
        &mut self,
        conv: ConversationId,
        domain: &str,
        members: Vec<DeviceId>,
    ) -> AdminAnswer {
        let refused = |why: String| AdminAnswer::ShareRefused {
            conversation: conv,
            why,
        };
        if self.groups.contains(conv) {
            return refused("it is an MLS conversation: its members add other domains' users themselves, by commits".into());
        }
        if self.spanning.authority_of(conv).is_some() {
            return refused("the conversation is homed at another gateway".into());
        }
        if let Some(to) = self.spanning.moving_to(conv) {
            return refused(format!(
                "it is being handed over to {to}; share it there once that is done"
            ));
        }
        if members.is_empty() || members.len() > OPEN_MEMBERS_MAX {
            return refused(format!(
                "name 1 to {OPEN_MEMBERS_MAX} member devices of {domain}"
            ));
        }
        if let Some(device) = members.iter().find(|d| self.peer_crls.revokes(domain, **d)) {
            return refused(format!(
                "device {device} was revoked by {domain} (its CRL version {} lists it)",
                self.peer_crls.version(domain)
            ));
        }
        let open = Entry::Open {
            conversation: conv,
            members: members.clone(),
        };
        if let Err(error) = self.send_entry(domain, &open) {
            return refused(error.to_string());
        }
        let shared = self
            .spanning
            .share(conv, domain, &members, self.fx.writes());
        debug_assert!(shared, "checked above");
        self.delivery.ensure_log(conv);
        AdminAnswer::ConversationShared {
            conversation: conv,
            domain: domain.to_string(),
            members: members.len(),
        }
    }

    /// A device of this gateway sent `send` to `conv`, homed at `authority`'s gateway: checked
    /// here, then relayed there.
    pub(super) fn relay_send(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        conv: ConversationId,
        send: Send,
        authority: String,
    ) -> Taken {
        let msg_id = send.msg_id();
        let routing = Routing {
            conversation: conv,
            ..Routing::default()
        };
        if !self
            .delivery
            .log(conv)
            .is_some_and(|log| log.is_member(device))
        {
            // A copy of a message the authority sequenced while the device was a member (its
            // answer was lost to a crash, and the device left since) gets its seq back, as a
            // local device's does: it was sequenced, and must not be reported refused.
            let sequenced = self
                .delivery
                .log(conv)
                .and_then(|log| log.duplicate_of(device, msg_id));
            if let Some(seq) = sequenced {
                let routing = Routing { seq, ..routing };
                let ack = SendAck {
                    msg_id: msg_id.to_bytes(),
                };
                self.fx.send(conn, routing, Payload::SendAck(ack));
                return Taken::Sequenced;
            }
            let refusal = Refusal::error(ErrorCode::NotMember, "not a member of this conversation")
                .in_conversation(routing)
                .about(msg_id);
            self.refuse(conn, refusal);
            return Taken::Refused;
        }
        // Sender order as the authority will check it, as far as this gateway knows it: the
        // replica's last message of the device, or one relayed and not answered yet (then
        // the authority decides). Checked before the rate limit, as for a local message.
        let after = send.after.map(MsgId::from_bytes);
        if let Err(last) = self
            .delivery
            .check_sender_order(conv, device, msg_id, after)
        {
            let waiting = after.is_some_and(|a| self.spanning.relay_pending(conv, device, a));
            if !waiting {
                return match self.hold_ahead(now, conn, device, conv, after, last, send) {
                    Some(taken) => taken,
                    None => {
                        self.refuse(
                            conn,
                            Refusal::out_of_sender_order(conv, msg_id, after, last),
                        );
                        Taken::Refused
                    }
                };
            }
        }
        // The authority told this device to wait in this conversation: what it sends before
        // its time is refused here, with the time left (a copy of a relay still pending is
        // left to the authority's answer to it).
        if let Some(wait) = self
            .held_hints
            .wait(now, device, conv)
            .filter(|_| !self.spanning.relay_pending(conv, device, msg_id))
        {
            self.spanning_stats.relays_held += 1;
            let refusal = Refusal::error(
                ErrorCode::PeerLimited,
                format!("this conversation is homed at {authority}, which asked this device to wait before sending there again"),
            )
            .in_conversation(routing)
            .about(msg_id)
            .retry_after(wait);
            self.refuse(conn, refusal);
            return Taken::Refused;
        }
        if let Err(refusal) = self.charge_message(now, device, conv, msg_id) {
            self.refuse(conn, refusal);
            return Taken::Refused;
        }
        if self.spanning.relay_pending(conv, device, msg_id) {
            // Queued already, on a link that hands it on once: the answer to it comes back.
            self.spanning_stats.relays_coalesced += 1;
            return Taken::Relayed;
        }
        let body = Bytes::from(send.body);
        let added = added_by_commit(&body);
        if self.refuses_relayed_adds(device, &added) {
            // Found here, where the sender's user is known and the blocks of its user by
            // other domains' users were told: the home of a room of a third domain knows
            // neither.
            self.spanning_stats.relays_blocked += 1;
            let refusal = Refusal::error(ErrorCode::Forbidden, super::NOT_ACCEPTED_FROM_YOU)
                .in_conversation(routing)
                .about(msg_id);
            self.refuse(conn, refusal);
            return Taken::Refused;
        }
        let welcome = send.welcome.map(|w| Bytes::from(Vec::from(w)));
        let vouched = self.vouch_for_added(&added);
        let with_welcome = welcome.is_some();
        let relay = Entry::Relay {
            conversation: conv,
            sender: device,
            msg_id,
            after,
            body,
            welcome,
            vouched,
        };
        match self.send_entry(&authority, &relay) {
            Ok(_) => {
                self.spanning.relayed(conv, device, msg_id, &authority);
                self.spanning_stats.relayed += 1;
                Taken::Relayed
            }
            Err(error) => {
                let (code, message) = match error {
                    crate::federation::EnqueueError::TooLarge(_) if with_welcome => (
                        ErrorCode::InvitationTooLarge,
                        format!("this conversation is homed at {authority}, and the Welcome is too large to go there: add fewer devices at once"),
                    ),
                    error => (
                        ErrorCode::Forbidden,
                        format!("this conversation is homed at {authority}, and the message cannot go there: {error}"),
                    ),
                };
                let refusal = Refusal::error(code, message)
                    .in_conversation(routing)
                    .about(msg_id);
                self.refuse(conn, refusal);
                Taken::Refused
            }
        }
    }

    /// For a relayed MLS commit adding `added`: the users of the devices of this gateway's
    /// domain it adds (this gateway is the authority on them; the conversation's authority
    /// is not).
    fn vouch_for_added(&self, added: &[(DeviceId, UserId)]) -> Vec<(DeviceId, UserId)> {
        added
            .iter()
            .filter_map(|&(device, _)| Some((device, self.registry.user_of(device)?)))
            .take(RELAY_VOUCHED_MAX)
            .collect()
    }

    /// True if a commit of `device` (registered here) adding `added` adds a device of a user
    /// who blocked its user: each added device's user as the commit declares it and as this
    /// gateway knows it (its own devices, and other domains' devices their gateways named).
    /// Any device of such a user, member already or not: the directories hand its sender
    /// none of their KeyPackages either.
    fn refuses_relayed_adds(&self, device: DeviceId, added: &[(DeviceId, UserId)]) -> bool {
        let Some(inviter) = self.registry.user_of(device) else {
            return false;
        };
        let (registry, foreign) = (&self.registry, &self.foreign_fetches);
        let users = added.iter().flat_map(|&(device, declared)| {
            [
                Some(declared),
                super::foreign_members::member_user(registry, foreign, device),
            ]
            .into_iter()
            .flatten()
        });
        self.refuses_adds_by(inviter, users)
    }

    /// A message this gateway sequenced at `seq` in `conv`: to each member gateway of another
    /// domain, in the same commit.
    pub(super) fn fan_out(&mut self, conv: ConversationId, seq: u64, chained: bool) {
        let domains: Vec<String> = self
            .spanning
            .fan_out_domains(conv)
            .map(str::to_string)
            .collect();
        if domains.is_empty() {
            return;
        }
        let Some(entry) = self.delivery.log(conv).and_then(|log| log.get(seq)) else {
            return;
        };
        // The group's epoch after the message (0 in a plain conversation).
        let epoch = self.groups.get(conv).map_or(0, |g| g.epoch());
        let statement =
            sequenced_statement(conv, seq, epoch, entry.sender, entry.msg_id, &entry.body);
        let body = Entry::Sequenced {
            conversation: conv,
            seq,
            epoch,
            sender: entry.sender,
            msg_id: entry.msg_id,
            chained,
            body: entry.body.clone(),
        }
        .encode();
        for domain in domains {
            // A configured peer (checked when shared); an entry no larger than the message
            // that made it plus its fixed fields. Signed with the rest of the batch's bundle.
            if self
                .stage_encoded(&domain, body.clone(), Some(statement))
                .is_ok()
            {
                self.spanning_stats.fanned_out += 1;
            }
        }
    }

    /// Takes every entry the links received during the input just handled.
    pub(super) fn take_federated_entries(&mut self, now: Instant) {
        // A root a handshake just proved reaches open sessions before anything the link
        // brings (a Welcome from that domain needs it).
        self.tell_new_peer_roots();
        while let Some((peer, body)) = self
            .federation
            .as_mut()
            .and_then(crate::federation::Federation::take_arrived)
        {
            match Entry::decode(&body) {
                Ok(entry) => self.handle_entry(now, &peer, entry),
                Err(_) => self.spanning_stats.entries_malformed += 1,
            }
        }
    }

    /// One entry from `peer`: a bundle's entries in order, each sequenced message in it
    /// taken only if the bundle's signature by `peer`'s link key covers it.
    pub(super) fn handle_entry(&mut self, now: Instant, peer: &str, entry: Entry) {
        let Entry::Bundle { entries, signature } = entry else {
            // Alone, a sequenced message is not signed: refused below.
            self.take_entry(now, peer, entry, false);
            return;
        };
        let statements: Vec<[u8; 32]> = entries.iter().filter_map(statement_of).collect();
        let signed = !statements.is_empty()
            && signature.is_some_and(|signature| {
                self.federation
                    .as_ref()
                    .and_then(|f| f.peer_key(peer))
                    .is_some_and(|key| key.verify(&bundle_statement(&statements), &signature))
            });
        for entry in entries {
            self.take_entry(now, peer, entry, signed);
        }
    }

    /// One entry from `peer` that is not a bundle; `signed`: a sequenced message's statement
    /// is covered by `peer`'s signature.
    pub(super) fn take_entry(&mut self, now: Instant, peer: &str, entry: Entry, signed: bool) {
        if self.hold_until_caught_up(peer, &entry) {
            return;
        }
        let from_authority = entry
            .conversation()
            .is_some_and(|conv| self.spanning.authority_of(conv) == Some(peer));
        match entry {
            Entry::Open {
                conversation,
                members,
            } => {
                // After a handover this gateway learned of first, the old authority's `Open`
                // comes from it.
                let previous = self
                    .spanning
                    .previous_of(conversation)
                    .filter(|(domain, _)| *domain == peer)
                    .map(|(_, last)| last);
                let known = from_authority || previous.is_some();
                let local = self.delivery.contains(conversation) && !known;
                if local
                    || (previous.is_none()
                        && !self.spanning.follow(conversation, peer, self.fx.writes()))
                {
                    self.spanning_stats.entries_refused += 1;
                    return;
                }
                // A device revoked here is not a member again, whatever the authority had
                // not yet heard.
                let (_, members) = self.split_revoked(&members);
                self.delivery
                    .add_plain_members(now, conversation, &members, self.fx.writes());
                self.delivery
                    .pump_members(now, conversation, &self.sessions, &mut self.fx);
                let head = self.delivery.head(conversation).unwrap_or(0);
                if previous.is_some_and(|last| head >= last) {
                    self.spanning.caught_up(conversation, self.fx.writes());
                    self.follow_authority(conversation);
                    self.release_held(now, conversation);
                }
            }
            Entry::Sequenced {
                conversation,
                seq,
                epoch: _,
                sender,
                msg_id,
                chained,
                body,
            } => {
                // After a handover, the old authority's last messages still come from it.
                let previous = self
                    .spanning
                    .previous_of(conversation)
                    .filter(|(domain, last)| *domain == peer && seq <= *last)
                    .map(|(_, last)| last);
                if !from_authority && previous.is_none() {
                    self.spanning_stats.entries_refused += 1;
                    return;
                }
                if !signed {
                    // The link is authenticated, so this is the authority's own fault: its
                    // seq is not taken, and is marked lost when the next one comes.
                    self.spanning_stats.signatures_refused += 1;
                    return;
                }
                let appended = self.delivery.append_replica(
                    now,
                    conversation,
                    seq,
                    sender,
                    msg_id,
                    chained,
                    body,
                    self.fx.writes(),
                );
                if appended == Ok(true) {
                    self.delivery
                        .pump_members(now, conversation, &self.sessions, &mut self.fx);
                    if chained {
                        // A message of a device here may wait for this one (it came before
                        // the authority's answer reached the replica).
                        self.take_held_behind(now, sender, conversation, msg_id);
                    }
                }
                if previous.is_some_and(|last| seq >= last) {
                    // The replica holds all the old authority sequenced: on to the new one.
                    self.spanning.caught_up(conversation, self.fx.writes());
                    self.follow_authority(conversation);
                    self.release_held(now, conversation);
                }
            }
            Entry::Answer {
                conversation,
                sender,
                msg_id,
                outcome,
            } => {
                // From whoever it was relayed to: the authority then, though it may have
                // handed the conversation over since.
                let asked = self.spanning.relayed_to(conversation, sender, msg_id) == Some(peer);
                if !from_authority && !asked {
                    self.spanning_stats.entries_refused += 1;
                    return;
                }
                self.spanning.answered(conversation, sender, msg_id);
                if let Outcome::Limited {
                    code: ErrorCode::PeerLimited,
                    retry_after_ms,
                    ..
                } = &outcome
                {
                    // Kept here, so that this gateway holds the device to it (another limit,
                    // as on invitations, holds only the commit it refused).
                    let wait = core::time::Duration::from_millis(u64::from(*retry_after_ms));
                    self.held_hints.hold(now, sender, conversation, wait);
                }
                // Offline: the device sends the message again when it is back, and hears
                // the authority's answer to the copy.
                let Some(conn) = self.sessions.online(sender) else {
                    return;
                };
                self.spanning_stats.answers_passed += 1;
                match outcome {
                    Outcome::Sequenced(seq) => {
                        let routing = Routing {
                            conversation,
                            seq,
                            ..Routing::default()
                        };
                        let ack = SendAck {
                            msg_id: msg_id.to_bytes(),
                        };
                        self.fx.send(conn, routing, Payload::SendAck(ack));
                    }
                    Outcome::Refused {
                        code,
                        message,
                        after,
                    } => {
                        let routing = Routing {
                            conversation,
                            ..Routing::default()
                        };
                        let mut refusal = Refusal::error(code, message)
                            .in_conversation(routing)
                            .about(msg_id);
                        if let Some(after) = after {
                            refusal = refusal.after(after);
                        }
                        if code == ErrorCode::AuthorityMoving {
                            refusal = refusal.retry_after(super::handover::HANDOVER_RETRY);
                        }
                        self.refuse(conn, refusal);
                    }
                    Outcome::Stale { message, epoch } => {
                        let routing = Routing {
                            conversation,
                            epoch,
                            ..Routing::default()
                        };
                        let refusal = Refusal::error(ErrorCode::StaleEpoch, message)
                            .in_conversation(routing)
                            .about(msg_id);
                        self.refuse(conn, refusal);
                    }
                    Outcome::Limited {
                        code,
                        message,
                        retry_after_ms,
                    } => {
                        let routing = Routing {
                            conversation,
                            ..Routing::default()
                        };
                        let wait = core::time::Duration::from_millis(u64::from(retry_after_ms));
                        let refusal = Refusal::error(code, message)
                            .in_conversation(routing)
                            .about(msg_id)
                            .retry_after(wait);
                        self.refuse(conn, refusal);
                    }
                }
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
                let relayed = Relayed {
                    sender,
                    msg_id,
                    after,
                    body,
                    welcome,
                    vouched,
                };
                let outcome = self.take_relay(now, peer, conversation, relayed);
                let answer = Entry::Answer {
                    conversation,
                    sender,
                    msg_id,
                    outcome,
                };
                // The peer is configured: it sent this.
                let _ = self.send_entry(peer, &answer);
            }
            Entry::Handover {
                conversation,
                term,
                last_seq,
                epoch,
                members,
                signature,
                mls,
            } => self.on_handover(
                now,
                peer,
                conversation,
                term,
                last_seq,
                epoch,
                members,
                signature,
                mls,
            ),
            Entry::Moved {
                conversation,
                certificate,
            } => self.on_moved(now, peer, conversation, certificate),
            Entry::Following {
                conversation,
                term,
                head,
            } => self.on_following(peer, conversation, term, head),
            Entry::Declined {
                conversation,
                term,
                reason,
            } => self.on_declined(now, peer, conversation, term, reason),
            Entry::Revocations { root, crl } => self.on_peer_crl(now, peer, root, &crl),
            Entry::ExternalKey { key } => {
                self.external_keys.learn(peer, key, self.fx.writes());
            }
            Entry::Contact { from, to, added } => {
                let action = if added {
                    ContactAction::Add
                } else {
                    ContactAction::Remove
                };
                self.on_relation_entry(now, peer, from, to, action);
            }
            Entry::Block { from, to, blocked } => {
                let action = if blocked {
                    ContactAction::Block
                } else {
                    ContactAction::Unblock
                };
                self.on_relation_entry(now, peer, from, to, action);
            }
            Entry::PresenceWatch {
                watcher,
                target,
                on,
            } => self.on_presence_watch(now, peer, watcher, target, on),
            Entry::PresenceReset => self.on_presence_reset(peer),
            Entry::PresenceState {
                watcher,
                target,
                seen,
            } => self.on_presence_state(now, peer, watcher, target, seen),
            Entry::KeyPackageRequest {
                request,
                requester,
                users,
            } => self.on_key_package_request(now, peer, request, requester, users),
            Entry::KeyPackages { request, answer } => {
                self.on_foreign_key_packages(peer, request, answer);
            }
            Entry::Welcome {
                conversation,
                seq,
                kind,
                devices,
                welcome,
            } => self.on_welcome_entry(now, peer, conversation, seq, kind, devices, welcome),
            Entry::Leave {
                conversation,
                device,
            } => self.on_leave_entry(now, peer, conversation, device),
            Entry::DmClaim { conversation } => self.on_dm_claim(now, peer, conversation),
            Entry::DmClaimAnswer {
                conversation,
                answer,
            } => self
                .dm_claims
                .on_answer(now, conversation, peer, answer, self.fx.writes()),
            Entry::Removed {
                conversation,
                seq,
                devices,
            } => {
                // From the authority, or from the old one about a commit it sequenced
                // before the handover whose certificate came first.
                let replica = self.spanning.authority_of(conversation) == Some(peer)
                    || self
                        .spanning
                        .previous_of(conversation)
                        .is_some_and(|(domain, last)| domain == peer && seq <= last);
                if !replica {
                    self.spanning_stats.entries_refused += 1;
                    return;
                }
                self.on_removed_entry(now, conversation, seq, devices);
            }
            Entry::Bundle { .. } => {
                // Bundles are never nested (the decoder refuses them).
                self.spanning_stats.entries_refused += 1;
            }
        }
    }

    /// The authority's handling of a relayed message: what the device will hear.
    fn take_relay(
        &mut self,
        now: Instant,
        peer: &str,
        conv: ConversationId,
        relayed: Relayed,
    ) -> Outcome {
        let admitted = if self.config.planted == Some(crate::planted::PlantedBug::PeerLimitIgnored)
        {
            // Planted by the simulator: never in a real gateway.
            Ok(())
        } else {
            self.limits.admit_peer_relay(now, peer)
        };
        if let Err(limited) = admitted {
            // A peer relaying more than its share: refused before any other work, each
            // relay told when to come again; the operator hears of it once a minute.
            self.spanning_stats.relays_limited += 1;
            if let Some(federation) = &mut self.federation {
                federation.count_relay_limited(peer);
            }
            if self.limits.report_peer_limited(now, peer) {
                self.fx.hold(GatewayOutput::PeerLimited {
                    peer: peer.to_string(),
                    rate: limited.rate,
                });
            }
            // A peer that goes on relaying past its hints has its link's reading paused until
            // the time promised (bounded as a device's session is, and never near the link's
            // idle timeout), so that QUIC's flow control holds it back rather than this gateway
            // decoding and refusing each relay; its other entries wait too, in order, and
            // nothing is dropped. An honest peer's link is never paused: that would hold back
            // its acknowledgements and copies too, and slow its recovery from a backlog.
            let ignores_hints =
                self.peer_hints
                    .refused(now, peer, relayed.sender, conv, limited.retry_after);
            if ignores_hints {
                self.spanning_stats.relays_past_hint += 1;
                if let Some(federation) = &mut self.federation {
                    federation.count_relay_past_hint(peer);
                }
                if let Some((conn, idle_timeout)) =
                    self.federation.as_ref().and_then(|f| f.up_link(peer))
                {
                    let pause = limited
                        .retry_after
                        .max(super::READ_PAUSE_MIN)
                        .min(super::READ_PAUSE_MAX)
                        .min(idle_timeout / 4);
                    self.fx.hold(GatewayOutput::PauseReading(conn, pause));
                    if self.peer_hints.report_due(now, peer) {
                        self.fx.hold(GatewayOutput::PeerIgnoresHints {
                            peer: peer.to_string(),
                            pause,
                        });
                    }
                }
            }
            return Outcome::Limited {
                code: ErrorCode::PeerLimited,
                message: format!(
                    "the conversation's home gateway takes at most {} from {peer}",
                    super::limits::describe(limited.rate)
                ),
                retry_after_ms: u32::try_from(limited.retry_after.as_millis())
                    .unwrap_or(u32::MAX)
                    .max(1),
            };
        }
        if let Some(federation) = &mut self.federation {
            federation.count_relay_admitted(peer);
        }
        let outcome = self.sequence_relayed(now, peer, conv, relayed);
        match outcome {
            Outcome::Sequenced(_) => self.spanning_stats.relays_taken += 1,
            // A limit of the sender's own here (invitations); the peer's was answered above.
            Outcome::Refused { .. } | Outcome::Stale { .. } | Outcome::Limited { .. } => {
                self.spanning_stats.relays_refused += 1;
            }
        }
        outcome
    }

    /// The checks and sequencing of a relayed message its peer's limit admitted.
    fn sequence_relayed(
        &mut self,
        now: Instant,
        peer: &str,
        conv: ConversationId,
        relayed: Relayed,
    ) -> Outcome {
        let Relayed {
            sender,
            msg_id,
            after,
            body,
            welcome,
            vouched,
        } = relayed;
        let refused = |code, message: String| Outcome::Refused {
            code,
            message,
            after: None,
        };
        let moved = self
            .spanning
            .moving_to(conv)
            .or_else(|| self.spanning.authority_of(conv));
        if let Some(to) = moved {
            // Frozen for a handover, or handed over since the member gateway relayed it:
            // the device sends it again, and its gateway relays it to the new authority.
            return refused(
                ErrorCode::AuthorityMoving,
                super::refusal::authority_moving_message(to),
            );
        }
        // Revocation first: a revoked device is no member of a plain conversation any more
        // either, and "revoked" is what it needs to hear.
        if self.peer_crls.revokes(peer, sender) {
            // Its own domain revoked it: no gateway takes its messages any more.
            self.peer_crls.count_relay_refused();
            return refused(
                ErrorCode::DeviceRevoked,
                format!(
                    "this device was revoked by {peer} (CRL version {})",
                    self.peer_crls.version(peer)
                ),
            );
        }
        if !self.spanning.is_foreign_member(conv, peer, sender) {
            // A copy of a message sequenced while the device was a member gets its seq back
            // (as a local device's does): it was sequenced, and must not be reported refused.
            let sequenced = self
                .delivery
                .log(conv)
                .and_then(|log| log.duplicate_of(sender, msg_id));
            if let Some(seq) = sequenced {
                return Outcome::Sequenced(seq);
            }
            return refused(
                ErrorCode::NotMember,
                "not a member of this conversation".into(),
            );
        }
        if msg_id == sender_order::NO_MESSAGE {
            return refused(ErrorCode::MalformedFrame, ZERO_MESSAGE_ID.into());
        }
        if let Err(last) = self
            .delivery
            .check_sender_order(conv, sender, msg_id, after)
        {
            return Outcome::Refused {
                code: ErrorCode::SenderOutOfOrder,
                message: out_of_sender_order_message(after, last),
                after: Some(last),
            };
        }
        let effect = match self
            .admit_relayed_group_message(peer, conv, sender, msg_id, &body, welcome, &vouched)
        {
            Ok(effect) => effect,
            Err(outcome) => return outcome,
        };
        if let Some(change) = effect.as_ref().map(|e| &e.change) {
            // Blocks by this domain's users and their quotas hold whoever commits.
            if let Err(refusal) = self.admit_invitations(now, sender, conv, msg_id, change) {
                return match refusal.detail.retry_after_ms() {
                    // The invitation limit: the device hears when to commit again, as at home.
                    Some(retry_after_ms) => Outcome::Limited {
                        code: refusal.code,
                        message: refusal.message,
                        retry_after_ms: retry_after_ms.max(1),
                    },
                    None => refused(refusal.code, refusal.message),
                };
            }
        }
        let appended = self.delivery.append_relayed(
            now,
            sender,
            conv,
            msg_id,
            after.is_some(),
            body,
            self.fx.writes(),
        );
        match appended {
            Ok(Appended::New(seq)) => {
                if effect.is_some() {
                    self.spanning_stats.commits_relayed += 1;
                }
                self.sequenced(now, conv, seq, after.is_some(), effect.map(|e| *e));
                self.delivery
                    .pump_members(now, conv, &self.sessions, &mut self.fx);
                Outcome::Sequenced(seq)
            }
            Ok(Appended::Duplicate(seq)) => Outcome::Sequenced(seq),
            Err(_) => refused(
                ErrorCode::UnknownConversation,
                "no such conversation here".into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MemStore;
    use crate::federation::handshake::PeerConfig;
    use crate::federation::link::FEDERATION_OUTBOX_TABLE;
    use crate::gateway::{AdminCommand, GatewayConfig};
    use crate::testing::{drain_gateway, queued_entries, TestEntropy};

    const NOW: Instant = Instant(1_000_000_000);
    const CONV: ConversationId = ConversationId(0xC0);
    const LOCAL: DeviceId = DeviceId(0xA1);
    const FOREIGN: DeviceId = DeviceId(0xB1);

    fn gateway(domain: &str, peers: &[&str]) -> (Gateway, MemStore) {
        let config = GatewayConfig {
            domain: domain.into(),
            federation_peers: peers
                .iter()
                .map(|p| PeerConfig {
                    domain: (*p).into(),
                    root_fingerprint: "00".repeat(16),
                })
                .collect(),
            ..GatewayConfig::default()
        };
        let mut store = MemStore::default();
        let mut g = Gateway::new(config, NOW, Box::new(TestEntropy(9)));
        drain_gateway(&mut g, &mut store);
        (g, store)
    }

    /// Every link entry queued for peers, in the order queued (one peer per test).
    fn outbox_rows(store: &MemStore) -> Vec<Entry> {
        store
            .records()
            .filter(|(table, _, _)| *table == FEDERATION_OUTBOX_TABLE.0)
            .map(|(_, _, value)| Entry::decode(value).expect("an entry"))
            .collect()
    }

    /// `entries` in a bundle signed by `key` over their sequenced statements.
    fn bundle_signed_by(key: &crate::identity::DeviceKey, entries: Vec<Entry>) -> Entry {
        let statements: Vec<[u8; 32]> = entries.iter().filter_map(statement_of).collect();
        Entry::Bundle {
            entries,
            signature: Some(key.sign(&bundle_statement(&statements))),
        }
    }

    fn relay(sender: DeviceId, msg: u128, body: &'static [u8]) -> Entry {
        Entry::Relay {
            conversation: CONV,
            sender,
            msg_id: MsgId(msg),
            after: None,
            body: Bytes::from_static(body),
            welcome: None,
            vouched: Vec::new(),
        }
    }

    fn authority() -> (Gateway, MemStore) {
        let (mut g, mut store) = gateway("a.example", &["b.example"]);
        let create = AdminCommand::CreateConversation(CONV, vec![LOCAL]);
        g.run_admin(NOW, create, &mut store).unwrap();
        let share = AdminCommand::ShareConversation {
            conversation: CONV,
            domain: "b.example".into(),
            members: vec![FOREIGN],
        };
        let (answer, _) = g.run_admin(NOW, share, &mut store).unwrap();
        assert!(matches!(
            answer,
            AdminAnswer::ConversationShared { members: 1, .. }
        ));
        (g, store)
    }

    #[test]
    fn the_authority_sequences_a_relayed_message_once_fans_it_out_signed_and_answers() {
        let (mut g, mut store) = authority();
        g.handle_entry(NOW, "b.example", relay(FOREIGN, 5, b"hello"));
        // The same message relayed again (the device sent a copy): its seq, nothing new.
        g.handle_entry(NOW, "b.example", relay(FOREIGN, 5, b"hello"));
        drain_gateway(&mut g, &mut store);
        assert_eq!(g.conversation_head(CONV), Some(1));
        let answer = Entry::Answer {
            conversation: CONV,
            sender: FOREIGN,
            msg_id: MsgId(5),
            outcome: Outcome::Sequenced(1),
        };
        let open = Entry::Open {
            conversation: CONV,
            members: vec![FOREIGN],
        };
        let queued = queued_entries(&store);
        assert_eq!(queued.len(), 4, "{queued:?}");
        assert_eq!(queued[0], open);
        assert_eq!(queued[2..], [answer.clone(), answer]);
        let Entry::Sequenced {
            seq: 1,
            epoch: 0,
            sender: FOREIGN,
            msg_id: MsgId(5),
            ref body,
            ..
        } = queued[1]
        else {
            panic!("sequenced: {:?}", queued[1]);
        };
        assert_eq!(body.as_ref(), b"hello");
        // What the batch produced left as one link entry, a bundle signed by the authority's
        // link key over what it ordered, and nothing else.
        let rows = outbox_rows(&store);
        assert_eq!(rows.len(), 2, "the open, then one bundle: {rows:?}");
        let Entry::Bundle {
            signature: Some(signature),
            ..
        } = rows[1]
        else {
            panic!("a signed bundle: {:?}", rows[1]);
        };
        let key = g.federation().unwrap().link_key();
        let statement = sequenced_statement(CONV, 1, 0, FOREIGN, MsgId(5), b"hello");
        assert!(key.verify(&bundle_statement(&[statement]), &signature));
        let other = sequenced_statement(CONV, 2, 0, FOREIGN, MsgId(5), b"hello");
        assert!(!key.verify(&bundle_statement(&[other]), &signature));
        let outgoing = g.stats().outgoing;
        assert_eq!((outgoing.signatures, outgoing.link_entries), (1, 2));
        let stats = g.stats().spanning;
        assert_eq!((stats.relays_taken, stats.fanned_out), (2, 1));
        // A restart keeps the role: the next message goes out too.
        let mut again =
            Gateway::recover(g.config.clone(), NOW, &store, Box::new(TestEntropy(1))).unwrap();
        again.handle_entry(NOW, "b.example", relay(FOREIGN, 6, b"again"));
        drain_gateway(&mut again, &mut store);
        assert_eq!(again.conversation_head(CONV), Some(2));
        assert_eq!(again.stats().spanning.fanned_out, 1);
    }

    /// A device of c.example's, as [`FOREIGN`] is b.example's.
    const OTHER: DeviceId = DeviceId(0xC1);

    /// a.example, home of [`CONV`], shared with b.example ([`FOREIGN`]) and c.example
    /// ([`OTHER`]), taking relays from each peer at `rate`.
    fn home_shared_with_b_and_c(rate: crate::gateway::limits::Rate) -> (Gateway, MemStore) {
        use crate::gateway::limits::{Limits, RateLimits};
        let (mut g, mut store) = gateway("a.example", &["b.example", "c.example"]);
        let create = AdminCommand::CreateConversation(CONV, vec![LOCAL]);
        g.run_admin(NOW, create, &mut store).unwrap();
        for (domain, member) in [("b.example", FOREIGN), ("c.example", OTHER)] {
            let share = AdminCommand::ShareConversation {
                conversation: CONV,
                domain: domain.into(),
                members: vec![member],
            };
            g.run_admin(NOW, share, &mut store).unwrap();
        }
        g.limits = Limits::new(RateLimits {
            peer_relays: Some(rate),
            ..RateLimits::default()
        });
        (g, store)
    }

    #[test]
    fn a_peer_relaying_past_its_limit_is_answered_peer_limited_and_other_peers_are_not() {
        use crate::gateway::limits::Rate;
        let (mut g, mut store) = home_shared_with_b_and_c(Rate::per_second(1, 3));
        let answers = |store: &MemStore, sender: DeviceId| -> Vec<Outcome> {
            queued_entries(store)
                .into_iter()
                .filter_map(|entry| match entry {
                    Entry::Answer {
                        sender: s, outcome, ..
                    } if s == sender => Some(outcome),
                    _ => None,
                })
                .collect()
        };
        // b.example relays five at once: its burst of three is sequenced, two are refused for
        // now, with the time until one more is taken.
        for msg in 1..=5 {
            g.handle_entry(NOW, "b.example", relay(FOREIGN, msg, b"flood"));
        }
        let outputs = drain_gateway(&mut g, &mut store);
        assert_eq!(g.conversation_head(CONV), Some(3));
        let got = answers(&store, FOREIGN);
        assert_eq!(got[..3], [1, 2, 3].map(Outcome::Sequenced));
        // Each refused relay gets a time of its own, one interval after the one before, so
        // that they come back when there is room for each.
        for (outcome, wait) in got[3..].iter().zip([1_000, 2_000]) {
            let Outcome::Limited {
                code,
                message,
                retry_after_ms,
            } = outcome
            else {
                panic!("limited: {outcome:?}");
            };
            assert_eq!(*code, ErrorCode::PeerLimited);
            assert!(message.contains("at most 1 per second"), "{message}");
            assert_eq!(*retry_after_ms, wait);
        }
        // The operator hears of it once, not once per refusal.
        let told: Vec<_> = outputs
            .iter()
            .filter(|o| matches!(o, GatewayOutput::PeerLimited { peer, .. } if peer == "b.example"))
            .collect();
        assert_eq!(told.len(), 1, "{outputs:?}");
        // c.example's relays are not held up by b.example's flood.
        g.handle_entry(NOW, "c.example", relay(OTHER, 9, b"mine"));
        drain_gateway(&mut g, &mut store);
        assert_eq!(answers(&store, OTHER), [Outcome::Sequenced(4)]);
        // At its time, the first refused relay is taken; the second, come too early, is told
        // the next time not promised yet; the flood going on is told to the operator again
        // only a minute after the first.
        let later = NOW + core::time::Duration::from_secs(1);
        g.handle_entry(later, "b.example", relay(FOREIGN, 4, b"flood"));
        g.handle_entry(later, "b.example", relay(FOREIGN, 5, b"flood"));
        let outputs = drain_gateway(&mut g, &mut store);
        assert!(matches!(
            answers(&store, FOREIGN).last(),
            Some(Outcome::Limited {
                retry_after_ms: 2_000,
                ..
            })
        ));
        assert!(!outputs
            .iter()
            .any(|o| matches!(o, GatewayOutput::PeerLimited { .. })));
        assert_eq!(g.conversation_head(CONV), Some(5));
        let stats = g.stats();
        assert_eq!(stats.spanning.relays_limited, 3);
        assert_eq!(stats.limits.peer_relays_limited, 3);
        // Per peer, for `admin federation` and `/metrics`.
        let links = g.federation().unwrap().links(later);
        let limited: Vec<(&str, u64)> = links
            .iter()
            .map(|l| (l.domain.as_str(), l.relays_limited))
            .collect();
        assert_eq!(limited, [("b.example", 3), ("c.example", 0)]);
        assert_eq!(stats.spanning.relays_taken, 5);
    }

    #[test]
    fn a_peer_relaying_past_its_hints_has_its_link_read_paused_and_an_honest_one_does_not() {
        use crate::gateway::limits::Rate;
        use crate::gateway::peer_hints::HINT_GRACE;
        use crate::gateway::READ_PAUSE_MAX;
        use core::time::Duration;
        // One relay a minute per peer, so that a hint lasts longer than the grace.
        let (mut g, mut store) = home_shared_with_b_and_c(Rate {
            count: 1,
            period: Duration::from_secs(60),
            burst: 1,
        });
        // b.example's link is up; c.example's is not.
        let key = g.federation().unwrap().link_key();
        g.federation
            .as_mut()
            .unwrap()
            .assume_peer_key("b.example", key);
        let (link, idle_timeout) = g.federation().unwrap().up_link("b.example").unwrap();
        assert!(g.federation().unwrap().up_link("c.example").is_none());
        let mut told = Vec::new();
        let mut relay_at = |g: &mut Gateway, at: Instant, peer: &str, sender, msg| {
            g.handle_entry(at, peer, relay(sender, msg, b"flood"));
            drain_gateway(g, &mut store)
                .into_iter()
                .filter_map(|o| match o {
                    GatewayOutput::PauseReading(conn, pause) => Some((conn, pause)),
                    GatewayOutput::PeerIgnoresHints { peer, pause } => {
                        told.push((peer, pause));
                        None
                    }
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        // Within its limit, refused once, and what was on its way before that refusal reached
        // the device: an honest peer's link is read on.
        assert_eq!(relay_at(&mut g, NOW, "b.example", FOREIGN, 1), []);
        assert_eq!(relay_at(&mut g, NOW, "b.example", FOREIGN, 2), []);
        let soon = NOW + Duration::from_secs(1);
        assert_eq!(relay_at(&mut g, soon, "b.example", FOREIGN, 3), []);
        assert_eq!(g.stats().spanning.relays_limited, 2);
        assert_eq!(g.stats().spanning.relays_past_hint, 0);
        // Well after its refusal and before its hint: b.example ignores its hints, and its
        // link's reading pauses, bounded as a device's session is.
        let later = soon + HINT_GRACE + Duration::from_secs(1);
        let paused = relay_at(&mut g, later, "b.example", FOREIGN, 4);
        let pause = READ_PAUSE_MAX.min(idle_timeout / 4);
        assert_eq!(paused, [(link, pause)]);
        assert!(pause < idle_timeout / 2);
        assert_eq!(g.stats().spanning.relays_past_hint, 1);
        // c.example ignoring its hints too is counted, with no link to pause; b.example's
        // pause is not c.example's.
        assert_eq!(relay_at(&mut g, NOW, "c.example", OTHER, 1), []);
        assert_eq!(relay_at(&mut g, NOW, "c.example", OTHER, 2), []);
        let past_grace = NOW + HINT_GRACE + Duration::from_secs(1);
        assert_eq!(relay_at(&mut g, past_grace, "c.example", OTHER, 3), []);
        // Again from b.example, past the grace after its last refusal: paused again, but
        // the operator heard of it once.
        let again = relay_at(
            &mut g,
            later + HINT_GRACE + Duration::from_secs(1),
            "b.example",
            FOREIGN,
            5,
        );
        assert_eq!(again.len(), 1);
        assert_eq!(told, [("b.example".to_string(), pause)]);
        assert_eq!(g.stats().spanning.relays_past_hint, 3);
        // Per peer, for `admin federation` and `/metrics`.
        let links = g.federation().unwrap().links(later);
        let past: Vec<(&str, u64)> = links
            .iter()
            .map(|l| (l.domain.as_str(), l.relays_past_hint))
            .collect();
        assert_eq!(past, [("b.example", 2), ("c.example", 1)]);
    }

    /// A conversation homed at a.example (gateway 0), shared with a device of b.example
    /// (gateway 1) whose session is `conn`.
    fn shared_with_a_member_device() -> (crate::gateway::test_pair::Pair, ConnectionId) {
        let mut w = crate::gateway::test_pair::Pair::new();
        let (conn, device) = w.open_session(1, 7, UserId::from_bytes([7; 16]));
        w.admin(0, AdminCommand::CreateConversation(CONV, vec![LOCAL]));
        let share = AdminCommand::ShareConversation {
            conversation: CONV,
            domain: "b.example".into(),
            members: vec![device],
        };
        w.admin(0, share);
        w.settle();
        (w, conn)
    }

    /// The device on `conn` at b.example sends `msg` (body `[msg]`) after `after` at `at`:
    /// what b.example answers it in the batch.
    fn member_sends(
        w: &mut crate::gateway::test_pair::Pair,
        conn: ConnectionId,
        at: Instant,
        msg: u128,
        after: u128,
    ) -> Vec<Payload> {
        use crate::gateway::GatewayInput;
        use crate::wire::Frame;
        let payload = Payload::Send(Send {
            msg_id: MsgId(msg).to_bytes(),
            body: vec![msg as u8],
            welcome: None,
            after: Some(MsgId(after).to_bytes()),
        });
        let routing = Routing {
            conversation: CONV,
            ..Routing::default()
        };
        let (g, store) = &mut w.gateways[1];
        g.handle(
            at,
            GatewayInput::Frame(conn, Frame::new(routing, payload).encode()),
        );
        crate::gateway::test_pair::frames(&drain_gateway(g, store), conn)
    }

    #[test]
    fn a_member_gateway_holds_its_device_to_the_authoritys_hint_and_relays_nothing_early() {
        use crate::gateway::limits::{Limits, Rate, RateLimits};
        use crate::gateway::test_pair::{frames, NOW};
        use crate::wire::payload::ErrorReport;
        use core::time::Duration;
        // a.example takes one relay every 10 s from b.example.
        let (mut w, conn) = shared_with_a_member_device();
        w.gateways[0].0.limits = Limits::new(RateLimits {
            peer_relays: Some(Rate {
                count: 1,
                period: Duration::from_secs(10),
                burst: 1,
            }),
            ..RateLimits::default()
        });
        let send = |w: &mut _, at, msg, after| member_sends(w, conn, at, msg, after);
        let refusal_of = |payloads: &[Payload]| -> Option<ErrorReport> {
            payloads.iter().find_map(|p| match p {
                Payload::Error(e) => Some(e.clone()),
                _ => None,
            })
        };
        // The first is sequenced; the second refused by a.example for 10 s, which b.example
        // passes on and keeps.
        assert_eq!(send(&mut w, NOW, 1, 0), []);
        w.settle();
        assert_eq!(send(&mut w, NOW, 2, 1), []);
        // The relay to a.example, then its answer back.
        w.settle();
        w.settle();
        let passed = frames(&w.released[1], conn);
        let refused = refusal_of(&passed).expect("the authority's refusal passed on");
        assert_eq!(ErrorCode::from_u16(refused.code), ErrorCode::PeerLimited);
        assert_eq!(refused.retry_after_ms, Some(10_000));
        // Sent again 4 s later, before its time (a device that ignores its hint): refused
        // here with the time left, and nothing goes to a.example.
        let relayed = w.gateways[1].0.stats().spanning.relayed;
        let later = NOW + Duration::from_secs(4);
        let here = refusal_of(&send(&mut w, later, 2, 1)).expect("refused here");
        assert_eq!(ErrorCode::from_u16(here.code), ErrorCode::PeerLimited);
        assert_eq!(here.retry_after_ms, Some(6_000));
        assert_eq!(here.msg_id, Some(MsgId(2).to_bytes()));
        let stats = w.gateways[1].0.stats().spanning;
        assert_eq!((stats.relayed, stats.relays_held), (relayed, 1));
        // At its time it is relayed again.
        let on_time = NOW + Duration::from_secs(10);
        assert_eq!(send(&mut w, on_time, 2, 1), []);
        assert_eq!(w.gateways[1].0.stats().spanning.relayed, relayed + 1);
        // a.example never saw a relay before its hint.
        assert_eq!(w.gateways[0].0.stats().spanning.relays_past_hint, 0);
    }

    #[test]
    fn a_member_gateway_holds_a_message_ahead_of_its_senders_order_and_relays_it_after_the_gap() {
        use crate::gateway::test_pair::NOW;
        let (mut w, conn) = shared_with_a_member_device();
        let send = |w: &mut _, msg, after| member_sends(w, conn, NOW, msg, after);
        // 1 is sequenced; 2 is lost on the way; 3 comes: held at b.example, which says so.
        assert_eq!(send(&mut w, 1, 0), []);
        w.settle();
        w.settle();
        let told = send(&mut w, 3, 2);
        let [Payload::Error(notice)] = told.as_slice() else {
            panic!("one notice: {told:?}");
        };
        assert_eq!(
            ErrorCode::from_u16(notice.code),
            ErrorCode::SenderOutOfOrder
        );
        assert_eq!(notice.held, Some(true));
        assert_eq!(
            notice.after,
            Some(MsgId(1).to_bytes()),
            "the last sequenced"
        );
        assert_eq!(
            w.gateways[1].0.stats().spanning.relayed,
            1,
            "3 not relayed yet"
        );
        // 2 comes: relayed, and 3 after it; a.example sequences both in order.
        assert_eq!(send(&mut w, 2, 1), []);
        assert_eq!(w.gateways[1].0.stats().spanning.relayed, 3);
        w.settle();
        w.settle();
        let log = w.gateways[0].0.delivery.log(CONV).unwrap();
        let order: Vec<MsgId> = (1..=3).map(|seq| log.get(seq).unwrap().msg_id).collect();
        assert_eq!(order, [MsgId(1), MsgId(2), MsgId(3)]);
        let held = w.gateways[1].0.stats().held_sends;
        assert_eq!((held.held, held.gaps_told, held.taken), (1, 1, 1));
    }

    #[test]
    fn the_authority_refuses_a_relay_from_a_device_that_is_no_member_there() {
        let (mut g, mut store) = authority();
        // A device of b.example that is not a member, and a member's id relayed by a gateway
        // that is not its home (as if c.example claimed it).
        g.handle_entry(NOW, "b.example", relay(DeviceId(0xB2), 7, b"x"));
        drain_gateway(&mut g, &mut store);
        assert_eq!(g.conversation_head(CONV), Some(0));
        let last = queued_entries(&store).pop().unwrap();
        let Entry::Answer {
            outcome: Outcome::Refused { code, .. },
            ..
        } = last
        else {
            panic!("refused: {last:?}");
        };
        assert_eq!(code, ErrorCode::NotMember);
        assert_eq!(g.stats().spanning.relays_refused, 1);
    }

    #[test]
    fn sharing_names_what_is_wrong_and_a_home_needs_no_member_of_its_own() {
        let (mut g, mut store) = authority();
        let share = |conversation, domain: &str| AdminCommand::ShareConversation {
            conversation,
            domain: domain.into(),
            members: vec![FOREIGN],
        };
        let (answer, _) = g
            .run_admin(NOW, share(CONV, "c.example"), &mut store)
            .unwrap();
        let AdminAnswer::ShareRefused { why, .. } = answer else {
            panic!("refused: {answer:?}");
        };
        assert!(why.contains("not a federation peer"), "{why}");
        // A conversation homed here whose members are all of another domain.
        let remote_only = ConversationId(0xDD);
        let (answer, _) = g
            .run_admin(NOW, share(remote_only, "b.example"), &mut store)
            .unwrap();
        assert!(
            matches!(answer, AdminAnswer::ConversationShared { .. }),
            "{answer:?}"
        );
        g.handle_entry(
            NOW,
            "b.example",
            Entry::Relay {
                conversation: remote_only,
                sender: FOREIGN,
                msg_id: MsgId(9),
                after: None,
                body: Bytes::from_static(b"only them"),
                welcome: None,
                vouched: Vec::new(),
            },
        );
        drain_gateway(&mut g, &mut store);
        assert_eq!(g.conversation_head(remote_only), Some(1));
        let again =
            Gateway::recover(g.config.clone(), NOW, &store, Box::new(TestEntropy(3))).unwrap();
        assert_eq!(again.conversation_head(remote_only), Some(1));
    }

    #[test]
    fn a_replica_takes_only_its_authoritys_signed_entries_in_order() {
        let (mut g, mut store) = gateway("b.example", &["a.example", "c.example"]);
        let authority = crate::identity::DeviceKey::from_seed([7; 32]);
        let stranger = crate::identity::DeviceKey::from_seed([8; 32]);
        let federation = g.federation.as_mut().unwrap();
        federation.assume_peer_key("a.example", authority.public());
        federation.assume_peer_key("c.example", stranger.public());
        let sequenced = |seq: u64, body: &'static [u8]| Entry::Sequenced {
            conversation: CONV,
            seq,
            epoch: 0,
            sender: LOCAL,
            msg_id: MsgId(u128::from(seq)),
            chained: true,
            body: Bytes::from_static(body),
        };
        let signed_by = |key: &crate::identity::DeviceKey, seq: u64, body: &'static [u8]| {
            bundle_signed_by(key, vec![sequenced(seq, body)])
        };
        // Before the conversation is opened here, nothing is taken.
        g.handle_entry(NOW, "a.example", signed_by(&authority, 1, b"early"));
        assert_eq!(g.stats().spanning.entries_refused, 1);
        let open = Entry::Open {
            conversation: CONV,
            members: vec![FOREIGN],
        };
        g.handle_entry(NOW, "a.example", open.clone());
        g.handle_entry(NOW, "a.example", signed_by(&authority, 1, b"one"));
        // From a gateway that is not the authority: refused; the authority's role stays.
        g.handle_entry(NOW, "c.example", signed_by(&stranger, 2, b"forged"));
        g.handle_entry(NOW, "c.example", open);
        assert_eq!(g.stats().spanning.entries_refused, 3);
        assert_eq!(g.replica_of(CONV), Some("a.example"));
        // Only its home shares it.
        let share = AdminCommand::ShareConversation {
            conversation: CONV,
            domain: "c.example".into(),
            members: vec![FOREIGN],
        };
        let (answer, _) = g.run_admin(NOW, share, &mut store).unwrap();
        let AdminAnswer::ShareRefused { why, .. } = answer else {
            panic!("refused: {answer:?}");
        };
        assert!(why.contains("homed at another gateway"), "{why}");
        // On the authority's link but not signed by its key (a body changed after signing):
        // not taken.
        let Entry::Bundle { signature, .. } = signed_by(&authority, 2, b"two") else {
            unreachable!()
        };
        let altered = Entry::Bundle {
            entries: vec![sequenced(2, b"TWO")],
            signature,
        };
        g.handle_entry(NOW, "a.example", altered);
        assert_eq!(g.stats().spanning.signatures_refused, 1);
        // Nor alone (nothing signs it), nor in an unsigned bundle, nor with a sibling the
        // signature does not cover.
        g.handle_entry(NOW, "a.example", sequenced(2, b"two"));
        let unsigned = Entry::Bundle {
            entries: vec![sequenced(2, b"two")],
            signature: None,
        };
        g.handle_entry(NOW, "a.example", unsigned);
        let Entry::Bundle { signature, .. } = signed_by(&authority, 2, b"two") else {
            unreachable!()
        };
        let smuggled = Entry::Bundle {
            entries: vec![sequenced(2, b"two"), sequenced(3, b"smuggled")],
            signature,
        };
        g.handle_entry(NOW, "a.example", smuggled);
        assert_eq!(g.stats().spanning.signatures_refused, 5);
        assert_eq!(g.conversation_head(CONV), Some(1));
        // A seq the replica never took becomes a placeholder when the next one comes.
        g.handle_entry(NOW, "a.example", signed_by(&authority, 3, b"three"));
        drain_gateway(&mut g, &mut store);
        let log = g.delivery.log(CONV).unwrap();
        assert_eq!(log.head(), 3);
        assert_eq!(log.get(1).unwrap().body.as_ref(), b"one");
        assert_eq!(
            log.get(2).unwrap().sender,
            crate::gateway::sequencer::LOST_SENDER
        );
        assert!(log.is_member(FOREIGN));
        // After a restart the replica is still one, with its log.
        let again =
            Gateway::recover(g.config.clone(), NOW, &store, Box::new(TestEntropy(2))).unwrap();
        assert_eq!(again.replica_of(CONV), Some("a.example"));
        assert_eq!(again.conversation_head(CONV), Some(3));
        // A conversation of its own is not taken over by a peer's Open.
        let (mut own, mut own_store) = gateway("b.example", &["a.example"]);
        let create = AdminCommand::CreateConversation(CONV, vec![FOREIGN]);
        own.run_admin(NOW, create, &mut own_store).unwrap();
        own.handle_entry(
            NOW,
            "a.example",
            Entry::Open {
                conversation: CONV,
                members: vec![FOREIGN],
            },
        );
        assert_eq!(own.replica_of(CONV), None);
        assert_eq!(own.stats().spanning.entries_refused, 1);
    }
}
