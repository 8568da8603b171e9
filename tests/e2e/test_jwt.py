"""JWT access tokens (RFC 9068) verified in the filter, and revoked, against a real Envoy
(--concurrency 4).

The issuer is a real authorization server: oidc-provider (conftest's `jwt_idp`), issuing
JWT access tokens for the APIs server.mjs lists in JWT_RESOURCES (`resource=`), and
opaque ones otherwise, which tokengate still introspects at it (mixed mode). What the IdP
cannot issue (a `nbf` in the future, `scp`, a bad header) is signed by the harness with
the IdP's own keys (`jwt_idp.signer`, the IdP's key file); each case says which.

The Envoys are test_revocation's (`gate_for`: the shipped data and admin listeners, same
vm_id, the recording echo upstream), with the `jwt` section from `jwt_section`, which
fetches the IdP's keys from its jwks_uri (discovery) through the `idp-keys` cluster.

The first tests sign with a harness issuer against the mock IdP: every algorithm and
the header rules, where the mock's control API counts introspections.
"""
import json
import time

import pytest

from conftest import CONCURRENCY
from harness import (
    JwtIssuer,
    assert_denied,
    assert_invalid_token,
    assert_ok,
    b64,
    bearer,
    burst,
    decode,
    high_s_twin,
    jwt_section,
    sha256,
    sleep_until,
    unb64,
    upstream_headers,
)
from test_revocation import (  # noqa: F401  (gates and recorder are fixtures gate_for needs)
    REVOKED,
    AdminApi,
    burst_on_every_worker,
    gate_for,
    gates,
    jti_id,
    recorder,
)
from test_validation import IDP_CALLS, REQUIRED_SCOPE

VERIFIED, REFUSED = "tokengate.jwt.verified", "tokengate.jwt.refused"
RS256_API = "https://jwt.example/api"  # server.mjs JWT_RESOURCES: the `aud` of its RS256 JWTs
ES256_API = "https://jwt-es256.example/api"  # ... and of its ES256 JWTs
# The leeway of the gates' `jwt` section: short, so an IdP-issued token expires within seconds.
SKEW_S = 1
# Per-route rules over JWTs: a scope, an audience, a public path (README "Per-route policy").
RULES = [
    {"match": {"path": "/write"}, "require": {"scopes": ["write"]}},
    {"match": {"path": "/es256-api"}, "require": {"scopes": ["read"], "audiences": [ES256_API]}},
    {"match": {"prefix": "/public"}, "require": {"token": "none"}},
]


# --------------------------------------------------------------------------- harness-signed, mock IdP


@pytest.fixture(scope="module")
def jwt_issuer():
    return JwtIssuer()


@pytest.fixture
def jwt_envoy(envoys, mock_idp, jwt_issuer):
    return envoys.get(mock_idp, mock_idp.plugin_config(jwt=jwt_issuer.config()), name="envoy-jwt")


def test_jwt_of_a_configured_issuer_is_verified_in_the_filter_without_introspection(jwt_envoy, jwt_issuer):
    calls, verified = jwt_envoy.counter(IDP_CALLS), jwt_envoy.metric(VERIFIED)
    for alg in ("RS256", "ES256"):
        token = jwt_issuer.mint(alg, scope=REQUIRED_SCOPE, scp=["ignored"])
        seen = upstream_headers(jwt_envoy.get("/resource", bearer(token)))
        assert seen["x-auth-subject"] == "jwt-user", alg
        assert seen["x-auth-client-id"] == "jwt-client", alg
        assert seen["x-auth-scope"] == REQUIRED_SCOPE, alg
        # Cached like an introspection answer: a burst over every worker verifies once per worker at most.
        statuses = burst(jwt_envoy.port, n=200, connections=16, headers=bearer(token))
        assert statuses == [200] * 200
    assert jwt_envoy.counter(IDP_CALLS) == calls, "no JWT of the issuer went to the IdP"
    assert 2 <= jwt_envoy.metric(VERIFIED) - verified <= 2 * CONCURRENCY
    # `scp` (Okta, Azure AD) stands for `scope` when that is absent.
    assert upstream_headers(jwt_envoy.get("/", bearer(jwt_scp(jwt_issuer))))["x-auth-scope"] == REQUIRED_SCOPE


def jwt_scp(issuer):
    claims = issuer.claims(scp=REQUIRED_SCOPE.split())
    del claims["scope"]
    return issuer.mint_claims("ES256", claims)


