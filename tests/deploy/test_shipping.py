"""Offline checks of the shipped deployment files (`make deploy-check`).

- every derived file equals what envoy/render.py renders (one source of truth),
  and each carries the variant it should;
- every Envoy bootstrap passes the real Envoy 1.40.0's `--mode validate`,
  which also loads the module and runs its configuration parser;
- the Istio manifests match Istio's CRD schemas (envoy/istio/schema/),
  strictly: an unknown field is an error, as with `kubectl apply`;
- the compose file matches the compose-spec schema vendored by check-jsonschema;
- the README documents every configuration key and every metric;
- `make oci` picks docker or podman, and says what is missing when neither can build.

Needs the module (`make build`) and Envoy (`make envoy`); starts no server.
"""
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

import shipped
from shipped import REPO

ENVOY = Path(os.environ.get("ENVOY_BIN") or REPO / ".deps/envoy/envoy/_bin/envoy")
DEMO_ADMIN_TOKEN = "admin-demo-token"


@pytest.fixture(scope="session")
def module():
    if not shipped.WASM.is_file():
        pytest.fail(f"{shipped.WASM} is missing: run `make build`")
    return shipped.WASM


# The EnvoyFilter route ships the module in a ConfigMap, which the Kubernetes API
# server refuses above 1 MiB: the budget keeps room under that.
MODULE_BUDGET_BYTES = 900 * 1024


def test_module_fits_its_budget(module):
    size = module.stat().st_size
    assert size <= MODULE_BUDGET_BYTES, f"{module} is {size} bytes, over the {MODULE_BUDGET_BYTES}-byte budget"


@pytest.fixture(scope="session")
def configs():
    return shipped.variants()


# --------------------------------------------------------------------------- one source of truth


def test_rendered_files_are_up_to_date():
    stale = shipped.render.stale(shipped.render.render_all())
    assert not stale, "stale, run `make render`:\n" + "\n".join(diff for _, diff in stale)


def test_variants_derive_from_the_base(configs):
    base = json.loads((shipped.ENVOY_DIR / "tokengate.json").read_text())
    assert configs["data"] == base
    assert configs["admin"] == {**base, "admin": configs["admin"]["admin"]}
    assert configs["istio"]["introspection"]["cluster"].startswith("outbound|")
    assert {k: v for k, v in configs["istio"].items() if k != "introspection"} == {
        k: v for k, v in base.items() if k != "introspection"
    }
    assert configs["istio-admin"] == {**configs["istio"], "admin": configs["admin"]["admin"]}


def test_demo_admin_hash_is_the_demo_token(configs):
    assert configs["admin"]["admin"]["token_sha256"] == hashlib.sha256(DEMO_ADMIN_TOKEN.encode()).hexdigest()


@pytest.mark.parametrize("path", [shipped.REFERENCE, shipped.COMPOSE_BOOTSTRAP], ids=["reference", "compose"])
def test_bootstrap_listeners_carry_their_variants(path, configs):
    bootstrap = shipped.load_yaml(path)
    data = shipped.listener_named(bootstrap, "data")
    admin = shipped.listener_named(bootstrap, "tokengate_admin")
    (data_filter,) = shipped.wasm_filters(data)
    (admin_filter,) = shipped.wasm_filters(admin)
    assert shipped.plugin_config(data_filter) == configs["data"]
    assert shipped.plugin_config(admin_filter) == configs["admin"]
    # One VM's shared data: the admin listener's revocations reach the data workers.
    data_plugin, admin_plugin = data_filter["typed_config"]["config"], admin_filter["typed_config"]["config"]
    assert data_plugin["vm_config"]["vm_id"] == admin_plugin["vm_config"]["vm_id"] == "tokengate"
    # A crashed VM fails closed and is replaced; `fail_open` (deprecated) cannot say so.
    assert data_plugin["failure_policy"] == admin_plugin["failure_policy"] == "FAIL_RELOAD"
    assert "fail_open" not in data_plugin and "fail_open" not in admin_plugin
    manager = shipped.http_manager(admin)
    assert manager["normalize_path"] is True and manager["merge_slashes"] is True
    assert_buffer_follows_tokengate(admin)
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert route["direct_response"]["status"] == 404
    ports = {x["name"]: x["address"]["socket_address"]["port_value"] for x in bootstrap["static_resources"]["listeners"]}
    assert ports == {"data": 8080, "tokengate_admin": 8081}
    assert bootstrap["admin"]["address"]["socket_address"]["port_value"] == 9901
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    assert set(clusters) == {"idp", "upstream"}


