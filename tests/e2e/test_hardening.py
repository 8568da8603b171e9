"""Hardening: the filter under an authorization server that fails in every way,
hostile clients and a hostile admin API caller, and stale-if-error.

Every test ends the same way: once the IdP is well, Envoy and every worker's
VM still serve (a valid token passes on many new connections, so on every
worker) and Envoy's log shows no wasm failure (tests/e2e/wasm_log.py says what
a panic looks like in Envoy 1.40; `test_log_scan_catches_a_real_wasm_panic`
shows, with tests/e2e/panic_canary, that these checks do catch one).

The Envoys here are this module's own, on this module's own mock IdP (the
tests stop and restart it), with `introspection.timeout_ms` = 1000 to keep the
timeouts short. An IdP that is down, repeated Authorization headers and spoofed
claim headers are test_validation.py's; the admin API's routes, methods, every
disguised admin path (with and without Envoy's normalisation) and the bulk
limit are test_revocation.py's. Here are an IdP that answers wrongly, hostile
credentials and the bodies a hostile admin caller sends.
"""
import http.client
import json
import secrets
import socket
import time
import urllib.parse
from dataclasses import dataclass

import pytest

from conftest import CONCURRENCY
from harness import (
    ADMIN,
    ADMIN_TOKEN,
    FORM,
    HEALTH_CONNECTIONS,
    JSON_TYPE,
    LOOPBACK,
    PLUGIN_CONFIG,
    PREFIX,
    Envoy,
    Listener,
    LogWatch,
    MockIdp,
    Response,
    assert_admin_refused,
    assert_denied,
    assert_fails_closed,
    assert_still_serving,
    bearer,
    burst,
    merge,
    request,
    sha256,
    unknown_token,
)

from ops_harness import build_panic_canary
from wasm_log import failure_lines

TIMEOUT_MS = 1000
SLACK_S = 1.0  # the brief: a failing IdP costs the client at most timeout_ms + 1 s
SHIPPED = json.loads(PLUGIN_CONFIG.read_text())
CLAIM_HEADERS = SHIPPED["claims_to_headers"]
MAX_TOKEN_BYTES = 4096
MAX_BODY_BYTES = 1024 * 1024  # admin.max_body_bytes default


# --------------------------------------------------------------------------- helpers


