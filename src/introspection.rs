//! RFC 7662 token introspection: the request tokengate sends and the strict
//! reading of the answer. Anything that is not a well-formed answer is an
//! error, and errors are never cached and never let a request through.

use crate::bearer::Token;
use crate::cache::TokenHash;
use crate::config::Introspection;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// What the filter keeps of an active token's answer: enough to enforce the
/// policy on every request and to set the claim headers. Never the token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// `iss` and `aud`, for `issuers` and `audiences` (boxed: most answers
    /// are cached and copied, and few configurations check them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued: Option<Box<Issued>>,
    /// Other claims named in `claims_to_headers`, as header-ready strings.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
    /// `jwt::identity` of the token (`iss` + `jti`), checked against the
    /// denylist on every request like the token's own hash.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "jti_id", with = "hex_identity")]
    pub identity: Option<TokenHash>,
}

/// An identity kept as hex in the shared cache: serde's own form for a
/// 32-byte array is 32 numbers and costs the module kilobytes of code.
mod hex_identity {
    use crate::cache::{hex, parse_hex, TokenHash};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<TokenHash>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(hash) => s.serialize_str(&hex(hash)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TokenHash>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| parse_hex(&t).ok_or_else(|| serde::de::Error::custom("not a SHA-256 in hex"))).transpose()
    }
}

/// Who issued a token and for whom.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// RFC 7662 `aud`: one string or a list of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aud: Vec<String>,
}

impl Claims {
    pub fn iss(&self) -> Option<&str> {
        self.issued.as_ref().and_then(|i| i.iss.as_deref())
    }

    pub fn aud(&self) -> &[String] {
        self.issued.as_ref().map_or(&[], |i| i.aud.as_slice())
    }

    /// The value of a claim as a header value, when the answer had it.
    pub fn get(&self, claim: &str) -> Option<&str> {
        match claim {
            "scope" => self.scope.as_deref(),
            "client_id" => self.client_id.as_deref(),
            "sub" => self.sub.as_deref(),
            other => self.extra.get(other).map(String::as_str),
        }
    }
}

/// The authorization server's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    Active(Claims),
    Inactive,
}

/// Why no verdict could be had. Each is a 503 for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntrospectionError {
    /// The callout could not be sent (unknown cluster, bad headers).
    Dispatch,
    /// Connection refused, reset, or no answer at all.
    Transport,
    /// No answer within `timeout_ms`.
    Timeout,
    /// The server refused our client credentials (401/403).
    Unauthorized(u32),
    /// Any other non-200 status.
    Status(u32),
    /// The body is larger than `max_response_bytes`.
    TooLarge,
    /// The body is not a JSON object.
    NotJson,
    /// JSON, but not an RFC 7662 answer.
    BadAnswer(&'static str),
    /// Another worker's introspection of the same token failed.
    PeerFailed,
}

impl IntrospectionError {
    /// Short name for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            IntrospectionError::Dispatch => "dispatch",
            IntrospectionError::Transport => "transport",
            IntrospectionError::Timeout => "timeout",
            IntrospectionError::Unauthorized(_) => "unauthorized",
            IntrospectionError::Status(_) => "status",
            IntrospectionError::TooLarge => "too_large",
            IntrospectionError::NotJson => "not_json",
            IntrospectionError::BadAnswer(_) => "bad_answer",
            IntrospectionError::PeerFailed => "peer_failed",
        }
    }

    /// What the client is told (the 503's `error_description`).
    pub fn description(&self) -> &'static str {
        match self {
            IntrospectionError::Dispatch | IntrospectionError::Transport => "the authorization server is unreachable",
            IntrospectionError::Timeout => "the authorization server did not answer in time",
            IntrospectionError::Unauthorized(_) => "the gateway is not authorized at the authorization server",
            IntrospectionError::Status(_) | IntrospectionError::PeerFailed => "the authorization server failed",
            IntrospectionError::TooLarge | IntrospectionError::NotJson | IntrospectionError::BadAnswer(_) => {
                "the authorization server gave an unusable answer"
            }
        }
    }
}

