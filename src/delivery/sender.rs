//! The sender thread: spooled records (or, without a spool, the channel's) POSTed to
//! the webhook oldest first, pipelined, retried with backoff; the spool's cursor moves
//! only past what the webhook took or refused for good (dead letters). Once the spool
//! is delivered, the sender takes the workers' staging rings itself and POSTs their
//! records straight from there (`deliver_from_rings`), until a delivery fails.

use super::handover::Batch;
use super::spool::{self, Next, SpoolReader};
use super::stage::{RING_IDLE_TURN, RING_TURN, Rings, SenderTake};
use super::writer::SYNC_INTERVAL;
use super::{signing, webhook};
use crate::config::UsageHookConfig;
use crate::metrics::Metrics;
use crate::url::Url;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{error, info, warn};
use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};

/// A sender batch smaller than `pipeline` waits this long for more records first: at
/// low rates, one webhook round trip per ~30 ms rather than per commit window. Each
/// round trip costs the sender a wake-up (~80 us of CPU on the reference VM, most of it
/// the switch on a busy core): at 2,000 req/s, 10 ms cost 5-6 us a request and 25 ms
/// 2.5. It stays well under `SYNC_INTERVAL`, so a webhook that keeps up takes records
/// before they would need an fdatasync (see `writer::Unsynced`).
pub(super) const SEND_GATHER: Duration = Duration::from_millis(25);
/// A take the sender still holds unsettled this long after making it has its unsettled
/// records written to `held.jsonl` and fdatasync'd before the next POSTs: a power
/// loss cannot lose them while the webhook is slow (the window segments give). Else
/// the writer would fdatasync the rings themselves, and the workers would fault on
/// every ring page written back (measured: 0.02-0.035 faults a request at saturation).
const SECURE_AFTER: Duration = SYNC_INTERVAL.saturating_sub(Duration::from_millis(10));
/// A take of fewer records than this (under ~5,000-13,000 records a second) is a low
/// rate: the sender's next take comes `RING_IDLE_TURN` later rather than `RING_TURN`.
/// Each take costs a wake-up whatever its size (~100 us of CPU at 2,000 req/s on the
/// reference VM); the records wait in the rings, which survive a crash, and reach the
/// webhook within the idle turn, inside the window the segment path gives them.
const BUSY_TAKE: u64 = 512;
/// After the webhook failed a record, wait this long (doubling) before trying again.
pub(super) const STALL_BACKOFF: Duration = Duration::from_secs(1);
pub(super) const MAX_STALL_BACKOFF: Duration = Duration::from_secs(5);
/// Most records in one sender round, whatever `pipeline` x `batch` says: a round
/// from the spool (a catch-up) holds its records in memory, ~12 MiB at this size
/// (1,024 x 1,000 would be ~700 MiB).
const MAX_ROUND: usize = 16_384;
/// The batched sender keeps its arrays' buffers while they hold no more than this
/// (a round at saturation takes ~2 MiB; a catch-up round, up to `MAX_ROUND`
/// records, can take ~12 MiB and is not worth keeping).
const KEEP_ARRAYS: usize = 4 << 20;
/// At shutdown, spooled records are delivered for at most this long; the rest waits
/// in the spool for the next start.
pub(super) const SHUTDOWN_DELIVERY: Duration = Duration::from_secs(10);

pub(super) enum Delivery {
    Delivered,
    Refused(u16, String),
    Failed(String),
}

pub(super) enum Attempt {
    Delivered,
    Retryable(String),
    Permanent(u16, String),
}

pub(super) struct Outbox {
    /// Plain http:// webhooks: the lean pipelining client; https:// goes through ureq.
    plain: Option<webhook::PlainHttp>,
    /// `amqp://` and `amqps://`: RabbitMQ with publisher confirms (then no webhook).
    amqp: Option<super::amqp::Publisher>,
    /// Most records POSTed back to back before reading the answers.
    pipeline: usize,
    /// `usage_hook.batch`: records per POST, in a JSON array when above 1.
    batch: usize,
    /// The arrays' bodies, kept from one round to the next (up to `KEEP_ARRAYS`
    /// bytes): a fresh ~75 KiB buffer per array came from the kernel each time,
    /// and its page faults were a third of the batched sender's CPU.
    arrays: Vec<Vec<u8>>,
    agent: ureq::Agent,
    url: String,
    headers: Vec<(String, String)>,
    signer: Option<signing::Signer>,
    retries: u32,
    metrics: Arc<Metrics>,
    rng: u64,
}

