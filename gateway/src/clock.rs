//! The drivers' clock: the model's [`Instant`] from tokio's clock.
//!
//! Production starts it at the wall clock (microseconds since the Unix epoch), so instants the
//! model stores (message timestamps for retention, token expiry) stay meaningful across restarts.
//! Under turmoil, tokio's clock is simulated and the origin is fixed, so a driver never reads the
//! real time.

use sund_model::time::Instant;

/// Maps tokio's monotonic clock onto model instants.
#[derive(Clone, Copy, Debug)]
pub struct DriverClock {
    origin: tokio::time::Instant,
    origin_model: Instant,
}

impl DriverClock {
    /// A clock that starts at the wall clock now.
    pub fn wall() -> DriverClock {
        DriverClock::starting_at(crate::driver::wall_clock())
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
