"""Cluster sync (issue 7): revocations shared by every Envoy through etcd.

A 3-member etcd cluster and 3 Envoys (the shipped data + tokengate_admin listeners,
`cluster_sync` in both plugin configurations, --concurrency 2) on 127.0.0.1, free ports,
shared by the tests of this module; the mock IdP says every test token is active, so a
401 `invalid_token` "the token has been revoked" on Envoy 2 or 3 can only come from the
denylist, that is from etcd. Every test uses fresh tokens and client names.

A change made on one Envoy reaches the others: each is polled on new connections every
~10 ms, in parallel, until it answers as it should. The tests assert that and the order
of events, never how fast: the ceiling (CEILING_S) only catches "never", and the delays
are printed (with -s). How fast it is, is measured by `make bench-cluster` (median and
p99 over 100 revocations). Tests that break something (an etcd member, all of etcd, an
Envoy) restore it in a fixture's teardown.

The configuration tests at the end (prefix, max_outbox, require_initial_sync, the gauges)
run their own Envoys with --concurrency 4: one beside the trio on its etcd, one whose
etcd is a port nobody listens on.

Run: make e2e PYTEST_ARGS="-k cluster_sync -x"   (figures: add -s)
"""
import json
import secrets
import threading
import time
import urllib.parse

import pytest

import conftest
from harness import (
    ADMIN, FORM, Envoy, Etcd, Listener, bearer, decode, free_port, high_s_twin, jwt_section, loopback_cluster, merge, request,
    sha256, unique,
)

CONCURRENCY = 2
POLL_MS = 500
TIMEOUT_MS = 1000
# Longer than any propagation on a loaded 2-core machine (poll_ms + an etcd election):
# reaching it means the change never arrived.
CEILING_S = 20.0
PREFIX = "tokengate/"  # the default of cluster_sync.prefix
REVOKED_DESCRIPTION = "the token has been revoked"


# --------------------------------------------------------------------------- the cluster


class Gate:
    """One Envoy of the trio, with its admin API. The ids its admin calls touch go to
    `touched` (shared by the trio), for failure messages."""

    def __init__(self, envoy, touched):
        self.envoy = envoy
        self.name = envoy.name
        self.touched = touched

    @property
    def admin_port(self):
        return self.envoy.listener_port("tokengate_admin")

    def status(self, token):
        return self.envoy.get("/", bearer(token), timeout=5.0).status

    def statuses(self, token, n=4 * CONCURRENCY):
        """n requests, each on its own connection, so every worker answers some."""
        return [self.status(token) for _ in range(n)]

    def admin(self, method, path, body=None, content_type=None, timeout=30.0):
        headers = dict(ADMIN)
        if content_type:
            headers["Content-Type"] = content_type
        return request(self.admin_port, f"/tokengate{path}", headers, method, body, timeout=timeout)

    def revoke(self, token, timeout=30.0):
        """RFC 7009 form revoke; returns (reply, monotonic time the reply arrived)."""
        self.touched.append(sha256(token))
        resp = self.admin("POST", "/revoke", urllib.parse.urlencode({"token": token}).encode(), FORM, timeout)
        return resp, time.monotonic()

    def revoke_json(self, obj):
        self.touched.extend(sha256(t) for t in obj.get("tokens", [])[:2])
        self.touched.extend(f"{kind}:{obj[key]}" for kind, key in (("client", "client_id"), ("sub", "sub")) if key in obj)
        resp = self.admin("POST", "/revoke", json.dumps(obj).encode(), "application/json")
        return resp, time.monotonic()

    def undo(self, revocation_id):
        self.touched.append(revocation_id)
        resp = self.admin("DELETE", f"/revocations/{urllib.parse.quote(revocation_id, safe='')}")
        return resp, time.monotonic()

    def listed(self):
        resp = self.admin("GET", "/revocations")
        assert resp.status == 200, resp
        return {r["id"] for r in resp.json()["revocations"]}

    def metric(self, name):
        return self.envoy.metric(f"tokengate.{name}")

    def etcd_hosts_healthy(self):
        return self.envoy.counter("cluster.etcd.membership_healthy")


class Cluster:
    def __init__(self, etcd, envoys, idp):
        self.etcd, self.idp = etcd, idp
        self.touched = []
        self.gates = [Gate(e, self.touched) for e in envoys]

    def token(self, client_id=None, sub="user-1"):
        """A token the IdP says is active, already answered 200 (and so cached) by every Envoy."""
        token = self.idp.issue_token(scope="read", client_id=client_id or unique("app"), sub=sub, ttl=600)
        for gate in self.gates:
            assert gate.status(token) == 200, f"{gate.name} refused a fresh token"
        return token

    def evidence(self, recent=6):
        """What a failure message needs: what etcd holds for the ids the last admin calls
        touched, each Envoy's sync metrics and its last sync log lines."""
        out = []
        try:
            keys = self.etcd.get_prefix(PREFIX)
            out.append(f"etcd revision {self.etcd.revision()}, {len(keys)} keys under {PREFIX}")
            for rid in dict.fromkeys(reversed(self.touched[-recent:])):
                for kind in ("revoked", "undone"):
                    out.append(f"  {PREFIX}{kind}/{rid}: {json.dumps(keys.get(f'{PREFIX}{kind}/{rid}', '(absent)'))}")
        except RuntimeError as e:
            out.append(f"etcd unreadable: {e}")
        for gate in self.gates:
            if not gate.envoy.alive():
                out.append(f"{gate.name}: not running")
                continue
            sync = {k.split("tokengate.")[1]: v for k, v in gate.envoy.tokengate_stats().items() if ".sync." in k}
            out.append(f"{gate.name} etcd hosts healthy={gate.etcd_hosts_healthy()} {sync}")
            lines = [l for l in gate.envoy.log_text().splitlines() if "cluster sync" in l or "tokengate: revoked" in l]
            out.extend(f"  {l[:220]}" for l in lines[-6:])
        return "\n".join(out)


