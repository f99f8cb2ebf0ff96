//! The trace hash: one BLAKE3 hash over everything a run did, in order.
//!
//! Folded in: every delivered frame (time, receiver, connection, bytes), every timer that fired,
//! every commit, every event an actor showed its application, and every injected fault. Two runs
//! with the same seed must give the same hash; CI checks it with `--check-determinism`.

/// Incremental trace hash.
///
/// Records are gathered in a buffer and hashed [`FLUSH_BYTES`] at a time: BLAKE3 hashes a long
/// input several 1 KiB chunks at once with SIMD, but the small records one 64-byte block after
/// another (that was a quarter of the simulator's time). The hash is the same either way: it
/// depends only on the bytes and their order.
#[derive(Clone, Debug, Default)]
pub struct TraceHash {
    hasher: blake3::Hasher,
    buffer: Vec<u8>,
    records: u64,
}

/// Buffered trace bytes hashed in one go.
pub const FLUSH_BYTES: usize = 64 * 1024;

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
    /// An actor panicked (the run ends there).
    Panic = 7,
}

impl TraceHash {
    /// Folds one record.
    pub fn record(&mut self, kind: Record, time_us: u64, actor: u32, data: &[u8]) {
        let mut head = [0u8; 17];
        head[0] = kind as u8;
        head[1..9].copy_from_slice(&time_us.to_le_bytes());
        head[9..13].copy_from_slice(&actor.to_le_bytes());
        head[13..17].copy_from_slice(&(data.len() as u32).to_le_bytes());
        self.buffer.extend_from_slice(&head);
        self.buffer.extend_from_slice(data);
        self.records += 1;
        if self.buffer.len() >= FLUSH_BYTES {
            self.hasher.update(&self.buffer);
            self.buffer.clear();
        }
    }

    /// Records folded so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The hash so far, as 32 hex digits (the first 128 bits).
    pub fn hex(&self) -> String {
        let mut hasher = self.hasher.clone();
        hasher.update(&self.buffer);
        sund_model::hex::encode(&hasher.finalize().as_bytes()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buffering changes nothing: the hash is BLAKE3 over the records' bytes in order.
    #[test]
    fn the_hash_is_blake3_over_the_records_in_order_whatever_the_buffering() {
        let mut trace = TraceHash::default();
        let mut plain = blake3::Hasher::new();
        for i in 0..10_000u32 {
            let data = vec![i as u8; (i % 300) as usize];
            trace.record(Record::Frame, u64::from(i) * 7, i % 16, &data);
            let mut head = [0u8; 17];
            head[0] = Record::Frame as u8;
            head[1..9].copy_from_slice(&(u64::from(i) * 7).to_le_bytes());
            head[9..13].copy_from_slice(&(i % 16).to_le_bytes());
            head[13..17].copy_from_slice(&(data.len() as u32).to_le_bytes());
            plain.update(&head);
            plain.update(&data);
            if i % 1000 == 0 {
                assert_eq!(trace.hex()[..], hex32(&plain)[..], "mid-run at record {i}");
            }
        }
        assert_eq!(trace.hex(), hex32(&plain));
        assert_eq!(trace.records(), 10_000);
    }

    fn hex32(hasher: &blake3::Hasher) -> String {
        sund_model::hex::encode(&hasher.finalize().as_bytes()[..16])
    }
}
