//! The one URL type, for every URL in the configuration: backends, the usage webhook
//! (and a message broker's). Parsed by the `http` crate's `Uri` (in the tree through
//! ureq), so IPv6 literals, ports and the userinfo rules are the same everywhere.
//! Credentials in a URL (`user:pw@`, percent-escapes decoded) are kept apart from
//! the rest: a webhook turns them into a Basic `Authorization` header, a backend
//! refuses them, and nothing prints them.

use std::net::{SocketAddr, ToSocketAddrs};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// Lowercase: `http`, `https`, ...
    pub scheme: String,
    /// The host name or address, without IPv6 brackets (what is resolved).
    pub host: String,
    /// The URL's port, else the scheme's default.
    pub port: u16,
    /// `host[:port]` as written, without credentials: the `Host` header.
    pub authority: String,
    /// Path and query, `/` when empty; a fragment is dropped.
    pub path: String,
    /// `user` and `password` from `user:password@`, percent-decoded.
    pub credentials: Option<(String, String)>,
}

impl Url {
    pub fn parse(text: &str) -> Result<Url, String> {
        let shown = redact(text);
        let no_fragment = text.split('#').next().unwrap_or_default();
        let uri: http::Uri = no_fragment
            .parse()
            .map_err(|e| format!("\"{shown}\" is not a URL: {e}"))?;
        let scheme = uri
            .scheme_str()
            .ok_or_else(|| format!("\"{shown}\" has no scheme (http://...)"))?
            .to_ascii_lowercase();
        let authority = uri
            .authority()
            .ok_or_else(|| format!("\"{shown}\" has no host"))?
            .as_str();
        let (credentials, host_port) = match authority.rsplit_once('@') {
            Some((userinfo, rest)) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                (Some((decode(user), decode(password))), rest)
            }
            None => (None, authority),
        };
        let host = uri.host().unwrap_or_default();
        if host.is_empty() {
            return Err(format!("\"{shown}\" has no host"));
        }
        let port = match host_port.strip_prefix(host).unwrap_or_default() {
            "" => default_port(&scheme)
                .ok_or_else(|| format!("\"{shown}\" needs a port (unknown scheme {scheme})"))?,
            p => p
                .strip_prefix(':')
                .and_then(|p| p.parse::<u16>().ok())
                .ok_or_else(|| format!("\"{shown}\" has an invalid port"))?,
        };
        Ok(Url {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            authority: host_port.to_string(),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
            credentials,
            scheme,
        })
    }

    /// The URL without its credentials (what a client is given).
    pub fn without_credentials(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.path)
    }

    /// The URL for a log line or `--check`: no credentials, no query string.
    pub fn redacted(&self) -> String {
        let path = self.path.split('?').next().unwrap_or_default();
        format!("{}://{}{}", self.scheme, self.authority, path)
    }

    /// The credentials as a Basic `Authorization` value.
    pub fn basic_auth(&self) -> Option<String> {
        use base64::Engine;
        let (user, password) = self.credentials.as_ref()?;
        let pair = format!("{user}:{password}");
        Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        ))
    }

    /// Resolves the host, IPv4 first: `localhost` often resolves to `::1` first while
    /// inference servers commonly bind 0.0.0.0 only.
    pub fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        let mut addrs: Vec<SocketAddr> =
            (self.host.as_str(), self.port).to_socket_addrs()?.collect();
        addrs.sort_by_key(|a| a.is_ipv6());
        addrs.dedup();
        Ok(addrs)
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        "amqp" => Some(5672),
        "amqps" => Some(5671),
        "redis" => Some(6379),
        _ => None,
    }
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A URL for printing, even one that does not parse: credentials, query and
/// fragment dropped.
pub fn redact(text: &str) -> String {
    let (scheme, rest) = text.split_once("://").unwrap_or(("", text));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let host = rest[..end]
        .rsplit_once('@')
        .map_or(&rest[..end], |(_, h)| h);
    let path = rest[end..].split(['?', '#']).next().unwrap_or_default();
    if scheme.is_empty() {
        format!("{host}{path}")
    } else {
        format!("{scheme}://{host}{path}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_ports_and_paths() {
        let u = Url::parse("http://127.0.0.1:8000").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8000, "/")
        );
        assert_eq!(u.authority, "127.0.0.1:8000");
        let u = Url::parse("HTTP://[::1]:9/hook?x=1#frag").unwrap();
        assert_eq!(
            (u.scheme.as_str(), u.host.as_str(), u.port),
            ("http", "::1", 9)
        );
        assert_eq!(
            (u.authority.as_str(), u.path.as_str()),
            ("[::1]:9", "/hook?x=1")
        );
        assert_eq!(u.redacted(), "http://[::1]:9/hook");
        let u = Url::parse("https://bill.example/usage").unwrap();
        assert_eq!((u.port, u.authority.as_str()), (443, "bill.example"));
        assert_eq!(Url::parse("amqp://mq").unwrap().port, 5672);
        for bad in [
            "",
            "127.0.0.1:8000",
            "http://",
            "http://h:x",
            "http://h:99999",
            "ftp://h/x",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_are_kept_apart_and_never_printed() {
        let u = Url::parse("https://billing:p%40ss@bill.example:8443/hook?k=v").unwrap();
        assert_eq!(u.credentials, Some(("billing".into(), "p@ss".into())));
        assert_eq!(u.authority, "bill.example:8443");
        assert_eq!(
            u.without_credentials(),
            "https://bill.example:8443/hook?k=v"
        );
        assert_eq!(u.redacted(), "https://bill.example:8443/hook");
        assert_eq!(u.basic_auth().as_deref(), Some("Basic YmlsbGluZzpwQHNz"));
        // An @ in the path is not userinfo.
        let u = Url::parse("http://h:1/a@b").unwrap();
        assert_eq!((u.credentials, u.path.as_str()), (None, "/a@b"));
        assert_eq!(
            redact("amqp://u:secret@mq:5672/%2f?heartbeat=5"),
            "amqp://mq:5672/%2f"
        );
        assert_eq!(redact("not a url u:p@x"), "x");
    }
}
