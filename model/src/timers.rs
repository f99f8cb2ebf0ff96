//! A table of named deadlines: every timer of a state machine in one place, so that
//! `poll_timeout` is the earliest of them all and no deadline waits for another to fire.
//!
//! A machine names its timers with a small enum ([`TimerName`]); sub-machines arm and clear
//! their own. [`TimerTable::due`] lists the timers due at `now` in the enum's order, so that
//! timers due at the same instant fire in a fixed order.

use core::marker::PhantomData;

use crate::time::Instant;

/// The timers of one machine: a fixed, ordered set of names.
pub trait TimerName: Copy + Eq + core::fmt::Debug + 'static {
    /// Every name, in firing order.
    const ALL: &'static [Self];
    /// This name's position in [`TimerName::ALL`].
    fn index(self) -> usize;
}

/// Deadlines by name. See the module docs.
#[derive(Clone, Debug)]
pub struct TimerTable<N: TimerName> {
    deadlines: Vec<Option<Instant>>,
    names: PhantomData<N>,
}

impl<N: TimerName> Default for TimerTable<N> {
    fn default() -> Self {
        TimerTable {
            deadlines: vec![None; N::ALL.len()],
            names: PhantomData,
        }
    }
}

impl<N: TimerName> TimerTable<N> {
    /// Arms (or moves) a timer.
    pub fn set(&mut self, name: N, at: Instant) {
        self.deadlines[name.index()] = Some(at);
    }

    /// Arms a timer, or clears it for `None`.
    pub fn set_or_clear(&mut self, name: N, at: Option<Instant>) {
        self.deadlines[name.index()] = at;
    }

    /// Disarms a timer.
    pub fn clear(&mut self, name: N) {
        self.deadlines[name.index()] = None;
    }

    /// When a timer is due, if armed.
    pub fn get(&self, name: N) -> Option<Instant> {
        self.deadlines[name.index()]
    }

    /// The earliest armed deadline.
    pub fn next(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }

    /// The timers due at `now`, in firing order.
    pub fn due(&self, now: Instant) -> Vec<N> {
        N::ALL
            .iter()
            .copied()
            .filter(|name| self.get(*name).is_some_and(|at| at <= now))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum T {
        A,
        B,
    }

    impl TimerName for T {
        const ALL: &'static [T] = &[T::A, T::B];
        fn index(self) -> usize {
            self as usize
        }
    }

    #[test]
    fn the_next_deadline_is_the_earliest_and_due_timers_come_in_name_order() {
        let mut timers: TimerTable<T> = TimerTable::default();
        assert_eq!(timers.next(), None);
        timers.set(T::B, Instant(5));
        timers.set(T::A, Instant(9));
        assert_eq!(timers.next(), Some(Instant(5)));
        assert_eq!(timers.due(Instant(4)), vec![]);
        assert_eq!(timers.due(Instant(9)), vec![T::A, T::B]);
        timers.clear(T::B);
        assert_eq!(timers.next(), Some(Instant(9)));
        timers.set_or_clear(T::A, None);
        assert_eq!(timers.next(), None);
    }
}
