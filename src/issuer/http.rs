//! A small HTTP/1.1 client for the backends the broker calls (Vault, STS): one
//! connection per request, `https` through rustls with a configured CA bundle (or the
//! system one), bounded response size. Deadlines are the caller's (`tokio::time::timeout`).

use std::path::Path;
use std::sync::Arc;

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{pem::PemObject as _, CertificateDer, ServerName};

/// Largest response body read (Vault and STS answers are a few KiB).
const MAX_RESPONSE: usize = 1 << 20;

/// Where the system CA bundle lives on Debian-like systems.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A transport failure (the backend may be down); never carries secrets.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HttpError(pub String);

/// A response: status, headers, body.
pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
}

/// Connects to one base URL (`http://host:port` or `https://host[:port]`).
#[derive(Clone)]
pub struct HttpClient {
    base: String,
    host: String,
    port: u16,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("base", &self.base)
            .finish()
    }
}

impl HttpClient {
    /// A client for `base`; `ca_file` (PEM) overrides the system bundle for `https`.
    pub fn new(base: &str, ca_file: Option<&Path>) -> Result<Self, HttpError> {
        let (https, rest) = if let Some(r) = base.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = base.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(HttpError(format!("{base}: not an http(s) URL")));
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']').to_owned(),
                p.parse()
                    .map_err(|_| HttpError(format!("{base}: bad port")))?,
            ),
            _ => (authority.to_owned(), if https { 443 } else { 80 }),
        };
        let tls = if https {
            let path = ca_file.unwrap_or(Path::new(SYSTEM_CA_BUNDLE));
            let pem =
                std::fs::read(path).map_err(|e| HttpError(format!("{}: {e}", path.display())))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&pem) {
                let c = c.map_err(|e| HttpError(format!("{}: {e:?}", path.display())))?;
                // Bundles carry the odd certificate rustls cannot use; skip those.
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(HttpError(format!("{}: no CA certificates", path.display())));
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| HttpError(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            host,
            port,
            tls,
        })
    }

    /// Sends one request to `path` (starting with `/`).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Response, HttpError> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| HttpError(format!("connect {}: {e}", self.base)))?;
        let _ = tcp.set_nodelay(true);
        let host_header = if (self.tls.is_some() && self.port == 443)
            || (self.tls.is_none() && self.port == 80)
        {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host_header)
            .header("content-length", body.len());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| HttpError(format!("request: {e}")))?;
        match &self.tls {
            None => exchange(TokioIo::new(tcp), req, &self.base).await,
            Some(tls) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|_| HttpError(format!("{}: bad host name", self.base)))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| HttpError(format!("TLS to {}: {e}", self.base)))?;
                exchange(TokioIo::new(stream), req, &self.base).await
            }
        }
    }
}

async fn exchange<T>(
    io: TokioIo<T>,
    req: Request<Full<Bytes>>,
    base: &str,
) -> Result<Response, HttpError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| HttpError(format!("{base}: {e}")))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| HttpError(format!("{base}: {e}")))?;
    let (parts, body) = resp.into_parts();
    let body = Limited::new(body, MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| HttpError(format!("{base}: reading the answer: {e}")))?
        .to_bytes();
    driver.abort();
    Ok(Response {
        status: parts.status,
        body,
    })
}
