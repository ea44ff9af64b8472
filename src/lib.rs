pub mod config;
pub mod http;
pub mod log;
pub mod relay;
pub mod sse;
pub mod usage;
