"""One Envoy from the shipped template, with test ports and plugin configurations."""
import copy
import itertools
import json
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .asserts import ADMIN_TOKEN, sha256
from .client import get
from .config import deep_diff, merge
from .paths import ENVOY_TEMPLATE, LOOPBACK, PLUGIN_CONFIG, REPO
from .processes import Processes, free_port, port_accepts, wait_until


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
    `max_request_headers_kb` raises every listener's header limit (Envoy's default: 60).
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
        max_request_headers_kb=None,
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
        self.max_request_headers_kb = max_request_headers_kb
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
        # The same IdP for JWKS fetches (`jwt_section`), so that `cluster.idp.*` counts introspections only.
        clusters.append(loopback_cluster("idp-keys", self.idp_port))
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
        if self.max_request_headers_kb:
            manager["max_request_headers_kb"] = self.max_request_headers_kb
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


def shipped_admin_additions():
    """What envoy/envoy.yaml's admin listener adds to envoy/tokengate.json (its `admin` section),
    checked to hold the demo admin credential."""
    template = yaml.safe_load(ENVOY_TEMPLATE.read_text())
    listener = _named(template["static_resources"]["listeners"], "tokengate_admin")
    (plugin,) = _wasm_plugins(listener)
    shipped = json.loads(PLUGIN_CONFIG.read_text())
    additions = deep_diff(shipped, json.loads(plugin["configuration"]["value"]))
    assert additions.get("admin", {}).get("token_sha256") == sha256(ADMIN_TOKEN), additions
    return additions


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
