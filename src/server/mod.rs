//! Workers: one pinned OS thread per core, each with its own monoio runtime (io_uring,
//! or epoll where io_uring is unavailable), its own SO_REUSEPORT listener and its own
//! upstream pool. Nothing on the hot path is written by two workers: each counts in a
//! metrics shard of its own, batches its usage records, and only reads shared state
//! (health flags, the config generation) apart from one channel send per batch.

pub mod conn;
mod endpoints;
mod recycle;

use crate::access_log::AccessLog;
use crate::auth::Auth;
use crate::config::{Config, parse_listen};
use crate::delivery::{self, RecordSink};
use crate::metrics::{Metrics, WorkerMetrics};
use crate::tick::{self, TICK};
use crate::upstream::health::HealthChecker;
use crate::upstream::{Backend, Upstreams};
use log::{error, info, warn};
use monoio::net::{ListenerOpts, TcpListener, TcpStream};
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{
    AtomicBool, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The part of the configuration SIGHUP can replace: keys, backends and limits.
pub struct Live {
    pub config: Config,
    pub backends: Arc<[Arc<Backend>]>,
    /// Shared with the limits sync thread.
    pub auth: Arc<Auth>,
    /// The listener's TLS (`tls`), read from its files at start and at each reload.
    pub tls: Option<Arc<crate::tls::Listener>>,
}

/// What every worker reads.
pub struct Shared {
    /// Replaced by a reload; workers re-read it only when `generation` moves, so the
    /// lock is never taken on the request path.
    live: Mutex<Arc<Live>>,
    generation: AtomicU64,
    config_path: String,
    pub metrics: Arc<Metrics>,
    pub sink: RecordSink,
    pub access_log: AccessLog,
    pub shutdown: Arc<AtomicBool>,
}

impl Shared {
    pub fn live(&self) -> Arc<Live> {
        match self.live.lock() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// SIGHUP: load the file again and swap in keys, backends and limits. An invalid
    /// file is refused and the running configuration stays.
    pub fn reload(&self) {
        let mut cfg = match Config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                error!("reload refused, keeping the running configuration: {e}");
                return;
            }
        };
        let old = self.live();
        let backends = match Backend::build(&cfg, &old.backends, &self.metrics) {
            Ok(b) => b,
            Err(e) => {
                error!("reload refused, keeping the running configuration: {e}");
                return;
            }
        };
        let fixed = [
            ("listen", cfg.listen != old.config.listen),
            ("workers", cfg.workers != old.config.workers),
            ("usage_hook", cfg.usage_hook != old.config.usage_hook),
            ("health_check", cfg.health_check != old.config.health_check),
            ("access_log", cfg.access_log != old.config.access_log),
            ("limits_store", cfg.limits_store != old.config.limits_store),
            (
                "limits_sync_interval",
                cfg.limits_sync_interval != old.config.limits_sync_interval,
            ),
            (
                "limits_fail_closed",
                cfg.limits_fail_closed != old.config.limits_fail_closed,
            ),
            (
                "limits_state_file",
                cfg.limits_state_file != old.config.limits_state_file,
            ),
        ];
        for (key, changed) in fixed {
            if changed {
                warn!(
                    "reload: {key} changes take effect at the next restart; keeping the running value"
                );
            }
        }
        cfg.listen = old.config.listen.clone();
        cfg.workers = old.config.workers;
        cfg.usage_hook = old.config.usage_hook.clone();
        cfg.health_check = old.config.health_check.clone();
        cfg.access_log = old.config.access_log.clone();
        cfg.limits_store = old.config.limits_store.clone();
        cfg.limits_sync_interval = old.config.limits_sync_interval;
        cfg.limits_fail_closed = old.config.limits_fail_closed;
        cfg.limits_state_file = old.config.limits_state_file.clone();
        let tls = match (&cfg.tls, &old.tls) {
            (Some(t), Some(_)) => match crate::tls::listener(t) {
                Ok(l) => {
                    info!(
                        "tls: {} loaded (subject {}, expires in {} days)",
                        t.cert,
                        l.cert.subject,
                        l.cert.seconds_left() / 86_400
                    );
                    self.metrics
                        .tls_cert_not_after
                        .store(l.cert.not_after, Relaxed);
                    Some(Arc::new(l))
                }
                Err(e) => {
                    error!("reload refused, keeping the running configuration: {e}");
                    return;
                }
            },
            (None, None) => None,
            _ => {
                warn!(
                    "reload: turning tls on or off takes effect at the next restart; keeping the running value"
                );
                cfg.tls = old.config.tls.clone();
                old.tls.clone()
            }
        };
        crate::log::set_level(cfg.log_level);
        let live = Live {
            tls,
            auth: Arc::new(Auth::new(&cfg.auth, Some(&old.auth))),
            backends: backends.into(),
            config: cfg,
        };
        info!(
            "configuration reloaded: {} backends, {} keys",
            live.backends.len(),
            live.config.auth.keys.len()
        );
        match self.live.lock() {
            Ok(mut l) => *l = Arc::new(live),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(live),
        }
        self.generation.fetch_add(1, Release);
    }
}

