"""Reading the shipped deployment files (envoy/), for tests/deploy and tests/e2e.

Everything here parses the files as they are committed; nothing is copied
from them, so a test that uses these helpers tests what users get.
"""
import copy
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
ENVOY_DIR = REPO / "envoy"
REFERENCE = ENVOY_DIR / "envoy.yaml"
COMPOSE_FILE = ENVOY_DIR / "docker-compose.yaml"
COMPOSE_BOOTSTRAP = ENVOY_DIR / "compose" / "envoy.yaml"
ENVOYFILTER = ENVOY_DIR / "istio" / "envoyfilter.yaml"
WASMPLUGIN = ENVOY_DIR / "istio" / "wasmplugin.yaml"
SCHEMA_DIR = ENVOY_DIR / "istio" / "schema"
IDP_EXTERNAL = ENVOY_DIR / "istio" / "idp-external.yaml"
DEMO_IDP = ENVOY_DIR / "istio" / "demo-idp.yaml"
WASM_VOLUME_PATCH = ENVOY_DIR / "istio" / "wasm-volume-patch.yaml"
SECRET_ENV_PATCH = ENVOY_DIR / "istio" / "secret-env-patch.yaml"
TLS_IDP_CLUSTER = ENVOY_DIR / "tls" / "idp-cluster.yaml"
TLS_ETCD_CLUSTER = ENVOY_DIR / "tls" / "etcd-cluster.yaml"
README = REPO / "README.md"
WASM = REPO / "target" / "tokengate.wasm"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
HCM = "envoy.filters.network.http_connection_manager"

sys.path.insert(0, str(ENVOY_DIR))
import render  # noqa: E402  (envoy/render.py: the variants and the rendering)


def load_yaml(path):
    return yaml.safe_load(Path(path).read_text())


def variants():
    """{variant: plugin configuration} as envoy/render.py derives them."""
    return render.variants()


# --------------------------------------------------------------------------- bootstraps


def http_manager(listener):
    for chain in listener["filter_chains"]:
        for network_filter in chain["filters"]:
            if network_filter["name"] == HCM:
                return network_filter["typed_config"]
    raise KeyError(f"listener {listener.get('name')} has no {HCM}")


def wasm_filters(listener):
    return [f for f in http_manager(listener)["http_filters"] if f.get("typed_config", {}).get("@type") == WASM_TYPE]


def listener_named(bootstrap, name):
    for listener in bootstrap["static_resources"]["listeners"]:
        if listener["name"] == name:
            return listener
    raise KeyError(f"no listener {name!r}")


def plugin_config(wasm_filter):
    """The plugin configuration (a dict) of a Wasm HTTP filter."""
    configuration = wasm_filter["typed_config"]["config"]["configuration"]
    assert configuration["@type"] == "type.googleapis.com/google.protobuf.StringValue", configuration
    return json.loads(configuration["value"])


def set_module(listener, path):
    """Point every tokengate filter of a listener at the module `path`."""
    for f in wasm_filters(listener):
        f["typed_config"]["config"]["vm_config"]["code"] = {"local": {"filename": str(path)}}


# --------------------------------------------------------------------------- Istio


def envoyfilter():
    return load_yaml(ENVOYFILTER)


def wasmplugin():
    return load_yaml(WASMPLUGIN)


def _patch(applies_to, manifest=None):
    manifest = manifest or envoyfilter()
    patches = [p for p in manifest["spec"]["configPatches"] if p["applyTo"] == applies_to]
    assert len(patches) == 1, f"{ENVOYFILTER.name}: expected one {applies_to} patch, found {len(patches)}"
    return patches[0]


def istio_http_filter():
    """The tokengate HTTP filter that envoyfilter.yaml inserts on the sidecar's inbound chains."""
    return copy.deepcopy(_patch("HTTP_FILTER")["patch"]["value"])


def istio_admin_listener():
    """The admin-API listener that envoyfilter.yaml adds to the sidecar."""
    return copy.deepcopy(_patch("LISTENER")["patch"]["value"])


def istio_introspection_cluster():
    return plugin_config(istio_http_filter())["introspection"]["cluster"]


def static_cluster(name, port, host="127.0.0.1"):
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}],
        },
    }


def istio_bootstrap(module, inbound_port, admin_port, envoy_admin_port, idp_port, app_port):
    """A static bootstrap standing in for what istiod gives a sidecar with envoyfilter.yaml applied.

    An inbound listener whose HTTP filters are the patch's filter before the
    router (the INSERT_BEFORE), the added admin listener as it is in the
    manifest, and the mesh cluster under the exact `outbound|<port>||<host>`
    name the plugin configuration names, here pointing at a local IdP.
    """
    inbound = {
        "name": "virtualInbound",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": inbound_port}},
        "filter_chains": [{"filters": [{
            "name": HCM,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "inbound_80",
                "route_config": {"name": "inbound", "virtual_hosts": [{
                    "name": "inbound", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "inbound|80||"}}],
                }]},
                "http_filters": [
                    istio_http_filter(),
                    {"name": "envoy.filters.http.router",
                     "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                ],
            },
        }]}],
    }
    admin = istio_admin_listener()
    admin["address"]["socket_address"]["port_value"] = admin_port
    for listener in (inbound, admin):
        set_module(listener, module)
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": envoy_admin_port}}},
        "static_resources": {
            "listeners": [inbound, admin],
            "clusters": [static_cluster(istio_introspection_cluster(), idp_port), static_cluster("inbound|80||", app_port)],
        },
    }


# --------------------------------------------------------------------------- README


def readme_json_blocks():
    """{variant: the config in the README block marked with it}."""
    lines, out = README.read_text().splitlines(), {}
    for i, line in enumerate(lines):
        match = render.MD_MARKER.match(line)
        if match:
            end = lines.index("```", i + 2)
            out[match["variant"]] = json.loads("\n".join(lines[i + 2:end]))
    return out
