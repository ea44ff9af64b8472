//! The route table: every path the proxy answers or forwards, in one place. A path is
//! answered by the proxy itself (health, metrics, models), forwarded and metered (the
//! backend's own usage goes into the record), forwarded with a record of zero usage,
//! or refused with 404 before anything reaches a backend. Nothing is forwarded
//! without a record: "every request billed" is this table.
//!
//! The request and usage shapes come from vLLM's own entrypoints (`vllm/entrypoints`:
//! openai, anthropic, cohere, pooling, speech_to_text).

use crate::config::RoutesConfig;
use std::borrow::Cow;

/// How a streamed response reports usage and output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamShape {
    /// Chat and text completions (and streamed transcriptions): `choices` deltas, a
    /// `usage` on the last chunk when asked for with `stream_options`.
    #[default]
    Chat,
    /// OpenAI Responses: named events (`response.output_text.delta`, ...), usage in
    /// `response.usage` of `response.completed` / `.incomplete` / `.failed`; no `[DONE]`.
    Responses,
    /// Anthropic Messages: `message_start` (`message.usage`: input), `content_block_delta`
    /// (output), `message_delta` (`usage`: cumulative output, input repeated by vLLM).
    /// A later usage overwrites an earlier one field by field.
    Messages,
}

/// Where a non-streamed JSON response reports usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsageAt {
    /// The top-level `usage` member (OpenAI, Anthropic, vLLM's pooling APIs).
    #[default]
    Usage,
    /// Cohere's `meta.billed_units` (`/v2/embed`, `/v2/rerank` on Cohere's format).
    CohereMeta,
}

/// How the request body names the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// A JSON object with `model` (and `stream`, `stream_options`, `user`).
    Json,
    /// `multipart/form-data` with a `model` field (audio).
    Multipart,
}

/// The shape of the proxy's own error answers on a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorShape {
    /// `{"error": {"message", "type", "code"}}`
    #[default]
    OpenAi,
    /// `{"type": "error", "error": {"type", "message"}}`, which Anthropic's SDK reads.
    Anthropic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metering {
    pub body: Body,
    pub stream: StreamShape,
    pub usage_at: UsageAt,
    /// For `"stream": true`, ask the backend for the final usage (`stream_options`, or
    /// the flattened form fields of a transcription) and hide it from a caller that
    /// did not ask.
    pub inject_usage: bool,
    /// `background: true` is refused (the proxy sees only the first answer).
    pub refuse_background: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Health,
    Metrics,
    Models,
    /// Forwarded; the record carries the backend's usage.
    Metered(Metering),
    /// Forwarded; the record carries zero usage (`usage_source: none`).
    Recorded,
    /// Refused with 404 `not_found`; never forwarded.
    NotFound,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub action: Action,
    /// The record's `endpoint` (the path pattern for paths with an id).
    pub endpoint: Cow<'static, str>,
    /// Index into `LABELS` for the metrics' `path` label.
    pub label: usize,
    pub errors: ErrorShape,
}

const fn metered(body: Body, stream: StreamShape, usage_at: UsageAt, inject: bool) -> Action {
    Action::Metered(Metering {
        body,
        stream,
        usage_at,
        inject_usage: inject,
        refuse_background: false,
    })
}

const CHAT: Action = metered(Body::Json, StreamShape::Chat, UsageAt::Usage, true);
const POOLING: Action = metered(Body::Json, StreamShape::Chat, UsageAt::Usage, false);
const AUDIO: Action = metered(Body::Multipart, StreamShape::Chat, UsageAt::Usage, true);

