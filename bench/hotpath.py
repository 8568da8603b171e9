#!/usr/bin/env python3
"""`make bench-hotpath`: what candidate changes to tokengate's hit path would save, in instructions.

Builds throw-away variants of tokengate from the committed tree (`git archive HEAD` into
.deps/bench-hotpath/; src/ is never touched), each with one candidate change applied as a
text patch, and counts Envoy worker-thread instructions per cached-token request under
callgrind, next to bare Envoy (A) and the no-op filter (B). Writes bench/hotpath.md.

The patches are sketches that keep the hit path's behaviour for this benchmark's request,
not finished changes: a patch that no longer applies to the current source is reported
and skipped. Knobs: HOTPATH_VARIANTS (comma-separated names), HOTPATH_REQUESTS (200),
HOTPATH_ROUNDS (3), HOTPATH_TOKENS (the bearer tokens every variant is measured with, comma-separated
among short, 1k, 4k, jwt; default all four; with jwt, Envoy's jwt_authn is measured too), HOTPATH_WORK (the build and callgrind directory, default
.deps/bench-hotpath: give concurrent runs their own). Run it with `make bench-hotpath`, which passes the Makefile's wasm-opt and
its flags (WASM_OPT, WASM_FEATURES): variants are built as `make build` builds.
"""
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the benchmark's Envoy and process helpers)

REPO = run.REPO
# HOTPATH_WORK: another work dir, so that two runs (two worktrees sharing .deps) never collide.
WORK = Path(os.environ.get("HOTPATH_WORK") or REPO / ".deps" / "bench-hotpath")
# The cached token each variant is measured with: the headline's short one, a JWT-sized one, the
# largest tokengate accepts, and a real RS256 JWT (verified by the `jwt` section, then cached); the
# no-op floor gets the same token, so its copy of the header is priced in.
TOKENS = {"short": "bench-hot-token", "1k": run.LONG_TOKEN, "4k": run.MAX_TOKEN, "jwt": None}


def token(size):
    return run.jwt_token() if size == "jwt" else TOKENS[size]




class Stale(Exception):
    pass


def patch(path, old, new):
    text = path.read_text()
    if old not in text:
        raise Stale(f"{path.relative_to(path.parents[1])}: expected text not found: {old.strip()[:70]!r}")
    path.write_text(text.replace(old, new, 1))


def prefix_hasher(d):
    """The per-worker maps keyed by SHA-256 hash with the digest's first 8 bytes instead of SipHash."""
    c = d / "src/cache.rs"
    patch(c, "pub type TokenHash = [u8; 32];", """pub type TokenHash = [u8; 32];

#[derive(Default, Clone, Copy)]
pub struct PrefixHasher(u64);
impl std::hash::Hasher for PrefixHasher {
    fn finish(&self) -> u64 { self.0 }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().take(8) { self.0 = (self.0 << 8) | u64::from(b); }
    }
    fn write_usize(&mut self, _: usize) {}
}
pub type TokenMap<V> = HashMap<TokenHash, V, std::hash::BuildHasherDefault<PrefixHasher>>;""")
    patch(c, "    map: HashMap<TokenHash, LocalEntry>,", "    map: TokenMap<LocalEntry>,")
    patch(c, "LocalCache { map: HashMap::new(), capacity }", "LocalCache { map: TokenMap::default(), capacity }")
    patch(d / "src/denylist.rs", "    tokens: HashMap<TokenHash, u64>,", "    tokens: crate::cache::TokenMap<u64>,")


def no_hash_memo(d):
    """Every request scans and hashes its token (`cache.hash_memo_entries: 0`): the tree before the memo."""
    patch(d / "src/config.rs", """fn default_hash_memo_entries() -> usize {
    1024""", """fn default_hash_memo_entries() -> usize {
    0""")


def no_claim_headers(d):
    """No claim headers written (what `claims_to_headers: {}` would cost): the price of the header writes."""
    patch(d / "src/worker.rs", """                for (header, value) in headers {
                    self.host.add_request_header(header, value);""", """                for (header, value) in headers.into_iter().take(0) {
                    self.host.add_request_header(header, value);""")


def price_denylist(d):
    """(pricing only) the per-request denylist check skipped."""
    patch(d / "src/worker.rs", """        let list = self.denylist();
        let mut view = self.deny.borrow_mut();
        view.refresh(&list, now_s)?;
        view.token_revoked(&list, hash, now_s)""", """        let _ = (hash, now_s);
        Ok(false)""")


