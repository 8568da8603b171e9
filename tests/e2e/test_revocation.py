"""Revocation, seen from the admin API's client and from the data plane.

A real Envoy (--concurrency 4) serves the data listener and the admin listener of
envoy/envoy.yaml with the same vm_id; everything an admin call writes must hold on
every worker as soon as the call returns. Tests taking `idp` run against the mock
IdP and against oidc-provider. Revocations are global to an Envoy, so every test
uses fresh tokens (and, for client and subject revocations, names no other test
uses, or it undoes them).

The Envoys here are this module's own (`gates`), with an upstream that records
the paths it receives (`recorder`), so that "the upstream never saw an admin
request" is checked where it would show.

Figures (item 7: RSS, list size, bulk time) are printed and recorded as
properties: run with -s or -rP to see them.
"""
import base64
import collections
import concurrent.futures
import copy
import hashlib
import json
import os
import secrets
import socket
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

from conftest import CONCURRENCY, EnvoyCache
from harness import (
    ADMIN,
    ADMIN_TOKEN,
    FORM,
    JSON_TYPE,
    LOOPBACK,
    PLUGIN_CONFIG,
    PREFIX,
    SERVERS,
    Envoy,
    Listener,
    _wasm_plugins,
    assert_admin_challenge,
    assert_admin_refused,
    assert_invalid_token,
    assert_ok,
    assert_still_serving,
    basic_auth,
    bearer,
    burst,
    free_port,
    issue,
    merge,
    request,
    sha256,
    shipped_admin_additions,
    sleep_until,
    unique,
    wait_for_port,
    wait_until,
)

SHIPPED = json.loads(PLUGIN_CONFIG.read_text())
# Defaults of src/config.rs, which envoy/envoy.yaml does not override.
TOKEN_TTL_S = 86_400  # denylist.token_ttl_s: life of a record whose token's exp is unknown
PRINCIPAL_TTL_S = 86_400  # denylist.principal_ttl_s
MAX_BODY_BYTES = 1024 * 1024  # admin.max_body_bytes
REVOKED = "tokengate.requests.denied.revoked"
UPSTREAM_CALLS = "cluster.upstream.upstream_rq_total"


# --------------------------------------------------------------------------- the upstream


RECORDER_SCRIPT = r"""
import json, sys, threading
sys.path.insert(0, sys.argv[1])
import echo_upstream as echo

log, lock = open(sys.argv[3], "a", buffering=1), threading.Lock()

class Recording(echo.EchoHandler):
    def echo(self):
        # Method and path only: headers and bodies may hold tokens.
        with lock:
            log.write(json.dumps({"method": self.command, "path": self.path}) + "\n")
        super().echo()
    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = echo

echo.EchoHandler = Recording
sys.argv = [sys.argv[0], "--port", sys.argv[2]]
sys.exit(echo.main())
"""


class RecordingUpstream:
    """tests/servers/echo_upstream.py, also writing each request's method and path to a file."""

    def __init__(self, procs, workdir):
        self.port = free_port()
        self.log = Path(workdir) / f"recording-upstream-{self.port}.jsonl"
        self.log.touch()
        self.proc = procs.start(
            "recording-upstream",
            [sys.executable, "-c", RECORDER_SCRIPT, SERVERS, self.port, self.log],
            Path(workdir) / f"recording-upstream-{self.port}.log",
        )
        wait_for_port(self.proc, self.port)

    def requests(self):
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]


def looks_like_admin(path):
    """Whether the upstream got something aimed at the admin API, however disguised."""
    decoded = urllib.parse.unquote(urllib.parse.unquote(path)).lower().replace("\\", "/")
    return "tokengate" in decoded


# --------------------------------------------------------------------------- the admin API


class AdminApi:
    """The admin listener of one Envoy."""

    def __init__(self, envoy, listener="tokengate_admin"):
        self.port = envoy.listener_port(listener)

    def call(self, method, path, auth=ADMIN, body=None, content_type=None, timeout=30.0):
        headers = dict(auth or {})
        if content_type:
            headers["Content-Type"] = content_type
        return request(self.port, path, headers, method, body, timeout)

    def revoke_form(self, token, auth=ADMIN, path=f"{PREFIX}/revoke", **extra):
        body = urllib.parse.urlencode({"token": token, **extra}).encode()
        return self.call("POST", path, auth, body, FORM)

    def revoke_json(self, obj, auth=ADMIN, path=f"{PREFIX}/revoke", timeout=30.0):
        return self.call("POST", path, auth, json.dumps(obj).encode(), "application/json", timeout)

    def revocations(self):
        resp = self.call("GET", f"{PREFIX}/revocations")
        assert resp.status == 200, resp
        return resp.json()

    def listed(self):
        """{id: record} of every live revocation."""
        return {r["id"]: r for r in self.revocations()["revocations"]}

    def undo(self, revocation_id, auth=ADMIN):
        return self.call("DELETE", f"{PREFIX}/revocations/{urllib.parse.quote(revocation_id, safe='')}", auth)


def statuses_over_connections(envoy, token, n=2 * CONCURRENCY, path="/"):
    """n requests, each on its own connection (so on more than one worker)."""
    return [envoy.get(path, bearer(token)).status for _ in range(n)]


# --------------------------------------------------------------------------- every worker


def worker_connections(envoy, listener="data"):
    """{worker index: connections accepted} of one listener, from Envoy's per-worker stats."""
    prefix = f"listener.{LOOPBACK}_{envoy.listener_port(listener)}.worker_"
    return {
        int(name[len(prefix):].split(".")[0]): value
        for name, value in envoy.stats().items()
        if name.startswith(prefix) and name.endswith(".downstream_cx_total")
    }


def burst_on_every_worker(envoy, token, expect, n=400, connections=32, tries=3):
    """A burst whose every answer must be `expect`, repeated (up to `tries`) until every worker
    has served part of it: the kernel spreads connections over the workers, but by hash."""
    served, results = set(), []
    for _ in range(tries):
        before = worker_connections(envoy)
        statuses = burst(envoy.port, n=n, connections=connections, headers=bearer(token))
        after = worker_connections(envoy)
        counts = dict(collections.Counter(statuses))
        assert counts == {expect: n}, f"want {n} x {expect}, got {counts}"
        results.append(statuses)
        served |= {w for w, total in after.items() if total > before.get(w, 0)}
        if len(served) == CONCURRENCY:
            return results
    pytest.fail(f"after {tries} bursts only workers {sorted(served)} of {CONCURRENCY} served a request")


# --------------------------------------------------------------------------- tokens


def odd_token():
    """A token using every b64token character class, so form and JSON decoding are exercised."""
    return "rv+/~._-" + secrets.token_urlsafe(16) + "+/=="


# --------------------------------------------------------------------------- Envoys


@pytest.fixture(scope="module")
def recorder(procs, workdir):
    return RecordingUpstream(procs, workdir)


@pytest.fixture(scope="module")
def gates(procs, workdir, recorder):
    """This module's Envoys (conftest's EnvoyCache, stopped with the module), sending to
    the recording upstream; get them with gate_for."""
    cache = EnvoyCache(procs, workdir, recorder, name="envoy-revocation")
    yield cache
    cache.stop_all()


def gate_for(gates, idp, admin_overrides=None, name=None, **overrides):
    """The shipped listeners (data + tokengate_admin, same vm_id) pointed at idp, with
    top-level `overrides` on both; one Envoy per (IdP, overrides, name)."""
    data = idp.plugin_config(**overrides)
    admin = merge(merge(data, shipped_admin_additions()), {"admin": admin_overrides or {}})
    return gates.get(idp, data, listener_configs={"tokengate_admin": admin}, name=name)


@pytest.fixture
def gate(gates, idp):
    return gate_for(gates, idp)


