//! Who makes a DM between users of two domains (issue 15, step 3). A DM's id follows from its
//! two users (`node::dm_id`), so alice@a and bob@b starting it at once would each make it at
//! their own gateway: two authorities for one conversation, each side's messages never
//! reaching the other. Before it sequences a device's creating commit of a DM that adds another
//! domain's devices, a gateway asks that domain's gateway for the DM
//! ([`Entry::DmClaim`](crate::federation::entry::Entry::DmClaim)); the device is told to send
//! the commit again shortly (`authority_moving`, with a hint), and by then the answer is here:
//!
//! - **granted**: the peer will never make this DM; the commit is sequenced here;
//! - **made there**: the peer has it (or is making it): the commit is refused `stale_epoch`,
//!   as a second creation is at home, and the device joins from the Welcome the peer's
//!   gateway sends;
//! - **refused**: the peer takes no more claims from this gateway; the creation fails with
//!   words (`conversation_quota`).
//!
//! A DM with a domain this gateway does not federate with is refused `unknown_domain`, and
//! the device drops the request.
//!
//! The peer grants a claim unless the DM exists there, or one of its own devices is making
//! it and its domain sorts before the asker's (both ask at once: the lower domain wins, and
//! both sides see it the same way). A grant is durable at the granting gateway
//! ([`DM_YIELDED_TABLE`], written in the batch that queues the answer), so its own devices'
//! later creations are refused `stale_epoch` and wait for the Welcome. A question out is
//! durable too ([`DM_ASKING_TABLE`], written with the claim it queues): a claim outlives a
//! crash in the link's outbox, and a gateway that forgot it had asked would grant the peer's
//! crossing claim while the peer grants its own, and neither would make the DM (found by
//! `federation-dm-race` seed 9). Answers wait in memory for their device's next try (after a
//! restart the gateway asks again, and one that granted a claim grants it again).
//!
//! **Grants lapse.** A device whose DM was granted may never send its commit again (gone for
//! good), and the other user would wait for a Welcome that does not come. So a grant made to
//! a peer lapses after [`DM_CLAIM_LAPSE`] if the DM has not reached this gateway by then
//! (made at the peer, its Welcome brings a replica here, and the question never arises
//! again): this gateway's next creation of it asks the peer anew. At the peer, likewise, a
//! grant its own device never used lapses: the peer's question is then granted, and the
//! device, if it comes back, joins from the Welcome. A device that lost a creation tries again
//! after `NodeConfig::dm_welcome_patience` without a Welcome, so the other user gets the DM
//! about [`DM_CLAIM_LAPSE`] after the first one left. Both ends agree whichever question or
//! creation comes first: a DM made anywhere answers every later question `made there`.
//!
//! A DM between two users of one domain needs no claim.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::federation::entry::{DmClaimAnswer, Entry};
use crate::ids::{ConversationId, MsgId};
use crate::mls::group_ops::GroupKind;
use crate::time::Instant;
use crate::wire::payload::ErrorCode;
use crate::wire::Routing;

use super::groups::GroupEffect;
use super::{Gateway, Refusal};

/// The DMs this gateway let a peer make: conversation id → the peer's domain.
pub const DM_YIELDED_TABLE: Table = Table("dm_claims_yielded");
/// The claims this gateway asked of peers and has no answer to: conversation id → the peer.
pub const DM_ASKING_TABLE: Table = Table("dm_claims_asking");
/// How long a device whose DM creation waits for the peer's answer waits before sending its
/// commit again (a link round trip is far less).
pub const DM_CLAIM_RETRY: Duration = Duration::from_millis(500);
/// DMs one peer may claim here: far beyond the DMs its users start with this domain's, a bound
/// on what a hostile peer can make this gateway store.
pub const YIELDED_PER_PEER_MAX: usize = 1_000_000;
/// Claims asked of peers and not answered yet, all peers together.
pub const ASKING_MAX: usize = 10_000;
/// How long a grant holds (see the module docs): far beyond a device's retry of its commit
/// (0.5 s) or a reconnect, and twice a losing device's patience for its Welcome.
pub const DM_CLAIM_LAPSE: Duration = Duration::from_secs(10 * 60);
/// The first byte of a grant's row that carries its time (a domain never starts with it).
const TIMED: u8 = 0xFF;

