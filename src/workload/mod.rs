//! The dev SPIFFE Workload API: a real implementation of the public protocol
//! (`FetchX509SVID` streamed with rotation, `FetchX509Bundles`, `FetchJWTSVID`,
//! `FetchJWTBundles`, `ValidateJWTSVID`) over Unix sockets, one socket per identity,
//! backed by the dev CA. Production uses SPIRE's agent socket instead.

mod authority;
pub mod ca;
mod service;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use spiffe::SpiffeId;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt as _;

use crate::proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
pub use ca::DevCa;
use service::IdentityService;

/// The socket file name of an identity: the last path segment of its SPIFFE ID.
pub fn socket_name(id: &SpiffeId) -> String {
    let last = id.path().rsplit('/').next().unwrap_or("workload");
    format!("{last}.sock")
}

/// A running dev Workload API.
pub struct DevWorkloadApi {
    sockets: BTreeMap<String, PathBuf>,
    rotate: watch::Sender<u64>,
    stop: watch::Sender<bool>,
}

impl DevWorkloadApi {
    /// Serves one socket per identity under `dir`. SVIDs live `svid_ttl` and rotate at
    /// half-life (or when [`Self::rotate_now`] is called).
    pub fn start(
        ca: Arc<DevCa>,
        dir: &Path,
        ids: &[SpiffeId],
        svid_ttl: Duration,
    ) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let (rotate, rotate_rx) = watch::channel(0u64);
        let (stop, stop_rx) = watch::channel(false);
        let mut sockets = BTreeMap::new();
        for id in ids {
            let path = dir.join(socket_name(id));
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path)?;
            let svc = IdentityService::new(ca.clone(), id.clone(), svid_ttl, rotate_rx.clone());
            let mut stop_rx = stop_rx.clone();
            tokio::spawn(async move {
                let res = tonic::transport::Server::builder()
                    .add_service(SpiffeWorkloadApiServer::new(svc))
                    .serve_with_incoming_shutdown(
                        UnixListenerStream::new(listener)
                            .map(|conn| conn.map(authority::AuthorityFix::new)),
                        async move {
                            let _ = stop_rx.wait_for(|v| *v).await;
                        },
                    )
                    .await;
                if let Err(e) = res {
                    tracing::error!(error = %e, "dev Workload API socket stopped");
                }
            });
            sockets.insert(id.to_string(), path);
        }
        Ok(Self {
            sockets,
            rotate,
            stop,
        })
    }

    /// Socket path of an identity.
    pub fn socket(&self, id: &str) -> Option<&Path> {
        self.sockets.get(id).map(|p| p.as_path())
    }

    /// All sockets by SPIFFE ID.
    pub fn sockets(&self) -> &BTreeMap<String, PathBuf> {
        &self.sockets
    }

    /// Pushes a fresh X.509-SVID to every subscriber now.
    pub fn rotate_now(&self) {
        self.rotate.send_modify(|n| *n += 1);
    }
}

impl Drop for DevWorkloadApi {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