# denylist.clock_skew_s of `skewed_gate`: short, so that a token issued after a client or
# subject revocation, and past the allowance, comes within seconds (oidc-provider stamps
# iat with the time of issue; the shipped 60 s would take a minute per test).
SHORT_SKEW_S = 2


@pytest.fixture
def skewed_gate(gates, idp):
    return gate_for(gates, idp, denylist={"clock_skew_s": SHORT_SKEW_S})


# --------------------------------------------------------------------------- 1. every worker, at once


def test_revoked_token_is_refused_by_every_worker_as_soon_as_the_admin_call_returns(gate, idp):
    token = issue(idp)
    api = AdminApi(gate)
    assert gate.get("/", bearer(token)).status == 200
    # Every worker answers from its own cache: of the burst's requests, at most one per
    # worker needs the shared cache and none the IdP (these counters are exact at once;
    # the local hits are handed to Envoy on a tick, so they are not what is counted here).
    shared, misses = gate.metric("tokengate.cache.hit.shared"), gate.metric("tokengate.cache.miss")
    served = sum(len(b) for b in burst_on_every_worker(gate, token, expect=200))
    assert gate.metric("tokengate.cache.miss") == misses
    assert gate.metric("tokengate.cache.hit.shared") - shared <= CONCURRENCY < served

    revoked_before = gate.metric(REVOKED)
    body = assert_ok(api.revoke_form(token, token_type_hint="access_token"))
    # No wait: the next request after the admin answer must already be refused, everywhere.
    bursts = burst_on_every_worker(gate, token, expect=401)
    assert body == {"revoked": 1, "ids": [sha256(token)]}
    assert gate.metric(REVOKED) - revoked_before == sum(len(b) for b in bursts)
    assert_invalid_token(gate.get("/", bearer(token)))


# --------------------------------------------------------------------------- 2. bulk, client, subject


def test_bulk_revocation_refuses_every_listed_token_and_no_other(gate, idp):
    api = AdminApi(gate)
    doomed = [issue(idp) for _ in range(3)]
    kept = issue(idp)
    if idp.kind == "mock":
        odd = odd_token()
        idp.register_active(odd)
        doomed.append(odd)
    for token in doomed + [kept]:
        assert gate.get("/", bearer(token)).status == 200

    body = assert_ok(api.revoke_json({"tokens": doomed, "reason": "bulk: leaked in a CI log"}))
    assert body["revoked"] == len(doomed)
    assert sorted(body["ids"]) == sorted(sha256(t) for t in doomed)
    for token in doomed:
        statuses = statuses_over_connections(gate, token)
        assert statuses == [401] * len(statuses), statuses
        assert_invalid_token(gate.get("/", bearer(token)))
    assert statuses_over_connections(gate, kept) == [200] * (2 * CONCURRENCY)
    listed = api.listed()
    assert all(listed[sha256(t)]["reason"] == "bulk: leaked in a CI log" for t in doomed)


def test_rfc7009_form_revokes_any_token_even_one_never_seen(gate, idp):
    api = AdminApi(gate)
    never_seen = secrets.token_urlsafe(32)
    assert assert_ok(api.revoke_form(never_seen)) == {"revoked": 1, "ids": [sha256(never_seen)]}
    assert api.listed()[sha256(never_seen)]["kind"] == "token"
    if idp.kind == "mock":
        # A token with + / = in it: the form's percent-encoding must be undone exactly.
        odd = odd_token()
        idp.register_active(odd)
        assert gate.get("/", bearer(odd)).status == 200
        assert assert_ok(api.revoke_form(odd, token_type_hint="access_token")) == {"revoked": 1, "ids": [sha256(odd)]}
        assert_invalid_token(gate.get("/", bearer(odd)))


def _principal_names(idp):
    if idp.kind == "oidc":
        # oidc-provider's clients are fixed (server.mjs): app-b is this test's, app-a stands by.
        return "app-b", "app-a"
    return unique("client"), unique("bystander")


def test_client_revocation_refuses_its_earlier_tokens_only(skewed_gate, idp, request):
    gate = skewed_gate
    api = AdminApi(gate)
    client, bystander = _principal_names(idp)
    request.addfinalizer(lambda: api.undo(f"client:{client}"))
    seen, unseen, other = issue(idp, client), issue(idp, client), issue(idp, bystander)
    for token in (seen, other):
        assert gate.get("/", bearer(token)).status == 200

    asked = time.time()
    body = assert_ok(api.revoke_json({"client_id": client, "reason": "client secret leaked"}))
    answered = time.time()
    revocation = body["revocation"]
    assert body["revoked"] == 1
    assert (revocation["id"], revocation["kind"], revocation["reason"]) == (f"client:{client}", "client", "client secret leaked")
    assert int(asked) <= revocation["revoked_at"] <= answered
    assert revocation["expires_at"] == revocation["revoked_at"] + PRINCIPAL_TTL_S

    # Cached (seen) or not, a token the client got before the revocation is refused everywhere.
    for token in (seen, unseen):
        statuses = statuses_over_connections(gate, token)
        assert statuses == [401] * len(statuses), statuses
        assert_invalid_token(gate.get("/", bearer(token)))
    assert statuses_over_connections(gate, other) == [200] * (2 * CONCURRENCY), "another client is unaffected"
    assert api.listed()[f"client:{client}"] == revocation

    # iat has a resolution of one second: a token issued in a later second than the
    # revocation and its clock-skew allowance is not covered.
    sleep_until(revocation["revoked_at"] + SHORT_SKEW_S + 1.05)
    later = issue(idp, client)
    assert idp.introspect(later)["iat"] > revocation["revoked_at"] + SHORT_SKEW_S
    assert statuses_over_connections(gate, later) == [200] * (2 * CONCURRENCY)
    assert_invalid_token(gate.get("/", bearer(seen)))

    # Undone, the client's earlier tokens pass again.
    undone = api.undo(f"client:{client}")
    assert (undone.status, undone.body) == (204, b""), undone
    assert statuses_over_connections(gate, seen) == [200] * (2 * CONCURRENCY)


def test_subject_revocation_refuses_its_earlier_tokens_only(skewed_gate, idp, request):
    if idp.kind == "oidc":
        pytest.skip("oidc-provider's client-credentials tokens carry no sub (tests/idp/server.mjs)")
    gate = skewed_gate
    api = AdminApi(gate)
    subject, other_subject = unique("user"), unique("user")
    request.addfinalizer(lambda: api.undo(f"sub:{subject}"))
    own_a = issue(idp, client_id=unique("client"), sub=subject)
    own_b = issue(idp, client_id=unique("client"), sub=subject)
    client = unique("client")
    other = issue(idp, client_id=client, sub=other_subject)
    assert gate.get("/", bearer(own_a)).status == 200

    body = assert_ok(api.revoke_json({"sub": subject, "reason": "account closed"}))
    revocation = body["revocation"]
    assert (revocation["id"], revocation["kind"], revocation["reason"]) == (f"sub:{subject}", "sub", "account closed")
    for token in (own_a, own_b):  # whatever client they were issued to
        statuses = statuses_over_connections(gate, token)
        assert statuses == [401] * len(statuses), statuses
    assert_invalid_token(gate.get("/", bearer(own_b)))
    assert statuses_over_connections(gate, other) == [200] * (2 * CONCURRENCY)

    sleep_until(revocation["revoked_at"] + SHORT_SKEW_S + 1.05)
    later = issue(idp, client_id=client, sub=subject)
    assert statuses_over_connections(gate, later) == [200] * (2 * CONCURRENCY)


SHIPPED_SKEW_S = 60  # denylist.clock_skew_s default (src/config.rs), which envoy/envoy.yaml keeps


