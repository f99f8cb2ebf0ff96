#!/usr/bin/env bash
# Files through the real binaries on loopback: a file of SIZE bytes (default 1 GiB) sent from
# one device and fetched by another through a gateway, each command timed with its peak RSS,
# the gateway's peak RSS after, and bare quinn on one stream in the same run as the baseline.
# Beside the transfer, two other devices exchange messages through the same gateway, and their
# send-to-delivery latency is measured with no transfer running and while the file is sent and
# fetched (benches/examples/message_latency.rs).
#
#   scripts/file-bench.sh [SIZE]          (builds the release binaries first)
#   RECEIVER_ON_TMPFS=1 scripts/file-bench.sh [SIZE]
#                                         the receiving device's data and the saved file on
#                                         tmpfs: what the gateway does with no other process
#                                         writing a gigabyte to its disk
#   BIN=DIR scripts/file-bench.sh [SIZE]  sund and sund-gateway from DIR instead (no build):
#                                         to alternate two builds in one session
#
# Prints one line per figure; benches/README.md ("Files") records the runs.
set -euo pipefail
SIZE=${1:-1073741824}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
[ -n "${BIN:-}" ] || cargo build --release -q -p sund-node -p sund-gateway --bins
cargo build --release -q -p sund-benches --example quinn_bulk --example message_latency
G=${BIN:-$ROOT/target/release}/sund-gateway
S=${BIN:-$ROOT/target/release}/sund
WORK=$(mktemp -d)
trap 'kill $GW 2>/dev/null || true; rm -rf "$WORK"' EXIT
cd "$WORK"
PORT=$((20000 + RANDOM % 20000))
CERT=$($G cert --data-dir gw)
$S init --data-dir alice --gateway 127.0.0.1:$PORT --gateway-cert "$CERT" --user alice \
   --token "$($G admin enrol-token alice --data-dir gw)" >/dev/null
# carol and dave exchange messages beside the transfer. On a real network they would be other
# machines: their data directories are on tmpfs, so that their fsyncs do not queue behind the
# gigabyte this one disk takes in (ext4 commits other files' dirty data with each fsync); the
# gateway's, alice's and bob's are on the disk.
MSGS=$(mktemp -d -p /dev/shm)
trap 'kill $GW 2>/dev/null || true; rm -rf "$WORK" "$MSGS"' EXIT
BOB=bob
RECEIVED=received
if [ -n "${RECEIVER_ON_TMPFS:-}" ]; then
  BOB=$MSGS/bob
  RECEIVED=$MSGS/received
fi
for user in bob carol dave; do
  dir=$MSGS/$user
  [ $user != bob ] || dir=$BOB
  $S init --data-dir $dir --gateway 127.0.0.1:$PORT --gateway-cert "$CERT" --user $user \
     --token "$($G admin enrol-token $user --data-dir gw)" >/dev/null
done
# carol's 100 messages a second stand for the traffic of many devices: past the default limit
# of one device (50 a second, bursts of 200), which would measure the pacing of a flood instead.
printf '[limits]\nsends_per_second = 0\n' > gw.toml
$G run --listen 127.0.0.1:$PORT --data-dir gw --config gw.toml 2>gw.log &
GW=$!
sleep 0.5
$S status --data-dir $BOB >/dev/null
$S dm --data-dir alice bob >/dev/null
$S status --data-dir $MSGS/dave >/dev/null
$S dm --data-dir $MSGS/carol dave >/dev/null
LATENCY=$ROOT/target/release/examples/message_latency
# 100 messages a second; the first run also lets dave join the DM from its Welcome.
$LATENCY $MSGS/carol $MSGS/dave @dave 1000 100 "messages, no transfer"
head -c "$SIZE" /dev/urandom > big.bin
# A file someone sends has usually been on the disk a while: flush this one now, so that the
# kernel does not write out gigabytes of it while the gateway's commits sync during the send.
sync
mkdir $RECEIVED

measure() { # label, command...: elapsed seconds and peak RSS of the command
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o t.txt "$@" >/dev/null 2>cmd.err
  read -r secs kib < t.txt
  awk -v l="$label" -v s="$secs" -v k="$kib" -v b="$SIZE" \
    'BEGIN { printf "%s: %.2f s, %.0f MiB/s, peak RSS %.1f MiB\n", l, s, b/s/1048576, k/1024 }'
}
# Messages while the file is sent, and again while it is fetched: each run stops sending when
# its transfer is over (at most 60 s of messages).
STOP_FILE=$WORK/send-over $LATENCY $MSGS/carol $MSGS/dave @dave 6000 100 "messages during the send" > lat-send.txt &
LAT=$!
measure "send (cut, seal, upload)" $S file send --data-dir alice @bob big.bin
touch "$WORK/send-over"
wait $LAT
ID=$($S follow --data-dir $BOB --count 1 | grep -o 'file get [0-9a-f]*' | cut -d' ' -f3)
STOP_FILE=$WORK/get-over $LATENCY $MSGS/carol $MSGS/dave @dave 6000 100 "messages during the get" > lat-get.txt &
LAT=$!
measure "get (download, verify, save)" $S file get --data-dir $BOB "$ID" --out $RECEIVED
touch "$WORK/get-over"
wait $LAT
cat lat-send.txt lat-get.txt
cmp big.bin $RECEIVED/big.bin
echo "gateway peak RSS: $(awk '/VmHWM/ {printf "%.1f MiB", $2/1024}' /proc/$GW/status)"
kill $GW; wait $GW 2>/dev/null || true
"$ROOT"/target/release/examples/quinn_bulk "$SIZE"
