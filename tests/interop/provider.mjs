// A real OpenID provider (oidc-provider, pinned in package.json) for
// phi-guard's interop tests and `make run IDP=oidc-provider`.
//
//   node tests/interop/provider.mjs [config.json]
//
// Listens on 127.0.0.1 (port 0 = the OS picks) and prints one JSON line on
// stdout once it serves: {"event":"ready","issuer":…,"port":…,"kids":{…}}.
// The issuer is http://127.0.0.1:<port>, known only once the port is.
//
// Only what phi-guard's tests need: the client-credentials grant, resource
// indicators (RFC 8707) so that tokens for the API's audience are RFC 9068
// JWT access tokens (or opaque, per client), token introspection (RFC 7662)
// and revocation (RFC 7009). No end-user flows: dev interactions are off and
// no client may use the authorization endpoint.
//
// Keys: one RSA (RS256) and one P-256 (ES256) signing key, made at start.
// SIGUSR2 rotates them as oidc-provider's docs recommend (new keys first, so
// they sign; the old ones stay published, so tokens in flight still verify)
// and prints {"event":"rotated","kids":{…}}.
//
// Config (all optional; see DEFAULTS): port, audience, clients[] with
// client_id, client_secret, scope (what it may get), alg (RS256 | ES256),
// format (jwt | opaque), ttl (seconds); and introspector {client_id,
// client_secret}: a resource server that may only introspect.

import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';

import Provider, { errors } from 'oidc-provider';

const DEFAULTS = {
  port: 0,
  audience: 'https://fhir.example.org',
  clients: [
    { client_id: 'ward-app', client_secret: 'ward-app-secret', scope: 'read:patient-profile', alg: 'RS256' },
  ],
  introspector: null,
};

const config = { ...DEFAULTS, ...(process.argv[2] ? JSON.parse(fs.readFileSync(process.argv[2], 'utf8')) : {}) };
const byClient = new Map(config.clients.map((c) => [c.client_id, c]));

function signingKey(type, alg) {
  const options = type === 'rsa' ? { modulusLength: 2048 } : { namedCurve: 'P-256' };
  const { privateKey } = crypto.generateKeyPairSync(type, options);
  const kid = `${alg.toLowerCase()}-${crypto.randomBytes(4).toString('hex')}`;
  return { ...privateKey.export({ format: 'jwk' }), kid, alg, use: 'sig' };
}

function freshKeys() {
  return [signingKey('rsa', 'RS256'), signingKey('ec', 'ES256')];
}

/// The signing kid per algorithm: the first key of each (the one that signs).
function kids(keys) {
  const out = {};
  for (const k of keys) out[k.alg] ??= k.kid;
  return out;
}

function build(issuer, keys) {
  const clients = config.clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
  }));
  if (config.introspector) {
    clients.push({
      client_id: config.introspector.client_id,
      client_secret: config.introspector.client_secret,
      grant_types: [],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic',
    });
  }
  const provider = new Provider(issuer, {
    clients,
    jwks: { keys },
    // Cookies sign nothing here (no end-user sessions), but the provider wants keys.
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: {
        enabled: true,
        // Only the resource server (the introspector) may ask, and clients about their own tokens.
        allowedPolicy: async (ctx, client, token) =>
          client.clientId === config.introspector?.client_id || client.clientId === token.clientId,
      },
      revocation: {
        enabled: true,
        // A client revokes its own tokens, nobody else's.
        allowedPolicy: async (ctx, client, token) => client.clientId === token.clientId,
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => config.audience,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (ctx, resource, client) => {
          const c = byClient.get(client.clientId);
          if (resource !== config.audience || !c) throw new errors.InvalidTarget();
          return {
            audience: config.audience,
            scope: c.scope,
            accessTokenFormat: c.format ?? 'jwt',
            ...(c.ttl ? { accessTokenTTL: c.ttl } : {}),
            ...((c.format ?? 'jwt') === 'jwt' ? { jwt: { sign: { alg: c.alg ?? 'RS256' } } } : {}),
          };
        },
      },
    },
    enabledJWA: { idTokenSigningAlgValues: ['RS256', 'ES256'] },
    // A client's `ttl` (seconds) if it has one, else 10 minutes.
    ttl: { ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? 600 },
  });
  // Loopback only; the issuer's scheme is what phi-guard is told.
  provider.proxy = false;
  return provider;
}

let keys = freshKeys();
let handler = null;
const server = http.createServer((req, res) => handler(req, res));
server.listen(config.port, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  handler = build(issuer, keys).callback();
  process.on('SIGUSR2', () => {
    keys = [...freshKeys(), ...keys.slice(0, 2)];
    handler = build(issuer, keys).callback();
    console.log(JSON.stringify({ event: 'rotated', kids: kids(keys) }));
  });
  console.log(JSON.stringify({ event: 'ready', issuer, port, kids: kids(keys) }));
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => process.exit(0));
}