def test_client_revocation_allows_for_an_idp_clock_ahead_by_clock_skew_s(gates, mock_idp, request):
    """A client revocation compares the IdP's iat with Envoy's clock: a token the IdP stamped up
    to clock_skew_s after the revocation may have been issued before it by a clock running
    ahead, and an iat further in the future than that proves nothing."""
    envoy = gate_for(gates, mock_idp)  # the shipped configuration: the default allowance
    api = AdminApi(envoy)
    client = unique("client")
    request.addfinalizer(lambda: api.undo(f"client:{client}"))
    bystander = secrets.token_urlsafe(32)
    mock_idp.register_active(bystander, client_id=unique("client"), iat=int(time.time()) + 3600)

    revoked_at = assert_ok(api.revoke_json({"client_id": client}))["revocation"]["revoked_at"]
    # A second later a token can have been issued after the revocation (iat has 1 s resolution).
    sleep_until(revoked_at + 1.05)
    iats = {
        "no iat": None,
        "issued before": revoked_at - 10,
        "issued at the revocation": revoked_at,
        "stamped by an IdP clock_skew_s ahead": revoked_at + SHIPPED_SKEW_S,
        "issued after, even by a clock that far ahead": revoked_at + SHIPPED_SKEW_S + 1,
        "from further in the future than the allowance": int(time.time()) + SHIPPED_SKEW_S + 600,
    }
    want = {what: 200 if what.startswith("issued after") else 401 for what in iats}
    tokens = {}
    for what, iat in iats.items():
        tokens[what] = secrets.token_urlsafe(32)
        mock_idp.register_active(tokens[what], client_id=client, iat=iat)
    seen = {what: statuses_over_connections(envoy, token) for what, token in tokens.items()}
    assert seen == {what: [status] * (2 * CONCURRENCY) for what, status in want.items()}
    assert_invalid_token(envoy.get("/", bearer(tokens["stamped by an IdP clock_skew_s ahead"])))
    assert envoy.get("/", bearer(bystander)).status == 200, "another client's future iat is not refused"


def test_client_or_subject_with_surrounding_spaces_is_refused_and_never_matched(mock_gate, mock_idp):
    """A claim value with surrounding spaces reaches no header (Envoy would strip the spaces,
    and " admin" would read as "admin"), so revocations neither take nor match such a name."""
    envoy, api = mock_gate, AdminApi(mock_gate)
    name = unique("admin")
    for kind, padded in [("sub", f" {name}"), ("sub", f"{name} "), ("client_id", f" {name} "), ("sub", " ")]:
        assert_admin_refused(api.revoke_json({kind: padded}), 400, "invalid_request", what=repr(padded))
    assert not [i for i in api.listed() if name in i], "a padded name was revoked"

    exact, padded = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    mock_idp.register_active(exact, sub=name, iat=int(time.time()) - 5)
    mock_idp.register_active(padded, sub=f" {name} ", iat=int(time.time()) - 5)
    assert_ok(api.revoke_json({"sub": name}))
    try:
        assert_invalid_token(envoy.get("/", bearer(exact)))
        resp = envoy.get("/", bearer(padded))
        assert resp.status == 200, resp
        assert "x-auth-subject" not in resp.json()["headers"], "the padded subject reads as the revoked one"
    finally:
        api.undo(f"sub:{name}")


# --------------------------------------------------------------------------- 3. list and undo


def test_list_shows_hashes_and_undo_lets_the_token_back_in_everywhere(gate, idp):
    api = AdminApi(gate)
    seen, unseen = issue(idp), secrets.token_urlsafe(32)
    assert gate.get("/", bearer(seen)).status == 200
    exp = idp.introspect(seen)["exp"]

    asked = time.time()
    assert_ok(api.revoke_json({"tokens": [seen], "reason": "laptop stolen"}))
    assert_ok(api.revoke_form(unseen))
    answered = time.time()

    resp = api.call("GET", f"{PREFIX}/revocations")
    listing = assert_ok(resp)
    assert listing["count"] == len(listing["revocations"])
    for token in (seen, unseen):
        for form in {token, urllib.parse.quote(token, safe=""), urllib.parse.quote_plus(token)}:
            assert form.encode() not in resp.body, "a raw token is in the list"
    records = {r["id"]: r for r in listing["revocations"]}
    for record in records.values():
        assert set(record) == {"id", "kind", "revoked_at", "expires_at", "reason"}, record
    mine = records[sha256(seen)]
    assert (mine["kind"], mine["reason"]) == ("token", "laptop stolen")
    assert int(asked) <= mine["revoked_at"] <= answered
    assert mine["expires_at"] == exp, "a token whose exp is cached keeps its record until exp"
    never_seen = records[sha256(unseen)]
    assert (never_seen["kind"], never_seen["reason"]) == ("token", "rfc7009")
    assert never_seen["expires_at"] == never_seen["revoked_at"] + TOKEN_TTL_S

    burst_on_every_worker(gate, seen, expect=401, n=200, tries=3)
    undone_before = gate.metric("tokengate.revocations.undone")
    resp = api.undo(sha256(seen))
    assert (resp.status, resp.body) == (204, b""), resp
    burst_on_every_worker(gate, seen, expect=200)
    assert sha256(seen) not in api.listed()
    assert gate.metric("tokengate.revocations.undone") == undone_before + 1

    assert_admin_refused(api.undo(sha256(seen)), 404, "not_found")
    assert_admin_refused(api.undo(sha256(secrets.token_urlsafe(32))), 404, "not_found")
    assert_admin_refused(api.undo("client:" + unique("never-revoked")), 404, "not_found")
    assert sha256(unseen) in api.listed(), "undoing one revocation leaves the others"


def test_a_bulk_revocation_is_logged_once_with_its_reason_clipped(fresh):
    """One log line per revocation request, the reason clipped as it is stored: a large
    request cannot make Envoy write a large log."""
    idp = fresh.mock_idp()
    envoy = fresh.envoy(idp)
    api = AdminApi(envoy)
    tokens = [secrets.token_urlsafe(32) for _ in range(200)]
    marker = unique("reason")
    reason = marker + "-" + "x" * 50_000
    stored = reason[:200]  # denylist::MAX_REASON_CHARS
    before = len(envoy.log_text().encode())

    body = assert_ok(api.revoke_json({"tokens": tokens, "reason": reason}))
    assert body["revoked"] == len(tokens)
    listed = api.listed()
    assert {listed[sha256(t)]["reason"] for t in tokens} == {stored}
    wait_until(lambda: marker in envoy.log_text(), 10, what="the revocation's log line")
    grown = len(envoy.log_text().encode()) - before
    envoy.stop()  # flushes the log

    print(f"\n[revocation] one 200-token revocation with a 50,000-character reason: log +{grown} bytes")
    assert grown < 4096, f"one revocation request grew Envoy's log by {grown} bytes"
    log = envoy.log_text()
    lines = [line for line in log.splitlines() if marker in line]
    assert len(lines) == 1, f"{len(lines)} log lines for one revocation request"
    assert f"revoked {len(tokens)} token(s)" in lines[0] and lines[0].endswith(f'reason="{stored}"'), lines[0][:300]
    for token in tokens:
        assert token not in log, "a token value is in Envoy's log"


# --------------------------------------------------------------------------- 4. the admin credential


BAD_CREDENTIALS = {
    "none": None,
    "wrong-bearer": bearer("not-the-admin-token"),
    "basic": {"Authorization": basic_auth("admin", ADMIN_TOKEN)},
    "no-scheme": {"Authorization": ADMIN_TOKEN},
    "configured-hash": bearer(sha256(ADMIN_TOKEN)),
}