def price_sha256(d):
    """(pricing only) SHA-256 skipped: the key is the token's last 32 bytes (with the memo, a hit hashes nothing)."""
    patch(d / "src/cache.rs", "    Sha256::digest(token.as_bytes()).into()", """    let mut h = [0u8; 32];
    for (i, b) in token.as_bytes().iter().rev().take(32).enumerate() {
        h[i] = *b;
    }
    h""")


def price_identity(d):
    """(pricing only) a cached JWT's identity (`iss` + `jti`) not looked up in the denylist."""
    patch(d / "src/worker.rs", "let Some(identity) = &claims.identity else {",
          "let Some(identity) = claims.identity.as_ref().filter(|_| false) else {")


def price_strip(d):
    """(pricing only) the loop that looks for client-sent claim headers skipped."""
    patch(d / "src/filter.rs", "        for (name, _) in headers.iter() {", "        for (name, _) in headers.iter().take(0) {")


def price_time(d):
    """(pricing only) no clock read: the hit path's `get_current_time` replaced by a constant."""
    patch(d / "src/worker.rs", """    hostcalls::get_current_time()
        .ok()""", """    Some(UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000))""")


def rules_20(d):
    """20 plugin rules (templates, prefixes, methods), the bench's request matching only the last."""
    rules = [{"match": {"path": f"/api/v{i}/{{id}}/items/*", "methods": ["GET"]}, "require": {"scopes": ["read"]}}
             for i in range(19)]
    rules.append({"match": {"prefix": "/"}, "require": {"scopes": ["read"]}})
    # The bench's configuration is shared by every variant: this one adds its rules as it loads.
    patch(d / "src/config.rs", "crate::rules::Policy::compile(&self.rules, top)",
          f"crate::rules::Policy::compile(&serde_json::from_str::<Vec<crate::rules::RuleJson>>"
          f"({json.dumps(json.dumps(rules))}).map_err(|e| e.to_string())?, top)")


def whole_token_slot(d):
    """The hash memo's slot a keyed hash of the whole token (before its ends and length named it)."""
    patch(d / "src/hash_memo.rs", """        h.write_usize(token.len());
        if token.len() <= 2 * EDGE {
            h.write(token);
        } else {
            h.write(token.get(..EDGE).unwrap_or_default());
            h.write(token.get(token.len() - EDGE..).unwrap_or_default());
        }""", """        h.write(token);""")


def opt_level(level, package=None):
    def f(d):
        if package:
            with open(d / "Cargo.toml", "a") as cargo:
                cargo.write(f"\n[profile.release.package.{package}]\nopt-level = {level}\n")
        else:
            patch(d / "Cargo.toml", "opt-level = 3", f"opt-level = {level}")
    f.__doc__ = f"opt-level {level} for {package or 'every crate'}"
    return f


def no_wasm_opt(d):
    """Marks the variant to ship cargo's module as it is (see build)."""
    (d / "no-wasm-opt").write_text("")


def worktree(d):
    """The working tree's src/ and Cargo files, uncommitted changes included."""
    shutil.rmtree(d / "src")
    shutil.copytree(REPO / "src", d / "src")
    for f in ("Cargo.toml", "Cargo.lock"):
        shutil.copy(REPO / f, d / f)


VARIANTS = {
    "head": ("tokengate as committed (opt-level 3, then wasm-opt -O3, as `make build`)", []),
    "worktree": (worktree.__doc__, [worktree]),
    "rules-20": (rules_20.__doc__, [rules_20]),
    "opt-z": ("the build before this change: opt-level \"z\" (sha2 at 3), no wasm-opt",
              [opt_level('"z"'), opt_level(3, "sha2"), no_wasm_opt]),
    "opt-3-no-wasm-opt": ("opt-level 3 without wasm-opt (555 KiB)", [no_wasm_opt]),
    "no-hash-memo": (no_hash_memo.__doc__, [no_hash_memo]),
    "whole-token-slot": (whole_token_slot.__doc__, [whole_token_slot]),
    "prefix-hasher": (prefix_hasher.__doc__, [prefix_hasher]),
    "no-claim-headers": (no_claim_headers.__doc__, [no_claim_headers]),
    "price-denylist": (price_denylist.__doc__, [price_denylist]),
    "price-sha256": (price_sha256.__doc__, [price_sha256]),
    "price-strip": (price_strip.__doc__, [price_strip]),
    "price-identity": (price_identity.__doc__, [price_identity]),
    "price-time": (price_time.__doc__, [price_time]),
    "price-headers+sha256": ("(pricing only) no claim headers and no SHA-256: what is left beyond the floor",
                             [no_claim_headers, price_sha256]),
}


