//! HTTP/1.1 on httparse: request and response heads, body framing, and the proxy's own
//! OpenAI-shaped error responses.

pub mod body;
pub mod error;
pub mod head;
