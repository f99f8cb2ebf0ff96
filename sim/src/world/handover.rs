//! Authority handover in the simulator (issue 15, step 5): the `handover CONV to GATEWAY`
//! action, the `single-authority` invariant, and the handovers' durations in the run report.
//!
//! - The action is what an operator types at the conversation's authority: the gateway that
//!   sequences it when the action fires (if none does, because it is down or a handover is
//!   under way, the action is skipped and counted: an operator would see the refusal).
//! - `single-authority`: after every step of every gateway, at most one gateway that is up
//!   sequences each conversation spanning gateways ([`sund_model::gateway::Gateway::sequences`]);
//!   and at the end, every two gateways holding the same seq of a conversation hold the same
//!   message there (a seq is never assigned twice).

use sund_model::gateway::handover::HandedOver;
use sund_model::gateway::{AdminCommand, Gateway, GatewayInput};
use sund_model::ids::ConversationId;

use super::{ActorIndex, Machine, World};
use crate::scenario::Invariant;

/// What the world saw of handovers.
#[derive(Debug, Default)]
pub(super) struct HandoverWatch {
    /// Handover actions that reached an authority.
    asked: u64,
    /// Handover actions skipped: no gateway up sequenced the conversation then.
    skipped: u64,
    /// Handover commands the authority refused (a member gateway had not caught up since
    /// the last handover, or another is under way).
    refused: u64,
    /// Each handover done (or declined), as its old authority reported it.
    done: Vec<HandedOver>,
}

/// The handovers of a run, for its report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HandoverReport {
    /// Handover actions that reached an authority.
    pub asked: u64,
    /// Handover actions skipped (no gateway up sequenced the conversation).
    pub skipped: u64,
    /// Handover commands the authority refused.
    pub refused: u64,
    /// Handovers done.
    pub done: u64,
    /// Handovers declined.
    pub declined: u64,
    /// The longest time a conversation was frozen, as its old authority timed it (restarts
    /// included), in microseconds.
    pub frozen_max_us: Option<u64>,
    /// The median of those times.
    pub frozen_median_us: Option<u64>,
}

impl World {
    /// `handover CONV to GATEWAY`: the authority of the conversation hands it over.
    pub(super) fn handover_action(&mut self, conversation: &str, to: &str) {
        let Some(&index) = self.conversation_ids.get(conversation) else {
            return;
        };
        let conv = self.conversations[index].id;
        let to = self.resolve(&crate::scenario::Target::Gateway(to.to_string()));
        let Some(domain) = to.first().and_then(|&g| self.federation.domain(g)) else {
            return;
        };
        let Some(authority) = self.sequencing(conv).first().copied() else {
            self.handovers.skipped += 1;
            *self.faults.entry("handover-skipped").or_default() += 1;
            self.note(|_| {
                format!("handover of {conversation} skipped: no gateway up sequences it")
            });
            return;
        };
        self.handovers.asked += 1;
        *self.faults.entry("handover").or_default() += 1;
        self.note(|w| {
            format!(
                "{} hands {conversation} over to {domain}",
                w.actors[authority as usize].name
            )
        });
        self.with_gateway(authority, |g, now| {
            let command = AdminCommand::Handover {
                conversation: conv,
                to: domain,
            };
            g.handle(
                now,
                GatewayInput::Admin {
                    request: 0,
                    command,
                },
            );
        });
    }

    /// An authority refused a handover command.
    pub(super) fn handover_refused(&mut self, why: &str) {
        self.handovers.refused += 1;
        *self.faults.entry("handover-refused").or_default() += 1;
        self.note(|_| format!("handover refused: {why}"));
    }

    /// The gateways up that sequence `conv` now.
    fn sequencing(&self, conv: ConversationId) -> Vec<ActorIndex> {
        self.gateways
            .iter()
            .copied()
            .filter(|&g| match &self.actors[g as usize].machine {
                Machine::Gateway(Some(gateway), _) => gateway.sequences(conv),
                _ => false,
            })
            .collect()
    }

