//! `config::Config::parse`: the plugin configuration. Beyond "no panic": a
//! configuration that is accepted must be safe to run with, so the arithmetic
//! and requests the filter derives from it are exercised too.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tokengate::admin::{self, handle, Command, Revoke, Route};
use tokengate::bearer;
use tokengate::cache::{self, hash_token, Lookup, SharedCache};
use tokengate::config::Config;
use tokengate::denylist::{Denylist, Kind};
use tokengate::introspection::{self, is_header_safe, Answer, Claims};
use tokengate::store::MemoryStore;

/// A plausible now (2027); the filter takes it from Envoy's clock.
const NOW_S: u64 = 1_800_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(config) = Config::parse(data) else {
        return;
    };
    check_documented_ranges(&config);
    let now_ms = NOW_S * 1000;
    let token = bearer::from_admin("fuzz-token");
    let hash = hash_token(&token);

    // The introspection callout can be sent: every header value is sendable.
    assert!(config.introspection.is_some() || config.jwt.is_some(), "nothing to validate tokens with");
    if let Some(i) = &config.introspection {
        let request = introspection::request(i, &token);
        for (name, value) in &request.headers {
            assert!(is_header_safe(value), "introspection header {name} is not sendable: {value:?}");
        }
    }
    // So can every JWKS fetch.
    for issuer in config.jwt.iter().flat_map(|j| &j.issuers) {
        assert!(issuer.keys.is_some() != issuer.jwks.is_some(), "inline keys or an endpoint, not both");
        if let Some(e) = &issuer.jwks {
            assert!(is_header_safe(&e.authority) && is_header_safe(&e.path) && e.path.starts_with('/'), "{e:?}");
            assert!((10..=86_400).contains(&e.refresh_s) && (1..=e.refresh_s).contains(&e.min_refetch_s), "{e:?}");
            assert!((1024..=1_048_576).contains(&e.max_bytes) && (1..=60_000).contains(&e.timeout_ms), "{e:?}");
        }
    }

    // The cache works with these bounds.
    let store = MemoryStore::new();
    let partition = cache::partition(&config);
    assert!(partition.len() == 16 && partition.bytes().all(|b| b.is_ascii_hexdigit()), "partition {partition:?}");
    let shared = SharedCache::new(&store, &config.cache, &partition);
    let active = Answer::Active(Claims { exp: Some(NOW_S + 60), ..Default::default() });
    for answer in [&active, &Answer::Inactive] {
        if let Some(until) = cache::cache_until_ms(answer, &config.cache, now_ms) {
            assert!(until > now_ms);
            let stale = cache::stale_until_ms(answer, &config.cache, until);
            assert!(stale == 0 || stale <= (NOW_S + 60) * 1000, "stale past exp");
            shared.store_answer(&hash, answer, until, stale, now_ms).expect("store");
        }
    }
    if let Some(until) = cache::cache_until_ms(&active, &config.cache, now_ms) {
        let stale = cache::stale_until_ms(&active, &config.cache, until);
        shared.store_answer(&hash, &active, until, stale, now_ms).expect("store");
        assert!(matches!(shared.lookup(&hash, now_ms).expect("store"), Lookup::Hit { .. }));
    }

    // A revocation made with these limits holds.
    let revoke = Revoke::Tokens { tokens: vec![token.as_str().to_string()], reason: "fuzz".into() };
    let done = handle(Command::Revoke(revoke), &config.denylist, &store, NOW_S, &|_| None);
    assert_eq!(done.reply.status, 200, "{:?}", done.reply);
    let list = Denylist::new(&store, &config.denylist);
    assert!(list.token_record(&hash, NOW_S).expect("store").is_some(), "a revocation that does not hold");
    let principal = Revoke::Principal { kind: Kind::Client, name: "app".into(), reason: String::new() };
    let done = handle(Command::Revoke(principal), &config.denylist, &store, NOW_S, &|_| None);
    assert_eq!(done.reply.status, 200, "{:?}", done.reply);
    assert_eq!(list.principals(NOW_S).expect("store").len(), 1, "a principal revocation that does not hold");

    // The admin routes exist under the configured prefix.
    if let Some(a) = &config.admin {
        let revoke_path = format!("{}/revoke", a.path_prefix);
        assert!(admin::is_admin_path(&revoke_path, &a.path_prefix));
        assert_eq!(admin::route("POST", &revoke_path, &a.path_prefix), Ok(Route::Revoke));
        assert_eq!(admin::route("GET", &format!("{}/revocations", a.path_prefix), &a.path_prefix), Ok(Route::List { offset: 0, limit: None }));
    }
});

