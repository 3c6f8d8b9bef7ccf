//! An AI agent acting for a person, the way an integrator would wire it (OAuth 2.0 Token
//! Exchange, RFC 8693): alice (a person with a dev SVID) gets a short token whose audience
//! is the broker and which names the one agent that may use it (`may_act`); she hands it
//! to the agent; the agent exchanges it for a narrower GPU-scheduler token that says
//! whom it is for (`sub`) and who acts (`act`); a relying party verifies the chain; alice
//! logs out (gives her token back) and the agent's token is revoked with it.
//!
//! ```sh
//! spiffe-broker dev --state-dir /tmp/sb &
//! cargo run --example agent_delegation -- /tmp/sb
//! ```

use std::path::{Path, PathBuf};

use spiffe_broker::client::{self, SvidChannel};
use spiffe_broker::domain::delegation::ACCESS_TOKEN_TYPE;
use spiffe_broker::proto::v1 as pb;
use spiffe_broker::proto::v1::credential_broker_client::CredentialBrokerClient;
use spiffe_broker::relying_party::{RelyingParty, RpConfig, RpError};
use tonic::transport::Channel;

const AGENT: &str = "spiffe://example.org/ci/deploy-agent";

/// A client of the broker as the workload (or person) behind a dev Workload API socket,
/// and the leaf certificate (DER) its connection presented.
async fn as_identity(
    state: &Path,
    name: &str,
) -> Result<(CredentialBrokerClient<Channel>, Vec<u8>), Box<dyn std::error::Error>> {
    let broker = std::env::var("SPIFFE_BROKER_ADDR").unwrap_or_else(|_| "127.0.0.1:8443".into());
    let socket = format!(
        "unix://{}",
        state
            .join("workloads")
            .join(format!("{name}.sock"))
            .display()
    );
    let source = client::workload_source(Some(&socket)).await?;
    let mut svid = SvidChannel::connect(&broker, spiffe_broker::dev::BROKER_ID, source).await?;
    let channel = svid.channel().await?;
    Ok((CredentialBrokerClient::new(channel), svid.leaf().to_vec()))
}

/// What the agent asks for with the token it was handed: a GPU-scheduler token to submit.
fn gpu_for(subject_token: &str) -> pb::ExchangeTokenRequest {
    pb::ExchangeTokenRequest {
        subject_token: subject_token.to_owned(),
        subject_token_type: ACCESS_TOKEN_TYPE.into(),
        profile: "gpu-scheduler-submit".into(),
        scopes: vec!["job:submit".into()],
        intent: Some(pb::Intent {
            action: "submit-training".into(),
            target: "queue/a100".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn token(c: Option<pb::Credential>) -> Result<String, Box<dyn std::error::Error>> {
    match c.and_then(|c| c.kind) {
        Some(pb::credential::Kind::Token(t)) => Ok(t.jwt),
        _ => Err("no token in the response".into()),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let state = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or("usage: agent_delegation STATE_DIR")?,
    );

    // 1. Alice asks for a token for agents: audience the broker, only job:submit, 30 min,
    //    and only the deploy agent may act with it.
    let (mut alice, _) = as_identity(&state, "alice").await?;
    let session = alice
        .issue_credential(pb::IssueCredentialRequest {
            profile: "agent-delegation".into(),
            scopes: vec!["job:submit".into()],
            ttl: Some(prost_types::Duration {
                seconds: 1800,
                nanos: 0,
            }),
            may_act: AGENT.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let session_lease = session.lease.clone().ok_or("no lease")?.id;
    let handed = token(session.credential)?;
    println!("alice's token for the agent: lease {session_lease} (audience: the broker; may_act: {AGENT})");

    // 2. The agent exchanges it for what this task needs, and says why.
    let (mut agent, agent_cert) = as_identity(&state, "deploy-agent").await?;
    let exchanged = agent.exchange_token(gpu_for(&handed)).await?.into_inner();
    let chain = exchanged.delegation.clone().ok_or("no chain")?;
    let lease = exchanged.lease.clone().ok_or("no lease")?;
    let gpu_token = token(exchanged.credential)?;
    println!(
        "agent got lease {} for {} ({}), acting: {:?}, derived from {}",
        lease.id, chain.subject, chain.subject_type, chain.actors, chain.parent_lease_id
    );

    // 3. The GPU scheduler verifies it offline and reads the chain.
    let http =
        std::env::var("SPIFFE_BROKER_HTTP").unwrap_or_else(|_| "http://127.0.0.1:8081".into());
    let feed_key = std::fs::read_to_string(state.join("keys/revocations.vkey"))?;
    let rp = RelyingParty::new(RpConfig::new(&http, "gpu-scheduler", &feed_key)?);
    rp.refresh_keys().await?;
    rp.sync_revocations().await?;
    // The token is bound to the agent's certificate (`cnf`): the scheduler checks it
    // against the client certificate of the connection the token came on.
    let claims = rp.verify(&gpu_token, Some(&agent_cert))?;
    println!(
        "scheduler: sub {} acting {:?}, scope {:?}",
        claims.sub,
        claims.actors(),
        claims.scope
    );

    // 4. Alice logs out: giving her token back revokes what was derived from it.
    alice
        .release_lease(pb::ReleaseLeaseRequest {
            lease_id: session_lease,
        })
        .await?;
    rp.sync_revocations().await?;
    match rp.verify(&gpu_token, Some(&agent_cert)) {
        Err(RpError::Revoked) => {
            println!("after alice's logout the scheduler refuses the agent's token: revoked")
        }
        other => {
            return Err(format!("expected the agent's token to be revoked, got {other:?}").into())
        }
    }
    let again = agent.exchange_token(gpu_for(&handed)).await;
    println!(
        "and her old token exchanges for nothing: {}",
        again
            .err()
            .map(|s| s.message().to_owned())
            .unwrap_or_else(|| "ISSUED (wrong)".into())
    );
    Ok(())
}
