//! The HTTP filter Envoy calls for each request: the request path in order,
//! and the admin API where this listener's configuration has one.

use crate::admin::{self, Reply, Route};
use crate::bearer::{self, BearerError, Token};
use crate::cache;
use crate::cluster_sync;
use crate::denylist::Change;
use crate::etcd::{EtcdWrite, Written};
use crate::headers::{self, HeaderMap};
use crate::introspection;
use crate::outcome::Denial;
use crate::worker::{callout_status, dispatch, now_ms, send_denial, Found, Worker};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};
use std::collections::HashSet;
use std::rc::Rc;

/// Tokens one admin call forwards to the IdP's revocation endpoint; the
/// rest are revoked locally and reported as skipped.
const MAX_FORWARDS: usize = 100;

pub struct Filter {
    id: u32,
    /// `None` when the plugin has no valid configuration: fail closed.
    worker: Option<Rc<Worker>>,
    admin: AdminState,
}

/// Where an admin request is; `None` for every other request.
enum AdminState {
    None,
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

impl Filter {
    pub fn new(id: u32, worker: Option<Rc<Worker>>) -> Filter {
        Filter { id, worker, admin: AdminState::None }
    }

    fn on_request(&mut self, worker: &Worker, end_of_stream: bool) -> Action {
        let headers = match headers::read(MapType::HttpRequestHeaders) {
            Some(h) => h,
            None => {
                worker.deny(&Denial::IdpUnavailable("tokengate could not read the request"));
                return Action::Pause;
            }
        };
        if let Some(admin) = &worker.config.admin {
            let path = headers.get(":path").unwrap_or_default();
            if let Some(reply) = admin::outside_admin(path, &admin.path_prefix) {
                worker.metrics.admin_requests.inc();
                return self.admin_reply(worker, reply);
            }
            return self.admin_headers(worker, &headers, end_of_stream);
        }
        self.validate(worker, &headers)
    }

    fn validate(&self, worker: &Worker, headers: &HeaderMap) -> Action {
        // Claim headers come from the IdP only: drop any the client sent,
        // and their `_` spellings, which CGI-style upstreams read as the same.
        let claim_headers = &worker.config.claims_to_headers;
        let mut removed: Vec<&[u8]> = Vec::new();
        for (name, _) in headers.iter() {
            if claim_headers.values().any(|h| headers::reads_as(name, h)) && !removed.contains(&name) {
                if let Ok(name) = std::str::from_utf8(name) {
                    let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
                }
                removed.push(name);
            }
        }
        let token = match self.credential(worker, headers) {
            Ok(t) => t,
            Err(BearerError::Missing) => {
                worker.deny(&Denial::MissingToken);
                return Action::Pause;
            }
            Err(BearerError::Malformed(why)) => {
                worker.deny(&Denial::InvalidRequest(why));
                return Action::Pause;
            }
        };
        if !worker.denylist_ready() {
            worker.deny(&Denial::DenylistLoading);
            return Action::Pause;
        }
        let hash = cache::hash_token(&token);
        let now = now_ms();
        match worker.token_revoked(&hash, now / 1000) {
            Ok(false) => {}
            Ok(true) => {
                worker.deny(&Denial::Revoked);
                return Action::Pause;
            }
            Err(e) => {
                log::error!("denylist read failed: {e:?}");
                worker.deny(&Denial::IdpUnavailable("the denylist could not be read"));
                return Action::Pause;
            }
        }
        match worker.find_or_wait(hash, &token, self.id, now) {
            Found::Ready(verdict) => {
                if worker.finish(&verdict, now / 1000) {
                    Action::Continue
                } else {
                    Action::Pause
                }
            }
            Found::Wait => Action::Pause,
        }
    }

