"""Fixtures of the container tests (`make compose-test`): envoy/docker-compose.yaml
brought up as the README says, on free loopback ports, and always torn down.

  ENGINE    the container engine (podman, the default, or docker)
  COMPOSE   the compose command (podman-compose, the default; "docker compose"
            or docker-compose with ENGINE=docker)

The images come from stand-in-images.sh, which the Makefile runs first.
"""
import http.client
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
from harness import free_port, get, parse_stats, wait_until  # noqa: E402

ENGINE = os.environ.get("ENGINE", "podman")
COMPOSE = shlex.split(os.environ.get("COMPOSE", "podman-compose"))
COMPOSE_FILE = REPO / "envoy" / "docker-compose.yaml"
SERVICES = ("envoy", "idp", "upstream")
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
# The variables docker-compose.yaml reads for its published ports.
PORT_VARIABLES = {
    "data": "TOKENGATE_DATA_PORT",
    "admin": "TOKENGATE_ADMIN_PORT",
    "envoy_admin": "TOKENGATE_ENVOY_ADMIN_PORT",
    "idp": "TOKENGATE_IDP_PORT",
}

# SIGTERM (a CI timeout, `kill`) acts like Ctrl-C, so the teardown still runs.
signal.signal(signal.SIGTERM, signal.default_int_handler)
signal.signal(signal.SIGINT, signal.default_int_handler)


def run(argv, timeout=300, check=True, env=None):
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


class Stack:
    """One project of envoy/docker-compose.yaml: its containers and its network."""

    def __init__(self):
        # A project and ports of its own: nothing collides with another run or `make run`.
        self.project = f"tokengatetest{secrets.token_hex(4)}"
        self.ports = {name: free_port() for name in PORT_VARIABLES}
        self.env = dict(os.environ, **{PORT_VARIABLES[name]: str(port) for name, port in self.ports.items()})

    def compose(self, *args, timeout=300):
        return run([*COMPOSE, "-p", self.project, "-f", COMPOSE_FILE, *args], timeout=timeout, env=self.env)

    def _ids(self, kind):
        listing = ["ps", "-a", "-q"] if kind == "container" else ["network", "ls", "-q"]
        out = run([ENGINE, *listing, "--filter", f"label={PROJECT_LABEL}={self.project}"]).stdout
        return out.split()

    def containers(self):
        """{service: {"status", "exit_code", "id"}} of the project's containers."""
        ids = self._ids("container")
        if not ids:
            return {}
        found = {}
        for c in json.loads(run([ENGINE, "container", "inspect", *ids]).stdout):
            found[c["Config"]["Labels"][SERVICE_LABEL]] = {
                "status": c["State"]["Status"], "exit_code": c["State"]["ExitCode"], "id": c["Id"],
            }
        return found

    def networks(self):
        return self._ids("network")

    def logs(self, services=None, lines=30):
        out = []
        for service, c in sorted(self.containers().items()):
            if services is not None and service not in services:
                continue
            proc = run([ENGINE, "logs", "--tail", lines, c["id"]], check=False)
            out.append(f"--- {service} ({c['status']}, exit {c['exit_code']}):\n{proc.stdout}{proc.stderr}")
        return "\n".join(out)

    def up(self):
        # podman-compose 1.0 exits 0 even when a container could not start: its output says why.
        proc = self.compose("up", "-d")
        self.up_said = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        wait_until(self._ready, 120, interval=0.5, what=f"the compose project {self.project} to serve")

    def _ready(self):
        containers = self.containers()
        stopped = {s for s, c in containers.items() if c["status"] != "running"}
        missing = set(SERVICES) - set(containers)
        if stopped or missing:
            raise AssertionError(f"not running: {sorted(stopped | missing)}\n{self.logs(stopped)}\nup said:\n{self.up_said}")
        # Each demo server says so once it listens; Envoy's /ready once its listeners are up.
        for service in ("idp", "upstream"):
            logs = run([ENGINE, "logs", containers[service]["id"]])
            if "listening on" not in logs.stdout + logs.stderr:
                return False
        try:
            return get(self.ports["envoy_admin"], "/ready", timeout=2).status == 200
        except (OSError, http.client.HTTPException):
            return False

    def down(self):
        """`down`, then whatever it left (podman-compose 1.0 leaves the network). Says what was left."""
        try:
            self.compose("down", timeout=120)
        finally:
            left = {"containers": self._ids("container"), "networks": self.networks()}
            if left["containers"]:
                run([ENGINE, "rm", "-f", *left["containers"]], check=False)
            if left["networks"]:
                run([ENGINE, "network", "rm", *left["networks"]], check=False)
        return left

    def stats(self):
        resp = get(self.ports["envoy_admin"], "/stats")
        assert resp.status == 200, resp
        return parse_stats(resp.body.decode())


@pytest.fixture(scope="module")
def stack():
    stack = Stack()
    try:
        stack.up()
        yield stack
    finally:
        stack.down()
        assert stack.containers() == {} and stack.networks() == [], "the project outlived its teardown"
