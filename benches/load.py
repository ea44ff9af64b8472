"""Drives the load benchmark (see benches/load.sh): the mock vLLM (prerendered, core 1),
nginx (one worker, core 0), llmproxy (one worker, whole process on core 0, metering and
webhook on, spool on), and the load generator on core 1. Runs are interleaved across
targets and repeated; medians are reported, because this machine is shared and noisy.

TLS=1: nginx and llmproxy terminate TLS (an ECDSA P-256 certificate made here with
openssl; TLS 1.3 on both: wrk's OpenSSL and rustls agree on it) and wrk speaks https;
the "no keep-alive" scenario is then a full handshake per request. The mock ("direct")
stays plain: its row is only a reference.
"""
import json, os, re, resource, urllib.request, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

DUR, ROUNDS = int(sys.argv[1]), int(sys.argv[2])
TLS = os.environ.get("TLS") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
W = tempfile.mkdtemp(prefix="llmproxy-load-")
TICK = os.sysconf("SC_CLK_TCK")
# The slow-stream scenario holds 1,000 connections in wrk and 2,000 sockets in each
# proxy: every process started here inherits the hard open-file limit as its soft one.
try:  # raising the hard limit needs CAP_SYS_RESOURCE; otherwise the hard limit it is
    resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
except (ValueError, OSError):
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2 * 1000 + 200:
    print("note: the open-file limit is below what 1,000 slow streams need; that scenario may show errors", file=sys.stderr)
SLOW_CONNS, SLOW_TOKENS, SLOW_DELAY_MS = 1000, 64, 50
procs = []


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def wait_port(port, what):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close(); return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not start on {port}")


def start(cmd, cpu, log):
    p = subprocess.Popen(["taskset", "-c", str(cpu)] + cmd, stdout=open(f"{W}/{log}", "w"), stderr=subprocess.STDOUT)
    procs.append(p)
    return p


def cleanup(*_):
    for p in procs:
        try: p.send_signal(signal.SIGTERM)
        except Exception: pass
    for p in procs:
        try: p.wait(timeout=15)
        except Exception: p.kill()
    shutil.rmtree(W, ignore_errors=True)


MOCK, HOOK, NGINX, PROXY = free_port(), free_port(), free_port(), free_port()
if TLS:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", f"{W}/key.pem", "-out", f"{W}/cert.pem", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
SSL = "ssl" if TLS else ""
NGINX_TLS = f"ssl_certificate {W}/cert.pem; ssl_certificate_key {W}/key.pem; ssl_protocols TLSv1.3; ssl_session_tickets off;" if TLS else ""
PROXY_TLS = f'tls: {{cert: "{W}/cert.pem", key: "{W}/key.pem"}}' if TLS else ""
# The slow-stream scenario's backend: a paced mock (one pacer thread feeds every stream a
# token every 50 ms), reached through its own nginx server block and, in llmproxy, by
# model name.
SLOW_MOCK, NGINX_SLOW = free_port(), free_port()
start([f"{REL}/examples/mock_vllm", "--port", str(MOCK), "--prerender", "--tokens", "64", "--models", "mock-model"], 1, "mock.log")
start([f"{REL}/examples/mock_vllm", "--port", str(SLOW_MOCK), "--paced", "--models", "slow-model"], 1, "slow-mock.log")
start([f"{REL}/examples/webhook_receiver", "--port", str(HOOK), "--quiet", "--log", "none", "--no-store"], 1, "receiver.log")
wait_port(MOCK, "mock"); wait_port(HOOK, "receiver"); wait_port(SLOW_MOCK, "paced mock")
# nginx (`deferred`) and haproxy (`defer-accept`) defer each accept until the caller's
# first bytes, as llmproxy's listener does (TCP_DEFER_ACCEPT): the same kernel help
# for all three on the churn scenario.
open(f"{W}/nginx.conf", "w").write(f"""
worker_processes 1;
worker_cpu_affinity 01;
worker_rlimit_nofile 20000;
daemon off;
error_log {W}/nginx-error.log warn;
pid {W}/nginx.pid;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {W}/nginx-body;
  proxy_temp_path {W}/nginx-proxy;
  upstream backend {{ server 127.0.0.1:{MOCK}; keepalive 256; }}
  upstream slow {{ server 127.0.0.1:{SLOW_MOCK}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{NGINX_SLOW} reuseport backlog=4096;
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://slow;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
  server {{
    listen 127.0.0.1:{NGINX} reuseport backlog=4096 deferred {SSL};
    {NGINX_TLS}
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering on;
    }}
  }}
}}
""")
nginx_master = start(["nginx", "-c", f"{W}/nginx.conf", "-p", W], 0, "nginx.log")
# haproxy, the second anchor: one thread on core 0, keep-alive to the backends,
# connections reused across callers (http-reuse always), as nginx's keepalive pool.
HAPROXY, HAPROXY_SLOW = free_port(), free_port()
if TLS:
    open(f"{W}/combined.pem", "w").write(open(f"{W}/cert.pem").read() + open(f"{W}/key.pem").read())