def _tampered_payload(issuer):
    head, _, sig = issuer.mint("RS256", scope=REQUIRED_SCOPE).split(".")
    other = issuer.mint("RS256", scope=REQUIRED_SCOPE, sub="mallory").split(".")[1]
    return f"{head}.{other}.{sig}"


def _tampered_signature(issuer):
    head, body, sig = issuer.mint("RS256", scope=REQUIRED_SCOPE).split(".")
    return f"{head}.{body}.{'A' if sig[0] != 'A' else 'B'}{sig[1:]}"


def _alg_none(issuer):
    head, body, _ = issuer.mint("RS256", header={"alg": "none"}, scope=REQUIRED_SCOPE).split(".")
    return f"{head}.{body}."


BAD_JWTS = {
    "expired": (lambda i: i.mint("RS256", scope=REQUIRED_SCOPE, exp=int(time.time()) - 3600), "the token has expired"),
    "not-yet-valid": (lambda i: i.mint("ES256", scope=REQUIRED_SCOPE, nbf=int(time.time()) + 3600), "the token is not valid yet"),
    "wrong-audience": (lambda i: i.mint("RS256", scope=REQUIRED_SCOPE, aud="other-api"), "the token is not meant for this audience"),
    "unknown-kid": (lambda i: i.mint("RS256", header={"kid": "rsa-9"}, scope=REQUIRED_SCOPE), "the token's signing key is unknown"),
    "alg-none": (_alg_none, "the token's signing algorithm is not accepted"),
    "hs256-with-public-key": (lambda i: i.mint("HS256", scope=REQUIRED_SCOPE), "the token's signing algorithm is not accepted"),
    "tampered-payload": (_tampered_payload, "the token's signature is invalid"),
    "tampered-signature": (_tampered_signature, "the token's signature is invalid"),
    "typ-id-token": (lambda i: i.mint("ES256", header={"typ": "id+jwt"}, scope=REQUIRED_SCOPE), "the token's typ is not at+jwt"),
    "crit": (lambda i: i.mint("ES256", header={"crit": ["exp"]}, scope=REQUIRED_SCOPE), "the token has critical header parameters"),
    "oversized-header": (lambda i: i.mint("ES256", header={"pad": "x" * 2000}, scope=REQUIRED_SCOPE), "the token's JOSE header is too large"),
}


@pytest.mark.parametrize("case", list(BAD_JWTS))
def test_jwt_that_fails_verification_is_invalid_token_and_never_introspected(jwt_envoy, jwt_issuer, case):
    make, description = BAD_JWTS[case]
    calls, refused = jwt_envoy.counter(IDP_CALLS), jwt_envoy.metric(REFUSED)
    resp = jwt_envoy.get("/", bearer(make(jwt_issuer)))
    assert_denied(resp, 401, "invalid_token")
    assert resp.json()["error_description"] == description
    assert jwt_envoy.counter(IDP_CALLS) == calls
    assert jwt_envoy.metric(REFUSED) == refused + 1


def test_jwt_of_another_issuer_goes_to_introspection(jwt_envoy, mock_idp):
    other = JwtIssuer(issuer="https://elsewhere.test")
    calls = jwt_envoy.counter(IDP_CALLS)
    assert_denied(jwt_envoy.get("/", bearer(other.mint("RS256", scope=REQUIRED_SCOPE))), 401, "invalid_token")
    assert jwt_envoy.counter(IDP_CALLS) == calls + 1


# --------------------------------------------------------------------------- oidc-provider's JWTs


def resigned(idp, token, header=None, alg=None, **claims):
    """An IdP-issued JWT with header members and claims changed (None removes a claim),
    signed again by the harness with the IdP's own key (its key file)."""
    head, payload = decode(token)
    head.update(header or {})
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return idp.signer.sign_token(alg or head["alg"], head, payload)


def issuer_gate(gates, idp, **overrides):
    """The shipped listeners with oidc-provider's issuer in the `jwt` section (its two JWT
    APIs as audiences, SKEW_S leeway) and RULES; `overrides` as for gate_for."""
    section = jwt_section(idp, [RS256_API, ES256_API], clock_skew_s=SKEW_S)
    return gate_for(gates, idp, jwt=section, rules=RULES, **overrides)


@pytest.fixture
def gate(gates, jwt_idp):
    return issuer_gate(gates, jwt_idp)


