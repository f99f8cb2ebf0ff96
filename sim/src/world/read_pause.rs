//! A gateway pausing its reading of a connection (`GatewayOutput::PauseReading`, after a
//! rate-limit refusal of a device, or of a peer gateway's relay on a federation link): the
//! driver stops reading that connection's stream, and QUIC's flow control holds the sender
//! back. Here frames that arrive at the gateway on a paused connection wait, in order, and are
//! all read when the pause ends (the driver reads up to 64 KiB at a time; the simulated network
//! has no flow control, so nothing holds the sender back and the queue is bounded only by what
//! a device or a peer sends in a pause of at most 2 s). Chunk streams are streams of their own
//! and are never paused.

use std::collections::{BTreeMap, VecDeque};

use crate::network::Arrival;

use super::{EventKind, World};

/// One paused connection: until when, and what arrived meanwhile.
#[derive(Debug)]
struct Paused {
    until: u64,
    waiting: VecDeque<Arrival>,
}

/// The paused connections of every gateway, by connection.
#[derive(Debug, Default)]
pub(super) struct ReadPauses {
    paused: BTreeMap<u64, Paused>,
}

impl World {
    /// A gateway paused reading `conn` for `pause_us`.
    pub(super) fn pause_reading(&mut self, conn: u64, pause_us: u64) {
        let until = self.now + pause_us;
        let schedule = match self.read_pauses.paused.get_mut(&conn) {
            Some(paused) if paused.until >= until => false,
            Some(paused) => {
                paused.until = until;
                true
            }
            None => {
                self.read_pauses.paused.insert(
                    conn,
                    Paused {
                        until,
                        waiting: VecDeque::new(),
                    },
                );
                true
            }
        };
        if schedule {
            self.push(until, EventKind::ResumeReading { conn });
        }
        *self.faults.entry("read-paused").or_default() += 1;
    }

    /// A frame arriving at a gateway: held if its connection is paused (returned otherwise).
    pub(super) fn hold_if_paused(&mut self, arrival: Arrival) -> Option<Arrival> {
        match self.read_pauses.paused.get_mut(&arrival.conn) {
            Some(paused) => {
                paused.waiting.push_back(arrival);
                None
            }
            None => Some(arrival),
        }
    }

    /// A pause may be over: read what waited, in order.
    pub(super) fn resume_reading(&mut self, conn: u64) {
        let Some(paused) = self.read_pauses.paused.get(&conn) else {
            return;
        };
        if paused.until > self.now {
            return; // extended since; its own event comes later
        }
        let paused = self.read_pauses.paused.remove(&conn).expect("checked");
        for arrival in paused.waiting {
            self.arrive(arrival, true);
        }
    }
}
