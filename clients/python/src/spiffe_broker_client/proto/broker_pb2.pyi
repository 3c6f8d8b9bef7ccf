import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AccessRequestState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCESS_REQUEST_STATE_UNSPECIFIED: _ClassVar[AccessRequestState]
    ACCESS_REQUEST_STATE_PENDING: _ClassVar[AccessRequestState]
    ACCESS_REQUEST_STATE_APPROVED: _ClassVar[AccessRequestState]
    ACCESS_REQUEST_STATE_DENIED: _ClassVar[AccessRequestState]
    ACCESS_REQUEST_STATE_EXPIRED: _ClassVar[AccessRequestState]
    ACCESS_REQUEST_STATE_ISSUED: _ClassVar[AccessRequestState]

class LeaseState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_STATE_UNSPECIFIED: _ClassVar[LeaseState]
    LEASE_STATE_ACTIVE: _ClassVar[LeaseState]
    LEASE_STATE_RELEASED: _ClassVar[LeaseState]
    LEASE_STATE_REVOKED: _ClassVar[LeaseState]
    LEASE_STATE_EXPIRED: _ClassVar[LeaseState]
ACCESS_REQUEST_STATE_UNSPECIFIED: AccessRequestState
ACCESS_REQUEST_STATE_PENDING: AccessRequestState
ACCESS_REQUEST_STATE_APPROVED: AccessRequestState
ACCESS_REQUEST_STATE_DENIED: AccessRequestState
ACCESS_REQUEST_STATE_EXPIRED: AccessRequestState
ACCESS_REQUEST_STATE_ISSUED: AccessRequestState
LEASE_STATE_UNSPECIFIED: LeaseState
LEASE_STATE_ACTIVE: LeaseState
LEASE_STATE_RELEASED: LeaseState
LEASE_STATE_REVOKED: LeaseState
LEASE_STATE_EXPIRED: LeaseState

class ExchangeTokenRequest(_message.Message):
    __slots__ = ("subject_token", "subject_token_type", "profile", "scopes", "ttl", "intent", "access_request_id")
    SUBJECT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    ACCESS_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    subject_token: str
    subject_token_type: str
    profile: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    ttl: _duration_pb2.Duration
    intent: Intent
    access_request_id: str
    def __init__(self, subject_token: _Optional[str] = ..., subject_token_type: _Optional[str] = ..., profile: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., intent: _Optional[_Union[Intent, _Mapping]] = ..., access_request_id: _Optional[str] = ...) -> None: ...

class ExchangeTokenResponse(_message.Message):
    __slots__ = ("credential", "lease", "receipt", "access_request", "issued_token_type", "delegation")
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    ACCESS_REQUEST_FIELD_NUMBER: _ClassVar[int]
    ISSUED_TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    DELEGATION_FIELD_NUMBER: _ClassVar[int]
    credential: Credential
    lease: Lease
    receipt: AuditReceipt
    access_request: AccessRequest
    issued_token_type: str
    delegation: Delegation
    def __init__(self, credential: _Optional[_Union[Credential, _Mapping]] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., receipt: _Optional[_Union[AuditReceipt, _Mapping]] = ..., access_request: _Optional[_Union[AccessRequest, _Mapping]] = ..., issued_token_type: _Optional[str] = ..., delegation: _Optional[_Union[Delegation, _Mapping]] = ...) -> None: ...

class Delegation(_message.Message):
    __slots__ = ("subject", "subject_type", "actors", "parent_lease_id")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_TYPE_FIELD_NUMBER: _ClassVar[int]
    ACTORS_FIELD_NUMBER: _ClassVar[int]
    PARENT_LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    subject: str
    subject_type: str
    actors: _containers.RepeatedScalarFieldContainer[str]
    parent_lease_id: str
    def __init__(self, subject: _Optional[str] = ..., subject_type: _Optional[str] = ..., actors: _Optional[_Iterable[str]] = ..., parent_lease_id: _Optional[str] = ...) -> None: ...

