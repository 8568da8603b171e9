"""The shipped deployment files, run in a real Envoy (--concurrency 4, free ports).

- envoy/istio/envoyfilter.yaml: its inbound filter and its admin listener, taken
  from the manifest as they are, in a bootstrap standing in for the sidecar's;
  introspection goes through a cluster with the exact `outbound|<port>||<host>`
  name the manifest's configuration names, pointing at the mock IdP.
- envoy/istio/wasmplugin.yaml: its pluginConfig, as JSON (as istiod hands it
  to the filter), in the same place.
- envoy/envoy.yaml: its admin listener (the harness keeps every template
  listener) revokes through a path Envoy normalises first.
- envoy/compose/listen_all.py: the demo servers start under it, as
  docker-compose.yaml runs them (tests/compose runs the whole compose file).

tests/deploy checks the same files offline (schemas, `envoy --mode validate`).
"""
import json
import os
import signal
import socket
import sys
import urllib.parse

import pytest
import yaml

from conftest import CONCURRENCY
from harness import REPO, SERVERS, Envoy, bearer, burst, free_port, get, post_form, request, wait_for_port

sys.path.insert(0, str(REPO / "tests" / "deploy"))
import shipped  # noqa: E402  (tests/deploy/shipped.py: reads the files in envoy/)

DEMO_ADMIN_TOKEN = "admin-demo-token"


class SidecarEnvoy(Envoy):
    """A harness Envoy whose bootstrap is built from the Istio manifests, not envoy.yaml."""

    def __init__(self, procs, workdir, idp_port, upstream_port, plugin_config=None, **kwargs):
        super().__init__(procs, workdir, idp_port, upstream_port, plugin_config, **kwargs)
        # "data" is the harness's name for the listener requests go to: here the inbound one.
        self.ports = {"data": free_port(), "tokengate_admin": free_port()}
        self.port = self.ports["data"]
        self.config_path = self.workdir / f"{self.name}-{self.port}.yaml"

    def bootstrap(self):
        config = shipped.istio_bootstrap(
            module=self.wasm,
            inbound_port=self.ports["data"],
            admin_port=self.ports["tokengate_admin"],
            envoy_admin_port=self.admin_port,
            idp_port=self.idp_port,
            app_port=self.upstream_port,
        )
        if self.plugin_config is not None:
            # The WasmPlugin case: the same filter, fed the pluginConfig instead.
            inbound = shipped.listener_named(config, "virtualInbound")
            (wasm_filter,) = shipped.wasm_filters(inbound)
            wasm_filter["typed_config"]["config"]["configuration"]["value"] = json.dumps(self.plugin_config)
        return config


@pytest.fixture
def sidecar(procs, workdir, mock_idp, upstream):
    started = []

    def start(plugin_config=None):
        envoy = SidecarEnvoy(
            procs, workdir, mock_idp.port, upstream.port, plugin_config, concurrency=CONCURRENCY, name="envoy-istio"
        )
        started.append(envoy.start())
        return envoy

    yield start
    for envoy in started:
        envoy.stop()


def revoke(port, token, path="/tokengate/revoke"):
    body = urllib.parse.urlencode({"token": token}).encode()
    headers = {**bearer(DEMO_ADMIN_TOKEN), "Content-Type": "application/x-www-form-urlencoded"}
    return request(port, path, headers, "POST", body)


@pytest.mark.parametrize("source", ["envoyfilter", "wasmplugin"])
def test_istio_configuration_validates_tokens_through_the_mesh_cluster(sidecar, mock_idp, source):
    cluster = shipped.istio_introspection_cluster()
    assert cluster.startswith("outbound|")
    plugin_config = shipped.wasmplugin()["spec"]["pluginConfig"] if source == "wasmplugin" else None
    envoy = sidecar(plugin_config)

    assert envoy.get("/get").status == 401
    token = mock_idp.issue_token(scope="read", client_id="app-a", sub="user-1")
    resp = envoy.get("/get", bearer(token))
    assert resp.status == 200, resp
    headers = resp.json()["headers"]
    assert (headers["x-auth-subject"], headers["x-auth-client-id"], headers["x-auth-scope"]) == ("user-1", "app-a", "read")

    # The callout left through the mesh cluster, with the mesh service as its authority.
    calls = mock_idp.introspections()
    assert calls["tokens"] == [token]
    last = {k.lower(): v for k, v in calls["last_headers"].items()}
    assert last["host"] == shipped.variants()["istio"]["introspection"]["authority"]
    assert envoy.counter(f"cluster.{cluster}.upstream_rq_total") >= 1

    # Every worker answers from the shared cache: one introspection for the whole burst.
    statuses = burst(envoy.port, n=200, connections=16, headers=bearer(token), path="/get")
    assert statuses == [200] * 200
    assert mock_idp.calls_for(token) == 1
    assert envoy.metric_at_least("tokengate.requests.allowed", 201) >= 201