/// Every fixed path: method, path, what happens. The `path` label of metrics is the
/// path; `/v1/responses/{id}` and its `cancel` follow after this table (see `LABELS`).
pub const TABLE: &[(&str, &str, Action)] = &[
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", CHAT),
    ("POST", "/v1/embeddings", POOLING),
    (
        "POST",
        "/v1/responses",
        Action::Metered(Metering {
            body: Body::Json,
            stream: StreamShape::Responses,
            usage_at: UsageAt::Usage,
            inject_usage: false,
            refuse_background: true,
        }),
    ),
    (
        "POST",
        "/v1/messages",
        metered(Body::Json, StreamShape::Messages, UsageAt::Usage, false),
    ),
    ("POST", "/rerank", POOLING),
    ("POST", "/v1/rerank", POOLING),
    ("POST", "/v2/rerank", POOLING),
    ("POST", "/score", POOLING),
    ("POST", "/v1/score", POOLING),
    ("POST", "/pooling", POOLING),
    ("POST", "/classify", POOLING),
    (
        "POST",
        "/v2/embed",
        metered(Body::Json, StreamShape::Chat, UsageAt::CohereMeta, false),
    ),
    ("POST", "/v1/audio/transcriptions", AUDIO),
    ("POST", "/v1/audio/translations", AUDIO),
    ("POST", "/v1/messages/count_tokens", Action::Recorded),
    ("POST", "/tokenize", Action::Recorded),
    ("POST", "/detokenize", Action::Recorded),
    ("GET", "/v1/models", Action::Models),
    ("GET", "/health", Action::Health),
    ("HEAD", "/health", Action::Health),
    ("GET", "/metrics", Action::Metrics),
];

const RESPONSE_BY_ID: &str = "/v1/responses/{id}";
const RESPONSE_CANCEL: &str = "/v1/responses/{id}/cancel";
/// The label of paths from `routes.extra`.
const EXTRA: &str = "extra";
/// The label of everything refused.
const OTHER: &str = "other";

/// The `path` label values of metrics: each path of the table once, then the
/// patterns, the operator's extra paths together, and everything refused together
/// (label cardinality stays bounded whatever callers send).
pub static LABELS: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    let mut labels: Vec<&'static str> = Vec::new();
    for (_, path, _) in TABLE {
        if !labels.contains(path) {
            labels.push(path);
        }
    }
    labels.extend([RESPONSE_BY_ID, RESPONSE_CANCEL, EXTRA, OTHER]);
    labels
});

fn label(path: &str) -> usize {
    LABELS
        .iter()
        .position(|l| *l == path)
        .unwrap_or(LABELS.len() - 1)
}

/// The label index of requests refused before a route was known (malformed heads).
pub fn other_label() -> usize {
    LABELS.len() - 1
}

/// Where a request goes, from its method and path (without the query string).
pub fn route(method: &str, path: &str, cfg: &RoutesConfig) -> Route {
    let errors = if path == "/v1/messages" || path == "/v1/messages/count_tokens" {
        ErrorShape::Anthropic
    } else {
        ErrorShape::OpenAi
    };
    let fixed = |action, endpoint: &'static str| Route {
        action,
        endpoint: Cow::Borrowed(endpoint),
        label: label(endpoint),
        errors,
    };
    if let Some((_, p, action)) = TABLE.iter().find(|(m, p, _)| *m == method && *p == path) {
        return fixed(*action, p);
    }
    // Stored responses, by id: one path segment of id characters.
    if let Some(rest) = path.strip_prefix("/v1/responses/") {
        let (id, cancel) = match rest.strip_suffix("/cancel") {
            Some(id) => (id, true),
            None => (rest, false),
        };
        let id_ok = !id.is_empty()
            && id.len() <= 256
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        match (id_ok, cancel, method) {
            (true, false, "GET") => return fixed(Action::Recorded, RESPONSE_BY_ID),
            (true, true, "POST") => return fixed(Action::Recorded, RESPONSE_CANCEL),
            _ => {}
        }
    }
    if let Some(extra) = cfg.extra.iter().find(|e| e.path == path) {
        return Route {
            action: if extra.metered {
                metered(Body::Json, StreamShape::Chat, UsageAt::Usage, false)
            } else {
                Action::Recorded
            },
            endpoint: Cow::Owned(extra.path.clone()),
            label: label(EXTRA),
            errors,
        };
    }
    fixed(Action::NotFound, OTHER)
}