HA_SSL = f" ssl crt {W}/combined.pem ssl-min-ver TLSv1.3" if TLS else ""
open(f"{W}/haproxy.cfg", "w").write(f"""
global
  nbthread 1
  maxconn 8000
  log stderr format raw local0 emerg
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  http-reuse always
frontend main
  bind 127.0.0.1:{HAPROXY} defer-accept{HA_SSL}
  default_backend mock
frontend slow
  bind 127.0.0.1:{HAPROXY_SLOW}
  default_backend slow
backend mock
  server s1 127.0.0.1:{MOCK}
backend slow
  server s1 127.0.0.1:{SLOW_MOCK}
""")
haproxy = start(["haproxy", "-f", f"{W}/haproxy.cfg", "-db"], 0, "haproxy.log")
open(f"{W}/llmproxy.yaml", "w").write(f"""
listen: "127.0.0.1:{PROXY}"
workers: 1
access_log: "off"
{PROXY_TLS}
backends:
  - url: "http://127.0.0.1:{MOCK}"
    models: [mock-model]
  - url: "http://127.0.0.1:{SLOW_MOCK}"
    models: [slow-model]
usage_hook:
  enabled: true
  url: "http://127.0.0.1:{HOOK}/usage"
  spool_dir: "{W}/spool"
""")
proxy = start([f"{REL}/llmproxy", "--config", f"{W}/llmproxy.yaml"], 0, "llmproxy.log")
wait_port(NGINX, "nginx"); wait_port(PROXY, "llmproxy"); wait_port(HAPROXY, "haproxy")
# BASE=path/to/another/llmproxy adds that build as a fourth target ("base"), measured
# in the same interleaved rounds: an A/B of a change that the machine's noise between
# separate runs would hide.
BASE = os.environ.get("BASE")
BASE_PORT = free_port()
if BASE:
    open(f"{W}/base.yaml", "w").write(open(f"{W}/llmproxy.yaml").read()
                                      .replace(f":{PROXY}", f":{BASE_PORT}").replace(f"{W}/spool", f"{W}/base-spool"))
    base = start([BASE, "--config", f"{W}/base.yaml"], 0, "base.log")
    wait_port(BASE_PORT, "base llmproxy")
# NOBILL=1 adds the same build with usage_hook.enabled: false as a target ("nobill"):
# what billing (metering's record, hand-over, spool, webhook) costs, in the same rounds.
NOBILL = os.environ.get("NOBILL") == "1"
NOBILL_PORT = free_port()
if NOBILL:
    open(f"{W}/nobill.yaml", "w").write(open(f"{W}/llmproxy.yaml").read()
                                        .replace(f":{PROXY}", f":{NOBILL_PORT}").replace("enabled: true", "enabled: false")
                                        .replace(f"{W}/spool", f"{W}/nobill-spool"))
    nobill = start([f"{REL}/llmproxy", "--config", f"{W}/nobill.yaml"], 0, "nobill.log")
    wait_port(NOBILL_PORT, "llmproxy without billing")
time.sleep(0.3)
nginx_worker = int(subprocess.check_output(["pgrep", "-P", str(nginx_master.pid)]).split()[0])
PIDS = {"direct": None, "nginx": nginx_worker, "haproxy": haproxy.pid, "llmproxy": proxy.pid}
PORTS = {"direct": MOCK, "nginx": NGINX, "haproxy": HAPROXY, "llmproxy": PROXY}
if BASE:
    PIDS["base"], PORTS["base"] = base.pid, BASE_PORT
