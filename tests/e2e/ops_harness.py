"""Helpers of the operations tests (tests/e2e/test_operations.py): a test CA and an
authorization server behind TLS, Envoys whose `idp` cluster or listeners are replaced
(TLS, listeners over LDS from a file), and tokengate modules built at another commit.

Everything binds 127.0.0.1; certificates and keys are made at test time with the
`openssl` command and live in the test's work directory.
"""
import copy
import http.client
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import yaml

from harness import LOOPBACK, REPO, SERVERS, Envoy, Etcd, EtcdMember, MockIdp, _named, wait_for_port

SHIPPED_TLS_CLUSTER = REPO / "envoy" / "tls" / "idp-cluster.yaml"
SHIPPED_ETCD_TLS_CLUSTER = REPO / "envoy" / "tls" / "etcd-cluster.yaml"
# The module under test, as harness.Envoy finds it.
CURRENT_WASM = os.environ.get("TOKENGATE_WASM") or str(REPO / "target" / "tokengate.wasm")


# --------------------------------------------------------------------------- a test CA


def _openssl(*args, cwd):
    proc = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def make_ca(directory, name):
    """A self-signed CA (P-256): (certificate path, key path)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}", cwd=directory)
    return cert, key


def issue_cert(directory, ca, dns_name, usage="serverAuth", loopback=False):
    """A certificate for `dns_name` (its SAN, with 127.0.0.1 too if `loopback`) of
    extended key usage `usage` (serverAuth, clientAuth), signed by `ca`: (certificate, key)."""
    directory = Path(directory)
    ca_cert, ca_key = ca
    stem = directory / dns_name.replace(".", "_")
    key, csr, cert, ext = (Path(f"{stem}{suffix}") for suffix in (".key", ".csr", ".crt", ".ext"))
    names = f"DNS:{dns_name}" + (f",IP:{LOOPBACK}" if loopback else "")
    ext.write_text(f"subjectAltName={names}\nextendedKeyUsage={usage}\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={dns_name}", cwd=directory)
    _openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext, cwd=directory)
    return cert, key


# --------------------------------------------------------------------------- the IdP over TLS


TLS_IDP_SCRIPT = r"""
import ssl, sys, threading
sys.path.insert(0, sys.argv[1])
import mock_idp

