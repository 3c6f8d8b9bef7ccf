#!/usr/bin/env python3
"""Independent verifier of spiffe-broker's audit-log export.

Written from the specifications, sharing no code with the Rust implementation:

- hash chain: entry n (1-based) is
  SHA-256("spiffe-broker/audit/v1" 0x00 || n as u64 big-endian || hash(n-1) || body),
  with 32 zero bytes before entry 1;
- Merkle tree: RFC 9162 §2.1.1 (= RFC 6962): leaf = SHA-256(0x00 || body),
  node = SHA-256(0x01 || left || right), split at the largest power of two
  below n, empty tree = SHA-256(""); inclusion proofs checked with the
  algorithm of RFC 9162 §2.1.3.2;
- checkpoints: c2sp.org/tlog-checkpoint bodies (origin, size, base64 root) in
  c2sp.org/signed-note envelopes, Ed25519 (signature type 0x01), verifier key
  `name+<8 hex key ID>+base64(0x01 || 32-byte public key)`, key ID =
  SHA-256(name || 0x0A || 0x01 || public key)[:4]. Ed25519 is `cryptography`'s.

The hashing and note code is first checked against published known-answer
vectors (the RFC 6962 test tree of transparency-dev/merkle and the
golang.org/x/mod/sumdb/note example note), so a pass means agreement with the
standards and not only with the broker.

Usage:
  verify_log.py --export DIR [--vkey FILE]
      Verify an export written by `spiffe-broker audit export`: every entry's
      chain hash and Merkle leaf recomputed from its body, the root at every
      checkpoint size, every checkpoint signature, and proof.json's inclusion
      proof against its (signature-checked) checkpoint. Without --vkey the
      export's own log.vkey is used (it then proves integrity, not origin: pin
      the key out of band).
  verify_log.py
      End to end: start `spiffe-broker dev` in a temp state dir on free ports,
      make a few requests (allowed and refused) as the deploy agent, wait for a
      periodic checkpoint, stop the broker with SIGTERM (it signs a final
      checkpoint), export the log, verify it with the key the broker published
      at /log/vkey, and show that tampered copies of the export are rejected
      (a changed body field, a deleted line, a flipped checkpoint-signature
      byte, a truncated tail, a re-chained forgery, a corrupted proof).

Env:  SPIFFE_BROKER_BIN        broker binary (default <repo>/target/debug/spiffe-broker)
      VERIFY_LOG_READY_TIMEOUT seconds to wait for `ready` (default 60)
      VERIFY_LOG_KEEP_STATE=1  keep the temp dir (its path is printed)

The last line is `N passed, M failed`; the exit code is non-zero on any failure,
and the first failure (naming the first bad entry or checkpoint) is printed
just before it.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
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

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = float(os.environ.get("VERIFY_LOG_READY_TIMEOUT", "60"))
CALL_TIMEOUT = 60.0

CHAIN_DOMAIN = b"spiffe-broker/audit/v1\x00"
ZERO_HASH = bytes(32)
EM_DASH = "\u2014"
ED25519_TYPE = 0x01
MAX_SIGNATURES = 100  # signed-note: verifiers MUST accept at least 16


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


class Report:
    def __init__(self, quiet: bool = False) -> None:
        self.passed = 0
        self.failed = 0
        self.quiet = quiet
        self.first_failure: str | None = None

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            if not self.quiet:
                print(f"  PASS  {name}" + (f"  ({detail})" if detail else ""))
        else:
            self.failed += 1
            if self.first_failure is None:
                self.first_failure = detail or name
            if not self.quiet:
                print(f"  FAIL  {name}" + (f": {detail}" if detail else ""))
        return ok

    def problems(self, name: str, problems: list[str], ok_detail: str = "") -> bool:
        """One check over many items: fails with the first problem (which names the item)."""
        if not problems:
            return self.check(name, True, ok_detail)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return self.check(name, False, problems[0] + more)

    def info(self, msg: str) -> None:
        if not self.quiet:
            print(f"        {msg}")


# --------------------------------------------------------------------------------------
# RFC 9162 §2.1 Merkle tree
# --------------------------------------------------------------------------------------


def sha256(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def leaf_hash(entry: bytes) -> bytes:
    return sha256(b"\x00", entry)


def node_hash(left: bytes, right: bytes) -> bytes:
    return sha256(b"\x01", left, right)


def largest_pow2_below(n: int) -> int:
    """k with k < n <= 2k (n >= 2): RFC 9162 §2.1.1's split point."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


