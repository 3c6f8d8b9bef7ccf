"""Python client of spiffe-broker: a workload's SVID in, a short-lived credential out.

    from spiffe_broker_client import BrokerClient

    with BrokerClient("broker.internal:8443") as broker:          # SVID: SPIFFE_ENDPOINT_SOCKET
        cred = broker.request("gpu-scheduler-submit", ["job:submit"], ttl=600,
                              intent_action="submit-training", intent_target="queue/a100")
        headers = {"Authorization": f"Bearer {cred.token}"}

The broker is authenticated by its SPIFFE ID (default ``spiffe://example.org/spiffe-broker``)
on every connection, which stock grpcio cannot do; see ``_bridge`` for how.
"""

from .client import DEFAULT_BROKER_ID, BrokerClient
from .errors import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalFailed,
    ApprovalRequired,
    ApprovalTimeout,
    BrokerClientError,
    BrokerError,
    BrokerIdentityMismatch,
    BrokerTLSError,
    FailedPrecondition,
    InvalidArgument,
    LeaseLost,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .lease import ManagedLease
from .types import (
    AccessRequest,
    AccessRequestState,
    Credential,
    Decision,
    Delegation,
    Intent,
    Lease,
    LeaseState,
    PendingApproval,
    Receipt,
    Review,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BROKER_ID",
    "AccessRequest",
    "AccessRequestState",
    "ApprovalDenied",
    "ApprovalExpired",
    "ApprovalFailed",
    "ApprovalRequired",
    "ApprovalTimeout",
    "BrokerClient",
    "BrokerClientError",
    "BrokerError",
    "BrokerIdentityMismatch",
    "BrokerTLSError",
    "Credential",
    "Decision",
    "Delegation",
    "FailedPrecondition",
    "Intent",
    "InvalidArgument",
    "Lease",
    "LeaseLost",
    "LeaseState",
    "ManagedLease",
    "NotFound",
    "PendingApproval",
    "PermissionDenied",
    "Receipt",
    "ResourceExhausted",
    "Review",
    "Unauthenticated",
    "Unavailable",
]