def test_admin_routes_need_the_admin_credential(gate, idp):
    api = AdminApi(gate)
    victim = issue(idp)
    already = secrets.token_urlsafe(32)
    assert_ok(api.revoke_form(already))
    assert gate.get("/", bearer(victim)).status == 200
    client = _principal_names(idp)[0] if idp.kind == "mock" else "app-c"
    credentials = dict(BAD_CREDENTIALS, **{"valid-access-token": bearer(victim)})

    for name, auth in credentials.items():
        attempts = [
            api.revoke_form(victim, auth=auth),
            api.revoke_json({"tokens": [victim]}, auth=auth),
            api.revoke_json({"client_id": client}, auth=auth),
            api.call("GET", f"{PREFIX}/revocations", auth),
            api.undo(sha256(already), auth=auth),
            api.call("POST", f"{PREFIX}/nowhere", auth, b"x", FORM),  # unknown route: still 401 first
        ]
        for i, resp in enumerate(attempts):
            assert_admin_challenge(resp, what=f"{name} #{i}")
    listed = api.listed()
    assert sha256(victim) not in listed and f"client:{client}" not in listed
    assert sha256(already) in listed, "an unauthorized DELETE undid a revocation"
    assert statuses_over_connections(gate, victim) == [200] * (2 * CONCURRENCY)


def test_data_listener_does_not_serve_the_admin_api(gate, idp, recorder):
    api = AdminApi(gate)
    victim, caller = issue(idp), issue(idp)
    already = secrets.token_urlsafe(32)
    assert_ok(api.revoke_form(already))
    data = AdminApi(gate, listener="data")

    # The admin credential is no access token: the data listener checks it as one.
    assert_invalid_token(data.revoke_form(victim))
    assert_invalid_token(data.call("GET", f"{PREFIX}/revocations"))
    # With a valid access token an admin path is an ordinary request: it goes upstream.
    for resp, method, path in [
        (data.revoke_form(victim, auth=bearer(caller)), "POST", f"{PREFIX}/revoke"),
        (data.revoke_json({"client_id": "app-a"}, auth=bearer(caller)), "POST", f"{PREFIX}/revoke"),
        (data.call("GET", f"{PREFIX}/revocations", bearer(caller)), "GET", f"{PREFIX}/revocations"),
        (data.undo(sha256(already), auth=bearer(caller)), "DELETE", f"{PREFIX}/revocations/{sha256(already)}"),
    ]:
        assert resp.status == 200, resp
        echoed = resp.json()
        assert (echoed["method"], echoed["path"]) == (method, path), "answered by the upstream, not the admin API"
    listed = api.listed()
    assert sha256(victim) not in listed and "client:app-a" not in listed
    assert sha256(already) in listed
    assert statuses_over_connections(gate, victim) == [200] * (2 * CONCURRENCY)


# Just outside the admin routes: paths that an admin client may mistype or a caller may try.
OUTSIDE_ADMIN_PATHS = ["/tokengate-v2/revoke", "/api/tokengate/revoke", "/tokengatex", "/elsewhere", "/"]


def test_admin_listener_answers_404_outside_its_routes_and_never_sends_a_token_to_the_idp(mock_gate, mock_idp):
    """The admin listener serves the admin API only: a request elsewhere on it is 404 from the
    filter, whatever its credential, and the admin token (or any other) never reaches the IdP."""
    envoy, api = mock_gate, AdminApi(mock_gate)
    access = secrets.token_urlsafe(32)
    mock_idp.register_active(access)
    rejected = envoy.metric("tokengate.admin.rejected")
    credentials = {"admin": ADMIN, "access": bearer(access), "none": None}
    for path in OUTSIDE_ADMIN_PATHS:
        for name, auth in credentials.items():
            for method, body, content_type in [("GET", None, None), ("POST", b"token=x", FORM)]:
                resp = api.call(method, path, auth, body, content_type)
                assert_admin_refused(resp, 404, "not_found", what=f"{method} {path} ({name})")
                assert resp.header("WWW-Authenticate") is None, resp.headers
    assert mock_idp.calls_for(ADMIN_TOKEN) == 0, "the admin token was sent to the IdP"
    assert mock_idp.introspections()["count"] == 0
    asked = len(OUTSIDE_ADMIN_PATHS) * len(credentials) * 2
    assert envoy.metric("tokengate.admin.rejected") - rejected == asked
    # The admin API itself is unchanged beside them.
    assert assert_ok(api.revoke_form(secrets.token_urlsafe(32)))["revoked"] == 1


# --------------------------------------------------------------------------- 5. what the admin API refuses


# Paths that reach the filter as they are (Envoy's normalize_path keeps case and %2F, and
# merge_slashes only merges): the filter refuses them, though the credential is right.
REFUSED_PATHS = {
    "/TOKENGATE/revoke": 400,
    "/TokenGate/Revoke": 400,
    "/tokengate%2Frevoke": 400,
    "/tokengate%2frevoke": 400,
    "/tokengate/revoke/": 400,
    "/tokengate/revocations/..%2Frevoke": 400,
    "/tokengate/revoke;x": 404,
    "/tokengate/revoke%3Fx": 404,
    "/tokengate/revoke%23x": 404,
    "/tokengate/revoke%2F": 400,
    "/tokengate/revoke/.": 400,
}
# Paths Envoy itself refuses (400, before any filter runs).
ENVOY_REFUSED_PATHS = ["/tokengate/revoke%00", "/tokengate/revoke#x", "tokengate/revoke"]
# Paths Envoy makes canonical before any filter runs (the shipped admin listener sets
# normalize_path and merge_slashes): the filter sees /tokengate/revoke itself.
NORMALISED_PATHS = [
    "//tokengate/revoke",
    "/tokengate//revoke",
    "/tokengate/../tokengate/revoke",
    "/tokengate/./revoke",
    "/tokengate/%72evoke",
    "/%74okengate/revoke",
    "/tokengate/%2e%2e/tokengate/revoke",
    "/tokengate/%2E/revoke",
    "/../tokengate/revoke",
    "/tokengate/%2e%2e/%2e%2e/../tokengate/revoke",
    "/tokengate/revocations/%2e%2e/revoke",
    "/tokengate\\revoke",
]


@pytest.fixture
def mock_gate(gates, mock_idp_server):
    return gate_for(gates, mock_idp_server)


def _victim(idp, envoy):
    token = issue(idp)
    assert envoy.get("/victim-check", bearer(token)).status == 200
    return token


def _upstream_seen_since(recorder, mark):
    return recorder.requests()[mark:]


def test_disguised_admin_paths_never_bypass_the_credential_or_reach_the_upstream(mock_gate, mock_idp_server, recorder):
    idp, envoy, api = mock_idp_server, mock_gate, AdminApi(mock_gate)
    mark, upstream_calls = len(recorder.requests()), envoy.counter(UPSTREAM_CALLS)
    paths = list(REFUSED_PATHS) + ENVOY_REFUSED_PATHS + NORMALISED_PATHS
    victims = {path: _victim(idp, envoy) for path in paths}

    for path, victim in victims.items():
        for auth in (None, bearer("not-the-admin-token"), {"Authorization": basic_auth("admin", ADMIN_TOKEN)}, ADMIN):
            resp = api.revoke_form(victim, auth=auth, path=path)
            if path in ENVOY_REFUSED_PATHS:
                # Envoy's own 400 (its codec's): not a JSON answer from the filter.
                assert resp.status == 400 and not resp.body.startswith(b"{"), f"{path}: {resp}"
            elif auth is not ADMIN:
                assert_admin_challenge(resp, what=path)
            elif path in REFUSED_PATHS:
                assert_admin_refused(resp, REFUSED_PATHS[path], what=path)
            else:
                # With the credential this is /tokengate/revoke once Envoy has normalised it.
                assert assert_ok(resp) == {"revoked": 1, "ids": [sha256(victim)]}, path

    listed = api.listed()
    for path, victim in victims.items():
        revoked = path in NORMALISED_PATHS
        assert (sha256(victim) in listed) == revoked, path
        assert envoy.get("/victim-check", bearer(victim)).status == (401 if revoked else 200), path
    seen = _upstream_seen_since(recorder, mark)
    assert [r for r in seen if looks_like_admin(r["path"])] == [], "an admin request reached the upstream"
    assert {r["path"] for r in seen} <= {"/victim-check"}
    assert envoy.counter(UPSTREAM_CALLS) - upstream_calls == len(seen)


