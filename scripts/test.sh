#!/usr/bin/env bash
# Runs every test: unit and property tests, and the end-to-end tests that start the
# real proxy, the mock vLLM and the webhook receiver on loopback (plus the official
# openai Python SDK against the proxy). Sets up what it needs on first run.
set -euo pipefail
cd "$(dirname "$0")/.."

# The openai and anthropic SDKs (tests/sdk_client.py and tests/sdk_anthropic.py drive
# them), prometheus_client (its parser checks /metrics), standardwebhooks (the
# reference library verifies the webhook signatures) and pika (the RabbitMQ consumer,
# examples/amqp_consumer.py), in a private virtualenv.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import openai, anthropic, prometheus_client, standardwebhooks, pika" 2>/dev/null; then
    echo "==> setting up .venv with the openai and anthropic SDKs"
    if ! python3 -m venv .venv 2>/dev/null; then
        if command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        fi
        python3 -m venv .venv
    fi
    .venv/bin/pip install --quiet --disable-pip-version-check "openai>=1.40" "anthropic>=0.40" prometheus_client standardwebhooks pika
fi
export LLMPROXY_TEST_PYTHON="$PWD/.venv/bin/python"

# A real RabbitMQ for the AMQP sink's tests (tests/e2e/amqp.rs starts its own brokers
# on free loopback ports); Debian's package, installed once. The service it would
# start is not used.
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && command -v apt-get >/dev/null; then
    echo "==> installing rabbitmq-server"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
fi
if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    export LLMPROXY_REQUIRE_RABBITMQ=1
fi

# A real Redis for the shared limits' tests (tests/e2e/cluster.rs starts its own
# servers on free loopback ports, without persistence); Debian's package, installed
# once. The service it would start is not used.
if [ ! -x /usr/bin/redis-server ] && command -v apt-get >/dev/null; then
    echo "==> installing redis-server"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
if [ -x /usr/bin/redis-server ]; then
    export LLMPROXY_REQUIRE_REDIS=1
fi

# nginx (Debian's) as a TLS backend for tests/e2e/tls.rs, started by the test on a
# free loopback port with its own prefix; the service the package starts is not used.
if [ ! -x /usr/sbin/nginx ] && command -v apt-get >/dev/null; then
    echo "==> installing nginx-light"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
fi
if [ -x /usr/sbin/nginx ]; then
    export LLMPROXY_REQUIRE_NGINX=1
fi

# The end-to-end tests start the example binaries (mock vLLM, webhook receiver).
echo "==> cargo build --examples"
cargo build --examples
echo "==> cargo test"
cargo test "$@"
