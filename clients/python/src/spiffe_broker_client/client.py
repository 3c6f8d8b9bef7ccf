"""BrokerClient: a workload's view of spiffe-broker.

The client authenticates with the X.509-SVID that the SPIFFE Workload API hands this
workload (py-spiffe's ``X509Source``) and authenticates the broker by its SPIFFE ID, on
every connection, through :class:`._bridge.TlsBridge`.

SVID rotation: the broker re-validates the caller's certificate on every request and binds
tokens to it (``cnf.x5t#S256``), so calls must travel on a connection that presented the
*current* SVID. When the source's leaf changes, the client builds a new SSLContext and a new
grpc channel; new calls use it at once, calls still running on the old channel finish there,
and the old channel is closed when its last call ends.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Union

import grpc
from spiffe import SpiffeId, X509Source

from . import _convert as conv
from . import _tls
from ._bridge import TlsBridge
from .proto import broker_pb2 as pb
from .proto import broker_pb2_grpc as pb_grpc
from .lease import ManagedLease
from .errors import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalFailed,
    ApprovalTimeout,
    BrokerClientError,
    BrokerError,
    from_status,
)
from .types import AccessRequest, Credential, Decision, Lease, PendingApproval

log = logging.getLogger("spiffe_broker_client")

DEFAULT_BROKER_ID = "spiffe://example.org/spiffe-broker"

TTL = Union[timedelta, int, float]

_FILTERS = {
    "pending": pb.ListAccessRequestsRequest.PENDING,
    "to_review": pb.ListAccessRequestsRequest.TO_REVIEW,
    "mine": pb.ListAccessRequestsRequest.MINE,
    "post_review": pb.ListAccessRequestsRequest.AWAITING_POST_REVIEW,
}


class _Generation:
    """One grpc channel, the SSL material it was opened with, and its running calls."""

    def __init__(self, number: int, channel: grpc.Channel, material: _tls.TlsMaterial) -> None:
        self.number = number
        self.channel = channel
        self.material = material
        self.broker: Any = pb_grpc.CredentialBrokerStub(channel)  # type: ignore[no-untyped-call]
        self.approvals: Any = pb_grpc.ApprovalsStub(channel)  # type: ignore[no-untyped-call]
        self.users = 0
        self.retired = False


class BrokerClient:
    """A client of spiffe-broker for one workload.

    Args:
        broker_addr: ``host:port`` of the broker's gRPC (mTLS) listener.
        broker_id: the SPIFFE ID the broker must present. Checked on every connection;
            a peer presenting anything else gets no request (:class:`BrokerIdentityMismatch`).
        socket: the SPIFFE Workload API endpoint (``unix:///path``); defaults to
            ``SPIFFE_ENDPOINT_SOCKET``, like every SPIFFE tool.

    Keyword args:
        x509_source: an ``X509Source`` to use instead of opening one (the caller keeps
            ownership: :meth:`close` does not close it).
        timeout: default deadline of each RPC, in seconds.
        source_timeout: how long to wait for the first SVID from the Workload API.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        broker_addr: str,
        broker_id: str = DEFAULT_BROKER_ID,
        socket: Optional[str] = None,
        *,
        x509_source: Optional[X509Source] = None,
        timeout: float = 30.0,
        source_timeout: float = 15.0,
    ) -> None:
        self._broker_id = SpiffeId(broker_id)  # raises on a malformed ID
        self.broker_id = str(self._broker_id)
        self.broker_addr = broker_addr
        host, port = _split_addr(broker_addr)
        self.timeout = timeout
        self._lock = threading.RLock()
        self._closed = False
        self._pending: "OrderedDict[str, pb.IssueCredentialRequest]" = OrderedDict()
        self._retired: List[_Generation] = []
        self._generations = 0
        self._owns_source = x509_source is None
        try:
            self._source = x509_source or X509Source(
                socket_path=socket, timeout_in_seconds=source_timeout
            )
        except Exception as e:
            raise BrokerClientError(f"cannot get an SVID from the Workload API: {e}") from e
        self._bridge: Optional[TlsBridge] = None
        try:
            self._bridge = TlsBridge(
                host,
                port,
                self.broker_id,
                self._ssl_context,
                server_hostname=None if _is_ip(host) else host,
            )
            self._authority = broker_addr
            self._current = self._open(_tls.build(self._source, self._broker_id, self._bridge.directory))
        except BaseException:
            self.close()
            raise
        self._source.subscribe_for_updates(self._on_source_update)

    # -- identity and rotation ---------------------------------------------------------

    @property
    def spiffe_id(self) -> str:
        """This workload's SPIFFE ID (from its current SVID)."""
        return self._current.material.spiffe_id

    @property
    def svid_leaf_der(self) -> bytes:
        """The leaf certificate (DER) that new connections present."""
        return self._current.material.leaf_der

    @property
    def x509_source(self) -> X509Source:
        """The py-spiffe X509Source this client presents SVIDs from."""
        return self._source

    @property
    def generation(self) -> int:
        """How many channels were opened so far: 1 + the SVID rotations followed."""
        return self._generations

    def _ssl_context(self) -> Any:
        return self._current.material.context

    def _open(self, material: _tls.TlsMaterial) -> _Generation:
        assert self._bridge is not None
        channel = grpc.insecure_channel(
            f"unix:{self._bridge.socket_path}",
            options=[
                # Never share a connection with another channel: grpcio's global subchannel
                # pool would hand this new channel the old channel's connection (same
                # socket path, same args), i.e. one that presented the previous SVID.
                ("grpc.use_local_subchannel_pool", 1),
                # The broker sees its own address as :authority, not the bridge's path.
                ("grpc.default_authority", self._authority),
                # Pings during long calls (an approval wait can last hours) notice a dead
                # connection to the broker instead of waiting forever.
                ("grpc.keepalive_time_ms", 60_000),
            ],
        )
        self._generations += 1
        return _Generation(self._generations, channel, material)

    def _on_source_update(self) -> None:
        """py-spiffe calls this (on its watcher thread) for every Workload API update."""
        if self._closed:
            return
        try:
            self._refresh()
        except Exception:
            log.warning("could not follow an SVID update", exc_info=True)

    def _refresh(self) -> _Generation:
        """The generation new calls should use: the current one, or a new one when the
        source's SVID (or the broker's trust bundle) changed since it was built."""
        with self._lock:
            if self._closed:
                raise BrokerClientError("the client is closed")
            current = self._current
            leaf, bundle = _tls.snapshot(self._source, self._broker_id)
            if leaf == current.material.leaf_der and bundle == current.material.bundle_der:
                return current
            assert self._bridge is not None
            material = _tls.build(self._source, self._broker_id, self._bridge.directory)
            if material.leaf_der == current.material.leaf_der:
                # Only the bundle changed: new connections verify with it; open ones are fine.
                current.material = material
                return current
            new = self._open(material)
            self._current = new
            log.info("SVID rotated: new connections to the broker present the new one "
                     "(channel %d)", new.number)
            self._retire(current)
            return new

    def _retire(self, gen: _Generation) -> None:
        gen.retired = True
        if gen.users == 0:
            gen.channel.close()
        else:
            self._retired.append(gen)

    @contextmanager
    def _use(self) -> Iterator[_Generation]:
        """Holds a generation for the duration of one call (streams included)."""
        with self._lock:
            gen = self._refresh()
            gen.users += 1
        try:
            yield gen
        finally:
            with self._lock:
                gen.users -= 1
                if gen.retired and gen.users == 0:
                    gen.channel.close()
                    if gen in self._retired:
                        self._retired.remove(gen)

    # -- errors ------------------------------------------------------------------------

    def _error(self, e: grpc.RpcError, rpc: str) -> BrokerError:
        # grpcio's RpcError raised by a call is also a grpc.Call: it has code() and details().
        code: grpc.StatusCode = e.code()
        reason: str = e.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE and self._bridge is not None:
            # grpcio only saw the bridge close the connection; say why it did.
            failure = self._bridge.last_failure(rpc)
            if failure is not None:
                return failure
        return from_status(code, reason, rpc)

    def _call(self, rpc: str, request: Any, timeout: Optional[float], approvals: bool = False) -> Any:
        with self._use() as gen:
            stub = gen.approvals if approvals else gen.broker
            try:
                return getattr(stub, rpc)(request, timeout=self.timeout if timeout is None else timeout)
            except grpc.RpcError as e:
                raise self._error(e, rpc) from None

    # -- CredentialBroker --------------------------------------------------------------

    def request(
        self,
        profile: str,
        scopes: Union[str, Iterable[str]] = (),
        ttl: Optional[TTL] = None,
        intent_action: Optional[str] = None,
        intent_target: Optional[str] = None,
        *,
        artifact_digest: Optional[str] = None,
        ticket: Optional[str] = None,
        justification: Optional[str] = None,
        on_behalf_of: Sequence[str] = (),
        break_glass: bool = False,
        access_request_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        csr: Optional[bytes] = None,
        timeout: Optional[float] = None,
    ) -> Union[Credential, PendingApproval]:
        """Asks for a credential of ``profile`` (IssueCredential).

        Returns the :class:`Credential`, or a :class:`PendingApproval` when policy wants
        approvers to agree first (then see :meth:`wait_for_approval`). Refusals raise a
        :class:`BrokerError` subclass with the broker's reason, e.g. :class:`InvalidArgument`
        for an unknown profile or an over-ask, :class:`PermissionDenied` for policy.

        ``scopes`` empty means the profile's defaults; ``ttl`` (timedelta or seconds) unset
        means the profile's default TTL.
        """
        req = self._issue_request(
            profile, scopes, ttl, intent_action, intent_target, artifact_digest, ticket,
            justification, on_behalf_of, break_glass, access_request_id, idempotency_key, csr,
        )
        resp: pb.IssueCredentialResponse = self._call("IssueCredential", req, timeout)
        if resp.HasField("credential"):
            return conv.credential(resp)
        if resp.HasField("access_request"):
            pending = PendingApproval(
                access_request=conv.access_request(resp.access_request),
                receipt=conv.receipt(resp),
                _request=req,
            )
            with self._lock:
                self._pending[pending.id] = req
                while len(self._pending) > 256:
                    self._pending.popitem(last=False)
            log.info("access request %s for profile %s awaits approval", pending.id, profile)
            return pending
        raise BrokerClientError("IssueCredential returned neither a credential nor an access request")

    #: RFC 8693 subject token types by their short names.
    SUBJECT_TOKEN_TYPES = {
        "access_token": "urn:ietf:params:oauth:token-type:access_token",
        "jwt": "urn:ietf:params:oauth:token-type:jwt",
        "id_token": "urn:ietf:params:oauth:token-type:id_token",
    }

    def exchange(
        self,
        subject_token: str,
        profile: str,
        scopes: Union[str, Iterable[str]] = (),
        ttl: Optional[TTL] = None,
        intent_action: Optional[str] = None,
        intent_target: Optional[str] = None,
        *,
        subject_token_type: str = "access_token",
        artifact_digest: Optional[str] = None,
        ticket: Optional[str] = None,
        access_request_id: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> Union[Credential, PendingApproval]:
        """Acts for the subject of ``subject_token`` (ExchangeToken, RFC 8693): this
        workload is the actor. The credential is for the subject and names every actor in
        its ``act`` claim; :attr:`Credential.delegation` has the verified chain. It can only
        narrow what the subject token allows.

        ``subject_token_type``: ``access_token`` (a token this broker issued with the broker
        as audience), ``jwt`` (a JWT-SVID for the broker) or ``id_token`` (a person's ID
        token from an OpenID Provider the broker is configured with), or the RFC 8693 URI.
        A pending approval is redeemed by calling again with the same subject token and
        ``access_request_id``.
        """
        spec = self._issue_request(
            profile, scopes, ttl, intent_action, intent_target, artifact_digest, ticket,
            None, (), False, None, None, None,
        )
        req = pb.ExchangeTokenRequest(
            subject_token=subject_token,
            subject_token_type=self.SUBJECT_TOKEN_TYPES.get(subject_token_type, subject_token_type),
            profile=spec.profile,
            scopes=list(spec.scopes),
            access_request_id=access_request_id or "",
        )
        if spec.HasField("ttl"):
            req.ttl.CopyFrom(spec.ttl)
        if spec.HasField("intent"):
            req.intent.CopyFrom(spec.intent)
        resp: pb.ExchangeTokenResponse = self._call("ExchangeToken", req, timeout)
        if resp.HasField("credential"):
            return conv.credential(resp)
        if resp.HasField("access_request"):
            # Redeemed with exchange(..., access_request_id=…) and the same subject
            # token, not wait_for_approval's IssueCredential.
            return PendingApproval(access_request=conv.access_request(resp.access_request), receipt=None)
        raise BrokerClientError("ExchangeToken returned neither a credential nor an access request")

    @staticmethod
    def _issue_request(
        profile: str,
        scopes: Union[str, Iterable[str]],
        ttl: Optional[TTL],
        intent_action: Optional[str],
        intent_target: Optional[str],
        artifact_digest: Optional[str],
        ticket: Optional[str],
        justification: Optional[str],
        on_behalf_of: Sequence[str],
        break_glass: bool,
        access_request_id: Optional[str],
        idempotency_key: Optional[str],
        csr: Optional[bytes],
    ) -> pb.IssueCredentialRequest:
        req = pb.IssueCredentialRequest(
            profile=profile,
            scopes=[scopes] if isinstance(scopes, str) else list(scopes),
            break_glass=break_glass,
            access_request_id=access_request_id or "",
            idempotency_key=idempotency_key or "",
            csr=csr or b"",
        )
        d = conv.duration_pb(ttl)
        if d is not None:
            req.ttl.CopyFrom(d)
        i = conv.intent_pb(intent_action, intent_target, artifact_digest, ticket, justification, on_behalf_of)
        if i is not None:
            req.intent.CopyFrom(i)
        return req

    def renew(self, lease_id: str, ttl: Optional[TTL] = None, *, timeout: Optional[float] = None) -> Credential:
        """Extends a lease this workload holds and returns a fresh credential for it
        (RenewLease). ``ttl`` unset means the profile's default."""
        req = pb.RenewLeaseRequest(lease_id=lease_id)
        d = conv.duration_pb(ttl)
        if d is not None:
            req.ttl.CopyFrom(d)
        return conv.credential(self._call("RenewLease", req, timeout))

    def release(self, lease_id: str, *, timeout: Optional[float] = None) -> Lease:
        """Gives a lease back before it expires (ReleaseLease); returns it, released."""
        resp: pb.ReleaseLeaseResponse = self._call(
            "ReleaseLease", pb.ReleaseLeaseRequest(lease_id=lease_id), timeout
        )
        return conv.lease(resp.lease)

    def get_access_request(self, access_request_id: str, *, timeout: Optional[float] = None) -> AccessRequest:
        """One access request (the requester, its reviewers and platform admins may read it)."""
        return conv.access_request(
            self._call("GetAccessRequest", pb.GetAccessRequestRequest(id=access_request_id), timeout)
        )

    def wait_for_approval(
        self,
        pending: Union[PendingApproval, str],
        timeout: Optional[float] = None,
        *,
        on_update: Optional[Callable[[AccessRequest], None]] = None,
    ) -> Credential:
        """Waits until an access request is decided, then redeems it.

        Follows WatchAccessRequest until the request leaves PENDING; once approved it
        sends the very same request again with the access request id (as
        ``spiffe-broker request --wait`` does) and returns the credential. A request this
        client did not make is rebuilt from the broker's record of it (profile, scopes,
        TTL, intent); x509 profiles need the original :class:`PendingApproval` (its CSR).

        ``on_update`` is called with every state the broker streams (first the current
        one), e.g. to tell a person how many approvals are still missing.

        Raises :class:`ApprovalDenied`, :class:`ApprovalExpired`, or
        :class:`ApprovalTimeout` after ``timeout`` seconds (None: wait as long as the
        request can stay pending).
        """
        ar_id = pending.id if isinstance(pending, PendingApproval) else pending
        with self._lock:
            original = (
                pending._request if isinstance(pending, PendingApproval) else self._pending.get(ar_id)
            )
        last = self._watch_until_decided(ar_id, timeout, on_update)
        state = last.state
        if state in (pb.ACCESS_REQUEST_STATE_APPROVED, pb.ACCESS_REQUEST_STATE_ISSUED):
            # ISSUED: already redeemed; redeeming again returns the same credential.
            req = pb.IssueCredentialRequest()
            req.CopyFrom(original if original is not None else conv.request_from_access_request(last))
            req.access_request_id = ar_id
            resp: pb.IssueCredentialResponse = self._call("IssueCredential", req, None)
            if not resp.HasField("credential"):
                raise BrokerClientError(f"access request {ar_id} was approved but no credential was issued")
            with self._lock:
                self._pending.pop(ar_id, None)
            return conv.credential(resp)
        final = conv.access_request(last)
        if state == pb.ACCESS_REQUEST_STATE_DENIED:
            reasons = "; ".join(f"{r.reviewer}: {r.reason}" for r in final.reviews if not r.approve)
            raise ApprovalDenied(final, f"access request {ar_id} was denied ({reasons or 'no reason'})")
        if state == pb.ACCESS_REQUEST_STATE_EXPIRED:
            raise ApprovalExpired(final, f"access request {ar_id} expired undecided")
        raise ApprovalFailed(final)

    def _watch_until_decided(
        self,
        ar_id: str,
        timeout: Optional[float],
        on_update: Optional[Callable[[AccessRequest], None]],
    ) -> pb.AccessRequest:
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Optional[pb.AccessRequest] = None
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ApprovalTimeout(ar_id, timeout or 0.0)
            with self._use() as gen:
                stream = gen.broker.WatchAccessRequest(pb.GetAccessRequestRequest(id=ar_id), timeout=left)
                try:
                    for msg in stream:
                        assert isinstance(msg, pb.AccessRequest)
                        last = msg
                        if on_update is not None:
                            on_update(conv.access_request(msg))
                        if msg.state != pb.ACCESS_REQUEST_STATE_PENDING:
                            return msg
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
                        raise ApprovalTimeout(ar_id, timeout or 0.0) from None
                    raise self._error(e, "WatchAccessRequest") from None
                finally:
                    stream.cancel()
            # The stream ended while still pending (e.g. the broker restarted): watch again.
            log.info("watch of access request %s ended while pending; watching again", ar_id)
            if last is None:
                raise BrokerClientError(f"WatchAccessRequest {ar_id} ended without a state")

    def explain(
        self,
        profile: str,
        scopes: Union[str, Iterable[str]] = (),
        ttl: Optional[TTL] = None,
        intent_action: Optional[str] = None,
        intent_target: Optional[str] = None,
        *,
        artifact_digest: Optional[str] = None,
        ticket: Optional[str] = None,
        justification: Optional[str] = None,
        on_behalf_of: Sequence[str] = (),
        break_glass: bool = False,
        timeout: Optional[float] = None,
    ) -> Decision:
        """What policy would decide for this request, and why (ExplainDecision; a dry run:
        nothing is issued or recorded)."""
        req = self._issue_request(
            profile, scopes, ttl, intent_action, intent_target, artifact_digest, ticket,
            justification, on_behalf_of, break_glass, None, None, None,
        )
        return conv.decision(self._call("ExplainDecision", pb.ExplainDecisionRequest(request=req), timeout))

    def lease(
        self,
        profile: str,
        scopes: Union[str, Iterable[str]] = (),
        ttl: Optional[TTL] = None,
        intent_action: Optional[str] = None,
        intent_target: Optional[str] = None,
        *,
        renew_fraction: float = 0.5,
        approval_timeout: Optional[float] = None,
        on_lost: Optional[Callable[[BaseException], None]] = None,
        **intent: Any,
    ) -> ManagedLease:
        """A context manager that holds a credential for the duration of a ``with`` block:
        issued on entry, renewed in a background thread each time ``renew_fraction`` of
        its lifetime has passed, released on exit. See :class:`ManagedLease`.

        Extra keyword arguments are those of :meth:`request` (``artifact_digest``,
        ``ticket``, ``justification``, ``on_behalf_of`` …). When the profile needs
        approval, entering raises :class:`ApprovalRequired`, unless ``approval_timeout``
        is given: then it waits that long for the approval.
        """
        return ManagedLease(
            self,
            dict(profile=profile, scopes=scopes, ttl=ttl, intent_action=intent_action,
                 intent_target=intent_target, **intent),
            ttl=ttl,
            renew_fraction=renew_fraction,
            approval_timeout=approval_timeout,
            on_lost=on_lost,
        )

    # -- Approvals ---------------------------------------------------------------------

    def list_access_requests(self, filter: str = "to_review", *, page_size: int = 0,
                             timeout: Optional[float] = None) -> List[AccessRequest]:
        """Access requests this caller can act on: ``to_review`` (default), ``pending``,
        ``mine`` or ``post_review`` (ListAccessRequests)."""
        try:
            f = _FILTERS[filter]
        except KeyError:
            raise ValueError(f"filter must be one of {', '.join(_FILTERS)}, not {filter!r}") from None
        resp: pb.ListAccessRequestsResponse = self._call(
            "ListAccessRequests", pb.ListAccessRequestsRequest(filter=f, page_size=page_size),
            timeout, approvals=True,
        )
        return [conv.access_request(r) for r in resp.access_requests]

    def review(self, access_request_id: str, approve: bool, reason: str, *,
               timeout: Optional[float] = None) -> AccessRequest:
        """Approves or denies an access request as this workload (an approver); the
        reason is required and recorded (ReviewAccessRequest)."""
        resp: pb.ReviewAccessRequestResponse = self._call(
            "ReviewAccessRequest",
            pb.ReviewAccessRequestRequest(id=access_request_id, approve=approve, reason=reason),
            timeout, approvals=True,
        )
        return conv.access_request(resp.access_request)

    def approve(self, access_request_id: str, reason: str, **kw: Any) -> AccessRequest:
        """Approves an access request (see :meth:`review`)."""
        return self.review(access_request_id, True, reason, **kw)

    def deny(self, access_request_id: str, reason: str, **kw: Any) -> AccessRequest:
        """Denies an access request (see :meth:`review`)."""
        return self.review(access_request_id, False, reason, **kw)

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Closes the channels, the bridge (and its directory) and, if the client opened
        it, the X509Source. Running calls are cancelled. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            gens = list(self._retired)
            current = getattr(self, "_current", None)
            if current is not None:
                gens.append(current)
            self._retired.clear()
        source = getattr(self, "_source", None)
        if source is not None:
            source.unsubscribe_for_updates(self._on_source_update)
        for g in gens:
            g.channel.close()
        if self._bridge is not None:
            self._bridge.close()
        if source is not None and self._owns_source:
            source.close()

    def __enter__(self) -> "BrokerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BrokerClient(broker_addr={self.broker_addr!r}, broker_id={self.broker_id!r})"


def _split_addr(addr: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"broker address must be host:port, got {addr!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True