# Paths as they reach the filter when nothing normalises them first (`raw_gate`'s admin
# listener): the filter itself must refuse each, and nothing may reach the upstream.
RAW_ADMIN_PATHS = {
    "//tokengate/revoke": 400,
    "/tokengate//revoke": 400,
    "/tokengate/./revoke": 400,
    "/x/../tokengate/revoke": 400,
    "/tokengate/revocations/../revoke": 400,
    "/%74okengate/revoke": 400,
    "/tokengate/%72evoke": 400,
    "/tokengate%2Frevoke": 400,
    "/tokengate%2frevoke": 400,
    "/TOKENGATE/revoke": 400,
    "/tokengate/REVOKE": 400,
    "/tokengate\\revoke": 400,
    "/tokengate/revoke/": 400,
    "/tokengate/revoke/..": 404,
    "/tokengate/%2e%2e/tokengate/revoke": 400,
}


@pytest.fixture
def raw_gate(gates, mock_idp_server):
    """`mock_gate` plus `raw_admin`: the admin API on a copy of the data listener, which
    neither normalises paths nor merges slashes."""
    data = mock_idp_server.plugin_config()
    admin = merge(data, shipped_admin_additions())
    return gates.get(
        mock_idp_server, data, extra_listeners=[Listener("raw_admin", admin)],
        listener_configs={"tokengate_admin": admin}, name="envoy-revocation-raw-admin",
    )


@pytest.mark.parametrize("path", RAW_ADMIN_PATHS, ids=list(RAW_ADMIN_PATHS))
def test_disguised_admin_paths_without_envoy_normalisation_are_refused_by_the_filter(raw_gate, mock_idp_server, recorder, path):
    envoy, raw = raw_gate, AdminApi(raw_gate, "raw_admin")
    victim = _victim(mock_idp_server, envoy)
    mark, count = len(recorder.requests()), AdminApi(envoy).revocations()["count"]
    want = RAW_ADMIN_PATHS[path]
    assert_admin_refused(raw.revoke_form(victim, path=path), want, "invalid_request" if want == 400 else "not_found", what=path)
    # Without the credential: the admin challenge, whatever the path.
    assert_admin_challenge(raw.revoke_form(victim, auth=None, path=path), what=path)

    assert AdminApi(envoy).revocations()["count"] == count, "a refused admin request revoked something"
    assert sha256(victim) not in AdminApi(envoy).listed()
    assert envoy.get("/victim-check", bearer(victim)).status == 200
    seen = _upstream_seen_since(recorder, mark)
    assert [r for r in seen if looks_like_admin(r["path"])] == [], f"{path} reached the upstream"
    assert_still_serving(envoy, mock_idp_server)


def test_admin_routes_answer_wrong_methods_unknown_routes_and_bad_bodies(mock_gate, mock_idp_server, recorder):
    idp, envoy, api = mock_idp_server, mock_gate, AdminApi(mock_gate)
    mark = len(recorder.requests())
    victim = _victim(idp, envoy)
    form = urllib.parse.urlencode({"token": victim}).encode()

    resp = api.call("GET", f"{PREFIX}/revoke")
    assert_admin_refused(resp, 405, "method_not_allowed")
    assert resp.header("Allow") == "POST"
    assert_admin_refused(api.call("PUT", f"{PREFIX}/revoke", body=form, content_type=FORM), 405)
    assert_admin_refused(api.call("POST", f"{PREFIX}/revocations", body=form, content_type=FORM), 405)
    assert_admin_refused(api.call("GET", f"{PREFIX}/revocations/{sha256(victim)}"), 405)
    assert_admin_refused(api.call("POST", f"{PREFIX}/revoked", body=form, content_type=FORM), 404, "not_found")
    assert_admin_refused(api.call("GET", PREFIX), 404)

    assert_admin_refused(api.call("POST", f"{PREFIX}/revoke", body=form, content_type="text/plain"), 415)
    assert_admin_refused(api.call("POST", f"{PREFIX}/revoke", body=form), 415)
    assert_admin_refused(api.call("POST", f"{PREFIX}/revoke", body=form, content_type="multipart/form-data; boundary=x"), 415)
    bad = [
        (b'{"tokens": ["' + victim.encode() + b'"]', "application/json"),
        (b'{"tokens": []}', "application/json"),
        (b'{"token": "' + victim.encode() + b'"}', "application/json"),
        (b'{"tokens": ["' + victim.encode() + b'"], "sub": "x"}', "application/json"),
        (b'{"tokens": ["has space"]}', "application/json"),
        (b"token_type_hint=access_token", FORM),
        (form + b"&" + form, FORM),
        (b"", FORM),
    ]
    for body, content_type in bad:
        assert_admin_refused(api.call("POST", f"{PREFIX}/revoke", body=body, content_type=content_type), 400)

    # Over admin.max_body_bytes: declared up front, and streamed without a length.
    big = b"token=" + victim.encode() + b"&pad=" + b"x" * MAX_BODY_BYTES
    assert_admin_refused(api.call("POST", f"{PREFIX}/revoke", body=big, content_type=FORM), 413, "request_too_large")
    status, _ = chunked_post(api.port, f"{PREFIX}/revoke", big, {**ADMIN, "Content-Type": FORM})
    assert status == 413

    assert sha256(victim) not in api.listed()
    assert envoy.get("/victim-check", bearer(victim)).status == 200
    seen = _upstream_seen_since(recorder, mark)
    assert [r for r in seen if looks_like_admin(r["path"])] == [], "an admin request reached the upstream"


def chunked_post(port, path, body, headers, chunk=64 * 1024):
    """POST with Transfer-Encoding: chunked; (status, head). A server may answer before the
    whole body is sent and close: sending then fails, and the answer is read all the same."""
    head = f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nTransfer-Encoding: chunked\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection((LOOPBACK, port), timeout=10) as s:
        try:
            s.sendall(head.encode())
            for i in range(0, len(body), chunk):
                piece = body[i:i + chunk]
                s.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        data = b""
        while b"\r\n" not in data:
            more = s.recv(4096)
            if not more:
                break
            data += more
    status_line = data.split(b"\r\n", 1)[0].decode()
    return int(status_line.split()[1]), data


MAX_BULK_TOKENS = 10_000  # admin.max_bulk_tokens default (src/config.rs), which envoy/envoy.yaml keeps


@pytest.mark.parametrize(
    "limit, n", [(5, 6), (None, MAX_BULK_TOKENS + 1), (None, 50_000)], ids=["configured-5", "default-plus-1", "default-50000"]
)
def test_bulk_over_max_bulk_tokens_is_refused_whole(gates, mock_idp_server, recorder, limit, n):
    envoy = gate_for(gates, mock_idp_server, admin_overrides={"max_bulk_tokens": limit} if limit else None)
    api = AdminApi(envoy)
    mark, count = len(recorder.requests()), api.revocations()["count"]
    victims = [_victim(mock_idp_server, envoy) for _ in range(6)]
    tokens = victims + [secrets.token_hex(5) for _ in range(n - len(victims))]
    body = json.dumps({"tokens": tokens}).encode()
    assert len(body) < MAX_BODY_BYTES, "this case is about the count, not the size"

    refused = assert_admin_refused(api.call("POST", f"{PREFIX}/revoke", body=body, content_type=JSON_TYPE), 413, "too_many_tokens")
    assert str(limit or MAX_BULK_TOKENS) in refused["error_description"]
    assert api.revocations()["count"] == count, "a refused bulk revokes nothing"
    assert not {sha256(t) for t in victims} & api.listed().keys()
    assert [envoy.get("/victim-check", bearer(t)).status for t in victims] == [200] * len(victims)

    if limit:
        # Exactly the limit is accepted.
        assert assert_ok(api.revoke_json({"tokens": victims[:limit]}))["revoked"] == limit
        assert [envoy.get("/victim-check", bearer(t)).status for t in victims] == [401] * limit + [200]
    seen = _upstream_seen_since(recorder, mark)
    assert [r for r in seen if looks_like_admin(r["path"])] == []
    assert_still_serving(envoy, mock_idp_server)