def build(name, fns):
    d = WORK / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(d)], input=archive, check=True)
    for fn in fns:
        fn(d)
    # git archive stamps files with the commit's time, and every variant shares one target dir: make
    # cargo rebuild the crate each time, and never pick up the previous variant's module.
    now = time.time()
    for f in (d / "src").rglob("*"):
        os.utime(f, (now, now))
    out_built = WORK / "target/wasm32-wasip1/release/tokengate.wasm"
    out_built.unlink(missing_ok=True)
    r = subprocess.run(["cargo", "build", "--release", "--target", "wasm32-wasip1", "--locked", "--lib",
                        "--target-dir", str(WORK / "target")], cwd=d, capture_output=True, text=True)
    if r.returncode:
        raise Stale(f"build failed: {r.stderr[-1500:]}")
    out = WORK / f"{name}.wasm"
    shutil.copy(out_built, out)
    if not (d / "no-wasm-opt").exists():  # as `make build`, with the Makefile's tool and flags
        tool, features = os.environ["WASM_OPT"], os.environ["WASM_FEATURES"].split()
        subprocess.run([tool, "-O3", *features, str(out), "-o", str(out)], check=True)
    return out


def measure(batch, noop, n, rounds, tokens, log):
    """Instructions per request of A, B and a few variants (few: every VM reserves address space,
    and valgrind runs out of it past about ten)."""
    envoy_bin = Path(os.environ.get("ENVOY_BIN") or REPO / ".deps/envoy/envoy/_bin/envoy")
    wd = WORK / "callgrind"
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True)
    e = run.Envoy(wd, "hotpath", envoy_bin, 0, 1, "warn")
    idp = e.add("idp", [run.buffer_body()], run.direct(body=run.IDP_ANSWER, content_type="application/json"))
    e.clusters.append(run.cluster("idp", idp))
    e.add("A", [], run.direct())
    e.add("B", [run.wasm("noop", "noop", noop, "")], run.direct())
    jwt = "jwt" in tokens
    if jwt:  # for reference: Envoy's own JWT filter, its JWT cache on, the same token
        e.add("N", [run.jwt_issuer().jwt_authn()], run.direct())
    section = run.jwt_issuer().tokengate_section() if jwt else None
    for name, wasm in batch:
        ident = "tg_" + re.sub(r"\W", "_", name)
        e.add(name, [run.wasm(ident, ident, wasm, run.tokengate_config(jwt=section))], run.direct())
        e.add(f"{name}-admin", [run.wasm(ident + "_admin", ident, wasm, run.tokengate_config(admin=True)),
                                run.buffer_body()], run.direct(status=404, body="{}"))
    e.start(timeout=900, wrapper=["valgrind", "--tool=callgrind", "--smc-check=all", "--instr-atstart=no",
                                  "--separate-threads=yes", f"--callgrind-out-file={wd}/cg.%p"])
    for name, _ in batch:  # production state: something was revoked once (see run.revoke_unrelated)
        run.revoke_unrelated(e, admin=f"{name}-admin", data=name, check=not name.startswith("price-"))
    pid, dumps, out = e.proc.popen.pid, 0, {}
    ctl = lambda *a: subprocess.run(["callgrind_control", *a, str(pid)], capture_output=True, text=True)
    try:
        for rnd in range(rounds):
            for v, size in [(v, size) for size in tokens
                            for v in ["A", "B"] + (["N"] if size == "jwt" else []) + [name for name, _ in batch]]:
                bearer = run.bearer(token(size))
                conn = http.client.HTTPConnection(run.LOOPBACK, e.ports[v], timeout=120)
                for _ in range(30):
                    run.request(0, headers=bearer, conn=conn)
                ctl("-z")
                ctl("-i", "on")
                for _ in range(n):
                    status, body = run.request(0, headers=bearer, conn=conn)
                    if status != 200:
                        raise RuntimeError(f"{v}: {status} {body[:200]!r}")
                ctl("-i", "off")
                ctl("-d", f"{v}-{rnd}")
                conn.close()
                dumps += 1
                time.sleep(1.0)
                totals = [int(re.search(r"^totals: (\d+)", f.read_text(), re.M).group(1))
                          for f in wd.glob(f"cg.{pid}.{dumps}-*")]
                out.setdefault((v, size), []).append(max(totals) / n)
                log(f"  round {rnd + 1} {v:<18} {size:>5} {max(totals) / n:10,.0f} instructions/req")
    finally:
        e.stop()
    return {v: statistics.median(xs) for v, xs in out.items()}


