"""The official anthropic SDK, pointed at llmproxy's /v1/messages: it must not notice
the proxy (messages streamed and not, count_tokens, and the proxy's own errors read as
Anthropic errors).

Usage: python sdk_anthropic.py BASE_URL API_KEY MODEL
Each request carries a known X-Request-Id so the Rust test can find its record.
"""
import sys

import anthropic

base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)
msgs = [{"role": "user", "content": "one two three four five"}]


def rid(name):
    return {"X-Request-Id": f"sdk-{name}"}


m = client.messages.create(model=model, max_tokens=4, messages=msgs, extra_headers=rid("messages"))
assert "".join(b.text for b in m.content) == "tok0 tok1 tok2 tok3 ", m
assert m.usage.input_tokens == 5 and m.usage.output_tokens == 4, m.usage

with client.messages.stream(model=model, max_tokens=3, messages=msgs, extra_headers=rid("messages-stream")) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
assert text == "tok0 tok1 tok2 ", text
assert final.usage.output_tokens == 3, final.usage

events = list(client.messages.create(model=model, max_tokens=2, messages=msgs, stream=True, extra_headers=rid("messages-raw-stream")))
kinds = [e.type for e in events]
assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds

n = client.messages.count_tokens(model=model, messages=msgs, extra_headers=rid("count-tokens"))
assert n.input_tokens == 5, n

try:
    client.messages.create(model="no-such-model", max_tokens=1, messages=msgs)
    raise AssertionError("expected NotFoundError")
except anthropic.NotFoundError as err:
    assert err.status_code == 404, err
    assert err.body["error"]["type"] == "not_found_error", err.body

bad = anthropic.Anthropic(base_url=base_url, api_key="sk-wrong-key-0123456789", max_retries=0)
try:
    bad.messages.create(model=model, max_tokens=1, messages=msgs)
    raise AssertionError("expected AuthenticationError")
except anthropic.AuthenticationError as err:
    assert err.body["error"]["type"] == "authentication_error", err.body

print("ANTHROPIC SDK OK")
