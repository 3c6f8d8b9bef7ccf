//! The dev SPIFFE Workload API: a real implementation of the public protocol
//! (`FetchX509SVID` streamed with rotation, `FetchX509Bundles`, `FetchJWTSVID`,
//! `FetchJWTBundles`, `ValidateJWTSVID`) over Unix sockets, one socket per identity,
//! backed by the dev CA. Production uses SPIRE's agent socket instead.
//!
//! Open `FetchX509SVID` and `FetchX509Bundles` streams follow the dev CA's authority
//! rotation ([`DevCa::prepare`], [`DevCa::activate`], [`DevCa::retire_inactive`]): each
//! step sends every stream the new bundle, and activation a new SVID from the new
//! authority, as a SPIRE agent does.

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

/// One socket's server task and its "gone" switch.
type Serving = (tokio::task::JoinHandle<()>, watch::Sender<bool>);

/// A running dev Workload API.
pub struct DevWorkloadApi {
    sockets: BTreeMap<String, PathBuf>,
    rotate: watch::Sender<u64>,
    stop: watch::Sender<bool>,
    ca: Arc<DevCa>,
    svid_ttl: Duration,
    /// Per-socket server tasks and "gone" switches (tests take a socket away and back).
    servers: std::sync::Mutex<BTreeMap<String, Serving>>,
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
        let (rotate, _) = watch::channel(0u64);
        let (stop, _) = watch::channel(false);
        let api = Self {
            sockets: ids
                .iter()
                .map(|id| (id.to_string(), dir.join(socket_name(id))))
                .collect(),
            rotate,
            stop,
            ca,
            svid_ttl,
            servers: std::sync::Mutex::new(BTreeMap::new()),
        };
        for id in ids {
            api.serve(id)?;
        }
        Ok(api)
    }

    /// Binds and serves one identity's socket.
    fn serve(&self, id: &SpiffeId) -> std::io::Result<()> {
        let path = self
            .sockets
            .get(&id.to_string())
            .cloned()
            .unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let (gone, gone_rx) = watch::channel(false);
        let svc = IdentityService::new(
            self.ca.clone(),
            id.clone(),
            self.svid_ttl,
            self.rotate.subscribe(),
            gone_rx,
        );
        let mut stop_rx = self.stop.subscribe();
        let task = tokio::spawn(async move {
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
        self.servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), (task, gone));
        Ok(())
    }

    /// Takes one identity's socket away (the agent is gone): its server is dropped at
    /// once, so streams already open break too, and the socket file is removed.
    pub fn take_away(&self, id: &str) {
        if let Some((task, gone)) = self
            .servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
        {
            task.abort();
            let _ = gone.send(true);
        }
        if let Some(path) = self.sockets.get(id) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Brings a socket taken away back (the agent restarted).
    pub fn bring_back(&self, id: &str) -> std::io::Result<()> {
        let id = SpiffeId::new(id)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        self.serve(&id)
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