/// Whether `path` is one of the table's own (an extra path must not shadow one).
pub fn is_fixed(path: &str) -> bool {
    TABLE.iter().any(|(_, p, _)| *p == path) || path.starts_with("/v1/responses/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExtraRoute;

    fn r(method: &str, path: &str) -> Route {
        route(method, path, &RoutesConfig::default())
    }

    #[test]
    fn every_inference_path_is_metered_and_admin_paths_are_refused() {
        for p in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/responses",
            "/v1/messages",
            "/rerank",
            "/v1/rerank",
            "/v2/rerank",
            "/score",
            "/v1/score",
            "/pooling",
            "/classify",
            "/v2/embed",
            "/v1/audio/transcriptions",
            "/v1/audio/translations",
        ] {
            assert!(matches!(r("POST", p).action, Action::Metered(_)), "{p}");
            assert_eq!(r("POST", p).endpoint, p);
            // Another method on a metered path is not forwarded.
            assert_eq!(r("GET", p).action, Action::NotFound, "{p}");
        }
        for p in [
            "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter",
            "/invocations",
            "/sleep",
            "/wake_up",
            "/pause",
            "/collective_rpc",
            "/reset_prefix_cache",
            "/start_profile",
            "/stop_profile",
            "/v1/tokenize",
            "/v1/other",
            "/",
        ] {
            assert_eq!(r("POST", p).action, Action::NotFound, "{p}");
            assert_eq!(LABELS[r("POST", p).label], "other");
        }
        assert_eq!(r("GET", "/metrics").action, Action::Metrics);
        assert_eq!(r("POST", "/metrics").action, Action::NotFound);
    }

    #[test]
    fn stored_responses_are_recorded_under_their_pattern() {
        let get = r("GET", "/v1/responses/resp_0192abc");
        assert_eq!(get.action, Action::Recorded);
        assert_eq!(get.endpoint, "/v1/responses/{id}");
        assert_eq!(LABELS[get.label], "/v1/responses/{id}");
        let cancel = r("POST", "/v1/responses/resp_1/cancel");
        assert_eq!(cancel.action, Action::Recorded);
        assert_eq!(cancel.endpoint, "/v1/responses/{id}/cancel");
        for (m, p) in [
            ("POST", "/v1/responses/resp_1"),
            ("GET", "/v1/responses/resp_1/cancel"),
            ("GET", "/v1/responses/a/b"),
            ("GET", "/v1/responses/"),
            ("DELETE", "/v1/responses/resp_1"),
        ] {
            assert_eq!(r(m, p).action, Action::NotFound, "{m} {p}");
        }
    }

    #[test]
    fn anthropic_paths_answer_in_anthropics_shape() {
        assert_eq!(r("POST", "/v1/messages").errors, ErrorShape::Anthropic);
        assert_eq!(
            r("POST", "/v1/messages/count_tokens").errors,
            ErrorShape::Anthropic
        );
        assert_eq!(r("POST", "/v1/chat/completions").errors, ErrorShape::OpenAi);
    }

    #[test]
    fn extra_paths_are_forwarded_with_a_record() {
        let cfg = RoutesConfig {
            extra: vec![
                ExtraRoute {
                    path: "/v1/foo".into(),
                    metered: false,
                },
                ExtraRoute {
                    path: "/custom/generate".into(),
                    metered: true,
                },
            ],
            ..RoutesConfig::default()
        };
        let foo = route("POST", "/v1/foo", &cfg);
        assert_eq!(foo.action, Action::Recorded);
        assert_eq!(foo.endpoint, "/v1/foo");
        assert_eq!(LABELS[foo.label], "extra");
        assert!(matches!(
            route("GET", "/custom/generate", &cfg).action,
            Action::Metered(_)
        ));
        assert_eq!(route("POST", "/v1/bar", &cfg).action, Action::NotFound);
    }

    #[test]
    fn the_documented_route_table_lists_every_path() {
        let readme = include_str!("../docs/billing.md");
        let section = readme
            .split("## Endpoints: the route table")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("docs/billing.md has the route table");
        for (method, path, _) in TABLE {
            let row = section
                .lines()
                .find(|l| l.starts_with("| ") && l.contains(&format!("`{path}`")))
                .unwrap_or_else(|| panic!("the documented route table lacks {path}"));
            assert!(row.contains(method), "{method} {path}: {row}");
        }
        for pattern in [RESPONSE_BY_ID, RESPONSE_CANCEL, "routes.extra"] {
            assert!(
                section.contains(pattern),
                "the documented route table lacks {pattern}"
            );
        }
    }

    #[test]
    fn labels_are_unique_and_bounded() {
        let mut seen = std::collections::HashSet::new();
        assert!(LABELS.iter().all(|l| seen.insert(*l)));
        assert!(LABELS.len() < 40);
    }
}
