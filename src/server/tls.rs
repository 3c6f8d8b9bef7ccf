//! mTLS termination with the broker's own rotating SVID.
//!
//! The handshake proves possession of the client's key (rustls checks the
//! CertificateVerify signature) but defers all certificate judgement to `authn`, which
//! re-validates the chain against the current bundle and clock on every request. That
//! lets a bad SVID get a gRPC UNAUTHENTICATED answer and an audit entry instead of an
//! anonymous handshake failure, and lets JWT-SVID callers connect without a certificate.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::DistinguishedName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::authn::PeerInfo;

/// Accepts any client certificate for which the peer proves key possession; `authn`
/// decides whether it is a valid SVID.
#[derive(Debug)]
pub struct DeferToAuthn {
    algs: WebPkiSupportedAlgorithms,
}

impl DeferToAuthn {
    /// With ring's signature algorithms.
    pub fn new() -> Self {
        Self {
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }
}

impl Default for DeferToAuthn {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientCertVerifier for DeferToAuthn {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    handshake_signatures!(algs);
}

/// The broker's TLS server config: its own SVID from the Workload API (following
/// rotation, via spiffe-rustls' resolver), h2 only, no session resumption.
pub fn server_config(source: spiffe::X509Source) -> Result<Arc<rustls::ServerConfig>, String> {
    // spiffe-rustls builds a resolver that follows the source's rotation; we keep it and
    // replace the client verifier with one that defers to authn.
    let spiffe_cfg = spiffe_rustls::mtls_server(source)
        .build()
        .map_err(|e| format!("cannot build TLS config from the Workload API SVID: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(Arc::new(DeferToAuthn::new()))
        .with_cert_resolver(spiffe_cfg.cert_resolver.clone());
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // Session resumption, so a workload that reconnects skips the full handshake: TLS 1.3
    // tickets sealed with a key this process rotates (rustls' ring `Ticketer`), TLS 1.2
    // session ids in memory; no 0-RTT data (replayable). A resumed session carries the
    // client's certificate chain from its full handshake, and authn re-validates that
    // chain on every request (validity now, chain to the current bundle), exactly as for
    // a full handshake: resuming grants nothing a fresh handshake would not.
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    cfg.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
    cfg.send_tls13_tickets = 1;
    Ok(Arc::new(cfg))
}

/// Completed handshakes on the gRPC listener: full, and resumed from a session.
static HANDSHAKES: [std::sync::atomic::AtomicU64; 2] = [
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
];

fn count_handshake(kind: Option<rustls::HandshakeKind>) {
    let resumed = kind == Some(rustls::HandshakeKind::Resumed);
    HANDSHAKES[usize::from(resumed)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Handshakes completed on the gRPC listener so far: `(full, resumed)`.
pub fn handshakes() -> (u64, u64) {
    let n = |i: usize| HANDSHAKES[i].load(std::sync::atomic::Ordering::Relaxed);
    (n(0), n(1))
}

/// TLS 1.2 sessions kept for resumption (TLS 1.3 tickets need no server state).
const SESSION_CACHE: usize = 4096;

/// A server-side TLS connection carrying its [`PeerInfo`].
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
    _slot: PeerSlot,
}

/// One connection's place in the per-peer count; released when the connection drops.
struct PeerSlot {
    peers: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut p = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = p.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                p.remove(&self.ip);
            }
        }
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    delegate_async_read!(inner);
}

impl AsyncWrite for TlsConn {
    delegate_async_write!(inner);
}

/// Accepts TCP connections and completes TLS handshakes concurrently, yielding
/// established connections. A slow or failed handshake never blocks the others.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    max_per_peer: usize,
    handshake_timeout: Duration,
) -> ReceiverStream<io::Result<TlsConn>> {
    let peers: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let (tx, rx) = mpsc::channel(128);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            // Bound connections per peer: one client cannot take every socket.
            let slot = {
                let mut p = peers.lock().unwrap_or_else(|e| e.into_inner());
                let n = p.entry(remote.ip()).or_insert(0);
                if *n >= max_per_peer {
                    None
                } else {
                    *n += 1;
                    Some(PeerSlot {
                        peers: peers.clone(),
                        ip: remote.ip(),
                    })
                }
            };
            let Some(slot) = slot else {
                tracing::warn!(%remote, max_per_peer, "too many connections from one peer; refusing");
                continue;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        count_handshake(tls.get_ref().1.handshake_kind());
                        let certs =
                            tls.get_ref().1.peer_certificates().map(|c| {
                                Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())
                            });
                        let info = PeerInfo {
                            remote: Some(remote),
                            certs,
                        };
                        let _ = tx
                            .send(Ok(TlsConn {
                                inner: tls,
                                info,
                                _slot: slot,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
