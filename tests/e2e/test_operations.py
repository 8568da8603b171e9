"""Operating tokengate: what happens around the filter when a platform team runs it.

- an admin token is rotated without a flag day (several hashes accepted at once);
- a crashed VM comes back under failure_policy FAIL_RELOAD, forgetting its own state
  and keeping the shared data (tests/e2e/panic_canary);
- introspection over TLS through the shipped envoy/tls/idp-cluster.yaml, against an
  IdP whose certificate a CA made at test time signed; another CA fails closed;
- cluster sync through the shipped envoy/tls/etcd-cluster.yaml to an etcd that takes
  only clients with a certificate its CA signed; without one, nothing is written;
- a module upgrade pushed over LDS into one running Envoy under load: the new
  module (another shared-data format) never reads the old one's records, and a
  rollback finds the old records again.

Every Envoy runs with --concurrency 4 (CONCURRENCY).
"""
import hashlib
import http.client
import secrets
import threading

import pytest

from conftest import CONCURRENCY
from harness import LOOPBACK, REPO, Envoy, bearer, get, merge, request, wait_until
from ops_harness import (
    CURRENT_WASM,
    SHIPPED_ETCD_TLS_CLUSTER,
    ClusterEnvoy,
    LdsEnvoy,
    TlsEtcd,
    TlsMockIdp,
    build_module_at,
    build_panic_canary,
    issue_cert,
    make_ca,
    shipped_tls_cluster,
)

ADMIN_PREFIX = "/tokengate"
FORM = "application/x-www-form-urlencoded"
FAILURES_STATUS = "tokengate.introspection.failures.status"
IDP_UNAVAILABLE = "tokengate.requests.denied.idp_unavailable"
# The last commit whose module wrote unversioned shared-data keys (tokengate.deny.*, ...).
UNVERSIONED_FORMAT_COMMIT = "ea716502df6ed94f9262f1e43a6befe0c3571e39"


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


def admin_list(envoy, admin_token):
    return get(envoy.listener_port("tokengate_admin"), f"{ADMIN_PREFIX}/revocations", bearer(admin_token))


def admin_revoke(envoy, token, admin_token="admin-demo-token"):
    resp = request(
        envoy.listener_port("tokengate_admin"), f"{ADMIN_PREFIX}/revoke",
        {**bearer(admin_token), "content-type": FORM}, method="POST",
        body=f"token={token}".encode(),
    )
    assert resp.status == 200, resp
    return resp


# --------------------------------------------------------------------------- admin token rotation


def test_admin_token_rotation_accepts_old_and_new_until_the_old_hash_is_removed(fresh, mock_idp):
    old, new = "admin-old-" + secrets.token_hex(8), "admin-new-" + secrets.token_hex(8)
    base = mock_idp.plugin_config()

    def envoy_with(hashes):
        admin = merge(base, {"admin": {"path_prefix": ADMIN_PREFIX, "token_sha256": hashes}})
        return fresh.envoy(mock_idp, listener_configs={"tokengate_admin": admin})

    overlap = envoy_with([sha256(old), sha256(new)])
    assert admin_list(overlap, old).status == 200
    assert admin_list(overlap, new).status == 200
    refused = admin_list(overlap, "admin-other")
    assert (refused.status, refused.header("www-authenticate")) == (401, 'Bearer realm="tokengate-admin"')
    overlap.stop()

    after = envoy_with(sha256(new))
    assert admin_list(after, new).status == 200
    assert admin_list(after, old).status == 401


# --------------------------------------------------------------------------- a crashed VM


