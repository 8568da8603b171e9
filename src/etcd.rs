//! The callouts of cluster sync: writing changes to etcd (from the admin
//! request that made them, or from the outbox) and the process's poller.
//! What to send and how to read the answers is in `cluster_sync`.

use crate::cluster_sync::{self, Page};
use crate::config::ClusterSync;
use crate::denylist::{Change, Denylist};
use crate::host::Host;
use crate::metrics::Metrics;
use crate::store::Store;
use std::collections::HashSet;
use std::time::Duration;

/// Answers larger than this are refused (a range page is ~1000 records).
const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;

fn post(host: &dyn Host, cfg: &ClusterSync, path: &str, body: &str) -> Option<u32> {
    let headers = [
        (":method", "POST"),
        (":path", path),
        (":authority", cfg.authority.as_str()),
        ("content-type", "application/json"),
    ];
    let timeout = Duration::from_millis(cfg.timeout_ms);
    match host.dispatch(&cfg.cluster, &headers, body.as_bytes(), timeout) {
        Ok(id) => Some(id),
        Err(status) => {
            log::warn!("cluster sync: cannot call etcd (cluster {:?}): {status:?}", cfg.cluster);
            None
        }
    }
}

/// The body of a 200 answer to the current callout, or `None`.
fn answer(host: &dyn Host, num_headers: usize, body_size: usize) -> Option<Vec<u8>> {
    if body_size > MAX_ANSWER_BYTES || host.callout_status(num_headers) != Some(200) {
        return None;
    }
    Some(host.callout_body(body_size))
}

/// etcd refused the request itself (4xx): sending it again cannot help.
fn refused(host: &dyn Host, num_headers: usize) -> bool {
    host.callout_status(num_headers).is_some_and(|s| (400..500).contains(&s))
}

/// Writing a batch of changes: a lease grant, then the transactions.
pub struct EtcdWrite {
    pub changes: Vec<Change>,
    stage: Stage,
}

enum Stage {
    Granting(u32),
    Writing { pending: HashSet<u32>, failed: bool, refused: bool },
}

/// How a write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Ok,
    /// etcd was unreachable or failed: worth another try.
    Failed,
    /// etcd refused the request: another try would be refused too.
    Refused,
}

impl EtcdWrite {
    /// Starts the write, or `None` if the first call could not be sent.
    pub fn start(host: &dyn Host, cfg: &ClusterSync, changes: Vec<Change>, now_s: u64) -> Option<EtcdWrite> {
        let grant = cluster_sync::lease_grant(cluster_sync::lease_ttl_s(&changes, now_s));
        let id = post(host, cfg, "/v3/lease/grant", &grant)?;
        Some(EtcdWrite { changes, stage: Stage::Granting(id) })
    }

    pub fn owns(&self, token_id: u32) -> bool {
        match &self.stage {
            Stage::Granting(id) => *id == token_id,
            Stage::Writing { pending, .. } => pending.contains(&token_id),
        }
    }

    /// Handles one answer; `Some` once the write is over.
    pub fn on_response(
        &mut self,
        host: &dyn Host,
        cfg: &ClusterSync,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
    ) -> Option<Written> {
        let body = answer(host, num_headers, body_size);
        match &mut self.stage {
            Stage::Granting(_) => {
                let Some(lease) = body.and_then(|b| cluster_sync::parse_lease(&b).ok()) else {
                    return Some(if refused(host, num_headers) { Written::Refused } else { Written::Failed });
                };
                let mut pending = HashSet::new();
                for txn in cluster_sync::txns(&cfg.prefix, &self.changes, lease) {
                    match post(host, cfg, "/v3/kv/txn", &txn) {
                        Some(id) => {
                            pending.insert(id);
                        }
                        None => return Some(Written::Failed),
                    }
                }
                self.stage = Stage::Writing { pending, failed: false, refused: false };
                None
            }
            Stage::Writing { pending, failed, refused: was_refused } => {
                pending.remove(&token_id);
                if body.and_then(|b| cluster_sync::parse_txn(&b).ok()).is_none() {
                    *failed = true;
                    *was_refused |= refused(host, num_headers);
                }
                pending.is_empty().then_some(match (*failed, *was_refused) {
                    (false, _) => Written::Ok,
                    (true, true) => Written::Refused,
                    (true, false) => Written::Failed,
                })
            }
        }
    }
}

