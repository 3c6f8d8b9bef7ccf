//! The console's HTML: server-rendered, no script, every value escaped. Forms carry the
//! session's anti-forgery token; the stylesheet is embedded in the binary.

use std::fmt::Write as _;

use crate::broker::Session;
use crate::domain::{AccessRequest, AccessState};

/// The stylesheet (served at `/console/console.css`).
pub const CSS: &str = include_str!("console.css");

/// HTML-escapes text for an element body or a quoted attribute.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A Unix time as RFC 3339.
pub fn when(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// A whole page: the header (with the person and a sign-out form when signed in).
pub fn page(title: &str, session: Option<&Session>, body: &str) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · spiffe-broker</title><link rel=\"stylesheet\" href=\"/console/console.css\">\
         </head><body><header><span class=\"brand\">spiffe-broker</span>",
        esc(title)
    );
    if let Some(s) = session {
        let who = s.person.email.as_deref().unwrap_or(&s.person.id);
        let _ = write!(
            h,
            "<nav aria-label=\"Console\">{}</nav>\
             <div class=\"who\"><span>{}{}</span>\
             <form method=\"post\" action=\"/console/signout\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button class=\"link\" type=\"submit\">Sign out</button></form></div>",
            s.nav
                .iter()
                .map(|(href, title)| format!("<a href=\"{href}\">{}</a>", esc(title)))
                .collect::<String>(),
            esc(who),
            if s.dev { " (dev sign-in)" } else { "" },
            esc(&s.csrf)
        );
    }
    let _ = write!(h, "</header><main>{body}</main></body></html>");
    h
}

/// A notice (or an error) above a page's content.
pub fn notice(text: &str, error: bool) -> String {
    format!(
        "<p class=\"notice{}\" role=\"{}\">{}</p>",
        if error { " error" } else { "" },
        if error { "alert" } else { "status" },
        esc(text)
    )
}

/// The sign-in page: the providers, and in dev mode the demo people.
pub fn sign_in(
    providers: &[(usize, &str)],
    then: &str,
    dev: Option<(&[(&str, &str)], &str)>,
) -> String {
    let mut b = String::from("<h1>Sign in</h1><div class=\"card\">");
    if providers.is_empty() && dev.is_none() {
        b.push_str("<p>No OpenID Provider is set up for sign-in (an <code>[[oidc_providers]]</code> entry with a <code>client_secret_file</code>).</p>");
    }
    for (i, name) in providers {
        let _ = write!(
            b,
            "<p><a class=\"button\" href=\"/console/signin/{i}?then={}\">Sign in with {}</a></p>",
            esc(&form_urlencoded::byte_serialize(then.as_bytes()).collect::<String>()),
            esc(name)
        );
    }
    b.push_str("</div>");
    if let Some((people, binding)) = dev {
        let _ = write!(
            b,
            "<div class=\"card dev\"><h2>Dev sign-in</h2><p>Only <code>spiffe-broker dev</code> offers this: \
             sign in as a demo person without a password. <code>serve</code> never does.</p>\
             <form method=\"post\" action=\"/console/dev-signin\">\
             <input type=\"hidden\" name=\"binding\" value=\"{}\">\
             <label for=\"person\">Demo person</label><select id=\"person\" name=\"person\">",
            esc(binding)
        );
        for (name, what) in people {
            let _ = write!(
                b,
                "<option value=\"{}\">{} — {}</option>",
                esc(name),
                esc(name),
                esc(what)
            );
        }
        b.push_str("</select><div class=\"actions\"><button type=\"submit\">Sign in (dev)</button></div></form></div>");
    }
    b
}

fn state(ar: &AccessRequest) -> String {
    let s = ar.state.as_str();
    format!("<span class=\"state state-{s}\">{s}</span>")
}

fn intent(ar: &AccessRequest) -> String {
    ar.request.intent.as_ref().map_or_else(
        || "—".into(),
        |i| format!("{} <code>{}</code>", esc(&i.action), esc(&i.target)),
    )
}

