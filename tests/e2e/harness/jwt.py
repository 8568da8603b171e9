"""A JWT issuer for tests: keys generated at test time, its JWKS, and access tokens
(RFC 9068) signed with them, or broken on purpose."""
import base64
import json
import secrets
import time

from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

JWT_ISSUER = "https://jwt-issuer.test"
JWT_AUDIENCE = "tokengate-api"


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# P-256's group order: an ECDSA signature (r, s) is also valid as (r, n - s).
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def unb64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode(token):
    """(header, payload) of a JWT, unverified."""
    head, body, _ = token.split(".")
    return json.loads(unb64(head)), json.loads(unb64(body))


def high_s_twin(token):
    """The same ES256 JWT with its signature (r, s) as (r, n - s): another encoding, with its
    own SHA-256, that verifies as well."""
    head, body, sig = token.split(".")
    raw = unb64(sig)
    s = int.from_bytes(raw[32:], "big")
    return f"{head}.{body}.{b64(raw[:32] + (P256_N - s).to_bytes(32, 'big'))}"


def _int(n, size):
    return b64(n.to_bytes(size, "big"))


class JwtIssuer:
    def __init__(self, issuer=JWT_ISSUER):
        self.issuer = issuer
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())

    def jwks(self):
        r, e = self.rsa.public_key().public_numbers(), self.ec.public_key().public_numbers()
        return {"keys": [
            {"kty": "RSA", "kid": "rsa-1", "use": "sig", "n": _int(r.n, 256), "e": _int(r.e, 3)},
            {"kty": "EC", "kid": "ec-1", "crv": "P-256", "x": _int(e.x, 32), "y": _int(e.y, 32)},
        ]}

    def private_jwks(self):
        """The same keys with their private parts: an IdP's key file (server.mjs IDP_KEYS_FILE),
        so that the IdP and this issuer sign alike."""
        r, e = self.rsa.private_numbers(), self.ec.private_numbers()
        rsa_key, ec_key = self.jwks()["keys"]
        # RFC 7518 Base64urlUInt: the fewest octets that hold the value.
        uint = {name: _int(n, (n.bit_length() + 7) // 8) for name, n in
                dict(d=r.d, p=r.p, q=r.q, dp=r.dmp1, dq=r.dmq1, qi=r.iqmp).items()}
        rsa_key.update(alg="RS256", **uint)
        ec_key.update(alg="ES256", use="sig", d=_int(e.private_value, 32))
        return {"keys": [rsa_key, ec_key]}

    def config(self):
        """The plugin's `jwt` section for this issuer (inline keys)."""
        return {"issuers": [{"issuer": self.issuer, "audiences": [JWT_AUDIENCE], "keys": self.jwks()}]}

    def claims(self, **extra):
        now = int(time.time())
        base = {"iss": self.issuer, "aud": JWT_AUDIENCE, "sub": "jwt-user", "client_id": "jwt-client",
                "scope": "read", "iat": now, "exp": now + 300, "jti": secrets.token_hex(8)}
        return {**base, **extra}

    def mint(self, alg="RS256", header=None, **claims):
        head = {"alg": alg, "typ": "at+jwt", "kid": {"RS256": "rsa-1", "ES256": "ec-1"}.get(alg, "rsa-1")}
        head.update(header or {})
        return self.sign_token(alg, head, self.claims(**claims))

    def mint_claims(self, alg, claims):
        """A token with exactly these claims."""
        return self.sign_token(alg, {"alg": alg, "typ": "at+jwt", "kid": "ec-1" if alg == "ES256" else "rsa-1"}, claims)

    def sign_token(self, alg, head, claims):
        signed = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(claims).encode())}"
        return f"{signed}.{b64(self.sign(alg, signed.encode()))}"

    def sign(self, alg, data):
        if alg == "RS256":
            return self.rsa.sign(data, padding.PKCS1v15(), hashes.SHA256())
        if alg == "ES256":
            r, s = utils.decode_dss_signature(self.ec.sign(data, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        if alg == "HS256":
            # The confusion attack: the RSA public key as an HMAC secret.
            pem = self.rsa.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            mac = hmac.HMAC(pem, hashes.SHA256())
            mac.update(data)
            return mac.finalize()
        return b""


def jwt_section(idp, audiences, **issuer):
    """The plugin's `jwt` section for oidc-provider `idp`: its issuer, `audiences`, and its keys
    fetched from the jwks_uri of its discovery document through the `idp-keys` cluster (the
    harness Envoy's second cluster to the IdP); `issuer` sets more of the issuer's keys."""
    jwks = {"cluster": "idp-keys", "authority": idp.authority, "path": idp.jwks_path()}
    return {"issuers": [{"issuer": idp.issuer, "audiences": list(audiences), "jwks": jwks, **issuer}]}
