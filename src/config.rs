//! The YAML configuration: schema, defaults, `${ENV}` expansion, durations and sizes,
//! and validation with errors that name the offending key.
//!
//! Parsing goes YAML → `serde_yaml::Value` (expand env vars, tracking the key path) →
//! typed structs through `serde_path_to_error`, so every error starts with the key.

use crate::url::Url;
use serde::Deserialize;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(key: &str, msg: impl fmt::Display) -> Result<T, ConfigError> {
    Err(ConfigError(format!("{key}: {msg}")))
}

/// A duration written as `500ms`, `1s`, `2m` or `1h` (humantime's grammar).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    /// humantime's grammar (`1m 30s` works too); a bare number has no unit and is
    /// refused.
    pub fn parse(s: &str) -> Option<Duration> {
        humantime::parse_duration(s.trim()).ok()
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_yaml::Value::deserialize(d)?;
        let text = match &v {
            serde_yaml::Value::String(s) => s.clone(),
            serde_yaml::Value::Number(n) => n.to_string(),
            other => format!("{other:?}"),
        };
        match v.as_str().and_then(Dur::parse) {
            Some(d) => Ok(Dur(d)),
            None => Err(serde::de::Error::custom(format!(
                "expected a duration like \"1s\", got \"{text}\""
            ))),
        }
    }
}

/// A size written as `512KiB`, `16MiB`, `1GiB` or a plain byte count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    /// As the config spells sizes: `16MiB`, `64KiB`, else a byte count.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            n if n >= 1 << 20 && n % (1 << 20) == 0 => write!(f, "{}MiB", n >> 20),
            n if n >= 1 << 10 && n % (1 << 10) == 0 => write!(f, "{}KiB", n >> 10),
            n => write!(f, "{n}"),
        }
    }
}

impl fmt::Display for Dur {
    /// As the config spells durations: `500ms`, `10s`, `2m`, `1h`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            ms if ms >= 3_600_000 && ms % 3_600_000 == 0 => write!(f, "{}h", ms / 3_600_000),
            ms if ms >= 60_000 && ms % 60_000 == 0 => write!(f, "{}m", ms / 60_000),
            ms if ms >= 1000 && ms % 1000 == 0 => write!(f, "{}s", ms / 1000),
            ms => write!(f, "{ms}ms"),
        }
    }
}

impl ByteSize {
    pub fn parse(s: &str) -> Option<u64> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().ok()?;
        let mult = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "KB" | "K" => 1 << 10,
            "MiB" | "MB" | "M" => 1 << 20,
            "GiB" | "GB" | "G" => 1 << 30,
            _ => return None,
        };
        n.checked_mul(mult)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_yaml::Value::deserialize(d)?;
        let parsed = match &v {
            serde_yaml::Value::Number(n) => n.as_u64(),
            serde_yaml::Value::String(s) => ByteSize::parse(s),
            _ => None,
        };
        parsed.map(ByteSize).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "expected a size like \"16MiB\" or a byte count, got {}",
                serde_yaml::to_string(&v).unwrap_or_default().trim()
            ))
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UsageMode {
    /// Inject only `include_usage`; a hang-up is estimated from counted deltas.
    #[default]
    Final,
    /// Also request `continuous_usage_stats` (vLLM, SGLang) so a hang-up is billed
    /// from the backend's own running count.
    Continuous,
    /// llama.cpp's llama-server: also request `timings_per_token`, whose per-event
    /// `timings` (`prompt_n`, `cache_n`, `predicted_n`) bill a hang-up as `partial`.
    LlamacppTimings,
}

impl UsageMode {
    /// As the config spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageMode::Final => "final",
            UsageMode::Continuous => "continuous",
            UsageMode::LlamacppTimings => "llamacpp_timings",
        }
    }
}

impl ApiKeyFormat {
    /// As the config spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiKeyFormat::Masked => "masked",
            ApiKeyFormat::Full => "full",
            ApiKeyFormat::Sha256 => "sha256",
            ApiKeyFormat::None => "none",
        }
    }
}

/// `backends[].models`: a list of model ids, `[]` (any model), or `auto` (discovered
/// from the backend's `GET /v1/models` at start and on every health check).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Models {
    #[default]
    Any,
    List(Vec<String>),
    Auto,
}

