//! TLS for the HTTP listener (discovery, JWKS, revocation feed, metrics), from a
//! certificate and key PEM pair named in `[http_tls]`, picked up again when the files
//! change.
//!
//! Why: on plain HTTP an attacker on the path can substitute the JWKS or withhold the
//! revocation feed from relying parties (threat model T8, T11, I5). Certificates for this
//! listener are typically short-lived and rotated by a tool (cert-manager, an ACME client)
//! that rewrites the files in place, so the listener must follow them without a restart.
//!
//! How: a rustls [`ResolvesServerCert`] that, at most once per [`RECHECK`], looks at the
//! two files' metadata (modification time, size, inode) during a handshake and re-reads
//! them when it changed. A pair that does not load, or whose key does not match the
//! certificate (the rotation tool wrote one file and not yet the other), is not served:
//! the previous pair stays in use and the next handshake looks again. The handshakes
//! themselves run concurrently with the gRPC listener's accept loop
//! ([`super::tls::incoming`]: per-peer connection bound, handshake timeout).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

use super::tls::TlsConn;

/// How often, at most, a handshake looks at the files for a change.
pub const RECHECK: Duration = Duration::from_secs(1);

/// What identifies one version of a file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

/// The pair in use, and what was last seen on disk.
#[derive(Debug)]
struct State {
    current: Arc<CertifiedKey>,
    /// The files' stamps when `current` was loaded, or when a later version failed to
    /// load (so a broken pair is reported once, not on every handshake).
    seen: (Stamp, Stamp),
    checked: Instant,
}

/// Serves the certificate in `cert_file` with the key in `key_file`, re-read on change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    state: Mutex<State>,
}

impl ReloadingCert {
    /// Loads the pair now: a broker whose HTTPS certificate cannot be read does not start.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, String> {
        let seen = (
            stamp(cert_file)
                .map_err(|e| format!("http_tls.cert_file {}: {e}", cert_file.display()))?,
            stamp(key_file)
                .map_err(|e| format!("http_tls.key_file {}: {e}", key_file.display()))?,
        );
        let current = Arc::new(load_pair(cert_file, key_file)?);
        Ok(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            state: Mutex::new(State {
                current,
                seen,
                checked: Instant::now(),
            }),
        })
    }

    /// The pair to serve now, after looking for a new one if [`RECHECK`] has passed.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.checked.elapsed() < RECHECK {
            return state.current.clone();
        }
        state.checked = Instant::now();
        let (Ok(cert), Ok(key)) = (stamp(&self.cert_file), stamp(&self.key_file)) else {
            // Mid-rotation (a file renamed away) or gone: keep serving what we have.
            return state.current.clone();
        };
        if (cert, key) == state.seen {
            return state.current.clone();
        }
        state.seen = (cert, key);
        match load_pair(&self.cert_file, &self.key_file) {
            Ok(pair) => {
                state.current = Arc::new(pair);
                tracing::info!(
                    cert_file = %self.cert_file.display(),
                    "HTTP listener: new TLS certificate loaded"
                );
            }
            // Typically the key and certificate were caught between two writes: the
            // next change of either file is looked at again.
            Err(e) => tracing::warn!(
                error = %e,
                "HTTP listener: TLS certificate files changed but do not load; serving the previous certificate"
            ),
        }
        state.current.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Reads a certificate chain (leaf first) and its private key (PKCS#8, SEC1 or PKCS#1),
/// and checks that they belong together.
fn load_pair(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, String> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("http_tls.cert_file {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "http_tls.cert_file {}: no certificate",
            cert_file.display()
        ));
    }
    // The key's bytes are not part of any message.
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("http_tls.key_file {}: {e}", key_file.display()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("http_tls.key_file {}: {e}", key_file.display()))?;
    let pair = CertifiedKey::new(certs, signer);
    pair.keys_match().map_err(|e| {
        format!(
            "http_tls: the key in {} does not belong to the certificate in {}: {e}",
            key_file.display(),
            cert_file.display()
        )
    })?;
    Ok(pair)
}

/// The listener's TLS config: HTTP/1.1, no client certificates, the ring provider.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let resolver = Arc::new(ReloadingCert::load(cert_file, key_file)?);
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("http_tls: {e}"))?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// An axum listener yielding connections whose TLS handshake has completed.
pub struct HttpsListener {
    conns: ReceiverStream<io::Result<TlsConn>>,
    local: SocketAddr,
}

impl HttpsListener {
    /// Takes over `listener`: handshakes run concurrently, bounded per peer and in time.
    pub fn new(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        max_per_peer: usize,
        handshake_timeout: Duration,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            conns: super::tls::incoming(listener, config, max_per_peer, handshake_timeout),
            local,
        })
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TlsConn, SocketAddr) {
        loop {
            match self.conns.next().await {
                Some(Ok(conn)) => {
                    let remote = tonic::transport::server::Connected::connect_info(&conn)
                        .remote
                        .unwrap_or(self.local);
                    return (conn, remote);
                }
                Some(Err(e)) => tracing::debug!(error = %e, "HTTPS accept failed"),
                // The accept loop only ends when this listener is dropped.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
