//! People's sessions, kept server-side: the browser holds only a random token (in an
//! `HttpOnly`, `Secure`, `SameSite=Strict` cookie), the CLI the same kind of token (from
//! `spiffe-broker login`, sent as `authorization: Session <token>`); the broker keeps its
//! SHA-256, the person, and when it began and was last used. A session ends at `session_ttl` after
//! sign-in or `idle_timeout` after its last use, at sign-out, or when an operator ends the
//! person's sessions. A restart ends every session (people sign in again).
//!
//! Sign-ins under way are kept here too, keyed by their `state`, each bound to the
//! browser that began it by a second cookie, for at most `SIGN_IN_WINDOW` (10 min).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::clock::Clock;
use crate::config::ConsoleConfig;
use crate::domain::Person;
use crate::oidc::{random_token, PendingSignIn, SignInError};

/// How long a sign-in may take at the provider (seconds).
pub const SIGN_IN_WINDOW: i64 = 600;
/// Most live sessions; past it, new sign-ins are refused until some end.
const MAX_SESSIONS: usize = 10_000;
/// Most sign-ins under way (the sign-in start is unauthenticated: bounded).
const MAX_PENDING: usize = 1_000;
/// How long a CLI sign-in's one-time code is good for (seconds).
pub const CLI_CODE_WINDOW: i64 = 60;

/// One signed-in person.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who.
    pub person: Person,
    /// Dev mode's demo sign-in.
    pub dev: bool,
    /// The anti-forgery token every form of this session carries.
    pub csrf: String,
    /// Sign-in time (Unix seconds).
    pub created_at: i64,
    /// The console's pages this person may use (path, title), decided at sign-in.
    pub nav: Vec<(&'static str, &'static str)>,
    last_seen: i64,
}

/// A sign-in under way: the provider's pending state (none for the dev sign-in) and the
/// SHA-256 of the browser-binding cookie.
struct Pending {
    sign_in: Option<PendingSignIn>,
    then: Option<String>,
    binding: [u8; 32],
    created_at: i64,
}

/// A CLI sign-in approved in the browser, waiting for the CLI to redeem its code with the
/// PKCE verifier.
struct CliGrant {
    person: Person,
    dev: bool,
    nav: Vec<(&'static str, &'static str)>,
    challenge: String,
    created_at: i64,
}

/// Sessions and sign-ins under way.
pub struct Sessions {
    live: Mutex<HashMap<[u8; 32], Session>>,
    pending: Mutex<HashMap<String, Pending>>,
    cli: Mutex<HashMap<[u8; 32], CliGrant>>,
    cfg: ConsoleConfig,
    clock: Arc<dyn Clock>,
}

fn digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    out
}

/// Whether two secrets are equal, in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    digest(a) == digest(b)
}

