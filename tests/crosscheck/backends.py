#!/usr/bin/env python3
"""Independent cross-check of spiffe-broker's backend profiles.

Each relying party's acceptance rules are re-implemented here from its own documentation and
source, with libraries that share nothing with the Rust code:

  gpu-queue-k8s  kube-apiserver JWT authenticator (structured AuthenticationConfiguration):
                 the rules are read from deploy/kubernetes/authentication-config.yaml, validated
                 as the apiserver validates them, and applied with PyJWT (signature) and
                 cel-python (CEL rules), with go-oidc v2's time rules (exp: no leeway, nbf: 1 min,
                 iat: unchecked) and the apiserver's accepted algs (RS/ES/PS 256/384/512).
  slurm-submit   Slurm auth/jwt with AuthAltParameters=jwks=FILE: only JWKS keys with alg RS256
                 are loaded; the token needs alg RS256, a matching kid, exp not past and a `sun`
                 (or `username`) claim. Verified with jwcrypto.
  s3-datasets    AWS STS AssumeRoleWithWebIdentity: moto_server behind a recording proxy. The
                 recorded call is checked against AWS's documented limits (moto checks almost
                 none: it accepts DurationSeconds < 900, any token, any session policy), the
                 WebIdentityToken is verified with PyJWT against the broker's JWKS, and the
                 returned keys are used with boto3 against moto.

Steps:
  1-3  self-test (no broker needed): each verifier against tokens minted here (jwcrypto and
       PyJWT, EC P-256 and RSA-2048 keys served by a local fake issuer), positive and negative;
       moto + proxy + a Python-signed token through AssumeRoleWithWebIdentity;
  4    `spiffe-broker dev ... --aws-sts-endpoint <proxy>`, wait (bounded) for `ready`;
  5    discovery + JWKS: EC P-256 ES256 keys and one RSA RS256 signing key, no private parts;
  6    gpu-queue-k8s for gpu/provisioner -> Kubernetes UserInfo;
  7    slurm-submit for gpu/provisioner -> Slurm user gpu-prov;
  8    s3-datasets for ml/model-runtime -> STS call, secret, --output env, and a refused 5m TTL.

Usage:  python3 tests/crosscheck/backends.py              # self-test, then the broker
        python3 tests/crosscheck/backends.py --self-test  # steps 1-3 only
Env:    SPIFFE_BROKER_BIN  broker binary (default: <repo>/target/debug/spiffe-broker)
        MOTO_SERVER_BIN    moto_server (default: next to this Python, then $PATH)
        CROSSCHECK_READY_TIMEOUT, CROSSCHECK_KEEP_STATE=1  as for crosscheck.py

The last line is `N passed, M failed`; the exit code is non-zero on any failure. Every child
process (broker, moto_server) is stopped on exit, also on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import traceback
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import crosscheck as cc  # noqa: E402  (Report, Broker, free_port, b64url*, http_json, REPO)

REPO = cc.REPO
CALL_TIMEOUT = cc.CALL_TIMEOUT
TRUST_DOMAIN = "example.org"
PROVISIONER_ID = "spiffe://example.org/gpu/provisioner"
MODEL_RUNTIME_ID = "spiffe://example.org/ml/model-runtime"
SUBMIT_INTENT = ["--intent-action", "submit-training", "--intent-target", "queue/a100"]

K8S_PROFILE = "gpu-queue-k8s"
K8S_AUDIENCE = "gpu-cluster"
K8S_SCOPE = "queue:submit"
K8S_GROUPS = ["kueue:ml-training"]
AUTHN_CONFIG = REPO / "deploy" / "kubernetes" / "authentication-config.yaml"

SLURM_PROFILE = "slurm-submit"
SLURM_AUDIENCE = "slurm"
SLURM_USER = "gpu-prov"

S3_PROFILE = "s3-datasets"
STS_AUDIENCE = "sts.amazonaws.com"
ROLE_ARN = "arn:aws:iam::123456789012:role/model-runtime-datasets"
S3_ACTIONS = ["s3:GetObject"]
S3_RESOURCES = ["arn:aws:s3:::training-data/*"]
S3_TTL = 900
READ_INTENT = ["--intent-action", "read-dataset", "--intent-target", S3_RESOURCES[0]]


class Rejected(Exception):
    """The relying party would refuse the token or request; the message says why."""


class NotThisIssuer(Rejected):
    """The apiserver's authenticator for this issuer would not even try the token."""


def b64json(seg: str) -> dict:
    try:
        v = json.loads(cc.b64url_decode(seg))
    except Exception as e:  # noqa: BLE001
        raise Rejected(f"malformed JWT segment: {e}") from e
    if not isinstance(v, dict):
        raise Rejected("JWT segment is not a JSON object")
    return v


def jwt_parts(token: str) -> tuple[dict, dict]:
    """(header, payload), unverified."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise Rejected("malformed JWT: expected 3 parts")
    return b64json(parts[0]), b64json(parts[1])


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_duration(s: str) -> int:
    """'10m', '1h30m', '45s' -> seconds (the broker config's duration syntax)."""
    parts = re.findall(r"(\d+)\s*(h|m|s|d)", s)
    if not parts or "".join(a + b for a, b in parts) != s.replace(" ", ""):
        raise ValueError(f"bad duration {s!r}")
    mult = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(int(a) * mult[b] for a, b in parts)


# =====================================================================================
# Kubernetes: structured authentication (AuthenticationConfiguration, JWT authenticator)
# =====================================================================================

K8S_API_VERSIONS = {"apiserver.config.k8s.io/v1beta1", "apiserver.config.k8s.io/v1"}
# oidc.AllValidSigningAlgorithms(): what the apiserver accepts when configured from a file.
K8S_SIGNING_ALGS = {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
K8S_NBF_LEEWAY = 60  # go-oidc v2 (vendored by the apiserver): nbf only; exp has none; iat unchecked
EC_ALG_CURVE = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


def _cel():
    import celpy  # cel-python
    return celpy


@dataclass
class CelRule:
    expression: str
    message: str
    program: Any


@dataclass
class JwtAuthenticator:
    """One `jwt[]` entry of an AuthenticationConfiguration, validated and compiled."""
    issuer_url: str
    discovery_url: str | None
    audiences: list[str]
    username: dict
    groups: dict
    uid: dict
    extra: list[tuple[str, Any]]
    required_claims: dict[str, str]
    claim_rules: list[CelRule]
    user_rules: list[CelRule]
    source: dict = field(repr=False, default_factory=dict)


def _validate_url(u: str, what: str, errs: list[str]) -> None:
    p = urllib.parse.urlsplit(u)
    if p.scheme != "https":
        errs.append(f"{what}: URL scheme must be https")
    if p.username or p.password:
        errs.append(f"{what}: URL must not contain a username or password")
    if p.query:
        errs.append(f"{what}: URL must not contain a query")
    if p.fragment:
        errs.append(f"{what}: URL must not contain a fragment")


def _compile(expr: str, what: str, errs: list[str]):
    celpy = _cel()
    env = celpy.Environment()
    try:
        return env.program(env.compile(expr))
    except Exception as e:  # noqa: BLE001 - any compile failure is a config error
        errs.append(f"{what}: CEL does not compile: {e}")
        return None


def _mapping(m: Any, what: str, required: bool, errs: list[str]) -> dict:
    """PrefixedClaimOrExpression: claim XOR expression; prefix required iff claim."""
    m = m or {}
    if not isinstance(m, dict):
        errs.append(f"{what}: must be a mapping")
        return {}
    claim, expr = m.get("claim") or "", m.get("expression") or ""
    if claim and expr:
        errs.append(f"{what}: claim and expression can't both be set")
    elif not claim and not expr and required:
        errs.append(f"{what}: claim or expression is required")
    elif expr:
        if "prefix" in m:
            errs.append(f"{what}.prefix: may not be specified when expression is set")
        return {"program": _compile(expr, f"{what}.expression", errs), "expression": expr}
    elif claim:
        if m.get("prefix") is None:
            errs.append(f"{what}.prefix: prefix is required when claim is set "
                        "(it can be an empty string to disable prefixing)")
        return {"claim": claim, "prefix": m.get("prefix") or ""}
    return {}


def parse_authentication_config(doc: Any, issuer_url_override: str | None = None,
                                issuer_url: str | None = None) -> JwtAuthenticator:
    """Validates an AuthenticationConfiguration as the apiserver does (the rules that matter
    here) and returns the JWT authenticator for `issuer_url` (or the only one). With
    `issuer_url_override`, the validated authenticator's issuer url is replaced (the dev
    broker's issuer is plain http on loopback, which a real apiserver would refuse)."""
    errs: list[str] = []
    if not isinstance(doc, dict):
        raise ValueError("AuthenticationConfiguration: not a mapping")
    if doc.get("apiVersion") not in K8S_API_VERSIONS:
        errs.append(f"apiVersion {doc.get('apiVersion')!r} not one of {sorted(K8S_API_VERSIONS)}")
    if doc.get("kind") != "AuthenticationConfiguration":
        errs.append(f"kind {doc.get('kind')!r} is not AuthenticationConfiguration")
    jwts = doc.get("jwt") or []
    if not isinstance(jwts, list) or not jwts:
        raise ValueError("; ".join(errs + ["jwt: at least one authenticator is required here"]))
    seen_issuers: set[str] = set()
    built: list[JwtAuthenticator] = []
    for i, a in enumerate(jwts):
        p = f"jwt[{i}]"
        a = a if isinstance(a, dict) else {}
        iss = a.get("issuer") or {}
        url = iss.get("url") or ""
        if not url:
            errs.append(f"{p}.issuer.url: required")
        else:
            _validate_url(url, f"{p}.issuer.url", errs)
        if url in seen_issuers:
            errs.append(f"{p}.issuer.url: duplicate {url}")
        seen_issuers.add(url)
        disc = iss.get("discoveryURL") or None
        if disc:
            if disc.rstrip("/") == url.rstrip("/"):
                errs.append(f"{p}.issuer.discoveryURL: must be different from URL")
            _validate_url(disc, f"{p}.issuer.discoveryURL", errs)
        auds = iss.get("audiences") or []
        if not isinstance(auds, list) or not auds:
            errs.append(f"{p}.issuer.audiences: at least one is required")
            auds = []
        if any(not isinstance(x, str) or not x for x in auds):
            errs.append(f"{p}.issuer.audiences: entries must be non-empty strings")
        if len(set(map(str, auds))) != len(auds):
            errs.append(f"{p}.issuer.audiences: duplicate entries")
        policy = iss.get("audienceMatchPolicy") or ""
        if len(auds) > 1 and policy != "MatchAny":
            errs.append(f"{p}.issuer.audienceMatchPolicy: must be MatchAny for multiple audiences")
        if len(auds) == 1 and policy not in ("", "MatchAny"):
            errs.append(f"{p}.issuer.audienceMatchPolicy: must be empty or MatchAny for a single audience")

        required: dict[str, str] = {}
        claim_rules: list[CelRule] = []
        seen_expr: set[str] = set()
        for j, rule in enumerate(a.get("claimValidationRules") or []):
            rp = f"{p}.claimValidationRules[{j}]"
            claim, expr = rule.get("claim") or "", rule.get("expression") or ""
            if claim and expr:
                errs.append(f"{rp}: claim and expression can't both be set")
            elif not claim and not expr:
                errs.append(f"{rp}: claim or expression is required")
            elif claim:
                if rule.get("message"):
                    errs.append(f"{rp}.message: may not be specified when claim is set")
                if claim in required:
                    errs.append(f"{rp}.claim: duplicate {claim}")
                required[claim] = rule.get("requiredValue") or ""
            else:
                if rule.get("requiredValue"):
                    errs.append(f"{rp}.requiredValue: may not be specified when expression is set")
                if expr in seen_expr:
                    errs.append(f"{rp}.expression: duplicate")
                    continue
                seen_expr.add(expr)
                claim_rules.append(CelRule(expr, rule.get("message") or "",
                                           _compile(expr, f"{rp}.expression", errs)))

        cm = a.get("claimMappings") or {}
        username = _mapping(cm.get("username"), f"{p}.claimMappings.username", True, errs)
        groups = _mapping(cm.get("groups"), f"{p}.claimMappings.groups", False, errs)
        uid_m = cm.get("uid") or {}
        uid: dict = {}
        if uid_m.get("claim") and uid_m.get("expression"):
            errs.append(f"{p}.claimMappings.uid: claim and expression can't both be set")
        elif uid_m.get("claim"):
            uid = {"claim": uid_m["claim"]}
        elif uid_m.get("expression"):
            uid = {"expression": uid_m["expression"],
                   "program": _compile(uid_m["expression"], f"{p}.claimMappings.uid.expression", errs)}
        extra: list[tuple[str, Any]] = []
        for j, x in enumerate(cm.get("extra") or []):
            key = x.get("key") or ""
            if "/" not in key or key != key.lower():
                errs.append(f"{p}.claimMappings.extra[{j}].key: must be a lowercase domain-prefixed path")
            if not x.get("valueExpression"):
                errs.append(f"{p}.claimMappings.extra[{j}].valueExpression: required")
                continue
            extra.append((key, _compile(x["valueExpression"], f"{p}.claimMappings.extra[{j}]", errs)))
        user_rules: list[CelRule] = []
        for j, rule in enumerate(a.get("userValidationRules") or []):
            expr = rule.get("expression") or ""
            if not expr:
                errs.append(f"{p}.userValidationRules[{j}].expression: required")
                continue
            user_rules.append(CelRule(expr, rule.get("message") or "",
                                      _compile(expr, f"{p}.userValidationRules[{j}]", errs)))
        built.append(JwtAuthenticator(url, disc, list(auds), username, groups, uid, extra,
                                      required, claim_rules, user_rules, a))
    if errs:
        raise ValueError("; ".join(errs))
    chosen = [b for b in built if issuer_url is None or b.issuer_url == issuer_url]
    if len(chosen) != 1:
        raise ValueError(f"expected one JWT authenticator for {issuer_url!r}, found {len(chosen)}")
    auth = chosen[0]
    if issuer_url_override is not None:
        auth.issuer_url = issuer_url_override
    return auth


def load_authentication_config(path: Path, issuer_url_override: str | None = None) -> JwtAuthenticator:
    import yaml
    return parse_authentication_config(yaml.safe_load(path.read_text("utf-8")), issuer_url_override)


def _cel_eval(program, activation: dict):
    celpy = _cel()
    try:
        out = program.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()})
    except Exception as e:  # noqa: BLE001
        raise Rejected(f"CEL evaluation error: {e}") from e
    if isinstance(out, celpy.CELEvalError):
        raise Rejected(f"CEL evaluation error: {out}")
    return out


