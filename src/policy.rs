//! The decision for an introspected token, made again on every request (a
//! cached answer is never trusted past `exp` or for a scope it lacks).

use crate::introspection::{is_usable_claim_value, Answer, Claims};
use crate::outcome::Denial;
use crate::rules::Requirement;
use std::collections::BTreeMap;

/// Allows the request with these claims, or says why not.
pub fn decide<'a>(answer: &'a Answer, required: &Requirement, now_s: u64) -> Result<&'a Claims, Denial> {
    let Answer::Active(claims) = answer else {
        return Err(Denial::InvalidToken("the token is not active"));
    };
    if claims.exp.is_some_and(|exp| exp <= now_s) {
        return Err(Denial::InvalidToken("the token has expired"));
    }
    if claims.nbf.is_some_and(|nbf| nbf > now_s) {
        return Err(Denial::InvalidToken("the token is not valid yet"));
    }
    required.check(claims)?;
    Ok(claims)
}

/// The `(header, value)` pairs to set for the upstream, and how many claims
/// the answer had but were left out (not usable as a header value).
pub fn claim_headers<'a>(claims: &'a Claims, map: &'a BTreeMap<String, String>) -> (Vec<(&'a str, &'a str)>, u64) {
    let mut refused = 0;
    let headers = map
        .iter()
        .filter_map(|(claim, header)| claims.get(claim).map(|v| (header.as_str(), v)))
        .filter(|(_, v)| {
            let usable = is_usable_claim_value(v);
            refused += u64::from(!usable);
            usable
        })
        .collect();
    (headers, refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(scope: &str) -> Answer {
        Answer::Active(Claims {
            scope: Some(scope.to_string()),
            sub: Some("alice".into()),
            exp: Some(1000),
            ..Default::default()
        })
    }

    fn scopes(s: &[&str]) -> Requirement {
        Requirement { any_of: vec![s.iter().map(|s| s.to_string()).collect()], ..Default::default() }
    }

    #[test]
    fn inactive_is_invalid_token() {
        assert_eq!(decide(&Answer::Inactive, &scopes(&[]), 0).unwrap_err().reason(), "invalid_token");
    }

    #[test]
    fn exp_is_enforced_on_every_decision() {
        assert!(decide(&active("read"), &scopes(&[]), 999).is_ok());
        assert_eq!(decide(&active("read"), &scopes(&[]), 1000), Err(Denial::InvalidToken("the token has expired")));
    }

    #[test]
    fn nbf_in_the_future_is_invalid() {
        let a = Answer::Active(Claims { nbf: Some(50), ..Default::default() });
        assert!(decide(&a, &scopes(&[]), 49).is_err());
        assert!(decide(&a, &scopes(&[]), 50).is_ok());
    }

    #[test]
    fn every_required_scope_must_be_granted() {
        let req = scopes(&["read", "write"]);
        assert!(decide(&active("write read admin"), &req, 0).is_ok());
        assert_eq!(decide(&active("read"), &req, 0), Err(Denial::InsufficientScope("read write".into())));
        // A scope is a whole word: "reader" does not grant "read".
        assert!(decide(&active("reader"), &scopes(&["read"]), 0).is_err());
        let none = Answer::Active(Claims::default());
        assert!(decide(&none, &scopes(&["read"]), 0).is_err());
        assert!(decide(&none, &scopes(&[]), 0).is_ok());
    }

    #[test]
    fn claims_map_to_headers() {
        let map: BTreeMap<String, String> =
            [("sub".to_string(), "x-sub".to_string()), ("client_id".to_string(), "x-client".to_string())].into();
        let Answer::Active(c) = active("read") else { unreachable!() };
        assert_eq!(claim_headers(&c, &map), (vec![("x-sub", "alice")], 0));
    }

    #[test]
    fn empty_or_space_padded_claims_are_left_out_and_counted() {
        let map: BTreeMap<String, String> = [("sub", "x-sub"), ("client_id", "x-client"), ("scope", "x-scope")]
            .into_iter()
            .map(|(c, h)| (c.to_string(), h.to_string()))
            .collect();
        let claims = |sub: &str, client: &str| Claims {
            sub: Some(sub.into()),
            client_id: Some(client.into()),
            scope: Some("read write".into()),
            ..Default::default()
        };
        for sub in [" admin ", " admin", "admin ", "", "ad\nmin"] {
            let c = claims(sub, "app");
            assert_eq!(claim_headers(&c, &map), (vec![("x-client", "app"), ("x-scope", "read write")], 1), "{sub:?}");
        }
        let c = claims("", " app");
        assert_eq!(claim_headers(&c, &map), (vec![("x-scope", "read write")], 2));
        // A claim the answer does not have is absent, not refused.
        let none = Claims::default();
        assert_eq!(claim_headers(&none, &map), (vec![], 0));
    }
}
