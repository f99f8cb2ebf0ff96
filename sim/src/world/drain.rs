//! Graceful drain in the simulator: `drain GATEWAY` does what SIGTERM does to the real gateway.
//!
//! - New connections are refused from the signal on (the endpoint stops accepting).
//! - Every session gets its `Goodbye` (`ShuttingDown`, with the retry hint), and its connection
//!   closes only once that goodbye has arrived (as the driver waits for each session's writer
//!   to deliver it before closing the endpoint); a goodbye the network loses is lost.
//! - Commits in flight complete; then the gateway stops. `restart GATEWAY` starts it again
//!   (given while it still drains, it starts it once the drain is over, as an operator's
//!   restart waits for the old process to exit).
//! - A drain that has not finished after [`DRAIN_TIMEOUT_US`] stops the gateway without it,
//!   as the real gateway exits after `drain_timeout_s` (10 s by default): a goodbye stuck
//!   behind a slow link, or a device that never reads it, must not keep a gateway refusing
//!   every connection for as long as that lasts.
//!
//! The run reports, per drain, how long it took from the signal to the stop, and how the
//! devices' reconnects spread once the gateway was back: each device's first accepted
//! connection after the signal, and the most accepted in any 100 ms (the thundering herd the
//! retry hint is there to prevent).

use std::collections::{BTreeMap, BTreeSet};

use super::{EventKind, World};
use crate::network::ActorIndex;
use crate::trace::Record;

/// One drain, for the run report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// The gateway.
    pub gateway: String,
    /// Sessions open at the signal.
    pub sessions: u64,
    /// From the signal to the stop, microseconds (`None`: it crashed before it stopped).
    pub stopped_after_us: Option<u64>,
    /// Connection attempts refused while draining.
    pub refused: u64,
    /// Devices whose connection the gateway accepted again after the signal.
    pub reconnected: u64,
    /// Half of them were back within this, from the signal (microseconds).
    pub reconnect_p50_us: u64,
    /// 99 % of them were back within this.
    pub reconnect_p99_us: u64,
    /// The last of them.
    pub reconnect_max_us: u64,
    /// The most first reconnects in any 100 ms window.
    pub peak_per_100ms: u64,
    /// It stopped at [`DRAIN_TIMEOUT_US`], not having finished.
    pub timed_out: bool,
}

/// How long a drain may take before the gateway stops without finishing it: the real
/// gateway's default `drain_timeout_s` (`gateway/src/main.rs`).
pub const DRAIN_TIMEOUT_US: u64 = 10_000_000;

/// What the world remembers of drains.
#[derive(Debug, Default)]
pub(super) struct Drains {
    /// Draining gateways: the index into `reports`, and the incarnation that drains.
    active: BTreeMap<ActorIndex, (usize, u32)>,
    /// Per gateway: its latest drain (an index into `reports`), whose reconnects it counts
    /// until its next drain.
    watched: BTreeMap<ActorIndex, usize>,
    /// Per drain: each device's first accepted connection after the signal.
    first: Vec<BTreeMap<ActorIndex, u64>>,
    /// Per connection of a draining gateway, or on which a gateway sent a goodbye: when its
    /// last frame arrives.
    last_arrival: BTreeMap<u64, u64>,
    /// Per draining gateway: connections closing once their last frame has arrived.
    closing: BTreeMap<ActorIndex, u64>,
    reports: Vec<DrainReport>,
    /// Per report: the gateway and when its signal came.
    starts: Vec<(ActorIndex, u64)>,
    /// Gateways told to restart while they drained: started when the drain is over.
    restart_after: BTreeSet<ActorIndex>,
}

impl Drains {
    /// Whether the gateway is draining (refusing connections).
    pub(super) fn is_draining(&self, gateway: ActorIndex) -> bool {
        self.active.contains_key(&gateway)
    }

    /// The gateway crashed (or stopped): a drain it was in is over, with no stop to report.
    pub(super) fn crashed(&mut self, gateway: ActorIndex) {
        self.active.remove(&gateway);
        self.closing.remove(&gateway);
    }

    /// `restart GATEWAY` while it drains: it starts once the drain is over.
    pub(super) fn restart_when_stopped(&mut self, gateway: ActorIndex) {
        self.restart_after.insert(gateway);
    }

    /// Whether a frame on `conn` (a goodbye) is still to arrive before it may close.
    pub(super) fn awaits_arrival(&self, conn: u64) -> bool {
        self.last_arrival.contains_key(&conn)
    }

    /// A draining gateway sent a frame on `conn` that arrives at `at` (or any gateway sent a
    /// goodbye there).
    pub(super) fn sent(&mut self, conn: u64, at: u64) {
        let last = self.last_arrival.entry(conn).or_default();
        *last = (*last).max(at);
    }
}

