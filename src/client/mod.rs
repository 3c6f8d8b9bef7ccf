//! Reaching a broker: SPIFFE mTLS (or a JWT-SVID bearer over server-authenticated TLS)
//! to a gRPC channel. The CLI, the examples and the tests use this.

pub mod render;

use crate::clock::Clock as _;
use std::sync::Arc;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use spiffe::{SpiffeId, X509Source};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::authn::{validate_x509_svid, StaticTrust, SvidRole, TrustSource, WorkloadTrust};

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ClientError {
    message: String,
    transient: bool,
}

impl ClientError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            transient: false,
        }
    }

    fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            transient: true,
        }
    }

    /// True when trying again later may succeed: the broker or the Workload API cannot be
    /// reached now. False when something was refused (the broker presented another SPIFFE
    /// ID or an untrusted certificate, or refused ours) or the input is bad.
    pub fn is_transient(&self) -> bool {
        self.transient
    }
}

/// An error with its causes, `outer: inner: innermost` (tonic's transport error alone says
/// only "transport error"). `io::Error::source` skips the error it wraps, so that one is
/// shown too.
/// An error and its chain of causes, one line (`a: b: c`), repeats dropped.
pub fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut next = e.source();
    while let Some(e) = next {
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// Whether a connection failed in the TLS handshake (a certificate refused on either side)
/// rather than for want of a peer. `io::Error::source` skips the error it wraps, so each
/// link is also looked into.
fn tls_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        if e.is::<rustls::Error>() || inner.is_some_and(|i| i.is::<rustls::Error>()) {
            return true;
        }
        next = e.source();
    }
    false
}

/// Where the client's SVID and trust bundle come from.
#[derive(Clone)]
pub enum ClientIdentity {
    /// The SPIFFE Workload API (rotation followed).
    Workload(X509Source),
    /// Fixed files: chain (leaf first), PKCS#8 key, and the trust bundle.
    Files {
        /// Certificate chain.
        chain: Vec<CertificateDer<'static>>,
        /// PKCS#8 DER key.
        key: Arc<Vec<u8>>,
        /// Trust bundle of the broker's trust domain.
        bundle: Vec<CertificateDer<'static>>,
    },
    /// No client certificate (the caller authenticates with a JWT-SVID bearer token);
    /// the broker is still verified against the bundle.
    Anonymous {
        /// Trust bundle of the broker's trust domain.
        bundle: Vec<CertificateDer<'static>>,
    },
}

impl ClientIdentity {
    /// Loads `--svid-cert`, `--svid-key` and `--bundle` PEM files.
    pub fn from_files(
        cert: &std::path::Path,
        key: &std::path::Path,
        bundle: &std::path::Path,
    ) -> Result<Self, ClientError> {
        use rustls::pki_types::pem::PemObject;
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| ClientError::new(format!("{}: {e}", p.display())))
        };
        let chain = CertificateDer::pem_slice_iter(&read(cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::new(format!("{}: {e:?}", cert.display())))?;
        let key_der = PrivatePkcs8KeyDer::from_pem_slice(&read(key)?).map_err(|e| {
            ClientError::new(format!("{}: not a PKCS#8 PEM key: {e:?}", key.display()))
        })?;
        let bundle_certs = CertificateDer::pem_slice_iter(&read(bundle)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::new(format!("{}: {e:?}", bundle.display())))?;
        if chain.is_empty() || bundle_certs.is_empty() {
            return Err(ClientError::new(
                "certificate or bundle file holds no certificate",
            ));
        }
        Ok(ClientIdentity::Files {
            chain,
            key: Arc::new(key_der.secret_pkcs8_der().to_vec()),
            bundle: bundle_certs,
        })
    }

    fn trust(&self, broker: &SpiffeId) -> Arc<dyn TrustSource> {
        match self {
            ClientIdentity::Workload(src) => Arc::new(WorkloadTrust::new(src.clone(), None)),
            ClientIdentity::Files { bundle, .. } | ClientIdentity::Anonymous { bundle } => {
                Arc::new(
                    StaticTrust::default().with_x509(broker.trust_domain_name(), bundle.clone()),
                )
            }
        }
    }
}

/// A lifetime as the proto carries it.
pub fn duration_pb(d: Option<std::time::Duration>) -> Option<prost_types::Duration> {
    d.map(|d| prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    })
}

/// Verifies the broker's X.509-SVID: chain to the bundle, and exactly the expected ID.
#[derive(Debug)]
struct BrokerVerifier {
    trust: Arc<dyn TrustSource>,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for dyn TrustSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrustSource")
    }
}

