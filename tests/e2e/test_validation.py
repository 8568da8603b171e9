"""Bearer-token validation, seen from the client and from the protected upstream.

Each test runs against a real Envoy (--concurrency 4) loading the tokengate wasm.
Tests taking `idp` run twice: against the mock IdP and against oidc-provider.
Tests taking `mock_idp` need its control API (custom claims, faults, call records).
"""
import http.client
import json
import secrets
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import CONCURRENCY
from harness import (
    GATEWAY_CLIENT,
    PLUGIN_CONFIG,
    Listener,
    assert_denied,
    assert_fails_closed,
    assert_still_serving,
    basic_auth,
    bearer,
    burst,
    challenge,
    get,
    issue,
    loopback_cluster,
    merge,
    sleep_until,
    unknown_token,
    upstream_headers,
)

SHIPPED = json.loads(PLUGIN_CONFIG.read_text())
CLAIMS_TO_HEADERS = SHIPPED["claims_to_headers"]
REQUIRED_SCOPE = " ".join(SHIPPED["required_scopes"])
IDP_CALLS = "cluster.idp.upstream_rq_total"


# --------------------------------------------------------------------------- credentials


def test_request_without_credentials_gets_a_bare_challenge(envoy):
    resp = envoy.get("/resource")
    params = assert_denied(resp, 401, error=None)
    assert set(params) == {"realm"}, "no error code when there were no credentials (RFC 6750 3.1)"


# Authorization values that are a Bearer credential but not one RFC 6750 b64token
# (1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="): the filter refuses each
# with 400 invalid_request without asking the IdP.
MALFORMED = {
    "bearer-alone": "Bearer",
    "bearer-then-spaces": "Bearer    ",
    "two-tokens": "Bearer abc def",
    "at-sign": "Bearer abc@def",
    "comma": "Bearer abc,def",
    "quoted": 'Bearer "abcdef"',
    "padding-inside": "Bearer ab=cdef",
    "padding-only": "Bearer ===",
    "bang": "Bearer abc!def",
    "semicolon": "Bearer abc;def",
    "colon": "Bearer abc:def",
    "parens": "Bearer a(b)c",
    "backslash": "Bearer abc\\def",
    "percent": "Bearer abc%20def",
    "star": "Bearer abc*def",
    "tab-inside": "Bearer abc\tdef",
    "two-credentials": "Bearer abc, Bearer def",
    "equals-then-text": "Bearer abc==def",
}


