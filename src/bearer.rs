//! Where the token comes from: the `Authorization: Bearer` credential
//! (RFC 6750 §2.1). Only the header is read; the raw token leaves this module
//! only as a `Token`, which cannot be printed.

use std::fmt;

/// Longest bearer token accepted by default (`max_token_bytes`); longer
/// ones are `invalid_request`. Also the bound on the admin API's own token.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 4096;

/// Largest `max_token_bytes`: Envoy's default header limit (60 KiB) lets no
/// larger token arrive, and the hash memo holds tokens of up to this size.
pub const MAX_TOKEN_BYTES_CEILING: usize = 60 * 1024;

/// A bearer token as the client sent it. Never logged: `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Vec<u8>);

impl Token {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// Always valid UTF-8: `parse` accepts only b64token characters.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
    /// The token `locate` found, if it is one b64token.
    pub fn checked(token: &[u8]) -> Result<Token, BearerError> {
        if !is_b64token(token) {
            return Err(BearerError::Malformed("the bearer token has characters outside RFC 6750 b64token"));
        }
        Ok(Token(token.to_vec()))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<{} bytes>)", self.0.len())
    }
}

/// Why a request carries no usable bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerError {
    /// No `Authorization`, or another scheme: RFC 6750 §3.1 says answer
    /// with a bare challenge, no error code.
    Missing,
    /// `Bearer` but not a single well-formed b64token.
    Malformed(&'static str),
}

/// Parses the values of every `Authorization` header of the request.
pub fn parse(values: &[&[u8]], max_token_bytes: usize) -> Result<Token, BearerError> {
    Token::checked(locate(values, max_token_bytes)?)
}

/// The token of the `Authorization` header, its characters not yet checked
/// (`Token::checked`): a worker that has seen these bytes need not scan them.
pub fn locate<'a>(values: &[&'a [u8]], max_token_bytes: usize) -> Result<&'a [u8], BearerError> {
    let value = match values {
        [] => return Err(BearerError::Missing),
        [one] => *one,
        _ => return Err(BearerError::Malformed("more than one Authorization header")),
    };
    let value = trim_ows(value);
    let Some(space) = value.iter().position(|&b| b == b' ') else {
        return if value.eq_ignore_ascii_case(b"bearer") {
            Err(BearerError::Malformed("the Bearer credential is empty"))
        } else {
            Err(BearerError::Missing)
        };
    };
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(BearerError::Missing);
    }
    // 1*SP between scheme and token (RFC 7235 §2.1).
    let token = trim_ows(rest);
    if token.is_empty() {
        return Err(BearerError::Malformed("the Bearer credential is empty"));
    }
    if token.len() > max_token_bytes {
        return Err(BearerError::Malformed("the bearer token is too long"));
    }
    Ok(token)
}

/// The `access_token` query parameter (RFC 6750 §2.3) of a request path, if
/// any: `Ok(None)` when absent, an error when repeated or malformed.
pub fn from_query(path: &str, max_token_bytes: usize) -> Result<Option<Token>, BearerError> {
    let Some((_, query)) = path.split_once('?') else {
        return Ok(None);
    };
    let query = query.split('#').next().unwrap_or_default();
    let values: Vec<_> = form_urlencoded::parse(query.as_bytes()).filter(|(k, _)| k == "access_token").collect();
    let value = match values.as_slice() {
        [] => return Ok(None),
        [(_, value)] => value,
        _ => return Err(BearerError::Malformed("more than one access_token query parameter")),
    };
    if !is_presentable(value, max_token_bytes) {
        return Err(BearerError::Malformed("the access_token query parameter is not a b64token"));
    }
    Ok(Some(Token(value.as_bytes().to_vec())))
}

/// The path without its `access_token` query parameter, however its name
/// is percent-encoded (the name is compared decoded, as `from_query` reads it).
pub fn strip_query_token(path: &str) -> String {
    let Some((base, query)) = path.split_once('?') else {
        return path.to_string();
    };
    let is_token =
        |pair: &str| form_urlencoded::parse(pair.as_bytes()).next().is_some_and(|(k, _)| k == "access_token");
    let kept: Vec<&str> = query.split('&').filter(|p| !is_token(p)).collect();
    if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

/// Whether `token` could be presented as a bearer token (b64token, bounded).
pub fn is_presentable(token: &str, max_token_bytes: usize) -> bool {
    !token.is_empty() && token.len() <= max_token_bytes && is_b64token(token.as_bytes())
}

/// A token given by an admin (already checked with `is_presentable`).
pub fn from_admin(token: &str) -> Token {
    Token(token.as_bytes().to_vec())
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' '] = s {
        s = rest;
    }
    s
}

