#!/usr/bin/env bash
# Federation lag on loopback (issue 15): two gateways of two domains, linked as their operators
# would link them, and three message streams at RATE per second (default 25, half the
# gateway's default per-device limit of 50), each COUNT messages (default 500), measured
# send-to-delivery by benches/examples/message_latency.rs (both devices in one process, one
# clock):
#
#   single domain   carol@a.example -> dave@a.example, in a room homed at a.example
#   relayed         bob@b.example -> alice@a.example, in a room homed at a.example: bob's gateway
#                   relays to the home, which sequences and delivers
#   fanned out      alice@a.example -> bob@b.example, in another room homed at a.example: the
#                   home sequences and sends the message over the link to b.example, which
#                   delivers
#
#   scripts/federation-bench.sh [COUNT] [RATE]   (builds the release binaries first)
#
# Devices' data are on tmpfs (on a real network they are other machines); the gateways' on
# the disk. Prints one line per stream; benches/README.md ("Federation") records the runs.
set -euo pipefail
COUNT=${1:-500}
RATE=${2:-25}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --release -q -p sund-node -p sund-gateway --bins
cargo build --release -q -p sund-benches --example message_latency
G=$ROOT/target/release/sund-gateway
S=$ROOT/target/release/sund
LATENCY=$ROOT/target/release/examples/message_latency
WORK=$(mktemp -d)
DEV=$(mktemp -d -p /dev/shm)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$WORK" "$DEV"' EXIT
cd "$WORK"
port() { echo $((20000 + RANDOM % 20000)); }
A_PORT=$(port); B_PORT=$(port); A_LINK=$(port); B_LINK=$(port)
config() { # name domain port [link peer peer_link fingerprint]
  printf 'domain = "%s"\ndata_dir = "%s"\nlisten = "127.0.0.1:%s"\n' "$2" "$WORK/$1" "$3" > "$1.toml"
  if [ $# -gt 3 ]; then
    printf '\n[federation]\nlisten = "127.0.0.1:%s"\n\n[[federation.peer]]\ndomain = "%s"\naddress = "127.0.0.1:%s"\nroot_fingerprint = "%s"\n' \
      "$4" "$5" "$6" "$7" >> "$1.toml"
  fi
}
fingerprint() { $G admin federation --config "$1.toml" | sed -n 's/.*trust root \([0-9a-f]*\).*/\1/p' | head -1; }
first_start() { # name: makes its root and TLS identity
  $G run --config "$1.toml" 2>"$1.log" & local pid=$!
  for _ in $(seq 100); do [ -S "$WORK/$1/admin.sock" ] && break; sleep 0.1; done
  kill $pid; wait $pid 2>/dev/null || true
}
config a a.example $A_PORT
config b b.example $B_PORT
first_start a
first_start b
FA=$(fingerprint a); FB=$(fingerprint b)
config a a.example $A_PORT $A_LINK b.example $B_LINK "$FB"
config b b.example $B_PORT $B_LINK a.example $A_LINK "$FA"
key() { sed -n 's/^device key: //p'; }
device() { # user gateway port
  $S init --data-dir "$DEV/$1" --gateway 127.0.0.1:$3 --gateway-cert "$($G cert --data-dir $2)" \
     --user "$1" --token "$($G admin enrol-token "$1" --data-dir $2)" | key
}
ALICE=$(device alice a $A_PORT); CAROL=$(device carol a $A_PORT); DAVE=$(device dave a $A_PORT)
BOB=$(device bob b $B_PORT)
$G admin create-conversation local --member "$CAROL" --member "$DAVE" --data-dir a >/dev/null
$G admin create-conversation span-in --member "$ALICE" --data-dir a >/dev/null
$G admin create-conversation span-out --member "$ALICE" --data-dir a >/dev/null
$G run --config a.toml 2>a.log & PIDS+=($!)
$G run --config b.toml 2>b.log & PIDS+=($!)
for _ in $(seq 100); do
  $G admin federation --config a.toml 2>/dev/null | grep -q '^peer b.example .*  up' && break
  sleep 0.2
done
for room in span-in span-out; do
  $G admin share-conversation $room --peer b.example --member "$BOB" --config a.toml >/dev/null
done
# A first message in each room, untimed: the rooms open at b.example, and every device has
# read what it will not be measured on.
$S send --data-dir "$DEV/bob" span-in "warm-up" >/dev/null
$S send --data-dir "$DEV/alice" span-out "warm-up" >/dev/null
$S follow --data-dir "$DEV/bob" --count 2 >/dev/null
$S follow --data-dir "$DEV/alice" --count 2 >/dev/null
$LATENCY "$DEV/carol" "$DEV/dave" local "$COUNT" "$RATE" "single domain (a -> a)"
$LATENCY "$DEV/bob" "$DEV/alice" span-in "$COUNT" "$RATE" "relayed (b -> home a)"
$LATENCY "$DEV/alice" "$DEV/bob" span-out "$COUNT" "$RATE" "fanned out (home a -> b)"
