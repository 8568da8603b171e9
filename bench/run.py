#!/usr/bin/env python3
"""`make bench`: tokengate's cost, measured against its floor and its rivals.

Everything runs on 127.0.0.1 on free ports. Envoy is pinned to one core and the
load generator (wrk, and this script) to the other with taskset.

Phases (BENCH_PHASES, comma-separated, default all):
  throughput  one Envoy (--concurrency 1) with a listener per variant; variants
              alternate round by round: A bare, B no-op wasm, C tokengate (one
              cached token), C2 tokengate (1,000 cached tokens rotated), C3 tokengate
              writing no claim headers (one cached token), D ext_authz
  jwt         the same Envoy, rounds of its own: one RS256 JWT access token, cached by
              tokengate's `jwt` section (J), verified by Envoy's jwt_authn with its
              JWT cache on (N), and the no-op floor given the same token (BJ)
  ladder      the no-op filter with tokengate's hit-path steps added one by one
              (bench/noop), then tokengate itself: where the cost beyond the floor goes
  perf        perf record of Envoy's core during A, B and C: CPU by DSO (kernel,
              Envoy, V8 JIT code = wasm) where perf works
  burst       a fresh Envoy (--concurrency 4): cold bursts of N requests over M
              connections with one new token each; introspections counted
  rss         a fresh Envoy (--concurrency 4): VmRSS while 10k, 100k, 1M distinct
              tokens pass through (cache.max_entries 100000)
Writes bench/results.json, and bench/results.md and bench/results.png through report.py;
prints the tables.
See bench/README.md for the knobs.
"""
import datetime
import functools
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))
from harness import LOOPBACK, Processes, free_port, port_accepts  # noqa: E402  (the e2e harness)
from jwt_issuer import BenchIssuer  # noqa: E402  (imports the e2e harness's JWT issuer)
from report import chart, ratios_and_targets, report, summarize
from variants import CG_LABEL, CG_ORDER, IDP_ANSWER, JWT_COLD, JWT_VARIANTS, LADDER, LADDER_ALT

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LUA = BENCH / "lua"

# --------------------------------------------------------------------------- knobs

PROFILES = {
    # Short: builds and checks the harness; numbers are indicative only.
    "smoke": dict(
        ROUNDS=2, SECONDS=3, WARMUP=1, LADDER_ROUNDS=2, LADDER_SECONDS=3, PERF_SECONDS=3,
        BURSTS=2, RSS_MILESTONES="1000,10000,30000", RSS_MAX_ENTRIES=10000, CG_ROUNDS=1, CG_REQUESTS=100,
        CG_COLD_REQUESTS=20,
    ),
    # The real run (about 25 minutes on a quiet 2-core machine).
    "full": dict(
        ROUNDS=5, SECONDS=20, WARMUP=3, LADDER_ROUNDS=3, LADDER_SECONDS=10, PERF_SECONDS=10,
        BURSTS=5, RSS_MILESTONES="10000,100000,500000,1000000", RSS_MAX_ENTRIES=100000, CG_ROUNDS=3, CG_REQUESTS=300,
        CG_COLD_REQUESTS=60,
    ),
}
COMMON = dict(
    CONNECTIONS=32, THREADS=2, VARIANTS="A,B,Be,C,C2,C3,D,BL,CL,B4,C4", ROTATE_TOKENS=1000,
    BURST_REQUESTS=400, BURST_CONNECTIONS=32, IDP_DELAY_MS=50, BURST_CONCURRENCY=4,
    RSS_CONCURRENCY=4, PHASES="throughput,jwt,ladder,perf,miss,callgrind,burst,rss", PERF=1,
    ENVOY_CPU="", LOAD_CPU="", OUT=str(BENCH), LOG_LEVEL="warn", AUTHZ="separate",
)


def knobs():
    profile = os.environ.get("BENCH_PROFILE", "smoke")
    if profile not in PROFILES:
        sys.exit(f"BENCH_PROFILE must be one of {sorted(PROFILES)}, not {profile!r}")
    k = dict(COMMON, **PROFILES[profile], PROFILE=profile)
    for name, default in list(k.items()):
        raw = os.environ.get(f"BENCH_{name}")
        if raw is None or name == "PROFILE":
            continue
        k[name] = type(default)(raw) if isinstance(default, (int, float)) and not isinstance(default, bool) else raw
    if k["AUTHZ"] not in ("separate", "same"):
        sys.exit("BENCH_AUTHZ must be `separate` (the authz service on the load core) or `same` (on Envoy's)")
    k["VARIANTS"] = [v.strip() for v in str(k["VARIANTS"]).split(",") if v.strip()]
    k["PHASES"] = [p.strip() for p in str(k["PHASES"]).split(",") if p.strip()]
    k["RSS_MILESTONES"] = [int(x) for x in str(k["RSS_MILESTONES"]).split(",") if x.strip()]
    return k


def paths():
    envoy = Path(os.environ.get("ENVOY_BIN") or REPO / ".deps/envoy/envoy/_bin/envoy")
    tokengate = Path(os.environ.get("TOKENGATE_WASM") or REPO / "target/tokengate.wasm")
    noop = Path(os.environ.get("NOOP_WASM") or BENCH / "noop/target/bench_noop.wasm")
    for what, p in (("envoy", envoy), ("tokengate wasm (make build)", tokengate), ("no-op wasm (make bench-noop)", noop)):
        if not p.is_file():
            sys.exit(f"missing {what}: {p}")
    if not shutil.which("wrk"):
        sys.exit("wrk is missing: run `make bench-deps`")
    return envoy, tokengate, noop


def pick_cpus(k):
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        sys.exit(f"need two cores (Envoy on one, the load on the other); this process may use {allowed}")
    envoy_cpu = int(k["ENVOY_CPU"]) if str(k["ENVOY_CPU"]) != "" else allowed[0]
    load_cpu = int(k["LOAD_CPU"]) if str(k["LOAD_CPU"]) != "" else allowed[1]
    return envoy_cpu, load_cpu


# --------------------------------------------------------------------------- processes

# Every process this script starts (the e2e harness's process groups) dies with it.
PROCS = Processes()
signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))


# --------------------------------------------------------------------------- HTTP