class MerkleTree:
    """MTH(D[n]) of RFC 9162 §2.1.1 over a list of leaf hashes.

    Straight from the recursive definition; complete power-of-two subtrees are
    memoised so computing the root at every checkpoint size stays cheap.
    """

    def __init__(self, leaves: list[bytes]) -> None:
        self.leaves = leaves
        self._memo: dict[tuple[int, int], bytes] = {}

    def _mth(self, start: int, n: int) -> bytes:
        if n == 1:
            return self.leaves[start]
        complete = n & (n - 1) == 0
        if complete and (start, n) in self._memo:
            return self._memo[(start, n)]
        k = largest_pow2_below(n)
        h = node_hash(self._mth(start, k), self._mth(start + k, n - k))
        if complete:
            self._memo[(start, n)] = h
        return h

    def root(self, n: int) -> bytes:
        if n < 0 or n > len(self.leaves):
            raise ValueError(f"tree of {len(self.leaves)} leaves has no size {n}")
        if n == 0:
            return sha256(b"")
        return self._mth(0, n)

    def path(self, m: int, n: int, start: int = 0) -> list[bytes]:
        """PATH(m, D[n]) of RFC 9162 §2.1.3.1 (used only by the self-test)."""
        if n <= 1:
            return []
        k = largest_pow2_below(n)
        if m < k:
            return self.path(m, k, start) + [self._mth(start + k, n - k)]
        return self.path(m - k, n - k, start + k) + [self._mth(start, k)]


def verify_inclusion(leaf_index: int, tree_size: int, leaf: bytes, path: list[bytes],
                     root: bytes) -> str | None:
    """RFC 9162 §2.1.3.2, step by step. Returns None if the proof verifies, else why not."""
    # 1. leaf_index >= tree_size fails.
    if leaf_index < 0 or leaf_index >= tree_size:
        return f"leaf index {leaf_index} is not in a tree of size {tree_size}"
    # 2.-3.
    fn, sn, r = leaf_index, tree_size - 1, leaf
    # 4.
    for p in path:
        if sn == 0:  # a.
            return "proof has more elements than the tree has levels"
        if fn & 1 or fn == sn:  # b.
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1  # c.
        sn >>= 1
    # 5.
    if sn != 0:
        return "proof is too short for the tree size"
    if r != root:
        return "proof does not lead to the root"
    return None


# --------------------------------------------------------------------------------------
# c2sp.org/signed-note and c2sp.org/tlog-checkpoint
# --------------------------------------------------------------------------------------


class NoteError(Exception):
    pass


def b64decode_strict(s: str) -> bytes:
    """RFC 4648 §4 standard base64, padded, nothing else accepted, canonical."""
    if not re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", s) or len(s) % 4:
        raise NoteError(f"not standard base64: {s[:20]!r}")
    try:
        raw = base64.b64decode(s, validate=True)
    except binascii.Error as e:
        raise NoteError(f"not standard base64: {e}") from None
    if base64.b64encode(raw).decode("ascii") != s:
        raise NoteError("non-canonical base64")
    return raw


def valid_key_name(name: str) -> bool:
    # signed-note: non-empty, no Unicode spaces, no '+'; notes have no control characters.
    return bool(name) and not any(c.isspace() or c == "+" or ord(c) < 0x20 for c in name)


def key_id(name: str, sig_type: int, public: bytes) -> bytes:
    return sha256(name.encode("utf-8"), b"\n", bytes([sig_type]), public)[:4]


class VerifierKey:
    """A parsed Ed25519 signed-note verifier key."""

    def __init__(self, text: str) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        self.text = text.strip()
        parts = self.text.split("+", 2)  # the base64 key may itself contain '+'
        if len(parts) != 3:
            raise NoteError("verifier key is not name+keyid+key")
        name, id_hex, key_b64 = parts
        if not valid_key_name(name):
            raise NoteError(f"invalid key name {name!r}")
        if not re.fullmatch(r"[0-9a-f]{8}", id_hex):
            raise NoteError(f"key ID {id_hex!r} is not 8 lowercase hex digits")
        raw = b64decode_strict(key_b64)
        if len(raw) != 33 or raw[0] != ED25519_TYPE:
            raise NoteError("verifier key is not an Ed25519 (type 0x01, 32-byte) key")
        self.name = name
        self.public = raw[1:]
        self.id = bytes.fromhex(id_hex)
        if key_id(name, ED25519_TYPE, self.public) != self.id:
            raise NoteError("key ID is not SHA-256(name || 0x0A || 0x01 || key)[:4]")
        self._key = Ed25519PublicKey.from_public_bytes(self.public)

    def verify(self, message: bytes, sig: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            self._key.verify(sig, message)
            return True
        except InvalidSignature:
            return False


def open_note(note: str, vkey: VerifierKey) -> str:
    """Verifies a signed note; returns its text (with the final newline)."""
    if any(ord(c) < 0x20 and c != "\n" for c in note):
        raise NoteError("note contains a control character other than newline")
    if not note.endswith("\n"):
        raise NoteError("note does not end with a newline")
    split = note.rfind("\n\n")  # the LAST empty line separates text and signatures
    if split < 0:
        raise NoteError("note has no blank line before its signatures")
    text, block = note[: split + 1], note[split + 2:]
    if not text.strip("\n"):
        raise NoteError("note text is empty")
    lines = block.split("\n")[:-1]
    if not lines:
        raise NoteError("note has no signature lines")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"more than {MAX_SIGNATURES} signatures")
    verified = 0
    for line in lines:
        if not line.startswith(EM_DASH + " "):
            raise NoteError(f"malformed signature line {line[:40]!r}")
        fields = line[2:].split(" ")
        if len(fields) != 2 or not valid_key_name(fields[0]):
            raise NoteError(f"malformed signature line {line[:40]!r}")
        name, sig_b64 = fields
        sig = b64decode_strict(sig_b64)
        if len(sig) < 5:
            raise NoteError("signature shorter than a key ID")
        if name != vkey.name or sig[:4] != vkey.id:
            continue  # unknown key: MUST be ignored
        if len(sig) != 4 + 64 or not vkey.verify(text.encode("utf-8"), sig[4:]):
            raise NoteError(f"signature by {vkey.name}+{vkey.id.hex()} does not verify")
        verified += 1
    if not verified:
        raise NoteError(f"no signature by the trusted key {vkey.name}+{vkey.id.hex()}")
    return text