def test_crashed_vm_is_reloaded_as_shipped_forgetting_its_state_keeping_shared_data(
    procs, workdir, upstream, mock_idp
):
    """One keep-alive connection stays on one worker: before the panic its VM counts 1, 2;
    the panicking request and those during the reload back-off get 503, never a pass; then a
    new VM answers, its own count back at 1, the shared-data count going on at 3."""
    envoy = Envoy(
        procs, workdir, mock_idp.port, upstream.port, mock_idp.plugin_config(),
        wasm=str(build_panic_canary()), concurrency=CONCURRENCY, name="envoy-reload",
    ).start()  # the failure policy of envoy/envoy.yaml, as shipped
    conn = http.client.HTTPConnection(LOOPBACK, envoy.port, timeout=10)

    def send(headers=None):
        conn.request("GET", "/", headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("x-vm-requests"), resp.getheader("x-shared-requests")

    try:
        assert send() == (200, "1", "1")
        assert send() == (200, "2", "2")
        assert send({"x-panic": "1"}) == (503, None, None)
        seen = []

        def reloaded():
            seen.append(send())
            return seen[-1][0] == 200

        wait_until(reloaded, 20, interval=0.2, what="a new VM on the crashed worker")
        assert {status for status, _, _ in seen[:-1]} <= {503}, seen
        assert seen[-1] == (200, "1", "3"), "the new VM starts afresh; shared data is kept"
        assert send() == (200, "2", "4")
    finally:
        conn.close()
        envoy.stop()


# --------------------------------------------------------------------------- introspection over TLS


IDP_NAME = "idp.test"


@pytest.fixture(scope="module")
def tls_setup(procs, workdir):
    pki = workdir / "pki"
    ca = make_ca(pki, "test-ca")
    other_ca = make_ca(pki, "other-ca")
    cert, key = issue_cert(pki, ca, IDP_NAME)
    idp = TlsMockIdp(procs, workdir, cert, key, IDP_NAME).start()
    yield idp, ca, other_ca
    idp.stop()


def tls_envoy(procs, workdir, upstream, idp, trusted_ca, name):
    return ClusterEnvoy(
        procs, workdir, idp.tls_port, upstream.port, idp.plugin_config(),
        concurrency=CONCURRENCY, name=name,
        clusters=[shipped_tls_cluster(idp.tls_port, trusted_ca, IDP_NAME)],
    ).start()


def test_introspection_over_tls_with_sni_and_the_ca_admits_a_valid_token(procs, workdir, upstream, tls_setup):
    idp, ca, _ = tls_setup
    envoy = tls_envoy(procs, workdir, upstream, idp, ca[0], "envoy-tls")
    try:
        token = idp.issue_token()
        resp = envoy.get("/tls", bearer(token))
        assert resp.status == 200, resp
        assert idp.calls_for(token) == 1
        assert envoy.counter("cluster.idp.ssl.handshake") >= 1
    finally:
        envoy.stop()


def test_idp_certificate_from_another_ca_fails_closed(procs, workdir, upstream, tls_setup):
    idp, _, other_ca = tls_setup
    envoy = tls_envoy(procs, workdir, upstream, idp, other_ca[0], "envoy-tls-wrong-ca")
    try:
        token = idp.issue_token()
        resp = envoy.get("/tls", bearer(token))
        assert resp.status == 503, resp
        assert resp.json()["error"] == "temporarily_unavailable"
        assert resp.header("www-authenticate") is None
        assert idp.calls_for(token) == 0, "nothing reached the IdP"
        assert envoy.counter("cluster.idp.ssl.fail_verify_error") >= 1
        assert envoy.metric(IDP_UNAVAILABLE) == 1
        assert envoy.metric(FAILURES_STATUS) == 1, "Envoy answers the callout with its own 503"
    finally:
        envoy.stop()


def test_idp_refusing_connections_is_counted_where_the_readme_says(fresh):
    """A refused connection comes back from Envoy as its own 503: `failures.status`, not
    `failures.transport` (README, "Metrics" and "The authorization server failing")."""
    idp = fresh.mock_idp()
    envoy = fresh.envoy(idp)
    idp.stop()
    resp = envoy.get("/", bearer("refused-" + secrets.token_hex(8)))
    assert resp.status == 503, resp
    assert resp.json()["error"] == "temporarily_unavailable"
    assert envoy.metric(FAILURES_STATUS) == 1
    assert envoy.metric("tokengate.introspection.failures.transport") == 0


# --------------------------------------------------------------------------- etcd over TLS


ETCD_NAME = "etcd.test"
SYNC_PREFIX = "tokengate/"


@pytest.fixture(scope="module")
def tls_etcd(procs, workdir):
    pki = workdir / "etcd-pki"
    ca = make_ca(pki, "etcd-ca")
    # etcd's JSON gateway dials its own gRPC port with the server certificate: it needs
    # clientAuth as well as serverAuth once --client-cert-auth is on.
    server = issue_cert(pki, ca, ETCD_NAME, usage="serverAuth,clientAuth", loopback=True)
    client = issue_cert(pki, ca, "tokengate-client", usage="clientAuth")
    etcd = TlsEtcd(procs, workdir, ca, server, client, ETCD_NAME).start()
    yield etcd, ca, client
    etcd.stop()


def etcd_tls_envoy(procs, workdir, upstream, idp, etcd, ca, client, name):
    port = etcd.members[0].client_port
    return Envoy(
        procs, workdir, idp.port, upstream.port,
        idp.plugin_config(cluster_sync={"cluster": "etcd", "authority": ETCD_NAME, "prefix": SYNC_PREFIX}),
        concurrency=CONCURRENCY, name=name,
        extra_clusters=[shipped_tls_cluster(port, ca[0], ETCD_NAME, path=SHIPPED_ETCD_TLS_CLUSTER, client=client)],
    ).start()


def test_cluster_sync_over_tls_with_a_client_certificate_writes_revocations(
    procs, workdir, upstream, mock_idp, tls_etcd
):
    etcd, ca, client = tls_etcd
    envoy = etcd_tls_envoy(procs, workdir, upstream, mock_idp, etcd, ca, client, "envoy-etcd-tls")
    try:
        token = mock_idp.issue_token()
        wait_until(lambda: envoy.get("/", bearer(token)).status == 200, 30, what="the first read of etcd")
        answer = admin_revoke(envoy, token).json()
        assert answer["cluster_sync"] == "written", answer
        (token_id,) = answer["ids"]
        assert f"{SYNC_PREFIX}revoked/{token_id}" in etcd.get_prefix(SYNC_PREFIX)
        assert envoy.get("/", bearer(token)).status == 401
        assert envoy.counter("cluster.etcd.ssl.handshake") >= 1
    finally:
        envoy.stop()


def test_cluster_sync_without_a_client_certificate_is_refused_by_etcd(
    procs, workdir, upstream, mock_idp, tls_etcd
):
    """The etcd cluster's TLS without a client certificate: etcd ends every handshake, so
    the first read never completes (503 denylist_loading) and nothing reaches etcd."""
    etcd, ca, _ = tls_etcd
    envoy = etcd_tls_envoy(procs, workdir, upstream, mock_idp, etcd, ca, None, "envoy-etcd-no-cert")
    try:
        wait_until(lambda: envoy.metric("tokengate.sync.failures") >= 1, 30, what="a failed etcd call")
        resp = envoy.get("/", bearer(mock_idp.issue_token()))
        assert resp.status == 503, resp
        assert resp.json()["error"] == "temporarily_unavailable"
        assert envoy.metric("tokengate.requests.denied.denylist_loading") == 1
        before = etcd.get_prefix(SYNC_PREFIX)
        token = mock_idp.issue_token()
        assert admin_revoke(envoy, token).json()["cluster_sync"] == "queued"
        assert etcd.get_prefix(SYNC_PREFIX) == before
    finally:
        envoy.stop()


# --------------------------------------------------------------------------- upgrades


class Load:
    """Requests with one token over new connections from a few threads until stopped."""

    def __init__(self, port, token, threads=4):
        self.port, self.headers = port, bearer(token)
        self.statuses, self.lock, self.stopping = [], threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        while not self.stopping.is_set():
            try:
                status = request(self.port, "/load", self.headers, timeout=10).status
            except OSError as err:
                status = f"error: {err}"
            with self.lock:
                self.statuses.append(status)

    def __enter__(self):
        for t in self.threads:
            t.start()
        wait_until(lambda: len(self.statuses) >= 20, 30, what="load to run")
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for t in self.threads:
            t.join(15)


def test_module_upgrade_over_lds_under_load_never_reads_the_old_format(procs, workdir, upstream, mock_idp):
    """One Envoy, listeners from a file; the module of the last unversioned format serves,
    then the current one is pushed while requests run, then the old one again (a rollback).
    No request fails on the way; each module reads only the records of its own format:
    a cached answer is asked for again and a revocation made by the other stays unseen."""
    old_wasm = build_module_at(UNVERSIONED_FORMAT_COMMIT, REPO / "target" / "upgrade-from")
    envoy = LdsEnvoy(
        procs, workdir, mock_idp.port, upstream.port, mock_idp.plugin_config(),
        wasm=str(old_wasm), concurrency=CONCURRENCY, name="envoy-upgrade",
    ).start()
    try:
        steady, revoked_before, revoked_after = (mock_idp.issue_token() for _ in range(3))
        for token in (steady, revoked_before, revoked_after):
            assert envoy.get("/", bearer(token)).status == 200
        admin_revoke(envoy, revoked_before)
        assert envoy.get("/", bearer(revoked_before)).status == 401
        assert mock_idp.calls_for(steady) == 1

        with Load(envoy.port, steady) as load:
            envoy.push(CURRENT_WASM)
            wait_until(lambda: mock_idp.calls_for(steady) >= 2, 30, what="the new module to ask for its own answer")
            # The old format's revocation is not the new format's record: it starts empty.
            assert envoy.get("/", bearer(revoked_before)).status == 200
            admin_revoke(envoy, revoked_after)
            assert envoy.get("/", bearer(revoked_after)).status == 401

            envoy.push(old_wasm)
            # The old module finds its own records again, and none of the new one's.
            wait_until(lambda: envoy.get("/", bearer(revoked_before)).status == 401, 30, what="the rollback")
            assert envoy.get("/", bearer(revoked_after)).status == 200
        assert mock_idp.calls_for(steady) == 2, "each module's cached answer served its requests"
        assert set(load.statuses) == {200}, sorted(set(map(str, load.statuses)))
    finally:
        envoy.stop()