def request(port, path="/", headers=None, method="GET", timeout=10.0, conn=None):
    own = conn is None
    conn = conn or http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        if own:
            conn.close()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------- Envoy configuration

ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def direct(status=200, body="ok\n", content_type="text/plain"):
    return {"match": {"prefix": "/"},
            "direct_response": {"status": status, "body": {"inline_string": body}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": content_type}}]}


def listener(name, port, filters, route):
    return {
        "name": name,
        "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": {"name": name, "virtual_hosts": [{"name": name, "domains": ["*"], "routes": [route]}]},
                "http_filters": filters + [ROUTER],
            }}]}],
    }


def wasm(name, vm_id, path, configuration):
    """The same wasm settings tokengate ships with (envoy/envoy.yaml): V8, a vm_id, fail closed."""
    return {"name": name, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {
            "name": name, "root_id": name,
            "vm_config": {"vm_id": vm_id, "runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": str(path)}}},
            "fail_open": False,
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": configuration},
        }}}


def ext_authz(authz_port):
    return {"name": "envoy.filters.http.ext_authz", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "failure_mode_allow": False,
        "http_service": {"server_uri": {"uri": f"http://{LOOPBACK}:{authz_port}", "cluster": "authz", "timeout": "2s"}},
    }}


def fault_delay(ms):
    return {"name": "envoy.filters.http.fault", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        "delay": {"fixed_delay": f"{ms / 1000:.3f}s", "percentage": {"numerator": 100, "denominator": "HUNDRED"}},
    }}


def cluster(name, port):
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": LOOPBACK, "port_value": port}}}}]}]}}


def buffer_body():
    """Reads the whole request before the direct response: Envoy closes an HTTP/1.1 connection whose
    response went out before its request body was read, which would make every callout a new connection."""
    return {"name": "envoy.filters.http.buffer", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": 65536}}


ADMIN_TOKEN = "bench-admin-token"


def tokengate_config(max_entries=None, admin=False, claims=True, jwt=None):
    """envoy/tokengate.json, with cached answers that outlive the run (see README); `jwt`: the
    section verifying the bench issuer's tokens."""
    cfg = json.loads((REPO / "envoy/tokengate.json").read_text())
    if jwt:
        cfg["jwt"] = jwt
    if not claims:
        cfg["claims_to_headers"] = {}
    cfg["introspection"]["cluster"] = "idp"
    cfg.setdefault("cache", {})["max_ttl_s"] = 86400
    if max_entries is not None:
        cfg["cache"]["max_entries"] = max_entries
    if admin:
        cfg["admin"] = {"path_prefix": "/tokengate", "token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}
    return json.dumps(cfg)


def revoke_unrelated(e, admin="admin", data="C", check=True):
    """Production state: something was revoked once, so the denylist generation key exists and every
    request reads its value (a never-revoked process reads a missing key, which is cheaper)."""
    body = json.dumps({"tokens": ["bench-revoked-token"], "reason": "bench"})
    conn = http.client.HTTPConnection(LOOPBACK, e.ports[admin], timeout=10)
    try:
        conn.request("POST", "/tokengate/revoke", body=body,
                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"})
        r = conn.getresponse()
        text = r.read()
    finally:
        conn.close()
    if r.status != 200:
        raise RuntimeError(f"revocation through the admin API: {r.status} {text[:300]!r}")
    status, _ = request(e.ports[data], headers=bearer("bench-revoked-token"))
    if check and status != 401:
        raise RuntimeError(f"the revoked token was answered {status}, not 401")


LONG_TOKEN = "L" * 1024  # a JWT-sized token (b64token characters)
MAX_TOKEN = "L" * 4096  # the largest token tokengate accepts (bearer::MAX_TOKEN_BYTES)
# Variants that are another variant's listener with a large cached token: variant -> (listener, token).
SIZED = {"BL": ("B", LONG_TOKEN), "CL": ("C", LONG_TOKEN), "B4": ("B", MAX_TOKEN), "C4": ("C", MAX_TOKEN)}
# The JWT variants' listeners: BJ is the no-op's; every cold variant (J<alg>, N<alg>) is J's or N's.
JWT_LISTENER = {"BJ": "B", "J": "J", "N": "N", **{c: c[0] for c in JWT_COLD}}


@functools.lru_cache(maxsize=None)
def jwt_issuer():
    """One issuer (keys generated at start) for the whole run: tokengate and jwt_authn trust its keys."""
    return BenchIssuer()


@functools.lru_cache(maxsize=None)
def jwt_token():
    """The RS256 access token every JWT variant sends (about 1.1 KiB, valid for a day)."""
    return jwt_issuer().access_token("RS256")


def token_for(variant):
    if variant in JWT_LISTENER:
        return jwt_token()
    if variant in SIZED:
        return SIZED[variant][1]
    return "bench-hot-token"


def jwt_listeners(e, tokengate):
    """J: tokengate verifying the issuer's JWTs (same vm_id, so the same shared data and denylist as
    C); N: jwt_authn trusting the same keys. BJ and the cold variants reuse listeners."""
    issuer = jwt_issuer()
    e.add("J", [wasm("tokengate_jwt", "tokengate", tokengate, tokengate_config(jwt=issuer.tokengate_section()))],
          direct())
    e.add("N", [issuer.jwt_authn()], direct())
    for v, listener in JWT_LISTENER.items():
        e.ports.setdefault(v, e.ports[listener])


class Envoy:
    def __init__(self, workdir, name, envoy_bin, cpu, concurrency, log_level):
        self.workdir, self.name, self.envoy_bin, self.cpu = workdir, name, envoy_bin, cpu
        self.concurrency, self.log_level = concurrency, log_level
        self.admin_port = free_port()
        self.listeners, self.clusters, self.ports = [], [], {}
        self.proc = None

    def add(self, name, filters, route):
        port = free_port()
        self.ports[name] = port
        self.listeners.append(listener(name, port, filters, route))
        return port

    def bootstrap(self):
        return {"admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": self.admin_port}}},
                "static_resources": {"listeners": self.listeners, "clusters": self.clusters}}

    def start(self, timeout=60.0, wrapper=()):
        cfg = self.workdir / f"{self.name}.json"
        cfg.write_text(json.dumps(self.bootstrap(), indent=1))
        self.log = self.workdir / f"{self.name}.log"
        self.proc = PROCS.start(self.name, ["taskset", "-c", self.cpu, *wrapper, self.envoy_bin, "-c", cfg,
                                            "--concurrency", self.concurrency, "--disable-hot-restart", "--log-level",
                                            self.log_level], self.log)
        deadline = time.monotonic() + timeout
        while True:
            if not self.proc.alive():
                raise RuntimeError(f"envoy {self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                live = request(self.admin_port, "/ready", timeout=1)[1].strip() == b"LIVE"
            except OSError:
                live = False
            if live and all(port_accepts(p) for p in self.ports.values()):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"envoy {self.name} not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self):
        if self.proc:
            PROCS.stop(self.proc)
            self.proc = None

    def stats(self, regex):
        _, body = request(self.admin_port, "/stats?filter=" + regex, timeout=10)
        out = {}
        for line in body.decode().splitlines():
            name, _, value = line.partition(": ")
            try:
                out[name] = int(value)
            except ValueError:
                pass
        return out

    def stat(self, name):
        return self.stats("^" + re.escape(name) + "$").get(name, 0)

    def cpu_ns(self):
        """(on-CPU, waiting-for-CPU) time of every Envoy thread so far, in ns (schedstat)."""
        run = wait = 0
        for task in Path(f"/proc/{self.proc.popen.pid}/task").iterdir():
            try:
                fields = (task / "schedstat").read_text().split()
                run, wait = run + int(fields[0]), wait + int(fields[1])
            except (OSError, ValueError, IndexError):
                pass
        return run, wait

    def rss_kib(self):
        status = Path(f"/proc/{self.proc.popen.pid}/status").read_text()
        get = lambda key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1))
        return get("VmRSS"), get("VmHWM")


