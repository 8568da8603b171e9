"""End-to-end harness: processes, the test servers, Envoy, and HTTP helpers.

Everything binds 127.0.0.1 on free ports. Every process is started in its own
process group and killed on teardown, at interpreter exit, on SIGTERM or Ctrl-C
(see conftest.py), and by the kernel if the test runner itself is SIGKILLed.
"""
import atexit
import base64
import copy
import ctypes
import http.client
import itertools
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SERVERS = REPO / "tests" / "servers"
IDP_DIR = REPO / "tests" / "idp"
ENVOY_TEMPLATE = REPO / "envoy" / "envoy.yaml"
PLUGIN_CONFIG = REPO / "envoy" / "tokengate.json"
LOOPBACK = "127.0.0.1"
GATEWAY_CLIENT = ("gateway", "gateway-secret")


# --------------------------------------------------------------------------- waiting


def wait_until(predicate, timeout, interval=0.05, what="condition"):
    """Poll predicate until it returns a truthy value; raise TimeoutError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


_handed_out = set()
_ports_lock = threading.Lock()


def free_port():
    """A loopback port nothing listens on now (and that this run has not handed out)."""
    with _ports_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((LOOPBACK, 0))
                port = s.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def port_accepts(port, timeout=0.2):
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- processes


PR_SET_PDEATHSIG = 1


def _die_with_parent():
    # Runs in the child before exec: even a SIGKILLed pytest takes its servers with it.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    on_stop: list = field(default_factory=list)  # cleanups to run once the group is dead

    def alive(self):
        return self.popen.poll() is None

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=40):
        return "\n".join(self.log_text().splitlines()[-lines:])


class Processes:
    """Starts processes in their own process groups and guarantees they die with the run."""

    def __init__(self):
        self._procs = []
        self._lock = threading.Lock()
        atexit.register(self.stop_all)

    def start(self, name, argv, log_path, env=None, cwd=None):
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,  # its own process group: killpg reaches its children too
                preexec_fn=_die_with_parent,
            )
        proc = Proc(name, popen, log_path)
        with self._lock:
            self._procs.append(proc)
        return proc

    def stop(self, proc, grace=5.0):
        if proc.alive():
            self._signal(proc, signal.SIGTERM)
            try:
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.popen.wait(grace)
        # The group may hold children that outlived the leader.
        self._signal(proc, signal.SIGKILL)
        for cleanup in proc.on_stop:
            cleanup()
        proc.on_stop.clear()
        with self._lock:
            if proc in self._procs:
                self._procs.remove(proc)

    def stop_all(self):
        with self._lock:
            procs = list(self._procs)
        for proc in reversed(procs):
            self.stop(proc)

    @staticmethod
    def _signal(proc, sig):
        try:
            os.killpg(proc.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def wait_for_port(proc, port, timeout=15.0):
    """Wait until proc listens on port; fail with its log if it dies first."""

    def ready():
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        return port_accepts(port)

    wait_until(ready, timeout, what=f"{proc.name} to listen on {port}")


# --------------------------------------------------------------------------- HTTP helpers


@dataclass
class Response:
    status: int
    headers: list  # [(name, value)] in order; names as sent
    body: bytes
    elapsed: float = 0.0

    def header(self, name):
        """The value of a header (the first, if repeated), or None."""
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name):
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        # Short, and with bearer tokens masked: the echo upstream repeats the Authorization header.
        masked = re.sub(rb"(?i)(bearer +)[A-Za-z0-9._~+/=-]{12,}", rb"\1<token>", self.body[:300])
        return f"<Response {self.status} {masked!r}>"


def request(port, path="/", headers=None, method="GET", body=None, timeout=10.0):
    """One request on a new connection; returns a Response with all header values."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        started = time.monotonic()
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in _header_items(headers):
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.getheaders(), data, time.monotonic() - started)
    finally:
        conn.close()


def get(port, path="/", headers=None, timeout=10.0):
    return request(port, path, headers, "GET", None, timeout)


def _header_items(headers):
    if headers is None:
        return []
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers)  # a list of pairs allows repeated names


def bearer(token, scheme="Bearer"):
    return {"Authorization": f"{scheme} {token}"}