impl<'de> Deserialize<'de> for Models {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_yaml::Value::deserialize(d)? {
            serde_yaml::Value::String(s) if s == "auto" => Ok(Models::Auto),
            serde_yaml::Value::Sequence(items) => {
                let list = items
                    .into_iter()
                    .map(|v| match v {
                        serde_yaml::Value::String(s) if !s.is_empty() => Ok(s),
                        other => Err(serde::de::Error::custom(format!(
                            "expected a model id, got {}",
                            serde_yaml::to_string(&other).unwrap_or_default().trim()
                        ))),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(if list.is_empty() {
                    Models::Any
                } else {
                    Models::List(list)
                })
            }
            serde_yaml::Value::Null => Ok(Models::Any),
            other => Err(serde::de::Error::custom(format!(
                "expected a list of model ids or \"auto\", got {}",
                serde_yaml::to_string(&other).unwrap_or_default().trim()
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ApiKeyFormat {
    #[default]
    Masked,
    Full,
    Sha256,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub url: String,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub models: Models,
    #[serde(default)]
    pub api_key: Option<String>,
    #[serde(default)]
    pub usage_mode: UsageMode,
    /// `https://` backends: a PEM bundle to verify the backend's certificate against
    /// instead of the compiled-in Mozilla roots.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// `https://` backends: accept any certificate (warned at every start).
    #[serde(default)]
    pub tls_insecure_skip_verify: bool,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageHookConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub url: String,
    #[serde(default = "default_hook_timeout")]
    pub timeout: Dur,
    #[serde(default = "default_retry")]
    pub retry: u32,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub api_key_format: ApiKeyFormat,
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
    #[serde(default = "default_spool_dir")]
    pub spool_dir: String,
    /// Records POSTed back to back on one connection before reading the answers
    /// (HTTP/1.1 pipelining, plain http:// webhooks), or publishes awaiting their
    /// confirms (amqp://); 1 = one at a time. Unset: `pipeline()`'s sink default.
    #[serde(default)]
    pub pipeline: Option<usize>,
    /// Records per webhook POST: above 1, each POST carries a JSON array of up to this
    /// many records (docs/billing.md "Batched webhooks"); 1 = one record, the object
    /// itself, per POST.
    #[serde(default = "one_usize")]
    pub batch: usize,
    /// A Standard Webhooks secret (`whsec_` + base64): every POST is signed
    /// (`webhook-id`, `webhook-timestamp`, `webhook-signature`). Never printed.
    #[serde(default)]
    pub signing_secret: Option<String>,
    /// With an `amqp://` or `amqps://` url: where records are published.
    #[serde(default)]
    pub amqp: AmqpConfig,
}

/// `usage_hook.amqp`: the RabbitMQ sink's exchange, routing key and declarations.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    #[serde(default = "default_exchange")]
    pub exchange: String,
    #[serde(default = "default_routing_key")]
    pub routing_key: String,
    /// Declare a durable topic exchange and a durable quorum queue bound to it.
    #[serde(default = "default_declare")]
    pub declare: bool,
    /// The queue `declare` creates; empty: named after the exchange.
    #[serde(default)]
    pub queue: String,
}

impl AmqpConfig {
    pub fn queue_name(&self) -> &str {
        if self.queue.is_empty() {
            &self.exchange
        } else {
            &self.queue
        }
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            exchange: default_exchange(),
            routing_key: default_routing_key(),
            declare: default_declare(),
            queue: String::new(),
        }
    }
}

fn default_exchange() -> String {
    "llmproxy.usage".into()
}
fn default_routing_key() -> String {
    "usage".into()
}
fn default_declare() -> bool {
    true
}

impl UsageHookConfig {
    /// Records go to RabbitMQ (`amqp://`, `amqps://`) rather than a webhook.
    pub fn is_amqp(&self) -> bool {
        let lower = self.url.get(..8).unwrap_or(&self.url).to_ascii_lowercase();
        lower.starts_with("amqp://") || lower.starts_with("amqps://")
    }

    /// `pipeline`, or the sink's default: 1,024 POSTs for a webhook (one write and
    /// one wait per 1,024 records: a sender at saturation took 0.65 us a record
    /// against 1.1 with 128), 128 publishes for RabbitMQ (1,024 was slower there:
    /// docs/billing.md, "Throughput").
    pub fn pipeline(&self) -> usize {
        match self.pipeline {
            Some(n) => n,
            None if self.is_amqp() => 128,
            None => 1024,
        }
    }
}

/// Most POSTs (or publishes) in flight on the sink's connection.
pub const MAX_HOOK_PIPELINE: usize = 65536;
fn one_usize() -> usize {
    1
}
/// Most records in one batched webhook POST.
pub const MAX_HOOK_BATCH: usize = 1000;

fn default_hook_timeout() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_retry() -> u32 {
    2
}
fn default_queue_size() -> usize {
    65536
}
fn default_spool_dir() -> String {
    "./usage-spool".into()
}

impl Default for UsageHookConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            url: String::new(),
            timeout: default_hook_timeout(),
            retry: default_retry(),
            headers: Default::default(),
            api_key_format: ApiKeyFormat::Masked,
            queue_size: default_queue_size(),
            spool_dir: default_spool_dir(),
            pipeline: None,
            batch: 1,
            signing_secret: None,
            amqp: AmqpConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(default = "default_interval")]
    pub interval: Dur,
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "two")]
    pub unhealthy_after: u32,
    #[serde(default = "two")]
    pub healthy_after: u32,
}

fn default_interval() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_health_path() -> String {
    "/health".into()
}
fn two() -> u32 {
    2
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            interval: default_interval(),
            path: default_health_path(),
            unhealthy_after: 2,
            healthy_after: 2,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub key: String,
    #[serde(default)]
    pub user_id: String,
    /// Requests per minute (fixed window, UTC minute).
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per minute, charged when usage is known.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    #[serde(default)]
    pub budget: Option<Budget>,
}

/// Limits for a key: each unset one is unlimited (see `src/limits.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default)]
    pub rpm: Option<u64>,
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    #[serde(default)]
    pub budget: Option<Budget>,
}