    /// The bearer token: the `Authorization` header, or where configured the
    /// `access_token` query parameter (never both: RFC 6750 §2).
    fn credential(&self, worker: &Worker, headers: &HeaderMap) -> Result<Token, BearerError> {
        let authorization = headers.all("authorization");
        if !worker.config.allow_query_token {
            return bearer::parse(&authorization, bearer::MAX_TOKEN_BYTES);
        }
        let path = headers.get(":path").unwrap_or_default();
        match (bearer::from_query(path, bearer::MAX_TOKEN_BYTES)?, authorization.is_empty()) {
            (None, _) => bearer::parse(&authorization, bearer::MAX_TOKEN_BYTES),
            (Some(_), false) => Err(BearerError::Malformed("the token is in both the header and the query")),
            (Some(token), true) => {
                if worker.config.hide_credentials {
                    let stripped = bearer::strip_query_token(path);
                    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, ":path", Some(&stripped));
                }
                Ok(token)
            }
        }
    }

    /// Body and trailers must not slip past a request still being checked.
    fn hold_while_waiting(&self) -> Action {
        // An admin request never continues upstream.
        let admin = !matches!(self.admin, AdminState::None);
        if admin || self.worker.as_ref().is_some_and(|w| w.is_waiting(self.id)) {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    // ----- admin API -----

    fn admin_headers(&mut self, worker: &Worker, headers: &HeaderMap, end_of_stream: bool) -> Action {
        worker.metrics.admin_requests.inc();
        self.admin = AdminState::Answered;
        let Some(cfg) = &worker.config.admin else {
            return Action::Pause;
        };
        if let Err(reply) = admin::authorize(&headers.all("authorization"), &cfg.token_sha256) {
            return self.admin_reply(worker, reply);
        }
        let method = headers.get(":method").unwrap_or_default();
        let path = headers.get(":path").unwrap_or_default();
        let route = match admin::route(method, path, &cfg.path_prefix) {
            Ok(r) => r,
            Err(reply) => return self.admin_reply(worker, reply),
        };
        if route != Route::Revoke {
            return self.admin_handle(worker, &route, None);
        }
        // u64: usize is 32 bits in wasm, and a larger length must still be refused.
        let declared = headers.get("content-length").and_then(|l| l.trim().parse::<u64>().ok());
        if declared.is_some_and(|l| l > cfg.max_body_bytes as u64) {
            return self.admin_reply(worker, admin::too_large(cfg));
        }
        if end_of_stream {
            return self.admin_reply(worker, Reply::error(400, "invalid_request", "the request body is empty"));
        }
        let content_type = headers.get("content-type").map(str::to_string);
        self.admin = AdminState::AwaitingBody { content_type };
        // Envoy delivers no body to a filter that paused its headers, so the
        // headers continue to the next filter, which must be Envoy's buffer
        // filter: it holds them until the body is complete, and by then this
        // filter has answered. Should the chain lack it, the admin credential
        // at least goes no further.
        let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, "authorization");
        Action::Continue
    }

    fn admin_body(&mut self, worker: &Worker, body_size: usize, end_of_stream: bool) -> Action {
        let (Some(cfg), AdminState::AwaitingBody { content_type }) = (&worker.config.admin, &self.admin) else {
            return Action::Pause;
        };
        if body_size > cfg.max_body_bytes {
            return self.admin_reply(worker, admin::too_large(cfg));
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size).ok().flatten().unwrap_or_default();
        match admin::parse_revoke(content_type.as_deref(), &body, cfg) {
            Ok(revoke) => self.admin_handle(worker, &Route::Revoke, Some(revoke)),
            Err(reply) => self.admin_reply(worker, reply),
        }
    }

    fn admin_handle(&mut self, worker: &Worker, route: &Route, revoke: Option<admin::Revoke>) -> Action {
        let now = now_ms();
        let cached = |hash: &cache::TokenHash| worker.cached_claims(hash, now);
        let handled =
            admin::handle(route, revoke, &worker.config.denylist, &crate::store::SharedData, now / 1000, &cached);
        self.count(worker, route, &handled.reply);
        if handled.reply.status >= 300 {
            return self.admin_reply(worker, handled.reply);
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
                finishing.sync = EtcdWrite::start(cfg, handled.changes.clone(), now / 1000);
                if finishing.sync.is_none() {
                    finishing.sync_outcome = Some(queue(worker, &handled.changes, "etcd unreachable"));
                }
            }
        }
        if worker.config.revocation_endpoint.is_some() && !handled.forward.is_empty() {
            finishing.forwarded = Some(self.forward(worker, &handled.forward, &mut finishing.forward_pending));
        }
        self.admin = AdminState::Finishing(Box::new(finishing));
        self.finish_admin(worker)
    }

