//! The one outbound HTTP client: the Vault and STS backends (`issuer`), approver webhooks
//! (`notify`) and the relying-party library's fetches of discovery, JWKS and the revocation
//! feed (`relying_party`) all go through [`HttpClient`], so TLS, trust, proxies, timeouts
//! and the bound on what is read are decided once, here.
//!
//! * **TLS** is rustls on the **ring** provider, named here for each client
//!   (`tls_backend_preconfigured`). reqwest is built without a provider of its own
//!   (`rustls-no-provider`), so it never consults the process-wide default and nothing here
//!   installs one: aws-lc-rs is not in the build, and a second provider cannot appear to
//!   upset tonic's TLS. TLS 1.2 and 1.3, HTTP/1.1.
//! * **Trust** is [`Trust::System`], the platform's trust store as `rustls-native-certs`
//!   reads it (`SSL_CERT_FILE` / `SSL_CERT_DIR` when set, else the OpenSSL locations of the
//!   distribution, e.g. `/etc/ssl/certs/ca-certificates.crt` on Debian), or
//!   [`Trust::CaFile`], a PEM bundle from the config (`[vault] ca_file`, `[aws_sts]
//!   ca_file`) that **replaces** the system store for that client: a backend on a private CA
//!   is then trusted through that CA only, as these settings have always meant.
//! * **Proxies** come from `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` (and
//!   their lower-case forms), read by reqwest when a client is built.
//! * **Pooled**: a client keeps idle connections (90 s) and clones share them; callers keep
//!   one client per configured destination rather than one per request.
//! * **Bounded**: a connect timeout, a whole-request timeout (connect to last body byte), and
//!   a cap on the body read ([`Options::max_body`]): the far end is never trusted to be
//!   small or quick. Chunked bodies are read like any other.
//! * **Redirects are not followed**: a 3xx is handed back as it is. Following one would
//!   resend headers such as `X-Vault-Token` to wherever the answer points.
//! * **Errors never carry a URL's path or query** (a webhook URL may hold a receiver's
//!   token), only `scheme://host:port` and what went wrong.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use rustls::pki_types::{pem::PemObject as _, CertificateDer};
use rustls::RootCertStore;

/// Which certificate authorities a client trusts for `https`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The platform's trust store (read once per process).
    System,
    /// Only the CAs of this PEM bundle.
    CaFile(PathBuf),
}

impl Trust {
    /// The trusted CAs (a CA file is read on every call, so a replaced file is picked up
    /// by the next client built).
    pub fn roots(&self) -> Result<Arc<RootCertStore>, HttpError> {
        match self {
            Trust::System => Ok(system_roots()),
            Trust::CaFile(path) => file_roots(path),
        }
    }

    /// A TLS client config (ring, TLS 1.2+) that trusts these CAs and presents no
    /// certificate: every outbound TLS connection (HTTPS, syslog, OTLP) starts here.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, HttpError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| HttpError(format!("TLS: {e}")))?
            .with_root_certificates(self.roots()?)
            .with_no_client_auth())
    }

    /// `CaFile` when a file is configured, else `System`.
    pub fn from_ca_file(ca_file: Option<&std::path::Path>) -> Self {
        match ca_file {
            Some(p) => Trust::CaFile(p.to_owned()),
            None => Trust::System,
        }
    }
}

/// How a client is built.
#[derive(Debug, Clone)]
pub struct Options {
    /// CAs trusted for `https`.
    pub trust: Trust,
    /// Longest wait for a TCP (and proxy) connection.
    pub connect_timeout: Duration,
    /// Longest a whole request may take, from connecting to the last byte of the body.
    pub timeout: Duration,
    /// Largest body read; a longer one fails the request.
    pub max_body: usize,
}

impl Options {
    /// 10 s to connect, 30 s in all, 1 MiB of body: backend answers are a few KiB.
    pub fn new(trust: Trust) -> Self {
        Self {
            trust,
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
            max_body: 1 << 20,
        }
    }
}

/// A failed request or client: transport, TLS, timeout, or a body over the bound. Names only
/// `scheme://host:port` of the URL; never a header, a body or a path.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct HttpError(String);

/// An answer: status, headers and the whole body (within [`Options::max_body`]).
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A pooled HTTP(S) client. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct HttpClient {
    inner: reqwest::Client,
    max_body: usize,
    anchors: usize,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("trust_anchors", &self.anchors)
            .field("max_body", &self.max_body)
            .finish()
    }
}