/// A worker's snapshot of the live configuration with its own balancing state and
/// pool. A request holds its `Rc<View>` from start to end, so a reload never changes
/// anything under a request in flight.
pub struct View {
    pub live: Arc<Live>,
    pub up: Upstreams,
}

/// One worker's state, owned by its thread (`Rc`, `Cell`: no locks).
pub struct Worker {
    pub id: usize,
    pub shared: Arc<Shared>,
    view: RefCell<Rc<View>>,
    seen: Cell<u64>,
    pub conns: Cell<usize>,
    /// Set once the whole process has drained: idle connections then close.
    pub closing: Cell<bool>,
    /// Set when shutdown_timeout expired: in-flight relays stop (with records).
    pub cutting: Cell<bool>,
    /// This worker's usage records, batched for the delivery threads.
    pub records: delivery::WorkerSink,
    /// What this worker counts for /metrics (its own shard).
    pub stats: WorkerMetrics,
    /// Accepted sockets inherit `TCP_NODELAY` from the listener (set there once);
    /// false if that failed, and each connection sets it itself.
    pub nodelay_inherited: bool,
}

impl Worker {
    pub fn shutting_down(&self) -> bool {
        self.shared.shutdown.load(Relaxed)
    }

    /// The current view; rebuilt here (once per reload) when the generation moved.
    pub fn view(&self) -> Rc<View> {
        let generation = self.shared.generation.load(Acquire);
        if generation != self.seen.get() {
            let live = self.shared.live();
            let up = Upstreams::new(live.backends.clone(), Some(&self.view.borrow().up));
            *self.view.borrow_mut() = Rc::new(View { live, up });
            self.seen.set(generation);
        }
        self.view.borrow().clone()
    }
}

/// Raises the open-file limit to its hard maximum (as nginx's worker_rlimit_nofile
/// would be set by hand): every proxied request holds two sockets. Warns when even that
/// is short of the connections `limits.max_connections` allows, since connections
/// beyond it would fail with "Too many open files", and says how many requests fit.
fn raise_fd_limit(max_connections: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    // An idle keep-alive connection holds one file, a request in flight two.
    let room = lim.rlim_cur.saturating_sub(64);
    if room < max_connections {
        warn!(
            "open-file limit is {} but limits.max_connections allows {max_connections} connections in all: connections beyond ~{room} fail (raise it: ulimit -n, systemd LimitNOFILE=; or lower limits.max_connections)",
            lim.rlim_cur
        );
    } else if room < max_connections * 2 {
        info!(
            "open-file limit {}: up to ~{} requests in flight at once (each holds two sockets)",
            lim.rlim_cur,
            room / 2
        );
    }
}