impl LimitsConfig {
    pub fn is_empty(&self) -> bool {
        *self == LimitsConfig::default()
    }

    /// A limit of 0 would refuse everything: leave it out for "no limit".
    fn check(&self) -> Result<(), (&'static str, &'static str)> {
        let zero = "must be at least 1 (leave it out for no limit)";
        if self.rpm == Some(0) {
            return Err(("rpm", zero));
        }
        if self.tpm == Some(0) {
            return Err(("tpm", zero));
        }
        if self.max_concurrent == Some(0) {
            return Err(("max_concurrent", zero));
        }
        if self.budget.is_some_and(|b| b.tokens == 0) {
            return Err(("budget.tokens", zero));
        }
        Ok(())
    }
}

/// `budget: {tokens: N, period: day|month|total}` (UTC day, calendar month, or ever).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub tokens: u64,
    pub period: BudgetPeriod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    Day,
    Month,
    Total,
}

impl KeyConfig {
    /// This key's limits: its own, else `auth.default_limits`', field by field.
    pub fn limits(&self, default: &LimitsConfig) -> LimitsConfig {
        LimitsConfig {
            rpm: self.rpm.or(default.rpm),
            tpm: self.tpm.or(default.tpm),
            max_concurrent: self.max_concurrent.or(default.max_concurrent),
            budget: self.budget.or(default.budget),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// Limits for every key that does not set its own.
    #[serde(default)]
    pub default_limits: LimitsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "default_max_body")]
    pub max_request_body: ByteSize,
    #[serde(default = "default_max_header")]
    pub max_header_bytes: ByteSize,
    #[serde(default = "default_header_timeout")]
    pub header_timeout: Dur,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Dur,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    #[serde(default = "default_first_byte_timeout")]
    pub first_byte_timeout: Dur,
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: Dur,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Request bodies of the audio routes (multipart uploads: files of 25 MB are
    /// common), which are streamed to the backend rather than held.
    #[serde(default = "default_max_audio_body")]
    pub max_audio_body: ByteSize,
}

fn default_max_audio_body() -> ByteSize {
    ByteSize(64 << 20)
}

fn default_max_body() -> ByteSize {
    ByteSize(16 << 20)
}
fn default_max_header() -> ByteSize {
    ByteSize(64 << 10)
}
fn default_header_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_idle_timeout() -> Dur {
    Dur(Duration::from_secs(75))
}
fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(3))
}
fn default_first_byte_timeout() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_shutdown_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_max_connections() -> usize {
    10_000
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_body: default_max_body(),
            max_header_bytes: default_max_header(),
            header_timeout: default_header_timeout(),
            idle_timeout: default_idle_timeout(),
            connect_timeout: default_connect_timeout(),
            first_byte_timeout: default_first_byte_timeout(),
            shutdown_timeout: default_shutdown_timeout(),
            max_connections: default_max_connections(),
            max_audio_body: default_max_audio_body(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default)]
    pub workers: usize,
    pub backends: Vec<BackendConfig>,
    #[serde(default)]
    pub usage_hook: UsageHookConfig,
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub limits: Limits,
    /// `stdout`, `off`, or a file path.
    #[serde(default = "default_access_log")]
    pub access_log: String,
    #[serde(default)]
    pub routes: RoutesConfig,
    /// `error`, `warn`, `info` (default), `debug`, `trace` or `off`; `RUST_LOG` wins.
    #[serde(default = "default_log_level", deserialize_with = "log_level")]
    pub log_level: log::LevelFilter,
    /// TLS on the listener: `{cert, key, client_ca}` (PEM files).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Shares the keys' limit counters across proxies: `redis://[:PASSWORD@]HOST:PORT/DB`
    /// (`${ENV}` for the password). Empty: each proxy counts alone.
    #[serde(default)]
    pub limits_store: String,
    /// How often counts are pushed to and pulled from `limits_store` [100ms].
    #[serde(default = "default_limits_sync_interval")]
    pub limits_sync_interval: Dur,
    /// With `limits_store` unreachable, refuse limited keys' requests (503) instead of
    /// serving on this proxy's own counts [false].
    #[serde(default)]
    pub limits_fail_closed: bool,
    /// Without `limits_store`: where budgets are kept across restarts
    /// [`usage_hook.spool_dir`/limits-state.json, else ./llmproxy-limits-state.json].
    #[serde(default)]
    pub limits_state_file: String,
}

