//! The `spiffe-broker` command line, one module per family of subcommands; `main.rs`
//! parses the arguments and dispatches here.

pub mod admin;
pub mod agent;
pub mod args;
pub mod audit;
pub mod error;
pub mod keys;
pub mod listing;
pub mod login;
pub mod output;
pub mod policy;
pub mod review;
pub mod serve;
pub mod witness;
pub mod workload;
