// Signs a person in at the test OpenID Provider the way a browser does — authorization
// request with PKCE, state and nonce, the provider's login form, its consent form, the
// code back at the redirect URI, the code exchanged at the token endpoint — and prints
// the ID token.
//
//   node tests/oidc/login.mjs http://127.0.0.1:PORT alice
import * as crypto from 'node:crypto';

const [issuer, user] = process.argv.slice(2);
const b64 = (b) => Buffer.from(b).toString('base64url');
const verifier = b64(crypto.randomBytes(32));
const challenge = b64(crypto.createHash('sha256').update(verifier).digest());
const state = b64(crypto.randomBytes(16));
const nonce = b64(crypto.randomBytes(16));
const redirect = 'http://127.0.0.1/callback';
const jar = new Map();

async function go(url, init = {}) {
  const headers = { ...(init.headers || {}) };
  if (jar.size) headers.cookie = [...jar].map(([k, v]) => `${k}=${v}`).join('; ');
  const r = await fetch(url, { ...init, headers, redirect: 'manual' });
  for (const c of r.headers.getSetCookie()) {
    const [pair] = c.split(';');
    const i = pair.indexOf('=');
    jar.set(pair.slice(0, i), pair.slice(i + 1));
  }
  return r;
}

const auth = new URL(`${issuer}/auth`);
Object.entries({
  client_id: 'spiffe-broker', response_type: 'code', redirect_uri: redirect,
  scope: 'openid email profile groups', state, nonce,
  code_challenge: challenge, code_challenge_method: 'S256',
}).forEach(([k, v]) => auth.searchParams.set(k, v));

let r = await go(auth);
let code;
for (let step = 0; step < 10 && !code; step += 1) {
  const loc = r.headers.get('location');
  if (!loc) throw new Error(`no redirect at step ${step}: HTTP ${r.status} ${await r.text()}`);
  const next = new URL(loc, issuer);
  if (next.href.startsWith(redirect)) {
    if (next.searchParams.get('state') !== state) throw new Error('state mismatch');
    code = next.searchParams.get('code');
    if (!code) throw new Error(`no code: ${next.search}`);
    break;
  }
  r = await go(next);
  if (r.status === 200) {
    // An interaction page: the login form, then the consent form.
    const page = await r.text();
    const action = /action="([^"]+)"/.exec(page)?.[1];
    if (!action) throw new Error(`no form on ${next.href}`);
    const form = page.includes('name="login"')
      ? new URLSearchParams({ prompt: 'login', login: user, password: 'any' })
      : new URLSearchParams({ prompt: 'consent' });
    r = await go(new URL(action, issuer), {
      method: 'POST', body: form, headers: { 'content-type': 'application/x-www-form-urlencoded' },
    });
  }
}
const token = await fetch(`${issuer}/token`, {
  method: 'POST',
  headers: {
    'content-type': 'application/x-www-form-urlencoded',
    authorization: `Basic ${Buffer.from('spiffe-broker:test-secret-not-for-production').toString('base64')}`,
  },
  body: new URLSearchParams({ grant_type: 'authorization_code', code, redirect_uri: redirect, code_verifier: verifier }),
});
const body = await token.json();
if (!body.id_token) throw new Error(`token endpoint: ${JSON.stringify(body)}`);
const claims = JSON.parse(Buffer.from(body.id_token.split('.')[1], 'base64url'));
if (claims.nonce !== nonce) throw new Error('nonce mismatch');
console.log(body.id_token);
