"""Per-route policy: plugin `rules`, Envoy route metadata, CORS preflights, audiences and
issuers, against a real Envoy (--concurrency 4).

Each table row is (method, path, token, expected status); a token is named by the
scopes, audience and issuer the IdP says it has.
"""
import json
import secrets

import pytest

from conftest import CONCURRENCY
from harness import Envoy, bearer, request

# A realistic API: the policy written as plugin rules (README "Per-route policy").
RULES = [
    {"match": {"path": "/healthz"}, "require": {"token": "none"}},
    {"match": {"prefix": "/.well-known/"}, "require": {"token": "none"}},
    {"match": {"path": "/orders", "methods": ["GET"]}, "require": {"scopes": ["orders:read"]}},
    {"match": {"path": "/orders/{id}", "methods": ["GET"]}, "require": {"scopes": ["orders:read"]}},
    {"match": {"path": "/orders", "methods": ["POST"]}, "require": {"any_scopes": [["orders:write"], ["admin"]]}},
    {"match": {"path": "/orders/*"}, "require": {"scopes": ["admin"]}},
    {"match": {"prefix": "/catalog"}, "require": {"token": "optional"}},
    {"match": {"path": "/billing/*"}, "require": {"scopes": ["read"], "audiences": ["billing-api"]}},
]
POLICY = {
    "audiences": ["orders-api"],
    "issuers": ["https://idp.example"],
    "pass_cors_preflight": True,
    "rules": RULES,
}

# name -> claims the mock IdP answers (besides active, exp, client_id, sub).
TOKENS = {
    "read": dict(scope="read"),
    "orders_read": dict(scope="read orders:read"),
    "orders_write": dict(scope="read orders:write"),
    "admin": dict(scope="read admin"),
    "billing": dict(scope="read", aud="billing-api"),
    "other_aud": dict(scope="read orders:read admin", aud=["billing-api", "search-api"]),
    "other_iss": dict(scope="read orders:read admin", iss="https://evil.example"),
    "no_aud": dict(scope="read orders:read admin", aud=None),
    "inactive": None,
}
DEFAULT_CLAIMS = dict(aud=["orders-api", "web"], iss="https://idp.example")

PLUGIN_TABLE = [
    # public paths, with and without a token, and their edge cases
    ("GET", "/healthz", None, 200),
    ("POST", "/healthz", None, 200),
    ("GET", "/healthz?verbose=1", None, 200),
    ("GET", "/healthz", "inactive", 200),
    ("GET", "/healthz/", None, 401),
    ("GET", "/healthz.", None, 401),
    ("GET", "/HEALTHZ", None, 401),
    ("GET", "/.well-known/openid-configuration", None, 200),
    ("GET", "/.well-known", None, 401),
    # a path that means another resource once normalised is refused, not matched
    ("GET", "/.well-known/../orders", None, 400),
    ("GET", "/.well-known/%2e%2e/orders", None, 400),
    ("GET", "/.well-known/..%2Forders", None, 400),
    ("GET", "/orders/1%2F2", "admin", 400),
    # scopes per path and method, rule order
    ("GET", "/orders", "orders_read", 200),
    ("GET", "/orders", "read", 403),
    ("GET", "/orders?page=2", "orders_read", 200),
    ("GET", "/orders/42", "orders_read", 200),
    ("GET", "/orders/42?x=/a/b", "orders_read", 200),
    ("GET", "/orders/", "orders_read", 403),
    ("GET", "/orders/", "admin", 200),
    ("GET", "/orders/42/items", "orders_read", 403),
    ("DELETE", "/orders/42", "orders_read", 403),
    ("DELETE", "/orders/42", "admin", 200),
    ("POST", "/orders", "orders_write", 200),
    ("POST", "/orders", "admin", 200),
    ("POST", "/orders", "orders_read", 403),
    ("PUT", "/orders", "read", 200),
    ("GET", "/Orders", "read", 200),
    ("GET", "/ordersX", "read", 200),
    ("GET", "/anything", None, 401),
    # optional token
    ("GET", "/catalog/1", None, 200),
    ("GET", "/catalog/1", "read", 200),
    ("GET", "/catalog/1", "inactive", 401),
    # audiences and issuers
    ("GET", "/orders", "other_aud", 401),
    ("GET", "/orders", "no_aud", 401),
    ("GET", "/orders", "other_iss", 401),
    ("GET", "/catalog/1", "other_aud", 401),
    ("GET", "/billing/1", "billing", 200),
    ("GET", "/billing/1", "read", 401),
    # CORS: a preflight passes, a plain OPTIONS does not
    ("OPTIONS", "/orders", "preflight", 200),
    ("OPTIONS", "/orders", None, 401),
]