def _string_list(v: Any, what: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return list(v)
    raise Rejected(f"oidc: parse {what}: want a string or an array of strings, got {json.dumps(v)}")


def k8s_verify_signature(token: str, header: dict, jwks: dict) -> None:
    """go-oidc's remote key set: keys with the token's kid (all keys without one); the first
    that verifies wins. Signatures are checked with PyJWT."""
    import jwt
    alg = header.get("alg")
    if alg not in K8S_SIGNING_ALGS:
        raise Rejected(f"oidc: id token signed with unsupported algorithm, expected "
                       f"{sorted(K8S_SIGNING_ALGS)} got {alg!r}")
    kid = header.get("kid")
    cands = [k for k in jwks.get("keys", []) if isinstance(k, dict) and (not kid or k.get("kid") == kid)]
    if not cands:
        raise Rejected(f"failed to verify signature: no JWKS key with kid {kid!r}")
    errors = []
    for k in cands:
        try:
            if alg.startswith("ES") and (k.get("kty") != "EC" or k.get("crv") != EC_ALG_CURVE[alg]):
                raise ValueError(f"{alg} needs an EC {EC_ALG_CURVE[alg]} key, got {k.get('kty')} {k.get('crv')}")
            if alg[:2] in ("RS", "PS") and k.get("kty") != "RSA":
                raise ValueError(f"{alg} needs an RSA key, got {k.get('kty')}")
            key = jwt.PyJWK(k, algorithm=alg).key
            jwt.PyJWS().decode(token, key=key, algorithms=[alg])
            return
        except Exception as e:  # noqa: BLE001
            errors.append(f"{k.get('kid')}: {type(e).__name__}: {e}")
    raise Rejected("failed to verify signature: " + "; ".join(errors))


def k8s_authenticate(token: str, a: JwtAuthenticator, fetch: Callable[[str], Any] = cc.http_json,
                     now: float | None = None) -> dict:
    """What the kube-apiserver's JWT authenticator does with `token`; returns the UserInfo
    (username, uid, groups, extra) or raises Rejected."""
    now = time.time() if now is None else now
    header, c = jwt_parts(token)
    if c.get("iss") != a.issuer_url:
        raise NotThisIssuer(f"token iss {c.get('iss')!r} is not {a.issuer_url!r}")
    disc_url = a.discovery_url or a.issuer_url.rstrip("/") + "/.well-known/openid-configuration"
    disc = fetch(disc_url)
    if not isinstance(disc, dict) or disc.get("issuer") != a.issuer_url:
        raise Rejected(f"oidc: issuer did not match the issuer returned by provider, expected "
                       f"{a.issuer_url!r} got {disc.get('issuer') if isinstance(disc, dict) else disc!r}")
    jwks = fetch(disc.get("jwks_uri") or "")
    k8s_verify_signature(token, header, jwks)

    # go-oidc v2 IDTokenVerifier: claim types, issuer, expiry, nbf (1 min leeway).
    for name in ("exp", "iat", "nbf"):
        if name in c and not is_num(c[name]):
            raise Rejected(f"oidc: failed to unmarshal claims: {name} is not a number")
    aud = _string_list(c.get("aud"), "aud")
    exp = c.get("exp", 0)  # absent exp is the zero time: expired
    if exp < now:
        raise Rejected(f"oidc: token is expired (Token Expiry: {exp})")
    if "nbf" in c and now + K8S_NBF_LEEWAY < c["nbf"]:
        raise Rejected(f"oidc: current time {now:.0f} before the nbf (not before) time: {c['nbf']}")
    if not set(aud) & set(a.audiences):  # audienceMatchPolicy MatchAny
        raise Rejected(f"oidc: expected audience in {sorted(a.audiences)} got {aud}")

    if "claim" in a.username:
        name = a.username["claim"]
        if name not in c:
            raise Rejected(f"oidc: parse username claims {name!r}: claim not present")
        if not isinstance(c[name], str):
            raise Rejected(f"oidc: parse username claims {name!r}: not a string")
        if name == "email" and "email_verified" in c and c["email_verified"] is not True:
            raise Rejected("oidc: email not verified")
        username = a.username["prefix"] + c[name]
    else:
        v = _cel_eval(a.username["program"], {"claims": c})
        if not isinstance(v, str):
            raise Rejected("oidc: username claim expression must return a string")
        username = str(v)

    groups: list[str] = []
    if "claim" in a.groups:
        if a.groups["claim"] in c:
            groups = [a.groups["prefix"] + g for g in _string_list(c[a.groups["claim"]],
                                                                    f"groups claim {a.groups['claim']!r}")]
    elif "program" in a.groups:
        groups = _string_list(_json(_cel_eval(a.groups["program"], {"claims": c})), "groups expression")

    uid = ""
    if "claim" in a.uid:
        if not isinstance(c.get(a.uid["claim"]), str):
            raise Rejected(f"oidc: parse uid claim {a.uid['claim']!r}: missing or not a string")
        uid = c[a.uid["claim"]]
    elif "program" in a.uid:
        v = _cel_eval(a.uid["program"], {"claims": c})
        if not isinstance(v, str):
            raise Rejected("oidc: uid claim expression must return a string")
        uid = str(v)

    extra: dict[str, list[str]] = {}
    for key, prog in a.extra:
        vals = _string_list(_json(_cel_eval(prog, {"claims": c})), f"extra {key}")
        if vals:
            extra[key] = vals

    for name, want in a.required_claims.items():
        if name not in c:
            raise Rejected(f"oidc: required claim {name} not present in ID token")
        if not isinstance(c[name], str) or c[name] != want:
            raise Rejected(f"oidc: required claim {name} value does not match. Got = {c[name]}, want = {want}")
    for rule in a.claim_rules:
        if not _is_true(rule, c, "claims"):
            raise Rejected(f"oidc: error evaluating claim validation expression: {rule.message or rule.expression}")
    user = {"username": username, "uid": uid, "groups": groups, "extra": extra}
    for rule in a.user_rules:
        if not _is_true(rule, user, "user"):
            raise Rejected(f"oidc: error evaluating user info validation rule: {rule.message or rule.expression}")
    return user


def _is_true(rule: CelRule, value: dict, var: str) -> bool:
    celpy = _cel()
    out = _cel_eval(rule.program, {var: value})
    if not isinstance(out, celpy.celtypes.BoolType):
        raise Rejected(f"CEL expression {rule.expression!r} must return a bool, got {type(out).__name__}")
    return bool(out)


def _json(v: Any) -> Any:
    """cel value -> plain JSON value (strings and lists of strings are all we need)."""
    if isinstance(v, str):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_json(x) for x in v]
    return v


