"""Drives llama-server through llmproxy with the official openai SDK and checks every
usage record against the server's own numbers (scripts/real-llama.sh starts it all).

Usage: python drive.py PROXY_URL GEN_URL EMBED_URL RECEIVER_URL GEN_SERVER_LOG

For a request whose caller did not ask for usage, the server's numbers come from the
same deterministic request (temperature 0, fixed seed) sent to the server directly
with `include_usage`. Prints a table of request kinds; exits 1 on any mismatch.
"""
import concurrent.futures
import json
import re
import socket
import sys
import time
import urllib.request

from openai import OpenAI

proxy, gen, emb, receiver, server_log = sys.argv[1:6]


def server_generated():
    """The tokens in a slot's cache (prompt and generated) when llama-server released
    it, per task in order: a cancelled task logs only this (no timings)."""
    with open(server_log, errors="replace") as f:
        return [int(n) for n in re.findall(r"stop processing: n_tokens = (\d+)", f.read())]

via = OpenAI(base_url=proxy + "/v1", api_key="unused", max_retries=0, timeout=120)
direct = OpenAI(base_url=gen + "/v1", api_key="unused", max_retries=0, timeout=120)
direct_emb = OpenAI(base_url=emb + "/v1", api_key="unused", max_retries=0, timeout=120)
MSGS = [{"role": "user", "content": "Write a short poem about usage records and billing."}]
SAMPLING = {"temperature": 0, "seed": 7}
rows = []
n = 0


def rid():
    global n
    n += 1
    return f"ll-{n}"


def record(request_id, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        with urllib.request.urlopen(receiver + "/records") as r:
            for rec in json.load(r):
                if rec.get("client_request_id") == request_id:
                    return rec
        time.sleep(0.1)
    raise SystemExit(f"no record for {request_id}")


def counts(u):
    return (u.prompt_tokens, u.completion_tokens, u.total_tokens)


def check(kind, request_id, want, source="backend", outcome="completed"):
    rec = record(request_id)
    got = (rec["prompt_tokens"], rec["completion_tokens"], rec["total_tokens"])
    ok = got == tuple(want) and rec["usage_source"] == source and rec["outcome"] == outcome
    rows.append((kind, ok, got, tuple(want), rec["usage_source"], rec["outcome"]))


def stream_usage(client, kind, **kw):
    """The usage of a streamed request, asked for (the server's own count)."""
    create = client.chat.completions.create if kind == "chat" else client.completions.create
    chunks = list(create(stream=True, stream_options={"include_usage": True}, **kw, **SAMPLING))
    usage = [c.usage for c in chunks if c.usage]
    return counts(usage[-1])


# Chat and completions, not streamed: the record equals the usage the caller got.
for _ in range(3):
    i = rid()
    r = via.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, extra_headers={"X-Request-Id": i}, **SAMPLING)
    check("chat", i, counts(r.usage))
    i = rid()
    r = via.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, extra_headers={"X-Request-Id": i}, **SAMPLING)
    check("completions", i, counts(r.usage))

# Streamed without usage: the caller sees none; the record equals the server's count.
for kind in ("chat", "completions"):
    args = {"model": "tiny", "max_tokens": 9}
    args.update({"messages": MSGS} if kind == "chat" else {"prompt": "The proxy bills"})
    create = via.chat.completions.create if kind == "chat" else via.completions.create
    i = rid()
    chunks = list(create(stream=True, extra_headers={"X-Request-Id": i}, **args, **SAMPLING))
    leaked = any(getattr(c, "usage", None) for c in chunks)
    want = stream_usage(direct, kind, **args)
    check(f"{kind} stream", i, want)
    if leaked:
        rows.append((f"{kind} stream: usage hidden", False, "leaked", "hidden", "", ""))
    # Streamed with usage asked for: the caller gets it, and the record equals it.
    i = rid()
    chunks = list(create(stream=True, stream_options={"include_usage": True}, extra_headers={"X-Request-Id": i}, **args, **SAMPLING))
    seen = [c.usage for c in chunks if c.usage]
    if not seen:
        rows.append((f"{kind} stream + include_usage: caller got usage", False, "none", "usage", "", ""))
    else:
        check(f"{kind} stream + include_usage", i, counts(seen[-1]))

