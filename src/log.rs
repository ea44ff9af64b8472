//! The `log` facade's backend: one line per message on stderr, with an RFC 3339
//! timestamp and the level. Only used off the relay hot path (start-up, errors,
//! delivery, health), so formatting cost does not matter here.
//!
//! The level is the config's `log_level` (default `info`); the `RUST_LOG` environment
//! variable, when set to a level name, wins over it. A reload applies a new `log_level`.

use log::{LevelFilter, Log, Metadata, Record};

/// A log line longer than this is cut, saying how much was left out. A record is a
/// few hundred bytes, and at most ~130 KiB with the largest usage a backend may send
/// (an `UNDELIVERED RECORD` line holds one in full).
const MAX_LINE: usize = 256 * 1024;

struct Stderr;

static LOGGER: Stderr = Stderr;

impl Log for Stderr {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            write(record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

fn write(level: log::Level, args: &std::fmt::Arguments<'_>) {
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
    let mut line = format!("{now} {level:<5} {args}");
    if line.len() > MAX_LINE {
        let mut cut = MAX_LINE;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        let left = line.len() - cut;
        line.truncate(cut);
        line.push_str(&format!("... ({left} bytes not shown)"));
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// A level name as `log_level` and `RUST_LOG` spell it.
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    s.trim().parse().ok()
}

/// Installs the backend (once; later calls only set the level): `RUST_LOG` when it
/// names a level, else `configured`.
pub fn init(configured: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    set_level(configured);
}

/// Applies `configured` unless `RUST_LOG` names a level (a reload calls this too).
pub fn set_level(configured: LevelFilter) {
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| parse_level(&v))
        .unwrap_or(configured);
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_names_parse_as_rust_log_spells_them() {
        assert_eq!(parse_level("debug"), Some(LevelFilter::Debug));
        assert_eq!(parse_level("WARN"), Some(LevelFilter::Warn));
        assert_eq!(parse_level("off"), Some(LevelFilter::Off));
        assert_eq!(parse_level("loud"), None);
    }
}
