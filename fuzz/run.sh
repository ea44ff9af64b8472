#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 600 s each), two at a time.
#   fuzz/run.sh [seconds per target]
# Needs cargo-fuzz (`cargo install cargo-fuzz`). The toolchain here is stable: the
# sanitizer flags cargo-fuzz passes are enabled with RUSTC_BOOTSTRAP=1.
# Seeds and past crashes live in fuzz/corpus/<target> (committed, only read); what a run
# discovers goes to fuzz/work/<target> (not committed); crashes land in
# fuzz/artifacts/<target> and fail the run.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-600}
# address (default) for the long runs; CI uses none to build and run faster.
SAN=${FUZZ_SANITIZER:-address}
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=(request_head chunked sse usage rewrite multipart)
cargo fuzz build -O --sanitizer "$SAN" 2>&1 | tail -n 2
run() {
    # New inputs go to fuzz/work (not tracked); the committed corpus is only read.
    mkdir -p "fuzz/work/$1" "fuzz/corpus/$1"
    # A target's dictionary (fuzz/<target>.dict), where it has one.
    local dict=()
    [ -f "fuzz/$1.dict" ] && dict=("-dict=fuzz/$1.dict")
    cargo fuzz run -O --sanitizer "$SAN" "$1" "fuzz/work/$1" "fuzz/corpus/$1" -- -max_total_time="$SECS" -rss_limit_mb=2048 -print_final_stats=1 "${dict[@]}" \
        > "fuzz/$1.log" 2>&1 || { echo "fuzz target $1 FAILED:"; tail -n 40 "fuzz/$1.log"; return 1; }
    echo "$1: $(grep -E 'stat::number_of_executed_units' "fuzz/$1.log" | awk '{print $2}') runs in ${SECS}s, no crash"
}
status=0
for ((i = 0; i < ${#targets[@]}; i += 2)); do
    pids=()
    for t in "${targets[@]:i:2}"; do run "$t" & pids+=($!); done
    for p in "${pids[@]}"; do wait "$p" || status=1; done
done
exit $status
