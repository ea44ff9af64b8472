#!/usr/bin/env bash
# Exercises a running llmproxy with curl: a streamed and a non-streamed chat
# completion, an embedding, a Responses call, an Anthropic Messages stream, an audio
# transcription, the model list, an admin path (refused) and an unauthenticated
# request.
#   LLMPROXY_URL (default http://127.0.0.1:8080)  LLMPROXY_KEY  MODEL
set -euo pipefail
URL=${LLMPROXY_URL:-http://127.0.0.1:8080}
KEY=${LLMPROXY_KEY:-sk-demo-alice-0123456789}
MODEL=${MODEL:-meta-llama/Llama-3.1-8B-Instruct}
# Runs a command and prints the first 400 characters of what it printed (a pipe into
# `head` would cut curl off mid-write).
show() { local out; out=$("$@"); printf '%s\n' "${out:0:400}"; }

echo "==> streaming chat completion (tokens arrive as the backend makes them)"
curl -sS -N "$URL/v1/chat/completions" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
    -d "{\"model\":\"$MODEL\",\"stream\":true,\"max_tokens\":8,\"messages\":[{\"role\":\"user\",\"content\":\"Say hello to the billing team\"}]}"
echo
echo "==> non-streaming chat completion"
curl -sS "$URL/v1/chat/completions" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
    -d "{\"model\":\"$MODEL\",\"max_tokens\":5,\"messages\":[{\"role\":\"user\",\"content\":\"Count to five\"}]}"
echo
echo "==> embeddings"
show curl -sS "$URL/v1/embeddings" -H "x-api-key: $KEY" -H "Content-Type: application/json" \
    -d "{\"model\":\"$MODEL\",\"input\":\"usage records are money\"}"
echo
echo "==> Responses API (OpenAI Agents SDK, Codex-style clients)"
show curl -sS "$URL/v1/responses" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
    -d "{\"model\":\"$MODEL\",\"input\":\"bill me exactly\",\"max_output_tokens\":4}"
echo
echo "==> Anthropic Messages, streamed (Claude-compatible clients)"
show curl -sS -N "$URL/v1/messages" -H "x-api-key: $KEY" -H "anthropic-version: 2023-06-01" -H "Content-Type: application/json" \
    -d "{\"model\":\"$MODEL\",\"max_tokens\":3,\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi there\"}]}"
echo
echo "==> audio transcription (multipart)"
head -c 64000 /dev/zero > /tmp/llmproxy-demo.wav
curl -sS "$URL/v1/audio/transcriptions" -H "Authorization: Bearer $KEY" \
    -F model="$MODEL" -F file=@/tmp/llmproxy-demo.wav
echo
echo "==> an admin path (404, never forwarded)"
curl -sS "$URL/v1/load_lora_adapter" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" -d '{}'
echo
echo "==> models"
curl -sS "$URL/v1/models" -H "Authorization: Bearer $KEY"
echo
echo "==> without a key (401, no record)"
curl -sS -i "$URL/v1/chat/completions" -H "Content-Type: application/json" -d "{\"model\":\"$MODEL\"}"
echo
