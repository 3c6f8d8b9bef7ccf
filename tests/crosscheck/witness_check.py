#!/usr/bin/env python3
"""Independent cross-check of spiffe-broker's transparency-log witness support.

Written from the C2SP specifications, sharing no code with the Rust implementation:

- c2sp.org/signed-note: note = text (ending in "\\n"), an empty line, then signature
  lines `— <name> <base64(4-byte key ID || signature)>\\n` (— is U+2014); verifier
  key `name+<8 hex key ID>+base64(type || public key)`, key ID =
  SHA-256(name || "\\n" || type || public key)[:4]; log keys are Ed25519, type 0x01,
  signing the note text;
- c2sp.org/tlog-checkpoint: origin, decimal size without leading zeros, base64 root
  hash, optional extension lines;
- c2sp.org/tlog-cosignature (cosignature/v1, Ed25519): key ID with type 0x04,
  signature = key ID(4) || timestamp (u64 big-endian, seconds) || Ed25519(64) over
  "cosignature/v1\\ntime <timestamp>\\n" || checkpoint text;
- c2sp.org/tlog-witness add-checkpoint: `POST <prefix>/add-checkpoint` with
  "old <size>\\n", up to 63 base64 consistency-proof lines, an empty line, and the
  signed checkpoint; 404 unknown origin, 403 no valid trusted signature, 400
  malformed or old > size, 409 (body "<size>\\n", Content-Type text/x.tlog.size)
  when old is not the witness's latest cosigned size, 422 when the consistency
  check fails, 200 with cosignature lines after persisting; monitoring
  `GET <prefix>/<hex SHA-256(origin)>/checkpoint`;
- Merkle trees (RFC 6962 §2.1 / RFC 9162 §2.1): own consistency-proof generation
  (RFC 6962 §2.1.2 SUBPROOF) and verification (RFC 9162 §2.1.4.2).

The Merkle and note code is first checked against published known-answer vectors
(the RFC 6962 test tree of transparency-dev/merkle with its consistency proofs, the
golang.org/x/mod/sumdb/note example note, a published cosignature/v1 verifier key
and cosignature timestamp, the C2SP tlog-cosignature example), so a pass means
agreement with the standards and not only with the broker.

Two directions:

  A) `spiffe-broker witness` driven by an independent Python log: a Python Ed25519
     log key (and a second one), trees of random leaves, checkpoints signed here.
     Checked: the printed vkey (type 0x04, key ID) and its file; first submission
     from old 0 -> 200 with a cosignature that verifies here (name, key ID,
     timestamp near now); the state file exists when the 200 arrives; the same
     checkpoint again -> 200; growth with a valid proof -> 200; stale old -> 409
     with the right size body and Content-Type text/x.tlog.size; split views (same
     size other root; a larger tree that does not extend the witnessed one, with
     its own proof; tampered, truncated, padded and missing proofs) -> rejected
     and the state unchanged (monitoring GET, then a correct submission from the
     old size still works); rollback -> 400 (old > size) / 409 (stale old); a
     flipped log-signature byte and an impostor key of the same name -> 403; an
     unknown extra signature is ignored; unknown origin -> 404; a size-0
     checkpoint with a non-empty root and a non-empty proof from old 0 -> rejected;
     malformed bodies (`old 01`, no empty line, non-base64 proof line) -> 400;
     concurrent submissions from one old size -> exactly one 200 (atomic
     check-and-update); the monitoring GET -> the note with the log's signature and
     the witness's cosignature, both verified here, 404 before any cosignature and
     for unknown origins; a SIGKILLed witness restarted with the same --state and
     --key keeps its vkey and its sizes (409 with the same size for old 0).
  B) `spiffe-broker dev --witness URL,VKEY --checkpoint-interval 1s` submitting to
     an independent Python witness (http.server, a lock around check and update).
     The log grows through `spiffe-broker request` as the dev deploy agent (as
     verify_log.py does). Checked: every request is a POST to /add-checkpoint whose
     body parses per spec and whose checkpoint verifies with the broker's log vkey
     (/log/vkey = STATE/keys/log.vkey); the first has old 0 and an empty proof;
     every later one carries the size this witness last cosigned and a consistency
     proof that verifies here; once the witness answers 409 claiming an earlier
     size (after rolling its state back to it), the broker retries from that size
     with a valid proof; the broker's /log/checkpoint carries this witness's
     cosignature, which verifies here.

Usage:
  witness_check.py               KATs, then A and B against the binary
  witness_check.py --part a|b    only one direction (plus the KATs)
  witness_check.py --self-test   KATs, then A's scenario against the Python witness,
                                 and B's harness against a small fake broker defined
                                 at the end of this file (no spiffe-broker needed)

Env:  SPIFFE_BROKER_BIN        broker binary (default <repo>/target/debug/spiffe-broker)
      WITNESS_CHECK_KEEP=1     keep the temp dirs (their paths are printed)

Each check prints `PASS name` or `FAIL name: why`; the last line is
`N passed, M failed`; the exit code is non-zero on any failure.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import http.server
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

REPO = Path(__file__).resolve().parents[2]
EM_DASH = "\u2014"
TYPE_ED25519 = 0x01       # signed-note Ed25519 (log keys)
TYPE_COSIGNATURE = 0x04   # tlog-cosignature cosignature/v1 Ed25519 (witness keys)
EMPTY_ROOT = hashlib.sha256(b"").digest()
SIZE_CONTENT_TYPE = "text/x.tlog.size"
MAX_PROOF_LINES = 63
POLL_STEP = 0.1
HTTP_TIMEOUT = 10.0


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.notes: list[str] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"PASS {name}" + (f" ({detail})" if detail else ""), flush=True)
        else:
            self.failed += 1
            print(f"FAIL {name}: {detail or 'failed'}", flush=True)
        return ok

    def problems(self, name: str, problems: list[str], ok_detail: str = "") -> bool:
        if not problems:
            return self.check(name, True, ok_detail)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return self.check(name, False, problems[0] + more)

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        print(f"NOTE {msg}", flush=True)

    @staticmethod
    def section(title: str) -> None:
        print(f"[{title}]", flush=True)


def one_line(s: str, limit: int = 200) -> str:
    s = s.replace("\n", "\\n")
    return s if len(s) <= limit else s[: limit - 3] + "..."


# --------------------------------------------------------------------------------------
# Merkle trees: RFC 6962 §2.1 (hashing, §2.1.2 consistency proofs),
# RFC 9162 §2.1.4.2 (consistency proof verification)
# --------------------------------------------------------------------------------------


def sha256(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def leaf_hash(data: bytes) -> bytes:
    return sha256(b"\x00", data)


def node_hash(left: bytes, right: bytes) -> bytes:
    return sha256(b"\x01", left, right)


def split_point(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


class Tree:
    """An append-only list of leaf hashes with MTH and PROOF of RFC 6962 §2.1."""

    def __init__(self, entries: list[bytes] | None = None) -> None:
        self.leaves: list[bytes] = []
        self._memo: dict[tuple[int, int], bytes] = {}
        for e in entries or []:
            self.append(e)

    def append(self, entry: bytes) -> None:
        self.leaves.append(leaf_hash(entry))

    def grow_to(self, n: int) -> "Tree":
        while len(self.leaves) < n:
            self.append(os.urandom(24))
        return self

    def __len__(self) -> int:
        return len(self.leaves)

    def mth(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]); ranges never change once the leaves exist (append-only)."""
        n = hi - lo
        if n == 0:
            return EMPTY_ROOT
        if n == 1:
            return self.leaves[lo]
        got = self._memo.get((lo, hi))
        if got is None:
            k = split_point(n)
            got = node_hash(self.mth(lo, lo + k), self.mth(lo + k, hi))
            self._memo[(lo, hi)] = got
        return got

    def root(self, n: int) -> bytes:
        if not 0 <= n <= len(self.leaves):
            raise ValueError(f"tree of {len(self.leaves)} leaves has no size {n}")
        return self.mth(0, n)

    def consistency(self, m: int, n: int) -> list[bytes]:
        """PROOF(m, D[n]) of RFC 6962 §2.1.2 (empty for m = 0 and m = n)."""
        if not 0 <= m <= n <= len(self.leaves):
            raise ValueError(f"no consistency proof {m} -> {n} in a tree of {len(self.leaves)}")
        if m == 0 or m == n:
            return []
        return self._subproof(m, 0, n, True)

    def _subproof(self, m: int, lo: int, hi: int, b: bool) -> list[bytes]:
        """SUBPROOF(m, D[lo:hi], b)."""
        n = hi - lo
        if m == n:
            return [] if b else [self.mth(lo, hi)]
        k = split_point(n)
        if m <= k:
            return self._subproof(m, lo, lo + k, b) + [self.mth(lo + k, hi)]
        return self._subproof(m - k, lo + k, hi, False) + [self.mth(lo, lo + k)]


