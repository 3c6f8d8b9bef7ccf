#!/usr/bin/env bash
# Coverage-guided fuzzing of every target for a bounded time, on the stable toolchain.
#
#   fuzz/run.sh [SECONDS] [TARGET...]     (default: 30 seconds, every target)
#
# Installs cargo-fuzz if missing, builds the targets with libFuzzer + AddressSanitizer
# (stable rustc accepts cargo-fuzz's nightly-only flags under RUSTC_BOOTSTRAP=1; without
# the ASan runtime in the toolchain it falls back to --sanitizer none; FUZZ_SANITIZER
# overrides), then runs each target for SECONDS on a scratch copy of its repo corpus
# (fuzz/corpus/ is never modified), one target per core at a time (FUZZ_JOBS).
# Prints executions and exec/s per target. Exits 1 if
# any target crashed, hung (-timeout) or ran out of memory, printing the input's path
# (kept under fuzz/artifacts/<target>/); see fuzz/README.md to turn it into a
# regression test. FUZZ_TARGET_DIR puts the build elsewhere than fuzz/target (a cold
# build takes minutes: keep it outside a throwaway checkout to reuse it).
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TERM_COLOR=never

secs=${1:-30}
shift || true
if ! [[ $secs =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "usage: fuzz/run.sh [SECONDS] [TARGET...]" >&2
    exit 2
fi
if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for f in fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi

# The stable toolchain explicitly when rustup manages toolchains (CI has no nightly).
tc=()
if command -v rustup >/dev/null 2>&1; then
    tc=(+stable)
fi
cargo=(cargo "${tc[@]}")
# cargo-fuzz passes -Zsanitizer=… to rustc; RUSTC_BOOTSTRAP=1 lets stable accept it.
export RUSTC_BOOTSTRAP=1

started=$(date +%s)
if ! "${cargo[@]}" fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    "${cargo[@]}" install cargo-fuzz --locked
fi

host=$(rustc "${tc[@]}" -vV | sed -n 's/^host: //p')
sysroot=$(rustc "${tc[@]}" --print sysroot)
sanitizer=${FUZZ_SANITIZER:-}
if [ -z "$sanitizer" ]; then
    if ls "$sysroot/lib/rustlib/$host/lib/"librustc-*_rt.asan.a >/dev/null 2>&1; then
        sanitizer=address
    else
        echo "== no ASan runtime in $sysroot: building without a sanitizer"
        sanitizer=none
    fi
fi

echo "== cargo fuzz build (sanitizer: $sanitizer, $(rustc "${tc[@]}" --version), RUSTC_BOOTSTRAP=1)"
build_started=$(date +%s)
# FUZZ_TARGET_DIR: a build directory kept outside the checkout (e.g. across CI clones).
target_dir=()
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then
    target_dir=(--target-dir "$FUZZ_TARGET_DIR")
fi
"${cargo[@]}" fuzz build --sanitizer "$sanitizer" "${target_dir[@]}"
build_secs=$(( $(date +%s) - build_started ))
bin_dir="${FUZZ_TARGET_DIR:-target}/$host/release"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
    if [ ! -x "$bin_dir/$t" ]; then
        echo "unknown target $t (no $bin_dir/$t)" >&2
        exit 2
    fi
done

# One target per core at a time (FUZZ_JOBS overrides): each is a single-threaded
# libFuzzer process, so on 2 cores six 30-s targets take 90 s, not 180 s.
jobs=${FUZZ_JOBS:-$(nproc)}
run_target() {
    local t=$1 corpus="$scratch/corpus/$1" rc=0
    mkdir -p "$corpus" "artifacts/$t"
    if [ -d "corpus/$t" ]; then
        cp -R "corpus/$t/." "$corpus/"
    fi
    "$bin_dir/$t" "$corpus" \
        -max_total_time="$secs" \
        -timeout=10 \
        -rss_limit_mb=2048 \
        -print_final_stats=1 \
        -artifact_prefix="$PWD/artifacts/$t/" \
        >"$scratch/$t.log" 2>&1 || rc=$?
    echo "$rc" >"$scratch/$t.rc"
}
echo "== running ${#targets[@]} target(s), ${secs}s each, $jobs at a time"
for t in "${targets[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
        wait -n || true
    done
    run_target "$t" &
done
wait

failed=()
summary=()
for t in "${targets[@]}"; do
    log="$scratch/$t.log"
    rc=$(cat "$scratch/$t.rc" 2>/dev/null || echo 1)
    echo "== $t: ${secs}s"
    # The final stats line: `#N DONE cov: C ft: F corp: K/S exec/s: E rss: R`.
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
    execs=$(sed -nE 's/^#([0-9]+)[[:space:]]+DONE.*/\1/p' <<<"$done_line")
    rate=$(sed -nE 's/.* exec\/s: ([0-9]+).*/\1/p' <<<"$done_line")
    # No DONE line (a crash ends the run early): -print_final_stats still has the counts.
    execs=${execs:-$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)}
    rate=${rate:-$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)}
    cov=$(sed -nE 's/.* cov: ([0-9]+) .*/\1/p' <<<"$done_line")
    corp=$(sed -nE 's/.* corp: ([0-9]+)\/.*/\1/p' <<<"$done_line")
    artifact=$(sed -nE 's/.*Test unit written to (.*)$/\1/p' "$log" | tail -1)
    if [ "$rc" -ne 0 ] || [ -n "$artifact" ]; then
        echo "!! $t FAILED (exit $rc); libFuzzer's output ends:"
        grep -vE '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse|INITED)' "$log" | tail -40
        echo "!! $t: input kept at ${artifact:-<none written>}"
        echo "!! reproduce: RUSTC_BOOTSTRAP=1 cargo +stable fuzz run --sanitizer $sanitizer $t ${artifact:-}"
        failed+=("$t: ${artifact:-exit $rc}")
        summary+=("$(printf '%-14s %12s %9s %6s %6s  %s' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${corp:-?}" FAILED)")
    else
        echo "$done_line"
        summary+=("$(printf '%-14s %12s %9s %6s %6s  %s' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${corp:-?}" ok)")
    fi
done

echo
echo "== fuzz summary: ${secs}s per target, build ${build_secs}s, total $(( $(date +%s) - started ))s"
printf '%-14s %12s %9s %6s %6s  %s\n' target executions exec/s cov corpus result
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo
    echo "${#failed[@]} target(s) failed; inputs under fuzz/artifacts/ (see fuzz/README.md):"
    printf '  %s\n' "${failed[@]}"
    exit 1
fi