def test_admin_buffer_limit_follows_admin_max_body_bytes(configs):
    """The buffer filter's limit is rendered from admin.max_body_bytes in every shipped admin
    listener, so a client meets tokengate's JSON 413, whatever the limit is set to."""
    admins = [
        ("admin", shipped.listener_named(shipped.load_yaml(shipped.REFERENCE), "tokengate_admin")),
        ("admin", shipped.listener_named(shipped.load_yaml(shipped.COMPOSE_BOOTSTRAP), "tokengate_admin")),
        ("istio-admin", shipped.istio_admin_listener()),
    ]
    for variant, listener in admins:
        (buffer,) = [f for f in shipped.http_manager(listener)["http_filters"] if f["name"] == "envoy.filters.http.buffer"]
        expected = configs[variant]["admin"].get("max_body_bytes", shipped.render.DEFAULT_MAX_BODY_BYTES)
        assert buffer["typed_config"]["max_request_bytes"] == expected, variant
    raised = {**configs, "admin": shipped.render.merge(configs["admin"], {"admin": {"max_body_bytes": 4194304}})}
    text = shipped.REFERENCE.read_text()
    assert "max_request_bytes: 4194304" in shipped.render.splice_yaml("envoy.yaml", text, raised)


def test_istio_wasmplugin_reloads_a_crashed_vm():
    assert shipped.load_yaml(shipped.WASMPLUGIN)["spec"]["failStrategy"] == "FAIL_RELOAD"
    plugins = [shipped.istio_http_filter(), *shipped.wasm_filters(shipped.istio_admin_listener())]
    assert [f["typed_config"]["config"]["failure_policy"] for f in plugins] == ["FAIL_RELOAD"] * 2


def assert_buffer_follows_tokengate(admin_listener):
    """The filter lets an admin request's headers on to read its body (proxy-wasm
    delivers no body otherwise); the buffer filter must hold them there, before
    the router, until the filter has answered."""
    types = [f["typed_config"]["@type"].rsplit(".", 1)[-1] for f in shipped.http_manager(admin_listener)["http_filters"]]
    assert types == ["Wasm", "Buffer", "Router"], types


