#!/usr/bin/env bash
# Where llmproxy's CPU goes under load, the way the second session found its levers:
# builds llmproxy with frame pointers (own target dir, so the normal build is kept),
# starts the prerendered mock and the receiver on core 1 and llmproxy on core 0 (as
# benches/load.py does), drives it with wrk from core 1, records the worker thread with
# perf, then prints each thread's CPU per request and the worker's top symbols.
#   benches/profile.sh [json|sse] [seconds, default 8]
# METER=off runs without usage metering's webhook (the relay alone, to compare);
# BIN=path profiles that llmproxy binary (an A/B against another build);
# COUNT=1 counts CPU time, io_uring operations, poll arms, syscalls and context switches
# per request (perf stat tracepoints) instead of sampling; EVENTS=a,b adds perf events to it;
# ALLOC=1 counts the worker's heap allocations per request (uprobes on glibc's malloc,
# calloc, realloc and posix_memalign: Rust's over-aligned boxes) and where they come from;
# SCHED=1 records the scheduler on core 0 and prints each thread's wake-up delays
# (from being woken to running: what a request waits for its worker);
# RATE=n drives it with oha at n requests/s instead of wrk flat out (needs oha);
# BILLING_CPU=n moves the billing threads to core n; WHOLE=1 records every thread rather than the worker;
# THREAD=name records (or counts) that thread instead (e.g. usage-sender); KEEP=file keeps perf.data;
# FREQ=n samples at n Hz (default 4999; more for a thread that runs little).
# Needs perf (Debian: linux-perf) and wrk. Everything listens on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/proxy-config.sh
KIND=${1:-json}
SECS=${2:-8}
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)"; exit 1; }
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)"; exit 1; }
FP=target/profile
BIN=${BIN:-$FP/release/llmproxy}
[ "$BIN" = "$FP/release/llmproxy" ] &&
    CARGO_TARGET_DIR=$FP RUSTFLAGS="-C force-frame-pointers=yes" cargo build --release --bin llmproxy 2>&1 | tail -n 1
