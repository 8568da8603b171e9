//! JWT access tokens (RFC 9068) verified in the filter, to RFC 8725: the
//! `jwt` configuration section, JWKS parsing, and the checks. Pure logic:
//! the worker caches what this returns like an introspection answer.
//!
//! A token is ours when it has three segments and its unverified `iss`
//! names a configured issuer; any other token goes to introspection.

use crate::introspection::{claims_from, Claims};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::rc::Rc;

/// Issuers per configuration: each fetched one has two shared-data keys.
const MAX_ISSUERS: usize = 16;
/// Largest encoded JOSE header: real ones are under 200 bytes.
pub const MAX_HEADER_BYTES: usize = 1024;
/// RSA moduli accepted, in bits: below 2048 is weak (RFC 8725 §3.5), above
/// 4096 costs too much per verification.
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=4096;

/// The `jwt` section: issuers whose tokens are verified locally.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    pub issuers: Vec<IssuerConfig>,
    /// Most keys kept per issuer (a JWKS with more is refused).
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Compared byte for byte with the token's `iss`.
    pub issuer: String,
    /// The token's `aud` must hold one of these.
    pub audiences: Vec<String>,
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Alg>,
    /// The issuer's JWKS (`{"keys": [...]}`), inline; or `jwks`, fetched.
    #[serde(default)]
    pub keys: Option<Value>,
    #[serde(default)]
    pub jwks: Option<crate::jwks::Endpoint>,
    /// Leeway for `exp`, `nbf` and `iat`, in seconds.
    #[serde(default = "default_clock_skew_s")]
    pub clock_skew_s: u64,
    #[serde(skip)]
    pub(crate) key_set: Rc<KeySet>,
}

fn default_max_keys() -> usize {
    16
}
fn default_algorithms() -> Vec<Alg> {
    vec![Alg::RS256, Alg::ES256, Alg::EdDSA]
}
fn default_clock_skew_s() -> u64 {
    60
}

/// The asymmetric algorithms verified; `none` and HMAC have no variant, so
/// neither can be configured nor accepted (RFC 8725 §3.1, §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[allow(clippy::upper_case_acronyms)]
pub enum Alg {
    RS256,
    PS256,
    ES256,
    EdDSA,
}