/// The listener's TLS: a certificate chain and its key (PEM), and optionally the CA
/// whose certificates callers must present.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: String,
    pub key: String,
    #[serde(default)]
    pub client_ca: Option<String>,
}

fn default_limits_sync_interval() -> Dur {
    Dur(Duration::from_millis(100))
}

fn default_log_level() -> log::LevelFilter {
    log::LevelFilter::Info
}

fn log_level<'de, D: serde::Deserializer<'de>>(d: D) -> Result<log::LevelFilter, D::Error> {
    let s = String::deserialize(d)?;
    crate::log::parse_level(&s).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "expected one of error, warn, info, debug, trace, off; got \"{s}\""
        ))
    })
}

/// `routes`: what the operator adds to the route table (`src/routes.rs`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesConfig {
    /// Forward `/v1/responses` with `background: true` (its record then says
    /// `usage_source: none`: the proxy sees only the first answer).
    #[serde(default)]
    pub allow_background: bool,
    /// Further paths to forward, any method; each request still gets a record.
    #[serde(default)]
    pub extra: Vec<ExtraRoute>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraRoute {
    pub path: String,
    /// Read `model` from a JSON body and the top-level `usage` of the answer;
    /// otherwise the record has zero usage (`usage_source: none`).
    #[serde(default)]
    pub metered: bool,
}

fn default_access_log() -> String {
    "stdout".into()
}

fn default_listen() -> String {
    ":8080".into()
}

/// A backend URL: `http://host[:port]`, no path, no credentials (a backend's key is
/// `api_key`).
pub fn backend_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text)?;
    if url.scheme != "http" && url.scheme != "https" {
        return Err(format!(
            "expected an http:// or https:// URL, got \"{}\"",
            url.redacted()
        ));
    }
    if url.path != "/" {
        return Err(format!(
            "expected {}://host:port with no path, got \"{}\"",
            url.scheme,
            url.redacted()
        ));
    }
    if url.credentials.is_some() {
        return Err("credentials in a backend URL are not supported: use api_key".into());
    }
    Ok(url)
}

/// Parses `listen`: `:8080` means every IPv4 address.
pub fn parse_listen(listen: &str) -> Result<SocketAddr, String> {
    let full = if listen.starts_with(':') {
        format!("0.0.0.0{listen}")
    } else {
        listen.to_string()
    };
    full.to_socket_addrs()
        .map_err(|e| format!("cannot use \"{listen}\": {e}"))?
        .next()
        .ok_or_else(|| format!("\"{listen}\" resolves to no address"))
}