impl Sessions {
    /// No sessions yet.
    pub fn new(cfg: ConsoleConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            live: Mutex::default(),
            pending: Mutex::default(),
            cli: Mutex::default(),
            cfg,
            clock,
        }
    }

    /// The settings.
    pub fn config(&self) -> &ConsoleConfig {
        &self.cfg
    }

    /// A new session for `person`: its token (for the cookie only).
    pub fn begin(
        &self,
        person: Person,
        dev: bool,
        nav: Vec<(&'static str, &'static str)>,
    ) -> Result<String, SignInError> {
        let now = self.clock.unix_seconds();
        let token = random_token()?;
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|_, s| self.alive(s, now));
        if live.len() >= MAX_SESSIONS {
            return Err(SignInError::Unavailable("too many open sessions".into()));
        }
        live.insert(
            digest(&token),
            Session {
                person,
                dev,
                csrf: random_token()?,
                created_at: now,
                nav,
                last_seen: now,
            },
        );
        Ok(token)
    }

    fn alive(&self, s: &Session, now: i64) -> bool {
        now < s.created_at + self.cfg.session_ttl.as_secs() as i64
            && now < s.last_seen + self.cfg.idle_timeout.as_secs() as i64
    }

    /// The session of `token`, if it is live (and marks it used); an ended one is dropped.
    pub fn get(&self, token: &str) -> Option<Session> {
        let now = self.clock.unix_seconds();
        let key = digest(token);
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let alive = live.get(&key).map(|s| self.alive(s, now))?;
        if !alive {
            live.remove(&key);
            return None;
        }
        let s = live.get_mut(&key)?;
        s.last_seen = now;
        Some(s.clone())
    }

    /// Ends the session of `token` (sign-out).
    pub fn end(&self, token: &str) -> Option<Session> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&digest(token))
    }

    /// The live sessions: person, method (dev or not), sign-in and last use.
    pub fn list(&self) -> Vec<(Person, bool, i64, i64)> {
        let now = self.clock.unix_seconds();
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = live
            .values()
            .filter(|s| self.alive(s, now))
            .map(|s| (s.person.clone(), s.dev, s.created_at, s.last_seen))
            .collect();
        out.sort_by(|a, b| a.0.id.cmp(&b.0.id).then(a.2.cmp(&b.2)));
        out
    }

    /// Ends every session of person `id`; how many there were.
    pub fn end_person(&self, id: &str) -> usize {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let before = live.len();
        live.retain(|_, s| s.person.id != id);
        before - live.len()
    }

    /// Keeps a sign-in under way under `state`, bound to the browser holding `binding`.
    pub fn hold(
        &self,
        state: String,
        sign_in: Option<PendingSignIn>,
        binding: &str,
        then: Option<String>,
    ) -> Result<(), SignInError> {
        let now = self.clock.unix_seconds();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|_, p| now - p.created_at < SIGN_IN_WINDOW);
        if pending.len() >= MAX_PENDING {
            return Err(SignInError::Unavailable(
                "too many sign-ins under way; try again in a few minutes".into(),
            ));
        }
        pending.insert(
            state,
            Pending {
                sign_in,
                then,
                binding: digest(binding),
                created_at: now,
            },
        );
        Ok(())
    }

    /// Takes the sign-in under `state` (once: a replay finds nothing), if the browser
    /// holds its binding and it is not older than `SIGN_IN_WINDOW` (10 min): the provider's
    /// pending state (none for a dev sign-in) and where to go after.
    pub fn take(
        &self,
        state: &str,
        binding: Option<&str>,
    ) -> Result<(Option<PendingSignIn>, Option<String>), SignInError> {
        let now = self.clock.unix_seconds();
        let p = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(state)
            .ok_or_else(|| SignInError::Refused("unknown or already used sign-in".into()))?;
        if binding.map(digest) != Some(p.binding) {
            return Err(SignInError::Refused(
                "the sign-in was begun in another browser".into(),
            ));
        }
        if now - p.created_at >= SIGN_IN_WINDOW {
            return Err(SignInError::Refused("the sign-in took too long".into()));
        }
        Ok((p.sign_in, p.then))
    }

    /// A one-time code for the CLI of the person of `session` (who approved it in the
    /// browser), redeemable within [`CLI_CODE_WINDOW`] by whoever holds the verifier of
    /// `challenge` (PKCE `S256`).
    pub fn grant_cli(&self, session: &Session, challenge: &str) -> Result<String, SignInError> {
        let now = self.clock.unix_seconds();
        let code = random_token()?;
        let mut cli = self.cli.lock().unwrap_or_else(|p| p.into_inner());
        cli.retain(|_, g| now - g.created_at < CLI_CODE_WINDOW);
        if cli.len() >= MAX_PENDING {
            return Err(SignInError::Unavailable(
                "too many CLI sign-ins under way".into(),
            ));
        }
        cli.insert(
            digest(&code),
            CliGrant {
                person: session.person.clone(),
                dev: session.dev,
                nav: session.nav.clone(),
                challenge: challenge.to_owned(),
                created_at: now,
            },
        );
        Ok(code)
    }

    /// Redeems a CLI code (once) with its PKCE verifier: a new session for the person.
    pub fn redeem_cli(&self, code: &str, verifier: &str) -> Result<(String, Session), SignInError> {
        let now = self.clock.unix_seconds();
        let grant = self
            .cli
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&digest(code))
            .ok_or_else(|| SignInError::Refused("unknown or already used code".into()))?;
        if now - grant.created_at >= CLI_CODE_WINDOW {
            return Err(SignInError::Refused("the code has expired".into()));
        }
        let challenge = crate::jose::b64(
            ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref(),
        );
        if challenge != grant.challenge {
            return Err(SignInError::Refused(
                "the code verifier does not match".into(),
            ));
        }
        let token = self.begin(grant.person, grant.dev, grant.nav)?;
        let session = self
            .get(&token)
            .ok_or_else(|| SignInError::Unavailable("the new session ended at once".into()))?;
        Ok((token, session))
    }
}
