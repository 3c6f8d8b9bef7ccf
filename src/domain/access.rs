//! Access requests: what an approval is bound to, its reviews and its states.

use serde::{Deserialize, Serialize};

use super::{CredentialRequest, Intent, ProfileName};

/// Where an access request is. `Pending` → `Approved` | `Denied` | `Expired`;
/// `Approved` → `Issued` | `Expired`. Every state but `Pending` and `Approved` is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessState {
    /// Waiting for approvals.
    Pending,
    /// Enough approvals; the requester may redeem it once.
    Approved,
    /// An approver denied it.
    Denied,
    /// Nobody decided (or redeemed) in time.
    Expired,
    /// The credential was issued.
    Issued,
}

impl AccessState {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessState::Pending => "pending",
            AccessState::Approved => "approved",
            AccessState::Denied => "denied",
            AccessState::Expired => "expired",
            AccessState::Issued => "issued",
        }
    }
    /// Parses a stored name.
    pub fn from_db(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => AccessState::Pending,
            "approved" => AccessState::Approved,
            "denied" => AccessState::Denied,
            "expired" => AccessState::Expired,
            "issued" => AccessState::Issued,
            _ => return None,
        })
    }
    /// No further transition can happen.
    pub fn is_final(self) -> bool {
        !matches!(self, AccessState::Pending | AccessState::Approved)
    }
}

/// An approver's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Approve.
    Approve,
    /// Deny.
    Deny,
}

impl Verdict {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Approve => "approve",
            Verdict::Deny => "deny",
        }
    }
}

/// One review of an access request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    /// The approver's SPIFFE ID.
    pub reviewer: String,
    /// Approve or deny.
    pub verdict: Verdict,
    /// Why (required).
    pub reason: String,
    /// Unix seconds.
    pub at: i64,
    /// A review after the fact of a break-glass issuance.
    pub post_review: bool,
}

/// The exact request an approval is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSpec {
    /// Requested scopes (sorted).
    pub scopes: Vec<String>,
    /// Requested TTL in seconds, if named.
    pub ttl_secs: Option<u64>,
    /// Stated intent.
    pub intent: Option<Intent>,
    /// For an access request: what the approval grants and how it will be held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<BoundGrant>,
    /// Made by token exchange: the verified chain (an approval binds to it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation: Option<super::Delegation>,
}

/// What an approver approves, resolved: the grant as it will be issued (defaults
/// applied, scopes rendered), the profile definition it is issued under, and how the
/// credential will be held. A redemption that would differ in any of these is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundGrant {
    /// Scopes as granted.
    pub scopes: Vec<String>,
    /// TTL as granted, in seconds.
    pub ttl_secs: u64,
    /// SHA-256 of the profile's definition when approval was asked (a reload that
    /// changes the profile voids the approval).
    pub profile_sha256: String,
    /// How the requester authenticated (`x509-svid` tokens are bound to its certificate;
    /// `jwt-svid` ones are bearer tokens).
    pub auth_method: String,
    /// SHA-256 of the public key the credential will certify (an `x509` profile's CSR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
}

impl BoundGrant {
    /// What differs between the approved grant and `other`, for the refusal.
    pub fn differences(&self, other: &BoundGrant) -> Vec<String> {
        let mut d = Vec::new();
        if self.scopes != other.scopes {
            d.push(format!(
                "scopes {} approved, {} now",
                self.scopes.join(" "),
                other.scopes.join(" ")
            ));
        }
        if self.ttl_secs != other.ttl_secs {
            d.push(format!(
                "ttl {}s approved, {}s now",
                self.ttl_secs, other.ttl_secs
            ));
        }
        if self.profile_sha256 != other.profile_sha256 {
            d.push("the profile changed since the approval".into());
        }
        if self.auth_method != other.auth_method {
            d.push(format!(
                "approved for {} authentication, redeemed with {}",
                self.auth_method, other.auth_method
            ));
        }
        if self.key_sha256 != other.key_sha256 {
            d.push("the CSR's public key differs from the approved one".into());
        }
        d
    }
}

impl RequestSpec {
    /// From a parsed request.
    pub fn of(r: &CredentialRequest) -> Self {
        Self {
            scopes: r.scopes.iter().map(|s| s.to_string()).collect(),
            ttl_secs: r.ttl.map(|t| t.as_secs()),
            intent: r.intent.clone(),
            grant: None,
            delegation: r.delegation.clone(),
        }
    }
    /// The same request, bound to what approving it grants.
    pub fn bound(mut self, grant: BoundGrant) -> Self {
        self.grant = Some(grant);
        self
    }
    /// Canonical JSON.
    pub fn canonical(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
    /// Hex SHA-256 of profile + canonical JSON: what an approval binds to.
    pub fn digest(&self, profile: &str) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(profile.as_bytes());
        ctx.update(b"\0");
        ctx.update(self.canonical().as_bytes());
        hex::encode(ctx.finish().as_ref())
    }
}

/// A request for a credential that policy says needs approval (or a break-glass
/// issuance awaiting its post-review).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequest {
    /// 32 hex characters.
    pub id: String,
    /// Who asked.
    pub requester: String,
    /// Which profile.
    pub profile: ProfileName,
    /// Exactly what was asked.
    pub request: RequestSpec,
    /// Digest of `profile` + `request`.
    pub digest: String,
    /// Approver group.
    pub group: String,
    /// Approvals needed.
    pub threshold: u32,
    /// Lifecycle state.
    pub state: AccessState,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; pending or approved requests expire then.
    pub expires_at: i64,
    /// Whether one deny ends it.
    pub deny_ends: bool,
    /// Issued under break-glass.
    pub break_glass: bool,
    /// Post-review state of a break-glass issuance.
    pub post_review: Option<String>,
    /// The lease issued on it.
    pub lease_id: Option<String>,
    /// Reviews so far.
    pub reviews: Vec<Review>,
}

impl AccessRequest {
    /// A new pending access request for `spec` by `requester`, with no reviews; the
    /// approval terms (group, threshold, expiry) are the caller's to set.
    pub fn new(
        id: String,
        requester: String,
        profile: ProfileName,
        spec: RequestSpec,
        now: i64,
    ) -> Self {
        Self {
            digest: spec.digest(profile.as_str()),
            id,
            requester,
            profile,
            request: spec,
            group: String::new(),
            threshold: 0,
            state: AccessState::Pending,
            created_at: now,
            expires_at: now,
            deny_ends: true,
            break_glass: false,
            post_review: None,
            lease_id: None,
            reviews: Vec::new(),
        }
    }
}

impl AccessRequest {
    /// Distinct approvers that approved (before any post-review).
    pub fn approvers(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .reviews
            .iter()
            .filter(|r| r.verdict == Verdict::Approve && !r.post_review)
            .map(|r| r.reviewer.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Filter for listing access requests.
#[derive(Debug, Clone, Default)]
pub struct AccessFilter {
    /// Only this state.
    pub state: Option<AccessState>,
    /// Only these profiles (an approver's reviewable profiles); `None` = all.
    pub profiles: Option<Vec<String>>,
    /// Only break-glass issuances awaiting post-review.
    pub awaiting_post_review: bool,
    /// Only requests by this requester.
    pub requester: Option<String>,
    /// Page size.
    pub limit: u32,
}