impl Outbox {
    pub(super) fn new(cfg: &UsageHookConfig, metrics: Arc<Metrics>) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(cfg.timeout.0))
            .http_status_as_error(false)
            .user_agent("llmproxy")
            .build()
            .into();
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64);
        let mut headers: Vec<(String, String)> = cfg
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Credentials in the URL (`https://user:pw@host/...`) become Basic auth, the
        // same on both clients (the plain one used to drop them without a word); an
        // Authorization header the operator set wins.
        // Checked when the config was loaded.
        let parsed = Url::parse(&cfg.url).ok();
        let url = parsed
            .as_ref()
            .map_or_else(|| cfg.url.clone(), Url::without_credentials);
        if let Some(basic) = parsed.as_ref().and_then(Url::basic_auth)
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        {
            headers.push(("authorization".into(), basic));
        }
        // Checked when the config was loaded.
        let signer = cfg
            .signing_secret
            .as_deref()
            .and_then(|s| signing::Signer::parse(s).ok());
        let amqp = if cfg.is_amqp() {
            match super::amqp::Publisher::new(cfg) {
                Ok(p) => Some(p),
                Err(e) => {
                    error!("usage_hook: {e}; records stay in the spool");
                    None
                }
            }
        } else {
            None
        };
        Outbox {
            amqp,
            plain: parsed
                .as_ref()
                .and_then(|u| webhook::PlainHttp::new(u, &headers, signer.clone(), cfg.timeout.0)),
            pipeline: cfg.pipeline().max(1),
            batch: cfg.batch.max(1),
            arrays: Vec::new(),
            agent,
            url,
            headers,
            signer,
            retries: cfg.retry,
            metrics,
            rng: seed | 1,
        }
    }

    pub(super) fn run_memory(
        mut self,
        rx: Receiver<Batch>,
        queued: &AtomicUsize,
        closing: &AtomicBool,
    ) {
        loop {
            let batch = match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(b) => b,
                Err(RecvTimeoutError::Timeout) if closing.load(Relaxed) => break,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            queued.fetch_sub(batch.records, Relaxed);
            let lines: Vec<&[u8]> = batch
                .lines
                .split(|&c| c == b'\n')
                .filter(|l| !l.is_empty())
                .collect();
            for chunk in lines.chunks(self.batch) {
                let ids: Vec<Cow<str>> = chunk.iter().map(|l| record_id(l)).collect();
                let results = if self.batch > 1 {
                    self.deliver_arrays(chunk, &ids)
                } else {
                    vec![self.deliver(chunk[0], &ids[0])]
                };
                // A failure ends the answers; it covers the rest of the chunk (one POST).
                let mut why = String::new();
                for (i, (line, id)) in chunk.iter().zip(&ids).enumerate() {
                    match results.get(i) {
                        Some(Delivery::Delivered) => {}
                        Some(Delivery::Refused(status, excerpt)) => {
                            self.metrics.dead_letter.fetch_add(1, Relaxed);
                            error!(
                                "usage webhook refused {id} with {status} ({excerpt}); no spool; UNDELIVERED RECORD: {}",
                                String::from_utf8_lossy(line)
                            );
                        }
                        failed => {
                            if let Some(Delivery::Failed(w)) = failed {
                                why.clone_from(w);
                            }
                            self.metrics.records_dropped.fetch_add(1, Relaxed);
                            error!(
                                "{}: giving up on {id} ({why}); no spool; UNDELIVERED RECORD: {}",
                                self.sink_name(),
                                String::from_utf8_lossy(line)
                            );
                        }
                    }
                }
            }
        }
    }

    pub(super) fn run_spool(
        mut self,
        mut reader: SpoolReader,
        rings: Option<Arc<Rings>>,
        dir: &Path,
        closing: &AtomicBool,
    ) {
        let mut stall = Duration::ZERO;
        let mut closed_at: Option<Instant> = None;
        let shared = reader.shared();
        // Records delivered while catching up (after an outage, or left from before
        // this start) count as re-delivered from the spool.
        let mut catching_up = shared.backlog_bytes.load(Relaxed) > 0;
        // A round takes up to `pipeline` POSTs' worth of records (`round`).
        let round = self.round();
        let mut lines: Vec<Vec<u8>> = Vec::with_capacity(round.min(4096));
        let mut take = RingTake::default();
        // A take stuck in a POST round is made durable (the rings fdatasync'd) from
        // here, while the plain client waits; the spool writer then sleeps until a
        // worker or this thread wakes it instead of waking each turn to look (~36 us
        // a wake-up, 0.18 us a request at 2,000 req/s). The https and RabbitMQ
        // clients block inside their libraries: the writer keeps looking for them.
        if let Some(r) = rings.as_ref()
            && self.amqp.is_none()
            && let Some(plain) = self.plain.as_mut()
        {
            let watching = r.clone();
            plain.watch(Arc::new(move |after| watching.sync_if_late(after)));
            r.sender_watches();
        }
        loop {
            // A take left in flight at the last turn (`deliver_from_rings`): its
            // answers are in by now, and nothing else may use the connection before
            // they are read. Every way out of the loop passes here after a take.
            if take.in_flight
                && let Some(r) = rings.as_deref()
            {
                take.in_flight = false;
                r.holding(true);
                let answers = self.plain.as_mut().map(webhook::PlainHttp::finish);
                if let Err((why, id)) = self.settle_take(r, &mut take, dir, closing, answers) {
                    catching_up = true;
                    self.stall(&mut stall, &why, &id, closing);
                }
            }
            if closing.load(Relaxed) {
                // The writer takes the rings' last records (it waits for them).
                give_back(rings.as_deref());
                let at = *closed_at.get_or_insert_with(Instant::now);
                if at.elapsed() > SHUTDOWN_DELIVERY || !stall.is_zero() {
                    break;
                }
            }
            // A batch: the oldest record (waiting for one), then whatever else is
            // already spooled, up to `round`. Line buffers go back to the reader.
            reader.recycle(&mut lines);
            // Without rings, wait for the writer's next commit; with them, see first
            // whether the spool is delivered (under steady load a commit comes every
            // ring turn, so waiting would never find it so).
            let wait = match rings {
                Some(_) => Duration::ZERO,
                None => Duration::from_millis(100),
            };
            match reader.next(wait) {
                Next::Record(line) => lines.push(line),
                Next::Empty => {
                    self.metrics.spool_oldest_ms.store(0, Relaxed);
                    catching_up = false;
                    let Some(r) = rings.as_deref() else {
                        continue;
                    };
                    if !r.sender_takes() {
                        // Delivered: the rings' records may come straight here, from
                        // the writer's next turn on.
                        if !closing.load(Relaxed) {
                            r.ask_for_them();
                        }
                        reader.wait(Duration::from_millis(100));
                        continue;
                    }
                    // A take every ring turn: a round that took longer leaves no
                    // wait (takes that grew with each round held records longer).
                    // After a small take (a low rate) the next comes an idle turn
                    // later: fewer wake-ups, and a burst still wakes the sender early
                    // (the writer does, for a ring half full).
                    let began = Instant::now();
                    match self.deliver_from_rings(r, &mut take, dir, closing) {
                        Ok(0) => reader.wait(RING_IDLE_TURN),
                        Ok(n) => {
                            let turn = match n < BUSY_TAKE {
                                true => RING_IDLE_TURN,
                                false => RING_TURN,
                            };
                            if let Some(left) = turn.checked_sub(began.elapsed()) {
                                reader.wait(left);
                            }
                        }
                        Err((why, id)) => {
                            catching_up = true;
                            self.stall(&mut stall, &why, &id, closing);
                        }
                    }
                    continue;
                }
                Next::Closed => break,
            }
            // Records staged in rings reach the spool a ring turn at a time: what one
            // commit brought is all there is for a while, and waiting would only add
            // a wake-up.
            let gather = if shared.staged.load(Relaxed) {
                Duration::ZERO
            } else {
                SEND_GATHER
            };
            for gather in [Duration::ZERO, gather] {
                if lines.len() == round || !stall.is_zero() || closing.load(Relaxed) {
                    break;
                }
                std::thread::sleep(gather);
                while lines.len() < round {
                    match reader.next(Duration::ZERO) {
                        Next::Record(line) => lines.push(line),
                        _ => break,
                    }
                }
            }
            self.metrics
                .spool_oldest_ms
                .store(record_time_ms(&lines[0]), Relaxed);
            let ids: Vec<Cow<str>> = lines.iter().map(|l| record_id(l)).collect();
            let results = self.deliver_batch(&lines, &ids);
            for ((line, id), result) in lines.iter().zip(&ids).zip(results) {
                match result {
                    Delivery::Delivered => {
                        reader.ack();
                        if !stall.is_zero() {
                            info!(
                                "{} is taking records again; delivering the spool oldest first",
                                self.sink_name()
                            );
                            stall = Duration::ZERO;
                        }
                        if catching_up {
                            self.metrics.redelivered.fetch_add(1, Relaxed);
                        }
                    }
                    Delivery::Refused(status, excerpt) => {
                        if !self.dead_letter(dir, line, id, status, &excerpt) {
                            give_back(rings.as_deref());
                            std::thread::sleep(STALL_BACKOFF);
                            break;
                        }
                        reader.ack();
                    }
                    Delivery::Failed(why) => {
                        // The rings' records go to the segment meanwhile (the sender
                        // may have been handed them since it asked).
                        give_back(rings.as_deref());
                        catching_up = true;
                        self.stall(&mut stall, &why, id, closing);
                        break;
                    }
                }
            }
            reader.save();
            // Whatever was handed out and not acknowledged comes again, oldest first.
            reader.rewind();
        }
        let left = shared.backlog_bytes.load(Relaxed);
        if left > 0 {
            warn!(
                "usage delivery stopping with {left} bytes of records in the spool; they are delivered at the next start"
            );
        }
        info!("usage delivery stopped");
    }

    /// A round straight from the staging rings (the spool is delivered and the sender
    /// takes the rings): what the workers staged since the last round, POSTed as
    /// spooled records are, `pipeline` x `batch` at a time; each record's room in its
    /// ring is released once the webhook took it or it was dead-lettered. Nothing is
    /// written to a segment or read back. Returns the records taken; on a failure
    /// (or at shutdown), what is left is handed back to the writer, which writes it to
    /// the segment (then the spool path delivers it, oldest first): `Err` with why and
    /// the id of the record that failed.
    ///
    /// A take of one POST round to a plain webhook is left in flight when the socket
    /// took all of it: its answers are read at the next turn (in `run_spool`),
    /// when they are there, rather than after a sleep in `poll` now. That is one
    /// wake-up a take instead of two, and a wake-up was ~35 us of a take's ~107 at
    /// 2,000 req/s (docs/performance.md).
    fn deliver_from_rings(
        &mut self,
        rings: &Rings,
        take: &mut RingTake,
        dir: &Path,
        closing: &AtomicBool,
    ) -> Result<u64, (String, String)> {
        let taken = rings.take_for_sender(&mut take.records) as usize;
        if taken == 0 {
            return Ok(0);
        }
        let mut answers = None;
        if taken <= self.round()
            && self.batch == 1
            && self.amqp.is_none()
            && !closing.load(Relaxed)
            && let Some(plain) = self.plain.as_mut()
        {
            let records = &take.records;
            let ids: Vec<Cow<str>> = (0..taken).map(|i| record_id(records.line(i))).collect();
            let items: Vec<(&[u8], &str)> = (0..taken)
                .map(|i| records.line(i))
                .zip(&ids)
                .map(|(l, id)| (l, id.as_ref()))
                .collect();
            if plain.start(&items) {
                // Not held while in flight (the writer's ring sync and `held.jsonl`
                // count from when the answers are awaited).
                rings.holding(false);
                take.in_flight = true;
                return Ok(taken as u64);
            }
            answers = Some(plain.finish());
        }
        self.settle_take(rings, take, dir, closing, answers)
            .map(|_| taken as u64)
    }

    /// The take's POST rounds (the first already answered with `answers`, if given),
    /// settling each; returns the records settled (see `deliver_from_rings`).
    fn settle_take(
        &mut self,
        rings: &Rings,
        take: &mut RingTake,
        dir: &Path,
        closing: &AtomicBool,
        mut answers: Option<Vec<webhook::Answer>>,
    ) -> Result<u64, (String, String)> {
        let RingTake {
            records,
            rest,
            held,
            ..
        } = take;
        let took = Instant::now();
        let mut secured = false;
        let round = self.round();
        let (mut done, mut settled, mut failure) = (0, 0, None);
        while done < records.len() {
            if answers.is_none() && closing.load(Relaxed) {
                break;
            }
            if !secured && took.elapsed() >= SECURE_AFTER {
                secured = true;
                // Marked first: the writer's fdatasync of the rings would race this one.
                rings.secured(true);
                let wrote = held
                    .get_or_insert_with(|| spool::Held::open(dir))
                    .as_mut()
                    .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))
                    .and_then(|h| {
                        rest.clear();
                        records.rest(done, rest);
                        h.hold(rest)
                    });
                if let Err(e) = wrote {
                    error!("usage spool: cannot write the held records to {dir:?}/held.jsonl: {e}");
                    rings.secured(false);
                }
            }
            let chunk = done..records.len().min(done + round);
            let sent = answers.take();
            if let Some(a) = &sent
                && a.len() == chunk.len()
                && a.iter().all(webhook_took)
            {
                // A take POSTed whole and taken whole (the low-rate case): no record
                // needs its id again (it was ~5 % of the sender at 2,000 req/s).
                self.metrics
                    .webhook_success
                    .fetch_add(a.len() as u64, Relaxed);
                done = chunk.end;
                settled += a.len() as u64;
                rings.settle(records, done, false);
                continue;
            }
            let these: Vec<&[u8]> = chunk.clone().map(|i| records.line(i)).collect();
            self.metrics
                .spool_oldest_ms
                .store(record_time_ms(these[0]), Relaxed);
            let ids: Vec<Cow<str>> = these.iter().map(|l| record_id(l)).collect();
            let results = self.deliver_batch_answered(&these, &ids, sent);
            for ((line, id), result) in these.iter().zip(&ids).zip(results) {
                match result {
                    Delivery::Delivered => {}
                    Delivery::Refused(status, excerpt) => {
                        if !self.dead_letter(dir, line, id, status, &excerpt) {
                            failure = Some(("cannot write a dead letter".into(), id.to_string()));
                            break;
                        }
                    }
                    Delivery::Failed(why) => {
                        failure = Some((why, id.to_string()));
                        break;
                    }
                }
                done += 1;
                settled += 1;
            }
            if failure.is_none() && done < chunk.end {
                // Answers stop only at a failure; said, and not released unanswered.
                failure = Some(("no answer".into(), String::new()));
            }
            if failure.is_some() {
                break;
            }
            rings.settle(records, done, false);
        }
        let whole = done == records.len();
        rings.settle(records, done, !whole);
        if secured && let Some(Ok(held)) = held.as_mut() {
            held.clear();
        }
        if !whole {
            rings.give_back();
        }
        self.metrics.spooled.fetch_add(settled, Relaxed);
        self.metrics.direct.fetch_add(settled, Relaxed);
        failure.map_or(Ok(settled), Err)
    }

    /// A record the webhook refused for good goes to the dead-letter file; false if
    /// that could not be written (it stays where it is).
    fn dead_letter(&self, dir: &Path, line: &[u8], id: &str, status: u16, excerpt: &str) -> bool {
        match spool::dead_letter(dir, line) {
            Ok(()) => {
                self.metrics.dead_letter.fetch_add(1, Relaxed);
                error!(
                    "usage webhook refused {id} with {status} ({excerpt}); moved to {}",
                    dir.join("dead-letter.jsonl").display()
                );
                true
            }
            Err(e) => {
                error!("usage spool: cannot write dead letter for {id}: {e}; it stays spooled");
                false
            }
        }
    }

    /// The sink failed a record after its retries: wait (doubling, up to
    /// `MAX_STALL_BACKOFF`) before the spool is tried again.
    fn stall(&self, stall: &mut Duration, why: &str, id: &str, closing: &AtomicBool) {
        *stall = if stall.is_zero() {
            STALL_BACKOFF
        } else {
            (*stall * 2).min(MAX_STALL_BACKOFF)
        };
        warn!(
            "{} unavailable ({why}); {id} and later records wait in the spool, next try in {stall:?}",
            self.sink_name()
        );
        sleep_unless(*stall, closing);
    }

    /// What the log lines call the sink.
    fn sink_name(&self) -> &'static str {
        if self.url.starts_with("amqp") {
            "usage RabbitMQ sink"
        } else {
            "usage webhook"
        }
    }

    /// One record, with `retry` further attempts on retryable failures. With
    /// `usage_hook.batch` above 1, it goes as a one-element array, keyed by its id.
    pub(super) fn deliver(&mut self, body: &[u8], request_id: &str) -> Delivery {
        let d = if self.batch > 1 {
            let mut array = Vec::new();
            json_array(&mut array, &[body]);
            self.deliver_n(&array, request_id, 1)
        } else {
            self.deliver_n(body, request_id, 1)
        };
        if matches!(d, Delivery::Refused(..)) {
            self.metrics.webhook_failure.fetch_add(1, Relaxed);
        }
        d
    }

    /// One POST of `records` records (one, or an array), with `retry` further attempts
    /// on retryable failures. Success and final failure count every record; a refusal
    /// is counted by the caller (an array's is not final: its records go again alone).
    fn deliver_n(&mut self, body: &[u8], key: &str, records: u64) -> Delivery {
        let mut attempt = 0;
        loop {
            match self.post(body, key) {
                Attempt::Delivered => {
                    self.metrics.webhook_success.fetch_add(records, Relaxed);
                    return Delivery::Delivered;
                }
                Attempt::Permanent(status, excerpt) => {
                    return Delivery::Refused(status, excerpt);
                }
                Attempt::Retryable(why) if attempt < self.retries => {
                    attempt += 1;
                    self.metrics.webhook_retries.fetch_add(1, Relaxed);
                    let pause = self.backoff(attempt);
                    match self.plain.as_ref() {
                        Some(plain) => plain.pause(pause),
                        None => std::thread::sleep(pause),
                    }
                    let _ = why;
                }
                Attempt::Retryable(why) => {
                    self.metrics.webhook_failure.fetch_add(records, Relaxed);
                    return Delivery::Failed(why);
                }
            }
        }
    }

    fn post(&mut self, body: &[u8], request_id: &str) -> Attempt {
        if let Some(amqp) = self.amqp.as_mut() {
            return match amqp.publish(&[(body, request_id)]).pop() {
                Some(Ok(())) => Attempt::Delivered,
                Some(Err(why)) => Attempt::Retryable(why),
                None => Attempt::Retryable("no answer".into()),
            };
        }
        if self.url.starts_with("amqp") {
            return Attempt::Retryable("the AMQP sink could not start".into());
        }
        if let Some(plain) = self.plain.as_mut() {
            return match plain.post_many(&[(body, request_id)]).pop() {
                Some(answer) => classify(answer),
                None => Attempt::Retryable("no answer".into()),
            };
        }
        let mut req = self
            .agent
            .post(&self.url)
            .header("content-type", "application/json")
            .header("idempotency-key", request_id);
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if let Some(signer) = &self.signer {
            let now = signing::unix_now();
            req = req
                .header("webhook-id", request_id)
                .header("webhook-timestamp", now.to_string())
                .header("webhook-signature", signer.signature(request_id, now, body));
        }
        match req.send(body) {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp
                    .into_body()
                    .with_config()
                    .limit(4096)
                    .read_to_vec()
                    .unwrap_or_default();
                let excerpt = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                classify(Ok((status, excerpt)))
            }
            Err(e) => Attempt::Retryable(e.to_string()),
        }
    }

    /// Several spooled records at once: pipelined on the plain client, then any that
    /// failed retryably go through `deliver` (with its retries) one by one. Answers
    /// cover a prefix of `lines`: delivery stops at the first record that fails.
    fn deliver_batch<L: AsRef<[u8]>>(&mut self, lines: &[L], ids: &[Cow<str>]) -> Vec<Delivery> {
        self.deliver_batch_answered(lines, ids, None)
    }

    /// `deliver_batch`, where the plain client may have POSTed `lines` already
    /// (`PlainHttp::start`) and read their answers (`sent`).
    fn deliver_batch_answered<L: AsRef<[u8]>>(
        &mut self,
        lines: &[L],
        ids: &[Cow<str>],
        sent: Option<Vec<webhook::Answer>>,
    ) -> Vec<Delivery> {
        if self.batch > 1 {
            return self.deliver_arrays(lines, ids);
        }
        let items = || -> Vec<(&[u8], &str)> {
            lines
                .iter()
                .zip(ids)
                .map(|(l, id)| (l.as_ref(), id.as_ref()))
                .collect()
        };
        let first: Vec<Attempt> = match (self.amqp.as_mut(), self.plain.as_mut()) {
            _ if sent.is_some() => sent.into_iter().flatten().map(classify).collect(),
            (Some(amqp), _) => amqp
                .publish(&items())
                .into_iter()
                .map(|r| r.map_or_else(Attempt::Retryable, |()| Attempt::Delivered))
                .collect(),
            (None, Some(plain)) if lines.len() > 1 => plain
                .post_many(&items())
                .into_iter()
                .map(classify)
                .collect(),
            _ => Vec::new(),
        };
        let mut out = Vec::with_capacity(lines.len());
        for (i, (line, id)) in lines.iter().zip(ids).enumerate() {
            let d = match first.get(i) {
                Some(Attempt::Delivered) => {
                    self.metrics.webhook_success.fetch_add(1, Relaxed);
                    Delivery::Delivered
                }
                Some(Attempt::Permanent(status, excerpt)) => {
                    self.metrics.webhook_failure.fetch_add(1, Relaxed);
                    Delivery::Refused(*status, excerpt.clone())
                }
                Some(Attempt::Retryable(_)) => {
                    // The pipelined attempt failed: what follows is a retry.
                    self.metrics.webhook_retries.fetch_add(1, Relaxed);
                    self.deliver(line.as_ref(), id)
                }
                None => self.deliver(line.as_ref(), id),
            };
            let failed = matches!(d, Delivery::Failed(_));
            out.push(d);
            if failed {
                break;
            }
        }
        out
    }

    /// `usage_hook.batch` above 1: the records in JSON arrays of up to `batch`, one per
    /// POST (pipelined on the plain client), each keyed by its first record's id and
    /// its count (`array_key`). An array refused for good goes again record by record
    /// (one-element arrays), so only what the receiver refuses is dead-lettered.
    /// Answers cover a prefix of `lines`; a failed array ends them (at its first record).
    fn deliver_arrays<L: AsRef<[u8]>>(&mut self, lines: &[L], ids: &[Cow<str>]) -> Vec<Delivery> {
        let n = self.batch;
        let mut bodies = std::mem::take(&mut self.arrays);
        let groups = lines.len().div_ceil(n);
        if bodies.len() < groups {
            bodies.resize_with(groups, Vec::new);
        }
        for (body, ls) in bodies.iter_mut().zip(lines.chunks(n)) {
            json_array(body, ls);
        }
        let keys: Vec<String> = ids.chunks(n).map(array_key).collect();
        let first: Vec<Attempt> = match self.plain.as_mut() {
            Some(plain) if groups > 1 => {
                let items: Vec<(&[u8], &str)> = bodies
                    .iter()
                    .zip(&keys)
                    .map(|(b, k)| (&b[..], k.as_str()))
                    .collect();
                plain.post_many(&items).into_iter().map(classify).collect()
            }
            _ => Vec::new(),
        };
        let out = self.settle_arrays(lines, ids, &bodies[..groups], &keys, first);
        if bodies.iter().map(Vec::capacity).sum::<usize>() <= KEEP_ARRAYS {
            self.arrays = bodies;
        }
        out
    }

    /// The arrays' outcomes, record by record: what the pipelined attempt (`first`)
    /// did not settle is retried alone, and an array refused for good goes again
    /// record by record.
    fn settle_arrays<L: AsRef<[u8]>>(
        &mut self,
        lines: &[L],
        ids: &[Cow<str>],
        bodies: &[Vec<u8>],
        keys: &[String],
        first: Vec<Attempt>,
    ) -> Vec<Delivery> {
        let n = self.batch;
        let mut out = Vec::with_capacity(lines.len());
        for (g, (body, key)) in bodies.iter().zip(keys).enumerate() {
            let from = g * n;
            let count = (lines.len() - from).min(n);
            let d = match first.get(g) {
                Some(Attempt::Delivered) => {
                    self.metrics
                        .webhook_success
                        .fetch_add(count as u64, Relaxed);
                    Delivery::Delivered
                }
                Some(Attempt::Permanent(status, excerpt)) => {
                    Delivery::Refused(*status, excerpt.clone())
                }
                Some(Attempt::Retryable(_)) => {
                    self.metrics.webhook_retries.fetch_add(1, Relaxed);
                    self.deliver_n(body, key, count as u64)
                }
                None => self.deliver_n(body, key, count as u64),
            };
            match d {
                Delivery::Delivered => out.extend((0..count).map(|_| Delivery::Delivered)),
                Delivery::Refused(status, excerpt) if count == 1 => {
                    self.metrics.webhook_failure.fetch_add(1, Relaxed);
                    out.push(Delivery::Refused(status, excerpt));
                }
                Delivery::Refused(status, _) => {
                    warn!(
                        "usage webhook refused an array of {count} records ({key}) with {status}; sending them one by one"
                    );
                    for (line, id) in lines[from..from + count].iter().zip(&ids[from..]) {
                        let d = self.deliver(line.as_ref(), id);
                        let failed = matches!(d, Delivery::Failed(_));
                        out.push(d);
                        if failed {
                            return out;
                        }
                    }
                }
                Delivery::Failed(why) => {
                    out.push(Delivery::Failed(why));
                    return out;
                }
            }
        }
        out
    }

    /// Records in one sender round: `pipeline` POSTs of `batch` records, at most
    /// `MAX_ROUND` (a catch-up round holds its records in memory).
    fn round(&self) -> usize {
        self.pipeline.saturating_mul(self.batch).clamp(1, MAX_ROUND)
    }

    /// Exponential backoff from 100 ms, capped at 10 s, with ±50 % jitter so a fleet of
    /// proxies does not retry in lockstep.
    fn backoff(&mut self, attempt: u32) -> Duration {
        let base = 100u64.saturating_mul(1 << attempt.min(10)).min(10_000);
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        Duration::from_millis(base / 2 + self.rng % base.max(1))
    }
}

