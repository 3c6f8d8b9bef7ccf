//! Listeners and lifecycle: assembles the broker from a config and the broker's own
//! Workload API identity, then serves gRPC (mTLS) and HTTP until shutdown.

pub mod http;
pub mod https;
pub mod tls;

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use spiffe::{JwtSource, X509Source};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::Api;
use crate::authn::{SpiffeAuthenticator, WorkloadTrust};
use crate::broker::Broker;
use crate::checkpoint::LogSigner;
use crate::clock::Clock;
use crate::config::Config;
use crate::crypto::KeyRing;
use crate::metrics::Metrics;
use crate::notify::{Notifier, WebhookConfig};
use crate::policy::{CedarPolicy, Policy};
use crate::proto::v1::admin_server::AdminServer;
use crate::proto::v1::approvals_server::ApprovalsServer;
use crate::proto::v1::credential_broker_server::CredentialBrokerServer;
use crate::proto::v1::relying_party_server::RelyingPartyServer;
use crate::store::{PostgresStore, SqliteStore, Store};

/// Why the broker could not start or keep serving.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ServeError(pub String);

/// Largest gRPC message accepted (requests are small; this bounds memory per call).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// A broker ready to serve.
pub struct BrokerParts {
    /// The request path.
    pub broker: Arc<Broker>,
    /// TLS config with the broker's rotating SVID.
    pub tls: Arc<rustls::ServerConfig>,
    /// HTTP listener state.
    pub http: http::HttpState,
    /// TLS for the HTTP listener (`[http_tls]`); `None` serves plain HTTP.
    pub https: Option<Arc<rustls::ServerConfig>>,
    /// How often the reaper runs.
    pub reaper_interval: Duration,
    /// How often a checkpoint is signed (when the log grew).
    pub checkpoint_interval: Duration,
    /// HTTP/2 streams per connection.
    pub max_streams: u32,
    /// TLS connections per peer address.
    pub max_connections_per_peer: usize,
    /// How long a client has to finish its TLS handshake.
    pub handshake_timeout: Duration,
    /// The broker's own SPIFFE ID.
    pub spiffe_id: String,
    /// One shipper per configured audit sink.
    pub audit_sinks: Vec<crate::sinks::Shipper>,
    /// Submits new checkpoints to the configured witnesses.
    pub witnesses: crate::witness::submit::Submitter,
    /// Follows key rotations in the keys directory (and rotates on schedule).
    pub key_watcher: KeyWatcher,
    /// Kept alive for the lifetime of the server (rotation watchers).
    _sources: (X509Source, JwtSource),
}

/// Re-reads the keys directory every second, so a rotation (by `spiffe-broker keys
/// rotate`, another replica, or a replaced Secret) is followed without a restart, and
/// rotates on `[keys] rotate_every` when that is set.
#[derive(Clone)]
pub struct KeyWatcher {
    keys: KeyRing,
    dir: std::path::PathBuf,
    clock: Arc<dyn Clock>,
    rotate_every: Option<Duration>,
    publish_ahead: Duration,
    retain: Duration,
}

impl KeyWatcher {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_try = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let now = self.clock.unix_seconds();
            if let Some(every) = self.rotate_every {
                if now >= next_try && self.keys.rotation_due(now, every) {
                    match crate::crypto::rotate(&self.dir, now, self.publish_ahead, self.retain) {
                        Ok(r) => {
                            tracing::info!(staged = %r.staged_kid, signs_at = r.signs_at, "scheduled key rotation")
                        }
                        Err(e) => {
                            // Read-only keys (a Secret): rotate where they are kept.
                            tracing::warn!(error = %e, "scheduled key rotation failed; retrying in a minute");
                            next_try = now + 60;
                        }
                    }
                }
            }
            match self.keys.refresh(now) {
                Ok(true) => {
                    tracing::info!(kid = %self.keys.current().key_id(), "token signing key changed")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot re-read the signing keys; keeping those in force")
                }
            }
        }
    }
}

