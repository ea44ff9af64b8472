#!/usr/bin/env bash
# The billing drill: sustained load through llmproxy while the webhook receiver is
# down for 30 s and the proxy itself is restarted in the middle of the outage. At the
# end, every request that got a 200 must have exactly one record at the receiver
# (duplicates only where at-least-once allows), and /metrics accounts for the paths.
#   scripts/outage-drill.sh [seconds of load, default 50]
set -euo pipefail
cd "$(dirname "$0")/.."
LOAD_SECONDS=${1:-50}
cargo build --release --bin llmproxy --example mock_vllm --example webhook_receiver --example loadgen 2>&1 | tail -n 1
BIN=target/release
W=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; kill "${proxy:-}" "${receiver:-}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK=$(port); HOOK=$(port); PROXY=$(port)
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened"; exit 1; }

cat >"$W/config.yaml" <<YAML
listen: "127.0.0.1:$PROXY"
backends:
  - url: "http://127.0.0.1:$MOCK"
usage_hook:
  enabled: true
  url: "http://127.0.0.1:$HOOK/llm-usage"
  timeout: 500ms
  retry: 1
  spool_dir: "$W/spool"
YAML

"$BIN/examples/mock_vllm" --port "$MOCK" --token-delay-ms 2 >"$W/mock.log" 2>&1 & pids+=($!)
start_receiver() { "$BIN/examples/webhook_receiver" --port "$HOOK" --quiet --log "$W/usage_log.jsonl" --raw-log "$W/raw.jsonl" >>"$W/receiver.log" 2>&1 & receiver=$!; wait_port "$HOOK"; }
start_proxy() { "$BIN/llmproxy" --config "$W/config.yaml" >>"$W/proxy.log" 2>&1 & proxy=$!; wait_port "$PROXY"; }
metrics() { curl -s "127.0.0.1:$PROXY/metrics" | grep -E '^llmproxy_(webhook|usage)_' || true; }
wait_port "$MOCK"
start_receiver
start_proxy

echo "==> load for ${LOAD_SECONDS}s; receiver down from t=5s to t=35s; proxy restarted at t=20s"
"$BIN/examples/loadgen" --addr "127.0.0.1:$PROXY" --seconds "$LOAD_SECONDS" --concurrency 8 --ids-out "$W/ids.txt" >"$W/loadgen.log" 2>&1 & load=$!
sleep 5;  kill "$receiver"; wait "$receiver" 2>/dev/null || true; echo "t=5s   receiver down"
sleep 14; echo "t=19s  metrics before the restart:"; metrics | sed 's/^/         /'
sleep 1;  kill -TERM "$proxy"; wait "$proxy" 2>/dev/null || true; start_proxy; echo "t=20s  proxy restarted (SIGTERM, then a new process on the same spool)"
sleep 15; start_receiver; echo "t=35s  receiver back"
wait "$load"; cat "$W/loadgen.log"

sent=$(grep -c . "$W/ids.txt" || true)
for _ in $(seq 1 120); do
    got=$(sort -u "$W/usage_log.jsonl" | grep -c . || true)
    [ "$got" -ge "$sent" ] && break
    sleep 1
done
python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
sent = set(l.strip() for l in open(f"{w}/ids.txt") if l.strip())
# The loadgen sends its own X-Request-Id: the records keep it as client_request_id.
raw = [json.loads(l)["client_request_id"] for l in open(f"{w}/raw.jsonl")]
got = set(raw)
missing = sent - got
print(f"==> requests answered 200: {len(sent)}; records received: {len(got)} unique, {len(raw) - len(got)} duplicate POSTs; missing: {len(missing)}")
if missing:
    print("MISSING:", sorted(missing)[:20]); sys.exit(1)
PY
echo "==> /metrics of the second proxy:"
metrics
echo "==> drill passed: every answered request reached billing"
