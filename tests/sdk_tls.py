"""The official openai SDK through the proxy's TLS listener, trusting only the test's
CA bundle: a chat call and a stream succeed; the same call with another CA fails with
a connection error (certificate not verified), never a response.

Usage: python sdk_tls.py BASE_URL CA_BUNDLE WRONG_CA_BUNDLE
"""
import sys

import openai
from openai import DefaultHttpxClient, OpenAI

base_url, ca, wrong_ca = sys.argv[1], sys.argv[2], sys.argv[3]
msgs = [{"role": "user", "content": "one two three four five"}]

client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30,
                http_client=DefaultHttpxClient(verify=ca))
r = client.chat.completions.create(model="mock-model", messages=msgs, max_tokens=4,
                                   extra_headers={"X-Request-Id": "tls-chat"})
assert r.choices[0].message.content == "tok0 tok1 tok2 tok3 ", r
assert r.usage.total_tokens == 9, r.usage

chunks = list(client.chat.completions.create(
    model="mock-model", messages=msgs, max_tokens=3, stream=True,
    stream_options={"include_usage": True}, extra_headers={"X-Request-Id": "tls-stream"}))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == "tok0 tok1 tok2 ", text
assert chunks[-1].usage.total_tokens == 8, chunks[-1]

wrong = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30,
               http_client=DefaultHttpxClient(verify=wrong_ca))
try:
    wrong.chat.completions.create(model="mock-model", messages=msgs, max_tokens=1,
                                  extra_headers={"X-Request-Id": "tls-wrong-ca"})
    raise SystemExit("a certificate from another CA was accepted")
except openai.APIConnectionError as e:
    assert "CERTIFICATE_VERIFY_FAILED" in repr(e.__cause__) or "certificate" in repr(e.__cause__).lower(), repr(e.__cause__)
print("ok", flush=True)
