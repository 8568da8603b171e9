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
use tokengate::store::{Guard, MemoryStore, Store};

const PREFIX: &str = "tokengate/";
const NOW: u64 = 1_800_000_000;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let min_rev = int(&mut u, 0, 1 << 40) as i64;
    let mode = byte(&mut u);
    let body = u.take_rest();
    let _ = parse_lease(body);
    let _ = parse_txn(body);
    if let Ok(page) = parse_range(body, PREFIX, min_rev) {
        let store = MemoryStore::new();
        let limits = config::Denylist { max_tokens: 64, max_principals: 8, ..Default::default() };
        let list = Denylist::new(&store, &limits);
        let applied = list.apply(&page.changes, NOW).expect("memory store");
        assert!(applied <= page.changes.len());
        assert_eq!(list.apply(&page.changes, NOW).expect("memory store"), 0, "applying twice changes nothing");
        let _ = cluster_sync::lease_ttl_s(&page.changes, NOW);
        let _ = cluster_sync::txns(PREFIX, &page.changes, 7);
        // The outbox keeps what it is given, up to its bound.
        let outbox = MemoryStore::new();
        if mode % 2 == 0 {
            // Whatever an older module left there.
            let _ = outbox.set("tokengate.sync.outbox", body, Guard::Absent);
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