@pytest.mark.parametrize("value", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_bearer_credential_is_invalid_request(envoy, value):
    before = envoy.counter(IDP_CALLS)
    resp = envoy.get("/resource", {"Authorization": value})
    assert_denied(resp, 400, "invalid_request")
    assert envoy.counter(IDP_CALLS) == before, "a malformed credential must not reach the IdP"


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Digest abc", "Token abcdef"])
def test_other_scheme_gets_a_bare_challenge(envoy, value):
    # RFC 6750 3.1: a client that used an unsupported method gets no error code.
    before = envoy.counter(IDP_CALLS)
    resp = envoy.get("/resource", {"Authorization": value})
    params = assert_denied(resp, 401, error=None)
    assert set(params) == {"realm"}
    assert envoy.counter(IDP_CALLS) == before


def test_repeated_authorization_headers_never_pass(envoy, idp):
    # Envoy joins repeated headers into one value with ", " (RFC 9110 §5.3), so the filter
    # sees "Bearer x,Basic y" (a token with a comma: invalid_request) or "Basic y,Bearer x"
    # (another scheme first: the bare challenge). Either way no request passes and no
    # half-credential reaches the IdP.
    token = issue(idp)
    basic = "Basic dXNlcjpwYXNz"
    before = envoy.counter(IDP_CALLS)
    for headers, status, error in [
        ([("Authorization", f"Bearer {token}")] * 2, 400, "invalid_request"),
        ([("Authorization", f"Bearer {token}")] * 3, 400, "invalid_request"),
        ([("Authorization", f"Bearer {token}"), ("Authorization", basic)], 400, "invalid_request"),
        ([("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {unknown_token()}")], 400, "invalid_request"),
        ([("Authorization", basic), ("Authorization", f"Bearer {token}")], 401, None),
    ]:
        assert_denied(envoy.get("/resource", headers), status, error)
    assert envoy.counter(IDP_CALLS) == before, "a repeated credential must not reach the IdP"
    if idp.kind == "mock":
        assert idp.calls_for(token) == 0
    assert_still_serving(envoy, idp)


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(envoy, idp, scheme):
    token = issue(idp)
    resp = envoy.get("/resource", bearer(token, scheme))
    assert resp.status == 200, resp


# --------------------------------------------------------------------------- token state


def test_unknown_token_is_invalid_token(envoy):
    resp = envoy.get("/resource", bearer(unknown_token()))
    assert_denied(resp, 401, "invalid_token")


def test_revoked_token_is_invalid_token(envoy, idp):
    token = issue(idp)
    idp.revoke(token)
    assert idp.introspect(token) == {"active": False}
    resp = envoy.get("/resource", bearer(token))
    assert_denied(resp, 401, "invalid_token")


def test_inactive_answer_is_invalid_token_whatever_else_it_says(envoys, mock_idp):
    token = unknown_token()
    mock_idp.register_active(token, active=False)
    resp = envoys.get(mock_idp).get("/resource", bearer(token))
    assert_denied(resp, 401, "invalid_token")


def test_token_not_yet_valid_is_invalid_token(envoys, mock_idp):
    token = unknown_token()
    mock_idp.register_active(token, nbf=int(time.time()) + 600)
    resp = envoys.get(mock_idp).get("/resource", bearer(token))
    assert_denied(resp, 401, "invalid_token")


def test_token_without_required_scope_is_insufficient_scope(envoy, idp):
    token = issue(idp, scope="write")
    resp = envoy.get("/resource", bearer(token))
    params = assert_denied(resp, 403, "insufficient_scope")
    assert params.get("scope") == REQUIRED_SCOPE


# --------------------------------------------------------------------------- what the upstream sees


def test_valid_token_reaches_upstream_with_claim_headers(envoy, idp):
    token = issue(idp)
    seen = upstream_headers(envoy.get("/resource", bearer(token)))
    answer = idp.introspect(token)
    for claim, header in CLAIMS_TO_HEADERS.items():
        if claim in answer:
            assert seen.get(header) == str(answer[claim]), (claim, header)
        else:
            assert header not in seen, f"{header} sent though the IdP gave no {claim}"
    # Both IdPs give client_id and scope, and the mock a sub: the mapping is really exercised.
    assert "x-auth-client-id" in seen and "x-auth-scope" in seen
    if idp.kind == "mock":
        assert seen["x-auth-subject"] == "user-42"
    assert seen.get("authorization") == f"Bearer {token}", "Authorization is kept unless hide_credentials"


def test_spoofed_claim_headers_are_replaced_or_removed(envoy, idp):
    # oidc-provider's tokens have no `sub`: the subject header must then be absent upstream,
    # whatever the client sent, in any case and however often.
    token = issue(idp)
    spoofed = [(header, "spoofed") for header in CLAIMS_TO_HEADERS.values()]
    spoofed += [(header.upper(), "SPOOFED") for header in CLAIMS_TO_HEADERS.values()]
    spoofed += [(header, "again") for header in CLAIMS_TO_HEADERS.values()]
    seen = upstream_headers(envoy.get("/resource", [*bearer(token).items(), *spoofed]))
    answer = idp.introspect(token)
    for claim, header in CLAIMS_TO_HEADERS.items():
        if claim in answer:
            assert seen.get(header) == str(answer[claim]), (header, seen.get(header))
        else:
            assert header not in seen, f"client-sent {header} reached the upstream"
    assert seen.get(CLAIMS_TO_HEADERS["scope"]) == "read"
    if idp.kind == "mock":
        assert seen.get(CLAIMS_TO_HEADERS["client_id"]) == "app-a"
    assert_still_serving(envoy, idp)


# Subjects an upstream would misread: Envoy strips a header value's surrounding spaces, so
# " admin " would arrive as "admin", and an empty one names nobody.
REFUSED_SUBJECTS = {"padded": " admin ", "leading-space": " admin", "trailing-space": "admin ", "empty": ""}


@pytest.mark.parametrize("sub", REFUSED_SUBJECTS.values(), ids=REFUSED_SUBJECTS.keys())
def test_claim_value_empty_or_with_surrounding_spaces_is_left_out_and_counted(envoys, mock_idp, sub):
    envoy = envoys.get(mock_idp)
    token = unknown_token()
    mock_idp.register_active(token, sub=sub)
    refused = envoy.metric("tokengate.claims.refused")
    for _ in range(2):
        # A client-sent subject cannot fill the gap either.
        seen = upstream_headers(envoy.get("/resource", [*bearer(token).items(), ("x-auth-subject", "admin")]))
        assert "x-auth-subject" not in seen, f"the upstream got x-auth-subject {seen['x-auth-subject']!r}"
        assert (seen["x-auth-client-id"], seen["x-auth-scope"]) == ("app-a", "read")
    assert envoy.metric("tokengate.claims.refused") - refused == 2


def test_hide_credentials_keeps_authorization_from_upstream(envoys, idp):
    envoy = envoys.get(idp, idp.plugin_config(hide_credentials=True))
    token = issue(idp)
    seen = upstream_headers(envoy.get("/resource", bearer(token)))
    assert "authorization" not in seen
    assert seen.get("x-auth-client-id"), "the claim headers are still set"


# --------------------------------------------------------------------------- the IdP failing


TIMEOUT_MS = SHIPPED["introspection"]["timeout_ms"]
# Each way a running IdP can fail, with its exact counter, is test_hardening.py's.


@pytest.mark.parametrize("kind", ["mock", "oidc"])
def test_idp_down_serves_cached_tokens_fails_closed_for_others_and_recovers(fresh, kind):
    idp = fresh.idp(kind)
    cached, uncached = issue(idp), issue(idp)
    envoy = fresh.envoy(idp)
    assert envoy.get("/resource", bearer(cached)).status == 200

    idp.stop()
    try:
        # New connections land on different workers: the cache they share must serve them all.
        statuses = [envoy.get("/resource", bearer(cached)).status for _ in range(2 * CONCURRENCY)]
        assert statuses == [200] * len(statuses)
        for _ in range(3):
            assert_fails_closed(envoy.get("/resource", bearer(uncached)), TIMEOUT_MS)
    finally:
        idp.start()  # same port: Envoy's cluster finds it again
    # The restarted IdP has forgotten its tokens: the mock is told again, and oidc-provider
    # now calls the token inactive. Either answer shows the refused connections were not cached.
    if kind == "mock":
        idp.register_active(uncached)
        resp = envoy.get("/resource", bearer(uncached))
        assert resp.status == 200, f"the refused connections were cached: {resp}"
        assert idp.calls_for(uncached) == 1
    else:
        assert_denied(envoy.get("/resource", bearer(uncached)), 401, "invalid_token")
    assert_still_serving(envoy, idp)


# --------------------------------------------------------------------------- caching


def test_cold_burst_costs_at_most_one_introspection_per_worker(envoy, idp):
    token = issue(idp)
    before = envoy.counter(IDP_CALLS)
    statuses = burst(envoy.port, n=400, connections=32, headers=bearer(token))
    calls = envoy.counter(IDP_CALLS) - before
    assert statuses.count(200) == 400, {s: statuses.count(s) for s in set(statuses)}
    assert 1 <= calls <= CONCURRENCY, f"{calls} introspections for one token"
    if idp.kind == "mock":
        assert idp.calls_for(token) == calls, "Envoy's count and the IdP's disagree"


def test_requests_waiting_on_a_slow_idp_share_its_answer(envoys, mock_idp):
    # With a slow IdP every connection is in flight while the first introspection is pending,
    # so this proves the coalescing, not just the cache filled by a fast first answer.
    envoy = envoys.get(mock_idp)
    token = unknown_token()
    mock_idp.register_active(token)
    mock_idp.fault("slow", delay_ms=300)
    statuses = burst(envoy.port, n=400, connections=32, headers=bearer(token))
    assert statuses.count(200) == 400, {s: statuses.count(s) for s in set(statuses)}
    assert 1 <= mock_idp.calls_for(token) <= CONCURRENCY


def test_requests_waiting_on_another_requests_introspection_are_counted_as_coalesced(envoys, mock_idp):
    # Every request arrives while the one introspection is pending (the IdP is slow): each is
    # a miss (it asked, or found another worker's call under way) or coalesced, none a hit.
    envoy = envoys.get(mock_idp)
    token = unknown_token()
    mock_idp.register_active(token)
    mock_idp.fault("slow", delay_ms=1000)  # under timeout_ms (2000)
    names = ("cache.coalesced", "cache.miss", "cache.hit.shared")
    before = {name: envoy.metric(f"tokengate.{name}") for name in names}
    n = 4 * CONCURRENCY
    with ThreadPoolExecutor(n) as pool:
        statuses = list(pool.map(lambda _: envoy.get("/resource", bearer(token)).status, range(n)))
    assert statuses == [200] * n
    delta = {name: envoy.metric(f"tokengate.{name}") - before[name] for name in names}
    assert delta["cache.hit.shared"] == 0, delta
    assert delta["cache.coalesced"] + delta["cache.miss"] == n, delta
    # At most one introspection per worker, so the rest waited on one.
    assert mock_idp.calls_for(token) <= delta["cache.miss"] <= CONCURRENCY, delta
    assert delta["cache.coalesced"] >= n - CONCURRENCY, delta


def test_local_entries_0_makes_every_hit_a_shared_hit(envoys, mock_idp):
    envoy = envoys.get(mock_idp, mock_idp.plugin_config(cache={"local_entries": 0}), name="envoy-no-local")
    token = unknown_token()
    mock_idp.register_active(token)
    allowed = envoy.metric("tokengate.requests.allowed")
    miss, shared = envoy.metric("tokengate.cache.miss"), envoy.metric("tokengate.cache.hit.shared")
    # One keep-alive connection (one worker, whose own cache would answer from the 2nd
    # request on), then a request per new connection (every worker).
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
    try:
        for _ in range(5):
            conn.request("GET", "/resource", headers=bearer(token))
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
    finally:
        conn.close()
    for _ in range(2 * CONCURRENCY):
        assert envoy.get("/resource", bearer(token)).status == 200
    n = 5 + 2 * CONCURRENCY
    # Each worker hands its allowed and local-hit counts to Envoy together, on its tick.
    assert envoy.metric_at_least("tokengate.requests.allowed", allowed + n) == allowed + n
    assert envoy.metric("tokengate.cache.hit.local") == 0
    assert envoy.metric("tokengate.cache.miss") == miss + 1
    assert envoy.metric("tokengate.cache.hit.shared") == shared + n - 1
    assert mock_idp.calls_for(token) == 1


def test_listeners_with_another_idp_never_share_answers(fresh, mock_idp):
    # Two listeners, one vm_id: `data` asks IdP A, `other` asks IdP B and forwards one more claim.
    idp_b = fresh.mock_idp()
    other_config = merge(
        idp_b.plugin_config(),
        {"introspection": {"cluster": "idp_b"}, "claims_to_headers": {"tenant": "x-auth-tenant"}},
    )
    other = Listener("other", other_config)
    envoy = fresh.envoy(mock_idp, extra_listeners=[other], extra_clusters=[loopback_cluster("idp_b", idp_b.port)])

    known_to_a = unknown_token()
    mock_idp.register_active(known_to_a, sub="alice")
    assert upstream_headers(envoy.get("/", bearer(known_to_a)))["x-auth-subject"] == "alice"
    statuses = burst(other.port, n=40, connections=8, headers=bearer(known_to_a))
    assert statuses == [401] * 40, "B does not know the token; A's answer must not stand in"
    assert_denied(get(other.port, "/", bearer(known_to_a)), 401, "invalid_token")
    assert idp_b.calls_for(known_to_a) >= 1
    assert mock_idp.calls_for(known_to_a) == 1

    known_to_both = unknown_token()
    mock_idp.register_active(known_to_both, sub="alice")
    idp_b.register_active(known_to_both, sub="bob", tenant="t-1")
    assert upstream_headers(envoy.get("/", bearer(known_to_both)))["x-auth-subject"] == "alice"
    seen = upstream_headers(get(other.port, "/", bearer(known_to_both)))
    assert (seen["x-auth-subject"], seen.get("x-auth-tenant")) == ("bob", "t-1")
    assert idp_b.calls_for(known_to_both) == 1


@pytest.mark.parametrize("local_entries", [0, 16])
def test_flood_of_unknown_tokens_keeps_active_answers_cached(envoys, mock_idp, local_entries):
    # One shared bucket (max_entries 8) filled with active answers, then a flood of
    # unknown tokens whose introspections are slow, so their markers pile up too.
    config = mock_idp.plugin_config(cache={"max_entries": 8, "local_entries": local_entries})
    envoy = envoys.get(mock_idp, plugin_config=config, name=f"flood-{local_entries}")
    active = [unknown_token() for _ in range(8)]
    for token in active:
        mock_idp.register_active(token)
        assert envoy.get("/", bearer(token)).status == 200
    assert [mock_idp.calls_for(t) for t in active] == [1] * 8

    mock_idp.fault("slow", delay_ms=50)
    with ThreadPoolExecutor(16) as pool:
        flood = list(pool.map(lambda _: envoy.get("/", bearer(unknown_token())).status, range(300)))
    assert flood == [401] * 300
    mock_idp.fault("none")

    for token in active:
        assert burst(envoy.port, n=20, connections=8, headers=bearer(token)) == [200] * 20
    assert [mock_idp.calls_for(t) for t in active] == [1] * 8, "the flood evicted active answers"


def test_cache_entry_never_outlives_exp(envoy, idp):
    token = issue(idp, ttl=3)
    exp = idp.introspect(token)["exp"]
    assert envoy.get("/resource", bearer(token)).status == 200
    before = envoy.counter(IDP_CALLS)
    assert envoy.get("/resource", bearer(token)).status == 200
    assert envoy.counter(IDP_CALLS) == before, "a second request is served from the cache"

    sleep_until(exp + 1.2)  # max_ttl_s is 300: only exp can end this entry
    assert_denied(envoy.get("/resource", bearer(token)), 401, "invalid_token")


def test_expired_token_is_refused_even_if_idp_still_says_active(envoys, mock_idp):
    # The mock answers these claims verbatim forever, so only tokengate's own exp check can deny.
    envoy = envoys.get(mock_idp)
    token = unknown_token()
    claims = mock_idp.register_active(token, ttl=3)
    assert envoy.get("/resource", bearer(token)).status == 200

    sleep_until(claims["exp"] + 1.2)
    assert mock_idp.introspect(token)["active"] is True
    assert_denied(envoy.get("/resource", bearer(token)), 401, "invalid_token")


# --------------------------------------------------------------------------- the introspection call


def test_token_reaches_idp_byte_for_byte(envoys, mock_idp):
    envoy = envoys.get(mock_idp)
    token = "tg+/~._-" + secrets.token_urlsafe(12) + "+/=="  # every b64token character class
    mock_idp.register_active(token)
    assert envoy.get("/resource", bearer(token)).status == 200

    calls = mock_idp.introspections()
    assert calls["tokens"] == [token]
    headers, form = calls["last_headers"], urllib.parse.parse_qs(calls["last_body"])
    assert headers.get("content-type", "").startswith("application/x-www-form-urlencoded")
    assert headers.get("host") == mock_idp.authority
    assert form.get("token_type_hint") == [SHIPPED["introspection"]["token_type_hint"]]
    client_id, secret = GATEWAY_CLIENT
    assert headers.get("authorization") == basic_auth(client_id, secret)


def test_client_secret_from_the_vm_environment(fresh):
    """`client_secret_env`: the secret comes from Envoy's environment (an Istio pod's secret
    mounted as a variable), not from the plugin configuration that config dumps show."""
    idp = fresh.mock_idp()
    client_id, secret = GATEWAY_CLIENT
    config = idp.plugin_config()
    del config["introspection"]["client_secret"]
    config["introspection"]["client_secret_env"] = "TOKENGATE_TEST_SECRET"
    envoy = fresh.envoy(idp, config, vm_host_env={"TOKENGATE_TEST_SECRET": secret})
    token = unknown_token()
    idp.register_active(token)
    assert envoy.get("/resource", bearer(token)).status == 200
    assert idp.introspections()["last_headers"].get("authorization") == basic_auth(client_id, secret)
    assert secret not in envoy.admin("/config_dump").body.decode()

    # A variable the VM cannot see is a configuration error Envoy reports, not a gateway that
    # would introspect without credentials.
    with pytest.raises(RuntimeError) as refused:
        fresh.envoy(idp, config)
    assert "client_secret_env names \"TOKENGATE_TEST_SECRET\", which is not set" in str(refused.value)


# --------------------------------------------------------------------------- what operators see


def test_no_token_value_appears_in_envoy_log(fresh):
    idp = fresh.mock_idp()
    # Envoy's own debug logs print request headers; the plugin's logger is the "wasm" component.
    envoy = fresh.envoy(idp, component_log_level="wasm:trace")
    valid, unknown, odd = unknown_token(), unknown_token(), "lg+/~._-" + secrets.token_urlsafe(12) + "=="
    idp.register_active(valid)
    idp.register_active(odd)
    insufficient = unknown_token()
    idp.register_active(insufficient, scope="write")
    for token in (valid, unknown, odd, insufficient):
        envoy.get("/resource", bearer(token))
    malformed = "ab@" + secrets.token_urlsafe(12)
    envoy.get("/resource", {"Authorization": f"Bearer {malformed}"})
    idp.fault("status", status=500)
    failing = unknown_token()
    idp.register_active(failing)
    envoy.get("/resource", bearer(failing))
    envoy.stop()  # flushes the log

    log = envoy.log_text()
    assert "tokengate" in log, "the plugin's log should be in the file at all"
    for token in (valid, unknown, odd, insufficient, malformed, failing):
        for form in {token, urllib.parse.quote_plus(token), urllib.parse.quote(token, safe="")}:
            assert form not in log, "a token value is in Envoy's log"


METRICS = {
    "allowed": "tokengate.requests.allowed",
    "missing_token": "tokengate.requests.denied.missing_token",
    "invalid_request": "tokengate.requests.denied.invalid_request",
    "invalid_token": "tokengate.requests.denied.invalid_token",
    "insufficient_scope": "tokengate.requests.denied.insufficient_scope",
    "idp_unavailable": "tokengate.requests.denied.idp_unavailable",
    "cache_hit_local": "tokengate.cache.hit.local",
    "cache_hit_shared": "tokengate.cache.hit.shared",
    "cache_miss": "tokengate.cache.miss",
    "introspection_calls": "tokengate.introspection.calls",
    "failures_status": "tokengate.introspection.failures.status",
}


def test_metrics_count_outcomes_cache_and_introspections(fresh):
    idp = fresh.mock_idp()
    envoy = fresh.envoy(idp)
    names = envoy.tokengate_stats()
    for name in METRICS.values():
        assert name in names or f"wasmcustom.{name}" in names, f"{name} missing from /stats: {sorted(names)}"

    good, narrow, failing = unknown_token(), unknown_token(), unknown_token()
    idp.register_active(good)
    idp.register_active(narrow, scope="write")
    idp.register_active(failing)
    for _ in range(3):
        assert envoy.get("/resource", bearer(good)).status == 200
    assert envoy.get("/resource").status == 401
    assert envoy.get("/resource", {"Authorization": "Bearer a b"}).status == 400
    assert envoy.get("/resource", bearer(unknown_token())).status == 401
    assert envoy.get("/resource", bearer(narrow)).status == 403
    idp.fault("status", status=500)
    assert envoy.get("/resource", bearer(failing)).status == 503

    m = {key: envoy.metric(name) for key, name in METRICS.items()}
    m["allowed"] = envoy.metric_at_least(METRICS["allowed"], 3)
    m["cache_hit_local"] = envoy.metric_at_least(METRICS["cache_hit_local"], 2 - m["cache_hit_shared"])
    assert m["allowed"] == 3
    assert (m["missing_token"], m["invalid_request"], m["invalid_token"]) == (1, 1, 1)
    assert (m["insufficient_scope"], m["idp_unavailable"]) == (1, 1)
    assert m["failures_status"] == 1
    # good, unknown, narrow and failing each cost one call; good's 2nd and 3rd were hits.
    assert m["introspection_calls"] == envoy.counter(IDP_CALLS) == 4
    assert m["cache_miss"] == 4
    assert m["cache_hit_local"] + m["cache_hit_shared"] == 2


# --------------------------------------------------------------------------- documented outcomes, each configuration


OUTCOME_LISTENERS = {
    # An introspection cluster Envoy does not have: the callout cannot be sent.
    "no_cluster": {"introspection": {"cluster": "no-such-cluster"}},
    # The smallest cache entry allowed: an answer with a long claim does not fit.
    "small_entries": {"cache": {"max_entry_bytes": 256}},
    "negative_off": {"cache": {"negative_ttl_s": 0}},
    "own_realm": {"realm": "corp-api"},
}


@pytest.fixture
def outcomes(envoys, mock_idp):
    """An Envoy with one listener per configuration under test (same VM as `data`)."""
    extra = [Listener(name, merge(mock_idp.plugin_config(), overrides)) for name, overrides in OUTCOME_LISTENERS.items()]
    return envoys.get(mock_idp, extra_listeners=extra, name="envoy-outcomes")


def test_introspection_that_cannot_be_dispatched_fails_closed_and_is_counted(outcomes, mock_idp):
    token = unknown_token()
    mock_idp.register_active(token)
    dispatch = outcomes.metric("tokengate.introspection.failures.dispatch")
    unavailable = outcomes.metric("tokengate.requests.denied.idp_unavailable")
    assert_fails_closed(outcomes.get("/resource", bearer(token), listener="no_cluster"), TIMEOUT_MS)
    assert outcomes.metric("tokengate.introspection.failures.dispatch") == dispatch + 1
    assert outcomes.metric("tokengate.requests.denied.idp_unavailable") == unavailable + 1
    assert mock_idp.calls_for(token) == 0


def test_answer_over_max_entry_bytes_is_used_but_not_cached(outcomes, mock_idp):
    token = unknown_token()
    mock_idp.register_active(token, sub="u" * 400)  # the answer is over 256 bytes
    uncacheable = outcomes.metric("tokengate.cache.uncacheable")
    # One keep-alive connection: one worker, so its own (local) cache is tried too.
    conn = http.client.HTTPConnection("127.0.0.1", outcomes.listener_port("small_entries"), timeout=10)
    try:
        for n in (1, 2):
            conn.request("GET", "/resource", headers=bearer(token))
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            assert mock_idp.calls_for(token) == n, "not cached: every request asks the IdP"
    finally:
        conn.close()
    assert outcomes.metric("tokengate.cache.uncacheable") == uncacheable + 2


def test_inactive_answer_is_remembered_for_negative_ttl_s_and_not_when_it_is_0(outcomes, mock_idp):
    remembered, forgotten = unknown_token(), unknown_token()
    for token in (remembered, forgotten):
        mock_idp.register(token, active=False)
    for _ in range(3):
        assert_denied(outcomes.get("/resource", bearer(remembered)), 401, "invalid_token")
        assert_denied(outcomes.get("/resource", bearer(forgotten), listener="negative_off"), 401, "invalid_token")
    assert mock_idp.calls_for(remembered) == 1, "negative_ttl_s (5 s): the inactive answer is remembered"
    assert mock_idp.calls_for(forgotten) == 3, "negative_ttl_s 0: every request asks"
    # Past negative_ttl_s the IdP is asked again (and may now say active).
    mock_idp.register_active(remembered)
    wait_until = time.monotonic() + SHIPPED["cache"]["negative_ttl_s"] + 10
    while outcomes.get("/resource", bearer(remembered)).status != 200:
        assert time.monotonic() < wait_until, "the inactive answer outlived negative_ttl_s"
        time.sleep(0.2)
    assert mock_idp.calls_for(remembered) == 2


def test_challenges_name_the_configured_realm(outcomes, mock_idp):
    resp = outcomes.get("/resource", listener="own_realm")
    assert resp.status == 401, resp
    assert challenge(resp) == ("Bearer", {"realm": "corp-api"})
    resp = outcomes.get("/resource", {"Authorization": "Bearer a b"}, listener="own_realm")
    assert resp.status == 400, resp
    params = challenge(resp)[1]
    assert (params["realm"], params["error"]) == ("corp-api", "invalid_request"), params
