#!/usr/bin/env python3
"""Soak: steady load and steady revocations against a 4-worker Envoy with the
shipped envoy/envoy.yaml (data and admin listeners), the mock IdP and the echo
upstream, all on 127.0.0.1.

    tests/soak/soak.py --minutes 10 [--connections 48] [--pool 200] [--json out.json]
    (or: make soak SOAK_MINUTES=10)

Load: `--connections` keep-alive connections (one Python thread each) send
GETs with a bearer token from a pool of valid tokens, or (one request in five)
from the tokens revoked last, so that refusals are exercised too.
Revocations: every `--revoke-every-ms` (100) one token of the pool is revoked
through the admin API (RFC 7009 form) and replaced in the pool by a new one.

Reported, and what must hold (exit status 1 otherwise):
  requests served, by status; revocations made (their latency)
  revoked tokens served after their revoke answer  must be 0: a request *sent*
      after the admin call *returned* that got 200 for that token
  unexpected answers (5xx, transport errors, other 4xx)     must be 0
  admin revocations that did not answer 200                 must be 0
  wasm failures in Envoy's log (panic, trap, VM failure)    must be 0
  Envoy's RSS (VmRSS) after the warm-up and at the end      growth within
      max(--rss-margin-mib, --rss-margin-pct % of the warm RSS); the slope
      after the warm-up is reported too.

On the margin: every revocation brings a new token into the load, so the
caches keep filling (each worker's local cache up to `cache.local_entries`,
the shared one up to `cache.max_entries`) and the denylist keeps growing
(records live as long as their tokens): memory grows by design, bounded by
those settings. Measured here (2 cores, 48 connections, 10 revocations/s):
about 0.9 MiB/min after the warm-up, 105 -> 108 MiB over 3 minutes. The
default margin, 16 MiB or 10 %, holds runs of up to about 15 minutes at these
rates; for longer soaks raise it, or read the slope.
"""
import argparse
import array
import collections
import http.client
import json
import random
import secrets
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e"))

from harness import LOOPBACK, EchoUpstream, Envoy, MockIdp, Processes  # noqa: E402
from wasm_log import failure_lines  # noqa: E402

