//! spiffe-broker: workloads prove who they are with a SPIFFE SVID and receive a
//! short-lived, scope-limited credential; every decision lands in a hash-chained ledger.
//!
//! The request path, one module per step:
//!
//! ```text
//! api (tonic adapters, proto ⇄ domain)
//!   → authn   transport facts → VerifiedCaller           (authn/)
//!   → policy  caller + request → Decision                 (policy/)
//!   → issuer  grant → template → sign → validate          (issuer/, crypto/)
//!   → store   one durable commit: lease + audit entry     (store/, audit.rs)
//! ```
//!
//! `broker` wires the steps together, one module per use case; `server` owns the
//! listeners (mTLS gRPC and plain HTTP); `console` is the web console for people (sign-in
//! through an OpenID Provider, reviews, operations, the audit log) on the HTTP listener; `error` is the one place a domain error becomes
//! a gRPC status; `clock` is the only reader of wall time; `workload` is the dev SPIFFE
//! Workload API and dev CA; `dev` assembles the embedded default; `client` is what the CLI
//! and the examples use to reach a broker; `agent` keeps a workload's credentials fresh on
//! disk (`spiffe-broker agent`); `relying_party` is the library a relying party
//! embeds (it needs nothing of the broker's internals); `http_client` is the one outbound
//! HTTP(S) client (Vault, STS, webhooks, the relying party's fetches); `sinks` ship
//! committed audit entries to a file, syslog or an OpenTelemetry collector; `oidc`
//! verifies people's ID tokens from configured OpenID Providers (token exchange, console
//! sign-in) and runs the authorization code flow;
//! `checkpoint` and `cosignature` are the log's signed notes and witnesses' cosignatures on
//! them, `witness` is the C2SP witness protocol: the broker's submissions and the
//! `spiffe-broker witness` service; `monitor` follows the log for watched identities.
//!
//! # Layers
//!
//! A module imports (`use crate::…`) only modules of its own layer or below, and the
//! imports have no cycle; `tests/it/layers.rs` reads this map and the sources and fails on
//! an upward arrow, a cycle, or a module missing from the map. `cli` is the binary's
//! (`src/main.rs` and `src/cli/`), on top.
//!
//! ```text
//! layer 0: domain proto
//! layer 1: clock merkle metrics jose http_client files traceparent
//! layer 2: crypto checkpoint cosignature audit config
//! layer 3: authn store notify relying_party oidc monitor
//! layer 4: policy workload client otlp sinks telemetry witness
//! layer 5: issuer agent
//! layer 6: broker error
//! layer 7: api console
//! layer 8: server
//! layer 9: dev
//! layer 10: cli
//! ```
#![forbid(unsafe_code)]

/// The handshake-signature methods of a rustls certificate verifier
/// (`ServerCertVerifier`, `ClientCertVerifier`): every verifier here checks them the same
/// way, with the algorithms at `self.<path>` (a `WebPkiSupportedAlgorithms`). Only the
/// certificate check differs, and each verifier writes that itself.
macro_rules! handshake_signatures {
    ($($algs:ident).+) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.$($algs).+)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.$($algs).+)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.$($algs).+.supported_schemes()
        }
    };
}

/// `AsyncWrite` for a wrapper whose writes all go to `self.<field>` unchanged (TLS
/// connections that carry peer facts, the Workload API's header shim).
macro_rules! delegate_async_write {
    ($field:ident) => {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.$field).poll_write(cx, buf)
        }
        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
        }
        fn is_write_vectored(&self) -> bool {
            self.$field.is_write_vectored()
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.$field).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.$field).poll_shutdown(cx)
        }
    };
}

/// `AsyncRead` for a wrapper whose reads all come from `self.<field>` unchanged.
macro_rules! delegate_async_read {
    ($field:ident) => {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.$field).poll_read(cx, buf)
        }
    };
}

pub mod agent;
pub mod api;
pub mod audit;
pub mod authn;
pub mod broker;
pub mod checkpoint;
pub mod client;
pub mod clock;
pub mod config;
pub mod console;
pub mod cosignature;
pub mod crypto;
pub mod dev;
pub mod domain;
pub mod error;
pub mod files;
pub mod http_client;
pub mod issuer;
pub mod jose;
pub mod merkle;
pub mod metrics;
pub mod monitor;
pub mod notify;
pub mod oidc;
pub mod otlp;
pub mod policy;
pub mod relying_party;
pub mod server;
pub mod sinks;
pub mod store;
pub mod telemetry;
pub mod traceparent;
pub mod witness;
pub mod workload;

/// Generated protobuf and gRPC code.
pub mod proto {
    /// `spiffe_broker.v1`: the broker's public API.
    pub mod v1 {
        tonic::include_proto!("spiffe_broker.v1");
    }
    /// The SPIFFE Workload API (the public `workload.proto`, which has no package).
    #[allow(clippy::all, missing_docs)]
    pub mod workload {
        tonic::include_proto!("_");
    }
    /// OpenTelemetry's OTLP (`proto/opentelemetry/`): log records for the audit sink.
    #[allow(clippy::all, missing_docs)]
    pub mod opentelemetry {
        pub mod proto {
            pub mod common {
                pub mod v1 {
                    tonic::include_proto!("opentelemetry.proto.common.v1");
                }
            }
            pub mod resource {
                pub mod v1 {
                    tonic::include_proto!("opentelemetry.proto.resource.v1");
                }
            }
            pub mod logs {
                pub mod v1 {
                    tonic::include_proto!("opentelemetry.proto.logs.v1");
                }
            }
            pub mod trace {
                pub mod v1 {
                    tonic::include_proto!("opentelemetry.proto.trace.v1");
                }
            }
            pub mod collector {
                pub mod logs {
                    pub mod v1 {
                        tonic::include_proto!("opentelemetry.proto.collector.logs.v1");
                    }
                }
                pub mod trace {
                    pub mod v1 {
                        tonic::include_proto!("opentelemetry.proto.collector.trace.v1");
                    }
                }
            }
        }
    }
    /// The broker API's descriptors (an encoded `FileDescriptorSet`), served by gRPC reflection.
    pub const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
}
