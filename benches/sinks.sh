#!/usr/bin/env bash
# Records per second through each usage sink (webhook and RabbitMQ with publisher
# confirms), as the rate a spooled backlog drains at: see benches/sinks.py.
#   benches/sinks.sh [records, default 20000]
# Installs oha (crates.io) and rabbitmq-server (Debian) if missing. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v oha >/dev/null || cargo install oha --locked
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
fi
cargo build --release --bin llmproxy --example mock_vllm --example webhook_receiver 2>&1 | tail -n 1
python3 benches/sinks.py "${1:-20000}"