cargo build --release --example mock_vllm --example webhook_receiver 2>&1 | tail -n 1
W=$(mktemp -d /tmp/llmproxy-profile-XXXX)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK=$(port); HOOK=$(port); PROXY=$(port)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] && cp "$W/perf.data" "$KEEP"; rm -rf "$W"; }
trap cleanup EXIT
taskset -c 1 target/release/examples/mock_vllm --port "$MOCK" --prerender --tokens 64 --models mock-model >"$W/mock.log" 2>&1 &
pids+=($!)
taskset -c 1 target/release/examples/webhook_receiver --port "$HOOK" --quiet --log none --no-store >"$W/hook.log" 2>&1 &
pids+=($!)
RECV=$!
MOCKP=${pids[0]}
proxy_config "$W/p.yaml" "$PROXY" "$MOCK" "$HOOK" "$W/spool"
sleep 0.5
taskset -c 0 "$BIN" --config "$W/p.yaml" >"$W/proxy.log" 2>&1 &
P=$!
pids+=($P)
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PROXY/health" >/dev/null && break; sleep 0.1; done
stream=$([ "$KIND" = sse ] && echo ',"stream":true' || true)
cat >"$W/req.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"mock-model","messages":[{"role":"user","content":"one two three four five"}],"max_tokens":64$stream}'
EOF
if [ -n "${BILLING_CPU:-}" ]; then
    for t in /proc/$P/task/*; do
        case "$(cat "$t/comm")" in usage-*) taskset -pc "$BILLING_CPU" "$(basename "$t")" >/dev/null ;; esac
    done
fi
worker=$(for t in /proc/$P/task/*; do [ "$(cat "$t/comm")" = "${THREAD:-worker-0}" ] && basename "$t"; done; true)
snap() {
    for t in /proc/$P/task/*; do
        echo "$(cat "$t/comm") $(awk '{print $14+$15}' "$t/stat") $(awk '/ctxt_switches/ {s += $2} END {print s}' "$t/status")"
    done | sort
}
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rb=$(ticks "$RECV"); mb=$(ticks "$MOCKP")
before=$(snap)
if [ -n "${RATE:-}" ]; then
    body=$(sed -n "s/^wrk.body = '\(.*\)'$/\1/p" "$W/req.lua")
    taskset -c 1 oha --no-tui -z "$((SECS + 2))s" -c 64 -q "$RATE" -m POST -H "Content-Type: application/json" \
        -d "$body" "http://127.0.0.1:$PROXY/v1/chat/completions" >"$W/oha.out" 2>&1 &
else
    taskset -c 1 wrk -t1 -c64 -d"$((SECS + 2))s" -s "$W/req.lua" "http://127.0.0.1:$PROXY/v1/chat/completions" >"$W/wrk.out" &
fi
sleep 1
if [ -n "${WHOLE:-}" ]; then who=(-p "$P"); else who=(-t "$worker"); fi
reqs() { curl -s "http://127.0.0.1:$PROXY/metrics" | awk '/^llmproxy_requests_total/ { n += $2 } END { print n + 0 }'; }
if [ -n "${SCHED:-}" ]; then
    perf sched record -q -C 0 -o "$W/perf.data" -- sleep "$SECS" >/dev/null 2>&1
elif [ -n "${ALLOC:-}" ]; then
    ev=()
    libc=$(ldd "$BIN" | awk '/libc\.so/ { print $3 }')
    for f in malloc calloc realloc posix_memalign; do
        perf probe -q -x "$libc" "$f" 2>/dev/null || true
        ev+=(-e "probe_libc:$f")
    done
    r0=$(reqs)
    perf record -q "${ev[@]}" --call-graph fp "${who[@]}" -o "$W/perf.data" -- sleep "$SECS" 2>/dev/null
    r1=$(reqs)
elif [ -n "${COUNT:-}" ]; then
    r0=$(reqs)
    perf stat -x, -o "$W/stat.txt" -e task-clock,io_uring:io_uring_submit_req,io_uring:io_uring_poll_arm,io_uring:io_uring_task_add,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom${EVENTS:+,$EVENTS},context-switches \
        "${who[@]}" -- sleep "$SECS" 2>/dev/null
    r1=$(reqs)
else
    perf record -q -F "${FREQ:-4999}" -e cpu-clock --call-graph fp "${who[@]}" -o "$W/perf.data" -- sleep "$SECS" 2>/dev/null
fi
wait %4 2>/dev/null || sleep 2
sleep 2 # let the billing threads finish the run's records
after=$(snap)
ra=$(ticks "$RECV"); ma=$(ticks "$MOCKP")
if [ -n "${RATE:-}" ]; then
    n=$(awk '/\[200\] [0-9]+ responses/ {print $2}' "$W/oha.out")
    grep "Requests/sec" "$W/oha.out" | head -1
else
    n=$(grep -oP '\d+(?= requests in)' "$W/wrk.out")
    grep "Requests/sec" "$W/wrk.out"
fi
curl -s "http://127.0.0.1:$PROXY/metrics" | awk '/^llmproxy_proxy_overhead_ms_bucket/ { split($1, q, "\""); b[++n] = q[2]; c[n] = $NF } END { printf "time in the proxy (llmproxy_proxy_overhead_ms), share of requests within:"; for (i = 1; i <= 5 && i <= n; i++) printf " %s ms %.2f%%", b[i], 100 * c[i] / c[n]; printf "\n" }'
echo "CPU per request by thread (incl. the billing work the run caused):"
join <(echo "$before") <(echo "$after") | awk -v n="$n" -v hz="$(getconf CLK_TCK)" \
    '{ us = ($4 - $2) / hz * 1e6 / n; if (us > 0.005) printf "  %-14s %6.2f us  %7.4f context switches\n", $1, us, ($5 - $3) / n }'
awk -v n="$n" -v hz="$(getconf CLK_TCK)" -v r=$((ra - rb)) -v m=$((ma - mb)) \
    'BEGIN { printf "on core 1: mock %.2f us, webhook receiver %.2f us per request\n", m / hz * 1e6 / n, r / hz * 1e6 / n }'
if [ -n "${COUNT:-}" ]; then
    echo "per request, $([ -n "${WHOLE:-}" ] && echo "whole process" || echo "worker thread") ($((r1 - r0)) requests):"
    awk -F, -v n=$((r1 - r0)) '!/^#/ && NF > 2 && n > 0 { if ($3 == "task-clock") printf "  %-40s %8.3f us (precise, from the scheduler)\n", "CPU time", $1 * 1000 / n; else printf "  %-40s %8.4f\n", $3, $1 / n }' "$W/stat.txt"
    exit 0
fi
if [ -n "${SCHED:-}" ]; then
    echo "wake-up delays on core 0 (perf sched latency):"
    perf sched latency -i "$W/perf.data" --sort max 2>/dev/null | grep -E "Task|worker|usage|nginx" | head -8
    perf sched timehist -i "$W/perf.data" 2>/dev/null | awk '$3 ~ /^worker-0/ { print $5 * 1000 }' | sort -n |
        awk '{ d[NR] = $1; s += $1; if ($1 > 20) o++ } END { if (NR) printf "worker-0: %d runs, delay from wake-up to running: mean %.1f us, p99 %.0f us, max %.0f us, %.2f %% over 20 us\n", NR, s / NR, d[int(NR * 0.99)], d[NR], 100 * o / NR }'
    exit 0
fi
if [ -n "${ALLOC:-}" ]; then
    calls=$(perf script -i "$W/perf.data" -F event 2>/dev/null | grep -c probe_libc || true)
    awk -v c="${calls:-0}" -v n=$((r1 - r0)) 'BEGIN { printf "%d requests, %.2f allocations per request; callers:\n", n, c / n }'
    perf report -i "$W/perf.data" --no-children --sort sym -g caller,0.5,callee,function,percent --percent-limit 1 2>/dev/null |
        grep -v '^#' | grep -v '^$' | grep -E "llmproxy::|%" | head -60
    exit 0
fi
echo "worker thread, top symbols (self):"
perf report -i "$W/perf.data" --no-children --sort dso,sym -g none --percent-limit 0.7 2>/dev/null |
    grep -v '^#' | grep -v '^$' | head -40