/// Counters of DM claims, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DmClaimStats {
    /// Claims this gateway asked of peers.
    pub asked: u64,
    /// Answers: the peer granted the DM to this gateway.
    pub granted: u64,
    /// Answers: the DM was made (or being made) at the peer.
    pub made_there: u64,
    /// Answers: the peer refused.
    pub refused_there: u64,
    /// Answers that matched no question (a duplicate, or after this gateway yielded).
    pub answers_unmatched: u64,
    /// Peers' claims granted (including a peer asking again).
    pub peer_claims_granted: u64,
    /// Peers' claims answered "made here".
    pub peer_claims_made_here: u64,
    /// Peers' claims refused (past [`YIELDED_PER_PEER_MAX`]).
    pub peer_claims_refused: u64,
    /// Local creations told to send again while their claim waited.
    pub creations_waited: u64,
    /// Local creations refused because the DM is (being) made at a peer.
    pub creations_made_there: u64,
    /// Grants to peers that lapsed unused: the DM is asked for anew.
    pub grants_lapsed: u64,
    /// Grants by peers that this gateway's device never used, dropped for the peer's question.
    pub answers_lapsed: u64,
}

/// What a local creating commit of a DM across domains may do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Creation {
    /// Sequence it: the peer granted the DM to this gateway.
    Go,
    /// Ask the peer (the caller sends the claim), and tell the device to send it again.
    Ask,
    /// The claim is out: tell the device to send it again.
    Wait,
    /// The DM is (being) made at this peer's gateway: refuse as a second creation.
    MadeAt(String),
    /// The creation cannot go ahead; why.
    Refused(String),
}

/// Claims on DMs across domains, at both ends.
#[derive(Clone, Debug, Default)]
pub struct DmClaims {
    /// DMs granted to a peer, and when (durable, [`DM_YIELDED_TABLE`]).
    yielded: BTreeMap<ConversationId, (String, Instant)>,
    /// How many DMs each peer was granted.
    yielded_per_peer: BTreeMap<String, usize>,
    /// Claims asked and not answered: DM → the peer asked.
    asking: BTreeMap<ConversationId, String>,
    /// Answers waiting for their device to send its commit again, and when they came.
    answers: BTreeMap<ConversationId, (String, DmClaimAnswer, Instant)>,
    stats: DmClaimStats,
}

