//! `spiffe-broker agent`: runs beside a workload (a sidecar, a systemd unit) and keeps its
//! credentials fresh on disk, as SPIRE's spiffe-helper does for SVIDs.
//!
//! For each `[[credential]]` of its config a [`keeper::Keeper`] asks the broker, writes
//! the credential atomically (`crate::files`), renews it once a fraction of its lifetime has
//! passed, asks again when renewal is refused, keeps the last one while the broker is away
//! (never past its expiry), and releases it at shutdown. `GET /live` and `GET /ready` on
//! `health_addr` say how it stands.
//!
//! Start-up is all or nothing: every path is checked writable, the broker's SPIFFE ID is
//! checked, and every credential is asked for before the first file is written; a refusal
//! gives its lease back and fails with the broker's reason, writing nothing.

pub mod config;
pub mod connection;
pub mod hooks;
pub mod keeper;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::AgentConfig;
use connection::{CallError, Connection, Identity};
use keeper::{Asked, Keeper, Timing};
pub use keeper::{CredentialStatus, State};

use crate::client::{self, ClientIdentity};
use crate::clock::Clock;

/// Why the helper could not start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AgentError(pub String);

/// A running helper.
pub struct Agent {
    statuses: Vec<watch::Receiver<CredentialStatus>>,
    wake: watch::Sender<u64>,
    stop: watch::Sender<bool>,
    keepers: Vec<JoinHandle<()>>,
    health: Option<(SocketAddr, JoinHandle<()>)>,
}

impl Agent {
    /// Checks, asks for every credential, writes them, and keeps them from then on.
    pub async fn start(config: AgentConfig, clock: Arc<dyn Clock>) -> Result<Self, AgentError> {
        config
            .check_paths()
            .map_err(|e| AgentError(e.to_string()))?;
        let identity = match (&config.svid_cert, &config.svid_key, &config.bundle) {
            (Some(c), Some(k), Some(b)) => Identity::Files(
                ClientIdentity::from_files(c, k, b).map_err(|e| AgentError(e.to_string()))?,
            ),
            _ => Identity::Workload(
                client::workload_source(config.workload_api.as_deref())
                    .await
                    .map_err(|e| AgentError(e.to_string()))?,
            ),
        };
        let conn = Arc::new(Connection::new(&config.broker, &config.broker_id, identity));
        match conn.check().await {
            Err(CallError::Refused(e)) => return Err(AgentError(e)),
            Err(CallError::Transient(e)) => {
                tracing::warn!(error = %e, "broker unreachable at start; the keepers retry")
            }
            Ok(()) => {}
        }
        let timing = Timing {
            renew_fraction: config.renew_fraction,
            retry_initial: config.retry_initial,
            retry_max: config.retry_max,
        };
        let mut keepers: Vec<Keeper> = config
            .credentials
            .iter()
            .map(|spec| Keeper::new(spec.clone(), conn.clone(), clock.clone(), timing))
            .collect();
        let asked = Self::ask_all(&mut keepers, &conn).await?;

        let (wake, _) = watch::channel(0u64);
        let (stop, _) = watch::channel(false);
        let statuses: Vec<_> = keepers.iter().map(Keeper::subscribe).collect();
        let mut tasks = Vec::new();
        for (mut keeper, first) in keepers.into_iter().zip(asked) {
            let mut wake_rx = wake.subscribe();
            let mut stop_rx = stop.subscribe();
            tasks.push(tokio::spawn(async move {
                let mut wait = match first {
                    Some(a) => keeper.install(a).await.ok(),
                    None => None,
                };
                loop {
                    let w = match wait.take() {
                        Some(w) => w,
                        None => keeper.step().await,
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(w) => {}
                        r = wake_rx.changed() => if r.is_err() { break },
                        _ = stop_rx.wait_for(|s| *s) => break,
                    }
                }
                keeper.release().await;
            }));
        }
        let health = match config.health_addr {
            Some(addr) => Some(serve_health(addr, statuses.clone()).await?),
            None => None,
        };
        Ok(Self {
            statuses,
            wake,
            stop,
            keepers: tasks,
            health,
        })
    }

    /// Asks for every credential once, before anything is written. A refusal gives back
    /// what was granted and fails; an unreachable broker leaves that keeper to retry.
    async fn ask_all(
        keepers: &mut [Keeper],
        conn: &Connection,
    ) -> Result<Vec<Option<Asked>>, AgentError> {
        let mut asked = Vec::new();
        let mut refusal = None;
        for k in keepers.iter_mut() {
            match k.ask().await {
                Ok(a) => asked.push(Some(a)),
                Err(CallError::Transient(e)) => {
                    tracing::warn!(credential = k.name(), error = %e, "broker unreachable; retrying");
                    asked.push(None);
                }
                Err(CallError::Refused(e)) => {
                    refusal = Some(format!("credential {:?}: {e}", k.name()));
                    break;
                }
            }
        }
        let Some(refusal) = refusal else {
            return Ok(asked);
        };
        for a in asked.into_iter().flatten() {
            if let Asked::Issued(o) = a {
                conn.release(o.lease_id()).await.ok();
            }
        }
        Err(AgentError(format!("{refusal} (nothing was written)")))
    }

    /// Every credential's status.
    pub fn status(&self) -> Vec<CredentialStatus> {
        self.statuses.iter().map(|s| s.borrow().clone()).collect()
    }

    /// The status of credential `i` (config order), as it changes.
    pub fn watch(&self, i: usize) -> watch::Receiver<CredentialStatus> {
        self.statuses[i].clone()
    }

    /// Looks at the clock again now (after a clock change, or in tests after moving a
    /// manual clock).
    pub fn wake(&self) {
        self.wake.send_modify(|n| *n += 1);
    }

    /// Where `/live` and `/ready` answer.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.as_ref().map(|(a, _)| *a)
    }

    /// Stops: every lease is released and its files removed.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.keepers {
            let _ = t.await;
        }
        if let Some((_, t)) = self.health {
            t.abort();
        }
    }
}

/// Ready when every credential is on disk and current.
fn ready(
    statuses: &[watch::Receiver<CredentialStatus>],
) -> (StatusCode, axum::Json<Vec<CredentialStatus>>) {
    let all: Vec<_> = statuses.iter().map(|s| s.borrow().clone()).collect();
    let code = if all.iter().all(|s| s.on_disk) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(all))
}

async fn serve_health(
    addr: SocketAddr,
    statuses: Vec<watch::Receiver<CredentialStatus>>,
) -> Result<(SocketAddr, JoinHandle<()>), AgentError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| AgentError(format!("health_addr {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| AgentError(e.to_string()))?;
    let app = axum::Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route(
            "/ready",
            get(move || {
                let statuses = statuses.clone();
                async move { ready(&statuses) }
            }),
        );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "health endpoint stopped");
        }
    });
    Ok((bound, task))
}
