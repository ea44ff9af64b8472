"""The official openai SDK against a key with max_concurrent: 1 while another request
holds the slot: its first try gets 429 with Retry-After, it backs off as the header
says, retries, and succeeds (the Rust test counts the 429s in /metrics). A spent
budget (x-should-retry: false) raises at once, not retried.

Usage: python sdk_limits.py BASE_URL BUSY_KEY BUDGET_KEY
Prints `waited SECONDS` for the limited call.
"""
import sys
import time

import openai
from openai import OpenAI

base_url, busy_key, budget_key = sys.argv[1], sys.argv[2], sys.argv[3]
msgs = [{"role": "user", "content": "one two three four five"}]

client = OpenAI(base_url=base_url, api_key=busy_key, max_retries=4, timeout=30)
start = time.monotonic()
r = client.chat.completions.create(model="mock-model", messages=msgs, max_tokens=2,
                                   extra_headers={"X-Request-Id": "sdk-limited"})
assert r.usage.completion_tokens == 2, r.usage
print(f"waited {time.monotonic() - start:.2f}", flush=True)

spent = OpenAI(base_url=base_url, api_key=budget_key, max_retries=4, timeout=30)
start = time.monotonic()
try:
    spent.chat.completions.create(model="mock-model", messages=msgs, max_tokens=2)
    raise SystemExit("a spent budget was served")
except openai.RateLimitError as e:
    assert e.code == "insufficient_quota", e.code
assert time.monotonic() - start < 0.5, "the SDK retried a spent budget"
print("budget refused, not retried", flush=True)
