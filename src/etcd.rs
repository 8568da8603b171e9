//! The callouts of cluster sync: writing changes to etcd (from the admin
//! request that made them, or from the outbox) and the process's poller.
//! What to send and how to read the answers is in `cluster_sync`.

use crate::cluster_sync::{self, Page};
use crate::config::ClusterSync;
use crate::denylist::{Change, Denylist};
use crate::metrics::Metrics;
use crate::store::SharedData;
use crate::worker::callout_status;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MetricType};
use std::collections::HashSet;
use std::time::Duration;

/// Answers larger than this are refused (a range page is ~1000 records).
const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;

fn post(cfg: &ClusterSync, path: &str, body: &str) -> Option<u32> {
    let headers = vec![
        (":method", "POST"),
        (":path", path),
        (":authority", cfg.authority.as_str()),
        ("content-type", "application/json"),
    ];
    let timeout = Duration::from_millis(cfg.timeout_ms);
    match hostcalls::dispatch_http_call(&cfg.cluster, headers, Some(body.as_bytes()), vec![], timeout) {
        Ok(id) => Some(id),
        Err(status) => {
            log::warn!("cluster sync: cannot call etcd (cluster {:?}): {status:?}", cfg.cluster);
            None
        }
    }
}

/// The body of a 200 answer to the current callout, or `None`.
fn answer(num_headers: usize, body_size: usize) -> Option<Vec<u8>> {
    if body_size > MAX_ANSWER_BYTES || callout_status(num_headers) != Some(200) {
        return None;
    }
    hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten()
}

