#!/usr/bin/env bash
# The load benchmark: llmproxy against nginx and haproxy as plain reverse proxies, same
# backend, same core. Installs what it needs (nginx, haproxy, wrk from Debian; oha from
# crates.io),
# builds, then runs benches/load.py. Every server listens on 127.0.0.1 only.
#   benches/load.sh [seconds per run, default 5] [rounds, default 3]
# ONLY=json,sse,rate,churn,slow runs a subset of the scenarios. TLS=1: both proxies
# terminate TLS 1.3 (json, sse and churn: a full handshake per request).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v haproxy >/dev/null || need+=(haproxy)
command -v wrk >/dev/null || need+=(wrk)
command -v taskset >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# oha drives the fixed-rate scenario, which a TLS=1 run leaves out (and ONLY= may).
if [ "${TLS:-}" != 1 ] && { [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",rate,"* ]]; }; then
    command -v oha >/dev/null || cargo install oha --locked
fi
cargo build --release --bin llmproxy --example mock_vllm --example webhook_receiver 2>&1 | tail -n 1
exec python3 benches/load.py "${1:-5}" "${2:-3}"