impl DmClaims {
    /// Reads the DMs granted to peers and the questions out back from `store`.
    pub fn recover(store: &dyn StoreRead) -> Result<DmClaims, StoreError> {
        let mut claims = DmClaims::default();
        for table in [DM_YIELDED_TABLE, DM_ASKING_TABLE] {
            scan_all(store, table, |key, value| {
                let corrupt = || StoreError::Corrupt {
                    table: table.0,
                    reason: "a DM claim that does not decode".into(),
                };
                let key: [u8; 16] = key.try_into().map_err(|_| corrupt())?;
                let conv = ConversationId::from_bytes(key);
                // A grant's row: TIMED, its time (µs, big-endian), the peer; rows written
                // before grants lapsed hold the peer alone (granted at time 0: long ago).
                let (at, value) = match value {
                    [TIMED, rest @ ..] if table == DM_YIELDED_TABLE && rest.len() >= 8 => (
                        Instant(u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"))),
                        &rest[8..],
                    ),
                    _ => (Instant(0), value),
                };
                let peer = std::str::from_utf8(value)
                    .map_err(|_| corrupt())?
                    .to_string();
                if table == DM_YIELDED_TABLE {
                    claims.note_yielded(conv, peer, at);
                } else {
                    claims.asking.insert(conv, peer);
                }
                Ok(())
            })?;
        }
        Ok(claims)
    }

    /// Counters.
    pub fn stats(&self) -> DmClaimStats {
        self.stats
    }

    /// The peer `conv` was granted to, if any.
    pub fn yielded_to(&self, conv: ConversationId) -> Option<&str> {
        self.yielded.get(&conv).map(|(peer, _)| peer.as_str())
    }

    fn note_yielded(&mut self, conv: ConversationId, peer: String, at: Instant) {
        *self.yielded_per_peer.entry(peer.clone()).or_default() += 1;
        if let Some((before, _)) = self.yielded.insert(conv, (peer, at)) {
            self.forget_count(&before);
        }
    }

    fn forget_count(&mut self, peer: &str) {
        if let Some(count) = self.yielded_per_peer.get_mut(peer) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.yielded_per_peer.remove(peer);
            }
        }
    }

    /// A device of this gateway sent a commit creating the DM `conv`, which adds devices of
    /// `peer`: what it may do now.
    pub fn creation(
        &mut self,
        now: Instant,
        conv: ConversationId,
        peer: &str,
        writes: &mut WriteBatch,
    ) -> Creation {
        if let Some((owner, at)) = self.yielded.get(&conv) {
            if now.saturating_since(*at) < DM_CLAIM_LAPSE {
                self.stats.creations_made_there += 1;
                return Creation::MadeAt(owner.clone());
            }
            // Granted long ago and never made (it would be known here): ask anew.
            let owner = owner.clone();
            self.yielded.remove(&conv);
            self.forget_count(&owner);
            writes.delete(DM_YIELDED_TABLE, conv.to_bytes().to_vec());
            self.stats.grants_lapsed += 1;
        }
        match self.answers.get(&conv) {
            Some((asked, DmClaimAnswer::Granted, _)) if asked == peer => return Creation::Go,
            Some((asked, DmClaimAnswer::MadeHere, _)) => {
                self.stats.creations_made_there += 1;
                return Creation::MadeAt(asked.clone());
            }
            Some((asked, DmClaimAnswer::Refused, _)) => {
                let message = format!("{asked} takes no more new DMs from this domain");
                // Asked again at the next try.
                self.answers.remove(&conv);
                return Creation::Refused(message);
            }
            _ => {}
        }
        self.stats.creations_waited += 1;
        if self.asking.contains_key(&conv) {
            return Creation::Wait;
        }
        if self.asking.len() >= ASKING_MAX {
            return Creation::Wait;
        }
        self.asking.insert(conv, peer.to_string());
        writes.put(
            DM_ASKING_TABLE,
            conv.to_bytes().to_vec(),
            peer.as_bytes().to_vec(),
        );
        self.stats.asked += 1;
        Creation::Ask
    }

    /// The claim for `conv` could not be sent: asked again at the device's next try.
    pub fn ask_failed(&mut self, conv: ConversationId, writes: &mut WriteBatch) {
        self.forget_question(conv, writes);
    }

    fn forget_question(&mut self, conv: ConversationId, writes: &mut WriteBatch) {
        if self.asking.remove(&conv).is_some() {
            writes.delete(DM_ASKING_TABLE, conv.to_bytes().to_vec());
        }
    }

    /// `conv` was created here: its answer is spent.
    pub fn created(&mut self, conv: ConversationId) {
        self.answers.remove(&conv);
    }

    /// `peer` claims the DM `conv`; `made_here`: this gateway has it. `own` is this gateway's
    /// domain. A grant is written to `writes`.
    pub fn on_claim(
        &mut self,
        now: Instant,
        conv: ConversationId,
        peer: &str,
        own: &str,
        made_here: bool,
        writes: &mut WriteBatch,
    ) -> DmClaimAnswer {
        if made_here {
            self.stats.peer_claims_made_here += 1;
            return DmClaimAnswer::MadeHere;
        }
        if let Some((owner, _)) = self.yielded.get(&conv) {
            if owner == peer {
                // Asked again (it restarted, or its device tried again): the same answer.
                self.stats.peer_claims_granted += 1;
                return DmClaimAnswer::Granted;
            }
            // Granted to a third domain: a DM holds two users, so one of them is wrong.
            self.stats.peer_claims_refused += 1;
            return DmClaimAnswer::Refused;
        }
        let ours_first = self.asking.contains_key(&conv) && own < peer;
        let ours_granted = match self.answers.get(&conv) {
            Some((_, DmClaimAnswer::Granted, at))
                if now.saturating_since(*at) >= DM_CLAIM_LAPSE =>
            {
                // The peer granted it here long ago and this gateway's device never came back
                // to make it: the peer's user makes it now.
                self.stats.answers_lapsed += 1;
                false
            }
            Some((_, DmClaimAnswer::Granted, _)) => true,
            _ => false,
        };
        if ours_first || ours_granted {
            // Both asked at once and this domain sorts first, or the peer granted it here
            // already (then it does not ask; answered all the same).
            self.stats.peer_claims_made_here += 1;
            return DmClaimAnswer::MadeHere;
        }
        if self.yielded_per_peer.get(peer).copied().unwrap_or(0) >= YIELDED_PER_PEER_MAX {
            self.stats.peer_claims_refused += 1;
            return DmClaimAnswer::Refused;
        }
        let mut row = vec![TIMED];
        row.extend_from_slice(&now.0.to_be_bytes());
        row.extend_from_slice(peer.as_bytes());
        writes.put(DM_YIELDED_TABLE, conv.to_bytes().to_vec(), row);
        self.note_yielded(conv, peer.to_string(), now);
        // Our own question, if any, is moot: our devices wait for the peer's Welcome.
        self.forget_question(conv, writes);
        self.answers.remove(&conv);
        self.stats.peer_claims_granted += 1;
        DmClaimAnswer::Granted
    }

    /// `peer` answered this gateway's claim on `conv`.
    pub fn on_answer(
        &mut self,
        now: Instant,
        conv: ConversationId,
        peer: &str,
        answer: DmClaimAnswer,
        writes: &mut WriteBatch,
    ) {
        if self.asking.get(&conv).map(String::as_str) != Some(peer) {
            self.stats.answers_unmatched += 1;
            return;
        }
        self.forget_question(conv, writes);
        match answer {
            DmClaimAnswer::Granted => self.stats.granted += 1,
            DmClaimAnswer::MadeHere => self.stats.made_there += 1,
            DmClaimAnswer::Refused => self.stats.refused_there += 1,
        }
        self.answers.insert(conv, (peer.to_string(), answer, now));
    }
}