/// How often gRPC health re-reads readiness.
const HEALTH_POLL: Duration = Duration::from_millis(500);

/// Sets every service's gRPC health status (and the server's, the empty name).
async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic_health::ServingStatus;
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for name in [
        "",
        <CredentialBrokerServer<Api> as tonic::server::NamedService>::NAME,
        <AdminServer<Api> as tonic::server::NamedService>::NAME,
        <ApprovalsServer<Api> as tonic::server::NamedService>::NAME,
        <RelyingPartyServer<Api> as tonic::server::NamedService>::NAME,
    ] {
        health.set_service_status(name, status).await;
    }
}

/// How often the backend revocation queue is looked at.
const BACKEND_REVOKE_POLL: Duration = Duration::from_secs(1);

/// How long start-up waits for the Workload API to hand the broker its SVID.
const WORKLOAD_API_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds the broker from its config: its own SVID and bundles from the Workload API,
/// the signing keys and ledger from the state dir.
/// `config_path`, when given, is re-read on policy reloads (`Admin.ReloadPolicy`, SIGHUP).
pub async fn assemble(
    config: &Config,
    config_path: Option<&std::path::Path>,
    clock: Arc<dyn Clock>,
) -> Result<BrokerParts, ServeError> {
    let endpoint = match &config.workload_api_socket {
        Some(e) => e.clone(),
        None => std::env::var("SPIFFE_ENDPOINT_SOCKET").map_err(|_| {
            ServeError(
                "no Workload API: set workload_api_socket in the config or SPIFFE_ENDPOINT_SOCKET"
                    .into(),
            )
        })?,
    };
    let x509 = tokio::time::timeout(
        WORKLOAD_API_TIMEOUT,
        X509Source::builder().endpoint(&endpoint).build(),
    )
    .await
    .map_err(|_| {
        ServeError(format!(
            "timed out fetching the broker's X.509-SVID from {endpoint}"
        ))
    })?
    .map_err(|e| {
        ServeError(format!(
            "cannot fetch the broker's X.509-SVID from {endpoint}: {e}"
        ))
    })?;
    let jwt = tokio::time::timeout(
        WORKLOAD_API_TIMEOUT,
        JwtSource::builder().endpoint(&endpoint).build(),
    )
    .await
    .map_err(|_| ServeError(format!("timed out fetching JWT bundles from {endpoint}")))?
    .map_err(|e| ServeError(format!("cannot fetch JWT bundles from {endpoint}: {e}")))?;
    let spiffe_id = x509
        .svid()
        .map_err(|e| ServeError(format!("no SVID for the broker: {e}")))?
        .spiffe_id()
        .to_string();

    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| ServeError(format!("cannot create {}: {e}", config.state_dir.display())))?;
    let metrics = Arc::new(Metrics::new());
    let mut keys = KeyRing::load_or_create_at(
        &config.keys_dir(),
        clock.unix_seconds(),
        config.max_token_lifetime(),
    )
    .map_err(|e| ServeError(e.to_string()))?;
    if config
        .profiles
        .iter()
        .any(|p| p.kind == crate::config::CredentialKind::Slurm)
    {
        keys = keys
            .with_rsa(&config.keys_dir())
            .map_err(|e| ServeError(e.to_string()))?;
    }
    let database = config
        .database_url()
        .map_err(|e| ServeError(e.to_string()))?;
    let store: Arc<dyn Store> = match &database {
        // Connecting and migrating block: off the async threads.
        Some(url) => {
            let (url, ledger, m) = (url.clone(), config.ledger.clone(), metrics.clone());
            let opened =
                tokio::task::spawn_blocking(move || PostgresStore::open(url.expose(), &ledger, m))
                    .await
                    .map_err(|e| ServeError(format!("cannot open the PostgreSQL ledger: {e}")))?;
            // The error names the server, never the password.
            Arc::new(
                opened
                    .map_err(|e| ServeError(format!("cannot open the PostgreSQL ledger: {e}")))?,
            )
        }
        None => Arc::new(
            SqliteStore::open(&config.ledger_path(), &config.ledger, metrics.clone()).map_err(
                |e| {
                    ServeError(format!(
                        "cannot open the ledger {}: {e}",
                        config.ledger_path().display()
                    ))
                },
            )?,
        ),
    };
    let trust = Arc::new(WorkloadTrust::new(x509.clone(), Some(jwt.clone())));
    let clock_for_ready = clock.clone();
    let authn = SpiffeAuthenticator::new(
        trust,
        clock.clone(),
        spiffe_id.clone(),
        config.jwt_clock_skew,
    );
    let issuers = crate::issuer::from_config(config, &keys, Arc::new(jwt.clone()))
        .map_err(|e| ServeError(format!("credential backends: {e}")))?;
    let policy =
        CedarPolicy::load(config).map_err(|e| ServeError(format!("policy refused:\n{e}")))?;
    let notifier = match &config.notifications {
        None => Notifier::noop(),
        Some(n) => {
            let key = std::fs::read(&n.hmac_key_file).map_err(|e| {
                ServeError(format!("cannot read {}: {e}", n.hmac_key_file.display()))
            })?;
            let key: Vec<u8> = String::from_utf8_lossy(&key).trim().as_bytes().to_vec();
            Notifier::spawn(Some(WebhookConfig {
                url: n.webhook_url.clone(),
                hmac_key: key,
                timeout: Duration::from_secs(5),
            }))
            .map_err(|e| ServeError(format!("notifications: {e}")))?
        }
    };
    let loader = config_path.map(|path| {
        let path = path.to_owned();
        Box::new(move || -> Result<Arc<dyn Policy>, String> {
            let c = Config::load(&path).map_err(|e| e.to_string())?;
            Ok(Arc::new(CedarPolicy::load(&c).map_err(|e| e.to_string())?) as Arc<dyn Policy>)
        }) as crate::broker::PolicyLoader
    });
    let trust_domain = spiffe::SpiffeId::new(&spiffe_id)
        .map(|id| id.trust_domain_name().to_owned())
        .map_err(|e| ServeError(e.to_string()))?;
    let origin = config
        .log_origin
        .clone()
        .unwrap_or_else(|| format!("{trust_domain}/spiffe-broker/audit"));
    let log_signer = Arc::new(
        LogSigner::load_or_create(&config.keys_dir(), &origin)
            .map_err(|e| ServeError(format!("log key: {e}")))?,
    );
    let mut broker = Broker::new(
        Arc::new(authn),
        Arc::new(policy),
        issuers,
        store,
        clock.clone(),
        metrics.clone(),
    )
    .with_notifier(notifier)
    .with_max_in_flight(config.max_in_flight)
    .with_limits(config.limits)
    .with_log_signer(log_signer.clone())
    .with_feed_signer(Arc::new(
        LogSigner::load_or_create_as(
            &config.keys_dir(),
            "revocations",
            &format!("{trust_domain}/spiffe-broker/revocations"),
        )
        .map_err(|e| ServeError(format!("revocation feed key: {e}")))?,
    ));
    if let Some(l) = loader {
        broker = broker.with_loader(l);
    }
    if let Some(console) = &config.console {
        broker = broker.with_sessions(console.clone());
    }
    if !config.oidc_providers.is_empty() {
        broker = broker.with_oidc(crate::oidc::OidcProviders::new(
            &config.oidc_providers,
            clock.clone(),
            config.jwt_clock_skew,
        ));
    }
    broker = broker.with_reload_guard(config.policy.refuse_widening);
    broker = broker.with_exchange(crate::broker::ExchangeSettings {
        keys: keys.clone(),
        issuer_url: config.issuer_url.clone(),
        max_chain_depth: config.max_chain_depth,
        leeway: config.jwt_clock_skew.as_secs() as i64,
    });
    let broker = Arc::new(broker);
    let tls = tls::server_config(x509.clone()).map_err(ServeError)?;
    let https = match &config.http_tls {
        Some(t) => Some(https::server_config(&t.cert_file, &t.key_file).map_err(ServeError)?),
        None => None,
    };
    if let Some(t) = &config.tracing {
        crate::telemetry::start(&t.otlp_endpoint, t.ca_file.as_deref())
            .map_err(|e| ServeError(format!("tracing: {e}")))?;
    }
    let keys_for_watcher = keys.clone();
    let holder = crate::sinks::holder_name();
    let audit_sinks = config
        .audit_sinks
        .iter()
        .map(|s| {
            crate::sinks::Shipper::new(
                s.clone(),
                broker.store().clone(),
                metrics.clone(),
                clock_for_ready.clone(),
                holder.clone(),
            )
            .map_err(|e| ServeError(format!("audit sink {}: {e}", s.name)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let witnesses = witness_submitter(&config.witnesses, broker.store().clone())?;
    let ready_source = x509.clone();
    let watcher_clock = clock_for_ready.clone();
    let ready_clock = clock_for_ready;
    Ok(BrokerParts {
        broker: broker.clone(),
        tls,
        http: http::HttpState {
            keys,
            issuer_url: config.issuer_url.clone(),
            metrics,
            ready: {
                let source = ready_source.clone();
                Arc::new(move || own_svid_current(&source, ready_clock.as_ref()))
            },
            svid_expiry: Arc::new(move || own_svid_window(&ready_source).map(|(_, until)| until)),
            broker: broker.clone(),
            publish_log_entries: config.publish_log_entries,
            console: match &config.console {
                None => None,
                Some(_) => Some(Arc::new(
                    crate::console::Console::new(
                        broker.clone(),
                        &console_origin(&config.issuer_url)?,
                        bundle_pem(x509.clone(), trust_domain.clone()),
                    )
                    .ok_or_else(|| ServeError("the console needs people's sessions".into()))?,
                )),
            },
        },
        https,
        reaper_interval: config.reaper_interval,
        checkpoint_interval: config.checkpoint_interval,
        max_streams: config.max_streams_per_connection,
        max_connections_per_peer: config.max_connections_per_peer,
        handshake_timeout: config.handshake_timeout,
        spiffe_id,
        audit_sinks,
        witnesses,
        key_watcher: KeyWatcher {
            keys: keys_for_watcher,
            dir: config.keys_dir(),
            clock: watcher_clock,
            rotate_every: config.keys.rotate_every,
            publish_ahead: config.keys.publish_ahead,
            retain: config.max_token_lifetime(),
        },
        _sources: (x509, jwt),
    })
}

/// Ready means the broker holds an SVID that is valid now. The SVID source keeps the
/// last SVID when the Workload API goes away; once that one expires, no client will
/// accept the broker's handshake, so it reports not ready rather than serving on.
fn own_svid_current(source: &X509Source, clock: &dyn Clock) -> bool {
    let now = clock.unix_seconds();
    own_svid_window(source).is_some_and(|(from, until)| from <= now && now < until)
}

/// The validity window (Unix seconds) of the broker's own SVID, if it has one.
fn own_svid_window(source: &X509Source) -> Option<(i64, i64)> {
    let svid = source.svid().ok()?;
    let (_, leaf) = x509_parser::parse_x509_certificate(svid.leaf().as_ref()).ok()?;
    let validity = leaf.validity();
    Some((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// Serves gRPC on `grpc` and HTTP on `http` until `shutdown` resolves, then drains
/// in-flight requests. Bind port 0 in tests and read the listeners' addresses.
pub async fn run(
    mut parts: BrokerParts,
    grpc: TcpListener,
    http_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CredentialBrokerServer<Api>>().await;
    health.set_serving::<AdminServer<Api>>().await;
    health.set_serving::<ApprovalsServer<Api>>().await;
    health.set_serving::<RelyingPartyServer<Api>>().await;
    // gRPC health follows readiness (the broker's own SVID current): a gRPC-aware load
    // balancer stops sending when /readyz would say 503.
    let health_follower = {
        let ready = parts.http.ready.clone();
        let health = health.clone();
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let mut serving = true;
            let mut tick = tokio::time::interval(HEALTH_POLL);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = rx.changed() => return,
                }
                let now = ready();
                if now != serving {
                    serving = now;
                    set_health(&health, now).await;
                    tracing::warn!(serving = now, "gRPC health follows readiness");
                }
            }
        })
    };

    let broker = parts.broker.clone();
    let reaper = {
        let broker = broker.clone();
        let mut rx = stop_rx.clone();
        let every = parts.reaper_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        match broker.reap_expired().await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(expired = n, "marked leases expired"),
                            Err(e) => tracing::warn!(error = %e, "reaper could not commit; will retry"),
                        }
                    }
                    _ = rx.changed() => return,
                }
            }
        })
    };
    // Backend revocations run on their own task, so a hanging backend never holds up
    // expiry; entries are retried on their own back-off, this only bounds how soon a
    // due one is noticed.
    let backend_revoker = {
        let broker = broker.clone();
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(BACKEND_REVOKE_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = rx.changed() => return,
                }
                match broker.revoke_in_backends().await {
                    Ok((0, 0)) => {}
                    Ok((ok, failed)) => tracing::info!(revoked = ok, failed, "backend revocations"),
                    Err(e) => {
                        tracing::warn!(error = %e, "backend revocation pass failed; will retry")
                    }
                }
            }
        })
    };

    let checkpointer = {
        let broker = broker.clone();
        let witnesses = parts.witnesses.clone();
        let mut rx = stop_rx.clone();
        let every = parts.checkpoint_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    // The final checkpoint comes after the drain, below.
                    _ = rx.changed() => return,
                }
                match broker.checkpoint().await {
                    Ok(Some(cp)) => witness(&witnesses, &broker, &cp).await,
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "checkpoint failed; will retry"),
                }
            }
        })
    };

    // Reflection for generic gRPC tools: the broker's services and health, on the same
    // mTLS listener as everything else. Both versions: grpcurl and grpcio's client still
    // ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::DESCRIPTORS)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_error = |e| ServeError(format!("gRPC reflection: {e}"));
    let reflection_v1 = reflection().build_v1().map_err(reflection_error)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;
    let key_watcher = tokio::spawn(parts.key_watcher.clone().run(stop_rx.clone()));
    let shippers: Vec<_> = std::mem::take(&mut parts.audit_sinks)
        .into_iter()
        .map(|s| tokio::spawn(s.run(crate::sinks::POLL, stop_rx.clone())))
        .collect();
    let grpc_server = tonic::transport::Server::builder()
        .layer(crate::api::EdgeLayer::new(broker.clone()))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(parts.max_streams))
        // Room for the largest JWT-SVID authn accepts plus the other headers, so an
        // oversized token is refused by authn (clearly, and recorded), not by h2.
        .http2_max_header_list_size(Some((crate::jose::MAX_JWT_LEN + 8 * 1024) as u32))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            CredentialBrokerServer::new(Api::new(broker.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            AdminServer::new(Api::new(broker.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            ApprovalsServer::new(Api::new(broker.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            RelyingPartyServer::new(Api::new(broker.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            tls::incoming(
                grpc,
                parts.tls.clone(),
                parts.max_connections_per_peer,
                parts.handshake_timeout,
            ),
            stopped(stop_rx.clone()),
        );
    let router = http::router(parts.http.clone());
    let http_server: futures::future::BoxFuture<'static, std::io::Result<()>> = match &parts.https {
        Some(config) => {
            let listener = https::HttpsListener::new(
                http_listener,
                config.clone(),
                parts.max_connections_per_peer,
                parts.handshake_timeout,
            )
            .map_err(|e| ServeError(format!("HTTPS listener: {e}")))?;
            Box::pin(
                axum::serve(listener, router)
                    .with_graceful_shutdown(stopped(stop_rx.clone()))
                    .into_future(),
            )
        }
        None => Box::pin(
            axum::serve(http_listener, router)
                .with_graceful_shutdown(stopped(stop_rx.clone()))
                .into_future(),
        ),
    };

    let (g, h) = tokio::join!(grpc_server, http_server);
    let _ = reaper.await;
    let _ = checkpointer.await;
    let _ = health_follower.await;
    let _ = backend_revoker.await;
    for s in shippers {
        let _ = s.await;
    }
    let _ = key_watcher.await;
    // One last checkpoint once in-flight requests have drained, so it covers every
    // entry behind an answer the broker gave.
    match broker.checkpoint().await {
        Ok(Some(cp)) => witness(&parts.witnesses, &broker, &cp).await,
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "final checkpoint failed"),
    }
    drop(parts);
    g.map_err(|e| ServeError(format!("gRPC server: {e}")))?;
    h.map_err(|e| ServeError(format!("HTTP server: {e}")))?;
    Ok(())
}

/// One outbound client per configured witness (10 s per submission).
fn witness_submitter(
    witnesses: &[crate::config::WitnessConfig],
    store: Arc<dyn crate::store::Store>,
) -> Result<crate::witness::submit::Submitter, ServeError> {
    use crate::http_client::{HttpClient, Options, Trust};
    let targets = witnesses
        .iter()
        .map(|w| {
            let mut options = Options::new(Trust::from_ca_file(w.ca_file.as_deref()));
            options.timeout = Duration::from_secs(10);
            options.max_body = 64 * 1024;
            let client = HttpClient::new(&options)
                .map_err(|e| ServeError(format!("witness {}: {e}", w.key.name())))?;
            Ok(crate::witness::submit::WitnessTarget {
                key: w.key.clone(),
                url: w.url.clone(),
                client,
            })
        })
        .collect::<Result<Vec<_>, ServeError>>()?;
    Ok(crate::witness::submit::Submitter::new(targets, store))
}

/// Submits a checkpoint to the witnesses; a refusal is logged and counted, never fatal.
async fn witness(
    witnesses: &crate::witness::submit::Submitter,
    broker: &Broker,
    cp: &crate::store::StoredCheckpoint,
) {
    for result in witnesses.submit(cp).await {
        match result {
            Ok(name) => broker.metrics().witness_cosigned(&name, cp.size),
            Err(e) => {
                tracing::error!(error = %e, size = cp.size, "checkpoint not cosigned");
                broker.metrics().witness_failed(&e.witness);
            }
        }
    }
}

/// The console's origin: the HTTP listener's public URL, which must be `https://` (its
/// session cookie is `Secure`) or loopback `http://` (browsers treat loopback as secure).
fn console_origin(issuer_url: &str) -> Result<String, ServeError> {
    let url = issuer_url.trim_end_matches('/');
    let loopback = ["http://127.0.0.1:", "http://[::1]:", "http://localhost:"]
        .iter()
        .any(|p| url.starts_with(p));
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    if !(url.starts_with("https://") || loopback) || rest.contains('/') {
        return Err(ServeError(format!(
            "[console] needs issuer_url to be https://host[:port] (or http:// on loopback) with no path; it is {issuer_url:?}"
        )));
    }
    Ok(url.to_owned())
}

/// The X.509 trust bundle of the broker's own trust domain, PEM, from the Workload API (a
/// person's CLI verifies the gRPC listener with it after `spiffe-broker login`).
fn bundle_pem(source: X509Source, trust_domain: String) -> crate::console::BundlePem {
    use base64::Engine as _;
    Arc::new(move || {
        let td = spiffe::TrustDomain::new(&trust_domain).ok()?;
        let bundle = source.try_bundle_for_trust_domain(&td)?;
        let mut pem = String::new();
        for cert in bundle.authorities() {
            let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_bytes());
            pem.push_str("-----BEGIN CERTIFICATE-----\n");
            for line in b64.as_bytes().chunks(64) {
                pem.push_str(&String::from_utf8_lossy(line));
                pem.push('\n');
            }
            pem.push_str("-----END CERTIFICATE-----\n");
        }
        Some(pem)
    })
}