def main():
    names = [x for x in os.environ.get("HOTPATH_VARIANTS", ",".join(VARIANTS)).split(",") if x]
    n = int(os.environ.get("HOTPATH_REQUESTS", "200"))
    rounds = int(os.environ.get("HOTPATH_ROUNDS", "3"))
    tokens = [x for x in os.environ.get("HOTPATH_TOKENS", ",".join(TOKENS)).split(",") if x]
    if not tokens or any(t not in TOKENS for t in tokens):
        sys.exit(f"HOTPATH_TOKENS: comma-separated among {', '.join(TOKENS)}")
    _, _, noop = run.paths()
    log = lambda m: print(m, flush=True)
    built, stale = [], {}
    for name in names:
        try:
            built.append((name, build(name, VARIANTS[name][1])))
            log(f"built {name}")
        except Stale as exc:
            stale[name] = str(exc)
            log(f"skipped {name}: {exc}")
    results = {}
    batch_size = 2
    for i in range(0, len(built), batch_size):
        batch = built[i:i + batch_size]
        if not any(name == "head" for name, _ in batch) and any(name == "head" for name, _ in built):
            batch = [next(b for b in built if b[0] == "head")] + batch  # every batch has its own reference
        log("callgrind: " + ", ".join(name for name, _ in batch))
        try:
            m = measure(batch, noop, n, rounds, tokens, log)
        except Exception as exc:  # one sketch that misbehaves must not lose the others
            log(f"batch failed: {exc}")
            for name, _ in batch:
                if name != "head":
                    stale[name] = f"measurement failed: {str(exc)[:200]}"
            continue
        for k, v in m.items():
            results.setdefault(k, []).append(v)
    res = {k: statistics.median(v) for k, v in results.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    L = ["# tokengate hit path: candidate changes, in instructions", "",
         f"`make bench-hotpath` at {commit}: Envoy's worker thread under callgrind, {n} cached-token requests over "
         f"one connection, median of {rounds} rounds, after one revocation through the admin API (production state: "
         "the denylist generation key exists). Each variant is the committed tree with one sketch of a change "
         "(bench/hotpath.py); *pricing* variants remove a step only to price it. Every row is measured with each "
         "token (" + ", ".join(f"{t}: {len(token(t))} bytes" for t in tokens) + "), the no-op floor (B) with the "
         "same token. Instructions are independent of the machine's load." + (
             " With the jwt token (an RS256 access token), every tokengate variant has a `jwt` section trusting its "
             "issuer (verified once, then a cached hit), and N is Envoy's jwt_authn with the same key inline and its "
             "JWT cache on, for reference." if "jwt" in tokens else ""), "",
         "| variant | token | what changes | instructions/req | over no-op | saved vs head | no-op / variant |",
         "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for size in tokens:
        head, floor = res.get(("head", size)), res.get(("B", size))
        for v in ["A", "B", "N"] + [name for name, _ in built]:
            if (v, size) not in res:
                continue
            x = res[(v, size)]
            what = {"A": "bare Envoy", "B": "no-op filter (the floor)",
                    "N": "Envoy's jwt_authn, JWT cache on (reference)"}.get(v) or " ".join(VARIANTS[v][0].split())
            saved = f"{head - x:+,.0f}" if head and v not in ("A", "B", "N", "head") else ""
            over = f"{x - floor:+,.0f}" if floor else ""
            ratio = f"{floor / x:.3f}" if floor and v not in ("A", "B") else ""
            L.append(f"| {v} | {size} | {what} | {x:,.0f} | {over} | {saved} | {ratio} |")
    for name, why in stale.items():
        L.append(f"| {name} | | not measured: {why} | | | | |")
    L += ["", "*no-op / variant*: the throughput ratio to the no-op floor implied by instructions (same token)."]
    if ("head", "jwt") in res and ("N", "jwt") in res:
        L += ["", f"JWT: tokengate's cached hit / jwt_authn's, implied by instructions: "
                  f"{res[('N', 'jwt')] / res[('head', 'jwt')]:.3f}."]
    md = "\n".join(L) + "\n"
    (run.BENCH / "hotpath.md").write_text(md)
    print()
    print(md)


if __name__ == "__main__":
    main()