/// The headers and body of a callout to the authorization server.
pub struct Request {
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

/// The introspection callout: `POST {path}` with `token=…&token_type_hint=…`
/// and `client_secret_basic`.
pub fn request(config: &Introspection, token: &Token) -> Request {
    let hint = Some(config.token_type_hint.as_str()).filter(|h| !h.is_empty());
    let client = config.client_id.as_deref().zip(config.client_secret.as_deref());
    token_post(&config.path, &config.authority, client, token, hint)
}

/// A token form POST as RFC 7662 (introspection) and RFC 7009 (revocation)
/// both define it, with the client's `client_secret_basic` if it has one.
pub fn token_post(
    path: &str,
    authority: &str,
    client: Option<(&str, &str)>,
    token: &Token,
    hint: Option<&str>,
) -> Request {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("token", token.as_str());
    if let Some(hint) = hint {
        form.append_pair("token_type_hint", hint);
    }
    let mut headers = vec![
        (":method", "POST".to_string()),
        (":path", path.to_string()),
        (":authority", authority.to_string()),
        ("content-type", "application/x-www-form-urlencoded".to_string()),
        ("accept", "application/json".to_string()),
    ];
    if let Some((id, secret)) = client {
        headers.push(("authorization", basic_auth(id, secret)));
    }
    Request { headers, body: form.finish() }
}

/// RFC 6749 §2.3.1: id and secret are form-encoded before Basic encoding.
pub fn basic_auth(id: &str, secret: &str) -> String {
    let id: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
    let secret: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}")))
}

/// The verdict of an introspection callout; `body` is read only when the
/// status and size allow.
pub fn read_answer(
    status: Option<u32>,
    body_size: usize,
    max_bytes: usize,
    body: impl FnOnce() -> Vec<u8>,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<Answer, IntrospectionError> {
    match check_response(status, body_size, max_bytes) {
        Ok(()) => parse_answer(&body(), wanted),
        // oidc-provider answers so for every JWT (one of an issuer not in `jwt`): an unproven token, not an outage.
        Err(IntrospectionError::Status(400)) if body_size <= max_bytes && is_unsupported_token_type(&body()) => {
            Ok(Answer::Inactive)
        }
        Err(e) => Err(e),
    }
}

/// An OAuth error body naming `unsupported_token_type` (RFC 7009 §2.2.1).
fn is_unsupported_token_type(body: &[u8]) -> bool {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => o.get("error").and_then(Value::as_str) == Some("unsupported_token_type"),
        _ => false,
    }
}

/// Judges the callout's status and size before the body is read.
/// `status` is `None` when Envoy gave no response headers at all; a refused
/// connection or failed TLS handshake comes as Envoy's own 503 (`Status`).
fn check_response(status: Option<u32>, body_size: usize, max_bytes: usize) -> Result<(), IntrospectionError> {
    match status {
        None => Err(IntrospectionError::Transport),
        Some(200) if body_size > max_bytes => Err(IntrospectionError::TooLarge),
        Some(200) => Ok(()),
        Some(401) | Some(403) => Err(IntrospectionError::Unauthorized(status.unwrap_or_default())),
        Some(504) => Err(IntrospectionError::Timeout),
        Some(s) => Err(IntrospectionError::Status(s)),
    }
}

/// Parses an RFC 7662 answer. `wanted` names the extra claims to keep
/// (those in `claims_to_headers`).
pub fn parse_answer(body: &[u8], wanted: &dyn Fn(&str) -> bool) -> Result<Answer, IntrospectionError> {
    let object: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(o)) => o,
        Ok(_) | Err(_) => return Err(IntrospectionError::NotJson),
    };
    match object.get("active") {
        Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => return Ok(Answer::Inactive),
        _ => return Err(IntrospectionError::BadAnswer("`active` is missing or not a boolean")),
    }
    claims_from(&object, wanted).map(Answer::Active)
}

