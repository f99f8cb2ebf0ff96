#!/usr/bin/env bash
# Files through the real binaries on loopback: a file of SIZE bytes (default 1 GiB) sent from
# one device and fetched by another through a gateway, each command timed with its peak RSS,
# the gateway's peak RSS after, and bare quinn on one stream in the same run as the baseline.
#
#   scripts/file-bench.sh [SIZE]          (builds the release binaries first)
#
# Prints one line per figure; benches/README.md ("Files") records the runs.
set -euo pipefail
SIZE=${1:-1073741824}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --release -q -p sund-node -p sund-gateway --bins
cargo build --release -q -p sund-benches --example quinn_bulk
G=$ROOT/target/release/sund-gateway
S=$ROOT/target/release/sund
WORK=$(mktemp -d)
trap 'kill $GW 2>/dev/null || true; rm -rf "$WORK"' EXIT
cd "$WORK"
PORT=$((20000 + RANDOM % 20000))
CERT=$($G cert --data-dir gw)
$S init --data-dir alice --gateway 127.0.0.1:$PORT --gateway-cert "$CERT" --user alice \
   --token "$($G admin enrol-token alice --data-dir gw)" >/dev/null
$S init --data-dir bob --gateway 127.0.0.1:$PORT --gateway-cert "$CERT" --user bob \
   --token "$($G admin enrol-token bob --data-dir gw)" >/dev/null
$G run --listen 127.0.0.1:$PORT --data-dir gw 2>gw.log &
GW=$!
sleep 0.5
$S status --data-dir bob >/dev/null
$S dm --data-dir alice bob >/dev/null
head -c "$SIZE" /dev/urandom > big.bin
mkdir received

measure() { # label, command...: elapsed seconds and peak RSS of the command
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o t.txt "$@" >/dev/null 2>cmd.err
  read -r secs kib < t.txt
  awk -v l="$label" -v s="$secs" -v k="$kib" -v b="$SIZE" \
    'BEGIN { printf "%s: %.2f s, %.0f MiB/s, peak RSS %.1f MiB\n", l, s, b/s/1048576, k/1024 }'
}
measure "send (cut, seal, upload)" $S file send --data-dir alice @bob big.bin
ID=$($S follow --data-dir bob --count 1 | grep -o 'file get [0-9a-f]*' | cut -d' ' -f3)
measure "get (download, verify, save)" $S file get --data-dir bob "$ID" --out received
cmp big.bin received/big.bin
echo "gateway peak RSS: $(awk '/VmHWM/ {printf "%.1f MiB", $2/1024}' /proc/$GW/status)"
kill $GW; wait $GW 2>/dev/null || true
"$ROOT"/target/release/examples/quinn_bulk "$SIZE"
