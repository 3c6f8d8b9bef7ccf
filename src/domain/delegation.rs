//! Delegation as a verified fact (OAuth 2.0 Token Exchange, RFC 8693): who a credential
//! is for (the subject) and who acts for it (the actors, the current one first). The
//! broker builds a [`Delegation`] only from tokens it verified; a token carries it as the
//! standard `act` claim, nested with the current actor outermost (RFC 8693 §4.1).

use serde::{Deserialize, Serialize};

use super::{DomainError, LeaseId};

/// Longest delegation chain (actors) unless the config says otherwise.
pub const DEFAULT_MAX_CHAIN_DEPTH: usize = 3;
/// The most the config may allow.
pub const MAX_CHAIN_DEPTH: usize = 8;

/// What kind of party an identity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartyKind {
    /// A non-human identity (a SPIFFE workload).
    Workload,
    /// A person.
    Person,
}

impl PartyKind {
    /// `workload` or `person` (Cedar's `subject_type` and `actor_types`).
    pub fn as_str(self) -> &'static str {
        match self {
            PartyKind::Workload => "workload",
            PartyKind::Person => "person",
        }
    }
}

/// One identity in a delegation chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Party {
    /// A SPIFFE ID (or, for people signed in elsewhere, their recorded id).
    pub id: String,
    /// Person or workload.
    #[serde(rename = "type")]
    pub kind: PartyKind,
    /// A person's email from their ID token (shown beside the id; never decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

/// The token types `ExchangeToken` accepts as a subject token (RFC 8693 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubjectTokenType {
    /// A credential this broker issued (`urn:ietf:params:oauth:token-type:access_token`):
    /// verified with the broker's own keys and its lease, which must still be active.
    #[serde(rename = "urn:ietf:params:oauth:token-type:access_token")]
    BrokerToken,
    /// A JWT-SVID of an upstream workload (`urn:ietf:params:oauth:token-type:jwt`) whose
    /// audience is this broker, verified against the trust domain's JWT bundle.
    #[serde(rename = "urn:ietf:params:oauth:token-type:jwt")]
    JwtSvid,
    /// A person's ID token from a configured OpenID Provider
    /// (`urn:ietf:params:oauth:token-type:id_token`), audience the broker's client id.
    #[serde(rename = "urn:ietf:params:oauth:token-type:id_token")]
    IdToken,
}

impl SubjectTokenType {
    /// The RFC 8693 token type URI.
    pub fn uri(self) -> &'static str {
        match self {
            SubjectTokenType::BrokerToken => ACCESS_TOKEN_TYPE,
            SubjectTokenType::JwtSvid => JWT_TOKEN_TYPE,
            SubjectTokenType::IdToken => ID_TOKEN_TYPE,
        }
    }

    /// Parses a token type URI; anything else is refused by name.
    pub fn parse(uri: &str) -> Result<Self, DomainError> {
        match uri {
            ACCESS_TOKEN_TYPE => Ok(SubjectTokenType::BrokerToken),
            JWT_TOKEN_TYPE => Ok(SubjectTokenType::JwtSvid),
            ID_TOKEN_TYPE => Ok(SubjectTokenType::IdToken),
            other => Err(DomainError::Invalid(format!(
                "subject_token_type {:?} is not accepted (use {ACCESS_TOKEN_TYPE} for a credential this broker issued, {JWT_TOKEN_TYPE} for a JWT-SVID, {ID_TOKEN_TYPE} for a person's ID token)",
                super::truncate(other)
            ))),
        }
    }
}

/// RFC 8693 token type of an access token (what `ExchangeToken` issues for token profiles).
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// RFC 8693 token type of a JWT.
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// RFC 8693 token type of an OpenID Connect ID token.
pub const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";

/// The `act` claim: the current actor, nesting the one before it (RFC 8693 §4.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The actor's identity.
    pub sub: String,
    /// The actor before it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

impl Actor {
    /// The claim for `ids`, current actor first; `None` for an empty chain.
    pub fn nest(ids: &[&str]) -> Option<Actor> {
        ids.iter().rev().fold(None, |inner, id| {
            Some(Actor {
                sub: (*id).to_owned(),
                act: inner.map(Box::new),
            })
        })
    }

