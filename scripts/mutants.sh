#!/usr/bin/env bash
# Mutation score of Sund's delivery-critical model code against the simulator: cargo-mutants
# changes one thing at a time in the sequencer, delivery, inboxes, sessions, sender order,
# the node's outbox and inbox and the commit authority (gateway groups), and each mutant must
# make `sim/tests/mutation_gate.rs` fail (every scenario, then a 300-seed swarm).
#
#   scripts/mutants.sh                  # every file below (hours on two cores)
#   scripts/mutants.sh --file model/src/gateway/sequencer.rs   # one file (its own --file)
#   scripts/mutants.sh --list           # the mutants, without running them
#
# Results go to target/mutants/mutants.out/ (caught.txt, missed.txt, timeout.txt, unviable.txt).
# Not run by CI: too slow for two cores. Installs cargo-mutants on first use. The unmutated
# baseline is skipped (cargo-mutants would run the gate in the mutated package); CI shows it
# passes: `cargo test --release -p sund-sim --test mutation_gate -- --ignored`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-mutants >/dev/null 2>&1; then
  cargo install cargo-mutants --locked
fi

files=(
  model/src/gateway/sequencer.rs
  model/src/gateway/delivery/mod.rs
  model/src/gateway/delivery/inboxes.rs
  model/src/gateway/session.rs
  model/src/gateway/sender_order.rs
  model/src/gateway/groups/mod.rs
  model/src/node/outbox.rs
  model/src/node/inbox.rs
)
selection=()
if ! printf '%s\n' "$@" | grep -qx -- '--file'; then
  for f in "${files[@]}"; do selection+=(--file "$f"); done
fi

exec cargo mutants --package sund-model --test-package sund-sim \
  "${selection[@]}" --exclude-re 'impl (Debug|Display)' \
  --cargo-arg=--release --baseline=skip --timeout 600 --build-timeout 1200 \
  --output target/mutants "$@" \
  -- --test mutation_gate -- --ignored
