//! The `webhook` sink: approval events, where people already are. It follows the ledger
//! like every sink (so delivery is durable, in order, resumed after a restart, shipped by
//! one replica at a time) and POSTs one message per approval event:
//!
//! | ledger entry | `type` |
//! |---|---|
//! | `access_request` (a request waits for approval) | `access_request.pending` |
//! | `review` (an approver's verdict and reason) | `access_request.reviewed` |
//! | `issue` with `break_glass` | `access_request.break_glass` |
//! | `issue` of an approved request | `access_request.issued` |
//! | `expire` of waiting requests | `access_request.expired` |
//!
//! `standard-webhooks` (standardwebhooks.com) posts `{"type", "timestamp", "data"}` with
//! `webhook-id` (stable per entry: retries and replays carry the same id, so receivers
//! deduplicate), `webhook-timestamp` and `webhook-signature` (`v1,<base64 HMAC-SHA256 of
//! "id.timestamp.body">`, one per configured secret, for rotation). `slack` posts an
//! incoming-webhook message: a summary in `blocks` with a button to the request page;
//! text that requesters control (targets, reasons) is escaped, so it cannot become a link
//! or a mention.
//!
//! A message counts as delivered on a `2xx`. A failure stops the batch there: the position
//! moves to the last message delivered, and the rest is retried with the sink's back-off.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use futures::future::BoxFuture;
use ring::hmac;
use serde_json::{json, Value};

use super::{Sink, SinkError};
use crate::audit::StoredEntry;
use crate::clock::{rfc3339_millis, Clock, SystemClock};
use crate::config::{AuditSinkConfig, SinkKind, WebhookFormat};
use crate::domain::AccessRequest;
use crate::http_client::{HttpClient, Options, Trust};
use crate::store::Store;

/// The webhook sink.
pub(super) struct WebhookSink {
    url: String,
    format: WebhookFormat,
    secrets: Vec<hmac::Key>,
    console_url: Option<String>,
    client: HttpClient,
    /// The ledger: an event's access request (requester, scopes, TTL, intent, approvals).
    store: std::sync::Arc<dyn Store>,
    /// The last entry handled in the current batch (delivered or not an event).
    progress: Option<u64>,
}

impl WebhookSink {
    pub(super) fn new(
        config: &AuditSinkConfig,
        store: std::sync::Arc<dyn Store>,
    ) -> Result<Self, SinkError> {
        let SinkKind::Webhook {
            url,
            format,
            secret_file,
            console_url,
            ca_file,
        } = &config.kind
        else {
            unreachable!("a webhook sink's config")
        };
        let secrets = match secret_file {
            Some(f) => read_secrets(f)?,
            None => Vec::new(),
        };
        let mut options = Options::new(Trust::from_ca_file(ca_file.as_deref()));
        options.timeout = std::time::Duration::from_secs(10);
        options.max_body = 64 * 1024;
        Ok(Self {
            url: url.clone(),
            format: *format,
            secrets,
            console_url: console_url.clone(),
            client: HttpClient::new(&options).map_err(|e| SinkError(e.to_string()))?,
            store,
            progress: None,
        })
    }

    async fn post(&self, e: &StoredEntry, event: &Event) -> Result<(), SinkError> {
        let (body, headers) = match self.format {
            WebhookFormat::StandardWebhooks => {
                let body = json!({
                    "type": event.kind,
                    "timestamp": rfc3339_millis(event.time_ms),
                    "data": event.data,
                })
                .to_string();
                let id = format!("sb_{}", hex::encode(&e.hash[..16.min(e.hash.len())]));
                let ts = SystemClock.unix_seconds().to_string();
                let signed = format!("{id}.{ts}.{body}");
                let signatures = self
                    .secrets
                    .iter()
                    .map(|k| format!("v1,{}", STANDARD.encode(hmac::sign(k, signed.as_bytes()))))
                    .collect::<Vec<_>>()
                    .join(" ");
                let headers = vec![
                    ("webhook-id", id),
                    ("webhook-timestamp", ts),
                    ("webhook-signature", signatures),
                ];
                (body, headers)
            }
            WebhookFormat::Slack => (slack_message(event).to_string(), Vec::new()),
        };
        let mut req =
            http::Request::post(&self.url).header(http::header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            req = req.header(name, value);
        }
        let req = req
            .body(body.into_bytes())
            .map_err(|e| SinkError(format!("request: {e}")))?;
        let status = self
            .client
            .send(req)
            .await
            .map_err(|e| SinkError(e.to_string()))?
            .status;
        if !status.is_success() {
            return Err(SinkError(format!(
                "entry {}: the receiver answered HTTP {status}",
                e.seq
            )));
        }
        Ok(())
    }
}

