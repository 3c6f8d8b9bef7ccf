#!/usr/bin/env bash
# The broker beside a peer token server, in one window, alternating, and the ratio.
#
#   bench/vs-peer.sh PEER_RUN_SH [SECONDS] [CLIENTS] [ROUNDS]     (defaults 20, 32, 2)
#
# PEER_RUN_SH is the peer's one-command benchmark (an OpenID-certified token server
# issuing mTLS-bound ES256 JWTs; it prints `peer …: N req/s p99 X ms` as its last line and
# takes `SECONDS CONCURRENCY`); it runs with the peer recording nothing (RECORD=none), its
# fastest setting. Each round runs `loadgen --mode reused` (release build, broker and
# clients in one process, every issuance durable in the ledger) and then the peer, with the
# same seconds and clients, so both see the same machine state; this machine's speed drifts
# by tens of percent between windows, so only a ratio from one run means anything.
# Prints each run and, per round, broker/peer throughput. Asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

peer=${1:?usage: bench/vs-peer.sh PEER_RUN_SH [SECONDS] [CLIENTS] [ROUNDS]}
secs=${2:-20}
clients=${3:-32}
rounds=${4:-2}
loadgen=target/release/examples/loadgen
[ -x "$loadgen" ] || cargo build --release --example loadgen

ratios=()
for round in $(seq 1 "$rounds"); do
    echo "== round $round: broker (loadgen --mode reused, $clients clients, ${secs}s)"
    out=$("$loadgen" --no-limits --mode reused --clients "$clients" --seconds "$secs")
    echo "$out"
    broker=$(sed -nE 's/.* throughput=([0-9]+)\/s.*/\1/p' <<<"$out" | head -1)
    broker_p99=$(sed -nE 's/.* p99=([^ ]+) .*/\1/p' <<<"$out" | head -1)
    echo "== round $round: peer ($peer $secs $clients, RECORD=none)"
    out=$(RECORD=none "$peer" "$secs" "$clients")
    echo "$out"
    peer_rate=$(sed -nE 's/^peer .*: ([0-9]+) req\/s p99 ([0-9.]+) ms$/\1/p' <<<"$out" | tail -1)
    peer_p99=$(sed -nE 's/^peer .*: ([0-9]+) req\/s p99 ([0-9.]+) ms$/\2/p' <<<"$out" | tail -1)
    if [ -z "$broker" ] || [ -z "$peer_rate" ]; then
        echo "round $round: could not read a throughput (broker '${broker}', peer '${peer_rate}')" >&2
        exit 1
    fi
    ratio=$(awk -v b="$broker" -v p="$peer_rate" 'BEGIN { printf "%.2f", b / p }')
    ratios+=("round $round: broker ${broker}/s p99 ${broker_p99}, peer ${peer_rate}/s p99 ${peer_p99} ms -> ${ratio}x")
done
echo
echo "== broker / peer, ${clients} clients, ${secs}s each, alternating in one window"
printf '%s\n' "${ratios[@]}"