def raw_request(port, method, path, headers, body=b"", timeout=10.0):
    """A request with header values sent as given (bytes allowed); (status, body) or (0, b"") if
    the connection was closed without an answer."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        resp = conn.getresponse()
        return Response(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()


@dataclass
class Setup:
    idp: MockIdp
    envoy: Envoy
    log: LogWatch

    def calls(self, token):
        return self.idp.calls_for(token)

    def admin_port(self, listener="tokengate_admin"):
        return self.envoy.listener_port(listener)

    def revocations(self):
        resp = request(self.admin_port(), f"{PREFIX}/revocations", ADMIN)
        assert resp.status == 200, resp
        return resp.json()

    def revocation_count(self):
        return self.revocations()["count"]


def assert_serving_once_the_idp_is_well(setup, envoy=None):
    """Once the IdP is well again, every worker validates tokens, and the log shows no VM failure."""
    envoy = envoy or setup.envoy
    setup.idp.fault("none")
    assert_still_serving(envoy, setup.idp, setup.log if envoy is setup.envoy else None)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def setup(procs, workdir, upstream):
    """This module's IdP and Envoy. Beside the template's listeners (`data`,
    `tokengate_admin`), copies of `data` (same vm_id, so same cache and denylist):
      badcreds      the gateway's client secret is wrong: the IdP answers 401
      query         allow_query_token
      query_hidden  allow_query_token + hide_credentials
    """
    idp = MockIdp(procs, workdir).start()
    config = idp.plugin_config(introspection={"timeout_ms": TIMEOUT_MS})
    extra = [
        Listener("badcreds", merge(config, {"introspection": {"client_secret": "not-the-secret"}})),
        Listener("query", merge(config, {"allow_query_token": True})),
        Listener("query_hidden", merge(config, {"allow_query_token": True, "hide_credentials": True})),
    ]
    envoy = Envoy(
        procs, workdir, idp.port, upstream.port, config,
        extra_listeners=extra, concurrency=CONCURRENCY, name="envoy-hardening",
    ).start()
    yield Setup(idp, envoy, LogWatch(envoy))
    envoy.stop()
    idp.stop()


@pytest.fixture
def hard(setup):
    """The module setup, its IdP without faults, checked healthy after the test."""
    setup.idp.reset()
    yield setup
    setup.idp.reset()
    assert_serving_once_the_idp_is_well(setup)


# --------------------------------------------------------------------------- 1. the IdP failing


IDP_FAULTS = [
    pytest.param({"mode": "slow", "delay_ms": TIMEOUT_MS + 1500}, "timeout", id="slower-than-timeout"),
    # Envoy turns a reset into its own 503 reply: counted as a status failure.
    pytest.param({"mode": "reset"}, "status", id="reset-mid-answer"),
    pytest.param({"mode": "status", "status": 500}, "status", id="status-500"),
    pytest.param({"mode": "status", "status": 502}, "status", id="status-502"),
    pytest.param({"mode": "status", "status": 503}, "status", id="status-503"),
    pytest.param({"mode": "status", "status": 504}, "timeout", id="status-504"),
    pytest.param({"mode": "status", "status": 429}, "status", id="status-429"),
    pytest.param({"mode": "nonjson"}, "not_json", id="not-json"),
    pytest.param({"mode": "huge"}, "too_large", id="8MiB-answer"),
]


def failure_counts(envoy):
    prefix = "wasmcustom.tokengate.introspection.failures."
    return {k[len(prefix):]: v for k, v in envoy.stats().items() if k.startswith(prefix)}


@pytest.mark.parametrize("fault, reason", IDP_FAULTS)
def test_idp_fault_fails_closed_counts_and_caches_nothing(hard, fault, reason):
    idp, envoy = hard.idp, hard.envoy
    token = unknown_token()
    idp.register_active(token)  # a good token: only the fault can deny it
    before = failure_counts(envoy)
    idp.fault(**fault)
    assert_fails_closed(envoy.get("/r", bearer(token)), TIMEOUT_MS, SLACK_S)
    assert hard.calls(token) >= 1, "the IdP was really asked"
    after = failure_counts(envoy)
    counted = {r: after[r] - before.get(r, 0) for r in after if after[r] != before.get(r, 0)}
    assert counted == {reason: 1}, f"counted as {counted}, want one {reason}"

    idp.fault("none")
    calls = hard.calls(token)
    resp = envoy.get("/r", bearer(token))
    assert resp.status == 200, f"the failure was cached: {resp}"
    assert hard.calls(token) == calls + 1, "the request after the fault must cost a new introspection"


BAD_ANSWERS = {
    "active-missing": dict(scope="read", client_id="app-a", sub="u"),
    "active-string": dict(active="true", scope="read"),
    "active-number": dict(active=1, scope="read"),
    "active-null": dict(active=None, scope="read"),
    "active-list": dict(active=[True], scope="read"),
    "scope-not-string": dict(active=True, scope=["read"]),
    "exp-string": dict(active=True, scope="read", exp="9999999999"),
    "exp-negative": dict(active=True, scope="read", exp=-1),
    "exp-fraction": dict(active=True, scope="read", exp=9999999999.5),
    "sub-object": dict(active=True, scope="read", sub={"id": "u"}),
}


@pytest.mark.parametrize("claims", BAD_ANSWERS.values(), ids=BAD_ANSWERS.keys())
def test_answer_that_is_not_rfc7662_fails_closed(hard, claims):
    idp, envoy = hard.idp, hard.envoy
    token = unknown_token()
    idp.register(token, **claims)
    for _ in range(2):
        resp = envoy.get("/r", bearer(token))
        assert_fails_closed(resp, TIMEOUT_MS, SLACK_S)
    assert hard.calls(token) == 2, "a bad answer is not cached either"
    idp.register_active(token)
    assert envoy.get("/r", bearer(token)).status == 200
    assert hard.calls(token) == 3


def test_exp_in_the_past_is_invalid_token_and_not_cached(hard):
    idp, envoy = hard.idp, hard.envoy
    token = unknown_token()
    idp.register_active(token, ttl=-10)  # active, but exp ten seconds ago
    for _ in range(3):
        params = assert_denied(envoy.get("/r", bearer(token)), 401, "invalid_token")
        assert "expired" in params.get("error_description", ""), params
    # Not remembered as valid, nor as invalid: the IdP's next answer counts.
    idp.register_active(token)
    assert envoy.get("/r", bearer(token)).status == 200


def test_token_expiring_while_cached_is_refused_by_every_worker_at_exp(hard):
    idp, envoy = hard.idp, hard.envoy
    token = unknown_token()
    claims = idp.register_active(token, ttl=3)
    # Fill the shared cache and every worker's local copy.
    statuses = burst(envoy.port, n=200, connections=24, headers=bearer(token))
    assert statuses == [200] * 200
    assert hard.calls(token) <= CONCURRENCY
    time.sleep(max(0.0, claims["exp"] + 0.3 - time.time()))
    statuses = burst(envoy.port, n=200, connections=24, headers=bearer(token))
    assert statuses == [401] * 200, {s: statuses.count(s) for s in set(statuses)}


def test_wrong_gateway_credentials_fail_closed_and_cache_nothing(hard):
    idp, envoy = hard.idp, hard.envoy
    token = unknown_token()
    idp.register_active(token)
    before = failure_counts(envoy).get("unauthorized", 0)
    for _ in range(2):
        resp = envoy.get("/r", bearer(token), listener="badcreds")
        assert_fails_closed(resp, TIMEOUT_MS, SLACK_S)
    assert failure_counts(envoy).get("unauthorized", 0) == before + 2
    calls = hard.calls(token)
    assert calls == 2, "the IdP refused the gateway twice"
    # With the right credentials (same VM, same shared cache): a new introspection, and 200.
    assert envoy.get("/r", bearer(token)).status == 200
    assert hard.calls(token) == calls + 1


# --------------------------------------------------------------------------- 2. hostile clients


def test_bearer_with_several_spaces_or_lower_case_scheme_is_accepted(hard):
    token = unknown_token()
    hard.idp.register_active(token)
    for value in [f"Bearer  {token}", f"Bearer   {token}", f"bearer {token}", f"BEARER  {token}"]:
        resp = hard.envoy.get("/r", {"Authorization": value})
        assert resp.status == 200, (value.split()[0], resp)


# value -> (status, error code of the challenge): a bearer token with a byte outside
# b64token is malformed; a scheme that is not "Bearer" is no bearer credential at all.
NON_ASCII = {
    "utf8-token": (b"Bearer \xc3\xa9t\xc3\xa9", 400, "invalid_request"),
    "latin1-byte": (b"Bearer abc\xffdef", 400, "invalid_request"),
    "high-byte-in-scheme": (b"B\xe9arer abcdef", 401, None),
    "c1-control": (b"Bearer abc\x85def", 400, "invalid_request"),
}


@pytest.mark.parametrize("value, status, error", NON_ASCII.values(), ids=NON_ASCII.keys())
def test_non_ascii_authorization_is_refused_without_asking_the_idp(hard, value, status, error):
    before = hard.idp.introspections()["count"]
    resp = raw_request(hard.envoy.port, "GET", "/r", [("Authorization", value)])
    assert_denied(resp, status, error)
    assert hard.idp.introspections()["count"] == before


def test_token_length_bound_is_4096_bytes(hard):
    longest = ("A" * (MAX_TOKEN_BYTES - 8)) + secrets.token_hex(4)
    hard.idp.register_active(longest)
    assert hard.envoy.get("/r", bearer(longest)).status == 200
    before = hard.idp.introspections()["count"]
    for size in (MAX_TOKEN_BYTES + 1, 8 * 1024, 32 * 1024):
        resp = hard.envoy.get("/r", bearer("A" * size))
        assert_denied(resp, 400, "invalid_request")
    assert hard.idp.introspections()["count"] == before, "an oversized token reached the IdP"


def test_claim_header_lookalikes_with_underscores_never_reach_the_upstream(hard):
    # CGI, WSGI and many frameworks fold '_' and '-' together (HTTP_X_AUTH_SUBJECT), so an
    # upstream may read X_Auth_Subject as the subject tokengate vouches for.
    token = unknown_token()
    hard.idp.register(token, active=True, scope="read", client_id="app-a", exp=int(time.time()) + 300)
    lookalikes = [(h.replace("-", "_"), "spoofed") for h in CLAIM_HEADERS.values()]
    resp = hard.envoy.get("/r", [*bearer(token).items(), *lookalikes])
    assert resp.status == 200, resp  # a valid token passes; only the lookalikes go
    seen = resp.json()["headers"]
    leaked = {h: v for h, v in seen.items() if h.replace("_", "-") in CLAIM_HEADERS.values() and v == "spoofed"}
    assert leaked == {}, f"claim-header lookalikes reached the upstream: {leaked}"


def test_query_token_is_ignored_by_default(hard):
    token = unknown_token()
    hard.idp.register_active(token)
    params = assert_denied(hard.envoy.get(f"/r?access_token={token}"), 401, None)
    assert set(params) == {"realm"}, "a bare challenge: the query token does not count"
    assert hard.calls(token) == 0
    # With a header as well, the header is what counts.
    other = unknown_token()
    hard.idp.register_active(other)
    assert hard.envoy.get(f"/r?access_token={token}", bearer(other)).status == 200
    assert hard.calls(token) == 0


def test_query_token_when_allowed(hard):
    envoy = hard.envoy
    token, other = unknown_token(), unknown_token()
    hard.idp.register_active(token)
    hard.idp.register_active(other)
    resp = envoy.get(f"/r?x=1&access_token={urllib.parse.quote(token)}", listener="query")
    assert resp.status == 200, resp
    # Both ways at once (RFC 6750 §2: never more than one method) or twice: invalid_request.
    for path, headers in [
        (f"/r?access_token={token}", bearer(token)),
        (f"/r?access_token={token}", bearer(other)),
        (f"/r?access_token={token}&access_token={other}", None),
        ("/r?access_token=a%20b", None),
        ("/r?access_token=", None),
    ]:
        assert_denied(envoy.get(path, headers, listener="query"), 400, "invalid_request")
    assert envoy.get("/r", listener="query").status == 401


@pytest.mark.parametrize("name", ["access_token", "access%5Ftoken", "%61ccess_token", "access_t%6Fken"])
def test_hidden_query_token_never_reaches_the_upstream(hard, name):
    # hide_credentials: the token the filter accepted from the query is not forwarded,
    # however its parameter name was spelled.
    token = unknown_token()
    hard.idp.register_active(token)
    resp = hard.envoy.get(f"/r?a=1&{name}={token}&b=2", listener="query_hidden")
    assert resp.status == 200, resp
    path = resp.json()["path"]
    assert token not in urllib.parse.unquote(path), f"the query token reached the upstream: {path}"
    assert "a=1" in path and "b=2" in path, path


# --------------------------------------------------------------------------- 3. a hostile admin caller


def admin_call(port, path, body=None, content_type=None, method="POST", auth=ADMIN, timeout=30.0):
    headers = dict(auth or {})
    if content_type:
        headers["Content-Type"] = content_type
    return request(port, path, headers, method, body, timeout)


@pytest.fixture
def victim(hard):
    """A valid token, to show that nothing the hostile caller sent revoked it."""
    token = unknown_token()
    hard.idp.register_active(token)
    assert hard.envoy.get("/r", bearer(token)).status == 200
    count = hard.revocation_count()
    yield token
    assert hard.revocation_count() == count, "a refused admin request revoked something"
    assert sha256(token) not in json.dumps(hard.revocations())
    assert hard.envoy.get("/r", bearer(token)).status == 200


def test_bulk_larger_than_the_body_limit_is_413(hard, victim):
    tokens = [victim] + [secrets.token_hex(8) for _ in range(60_000)]
    body = json.dumps({"tokens": tokens}).encode()
    assert len(body) > MAX_BODY_BYTES
    resp = admin_call(hard.admin_port(), f"{PREFIX}/revoke", body, JSON_TYPE)
    assert_admin_refused(resp, 413, "request_too_large")


def _nested(depth):
    return ("[" * depth + "]" * depth).encode()


GARBAGE_BODIES = {
    "deeply-nested-array": (_nested(100_000), JSON_TYPE),
    "deeply-nested-object": (b'{"tokens":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001, JSON_TYPE),
    "json-array": (b'["tok"]', JSON_TYPE),
    "json-null": (b"null", JSON_TYPE),
    "json-string": (b'"tok"', JSON_TYPE),
    "json-number": (b"1e999999", JSON_TYPE),
    "tokens-not-a-list": (b'{"tokens": "VICTIM"}', JSON_TYPE),
    "tokens-of-numbers": (b'{"tokens": [1, 2, 3]}', JSON_TYPE),
    "tokens-with-null": (b'{"tokens": ["VICTIM", null]}', JSON_TYPE),
    "duplicate-keys": (b'{"tokens": ["VICTIM"], "tokens": ["other"]}', JSON_TYPE),
    "unknown-key": (b'{"tokens": ["VICTIM"], "also": 1}', JSON_TYPE),
    "invalid-utf8": (b'{"tokens": ["VICTIM\xff\xfe"]}', JSON_TYPE),
    "nul-byte": (b'{"tokens": ["VIC\x00TIM"]}', JSON_TYPE),
    "escaped-nul": (b'{"tokens": ["VIC\\u0000TIM"]}', JSON_TYPE),
    "token-too-long": (b'{"tokens": ["VICTIM", "' + b"a" * (MAX_TOKEN_BYTES + 1) + b'"]}', JSON_TYPE),
    "token-with-space": (b'{"tokens": ["VICTIM", "a b"]}', JSON_TYPE),
    "client-id-control": (b'{"client_id": "app\\n-a"}', JSON_TYPE),
    "client-id-too-long": (b'{"client_id": "' + b"c" * 257 + b'"}', JSON_TYPE),
    "sub-empty": (b'{"sub": ""}', JSON_TYPE),
    "trailing-garbage": (b'{"tokens": ["VICTIM"]} x', JSON_TYPE),
    "truncated": (b'{"tokens": ["VICTIM"', JSON_TYPE),
    "form-binary": (bytes(range(256)), FORM),
    "form-no-token": (b"reason=x&token_type_hint=access_token", FORM),
    "form-empty-token": (b"token=", FORM),
    "form-bad-percent": (b"token=%ZZ%", FORM),
    "form-token-invalid-utf8": (b"token=%FF%FE", FORM),
    "form-two-tokens": (b"token=VICTIM&token=VICTIM", FORM),
    "form-json-body": (b'{"tokens": ["VICTIM"]}', FORM),
    "json-form-body": (b"token=VICTIM", JSON_TYPE),
}


@pytest.mark.parametrize("body, content_type", GARBAGE_BODIES.values(), ids=GARBAGE_BODIES.keys())
def test_garbage_revoke_bodies_are_400_and_revoke_nothing(hard, victim, body, content_type):
    body = body.replace(b"VICTIM", victim.encode())
    resp = admin_call(hard.admin_port(), f"{PREFIX}/revoke", body, content_type)
    assert_admin_refused(resp, 400, "invalid_request")


WRONG_TYPES = ["text/plain", "application/jsonp", "application/json-seq", "multipart/form-data; boundary=x",
               "application/x-www-form-urlencoded-x", "json", "*/*", "application/*"]


@pytest.mark.parametrize("content_type", WRONG_TYPES)
def test_wrong_content_types_are_415_and_revoke_nothing(hard, victim, content_type):
    for body in (urllib.parse.urlencode({"token": victim}).encode(), json.dumps({"tokens": [victim]}).encode()):
        resp = admin_call(hard.admin_port(), f"{PREFIX}/revoke", body, content_type)
        assert_admin_refused(resp, 415, "unsupported_media_type")


def test_truncated_body_revokes_nothing(hard, victim):
    body = urllib.parse.urlencode({"token": victim}).encode()
    # The client promises more than it sends, then goes away.
    with socket.create_connection((LOOPBACK, hard.admin_port()), timeout=5) as s:
        head = (f"POST {PREFIX}/revoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
                f"Content-Type: {FORM}\r\nContent-Length: {len(body) + 100}\r\n\r\n")
        s.sendall(head.encode() + body)
        time.sleep(0.3)


# Declared lengths past admin.max_body_bytes, up to past what a 32-bit usize holds (the
# module is wasm32: its usize is 32 bits, unlike the host's in unit tests).
@pytest.mark.parametrize("length", [MAX_BODY_BYTES + 1, 10**9, 2**32 + 1, 10**12])
def test_declared_oversized_body_is_413_before_any_body_is_read(hard, victim, length):
    body = urllib.parse.urlencode({"token": victim}).encode()
    with socket.create_connection((LOOPBACK, hard.admin_port()), timeout=3) as s:
        head = (f"POST {PREFIX}/revoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
                f"Content-Type: {FORM}\r\nContent-Length: {length}\r\n\r\n")
        s.sendall(head.encode() + body)
        try:
            answer = s.recv(4096)
        except socket.timeout:
            answer = b"(no answer in 3 s: the request is held, waiting for the body)"
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]


def test_admin_requests_on_the_data_listener_never_revoke(hard, victim):
    body = urllib.parse.urlencode({"token": victim}).encode()
    for path in (f"{PREFIX}/revoke", f"//{PREFIX}/revoke"):
        resp = admin_call(hard.envoy.port, path, body, FORM)
        assert_denied(resp, 401, "invalid_token")  # the admin token is no access token


def test_many_concurrent_hostile_admin_requests_leave_envoy_serving(hard, victim):
    import concurrent.futures

    port = hard.admin_port()
    form = urllib.parse.urlencode({"token": victim}).encode()
    cases = [
        (f"{PREFIX}/revoke", form, "text/plain", ADMIN, 415),
        (f"{PREFIX}/revoke", b"{", JSON_TYPE, ADMIN, 400),
        (f"{PREFIX}/revoke", form, FORM, bearer("wrong"), 401),
        (f"{PREFIX}/revoke", _nested(50_000), JSON_TYPE, ADMIN, 400),
        (f"{PREFIX}/nowhere", form, FORM, ADMIN, 404),
    ]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(admin_call, port, p, b, ct, "POST", a) for p, b, ct, a, _ in cases * 40]
        statuses = [f.result().status for f in futures]
    assert statuses == [c[4] for c in cases] * 40


# --------------------------------------------------------------------------- 4. stale-if-error


STALE_TTL_S = 2  # cache.max_ttl_s: the cache lifetime ends 2 s after the answer
STALE_S = 5  # cache.stale_if_error_s
# Past a deadline counted from when the answer reached the client, which is after the
# filter stored it: so the deadline has passed for the filter too (its clock is the same).
PAST_S = 0.1


@pytest.fixture(scope="module")
def stale_envoys(procs, workdir, upstream, setup):
    """Two Envoys on the module's IdP, with short cache lifetimes: stale-if-error on and off."""
    envoys = {}
    for name, stale in (("on", STALE_S), ("off", 0)):
        config = setup.idp.plugin_config(
            introspection={"timeout_ms": TIMEOUT_MS},
            cache={"max_ttl_s": STALE_TTL_S, "stale_if_error_s": stale},
        )
        envoys[name] = Envoy(
            procs, workdir, setup.idp.port, upstream.port, config,
            concurrency=CONCURRENCY, name=f"envoy-stale-{name}",
        ).start()
    yield envoys
    for envoy in envoys.values():
        envoy.stop()


