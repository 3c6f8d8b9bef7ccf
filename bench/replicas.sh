#!/usr/bin/env bash
# N `spiffe-broker serve` replicas on one PostgreSQL, driven by `loadgen --target`.
#
# Usage: bench/replicas.sh [-n "1 3"] [-c CLIENTS] [-s SECONDS] [-r ROUNDS] [-m MODE] [-B]
#
#   -n  replica counts to measure, in order (default "1 3")
#   -c  loadgen clients in total, spread over the replicas (default 32)
#   -s  seconds per run (default 20)
#   -r  rounds: the counts are run interleaved, ROUNDS times (default 2)
#   -m  loadgen mode (default reused; not jwt-svid)
#   -B  afterwards, a batched-sequencer probe of PostgreSQL alone (pgbench, below)
#
# Needs `cargo build --release --bin spiffe-broker --example loadgen` first, Debian's
# `postgresql` package (/usr/lib/postgresql/*/bin: initdb, pg_ctl, postgres), psql,
# curl (and pgbench for -B). As root, PostgreSQL runs as the `postgres` user (it refuses root).
#
# What it starts, all on loopback in one temp dir (removed on exit, with every process):
#   - a throwaway PostgreSQL cluster (initdb + pg_ctl, default durability settings:
#     fsync and synchronous_commit on), one fresh database per run;
#   - `spiffe-broker dev` as the Workload API (its dev CA issues the replicas' own SVIDs
#     and the clients'; its own broker stays idle);
#   - N replicas (`serve`) on a shared state dir (`keys init`, demo policy, the dev
#     issuing CA), each with its own ports, all on the run's database; quotas and
#     per-caller rate limits lifted as loadgen does for `dev`;
#   - `loadgen --target A,B,… --mode MODE --no-limits`: client i calls replica i mod N.
#
# Per run it prints loadgen's result and, over the same interval: CPU per issuance of
# the replicas and of PostgreSQL (from /proc), the database's commits/s and WAL bytes
# per issuance (pg_stat_database, pg_stat_wal), and the replicas' ledger batches (mean
# ops per commit, mean time inside a write transaction, and the sum of those times as a
# share of the wall clock: near 100 % the one ledger lock is always held).
#
# The probe (-B) asks what one database lock can sequence when an issuance costs no
# round trips of its own: on a copy of the first run's database (its real schema,
# indexes and triggers), pgbench runs transactions that take the ledger lock, read the
# head, insert B issuances' rows in one statement per table (B leases, B audit entries
# with a real entry's body, 2B Merkle rows, as today) and commit. Rows are made by the
# server (generate_series), so sending them is not counted; their hashes are not a
# valid chain. One client, then four (the lock serialises them), for B = 16, 64 and 256.
set -euo pipefail

counts="1 3"
clients=32
seconds=20
rounds=2
mode=reused
probe=""
while getopts "n:c:s:r:m:Bh" opt; do
    case "$opt" in
    n) counts=$OPTARG ;;
    c) clients=$OPTARG ;;
    s) seconds=$OPTARG ;;
    r) rounds=$OPTARG ;;
    m) mode=$OPTARG ;;
    B) probe=1 ;;
    *)
        sed -n '2,15p' "$0"
        exit 2
        ;;
    esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=$root/target/release/spiffe-broker
loadgen=$root/target/release/examples/loadgen
for f in "$bin" "$loadgen"; do
    [[ -x $f ]] || {
        echo "missing $f: cargo build --release --bin spiffe-broker --example loadgen" >&2
        exit 1
    }
done
pgbin=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
[[ -n $pgbin && -x $pgbin/initdb ]] || {
    echo "PostgreSQL server binaries not found: apt-get install -y postgresql" >&2
    exit 1
}
tck=$(getconf CLK_TCK)

work=$(mktemp -d "${TMPDIR:-/tmp}/spiffe-broker-replicas.XXXXXX")
chmod 711 "$work"
pgdir=$work/pg
dev_pid=""
loadgen_pid=""
replica_pids=()

# Runs a command as the `postgres` user when we are root, from a directory it may enter.
as_pg() {
    if [[ $(id -u) -eq 0 ]]; then
        (cd "$pgdir" && runuser -u postgres -- "$@")
    else
        (cd "$pgdir" && "$@")
    fi
}

