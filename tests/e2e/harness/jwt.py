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