def test_reference_bootstrap_stays_on_loopback():
    bootstrap = shipped.load_yaml(shipped.REFERENCE)
    addresses = [bootstrap["admin"]["address"]["socket_address"]]
    addresses += [x["address"]["socket_address"] for x in bootstrap["static_resources"]["listeners"]]
    for cluster in bootstrap["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            addresses += [e["endpoint"]["address"]["socket_address"] for e in group["lb_endpoints"]]
    assert {a["address"] for a in addresses} == {"127.0.0.1"}
    ports = {a["port_value"] for a in addresses}
    assert ports == {8080, 8081, 9901, 9000, 9100}


def test_istio_manifests_carry_the_istio_variants(configs):
    http_filter = shipped.istio_http_filter()
    admin = shipped.istio_admin_listener()
    (admin_filter,) = shipped.wasm_filters(admin)
    assert shipped.plugin_config(http_filter) == configs["istio"]
    assert shipped.plugin_config(admin_filter) == configs["istio-admin"]
    assert shipped.wasmplugin()["spec"]["pluginConfig"] == configs["istio"]
    vm_ids = {f["typed_config"]["config"]["vm_config"]["vm_id"] for f in (http_filter, admin_filter)}
    assert vm_ids == {"tokengate"}
    assert admin["address"]["socket_address"]["address"] == "127.0.0.1"
    assert_buffer_follows_tokengate(admin)
    # The admin listener's router is named apart, so the HTTP_FILTER patch
    # (matching on envoy.filters.http.router) cannot insert into it.
    names = [f["name"] for f in shipped.http_manager(admin)["http_filters"]]
    assert "envoy.filters.http.router" not in names
    patch = next(p for p in shipped.envoyfilter()["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER")
    assert patch["patch"]["operation"] == "INSERT_BEFORE"
    assert patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    assert re.fullmatch(r"outbound\|\d+\|\|[a-z0-9.-]+", configs["istio"]["introspection"]["cluster"])


def test_readme_shows_the_data_config(configs):
    assert shipped.readme_json_blocks() == {"data": configs["data"]}


# --------------------------------------------------------------------------- envoy --mode validate


def envoy_validate(config_path, cwd=REPO):
    if not ENVOY.is_file():
        pytest.fail(f"{ENVOY} is missing: run `make envoy`")
    proc = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(config_path), "--log-level", "warn"],
        cwd=cwd, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, f"envoy --mode validate -c {config_path}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_envoy_validates_the_reference_bootstrap_as_shipped(module):
    # From the repository root, as `make run` starts it: the relative module path resolves.
    envoy_validate("envoy/envoy.yaml")


def test_envoy_validates_the_compose_bootstrap(module, tmp_path):
    # The container's module path does not exist here: point it at the built module.
    bootstrap = shipped.load_yaml(shipped.COMPOSE_BOOTSTRAP)
    for listener in bootstrap["static_resources"]["listeners"]:
        shipped.set_module(listener, module)
    path = tmp_path / "compose-envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    envoy_validate(path)


def test_envoy_validates_the_istio_filters(module, tmp_path):
    bootstrap = shipped.istio_bootstrap(module, 15006, 15081, 15000, 8080, 80)
    path = tmp_path / "istio-envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    envoy_validate(path)


def test_envoy_validates_the_tls_idp_cluster(module, tmp_path):
    """envoy/tls/idp-cluster.yaml in place of the reference bootstrap's plaintext `idp`."""
    bootstrap = shipped.load_yaml(shipped.REFERENCE)
    clusters = bootstrap["static_resources"]["clusters"]
    tls = shipped.load_yaml(shipped.TLS_IDP_CLUSTER)
    assert tls["name"] == "idp"
    clusters[[c["name"] for c in clusters].index("idp")] = tls
    context = tls["transport_socket"]["typed_config"]
    assert context["sni"] == context["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"][0][
        "matcher"
    ]["exact"]
    path = tmp_path / "tls-idp.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    envoy_validate(path)


def test_envoy_validates_the_tls_etcd_cluster(module, tmp_path):
    """envoy/tls/etcd-cluster.yaml beside the reference bootstrap's clusters, with its
    certificate files present (Envoy reads them at load): a CA, and a client pair from it."""
    bootstrap = shipped.load_yaml(shipped.REFERENCE)
    etcd = shipped.load_yaml(shipped.TLS_ETCD_CLUSTER)
    context = etcd["transport_socket"]["typed_config"]["common_tls_context"]
    subj = ["-subj", "/CN=tokengate-test"]
    key, cert = tmp_path / "client.key", tmp_path / "client.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", *subj], check=True, capture_output=True)
    (pair,) = context["tls_certificates"]
    pair["certificate_chain"]["filename"], pair["private_key"]["filename"] = str(cert), str(key)
    context["validation_context"]["trusted_ca"]["filename"] = str(cert)
    bootstrap["static_resources"]["clusters"].append(etcd)
    path = tmp_path / "tls-etcd.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    envoy_validate(path)


def test_istio_external_idp_is_reached_with_tls_origination():
    service_entry, rule = [d for d in yaml.safe_load_all(shipped.IDP_EXTERNAL.read_text()) if d]
    (host,) = service_entry["spec"]["hosts"]
    assert rule["spec"]["host"] == host
    assert rule["spec"]["trafficPolicy"]["tls"]["mode"] == "SIMPLE"
    assert rule["spec"]["trafficPolicy"]["tls"]["sni"] == host
    (port,) = service_entry["spec"]["ports"]
    assert port["protocol"] == "HTTP", "the sidecar originates TLS; HTTPS would pass plaintext through"


