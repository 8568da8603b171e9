"""README.md's "docker compose" section against envoy/docker-compose.yaml as shipped
(conftest.py brings it up on free ports and always tears it down).

The `walk` fixture runs the section's commands once, in its order, as a user
would; each test then checks what one of them showed. The last test stops the
stack, as `down` does first.
"""
import hashlib
import urllib.parse

import pytest
from harness import bearer, get, request, wait_until

from conftest import COMPOSE, ENGINE, SERVICES

ADMIN = bearer("admin-demo-token")
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ALLOWED = "wasmcustom.tokengate.requests.allowed"


@pytest.fixture(scope="module")
def walk(stack):
    print(f"compose: {' '.join(COMPOSE)} with {ENGINE}")
    data, admin = stack.ports["data"], stack.ports["admin"]
    steps = {"token": request(stack.ports["idp"], "/oauth2/token", FORM, "POST", b"client_id=demo&scope=read")}
    token = steps["token"].json()["access_token"]
    steps["token_id"] = hashlib.sha256(token.encode()).hexdigest()
    steps["with_token"] = get(data, "/hello", bearer(token))
    steps["without_token"] = get(data, "/hello")
    # `curl .../stats | grep tokengate`. A worker hands its allowed count to Envoy on its next tick.
    try:
        wait_until(lambda: stack.stats().get(ALLOWED) == 1, 30, interval=0.2)
    except TimeoutError:
        pass  # the test shows the value
    steps["stats"] = {k: v for k, v in stack.stats().items() if "tokengate." in k}
    steps["revoke"] = request(admin, "/tokengate/revoke", {**ADMIN, **FORM}, "POST", urllib.parse.urlencode({"token": token}).encode())
    steps["revoked_token"] = get(data, "/hello", bearer(token))
    steps["revocations"] = get(admin, "/tokengate/revocations", ADMIN)
    return steps


def test_demo_idp_hands_out_a_token(walk):
    resp = walk["token"]
    assert resp.status == 200, resp
    body = resp.json()
    assert (body["token_type"], body["scope"], body["expires_in"]) == ("Bearer", "read", 3600)


def test_with_the_token_the_upstream_echoes_the_claim_headers(walk):
    resp = walk["with_token"]
    assert resp.status == 200, resp
    echoed = resp.json()
    assert echoed["path"] == "/hello"
    claims = {k: v for k, v in echoed["headers"].items() if k.startswith("x-auth-")}
    assert claims == {"x-auth-subject": "demo", "x-auth-client-id": "demo", "x-auth-scope": "read"}


def test_without_a_token_401(walk):
    resp = walk["without_token"]
    assert resp.status == 401, resp
    assert resp.header("www-authenticate") == 'Bearer realm="tokengate"'
    assert resp.json() == {"error": "unauthorized", "error_description": "a bearer token is required"}


def test_envoys_admin_port_counts_the_walk(walk):
    counted = {
        name: walk["stats"].get(f"wasmcustom.tokengate.{name}")
        for name in ("requests.allowed", "requests.denied.missing_token", "introspection.calls", "cache.miss")
    }
    assert counted == {"requests.allowed": 1, "requests.denied.missing_token": 1, "introspection.calls": 1, "cache.miss": 1}


def test_revoked_on_the_admin_port_the_token_gets_401(walk):
    assert walk["revoke"].status == 200, walk["revoke"]
    assert walk["revoke"].json() == {"ids": [walk["token_id"]], "revoked": 1}
    resp = walk["revoked_token"]
    assert resp.status == 401, resp
    assert resp.header("www-authenticate") == (
        'Bearer realm="tokengate", error="invalid_token", error_description="the token has been revoked"'
    )


def test_the_revocation_is_listed(walk):
    resp = walk["revocations"]
    assert resp.status == 200, resp
    listed = [(r["id"], r["kind"], r["reason"]) for r in resp.json()["revocations"]]
    assert listed == [(walk["token_id"], "token", "rfc7009")]


def test_stop_ends_every_container_cleanly(stack, walk):
    """What `down` does first. Each container ends on the engine's SIGTERM (exit 0) instead of
    ignoring it until the engine kills it (137) after the grace period, 10 s per container."""
    stack.compose("stop")
    states = {service: (c["status"], c["exit_code"]) for service, c in stack.containers().items()}
    killed = [service for service, (_, code) in states.items() if code != 0]
    assert states == {service: ("exited", 0) for service in SERVICES}, stack.logs(killed, lines=5)