def launch_trio(procs, workdir, idp, upstream, etcd, names):
    config = idp.plugin_config(
        cluster_sync=etcd.sync_config(poll_ms=POLL_MS, timeout_ms=TIMEOUT_MS),
    )
    envoys = [
        Envoy(
            procs,
            workdir,
            idp_port=idp.port,
            upstream_port=upstream.port,
            plugin_config=config,
            concurrency=CONCURRENCY,
            name=name,
            extra_clusters=[etcd.envoy_cluster()],
        )
        for name in names
    ]
    # Started side by side (from this thread: see Envoy.launch), then awaited.
    for envoy in envoys:
        envoy.launch()
    for envoy in envoys:
        envoy.wait_ready(timeout=60)
    return envoys


@pytest.fixture(scope="module")
def cluster(procs, workdir, mock_idp_server, upstream):
    etcd = Etcd(procs, workdir).start()
    envoys = launch_trio(procs, workdir, mock_idp_server, upstream, etcd, [f"envoy-sync-{i}" for i in (1, 2, 3)])
    for envoy in envoys:
        wait_for(lambda e=envoy: e.counter("cluster.etcd.membership_healthy") == 3, CEILING_S, "Envoy to see 3 healthy members")
        # Until its first complete read of etcd an Envoy answers 503 (require_initial_sync).
        wait_for(lambda e=envoy: e.metric("tokengate.sync.revision") > 0, CEILING_S, "Envoy's first complete read of etcd")
    yield Cluster(etcd, envoys, mock_idp_server)
    for envoy in envoys:
        envoy.stop()
    etcd.stop()


def wait_for(predicate, timeout, what, interval=0.02):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- measuring


def watch(gates, token, want, since, limit=CEILING_S, interval=0.010):
    """{gate name: seconds from `since` (monotonic) to the first answer `want`}, each gate
    polled every `interval` on new connections, all in parallel; None if not within limit."""
    found = {}

    def poll(gate):
        found[gate.name] = None
        while True:
            now = time.monotonic()
            if now - since > limit:
                return
            try:
                status = gate.status(token)
            except OSError:
                status = 0
            if status == want:
                found[gate.name] = time.monotonic() - since
                return
            time.sleep(max(0.0, interval - (time.monotonic() - now)))

    threads = [threading.Thread(target=poll, args=(g,), daemon=True) for g in gates]
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit + 15)
    return found


def assert_reached(cluster, delays, what):
    """Every gate answered as it should before the ceiling; the delays are shown, not judged."""
    shown = {name: (None if d is None else round(d, 3)) for name, d in delays.items()}
    print(f"\n{what}: {shown} s")
    never = [name for name, d in delays.items() if d is None]
    assert not never, f"{what}: {never} never did within {CEILING_S:.0f}s: {shown}\n{cluster.evidence()}"


def assert_revoked_everywhere(cluster, gates, token, what):
    """Every worker of every gate refuses the token as revoked (not as unknown to the IdP)."""
    for gate in gates:
        statuses = gate.statuses(token)
        assert statuses == [401] * len(statuses), f"{what}: {gate.name} answered {statuses}\n{cluster.evidence()}"
        body = gate.envoy.get("/", bearer(token)).json()
        assert (body["error"], body["error_description"]) == ("invalid_token", REVOKED_DESCRIPTION), body


def assert_passes_everywhere(cluster, gates, token, what):
    for gate in gates:
        statuses = gate.statuses(token)
        assert statuses == [200] * len(statuses), f"{what}: {gate.name} answered {statuses}\n{cluster.evidence()}"


def admin_ok(cluster, resp, want_sync="written"):
    assert resp.status == 200, f"{resp}\n{cluster.evidence()}"
    body = resp.json()
    if want_sync is not None:
        allowed = {want_sync} if isinstance(want_sync, str) else set(want_sync)
        assert body.get("cluster_sync") in allowed, f"admin reply {body}\n{cluster.evidence()}"
    return body


# --------------------------------------------------------------------------- setup


