"""Exceptions raised by the client.

Everything the package raises derives from :class:`BrokerClientError`. A refusal by the
broker is a :class:`BrokerError` carrying the gRPC status code and the broker's reason
(the status details, e.g. ``scope cluster:admin exceeds the ceiling of profile …``), with
one subclass per status code a caller typically branches on.

None of these ever hold a credential: the broker does not put secrets in its reasons, and
the client builds its own messages from ids, profiles and SPIFFE IDs only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import grpc

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .types import AccessRequest


class BrokerClientError(Exception):
    """Base class of every error raised by spiffe_broker_client."""


class BrokerError(BrokerClientError):
    """The broker (or the connection to it) refused or failed an RPC.

    Attributes:
        code: the gRPC status code.
        reason: the broker's reason (the status details), or the client's when the RPC
            never reached the broker.
        rpc: the RPC name, e.g. ``IssueCredential``.
    """

    def __init__(self, code: grpc.StatusCode, reason: str, rpc: str = "") -> None:
        self.code = code
        self.reason = reason
        self.rpc = rpc
        where = f"{rpc}: " if rpc else ""
        super().__init__(f"{where}{code.name}: {reason}")


class Unauthenticated(BrokerError):
    """UNAUTHENTICATED: the broker did not accept the caller's SVID."""


class PermissionDenied(BrokerError):
    """PERMISSION_DENIED: policy refused the request (the reason says which rule)."""


class InvalidArgument(BrokerError):
    """INVALID_ARGUMENT: a malformed request or an over-ask (e.g. an unknown profile,
    a scope beyond the profile's ceiling, a TTL beyond its max)."""


class NotFound(BrokerError):
    """NOT_FOUND: no such lease or access request (or not visible to the caller)."""


class FailedPrecondition(BrokerError):
    """FAILED_PRECONDITION: the lease or access request is not in a state that allows
    the operation (e.g. renewing a released lease)."""


class ResourceExhausted(BrokerError):
    """RESOURCE_EXHAUSTED: a quota or rate limit of the broker was hit."""


class Unavailable(BrokerError):
    """UNAVAILABLE: the broker could not be reached, or could not durably record the
    operation (then nothing was issued)."""


class BrokerIdentityMismatch(Unavailable):
    """The peer at the broker address authenticated as another SPIFFE ID than expected.

    Raised before any request byte was sent to that peer: nothing was asked, nothing
    was issued.

    Attributes:
        expected: the broker SPIFFE ID the client was configured with.
        presented: what the peer's certificate carried (its URI SANs, comma separated,
            or a description when it had none).
    """

    def __init__(self, expected: str, presented: str, rpc: str = "") -> None:
        self.expected = expected
        self.presented = presented
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            f"the peer is not the broker: expected {expected}, it presented {presented}",
            rpc,
        )


class BrokerTLSError(Unavailable):
    """The TLS connection to the broker failed (handshake, certificate chain, refused
    TCP connection); nothing was sent."""


_BY_CODE: dict[grpc.StatusCode, type[BrokerError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def from_status(code: grpc.StatusCode, reason: str, rpc: str = "") -> BrokerError:
    """The exception for a gRPC status: the subclass for its code, else BrokerError."""
    return _BY_CODE.get(code, BrokerError)(code, reason, rpc)


class ApprovalRequired(BrokerClientError):
    """The profile needs approval and the caller asked not to wait (``lease()`` without
    ``approval_timeout``). ``pending`` is the access request to hand to approvers."""

    def __init__(self, pending: "AccessRequest") -> None:
        self.access_request = pending
        super().__init__(
            f"access request {pending.id} for profile {pending.profile} needs "
            f"{pending.threshold} approval(s) from {pending.approver_group}"
        )


class ApprovalFailed(BrokerClientError):
    """An access request ended without approval (denied or expired).

    Attributes:
        access_request: the request in its final state (its reviews carry the reasons).
    """

    def __init__(self, access_request: "AccessRequest", message: Optional[str] = None) -> None:
        self.access_request = access_request
        super().__init__(
            message or f"access request {access_request.id} ended {access_request.state}"
        )


class ApprovalDenied(ApprovalFailed):
    """An approver denied the access request."""


class ApprovalExpired(ApprovalFailed):
    """The access request was not decided (or not redeemed) in time."""


class ApprovalTimeout(BrokerClientError):
    """The client stopped waiting (its ``timeout``) while the request was still pending.
    The request itself stays open at the broker until it expires."""

    def __init__(self, access_request_id: str, timeout: float) -> None:
        self.access_request_id = access_request_id
        self.timeout = timeout
        super().__init__(
            f"access request {access_request_id} still pending after {timeout:g}s"
        )


class LeaseLost(BrokerClientError):
    """A lease kept by :meth:`BrokerClient.lease` can no longer be relied on: the broker
    refused a renewal (revoked, released elsewhere, policy changed …) or the credential
    expired while renewals kept failing. ``__cause__`` is the broker's refusal, if any.

    Attributes:
        lease_id: the lease concerned.
    """

    def __init__(self, lease_id: str, message: str) -> None:
        self.lease_id = lease_id
        super().__init__(f"lease {lease_id}: {message}")