def parse_checkpoint(text: str) -> tuple[str, int, bytes, list[str]]:
    """tlog-checkpoint note text -> (origin, size, root, extension lines)."""
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise NoteError("checkpoint text has fewer than three lines")
    if any(not l for l in lines):
        raise NoteError("checkpoint text has an empty line")
    origin, size_s, root_s = lines[:3]
    if not re.fullmatch(r"0|[1-9][0-9]*", size_s):
        raise NoteError(f"tree size {size_s!r} is not decimal without leading zeros")
    root = b64decode_strict(root_s)
    if len(root) != 32:
        raise NoteError("root hash is not 32 bytes")
    return origin, int(size_s), root, lines[3:]


# --------------------------------------------------------------------------------------
# Self-test against published vectors
# --------------------------------------------------------------------------------------

# RFC 6962 test tree (transparency-dev/merkle testonly): entries, then roots of sizes 0..8.
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
KAT_INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]
# golang.org/x/mod/sumdb/note's example note and verifier key.
KAT_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
KAT_TEXT = ("If you think cryptography is the answer to your problem,\n"
            "then you don't know what your problem is.\n")
KAT_NOTE = (KAT_TEXT + "\n" + EM_DASH + " PeterNeumann "
            "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n")


def self_test(r: Report) -> None:
    leaves = [leaf_hash(bytes.fromhex(e)) for e in KAT_ENTRIES]
    t = MerkleTree(leaves)
    bad = [f"size {n}" for n in range(9) if t.root(n).hex() != KAT_ROOTS[n]]
    r.problems("self-test: RFC 6962 reference roots of sizes 0..8", bad)
    probs = []
    for idx, size, proof in KAT_INCLUSION:
        path = [bytes.fromhex(h) for h in proof]
        if [h.hex() for h in t.path(idx, size)] != proof:
            probs.append(f"PATH({idx}, {size}) differs from the reference")
        why = verify_inclusion(idx, size, leaves[idx], path, bytes.fromhex(KAT_ROOTS[size]))
        if why:
            probs.append(f"reference proof ({idx}, {size}): {why}")
        if verify_inclusion(idx ^ 1, size, leaves[idx], path, bytes.fromhex(KAT_ROOTS[size])) is None:
            probs.append(f"proof ({idx}, {size}) also verified for index {idx ^ 1}")
    for size in range(1, 9):  # every leaf of every size, and a wrong leaf fails
        root = t.root(size)
        for i in range(size):
            if verify_inclusion(i, size, leaves[i], t.path(i, size), root):
                probs.append(f"own proof ({i}, {size}) does not verify")
            if size > 1 and verify_inclusion(i, size, leaves[(i + 1) % size], t.path(i, size), root) is None:
                probs.append(f"own proof ({i}, {size}) verified a wrong leaf")
    r.problems("self-test: RFC 9162 inclusion proofs (reference vectors, all sizes 1..8)", probs)
    probs = []
    try:
        k = VerifierKey(KAT_VKEY)
        if open_note(KAT_NOTE, k) != KAT_TEXT:
            probs.append("reference note text differs")
        for forged in (KAT_NOTE.replace("cryptography", "cryptographY"),
                       KAT_NOTE.replace("x08go", "x08gp")):
            try:
                open_note(forged, k)
                probs.append("a forged reference note verified")
            except NoteError:
                pass
    except NoteError as e:
        probs.append(f"reference note: {e}")
    r.problems("self-test: signed-note reference note (golang.org/x/mod/sumdb/note)", probs)


# --------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------


def entry_hash(seq: int, prev: bytes, body: bytes) -> bytes:
    return sha256(CHAIN_DOMAIN, seq.to_bytes(8, "big"), prev, body)


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate key in {keys}")
    return dict(pairs)


def canonical_problem(body: str) -> tuple[dict | None, str | None]:
    """The body must be one JSON object in compact form (no whitespace, no duplicate keys,
    non-ASCII unescaped), i.e. re-encoding it gives the same bytes."""
    try:
        obj = json.loads(body, object_pairs_hook=_no_duplicates)
    except ValueError as e:
        return None, f"body is not JSON: {e}"
    if not isinstance(obj, dict):
        return None, "body is not a JSON object"
    again = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    if again != body:
        return obj, "body is not in canonical (compact) form"
    return obj, None


def _hex32(v, what: str) -> bytes:
    if not isinstance(v, str) or not re.fullmatch(r"[0-9a-f]{64}", v):
        raise ValueError(f"{what} is not 64 lowercase hex digits")
    return bytes.fromhex(v)