def test_cluster_sync_setup_three_etcd_members_three_envoys(cluster):
    members = cluster.etcd.call("/v3/cluster/member/list", {})["members"]
    assert sorted(m["clientURLs"][0] for m in members) == sorted(m.client_url for m in cluster.etcd.members)
    assert cluster.etcd.leader_index() is not None
    for gate in cluster.gates:
        info = gate.envoy.admin("/server_info").json()
        assert int(info["command_line_options"]["concurrency"]) == CONCURRENCY
        configs = [
            json.loads(f["typed_config"]["config"]["configuration"]["value"])
            for listener in gate.envoy.bootstrap()["static_resources"]["listeners"]
            for chain in listener["filter_chains"]
            for f in chain["filters"][0]["typed_config"]["http_filters"]
            if f["typed_config"]["@type"].endswith(".Wasm")
        ]
        assert len(configs) == 2 and all(c["cluster_sync"]["poll_ms"] == POLL_MS for c in configs)
        assert gate.etcd_hosts_healthy() == 3
        # The poller runs: a leader per process, a poll that succeeded (the revision it read).
        wait_for(lambda g=gate: g.metric("sync.revision") > 0, CEILING_S, f"{gate.name}'s first successful poll")


# --------------------------------------------------------------------------- propagation


def test_cluster_sync_token_revocation_and_undo_reach_every_envoy_within_the_bound(cluster):
    one, *others = cluster.gates
    token = cluster.token()

    resp, replied = one.revoke(token)
    admin_ok(cluster, resp, "written")
    assert one.statuses(token) == [401] * (4 * CONCURRENCY), "the Envoy that took it refuses at once"
    delays = watch(others, token, 401, replied)
    assert_reached(cluster, delays, "token revocation on envoy 1 → 401 on 2 and 3")
    assert_revoked_everywhere(cluster, others, token, "after propagation")
    record = cluster.etcd.get_prefix(PREFIX)[f"{PREFIX}revoked/{sha256(token)}"]
    assert (record["id"], record["kind"]) == (sha256(token), "token")
    assert token not in json.dumps(cluster.etcd.get_prefix(PREFIX)), "a raw token in etcd"
    for gate in others:
        assert sha256(token) in gate.listed(), f"{gate.name} lists the synced revocation"

    resp, replied = one.undo(sha256(token))
    assert resp.status == 204, resp
    assert one.statuses(token) == [200] * (4 * CONCURRENCY)
    delays = watch(others, token, 200, replied)
    assert_reached(cluster, delays, "undo on envoy 1 → 200 on 2 and 3")
    assert_passes_everywhere(cluster, others, token, "after the undo propagated")
    keys = cluster.etcd.get_prefix(PREFIX)
    assert f"{PREFIX}revoked/{sha256(token)}" not in keys
    assert keys[f"{PREFIX}undone/{sha256(token)}"]["id"] == sha256(token), "the tombstone"


def test_cluster_sync_client_revocation_and_undo_reach_every_envoy_within_the_bound(cluster):
    one, *others = cluster.gates
    client, bystander = unique("client"), unique("bystander")
    token, other = cluster.token(client_id=client), cluster.token(client_id=bystander)

    resp, replied = one.revoke_json({"client_id": client, "reason": "client secret leaked"})
    body = admin_ok(cluster, resp, "written")
    assert body["revocation"]["id"] == f"client:{client}"
    delays = watch(others, token, 401, replied)
    assert_reached(cluster, delays, "client revocation on envoy 1 → 401 on 2 and 3")
    assert_revoked_everywhere(cluster, cluster.gates, token, "the client's token")
    assert_passes_everywhere(cluster, cluster.gates, other, "another client's token")
    assert cluster.etcd.get_prefix(PREFIX)[f"{PREFIX}revoked/client:{client}"]["reason"] == "client secret leaked"

    resp, replied = one.undo(f"client:{client}")
    assert resp.status == 204, resp
    delays = watch(others, token, 200, replied)
    assert_reached(cluster, delays, "client undo on envoy 1 → 200 on 2 and 3")
    assert_passes_everywhere(cluster, cluster.gates, token, "after the client undo")


def test_cluster_sync_a_change_made_on_any_envoy_reaches_the_others(cluster):
    """Not only Envoy 1 writes: revoke on 3, undo on 2."""
    one, two, three = cluster.gates
    token = cluster.token()
    resp, replied = three.revoke(token)
    admin_ok(cluster, resp, "written")
    assert_reached(cluster, watch([one, two], token, 401, replied), "revocation on envoy 3 → 1 and 2")
    resp, replied = two.undo(sha256(token))
    assert resp.status == 204, resp
    assert_reached(cluster, watch([one, three], token, 200, replied), "undo on envoy 2 → 1 and 3")


def test_cluster_sync_bulk_revocation_spanning_several_txns_and_range_pages(cluster):
    """1200 tokens: ten etcd transactions (128 operations at most each) and two range
    pages (1000 keys each) for the other Envoys' pollers."""
    one, *others = cluster.gates
    primed = cluster.token()
    tokens = [primed] + [secrets.token_urlsafe(24) for _ in range(1199)]
    resp, replied = one.revoke_json({"tokens": tokens, "reason": "bulk"})
    body = admin_ok(cluster, resp, "written")
    assert body["revoked"] == len(tokens)
    delays = watch(others, primed, 401, replied)
    # The poller applies a whole page (1000 keys) at a time and the second one right after it.
    assert_reached(cluster, delays, "bulk of 1200 on envoy 1 → 401 on 2 and 3")
    ids = {sha256(t) for t in tokens}
    for gate in others:
        wait_for(lambda g=gate: ids <= g.listed(), CEILING_S, f"{gate.name} to list all 1200")
    keys = cluster.etcd.get_prefix(f"{PREFIX}revoked/")
    assert ids <= {k.rsplit("/", 1)[1] for k in keys}