def test_idp_jwt_is_verified_in_the_filter_with_its_claims_and_never_introspected(gate, jwt_idp):
    calls, verified = gate.counter(IDP_CALLS), gate.metric(VERIFIED)
    for alg in ("RS256", "ES256"):
        token = jwt_idp.issue_jwt(scope="read write", client_id="app-a", alg=alg)
        head, claims = decode(token)
        assert (head["alg"], head["typ"], claims["aud"]) == (alg, "at+jwt", jwt_idp.JWT_RESOURCES[alg])
        seen = upstream_headers(gate.get("/", bearer(token)))
        # oidc-provider's client-credentials JWT: `sub` is the client itself (RFC 9068 §2.2).
        assert (seen["x-auth-subject"], seen["x-auth-client-id"], seen["x-auth-scope"]) == ("app-a", "app-a", "read write")
        assert seen["authorization"] == f"Bearer {token}", "hide_credentials is off"
        burst_on_every_worker(gate, token, expect=200)
    assert gate.counter(IDP_CALLS) == calls, "oidc-provider's introspection endpoint was called"
    # Each worker verifies a token once at most, then answers from its cache.
    assert 2 <= gate.metric(VERIFIED) - verified <= 2 * CONCURRENCY


def test_opaque_token_of_the_same_idp_is_still_introspected_beside_its_jwts(gate, jwt_idp):
    calls = gate.counter(IDP_CALLS)
    jwt = jwt_idp.issue_jwt(scope="read", client_id="app-b")
    opaque = jwt_idp.issue_token(scope="read", client_id="app-b")
    assert opaque.count(".") == 0, "an opaque token"
    assert upstream_headers(gate.get("/", bearer(jwt)))["x-auth-subject"] == "app-b"
    assert gate.counter(IDP_CALLS) == calls
    seen = upstream_headers(gate.get("/", bearer(opaque)))
    assert (seen["x-auth-client-id"], seen["x-auth-scope"]) == ("app-b", "read")
    assert "x-auth-subject" not in seen, "oidc-provider's introspection answer has no sub"
    assert gate.counter(IDP_CALLS) == calls + 1


def _expired(idp):
    """IdP-issued with a 1 s lifetime (server.mjs's test-only expires_in), used past exp + SKEW_S."""
    token = idp.issue_jwt(ttl=1)
    sleep_until(decode(token)[1]["exp"] + SKEW_S + 1)
    return token


def _malformed_header(idp):
    _, body, sig = idp.issue_jwt().split(".")
    return f"{b64(b'not json')}.{body}.{sig}"


def _malformed_signature(idp):
    """A b64token (RFC 6750) but not base64url: `+` and `/`."""
    head, body, sig = idp.issue_jwt().split(".")
    return f"{head}.{body}.{sig[:-2]}+/"


def _tampered(idp):
    """IdP-issued; its payload swapped for one granting more, its signature kept."""
    head, _, sig = idp.issue_jwt().split(".")
    _, claims = decode(idp.issue_jwt())
    return f"{head}.{b64(json.dumps({**claims, 'scope': 'read write admin'}).encode())}.{sig}"


def _bad_signature(idp):
    head, body, sig = idp.issue_jwt().split(".")
    raw = bytearray(unb64(sig))
    raw[10] ^= 1
    return f"{head}.{body}.{b64(bytes(raw))}"


def _alg_none_of(idp):
    head, body, _ = resigned(idp, idp.issue_jwt(), header={"alg": "none"}, alg="none").split(".")
    return f"{head}.{body}."


# case: (token made from the IdP, error_description). "resigned": IdP-issued, changed and
# signed again by the harness with the IdP's key, where oidc-provider cannot issue it.
IDP_REFUSALS = {
    "expired": (_expired, "the token has expired"),
    # oidc-provider never sets nbf: resigned.
    "not-yet-valid": (lambda idp: resigned(idp, idp.issue_jwt(), nbf=int(time.time()) + 3600), "the token is not valid yet"),
    # Issued by the IdP for an API this gateway is not (`aud`).
    "wrong-audience": (lambda idp: idp.issue_jwt(resource=idp.OTHER_JWT_RESOURCE), "the token is not meant for this audience"),
    # resigned with the IdP's key under a kid its JWKS does not publish.
    "unknown-kid": (lambda idp: resigned(idp, idp.issue_jwt(), header={"kid": "retired-key"}), "the token's signing key is unknown"),
    "alg-none": (_alg_none_of, "the token's signing algorithm is not accepted"),
    # HMAC keyed with the IdP's RSA public key (PEM), the algorithm-confusion attack.
    "hs256-with-public-key": (lambda idp: resigned(idp, idp.issue_jwt(), header={"alg": "HS256"}), "the token's signing algorithm is not accepted"),
    "tampered-payload": (_tampered, "the token's signature is invalid"),
    "tampered-signature": (_bad_signature, "the token's signature is invalid"),
    "malformed-header": (_malformed_header, "the token is not a well-formed JWT"),
    "malformed-signature": (_malformed_signature, "the token is not a well-formed JWT"),
    "oversized-header": (lambda idp: resigned(idp, idp.issue_jwt(), header={"pad": "x" * 2000}), "the token's JOSE header is too large"),
}