/// Runs the proxy until SIGTERM/SIGINT, then drains and delivers. Returns an error
/// message for start-up failures.
pub fn run(config: Config, config_path: &str) -> Result<(), String> {
    let addr = parse_listen(&config.listen)?;
    let workers = config.worker_count();
    let metrics = Arc::new(Metrics::new(workers));
    let backends: Arc<[Arc<Backend>]> = Backend::build(&config, &[], &metrics)?.into();
    let (sink, delivery_threads) = if config.usage_hook.enabled {
        let (sink, handles) = delivery::start(&config.usage_hook, metrics.clone())?;
        info!(
            "usage records go to {} (spool: {})",
            crate::url::redact(&config.usage_hook.url),
            if config.usage_hook.spool_dir.is_empty() {
                "DISABLED"
            } else {
                &config.usage_hook.spool_dir
            }
        );
        (sink, handles)
    } else {
        warn!("usage_hook is disabled: usage records are counted in /metrics but not delivered");
        (RecordSink::disabled(metrics.clone()), Vec::new())
    };

    let access_log = AccessLog::start(&config.access_log, metrics.clone())?;
    raise_fd_limit(workers as u64 * config.limits.max_connections as u64);
    let health_cfg = config.health_check.clone();
    let connect_timeout = config.limits.connect_timeout.0;
    let tls = match &config.tls {
        Some(t) => {
            let l = crate::tls::listener(t)?;
            let days = l.cert.seconds_left() / 86_400;
            if days < 14 {
                warn!(
                    "tls: the certificate {} ({}) expires in {days} days",
                    t.cert, l.cert.subject
                );
            }
            metrics.tls_cert_not_after.store(l.cert.not_after, Relaxed);
            Some(Arc::new(l))
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        live: Mutex::new(Arc::new(Live {
            tls,
            auth: Arc::new(Auth::new(&config.auth, None)),
            config,
            backends,
        })),
        generation: AtomicU64::new(0),
        config_path: config_path.to_string(),
        metrics,
        sink,
        access_log,
        shutdown: Arc::new(AtomicBool::new(false)),
    });
    // Budgets spent before this start are read before the first request.
    let source = shared.clone();
    let limits_sync = crate::limits::store::start(
        &shared.live().config,
        Box::new(move || source.live().auth.clone()),
        shared.metrics.clone(),
    )?;
    watch_signals(shared.clone())?;

    let source = shared.clone();
    let mut checker = HealthChecker::new(
        Box::new(move || source.live().backends.clone()),
        health_cfg,
        connect_timeout,
    );
    checker.check_once();
    let health_stop = Arc::new(AtomicBool::new(false));
    let health_thread = {
        let stop = health_stop.clone();
        std::thread::Builder::new()
            .name("health-check".into())
            .spawn(move || checker.run(stop))
            .map_err(|e| format!("cannot start the health checker: {e}"))?
    };

    // The CPUs this process may run on (taskset, a container's cpuset, isolcpus
    // layouts), read on this thread before any worker pins itself: worker i goes to
    // the i-th of them, never outside the set the operator allowed.
    let cpus = core_affinity::get_core_ids().unwrap_or_default();
    let cpu_of = |id: usize| (!cpus.is_empty()).then(|| cpus[id % cpus.len()]);

    // Worker 0 binds first, so `listen: "host:0"` gives every worker the same port.
    let mut handles = Vec::with_capacity(workers);
    let mut bound = addr;
    for id in 0..workers {
        let (tx, rx) = std::sync::mpsc::channel();
        let s = shared.clone();
        let cpu = cpu_of(id);
        let h = std::thread::Builder::new()
            .name(format!("worker-{id}"))
            .spawn(move || worker_thread(id, cpu, s, bound, tx))
            .map_err(|e| format!("cannot start worker {id}: {e}"))?;
        handles.push(h);
        match rx.recv() {
            Ok(Ok(a)) => bound = a,
            Ok(Err(e)) => {
                shared.shutdown.store(true, Relaxed);
                return Err(e);
            }
            Err(_) => return Err(format!("worker {id} failed to start")),
        }
    }
    let driver = if monoio::utils::detect_uring() {
        "io_uring"
    } else {
        "epoll (io_uring unavailable)"
    };
    let pinned: Vec<String> = (0..workers)
        .filter_map(|id| cpu_of(id).map(|c| c.id.to_string()))
        .collect();
    info!(
        "llmproxy listening on {bound} ({workers} workers on CPUs {}, {driver})",
        pinned.join(",")
    );

    for h in handles {
        if h.join().is_err() {
            error!("a worker thread panicked");
        }
    }
    if let Some(sync) = limits_sync {
        sync.stop();
    }
    info!("workers stopped; delivering queued usage records");
    health_stop.store(true, Relaxed);
    let _ = health_thread.join();
    shared.sink.close();
    for h in delivery_threads {
        let _ = h.join();
    }
    info!("shutdown complete");
    Ok(())
}

