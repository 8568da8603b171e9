"""The test servers: the echo upstream, the mock IdP and oidc-provider."""
import json
import os
import sys
import time
import urllib.parse
from pathlib import Path

from .client import get, post_form, post_json
from .config import merge
from .paths import GATEWAY_CLIENT, IDP_DIR, LOOPBACK, PLUGIN_CONFIG, SERVERS
from .processes import free_port, wait_for_port


class EchoUpstream:
    """The protected service: echoes the request it received as JSON."""

    def __init__(self, procs, workdir):
        self.port = free_port()
        self.proc = procs.start(
            "echo-upstream",
            [sys.executable, SERVERS / "echo_upstream.py", "--port", self.port],
            Path(workdir) / "echo-upstream.log",
        )
        wait_for_port(self.proc, self.port)


class Idp:
    """What every IdP fixture offers, whatever server is behind it."""

    kind = "?"
    introspection_path = "/"
    revocation_path = "/"

    def __init__(self, procs, workdir):
        self.procs = procs
        self.workdir = Path(workdir)
        self.port = free_port()
        self.proc = None

    @property
    def authority(self):
        return f"{LOOPBACK}:{self.port}"

    def start(self):
        self.proc = self._spawn()
        wait_for_port(self.proc, self.port, timeout=30)
        return self

    def stop(self):
        if self.proc:
            self.procs.stop(self.proc)
            self.proc = None

    def plugin_config(self, **overrides):
        """envoy/tokengate.json, pointed at this IdP, with top-level sections merged from overrides."""
        config = json.loads(PLUGIN_CONFIG.read_text())
        config["introspection"]["path"] = self.introspection_path
        config["introspection"]["authority"] = self.authority
        return merge(config, overrides)

    def introspect(self, token):
        """The IdP's own answer for token, asked directly as the gateway client (not via Envoy)."""
        resp = post_form(self.port, self.introspection_path, {"token": token}, auth=GATEWAY_CLIENT)
        assert resp.status == 200, resp
        return resp.json()

    def revoke(self, token):
        resp = post_form(self.port, self.revocation_path, {"token": token}, auth=GATEWAY_CLIENT)
        assert resp.status == 200, resp

    def issue_token(self, scope="read", client_id=None, sub=None, ttl=None):
        raise NotImplementedError

    def _spawn(self):
        raise NotImplementedError


class MockIdp(Idp):
    """tests/servers/mock_idp.py: scriptable claims, faults and call records."""

    kind = "mock"
    introspection_path = "/oauth2/introspect"
    revocation_path = "/oauth2/revoke"

    def _spawn(self):
        return self.procs.start(
            "mock-idp",
            [sys.executable, SERVERS / "mock_idp.py", "--port", self.port],
            self.workdir / f"mock-idp-{self.port}.log",
        )

    def issue_token(self, scope="read", client_id="app-a", sub=None, ttl=None):
        fields = {"client_id": client_id or "app-a", "scope": scope}
        if sub is not None:
            fields["sub"] = sub
        if ttl is not None:
            fields["expires_in"] = str(ttl)
        resp = post_form(self.port, "/oauth2/token", fields)
        assert resp.status == 200, resp
        return resp.json()["access_token"]

    # The control API: only the mock has it.

    def register(self, token, **claims):
        """Make the IdP answer exactly `claims` for `token` (verbatim, exp never checked)."""
        resp = post_json(self.port, "/_control/tokens", {"token": token, **claims})
        assert resp.status == 200, resp

    def register_active(self, token, scope="read", ttl=300, **extra):
        now = int(time.time())
        claims = dict(active=True, scope=scope, client_id="app-a", sub="user-1", iat=now, exp=now + ttl)
        claims.update(extra)
        self.register(token, **claims)
        return claims

    def fault(self, mode, delay_ms=0, status=500):
        resp = post_json(self.port, "/_control/fault", {"mode": mode, "delay_ms": delay_ms, "status": status})
        assert resp.status == 200, resp

    def reset(self):
        resp = post_json(self.port, "/_control/reset", {})
        assert resp.status == 200, resp

    def introspections(self):
        resp = get(self.port, "/_control/introspections")
        assert resp.status == 200, resp
        return resp.json()

    def calls_for(self, token):
        return sum(1 for t in self.introspections()["tokens"] if t == token)


