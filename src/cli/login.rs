//! `spiffe-broker login --oidc` and `logout`: a person signs the CLI in through the
//! broker's console (their OpenID Provider, MFA and all) and keeps a session token in
//! `$XDG_CONFIG_HOME/spiffe-broker/session.json` (0600). With no SVID at hand (no
//! `SPIFFE_ENDPOINT_SOCKET`, no `--svid-cert`), the review and operator commands then
//! call the broker as that person.
//!
//! The flow is the OAuth native-app pattern (RFC 8252) with the broker's console as the
//! authorization server: a loopback listener, `state`, and PKCE `S256`; the one-time code
//! comes back to the loopback port and is redeemed with the verifier. There is no device
//! grant (RFC 8628): the browser must run on the same computer as the CLI.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use spiffe_broker::http_client::{HttpClient, Options, Trust};

use super::error::CliError;
use super::output::fail;

/// How long `login` waits for the browser.
const WAIT: Duration = Duration::from_secs(300);

/// What `login` keeps between commands.
#[derive(Serialize, Deserialize)]
pub struct SavedSession {
    /// The console it came from (where `logout` ends it).
    pub console: String,
    /// The session token (`authorization: Session <token>`).
    pub session: String,
    /// When it ends at the latest (Unix seconds).
    pub expires_at: i64,
    /// Who (`oidc:<issuer>#<sub>`).
    pub person: String,
    /// The broker's trust bundle (PEM), to verify its gRPC listener.
    pub bundle_pem: Option<String>,
}

fn path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("spiffe-broker").join("session.json"))
}

/// The saved session, if there is one that has not expired.
pub fn saved() -> Option<SavedSession> {
    let text = std::fs::read_to_string(path()?).ok()?;
    let s: SavedSession = serde_json::from_str(&text).ok()?;
    let now = spiffe_broker::clock::Clock::unix_seconds(&spiffe_broker::clock::SystemClock);
    (s.expires_at > now).then_some(s)
}

fn random() -> Result<String, CliError> {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| fail("no randomness"))?;
    Ok(spiffe_broker::jose::b64(&b))
}

fn http(ca_file: Option<&std::path::Path>) -> Result<HttpClient, CliError> {
    HttpClient::new(&Options::new(Trust::from_ca_file(ca_file))).map_err(fail)
}

/// Waits for the browser's `GET /callback?code=…&state=…` on `listener`; the code.
async fn callback(listener: &TcpListener, state: &str) -> Result<String, CliError> {
    loop {
        let (mut conn, _) = listener.accept().await.map_err(fail)?;
        let mut buf = vec![0u8; 8192];
        let mut n = 0;
        while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        let head = String::from_utf8_lossy(&buf[..n]);
        let target = head
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("GET "))
            .and_then(|l| l.split(' ').next())
            .unwrap_or_default();
        let query = target.strip_prefix("/callback?").unwrap_or_default();
        let q: std::collections::HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let ok = q.get("state").map(String::as_str) == Some(state) && q.contains_key("code");
        let (status, text) = if ok {
            (
                "200 OK",
                "Signed in. You can close this tab and go back to the terminal.",
            )
        } else {
            (
                "400 Bad Request",
                "This is not the sign-in this CLI started.",
            )
        };
        let _ = conn
            .write_all(
                format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                )
                .as_bytes(),
            )
            .await;
        if ok {
            return Ok(q.get("code").cloned().unwrap_or_default());
        }
    }
}

/// `spiffe-broker login --oidc`.
pub async fn login(console: String, ca_file: Option<PathBuf>) -> Result<(), CliError> {
    let console = console.trim_end_matches('/').to_owned();
    let verifier = zeroize::Zeroizing::new(random()?);
    let challenge = spiffe_broker::jose::b64(
        ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref(),
    );
    let state = random()?;
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(fail)?;
    let port = listener.local_addr().map_err(fail)?.port();
    let url = format!("{console}/console/cli?port={port}&state={state}&challenge={challenge}");
    eprintln!("Sign in with your browser on this computer (your identity provider, then confirm):\n  {url}");
    // Best effort: most desktops open it; the URL above is the way otherwise.
    let _ = std::process::Command::new("xdg-open")
        .arg(&url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let code = tokio::time::timeout(WAIT, callback(&listener, &state))
        .await
        .map_err(|_| fail("no sign-in came back within 5 minutes"))??;
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("code", &code)
        .append_pair("verifier", &verifier)
        .finish();
    let req = http::Request::post(format!("{console}/console/cli/token"))
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body.into_bytes())
        .map_err(fail)?;
    let resp = http(ca_file.as_deref())?.send(req).await.map_err(fail)?;
    let answer: serde_json::Value = serde_json::from_slice(&resp.body).unwrap_or_default();
    if resp.status != http::StatusCode::OK {
        return Err(fail(format!(
            "the broker refused the sign-in: {}",
            answer["error"].as_str().unwrap_or("no reason given")
        )));
    }
    let saved = SavedSession {
        console,
        session: answer["session"].as_str().unwrap_or_default().to_owned(),
        expires_at: answer["expires_at"].as_i64().unwrap_or_default(),
        person: answer["person"].as_str().unwrap_or_default().to_owned(),
        bundle_pem: answer["bundle_pem"].as_str().map(str::to_owned),
    };
    let file = path().ok_or_else(|| fail("no config directory (set HOME or XDG_CONFIG_HOME)"))?;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    }
    let json = serde_json::to_vec(&saved).map_err(fail)?;
    spiffe_broker::files::write_atomic(&file, &json, 0o600).map_err(fail)?;
    println!(
        "{}",
        serde_json::json!({"person": saved.person, "expires_at": saved.expires_at, "saved": file})
    );
    Ok(())
}

/// `spiffe-broker logout`: ends the saved session at the broker and forgets it.
pub async fn logout(ca_file: Option<PathBuf>) -> Result<(), CliError> {
    let file = path().ok_or_else(|| fail("no config directory"))?;
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(_) => {
            println!(
                "{}",
                serde_json::json!({"signed_out": false, "reason": "not signed in"})
            );
            return Ok(());
        }
    };
    let removed = std::fs::remove_file(&file);
    let s: SavedSession = serde_json::from_str(&text).map_err(fail)?;
    let req = http::Request::post(format!("{}/console/cli/signout", s.console))
        .header(
            http::header::AUTHORIZATION,
            format!("{}{}", spiffe_broker::broker::SESSION_SCHEME, s.session),
        )
        .body(Vec::new())
        .map_err(fail)?;
    let ended = http(ca_file.as_deref())?
        .send(req)
        .await
        .map(|r| r.status == http::StatusCode::NO_CONTENT);
    removed.map_err(|e| fail(format!("{}: {e}", file.display())))?;
    println!(
        "{}",
        serde_json::json!({"signed_out": true, "person": s.person, "ended_at_broker": ended.unwrap_or(false)})
    );
    Ok(())
}