/// SIGTERM/SIGINT: graceful shutdown; a second one spools what is queued and exits
/// at once. SIGHUP: reload the configuration file.
fn watch_signals(shared: Arc<Shared>) -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    info!("SIGHUP: reloading {}", shared.config_path);
                    shared.reload();
                    continue;
                }
                if !shared.shutdown.swap(true, Relaxed) {
                    info!("signal {sig}: shutting down (in-flight requests finish; send it again to exit at once)");
                    continue;
                }
                warn!("second signal: spooling queued usage records and exiting now");
                let sink = &shared.sink;
                sink.close();
                let end = Instant::now() + std::time::Duration::from_secs(3);
                while sink.queue_depth() > 0 && Instant::now() < end {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                // The spool writer commits within one 50 ms turn of its loop.
                std::thread::sleep(std::time::Duration::from_millis(200));
                std::process::exit(1);
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}

/// Pins the calling worker thread to `cpu`, one of the CPUs the process may use.
fn pin_to(id: usize, cpu: Option<core_affinity::CoreId>) {
    if let Some(cpu) = cpu
        && !core_affinity::set_for_current(cpu)
    {
        warn!("worker {id}: cannot pin to CPU {}", cpu.id);
    }
}

fn worker_thread(
    id: usize,
    cpu: Option<core_affinity::CoreId>,
    shared: Arc<Shared>,
    addr: SocketAddr,
    ready: std::sync::mpsc::Sender<Result<SocketAddr, String>>,
) {
    pin_to(id, cpu);
    // Cooperative task running: completions for this ring are handled when the worker
    // next enters the kernel (it does, constantly) instead of by interrupting it with
    // an IPI; a single issuer lets the kernel skip locking. Kernels without these
    // flags (before 6.0) get a plain ring.
    let mut urb = io_uring::IoUring::builder();
    urb.setup_coop_taskrun().setup_single_issuer();
    let rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .with_entries(4096)
        .uring_builder(urb)
        .build()
        .or_else(|_| {
            monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .enable_timer()
                .with_entries(4096)
                .build()
        });
    let mut rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("worker {id}: cannot build the runtime: {e}")));
            return;
        }
    };
    rt.block_on(async move {
        let opts = ListenerOpts::new().reuse_port(true).backlog(4096);
        let listener = match TcpListener::bind_with_config(addr, &opts) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(format!("listen {addr}: {e}")));
                return;
            }
        };
        let nodelay_inherited = tune_listener(&listener);
        let _ = ready.send(listener.local_addr().map_err(|e| e.to_string()));
        let Some(stats) = shared.metrics.claim(id) else {
            let _ = ready.send(Err(format!("worker {id}: no metrics shard of its own")));
            return;
        };
        let live = shared.live();
        let records = shared.sink.worker(stats.clone());
        let w = Rc::new(Worker {
            id,
            view: RefCell::new(Rc::new(View {
                up: Upstreams::new(live.backends.clone(), None),
                live,
            })),
            seen: Cell::new(shared.generation.load(Acquire)),
            shared,
            conns: Cell::new(0),
            closing: Cell::new(false),
            cutting: Cell::new(false),
            records,
            stats,
            nodelay_inherited,
        });
        let hand_over = w.clone();
        monoio::spawn(async move { hand_over.records.hand_over_loop().await });
        accept_loop(&w, listener).await;
        w.records.finish();
    });
}

