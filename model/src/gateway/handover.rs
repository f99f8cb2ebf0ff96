//! Authority handover (issue 15, step 5): an operator moves a conversation's authority to
//! another domain's gateway while both run, stop-the-world, with one authority at any instant.
//!
//! 1. **Freeze.** The old authority (A) stops sequencing the conversation at `last_seq`:
//!    sends and relays to it are answered `authority_moving` (nothing is stored; devices send
//!    again after the hint, and then reach the new authority). It sends the gateway it hands
//!    over to (B) an [`Entry::Handover`] with every domain's members, signed. B keeps a
//!    replica already, and the link hands entries on in order, so B's replica holds every
//!    message up to `last_seq` when the handover arrives: the retained messages, the
//!    deduplication window and sender order need no transfer.
//! 2. **Take over.** B checks the signature, that its replica ends at `last_seq`, and that it
//!    federates with every member domain; then it is the authority in the next term, signs
//!    the certificate (conversation, term, from, to, last seq, epoch) and sends it, signed by
//!    both, to every member gateway, A included ([`Entry::Moved`]). Otherwise it declines
//!    ([`Entry::Declined`]) and A is the authority again.
//! 3. **Follow.** A member gateway (A too) that takes the certificate (both signatures, a newer
//!    term than it knew) keeps its replica under B and says where it ends
//!    ([`Entry::Following`]); B sends it every message after that, then each it sequences.
//!    Until then B sends it nothing, so a member's replica stays contiguous whichever link
//!    is faster, and messages the old authority sent on a slow link are simply not needed.
//!
//! Seqs continue without a gap, and A never sequences the conversation again: it froze
//! before B began, and follows B once it learns the certificate (a frozen gateway that
//! restarts is still frozen). Terms make certificates of an earlier handover stale.

use std::collections::{BTreeMap, BTreeSet};

use super::groups::GroupState;
use super::sequencer::{AUTHORITY_SENDER, LOST_SENDER};
use super::{AdminAnswer, Gateway, GatewayOutput};
use crate::federation::entry::{
    Entry, HandoverCertificate, MlsHandover, HANDOVER_DOMAINS_MAX, HANDOVER_GROUP_BYTES_MAX,
    HANDOVER_PROPOSAL_BYTES_MAX, OPEN_MEMBERS_MAX,
};
use crate::ids::{ConversationId, DeviceId};
use crate::time::Instant;
use bytes::Bytes;
use core::time::Duration;

/// When a device refused `authority_moving` sends again: a handover takes a few round trips
/// between two gateways.
pub const HANDOVER_RETRY: Duration = Duration::from_millis(500);

/// Counters of handovers, at both ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HandoverStats {
    /// Handovers this gateway started (it froze a conversation).
    pub started: u64,
    /// Handovers this gateway took (it became a conversation's authority).
    pub taken: u64,
    /// Handovers this gateway declined, or that were declined to it.
    pub declined: u64,
    /// Certificates this gateway followed (as the old authority or a member gateway).
    pub followed: u64,
    /// Certificates refused: a signature that does not verify, from a gateway that is not
    /// the new authority, or about a conversation this gateway does not hold.
    pub refused: u64,
    /// Certificates of a term this gateway had seen (stale or repeated): nothing changed.
    pub stale: u64,
    /// Certificates taken on the new authority's signature alone: the old authority's link
    /// key was not known here (no link to it came up since this gateway started).
    pub unverified_from: u64,
    /// Messages sent to member gateways that said where their replica ends.
    pub caught_up: u64,
}

/// For the operator and the simulator's report: a handover this gateway started is done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandedOver {
    /// The conversation.
    pub conversation: ConversationId,
    /// Its new authority's domain.
    pub to: String,
    /// The last seq this gateway sequenced.
    pub last_seq: u64,
    /// How long it was frozen here (restarts of this gateway included).
    pub frozen_for: Duration,
    /// If the gateway it was offered to declined (this gateway is the authority again): why.
    pub declined: Option<String>,
}