impl Gateway {
    /// A device's commit `msg_id` creates `conv` with `effect`: if it is a DM adding another
    /// domain's devices, whether that domain's gateway lets this one make it (see the module
    /// docs). `Err` is the device's answer for now.
    pub(super) fn claim_dm(
        &mut self,
        now: Instant,
        conv: ConversationId,
        msg_id: MsgId,
        effect: &GroupEffect,
    ) -> Result<(), Refusal> {
        if effect.state.kind() != GroupKind::Dm {
            return Ok(());
        }
        let own = self.config.domain.clone();
        let Some(peer) = effect.dm_with.clone().filter(|peer| *peer != own) else {
            return Ok(());
        };
        let routing = Routing {
            conversation: conv,
            ..Routing::default()
        };
        let wait = |peer: &str| {
            let message = format!(
                "asking {peer} whether this DM is being made there already; send it again shortly"
            );
            Refusal::error(ErrorCode::AuthorityMoving, message)
                .in_conversation(routing)
                .about(msg_id)
                .retry_after(DM_CLAIM_RETRY)
        };
        match self.dm_claims.creation(now, conv, &peer, self.fx.writes()) {
            Creation::Go => Ok(()),
            Creation::Wait => Err(wait(&peer)),
            Creation::Ask => {
                let claim = Entry::DmClaim { conversation: conv };
                if self.send_entry(&peer, &claim).is_err() {
                    // Not a peer of this gateway (a claim is far smaller than any frame).
                    self.dm_claims.ask_failed(conv, self.fx.writes());
                    let message = format!(
                        "this gateway does not federate with {peer}: its operator lists the \
                         domains it does in [[federation.peer]]"
                    );
                    return Err(Refusal::error(ErrorCode::UnknownDomain, message)
                        .in_conversation(routing)
                        .about(msg_id));
                }
                Err(wait(&peer))
            }
            Creation::MadeAt(owner) => {
                let message = format!(
                    "this DM is made at {owner}; join it from the Welcome that comes from there"
                );
                Err(Refusal::error(ErrorCode::StaleEpoch, message)
                    .in_conversation(routing)
                    .about(msg_id))
            }
            Creation::Refused(message) => {
                Err(Refusal::error(ErrorCode::ConversationQuota, message)
                    .in_conversation(routing)
                    .about(msg_id))
            }
        }
    }

