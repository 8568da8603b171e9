// A real, independently written OAuth2 authorization server for tokengate's
// end-to-end tests: panva's oidc-provider (npm), configured, not reimplemented.
//
//   node server.mjs [PORT]            (or PORT=...; default 9000)
//   IDP_CC_TTL_S=600                  lifetime of client-credentials tokens, seconds
//   IDP_KEYS_FILE=keys.json           signing keys: a JWKS with private keys (RSA and/or
//                                     P-256 EC); unset: a throwaway RSA and EC key each
//
// Endpoints (oidc-provider's defaults; discovery at /.well-known/openid-configuration):
//   POST /token                   grant_type=client_credentials, client_secret_basic
//   POST /token/introspection     RFC 7662; the caller authenticates (gateway)
//   POST /token/revocation        RFC 7009
//
// Quirks found in oidc-provider 9.13.x that the tests must know about:
// - Client-credentials tokens have no end user, so introspection answers carry no
//   `sub`. They do carry active, client_id, scope, exp, iat, iss, token_type ("Bearer").
// - A requested scope must be in the client's `scope` metadata, or the token
//   endpoint answers 400 invalid_scope. With no scope asked, the token has none
//   (the introspection answer then has no `scope` member at all).
// - Unknown, expired and revoked tokens answer 200 {"active": false}. Expiry is exact
//   for introspection (exp <= now), though lookups allow a 15 s clock tolerance inside.
// - The default allowedPolicy lets any authenticated client introspect any token but
//   lets a client revoke only its own tokens; both are replaced below so that only the
//   resource server `gateway` (and a token's own client) may introspect or revoke.
// - Opaque access tokens are 43 base64url characters; the access token format is
//   opaque unless the resource asked for is one of JWT_RESOURCES below.
// - JWT access tokens (RFC 9068, `resource=<one of JWT_RESOURCES>`) for client_credentials
//   carry: header {alg, typ: "at+jwt", kid}; payload {jti, sub, iat, exp, scope, client_id,
//   iss, aud}. `sub` is the client id (no end user), `jti` a random 43-character base64url id,
//   `aud` the resource URI (a string), `iss` the issuer URL; there is no `nbf`, and no
//   `scope` member when none was granted. The first key of the resource's `alg` in the
//   key set signs (its `kid` is the JWKS's, or the key's thumbprint when it has none).
// - The introspection and revocation endpoints refuse anything whose first segment decodes
//   as a JOSE header with 400 unsupported_token_type ("Structured JWT Tokens cannot be
//   introspected/revoked"), not {"active": false}, its own JWT access tokens included: a
//   JWT is never revocable at this IdP, only at the resource server (tokengate's admin API).
// - Resource indicators (RFC 8707) are on by default in 9.x: a token request without
//   `resource` gets a token with no `aud` (introspection answers carry none). With
//   `resource=<one of RESOURCES below>` the token's `aud` is that URI and its scopes are
//   cut to the resource's; any other resource answers 400 invalid_target.
// - Non-standard, test-only: the token request may carry `expires_in=N` to ask for a
//   shorter lifetime (clamped to 1..IDP_CC_TTL_S); oidc-provider ignores unknown
//   parameters, so the TTL function reads it from the parsed body.
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import process from 'node:process';

import Provider, { errors } from 'oidc-provider';

const port = Number(process.argv[2] ?? process.env.PORT ?? 9000);
const defaultTtl = Number(process.env.IDP_CC_TTL_S ?? 600);
const RESOURCE_SERVER = 'gateway';
// The APIs a token may be asked for (`resource` on the token request); `aud` is the
// resource URI itself. These tokens stay opaque, so tokengate introspects them.
const RESOURCES = new Set(['https://orders.example/api', 'https://billing.example/api']);
// APIs whose access tokens are JWTs (RFC 9068), each signed with its algorithm.
const JWT_RESOURCES = new Map([
  ['https://jwt.example/api', 'RS256'],
  ['https://jwt-es256.example/api', 'ES256'],
  ['https://jwt-other.example/api', 'RS256'],
]);

const clients = [
  // The introspecting resource server: tokengate itself. It never gets tokens.
  {
    client_id: RESOURCE_SERVER,
    client_secret: 'gateway-secret',
    grant_types: [],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
  },
  appClient('app-a', 'read write'),
  appClient('app-b', 'read'),
  appClient('app-c', 'write'),
];

function appClient(clientId, scope) {
  return {
    client_id: clientId,
    client_secret: `${clientId}-secret`,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
    scope,
  };
}

// The key file's keys, so a test can sign with them too or rotate them on a restart; else
// throwaway ones, so the provider does not fall back to its published dev keys.
function signingKeys() {
  if (process.env.IDP_KEYS_FILE) return JSON.parse(readFileSync(process.env.IDP_KEYS_FILE, 'utf8'));
  // RSA because clients default to RS256-signed ID tokens (an EC-only keystore fails them).
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
  const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey;
  return {
    keys: [
      { ...rsa.export({ format: 'jwk' }), use: 'sig', alg: 'RS256' },
      { ...ec.export({ format: 'jwk' }), use: 'sig', alg: 'ES256' },
    ],
  };
}

function requestedTtl(ctx) {
  const asked = Number.parseInt(ctx?.oidc?.body?.expires_in, 10);
  if (!Number.isFinite(asked)) return defaultTtl;
  return Math.min(Math.max(asked, 1), defaultTtl);
}

async function resourceServerInfo(ctx, resource) {
  if (JWT_RESOURCES.has(resource)) {
    return { scope: 'read write', accessTokenFormat: 'jwt', jwt: { sign: { alg: JWT_RESOURCES.get(resource) } } };
  }
  if (!RESOURCES.has(resource)) throw new errors.InvalidTarget();
  return { scope: 'read write', accessTokenFormat: 'opaque' };
}

// Only the resource server or the token's own client may look at or revoke a token.
function mayActOn(client, token) {
  return client.clientId === RESOURCE_SERVER || client.clientId === token.clientId;
}

const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients,
  jwks: signingKeys(),
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  scopes: ['openid', 'read', 'write'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true, allowedPolicy: async (ctx, client, token) => mayActOn(client, token) },
    revocation: { enabled: true, allowedPolicy: async (ctx, client, token) => mayActOn(client, token) },
    resourceIndicators: { enabled: true, getResourceServerInfo: resourceServerInfo },
  },
  ttl: {
    ClientCredentials: (ctx) => requestedTtl(ctx),
  },
});

// Log errors without request bodies or tokens.
provider.on('server_error', (ctx, err) => console.error(`oidc-provider: server_error ${err.message}`));

const server = provider.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider: listening on http://127.0.0.1:${port}`);
});
server.on('error', (err) => {
  console.error(`oidc-provider: cannot listen on 127.0.0.1:${port}: ${err.code}`);
  process.exit(2);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