stop_replicas() {
    local p
    for p in "${replica_pids[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${replica_pids[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    replica_pids=()
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $loadgen_pid ]]; then
        kill "$loadgen_pid" 2>/dev/null || true
        wait "$loadgen_pid" 2>/dev/null || true
    fi
    stop_replicas
    if [[ -n $dev_pid ]]; then
        kill "$dev_pid" 2>/dev/null || true
        wait "$dev_pid" 2>/dev/null || true
    fi
    if [[ -f $pgdir/data/postmaster.pid ]]; then
        as_pg "$pgbin/pg_ctl" -D "$pgdir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A loopback port nothing listens on (random; a race with another process is unlikely).
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
}

# Waits up to 60 s for http://ADDR/readyz to answer 200; names LOG on failure.
wait_ready() {
    local addr=$1 log=$2 i
    for ((i = 0; i < 600; i++)); do
        if curl -fsS -o /dev/null "http://$addr/readyz" 2>/dev/null; then
            return
        fi
        sleep 0.1
    done
    echo "not ready at $addr; its log:" >&2
    tail -n 30 "$log" >&2
    exit 1
}

psql_q() {
    psql -X -A -t -q -h 127.0.0.1 -p "$pg_port" -U postgres -d "$1" -c "$2"
}

# CPU ticks (user + system) of these pids; gone pids count 0.
ticks() {
    local p total=0 stat f
    for p in "$@"; do
        stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        # After "pid (comm) ": state, ppid, … utime and stime are the 12th and 13th.
        read -r -a f <<<"${stat##*) }"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# The postmaster and its children (backends, checkpointer, WAL writer …).
pg_pids() {
    local pm
    pm=$(head -n 1 "$pgdir/data/postmaster.pid")
    echo "$pm"
    pgrep -P "$pm" || true
}

# Sum of one metric (a `_sum` or `_count` line) over the replicas' /metrics.
metric_sum() {
    local name=$1 addr total=0 v
    for addr in "${http_addrs[@]}"; do
        v=$(curl -fsS "http://$addr/metrics" | awk -v n="$name" '$1 == n { print $2 }')
        total=$(awk -v a="$total" -v b="${v:-0}" 'BEGIN { printf "%.6f", a + b }')
    done
    echo "$total"
}

echo "== PostgreSQL ($pgbin)"
mkdir -p "$pgdir/sock"
if [[ $(id -u) -eq 0 ]]; then
    chown -R postgres: "$pgdir"
fi
as_pg "$pgbin/initdb" -D "$pgdir/data" -U postgres -A trust -E UTF8 --no-locale --no-sync >/dev/null
pg_port=$(free_port)
as_pg "$pgbin/pg_ctl" -D "$pgdir/data" -l "$pgdir/postgres.log" -w -o \
    "-p $pg_port -k $pgdir/sock -c listen_addresses=127.0.0.1 -c max_connections=100" \
    start >/dev/null
echo "   port $pg_port, fsync $(psql_q postgres 'SHOW fsync'), synchronous_commit $(psql_q postgres 'SHOW synchronous_commit'), shared_buffers $(psql_q postgres 'SHOW shared_buffers')"

echo "== Workload API (spiffe-broker dev)"
dev_grpc=127.0.0.1:$(free_port)
dev_http=127.0.0.1:$(free_port)
"$bin" dev --state-dir "$work/dev" --grpc-addr "$dev_grpc" --http-addr "$dev_http" \
    --svid-ttl 2h >"$work/dev.log" 2>&1 &
dev_pid=$!
wait_ready "$dev_http" "$work/dev.log"
sockets=$work/dev/workloads

echo "== shared replica state (keys, policy, issuing CA)"
shared=$work/shared
"$bin" keys init --trust-domain example.org --state-dir "$shared" >/dev/null
cp -r "$work/dev/policy" "$shared/"
cp "$work/dev/x509-issuing-ca.pem" "$work/dev/x509-issuing-ca.key" "$shared/"

# Writes replica I's config for database DB; sets grpc_addrs[I] and http_addrs[I].
replica_config() {
    local i=$1 db=$2 grpc http
    grpc=127.0.0.1:$(free_port)
    http=127.0.0.1:$(free_port)
    grpc_addrs[i]=$grpc
    http_addrs[i]=$http
    sed -e "s|@STATE_DIR@|$shared|g" -e "s|@GRPC@|$grpc|g" -e "s|@HTTP@|$http|g" \
        -e "s|@SOCKET@|unix://$sockets/spiffe-broker.sock|g" \
        -e "s|@VAULT_ADDR@|http://127.0.0.1:8200|g" \
        -e "s|@STS_ENDPOINT@|http://127.0.0.1:5000|g" \
        -e "s|^max_active_leases = 100$|max_active_leases = 0|" \
        -e "s|^requests_per_minute = 600$|requests_per_minute = 0|" \
        -e "s|^calls_per_identity_per_minute = 1200$|calls_per_identity_per_minute = 100000000|" \
        -e "s|^renewals_per_lease_per_minute = 6$|renewals_per_lease_per_minute = 100000000|" \
        -e "s|^\[ledger\]$|[ledger]\npostgres_url = \"postgres://postgres@127.0.0.1:$pg_port/$db\"|" \
        "$root/deploy/demo-config.toml" >"$shared/replica-$i.toml"
}

summary=()
run_one() {
    local n=$1 round=$2 db i targets out line lg
    db=bench_r${round}_n${n}
    psql_q postgres "CREATE DATABASE $db"
    grpc_addrs=()
    http_addrs=()
    for ((i = 0; i < n; i++)); do
        replica_config "$i" "$db"
        "$bin" serve --config "$shared/replica-$i.toml" >/dev/null 2>"$work/replica-$i.log" &
        replica_pids+=($!)
        # One at a time: the first migrates the new database.
        wait_ready "${http_addrs[i]}" "$work/replica-$i.log"
    done
    targets=$(
        IFS=,
        echo "${grpc_addrs[*]}"
    )

    local pg_t0 rep_t0 x0 w0 b0 c0 d0 t0 pgp
    mapfile -t pgp < <(pg_pids)
    pg_t0=$(ticks "${pgp[@]}")
    rep_t0=$(ticks "${replica_pids[@]}")
    x0=$(psql_q postgres "SELECT xact_commit FROM pg_stat_database WHERE datname = '$db'")
    w0=$(psql_q postgres "SELECT wal_bytes FROM pg_stat_wal")
    b0=$(metric_sum spiffe_broker_ledger_commit_batch_size_sum)
    c0=$(metric_sum spiffe_broker_ledger_commit_batch_size_count)
    d0=$(metric_sum spiffe_broker_ledger_commit_duration_seconds_sum)
    t0=$(date +%s.%N)

    # In the background, so a signal to this script is handled at once.
    "$loadgen" --target "$targets" --workload-dir "$sockets" --mode "$mode" \
        --clients "$clients" --seconds "$seconds" --no-limits >"$work/loadgen.out" 2>&1 &
    loadgen_pid=$!
    wait "$loadgen_pid" || {
        cat "$work/loadgen.out" >&2
        exit 1
    }
    loadgen_pid=""

    local pg_t1 rep_t1 x1 w1 b1 c1 d1 t1
    mapfile -t pgp < <(pg_pids)
    pg_t1=$(ticks "${pgp[@]}")
    rep_t1=$(ticks "${replica_pids[@]}")
    t1=$(date +%s.%N)
    b1=$(metric_sum spiffe_broker_ledger_commit_batch_size_sum)
    c1=$(metric_sum spiffe_broker_ledger_commit_batch_size_count)
    d1=$(metric_sum spiffe_broker_ledger_commit_duration_seconds_sum)
    # Backends report their counters when idle, at most once a second.
    sleep 1.2
    x1=$(psql_q postgres "SELECT xact_commit FROM pg_stat_database WHERE datname = '$db'")
    w1=$(psql_q postgres "SELECT wal_bytes FROM pg_stat_wal")
    stop_replicas
    # What one entry weighs (canonical body) and Merkle rows per entry, for the model.
    local shape
    shape=$(psql_q "$db" "SELECT round(avg(octet_length(body))), (SELECT count(*) FROM merkle_nodes)::float8 / greatest(count(*), 1) FROM audit_log" | tr '|' ' ')

    out=$(cat "$work/loadgen.out")
    line=$(grep -E '^ +ok=' <<<"$out" | head -n 1)
    # loadgen's own CPU per issuance (the clients), as it prints it.
    lg=$(sed -n 's/.*(the clients only): \([0-9.]*\) µs.*/\1/p' <<<"$out")
    echo "-- N=$n round $round ($mode, $clients clients, $seconds s; database $db)"
    echo "$line"
    awk -v line="$line" -v n="$n" -v round="$round" -v tck="$tck" \
        -v pg="$((pg_t1 - pg_t0))" -v rep="$((rep_t1 - rep_t0))" -v lg="${lg:-0}" \
        -v x="$((x1 - x0))" -v w="$((w1 - w0))" -v b="$(awk -v a="$b1" -v b="$b0" 'BEGIN{print a-b}')" \
        -v c="$(awk -v a="$c1" -v b="$c0" 'BEGIN{print a-b}')" \
        -v d="$(awk -v a="$d1" -v b="$d0" 'BEGIN{print a-b}')" \
        -v wall="$(awk -v a="$t1" -v b="$t0" 'BEGIN{print a-b}')" -v shape="$shape" '
        BEGIN {
            split(line, f, " "); ok = 0
            for (k in f) if (f[k] ~ /^ok=/) { sub(/^ok=/, "", f[k]); ok = f[k] }
            us = 1e6 / tck
            printf "   CPU per issuance: replicas %.0f µs, PostgreSQL %.0f µs, loadgen %.0f µs (%d issuances, %.1f s wall incl. connecting)\n",
                rep * us / ok, pg * us / ok, lg, ok, wall
            printf "   PostgreSQL: %.0f commits/s, %.2f issuances per commit, %.0f WAL bytes per issuance\n",
                x / wall, ok / (x > 0 ? x : 1), w / ok
            printf "   ledger: %d batches, mean %.1f ops per batch, mean %.2f ms inside a write transaction; Σ of those %.0f%% of the wall clock\n",
                c, b / (c > 0 ? c : 1), 1000 * d / (c > 0 ? c : 1), 100 * d / wall
            split(shape, sh, " ")
            printf "   audit entries: mean body %d bytes, %.2f Merkle rows per entry\n", sh[1], sh[2]
        }'
    summary+=("$n $round $line")
}

echo "== runs: counts [$counts], $rounds round(s), $clients clients, $seconds s, mode $mode"
for ((round = 1; round <= rounds; round++)); do
    for n in $counts; do
        run_one "$n" "$round"
    done
done

echo "== summary (replicas, round, loadgen)"
printf '%s\n' "${summary[@]}"

[[ -n $probe ]] || exit 0
first=$(awk '{ print "bench_r1_n" $1; exit }' <<<"$counts")
psql_q postgres "CREATE DATABASE probe TEMPLATE $first"
cat >"$work/batch.sql" <<'SQL'
BEGIN;
SELECT pg_advisory_xact_lock(5999441513992897874);
SELECT seq AS base FROM audit_log ORDER BY seq DESC LIMIT 1 \gset
INSERT INTO leases (id, profile, spiffe_id, scopes, audience, state, issued_at,
                    expires_at, max_expires_at, credential_sha256, intent)
SELECT 'probe-' || (:base + g), 'gpu-scheduler-submit', 'spiffe://example.org/ci/deploy-agent',
       '["job:submit"]', 'gpu-scheduler', 'active', 1800000000, 1800000600, 1800003600,
       encode(sha256(g::text::bytea), 'hex'),
       '{"action":"submit-training","target":"queue/a100"}'
FROM generate_series(1, :b) AS g;
INSERT INTO audit_log (seq, time_ms, kind, caller, lease_id, body, prev_hash, hash)
SELECT :base + g, 1800000000000, 'issue', 'spiffe://example.org/ci/deploy-agent',
       'probe-' || (:base + g), (SELECT body FROM audit_log WHERE seq = :base),
       sha256(g::text::bytea), sha256((g + 1)::text::bytea)
FROM generate_series(1, :b) AS g;
INSERT INTO merkle_nodes (level, idx, hash)
SELECT l, (:base + g) * 2 + l, sha256((g * 2 + l)::text::bytea)
FROM generate_series(1, :b) AS g, (VALUES (0), (1)) AS v(l);
COMMIT;
SQL
probe_s=${PROBE_SECONDS:-10}
echo "== probe: batched sequencing in PostgreSQL alone (pgbench, $probe_s s each)"
for b in 16 64 256; do
    for c in 1 4; do
        res=$(pgbench -n -h 127.0.0.1 -p "$pg_port" -U postgres -f "$work/batch.sql" \
            -D b="$b" -c "$c" -j 1 -T "$probe_s" probe 2>&1)
        lat=$(sed -n 's/^latency average = \([0-9.]*\) ms$/\1/p' <<<"$res")
        tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' <<<"$res")
        [[ -n $tps ]] || {
            echo "$res" >&2
            exit 1
        }
        awk -v b="$b" -v c="$c" -v lat="$lat" -v tps="$tps" 'BEGIN {
            printf "   B=%d, %d client(s): %.0f batches/s = %.0f issuances/s; %.2f ms per batch (lock held ~%.2f ms)\n",
                b, c, tps, tps * b, lat, 1000 / tps
        }'
    done
done
