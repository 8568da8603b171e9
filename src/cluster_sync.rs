//! Cluster-wide revocation through etcd's v3 JSON gateway, so that a
//! revocation taken by one Envoy reaches every Envoy, and an Envoy that
//! restarts loads what was revoked.
//!
//! etcd layout under `prefix`:
//! - `{prefix}revoked/{id}` → the revocation record (JSON), on a lease that
//!   ends with the record;
//! - `{prefix}undone/{id}`  → `{"id", "undone_at"}`, a tombstone that tells
//!   pollers to drop the record (a range read does not show deletions).
//!
//! One root context per Envoy process leads (a lease in shared data taken
//! with CAS) and polls changes since the last revision it applied. Writes
//! that could not reach etcd wait in a bounded outbox in shared data, which
//! the leader flushes. This module has the pure parts; `etcd` sends the
//! callouts (over `host::Host`).

use crate::denylist::{Change, Record};
use crate::store::{shared_key, update, Store, StoreError};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

const LEADER_KEY: &str = shared_key!("sync.leader");
const REVISION_KEY: &str = shared_key!("sync.revision");
const OUTBOX_KEY: &str = shared_key!("sync.outbox");
const LAST_SYNC_KEY: &str = shared_key!("sync.last_ok");
const LOADED_KEY: &str = shared_key!("sync.loaded");
/// "{unix ms the wait began} {1 once initial_sync_timeout_s gave up, else 0}".
const WAIT_KEY: &str = shared_key!("sync.initial_wait");
/// etcd refuses a transaction with more operations than this (--max-txn-ops).
pub const MAX_TXN_OPS: usize = 128;
/// Keys one range read returns; a page always advances because one
/// transaction of ours writes fewer keys than this.
pub const RANGE_LIMIT: usize = 1000;
/// How long an un-revoke tombstone lives in etcd.
pub const TOMBSTONE_TTL_S: u64 = 3600;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncError {
    /// etcd answered something that is not what its gateway sends.
    BadAnswer(&'static str),
}

fn revoked_key(prefix: &str, id: &str) -> String {
    format!("{prefix}revoked/{id}")
}

fn undone_key(prefix: &str, id: &str) -> String {
    format!("{prefix}undone/{id}")
}

/// `POST /v3/lease/grant`
pub fn lease_grant(ttl_s: u64) -> String {
    json!({"TTL": ttl_s.max(1)}).to_string()
}

/// The lease id of a grant answer.
pub fn parse_lease(body: &[u8]) -> Result<i64, SyncError> {
    let v: Value = serde_json::from_slice(body).map_err(|_| SyncError::BadAnswer("lease answer is not JSON"))?;
    int64(v.get("ID")).ok_or(SyncError::BadAnswer("lease answer has no ID"))
}

/// The lease a batch of changes needs: as long as its longest record.
pub fn lease_ttl_s(changes: &[Change], now: u64) -> u64 {
    changes
        .iter()
        .map(|c| match c {
            Change::Revoked(r) => r.expires_at.saturating_sub(now),
            Change::Undone { .. } => TOMBSTONE_TTL_S,
        })
        .max()
        .unwrap_or(1)
        .max(1)
}

/// The last change of each id, in the order the ids first appear: etcd
/// refuses a transaction that names one key twice.
pub fn latest_per_id(changes: &[Change]) -> Vec<&Change> {
    let mut order: Vec<&str> = Vec::new();
    let mut latest: std::collections::HashMap<&str, &Change> = std::collections::HashMap::new();
    for change in changes {
        if latest.insert(change.id(), change).is_none() {
            order.push(change.id());
        }
    }
    order.iter().filter_map(|id| latest.get(id).copied()).collect()
}

/// `POST /v3/kv/txn` bodies writing `changes`, at most `MAX_TXN_OPS` each.
/// Each id ends in exactly one state: a record without a tombstone, or a
/// tombstone without a record.
pub fn txns(prefix: &str, changes: &[Change], lease: i64) -> Vec<String> {
    let mut ops = Vec::new();
    for change in latest_per_id(changes) {
        match change {
            Change::Revoked(r) => {
                let value = serde_json::to_vec(r).unwrap_or_default();
                ops.push(json!({"requestDeleteRange": {"key": B64.encode(undone_key(prefix, &r.id))}}));
                ops.push(json!({"requestPut": {
                    "key": B64.encode(revoked_key(prefix, &r.id)),
                    "value": B64.encode(value),
                    "lease": lease.to_string(),
                }}));
            }
            Change::Undone { id, undone_at } => {
                ops.push(json!({"requestDeleteRange": {"key": B64.encode(revoked_key(prefix, id))}}));
                let tombstone = json!({"id": id, "undone_at": undone_at}).to_string();
                ops.push(json!({"requestPut": {
                    "key": B64.encode(undone_key(prefix, id)),
                    "value": B64.encode(tombstone),
                    "lease": lease.to_string(),
                }}));
            }
        }
    }
    ops.chunks(MAX_TXN_OPS).map(|chunk| json!({"success": chunk}).to_string()).collect()
}

/// Whether a txn answer reports success.
pub fn parse_txn(body: &[u8]) -> Result<(), SyncError> {
    let v: Value = serde_json::from_slice(body).map_err(|_| SyncError::BadAnswer("txn answer is not JSON"))?;
    // A txn without compares runs its success branch; the gateway omits false.
    match v.get("succeeded") {
        Some(Value::Bool(true)) | None if v.get("header").is_some() => Ok(()),
        _ => Err(SyncError::BadAnswer("txn did not succeed")),
    }
}

/// `POST /v3/kv/range` for every key under `prefix` modified at or after
/// `min_mod_revision`, oldest first.
pub fn range(prefix: &str, min_mod_revision: i64) -> String {
    json!({
        "key": B64.encode(prefix),
        "range_end": B64.encode(prefix_end(prefix)),
        "min_mod_revision": min_mod_revision.to_string(),
        "sort_order": "ASCEND",
        "sort_target": "MOD",
        "limit": RANGE_LIMIT.to_string(),
    })
    .to_string()
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// One page of a range read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub changes: Vec<Change>,
    /// Where the next read starts.
    pub next_min_revision: i64,
    /// Whether more keys wait (read again at once).
    pub more: bool,
}

#[derive(Deserialize)]
struct Tombstone {
    id: String,
    undone_at: u64,
}

/// Parses a range answer. Keys that do not decode are skipped (and logged):
/// one bad key must not stop the others from syncing.
pub fn parse_range(body: &[u8], prefix: &str, min_mod_revision: i64) -> Result<Page, SyncError> {
    let v: Value = serde_json::from_slice(body).map_err(|_| SyncError::BadAnswer("range answer is not JSON"))?;
    let revision = v
        .get("header")
        .and_then(|h| int64(h.get("revision")))
        .ok_or(SyncError::BadAnswer("range answer has no header.revision"))?;
    let more = matches!(v.get("more"), Some(Value::Bool(true)));
    let mut changes = Vec::new();
    let mut last_mod = min_mod_revision;
    for kv in v.get("kvs").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
        last_mod = last_mod.max(int64(kv.get("mod_revision")).unwrap_or(0));
        let key = kv.get("key").and_then(Value::as_str).and_then(|k| B64.decode(k).ok()).unwrap_or_default();
        let value = kv.get("value").and_then(Value::as_str).and_then(|k| B64.decode(k).ok()).unwrap_or_default();
        let key = String::from_utf8_lossy(&key);
        let change = if key.starts_with(&format!("{prefix}revoked/")) {
            serde_json::from_slice::<Record>(&value).ok().map(Change::Revoked)
        } else if key.starts_with(&format!("{prefix}undone/")) {
            serde_json::from_slice::<Tombstone>(&value)
                .ok()
                .map(|t| Change::Undone { id: t.id, undone_at: t.undone_at })
        } else {
            None
        };
        match change {
            Some(c) => changes.push(c),
            None => log::warn!("cluster sync: skipping an unreadable etcd key"),
        }
    }
    // While more keys wait, re-read from the last revision seen (a txn's keys
    // share one); once done, continue after the snapshot.
    let next_min_revision = if more { last_mod } else { revision.saturating_add(1) };
    Ok(Page { changes, next_min_revision, more })
}

