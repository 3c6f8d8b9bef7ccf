//! The relying-party library against a running broker: offline token verification
//! (JWKS, audience, expiry, `cnf` binding), the signed revocation feed, a forged feed,
//! and failing closed when the feed goes stale.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use spiffe_broker::checkpoint::LogSigner;
use spiffe_broker::client::ClientIdentity;
use spiffe_broker::clock::ManualClock;
use spiffe_broker::proto::v1 as pb;
use spiffe_broker::relying_party::{RelyingParty, RpConfig, RpError};

struct Caller {
    identity: ClientIdentity,
    cert_der: Vec<u8>,
}

/// A caller whose certificate we know (to check the `cnf` binding).
fn minted(h: &Harness, id: &str) -> Caller {
    let svid = h
        .env
        .ca
        .mint_x509_svid(
            &spiffe::SpiffeId::new(id).expect("id"),
            Duration::from_secs(3600),
        )
        .expect("mint");
    Caller {
        cert_der: svid.chain[0].as_ref().to_vec(),
        identity: ClientIdentity::Files {
            chain: svid.chain.clone(),
            key: Arc::new(svid.key_pkcs8.to_vec()),
            bundle: vec![h.env.ca.ca_der().clone()],
        },
    }
}

fn rp(h: &Harness, audience: &str, clock: Arc<ManualClock>) -> RelyingParty {
    let feed_key =
        std::fs::read_to_string(h.env.state_dir.join("keys/revocations.vkey")).expect("feed key");
    let mut cfg =
        RpConfig::new(&format!("http://{}", h.env.http_addr), audience, &feed_key).expect("config");
    cfg.clock = clock;
    cfg.max_staleness = Duration::from_secs(60);
    RelyingParty::new(cfg)
}

async fn issue(h: &Harness, caller: &Caller) -> (String, String) {
    let mut c = pb::credential_broker_client::CredentialBrokerClient::new(
        h.channel_as(&caller.identity).await,
    );
    let resp = c
        .issue_credential(gpu_request(600))
        .await
        .expect("issued")
        .into_inner();
    (token_of(&resp.credential), resp.lease.expect("lease").id)
}

#[tokio::test]
async fn verifies_offline_binds_to_the_certificate_and_follows_revocations() {
    let h = start().await;
    let agent = minted(&h, DEPLOY_AGENT);
    let (token, lease) = issue(&h, &agent).await;

    let rp_clock = Arc::new(ManualClock::new());
    let gpu = rp(&h, "gpu-scheduler", rp_clock.clone());
    // Nothing is accepted before the relying party has keys and a fresh feed.
    assert!(matches!(
        gpu.verify(&token, Some(&agent.cert_der)),
        Err(RpError::Stale(_))
    ));
    gpu.sync_revocations().await.expect("feed");
    assert!(matches!(
        gpu.verify(&token, Some(&agent.cert_der)),
        Err(RpError::UnknownKey(_))
    ));
    gpu.refresh_keys().await.expect("keys");

    let claims = gpu.verify(&token, Some(&agent.cert_der)).expect("accepted");
    assert_eq!(claims.sub, DEPLOY_AGENT);
    assert_eq!(claims.jti, lease);

    // Sender-constrained: another certificate, or none, is refused.
    let other = minted(&h, DEPLOY_AGENT);
    assert_eq!(
        gpu.verify(&token, Some(&other.cert_der)),
        Err(RpError::CnfMismatch)
    );
    assert_eq!(gpu.verify(&token, None), Err(RpError::CnfMismatch));
    // Another relying party's audience is refused.
    let registry = rp(&h, "model-registry", rp_clock.clone());
    registry.sync_revocations().await.expect("feed");
    registry.refresh_keys().await.expect("keys");
    assert!(matches!(
        registry.verify(&token, Some(&agent.cert_der)),
        Err(RpError::Invalid(_))
    ));
    // A tampered token is refused.
    let mut bad = token.clone().into_bytes();
    let mid = bad.len() / 2;
    bad[mid] = if bad[mid] == b'A' { b'B' } else { b'A' };
    assert!(gpu
        .verify(
            &String::from_utf8(bad).expect("utf8"),
            Some(&agent.cert_der)
        )
        .is_err());

    // The operator revokes; after the next sync the relying party refuses the token.
    let mut root = h.admin_as(ROOT).await;
    root.revoke(pb::RevokeRequest {
        selector: Some(pb::revoke_request::Selector::LeaseId(lease.clone())),
        reason: "compromised runner".into(),
        ..Default::default()
    })
    .await
    .expect("revoked");
    assert!(
        gpu.verify(&token, Some(&agent.cert_der)).is_ok(),
        "not yet synced"
    );
    assert_eq!(gpu.sync_revocations().await.expect("feed"), 1);
    assert_eq!(
        gpu.verify(&token, Some(&agent.cert_der)),
        Err(RpError::Revoked)
    );

    // A token issued later is still accepted.
    let (fresh, _) = issue(&h, &agent).await;
    gpu.verify(&fresh, Some(&agent.cert_der))
        .expect("fresh token accepted");
}