/// etcd refused the request itself (4xx): sending it again cannot help.
fn refused(num_headers: usize) -> bool {
    callout_status(num_headers).is_some_and(|s| (400..500).contains(&s))
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
    pub fn start(cfg: &ClusterSync, changes: Vec<Change>, now_s: u64) -> Option<EtcdWrite> {
        let grant = cluster_sync::lease_grant(cluster_sync::lease_ttl_s(&changes, now_s));
        let id = post(cfg, "/v3/lease/grant", &grant)?;
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
        cfg: &ClusterSync,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
    ) -> Option<Written> {
        let body = answer(num_headers, body_size);
        match &mut self.stage {
            Stage::Granting(_) => {
                let Some(lease) = body.and_then(|b| cluster_sync::parse_lease(&b).ok()) else {
                    return Some(if refused(num_headers) { Written::Refused } else { Written::Failed });
                };
                let mut pending = HashSet::new();
                for txn in cluster_sync::txns(&cfg.prefix, &self.changes, lease) {
                    match post(cfg, "/v3/kv/txn", &txn) {
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
                    *was_refused |= refused(num_headers);
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
    lag_gauge: u32,
    revision_gauge: u32,
    outbox_gauge: u32,
}

impl Poller {
    pub fn new(me: String) -> Poller {
        let gauge = |name: &str| hostcalls::define_metric(MetricType::Gauge, name).unwrap_or(0);
        Poller {
            me,
            poll: None,
            flush: None,
            next_poll_ms: 0,
            lag_gauge: gauge("tokengate.sync.lag_ms"),
            revision_gauge: gauge("tokengate.sync.revision"),
            outbox_gauge: gauge("tokengate.sync.outbox"),
        }
    }

    pub fn owns(&self, token_id: u32) -> bool {
        self.poll.is_some_and(|(id, _)| id == token_id) || self.flush.as_ref().is_some_and(|f| f.owns(token_id))
    }

    pub fn tick(&mut self, cfg: &ClusterSync, metrics: &Metrics, now_ms: u64) {
        let lease_ms = cfg.poll_ms * 3 + cfg.timeout_ms;
        match cluster_sync::try_lead(&SharedData, &self.me, now_ms, lease_ms) {
            Ok(true) => {}
            _ => return,
        }
        let last = cluster_sync::last_sync_ms(&SharedData);
        if last > 0 && self.lag_gauge != 0 {
            let _ = hostcalls::record_metric(self.lag_gauge, now_ms.saturating_sub(last));
        }
        if self.outbox_gauge != 0 {
            let _ = hostcalls::record_metric(self.outbox_gauge, cluster_sync::outbox_len(&SharedData) as u64);
        }
        // A callout Envoy never answered does not block the poller forever.
        if self.poll.is_some_and(|(_, deadline)| now_ms > deadline) {
            self.poll = None;
            metrics.sync_failures.inc();
        }
        if self.poll.is_none() && now_ms >= self.next_poll_ms {
            self.start_poll(cfg, metrics, now_ms);
        }
        if self.flush.is_none() {
            let batch = cluster_sync::outbox_peek(&SharedData, cluster_sync::MAX_TXN_OPS / 2).unwrap_or_default();
            if !batch.is_empty() {
                self.flush = EtcdWrite::start(cfg, batch, now_ms / 1000);
            }
        }
    }

    fn start_poll(&mut self, cfg: &ClusterSync, metrics: &Metrics, now_ms: u64) {
        let from = cluster_sync::next_revision(&SharedData).unwrap_or(0);
        match post(cfg, "/v3/kv/range", &cluster_sync::range(&cfg.prefix, from)) {
            Some(id) => self.poll = Some((id, now_ms + cfg.timeout_ms + 1000)),
            None => {
                metrics.sync_failures.inc();
                self.next_poll_ms = now_ms + cfg.poll_ms;
            }
        }
    }

    /// Handles an etcd answer to the poller or the flusher; `answer` is
    /// `(token_id, num_headers, body_size)` of the callout.
    pub fn on_response(
        &mut self,
        cfg: &ClusterSync,
        list: &Denylist<'_, SharedData>,
        metrics: &Metrics,
        answer_of: (u32, usize, usize),
        now_ms: u64,
    ) {
        let (token_id, num_headers, body_size) = answer_of;
        if let Some(flush) = self.flush.as_mut().filter(|f| f.owns(token_id)) {
            if let Some(done) = flush.on_response(cfg, token_id, num_headers, body_size) {
                match done {
                    Written::Ok => {
                        let _ = cluster_sync::outbox_remove(&SharedData, &flush.changes);
                    }
                    Written::Failed => {
                        log::warn!(
                            "cluster sync: etcd did not take {} queued change(s); retrying",
                            flush.changes.len()
                        );
                        metrics.sync_failures.inc();
                    }
                    Written::Refused => {
                        // Retrying would block everything queued behind it.
                        log::error!("cluster sync: etcd refused {} queued change(s); dropped", flush.changes.len());
                        metrics.sync_failures.inc();
                        metrics.sync_dropped.add(flush.changes.len() as u64);
                        let _ = cluster_sync::outbox_remove(&SharedData, &flush.changes);
                    }
                }
                self.flush = None;
            }
            return;
        }
        if self.poll.is_none_or(|(id, _)| id != token_id) {
            return;
        }
        self.poll = None;
        let from = cluster_sync::next_revision(&SharedData).unwrap_or(0);
        let page = answer(num_headers, body_size).and_then(|b| cluster_sync::parse_range(&b, &cfg.prefix, from).ok());
        let Some(Page { changes, next_min_revision, more }) = page else {
            metrics.sync_failures.inc();
            self.next_poll_ms = now_ms + cfg.poll_ms;
            return;
        };
        match list.apply(&changes, now_ms / 1000) {
            Ok(n) => metrics.sync_applied.add(n as u64),
            Err(e) => {
                // Not moving the revision on: the next poll tries again.
                log::error!("cluster sync: applying {} change(s) failed: {e:?}", changes.len());
                metrics.sync_failures.inc();
                self.next_poll_ms = now_ms + cfg.poll_ms;
                return;
            }
        }
        let _ = cluster_sync::set_next_revision(&SharedData, next_min_revision, now_ms);
        if !more {
            let _ = cluster_sync::mark_loaded(&SharedData);
        }
        if self.revision_gauge != 0 {
            let _ = hostcalls::record_metric(
                self.revision_gauge,
                u64::try_from(next_min_revision.saturating_sub(1)).unwrap_or(0),
            );
        }
        if more {
            self.start_poll(cfg, metrics, now_ms);
        } else {
            self.next_poll_ms = now_ms + cfg.poll_ms;
        }
    }
}
