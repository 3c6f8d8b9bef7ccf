"""Typed results of the broker's RPCs (plain dataclasses, no protobuf in sight).

Times are timezone-aware UTC ``datetime``s, durations ``timedelta``s. A
:class:`Credential`'s ``repr``/``str`` never show the token, the certificate chain or
secret values, so logging a credential object by mistake leaks nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping, Optional, Tuple


class LeaseState(str, enum.Enum):
    """Where a lease is in its life (`LeaseState` in the proto)."""

    UNSPECIFIED = "unspecified"
    ACTIVE = "active"
    RELEASED = "released"
    REVOKED = "revoked"
    EXPIRED = "expired"


class AccessRequestState(str, enum.Enum):
    """Where an access request is (`AccessRequestState` in the proto)."""

    UNSPECIFIED = "unspecified"
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    ISSUED = "issued"


@dataclass(frozen=True)
class Intent:
    """What the caller says it will do with the credential (recorded, and carried in the
    credential's `intent` claim for the relying party to enforce)."""

    action: str
    target: str
    artifact_digest: str = ""
    ticket: str = ""
    justification: str = ""
    on_behalf_of: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Receipt:
    """Where the broker recorded the operation in its audit ledger."""

    sequence: int
    entry_hash: str
    leaf_index: int
    leaf_hash: str


@dataclass(frozen=True)
class Lease:
    """The broker's record of an issued credential (never the credential itself)."""

    id: str
    profile: str
    spiffe_id: str
    scopes: Tuple[str, ...]
    audience: str
    state: LeaseState
    issued_at: Optional[datetime]
    expires_at: Optional[datetime]
    max_expires_at: Optional[datetime]
    renewals: int
    credential_sha256: str
    ended_at: Optional[datetime] = None
    end_reason: str = ""
    intent: Optional[Intent] = None
    backend: str = ""
    backend_handle: str = ""
    subject: str = ""  # issued by token exchange: whom it is for (spiffe_id is the actor)
    parent_lease_id: str = ""  # issued by token exchange: the subject token's lease


@dataclass(frozen=True)
class Delegation:
    """A verified delegation chain (token exchange, RFC 8693): whom a credential is for
    and who acts for them, the current actor (this client) first."""

    subject: str
    subject_type: str  # "workload" or "person"
    actors: Tuple[str, ...]
    parent_lease_id: str = ""


@dataclass(frozen=True)
class Review:
    """One approver's decision on an access request."""

    reviewer: str
    approve: bool
    reason: str
    at: Optional[datetime]
    post_review: bool = False


@dataclass(frozen=True)
class AccessRequest:
    """An access request: a request that policy sent to approvers."""

    id: str
    requester: str
    profile: str
    scopes: Tuple[str, ...]
    ttl: Optional[timedelta]
    intent: Optional[Intent]
    state: AccessRequestState
    approver_group: str
    threshold: int
    approvals: int
    created_at: Optional[datetime]
    expires_at: Optional[datetime]
    reviews: Tuple[Review, ...] = ()
    granted_scopes: Tuple[str, ...] = ()
    granted_ttl: Optional[timedelta] = None
    break_glass: bool = False
    post_review: str = ""
    lease_id: str = ""
    request_digest: str = ""
    auth_method: str = ""  # "x509-svid" (token bound to the requester's certificate) or "jwt-svid"
    key_sha256: str = ""  # x509 profiles: the public key the certificate will certify
    profile_sha256: str = ""  # a policy reload that changes the profile voids the approval


@dataclass(frozen=True, repr=False)
class Credential:
    """A credential minted by the broker, with its lease and ledger receipt.

    Exactly one of ``token`` (a signed JWT), ``certificate_chain_pem`` (x509 profiles) or
    ``secret`` (Vault fields, AWS keys) is set, as ``kind`` says. They are secrets: the
    ``repr`` shows their kind, never their value.
    """

    kind: str  # "token", "certificate" or "secret"
    lease_id: str
    scopes: Tuple[str, ...]
    expires_at: datetime
    lease: Lease
    receipt: Optional[Receipt]
    token: Optional[str] = field(default=None, compare=False)
    key_id: str = ""
    token_type: str = ""
    certificate_chain_pem: Optional[str] = None
    certificate_serial: str = ""
    secret: Optional[Mapping[str, str]] = field(default=None, compare=False)
    backend: str = ""
    backend_handle: str = ""
    access_request: Optional[AccessRequest] = None
    delegation: Optional[Delegation] = None

    @property
    def profile(self) -> str:
        return self.lease.profile

    def remaining(self, now: Optional[datetime] = None) -> timedelta:
        """Time left before the credential stops working (negative once expired)."""
        return self.expires_at - (now or datetime.now(timezone.utc))

    def __repr__(self) -> str:
        shown: dict[str, Any] = {
            "kind": self.kind,
            "profile": self.lease.profile,
            "lease_id": self.lease_id,
            "scopes": list(self.scopes),
            "expires_at": self.expires_at.isoformat(),
        }
        if self.token is not None:
            shown["token"] = "<redacted>"
        if self.certificate_chain_pem is not None:
            shown["certificate_serial"] = self.certificate_serial
        if self.secret is not None:
            shown["secret"] = "<redacted: " + ", ".join(sorted(self.secret)) + ">"
        if self.receipt is not None:
            shown["receipt_sequence"] = self.receipt.sequence
        inner = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        return f"Credential({inner})"

    __str__ = __repr__


@dataclass(frozen=True)
class PendingApproval:
    """IssueCredential answered "approval required": nothing was issued yet.

    Hand ``access_request.id`` to an approver, then call
    :meth:`BrokerClient.wait_for_approval` with this object (or the id).
    """

    access_request: AccessRequest
    receipt: Optional[Receipt]
    # The exact request that was approved: redemption must send it again, unchanged.
    _request: Any = field(default=None, repr=False, compare=False)

    @property
    def id(self) -> str:
        return self.access_request.id


@dataclass(frozen=True)
class Decision:
    """What policy would decide for a request (ExplainDecision; nothing issued)."""

    decision: str  # "allow", "deny" or "require_approval"
    reason: str
    determining_policies: Tuple[str, ...]
    violations: Tuple[str, ...]
    approver_group: str
    approvals_required: int
    approvals_present: int
    eligible_approvers: Tuple[str, ...]
    granted_scopes: Tuple[str, ...]
    granted_ttl: Optional[timedelta]
    policy_hash: str
