"""Records per second through each usage sink: the webhook (the example receiver) and
RabbitMQ (a local rabbitmq-server, publisher confirms, durable quorum queue). See
benches/sinks.sh.

For each sink: a proxy whose sink is unreachable spools N records (load from oha), is
stopped, and a proxy on the same spool with the sink reachable delivers the backlog.
The time and the proxy's CPU to drain it give records/s and CPU per record: the rate a
sink catches up at, which bounds the request rate it keeps up with. The proxy is pinned
to core 0, everything else to core 1. Every server listens on 127.0.0.1 only.
"""
import os, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
# usage_hook.pipeline: records in flight per batch (PIPELINE=1024 benches/sinks.sh);
# unset, each sink's default (1,024 POSTs for the webhook, 128 publishes for RabbitMQ).
PIPELINE = os.environ.get("PIPELINE")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
W = tempfile.mkdtemp(prefix="llmproxy-sinks-")
TICK = os.sysconf("SC_CLK_TCK")
RABBIT = "/usr/lib/rabbitmq/bin/rabbitmq-server"
procs = []


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def wait_port(port, what, secs=20):
    end = time.time() + secs
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close(); return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not start on {port}")


def start(cmd, cpu, log, env=None):
    p = subprocess.Popen(["taskset", "-c", str(cpu)] + cmd, stdout=open(f"{W}/{log}", "w"),
                         stderr=subprocess.STDOUT, env=env)
    procs.append(p)
    return p


def metric(port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def proxy(sink_url, spool, amqp=""):
    port = free_port()
    cfg = f"{W}/proxy-{port}.yaml"
    pipeline = f"  pipeline: {int(PIPELINE)}" if PIPELINE else ""
    open(cfg, "w").write(f"""listen: "127.0.0.1:{port}"
workers: 1
access_log: "off"
backends:
  - url: "http://127.0.0.1:{MOCK}"
usage_hook:
  enabled: true
  url: "{sink_url}"
  timeout: 2s
  spool_dir: "{spool}"
{pipeline}
{amqp}""")
    p = start([f"{REL}/llmproxy", "--config", cfg], 0, f"proxy-{port}.log")
    wait_port(port, "llmproxy")
    return p, port


def stop(p):
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)


def drain(name, sink_url, amqp=""):
    spool = f"{W}/spool-{name}"
    # 1. Spool N records with the sink unreachable (a closed port).
    p, port = proxy("http://127.0.0.1:1/closed", spool)
    subprocess.run(["taskset", "-c", "1", "oha", "--no-tui", "-n", str(N), "-c", "32", "-m", "POST",
                    "-H", "content-type: application/json", "-d",
                    '{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":8}',
                    f"http://127.0.0.1:{port}/v1/chat/completions"], check=True, stdout=subprocess.DEVNULL)
    while metric(port, "llmproxy_usage_spooled_total") < N:
        time.sleep(0.1)
    stop(p)
    # 2. Deliver the backlog.
    t0 = time.time()
    p, port = proxy(sink_url, spool, amqp)
    c0 = cpu_seconds(p.pid)
    while metric(port, "llmproxy_webhook_success_total") < N:
        time.sleep(0.05)
        if time.time() - t0 > 600:
            sys.exit(f"{name}: backlog not delivered in 10 min; see {W}")
    secs = time.time() - t0
    cpu = cpu_seconds(p.pid) - c0
    stop(p)
    return N / secs, cpu / N * 1e6


try:
    MOCK, HOOK = free_port(), free_port()
    start([f"{REL}/examples/mock_vllm", "--port", str(MOCK), "--prerender", "--tokens", "8", "--models", "mock-model"], 1, "mock.log")
    start([f"{REL}/examples/webhook_receiver", "--port", str(HOOK), "--log", "none", "--no-store"], 1, "receiver.log")
    wait_port(MOCK, "mock"); wait_port(HOOK, "receiver")
    results = [("webhook (example receiver)",) + drain("webhook", f"http://127.0.0.1:{HOOK}/usage")]
    if os.path.exists(RABBIT):
        RABBIT_PORT, epmd, dist = free_port(), free_port(), free_port()
        R = f"{W}/rabbit"; os.makedirs(R)
        open(f"{R}/rabbitmq.conf", "w").write(f"listeners.tcp.1 = 127.0.0.1:{RABBIT_PORT}\nloopback_users = none\n")
        open(f"{R}/enabled_plugins", "w").write("[].\n")
        env = dict(os.environ, HOME=R, RABBITMQ_NODENAME=f"sinks-{RABBIT_PORT}@localhost",
                   RABBITMQ_NODE_PORT=str(RABBIT_PORT), RABBITMQ_DIST_PORT=str(dist), ERL_EPMD_PORT=str(epmd),
                   ERL_EPMD_ADDRESS="127.0.0.1", RABBITMQ_MNESIA_BASE=f"{R}/mnesia", RABBITMQ_LOG_BASE=f"{R}/log",
                   RABBITMQ_CONFIG_FILE=f"{R}/rabbitmq.conf", RABBITMQ_ENABLED_PLUGINS_FILE=f"{R}/enabled_plugins",
                   RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}")
        start([RABBIT], 1, "rabbit.log", env)
        wait_port(RABBIT_PORT, "rabbitmq-server", 90)
        url = f"amqp://guest:guest@127.0.0.1:{RABBIT_PORT}/%2f"
        results.append(("RabbitMQ, confirms, quorum queue",) + drain("amqp", url, "  amqp: {exchange: bench}\n"))
        EPMD_ENV = env
    else:
        print("rabbitmq-server is not installed: the AMQP sink is not measured", file=sys.stderr)
    print(f"\n{N} spooled records delivered by one proxy (pipeline {PIPELINE or 'default'}), proxy on core 0, sink on core 1")
    print(f"{'sink':36} {'records/s':>10} {'proxy CPU us/record':>20}")
    for name, rate, cpu in results:
        print(f"{name:36} {rate:10.0f} {cpu:20.1f}")
finally:
    for p in procs:
        try: p.send_signal(signal.SIGTERM)
        except Exception: pass
    for p in procs:
        try: p.wait(timeout=30)
        except Exception: p.kill()
    # The broker's own epmd: it refuses -kill while the node is still registered.
    if "EPMD_ENV" in globals():
        for _ in range(50):
            out = subprocess.run(["epmd", "-kill"], env=EPMD_ENV, capture_output=True, text=True)
            if "Killed" in out.stdout or (out.returncode != 0 and not out.stdout):
                break
            time.sleep(0.1)
    shutil.rmtree(W, ignore_errors=True)
