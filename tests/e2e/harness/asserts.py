"""What a client sees, asserted once for every test file: denials, the fail-closed 503,
admin answers, and the tokens and names the tests make up."""
import hashlib
import re
import secrets
import time

from wasm_log import failure_lines

from .client import bearer

REALM = "tokengate"
ADMIN_REALM = "tokengate-admin"
ADMIN_TOKEN = "admin-demo-token"  # the demo credential of envoy/envoy.yaml's admin listener
ADMIN = bearer(ADMIN_TOKEN)
PREFIX = "/tokengate"
FORM = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"
# Enough new connections that each of the 4 workers gets some: (3/4)^24 < 0.1 %.
HEALTH_CONNECTIONS = 24


# --------------------------------------------------------------------------- tokens and names


def unknown_token():
    return secrets.token_urlsafe(32)


def sha256(token):
    """A token's revocation id (the admin API and etcd name a token by it)."""
    return hashlib.sha256(token.encode()).hexdigest()


def issue(idp, client_id=None, sub=None, scope="read", ttl=None):
    """A token from idp. The mock sets a subject (user-42 unless given); oidc-provider's
    client-credentials tokens have none, and it picks a client able to hold scope."""
    if idp.kind == "oidc":
        return idp.issue_token(scope=scope, client_id=client_id, ttl=ttl)
    return idp.issue_token(scope=scope, client_id=client_id or "app-a", sub=sub or "user-42", ttl=ttl)


def unique(name):
    return f"{name}-{secrets.token_hex(4)}"


def sleep_until(unix_time):
    time.sleep(max(0.0, unix_time - time.time()))


# --------------------------------------------------------------------------- denials


def from_upstream(resp):
    """Whether the echo upstream answered (its body is the request it got)."""
    try:
        body = resp.json()
    except ValueError:
        return False
    return isinstance(body, dict) and "method" in body and "headers" in body


def assert_not_from_upstream(resp):
    assert not from_upstream(resp), "the upstream answered"


def challenge(resp):
    """The WWW-Authenticate challenge as (scheme, {param: value}); exactly one must be sent."""
    values = resp.header_all("WWW-Authenticate")
    assert len(values) == 1, f"want one WWW-Authenticate, got {values!r}"
    scheme, _, rest = values[0].partition(" ")
    params = dict(re.findall(r'([A-Za-z_]+)="((?:[^"\\]|\\.)*)"', rest))
    return scheme, params


def assert_denied(resp, status, error, realm=REALM):
    """A denial: status, a Bearer challenge of realm naming error (or none), a JSON error body."""
    assert resp.status == status, resp
    scheme, params = challenge(resp)
    assert scheme == "Bearer", resp.header_all("WWW-Authenticate")
    assert params.get("realm") == realm, params
    if error is None:
        assert "error" not in params, params
    else:
        assert params.get("error") == error, params
    body = resp.json()
    assert {"error", "error_description"} <= body.keys(), body
    if error is not None:
        assert body["error"] == error, body
    assert_not_from_upstream(resp)
    return params


def assert_invalid_token(resp, realm=REALM):
    """What a client with an unknown, inactive or revoked token sees: 401, RFC 6750 invalid_token."""
    return assert_denied(resp, 401, "invalid_token", realm)


def assert_fails_closed(resp, timeout_ms, slack_s=1.0):
    """tokengate's 503: temporarily_unavailable, no challenge (RFC 6750 has none for it),
    within the introspection timeout and slack_s."""
    assert resp.status == 503, resp
    assert resp.json()["error"] == "temporarily_unavailable", resp
    assert resp.header_all("WWW-Authenticate") == [], resp
    assert_not_from_upstream(resp)
    assert resp.elapsed <= timeout_ms / 1000 + slack_s, f"took {resp.elapsed:.2f}s"


def upstream_headers(resp):
    """The request headers the upstream received, from a request that passed."""
    assert resp.status == 200, resp
    return resp.json()["headers"]


# --------------------------------------------------------------------------- after a hostile case


class LogWatch:
    """Envoy's log from where the last check left off."""

    def __init__(self, envoy):
        self.envoy = envoy
        self.offset = 0

    def new_failures(self):
        text = self.envoy.log_text()
        fresh, self.offset = text[self.offset:], len(text)
        return failure_lines(fresh)


def assert_still_serving(envoy, idp, log=None):
    """Every worker still validates tokens, and Envoy's log (since `log`'s last check, or all
    of it) shows no wasm failure (tests/e2e/wasm_log.py says what one looks like)."""
    assert envoy.alive(), f"Envoy exited:\n{envoy.proc.log_tail()}"
    token = issue(idp)
    statuses = [envoy.get("/health", bearer(token)).status for _ in range(HEALTH_CONNECTIONS)]
    assert statuses == [200] * HEALTH_CONNECTIONS, f"a worker stopped serving: {statuses}"
    assert envoy.get("/health").status == 401
    failures = log.new_failures() if log is not None else failure_lines(envoy.log_text())
    assert failures == [], "wasm failure in Envoy's log:\n" + "\n".join(failures)


# --------------------------------------------------------------------------- the admin API


def assert_ok(resp):
    assert resp.status == 200, resp
    assert resp.header("Content-Type") == "application/json", resp.headers
    return resp.json()


def assert_admin_refused(resp, status, error=None, what=""):
    """An admin error: the status, a JSON body naming the error, no upstream answer."""
    assert resp.status == status, f"{what}: {resp}"
    body = resp.json()
    assert {"error", "error_description"} <= body.keys(), body
    if error:
        assert body["error"] == error, body
    assert "method" not in body, "the upstream answered"
    return body


def assert_admin_challenge(resp, what=""):
    assert_admin_refused(resp, 401, what=what)
    assert resp.header_all("WWW-Authenticate") == [f'Bearer realm="{ADMIN_REALM}"'], (what, resp.headers)
