#!/usr/bin/env bash
# The whole pipeline on this machine: builds, starts a mock vLLM (:8000), the example
# webhook receiver (:9000) and llmproxy (:8080) with ./config.yaml, sends a streaming
# and a non-streaming request through the proxy, and shows the usage records that
# arrived. Everything stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> building (release; the first build takes about 2 minutes on 2 cores)"
cargo build --release --bin llmproxy --example mock_vllm --example webhook_receiver
BIN=target/release
LOGS=$(mktemp -d)
rm -f usage_log.jsonl
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_port() { # host:port name
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "$2 did not start; its log:"; cat "$LOGS/$2.log"; exit 1
}

"$BIN/examples/mock_vllm" --port 8000 --models meta-llama/Llama-3.1-8B-Instruct --token-delay-ms 30 --prefill-ms 120 >"$LOGS/mock.log" 2>&1 &
pids+=($!)
"$BIN/examples/webhook_receiver" --port 9000 --log usage_log.jsonl >"$LOGS/receiver.log" 2>&1 &
pids+=($!)
wait_port 127.0.0.1:8000 mock
wait_port 127.0.0.1:9000 receiver
"$BIN/llmproxy" --config config.yaml >"$LOGS/proxy.log" 2>&1 &
pids+=($!)
wait_port 127.0.0.1:8080 proxy
echo "==> mock vLLM on :8000, webhook receiver on :9000, llmproxy on :8080"

LLMPROXY_URL=http://127.0.0.1:8080 LLMPROXY_KEY=sk-demo-alice-0123456789 \
    MODEL=meta-llama/Llama-3.1-8B-Instruct examples/test-request.sh

sleep 0.5
echo
echo "==> usage records received by the webhook (usage_log.jsonl):"
if command -v jq >/dev/null; then jq -c . usage_log.jsonl; else cat usage_log.jsonl; fi
echo
echo "==> llmproxy log:"
cat "$LOGS/proxy.log"