/// The process's poller and outbox flusher; one per root context, active
/// only while its root holds the leader lease.
pub struct Poller {
    me: String,
    poll: Option<(u32, u64)>,
    flush: Option<EtcdWrite>,
    next_poll_ms: u64,
}

/// What the poller works with: Envoy, shared data and the counters.
pub struct Io<'a> {
    pub host: &'a dyn Host,
    pub store: &'a dyn Store,
    pub metrics: &'a Metrics,
}

impl Poller {
    pub fn new(me: String) -> Poller {
        Poller { me, poll: None, flush: None, next_poll_ms: 0 }
    }

    pub fn owns(&self, token_id: u32) -> bool {
        self.poll.is_some_and(|(id, _)| id == token_id) || self.flush.as_ref().is_some_and(|f| f.owns(token_id))
    }

    pub fn tick(&mut self, io: &Io<'_>, cfg: &ClusterSync, now_ms: u64) {
        let lease_ms = cfg.poll_ms * 3 + cfg.timeout_ms;
        match cluster_sync::try_lead(io.store, &self.me, now_ms, lease_ms) {
            Ok(true) => {}
            _ => return,
        }
        let bound_ms = if cfg.require_initial_sync { cfg.initial_sync_timeout_s * 1000 } else { 0 };
        if let Ok((waited, gave_up)) = cluster_sync::note_initial_wait(io.store, now_ms, bound_ms) {
            io.metrics.sync_initial_wait_ms.record(waited);
            if gave_up {
                io.metrics.sync_initial_sync_timeouts.inc();
                log::warn!(
                    "cluster sync: no complete read of etcd in {} s (initial_sync_timeout_s): serving with the \
                     revocations known so far",
                    cfg.initial_sync_timeout_s
                );
            }
        }
        let last = cluster_sync::last_sync_ms(io.store);
        if last > 0 {
            io.metrics.sync_lag_ms.record(now_ms.saturating_sub(last));
        }
        io.metrics.sync_outbox.record(cluster_sync::outbox_len(io.store) as u64);
        // A callout Envoy never answered does not block the poller forever.
        if self.poll.is_some_and(|(_, deadline)| now_ms > deadline) {
            self.poll = None;
            io.metrics.sync_failures.inc();
        }
        if self.poll.is_none() && now_ms >= self.next_poll_ms {
            self.start_poll(io, cfg, now_ms);
        }
        if self.flush.is_none() {
            let batch = cluster_sync::outbox_peek(io.store, cluster_sync::MAX_TXN_OPS / 2).unwrap_or_default();
            if !batch.is_empty() {
                self.flush = EtcdWrite::start(io.host, cfg, batch, now_ms / 1000);
            }
        }
    }

    fn start_poll(&mut self, io: &Io<'_>, cfg: &ClusterSync, now_ms: u64) {
        let from = cluster_sync::next_revision(io.store).unwrap_or(0);
        match post(io.host, cfg, "/v3/kv/range", &cluster_sync::range(&cfg.prefix, from)) {
            Some(id) => self.poll = Some((id, now_ms + cfg.timeout_ms + 1000)),
            None => {
                io.metrics.sync_failures.inc();
                self.next_poll_ms = now_ms + cfg.poll_ms;
            }
        }
    }

    /// Handles an etcd answer to the poller or the flusher; `answer` is
    /// `(token_id, num_headers, body_size)` of the callout.
    pub fn on_response(
        &mut self,
        io: &Io<'_>,
        cfg: &ClusterSync,
        list: &Denylist<'_, dyn Store>,
        answer_of: (u32, usize, usize),
        now_ms: u64,
    ) {
        let (token_id, num_headers, body_size) = answer_of;
        if let Some(flush) = self.flush.as_mut().filter(|f| f.owns(token_id)) {
            if let Some(done) = flush.on_response(io.host, cfg, token_id, num_headers, body_size) {
                flushed(io, &flush.changes, done);
                self.flush = None;
            }
            return;
        }
        if self.poll.is_none_or(|(id, _)| id != token_id) {
            return;
        }
        self.poll = None;
        let from = cluster_sync::next_revision(io.store).unwrap_or(0);
        let page =
            answer(io.host, num_headers, body_size).and_then(|b| cluster_sync::parse_range(&b, &cfg.prefix, from).ok());
        match page.map(|page| self.apply(io, list, page, now_ms)) {
            Some(true) => self.start_poll(io, cfg, now_ms),
            Some(false) => self.next_poll_ms = now_ms + cfg.poll_ms,
            None => {
                io.metrics.sync_failures.inc();
                self.next_poll_ms = now_ms + cfg.poll_ms;
            }
        }
    }

