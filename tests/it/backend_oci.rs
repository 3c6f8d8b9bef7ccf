//! OCI registry tokens against a real registry: Debian's `docker-registry`
//! (distribution 2.8) configured for token auth with the broker's issuer, service and
//! `/oci/rootcertbundle.pem`. A push token for one repository pushes and pulls a blob
//! and a manifest there, and is refused elsewhere; a pull-only token cannot push.
//! `.ci/run` installs the package; the test starts the registry on a free port.

use crate::common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Harness, ALICE, DEPLOY_AGENT, MODEL_RUNTIME};
use spiffe_broker::proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A registry process, killed on drop.
struct Registry {
    child: Child,
    addr: String,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Starts the registry trusting the broker's token keys.
async fn registry(h: &Harness) -> Registry {
    assert!(
        std::path::Path::new(REGISTRY_BIN).exists(),
        "{REGISTRY_BIN} is missing: install Debian's docker-registry package (.ci/run does)"
    );
    let (status, bundle) = h.http_get("/oci/rootcertbundle.pem").await;
    assert_eq!(status, 200);
    assert!(bundle.contains("BEGIN CERTIFICATE"));
    let dir = h.dir.path().join("registry");
    std::fs::create_dir_all(dir.join("data")).expect("registry dir");
    std::fs::write(dir.join("bundle.pem"), &bundle).expect("bundle");
    let addr = format!("127.0.0.1:{}", free_port());
    let config = format!(
        "version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {data}
  redirect:
    disable: true
http:
  addr: {addr}
  secret: spiffe-broker-test-registry-secret
auth:
  token:
    realm: http://127.0.0.1:1/token
    service: model-registry
    issuer: http://{issuer}
    rootcertbundle: {bundle}
",
        data = dir.join("data").display(),
        issuer = h.env.http_addr,
        bundle = dir.join("bundle.pem").display(),
    );
    std::fs::write(dir.join("config.yml"), config).expect("config");
    let registry = Registry {
        child: Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry"),
        addr,
    };
    // Bounded wait for the listener (start-up, not expiry); dropping kills it.
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(&registry.addr).await.is_ok() {
            return registry;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the registry did not listen on {}", registry.addr);
}

/// One HTTP/1.1 exchange: (status, lower-case headers, body).
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, HashMap<String, String>, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write body");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = buf[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, headers, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16)
            .expect("chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

fn sha256(b: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
    )
}

/// Uploads a blob (POST, then PUT with the digest); returns the status of the PUT.
async fn push_blob(reg: &str, repo: &str, token: &str, blob: &[u8]) -> u16 {
    let auth = format!("Bearer {token}");
    let (status, headers, _) = http(
        reg,
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    if status != 202 {
        return status;
    }
    let location = headers.get("location").expect("upload location");
    // Absolute (http://host/v2/…?_state=…) or relative; keep the query as given.
    let path = match location.find("/v2/") {
        Some(i) => &location[i..],
        None => location.as_str(),
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    let (status, _, _) = http(
        reg,
        "PUT",
        &format!("{path}{sep}digest={}", sha256(blob)),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/octet-stream"),
        ],
        blob,
    )
    .await;
    status
}

async fn upload_refusal(reg: &str, repo: &str, token: &str) -> (u16, String) {
    let (status, headers, _) = http(
        reg,
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        &[("Authorization", &format!("Bearer {token}"))],
        b"",
    )
    .await;
    (
        status,
        headers.get("www-authenticate").cloned().unwrap_or_default(),
    )
}

/// A push token for `models/a`: asked by the deploy agent, approved by alice, redeemed.
async fn push_token(h: &Harness) -> String {
    let req = pb::IssueCredentialRequest {
        profile: "model-registry-push".into(),
        intent: Some(pb::Intent {
            action: "push-model".into(),
            target: "models/a".into(),
            artifact_digest: format!("sha256:{}", "ab".repeat(32)),
            ticket: "CHG-7".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    let pending = agent
        .issue_credential(req.clone())
        .await
        .expect("pending")
        .into_inner()
        .access_request
        .expect("access request");
    let alice =
        pb::approvals_client::ApprovalsClient::new(h.channel_as(&h.identity(ALICE).await).await);
    alice
        .clone()
        .review_access_request(pb::ReviewAccessRequestRequest {
            id: pending.id.clone(),
            approve: true,
            reason: "release 7 is signed off".into(),
        })
        .await
        .expect("approved");
    let issued = agent
        .issue_credential(pb::IssueCredentialRequest {
            access_request_id: pending.id,
            ..req
        })
        .await
        .expect("redeemed")
        .into_inner();
    common::token_of(&issued.credential)
}

async fn pull_token(h: &Harness, repo: &str) -> String {
    let issued = h
        .broker_as(MODEL_RUNTIME)
        .await
        .issue_credential(pb::IssueCredentialRequest {
            profile: "model-registry-pull".into(),
            intent: Some(pb::Intent {
                action: "load-model".into(),
                target: repo.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("pull token")
        .into_inner();
    common::token_of(&issued.credential)
}

#[tokio::test]
async fn a_real_registry_accepts_push_and_pull_tokens_only_where_granted() {
    let h = common::start().await;
    let reg = registry(&h).await;
    let token = push_token(&h).await;

    // The token is in distribution's format, verifiable with the published JWKS too.
    let claims = common::verify_jwt(&token, &h.jwks().await);
    assert_eq!(claims["aud"], "model-registry");
    assert_eq!(
        claims["access"],
        serde_json::json!([{"type": "repository", "name": "models/a", "actions": ["pull", "push"]}])
    );

    // Push a config blob, a layer and an OCI manifest to models/a.
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let layer = b"model weights, quantised".to_vec();
    assert_eq!(push_blob(&reg.addr, "models/a", &token, config).await, 201);
    assert_eq!(push_blob(&reg.addr, "models/a", &token, &layer).await, 201);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(&layer), "size": layer.len()}],
    })
    .to_string();
    let auth = format!("Bearer {token}");
    let (status, _, body) = http(
        &reg.addr,
        "PUT",
        "/v2/models/a/manifests/v1",
        &[("Authorization", &auth), ("Content-Type", OCI_MANIFEST)],
        manifest.as_bytes(),
    )
    .await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));

    // Pull them back with the same token.
    let (status, _, got) = http(
        &reg.addr,
        "GET",
        "/v2/models/a/manifests/v1",
        &[("Authorization", &auth), ("Accept", OCI_MANIFEST)],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(got, manifest.as_bytes());
    let (status, _, got) = http(
        &reg.addr,
        "GET",
        &format!("/v2/models/a/blobs/{}", sha256(&layer)),
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(got, layer);

    // The same token is refused for another repository.
    let (status, challenge) = upload_refusal(&reg.addr, "models/b", &token).await;
    assert_eq!(status, 401);
    assert!(challenge.contains("insufficient_scope"), "{challenge}");
    let (status, _, _) = http(
        &reg.addr,
        "GET",
        "/v2/models/b/manifests/v1",
        &[("Authorization", &auth), ("Accept", OCI_MANIFEST)],
        b"",
    )
    .await;
    assert_eq!(status, 401);

    // A pull-only token reads models/a but cannot push to it.
    let pull = pull_token(&h, "models/a").await;
    let (status, _, got) = http(
        &reg.addr,
        "GET",
        "/v2/models/a/manifests/v1",
        &[
            ("Authorization", &format!("Bearer {pull}")),
            ("Accept", OCI_MANIFEST),
        ],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(got, manifest.as_bytes());
    let (status, challenge) = upload_refusal(&reg.addr, "models/a", &pull).await;
    assert_eq!(status, 401);
    assert!(challenge.contains("insufficient_scope"), "{challenge}");

    // A token whose signature was altered is an invalid token to the registry.
    let mut forged = token.clone().into_bytes();
    let i = forged.len() - 5;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).expect("ascii");
    let (status, challenge) = upload_refusal(&reg.addr, "models/a", &forged).await;
    assert_eq!(status, 401);
    assert!(challenge.contains("invalid_token"), "{challenge}");
}

#[tokio::test]
async fn repository_names_a_registry_would_misread_are_refused() {
    let h = common::start().await;
    let before = h.lease_count();
    for target in ["Models/A", "models//a", "../etc"] {
        let err = h
            .broker_as(MODEL_RUNTIME)
            .await
            .issue_credential(pb::IssueCredentialRequest {
                profile: "model-registry-pull".into(),
                intent: Some(pb::Intent {
                    action: "load-model".into(),
                    target: target.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect_err(target);
        assert!(
            matches!(
                err.code(),
                tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
            ),
            "{target}: {err:?}"
        );
        assert!(
            err.message().contains("repository") || err.message().contains("scope"),
            "{target}: {}",
            err.message()
        );
    }
    assert_eq!(h.lease_count(), before, "nothing issued");
}