/// The platform's trust store, read once: every client built with [`Trust::System`] shares
/// it, and a store that cannot be read is not retried per client.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the platform's trust store");
            }
            let mut roots = RootCertStore::empty();
            // Stores carry the odd certificate rustls cannot use; those are skipped.
            let (added, skipped) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!(
                    "the platform's trust store has no usable CA certificate: https to \
                     servers without a configured ca_file will fail"
                );
            } else {
                tracing::debug!(added, skipped, "platform trust store loaded");
            }
            Arc::new(roots)
        })
        .clone()
}

fn file_roots(path: &std::path::Path) -> Result<Arc<RootCertStore>, HttpError> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| HttpError(format!("{shown}: {e}")))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| HttpError(format!("{shown}: {e:?}")))?;
        // Bundles carry the odd certificate rustls cannot use; those are skipped.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(HttpError(format!("{shown}: no CA certificates")));
    }
    Ok(Arc::new(roots))
}

/// `scheme://host[:port]` of a URI: the only part of a URL an error or log may show.
fn origin(uri: &http::Uri) -> String {
    format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("?"),
        uri.authority().map(|a| a.as_str()).unwrap_or("?")
    )
}

/// What went wrong, with the chain of causes, without the URL (`without_url`) that reqwest
/// would otherwise print whole.
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = if e.is_timeout() {
        "timed out".to_owned()
    } else {
        e.to_string()
    };
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