def burst(port, n=400, connections=32, headers=None, path="/", timeout=15.0):
    """n requests over `connections` keep-alive connections, all threads released at once.

    Returns the statuses (0 for a transport error) in completion order.
    """
    counter = itertools.count()
    statuses = []
    lock = threading.Lock()
    start = threading.Barrier(connections)
    items = _header_items(headers)

    def worker():
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
        start.wait()
        while next(counter) < n:
            try:
                conn.request("GET", path, headers=dict(items))
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if resp.will_close:
                    conn.close()
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()  # the next request reconnects
            with lock:
                statuses.append(status)
        conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 4)
    return statuses


def _basic(client_id, secret):
    # RFC 6749 2.3.1: form-encode each part, then base64 the pair.
    pair = f"{urllib.parse.quote_plus(client_id)}:{urllib.parse.quote_plus(secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def post_form(port, path, fields, auth=None, timeout=10.0):
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if auth:
        headers["Authorization"] = _basic(*auth)
    body = urllib.parse.urlencode(fields).encode()
    return request(port, path, headers, "POST", body, timeout)


def post_json(port, path, obj, timeout=10.0):
    body = json.dumps(obj).encode()
    return request(port, path, {"Content-Type": "application/json"}, "POST", body, timeout)


# --------------------------------------------------------------------------- test servers


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

    def __init__(self, procs, workdir, default_ttl=600):
        super().__init__(procs, workdir)
        self.default_ttl = default_ttl

    def _spawn(self):
        modules = IDP_DIR / "node_modules" / "oidc-provider"
        if not modules.is_dir():
            raise RuntimeError("oidc-provider is not installed: run `make idp`")
        env = dict(os.environ, IDP_CC_TTL_S=str(self.default_ttl), NODE_ENV="test")
        return self.procs.start(
            "oidc-provider",
            ["node", IDP_DIR / "server.mjs", self.port],
            self.workdir / f"oidc-provider-{self.port}.log",
            env=env,
            cwd=IDP_DIR,
        )

    def issue_token(self, scope="read", client_id=None, sub=None, ttl=None):
        """A client-credentials token. client_id picks a registered client able to hold scope."""
        if sub is not None:
            raise ValueError("oidc-provider's client-credentials tokens have no sub; use the mock IdP")
        client_id = client_id or self._client_for(scope)
        fields = {"grant_type": "client_credentials"}
        if scope:
            fields["scope"] = scope
        if ttl is not None:
            fields["expires_in"] = str(ttl)  # honoured by server.mjs's TTL function, test-only
        resp = post_form(self.port, "/token", fields, auth=(client_id, f"{client_id}-secret"))
        assert resp.status == 200, resp
        return resp.json()["access_token"]

    def _client_for(self, scope):
        wanted = set((scope or "").split())
        for client, allowed in self.CLIENT_SCOPES.items():
            if wanted <= set(allowed.split()):
                return client
        raise ValueError(f"no oidc client may hold scope {scope!r}")