impl Sink for WebhookSink {
    fn deliver<'a>(
        &'a mut self,
        entries: &'a [StoredEntry],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            self.progress = None;
            for e in entries {
                if let Some(mut event) = Event::of(e, self.console_url.as_deref()) {
                    if let Some(id) = event.data["access_request_id"].as_str() {
                        if let Some(ar) = self.store.access_request(id).await? {
                            event.describe(&ar);
                        }
                    }
                    self.post(e, &event).await?;
                }
                self.progress = Some(e.seq);
            }
            Ok(())
        })
    }

    fn delivered(&self) -> Option<u64> {
        self.progress
    }
}

/// The `whsec_<base64>` secrets of a file (one per line, `#` comments), which must not be
/// readable by others.
fn read_secrets(path: &std::path::Path) -> Result<Vec<hmac::Key>, SinkError> {
    use std::os::unix::fs::PermissionsExt as _;
    let at = |e: &dyn std::fmt::Display| SinkError(format!("{}: {e}", path.display()));
    let mode = std::fs::metadata(path)
        .map_err(|e| at(&e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(at(&"readable by others; chmod 600 it"));
    }
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| at(&e))?);
    let keys = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let raw = l
                .strip_prefix("whsec_")
                .and_then(|b| STANDARD.decode(b).ok())
                .filter(|k| (24..=64).contains(&k.len()))
                .ok_or_else(|| at(&"a line is not whsec_<base64 of 24-64 bytes>"))?;
            Ok(hmac::Key::new(
                hmac::HMAC_SHA256,
                &zeroize::Zeroizing::new(raw),
            ))
        })
        .collect::<Result<Vec<_>, SinkError>>()?;
    if keys.is_empty() {
        return Err(at(&"no whsec_ secret"));
    }
    Ok(keys)
}

/// An approval event read from a ledger entry.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Event {
    /// `access_request.pending`, …
    pub(crate) kind: &'static str,
    /// When it happened (Unix ms).
    pub(crate) time_ms: i64,
    /// What a receiver needs, from the entry.
    pub(crate) data: Value,
}

impl Event {
    /// The approval event an entry records, if it records one.
    pub(crate) fn of(e: &StoredEntry, console_url: Option<&str>) -> Option<Event> {
        let v: Value = serde_json::from_str(&e.body).ok()?;
        let break_glass = v["break_glass"] == true;
        let kind = match v["kind"].as_str()? {
            "access_request" => "access_request.pending",
            "review" => "access_request.reviewed",
            "issue" if break_glass => "access_request.break_glass",
            "issue" if v["access_request_id"].is_string() => "access_request.issued",
            "expire"
                if v["affected_requests"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty()) =>
            {
                "access_request.expired"
            }
            _ => return None,
        };
        let request = &v["request"];
        let id = v["access_request_id"].clone();
        let link = |id: &str| console_url.map(|c| format!("{}/{id}", c.trim_end_matches('/')));
        let mut data = json!({
            "access_request_id": id,
            "profile": request["profile"],
            "scopes": request["scopes"],
            "ttl_secs": request["ttl_secs"],
            "intent": request["intent"],
            "reason": v["reason"],
            "rule": v["rule"],
            "break_glass": break_glass,
            "log": {"seq": e.seq, "hash": hex::encode(&e.hash)},
        });
        // The caller of a review is the reviewer; of the others, the requester.
        if kind == "access_request.reviewed" {
            data["reviewer"] = v["caller"].clone();
            data["verdict"] = v["decision"].clone();
        } else {
            data["requester"] = v["caller"].clone();
        }
        if let Some(d) = request.get("delegation") {
            data["delegation"] = d.clone();
        }
        if let Some(l) = v["lease_id"].as_str() {
            data["lease_id"] = l.into();
        }
        if kind == "access_request.expired" {
            data["access_request_ids"] = v["affected_requests"].clone();
        }
        if let Some(url) = id.as_str().and_then(link) {
            data["url"] = url.into();
        }
        Some(Event {
            kind,
            time_ms: v["time_ms"].as_i64().unwrap_or_default(),
            data,
        })
    }
}

impl Event {
    /// Adds what the access request says (the entry of a review, say, does not repeat
    /// it): requester, the scopes and TTL as they will be granted, intent, delegation,
    /// approver group, approvals so far and needed, state now, expiry.
    pub(crate) fn describe(&mut self, ar: &AccessRequest) {
        let d = &mut self.data;
        let grant = ar.request.grant.as_ref();
        d["requester"] = ar.requester.clone().into();
        d["profile"] = ar.profile.to_string().into();
        d["scopes"] = json!(grant.map_or(&ar.request.scopes, |g| &g.scopes));
        d["ttl_secs"] = json!(grant.map(|g| g.ttl_secs).or(ar.request.ttl_secs));
        d["intent"] = json!(ar.request.intent);
        if let Some(del) = &ar.request.delegation {
            d["delegation"] = json!(del);
        }
        d["approver_group"] = ar.group.clone().into();
        d["approvals"] = json!(ar
            .reviews
            .iter()
            .filter(|r| r.verdict == crate::domain::Verdict::Approve && !r.post_review)
            .count());
        d["threshold"] = ar.threshold.into();
        d["state"] = ar.state.as_str().into();
        d["expires_at"] = ar.expires_at.into();
    }
}

