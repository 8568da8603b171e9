//! The jwt target's issuer: one key per algorithm family, built from fixed
//! seeds so that the committed seed tokens (fuzz/seeds/jwt) verify.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::Signer;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::OnceLock;
use tokengate::jwt_verify::JwtSection;

pub const ISSUER: &str = "https://idp.fuzz.example";
pub const AUDIENCE: &str = "api";
/// The fuzzing clock (2027); seed tokens expire an hour later.
pub const NOW_S: u64 = 1_800_000_000;
/// (alg, kid) of every seed token.
pub const SIGNERS: [(&str, &str); 4] = [("RS256", "r1"), ("PS256", "r1"), ("ES256", "e1"), ("EdDSA", "d1")];

pub struct Keys {
    pub rsa: rsa::RsaPrivateKey,
    pub ec: p256::ecdsa::SigningKey,
    pub ed: ed25519_dalek::SigningKey,
}

pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        rsa: rsa::RsaPrivateKey::new(&mut StdRng::seed_from_u64(19), 2048).expect("an RSA key"),
        ec: p256::ecdsa::SigningKey::from_slice(&[0x19; 32]).expect("a P-256 key"),
        ed: ed25519_dalek::SigningKey::from_bytes(&[0x42; 32]),
    })
}

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The issuer's JWKS, with an encryption key and a P-384 key it must skip.
pub fn jwks() -> Value {
    let k = keys();
    let rsa = k.rsa.to_public_key();
    let point = k.ec.verifying_key().to_encoded_point(false);
    json!({"keys": [
        {"kty": "RSA", "kid": "r1", "use": "sig", "n": b64(&rsa.n().to_bytes_be()), "e": b64(&rsa.e().to_bytes_be())},
        {"kty": "EC", "kid": "e1", "crv": "P-256", "alg": "ES256",
         "x": b64(point.x().expect("x")), "y": b64(point.y().expect("y"))},
        {"kty": "OKP", "kid": "d1", "crv": "Ed25519", "alg": "EdDSA", "x": b64(k.ed.verifying_key().as_bytes())},
        {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
        {"kty": "EC", "kid": "p384", "crv": "P-384", "x": "AA", "y": "AA"},
    ]})
}

/// The configured section: every algorithm, no clock skew (so an accepted
/// token's `exp` is strictly after NOW_S).
pub fn section() -> JwtSection {
    let mut s: JwtSection = serde_json::from_value(json!({"issuers": [{
        "issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["RS256", "PS256", "ES256", "EdDSA"],
        "keys": jwks(), "clock_skew_s": 0
    }]}))
    .expect("the section parses");
    s.compile().expect("the section compiles");
    s
}

/// The signature of `input` with this issuer's key for `alg`, if it has one.
pub fn sign(alg: &str, input: &[u8]) -> Option<Vec<u8>> {
    let k = keys();
    Some(match alg {
        "RS256" => k.rsa.sign(rsa::Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(input)).ok()?,
        "PS256" => {
            // The salt from a fixed seed: a re-signed input signs the same.
            let mut rng = StdRng::seed_from_u64(7);
            k.rsa.sign_with_rng(&mut rng, rsa::Pss::new::<Sha256>(), &Sha256::digest(input)).ok()?
        }
        "ES256" => {
            let s: p256::ecdsa::Signature = k.ec.sign(input);
            s.to_bytes().to_vec()
        }
        "EdDSA" => ed25519_dalek::Signer::sign(&k.ed, input).to_bytes().to_vec(),
        _ => return None,
    })
}

/// A signed access token with the seed claims.
pub fn token(alg: &str, kid: &str) -> String {
    let header = json!({"alg": alg, "typ": "at+jwt", "kid": kid});
    let claims = json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "client_id": "app", "scope": "read write",
                        "exp": NOW_S + 3600, "iat": NOW_S - 10, "jti": format!("seed-{alg}")});
    let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let sig = sign(alg, input.as_bytes()).expect("a known algorithm");
    format!("{input}.{}", b64(&sig))
}