def envoy_version(envoy_bin):
    out = subprocess.run([str(envoy_bin), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version: [0-9a-f]+/([^/\s]+)/", out)
    return m.group(1) if m else out.strip()[:80]


# --------------------------------------------------------------------------- load


class Wrk:
    def __init__(self, k, load_cpu, workdir):
        self.k, self.load_cpu, self.workdir = k, load_cpu, workdir
        self.runs = 0

    def run(self, port, seconds, script="static.lua", headers=(), env=None, connections=None, threads=None,
            until_files=None, timeout_s=None):
        """Runs wrk pinned to the load core; returns its JSON summary plus its own CPU use."""
        connections = connections or self.k["CONNECTIONS"]
        threads = threads or self.k["THREADS"]
        argv = ["taskset", "-c", self.load_cpu, "wrk", "-t", threads, "-c", connections, "-d", f"{seconds}s",
                "--timeout", "5s", "-s", LUA / script]
        for h in headers:
            argv += ["-H", h]
        argv.append(f"http://{LOOPBACK}:{port}/")
        e = dict(os.environ, BENCH_LUA_DIR=str(LUA), **(env or {}))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        self.runs += 1
        p = PROCS.start("wrk", argv, self.workdir / f"wrk-{self.runs}.log", env=e)
        if until_files:
            # A run that ends by itself: each thread drops a file when done;
            # wrk's main thread then still sleeps, so wake it with SIGINT.
            deadline = time.monotonic() + (timeout_s or seconds)
            while p.alive() and time.monotonic() < deadline:
                if all(f.exists() for f in until_files):
                    break
                time.sleep(0.05)
            if p.alive():
                os.kill(p.popen.pid, signal.SIGINT)
        p.popen.wait()
        PROCS.stop(p)
        out = p.log_text()
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        m = re.search(r"^BENCH_JSON (.*)$", out, re.M)
        if not m:
            raise RuntimeError(f"wrk printed no summary (exit {p.popen.returncode}):\n{out[-2000:]}")
        r = json.loads(m.group(1))
        r["wrk_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        r["wall_s"] = wall
        r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
        r["errors"] = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["status_errors"] + r["timeouts"]
        return r


# --------------------------------------------------------------------------- phases


def authz_envoy(k, workdir, envoy_bin, load_cpu):
    """D's authorization service in an Envoy of its own on the load core: the gateway's core then pays
    only for the ext_authz client side, as it would with a remote authorizer."""
    a = Envoy(workdir, "authz", envoy_bin, load_cpu, 1, k["LOG_LEVEL"])
    a.add("authz", [], direct(body=""))
    return a.start()


def throughput_envoy(k, workdir, envoy_bin, tokengate, noop, envoy_cpu, with_ladder, with_miss, authz=None,
                     name="throughput", wrapper=(), timeout=60.0):
    e = Envoy(workdir, name, envoy_bin, envoy_cpu, 1, k["LOG_LEVEL"])
    idp_port = e.add("idp", [buffer_body()], direct(body=IDP_ANSWER, content_type="application/json"))
    authz_port = authz.ports["authz"] if authz else e.add("authz", [], direct(body=""))
    e.clusters += [cluster("idp", idp_port), cluster("authz", authz_port)]
    e.add("A", [], direct())
    e.add("B", [wasm("noop", "noop", noop, "")], direct())
    e.add("C", [wasm("tokengate", "tokengate", tokengate, tokengate_config())], direct())
    e.ports["C2"] = e.ports["C"]  # the same listener, other tokens
    # The price of the claim headers: the same filter with `claims_to_headers: {}` (same vm_id, same cache).
    e.add("C3", [wasm("tokengate_noclaims", "tokengate", tokengate, tokengate_config(claims=False))], direct())
    # tokengate's admin API (same vm_id, so the same shared data), as in envoy/envoy.yaml.
    e.add("admin", [wasm("tokengate_admin", "tokengate", tokengate, tokengate_config(admin=True)), buffer_body()],
          direct(status=404, body="{}"))
    e.add("D", [ext_authz(authz_port)], direct())
    for v, (listener, _) in SIZED.items():
        e.ports[v] = e.ports[listener]
    jwt_listeners(e, tokengate)
    if with_ladder:
        for i, (_, steps) in enumerate(LADDER[1:], 1):
            e.add(f"L{i}", [wasm(f"noop{i}", "noop", noop, steps)], direct())
    if with_miss:
        e.add("M0", [wasm("noop_callout", "noop", noop, "callout")], direct())
    if wrapper:  # the callgrind Envoy: also the floor without its shared-data read
        e.add("B0", [wasm("noop_nokey", "noop", noop, "nokey")], direct())
        e.add("Ba", [wasm("noop_keyabsent", "noop", noop, "keyabsent")], direct())
    # The floor reading an empty key, as tokengate's per-request read is: throughput variant Be.
    e.add("Be", [wasm("noop_keyempty", "noop", noop, "keyempty")], direct())
    return e.start(timeout=timeout, wrapper=wrapper)


def check_ok(port, token, what):
    status, body = request(port, headers=bearer(token))
    if status != 200:
        raise RuntimeError(f"{what}: expected 200, got {status}: {body[:300]!r}")


def warm(e, k):
    """Caches the hot token and the rotation's tokens (one introspection each)."""
    for v in ("A", "B", "C", "C3", "D"):
        check_ok(e.ports[v], "bench-hot-token", f"variant {v}")
    for v, (listener, token) in SIZED.items():
        check_ok(e.ports[listener], token, f"variant {v}")
    check_jwt(e)
    revoke_unrelated(e)
    before = e.stat("cluster.idp.upstream_rq_total")
    conn = http.client.HTTPConnection(LOOPBACK, e.ports["C"], timeout=10)
    try:
        for i in range(k["ROTATE_TOKENS"]):
            status, body = request(0, headers=bearer(f"bench-rot-{i:06d}"), conn=conn)
            if status != 200:
                raise RuntimeError(f"warming token {i}: {status} {body[:200]!r}")
    finally:
        conn.close()
    return e.stat("cluster.idp.upstream_rq_total") - before


def check_jwt(e):
    """Both verifiers really verify: the JWT passes J and N, the same JWT with its signature's last
    character changed is refused by both; then J has it cached (one verification)."""
    token = jwt_token()
    forged = token[:-1] + ("A" if token[-1] != "A" else "Q")
    for v in ("J", "N"):
        check_ok(e.ports[v], token, f"variant {v}")
        status, body = request(e.ports[v], headers=bearer(forged))
        if status != 401:
            raise RuntimeError(f"variant {v} answered {status} to a forged JWT, not 401: {body[:200]!r}")
    check_ok(e.ports["BJ"], token, "variant BJ")
    verified = e.stat("wasmcustom.tokengate.jwt.verified")
    if verified != 1:
        raise RuntimeError(f"tokengate verified the JWT {verified} times, not once")


def measure(e, wrk, variant, port, seconds, warmup, rotate_tokens):
    if variant == "C2":
        kw = dict(script="rotate.lua", env={"BENCH_TOKENS": str(rotate_tokens), "BENCH_TOKEN_PREFIX": "bench-rot-"})
    else:
        kw = dict(headers=[f"Authorization: Bearer {token_for(variant)}"])
    if warmup:
        wrk.run(port, warmup, **kw)
    idp0 = e.stat("cluster.idp.upstream_rq_total")
    cpu0, t0 = e.cpu_ns(), time.monotonic()
    r = wrk.run(port, seconds, **kw)
    cpu1, t1 = e.cpu_ns(), time.monotonic()
    r["introspections"] = e.stat("cluster.idp.upstream_rq_total") - idp0
    r["envoy_cpu_us_per_req"] = (cpu1[0] - cpu0[0]) / 1e3 / max(r["requests"], 1)
    r["envoy_cpu_util"] = (cpu1[0] - cpu0[0]) / 1e9 / (t1 - t0)
    # Time Envoy's threads were runnable but another process had the core: the noise gauge.
    r["envoy_wait_util"] = (cpu1[1] - cpu0[1]) / 1e9 / (t1 - t0)
    r["wrk_cpu_util"] = r["wrk_cpu_s"] / r["wall_s"]
    return r


def rotated(items, rnd):
    """items in round rnd's order: each round starts one later, so no variant always runs
    first (or right after the same neighbour) while the machine drifts."""
    shift = (rnd - 1) % len(items) if items else 0
    return items[shift:] + items[:shift]


def refuse_errors(rounds, phase):
    """A run in which any measurement had errors (non-2xx, timeouts, socket errors) measured
    something else than the variant: it is refused, not reported."""
    bad = [(i, v, r["errors"]) for i, row in enumerate(rounds, 1) for v, r in row.items() if r["errors"]]
    if bad:
        raise SystemExit(f"bench: {phase} refused: errors in " +
                         ", ".join(f"round {i} {v} ({n})" for i, v, n in bad))


def phase_throughput(k, e, wrk, log):
    rounds = []
    for rnd in range(1, k["ROUNDS"] + 1):
        row = {}
        for v in rotated(k["VARIANTS"], rnd):
            r = measure(e, wrk, v, e.ports[v], k["SECONDS"], k["WARMUP"], k["ROTATE_TOKENS"])
            row[v] = r
            log(f"  round {rnd} {v:>2}: {r['rps']:9.0f} req/s  p50 {r['p50_us']:6d} µs  p99 {r['p99_us']:6d} µs  "
                f"envoy {r['envoy_cpu_us_per_req']:6.2f} µs/req ({r['envoy_cpu_util'] * 100:3.0f}% cpu, "
                f"{r['envoy_wait_util'] * 100:3.0f}% waiting)  "
                f"wrk {r['wrk_cpu_util'] * 100:3.0f}% cpu  errors {r['errors']}  introspections {r['introspections']}")
        rounds.append(row)
    refuse_errors(rounds, "throughput")
    return rounds


def phase_jwt(k, e, wrk, log):
    """The cached JWT hit (J) beside jwt_authn with its JWT cache (N) and the no-op floor (BJ), all
    sending the same RS256 token, in rounds of their own (same knobs as the throughput phase)."""
    cache = r"^http\.N\.jwt_authn\."
    before = e.stats(cache)
    rounds = []
    for rnd in range(1, k["ROUNDS"] + 1):
        row = {}
        for v in rotated(JWT_VARIANTS, rnd):
            r = measure(e, wrk, v, e.ports[v], k["SECONDS"], k["WARMUP"], k["ROTATE_TOKENS"])
            row[v] = r
            log(f"  jwt round {rnd} {v:>2}: {r['rps']:9.0f} req/s  p99 {r['p99_us']:6d} µs  "
                f"envoy {r['envoy_cpu_us_per_req']:6.2f} µs/req ({r['envoy_wait_util'] * 100:3.0f}% waiting)  "
                f"wrk {r['wrk_cpu_util'] * 100:3.0f}% cpu  errors {r['errors']}  introspections {r['introspections']}")
        rounds.append(row)
    refuse_errors(rounds, "jwt")
    after = e.stats(cache)
    return {"rounds": rounds, "token_bytes": len(jwt_token()),
            "jwt_authn": {n.removeprefix("http.N.jwt_authn."): v - before.get(n, 0) for n, v in after.items()},
            "tokengate_verified": e.stat("wasmcustom.tokengate.jwt.verified")}


def phase_ladder(k, e, wrk, log):
    steps = [(label, "B" if i == 0 else f"L{i}") for i, (label, _) in enumerate(LADDER) if i != LADDER_ALT]
    steps.append(("= tokengate (C)", "C"))
    steps.append((LADDER[LADDER_ALT][0], f"L{LADDER_ALT}"))
    rounds = []
    for rnd in range(1, k["LADDER_ROUNDS"] + 1):
        row = {}
        for label, name in rotated(steps, rnd):
            r = measure(e, wrk, name, e.ports[name], k["LADDER_SECONDS"], k["WARMUP"], k["ROTATE_TOKENS"])
            row[name] = r
            log(f"  ladder round {rnd} {label:<26} {r['envoy_cpu_us_per_req']:6.2f} µs/req  {r['rps']:9.0f} req/s  "
                f"errors {r['errors']}")
        rounds.append(row)
    refuse_errors(rounds, "ladder")
    return {"steps": steps, "rounds": rounds}


def phase_miss(k, e, wrk, log):
    """Envoy CPU per request when every request is a cache miss, against the floor of one callout."""
    rounds = []
    for rnd in range(1, k["LADDER_ROUNDS"] + 1):
        row = {}
        for name in ("M0", "M1"):
            if name == "M0":
                kw = dict(headers=["Authorization: Bearer bench-hot-token"])
                port = e.ports["M0"]
            else:
                # Tokens never seen before, for the whole run (distinct.lua with no quota).
                kw = dict(script="distinct.lua", env={"BENCH_QUOTA": "1000000000",
                                                      "BENCH_TOKEN_PREFIX": f"miss{rnd}-{time.time_ns()}-"})
                port = e.ports["C"]
            idp0 = e.stat("cluster.idp.upstream_rq_total")
            cpu0, t0 = e.cpu_ns(), time.monotonic()
            r = wrk.run(port, k["LADDER_SECONDS"], **kw)
            cpu1, t1 = e.cpu_ns(), time.monotonic()
            r["introspections"] = e.stat("cluster.idp.upstream_rq_total") - idp0
            r["envoy_cpu_us_per_req"] = (cpu1[0] - cpu0[0]) / 1e3 / max(r["requests"], 1)
            r["envoy_wait_util"] = (cpu1[1] - cpu0[1]) / 1e9 / (t1 - t0)
            row[name] = r
            log(f"  miss round {rnd} {name}: {r['envoy_cpu_us_per_req']:7.1f} µs/req  {r['rps']:8.0f} req/s  "
                f"callouts {r['introspections']}  errors {r['errors']}  waiting {r['envoy_wait_util'] * 100:.0f}%")
        rounds.append(row)
    return rounds


def cg_split(dump):
    """Instructions of one callgrind dump by where they ran: Envoy's binary (with V8's runtime and
    builtins), libc, or JIT code (the compiled wasm), from callgrind_annotate's per-function list."""
    out = subprocess.run(["callgrind_annotate", "--threshold=100", str(dump)], capture_output=True, text=True).stdout
    split = {"envoy": 0, "libc": 0, "jit": 0}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S+?):(\S+) \[(.*)\]\s*$", line)
        if not m:
            continue
        ir, obj = int(m.group(1).replace(",", "")), m.group(4)
        fn = m.group(3)
        if "libc" in obj or "libm" in obj or "ld-linux" in obj:
            split["libc"] += ir
        elif obj.endswith("/envoy"):
            split["envoy"] += ir
        else:
            # Unnamed: low addresses are Envoy's own text, high ones V8's code space.
            fn = fn.split("'")[0]  # callgrind marks a recursion level as <name>'<depth>
            addr = int(fn, 16) if fn.startswith("0x") else 0
            split["envoy" if 0 < addr < 0x100000000 else "jit"] += ir
    return split


def phase_callgrind(k, workdir, envoy_bin, tokengate, noop, envoy_cpu, load_cpu, log):
    """Instructions per request under callgrind: independent of what else the machine runs."""
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        return {"error": "valgrind is not installed"}
    authz = authz_envoy(k, workdir, envoy_bin, load_cpu)
    out_pattern = workdir / "callgrind.out.%p"
    # One file per thread: the worker's is the one that counts (the main thread's timers and stats
    # flushes are background noise that valgrind's slowness would otherwise inflate).
    wrapper = ["valgrind", "--tool=callgrind", "--smc-check=all", "--instr-atstart=no", "--separate-threads=yes",
               f"--callgrind-out-file={out_pattern}"]
    e = None
    try:
        e = throughput_envoy(k, workdir, envoy_bin, tokengate, noop, envoy_cpu, True, True, authz, name="callgrind",
                             wrapper=wrapper, timeout=600)
        pid = e.proc.popen.pid
        ctl = lambda *a: subprocess.run(["callgrind_control", *a, str(pid)], capture_output=True, text=True)
        n, warmup = k["CG_REQUESTS"], 50
        rot = [f"bench-rot-{i:06d}" for i in range(k["ROTATE_TOKENS"])]
        for i, t in enumerate(rot):  # cached before, uninstrumented
            check_ok(e.ports["C"], t, "callgrind warm")
        check_jwt(e)
        n_cold, cold_warmup = k["CG_COLD_REQUESTS"], 20
        cold = {}  # (algorithm, round) -> distinct tokens: the warm-up's, then the measured ones
        results = {v: [] for v in CG_ORDER}
        dumps = 0
        # C0 while nothing was ever revoked, then one revocation, then everything else.
        plan = [(rnd, "C0") for rnd in range(1, k["CG_ROUNDS"] + 1)] + [(0, "revoke")]
        plan += [(rnd, v) for rnd in range(1, k["CG_ROUNDS"] + 1) for v in CG_ORDER if v != "C0"]
        for rnd, v in plan:
            if v == "revoke":
                revoke_unrelated(e)
                continue
            port = e.ports[{"C0": "C", "C2": "C", "M1": "C", **{s: x for s, (x, _) in SIZED.items()}}.get(v, v)]
            count, warm_n = (n_cold, cold_warmup) if v in JWT_COLD else (n, warmup)
            if v in JWT_COLD:
                # J<alg> and N<alg> send the same tokens: each verifier's cache is its own.
                key = (v[1:], rnd)
                if key not in cold:
                    cold[key] = [jwt_issuer().access_token(v[1:]) for _ in range(warm_n + count)]
                tokens = lambda i, ts=cold[key]: ts[i]
            elif v == "C2":
                tokens = lambda i: rot[i % len(rot)]
            elif v == "M1":
                tokens = lambda i, r=rnd: f"cg-miss-{r}-{i}"
            else:
                tokens = lambda i, t=token_for(v): t
            conn = http.client.HTTPConnection(LOOPBACK, port, timeout=120)
            try:
                # C2 visits every rotation token first: a revocation clears each worker's denylist memo.
                for i in range(len(rot) if v == "C2" else warm_n):
                    request(0, headers=bearer(tokens(i) if v != "M1" else f"cg-warm-{rnd}-{i}"), conn=conn)
                ctl("-z")
                ctl("-i", "on")
                for i in range(warm_n if v in JWT_COLD else 0, (warm_n if v in JWT_COLD else 0) + count):
                    status, body = request(0, headers=bearer(tokens(i)), conn=conn)
                    if status != 200:
                        raise RuntimeError(f"callgrind {v}: {status} {body[:200]!r}")
                ctl("-i", "off")
                ctl("-d", f"{v}-{rnd}")
            finally:
                conn.close()
            dumps += 1
            deadline = time.monotonic() + 30
            while True:
                files = list(workdir.glob(f"callgrind.out.{pid}.{dumps}-*"))
                if files or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            time.sleep(0.5)  # every thread's file written
            per_thread = {}
            for f in workdir.glob(f"callgrind.out.{pid}.{dumps}-*"):
                text = f.read_text()
                if f"dump {v}-{rnd}" not in text:
                    raise RuntimeError(f"callgrind dump {f} is not {v}-{rnd}")
                per_thread[f] = int(re.search(r"^totals: (\d+)", text, re.M).group(1))
            if not per_thread:
                raise RuntimeError(f"callgrind wrote no dump for {v}-{rnd}")
            worker = max(per_thread, key=per_thread.get)
            total = per_thread[worker]
            split = cg_split(worker)
            results[v].append({"ir_per_req": total / count, "all_threads_per_req": sum(per_thread.values()) / count,
                               **{f"{x}_per_req": y / count for x, y in split.items()}})
            log(f"  callgrind round {rnd} {CG_LABEL[v]:<36} {total / count:10,.0f} instructions/req "
                f"(JIT {split['jit'] / max(total, 1) * 100:4.1f}%)")
    finally:
        if e:
            e.stop()
        authz.stop()
    return {"requests": k["CG_REQUESTS"], "cold_requests": k["CG_COLD_REQUESTS"], "rounds": k["CG_ROUNDS"],
            "results": results, "cold_token_bytes": {alg: len(ts[0]) for (alg, _), ts in cold.items()}}


def phase_perf(k, e, wrk, log, workdir):
    """CPU samples of the Envoy process by DSO during A, B and C."""
    if not shutil.which("perf"):
        return {"error": "perf is not installed"}
    out = {}
    for v in ("A", "B", "C"):
        data = workdir / f"perf-{v}.data"
        rec = PROCS.start("perf", ["perf", "record", "-e", "cpu-clock", "-F", "1999", "-p", e.proc.popen.pid, "-o",
                                   data], workdir / f"perf-{v}.log")
        time.sleep(0.5)
        wrk.run(e.ports[v], k["PERF_SECONDS"], headers=["Authorization: Bearer bench-hot-token"])
        os.kill(rec.popen.pid, signal.SIGINT)
        try:
            rec.popen.wait(30)
        except subprocess.TimeoutExpired:
            pass
        PROCS.stop(rec)
        rep = subprocess.run(["perf", "report", "-i", str(data), "--sort", "dso", "--stdio", "--percent-limit", "0.5"],
                             capture_output=True, text=True)
        if rep.returncode != 0 or not data.exists():
            return {"error": f"perf report failed: {(rep.stderr or (workdir / f'perf-{v}.log').read_text())[-500:]}"}
        samples = re.search(r"of event 'cpu-clock'.*?\n# Event count \(approx\.\): (\d+)", rep.stdout, re.S)
        rows = []
        for line in rep.stdout.splitlines():
            m = re.match(r"\s+([\d.]+)%\s+(.+?)\s*$", line)
            if m:
                dso = re.sub(r"^\[JIT\] tid \d+$", "[JIT] (V8 code: wasm + trampolines)", m.group(2))
                rows.append((dso, float(m.group(1))))
        out[v] = {"dso": rows, "events": int(samples.group(1)) if samples else None}
        log(f"  perf {v}: " + ", ".join(f"{d} {p:.1f}%" for d, p in rows[:6]))
    return out


# tokengate's own counters, as Envoy's /stats names them.
TG_STATS = r"^wasmcustom\.tokengate\.(cache|introspection|requests)\."


def burst_envoy(k, workdir, envoy_bin, tokengate, envoy_cpu):
    e = Envoy(workdir, "burst", envoy_bin, envoy_cpu, k["BURST_CONCURRENCY"], k["LOG_LEVEL"])
    delay = [fault_delay(k["IDP_DELAY_MS"])] if k["IDP_DELAY_MS"] > 0 else []
    idp_port = e.add("idp", delay + [buffer_body()], direct(body=IDP_ANSWER, content_type="application/json"))
    e.clusters.append(cluster("idp", idp_port))
    e.add("tokengate", [wasm("tokengate", "tokengate", tokengate, tokengate_config())], direct())
    return e.start()


def phase_burst(k, e, log):
    port = e.ports["tokengate"]
    check_ok(port, "burst-warmup", "burst warm-up")  # the VMs are up and the callout path is open
    results = []
    for b in range(1, k["BURSTS"] + 1):
        token = f"burst-{os.getpid()}-{b}-{time.time_ns()}"
        n, m = k["BURST_REQUESTS"], k["BURST_CONNECTIONS"]
        cx_regex = rf"^listener\.127\.0\.0\.1_{port}\.worker_\d+\.downstream_cx_total$"
        cx0 = e.stats(cx_regex)
        conns = [http.client.HTTPConnection(LOOPBACK, port, timeout=30) for _ in range(m)]
        for c in conns:
            c.connect()
        idp0 = e.stat("cluster.idp.upstream_rq_total")
        tg0 = e.stats(TG_STATS)
        ticket = iter(range(n))
        lock = threading.Lock()
        statuses = {}
        go = threading.Barrier(m + 1)

        def client(conn):
            go.wait()
            while True:
                with lock:
                    if next(ticket, None) is None:
                        return
                try:
                    status, _ = request(0, headers=bearer(token), conn=conn)
                except OSError as exc:
                    status = type(exc).__name__
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1

        threads = [threading.Thread(target=client, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        go.wait()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        for c in conns:
            c.close()
        time.sleep(0.5)
        cx1 = e.stats(cx_regex)
        tg1 = e.stats(TG_STATS)
        workers = sum(1 for name, v in cx1.items() if v - cx0.get(name, 0) > 0)
        r = {"token": b, "requests": n, "connections": m, "statuses": statuses, "elapsed_s": elapsed,
             "introspections": e.stat("cluster.idp.upstream_rq_total") - idp0, "workers_used": workers,
             "tokengate": {name.removeprefix("wasmcustom."): v - tg0.get(name, 0) for name, v in tg1.items()
                           if v - tg0.get(name, 0)}}
        results.append(r)
        log(f"  burst {b}: {n} requests / {m} connections on {workers} workers in {elapsed:.2f}s: "
            f"introspections {r['introspections']}, statuses {statuses}")
    return results


def rss_envoy(k, workdir, envoy_bin, tokengate, envoy_cpu):
    e = Envoy(workdir, "rss", envoy_bin, envoy_cpu, k["RSS_CONCURRENCY"], k["LOG_LEVEL"])
    idp_port = e.add("idp", [buffer_body()], direct(body=IDP_ANSWER, content_type="application/json"))
    e.clusters.append(cluster("idp", idp_port))
    e.add("tokengate", [wasm("tokengate", "tokengate", tokengate, tokengate_config(k["RSS_MAX_ENTRIES"]))], direct())
    return e.start()


def phase_rss(k, e, wrk, log, workdir):
    port = e.ports["tokengate"]
    check_ok(port, "rss-warmup", "rss warm-up")
    time.sleep(1)
    rss, hwm = e.rss_kib()
    milestones = [{"tokens": 0, "rss_kib": rss, "hwm_kib": hwm, "introspections": 0}]
    log(f"  rss baseline: {rss / 1024:.1f} MiB")
    samples = [(0, rss)]
    stop = threading.Event()
    idp_base = e.stat("cluster.idp.upstream_rq_total")

    def sampler():
        while not stop.wait(1.0):
            try:
                samples.append((e.stat("cluster.idp.upstream_rq_total") - idp_base, e.rss_kib()[0]))
            except (OSError, AttributeError):
                pass

    threading.Thread(target=sampler, daemon=True).start()
    done_tokens = 0
    threads = k["THREADS"]
    try:
        for i, target in enumerate(k["RSS_MILESTONES"]):
            todo = target - done_tokens
            if todo <= 0:
                continue
            quota = -(-todo // threads)
            marks = workdir / f"rss-{i}"
            marks.mkdir(exist_ok=True)
            files = [marks / f"done-{t}" for t in range(threads)]
            # Per-thread quota; the Lua script drops a file per thread when done (see distinct.lua).
            cpu0 = e.cpu_ns()[0]
            r = wrk.run(port, 3600, script="distinct.lua", until_files=files, timeout_s=3600,
                        env={"BENCH_QUOTA": str(quota), "BENCH_TOKEN_PREFIX": f"rss{i}-", "BENCH_MARK_DIR": str(marks)})
            cpu_us = (e.cpu_ns()[0] - cpu0) / 1e3 / max(r["requests"], 1)
            done_tokens += quota * threads
            time.sleep(2)
            rss, hwm = e.rss_kib()
            intro = e.stat("cluster.idp.upstream_rq_total") - idp_base
            m = {"tokens": target, "rss_kib": rss, "hwm_kib": hwm, "introspections": intro, "rps": r["rps"],
                 "envoy_cpu_us_per_req": cpu_us,
                 "errors": r["errors"], "p99_us": r["p99_us"]}
            milestones.append(m)
            log(f"  rss after {target:>8} distinct tokens: {rss / 1024:7.1f} MiB (peak {hwm / 1024:.1f}), "
                f"introspections {intro}, {r['rps']:.0f} req/s, Envoy {cpu_us:.0f} µs/req, errors {r['errors']}")
    finally:
        stop.set()
    tg = {name.removeprefix("wasmcustom."): v for name, v in e.stats(TG_STATS).items()}
    return {"max_entries": k["RSS_MAX_ENTRIES"], "concurrency": k["RSS_CONCURRENCY"], "milestones": milestones,
            "samples": samples, "tokengate_stats": tg}


# --------------------------------------------------------------------------- main


def cpu_model():
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return m.group(1).strip() if m else platform.processor()
    except OSError:
        return platform.processor()


def commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


# What each phase writes into results.json.
PHASE_KEYS = {"throughput": ("rounds", "summary", "pools"), "jwt": ("jwt",), "ladder": ("ladder",), "perf": ("perf",),
              "miss": ("miss",), "callgrind": ("callgrind",), "burst": ("burst",), "rss": ("rss",)}


def keep_phases(res, path, phases):
    """BENCH_KEEP=bench/results.json: the phases this run skips keep that run's sections, so that a
    run of a few phases still writes a whole report; the report names where each came from."""
    old = json.loads(Path(path).read_text())
    origin = old["meta"].get("kept", {})
    kept = {}
    for phase, keys in PHASE_KEYS.items():
        if phase in phases or not any(key in old for key in keys):
            continue
        for key in keys:
            if key in old:
                res[key] = old[key]
        kept[phase] = origin.get(phase) or f"{old['meta']['date']} at `{old['meta']['commit']}`"
    res["meta"]["kept"] = kept


def rerender(path):
    """BENCH_RERENDER=bench/results.json: the report and chart again from a run's numbers (after a change to
    the report's text), without measuring."""
    res = json.loads(Path(path).read_text())
    k = res["meta"]["knobs"]
    res["ratios"], res["targets"] = ratios_and_targets(res)
    # Beside the results.json given (or BENCH_OUT), never the OUT the run recorded: another checkout's.
    out_dir = Path(os.environ.get("BENCH_OUT") or Path(path).resolve().parent)
    (out_dir / "results.md").write_text(report(res, k))
    err = chart(res, k, out_dir / "results.png")
    print(f"chart: {err}" if err else f"rewrote {out_dir / 'results.md'} and {out_dir / 'results.png'} from {path}")


def main():
    if os.environ.get("BENCH_RERENDER"):
        return rerender(os.environ["BENCH_RERENDER"])
    k = knobs()
    envoy_bin, tokengate, noop = paths()
    envoy_cpu, load_cpu = pick_cpus(k)
    os.sched_setaffinity(0, {load_cpu})
    out_dir = Path(k["OUT"])
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = BENCH / "work" / stamp
    workdir.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    res = {"meta": {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "commit": commit(),
        "envoy": envoy_version(envoy_bin), "cpu_model": cpu_model(), "ncpu": os.cpu_count(),
        "kernel": platform.release(), "envoy_cpu": envoy_cpu, "load_cpu": load_cpu,
        "loadavg_start": os.getloadavg(), "knobs": k, "workdir": str(workdir)}}
    # Snapshots: other builds may rewrite target/ while the benchmark runs.
    tokengate = Path(shutil.copy(tokengate, workdir / "tokengate.wasm"))
    noop = Path(shutil.copy(noop, workdir / "bench_noop.wasm"))
    res["wasm"] = {"tokengate.wasm": tokengate.stat().st_size, "bench_noop.wasm (for reference)": noop.stat().st_size}
    log(f"bench: profile {k['PROFILE']}, phases {','.join(k['PHASES'])}, Envoy on core {envoy_cpu}, load on core "
        f"{load_cpu}, logs in {workdir}")
    wrk = Wrk(k, load_cpu, workdir)
    phases = k["PHASES"]
    if any(p in phases for p in ("throughput", "jwt", "ladder", "perf", "miss")):
        authz = authz_envoy(k, workdir, envoy_bin, load_cpu) if k["AUTHZ"] == "separate" else None
        e = throughput_envoy(k, workdir, envoy_bin, tokengate, noop, envoy_cpu, "ladder" in phases, "miss" in phases,
                             authz)
        try:
            n = warm(e, k)
            log(f"warm: {k['ROTATE_TOKENS']} rotation tokens cached with {n} introspections")
            if "throughput" in phases:
                log("throughput (one worker):")
                res["rounds"] = phase_throughput(k, e, wrk, log)
                res["summary"] = summarize(res["rounds"], k["VARIANTS"])
                pools = e.stats(r"^cluster\.(idp|authz)\.upstream_(cx|rq)_total$")
                res["pools"] = pools
                log("  upstream connections reused: " + ", ".join(f"{n} {v}" for n, v in sorted(pools.items())))
            if "jwt" in phases:
                log(f"jwt (one worker, the same {len(jwt_token())}-byte RS256 token):")
                res["jwt"] = phase_jwt(k, e, wrk, log)
            if "ladder" in phases:
                log("profile ladder:")
                res["ladder"] = phase_ladder(k, e, wrk, log)
            if "perf" in phases and k["PERF"]:
                log("perf:")
                res["perf"] = phase_perf(k, e, wrk, log, workdir)
            if "miss" in phases:
                log("miss path (one worker):")
                res["miss"] = phase_miss(k, e, wrk, log)
        finally:
            e.stop()
            if authz:
                authz.stop()
    if "callgrind" in phases:
        log("instructions per request (callgrind, one worker, one connection):")
        res["callgrind"] = phase_callgrind(k, workdir, envoy_bin, tokengate, noop, envoy_cpu, load_cpu, log)
    if "burst" in phases:
        log(f"cold bursts (--concurrency {k['BURST_CONCURRENCY']}):")
        e = burst_envoy(k, workdir, envoy_bin, tokengate, envoy_cpu)
        try:
            res["burst"] = phase_burst(k, e, log)
        finally:
            e.stop()
    if "rss" in phases:
        log(f"memory (--concurrency {k['RSS_CONCURRENCY']}, max_entries {k['RSS_MAX_ENTRIES']}):")
        e = rss_envoy(k, workdir, envoy_bin, tokengate, envoy_cpu)
        try:
            res["rss"] = phase_rss(k, e, wrk, log, workdir)
        finally:
            e.stop()
    res["meta"]["loadavg_end"] = os.getloadavg()
    if os.environ.get("BENCH_KEEP"):
        keep_phases(res, os.environ["BENCH_KEEP"], phases)
    res["ratios"], res["targets"] = ratios_and_targets(res)
    md = report(res, k)
    (out_dir / "results.md").write_text(md)
    (out_dir / "results.json").write_text(json.dumps(res, indent=1, default=str))
    err = chart(res, k, out_dir / "results.png")
    print()
    print(md)
    if err:
        print(f"chart: {err}")
    else:
        print(f"wrote {out_dir / 'results.md'}, {out_dir / 'results.png'}, {out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
