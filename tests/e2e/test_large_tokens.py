"""Tokens of the size authorization servers issue (a 1 KiB JWT access token), of the
largest size tokengate accepts by default (4 KiB) and of the largest `max_token_bytes`
may allow (60 KiB, rich JWTs with group claims), against the mock IdP on a 4-worker Envoy.

Each worker remembers the SHA-256 of a token it has seen (cache.hash_memo_entries) and
does not hash it again; the denylist is still looked up by that SHA-256 on every
request, so a revocation reaches every worker at once, remembered token or not.
The Envoys are test_revocation's (`gate_for`: the shipped data and admin listeners).
"""
import base64
import json
import secrets

import pytest

from harness import assert_denied, bearer, merge, shipped_admin_additions
from test_revocation import (  # noqa: F401  (gates and recorder are fixtures gate_for needs)
    REVOKED,
    AdminApi,
    assert_invalid_token,
    assert_ok,
    burst_on_every_worker,
    gate_for,
    gates,
    recorder,
    sha256,
)
from test_validation import upstream_headers

MAX_TOKEN_BYTES = 4096  # bearer::DEFAULT_MAX_TOKEN_BYTES, the default max_token_bytes
CEILING = 60 * 1024  # bearer::MAX_TOKEN_BYTES_CEILING


def jwt_shaped(size):
    """A token of exactly `size` bytes shaped like a JWT (header.payload.signature,
    base64url), unique to the test; the mock IdP introspects it like any other."""
    b64 = lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": "RS256", "typ": "at+jwt"}).encode())
    signature = b64(secrets.token_bytes(256))
    room = size - len(head) - len(signature) - 2
    payload = b64(secrets.token_bytes(room))[:room]
    token = f"{head}.{payload}.{signature}"
    assert len(token) == size
    return token


@pytest.mark.parametrize("size", [1024, MAX_TOKEN_BYTES], ids=["1KiB", "4KiB"])
def test_a_large_token_is_validated_cached_and_revoked_on_every_worker_at_once(gates, mock_idp, size):
    gate = gate_for(gates, mock_idp)
    token = jwt_shaped(size)
    mock_idp.register_active(token, sub="large-token-user", scope="read")
    seen = upstream_headers(gate.get("/", bearer(token)))
    assert (seen["x-auth-subject"], seen["x-auth-scope"]) == ("large-token-user", "read")

    # Every worker answers it (and so remembers its hash) from the cache: one introspection in all.
    burst_on_every_worker(gate, token, expect=200)
    assert mock_idp.calls_for(token) == 1

    revoked_before = gate.metric(REVOKED)
    body = assert_ok(AdminApi(gate).revoke_form(token))
    assert body == {"revoked": 1, "ids": [sha256(token)]}
    # No wait: the next request after the admin answer is refused, on every worker.
    bursts = burst_on_every_worker(gate, token, expect=401)
    assert gate.metric(REVOKED) - revoked_before >= sum(len(b) for b in bursts)
    assert_invalid_token(gate.get("/", bearer(token)))
    assert mock_idp.calls_for(token) == 1, "a revoked token is never introspected again"


def test_a_token_a_byte_from_a_remembered_one_is_introspected_on_its_own(gates, mock_idp):
    gate = gate_for(gates, mock_idp)
    token = jwt_shaped(MAX_TOKEN_BYTES)
    mock_idp.register_active(token, sub="large-token-user")
    burst_on_every_worker(gate, token, expect=200, n=200)
    # Same length, one byte different at the very end: unknown to the IdP, so 401.
    other = token[:-1] + ("A" if token[-1] != "A" else "B")
    resp = gate.get("/", bearer(other))
    assert resp.status == 401, resp
    assert mock_idp.calls_for(other) == 1, "asked about on its own, not taken for the remembered token"


def test_a_token_of_the_max_token_bytes_ceiling_is_validated_and_revoked_and_one_byte_more_is_400(
    fresh, mock_idp
):
    data = mock_idp.plugin_config(max_token_bytes=CEILING)
    admin = merge(data, shipped_admin_additions())
    # Envoy's own limit (60 KiB for all headers) would answer 431 before the filter ran.
    gate = fresh.envoy(mock_idp, data, listener_configs={"tokengate_admin": admin}, max_request_headers_kb=96)
    token = jwt_shaped(CEILING)
    mock_idp.register_active(token, sub="group-claims-user", scope="read")
    seen = upstream_headers(gate.get("/", bearer(token)))
    assert seen["x-auth-subject"] == "group-claims-user"
    burst_on_every_worker(gate, token, expect=200)
    assert mock_idp.calls_for(token) == 1

    # The admin API accepts the same size: the revoke is not refused as "not a bearer token".
    assert assert_ok(AdminApi(gate).revoke_form(token)) == {"revoked": 1, "ids": [sha256(token)]}
    burst_on_every_worker(gate, token, expect=401)

    longer = jwt_shaped(CEILING + 1)
    mock_idp.register_active(longer)
    assert_denied(gate.get("/", bearer(longer)), 400, "invalid_request")
    assert mock_idp.calls_for(longer) == 0, "an oversized token never reaches the IdP"