STALE_SERVED = "tokengate.cache.stale_served"


def _cache_and_let_lifetime_end(idp, envoy, ttl=300):
    """A token cached by envoy, once its cache lifetime has ended; and when it was answered."""
    token = unknown_token()
    claims = idp.register_active(token, ttl=ttl)
    assert envoy.get("/r", bearer(token)).status == 200
    answered = time.time()
    time.sleep(max(0.0, answered + STALE_TTL_S + PAST_S - time.time()))
    return token, claims, answered


STALE_FAULTS = [
    pytest.param({"mode": "status", "status": 500}, id="status-500"),
    pytest.param({"mode": "slow", "delay_ms": TIMEOUT_MS + 1500}, id="timeout"),
    pytest.param({"mode": "nonjson"}, id="not-json"),
]


@pytest.mark.parametrize("fault", STALE_FAULTS)
def test_stale_answer_stands_in_while_the_idp_fails_for_stale_if_error_s(hard, stale_envoys, fault):
    idp, envoy = hard.idp, stale_envoys["on"]
    token, _, answered = _cache_and_let_lifetime_end(idp, envoy)
    served = envoy.metric(STALE_SERVED)
    idp.fault(**fault)
    calls = hard.calls(token)
    # New connections: the stand-in is in the shared cache, for every worker.
    for _ in range(2):
        resp = envoy.get("/r", bearer(token))
        assert resp.status == 200, f"no stale answer within stale_if_error_s: {resp}"
        assert resp.elapsed <= TIMEOUT_MS / 1000 + SLACK_S
    assert hard.calls(token) > calls, "the IdP was asked first"
    assert envoy.metric(STALE_SERVED) == served + 2
    # Past the cache lifetime + stale_if_error_s: the failure shows.
    time.sleep(max(0.0, answered + STALE_TTL_S + STALE_S + PAST_S - time.time()))
    assert_fails_closed(envoy.get("/r", bearer(token)), TIMEOUT_MS, SLACK_S)
    assert_serving_once_the_idp_is_well(hard, envoy)


