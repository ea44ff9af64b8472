//! LLMProxy: a metering reverse proxy for OpenAI-compatible inference servers.
//!
//! The folder list is the architecture; one request flows
//! `server` (accept, HTTP/1.1) → `auth` → `upstream` (route, pool) → `relay`
//! (rewrite, stream) → `usage` (meter, record) → `delivery` (webhook).

pub mod access_log;
pub mod auth;
pub mod config;
pub mod delivery;
pub mod http;
pub mod io;
pub mod json;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod relay;
pub mod routes;
pub mod scan;
pub mod server;
pub mod spares;
pub mod sse;
#[cfg(test)]
mod testing;
pub mod tick;
pub mod tls;
pub mod upstream;
pub mod url;
pub mod usage;