impl Gateway {
    /// Operator: hand `conv`, homed here, over to `to`'s gateway (step 1).
    pub(super) fn start_handover(
        &mut self,
        now: Instant,
        conv: ConversationId,
        to: &str,
    ) -> AdminAnswer {
        let refused = |why: String| AdminAnswer::HandoverRefused {
            conversation: conv,
            why,
        };
        if let Some(home) = self.spanning.authority_of(conv) {
            return refused(format!("it is homed at {home}: its operator hands it over"));
        }
        if to == self.config.domain {
            return refused(format!("it is homed at {to} already"));
        }
        if let Some(moving) = self.spanning.moving_to(conv) {
            return refused(format!(
                "it is being handed over to {moving} already; `admin list` shows when that is done"
            ));
        }
        let Some(home) = self.spanning.home(conv) else {
            return refused(format!(
                "no other domain has members in it: share it with {to} first (`admin share-conversation`)"
            ));
        };
        if let Some(behind) = home.waiting.first() {
            return refused(format!(
                "{behind} has not caught up since this gateway took the conversation over; try again shortly"
            ));
        }
        if !home.members.contains_key(to) {
            return refused(format!(
                "{to} keeps no copy of it: share it with {to} first (`admin share-conversation`)"
            ));
        }
        let own = self.config.domain.clone();
        let local: Vec<DeviceId> = self
            .delivery
            .log(conv)
            .map(|log| log.members().iter().copied().collect())
            .unwrap_or_default();
        let mut members: Vec<(String, Vec<DeviceId>)> = home
            .members
            .iter()
            .map(|(d, devices)| (d.clone(), devices.iter().copied().collect()))
            .collect();
        members.push((own.clone(), local));
        let devices: usize = members.iter().map(|(_, d)| d.len()).sum();
        if members.len() > HANDOVER_DOMAINS_MAX || devices > OPEN_MEMBERS_MAX {
            return refused(format!(
                "it has {devices} member devices in {} domains; a handover carries at most {OPEN_MEMBERS_MAX} in {HANDOVER_DOMAINS_MAX}",
                members.len()
            ));
        }
        let term = home.term + 1;
        let last_seq = self.delivery.head(conv).unwrap_or(0);
        // The MLS epoch (0 in a plain conversation).
        let epoch = self.groups.get(conv).map_or(0, |g| g.epoch());
        if !self.federation.as_ref().is_some_and(|f| f.is_up(to)) {
            // The conversation would stay frozen until the link came back.
            return refused(format!(
                "the link to {to} is down; hand it over once `sund-gateway admin federation` shows it up"
            ));
        }
        let mls = match self.mls_handover(conv, to) {
            Ok(mls) => mls,
            Err(why) => return refused(why),
        };
        let Some(federation) = &self.federation else {
            return refused("this gateway has no federation peers".into());
        };
        let statement = HandoverCertificate::statement(conv, term, &own, to, last_seq, epoch);
        let handover = Entry::Handover {
            conversation: conv,
            term,
            last_seq,
            epoch,
            members,
            signature: federation.sign(&statement),
            mls,
        };
        if let Err(error) = self.send_entry(to, &handover) {
            return refused(error.to_string());
        }
        if self.config.planted != Some(crate::planted::PlantedBug::HandoverKeepsSequencing) {
            let frozen = self.spanning.freeze(conv, to, now, self.fx.writes());
            debug_assert!(frozen.is_some(), "checked above");
        }
        self.handover_stats.started += 1;
        AdminAnswer::HandoverStarted {
            conversation: conv,
            to: to.to_string(),
            last_seq,
        }
    }

    /// For a handover of the MLS conversation `conv` to `to`: the group state and the
    /// proposal naming `to`'s key as the group's external sender; `None` for a plain one.
    fn mls_handover(
        &mut self,
        conv: ConversationId,
        to: &str,
    ) -> Result<Option<MlsHandover>, String> {
        let Some(group) = self.groups.get(conv) else {
            return Ok(None);
        };
        let group = Bytes::from(group.encode());
        if group.len() > HANDOVER_GROUP_BYTES_MAX {
            return Err(format!(
                "its group state takes {} bytes; a handover carries at most {HANDOVER_GROUP_BYTES_MAX}",
                group.len()
            ));
        }
        let Some(external_key) = self.external_keys.of(to) else {
            return Err(format!(
                "{to}'s gateway has not told this gateway the key it signs MLS proposals with \
                 (it does once, soon after their link first comes up); try again shortly"
            ));
        };
        let proposal = self.groups.external_sender_proposal(
            conv,
            external_key,
            self.entropy.as_mut(),
            self.fx.writes(),
        )?;
        if proposal.len() > HANDOVER_PROPOSAL_BYTES_MAX {
            return Err("the proposal of the new external sender is too long".into());
        }
        let mut senders = self.delivery.senders_last(conv);
        senders.truncate(OPEN_MEMBERS_MAX);
        Ok(Some(MlsHandover {
            group,
            external_key,
            proposal,
            senders,
        }))
    }

    /// Why the MLS part of a handover of `conv` in `epoch` cannot be taken here, or the group
    /// state it gives (`None` for a plain conversation).
    fn check_mls_handover(
        &mut self,
        conv: ConversationId,
        epoch: u64,
        mls: Option<&MlsHandover>,
    ) -> Result<Option<GroupState>, String> {
        let Some(mls) = mls else {
            return Ok(None);
        };
        let state = GroupState::decode_record(&mls.group)?;
        if state.epoch() != epoch {
            return Err(format!(
                "the group state is at epoch {}, the handover at {epoch}",
                state.epoch()
            ));
        }
        let own = self
            .groups
            .external_key(self.entropy.as_mut(), self.fx.writes());
        if mls.external_key[..] != own[..] {
            return Err(
                "the proposal names another external-sender key than this gateway's \
                        (its data directory was reset since it told its key)"
                    .into(),
            );
        }
        let (framing, _) = crate::mls::commit_authority::read_message(&mls.proposal)
            .map_err(|e| format!("the proposal does not read: {e}"))?;
        if framing.group_id != conv.to_bytes()
            || framing.epoch != epoch
            || framing.kind != crate::mls::commit_authority::Kind::Proposal
        {
            return Err("the proposal is not one of this group in the handover's epoch".into());
        }
        Ok(Some(state))
    }

