//! The drivers' clock: the model's [`Instant`] from tokio's clock.
//!
//! Production starts it at the wall clock (microseconds since the Unix epoch), so instants the
//! model stores (message timestamps for retention, token expiry) stay meaningful across restarts.
//! Under turmoil, tokio's clock is simulated and the origin is fixed, so a driver never reads the
//! real time.

use std::time::{SystemTime, UNIX_EPOCH};

use sund_model::env::Clock;
use sund_model::time::Instant;

/// The model's clock in production: microseconds since the Unix epoch.
pub fn wall_clock() -> Instant {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Instant(u64::try_from(since.as_micros()).unwrap_or(u64::MAX))
}

/// Maps tokio's monotonic clock onto model instants.
#[derive(Clone, Copy, Debug)]
pub struct DriverClock {
    origin: tokio::time::Instant,
    origin_model: Instant,
}

impl DriverClock {
    /// A clock that starts at the wall clock now.
    pub fn wall() -> DriverClock {
        DriverClock::starting_at(wall_clock())
    }

    /// A clock that reads `at` now and advances with tokio's clock (simulation).
    pub fn starting_at(at: Instant) -> DriverClock {
        DriverClock {
            origin: tokio::time::Instant::now(),
            origin_model: at,
        }
    }

    /// The current model instant.
    pub fn now(&self) -> Instant {
        let elapsed = self.origin.elapsed();
        self.origin_model + elapsed
    }

    /// The tokio instant at which the model's `deadline` falls.
    pub fn deadline(&self, deadline: Instant) -> tokio::time::Instant {
        tokio::time::Instant::now() + deadline.saturating_since(self.now())
    }
}

impl Clock for DriverClock {
    fn now(&self) -> Instant {
        DriverClock::now(self)
    }
}