    /// A gateway's old authority reported a handover done or declined: the conversation's
    /// gateway in the world's books follows.
    pub(super) fn handed_over(&mut self, from: ActorIndex, done: HandedOver) {
        if done.declined.is_none() {
            if let Some(to) = self.federation.gateway_of(&done.to) {
                for c in &mut self.conversations {
                    if c.id == done.conversation {
                        c.gateway = to;
                    }
                }
            }
        }
        self.note(|w| {
            format!(
                "{} handed {} over to {} at seq {} after {:.1} ms frozen{}",
                w.actors[from as usize].name,
                done.conversation,
                done.to,
                done.last_seq,
                done.frozen_for.as_micros() as f64 / 1000.0,
                done.declined
                    .as_deref()
                    .map(|r| format!(" (declined: {r})"))
                    .unwrap_or_default()
            )
        });
        self.handovers.done.push(done);
    }

    /// `single-authority`, after a step of `gateway`: no other gateway up sequences a
    /// conversation it sequences.
    pub(super) fn check_single_authority(&mut self, gateway: ActorIndex) {
        if !self
            .scenario
            .invariants
            .contains(&Invariant::SingleAuthority)
        {
            return;
        }
        let Machine::Gateway(Some(g), _) = &self.actors[gateway as usize].machine else {
            return;
        };
        let spanning: Vec<ConversationId> = self
            .conversations
            .iter()
            .map(|c| c.id)
            .filter(|&id| g.spanning_role(id).is_some() && g.sequences(id))
            .collect();
        for conv in spanning {
            let sequencing = self.sequencing(conv);
            if sequencing.len() > 1 {
                let names: Vec<&str> = sequencing
                    .iter()
                    .map(|&a| self.actors[a as usize].name.as_str())
                    .collect();
                let detail = format!("{} sequence {conv} at once", names.join(" and "));
                self.checker
                    .fail_safety(Invariant::SingleAuthority, self.now, detail);
            }
        }
    }

    /// `single-authority` at the end: two gateways never hold different messages at one seq
    /// of a conversation.
    pub(super) fn seq_assigned_twice(&self) -> Option<String> {
        if !self
            .scenario
            .invariants
            .contains(&Invariant::SingleAuthority)
        {
            return None;
        }
        let up: Vec<(ActorIndex, &Gateway)> = self
            .gateways
            .iter()
            .filter_map(|&a| match &self.actors[a as usize].machine {
                Machine::Gateway(Some(g), _) => Some((a, &**g)),
                _ => None,
            })
            .collect();
        for c in &self.conversations {
            for (i, &(a, ga)) in up.iter().enumerate() {
                for &(b, gb) in &up[i + 1..] {
                    let (Some(la), Some(lb)) = (ga.log(c.id), gb.log(c.id)) else {
                        continue;
                    };
                    for seq in 1..=la.head().min(lb.head()) {
                        let (Some(x), Some(y)) = (la.get(seq), lb.get(seq)) else {
                            continue;
                        };
                        let lost = |e: &sund_model::gateway::sequencer::LogEntry| {
                            e.sender == sund_model::gateway::sequencer::LOST_SENDER
                        };
                        if !lost(x) && !lost(y) && (x.sender, x.msg_id) != (y.sender, y.msg_id) {
                            return Some(format!(
                                "seq {seq} of {} holds {} at {} but {} at {}",
                                c.id,
                                x.msg_id,
                                self.actors[a as usize].name,
                                y.msg_id,
                                self.actors[b as usize].name
                            ));
                        }
                    }
                }
            }
        }
        None
    }

    /// The run's handovers (`None`: the scenario hands nothing over).
    pub(super) fn handover_report(&self) -> Option<HandoverReport> {
        let h = &self.handovers;
        if h.asked + h.skipped == 0 {
            return None;
        }
        let mut frozen: Vec<u64> = h
            .done
            .iter()
            .filter(|d| d.declined.is_none())
            .map(|d| d.frozen_for.as_micros() as u64)
            .collect();
        frozen.sort_unstable();
        Some(HandoverReport {
            asked: h.asked,
            skipped: h.skipped,
            refused: h.refused,
            done: h.done.iter().filter(|d| d.declined.is_none()).count() as u64,
            declined: h.done.iter().filter(|d| d.declined.is_some()).count() as u64,
            frozen_max_us: frozen.last().copied(),
            frozen_median_us: frozen.get(frozen.len() / 2).copied(),
        })
    }
}
