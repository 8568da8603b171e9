//! The identity of a JWT access token: its issuer and `jti` (RFC 7519 §4.1.7,
//! RFC 9068), read from the payload without verifying anything.
//!
//! One JWT has several encodings that a lenient server still accepts (an
//! ECDSA signature `(r, s)` is also valid as `(r, n − s)`; base64url with
//! non-zero trailing bits decodes to the same bytes), and each has its own
//! SHA-256. Revoking a JWT therefore also revokes its identity, and every
//! answer that has one is checked against the denylist by it.
//!
//! Reading the payload unverified is safe here: the identity only ever adds
//! a denial. A token is accepted only on the authorization server's word.

use crate::cache::TokenHash;
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// base64url as lenient servers read it: padding optional, stray trailing
/// bits ignored, so every encoding of one payload decodes alike.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The denylist name of a JWT: SHA-256 over a tag, `iss` and `jti`, each
/// length-prefixed so that no other pair hashes alike.
pub fn identity(iss: &str, jti: &str) -> TokenHash {
    let mut d = Sha256::new();
    d.update(b"tokengate.jti\0");
    for part in [iss, jti] {
        d.update((part.len() as u64).to_be_bytes());
        d.update(part.as_bytes());
    }
    d.finalize().into()
}

/// The identity of a token that is a JWT with a string `jti`; `None` for
/// anything else (opaque tokens, JWTs without `jti`).
pub fn payload_identity(token: &[u8]) -> Option<TokenHash> {
    let mut segments = token.split(|&b| b == b'.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (segments.next(), segments.next(), segments.next(), segments.next())
    else {
        return None;
    };
    let json = LENIENT.decode(payload).ok()?;
    // A JSON tree rather than a struct: the module already holds that parser.
    let claims = match serde_json::from_slice::<Value>(&json).ok()? {
        Value::Object(claims) => claims,
        _ => return None,
    };
    let iss = match claims.get("iss") {
        Some(Value::String(iss)) => iss.as_str(),
        _ => "",
    };
    match claims.get("jti") {
        Some(Value::String(jti)) => Some(identity(iss, jti)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{URL_SAFE as URL_SAFE_PADDED, URL_SAFE_NO_PAD};

    fn jwt(payload: &str, signature: &str) -> String {
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","typ":"at+jwt"}"#);
        format!("{header}.{}.{signature}", URL_SAFE_NO_PAD.encode(payload))
    }

    #[test]
    fn identity_comes_from_iss_and_jti() {
        let t = jwt(r#"{"iss":"https://idp.example","jti":"abc","sub":"alice"}"#, "c2ln");
        assert_eq!(payload_identity(t.as_bytes()), Some(identity("https://idp.example", "abc")));
        assert_ne!(identity("a", "bc"), identity("ab", "c"), "the parts cannot shift");
        assert_ne!(identity("https://idp.example", "abc"), identity("https://other.example", "abc"));
        let no_iss = jwt(r#"{"jti":"abc"}"#, "c2ln");
        assert_eq!(payload_identity(no_iss.as_bytes()), Some(identity("", "abc")));
    }

    #[test]
    fn other_encodings_of_one_jwt_have_its_identity() {
        let payload = r#"{"iss":"i","jti":"j1"}"#;
        let canonical = jwt(payload, "AAAA");
        // Another signature (as ECDSA's (r, n - s) would be), padding, and
        // non-zero trailing bits in the payload's last character.
        let resigned = jwt(payload, "BBBB");
        let encoded = URL_SAFE_NO_PAD.encode(payload);
        let padded = canonical.replace(&encoded, &URL_SAFE_PADDED.encode(payload));
        let last = encoded.chars().last().unwrap();
        let bumped = char::from(last as u8 + 1);
        let trailing = canonical.replace(&encoded, &format!("{}{bumped}", &encoded[..encoded.len() - 1]));
        assert_ne!(trailing, canonical);
        for t in [&canonical, &resigned, &padded, &trailing] {
            assert_eq!(payload_identity(t.as_bytes()), Some(identity("i", "j1")), "{t}");
        }
    }

    #[test]
    fn tokens_without_a_jti_have_no_identity() {
        for t in [
            "opaque-token".to_string(),
            "a.b".to_string(),
            "a.b.c.d".to_string(),
            jwt(r#"{"iss":"i"}"#, "s"),
            jwt(r#"{"iss":"i","jti":7}"#, "s"),
            jwt("not json", "s"),
            "e30.!!!.s".to_string(),
        ] {
            assert_eq!(payload_identity(t.as_bytes()), None, "{t}");
        }
    }
}
