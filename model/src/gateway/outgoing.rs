//! Entries for peer gateways, gathered while a batch of input is handled and queued on the
//! links when the batch ends (issue 15: relay throughput).
//!
//! Whatever a gateway produces for one peer between two [`super::Gateway::poll_ready`] calls
//! (one commit) leaves as one link entry, an [`Entry::Bundle`] of everything in the order it
//! was produced: one outbox row, one cursor step and one acknowledgement instead of one per
//! entry, and one signature of the link key over every [`Entry::Sequenced`] in it instead of
//! one per message. Order is kept: every entry for a peer goes through here, and the bundles
//! of one peer are queued in the order of their entries.
//!
//! A batch that produced a single entry without a sequenced message sends it bare (no bundle
//! header to pay for). A batch over [`BUNDLE_ENTRIES_MAX`] entries or the link's entry size
//! is cut into several bundles.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::federation::entry::{
    bundle_statement, encode_bundle, BUNDLE_ENTRIES_MAX, BUNDLE_ENTRY_OVERHEAD, BUNDLE_HEADER_BYTES,
};
use crate::federation::link::ENTRY_BYTES_MAX;

/// The longest entry that may be staged: it fits in a bundle of its own.
pub const STAGED_BYTES_MAX: usize = ENTRY_BYTES_MAX - BUNDLE_HEADER_BYTES - BUNDLE_ENTRY_OVERHEAD;

/// Counters of bundling, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutgoingStats {
    /// Link entries queued (bundles and bare entries).
    pub link_entries: u64,
    /// Entries they carried.
    pub entries: u64,
    /// Signatures made over bundles (one per bundle with a sequenced message).
    pub signatures: u64,
}

/// One entry waiting for the batch's end.
#[derive(Debug)]
struct Staged {
    bytes: Bytes,
    /// Its sequenced statement, if it is a sequenced message.
    statement: Option<[u8; 32]>,
}

/// The staging area, per peer.
#[derive(Debug, Default)]
pub struct Outgoing {
    staged: BTreeMap<String, Vec<Staged>>,
    stats: OutgoingStats,
}

impl Outgoing {
    /// Adds an encoded entry (at most [`STAGED_BYTES_MAX`] bytes, not a bundle) for `peer`,
    /// after everything staged for it before.
    pub fn stage(&mut self, peer: &str, bytes: Bytes, statement: Option<[u8; 32]>) {
        assert!(bytes.len() <= STAGED_BYTES_MAX, "checked by the caller");
        match self.staged.get_mut(peer) {
            Some(staged) => staged.push(Staged { bytes, statement }),
            None => {
                self.staged
                    .insert(peer.to_string(), vec![Staged { bytes, statement }]);
            }
        }
    }

    /// True if nothing waits.
    pub fn is_empty(&self) -> bool {
        self.staged.is_empty()
    }

    /// Everything staged, per peer (in domain order), cut into link entries; `sign` signs a
    /// bundle statement. Returns each peer's link-entry bodies in order.
    pub fn take(&mut self, sign: impl Fn(&[u8]) -> [u8; 64]) -> Vec<(String, Vec<Bytes>)> {
        let staged = std::mem::take(&mut self.staged);
        let mut out = Vec::with_capacity(staged.len());
        for (peer, entries) in staged {
            let mut bodies = Vec::new();
            let mut parts: Vec<Bytes> = Vec::new();
            let mut statements: Vec<[u8; 32]> = Vec::new();
            let mut len = BUNDLE_HEADER_BYTES;
            for entry in entries {
                let grown = len + BUNDLE_ENTRY_OVERHEAD + entry.bytes.len();
                if !parts.is_empty()
                    && (parts.len() == BUNDLE_ENTRIES_MAX || grown > ENTRY_BYTES_MAX)
                {
                    bodies.push(self.seal(&mut parts, &mut statements, &sign));
                    len = BUNDLE_HEADER_BYTES;
                }
                len += BUNDLE_ENTRY_OVERHEAD + entry.bytes.len();
                statements.extend(entry.statement);
                parts.push(entry.bytes);
            }
            if !parts.is_empty() {
                bodies.push(self.seal(&mut parts, &mut statements, &sign));
            }
            out.push((peer, bodies));
        }
        out
    }

    /// One link entry of `parts`: bare if it is one entry and no sequenced message, else a
    /// bundle, signed if it carries sequenced messages. Leaves both vectors empty.
    fn seal(
        &mut self,
        parts: &mut Vec<Bytes>,
        statements: &mut Vec<[u8; 32]>,
        sign: &impl Fn(&[u8]) -> [u8; 64],
    ) -> Bytes {
        self.stats.link_entries += 1;
        self.stats.entries += parts.len() as u64;
        if parts.len() == 1 && statements.is_empty() {
            return parts.pop().expect("one part");
        }
        let signature = (!statements.is_empty()).then(|| {
            self.stats.signatures += 1;
            sign(&bundle_statement(statements))
        });
        let body = encode_bundle(parts, signature);
        debug_assert!(body.len() <= ENTRY_BYTES_MAX, "cut to fit above");
        parts.clear();
        statements.clear();
        body
    }

