//! `llmproxy spool replay-dead`: the dead-lettered records POSTed again.

use super::sender::{Delivery, Outbox, record_id};
use super::spool;
use crate::config::UsageHookConfig;
use crate::metrics::Metrics;
use std::path::PathBuf;
use std::sync::Arc;

/// `llmproxy spool replay-dead`: POSTs every dead-lettered record again; those the
/// webhook now takes are removed, the rest stay. Returns (delivered, kept).
pub fn replay_dead(cfg: &UsageHookConfig) -> Result<(usize, usize), String> {
    if cfg.spool_dir.is_empty() {
        return Err("usage_hook.spool_dir is empty: there is no dead-letter file".into());
    }
    let path = PathBuf::from(&cfg.spool_dir).join("dead-letter.jsonl");
    let (lines, file) =
        spool::take_dead_letters(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let metrics = Arc::new(Metrics::new(1));
    let mut outbox = Outbox::new(cfg, metrics);
    let mut kept = Vec::new();
    let mut delivered = 0;
    for line in lines {
        let id = record_id(&line);
        match outbox.deliver(&line, &id) {
            Delivery::Delivered => delivered += 1,
            Delivery::Refused(status, excerpt) => {
                eprintln!("{id}: refused again with {status} ({excerpt})");
                kept.push(line);
            }
            Delivery::Failed(why) => {
                eprintln!("{id}: not delivered ({why})");
                kept.push(line);
            }
        }
    }
    let n = kept.len();
    spool::put_back_dead_letters(file, &kept).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((delivered, n))
}