def merge(base, overrides):
    """Deep-merge dicts (overrides win); other values are replaced."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------- Envoy


@dataclass
class Listener:
    """A listener added beside the template's: a copy of `data` with its own port and
    plugin configuration. The copy keeps the data listener's vm_id, so the two share
    the VM's shared data (cache, denylist).
    """

    name: str
    plugin_config: dict
    port: int = field(default_factory=free_port)


class Envoy:
    """One Envoy, configured from envoy/envoy.yaml (the shipped template) with test ports.

    Every listener of the template is kept, each on a free port (`listener_port(name)`).
    `data` gets `plugin_config`. Another template listener (e.g. `tokengate_admin`) gets
    `listener_configs[name]` if given, else `plugin_config` plus whatever the template's
    own configuration for it adds to envoy/tokengate.json (for the admin listener: its
    `admin` section), so the test's IdP settings reach every filter. `extra_clusters`
    (Envoy cluster dicts, e.g. `Etcd.envoy_cluster()`) are added beside the template's.
    `failure_policy` (FAIL_CLOSED, FAIL_OPEN, FAIL_RELOAD) replaces the template's.
    """

    _base_ids = itertools.count(random.randint(1, 10_000) * 1000)

    def __init__(
        self,
        procs,
        workdir,
        idp_port,
        upstream_port,
        plugin_config,
        extra_listeners=(),
        listener_configs=None,
        concurrency=4,
        log_level="info",
        component_log_level=None,
        wasm=None,
        vm_host_env=None,
        with_filter=True,
        name="envoy",
        extra_clusters=(),
        failure_policy=None,
    ):
        self.procs = procs
        self.workdir = Path(workdir)
        self.idp_port = idp_port
        self.upstream_port = upstream_port
        self.plugin_config = plugin_config
        self.extra_listeners = list(extra_listeners)
        self.listener_configs = dict(listener_configs or {})
        self.concurrency = concurrency
        self.log_level = log_level
        self.component_log_level = component_log_level
        # Variables of Envoy's own environment that the wasm VMs may read (host_env_keys).
        self.vm_host_env = dict(vm_host_env or {})
        self.wasm = wasm or os.environ.get("TOKENGATE_WASM") or str(REPO / "target/tokengate.wasm")
        self.with_filter = with_filter
        self.name = name
        self.extra_clusters = [copy.deepcopy(c) for c in extra_clusters]
        self.failure_policy = failure_policy
        self.template = yaml.safe_load(ENVOY_TEMPLATE.read_text())
        self.ports = {x["name"]: free_port() for x in self.template["static_resources"]["listeners"]}
        self.ports.update({x.name: x.port for x in self.extra_listeners})
        self.port = self.ports["data"]
        self.admin_port = free_port()
        self.proc = None
        self.base_id = next(self._base_ids)
        self.config_path = self.workdir / f"{name}-{self.port}.yaml"

    # ----- configuration -----

    def bootstrap(self):
        """The template with test ports, the test wasm path and the test plugin configurations."""
        config = copy.deepcopy(self.template)
        _set_port(config["admin"]["address"], self.admin_port)
        listeners = config["static_resources"]["listeners"]
        data_template = copy.deepcopy(_named(listeners, "data"))
        for listener in listeners:
            _set_port(listener["address"], self.ports[listener["name"]])
            self._configure_filters(listener, self._plugin_config_for(listener))
        for extra in self.extra_listeners:
            listener = copy.deepcopy(data_template)
            listener["name"] = extra.name
            _set_port(listener["address"], extra.port)
            _http_manager(listener)["stat_prefix"] = extra.name
            self._configure_filters(listener, extra.plugin_config)
            listeners.append(listener)
        clusters = config["static_resources"]["clusters"]
        _set_cluster_port(_named(clusters, "idp"), self.idp_port)
        _set_cluster_port(_named(clusters, "upstream"), self.upstream_port)
        clusters.extend(copy.deepcopy(c) for c in self.extra_clusters)
        return config

    def _plugin_config_for(self, listener):
        name = listener["name"]
        if name == "data":
            return self.plugin_config
        if name in self.listener_configs:
            return self.listener_configs[name]
        shipped = json.loads(PLUGIN_CONFIG.read_text())
        own = [json.loads(p["configuration"]["value"]) for p in _wasm_plugins(listener)]
        additions = deep_diff(shipped, own[0]) if own else {}
        return merge(self.plugin_config, additions)

    def _configure_filters(self, listener, plugin_config):
        manager = _http_manager(listener)
        plugins = list(_wasm_plugins(listener))
        assert plugins, f"listener {listener['name']} has no wasm filter in {ENVOY_TEMPLATE}"
        if not self.with_filter:
            manager["http_filters"] = [
                f for f in manager["http_filters"] if not f["typed_config"]["@type"].endswith(".Wasm")
            ]
            return
        for plugin in plugins:
            plugin["vm_config"]["code"]["local"]["filename"] = self.wasm
            if self.vm_host_env:
                plugin["vm_config"]["environment_variables"] = {"host_env_keys": sorted(self.vm_host_env)}
            plugin["configuration"]["value"] = json.dumps(plugin_config, indent=2)
            if self.failure_policy:
                plugin["failure_policy"] = self.failure_policy

    # ----- lifecycle -----

    def start(self, timeout=30.0):
        self.launch()
        return self.wait_ready(timeout)

    def launch(self):
        """Start the process without waiting: launch several, then `wait_ready()` each.
        Call it from a thread that outlives the Envoy (the main thread): the process dies
        with the thread that started it (PR_SET_PDEATHSIG)."""
        if self.with_filter and not Path(self.wasm).is_file():
            raise RuntimeError(f"the wasm module is missing: {self.wasm} (run `make build`)")
        self.config_path.write_text(yaml.safe_dump(self.bootstrap(), sort_keys=False))
        argv = [
            os.environ.get("ENVOY_BIN") or REPO / ".deps/envoy/envoy/_bin/envoy",
            "-c", self.config_path,
            "--concurrency", self.concurrency,
            "--base-id", self.base_id,
            "--log-level", self.log_level,
        ]
        if self.component_log_level:
            argv += ["--component-log-level", self.component_log_level]
        env = dict(os.environ, **self.vm_host_env) if self.vm_host_env else None
        self.proc = self.procs.start(self.name, argv, self.workdir / f"{self.name}-{self.port}.log", env=env)
        # Envoy leaves its hot-restart segment behind even on SIGTERM; it is ours to remove.
        shm = Path(f"/dev/shm/envoy_shared_memory_{self.base_id * 10}")
        self.proc.on_stop.append(lambda: shm.unlink(missing_ok=True))
        return self

    def wait_ready(self, timeout=30.0):
        """Wait until admin /ready says LIVE and every listener accepts; stop Envoy if not."""
        try:
            wait_until(self._live, timeout, what=f"{self.name} admin /ready to say LIVE")
            for port in self.ports.values():
                wait_until(lambda p=port: port_accepts(p), timeout, what=f"{self.name} listener {port}")
        except Exception:
            self.stop()
            raise
        return self

    def _live(self):
        if not self.proc.alive():
            raise RuntimeError(
                f"{self.name} exited with {self.proc.popen.returncode}:\n{self.proc.log_tail()}"
            )
        try:
            resp = get(self.admin_port, "/ready", timeout=1.0)
        except OSError:
            return False
        return resp.status == 200 and resp.body.strip() == b"LIVE"

    def stop(self):
        if self.proc:
            self.procs.stop(self.proc)

    def kill(self):
        """SIGKILL, as a crash would: no drain, no clean-up by Envoy itself."""
        if self.proc:
            Processes._signal(self.proc, signal.SIGKILL)
            self.proc.popen.wait(10)
            self.procs.stop(self.proc)

    def alive(self):
        return self.proc is not None and self.proc.alive()

    # ----- observing -----

    def url(self, path="/", listener=None):
        port = self.listener_port(listener)
        return f"http://{LOOPBACK}:{port}{path}"

    def listener_port(self, listener=None):
        return self.ports[listener or "data"]

    def get(self, path="/", headers=None, listener=None, timeout=10.0):
        return get(self.listener_port(listener), path, headers, timeout)

    def admin(self, path):
        return get(self.admin_port, path)

    def stats(self):
        """Admin /stats as {name: int} (histograms and text readouts keep their text)."""
        resp = self.admin("/stats")
        assert resp.status == 200, resp
        return parse_stats(resp.body.decode())

    def counter(self, name):
        """An Envoy stat by its full name; a name Envoy does not have fails the test."""
        stats = self.stats()
        if name not in stats:
            raise KeyError(f"{self.name} has no stat {name!r} (misspelled, or never defined)")
        return stats[name]

    def metric(self, name):
        """A custom wasm metric by the name the filter gave it, wherever Envoy put it. The filter
        defines every metric when it is configured (src/metrics.rs), so each exists, 0 or not,
        and a name Envoy does not have fails the test."""
        stats = self.stats()
        for candidate in (name, "wasmcustom." + name):
            if candidate in stats:
                return stats[candidate]
        raise KeyError(f"{self.name} has no metric {name!r} (misspelled, or not a tokengate metric)")

    def metric_at_least(self, name, n, timeout=3.0):
        """A metric once it reaches `n`, or its value at `timeout`. For the hit-path counters
        (`requests.allowed`, `cache.hit.local`), which each worker hands to Envoy on its tick."""
        try:
            wait_until(lambda: self.metric(name) >= n, timeout, what=f"{name} >= {n}")
        except TimeoutError:
            pass  # the caller's assertion shows the value
        return self.metric(name)

    def tokengate_stats(self):
        return {k: v for k, v in self.stats().items() if "tokengate." in k}

    def log_text(self):
        return self.proc.log_text() if self.proc else ""


def parse_stats(text):
    stats = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if not sep:
            continue
        value = value.strip()
        try:
            stats[name] = int(value)
        except ValueError:
            stats[name] = value
    return stats


def _named(items, name):
    for item in items:
        if item.get("name") == name:
            return item
    raise KeyError(f"{ENVOY_TEMPLATE} has no {name!r}")


def _wasm_plugins(listener):
    """The wasm filters' `config` blocks of a listener, in order."""
    for f in _http_manager(listener)["http_filters"]:
        if f["typed_config"]["@type"].endswith(".Wasm"):
            yield f["typed_config"]["config"]