def test_cluster_sync_idp_jwt_revoked_on_one_envoy_is_refused_by_another_in_every_encoding(cluster, fresh, jwt_idp):
    """Two Envoys (--concurrency 4) beside the trio, on its etcd, that verify oidc-provider's
    JWT access tokens themselves (`jwt` section): a JWT revoked on the first is refused by
    the second, and so is its other encoding (ES256 (r, n - s)): the `jti:` identity
    travels through etcd with the token's hash."""
    config = jwt_idp.plugin_config(
        jwt=jwt_section(jwt_idp, [jwt_idp.JWT_RESOURCES["ES256"]]),
        cluster_sync=cluster.etcd.sync_config(poll_ms=POLL_MS, timeout_ms=TIMEOUT_MS),
    )
    one, two = (Gate(fresh.envoy(jwt_idp, config, extra_clusters=[cluster.etcd.envoy_cluster()]), cluster.touched)
                for _ in range(2))
    for gate in (one, two):
        wait_for(lambda g=gate: g.metric("sync.revision") > 0, CEILING_S, "the JWT Envoy's first complete read")
    token = jwt_idp.issue_jwt(alg="ES256", client_id="app-b")
    twin = high_s_twin(token)
    n = 4 * conftest.CONCURRENCY
    for gate in (one, two):
        assert gate.statuses(token, n) == [200] * n and gate.statuses(twin, n) == [200] * n, gate.name

    resp, replied = one.revoke(token)
    body = admin_ok(cluster, resp, "written")
    (jti_id,) = body["jti_ids"]
    assert one.statuses(twin, n) == [401] * n, "the Envoy that took it refuses the other encoding at once"
    assert_reached(cluster, watch([two], twin, 401, replied), "JWT revocation on one JWT Envoy → its twin 401 on another")
    assert_revoked_everywhere(cluster, [two], token, "the revoked JWT")
    assert_revoked_everywhere(cluster, [two], twin, "its other encoding")
    record = cluster.etcd.get_prefix(PREFIX)[f"{PREFIX}revoked/{jti_id}"]
    assert (record["id"], record["kind"]) == (jti_id, "jti")
    assert decode(token)[1]["jti"] not in json.dumps(cluster.etcd.get_prefix(PREFIX)), "etcd names a JWT by hash only"


# --------------------------------------------------------------------------- etcd failures


@pytest.fixture
def restore_etcd(cluster):
    """Whatever a test stops or pauses, every member runs again (and Envoy sees it) afterwards."""
    yield cluster.etcd
    cluster.etcd.resume(wait=False)
    cluster.etcd.start()
    for gate in cluster.gates:
        if gate.envoy.alive():
            wait_for(lambda g=gate: g.etcd_hosts_healthy() == 3, CEILING_S, f"{gate.name} to see 3 healthy members")


def test_cluster_sync_one_etcd_member_stopped_revocations_still_propagate(cluster, restore_etcd):
    """One member stopped (SIGTERM), first a follower, then the leader.

    What is asserted, and why:
    - right after the stop, Envoy does not know yet: its health check runs every 200 ms,
      and until it marks the member down a write or a poll may go there and fail at once
      (connection refused). A failed write is queued (the reply says "queued") and the
      process's poller flushes it at its next tick; a failed poll is retried poll_ms
      later. So the first revocation gets the bound plus one failed poll:
      poll_ms + 1 s + poll_ms;
    - once Envoy's health check has marked the member down, the reply says "written" and
      revocations and undos meet the plain bound;
    - stopping the leader also moves etcd's leadership: for a moment no member has a
      leader, /health fails everywhere and Envoy has no member to send to (up to its
      health-check timeout, 0.5 s, plus an interval). One more second is allowed there:
      poll_ms + 1 s + poll_ms + 1 s.
    Back, a member catches up with what it missed.
    """
    etcd = cluster.etcd
    one, *others = cluster.gates
    leader = etcd.leader_index()
    follower = (leader + 1) % len(etcd.members)
    first, second, third = cluster.token(), cluster.token(), cluster.token()

    stopped = etcd.stop_member(follower)
    resp, replied = one.revoke(first)
    admin_ok(cluster, resp, ("written", "queued"))
    assert one.statuses(first) == [401] * (4 * CONCURRENCY)
    assert_reached(cluster, watch(others, first, 401, replied), f"right after stopping {stopped.name}")

    for gate in cluster.gates:
        wait_for(lambda g=gate: g.etcd_hosts_healthy() == 2, CEILING_S, f"{gate.name}'s health check to mark {stopped.name} down")
    resp, replied = one.revoke(second)
    admin_ok(cluster, resp, "written")
    assert_reached(cluster, watch(others, second, 401, replied), f"{stopped.name} down, known to Envoy")
    resp, replied = one.undo(sha256(second))
    assert resp.status == 204, resp
    assert_reached(cluster, watch(others, second, 200, replied), f"undo with {stopped.name} down")

    etcd.start_member(follower)
    keys = etcd.get_prefix(PREFIX, member=stopped)
    assert f"{PREFIX}revoked/{sha256(first)}" in keys and f"{PREFIX}undone/{sha256(second)}" in keys, "caught up"
    for gate in cluster.gates:
        wait_for(lambda g=gate: g.etcd_hosts_healthy() == 3, CEILING_S, f"{gate.name} to see {stopped.name} back")

    leader = etcd.leader_index()
    stopped = etcd.stop_member(leader)
    resp, replied = one.revoke(third)
    admin_ok(cluster, resp, ("written", "queued"))
    delays = watch(others, third, 401, replied)
    assert_reached(cluster, delays, f"right after stopping the leader {stopped.name}")
    assert etcd.leader_index() not in (None, leader)


