//! `introspection::parse_answer` (and `read_answer`): whatever the
//! authorization server, or something pretending to be it, answers.
#![no_main]
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::collections::BTreeMap;
use tokengate::rules::{Requirement, TokenMode};
use tokengate::cache;
use tokengate::config;
use tokengate::introspection::{is_header_safe, is_usable_claim_value, parse_answer, read_answer, Answer, IntrospectionError};
use tokengate::policy;

fn wanted(claim: &str) -> bool {
    matches!(claim, "username" | "aud" | "sub" | "scope") || claim.len() == 3
}

fuzz_target!(|data: &[u8]| {
    // The status and size judgement first, from the first bytes.
    if let [a, b, c, ..] = data {
        let status = match a % 4 {
            0 => None,
            _ => Some(u32::from(*a) * 3 + u32::from(*b)),
        };
        let size = usize::from(*c) * 97;
        let max = usize::from(*b) * 101;
        let body = &data[3..];
        let body = &body[..body.len().min(size)];
        match read_answer(status, size, max, || body.to_vec(), &wanted) {
            // Only oidc-provider's 400 unsupported_token_type stands for an inactive token.
            Ok(Answer::Inactive) if status == Some(400) => assert!(size <= max),
            Ok(_) => assert!(status == Some(200) && size <= max),
            Err(IntrospectionError::TooLarge) => assert!(status == Some(200) && size > max),
            Err(_) if status == Some(200) => assert!(size <= max && parse_answer(body, &wanted).is_err()),
            Err(_) => {}
        }
    }

    let answer = match parse_answer(data, &wanted) {
        Ok(a) => a,
        Err(e) => {
            assert!(!e.reason().is_empty() && !e.description().is_empty());
            return;
        }
    };
    let object: Value = serde_json::from_slice(data).expect("an accepted answer is JSON");
    match &answer {
        Answer::Inactive => assert_eq!(object["active"], Value::Bool(false)),
        Answer::Active(claims) => {
            assert_eq!(object["active"], Value::Bool(true));
            for name in claims.extra.keys() {
                assert!(wanted(name) && !matches!(name.as_str(), "scope" | "client_id" | "sub"), "{name}");
            }
            // Claim headers are always safe to set, and whatever is left out is counted.
            let map: BTreeMap<String, String> = [("sub", "x-sub"), ("scope", "x-scope"), ("username", "x-user"), ("aud", "x-aud")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            let (headers, refused) = policy::claim_headers(claims, &map);
            for (_, v) in &headers {
                assert!(is_header_safe(v) && is_usable_claim_value(v));
                assert_eq!(v.trim_matches(' '), *v, "a value with surrounding spaces reached a header");
            }
            let present = map.keys().filter(|c| claims.get(c).is_some()).count();
            assert_eq!(headers.len() + refused as usize, present);
        }
    }
    // The answer survives the cache's encoding unchanged.
    let encoded = serde_json::to_vec(&answer).expect("an answer encodes");
    let decoded: Answer = serde_json::from_slice(&encoded).expect("an encoded answer decodes");
    assert_eq!(decoded, answer);

    // Caching and the policy: never past `exp`, never panicking, whatever the times.
    let now_ms = data.len() as u64 * 1_234_567_891;
    let cfg = config::Cache::default();
    let exp = match &answer {
        Answer::Active(c) => c.exp,
        Answer::Inactive => None,
    };
    if let Some(until) = cache::cache_until_ms(&answer, &cfg, now_ms) {
        assert!(until > now_ms);
        if let Some(exp) = exp {
            assert!(until <= exp.saturating_mul(1000), "cached past exp");
        }
    }
    let read = Requirement {
        token: TokenMode::Required,
        any_of: vec![vec!["read".to_string()]],
        audiences: Vec::new(),
        issuers: Vec::new(),
    };
    for now_s in [0, now_ms / 1000, exp.unwrap_or(0), exp.unwrap_or(0).saturating_sub(1), u64::MAX] {
        let decision = policy::decide(&answer, &read, now_s);
        if decision.is_ok() {
            assert!(exp.is_none_or(|e| e > now_s), "allowed at or past exp");
        }
    }
});
