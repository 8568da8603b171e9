//! Cluster sync: etcd's JSON-gateway answers (`parse_lease`, `parse_txn`,
//! `parse_range`), applying the changes a range read yields to the denylist,
//! and the outbox record in shared data.
#![no_main]
use fuzzkit::{byte, int};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use tokengate::cluster_sync::{self, outbox_peek, outbox_push, outbox_remove, parse_lease, parse_range, parse_txn};
use tokengate::config;
use tokengate::denylist::{Change, Denylist};
use tokengate::store::{Guard, MemoryStore, Store, KEY_PREFIX};

const PREFIX: &str = "tokengate/";
const NOW: u64 = 1_800_000_000;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let min_rev = int(&mut u, 0, 1 << 40) as i64;
    let mode = byte(&mut u);
    let body = u.take_rest();
    if let Ok(lease) = parse_lease(body) {
        assert!(lease_id_in(body, lease), "parse_lease returned {lease}, which the answer's ID does not say");
    }
    if parse_txn(body).is_ok() {
        let v: serde_json::Value = serde_json::from_slice(body).expect("parse_txn accepted it, so it is JSON");
        assert!(v.get("header").is_some(), "a txn answer without a header counted as success");
        assert_ne!(v.get("succeeded"), Some(&serde_json::Value::Bool(false)), "a failed txn counted as success");
    }
    if let Ok(page) = parse_range(body, PREFIX, min_rev) {
        let store = MemoryStore::new();
        let limits = config::Denylist { max_tokens: 64, max_principals: 8, ..Default::default() };
        let list = Denylist::new(&store, &limits);
        let applied = list.apply(&page.changes, NOW).expect("memory store");
        assert!(applied <= page.changes.len());
        assert_eq!(list.apply(&page.changes, NOW).expect("memory store"), 0, "applying twice changes nothing");
        let ttl = cluster_sync::lease_ttl_s(&page.changes, NOW);
        assert!(ttl >= 1, "a lease of 0 s would expire the records at once");
        // Twice over: a batch that names an id more than once, as the outbox can hold.
        let doubled: Vec<Change> = page.changes.iter().chain(page.changes.iter().rev()).cloned().collect();
        check_txns(&doubled);
        // The outbox keeps what it is given, up to its bound.
        let outbox = MemoryStore::new();
        if mode % 2 == 0 {
            // Whatever an older module left there.
            let _ = outbox.set(&format!("{KEY_PREFIX}sync.outbox"), body, Guard::Absent);
        }
        let max = usize::from(mode % 16) + 1;
        let dropped = outbox_push(&outbox, &page.changes, max).expect("memory store");
        assert!(dropped <= page.changes.len());
        let queued: Vec<Change> = outbox_peek(&outbox, max).expect("memory store");
        assert!(queued.len() <= max);
        outbox_remove(&outbox, &queued).expect("memory store");
        let rest = outbox_peek(&outbox, max).expect("memory store");
        assert!(rest.iter().all(|c| !queued.contains(c)));
    }
});

/// Whether the answer's `ID` (a string, as etcd's gateway writes int64, or a number) is `lease`.
fn lease_id_in(body: &[u8], lease: i64) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return false };
    match v.get("ID") {
        Some(serde_json::Value::String(s)) => s.parse::<i64>() == Ok(lease),
        Some(serde_json::Value::Number(n)) => n.as_i64() == Some(lease),
        _ => false,
    }
}

/// What the writer sends etcd: no transaction names a key twice (etcd refuses
/// it: the bug fixed in 3df926a), no transaction is over MAX_TXN_OPS, every
/// id of the batch is written once, as its last change says.
fn check_txns(changes: &[Change]) {
    let bodies = cluster_sync::txns(PREFIX, changes, 7);
    let mut written = std::collections::HashMap::new();
    for body in &bodies {
        let txn: serde_json::Value = serde_json::from_str(body).expect("txns writes JSON");
        let ops = txn["success"].as_array().expect("txns writes a success branch");
        assert!(!ops.is_empty() && ops.len() <= cluster_sync::MAX_TXN_OPS, "{} ops in one txn", ops.len());
        let mut keys = std::collections::HashSet::new();
        for op in ops {
            let (kind, inner) = op.as_object().and_then(|o| o.iter().next()).expect("one op per entry");
            let key = inner["key"].as_str().expect("every op names its key");
            assert!(keys.insert(key.to_string()), "a transaction names key {key} twice: etcd refuses it");
            if kind == "requestPut" {
                assert_eq!(inner["lease"], "7", "every put carries the batch's lease");
                *written.entry(key.to_string()).or_insert(0) += 1;
            }
        }
    }
    let latest = cluster_sync::latest_per_id(changes);
    assert_eq!(written.len(), latest.len(), "one put per id of the batch");
    assert!(written.values().all(|n| *n == 1), "an id written twice");
}