def test_cluster_sync_all_etcd_stopped_local_revocations_hold_and_propagation_resumes(cluster, restore_etcd):
    etcd = cluster.etcd
    one, *others = cluster.gates
    queued, earlier = cluster.token(), cluster.token()
    resp, replied = one.revoke(earlier)
    admin_ok(cluster, resp, "written")
    assert_reached(cluster, watch(others, earlier, 401, replied), "before the outage")

    etcd.stop()
    for gate in cluster.gates:
        wait_for(lambda g=gate: g.etcd_hosts_healthy() == 0, CEILING_S, f"{gate.name} to see etcd down")
    queued_before = one.metric("sync.queued")
    failures_before = {g.name: g.metric("sync.failures") for g in cluster.gates}

    # The Envoy that takes them applies them at once, and says they wait for etcd.
    resp, _ = one.revoke(queued)
    admin_ok(cluster, resp, "queued")
    resp, _ = one.undo(sha256(earlier))
    assert resp.status == 204, resp
    assert one.metric("sync.queued") == queued_before + 2
    assert one.statuses(queued) == [401] * (4 * CONCURRENCY)
    assert one.statuses(earlier) == [200] * (4 * CONCURRENCY)
    # Once every poller has met etcd down, the others still keep what they had: no fail-open
    # without etcd, and nothing learnt but through it.
    for gate in cluster.gates:
        wait_for(lambda g=gate: g.metric("sync.failures") > failures_before[g.name], CEILING_S,
                 f"{gate.name}'s poller to notice etcd down")
    for gate in others:
        assert gate.statuses(queued) == [200] * (4 * CONCURRENCY), f"{gate.name} learnt it without etcd?"
        assert gate.statuses(earlier) == [401] * (4 * CONCURRENCY), f"{gate.name} dropped a revocation"

    etcd.start()
    back = time.monotonic()
    revoked = watch(others, queued, 401, back)
    undone = watch(others, earlier, 200, back)
    # From every member answering /health: Envoy's health check (200 ms) lets calls through
    # again, the leader flushes the outbox at its next tick, the others poll.
    assert_reached(cluster, revoked, "queued revocation → 401 on 2 and 3 after etcd is back")
    assert_reached(cluster, undone, "queued undo → 200 on 2 and 3 after etcd is back")
    keys = etcd.get_prefix(PREFIX)
    assert f"{PREFIX}revoked/{sha256(queued)}" in keys
    assert f"{PREFIX}undone/{sha256(earlier)}" in keys and f"{PREFIX}revoked/{sha256(earlier)}" not in keys


def test_cluster_sync_revocation_reaches_etcd_when_the_admin_client_leaves_mid_write(cluster, restore_etcd):
    """etcd hangs (every member SIGSTOPped: connections accepted, nothing answered) and the
    operator's client gives up after 0.5 s, while Envoy 1 still waits for etcd. Envoy
    cancels the etcd write with the admin stream; the revocation, already applied on
    Envoy 1, goes to its outbox instead (`sync.queued` + 1), so once etcd answers again
    the poller writes it and Envoys 2 and 3 deny the token. Before the fix the write died
    with the stream: nothing reached etcd or the outbox, and 2 and 3 kept serving it."""
    one, *others = cluster.gates
    token = cluster.token()
    queued_before = one.metric("sync.queued")

    cluster.etcd.pause()
    with pytest.raises(TimeoutError):
        one.revoke(token, timeout=0.5)
    assert one.statuses(token) == [401] * (4 * CONCURRENCY), "revoked locally before etcd was asked"
    assert sha256(token) in one.listed()
    wait_for(lambda: one.metric("sync.queued") != queued_before, CEILING_S, "the abandoned write to be queued")
    assert one.metric("sync.queued") == queued_before + 1, cluster.evidence()
    assert "cluster sync: the admin client left before etcd answered, 1 change(s) queued" in one.envoy.log_text()
    assert_passes_everywhere(cluster, others, token, "etcd hangs: the others cannot know yet")

    cluster.etcd.resume()
    back = time.monotonic()  # every member answers /health again
    key = f"{PREFIX}revoked/{sha256(token)}"
    # The others can only learn it from etcd, so watching from once it is there misses nothing.
    wait_for(lambda: key in cluster.etcd.get_prefix(PREFIX), 30, f"{key} in etcd\n{cluster.evidence()}")
    written = time.monotonic() - back
    delays = watch(others, token, 401, back, limit=30.0)
    shown = {name: (None if d is None else round(d, 3)) for name, d in delays.items()}
    print(f"\nabandoned revocation on envoy 1 → 401 on 2 and 3, from etcd answering again: {shown}"
          f" (in etcd after {written:.3f}s)")
    assert None not in delays.values(), f"{shown}\n{cluster.evidence()}"
    assert_revoked_everywhere(cluster, others, token, "after etcd answered again")
    assert cluster.etcd.get_prefix(PREFIX)[key]["id"] == sha256(token)
    wait_for(lambda: one.metric("sync.outbox") == 0, CEILING_S, "envoy 1's outbox to drain")
    assert one.metric("sync.queued") == queued_before + 1


