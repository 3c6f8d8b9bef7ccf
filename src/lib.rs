//! spiffe-broker: workloads prove who they are with a SPIFFE SVID and receive a
//! short-lived, scope-limited credential; every decision lands in a hash-chained ledger.
//!
//! The request path, one module per step (see `DESIGN.md` §2):
//!
//! ```text
//! api (tonic adapters, proto ⇄ domain)
//!   → authn   transport facts → VerifiedCaller           (authn/)
//!   → policy  caller + request → Decision                 (policy/)
//!   → issuer  grant → template → sign → validate          (issuer/, crypto/)
//!   → store   one durable commit: lease + audit entry     (store/, audit.rs)
//! ```
//!
//! Around it: `broker` wires the steps together, `server` owns the listeners (mTLS gRPC
//! and plain HTTP), `error` is the one place a domain error becomes a gRPC status,
//! `clock` is the only reader of wall time, `workload` is the dev SPIFFE Workload API
//! and dev CA, `dev` assembles the embedded default, `client` is what the CLI and the
//! examples use to reach a broker.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod authn;
pub mod broker;
pub mod checkpoint;
pub mod client;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod domain;
pub mod error;
pub mod idempotency;
pub mod issuer;
pub mod jose;
pub mod merkle;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod relying_party;
pub mod server;
pub mod store;
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
}