async fn accept_loop(w: &Rc<Worker>, listener: TcpListener) {
    {
        let mut accept = std::pin::pin!(listener.accept());
        loop {
            // The accept first, then the worker's tick: no timer made per accepted
            // connection.
            match tick::first_of(accept.as_mut(), tick::next_tick()).await {
                tick::Either::Done(r) => {
                    match r {
                        Ok((stream, _)) => {
                            admit(w, stream, w.view().live.config.limits.max_connections)
                        }
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            warn!("worker {}: accept failed: {e}", w.id);
                            monoio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                    }
                    // Checked here too: under constant connection churn the accept
                    // branch is always ready and the tick would never be looked at.
                    if w.shutting_down() {
                        break;
                    }
                    accept.set(listener.accept());
                }
                tick::Either::Tick => {
                    if w.shutting_down() {
                        break;
                    }
                }
            }
        }
    }
    drop(listener);
    let deadline = Instant::now() + w.view().live.config.limits.shutdown_timeout.0;
    // Requests being handled, all workers together: idle connections stay open (a
    // request sent on one meanwhile is answered 503 rather than reset) until none is.
    let busy = || w.shared.metrics.busy();
    while busy() > 0 && Instant::now() < deadline {
        monoio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if busy() > 0 {
        warn!(
            "worker {}: requests still in flight after shutdown_timeout; cutting them (their records say outcome timeout)",
            w.id
        );
        w.cutting.set(true);
        let end = Instant::now() + TICK * 5;
        while busy() > 0 && Instant::now() < end {
            monoio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    w.closing.set(true);
    // Idle connections wait for their deadline, not every tick: wake them to close.
    tick::wake_all();
    let deadline = Instant::now() + TICK * 3;
    while w.conns.get() > 0 && Instant::now() < deadline {
        monoio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

fn admit(w: &Rc<Worker>, stream: TcpStream, max: usize) {
    if w.conns.get() >= max {
        w.shared.metrics.connections_rejected.fetch_add(1, Relaxed);
        let w = w.clone();
        monoio::spawn(async move { conn::reject(&w, stream).await });
        return;
    }
    w.conns.set(w.conns.get() + 1);
    w.stats.connection_opened();
    let w = w.clone();
    monoio::spawn(async move {
        conn::serve(&w, stream).await;
        w.conns.set(w.conns.get() - 1);
        w.stats.connection_closed();
    });
}

/// How long the kernel holds a new connection before handing it to `accept` without
/// its first bytes (`TCP_DEFER_ACCEPT`; nginx's `deferred` and haproxy's
/// `defer-accept` use the same 1 s).
const DEFER_ACCEPT_SECS: libc::c_int = 1;

/// Socket options set once on the listener, for every connection it accepts:
/// - `TCP_DEFER_ACCEPT`: the kernel completes an accept only once the caller's first
///   bytes have come (or after `DEFER_ACCEPT_SECS`), so an accepted connection is read
///   at once with a plain `recv`, with no io_uring read to submit, arm for cancelling
///   and complete first (`Io::expect_bytes`). benches/load.sh churn, same run: 44.4 ->
///   42.7 and 58.8 -> 55.4 us a connection. A silent caller costs a kernel request
///   socket, not a task, until it speaks.
/// - `TCP_NODELAY`, which accepted sockets inherit on Linux: one `setsockopt` a
///   connection fewer. Returns whether it was set (if not, each connection sets it).
///
/// Best effort: without the deferral a connection's first read waits as any other.
fn tune_listener(listener: &impl std::os::fd::AsRawFd) -> bool {
    let fd = listener.as_raw_fd();
    let set = |option: libc::c_int, value: libc::c_int| {
        // SAFETY: setsockopt on the listener's own fd with a valid int and its size.
        let done = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                option,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        } == 0;
        done.then_some(()).ok_or_else(std::io::Error::last_os_error)
    };
    if let Err(e) = set(libc::TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECS) {
        warn!(
            "cannot set TCP_DEFER_ACCEPT on the listener ({e}): connections are accepted before their first bytes"
        );
    }
    set(libc::TCP_NODELAY, 1).is_ok()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;

    fn int_option(fd: i32, option: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into a valid int with its size.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                option,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        value
    }

    #[test]
    fn the_listener_defers_accepts_and_its_connections_inherit_nodelay() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(super::tune_listener(&l));
        assert!(int_option(l.as_raw_fd(), libc::TCP_DEFER_ACCEPT) > 0);
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let (a, _) = l.accept().unwrap();
        // What lets `serve` skip its own setsockopt.
        assert_eq!(int_option(a.as_raw_fd(), libc::TCP_NODELAY), 1);
    }
}
