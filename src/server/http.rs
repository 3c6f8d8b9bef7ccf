//! The HTTP listener: OIDC discovery, JWKS, health and metrics (public data), and the
//! web console for signed-in people (`crate::console`) when `[console]` is configured.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::crypto::KeyRing;
use crate::metrics::Metrics;

/// Path of the JWKS.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct HttpState {
    /// Token signing keys (public halves only are served).
    pub keys: KeyRing,
    /// `iss` of minted tokens.
    pub issuer_url: String,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Whether the broker can serve (own SVID present, ledger open).
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
    /// When the broker's own SVID expires (Unix seconds), if it has one.
    pub svid_expiry: Arc<dyn Fn() -> Option<i64> + Send + Sync>,
    /// The broker (for the audit log's public checkpoint).
    pub broker: Arc<crate::broker::Broker>,
    /// Whether `/log/entries` serves the log's entries (to monitors).
    pub publish_log_entries: bool,
    /// The web console under `/console/`, when `[console]` is configured.
    pub console: Option<Arc<crate::console::Console>>,
}

/// The router.
pub fn router(state: HttpState) -> Router {
    let console = state.console.clone().map(crate::console::router);
    let router = Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route(JWKS_PATH, get(jwks))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/log/checkpoint", get(checkpoint))
        .route("/oci/rootcertbundle.pem", get(oci_bundle))
        .route("/log/vkey", get(vkey))
        .route("/log/entries", get(entries))
        .route("/revocations", get(revocations))
        .with_state(state);
    match console {
        Some(c) => router.merge(c),
        None => router,
    }
}

async fn discovery(State(s): State<HttpState>) -> impl IntoResponse {
    Json(serde_json::json!({
        "issuer": s.issuer_url,
        "jwks_uri": format!("{}{JWKS_PATH}", s.issuer_url),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": if s.keys.rsa().is_some() { vec!["ES256", "RS256"] } else { vec!["ES256"] },
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "scope", "cnf", "intent", "profile", "groups", "sun", "access"],
    }))
}

async fn jwks(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "public, max-age=60")],
        Json(s.keys.published_jwks()),
    )
}

/// Certificates of the token signing keys, for a registry's `auth.token.rootcertbundle`.
async fn oci_bundle(State(s): State<HttpState>) -> axum::response::Response {
    match crate::issuer::oci::rootcertbundle(&s.keys) {
        Ok(pem) => ([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot build the registry certificate bundle");
            (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal error\n",
            )
                .into_response()
        }
    }
}

/// The latest signed checkpoint (public: it reveals only the tree size and root).
async fn checkpoint(State(s): State<HttpState>) -> axum::response::Response {
    match s.broker.store().checkpoint(None).await {
        Ok(Some(cp)) => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            cp.cosigned_note(),
        )
            .into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "no checkpoint yet\n").into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot read the latest checkpoint");
            (StatusCode::SERVICE_UNAVAILABLE, "ledger unavailable\n").into_response()
        }
    }
}

#[derive(serde::Deserialize)]
struct Since {
    #[serde(default)]
    since: u64,
    limit: Option<u32>,
}

/// The revocation feed over HTTP: events after `since` and a head signed over the feed's
/// tail (the same feed as `RelyingParty.WatchRevocations`). Public, like the JWKS: a head
/// proves only where the feed ended and when, and a `since` past the tail is refused
/// (416), so nothing here lets anyone keep a relying party's stale view looking fresh.
async fn revocations(
    State(s): State<HttpState>,
    axum::extract::Query(q): axum::extract::Query<Since>,
) -> axum::response::Response {
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    match s.broker.revocation_page(q.since, limit).await {
        Ok(page) => Json(serde_json::json!({
            "since": q.since,
            "tail": page.tail,
            "events": page.events,
            "more": page.more,
            "signed_head": page.signed_head,
            "feed_key": s.broker.feed_vkey(),
        }))
        .into_response(),
        Err(crate::error::BrokerError::OutOfRange(m)) => {
            (StatusCode::RANGE_NOT_SATISFIABLE, format!("{m}\n")).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read the revocation feed");
            (StatusCode::SERVICE_UNAVAILABLE, "ledger unavailable\n").into_response()
        }
    }
}

#[derive(serde::Deserialize)]
struct Page {
    #[serde(default)]
    start: u64,
    limit: Option<u32>,
}

/// Most entries per page.
const ENTRIES_PAGE: u32 = 1000;

/// The log's entries from leaf `start` (0-based), at most `limit`, in the export's format,
/// for monitors (`spiffe-broker monitor`), who check them against a signed checkpoint. An
/// entry names identities, profiles, scopes, intents, decisions and approvers, with
/// SHA-256 hashes of credentials and certificates: never a credential, a key or a secret.
/// `publish_log_entries = false` turns this off.
async fn entries(
    State(s): State<HttpState>,
    axum::extract::Query(q): axum::extract::Query<Page>,
) -> axum::response::Response {
    if !s.publish_log_entries {
        return (StatusCode::NOT_FOUND, "log entries are not published\n").into_response();
    }
    let limit = q.limit.unwrap_or(ENTRIES_PAGE).clamp(1, ENTRIES_PAGE);
    match s.broker.store().audit_entries(q.start, limit).await {
        Ok(page) => Json(serde_json::json!({
            "start": q.start,
            "entries": page.iter().map(crate::store::export::ExportEntry::from).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot read the log's entries");
            (StatusCode::SERVICE_UNAVAILABLE, "ledger unavailable\n").into_response()
        }
    }
}

/// The log's verifier key.
async fn vkey(State(s): State<HttpState>) -> axum::response::Response {
    match s.broker.log_vkey() {
        Some(k) => format!("{k}\n").into_response(),
        None => (StatusCode::NOT_FOUND, "no log key\n").into_response(),
    }
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if (s.ready)() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    // Read at scrape time, so the alert on an SVID near expiry sees the SVID in use now.
    s.metrics.ready.set(i64::from((s.ready)()));
    let dropped = crate::telemetry::dropped();
    s.metrics
        .spans_dropped
        .inc_by(dropped.saturating_sub(s.metrics.spans_dropped.get()));
    s.metrics
        .own_svid_expiry
        .set((s.svid_expiry)().unwrap_or(0));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}
