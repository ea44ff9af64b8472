//! TLS with rustls (ring, no OpenSSL), on both sides.
//!
//! - **Listener** (`tls: {cert, key, client_ca}`): TLS 1.3 and 1.2 with rustls's
//!   defaults (AEAD suites with forward secrecy only), ALPN `http/1.1`, the whole
//!   chain in `cert` sent. With `client_ca`, every caller must present a certificate
//!   issued by it. Built again at each reload: new connections get the new pair,
//!   connections already open keep theirs.
//! - **Backends** (`https://`): verified against the Mozilla roots compiled in
//!   (webpki-roots: the same on every host, no dependence on the system's store) or
//!   the backend's `ca_file`; the URL's host is the SNI and the name checked.
//!   `tls_insecure_skip_verify` accepts any certificate (signatures are still
//!   checked, so the handshake is sound; the peer is just not authenticated).
//!
//! The bytes are driven by `crate::io::Io`, which holds a `rustls::Connection` beside
//! its socket: no second I/O layer on the request path.

use crate::config::TlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::sync::Arc;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// What `--check` and `/metrics` say about a certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub subject: String,
    /// Unix seconds.
    pub not_after: i64,
}

impl CertInfo {
    pub fn seconds_left(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.not_after - now
    }
}

/// The listener's TLS, ready for new connections.
pub struct Listener {
    pub config: Arc<rustls::ServerConfig>,
    pub cert: CertInfo,
}

fn certs(path: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{what}: {path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: {path}: no PEM certificate in it"));
    }
    Ok(certs)
}

fn roots(path: &str, what: &str) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(path, what)? {
        roots.add(c).map_err(|e| format!("{what}: {path}: {e}"))?;
    }
    Ok(roots)
}

/// The subject and expiry of a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("cannot read the certificate: {e}"))?;
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Reads `cfg`'s files (the key's contents never reach a message) and builds the
/// listener's configuration.
pub fn listener(cfg: &TlsConfig) -> Result<Listener, String> {
    let chain = certs(&cfg.cert, "tls.cert")?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| {
        format!(
            "tls.key: {}: no PEM private key could be read ({})",
            cfg.key,
            match e {
                rustls::pki_types::pem::Error::Io(io) => io.to_string(),
                _ => "not a PEM key".into(),
            }
        )
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| format!("tls: {e}"))?;
    let builder = match &cfg.client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca, "tls.client_ca")?),
                provider(),
            )
            .build()
            .map_err(|e| format!("tls.client_ca: {ca}: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let cert = cert_info(&chain[0]).map_err(|e| format!("tls.cert: {}: {e}", cfg.cert))?;
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls: {} and {} do not make a pair: {e}", cfg.cert, cfg.key))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Listener {
        config: Arc::new(config),
        cert,
    })
}

/// A backend's TLS: its configuration and the name its certificate must carry.
#[derive(Debug)]
pub struct Client {
    pub config: Arc<rustls::ClientConfig>,
    pub name: ServerName<'static>,
}

/// The TLS for an `https://` backend on `host`.
pub fn client(host: &str, ca_file: Option<&str>, insecure: bool) -> Result<Client, String> {
    let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
        .map_err(|e| format!("\"{host}\" is not a TLS server name: {e}"))?
        .to_owned();
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| format!("tls: {e}"))?;
    let mut config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
            .with_no_client_auth()
    } else {
        let roots = match ca_file {
            Some(path) => roots(path, "ca_file")?,
            None => rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Client {
        config: Arc::new(config),
        name,
    })
}

/// `tls_insecure_skip_verify`: any certificate, any name. Handshake signatures are
/// still verified with the provider's algorithms.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