impl Config {
    pub fn load(path: &str) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{path}: cannot read config: {e}")))?;
        Config::from_yaml(&text)
    }

    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let mut value: serde_yaml::Value = serde_yaml::from_str(text)
            .map_err(|e| ConfigError(format!("config is not valid YAML: {e}")))?;
        expand_env(&mut value, &mut String::new())?;
        let cfg: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            if path == "." {
                ConfigError(inner)
            } else {
                ConfigError(format!("{path}: {inner}"))
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        parse_listen(&self.listen).or_else(|e| err("listen", e))?;
        if self.backends.is_empty() {
            return err("backends", "at least one backend is required");
        }
        if self.backends.len() > 64 {
            return err("backends", "at most 64 backends are supported");
        }
        let mut names = std::collections::HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let url = backend_url(&b.url).or_else(|e| err(&format!("backends[{i}].url"), e))?;
            if b.weight == 0 {
                return err(&format!("backends[{i}].weight"), "must be at least 1");
            }
            if url.scheme == "https" {
                crate::tls::client(&url.host, b.ca_file.as_deref(), b.tls_insecure_skip_verify)
                    .or_else(|e| err(&format!("backends[{i}]"), e))?;
            } else if b.ca_file.is_some() || b.tls_insecure_skip_verify {
                return err(
                    &format!("backends[{i}]"),
                    "ca_file and tls_insecure_skip_verify are for https:// backends",
                );
            }
            let name = b.name.clone().unwrap_or(url.authority);
            if name == "none" || name == "other" {
                return err(
                    &format!("backends[{i}].name"),
                    format!(
                        "\"{name}\" is reserved: it labels the requests the proxy answered itself (none) or backends past the label slots (other)"
                    ),
                );
            }
            if !names.insert(name.clone()) {
                return err(
                    &format!("backends[{i}].name"),
                    format!(
                        "\"{name}\" is used by two backends; names label metrics and must be unique"
                    ),
                );
            }
        }
        let mut extra = std::collections::HashSet::new();
        for (i, e) in self.routes.extra.iter().enumerate() {
            let key = format!("routes.extra[{i}].path");
            if !e.path.starts_with('/')
                || e.path.contains(['?', '#', ' ', '\t'])
                || e.path.len() > 256
            {
                return err(
                    &key,
                    format!("expected a path like \"/v1/foo\", got \"{}\"", e.path),
                );
            }
            if crate::routes::is_fixed(&e.path) {
                return err(
                    &key,
                    format!("\"{}\" is in the route table already", e.path),
                );
            }
            if !extra.insert(e.path.as_str()) {
                return err(&key, format!("\"{}\" is listed twice", e.path));
            }
        }
        let hook = &self.usage_hook;
        if let Some(n) = hook.pipeline
            && !(1..=MAX_HOOK_PIPELINE).contains(&n)
        {
            return err(
                "usage_hook.pipeline",
                format!("expected 1 to {MAX_HOOK_PIPELINE} POSTs in flight, got {n}"),
            );
        }
        if !(1..=MAX_HOOK_BATCH).contains(&hook.batch) {
            return err(
                "usage_hook.batch",
                format!(
                    "expected 1 to {MAX_HOOK_BATCH} records per POST, got {}",
                    hook.batch
                ),
            );
        }
        if let Some(secret) = &hook.signing_secret
            && let Err(e) = crate::delivery::signing::Signer::parse(secret)
        {
            return err("usage_hook.signing_secret", e);
        }
        if hook.enabled {
            match Url::parse(&hook.url) {
                Ok(u) if u.scheme == "http" || u.scheme == "https" => {}
                Ok(u) if u.scheme == "amqp" || u.scheme == "amqps" => {
                    if hook.signing_secret.is_some() || !hook.headers.is_empty() {
                        return err(
                            "usage_hook.url",
                            "signing_secret and headers apply to webhooks; an amqp:// sink authenticates with the URL's user and password",
                        );
                    }
                    if hook.batch > 1 {
                        return err(
                            "usage_hook.batch",
                            "batched POSTs apply to webhooks; an amqp:// sink publishes one message per record (pipelined by usage_hook.pipeline)",
                        );
                    }
                    if hook.amqp.exchange.is_empty() && hook.amqp.declare {
                        return err(
                            "usage_hook.amqp.exchange",
                            "declare: true needs a named exchange (the default exchange cannot be declared)",
                        );
                    }
                }
                Ok(u) => {
                    return err(
                        "usage_hook.url",
                        format!(
                            "expected an http://, https://, amqp:// or amqps:// URL, got \"{}\"",
                            u.redacted()
                        ),
                    );
                }
                Err(e) => return err("usage_hook.url", e),
            }
            if hook.queue_size == 0 {
                return err("usage_hook.queue_size", "must be at least 1");
            }
        }
        if !self.health_check.path.starts_with('/') {
            return err("health_check.path", "must start with /");
        }
        if self.health_check.interval.0.is_zero() {
            return err("health_check.interval", "must be more than 0");
        }
        if self.auth.enabled && self.auth.keys.is_empty() {
            return err("auth.keys", "auth is enabled but no keys are configured");
        }
        let mut seen = std::collections::HashSet::new();
        for (i, k) in self.auth.keys.iter().enumerate() {
            if k.key.is_empty() {
                return err(&format!("auth.keys[{i}].key"), "must not be empty");
            }
            if !seen.insert(k.key.as_str()) {
                return err(&format!("auth.keys[{i}].key"), "duplicate key");
            }
            k.limits(&LimitsConfig::default())
                .check()
                .or_else(|(field, msg)| err(&format!("auth.keys[{i}].{field}"), msg))?;
        }
        self.auth
            .default_limits
            .check()
            .or_else(|(field, msg)| err(&format!("auth.default_limits.{field}"), msg))?;
        let limited = self
            .auth
            .keys
            .iter()
            .filter(|k| !k.limits(&self.auth.default_limits).is_empty())
            .count();
        if limited > 0 && !self.auth.enabled {
            return err(
                "auth.enabled",
                "limits are configured but auth is disabled: limits apply per key, so enable auth",
            );
        }
        if self.limits.max_header_bytes.0 < 1024 {
            return err("limits.max_header_bytes", "must be at least 1KiB");
        }
        if self.limits.max_connections == 0 {
            return err("limits.max_connections", "must be at least 1");
        }
        if let Some(tls) = &self.tls {
            crate::tls::listener(tls).or_else(|e| err("tls", e))?;
        }
        if !self.limits_store.is_empty() {
            if !self.limits_store.starts_with("redis://") {
                return err(
                    "limits_store",
                    format!(
                        "expected redis://[:PASSWORD@]HOST:PORT/DB, got \"{}\" (rediss:// is not supported yet)",
                        crate::url::redact(&self.limits_store)
                    ),
                );
            }
            if let Err(e) = redis::Client::open(self.limits_store.as_str()) {
                return err(
                    "limits_store",
                    format!("{} ({e})", crate::url::redact(&self.limits_store)),
                );
            }
        } else if self.limits_fail_closed {
            return err("limits_fail_closed", "needs limits_store");
        }
        let sync = self.limits_sync_interval.0;
        if sync < Duration::from_millis(10) || sync > Duration::from_secs(10) {
            return err("limits_sync_interval", "must be between 10ms and 10s");
        }
        Ok(())
    }

    /// Where budgets are kept across restarts when there is no `limits_store`.
    pub fn limits_state_path(&self) -> std::path::PathBuf {
        if !self.limits_state_file.is_empty() {
            self.limits_state_file.clone().into()
        } else if self.usage_hook.enabled && !self.usage_hook.spool_dir.is_empty() {
            std::path::Path::new(&self.usage_hook.spool_dir).join("limits-state.json")
        } else {
            "llmproxy-limits-state.json".into()
        }
    }

    /// `workers`, or for 0 one per CPU the process may use: its affinity set (taskset,
    /// a container's cpuset), and no more than a cgroup CPU quota allows (what
    /// `available_parallelism` reads).
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// What `--check` prints: everything an operator needs to confirm, no secret.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "listen: {}", self.listen);
        if let Some(tls) = &self.tls {
            match crate::tls::listener(tls) {
                Ok(l) => {
                    let days = l.cert.seconds_left() / 86_400;
                    let _ = writeln!(
                        s,
                        "tls: {} (subject {}; expires in {days} days{}){}",
                        tls.cert,
                        l.cert.subject,
                        if days < 14 { " WARNING: renew it" } else { "" },
                        match &tls.client_ca {
                            Some(ca) => format!(" client certificates from {ca} required"),
                            None => String::new(),
                        }
                    );
                }
                Err(e) => {
                    let _ = writeln!(s, "tls: {e}");
                }
            }
        }
        let _ = writeln!(s, "workers: {}", self.worker_count());
        let _ = writeln!(s, "log_level: {}", self.log_level.as_str().to_lowercase());
        for b in &self.backends {
            let name = b
                .name
                .clone()
                .unwrap_or_else(|| backend_url(&b.url).map(|u| u.authority).unwrap_or_default());
            let models = match &b.models {
                Models::Any => "any".to_string(),
                Models::Auto => "auto".to_string(),
                Models::List(l) => l.join(", "),
            };
            let _ = writeln!(
                s,
                "backend {name}: {} weight={} models=[{models}] usage_mode={} api_key={}",
                b.url,
                b.weight,
                b.usage_mode.as_str(),
                if b.api_key.is_some() { "set" } else { "none" }
            );
        }
        let h = &self.usage_hook;
        if h.enabled {
            let _ = writeln!(
                s,
                "usage_hook: {} timeout={} retry={} queue_size={} api_key_format={} headers=[{}] signing={} spool_dir={}",
                crate::url::redact(&h.url),
                h.timeout,
                h.retry,
                h.queue_size,
                h.api_key_format.as_str(),
                h.headers.keys().cloned().collect::<Vec<_>>().join(", "),
                if h.signing_secret.is_some() {
                    "on (Standard Webhooks)"
                } else {
                    "off"
                },
                if h.spool_dir.is_empty() {
                    "(disabled)"
                } else {
                    &h.spool_dir
                }
            );
        } else {
            let _ = writeln!(s, "usage_hook: disabled (no usage records are delivered)");
        }
        let _ = writeln!(
            s,
            "health_check: every {} on {} (down after {}, up after {})",
            self.health_check.interval,
            self.health_check.path,
            self.health_check.unhealthy_after,
            self.health_check.healthy_after
        );
        let _ = writeln!(
            s,
            "auth: {} ({} keys, {} with limits)",
            if self.auth.enabled {
                "enabled"
            } else {
                "disabled"
            },
            self.auth.keys.len(),
            self.auth
                .keys
                .iter()
                .filter(|k| !k.limits(&self.auth.default_limits).is_empty())
                .count()
        );
        if self.limits_store.is_empty() {
            let _ = writeln!(
                s,
                "limits_store: none (each proxy counts alone; budgets kept in {})",
                self.limits_state_path().display()
            );
        } else {
            let _ = writeln!(
                s,
                "limits_store: {} sync every {} fail_{}",
                crate::url::redact(&self.limits_store),
                self.limits_sync_interval,
                if self.limits_fail_closed {
                    "closed"
                } else {
                    "open"
                }
            );
        }
        let l = &self.limits;
        let _ = writeln!(
            s,
            "limits: max_request_body={} max_audio_body={} max_header_bytes={} header_timeout={} idle_timeout={} connect_timeout={} first_byte_timeout={} shutdown_timeout={} max_connections={}",
            l.max_request_body,
            l.max_audio_body,
            l.max_header_bytes,
            l.header_timeout,
            l.idle_timeout,
            l.connect_timeout,
            l.first_byte_timeout,
            l.shutdown_timeout,
            l.max_connections
        );
        let r = &self.routes;
        let _ = writeln!(
            s,
            "routes: allow_background={} extra=[{}]",
            r.allow_background,
            r.extra
                .iter()
                .map(|e| format!("{}{}", e.path, if e.metered { " (metered)" } else { "" }))
                .collect::<Vec<_>>()
                .join(", ")
        );
        s
    }
}

