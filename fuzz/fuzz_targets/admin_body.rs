//! `admin::parse_revoke`: the body and content type of `POST {prefix}/revoke`,
//! and what carrying out an accepted request does to the denylist.
#![no_main]
use fuzzkit::{int, pick, text};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use tokengate::admin::{handle, parse_revoke, Command, Counts, Revoke};
use tokengate::bearer::{self, DEFAULT_MAX_TOKEN_BYTES};
use tokengate::cache::hash_token;
use tokengate::config;
use tokengate::denylist::{Denylist, Kind, MAX_PRINCIPAL_CHARS};
use tokengate::store::MemoryStore;

const TYPES: [Option<&str>; 7] = [
    Some("application/json"),
    Some("application/x-www-form-urlencoded"),
    Some("application/json; charset=utf-8"),
    Some(" APPLICATION/X-WWW-FORM-URLENCODED ;x=y"),
    Some("text/plain"),
    Some(""),
    None,
];
const NOW: u64 = 1_800_000_000;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let free_type;
    let content_type = if u.ratio(1, 16).unwrap_or(false) {
        free_type = text(&mut u, 40);
        Some(free_type.as_str())
    } else {
        *pick(&mut u, &TYPES)
    };
    let cfg = config::Admin {
        path_prefix: "/tokengate".into(),
        token_sha256: config::AdminTokenHashes::new(["00".repeat(32)]),
        max_body_bytes: int(&mut u, 1024, 8192) as usize,
        max_bulk_tokens: int(&mut u, 1, 32) as usize,
    };
    let body = u.take_rest();

    let revoke = match parse_revoke(content_type, body, &cfg, DEFAULT_MAX_TOKEN_BYTES) {
        Ok(r) => r,
        Err(reply) => {
            assert!(matches!(reply.status, 400 | 413 | 415), "{}", reply.status);
            assert!(reply.body.is_some());
            return;
        }
    };
    assert!(!body.is_empty() && body.len() <= cfg.max_body_bytes);
    let limits = config::Denylist::default();
    let store = MemoryStore::new();
    let done = handle(Command::Revoke(revoke.clone()), &limits, &store, NOW, &|_| None);
    assert_eq!(done.reply.status, 200, "{:?}", done.reply);
    let reply_text = done.reply.text().unwrap_or_default();
    let list = Denylist::new(&store, &limits);
    match revoke {
        Revoke::Tokens { tokens, .. } => {
            assert!(!tokens.is_empty() && tokens.len() <= cfg.max_bulk_tokens);
            for t in &tokens {
                assert!(bearer::is_presentable(t, DEFAULT_MAX_TOKEN_BYTES), "{t:?}");
                // What the admin revokes is what a client would present.
                let header = format!("Bearer {t}");
                let presented = bearer::parse(&[header.as_bytes()], DEFAULT_MAX_TOKEN_BYTES).expect("presentable");
                assert_eq!(presented, bearer::from_admin(t));
                let record = list.token_record(&hash_token(&presented), NOW).expect("store");
                assert!(record.is_some(), "an accepted revocation must be on the denylist");
                // The raw token is never echoed (the ids are hashes).
                if t.len() >= 8 && !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                    assert!(!reply_text.contains(t.as_str()), "the reply echoes a token");
                }
            }
            let unique: std::collections::HashSet<&String> = tokens.iter().collect();
            assert_eq!(done.forward.len(), unique.len(), "each token is forwarded once");
            assert_eq!(done.counts, Counts { tokens: unique.len() as u64, ..Counts::default() });
        }
        Revoke::Principal { kind, name, .. } => {
            assert!(kind != Kind::Token);
            assert!(!name.is_empty() && name.chars().count() <= MAX_PRINCIPAL_CHARS);
            assert!(!name.chars().any(char::is_control));
            let principals = list.principals(NOW).expect("store");
            assert_eq!(principals.len(), 1);
            assert_eq!(principals[0].kind, kind);
            assert!(principals[0].id.ends_with(name.as_str()));
            assert_eq!(done.counts, Counts { principals: 1, ..Counts::default() });
        }
        Revoke::Jwt { iss, jti, .. } => {
            assert!(!jti.is_empty() && !jti.chars().any(char::is_control) && !iss.chars().any(char::is_control));
            let identity = tokengate::jwt::identity(&iss, &jti);
            assert!(list.hashed_record(Kind::Jwt, &identity, NOW).expect("store").is_some(), "a JWT revocation that does not hold");
            assert!(done.forward.is_empty(), "nothing to forward without the token");
            assert_eq!(done.counts, Counts { tokens: 1, ..Counts::default() });
        }
    }
});