def test_stale_answer_is_never_used_past_exp(hard, stale_envoys):
    idp, envoy = hard.idp, stale_envoys["on"]
    # exp falls inside what would be the stale window.
    token, claims, _ = _cache_and_let_lifetime_end(idp, envoy, ttl=STALE_TTL_S + 3)
    idp.fault("status", status=500)
    assert envoy.get("/r", bearer(token)).status == 200, "before exp the stand-in serves"
    time.sleep(max(0.0, claims["exp"] + PAST_S - time.time()))
    # The IdP fails and the only answer there is has expired: no answer to stand in.
    assert_fails_closed(envoy.get("/r", bearer(token)), TIMEOUT_MS, SLACK_S)


def test_stale_answer_is_not_used_while_the_idp_answers(hard, stale_envoys):
    idp, envoy = hard.idp, stale_envoys["on"]
    token, _, _ = _cache_and_let_lifetime_end(idp, envoy)
    served = envoy.metric(STALE_SERVED)
    calls = hard.calls(token)
    idp.register(token, active=False)  # revoked at the IdP meanwhile
    assert_denied(envoy.get("/r", bearer(token)), 401, "invalid_token")
    assert hard.calls(token) == calls + 1, "re-introspected once the cache lifetime ended"
    assert envoy.metric(STALE_SERVED) == served


