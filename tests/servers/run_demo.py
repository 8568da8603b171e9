#!/usr/bin/env python3
"""`make run`: tokengate in front of an echo service, with a demo authorization server.

  127.0.0.1:9000  mock_idp.py      (token, introspection and revocation endpoints)
  127.0.0.1:9100  echo_upstream.py (the protected service)
  127.0.0.1:8080  Envoy, envoy/envoy.yaml as shipped (data listener; its other
                  listeners, e.g. the tokengate admin API on 8081, come up too)
  127.0.0.1:9901  Envoy admin (stats)

Runs in the foreground; Ctrl-C stops everything. Logs go to .work/run/.
"""
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LOGS = REPO / ".work" / "run"
HOST = "127.0.0.1"
IDP_PORT, UPSTREAM_PORT, DATA_PORT, ADMIN_PORT = 9000, 9100, 8080, 9901
ENVOY_YAML = REPO / "envoy" / "envoy.yaml"


def ports_needed():
    """{port: what} for the demo servers and every address the shipped envoy.yaml binds."""
    import yaml  # PyYAML, from the test venv that `make run` uses

    config = yaml.safe_load(ENVOY_YAML.read_text())
    ports = {IDP_PORT: "demo IdP", UPSTREAM_PORT: "echo upstream"}
    ports[config["admin"]["address"]["socket_address"]["port_value"]] = "Envoy admin"
    for listener in config["static_resources"]["listeners"]:
        ports[listener["address"]["socket_address"]["port_value"]] = f"Envoy listener {listener['name']}"
    return ports


class Stop(Exception):
    """Raised by the signal handler so cleanup runs in one place."""


def raise_stop(signum, frame):
    raise Stop()


def port_is_free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def start(name, argv, cwd=None):
    LOGS.mkdir(parents=True, exist_ok=True)
    log = open(LOGS / f"{name}.log", "wb")
    # Own process group, so stopping it also stops anything it started.
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=cwd, start_new_session=True)
    proc.name = name
    return proc


def stop(procs):
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def call(method, port, path, body=None, headers=None):
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(procs, check, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.name} exited ({proc.returncode}); see {LOGS / proc.name}.log")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}; see {LOGS}")


def self_check():
    """One request of each kind, so the banner shows what a user will see."""
    form = urllib.parse.urlencode({"client_id": "demo", "scope": "read"})
    _, body = call("POST", IDP_PORT, "/oauth2/token", form, {"Content-Type": "application/x-www-form-urlencoded"})
    token = json.loads(body)["access_token"]
    with_token, _ = call("GET", DATA_PORT, "/hello", headers={"Authorization": f"Bearer {token}"})
    without, _ = call("GET", DATA_PORT, "/hello")
    bad, _ = call("GET", DATA_PORT, "/hello", headers={"Authorization": "Bearer not-a-real-token"})
    return with_token, without, bad


def banner(checks, ports):
    with_token, without, bad = checks
    idp, data, admin = (f"http://{HOST}:{p}" for p in (IDP_PORT, DATA_PORT, ADMIN_PORT))
    listening = ", ".join(f"{what} :{port}" for port, what in sorted(ports.items()))
    return f"""
tokengate is running (Envoy --concurrency 2).  Self-check: token {with_token}, none {without}, bad token {bad}.
Listening on 127.0.0.1: {listening}

  # get a token from the demo authorization server
  TOKEN=$(curl -s -X POST -d 'client_id=demo&scope=read' {idp}/oauth2/token \\
          | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')

  # through Envoy with it: 200 and the echo of what the upstream saw (x-auth-* headers)
  curl -i -H "Authorization: Bearer $TOKEN" {data}/hello

  # without a token: 401 with WWW-Authenticate: Bearer realm="tokengate"
  curl -i {data}/hello

  # with a bad token: 401 error="invalid_token"
  curl -i -H 'Authorization: Bearer not-a-real-token' {data}/hello

  # a token without the required scope "read": 403 error="insufficient_scope"
  TOKEN_W=$(curl -s -X POST -d 'client_id=demo&scope=write' {idp}/oauth2/token \\
          | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -i -H "Authorization: Bearer $TOKEN_W" {data}/hello

  # revoke it through the admin API (demo admin token), then it is 401 on every worker
  curl -s -H 'Authorization: Bearer admin-demo-token' --data-urlencode "token=$TOKEN" http://{HOST}:8081/tokengate/revoke
  curl -i -H "Authorization: Bearer $TOKEN" {data}/hello
  curl -s -H 'Authorization: Bearer admin-demo-token' http://{HOST}:8081/tokengate/revocations

  # metrics
  curl -s {admin}/stats | grep tokengate        # or {admin}/stats/prometheus

Logs: {LOGS}/   Ctrl-C stops everything.
"""


def main():
    ports = ports_needed()
    taken = [f"{HOST}:{port} ({what})" for port, what in ports.items() if not port_is_free(port)]
    if taken:
        print("make run: port already in use: " + ", ".join(taken), file=sys.stderr)
        return 1
    envoy_bin = os.environ.get("ENVOY_BIN") or str(REPO / ".deps/envoy/envoy/_bin/envoy")
    wasm = REPO / "target/tokengate.wasm"  # the path envoy.yaml names
    for path, fix in ((Path(envoy_bin), "make envoy"), (wasm, "make build")):
        if not path.is_file():
            print(f"make run: {path} is missing (run `{fix}`)", file=sys.stderr)
            return 1

    # Both set explicitly: a shell that starts us in the background ignores SIGINT by default.
    signal.signal(signal.SIGTERM, raise_stop)
    signal.signal(signal.SIGINT, raise_stop)
    base_id = random.randint(1000, 60000)
    procs = []
    try:
        py = sys.executable
        procs.append(start("mock-idp", [py, str(HERE / "mock_idp.py"), "--port", str(IDP_PORT), "--verbose"]))
        procs.append(start("echo-upstream", [py, str(HERE / "echo_upstream.py"), "--port", str(UPSTREAM_PORT)]))
        # The shipped file, unchanged; its relative wasm path resolves from the repository root.
        procs.append(start("envoy", [envoy_bin, "-c", "envoy/envoy.yaml", "--concurrency", "2",
                                     "--base-id", str(base_id), "--log-level", "info"],
                           cwd=REPO))
        wait_ready(procs, lambda: call("GET", ADMIN_PORT, "/ready")[1].strip() == b"LIVE", "Envoy to be LIVE")
        wait_ready(procs, lambda: call("GET", IDP_PORT, "/healthz")[0] == 200, "the demo IdP")
        wait_ready(procs, lambda: call("GET", UPSTREAM_PORT, "/")[0] == 200, "the echo upstream")
        print(banner(self_check(), ports), flush=True)
        while True:
            for proc in procs:
                if proc.poll() is not None:
                    print(f"make run: {proc.name} exited ({proc.returncode}); see {LOGS / proc.name}.log",
                          file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except (KeyboardInterrupt, Stop):
        print("\nstopping…", flush=True)
        return 0
    except RuntimeError as err:
        print(f"make run: {err}", file=sys.stderr)
        return 1
    finally:
        stop(procs)
        # Envoy leaves its hot-restart segment behind even on SIGTERM.
        Path(f"/dev/shm/envoy_shared_memory_{base_id * 10}").unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