impl Alg {
    fn parse(name: &str) -> Option<Alg> {
        Some(match name {
            "RS256" => Alg::RS256,
            "PS256" => Alg::PS256,
            "ES256" => Alg::ES256,
            "EdDSA" => Alg::EdDSA,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub enum PublicKey {
    Rsa(rsa::RsaPublicKey),
    P256(p256::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl PublicKey {
    fn fits(&self, alg: Alg) -> bool {
        matches!(
            (self, alg),
            (PublicKey::Rsa(_), Alg::RS256 | Alg::PS256)
                | (PublicKey::P256(_), Alg::ES256)
                | (PublicKey::Ed25519(_), Alg::EdDSA)
        )
    }

    fn verify(&self, alg: Alg, signed: &[u8], signature: &[u8]) -> bool {
        use p256::ecdsa::signature::Verifier;
        match (self, alg) {
            (PublicKey::Rsa(key), Alg::RS256) => {
                key.verify(rsa::Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(signed), signature).is_ok()
            }
            (PublicKey::Rsa(key), Alg::PS256) => {
                key.verify(rsa::Pss::new::<Sha256>(), &Sha256::digest(signed), signature).is_ok()
            }
            (PublicKey::P256(key), Alg::ES256) => p256::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|s: p256::ecdsa::Signature| key.verify(signed, &s).is_ok()),
            (PublicKey::Ed25519(key), Alg::EdDSA) => {
                ed25519_dalek::Signature::from_slice(signature).is_ok_and(|s| key.verify_strict(signed, &s).is_ok())
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Jwk {
    pub kid: Option<String>,
    pub alg: Option<Alg>,
    pub key: PublicKey,
}

/// An issuer's usable signing keys.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    pub keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct JwkJson {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    usage: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// Parses a JWKS document. Keys this filter cannot use (encryption keys,
/// other curves, unknown `alg`) are skipped; a malformed usable one, or more
/// than `max_keys`, refuses the document.
pub fn parse_jwks(doc: &Value, max_keys: usize) -> Result<KeySet, String> {
    let Some(Value::Array(list)) = doc.get("keys") else {
        return Err("a JWKS is an object with a `keys` array".into());
    };
    if list.len() > max_keys {
        return Err(format!("the JWKS has {} keys, more than max_keys ({max_keys})", list.len()));
    }
    let mut keys = Vec::new();
    for (i, value) in list.iter().enumerate() {
        let jwk: JwkJson = serde_json::from_value(value.clone()).map_err(|e| format!("keys[{i}]: {e}"))?;
        if jwk.usage.as_deref().is_some_and(|u| u != "sig") {
            continue;
        }
        let alg = match jwk.alg.as_deref() {
            None => None,
            Some(name) => match Alg::parse(name) {
                Some(alg) => Some(alg),
                None => continue,
            },
        };
        let key = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
            ("RSA", _) => rsa_key(&jwk).map_err(|e| format!("keys[{i}]: {e}"))?,
            ("EC", Some("P-256")) => p256_key(&jwk).map_err(|e| format!("keys[{i}]: {e}"))?,
            ("OKP", Some("Ed25519")) => ed25519_key(&jwk).map_err(|e| format!("keys[{i}]: {e}"))?,
            _ => continue,
        };
        if alg.is_some_and(|a| !key.fits(a)) {
            return Err(format!("keys[{i}]: `alg` does not match the key type"));
        }
        keys.push(Jwk { kid: jwk.kid, alg, key });
    }
    Ok(KeySet { keys })
}

fn member(value: &Option<String>, name: &str) -> Result<Vec<u8>, String> {
    let text = value.as_deref().ok_or_else(|| format!("`{name}` is missing"))?;
    URL_SAFE_NO_PAD.decode(text).map_err(|_| format!("`{name}` is not base64url"))
}

fn rsa_key(jwk: &JwkJson) -> Result<PublicKey, String> {
    let n = member(&jwk.n, "n")?;
    let e = member(&jwk.e, "e")?;
    let n = rsa::BigUint::from_bytes_be(&n);
    if !RSA_BITS.contains(&(n.bits())) {
        return Err(format!("RSA keys must have {} to {} bits", RSA_BITS.start(), RSA_BITS.end()));
    }
    if e.len() > 8 {
        return Err("`e` is too large".into());
    }
    rsa::RsaPublicKey::new(n, rsa::BigUint::from_bytes_be(&e)).map(PublicKey::Rsa).map_err(|e| e.to_string())
}

fn p256_key(jwk: &JwkJson) -> Result<PublicKey, String> {
    let (x, y) = (member(&jwk.x, "x")?, member(&jwk.y, "y")?);
    if x.len() != 32 || y.len() != 32 {
        return Err("P-256 coordinates are 32 bytes".into());
    }
    let point = [&[0x04][..], &x, &y].concat();
    p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).map(PublicKey::P256).map_err(|_| "not a point on P-256".into())
}

fn ed25519_key(jwk: &JwkJson) -> Result<PublicKey, String> {
    let x: [u8; 32] = member(&jwk.x, "x")?.try_into().map_err(|_| "an Ed25519 key is 32 bytes".to_string())?;
    ed25519_dalek::VerifyingKey::from_bytes(&x).map(PublicKey::Ed25519).map_err(|_| "not an Ed25519 key".into())
}

impl JwtSection {
    /// Checks the section and parses its keys; the message names the key.
    pub fn compile(&mut self) -> Result<(), String> {
        if self.issuers.is_empty() {
            return Err("jwt.issuers must not be empty".into());
        }
        if self.issuers.len() > MAX_ISSUERS {
            return Err(format!("jwt.issuers: at most {MAX_ISSUERS}"));
        }
        if self.max_keys == 0 || self.max_keys > 100 {
            return Err("jwt.max_keys must be between 1 and 100".into());
        }
        for (i, issuer) in self.issuers.iter_mut().enumerate() {
            let at = format!("jwt.issuers[{i}]");
            if issuer.issuer.is_empty() {
                return Err(format!("{at}.issuer must not be empty"));
            }
            if issuer.audiences.is_empty() || issuer.audiences.iter().any(String::is_empty) {
                return Err(format!("{at}.audiences must list at least one audience (RFC 9068 §4)"));
            }
            if issuer.algorithms.is_empty() {
                return Err(format!("{at}.algorithms must not be empty"));
            }
            if issuer.clock_skew_s > 3600 {
                return Err(format!("{at}.clock_skew_s must be at most 3600"));
            }
            match (&issuer.keys, &issuer.jwks) {
                (Some(keys), None) => {
                    let keys = parse_jwks(keys, self.max_keys).map_err(|e| format!("{at}.keys: {e}"))?;
                    issuer.key_set = Rc::new(keys);
                }
                (None, Some(endpoint)) => endpoint.validate(&format!("{at}.jwks"))?,
                _ => return Err(format!("{at}: give either `keys` (inline) or `jwks` (an endpoint), not both")),
            }
        }
        let mut names: Vec<&str> = self.issuers.iter().map(|i| i.issuer.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w.first() == w.get(1)) {
            return Err("jwt.issuers: each issuer may appear once".into());
        }
        Ok(())
    }
}

/// Why a JWT of a configured issuer is refused (401 invalid_token), or
/// cannot be checked (`NoKeys`: 503).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    Malformed,
    HeaderTooLarge,
    Algorithm,
    Type,
    Critical,
    UnknownKey,
    Signature,
    Expired,
    NotYetValid,
    IssuedInFuture,
    Audience,
    Claims,
    NoKeys,
}

impl JwtError {
    pub fn description(self) -> &'static str {
        match self {
            JwtError::Malformed => "the token is not a well-formed JWT",
            JwtError::HeaderTooLarge => "the token's JOSE header is too large",
            JwtError::Algorithm => "the token's signing algorithm is not accepted",
            JwtError::Type => "the token's typ is not at+jwt",
            JwtError::Critical => "the token has critical header parameters",
            JwtError::UnknownKey => "the token's signing key is unknown",
            JwtError::Signature => "the token's signature is invalid",
            JwtError::Expired => "the token has expired",
            JwtError::NotYetValid => "the token is not valid yet",
            JwtError::IssuedInFuture => "the token is issued in the future",
            JwtError::Audience => "the token is not meant for this audience",
            JwtError::Claims => "the token's claims are malformed",
            JwtError::NoKeys => "the issuer's signing keys are not available",
        }
    }
}

/// What the `jwt` section says about a bearer token.
#[derive(Debug)]
pub enum Checked {
    /// Not a JWT of a configured issuer: introspect it.
    NotOurs,
    Verified(Claims),
    Refused(JwtError),
}

fn object(segment: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).ok()?).ok()? {
        Value::Object(o) => Some(o),
        _ => None,
    }
}

/// A JWT naming a configured issuer, split but not yet verified.
pub struct Candidate<'t> {
    /// Index of its issuer in `JwtSection::issuers`.
    pub issuer: usize,
    header: &'t [u8],
    payload: &'t [u8],
    signature: &'t [u8],
    claims: Map<String, Value>,
}

/// The token as a JWT of an issuer in `section`, or `None`: not ours.
pub fn candidate<'t>(token: &'t [u8], section: &JwtSection) -> Option<Candidate<'t>> {
    let mut segments = token.split(|&b| b == b'.');
    let (Some(header), Some(payload), Some(signature), None) =
        (segments.next(), segments.next(), segments.next(), segments.next())
    else {
        return None;
    };
    let claims = object(payload)?;
    let iss = claims.get("iss").and_then(Value::as_str)?;
    let issuer = section.issuers.iter().position(|i| i.issuer == iss)?;
    Some(Candidate { issuer, header, payload, signature, claims })
}

