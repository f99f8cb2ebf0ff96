//! `--trace`: the last events of a run in words, so that a failing seed can be understood
//! without adding prints. Off by default (describing every event costs time); the trace hash
//! is the same either way, because the log only reads what the run already did.

use std::collections::VecDeque;

use sund_model::ids::DeviceId;
use sund_model::wire::payload::{ErrorCode, Payload};
use sund_model::wire::Frame;

/// The newest lines of a run's event log, oldest first.
#[derive(Clone, Debug)]
pub struct EventLog {
    lines: VecDeque<String>,
    keep: usize,
}

impl EventLog {
    /// A log that keeps the newest `keep` lines.
    pub fn new(keep: usize) -> EventLog {
        EventLog {
            lines: VecDeque::with_capacity(keep.min(4096)),
            keep: keep.max(1),
        }
    }

    /// Adds a line, forgetting the oldest once full.
    pub fn push(&mut self, line: String) {
        if self.lines.len() == self.keep {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// The kept lines, oldest first.
    pub fn into_lines(self) -> Vec<String> {
        self.lines.into()
    }
}

/// A frame in words: its opcode and the routing fields it sets (a sender by its actor name
/// where `name_of` knows it).
pub fn describe_frame(bytes: &[u8], name_of: &dyn Fn(DeviceId) -> Option<String>) -> String {
    match Frame::decode(bytes, u32::MAX) {
        Ok(frame) => {
            let r = &frame.routing;
            let mut text = match &frame.payload {
                Payload::Error(e) => {
                    format!("Error {:?} ({})", ErrorCode::from_u16(e.code), e.message)
                }
                Payload::Goodbye(g) => {
                    format!("Goodbye {:?} ({})", ErrorCode::from_u16(g.code), g.message)
                }
                _ => format!("{:?}", frame.opcode()),
            };
            if r.epoch != 0 {
                text.push_str(&format!(" epoch {}", r.epoch));
            }
            if r.conversation.0 != 0 {
                text.push_str(&format!(" {}", r.conversation));
            }
            if r.seq != 0 {
                text.push_str(&format!(" seq {}", r.seq));
            }
            if r.sender.0 != 0 {
                let sender = name_of(r.sender).unwrap_or_else(|| r.sender.to_string());
                text.push_str(&format!(" from {sender}"));
            }
            text
        }
        Err(e) => format!("undecodable frame ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_the_newest_lines_in_order() {
        let mut log = EventLog::new(3);
        for i in 0..5 {
            log.push(format!("line {i}"));
        }
        assert_eq!(log.into_lines(), vec!["line 2", "line 3", "line 4"]);
    }

    #[test]
    fn garbage_is_described_not_decoded() {
        assert!(describe_frame(b"not a frame", &|_| None).starts_with("undecodable frame"));
    }
}
