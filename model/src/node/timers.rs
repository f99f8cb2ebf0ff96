//! The node's timers, all in one table that `poll_timeout` reads.
//!
//! The link arms its own (reconnect, handshake, idle, heartbeat); while a session is open the
//! outbox arms the resend of its oldest transmission (`resend_after` after it went out, or
//! when a rate limit's pause ends) and the
//! groups arm their next deadline (a fetch to give up on, a leave to ask again, a stalled
//! proposal to take over). The table is refreshed after every input, command and timeout.

use super::Node;
use crate::time::Instant;
use crate::timers::TimerName;

/// The node's timers, in firing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeTimer {
    /// Connect again after a backoff.
    Reconnect,
    /// Give up on a handshake.
    Handshake,
    /// The gateway has been silent too long.
    Idle,
    /// Send a heartbeat.
    Heartbeat,
    /// Resend what the gateway has not acknowledged.
    Resend,
    /// Drive the groups (fetch expiry, leave resend, proposal takeover).
    Groups,
    /// Send the watchlist again after the gateway's presence limit refused it.
    Watch,
}

impl TimerName for NodeTimer {
    const ALL: &'static [NodeTimer] = &[
        NodeTimer::Reconnect,
        NodeTimer::Handshake,
        NodeTimer::Idle,
        NodeTimer::Heartbeat,
        NodeTimer::Resend,
        NodeTimer::Groups,
        NodeTimer::Watch,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

impl Node {
    /// Re-arms every timer from the sub-machines' state.
    pub(super) fn refresh_timers(&mut self) {
        self.link.arm(&mut self.timers);
        let open = self.link.is_open();
        let resend = match self.throttled_until {
            // Held back by the gateway's rate limit: everything waiting goes when it ends.
            Some(until) => (!self.outbox.is_empty()).then_some(until),
            None => self.outbox.next_resend(self.resend_after()),
        };
        // A conversation held back on its own (its authority is moving, or a limit refused a
        // change in it) goes again at its hint.
        let deferred = self.deferred.values().min().copied();
        let resend = match (resend, deferred) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.timers
            .set_or_clear(NodeTimer::Resend, resend.filter(|_| open));
        let groups = self.mls.as_ref().and_then(|m| {
            m.groups
                .next_deadline(self.config.resend_after, self.config.dm_welcome_patience)
        });
        self.timers
            .set_or_clear(NodeTimer::Groups, groups.filter(|_| open));
        let watch = self.social.watch_retry_at();
        self.timers
            .set_or_clear(NodeTimer::Watch, watch.filter(|_| open));
    }

    /// Fires every timer due at `now`, in order, re-arming after each.
    pub(super) fn fire_timers(&mut self, now: Instant) {
        self.refresh_timers();
        let mut link_fired = false;
        for &name in NodeTimer::ALL {
            if self.timers.get(name).is_none_or(|at| at > now) {
                continue;
            }
            match name {
                NodeTimer::Reconnect
                | NodeTimer::Handshake
                | NodeTimer::Idle
                | NodeTimer::Heartbeat => {
                    // The link decides what its state makes of the time (an idle session is
                    // dead before it is due a heartbeat): once per call.
                    if !link_fired {
                        link_fired = true;
                        self.on_link_timeout(now);
                    }
                }
                NodeTimer::Resend => {
                    if self.throttled_until.is_some_and(|until| until <= now) {
                        self.throttled_until = None;
                    }
                    self.deferred.retain(|_, until| *until > now);
                    if let Some(conn) = self.link.open_conn() {
                        self.resend_stale(now, conn);
                    }
                }
                NodeTimer::Groups => {
                    if let Some(m) = &mut self.mls {
                        m.groups.expire_fetches(now, self.config.resend_after);
                    }
                    self.drive_groups(now);
                }
                NodeTimer::Watch => {
                    let conn = self.link.open_conn();
                    self.social.retry_watch(conn, &mut self.fx);
                }
            }
            self.refresh_timers();
        }
        debug_assert!(
            self.timers.next().is_none_or(|at| at > now),
            "every timer that fired is re-armed in the future or cleared: {:?}",
            self.timers.due(now)
        );
    }
}
