//! The RabbitMQ sink (AMQP 0-9-1 through lapin): each record is one persistent
//! message, published with `mandatory` on a channel in confirm mode. The spool stays
//! the source of truth: the sender acknowledges a record to the spool only once the
//! broker confirmed it. A returned (unroutable) message, a nack, a closed channel, a
//! lost connection or a confirm that does not come within `usage_hook.timeout` is a
//! retryable failure: the record stays spooled and is tried again with the webhook
//! path's backoff. Nothing is dead-lettered for a transient cause.
//!
//! Publishes are pipelined: a batch (up to `usage_hook.pipeline`) is published back
//! to back, then its confirms are awaited in order.
//!
//! lapin is async; it runs on a one-thread tokio runtime owned by this sink, so its
//! connection (heartbeats, confirms) is served while the sender thread waits on the
//! spool, and the sender thread itself stays a plain blocking thread. Only the
//! delivery thread knows the sink: the workers and the request path do not change.

use crate::config::{AmqpConfig, UsageHookConfig};
use crate::url::Url;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use lapin::{Confirmation, PublisherConfirm};
use std::time::{Duration, SystemTime};

pub(super) struct Publisher {
    /// The URL as lapin takes it (credentials included); never printed.
    url: String,
    cfg: AmqpConfig,
    timeout: Duration,
    rt: tokio::runtime::Runtime,
    link: Option<(Connection, Channel)>,
}

impl Publisher {
    pub(super) fn new(hook: &UsageHookConfig) -> Result<Publisher, String> {
        Url::parse(&hook.url)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("usage-amqp")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the AMQP runtime: {e}"))?;
        Ok(Publisher {
            url: hook.url.clone(),
            cfg: hook.amqp.clone(),
            timeout: hook.timeout.0,
            rt,
            link: None,
        })
    }

    /// Publishes `items` (record, request id) back to back and waits for their
    /// confirms. The answers cover a prefix of `items`: after a failure the rest is
    /// not published (it is tried again, in order, with the failed one).
    pub(super) fn publish(&mut self, items: &[(&[u8], &str)]) -> Vec<Result<(), String>> {
        let timeout = self.timeout;
        let rt = &self.rt;
        let (url, cfg, link) = (&self.url, &self.cfg, &mut self.link);
        rt.block_on(async {
            let mut out = Vec::with_capacity(items.len());
            let channel = match connected(link, url, cfg, timeout).await {
                Ok(c) => c,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            };
            let stamp = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            // Every publish of the batch at once: lapin queues a publish's frames (and
            // numbers it for confirms) when it is first polled, in this order, and
            // resolves it once written; awaiting each before the next cost a socket
            // write and two wake-ups per record.
            let publishes = items.iter().map(|(body, id)| {
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id((*id).into())
                    .with_timestamp(stamp);
                channel.basic_publish(
                    cfg.exchange.as_str().into(),
                    cfg.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    props,
                )
            });
            let sent_all = futures_util::future::join_all(publishes).await;
            let mut pending = Vec::with_capacity(items.len());
            for sent in sent_all {
                match sent {
                    Ok(confirm) => pending.push(confirm),
                    Err(e) => {
                        // Earlier publishes may still be confirmed; this one failed.
                        for c in pending.drain(..) {
                            out.push(settle(c, timeout).await);
                        }
                        out.push(Err(format!("publish: {e}")));
                        *link = None;
                        return cut_at_failure(out);
                    }
                }
            }
            for c in pending {
                let r = settle(c, timeout).await;
                let failed = r.is_err();
                out.push(r);
                if failed {
                    // A nack or return leaves the channel usable; a lost one is
                    // reopened at the next batch either way.
                    *link = None;
                    break;
                }
            }
            out
        })
    }
}

/// Answers stop at the first failure (the sender retries from there).
fn cut_at_failure(mut out: Vec<Result<(), String>>) -> Vec<Result<(), String>> {
    if let Some(i) = out.iter().position(Result::is_err) {
        out.truncate(i + 1);
    }
    out
}

/// The broker's answer to one publish.
async fn settle(confirm: PublisherConfirm, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, confirm).await {
        Err(_) => Err(format!("no confirm within {timeout:?}")),
        Ok(Err(e)) => Err(format!("confirm: {e}")),
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(returned)))) => Err(format!(
            "returned by the broker: {} {} (no queue is bound for this routing key)",
            returned.reply_code, returned.reply_text
        )),
        Ok(Ok(Confirmation::Nack(_))) => Err("nacked by the broker".into()),
        Ok(Ok(Confirmation::NotRequested)) => Err("confirms are not on".into()),
    }
}

/// The channel, connecting (and declaring, with `declare: true`) when there is none
/// or the last one was lost.
async fn connected<'a>(
    link: &'a mut Option<(Connection, Channel)>,
    url: &str,
    cfg: &AmqpConfig,
    timeout: Duration,
) -> Result<&'a Channel, String> {
    if link
        .as_ref()
        .is_some_and(|(c, ch)| !c.status().connected() || !ch.status().connected())
    {
        *link = None;
    }
    if link.is_none() {
        let opened = tokio::time::timeout(timeout.max(Duration::from_secs(2)), open(url, cfg))
            .await
            .map_err(|_| format!("no connection within {timeout:?}"))??;
        *link = Some(opened);
    }
    match link {
        Some((_, ch)) => Ok(ch),
        None => Err("no channel".into()),
    }
}

async fn open(url: &str, cfg: &AmqpConfig) -> Result<(Connection, Channel), String> {
    let props = ConnectionProperties::default().with_connection_name("llmproxy".into());
    let conn = Connection::connect(url, props)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| format!("channel: {e}"))?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("confirm.select: {e}"))?;
    if cfg.declare {
        declare(&ch, cfg).await?;
    }
    Ok((conn, ch))
}

/// `declare: true`: a durable topic exchange and a durable quorum queue bound to it
/// with the routing key (for the demo and small setups).
async fn declare(ch: &Channel, cfg: &AmqpConfig) -> Result<(), String> {
    ch.exchange_declare(
        cfg.exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| format!("declare exchange {}: {e}", cfg.exchange))?;
    let queue = cfg.queue_name();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .map_err(|e| format!("declare queue {queue}: {e}"))?;
    ch.queue_bind(
        queue.into(),
        cfg.exchange.as_str().into(),
        cfg.routing_key.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| format!("bind queue {queue}: {e}"))?;
    Ok(())
}