#[tokio::test]
async fn fails_closed_when_stale_and_refuses_a_forged_feed() {
    let h = start().await;
    let agent = minted(&h, DEPLOY_AGENT);
    let (token, lease) = issue(&h, &agent).await;
    let rp_clock = Arc::new(ManualClock::new());
    let gpu = rp(&h, "gpu-scheduler", rp_clock.clone());
    gpu.refresh_keys().await.expect("keys");
    gpu.sync_revocations().await.expect("feed");
    gpu.verify(&token, Some(&agent.cert_der)).expect("accepted");

    // The broker goes quiet for longer than the staleness bound: every token is refused.
    // Keep a genuine page to replay later.
    let (_, old_page) = h.http_get("/revocations?since=0").await;
    let old_page: serde_json::Value = serde_json::from_str(&old_page).expect("feed JSON");
    let old_head = old_page["signed_head"]
        .as_str()
        .expect("signed head")
        .to_owned();
    rp_clock.advance(Duration::from_secs(61));
    h.clock.advance(Duration::from_secs(61));
    // (61 s, or 62 when a wall-clock second ticked between the two manual clocks' starts.)
    assert!(matches!(
        gpu.verify(&token, Some(&agent.cert_der)),
        Err(RpError::Stale(61..=62))
    ));

    // A forged page (a plausible revocation, signed by someone else's key) is refused
    // and changes nothing: still stale.
    let forger_dir = tempfile::tempdir().expect("tempdir");
    let name = std::fs::read_to_string(h.env.state_dir.join("keys/revocations.vkey"))
        .expect("vkey")
        .split('+')
        .next()
        .expect("name")
        .to_owned();
    let forger =
        LogSigner::load_or_create_as(forger_dir.path(), "revocations", &name).expect("forger");
    let mut ev = spiffe_broker::domain::RevocationEvent {
        seq: 1,
        lease_id: lease.clone(),
        spiffe_id: DEPLOY_AGENT.into(),
        profile: "gpu-scheduler-submit".into(),
        expires_at: i64::MAX / 2,
        revoked_at: 0,
        reason: "forged".into(),
        chain_hash: String::new(),
        certificate_serial: None,
    };
    let chain = ev.chain(&[0; 32]);
    ev.chain_hash = hex::encode(chain);
    let forged_head = forger.sign(1, &chain);
    let err = gpu
        .apply_feed(std::slice::from_ref(&ev), Some(&forged_head), false)
        .expect_err("forged");
    assert!(matches!(err, RpError::Broker(_)), "{err}");
    assert!(matches!(
        gpu.verify(&token, Some(&agent.cert_der)),
        Err(RpError::Stale(_))
    ));
    // A page without a signed head, or with a gap, is refused too.
    assert!(gpu
        .apply_feed(std::slice::from_ref(&ev), None, false)
        .is_err());
    ev.seq = 2;
    assert!(gpu
        .apply_feed(std::slice::from_ref(&ev), Some(&forged_head), false)
        .is_err());

    // Replaying the genuine old page (an on-path attacker hiding new revocations) does
    // not make the feed fresh: freshness is the broker's signed time.
    gpu.apply_feed(&[], Some(&old_head), false)
        .expect("a genuine page");
    assert!(matches!(
        gpu.verify(&token, Some(&agent.cert_der)),
        Err(RpError::Stale(_))
    ));
    // The real feed brings it back.
    gpu.sync_revocations().await.expect("feed");
    gpu.verify(&token, Some(&agent.cert_der))
        .expect("accepted again after a genuine sync");
}
