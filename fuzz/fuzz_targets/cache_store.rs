//! `cache::SharedCache` over a store pre-filled with arbitrary bytes: shared
//! data is written by every worker (and by older versions of the module), so
//! a bucket may hold anything. Then a sequence of cache operations, each
//! checked against what it promises. Also `LocalCache`.
#![no_main]
use fuzzkit::{byte, int, pool_hash, text, POOL};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use std::rc::Rc;
use tokengate::cache::{bucket_count, hex, Claim, LocalCache, Lookup, SharedCache, Stored, SLOTS};
use tokengate::config;
use tokengate::introspection::{Answer, Claims};
use tokengate::store::{Guard, MemoryStore, Store, KEY_PREFIX};

fn answer(u: &mut Unstructured) -> Answer {
    match byte(u) % 3 {
        0 => Answer::Inactive,
        1 => Answer::Active(Claims::default()),
        _ => Answer::Active(Claims {
            scope: Some(text(u, 300)),
            sub: Some(text(u, 20)),
            exp: Some(int(u, 0, u64::MAX)),
            ..Default::default()
        }),
    }
}

/// A bucket as some writer might have left it: well-formed slots (in the
/// documented encoding) mixed with junk, or plain bytes.
fn bucket(u: &mut Unstructured) -> Vec<u8> {
    if byte(u) % 4 == 0 {
        let n = int(u, 0, 64) as usize;
        return u.bytes(n.min(u.len())).unwrap_or_default().to_vec();
    }
    let mut slots = Vec::new();
    for _ in 0..int(u, 0, 12) {
        let hash = match byte(u) % 5 {
            4 => Value::String(text(u, 10)),
            i => Value::String(hex(&pool_hash(i as usize))),
        };
        let until = json!(int(u, 0, 20_000));
        let state = match byte(u) % 6 {
            0 => json!("p"),
            1 => json!({"f": {"at": int(u, 0, 20_000)}}),
            2 => json!({"a": "Inactive"}),
            3 => json!({"a": {"Active": {"scope": text(u, 8), "exp": int(u, 0, 30)}}}),
            4 => json!({"x": 1}),
            _ => json!(text(u, 4)),
        };
        let mut slot = json!({"h": hash, "u": until, "s": state});
        // The stale-if-error stand-in: its deadline, and the answer a marker keeps.
        if byte(u) % 2 == 0 {
            slot["z"] = json!(int(u, 0, 40_000));
        }
        if byte(u) % 3 == 0 {
            slot["k"] = if byte(u) % 2 == 0 { json!("Inactive") } else { json!({"Active": {"sub": text(u, 6)}}) };
        }
        slots.push(slot);
    }
    serde_json::to_vec(&slots).unwrap_or_default()
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let cfg = config::Cache {
        max_entries: int(&mut u, 1, 16),
        max_entry_bytes: int(&mut u, 256, 1024) as usize,
        ..Default::default()
    };
    let buckets = bucket_count(cfg.max_entries);
    let key = |i: u64| format!("{KEY_PREFIX}cache.f.{buckets}.{i}");
    let store = MemoryStore::new();
    let mut initial = Vec::new();
    for i in 0..buckets {
        let value = (byte(&mut u) % 3 != 0).then(|| bucket(&mut u));
        if let Some(v) = &value {
            store.set(&key(i), v, Guard::Absent).expect("fresh key");
        }
        initial.push(value);
    }
    let cache = SharedCache::new(&store, &cfg, "f");
    let mut local = LocalCache::new(int(&mut u, 0, 3) as usize);
    let mut now = int(&mut u, 0, 20_000);

    for _ in 0..32 {
        if u.is_empty() {
            break;
        }
        now += int(&mut u, 0, 3_000);
        let which = byte(&mut u) as usize % POOL.len();
        let h = pool_hash(which);
        // The answer that may stand in for a failing IdP must survive the
        // markers of a refresh (claim, fail, release), whatever they meet.
        let stand_in = cache.lookup_stale(&h, now).expect("store");
        let op = byte(&mut u) % 7;
        // Active answers of other tokens, which nothing but another active answer may evict.
        let others = |now| {
            (0..POOL.len())
                .filter(|&o| o != which)
                .filter(|&o| {
                    matches!(cache.lookup(&pool_hash(o), now).expect("store"), Lookup::Hit { answer: Answer::Active(_), .. })
                })
                .count()
        };
        let others_before = others(now);
        let mut stored_active = false;
        match op {
            0 => {
                cache.lookup(&h, now).expect("memory store");
            }
            1 => {
                let until = now + int(&mut u, 1, 5_000);
                match cache.claim(&h, now, until).expect("memory store") {
                    // No marker where it would have evicted an answer.
                    Claim::Owner => assert!(matches!(
                        cache.lookup(&h, now).expect("store"),
                        Lookup::Pending | Lookup::Miss | Lookup::Failed { .. }
                    )),
                    Claim::Pending => assert_eq!(cache.lookup(&h, now).expect("store"), Lookup::Pending),
                    Claim::Hit { answer, until_ms } => {
                        assert!(until_ms > now);
                        assert_eq!(cache.lookup(&h, now).expect("store"), Lookup::Hit { answer, until_ms });
                    }
                }
            }
            2 => {
                let a = answer(&mut u);
                let until = now + int(&mut u, 1, 5_000);
                let stale_until = if byte(&mut u) % 2 == 0 { 0 } else { until + int(&mut u, 0, 5_000) };
                stored_active = matches!(a, Answer::Active(_));
                if cache.store_answer(&h, &a, until, stale_until, now).expect("memory store") == Stored::Cached {
                    assert_eq!(cache.lookup(&h, now).expect("store"), Lookup::Hit { answer: a.clone(), until_ms: until });
                    let later = until + int(&mut u, 0, 6_000);
                    let expected = (stale_until > later).then_some(a);
                    assert_eq!(cache.lookup_stale(&h, later).expect("store"), expected, "stand-in at {later}");
                } else {
                    assert_ne!(cache.lookup(&h, now).expect("store"), Lookup::Pending, "an uncacheable answer leaves no marker");
                }
            }
            3 => {
                let before = cache.lookup(&h, now).expect("store");
                cache.fail(&h, now).expect("memory store");
                let after = cache.lookup(&h, now).expect("store");
                if matches!(before, Lookup::Hit { .. }) {
                    assert_eq!(after, before, "a failure never replaces an answer");
                } else if after != (Lookup::Failed { at_ms: now }) {
                    // Left alone only for a live answer (in a bucket some other
                    // writer left with duplicates), or in a bucket full of entries
                    // that outrank a failure.
                    let index = u64::from_be_bytes(h[..8].try_into().expect("8 bytes")) % buckets;
                    let full = store.get(&key(index)).expect("store").is_some_and(|v| {
                        matches!(serde_json::from_slice::<Value>(&v.value), Ok(Value::Array(s)) if s.len() >= SLOTS)
                    });
                    assert!(before != Lookup::Miss || full, "a failure is not recorded");
                }
            }
            4 => {
                cache.release(&h, now).expect("memory store");
                assert_ne!(cache.lookup(&h, now).expect("store"), Lookup::Pending);
            }
            5 => {
                // Without writes a stand-in only ever goes away.
                let later = now + int(&mut u, 0, 10_000);
                let then = cache.lookup_stale(&h, later).expect("store");
                if then.is_some() {
                    assert_eq!(then, stand_in, "a stand-in appeared from nowhere");
                }
            }
            _ => {
                let until = now + int(&mut u, 0, 2_000);
                local.insert(h, Rc::new(answer(&mut u)), until, now);
                if let Some(entry) = local.get(&h, now) {
                    assert!(entry.until_ms > now);
                }
            }
        }
        if !stored_active && op != 6 {
            assert!(others(now) >= others_before, "op {op} evicted another token's active answer");
        }
        if matches!(op, 1 | 3 | 4) {
            if let Some(before) = stand_in {
                assert_eq!(cache.lookup_stale(&h, now).expect("store"), Some(before), "op {op} lost the stand-in");
            }
        }
        // Whatever was there, every bucket we rewrote is a bounded list of slots.
        for (i, before) in initial.iter().enumerate() {
            let Some(v) = store.get(&key(i as u64)).expect("store") else { continue };
            if before.as_deref() != Some(v.value.as_slice()) {
                match serde_json::from_slice::<Value>(&v.value) {
                    Ok(Value::Array(slots)) => assert!(slots.len() <= SLOTS, "{} slots", slots.len()),
                    other => panic!("a rewritten bucket is not a list: {other:?}"),
                }
            }
        }
    }
    assert!(store.key_count() as u64 <= buckets, "a key outside the buckets");
});
