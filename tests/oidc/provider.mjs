// A real OpenID Provider for the broker's tests: panva's oidc-provider (OpenID Certified),
// unmodified, with two people and their groups, its own login and consent pages
// (devInteractions) and a confidential client for the broker. People get ID tokens
// through the authorization code flow with PKCE (login.mjs drives the pages as a browser
// would).
//
//   node tests/oidc/provider.mjs PORT [REDIRECT_URI...]
//   prints `ready http://127.0.0.1:PORT` when listening (the issuer names the port, so PORT
//   must be a real one, not 0); each REDIRECT_URI is registered for the client besides
//   http://127.0.0.1/callback (a broker console's /console/callback, say).
import Provider from 'oidc-provider';

const port = Number(process.argv[2]);
if (!port) throw new Error('usage: provider.mjs PORT');
const issuer = `http://127.0.0.1:${port}`;
const redirects = ['http://127.0.0.1/callback', ...process.argv.slice(3)];

const people = {
  alice: { email: 'alice@example.org', name: 'Alice', groups: ['ml-engineers', 'registry-approvers'] },
  bob: { email: 'bob@example.org', name: 'Bob', groups: ['contractors'] },
  // For the console: a platform admin and an auditor.
  root: { email: 'root@example.org', name: 'Root', groups: ['platform-admins'] },
  dana: { email: 'dana@example.org', name: 'Dana', groups: ['auditors'] },
};

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'spiffe-broker',
    client_secret: 'test-secret-not-for-production',
    redirect_uris: redirects,
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'], groups: ['groups'] },
  scopes: ['openid', 'email', 'profile', 'groups'],
  pkce: { required: () => true },
  async findAccount(_ctx, id) {
    const p = people[id];
    if (!p) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, email: p.email, email_verified: true, name: p.name, groups: p.groups };
      },
    };
  },
  // The ID token carries the claims itself (not only the userinfo endpoint).
  conformIdTokenClaims: false,
  ttl: { IdToken: 600 },
});
provider.proxy = false;

const server = provider.listen(port, '127.0.0.1', () => {
  console.log(`ready http://127.0.0.1:${server.address().port}`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