# =====================================================================================
# Slurm: auth/jwt with AuthAltParameters=jwks=FILE
# =====================================================================================

def slurm_key_table(jwks: dict) -> dict:
    """What auth/jwt loads from the JWKS file: keys whose alg is RS256 (case-insensitive) and
    nothing else; an RS256 key without kid, e or n stops slurmctld (fatal)."""
    from jwcrypto import jwk
    table = {}
    for k in jwks.get("keys", []):
        if str(k.get("alg", "")).lower() != "rs256":
            continue
        for f in ("kid", "e", "n"):
            if not k.get(f):
                raise Rejected(f"slurmctld fatal: _build_jwks_keys: failed to load {f} field")
        table[k["kid"]] = jwk.JWK(**{x: k[x] for x in ("kty", "n", "e", "kid")})
    return table


def slurm_authenticate(token: str, jwks: dict, now: float | None = None) -> dict:
    """auth/jwt's auth_p_verify: returns {"username", "claims"} or raises Rejected."""
    from jwcrypto import jwt as jjwt
    now = time.time() if now is None else now
    header, _ = jwt_parts(token)
    alg = str(header.get("alg", ""))
    if alg.lower() == "hs256":
        raise Rejected("no key file loaded, cannot decode HS256 keys (only jwks= is configured)")
    if alg.lower() != "rs256":
        raise Rejected(f"no support for alg={alg}")
    kid = header.get("kid")
    if not kid:
        raise Rejected("no kid in credential")
    table = slurm_key_table(jwks)
    if kid not in table:
        raise Rejected("could not find matching kid or decode failed")
    try:
        t = jjwt.JWT(jwt=token, key=table[kid], algs=["RS256"], check_claims=False)
    except Exception as e:  # noqa: BLE001
        raise Rejected(f"failed to verify jwt: {type(e).__name__}: {e}") from e
    claims = json.loads(t.claims)
    exp = claims.get("exp")
    exp = exp if isinstance(exp, int) and not isinstance(exp, bool) else 0  # jwt_get_grant_int
    if exp < now:
        raise Rejected("token expired")
    username = claims.get("sun") if isinstance(claims.get("sun"), str) else None
    if username is None and isinstance(claims.get("username"), str):
        username = claims["username"]
    if not username:
        raise Rejected("jwt_get_grant failure (neither sun nor username)")
    return {"username": username, "claims": claims}


# =====================================================================================
# AWS STS AssumeRoleWithWebIdentity
# =====================================================================================

ROLE_SESSION_NAME_RE = re.compile(r"[\w+=,.@-]{2,64}", re.ASCII)
SESSION_POLICY_MAX_CHARS = 2048  # plaintext limit for inline + managed session policies
STS_PARAMS = {"Action", "Version", "RoleArn", "RoleSessionName", "WebIdentityToken",
              "DurationSeconds", "Policy"}
STS_PARAM_PATTERNS = [re.compile(r"PolicyArns\.member\.\d+\.arn")]
WEB_IDENTITY_TOKEN_MAX_LIFETIME = 300


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    chunked: bool
    status: int = 0
    response: bytes = b""

    def form(self) -> dict[str, list[str]]:
        try:
            return urllib.parse.parse_qs(self.body.decode("utf-8"), keep_blank_values=True,
                                         strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            return {}


def session_policy_problems(text: str | None, actions: list[str], resources: list[str]) -> list[str]:
    """[] when `text` is an IAM policy that allows exactly `actions` on exactly `resources`."""
    if text is None:
        return ["no Policy parameter"]
    problems = []
    if len(text) > SESSION_POLICY_MAX_CHARS:
        problems.append(f"{len(text)} characters > {SESSION_POLICY_MAX_CHARS} (AWS refuses it)")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        return problems + [f"not JSON: {e}"]
    if not isinstance(doc, dict):
        return problems + ["not a JSON object"]
    if doc.get("Version") != "2012-10-17":
        problems.append(f"Version {doc.get('Version')!r} != '2012-10-17'")
    if set(doc) - {"Version", "Statement", "Id"}:
        problems.append(f"unexpected keys {sorted(set(doc) - {'Version', 'Statement', 'Id'})}")
    stmts = doc.get("Statement")
    stmts = [stmts] if isinstance(stmts, dict) else stmts
    if not isinstance(stmts, list) or not stmts:
        return problems + ["no Statement"]
    got_a: set[str] = set()
    got_r: set[str] = set()
    for i, s in enumerate(stmts):
        if not isinstance(s, dict):
            problems.append(f"Statement[{i}] is not an object")
            continue
        if s.get("Effect") != "Allow":
            problems.append(f"Statement[{i}] Effect {s.get('Effect')!r} != 'Allow'")
        for bad in ("NotAction", "NotResource", "Principal", "NotPrincipal"):
            if bad in s:
                problems.append(f"Statement[{i}] has {bad}")
        for key, acc in (("Action", got_a), ("Resource", got_r)):
            v = s.get(key)
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
                problems.append(f"Statement[{i}].{key} must be a string or a list of strings")
            else:
                acc.update(v)
    if got_a != set(actions):
        problems.append(f"actions {sorted(got_a)} != {sorted(actions)}")
    if got_r != set(resources):
        problems.append(f"resources {sorted(got_r)} != {sorted(resources)}")
    return problems


def check_sts_request(rec: Recorded, role_arn: str, max_duration: int, actions: list[str],
                      resources: list[str]) -> list[tuple[str, bool, str]]:
    """The recorded call against AWS's documented AssumeRoleWithWebIdentity contract."""
    out: list[tuple[str, bool, str]] = []
    ct = rec.headers.get("content-type", "")
    out.append(("STS call is a POST with a form-urlencoded body (and a Content-Length)",
                rec.method == "POST" and ct.startswith("application/x-www-form-urlencoded")
                and not rec.chunked and "content-length" in rec.headers,
                f"{rec.method} content-type={ct!r} chunked={rec.chunked}"))
    out.append(("STS call is unsigned (no Authorization header)", "authorization" not in rec.headers,
                rec.headers.get("authorization", "")[:40]))
    form = rec.form()
    single = {k: v[0] for k, v in form.items() if len(v) == 1}
    out.append(("each parameter once, none unknown (no ProviderId)",
                bool(form) and len(single) == len(form)
                and all(k in STS_PARAMS or any(p.fullmatch(k) for p in STS_PARAM_PATTERNS) for k in form),
                f"params {sorted(form)}"))
    out.append(("Action=AssumeRoleWithWebIdentity, Version=2011-06-15",
                single.get("Action") == "AssumeRoleWithWebIdentity" and single.get("Version") == "2011-06-15",
                f"{single.get('Action')!r} {single.get('Version')!r}"))
    out.append((f"RoleArn == {role_arn}", single.get("RoleArn") == role_arn, repr(single.get("RoleArn"))))
    d = single.get("DurationSeconds", "")
    out.append((f"DurationSeconds in [900, {max_duration}] (AWS minimum 900)",
                d.isdigit() and 900 <= int(d) <= max_duration, repr(d)))
    rsn = single.get("RoleSessionName", "")
    out.append(("RoleSessionName matches [\\w+=,.@-]{2,64}", bool(ROLE_SESSION_NAME_RE.fullmatch(rsn)), repr(rsn)))
    tok = single.get("WebIdentityToken", "")
    out.append(("WebIdentityToken length in [4, 20000]", 4 <= len(tok) <= 20000, str(len(tok))))
    problems = session_policy_problems(single.get("Policy"), actions, resources)
    out.append((f"inline session Policy allows exactly {actions} on {resources}", not problems,
                "; ".join(problems)))
    return out


def verify_web_identity_token(token: str, issuer: str, jwks: dict, expected_sub: str) -> dict:
    """PyJWT, ES256, against the issuer's JWKS: what STS checks, plus the broker's own
    promises (short lifetime, SPIFFE ID as sub)."""
    import jwt
    header, _ = jwt_parts(token)
    if header.get("alg") != "ES256":
        raise Rejected(f"alg {header.get('alg')!r} != ES256")
    keys = [k for k in jwks.get("keys", []) if k.get("kid") == header.get("kid")]
    if len(keys) != 1:
        raise Rejected(f"kid {header.get('kid')!r} matches {len(keys)} JWKS keys")
    key = jwt.PyJWK(keys[0], algorithm="ES256").key
    try:
        claims = jwt.decode(token, key, algorithms=["ES256"], audience=STS_AUDIENCE, issuer=issuer,
                            options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]})
    except jwt.PyJWTError as e:
        raise Rejected(f"{type(e).__name__}: {e}") from e
    if claims["sub"] != expected_sub:
        raise Rejected(f"sub {claims['sub']!r} != {expected_sub!r}")
    if not (0 < claims["exp"] - claims["iat"] <= WEB_IDENTITY_TOKEN_MAX_LIFETIME):
        raise Rejected(f"exp - iat = {claims['exp'] - claims['iat']} not in (0, {WEB_IDENTITY_TOKEN_MAX_LIFETIME}]")
    return claims