class OidcIdp(Idp):
    """tests/idp/server.mjs: panva's oidc-provider, a real OAuth2 server."""

    kind = "oidc"
    introspection_path = "/token/introspection"
    revocation_path = "/token/revocation"
    CLIENT_SCOPES = {"app-a": "read write", "app-b": "read", "app-c": "write"}
    # server.mjs's JWT_RESOURCES: the API (`aud`) whose access tokens are JWTs signed with alg.
    JWT_RESOURCES = {"RS256": "https://jwt.example/api", "ES256": "https://jwt-es256.example/api"}
    # Another JWT API, one a gateway for JWT_RESOURCES does not serve (a wrong `aud`).
    OTHER_JWT_RESOURCE = "https://jwt-other.example/api"

    def __init__(self, procs, workdir, default_ttl=600, keys_file=None):
        super().__init__(procs, workdir)
        self.default_ttl = default_ttl
        self.keys_file = keys_file

    @property
    def issuer(self):
        """The `iss` of its JWTs: the URL it serves (server.mjs)."""
        return f"http://{self.authority}"

    def restart(self, keys_file=None):
        """Stopped and started on the same port, signing with keys_file's JWKS (None: throwaway
        keys). Its in-memory store starts empty: opaque tokens issued before are unknown."""
        self.stop()
        self.keys_file = keys_file
        return self.start()

    def jwks_path(self):
        """The path of the JWKS it publishes, found as a resource server would: discovery's jwks_uri."""
        resp = get(self.port, "/.well-known/openid-configuration")
        assert resp.status == 200, resp
        return urllib.parse.urlsplit(resp.json()["jwks_uri"]).path

    def _spawn(self):
        modules = IDP_DIR / "node_modules" / "oidc-provider"
        if not modules.is_dir():
            raise RuntimeError("oidc-provider is not installed: run `make idp`")
        env = dict(os.environ, IDP_CC_TTL_S=str(self.default_ttl), NODE_ENV="test")
        env.pop("IDP_KEYS_FILE", None)
        if self.keys_file is not None:
            env["IDP_KEYS_FILE"] = str(self.keys_file)
        return self.procs.start(
            "oidc-provider",
            ["node", IDP_DIR / "server.mjs", self.port],
            self.workdir / f"oidc-provider-{self.port}.log",
            env=env,
            cwd=IDP_DIR,
        )

    def issue_token(self, scope="read", client_id=None, sub=None, ttl=None, resource=None):
        """A client-credentials token. client_id picks a registered client able to hold scope;
        resource (one of server.mjs's RESOURCES) becomes the token's `aud`."""
        if sub is not None:
            raise ValueError("oidc-provider's client-credentials tokens have no sub; use the mock IdP")
        client_id = client_id or self._client_for(scope)
        fields = {"grant_type": "client_credentials"}
        if scope:
            fields["scope"] = scope
        if ttl is not None:
            fields["expires_in"] = str(ttl)  # honoured by server.mjs's TTL function, test-only
        if resource is not None:
            fields["resource"] = resource
        resp = post_form(self.port, "/token", fields, auth=(client_id, f"{client_id}-secret"))
        assert resp.status == 200, resp
        return resp.json()["access_token"]

    def issue_jwt(self, scope="read", client_id=None, ttl=None, alg="RS256", resource=None):
        """A client-credentials JWT access token (RFC 9068) signed with alg, for the JWT API
        of that alg (its `aud`) unless resource names another."""
        return self.issue_token(scope=scope, client_id=client_id, ttl=ttl, resource=resource or self.JWT_RESOURCES[alg])

    def _client_for(self, scope):
        wanted = set((scope or "").split())
        for client, allowed in self.CLIENT_SCOPES.items():
            if wanted <= set(allowed.split()):
                return client
        raise ValueError(f"no oidc client may hold scope {scope!r}")
