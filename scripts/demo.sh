#!/usr/bin/env bash
# The whole pipeline on this machine: builds, starts a mock vLLM (:8000), the example
# webhook receiver (:9000) and llmproxy (:8080) with ./config.yaml, sends a streaming
# and a non-streaming request through the proxy, and shows the usage records that
# arrived. Everything stops when the script ends.
#   scripts/demo.sh --rabbitmq   records go to a local RabbitMQ (installed from Debian if
#                                missing, on 127.0.0.1:5673 with its own temp dir) and
#                                examples/amqp_consumer.py prints them
set -euo pipefail
cd "$(dirname "$0")/.."
RABBIT=0
[ "${1:-}" = "--rabbitmq" ] && RABBIT=1

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
CONFIG=config.yaml
if [ "$RABBIT" = 1 ]; then
    if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
        echo "==> installing rabbitmq-server (Debian)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
    fi
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -c "import pika" 2>/dev/null || .venv/bin/pip install --quiet pika
    R=$LOGS/rabbit; mkdir -p "$R"
    printf 'listeners.tcp.1 = 127.0.0.1:5673\nloopback_users = none\n' >"$R/rabbitmq.conf"
    echo "[]." >"$R/enabled_plugins"
    HOME=$R RABBITMQ_NODENAME=llmproxy-demo@localhost RABBITMQ_NODE_PORT=5673 RABBITMQ_DIST_PORT=25673 \
        ERL_EPMD_PORT=4370 ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_MNESIA_BASE=$R/mnesia RABBITMQ_LOG_BASE=$R/log \
        RABBITMQ_CONFIG_FILE=$R/rabbitmq.conf RABBITMQ_ENABLED_PLUGINS_FILE=$R/enabled_plugins \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        /usr/lib/rabbitmq/bin/rabbitmq-server >"$LOGS/rabbit.log" 2>&1 &
    pids+=($!)
    # epmd refuses -kill while the node is still registered: try for a few seconds.
    trap 'cleanup; for _ in $(seq 1 50); do ERL_EPMD_PORT=4370 epmd -kill 2>/dev/null | grep -q Killed && break; ERL_EPMD_PORT=4370 epmd -names >/dev/null 2>&1 || break; sleep 0.1; done' EXIT
    for _ in $(seq 1 60); do (exec 3<>/dev/tcp/127.0.0.1/5673) 2>/dev/null && break; sleep 0.5; done
    wait_port 127.0.0.1:5673 rabbit
    CONFIG=$LOGS/config-rabbitmq.yaml
    sed 's#^  url: .*#  url: "amqp://guest:guest@127.0.0.1:5673/%2f"#' config.yaml >"$CONFIG"
fi
"$BIN/llmproxy" --config "$CONFIG" >"$LOGS/proxy.log" 2>&1 &
pids+=($!)
wait_port 127.0.0.1:8080 proxy
echo "==> mock vLLM on :8000, webhook receiver on :9000, llmproxy on :8080"

LLMPROXY_URL=http://127.0.0.1:8080 LLMPROXY_KEY=sk-demo-alice-0123456789 \
    MODEL=meta-llama/Llama-3.1-8B-Instruct examples/test-request.sh

sleep 0.5
echo
if [ "$RABBIT" = 1 ]; then
    echo "==> usage records in RabbitMQ (queue llmproxy.usage), read by examples/amqp_consumer.py:"
    .venv/bin/python examples/amqp_consumer.py --url amqp://guest:guest@127.0.0.1:5673/%2f --jsonl --timeout 3
else
    echo "==> usage records received by the webhook (usage_log.jsonl):"
    if command -v jq >/dev/null; then jq -c . usage_log.jsonl; else cat usage_log.jsonl; fi
fi
echo
echo "==> llmproxy log:"
cat "$LOGS/proxy.log"
