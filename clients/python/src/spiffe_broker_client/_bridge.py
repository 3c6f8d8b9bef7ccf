"""An in-process TLS bridge: grpcio speaks plaintext HTTP/2 to a private Unix socket,
and the bridge carries each connection to the broker over TLS that *it* verifies.

Why: grpcio (C-core/BoringSSL) can only check a server's host name, and its Python API
offers neither a custom verifier nor the peer certificate on the client side. A SPIFFE
server is identified by the URI SAN of its X.509-SVID, so the handshake has to be done
by code that can look at the certificate: Python's ``ssl``.

How, per connection grpcio opens to the socket:

1. the peer must be this very process (``SO_PEERCRED`` where the OS has it); the socket
   lives in a 0700 directory of this process's user, so no other user can reach it;
2. the bridge opens TCP to the broker and does the TLS handshake with the *current*
   SSLContext (current X.509-SVID, the broker trust domain's bundle, ALPN ``h2``);
3. it requires the peer leaf to carry exactly the expected SPIFFE ID
   (:func:`._tls.peer_problem`); on any failure it closes both sides before a single
   byte of the request is forwarded, and records why, so the client can turn grpcio's
   bare UNAVAILABLE into an error that names what the peer presented;
4. then it copies bytes both ways until either side closes.

Everything runs on one asyncio loop in one daemon thread: asyncio drives TLS through
``SSLObject`` memory BIOs, so no ``SSLSocket`` is ever read and written from two threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import weakref
from typing import Callable, Optional, Set

import grpc

from ._tls import peer_problem
from .errors import BrokerError, BrokerIdentityMismatch, BrokerTLSError

log = logging.getLogger("spiffe_broker_client.bridge")

_CHUNK = 64 * 1024
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


class TlsBridge:
    """Listens on ``socket_path`` (inside ``directory``, mode 0700) and forwards every
    accepted connection to ``host:port`` over verified TLS.

    ``context`` is called for each new connection, so a rotated SVID is presented by
    every connection opened after the rotation.
    """

    def __init__(
        self,
        host: str,
        port: int,
        expected_id: str,
        context: Callable[[], ssl.SSLContext],
        *,
        server_hostname: Optional[str] = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self._host = host
        self._port = port
        self._expected = expected_id
        self._context = context
        self._sni = server_hostname
        self._connect_timeout = connect_timeout
        # mkdtemp creates the directory 0700, owned by this process's user.
        self.directory = tempfile.mkdtemp(prefix="spiffe-broker-client-")
        os.chmod(self.directory, 0o700)
        self.socket_path = os.path.join(self.directory, "grpc.sock")
        # Removed even if close() is never called (at garbage collection or exit).
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True)
        self._lock = threading.Lock()
        self._last_failure: Optional[Callable[[str], BrokerError]] = None
        self.connections = 0  # connections verified and forwarded so far
        self._tasks: Set[asyncio.Task[None]] = set()
        self._server: Optional[asyncio.AbstractServer] = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="spiffe-broker-client-bridge", daemon=True
        )
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=10)
        except BaseException:
            self.close()
            raise

    # -- what the client asks -------------------------------------------------------

    def last_failure(self, rpc: str) -> Optional[BrokerError]:
        """Why the most recent connection attempt failed (a fresh exception naming
        ``rpc``), unless one succeeded since."""
        with self._lock:
            make = self._last_failure
        return None if make is None else make(rpc)

    def close(self) -> None:
        """Stops listening, drops every forwarded connection, removes the directory."""
        if self._loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            try:
                fut.result(timeout=5)
            except Exception:  # pragma: no cover - best effort at shutdown
                log.debug("bridge shutdown incomplete", exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()
        self._cleanup()

    # -- the loop ---------------------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_unix_server(self._accepted, path=self.socket_path)
        os.chmod(self.socket_path, 0o600)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception:  # never let one connection take the loop down
            log.exception("bridge connection failed")
        finally:
            self._tasks.discard(task)
            writer.close()

    def _fail(self, make: Callable[[str], BrokerError]) -> None:
        with self._lock:
            self._last_failure = make
        log.warning("connection to the broker abandoned: %s", make("").reason)

    async def _serve(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        if not _same_process(down_w.get_extra_info("socket")):
            log.warning("bridge: refused a connection from another process")
            return
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection(
                    self._host,
                    self._port,
                    ssl=self._context(),
                    server_hostname=self._sni or "",
                ),
                timeout=self._connect_timeout,
            )
        except asyncio.TimeoutError:
            why = f"no TLS connection to the broker at {self._where} within {self._connect_timeout:g}s"
            self._fail(lambda rpc: BrokerTLSError(_UNAVAILABLE, why, rpc))
            return
        except ssl.SSLCertVerificationError as e:
            why = (f"the peer at {self._where} presented a certificate that does not chain "
                   f"to the trust bundle of {self._expected.split('/')[2]}: {e.verify_message or e}")
            self._fail(lambda rpc: BrokerTLSError(_UNAVAILABLE, why, rpc))
            return
        except (OSError, ssl.SSLError) as e:
            why = f"cannot connect to the broker at {self._where}: {e}"
            self._fail(lambda rpc: BrokerTLSError(_UNAVAILABLE, why, rpc))
            return
        try:
            sslobj = up_w.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            problem = peer_problem(der, self._expected)
            if problem is not None:
                self._fail(lambda rpc: BrokerIdentityMismatch(self._expected, problem, rpc))
                return
            if sslobj.selected_alpn_protocol() != "h2":
                why = f"the broker at {self._where} did not agree to HTTP/2 (ALPN)"
                self._fail(lambda rpc: BrokerTLSError(_UNAVAILABLE, why, rpc))
                return
            with self._lock:
                self._last_failure = None
                self.connections += 1
            await _pump(down_r, down_w, up_r, up_w)
        finally:
            up_w.close()

    @property
    def _where(self) -> str:
        return f"{self._host}:{self._port}"


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    while True:
        data = await src.read(_CHUNK)
        if not data:
            return
        dst.write(data)
        await dst.drain()


async def _pump(
    down_r: asyncio.StreamReader,
    down_w: asyncio.StreamWriter,
    up_r: asyncio.StreamReader,
    up_w: asyncio.StreamWriter,
) -> None:
    """Copies both ways; when either side ends, both are closed (HTTP/2 has no use for
    a half-closed connection)."""
    tasks = {
        asyncio.ensure_future(_copy(down_r, up_w)),
        asyncio.ensure_future(_copy(up_r, down_w)),
    }
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _same_process(sock: Optional[socket.socket]) -> bool:
    """True when the Unix socket's peer is this process (Linux ``SO_PEERCRED``). Where
    the option does not exist the 0700 directory is the only guard (same user)."""
    peercred = getattr(socket, "SO_PEERCRED", None)
    if sock is None or peercred is None:
        return True
    try:
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, peercred, 12))
    except OSError:
        return False
    return bool(pid == os.getpid() and uid == os.getuid())