def test_envoy_validate_runs_the_plugin_configuration_parser(module, tmp_path):
    """The checks above are worth something only if validate mode loads the module."""
    bootstrap = shipped.load_yaml(shipped.REFERENCE)
    data = shipped.listener_named(bootstrap, "data")
    shipped.set_module(data, module)
    (wasm_filter,) = shipped.wasm_filters(data)
    config = shipped.plugin_config(wasm_filter)
    config["introspection"]["timeout"] = 5  # unknown key: the plugin must refuse it
    wasm_filter["typed_config"]["config"]["configuration"]["value"] = json.dumps(config)
    bootstrap["static_resources"]["listeners"] = [data]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    proc = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "unknown field `timeout`" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- Kubernetes objects

# The Kubernetes version whose schemas (kubernetes-validate's) the objects are checked against.
KUBERNETES = "1.33.0"


def kubernetes_errors(manifest):
    import kubernetes_validate

    try:
        kubernetes_validate.validate(manifest, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'/'.join(map(str, err.path)) or '.'}: {err.message}"]
    return []


def patched_api_deployment(*patch_paths):
    """The walk-through's `kubectl create deployment api`, with the patches applied as
    `kubectl patch` would (mappings merge; containers merge by name)."""
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "api", "namespace": "demo"},
        "spec": {
            "selector": {"matchLabels": {"app": "api"}},
            "template": {
                "metadata": {"labels": {"app": "api"}},
                "spec": {"containers": [{"name": "httpbin", "image": "docker.io/kennethreitz/httpbin"}]},
            },
        },
    }

    def merge(into, patch):
        for key, value in patch.items():
            if key == "containers":
                names = {c["name"]: c for c in into.setdefault(key, [])}
                for container in value:
                    if container["name"] in names:
                        merge(names[container["name"]], container)
                    else:
                        into[key].append(copy.deepcopy(container))
            elif isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = copy.deepcopy(value)

    for path in patch_paths:
        merge(deployment, shipped.load_yaml(path))
    return deployment


def test_demo_idp_matches_the_kubernetes_schema_and_is_the_istio_overlays_service(configs):
    documents = [d for d in yaml.safe_load_all(shipped.DEMO_IDP.read_text()) if d]
    assert [d["kind"] for d in documents] == ["Deployment", "Service"]
    for manifest in documents:
        assert kubernetes_errors(manifest) == [], manifest["kind"]
    deployment, service = documents
    (port,) = service["spec"]["ports"]
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert configs["istio"]["introspection"]["cluster"] == f"outbound|{port['port']}||{host}"
    assert configs["istio"]["introspection"]["authority"] == host
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"][-2:] == ["--port", str(port["targetPort"])]


def test_deployment_patches_match_the_kubernetes_schema():
    patched = patched_api_deployment(shipped.WASM_VOLUME_PATCH, shipped.SECRET_ENV_PATCH)
    assert kubernetes_errors(patched) == []
    (proxy,) = [c for c in patched["spec"]["template"]["spec"]["containers"] if c["name"] == "istio-proxy"]
    (env,) = proxy["env"]
    assert env["name"] == "TOKENGATE_CLIENT_SECRET" and env["valueFrom"]["secretKeyRef"]["key"] == "client_secret"


def test_kubernetes_check_rejects_a_broken_object():
    broken = patched_api_deployment(shipped.SECRET_ENV_PATCH)
    broken["spec"]["template"]["spec"]["containers"][1]["env"][0]["valueFrom"]["secretRef"] = {"name": "x"}
    assert any("secretRef" in e for e in kubernetes_errors(broken))


# --------------------------------------------------------------------------- Istio CRD schemas