    /// `peer` claims the DM `conv` (see the module docs): answered at once.
    pub(super) fn on_dm_claim(&mut self, now: Instant, peer: &str, conv: ConversationId) {
        let made_here = self.delivery.contains(conv) || self.groups.contains(conv);
        let own = self.config.domain.clone();
        let answer = self
            .dm_claims
            .on_claim(now, conv, peer, &own, made_here, self.fx.writes());
        let entry = Entry::DmClaimAnswer {
            conversation: conv,
            answer,
        };
        // A peer's link that cannot take one more small entry is beyond help: its gateway
        // asks again when its device does.
        let _ = self.send_entry(peer, &entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{commit_durably, MemStore};
    use std::time::Duration;

    const DM: ConversationId = ConversationId(0xD0);
    const T0: Instant = Instant(1_000_000_000);

    fn yielded_rows(store: &MemStore) -> usize {
        store.table_len(DM_YIELDED_TABLE)
    }

    #[test]
    fn a_creation_asks_once_then_goes_when_granted() {
        let mut claims = DmClaims::default();
        assert_eq!(
            claims.creation(T0, DM, "b.example", &mut WriteBatch::default()),
            Creation::Ask
        );
        assert_eq!(
            claims.creation(T0, DM, "b.example", &mut WriteBatch::default()),
            Creation::Wait
        );
        claims.on_answer(
            T0,
            DM,
            "b.example",
            DmClaimAnswer::Granted,
            &mut WriteBatch::default(),
        );
        assert_eq!(
            claims.creation(T0, DM, "b.example", &mut WriteBatch::default()),
            Creation::Go
        );
        claims.created(DM);
        assert_eq!(claims.stats().asked, 1);
        assert_eq!(claims.stats().granted, 1);
    }

    #[test]
    fn claims_crossing_are_won_by_the_domain_that_sorts_first() {
        let (mut a, mut b) = (DmClaims::default(), DmClaims::default());
        let (mut wa, mut wb) = (WriteBatch::default(), WriteBatch::default());
        assert_eq!(
            a.creation(T0, DM, "b.example", &mut WriteBatch::default()),
            Creation::Ask
        );
        assert_eq!(
            b.creation(T0, DM, "a.example", &mut WriteBatch::default()),
            Creation::Ask
        );
        // Each claim reaches the other side while its own is out.
        let to_b = b.on_claim(T0, DM, "a.example", "b.example", false, &mut wb);
        let to_a = a.on_claim(T0, DM, "b.example", "a.example", false, &mut wa);
        assert_eq!(to_b, DmClaimAnswer::Granted, "b yields to a");
        assert_eq!(to_a, DmClaimAnswer::MadeHere, "a keeps it");
        a.on_answer(T0, DM, "b.example", to_b, &mut WriteBatch::default());
        b.on_answer(T0, DM, "a.example", to_a, &mut WriteBatch::default());
        assert_eq!(
            a.creation(T0, DM, "b.example", &mut WriteBatch::default()),
            Creation::Go
        );
        assert_eq!(
            b.creation(T0, DM, "a.example", &mut WriteBatch::default()),
            Creation::MadeAt("a.example".into())
        );
        assert_eq!(
            b.stats().answers_unmatched,
            1,
            "b had given its question up"
        );
    }

    #[test]
    fn a_question_out_outlives_a_restart_so_crossing_claims_still_pick_one_side() {
        // b asks, crashes, and comes back before c's crossing claim arrives: had it forgotten
        // its question, it would grant c's claim while c grants its own, and neither would
        // make the DM (federation-dm-race seed 9).
        let mut store = MemStore::default();
        let mut b = DmClaims::default();
        let mut writes = WriteBatch::default();
        assert_eq!(b.creation(T0, DM, "c.example", &mut writes), Creation::Ask);
        commit_durably(&mut store, writes).expect("commits");
        let mut b = DmClaims::recover(&store).expect("reads");
        let mut c = DmClaims::default();
        let mut wc = WriteBatch::default();
        assert_eq!(c.creation(T0, DM, "b.example", &mut wc), Creation::Ask);
        let mut wb = WriteBatch::default();
        let to_c = b.on_claim(T0, DM, "c.example", "b.example", false, &mut wb);
        let to_b = c.on_claim(T0, DM, "b.example", "c.example", false, &mut wc);
        assert_eq!(
            (to_c, to_b),
            (DmClaimAnswer::MadeHere, DmClaimAnswer::Granted)
        );
        b.on_answer(T0, DM, "c.example", to_b, &mut wb);
        commit_durably(&mut store, wb).expect("commits");
        assert_eq!(
            b.creation(T0, DM, "c.example", &mut WriteBatch::default()),
            Creation::Go
        );
        assert_eq!(
            store.table_len(DM_ASKING_TABLE),
            0,
            "the answered question is gone"
        );
    }

    #[test]
    fn a_grant_is_durable_and_given_again_to_the_same_peer_only() {
        let mut store = MemStore::default();
        let mut claims = DmClaims::default();
        let mut writes = WriteBatch::default();
        let answer = claims.on_claim(T0, DM, "b.example", "a.example", false, &mut writes);
        assert_eq!(answer, DmClaimAnswer::Granted);
        commit_durably(&mut store, writes).expect("commits");
        assert_eq!(yielded_rows(&store), 1);
        let mut back = DmClaims::recover(&store).expect("reads");
        assert_eq!(back.yielded_to(DM), Some("b.example"));
        let mut writes = WriteBatch::default();
        assert_eq!(
            back.on_claim(T0, DM, "b.example", "a.example", false, &mut writes),
            DmClaimAnswer::Granted
        );
        assert_eq!(
            back.on_claim(T0, DM, "c.example", "a.example", false, &mut writes),
            DmClaimAnswer::Refused
        );
        // This gateway's own device now waits for b's Welcome.
        assert_eq!(
            back.creation(T0, DM, "b.example", &mut WriteBatch::default()),
            Creation::MadeAt("b.example".into())
        );
    }

    /// alice@a's device asked for the DM, b granted it, and the device never came back: after
    /// the lapse bob@b's creation asks a anew, a drops its unused grant and grants b, and
    /// alice's device, if it comes back, joins from b's Welcome.
    #[test]
    fn a_grant_never_used_lapses_at_both_ends_and_the_other_user_makes_the_dm() {
        let (mut a, mut b) = (DmClaims::default(), DmClaims::default());
        let mut store_b = MemStore::default();
        assert_eq!(
            a.creation(T0, DM, "b.example", &mut WriteBatch::default()),
            Creation::Ask
        );
        let mut wb = WriteBatch::default();
        let granted = b.on_claim(T0, DM, "a.example", "b.example", false, &mut wb);
        commit_durably(&mut store_b, wb).expect("commits");
        assert_eq!(granted, DmClaimAnswer::Granted);
        a.on_answer(T0, DM, "b.example", granted, &mut WriteBatch::default());
        // Before the lapse bob's device waits for a Welcome, across b's restarts too.
        let mut b = DmClaims::recover(&store_b).expect("reads");
        let soon = T0 + DM_CLAIM_LAPSE - Duration::from_secs(1);
        assert_eq!(
            b.creation(soon, DM, "a.example", &mut WriteBatch::default()),
            Creation::MadeAt("a.example".into())
        );
        // After it, b asks a again and no longer counts the grant.
        let later = T0 + DM_CLAIM_LAPSE;
        let mut wb = WriteBatch::default();
        assert_eq!(b.creation(later, DM, "a.example", &mut wb), Creation::Ask);
        commit_durably(&mut store_b, wb).expect("commits");
        assert_eq!(yielded_rows(&store_b), 0);
        assert_eq!(b.yielded_to(DM), None);
        assert_eq!(b.stats().grants_lapsed, 1);
        // a's own grant is as old: it yields to b's question.
        let mut wa = WriteBatch::default();
        let answer = a.on_claim(later, DM, "b.example", "a.example", false, &mut wa);
        assert_eq!(answer, DmClaimAnswer::Granted);
        assert_eq!(a.stats().answers_lapsed, 1);
        b.on_answer(later, DM, "a.example", answer, &mut WriteBatch::default());
        assert_eq!(
            b.creation(later, DM, "a.example", &mut WriteBatch::default()),
            Creation::Go
        );
        assert_eq!(
            a.creation(later, DM, "b.example", &mut WriteBatch::default()),
            Creation::MadeAt("b.example".into()),
            "alice's device, back at last, joins from b's Welcome"
        );
    }

    /// A grant used within the lapse still wins over a later question: a's device came back
    /// in time, so b's question is answered `made here`.
    #[test]
    fn a_grant_used_in_time_still_answers_made_here() {
        let mut a = DmClaims::default();
        a.creation(T0, DM, "b.example", &mut WriteBatch::default());
        a.on_answer(
            T0,
            DM,
            "b.example",
            DmClaimAnswer::Granted,
            &mut WriteBatch::default(),
        );
        let soon = T0 + DM_CLAIM_LAPSE / 2;
        assert_eq!(
            a.on_claim(
                soon,
                DM,
                "b.example",
                "a.example",
                false,
                &mut WriteBatch::default()
            ),
            DmClaimAnswer::MadeHere
        );
    }

    /// A grant's row written before grants lapsed (the peer alone) reads as granted long ago.
    #[test]
    fn a_grant_row_without_a_time_reads_as_old() {
        let mut store = MemStore::default();
        let mut writes = WriteBatch::default();
        writes.put(
            DM_YIELDED_TABLE,
            DM.to_bytes().to_vec(),
            b"b.example".to_vec(),
        );
        commit_durably(&mut store, writes).expect("commits");
        let mut back = DmClaims::recover(&store).expect("reads");
        assert_eq!(back.yielded_to(DM), Some("b.example"));
        assert_eq!(
            back.creation(T0, DM, "b.example", &mut WriteBatch::default()),
            Creation::Ask
        );
    }

    #[test]
    fn a_dm_made_here_is_never_granted() {
        let mut claims = DmClaims::default();
        let mut writes = WriteBatch::default();
        assert_eq!(
            claims.on_claim(T0, DM, "b.example", "z.example", true, &mut writes),
            DmClaimAnswer::MadeHere
        );
        assert!(claims.yielded_to(DM).is_none());
    }

    mod across {
        use bytes::Bytes;

        use super::super::super::test_devices::{device, read, run, Device};
        use super::super::super::test_pair::{Pair, DOMAINS, NOW};
        use crate::ids::{ConversationId, UserId};
        use crate::node::NodeEvent;

        fn alice() -> UserId {
            UserId::of("alice", DOMAINS[0])
        }

        fn bob() -> UserId {
            UserId::of("bob", DOMAINS[1])
        }

        fn joined(d: &Device, conv: ConversationId) -> bool {
            d.events.iter().any(
                |e| matches!(e, NodeEvent::Joined { conversation, .. } if *conversation == conv),
            )
        }

        /// alice and bob say one thing each in `conv`; each reads both, in one order.
        fn talk(w: &mut Pair, devices: &mut [Device], conv: ConversationId) {
            for (at, text) in [(0, &b"hello bob"[..]), (1, &b"hi alice"[..])] {
                devices[at]
                    .node
                    .send(NOW, conv, Bytes::from_static(text))
                    .unwrap();
            }
            run(w, devices);
            for reader in 0..2 {
                assert_eq!(
                    read(&devices[reader], conv, &devices[0]),
                    [&b"hello bob"[..]]
                );
                assert_eq!(
                    read(&devices[reader], conv, &devices[1]),
                    [&b"hi alice"[..]]
                );
            }
        }

        #[test]
        fn a_dm_started_from_both_domains_at_once_is_made_once_at_the_first_domain() {
            let mut w = Pair::new();
            let mut devices = vec![device(0, 61, alice()), device(1, 62, bob())];
            run(&mut w, &mut devices);
            let from_a = devices[0]
                .node
                .create_dm_across(NOW, bob(), DOMAINS[1])
                .unwrap();
            let from_b = devices[1]
                .node
                .create_dm_across(NOW, alice(), DOMAINS[0])
                .unwrap();
            assert_eq!(from_a, from_b, "a DM's id follows from its two users");
            let conv = from_a;
            run(&mut w, &mut devices);
            let (a, b) = (&w.gateways[0].0, &w.gateways[1].0);
            let (sa, sb) = (a.stats().dm_claims, b.stats().dm_claims);
            assert_eq!(
                (sa.asked, sb.asked),
                (1, 1),
                "each side asked: {sa:?} {sb:?}"
            );
            // a.example sorts first: the DM is homed there, and b.example follows it.
            assert_eq!(a.spanning.authority_of(conv), None);
            assert!(a.groups.contains(conv));
            assert_eq!(b.spanning.authority_of(conv), Some(DOMAINS[0]));
            assert!(!b.groups.contains(conv), "b.example never made it");
            assert_eq!(b.dm_claims.yielded_to(conv), Some(DOMAINS[0]));
            assert!(sb.creations_made_there >= 1, "{sb:?}");
            // bob's own creation was refused as a second one; he joined from a's Welcome.
            assert!(joined(&devices[1], conv), "{:?}", devices[1].events);
            talk(&mut w, &mut devices, conv);
        }

        #[test]
        fn a_dm_started_from_the_later_domain_alone_is_homed_there() {
            let mut w = Pair::new();
            let mut devices = vec![device(0, 61, alice()), device(1, 62, bob())];
            run(&mut w, &mut devices);
            let conv = devices[1]
                .node
                .create_dm_across(NOW, alice(), DOMAINS[0])
                .unwrap();
            run(&mut w, &mut devices);
            let (a, b) = (&w.gateways[0].0, &w.gateways[1].0);
            assert_eq!(b.stats().dm_claims.granted, 1);
            assert_eq!(a.dm_claims.yielded_to(conv), Some(DOMAINS[1]));
            assert_eq!(a.spanning.authority_of(conv), Some(DOMAINS[1]));
            assert!(b.groups.contains(conv));
            assert!(joined(&devices[0], conv), "{:?}", devices[0].events);
            // alice starting it now finds it: her device is a member already.
            talk(&mut w, &mut devices, conv);
        }
    }

    #[test]
    fn a_corrupt_grant_row_is_refused_at_recovery() {
        let mut store = MemStore::default();
        let mut writes = WriteBatch::default();
        writes.put(DM_YIELDED_TABLE, vec![1, 2, 3], b"b.example".to_vec());
        commit_durably(&mut store, writes).expect("commits");
        assert!(matches!(
            DmClaims::recover(&store),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