/// The sender's buffers for a round from the rings, kept between rounds: the records
/// taken (in place), and the unsettled ones' copy for `held.jsonl`.
#[derive(Default)]
struct RingTake {
    records: SenderTake,
    /// The take was POSTed whole and its answers are still to be read
    /// (at the top of `run_spool`'s next turn).
    in_flight: bool,
    rest: Vec<u8>,
    /// `held.jsonl`, opened the first time a take is held long.
    held: Option<std::io::Result<spool::Held>>,
}

/// Records (JSON objects) as one JSON array, `[r1,r2,...]`, in `body` (cleared first).
fn json_array<L: AsRef<[u8]>>(body: &mut Vec<u8>, lines: &[L]) {
    body.clear();
    body.reserve(lines.iter().map(|l| l.as_ref().len() + 1).sum::<usize>() + 2);
    body.push(b'[');
    for (i, l) in lines.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(l.as_ref());
    }
    body.push(b']');
}

/// An array POST's Idempotency-Key (and `webhook-id`): its first record's request id,
/// and `+<count>` when it holds more than one. The same records in the same array get
/// the same key on a retry; receivers deduplicate by each record's `request_id`.
fn array_key(ids: &[Cow<str>]) -> String {
    match ids {
        [one] => one.to_string(),
        [first, ..] => format!("{first}+{}", ids.len()),
        [] => String::new(),
    }
}