impl World {
    /// `drain GATEWAY`.
    pub(super) fn drain_action(&mut self, gateway: ActorIndex) {
        let actor = &self.actors[gateway as usize];
        if !actor.up || self.drains.is_draining(gateway) {
            return;
        }
        let incarnation = actor.incarnation;
        let sessions = match &actor.machine {
            super::Machine::Gateway(Some(g), _) => g.session_count() as u64,
            _ => return,
        };
        self.trace
            .record(Record::Fault, self.now, gateway, b"drain");
        self.note(|w| {
            format!(
                "{} drains: {sessions} sessions told to come back later",
                w.actors[gateway as usize].name
            )
        });
        *self.faults.entry("drain").or_default() += 1;
        let index = self.drains.reports.len();
        self.drains.reports.push(DrainReport {
            gateway: self.actors[gateway as usize].name.clone(),
            sessions,
            ..DrainReport::default()
        });
        self.drains.starts.push((gateway, self.now));
        self.drains.active.insert(gateway, (index, incarnation));
        self.drains.watched.insert(gateway, index);
        self.drains.first.push(BTreeMap::new());
        self.with_gateway(gateway, |g, now| g.shut_down(now));
        self.push(
            self.now + DRAIN_TIMEOUT_US,
            EventKind::DrainTimeout {
                gateway,
                incarnation,
            },
        );
        self.finish_drain_if_done(gateway);
    }

    /// [`DRAIN_TIMEOUT_US`] after a drain's signal: if that drain is still going, the gateway
    /// stops without it.
    pub(super) fn drain_timeout(&mut self, gateway: ActorIndex, incarnation: u32) {
        let Some(&(index, draining)) = self.drains.active.get(&gateway) else {
            return;
        };
        let actor = &self.actors[gateway as usize];
        if draining != incarnation || !actor.up || actor.incarnation != incarnation {
            return;
        }
        self.drains.reports[index].timed_out = true;
        self.trace
            .record(Record::Fault, self.now, gateway, b"drain timed out");
        self.note(|w| {
            format!(
                "{} stops: its drain did not finish within {} s",
                w.actors[gateway as usize].name,
                DRAIN_TIMEOUT_US / 1_000_000
            )
        });
        self.stop_after_drain(gateway, index);
    }

    /// A connection to a draining gateway: refused.
    pub(super) fn refuse_while_draining(&mut self, gateway: ActorIndex, conn: u64) {
        if let Some((index, _)) = self.drains.active.get(&gateway) {
            self.drains.reports[*index].refused += 1;
        }
        self.close(gateway, conn);
    }

    /// A draining gateway closes `conn`, or a gateway closes it after a goodbye: once its last
    /// frame has arrived.
    pub(super) fn close_after_goodbye(&mut self, gateway: ActorIndex, conn: u64) {
        let at = self
            .drains
            .last_arrival
            .remove(&conn)
            .unwrap_or(self.now)
            .max(self.now);
        if self.drains.is_draining(gateway) {
            *self.drains.closing.entry(gateway).or_default() += 1;
        }
        let incarnation = self.actors[gateway as usize].incarnation;
        self.push(
            at,
            EventKind::GracefulClose {
                gateway,
                incarnation,
                conn,
            },
        );
    }

    /// The close [`Self::close_after_goodbye`] scheduled.
    pub(super) fn graceful_close(&mut self, gateway: ActorIndex, incarnation: u32, conn: u64) {
        if let Some(n) = self.drains.closing.get_mut(&gateway) {
            *n = n.saturating_sub(1);
        }
        let actor = &self.actors[gateway as usize];
        if !actor.up || actor.incarnation != incarnation {
            return;
        }
        self.close(gateway, conn);
        self.finish_drain_if_done(gateway);
    }

    /// Stops a draining gateway once nothing is in flight: no commit pending, every goodbye
    /// delivered and its connection closed.
    pub(super) fn finish_drain_if_done(&mut self, gateway: ActorIndex) {
        let Some(&(index, incarnation)) = self.drains.active.get(&gateway) else {
            return;
        };
        let actor = &self.actors[gateway as usize];
        if !actor.up || actor.incarnation != incarnation {
            // It crashed while draining: no stop to report.
            self.drains.active.remove(&gateway);
            return;
        }
        let closing = self.drains.closing.get(&gateway).copied().unwrap_or(0);
        if !actor.pending.is_empty() || closing > 0 || actor.disk_stalled {
            return;
        }
        self.trace
            .record(Record::Fault, self.now, gateway, b"drained");
        self.note(|w| {
            format!(
                "{} stopped after its drain",
                w.actors[gateway as usize].name
            )
        });
        self.stop_after_drain(gateway, index);
    }

    /// Stops a gateway whose drain (report `index`) finished or timed out.
    fn stop_after_drain(&mut self, gateway: ActorIndex, index: usize) {
        self.drains.active.remove(&gateway);
        self.drains.closing.remove(&gateway);
        self.network.collect_closed();
        let started = self.drains.starts[index].1;
        self.drains.reports[index].stopped_after_us = Some(self.now - started);
        // The process exits, cleanly or at the timeout: whatever a lying disk held in the
        // operating system's cache is not lost with it (a power cut would lose it).
        let a = &mut self.actors[gateway as usize];
        if a.durable_while_lying.is_some() {
            a.durable_while_lying = Some(a.disk.clone());
        }
        self.crash_actor(gateway);
        let restart = self.drains.restart_after.remove(&gateway);
        if self.healing || restart {
            // Told to restart while it drained; or a drain that could finish only after the
            // heal (its commits waited on a stalled disk, or it timed out) stops the gateway
            // after `heal_all` started everything: start it again, as the operator who
            // signalled it would, or it would stay down for good.
            self.start_actor(gateway);
        }
    }

