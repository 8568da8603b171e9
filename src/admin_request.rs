//! One admin request on the admin listener, from its headers to its reply:
//! the credential and route, the body of a revoke, the change made locally
//! (`admin::handle`), then the follow-ups that run before the answer goes
//! out: the etcd write (cluster sync) and the RFC 7009 forwards. Should the
//! client go away first, the etcd write is handed to the outbox.

use crate::admin::{self, Command, Reply, Route};
use crate::bearer::Token;
use crate::cache;
use crate::cluster_sync;
use crate::denylist::Change;
use crate::etcd::{EtcdWrite, Written};
use crate::headers::HeaderMap;
use crate::introspection;
use crate::worker::{dispatch, Worker};
use proxy_wasm::types::Action;
use std::collections::HashSet;

/// Tokens one admin call forwards to the IdP's revocation endpoint; the
/// rest are revoked locally and reported as skipped.
const MAX_FORWARDS: usize = 100;

pub struct AdminRequest {
    state: State,
}

enum State {
    /// Headers seen: nothing decided yet.
    Started,
    /// `POST {prefix}/revoke` waiting for its body.
    AwaitingBody {
        content_type: Option<String>,
    },
    /// Done locally; waiting for etcd and the IdP's revocation endpoint.
    Finishing(Box<Finishing>),
    Answered,
}

/// The follow-ups of an admin change, which run side by side before the
/// reply goes out.
struct Finishing {
    reply: Reply,
    /// Writing the change to etcd (cluster sync).
    sync: Option<EtcdWrite>,
    sync_outcome: Option<&'static str>,
    /// Forwarding revoked tokens to the IdP (RFC 7009).
    forward_pending: HashSet<u32>,
    forwarded: Option<Forwarded>,
}

#[derive(Default)]
struct Forwarded {
    ok: usize,
    failed: usize,
    skipped: usize,
}

impl Default for AdminRequest {
    fn default() -> Self {
        AdminRequest { state: State::Started }
    }
}

impl AdminRequest {
    /// Whether it waits for its body.
    pub fn awaits_body(&self) -> bool {
        matches!(self.state, State::AwaitingBody { .. })
    }

    pub fn on_headers(&mut self, worker: &Worker, headers: &HeaderMap, end_of_stream: bool) -> Action {
        worker.metrics.admin_requests.inc();
        self.state = State::Answered;
        let Some(cfg) = &worker.config.admin else {
            return Action::Pause;
        };
        if let Err(reply) = admin::authorize(&headers.all("authorization"), &cfg.token_sha256) {
            return self.reply(worker, reply);
        }
        let method = headers.get(":method").unwrap_or_default();
        let path = headers.get(":path").unwrap_or_default();
        let route = match admin::route(method, path, &cfg.path_prefix) {
            Ok(r) => r,
            Err(reply) => return self.reply(worker, reply),
        };
        let route = match route.command() {
            Ok(command) => return self.handle(worker, command),
            Err(route) => route,
        };
        debug_assert_eq!(route, Route::Revoke);
        // u64: usize is 32 bits in wasm, and a larger length must still be refused.
        let declared = headers.get("content-length").and_then(|l| l.trim().parse::<u64>().ok());
        if declared.is_some_and(|l| l > cfg.max_body_bytes as u64) {
            return self.reply(worker, admin::too_large(cfg));
        }
        if end_of_stream {
            return self.reply(worker, Reply::error(400, "invalid_request", "the request body is empty"));
        }
        let content_type = headers.get("content-type").map(str::to_string);
        self.state = State::AwaitingBody { content_type };
        // Envoy delivers no body to a filter that paused its headers, so the
        // headers continue to the next filter, which must be Envoy's buffer
        // filter: it holds them until the body is complete, and by then this
        // filter has answered. Should the chain lack it, the admin credential
        // at least goes no further.
        worker.host.remove_request_header("authorization");
        Action::Continue
    }