def register(mock_idp, name):
    token = f"{name}-{secrets.token_hex(8)}"
    claims = TOKENS[name]
    if claims is None:
        mock_idp.register(token, active=False)
        return token
    claims = {**DEFAULT_CLAIMS, **claims}
    claims = {k: v for k, v in claims.items() if v is not None}
    mock_idp.register_active(token, **claims)
    return token


def send(envoy, mock_idp, method, path, token):
    headers = {"X-Auth-Subject": "spoofed"}
    if token == "preflight":
        headers.update({"Origin": "https://shop.example", "Access-Control-Request-Method": "POST"})
    elif token is not None:
        headers.update(bearer(register(mock_idp, token)))
    return request(envoy.port, path, headers, method)


def check_table(envoy, mock_idp, table):
    got = [(m, p, t, send(envoy, mock_idp, m, p, t)) for m, p, t, _ in table]
    wrong = [(m, p, t, r.status, want) for (m, p, t, r), (*_, want) in zip(got, table) if r.status != want]
    assert not wrong, "method, path, token, got, want:\n" + "\n".join(map(str, wrong))
    for method, path, token, resp in got:
        if resp.status == 200:
            seen = resp.json()["headers"]
            assert seen.get("x-auth-subject") != "spoofed", (method, path, token, seen)


@pytest.fixture(scope="module")
def rules_envoy(envoys, mock_idp_server):
    return envoys.get(mock_idp_server, mock_idp_server.plugin_config(**POLICY), name="envoy-route-policy")


def test_plugin_rules_table(rules_envoy, mock_idp):
    check_table(rules_envoy, mock_idp, PLUGIN_TABLE)


def test_wrong_audience_and_issuer_are_invalid_token_and_counted_apart(rules_envoy, mock_idp):
    names = ["invalid_audience", "invalid_issuer", "invalid_token"]
    counts = lambda: [rules_envoy.metric(f"tokengate.requests.denied.{n}") for n in names]  # noqa: E731
    before = counts()
    resp = send(rules_envoy, mock_idp, "GET", "/orders", "other_aud")
    assert resp.status == 401
    assert resp.header("WWW-Authenticate") == (
        'Bearer realm="tokengate", error="invalid_token", '
        'error_description="the token is not meant for this audience"'
    )
    resp = send(rules_envoy, mock_idp, "GET", "/orders", "other_iss")
    assert resp.status == 401
    assert resp.json() == {"error": "invalid_token", "error_description": "the token's issuer is not trusted here"}
    assert [a - b for a, b in zip(counts(), before)] == [1, 1, 0]


def test_public_optional_and_preflight_requests_are_counted(rules_envoy, mock_idp):
    names = ["public", "anonymous", "preflight"]
    counts = lambda: [rules_envoy.metric(f"tokengate.requests.passed.{n}") for n in names]  # noqa: E731
    before = counts()
    send(rules_envoy, mock_idp, "GET", "/healthz", None)
    send(rules_envoy, mock_idp, "GET", "/catalog/2", None)
    send(rules_envoy, mock_idp, "OPTIONS", "/orders", "preflight")
    assert [a - b for a, b in zip(counts(), before)] == [1, 1, 1]


# --------------------------------------------------------------------------- route metadata