def verify_consistency(m: int, n: int, old_root: bytes, new_root: bytes,
                       proof: list[bytes]) -> str | None:
    """None if `proof` proves the tree of size n (new_root) extends the tree of size m
    (old_root), else why not. m = 0 and m = n follow tlog-witness (the proof must be
    empty; for m = n the roots must be equal); 0 < m < n is RFC 9162 §2.1.4.2."""
    if m > n:
        return f"old size {m} exceeds new size {n}"
    if m == n:
        if proof:
            return f"proof between equal sizes must be empty, has {len(proof)} hashes"
        return None if old_root == new_root else "same size, different root"
    if m == 0:
        return None if not proof else f"proof from size 0 must be empty, has {len(proof)} hashes"
    # 1.
    if not proof:
        return "empty proof"
    path = list(proof)
    # 2.
    if m & (m - 1) == 0:
        path.insert(0, old_root)
    # 3.
    fn, sn = m - 1, n - 1
    # 4.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5.
    fr = sr = path[0]
    # 6.
    for c in path[1:]:
        if sn == 0:  # a.
            return "proof has more hashes than the trees have levels"
        if fn & 1 or fn == sn:  # b.
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1  # c.
        sn >>= 1
    # 7.
    if sn != 0:
        return "proof is too short"
    if fr != old_root:
        return "proof does not lead to the old root"
    if sr != new_root:
        return "proof does not lead to the new root"
    return None


# --------------------------------------------------------------------------------------
# c2sp.org/signed-note, tlog-checkpoint, tlog-cosignature
# --------------------------------------------------------------------------------------


class NoteError(Exception):
    pass


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def b64decode_strict(s: str) -> bytes:
    """RFC 4648 §4 standard base64, padded and canonical, nothing else."""
    if not re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", s) or len(s) % 4:
        raise NoteError(f"not standard base64: {s[:24]!r}")
    try:
        raw = base64.b64decode(s, validate=True)
    except binascii.Error as e:
        raise NoteError(f"not standard base64: {e}") from None
    if b64(raw) != s:
        raise NoteError(f"non-canonical base64: {s[:24]!r}")
    return raw


def valid_key_name(name: str) -> bool:
    return bool(name) and not any(c.isspace() or c == "+" or ord(c) < 0x20 for c in name)


def key_id(name: str, key_type: int, public: bytes) -> bytes:
    return sha256(name.encode("utf-8"), b"\n", bytes([key_type]), public)[:4]


