//! How long the gateway takes to answer on this device's link, measured, and so how long the
//! outbox waits for an answer before it sends a message again.
//!
//! A fixed wait (`resend_after`) is right on a quiet link and wrong on a slow one: once the
//! link's queue holds more than that wait's worth of frames, every waiting message goes again
//! before its first copy has even left, the copies lengthen the queue, and the device never
//! catches up (plain swarm seed 502431: a 256 kbit link, 82 copies of every message). So the
//! wait follows the link as TCP's retransmission timer does (RFC 6298): a smoothed round trip
//! and its variation, from answers that are unambiguous (a heartbeat's answer, which echoes its
//! nonce, and the acknowledgement of a message sent once: Karn's rule), and a wait that doubles
//! after each round of resends that had no answer in between. It never drops below
//! `resend_after`, so on links answering in time nothing changes.

use core::time::Duration;

use crate::time::Instant;

/// The longest wait between two sends of a message, however slow the link (TCP's cap).
pub const RESEND_MAX: Duration = Duration::from_secs(60);

/// At most this many doublings of the wait in a row (64 times).
const BACKOFF_MAX: u32 = 6;

/// The round-trip estimator of the device's link. See the module docs.
#[derive(Clone, Debug, Default)]
pub struct RoundTrip {
    /// The smoothed round trip, once there is a sample.
    smoothed: Option<Duration>,
    /// Its mean deviation.
    variation: Duration,
    /// Doublings of the wait since the last answer.
    backoff: u32,
    /// The heartbeat waiting for its answer: its nonce and when it went.
    beat: Option<(u64, Instant)>,
}

impl RoundTrip {
    /// A heartbeat with `nonce` went out at `now`.
    pub fn beat_sent(&mut self, nonce: u64, now: Instant) {
        self.beat = Some((nonce, now));
    }

    /// The answer to the heartbeat with `nonce` came at `now`: a sample if it answers the
    /// last one sent (an older one's answer, or a copy, says nothing certain).
    pub fn beat_answered(&mut self, nonce: u64, now: Instant) {
        if let Some((sent_nonce, at)) = self.beat {
            if sent_nonce == nonce {
                self.beat = None;
                self.sample(now.saturating_since(at));
            }
        }
    }

    /// An answer that came `round_trip` after the one copy of what it answers.
    pub fn sample(&mut self, round_trip: Duration) {
        self.backoff = 0;
        match self.smoothed {
            None => {
                self.smoothed = Some(round_trip);
                self.variation = round_trip / 2;
            }
            Some(smoothed) => {
                let deviation = smoothed.abs_diff(round_trip);
                self.variation = self.variation * 3 / 4 + deviation / 4;
                self.smoothed = Some(smoothed * 7 / 8 + round_trip / 8);
            }
        }
    }

    /// An answer came, though to a message sent more than once (no sample): the link works,
    /// so the waits start from the estimate again.
    pub fn answered(&mut self) {
        self.backoff = 0;
    }

    /// A round of resends went out for want of an answer: the next wait is twice as long,
    /// until an answer comes.
    pub fn timed_out(&mut self) {
        self.backoff = (self.backoff + 1).min(BACKOFF_MAX);
    }

    /// A new session: what waits goes at once, and the waits start from the estimate again.
    pub fn session_opened(&mut self) {
        self.backoff = 0;
        self.beat = None;
    }

    /// How long an answer may take: the smoothed round trip plus four variations (zero before
    /// the first sample).
    pub fn estimate(&self) -> Duration {
        self.smoothed
            .map_or(Duration::ZERO, |s| s + self.variation * 4)
    }

    /// How long to wait for an answer before sending again: the estimate (smoothed round trip
    /// plus four variations), never below `floor` (the configured `resend_after`), doubled
    /// per unanswered round, at most [`RESEND_MAX`] (or `floor` if that is longer).
    pub fn resend_after(&self, floor: Duration) -> Duration {
        let base = floor.max(self.estimate());
        let cap = RESEND_MAX.max(floor);
        base.checked_mul(1 << self.backoff).unwrap_or(cap).min(cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOOR: Duration = Duration::from_secs(3);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_quick_link_waits_the_configured_time() {
        let mut rt = RoundTrip::default();
        assert_eq!(rt.resend_after(FLOOR), FLOOR, "no sample yet");
        for _ in 0..20 {
            rt.sample(ms(40));
        }
        assert_eq!(rt.resend_after(FLOOR), FLOOR);
    }

    #[test]
    fn a_slow_link_waits_longer_than_its_answers_take() {
        let mut rt = RoundTrip::default();
        rt.sample(ms(5_000));
        // 5 s plus four times 2.5 s.
        assert_eq!(rt.resend_after(FLOOR), ms(15_000));
        for _ in 0..50 {
            rt.sample(ms(8_000));
        }
        let wait = rt.resend_after(FLOOR);
        assert!(wait >= ms(8_000) && wait < ms(9_000), "{wait:?}");
        // The link recovers: the wait comes back down to the floor.
        for _ in 0..100 {
            rt.sample(ms(30));
        }
        assert_eq!(rt.resend_after(FLOOR), FLOOR);
    }

    #[test]
    fn unanswered_rounds_double_the_wait_up_to_the_cap_and_an_answer_resets_it() {
        let mut rt = RoundTrip::default();
        rt.timed_out();
        assert_eq!(rt.resend_after(FLOOR), FLOOR * 2);
        rt.timed_out();
        assert_eq!(rt.resend_after(FLOOR), FLOOR * 4);
        for _ in 0..20 {
            rt.timed_out();
        }
        assert_eq!(rt.resend_after(FLOOR), RESEND_MAX);
        rt.sample(ms(40));
        assert_eq!(rt.resend_after(FLOOR), FLOOR);
        rt.timed_out();
        rt.answered();
        assert_eq!(rt.resend_after(FLOOR), FLOOR);
        rt.timed_out();
        rt.session_opened();
        assert_eq!(rt.resend_after(FLOOR), FLOOR);
        // A floor above the cap is kept.
        assert_eq!(rt.resend_after(ms(90_000)), ms(90_000));
    }

    #[test]
    fn only_the_answer_to_the_last_heartbeat_is_a_sample() {
        let mut rt = RoundTrip::default();
        let t0 = Instant(1_000_000);
        rt.beat_sent(1, t0);
        rt.beat_sent(2, t0 + ms(5_000));
        // The answer to the first, late: not a sample.
        rt.beat_answered(1, t0 + ms(9_000));
        assert_eq!(rt.resend_after(FLOOR), FLOOR);
        rt.beat_answered(2, t0 + ms(9_000));
        assert_eq!(rt.resend_after(FLOOR), ms(4_000 + 8_000));
        // A copy of the same answer: nothing more.
        rt.beat_answered(2, t0 + ms(60_000));
        assert_eq!(rt.resend_after(FLOOR), ms(12_000));
    }
}
