"""The benchmark's report (bench/results.md) and chart (bench/results.png), from the numbers
run.py measured (bench/results.json); `BENCH_RERENDER=bench/results.json` writes them again
without measuring."""
import functools
import statistics

from variants import CG_LABEL, CG_ORDER, CG_REF, IDP_ANSWER, JWT_ALGS, JWT_VARIANTS, LADDER_ALT, VARIANT_INFO


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def cg_medians(cg):
    return {v: {"ir": med([r["ir_per_req"] for r in rs]), "jit": med([r["jit_per_req"] for r in rs])}
            for v, rs in cg["results"].items() if rs}


def summarize(rounds, variants):
    out = {}
    for v in variants:
        rs = [r[v] for r in rounds if v in r]
        if not rs:
            continue
        out[v] = {key: med([r[key] for r in rs]) for key in
                  ("rps", "p50_us", "p90_us", "p99_us", "envoy_cpu_us_per_req", "envoy_cpu_util", "envoy_wait_util",
                   "wrk_cpu_util")}
        out[v]["rps_min"] = min(r["rps"] for r in rs)
        out[v]["rps_max"] = max(r["rps"] for r in rs)
        out[v]["errors"] = sum(r["errors"] for r in rs)
        out[v]["introspections"] = sum(r["introspections"] for r in rs)
    return out


def fmt_us(us):
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def pair(rounds, a, b):
    """(req/s a/b, CPU per request b/a), each the median of the ratios taken round by round: a
    round's two measurements share that round's machine, so the drift between rounds cancels out
    of each ratio."""
    both = [r for r in rounds if a in r and b in r]
    if not both:
        return None
    return (med([r[a]["rps"] / r[b]["rps"] for r in both]),
            med([r[b]["envoy_cpu_us_per_req"] / r[a]["envoy_cpu_us_per_req"] for r in both]))


def throughput_table(L, summ):
    L.append("| variant | | req/s (min–max) | p50 | p90 | p99 | Envoy CPU µs/req | Envoy on core | Envoy waiting for core | wrk on core | errors |")
    L.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for v, s in summ.items():
        L.append(f"| {v} | {VARIANT_INFO[v]} | {s['rps']:,.0f} ({s['rps_min']:,.0f}–{s['rps_max']:,.0f}) | "
                 f"{fmt_us(s['p50_us'])} | {fmt_us(s['p90_us'])} | {fmt_us(s['p99_us'])} | "
                 f"{s['envoy_cpu_us_per_req']:.2f} | {s['envoy_cpu_util'] * 100:.0f}% | "
                 f"{s['envoy_wait_util'] * 100:.0f}% | {s['wrk_cpu_util'] * 100:.0f}% | {s['errors']} |")
    L.append("")