# The same API written as Envoy routes, each carrying its requirement; plus one
# route without metadata (the plugin rules then decide) to show that metadata wins.
ROUTES = [
    ({"path": "/healthz"}, {"token": "none"}),
    ({"path": "/orders", "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
     {"scopes": ["orders:read"]}),
    ({"path": "/orders", "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]},
     {"any_scopes": [["orders:write"], ["admin"]]}),
    ({"path_separated_prefix": "/orders"}, {"scopes": ["admin"]}),
    ({"prefix": "/catalog"}, {"token": "optional"}),
    ({"prefix": "/plugin-rules"}, None),
    ({"prefix": "/"}, {"scopes": ["read"]}),
]

METADATA_TABLE = [
    ("GET", "/healthz", None, 200),
    ("GET", "/orders", "orders_read", 200),
    ("GET", "/orders", "read", 403),
    ("POST", "/orders", "admin", 200),
    ("POST", "/orders", "orders_read", 403),
    ("GET", "/orders/7", "orders_read", 403),
    ("GET", "/orders/7", "admin", 200),
    ("GET", "/catalog", None, 200),
    ("GET", "/catalog", "inactive", 401),
    ("GET", "/orders", "other_aud", 401),
    ("GET", "/other", "read", 200),
    ("GET", "/other", None, 401),
    # metadata wins: the plugin rule below says /healthz-like public, the route says read
    ("GET", "/plugin-rules/open", None, 200),
    ("GET", "/plugin-rules/closed", None, 401),
    # Envoy's route match is byte-exact and case-sensitive: these miss the /orders
    # routes (GET needs orders:read, POST orders:write) and get the catch-all's `read`
    ("GET", "/orders.", "read", 200),
    ("GET", "/orders.", None, 401),
    ("GET", "/ORDERS", "read", 200),
    ("POST", "/ORDERS", "read", 200),
    ("GET", "/ORDERS", None, 401),
    ("GET", "/orders/7.", "read", 403),
    # ...and on a route without metadata, a miss of the plugin rule gets the top level
    ("GET", "/plugin-rules/open.", None, 401),
    ("GET", "/plugin-rules/open.", "read", 200),
    ("GET", "/plugin-rules/OPEN", None, 401),
]


@pytest.fixture(scope="module")
def metadata_envoy(procs, workdir, upstream, mock_idp_server):
    config = mock_idp_server.plugin_config(
        audiences=["orders-api"],
        route_metadata=True,
        rules=[
            {"match": {"path": "/plugin-rules/open"}, "require": {"token": "none"}},
            # Shadowed by the route's own requirement.
            {"match": {"path": "/other"}, "require": {"token": "none"}},
        ],
    )
    envoy = Envoy(
        procs,
        workdir,
        idp_port=mock_idp_server.port,
        upstream_port=upstream.port,
        plugin_config=config,
        concurrency=CONCURRENCY,
        name="envoy-route-metadata",
    )
    vhost = envoy.template["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = []
    for match, require in ROUTES:
        route = {"match": match, "route": {"cluster": "upstream"}}
        if require is not None:
            route["metadata"] = {"filter_metadata": {"tokengate": {"require": json.dumps(require)}}}
        routes.append(route)
    vhost["typed_config"]["route_config"]["virtual_hosts"][0]["routes"] = routes
    envoy.start()
    yield envoy
    envoy.stop()


def test_route_metadata_table(metadata_envoy, mock_idp):
    check_table(metadata_envoy, mock_idp, METADATA_TABLE)


# --------------------------------------------------------------------------- a real authorization server


def test_rules_with_oidc_provider_scopes(envoys, oidc_idp_server):
    idp = oidc_idp_server
    rules = [
        {"match": {"path": "/write"}, "require": {"scopes": ["write"]}},
        {"match": {"path": "/either"}, "require": {"any_scopes": [["admin"], ["write"]]}},
        {"match": {"path": "/open"}, "require": {"token": "none"}},
    ]
    envoy = envoys.get(idp, idp.plugin_config(rules=rules), name="envoy-route-policy-oidc")
    read, write = idp.issue_token("read"), idp.issue_token("read write")
    table = [
        ("/write", write, 200),
        ("/write", read, 403),
        ("/either", write, 200),
        ("/either", read, 403),
        ("/", read, 200),
        ("/open", None, 200),
        ("/", None, 401),
    ]
    got = [(p, request(envoy.port, p, bearer(t) if t else None).status) for p, t, _ in table]
    assert got == [(p, s) for p, _, s in table]


ORDERS_API, BILLING_API = "https://orders.example/api", "https://billing.example/api"


def test_issuer_and_audience_with_oidc_provider(envoys, oidc_idp_server):
    # A token asked for a resource (RFC 8707) has that resource as its `aud`; one asked
    # for none has no `aud`, so an `audiences` check refuses it.
    idp = oidc_idp_server
    token = idp.issue_token("read")
    issuer = idp.introspect(token)["iss"]
    rules = [
        {"match": {"path": "/ours"}, "require": {"issuers": [issuer]}},
        {"match": {"path": "/theirs"}, "require": {"issuers": ["https://other.example"]}},
        {"match": {"path": "/audience"}, "require": {"audiences": [ORDERS_API]}},
    ]
    envoy = envoys.get(idp, idp.plugin_config(rules=rules), name="envoy-route-policy-oidc-iss")
    got = {p: request(envoy.port, p, bearer(token)) for p in ["/ours", "/theirs", "/audience"]}
    assert {p: r.status for p, r in got.items()} == {"/ours": 200, "/theirs": 401, "/audience": 401}
    assert got["/theirs"].json()["error_description"] == "the token's issuer is not trusted here"
    assert got["/audience"].json()["error_description"] == "the token is not meant for this audience"

    orders = idp.issue_token("read", resource=ORDERS_API)
    billing = idp.issue_token("read", resource=BILLING_API)
    assert (idp.introspect(orders)["aud"], idp.introspect(billing)["aud"]) == (ORDERS_API, BILLING_API)
    assert request(envoy.port, "/audience", bearer(orders)).status == 200
    denied = lambda: envoy.metric("tokengate.requests.denied.invalid_audience")  # noqa: E731
    before = denied()
    resp = request(envoy.port, "/audience", bearer(billing))
    assert resp.status == 401
    assert resp.json() == {"error": "invalid_token", "error_description": "the token is not meant for this audience"}
    assert denied() - before == 1