# --------------------------------------------------------------------------- 6. configuration update


class LdsEnvoy(Envoy):
    """The harness Envoy with its listeners served by file-based LDS: the bootstrap keeps
    clusters and admin; the listeners go to lds.yaml in a watched directory, replaced by
    an atomic rename for each update (Envoy's documented way for filesystem xDS)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lds_dir = self.workdir / f"{self.name}-{self.port}-lds"
        self.lds_dir.mkdir(parents=True, exist_ok=True)
        self.lds_path = self.lds_dir / "lds.yaml"
        self.listeners = None

    def bootstrap(self):
        config = super().bootstrap()
        self.listeners = config["static_resources"].pop("listeners")
        self.push_listeners(self.listeners, "v1")
        config["node"] = {"id": "tokengate-e2e", "cluster": "tokengate-e2e"}
        config["dynamic_resources"] = {
            "lds_config": {
                "resource_api_version": "V3",
                "path_config_source": {"path": str(self.lds_path), "watched_directory": {"path": str(self.lds_dir)}},
            }
        }
        return config

    def push_listeners(self, listeners, version):
        resources = [{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", **l} for l in listeners]
        staged = self.lds_dir / f".lds-{version}.yaml"
        staged.write_text(yaml.safe_dump({"version_info": version, "resources": resources}, sort_keys=False))
        os.rename(staged, self.lds_path)  # atomic: Envoy never reads half a file

    def plugin_configs(self):
        """{listener name: plugin configuration} as Envoy's /config_dump has them active."""
        dump = self.admin("/config_dump?resource=dynamic_listeners").json()
        out = {}
        for entry in dump["configs"]:
            listener = entry.get("active_state", {}).get("listener")
            if listener:
                (plugin,) = _wasm_plugins(listener)
                out[listener["name"]] = json.loads(plugin["configuration"]["value"])
        return out


def _vm_stats(envoy):
    stats = envoy.stats()
    return {k: stats.get(k) for k in ("wasm.envoy.wasm.runtime.v8.created", "wasm.envoy.wasm.runtime.v8.active")}


def test_denylist_survives_a_plugin_configuration_update(procs, workdir, mock_idp_server, recorder, record_property):
    idp = mock_idp_server
    data = idp.plugin_config()
    envoy = LdsEnvoy(
        procs, workdir, idp.port, recorder.port, data,
        listener_configs={"tokengate_admin": merge(data, shipped_admin_additions())},
        concurrency=CONCURRENCY, name="envoy-lds", component_log_level="wasm:debug",
    ).start()
    try:
        api = AdminApi(envoy)
        assert envoy.stats()["listener_manager.lds.version_text"] == '"v1"'
        # Both have read and write: only the revocation can refuse `revoked` under either config.
        revoked, kept = issue(idp, scope="read write"), issue(idp, scope="read write")
        narrow = issue(idp, scope="read")
        for token in (revoked, kept, narrow):
            assert envoy.get("/", bearer(token)).status == 200
        assert_ok(api.revoke_form(revoked))
        burst_on_every_worker(envoy, revoked, expect=401, n=200)

        # The change: another claim header, and one more required scope; same vm_id, same code.
        change = {"claims_to_headers": {"client_id": "x-auth-client-app"}, "required_scopes": ["read", "write"]}
        updated = copy.deepcopy(envoy.listeners)
        new_configs = {}
        for listener in updated:
            (plugin,) = _wasm_plugins(listener)
            config = json.loads(plugin["configuration"]["value"])
            config["claims_to_headers"].pop("client_id")
            config = merge(config, change)
            plugin["configuration"]["value"] = json.dumps(config)
            new_configs[listener["name"]] = config
        vms_before = _vm_stats(envoy)
        envoy.push_listeners(updated, "v2")
        wait_until(lambda: envoy.stats()["listener_manager.lds.version_text"] == '"v2"', 10, what="LDS v2")
        stats = envoy.stats()
        assert (stats["listener_manager.lds.update_success"], stats["listener_manager.lds.update_rejected"]) == (2, 0)
        wait_until(lambda: envoy.plugin_configs() == new_configs, 10, what="the new plugin configurations to be active")
        wait_until(lambda: envoy.get("/", bearer(narrow)).status == 403, 10, what="the new policy on the data listener")
        vms_after = _vm_stats(envoy)

        # The new configuration is in effect on every worker ...
        burst_on_every_worker(envoy, narrow, expect=403, n=200)
        headers = envoy.get("/", bearer(kept)).json()["headers"]
        assert headers.get("x-auth-client-app") == "app-a" and "x-auth-client-id" not in headers, headers
        # ... and the revocation written under the old one still holds there.
        burst_on_every_worker(envoy, revoked, expect=401)
        assert_invalid_token(envoy.get("/", bearer(revoked)))
        assert sha256(revoked) in api.listed()
        # The updated admin listener still writes what the updated data listener reads.
        assert_ok(api.revoke_form(kept))
        burst_on_every_worker(envoy, kept, expect=401, n=200)

        figures = {"vm_stats_before_update": vms_before, "vm_stats_after_update": vms_after}
        print(f"\n[revocation] LDS update: {figures}")
        record_property("lds_update", json.dumps(figures))
    finally:
        envoy.stop()


# --------------------------------------------------------------------------- 7. ten thousand


