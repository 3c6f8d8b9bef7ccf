//! A pipeline agent asking the broker for a GPU scheduler token, the way an integrator
//! would: its identity comes from the SPIFFE Workload API (`SPIFFE_ENDPOINT_SOCKET`),
//! the broker is reached over SPIFFE mTLS, and the token is used as a bearer credential.
//!
//! ```sh
//! spiffe-broker dev --state-dir /tmp/sb &
//! SPIFFE_ENDPOINT_SOCKET=unix:///tmp/sb/workloads/deploy-agent.sock \
//!   cargo run --example deploy_agent
//! ```

use spiffe_broker::client::{self, ClientIdentity};
use spiffe_broker::proto::v1::credential_broker_client::CredentialBrokerClient;
use spiffe_broker::proto::v1::{credential, Intent, IssueCredentialRequest, ReleaseLeaseRequest};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let broker = std::env::var("SPIFFE_BROKER_ADDR").unwrap_or_else(|_| "127.0.0.1:8443".into());
    let broker_id =
        std::env::var("SPIFFE_BROKER_ID").unwrap_or_else(|_| spiffe_broker::dev::BROKER_ID.into());

    // 1. Who am I? The Workload API hands us an X.509-SVID and keeps it rotated.
    let source = client::workload_source(None).await?;
    println!("my SPIFFE ID: {}", source.svid()?.spiffe_id());

    // 2. Ask for exactly what this step needs, say why, and for how long.
    let channel = client::connect(&broker, &broker_id, &ClientIdentity::Workload(source)).await?;
    let mut brokers = CredentialBrokerClient::new(channel);
    let resp = brokers
        .issue_credential(IssueCredentialRequest {
            profile: "gpu-scheduler-submit".into(),
            scopes: vec!["job:submit".into()],
            ttl: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            intent: Some(Intent {
                action: "submit-training".into(),
                target: "queue/a100".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    let lease = resp.lease.ok_or("no lease in response")?;
    let Some(credential::Kind::Token(token)) = resp.credential.and_then(|c| c.kind) else {
        return Err("no token in response".into());
    };
    println!(
        "lease {} for {:?}, expires at {}",
        lease.id,
        lease.scopes,
        lease.expires_at.map(|t| t.seconds).unwrap_or_default()
    );

    // 3. Use it: `Authorization: Bearer <token>` against the GPU scheduler. (Never log it.)
    println!("token: {} bytes, key {}", token.jwt.len(), token.key_id);

    // 4. Done early? Give it back so the ledger shows the credential's real lifetime.
    brokers
        .release_lease(ReleaseLeaseRequest { lease_id: lease.id })
        .await?;
    println!("released");
    Ok(())
}