def crd_schema(crd_path, version):
    """The CRD's openAPIV3Schema as a JSON Schema, as strict as `kubectl apply`.

    The API server rejects fields a structural schema does not declare
    (kubectl's default field validation is Strict), except under
    x-kubernetes-preserve-unknown-fields: JSON Schema says that with
    additionalProperties: false. apiVersion, kind and metadata are implicit
    in every CRD; they are spelled out here.
    """
    crd = shipped.load_yaml(crd_path)
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = copy.deepcopy(entry["schema"]["openAPIV3Schema"])

    def strict(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node and not node.get(
                "x-kubernetes-preserve-unknown-fields"
            ):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    dns_subdomain = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    schema["properties"].update({
        "apiVersion": {"const": f"{crd['spec']['group']}/{version}"},
        "kind": {"const": crd["spec"]["names"]["kind"]},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "maxLength": 253, "pattern": dns_subdomain},
                "namespace": {"type": "string", "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
    })
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    return schema


SCHEMAS = {
    "EnvoyFilter": (shipped.SCHEMA_DIR / "envoyfilters.networking.istio.io.yaml", "v1alpha3"),
    "WasmPlugin": (shipped.SCHEMA_DIR / "wasmplugins.extensions.istio.io.yaml", "v1alpha1"),
    "ServiceEntry": (shipped.SCHEMA_DIR / "serviceentries.networking.istio.io.yaml", "v1"),
    "DestinationRule": (shipped.SCHEMA_DIR / "destinationrules.networking.istio.io.yaml", "v1"),
}


def schema_errors(manifest):
    path, version = SCHEMAS[manifest["kind"]]
    validator = jsonschema.Draft7Validator(crd_schema(path, version))
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}" for e in validator.iter_errors(manifest))


@pytest.mark.parametrize(
    "path", [shipped.ENVOYFILTER, shipped.WASMPLUGIN, shipped.IDP_EXTERNAL], ids=lambda p: p.name
)
def test_istio_manifest_matches_the_crd_schema(path):
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents
    for manifest in documents:
        assert manifest["kind"] in SCHEMAS, manifest["kind"]
        assert schema_errors(manifest) == [], path


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda m: m["spec"].__setitem__("phse", "AUTHN"), "Additional properties"),
        (lambda m: m["spec"].__setitem__("phase", "AUTHX"), "is not one of"),
        (lambda m: m["spec"]["match"][0].__setitem__("mod", "SERVER"), "Additional properties"),
        (lambda m: m["spec"].pop("url"), "'url' is a required property"),
        (lambda m: m["spec"].__setitem__("sha256", "xyz"), "does not match"),
        (lambda m: m.__setitem__("apiVersion", "extensions.istio.io/v1"), "was expected"),
        (lambda m: m["metadata"].pop("name"), "'name' is a required property"),
    ],
    ids=["unknown-field", "bad-enum", "nested-unknown-field", "missing-url", "bad-sha256", "wrong-version", "no-name"],
)
def test_crd_check_rejects_broken_wasmplugins(mutate, expected):
    manifest = shipped.wasmplugin()
    mutate(manifest)
    errors = schema_errors(manifest)
    assert any(expected in e for e in errors), errors


def test_crd_check_rejects_broken_envoyfilters():
    manifest = shipped.envoyfilter()
    manifest["spec"]["configPatches"][0]["applyTo"] = "HTTP_FILTERS"
    manifest["spec"]["configPatches"][1]["match"]["listner"] = {}
    manifest["spec"]["workloadSelector"]["lables"] = {}
    errors = schema_errors(manifest)
    assert len(errors) == 3, errors


# --------------------------------------------------------------------------- docker compose


def check_compose_spec(path):
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=120,
    )


