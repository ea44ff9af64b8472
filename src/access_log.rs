//! The access log: one JSON line per request, formatted and written by its own thread
//! so a worker only pays for a `try_send`. Keys appear masked whatever
//! `usage_hook.api_key_format` says, and paths without their query string (queries can
//! carry secrets).

use crate::metrics::Metrics;
use crate::usage::{Outcome, UsageSource};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{error, warn};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

/// Entries waiting for the log thread; beyond this they are counted and dropped
/// (the usage record, not the access log, is what billing relies on).
const QUEUE: usize = 16 * 1024;

pub struct AccessEntry {
    pub timestamp: SystemTime,
    pub request_id: String,
    pub client_request_id: Option<String>,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub stream: bool,
    pub user_id: String,
    pub api_key: String,
    pub model: String,
    pub backend: Option<String>,
    pub outcome: Option<Outcome>,
    pub usage_source: Option<UsageSource>,
    pub tokens: (u64, u64, u64),
    pub duration_us: u64,
    pub ttft_ms: Option<u64>,
}

#[derive(Clone)]
pub struct AccessLog {
    tx: Option<Sender<AccessEntry>>,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// `dest`: `stdout`, `off`, or a file path (appended to).
    pub fn start(dest: &str, metrics: Arc<Metrics>) -> Result<AccessLog, String> {
        let out: Box<dyn Write + Send> = match dest {
            "off" | "" => return Ok(AccessLog { tx: None, metrics }),
            "stdout" => Box::new(std::io::stdout()),
            path => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("access_log: cannot open {path}: {e}"))?,
            ),
        };
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(rx, out))
            .map_err(|e| format!("cannot start the access log thread: {e}"))?;
        Ok(AccessLog {
            tx: Some(tx),
            metrics,
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn log(&self, e: AccessEntry) {
        if let Some(tx) = &self.tx
            && let Err(TrySendError::Full(_)) = tx.try_send(e)
        {
            self.metrics.access_log_dropped.fetch_add(1, Relaxed);
        }
    }
}

fn write_loop(rx: Receiver<AccessEntry>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut failed = false;
    loop {
        let e = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(e) => e,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                let _ = out.flush();
                continue;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        };
        let line = serde_json::json!({
            "ts": humantime::format_rfc3339_millis(e.timestamp).to_string(),
            "request_id": e.request_id,
            "client_request_id": e.client_request_id,
            "method": e.method,
            "path": e.path,
            "status": e.status,
            "stream": e.stream,
            "user_id": e.user_id,
            "api_key": e.api_key,
            "model": e.model,
            "backend": e.backend,
            "outcome": e.outcome.map(Outcome::as_str),
            "usage_source": e.usage_source.map(UsageSource::as_str),
            "prompt_tokens": e.tokens.0,
            "completion_tokens": e.tokens.1,
            "total_tokens": e.tokens.2,
            "duration_ms": e.duration_us as f64 / 1000.0,
            "ttft_ms": e.ttft_ms,
        });
        let res = writeln!(out, "{line}");
        if rx.is_empty() {
            let _ = out.flush();
        }
        match res {
            Err(err) if !failed => {
                failed = true;
                error!("access log: write failed: {err}");
            }
            Ok(()) if failed => {
                failed = false;
                warn!("access log: writing again");
            }
            _ => {}
        }
    }
    let _ = out.flush();
}
