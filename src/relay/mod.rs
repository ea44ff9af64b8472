//! Relaying: the request rewrite (what the backend is asked) and the response path
//! (what the caller receives, and what it costs).

pub mod body;
pub mod response;
pub mod rewrite;
