"""The official openai SDK, pointed at llmproxy: it must not notice the proxy.

Usage: python sdk_client.py BASE_URL API_KEY MODEL
Each request carries a known X-Request-Id so the Rust test can find its record.
"""
import sys

from openai import OpenAI

base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)
msgs = [{"role": "user", "content": "one two three four five"}]


def rid(name):
    return {"X-Request-Id": f"sdk-{name}"}


r = client.chat.completions.create(model=model, messages=msgs, max_tokens=4, extra_headers=rid("chat"))
assert r.choices[0].message.content == "tok0 tok1 tok2 tok3 ", r
assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens == 5, r.usage

chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=3, stream=True, extra_headers=rid("chat-stream")))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == "tok0 tok1 tok2 ", text
assert all(c.choices for c in chunks), "usage-only chunk reached a caller that did not ask for it"
assert all(c.usage is None for c in chunks)

chunks = list(client.chat.completions.create(
    model=model, messages=msgs, max_tokens=2, stream=True,
    stream_options={"include_usage": True}, extra_headers=rid("chat-stream-usage")))
assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 7, chunks[-1]

r = client.completions.create(model=model, prompt="a b c", max_tokens=2, extra_headers=rid("completion"))
assert r.choices[0].text == "tok0 tok1 ", r

chunks = list(client.completions.create(model=model, prompt="a b c", max_tokens=5, stream=True, extra_headers=rid("completion-stream")))
assert "".join(c.choices[0].text for c in chunks if c.choices) == "tok0 tok1 tok2 tok3 tok4 "

e = client.embeddings.create(model=model, input=["alpha beta gamma"], extra_headers=rid("embedding"))
assert len(e.data[0].embedding) == 8 and e.usage.prompt_tokens == 3, e.usage

r = client.responses.create(model=model, input="one two three", max_output_tokens=3, extra_headers=rid("responses"))
assert r.output_text == "tok0 tok1 tok2 ", r
assert r.usage.input_tokens == 3 and r.usage.output_tokens == 3, r.usage

events = list(client.responses.create(model=model, input="one two three", max_output_tokens=4, stream=True, extra_headers=rid("responses-stream")))
deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
assert deltas == "tok0 tok1 tok2 tok3 ", deltas
done = [e for e in events if e.type == "response.completed"]
assert done and done[0].response.usage.output_tokens == 4, events[-1]

t = client.audio.transcriptions.create(model=model, file=("a.wav", b"\x00" * 32000, "audio/wav"), extra_headers=rid("transcription"))
assert t.text.startswith("tok0"), t

models = client.models.list()
assert [m.id for m in models.data] == [model], models

try:
    client.chat.completions.create(model="no-such-model", messages=msgs)
    raise AssertionError("expected NotFoundError")
except Exception as err:  # openai.NotFoundError
    assert getattr(err, "status_code", None) == 404, err
    assert err.body["code"] == "model_not_found", err.body

print("SDK OK")