class Intent(_message.Message):
    __slots__ = ("action", "target", "artifact_digest", "ticket", "justification", "on_behalf_of")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    JUSTIFICATION_FIELD_NUMBER: _ClassVar[int]
    ON_BEHALF_OF_FIELD_NUMBER: _ClassVar[int]
    action: str
    target: str
    artifact_digest: str
    ticket: str
    justification: str
    on_behalf_of: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, action: _Optional[str] = ..., target: _Optional[str] = ..., artifact_digest: _Optional[str] = ..., ticket: _Optional[str] = ..., justification: _Optional[str] = ..., on_behalf_of: _Optional[_Iterable[str]] = ...) -> None: ...

class IssueCredentialRequest(_message.Message):
    __slots__ = ("profile", "scopes", "ttl", "intent", "break_glass", "access_request_id", "idempotency_key", "csr", "may_act")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    BREAK_GLASS_FIELD_NUMBER: _ClassVar[int]
    ACCESS_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    MAY_ACT_FIELD_NUMBER: _ClassVar[int]
    profile: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    ttl: _duration_pb2.Duration
    intent: Intent
    break_glass: bool
    access_request_id: str
    idempotency_key: str
    csr: bytes
    may_act: str
    def __init__(self, profile: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., intent: _Optional[_Union[Intent, _Mapping]] = ..., break_glass: _Optional[bool] = ..., access_request_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., csr: _Optional[bytes] = ..., may_act: _Optional[str] = ...) -> None: ...

class IssueCredentialResponse(_message.Message):
    __slots__ = ("credential", "lease", "receipt", "access_request")
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    ACCESS_REQUEST_FIELD_NUMBER: _ClassVar[int]
    credential: Credential
    lease: Lease
    receipt: AuditReceipt
    access_request: AccessRequest
    def __init__(self, credential: _Optional[_Union[Credential, _Mapping]] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., receipt: _Optional[_Union[AuditReceipt, _Mapping]] = ..., access_request: _Optional[_Union[AccessRequest, _Mapping]] = ...) -> None: ...

class Review(_message.Message):
    __slots__ = ("reviewer", "approve", "reason", "at", "post_review")
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    APPROVE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    POST_REVIEW_FIELD_NUMBER: _ClassVar[int]
    reviewer: str
    approve: bool
    reason: str
    at: _timestamp_pb2.Timestamp
    post_review: bool
    def __init__(self, reviewer: _Optional[str] = ..., approve: _Optional[bool] = ..., reason: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., post_review: _Optional[bool] = ...) -> None: ...