/// Slack's mrkdwn control characters, escaped as Slack asks: text a requester wrote can
/// then never turn into a link, a mention or a broadcast.
fn esc(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Array(a) => a.iter().map(esc).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    };
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A Slack incoming-webhook message for an event.
pub(crate) fn slack_message(event: &Event) -> Value {
    let d = &event.data;
    let what = format!(
        "*{}* {} `{}`",
        esc(&d["profile"]),
        esc(&d["intent"]["action"]),
        esc(&d["intent"]["target"]),
    );
    let headline = match event.kind {
        "access_request.pending" => {
            format!(
                ":lock: *Approval needed*: `{}` asks for {what}",
                esc(&d["requester"])
            )
        }
        "access_request.reviewed" => format!(
            ":memo: `{}` reviewed ({}) the request for {what}",
            esc(&d["reviewer"]),
            esc(&d["verdict"])
        ),
        "access_request.break_glass" => format!(
            ":rotating_light: *Break-glass*: `{}` self-approved {what}; it needs a post-review",
            esc(&d["requester"])
        ),
        "access_request.issued" => {
            format!(
                ":white_check_mark: Issued to `{}`: {what}",
                esc(&d["requester"])
            )
        }
        _ => format!(
            ":hourglass: Requests expired unreviewed: {}",
            esc(&d["access_request_ids"])
        ),
    };
    let mut blocks = vec![
        json!({"type": "section", "text": {"type": "mrkdwn", "text": headline}}),
        json!({"type": "context", "elements": [{"type": "mrkdwn", "text": format!(
            "scopes {} · ttl {} s · request `{}` · rule `{}` · log entry {}",
            esc(&d["scopes"]), esc(&d["ttl_secs"]), esc(&d["access_request_id"]),
            esc(&d["rule"]), d["log"]["seq"]
        )}]}),
    ];
    if !d["reason"].is_null() {
        blocks.insert(
            1,
            json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("> {}", esc(&d["reason"]))}}),
        );
    }
    if let Some(url) = d["url"].as_str() {
        blocks.push(json!({"type": "actions", "elements": [{
            "type": "button",
            "text": {"type": "plain_text", "text": "Open the request"},
            "url": url,
        }]}));
    }
    // `text` is the notification's plain fallback (and what screen readers get).
    json!({"text": headline.replace(['*', '`'], ""), "blocks": blocks})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body: Value) -> StoredEntry {
        StoredEntry {
            seq: 7,
            kind: body["kind"].as_str().unwrap_or_default().to_owned(),
            lease_id: None,
            body: body.to_string(),
            prev_hash: vec![0; 32],
            hash: vec![0xab; 32],
        }
    }

    #[test]
    fn approval_entries_become_events_and_others_do_not() {
        let pending = entry(json!({
            "time_ms": 1_000, "kind": "access_request", "caller": "spiffe://example.org/ci/deploy-agent",
            "request": {"rpc": "IssueCredential", "profile": "model-registry-push", "scopes": ["push"],
                        "ttl_secs": 900, "intent": {"action": "push-model", "target": "models/<https://evil|x>"}},
            "decision": "require_approval", "rule": "r", "access_request_id": "0123",
            "reason": "needs 1 approval(s) from registry-approvers @here",
        }));
        let e = Event::of(&pending, Some("https://broker.example/requests/")).expect("an event");
        assert_eq!(e.kind, "access_request.pending");
        assert_eq!(e.data["requester"], "spiffe://example.org/ci/deploy-agent");
        assert_eq!(e.data["url"], "https://broker.example/requests/0123");
        let slack = slack_message(&e).to_string();
        assert!(
            !slack.contains("<https://evil"),
            "requester text is escaped: {slack}"
        );
        assert!(slack.contains("&lt;https://evil|x&gt;"), "{slack}");
        assert!(slack.contains(r#""url":"https://broker.example/requests/0123""#));

        let review = entry(
            json!({"time_ms": 2, "kind": "review", "caller": "spiffe://example.org/ops/alice",
            "decision": "approve", "access_request_id": "0123", "reason": "LGTM", "request": {"profile": "p"}}),
        );
        let r = Event::of(&review, None).expect("an event");
        assert_eq!(
            (r.kind, &r.data["verdict"], &r.data["reviewer"]),
            (
                "access_request.reviewed",
                &json!("approve"),
                &json!("spiffe://example.org/ops/alice")
            )
        );
        assert!(r.data.get("url").is_none());
        let plain_issue = entry(json!({"time_ms": 3, "kind": "issue", "decision": "allow"}));
        assert!(
            Event::of(&plain_issue, None).is_none(),
            "ordinary issuances are not approval events"
        );
        let glass = entry(
            json!({"time_ms": 3, "kind": "issue", "break_glass": true, "access_request_id": "9"}),
        );
        assert_eq!(
            Event::of(&glass, None).expect("event").kind,
            "access_request.break_glass"
        );
    }
}
