"""ManagedLease: hold a credential for the duration of a ``with`` block.

Why a background thread: a short-lived credential must be renewed before it expires
whatever the block is doing (a long training job, a blocking upload). Renewal happens each
time ``renew_fraction`` of the current credential's lifetime has passed, so there is slack
for a few retries if the broker is briefly unreachable.

A refused renewal is never silent: the broker's refusal (lease revoked, policy changed …)
is kept, reading :attr:`ManagedLease.credential` raises :class:`LeaseLost` from then on,
the optional ``on_lost`` callback is called, and leaving the block raises it too if the
block itself raised nothing.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Type, Union

from .errors import (
    ApprovalRequired,
    BrokerError,
    FailedPrecondition,
    LeaseLost,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from .types import Credential, PendingApproval

if TYPE_CHECKING:  # pragma: no cover
    from .client import BrokerClient

log = logging.getLogger("spiffe_broker_client.lease")

# Refusals worth retrying: the broker was unreachable, busy, or could not record.
_TRANSIENT = (Unavailable, ResourceExhausted)


class ManagedLease:
    """A lease kept alive in the background while a ``with`` block runs.

    Created by :meth:`BrokerClient.lease`; entering issues the credential (waiting for
    approval if asked to) and starts renewing; leaving stops renewing and releases the
    lease, so the credential stops working as soon as the block is done.
    """

    def __init__(
        self,
        client: "BrokerClient",
        request: Dict[str, Any],
        *,
        ttl: Union[timedelta, int, float, None],
        renew_fraction: float = 0.5,
        approval_timeout: Optional[float] = None,
        on_lost: Optional[Callable[[BaseException], None]] = None,
    ) -> None:
        if not 0.05 <= renew_fraction <= 0.9:
            raise ValueError("renew_fraction must be between 0.05 and 0.9")
        self._client = client
        self._request = request
        self._ttl = ttl
        self._fraction = renew_fraction
        self._approval_timeout = approval_timeout
        self._on_lost = on_lost
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._credential: Optional[Credential] = None
        self._obtained_at: Optional[datetime] = None
        self._error: Optional[LeaseLost] = None
        self._renewals = 0
        self._thread: Optional[threading.Thread] = None

    # -- what the block reads ----------------------------------------------------------

    @property
    def credential(self) -> Credential:
        """The current credential (replaced after each renewal). Raises :class:`LeaseLost`
        once a renewal was refused or the credential expired."""
        with self._cond:
            if self._error is not None:
                raise self._error
            cred = self._credential
        if cred is None:
            raise RuntimeError("the lease is only held inside its with block")
        if cred.remaining() <= timedelta(0):
            raise LeaseLost(cred.lease_id, "the credential expired before it could be renewed")
        return cred

    @property
    def lease_id(self) -> str:
        with self._cond:
            if self._credential is None:
                raise RuntimeError("the lease is only held inside its with block")
            return self._credential.lease_id

    @property
    def renewals(self) -> int:
        """Renewals done by this lease's background thread so far."""
        with self._cond:
            return self._renewals

    @property
    def error(self) -> Optional[LeaseLost]:
        """Why the lease was lost, if it was."""
        with self._cond:
            return self._error

    def wait_renewed(self, count: int = 1, timeout: Optional[float] = None) -> bool:
        """Blocks until ``count`` renewals happened in total (or the lease was lost, or
        ``timeout`` passed); True when they did."""
        with self._cond:
            self._cond.wait_for(lambda: self._renewals >= count or self._error is not None, timeout)
            return self._renewals >= count

    # -- with ---------------------------------------------------------------------------

    def __enter__(self) -> "ManagedLease":
        result = self._client.request(**self._request)
        if isinstance(result, PendingApproval):
            if self._approval_timeout is None:
                raise ApprovalRequired(result.access_request)
            result = self._client.wait_for_approval(result, self._approval_timeout)
        with self._cond:
            self._credential = result
            self._obtained_at = datetime.now(timezone.utc)
        self._thread = threading.Thread(
            target=self._run, name=f"spiffe-broker-lease-{result.lease_id[:8]}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            cred, lost = self._credential, self._error
        if cred is not None:
            try:
                self._client.release(cred.lease_id)
            except (FailedPrecondition, NotFound):
                if lost is None:
                    raise
                # Already revoked or expired: nothing left to give back.
            except BrokerError as e:
                if exc is None:
                    raise
                log.warning("lease %s: release failed (%s); it expires at %s",
                            cred.lease_id, e.reason, cred.expires_at.isoformat())
        if lost is not None and exc is None:
            raise lost

    # -- the renewing thread -----------------------------------------------------------

    def _run(self) -> None:
        backoff = 1.0
        retry_at: Optional[datetime] = None  # set while renewals fail transiently
        while True:
            with self._cond:
                cred, obtained = self._credential, self._obtained_at
            assert cred is not None and obtained is not None
            if cred.lease.max_expires_at is not None and cred.expires_at >= cred.lease.max_expires_at:
                # Renewals can't extend it any more: hold it until it expires.
                if self._stop.wait(max(cred.remaining().total_seconds(), 0.0)):
                    return
                self._lose(LeaseLost(cred.lease_id, "reached the profile's max TTL"), None)
                return
            if retry_at is None:
                lifetime = max((cred.expires_at - obtained).total_seconds(), 0.0)
                due = obtained + timedelta(seconds=lifetime * self._fraction)
            else:
                due = retry_at
            if self._stop.wait(max((due - datetime.now(timezone.utc)).total_seconds(), 0.0)):
                return
            try:
                new = self._client.renew(cred.lease_id, self._ttl)
            except _TRANSIENT as e:
                left = cred.remaining().total_seconds()
                if left <= 0:
                    self._lose(LeaseLost(cred.lease_id, f"expired while renewals failed: {e.reason}"), e)
                    return
                pause = min(backoff, max(left / 4, 0.1))
                backoff = min(backoff * 2, 30.0)
                retry_at = datetime.now(timezone.utc) + timedelta(seconds=pause)
                log.warning("lease %s: renewal failed (%s); retrying in %.1fs",
                            cred.lease_id, e.reason, pause)
                continue
            except BrokerError as e:
                self._lose(LeaseLost(cred.lease_id, f"renewal refused: {e}"), e)
                return
            except Exception as e:  # e.g. the client was closed under us
                self._lose(LeaseLost(cred.lease_id, f"renewal failed: {e}"), e)
                return
            backoff, retry_at = 1.0, None
            with self._cond:
                self._credential = new
                self._obtained_at = datetime.now(timezone.utc)
                self._renewals += 1
                self._cond.notify_all()
            log.debug("lease %s renewed until %s", new.lease_id, new.expires_at.isoformat())

    def _lose(self, lost: LeaseLost, cause: Optional[BaseException]) -> None:
        lost.__cause__ = cause
        log.warning("%s", lost)
        with self._cond:
            self._error = lost
            self._cond.notify_all()
        if self._on_lost is not None:
            try:
                self._on_lost(lost)
            except Exception:
                log.exception("on_lost callback failed")