def test_cluster_sync_bulk_revoke_naming_a_token_twice_is_written_to_etcd(cluster):
    """The same token twice in one bulk revoke still reaches etcd: two changes of one key
    in one etcd transaction are refused ("duplicate key given in txn request"), and a
    refused batch would be queued and retried for ever (see the last test)."""
    one, *others = cluster.gates
    token = cluster.token()
    resp, replied = one.revoke_json({"tokens": [token, token]})
    admin_ok(cluster, resp, "written")
    assert_reached(cluster, watch(others, token, 401, replied), "duplicated bulk entry → 2 and 3")


# --------------------------------------------------------------------------- Envoy restarts


def revoke_then_kill(cluster, writer, victim, before, while_down):
    """`writer` revokes each token of `before`, each seen revoked by `victim` within the
    bound; then `victim` is SIGKILLed (its shared data dies with it) and `writer` revokes
    `while_down`."""
    for token in before:
        resp, replied = writer.revoke(token)
        admin_ok(cluster, resp, "written")
        assert_reached(cluster, watch([victim], token, 401, replied), "before the kill")

    victim.envoy.kill()
    resp, _ = writer.revoke(while_down)
    admin_ok(cluster, resp, "written")


@pytest.fixture
def restore_envoys(cluster):
    """An Envoy a test killed runs again afterwards, even if the test failed."""
    yield
    for gate in cluster.gates:
        if not gate.envoy.alive():
            gate.envoy.start(timeout=60)
            wait_for(lambda g=gate: g.etcd_hosts_healthy() == 3, CEILING_S, f"{gate.name} to see 3 healthy members")


def test_cluster_sync_killed_envoy_restarts_with_every_revocation(cluster, restore_envoys):
    """SIGKILL Envoy 3 (its shared data dies with it); meanwhile Envoy 1 revokes a token
    and a client and undoes an earlier revocation. Restarted, Envoy 3 loads the whole
    set from etcd within the bound (after the bulk test, over 1000 keys: two range pages)."""
    one, two, three = cluster.gates
    before, undone_later = cluster.token(), cluster.token()
    client = unique("client")
    while_down, clients_token = cluster.token(), cluster.token(client_id=client)
    revoke_then_kill(cluster, one, three, (before, undone_later), while_down)
    resp, _ = one.revoke_json({"client_id": client, "reason": "while envoy 3 was down"})
    admin_ok(cluster, resp, "written")
    resp, _ = one.undo(sha256(undone_later))
    assert resp.status == 204, resp

    three.envoy.start(timeout=60)
    ready = time.monotonic()
    for token in (before, while_down, clients_token):
        assert_reached(cluster, watch([three], token, 401, ready), "restarted envoy 3 → 401")
    assert_reached(cluster, watch([three], undone_later, 200, ready), "restarted envoy 3 → 200 (undone)")
    assert_revoked_everywhere(cluster, [three], before, "revoked before the kill")
    assert_revoked_everywhere(cluster, [three], while_down, "revoked while down")
    assert_revoked_everywhere(cluster, [three], clients_token, "client revoked while down")
    assert {sha256(before), sha256(while_down), f"client:{client}"} <= three.listed()
    assert sha256(undone_later) not in three.listed()
    assert three.metric("sync.applied") >= 3


def test_cluster_sync_restarted_envoy_never_serves_a_revoked_token(cluster, restore_envoys):
    """From its very first request, a restarted Envoy refuses what etcd says is revoked:
    503 while it loads (require_initial_sync), then 401 for good, never 200."""
    one, two, three = cluster.gates
    before, while_down = cluster.token(), cluster.token()
    revoke_then_kill(cluster, one, two, (before,), while_down)
    two.envoy.start(timeout=60)
    started = time.monotonic()
    seen = []

    def loaded():
        seen.append((round(time.monotonic() - started, 3), two.status(before), two.status(while_down)))
        return seen[-1][1:] == (401, 401)

    wait_for(loaded, CEILING_S, f"restarted {two.name} to refuse both tokens as revoked", interval=0)
    print(f"\nrestarted envoy 2, first answers (s since ready, revoked before, revoked while down): {seen[:6]}")
    answers = [a for _, *pair in seen for a in pair]
    assert set(answers) <= {401, 503}, f"restarted {two.name} answered {seen[:10]}\n{cluster.evidence()}"
    # Loading ends once: no 503 after the first 401.
    first_401 = answers.index(401)
    assert 503 not in answers[first_401:], f"503 after loading: {seen}"
    for _ in range(4 * CONCURRENCY):
        assert (two.status(before), two.status(while_down)) == (401, 401)


# --------------------------------------------------------------------------- the outbox, again