def _read_lines(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def verify_export(d: Path, pinned: str | None, r: Report) -> dict:
    """Verifies the export in `d`; returns a summary. Every failure names the first bad
    entry (`entry N:`) or checkpoint (`checkpoint at size S:`)."""
    out: dict = {"entries": 0, "checkpoints": [], "kinds": {}, "bodies": [], "hashes": []}

    # ---- the key ---------------------------------------------------------------------
    vkey = None
    own_text = None
    try:
        own_text = (d / "log.vkey").read_text("utf-8").strip()
    except OSError as e:
        if pinned is None:
            r.check("log.vkey readable", False, str(e))
    key_text = pinned if pinned is not None else own_text
    if key_text is not None:
        try:
            vkey = VerifierKey(key_text)
            r.check("verifier key parses, its key ID is SHA-256(name||0x0A||0x01||key)[:4]", True,
                    f"{vkey.name}+{vkey.id.hex()}" + ("" if pinned else ", from the export itself: not pinned"))
        except NoteError as e:
            r.check("verifier key parses", False, f"verifier key: {e}")
    if pinned is not None and own_text is not None:
        same = own_text == pinned.strip()
        r.check("export's log.vkey is the pinned key", same,
                "" if same else f"log.vkey: export has {own_text!r}, pinned {pinned.strip()!r}")

    # ---- entries ---------------------------------------------------------------------
    try:
        raw_lines = _read_lines(d / "entries.jsonl")
    except (OSError, UnicodeDecodeError) as e:
        r.check("entries.jsonl readable (UTF-8)", False, f"entries.jsonl: {e}")
        raw_lines = []
    entries = []
    form = []
    for i, line in enumerate(raw_lines, 1):
        try:
            e = json.loads(line)
            if not isinstance(e, dict):
                raise ValueError("not an object")
            seq = e.get("seq")
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
                raise ValueError("seq is not a positive integer")
            if not isinstance(e.get("body"), str) or not isinstance(e.get("kind"), str):
                raise ValueError("body/kind missing")
            if e.get("lease_id") is not None and not isinstance(e["lease_id"], str):
                raise ValueError("lease_id is not a string or null")
            e["_prev"] = _hex32(e.get("prev_hash"), "prev_hash")
            e["_hash"] = _hex32(e.get("hash"), "hash")
            e["_leaf"] = _hex32(e.get("leaf_hash"), "leaf_hash")
            e["_line"] = i
            entries.append(e)
        except ValueError as err:
            form.append(f"entry {i}: line {i} of entries.jsonl is malformed: {err}")
    n = len(entries)
    out["entries"] = n
    r.problems("entries.jsonl: every line is a well-formed entry", form, f"{n} entries")

    seq_probs, body_probs, chain_probs, leaf_probs = [], [], [], []
    leaves: list[bytes] = []
    prev = ZERO_HASH
    for pos, e in enumerate(entries, 1):
        seq = e["seq"]
        if seq != pos:
            seq_probs.append(f"entry {pos}: missing or out of order (line {e['_line']} holds seq {seq})")
        body = e["body"]
        obj, why = canonical_problem(body)
        if why:
            body_probs.append(f"entry {seq}: {why}")
        if obj is not None:
            out["kinds"][obj.get("kind")] = out["kinds"].get(obj.get("kind"), 0) + 1
            out["bodies"].append(obj)
            if obj.get("kind") != e["kind"]:
                body_probs.append(f"entry {seq}: kind column {e['kind']!r} but body says {obj.get('kind')!r}")
            if obj.get("lease_id") != e.get("lease_id"):
                body_probs.append(f"entry {seq}: lease_id column {e.get('lease_id')!r} "
                                  f"but body says {obj.get('lease_id')!r}")
            if not isinstance(obj.get("time_ms"), int) or not isinstance(obj.get("decision"), str):
                body_probs.append(f"entry {seq}: body lacks time_ms/decision")
        raw = body.encode("utf-8")
        if e["_prev"] != prev:
            chain_probs.append(f"entry {seq}: prev_hash does not chain to the entry before it "
                               f"(entry removed, inserted or reordered)")
        # The chain position is the entry's place in the log: a gap changes n.
        h = entry_hash(pos, prev, raw)
        if e["_hash"] != h:
            chain_probs.append(f"entry {seq}: hash differs from SHA-256(domain||{pos}||prev||body) "
                               f"(entry changed)")
        prev = h
        out["hashes"].append(h.hex())
        lh = leaf_hash(raw)
        if e["_leaf"] != lh:
            leaf_probs.append(f"entry {seq}: leaf_hash differs from SHA-256(0x00||body)")
        leaves.append(lh)
    r.problems("entries: sequence numbers are 1..N with none missing or repeated", seq_probs)
    r.problems("entries: bodies are canonical JSON objects; kind/lease_id columns match", body_probs)
    r.problems("entries: hash chain recomputed from the bodies (prev_hash and hash)", chain_probs,
               f"head {prev.hex()[:16]}…" if n else "empty log")
    r.problems("entries: Merkle leaf hashes recomputed from the bodies", leaf_probs)
    tree = MerkleTree(leaves)
    out["root"] = tree.root(n).hex()
    out["head"] = prev.hex()

    # ---- checkpoints -----------------------------------------------------------------
    try:
        cp_lines = _read_lines(d / "checkpoints.jsonl")
    except (OSError, UnicodeDecodeError) as e:
        r.check("checkpoints.jsonl readable (UTF-8)", False, f"checkpoints.jsonl: {e}")
        cp_lines = []
    cps, form = [], []
    for i, line in enumerate(cp_lines, 1):
        try:
            c = json.loads(line)
            if not isinstance(c, dict):
                raise ValueError("not an object")
            if not isinstance(c.get("size"), int) or isinstance(c.get("size"), bool) or c["size"] < 0:
                raise ValueError("size is not a non-negative integer")
            if not isinstance(c.get("note"), str):
                raise ValueError("note is not a string")
            c["_root"] = _hex32(c.get("root"), "root")
            cps.append(c)
        except ValueError as err:
            form.append(f"checkpoint on line {i}: malformed: {err}")
    for a, b in zip(cps, cps[1:]):
        if b["size"] <= a["size"]:
            form.append(f"checkpoint at size {b['size']}: sizes are not strictly increasing "
                        f"(follows size {a['size']})")
    r.problems("checkpoints.jsonl: well-formed, sizes strictly increasing", form,
               f"{len(cps)} checkpoints, sizes {[c['size'] for c in cps]}")

    sig_probs, body_probs, cover_probs, root_probs = [], [], [], []
    for c in cps:
        label = f"checkpoint at size {c['size']}"
        if vkey is None:
            sig_probs.append(f"{label}: no usable verifier key")
            continue
        try:
            text = open_note(c["note"], vkey)
        except NoteError as e:
            sig_probs.append(f"{label}: {e}")
            continue
        try:
            origin, size, root, _ext = parse_checkpoint(text)
        except NoteError as e:
            body_probs.append(f"{label}: {e}")
            continue
        if origin != vkey.name:
            body_probs.append(f"{label}: origin {origin!r} is not the log key's name {vkey.name!r}")
        if size != c["size"]:
            body_probs.append(f"{label}: the signed note says size {size}")
        if root != c["_root"]:
            body_probs.append(f"{label}: the signed root differs from the root field")
        if size > n:
            cover_probs.append(f"{label}: entries {n + 1}..{size} are missing "
                               f"(log truncated after a checkpoint covered them)")
            continue
        if tree.root(size) != root:
            root_probs.append(f"{label}: signed root differs from the root recomputed from entries "
                              f"1..{size} (an entry was changed, removed, inserted or reordered)")
            continue
        out["checkpoints"].append((size, root.hex(), c["note"]))
    r.problems("checkpoints: every signature verifies (Ed25519, trusted key name and ID)", sig_probs)
    r.problems("checkpoints: signed text is a tlog-checkpoint; origin, size, root agree", body_probs)
    r.problems("checkpoints: every checkpoint size is covered by the entries", cover_probs)
    r.problems("checkpoints: root recomputed (RFC 9162 MTH) at every checkpoint size matches",
               root_probs, f"root of all {n} entries {out['root'][:16]}…")
    if cps and n > cps[-1]["size"]:
        r.info(f"entries {cps[-1]['size'] + 1}..{n} are not yet covered by a signed checkpoint")

    # ---- proof.json ------------------------------------------------------------------
    pf = d / "proof.json"
    if not pf.exists():
        r.check("proof.json present (the export has checkpoints)", not cps,
                "proof.json: missing although the export has checkpoints")
        return out
    try:
        p = json.loads(pf.read_text("utf-8"))
        seq, idx, size = p["sequence"], p["leaf_index"], p["tree_size"]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (seq, idx, size)):
            raise ValueError("sequence/leaf_index/tree_size are not integers")
        p_leaf = _hex32(p["leaf_hash"], "leaf_hash")
        p_root = _hex32(p["root"], "root")
        path = [_hex32(h, "proof element") for h in p["proof"]]
        note = p["checkpoint"]
        if not isinstance(note, str):
            raise ValueError("checkpoint is not a string")
    except (OSError, ValueError, KeyError, TypeError) as e:
        r.check("proof.json well-formed", False, f"proof.json: {e}")
        return out
    label = f"proof.json (entry {seq}, checkpoint at size {size})"
    try:
        if vkey is None:
            raise NoteError("no usable verifier key")
        origin, cp_size, cp_root, _ = parse_checkpoint(open_note(note, vkey))
        r.check("proof.json: its checkpoint's signature verifies", True, f"size {cp_size}")
    except NoteError as e:
        r.check("proof.json: its checkpoint's signature verifies", False, f"{label}: checkpoint: {e}")
        return out
    probs = []
    if cp_size != size or cp_root != p_root:
        probs.append(f"{label}: tree_size/root fields differ from the signed checkpoint")
    if idx != seq - 1:
        probs.append(f"{label}: leaf_index {idx} is not sequence - 1")
    if 1 <= seq <= n and leaves[seq - 1] != p_leaf:
        probs.append(f"{label}: leaf_hash is not the leaf of entry {seq}'s body")
    if not 1 <= seq <= n:
        probs.append(f"{label}: entry {seq} is not in the export")
    if cp_size <= n and tree.root(cp_size) != cp_root:
        probs.append(f"{label}: the checkpoint's root differs from the entries' root at that size")
    r.problems("proof.json: fields agree with its checkpoint and with the entry's body", probs)
    why = verify_inclusion(idx, cp_size, p_leaf, path, cp_root)
    r.check("proof.json: inclusion proof verifies (RFC 9162 §2.1.3.2) against the signed root",
            why is None, f"{label}: {why}" if why else f"leaf {idx} of {cp_size}, {len(path)} hashes")
    return out


