//! The fuzz harness: one `run(&[u8])` per target, each feeding untrusted bytes through
//! the broker's real parsing and validation code and asserting its invariants (a panic
//! or a failed assertion is a finding).
//!
//! The same source is compiled twice: into the cargo-fuzz crate (`fuzz/fuzz_targets/*`
//! call `run`), and into the main crate's `tests/it/fuzz_regressions.rs` (which replays
//! `fuzz/corpus/` and `fuzz/regressions/` through the same `run` on every `cargo test`).
//! So it may only use crates the main crate depends on, and no `cfg(fuzzing)`.
//!
//! Targets:
//! - [`issue_request`]: protobuf `IssueCredentialRequest` → `api::parse_issue_request`
//!   and every other check the gRPC handler applies before policy;
//! - [`x509_svid`]: DER chain → `authn::validate_x509_svid` and the caching
//!   authenticator; non-DER input → SPIFFE ID parsing (`workload_id` via JWT-SVID `sub`);
//! - [`jwt_svid`]: compact JWS → `jose::split`, `authn::validate_jwt_svid`, authenticator;
//! - [`csr`]: PKCS#10 (PEM or DER) → `issuer::x509::parse_csr`, and minting for accepted ones;
//! - [`policy`]: a structured request (see its format) → `CedarPolicy::decide` on the demo
//!   policy, asserting the profile ceiling;
//! - [`audit_entry`]: `entries.jsonl` lines → the export verifier's entry checks
//!   (`LogVerifier::push` / `ChainVerifier::push`), checkpoint notes → `VerifierKey`.

pub mod audit_entry;
pub mod csr;
pub mod fixture;
pub mod issue_request;
pub mod jwt_svid;
pub mod policy;
pub mod x509_svid;

/// A target's entry point: one input, panics on a broken invariant.
pub type Entry = fn(&[u8]);

/// Every target, with its entry point (the regression test iterates over this).
pub const TARGETS: &[(&str, Entry)] = &[
    ("issue_request", issue_request::run),
    ("x509_svid", x509_svid::run),
    ("jwt_svid", jwt_svid::run),
    ("csr", csr::run),
    ("policy", policy::run),
    ("audit_entry", audit_entry::run),
];