/// etcd's gateway writes int64 as strings; accept numbers too.
fn int64(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// Takes or renews the process-wide poller lease for `me`. True if `me`
/// leads until `now_ms + lease_ms`.
pub fn try_lead<S: Store + ?Sized>(store: &S, me: &str, now_ms: u64, lease_ms: u64) -> Result<bool, StoreError> {
    let mut leads = false;
    update(store, LEADER_KEY, |current| {
        let holder = current.and_then(|c| std::str::from_utf8(c).ok()).and_then(|c| c.split_once(' '));
        leads = match holder {
            Some((who, until)) => who == me || until.parse::<u64>().map_or(true, |u| u <= now_ms),
            None => true,
        };
        leads.then(|| format!("{me} {}", now_ms + lease_ms).into_bytes())
    })?;
    Ok(leads)
}

/// Where the next poll starts (0 before the first full load).
pub fn next_revision<S: Store + ?Sized>(store: &S) -> Result<i64, StoreError> {
    Ok(store
        .get(REVISION_KEY)?
        .and_then(|v| std::str::from_utf8(&v.value).ok().and_then(|s| s.parse().ok()))
        .unwrap_or(0))
}

pub fn set_next_revision<S: Store + ?Sized>(store: &S, revision: i64, now_ms: u64) -> Result<(), StoreError> {
    update(store, REVISION_KEY, |_| Some(revision.to_string().into_bytes()))?;
    update(store, LAST_SYNC_KEY, |_| Some(now_ms.to_string().into_bytes()))?;
    Ok(())
}

/// Marks the first complete read of etcd done: from now on this process's
/// denylist holds every revocation made before it started.
pub fn mark_loaded<S: Store + ?Sized>(store: &S) -> Result<(), StoreError> {
    update(store, LOADED_KEY, |current| current.is_none().then(|| b"1".to_vec()))?;
    Ok(())
}

pub fn is_loaded<S: Store + ?Sized>(store: &S) -> bool {
    store.get(LOADED_KEY).ok().flatten().is_some_and(|v| v.value == b"1")
}

/// How long this process has gone without a complete read of etcd (0 once
/// loaded), and whether this call is the one that gave up waiting because
/// `bound_ms` (0: never) passed.
pub fn note_initial_wait<S: Store + ?Sized>(store: &S, now_ms: u64, bound_ms: u64) -> Result<(u64, bool), StoreError> {
    if is_loaded(store) {
        return Ok((0, false));
    }
    let (mut started, mut gave_up_now) = (now_ms, false);
    update(store, WAIT_KEY, |current| {
        let (since, abandoned) = parse_wait(current).unwrap_or((now_ms, false));
        started = since;
        gave_up_now = !abandoned && bound_ms > 0 && now_ms.saturating_sub(since) >= bound_ms;
        (current.is_none() || gave_up_now)
            .then(|| format!("{since} {}", u8::from(abandoned || gave_up_now)).into_bytes())
    })?;
    Ok((now_ms.saturating_sub(started), gave_up_now))
}

/// Whether `initial_sync_timeout_s` passed before the first complete read.
pub fn initial_wait_abandoned<S: Store + ?Sized>(store: &S) -> bool {
    let value = store.get(WAIT_KEY).ok().flatten();
    parse_wait(value.as_ref().map(|v| v.value.as_slice())).is_some_and(|(_, abandoned)| abandoned)
}

fn parse_wait(bytes: Option<&[u8]>) -> Option<(u64, bool)> {
    let (since, abandoned) = std::str::from_utf8(bytes?).ok()?.split_once(' ')?;
    Some((since.parse().ok()?, abandoned == "1"))
}

/// How many changes wait in the outbox.
pub fn outbox_len<S: Store + ?Sized>(store: &S) -> usize {
    let value = store.get(OUTBOX_KEY).ok().flatten();
    read_outbox(value.as_ref().map(|v| v.value.as_slice())).changes.len()
}

/// When the last poll succeeded (unix ms; 0: never), for the lag metric.
pub fn last_sync_ms<S: Store + ?Sized>(store: &S) -> u64 {
    store
        .get(LAST_SYNC_KEY)
        .ok()
        .flatten()
        .and_then(|v| std::str::from_utf8(&v.value).ok().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Outbox {
    changes: Vec<Change>,
}

fn read_outbox(bytes: Option<&[u8]>) -> Outbox {
    bytes.and_then(|b| serde_json::from_slice(b).ok()).unwrap_or_default()
}

/// Queues changes etcd has not taken yet. Returns how many were dropped
/// because the outbox holds `max` already.
pub fn outbox_push<S: Store + ?Sized>(store: &S, changes: &[Change], max: usize) -> Result<usize, StoreError> {
    let mut dropped = 0;
    update(store, OUTBOX_KEY, |current| {
        let mut outbox = read_outbox(current);
        let room = max.saturating_sub(outbox.changes.len());
        dropped = changes.len().saturating_sub(room);
        outbox.changes.extend(changes.iter().take(room).cloned());
        serde_json::to_vec(&outbox).ok()
    })?;
    Ok(dropped)
}

/// The oldest `n` queued changes.
pub fn outbox_peek<S: Store + ?Sized>(store: &S, n: usize) -> Result<Vec<Change>, StoreError> {
    let value = store.get(OUTBOX_KEY)?;
    let outbox = read_outbox(value.as_ref().map(|v| v.value.as_slice()));
    Ok(outbox.changes.into_iter().take(n).collect())
}

/// Removes changes etcd has taken.
pub fn outbox_remove<S: Store + ?Sized>(store: &S, sent: &[Change]) -> Result<(), StoreError> {
    update(store, OUTBOX_KEY, |current| {
        let mut outbox = read_outbox(current);
        let before = outbox.changes.len();
        outbox.changes.retain(|c| !sent.contains(c));
        (outbox.changes.len() != before).then(|| serde_json::to_vec(&outbox).unwrap_or_default())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denylist::Kind;
    use crate::store::MemoryStore;

    fn record(id: &str) -> Record {
        Record { id: id.into(), kind: Kind::Client, revoked_at: 10, expires_at: 100, reason: "r".into() }
    }

    fn kv(key: &str, value: &str, rev: i64) -> Value {
        json!({"key": B64.encode(key), "value": B64.encode(value), "mod_revision": rev.to_string()})
    }

    #[test]
    fn txns_put_records_and_tombstones_in_chunks() {
        let changes: Vec<Change> = (0..200).map(|i| Change::Revoked(record(&format!("client:{i}")))).collect();
        let bodies = txns("tg/", &changes, 42);
        assert_eq!(bodies.len(), 4);
        let first: Value = serde_json::from_str(&bodies[0]).unwrap();
        assert_eq!(
            B64.decode(first["success"][0]["requestDeleteRange"]["key"].as_str().unwrap()).unwrap(),
            b"tg/undone/client:0"
        );
        let op = &first["success"][1]["requestPut"];
        assert_eq!(B64.decode(op["key"].as_str().unwrap()).unwrap(), b"tg/revoked/client:0");
        assert_eq!(op["lease"], "42");
        let undo = txns("tg/", &[Change::Undone { id: "sub:a".into(), undone_at: 5 }], 1);
        let undo: Value = serde_json::from_str(&undo[0]).unwrap();
        assert_eq!(
            B64.decode(undo["success"][0]["requestDeleteRange"]["key"].as_str().unwrap()).unwrap(),
            b"tg/revoked/sub:a"
        );
        assert_eq!(B64.decode(undo["success"][1]["requestPut"]["key"].as_str().unwrap()).unwrap(), b"tg/undone/sub:a");
    }

    #[test]
    fn one_id_is_written_once_per_transaction() {
        let revoke = Change::Revoked(record("client:a"));
        let undo = Change::Undone { id: "client:a".into(), undone_at: 11 };
        let other = Change::Revoked(record("client:b"));
        let changes = [revoke.clone(), other.clone(), undo.clone(), revoke.clone()];
        assert_eq!(latest_per_id(&changes), vec![&revoke, &other]);
        let body: Value = serde_json::from_str(&txns("tg/", &changes, 1)[0]).unwrap();
        let keys: Vec<Vec<u8>> = body["success"]
            .as_array()
            .unwrap()
            .iter()
            .map(|op| {
                let inner = op.get("requestPut").or_else(|| op.get("requestDeleteRange")).unwrap();
                B64.decode(inner["key"].as_str().unwrap()).unwrap()
            })
            .collect();
        let unique: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len(), "etcd refuses a key named twice in one txn");
    }

    #[test]
    fn a_batch_written_again_ends_as_written_once() {
        // The outbox re-sends a write whose admin client left, which etcd may have taken.
        let mut principal = record("sub:b");
        principal.kind = Kind::Subject;
        let batch = [Change::Revoked(record("client:a")), Change::Undone { id: "sub:b".into(), undone_at: 11 }];
        let without_lease = |lease: i64| txns("tg/", &batch, lease).join("\n").replace(&format!("\"{lease}\""), "L");
        assert!(without_lease(7).contains(r#""lease":L"#));
        assert_eq!(without_lease(7), without_lease(8), "the same keys and values, on another lease");

        let s = MemoryStore::new();
        let limits = crate::config::Denylist::default();
        let list = crate::denylist::Denylist::new(&s, &limits);
        list.apply(&[Change::Revoked(principal)], 20).unwrap();
        assert_eq!(list.apply(&batch, 20).unwrap(), 2);
        let once = list.list(20).unwrap();
        assert_eq!(list.apply(&batch, 20).unwrap(), 0, "a poller reading it again applies nothing");
        assert_eq!(list.list(20).unwrap(), once);
    }

    #[test]
    fn range_reads_the_prefix_from_a_revision() {
        let body: Value = serde_json::from_str(&range("tg/", 7)).unwrap();
        assert_eq!(B64.decode(body["key"].as_str().unwrap()).unwrap(), b"tg/");
        assert_eq!(B64.decode(body["range_end"].as_str().unwrap()).unwrap(), b"tg0");
        assert_eq!(body["min_mod_revision"], "7");
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80");
    }

    #[test]
    fn range_answer_becomes_changes() {
        let r = serde_json::to_string(&record("client:a")).unwrap();
        let answer = json!({
            "header": {"revision": "20"},
            "kvs": [kv("tg/revoked/client:a", &r, 12), kv("tg/undone/sub:b", r#"{"id":"sub:b","undone_at":9}"#, 15),
                    kv("tg/other", "x", 16), kv("tg/revoked/bad", "not json", 17)],
        });
        let page = parse_range(answer.to_string().as_bytes(), "tg/", 10).unwrap();
        assert_eq!(
            page.changes,
            vec![Change::Revoked(record("client:a")), Change::Undone { id: "sub:b".into(), undone_at: 9 },]
        );
        assert_eq!((page.next_min_revision, page.more), (21, false));
        let more = json!({"header": {"revision": "20"}, "kvs": [kv("tg/revoked/client:a", &r, 12)], "more": true});
        let page = parse_range(more.to_string().as_bytes(), "tg/", 10).unwrap();
        assert_eq!((page.next_min_revision, page.more), (12, true));
        let empty = json!({"header": {"revision": 30}});
        assert_eq!(parse_range(empty.to_string().as_bytes(), "tg/", 10).unwrap().next_min_revision, 31);
        assert!(parse_range(b"<html>", "tg/", 1).is_err());
        assert!(parse_range(b"{}", "tg/", 1).is_err());
    }

    #[test]
    fn lease_and_txn_answers() {
        assert_eq!(parse_lease(br#"{"header":{},"ID":"7587","TTL":"60"}"#), Ok(7587));
        assert!(parse_lease(b"{}").is_err());
        assert_eq!(parse_txn(br#"{"header":{"revision":"3"},"succeeded":true}"#), Ok(()));
        assert!(parse_txn(br#"{"error":"etcdserver: too many operations in txn request","code":3}"#).is_err());
        let changes = [Change::Revoked(record("client:a")), Change::Undone { id: "x".into(), undone_at: 1 }];
        assert_eq!(lease_ttl_s(&changes, 50), TOMBSTONE_TTL_S);
        assert_eq!(lease_ttl_s(&changes[..1], 50), 50);
        assert_eq!(lease_ttl_s(&changes[..1], 500), 1);
    }

    #[test]
    fn one_leader_at_a_time_until_its_lease_ends() {
        let s = MemoryStore::new();
        assert!(try_lead(&s, "a", 0, 1000).unwrap());
        assert!(!try_lead(&s, "b", 500, 1000).unwrap());
        assert!(try_lead(&s, "a", 900, 1000).unwrap(), "renewal");
        assert!(!try_lead(&s, "b", 1800, 1000).unwrap());
        assert!(try_lead(&s, "b", 1900, 1000).unwrap(), "takeover after the lease ends");
    }

    #[test]
    fn outbox_is_bounded_and_drains() {
        let s = MemoryStore::new();
        let c = |i: u64| Change::Undone { id: format!("sub:{i}"), undone_at: i };
        assert_eq!(outbox_push(&s, &[c(1), c(2)], 3).unwrap(), 0);
        assert_eq!(outbox_push(&s, &[c(3), c(4)], 3).unwrap(), 1);
        assert_eq!(outbox_peek(&s, 2).unwrap(), vec![c(1), c(2)]);
        outbox_remove(&s, &[c(1), c(2)]).unwrap();
        assert_eq!(outbox_peek(&s, 10).unwrap(), vec![c(3)]);
    }

    #[test]
    fn revision_bookkeeping() {
        let s = MemoryStore::new();
        assert_eq!(next_revision(&s).unwrap(), 0);
        assert!(!is_loaded(&s));
        mark_loaded(&s).unwrap();
        mark_loaded(&s).unwrap();
        assert!(is_loaded(&s));
    }

    #[test]
    fn the_initial_wait_is_measured_and_given_up_once_after_its_bound() {
        let s = MemoryStore::new();
        assert_eq!(note_initial_wait(&s, 1_000, 5_000).unwrap(), (0, false), "the wait starts");
        assert_eq!(note_initial_wait(&s, 4_000, 5_000).unwrap(), (3_000, false));
        assert!(!initial_wait_abandoned(&s));
        assert_eq!(note_initial_wait(&s, 6_000, 5_000).unwrap(), (5_000, true), "the bound passed: given up once");
        assert_eq!(
            note_initial_wait(&s, 7_000, 5_000).unwrap(),
            (6_000, false),
            "still not loaded, not given up again"
        );
        assert!(initial_wait_abandoned(&s));
        mark_loaded(&s).unwrap();
        assert_eq!(note_initial_wait(&s, 8_000, 5_000).unwrap(), (0, false), "loaded: nothing waits");

        let forever = MemoryStore::new();
        note_initial_wait(&forever, 0, 0).unwrap();
        assert_eq!(note_initial_wait(&forever, 86_400_000, 0).unwrap(), (86_400_000, false), "0 never gives up");
        assert!(!initial_wait_abandoned(&forever));
        set_next_revision(&s, 21, 5).unwrap();
        assert_eq!(next_revision(&s).unwrap(), 21);
        assert_eq!(last_sync_ms(&s), 5);
    }
}
