//! The audit log for auditors and operators: recent entries, and each entry with its
//! inclusion proof and the signed checkpoint, which the page verifies in the browser
//! (`verify.js`) against the log's verifier key, or one the auditor pastes.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;

use super::pages::{self, esc, when};
use super::{html, Console, SignedIn};
use crate::audit::AuditEvent;
use crate::broker::EntrySelector;
use crate::policy::AdminAction;

/// The in-browser verifier (served at `/console/verify.js`).
pub const VERIFY_JS: &str = include_str!("verify.js");

/// Entries per page.
const PAGE: u64 = 50;

/// `GET /console/audit?after=N`: entries after `N` (default: the latest page).
pub(super) async fn entries(
    State(c): State<Arc<Console>>,
    Query(q): Query<HashMap<String, String>>,
    SignedIn(s): SignedIn,
) -> Response {
    let caller = Console::caller(&s);
    if let Err(e) = c
        .broker
        .admin(&caller, AdminAction::ReadLog, "ListAuditEvents")
        .await
    {
        return super::broker_refused(&s, &e);
    }
    // A fresh checkpoint (signed now if the log grew), so the newest entries show.
    let size = match c.broker.checkpoint().await {
        Ok(cp) => cp.map_or(0, |cp| cp.size),
        Err(e) => return super::broker_refused(&s, &e),
    };
    let after = q
        .get("after")
        .and_then(|a| a.parse::<u64>().ok())
        .unwrap_or(size.saturating_sub(PAGE))
        .min(size);
    let rows = match c.broker.audit_events(&caller, after, PAGE as u32).await {
        Ok(r) => r,
        Err(e) => return super::broker_refused(&s, &e),
    };
    let mut b = format!(
        "<h1>Audit log</h1><p class=\"muted\">Entries {}–{} of {size} (the latest signed checkpoint). \
         Open an entry to verify it in this browser.</p>\
         <table><thead><tr><th scope=\"col\">#</th><th scope=\"col\">Time</th><th scope=\"col\">Kind</th>\
         <th scope=\"col\">Decision</th><th scope=\"col\" class=\"opt\">Caller</th></tr></thead><tbody>",
        after + 1,
        after + rows.len() as u64,
    );
    for e in rows.iter().rev() {
        let body: Option<AuditEvent> = serde_json::from_str(&e.body).ok();
        let _ = write!(
            b,
            "<tr><td><a href=\"/console/audit/{seq}\">{seq}</a></td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"opt\"><code>{}</code></td></tr>",
            body.as_ref().map_or_else(String::new, |b| when(b.time_ms / 1000)),
            esc(&e.kind),
            esc(body.as_ref().map_or("", |b| b.decision.as_str())),
            esc(body.as_ref().and_then(|b| b.caller.as_deref()).unwrap_or("")),
            seq = e.seq,
        );
    }
    b.push_str("</tbody></table><div class=\"actions\">");
    if after > 0 {
        let _ = write!(
            b,
            "<a class=\"button\" href=\"/console/audit?after={}\">Earlier</a>",
            after.saturating_sub(PAGE)
        );
    }
    if after + PAGE < size {
        let _ = write!(
            b,
            "<a class=\"button\" href=\"/console/audit?after={}\">Later</a>",
            after + PAGE
        );
    }
    b.push_str("</div>");
    html(StatusCode::OK, pages::page("Audit log", Some(&s), &b), &[])
}

/// `GET /console/audit/{seq}`: one entry, its proof, and the in-browser verification.
pub(super) async fn entry(
    State(c): State<Arc<Console>>,
    Path(seq): Path<u64>,
    SignedIn(s): SignedIn,
) -> Response {
    let caller = Console::caller(&s);
    let p = match c
        .broker
        .inclusion_proof(&caller, EntrySelector::Sequence(seq), None)
        .await
    {
        Ok(p) => p,
        Err(e) => return super::broker_refused(&s, &e),
    };
    let pretty = serde_json::from_str::<serde_json::Value>(&p.entry)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| p.entry.clone());
    let proof: Vec<String> = p.proof.iter().map(hex::encode).collect();
    let vkey = c.broker.log_vkey().unwrap_or_default();
    let b = format!(
        "<h1>Audit entry {seq}</h1>\
         <div class=\"card\" id=\"proof\" data-entry=\"{}\" data-index=\"{}\" data-proof=\"{}\" data-note=\"{}\">\
         <h2>Is it in the log?</h2>\
         <p id=\"result\" class=\"notice\" role=\"status\" aria-live=\"polite\" data-verified=\"pending\">\
         Verification needs JavaScript: this page checks the signature and the proof itself.</p>\
         <label for=\"vkey\">Log verifier key (paste the one you pinned to check against it)</label>\
         <textarea id=\"vkey\" rows=\"2\">{}</textarea>\
         <div class=\"actions\"><button id=\"verify\" type=\"button\">Verify again</button></div>\
         <dl><dt>Leaf hash</dt><dd><code>{}</code></dd><dt>Proof</dt><dd>{} hash(es)</dd>\
         <dt>Checkpoint</dt><dd><pre><code>{}</code></pre></dd></dl></div>\
         <div class=\"card\"><h2>Entry</h2><pre><code>{}</code></pre></div>\
         <script src=\"/console/verify.js\"></script>",
        esc(&p.entry),
        p.leaf_index,
        proof.join(","),
        esc(&p.checkpoint.cosigned_note()),
        esc(&vkey),
        hex::encode(p.leaf_hash),
        proof.len(),
        esc(&p.checkpoint.cosigned_note()),
        esc(&pretty),
    );

    html(
        StatusCode::OK,
        pages::page("Audit entry", Some(&s), &b),
        &[],
    )
}