impl Candidate<'_> {
    /// Verifies it with `keys` (the issuer's, inline or fetched). `wanted`
    /// names the extra claims to keep (`claims_to_headers`).
    pub fn verify(
        mut self,
        section: &JwtSection,
        keys: &KeySet,
        now_s: u64,
        wanted: &dyn Fn(&str) -> bool,
    ) -> Result<Claims, JwtError> {
        let issuer = section.issuers.get(self.issuer).ok_or(JwtError::NoKeys)?;
        verify(&mut self, issuer, keys, now_s, wanted)
    }
}

/// Verifies `token` with its issuer's inline keys if it is a JWT of an
/// issuer in `section`.
pub fn check(token: &[u8], section: &JwtSection, now_s: u64, wanted: &dyn Fn(&str) -> bool) -> Checked {
    let Some(candidate) = candidate(token, section) else {
        return Checked::NotOurs;
    };
    let keys = section.issuers.get(candidate.issuer).map(|i| i.key_set.clone()).unwrap_or_default();
    match candidate.verify(section, &keys, now_s, wanted) {
        Ok(c) => Checked::Verified(c),
        Err(e) => Checked::Refused(e),
    }
}

fn verify(
    candidate: &mut Candidate<'_>,
    issuer: &IssuerConfig,
    keys: &KeySet,
    now_s: u64,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<Claims, JwtError> {
    let (header_b64, payload_b64, signature_b64) = (candidate.header, candidate.payload, candidate.signature);
    let claims = &mut candidate.claims;
    if header_b64.len() > MAX_HEADER_BYTES {
        return Err(JwtError::HeaderTooLarge);
    }
    let header = object(header_b64).ok_or(JwtError::Malformed)?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .and_then(Alg::parse)
        .filter(|a| issuer.algorithms.contains(a))
        .ok_or(JwtError::Algorithm)?;
    match header.get("typ") {
        Some(Value::String(t)) if is_access_token_type(t) => {}
        _ => return Err(JwtError::Type),
    }
    if header.contains_key("crit") {
        return Err(JwtError::Critical);
    }
    let key = pick_key(keys, header.get("kid"), alg)?;
    let signature = URL_SAFE_NO_PAD.decode(signature_b64).map_err(|_| JwtError::Malformed)?;
    // The signed input is the two segments as sent, dot included.
    let signed = [header_b64, b".", payload_b64].concat();
    if !key.verify(alg, &signed, &signature) {
        return Err(JwtError::Signature);
    }
    check_times(claims, issuer.clock_skew_s, now_s)?;
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !audiences.iter().any(|a| issuer.audiences.iter().any(|c| c == a)) {
        return Err(JwtError::Audience);
    }
    // Okta and Azure AD send scopes as `scp` (a string or an array).
    if !claims.contains_key("scope") {
        let scp = match claims.get("scp") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => Some(list.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" ")),
            _ => None,
        };
        if let Some(scp) = scp {
            claims.insert("scope".into(), Value::String(scp));
        }
    }
    claims_from(claims, wanted).map_err(|_| JwtError::Claims)
}

