#!/usr/bin/env bash
# Instructions per request under callgrind: a measure this noisy shared machine does not
# move (wall-clock A/Bs do, by +-30 % between identical runs), for changes too small for
# benches/load.sh to see. Runs each given llmproxy binary (one worker, billing on) under
# callgrind behind the prerendered mock, sends 200 warm-up requests, then N keep-alive
# requests (oha, 4 connections), and prints the instructions per request of the busiest
# thread (the worker) and of all the others (the delivery threads).
#   benches/callgrind.sh [json|sse|churn] [requests, default 1200] BIN [BIN...]
# (churn: JSON requests, a new connection for each)
# METER=off runs with usage_hook.enabled: false (billing's share, by difference);
# KEEP=dir keeps each worker's profile there, for callgrind_annotate (the other threads'
# as .threadNN files). Needs valgrind and oha. Everything listens on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/proxy-config.sh
KIND=${1:-json}
N=${2:-1200}
shift 2 || true
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)"; exit 1; }
command -v oha >/dev/null || { echo "oha is not installed (cargo install oha)"; exit 1; }
cargo build --release --example mock_vllm --example webhook_receiver 2>&1 | tail -n 1
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
stream=$([ "$KIND" = sse ] && echo ',"stream":true' || true)
body='{"model":"mock-model","messages":[{"role":"user","content":"one two three four five"}],"max_tokens":64'$stream'}'
for BIN in "$@"; do
    W=$(mktemp -d /tmp/llmproxy-callgrind-XXXX)
    MOCK=$(port); HOOK=$(port); PROXY=$(port)
    target/release/examples/mock_vllm --port "$MOCK" --prerender --tokens 64 --models mock-model >/dev/null 2>&1 &
    pids=($!)
    target/release/examples/webhook_receiver --port "$HOOK" --quiet --log none --no-store >/dev/null 2>&1 &
    pids+=($!)
    proxy_config "$W/p.yaml" "$PROXY" "$MOCK" "$HOOK" "$W/spool"
    valgrind --tool=callgrind --callgrind-out-file="$W/cg.%p" --separate-threads=yes "$BIN" --config "$W/p.yaml" >/dev/null 2>&1 &
    P=$!
    pids+=($P)
    for _ in $(seq 150); do curl -sf "http://127.0.0.1:$PROXY/health" >/dev/null && break; sleep 0.2; done
    run() { oha --no-tui -n "$1" -c 4 $([ "$KIND" = churn ] && echo --disable-keepalive) -m POST -H 'Content-Type: application/json' -d "$body" "http://127.0.0.1:$PROXY/v1/chat/completions" >/dev/null 2>&1; }
    run 200
    callgrind_control -d "$P" >/dev/null 2>&1
    sleep 1
    run "$N"
    sleep 1 # the delivery threads' share of these requests
    callgrind_control -d "$P" >/dev/null 2>&1
    sleep 1
    # The second dump of each thread (files cg.PID.2-TT) covers the N requests.
    awk -v n="$N" -v bin="$BIN" '/^summary:/ { t[FILENAME] = $2 } END {
        for (f in t) { if (t[f] > max) max = t[f]; sum += t[f] }
        printf "%s: worker %.0f, other threads %.0f instructions per request\n", bin, max / n, (sum - max) / n }' "$W"/cg."$P".2-*
    if [ -n "${KEEP:-}" ]; then # KEEP=dir keeps the worker's profile (callgrind_annotate), and the others'
        mkdir -p "$KEEP"
        busiest=$(awk '/^summary:/ { if ($2 > max) { max = $2; f = FILENAME } } END { print f }' "$W"/cg."$P".2-*)
        cp "$busiest" "$KEEP/$(basename "$BIN").$KIND.callgrind"
        for f in "$W"/cg."$P".2-*; do
            [ "$f" = "$busiest" ] || cp "$f" "$KEEP/$(basename "$BIN").$KIND.thread${f##*-}.callgrind"
        done
    fi
    kill -9 "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$W"
done