# --------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """`spiffe-broker dev` as a child process (its own process group)."""

    def __init__(self, binary: Path, state: Path, grpc: str, http: str, log: Path) -> None:
        self._stderr = open(log, "wb")
        self.log = log
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        self.proc = subprocess.Popen(
            [str(binary), "dev", "--state-dir", str(state), "--grpc-addr", grpc, "--http-addr", http],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr, env=env,
            start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self.lines.put(None)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"no `ready` line within {timeout:.0f}s")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=5)
                raise RuntimeError(f"broker exited with {self.proc.returncode} before `ready`")
            if line.strip() == "ready":
                return

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it had to be killed)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.terminate(10)
        self._stderr.close()

    def stderr_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text("utf-8", "replace").splitlines()[-n:])
        except OSError:
            return ""


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def run_cli(binary: Path, args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("SPIFFE_BROKER_ADDR", None)
    env.update(env_extra or {})
    return subprocess.run([str(binary), *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, env=env, timeout=CALL_TIMEOUT)


def _one_line(s: str) -> str:
    s = " ".join(s.split())
    return s if len(s) <= 160 else s[:157] + "..."


# Tampering of a copy of the export. Each returns the label the verifier must name first.

def _rewrite(path: Path, fn) -> None:
    lines = _read_lines(path)
    lines = fn(lines)
    path.write_text("".join(l + "\n" for l in lines), "utf-8")


def tamper_body_field(d: Path, seq: int) -> str:
    def fn(lines):
        e = json.loads(lines[seq - 1])
        body = json.loads(e["body"])
        body["decision"] = "deny" if body.get("decision") == "allow" else "allow"
        e["body"] = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        lines[seq - 1] = json.dumps(e, separators=(",", ":"), ensure_ascii=False)
        return lines
    _rewrite(d / "entries.jsonl", fn)
    return f"entry {seq}:"


def tamper_delete_line(d: Path, seq: int) -> str:
    _rewrite(d / "entries.jsonl", lambda lines: lines[: seq - 1] + lines[seq:])
    return f"entry {seq}:"


def tamper_signature(d: Path, size: int) -> str:
    def fn(lines):
        for i, line in enumerate(lines):
            c = json.loads(line)
            if c["size"] != size:
                continue
            text, sigline = c["note"].rstrip("\n").rsplit("\n", 1)
            dash, name, sig = sigline.split(" ")
            raw = bytearray(base64.b64decode(sig))
            raw[4 + 17] ^= 0x01  # a byte of the Ed25519 signature, not of the key ID
            c["note"] = f"{text}\n{dash} {name} {base64.b64encode(bytes(raw)).decode()}\n"
            lines[i] = json.dumps(c, separators=(",", ":"), ensure_ascii=False)
        return lines
    _rewrite(d / "checkpoints.jsonl", fn)
    return f"checkpoint at size {size}:"


def tamper_truncate(d: Path, size: int) -> str:
    """Drop the tail from entry `size` on, after the checkpoint of `size` covered it."""
    _rewrite(d / "entries.jsonl", lambda lines: lines[: size - 1])
    return f"checkpoint at size {size}:"


def tamper_rechain(d: Path, seq: int, size: int) -> str:
    """Change entry `seq` and recompute every later chain hash and leaf, as an attacker
    with write access to the store could; only the signed roots can catch it."""
    def fn(lines):
        prev = ZERO_HASH
        out = []
        for pos, line in enumerate(lines, 1):
            e = json.loads(line)
            if pos == seq:
                body = json.loads(e["body"])
                body["time_ms"] = body["time_ms"] + 1
                e["body"] = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
            raw = e["body"].encode("utf-8")
            e["prev_hash"] = prev.hex()
            prev = entry_hash(pos, prev, raw)
            e["hash"] = prev.hex()
            e["leaf_hash"] = leaf_hash(raw).hex()
            out.append(json.dumps(e, separators=(",", ":"), ensure_ascii=False))
        return out
    _rewrite(d / "entries.jsonl", fn)
    return f"checkpoint at size {size}:"


def tamper_proof(d: Path) -> str:
    p = json.loads((d / "proof.json").read_text("utf-8"))
    h = bytearray.fromhex(p["proof"][0])
    h[0] ^= 0x80
    p["proof"][0] = h.hex()
    (d / "proof.json").write_text(json.dumps(p, indent=2), "utf-8")
    return "proof.json"


def run_e2e(r: Report) -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError as e:
        r.check("cryptography importable", False,
                f"{e}; pip install -r {Path(__file__).with_name('requirements.txt')}")
        return
    binary = Path(os.environ.get("SPIFFE_BROKER_BIN", REPO / "target/debug/spiffe-broker"))
    if not binary.is_absolute():
        binary = REPO / binary
    if not binary.is_file():
        r.check("broker binary exists", False, f"{binary} not found (cargo build --bin spiffe-broker)")
        return

    tmp = Path(tempfile.mkdtemp(prefix="spiffe-broker-log-"))
    state = tmp / "state"
    export = state / "export"
    grpc_port = free_port()
    http_port = free_port()
    while http_port == grpc_port:
        http_port = free_port()
    grpc, http = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"
    print(f"broker: {binary}")
    print(f"state:  {state}   gRPC {grpc}   HTTP {http}")
    broker = None
    try:
        print("[broker]")
        broker = Broker(binary, state, grpc, http, tmp / "broker.stderr.log")
        try:
            broker.wait_ready(READY_TIMEOUT)
            r.check("broker dev printed `ready`", True)
        except RuntimeError as e:
            r.check("broker dev printed `ready`", False, str(e))
            return

        status, vkey_text = http_get(f"http://{http}/log/vkey")
        r.check("GET /log/vkey serves the log's verifier key", status == 200 and vkey_text.strip() != "",
                f"HTTP {status}: {_one_line(vkey_text)}")
        pinned = vkey_text.strip() if status == 200 else None
        key_file = state / "keys" / "log.vkey"
        if pinned and key_file.exists():
            r.check("/log/vkey equals STATE/keys/log.vkey", key_file.read_text().strip() == pinned)

        print("[requests as spiffe://example.org/ci/deploy-agent]")
        sock = state / "workloads" / "deploy-agent.sock"
        env = {"SPIFFE_ENDPOINT_SOCKET": f"unix://{sock}"}
        common = ["--broker", grpc]
        allowed = [
            ["--profile", "gpu-scheduler-submit", "--scope", "job:submit", "--ttl", "10m",
             "--intent-action", "submit-training", "--intent-target", "queue/a100"],
            ["--profile", "gpu-scheduler-submit", "--scope", "job:read", "--ttl", "5m",
             "--intent-action", "inspect", "--intent-target", "queue/h100"],
        ]
        refused = [
            (["--profile", "gpu-scheduler-submit", "--scope", "cluster:admin",
              "--intent-action", "x", "--intent-target", "queue/a100"], "scope above the profile ceiling"),
            (["--profile", "gpu-scheduler-submit", "--scope", "job:submit",
              "--intent-action", "submit-training", "--intent-target", "cluster/prod"], "target outside queue/*"),
        ]
        leases = []
        receipts: list[tuple[int, str]] = []  # (sequence, entry_hash) the broker handed out

        def note_receipt(out: dict) -> None:
            rc = out.get("receipt") if isinstance(out, dict) else None
            if isinstance(rc, dict) and isinstance(rc.get("sequence"), int):
                receipts.append((rc["sequence"], str(rc.get("entry_hash"))))

        for args in allowed:
            p = run_cli(binary, ["request", *args, *common], env)
            lease = None
            try:
                out = json.loads(p.stdout)
                lease = out.get("lease_id")
                note_receipt(out)
            except (ValueError, AttributeError):
                pass
            if r.check(f"request {' '.join(args[1:6:2])} {args[-1]} is granted",
                       p.returncode == 0 and bool(lease),
                       f"lease {lease}" if lease else f"exit {p.returncode}: {_one_line(p.stderr or p.stdout)}"):
                leases.append(lease)
        for args, why in refused:
            p = run_cli(binary, ["request", *args, *common], env)
            r.check(f"request with {why} is refused", p.returncode != 0,
                    _one_line(p.stderr or p.stdout) if p.returncode != 0 else f"granted: {_one_line(p.stdout)}")

        print("[a periodic checkpoint, then one more entry]")
        # The refusals were logged after the last grant (no receipt is returned for them).
        want = max([s for s, _ in receipts], default=0) + len(refused)
        live = None
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            status, note = http_get(f"http://{http}/log/checkpoint")
            if status == 200:
                try:
                    size = int(note.split("\n")[1])
                except (IndexError, ValueError):
                    size = None
                if size is not None and size >= want:
                    live = note
                    break
            time.sleep(0.5)
        if r.check("GET /log/checkpoint serves a checkpoint covering the requests", live is not None,
                   f"size {live.split(chr(10))[1]}" if live else "none within 40s"):
            try:
                origin, size, root, _ = parse_checkpoint(open_note(live, VerifierKey(pinned or "")))
                r.check("served checkpoint verifies with the served key", True, f"size {size}")
            except NoteError as e:
                r.check("served checkpoint verifies with the served key", False, str(e))
        if leases:
            p = run_cli(binary, ["release", "--lease", leases[0], *common], env)
            r.check("release of the first lease", p.returncode == 0,
                    "" if p.returncode == 0 else f"exit {p.returncode}: {_one_line(p.stderr or p.stdout)}")
            try:
                note_receipt(json.loads(p.stdout))
            except ValueError:
                pass

        print("[stop with SIGTERM, export]")
        rc = broker.terminate(30)
        r.check("broker exits cleanly after SIGTERM", rc == 0,
                f"exit code {rc}" if rc is not None else "still running after 30s; killed")
        p = run_cli(binary, ["audit", "export", "--state-dir", str(state), "--out", str(export)])
        if not r.check("spiffe-broker audit export", p.returncode == 0,
                       _one_line(p.stdout + p.stderr)):
            return

        print(f"[verify {export} with the key served at /log/vkey]")
        failed_before = r.failed
        summary = verify_export(export, pinned, r)
        export_ok = r.failed == failed_before
        n = summary["entries"]
        sizes = [s for s, _, _ in summary["checkpoints"]]
        kinds = summary["kinds"]
        r.info(f"{n} entries {dict(sorted(kinds.items()))}; verified checkpoints at sizes {sizes}")
        r.check("the log records the grants, the refusals and the release",
                kinds.get("issue", 0) >= len(leases) and kinds.get("deny", 0) >= len(refused)
                and kinds.get("release", 0) >= (1 if leases else 0), f"kinds {kinds}")
        granted = {b.get("lease_id") for b in summary["bodies"] if b.get("kind") == "issue"}
        r.check("every granted lease id has its issue entry", set(leases) <= granted,
                f"{len(leases)} leases" if set(leases) <= granted else f"missing {set(leases) - granted}")
        r.check("the shutdown checkpoint covers every entry", bool(sizes) and sizes[-1] == n,
                f"last signed size {sizes[-1] if sizes else None}, {n} entries")
        if live is not None:
            r.check("the checkpoint served live is in the export",
                    any(note == live for _, _, note in summary["checkpoints"]))
        hashes = summary["hashes"]
        bad = [f"entry {seq}: receipt hash {h[:16]}… is not the log's"
               for seq, h in receipts if not (1 <= seq <= len(hashes) and hashes[seq - 1] == h)]
        r.problems("every receipt the broker returned (sequence, entry_hash) is in the log", bad,
                   f"{len(receipts)} receipts")
        if not export_ok:
            print("(negative checks skipped: the genuine export does not verify)")
            return
        if not r.check("enough entries and checkpoints for the negative checks", n >= 3 and bool(sizes),
                       f"{n} entries, {len(sizes)} checkpoints"):
            return

        print("[tampered copies must be rejected, naming the first bad item]")
        cp_sizes = sizes
        mid = (n + 1) // 2  # a line in the middle: 1 < mid < n
        issue_seq = next((i for i, b in enumerate(summary["bodies"], 1) if b.get("kind") == "issue"), mid)
        cases = [
            ("one body field changed (decision of entry %d)" % issue_seq,
             lambda d: tamper_body_field(d, issue_seq)),
            ("line of entry %d deleted" % mid, lambda d: tamper_delete_line(d, mid)),
            ("a byte of the checkpoint signature at size %d flipped" % cp_sizes[0],
             lambda d: tamper_signature(d, cp_sizes[0])),
            ("tail from entry %d removed after the checkpoint at size %d covered it"
             % (cp_sizes[-1], cp_sizes[-1]), lambda d: tamper_truncate(d, cp_sizes[-1])),
        ]
        rechain_cp = next(s for s in cp_sizes if s >= mid)
        cases.append(("entry %d changed and the whole chain and leaves recomputed" % mid,
                      lambda d: tamper_rechain(d, mid, rechain_cp)))
        cases.append(("a hash of proof.json's inclusion proof corrupted", tamper_proof))
        for i, (what, fn) in enumerate(cases, 1):
            d = tmp / f"tampered-{i}"
            shutil.copytree(export, d)
            expected = fn(d)
            q = Report(quiet=True)
            verify_export(d, pinned, q)
            first = q.first_failure or ""
            r.check(f"rejected: {what}", q.failed > 0 and first.startswith(expected),
                    f"{q.failed} failed; first: {_one_line(first)}" if q.failed
                    else "verified although tampered")
    except Exception as e:  # noqa: BLE001
        r.check("unexpected error", False, f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        if broker is not None:
            broker.close()
            if r.failed:
                print("--- broker stderr tail ---\n" + broker.stderr_tail())
        if os.environ.get("VERIFY_LOG_KEEP_STATE") == "1":
            print(f"state kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, help="directory written by `spiffe-broker audit export`")
    ap.add_argument("--vkey", type=Path, help="pinned verifier key file (default: the export's log.vkey)")
    args = ap.parse_args()
    if args.vkey and not args.export:
        ap.error("--vkey needs --export")

    # SIGTERM/SIGINT: unwind so the broker child is always stopped.
    def _stop(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _stop)

    r = Report()
    try:
        print("[self-test against published vectors]")
        self_test(r)
        if args.export:
            pinned = None
            if args.vkey:
                pinned = args.vkey.read_text("utf-8").strip()
            print(f"[verify {args.export}]")
            s = verify_export(args.export, pinned, r)
            print(f"        {s['entries']} entries, head {s.get('head', '')[:16]}…, "
                  f"{len(s['checkpoints'])} checkpoints verified")
        else:
            run_e2e(r)
    except Exception as e:  # noqa: BLE001
        r.check("unexpected error", False, f"{type(e).__name__}: {e}")
        traceback.print_exc()
    if r.passed == 0 and r.failed == 0:
        r.check("ran at least one check", False)
    if r.first_failure:
        print(f"first failure: {r.first_failure}")
    print(f"{r.passed} passed, {r.failed} failed")
    return 0 if r.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
