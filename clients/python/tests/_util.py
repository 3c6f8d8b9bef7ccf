"""Small helpers shared by the tests (no broker code: everything is checked independently)."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Dict

AGENT_ID = "spiffe://example.org/ci/deploy-agent"
BROKER_ID = "spiffe://example.org/spiffe-broker"
GPU = dict(profile="gpu-scheduler-submit", scopes=["job:submit"],
           intent_action="submit-training", intent_target="queue/a100")
DIGEST = "sha256:9372c470eeadd5ecd9c3c74c2b3cb633f8e2f2fad799250a0f70d652b6b825e4"
PUSH = dict(profile="model-registry-push", intent_action="push-model",
            intent_target="models/llama", artifact_digest=DIGEST, ticket="CHG-1234")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def claims(jwt: str) -> Dict[str, Any]:
    """The payload of a compact JWS, unverified (the cross-checks verify signatures)."""
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def x5t_s256(der: bytes) -> str:
    """RFC 8705 confirmation of a certificate: base64url(SHA-256(DER))."""
    return b64url(hashlib.sha256(der).digest())
