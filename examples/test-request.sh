#!/usr/bin/env bash
# Exercises a running llmproxy with curl: a streamed and a non-streamed chat
# completion, an embedding, the model list, and an unauthenticated request.
#   LLMPROXY_URL (default http://127.0.0.1:8080)  LLMPROXY_KEY  MODEL
set -euo pipefail
URL=${LLMPROXY_URL:-http://127.0.0.1:8080}
KEY=${LLMPROXY_KEY:-sk-demo-alice-0123456789}
MODEL=${MODEL:-meta-llama/Llama-3.1-8B-Instruct}

echo "==> streaming chat completion (tokens arrive as the backend makes them)"
curl -sS -N "$URL/v1/chat/completions" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
    -d "{\"model\":\"$MODEL\",\"stream\":true,\"max_tokens\":8,\"messages\":[{\"role\":\"user\",\"content\":\"Say hello to the billing team\"}]}"
echo
echo "==> non-streaming chat completion"
curl -sS "$URL/v1/chat/completions" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
    -d "{\"model\":\"$MODEL\",\"max_tokens\":5,\"messages\":[{\"role\":\"user\",\"content\":\"Count to five\"}]}"
echo
echo "==> embeddings"
curl -sS "$URL/v1/embeddings" -H "x-api-key: $KEY" -H "Content-Type: application/json" \
    -d "{\"model\":\"$MODEL\",\"input\":\"usage records are money\"}" | head -c 200
echo
echo "==> models"
curl -sS "$URL/v1/models" -H "Authorization: Bearer $KEY"
echo
echo "==> without a key (401, no record)"
curl -sS -i "$URL/v1/chat/completions" -H "Content-Type: application/json" -d "{\"model\":\"$MODEL\"}"
echo
