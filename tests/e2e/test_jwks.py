"""JWT issuers' keys fetched from their JWKS endpoint (`jwt.issuers[].jwks`) through an
Envoy callout, against a real Envoy (--concurrency 4) and a real authorization server
(oidc-provider, each test its own, signing with a key file the test chooses).

What a user sees: keys fetched once per Envoy process and refreshed on schedule, whatever
the workers and requests (counted twice: tokengate's `jwt.jwks_fetches` and Envoy's own
count of requests to the IdP's cluster, which nothing else calls here, since these
configurations have no introspection); 503 while no keys were ever fetched; the last good
keys kept while the endpoint is down; a key the IdP rotates in picked up on the first token
signed with it, old tokens still valid while their key is published; an unknown `kid`
answered at once when a refetch is not due (rate limit).
"""
import json
import time

import pytest

from harness import JwtIssuer, assert_denied, bearer, burst, decode, upstream_headers, wait_until

FETCHES, FETCH_FAILURES = "tokengate.jwt.jwks_fetches", "tokengate.jwt.jwks_fetch_failures"
VERIFIED = "tokengate.jwt.verified"
IDP_REQUESTS = "cluster.idp.upstream_rq_total"
API = "https://jwt.example/api"  # server.mjs JWT_RESOURCES: the `aud` of its RS256 JWTs
NO_KEYS = "the issuer's signing keys are not available"
UNKNOWN_KEY = "the token's signing key is unknown"


def key_file(workdir, name, *keys):
    """A key file for server.mjs (IDP_KEYS_FILE): these private JWKs, in order (the first key
    of an algorithm signs)."""
    path = workdir / f"{name}.json"
    path.write_text(json.dumps({"keys": list(keys)}))
    return path


def private_keys(signer, kid_suffix=""):
    """A harness issuer's private JWKs, each `kid` with kid_suffix appended."""
    return [dict(key, kid=key["kid"] + kid_suffix) for key in signer.private_jwks()["keys"]]


def jwt_only_config(idp, **jwks):
    """The shipped plugin configuration without introspection: the IdP's JWTs verified with keys
    fetched from its jwks_uri, through the `idp` cluster."""
    config = idp.plugin_config(jwt={"issuers": [{
        "issuer": idp.issuer,
        "audiences": [API],
        "jwks": {"cluster": "idp", "authority": idp.authority, "path": "/jwks", **jwks},
    }]})
    del config["introspection"]
    return config


@pytest.fixture
def keyed_idp(fresh, workdir):
    """A fresh oidc-provider signing with a harness issuer's keys."""
    signer = JwtIssuer()
    idp = fresh.oidc_idp(keys_file=key_file(workdir, f"keys-{id(signer)}", *private_keys(signer)))
    signer.issuer = idp.issuer
    idp.signer = signer
    return idp


def test_keys_are_fetched_once_per_process_and_refreshed_on_schedule(fresh, keyed_idp):
    envoy = fresh.envoy(keyed_idp, jwt_only_config(keyed_idp, refresh_s=10, min_refetch_s=1))
    token = keyed_idp.issue_jwt(scope="read")
    assert envoy.metric_at_least(FETCHES, 1, timeout=15) == 1
    resp = envoy.get("/resource", bearer(token))
    assert resp.status == 200, resp
    assert upstream_headers(resp)["x-auth-client-id"] == "app-a"
    # Verified once, then read from the shared cache by every worker.
    assert burst(envoy.port, n=400, connections=16, headers=bearer(token)) == [200] * 400
    assert envoy.metric(VERIFIED) == 1
    assert (envoy.metric(FETCHES), envoy.counter(IDP_REQUESTS)) == (1, 1), "4 workers, 401 requests, one fetch"
    # refresh_s later, one fetch more for the whole process.
    assert envoy.metric_at_least(FETCHES, 2, timeout=20) == 2
    assert envoy.counter(IDP_REQUESTS) == 2
    assert envoy.metric(FETCH_FAILURES) == 0
    # Without introspection, a token that is not a JWT of the issuer is refused without a call.
    resp = envoy.get("/resource", bearer("an-opaque-token-of-43-characters-xxxxxxxxxx"))
    assert_denied(resp, 401, "invalid_token")
    assert resp.json()["error_description"] == "the token is not a JWT of a configured issuer"
    assert envoy.counter(IDP_REQUESTS) == 2


