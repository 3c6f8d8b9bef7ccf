//! A model runtime fetching its data credentials at start and renewing them before they
//! expire: a dataset-store token (`dataset-read`, a broker JWT) and feature-store database
//! credentials (`feature-db`, a Vault dynamic secret extended in Vault on renewal).
//! Each lease is renewed when two thirds of its lifetime have passed; a credential that
//! cannot be renewed (the profile's max TTL reached, a revocation) is fetched anew. At the
//! end both leases are released, which also revokes the Vault lease.
//!
//! ```sh
//! spiffe-broker dev --state-dir /tmp/sb --vault-addr http://127.0.0.1:8200 &
//! SPIFFE_ENDPOINT_SOCKET=unix:///tmp/sb/workloads/model-runtime.sock \
//!   cargo run --example model_runtime -- --ttl 30 --renewals 2
//! ```
//! Without a Vault at `--vault-addr`, `feature-db` answers UNAVAILABLE and the runtime
//! carries on with the dataset token alone.

use std::time::Duration;

use spiffe_broker::client::{self, ClientIdentity};
use spiffe_broker::proto::v1::credential_broker_client::CredentialBrokerClient;
use spiffe_broker::proto::v1::{
    credential, Credential, IssueCredentialRequest, Lease, ReleaseLeaseRequest, RenewLeaseRequest,
};
use tonic::transport::Channel;

/// A credential the runtime holds, and its lease.
struct Held {
    profile: &'static str,
    lease: Lease,
    /// Unix seconds.
    expires_at: i64,
    issued_at: i64,
}

fn now() -> i64 {
    use spiffe_broker::clock::Clock as _;
    spiffe_broker::clock::SystemClock.unix_seconds()
}

fn describe(c: &Option<Credential>) -> String {
    match c.as_ref().and_then(|c| c.kind.as_ref()) {
        Some(credential::Kind::Token(t)) => format!("bearer token ({} bytes)", t.jwt.len()),
        Some(credential::Kind::Secret(s)) => {
            // Hand the values to the database driver; print only the field names.
            format!("secret with fields {:?}", s.data.keys().collect::<Vec<_>>())
        }
        Some(credential::Kind::Certificate(c)) => format!("certificate {}", c.serial),
        None => "extended in place".into(),
    }
}

async fn fetch(
    broker: &mut CredentialBrokerClient<Channel>,
    profile: &'static str,
    ttl: u64,
) -> Result<Held, tonic::Status> {
    let resp = broker
        .issue_credential(IssueCredentialRequest {
            profile: profile.into(),
            ttl: Some(prost_types::Duration {
                seconds: ttl as i64,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    let lease = resp
        .lease
        .ok_or_else(|| tonic::Status::internal("no lease"))?;
    println!(
        "{profile}: {} on lease {}",
        describe(&resp.credential),
        lease.id
    );
    Ok(Held {
        profile,
        expires_at: lease.expires_at.as_ref().map_or(0, |t| t.seconds),
        issued_at: now(),
        lease,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (ttl, renewals) = (flag("--ttl", 900), flag("--renewals", 2));
    let broker_addr =
        std::env::var("SPIFFE_BROKER_ADDR").unwrap_or_else(|_| "127.0.0.1:8443".into());
    let broker_id =
        std::env::var("SPIFFE_BROKER_ID").unwrap_or_else(|_| spiffe_broker::dev::BROKER_ID.into());

    let source = client::workload_source(None).await?;
    println!("model runtime {}", source.svid()?.spiffe_id());
    let channel =
        client::connect(&broker_addr, &broker_id, &ClientIdentity::Workload(source)).await?;
    let mut broker = CredentialBrokerClient::new(channel);

    // At start: every data credential the runtime needs.
    let mut held = Vec::new();
    for profile in ["dataset-read", "feature-db"] {
        match fetch(&mut broker, profile, ttl).await {
            Ok(h) => held.push(h),
            Err(s) => println!("{profile}: not available ({:?}: {})", s.code(), s.message()),
        }
    }
    if held.is_empty() {
        return Err("no data credentials".into());
    }

    // Serving: renew each lease at two thirds of its lifetime.
    for round in 1..=renewals {
        let due = held
            .iter()
            .map(|h| h.issued_at + (h.expires_at - h.issued_at) * 2 / 3)
            .min()
            .unwrap_or_else(now);
        let wait = (due - now()).max(0) as u64;
        println!("round {round}: next renewal in {wait}s");
        tokio::time::sleep(Duration::from_secs(wait)).await;
        for h in held.iter_mut() {
            if h.issued_at + (h.expires_at - h.issued_at) * 2 / 3 > now() {
                continue;
            }
            match broker
                .renew_lease(RenewLeaseRequest {
                    lease_id: h.lease.id.clone(),
                    ttl: Some(prost_types::Duration {
                        seconds: ttl as i64,
                        nanos: 0,
                    }),
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    let lease = r.lease.unwrap_or_default();
                    h.expires_at = lease.expires_at.as_ref().map_or(0, |t| t.seconds);
                    h.issued_at = now();
                    println!(
                        "{}: renewed, {} until {}",
                        h.profile,
                        describe(&r.credential),
                        h.expires_at
                    );
                }
                Err(s) => {
                    println!(
                        "{}: renewal refused ({}), fetching anew",
                        h.profile,
                        s.message()
                    );
                    *h = fetch(&mut broker, h.profile, ttl).await?;
                }
            }
        }
    }

    // Shutting down: give everything back (Vault revokes the database user).
    for h in held {
        broker
            .release_lease(ReleaseLeaseRequest {
                lease_id: h.lease.id.clone(),
            })
            .await?;
        println!("{}: released", h.profile);
    }
    Ok(())
}
