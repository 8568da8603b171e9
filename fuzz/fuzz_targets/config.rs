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
    let now_ms = NOW_S * 1000;
    let token = bearer::from_admin("fuzz-token");
    let hash = hash_token(&token);

    // The introspection callout can be sent: every header value is sendable.
    let request = introspection::request(&config.introspection, &token);
    for (name, value) in &request.headers {
        assert!(is_header_safe(value), "introspection header {name} is not sendable: {value:?}");
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
