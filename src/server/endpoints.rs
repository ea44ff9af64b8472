//! The endpoints the proxy answers itself: /health, /metrics and the merged /v1/models.

use super::{View, Worker};
use crate::http::body::BodyDecoder;
use crate::http::error::ProxyError;
use crate::http::head::ResponseHead;
use crate::http::write::Head;
use crate::io::Wait;
use crate::upstream::pool::{ConnectError, Pool};
use log::warn;
use std::time::Duration;

/// A model list larger than this is not a model list.
const MAX_MODELS_BODY: usize = 8 << 20;

pub fn health(w: &Worker) -> (u16, String) {
    let v = w.view();
    let backends: Vec<serde_json::Value> =
        v.up.backends
            .iter()
            .map(|b| {
                serde_json::json!({
                    "name": b.name,
                    "url": &*b.url,
                    "healthy": b.is_healthy(),
                    "in_flight": w.shared.metrics.in_flight(b.slot),
                    "last_error": b.last_error(),
                })
            })
            .collect();
    let any = v.up.backends.iter().any(|b| b.is_healthy());
    let body = serde_json::json!({
        "status": if any { "ok" } else { "unavailable" },
        "backends": backends,
    });
    (if any { 200 } else { 503 }, body.to_string())
}

pub fn metrics(w: &Worker) -> String {
    let v = w.view();
    let backends: Vec<crate::metrics::BackendState<'_>> =
        v.up.backends
            .iter()
            .map(|b| crate::metrics::BackendState {
                name: &b.name,
                healthy: b.is_healthy(),
                slot: b.slot,
            })
            .collect();
    w.shared
        .metrics
        .render(&backends, w.shared.sink.queue_depth())
}

/// `GET /v1/models` of every healthy backend, merged by id (first seen wins).
pub async fn models(
    w: &Worker,
    authorization: Option<&[u8]>,
    request_id: &str,
) -> Result<Vec<u8>, ProxyError> {
    let mut seen = std::collections::HashSet::new();
    let mut data = Vec::new();
    // The first answer's other top-level members (llama-server's Ollama-style
    // `models`, ...) are kept as it sent them; `data` is the merge of all.
    let mut first: Option<serde_json::Map<String, serde_json::Value>> = None;
    let mut answered = false;
    let v = w.view();
    let any_healthy = v.up.backends.iter().any(|b| b.is_healthy());
    for i in 0..v.up.backends.len() {
        let b = &v.up.backends[i];
        if any_healthy && !b.is_healthy() {
            continue;
        }
        match fetch(&v, i, "/v1/models", authorization, request_id).await {
            Ok((200, body)) => {
                answered = true;
                let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                if first.is_none()
                    && let serde_json::Value::Object(top) = &parsed
                {
                    first = Some(top.clone());
                }
                if let Some(list) = parsed.get("data").and_then(|d| d.as_array()) {
                    for m in list {
                        if let Some(id) = m.get("id").and_then(|v| v.as_str())
                            && seen.insert(id.to_owned())
                        {
                            data.push(m.clone());
                        }
                    }
                }
            }
            Ok((status, _)) => warn!("backend {}: /v1/models answered {status}", b.name),
            Err(e) => warn!("backend {}: /v1/models failed: {e}", b.name),
        }
    }
    if !answered {
        return Err(ProxyError::BackendUnavailable);
    }
    let mut top = first.unwrap_or_default();
    top.insert("object".into(), "list".into());
    top.insert("data".into(), serde_json::Value::Array(data));
    Ok(serde_json::Value::Object(top).to_string().into_bytes())
}

/// A small GET to backend `i` through the worker's pool, body read whole (bounded).
async fn fetch(
    v: &View,
    i: usize,
    path: &str,
    authorization: Option<&[u8]>,
    request_id: &str,
) -> Result<(u16, Vec<u8>), String> {
    let backend = &v.up.backends[i];
    let limits = &v.live.config.limits;
    let mut up = match v.up.pool.take(i) {
        Some(io) => io,
        None => match Pool::connect(backend, limits.connect_timeout.0).await {
            Ok(io) => io,
            Err(ConnectError::Unreachable(e)) => return Err(e),
        },
    };
    let mut req = Vec::with_capacity(256);
    let mut w = Head::request(
        &mut req,
        b"GET",
        path.as_bytes(),
        backend.authority.as_bytes(),
    );
    if let Some(a) = backend
        .authorization
        .as_deref()
        .map(str::as_bytes)
        .or(authorization)
    {
        w.header(b"authorization", a);
    }
    w.header(b"x-request-id", request_id.as_bytes());
    w.end();
    up.write_all(&mut req).await.map_err(|e| e.to_string())?;
    let deadline = crate::tick::now() + limits.first_byte_timeout.0.min(Duration::from_secs(10));
    let mut head = ResponseHead::default();
    loop {
        match head.parse(up.data(), 64 * 1024) {
            Ok(Some(n)) => {
                up.consume(n);
                break;
            }
            Ok(None) => {}
            Err(e) => return Err(format!("invalid response head: {e:?}")),
        }
        match up.fill_by(deadline, || false).await {
            Wait::Data => {}
            other => return Err(format!("no response: {other:?}")),
        }
    }
    let framing = head.framing("GET").map_err(|e| format!("{e:?}"))?;
    let mut decoder = BodyDecoder::new(framing);
    let mut body = Vec::new();
    loop {
        let n = decoder
            .decode(up.data(), |s| body.extend_from_slice(s))
            .map_err(|e| e.to_string())?;
        up.consume(n);
        if body.len() > MAX_MODELS_BODY {
            return Err("model list too large".into());
        }
        if decoder.is_done() {
            break;
        }
        match up.fill_by(deadline, || false).await {
            Wait::Data => {}
            Wait::Eof if decoder.eof_is_clean() => break,
            other => return Err(format!("body cut short: {other:?}")),
        }
    }
    if head.keep_alive && decoder.is_done() && up.data().is_empty() {
        v.up.pool.put(i, up);
    }
    Ok((head.status, body))
}
