// The console's audit entry page: verifies, in this browser and with nothing from the
// broker taken on trust but the data itself, that the entry is in the log. It checks the
// verifier key (name+keyhash+key, c2sp.org/signed-note), the checkpoint's Ed25519
// signature by that key, and the RFC 9162 inclusion proof from SHA-256(0x00 || entry) to
// the checkpoint's root. Paste the key you pinned to verify against it instead.
'use strict';
(() => {
  const el = document.getElementById('proof');
  if (!el) return;
  const out = document.getElementById('result');
  const enc = new TextEncoder();
  const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  const unhex = (s) => {
    if (!/^([0-9a-f]{2}){32}$/.test(s)) throw new Error('a proof hash is not 32 bytes of hex');
    return new Uint8Array(s.match(/../g).map((h) => parseInt(h, 16)));
  };
  const b64 = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
  const eq = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
  const sha256 = async (...parts) => {
    const buf = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) { buf.set(p, at); at += p.length; }
    return new Uint8Array(await crypto.subtle.digest('SHA-256', buf));
  };

  async function verify() {
    const vkey = document.getElementById('vkey').value.trim();
    // The key's base64 may itself hold '+': split at the first two only.
    const first = vkey.indexOf('+');
    const second = vkey.indexOf('+', first + 1);
    if (first < 1 || second < 0) throw new Error('the verifier key is not name+keyhash+key');
    const name = vkey.slice(0, first);
    const keyHash = vkey.slice(first + 1, second);
    const keyB64 = vkey.slice(second + 1);
    const key = b64(keyB64);
    if (key.length !== 33 || key[0] !== 1) throw new Error('the verifier key is not an Ed25519 key');
    const kh = (await sha256(enc.encode(name), new Uint8Array([0x0a]), key)).slice(0, 4);
    if (hex(kh) !== keyHash) throw new Error('the verifier key hash does not match its key');

    const note = el.dataset.note;
    const cut = note.indexOf('\n\n');
    if (cut < 0) throw new Error('the checkpoint is not a signed note');
    const body = note.slice(0, cut + 1);
    const pub = await crypto.subtle.importKey('raw', key.slice(1), { name: 'Ed25519' }, false, ['verify']);
    let signed = false;
    for (const line of note.slice(cut + 2).split('\n')) {
      if (!line.startsWith('\u2014 ')) continue;
      const [who, sigB64] = line.slice(2).split(' ');
      const sig = b64(sigB64 || '');
      if (who !== name || sig.length < 4 || !eq(sig.slice(0, 4), kh)) continue;
      if (sig.length !== 68 || !(await crypto.subtle.verify({ name: 'Ed25519' }, pub, sig.slice(4), enc.encode(body)))) {
        throw new Error('the checkpoint signature does not verify');
      }
      signed = true;
    }
    if (!signed) throw new Error(`no signature by ${name} on the checkpoint`);
    const lines = body.split('\n');
    if (lines[0] !== name) throw new Error('the checkpoint is of another log');
    if (!/^(0|[1-9][0-9]*)$/.test(lines[1])) throw new Error('the checkpoint size is not a number');
    const size = BigInt(lines[1]);
    const root = b64(lines[2]);

    const index = BigInt(el.dataset.index);
    if (index >= size) throw new Error('the entry is outside the checkpoint');
    let r = await sha256(new Uint8Array([0x00]), enc.encode(el.dataset.entry));
    let fn = index;
    let sn = size - 1n;
    const proof = el.dataset.proof ? el.dataset.proof.split(',').map(unhex) : [];
    for (const p of proof) {
      if (sn === 0n) throw new Error('the inclusion proof is too long');
      if ((fn & 1n) === 1n || fn === sn) {
        r = await sha256(new Uint8Array([0x01]), p, r);
        while ((fn & 1n) === 0n && fn !== 0n) { fn >>= 1n; sn >>= 1n; }
      } else {
        r = await sha256(new Uint8Array([0x01]), r, p);
      }
      fn >>= 1n;
      sn >>= 1n;
    }
    if (sn !== 0n) throw new Error('the inclusion proof is too short');
    if (!eq(r, root)) throw new Error('the inclusion proof does not lead to the checkpoint root');
    return `Verified in this browser: entry ${index + 1n} is in the log of ${size} entries, ` +
      `whose checkpoint is signed by ${name} (key ${keyHash}).`;
  }

  async function run() {
    out.dataset.verified = 'pending';
    out.className = 'notice';
    out.textContent = 'Verifying in this browser…';
    try {
      out.textContent = await verify();
      out.dataset.verified = 'true';
    } catch (e) {
      out.textContent = `NOT verified: ${e.message}`;
      out.dataset.verified = 'false';
      out.className = 'notice error';
    }
  }
  document.getElementById('verify').addEventListener('click', run);
  run();
})();