def rss_kib(envoy):
    for line in Path(f"/proc/{envoy.proc.popen.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_ten_thousand_revoked_tokens(gates, mock_idp_server, record_property):
    idp = mock_idp_server
    envoy = gate_for(gates, idp, name="envoy-revocation-10k")
    api = AdminApi(envoy)
    n = 10_000
    tokens = [secrets.token_urlsafe(32) for _ in range(n)]
    sample = tokens[:: n // 200]
    kept = [secrets.token_urlsafe(32) for _ in range(20)]
    for token in sample + kept:
        idp.register_active(token)  # the IdP says active: only the denylist can refuse them
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        before = list(pool.map(lambda t: envoy.get("/", bearer(t)).status, sample + kept))
    assert before == [200] * len(before)
    rss_before = rss_kib(envoy)

    body = json.dumps({"tokens": tokens, "reason": "mass revocation"}).encode()
    started = time.monotonic()
    resp = api.call("POST", f"{PREFIX}/revoke", body=body, content_type="application/json", timeout=60)
    bulk_s = time.monotonic() - started
    answer = assert_ok(resp)
    assert answer["revoked"] == n
    assert answer["ids"] and set(answer["ids"]) <= {sha256(t) for t in tokens}
    rss_after_bulk = rss_kib(envoy)

    started = time.monotonic()
    listing = api.call("GET", f"{PREFIX}/revocations", timeout=60)
    list_s = time.monotonic() - started
    listed = assert_ok(listing)
    assert listed["count"] >= n and listed["count"] == len(listed["revocations"])
    ids = {r["id"] for r in listed["revocations"]}
    assert {sha256(t) for t in tokens} <= ids
    rss_after_list = rss_kib(envoy)

    revoked_before, calls_before = envoy.metric(REVOKED), idp.introspections()["count"]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        after = list(pool.map(lambda t: envoy.get("/", bearer(t)).status, sample))
        still = list(pool.map(lambda t: envoy.get("/", bearer(t)).status, kept))
    assert after == [401] * len(sample)
    assert envoy.metric(REVOKED) - revoked_before == len(sample), "each was refused as revoked"
    assert idp.introspections()["count"] == calls_before, "a revoked token costs no introspection"
    assert still == [200] * len(kept)
    burst_on_every_worker(envoy, sample[0], expect=401, n=200)
    rss_after = rss_kib(envoy)

    # The bound, from the limits in force (src/config.rs defaults, envoy/envoy.yaml):
    # - shared data holds each record once, as JSON: at most 64 hex + 200 reason chars + keys,
    #   call it 512 B, so 10,000 records take at most 5 MiB (denylist.max_tokens = 100,000 only
    #   caps how far this could go; 10,000 records must cost what 10,000 records cost);
    # - wasm linear memory never shrinks, so each VM that served an admin call keeps its peak:
    #   the bulk call's VM parsed a body of at most admin.max_body_bytes (1 MiB) into at most
    #   admin.max_bulk_tokens (10,000) strings; the list call's VM held every record, their
    #   serde_json values and the JSON text (~1.6 MB here) at once. 16x the list text for each
    #   of those two VMs: 2 x 16 x 1.5 MiB = 48 MiB;
    # - 16 MiB for Envoy's buffers (the 1 MiB buffer filter, connections) and allocator slack.
    # Measured on the 2-core test machine: ~20-25 MiB. Recorded, not asserted: an absolute RSS
    # bound depends on the allocator and the machine; `make soak` judges memory by its slope
    # under load, and `make bench` by RSS against distinct tokens.
    bound_kib = (5 + 48 + 16) * 1024
    figures = {
        "tokens": n,
        "bulk_body_bytes": len(body),
        "bulk_call_s": round(bulk_s, 3),
        "list_call_s": round(list_s, 3),
        "list_response_bytes": len(listing.body),
        "rss_before_kib": rss_before,
        "rss_after_bulk_kib": rss_after_bulk,
        "rss_after_list_kib": rss_after_list,
        "rss_after_kib": rss_after,
        "rss_delta_kib": rss_after - rss_before,
        "rss_bound_kib": bound_kib,
    }
    print(f"\n[revocation] 10k denylist: {json.dumps(figures)}")
    for key, value in figures.items():
        record_property(key, value)


# --------------------------------------------------------------------------- edges


@pytest.mark.parametrize("kind", ["token", "client_id"])
def test_request_waiting_on_the_idp_is_refused_if_revoked_before_its_answer(mock_gate, mock_idp, kind):
    """'No worker accepts the token after the admin call returns' includes a request that
    arrived before the revocation and was still waiting for its introspection."""
    envoy, api = mock_gate, AdminApi(mock_gate)
    token, client = secrets.token_urlsafe(32), unique("client")
    mock_idp.register_active(token, client_id=client, iat=int(time.time()) - 5)
    mock_idp.fault("slow", delay_ms=1500)
    answered = {}

    def in_flight():
        resp = envoy.get("/", bearer(token))
        answered.update(resp=resp, at=time.monotonic())

    waiter = threading.Thread(target=in_flight, daemon=True)
    waiter.start()
    wait_until(lambda: mock_idp.calls_for(token) >= 1, 5, what="the introspection to be under way")
    revocation = {"tokens": [token]} if kind == "token" else {"client_id": client}
    assert_ok(api.revoke_json(revocation))
    returned = time.monotonic()
    waiter.join(10)

    assert answered["at"] > returned, "the request was answered before the revocation returned"
    assert_invalid_token(answered["resp"])
    mock_idp.fault("none")
    assert_invalid_token(envoy.get("/", bearer(token)))


@pytest.mark.parametrize("kind", ["client_id", "sub"])
def test_principal_whose_name_has_a_slash_can_be_undone(mock_gate, mock_idp_server, kind):
    # SPIFFE IDs and URLs are common client ids (and subjects); the list shows the id as is,
    # and DELETE takes it percent-encoded as one path segment.
    envoy, api, idp = mock_gate, AdminApi(mock_gate), mock_idp_server
    name = f"spiffe://example.org/ns/{unique('app')}"
    token = issue(idp, client_id=name) if kind == "client_id" else issue(idp, sub=name)
    assert envoy.get("/", bearer(token)).status == 200
    revocation = assert_ok(api.revoke_json({kind: name}))["revocation"]
    prefix = "client" if kind == "client_id" else "sub"
    assert revocation["id"] == f"{prefix}:{name}" and revocation["id"] in api.listed()
    assert_invalid_token(envoy.get("/", bearer(token)))

    resp = api.undo(revocation["id"])
    assert (resp.status, resp.body) == (204, b""), f"DELETE {PREFIX}/revocations/{urllib.parse.quote(revocation['id'], safe='')}: {resp}"
    assert revocation["id"] not in api.listed()
    assert statuses_over_connections(envoy, token) == [200] * (2 * CONCURRENCY)


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_pair(iss="https://idp.test", jti=None):
    """A JWT-shaped token and another encoding of it that a lenient server also accepts:
    the same header and payload with another signature (as ECDSA's (r, n - s) would be)
    and a payload whose last base64url character carries stray trailing bits."""
    jti = jti or unique("jti")
    header = _b64url(json.dumps({"alg": "ES256", "typ": "at+jwt"}).encode())
    payload = json.dumps({"iss": iss, "jti": jti, "sub": "user-1", "pad": "x" * (1 + len(jti) % 3)}).encode()
    while len(payload) % 3 == 0:  # some trailing bits must be free to flip
        payload += b" "
    encoded = _b64url(payload)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    flipped = encoded[:-1] + alphabet[alphabet.index(encoded[-1]) + 1]
    assert base64.urlsafe_b64decode(flipped + "==") == payload
    token = f"{header}.{encoded}.{_b64url(secrets.token_bytes(64))}"
    altered = f"{header}.{flipped}.{_b64url(secrets.token_bytes(64))}"
    return token, altered, (iss, jti)


def jti_id(iss, jti):
    """The admin id of a JWT identity: `jti:` + SHA-256 of a tag, `iss` and `jti`, each length-prefixed."""
    digest = hashlib.sha256(b"tokengate.jti\0")
    for part in (iss, jti):
        digest.update(len(part.encode()).to_bytes(8, "big") + part.encode())
    return "jti:" + digest.hexdigest()


@pytest.mark.parametrize("answer_has_jti", [True, False], ids=["jti-in-answer", "jti-in-payload-only"])
def test_revoked_jwt_stays_revoked_in_another_encoding(mock_gate, mock_idp_server, answer_has_jti):
    idp, envoy, api = mock_idp_server, mock_gate, AdminApi(mock_gate)
    token, altered, (iss, jti) = jwt_pair()
    claims = {"iss": iss, "jti": jti} if answer_has_jti else {}
    idp.register_active(token, **claims)
    idp.register_active(altered, **claims)  # the lenient IdP calls both encodings active
    assert envoy.get("/", bearer(token)).status == 200
    burst_on_every_worker(envoy, altered, expect=200)  # cached on every worker before the revocation

    body = assert_ok(api.revoke_form(token))
    burst_on_every_worker(envoy, altered, expect=401)
    assert_invalid_token(envoy.get("/", bearer(altered)))
    assert body == {"revoked": 1, "ids": [sha256(token)], "jti_ids": [jti_id(iss, jti)]}
    listed = api.listed()
    assert listed[jti_id(iss, jti)]["kind"] == "jti"
    assert listed[sha256(token)]["kind"] == "token"
    assert token not in json.dumps(listed) and altered not in json.dumps(listed)

    # A third encoding, never seen before the revocation, is refused on its first request.
    _, third, _ = jwt_pair(iss, jti)
    idp.register_active(third, **claims)
    assert_invalid_token(envoy.get("/", bearer(third)))
    # Undoing the identity lets the other encodings back in; the revoked token itself stays out.
    assert api.undo(jti_id(iss, jti)).status == 204
    assert envoy.get("/", bearer(altered)).status == 200
    assert_invalid_token(envoy.get("/", bearer(token)))


def test_a_token_given_twice_in_a_bulk_is_one_revocation(mock_gate, mock_idp_server):
    api = AdminApi(mock_gate)
    twice, once = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    body = assert_ok(api.revoke_json({"tokens": [twice, once, twice]}))
    listed = api.listed()
    assert sha256(twice) in listed and sha256(once) in listed
    assert (body["revoked"], sorted(body["ids"])) == (2, sorted({sha256(twice), sha256(once)})), body


# --------------------------------------------------------------------------- RFC 7009 forwarding


def test_revocation_is_forwarded_to_the_idp_and_stands_when_the_idp_fails(procs, workdir, recorder, fresh, idp):
    """With `revocation_endpoint`, a revoke also reaches the IdP's RFC 7009 endpoint (the IdP
    then says inactive), the answer reports it, and an IdP that fails never undoes the local
    revocation."""
    own_idp = fresh.idp(idp.kind)
    data = own_idp.plugin_config()
    admin = merge(merge(data, shipped_admin_additions()), {
        "revocation_endpoint": {
            "cluster": "idp", "authority": own_idp.authority, "path": own_idp.revocation_path,
            "client_id": "gateway", "client_secret": "gateway-secret", "timeout_ms": 1000,
        },
    })
    envoy = Envoy(
        procs, workdir, idp_port=own_idp.port, upstream_port=recorder.port, plugin_config=data,
        listener_configs={"tokengate_admin": admin}, concurrency=CONCURRENCY,
        name=f"envoy-forward-{own_idp.kind}",
    ).start()
    try:
        api = AdminApi(envoy)
        token = issue(own_idp)
        assert envoy.get("/", bearer(token)).status == 200
        assert own_idp.introspect(token)["active"] is True

        body = assert_ok(api.revoke_form(token))
        assert body["forwarded"] == {"ok": 1, "failed": 0, "skipped": 0}, body
        assert own_idp.introspect(token)["active"] is False, "the IdP revoked it too"
        assert_invalid_token(envoy.get("/", bearer(token)))

        # The IdP goes away: the local revocation still happens, the answer says the forward failed.
        other = issue(own_idp)
        assert envoy.get("/", bearer(other)).status == 200
        own_idp.stop()
        body = assert_ok(api.revoke_json({"tokens": [other], "reason": "idp down"}))
        assert body["revoked"] == 1 and body["forwarded"]["failed"] == 1, body
        assert [envoy.get("/", bearer(other)).status for _ in range(2 * CONCURRENCY)] == [401] * (2 * CONCURRENCY)
    finally:
        envoy.stop()


# --------------------------------------------------------------------------- what operators see and configure


def test_admin_and_revocation_counters_move_by_exactly_what_was_done(mock_gate, mock_idp_server):
    envoy, api = mock_gate, AdminApi(mock_gate)
    names = ("admin.requests", "admin.rejected", "revocations.tokens", "revocations.principals",
             "revocations.undone", "revocations.refused")
    before = {name: envoy.metric(f"tokengate.{name}") for name in names}
    first, *bulk = [secrets.token_urlsafe(32) for _ in range(4)]
    assert_ok(api.revoke_form(first))
    assert_ok(api.revoke_json({"tokens": bulk}))
    assert_ok(api.revoke_json({"client_id": unique("counted-client")}))
    assert api.undo(sha256(first)).status == 204
    assert_admin_refused(api.undo(sha256(first)), 404, "not_found")
    assert_admin_challenge(api.call("GET", f"{PREFIX}/revocations", auth=None))
    assert_admin_refused(api.call("GET", "/elsewhere"), 404, "not_found")
    api.revocations()
    delta = {name: envoy.metric(f"tokengate.{name}") - before[name] for name in names}
    assert delta == {
        "admin.requests": 8, "admin.rejected": 3, "revocations.tokens": 4, "revocations.principals": 1,
        "revocations.undone": 1, "revocations.refused": 0,
    }


def test_revocation_log_line_names_the_token_by_its_sha256_never_by_its_text(mock_gate, mock_idp_server):
    envoy, api = mock_gate, AdminApi(mock_gate)
    token, marker = odd_token(), unique("logged")
    assert_ok(api.revoke_form(token, reason=marker))
    wait_until(lambda: marker in envoy.log_text(), 10, what="the revocation's log line")
    log = envoy.log_text()
    (line,) = [line for line in log.splitlines() if marker in line]
    assert "revoked 1 token(s)" in line and f"sha256:{sha256(token)}" in line, line
    for form in {token, urllib.parse.quote(token, safe=""), urllib.parse.quote_plus(token)}:
        assert form not in log, "a token value is in Envoy's log"


def test_admin_routes_live_under_a_custom_path_prefix_only(gates, mock_idp_server):
    prefix = "/ops/token-gate"
    envoy = gate_for(gates, mock_idp_server, admin_overrides={"path_prefix": prefix})
    api = AdminApi(envoy)
    token = secrets.token_urlsafe(32)
    mock_idp_server.register_active(token)
    assert envoy.get("/", bearer(token)).status == 200
    assert_admin_refused(api.revoke_form(token), 404, "not_found")
    assert_admin_refused(api.call("GET", f"{PREFIX}/revocations"), 404, "not_found")
    assert envoy.get("/", bearer(token)).status == 200, "the default prefix revoked nothing"

    assert assert_ok(api.revoke_form(token, path=f"{prefix}/revoke"))["ids"] == [sha256(token)]
    assert_invalid_token(envoy.get("/", bearer(token)))
    listing = assert_ok(api.call("GET", f"{prefix}/revocations"))
    assert sha256(token) in {r["id"] for r in listing["revocations"]}
    resp = api.call("DELETE", f"{prefix}/revocations/{sha256(token)}")
    assert resp.status == 204, resp
    assert envoy.get("/", bearer(token)).status == 200


def test_full_principal_list_answers_507_denylist_full_and_counts_the_refusal(gates, mock_idp_server):
    envoy = gate_for(gates, mock_idp_server, denylist={"max_principals": 1}, name="envoy-revocation-full")
    api = AdminApi(envoy)
    kept, refused = unique("first-client"), unique("second-client")
    token = mock_idp_server.issue_token(client_id=refused, sub="user-1")
    refusals, principals = envoy.metric("tokengate.revocations.refused"), envoy.metric("tokengate.revocations.principals")
    assert_ok(api.revoke_json({"client_id": kept}))
    body = assert_admin_refused(api.revoke_json({"client_id": refused}), 507, "denylist_full")
    assert body["error_description"] == "too many client and subject revocations: raise denylist.max_principals"
    assert envoy.metric("tokengate.revocations.refused") == refusals + 1
    assert envoy.metric("tokengate.revocations.principals") == principals + 1
    assert set(api.listed()) >= {f"client:{kept}"} and f"client:{refused}" not in api.listed()
    assert envoy.get("/", bearer(token)).status == 200, "the refused revocation refuses nothing"


def test_bulk_answer_lists_at_most_1000_ids_and_revokes_every_token(mock_gate, mock_idp_server):
    api = AdminApi(mock_gate)
    tokens = [secrets.token_urlsafe(32) for _ in range(1001)]
    body = assert_ok(api.revoke_json({"tokens": tokens}))
    assert body["revoked"] == 1001
    assert len(body["ids"]) == 1000 and set(body["ids"]) < {sha256(t) for t in tokens}, len(body["ids"])
    assert {sha256(t) for t in tokens} <= set(api.listed()), "every token is revoked, listed or not"
