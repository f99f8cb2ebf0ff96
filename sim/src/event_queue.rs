//! The kernel's queue of pending events, in (time, insertion) order.
//!
//! A binary heap of whole events moves each event's bytes at every level of every push and
//! pop; the events are several words each, and the heap was the kernel's largest single cost
//! after the model itself. Here the heap holds only small keys (time, sequence number, slot)
//! and the events stay put in a slab until they are taken. The order is exactly the heap's
//! order of (time, sequence number): the sequence numbers are unique, so no two keys compare
//! equal and the slot never decides anything.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Pending events of type `T`, taken earliest first, and in insertion order at equal times.
#[derive(Debug)]
pub struct EventQueue<T> {
    heap: BinaryHeap<Reverse<(u64, u64, u32)>>,
    slots: Vec<Option<T>>,
    free: Vec<u32>,
    next_seq: u64,
}

impl<T> Default for EventQueue<T> {
    fn default() -> Self {
        EventQueue {
            heap: BinaryHeap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            next_seq: 0,
        }
    }
}

impl<T> EventQueue<T> {
    /// Queues `event` at time `at`, after every event already queued at that time.
    pub fn push(&mut self, at: u64, event: T) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let slot = match self.free.pop() {
            Some(slot) => {
                debug_assert!(self.slots[slot as usize].is_none());
                self.slots[slot as usize] = Some(event);
                slot
            }
            None => {
                let slot = u32::try_from(self.slots.len()).expect("fewer than 2^32 pending events");
                self.slots.push(Some(event));
                slot
            }
        };
        self.heap.push(Reverse((at, seq, slot)));
    }

    /// Takes the earliest event and its time.
    pub fn pop(&mut self) -> Option<(u64, T)> {
        let Reverse((at, _, slot)) = self.heap.pop()?;
        let event = self.slots[slot as usize]
            .take()
            .expect("a queued key names a filled slot");
        self.free.push(slot);
        Some((at, event))
    }

    /// Events pending.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// True if nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Events queued since the start (the next sequence number).
    pub fn pushed(&self) -> u64 {
        self.next_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the interleaving of pushes and pops, events come out as a heap of whole
        /// (time, sequence) events gives them: earliest first, insertion order at equal times.
        #[test]
        fn events_come_out_as_a_heap_of_whole_events_gives_them(
            ops in proptest::collection::vec(proptest::option::of(0u64..20), 0..400),
        ) {
            let mut queue = EventQueue::default();
            let mut reference = BinaryHeap::new();
            let mut seq = 0u64;
            for op in ops {
                match op {
                    Some(at) => {
                        queue.push(at, seq);
                        reference.push(Reverse((at, seq)));
                        seq += 1;
                    }
                    None => {
                        let want = reference.pop().map(|Reverse((at, s))| (at, s));
                        prop_assert_eq!(queue.pop(), want);
                    }
                }
                prop_assert_eq!(queue.len(), reference.len());
            }
            while let Some(Reverse((at, s))) = reference.pop() {
                prop_assert_eq!(queue.pop(), Some((at, s)));
            }
            prop_assert!(queue.is_empty());
            prop_assert_eq!(queue.pushed(), seq);
        }
    }

    /// Slots are reused: a queue that never holds more than a few events never grows its slab.
    #[test]
    fn a_steady_queue_reuses_its_slots() {
        let mut queue = EventQueue::default();
        for round in 0..1000u64 {
            queue.push(round, round);
            queue.push(round, round + 1);
            assert_eq!(queue.pop(), Some((round, round)));
            assert_eq!(queue.pop(), Some((round, round + 1)));
        }
        assert!(queue.slots.len() <= 2, "slab grew to {}", queue.slots.len());
    }
}
