"""The benchmark's JWT issuer: the e2e harness's JwtIssuer (RS256, ES256) plus PS256 and EdDSA,
realistic ~1 KiB access tokens, and the same issuer configured for tokengate's `jwt` section and
for Envoy's jwt_authn (`local_jwks`, JWT cache on)."""
import json
import secrets
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding

from harness.jwt import JWT_AUDIENCE, JwtIssuer, b64
from variants import JWT_ALGS

KID = {"RS256": "rsa-1", "PS256": "rsa-1", "ES256": "ec-1", "EdDSA": "ed-1"}
# claims_to_headers of envoy/tokengate.json, which jwt_authn's claim_to_headers copies.
CLAIM_HEADERS = {"sub": "x-auth-subject", "client_id": "x-auth-client-id", "scope": "x-auth-scope"}


class BenchIssuer(JwtIssuer):
    def __init__(self):
        super().__init__(issuer="https://idp.bench.local/realms/main")
        self.ed = ed25519.Ed25519PrivateKey.generate()

    def jwks(self):
        keys = super().jwks()
        x = self.ed.public_key().public_bytes_raw()
        keys["keys"].append({"kty": "OKP", "kid": "ed-1", "use": "sig", "crv": "Ed25519", "x": b64(x)})
        return keys

    def sign(self, alg, data):
        if alg == "PS256":
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            return self.rsa.sign(data, pss, hashes.SHA256())
        if alg == "EdDSA":
            return self.ed.sign(data)
        return super().sign(alg, data)

    def access_token(self, alg="RS256", lifetime_s=86400):
        """An RFC 9068 access token shaped like Keycloak's (about 1 KiB with RS256): what a
        gateway in front of an API sees."""
        now = int(time.time())
        sub = "5f0e7c1a-3b8d-4e2a-9c61-" + secrets.token_hex(6)
        claims = {
            "exp": now + lifetime_s, "iat": now, "auth_time": now - 30, "jti": secrets.token_hex(16),
            "iss": self.issuer, "aud": JWT_AUDIENCE, "sub": sub, "typ": "Bearer", "azp": "bench-client",
            "client_id": "bench-client", "sid": secrets.token_hex(16),
            "realm_access": {"roles": ["offline_access", "default-roles-main"]},
            "scope": "openid profile email read", "name": "Bench User", "preferred_username": "bench.user",
            "email": "bench.user@bench.local",
        }
        return self.sign_token(alg, {"alg": alg, "typ": "at+jwt", "kid": KID[alg]}, claims)

    def tokengate_section(self):
        """tokengate's `jwt` section: every algorithm the benchmark signs with."""
        return {"issuers": [{"issuer": self.issuer, "audiences": [JWT_AUDIENCE], "algorithms": JWT_ALGS,
                             "keys": self.jwks()}]}

    def jwt_authn(self, cache_size=100):
        """Envoy's jwt_authn with the same issuer, audience and keys inline, its JWT cache on, the
        token kept for the upstream (tokengate's `hide_credentials: false`) and the same three
        claim headers as tokengate."""
        provider = {
            "issuer": self.issuer, "audiences": [JWT_AUDIENCE], "forward": True,
            "local_jwks": {"inline_string": json.dumps(self.jwks())},
            "claim_to_headers": [{"header_name": h, "claim_name": c} for c, h in CLAIM_HEADERS.items()],
            "jwt_cache_config": {"jwt_cache_size": cache_size},
        }
        return {"name": "envoy.filters.http.jwt_authn", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"bench": provider},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}]}}
