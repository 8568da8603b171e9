//! `denylist::Denylist` and `DenyView` over a store pre-filled with arbitrary
//! bytes, then a sequence of revocations, undos and checks. The view a worker
//! keeps must always agree with a direct read of the denylist.
#![no_main]
use fuzzkit::{byte, int, pick, pool_hash, text, POOL};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use tokengate::cache::{hex, TokenHash};
use tokengate::config;
use tokengate::denylist::{DenyView, Denylist, Kind};
use tokengate::introspection::Claims;
use tokengate::store::{Guard, MemoryStore, Store, KEY_PREFIX};

const NAMES: [&str; 3] = ["app", "alice", "bob"];

fn token_key(hash: &TokenHash) -> String {
    // The documented key scheme: bucket = first two bytes of the hash mod 1024.
    format!("{KEY_PREFIX}deny.tokens.{}", u16::from_be_bytes([hash[0], hash[1]]) % 1024)
}

fn records(u: &mut Unstructured) -> Vec<u8> {
    if byte(u) % 4 == 0 {
        let n = int(u, 0, 64) as usize;
        return u.bytes(n.min(u.len())).unwrap_or_default().to_vec();
    }
    let mut list = Vec::new();
    for _ in 0..int(u, 0, 6) {
        let (id, kind) = match byte(u) % 6 {
            0 => (format!("client:{}", pick(u, &NAMES)), "client"),
            1 => (format!("sub:{}", pick(u, &NAMES)), "sub"),
            2 => (format!("client:{}", pick(u, &NAMES)), "sub"),
            3 => (text(u, 12), "token"),
            4 => (format!("jti:{}", hex(&pool_hash(byte(u) as usize))), "jti"),
            _ => (hex(&pool_hash(byte(u) as usize)), "token"),
        };
        list.push(json!({
            "id": id, "kind": kind,
            "revoked_at": int(u, 0, 200), "expires_at": int(u, 0, 400), "reason": text(u, 6),
        }));
    }
    serde_json::to_vec(&list).unwrap_or_default()
}