plain_port, tls_port, cert, key = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
plain = mock_idp.make_server(plain_port)
# The same handler class, so the same state: tokens registered on the plain port
# (the control API) are answered over TLS.
secure = mock_idp.Server(("127.0.0.1", tls_port), plain.RequestHandlerClass)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
secure.socket = context.wrap_socket(secure.socket, server_side=True)
threading.Thread(target=secure.serve_forever, daemon=True).start()
print(f"mock-idp: control on {plain_port}, introspection over TLS on {tls_port}", flush=True)
plain.serve_forever()
"""


class TlsMockIdp(MockIdp):
    """tests/servers/mock_idp.py answering introspection over TLS on `tls_port` with
    `cert`/`key`; the control API (issue_token, register, ...) stays on plain `port`."""

    kind = "mock-tls"

    def __init__(self, procs, workdir, cert, key, server_name):
        super().__init__(procs, workdir)
        from harness import free_port

        self.tls_port = free_port()
        self.cert, self.key, self.server_name = cert, key, server_name

    @property
    def authority(self):
        return self.server_name

    def start(self):
        super().start()
        wait_for_port(self.proc, self.tls_port, timeout=30)
        return self

    def _spawn(self):
        return self.procs.start(
            "mock-idp-tls",
            [sys.executable, "-c", TLS_IDP_SCRIPT, SERVERS, self.port, self.tls_port, self.cert, self.key],
            self.workdir / f"mock-idp-tls-{self.port}.log",
        )


def shipped_tls_cluster(port, trusted_ca, server_name, path=SHIPPED_TLS_CLUSTER, client=None):
    """A shipped TLS cluster (envoy/tls/idp-cluster.yaml by default) pointed at
    127.0.0.1:`port`, trusting `trusted_ca` and expecting (and sending as SNI)
    `server_name`, with the client certificate `client` (certificate, key) or none:
    only addresses and file names change."""
    cluster = yaml.safe_load(Path(path).read_text())
    cluster["type"] = "STATIC"
    cluster.pop("dns_lookup_family", None)
    (group,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = group["lb_endpoints"]
    endpoint["endpoint"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": int(port)}
    tls = cluster["transport_socket"]["typed_config"]
    tls["sni"] = server_name
    validation = tls["common_tls_context"]["validation_context"]
    validation["trusted_ca"] = {"filename": str(trusted_ca)}
    (san,) = validation["match_typed_subject_alt_names"]
    san["matcher"] = {"exact": server_name}
    context = tls["common_tls_context"]
    if client is None:
        context.pop("tls_certificates", None)
    else:
        (pair,) = context["tls_certificates"]
        pair["certificate_chain"] = {"filename": str(client[0])}
        pair["private_key"] = {"filename": str(client[1])}
    return cluster


class ClusterEnvoy(Envoy):
    """An Envoy whose template clusters are replaced by `clusters` of the same names."""

    def __init__(self, *args, clusters=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.replacements = [copy.deepcopy(c) for c in clusters]

    def bootstrap(self):
        config = super().bootstrap()
        existing = config["static_resources"]["clusters"]
        for replacement in self.replacements:
            existing[existing.index(_named(existing, replacement["name"]))] = copy.deepcopy(replacement)
        return config


# --------------------------------------------------------------------------- listeners over LDS


class LdsEnvoy(Envoy):
    """An Envoy whose listeners come from a file (LDS over the filesystem), so that a test
    can push new listener configurations, e.g. another module, into the running process:
    `push(wasm=...)` rewrites the file and waits until Envoy has taken it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lds_dir = self.workdir / f"{self.name}-{self.port}-lds"
        self.lds_dir.mkdir(parents=True, exist_ok=True)
        self.lds_path = self.lds_dir / "listeners.yaml"
        self.pushes = 0

    def bootstrap(self):
        config = super().bootstrap()
        self._write_listeners(config["static_resources"].pop("listeners"))
        # Any xDS source, the filesystem's included, needs a node identity.
        config["node"] = {"id": self.name, "cluster": "tokengate-tests"}
        config["dynamic_resources"] = {
            "lds_config": {
                "resource_api_version": "V3",
                "path_config_source": {"path": str(self.lds_path), "watched_directory": {"path": str(self.lds_dir)}},
            }
        }
        return config

    def push(self, wasm):
        """Serve every listener with the module `wasm` from now on (the old one drains)."""
        self.wasm = str(wasm)
        listeners = Envoy.bootstrap(self)["static_resources"]["listeners"]
        before = self.counter("listener_manager.lds.update_success")
        self._write_listeners(listeners)
        from harness import wait_until

        wait_until(lambda: self.counter("listener_manager.lds.update_success") > before, 30,
                   what="Envoy to accept the pushed listeners")
        rejected = self.counter("listener_manager.lds.update_rejected")
        assert rejected == 0, f"Envoy refused the pushed listeners:\n{self.proc.log_tail()}"

    def _write_listeners(self, listeners):
        self.pushes += 1
        resources = []
        for listener in listeners:
            resource = copy.deepcopy(listener)
            resource["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener"
            resources.append(resource)
        staged = self.lds_dir / f".listeners-{self.pushes}.yaml"
        staged.write_text(yaml.safe_dump({"resources": resources}, sort_keys=False))
        # A rename is what the directory watch reports, and Envoy never reads half a file.
        os.replace(staged, self.lds_path)


# --------------------------------------------------------------------------- another module


def build_module_at(commit, target_dir):
    """The release module of tokengate as it was at `commit` (cargo's output, without
    wasm-opt), built from `git archive` in `target_dir`; built once, then reused."""
    target_dir = Path(target_dir)
    wasm = target_dir / "target" / "wasm32-wasip1" / "release" / "tokengate.wasm"
    source = target_dir / f"src-{commit}"
    if not source.is_dir():
        source.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", REPO, "archive", commit, "Cargo.toml", "Cargo.lock", "src"],
                                 capture_output=True, timeout=60)
        assert archive.returncode == 0, archive.stderr.decode()
        subprocess.run(["tar", "-x", "-C", source], input=archive.stdout, check=True, timeout=60)
    build = subprocess.run(
        ["cargo", "build", "--release", "--target", "wasm32-wasip1", "--locked", "--quiet",
         "--target-dir", target_dir / "target"],
        cwd=source, capture_output=True, text=True, timeout=900,
    )
    assert build.returncode == 0, build.stderr
    return wasm


PANIC_CANARY = REPO / "tests" / "e2e" / "panic_canary"


def build_panic_canary():
    """tests/e2e/panic_canary: a module that panics on a request with `x-panic` and
    reports its VM's and the shared data's request counts."""
    build = subprocess.run(
        ["cargo", "build", "--release", "--target", "wasm32-wasip1", "--locked", "--quiet"],
        cwd=PANIC_CANARY, capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr
    return PANIC_CANARY / "target" / "wasm32-wasip1" / "release" / "panic_canary.wasm"


# --------------------------------------------------------------------------- etcd over TLS


class _TlsMember(EtcdMember):
    @property
    def client_url(self):
        return f"https://{LOOPBACK}:{self.client_port}"


class TlsEtcd(Etcd):
    """A one-member etcd whose client port speaks TLS only and requires a client
    certificate that `ca` signed (--client-cert-auth). `server` is its certificate for
    `server_name`; `client` is what the harness itself reads etcd with."""

    def __init__(self, procs, workdir, ca, server, client, server_name):
        self.ca, self.server, self.client, self.server_name = ca, server, client, server_name
        super().__init__(procs, workdir, members=1, name="etcd-tls", extra_args=[
            "--cert-file", server[0], "--key-file", server[1],
            "--client-cert-auth", "--trusted-ca-file", ca[0],
        ])
        self.members = [_TlsMember(m.name, self.workdir) for m in self.members]

    def _post(self, member, path, body, timeout):
        context = ssl.create_default_context(cafile=str(self.ca[0]))
        context.load_cert_chain(str(self.client[0]), str(self.client[1]))
        conn = http.client.HTTPSConnection(LOOPBACK, member.client_port, timeout=timeout, context=context)
        try:
            conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def healthy(self, member):
        if not member.alive():
            raise RuntimeError(f"{member.name} exited:\n{member.proc.log_tail()}")
        try:
            status, _ = self._post(member, "/v3/maintenance/status", {}, 1.0)
        except OSError:
            return False
        return status == 200

    def call(self, path, body, member=None, timeout=3.0):
        status, data = self._post(member or self.members[0], path, body, timeout)
        if status != 200:
            raise RuntimeError(f"etcd {path}: {status} {data[:200]!r}")
        return json.loads(data)