    /// The counters.
    pub fn stats(&self) -> OutgoingStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::entry::{statement_of, Entry};
    use crate::ids::{ConversationId, DeviceId, MsgId};

    fn sequenced(seq: u64, body_len: usize) -> Entry {
        Entry::Sequenced {
            conversation: ConversationId(1),
            seq,
            epoch: 0,
            sender: DeviceId(2),
            msg_id: MsgId(u128::from(seq)),
            chained: true,
            body: Bytes::from(vec![7; body_len]),
        }
    }

    fn following(head: u64) -> Entry {
        Entry::Following {
            conversation: ConversationId(3),
            term: 1,
            head,
        }
    }

    fn stage(out: &mut Outgoing, peer: &str, entry: &Entry) {
        out.stage(peer, entry.encode(), statement_of(entry));
    }

    /// A signature that says what it signed, so the test can check it.
    fn sign(message: &[u8]) -> [u8; 64] {
        let mut signature = [0; 64];
        signature[..32].copy_from_slice(message);
        signature
    }

    #[test]
    fn one_batch_for_a_peer_is_one_bundle_signed_over_its_sequenced_messages_in_order() {
        let mut out = Outgoing::default();
        let entries = [sequenced(1, 10), following(4), sequenced(2, 10)];
        for entry in &entries {
            stage(&mut out, "b.example", entry);
        }
        stage(&mut out, "a.example", &following(9));
        let taken = out.take(sign);
        assert!(out.is_empty());
        // Per peer, in domain order; a single plain entry goes bare.
        assert_eq!(taken[0].0, "a.example");
        assert_eq!(taken[0].1, vec![following(9).encode()]);
        assert_eq!(taken[1].0, "b.example");
        assert_eq!(taken[1].1.len(), 1);
        let Ok(Entry::Bundle {
            entries: got,
            signature: Some(signature),
        }) = Entry::decode(&taken[1].1[0])
        else {
            panic!("a signed bundle");
        };
        assert_eq!(got, entries);
        let statements: Vec<[u8; 32]> = entries.iter().filter_map(statement_of).collect();
        assert_eq!(signature, sign(&bundle_statement(&statements)));
        assert_eq!(
            out.stats(),
            OutgoingStats {
                link_entries: 2,
                entries: 4,
                signatures: 1,
            }
        );
    }

    #[test]
    fn a_single_sequenced_message_is_still_bundled_and_signed() {
        let mut out = Outgoing::default();
        stage(&mut out, "b.example", &sequenced(1, 3));
        let taken = out.take(sign);
        assert!(matches!(
            Entry::decode(&taken[0].1[0]),
            Ok(Entry::Bundle {
                signature: Some(_),
                ..
            })
        ));
    }

    #[test]
    fn a_large_batch_is_cut_by_count_and_by_size_keeping_order() {
        let mut out = Outgoing::default();
        let count = BUNDLE_ENTRIES_MAX + 10;
        for head in 0..count as u64 {
            stage(&mut out, "b.example", &following(head));
        }
        // Three messages of which two fill a link entry.
        let big = STAGED_BYTES_MAX / 2 - 100;
        for seq in 1..=3 {
            out.stage(
                "c.example",
                sequenced(seq, big).encode(),
                statement_of(&sequenced(seq, big)),
            );
        }
        let taken = out.take(sign);
        let mut heads = Vec::new();
        for body in &taken[0].1 {
            assert!(body.len() <= ENTRY_BYTES_MAX);
            let Ok(Entry::Bundle { entries, signature }) = Entry::decode(body) else {
                panic!("a bundle");
            };
            assert_eq!(signature, None, "nothing sequenced, nothing signed");
            for entry in entries {
                let Entry::Following { head, .. } = entry else {
                    panic!("a following entry")
                };
                heads.push(head);
            }
        }
        assert_eq!(taken[0].1.len(), 2);
        assert_eq!(heads, (0..count as u64).collect::<Vec<_>>());
        let seqs: Vec<Vec<u64>> = taken[1]
            .1
            .iter()
            .map(|body| {
                assert!(body.len() <= ENTRY_BYTES_MAX);
                let Ok(Entry::Bundle { entries, .. }) = Entry::decode(body) else {
                    panic!("a bundle");
                };
                entries
                    .iter()
                    .map(|e| match e {
                        Entry::Sequenced { seq, .. } => *seq,
                        _ => panic!("sequenced"),
                    })
                    .collect()
            })
            .collect();
        assert_eq!(seqs, vec![vec![1, 2], vec![3]]);
        // The largest entry that may be staged fits in a bundle of its own.
        let mut out = Outgoing::default();
        out.stage(
            "b.example",
            Bytes::from(vec![0xE1; STAGED_BYTES_MAX]),
            Some([0; 32]),
        );
        assert!(out.take(sign)[0].1[0].len() <= ENTRY_BYTES_MAX);
    }
}
