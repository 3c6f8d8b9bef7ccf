//! `spiffe-broker dev` as a child process, for tests that drive the binary.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_spiffe-broker");

/// A running `spiffe-broker dev`; killed if dropped while running.
pub struct Running {
    pub child: Child,
    pub grpc: String,
    /// The HTTP listener's base URL (`http://127.0.0.1:PORT`).
    pub http: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `spiffe-broker dev` on port 0 and waits (bounded) for `ready`.
pub fn start_dev(state: &Path) -> Running {
    start_dev_with(state, &[])
}

/// [`start_dev`] with more `dev` flags.
pub fn start_dev_with(state: &Path, extra: &[&str]) -> Running {
    let mut child = Command::new(BIN)
        .args(["dev", "--state-dir"])
        .arg(state)
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(extra)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dev");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut grpc, mut http) = (None, None);
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("dev prints ready");
        if let Some(rest) = line.trim().strip_prefix("gRPC (mTLS):") {
            grpc = rest.split_whitespace().next().map(str::to_owned);
        }
        if let Some(rest) = line.trim().strip_prefix("HTTP:") {
            http = rest.split_whitespace().next().map(str::to_owned);
        }
        if line == "ready" {
            break;
        }
    }
    Running {
        child,
        grpc: grpc.expect("gRPC address printed"),
        http: http.expect("HTTP address printed"),
    }
}
