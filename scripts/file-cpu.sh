#!/usr/bin/env bash
# One file sent and fetched through a gateway on loopback, with no other load: the wall time
# of each command and the CPU-seconds it took (user + system), and the gateway's CPU-seconds
# during each (from /proc/PID/stat). Quicker and steadier than scripts/file-bench.sh when
# comparing two builds: run them alternately.
#
#   scripts/file-cpu.sh FILE                    the release binaries of this tree (built)
#   BIN=DIR scripts/file-cpu.sh FILE            sund and sund-gateway from DIR (no build)
set -euo pipefail
FILE=$(realpath "${1:?usage: scripts/file-cpu.sh FILE}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ -n "${BIN:-}" ] || (cd "$ROOT" && cargo build --release -q -p sund-node -p sund-gateway --bins)
G=${BIN:-$ROOT/target/release}/sund-gateway
S=${BIN:-$ROOT/target/release}/sund
WORK=$(mktemp -d)
trap 'kill $GW 2>/dev/null || true; rm -rf "$WORK"' EXIT
cd "$WORK"
PORT=$((20000 + RANDOM % 20000))
CERT=$($G cert --data-dir gw 2>/dev/null)
for user in alice bob; do
  $S init --data-dir $user --gateway 127.0.0.1:$PORT --gateway-cert "$CERT" --user $user \
     --token "$($G admin enrol-token $user --data-dir gw 2>/dev/null)" >/dev/null
done
$G run --listen 127.0.0.1:$PORT --data-dir gw >/dev/null 2>gw.log &
GW=$!
sleep 0.5
$S status --data-dir bob >/dev/null 2>&1
$S dm --data-dir alice bob >/dev/null 2>&1
cat "$FILE" > /dev/null # in the page cache, as a file someone sends usually is
gateway_cpu() { awk '{print $14 + $15}' /proc/$GW/stat; } # clock ticks
tick=$(getconf CLK_TCK)
g0=$(gateway_cpu)
/usr/bin/time -f "send: %e s, CPU %U + %S s" -o t.txt $S file send --data-dir alice @bob "$FILE" >/dev/null 2>&1
g1=$(gateway_cpu)
echo "$(cat t.txt), gateway CPU $(awk -v t=$(( g1 - g0 )) -v k=$tick 'BEGIN { printf "%.2f", t / k }') s"
ID=$($S follow --data-dir bob --count 1 | grep -o 'file get [0-9a-f]*' | cut -d' ' -f3)
mkdir out
/usr/bin/time -f "get: %e s, CPU %U + %S s" -o t.txt $S file get --data-dir bob "$ID" --out out >/dev/null 2>&1
g2=$(gateway_cpu)
echo "$(cat t.txt), gateway CPU $(awk -v t=$(( g2 - g1 )) -v k=$tick 'BEGIN { printf "%.2f", t / k }') s"
cmp "$FILE" "out/$(basename "$FILE")"