def test_cluster_sync_revoke_and_undo_of_one_token_while_etcd_is_down_do_not_block_the_outbox(
    cluster, restore_etcd
):
    """etcd down, an operator revokes a token, undoes it (a mistake), revokes another.
    Back, etcd must end up with the tombstone and the second revocation: the outbox sends
    one state per id (etcd refuses a transaction naming a key twice)."""
    one, two, three = cluster.gates
    mistake, meant = cluster.token(), cluster.token()
    cluster.etcd.stop()
    for gate in cluster.gates:
        wait_for(lambda g=gate: g.etcd_hosts_healthy() == 0, CEILING_S, f"{gate.name} to see etcd down")
    resp, _ = three.revoke(mistake)
    admin_ok(cluster, resp, "queued")
    resp, _ = three.undo(sha256(mistake))
    assert resp.status == 204, resp
    resp, _ = three.revoke(meant)
    admin_ok(cluster, resp, "queued")

    cluster.etcd.start()
    back = time.monotonic()
    assert_reached(cluster, watch([one, two], meant, 401, back), "queued after a revoke+undo → 1 and 2")
    keys = cluster.etcd.get_prefix(PREFIX)
    assert f"{PREFIX}undone/{sha256(mistake)}" in keys and f"{PREFIX}revoked/{sha256(mistake)}" not in keys
    assert one.status(mistake) == 200 and two.status(mistake) == 200


# --------------------------------------------------------------------------- configuration: prefix, max_outbox, require_initial_sync


OTHER_PREFIX = "other-tokengate/"


def test_cluster_sync_prefix_keys_land_under_it_and_other_prefixes_are_ignored(cluster, fresh):
    """An Envoy with another `prefix` beside the trio, on the same etcd: its writes land
    under its prefix only, and neither side applies the other's, though each has read etcd
    past the other's write (its sync.revision gauge says how far it read)."""
    config = cluster.idp.plugin_config(
        cluster_sync=cluster.etcd.sync_config(prefix=OTHER_PREFIX, poll_ms=POLL_MS, timeout_ms=TIMEOUT_MS),
    )
    other = Gate(fresh.envoy(cluster.idp, config, extra_clusters=[cluster.etcd.envoy_cluster()]), cluster.touched)
    wait_for(lambda: other.metric("sync.revision") > 0, CEILING_S, "the other prefix's first complete read")
    one = cluster.gates[0]
    ours, theirs = cluster.token(), cluster.token()
    assert other.status(ours) == 200 and other.status(theirs) == 200

    admin_ok(cluster, one.revoke(ours)[0], "written")
    admin_ok(cluster, other.revoke(theirs)[0], "written")
    keys = cluster.etcd.get_prefix(PREFIX)
    assert f"{PREFIX}revoked/{sha256(ours)}" in keys and f"{PREFIX}revoked/{sha256(theirs)}" not in keys
    keys = cluster.etcd.get_prefix(OTHER_PREFIX)
    assert set(keys) == {f"{OTHER_PREFIX}revoked/{sha256(theirs)}"}, keys

    written = cluster.etcd.revision()
    for gate in (one, other):
        wait_for(lambda g=gate: g.metric("sync.revision") >= written, CEILING_S, f"{gate.name} to read past both writes")
    assert other.statuses(ours) == [200] * (4 * CONCURRENCY), "another prefix's revocation was applied"
    assert one.statuses(theirs) == [200] * (4 * CONCURRENCY), "another prefix's revocation was applied"
    assert other.statuses(theirs) == [401] * (4 * CONCURRENCY)
    # The leader's gauges: the time since its last good poll is measured, nothing waits.
    wait_for(lambda: other.metric("sync.lag_ms") > 0, CEILING_S, "sync.lag_ms to be recorded")
    assert other.metric("sync.outbox") == 0


MAX_OUTBOX = 2
EAGER = "eager"  # a listener with require_initial_sync: false


@pytest.fixture(scope="module")
def unreachable(procs, workdir, mock_idp_server, upstream):
    """An Envoy (--concurrency 4) whose etcd cluster is a port nobody listens on: its first
    read never completes and every etcd write fails. `data` keeps require_initial_sync
    (true), listener `eager` sets it false; max_outbox is MAX_OUTBOX."""
    sync = {"cluster": "etcd", "authority": "etcd", "poll_ms": POLL_MS, "timeout_ms": TIMEOUT_MS, "max_outbox": MAX_OUTBOX}
    config = mock_idp_server.plugin_config(cluster_sync=sync)
    eager = Listener(EAGER, merge(config, {"cluster_sync": {"require_initial_sync": False}}))
    envoy = Envoy(
        procs, workdir, idp_port=mock_idp_server.port, upstream_port=upstream.port, plugin_config=config,
        extra_listeners=[eager], concurrency=conftest.CONCURRENCY, name="envoy-sync-unreachable",
        extra_clusters=[loopback_cluster("etcd", free_port())],
    ).start()
    yield Gate(envoy, [])
    envoy.stop()