def jwt_section(L, res, k):
    """The cached JWT hit against jwt_authn and the floor (the jwt phase), and what one cold
    verification costs per algorithm (the callgrind phase)."""
    jwt = res.get("jwt")
    cgm = cg_medians(res["callgrind"]) if (res.get("callgrind") or {}).get("results") else {}
    cold = [alg for alg in JWT_ALGS if f"J{alg}" in cgm]
    if not jwt and not cold:
        return
    L.append("## JWT access tokens: a cached hit against Envoy's jwt_authn")
    L.append("")
    if jwt:
        L.append(f"The same Envoy and load as the throughput table, in rounds of their own ({len(jwt['rounds'])} "
                 f"rounds of {k['SECONDS']} s per variant, order rotated each round). Every request carries the "
                 f"same {jwt['token_bytes']:,}-byte RS256 access token (`typ` at+jwt, `aud`, `exp` a day ahead, "
                 "`scope`, `client_id`, `sub`, `jti` and Keycloak's usual profile claims): tokengate with a `jwt` "
                 "section holding the issuer's keys inline (J, verified once before the run, then cached), Envoy's "
                 "`jwt_authn` with the same keys as `local_jwks`, its JWT cache on (`jwt_cache_config`), "
                 "`forward: true` and the same three claim headers (N), and the no-op floor (BJ). jwt_authn "
                 "checks no scope and no denylist; tokengate does both on every request.")
        L.append("")
        throughput_table(L, summarize(jwt["rounds"], JWT_VARIANTS))
        L.append("| ratio (median of the per-round ratios) | by req/s | by Envoy CPU per request (inverse) |")
        L.append("| --- | ---: | ---: |")
        for name, a, b in (("tokengate JWT hit / jwt_authn (J/N)", "J", "N"),
                           ("tokengate JWT hit / no-op, same token (J/BJ)", "J", "BJ"),
                           ("no-op / jwt_authn (BJ/N)", "BJ", "N")):
            p = pair(jwt["rounds"], a, b)
            if p:
                L.append(f"| {name} | {p[0]:.3f} | {p[1]:.3f} |")
        L.append("")
        stats = ", ".join(f"`{n}` {v:,}" for n, v in sorted(jwt["jwt_authn"].items()) if v)
        L.append(f"During the rounds: jwt_authn's counters {stats or 'none'}; tokengate verified "
                 f"{jwt['tokengate_verified']} JWT(s) in the whole run (the rest were cache hits).")
        L.append("")
    if all(v in cgm for v in ("BJ", "J", "N")):
        L.append(f"By instructions (callgrind, same token): no-op {cgm['BJ']['ir']:,.0f}, tokengate {cgm['J']['ir']:,.0f}, "
                 f"jwt_authn {cgm['N']['ir']:,.0f} per request; tokengate / no-op {cgm['BJ']['ir'] / cgm['J']['ir']:.3f}, "
                 f"tokengate / jwt_authn {cgm['N']['ir'] / cgm['J']['ir']:.3f} (throughput ratios implied).")
        L.append("")
    if cold:
        cg = res["callgrind"]
        L.append("### One cold verification, per algorithm")
        L.append("")
        L.append(f"Callgrind, Envoy's worker thread: {cg.get('cold_requests', '?')} requests per round, each with a JWT "
                 "never seen before (distinct `jti`, pre-signed), after 20 such requests unmeasured; median of "
                 f"{cg['rounds']} rounds. *Over a cached hit*: the request's instructions minus those of the "
                 "cached RS256 hit of the same verifier, i.e. one verification plus what a miss does beyond a "
                 "hit (tokengate: hashing the new token, base64 and JSON decoding, the signature, the claim "
                 "checks, storing the answer in shared data and the worker's cache; jwt_authn: parsing, the "
                 "signature, inserting in its JWT cache). The algorithms' differences are the signature alone. "
                 "RSA keys have 2048 bits; ES256 is P-256; EdDSA is Ed25519.")
        L.append("")
        L.append("| algorithm | token bytes | tokengate instructions/req | over its cached hit | jwt_authn instructions/req | over its cached hit | tokengate / jwt_authn (over the hit) |")
        L.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for alg in cold:
            t, n = cgm[f"J{alg}"]["ir"], cgm.get(f"N{alg}", {}).get("ir")
            t_over = t - cgm["J"]["ir"] if "J" in cgm else None
            n_over = n - cgm["N"]["ir"] if n is not None and "N" in cgm else None
            size = cg.get("cold_token_bytes", {}).get(alg)
            cells = [f"{size:,}" if size else "", f"{t:,.0f}", f"{t_over:+,.0f}" if t_over is not None else "",
                     f"{n:,.0f}" if n is not None else "", f"{n_over:+,.0f}" if n_over is not None else "",
                     f"{t_over / n_over:.1f}×" if t_over and n_over else ""]
            L.append(f"| {alg} | " + " | ".join(cells) + " |")
        L.append("")


def mark(ok):
    return "met" if ok else "**not met**"


