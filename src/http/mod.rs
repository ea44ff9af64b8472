//! HTTP/1.1 on httparse: request and response heads, body framing, multipart form
//! fields, and the proxy's own error responses.

pub mod body;
pub mod error;
pub mod head;
pub mod multipart;
pub mod write;
