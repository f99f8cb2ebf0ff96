//! Shrinking: reduces a failing scenario, with its seed, to a smaller one that still fails the
//! same way (`cargo sim FILE --seed S --shrink`): the same invariant, in the same phase, with a
//! detail of the same shape ([`crate::checker::Violation::kind`]: numbers and names may change,
//! the words may not). Matching the invariant alone let a shrink drift to another failure of it,
//! such as from a device whose outbox stalled for good to a flood a rate limit rightly cannot
//! drain within the bound.
//!
//! The scenario is shrunk as text, statement by statement, so that every step is itself a valid
//! scenario that anyone can read and replay. Greedy passes, repeated until none helps or the
//! run budget is spent:
//!
//! 1. drop statements (halves, then quarters, ... then single lines: delta debugging);
//! 2. drop words from a statement (a member of a conversation, an option and its value);
//! 3. make values smaller: halve counts, times and probabilities (down to 1 or 0), stretch
//!    periods (`every T` doubles, so actions and sends run less often), narrow latency ranges.
//!
//! A candidate is kept only if it parses, this build can run it, and its run with the same seed
//! fails the same way. Nothing here is random: the same input shrinks the same way.

use std::time::Duration;

use std::collections::BTreeSet;

use crate::checker::{FailureKind, Violation};
use crate::scenario::{self, Invariant};
use crate::world::{Outcome, World};

/// What a shrink found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shrunk {
    /// The smallest failing scenario found, as DSL text (its `seed` line is the seed).
    pub text: String,
    /// The invariant it breaks (the original's).
    pub invariant: Invariant,
    /// The original failure's detail.
    pub detail: String,
    /// Statements in the original and in the result.
    pub statements_before: usize,
    /// Statements left.
    pub statements_after: usize,
    /// Runs spent.
    pub runs: u64,
    /// True if the run budget ran out before no step helped any more.
    pub budget_spent: bool,
}

/// Why a scenario cannot be shrunk.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShrinkError {
    /// The scenario does not parse or cannot run here.
    #[error("{0}")]
    Scenario(String),
    /// Its run passes: there is nothing to shrink.
    #[error("{file} with seed {seed} passes: there is no failure to shrink")]
    Passes {
        /// The file.
        file: String,
        /// The seed.
        seed: u64,
    },
}

/// Shrinks `text` (from `file`) run with `seed`, spending at most `budget` runs. `progress` hears
/// of each smaller failing scenario found (statements left, runs so far).
pub fn shrink(
    file: &str,
    text: &str,
    seed: u64,
    budget: u64,
    progress: &mut dyn FnMut(usize, u64),
) -> Result<Shrunk, ShrinkError> {
    let original = scenario::parse(file, text).map_err(|e| ShrinkError::Scenario(e.to_string()))?;
    let names: BTreeSet<String> = original
        .users
        .iter()
        .map(|u| u.name.clone())
        .chain(original.gateways.iter().cloned())
        .chain(original.conversations.iter().map(|c| c.name.clone()))
        .collect();
    let mut runs = 0;
    let violation = match failure(file, text, seed) {
        Ok(Some(violation)) => violation,
        Ok(None) => {
            return Err(ShrinkError::Passes {
                file: file.to_string(),
                seed,
            })
        }
        Err(e) => return Err(ShrinkError::Scenario(e)),
    };
    let kind: FailureKind = violation.kind(&names);
    runs += 1;
    // Statements only, with the seed pinned and the name marked.
    let mut lines: Vec<String> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty())
        .filter(|l| !l.starts_with("seed ") && !l.starts_with("name "))
        .collect();
    let statements_before = lines.len();
    lines.insert(0, format!("seed {seed}"));
    lines.insert(0, format!("name {}-shrunk", original.name));
    let fixed = 2; // the name and seed lines are not candidates
    let still_fails = |candidate: &[String], runs: &mut u64| -> bool {
        *runs += 1;
        let text = candidate.join("\n");
        matches!(failure(file, &text, seed), Ok(Some(v)) if v.kind(&names) == kind)
    };
    let mut budget_spent = false;
    'passes: loop {
        let mut improved = false;
        // 1. Drop statements, in chunks from half the file down to one line.
        let mut chunk = (lines.len() - fixed).div_ceil(2).max(1);
        loop {
            let mut start = fixed;
            while start < lines.len() {
                if runs >= budget {
                    budget_spent = true;
                    break 'passes;
                }
                let end = (start + chunk).min(lines.len());
                let mut candidate = lines.clone();
                candidate.drain(start..end);
                if still_fails(&candidate, &mut runs) {
                    lines = candidate;
                    improved = true;
                    progress(lines.len() - fixed, runs);
                } else {
                    start = end;
                }
            }
            if chunk == 1 {
                break;
            }
            chunk = chunk.div_ceil(2);
        }
        // 2 and 3. Smaller statements: drop words, make values smaller.
        for index in fixed..lines.len() {
            let mut candidates = smaller_statements(&lines[index]);
            while let Some(smaller) = candidates.pop() {
                if runs >= budget {
                    budget_spent = true;
                    break 'passes;
                }
                let mut candidate = lines.clone();
                candidate[index] = smaller;
                if still_fails(&candidate, &mut runs) {
                    lines = candidate;
                    improved = true;
                    progress(lines.len() - fixed, runs);
                    // Go on shrinking the new statement.
                    candidates = smaller_statements(&lines[index]);
                }
            }
        }
        if !improved {
            break;
        }
    }
    let statements_after = lines.len() - fixed;
    let invariant = violation.invariant;
    let mut out = format!(
        "# Shrunk by `cargo sim --shrink` from {file} with seed {seed}: `{}` still fails the same\n\
         # way ({statements_after} of {statements_before} statements left, {runs} runs). It failed as:\n\
         # {}\n",
        invariant.name(),
        violation.detail.replace('\n', " ")
    );
    for line in &lines {
        out.push_str(line);
        out.push('\n');
    }
    Ok(Shrunk {
        text: out,
        invariant,
        detail: violation.detail,
        statements_before,
        statements_after,
        runs,
        budget_spent,
    })
}

