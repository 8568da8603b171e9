#!/usr/bin/env python3
"""Render tokengate's plugin configuration into every file that ships it.

    python envoy/render.py           rewrite the derived files
    python envoy/render.py --check   exit 1 (with a diff) if any is stale

One source of truth: envoy/tokengate.json (the base) and envoy/overlays.yaml
(the variants derived from it). The files that carry a configuration mark the
spot with a comment naming the variant; everything else in them is written by
hand and left alone:

    # tokengate-config: <variant>          (YAML; the next line is `value: |`
    value: |                                or `pluginConfig:`, whose block is
      {...}                                 replaced)

    <!-- tokengate-config: <variant> -->   (Markdown; the ```json fence that
    ```json                                 follows is replaced)

    # tokengate-body-limit: <variant>        (YAML; the next line is the buffer
    max_request_bytes: N                     filter's limit, set to the variant's
                                             admin.max_body_bytes)

envoy/compose/envoy.yaml is generated whole from envoy/envoy.yaml, so the
compose deployment cannot drift from the reference bootstrap.

Standard library and PyYAML only.
"""
import argparse
import copy
import difflib
import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "envoy" / "tokengate.json"
OVERLAYS = REPO / "envoy" / "overlays.yaml"
REFERENCE = REPO / "envoy" / "envoy.yaml"
COMPOSE_BOOTSTRAP = REPO / "envoy" / "compose" / "envoy.yaml"

# Files with marked blocks, relative to the repository root.
MARKED = [
    "envoy/envoy.yaml",
    "envoy/istio/envoyfilter.yaml",
    "envoy/istio/wasmplugin.yaml",
    "README.md",
]

# Inside the compose network Envoy reaches the demo servers by service name,
# and reads the module from the read-only mount docker-compose.yaml declares.
COMPOSE_WASM = "/etc/tokengate/tokengate.wasm"
COMPOSE_HOSTS = {"idp": "idp", "upstream": "upstream"}

YAML_MARKER = re.compile(r"^(?P<indent> *)# tokengate-config: (?P<variant>[\w-]+)\s*$")
YAML_KEY = re.compile(r"^(?P<indent> *)(?P<key>value: \||pluginConfig:)\s*$")
BODY_MARKER = re.compile(r"^(?P<indent> *)# tokengate-body-limit: (?P<variant>[\w-]+)\s*$")
BODY_KEY = re.compile(r"^(?P<indent> *)max_request_bytes: \d+\s*$")
# src/config.rs's default of admin.max_body_bytes.
DEFAULT_MAX_BODY_BYTES = 1048576
MD_MARKER = re.compile(r"^<!-- tokengate-config: (?P<variant>[\w-]+) -->\s*$")


class RenderError(Exception):
    pass


# --------------------------------------------------------------------------- variants


def merge(base, overlay):
    """Deep merge: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def variants():
    """{variant name: plugin configuration dict}."""
    base = json.loads(BASE.read_text())
    spec = yaml.safe_load(OVERLAYS.read_text())
    overlays, out = spec["overlays"], {}
    for name, chain in spec["variants"].items():
        config = base
        for overlay in chain:
            if overlay not in overlays:
                raise RenderError(f"{OVERLAYS.name}: variant {name!r} names unknown overlay {overlay!r}")
            config = merge(config, overlays[overlay])
        out[name] = config
    return out


# --------------------------------------------------------------------------- marked blocks


def render_json(config, indent):
    pad = " " * indent
    return [pad + line for line in json.dumps(config, indent=2).splitlines()]


def render_yaml(config, indent):
    pad = " " * indent
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=4096)
    return [pad + line for line in text.splitlines()]


def splice_yaml(path, text, configs):
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        body = BODY_MARKER.match(line)
        if body:
            # The buffer filter before the router holds an admin request's body: its limit
            # follows admin.max_body_bytes, so the filter's own 413 is what a client meets.
            admin = configs.get(body["variant"], {}).get("admin")
            if admin is None:
                raise RenderError(f"{path}:{i}: variant {body['variant']!r} has no admin section")
            if i >= len(lines) or not BODY_KEY.match(lines[i]) or BODY_KEY.match(lines[i])["indent"] != body["indent"]:
                raise RenderError(f"{path}:{i}: the marker must be followed by `max_request_bytes: N`")
            out.append(f"{body['indent']}max_request_bytes: {admin.get('max_body_bytes', DEFAULT_MAX_BODY_BYTES)}")
            i += 1
            continue
        marker = YAML_MARKER.match(line)
        if not marker:
            continue
        variant = marker["variant"]
        key = YAML_KEY.match(lines[i]) if i < len(lines) else None
        if variant not in configs:
            raise RenderError(f"{path}:{i}: unknown variant {variant!r}")
        if not key or key["indent"] != marker["indent"]:
            raise RenderError(f"{path}:{i}: the marker must be followed by `value: |` or `pluginConfig:`")
        out.append(lines[i])
        i += 1
        # The old block: every following line indented deeper than the key
        # (blank lines inside it included, trailing blank lines given back).
        depth = len(key["indent"])
        end = i
        while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > depth):
            end += 1
        while end > i and not lines[end - 1].strip():
            end -= 1
        render = render_json if key["key"].startswith("value") else render_yaml
        out.extend(render(configs[variant], depth + 2))
        i = end
    return "\n".join(out) + "\n"


def splice_markdown(path, text, configs):
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        marker = MD_MARKER.match(line)
        if not marker:
            continue
        variant = marker["variant"]
        if variant not in configs:
            raise RenderError(f"{path}:{i}: unknown variant {variant!r}")
        if i >= len(lines) or lines[i].strip() != "```json":
            raise RenderError(f"{path}:{i}: the marker must be followed by a ```json fence")
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise RenderError(f"{path}:{i}: the ```json fence is not closed")
        out.append("```json")
        out.extend(render_json(configs[variant], 0))
        out.append("```")
        i = end + 1
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- compose bootstrap


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the plugin configurations) as `|` blocks, readable as JSON."""