/// An accepted configuration holds only values in the ranges README's
/// configuration reference documents: the checks in `Config::parse` and the
/// documentation cannot drift apart unnoticed.
fn check_documented_ranges(c: &Config) {
    let within = |v: u64, lo: u64, hi: u64, key: &str| assert!((lo..=hi).contains(&v), "{key} = {v}, documented {lo} to {hi}");
    if let Some(i) = &c.introspection {
        within(i.timeout_ms, 1, 60_000, "introspection.timeout_ms");
        within(i.max_response_bytes as u64, 1, 1_048_576, "introspection.max_response_bytes");
        assert!(i.path.starts_with('/'), "introspection.path {:?}", i.path);
        assert_eq!(i.client_id.is_some(), i.client_secret.is_some(), "client_id and client_secret go together");
    }
    let k = &c.cache;
    within(k.max_ttl_s, 0, 86_400, "cache.max_ttl_s");
    within(k.negative_ttl_s, 0, 3600, "cache.negative_ttl_s");
    within(k.max_entries, 1, 10_000_000, "cache.max_entries");
    within(k.local_entries as u64, 0, 1_000_000, "cache.local_entries");
    within(k.max_entry_bytes as u64, 256, 65_536, "cache.max_entry_bytes");
    within(k.stale_if_error_s, 0, 86_400, "cache.stale_if_error_s");
    for header in c.claims_to_headers.values() {
        assert!(!header.is_empty() && !header.bytes().any(|b| b.is_ascii_uppercase()), "claims_to_headers {header:?}");
        assert!(!["authorization", "host", "content-length", "transfer-encoding", "connection"].contains(&header.as_str()));
        assert!(!header.starts_with(':'), "pseudo-header {header:?}");
    }
    assert!(!c.realm.is_empty() && c.realm.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\'), "realm {:?}", c.realm);
    if let Some(a) = &c.admin {
        let p = &a.path_prefix;
        assert!(p.starts_with('/') && p.len() >= 2 && !p.ends_with('/') && !p.contains("//"), "admin.path_prefix {p:?}");
        assert!(p.bytes().all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b)), "admin.path_prefix {p:?}");
        within(a.max_body_bytes as u64, 1024, 67_108_864, "admin.max_body_bytes");
        within(a.max_bulk_tokens as u64, 1, 1_000_000, "admin.max_bulk_tokens");
    }
    let d = &c.denylist;
    within(d.max_tokens as u64, 1, 10_000_000, "denylist.max_tokens");
    within(d.max_principals as u64, 1, 100_000, "denylist.max_principals");
    within(d.token_ttl_s, 1, 315_360_000, "denylist.token_ttl_s");
    within(d.principal_ttl_s, 1, 315_360_000, "denylist.principal_ttl_s");
    within(d.clock_skew_s, 0, 3600, "denylist.clock_skew_s");
    if let Some(r) = &c.revocation_endpoint {
        within(r.timeout_ms, 1, 60_000, "revocation_endpoint.timeout_ms");
        assert!(r.path.starts_with('/'), "revocation_endpoint.path {:?}", r.path);
    }
    if let Some(s) = &c.cluster_sync {
        assert!(!s.prefix.is_empty() && s.prefix.ends_with('/'), "cluster_sync.prefix {:?}", s.prefix);
        within(s.poll_ms, 50, 60_000, "cluster_sync.poll_ms");
        within(s.timeout_ms, 1, 60_000, "cluster_sync.timeout_ms");
        within(s.max_outbox as u64, 1, 1_000_000, "cluster_sync.max_outbox");
    }
}