def parse_sts_response(body: bytes) -> dict:
    """AssumeRoleWithWebIdentityResponse XML -> credentials (Expiration as unix seconds)."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        raise Rejected(f"STS answered non-XML: {e}: {body[:200]!r}") from e
    ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
    if root.tag.endswith("ErrorResponse"):
        code = root.findtext(f".//{ns}Code")
        raise Rejected(f"STS error {code}: {root.findtext(f'.//{ns}Message')}")
    c = root.find(f".//{ns}Credentials")
    if c is None:
        raise Rejected("no Credentials in the STS response")
    exp = datetime.fromisoformat(c.findtext(f"{ns}Expiration").replace("Z", "+00:00"))
    return {
        "access_key_id": c.findtext(f"{ns}AccessKeyId"),
        "secret_access_key": c.findtext(f"{ns}SecretAccessKey"),
        "session_token": c.findtext(f"{ns}SessionToken"),
        "expiration_unix": int(exp.astimezone(timezone.utc).timestamp()),
        "assumed_role_arn": root.findtext(f".//{ns}AssumedRoleUser/{ns}Arn"),
    }


def caller_identity(endpoint: str, access_key_id: str, secret: str, session_token: str) -> dict:
    import boto3
    sts = boto3.client("sts", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id=access_key_id, aws_secret_access_key=secret,
                       aws_session_token=session_token)
    return sts.get_caller_identity()


# =====================================================================================
# Harness: moto_server, recording proxy, fake issuer, child processes
# =====================================================================================

class Children:
    """Every child process this script starts, stopped on exit (own process groups only)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def add(self, p: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            stop_group(p)


def stop_group(p: subprocess.Popen) -> None:
    """Stops a child started in its own process group: SIGTERM, then SIGKILL after 10 s."""
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)


CHILDREN = Children()


class MotoServer:
    def __init__(self, log: Path) -> None:
        binary = os.environ.get("MOTO_SERVER_BIN") or str(Path(sys.executable).with_name("moto_server"))
        if not Path(binary).is_file():
            binary = shutil.which("moto_server") or ""
        if not binary:
            raise RuntimeError("moto_server not found (pip install -r tests/crosscheck/requirements.txt)")
        self.port = cc.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")
        self.proc = CHILDREN.add(subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(self.port)], stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True))

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"moto_server not answering within {timeout:.0f}s")


