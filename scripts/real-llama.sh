#!/usr/bin/env bash
# A real inference server behind the proxy: llama.cpp's llama-server, built from the
# source vendored in the llama-cpp-python sdist on PyPI, serving a tiny random-weight
# llama model made here, with llmproxy in front. Drives the official openai SDK through
# the proxy (chat, completions, embeddings, streamed and not, n=2, stop sequences,
# hang-ups) and compares every usage record with the server's own numbers. Prints a
# table; exits non-zero on any mismatch.
#
#   scripts/real-llama.sh            # ~13 min the first time (the build), then ~1 min
#
# Not part of .ci/run (too slow). Run it when usage, relay or rewrite code changes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
W=target/real-llama
LLAMA_VERSION=0.3.36
mkdir -p "$W"

# --- the tools: cmake (Debian), numpy and the SDK (the repository's .venv) ---
if ! command -v cmake >/dev/null; then
    apt-get update -qq && apt-get install -y -qq cmake >/dev/null
fi
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import openai, numpy, yaml" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check "openai>=1.40" "anthropic>=0.40" prometheus_client numpy pyyaml
fi

# --- llama.cpp's source, from the llama-cpp-python sdist (PyPI), checked ---
SRC=$W/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    echo "==> fetching llama-cpp-python $LLAMA_VERSION (its sdist vendors llama.cpp)"
    url=$(curl -fsS --max-time 60 https://pypi.org/simple/llama-cpp-python/ \
        | grep -o "href=\"[^\"]*llama_cpp_python-$LLAMA_VERSION.tar.gz#sha256=[0-9a-f]*\"" | head -n 1 \
        | sed 's/^href="//; s/"$//')
    [ -n "$url" ] || { echo "llama-cpp-python $LLAMA_VERSION not found on PyPI"; exit 1; }
    curl -fsS --max-time 600 -o "$W/llama.tar.gz" "${url%%#*}"
    echo "${url##*sha256=}  $W/llama.tar.gz" | sha256sum -c --quiet
    tar xzf "$W/llama.tar.gz" -C "$W"
fi

# --- llama-server, built once and kept in target/ ---
SERVER=$W/llama-server
if [ ! -x "$SERVER" ]; then
    echo "==> building llama-server (about 13 minutes on 2 cores; kept in $SERVER)"
    cmake -S "$SRC" -B "$W/build" -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
        -DBUILD_SHARED_LIBS=OFF >"$W/cmake.log" 2>&1 || { tail -n 30 "$W/cmake.log"; exit 1; }
    cmake --build "$W/build" --target llama-server -j "$(nproc)" >"$W/build.log" 2>&1 \
        || { tail -n 30 "$W/build.log"; exit 1; }
    cp "$(find "$W/build" -name llama-server -type f -perm -u+x | head -n 1)" "$SERVER"
fi

# --- the model ---
MODEL=$W/tiny.gguf
[ -f "$MODEL" ] || .venv/bin/python scripts/real_llama/make_model.py "$SRC" "$MODEL"

# --- the proxy and the receiver ---
cargo build --release --quiet --bin llmproxy --example webhook_receiver
RUN=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$RUN"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 1 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing on port $1; logs:"; tail -n 20 "$RUN"/*.log; exit 1
}
GEN=$(free_port); EMB=$(free_port); HOOK=$(free_port); PROXY=$(free_port)
# The generating server logs its per-task timings: the hang-ups are checked against
# the tokens it says it generated.
"$SERVER" -m "$MODEL" --host 127.0.0.1 --port "$GEN" -c 2048 -np 4 --alias tiny --log-file "$RUN/gen-server.log" >"$RUN/gen.log" 2>&1 &
pids+=($!)
"$SERVER" -m "$MODEL" --host 127.0.0.1 --port "$EMB" -c 2048 --embeddings --pooling mean --alias tiny-embed --log-disable >"$RUN/emb.log" 2>&1 &
pids+=($!)
target/release/examples/webhook_receiver --port "$HOOK" --quiet --log "$RUN/usage.jsonl" >"$RUN/receiver.log" 2>&1 &
pids+=($!)
wait_port "$GEN"; wait_port "$EMB"; wait_port "$HOOK"
for _ in $(seq 1 300); do
    curl -fsS "127.0.0.1:$GEN/health" >/dev/null 2>&1 && curl -fsS "127.0.0.1:$EMB/health" >/dev/null 2>&1 && break
    sleep 0.2
done
cat >"$RUN/config.yaml" <<YAML
listen: "127.0.0.1:$PROXY"
workers: 2
backends:
  - url: "http://127.0.0.1:$GEN"
    name: llama-gen
    models: [tiny]
    usage_mode: ${USAGE_MODE:-llamacpp_timings}
  - url: "http://127.0.0.1:$EMB"
    name: llama-embed
    models: [tiny-embed]
usage_hook:
  enabled: true
  url: "http://127.0.0.1:$HOOK/llm-usage"
  spool_dir: "$RUN/spool"
health_check:
  interval: 1s
access_log: "off"
YAML
target/release/llmproxy --config "$RUN/config.yaml" >"$RUN/proxy.log" 2>&1 &
pids+=($!)
wait_port "$PROXY"

echo "==> llama-server on :$GEN (and :$EMB for embeddings), llmproxy on :$PROXY"
.venv/bin/python scripts/real_llama/drive.py "http://127.0.0.1:$PROXY" "http://127.0.0.1:$GEN" \
    "http://127.0.0.1:$EMB" "http://127.0.0.1:$HOOK" "$RUN/gen-server.log"
