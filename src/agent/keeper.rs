//! One credential kept fresh: ask, write, renew once a fraction of its lifetime has passed,
//! ask again when renewal is refused, keep the last one while the broker is away (never
//! past its expiry), remove it when it expires or a new one is refused, release it at the
//! end.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use zeroize::Zeroizing;

use super::config::{CredentialSpec, Format};
use super::connection::{CallError, Connection};
use super::hooks;
use crate::client::render;
use crate::clock::{from_unix_seconds, rfc3339, unix_seconds, Clock};
use crate::files;
use crate::proto::v1 as pb;

/// The longest a keeper sleeps without looking at the clock again (a suspended machine
/// wakes to a clock far ahead).
const MAX_WAIT: Duration = Duration::from_secs(60);
/// The shortest wait between attempts, so nothing spins.
const MIN_WAIT: Duration = Duration::from_secs(1);

/// Where a credential stands (what `/ready` shows; never the credential itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Nothing asked yet.
    Starting,
    /// On disk and current.
    Fresh,
    /// The broker could not be reached; what is on disk (if anything) is kept until it
    /// expires.
    Retrying,
    /// The profile needs approval; the access request is pending.
    AwaitingApproval,
    /// The broker refused; nothing is on disk. Asked again every `retry_max`.
    Refused,
    /// Given back at shutdown; nothing on disk.
    Released,
}

/// A credential's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CredentialStatus {
    /// Its name.
    pub name: String,
    /// Where it is written.
    pub path: std::path::PathBuf,
    /// Where it stands.
    pub state: State,
    /// Whether a current credential is on disk.
    pub on_disk: bool,
    /// The lease on disk.
    pub lease_id: Option<String>,
    /// When the credential on disk expires (RFC 3339).
    pub expires_at: Option<String>,
    /// How many times it was written.
    pub writes: u64,
    /// The pending access request.
    pub access_request: Option<String>,
    /// The last failure or refusal, with the broker's reason.
    pub message: Option<String>,
}

/// How a keeper paces itself.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Renew once this fraction of the lifetime has passed.
    pub renew_fraction: f64,
    /// First wait after a failure.
    pub retry_initial: Duration,
    /// Longest wait.
    pub retry_max: Duration,
}

/// The credential on disk.
struct Held {
    lease_id: String,
    obtained: SystemTime,
    expires: SystemTime,
    /// Format `pem`: the key the certificate was issued for.
    key_pem: Option<Zeroizing<String>>,
}

/// A credential obtained but not yet written (the helper writes nothing until every
/// credential of its config was granted).
pub struct Obtained {
    resp: pb::IssueCredentialResponse,
    key_pem: Option<Zeroizing<String>>,
}

impl Obtained {
    /// Its lease id.
    pub fn lease_id(&self) -> &str {
        self.resp.lease.as_ref().map_or("", |l| l.id.as_str())
    }
}

/// What asking produced.
pub enum Asked {
    /// Granted.
    Issued(Box<Obtained>),
    /// Waiting for approval (the access request id).
    Pending(String),
}

/// Keeps one credential.
pub struct Keeper {
    spec: CredentialSpec,
    conn: Arc<Connection>,
    clock: Arc<dyn Clock>,
    timing: Timing,
    held: Option<Held>,
    pending: Option<String>,
    failures: u32,
    status: watch::Sender<CredentialStatus>,
}

impl Keeper {
    /// A keeper for `spec`, holding nothing yet.
    pub fn new(
        spec: CredentialSpec,
        conn: Arc<Connection>,
        clock: Arc<dyn Clock>,
        timing: Timing,
    ) -> Self {
        let status = watch::channel(CredentialStatus {
            name: spec.name().to_owned(),
            path: spec.path.clone(),
            state: State::Starting,
            on_disk: false,
            lease_id: None,
            expires_at: None,
            writes: 0,
            access_request: None,
            message: None,
        })
        .0;
        Self {
            spec,
            conn,
            clock,
            timing,
            held: None,
            pending: None,
            failures: 0,
            status,
        }
    }

    /// Its status, as it changes.
    pub fn subscribe(&self) -> watch::Receiver<CredentialStatus> {
        self.status.subscribe()
    }

    /// Its name.
    pub fn name(&self) -> &str {
        self.spec.name()
    }

    /// One round: does what is due and says how long to wait before the next.
    pub async fn step(&mut self) -> Duration {
        let now = self.clock.now();
        if self.held.as_ref().is_some_and(|h| now >= h.expires) {
            tracing::warn!(
                credential = self.name(),
                "expired before it could be renewed; removing it"
            );
            self.forget("expired before it could be renewed");
        }
        if let Some(h) = &self.held {
            let due = h.renew_at(self.timing.renew_fraction);
            if now < due {
                return (due.duration_since(now).unwrap_or_default()).clamp(MIN_WAIT, MAX_WAIT);
            }
        }
        let result = match self.held.as_ref().map(|h| h.lease_id.clone()) {
            Some(lease) => self.renew(&lease).await,
            None => self.ask_and_install().await,
        };
        match result {
            Ok(wait) => {
                self.failures = 0;
                wait
            }
            Err(CallError::Transient(why)) => self.retry_later(why),
            Err(CallError::Refused(why)) => {
                self.failures = 0;
                tracing::error!(credential = self.name(), reason = %why, "refused; nothing on disk");
                self.forget(&why);
                self.set(State::Refused, Some(why));
                self.timing.retry_max
            }
        }
    }