def deep_diff(base, variant):
    """What variant sets differently from base, as an overlay for merge()."""
    out = {}
    for key, value in variant.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            nested = deep_diff(base[key], value)
            if nested:
                out[key] = nested
        elif base.get(key, object()) != value:
            out[key] = copy.deepcopy(value)
    return out


def _set_port(address, port):
    socket_address = address["socket_address"]
    # The template must stay on loopback: tests never bind or target anything else.
    assert socket_address["address"] == LOOPBACK, socket_address
    socket_address["port_value"] = int(port)


def loopback_cluster(name, port):
    """A plain Envoy cluster for a test server on 127.0.0.1 (for `extra_clusters`)."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": LOOPBACK, "port_value": port}}}}
            ]}],
        },
    }


def _set_cluster_port(cluster, port):
    endpoints = cluster["load_assignment"]["endpoints"]
    lb_endpoints = [e for group in endpoints for e in group["lb_endpoints"]]
    assert len(lb_endpoints) == 1, f"cluster {cluster['name']} should have one endpoint"
    _set_port(lb_endpoints[0]["endpoint"]["address"], port)


def _http_manager(listener):
    for chain in listener["filter_chains"]:
        for f in chain["filters"]:
            if f["name"] == "envoy.filters.network.http_connection_manager":
                return f["typed_config"]
    raise KeyError(f"listener {listener['name']} has no http_connection_manager")


# --------------------------------------------------------------------------- etcd


class EtcdMember:
    """One etcd member: its ports, data directory and process (None while stopped)."""

    def __init__(self, name, workdir):
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.data_dir = Path(workdir) / name
        self.proc = None

    @property
    def client_url(self):
        return f"http://{LOOPBACK}:{self.client_port}"

    @property
    def peer_url(self):
        return f"http://{LOOPBACK}:{self.peer_port}"

    def alive(self):
        return self.proc is not None and self.proc.alive()


class Etcd:
    """An etcd cluster (default 3 members) on 127.0.0.1, free client and peer ports, data
    directories under `workdir`. `start()` waits until every member answers /health.

    Envoy reaches it through `envoy_cluster()` (every member an endpoint, with an active
    HTTP health check on /health so that Envoy stops sending to a stopped member), and the
    filter through `sync_config()` (the plugin's `cluster_sync` section).
    """

    def __init__(self, procs, workdir, members=3, name="etcd", etcd_bin=None, extra_args=()):
        self.procs = procs
        self.name = name
        self.workdir = Path(workdir) / f"{name}-{secrets.token_hex(4)}"
        self.binary = etcd_bin or os.environ.get("ETCD_BIN") or shutil.which("etcd")
        if not self.binary:
            raise RuntimeError("etcd is not installed: run `make etcd` (Debian etcd-server)")
        self.extra_args = list(extra_args)
        self.members = [EtcdMember(f"{name}{i}", self.workdir) for i in range(members)]
        self.cluster_token = f"{name}-{secrets.token_hex(4)}"

    @property
    def endpoints(self):
        return ",".join(m.client_url for m in self.members)

    def _argv(self, member):
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        return [
            self.binary,
            "--name", member.name,
            "--data-dir", member.data_dir,
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial,
            # Ignored once the data directory holds the member (a restart rejoins).
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.cluster_token,
            "--logger", "zap",
            "--log-outputs", "stderr",
            *self.extra_args,
        ]

    def _spawn(self, member):
        # No ETCD_* from the caller's environment: flags alone configure the member.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        member.proc = self.procs.start(
            member.name, self._argv(member), self.workdir / f"{member.name}.log", env=env
        )

    def start(self, timeout=30.0):
        for member in self.members:
            if not member.alive():
                self._spawn(member)
        self.wait_healthy(timeout=timeout)
        return self

    def wait_healthy(self, members=None, timeout=30.0):
        for member in members or [m for m in self.members if m.alive()]:
            wait_until(lambda m=member: self.healthy(m), timeout, what=f"{member.name} /health")

    def healthy(self, member):
        """Whether the member answers /health with {"health": "true"} (it has a leader)."""
        if not member.alive():
            raise RuntimeError(f"{member.name} exited:\n{member.proc.log_tail()}")
        try:
            resp = get(member.client_port, "/health", timeout=1.0)
        except OSError:
            return False
        return resp.status == 200 and json.loads(resp.body or b"{}").get("health") == "true"

    def stop_member(self, index, sig=signal.SIGTERM):
        """Stop one member (SIGTERM: a clean stop, an etcd leader hands over first)."""
        member = self.members[index]
        if member.proc:
            if sig != signal.SIGTERM:
                Processes._signal(member.proc, sig)
                member.proc.popen.wait(10)
            self.procs.stop(member.proc)
            member.proc = None
        return member

    def kill_member(self, index):
        return self.stop_member(index, signal.SIGKILL)

    def start_member(self, index, wait=True, timeout=30.0):
        member = self.members[index]
        if not member.alive():
            self._spawn(member)
        if wait:
            self.wait_healthy([member], timeout=timeout)
        return member

    def stop(self):
        for index in range(len(self.members)):
            self.stop_member(index)

    def pause(self):
        """SIGSTOP every member: connections are accepted (the kernel's backlog) and
        requests are read by nobody, as with an etcd that hangs."""
        for member in self.members:
            if member.alive():
                Processes._signal(member.proc, signal.SIGSTOP)

    def resume(self, wait=True, timeout=30.0):
        """SIGCONT every member; with `wait`, returns once each answers /health again."""
        for member in self.members:
            if member.alive():
                Processes._signal(member.proc, signal.SIGCONT)
        if wait:
            self.wait_healthy(timeout=timeout)

    # ----- reading etcd (the v3 JSON gateway, no etcdctl needed) -----

    def call(self, path, body, member=None, timeout=3.0):
        members = [member] if member is not None else [m for m in self.members if m.alive()]
        last = None
        for m in members:
            try:
                resp = post_json(m.client_port, path, body, timeout=timeout)
            except OSError as e:
                last = e
                continue
            if resp.status == 200:
                return resp.json()
            last = resp
        raise RuntimeError(f"etcd {path} failed on every member: {last!r}")

    def status(self, member):
        return self.call("/v3/maintenance/status", {}, member=member)

    def leader_index(self):
        """The index of the member that leads now."""
        for i, member in enumerate(self.members):
            if not member.alive():
                continue
            try:
                status = self.status(member)
            except RuntimeError:
                continue
            if status.get("leader") and status["leader"] == status["header"]["member_id"]:
                return i
        return None

    def get_prefix(self, prefix, member=None):
        """{key: value} under prefix, decoded (values parsed as JSON where they are)."""
        key = prefix.encode()
        end = bytearray(key)
        end[-1] += 1
        answer = self.call(
            "/v3/kv/range",
            {"key": base64.b64encode(key).decode(), "range_end": base64.b64encode(bytes(end)).decode()},
            member=member,
        )
        out = {}
        for kv in answer.get("kvs", []):
            value = base64.b64decode(kv.get("value", "")).decode(errors="replace")
            try:
                value = json.loads(value)
            except ValueError:
                pass
            out[base64.b64decode(kv["key"]).decode(errors="replace")] = value
        return out

    def revision(self):
        return int(self.call("/v3/kv/range", {"key": base64.b64encode(b"\0").decode()})["header"]["revision"])

    def etcdctl_dump(self, prefix):
        """`etcdctl get --prefix <prefix> -w json`, for bug reports (etcd-client may be absent)."""
        etcdctl = shutil.which("etcdctl")
        if not etcdctl:
            return "(etcdctl not installed)"
        alive = ",".join(m.client_url for m in self.members if m.alive())
        cmd = [etcdctl, "--endpoints", alive, "get", "--prefix", prefix, "-w", "json"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, env=dict(os.environ, ETCDCTL_API="3"))
        return " ".join(str(c) for c in cmd) + "\n" + (done.stdout or done.stderr)

    # ----- what Envoy and the filter need -----

    def envoy_cluster(self, name="etcd", health_check=True, hc_interval_ms=200):
        """An Envoy cluster with every member as an endpoint.

        With `health_check`, Envoy checks GET /health on each member every hc_interval_ms
        and sends nothing to a member that fails once (a stopped member refuses at once),
        until it passes again. Envoy's panic mode is off: by default, with fewer than half
        of the hosts healthy (one member stopped and another without a leader for a
        moment), Envoy would send to every host again, the stopped one included.
        """
        cluster = {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "0.25s",
            "lb_policy": "ROUND_ROBIN",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": LOOPBACK, "port_value": m.client_port}}}}
                    for m in self.members
                ]}],
            },
        }
        if health_check:
            interval = f"{hc_interval_ms / 1000:.3f}s"
            cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
            cluster["health_checks"] = [{
                "timeout": "0.5s",
                "interval": interval,
                "no_traffic_interval": interval,
                "unhealthy_interval": interval,
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "http_health_check": {"path": "/health"},
            }]
        return cluster

    def sync_config(self, cluster="etcd", **overrides):
        """The plugin's `cluster_sync` section for this cluster."""
        return {"cluster": cluster, "authority": "etcd", **overrides}