def test_endpoint_down_at_start_is_503_until_it_answers(fresh, keyed_idp):
    token = keyed_idp.issue_jwt(scope="read")
    keyed_idp.stop()
    envoy = fresh.envoy(keyed_idp, jwt_only_config(keyed_idp, min_refetch_s=1))
    resp = envoy.get("/resource", bearer(token))
    assert resp.status == 503, resp
    assert resp.json() == {"error": "temporarily_unavailable", "error_description": NO_KEYS}
    assert resp.header_all("WWW-Authenticate") == [], "RFC 6750 has no challenge for it"
    assert envoy.metric(FETCH_FAILURES) >= 1
    keyed_idp.restart(keyed_idp.keys_file)
    wait_until(lambda: envoy.get("/resource", bearer(token)).status == 200, 15, what="keys once the IdP is up")
    assert burst(envoy.port, n=100, connections=8, headers=bearer(token)) == [200] * 100


def test_endpoint_down_later_keeps_the_last_good_keys(fresh, keyed_idp):
    envoy = fresh.envoy(keyed_idp, jwt_only_config(keyed_idp, refresh_s=10, min_refetch_s=1))
    first, second = keyed_idp.issue_jwt(scope="read"), keyed_idp.issue_jwt(scope="read")
    assert envoy.metric_at_least(FETCHES, 1, timeout=15) == 1
    assert envoy.get("/resource", bearer(first)).status == 200
    keyed_idp.stop()
    assert envoy.metric_at_least(FETCH_FAILURES, 1, timeout=20) >= 1, "a failed refresh"
    # A token never seen before is verified with the keys fetched before the IdP went down.
    assert envoy.get("/resource", bearer(second)).status == 200
    assert "the last good keys stay in use" in envoy.log_text()


def test_a_key_rotated_in_at_the_idp_is_picked_up_and_old_tokens_stay_valid(fresh, keyed_idp, workdir):
    envoy = fresh.envoy(keyed_idp, jwt_only_config(keyed_idp, min_refetch_s=5))
    old = keyed_idp.issue_jwt(scope="read")
    started = envoy.metric_at_least(FETCHES, 1, timeout=15)
    assert started == 1
    # The IdP publishes a new key first (it signs from now on) and keeps the old one.
    rotated = key_file(workdir, "rotated", *private_keys(JwtIssuer(), "-next"), *private_keys(keyed_idp.signer))
    keyed_idp.restart(rotated)
    new = keyed_idp.issue_jwt(scope="read")
    assert decode(new)[0]["kid"] == "rsa-1-next" and decode(old)[0]["kid"] == "rsa-1"
    # Past the rate limit of the first fetch, so that the new kid may ask for one.
    time.sleep(5)
    resp = envoy.get("/resource", bearer(new))
    assert resp.status == 200, resp
    assert envoy.metric(FETCHES) == started + 1, "one refetch for the unknown kid"
    assert envoy.get("/resource", bearer(old)).status == 200, "its key is still published"
    # A kid nobody publishes, right after: no refetch is due (min_refetch_s), refused at once.
    stranger = JwtIssuer(issuer=keyed_idp.issuer)
    forged = stranger.mint("RS256", header={"kid": "rsa-unpublished"}, aud=API, scope="read")
    resp = envoy.get("/resource", bearer(forged))
    assert_denied(resp, 401, "invalid_token")
    assert resp.json()["error_description"] == UNKNOWN_KEY
    assert envoy.metric(FETCHES) == started + 1