    pub fn on_body(&mut self, worker: &Worker, body_size: usize, end_of_stream: bool) -> Action {
        let (Some(cfg), State::AwaitingBody { content_type }) = (&worker.config.admin, &self.state) else {
            return Action::Pause;
        };
        if body_size > cfg.max_body_bytes {
            return self.reply(worker, admin::too_large(cfg));
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = worker.host.request_body(body_size);
        match admin::parse_revoke(content_type.as_deref(), &body, cfg, worker.config.max_token_bytes) {
            Ok(revoke) => self.handle(worker, Command::Revoke(revoke)),
            Err(reply) => self.reply(worker, reply),
        }
    }

    fn handle(&mut self, worker: &Worker, command: Command) -> Action {
        let now = worker.host.now_ms();
        let cached = |hash: &cache::TokenHash| worker.cached_claims(hash, now);
        let handled = admin::handle(command, &worker.config.denylist, &*worker.store, now / 1000, &cached);
        let m = &worker.metrics;
        m.revocations_tokens.add(handled.counts.tokens);
        m.revocations_principals.add(handled.counts.principals);
        m.revocations_undone.add(handled.counts.undone);
        m.revocations_refused.add(handled.counts.refused);
        if handled.reply.status >= 300 {
            return self.reply(worker, handled.reply);
        }
        let mut finishing = Finishing {
            reply: handled.reply,
            sync: None,
            sync_outcome: None,
            forward_pending: HashSet::new(),
            forwarded: None,
        };
        if let Some(cfg) = &worker.config.cluster_sync {
            if !handled.changes.is_empty() {
                finishing.sync = EtcdWrite::start(&*worker.host, cfg, handled.changes.clone(), now / 1000);
                if finishing.sync.is_none() {
                    finishing.sync_outcome = Some(queue(worker, &handled.changes, "etcd unreachable"));
                }
            }
        }
        if worker.config.revocation_endpoint.is_some() && !handled.forward.is_empty() {
            finishing.forwarded = Some(self.forward(worker, &handled.forward, &mut finishing.forward_pending));
        }
        self.state = State::Finishing(Box::new(finishing));
        self.finish(worker)
    }

    /// Also revokes at the IdP (RFC 7009); the local revocation stands
    /// whatever the IdP answers.
    fn forward(&self, worker: &Worker, tokens: &[Token], pending: &mut HashSet<u32>) -> Forwarded {
        let mut outcome = Forwarded { skipped: tokens.len().saturating_sub(MAX_FORWARDS), ..Default::default() };
        let Some(endpoint) = &worker.config.revocation_endpoint else {
            return outcome;
        };
        let client = endpoint.client_id.as_deref().zip(endpoint.client_secret.as_deref());
        for token in tokens.iter().take(MAX_FORWARDS) {
            let request =
                introspection::token_post(&endpoint.path, &endpoint.authority, client, token, Some("access_token"));
            match dispatch(&*worker.host, &endpoint.cluster, &request, endpoint.timeout_ms) {
                Ok(id) => {
                    pending.insert(id);
                }
                Err(status) => {
                    log::warn!("cannot call the revocation endpoint: {status:?}");
                    outcome.failed += 1;
                }
            }
        }
        outcome
    }

    /// Routes a callout answer to the admin follow-up it belongs to.
    /// Returns false if it is not one of ours.
    pub fn on_callout(&mut self, worker: &Worker, token_id: u32, num_headers: usize, body_size: usize) -> bool {
        let State::Finishing(f) = &mut self.state else {
            return false;
        };
        if f.forward_pending.remove(&token_id) {
            if let Some(fw) = f.forwarded.as_mut() {
                if worker.host.callout_status(num_headers) == Some(200) {
                    fw.ok += 1;
                } else {
                    fw.failed += 1;
                }
            }
        } else if let (Some(write), Some(cfg)) = (f.sync.as_mut(), &worker.config.cluster_sync) {
            if !write.owns(token_id) {
                return false;
            }
            match write.on_response(&*worker.host, cfg, token_id, num_headers, body_size) {
                Some(Written::Ok) => {
                    f.sync_outcome = Some("written");
                    f.sync = None;
                }
                Some(Written::Failed) => {
                    let changes = std::mem::take(&mut write.changes);
                    f.sync_outcome = Some(queue(worker, &changes, "etcd unreachable"));
                    f.sync = None;
                }
                Some(Written::Refused) => {
                    log::error!("cluster sync: etcd refused the change; it stays local only");
                    worker.metrics.sync_dropped.add(write.changes.len() as u64);
                    f.sync_outcome = Some("refused");
                    f.sync = None;
                }
                None => {}
            }
        } else {
            return false;
        }
        self.finish(worker);
        true
    }

    /// Sends the admin reply once every follow-up is over.
    fn finish(&mut self, worker: &Worker) -> Action {
        let State::Finishing(f) = &self.state else {
            return Action::Pause;
        };
        if f.sync.is_some() || !f.forward_pending.is_empty() {
            return Action::Pause;
        }
        let mut reply = f.reply.clone();
        if let Some(body) = reply.body.as_mut().and_then(|b| b.as_object_mut()) {
            if let Some(fw) = &f.forwarded {
                worker.metrics.revocations_forward_ok.add(fw.ok as u64);
                worker.metrics.revocations_forward_failed.add(fw.failed as u64);
                body.insert(
                    "forwarded".into(),
                    serde_json::json!({"ok": fw.ok, "failed": fw.failed, "skipped": fw.skipped}),
                );
            }
            if let Some(outcome) = f.sync_outcome {
                body.insert("cluster_sync".into(), serde_json::json!(outcome));
            }
        }
        self.reply(worker, reply)
    }

    /// Envoy cancels the etcd write with its stream: the outbox takes over.
    pub fn on_done(&mut self, worker: &Worker) {
        let State::Finishing(f) = &mut self.state else {
            return;
        };
        if let Some(write) = f.sync.take() {
            queue(worker, &write.changes, "the admin client left before etcd answered");
        }
    }

    /// Answers the admin request (the admin API's own replies and refusals).
    pub fn reply(&mut self, worker: &Worker, reply: Reply) -> Action {
        self.state = State::Answered;
        if reply.status >= 400 {
            worker.metrics.admin_rejected.inc();
        }
        let body = reply.text().unwrap_or_default();
        let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        crate::host::send_json(&*worker.host, reply.status, &headers, (!body.is_empty()).then_some(body.as_str()));
        Action::Pause
    }
}

/// Parks changes etcd did not take in the shared outbox, for the poller to
/// flush; says what happened for the admin reply.
fn queue(worker: &Worker, changes: &[Change], why: &str) -> &'static str {
    let max = worker.config.cluster_sync.as_ref().map_or(0, |c| c.max_outbox);
    match cluster_sync::outbox_push(&*worker.store, changes, max) {
        Ok(0) => {
            worker.metrics.sync_queued.add(changes.len() as u64);
            log::warn!("cluster sync: {why}, {} change(s) queued", changes.len());
            "queued"
        }
        Ok(dropped) => {
            worker.metrics.sync_dropped.add(dropped as u64);
            log::error!("cluster sync: outbox full, {dropped} change(s) stay local only");
            "partly_dropped"
        }
        Err(e) => {
            worker.metrics.sync_dropped.add(changes.len() as u64);
            log::error!("cluster sync: outbox write failed ({e:?}), changes stay local only");
            "dropped"
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::filter::Filter;
    use crate::host::fake::{Event, FakeHost};
    use crate::metrics::Metrics;
    use crate::store::{MemoryStore, Store};
    use crate::worker::Worker;
    use proxy_wasm::traits::{Context, HttpContext};
    use proxy_wasm::types::Action;
    use sha2::{Digest, Sha256};
    use std::rc::Rc;

    const T0: u64 = 1_800_000_000_000;

    fn admin_worker(host: &Rc<FakeHost>, store: &Rc<MemoryStore>) -> Rc<Worker> {
        worker_with(host, store, r#""cluster_sync": {"cluster": "etcd", "authority": "etcd"}"#)
    }

    /// An admin listener's worker with `extra` top-level configuration.
    fn worker_with(host: &Rc<FakeHost>, store: &Rc<MemoryStore>, extra: &str) -> Rc<Worker> {
        worker_on(host, store.clone(), extra)
    }

    fn worker_on(host: &Rc<FakeHost>, store: Rc<dyn Store>, extra: &str) -> Rc<Worker> {
        let admin_hash: String = Sha256::digest(b"admin-token").iter().map(|b| format!("{b:02x}")).collect();
        let json = format!(
            r#"{{"introspection": {{"cluster": "idp", "authority": "idp", "path": "/i"}},
                "admin": {{"token_sha256": "{admin_hash}"}}, {extra}}}"#
        );
        let config = Config::parse(json.as_bytes()).unwrap();
        Rc::new(Worker::new(config, Metrics::default(), host.clone(), store))
    }

    /// A form revoke of `token` on context 1, up to the etcd write.
    fn revoke(host: &Rc<FakeHost>, worker: &Rc<Worker>, token: &str) -> Filter {
        post(host, worker, "application/x-www-form-urlencoded", format!("token={token}"))
    }

    /// A revoke with this body on context 1, as far as it goes without answers.
    fn post(host: &Rc<FakeHost>, worker: &Rc<Worker>, content_type: &str, body: String) -> Filter {
        let length = body.len().to_string();
        host.request(
            1,
            &[
                (":method", "POST"),
                (":path", "/tokengate/revoke"),
                ("authorization", "Bearer admin-token"),
                ("content-type", content_type),
                ("content-length", &length),
            ],
        );
        host.bodies.borrow_mut().insert(1, body.clone().into_bytes());
        let mut filter = Filter::new(1, Some(worker.clone()), host.clone());
        assert_eq!(filter.on_http_request_headers(5, false), Action::Continue, "on to the buffer filter");
        assert_eq!(filter.on_http_request_body(body.len(), true), Action::Pause);
        filter
    }

    #[test]
    fn a_revocation_whose_admin_client_leaves_mid_write_goes_to_the_outbox() {
        let (host, store) = (Rc::new(FakeHost::new(T0)), Rc::new(MemoryStore::new()));
        let worker = admin_worker(&host, &store);
        let mut filter = revoke(&host, &worker, "tok-1");
        let grant = host.last_callout().unwrap();
        assert_eq!(grant.cluster, "etcd");
        assert!(host.take_events().iter().all(|e| !matches!(e, Event::Reply { .. })), "no answer before etcd's");
        assert_eq!(worker.denylist().list(T0 / 1000).unwrap().len(), 1, "revoked locally first");
        assert_eq!(crate::cluster_sync::outbox_len(&*store), 0);
        filter.on_done();
        assert_eq!(crate::cluster_sync::outbox_len(&*store), 1, "the poller will write it");
    }

    #[test]
    fn a_revocation_etcd_took_is_answered_written_and_leaves_the_outbox_empty() {
        let (host, store) = (Rc::new(FakeHost::new(T0)), Rc::new(MemoryStore::new()));
        let worker = admin_worker(&host, &store);
        let mut filter = revoke(&host, &worker, "tok-2");
        let grant = host.last_callout().unwrap().id;
        let (nh, bs) = host.answer(Some(200), br#"{"ID": "9"}"#);
        filter.on_http_call_response(grant, nh, bs, 0);
        let txn = host.last_callout().unwrap().id;
        let (nh, bs) = host.answer(Some(200), br#"{"header": {"revision": "3"}, "succeeded": true}"#);
        filter.on_http_call_response(txn, nh, bs, 0);
        let replies: Vec<Event> = host.take_events().into_iter().filter(|e| matches!(e, Event::Reply { .. })).collect();
        let [Event::Reply { status: 200, body, .. }] = replies.as_slice() else { panic!("{replies:?}") };
        assert!(body.contains(r#""cluster_sync":"written""#), "{body}");
        assert!(!body.contains("tok-2"), "the token never appears in an answer");
        filter.on_done();
        assert_eq!(crate::cluster_sync::outbox_len(&*store), 0, "nothing left to write");
    }

    fn reply(host: &FakeHost) -> (u32, serde_json::Value) {
        let events = host.take_events();
        match events.iter().find(|e| matches!(e, Event::Reply { .. })) {
            Some(Event::Reply { status, body, .. }) => (*status, serde_json::from_str(body).unwrap()),
            _ => panic!("no reply: {events:?}"),
        }
    }

    #[test]
    fn forwards_past_one_hundred_are_reported_skipped() {
        let (host, store) = (Rc::new(FakeHost::new(T0)), Rc::new(MemoryStore::new()));
        let endpoint = r#""revocation_endpoint": {"cluster": "idp", "authority": "idp", "path": "/revoke"}"#;
        let worker = worker_with(&host, &store, endpoint);
        let tokens: Vec<String> = (0..150).map(|n| format!("tok-{n}")).collect();
        let mut filter = post(&host, &worker, "application/json", serde_json::json!({ "tokens": tokens }).to_string());
        let calls = host.callouts.borrow().clone();
        assert_eq!(calls.len(), 100, "one RFC 7009 call per token, up to 100");
        for call in &calls {
            let (nh, bs) = host.answer(Some(200), b"");
            filter.on_http_call_response(call.id, nh, bs, 0);
        }
        let (status, body) = reply(&host);
        assert_eq!(status, 200);
        assert_eq!(body["revoked"], 150);
        assert_eq!(body["forwarded"], serde_json::json!({"ok": 100, "failed": 0, "skipped": 50}));
    }

    #[test]
    fn an_outbox_with_no_room_says_partly_dropped() {
        let (host, store) = (Rc::new(FakeHost::new(T0)), Rc::new(MemoryStore::new()));
        let sync = r#""cluster_sync": {"cluster": "etcd", "authority": "etcd", "max_outbox": 2}"#;
        let worker = worker_with(&host, &store, sync);
        host.refuse_dispatch.set(true); // etcd's cluster refuses: the change is queued at once
        let tokens: Vec<String> = (0..3).map(|n| format!("tok-{n}")).collect();
        let _filter = post(&host, &worker, "application/json", serde_json::json!({ "tokens": tokens }).to_string());
        let (status, body) = reply(&host);
        assert_eq!((status, body["cluster_sync"].as_str()), (200, Some("partly_dropped")));
        assert_eq!(crate::cluster_sync::outbox_len(&*store), 2);
        let _filter = revoke(&host, &worker, "tok-9");
        let (_, body) = reply(&host);
        assert_eq!(body["cluster_sync"], "partly_dropped", "a full outbox takes nothing more");
        assert_eq!(crate::cluster_sync::outbox_len(&*store), 2);
    }

    /// Shared data whose outbox key refuses every write, as a failing host call would.
    struct OutboxRefused(MemoryStore);

    impl Store for OutboxRefused {
        fn get(&self, key: &str) -> Result<Option<crate::store::Versioned>, crate::store::StoreError> {
            self.0.get(key)
        }

        fn set(&self, key: &str, value: &[u8], guard: crate::store::Guard) -> Result<(), crate::store::StoreError> {
            if key.ends_with("sync.outbox") {
                return Err(crate::store::StoreError::Host);
            }
            self.0.set(key, value, guard)
        }
    }

    #[test]
    fn an_outbox_that_cannot_be_written_says_dropped_and_the_revocation_stands() {
        let host = Rc::new(FakeHost::new(T0));
        let store = Rc::new(OutboxRefused(MemoryStore::new()));
        let worker = worker_on(&host, store.clone(), r#""cluster_sync": {"cluster": "etcd", "authority": "etcd"}"#);
        host.refuse_dispatch.set(true); // etcd's cluster refuses: the change goes to the outbox at once
        let _filter = revoke(&host, &worker, "tok-3");
        let (status, body) = reply(&host);
        assert_eq!((status, body["cluster_sync"].as_str()), (200, Some("dropped")));
        assert_eq!(worker.denylist().list(T0 / 1000).unwrap().len(), 1, "revoked here all the same");
    }
}