if NOBILL:
    PIDS["nobill"], PORTS["nobill"] = nobill.pid, NOBILL_PORT
PROXIES = {"llmproxy": PROXY, "base": BASE_PORT, "nobill": NOBILL_PORT}

BODY = {
    "json": '{"model":"mock-model","messages":[{"role":"user","content":"one two three four five"}],"max_tokens":64}',
    "sse": '{"model":"mock-model","messages":[{"role":"user","content":"one two three four five"}],"max_tokens":64,"stream":true}',
}
open(f"{W}/slow.lua", "w").write(
    f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.headers["x-mock-token-delay-ms"] = "{SLOW_DELAY_MS}"\n'
    f'wrk.body = {json.dumps(json.dumps({"model": "slow-model", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": SLOW_TOKENS, "stream": True, "stream_options": {"include_usage": True}}))}\n')
SLOW_PORTS = {"direct": SLOW_MOCK, "nginx": NGINX_SLOW, "haproxy": HAPROXY_SLOW, "llmproxy": PROXY, "base": BASE_PORT, "nobill": NOBILL_PORT}
for name, body in BODY.items():
    for close in (False, True):
        extra = 'wrk.headers["Connection"] = "close"\n' if close else ""
        open(f"{W}/{name}{'-close' if close else ''}.lua", "w").write(
            f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n{extra}wrk.body = {json.dumps(body)}\n')


def cpu(pid):
    return sum(cpu_split(pid))


def cpu_split(pid):
    """(user, kernel) CPU ticks of a process, all its threads."""
    if pid is None:
        return (0, 0)
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]), int(f[12]))


