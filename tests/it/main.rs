//! Every integration test in one binary: each module below was its own test crate, and
//! each of those linked tonic, Cedar, rusqlite and postgres again. Run one area with
//! `cargo test --test it approvals::` (module path as a filter).

mod common;

mod agent;
mod approval_webhooks;
mod approvals;
mod audit_sinks;
mod authn_attacks;
mod backend_oci;
mod backend_vault;
mod backend_x509;
mod bundle_rotation;
mod cli;
mod console;
mod crash;
mod delegation;
mod deploy_monitoring;
mod faults;
mod fuzz_regressions;
mod ha;
mod hostile_input;
mod http_tls;
mod key_rotation;
mod layers;
mod lifecycle;
mod limits;
mod monitor;
mod pg_tls;
mod policy;
mod relying_party;
mod revocation;
mod security_review;
mod store_conformance;
mod syslog_rsyslog;
mod tls_resumption;
mod tracing_export;
mod verifiable_log;
mod witness;