    fn count(&self, worker: &Worker, route: &Route, reply: &Reply) {
        let m = &worker.metrics;
        let revoked = reply.body.as_ref().and_then(|b| b.get("revoked")).and_then(|v| v.as_u64()).unwrap_or(0);
        match route {
            Route::Revoke if reply.body.as_ref().is_some_and(|b| b.get("revocation").is_some()) => {
                m.revocations_principals.add(revoked)
            }
            Route::Revoke => m.revocations_tokens.add(revoked),
            Route::Undo(_) if reply.status == 204 => m.revocations_undone.inc(),
            _ => {}
        }
        if reply.status == 507 {
            m.revocations_refused.inc();
        }
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
            match dispatch(&endpoint.cluster, &request, endpoint.timeout_ms) {
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
    fn admin_callout(&mut self, worker: &Worker, token_id: u32, num_headers: usize, body_size: usize) -> bool {
        let AdminState::Finishing(f) = &mut self.admin else {
            return false;
        };
        if f.forward_pending.remove(&token_id) {
            if let Some(fw) = f.forwarded.as_mut() {
                if callout_status(num_headers) == Some(200) {
                    fw.ok += 1;
                } else {
                    fw.failed += 1;
                }
            }
        } else if let (Some(write), Some(cfg)) = (f.sync.as_mut(), &worker.config.cluster_sync) {
            if !write.owns(token_id) {
                return false;
            }
            match write.on_response(cfg, token_id, num_headers, body_size) {
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
        self.finish_admin(worker);
        true
    }

    /// Sends the admin reply once every follow-up is over.
    fn finish_admin(&mut self, worker: &Worker) -> Action {
        let AdminState::Finishing(f) = &self.admin else {
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
        self.admin_reply(worker, reply)
    }

    /// Envoy cancels the etcd write with its stream: the outbox takes over.
    fn abandon_admin(&mut self, worker: &Worker) {
        let AdminState::Finishing(f) = &mut self.admin else {
            return;
        };
        if let Some(write) = f.sync.take() {
            queue(worker, &write.changes, "the admin client left before etcd answered");
        }
    }

    fn admin_reply(&mut self, worker: &Worker, reply: Reply) -> Action {
        self.admin = AdminState::Answered;
        if reply.status >= 400 {
            worker.metrics.admin_rejected.inc();
        }
        let body = reply.text().unwrap_or_default();
        let mut headers: Vec<(&str, &str)> = vec![("cache-control", "no-store")];
        if !body.is_empty() {
            headers.push(("content-type", "application/json"));
        }
        for (name, value) in &reply.headers {
            headers.push((name, value.as_str()));
        }
        let body = (!body.is_empty()).then_some(body.as_bytes());
        let _ = hostcalls::send_http_response(reply.status, headers, body);
        Action::Pause
    }
}

/// Parks changes etcd did not take in the shared outbox, for the poller to
/// flush; says what happened for the admin reply.
fn queue(worker: &Worker, changes: &[Change], why: &str) -> &'static str {
    let max = worker.config.cluster_sync.as_ref().map_or(0, |c| c.max_outbox);
    match cluster_sync::outbox_push(&crate::store::SharedData, changes, max) {
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

impl Context for Filter {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        let Some(worker) = self.worker.clone() else {
            return;
        };
        if !self.admin_callout(&worker, token_id, num_headers, body_size) {
            worker.on_callout_response(token_id, num_headers, body_size);
        }
    }

    fn on_done(&mut self) -> bool {
        if let Some(worker) = self.worker.clone() {
            worker.forget(self.id);
            self.abandon_admin(&worker);
        }
        true
    }
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        match self.worker.clone() {
            Some(worker) => self.on_request(&worker, end_of_stream),
            None => {
                send_denial(&Denial::IdpUnavailable("tokengate is not configured"), "tokengate");
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let (AdminState::AwaitingBody { .. }, Some(worker)) = (&self.admin, self.worker.clone()) {
            return self.admin_body(&worker, body_size, end_of_stream);
        }
        self.hold_while_waiting()
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.hold_while_waiting()
    }
}