def test_compose_file_matches_the_compose_spec():
    proc = check_compose_spec(shipped.COMPOSE_FILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_spec_check_rejects_a_broken_file(tmp_path):
    compose = shipped.load_yaml(shipped.COMPOSE_FILE)
    compose["services"]["envoy"]["imagee"] = compose["services"]["envoy"].pop("image")
    path = tmp_path / "docker-compose.yaml"
    path.write_text(yaml.safe_dump(compose))
    proc = check_compose_spec(path)
    assert proc.returncode != 0 and "imagee" in proc.stdout + proc.stderr


def compose_mounts(service):
    """[(source, target, read_only)] of a compose service, short or long syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, mode = volume.split(":")
            mounts.append((source, target, mode == "ro"))
        else:
            assert volume["type"] == "bind", volume
            mounts.append((volume["source"], volume["target"], volume.get("read_only") is True))
    return mounts


COMPOSE_PORTS = {
    "envoy": {"TOKENGATE_DATA_PORT": (8080, 8080), "TOKENGATE_ADMIN_PORT": (8081, 8081),
              "TOKENGATE_ENVOY_ADMIN_PORT": (9901, 9901)},
    "idp": {"TOKENGATE_IDP_PORT": (9000, 9000)},
    "upstream": {},
}


def test_compose_publishes_on_loopback_and_mounts_read_only(module):
    compose = shipped.load_yaml(shipped.COMPOSE_FILE)
    assert compose["services"]["envoy"]["image"] == "envoyproxy/envoy:v1.40.0"
    # docker-compose 1.29 refuses a top-level name; the README passes -p instead.
    assert "name" not in compose
    for name, service in compose["services"].items():
        # Each published port: the host's loopback, on the port README.md documents unless its variable says otherwise.
        published = {}
        for port in service.get("ports", []):
            match = re.fullmatch(r"127\.0\.0\.1:\$\{(\w+):-(\d+)\}:(\d+)", port)
            assert match, f"{name}: {port}"
            published[match[1]] = (int(match[2]), int(match[3]))
        assert published == COMPOSE_PORTS[name]
        for source, target, read_only in compose_mounts(service):
            assert read_only, f"{name}: {source}"
            assert (shipped.COMPOSE_FILE.parent / source).exists(), f"{name}: {source} does not exist"
    mounts = {target: source for source, target, _ in compose_mounts(compose["services"]["envoy"])}
    assert (shipped.COMPOSE_FILE.parent / mounts["/etc/tokengate/tokengate.wasm"]).resolve() == module.resolve()
    # Long syntax for the module: Docker refuses a missing module instead of creating a
    # directory; no `bind:` options, whose create_host_path docker-compose 1.29 refuses.
    (module_mount,) = [v for v in compose["services"]["envoy"]["volumes"] if not isinstance(v, str)]
    assert module_mount["target"] == "/etc/tokengate/tokengate.wasm" and "bind" not in module_mount
    bootstrap = shipped.load_yaml(shipped.COMPOSE_BOOTSTRAP)
    for listener in bootstrap["static_resources"]["listeners"]:
        for f in shipped.wasm_filters(listener):
            assert f["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] == "/etc/tokengate/tokengate.wasm"
    assert (shipped.COMPOSE_FILE.parent / mounts["/etc/envoy/envoy.yaml"]).resolve() == shipped.COMPOSE_BOOTSTRAP


def test_module_build_replaces_an_early_compose_mount_and_is_world_readable(module, tmp_path):
    """`compose up` before `make build` leaves an empty directory where the module goes, and
    the official Envoy image reads the module as uid 101: the build writes the module over that
    directory, readable by every user even under umask 077. (The Makefile's module rule, run in
    a scratch tree holding a cargo output; wasm-opt is the real one.)"""
    for name in ("Makefile", ".deps", "tools"):
        (tmp_path / name).symlink_to(REPO / name)
    left_by_compose = tmp_path / "target" / "tokengate.wasm"
    left_by_compose.mkdir(parents=True)
    cargo_out = tmp_path / "target" / "wasm32-wasip1" / "release" / "tokengate.wasm"
    cargo_out.parent.mkdir(parents=True)
    cargo_out.write_bytes(module.read_bytes())
    # Even older than the directory, as when the module was built before a `rm` and a `compose up`.
    os.utime(cargo_out, (1, 1))
    wasm_opt = ".deps/binaryen/node_modules/.bin/wasm-opt"
    proc = subprocess.run(
        ["make", "--no-print-directory", "-o", wasm_opt, "target/tokengate.wasm"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o077),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert left_by_compose.is_file()
    assert left_by_compose.read_bytes()[:4] == b"\0asm"
    assert left_by_compose.stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- README


def config_keys():
    """Every field of the structs in src/config.rs, by struct."""
    text = (REPO / "src" / "config.rs").read_text()
    keys = {}
    for struct, body in re.findall(r"pub struct (\w+) \{(.*?)\n\}", text, re.S):
        keys[struct] = re.findall(r"^\s*pub (\w+):", body, re.M)
    return keys


def readme_section(heading):
    text = shipped.README.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def test_readme_documents_every_configuration_key_and_no_other():
    keys = config_keys()
    assert keys["Config"], "src/config.rs no longer parses as expected"
    documented = set(re.findall(r"^\| `(\w+)` \|", readme_section("Configuration reference"), re.M))
    missing = {f"{s}.{k}" for s, fields in keys.items() for k in fields if k not in documented}
    assert not missing, f"README.md's configuration reference lacks {sorted(missing)}"
    unknown = documented - {k for fields in keys.values() for k in fields}
    assert not unknown, f"README.md documents keys src/config.rs does not have: {sorted(unknown)}"


def test_readme_lists_every_metric():
    names = re.findall(r'(?:c|hot)\("([a-z_.]+)"\)', (REPO / "src" / "metrics.rs").read_text())
    assert names, "src/metrics.rs no longer parses as expected"
    documented = re.findall(r"^\| `([a-z_.]+)` \|", readme_section("Metrics"), re.M)
    missing = [n for n in names if n not in documented]
    assert not missing, f"README.md's metrics table lacks {missing}"
    unknown = [n for n in documented if n not in names]
    assert not unknown, f"README.md lists metrics src/metrics.rs does not define: {unknown}"


def test_readme_keeps_the_admin_api_section():
    assert re.search(r"^## Admin API$", shipped.README.read_text(), re.M)


# --------------------------------------------------------------------------- make oci


OCI = shipped.ENVOY_DIR / "istio" / "build-oci.sh"


def test_oci_says_when_the_client_is_missing():
    env = dict(os.environ, OCI_CLIENT="/nonexistent/docker")
    proc = subprocess.run([str(OCI), "preflight"], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 3
    assert "the container client ('/nonexistent/docker') is not installed" in proc.stderr


def fake_client(folder, name, script):
    folder.mkdir(exist_ok=True)
    fake = folder / name
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    return fake


def test_oci_says_when_the_docker_engine_is_not_running(tmp_path):
    # A fake client that fails as docker does without an engine.
    fake = fake_client(tmp_path, "docker", "echo 'Cannot connect to the Docker daemon at unix:///nonexistent.sock.' >&2\nexit 1\n")
    env = dict(os.environ, OCI_CLIENT=str(fake))
    proc = subprocess.run([str(OCI), "preflight"], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 4
    assert "no engine is reachable" in proc.stderr and "Cannot connect" in proc.stderr


def test_oci_builds_with_podman_when_no_docker_engine_answers(tmp_path, module):
    """A docker client without an engine and podman (daemonless) on PATH: podman builds the image."""
    bin_dir = tmp_path / "bin"
    fake_client(bin_dir, "docker", "echo 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    calls = tmp_path / "podman-calls"
    fake_client(bin_dir, "podman", f'echo "$1" >> {calls}\n')
    env = {k: v for k, v in os.environ.items() if k != "OCI_CLIENT"}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    for argv in (["preflight"], ["build", str(module), "tokengate:test"]):
        proc = subprocess.run([str(OCI), *argv], capture_output=True, text=True, env=env, timeout=30)
        assert proc.returncode == 0, proc.stderr
    assert calls.read_text().split() == ["info", "build"]
    assert "built tokengate:test with podman" in proc.stdout