# Stop sequences and n=2 (where the server supports it).
i = rid()
r = via.chat.completions.create(model="tiny", messages=MSGS, max_tokens=30, stop=["e"], extra_headers={"X-Request-Id": i}, **SAMPLING)
check("chat, stop sequence", i, counts(r.usage))
i = rid()
try:
    r = via.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, n=2, extra_headers={"X-Request-Id": i}, **SAMPLING)
    check("chat, n=2", i, counts(r.usage))
except Exception as e:  # an older server refuses n > 1: the record still says so
    rec = record(i)
    rows.append(("chat, n=2 (refused by the server)", rec["outcome"] == "backend_error", rec["status_code"], "4xx", rec["usage_source"], rec["outcome"]))

# Embeddings.
i = rid()
e = via.embeddings.create(model="tiny-embed", input=["alpha beta gamma delta"], extra_headers={"X-Request-Id": i})
check("embeddings", i, (e.usage.prompt_tokens, 0, e.usage.total_tokens))

# Queued: more requests at once than the server has slots.
def one(k):
    i = f"ll-q{k}"
    r = via.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8 + k, extra_headers={"X-Request-Id": i}, **SAMPLING)
    return i, counts(r.usage)


with concurrent.futures.ThreadPoolExecutor(8) as pool:
    for i, want in pool.map(one, range(8)):
        check("chat, queued (8 at once, 4 slots)", i, want)

# Hang-ups: a raw stream read for a few events, then the caller leaves. Billed as
# `partial` from the server's own per-event counts (usage_mode: llamacpp_timings).
for k in range(3):
    i = f"ll-gone{k}"
    before = len(server_generated())
    body = json.dumps({"model": "tiny", "messages": MSGS, "max_tokens": 400, "stream": True, **SAMPLING})
    host, port = proxy.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-request-id: {i}\r\ncontent-length: {len(body)}\r\n\r\n{body}".encode())
    got = b""
    while got.count(b"data: ") < 5 + k * 5:
        got += s.recv(4096)
    s.close()
    rec = record(i)
    # The server's own count of what it generated before it noticed the hang-up.
    end = time.time() + 20
    while len(server_generated()) == before and time.time() < end:
        time.sleep(0.1)
    in_cache = server_generated()[-1] if len(server_generated()) > before else None
    generated = None if in_cache is None else in_cache - rec["prompt_tokens"]
    prompt = stream_usage(direct, "chat", model="tiny", messages=MSGS, max_tokens=1)[0]
    # The record bills the server's last running count the proxy saw; the server may
    # have made a few tokens more before it noticed the caller had gone (and its
    # cache holds all but the last token it sampled).
    ok = (rec["outcome"] == "client_disconnected" and rec["usage_source"] == "partial"
          and rec["prompt_tokens"] == prompt and generated is not None
          and 0 < rec["completion_tokens"] <= generated + 1 <= rec["completion_tokens"] + 4
          and b'"timings"' not in got)
    rows.append((f"hang-up after {5 + k * 5} events", ok, (rec["prompt_tokens"], rec["completion_tokens"]), f"({prompt}, server generated {generated}) partial", rec["usage_source"], rec["outcome"]))

kinds = {}
for kind, ok, *_ in rows:
    kinds.setdefault(kind, [0, 0])[0 if ok else 1] += 1
print(f"{'request kind':48} {'exact':>6} {'mismatch':>9}")
for kind, (good, bad) in kinds.items():
    print(f"{kind:48} {good:>6} {bad:>9}")
bad = [r for r in rows if not r[1]]
for r in rows:
    if r[0].startswith("hang-up"):
        print(f"{r[0]}: record {r[2]}, server {r[3]}")
for r in bad:
    print("MISMATCH:", r)
print(f"==> {len(rows) - len(bad)} of {len(rows)} records exact")
sys.exit(1 if bad else 0)