/// How the scenario fails with `seed`, `None` if it passes; `Err` if it cannot run.
fn failure(file: &str, text: &str, seed: u64) -> Result<Option<Violation>, String> {
    let scenario = scenario::parse(file, text).map_err(|e| e.to_string())?;
    let world = World::new(scenario, seed).map_err(|e| e.to_string())?;
    Ok(match world.run().outcome {
        Outcome::Passed => None,
        Outcome::Safety(v) | Outcome::Liveness(v) => Some(v),
    })
}

/// Smaller versions of one statement, the most promising last (they are popped).
fn smaller_statements(line: &str) -> Vec<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut out = Vec::new();
    // Smaller values, one word at a time.
    for (i, word) in words.iter().enumerate().skip(1) {
        let after_every = words[i - 1] == "every";
        for value in smaller_values(word, after_every) {
            let mut w: Vec<String> = words.iter().map(|s| s.to_string()).collect();
            w[i] = value;
            out.push(w.join(" "));
        }
    }
    // Fewer words: one (a member), or an option with its value.
    for width in [1, 2] {
        for i in 1..words.len().saturating_sub(width - 1) {
            let w: Vec<&str> = words[..i]
                .iter()
                .chain(&words[i + width..])
                .copied()
                .collect();
            out.push(w.join(" "));
        }
    }
    out
}

/// Smaller values of one word: a count halved, a time halved (a period after `every`
/// doubled, so that it runs less often), a probability halved and zeroed, a range narrowed.
fn smaller_values(word: &str, after_every: bool) -> Vec<String> {
    if let Some((lo, hi)) = word.split_once("..") {
        if lo != hi {
            return vec![lo.to_string()];
        }
        return Vec::new();
    }
    if let Some(percent) = word.strip_suffix('%') {
        let Ok(p) = percent.parse::<f64>() else {
            return Vec::new();
        };
        if p <= 0.0 {
            return Vec::new();
        }
        let half = ((p / 2.0) * 10.0).floor() / 10.0;
        return if half > 0.0 {
            vec!["0%".into(), format!("{half}%")]
        } else {
            vec!["0%".into()]
        };
    }
    if let Ok(n) = word.parse::<u64>() {
        return if n > 1 {
            vec![(n / 2).to_string()]
        } else {
            Vec::new()
        };
    }
    let (sign, unsigned) = match word.strip_prefix(['+', '-']) {
        Some(rest) => (&word[..1], rest),
        None => ("", word),
    };
    if let Some(d) = scenario::parse_duration(unsigned) {
        let us = d.as_micros() as u64;
        if after_every {
            return if us < 3_600_000_000 {
                vec![format_time(Duration::from_micros(us * 2))]
            } else {
                Vec::new()
            };
        }
        if us >= 2 {
            return vec![format!(
                "{sign}{}",
                format_time(Duration::from_micros(us / 2))
            )];
        }
    }
    Vec::new()
}

/// A time in the DSL's units, exact to the microsecond.
fn format_time(d: Duration) -> String {
    let us = d.as_micros() as u64;
    if us % 1_000_000 == 0 {
        format!("{}s", us / 1_000_000)
    } else if us % 1_000 == 0 {
        format!("{}ms", us / 1_000)
    } else {
        format!("{us}us")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_get_smaller_and_periods_longer() {
        assert_eq!(smaller_values("8", false), ["4"]);
        assert!(smaller_values("1", false).is_empty());
        assert_eq!(smaller_values("5%", false), ["0%", "2.5%"]);
        assert_eq!(smaller_values("250ms", false), ["125ms"]);
        assert_eq!(smaller_values("250ms", true), ["500ms"]);
        assert_eq!(smaller_values("-1s", false), ["-500ms"]);
        assert_eq!(smaller_values("1ms..20ms", false), ["1ms"]);
        assert!(smaller_values("gw", false).is_empty());
    }

    #[test]
    fn a_passing_scenario_is_not_shrunk() {
        let text = "duration 2s\ngateway gw\nuser a\nuser b\nconversation c members a b\nsend c from a every 500ms\n";
        assert_eq!(
            shrink("x.sund", text, 1, 10, &mut |_, _| {}),
            Err(ShrinkError::Passes {
                file: "x.sund".into(),
                seed: 1
            })
        );
    }
}