    /// Applies a page read from etcd; true when more pages wait.
    fn apply(&mut self, io: &Io<'_>, list: &Denylist<'_, dyn Store>, page: Page, now_ms: u64) -> bool {
        let Page { changes, next_min_revision, more } = page;
        match list.apply(&changes, now_ms / 1000) {
            Ok(n) => io.metrics.sync_applied.add(n as u64),
            Err(e) => {
                // Not moving the revision on: the next poll tries again.
                log::error!("cluster sync: applying {} change(s) failed: {e:?}", changes.len());
                io.metrics.sync_failures.inc();
                return false;
            }
        }
        let _ = cluster_sync::set_next_revision(io.store, next_min_revision, now_ms);
        if !more {
            let _ = cluster_sync::mark_loaded(io.store);
        }
        io.metrics.sync_revision.record(u64::try_from(next_min_revision.saturating_sub(1)).unwrap_or(0));
        more
    }
}

/// What becomes of queued changes once their write is over.
fn flushed(io: &Io<'_>, changes: &[Change], done: Written) {
    match done {
        Written::Ok => {
            let _ = cluster_sync::outbox_remove(io.store, changes);
        }
        Written::Failed => {
            log::warn!("cluster sync: etcd did not take {} queued change(s); retrying", changes.len());
            io.metrics.sync_failures.inc();
        }
        Written::Refused => {
            // Retrying would block everything queued behind it.
            log::error!("cluster sync: etcd refused {} queued change(s); dropped", changes.len());
            io.metrics.sync_failures.inc();
            io.metrics.sync_dropped.add(changes.len() as u64);
            let _ = cluster_sync::outbox_remove(io.store, changes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denylist::{Kind, Record};
    use crate::host::fake::FakeHost;
    use crate::store::MemoryStore;
    use base64::Engine;
    use serde_json::{json, Value};

    const T0: u64 = 1_800_000_000_000;

    fn cfg() -> ClusterSync {
        serde_json::from_value(json!({"cluster": "etcd", "authority": "etcd", "prefix": "tg/", "poll_ms": 500}))
            .unwrap()
    }

    fn revoked(id: &str) -> Change {
        Change::Revoked(Record {
            id: id.into(),
            kind: Kind::Client,
            revoked_at: T0 / 1000,
            expires_at: T0 / 1000 + 60,
            reason: "r".into(),
        })
    }

    fn deliver(host: &FakeHost, write: &mut EtcdWrite, id: u32, status: u32, body: Value) -> Option<Written> {
        let (num_headers, body_size) = host.answer(Some(status), body.to_string().as_bytes());
        write.on_response(host, &cfg(), id, num_headers, body_size)
    }

    const TXN_OK: fn() -> Value = || json!({"header": {"revision": "9"}, "succeeded": true});

    #[test]
    fn a_write_grants_a_lease_then_sends_its_transactions() {
        let host = FakeHost::new(T0);
        let mut write = EtcdWrite::start(&host, &cfg(), vec![revoked("client:a")], T0 / 1000).unwrap();
        let grant = host.last_callout().unwrap();
        assert_eq!(grant.cluster, "etcd");
        assert!(grant.headers.contains(&(":path".into(), "/v3/lease/grant".into())));
        assert!(write.owns(grant.id));
        assert_eq!(deliver(&host, &mut write, grant.id, 200, json!({"ID": "77", "TTL": "60"})), None);
        let txn = host.last_callout().unwrap();
        assert!(txn.headers.contains(&(":path".into(), "/v3/kv/txn".into())));
        assert!(String::from_utf8_lossy(&txn.body).contains(r#""lease":"77""#));
        assert!(write.owns(txn.id) && !write.owns(grant.id));
        assert_eq!(deliver(&host, &mut write, txn.id, 200, TXN_OK()), Some(Written::Ok));
    }

    #[test]
    fn etcd_failing_is_worth_another_try_and_refusing_is_not() {
        let host = FakeHost::new(T0);
        let mut write = EtcdWrite::start(&host, &cfg(), vec![revoked("client:a")], T0 / 1000).unwrap();
        let id = host.last_callout().unwrap().id;
        assert_eq!(deliver(&host, &mut write, id, 503, json!({})), Some(Written::Failed));

        let mut write = EtcdWrite::start(&host, &cfg(), vec![revoked("client:a")], T0 / 1000).unwrap();
        let id = host.last_callout().unwrap().id;
        assert_eq!(deliver(&host, &mut write, id, 400, json!({"error": "bad"})), Some(Written::Refused));

        // A reset (no headers) mid-transaction fails the write.
        let mut write = EtcdWrite::start(&host, &cfg(), vec![revoked("client:a")], T0 / 1000).unwrap();
        let id = host.last_callout().unwrap().id;
        deliver(&host, &mut write, id, 200, json!({"ID": "5"}));
        let txn = host.last_callout().unwrap().id;
        assert_eq!(write.on_response(&host, &cfg(), txn, 0, 0), Some(Written::Failed));

        host.refuse_dispatch.set(true);
        assert!(EtcdWrite::start(&host, &cfg(), vec![revoked("client:a")], T0 / 1000).is_none());
    }

    fn range_answer(revision: i64, records: &[Change]) -> Value {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let kvs: Vec<Value> = records
            .iter()
            .map(|c| {
                let Change::Revoked(r) = c else { unreachable!() };
                json!({"key": b64(&format!("tg/revoked/{}", r.id)), "value": b64(&serde_json::to_string(r).unwrap()),
                       "mod_revision": revision.to_string()})
            })
            .collect();
        json!({"header": {"revision": revision.to_string()}, "kvs": kvs})
    }

    #[test]
    fn the_leading_poller_applies_what_etcd_holds_and_flushes_the_outbox() {
        let host = FakeHost::new(T0);
        let store = MemoryStore::new();
        let metrics = Metrics::default();
        let io = Io { host: &host, store: &store, metrics: &metrics };
        let limits = crate::config::Denylist::default();
        let list = Denylist::new(&store as &dyn Store, &limits);
        let mut me = Poller::new("me".into());
        let mut other = Poller::new("other".into());
        cluster_sync::outbox_push(&store, &[revoked("client:queued")], 10).unwrap();

        me.tick(&io, &cfg(), T0);
        other.tick(&io, &cfg(), T0);
        let calls = host.callouts.borrow().clone();
        assert_eq!(calls.len(), 2, "one poll and one flush, from the leader only: {calls:?}");
        let (poll, grant) = (calls[0].id, calls[1].id);
        assert!(calls[0].headers.contains(&(":path".into(), "/v3/kv/range".into())));
        assert!(!cluster_sync::is_loaded(&store));

        let (nh, bs) = host.answer(Some(200), range_answer(12, &[revoked("client:remote")]).to_string().as_bytes());
        me.on_response(&io, &cfg(), &list, (poll, nh, bs), T0 + 5);
        assert_eq!(list.principals(T0 / 1000).unwrap().len(), 1, "the remote revocation applied");
        assert!(cluster_sync::is_loaded(&store));
        assert_eq!(cluster_sync::next_revision(&store).unwrap(), 13);

        let (nh, bs) = host.answer(Some(200), json!({"ID": "3"}).to_string().as_bytes());
        me.on_response(&io, &cfg(), &list, (grant, nh, bs), T0 + 6);
        let txn = host.last_callout().unwrap();
        assert!(String::from_utf8_lossy(&txn.body)
            .contains(&base64::engine::general_purpose::STANDARD.encode("tg/revoked/client:queued")));
        assert_eq!(cluster_sync::outbox_len(&store), 1, "kept until etcd took it");
        let (nh, bs) = host.answer(Some(200), TXN_OK().to_string().as_bytes());
        me.on_response(&io, &cfg(), &list, (txn.id, nh, bs), T0 + 7);
        assert_eq!(cluster_sync::outbox_len(&store), 0);

        // The next poll waits poll_ms; a poll Envoy never answers is given up.
        me.tick(&io, &cfg(), T0 + 100);
        assert_eq!(host.callouts.borrow().len(), 3, "no poll before poll_ms");
        me.tick(&io, &cfg(), T0 + 600);
        assert_eq!(host.callouts.borrow().len(), 4);
        me.tick(&io, &cfg(), T0 + 600 + cfg().timeout_ms + 1_001);
        assert_eq!(host.callouts.borrow().len(), 5, "a silent poll does not block the next");
    }
}