/// b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
fn is_b64token(token: &[u8]) -> bool {
    let body_len = token.len() - token.iter().rev().take_while(|&&b| b == b'=').count();
    body_len > 0
        && token
            .iter()
            .take(body_len)
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(v: &str) -> String {
        parse(&[v.as_bytes()], 4096).unwrap().as_str().to_string()
    }
    fn bad(v: &[u8]) -> BearerError {
        parse(&[v], 4096).unwrap_err()
    }

    #[test]
    fn scheme_is_case_insensitive() {
        for v in ["Bearer abc", "bearer abc", "BEARER abc", "bEaReR abc"] {
            assert_eq!(ok(v), "abc");
        }
    }

    #[test]
    fn b64token_characters_pass_unchanged() {
        assert_eq!(ok("Bearer a+b/c~d.e_f-g=="), "a+b/c~d.e_f-g==");
        assert_eq!(ok("Bearer  two-spaces"), "two-spaces");
    }

    #[test]
    fn missing_or_other_scheme_gets_bare_challenge() {
        assert_eq!(parse(&[], 4096), Err(BearerError::Missing));
        assert_eq!(bad(b"Basic dXNlcjpwYXNz"), BearerError::Missing);
        assert_eq!(bad(b"Token abc"), BearerError::Missing);
        assert_eq!(bad(b""), BearerError::Missing);
    }

    #[test]
    fn malformed_bearer_is_invalid_request() {
        for v in [
            &b"Bearer"[..],
            b"Bearer ",
            b"Bearer a b",
            b"Bearer a,b",
            b"Bearer \xc3\xa9t\xc3\xa9",
            b"Bearer ==",
            b"Bearer a=b",
            b"Bearer a\tb",
        ] {
            assert!(matches!(bad(v), BearerError::Malformed(_)), "{:?}", String::from_utf8_lossy(v));
        }
    }

    #[test]
    fn too_long_is_invalid_request() {
        let long = format!("Bearer {}", "a".repeat(4097));
        assert_eq!(bad(long.as_bytes()), BearerError::Malformed("the bearer token is too long"));
        let max = format!("Bearer {}", "a".repeat(4096));
        assert_eq!(ok(&max).len(), 4096);
    }

    #[test]
    fn several_headers_are_refused() {
        assert!(matches!(parse(&[b"Bearer a", b"Bearer b"], 4096), Err(BearerError::Malformed(_))));
    }

    #[test]
    fn query_token_is_read_and_stripped() {
        assert_eq!(from_query("/a?x=1&access_token=a%2Bb", 4096).unwrap().unwrap().as_str(), "a+b");
        assert_eq!(from_query("/a?x=1", 4096), Ok(None));
        assert_eq!(from_query("/a", 4096), Ok(None));
        assert!(from_query("/a?access_token=a&access_token=b", 4096).is_err());
        assert!(from_query("/a?access_token=a%20b", 4096).is_err());
        assert!(from_query("/a?access_token=", 4096).is_err());
        assert_eq!(strip_query_token("/a?x=1&access_token=abc&y=2"), "/a?x=1&y=2");
        assert_eq!(strip_query_token("/a?access_token=abc"), "/a");
        assert_eq!(strip_query_token("/a"), "/a");
    }

    /// Found by fuzz/bearer: `from_query` decodes the parameter name, so
    /// `access%5Ftoken=…` is accepted as the token, but `strip_query_token`
    /// matches the raw name and leaves it in the path: with
    /// `hide_credentials` the token still reaches the upstream.
    #[test]
    fn query_token_is_stripped_however_its_name_is_spelled() {
        for path in ["/a?x=1&access%5Ftoken=abc&y=2", "/a?%61ccess_token=abc", "/a?access_t%6Fken=abc&y=2"] {
            assert_eq!(from_query(path, 4096).unwrap().unwrap().as_str(), "abc", "{path}");
            let stripped = strip_query_token(path);
            assert_eq!(from_query(&stripped, 4096), Ok(None), "{path} -> {stripped}");
            assert!(!stripped.contains("abc"), "{path} -> {stripped}");
        }
    }

    #[test]
    fn debug_never_shows_the_token() {
        let t = parse(&[b"Bearer secret-value"], 4096).unwrap();
        assert!(!format!("{t:?}").contains("secret"));
    }
}