@pytest.mark.parametrize("case", list(IDP_REFUSALS))
def test_idp_jwt_that_fails_verification_is_invalid_token_and_never_introspected(gate, jwt_idp, case):
    make, description = IDP_REFUSALS[case]
    token = make(jwt_idp)
    calls, refused = gate.counter(IDP_CALLS), gate.metric(REFUSED)
    resp = gate.get("/", bearer(token))
    assert_invalid_token(resp)
    assert resp.json()["error_description"] == description
    assert gate.counter(IDP_CALLS) == calls
    assert gate.metric(REFUSED) == refused + 1


def test_jwt_of_an_issuer_not_configured_is_introspected_and_refused_as_invalid_token(gate, jwt_idp):
    """Mixed mode: a JWT whose `iss` names no `jwt` issuer goes to introspection, where
    oidc-provider answers 400 unsupported_token_type (it introspects no JWT): an unproven
    token, 401 invalid_token, not an IdP outage (503)."""
    token = resigned(jwt_idp, jwt_idp.issue_jwt(), iss="https://elsewhere.example")
    calls, failures = gate.counter(IDP_CALLS), gate.metric("tokengate.introspection.failures.status")
    resp = gate.get("/", bearer(token))
    assert_invalid_token(resp)
    assert resp.json()["error_description"] == "the token is not active"
    assert gate.counter(IDP_CALLS) == calls + 1
    assert gate.metric("tokengate.introspection.failures.status") == failures


def test_per_route_rules_and_scopes_apply_to_idp_jwts_as_to_introspected_tokens(gate, jwt_idp):
    reader = jwt_idp.issue_jwt(scope="read", client_id="app-b")
    writer = jwt_idp.issue_jwt(scope="read write", client_id="app-a")
    resp = gate.get("/write", bearer(reader))
    params = assert_denied(resp, 403, "insufficient_scope")
    assert params["scope"] == "write"
    assert upstream_headers(gate.get("/write", bearer(writer)))["x-auth-scope"] == "read write"
    # A route for the ES256 API only: an RS256 token of the IdP is for another API.
    resp = gate.get("/es256-api", bearer(writer))
    assert_invalid_token(resp)
    assert resp.json()["error_description"] == "the token is not meant for this audience"
    assert gate.get("/es256-api", bearer(jwt_idp.issue_jwt(alg="ES256"))).status == 200
    assert gate.get("/public/info").status == 200
    # `scp` stands for `scope` when that is absent (oidc-provider sends `scope`: resigned).
    scp = resigned(jwt_idp, reader, scope=None, scp=["read", "write"])
    assert upstream_headers(gate.get("/write", bearer(scp)))["x-auth-scope"] == "read write"
    scp = resigned(jwt_idp, reader, scope=None, scp="read write")
    assert upstream_headers(gate.get("/write", bearer(scp)))["x-auth-scope"] == "read write"


def test_hide_credentials_removes_the_jwt_and_keeps_its_claim_headers(gates, jwt_idp):
    gate = issuer_gate(gates, jwt_idp, hide_credentials=True)
    seen = upstream_headers(gate.get("/", bearer(jwt_idp.issue_jwt(scope="read", client_id="app-b"))))
    assert "authorization" not in seen
    assert (seen["x-auth-subject"], seen["x-auth-client-id"], seen["x-auth-scope"]) == ("app-b", "app-b", "read")


# --------------------------------------------------------------------------- revoking oidc-provider's JWTs


def assert_revoked(gate, token):
    resp = gate.get("/", bearer(token))
    assert_invalid_token(resp)
    assert resp.json()["error_description"] == "the token has been revoked"