def test_stale_answer_never_stands_in_for_a_revoked_token(hard, stale_envoys):
    idp, envoy = hard.idp, stale_envoys["on"]
    token = unknown_token()
    idp.register_active(token)
    assert envoy.get("/r", bearer(token)).status == 200
    answered = time.time()
    resp = admin_call(envoy.listener_port("tokengate_admin"), f"{PREFIX}/revoke",
                      urllib.parse.urlencode({"token": token}).encode(), FORM)
    assert resp.status == 200, resp
    time.sleep(max(0.0, answered + STALE_TTL_S + PAST_S - time.time()))
    idp.fault("status", status=500)
    assert_denied(envoy.get("/r", bearer(token)), 401, "invalid_token")


def test_stale_answer_survives_a_client_that_gives_up_during_the_refresh(hard, stale_envoys):
    # The request that refreshes the token goes away before the IdP answers: the
    # stand-in must still be there for the next one.
    idp, envoy = hard.idp, stale_envoys["on"]
    token, _, _ = _cache_and_let_lifetime_end(idp, envoy)
    idp.fault("slow", delay_ms=TIMEOUT_MS + 1500)
    with pytest.raises((TimeoutError, socket.timeout, OSError)):
        envoy.get("/r", bearer(token), timeout=0.3)
    time.sleep(0.2)
    resp = envoy.get("/r", bearer(token))
    assert resp.status == 200, f"the stand-in was lost with the client: {resp}"