/// Whether the view must call these claims revoked, from a direct read.
fn oracle(list: &Denylist<'_, MemoryStore>, claims: &Claims, now: u64, skew: u64) -> bool {
    let principals = list.principals(now).expect("store");
    // No iat, or one further ahead than the skew allows, proves nothing: as if issued before.
    let covered = |revoked_at: u64| match claims.iat {
        None => true,
        Some(iat) => iat <= revoked_at + skew || iat > now + skew,
    };
    let hit = |kind: Kind, prefix: &str, name: &Option<String>| {
        let Some(name) = name else { return false };
        let id = format!("{prefix}{name}");
        // The last record for an id wins, as in the view's map.
        principals
            .iter()
            .rev()
            .find(|r| r.kind == kind && r.id == id)
            .is_some_and(|r| r.expires_at > now && covered(r.revoked_at))
    };
    hit(Kind::Client, "client:", &claims.client_id) || hit(Kind::Subject, "sub:", &claims.sub)
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let limits = config::Denylist {
        max_tokens: int(&mut u, 1, 64) as usize,
        max_principals: int(&mut u, 1, 4) as usize,
        token_ttl_s: int(&mut u, 1, 100),
        principal_ttl_s: int(&mut u, 1, 100),
        clock_skew_s: int(&mut u, 0, 60),
    };
    let store = MemoryStore::new();
    for i in 0..POOL.len() {
        if byte(&mut u) % 2 == 0 {
            let _ = store.set(&token_key(&pool_hash(i)), &records(&mut u), Guard::Absent);
        }
    }
    if byte(&mut u) % 2 == 0 {
        store.set(&format!("{KEY_PREFIX}deny.principals"), &records(&mut u), Guard::Absent).expect("fresh key");
    }
    if byte(&mut u) % 2 == 0 {
        let gen = match byte(&mut u) % 3 {
            0 => u64::MAX.to_string(),
            1 => int(&mut u, 0, 5).to_string(),
            _ => text(&mut u, 6),
        };
        store.set(&format!("{KEY_PREFIX}deny.gen"), gen.as_bytes(), Guard::Absent).expect("fresh key");
    }
    let list = Denylist::new(&store, &limits);
    // A small memo, so that its starting over is fuzzed too.
    let mut view = DenyView::new(4);
    let mut now = int(&mut u, 0, 300);

    for _ in 0..24 {
        if u.is_empty() {
            break;
        }
        now += int(&mut u, 0, 40);
        let generation = list.generation().expect("store");
        let mut changed = false;
        match byte(&mut u) % 6 {
            0 => {
                let items: Vec<(TokenHash, u64)> =
                    (0..int(&mut u, 0, 4)).map(|_| (pool_hash(byte(&mut u) as usize), now + int(&mut u, 1, 200))).collect();
                let reason = text(&mut u, 300);
                // A token or a JWT identity: same buckets, other ids.
                let kind = if byte(&mut u) % 3 == 0 { Kind::Jwt } else { Kind::Token };
                let out = match kind {
                    Kind::Jwt => list.revoke_identities(&items, &reason, now),
                    _ => list.revoke_tokens(&items, &reason, now),
                }
                .expect("memory store");
                assert_eq!(out.revoked.len() + out.full.len(), items.len());
                for h in &out.revoked {
                    let r = list.hashed_record(kind, h, now).expect("store").expect("a revoked token has a live record");
                    // A new record has the clipped reason; an older one keeps its own.
                    assert!(r.reason.chars().count() <= 200);
                }
                changed = true;
            }
            1 => {
                let kind = if byte(&mut u) % 2 == 0 { Kind::Client } else { Kind::Subject };
                let name = *pick(&mut u, &NAMES);
                if let Ok(record) = list.revoke_principal(kind, name, "fuzz", now) {
                    assert!(record.expires_at > now);
                    changed = true;
                }
            }
            2 => {
                let id = match byte(&mut u) % 5 {
                    0 => hex(&pool_hash(byte(&mut u) as usize)).to_uppercase(),
                    1 => format!("jti:{}", hex(&pool_hash(byte(&mut u) as usize)).to_uppercase()),
                    2 => format!("client:{}", pick(&mut u, &NAMES)),
                    3 => format!("sub:{}", pick(&mut u, &NAMES)),
                    _ => text(&mut u, 70),
                };
                changed = list.undo(&id, now).expect("memory store");
                let (kind, hashed) = match id.strip_prefix("jti:") {
                    Some(rest) => (Kind::Jwt, rest),
                    None => (Kind::Token, id.as_str()),
                };
                if changed && !hashed.contains(':') {
                    let h = (0..POOL.len()).map(pool_hash).find(|h| hex(h).eq_ignore_ascii_case(hashed));
                    if let Some(h) = h {
                        assert_eq!(list.hashed_record(kind, &h, now).expect("store"), None, "undone but still revoked");
                    }
                }
            }
            3 => {
                let all = list.list(now).expect("store");
                assert!(all.iter().all(|r| r.expires_at > now));
                assert!(all.windows(2).all(|w| w[0].revoked_at >= w[1].revoked_at), "newest first");
            }
            _ => {}
        }
        if changed {
            assert_ne!(list.generation().expect("store"), generation, "a change must move the generation");
        }
        // The worker's view agrees with a direct read, token by token and principal by principal.
        view.refresh(&list, now).expect("store");
        for i in 0..POOL.len() {
            let h = pool_hash(i);
            let raw = store.get(&token_key(&h)).expect("store").map(|v| v.value).unwrap_or_default();
            for (kind, id) in [(Kind::Token, hex(&h)), (Kind::Jwt, format!("jti:{}", hex(&h)))] {
                let copies = serde_json::from_slice::<Vec<Value>>(&raw)
                    .map_or(0, |records| records.iter().filter(|r| r["id"] == id.as_str()).count());
                if copies > 1 {
                    continue; // a list another writer left with duplicates (see the principals below)
                }
                let direct = list.hashed_record(kind, &h, now).expect("store").is_some();
                let seen = match kind {
                    Kind::Jwt => view.identity_revoked(&list, &h, now),
                    _ => view.token_revoked(&list, &h, now),
                };
                assert_eq!(seen.expect("store"), direct, "view and denylist disagree on {id}");
            }
        }
        // (A list some other writer left with two records for one id is
        // read as the view reads it only at refresh time: skip those names.)
        let all = list.principals(0).expect("store");
        for name in NAMES {
            let duplicated = ["client:", "sub:"].iter().any(|p| all.iter().filter(|r| r.id == format!("{p}{name}")).count() > 1);
            if duplicated {
                continue;
            }
            let claims = Claims {
                client_id: Some(name.to_string()),
                sub: Some(name.to_string()),
                iat: Some(int(&mut u, 0, now + 2 * limits.clock_skew_s + 1)),
                ..Default::default()
            };
            let skew = limits.clock_skew_s;
            assert_eq!(view.principal_revoked(&claims, now, skew), oracle(&list, &claims, now, skew), "view and denylist disagree on {name}");
        }
    }
});
