#!/usr/bin/env bash
# Runs every test: unit and property tests, and the end-to-end tests that start the
# real proxy, the mock vLLM and the webhook receiver on loopback (plus the official
# openai Python SDK against the proxy). Sets up what it needs on first run.
set -euo pipefail
cd "$(dirname "$0")/.."

# The openai and anthropic SDKs (tests/sdk_client.py and tests/sdk_anthropic.py drive
# them), prometheus_client (its parser checks /metrics) and standardwebhooks (the
# reference library verifies the webhook signatures), in a private virtualenv.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import openai, anthropic, prometheus_client, standardwebhooks" 2>/dev/null; then
    echo "==> setting up .venv with the openai and anthropic SDKs"
    if ! python3 -m venv .venv 2>/dev/null; then
        if command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        fi
        python3 -m venv .venv
    fi
    .venv/bin/pip install --quiet --disable-pip-version-check "openai>=1.40" "anthropic>=0.40" prometheus_client standardwebhooks
fi
export LLMPROXY_TEST_PYTHON="$PWD/.venv/bin/python"

# The end-to-end tests start the example binaries (mock vLLM, webhook receiver).
echo "==> cargo build --examples"
cargo build --examples
echo "==> cargo test"
cargo test "$@"
