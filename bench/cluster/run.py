#!/usr/bin/env python3
"""`make bench-cluster`: how long a revocation takes to reach the other Envoys (issue 7).

On 127.0.0.1, free ports: a 3-member etcd cluster, the mock IdP, the echo upstream and
3 Envoys with tokengate (the shipped bootstrap envoy/envoy.yaml with `cluster_sync`,
--concurrency 2, poll_ms 500), built with the e2e harness (tests/e2e/harness/).

For each of N revocations (default 100):
  1. a fresh token, answered 200 by every Envoy (so cached as active: a later 401 on
     Envoy 2 or 3 can only come from the denylist, that is from etcd);
  2. a random pause of 0..poll_ms, so that revocations land at every phase of the
     pollers' cycle instead of right after the previous one's propagation;
  3. RFC 7009 revoke on Envoy 1's admin listener; the clock starts when its reply
     (which comes after the write to etcd) arrives;
  4. Envoy 2 and Envoy 3 are polled in parallel, each every ~10 ms on a new connection,
     until each answers 401 "revoked": the delay is the time to that first 401.

Reported: median, p90, p99 (nearest rank) and max per Envoy, over both, and of "every
Envoy" (the later of the two per revocation); the admin reply time. A delay carries up
to one polling interval (~10 ms plus a request) of measurement slack.
Writes bench/cluster/results.md and bench/cluster/results.json; prints the table.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from harness import EchoUpstream, Envoy, Etcd, MockIdp, Processes, bearer, request  # noqa: E402

ADMIN = bearer("admin-demo-token")
REVOKED = "the token has been revoked"


def percentile(values, p):
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(values):
    return {
        "n": len(values),
        "min": min(values),
        "median": statistics.median(values),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def status(envoy, token):
    try:
        return envoy.get("/", bearer(token), timeout=5.0).status
    except OSError:
        return 0


def first_401(envoy, token, since, interval, limit, out):
    """Seconds from `since` to envoy's first 401 for token (None if not within limit)."""
    out[envoy.name] = None
    while time.monotonic() - since < limit:
        asked = time.monotonic()
        if status(envoy, token) == 401:
            out[envoy.name] = time.monotonic() - since
            return
        time.sleep(max(0.0, interval - (time.monotonic() - asked)))


def revoke(envoy, token):
    body = urllib.parse.urlencode({"token": token}).encode()
    headers = {**ADMIN, "Content-Type": "application/x-www-form-urlencoded"}
    return request(envoy.listener_port("tokengate_admin"), "/tokengate/revoke", headers, "POST", body, timeout=30)


