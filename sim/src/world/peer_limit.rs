//! The `peer-limit` invariant: each gateway's limit per peer bounds the relays it lets through
//! from each peer gateway.
//!
//! After every step of a gateway, the relays it let through from each peer (its links'
//! `relays_admitted`, counted as the gateway takes each relay, whatever it then does with it)
//! are timed on the gateway's own clock. In any one-second window they number at most
//! `burst + rate × 1 s + 1`: the GCRA bucket admits a burst, then one per interval, and the
//! window's edges may catch one more. The bucket lives in memory, so a gateway's restart starts
//! its windows afresh, as does its clock going back (a clock jump).

use std::collections::{BTreeMap, VecDeque};

use super::{Machine, World};
use crate::network::ActorIndex;
use crate::scenario::Invariant;

/// The window of the bound, microseconds.
const WINDOW_US: u64 = 1_000_000;

/// What the world watches for `peer-limit`, per (gateway, peer domain).
#[derive(Debug, Default)]
pub(super) struct PeerLimitWatch {
    seen: BTreeMap<(ActorIndex, String), Admitted>,
}

/// One gateway's admissions from one peer.
#[derive(Debug, Default)]
struct Admitted {
    /// The gateway's incarnation the count is of.
    incarnation: u32,
    /// Its count when last looked at.
    count: u64,
    /// The gateway's clock (µs) at each admission within the last window.
    recent: VecDeque<u64>,
}

impl World {
    /// After a step of `gateway`: its admissions since the last step, timed and bounded.
    pub(super) fn check_peer_limit(&mut self, gateway: ActorIndex) {
        if !self.scenario.invariants.contains(&Invariant::PeerLimit) {
            return;
        }
        let actor = &self.actors[gateway as usize];
        let Machine::Gateway(Some(g), config) = &actor.machine else {
            return;
        };
        let (Some(rate), Some(federation)) = (config.limits.peer_relays, g.federation()) else {
            return;
        };
        let now = self.local_now(gateway);
        let incarnation = actor.incarnation;
        let per_window =
            u128::from(rate.count) * u128::from(WINDOW_US) / rate.period.as_micros().max(1);
        let bound = u64::from(rate.burst) + u64::try_from(per_window).unwrap_or(u64::MAX) + 1;
        let mut broken = None;
        for link in federation.links(now) {
            let watched = self
                .peer_limit_watch
                .seen
                .entry((gateway, link.domain.clone()))
                .or_default();
            let went_back = watched.recent.back().is_some_and(|&last| now.0 < last);
            if watched.incarnation != incarnation
                || link.relays_admitted < watched.count
                || went_back
            {
                *watched = Admitted {
                    incarnation,
                    count: link.relays_admitted,
                    recent: VecDeque::new(),
                };
                continue;
            }
            for _ in watched.count..link.relays_admitted {
                watched.recent.push_back(now.0);
            }
            watched.count = link.relays_admitted;
            while watched
                .recent
                .front()
                .is_some_and(|&at| at + WINDOW_US <= now.0)
            {
                watched.recent.pop_front();
            }
            let taken = watched.recent.len() as u64;
            if taken > bound && broken.is_none() {
                broken = Some(format!(
                    "{} let {taken} relays from {} through within one second of its clock; its limit allows at most {bound} ({})",
                    actor.name,
                    link.domain,
                    sund_model::gateway::limits::describe(rate)
                ));
            }
        }
        if let Some(detail) = broken {
            self.checker
                .fail_safety(Invariant::PeerLimit, self.now, detail);
        }
    }
}
