"""An etcd cluster on loopback, read through its v3 JSON gateway."""
import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
from pathlib import Path

from .client import get, post_json
from .paths import LOOPBACK
from .processes import Processes, free_port, wait_until


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