def version(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        lines = [l.strip() for l in out.splitlines() if l.strip()]
        return re.split(r"(?i)version:", lines[0])[-1].strip() if lines else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--revocations", type=int, default=int(os.environ.get("BENCH_CLUSTER_REVOCATIONS", 100)))
    parser.add_argument("--poll-ms", type=int, default=500)
    parser.add_argument("--timeout-ms", type=int, default=1000)
    parser.add_argument("--interval-ms", type=float, default=10.0, help="how often Envoy 2 and 3 are asked")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=HERE / "results.md")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    workdir = Path(tempfile.mkdtemp(prefix="tokengate-bench-cluster-"))
    procs = Processes()
    ok = False
    try:
        print(f"work dir (logs): {workdir}", flush=True)
        etcd = Etcd(procs, workdir).start()
        idp = MockIdp(procs, workdir).start()
        upstream = EchoUpstream(procs, workdir)
        config = idp.plugin_config(
            cluster_sync=etcd.sync_config(poll_ms=args.poll_ms, timeout_ms=args.timeout_ms),
        )
        envoys = [
            Envoy(procs, workdir, idp.port, upstream.port, config, concurrency=args.concurrency,
                  name=f"envoy-{i}", extra_clusters=[etcd.envoy_cluster()])
            for i in (1, 2, 3)
        ]
        for envoy in envoys:
            envoy.launch()
        for envoy in envoys:
            envoy.wait_ready(timeout=60)
        one, others = envoys[0], envoys[1:]
        for envoy in envoys:
            deadline = time.monotonic() + 10
            while envoy.counter("cluster.etcd.membership_healthy") != 3:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{envoy.name} does not see 3 healthy etcd members")
                time.sleep(0.05)

        limit = args.poll_ms / 1000 + 10
        rows, warm = [], args.warmup
        total = args.revocations + warm
        for i in range(total):
            token = idp.issue_token(scope="read", client_id=f"bench-{i}", sub="bench", ttl=900)
            for envoy in envoys:
                got = status(envoy, token)
                if got != 200:
                    raise RuntimeError(f"{envoy.name} answered {got} for a fresh token")
            time.sleep(rng.uniform(0, args.poll_ms / 1000))
            asked = time.monotonic()
            resp = revoke(one, token)
            replied = time.monotonic()
            sync = resp.json().get("cluster_sync") if resp.status == 200 else None
            if resp.status != 200:
                raise RuntimeError(f"revoke answered {resp}")
            found = {}
            threads = [
                threading.Thread(target=first_401, args=(e, token, replied, args.interval_ms / 1000, limit, found))
                for e in others
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for envoy in others:  # the 401 is the denylist's, not the IdP's
                body = envoy.get("/", bearer(token)).json()
                if body.get("error_description") != REVOKED:
                    raise RuntimeError(f"{envoy.name}: unexpected 401 body {body}")
            if i < warm:
                continue
            row = {"i": i - warm, "reply_s": replied - asked, "cluster_sync": sync,
                   **{e.name: found[e.name] for e in others}}
            rows.append(row)
            if (i - warm + 1) % 10 == 0:
                print(f"  {i - warm + 1}/{args.revocations}: last "
                      + ", ".join(f"{e.name} {found[e.name] * 1000:.0f} ms" if found[e.name] is not None
                                  else f"{e.name} never" for e in others), flush=True)

        missing = [r for r in rows for e in others if r[e.name] is None]
        if missing:
            raise RuntimeError(f"{len(missing)} revocation(s) never reached an Envoy within {limit}s: {missing[:3]}")
        per = {e.name: summary([r[e.name] for r in rows]) for e in others}
        both = summary([r[e.name] for r in rows for e in others])
        every = summary([max(r[e.name] for e in others) for r in rows])
        reply = summary([r["reply_s"] for r in rows])
        outcomes = {k: sum(1 for r in rows if r["cluster_sync"] == k) for k in {r["cluster_sync"] for r in rows}}
        sync_stats = {e.name: {k.split("tokengate.")[1]: v for k, v in e.tokengate_stats().items() if ".sync." in k}
                      for e in envoys}
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "revocations": args.revocations, "poll_ms": args.poll_ms, "timeout_ms": args.timeout_ms,
            "interval_ms": args.interval_ms, "concurrency": args.concurrency, "seed": args.seed,
            "cpus": os.cpu_count(), "machine": platform.platform(),
            "envoy": version([os.environ.get("ENVOY_BIN") or str(REPO / ".deps/envoy/envoy/_bin/envoy"), "--version"]),
            "etcd": version([etcd.binary, "--version"]),
            "wasm_sha256": hashlib.sha256(Path(envoys[0].wasm).read_bytes()).hexdigest()[:16],
        }
        results = {"meta": meta, "per_envoy": per, "both": both, "every_envoy": every, "admin_reply": reply,
                   "cluster_sync_outcomes": outcomes, "sync_metrics": sync_stats, "rows": rows}
        markdown = render(results, [e.name for e in others])
        args.out.write_text(markdown)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
        print()
        print(markdown)
        print(f"written: {args.out} and {args.out.with_suffix('.json')}")
        ok = True
    finally:
        procs.stop_all()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}", file=sys.stderr)


def ms(v):
    return f"{v * 1000:.0f}"


def render(results, names):
    m = results["meta"]
    lines = [
        "# Cluster sync: revocation propagation delay",
        "",
        f"`make bench-cluster`, {m['date']}: {m['revocations']} revocations on Envoy 1 (RFC 7009 form, admin listener);"
        f" the delay is from Envoy 1's admin reply (sent after the write to etcd) to the first 401 \"revoked\""
        f" on Envoy 2 and Envoy 3, each asked every ~{m['interval_ms']:.0f} ms on a new connection.",
        "",
        f"Setup: 3-member etcd cluster (etcd {m['etcd']}), 3 Envoys (Envoy {m['envoy']}, --concurrency {m['concurrency']}),"
        f" `cluster_sync.poll_ms` {m['poll_ms']}, `timeout_ms` {m['timeout_ms']}, all on 127.0.0.1 of one"
        f" {m['cpus']}-CPU machine ({m['machine']}); wasm sha256 {m['wasm_sha256']}…; a random 0..poll_ms pause"
        f" before each revocation (seed {m['seed']}).",
        "",
        "| delay (ms) | n | min | median | p90 | p99 | max | mean |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    table = [(f"Envoy {n.rsplit('-', 1)[1]}", results["per_envoy"][n]) for n in names]
    table += [("both (every sample)", results["both"]), ("every Envoy (later of the two)", results["every_envoy"]),
              ("admin reply on Envoy 1", results["admin_reply"])]
    for label, s in table:
        lines.append(f"| {label} | {s['n']} | {ms(s['min'])} | {ms(s['median'])} | {ms(s['p90'])} | {ms(s['p99'])}"
                     f" | {ms(s['max'])} | {ms(s['mean'])} |")
    lines += [
        "",
        f"Admin replies: {', '.join(f'{k}: {v}' for k, v in sorted(results['cluster_sync_outcomes'].items(), key=str))}.",
        "",
        "Reading: each Envoy process has one poller (a root context holding the leader lease) that reads"
        " etcd's changes every poll_ms, checked on its tick (every poll_ms / 2), so a poll starts 500 to 750 ms"
        " after the previous answer; the delay is where in that cycle the revocation lands, plus one etcd"
        " read and the denylist update. Percentiles are nearest-rank; p99 of 100 samples is the 99th value.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