    /// At the gateway handed `conv`: take it over, or decline (step 2).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_handover(
        &mut self,
        now: Instant,
        peer: &str,
        conv: ConversationId,
        term: u64,
        last_seq: u64,
        epoch: u64,
        members: Vec<(String, Vec<DeviceId>)>,
        signature: [u8; 64],
        mls: Option<MlsHandover>,
    ) {
        let own = self.config.domain.clone();
        let statement = HandoverCertificate::statement(conv, term, peer, &own, last_seq, epoch);
        let signed = self
            .federation
            .as_ref()
            .and_then(|f| f.peer_key(peer))
            .is_some_and(|key| key.verify(&statement, &signature));
        let head = self.delivery.head(conv).unwrap_or(0);
        let following = self.spanning.authority_of(conv) == Some(peer)
            && self.spanning.term(conv).is_some_and(|t| t + 1 == term);
        let federation = self.federation.as_ref();
        let stranger = members
            .iter()
            .map(|(d, _)| d)
            .find(|d| **d != own && !federation.is_some_and(|f| f.is_peer(d)));
        let group = self.check_mls_handover(conv, epoch, mls.as_ref());
        let why = if !following {
            Some(format!(
                "{own} keeps no copy of this conversation under {peer} in term {}",
                term.saturating_sub(1)
            ))
        } else if !signed {
            Some("the handover's signature is not the link key's".to_string())
        } else if head != last_seq {
            Some(format!(
                "{own}'s copy ends at seq {head}, not at {last_seq}"
            ))
        } else if let Err(why) = &group {
            Some(format!("the MLS group cannot be taken: {why}"))
        } else {
            stranger
                .map(|stranger| format!("{own} does not federate with {stranger}, a member domain"))
        };
        if let Some(reason) = why {
            self.handover_stats.declined += 1;
            let declined = Entry::Declined {
                conversation: conv,
                term,
                reason,
            };
            // The peer is configured: it sent this.
            let _ = self.send_entry(peer, &declined);
            return;
        }
        let mut others: BTreeMap<String, BTreeSet<DeviceId>> = BTreeMap::new();
        for (domain, devices) in members {
            if domain != own {
                others.entry(domain).or_default().extend(devices);
            }
        }
        let group = group.ok().flatten();
        if let Some(mut state) = group {
            // Other domains' member devices are known here by the users the old authority
            // knew them by (as from their gateways' KeyPackage answers).
            for (domain, devices) in &others {
                for device in devices {
                    if let Some(&user) = state.devices().get(device) {
                        self.foreign_fetches
                            .learn(*device, user, domain, self.fx.writes());
                    }
                }
            }
            let key = self
                .groups
                .external_key(self.entropy.as_mut(), self.fx.writes());
            state.expect_external_sender(key.try_into().expect("32 bytes"));
            self.groups.set_state(conv, state, self.fx.writes());
        }
        let domains: Vec<String> = others.keys().cloned().collect();
        self.spanning
            .take_over(conv, term, others, self.fx.writes());
        // Each member gateway reads what this gateway sequences from now on out of its log,
        // once it has said where its replica ends.
        self.delivery.keep_acknowledged(conv, !domains.is_empty());
        let federation = self.federation.as_ref().expect("checked above");
        let certificate = HandoverCertificate {
            term,
            from: peer.to_string(),
            to: own,
            last_seq,
            epoch,
            from_signature: signature,
            to_signature: federation.sign(&statement),
        };
        let moved = Entry::Moved {
            conversation: conv,
            certificate,
        };
        for domain in domains {
            // Each is a configured peer (checked above).
            let _ = self.send_entry(&domain, &moved);
        }
        if let Some(mls) = mls {
            // This replica began where this domain's first device joined: who sent what
            // last before that, only the old authority knew.
            self.delivery
                .adopt_senders_last(conv, &mls.senders, last_seq);
            // The first message of this term: the old authority's proposal making this
            // gateway the group's external sender, which the next commit must take. Member
            // gateways read it once they have said where their replicas end.
            let seq = self.sequence_proposal(now, conv, mls.proposal);
            debug_assert_eq!(seq, last_seq + 1, "the new term goes on without a gap");
        }
        self.handover_stats.taken += 1;
    }

    /// At a member gateway or the old authority: follow the new one (step 3).
    pub(super) fn on_moved(
        &mut self,
        now: Instant,
        peer: &str,
        conv: ConversationId,
        certificate: HandoverCertificate,
    ) {
        let c = &certificate;
        let own = self.config.domain.clone();
        let statement =
            HandoverCertificate::statement(conv, c.term, &c.from, &c.to, c.last_seq, c.epoch);
        let Some(federation) = self.federation.as_ref() else {
            return;
        };
        let by_new = c.to == peer
            && federation
                .peer_key(peer)
                .is_some_and(|key| key.verify(&statement, &c.to_signature));
        let from_key = if c.from == own {
            Some(federation.link_key())
        } else {
            federation.peer_key(&c.from)
        };
        let by_old = from_key.map(|key| key.verify(&statement, &c.from_signature));
        // A gateway sequencing the conversation follows no one, and one handing it over
        // follows only the gateway it handed it to.
        let sequencing_here = self.spanning.home(conv).is_some();
        let moving_elsewhere = self
            .spanning
            .moving_to(conv)
            .is_some_and(|to| to != peer || c.from != own);
        if !by_new || by_old == Some(false) || sequencing_here || moving_elsewhere {
            self.handover_stats.refused += 1;
            return;
        }
        let was_moving = self.spanning.moving_to(conv) == Some(peer);
        let frozen_since = self.spanning.frozen_since(conv);
        // The old authority's last messages may still be on their way on its own link (its
        // `Open` too, if this gateway never heard of the conversation): taken from it first,
        // then the new authority is told where the replica ends.
        let head = self.delivery.head(conv);
        let behind = head.is_none_or(|head| head < c.last_seq);
        let previous = behind.then(|| (c.from.clone(), c.last_seq));
        if !self
            .spanning
            .moved(conv, c.term, &c.to, previous, self.fx.writes())
        {
            self.handover_stats.stale += 1;
            return;
        }
        if by_old.is_none() {
            self.handover_stats.unverified_from += 1;
        }
        self.handover_stats.followed += 1;
        if was_moving {
            // The new authority holds the group state now (it came with the handover).
            self.groups.forget(conv, self.fx.writes());
        }
        if !behind {
            self.follow_authority(conv);
        }
        if let (true, Some(since)) = (was_moving, frozen_since) {
            self.fx.hold(GatewayOutput::HandedOver(HandedOver {
                conversation: conv,
                to: c.to.clone(),
                last_seq: c.last_seq,
                frozen_for: now.saturating_since(since),
                declined: None,
            }));
        }
    }

    /// Tells `conv`'s authority where this replica ends, so that it sends what comes after.
    pub(super) fn follow_authority(&mut self, conv: ConversationId) {
        let (Some(authority), Some(term)) = (
            self.spanning.authority_of(conv).map(str::to_string),
            self.spanning.term(conv),
        ) else {
            return;
        };
        let head = self.delivery.head(conv).unwrap_or(0);
        let following = Entry::Following {
            conversation: conv,
            term,
            head,
        };
        // A configured peer: the certificate came from it.
        let _ = self.send_entry(&authority, &following);
    }

    /// At the new authority: `peer`'s replica ends at `head`; it gets everything after, and
    /// then every message sequenced (step 3).
    pub(super) fn on_following(&mut self, peer: &str, conv: ConversationId, term: u64, head: u64) {
        if self.spanning.term(conv) != Some(term)
            || !self.spanning.following(conv, peer, self.fx.writes())
        {
            self.handover_stats.refused += 1;
            return;
        }
        if self
            .spanning
            .home(conv)
            .is_some_and(|h| h.waiting.is_empty())
        {
            self.delivery.keep_acknowledged(conv, false);
        }
        let epoch = self.groups.get(conv).map_or(0, |g| g.epoch());
        let Some(log) = self.delivery.log(conv) else {
            return;
        };
        let mut entries = Vec::new();
        for seq in head + 1..=log.head() {
            // What is gone from the log (past retention) or was lost is not sent: the
            // member's replica marks it lost when the next message comes.
            let Some(entry) = log.get(seq) else { continue };
            if entry.sender == LOST_SENDER {
                continue;
            }
            // Every message chained in its sender's order but the authority's own. The
            // log keeps no epoch per message: each goes with the group's epoch now, as
            // fan-out sends each with the epoch after it.
            entries.push(Entry::Sequenced {
                conversation: conv,
                seq,
                epoch,
                sender: entry.sender,
                msg_id: entry.msg_id,
                chained: entry.sender != AUTHORITY_SENDER,
                body: entry.body.clone(),
            });
        }
        // Signed with the rest of this batch's bundles for the peer (up to a thousand
        // messages under one signature).
        for entry in entries {
            if self.send_entry(peer, &entry).is_ok() {
                self.handover_stats.caught_up += 1;
            }
        }
    }

    /// At the old authority: the gateway it offered `conv` to declined; it is the authority
    /// again.
    pub(super) fn on_declined(
        &mut self,
        now: Instant,
        peer: &str,
        conv: ConversationId,
        term: u64,
        reason: String,
    ) {
        let since = self.spanning.frozen_since(conv);
        if self.spanning.moving_to(conv) != Some(peer)
            || !self.spanning.thaw(conv, term, self.fx.writes())
        {
            self.handover_stats.refused += 1;
            return;
        }
        self.handover_stats.declined += 1;
        self.fx.hold(GatewayOutput::HandedOver(HandedOver {
            conversation: conv,
            to: peer.to_string(),
            last_seq: self.delivery.head(conv).unwrap_or(0),
            frozen_for: since.map_or(Duration::ZERO, |at| now.saturating_since(at)),
            declined: Some(reason),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MemStore;
    use crate::federation::entry::Outcome;
    use crate::federation::handshake::PeerConfig;
    use crate::federation::link::FEDERATION_OUTBOX_TABLE;
    use crate::gateway::{AdminCommand, GatewayConfig};
    use crate::ids::MsgId;
    use crate::testing::{drain_gateway, TestEntropy};
    use crate::wire::payload::ErrorCode;
    use bytes::Bytes;

    const NOW: Instant = Instant(1_000_000_000);
    const CONV: ConversationId = ConversationId(0xC0);
    const DOMAINS: [&str; 3] = ["a.example", "b.example", "c.example"];
    /// One member device per domain, by index.
    const DEVICES: [DeviceId; 3] = [DeviceId(0xA1), DeviceId(0xB1), DeviceId(0xC1)];

    /// Three gateways that federate with each other (or with those `peers` names), their
    /// stores, and which outbox entries each has handed on.
    struct World {
        gateways: Vec<(Gateway, MemStore)>,
        delivered: BTreeSet<Vec<u8>>,
        /// Links (from, to) that hand nothing on for now.
        cut: BTreeSet<(usize, usize)>,
        outputs: Vec<GatewayOutput>,
    }

    impl World {
        fn new(peers: impl Fn(usize) -> Vec<usize>) -> World {
            let mut gateways: Vec<(Gateway, MemStore)> = (0..3)
                .map(|i| {
                    let config = GatewayConfig {
                        domain: DOMAINS[i].into(),
                        federation_peers: peers(i)
                            .into_iter()
                            .map(|p| PeerConfig {
                                domain: DOMAINS[p].into(),
                                root_fingerprint: "00".repeat(16),
                            })
                            .collect(),
                        ..GatewayConfig::default()
                    };
                    let mut store = MemStore::default();
                    let mut g = Gateway::new(config, NOW, Box::new(TestEntropy(10 + i as u64)));
                    drain_gateway(&mut g, &mut store);
                    (g, store)
                })
                .collect();
            let keys: Vec<_> = gateways
                .iter()
                .map(|(g, _)| g.federation().unwrap().link_key())
                .collect();
            for (i, (g, _)) in gateways.iter_mut().enumerate() {
                for p in peers(i) {
                    g.federation
                        .as_mut()
                        .unwrap()
                        .assume_peer_key(DOMAINS[p], keys[p]);
                }
            }
            World {
                gateways,
                delivered: BTreeSet::new(),
                cut: BTreeSet::new(),
                outputs: Vec::new(),
            }
        }

        /// A conversation homed at a.example with a member device in each domain.
        fn shared() -> World {
            let mut w = World::new(|i| (0..3).filter(|p| *p != i).collect());
            w.admin(0, AdminCommand::CreateConversation(CONV, vec![DEVICES[0]]));
            for i in 1..3 {
                w.admin(
                    0,
                    AdminCommand::ShareConversation {
                        conversation: CONV,
                        domain: DOMAINS[i].into(),
                        members: vec![DEVICES[i]],
                    },
                );
            }
            w.settle();
            w
        }

        fn admin(&mut self, at: usize, command: AdminCommand) -> AdminAnswer {
            let (g, store) = &mut self.gateways[at];
            let (answer, outputs) = g.run_admin(NOW, command, store).unwrap();
            self.outputs.extend(outputs);
            answer
        }

        /// Hands on every queued entry on links that are not cut, until none is left.
        fn settle(&mut self) {
            loop {
                let mut moved = false;
                for (from, domain) in DOMAINS.iter().enumerate() {
                    let rows: Vec<(Vec<u8>, Vec<u8>)> = self.gateways[from]
                        .1
                        .records()
                        .filter(|(t, k, _)| {
                            *t == FEDERATION_OUTBOX_TABLE.0
                                && !self.delivered.contains(&[&[from as u8][..], k].concat())
                        })
                        .map(|(_, k, v)| (k.to_vec(), v.to_vec()))
                        .collect();
                    for (key, value) in rows {
                        let peer = std::str::from_utf8(&key[1..1 + usize::from(key[0])]).unwrap();
                        let to = DOMAINS.iter().position(|d| *d == peer).unwrap();
                        if self.cut.contains(&(from, to)) {
                            continue;
                        }
                        self.delivered.insert([&[from as u8][..], &key].concat());
                        let (g, store) = &mut self.gateways[to];
                        g.handle_entry(NOW, domain, Entry::decode(&value).unwrap());
                        self.outputs.extend(drain_gateway(g, store));
                        moved = true;
                        self.check_single_authority();
                    }
                }
                if !moved {
                    return;
                }
            }
        }

        fn check_single_authority(&self) {
            let sequencing = self
                .gateways
                .iter()
                .filter(|(g, _)| g.sequences(CONV))
                .count();
            assert!(
                sequencing <= 1,
                "{sequencing} gateways sequence the conversation"
            );
        }

        /// The device of domain `from` sends `msg` through its gateway, which relays it to
        /// gateway `to` (another domain's).
        fn relay(&mut self, from: usize, to: usize, msg: u128) {
            let (g, store) = &mut self.gateways[to];
            g.handle_entry(
                NOW,
                DOMAINS[from],
                Entry::Relay {
                    conversation: CONV,
                    sender: DEVICES[from],
                    msg_id: MsgId(msg),
                    after: None,
                    body: Bytes::from(format!("message {msg}")),
                    welcome: None,
                    vouched: Vec::new(),
                },
            );
            self.outputs.extend(drain_gateway(g, store));
        }

        fn bodies(&self, at: usize) -> Vec<String> {
            let log = self.gateways[at].0.delivery.log(CONV).unwrap();
            (1..=log.head())
                .map(|s| String::from_utf8(log.get(s).unwrap().body.to_vec()).unwrap())
                .collect()
        }

        fn last_answer(&self, at: usize) -> Outcome {
            let (_, store) = &self.gateways[at];
            crate::testing::queued_entries(store)
                .into_iter()
                .filter_map(|entry| match entry {
                    Entry::Answer { outcome, .. } => Some(outcome),
                    _ => None,
                })
                .last()
                .expect("an answer")
        }
    }

    #[test]
    fn a_handover_moves_the_authority_and_every_replica_follows_without_a_gap() {
        let mut w = World::shared();
        w.relay(2, 0, 1);
        w.settle();
        assert_eq!(w.bodies(1), ["message 1"]);
        let answer = w.admin(
            0,
            AdminCommand::Handover {
                conversation: CONV,
                to: "b.example".into(),
            },
        );
        assert_eq!(
            answer,
            AdminAnswer::HandoverStarted {
                conversation: CONV,
                to: "b.example".into(),
                last_seq: 1
            }
        );
        // Frozen: a relay that reaches the old authority now is answered authority_moving,
        // and nothing is sequenced.
        w.relay(2, 0, 2);
        let Outcome::Refused { code, message, .. } = w.last_answer(0) else {
            panic!("refused");
        };
        assert_eq!(code, ErrorCode::AuthorityMoving);
        assert!(message.contains("moving to b.example"), "{message}");
        assert!(!w.gateways[0].0.sequences(CONV));
        // A frozen authority that restarts is still frozen.
        let (g, store) = &w.gateways[0];
        let again =
            Gateway::recover(g.config.clone(), NOW, store, Box::new(TestEntropy(4))).unwrap();
        assert_eq!(again.spanning.moving_to(CONV), Some("b.example"));
        w.settle();
        assert!(w.gateways[1].0.sequences(CONV));
        assert_eq!(w.gateways[0].0.replica_of(CONV), Some("b.example"));
        assert_eq!(w.gateways[2].0.replica_of(CONV), Some("b.example"));
        let done = w
            .outputs
            .iter()
            .find_map(|o| match o {
                GatewayOutput::HandedOver(h) => Some(h.clone()),
                _ => None,
            })
            .expect("reported");
        assert_eq!((done.to.as_str(), done.last_seq), ("b.example", 1));
        assert_eq!(done.declined, None);
        // The message sent again goes through its gateway to the new authority, at seq 2;
        // the old authority's devices read it from its replica, and write through it too.
        w.relay(2, 1, 2);
        w.relay(0, 1, 3);
        w.settle();
        for at in 0..3 {
            assert_eq!(
                w.bodies(at),
                ["message 1", "message 2", "message 3"],
                "at {at}"
            );
        }
        let stats = |at: usize| w.gateways[at].0.stats().handover;
        assert_eq!((stats(0).started, stats(1).taken), (1, 1));
        assert_eq!((stats(0).followed, stats(2).followed), (1, 1));
        // And back: a second handover in term 2.
        let answer = w.admin(
            1,
            AdminCommand::Handover {
                conversation: CONV,
                to: "a.example".into(),
            },
        );
        assert!(
            matches!(answer, AdminAnswer::HandoverStarted { last_seq: 3, .. }),
            "{answer:?}"
        );
        w.settle();
        assert!(w.gateways[0].0.sequences(CONV));
        assert_eq!(w.gateways[0].0.spanning.term(CONV), Some(2));
        assert_eq!(w.gateways[2].0.replica_of(CONV), Some("a.example"));
    }

    #[test]
    fn a_member_cut_off_from_the_old_authority_takes_its_last_messages_then_follows_the_new_one() {
        let mut w = World::shared();
        // c.example hears nothing from a.example from here on.
        w.cut.insert((0, 2));
        w.relay(1, 0, 1);
        w.relay(1, 0, 2);
        w.admin(
            0,
            AdminCommand::Handover {
                conversation: CONV,
                to: "b.example".into(),
            },
        );
        w.settle();
        // The certificate came first: c.example follows b.example, but still takes the old
        // authority's last messages from it, and b.example sends it nothing meanwhile.
        assert_eq!(w.gateways[2].0.replica_of(CONV), Some("b.example"));
        assert_eq!(
            w.gateways[2].0.spanning.previous_of(CONV),
            Some(("a.example", 2))
        );
        w.relay(2, 1, 3);
        w.settle();
        assert!(w.bodies(2).is_empty());
        // b.example keeps what it sequenced for c.example, however far its own members read.
        assert!(w.gateways[1].0.delivery.log(CONV).unwrap().get(3).is_some());
        // A further handover waits until every member gateway follows.
        let refused = w.admin(
            1,
            AdminCommand::Handover {
                conversation: CONV,
                to: "a.example".into(),
            },
        );
        let AdminAnswer::HandoverRefused { why, .. } = refused else {
            panic!("{refused:?}");
        };
        assert!(why.contains("c.example has not caught up"), "{why}");
        w.cut.clear();
        w.settle();
        for at in 0..3 {
            assert_eq!(
                w.bodies(at),
                ["message 1", "message 2", "message 3"],
                "at {at}"
            );
        }
        assert_eq!(w.gateways[2].0.spanning.previous_of(CONV), None);
        assert_eq!(w.gateways[1].0.stats().handover.caught_up, 1);
    }

    #[test]
    fn a_member_that_hears_of_the_handover_before_the_conversation_opens_it_from_the_old_authority()
    {
        let mut w = World::new(|i| (0..3).filter(|p| *p != i).collect());
        // c.example hears nothing from a.example, not even the conversation's Open.
        w.cut.insert((0, 2));
        w.admin(0, AdminCommand::CreateConversation(CONV, vec![DEVICES[0]]));
        for i in 1..3 {
            w.admin(
                0,
                AdminCommand::ShareConversation {
                    conversation: CONV,
                    domain: DOMAINS[i].into(),
                    members: vec![DEVICES[i]],
                },
            );
        }
        w.relay(1, 0, 1);
        w.admin(
            0,
            AdminCommand::Handover {
                conversation: CONV,
                to: "b.example".into(),
            },
        );
        w.settle();
        assert_eq!(w.gateways[2].0.replica_of(CONV), Some("b.example"));
        assert_eq!(w.gateways[2].0.conversation_head(CONV), None);
        w.relay(0, 1, 2);
        w.cut.clear();
        w.settle();
        for at in 0..3 {
            assert_eq!(w.bodies(at), ["message 1", "message 2"], "at {at}");
        }
        assert!(w.gateways[2]
            .0
            .delivery
            .log(CONV)
            .unwrap()
            .is_member(DEVICES[2]));
        assert!(w.gateways[1]
            .0
            .spanning
            .home(CONV)
            .unwrap()
            .waiting
            .is_empty());
    }

    #[test]
    fn a_gateway_that_cannot_reach_every_member_domain_declines_and_the_old_one_goes_on() {
        // b.example federates with a.example only, so it could not serve c.example.
        let mut w = World::new(|i| match i {
            0 => vec![1, 2],
            1 => vec![0],
            _ => vec![0],
        });
        w.admin(0, AdminCommand::CreateConversation(CONV, vec![DEVICES[0]]));
        for i in 1..3 {
            w.admin(
                0,
                AdminCommand::ShareConversation {
                    conversation: CONV,
                    domain: DOMAINS[i].into(),
                    members: vec![DEVICES[i]],
                },
            );
        }
        // Refused in words before anything freezes.
        let refused = w.admin(
            0,
            AdminCommand::Handover {
                conversation: ConversationId(0xEE),
                to: "b.example".into(),
            },
        );
        let AdminAnswer::HandoverRefused { why, .. } = refused else {
            panic!("{refused:?}");
        };
        assert!(why.contains("share it with b.example first"), "{why}");
        w.admin(
            0,
            AdminCommand::Handover {
                conversation: CONV,
                to: "b.example".into(),
            },
        );
        w.settle();
        assert!(w.gateways[0].0.sequences(CONV));
        assert_eq!(w.gateways[1].0.replica_of(CONV), Some("a.example"));
        let declined = w
            .outputs
            .iter()
            .find_map(|o| match o {
                GatewayOutput::HandedOver(h) => h.declined.clone(),
                _ => None,
            })
            .expect("reported");
        assert!(
            declined.contains("does not federate with c.example"),
            "{declined}"
        );
        // The old authority sequences again, and the next handover is term 1 again.
        w.relay(2, 0, 1);
        w.settle();
        assert_eq!(w.bodies(1), ["message 1"]);
        assert_eq!(w.gateways[0].0.spanning.term(CONV), Some(0));
    }

    #[test]
    fn an_mls_group_moves_with_its_handover_once_the_peer_told_its_key() {
        use crate::env::WriteBatch;
        use crate::gateway::groups::GroupState;
        use crate::ids::UserId;
        use crate::mls::group_ops::GroupKind;
        let mut w = World::shared();
        let group = GroupState::create(GroupKind::Room, DEVICES[0], UserId(1));
        w.gateways[0]
            .0
            .groups
            .set_state(CONV, group.clone(), &mut WriteBatch::default());
        let hand_over = |w: &mut World| {
            w.admin(
                0,
                AdminCommand::Handover {
                    conversation: CONV,
                    to: "b.example".into(),
                },
            )
        };
        // b.example has not told its MLS key yet: refused in words, nothing frozen.
        let refused = hand_over(&mut w);
        let AdminAnswer::HandoverRefused { why, .. } = refused else {
            panic!("{refused:?}");
        };
        assert!(why.contains("has not told this gateway the key"), "{why}");
        assert!(w.gateways[0].0.sequences(CONV));
        // Each gateway tells its peers once (a driver's first federation input does it).
        for i in 0..3 {
            let (g, store) = &mut w.gateways[i];
            g.announce_external_key();
            w.outputs.extend(drain_gateway(g, store));
        }
        w.settle();
        let head = w.gateways[0].0.delivery.head(CONV).unwrap_or(0);
        let started = hand_over(&mut w);
        assert!(
            matches!(started, AdminAnswer::HandoverStarted { .. }),
            "{started:?}"
        );
        w.settle();
        // b.example sequences it now, with the group as a.example kept it, and the proposal
        // naming its key as the first message of its term; a.example forgot the group.
        assert!(w.gateways[1].0.sequences(CONV));
        let b_key: [u8; 32] = {
            let (g, _) = &mut w.gateways[1];
            let key = g
                .groups
                .external_key(g.entropy.as_mut(), &mut WriteBatch::default());
            key.try_into().unwrap()
        };
        let moved = w.gateways[1].0.groups.get(CONV).expect("the group moved");
        assert_eq!(moved.epoch(), group.epoch());
        assert_eq!(moved.devices(), group.devices());
        assert_eq!(moved.external_pending(), Some(b_key));
        assert!(!w.gateways[0].0.groups.contains(CONV));
        assert_eq!(w.gateways[1].0.delivery.head(CONV), Some(head + 1));
        let log = w.gateways[1].0.delivery.log(CONV).unwrap();
        let proposal = &log.get(head + 1).unwrap().body;
        let (framing, _) = crate::mls::commit_authority::read_message(proposal).unwrap();
        assert_eq!(framing.kind, crate::mls::commit_authority::Kind::Proposal);
        // The member gateways follow and take it too.
        assert_eq!(w.gateways[2].0.delivery.head(CONV), Some(head + 1));
        // A second handover waits for a commit taking the new key.
        let again = w.admin(
            1,
            AdminCommand::Handover {
                conversation: CONV,
                to: "c.example".into(),
            },
        );
        let AdminAnswer::HandoverRefused { why, .. } = again else {
            panic!("{again:?}");
        };
        assert!(why.contains("no commit has taken"), "{why}");
    }

    #[test]
    fn a_certificate_not_signed_by_the_new_authority_is_refused() {
        let mut w = World::shared();
        let statement = HandoverCertificate::statement(CONV, 1, "a.example", "c.example", 0, 0);
        let forged = Entry::Moved {
            conversation: CONV,
            certificate: HandoverCertificate {
                term: 1,
                from: "a.example".into(),
                to: "c.example".into(),
                last_seq: 0,
                epoch: 0,
                from_signature: [0; 64],
                to_signature: w.gateways[2].0.federation().unwrap().sign(&statement),
            },
        };
        // From c.example itself, but a.example never signed it; and relayed by b.example.
        w.gateways[1]
            .0
            .handle_entry(NOW, "c.example", forged.clone());
        w.gateways[1].0.handle_entry(NOW, "b.example", forged);
        assert_eq!(w.gateways[1].0.stats().handover.refused, 2);
        assert_eq!(w.gateways[1].0.replica_of(CONV), Some("a.example"));
        // Signed by both, but a.example never handed it over: the authority follows no one.
        let statement = HandoverCertificate::statement(CONV, 1, "a.example", "c.example", 0, 0);
        let both = Entry::Moved {
            conversation: CONV,
            certificate: HandoverCertificate {
                term: 1,
                from: "a.example".into(),
                to: "c.example".into(),
                last_seq: 0,
                epoch: 0,
                from_signature: w.gateways[0].0.federation().unwrap().sign(&statement),
                to_signature: w.gateways[2].0.federation().unwrap().sign(&statement),
            },
        };
        w.gateways[0].0.handle_entry(NOW, "c.example", both);
        assert_eq!(w.gateways[0].0.stats().handover.refused, 1);
        assert!(w.gateways[0].0.sequences(CONV));
    }
}