impl ServerCertVerifier for BrokerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        let id = validate_x509_svid(
            &chain,
            self.trust.as_ref(),
            crate::clock::SystemClock.now(),
            SvidRole::Server,
        )
        .map_err(|e| rustls::Error::General(format!("broker SVID refused: {e}")))?;
        if id != self.expected {
            return Err(rustls::Error::General(format!(
                "broker presented {id}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }
    handshake_signatures!(algs);
}

/// Presents the current SVID (re-read from the Workload API on every handshake).
#[derive(Debug)]
struct SvidResolver(Resolver);

enum Resolver {
    Workload(X509Source),
    Fixed(Arc<CertifiedKey>),
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    pkcs8: &[u8],
) -> Result<Arc<CertifiedKey>, ClientError> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.to_vec()));
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| ClientError::new(format!("unusable SVID key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        match &self.0 {
            Resolver::Fixed(k) => Some(k.clone()),
            Resolver::Workload(src) => {
                let svid = src.svid().ok()?;
                let chain = svid
                    .cert_chain()
                    .iter()
                    .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                    .collect();
                certified(chain, svid.private_key().as_bytes()).ok()
            }
        }
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// The rustls client config for reaching broker `broker_id` as `identity`.
pub fn tls_config(
    identity: &ClientIdentity,
    broker_id: &SpiffeId,
) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(BrokerVerifier {
        trust: identity.trust(broker_id),
        expected: broker_id.clone(),
        algs: provider.signature_verification_algorithms,
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::new(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match identity {
        ClientIdentity::Workload(src) => builder
            .with_client_cert_resolver(Arc::new(SvidResolver(Resolver::Workload(src.clone())))),
        ClientIdentity::Files { chain, key, .. } => builder.with_client_cert_resolver(Arc::new(
            SvidResolver(Resolver::Fixed(certified(chain.clone(), key)?)),
        )),
        ClientIdentity::Anonymous { .. } => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // Resume sessions across connections (see [`session_name`]); the name that keys them
    // is not sent (the broker is identified by its SPIFFE ID, not a DNS name).
    cfg.resumption = rustls::client::Resumption::store(sessions());
    cfg.enable_sni = false;
    Ok(cfg)
}

/// The TLS config and server name of a connection to the broker at `addr` as `identity`.
/// Configs are kept per broker and leaf (rustls resumes a session only with the config
/// that made it), so reconnecting resumes the TLS session; the name is not checked (the
/// verifier checks the broker's SPIFFE ID) nor sent, it only keys the sessions.
pub fn client_config(
    addr: &str,
    broker_id: &SpiffeId,
    identity: &ClientIdentity,
) -> Result<(Arc<rustls::ClientConfig>, ServerName<'static>), ClientError> {
    type Configs = std::sync::Mutex<std::collections::HashMap<String, Arc<rustls::ClientConfig>>>;
    static CONFIGS: std::sync::OnceLock<Configs> = std::sync::OnceLock::new();
    let name = session_name(addr, broker_id, identity)?;
    let key = name.to_str().into_owned();
    let mut configs = CONFIGS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(cfg) = configs.get(&key) {
        return Ok((cfg.clone(), name));
    }
    let cfg = Arc::new(tls_config(identity, broker_id)?);
    if configs.len() >= 64 {
        // Old leaves and brokers: their sessions go with them.
        configs.clear();
    }
    configs.insert(key, cfg.clone());
    Ok((cfg, name))
}

/// The TLS sessions this process may resume, shared by every connection it opens (at
/// most 256; the broker issues one TLS 1.3 ticket per handshake).
fn sessions() -> Arc<dyn rustls::client::ClientSessionStore> {
    static SESSIONS: std::sync::OnceLock<Arc<rustls::client::ClientSessionMemoryCache>> =
        std::sync::OnceLock::new();
    SESSIONS
        .get_or_init(|| Arc::new(rustls::client::ClientSessionMemoryCache::new(256)))
        .clone()
}

/// The name a connection's TLS sessions are stored under: a hash of the broker's address
/// and SPIFFE ID, the client's current leaf certificate and the authorities it trusts for
/// the broker. A session is resumed only by a connection to the same broker presenting the
/// same leaf under the same trust, so a client whose SVID rotated never resumes a session
/// (and the identity) its previous SVID established, and one whose bundle dropped a CA
/// never resumes a session that CA vouched for.
pub fn session_name(
    addr: &str,
    broker_id: &SpiffeId,
    identity: &ClientIdentity,
) -> Result<ServerName<'static>, ClientError> {
    let leaf = match identity {
        ClientIdentity::Workload(src) => src
            .svid()
            .map(|s| s.leaf().as_ref().to_vec())
            .map_err(|e| ClientError::new(format!("no SVID from the Workload API: {e}")))?,
        ClientIdentity::Files { chain, .. } => chain
            .first()
            .map(|c| c.as_ref().to_vec())
            .unwrap_or_default(),
        ClientIdentity::Anonymous { .. } => Vec::new(),
    };
    // The authorities the broker is checked against now: a session established under a
    // bundle the client no longer trusts (a retired CA) is not resumed.
    let authorities = identity
        .trust(broker_id)
        .x509_authorities(broker_id.trust_domain_name())
        .unwrap_or_default();
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    let broker = broker_id.to_string();
    let parts = [addr.as_bytes(), broker.as_bytes(), &leaf]
        .into_iter()
        .chain(authorities.iter().map(|a| a.as_ref()));
    for part in parts {
        h.update(&(part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let name = format!("{}.resume.invalid", hex::encode(&h.finish().as_ref()[..16]));
    ServerName::try_from(name).map_err(|e| ClientError::new(format!("session name: {e}")))
}

/// Opens a gRPC channel to the broker at `addr` (`host:port`).
pub async fn connect(
    addr: &str,
    broker_id: &str,
    identity: &ClientIdentity,
) -> Result<Channel, ClientError> {
    let broker_id =
        SpiffeId::new(broker_id).map_err(|e| ClientError::new(format!("broker id: {e}")))?;
    client_config(addr, &broker_id, identity)?; // a bad identity fails here, not at dial
    let target = addr.to_owned();
    let identity = identity.clone();
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ClientError::new(format!("bad broker address {addr:?}: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(10));
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let target = target.clone();
            let (broker, identity) = (broker_id.clone(), identity.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&target).await?;
                tcp.set_nodelay(true)?;
                // Per dial: a redial after the SVID rotated uses the new leaf.
                let (cfg, name) = client_config(&target, &broker, &identity)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| {
            let message = format!("cannot connect to the broker at {addr}: {}", causes(&e));
            if tls_refused(&e) {
                ClientError::new(message)
            } else {
                ClientError::transient(message)
            }
        })
}

/// An `X509Source` from a Workload API endpoint (`unix:///path`), or from
/// `SPIFFE_ENDPOINT_SOCKET` when `endpoint` is `None`.
pub async fn workload_source(endpoint: Option<&str>) -> Result<X509Source, ClientError> {
    let builder = X509Source::builder();
    let builder = match endpoint {
        Some(e) => builder.endpoint(e),
        None => builder,
    };
    tokio::time::timeout(std::time::Duration::from_secs(15), builder.build())
        .await
        .map_err(|_| ClientError::transient("timed out fetching an SVID from the Workload API"))?
        .map_err(|e| {
            ClientError::transient(format!("cannot fetch an SVID from the Workload API: {e}"))
        })
}

/// A channel to the broker that follows the client's own SVID rotation.
///
/// The broker re-validates the client's X.509-SVID on every request, not only at the
/// handshake, so a connection opened with an SVID whose authority has since been retired
/// is refused although the TLS session is still up. This keeps one connection open and
/// replaces it as soon as the Workload API has handed the client a different leaf, so
/// requests always travel on a connection that presented the current SVID.
pub struct SvidChannel {
    addr: String,
    broker_id: String,
    source: X509Source,
    channel: Channel,
    leaf: Vec<u8>,
    reconnects: u64,
}

fn current_leaf(source: &X509Source) -> Result<Vec<u8>, ClientError> {
    source
        .svid()
        .map(|s| s.leaf().as_ref().to_vec())
        .map_err(|e| ClientError::new(format!("no SVID from the Workload API: {e}")))
}

impl SvidChannel {
    /// Connects to the broker at `addr` as the SVID of `source`.
    pub async fn connect(
        addr: &str,
        broker_id: &str,
        source: X509Source,
    ) -> Result<Self, ClientError> {
        let (channel, leaf) = Self::open(addr, broker_id, &source).await?;
        Ok(Self {
            addr: addr.to_owned(),
            broker_id: broker_id.to_owned(),
            source,
            channel,
            leaf,
            reconnects: 0,
        })
    }

    /// Opens a connection and returns it with the leaf current just before it. The
    /// handshake reads the SVID itself, so it presented that leaf or, if the SVID rotated
    /// meanwhile, a newer one; either way [`Self::channel`] is safe: a newer one only
    /// costs one more reconnect.
    async fn open(
        addr: &str,
        broker_id: &str,
        source: &X509Source,
    ) -> Result<(Channel, Vec<u8>), ClientError> {
        let leaf = current_leaf(source)?;
        let channel = connect(addr, broker_id, &ClientIdentity::Workload(source.clone())).await?;
        Ok((channel, leaf))
    }

    /// The channel for the next request: the open one while its SVID is still the
    /// current one, else a new connection with the current SVID. Clones of an older
    /// channel keep their old connection.
    pub async fn channel(&mut self) -> Result<Channel, ClientError> {
        if current_leaf(&self.source)? != self.leaf {
            let (channel, leaf) = Self::open(&self.addr, &self.broker_id, &self.source).await?;
            self.channel = channel;
            self.leaf = leaf;
            self.reconnects += 1;
        }
        Ok(self.channel.clone())
    }

    /// The leaf certificate (DER) current just before the open connection was made: the
    /// one its handshake presented, or an older one if the SVID rotated during the
    /// handshake (or tonic re-dialled a broken connection with a newer SVID). Never newer
    /// than what was presented, so "this leaf chains to the new authority" is a safe
    /// conclusion.
    pub fn leaf(&self) -> &[u8] {
        &self.leaf
    }

    /// How many times the connection was replaced after an SVID change.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }
}
