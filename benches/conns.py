"""Memory per connection: idle keep-alive connections, and concurrent slow streams
(the backend sends a token every 50 ms, 200 tokens: 10 s per stream), measured from
llmproxy's RSS; the peak number of streams in flight at once is read from /metrics.
    python3 benches/conns.py [idle connections, default 10000] [slow streams, default 10000]
BIN=path measures another llmproxy build.
Needs `cargo build --release --bin llmproxy --example mock_vllm --example webhook_receiver`.
Everything listens on 127.0.0.1; every count and duration is bounded.
"""
import json, os, resource, selectors, signal, socket, subprocess, sys, tempfile, time, urllib.request

IDLE = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
STREAMS = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
TOKENS = 200
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
W = tempfile.mkdtemp(prefix="llmproxy-conns-")
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:  # 10,000 streams are 20,000 sockets in the proxy: raise the hard limit if allowed
    resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
except (ValueError, OSError):
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
if STREAMS * 2 + 100 > limit:
    fit = (limit - 100) // 2
    print(f"note: the open-file limit here is {limit} (hard) and a stream holds two sockets in the proxy; "
          f"running {fit} streams instead of {STREAMS}", file=sys.stderr)
    STREAMS = fit
procs = []


def port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def up(p):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", p), timeout=0.2).close(); return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing on {p}")


def in_flight():
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{PROXY}/metrics", timeout=5).read().decode()
    except OSError as e:
        print(f"metrics: {e}", file=sys.stderr); return 0
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("llmproxy_backend_in_flight{"))


def rss_kib(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"):
            return int(l.split()[1])


MOCK, HOOK, PROXY = port(), port(), port()
procs.append(subprocess.Popen([f"{REL}/examples/mock_vllm", "--port", str(MOCK), "--paced"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
procs.append(subprocess.Popen([f"{REL}/examples/webhook_receiver", "--port", str(HOOK), "--quiet", "--log", "none", "--no-store"], stdout=subprocess.DEVNULL))
up(MOCK); up(HOOK)
open(f"{W}/c.yaml", "w").write(f"""
listen: "127.0.0.1:{PROXY}"
access_log: "off"
backends:
  - url: "http://127.0.0.1:{MOCK}"
usage_hook:
  enabled: true
  url: "http://127.0.0.1:{HOOK}/u"
  spool_dir: "{W}/spool"
limits:
  max_connections: 20000
""")
def start_proxy():
    p = subprocess.Popen([os.environ.get("BIN", f"{REL}/llmproxy"), "--config", f"{W}/c.yaml"], stdout=subprocess.DEVNULL, stderr=open(f"{W}/proxy.log", "a"))
    procs.append(p)
    up(PROXY)
    time.sleep(0.5)
    return p


def warm(n_conns=8, each=1000):
    """Chat completions on a few keep-alive connections, before the idle phase's
    baseline: what is bounded per process and not per connection (each worker's 2 MiB
    staging ring once it has wrapped, the pooled backend connections, the spare read
    buffers) is then in the baseline, not divided among the idle connections."""
    chat = json.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 16}).encode()
    ask = b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(chat), chat)
    socks = [socket.create_connection(("127.0.0.1", PROXY)) for _ in range(n_conns)]
    for _ in range(each):
        for s in socks:
            s.sendall(ask)
        for s in socks:
            data = b""
            while True:
                data += s.recv(65536)
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep and b"content-length:" in head.lower():
                    n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    if len(body) >= n:
                        break
    for s in socks:
        s.close()


proxy = start_proxy()
try:
    warm()
    time.sleep(0.5)
    base = rss_kib(proxy.pid)
    # Idle keep-alive connections: each made one chat completion (through the
    # backend, metered and billed, as an SDK's pooled connection does) and stays open.
    chat = json.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 16}).encode()
    ask = b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(chat), chat)
    conns = []
    for _ in range(IDLE):
        s = socket.create_connection(("127.0.0.1", PROXY))
        s.sendall(ask)
        conns.append(s)
    for s in conns:
        s.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            data += s.recv(4096)
    time.sleep(0.5)
    idle = rss_kib(proxy.pid)
    per_idle = (idle - base) / IDLE
    # What holding them costs the CPU: the worker's ticker wakes every idle wait each
    # 100 ms to look at its deadline and for a shutdown.
    def ticks():
        f = open(f"/proc/{proxy.pid}/stat").read().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])
    clk = os.sysconf("SC_CLK_TCK")
    t0 = ticks()
    time.sleep(5)
    idle_cpu = (ticks() - t0) / os.sysconf("SC_CLK_TCK") / 5 * 100
    for s in conns:
        s.close()
    # A fresh process for the streams, so memory freed by the first phase is not reused.
    proxy.send_signal(signal.SIGTERM); proxy.wait(timeout=30)
    proxy = start_proxy()
    base2 = rss_kib(proxy.pid)

    # Slow streams: TOKENS tokens, one every 50 ms, all at once.
    body = json.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": TOKENS, "stream": True}).encode()
    req = b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\nx-mock-token-delay-ms: 50\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    sel = selectors.DefaultSelector()
    before = rss_kib(proxy.pid)
    c0, w0 = ticks(), time.time()
    for i in range(STREAMS):
        s = socket.create_connection(("127.0.0.1", PROXY))
        s.setblocking(False)
        s.sendall(req)
        sel.register(s, selectors.EVENT_READ, bytearray())
    peak, done, complete, most, polled = before, 0, 0, 0, 0.0
    end = time.time() + 120
    while done < STREAMS and time.time() < end:
        if time.time() - polled > 0.5:
            most, polled = max(most, in_flight()), time.time()
        for key, _ in sel.select(timeout=0.5):
            try:
                chunk = key.fileobj.recv(65536)
            except BlockingIOError:
                continue
            if chunk:
                key.data.extend(chunk[-64:])
                del key.data[:-64]
            else:
                complete += key.data.endswith(b"0\r\n\r\n")
                sel.unregister(key.fileobj); key.fileobj.close(); done += 1
        peak = max(peak, rss_kib(proxy.pid))
    per_stream = (peak - before) / STREAMS
    stream_cpu_s, stream_wall = (ticks() - c0) / clk, time.time() - w0
    print(f"llmproxy RSS after 8,000 warm-up requests: {base / 1024:.1f} MiB (the streams' process at start: {base2 / 1024:.1f} MiB)")
    print(f"{IDLE} idle keep-alive connections: +{(idle - base) / 1024:.1f} MiB = {per_idle:.1f} KiB per connection; "
          f"{idle_cpu:.1f}% of a core while they idle")
    print(f"{STREAMS} concurrent slow streams (token every 50 ms): peak +{(peak - before) / 1024:.1f} MiB = {per_stream:.1f} KiB per stream "
          f"(client and upstream connection); at most {most:.0f} in flight at once; {complete}/{STREAMS} streams complete")
    print(f"  while streaming: llmproxy used {stream_cpu_s / stream_wall * 100:.1f}% of a core over {stream_wall:.1f} s, "
          f"{stream_cpu_s * 1e6 / max(complete * TOKENS, 1):.1f} us of CPU per relayed token (metering and billing included)")
finally:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try: p.wait(timeout=20)
        except Exception: p.kill()
