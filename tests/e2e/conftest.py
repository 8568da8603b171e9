"""Fixtures of the end-to-end suite: test servers, IdPs and Envoys.

  idp          parametrized over "mock" (tests/servers/mock_idp.py) and "oidc"
               (oidc-provider, tests/idp/server.mjs); session-scoped, uniform API:
               issue_token(scope, client_id, sub, ttl), introspect, revoke,
               introspection_path, port, authority, kind, plugin_config(**overrides)
  mock_idp     the session mock IdP, reset before and after the test (faults, records)
  jwt_idp      a session oidc-provider whose signing keys are `jwt_idp.signer`'s (a
               harness JwtIssuer of its issuer), so a test can sign what it cannot issue
  upstream     the echo upstream
  envoys       session cache (EnvoyCache): envoys.get(idp, plugin_config=None,
               extra_listeners=(), listener_configs=None, name=None) returns a running
               Envoy, shared by every test asking for the same setup
  envoy        envoys.get(idp) with envoy/tokengate.json pointed at idp
  fresh        function-scoped factory for processes a test may break or must see alone:
               fresh.mock_idp(), fresh.oidc_idp(default_ttl, keys_file), fresh.idp(kind), fresh.envoy(idp, ...)

Every Envoy runs with --concurrency 4 (CONCURRENCY).
"""
import json
import signal

import pytest

from harness import EchoUpstream, Envoy, JwtIssuer, MockIdp, OidcIdp, Processes

CONCURRENCY = 4


# SIGTERM (a CI timeout, `kill`) acts like Ctrl-C: pytest stops the session and runs
# every finalizer, so no server or Envoy outlives the run.
# SIGINT is set too: a shell that starts pytest in the background leaves it ignored.
signal.signal(signal.SIGTERM, signal.default_int_handler)
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def procs():
    processes = Processes()
    yield processes
    processes.stop_all()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    # Logs and generated Envoy configs; pytest keeps the last few runs for post-mortems.
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def upstream(procs, workdir):
    return EchoUpstream(procs, workdir)


@pytest.fixture(scope="session")
def mock_idp_server(procs, workdir):
    server = MockIdp(procs, workdir).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def oidc_idp_server(procs, workdir):
    server = OidcIdp(procs, workdir).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def jwt_idp(procs, workdir):
    server = OidcIdp(procs, workdir, keys_file=workdir / "jwt-idp-keys.json")
    server.signer = JwtIssuer(issuer=server.issuer)
    server.keys_file.write_text(json.dumps(server.signer.private_jwks()))
    yield server.start()
    server.stop()


@pytest.fixture(scope="session", params=["mock", "oidc"])
def idp(request):
    """The IdP behind Envoy; every test that uses it runs once per kind."""
    return request.getfixturevalue(f"{request.param}_idp_server")


@pytest.fixture
def mock_idp(mock_idp_server):
    """The mock IdP with its control API, clean for this test and after it."""
    mock_idp_server.reset()
    yield mock_idp_server
    mock_idp_server.reset()


class EnvoyCache:
    """Envoys kept running for reuse, one per (IdP, configuration): starting Envoy is cheap,
    but not free. The session's (`envoys`) sends to the echo upstream; a module may keep its
    own, with another upstream and name prefix, stopped when the module ends."""

    def __init__(self, procs, workdir, upstream, name="envoy"):
        self.procs, self.workdir, self.upstream, self.name = procs, workdir, upstream, name
        self._envoys = {}

    def get(self, idp, plugin_config=None, extra_listeners=(), listener_configs=None, name=None):
        """`listener_configs` as for harness.Envoy; `name` (default "<prefix>-<idp kind>")
        also tells apart Envoys that are otherwise configured alike."""
        config = plugin_config if plugin_config is not None else idp.plugin_config()
        key = (
            idp.kind,
            idp.port,
            json.dumps(config, sort_keys=True),
            tuple(x.name for x in extra_listeners),
            json.dumps(listener_configs, sort_keys=True),
            name,
        )
        envoy = self._envoys.get(key)
        if envoy is None or not envoy.alive():
            envoy = Envoy(
                self.procs,
                self.workdir,
                idp_port=idp.port,
                upstream_port=self.upstream.port,
                plugin_config=config,
                extra_listeners=extra_listeners,
                listener_configs=listener_configs,
                concurrency=CONCURRENCY,
                name=name or f"{self.name}-{idp.kind}",
            ).start()
            self._envoys[key] = envoy
        return envoy

    def stop_all(self):
        for envoy in self._envoys.values():
            envoy.stop()


@pytest.fixture(scope="session")
def envoys(procs, workdir, upstream):
    cache = EnvoyCache(procs, workdir, upstream)
    yield cache
    cache.stop_all()


@pytest.fixture
def envoy(envoys, idp):
    return envoys.get(idp)


class Fresh:
    """Processes owned by one test: it may stop them, and nobody else sees their state."""

    def __init__(self, procs, workdir, upstream):
        self.procs, self.workdir, self.upstream = procs, workdir, upstream
        self._owned = []

    def mock_idp(self):
        return self._own(MockIdp(self.procs, self.workdir).start())

    def oidc_idp(self, default_ttl=600, keys_file=None):
        return self._own(OidcIdp(self.procs, self.workdir, default_ttl, keys_file).start())

    def idp(self, kind):
        return self.mock_idp() if kind == "mock" else self.oidc_idp()

    def envoy(self, idp, plugin_config=None, extra_listeners=(), **kwargs):
        kwargs.setdefault("concurrency", CONCURRENCY)
        envoy = Envoy(
            self.procs,
            self.workdir,
            idp_port=idp.port,
            upstream_port=self.upstream.port,
            plugin_config=plugin_config if plugin_config is not None else idp.plugin_config(),
            extra_listeners=extra_listeners,
            name=f"envoy-fresh-{idp.kind}",
            **kwargs,
        )
        return self._own(envoy.start())

    def _own(self, thing):
        self._owned.append(thing)
        return thing

    def stop_all(self):
        for thing in reversed(self._owned):
            thing.stop()


@pytest.fixture
def fresh(procs, workdir, upstream):
    owned = Fresh(procs, workdir, upstream)
    yield owned
    owned.stop_all()
