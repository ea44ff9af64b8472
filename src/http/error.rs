//! Every error the proxy answers itself, and the one place that turns it into a JSON
//! response with `X-Request-Id`: OpenAI's shape, or Anthropic's on its routes.

use crate::http::write::Head;
use crate::routes::ErrorShape;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    InvalidApiKey,
    InvalidRequest(String),
    ModelNotFound(String),
    NotFound,
    RequestTooLarge,
    HeadersTooLarge,
    BadRequest(&'static str),
    /// A multipart upload whose `model` field comes after more than the body the proxy
    /// holds (the rest of the body is unread: the connection closes).
    FormFieldsTooLate,
    /// A request framed in a way the proxy does not implement (transfer codings).
    NotImplemented(&'static str),
    BackendUnavailable,
    BackendTimeout,
    ShuttingDown,
    TooManyConnections,
    HeaderTimeout,
    /// Over a key's limit (429): which one, and the standing for the headers.
    RateLimited(crate::limits::Refusal, crate::limits::Standing),
}

impl ProxyError {
    pub fn status(&self) -> u16 {
        match self {
            ProxyError::InvalidApiKey => 401,
            ProxyError::InvalidRequest(_)
            | ProxyError::BadRequest(_)
            | ProxyError::FormFieldsTooLate => 400,
            ProxyError::ModelNotFound(_) | ProxyError::NotFound => 404,
            ProxyError::HeaderTimeout => 408,
            ProxyError::RequestTooLarge => 413,
            ProxyError::RateLimited(crate::limits::Refusal::Store, _) => 503,
            ProxyError::RateLimited(..) => 429,
            ProxyError::HeadersTooLarge => 431,
            ProxyError::NotImplemented(_) => 501,
            ProxyError::BackendUnavailable => 502,
            ProxyError::ShuttingDown | ProxyError::TooManyConnections => 503,
            ProxyError::BackendTimeout => 504,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::InvalidApiKey => "invalid_api_key",
            ProxyError::InvalidRequest(_) | ProxyError::FormFieldsTooLate => "invalid_request",
            ProxyError::ModelNotFound(_) => "model_not_found",
            ProxyError::NotFound => "not_found",
            ProxyError::RequestTooLarge => "request_too_large",
            ProxyError::HeadersTooLarge => "headers_too_large",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::NotImplemented(_) => "not_implemented",
            ProxyError::HeaderTimeout => "request_timeout",
            ProxyError::BackendUnavailable => "backend_unavailable",
            ProxyError::BackendTimeout => "backend_timeout",
            ProxyError::ShuttingDown => "shutting_down",
            ProxyError::TooManyConnections => "too_many_connections",
            ProxyError::RateLimited(crate::limits::Refusal::Budget, _) => "insufficient_quota",
            ProxyError::RateLimited(crate::limits::Refusal::Store, _) => "limits_unavailable",
            ProxyError::RateLimited(..) => "rate_limit_exceeded",
        }
    }

    fn kind(&self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            429 if self.code() == "insufficient_quota" => "insufficient_quota",
            429 => "requests",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }

    pub fn message(&self) -> String {
        match self {
            ProxyError::InvalidApiKey => "Missing or invalid API key.".into(),
            ProxyError::InvalidRequest(m) => m.clone(),
            ProxyError::FormFieldsTooLate => "The form field 'model' must come before the file (or the whole upload be within limits.max_request_body).".into(),
            ProxyError::ModelNotFound(m) => format!("No backend serves the model '{m}'."),
            ProxyError::NotFound => "Unknown path.".into(),
            ProxyError::RequestTooLarge => {
                "Request body is larger than the configured limit.".into()
            }
            ProxyError::HeadersTooLarge => {
                "Request header block is larger than the configured limit.".into()
            }
            ProxyError::BadRequest(m) => format!("Malformed HTTP request: {m}."),
            ProxyError::NotImplemented(m) => format!("Not implemented: {m}."),
            ProxyError::HeaderTimeout => "Request head not received in time.".into(),
            ProxyError::BackendUnavailable => "No backend could be reached.".into(),
            ProxyError::BackendTimeout => "The backend did not answer in time.".into(),
            ProxyError::ShuttingDown => "The proxy is shutting down.".into(),
            ProxyError::TooManyConnections => "Too many open connections.".into(),
            ProxyError::RateLimited(r, st) => {
                use crate::limits::Refusal;
                let what = match r {
                    Refusal::Requests => "requests per minute",
                    Refusal::Tokens => "tokens per minute",
                    Refusal::Concurrency => "requests in flight",
                    Refusal::Budget => {
                        return "This key's token budget is spent; it renews at the start of its next period (or when the operator raises it).".into();
                    }
                    Refusal::Store => {
                        return "The shared rate-limit store is unreachable and this proxy refuses limited keys meanwhile (limits_fail_closed). Try again shortly.".into();
                    }
                };
                format!(
                    "Rate limit reached for {what} on this key. Try again in {}.",
                    crate::limits::reset_text(st.retry_after_ms)
                )
            }
        }
    }

    /// Errors after which the request stream cannot be trusted: close the connection.
    pub fn must_close(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::FormFieldsTooLate
                | ProxyError::NotImplemented(_)
                | ProxyError::HeadersTooLarge
                | ProxyError::RequestTooLarge
                | ProxyError::HeaderTimeout
                | ProxyError::ShuttingDown
                | ProxyError::TooManyConnections
        )
    }

    /// Anthropic's error type for this error (what its SDK maps to an exception).
    fn anthropic_kind(&self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 => "overloaded_error",
            504 => "timeout_error",
            400..=499 => "invalid_request_error",
            _ => "api_error",
        }
    }

    /// Appends the full HTTP response for this error to `out`, OpenAI-shaped.
    pub fn write_response(&self, out: &mut Vec<u8>, request_id: &str, keep_alive: bool) {
        self.write_response_shaped(out, request_id, keep_alive, ErrorShape::OpenAi);
    }

    /// Appends the full HTTP response for this error to `out`, in the route's shape.
    pub fn write_response_shaped(
        &self,
        out: &mut Vec<u8>,
        request_id: &str,
        keep_alive: bool,
        shape: ErrorShape,
    ) {
        let body = match shape {
            ErrorShape::OpenAi => serde_json::json!({
                "error": {"message": self.message(), "type": self.kind(), "code": self.code()}
            }),
            ErrorShape::Anthropic => serde_json::json!({
                "type": "error",
                "error": {"type": self.anthropic_kind(), "message": self.message()}
            }),
        };
        let body = body.to_string();
        let mut extra = Vec::new();
        if let ProxyError::RateLimited(r, st) = self {
            crate::limits::write_headers(&mut extra, st, Some(*r));
        }
        write_response(
            out,
            self.status(),
            "application/json",
            body.as_bytes(),
            request_id,
            keep_alive && !self.must_close(),
            &extra,
        );
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// Appends a complete response with a Content-Length body.
pub fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    body: &[u8],
    request_id: &str,
    keep_alive: bool,
    extra_lines: &[u8],
) {
    let mut head = Head::response(out, status, reason(status).as_bytes());
    head.lines().extend_from_slice(extra_lines);
    head.header(b"content-type", content_type.as_bytes())
        .content_length(body.len() as u64);
    if !request_id.is_empty() {
        head.header(b"x-request-id", request_id.as_bytes());
    }
    head.end_with_connection(keep_alive);
    out.extend_from_slice(body);
}

/// Decimal formatting without allocation.
pub fn itoa_u64(n: u64) -> ItoaBuf {
    let mut buf = ItoaBuf {
        bytes: [0; 20],
        start: 20,
    };
    let mut v = n;
    loop {
        buf.start -= 1;
        buf.bytes[buf.start] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf
}

pub struct ItoaBuf {
    bytes: [u8; 20],
    start: usize,
}

impl ItoaBuf {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape_with_request_id() {
        let mut out = Vec::new();
        ProxyError::ModelNotFound("m1".into()).write_response(&mut out, "req_1", true);
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(head.contains("x-request-id: req_1"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("m1"));
    }

    #[test]
    fn malformed_requests_close() {
        let mut out = Vec::new();
        ProxyError::BadRequest("bad chunk size").write_response(&mut out, "r", true);
        assert!(String::from_utf8_lossy(&out).contains("connection: close"));
    }
}