/// The approval queue.
pub fn queue(rows: &[AccessRequest], now: i64) -> String {
    let mut b = String::from("<h1>Approval queue</h1>");
    if rows.is_empty() {
        b.push_str("<p class=\"card muted\">Nothing waits for your review.</p>");
        return b;
    }
    b.push_str(
        "<table><caption class=\"muted\">Pending requests you may review</caption><thead><tr>\
         <th scope=\"col\">Request</th><th scope=\"col\">Requester</th><th scope=\"col\">Profile</th>\
         <th scope=\"col\" class=\"opt\">Intent</th><th scope=\"col\" class=\"opt\">Time left</th></tr></thead><tbody>",
    );
    for ar in rows {
        let _ = write!(
            b,
            "<tr><td><a href=\"/console/requests/{id}\">{id}</a></td><td><code>{}</code></td><td>{}</td>\
             <td class=\"opt\">{}</td><td class=\"opt\">{} min</td></tr>",
            esc(&ar.requester),
            esc(ar.profile.as_str()),
            intent(ar),
            ((ar.expires_at - now).max(0) + 59) / 60,
            id = esc(&ar.id),
        );
    }
    b.push_str("</tbody></table>");
    b
}

/// One request, with the review form when the person may review it.
/// What a person may do about a request on its page.
pub enum ReviewControls {
    /// Nothing (not a reviewer of its profile, or it is decided).
    None,
    /// The approve/deny form.
    Form,
    /// A fresh sign-in first: the profile wants one within this long (e.g. `15m`).
    FreshSignIn(String),
}

/// One request, with what the person may do about it.
pub fn request(
    ar: &AccessRequest,
    session: &Session,
    controls: ReviewControls,
    now: i64,
) -> String {
    let mut b = format!(
        "<h1>Request <code>{}</code></h1><div class=\"card\"><dl>",
        esc(&ar.id)
    );
    let mut row = |k: &str, v: String| {
        let _ = write!(b, "<dt>{}</dt><dd>{v}</dd>", esc(k));
    };
    row("State", state(ar));
    row("Requester", format!("<code>{}</code>", esc(&ar.requester)));
    row("Profile", esc(ar.profile.as_str()));
    row("Intent", intent(ar));
    if let Some(i) = &ar.request.intent {
        if let Some(d) = &i.artifact_digest {
            row("Artifact digest", format!("<code>{}</code>", esc(d)));
        }
        if let Some(t) = &i.ticket {
            row("Ticket", esc(t));
        }
        if let Some(j) = &i.justification {
            row("Justification", esc(j));
        }
    }
    let (scopes, ttl) = match &ar.request.grant {
        Some(g) => (g.scopes.join(" "), Some(g.ttl_secs)),
        None => (ar.request.scopes.join(" "), ar.request.ttl_secs),
    };
    row("Scopes", format!("<code>{}</code>", esc(&scopes)));
    row(
        "TTL",
        ttl.map_or_else(|| "profile default".into(), |t| format!("{t} s")),
    );
    row(
        "Needs",
        format!(
            "{} approval(s) from <code>{}</code>",
            ar.threshold,
            esc(&ar.group)
        ),
    );
    row("Opened", when(ar.created_at));
    row(
        "Expires",
        format!(
            "{} ({} min left)",
            when(ar.expires_at),
            ((ar.expires_at - now).max(0) + 59) / 60
        ),
    );
    if ar.break_glass {
        row(
            "Break-glass",
            "yes: issued at once, reviewed afterwards".into(),
        );
    }
    b.push_str("</dl></div>");
    if !ar.reviews.is_empty() {
        b.push_str("<div class=\"card\"><h2>Reviews</h2><ul>");
        for r in &ar.reviews {
            let _ = write!(
                b,
                "<li><strong>{}</strong> by <code>{}</code> at {}: {}</li>",
                esc(r.verdict.as_str()),
                esc(&r.reviewer),
                when(r.at),
                esc(&r.reason)
            );
        }
        b.push_str("</ul></div>");
    }
    let open = ar.state == AccessState::Pending || ar.post_review.as_deref() == Some("pending");
    if let (true, ReviewControls::FreshSignIn(max)) = (open, &controls) {
        let _ = write!(
            b,
            "<div class=\"card\"><p>Reviewing this profile needs a sign-in within the last {}.</p>\
             <a class=\"button\" href=\"/console/reauth?then=/console/requests/{}\">Sign in again to review</a></div>",
            esc(max),
            esc(&ar.id)
        );
    }
    if let (true, ReviewControls::Form) = (open, &controls) {
        let _ = write!(
            b,
            "<form class=\"card\" method=\"post\" action=\"/console/requests/{}/review\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <label for=\"reason\">Reason (recorded in the audit log)</label>\
             <textarea id=\"reason\" name=\"reason\" rows=\"3\" required maxlength=\"512\"></textarea>\
             <div class=\"actions\"><button type=\"submit\" name=\"verdict\" value=\"approve\">Approve</button>\
             <button class=\"deny\" type=\"submit\" name=\"verdict\" value=\"deny\">Deny</button></div></form>",
            esc(&ar.id),
            esc(&session.csrf)
        );
    }
    b
}