class AccessRequest(_message.Message):
    __slots__ = ("id", "requester", "profile", "scopes", "ttl", "intent", "request_digest", "approver_group", "threshold", "approvals", "state", "created_at", "expires_at", "break_glass", "post_review", "lease_id", "reviews", "granted_scopes", "granted_ttl", "auth_method", "key_sha256", "profile_sha256", "delegation")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    APPROVER_GROUP_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    BREAK_GLASS_FIELD_NUMBER: _ClassVar[int]
    POST_REVIEW_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEWS_FIELD_NUMBER: _ClassVar[int]
    GRANTED_SCOPES_FIELD_NUMBER: _ClassVar[int]
    GRANTED_TTL_FIELD_NUMBER: _ClassVar[int]
    AUTH_METHOD_FIELD_NUMBER: _ClassVar[int]
    KEY_SHA256_FIELD_NUMBER: _ClassVar[int]
    PROFILE_SHA256_FIELD_NUMBER: _ClassVar[int]
    DELEGATION_FIELD_NUMBER: _ClassVar[int]
    id: str
    requester: str
    profile: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    ttl: _duration_pb2.Duration
    intent: Intent
    request_digest: str
    approver_group: str
    threshold: int
    approvals: int
    state: AccessRequestState
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    break_glass: bool
    post_review: str
    lease_id: str
    reviews: _containers.RepeatedCompositeFieldContainer[Review]
    granted_scopes: _containers.RepeatedScalarFieldContainer[str]
    granted_ttl: _duration_pb2.Duration
    auth_method: str
    key_sha256: str
    profile_sha256: str
    delegation: Delegation
    def __init__(self, id: _Optional[str] = ..., requester: _Optional[str] = ..., profile: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., intent: _Optional[_Union[Intent, _Mapping]] = ..., request_digest: _Optional[str] = ..., approver_group: _Optional[str] = ..., threshold: _Optional[int] = ..., approvals: _Optional[int] = ..., state: _Optional[_Union[AccessRequestState, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., break_glass: _Optional[bool] = ..., post_review: _Optional[str] = ..., lease_id: _Optional[str] = ..., reviews: _Optional[_Iterable[_Union[Review, _Mapping]]] = ..., granted_scopes: _Optional[_Iterable[str]] = ..., granted_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., auth_method: _Optional[str] = ..., key_sha256: _Optional[str] = ..., profile_sha256: _Optional[str] = ..., delegation: _Optional[_Union[Delegation, _Mapping]] = ...) -> None: ...

class GetAccessRequestRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ExplainDecisionRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: IssueCredentialRequest
    def __init__(self, request: _Optional[_Union[IssueCredentialRequest, _Mapping]] = ...) -> None: ...

class ExplainDecisionResponse(_message.Message):
    __slots__ = ("decision", "determining_policies", "reason", "violations", "approver_group", "approvals_required", "approvals_present", "eligible_approvers", "granted_scopes", "granted_ttl", "policy_hash")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    DETERMINING_POLICIES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    APPROVER_GROUP_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_PRESENT_FIELD_NUMBER: _ClassVar[int]
    ELIGIBLE_APPROVERS_FIELD_NUMBER: _ClassVar[int]
    GRANTED_SCOPES_FIELD_NUMBER: _ClassVar[int]
    GRANTED_TTL_FIELD_NUMBER: _ClassVar[int]
    POLICY_HASH_FIELD_NUMBER: _ClassVar[int]
    decision: str
    determining_policies: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    violations: _containers.RepeatedScalarFieldContainer[str]
    approver_group: str
    approvals_required: int
    approvals_present: int
    eligible_approvers: _containers.RepeatedScalarFieldContainer[str]
    granted_scopes: _containers.RepeatedScalarFieldContainer[str]
    granted_ttl: _duration_pb2.Duration
    policy_hash: str
    def __init__(self, decision: _Optional[str] = ..., determining_policies: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ..., violations: _Optional[_Iterable[str]] = ..., approver_group: _Optional[str] = ..., approvals_required: _Optional[int] = ..., approvals_present: _Optional[int] = ..., eligible_approvers: _Optional[_Iterable[str]] = ..., granted_scopes: _Optional[_Iterable[str]] = ..., granted_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., policy_hash: _Optional[str] = ...) -> None: ...

class ListAccessRequestsRequest(_message.Message):
    __slots__ = ("filter", "page_size")
    class Filter(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FILTER_UNSPECIFIED: _ClassVar[ListAccessRequestsRequest.Filter]
        PENDING: _ClassVar[ListAccessRequestsRequest.Filter]
        TO_REVIEW: _ClassVar[ListAccessRequestsRequest.Filter]
        MINE: _ClassVar[ListAccessRequestsRequest.Filter]
        AWAITING_POST_REVIEW: _ClassVar[ListAccessRequestsRequest.Filter]
    FILTER_UNSPECIFIED: ListAccessRequestsRequest.Filter
    PENDING: ListAccessRequestsRequest.Filter
    TO_REVIEW: ListAccessRequestsRequest.Filter
    MINE: ListAccessRequestsRequest.Filter
    AWAITING_POST_REVIEW: ListAccessRequestsRequest.Filter
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    filter: ListAccessRequestsRequest.Filter
    page_size: int
    def __init__(self, filter: _Optional[_Union[ListAccessRequestsRequest.Filter, str]] = ..., page_size: _Optional[int] = ...) -> None: ...

class ListAccessRequestsResponse(_message.Message):
    __slots__ = ("access_requests",)
    ACCESS_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    access_requests: _containers.RepeatedCompositeFieldContainer[AccessRequest]
    def __init__(self, access_requests: _Optional[_Iterable[_Union[AccessRequest, _Mapping]]] = ...) -> None: ...

class ReviewAccessRequestRequest(_message.Message):
    __slots__ = ("id", "approve", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    APPROVE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    approve: bool
    reason: str
    def __init__(self, id: _Optional[str] = ..., approve: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ReviewAccessRequestResponse(_message.Message):
    __slots__ = ("access_request",)
    ACCESS_REQUEST_FIELD_NUMBER: _ClassVar[int]
    access_request: AccessRequest
    def __init__(self, access_request: _Optional[_Union[AccessRequest, _Mapping]] = ...) -> None: ...

class ListIdentitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AccessPath(_message.Message):
    __slots__ = ("action", "resource", "policy", "conditional", "approval_group", "approvals")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CONDITIONAL_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_GROUP_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    action: str
    resource: str
    policy: str
    conditional: bool
    approval_group: str
    approvals: int
    def __init__(self, action: _Optional[str] = ..., resource: _Optional[str] = ..., policy: _Optional[str] = ..., conditional: _Optional[bool] = ..., approval_group: _Optional[str] = ..., approvals: _Optional[int] = ...) -> None: ...

class Identity(_message.Message):
    __slots__ = ("spiffe_id", "registered", "owner", "environment", "roles", "approver_groups", "paths", "active_leases", "issued", "denied", "last_seen", "last_issued", "flags")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    APPROVER_GROUPS_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_LEASES_FIELD_NUMBER: _ClassVar[int]
    ISSUED_FIELD_NUMBER: _ClassVar[int]
    DENIED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_ISSUED_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    registered: bool
    owner: str
    environment: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    approver_groups: _containers.RepeatedScalarFieldContainer[str]
    paths: _containers.RepeatedCompositeFieldContainer[AccessPath]
    active_leases: int
    issued: int
    denied: int
    last_seen: _timestamp_pb2.Timestamp
    last_issued: _timestamp_pb2.Timestamp
    flags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, spiffe_id: _Optional[str] = ..., registered: _Optional[bool] = ..., owner: _Optional[str] = ..., environment: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., approver_groups: _Optional[_Iterable[str]] = ..., paths: _Optional[_Iterable[_Union[AccessPath, _Mapping]]] = ..., active_leases: _Optional[int] = ..., issued: _Optional[int] = ..., denied: _Optional[int] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_issued: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., flags: _Optional[_Iterable[str]] = ...) -> None: ...

class ListIdentitiesResponse(_message.Message):
    __slots__ = ("identities",)
    IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    identities: _containers.RepeatedCompositeFieldContainer[Identity]
    def __init__(self, identities: _Optional[_Iterable[_Union[Identity, _Mapping]]] = ...) -> None: ...

class ReloadPolicyRequest(_message.Message):
    __slots__ = ("force", "reason")
    FORCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    force: bool
    reason: str
    def __init__(self, force: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ReloadPolicyResponse(_message.Message):
    __slots__ = ("policy_hash",)
    POLICY_HASH_FIELD_NUMBER: _ClassVar[int]
    policy_hash: str
    def __init__(self, policy_hash: _Optional[str] = ...) -> None: ...

class Credential(_message.Message):
    __slots__ = ("token", "certificate", "secret", "expires_at", "backend_handle", "backend")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_HANDLE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    token: SignedToken
    certificate: CertificateChain
    secret: SecretData
    expires_at: _timestamp_pb2.Timestamp
    backend_handle: str
    backend: str
    def __init__(self, token: _Optional[_Union[SignedToken, _Mapping]] = ..., certificate: _Optional[_Union[CertificateChain, _Mapping]] = ..., secret: _Optional[_Union[SecretData, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., backend_handle: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class CertificateChain(_message.Message):
    __slots__ = ("chain_pem", "serial")
    CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    chain_pem: str
    serial: str
    def __init__(self, chain_pem: _Optional[str] = ..., serial: _Optional[str] = ...) -> None: ...

class SecretData(_message.Message):
    __slots__ = ("data",)
    class DataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: _containers.ScalarMap[str, str]
    def __init__(self, data: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SignedToken(_message.Message):
    __slots__ = ("jwt", "key_id", "token_type")
    JWT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    jwt: str
    key_id: str
    token_type: str
    def __init__(self, jwt: _Optional[str] = ..., key_id: _Optional[str] = ..., token_type: _Optional[str] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("id", "profile", "spiffe_id", "scopes", "audience", "state", "issued_at", "expires_at", "max_expires_at", "credential_sha256", "renewals", "ended_at", "end_reason", "intent", "backend_handle", "backend", "parent_lease_id", "subject")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    MAX_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_SHA256_FIELD_NUMBER: _ClassVar[int]
    RENEWALS_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_HANDLE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PARENT_LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    id: str
    profile: str
    spiffe_id: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    audience: str
    state: LeaseState
    issued_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    max_expires_at: _timestamp_pb2.Timestamp
    credential_sha256: str
    renewals: int
    ended_at: _timestamp_pb2.Timestamp
    end_reason: str
    intent: Intent
    backend_handle: str
    backend: str
    parent_lease_id: str
    subject: str
    def __init__(self, id: _Optional[str] = ..., profile: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., audience: _Optional[str] = ..., state: _Optional[_Union[LeaseState, str]] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., max_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., credential_sha256: _Optional[str] = ..., renewals: _Optional[int] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_reason: _Optional[str] = ..., intent: _Optional[_Union[Intent, _Mapping]] = ..., backend_handle: _Optional[str] = ..., backend: _Optional[str] = ..., parent_lease_id: _Optional[str] = ..., subject: _Optional[str] = ...) -> None: ...

class AuditReceipt(_message.Message):
    __slots__ = ("sequence", "entry_hash", "leaf_index", "leaf_hash")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ENTRY_HASH_FIELD_NUMBER: _ClassVar[int]
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    LEAF_HASH_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    entry_hash: str
    leaf_index: int
    leaf_hash: str
    def __init__(self, sequence: _Optional[int] = ..., entry_hash: _Optional[str] = ..., leaf_index: _Optional[int] = ..., leaf_hash: _Optional[str] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "ttl")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    ttl: _duration_pb2.Duration
    def __init__(self, lease_id: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RenewLeaseResponse(_message.Message):
    __slots__ = ("credential", "lease", "receipt")
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    credential: Credential
    lease: Lease
    receipt: AuditReceipt
    def __init__(self, credential: _Optional[_Union[Credential, _Mapping]] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., receipt: _Optional[_Union[AuditReceipt, _Mapping]] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ("lease", "receipt")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    receipt: AuditReceipt
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ..., receipt: _Optional[_Union[AuditReceipt, _Mapping]] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("lease_id", "spiffe_id", "spiffe_id_prefix", "profile", "approver", "access_request_id", "all", "issued_before", "dry_run", "reason")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_PREFIX_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    APPROVER_FIELD_NUMBER: _ClassVar[int]
    ACCESS_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    ISSUED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    spiffe_id: str
    spiffe_id_prefix: str
    profile: str
    approver: str
    access_request_id: str
    all: bool
    issued_before: _timestamp_pb2.Timestamp
    dry_run: bool
    reason: str
    def __init__(self, lease_id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., spiffe_id_prefix: _Optional[str] = ..., profile: _Optional[str] = ..., approver: _Optional[str] = ..., access_request_id: _Optional[str] = ..., all: _Optional[bool] = ..., issued_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., dry_run: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeResponse(_message.Message):
    __slots__ = ("revoked_lease_ids", "receipt", "dry_run")
    REVOKED_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    revoked_lease_ids: _containers.RepeatedScalarFieldContainer[str]
    receipt: AuditReceipt
    dry_run: bool
    def __init__(self, revoked_lease_ids: _Optional[_Iterable[str]] = ..., receipt: _Optional[_Union[AuditReceipt, _Mapping]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class Lock(_message.Message):
    __slots__ = ("id", "kind", "value", "until", "reason", "created_by", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    value: str
    until: _timestamp_pb2.Timestamp
    reason: str
    created_by: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., value: _Optional[str] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., created_by: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateLockRequest(_message.Message):
    __slots__ = ("kind", "value", "until", "reason")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    value: str
    until: _timestamp_pb2.Timestamp
    reason: str
    def __init__(self, kind: _Optional[str] = ..., value: _Optional[str] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class ListLocksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLocksResponse(_message.Message):
    __slots__ = ("locks",)
    LOCKS_FIELD_NUMBER: _ClassVar[int]
    locks: _containers.RepeatedCompositeFieldContainer[Lock]
    def __init__(self, locks: _Optional[_Iterable[_Union[Lock, _Mapping]]] = ...) -> None: ...

class DeleteLockRequest(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DeleteLockResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchRevocationsRequest(_message.Message):
    __slots__ = ("since",)
    SINCE_FIELD_NUMBER: _ClassVar[int]
    since: int
    def __init__(self, since: _Optional[int] = ...) -> None: ...

class RevocationEvent(_message.Message):
    __slots__ = ("seq", "lease_id", "spiffe_id", "profile", "expires_at", "revoked_at", "reason", "chain_hash", "certificate_serial")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHAIN_HASH_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_SERIAL_FIELD_NUMBER: _ClassVar[int]
    seq: int
    lease_id: str
    spiffe_id: str
    profile: str
    expires_at: _timestamp_pb2.Timestamp
    revoked_at: _timestamp_pb2.Timestamp
    reason: str
    chain_hash: str
    certificate_serial: str
    def __init__(self, seq: _Optional[int] = ..., lease_id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., profile: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., chain_hash: _Optional[str] = ..., certificate_serial: _Optional[str] = ...) -> None: ...

class RevocationFeedMessage(_message.Message):
    __slots__ = ("event", "signed_head")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    SIGNED_HEAD_FIELD_NUMBER: _ClassVar[int]
    event: RevocationEvent
    signed_head: str
    def __init__(self, event: _Optional[_Union[RevocationEvent, _Mapping]] = ..., signed_head: _Optional[str] = ...) -> None: ...

class ListLeasesRequest(_message.Message):
    __slots__ = ("spiffe_id", "state", "page_size", "page_token", "lease_id", "derived_from")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    DERIVED_FROM_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    state: LeaseState
    page_size: int
    page_token: str
    lease_id: str
    derived_from: str
    def __init__(self, spiffe_id: _Optional[str] = ..., state: _Optional[_Union[LeaseState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., lease_id: _Optional[str] = ..., derived_from: _Optional[str] = ...) -> None: ...

class ListLeasesResponse(_message.Message):
    __slots__ = ("leases", "next_page_token")
    LEASES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    next_page_token: str
    def __init__(self, leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetCheckpointRequest(_message.Message):
    __slots__ = ("tree_size", "consistency_from")
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FROM_FIELD_NUMBER: _ClassVar[int]
    tree_size: int
    consistency_from: int
    def __init__(self, tree_size: _Optional[int] = ..., consistency_from: _Optional[int] = ...) -> None: ...

class GetCheckpointResponse(_message.Message):
    __slots__ = ("note", "tree_size", "root_hash", "consistency_proof", "log_key")
    NOTE_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROOT_HASH_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_PROOF_FIELD_NUMBER: _ClassVar[int]
    LOG_KEY_FIELD_NUMBER: _ClassVar[int]
    note: str
    tree_size: int
    root_hash: str
    consistency_proof: _containers.RepeatedScalarFieldContainer[str]
    log_key: str
    def __init__(self, note: _Optional[str] = ..., tree_size: _Optional[int] = ..., root_hash: _Optional[str] = ..., consistency_proof: _Optional[_Iterable[str]] = ..., log_key: _Optional[str] = ...) -> None: ...

class GetInclusionProofRequest(_message.Message):
    __slots__ = ("sequence", "lease_id", "tree_size")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    lease_id: str
    tree_size: int
    def __init__(self, sequence: _Optional[int] = ..., lease_id: _Optional[str] = ..., tree_size: _Optional[int] = ...) -> None: ...

class GetInclusionProofResponse(_message.Message):
    __slots__ = ("sequence", "leaf_index", "leaf_hash", "entry", "tree_size", "root_hash", "proof", "checkpoint")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    LEAF_HASH_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROOT_HASH_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    leaf_index: int
    leaf_hash: str
    entry: str
    tree_size: int
    root_hash: str
    proof: _containers.RepeatedScalarFieldContainer[str]
    checkpoint: str
    def __init__(self, sequence: _Optional[int] = ..., leaf_index: _Optional[int] = ..., leaf_hash: _Optional[str] = ..., entry: _Optional[str] = ..., tree_size: _Optional[int] = ..., root_hash: _Optional[str] = ..., proof: _Optional[_Iterable[str]] = ..., checkpoint: _Optional[str] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("after_sequence", "page_size")
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    after_sequence: int
    page_size: int
    def __init__(self, after_sequence: _Optional[int] = ..., page_size: _Optional[int] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("sequence", "body", "prev_hash", "entry_hash")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    ENTRY_HASH_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    body: str
    prev_hash: str
    entry_hash: str
    def __init__(self, sequence: _Optional[int] = ..., body: _Optional[str] = ..., prev_hash: _Optional[str] = ..., entry_hash: _Optional[str] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class ListBackendRevocationsRequest(_message.Message):
    __slots__ = ("min_attempts", "page_size")
    MIN_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    min_attempts: int
    page_size: int
    def __init__(self, min_attempts: _Optional[int] = ..., page_size: _Optional[int] = ...) -> None: ...

class BackendRevocation(_message.Message):
    __slots__ = ("lease_id", "backend", "backend_handle", "queued_at", "attempts", "next_attempt_at", "last_error")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    BACKEND_HANDLE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    backend: str
    backend_handle: str
    queued_at: _timestamp_pb2.Timestamp
    attempts: int
    next_attempt_at: _timestamp_pb2.Timestamp
    last_error: str
    def __init__(self, lease_id: _Optional[str] = ..., backend: _Optional[str] = ..., backend_handle: _Optional[str] = ..., queued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ..., next_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_error: _Optional[str] = ...) -> None: ...

class ListBackendRevocationsResponse(_message.Message):
    __slots__ = ("revocations",)
    REVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    revocations: _containers.RepeatedCompositeFieldContainer[BackendRevocation]
    def __init__(self, revocations: _Optional[_Iterable[_Union[BackendRevocation, _Mapping]]] = ...) -> None: ...

class ForceRemoveBackendRevocationRequest(_message.Message):
    __slots__ = ("lease_id", "reason")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    reason: str
    def __init__(self, lease_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ForceRemoveBackendRevocationResponse(_message.Message):
    __slots__ = ("receipt",)
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    receipt: AuditReceipt
    def __init__(self, receipt: _Optional[_Union[AuditReceipt, _Mapping]] = ...) -> None: ...