def test_without_stale_if_error_the_same_outage_is_503(hard, stale_envoys):
    idp, envoy = hard.idp, stale_envoys["off"]
    token, _, _ = _cache_and_let_lifetime_end(idp, envoy)
    idp.fault("status", status=500)
    assert_fails_closed(envoy.get("/r", bearer(token)), TIMEOUT_MS, SLACK_S)
    assert envoy.metric(STALE_SERVED) == 0
    assert_serving_once_the_idp_is_well(hard, envoy)


# --------------------------------------------------------------------------- the log scan itself


def test_log_scan_catches_a_real_wasm_panic(procs, workdir, upstream, setup):
    """A module that panics on request (tests/e2e/panic_canary): the scan must see it, and a
    worker whose VM panicked must fail the health check. Proves the checks above can fail."""
    wasm = build_panic_canary()
    envoy = Envoy(
        procs, workdir, setup.idp.port, upstream.port, setup.idp.plugin_config(),
        wasm=str(wasm), concurrency=CONCURRENCY, name="envoy-canary",
        failure_policy="FAIL_CLOSED",  # a dead VM stays dead: what the health check must see
    ).start()
    try:
        assert envoy.get("/").status == 200
        assert failure_lines(envoy.log_text()) == []
        assert envoy.get("/", {"x-panic": "1"}).status == 503
        statuses = [envoy.get("/").status for _ in range(HEALTH_CONNECTIONS)]
        assert 503 in statuses, "one worker's VM is dead: some new connection must meet it"
        found = failure_lines(envoy.log_text())
        assert any("panicked" in line for line in found), found
        assert any("Function: proxy_on_request_headers failed" in line for line in found), found
    finally:
        envoy.stop()