ADMIN_TOKEN = "admin-demo-token"
REVOKED_SHARE = 0.2  # of the requests, with a recently revoked token
RECENT_REVOKED = 64  # how many of the last revoked tokens the load keeps using


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=1.0)
    p.add_argument("--connections", type=int, default=48)
    p.add_argument("--pool", type=int, default=200, help="valid tokens in use at any time")
    p.add_argument("--revoke-every-ms", type=int, default=100)
    p.add_argument("--warmup-s", type=float, default=None, help="default: a quarter of the run, at most 60 s")
    p.add_argument("--rss-margin-mib", type=float, default=16.0)
    p.add_argument("--rss-margin-pct", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=4, help="Envoy workers")
    p.add_argument("--json", type=Path, help="write the figures here too")
    p.add_argument("--workdir", type=Path, help="logs and configs (default: a temporary directory)")
    return p.parse_args()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Shared:
    """What the load, the revoker and the sampler share."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tokens = []  # token id -> token
        self.pool = []  # ids of valid tokens
        self.recent = collections.deque(maxlen=RECENT_REVOKED)  # ids of the last revoked tokens
        self.returned = {}  # token id -> monotonic time its revoke call returned
        self.submitted = {}  # token id -> monotonic time its revoke call was sent
        self.stop = threading.Event()

    def add(self, token):
        with self.lock:
            self.tokens.append(token)
            return len(self.tokens) - 1

    def pick(self, rng):
        with self.lock:
            if self.recent and rng.random() < REVOKED_SHARE:
                i = rng.choice(self.recent)
            else:
                i = rng.choice(self.pool)
            return i, self.tokens[i]


class LoadThread(threading.Thread):
    def __init__(self, shared, port, seed):
        super().__init__(daemon=True)
        self.shared, self.port, self.rng = shared, port, random.Random(seed)
        self.statuses = collections.Counter()
        # Every 200, as (token id, monotonic send time): judged at the end, when every
        # revoke's return time is known (no race with the revoker's bookkeeping).
        self.ok_ids = array.array("l")
        self.ok_sent = array.array("d")
        # Every 401, as (token id, monotonic receive time): a valid token refused is a failure.
        self.refused_ids = array.array("l")
        self.refused_at = array.array("d")

    def run(self):
        conn = None
        while not self.shared.stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
            i, token = self.shared.pick(self.rng)
            sent = time.monotonic()
            try:
                conn.request("GET", "/soak", headers={"Authorization": f"Bearer {token}"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = None
            self.statuses[status] += 1
            if status == 200:
                self.ok_ids.append(i)
                self.ok_sent.append(sent)
            elif status == 401:
                self.refused_ids.append(i)
                self.refused_at.append(time.monotonic())
        if conn is not None:
            conn.close()


class Revoker(threading.Thread):
    def __init__(self, shared, idp, admin_port, every_s):
        super().__init__(daemon=True)
        self.shared, self.idp, self.port, self.every_s = shared, idp, admin_port, every_s
        self.made = 0
        self.failed = collections.Counter()
        self.latencies = []
        self.rng = random.Random(7)

    def run(self):
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
        next_at = time.monotonic()
        while not self.shared.stop.is_set():
            next_at += self.every_s
            with self.shared.lock:
                i = self.shared.pool.pop(self.rng.randrange(len(self.shared.pool)))
                token = self.shared.tokens[i]
            body = urllib.parse.urlencode({"token": token, "token_type_hint": "access_token"})
            headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/x-www-form-urlencoded"}
            started = time.monotonic()
            self.shared.submitted[i] = started
            try:
                conn.request("POST", "/tokengate/revoke", body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
            returned = time.monotonic()
            if status == 200:
                self.shared.returned[i] = returned
                self.made += 1
                self.latencies.append(returned - started)
                with self.shared.lock:
                    self.shared.recent.append(i)
            else:
                self.failed[status] += 1
            # Keep the pool full: a new valid token takes the revoked one's place.
            fresh = secrets.token_urlsafe(32)
            self.idp.register_active(fresh, ttl=3600)
            j = self.shared.add(fresh)
            with self.shared.lock:
                self.shared.pool.append(j)
            time.sleep(max(0.0, next_at - time.monotonic()))
        conn.close()


class Sampler(threading.Thread):
    def __init__(self, shared, pid, started):
        super().__init__(daemon=True)
        self.shared, self.pid, self.started = shared, pid, started
        self.samples = []  # (seconds since start, KiB)

    def run(self):
        while not self.shared.stop.wait(1.0):
            try:
                self.samples.append((time.monotonic() - self.started, rss_kib(self.pid)))
            except OSError:
                return


def slope_mib_per_min(samples):
    if len(samples) < 3:
        return 0.0
    n = len(samples)
    mx = sum(t for t, _ in samples) / n
    my = sum(r for _, r in samples) / n
    var = sum((t - mx) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    k = sum((t - mx) * (r - my) for t, r in samples) / var  # KiB per second
    return k * 60 / 1024


def main():
    args = parse_args()
    duration = args.minutes * 60
    warmup = args.warmup_s if args.warmup_s is not None else min(60.0, duration / 4)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tokengate-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    procs = Processes()
    try:
        return run(args, duration, warmup, workdir, procs)
    finally:
        procs.stop_all()


def run(args, duration, warmup, workdir, procs):
    upstream = EchoUpstream(procs, workdir)
    idp = MockIdp(procs, workdir).start()
    envoy = Envoy(procs, workdir, idp.port, upstream.port, idp.plugin_config(),
                  concurrency=args.concurrency, name="envoy-soak").start()
    pid = envoy.proc.popen.pid
    print(f"soak: {args.minutes:g} min, {args.connections} connections, pool {args.pool}, "
          f"a revocation every {args.revoke_every_ms} ms, warm-up {warmup:.0f} s; logs in {workdir}", flush=True)

    shared = Shared()
    for _ in range(args.pool):
        token = secrets.token_urlsafe(32)
        idp.register_active(token, ttl=3600)
        shared.pool.append(shared.add(token))

    started = time.monotonic()
    rss_start = rss_kib(pid)
    sampler = Sampler(shared, pid, started)
    loaders = [LoadThread(shared, envoy.port, seed) for seed in range(args.connections)]
    revoker = Revoker(shared, idp, envoy.listener_port("tokengate_admin"), args.revoke_every_ms / 1000)
    for t in [sampler, *loaders, revoker]:
        t.start()
    last_report = started
    while time.monotonic() - started < duration:
        time.sleep(1.0)
        if not envoy.alive():
            print("soak: Envoy exited", file=sys.stderr)
            break
        if time.monotonic() - last_report >= 15:
            last_report = time.monotonic()
            served = sum(sum(t.statuses.values()) for t in loaders)
            rss = sampler.samples[-1][1] / 1024 if sampler.samples else 0
            print(f"  t={last_report - started:5.0f}s  requests={served}  revocations={revoker.made}  "
                  f"rss={rss:.1f} MiB", flush=True)
    shared.stop.set()
    for t in [*loaders, revoker, sampler]:
        t.join(15)
    elapsed = time.monotonic() - started
    rss_end = rss_kib(pid) if envoy.alive() else 0

    # Every 200 judged against the return time of its token's revocation, every 401 against
    # the send time of its token's revocation: a valid token refused means the product stopped
    # serving (a filter that denies everything must fail the soak).
    served_after_revoke = valid_served = 0
    for t in loaders:
        for i, sent in zip(t.ok_ids, t.ok_sent):
            returned = shared.returned.get(i)
            if returned is not None and sent > returned:
                served_after_revoke += 1
            elif i not in shared.submitted:
                valid_served += 1
    revoked_refused = valid_refused = 0
    for t in loaders:
        for i, at in zip(t.refused_ids, t.refused_at):
            submitted = shared.submitted.get(i)
            if submitted is not None and at > submitted:
                revoked_refused += 1
            else:
                valid_refused += 1
    statuses = collections.Counter()
    for t in loaders:
        statuses.update(t.statuses)
    total = sum(statuses.values())
    unexpected = {s: n for s, n in statuses.items() if s not in (200, 401)}
    listed = None  # a listing that fails leaves None, which fails its check
    try:
        resp = http.client.HTTPConnection(LOOPBACK, envoy.listener_port("tokengate_admin"), timeout=30)
        resp.request("GET", "/tokengate/revocations?limit=1", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        listed = json.loads(resp.getresponse().read())["count"]
    except (OSError, ValueError, KeyError) as e:
        print(f"soak: listing the revocations failed: {e!r}", file=sys.stderr)
    envoy.stop()
    log_failures = failure_lines(envoy.log_text())

    warm = [(t, r) for t, r in sampler.samples if t >= warmup]
    rss_warm = warm[0][1] if warm else rss_start
    margin_kib = max(args.rss_margin_mib * 1024, rss_warm * args.rss_margin_pct / 100)
    growth_kib = rss_end - rss_warm
    latencies = sorted(revoker.latencies) or [0.0]
    figures = {
        "minutes": round(elapsed / 60, 2),
        "connections": args.connections,
        "requests": total,
        "requests_per_s": round(total / elapsed, 1),
        "statuses": dict(sorted(statuses.items())),
        "revoked_requests_refused": revoked_refused,
        "valid_requests_served": valid_served,
        "valid_requests_refused": valid_refused,
        "revocations": revoker.made,
        "revocations_listed": listed,
        "revoke_latency_ms_p50": round(latencies[len(latencies) // 2] * 1000, 1),
        "revoke_latency_ms_max": round(latencies[-1] * 1000, 1),
        "revoked_served_after_revoke": served_after_revoke,
        "unexpected": unexpected,
        "admin_failures": dict(revoker.failed),
        "log_failures": len(log_failures),
        "rss_mib": {
            "start": round(rss_start / 1024, 1),
            "after_warmup": round(rss_warm / 1024, 1),
            "end": round(rss_end / 1024, 1),
            "max": round(max((r for _, r in sampler.samples), default=0) / 1024, 1),
            "growth_after_warmup": round(growth_kib / 1024, 1),
            "allowed_growth": round(margin_kib / 1024, 1),
            "slope_mib_per_min_after_warmup": round(slope_mib_per_min(warm), 2),
        },
    }
    checks = {
        "no revoked token served after its revoke returned": served_after_revoke == 0,
        "no unexpected answer (5xx, transport error, other 4xx)": not unexpected,
        "valid tokens were served (200)": valid_served > 0,
        "no valid token refused (401 before its revocation was sent)": valid_refused == 0,
        "every revocation answered 200": not revoker.failed and revoker.made > 0,
        "revoked tokens were refused (the check was exercised)": figures["revoked_requests_refused"] > 0,
        "every revocation is listed": listed == revoker.made,
        "no wasm failure in Envoy's log": not log_failures,
        "Envoy ran to the end": rss_end > 0,
        "RSS flat after the warm-up": growth_kib <= margin_kib,
    }
    figures["checks"] = checks
    print(json.dumps(figures, indent=2))
    for line in log_failures[:20]:
        print("  log: " + line, file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    failed = [name for name, ok in checks.items() if not ok]
    for name in failed:
        print(f"soak: FAILED: {name}", file=sys.stderr)
    print("soak: " + ("FAILED" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