def _str(dumper, value):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def compose_bootstrap(reference_text):
    """The reference bootstrap, adapted to run in the compose network."""
    config = yaml.safe_load(reference_text)
    # In a container, a published port reaches the container's interface, not
    # its loopback: listen on all interfaces there. docker-compose.yaml
    # publishes the ports on the host's 127.0.0.1 only.
    config["admin"]["address"]["socket_address"]["address"] = "0.0.0.0"
    resources = config["static_resources"]
    for listener in resources["listeners"]:
        listener["address"]["socket_address"]["address"] = "0.0.0.0"
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    if http_filter["typed_config"]["@type"].endswith(".wasm.v3.Wasm"):
                        code = http_filter["typed_config"]["config"]["vm_config"]["code"]
                        code["local"]["filename"] = COMPOSE_WASM
    names = set()
    for cluster in resources["clusters"]:
        names.add(cluster["name"])
        host = COMPOSE_HOSTS.get(cluster["name"])
        if host is None:
            raise RenderError(f"envoy.yaml cluster {cluster['name']!r} has no compose service in render.py")
        cluster["type"] = "STRICT_DNS"
        cluster["dns_lookup_family"] = "V4_ONLY"
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                endpoint["endpoint"]["address"]["socket_address"]["address"] = host
    header = (
        "# GENERATED by envoy/render.py from envoy/envoy.yaml: do not edit; see that\n"
        "# file for why each part is there. The differences: listeners bind 0.0.0.0\n"
        "# (docker-compose.yaml publishes them on the host's 127.0.0.1 only), the\n"
        f"# clusters reach the compose services by name, the module is {COMPOSE_WASM}.\n"
    )
    return header + yaml.dump(config, Dumper=_BlockDumper, sort_keys=False, width=4096)


# --------------------------------------------------------------------------- driver


def render_all():
    """{absolute path: the text it should have}."""
    configs = variants()
    out = {}
    for rel in MARKED:
        path = REPO / rel
        text = path.read_text()
        splice = splice_markdown if path.suffix == ".md" else splice_yaml
        out[path] = splice(rel, text, configs)
    out[COMPOSE_BOOTSTRAP] = compose_bootstrap(out[REFERENCE])
    return out


def stale(rendered):
    """[(path, unified diff)] of the files whose text differs from the rendering."""
    result = []
    for path, text in rendered.items():
        current = path.read_text() if path.exists() else ""
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(keepends=True),
                text.splitlines(keepends=True),
                f"{path.relative_to(REPO)} (committed)",
                f"{path.relative_to(REPO)} (rendered)",
            )
            result.append((path, "".join(diff)))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a derived file is stale; write nothing")
    args = parser.parse_args(argv)
    try:
        rendered = render_all()
    except (RenderError, OSError, ValueError, KeyError) as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 2
    changed = stale(rendered)
    if args.check:
        for path, diff in changed:
            sys.stderr.write(diff)
        if changed:
            names = ", ".join(str(p.relative_to(REPO)) for p, _ in changed)
            print(f"render.py: stale: {names}; run `make render`", file=sys.stderr)
            return 1
        print(f"render.py: {len(rendered)} files up to date")
        return 0
    for path, _ in changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rendered[path])
        print(f"render.py: wrote {path.relative_to(REPO)}")
    if not changed:
        print(f"render.py: {len(rendered)} files up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
