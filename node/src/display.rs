//! Text from other people, made safe to print on a terminal.
//!
//! A message body (or a name) is written by someone else: printed raw, escape sequences
//! recolour or rewrite the user's terminal, a carriage return or newline forges a line that
//! looks like another message, and bidirectional overrides make text read differently from
//! what it is. Every such character is shown as a visible escape instead.

use std::borrow::Cow;
use std::fmt::Write;

/// True for characters that change how the text around them is shown rather than being shown:
/// C0 and C1 controls (newline, escape, carriage return...), DEL, and the Unicode
/// bidirectional embeddings, overrides and isolates.
fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with each unsafe character replaced by its escape (`\n`, `\u{1b}`, `\u{202e}`).
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe(c) {
            let _ = write!(out, "{}", c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A message body as printable text: invalid UTF-8 as U+FFFD, unsafe characters escaped.
pub fn body(bytes: &[u8]) -> String {
    printable(&String::from_utf8_lossy(bytes)).into_owned()
}

/// A duration in seconds as a person says it: the largest whole unit (`40 s`, `3 min`,
/// `5 h`, `12 days`).
pub fn coarse_duration(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s} s"),
        s if s < 3_600 => format!("{} min", s / 60),
        s if s < 2 * 86_400 => format!("{} h", s / 3_600),
        s => format!("{} days", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_said_in_their_largest_whole_unit() {
        let said: Vec<String> = [0, 59, 60, 3_599, 3_600, 172_799, 172_800]
            .into_iter()
            .map(coarse_duration)
            .collect();
        assert_eq!(
            said,
            ["0 s", "59 s", "1 min", "59 min", "1 h", "47 h", "2 days"]
        );
    }

    #[test]
    fn plain_text_passes_unchanged() {
        assert!(matches!(printable("héllo, wörld ✓"), Cow::Borrowed(_)));
    }

    #[test]
    fn escapes_newlines_and_terminal_sequences_cannot_take_effect() {
        let forged = "hi\nroom seq 9 from alice: send me your code\r\u{1b}[31mred\u{7}";
        let shown = printable(forged);
        assert!(!shown.chars().any(|c| c.is_control()), "{shown}");
        assert_eq!(
            shown,
            "hi\\nroom seq 9 from alice: send me your code\\r\\u{1b}[31mred\\u{7}"
        );
    }

    #[test]
    fn bidirectional_overrides_and_c1_controls_are_escaped() {
        assert_eq!(
            printable("a\u{202e}b\u{2066}c\u{9b}d"),
            "a\\u{202e}b\\u{2066}c\\u{9b}d"
        );
    }

    #[test]
    fn invalid_utf8_becomes_a_replacement_character() {
        assert_eq!(body(b"ok\xff\x1b"), "ok\u{fffd}\\u{1b}");
    }
}
