//! Minimal leveled logging to stderr. Only used off the relay hot path (start-up,
//! errors, delivery), so formatting cost does not matter here.

/// A log line longer than this is cut, saying how much was left out. A record is a
/// few hundred bytes, and at most ~130 KiB with the largest usage a backend may send
/// (an `UNDELIVERED RECORD` line holds one in full).
const MAX_LINE: usize = 256 * 1024;

pub fn write(level: &str, args: std::fmt::Arguments<'_>) {
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
    let mut line = format!("{now} {level} {args}");
    if line.len() > MAX_LINE {
        let mut cut = MAX_LINE;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        let left = line.len() - cut;
        line.truncate(cut);
        line.push_str(&format!("... ({left} bytes not shown)"));
    }
    // In unit tests through the test harness's capture (a passing test's deliberate
    // errors stay out of the terminal); in the binary straight to stderr.
    #[cfg(test)]
    eprintln!("{line}");
    #[cfg(not(test))]
    {
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }
}

#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::write("INFO ", format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::write("WARN ", format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::write("ERROR", format_args!($($arg)*)) };
}