def test_istio_admin_listener_revokes_for_every_worker(sidecar, mock_idp):
    envoy = sidecar()
    token = mock_idp.issue_token(scope="read")
    assert envoy.get("/get", bearer(token)).status == 200
    admin_port = envoy.listener_port("tokengate_admin")
    assert request(admin_port, "/tokengate/revoke", method="POST", body=b"token=x").status == 401
    resp = revoke(admin_port, token)
    assert resp.status == 200, resp
    statuses = burst(envoy.port, n=100, connections=16, headers=bearer(token), path="/get")
    assert statuses == [401] * 100
    assert envoy.get("/get").status == 401  # and nothing else changed


def test_reference_admin_listener_normalises_paths_before_the_filter(envoys, mock_idp_server):
    envoy = envoys.get(mock_idp_server)
    assert "tokengate_admin" in envoy.ports, "envoy/envoy.yaml ships the admin listener"
    token = mock_idp_server.issue_token(scope="read")
    assert envoy.get("/", bearer(token)).status == 200
    admin_port = envoy.listener_port("tokengate_admin")
    # The filter refuses a non-canonical admin path (400); merge_slashes and
    # normalize_path on the shipped listener make this one canonical first.
    resp = revoke(admin_port, token, path="//tokengate/./revoke")
    assert resp.status == 200, resp
    assert envoy.get("/", bearer(token)).status == 401
    # Outside the admin routes the filter answers 404 itself, without
    # checking (and so without introspecting) the request's token.
    other = mock_idp_server.issue_token(scope="read")
    assert request(admin_port, "/elsewhere", bearer(other)).status == 404


def test_custom_metrics_are_where_the_readme_says(envoys, mock_idp_server):
    envoy = envoys.get(mock_idp_server)
    envoy.get("/")  # at least one counted request (401)
    stats = envoy.stats()
    assert "wasmcustom.tokengate.requests.denied.missing_token" in stats
    prometheus = envoy.admin("/stats/prometheus").body.decode()
    assert "tokengate_requests_denied_missing_token" in prometheus
    readme = (REPO / "README.md").read_text()
    assert "`wasmcustom.tokengate.<name>`" in readme and "`tokengate_<name with _ for .>`" in readme


def test_compose_bootstrap_runs_with_local_addresses(procs, workdir, mock_idp_server, upstream):
    """envoy/compose/envoy.yaml, with the container's names and paths mapped to this machine."""
    bootstrap = yaml.safe_load(shipped.COMPOSE_BOOTSTRAP.read_text())

    class ComposeEnvoy(Envoy):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.template = bootstrap
            for listener in bootstrap["static_resources"]["listeners"]:
                listener["address"]["socket_address"]["address"] = "127.0.0.1"
            bootstrap["admin"]["address"]["socket_address"]["address"] = "127.0.0.1"
            for cluster in bootstrap["static_resources"]["clusters"]:
                cluster["type"] = "STATIC"
                cluster.pop("dns_lookup_family", None)
                for group in cluster["load_assignment"]["endpoints"]:
                    for endpoint in group["lb_endpoints"]:
                        endpoint["endpoint"]["address"]["socket_address"]["address"] = "127.0.0.1"
            self.ports = {x["name"]: free_port() for x in bootstrap["static_resources"]["listeners"]}
            self.port = self.ports["data"]
            self.config_path = self.workdir / f"{self.name}-{self.port}.yaml"

    config = mock_idp_server.plugin_config()
    envoy = ComposeEnvoy(procs, workdir, mock_idp_server.port, upstream.port, config,
                         concurrency=CONCURRENCY, name="envoy-compose").start()
    try:
        token = mock_idp_server.issue_token(scope="read")
        assert envoy.get("/", bearer(token)).status == 200
        assert envoy.get("/").status == 401
    finally:
        envoy.stop()


LISTEN_ALL = REPO / "envoy" / "compose" / "listen_all.py"


@pytest.mark.parametrize(
    "script, probe, answer",
    [
        (
            "mock_idp.py",
            lambda port: post_form(port, "/oauth2/token", {"client_id": "demo", "scope": "read"}),
            {"token_type": "Bearer", "scope": "read", "expires_in": 3600},
        ),
        ("echo_upstream.py", lambda port: get(port, "/hello"), {"method": "GET", "path": "/hello", "body": ""}),
    ],
    ids=["idp", "upstream"],
)
def test_compose_servers_run_under_listen_all(procs, workdir, script, probe, answer):
    """docker-compose.yaml starts each demo server as `listen_all.py <script> --port N`."""
    port = free_port()
    proc = procs.start(
        f"listen-all-{script}",
        [sys.executable, LISTEN_ALL, SERVERS / script, "--port", port],
        workdir / f"listen-all-{script}-{port}.log",
    )
    wait_for_port(proc, port)
    resp = probe(port)
    assert resp.status == 200, resp
    assert {k: v for k, v in resp.json().items() if k in answer} == answer
    # Every interface, not just 127.0.0.1: Envoy comes from another container.
    # (127.0.0.2 is loopback too, but a socket bound to 127.0.0.1 does not answer it.)
    socket.create_connection(("127.0.0.2", port), timeout=5).close()
    # What `docker stop` and `compose down` send the container's PID 1: a clean stop, not a kill.
    os.kill(proc.popen.pid, signal.SIGTERM)
    assert proc.popen.wait(30) == 0, proc.log_tail()
