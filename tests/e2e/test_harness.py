"""The harness itself: the shipped configuration, the test servers, and Envoy without
the filter. None of these need the wasm module, so they tell a broken harness from a
broken filter.
"""
import http.client
import json
import time

import pytest
import yaml

from conftest import CONCURRENCY
from harness import (
    ENVOY_TEMPLATE,
    GATEWAY_CLIENT,
    PLUGIN_CONFIG,
    Envoy,
    Listener,
    burst,
    get,
    post_form,
)


def wasm_plugins(bootstrap):
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                for http_filter in f["typed_config"].get("http_filters", []):
                    if http_filter["typed_config"]["@type"].endswith(".Wasm"):
                        yield listener["name"], http_filter["typed_config"]["config"]


def test_shipped_envoy_yaml_embeds_tokengate_json_on_the_data_listener():
    plugins = dict(wasm_plugins(yaml.safe_load(ENVOY_TEMPLATE.read_text())))
    assert json.loads(plugins["data"]["configuration"]["value"]) == json.loads(PLUGIN_CONFIG.read_text())


def test_envoy_config_is_the_template_with_test_ports(procs, workdir, mock_idp_server, upstream):
    extra = Listener("extra", {"x": 2})
    test_config = mock_idp_server.plugin_config()
    envoy = Envoy(procs, workdir, mock_idp_server.port, upstream.port, test_config, extra_listeners=[extra])
    template = yaml.safe_load(ENVOY_TEMPLATE.read_text())
    config = envoy.bootstrap()
    resources = config["static_resources"]
    ports = {x["name"]: x["address"]["socket_address"]["port_value"] for x in resources["listeners"]}
    template_names = [x["name"] for x in template["static_resources"]["listeners"]]
    assert list(ports) == template_names + ["extra"], "every template listener is kept"
    assert ports == envoy.ports and ports["data"] == envoy.port
    assert len(set(ports.values()) | {envoy.admin_port}) == len(ports) + 1
    assert config["admin"]["address"]["socket_address"]["port_value"] == envoy.admin_port
    plugins = dict(wasm_plugins(config))
    assert json.loads(plugins["data"]["configuration"]["value"]) == test_config
    assert json.loads(plugins["extra"]["configuration"]["value"]) == {"x": 2}
    template_plugins = dict(wasm_plugins(template))
    for name, plugin in plugins.items():
        assert plugin["vm_config"]["vm_id"] == plugins["data"]["vm_config"]["vm_id"]
        assert plugin["vm_config"]["code"]["local"]["filename"] == envoy.wasm
        if name not in ("data", "extra"):
            # Another template listener: the test's IdP settings plus its own additions.
            own = json.loads(template_plugins[name]["configuration"]["value"])
            got = json.loads(plugin["configuration"]["value"])
            assert got["introspection"] == test_config["introspection"]
            for key in set(own) - set(json.loads(PLUGIN_CONFIG.read_text())):
                assert got[key] == own[key]
    endpoints = {
        c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        for c in resources["clusters"]
    }
    assert endpoints["idp"] == {"address": "127.0.0.1", "port_value": mock_idp_server.port}
    assert endpoints["upstream"] == {"address": "127.0.0.1", "port_value": upstream.port}


def test_envoy_without_the_filter_proxies_to_the_echo_upstream(fresh, mock_idp_server):
    envoy = fresh.envoy(mock_idp_server, with_filter=False, extra_listeners=[Listener("second", {})])
    info = envoy.admin("/server_info").json()
    assert int(info["command_line_options"]["concurrency"]) == CONCURRENCY
    resp = envoy.get("/some/path?q=1", [("X-Repeated", "1"), ("X-Repeated", "2")])
    assert resp.status == 200
    echoed = resp.json()
    assert (echoed["method"], echoed["path"]) == ("GET", "/some/path?q=1")
    assert envoy.get("/", listener="second").status == 200
    statuses = burst(envoy.port, n=200, connections=32)
    assert statuses == [200] * 200
    assert envoy.counter("cluster.upstream.upstream_rq_total") >= 202


def test_mock_idp_answers_rfc7662(mock_idp):
    token = mock_idp.issue_token(scope="read", client_id="app-a", sub="user-1", ttl=60)
    answer = mock_idp.introspect(token)
    assert answer["active"] is True
    assert {k: answer[k] for k in ("scope", "client_id", "sub", "token_type")} == {
        "scope": "read", "client_id": "app-a", "sub": "user-1", "token_type": "Bearer"
    }
    assert answer["exp"] - answer["iat"] == 60
    denied = post_form(mock_idp.port, mock_idp.introspection_path, {"token": token}, auth=("gateway", "nope"))
    assert (denied.status, denied.json()) == (401, {"error": "invalid_client"})
    assert mock_idp.introspect("unknown") == {"active": False}
    mock_idp.revoke(token)
    assert mock_idp.introspect(token) == {"active": False}
    assert mock_idp.introspections()["tokens"] == [token, token, "unknown", token]


def test_mock_idp_answers_registered_claims_verbatim(mock_idp):
    claims = {"active": True, "scope": 7, "exp": "soon", "extra": {"nested": [1]}}
    mock_idp.register("a+b/c~d.e_f==", **claims)
    assert mock_idp.introspect("a+b/c~d.e_f==") == claims
    assert mock_idp.introspections()["tokens"] == ["a+b/c~d.e_f=="]


def test_mock_idp_faults(mock_idp):
    mock_idp.register_active("t")
    call = lambda: post_form(mock_idp.port, mock_idp.introspection_path, {"token": "t"}, auth=GATEWAY_CLIENT)
    mock_idp.fault("status", status=502)
    assert call().status == 502
    mock_idp.fault("nonjson")
    assert call().header("Content-Type") == "text/html"
    mock_idp.fault("huge")
    assert len(call().body) == 8 * 1024 * 1024
    mock_idp.fault("slow", delay_ms=300)
    assert call().elapsed >= 0.3
    mock_idp.fault("reset")
    with pytest.raises((OSError, http.client.HTTPException)):
        call()
    mock_idp.reset()
    assert call().json()["active"] is True
    assert mock_idp.introspections()["count"] == 1


def test_oidc_provider_issues_and_introspects_client_credentials_tokens(oidc_idp_server):
    idp = oidc_idp_server
    token = idp.issue_token(scope="read write")
    answer = idp.introspect(token)
    assert answer["active"] is True
    assert (answer["client_id"], answer["scope"], answer["token_type"]) == ("app-a", "read write", "Bearer")
    assert isinstance(answer["exp"], int) and isinstance(answer["iat"], int)
    assert "sub" not in answer, "client-credentials tokens have no subject in oidc-provider"
    assert idp.introspect("unknown-token") == {"active": False}
    assert post_form(idp.port, idp.introspection_path, {"token": token}, auth=("gateway", "x")).status == 401
    idp.revoke(token)
    assert idp.introspect(token) == {"active": False}


def test_oidc_provider_short_lived_token_expires(oidc_idp_server):
    token = oidc_idp_server.issue_token(scope="read", ttl=1)
    answer = oidc_idp_server.introspect(token)
    assert answer["exp"] - answer["iat"] == 1
    time.sleep(max(0.0, answer["exp"] - time.time()) + 0.1)
    assert oidc_idp_server.introspect(token) == {"active": False}


def test_echo_upstream_lists_repeated_headers(upstream):
    resp = get(upstream.port, "/x", [("X-A", "1"), ("X-A", "2"), ("X-B", "3")])
    headers = resp.json()["headers"]
    assert headers["x-a"] == ["1", "2"] and headers["x-b"] == "3"
