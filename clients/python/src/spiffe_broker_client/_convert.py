"""Protobuf messages to and from the dataclasses of :mod:`spiffe_broker_client.types`.

Kept apart so that the public types never import generated code.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Iterable, Optional, Union

from google.protobuf import duration_pb2, timestamp_pb2

from .proto import broker_pb2 as pb
from .types import (
    AccessRequest,
    AccessRequestState,
    Credential,
    Decision,
    Delegation,
    Intent,
    Lease,
    LeaseState,
    Receipt,
    Review,
)

TTL = Union[timedelta, int, float]


def ts(msg: object, name: str) -> Optional[datetime]:
    """A Timestamp field as an aware UTC datetime, or None when unset."""
    if not msg.HasField(name):  # type: ignore[attr-defined]
        return None
    t: timestamp_pb2.Timestamp = getattr(msg, name)
    return datetime.fromtimestamp(t.seconds + t.nanos / 1e9, tz=timezone.utc)


def dur(msg: object, name: str) -> Optional[timedelta]:
    """A Duration field as a timedelta, or None when unset."""
    if not msg.HasField(name):  # type: ignore[attr-defined]
        return None
    d: duration_pb2.Duration = getattr(msg, name)
    return timedelta(seconds=d.seconds, microseconds=d.nanos // 1000)


def duration_pb(ttl: Optional[TTL]) -> Optional[duration_pb2.Duration]:
    """A TTL (timedelta or seconds) as a Duration; None stays unset (profile default)."""
    if ttl is None:
        return None
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
    if seconds <= 0:
        raise ValueError(f"ttl must be positive, got {seconds:g}s")
    d = duration_pb2.Duration()
    d.FromTimedelta(timedelta(seconds=seconds))
    return d


def intent_pb(
    action: Optional[str],
    target: Optional[str],
    artifact_digest: Optional[str] = None,
    ticket: Optional[str] = None,
    justification: Optional[str] = None,
    on_behalf_of: Iterable[str] = (),
) -> Optional[pb.Intent]:
    """The Intent message, or None when no intent field was given at all."""
    chain = list(on_behalf_of)
    if not any((action, target, artifact_digest, ticket, justification, chain)):
        return None
    return pb.Intent(
        action=action or "",
        target=target or "",
        artifact_digest=artifact_digest or "",
        ticket=ticket or "",
        justification=justification or "",
        on_behalf_of=chain,
    )


def intent(msg: object, name: str = "intent") -> Optional[Intent]:
    if not msg.HasField(name):  # type: ignore[attr-defined]
        return None
    i: pb.Intent = getattr(msg, name)
    return Intent(
        action=i.action,
        target=i.target,
        artifact_digest=i.artifact_digest,
        ticket=i.ticket,
        justification=i.justification,
        on_behalf_of=tuple(i.on_behalf_of),
    )


def receipt(msg: object) -> Optional[Receipt]:
    if not msg.HasField("receipt"):  # type: ignore[attr-defined]
        return None
    r: pb.AuditReceipt = msg.receipt  # type: ignore[attr-defined]
    return Receipt(
        sequence=r.sequence, entry_hash=r.entry_hash, leaf_index=r.leaf_index, leaf_hash=r.leaf_hash
    )


def _enum_name(value: int, enum_type: object, prefix: str) -> str:
    try:
        name: str = enum_type.Name(value)  # type: ignore[attr-defined]
    except ValueError:
        return "unspecified"
    return name.removeprefix(prefix).lower()


def lease(l: pb.Lease) -> Lease:
    return Lease(
        id=l.id,
        profile=l.profile,
        spiffe_id=l.spiffe_id,
        scopes=tuple(l.scopes),
        audience=l.audience,
        state=LeaseState(_enum_name(l.state, pb.LeaseState, "LEASE_STATE_")),
        issued_at=ts(l, "issued_at"),
        expires_at=ts(l, "expires_at"),
        max_expires_at=ts(l, "max_expires_at"),
        renewals=l.renewals,
        credential_sha256=l.credential_sha256,
        ended_at=ts(l, "ended_at"),
        end_reason=l.end_reason,
        intent=intent(l),
        backend=l.backend,
        backend_handle=l.backend_handle,
        subject=l.subject,
        parent_lease_id=l.parent_lease_id,
    )


def delegation(d: pb.Delegation) -> Delegation:
    return Delegation(
        subject=d.subject,
        subject_type=d.subject_type,
        actors=tuple(d.actors),
        parent_lease_id=d.parent_lease_id,
    )


def access_request(r: pb.AccessRequest) -> AccessRequest:
    return AccessRequest(
        id=r.id,
        requester=r.requester,
        profile=r.profile,
        scopes=tuple(r.scopes),
        ttl=dur(r, "ttl"),
        intent=intent(r),
        state=AccessRequestState(
            _enum_name(r.state, pb.AccessRequestState, "ACCESS_REQUEST_STATE_")
        ),
        approver_group=r.approver_group,
        threshold=r.threshold,
        approvals=r.approvals,
        created_at=ts(r, "created_at"),
        expires_at=ts(r, "expires_at"),
        reviews=tuple(
            Review(
                reviewer=v.reviewer,
                approve=v.approve,
                reason=v.reason,
                at=ts(v, "at"),
                post_review=v.post_review,
            )
            for v in r.reviews
        ),
        granted_scopes=tuple(r.granted_scopes),
        granted_ttl=dur(r, "granted_ttl"),
        break_glass=r.break_glass,
        post_review=r.post_review,
        lease_id=r.lease_id,
        request_digest=r.request_digest,
        auth_method=r.auth_method,
        key_sha256=r.key_sha256,
        profile_sha256=r.profile_sha256,
    )


def credential(
    resp: Union[pb.IssueCredentialResponse, pb.RenewLeaseResponse, pb.ExchangeTokenResponse],
) -> Credential:
    """The Credential of an IssueCredential/RenewLease response that carries one."""
    c = resp.credential
    l = lease(resp.lease)
    expires = ts(c, "expires_at") or l.expires_at
    if expires is None:  # pragma: no cover - the broker always sets one
        raise ValueError("credential without an expiry")
    kind = c.WhichOneof("kind")
    ar = (
        access_request(resp.access_request)
        if not isinstance(resp, pb.RenewLeaseResponse) and resp.HasField("access_request")
        else None
    )
    common = dict(
        lease_id=l.id,
        scopes=l.scopes,
        expires_at=expires,
        lease=l,
        receipt=receipt(resp),
        backend=c.backend,
        backend_handle=c.backend_handle,
        access_request=ar,
        delegation=(
            delegation(resp.delegation)
            if isinstance(resp, pb.ExchangeTokenResponse) and resp.HasField("delegation")
            else None
        ),
    )
    if kind == "token":
        return Credential(
            kind="token",
            token=c.token.jwt,
            key_id=c.token.key_id,
            token_type=c.token.token_type,
            **common,  # type: ignore[arg-type]
        )
    if kind == "certificate":
        return Credential(
            kind="certificate",
            certificate_chain_pem=c.certificate.chain_pem,
            certificate_serial=c.certificate.serial,
            **common,  # type: ignore[arg-type]
        )
    if kind == "secret":
        return Credential(kind="secret", secret=dict(c.secret.data), **common)  # type: ignore[arg-type]
    raise ValueError(f"credential of unknown kind {kind!r}")


def decision(d: pb.ExplainDecisionResponse) -> Decision:
    return Decision(
        decision=d.decision,
        reason=d.reason,
        determining_policies=tuple(d.determining_policies),
        violations=tuple(d.violations),
        approver_group=d.approver_group,
        approvals_required=d.approvals_required,
        approvals_present=d.approvals_present,
        eligible_approvers=tuple(d.eligible_approvers),
        granted_scopes=tuple(d.granted_scopes),
        granted_ttl=dur(d, "granted_ttl"),
        policy_hash=d.policy_hash,
    )


def request_from_access_request(r: pb.AccessRequest) -> pb.IssueCredentialRequest:
    """Rebuilds the request an access request was made for (what redemption must send
    again) from the broker's record of it: profile, scopes, TTL and intent exactly as
    asked. Used when the waiting client did not make the request itself."""
    req = pb.IssueCredentialRequest(profile=r.profile, scopes=list(r.scopes))
    if r.HasField("ttl"):
        req.ttl.CopyFrom(r.ttl)
    if r.HasField("intent"):
        req.intent.CopyFrom(r.intent)
    return req