def test_cluster_sync_before_the_first_read_503_denylist_loading_unless_require_initial_sync_is_false(
    unreachable, mock_idp_server
):
    gate, n = unreachable, 4 * conftest.CONCURRENCY
    token = mock_idp_server.issue_token(client_id=unique("app"), sub="user-1")
    loading = gate.metric("requests.denied.denylist_loading")
    for _ in range(n):
        resp = gate.envoy.get("/", bearer(token))
        assert resp.status == 503, resp
        body = resp.json()
        assert (body["error"], body["error_description"]) == (
            "temporarily_unavailable", "revocations are still loading from the cluster"), body
        assert resp.header_all("WWW-Authenticate") == [], resp.headers
    assert gate.metric("requests.denied.denylist_loading") == loading + n
    assert [gate.envoy.get("/", bearer(token), listener=EAGER).status for _ in range(n)] == [200] * n
    assert gate.metric("requests.denied.denylist_loading") == loading + n
    assert gate.metric("sync.revision") == 0 and gate.metric("sync.lag_ms") == 0, "etcd was never read"


def test_cluster_sync_outbox_over_max_outbox_answers_partly_dropped_and_counts_sync_dropped(unreachable, mock_idp_server):
    gate, n = unreachable, 4 * conftest.CONCURRENCY
    tokens = [mock_idp_server.issue_token(client_id=unique("app"), sub="user-1") for _ in range(MAX_OUTBOX + 1)]
    dropped, queued = gate.metric("sync.dropped"), gate.metric("sync.queued")
    resp, _ = gate.revoke_json({"tokens": tokens})
    assert resp.status == 200, resp
    body = resp.json()
    assert (body["revoked"], body["cluster_sync"]) == (MAX_OUTBOX + 1, "partly_dropped"), body
    assert gate.metric("sync.dropped") == dropped + 1
    assert gate.metric("sync.queued") == queued, "a change that did not fit is dropped, not queued"
    wait_for(lambda: gate.metric("sync.outbox") == MAX_OUTBOX, CEILING_S, f"sync.outbox to show {MAX_OUTBOX}")
    # Full: the next change stays local only, and is still revoked here.
    late = mock_idp_server.issue_token(client_id=unique("app"), sub="user-1")
    resp, _ = gate.revoke(late)
    assert (resp.status, resp.json()["cluster_sync"]) == (200, "partly_dropped"), resp
    assert gate.metric("sync.dropped") == dropped + 2
    for token in tokens + [late]:
        assert [gate.envoy.get("/", bearer(token), listener=EAGER).status for _ in range(n)] == [401] * n


def test_cluster_sync_gauges_exist_only_with_cluster_sync(unreachable, envoys, mock_idp_server):
    plain = envoys.get(mock_idp_server)
    for name in ("sync.lag_ms", "sync.revision", "sync.outbox"):
        unreachable.metric(name)
        with pytest.raises(KeyError):
            plain.metric(f"tokengate.{name}")


# --------------------------------------------------------------------------- etcd down at start

INITIAL_SYNC_TIMEOUT_S = 3


def test_cluster_sync_initial_sync_timeout_s_serves_after_its_bound_while_etcd_is_down_and_the_wait_is_a_gauge(
    procs, workdir, upstream, mock_idp
):
    """An Envoy starts while etcd is down: 503 `denylist_loading` (require_initial_sync)
    with `sync.initial_wait_ms` growing; past `initial_sync_timeout_s` it serves with what
    it knows, counted once in `sync.initial_sync_timeouts` and logged; once etcd is back
    and read, the gauge is 0."""
    etcd = Etcd(procs, workdir, members=1, name="etcd-late")
    sync = etcd.sync_config(poll_ms=POLL_MS, timeout_ms=TIMEOUT_MS, initial_sync_timeout_s=INITIAL_SYNC_TIMEOUT_S)
    envoy = Envoy(
        procs,
        workdir,
        idp_port=mock_idp.port,
        upstream_port=upstream.port,
        plugin_config=mock_idp.plugin_config(cluster_sync=sync),
        name="envoy-etcd-late",
        extra_clusters=[etcd.envoy_cluster()],
    ).start()
    try:
        token = f"late-{secrets.token_hex(8)}"
        mock_idp.register_active(token)
        resp = envoy.get("/", bearer(token))
        assert (resp.status, resp.json()["error"]) == (503, "temporarily_unavailable"), resp
        assert envoy.metric("tokengate.requests.denied.denylist_loading") >= 1
        wait_for(lambda: envoy.metric("tokengate.sync.initial_wait_ms") > 0, CEILING_S, "the wait to show as a gauge")
        assert envoy.metric("tokengate.sync.initial_sync_timeouts") == 0

        wait_for(lambda: envoy.get("/", bearer(token)).status == 200, CEILING_S, "the bound to pass")
        assert envoy.metric("tokengate.sync.initial_sync_timeouts") == 1
        assert "serving with the revocations known so far" in envoy.log_text()
        assert envoy.metric("tokengate.sync.initial_wait_ms") >= INITIAL_SYNC_TIMEOUT_S * 1000, "not loaded yet"
        statuses = [envoy.get("/", bearer(token)).status for _ in range(4 * 4)]
        assert statuses == [200] * 16, "every worker serves"

        etcd.start()
        wait_for(lambda: envoy.metric("tokengate.sync.initial_wait_ms") == 0, CEILING_S, "the first read once etcd is up")
        assert envoy.metric("tokengate.sync.initial_sync_timeouts") == 1
    finally:
        envoy.stop()
        etcd.stop()
