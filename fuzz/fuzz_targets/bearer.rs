//! `bearer::parse`: the `Authorization` header values of a request, as Envoy
//! hands them over (any bytes, any number of headers).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tokengate::bearer::{self, BearerError, DEFAULT_MAX_TOKEN_BYTES};

fuzz_target!(|data: &[u8]| {
    // First byte: how many header values (0-3) and which length bound;
    // the rest is split into the values at NUL bytes.
    let (head, rest) = data.split_first().map_or((1u8, data), |(h, r)| (*h, r));
    let count = usize::from(head % 4);
    let max = if head & 0x80 == 0 { DEFAULT_MAX_TOKEN_BYTES } else { 16 };
    let values: Vec<&[u8]> = if count == 0 { Vec::new() } else { rest.splitn(count, |&b| b == 0).collect() };

    // The `access_token` query parameter (RFC 6750 §2.3), on the same bytes as a path.
    // (Envoy refuses a path with '#' before any filter runs: such paths are not judged.)
    if let Some(path) = std::str::from_utf8(rest).ok().filter(|p| !p.contains('#')) {
        if let Ok(Some(token)) = bearer::from_query(path, max) {
            assert!(bearer::is_presentable(token.as_str(), max));
            // hide_credentials strips it: what goes upstream carries no query token.
            let stripped = bearer::strip_query_token(path);
            assert_eq!(bearer::from_query(&stripped, max), Ok(None), "a query token survives stripping: {path:?}");
        }
    }

    match bearer::parse(&values, max) {
        Ok(token) => {
            assert_eq!(values.len(), 1, "a token from several Authorization headers");
            let bytes = token.as_bytes();
            assert!(!bytes.is_empty() && bytes.len() <= max);
            assert_eq!(token.as_str().as_bytes(), bytes, "as_str must be the token itself");
            assert!(bearer::is_presentable(token.as_str(), max));
            // The token is what the header carried, and it round-trips in canonical form.
            assert!(values[0].windows(bytes.len()).any(|w| w == bytes));
            let canonical = format!("Bearer {}", token.as_str());
            assert_eq!(bearer::parse(&[canonical.as_bytes()], max), Ok(token.clone()));
            assert_eq!(token, bearer::from_admin(token.as_str()));
            // The scheme is Bearer, case-insensitively, with only spaces around.
            let trimmed = values[0].iter().position(|&b| b != b' ').map_or(&b""[..], |i| &values[0][i..]);
            assert!(trimmed.len() > 6 && trimmed[..6].eq_ignore_ascii_case(b"bearer") && trimmed[6] == b' ');
            // Debug never shows a token it could be confused with.
            if bytes.len() >= 20 {
                assert!(!format!("{token:?}").contains(token.as_str()));
            }
        }
        Err(BearerError::Missing) => assert!(values.len() <= 1, "several headers are malformed, not missing"),
        Err(BearerError::Malformed(why)) => assert!(!why.is_empty()),
    }
});
