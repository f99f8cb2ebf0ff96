//! The trace hash: one BLAKE3 hash over everything a run did, in order.
//!
//! Folded in: every delivered frame (time, receiver, connection, bytes), every timer that fired,
//! every commit, every event an actor showed its application, and every injected fault. Two runs
//! with the same seed must give the same hash; CI checks it with `--check-determinism`.

/// Incremental trace hash.
#[derive(Clone, Debug, Default)]
pub struct TraceHash {
    hasher: blake3::Hasher,
    records: u64,
}

/// Kinds of trace records; the tag byte keeps records of different kinds apart.
#[derive(Clone, Copy, Debug)]
#[repr(u8)]
pub enum Record {
    /// A frame reached an actor.
    Frame = 1,
    /// A timer fired.
    Timer = 2,
    /// A commit became durable.
    Commit = 3,
    /// An actor told its application something.
    AppEvent = 4,
    /// A fault was injected.
    Fault = 5,
    /// A connection opened, failed or closed.
    Connection = 6,
}

impl TraceHash {
    /// Folds one record.
    pub fn record(&mut self, kind: Record, time_us: u64, actor: u32, data: &[u8]) {
        let mut head = [0u8; 17];
        head[0] = kind as u8;
        head[1..9].copy_from_slice(&time_us.to_le_bytes());
        head[9..13].copy_from_slice(&actor.to_le_bytes());
        head[13..17].copy_from_slice(&(data.len() as u32).to_le_bytes());
        self.hasher.update(&head);
        self.hasher.update(data);
        self.records += 1;
    }

    /// Records folded so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The hash so far, as 32 hex digits (the first 128 bits).
    pub fn hex(&self) -> String {
        let hash = self.hasher.finalize();
        hash.as_bytes()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}