def test_revoked_idp_jwt_is_refused_by_every_worker_at_once_though_cached(gate, jwt_idp):
    token = jwt_idp.issue_jwt(client_id="app-b")
    burst_on_every_worker(gate, token, expect=200)  # verified and cached on every worker
    revoked_before = gate.metric(REVOKED)

    body = assert_ok(AdminApi(gate).revoke_form(token, token_type_hint="access_token"))
    # No wait: the next request after the admin answer is refused, everywhere.
    bursts = burst_on_every_worker(gate, token, expect=401)
    assert_revoked(gate, token)
    _, claims = decode(token)
    assert body == {"revoked": 1, "ids": [sha256(token)], "jti_ids": [jti_id(jwt_idp.issuer, claims["jti"])]}
    assert gate.metric(REVOKED) - revoked_before == sum(len(b) for b in bursts) + 1
    listed = AdminApi(gate).listed()
    assert (listed[sha256(token)]["kind"], listed[jti_id(jwt_idp.issuer, claims["jti"])]["kind"]) == ("token", "jti")
    assert token not in json.dumps(listed)
    # The IdP's next token of the same client passes: only this one was revoked.
    assert gate.get("/", bearer(jwt_idp.issue_jwt(client_id="app-b"))).status == 200


def test_revoking_an_idp_jwt_revokes_its_jti_in_every_encoding_until_that_id_is_undone(gate, jwt_idp):
    api = AdminApi(gate)
    token = jwt_idp.issue_jwt(alg="ES256", client_id="app-b")
    twin = high_s_twin(token)
    assert sha256(twin) != sha256(token)
    burst_on_every_worker(gate, twin, expect=200)  # the other encoding verifies, and is cached everywhere

    body = assert_ok(api.revoke_form(token))
    jti = jti_id(jwt_idp.issuer, decode(token)[1]["jti"])
    assert body["jti_ids"] == [jti]
    burst_on_every_worker(gate, twin, expect=401)
    assert_revoked(gate, twin)
    # Undoing the `jti:` id lets the other encoding back in; the revoked token stays out.
    assert api.undo(jti).status == 204
    assert gate.get("/", bearer(twin)).status == 200
    assert_revoked(gate, token)


def test_an_idp_jwt_revoked_by_its_iss_and_jti_alone_is_refused_on_every_worker(gate, jwt_idp, request):
    """What an admin has from an IdP's logs or a user's report: the issuer and the `jti`, not
    the token. Every encoding of that JWT is refused at once, cached or not."""
    api = AdminApi(gate)
    token, bystander = jwt_idp.issue_jwt(alg="ES256", client_id="app-b"), jwt_idp.issue_jwt(client_id="app-b")
    burst_on_every_worker(gate, token, expect=200)
    jti = decode(token)[1]["jti"]
    request.addfinalizer(lambda: api.undo(jti_id(jwt_idp.issuer, jti)))

    body = assert_ok(api.revoke_json({"iss": jwt_idp.issuer, "jti": jti, "reason": "e2e"}))
    assert body == {"revoked": 1, "jti_ids": [jti_id(jwt_idp.issuer, jti)]}
    burst_on_every_worker(gate, token, expect=401)
    burst_on_every_worker(gate, high_s_twin(token), expect=401)
    assert_revoked(gate, token)
    assert gate.get("/", bearer(bystander)).status == 200, "another jti of the same client"
    record = api.listed()[jti_id(jwt_idp.issuer, jti)]
    assert (record["kind"], record["reason"]) == ("jti", "e2e")
    assert api.undo(jti_id(jwt_idp.issuer, jti)).status == 204
    assert gate.get("/", bearer(token)).status == 200


@pytest.mark.parametrize("kind", ["client_id", "sub"])
def test_client_or_subject_revocation_refuses_the_idp_jwts_it_names_on_every_worker(gate, jwt_idp, request, kind):
    """oidc-provider's client-credentials JWTs carry the client id as `sub` too: revoking
    app-b by either refuses its JWTs, not app-a's; by subject, not app-b's opaque tokens,
    whose introspection answers have no `sub`."""
    api = AdminApi(gate)
    doomed, bystander = jwt_idp.issue_jwt(client_id="app-b"), jwt_idp.issue_jwt(client_id="app-a")
    opaque = jwt_idp.issue_token(client_id="app-b")
    burst_on_every_worker(gate, doomed, expect=200)
    revocation = f"{'client' if kind == 'client_id' else 'sub'}:app-b"
    request.addfinalizer(lambda: api.undo(revocation))

    body = assert_ok(api.revoke_json({kind: "app-b", "reason": "e2e"}))
    assert body["revocation"]["id"] == revocation
    burst_on_every_worker(gate, doomed, expect=401)
    assert_revoked(gate, doomed)
    assert gate.get("/", bearer(bystander)).status == 200
    assert gate.get("/", bearer(opaque)).status == (401 if kind == "client_id" else 200)