    /// Asks for the credential (with a fresh key and CSR for format `pem`), or, while an
    /// access request is pending, looks at it.
    pub async fn ask(&mut self) -> Result<Asked, CallError> {
        let mut req = self.spec.to_pb();
        if let Some(id) = self.pending.clone() {
            let ar = self.conn.access_request(&id).await?;
            match pb::AccessRequestState::try_from(ar.state) {
                Ok(pb::AccessRequestState::Pending) => return Ok(Asked::Pending(id)),
                Ok(pb::AccessRequestState::Approved) => req.access_request_id = id,
                _ => {
                    self.pending = None;
                    return Err(CallError::Refused(format!(
                        "access request {id} ended {}",
                        render::state_name(ar.state)
                    )));
                }
            }
        }
        let key_pem = match self.spec.format {
            Format::Pem => {
                let (csr, key) = new_csr()?;
                req.csr = csr;
                Some(key)
            }
            _ => None,
        };
        let resp = self.conn.issue(req).await?;
        match (&resp.credential, &resp.access_request) {
            (None, Some(ar)) => {
                tracing::info!(credential = self.name(), access_request = %ar.id, "awaiting approval");
                self.pending = Some(ar.id.clone());
                Ok(Asked::Pending(ar.id.clone()))
            }
            (Some(_), _) => {
                self.pending = None;
                Ok(Asked::Issued(Box::new(Obtained { resp, key_pem })))
            }
            (None, None) => Err(CallError::Transient(
                "the broker answered with neither a credential nor an access request".into(),
            )),
        }
    }

    /// Writes what was asked (or notes the pending approval); the wait until the next step.
    pub async fn install(&mut self, asked: Asked) -> Result<Duration, CallError> {
        match asked {
            Asked::Pending(id) => {
                self.status.send_modify(|s| {
                    s.state = State::AwaitingApproval;
                    s.access_request = Some(id);
                });
                Ok(self.timing.retry_max)
            }
            Asked::Issued(o) => {
                let lease = o.lease_id().to_owned();
                if let Err(e) = self
                    .write(o.resp.credential, o.resp.lease, o.resp.receipt, o.key_pem)
                    .await
                {
                    // Not on disk, so nobody may use it: give it back.
                    self.conn.release(&lease).await.ok();
                    return Err(e);
                }
                Ok(self.until_renewal())
            }
        }
    }

    async fn ask_and_install(&mut self) -> Result<Duration, CallError> {
        let asked = self.ask().await?;
        self.install(asked).await
    }

