//! `jwt_verify::check`: any bytes as a bearer token, against one issuer
//! whose keys the target holds (fuzzkit::jwt). A three-segment input is also
//! re-signed with the issuer's key for its `alg`, so mutated headers and
//! claims reach the checks after the signature.
#![no_main]
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use fuzzkit::jwt::{self, AUDIENCE, ISSUER, NOW_S};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tokengate::introspection::Claims;
use tokengate::jwt_verify::{check, Checked, JwtError, JwtSection};

thread_local! {
    // Not in a static: the section holds its keys behind an Rc, as the worker does.
    static SECTION: JwtSection = jwt::section();
}

fn wanted(claim: &str) -> bool {
    matches!(claim, "username" | "aud" | "sub" | "scope") || claim.len() == 3
}

fuzz_target!(|data: &[u8]| {
    SECTION.with(|section| {
        let verdict = check(data, section, NOW_S, &wanted);
        if let Checked::Verified(claims) = &verdict {
            accepted(section, data, claims);
        }
        if let Checked::Refused(e) = &verdict {
            assert!(!e.description().is_empty());
        }
        if let Some(resigned) = resign(data) {
            match check(&resigned, section, NOW_S, &wanted) {
                Checked::Verified(claims) => accepted(section, &resigned, &claims),
                // Signed with the one key that fits its alg: only a kid naming another key stops it.
                Checked::Refused(JwtError::Signature) => panic!("a correctly signed token refused for its signature"),
                _ => {}
            }
        }
    });
});

/// What an accepted token must satisfy, and that any change to one byte of
/// its signature makes it refused.
fn accepted(section: &JwtSection, token: &[u8], claims: &Claims) {
    assert!(claims.exp.is_some_and(|exp| exp > NOW_S), "accepted with exp {:?} at {NOW_S}", claims.exp);
    assert_eq!(claims.iss(), Some(ISSUER));
    assert!(claims.aud().iter().any(|a| a == AUDIENCE), "accepted for {:?}", claims.aud());
    let mut segments = token.split(|&b| b == b'.');
    let (Some(_), Some(payload), Some(signature)) = (segments.next(), segments.next(), segments.next()) else {
        panic!("accepted without three segments");
    };
    let raw: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64")).expect("JSON");
    assert_eq!(raw["iss"], Value::String(ISSUER.into()));

    match check(token, section, NOW_S, &wanted) {
        Checked::Verified(again) => assert_eq!(&again, claims, "re-verifying changed the claims"),
        other => panic!("re-verifying refused an accepted token: {other:?}"),
    }

    // One byte of the signature segment, at a place and to a value taken from the token.
    assert!(!signature.is_empty());
    let sum = token.iter().fold(0usize, |s, &b| s.wrapping_mul(31).wrapping_add(usize::from(b)));
    let at = token.len() - signature.len() + sum % signature.len();
    let mut tampered = token.to_vec();
    let old = tampered[at];
    tampered[at] = match (sum >> 16) as u8 {
        b if b == old => old ^ 1,
        b => b,
    };
    if let Checked::Verified(_) = check(&tampered, section, NOW_S, &wanted) {
        panic!("accepted with signature byte {at} changed from {old:#x} to {:#x}", tampered[at]);
    }
}

/// `header.payload` of a three-segment input, signed with the issuer's key for
/// the header's `alg` (none when the header names no algorithm it holds).
fn resign(data: &[u8]) -> Option<Vec<u8>> {
    let mut segments = data.split(|&b| b == b'.');
    let (Some(header), Some(payload), Some(_), None) =
        (segments.next(), segments.next(), segments.next(), segments.next())
    else {
        return None;
    };
    let decoded: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?;
    let alg = decoded.get("alg")?.as_str()?;
    // An RSA signature costs ~100 ECDSA ones: re-sign one input in eight.
    if alg.ends_with("S256") && !alg.starts_with('E') && data.iter().fold(0u8, |s, &b| s ^ b) % 8 != 0 {
        return None;
    }
    let input = [header, b".", payload].concat();
    let signature = jwt::sign(alg, &input)?;
    Some([&input[..], b".", jwt::b64(&signature).as_bytes()].concat())
}