/// Whether the webhook took the record (a 2xx): the one rule `classify` and the
/// settling of a take answered whole both go by.
fn webhook_took(answer: &webhook::Answer) -> bool {
    matches!(answer, Ok((200..=299, _)))
}

fn classify(answer: webhook::Answer) -> Attempt {
    match answer {
        a if webhook_took(&a) => Attempt::Delivered,
        Ok((status @ (408 | 429 | 500..=599), _)) => Attempt::Retryable(format!("status {status}")),
        Ok((status, excerpt)) => Attempt::Permanent(status, excerpt),
        Err(e) => Attempt::Retryable(e),
    }
}

/// The writer takes the rings' records from now on (the sender holds none between
/// its rounds).
fn give_back(rings: Option<&Rings>) {
    if let Some(r) = rings {
        r.give_back();
    }
}

fn sleep_unless(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while Instant::now() < end && !stop.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The request id of a spooled record. Records this proxy wrote start with
/// `{"request_id":"...",` (ids have nothing to escape), read without parsing the line;
/// anything else is parsed.
pub(super) fn record_id(line: &[u8]) -> Cow<'_, str> {
    const KEY: &[u8] = b"{\"request_id\":\"";
    if let Some(rest) = line.strip_prefix(KEY)
        && let Some(end) = memchr::memchr2(b'"', b'\\', rest)
        && rest[end] == b'"'
        && let Ok(id) = std::str::from_utf8(&rest[..end])
    {
        return Cow::Borrowed(id);
    }
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(default)]
        request_id: String,
    }
    Cow::Owned(
        serde_json::from_slice::<Meta>(line).map_or_else(|_| String::new(), |m| m.request_id),
    )
}

/// The arrival time (unix ms) of a spooled record; 0 when it has none.
pub(super) fn record_time_ms(line: &[u8]) -> u64 {
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(default)]
        timestamp: String,
    }
    serde_json::from_slice::<Meta>(line)
        .ok()
        .and_then(|m| humantime::parse_rfc3339(&m.timestamp).ok())
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_array_built_in_a_kept_buffer_holds_only_its_own_records() {
        let mut body = Vec::new();
        json_array(&mut body, &[&b"{\"a\":1}"[..], b"{\"b\":2}", b"{\"c\":3}"]);
        assert_eq!(body, b"[{\"a\":1},{\"b\":2},{\"c\":3}]");
        json_array(&mut body, &[&b"{\"d\":4}"[..]]);
        assert_eq!(body, b"[{\"d\":4}]");
        let ids = [Cow::Borrowed("req_1"), Cow::Borrowed("req_2")];
        assert_eq!(array_key(&ids), "req_1+2");
        assert_eq!(array_key(&ids[..1]), "req_1");
    }
}