    async fn renew(&mut self, lease: &str) -> Result<Duration, CallError> {
        match self.conn.renew(lease, self.spec.ttl).await {
            Ok(resp) => {
                // Cloned, not taken: a write that fails keeps the key for the next try.
                let key = self.held.as_ref().and_then(|h| h.key_pem.clone());
                self.write(resp.credential, resp.lease, resp.receipt, key)
                    .await?;
                Ok(self.until_renewal())
            }
            Err(CallError::Refused(why)) => {
                tracing::info!(credential = self.name(), lease, reason = %why, "renewal refused; asking for a new credential");
                self.ask_and_install().await.map_err(|e| match e {
                    CallError::Refused(r) => CallError::Refused(format!(
                        "lease {lease} could not be renewed ({why}) and a new credential was refused: {r}"
                    )),
                    transient => transient,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Renders and writes a credential (key first for `pem`), then runs the hooks.
    async fn write(
        &mut self,
        credential: Option<pb::Credential>,
        lease: Option<pb::Lease>,
        receipt: Option<pb::AuditReceipt>,
        key_pem: Option<Zeroizing<String>>,
    ) -> Result<(), CallError> {
        let c = credential.as_ref();
        let text = Zeroizing::new(
            match self.spec.format {
                Format::Json => {
                    Ok(
                        render::issued_json(credential.clone(), lease.clone(), receipt, None)
                            .to_string(),
                    )
                }
                Format::Token => render::token_text(c),
                Format::Env => render::env_lines(c),
                Format::CredentialProcess => render::credential_process_json(c),
                Format::Pem => {
                    render::pem_chain(c).map(|chain| match (&self.spec.key_path, &key_pem) {
                        (None, Some(k)) => format!("{chain}{}", k.as_str()),
                        _ => chain,
                    })
                }
            }
            .map_err(|e| {
                CallError::Refused(format!("cannot write it as {:?}: {e}", self.spec.format))
            })?,
        );
        if let (Some(path), Some(k)) = (&self.spec.key_path, &key_pem) {
            files::write_atomic(path, k.as_bytes(), self.spec.mode)
                .map_err(|e| CallError::Transient(e.to_string()))?;
        }
        files::write_atomic(&self.spec.path, text.as_bytes(), self.spec.mode)
            .map_err(|e| CallError::Transient(e.to_string()))?;
        let now = self.clock.now();
        let expires = c
            .and_then(|c| c.expires_at.as_ref())
            .or(lease.as_ref().and_then(|l| l.expires_at.as_ref()))
            .map_or(now, |t| from_unix_seconds(t.seconds));
        let lease_id = lease.map(|l| l.id).unwrap_or_default();
        tracing::info!(credential = self.name(), lease = %lease_id, expires_at = %rfc3339(unix_seconds(expires)), path = %self.spec.path.display(), "written");
        self.held = Some(Held {
            lease_id: lease_id.clone(),
            obtained: now,
            expires,
            key_pem,
        });
        let problems = self.after_write().await;
        self.status.send_modify(|s| {
            s.state = State::Fresh;
            s.on_disk = true;
            s.lease_id = Some(lease_id);
            s.expires_at = Some(rfc3339(unix_seconds(expires)));
            s.writes += 1;
            s.access_request = None;
            s.message = problems;
        });
        Ok(())
    }

    /// The command and the signal after a write; their failures are reported, not fatal
    /// (the credential is on disk either way).
    async fn after_write(&self) -> Option<String> {
        let mut problems = Vec::new();
        if let Some(argv) = &self.spec.command {
            if let Err(e) = hooks::run_command(argv).await {
                problems.push(format!("command: {e}"));
            }
        }
        if let Some(s) = &self.spec.signal {
            if let Err(e) = hooks::send_signal(&s.pid_file, &s.signal) {
                problems.push(format!("signal: {e}"));
            }
        }
        if problems.is_empty() {
            return None;
        }
        let text = problems.join("; ");
        tracing::warn!(credential = self.name(), problem = %text, "after the write");
        Some(text)
    }

    fn until_renewal(&self) -> Duration {
        let now = self.clock.now();
        self.held
            .as_ref()
            .map(|h| h.renew_at(self.timing.renew_fraction))
            .and_then(|due| due.duration_since(now).ok())
            .unwrap_or_default()
            .clamp(MIN_WAIT, MAX_WAIT)
    }

    /// A transient failure: keep what is on disk, wait longer each time, but wake in time
    /// to remove it when it expires.
    fn retry_later(&mut self, why: String) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let mut wait = self
            .timing
            .retry_initial
            .saturating_mul(1u32 << self.failures.saturating_sub(1).min(16))
            .min(self.timing.retry_max);
        if let Some(h) = &self.held {
            let left = h
                .expires
                .duration_since(self.clock.now())
                .unwrap_or_default();
            wait = wait.min(left);
        }
        tracing::warn!(credential = self.name(), error = %why, retry_in = ?wait, kept = self.held.is_some(), "broker unreachable");
        self.set(State::Retrying, Some(why));
        wait.max(MIN_WAIT)
    }

    /// Removes the credential from disk and forgets it.
    fn forget(&mut self, why: &str) {
        let Some(h) = self.held.take() else { return };
        for path in self.spec.paths() {
            if let Err(e) = files::remove(path) {
                tracing::error!(credential = self.name(), error = %e, "cannot remove");
            }
        }
        tracing::info!(credential = self.name(), lease = %h.lease_id, reason = why, "removed from disk");
        self.status.send_modify(|s| {
            s.on_disk = false;
            s.lease_id = None;
            s.expires_at = None;
        });
    }

    fn set(&self, state: State, message: Option<String>) {
        self.status.send_modify(|s| {
            s.state = state;
            s.message = message;
        });
    }

    /// Gives the lease back and removes the files (shutdown).
    pub async fn release(&mut self) {
        if let Some(lease) = self.held.as_ref().map(|h| h.lease_id.clone()) {
            if let Err(e) = self.conn.release(&lease).await {
                tracing::warn!(credential = self.name(), lease, error = %e, "release failed; the lease runs out on its own");
            }
        }
        self.forget("released at shutdown");
        self.set(State::Released, None);
    }
}

impl Held {
    fn renew_at(&self, fraction: f64) -> SystemTime {
        let life = self
            .expires
            .duration_since(self.obtained)
            .unwrap_or_default();
        self.obtained + life.mul_f64(fraction)
    }
}

/// A new P-256 key and a CSR for it (the broker puts the caller's SPIFFE ID in the
/// certificate; the CSR only proves possession of the key).
fn new_csr() -> Result<(Vec<u8>, Zeroizing<String>), CallError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CallError::Refused(format!("cannot make a key: {e}")))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| CallError::Refused(format!("cannot make a CSR: {e}")))?;
    Ok((csr.into_bytes(), Zeroizing::new(key.serialize_pem())))
}
