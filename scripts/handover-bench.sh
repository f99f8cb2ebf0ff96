#!/usr/bin/env bash
# Authority handover on loopback (issue 15, step 5): two gateways of two domains, a room homed
# at a.example with MEMBERS member devices (default 1,000: alice@a and bob@b, who write and
# read, and member keys of devices that never connect, half at each domain, so nothing is ever
# collected) and MESSAGES messages retained (default 100,000, written by alice and read by
# bob through b.example). Then the room's authority is handed a.example -> b.example -> ... ROUNDS
# times (default 5) by `sund-gateway admin handover`, and each handover is timed twice:
#
#   frozen     the old authority's own figure (`frozen_ms` in its "handover done" log line):
#              from the command to its learning of the new authority's certificate
#   listed     from the command's start to `admin list` at the old authority showing the room
#              homed at the new one (polled every 20 ms: includes two admin round trips)
#
# and a message is sent through the new authority after each (its seq printed).
#
#   scripts/handover-bench.sh [MEMBERS] [MESSAGES] [ROUNDS]   (builds the release binaries first)
#
# Devices' data are on tmpfs; the gateways' on the disk. benches/README.md ("Federation")
# records the runs.
set -euo pipefail
MEMBERS=${1:-1000}
MESSAGES=${2:-100000}
ROUNDS=${3:-5}
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
  # The retained messages are written as fast as the gateways take them.
  printf '\n[limits]\nsends_per_second = 100000\nsend_burst = 100000\n' >> "$1.toml"
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
ALICE=$(device alice a $A_PORT)
BOB=$(device bob b $B_PORT)
# Keys of member devices that never connect (any 32 bytes name a device).
fake() { head -c $(($1 * 32)) /dev/urandom | od -An -vtx1 | tr -d ' \n' | fold -w64; }
HALF=$(((MEMBERS - 2) / 2))
mapfile -t A_KEYS < <(fake $HALF)
mapfile -t B_KEYS < <(fake $((MEMBERS - 2 - HALF)))
args() { for k in "$@"; do printf -- '--member\n%s\n' "$k"; done; }
mapfile -t A_ARGS < <(args "$ALICE" "${A_KEYS[@]}")
mapfile -t B_ARGS < <(args "$BOB" "${B_KEYS[@]}")
$G admin create-conversation room "${A_ARGS[@]}" --data-dir a >/dev/null
$G run --config a.toml 2>a.log & PIDS+=($!)
$G run --config b.toml 2>b.log & PIDS+=($!)
for _ in $(seq 100); do
  $G admin federation --config a.toml 2>/dev/null | grep -q '^peer b.example .*  up' && break
  sleep 0.2
done
$G admin share-conversation room --peer b.example "${B_ARGS[@]}" --config a.toml >/dev/null
$S send --data-dir "$DEV/bob" room "warm-up" >/dev/null
$S follow --data-dir "$DEV/alice" --count 1 >/dev/null
if [ "$MESSAGES" -gt 0 ]; then
  $LATENCY "$DEV/alice" "$DEV/bob" room "$MESSAGES" 4000 "retained messages written (a -> b)" >&2
fi
echo "room: $MEMBERS member devices, $($G admin list --config a.toml | sed -n 's/.* head \([0-9]*\) retained \([0-9]*\).*/head \1, \2 retained at a.example/p' | head -1)"
FROM=a; TO=b
for round in $(seq "$ROUNDS"); do
  start=$(date +%s%N)
  $G admin handover room --to $TO.example --config $FROM.toml >/dev/null 2>&1
  for _ in $(seq 1500); do
    $G admin list --config $FROM.toml | grep -q "homed at $TO.example" && break
    sleep 0.02
  done
  listed=$(( ($(date +%s%N) - start) / 1000000 ))
  frozen=$(grep "handover done" $FROM.log | tail -1 | sed -n 's/.*frozen_ms=\([0-9]*\).*/\1/p')
  seq=$($S send --data-dir "$DEV/alice" room "after handover $round" | sed -n 's/.*seq \([0-9]*\).*/\1/p')
  echo "handover $round: $FROM.example -> $TO.example frozen ${frozen:-?} ms, listed after ${listed} ms; next message seq $seq"
  T=$FROM; FROM=$TO; TO=$T
done
