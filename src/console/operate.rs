//! Operator pages: leases with filters, revocation by any selector (a dry-run preview
//! first, then the revocation with a reason), the identity inventory, and the live
//! console sessions (an operator ends a person's). The broker's
//! own authorization decides (platform admins); the pages only hide what a person may
//! not use.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;

use super::pages::{self, esc, when};
use super::{html, Console, Posted, Session, SignedIn};
use crate::domain::{Lease, LeaseFilter, LeaseState};
use crate::proto::v1::revoke_request::Selector;

/// Most leases on one page.
const PAGE: u32 = 100;

fn selector(kind: &str, value: &str) -> Option<Selector> {
    let v = value.trim().to_owned();
    Some(match kind {
        "lease" => Selector::LeaseId(v),
        "spiffe-id" => Selector::SpiffeId(v),
        "prefix" => Selector::SpiffeIdPrefix(v),
        "profile" => Selector::Profile(v),
        "approver" => Selector::Approver(v),
        "access-request" => Selector::AccessRequestId(v),
        _ => return None,
    })
}

const KINDS: &[(&str, &str)] = &[
    ("lease", "Lease id"),
    ("spiffe-id", "Holder (SPIFFE ID)"),
    ("prefix", "SPIFFE ID prefix"),
    ("profile", "Profile"),
    ("approver", "Approved by (SPIFFE ID or oidc: id)"),
    ("access-request", "Access request id"),
];

fn lease_table(b: &mut String, rows: &[Lease]) {
    if rows.is_empty() {
        b.push_str("<p class=\"card muted\">No leases match.</p>");
        return;
    }
    b.push_str(
        "<table><caption class=\"muted\">Newest first</caption><thead><tr><th scope=\"col\">Lease</th>\
         <th scope=\"col\">Holder</th><th scope=\"col\">Profile</th><th scope=\"col\">State</th>\
         <th scope=\"col\" class=\"opt\">Scopes</th><th scope=\"col\" class=\"opt\">Expires</th></tr></thead><tbody>",
    );
    for l in rows {
        let scopes: Vec<&str> = l.scopes.iter().map(|s| s.as_str()).collect();
        let _ = write!(
            b,
            "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{}</td>\
             <td class=\"opt\"><code>{}</code></td><td class=\"opt\">{}</td></tr>",
            esc(l.id.as_str()),
            esc(&l.spiffe_id),
            esc(l.profile.as_str()),
            esc(l.state.as_str()),
            esc(&scopes.join(" ")),
            when(l.expires_at)
        );
    }
    b.push_str("</tbody></table>");
}

fn revoke_form(b: &mut String, s: &Session, kind: &str, value: &str, reason: &str) {
    let _ = write!(
        b,
        "<form class=\"card\" method=\"post\" action=\"/console/revoke\"><h2>Revoke</h2>\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <label for=\"kind\">Select leases by</label><select id=\"kind\" name=\"kind\">",
        esc(&s.csrf)
    );
    for (k, label) in KINDS {
        let _ = write!(
            b,
            "<option value=\"{k}\"{}>{}</option>",
            if *k == kind { " selected" } else { "" },
            esc(label)
        );
    }
    let _ = write!(
        b,
        "</select><label for=\"value\">Value</label><textarea id=\"value\" name=\"value\" rows=\"1\" required>{}</textarea>\
         <label for=\"revoke-reason\">Reason (recorded in the audit log)</label>\
         <textarea id=\"revoke-reason\" name=\"reason\" rows=\"2\" maxlength=\"512\">{}</textarea>\
         <div class=\"actions\"><button type=\"submit\" name=\"mode\" value=\"preview\">Preview (dry run)</button>\
         <button class=\"deny\" type=\"submit\" name=\"mode\" value=\"revoke\">Revoke</button></div></form>",
        esc(value),
        esc(reason)
    );
}

/// `GET /console/leases?holder=&state=`.
pub(super) async fn leases(
    State(c): State<Arc<Console>>,
    Query(q): Query<HashMap<String, String>>,
    SignedIn(s): SignedIn,
) -> Response {
    let holder = q.get("holder").map(|h| h.trim()).filter(|h| !h.is_empty());
    let state = q.get("state").map(String::as_str).unwrap_or("active");
    let filter = LeaseFilter {
        spiffe_id: holder.map(str::to_owned),
        state: LeaseState::from_db(state),
        limit: PAGE,
        ..Default::default()
    };
    let rows = match c.broker.list_leases(&Console::caller(&s), filter).await {
        Ok(r) => r,
        Err(e) => return super::broker_refused(&s, &e),
    };
    let mut b = String::from(
        "<h1>Leases</h1><form class=\"card\" method=\"get\" action=\"/console/leases\">",
    );
    let _ = write!(
        b,
        "<label for=\"holder\">Holder (SPIFFE ID)</label><textarea id=\"holder\" name=\"holder\" rows=\"1\">{}</textarea>\
         <label for=\"state\">State</label><select id=\"state\" name=\"state\">",
        esc(holder.unwrap_or(""))
    );
    for st in ["active", "revoked", "expired", "released", "any"] {
        let _ = write!(
            b,
            "<option{}>{st}</option>",
            if st == state { " selected" } else { "" }
        );
    }
    b.push_str(
        "</select><div class=\"actions\"><button type=\"submit\">Filter</button></div></form>",
    );
    lease_table(&mut b, &rows);
    revoke_form(&mut b, &s, "spiffe-id", holder.unwrap_or(""), "");
    html(StatusCode::OK, pages::page("Leases", Some(&s), &b), &[])
}