    /// A connection the gateway accepted: the first per device after a drain is a reconnect.
    pub(super) fn on_accept(&mut self, gateway: ActorIndex, conn: u64) {
        let Some(&index) = self.drains.watched.get(&gateway) else {
            return;
        };
        if let Some((node, _)) = self.network.ends(conn) {
            self.drains.first[index].entry(node).or_insert(self.now);
        }
    }

    /// The drain figures, at the end of the run.
    pub(super) fn drain_reports(&self) -> Vec<DrainReport> {
        let mut out = self.drains.reports.clone();
        for ((report, (_, signal)), first) in out
            .iter_mut()
            .zip(&self.drains.starts)
            .zip(&self.drains.first)
        {
            let mut times: Vec<u64> = first.values().map(|t| t - signal).collect();
            times.sort_unstable();
            if times.is_empty() {
                continue;
            }
            let at = |q: f64| {
                times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1]
            };
            report.reconnected = times.len() as u64;
            report.reconnect_p50_us = at(0.5);
            report.reconnect_p99_us = at(0.99);
            report.reconnect_max_us = *times.last().expect("not empty");
            let (mut peak, mut lo) = (0, 0);
            for hi in 0..times.len() {
                while times[hi] - times[lo] >= 100_000 {
                    lo += 1;
                }
                peak = peak.max(hi - lo + 1);
            }
            report.peak_per_100ms = peak as u64;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::scenario::parse;
    use crate::world::World;

    const DRAIN: &str = "
duration 20s
liveness within 30s
gateway gw
users u count 40
conversation room members all-devices
send room from all-devices every 200ms
at 5s drain gw
at 5.5s restart gw
";

    #[test]
    fn a_drained_gateway_stops_loses_nothing_and_its_devices_come_back_spread_out() {
        let scenario = parse("drain.sund", DRAIN).unwrap();
        let report = World::new(scenario, 7).unwrap().run();
        assert!(
            matches!(report.outcome, crate::world::Outcome::Passed),
            "{:?}",
            report.outcome
        );
        let drain = &report.drains[0];
        assert_eq!(drain.sessions, 40);
        let stopped = drain.stopped_after_us.expect("it stopped");
        assert!(stopped < 100_000, "{drain:?}");
        assert_eq!(drain.reconnected, 40, "{drain:?}");
        // The hint is 2 s and each device adds up to as much again at random.
        assert!(drain.reconnect_p50_us >= 2_000_000, "{drain:?}");
        assert!(drain.reconnect_max_us <= 4_500_000, "{drain:?}");
        assert!(drain.peak_per_100ms < 10, "spread out: {drain:?}");
        let again = World::new(parse("drain.sund", DRAIN).unwrap(), 7)
            .unwrap()
            .run();
        assert_eq!(again.trace_hash, report.trace_hash);
    }

    /// bob fetches a file over a slow link when the gateway drains: its goodbye to him waits
    /// behind the chunks, so the drain cannot finish. It stops at the drain timeout, the
    /// restart given meanwhile starts it then, and nothing is lost.
    const DRAIN_BEHIND_A_SLOW_LINK: &str = "
duration 4s
liveness within 60s
gateway gw
user alice
user bob
conversation dm members alice bob
link bob gw bandwidth 256kbit
send dm from alice every 300ms
at 500ms send-file dm from alice size 2000000 name big
at 1500ms drain gw
at 2s restart gw
";

    #[test]
    fn a_drain_that_cannot_finish_stops_at_the_timeout_and_a_restart_given_meanwhile_follows() {
        let scenario = parse("slow.sund", DRAIN_BEHIND_A_SLOW_LINK).unwrap();
        let report = World::new(scenario, 3).unwrap().run();
        assert!(
            matches!(report.outcome, crate::world::Outcome::Passed),
            "{:?}",
            report.outcome
        );
        let drain = &report.drains[0];
        assert!(drain.timed_out, "{drain:?}");
        assert_eq!(drain.stopped_after_us, Some(super::DRAIN_TIMEOUT_US));
        assert_eq!(
            drain.reconnected, 2,
            "both came back to the restarted gateway: {drain:?}"
        );
        // The restart waited for the stop, at the timeout.
        assert!(
            drain.reconnect_p50_us >= super::DRAIN_TIMEOUT_US,
            "{drain:?}"
        );
    }

    #[test]
    fn drain_takes_gateways_only() {
        let err = parse("x.sund", "duration 1s\ngateway gw\nuser a\nat 1s drain a\n")
            .expect_err("refused");
        assert!(err.to_string().contains("`drain` takes gateways"), "{err}");
    }
}