def report(res, k):
    L = []
    meta = res["meta"]
    L.append("# tokengate benchmark")
    L.append("")
    noisy = k["PROFILE"] != "full" or max(meta["loadavg_start"][0], meta["loadavg_end"][0]) > 0.5
    if noisy:
        L.append(f"> **Indicative only**: profile `{k['PROFILE']}`, load average {meta['loadavg_start'][0]:.2f} at the "
                 f"start and {meta['loadavg_end'][0]:.2f} at the end. Use `BENCH_PROFILE=full` on a quiet machine "
                 "for numbers to quote.")
        L.append("")
    L.append(f"{meta['date']} · tokengate `{meta['commit']}` · Envoy {meta['envoy']} (V8) · {meta['cpu_model']} "
             f"({meta['ncpu']} cores) · Linux {meta['kernel']}")
    L.append("")
    if meta.get("kept"):
        L.append("Not run this time (`BENCH_KEEP`), so these sections are an earlier run's: " + "; ".join(
            f"{phase} from {origin}" for phase, origin in meta["kept"].items()) + ".")
        L.append("")
    L.append(f"Envoy pinned to core {meta['envoy_cpu']}, load generator (wrk {k['THREADS']} threads, "
             f"{k['CONNECTIONS']} keep-alive connections) and this script to core {meta['load_cpu']}, all on "
             f"127.0.0.1. Throughput variants share one Envoy with **one worker** (`--concurrency 1`): the ratios "
             f"are per-core costs. Every listener answers with a direct response, so only the filter differs. "
             f"{k['ROUNDS']} rounds of {k['SECONDS']} s per variant (after {k['WARMUP']} s of warm-up), variants "
             f"in each round in an order rotated by one from the round before; medians across rounds. A ratio "
             f"is taken within each round (both measurements on that round's machine), then its median across "
             f"rounds. A run with any error (non-2xx, timeout, socket error) is refused, not reported.")
    L.append("")
    summ = res.get("summary") or {}
    if summ:
        L.append("## Throughput and latency (medians)")
        L.append("")
        throughput_table(L, summ)
        L.append("*Envoy on core*: share of the wall time Envoy's threads ran; *waiting for core*: share they were "
                 "runnable while something else had the core (other processes on the machine: noise).")
        L.append("")
        if any(s["wrk_cpu_util"] > 0.9 for s in summ.values()):
            L.append("A variant whose wrk core is over 90% busy may be limited by the load generator; its Envoy "
                     "CPU µs/req is the figure to compare.")
            L.append("")
        introspected = summ.get("C", {}).get("introspections", 0) + summ.get("C2", {}).get("introspections", 0)
        L.append(f"Introspections during the measured C/C2 runs: {introspected} (all tokens were cached beforehand).")
        L.append("")
    ratios = res.get("ratios") or []
    targets = res.get("targets") or []
    if ratios:
        L.append("## Ratios")
        L.append("")
        L.append("| ratio (median of the per-round ratios) | by req/s | by Envoy CPU per request (inverse) |")
        L.append("| --- | ---: | ---: |")
        for name, by_rps, by_cpu in ratios:
            L.append(f"| {name} | {by_rps:.3f} | {by_cpu:.3f} |")
        L.append("")
        if "A" in summ:
            base = summ["A"]["envoy_cpu_us_per_req"]
            parts = ", ".join(f"{v} +{summ[v]['envoy_cpu_us_per_req'] - base:.2f} µs" for v in summ if v != "A")
            L.append(f"Added Envoy CPU per request over bare Envoy ({base:.2f} µs): {parts}.")
            L.append("")
    if targets:
        L.append("## Targets")
        L.append("")
        L.append("| target | measured | |")
        L.append("| --- | --- | --- |")
        for name, value, ok in targets:
            L.append(f"| {name} | {value} | {mark(ok) if ok is not None else 'not measured'} |")
        L.append("")
    jwt_section(L, res, k)
    lad = res.get("ladder")
    if lad:
        L.append("## Where tokengate's cost goes: the profile ladder")
        L.append("")
        L.append("The no-op filter (bench/noop) with tokengate's cache-hit steps added one at a time, then tokengate "
                 f"itself; Envoy CPU per request, median of {len(lad['rounds'])} rounds of {k['LADDER_SECONDS']} s.")
        L.append("")
        L.append("| step | Envoy CPU µs/req | step cost µs | req/s |")
        L.append("| --- | ---: | ---: | ---: |")
        prev = None
        cpus = {}
        for label, name in lad["steps"]:
            cpu = med([r[name]["envoy_cpu_us_per_req"] for r in lad["rounds"]])
            cpus[name] = cpu
            rps = med([r[name]["rps"] for r in lad["rounds"]])
            if name == f"L{LADDER_ALT}":
                prev = cpus.get(f"L{LADDER_ALT - 1}", prev)  # compared with the replaces
            step = "" if prev is None else f"{cpu - prev:+.2f}"
            L.append(f"| {label} | {cpu:.2f} | {step} | {rps:,.0f} |")
            prev = cpu
        L.append("")
        L.append("The last step (tokengate minus the full ladder) is tokengate's own Rust work on a hit (bearer "
                 "parsing, the denylist memo and local-cache lookups, the policy decision) less what tokengate does "
                 "more cheaply than the ladder's copies: it reads the header map in place instead of through the "
                 "SDK's copy, its denylist generation key has an empty value (nothing copied into wasm memory), and "
                 "it adds the claim headers instead of replacing them. It can be negative.")
        L.append("")
    cg = res.get("callgrind")
    if cg:
        L.append("## Instructions per request (callgrind)")
        L.append("")
        if "error" in cg:
            L.append(f"Not measured: {cg['error']}")
        else:
            L.append(f"Envoy's worker thread (`--concurrency 1`) under `valgrind --tool=callgrind`, instrumented only while {cg['requests']} "
                     f"requests go over one keep-alive connection (after 50 uninstrumented ones), median of "
                     f"{cg['rounds']} rounds. Instructions are independent of whatever else the machine runs, "
                     "so these are the figures to attribute cost with. Everything but *nothing ever revoked* is "
                     "measured after one revocation (as in production, the denylist generation key then exists). "
                     "They leave out the kernel (socket I/O) "
                     "and cache misses. *JIT* is V8's code space: the compiled wasm plus V8's wasm-to-host "
                     "wrappers; the rest is Envoy's C++ (with V8's runtime).")
            L.append("")
            L.append("| variant / step | instructions/req | Δ | compared with | in JIT code |")
            L.append("| --- | ---: | ---: | --- | ---: |")
            cgm = cg_medians(cg)
            for v in CG_ORDER:
                if v not in cgm:
                    continue
                ref = CG_REF.get(v)
                delta = f"{cgm[v]['ir'] - cgm[ref]['ir']:+,.0f}" if ref in cgm else ""
                L.append(f"| {CG_LABEL[v]} | {cgm[v]['ir']:,.0f} | {delta} | {CG_LABEL.get(ref, '')} | "
                         f"{cgm[v]['jit']:,.0f} |")
            L.append("")
            if all(x in cgm for x in ("A", "B", "C", "D")):
                L.append(f"By instructions: tokengate/no-op cost {cgm['C']['ir'] / cgm['B']['ir']:.3f} "
                         f"(throughput ratio ≈ {cgm['B']['ir'] / cgm['C']['ir']:.3f}), tokengate/bare "
                         f"{cgm['C']['ir'] / cgm['A']['ir']:.2f}, ext_authz client side/tokengate "
                         f"{cgm['D']['ir'] / cgm['C']['ir']:.2f} (kernel work for D's extra connection not counted).")
                L.append("")
            sized = [(size, c, b) for size, c, b in (("1 KiB", "CL", "BL"), ("4 KiB", "C4", "B4")) if c in cgm and b in cgm]
            if sized:
                L.append("With a large token, against the no-op filter given the same token: " + ", ".join(
                    f"{size} {cgm[b]['ir'] / cgm[c]['ir']:.3f}" for size, c, b in sized) + " (throughput ratio by "
                    "instructions; each worker hashes a token once, then finds it in its memo).")
                L.append("")
    miss = res.get("miss")
    if miss:
        m0 = med([r["M0"]["envoy_cpu_us_per_req"] for r in miss])
        m1 = med([r["M1"]["envoy_cpu_us_per_req"] for r in miss])
        r0 = med([r["M0"]["rps"] for r in miss])
        r1 = med([r["M1"]["rps"] for r in miss])
        L.append("## The miss path (one worker)")
        L.append("")
        L.append("Every request a cache miss (tokens never seen before), against the floor of any filter that "
                 "calls out: the no-op with one introspection-shaped callout per request (`callout` step). The "
                 "IdP is a listener of the same Envoy, so both include serving the callout.")
        L.append("")
        L.append("| | Envoy CPU µs/req | req/s |")
        L.append("| --- | ---: | ---: |")
        L.append(f"| no-op + 1 callout per request | {m0:.1f} | {r0:,.0f} |")
        L.append(f"| tokengate, every request a miss | {m1:.1f} | {r1:,.0f} |")
        L.append(f"| tokengate's own miss work | {m1 - m0:+.1f} | |")
        L.append("")
    perf = res.get("perf")
    if perf:
        L.append("## CPU by DSO (perf record, Envoy's core)")
        L.append("")
        if "error" in perf:
            L.append(f"perf did not work here: {perf['error']}")
        else:
            names = []
            for v in perf:
                for d, _ in perf[v]["dso"]:
                    if d not in names:
                        names.append(d)
            L.append("| DSO | " + " | ".join(perf) + " |")
            L.append("| --- |" + " ---: |" * len(perf))
            for d in names:
                cells = [f"{dict(perf[v]['dso']).get(d, 0):.1f}%" for v in perf]
                L.append(f"| {d} | " + " | ".join(cells) + " |")
            L.append("")
            L.append("Envoy's binary is stripped, so perf names DSOs, not functions; V8's JIT code (the compiled "
                     "wasm and its host-call trampolines) shows as anonymous memory (`[JIT]`/`[unknown]`/`//anon`).")
        L.append("")
    bursts = res.get("burst")
    if bursts:
        L.append("## Cold burst: one new token")
        L.append("")
        L.append(f"A fresh Envoy with `--concurrency {k['BURST_CONCURRENCY']}`; each burst sends "
                 f"{k['BURST_REQUESTS']} requests over {k['BURST_CONNECTIONS']} already-open connections, all with "
                 f"one token never seen before; the IdP listener answers after {k['IDP_DELAY_MS']} ms, so the burst "
                 "arrives while the introspection is in flight. Introspections: `cluster.idp.upstream_rq_total`.")
        L.append("")
        L.append("| burst | workers reached | introspections | statuses | time | coalesced / local hits / shared hits |")
        L.append("| ---: | ---: | ---: | --- | ---: | --- |")
        for b in bursts:
            t = b["tokengate"]
            co = t.get("tokengate.cache.coalesced", 0)
            lh = t.get("tokengate.cache.hit.local", 0)
            sh = t.get("tokengate.cache.hit.shared", 0)
            st = ", ".join(f"{s}: {c}" for s, c in sorted(b["statuses"].items(), key=str))
            L.append(f"| {b['token']} | {b['workers_used']} | {b['introspections']} | {st} | {b['elapsed_s']:.2f} s | "
                     f"{co} / {lh} / {sh} |")
        L.append("")
    rss = res.get("rss")
    if rss:
        L.append("## Memory: Envoy RSS as distinct tokens pass through")
        L.append("")
        L.append(f"A fresh Envoy with `--concurrency {rss['concurrency']}`, `cache.max_entries` {rss['max_entries']:,}; "
                 "an Envoy listener answers every introspection with an active token; wrk sends tokens never sent "
                 "before (bench/lua/distinct.lua). VmRSS from `/proc/<pid>/status`, 2 s after each milestone.")
        L.append("")
        L.append("| distinct tokens | introspections | VmRSS | peak (VmHWM) | miss-path req/s | Envoy CPU µs/req | errors |")
        L.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for m in rss["milestones"]:
            rps = f"{m['rps']:,.0f}" if "rps" in m else ""
            cpu = f"{m['envoy_cpu_us_per_req']:.0f}" if "envoy_cpu_us_per_req" in m else ""
            L.append(f"| {m['tokens']:,} | {m['introspections']:,} | {m['rss_kib'] / 1024:.1f} MiB | "
                     f"{m['hwm_kib'] / 1024:.1f} MiB | {rps} | {cpu} | {m.get('errors', '')} |")
        L.append("")
        L.append("A miss costs one introspection callout (to a listener of the same Envoy, so its cost is on the "
                 "same core), a shared-data claim and a store (CAS rewrites of a JSON bucket), and a denylist "
                 "bucket read. Bounded structures fill at different points: the shared cache's buckets "
                 "(max_entries / 8 keys of up to 8 entries) fill over a few times max_entries; each worker's "
                 "local cache (4,096 answers) and its denylist memo (8,192 hashes: twice the local cache) after "
                 "a few thousand tokens per worker. RSS is flat once all three are full.")
        L.append("")
    sizes = res.get("wasm")
    if sizes:
        L.append("## Release wasm size")
        L.append("")
        for name, n in sizes.items():
            L.append(f"- {name}: {n:,} bytes ({n / 1024:.1f} KiB)")
        L.append("")
    if res.get("rounds"):
        L.append("## Every round")
        L.append("")
        L.append("| round | variant | req/s | p50 | p90 | p99 | Envoy CPU µs/req | errors |")
        L.append("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for i, row in enumerate(res["rounds"], 1):
            for v, r in row.items():
                L.append(f"| {i} | {v} | {r['rps']:,.0f} | {fmt_us(r['p50_us'])} | {fmt_us(r['p90_us'])} | "
                         f"{fmt_us(r['p99_us'])} | {r['envoy_cpu_us_per_req']:.2f} | {r['errors']} |")
        L.append("")
    L.append("## Method notes")
    L.append("")
    L.append("- Before measuring, one unrelated token is revoked through tokengate's admin API (a listener with the "
             "same vm_id, as in envoy/envoy.yaml): in production something has been revoked, so the denylist "
             "generation key exists and every request reads its value.")
    L.append("- The tokengate configuration is envoy/tokengate.json with `cache.max_ttl_s` raised to 86400, so no "
             "cached answer expires in the middle of a run (the hit path does not depend on the TTL). The IdP "
             "answer is `" + IDP_ANSWER.replace("|", "\\|") + "`, so the three claim headers are set on every "
             "request, as in production.")
    if k["AUTHZ"] == "separate":
        L.append("- D's authorization service is a second Envoy (one worker, a direct 200) pinned to the load "
                 "generator's core, so Envoy's core pays only for the ext_authz client side, as with a remote "
                 "authorizer (`BENCH_AUTHZ=same` puts it on Envoy's core instead).")
    else:
        L.append("- D's authorization service is another listener of the same Envoy (`BENCH_AUTHZ=same`), so its "
                 "cost is on Envoy's core too.")
    L.append("- Latency is wrk's (closed loop, 32 connections): it tracks throughput and is not an open-loop SLO "
             "figure.")
    L.append("- Envoy CPU µs/req is the CPU time of all Envoy threads (`/proc/<pid>/task/*/schedstat`) during the "
             "measured run divided by the requests served: it holds even when the load generator, not Envoy, is "
             "the limit.")
    L.append("")
    return "\n".join(L)


def ratios_and_targets(res):
    rounds = res.get("rounds") or []
    ratios, targets = [], []
    throughput = functools.partial(pair, rounds)

    for name, a, b in (("tokengate / no-op (C/B)", "C", "B"), ("tokengate / no-op, empty key (C/Be)", "C", "Be"),
                       ("tokengate / bare (C/A)", "C", "A"),
                       ("tokengate / ext_authz (C/D)", "C", "D"), ("tokengate 1k tokens / no-op (C2/B)", "C2", "B"),
                       ("tokengate / no-op, 1 KiB token (CL/BL)", "CL", "BL"),
                       ("tokengate / no-op, 4 KiB token (C4/B4)", "C4", "B4"),
                       ("tokengate without claim headers / no-op (C3/B)", "C3", "B"),
                       ("no-op / bare (B/A)", "B", "A"), ("ext_authz / bare (D/A)", "D", "A")):
        p = throughput(a, b)
        if p:
            ratios.append((name, *p))
    p = throughput("C", "B")
    measured = f"{p[0]:.3f}" if p else "–"
    cgm = cg_medians(res["callgrind"]) if (res.get("callgrind") or {}).get("results") else {}
    if "B" in cgm and "C" in cgm:
        measured += f" (by instructions {cgm['B']['ir'] / cgm['C']['ir']:.3f})"
    # The floor's read is of a key with a value; tokengate's per-request read is of an empty one.
    pe = throughput("C", "Be")
    if pe or ("Be" in cgm and "C" in cgm):
        by_ir = f" (by instructions {cgm['Be']['ir'] / cgm['C']['ir']:.3f})" if "Be" in cgm and "C" in cgm else ""
        measured += f"; against the empty-key floor (Be) {pe[0]:.3f}{by_ir}" if pe else \
            f"; against the empty-key floor (Be){by_ir}"
    p3 = throughput("C3", "B")
    if p3:
        by_ir = f", by instructions {cgm['B']['ir'] / cgm['C3']['ir']:.3f}" if "C3" in cgm and "B" in cgm else ""
        measured += f"; without claim headers (C3) {p3[0]:.3f}{by_ir}"
    targets.append(("tokengate cache hit ≥ 0.95 × no-op throughput", measured, p[0] >= 0.95 if p else None))
    if "CL" in cgm and "BL" in cgm:
        by_ir = cgm["BL"]["ir"] / cgm["CL"]["ir"]
        targets.append(("1 KiB token: cache hit ≥ 0.90 × no-op with the same token, by instructions",
                        f"{by_ir:.3f}", by_ir >= 0.90))
    jwt_rounds = (res.get("jwt") or {}).get("rounds") or []
    pj = pair(jwt_rounds, "J", "N")
    if pj or ("J" in cgm and "N" in cgm):
        measured = f"{pj[0]:.3f}" if pj else "–"
        if "J" in cgm and "N" in cgm:
            measured += f" (by instructions {cgm['N']['ir'] / cgm['J']['ir']:.3f})"
        floor = pair(jwt_rounds, "BJ", "N")
        if floor:
            measured += f"; the no-op floor itself: {floor[0]:.3f}"
        targets.append(("JWT cached hit ≥ 0.85 × jwt_authn (JWT cache on) throughput", measured,
                        pj[0] >= 0.85 if pj else None))
    if "J" in cgm and "BJ" in cgm:
        by_ir = cgm["BJ"]["ir"] / cgm["J"]["ir"]
        pjb = pair(jwt_rounds, "J", "BJ")
        by_rps = f" (by req/s {pjb[0]:.3f})" if pjb else ""
        targets.append(("JWT cached hit ≥ 0.90 × no-op with the same token, by instructions",
                        f"{by_ir:.3f}{by_rps}", by_ir >= 0.90))
    p = throughput("C", "D")
    measured = f"{p[0]:.2f}×" if p else "–"
    floor = throughput("B", "D")
    if floor:
        measured += f" (the no-op filter itself: {floor[0]:.2f}×)"
    targets.append(("tokengate ≥ 3 × ext_authz throughput", measured, p[0] >= 3 if p else None))
    bursts = res.get("burst")
    if bursts:
        worst = max(b["introspections"] for b in bursts)
        targets.append(("1 introspection for a cold burst", f"max {worst} over {len(bursts)} bursts", worst == 1))
    else:
        targets.append(("1 introspection for a cold burst", "–", None))
    rss = res.get("rss")
    if rss:
        ms = [m for m in rss["milestones"] if m["tokens"] >= rss["max_entries"]]
        if len(ms) >= 2:
            def growth(a, b):
                return f"{(b['rss_kib'] - a['rss_kib']) / 1024:+.1f} MiB from {a['tokens']:,} to {b['tokens']:,} tokens"
            last = (ms[-1]["rss_kib"] - ms[-2]["rss_kib"]) / ms[-2]["rss_kib"]
            text = growth(ms[-2], ms[-1]) + f" ({last * 100:+.1f}%)"
            if len(ms) > 2:
                text += "; " + growth(ms[0], ms[-1])
            targets.append((f"RSS flat once max_entries ({rss['max_entries']:,}) is reached (last step < 2%)",
                            text, last < 0.02))
        else:
            targets.append(("RSS flat once max_entries is reached", "no two milestones at or past max_entries", None))
    else:
        targets.append(("RSS flat once max_entries is reached", "–", None))
    size = (res.get("wasm") or {}).get("tokengate.wasm")
    targets.append(("wasm ≤ 900 KiB", f"{size / 1024:.1f} KiB" if size else "–", size <= 900 * 1024 if size else None))
    return ratios, targets


def chart(res, k, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is missing (make bench-deps)"
    s = res.get("summary") or {}
    panels = [p for p in ("rps", "lat", "cpu", "rss") if (p != "rss" and s) or (p == "rss" and res.get("rss"))]
    if not panels:
        return "nothing to draw"
    cols = 2 if len(panels) > 1 else 1
    rows = -(-len(panels) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.6 * rows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    colors = {"A": "#888888", "B": "#4c72b0", "C": "#55a868", "C2": "#8fd18f", "C3": "#b7e4b7", "D": "#c44e52"}
    vs = list(s)
    for ax, p in zip(axes, panels):
        if p == "rps":
            vals = [s[v]["rps"] for v in vs]
            err = [[s[v]["rps"] - s[v]["rps_min"] for v in vs], [s[v]["rps_max"] - s[v]["rps"] for v in vs]]
            ax.bar(vs, vals, yerr=err, capsize=4, color=[colors.get(v) for v in vs])
            for i, v in enumerate(vals):
                ax.text(i, v, f"{v / 1000:.1f}k", ha="center", va="bottom", fontsize=8)
            ax.set_title("requests/s, 1 worker (median, min–max)")
        elif p == "lat":
            import numpy as np
            x = np.arange(len(vs))
            for j, (key, label) in enumerate((("p50_us", "p50"), ("p90_us", "p90"), ("p99_us", "p99"))):
                ax.bar(x + (j - 1) * 0.27, [s[v][key] / 1000 for v in vs], 0.27, label=label)
            ax.set_xticks(x, vs)
            ax.set_ylabel("ms")
            ax.legend()
            ax.set_title("latency, 32 connections (median)")
        elif p == "cpu":
            lad = res.get("ladder")
            cg = res.get("callgrind")
            if cg and "error" not in cg:
                cgm = cg_medians(cg)
                order = [v for v in CG_ORDER if v in cgm and v not in ("M0", "M1")]
                vals = [cgm[v]["ir"] / 1000 for v in order]
                jit = [cgm[v]["jit"] / 1000 for v in order]
                ax.barh(range(len(order)), vals, color="#4c72b0", label="Envoy C++ (incl. V8 runtime)")
                ax.barh(range(len(order)), jit, color="#dd8452", label="JIT: wasm + V8 wrappers")
                ax.set_yticks(range(len(order)), [CG_LABEL[v] for v in order], fontsize=7)
                ax.invert_yaxis()
                ax.set_xlabel("thousand instructions per request (callgrind)")
                ax.legend(fontsize=7, loc="upper right")
                ax.set_title("where the cost goes (instructions, noise-free)")
            elif lad:
                labels = [lbl for lbl, _ in lad["steps"]]
                vals = [med([r[n]["envoy_cpu_us_per_req"] for r in lad["rounds"]]) for _, n in lad["steps"]]
                ax.barh(range(len(labels)), vals, color="#4c72b0")
                ax.set_yticks(range(len(labels)), labels, fontsize=8)
                ax.invert_yaxis()
                base = s.get("A", {}).get("envoy_cpu_us_per_req")
                if base:
                    ax.axvline(base, color="#888888", ls="--", label=f"bare Envoy {base:.1f} µs")
                    ax.legend(fontsize=8)
                ax.set_xlabel("Envoy CPU µs per request")
                ax.set_title("profile ladder: cost per step")
            else:
                ax.bar(vs, [s[v]["envoy_cpu_us_per_req"] for v in vs], color=[colors.get(v) for v in vs])
                ax.set_title("Envoy CPU µs per request")
        elif p == "rss":
            rss = res["rss"]
            pts = sorted(p for p in rss["samples"] if p[0] > 0)
            ax.plot([t for t, _ in pts], [r / 1024 for _, r in pts], color="#4c72b0", lw=1, label="sampled every second")
            ms = rss["milestones"]
            ax.axhline(ms[0]["rss_kib"] / 1024, color="#55a868", ls=":", label=f"before any token {ms[0]['rss_kib'] / 1024:.0f} MiB")
            ms = ms[1:]
            ax.plot([m["introspections"] for m in ms], [m["rss_kib"] / 1024 for m in ms], "o", color="#c44e52",
                    label="after each milestone")
            for m in ms:
                ax.annotate(f"{m['tokens']:,}\n{m['rss_kib'] / 1024:.0f} MiB", (m["introspections"], m["rss_kib"] / 1024),
                            textcoords="offset points", xytext=(0, -28), fontsize=8, ha="center")
            ax.axvline(rss["max_entries"], color="#888888", ls="--", label=f"max_entries {rss['max_entries']:,}")
            ax.set_xscale("log")
            ax.set_ylim(bottom=0, top=max(r for _, r in rss["samples"]) / 1024 * 1.15)
            ax.set_xlabel("distinct tokens introspected")
            ax.set_ylabel("Envoy VmRSS, MiB")
            ax.legend(fontsize=8, loc="lower right")
            ax.set_title(f"memory, --concurrency {rss['concurrency']}")
    meta = res["meta"]
    noisy = k["PROFILE"] != "full" or max(meta["loadavg_start"][0], meta["loadavg_end"][0]) > 0.5
    fig.suptitle(f"tokengate benchmark ({k['PROFILE']} profile, {meta['date']}, Envoy {meta['envoy']})"
                 + ("  [INDICATIVE ONLY: short or noisy run]" if noisy else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None