/// `POST /console/revoke`: `mode=preview` is a dry run; `mode=revoke` revokes.
pub(super) async fn revoke(
    State(c): State<Arc<Console>>,
    Posted {
        session: s,
        form: f,
    }: Posted,
) -> Response {
    let get = |k: &str| f.get(k).map(String::as_str).unwrap_or("");
    let (kind, value, reason) = (get("kind"), get("value"), get("reason").trim());
    let dry_run = get("mode") != "revoke";
    let caller = Console::caller(&s);
    let parsed = crate::api::parse_selector(selector(kind, value).as_ref());
    let outcome = match parsed {
        Ok(sel) => {
            c.broker
                .revoke(&caller, sel, None, reason.to_owned(), dry_run)
                .await
        }
        Err(e) => Err(e),
    };
    let mut b = String::from("<h1>Revoke</h1>");
    let status = match &outcome {
        Ok(r) => {
            let n = r.lease_ids.len();
            b.push_str(&pages::notice(
                &if dry_run {
                    format!("Preview: {n} active lease(s) would be revoked. Nothing was changed.")
                } else {
                    format!(
                        "Revoked {n} lease(s). Relying parties learn it from the revocation feed."
                    )
                },
                false,
            ));
            if !r.lease_ids.is_empty() {
                b.push_str("<ul class=\"card\">");
                for id in r.lease_ids.iter().take(200) {
                    let _ = write!(b, "<li><code>{}</code></li>", esc(id));
                }
                b.push_str("</ul>");
            }
            StatusCode::OK
        }
        Err(e) => {
            b.push_str(&pages::notice(&e.to_string(), true));
            super::status_of(e)
        }
    };
    revoke_form(&mut b, &s, kind, value, reason);
    html(status, pages::page("Revoke", Some(&s), &b), &[])
}

/// `GET /console/inventory`: every identity, its owner, roles and use.
pub(super) async fn inventory(State(c): State<Arc<Console>>, SignedIn(s): SignedIn) -> Response {
    let rows = match c.broker.inventory(&Console::caller(&s)).await {
        Ok(r) => r,
        Err(e) => return super::broker_refused(&s, &e),
    };
    let mut b = String::from(
        "<h1>Identity inventory</h1><table><thead><tr><th scope=\"col\">SPIFFE ID</th>\
         <th scope=\"col\">Owner</th><th scope=\"col\" class=\"opt\">Roles</th>\
         <th scope=\"col\">Active leases</th><th scope=\"col\" class=\"opt\">Issued / denied</th>\
         <th scope=\"col\" class=\"opt\">Flags</th></tr></thead><tbody>",
    );
    for r in &rows {
        let _ = write!(
            b,
            "<tr><td><code>{}</code></td><td>{}</td><td class=\"opt\">{}</td><td>{}</td>\
             <td class=\"opt\">{} / {}</td><td class=\"opt\">{}</td></tr>",
            esc(&r.spiffe_id),
            esc(&r.owner),
            esc(&r.roles.join(", ")),
            r.active_leases,
            r.issued,
            r.denied,
            esc(&r.flags.join(", "))
        );
    }
    b.push_str("</tbody></table>");
    html(StatusCode::OK, pages::page("Inventory", Some(&s), &b), &[])
}

/// `GET /console/sessions`: who is signed in (platform admins: those who may revoke).
pub(super) async fn sessions(State(c): State<Arc<Console>>, SignedIn(s): SignedIn) -> Response {
    if let Err(e) = c.may_end_sessions(&s).await {
        return super::broker_refused(&s, &e);
    }
    sessions_page(&c, &s, None)
}

fn sessions_page(c: &Console, s: &Session, note: Option<&str>) -> Response {
    let mut b = String::from("<h1>Console sessions</h1>");
    if let Some(n) = note {
        b.push_str(&pages::notice(n, false));
    }
    b.push_str(
        "<table><thead><tr><th scope=\"col\">Person</th><th scope=\"col\" class=\"opt\">Email</th>\
         <th scope=\"col\">Signed in</th><th scope=\"col\" class=\"opt\">Last used</th><th scope=\"col\">End</th></tr></thead><tbody>",
    );
    for (person, dev, created, seen) in c.sessions.list() {
        let _ = write!(
            b,
            "<tr><td><code>{}</code>{}</td><td class=\"opt\">{}</td><td>{}</td><td class=\"opt\">{}</td>\
             <td><form method=\"post\" action=\"/console/sessions/end\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"person\" value=\"{}\">\
             <button class=\"deny\" type=\"submit\">End all of theirs</button></form></td></tr>",
            esc(&person.id),
            if dev { " (dev)" } else { "" },
            esc(person.email.as_deref().unwrap_or("")),
            when(created),
            when(seen),
            esc(&s.csrf),
            esc(&person.id),
        );
    }
    b.push_str("</tbody></table>");
    html(StatusCode::OK, pages::page("Sessions", Some(s), &b), &[])
}

/// `POST /console/sessions/end`: ends every session of one person, on the ledger.
pub(super) async fn end_sessions(
    State(c): State<Arc<Console>>,
    Posted {
        session: s,
        form: f,
    }: Posted,
) -> Response {
    if let Err(e) = c.may_end_sessions(&s).await {
        return super::broker_refused(&s, &e);
    }
    let person = f.get("person").map(String::as_str).unwrap_or_default();
    let n = c.sessions.end_person(person);
    c.broker
        .record_session(
            &Console::caller(&s),
            "sessions_ended",
            &format!(
                "ended {n} console session(s) of {}",
                crate::domain::truncate(person)
            ),
        )
        .await;
    sessions_page(&c, &s, Some(&format!("Ended {n} session(s) of {person}.")))
}
