"""Fixtures: a real `spiffe-broker dev` per test session (and a second one with 6-second
SVIDs for the rotation tests), the same way tests/crosscheck/crosscheck.py runs it: two
free loopback ports, a temp state dir, a bounded wait for the `ready` line, SIGTERM at the
end.

Env: SPIFFE_BROKER_BIN  the broker binary (default <repo>/target/debug/spiffe-broker;
                        relative paths are taken from the repository root)
     BROKER_READY_TIMEOUT  seconds to wait for `ready` (default 60)
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from spiffe_broker_client import BrokerClient

REPO = Path(__file__).resolve().parents[3]
READY_TIMEOUT = float(os.environ.get("BROKER_READY_TIMEOUT", "60"))


def broker_binary() -> Path:
    binary = Path(os.environ.get("SPIFFE_BROKER_BIN", REPO / "target/debug/spiffe-broker"))
    if not binary.is_absolute():
        binary = REPO / binary
    if not binary.is_file():
        pytest.exit(f"broker binary {binary} not found (set SPIFFE_BROKER_BIN)", returncode=2)
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DevBroker:
    """`spiffe-broker dev` as a child process, plus helpers to act as its demo identities."""

    def __init__(self, binary: Path, tmp: Path, svid_ttl: Optional[str] = None) -> None:
        self.binary = binary
        self.state = tmp / "state"
        grpc_port = free_port()
        http_port = free_port()
        while http_port == grpc_port:
            http_port = free_port()
        self.addr = f"127.0.0.1:{grpc_port}"
        self.http_addr = f"127.0.0.1:{http_port}"
        self.stderr_path = tmp / "broker.stderr.log"
        self._stderr = open(self.stderr_path, "wb")
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        args = [str(binary), "dev", "--state-dir", str(self.state),
                "--grpc-addr", self.addr, "--http-addr", self.http_addr]
        if svid_ttl:
            args += ["--svid-ttl", svid_ttl]
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        env.pop("SPIFFE_ENDPOINT_SOCKET", None)
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr,
            env=env, start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._lines.put(None)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"broker printed no `ready` within {timeout:.0f}s")
            try:
                line = self._lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=5)
                raise RuntimeError(
                    f"broker exited with {self.proc.returncode} before `ready`:\n{self.stderr_tail()}")
            if line.strip() == "ready":
                return

    def stderr_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.stderr_path.read_text("utf-8", "replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._stderr.close()

    # -- acting as the demo identities --------------------------------------------------

    def socket(self, name: str) -> str:
        """Workload API endpoint of a demo identity, e.g. ``deploy-agent``, ``alice``."""
        return f"unix://{self.state}/workloads/{name}.sock"

    def cli(self, identity: str, *args: str) -> str:
        """Runs the broker's own CLI as ``identity``; returns stdout (fails on non-zero)."""
        env = dict(os.environ, SPIFFE_ENDPOINT_SOCKET=self.socket(identity), SPIFFE_BROKER_ADDR=self.addr)
        done = subprocess.run([str(self.binary), *args], env=env, capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"spiffe-broker {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def lease(self, lease_id: str) -> dict:
        """The lease as the platform admin (`ops/root`) sees it through the CLI."""
        return json.loads(self.cli("root", "leases", "show", lease_id))

    def leases_of(self, spiffe_id: str) -> List[dict]:
        out = self.cli("root", "leases", "--spiffe-id", spiffe_id, "--limit", "1000")
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def _start(tmp: Path, svid_ttl: Optional[str] = None) -> DevBroker:
    b = DevBroker(broker_binary(), tmp, svid_ttl)
    try:
        b.wait_ready(READY_TIMEOUT)
    except BaseException:
        b.stop()
        raise
    return b


@pytest.fixture(scope="session")
def broker() -> Iterator[DevBroker]:
    with tempfile.TemporaryDirectory(prefix="sbc-test-") as tmp:
        b = _start(Path(tmp))
        try:
            yield b
        finally:
            b.stop()


@pytest.fixture(scope="session")
def rotating_broker() -> Iterator[DevBroker]:
    """A broker whose dev CA issues 6-second SVIDs (rotated every 3 s)."""
    with tempfile.TemporaryDirectory(prefix="sbc-rot-") as tmp:
        b = _start(Path(tmp), svid_ttl="6s")
        try:
            yield b
        finally:
            b.stop()


@pytest.fixture
def agent(broker: DevBroker) -> Iterator[BrokerClient]:
    """A BrokerClient as the CI pipeline agent `ci/deploy-agent`."""
    with BrokerClient(broker.addr, socket=broker.socket("deploy-agent")) as c:
        yield c


def pytest_report_header(config: pytest.Config) -> str:
    """Which copy of the package is under test (CI: the installed wheel)."""
    import spiffe_broker_client

    return f"spiffe_broker_client {spiffe_broker_client.__version__} from {Path(spiffe_broker_client.__file__).parent}"
