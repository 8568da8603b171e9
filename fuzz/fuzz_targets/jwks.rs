//! `jwt_verify::parse_jwks`: an issuer's JWKS document, as configured inline
//! (and, later, as fetched). A key set it accepts holds only keys the
//! verifier can use safely, within the configured bound.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rsa::traits::PublicKeyParts;
use serde_json::Value;
use tokengate::jwt_verify::{parse_jwks, Alg, KeySet, PublicKey};

/// `jwt.max_keys`: the default, and a bound the seed JWKS exceeds.
const BOUNDS: [usize; 2] = [16, 2];

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let listed = doc.get("keys").and_then(Value::as_array).map_or(0, Vec::len);
    let mut sizes = Vec::new();
    for max_keys in BOUNDS {
        match parse_jwks(&doc, max_keys) {
            Ok(set) => {
                check_set(&set, max_keys, listed);
                sizes.push(set.keys.len());
            }
            Err(e) => assert!(!e.is_empty()),
        }
    }
    // A tighter bound only ever refuses: it never changes which keys are kept.
    if let [a, b] = sizes[..] {
        assert_eq!(a, b);
    }
});

fn check_set(set: &KeySet, max_keys: usize, listed: usize) {
    assert!(set.keys.len() <= max_keys, "{} keys kept with max_keys {max_keys}", set.keys.len());
    assert!(listed <= max_keys, "a JWKS listing {listed} keys accepted with max_keys {max_keys}");
    for jwk in &set.keys {
        match &jwk.key {
            // README: RSA keys have 2048–4096 bits.
            PublicKey::Rsa(k) => {
                let bits = k.n().bits();
                assert!((2048..=4096).contains(&bits), "an RSA key of {bits} bits");
                assert!(matches!(jwk.alg, None | Some(Alg::RS256 | Alg::PS256)), "RSA key with {:?}", jwk.alg);
            }
            PublicKey::P256(_) => assert!(matches!(jwk.alg, None | Some(Alg::ES256)), "P-256 key with {:?}", jwk.alg),
            PublicKey::Ed25519(_) => {
                assert!(matches!(jwk.alg, None | Some(Alg::EdDSA)), "Ed25519 key with {:?}", jwk.alg)
            }
        }
    }
}