/// The claims of an active answer or a verified JWT payload (RFC 9068 uses
/// RFC 7662's member names).
pub fn claims_from(object: &Map<String, Value>, wanted: &dyn Fn(&str) -> bool) -> Result<Claims, IntrospectionError> {
    let mut claims = Claims {
        scope: string_claim(object, "scope")?,
        client_id: string_claim(object, "client_id")?,
        sub: string_claim(object, "sub")?,
        exp: time_claim(object, "exp")?,
        nbf: time_claim(object, "nbf")?,
        iat: time_claim(object, "iat")?,
        issued: issued(object),
        extra: BTreeMap::new(),
        identity: None,
    };
    // A `jti` that is not a string names nothing; the token's hash still does.
    if let Some(Value::String(jti)) = object.get("jti") {
        let iss = match object.get("iss") {
            Some(Value::String(iss)) => iss.as_str(),
            _ => "",
        };
        claims.identity = Some(crate::jwt::identity(iss, jti));
    }
    for (name, value) in object {
        if matches!(name.as_str(), "scope" | "client_id" | "sub") || !wanted(name) {
            continue;
        }
        if let Some(text) = header_text(value) {
            claims.extra.insert(name.clone(), text);
        }
    }
    Ok(claims)
}

/// `iss`, and `aud` as a string or an array of strings; anything else names
/// no issuer or audience (so those checks fail closed).
fn issued(o: &Map<String, Value>) -> Option<Box<Issued>> {
    let iss = o.get("iss").and_then(Value::as_str).map(str::to_string);
    let aud = match o.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        _ => Vec::new(),
    };
    (iss.is_some() || !aud.is_empty()).then(|| Box::new(Issued { iss, aud }))
}

fn string_claim(o: &Map<String, Value>, name: &'static str) -> Result<Option<String>, IntrospectionError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(IntrospectionError::BadAnswer(match name {
            "scope" => "`scope` is not a string",
            "client_id" => "`client_id` is not a string",
            _ => "`sub` is not a string",
        })),
    }
}

/// RFC 7662 times are integer seconds since the epoch.
fn time_claim(o: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, IntrospectionError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(IntrospectionError::BadAnswer(match name {
            "exp" => "`exp` is not a non-negative integer",
            "nbf" => "`nbf` is not a non-negative integer",
            _ => "`iat` is not a non-negative integer",
        })),
    }
}

/// A claim as text for a header: strings, numbers and booleans as text, a
/// list of strings space-separated; anything else is left out. Whether the
/// text may become a header is judged when it would (`is_usable_claim_value`).
fn header_text(value: &Value) -> Option<String> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Array(items) => {
            let parts: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
            parts?.join(" ")
        }
        _ => return None,
    };
    Some(text)
}

/// No control characters: Envoy would refuse the header, or worse, split it.
pub fn is_header_safe(text: &str) -> bool {
    text.bytes().all(|b| b >= 0x20 && b != 0x7f)
}