def raw_public(sk: Ed25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def make_vkey(name: str, key_type: int, public: bytes) -> str:
    return f"{name}+{key_id(name, key_type, public).hex()}+{b64(bytes([key_type]) + public)}"


class VKey:
    """A parsed Ed25519 verifier key of type 0x01 (log) or 0x04 (cosignature/v1)."""

    def __init__(self, text: str, key_type: int) -> None:
        self.text = text.strip()
        parts = self.text.split("+", 2)  # the base64 key may contain '+'
        if len(parts) != 3:
            raise NoteError(f"verifier key {self.text[:40]!r} is not name+keyid+key")
        name, id_hex, key_b64 = parts
        if not valid_key_name(name):
            raise NoteError(f"invalid key name {name!r}")
        if not re.fullmatch(r"[0-9a-f]{8}", id_hex):
            raise NoteError(f"key ID {id_hex!r} is not 8 lowercase hex digits")
        raw = b64decode_strict(key_b64)
        if len(raw) != 33 or raw[0] != key_type:
            raise NoteError(f"key is not type 0x{key_type:02x} with 32 bytes "
                            f"(type 0x{raw[0] if raw else 0:02x}, {len(raw) - 1} bytes)")
        self.name, self.type, self.public, self.id = name, key_type, raw[1:], bytes.fromhex(id_hex)
        if key_id(name, key_type, self.public) != self.id:
            raise NoteError(f"key ID {id_hex} is not SHA-256(name || 0x0A || 0x{key_type:02x} || key)[:4]")
        self._key = Ed25519PublicKey.from_public_bytes(self.public)

    def verify(self, message: bytes, sig: bytes) -> bool:
        try:
            self._key.verify(sig, message)
            return True
        except InvalidSignature:
            return False


class LogSigner:
    """A log's Ed25519 note key (type 0x01); the name is the log's origin."""

    def __init__(self, name: str, sk: Ed25519PrivateKey | None = None) -> None:
        self.name = name
        self.sk = sk or Ed25519PrivateKey.generate()
        self.public = raw_public(self.sk)
        self.id = key_id(name, TYPE_ED25519, self.public)
        self.vkey = make_vkey(name, TYPE_ED25519, self.public)

    def sig_line(self, text: str) -> str:
        return f"{EM_DASH} {self.name} {b64(self.id + self.sk.sign(text.encode('utf-8')))}\n"

    def sign(self, text: str, *others: "LogSigner") -> str:
        return text + "\n" + "".join(s.sig_line(text) for s in (*others, self))


def cosignature_message(text: str, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n".encode("ascii") + text.encode("utf-8")


class Cosigner:
    """A witness's cosignature/v1 Ed25519 key (type 0x04)."""

    def __init__(self, name: str, sk: Ed25519PrivateKey | None = None) -> None:
        self.name = name
        self.sk = sk or Ed25519PrivateKey.generate()
        self.public = raw_public(self.sk)
        self.id = key_id(name, TYPE_COSIGNATURE, self.public)
        self.vkey = make_vkey(name, TYPE_COSIGNATURE, self.public)

    def cosign(self, text: str, timestamp: int) -> str:
        blob = self.id + timestamp.to_bytes(8, "big") + self.sk.sign(cosignature_message(text, timestamp))
        return f"{EM_DASH} {self.name} {b64(blob)}\n"


def parse_sig_line(line: str) -> tuple[str, bytes]:
    """`— <name> <base64>` (without the newline) -> (name, blob)."""
    if not line.startswith(EM_DASH + " "):
        raise NoteError(f"signature line does not start with '— ': {line[:40]!r}")
    fields = line[2:].split(" ")
    if len(fields) != 2 or not valid_key_name(fields[0]):
        raise NoteError(f"malformed signature line {line[:60]!r}")
    blob = b64decode_strict(fields[1])
    if len(blob) < 5:
        raise NoteError("signature shorter than a key ID")
    return fields[0], blob


def split_note(note: str) -> tuple[str, list[tuple[str, bytes]]]:
    """A signed note -> (text with its final newline, [(name, blob)])."""
    if any(ord(c) < 0x20 and c != "\n" for c in note):
        raise NoteError("note contains a control character other than newline")
    if not note.endswith("\n"):
        raise NoteError("note does not end with a newline")
    cut = note.rfind("\n\n")
    if cut < 0:
        raise NoteError("note has no empty line before its signatures")
    text, block = note[: cut + 1], note[cut + 2:]
    lines = block.split("\n")[:-1]
    if not lines:
        raise NoteError("note has no signature lines")
    return text, [parse_sig_line(l) for l in lines]


def log_signature_ok(text: str, sigs: list[tuple[str, bytes]], vkey: VKey) -> bool:
    """True if some signature line is a valid signature by `vkey` (others ignored)."""
    for name, blob in sigs:
        if name == vkey.name and blob[:4] == vkey.id and len(blob) == 68 \
                and vkey.verify(text.encode("utf-8"), blob[4:]):
            return True
    return False


def cosignature_timestamp(text: str, name: str, blob: bytes, vkey: VKey) -> int:
    """Verifies a cosignature/v1 line by `vkey` over `text`; returns its timestamp."""
    if name != vkey.name:
        raise NoteError(f"cosignature name {name!r} is not {vkey.name!r}")
    if blob[:4] != vkey.id:
        raise NoteError(f"cosignature key ID {blob[:4].hex()} is not {vkey.id.hex()}")
    if len(blob) != 4 + 8 + 64:
        raise NoteError(f"cosignature is {len(blob)} bytes, not 76")
    ts = int.from_bytes(blob[4:12], "big")
    if ts >= 1 << 63:
        raise NoteError(f"timestamp {ts} exceeds 2^63-1")
    if not vkey.verify(cosignature_message(text, ts), blob[12:]):
        raise NoteError(f"cosignature/v1 Ed25519 signature (time {ts}) does not verify")
    return ts


def checkpoint_text(origin: str, size: int, root: bytes, ext: tuple[str, ...] = ()) -> str:
    return f"{origin}\n{size}\n{b64(root)}\n" + "".join(e + "\n" for e in ext)


def parse_checkpoint(text: str) -> tuple[str, int, bytes, list[str]]:
    if not text.endswith("\n"):
        raise NoteError("checkpoint text does not end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3 or any(not l for l in lines):
        raise NoteError("checkpoint text is not origin, size, root (+ non-empty extensions)")
    origin, size_s, root_s = lines[:3]
    if not re.fullmatch(r"0|[1-9][0-9]{0,19}", size_s) or int(size_s) >= 1 << 64:
        raise NoteError(f"tree size {size_s!r} is not a decimal u64 without leading zeros")
    root = b64decode_strict(root_s)
    if len(root) != 32:
        raise NoteError("root hash is not 32 bytes")
    return origin, int(size_s), root, lines[3:]


# --------------------------------------------------------------------------------------
# c2sp.org/tlog-witness add-checkpoint bodies
# --------------------------------------------------------------------------------------


def add_checkpoint_body(old: int | str, proof: list[bytes], note: str) -> bytes:
    return (f"old {old}\n" + "".join(b64(h) + "\n" for h in proof) + "\n" + note).encode("utf-8")


def parse_add_checkpoint(body: bytes) -> tuple[int, list[bytes], str]:
    """-> (old, proof, note); NoteError if the body is malformed."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NoteError(f"body is not UTF-8: {e}") from None
    nl = text.find("\n")
    if nl < 0:
        raise NoteError("no old size line")
    m = re.fullmatch(r"old (0|[1-9][0-9]{0,19})", text[:nl])
    if not m or int(m.group(1)) >= 1 << 64:
        raise NoteError(f"old size line {text[:nl][:40]!r} is not `old <decimal, no leading zeros>`")
    old = int(m.group(1))
    pos, proof = nl + 1, []
    while True:
        nl = text.find("\n", pos)
        if nl < 0:
            raise NoteError("no empty line after the proof lines")
        line, pos = text[pos:nl], nl + 1
        if line == "":
            break
        if len(proof) == MAX_PROOF_LINES:
            raise NoteError(f"more than {MAX_PROOF_LINES} proof lines")
        h = b64decode_strict(line)
        if len(h) != 32:
            raise NoteError(f"proof line is {len(h)} bytes, not a SHA-256 hash")
        proof.append(h)
    return old, proof, text[pos:]


# --------------------------------------------------------------------------------------
# An independent witness (tlog-witness), used by --self-test and by part B
# --------------------------------------------------------------------------------------


class PyWitness:
    """add-checkpoint and the monitoring GET, per tlog-witness, with a lock around the
    size check and the update (and, when given a state file, persisted before replying)."""

    def __init__(self, name: str, key_file: Path | None = None, state_file: Path | None = None,
                 log_vkeys: tuple[str, ...] = (), key_loader=None) -> None:
        sk = None
        if key_file is not None and key_file.exists():
            sk = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key_file.read_text().strip()))
        self.cosigner = Cosigner(name, sk)
        if key_file is not None and sk is None:
            key_file.write_text(self.cosigner.sk.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                serialization.NoEncryption()).hex() + "\n")
        self.vkey = self.cosigner.vkey
        self.lock = threading.Lock()
        self.keys: dict[str, list[VKey]] = {}
        for v in log_vkeys:
            self.trust(v)
        self.key_loader = key_loader  # called (once) when a request arrives and no key is known
        self.state_file = state_file
        self.latest: dict[str, dict] = {}      # origin -> {size, root, note}
        self.history: dict[str, list[tuple[int, bytes]]] = {}
        if state_file is not None and state_file.exists():
            for origin, s in json.loads(state_file.read_text()).items():
                self.latest[origin] = {"size": s["size"], "root": base64.b64decode(s["root"]),
                                       "note": s["note"]}
                self.history[origin] = [(s["size"], base64.b64decode(s["root"]))]
        self.requests: list[dict] = []
        self.arm_rollback_409 = False
        self.forced: dict | None = None
        self.server: http.server.ThreadingHTTPServer | None = None

    def trust(self, vkey_text: str) -> None:
        v = VKey(vkey_text, TYPE_ED25519)
        self.keys.setdefault(v.name, []).append(v)

    def _persist(self) -> None:
        if self.state_file is None:
            return
        data = {o: {"size": s["size"], "root": b64(s["root"]), "note": s["note"]}
                for o, s in self.latest.items()}
        tmp = self.state_file.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)

    def add_checkpoint(self, body: bytes) -> tuple[int, str, str]:
        rec: dict = {"time": time.time(), "body": body, "parsed": None, "error": None,
                     "cur_size": None, "forced": False, "proof_ok": None}
        self.requests.append(rec)
        status, ctype, text = self._add(body, rec)
        rec.update(status=status, response=text)
        return status, ctype, text

    def _add(self, body: bytes, rec: dict) -> tuple[int, str, str]:
        plain = "text/plain; charset=utf-8"
        try:
            old, proof, note = parse_add_checkpoint(body)
            text, sigs = split_note(note)
            origin, size, root, _ext = parse_checkpoint(text)
        except NoteError as e:
            rec["error"] = str(e)
            return 400, plain, f"malformed: {e}\n"
        rec["parsed"] = (old, proof, note, origin, size, root)
        if not self.keys and self.key_loader is not None:
            for v in self.key_loader():
                self.trust(v)
        keys = self.keys.get(origin)
        if not keys:
            return 404, plain, "unknown origin\n"
        if not any(log_signature_ok(text, sigs, k) for k in keys):
            rec["error"] = "no valid signature by a trusted log key"
            return 403, plain, "no valid signature by a trusted log key\n"
        if old > size:
            return 400, plain, "old size exceeds the checkpoint size\n"
        with self.lock:
            cur = self.latest.get(origin)
            cur_size, cur_root = (cur["size"], cur["root"]) if cur else (0, EMPTY_ROOT)
            rec["cur_size"] = cur_size
            hist = self.history.get(origin, [])
            if self.arm_rollback_409 and old > 0 and old == cur_size and len(hist) >= 2:
                # Claim (truthfully, after rolling back) an earlier cosigned size.
                self.arm_rollback_409 = False
                hist.pop()
                back_size, back_root = hist[-1]
                self.latest[origin] = {"size": back_size, "root": back_root, "note": ""}
                self.forced = {"claimed": back_size, "index": len(self.requests) - 1,
                               "was": cur_size}
                rec["forced"] = True
                return 409, SIZE_CONTENT_TYPE, f"{back_size}\n"
            if old != cur_size:
                return 409, SIZE_CONTENT_TYPE, f"{cur_size}\n"
            why = verify_consistency(old, size, cur_root if old else EMPTY_ROOT, root, proof)
            rec["proof_ok"] = why is None
            if why is not None:
                rec["error"] = why
                return 422, plain, f"inconsistent: {why}\n"
            line = self.cosigner.cosign(text, int(time.time()))
            self.latest[origin] = {"size": size, "root": root, "note": note + line}
            if not hist or hist[-1] != (size, root):
                hist.append((size, root))
            self.history[origin] = hist
            self._persist()
            rec["cosignature"] = line
            return 200, plain, line

    def monitor(self, path: str) -> tuple[int, str, str]:
        m = re.fullmatch(r"/([0-9a-f]{64})/checkpoint", path)
        if m:
            with self.lock:
                for origin, s in self.latest.items():
                    if hashlib.sha256(origin.encode()).hexdigest() == m.group(1) and s["note"]:
                        return 200, "text/plain; charset=utf-8", s["note"]
        return 404, "text/plain; charset=utf-8", "not found\n"

    def serve(self) -> str:
        witness = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(self, status: int, ctype: str, text: str) -> None:
                raw = text.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != "/add-checkpoint":
                    witness.requests.append({"time": time.time(), "body": body, "path": self.path,
                                             "status": 404, "error": "wrong path", "parsed": None,
                                             "forced": False, "cur_size": None, "proof_ok": None})
                    return self._reply(404, "text/plain", "not found\n")
                try:
                    self._reply(*witness.add_checkpoint(body))
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    self._reply(500, "text/plain", f"{e}\n")

            def do_GET(self) -> None:  # noqa: N802
                self._reply(*witness.monitor(self.path))

            def log_message(self, *_args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


# --------------------------------------------------------------------------------------
# Known-answer self-test
# --------------------------------------------------------------------------------------

# RFC 6962 test tree (transparency-dev/merkle): entries, roots of sizes 0..8, and the
# reference consistency proofs.
KAT_ENTRIES = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
               "606162636465666768696a6b6c6d6e6f"]
KAT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
KAT_CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
# golang.org/x/mod/sumdb/note's example verifier key and note (type 0x01).
KAT_NOTE_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
KAT_NOTE_TEXT = ("If you think cryptography is the answer to your problem,\n"
                 "then you don't know what your problem is.\n")
KAT_NOTE = (KAT_NOTE_TEXT + "\n" + EM_DASH + " PeterNeumann "
            "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n")
# A published native cosignature/v1 verifier key (transparency-dev/formats note tests).
KAT_COSIG_VKEY = "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2"
# A published cosignature/v1 signature and its timestamp (transparency-dev/formats).
KAT_COSIG_BLOB = ("ZGhGuQAAAABm/qTPeyKXD+R2rzyQsxPiP8mXum7qq/iF0u4vanlqJyocWODBt97w9uL+8qT7S5gxEHWW"
                  "OworDcFiEBYJXORmnFBOBA==", 1727964367)
# The C2SP tlog-cosignature example: its cosignature line carries the timestamp of the
# spec's example signed message ("time 1679315147").
KAT_C2SP_COSIG = ("jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJsX3b2oyin1nPZ"
                  "qhf5nNo0xUe+mbIUBkBIfZ+qnA==", 1679315147)


def kat_self_test(r: Report) -> None:
    r.section("known-answer tests")
    t = Tree([bytes.fromhex(e) for e in KAT_ENTRIES])
    bad = [f"size {n}" for n in range(9) if t.root(n).hex() != KAT_ROOTS[n]]
    r.problems("RFC 6962 reference roots of sizes 0..8", bad)

    probs = []
    for m, n, ref in KAT_CONSISTENCY:
        got = [h.hex() for h in t.consistency(m, n)]
        if got != ref:
            probs.append(f"PROOF({m}, {n}) differs from the reference")
        why = verify_consistency(m, n, t.root(m), t.root(n), [bytes.fromhex(h) for h in ref])
        if why:
            probs.append(f"reference proof {m}->{n}: {why}")
    r.problems("RFC 6962 §2.1.2 consistency proofs equal the reference vectors and verify", probs)

    # Every (m, n) of a 70-leaf random tree verifies; every single-byte change, a dropped or
    # added hash, the wrong roots and the wrong sizes fail.
    big = Tree().grow_to(70)
    probs, count = [], 0
    for n in range(0, 71):
        for m in range(0, n + 1):
            p = big.consistency(m, n)
            om, on = big.root(m), big.root(n)
            count += 1
            if verify_consistency(m, n, om, on, p):
                probs.append(f"own proof {m}->{n} does not verify")
                continue
            if m == 0:
                if verify_consistency(0, n, om, on, [on]) is None:
                    probs.append(f"non-empty proof from 0 -> {n} verified")
                continue
            if m == n:
                if n and verify_consistency(m, n, om, big.root(n - 1) if n > 1 else EMPTY_ROOT, p) is None:
                    probs.append(f"same size {m} with another root verified")
                continue
            for i in range(len(p)):
                q = list(p)
                q[i] = bytes([q[i][0] ^ 1]) + q[i][1:]
                if verify_consistency(m, n, om, on, q) is None:
                    probs.append(f"proof {m}->{n} with hash {i} changed verified")
            if verify_consistency(m, n, om, on, p[:-1]) is None:
                probs.append(f"proof {m}->{n} without its last hash verified")
            if verify_consistency(m, n, om, on, p + [on]) is None:
                probs.append(f"proof {m}->{n} with an extra hash verified")
            if verify_consistency(m, n, on, om, p) is None:
                probs.append(f"proof {m}->{n} with swapped roots verified")
            if n < 70 and verify_consistency(m, n + 1, om, big.root(n + 1), p) is None:
                probs.append(f"proof {m}->{n} verified for {m}->{n + 1}")
            if m + 1 < n and verify_consistency(m + 1, n, big.root(m + 1), on, p) is None:
                probs.append(f"proof {m}->{n} verified for {m + 1}->{n}")
    other = Tree().grow_to(70)
    for m, n in ((5, 13), (13, 20), (1, 2), (32, 64), (33, 70)):
        if verify_consistency(m, n, big.root(m), other.root(n), other.consistency(m, n)) is None:
            probs.append(f"proof {m}->{n} of an unrelated tree verified")
    r.problems("RFC 9162 §2.1.4.2 verification: all proofs of a 70-leaf tree, and their mutations",
               probs, f"{count} size pairs")

    probs = []
    try:
        k = VKey(KAT_NOTE_VKEY, TYPE_ED25519)
        text, sigs = split_note(KAT_NOTE)
        if text != KAT_NOTE_TEXT or not log_signature_ok(text, sigs, k):
            probs.append("reference note does not verify")
        for forged in (KAT_NOTE.replace("cryptography", "cryptographY"), KAT_NOTE.replace("x08go", "x08gp")):
            ft, fs = split_note(forged)
            if log_signature_ok(ft, fs, k):
                probs.append("a forged reference note verified")
    except NoteError as e:
        probs.append(f"reference note: {e}")
    r.problems("signed-note reference note and key (golang.org/x/mod/sumdb/note)", probs)

    probs = []
    try:
        v = VKey(KAT_COSIG_VKEY, TYPE_COSIGNATURE)
        if v.id.hex() != "da77ade7":
            probs.append("key ID")
    except NoteError as e:
        probs.append(f"published cosignature/v1 vkey: {e}")
    for blob_b64, ts in (KAT_COSIG_BLOB, KAT_C2SP_COSIG):
        blob = b64decode_strict(blob_b64)
        if len(blob) != 76 or int.from_bytes(blob[4:12], "big") != ts:
            probs.append(f"published cosignature {blob_b64[:8]}… is not id||u64be({ts})||sig")
    # Round trip, and the message is exactly the spec's (no other framing).
    c = Cosigner("witness.example/kat")
    text = checkpoint_text("example.com/behind-the-sofa", 20852163,
                           b64decode_strict("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="))
    name, blob = parse_sig_line(c.cosign(text, 1679315147).rstrip("\n"))
    want = ("cosignature/v1\ntime 1679315147\nexample.com/behind-the-sofa\n20852163\n"
            "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n").encode()
    try:
        if cosignature_timestamp(text, name, blob, VKey(c.vkey, TYPE_COSIGNATURE)) != 1679315147:
            probs.append("own cosignature round trip: timestamp")
        c.sk.public_key().verify(blob[12:], want)
    except (NoteError, InvalidSignature) as e:
        probs.append(f"own cosignature does not sign the spec's example message: {e}")
    try:
        VKey(c.vkey, TYPE_ED25519)
        probs.append("a type 0x04 key was accepted as a log key")
    except NoteError:
        pass
    r.problems("cosignature/v1: published key ID and timestamps, the spec's signed message", probs)

    probs = []
    n = LogSigner("example.test/kat").sign(checkpoint_text("example.test/kat", 3, EMPTY_ROOT))
    body = add_checkpoint_body(2, [EMPTY_ROOT, EMPTY_ROOT], n)
    try:
        if parse_add_checkpoint(body) != (2, [EMPTY_ROOT, EMPTY_ROOT], n):
            probs.append("round trip differs")
    except NoteError as e:
        probs.append(f"round trip: {e}")
    for bad_body in (body.replace(b"old 2", b"old 02"), body.replace(b"old 2", b"old -2"),
                     body.replace(b"old 2", b"old  2"), body.replace(b"\n\n", b"\n", 1),
                     add_checkpoint_body(0, [EMPTY_ROOT] * 64, n),
                     body.replace(b64(EMPTY_ROOT).encode(), b"!!!!", 1)):
        try:
            parse_add_checkpoint(bad_body)
            probs.append(f"malformed body accepted: {bad_body[:30]!r}")
        except NoteError:
            pass
    r.problems("add-checkpoint body format (old line, proof lines, empty line, note)", probs)

    probs = []
    # RFC 8410 §10.3's example private key (v1), and a v2 document of it with its public key.
    v1 = base64.b64decode("MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC")
    seed = bytes.fromhex("d4ee72dbf913584ad5b6d8f1f769f8ad3afe7c28cbf1d4fbe097a88f44755842")
    pub = raw_public(Ed25519PrivateKey.from_private_bytes(seed))
    inner = bytes.fromhex("020101") + v1[5:] + bytes([0x81, 33, 0]) + pub
    v2 = bytes([0x30, len(inner)]) + inner
    pem = b"-----BEGIN PRIVATE KEY-----\n" + base64.b64encode(v2) + b"\n-----END PRIVATE KEY-----\n"
    for what, doc, want in (("v1", v1, (seed, None)), ("v2", v2, (seed, pub)), ("v2 PEM", pem, (seed, pub))):
        try:
            if ed25519_pkcs8_seed(doc) != want:
                probs.append(f"{what}: wrong seed or public key")
        except ValueError as e:
            probs.append(f"{what}: {e}")
    if ed25519_pkcs8_seed(v2[:-5] + bytes(5))[1] == pub:
        probs.append("a changed embedded public key was not returned as it is")
    for bad in (v1[:-1], v2[:-1], v1.replace(bytes.fromhex("2b6570"), bytes.fromhex("2b656e"))):
        try:
            ed25519_pkcs8_seed(bad)
            probs.append(f"malformed document accepted: {bad.hex()[:24]}…")
        except ValueError:
            pass
    r.problems("PKCS#8 Ed25519 reader (RFC 8410 example key, v1 and v2)", probs)


# --------------------------------------------------------------------------------------
# HTTP and processes
# --------------------------------------------------------------------------------------


def http_call(method: str, url: str, body: bytes | None = None,
              timeout: float = HTTP_TIMEOUT) -> tuple[int, str, str]:
    """-> (status, content type, body text); status 0 on a transport error."""
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "text/plain; charset=utf-8")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", "") if e.headers else "", e.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, "", f"{type(e).__name__}: {e}"


def ed25519_pkcs8_seed(raw: bytes) -> tuple[bytes, bytes | None]:
    """An RFC 5958 OneAsymmetricKey (PKCS#8 v1 or v2, DER or PEM) holding an RFC 8410
    Ed25519 key -> (32-byte seed, embedded public key or None). Parsed here because
    `cryptography` 50 does not load v2 documents (those with the public key)."""
    if raw.lstrip().startswith(b"-----BEGIN PRIVATE KEY-----"):
        lines = raw.decode("ascii").strip().splitlines()
        if lines[-1] != "-----END PRIVATE KEY-----":
            raise ValueError("PEM without its END line")
        raw = base64.b64decode("".join(lines[1:-1]), validate=True)

    def tlv(buf: bytes, pos: int) -> tuple[int, bytes, int]:
        if pos + 2 > len(buf):
            raise ValueError("truncated DER")
        tag, length, pos = buf[pos], buf[pos + 1], pos + 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 2 or pos + n > len(buf):
                raise ValueError("unsupported DER length")
            length, pos = int.from_bytes(buf[pos:pos + n], "big"), pos + n
        if pos + length > len(buf):
            raise ValueError("truncated DER")
        return tag, buf[pos:pos + length], pos + length

    tag, seq, end = tlv(raw, 0)
    if tag != 0x30 or end != len(raw):
        raise ValueError("not one DER SEQUENCE")
    tag, version, pos = tlv(seq, 0)
    if tag != 0x02 or version not in (b"\x00", b"\x01"):
        raise ValueError(f"version is not v1 (0) or v2 (1): {version.hex()}")
    tag, alg, pos = tlv(seq, pos)
    if tag != 0x30 or alg != bytes.fromhex("06032b6570"):
        raise ValueError("algorithm is not id-Ed25519 (1.3.101.112) without parameters")
    tag, priv, pos = tlv(seq, pos)
    if tag != 0x04:
        raise ValueError("privateKey is not an OCTET STRING")
    tag, seed, rest = tlv(priv, 0)
    if tag != 0x04 or len(seed) != 32 or rest != len(priv):
        raise ValueError("CurvePrivateKey is not a 32-byte OCTET STRING")
    public = None
    if pos < len(seq):
        tag, body, pos = tlv(seq, pos)
        if tag == 0xA0:  # [0] attributes
            if pos < len(seq):
                tag, body, pos = tlv(seq, pos)
            else:
                tag = None
        if tag is not None:
            if tag != 0x81 or version != b"\x01" or len(body) != 33 or body[0] != 0:
                raise ValueError("trailing field is not a v2 [1] publicKey BIT STRING of 32 bytes")
            public = body[1:]
    if pos != len(seq):
        raise ValueError("unexpected trailing DER")
    return seed, public


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(fn, timeout: float = 30.0, step: float = POLL_STEP):
    """Calls fn every `step` s until it returns something truthy or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(step)


class Child:
    """A child process in its own session, stdout lines queued, stderr to a file."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None) -> None:
        self.log = log
        self._err = open(log, "ab")
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        e = dict(os.environ)
        e.update(env or {})
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._err, env=e, start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._err.close()

    def stderr_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text("utf-8", "replace").splitlines()[-n:])
        except OSError:
            return ""


def broker_binary() -> Path:
    b = Path(os.environ.get("SPIFFE_BROKER_BIN", REPO / "target/debug/spiffe-broker"))
    return b if b.is_absolute() else REPO / b


def capabilities(binary: Path) -> tuple[bool, bool]:
    """(has `witness`, has `dev --witness/--checkpoint-interval`)."""
    def run(args):
        try:
            return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
    w = run(["witness", "--help"])
    d = run(["dev", "--help"])
    has_dev = d is not None and d.returncode == 0 and "--witness" in d.stdout \
        and "--checkpoint-interval" in d.stdout
    return (w is not None and w.returncode == 0), has_dev


# --------------------------------------------------------------------------------------
# A) a witness driven by an independent Python log
# --------------------------------------------------------------------------------------


class WitnessUnderTest:
    url: str
    vkey_text: str
    name: str
    state_path: Path | None

    def restart(self) -> str:
        """Kills the witness hard (no clean shutdown) and starts it again on the same
        state and key; returns the vkey it reports."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def diagnostics(self) -> str:
        return ""


class RustWitness(WitnessUnderTest):
    def __init__(self, r: Report, binary: Path, tmp: Path, log_keys: list[str]) -> None:
        self.r, self.binary, self.tmp = r, binary, tmp
        self.name = "witness.test/w1"
        self.key_path = tmp / "w1.p8"
        self.state_path = tmp / "w1.json"
        self.log_keys = log_keys
        self.child: Child | None = None
        self.url, self.vkey_text = self._start("witness starts and prints its JSON line")

    def _start(self, check_name: str) -> tuple[str, str]:
        args = [str(self.binary), "witness", "--name", self.name, "--key", str(self.key_path),
                "--state", str(self.state_path)]
        for k in self.log_keys:
            args += ["--log-key", k]
        args += ["--listen", "127.0.0.1:0"]
        self.child = Child(args, self.tmp / "witness.stderr.log", {"RUST_LOG": "info"})
        line = self.child.next_line(30)
        try:
            obj = json.loads(line or "")
            listening, vkey = obj["listening"], obj["vkey"]
            if not re.fullmatch(r"127\.0\.0\.1:[1-9][0-9]*", listening) or not isinstance(vkey, str):
                raise ValueError("listening/vkey have the wrong form")
        except (ValueError, KeyError, TypeError) as e:
            self.r.check(check_name, False, f"first stdout line {line!r}: {e}; "
                         f"stderr: {one_line(self.child.stderr_tail(5))}")
            raise RuntimeError("witness did not start") from None
        self.r.check(check_name, True, f"{listening}, {vkey}")
        url = f"http://{listening}"
        poll(lambda: http_call("GET", url + "/" + "0" * 64 + "/checkpoint", timeout=2)[0] != 0, 10)
        return url, vkey

    def restart(self) -> str:
        assert self.child is not None
        self.child.stop(signal.SIGKILL)
        self.url, vkey = self._start("witness restarts after SIGKILL with the same --state and --key")
        return vkey

    def close(self) -> None:
        if self.child is not None:
            self.child.stop()

    def diagnostics(self) -> str:
        return self.child.stderr_tail() if self.child else ""


class PythonWitnessUnderTest(WitnessUnderTest):
    def __init__(self, r: Report, tmp: Path, log_keys: list[str]) -> None:
        self.tmp = tmp
        self.name = "pywitness.test/w1"
        self.state_path = tmp / "pyw.json"
        self.log_keys = log_keys
        self.w = self._make()
        self.url, self.vkey_text = self.w.serve(), self.w.vkey
        r.check("Python witness starts", True, f"{self.url}, {self.vkey_text}")

    def _make(self) -> PyWitness:
        keys = []
        for k in self.log_keys:
            p = Path(k)
            keys.append(p.read_text().strip() if p.is_file() else k)
        return PyWitness(self.name, self.tmp / "pyw.key", self.state_path, tuple(keys))

    def restart(self) -> str:
        self.w.close()
        self.w = self._make()
        self.url = self.w.serve()
        return self.w.vkey

    def close(self) -> None:
        self.w.close()


def scenario_a(r: Report, w: WitnessUnderTest, log: LogSigner, log2: LogSigner) -> None:
    """`w` trusts `log` and `log2` (and nothing else)."""
    stranger = LogSigner("example.test/unknown")
    impostor = LogSigner(log.name)  # same name, another key: must be ignored
    tree = Tree().grow_to(40)
    tree2 = Tree().grow_to(16)
    rejected = (409, 422)

    def cp(t: Tree, n: int, signer: LogSigner = log, *others: LogSigner) -> str:
        return signer.sign(checkpoint_text(signer.name, n, t.root(n)), *others)

    def submit(old, note: str, proof: list[bytes], raw: bytes | None = None) -> tuple[int, str, str]:
        return http_call("POST", w.url + "/add-checkpoint", raw if raw is not None else
                         add_checkpoint_body(old, proof, note))

    def monitor_path(origin: str) -> str:
        return f"{w.url}/{hashlib.sha256(origin.encode()).hexdigest()}/checkpoint"

    def show(res: tuple[int, str, str]) -> str:
        return f"HTTP {res[0]} [{res[1]}] {one_line(res[2], 160)}"

    # ---- the witness's key --------------------------------------------------------------
    r.section(f"A: witness {w.url} driven by a Python log")
    try:
        wkey = VKey(w.vkey_text, TYPE_COSIGNATURE)
        r.check("witness vkey is a cosignature/v1 key: type 0x04, key ID = SHA-256(name||0x0A||0x04||key)[:4]",
                wkey.name == w.name, f"name {wkey.name!r}, ID {wkey.id.hex()}")
    except NoteError as e:
        r.check("witness vkey is a cosignature/v1 key", False, str(e))
        return
    if isinstance(w, RustWitness):
        vkey_file = w.key_path.with_suffix(".vkey")
        text = vkey_file.read_text().strip() if vkey_file.exists() else None
        r.check("the .vkey file beside the key holds the printed vkey", text == w.vkey_text,
                f"{vkey_file}: {text!r}")
        probs = []
        try:
            seed, embedded = ed25519_pkcs8_seed(w.key_path.read_bytes())
            derived = raw_public(Ed25519PrivateKey.from_private_bytes(seed))
            if derived != wkey.public:
                probs.append("its public key is not the vkey's")
            if embedded is not None and embedded != derived:
                probs.append("the public key embedded in the PKCS#8 v2 document is not the seed's")
            mode = w.key_path.stat().st_mode & 0o777
            if mode & 0o077:
                probs.append(f"mode {mode:o} lets others read it")
        except (OSError, ValueError) as e:
            probs.append(f"{w.key_path}: {e}")
        r.problems("the created --key is a PKCS#8 (RFC 5958/8410) Ed25519 key of the vkey, "
                   "not readable by others", probs)

    def cosig_check(name: str, res: tuple[int, str, str], note: str, want_status: int = 200) -> int | None:
        """`res` must be 200 with well-formed cosignature lines, one by the witness key
        verifying over the checkpoint's text with a timestamp near now."""
        if res[0] != want_status:
            r.check(name, False, show(res))
            return None
        lines = res[2].split("\n")
        probs, ts = [], None
        if not res[2].endswith("\n") or lines[-1] != "":
            probs.append("body does not end with a newline")
        text = split_note(note)[0]
        for line in lines[:-1]:
            try:
                lname, blob = parse_sig_line(line)
            except NoteError as e:
                probs.append(f"line {line[:40]!r}: {e}")
                continue
            if lname == wkey.name and blob[:4] == wkey.id:
                try:
                    ts = cosignature_timestamp(text, lname, blob, wkey)
                except NoteError as e:
                    probs.append(str(e))
        if ts is None and not probs:
            probs.append(f"no cosignature line by {wkey.name}+{wkey.id.hex()} in {one_line(res[2])}")
        if ts is not None and not (ts > 0 and abs(ts - time.time()) <= 60):
            probs.append(f"timestamp {ts} is not within 60 s of now ({int(time.time())})")
        r.problems(name, probs, f"cosignature/v1 verifies, time {ts}")
        return ts if not probs else None

    def state_is(name: str, size: int, root: bytes) -> None:
        st, _ct, body = http_call("GET", monitor_path(log.name))
        try:
            text, _ = split_note(body)
            origin, got_size, got_root, _ = parse_checkpoint(text)
            ok = st == 200 and origin == log.name and got_size == size and got_root == root
            detail = f"monitoring GET: size {got_size}" + ("" if got_root == root else ", other root")
        except NoteError as e:
            ok, detail = False, f"HTTP {st}: {e}: {one_line(body)}"
        r.check(name, ok, detail)

    # ---- monitoring before anything was cosigned ------------------------------------------
    res = http_call("GET", monitor_path(log.name))
    r.check("monitoring GET before any cosignature -> 404", res[0] == 404, show(res))

    # ---- first submission, same again, growth ---------------------------------------------
    n1 = cp(tree, 5)
    res = submit(0, n1, [])
    cosig_check("first checkpoint (size 5) from old 0 -> 200, cosignature verifies", res, n1)
    if w.state_path is not None and isinstance(w, RustWitness):
        r.check("state file exists when the 200 arrives (persisted before replying)",
                w.state_path.exists() and w.state_path.stat().st_size > 0, str(w.state_path))
    res = submit(5, n1, [])
    cosig_check("the same checkpoint again (old 5, size 5, same root) -> 200", res, n1)
    n2 = cp(tree, 13)
    res = submit(5, n2, tree.consistency(5, 13))
    cosig_check("growth 5 -> 13 with a valid consistency proof -> 200", res, n2)

    # ---- stale old sizes --------------------------------------------------------------------
    n3 = cp(tree, 20)
    for old, proof in ((5, tree.consistency(5, 20)), (0, [])):
        res = submit(old, n3, proof)
        media = res[1].split(";")[0].strip().lower()
        r.check(f"old {old} while the witness is at 13 -> 409, body \"13\\n\", Content-Type {SIZE_CONTENT_TYPE}",
                res[0] == 409 and res[2] == "13\n" and media == SIZE_CONTENT_TYPE, show(res))

    # ---- split views ------------------------------------------------------------------------
    fork = Tree().grow_to(40)  # unrelated leaves: same sizes, other roots
    res = submit(13, cp(fork, 13), [])
    r.check("split view: same size 13, other root -> rejected (C2SP says 409, the brief 422)",
            res[0] in rejected, show(res))
    if res[0] in rejected:
        r.note(f"same size, other root answered {res[0]} (C2SP tlog-witness: 409 Conflict; brief: 422)")
    res = submit(13, cp(fork, 20), fork.consistency(13, 20))
    r.check("split view: a size-20 tree not extending the witnessed one, with its own proof -> 422",
            res[0] == 422, show(res))
    # a tree that shares the first 13 leaves but where old root claims differ are covered above;
    # here a tree sharing a prefix shorter than 13 leaves:
    near = Tree()
    near.leaves = tree.leaves[:10]
    near.grow_to(20)
    res = submit(13, cp(near, 20), near.consistency(13, 20))
    r.check("split view: a tree sharing only 10 of the 13 witnessed leaves, own proof -> 422",
            res[0] == 422, show(res))
    good = tree.consistency(13, 20)
    tampered = list(good)
    tampered[0] = bytes([tampered[0][0] ^ 0x80]) + tampered[0][1:]
    for what, proof in (("one proof hash changed", tampered), ("last proof hash dropped", good[:-1]),
                        ("an extra proof hash", good + [tree.root(20)]), ("no proof at all", [])):
        res = submit(13, n3, proof)
        r.check(f"growth 13 -> 20 with {what} -> 422", res[0] == 422, show(res))
    state_is("state unchanged after the rejected submissions (size 13, its root)", 13, tree.root(13))
    res = submit(13, n3, good)
    cosig_check("the correct 13 -> 20 still works after them -> 200", res, n3)

    # ---- rollback -----------------------------------------------------------------------------
    res = submit(20, n1, [])
    r.check("rollback: checkpoint of size 5 with old 20 (old > size) -> 400", res[0] == 400, show(res))
    res = submit(5, n1, [])
    r.check("rollback: checkpoint of size 5 with old 5 -> 409 \"20\\n\"",
            res[0] == 409 and res[2] == "20\n", show(res))

    # ---- signatures and origins ---------------------------------------------------------------
    n4 = cp(tree, 25)
    p4 = tree.consistency(20, 25)
    text4, sigs4 = split_note(n4)
    name4, blob4 = sigs4[0]
    flipped = bytearray(blob4)
    flipped[4 + 20] ^= 0x01
    bad4 = text4 + "\n" + f"{EM_DASH} {name4} {b64(bytes(flipped))}\n"
    res = submit(20, bad4, p4)
    r.check("a byte of the log's signature flipped -> 403", res[0] == 403, show(res))
    res = submit(20, impostor.sign(text4), p4)
    r.check("signed only by another key under the log's name -> 403", res[0] == 403, show(res))
    res = submit(20, log.sign(text4, impostor), p4)
    cosig_check("an unknown extra signature beside the log's is ignored -> 200", res, log.sign(text4, impostor))
    res = submit(0, stranger.sign(checkpoint_text(stranger.name, 3, Tree().grow_to(3).root(3))), [])
    r.check("checkpoint of an unknown origin (untrusted Python key) -> 404", res[0] == 404, show(res))

    # ---- the second trusted log (--log-key given as a file): old 0 rules ------------------------
    res = http_call("GET", monitor_path(log2.name))
    r.check("second log: monitoring GET before any cosignature -> 404", res[0] == 404, show(res))
    res = submit(0, log2.sign(checkpoint_text(log2.name, 0, sha256(b"not empty"))), [])
    r.check("size-0 checkpoint whose root is not SHA-256(\"\") -> rejected (brief: 422; C2SP: 409)",
            res[0] in rejected, show(res))
    if res[0] in rejected:
        r.note(f"size 0 with a non-empty root answered {res[0]}")
    n2_7 = cp(tree2, 7, log2)
    res = submit(0, n2_7, [tree2.root(7)])
    r.check("non-empty proof from old 0 -> 422", res[0] == 422, show(res))
    res = submit(None, n2_7, [], raw=add_checkpoint_body("01", [], n2_7))
    r.check("`old 01` (leading zero) -> 400", res[0] == 400, show(res))
    res = submit(None, n2_7, [], raw=f"old 0\n{n2_7}".encode())
    r.check("no empty line between the old line and the checkpoint -> 400", res[0] == 400, show(res))
    res = submit(None, n2_7, [], raw=f"old 0\nnot*base64\n\n{n2_7}".encode())
    r.check("a proof line that is not base64 -> 400", res[0] == 400, show(res))
    res = submit(0, n2_7, [])
    cosig_check("second log: size 7 from old 0 after those rejections -> 200", res, n2_7)

    # ---- concurrent submissions: check and update are atomic --------------------------------------
    tree.grow_to(40)
    results: dict[int, tuple[int, str, str]] = {}

    def racer(size: int) -> None:
        results[size] = submit(25, cp(tree, size), tree.consistency(25, size))
    threads = [threading.Thread(target=racer, args=(s,)) for s in range(26, 34)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [s for s, res in results.items() if res[0] == 200]
    losers_ok = all(res[0] == 409 and winners and res[2] == f"{winners[0]}\n"
                    for s, res in results.items() if s not in winners)
    r.check("8 concurrent submissions from old 25 -> exactly one 200, the others 409 with its size",
            len(winners) == 1 and losers_ok and len(results) == 8,
            f"200 for {winners}; others {sorted({(res[0], res[2].strip()) for s, res in results.items() if s not in winners})}")
    latest = winners[0] if len(winners) == 1 else None

    # ---- monitoring GET ----------------------------------------------------------------------------
    if latest is not None:
        res = http_call("GET", monitor_path(log.name))
        probs = []
        try:
            text, sigs = split_note(res[2])
            origin, size, root, _ = parse_checkpoint(text)
            if res[0] != 200:
                probs.append(f"HTTP {res[0]}")
            if (origin, size, root) != (log.name, latest, tree.root(latest)):
                probs.append(f"serves {origin} size {size}, not {log.name} size {latest} with its root")
            if not log_signature_ok(text, sigs, VKey(log.vkey, TYPE_ED25519)):
                probs.append("the log's signature is missing or does not verify")
            mine = [(n, b) for n, b in sigs if n == wkey.name and b[:4] == wkey.id]
            if not mine:
                probs.append("no cosignature by the witness")
            for n, b in mine:
                ts = cosignature_timestamp(text, n, b, wkey)
                if abs(ts - time.time()) > 60:
                    probs.append(f"cosignature time {ts} not near now")
        except NoteError as e:
            probs.append(f"{e}: {show(res)}")
        r.problems("monitoring GET serves the latest checkpoint with the log's signature and the "
                   "witness's cosignature, both verifying", probs, f"size {latest}")
    res = http_call("GET", f"{w.url}/{hashlib.sha256(b'example.test/unknown').hexdigest()}/checkpoint")
    r.check("monitoring GET for an unknown origin -> 404", res[0] == 404, show(res))

    # ---- restart ----------------------------------------------------------------------------------
    try:
        vkey_again = w.restart()
    except RuntimeError:
        return
    r.check("after the restart the witness has the same vkey", vkey_again == w.vkey_text, vkey_again)
    if latest is not None:
        res = submit(0, cp(tree, latest), [])
        r.check(f"after the restart old 0 -> 409 \"{latest}\\n\" (size remembered)",
                res[0] == 409 and res[2] == f"{latest}\n", show(res))
        state_is("after the restart the monitoring GET serves the same size", latest, tree.root(latest))
        n5 = cp(tree, 38)
        res = submit(latest, n5, tree.consistency(latest, 38))
        cosig_check(f"after the restart growth {latest} -> 38 -> 200", res, n5)
    res = submit(0, cp(tree2, 9, log2), [])
    r.check("after the restart the second log is remembered too (old 0 -> 409 \"7\\n\")",
            res[0] == 409 and res[2] == "7\n", show(res))


def run_part_a(r: Report, binary: Path | None, keep: bool) -> None:
    """Part A against `spiffe-broker witness` (or, with binary None, the Python witness)."""
    tmp = Path(tempfile.mkdtemp(prefix="witness-check-a-"))
    w: WitnessUnderTest | None = None
    try:
        log = LogSigner("example.test/pylog")
        log2 = LogSigner("example.test/pylog2")
        (tmp / "pylog2.vkey").write_text(log2.vkey + "\n")
        log_keys = [log.vkey, str(tmp / "pylog2.vkey")]  # one as text, one as a file
        w = PythonWitnessUnderTest(r, tmp, log_keys) if binary is None else RustWitness(r, binary, tmp, log_keys)
        scenario_a(r, w, log, log2)
    except RuntimeError:
        pass
    except Exception as e:  # noqa: BLE001
        r.check("part A ran without an unexpected error", False, f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        if w is not None:
            if r.failed and w.diagnostics():
                print("--- witness stderr tail ---\n" + w.diagnostics())
            w.close()
        if keep:
            print(f"part A files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------
# B) the broker submitting to an independent Python witness
# --------------------------------------------------------------------------------------


def run_part_b(r: Report, cmd: list[str], keep: bool) -> None:
    """Part B against `cmd dev ...` (the broker binary, or in --self-test the fake broker)."""
    r.section("B: spiffe-broker dev submitting to a Python witness")
    tmp = Path(tempfile.mkdtemp(prefix="witness-check-b-"))
    state = tmp / "broker"
    vkey_file = state / "keys" / "log.vkey"

    def load_broker_key() -> list[str]:
        text = poll(lambda: vkey_file.exists() and vkey_file.read_text().strip(), 10)
        return [text] if text else []

    pyw = PyWitness("pywitness.test/w1", key_loader=load_broker_key)
    url = pyw.serve()
    grpc_port = free_port()
    http_port = free_port()
    while http_port == grpc_port:
        http_port = free_port()
    grpc, hport = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"
    base = f"http://{hport}"
    print(f"broker: {' '.join(cmd)}\nstate:  {state}   gRPC {grpc}   HTTP {hport}   witness {url}")
    broker: Child | None = None
    stop_growing = threading.Event()
    grown = {"ok": 0, "failed": 0, "last_error": ""}
    grower: threading.Thread | None = None
    try:
        state.mkdir(parents=True)
        broker = Child([*cmd, "dev", "--state-dir", str(state), "--grpc-addr", grpc,
                        "--http-addr", hport, "--checkpoint-interval", "1s",
                        "--witness", f"{url},{pyw.vkey}"], tmp / "broker.stderr.log",
                       {"RUST_LOG": os.environ.get("RUST_LOG", "info")})
        threading.Thread(target=lambda: [None for _ in iter(lambda: broker.next_line(3600), None)],
                         daemon=True).start()
        ready = poll(lambda: broker.proc.poll() is not None
                     or http_call("GET", base + "/readyz", timeout=2)[2].strip() == "ready", 30)
        if not r.check("broker dev answers `ready` on /readyz", bool(ready) and broker.proc.poll() is None,
                       f"exit {broker.proc.poll()}: {one_line(broker.stderr_tail(5))}"
                       if broker.proc.poll() is not None else ("" if ready else "not within 30 s")):
            return
        have_file = poll(lambda: vkey_file.exists() and vkey_file.read_text().strip(), 30)
        st, _ct, served = http_call("GET", base + "/log/vkey")
        try:
            bkey = VKey(served, TYPE_ED25519)
            ok = st == 200 and have_file == bkey.text
            r.check("/log/vkey is an Ed25519 note key equal to STATE/keys/log.vkey", ok,
                    f"{bkey.text}" if ok else f"HTTP {st} {served!r}, file {have_file!r}")
        except NoteError as e:
            r.check("/log/vkey is an Ed25519 note key", False, f"HTTP {st} {served!r}: {e}")
            return
        if not pyw.keys:
            pyw.trust(bkey.text)
        elif [k.text for ks in pyw.keys.values() for k in ks] != [bkey.text]:
            r.check("the witness trusts exactly the served log key", False,
                    f"{[k.text for ks in pyw.keys.values() for k in ks]}")

        # ---- make the log grow, in the background, as the dev deploy agent ----------------
        sock = state / "workloads" / "deploy-agent.sock"
        poll(lambda: sock.exists(), 30)
        env = dict(os.environ)
        env.pop("SPIFFE_BROKER_ADDR", None)
        env["SPIFFE_ENDPOINT_SOCKET"] = f"unix://{sock}"
        variants = [
            ["--profile", "gpu-scheduler-submit", "--scope", "job:submit", "--ttl", "10m",
             "--intent-action", "submit-training", "--intent-target", "queue/a100"],
            ["--profile", "gpu-scheduler-submit", "--scope", "cluster:admin",
             "--intent-action", "x", "--intent-target", "queue/a100"],  # refused, logged too
        ]

        def grow() -> None:
            i = 0
            while not stop_growing.is_set():
                try:
                    p = subprocess.run([*cmd, "request", *variants[i % 2], "--broker", grpc],
                                       stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                       env=env, timeout=30)
                    if i % 2 == 0 and p.returncode != 0:
                        grown["failed"] += 1
                        grown["last_error"] = one_line(p.stderr or p.stdout)
                    else:
                        grown["ok"] += 1
                except subprocess.TimeoutExpired:
                    grown["failed"] += 1
                i += 1
                stop_growing.wait(0.4)
        grower = threading.Thread(target=grow, daemon=True)
        grower.start()

        def accepted() -> list[dict]:
            return [q for q in pyw.requests if q.get("status") == 200]

        def distinct_sizes() -> set[int]:
            return {q["parsed"][4] for q in accepted()}

        got = poll(lambda: accepted(), 30)
        r.check("the broker submits a checkpoint the Python witness cosigns", bool(got),
                f"{len(pyw.requests)} requests" if got else
                f"none within 30 s; {len(pyw.requests)} requests: "
                f"{[(q.get('status'), q.get('error')) for q in pyw.requests[:3]]}; grower {grown}")
        if not got:
            return
        first = pyw.requests[0]
        fp = first.get("parsed")
        r.check("the first request has old 0 and an empty proof",
                fp is not None and fp[0] == 0 and fp[1] == [],
                f"old {fp[0]}, {len(fp[1])} proof lines, size {fp[4]}" if fp else f"{first.get('error')}")

        # ---- 409 once: roll back to an earlier cosigned size and claim it ----------------------
        poll(lambda: len(distinct_sizes()) >= 2, 30)
        if r.check("the witness has cosigned two sizes (the log grows, the broker resubmits)",
                   len(distinct_sizes()) >= 2, f"sizes {sorted(distinct_sizes())}; grower {grown}"):
            pyw.arm_rollback_409 = True
            forced = poll(lambda: pyw.forced, 30)
            if r.check("the witness answered 409 once, claiming its earlier cosigned size", bool(forced),
                       f"409 \"{forced['claimed']}\\n\" to a request from old {forced['was']}" if forced
                       else "no request from the latest size within 30 s"):
                idx = forced["index"]
                nxt = poll(lambda: len(pyw.requests) > idx + 1 and pyw.requests[idx + 1].get("status"), 30)
                q = pyw.requests[idx + 1] if nxt else None
                qp = q.get("parsed") if q else None
                r.check(f"after the 409 the broker retries from old {forced['claimed']} with a proof "
                        "that verifies here -> 200",
                        qp is not None and qp[0] == forced["claimed"] and q.get("status") == 200,
                        (f"old {qp[0]} -> size {qp[4]}, {len(qp[1])} proof lines, HTTP {q.get('status')} "
                         f"{q.get('error') or ''}") if qp else ("no request within 30 s" if not q
                                                                 else f"unparsable: {q.get('error')}"))

        # ---- the broker serves our cosignature -----------------------------------------------
        wkey = VKey(pyw.vkey, TYPE_COSIGNATURE)
        issued = {q["cosignature"] for q in pyw.requests if q.get("cosignature")}
        seen: dict = {}

        def served_with_cosig():
            st, _ct, note = http_call("GET", base + "/log/checkpoint", timeout=3)
            if st != 200:
                return None
            try:
                text, sigs = split_note(note)
            except NoteError as e:
                seen["err"] = str(e)
                return None
            seen["note"] = note
            for n, b in sigs:
                if n == wkey.name and b[:4] == wkey.id:
                    return text, sigs, n, b
            return None
        got = poll(served_with_cosig, 30)
        if got:
            text, sigs, n, b = got
            probs = []
            try:
                ts = cosignature_timestamp(text, n, b, wkey)
            except NoteError as e:
                probs.append(str(e))
                ts = None
            if not log_signature_ok(text, sigs, bkey):
                probs.append("the log's own signature does not verify")
            line = f"{EM_DASH} {n} {b64(b)}\n"
            issued = {q["cosignature"] for q in pyw.requests if q.get("cosignature")}
            if line not in issued:
                probs.append("the cosignature is not one this witness issued")
            r.problems("GET /log/checkpoint carries this witness's cosignature, verifying here", probs,
                       f"size {parse_checkpoint(text)[1]}, time {ts}")
        else:
            r.check("GET /log/checkpoint carries this witness's cosignature", False,
                    f"not within 30 s; served: {one_line(seen.get('note', seen.get('err', '')))}")

        # ---- every request, checked after the fact ----------------------------------------------
        stop_growing.set()
        reqs = list(pyw.requests)
        probs_form, probs_old, probs_proof, probs_status = [], [], [], []
        for i, q in enumerate(reqs):
            label = f"request {i + 1}"
            if q.get("path", "/add-checkpoint") != "/add-checkpoint":
                probs_form.append(f"{label}: POST to {q['path']}")
                continue
            if q.get("parsed") is None:
                probs_form.append(f"{label}: {q.get('error')}: {one_line(q['body'].decode('utf-8', 'replace'))}")
                continue
            old, proof, note, origin, size, root = q["parsed"]
            if origin != bkey.name:
                probs_form.append(f"{label}: origin {origin!r} is not the log key's name")
            if q.get("status") == 403:
                probs_form.append(f"{label}: the log's signature does not verify")
            if i > 0 and q.get("cur_size") is not None and old != q["cur_size"] and not q["forced"]:
                probs_old.append(f"{label}: old {old}, but the witness had cosigned {q['cur_size']} "
                                 f"(HTTP {q.get('status')})")
            if q.get("proof_ok") is False:
                probs_proof.append(f"{label}: proof {old} -> {size} ({len(proof)} hashes): {q.get('error')}")
            if q.get("status") != 200 and not q["forced"]:
                probs_status.append(f"{label}: HTTP {q.get('status')} {one_line(q.get('response', ''))} "
                                    f"(old {old}, size {size})")
        r.problems("every request is a POST to /add-checkpoint that parses per spec, from the log's "
                   "origin, and its checkpoint verifies with the log vkey", probs_form, f"{len(reqs)} requests")
        r.problems("every request after the first carries the size this witness last cosigned",
                   probs_old)
        r.problems("every consistency proof verifies (RFC 9162 §2.1.4.2)", probs_proof,
                   f"{sum(1 for q in reqs if q.get('parsed') and q['parsed'][1])} non-empty proofs")
        r.problems("every request but the forced 409 was accepted (200)", probs_status)
    except Exception as e:  # noqa: BLE001
        r.check("part B ran without an unexpected error", False, f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        stop_growing.set()
        if grower is not None:
            grower.join(35)
        if broker is not None:
            broker.stop()
            if r.failed:
                print("--- broker stderr tail ---\n" + broker.stderr_tail())
        pyw.close()
        if keep:
            print(f"part B files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

# --------------------------------------------------------------------------------------
# A stand-in for `spiffe-broker dev` / `request`, only so that --self-test can exercise
# part B's harness before the real binary has the witness flags. Not used otherwise.
# --------------------------------------------------------------------------------------


def fake_broker(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fake-broker")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dev")
    d.add_argument("--state-dir", type=Path, required=True)
    d.add_argument("--grpc-addr", required=True)
    d.add_argument("--http-addr", required=True)
    d.add_argument("--checkpoint-interval", default="1s")
    d.add_argument("--witness", action="append", default=[])
    q = sub.add_parser("request")
    q.add_argument("--broker", required=True)
    args, _rest = ap.parse_known_args(argv)
    if args.cmd == "request":
        host, port = args.broker.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as c:
            c.sendall(b"grow\n")
            c.recv(16)
        print(json.dumps({"lease_id": "fake"}))
        return 0

    log = LogSigner("fake.test/log")
    tree = Tree().grow_to(3)
    (args.state_dir / "keys").mkdir(parents=True, exist_ok=True)
    (args.state_dir / "workloads").mkdir(parents=True, exist_ok=True)
    (args.state_dir / "keys" / "log.vkey").write_text(log.vkey + "\n")
    (args.state_dir / "workloads" / "deploy-agent.sock").write_text("")
    lock = threading.Lock()
    served = {"note": log.sign(checkpoint_text(log.name, 3, tree.root(3)))}
    witnesses = [{"url": w.split(",", 1)[0], "size": 0} for w in args.witness]

    def addr(text: str) -> tuple[str, int]:
        host, port = text.rsplit(":", 1)
        return host, int(port)
    grow_srv = socket.create_server(addr(args.grpc_addr))

    def grow_loop() -> None:
        while True:
            c, _ = grow_srv.accept()
            with c:
                c.recv(16)
                with lock:
                    tree.append(os.urandom(16))
                c.sendall(b"ok\n")
    threading.Thread(target=grow_loop, daemon=True).start()

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = {"/readyz": "ready\n", "/log/vkey": log.vkey + "\n",
                    "/log/checkpoint": served["note"]}.get(self.path)
            raw = (body or "not found\n").encode()
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *_a) -> None:
            pass
    srv = http.server.ThreadingHTTPServer(addr(args.http_addr), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    interval = float(args.checkpoint_interval.rstrip("s"))
    last = -1
    while True:
        with lock:
            size = len(tree)
        if size != last:
            note = log.sign(checkpoint_text(log.name, size, tree.root(size)))
            cosigs = []
            for w in witnesses:
                for _try in range(2):
                    st, _ct, body = http_call("POST", w["url"] + "/add-checkpoint", add_checkpoint_body(
                        w["size"], tree.consistency(w["size"], size), note))
                    if st == 409:
                        w["size"] = int(body)
                        continue
                    if st == 200:
                        w["size"] = size
                        cosigs.append(body)
                    break
            served["note"] = note + "".join(cosigs)
            last = size
        time.sleep(interval)


# --------------------------------------------------------------------------------------


def main() -> int:
    if sys.argv[1:2] == ["--fake-broker"]:
        return fake_broker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--self-test", action="store_true",
                    help="the known-answer tests and part A's scenario against the Python witness")
    ap.add_argument("--part", choices=["a", "b", "all"], default="all")
    args = ap.parse_args()
    keep = os.environ.get("WITNESS_CHECK_KEEP") == "1"

    def _stop(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _stop)

    r = Report()
    started = time.monotonic()
    try:
        kat_self_test(r)
        if args.self_test:
            r.section("self-test: Python log against the Python witness")
            run_part_a(r, None, keep)
            r.section("self-test: part B's harness against a fake broker (Python log + submitter)")
            run_part_b(r, [sys.executable, str(Path(__file__).resolve()), "--fake-broker"], keep)
        else:
            binary = broker_binary()
            if not r.check("broker binary exists", binary.is_file(), str(binary)):
                raise SystemExit
            has_witness, has_dev = capabilities(binary)
            if args.part in ("a", "all"):
                if r.check("`spiffe-broker witness --help` succeeds", has_witness):
                    run_part_a(r, binary, keep)
            if args.part in ("b", "all"):
                if r.check("`spiffe-broker dev --help` lists --witness and --checkpoint-interval", has_dev):
                    run_part_b(r, [str(binary)], keep)
    except SystemExit:
        pass
    except Exception as e:  # noqa: BLE001
        r.check("unexpected error", False, f"{type(e).__name__}: {e}")
        traceback.print_exc()
    if r.passed == 0 and r.failed == 0:
        r.check("ran at least one check", False)
    print(f"({time.monotonic() - started:.1f} s)")
    print(f"{r.passed} passed, {r.failed} failed")
    return 0 if r.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