    /// The actors, current first.
    pub fn chain(&self) -> Vec<&str> {
        let mut out = Vec::new();
        let mut at = Some(self);
        while let Some(a) = at {
            out.push(a.sub.as_str());
            at = a.act.as_deref();
        }
        out
    }
}

/// The `may_act` claim: who may act for the subject (RFC 8693 §4.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MayAct {
    /// The one identity allowed to exchange the token.
    pub sub: String,
}

/// A verified delegation: the subject a credential is for, every actor (the current one
/// first) and the subject token it rests on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegation {
    /// Whom the credential is for (its `sub`).
    pub subject: Party,
    /// Who acts for the subject, the current actor (the caller) first.
    pub actors: Vec<Party>,
    /// The kind of token that proved the subject.
    pub subject_token_type: SubjectTokenType,
    /// Hex SHA-256 of the subject token (never the token).
    pub subject_token_sha256: String,
    /// For a broker-issued subject token: its lease (revoking it revokes this credential).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_lease: Option<LeaseId>,
    /// For a person's ID token: their groups (the provider's groups claim), which Cedar
    /// sees as `subject_groups`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_groups: Vec<String>,
}

impl Delegation {
    /// The `act` claim of the credential.
    pub fn act(&self) -> Option<Actor> {
        let ids: Vec<&str> = self.actors.iter().map(|a| a.id.as_str()).collect();
        Actor::nest(&ids)
    }

    /// Whether `id` is the subject or an actor (nobody in the chain may approve).
    pub fn involves(&self, id: &str) -> bool {
        self.subject.id == id || self.actors.iter().any(|a| a.id == id)
    }
}

/// Why a chain may not be extended by `actor`: a cycle or the depth bound. `earlier` are
/// the subject token's actors (current first), `subject` its subject.
pub fn extend_chain(
    subject: &str,
    earlier: &[&str],
    actor: &str,
    max_depth: usize,
) -> Result<(), String> {
    if actor == subject {
        return Err(format!(
            "cycle: {actor} is the subject of the token; it needs no delegation to act as itself"
        ));
    }
    if earlier.contains(&actor) {
        return Err(format!(
            "cycle: {actor} already acts in this delegation chain (an actor appears only once)"
        ));
    }
    if earlier.len() + 1 > max_depth {
        return Err(format!(
            "delegation chain too long: {} actors, at most {max_depth}",
            earlier.len() + 1
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn act_nests_the_current_actor_outermost() {
        let a = Actor::nest(&["c", "b", "a"]).expect("three actors");
        assert_eq!(a.sub, "c");
        assert_eq!(a.chain(), vec!["c", "b", "a"]);
        let json = serde_json::to_value(&a).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"sub": "c", "act": {"sub": "b", "act": {"sub": "a"}}})
        );
        assert!(Actor::nest(&[]).is_none());
    }

    #[test]
    fn chains_refuse_cycles_and_depth() {
        assert!(extend_chain("s", &[], "a", 3).is_ok());
        assert!(extend_chain("s", &["b", "a"], "c", 3).is_ok());
        assert!(extend_chain("s", &["c", "b", "a"], "d", 3)
            .expect_err("fourth")
            .contains("too long"));
        assert!(extend_chain("s", &["b", "a"], "a", 3)
            .expect_err("repeat")
            .contains("cycle"));
        assert!(extend_chain("s", &[], "s", 3)
            .expect_err("self")
            .contains("subject"));
    }

    #[test]
    fn token_types_parse_by_uri() {
        assert_eq!(
            SubjectTokenType::parse(ACCESS_TOKEN_TYPE),
            Ok(SubjectTokenType::BrokerToken)
        );
        assert_eq!(
            SubjectTokenType::parse(JWT_TOKEN_TYPE),
            Ok(SubjectTokenType::JwtSvid)
        );
        assert_eq!(
            SubjectTokenType::parse(ID_TOKEN_TYPE),
            Ok(SubjectTokenType::IdToken)
        );
        assert!(SubjectTokenType::parse("urn:x").is_err());
    }
}