/// Replaces `${NAME}` in every string value with the environment variable.
fn expand_env(v: &mut serde_yaml::Value, path: &mut String) -> Result<(), ConfigError> {
    use serde_yaml::Value;
    match v {
        Value::String(s) if s.contains("${") => {
            *s = expand_str(s).map_err(|name| {
                ConfigError(format!(
                    "{}: environment variable {name} is not set",
                    if path.is_empty() { "." } else { path }
                ))
            })?;
        }
        Value::Sequence(seq) => {
            for (i, item) in seq.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                expand_env(item, path)?;
                path.truncate(len);
            }
        }
        Value::Mapping(map) => {
            for (k, item) in map.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k.as_str().unwrap_or("?"));
                expand_env(item, path)?;
                path.truncate(len);
            }
        }
        Value::Tagged(t) => expand_env(&mut t.value, path)?,
        _ => {}
    }
    Ok(())
}

fn expand_str(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                let name = &after[..end];
                let val = std::env::var(name).map_err(|_| name.to_string())?;
                out.push_str(&val);
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL_EXAMPLE: &str = r#"
listen: ":8080"
backends:
  - url: "http://localhost:8000"
    weight: 5
  - url: "http://localhost:8081"
    weight: 3
usage_hook:
  enabled: true
  url: "https://your-billing.com/llm-usage"
  timeout: 1s
  retry: 2
health_check:
  interval: 10s
  path: /health
"#;

    #[test]
    fn original_example_loads_unchanged() {
        let c = Config::from_yaml(ORIGINAL_EXAMPLE).expect("loads");
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.backends[0].weight, 5);
        assert_eq!(c.usage_hook.timeout.0, Duration::from_secs(1));
        assert_eq!(c.usage_hook.retry, 2);
        assert_eq!(c.health_check.interval.0, Duration::from_secs(10));
        assert_eq!(c.limits.max_request_body.0, 16 << 20);
        assert_eq!(parse_listen(&c.listen).unwrap().port(), 8080);
    }

    #[test]
    fn bad_duration_names_the_key() {
        let y = ORIGINAL_EXAMPLE.replace("timeout: 1s", "timeout: fast");
        let e = Config::from_yaml(&y).unwrap_err().0;
        assert_eq!(
            e,
            "usage_hook.timeout: expected a duration like \"1s\", got \"fast\""
        );
    }

    #[test]
    fn hook_batch_is_bounded_and_for_webhooks_only() {
        let with = |batch: &str, url: &str| {
            let y = ORIGINAL_EXAMPLE
                .replace("retry: 2", &format!("retry: 2\n  batch: {batch}"))
                .replace("https://your-billing.com/llm-usage", url);
            Config::from_yaml(&y)
                .map(|c| c.usage_hook.batch)
                .map_err(|e| e.0)
        };
        assert_eq!(with("100", "http://billing/usage"), Ok(100));
        for bad in ["0", "1001"] {
            let e = with(bad, "http://billing/usage").unwrap_err();
            assert!(e.starts_with("usage_hook.batch: expected 1 to 1000"), "{e}");
        }
        let e = with("10", "amqp://mq/%2f").unwrap_err();
        assert!(
            e.starts_with("usage_hook.batch: batched POSTs apply to webhooks"),
            "{e}"
        );
        assert_eq!(with("1", "amqp://mq/%2f"), Ok(1));
    }

    #[test]
    fn hook_pipeline_is_bounded_and_defaults_by_sink() {
        let with = |pipeline: Option<&str>, url: &str| {
            let extra = pipeline.map_or(String::new(), |p| format!("\n  pipeline: {p}"));
            let y = ORIGINAL_EXAMPLE
                .replace("retry: 2", &format!("retry: 2{extra}"))
                .replace("https://your-billing.com/llm-usage", url);
            Config::from_yaml(&y)
                .map(|c| c.usage_hook.pipeline())
                .map_err(|e| e.0)
        };
        assert_eq!(with(None, "http://billing/usage"), Ok(1024));
        assert_eq!(with(None, "amqp://mq/%2f"), Ok(128));
        assert_eq!(with(Some("16"), "amqp://mq/%2f"), Ok(16));
        assert_eq!(with(Some("1"), "http://billing/usage"), Ok(1));
        for bad in ["0", "65537"] {
            let e = with(Some(bad), "http://billing/usage").unwrap_err();
            assert!(
                e.starts_with("usage_hook.pipeline: expected 1 to 65536"),
                "{e}"
            );
        }
    }

    #[test]
    fn reserved_backend_names_are_refused() {
        for name in ["none", "other"] {
            let y = ORIGINAL_EXAMPLE.replace(
                "url: \"http://localhost:8081\"",
                &format!("url: \"http://localhost:8081\"\n    name: {name}"),
            );
            let e = Config::from_yaml(&y).unwrap_err().0;
            assert!(
                e.starts_with("backends[1].name: \"") && e.contains("reserved"),
                "{e}"
            );
        }
    }

    #[test]
    fn unknown_key_is_an_error() {
        let y = format!("{ORIGINAL_EXAMPLE}\nretries: 3\n");
        let e = Config::from_yaml(&y).unwrap_err().0;
        assert!(e.contains("unknown field `retries`"), "{e}");
        let y = ORIGINAL_EXAMPLE.replace("weight: 5", "weight: 5\n    wieght: 1");
        let e = Config::from_yaml(&y).unwrap_err().0;
        assert!(e.starts_with("backends[0]"), "{e}");
    }

    #[test]
    fn env_vars_expand_and_unset_is_an_error() {
        // SAFETY: set in a test before any thread reads this variable.
        unsafe { std::env::set_var("LLMPROXY_TEST_HOOK", "http://127.0.0.1:9/x") };
        let y = ORIGINAL_EXAMPLE.replace(
            "https://your-billing.com/llm-usage",
            "${LLMPROXY_TEST_HOOK}",
        );
        let c = Config::from_yaml(&y).unwrap();
        assert_eq!(c.usage_hook.url, "http://127.0.0.1:9/x");
        let y = ORIGINAL_EXAMPLE.replace(
            "https://your-billing.com/llm-usage",
            "${LLMPROXY_SURELY_UNSET_VAR}",
        );
        let e = Config::from_yaml(&y).unwrap_err().0;
        assert_eq!(
            e,
            "usage_hook.url: environment variable LLMPROXY_SURELY_UNSET_VAR is not set"
        );
    }

    #[test]
    fn models_list_any_or_auto() {
        let with = |m: &str| {
            Config::from_yaml(&format!(
                "backends:\n  - url: http://x:1\n    models: {m}\n"
            ))
        };
        assert_eq!(with("auto").unwrap().backends[0].models, Models::Auto);
        assert_eq!(with("[]").unwrap().backends[0].models, Models::Any);
        assert_eq!(
            with("[a, b]").unwrap().backends[0].models,
            Models::List(vec!["a".into(), "b".into()])
        );
        let e = with("fast").unwrap_err().0;
        assert!(
            e.starts_with("backends[0].models: expected a list of model ids or \"auto\""),
            "{e}"
        );
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(Dur::parse("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(Dur::parse("2m"), Some(Duration::from_secs(120)));
        assert_eq!(Dur::parse("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(Dur::parse("1"), None);
        assert_eq!(Dur::parse("s"), None);
        assert_eq!(ByteSize::parse("512KiB"), Some(512 << 10));
        assert_eq!(ByteSize::parse("16MiB"), Some(16 << 20));
        assert_eq!(ByteSize::parse("1234"), Some(1234));
        assert_eq!(ByteSize::parse("12XB"), None);
    }

    #[test]
    fn backend_urls() {
        let u = backend_url("http://localhost:8000").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("localhost", 8000));
        assert_eq!(backend_url("http://vllm/").unwrap().port, 80);
        assert_eq!(backend_url("https://vllm.internal").unwrap().port, 443);
        assert!(backend_url("ftp://x:1").is_err());
        assert!(backend_url("http://x:1/v1").is_err());
        assert_eq!(backend_url("http://[::1]:9").unwrap().host, "::1");
    }

    #[test]
    fn redacts_credentials() {
        assert_eq!(
            crate::url::redact("https://user:secret@bill.example/hook?token=abc"),
            "https://bill.example/hook"
        );
    }
}
