//! TLS for the link to PostgreSQL: rustls with the ring provider, plugged into the
//! `postgres` crate as its `MakeTlsConnect`.
//!
//! What each `sslmode` means, and how a connection string resolves to a [`Policy`], is
//! `crate::config::postgres`; this module enforces it.
//!
//! Channel binding (`tls-server-end-point`, RFC 5929) is offered, so SCRAM
//! authentication over TLS is tied to the server's certificate where the server supports
//! it (`channel_binding=require` in the connection string insists on it).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use ::postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use futures::future::BoxFuture;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::postgres::Check;
use crate::config::postgres::{Policy, Roots, SslMode, SYSTEM_BUNDLE};

/// The `postgres` crate's TLS connector: one rustls config, shared by every connection.
#[derive(Clone)]
pub struct PgTls {
    config: Arc<ClientConfig>,
    mode: SslMode,
}

impl PgTls {
    /// Loads the roots (once, at start: a CA file changed later takes a restart) and builds
    /// the rustls config on the ring provider.
    pub fn new(policy: &Policy) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let check = policy.check();
        let roots = match (&policy.roots, check) {
            (_, Check::Nothing) | (None, _) => RootCertStore::empty(),
            (Some(roots), _) => load_roots(roots)?,
        };
        let verifier = Verifier {
            check,
            roots: Arc::new(roots),
            provider: provider.clone(),
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        // PostgreSQL 17's protocol name; older servers ignore it, newer ones accept it (and
        // need it for sslnegotiation=direct).
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            mode: policy.mode,
        })
    }
}

/// Reads the trust anchors; a file with no usable certificate is an error, not an empty
/// (trust-nothing, fail-later) store.
fn load_roots(roots: &Roots) -> Result<RootCertStore, String> {
    let path = match roots {
        Roots::File(p) => p.clone(),
        Roots::System => std::env::var_os("SSL_CERT_FILE")
            .map_or_else(|| PathBuf::from(SYSTEM_BUNDLE), PathBuf::from),
    };
    let pem =
        std::fs::read(&path).map_err(|e| format!("PostgreSQL CA file {}: {e}", path.display()))?;
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        certs.push(cert.map_err(|e| format!("PostgreSQL CA file {}: {e}", path.display()))?);
    }
    let mut store = RootCertStore::empty();
    let (added, _unusable) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "PostgreSQL CA file {}: no usable CA certificate (PEM `CERTIFICATE` blocks)",
            path.display()
        ));
    }
    Ok(store)
}

/// Checks the server's certificate as [`Check`] says. Handshake signatures are always
/// verified, so even `require` talks to the holder of the presented certificate's key.
#[derive(Debug)]
struct Verifier {
    check: Check,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.check != Check::Nothing {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                &self.roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
            if self.check == Check::ChainAndName {
                rustls::client::verify_server_name(&cert, server_name)?;
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!(provider.signature_verification_algorithms);
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = String;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, String> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|_| format!("{domain:?} is not a host name TLS can verify"))?;
        Ok(PgTlsConnect {
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
            name,
            mode: self.mode,
        })
    }
}

/// One connection's handshake.
pub struct PgTlsConnect {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    mode: SslMode,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = String;
    type Future = BoxFuture<'static, Result<PgTlsStream<S>, String>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = self
                .connector
                .connect(self.name.clone(), stream)
                .await
                .map_err(|e| explain(&e, &self.name, self.mode))?;
            let binding = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(end_point_hash);
            Ok(PgTlsStream {
                inner: tls,
                binding,
            })
        })
    }
}

/// A handshake failure in words an operator can act on. rustls's own error is kept as
/// the detail; nothing here can hold the password (it is sent only after TLS is up).
fn explain(e: &io::Error, name: &ServerName<'_>, mode: SslMode) -> String {
    let host = name.to_str();
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(
            err @ rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ),
        ) => format!(
            "host name mismatch: the PostgreSQL server certificate is not valid for {host} \
             (sslmode={mode}): {err}"
        ),
        Some(err @ rustls::Error::InvalidCertificate(_)) => format!(
            "PostgreSQL server certificate not trusted (sslmode={mode}, host {host}): {err}"
        ),
        Some(err) => format!("TLS handshake with the PostgreSQL server {host} failed: {err}"),
        None => format!("TLS handshake with the PostgreSQL server {host} failed: {e}"),
    }
}

/// RFC 5929 `tls-server-end-point`: the certificate's hash with its signature's hash
/// (SHA-256 for MD5 and SHA-1), as the server computes it. `None` for algorithms the
/// server cannot bind to (RSA-PSS, Ed25519): SCRAM then runs without channel binding.
fn end_point_hash(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    let digest = match parsed.signature_algorithm.algorithm.to_id_string().as_str() {
        // md5/sha1/sha256 WithRSAEncryption; ecdsa-with-SHA1/-SHA256
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.2" => &ring::digest::SHA256,
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => &ring::digest::SHA384,
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => &ring::digest::SHA512,
        _ => return None,
    };
    Some(ring::digest::digest(digest, cert).as_ref().to_vec())
}

/// A TLS session to the server, with its channel-binding data.
pub struct PgTlsStream<S> {
    inner: tokio_rustls::client::TlsStream<S>,
    binding: Option<Vec<u8>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        match &self.binding {
            Some(hash) => ChannelBinding::tls_server_end_point(hash.clone()),
            None => ChannelBinding::none(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    delegate_async_read!(inner);
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    delegate_async_write!(inner);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").expect("write");
        let policy = Policy::resolve(
            Some("verify-full"),
            Some(path.to_str().expect("utf-8")),
            None,
            None,
        )
        .expect("policy");
        let e = PgTls::new(&policy).err().expect("refused");
        assert!(e.contains("no usable CA certificate"), "{e}");
        let missing = Policy::resolve(Some("verify-ca"), Some("/nonexistent/ca.pem"), None, None)
            .expect("policy");
        let e = PgTls::new(&missing).err().expect("refused");
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
