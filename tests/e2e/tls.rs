//! TLS on both sides, with certificates made here (rcgen): the official openai SDK
//! through the TLS listener, a certificate swapped by SIGHUP under a stream, client
//! certificates, an https backend behind nginx (Debian's, started here), and hostile
//! handshakes.

use crate::harness::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        Ca {
            issuer: CertifiedIssuer::self_signed(ca_params(name), KeyPair::generate().unwrap())
                .unwrap(),
        }
    }

    /// An intermediate CA signed by this one.
    fn intermediate(&self, name: &str) -> Ca {
        Ca {
            issuer: CertifiedIssuer::signed_by(
                ca_params(name),
                KeyPair::generate().unwrap(),
                &self.issuer,
            )
            .unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for localhost and 127.0.0.1 (or a client): (cert PEM, key PEM).
    fn leaf(&self, cn: &str, client: bool) -> (String, String) {
        self.leaf_until(cn, client, None)
    }

    /// `leaf`, valid until the UTC day `until` (year, month, day) if given.
    fn leaf_until(&self, cn: &str, client: bool, until: Option<(i32, u8, u8)>) -> (String, String) {
        let mut p =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        if let Some((y, m, d)) = until {
            p.not_after = rcgen::date_time_ymd(y, m, d);
        }
        p.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// Files for the listener: `cert.pem` (leaf + intermediate: the chain sent in full),
/// `key.pem`, and `ca.pem` (the root a caller trusts).
struct Pki {
    dir: PathBuf,
    root: Ca,
    inter: Ca,
}

impl Pki {
    fn new() -> Pki {
        let root = Ca::new("LLMProxy Test Root");
        let inter = root.intermediate("LLMProxy Test Intermediate");
        let p = Pki {
            dir: temp_dir(),
            root,
            inter,
        };
        std::fs::write(p.path("ca.pem"), p.root.pem()).unwrap();
        p.issue("first");
        p
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A new server certificate named `cn` in cert.pem and key.pem.
    fn issue(&self, cn: &str) {
        let (cert, key) = self.inter.leaf(cn, false);
        write_atomically(
            &self.path("cert.pem"),
            &format!("{cert}{}", self.inter.pem()),
        );
        write_atomically(&self.path("key.pem"), &key);
    }

    fn yaml(&self, extra: &str) -> String {
        format!(
            "tls:\n  cert: \"{}\"\n  key: \"{}\"\n{extra}limits:\n  header_timeout: 1s\n",
            self.path("cert.pem").display(),
            self.path("key.pem").display()
        )
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client trusting `ca_pem`, presenting `client` (cert, key PEM) if given.
fn client_config(ca_pem: &str, client: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match client {
        Some((cert, key)) => b
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    })
}

/// One request over TLS (`Connection: close`): the server certificate's subject and
/// the whole response, or the error that ended it.
fn tls_request(
    addr: &str,
    cfg: &Arc<rustls::ClientConfig>,
    request: &str,
) -> Result<(String, String), String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(cfg.clone(), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let res = tls.read_to_end(&mut out);
    let subject = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|der| {
            x509_parser::parse_x509_certificate(der)
                .unwrap()
                .1
                .subject()
                .to_string()
        })
        .unwrap_or_default();
    match res {
        Ok(_) => Ok((subject, String::from_utf8_lossy(&out).into_owned())),
        Err(e) if !out.is_empty() => Err(format!("{e} after {}", String::from_utf8_lossy(&out))),
        Err(e) => Err(e.to_string()),
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
}

fn chat_request(id: &str, stream: bool, tokens: u64, delay_ms: u64) -> String {
    let body = serde_json::json!({
        "model": "mock-model", "stream": stream, "max_tokens": tokens,
        "messages": [{"role": "user", "content": "one two three four five"}],
    })
    .to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nX-Request-Id: {id}\r\nx-mock-token-delay-ms: {delay_ms}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A metric read over TLS.
fn tls_metric(addr: &str, cfg: &Arc<rustls::ClientConfig>, name: &str) -> f64 {
    let (_, text) = tls_request(addr, cfg, &get("/metrics")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

#[test]
fn the_openai_sdk_streams_through_the_tls_listener_and_a_wrong_ca_fails() {
    let pki = Pki::new();
    let s = Stack::with(&pki.yaml(""), &[]);
    let other = temp_dir().join("other-ca.pem");
    std::fs::write(&other, Ca::new("Someone Else").pem()).unwrap();
    let port = s.addr().rsplit(':').next().unwrap();
    let out = std::process::Command::new(python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk_tls.py"))
        .arg(format!("https://localhost:{port}/v1"))
        .arg(pki.path("ca.pem"))
        .arg(&other)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Metered as over plain HTTP: the records carry the backend's counts.
    assert_eq!(s.record("tls-chat")["total_tokens"], 9);
    assert_eq!(s.record("tls-stream")["total_tokens"], 8);
    let cfg = client_config(&pki.root.pem(), None);
    // The wrong CA's handshake failed before any request: no record of it.
    let failures = tls_metric(s.addr(), &cfg, "llmproxy_tls_handshake_failures_total");
    assert!(failures >= 1.0, "{failures}");
    let expiry = tls_metric(s.addr(), &cfg, "llmproxy_tls_cert_expiry_seconds");
    assert!(
        expiry > 4.0e9,
        "rcgen's default validity ends in 4096: {expiry}"
    );
    assert!(
        !fetch_records(&s.receiver)
            .iter()
            .any(|r| is_record_of(r, "tls-wrong-ca"))
    );
}

#[test]
fn sighup_swaps_the_certificate_under_a_stream_and_a_bad_pair_is_refused() {
    let pki = Pki::new();
    let s = Stack::with(&pki.yaml(""), &[]);
    let cfg = client_config(&pki.root.pem(), None);
    let (subject, _) = tls_request(s.addr(), &cfg, &get("/health")).unwrap();
    assert_eq!(subject, "CN=first");
    // A stream of 20 tokens, 100 ms apart, on a connection made with the first pair.
    let (addr, c) = (s.addr().to_string(), cfg.clone());
    let stream = std::thread::spawn(move || {
        tls_request(&addr, &c, &chat_request("tls-reload", true, 20, 100))
    });
    std::thread::sleep(Duration::from_millis(500));
    pki.issue("second");
    s.proxy.signal(libc::SIGHUP);
    wait_until("the new pair is loaded", 10, || {
        s.proxy.output().contains("tls: ") && s.proxy.output().contains("loaded")
    });
    let (subject, _) = tls_request(s.addr(), &cfg, &get("/health")).unwrap();
    assert_eq!(subject, "CN=second");
    // The stream in flight finished on its first-pair connection, whole.
    let (subject, body) = stream.join().unwrap().unwrap();
    assert_eq!(subject, "CN=first");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert_eq!(body.matches("tok").count(), 20, "{body}");
    assert!(body.contains("data: [DONE]"));
    assert_eq!(s.record("tls-reload")["completion_tokens"], 20);
    // A key that does not match the certificate: refused, the second pair stays.
    let (other_cert, _) = pki.inter.leaf("third", false);
    write_atomically(&pki.path("cert.pem"), &other_cert);
    s.proxy.signal(libc::SIGHUP);
    wait_until("the bad pair is refused", 10, || {
        s.proxy.output().contains("reload refused")
    });
    let (subject, _) = tls_request(s.addr(), &cfg, &get("/health")).unwrap();
    assert_eq!(subject, "CN=second");
}

#[test]
fn client_certificates_are_required_when_a_client_ca_is_set() {
    let pki = Pki::new();
    let callers = Ca::new("Callers CA");
    let ca_path = pki.path("callers.pem");
    std::fs::write(&ca_path, callers.pem()).unwrap();
    let s = Stack::with(
        &pki.yaml(&format!("  client_ca: \"{}\"\n", ca_path.display())),
        &[],
    );
    let (cert, key) = callers.leaf("caller-1", true);
    let with = client_config(&pki.root.pem(), Some((&cert, &key)));
    let (_, body) = tls_request(s.addr(), &with, &chat_request("mtls", false, 2, 0)).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    s.record("mtls");
    // No certificate, or one from another CA: the handshake fails.
    let without = client_config(&pki.root.pem(), None);
    assert!(tls_request(s.addr(), &without, &get("/health")).is_err());
    let (cert, key) = Ca::new("Stranger").leaf("caller-2", true);
    let stranger = client_config(&pki.root.pem(), Some((&cert, &key)));
    assert!(tls_request(s.addr(), &stranger, &get("/health")).is_err());
}

#[test]
fn hostile_handshakes_are_closed_and_others_are_served() {
    let pki = Pki::new();
    let s = Stack::with(&pki.yaml(""), &[]);
    let cfg = client_config(&pki.root.pem(), None);
    let closes_within = |mut c: TcpStream, secs: u64| {
        c.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    };
    // A ClientHello of garbage: an alert and a close.
    let mut c = TcpStream::connect(s.addr()).unwrap();
    let mut junk = vec![0x16, 0x03, 0x01, 0x01, 0x00];
    junk.extend((0..256u32).map(|i| (i * 7919 % 251) as u8));
    c.write_all(&junk).unwrap();
    assert!(closes_within(c, 5), "garbage ClientHello not closed");
    // Plain HTTP on the TLS port: told so in plain HTTP, then closed.
    let mut c = TcpStream::connect(s.addr()).unwrap();
    c.write_all(get("/health").as_bytes()).unwrap();
    let mut answer = String::new();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = c.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("speaks TLS"), "{answer}");
    // A handshake that stalls is closed at header_timeout (1 s here).
    let mut c = TcpStream::connect(s.addr()).unwrap();
    c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
    let t = Instant::now();
    assert!(closes_within(c, 5), "a stalled handshake was not closed");
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );

    // 2,000 connections that never finish their handshake, while others are served.
    raise_fd_limit();
    let stalled: Vec<TcpStream> = (0..2000)
        .map(|_| {
            let mut c = TcpStream::connect(s.addr()).unwrap();
            let _ = c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]);
            c
        })
        .collect();
    let (_, body) = tls_request(s.addr(), &cfg, &chat_request("amid-stalls", false, 2, 0))
        .expect("served while 2,000 handshakes stall");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    s.record("amid-stalls");
    wait_until("the stalled handshakes are closed", 20, || {
        tls_metric(s.addr(), &cfg, "llmproxy_tls_handshake_failures_total") >= 2003.0
    });
    drop(stalled);
    let (_, body) = tls_request(s.addr(), &cfg, &get("/health")).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(65_536);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// nginx from Debian terminating TLS in front of the mock, on a free port.
struct Nginx {
    child: std::process::Child,
    port: u16,
    dir: PathBuf,
}

impl Nginx {
    fn start(pki: &Pki, upstream: &str) -> Option<Nginx> {
        let bin = "/usr/sbin/nginx";
        if !installed(bin, "LLMPROXY_REQUIRE_NGINX", "nginx-light") {
            return None;
        }
        let dir = temp_dir();
        let port = free_port();
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 256; }}\nhttp {{\n  log_format reuse '$connection $connection_requests $request_uri';\n  access_log {d}/access.log reuse;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  upstream mock {{ server {upstream}; keepalive 8; }}\n  server {{\n    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    location / {{ proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }}\n  }}\n}}\n",
            d = dir.display(),
            cert = pki.path("cert.pem").display(),
            key = pki.path("key.pem").display(),
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir)
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .expect("start nginx");
        wait_until("nginx listening", 10, || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(Nginx { child, port, dir })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (SIGKILL would leave them running).
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_https_backend_behind_nginx_is_relayed_metered_and_its_connections_reused() {
    let pki = Pki::new();
    let backend = mock(&[]);
    let Some(nginx) = Nginx::start(&pki, &backend.addr) else {
        return;
    };
    let receiver = receiver(&[]);
    let config = |ca: &Path| {
        format!(
            "listen: \"127.0.0.1:0\"\nworkers: 1\nbackends:\n  - url: \"https://localhost:{}\"\n    ca_file: \"{}\"\nusage_hook:\n  enabled: true\n  url: \"http://{}/llm-usage\"\n",
            nginx.port,
            ca.display(),
            receiver.addr
        )
    };
    let proxy = proxy_with_config(&config(&pki.path("ca.pem")));
    // The health check speaks TLS to it too, with the same CA.
    assert!(
        proxy.output().contains(") is healthy"),
        "{}",
        proxy.output()
    );
    for i in 0..5 {
        let id = format!("via-nginx-{i}");
        let r = post_json(
            &proxy.addr,
            "/v1/chat/completions",
            &[("x-request-id", &id)],
            &chat(i % 2 == 0, 3),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let rec = wait_record(&receiver, &id);
        assert_eq!(rec["completion_tokens"], 3);
        assert_eq!(rec["usage_source"], "backend");
    }
    // One pooled TLS connection carried them (nginx counts requests per connection).
    let log = std::fs::read_to_string(nginx.dir.join("access.log")).unwrap();
    let most = log
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    assert!(most >= 4, "connections not reused: {log}");
    // TLS at both ends (caller -> proxy -> nginx -> mock): the stream's bytes are the
    // backend's, byte for byte, however the records cut them.
    let both = proxy_with_config(&format!("{}{}", config(&pki.path("ca.pem")), pki.yaml("")));
    let cfg = client_config(&pki.root.pem(), None);
    let mut body = chat(true, 40);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let direct = post_json(
        &backend.addr,
        "/v1/chat/completions",
        &[("x-mock-token-delay-ms", "2")],
        &body,
    );
    assert_eq!(direct.status, 200);
    let text = body.to_string();
    let (_, raw) = tls_request(
        &both.addr,
        &cfg,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nx-mock-token-delay-ms: 2\r\nX-Request-Id: tls-both\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        ),
    )
    .unwrap();
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert_eq!(dechunk(rest), direct.text());
    assert_eq!(wait_record(&receiver, "tls-both")["completion_tokens"], 40);
    // A backend whose certificate is not from the configured CA is not trusted.
    let other = temp_dir().join("other.pem");
    std::fs::write(&other, Ca::new("Someone Else").pem()).unwrap();
    let proxy2 = proxy_with_config(&config(&other));
    assert!(proxy2.output().contains(") is down"), "{}", proxy2.output());
    let r = post_json(&proxy2.addr, "/v1/chat/completions", &[], &chat(false, 1));
    assert_eq!(r.status, 502, "{}", r.text());
    // Unless verification is off for that backend, which is warned about.
    let insecure = proxy_with_config(&config(&other).replace(
        &format!("    ca_file: \"{}\"\n", other.display()),
        "    tls_insecure_skip_verify: true\n",
    ));
    assert!(
        insecure
            .output()
            .contains("tls_insecure_skip_verify is set"),
        "{}",
        insecure.output()
    );
    let r = post_json(&insecure.addr, "/v1/chat/completions", &[], &chat(false, 1));
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The payload of a chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("a chunk size line");
        let n = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
}

/// The UTC date `days` from now (Howard Hinnant's civil_from_days).
fn date_in(days: u64) -> (i32, u8, u8) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let z = (now / 86_400 + days) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    ((yoe + era * 400 + i64::from(m <= 2)) as i32, m, d)
}

#[test]
fn check_names_the_certificate_and_warns_two_weeks_before_it_expires() {
    let pki = Pki::new();
    let backend = "backends:\n  - url: \"http://127.0.0.1:9\"\n";
    let (code, out, _) = crate::cli::run_with(&format!("{backend}{}", pki.yaml("")), &["--check"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("subject CN=first"), "{out}");
    assert!(!out.contains("WARNING"), "{out}");
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    let (cert, key) = pki.inter.leaf_until("soon", false, Some(date_in(5)));
    write_atomically(&pki.path("cert.pem"), &cert);
    write_atomically(&pki.path("key.pem"), &key);
    let (code, out, _) = crate::cli::run_with(&format!("{backend}{}", pki.yaml("")), &["--check"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("subject CN=soon"), "{out}");
    assert!(out.contains("WARNING: renew it"), "{out}");
    // A key file that is not a key: named by path, its contents never shown.
    std::fs::write(pki.path("key.pem"), "secret-ish garbage").unwrap();
    let (code, _, err) = crate::cli::run_with(&format!("{backend}{}", pki.yaml("")), &["--check"]);
    assert_eq!(code, 2);
    assert!(err.contains("tls") && err.contains("key.pem"), "{err}");
    assert!(!err.contains("secret-ish"), "{err}");
}

#[test]
fn a_tls_caller_who_hangs_up_during_prefill_is_noticed_and_billed() {
    let pki = Pki::new();
    let s = Stack::with(&pki.yaml(""), &[]);
    let cfg = client_config(&pki.root.pem(), None);
    let tcp = TcpStream::connect(s.addr()).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let req = chat_request("tls-gone", true, 5, 0).replace(
        "Connection: close\r\n",
        "Connection: close\r\nx-mock-prefill-ms: 5000\r\n",
    );
    tls.write_all(req.as_bytes()).unwrap();
    tls.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // A polite goodbye (close_notify, then FIN): bytes wait in the proxy's socket
    // ahead of the end, which a plain peek would take for a pipelined request.
    tls.conn.send_close_notify();
    tls.conn.complete_io(&mut tls.sock).unwrap();
    tls.sock.shutdown(std::net::Shutdown::Both).unwrap();
    let t = Instant::now();
    let rec = s.record("tls-gone");
    assert_eq!(rec["outcome"], "client_disconnected", "{rec}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "noticed after {:?}, not during the 5 s prefill",
        t.elapsed()
    );
}