impl HttpClient {
    /// A client as `options` say. Fails if a CA file cannot be read or holds no certificate.
    pub fn new(options: &Options) -> Result<Self, HttpError> {
        let mut tls = options.trust.client_config()?;
        let anchors = options.trust.roots()?.len();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let inner = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(options.connect_timeout)
            .timeout(options.timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("spiffe-broker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| HttpError(format!("HTTP client: {}", describe(e))))?;
        Ok(Self {
            inner,
            max_body: options.max_body,
            anchors,
        })
    }

    /// How many CAs this client trusts (0: `https` cannot succeed).
    pub fn trust_anchors(&self) -> usize {
        self.anchors
    }

    /// Sends `req` and reads the whole answer (any status), within the body bound.
    pub async fn send(&self, req: http::Request<Vec<u8>>) -> Result<Response, HttpError> {
        let at = origin(req.uri());
        let mut resp = self.execute(req, &at).await?;
        let too_large = || {
            HttpError(format!(
                "{at}: the answer is larger than {} bytes",
                self.max_body
            ))
        };
        if resp
            .content_length()
            .is_some_and(|n| n > self.max_body as u64)
        {
            return Err(too_large());
        }
        let status = resp.status();
        let headers = std::mem::take(resp.headers_mut());
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| HttpError(format!("{at}: reading the answer: {}", describe(e))))?
        {
            if body.len() + chunk.len() > self.max_body {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Response {
            status,
            headers,
            body: Bytes::from(body),
        })
    }

    /// GETs `url` and returns the body of a 200 answer; any other status is an error.
    pub async fn get_ok(&self, url: &str) -> Result<Bytes, HttpError> {
        let req = http::Request::get(url)
            .body(Vec::new())
            .map_err(|e| HttpError(format!("{url}: {e}")))?;
        let resp = self.send(req).await?;
        if resp.status != StatusCode::OK {
            return Err(HttpError(format!("{url}: HTTP {}", resp.status)));
        }
        Ok(resp.body)
    }

    /// An OpenID issuer's discovery document
    /// (`{issuer}/.well-known/openid-configuration`), which must name exactly `issuer`.
    pub async fn discover(&self, issuer: &str) -> Result<serde_json::Value, HttpError> {
        let disc: serde_json::Value = serde_json::from_slice(
            &self
                .get_ok(&format!("{issuer}/.well-known/openid-configuration"))
                .await?,
        )
        .map_err(|e| HttpError(format!("{issuer}: discovery: {e}")))?;
        if disc["issuer"].as_str() != Some(issuer) {
            return Err(HttpError(format!(
                "{issuer}: discovery names a different issuer"
            )));
        }
        Ok(disc)
    }

    /// The JWKS of an OpenID issuer, found through its discovery document.
    pub async fn discover_jwks(&self, issuer: &str) -> Result<crate::jose::JwkSet, HttpError> {
        let disc = self.discover(issuer).await?;
        let uri = disc["jwks_uri"]
            .as_str()
            .ok_or_else(|| HttpError(format!("{issuer}: discovery has no jwks_uri")))?;
        serde_json::from_slice(&self.get_ok(uri).await?)
            .map_err(|e| HttpError(format!("{issuer}: JWKS: {e}")))
    }

    /// Sends `req` and returns only the status; the body is not read (the connection is
    /// then not reused unless the body was empty).
    pub async fn send_for_status(
        &self,
        req: http::Request<Vec<u8>>,
    ) -> Result<StatusCode, HttpError> {
        let at = origin(req.uri());
        Ok(self.execute(req, &at).await?.status())
    }

    async fn execute(
        &self,
        req: http::Request<Vec<u8>>,
        at: &str,
    ) -> Result<reqwest::Response, HttpError> {
        let req = reqwest::Request::try_from(req)
            .map_err(|e| HttpError(format!("{at}: bad request: {}", describe(e))))?;
        self.inner
            .execute(req)
            .await
            .map_err(|e| HttpError(format!("{at}: {}", describe(e))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Write as _;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    /// A CA and a server certificate for `localhost` / 127.0.0.1 it signed.
    struct Pki {
        ca_pem: String,
        server: rustls::ServerConfig,
    }

    fn pki() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "http_client test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        Pki {
            ca_pem: ca_cert.pem(),
            server,
        }
    }

    /// An HTTPS server answering every request with `answer` (raw HTTP/1.1 bytes).
    async fn https_server(server: rustls::ServerConfig, answer: &'static [u8]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = tls.write_all(answer).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        format!("https://localhost:{}", addr.port())
    }

    fn ca_file(pem: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(pem.as_bytes()).unwrap();
        f
    }

    fn get(url: &str) -> http::Request<Vec<u8>> {
        http::Request::get(url).body(Vec::new()).unwrap()
    }

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";

    #[tokio::test]
    async fn https_with_a_ca_file_reads_a_chunked_body() {
        let pki = pki();
        let base = https_server(pki.server, CHUNKED).await;
        let ca = ca_file(&pki.ca_pem);
        let client = HttpClient::new(&Options::new(Trust::CaFile(ca.path().to_owned()))).unwrap();
        assert_eq!(client.trust_anchors(), 1);
        let resp = client.send(get(&format!("{base}/x"))).await.unwrap();
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(&resp.body[..], b"hello world");
    }

    #[tokio::test]
    async fn a_server_outside_the_trusted_cas_is_refused() {
        let pki = pki();
        let base = https_server(pki.server, CHUNKED).await;
        // Another CA in the file, and the system store: neither signed the server.
        let other = ca_file(&self::pki().ca_pem);
        for trust in [Trust::CaFile(other.path().to_owned()), Trust::System] {
            let client = HttpClient::new(&Options::new(trust)).unwrap();
            let err = client
                .send(get(&format!("{base}/secret-path?token=t0k3n")))
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("certificate"), "{err}");
            // Only scheme://host:port, never the path or query.
            assert!(err.starts_with(&base), "{err}");
            assert!(
                !err.contains("secret-path") && !err.contains("t0k3n"),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn the_body_bound_holds_for_chunked_and_sized_answers() {
        let pki = pki();
        let ca = ca_file(&pki.ca_pem);
        let options = Options {
            max_body: 8,
            ..Options::new(Trust::CaFile(ca.path().to_owned()))
        };
        let client = HttpClient::new(&options).unwrap();
        let chunked = https_server(pki.server.clone(), CHUNKED).await;
        let err = client.send(get(&chunked)).await.unwrap_err().to_string();
        assert!(err.contains("larger than 8 bytes"), "{err}");
        let sized = https_server(
            pki.server,
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\n123456789",
        )
        .await;
        let err = client.send(get(&sized)).await.unwrap_err().to_string();
        assert!(err.contains("larger than 8 bytes"), "{err}");
    }

    #[tokio::test]
    async fn redirects_are_handed_back_not_followed() {
        let pki = pki();
        let base = https_server(
            pki.server,
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: https://elsewhere.invalid/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        let ca = ca_file(&pki.ca_pem);
        let client = HttpClient::new(&Options::new(Trust::CaFile(ca.path().to_owned()))).unwrap();
        let resp = client.send(get(&base)).await.unwrap();
        assert_eq!(resp.status, StatusCode::TEMPORARY_REDIRECT);
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let empty = ca_file("not a certificate\n");
        let err = HttpClient::new(&Options::new(Trust::CaFile(empty.path().to_owned())))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no CA certificates"), "{err}");
        let missing = Trust::CaFile("/nonexistent/ca.pem".into());
        assert!(HttpClient::new(&Options::new(missing)).is_err());
    }

    #[tokio::test]
    async fn timeouts_are_reported_as_such() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            // Accept and never answer.
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let options = Options {
            timeout: Duration::from_millis(200),
            ..Options::new(Trust::System)
        };
        let client = HttpClient::new(&options).unwrap();
        let err = client
            .send(get(&format!("http://{addr}/")))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("timed out"), "{err}");
    }
}