def worker_cpu(pid, prefix="worker-"):
    """CPU seconds of llmproxy's worker threads only (the relay, without billing threads);
    prefix "usage-": of its delivery threads (spool writer, sender). From schedstat (ns),
    not the 10 ms ticks: a delivery thread at 2,000 req/s runs ~1 us a request."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            if open(f"/proc/{pid}/task/{t}/comm").read().startswith(prefix):
                total += int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0]) / 1e9
        except OSError:
            pass
    return total


def drained(port):
    """Waits (at most 15 s) until llmproxy has delivered every record of the run, so its
    CPU time includes the billing work the run caused, not only what was done during it."""
    end = time.time() + 15
    while time.time() < end:
        try:
            import ssl
            ctx = ssl._create_unverified_context()
            text = urllib.request.urlopen(f"{'https' if TLS else 'http'}://127.0.0.1:{port}/metrics", timeout=2, context=ctx).read().decode()
            vals = {l.split()[0]: float(l.split()[1]) for l in text.splitlines()
                    if l.startswith(("llmproxy_usage_spool_bytes ", "llmproxy_usage_queue_depth "))}
            if vals and all(v == 0 for v in vals.values()):
                return
        except OSError:
            pass
        time.sleep(0.1)


def rss_kib(pid):
    if pid is None:
        return 0
    m = re.search(r"VmHWM:\s+(\d+)", open(f"/proc/{pid}/status").read())
    return int(m.group(1)) if m else 0


def to_ms(v):
    n, unit = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(target, lua, conns=64, dur=None, port=None):
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{dur or DUR}s", "--timeout", "15s", "--latency", "-s", f"{W}/{lua}.lua",
                          f"{'https' if TLS and target != 'direct' else 'http'}://127.0.0.1:{port or PORTS[target]}/v1/chat/completions"], capture_output=True, text=True).stdout
    lat = dict(re.findall(r"^\s+(\d+)%\s+(\S+)", out, re.M))
    n = int(re.search(r"(\d+) requests in", out).group(1))
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": to_ms(lat["50"]), "p99": to_ms(lat["99"]),
            "n": n, "errors": (int(errs.group(1)) if errs else 0), "sockerr": sock.group(1) if sock else ""}


def oha(target):
    out = subprocess.run(["taskset", "-c", "1", "oha", "--no-tui", "--output-format", "json", "-z", f"{DUR}s", "-c", "64", "-q", "2000",
                          "-m", "POST", "-H", "Content-Type: application/json", "-d", BODY["json"],
                          f"http://127.0.0.1:{PORTS[target]}/v1/chat/completions"], capture_output=True, text=True)
    j = json.loads(out.stdout)
    s = j["summary"]; p = j["latencyPercentiles"]
    codes = j.get("statusCodeDistribution", {})
    return {"rps": s["requestsPerSec"], "p50": p["p50"] * 1000, "p99": p["p99"] * 1000, "n": sum(codes.values()),
            "errors": sum(v for k, v in codes.items() if k != "200"), "sockerr": ""}


SCENARIOS = [
    ("non-stream JSON, 64 conns", lambda t: wrk(t, "json")),
    ("SSE 64 chunks, 64 conns", lambda t: wrk(t, "sse")),
    ("fixed 2000 req/s (latency)", oha),
    ("no keep-alive (churn)", lambda t: wrk(t, "json-close")),
    # 1,000 streams at once, a token every 50 ms (64 tokens, 3.2 s a stream): each
    # token is its own read and write. 10 s runs; the streams cut at the end are not
    # counted, for any target alike.
    ("slow SSE, 1000 streams", lambda t: wrk(t, "slow", SLOW_CONNS, 10, SLOW_PORTS[t])),
]
# ONLY=json,sse,... runs a subset (json, sse, rate, churn, slow), to measure one change.
KEYS = ["json", "sse", "rate", "churn", "slow"]
if TLS:  # the paced and fixed-rate scenarios are the plain run's
    SCENARIOS = [sc for k, sc in zip(KEYS, SCENARIOS) if k in ("json", "sse", "churn")]
    KEYS = ["json", "sse", "churn"]
if os.environ.get("ONLY"):
    SCENARIOS = [sc for k, sc in zip(KEYS, SCENARIOS) if k in os.environ["ONLY"].split(",")]
results = {s: {t: [] for t in PORTS} for s, _ in SCENARIOS}
try:
    for r in range(ROUNDS):
        k = r % len(PORTS)
        order = list(PORTS)[k:] + list(PORTS)[:k]
        for name, fn in SCENARIOS:
            for t in order:
                before = cpu(PIDS[t])
                ubefore = cpu_split(PIDS[t])[0]
                wbefore = worker_cpu(PIDS[t]) if t in PROXIES else 0
                dbefore = worker_cpu(PIDS[t], "usage-") if t in PROXIES else 0
                res = fn(t)
                wafter = worker_cpu(PIDS[t]) if t in PROXIES else 0
                if t in PROXIES:
                    drained(PROXIES[t])
                # The delivery threads' CPU for the run's records, drained included: billing's
                # share outside the worker, measured in the one process (no spell between
                # two runs to compare).
                res["delivery_us"] = ((worker_cpu(PIDS[t], "usage-") - dbefore) * 1e6 / max(res["n"], 1)
                                      if t in PROXIES else 0)
                res["cpu_us"] = (cpu(PIDS[t]) - before) / TICK * 1e6 / max(res["n"], 1) if PIDS[t] else 0
                res["user_us"] = (cpu_split(PIDS[t])[0] - ubefore) / TICK * 1e6 / max(res["n"], 1) if PIDS[t] else 0
                res["relay_us"] = (wafter - wbefore) * 1e6 / max(res["n"], 1) if t in PROXIES else res["cpu_us"]
                results[name][t].append(res)
                time.sleep(0.5)
        print(f"round {r + 1}/{ROUNDS} done", file=sys.stderr)
    med = lambda xs: statistics.median(xs)
    print(f"\nllmproxy vs nginx{' over TLS 1.3 (ECDSA P-256)' if TLS else ''}, one worker each on core 0; load generator and mock on core 1; {DUR}s runs, median of {ROUNDS}")
    print(f"{'scenario':28} {'target':9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'+p50':>7} {'+p99':>7} {'CPU us/req':>10} {'errors':>7}")
    for name, _ in SCENARIOS:
        row = {t: {k: med([x[k] for x in results[name][t]]) for k in ("rps", "p50", "p99", "cpu_us", "relay_us", "user_us")} for t in PORTS}
        for t in PORTS:
            x = row[t]; d = row["direct"]
            errs = sum(r["errors"] for r in results[name][t])
            added = (f"{x['p50'] - d['p50']:7.3f} {x['p99'] - d['p99']:7.3f}") if t != "direct" else f"{'-':>7} {'-':>7}"
            cpu_s = f"{x['cpu_us']:10.1f}" if t != "direct" else f"{'-':>10}"
            print(f"{name:28} {t:9} {x['rps']:9.0f} {x['p50']:8.3f} {x['p99']:8.3f} {added} {cpu_s} {errs:7d}")
        # Ratios are taken round by round (the two runs of a round are next to each other
        # in time, so a slow spell of the machine hits both), then the median.
        if NOBILL:
            diffs = [l["cpu_us"] - n["cpu_us"] for l, n in zip(results[name]["llmproxy"], results[name]["nobill"])]
            p99s = [l["p99"] - n["p99"] for l, n in zip(results[name]["llmproxy"], results[name]["nobill"])]
            print(f"{'':28} {'billing':9} llmproxy - nobill, CPU per request (median of per-round differences): "
                  f"{med(diffs):+.2f} us (rounds {' '.join(f'{d:+.1f}' for d in diffs)}); p99 {med(p99s):+.3f} ms")
            dl = [l["delivery_us"] for l in results[name]["llmproxy"]]
            wd = [l["relay_us"] - n["relay_us"] for l, n in zip(results[name]["llmproxy"], results[name]["nobill"])]
            print(f"{'':28} {'':9} of which llmproxy's delivery threads (sender, spool writer), same process: "
                  f"{med(dl):.2f} us (rounds {' '.join(f'{d:.2f}' for d in dl)}); worker thread - nobill's: "
                  f"{med(wd):+.2f} us (rounds {' '.join(f'{d:+.1f}' for d in wd)})")
        for who in [t for t in PROXIES if t in PORTS and t != "nobill"]:
            pairs = list(zip(results[name][who], results[name]["nginx"]))
            ratio_rps = med([l["rps"] / n["rps"] for l, n in pairs])
            ratio_cpu = med([l["cpu_us"] / n["cpu_us"] for l, n in pairs if n["cpu_us"]] or [float("nan")])
            ratio_relay = med([l["relay_us"] / n["cpu_us"] for l, n in pairs if n["cpu_us"]] or [float("nan")])
            print(f"{'':28} {'ratio':9} {who}/nginx (median of per-round ratios) req/s {ratio_rps:.2f}x, CPU per request {ratio_cpu:.2f}x "
                  f"(worker thread alone {row[who]['relay_us']:.1f} us/req, {ratio_relay:.2f}x)")
            hpairs = [(l, h) for l, h in zip(results[name][who], results[name]["haproxy"]) if h["cpu_us"]]
            if hpairs:
                print(f"{'':28} {'':9} {who}/haproxy: req/s {med([l['rps'] / h['rps'] for l, h in hpairs]):.2f}x, "
                      f"CPU per request {med([l['cpu_us'] / h['cpu_us'] for l, h in hpairs]):.2f}x")
            rounds = " ".join(f"{l['cpu_us'] / n['cpu_us']:.2f}" for l, n in pairs if n["cpu_us"])
            # The p99 added, round by round against the direct run of the same round (a
            # median of differences, steadier than the difference of medians above).
            d = results[name]["direct"]
            added = {t: [x["p99"] - y["p99"] for x, y in zip(results[name][t], d)] for t in (who, "nginx")}
            print(f"{'':28} {'':9} per round: CPU {rounds}x; "
                  f"user-space {row[who]['user_us']:.1f} us/req (nginx {row['nginx']['user_us']:.1f}), "
                  f"kernel {row[who]['cpu_us'] - row[who]['user_us']:.1f} (nginx {row['nginx']['cpu_us'] - row['nginx']['user_us']:.1f}); "
                  f"haproxy user-space {row['haproxy']['user_us']:.1f}, kernel {row['haproxy']['cpu_us'] - row['haproxy']['user_us']:.1f}")
            print(f"{'':28} {'':9} p99 added, median of per-round differences: {med(added[who]):.3f} ms (nginx {med(added['nginx']):.3f}); "
                  f"rounds {' '.join(f'{a:.3f}' for a in added[who])}")
        print()
    print(f"peak RSS: nginx worker {rss_kib(nginx_worker) / 1024:.1f} MiB, haproxy {rss_kib(haproxy.pid) / 1024:.1f} MiB, "
          f"llmproxy {rss_kib(proxy.pid) / 1024:.1f} MiB")
finally:
    cleanup()