/// `exp` is required (RFC 9068 §2.2); `nbf` and `iat` may be absent.
fn check_times(claims: &Map<String, Value>, skew: u64, now_s: u64) -> Result<(), JwtError> {
    let time = |name: &str| match claims.get(name) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(JwtError::Claims),
    };
    match time("exp")? {
        None => return Err(JwtError::Claims),
        Some(exp) if exp.saturating_add(skew) <= now_s => return Err(JwtError::Expired),
        Some(_) => {}
    }
    if time("nbf")?.is_some_and(|nbf| nbf > now_s.saturating_add(skew)) {
        return Err(JwtError::NotYetValid);
    }
    if time("iat")?.is_some_and(|iat| iat > now_s.saturating_add(skew)) {
        return Err(JwtError::IssuedInFuture);
    }
    Ok(())
}

/// RFC 9068 §2.1 `at+jwt` (with or without `application/`), and `JWT`,
/// which several IdPs still send for access tokens.
fn is_access_token_type(typ: &str) -> bool {
    let typ = typ.strip_prefix("application/").unwrap_or(typ);
    typ.eq_ignore_ascii_case("at+jwt") || typ.eq_ignore_ascii_case("jwt")
}

/// The key named by `kid`; without `kid`, the one key that fits `alg`.
fn pick_key<'k>(set: &'k KeySet, kid: Option<&Value>, alg: Alg) -> Result<&'k PublicKey, JwtError> {
    if set.keys.is_empty() {
        return Err(JwtError::NoKeys);
    }
    let usable = |k: &&Jwk| k.key.fits(alg) && k.alg.is_none_or(|a| a == alg);
    let mut found = match kid {
        Some(Value::String(kid)) => {
            set.keys.iter().filter(|k| k.kid.as_deref() == Some(kid.as_str())).filter(usable).collect::<Vec<_>>()
        }
        Some(_) => return Err(JwtError::Malformed),
        None => set.keys.iter().filter(usable).collect(),
    };
    match (found.pop(), found.is_empty()) {
        (Some(k), true) => Ok(&k.key),
        _ => Err(JwtError::UnknownKey),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer;
    use rsa::traits::PublicKeyParts;
    use serde_json::json;
    use std::sync::OnceLock;

    pub(crate) const NOW: u64 = 1_700_000_000;
    pub(crate) const ISS: &str = "https://idp.example";

    struct Keys {
        rsa: rsa::RsaPrivateKey,
        ec: p256::ecdsa::SigningKey,
        ed: ed25519_dalek::SigningKey,
    }

    fn keys() -> &'static Keys {
        static KEYS: OnceLock<Keys> = OnceLock::new();
        KEYS.get_or_init(|| {
            let mut rng = rand::thread_rng();
            Keys {
                rsa: rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap(),
                ec: p256::ecdsa::SigningKey::random(&mut rng),
                ed: ed25519_dalek::SigningKey::generate(&mut rng),
            }
        })
    }

    pub(crate) fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    pub(crate) fn jwks() -> Value {
        let k = keys();
        let rsa = k.rsa.to_public_key();
        let point = k.ec.verifying_key().to_encoded_point(false);
        json!({"keys": [
            {"kty": "RSA", "kid": "r1", "use": "sig", "n": b64(&rsa.n().to_bytes_be()), "e": b64(&rsa.e().to_bytes_be())},
            {"kty": "EC", "kid": "e1", "crv": "P-256", "alg": "ES256",
             "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())},
            {"kty": "OKP", "kid": "d1", "crv": "Ed25519", "x": b64(k.ed.verifying_key().as_bytes())},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "kid": "p384", "crv": "P-384", "x": "AA", "y": "AA"},
        ]})
    }

    fn section() -> JwtSection {
        let mut s: JwtSection = serde_json::from_value(json!({"issuers": [{
            "issuer": ISS, "audiences": ["api"], "algorithms": ["RS256", "PS256", "ES256", "EdDSA"], "keys": jwks()
        }]}))
        .unwrap();
        s.compile().unwrap();
        s
    }

    fn sign(alg: &str, header: &Value, payload: &Value) -> String {
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(payload.to_string().as_bytes()));
        let k = keys();
        let sig = match alg {
            "RS256" => {
                let digest = Sha256::digest(input.as_bytes());
                k.rsa.sign(rsa::Pkcs1v15Sign::new::<Sha256>(), &digest).unwrap()
            }
            "PS256" => {
                let digest = Sha256::digest(input.as_bytes());
                k.rsa.sign_with_rng(&mut rand::thread_rng(), rsa::Pss::new::<Sha256>(), &digest).unwrap()
            }
            "ES256" => {
                let s: p256::ecdsa::Signature = k.ec.sign(input.as_bytes());
                s.to_bytes().to_vec()
            }
            "EdDSA" => ed25519_dalek::Signer::sign(&k.ed, input.as_bytes()).to_bytes().to_vec(),
            _ => b"x".to_vec(),
        };
        format!("{input}.{}", b64(&sig))
    }

    pub(crate) fn claims() -> Value {
        json!({"iss": ISS, "aud": "api", "sub": "alice", "client_id": "app", "exp": NOW + 300,
               "iat": NOW - 10, "jti": "j1", "scope": "read write"})
    }

    pub(crate) fn token(alg: &str, kid: &str, payload: &Value) -> String {
        sign(alg, &json!({"alg": alg, "typ": "at+jwt", "kid": kid}), payload)
    }

    fn run(token: &str) -> Result<Claims, JwtError> {
        match check(token.as_bytes(), &section(), NOW, &|_| false) {
            Checked::Verified(c) => Ok(c),
            Checked::Refused(e) => Err(e),
            Checked::NotOurs => panic!("not ours: {token}"),
        }
    }

    #[test]
    fn each_algorithm_verifies_with_its_key() {
        for (alg, kid) in [("RS256", "r1"), ("PS256", "r1"), ("ES256", "e1"), ("EdDSA", "d1")] {
            let c = run(&token(alg, kid, &claims())).unwrap_or_else(|e| panic!("{alg}: {e:?}"));
            assert_eq!(c.sub.as_deref(), Some("alice"));
            assert_eq!(c.client_id.as_deref(), Some("app"));
            assert_eq!(c.scope.as_deref(), Some("read write"));
            assert_eq!(c.exp, Some(NOW + 300));
            assert_eq!(c.identity, Some(crate::jwt::identity(ISS, "j1")), "revocable by jti");
        }
    }

    #[test]
    fn scopes_also_come_from_scp() {
        let mut p = claims();
        p.as_object_mut().unwrap().remove("scope");
        p["scp"] = json!(["read", "admin"]);
        assert_eq!(run(&token("ES256", "e1", &p)).unwrap().scope.as_deref(), Some("read admin"));
        p["scp"] = json!("read");
        assert_eq!(run(&token("ES256", "e1", &p)).unwrap().scope.as_deref(), Some("read"));
    }

    #[test]
    fn times_are_checked_with_the_skew() {
        let with = |k: &str, v: u64| {
            let mut p = claims();
            p[k] = json!(v);
            run(&token("ES256", "e1", &p))
        };
        assert_eq!(with("exp", NOW - 61).unwrap_err(), JwtError::Expired);
        assert!(with("exp", NOW - 30).is_ok(), "within the skew");
        assert_eq!(with("nbf", NOW + 61).unwrap_err(), JwtError::NotYetValid);
        assert!(with("nbf", NOW + 30).is_ok());
        assert_eq!(with("iat", NOW + 61).unwrap_err(), JwtError::IssuedInFuture);
        let mut p = claims();
        p.as_object_mut().unwrap().remove("exp");
        assert_eq!(run(&token("ES256", "e1", &p)).unwrap_err(), JwtError::Claims, "exp is required");
    }

    #[test]
    fn audience_must_be_configured() {
        let mut p = claims();
        p["aud"] = json!(["other", "api"]);
        assert!(run(&token("ES256", "e1", &p)).is_ok());
        p["aud"] = json!("other");
        assert_eq!(run(&token("ES256", "e1", &p)).unwrap_err(), JwtError::Audience);
        p.as_object_mut().unwrap().remove("aud");
        assert_eq!(run(&token("ES256", "e1", &p)).unwrap_err(), JwtError::Audience);
    }

    #[test]
    fn rfc8725_header_rules() {
        let p = claims();
        let none = format!("{}.{}.", b64(br#"{"alg":"none","typ":"at+jwt"}"#), b64(p.to_string().as_bytes()));
        assert_eq!(run(&none).unwrap_err(), JwtError::Algorithm);
        // HS256 keyed with the RSA public key (the classic confusion attack).
        let header = json!({"alg": "HS256", "typ": "at+jwt", "kid": "r1"});
        assert_eq!(run(&sign("HS256", &header, &p)).unwrap_err(), JwtError::Algorithm);
        let header = json!({"alg": "ES256", "typ": "at+jwt", "kid": "e1", "crit": ["exp"]});
        assert_eq!(run(&sign("ES256", &header, &p)).unwrap_err(), JwtError::Critical);
        for typ in [json!("id+jwt"), json!(null), json!(7)] {
            let header = json!({"alg": "ES256", "typ": typ, "kid": "e1"});
            assert_eq!(run(&sign("ES256", &header, &p)).unwrap_err(), JwtError::Type, "{typ}");
        }
        for typ in ["JWT", "application/at+jwt", "AT+JWT"] {
            assert!(run(&sign("ES256", &json!({"alg": "ES256", "typ": typ, "kid": "e1"}), &p)).is_ok(), "{typ}");
        }
        // Without kid the one key fitting the algorithm is used.
        assert!(run(&sign("EdDSA", &json!({"alg": "EdDSA", "typ": "at+jwt"}), &p)).is_ok());
        assert_eq!(run(&token("ES256", "nope", &p)).unwrap_err(), JwtError::UnknownKey);
        assert_eq!(run(&token("ES256", "r1", &p)).unwrap_err(), JwtError::UnknownKey, "the key must fit alg");
        let big = json!({"alg": "ES256", "typ": "at+jwt", "kid": "e1", "pad": "x".repeat(MAX_HEADER_BYTES)});
        assert_eq!(run(&sign("ES256", &big, &p)).unwrap_err(), JwtError::HeaderTooLarge);
    }

    #[test]
    fn tampering_is_refused() {
        let t = token("RS256", "r1", &claims());
        let parts: Vec<&str> = t.split('.').collect();
        let mut p = claims();
        p["sub"] = json!("mallory");
        let tampered = format!("{}.{}.{}", parts[0], b64(p.to_string().as_bytes()), parts[2]);
        assert_eq!(run(&tampered).unwrap_err(), JwtError::Signature);
        let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        sig[10] ^= 1;
        assert_eq!(run(&format!("{}.{}.{}", parts[0], parts[1], b64(&sig))).unwrap_err(), JwtError::Signature);
        assert_eq!(run(&format!("{}.{}.!!", parts[0], parts[1])).unwrap_err(), JwtError::Malformed);
        assert_eq!(run(&format!("e30x.{}.{}", parts[1], parts[2])).unwrap_err(), JwtError::Malformed);
    }

    #[test]
    fn other_tokens_are_not_ours() {
        let s = section();
        let mut p = claims();
        p["iss"] = json!("https://other.example");
        for t in ["opaque".to_string(), "a.b".to_string(), token("ES256", "e1", &p), "a.b.c.d".to_string()] {
            assert!(matches!(check(t.as_bytes(), &s, NOW, &|_| false), Checked::NotOurs), "{t}");
        }
    }

    #[test]
    fn no_keys_fails_closed() {
        let mut s: JwtSection =
            serde_json::from_value(json!({"issuers": [{"issuer": ISS, "audiences": ["api"], "keys": {"keys": []}}]}))
                .unwrap();
        s.compile().unwrap();
        let t = token("ES256", "e1", &claims());
        assert!(matches!(check(t.as_bytes(), &s, NOW, &|_| false), Checked::Refused(JwtError::NoKeys)));
    }

    #[test]
    fn jwks_and_section_bounds() {
        assert!(parse_jwks(&jwks(), 4).unwrap_err().contains("max_keys"));
        assert_eq!(parse_jwks(&jwks(), 16).unwrap().keys.len(), 3, "enc and P-384 keys skipped");
        let small = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 1024).unwrap().to_public_key();
        let weak = json!({"keys": [{"kty": "RSA", "n": b64(&small.n().to_bytes_be()), "e": "AQAB"}]});
        assert!(parse_jwks(&weak, 16).unwrap_err().contains("2048"));
        let bad_alg = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "alg": "RS256", "x": b64(&[1; 32])}]});
        assert!(parse_jwks(&bad_alg, 16).is_err());
        assert!(serde_json::from_value::<JwtSection>(
            json!({"issuers": [{"issuer": ISS, "audiences": ["a"], "algorithms": ["HS256"], "keys": {"keys": []}}]})
        )
        .is_err());
        let mut s: JwtSection =
            serde_json::from_value(json!({"issuers": [{"issuer": ISS, "audiences": [], "keys": {"keys": []}}]}))
                .unwrap();
        assert!(s.compile().unwrap_err().contains("jwt.issuers[0].audiences"));
    }
}