class _Server:
    """A ThreadingHTTPServer on a free loopback port, in a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _read_body(h: BaseHTTPRequestHandler) -> tuple[bytes, bool]:
    if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
        out = b""
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return out, True
            out += h.rfile.read(size)
            h.rfile.readline()
    n = int(h.headers.get("Content-Length") or 0)
    return (h.rfile.read(n) if n else b""), False


class RecordingProxy(_Server):
    """Records each request (and the upstream answer) and forwards it to `upstream`."""

    def __init__(self, upstream: str) -> None:
        self.records: list[Recorded] = []
        self.lock = threading.Lock()
        proxy = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _forward(self) -> None:
                body, chunked = _read_body(self)
                rec = Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                               body, chunked)
                fwd = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("host", "content-length", "transfer-encoding", "connection")}
                req = urllib.request.Request(upstream + self.path, data=body if self.command != "GET" else None,
                                             headers=fwd, method=self.command)
                try:
                    with urllib.request.urlopen(req, timeout=CALL_TIMEOUT) as r:
                        status, data, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
                except urllib.error.HTTPError as e:
                    status, data, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
                rec.status, rec.response = status, data
                with proxy.lock:
                    proxy.records.append(rec)
                self.send_response(status)
                if ctype:
                    self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

        super().__init__(H)

    def sts_calls(self) -> list[Recorded]:
        with self.lock:
            return [r for r in self.records
                    if r.form().get("Action") == ["AssumeRoleWithWebIdentity"]]

    def clear(self) -> None:
        with self.lock:
            self.records.clear()


class FakeIssuer(_Server):
    """Discovery + JWKS for Python-minted test tokens (an EC P-256 and an RSA-2048 key)."""

    def __init__(self) -> None:
        import jwt
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        self.ec_key = ec.generate_private_key(ec.SECP256R1())
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec_key.public_key()))
        rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa_key.public_key()))
        ec_jwk.update(kid="ec-1", alg="ES256", use="sig")
        rsa_jwk.update(kid="rsa-1", alg="RS256", use="sig")
        self.jwks = {"keys": [ec_jwk, rsa_jwk]}
        self.discovery_override: dict | None = None
        me = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                if self.path == "/.well-known/openid-configuration":
                    doc = me.discovery_override or {
                        "issuer": me.url, "jwks_uri": f"{me.url}/jwks.json",
                        "id_token_signing_alg_values_supported": ["ES256", "RS256"]}
                elif self.path == "/jwks.json":
                    doc = me.jwks
                else:
                    self.send_error(404)
                    return
                data = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(H)

    def mint_jwcrypto(self, claims: dict, alg: str = "ES256", kid: str | None = "ec-1", key=None) -> str:
        """Signs with jwcrypto (the k8s verifier checks with PyJWT)."""
        from jwcrypto import jwk, jwt as jjwt
        key = key or (self.ec_key if alg.startswith("ES") else self.rsa_key)
        header = {"alg": alg, "typ": "JWT"}
        if kid:
            header["kid"] = kid
        t = jjwt.JWT(header=header, claims=claims)
        t.make_signed_token(jwk.JWK.from_pyca(key))
        return t.serialize()

    def mint_pyjwt(self, claims: dict, alg: str = "RS256", kid: str | None = "rsa-1", key=None) -> str:
        """Signs with PyJWT (the Slurm verifier checks with jwcrypto)."""
        import jwt
        key = key or (self.ec_key if alg.startswith("ES") else self.rsa_key)
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid else None)


# =====================================================================================
# Self-test: each verifier against tokens minted here
# =====================================================================================

def expect_ok(r: cc.Report, name: str, fn: Callable[[], Any]) -> Any:
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001
        r.check(name, False, f"{type(e).__name__}: {e}")
        return None
    r.check(name, True)
    return out


def selftest_k8s(r: cc.Report, iss: FakeIssuer) -> None:
    print("[1] self-test: Kubernetes JWT authenticator (config from deploy/kubernetes/authentication-config.yaml)")
    import yaml
    raw = yaml.safe_load(AUTHN_CONFIG.read_text("utf-8"))
    a = expect_ok(r, "authentication-config.yaml passes the apiserver's validation",
                  lambda: parse_authentication_config(raw))
    if a is None:
        return
    r.check("config: audiences [gpu-cluster], username sub/'spiffe:', groups groups/'oidc:'",
            a.audiences == [K8S_AUDIENCE] and a.username == {"claim": "sub", "prefix": "spiffe:"}
            and a.groups == {"claim": "groups", "prefix": "oidc:"}, repr((a.audiences, a.username, a.groups)))
    r.check("config: a claimValidationRule pins sub to spiffe://example.org/",
            any("spiffe://example.org/" in x.expression for x in a.claim_rules))
    a = load_authentication_config(AUTHN_CONFIG, issuer_url_override=iss.url)
    now = int(time.time())

    def claims(**kw):
        c = {"iss": iss.url, "sub": PROVISIONER_ID, "aud": K8S_AUDIENCE, "iat": now, "nbf": now,
             "exp": now + 600, "jti": "j-1", "groups": K8S_GROUPS, "scope": K8S_SCOPE}
        for k, v in kw.items():
            if v is None:
                c.pop(k, None)
            else:
                c[k] = v
        return c

    def auth(tok, cfg=a, **kw):
        return k8s_authenticate(tok, cfg, **kw)

    user = expect_ok(r, "ES256 token -> UserInfo", lambda: auth(iss.mint_jwcrypto(claims())))
    r.check("username spiffe:spiffe://example.org/gpu/provisioner, groups [oidc:kueue:ml-training]",
            user is not None and user["username"] == "spiffe:" + PROVISIONER_ID
            and user["groups"] == ["oidc:kueue:ml-training"], repr(user))
    expect_ok(r, "RS256 token accepted too (apiserver allows RS/ES/PS)",
              lambda: auth(iss.mint_jwcrypto(claims(), alg="RS256", kid="rsa-1")))
    expect_ok(r, "token without kid: every JWKS key tried", lambda: auth(iss.mint_jwcrypto(claims(), kid=None)))
    u = expect_ok(r, "groups as a single string accepted", lambda: auth(iss.mint_jwcrypto(claims(groups="kueue:x"))))
    r.check("string group prefixed", u is not None and u["groups"] == ["oidc:kueue:x"], repr(u))
    u = expect_ok(r, "no groups claim: user without groups", lambda: auth(iss.mint_jwcrypto(claims(groups=None))))
    r.check("no groups -> []", u is not None and u["groups"] == [], repr(u))
    expect_ok(r, "aud array containing gpu-cluster accepted (MatchAny)",
              lambda: auth(iss.mint_jwcrypto(claims(aud=["x", K8S_AUDIENCE]))))
    expect_ok(r, "nbf 30s ahead accepted (1 min leeway)", lambda: auth(iss.mint_jwcrypto(claims(nbf=now + 30))))
    expect_ok(r, "iat in the future not checked by the apiserver",
              lambda: auth(iss.mint_jwcrypto(claims(iat=now + 3600))))
    bad = {
        "groups [1] rejected": claims(groups=[1]),
        "groups object rejected": claims(groups={"a": "b"}),
        "aud other-cluster rejected": claims(aud="other-cluster"),
        "expired token rejected": claims(exp=now - 1),
        "token without exp rejected": claims(exp=None),
        "exp as a string rejected": claims(exp=str(now + 600)),
        "nbf 2 min ahead rejected": claims(nbf=now + 120),
        "sub in another trust domain rejected by claimValidationRules": claims(sub="spiffe://evil.org/gpu/provisioner"),
        "sub missing rejected": claims(sub=None),
        "sub not a string rejected": claims(sub=["spiffe://example.org/x"]),
    }
    for name, c in bad.items():
        r.expect_raises(name, Rejected, lambda c=c: auth(iss.mint_jwcrypto(c)))
    r.expect_raises("other issuer: not this authenticator", NotThisIssuer,
                    lambda: auth(iss.mint_jwcrypto(claims(iss="https://other.example"))))
    import jwt as pyjwt
    hs = pyjwt.encode(claims(), "k" * 32, algorithm="HS256", headers={"kid": "ec-1"})
    r.expect_raises("HS256 rejected (not an apiserver alg)", Rejected, lambda: auth(hs))
    none = cc.b64url(b'{"alg":"none","kid":"ec-1"}') + "." + cc.b64url(json.dumps(claims()).encode()) + "."
    r.expect_raises("alg none rejected", Rejected, lambda: auth(none))
    r.expect_raises("unknown kid rejected", Rejected, lambda: auth(iss.mint_jwcrypto(claims(), kid="nope")))
    r.expect_raises("ES256 header on the RSA key's kid rejected", Rejected,
                    lambda: auth(iss.mint_jwcrypto(claims(), alg="ES256", kid="rsa-1")))
    good = iss.mint_jwcrypto(claims())
    h, p, s = good.split(".")
    tampered = h + "." + cc.b64url(cc.b64url_decode(p).replace(b"kueue", b"kueuf")) + "." + s
    r.expect_raises("altered payload rejected", Rejected, lambda: auth(tampered))
    r.expect_raises("expired at a later clock", Rejected, lambda: auth(good, now=now + 601))
    iss.discovery_override = {"issuer": iss.url + "/", "jwks_uri": f"{iss.url}/jwks.json"}
    try:
        r.expect_raises("discovery issuer != issuer url rejected", Rejected, lambda: auth(good))
    finally:
        iss.discovery_override = None

    # Rules the repo's file does not use, on synthetic configs (same parser, same evaluator).
    def cfg(**jwt_over):
        base = {"issuer": {"url": "https://broker.example", "audiences": [K8S_AUDIENCE]},
                "claimMappings": {"username": {"claim": "sub", "prefix": ""}}}
        base.update(jwt_over)
        return {"apiVersion": "apiserver.config.k8s.io/v1", "kind": "AuthenticationConfiguration", "jwt": [base]}

    c2 = parse_authentication_config(cfg(
        claimValidationRules=[{"claim": "scope", "requiredValue": K8S_SCOPE}],
        userValidationRules=[{"expression": "!user.username.startsWith('system:')", "message": "no system:"}],
        claimMappings={"username": {"expression": "'spiffe:' + claims.sub"},
                       "groups": {"expression": "claims.groups.map(g, 'oidc:' + g)"},
                       "uid": {"claim": "jti"},
                       "extra": [{"key": "example.org/intent", "valueExpression": "claims.scope"}]}),
        issuer_url_override=iss.url)
    u = expect_ok(r, "CEL username/groups/uid/extra mappings + requiredValue rule",
                  lambda: auth(iss.mint_jwcrypto(claims()), cfg=c2))
    r.check("CEL mappings give the same user plus uid/extra",
            u is not None and u == {"username": "spiffe:" + PROVISIONER_ID, "uid": "j-1",
                                    "groups": ["oidc:kueue:ml-training"], "extra": {"example.org/intent": [K8S_SCOPE]}},
            repr(u))
    r.expect_raises("requiredValue mismatch rejected", Rejected,
                    lambda: auth(iss.mint_jwcrypto(claims(scope="queue:admin")), cfg=c2))
    c3 = parse_authentication_config(cfg(userValidationRules=[
        {"expression": "!user.username.startsWith('system:')", "message": "no system:"}]), issuer_url_override=iss.url)
    r.expect_raises("userValidationRules reject a system: username", Rejected,
                    lambda: auth(iss.mint_jwcrypto(claims(sub="system:admin")), cfg=c3))
    invalid = {
        "http issuer url": cfg(issuer={"url": "http://broker.example", "audiences": ["a"]}),
        "claim without prefix": cfg(claimMappings={"username": {"claim": "sub"}}),
        "prefix with expression": cfg(claimMappings={"username": {"expression": "claims.sub", "prefix": "x"}}),
        "claim and expression": cfg(claimMappings={"username": {"claim": "sub", "prefix": "", "expression": "claims.sub"}}),
        "two audiences without MatchAny": cfg(issuer={"url": "https://b.example", "audiences": ["a", "b"]}),
        "no audiences": cfg(issuer={"url": "https://b.example", "audiences": []}),
        "CEL that does not compile": cfg(claimValidationRules=[{"expression": "claims.sub.startsWith(", "message": "m"}]),
        "message on a claim rule": cfg(claimValidationRules=[{"claim": "sub", "requiredValue": "x", "message": "m"}]),
    }
    for name, doc in invalid.items():
        r.expect_raises(f"config refused: {name}", ValueError, lambda doc=doc: parse_authentication_config(doc))


def selftest_slurm(r: cc.Report, iss: FakeIssuer) -> None:
    print("[2] self-test: Slurm auth/jwt (jwks=FILE) with jwcrypto")
    import jwt as pyjwt
    now = int(time.time())
    base = {"iss": iss.url, "sub": PROVISIONER_ID, "aud": SLURM_AUDIENCE, "iat": now, "nbf": now,
            "exp": now + 600, "jti": "j-2", "sun": SLURM_USER}
    out = expect_ok(r, "RS256 token with kid and sun accepted",
                    lambda: slurm_authenticate(iss.mint_pyjwt(base), iss.jwks))
    r.check("Slurm user == gpu-prov", out is not None and out["username"] == SLURM_USER, repr(out))
    u = expect_ok(r, "`username` used when there is no `sun`",
                  lambda: slurm_authenticate(iss.mint_pyjwt({**base, "sun": None, "username": "bob"}), iss.jwks))
    r.check("username fallback", u is not None and u["username"] == "bob", repr(u))
    no_alg = {"keys": [{k: v for k, v in x.items() if k != "alg"} for x in iss.jwks["keys"]]}
    r.expect_raises("RSA JWK without alg is ignored by Slurm -> no key", Rejected,
                    lambda: slurm_authenticate(iss.mint_pyjwt(base), no_alg))
    bad_rs = {"keys": [{"kty": "RSA", "alg": "RS256", "e": "AQAB", "n": "xx"}]}
    r.expect_raises("RS256 JWK without kid is fatal for slurmctld", Rejected,
                    lambda: slurm_key_table(bad_rs))
    cases = {
        "ES256 token rejected (Slurm: RS256/HS256 only)": iss.mint_pyjwt(base, alg="ES256", kid="ec-1"),
        "HS256 token rejected (no jwt_key configured)": pyjwt.encode(base, "k" * 32, algorithm="HS256"),
        "token without kid rejected": iss.mint_pyjwt(base, kid=None),
        "unknown kid rejected": iss.mint_pyjwt(base, kid="nope"),
        "other RSA key under the same kid rejected": iss.mint_pyjwt(base, key=iss.other_rsa),
        "expired token rejected": iss.mint_pyjwt({**base, "exp": now - 1}),
        "token without exp rejected": iss.mint_pyjwt({k: v for k, v in base.items() if k != "exp"}),
        "token without sun/username rejected": iss.mint_pyjwt({k: v for k, v in base.items() if k != "sun"}),
    }
    for name, tok in cases.items():
        r.expect_raises(name, Rejected, lambda tok=tok: slurm_authenticate(tok, iss.jwks))
    good = iss.mint_pyjwt(base)
    h, p, s = good.split(".")
    tampered = h + "." + cc.b64url(cc.b64url_decode(p).replace(b"gpu-prov", b"gpu-prow")) + "." + s
    r.expect_raises("altered payload rejected", Rejected, lambda: slurm_authenticate(tampered, iss.jwks))


def selftest_aws(r: cc.Report, iss: FakeIssuer, moto: MotoServer, proxy: RecordingProxy) -> None:
    pol = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": S3_ACTIONS, "Resource": S3_RESOURCES}]})
    r.check("session policy check accepts the exact policy", session_policy_problems(pol, S3_ACTIONS, S3_RESOURCES) == [])
    wrong = {
        "extra action": {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": S3_RESOURCES}]},
        "bucket-wide resource": {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::training-data*"}]},
        "NotAction": {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "NotAction": "iam:*", "Action": S3_ACTIONS, "Resource": S3_RESOURCES}]},
        "old Version": {"Version": "2008-10-17", "Statement": [
            {"Effect": "Allow", "Action": S3_ACTIONS, "Resource": S3_RESOURCES}]},
    }
    for name, doc in wrong.items():
        r.check(f"session policy check flags: {name}", session_policy_problems(json.dumps(doc), S3_ACTIONS, S3_RESOURCES) != [])
    r.check("session policy check flags > 2048 characters",
            session_policy_problems(pol[:-1] + " " * 2100 + "}", S3_ACTIONS, S3_RESOURCES) != [])
    r.check("RoleSessionName pattern: SPIFFE ID refused, short/long refused, lease-style accepted",
            not ROLE_SESSION_NAME_RE.fullmatch(MODEL_RUNTIME_ID) and not ROLE_SESSION_NAME_RE.fullmatch("a")
            and not ROLE_SESSION_NAME_RE.fullmatch("a" * 65) and not ROLE_SESSION_NAME_RE.fullmatch("é" * 4)
            and bool(ROLE_SESSION_NAME_RE.fullmatch("model-runtime@lease.0f3a_x=1,2+3")))

    now = int(time.time())
    tok = iss.mint_jwcrypto({"iss": iss.url, "sub": MODEL_RUNTIME_ID, "aud": STS_AUDIENCE, "iat": now,
                             "nbf": now, "exp": now + 300, "jti": "j-3"})
    claims = expect_ok(r, "Python-signed web identity token verifies (PyJWT, ES256, aud, iss)",
                       lambda: verify_web_identity_token(tok, iss.url, iss.jwks, MODEL_RUNTIME_ID))
    r.check("token sub is the model runtime", claims is not None and claims["sub"] == MODEL_RUNTIME_ID)
    long_tok = iss.mint_jwcrypto({"iss": iss.url, "sub": MODEL_RUNTIME_ID, "aud": STS_AUDIENCE, "iat": now,
                                  "nbf": now, "exp": now + 3600, "jti": "j-4"})
    r.expect_raises("web identity token living > 5 min flagged", Rejected,
                    lambda: verify_web_identity_token(long_tok, iss.url, iss.jwks, MODEL_RUNTIME_ID))
    rs_tok = iss.mint_jwcrypto({"iss": iss.url, "sub": MODEL_RUNTIME_ID, "aud": "sts", "iat": now,
                                "nbf": now, "exp": now + 300, "jti": "j-5"})
    r.expect_raises("web identity token with aud 'sts' rejected", Rejected,
                    lambda: verify_web_identity_token(rs_tok, iss.url, iss.jwks, MODEL_RUNTIME_ID))

    def call(params: dict) -> tuple[int, bytes]:
        req = urllib.request.Request(proxy.url + "/", data=urllib.parse.urlencode(params).encode(),
                                     headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=CALL_TIMEOUT) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    proxy.clear()
    params = {"Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15", "RoleArn": ROLE_ARN,
              "RoleSessionName": "model-runtime.selftest", "WebIdentityToken": tok,
              "DurationSeconds": str(S3_TTL), "Policy": pol}
    t0 = int(time.time())
    status, body = call(params)
    if not r.check("AssumeRoleWithWebIdentity through the proxy -> 200", status == 200, f"{status} {body[:300]!r}"):
        return
    calls = proxy.sts_calls()
    r.check("proxy recorded exactly one STS call", len(calls) == 1, str(len(calls)))
    for name, ok, detail in check_sts_request(calls[0], ROLE_ARN, S3_TTL, S3_ACTIONS, S3_RESOURCES):
        r.check(f"recorded call: {name}", ok, detail)
    creds = expect_ok(r, "moto's XML answer parses (Credentials, Expiration, AssumedRoleUser)",
                      lambda: parse_sts_response(calls[0].response))
    if creds is None:
        return
    r.check("Expiration ~ now + 900 (moto honours DurationSeconds)",
            t0 + S3_TTL - 5 <= creds["expiration_unix"] <= int(time.time()) + S3_TTL + 5,
            f"{creds['expiration_unix'] - t0}")
    ident = expect_ok(r, "returned keys work: sts.get_caller_identity at moto",
                      lambda: caller_identity(moto.url, creds["access_key_id"], creds["secret_access_key"],
                                              creds["session_token"]))
    want = "arn:aws:sts::123456789012:assumed-role/model-runtime-datasets/model-runtime.selftest"
    r.check("caller is the assumed role with that session name", ident is not None and ident.get("Arn") == want,
            repr(ident and ident.get("Arn")))
    made_up = expect_ok(r, "made-up keys: moto answers with its default user (so the ARN check means something)",
                        lambda: caller_identity(moto.url, "ASIAXXXXXXXXXXXXXXXX", "x" * 40, "t"))
    r.check("made-up keys are not the assumed role", made_up is not None and made_up.get("Arn") != want,
            repr(made_up and made_up.get("Arn")))
    # moto itself is lax: these pass moto, and only check_sts_request catches them.
    proxy.clear()
    status, _ = call({**params, "DurationSeconds": "60", "RoleSessionName": "x"})
    flagged = {n for n, ok, _ in check_sts_request(proxy.sts_calls()[0], ROLE_ARN, S3_TTL, S3_ACTIONS, S3_RESOURCES)
               if not ok} if proxy.sts_calls() else set()
    r.check("moto accepts DurationSeconds=60 and a 1-char session name; the checks flag both",
            status == 200 and any("DurationSeconds" in n for n in flagged) and any("RoleSessionName" in n for n in flagged),
            f"status {status}, flagged {sorted(flagged)}")
    proxy.clear()


# =====================================================================================
# End to end against `spiffe-broker dev`
# =====================================================================================

class DevBroker(cc.Broker):
    """crosscheck.Broker (its argv, stdout pump, bounded `ready` wait, stop) plus extra
    `dev` flags: its __init__ builds the argv itself, so the one Popen call it makes gets
    `extra_args` appended through a module-local shim."""

    def __init__(self, binary: Path, state_dir: Path, grpc: str, http: str, extra_args: list[str]) -> None:
        real = cc.subprocess

        class AppendArgs:
            def __getattr__(self, name):
                return getattr(real, name)

            @staticmethod
            def Popen(argv, **kwargs):
                return real.Popen([*argv, *extra_args], **kwargs)

        with mock.patch.object(cc, "subprocess", AppendArgs()):
            super().__init__(binary, state_dir, grpc, http)
        CHILDREN.procs.append(self.proc)  # its own session (start_new_session) -> own group


def write_svid_files(state: Path, name: str, out: Path) -> str:
    """X.509-SVID + bundle from STATE/workloads/<name>.sock via py-spiffe -> PEM files."""
    from cryptography.hazmat.primitives import serialization
    from spiffe import TrustDomain, WorkloadApiClient
    out.mkdir(parents=True, exist_ok=True)
    client = WorkloadApiClient(socket_path=f"unix://{state / 'workloads' / (name + '.sock')}",
                               default_timeout=CALL_TIMEOUT)
    try:
        svid = client.fetch_x509_svid()
        bundle = client.fetch_x509_context().x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))
    finally:
        client.close()
    pem = serialization.Encoding.PEM
    (out / "svid.pem").write_bytes(b"".join(c.public_bytes(pem) for c in svid.cert_chain))
    (out / "svid.key").write_bytes(svid.private_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.chmod(out / "svid.key", 0o600)
    (out / "bundle.pem").write_bytes(b"".join(c.public_bytes(pem) for c in bundle.x509_authorities))
    return str(svid.spiffe_id)


@dataclass
class Cli:
    binary: Path
    grpc_addr: str

    def command(self, files: Path, *args: str) -> list[str]:
        return [str(self.binary), "request", *args, "--broker", self.grpc_addr,
                "--svid-cert", str(files / "svid.pem"), "--svid-key", str(files / "svid.key"),
                "--bundle", str(files / "bundle.pem")]

    def run(self, files: Path, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items()
               if k not in ("SPIFFE_ENDPOINT_SOCKET", "SPIFFE_BROKER_ADDR", "SPIFFE_BROKER_ID")}
        env["RUST_LOG"] = "warn"
        return subprocess.run(self.command(files, *args), capture_output=True, env=env, timeout=60,
                              stdin=subprocess.DEVNULL)


def issued(r: cc.Report, what: str, p: subprocess.CompletedProcess) -> dict | None:
    if not r.check(f"{what}: request exited 0", p.returncode == 0,
                   f"rc={p.returncode} stderr={p.stderr.decode('utf-8', 'replace').strip()}"):
        return None
    out = p.stdout.decode("utf-8", "replace").strip()
    try:
        v = json.loads(out)
    except json.JSONDecodeError as e:
        r.check(f"{what}: one JSON object", False, f"{e}: {out[:300]!r}")
        return None
    r.check(f"{what}: one JSON object", isinstance(v, dict))
    return v if isinstance(v, dict) else None


def profile_config(state: Path, name: str) -> dict:
    """A profile's table in the dev broker's rendered STATE/config.toml ({} if absent)."""
    try:
        cfg = tomllib.loads((state / "config.toml").read_text("utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return next((p for p in cfg.get("profiles", []) if p.get("name") == name), {})


def profile_ttls(state: Path, name: str) -> tuple[int | None, int | None]:
    """(default_ttl, max_ttl) of a profile, from STATE/config.toml."""
    p = profile_config(state, name)
    d, m = p.get("default_ttl"), p.get("max_ttl")
    return (parse_duration(d) if d else None), (parse_duration(m) if m else None)


def token_common(r: cc.Report, what: str, v: dict, claims: dict, header: dict, alg: str, kty: str,
                 jwks: dict, issuer: str, sub: str, aud: str, t0: int, t1: int) -> None:
    keys = {k.get("kid"): k for k in jwks.get("keys", [])}
    r.check(f"{what}: credential_kind token, token_type and key_id set",
            v.get("credential_kind") == "token" and bool(v.get("token_type")) and bool(v.get("key_id")),
            repr({k: v.get(k) for k in ("credential_kind", "token_type", "key_id")}))
    r.check(f"{what}: header alg {alg}, kid == key_id, a {kty} key in the JWKS",
            header.get("alg") == alg and header.get("kid") == v.get("key_id")
            and keys.get(header.get("kid"), {}).get("kty") == kty, repr(header))
    r.check(f"{what}: iss/sub/aud", claims.get("iss") == issuer and claims.get("sub") == sub
            and claims.get("aud") == aud, repr({k: claims.get(k) for k in ("iss", "sub", "aud")}))
    r.check(f"{what}: jti a non-empty string", isinstance(claims.get("jti"), str) and bool(claims.get("jti")))
    iat, nbf, exp = claims.get("iat"), claims.get("nbf"), claims.get("exp")
    r.check(f"{what}: integer iat/nbf/exp, iat in the request's window, nbf <= iat < exp",
            all(isinstance(x, int) for x in (iat, nbf, exp)) and t0 - 5 <= iat <= t1 + 5 and nbf <= iat < exp,
            f"iat={iat} nbf={nbf} exp={exp} window {t0}..{t1}")
    r.check(f"{what}: exp == credential_expires_at_unix", exp == v.get("credential_expires_at_unix"),
            f"{exp} vs {v.get('credential_expires_at_unix')}")


def e2e_jwks(r: cc.Report, http_addr: str) -> tuple[str, dict] | None:
    print("[5] discovery and JWKS (EC P-256 ES256 + RSA RS256)")
    disc = cc.http_json(f"http://{http_addr}/.well-known/openid-configuration")
    issuer = disc.get("issuer")
    r.check("issuer == http://<http addr>", issuer == f"http://{http_addr}", repr(issuer))
    algs = disc.get("id_token_signing_alg_values_supported", [])
    r.check("discovery lists ES256 and RS256", "ES256" in algs and "RS256" in algs, repr(algs))
    jwks = cc.http_json(disc["jwks_uri"])
    keys = jwks.get("keys", [])
    private = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
    r.check("no private key material in the JWKS", all(not (private & set(k)) for k in keys))
    r.check("every key has a unique kid", len({k.get("kid") for k in keys}) == len(keys) and all(k.get("kid") for k in keys))
    ec = [k for k in keys if k.get("kty") == "EC"]
    rsa = [k for k in keys if k.get("kty") == "RSA"]
    r.check("EC keys are P-256 (alg ES256 where stated)",
            bool(ec) and all(k.get("crv") == "P-256" and k.get("alg", "ES256") == "ES256" for k in ec), json.dumps(ec))
    r.check("an RSA key with alg RS256, use sig, kid", any(k.get("alg") == "RS256" and k.get("use") == "sig" for k in rsa),
            json.dumps(rsa)[:300])
    nbits = [len(cc.b64url_decode(k["n"]).lstrip(b"\0")) * 8 for k in rsa if k.get("n")]
    r.check("RSA modulus >= 2048 bits, e = AQAB", bool(nbits) and min(nbits) >= 2048
            and all(k.get("e") == "AQAB" for k in rsa), f"{nbits}")
    r.check("only EC and RSA keys", len(ec) + len(rsa) == len(keys), repr([k.get("kty") for k in keys]))
    return issuer, jwks


def e2e_k8s(r: cc.Report, cli: Cli, files: Path, state: Path, issuer: str, jwks: dict) -> None:
    print("[6] gpu-queue-k8s -> kube-apiserver JWT authenticator")
    t0 = int(time.time())
    p = cli.run(files, "--profile", K8S_PROFILE, "--scope", K8S_SCOPE, *SUBMIT_INTENT, "--output", "json")
    t1 = int(time.time())
    v = issued(r, K8S_PROFILE, p)
    if v is None:
        return
    token = v.get("token", "")
    try:
        header, claims = jwt_parts(token)
    except Rejected as e:
        r.check("gpu-queue-k8s: token is a JWT", False, str(e))
        return
    print("        claims " + json.dumps(claims, sort_keys=True))
    token_common(r, K8S_PROFILE, v, claims, header, "ES256", "EC", jwks, issuer, PROVISIONER_ID,
                 K8S_AUDIENCE, t0, t1)
    r.check("gpu-queue-k8s: groups == [kueue:ml-training], scope == queue:submit",
            claims.get("groups") == K8S_GROUPS and claims.get("scope") == K8S_SCOPE,
            repr((claims.get("groups"), claims.get("scope"))))
    d, m = profile_ttls(state, K8S_PROFILE)
    if d is not None:
        r.check(f"gpu-queue-k8s: exp - iat == profile default_ttl {d}s", claims["exp"] - claims["iat"] == d,
                str(claims["exp"] - claims["iat"]))
    a = load_authentication_config(AUTHN_CONFIG, issuer_url_override=issuer)
    user = expect_ok(r, "apiserver rules from authentication-config.yaml accept the token",
                     lambda: k8s_authenticate(token, a))
    print(f"        UserInfo {user}")
    r.check("UserInfo username spiffe:spiffe://example.org/gpu/provisioner",
            user is not None and user["username"] == "spiffe:" + PROVISIONER_ID, repr(user))
    r.check("UserInfo groups [oidc:kueue:ml-training] (the RoleBinding's subject)",
            user is not None and user["groups"] == ["oidc:kueue:ml-training"], repr(user))
    r.expect_raises("apiserver: rejected once expired", Rejected,
                    lambda: k8s_authenticate(token, a, now=claims["exp"] + 1))
    other = load_authentication_config(AUTHN_CONFIG, issuer_url_override=issuer)
    other.audiences = ["other-cluster"]
    r.expect_raises("apiserver with audiences [other-cluster] rejects it", Rejected, lambda: k8s_authenticate(token, other))
    h, pl, s = token.split(".")
    tampered = h + "." + cc.b64url(cc.b64url_decode(pl).replace(b"provisioner", b"provisionex")) + "." + s
    if r.check("altered a payload byte (sub)", tampered != token):
        r.expect_raises("apiserver: altered sub rejected (signature)", Rejected, lambda: k8s_authenticate(tampered, a))


def e2e_slurm(r: cc.Report, cli: Cli, files: Path, state: Path, issuer: str, jwks: dict) -> None:
    print("[7] slurm-submit -> Slurm auth/jwt (jwks)")
    # The contract names no scope for this profile: ask for none if it has default scopes,
    # else for its first scope (the dev config's slurm-submit has scopes but no defaults).
    cfg = profile_config(state, SLURM_PROFILE)
    scopes = [] if cfg.get("default_scopes") else [x for sc in cfg.get("scopes", [])[:1] for x in ("--scope", sc)]

    def request(*extra: str) -> subprocess.CompletedProcess:
        p = cli.run(files, "--profile", SLURM_PROFILE, *scopes, *SUBMIT_INTENT, *extra, "--output", "json")
        if p.returncode != 0:  # the profile may not take an intent
            q = cli.run(files, "--profile", SLURM_PROFILE, *scopes, *extra, "--output", "json")
            if q.returncode == 0:
                print("        (issued without --intent-*; with it: "
                      f"{p.stderr.decode('utf-8', 'replace').strip()[:200]})")
                return q
        return p

    t0 = int(time.time())
    v = issued(r, SLURM_PROFILE, request())
    t1 = int(time.time())
    if v is None:
        return
    token = v.get("token", "")
    try:
        header, claims = jwt_parts(token)
    except Rejected as e:
        r.check("slurm-submit: token is a JWT", False, str(e))
        return
    print("        claims " + json.dumps(claims, sort_keys=True))
    token_common(r, SLURM_PROFILE, v, claims, header, "RS256", "RSA", jwks, issuer, PROVISIONER_ID,
                 SLURM_AUDIENCE, t0, t1)
    out = expect_ok(r, "Slurm auth/jwt accepts it (jwcrypto, RS256 key from the JWKS)",
                    lambda: slurm_authenticate(token, jwks))
    r.check("Slurm user (sun) == gpu-prov", out is not None and out["username"] == SLURM_USER
            and claims.get("sun") == SLURM_USER, repr(out and out["username"]))
    d, m = profile_ttls(state, SLURM_PROFILE)
    life = claims["exp"] - claims["iat"]
    r.check(f"slurm-submit: exp - iat ({life}s) <= profile TTL (default {d}, max {m})",
            life > 0 and (d is None or life == d) and (m is None or life <= m), f"{life}")
    v5 = issued(r, f"{SLURM_PROFILE} --ttl 5m", request("--ttl", "5m"))
    if v5 is not None:
        try:
            _, c5 = jwt_parts(v5.get("token", ""))
            r.check("slurm-submit --ttl 5m: exp - iat == 300", c5["exp"] - c5["iat"] == 300,
                    str(c5["exp"] - c5["iat"]))
        except (Rejected, KeyError, TypeError) as e:
            r.check("slurm-submit --ttl 5m: exp - iat == 300", False, repr(e))
    r.expect_raises("Slurm: rejected once expired", Rejected,
                    lambda: slurm_authenticate(token, jwks, now=claims["exp"] + 1))
    ec_only = {"keys": [k for k in jwks.get("keys", []) if k.get("kty") != "RSA"]}
    r.expect_raises("Slurm with a JWKS lacking the RSA key rejects it", Rejected,
                    lambda: slurm_authenticate(token, ec_only))


def e2e_s3(r: cc.Report, cli: Cli, files: Path, issuer: str, jwks: dict, moto: MotoServer,
           proxy: RecordingProxy) -> None:
    print("[8] s3-datasets -> STS AssumeRoleWithWebIdentity (moto)")
    args = ["--profile", S3_PROFILE, *READ_INTENT, "--scope", S3_ACTIONS[0], "--ttl", "15m"]
    proxy.clear()
    t0 = int(time.time())
    v = issued(r, S3_PROFILE, cli.run(files, *args, "--output", "json"))
    t1 = int(time.time())
    if v is None:
        return
    secret = v.get("secret") if isinstance(v.get("secret"), dict) else {}
    names = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
    r.check("s3-datasets: credential_kind secret, backend_handle set",
            v.get("credential_kind") == "secret" and isinstance(v.get("backend_handle"), str)
            and bool(v.get("backend_handle")), repr({k: v.get(k) for k in ("credential_kind", "backend_handle")}))
    r.check("secret has aws_access_key_id, aws_secret_access_key, aws_session_token (strings)",
            all(isinstance(secret.get(n), str) and secret.get(n) for n in names)
            and all(isinstance(x, str) for x in secret.values()), repr(sorted(secret)))
    ce = v.get("credential_expires_at_unix")
    r.check("credential_expires_at_unix ~ now + 900", isinstance(ce, int) and t0 + S3_TTL - 30 <= ce <= t1 + S3_TTL + 30,
            f"{ce} (request at {t0}..{t1})")
    calls = proxy.sts_calls()
    if not r.check("the broker made exactly one AssumeRoleWithWebIdentity call", len(calls) == 1, str(len(calls))):
        return
    rec = calls[0]
    for name, ok, detail in check_sts_request(rec, ROLE_ARN, S3_TTL, S3_ACTIONS, S3_RESOURCES):
        r.check(f"STS call: {name}", ok, detail)
    form = {k: x[0] for k, x in rec.form().items()}
    print(f"        RoleSessionName {form.get('RoleSessionName')!r} DurationSeconds {form.get('DurationSeconds')} "
          f"Policy {form.get('Policy')}")
    tok = form.get("WebIdentityToken", "")
    claims = expect_ok(r, "WebIdentityToken verifies with PyJWT (ES256, aud sts.amazonaws.com, iss, <= 5 min)",
                       lambda: verify_web_identity_token(tok, issuer, jwks, MODEL_RUNTIME_ID))
    if claims is not None:
        print("        token claims " + json.dumps(claims, sort_keys=True))
        r.check("WebIdentityToken aud is the string sts.amazonaws.com", claims.get("aud") == STS_AUDIENCE)
    def sts_answer() -> dict:
        if rec.status != 200:
            raise Rejected(f"status {rec.status}: {rec.response[:300]!r}")
        return parse_sts_response(rec.response)

    sts = expect_ok(r, "moto answered 200 with credentials", sts_answer)
    if sts is not None:
        r.check("secret == the credentials STS returned", secret.get("aws_access_key_id") == sts["access_key_id"]
                and secret.get("aws_secret_access_key") == sts["secret_access_key"]
                and secret.get("aws_session_token") == sts["session_token"])
        # moto's Expiration has microseconds (AWS's has none): allow the broker to round either way.
        r.check("credential_expires_at_unix == STS Expiration (+-1 s)",
                isinstance(ce, int) and abs(ce - sts["expiration_unix"]) <= 1,
                f"{ce} vs {sts['expiration_unix']}")
    want = f"arn:aws:sts::123456789012:assumed-role/model-runtime-datasets/{form.get('RoleSessionName')}"
    ident = expect_ok(r, "secret works: sts.get_caller_identity at moto", lambda: caller_identity(
        moto.url, secret["aws_access_key_id"], secret["aws_secret_access_key"], secret["aws_session_token"]))
    r.check("caller is the assumed role model-runtime-datasets/<RoleSessionName>",
            ident is not None and ident.get("Arn") == want, repr(ident and ident.get("Arn")))

    p = cli.run(files, *args, "--output", "env")
    text = p.stdout.decode("utf-8", "replace")
    if r.check("--output env exited 0", p.returncode == 0, p.stderr.decode("utf-8", "replace").strip()):
        lines = [x for x in text.splitlines() if x.strip()]
        r.check("--output env: only `export NAME='value'` lines",
                bool(lines) and all(re.fullmatch(r"export [A-Z_][A-Z0-9_]*='(?:[^']|'\\'')*'", x) for x in lines),
                text[:300])
        sh = subprocess.run(["bash", "-c", 'eval "$BACKENDS_ENV"; for n in AWS_ACCESS_KEY_ID '
                             'AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN; do printf "%s=%s\\0" "$n" "${!n}"; done'],
                            capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
                            env={"PATH": os.environ.get("PATH", ""), "BACKENDS_ENV": text})
        got = dict(x.split("=", 1) for x in sh.stdout.decode().split("\0") if "=" in x)
        r.check("bash eval sets AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN",
                sh.returncode == 0 and len(got) == 3 and all(got.values()), repr(sorted(k for k, x in got.items() if x)))
        if len(got) == 3 and all(got.values()):
            ident = expect_ok(r, "env credentials work at moto", lambda: caller_identity(
                moto.url, got["AWS_ACCESS_KEY_ID"], got["AWS_SECRET_ACCESS_KEY"], got["AWS_SESSION_TOKEN"]))
            r.check("env credentials are the assumed role", ident is not None
                    and ":assumed-role/model-runtime-datasets/" in ident.get("Arn", ""), repr(ident and ident.get("Arn")))

    # credential_process: an AWS profile whose credentials come from the broker, used by
    # boto3 unchanged (it runs the command, reads Version/AccessKeyId/…/Expiration).
    p = cli.run(files, *args, "--output", "credential-process")
    def credential_process_json() -> dict:
        if p.returncode != 0:
            raise Rejected(p.stderr.decode("utf-8", "replace").strip())
        return json.loads(p.stdout.decode())
    cp = expect_ok(r, "--output credential-process prints the AWS credential_process JSON",
                   credential_process_json)
    if cp is not None:
        r.check("credential_process JSON: Version 1 and the four fields",
                cp.get("Version") == 1 and all(isinstance(cp.get(k), str) and cp.get(k)
                                               for k in ("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")),
                repr(sorted(cp)))
        r.check("credential_process Expiration is RFC 3339 UTC",
                bool(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", cp.get("Expiration", ""))), cp.get("Expiration"))
    with tempfile.TemporaryDirectory() as aws_dir:
        cmd = " ".join(shlex.quote(x) for x in cli.command(files, *args, "--output", "credential-process"))
        config = Path(aws_dir) / "config"
        config.write_text(f"[profile broker]\ncredential_process = {cmd}\n")
        def boto3_session() -> dict:
            import boto3
            saved = {k: os.environ.pop(k) for k in list(os.environ)
                     if k.startswith("AWS_") or k in ("SPIFFE_ENDPOINT_SOCKET",)}
            os.environ["AWS_CONFIG_FILE"] = str(config)
            os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(Path(aws_dir) / "credentials")
            try:
                session = boto3.Session(profile_name="broker", region_name="us-east-1")
                s3 = session.client("s3", endpoint_url=moto.url)
                s3.create_bucket(Bucket="training-data")
                s3.list_objects_v2(Bucket="training-data")
                return session.client("sts", endpoint_url=moto.url).get_caller_identity()
            finally:
                for k in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
                    os.environ.pop(k, None)
                os.environ.update(saved)
        ident = expect_ok(r, "boto3.Session(profile_name=…) with credential_process = spiffe-broker request … "
                             "lists a bucket at moto", boto3_session)
        r.check("boto3's credentials are the assumed role", ident is not None
                and ":assumed-role/model-runtime-datasets/" in ident.get("Arn", ""), repr(ident and ident.get("Arn")))

    proxy.clear()
    p = cli.run(files, "--profile", S3_PROFILE, *READ_INTENT, "--scope", S3_ACTIONS[0], "--ttl", "5m", "--output", "json")
    err = p.stderr.decode("utf-8", "replace").strip()  # stdout would hold a credential
    r.check("--ttl 5m refused (non-zero exit)", p.returncode != 0, f"rc={p.returncode} stderr={err[:200]!r}")
    r.check("the refusal names the 15 minute / 900 s minimum",
            bool(re.search(r"15\s*min|900", err)), repr(err[:300]))
    r.check("no STS call for the refused request", proxy.sts_calls() == [], str(len(proxy.sts_calls())))


def run_broker(r: cc.Report, moto: MotoServer, proxy: RecordingProxy) -> None:
    binary = Path(os.environ.get("SPIFFE_BROKER_BIN", REPO / "target/debug/spiffe-broker"))
    if not binary.is_absolute():
        binary = REPO / binary
    if not r.check("broker binary exists", binary.is_file(), f"{binary} not found (cargo build --bin spiffe-broker)"):
        return
    tmp = Path(tempfile.mkdtemp(prefix="spiffe-broker-backends-"))
    state = tmp / "state"
    grpc_port = cc.free_port()
    http_port = cc.free_port()
    while http_port == grpc_port:
        http_port = cc.free_port()
    grpc_addr, http_addr = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"
    print("[4] spiffe-broker dev")
    print(f"        broker {binary}\n        state {state}   gRPC {grpc_addr}   HTTP {http_addr}   STS {proxy.url}")
    broker = None
    try:
        broker = DevBroker(binary, state, grpc_addr, http_addr, ["--aws-sts-endpoint", proxy.url])
        try:
            broker.wait_ready(cc.READY_TIMEOUT)
            r.check("broker dev printed `ready`", True)
        except RuntimeError as e:
            r.check("broker dev printed `ready`", False, str(e))
            return
        got = e2e_jwks(r, http_addr)
        if got is None:
            return
        issuer, jwks = got
        cli = Cli(binary, grpc_addr)
        prov = tmp / "provisioner"
        r.check("provisioner SVID via py-spiffe", write_svid_files(state, "provisioner", prov) == PROVISIONER_ID)
        mr = tmp / "model-runtime"
        r.check("model-runtime SVID via py-spiffe", write_svid_files(state, "model-runtime", mr) == MODEL_RUNTIME_ID)
        for step in (lambda: e2e_k8s(r, cli, prov, state, issuer, jwks),
                     lambda: e2e_slurm(r, cli, prov, state, issuer, jwks),
                     lambda: e2e_s3(r, cli, mr, issuer, jwks, moto, proxy)):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - one backend's crash must not hide the others
                r.check("unexpected error", False, f"{type(e).__name__}: {e}")
                traceback.print_exc()
    finally:
        if broker is not None:
            broker.stop()
            print(f"broker stopped (exit {broker.proc.returncode})")
            if r.failed:
                print("--- broker stderr tail ---\n" + broker.stderr_tail())
        if os.environ.get("CROSSCHECK_KEEP_STATE") == "1":
            print(f"state kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run(r: cc.Report, self_test_only: bool) -> None:
    try:
        import boto3  # noqa: F401
        import celpy  # noqa: F401
        import jwcrypto  # noqa: F401
        import jwt  # noqa: F401
        import spiffe  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as e:
        r.check("dependencies importable", False,
                f"{e}; pip install -r {Path(__file__).with_name('requirements.txt')}")
        return
    iss = FakeIssuer()
    logdir = Path(tempfile.mkdtemp(prefix="spiffe-broker-moto-"))
    proxy = None
    try:
        for step in (lambda: selftest_k8s(r, iss), lambda: selftest_slurm(r, iss)):
            try:
                step()
            except Exception as e:  # noqa: BLE001
                r.check("unexpected error", False, f"{type(e).__name__}: {e}")
                traceback.print_exc()
        print("[3] self-test: STS harness (moto_server behind the recording proxy, Python-signed token)")
        moto = MotoServer(logdir / "moto.log")
        try:
            moto.wait_ready()
            r.check("moto_server answers", True)
        except RuntimeError as e:
            r.check("moto_server answers", False, f"{e}\n{(logdir / 'moto.log').read_text('utf-8', 'replace')[-2000:]}")
            return
        proxy = RecordingProxy(moto.url)
        try:
            selftest_aws(r, iss, moto, proxy)
        except Exception as e:  # noqa: BLE001
            r.check("unexpected error", False, f"{type(e).__name__}: {e}")
            traceback.print_exc()
        if not self_test_only:
            run_broker(r, moto, proxy)
    finally:
        if proxy is not None:
            proxy.close()
        iss.close()
        CHILDREN.stop_all()
        shutil.rmtree(logdir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--self-test", action="store_true", help="verifiers and moto harness only (no broker)")
    opts = ap.parse_args()

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop children

    signal.signal(signal.SIGTERM, on_term)
    r = cc.Report()
    try:
        run(r, opts.self_test)
    except (KeyboardInterrupt, SystemExit) as e:
        r.check("ran to the end", False, f"interrupted ({type(e).__name__} {e})")
    except Exception as e:  # noqa: BLE001
        r.check("unexpected error", False, f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        CHILDREN.stop_all()
    if r.passed == 0 and r.failed == 0:
        r.check("ran at least one check", False)
    print(f"{r.passed} passed, {r.failed} failed")
    return 0 if r.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
