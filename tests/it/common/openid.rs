//! A real OpenID Provider for tests: panva's OpenID-certified `oidc-provider` on Node.js
//! (`tests/oidc/`, installed by `npm ci --prefix tests/oidc`, which `.ci/run` does), with
//! people alice (groups ml-engineers, registry-approvers), bob (contractors), root
//! (platform-admins) and dana (auditors), and a confidential client `spiffe-broker`.
//! `login` signs a person in through the provider's own pages (authorization code flow
//! with PKCE, state and nonce) and returns the ID token.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The broker's client id at the test provider.
pub const CLIENT_ID: &str = "spiffe-broker";

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc")
}

/// A running provider; killed when dropped.
pub struct OpenIdProvider {
    child: Child,
    /// Its issuer URL (`http://127.0.0.1:PORT`).
    pub issuer: String,
}

impl Drop for OpenIdProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl OpenIdProvider {
    /// Starts it on a free loopback port and waits for its `ready` line.
    pub fn start() -> Self {
        assert!(
            dir().join("node_modules/oidc-provider").is_dir(),
            "the test OpenID Provider is not installed: run `npm ci --prefix tests/oidc` (Node.js and npm)"
        );
        // The issuer names its port, so the port is chosen before the provider starts.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut child = Command::new("node")
            .arg(dir().join("provider.mjs"))
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node runs the OpenID Provider");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // Read to the end, so the provider never writes into a closed pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("ready ") {
                    let _ = tx.send(url.to_owned());
                }
            }
        });
        let issuer = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the OpenID Provider prints `ready URL`");
        Self { child, issuer }
    }

    /// Signs `user` in through the provider's login and consent pages; the ID token.
    pub fn login(&self, user: &str) -> String {
        let out = Command::new("node")
            .arg(dir().join("login.mjs"))
            .args([self.issuer.as_str(), user])
            .output()
            .expect("node runs the sign-in");
        assert!(
            out.status.success(),
            "sign-in failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The `[[oidc_providers]]` entry for this provider.
    pub fn config(&self) -> String {
        format!(
            "\n[[oidc_providers]]\nissuer = \"{}\"\nclient_id = \"{CLIENT_ID}\"\n",
            self.issuer
        )
    }
}