/// Whether a claim value may be set as a header and matched against client
/// and subject revocations: header-safe, not empty, no leading or trailing
/// space. Envoy strips such spaces, so `" admin"` would reach the upstream
/// as `admin`; refusing the value keeps two distinct names from reading as one.
pub fn is_usable_claim_value(text: &str) -> bool {
    !text.is_empty() && !text.starts_with(' ') && !text.ends_with(' ') && is_header_safe(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bearer;

    fn config() -> Introspection {
        crate::config::Config::parse(
            br#"{"introspection": {"cluster": "idp", "authority": "idp.local", "path": "/oauth2/introspect",
                 "client_id": "gate way", "client_secret": "s3cr:t&"}}"#,
        )
        .unwrap()
        .introspection
        .unwrap()
    }

    fn parse(body: &str) -> Result<Answer, IntrospectionError> {
        parse_answer(body.as_bytes(), &|c| c == "username" || c == "aud")
    }

    #[test]
    fn iss_and_aud_are_kept_aud_as_a_string_or_a_list() {
        let parse = |body: &str| match parse_answer(body.as_bytes(), &|_| false).unwrap() {
            Answer::Active(c) => (c.iss().map(str::to_string), c.aud().to_vec()),
            Answer::Inactive => unreachable!(),
        };
        let s = |v: &str| v.to_string();
        assert_eq!(parse(r#"{"active": true, "iss": "i", "aud": "a"}"#), (Some(s("i")), vec![s("a")]));
        assert_eq!(parse(r#"{"active": true, "aud": ["a", "b", 3]}"#), (None, vec![s("a"), s("b")]));
        assert_eq!(parse(r#"{"active": true, "aud": {"x": 1}, "iss": 5}"#), (None, vec![]));
    }

    #[test]
    fn request_is_a_percent_encoded_form_with_basic_auth() {
        let token = bearer::parse(&[b"Bearer a+b/c~d.e_f=="], 4096).unwrap();
        let r = request(&config(), &token);
        assert_eq!(r.body, "token=a%2Bb%2Fc%7Ed.e_f%3D%3D&token_type_hint=access_token");
        let decoded: Vec<(String, String)> = form_urlencoded::parse(r.body.as_bytes()).into_owned().collect();
        assert_eq!(decoded[0], ("token".to_string(), "a+b/c~d.e_f==".to_string()));
        let get = |k: &str| r.headers.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(get(":method"), "POST");
        assert_eq!(get(":path"), "/oauth2/introspect");
        assert_eq!(get(":authority"), "idp.local");
        assert_eq!(get("content-type"), "application/x-www-form-urlencoded");
        let basic = get("authorization");
        let raw = base64::engine::general_purpose::STANDARD.decode(basic.trim_start_matches("Basic ")).unwrap();
        assert_eq!(String::from_utf8(raw).unwrap(), "gate+way:s3cr%3At%26");
    }

    #[test]
    fn empty_hint_is_not_sent() {
        let mut c = config();
        c.token_type_hint.clear();
        c.client_id = None;
        c.client_secret = None;
        let token = bearer::parse(&[b"Bearer abc"], 4096).unwrap();
        let r = request(&c, &token);
        assert_eq!(r.body, "token=abc");
        assert!(r.headers.iter().all(|(n, _)| *n != "authorization"));
    }

    #[test]
    fn active_answer_keeps_the_claims() {
        let a = parse(
            r#"{"active": true, "scope": "read write", "client_id": "app", "sub": "alice",
                         "exp": 2000000000, "iat": 1700000000, "username": "al", "aud": ["a", "b"], "other": 1}"#,
        )
        .unwrap();
        let Answer::Active(c) = a else { panic!("inactive") };
        assert_eq!(c.scope.as_deref(), Some("read write"));
        assert_eq!(c.get("client_id"), Some("app"));
        assert_eq!(c.get("sub"), Some("alice"));
        assert_eq!(c.exp, Some(2_000_000_000));
        assert_eq!(c.iat, Some(1_700_000_000));
        assert_eq!(c.get("username"), Some("al"));
        assert_eq!(c.get("aud"), Some("a b"));
        assert_eq!(c.get("other"), None);
    }

    #[test]
    fn inactive_answer_ignores_the_rest() {
        assert_eq!(parse(r#"{"active": false}"#), Ok(Answer::Inactive));
        assert_eq!(parse(r#"{"active": false, "exp": "junk"}"#), Ok(Answer::Inactive));
    }

    #[test]
    fn active_must_be_json_true() {
        for body in [r#"{}"#, r#"{"active": "true"}"#, r#"{"active": 1}"#, r#"{"active": null}"#] {
            assert!(matches!(parse(body), Err(IntrospectionError::BadAnswer(_))), "{body}");
        }
    }

    #[test]
    fn wrong_types_are_a_bad_answer() {
        for body in [
            r#"{"active": true, "exp": "2000000000"}"#,
            r#"{"active": true, "exp": -1}"#,
            r#"{"active": true, "exp": 1.5}"#,
            r#"{"active": true, "nbf": true}"#,
            r#"{"active": true, "scope": ["read"]}"#,
            r#"{"active": true, "sub": 7}"#,
            r#"{"active": true, "client_id": {}}"#,
        ] {
            assert!(matches!(parse(body), Err(IntrospectionError::BadAnswer(_))), "{body}");
        }
    }

    #[test]
    fn non_json_is_refused() {
        for body in ["", "<html>", "[]", "true", r#""active""#, "{\"active\": true"] {
            assert_eq!(parse(body), Err(IntrospectionError::NotJson), "{body}");
        }
    }

    #[test]
    fn claim_values_are_kept_as_given_and_judged_as_headers() {
        let Answer::Active(c) = parse(r#"{"active": true, "username": "a\r\nx-evil: 1", "aud": ["", "b"]}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(c.get("username"), Some("a\r\nx-evil: 1"));
        assert_eq!(c.get("aud"), Some(" b"));
        assert!(!is_usable_claim_value("a\r\nx-evil: 1"));
    }

    #[test]
    fn usable_claim_values_have_no_surrounding_spaces_and_are_not_empty() {
        for good in ["admin", "read write", "a", "spiffe://ex.org/app", "\u{e9}l\u{e8}ve"] {
            assert!(is_usable_claim_value(good), "{good:?}");
        }
        for bad in ["", " ", " admin", "admin ", " admin ", "a\tb", "\tadmin", "a\nb", "a\u{7f}"] {
            assert!(!is_usable_claim_value(bad), "{bad:?}");
        }
    }

    #[test]
    fn status_and_size_are_judged_first() {
        assert_eq!(check_response(None, 0, 10), Err(IntrospectionError::Transport));
        assert_eq!(check_response(Some(200), 11, 10), Err(IntrospectionError::TooLarge));
        assert_eq!(check_response(Some(200), 10, 10), Ok(()));
        assert_eq!(check_response(Some(401), 0, 10), Err(IntrospectionError::Unauthorized(401)));
        assert_eq!(check_response(Some(504), 0, 10), Err(IntrospectionError::Timeout));
        assert_eq!(check_response(Some(500), 0, 10), Err(IntrospectionError::Status(500)));
    }

    #[test]
    fn unsupported_token_type_is_an_inactive_token_and_other_400s_are_failures() {
        let read = |status, body: &str, max| read_answer(Some(status), body.len(), max, || body.into(), &|_| false);
        // oidc-provider's answer for any JWT.
        let oidc = r#"{"error":"unsupported_token_type","error_description":"Structured JWT Tokens cannot be introspected via the introspection_endpoint"}"#;
        assert!(matches!(read(400, oidc, 1024), Ok(Answer::Inactive)));
        assert_eq!(read(400, oidc, 16).unwrap_err(), IntrospectionError::Status(400), "too large to read");
        for other in
            [r#"{"error":"invalid_request"}"#, r#"{"error":["unsupported_token_type"]}"#, "unsupported_token_type", ""]
        {
            assert_eq!(read(400, other, 1024).unwrap_err(), IntrospectionError::Status(400), "{other}");
        }
        assert_eq!(read(500, oidc, 1024).unwrap_err(), IntrospectionError::Status(500), "only a 400 says so");
        assert_eq!(
            read(200, oidc, 1024).unwrap_err(),
            IntrospectionError::BadAnswer("`active` is missing or not a boolean")
        );
        assert!(matches!(read(200, r#"{"active":false}"#, 1024), Ok(Answer::Inactive)));
    }
}
