//! The `syslog` sink: RFC 5424 messages over TCP, or TLS (RFC 5425), with octet-counted
//! framing (`LEN SP MSG`). Each entry is one message:
//!
//! ```text
//! <PRI>1 TIMESTAMP HOSTNAME spiffe-broker PROCID KIND [audit@32473 seq="N" hash="…"] ENTRY
//! ```
//!
//! MSGID is the entry's kind, the structured data carries its sequence and chain hash
//! (32473 is the documentation enterprise number of RFC 5612), and MSG is the entry as
//! `audit export` writes it. Severity: warning for refusals, informational otherwise.
//!
//! TCP has no acknowledgement: a write counts once the kernel took it and the connection
//! is still open. Before each delivery the sink checks whether the receiver closed the
//! connection (a restarting rsyslog does) and reconnects instead of writing into a dead
//! socket; what a receiver that crashes takes with it unread is beyond what syslog can
//! tell (the ledger stays the record of truth).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt as _;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::{Facts, Sink, SinkError};
use crate::audit::StoredEntry;
use crate::clock::rfc3339_millis;
use crate::config::{AuditSinkConfig, SinkKind};
use crate::http_client::Trust;
use crate::store::export::ExportEntry;

trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Stream for T {}

/// The syslog sink.
pub(super) struct SyslogSink {
    address: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    facility: u8,
    hostname: String,
    conn: Option<Box<dyn Stream>>,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl SyslogSink {
    pub(super) fn new(config: &AuditSinkConfig) -> Result<Self, SinkError> {
        let SinkKind::Syslog {
            address,
            tls,
            facility,
            hostname,
        } = &config.kind
        else {
            unreachable!("a syslog sink's config")
        };
        let tls = match tls {
            None => None,
            Some(t) => {
                let trust = Trust::from_ca_file(t.ca_file.as_deref());
                let config = trust
                    .client_config()
                    .map_err(|e| SinkError(format!("syslog TLS: {e}")))?;
                let name = ServerName::try_from(t.server_name.clone()).map_err(|e| {
                    SinkError(format!("syslog TLS server name {:?}: {e}", t.server_name))
                })?;
                Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
            }
        };
        Ok(Self {
            address: address.clone(),
            tls,
            facility: *facility,
            hostname: hostname.clone(),
            conn: None,
        })
    }

    async fn connect(&self) -> Result<Box<dyn Stream>, SinkError> {
        let fail = |e: std::io::Error| SinkError(format!("syslog {}: {e}", self.address));
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.address))
            .await
            .map_err(|_| SinkError(format!("syslog {}: connect timed out", self.address)))?
            .map_err(fail)?;
        tcp.set_nodelay(true).map_err(fail)?;
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some((connector, name)) => {
                let tls =
                    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                        .await
                        .map_err(|_| {
                            SinkError(format!("syslog {}: TLS handshake timed out", self.address))
                        })?
                        .map_err(fail)?;
                Ok(Box::new(tls))
            }
        }
    }

    /// One entry as an octet-counted RFC 5424 message.
    fn frame(&self, e: &StoredEntry, out: &mut Vec<u8>) -> Result<(), SinkError> {
        let facts = Facts::of(e, 0);
        let severity = if facts.is_warning() { 4 } else { 6 };
        let pri = u16::from(self.facility) * 8 + severity;
        let entry =
            serde_json::to_string(&ExportEntry::from(e)).map_err(|e| SinkError(e.to_string()))?;
        let msg = format!(
            "<{pri}>1 {} {} spiffe-broker {} {} [audit@32473 seq=\"{}\" hash=\"{}\"] {entry}",
            rfc3339_millis(facts.time_ms),
            self.hostname,
            std::process::id(),
            msgid(&e.kind),
            e.seq,
            hex::encode(&e.hash),
        );
        out.extend_from_slice(format!("{} ", msg.len()).as_bytes());
        out.extend_from_slice(msg.as_bytes());
        Ok(())
    }
}

/// MSGID: 1-32 printable ASCII characters, no space (`-` if none).
fn msgid(kind: &str) -> String {
    let id: String = kind
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(32)
        .collect();
    if id.is_empty() {
        "-".to_owned()
    } else {
        id
    }
}

/// Whether the receiver closed (or broke) the connection: a read that completes at once
/// with end of stream or an error. A live, silent receiver leaves the read pending.
fn closed(conn: &mut Box<dyn Stream>) -> bool {
    let mut byte = [0u8; 1];
    matches!(conn.read(&mut byte).now_or_never(), Some(Ok(0) | Err(_)))
}

impl Sink for SyslogSink {
    fn deliver<'a>(
        &'a mut self,
        entries: &'a [StoredEntry],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut frames = Vec::new();
            for e in entries {
                self.frame(e, &mut frames)?;
            }
            if self.conn.as_mut().is_some_and(closed) {
                self.conn = None;
            }
            let mut conn = match self.conn.take() {
                Some(c) => c,
                None => self.connect().await?,
            };
            let written = async {
                conn.write_all(&frames).await?;
                conn.flush().await
            }
            .await;
            match written {
                Ok(()) => {
                    self.conn = Some(conn);
                    Ok(())
                }
                Err(e) => Err(SinkError(format!("syslog {}: {e}", self.address))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_octet_counted_rfc5424() {
        let sink = SyslogSink {
            address: "127.0.0.1:1".into(),
            tls: None,
            facility: 10,
            hostname: "broker-1".into(),
            conn: None,
        };
        let e = StoredEntry {
            seq: 7,
            kind: "deny".into(),
            lease_id: None,
            body: r#"{"time_ms":1764932400120,"kind":"deny","decision":"deny"}"#.into(),
            prev_hash: vec![0; 32],
            hash: vec![0xab; 32],
        };
        let mut out = Vec::new();
        sink.frame(&e, &mut out).expect("test step");
        let text = String::from_utf8(out).expect("test step");
        let (len, msg) = text.split_once(' ').expect("test step");
        assert_eq!(len.parse::<usize>().expect("test step"), msg.len());
        let head = format!(
            "<84>1 2025-12-05T11:00:00.120Z broker-1 spiffe-broker {} deny [audit@32473 seq=\"7\" hash=\"{}\"] {{\"seq\":7,",
            std::process::id(),
            "ab".repeat(32)
        );
        assert!(msg.starts_with(&head), "{msg}");
        assert_eq!(msgid("authn_failure"), "authn_failure");
        assert_eq!(msgid(""), "-");
    }
}
