//! The effects sink: where a state machine's handlers put what they do to the world.
//!
//! A handler takes `&mut Effects<O>` and adds store writes, *held* outputs (released only by the
//! commit of the writes before them) and *eager* outputs (which depend on no write and may leave
//! before the commit). Sub-machines of one machine share one sink, so none of them owns an output
//! queue and none fights another for a borrow of the machine. The machine's `poll_ready` turns
//! what accumulated into one [`Ready`].

use crate::env::{Ready, Table, WriteBatch};

/// Writes and outputs produced since the last [`Effects::take_ready`].
#[derive(Debug)]
pub struct Effects<O> {
    writes: WriteBatch,
    held: Vec<O>,
    eager: Vec<O>,
}

impl<O> Default for Effects<O> {
    fn default() -> Self {
        Effects {
            writes: WriteBatch::default(),
            held: Vec::new(),
            eager: Vec::new(),
        }
    }
}

impl<O> Effects<O> {
    /// The writes of the batch being built (store codecs append to it).
    pub fn writes(&mut self) -> &mut WriteBatch {
        &mut self.writes
    }

    /// Adds a put to the batch.
    pub fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) {
        self.writes.put(table, key, value);
    }

    /// Adds a delete to the batch.
    pub fn delete(&mut self, table: Table, key: Vec<u8>) {
        self.writes.delete(table, key);
    }

    /// Adds an output that leaves only after this batch's writes (and every earlier batch's)
    /// are durable.
    pub fn hold(&mut self, output: O) {
        self.held.push(output);
    }

    /// Adds an output that depends on no write and may leave before the commit.
    pub fn eager(&mut self, output: O) {
        self.eager.push(output);
    }

    /// True if nothing was produced since the last `take_ready`.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.held.is_empty() && self.eager.is_empty()
    }

    /// Everything produced so far as one [`Ready`], leaving the sink empty; `None` if nothing
    /// was produced.
    pub fn take_ready(&mut self) -> Option<Ready<O>> {
        if self.is_empty() {
            return None;
        }
        Some(Ready::with_eager(
            self.writes.take(),
            std::mem::take(&mut self.held),
            std::mem::take(&mut self.eager),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MemStore;

    #[test]
    fn a_sink_hands_out_one_ready_and_is_empty_after() {
        let mut fx: Effects<&str> = Effects::default();
        assert!(fx.take_ready().is_none(), "nothing produced");
        fx.put(Table("t"), vec![1], vec![1]);
        fx.hold("held");
        fx.eager("eager");
        let mut ready = fx.take_ready().expect("something produced");
        assert!(fx.is_empty());
        assert_eq!(ready.take_eager(), vec!["eager"]);
        assert_eq!(
            ready.commit(&mut MemStore::default()).unwrap(),
            vec!["held"]
        );
    }
}
