//! Minimal leveled logging to stderr. Only used off the relay hot path (start-up,
//! errors, delivery), so formatting cost does not matter here.

use std::io::Write;

pub fn write(level: &str, args: std::fmt::Arguments<'_>) {
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{now} {level} {args}");
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
