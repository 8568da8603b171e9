//! One worker's side of validation: the local cache, the introspections in
//! flight on this worker, and the requests waiting for them.
//!
//! Coalescing works at two levels. On one worker, requests for a token that
//! is already being introspected join that flight. Across workers, the first
//! worker to put a `Pending` marker in the shared cache calls the IdP; the
//! others poll the shared cache from `on_tick` until the answer (or a
//! `Failed` marker) appears.
//!
//! Envoy cancels a callout when the request that sent it goes away, so a
//! flight whose sender disconnects is re-sent from the root context, which
//! lives as long as the worker. Which flight is in which phase, and what
//! follows each event, is `flights`; this module carries it out.

use crate::bearer::{BearerError, Token};
use crate::cache::{self, Claim, LocalCache, Lookup, SharedCache, Stored, TokenHash};
use crate::config::Config;
use crate::denylist::{DenyView, Denylist};
use crate::etcd::Poller;
use crate::flights::{Due, Flights, Left};
use crate::hash_memo::HashMemo;
use crate::host::Host;
use crate::introspection::{self, Answer, IntrospectionError, Request};
use crate::jwks::{Jwks, Waiter};
use crate::jwt_verify::{Candidate, JwtError};
use crate::metrics::Metrics;
use crate::outcome::Denial;
use crate::policy;
use crate::rules::{Requirement, RouteMemo};
use crate::store::Store;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

/// What a request is told about its token.
pub type Verdict = Result<Rc<Answer>, IntrospectionError>;

/// `on_tick` period while requests wait on another worker or a re-send.
const FAST_TICK: Duration = Duration::from_millis(10);
/// `on_tick` period otherwise: only the safety net for lost callouts.
const SLOW_TICK: Duration = Duration::from_millis(1000);
/// Slack past `timeout_ms` before a marker or a silent callout is given up.
const GRACE_MS: u64 = 1000;

pub struct Worker {
    pub config: Config,
    /// Envoy (or a test's fake), and the shared data every worker sees.
    pub host: Rc<dyn Host>,
    pub store: Rc<dyn Store>,
    /// This configuration's part of the shared cache (`cache::partition`).
    partition: String,
    pub metrics: Metrics,
    state: RefCell<State>,
    deny: RefCell<DenyView>,
    /// Tokens this worker has hashed (raw tokens: this VM's memory only).
    memo: RefCell<HashMemo>,
    /// The etcd poller, where `cluster_sync` is configured.
    sync: Option<RefCell<Poller>>,
    /// Seen the first complete read of etcd (or none is required).
    denylist_loaded: std::cell::Cell<bool>,
    /// Requirements read from route metadata (`route_metadata`).
    pub routes: RefCell<RouteMemo>,
    /// Issuers' keys, and requests waiting for fetched ones.
    jwks: RefCell<Jwks>,
    /// This root context's name among the process's (fetch leases).
    me: String,
}

struct State {
    local: LocalCache,
    flights: Flights,
    /// Paused requests whose route needs other than the top-level requirement.
    needs: HashMap<u32, Rc<Requirement>>,
    fast_tick: bool,
}

/// What `find_or_wait` tells the request.
pub enum Found {
    Ready(Verdict),
    /// The request is parked; the worker resumes or answers it later.
    Wait,
}

/// Sends a token form POST (introspection, RFC 7009) to an Envoy cluster.
pub fn dispatch(host: &dyn Host, cluster: &str, request: &Request, timeout_ms: u64) -> Result<u32, String> {
    let headers: Vec<(&str, &str)> = request.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    host.dispatch(cluster, &headers, request.body.as_bytes(), Duration::from_millis(timeout_ms))
}

impl Worker {
    pub fn new(config: Config, metrics: Metrics, host: Rc<dyn Host>, store: Rc<dyn Store>) -> Worker {
        let local = LocalCache::new(config.cache.local_entries);
        // The memo pays off on local-cache hits (a miss reads shared data
        // anyway), so it is sized from that cache: both fill at once and
        // the worker's memory stops growing with them.
        let memo_entries = config.cache.local_entries.saturating_mul(2).max(1024);
        let memo = HashMemo::new(config.cache.hash_memo_entries);
        let jwks = Jwks::new(config.jwt.as_ref());
        Worker {
            partition: cache::partition(&config),
            config,
            host,
            store,
            metrics,
            state: RefCell::new(State { local, flights: Flights::default(), needs: HashMap::new(), fast_tick: false }),
            deny: RefCell::new(DenyView::new(memo_entries)),
            memo: RefCell::new(memo),
            sync: None,
            denylist_loaded: std::cell::Cell::new(false),
            routes: RefCell::new(RouteMemo::default()),
            jwks: RefCell::new(jwks),
            me: String::new(),
        }
    }

    /// False while cluster sync must first load what was revoked before this
    /// Envoy started (`cluster_sync.require_initial_sync`).
    pub fn denylist_ready(&self) -> bool {
        if self.denylist_loaded.get() {
            return true;
        }
        let ready = match &self.config.cluster_sync {
            Some(c) if c.require_initial_sync => {
                crate::cluster_sync::is_loaded(&*self.store)
                    || crate::cluster_sync::initial_wait_abandoned(&*self.store)
            }
            _ => true,
        };
        self.denylist_loaded.set(ready);
        ready
    }

    /// Names this root among the process's (`me`) and enables cluster sync.
    pub fn with_sync(mut self, me: String) -> Worker {
        if self.config.cluster_sync.is_some() {
            self.sync = Some(RefCell::new(Poller::new(me.clone())));
        }
        self.me = me;
        self
    }

    fn jwks_io(&self) -> crate::jwks::Io<'_> {
        crate::jwks::Io { host: &*self.host, store: &*self.store, metrics: &self.metrics, me: &self.me }
    }

    fn io(&self) -> crate::etcd::Io<'_> {
        crate::etcd::Io { host: &*self.host, store: &*self.store, metrics: &self.metrics }
    }

    /// The tick period when nothing waits.
    pub fn slow_tick(&self) -> Duration {
        match &self.config.cluster_sync {
            Some(c) => SLOW_TICK.min(Duration::from_millis(c.poll_ms / 2)),
            None => SLOW_TICK,
        }
    }

    pub fn denylist(&self) -> Denylist<'_, dyn Store> {
        Denylist::new(&*self.store, &self.config.denylist)
    }

    /// The SHA-256 of the token `bearer::locate` found: from the memo when
    /// this worker has seen these bytes, else checked, hashed and remembered.
    pub fn identify(&self, token: &[u8]) -> Result<TokenHash, BearerError> {
        if let Some(hash) = self.memo.borrow().get(token) {
            return Ok(hash);
        }
        let hash = cache::hash_token(&Token::checked(token)?);
        self.memo.borrow_mut().insert(token, hash);
        Ok(hash)
    }

    /// Refuses a token before any cache: while cluster sync has not loaded
    /// the denylist, when the token is on it, or when it cannot be read.
    pub fn screen(&self, hash: &TokenHash, now_s: u64) -> Result<(), Denial> {
        if !self.denylist_ready() {
            return Err(Denial::DenylistLoading);
        }
        match self.token_revoked(hash, now_s) {
            Ok(false) => Ok(()),
            Ok(true) => Err(Denial::Revoked),
            Err(e) => {
                log::error!("denylist read failed: {e:?}");
                Err(Denial::IdpUnavailable("the denylist could not be read"))
            }
        }
    }

    /// Whether the token is on the denylist; re-reads the denylist if it
    /// changed since this worker last looked.
    pub fn token_revoked(&self, hash: &TokenHash, now_s: u64) -> Result<bool, crate::store::StoreError> {
        let list = self.denylist();
        let mut view = self.deny.borrow_mut();
        view.refresh(&list, now_s)?;
        view.token_revoked(&list, hash, now_s)
    }

    /// What the cache knows of a token's active answer (for the admin API).
    pub fn cached_claims(&self, hash: &TokenHash, now_ms: u64) -> Option<crate::introspection::Claims> {
        let claims = |a: &Answer| match a {
            Answer::Active(c) => Some(c.clone()),
            Answer::Inactive => None,
        };
        if let Some(e) = self.state.borrow().local.get(hash, now_ms) {
            return claims(&e.answer);
        }
        match self.shared().lookup(hash, now_ms) {
            Ok(Lookup::Hit { answer, .. }) => claims(&answer),
            _ => None,
        }
    }

    fn shared(&self) -> SharedCache<'_, dyn Store> {
        SharedCache::new(&*self.store, &self.config.cache, &self.partition)
    }

    fn marker_until(&self, now_ms: u64) -> u64 {
        now_ms + self.config.introspection.as_ref().map_or(0, |i| i.timeout_ms) + GRACE_MS
    }

    /// This worker's own cached answer for a token: the hit path, which
    /// needs the token's hash only.
    pub fn local_answer(&self, hash: &TokenHash, now_ms: u64) -> Option<Verdict> {
        let hit = self.state.borrow().local.get(hash, now_ms).map(|e| e.answer.clone())?;
        self.metrics.cache_hit_local.inc();
        Some(Ok(hit))
    }

    /// The cached answer for a token, or parks request `ctx` until there is one.
    pub fn find_or_wait(&self, hash: TokenHash, token: &Token, ctx: u32, now_ms: u64) -> Found {
        if let Some(verdict) = self.local_answer(&hash, now_ms) {
            return Found::Ready(verdict);
        }
        if self.join_flight(hash, ctx) {
            self.metrics.cache_coalesced.inc();
            return Found::Wait;
        }
        let shared = self.shared();
        match shared.lookup(&hash, now_ms) {
            Ok(Lookup::Hit { answer, until_ms }) => {
                self.metrics.cache_hit_shared.inc();
                return Found::Ready(Ok(self.remember(hash, answer, until_ms, now_ms)));
            }
            Ok(Lookup::Pending) => {
                self.metrics.cache_coalesced.inc();
                self.park_remote(hash, token, ctx, now_ms);
                return Found::Wait;
            }
            Ok(Lookup::Failed { .. } | Lookup::Miss) => {}
            Err(e) => {
                self.metrics.cache_store_errors.inc();
                log::warn!("shared cache read failed: {e:?}");
            }
        }
        self.metrics.cache_miss.inc();
        match shared.claim(&hash, now_ms, self.marker_until(now_ms)) {
            Ok(Claim::Hit { answer, until_ms }) => Found::Ready(Ok(self.remember(hash, answer, until_ms, now_ms))),
            Ok(Claim::Pending) => {
                self.park_remote(hash, token, ctx, now_ms);
                Found::Wait
            }
            Ok(Claim::Owner) | Err(_) => match self.send(hash, token, Some(ctx), now_ms) {
                Ok(()) => Found::Wait,
                Err(e) => {
                    let _ = shared.release(&hash, now_ms);
                    Found::Ready(self.fallback(&hash, e, now_ms))
                }
            },
        }
    }

    /// A JWT of a configured issuer: verified here (`jwt` section) and
    /// cached like an introspection answer; `None` for any other token. A
    /// key the worker lacks parks request `ctx` while the keys are fetched.
    pub fn verify_jwt(
        &self,
        hash: TokenHash,
        token: &[u8],
        ctx: u32,
        need: &Rc<Requirement>,
        now_ms: u64,
    ) -> Option<Result<Found, Denial>> {
        let candidate = crate::jwt_verify::candidate(token, self.config.jwt.as_ref()?)?;
        // Verified on another worker already: a read, not a signature check.
        if let Ok(Lookup::Hit { answer, until_ms }) = self.shared().lookup(&hash, now_ms) {
            self.metrics.cache_hit_shared.inc();
            return Some(Ok(Found::Ready(Ok(self.remember(hash, answer, until_ms, now_ms)))));
        }
        let issuer = candidate.issuer;
        // Keys another worker fetched since this one's last tick count too.
        self.jwks.borrow_mut().sync_one(&*self.store, issuer);
        match self.jwt_verdict(candidate, hash, now_ms) {
            Ok(verdict) => Some(Ok(Found::Ready(verdict))),
            Err(JwtError::UnknownKey | JwtError::NoKeys)
                if self.jwks.borrow_mut().want(&self.jwks_io(), issuer, now_ms) =>
            {
                self.jwks.borrow_mut().park(ctx, issuer, hash, token, need.clone(), now_ms);
                self.tick_fast(true);
                Some(Ok(Found::Wait))
            }
            Err(e) => Some(Err(self.jwt_denial(&hash, e))),
        }
    }

    /// Verifies a JWT with the keys this worker has, and caches the claims.
    fn jwt_verdict(&self, candidate: Candidate<'_>, hash: TokenHash, now_ms: u64) -> Result<Verdict, JwtError> {
        let keys = self.jwks.borrow().keys(candidate.issuer);
        let section = self.config.jwt.as_ref().ok_or(JwtError::NoKeys)?;
        let map = &self.config.claims_to_headers;
        let claims = candidate.verify(section, &keys, now_ms / 1000, &|claim| map.contains_key(claim))?;
        self.metrics.jwt_verified.inc();
        let answer = Answer::Active(claims);
        let Some(until) = cache::cache_until_ms(&answer, &self.config.cache, now_ms) else {
            return Ok(Ok(Rc::new(answer)));
        };
        if let Err(e) = self.shared().store_answer(&hash, &answer, until, until, now_ms) {
            self.metrics.cache_store_errors.inc();
            log::warn!("shared cache write failed: {e:?}");
        }
        Ok(Ok(self.remember(hash, answer, until, now_ms)))
    }

    /// The reply to a JWT that is refused (401) or cannot be checked (503).
    fn jwt_denial(&self, hash: &TokenHash, error: JwtError) -> Denial {
        if error == JwtError::NoKeys {
            return Denial::IdpUnavailable(error.description());
        }
        self.metrics.jwt_refused.inc();
        log::info!("JWT sha256:{} refused: {}", short(hash), error.description());
        Denial::InvalidToken(error.description())
    }

    /// Answers the requests that waited for keys, with the keys there are now.
    fn resume_jwt(&self, ready: Vec<Waiter>) {
        let now = self.host.now_ms();
        for waiter in ready {
            if !self.host.set_effective_context(waiter.ctx) {
                continue;
            }
            // Revoked while it waited: the denylist first, as on arrival.
            if let Err(denial) = self.screen(&waiter.hash, now / 1000) {
                self.deny(&denial);
                continue;
            }
            let candidate = self.config.jwt.as_ref().and_then(|s| crate::jwt_verify::candidate(&waiter.token, s));
            let verdict = match candidate {
                Some(c) => self.jwt_verdict(c, waiter.hash, now).map_err(|e| self.jwt_denial(&waiter.hash, e)),
                None => Err(self.jwt_denial(&waiter.hash, JwtError::Malformed)),
            };
            match verdict {
                Ok(verdict) => {
                    if self.finish(&verdict, &waiter.need, now / 1000) {
                        self.host.resume_request();
                    }
                }
                Err(denial) => self.deny(&denial),
            }
        }
    }

    fn join_flight(&self, hash: TokenHash, ctx: u32) -> bool {
        self.state.borrow_mut().flights.join(hash, ctx)
    }

    fn park_remote(&self, hash: TokenHash, token: &Token, ctx: u32, now_ms: u64) {
        self.state.borrow_mut().flights.wait_remote(hash, token, ctx, now_ms);
        self.tick_fast(true);
    }

    fn remember(&self, hash: TokenHash, answer: Answer, until_ms: u64, now_ms: u64) -> Rc<Answer> {
        let answer = Rc::new(answer);
        self.state.borrow_mut().local.insert(hash, answer.clone(), until_ms, now_ms);
        answer
    }

    /// Sends the introspection callout. With `sender` the callout belongs to
    /// that request context, without it to the root context.
    fn send(&self, hash: TokenHash, token: &Token, sender: Option<u32>, now_ms: u64) -> Result<(), IntrospectionError> {
        let Some(cfg) = &self.config.introspection else {
            return Err(IntrospectionError::Dispatch);
        };
        let sent = dispatch(&*self.host, &cfg.cluster, &introspection::request(cfg, token), cfg.timeout_ms);
        self.metrics.introspection_calls.inc();
        let token_id = match sent {
            Ok(id) => id,
            Err(status) => {
                self.metrics.introspection_failed(&IntrospectionError::Dispatch);
                log::error!("cannot call the introspection endpoint (cluster {:?}): {status:?}", cfg.cluster);
                return Err(IntrospectionError::Dispatch);
            }
        };
        let deadline_ms = now_ms + cfg.timeout_ms + GRACE_MS;
        self.state.borrow_mut().flights.sent(hash, token, sender, token_id, deadline_ms);
        Ok(())
    }

    /// An introspection answer arrived (in a request context or the root).
    pub fn on_callout_response(&self, token_id: u32, num_headers: usize, body_size: usize) {
        if self.jwks.borrow().owns(token_id) {
            let ready = self.jwks.borrow_mut().on_response(&self.jwks_io(), token_id, num_headers, body_size);
            self.resume_jwt(ready);
            self.retune_tick();
            return;
        }
        let now = self.host.now_ms();
        if let (Some(sync), Some(cfg)) = (&self.sync, &self.config.cluster_sync) {
            let mut poller = sync.borrow_mut();
            if poller.owns(token_id) {
                poller.on_response(&self.io(), cfg, &self.denylist(), (token_id, num_headers, body_size), now);
                return;
            }
        }
        let Some(hash) = self.state.borrow_mut().flights.answered(token_id) else {
            return;
        };
        let verdict = self.read_response(num_headers, body_size).map(|answer| self.with_token_identity(&hash, answer));
        let shared = self.shared();
        let verdict = match verdict {
            Ok(answer) => match cache::cache_until_ms(&answer, &self.config.cache, now) {
                Some(until) => {
                    let stale_until = cache::stale_until_ms(&answer, &self.config.cache, until);
                    match shared.store_answer(&hash, &answer, until, stale_until, now) {
                        Ok(Stored::Cached | Stored::Outranked) => Ok(self.remember(hash, answer, until, now)),
                        // Used, not cached: not by this worker either.
                        Ok(Stored::TooLarge) => {
                            self.metrics.cache_uncacheable.inc();
                            Ok(Rc::new(answer))
                        }
                        Err(e) => {
                            self.metrics.cache_store_errors.inc();
                            log::warn!("shared cache write failed: {e:?}");
                            Ok(self.remember(hash, answer, until, now))
                        }
                    }
                }
                None => {
                    let _ = shared.release(&hash, now);
                    Ok(Rc::new(answer))
                }
            },
            Err(e) => {
                self.metrics.introspection_failed(&e);
                log::warn!(
                    "introspection failed for token sha256:{}: {} ({})",
                    short(&hash),
                    e.description(),
                    e.reason()
                );
                let _ = shared.fail(&hash, now);
                self.fallback(&hash, e, now)
            }
        };
        self.land(hash, &verdict);
        self.retune_tick();
    }

    /// The verdict when the IdP failed: a stale answer if
    /// `cache.stale_if_error_s` allows one, else the failure (503).
    fn fallback(&self, hash: &TokenHash, error: IntrospectionError, now: u64) -> Verdict {
        if self.config.cache.stale_if_error_s == 0 {
            return Err(error);
        }
        match self.shared().lookup_stale(hash, now) {
            Ok(Some(answer)) => {
                self.metrics.cache_stale_served.inc();
                log::info!("serving a stale answer for token sha256:{} ({})", short(hash), error.reason());
                Ok(Rc::new(answer))
            }
            _ => Err(error),
        }
    }

    /// A JWT's own `iss` + `jti` name it, whatever the answer says, so that
    /// the admin API (which has only the token) revokes the same identity.
    fn with_token_identity(&self, hash: &TokenHash, answer: Answer) -> Answer {
        let Answer::Active(mut claims) = answer else {
            return answer;
        };
        let state = self.state.borrow();
        if let Some(identity) = state.flights.token(hash).and_then(|t| crate::jwt::payload_identity(t.as_bytes())) {
            claims.identity = Some(identity);
        }
        Answer::Active(claims)
    }

    fn read_response(&self, num_headers: usize, body_size: usize) -> Result<Answer, IntrospectionError> {
        let status = self.host.callout_status(num_headers);
        let max = self.config.introspection.as_ref().map_or(0, |i| i.max_response_bytes);
        let map = &self.config.claims_to_headers;
        introspection::read_answer(status, body_size, max, || self.host.callout_body(body_size), &|claim| {
            map.contains_key(claim)
        })
    }

    /// Answers the requests still waiting for a flight.
    fn resolve(&self, hash: &TokenHash, waiters: &[u32], verdict: &Verdict) {
        let now_s = self.host.now_ms() / 1000;
        // Waiters were checked against the denylist when they arrived; a
        // token, client or subject revoked while they waited is caught here.
        let revoked = match self.token_revoked(hash, now_s) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("denylist read failed: {e:?}");
                true
            }
        };
        for &ctx in waiters {
            // A request that went away leaves no context to act on.
            if !self.host.set_effective_context(ctx) {
                continue;
            }
            let need = self.state.borrow_mut().needs.remove(&ctx);
            let need = need.as_ref().unwrap_or(&self.config.policy.default);
            if revoked {
                self.deny(&Denial::Revoked);
            } else if self.finish(verdict, need, now_s) {
                self.host.resume_request();
            }
        }
    }

    /// Applies a verdict to the current request: sets the claim headers and
    /// returns true, or sends the error reply and returns false.
    pub fn finish(&self, verdict: &Verdict, need: &Requirement, now_s: u64) -> bool {
        let decision = match verdict {
            Ok(answer) => match answer.as_ref() {
                Answer::Active(claims) if self.claims_revoked(claims, now_s) => Err(Denial::Revoked),
                _ => policy::decide(answer, need, now_s),
            },
            Err(e) => Err(Denial::IdpUnavailable(e.description())),
        };
        match decision {
            Ok(claims) => {
                // The client's copies were removed on arrival, so adding is
                // enough (and cheaper for Envoy than a replace).
                let (headers, refused) = policy::claim_headers(claims, &self.config.claims_to_headers);
                for (header, value) in headers {
                    self.host.add_request_header(header, value);
                }
                self.metrics.claims_refused.add(refused);
                if self.config.hide_credentials {
                    self.host.remove_request_header("authorization");
                }
                self.metrics.allowed();
                true
            }
            Err(denial) => {
                self.deny(&denial);
                false
            }
        }
    }

    /// Whether the answer's client, subject or JWT identity is revoked (the
    /// view was refreshed when the request's token hash was checked).
    fn claims_revoked(&self, claims: &crate::introspection::Claims, now_s: u64) -> bool {
        let mut view = self.deny.borrow_mut();
        if view.principal_revoked(claims, now_s, self.config.denylist.clock_skew_s) {
            return true;
        }
        let Some(identity) = &claims.identity else {
            return false;
        };
        view.identity_revoked(&self.denylist(), identity, now_s).unwrap_or_else(|e| {
            // Fail closed: a denylist that cannot be read proves nothing.
            log::warn!("denylist read failed: {e:?}");
            true
        })
    }

    /// Sends the RFC 6750 reply for a denial to the current request.
    pub fn deny(&self, denial: &Denial) {
        self.metrics.denied(denial);
        send_denial(&*self.host, denial, &self.config.realm);
    }

    /// Parked request `ctx` is to meet `need` rather than the top level's.
    pub fn park_need(&self, ctx: u32, need: &Rc<Requirement>) {
        if !Rc::ptr_eq(need, &self.config.policy.default) && self.is_waiting(ctx) {
            self.state.borrow_mut().needs.insert(ctx, need.clone());
        }
    }

    /// Whether request `ctx` is still parked.
    pub fn is_waiting(&self, ctx: u32) -> bool {
        self.state.borrow().flights.is_waiting(ctx) || self.jwks.borrow().is_waiting(ctx)
    }

    /// Request `ctx` ended; if it had sent a callout that others wait on,
    /// the root re-sends it.
    pub fn forget(&self, ctx: u32) {
        let left = {
            let mut state = self.state.borrow_mut();
            state.needs.remove(&ctx);
            state.flights.left(ctx)
        };
        self.jwks.borrow_mut().forget(ctx);
        match left {
            Left::ReleaseMarker(hash) => {
                let _ = self.shared().release(&hash, self.host.now_ms());
            }
            Left::ResendSoon => self.tick_fast(true),
            Left::Nothing => {}
        }
    }

    /// Polls for answers other workers fetch, re-sends orphaned calls and
    /// gives up on callouts Envoy never answered.
    pub fn tick(&self) {
        self.metrics.flush();
        let now = self.host.now_ms();
        if let (Some(sync), Some(cfg)) = (&self.sync, &self.config.cluster_sync) {
            sync.borrow_mut().tick(&self.io(), cfg, now);
        }
        let ready = self.jwks.borrow_mut().tick(&self.jwks_io(), now);
        self.resume_jwt(ready);
        let due = self.state.borrow_mut().flights.due(now);
        for step in due {
            match step {
                Due::Poll { hash, since_ms } => self.poll_remote(hash, since_ms, now),
                Due::Resend { hash, token } => {
                    if let Err(e) = self.send(hash, &token, None, now) {
                        self.land(hash, &self.fallback(&hash, e, now));
                    }
                }
                Due::Expired { hash } => {
                    self.metrics.introspection_failed(&IntrospectionError::Timeout);
                    let _ = self.shared().fail(&hash, now);
                    self.land(hash, &self.fallback(&hash, IntrospectionError::Timeout, now));
                }
            }
        }
        self.retune_tick();
    }

    fn poll_remote(&self, hash: TokenHash, since: u64, now: u64) {
        let shared = self.shared();
        match shared.lookup(&hash, now) {
            Ok(Lookup::Hit { answer, until_ms }) => {
                let answer = self.remember(hash, answer, until_ms, now);
                self.land(hash, &Ok(answer));
            }
            Ok(Lookup::Failed { at_ms }) if at_ms >= since => {
                self.land(hash, &self.fallback(&hash, IntrospectionError::PeerFailed, now))
            }
            Ok(Lookup::Pending) => {}
            // The other worker gave up or vanished: take over.
            Ok(Lookup::Failed { .. } | Lookup::Miss) | Err(_) => match shared.claim(&hash, now, self.marker_until(now))
            {
                Ok(Claim::Hit { answer, until_ms }) => {
                    let answer = self.remember(hash, answer, until_ms, now);
                    self.land(hash, &Ok(answer));
                }
                Ok(Claim::Pending) => {}
                Ok(Claim::Owner) | Err(_) => {
                    let token = self.state.borrow().flights.token(&hash).cloned();
                    if let Some(token) = token {
                        self.metrics.cache_miss.inc();
                        if let Err(e) = self.send(hash, &token, None, now) {
                            let _ = shared.release(&hash, now);
                            self.land(hash, &self.fallback(&hash, e, now));
                        }
                    }
                }
            },
        }
    }

    /// Ends a flight with a verdict.
    fn land(&self, hash: TokenHash, verdict: &Verdict) {
        let waiters = self.state.borrow_mut().flights.land(&hash);
        self.resolve(&hash, &waiters, verdict);
    }

    fn tick_fast(&self, fast: bool) {
        let mut state = self.state.borrow_mut();
        if state.fast_tick != fast {
            state.fast_tick = fast;
            drop(state);
            self.host.set_tick_period(if fast { FAST_TICK } else { self.slow_tick() });
        }
    }

    fn retune_tick(&self) {
        let fast = self.state.borrow().flights.needs_fast_tick() || self.jwks.borrow().has_waiters();
        self.tick_fast(fast);
    }
}

/// The first 12 hex digits of a token's hash: enough to match log lines
/// with the admin API, never the token.
pub fn short(hash: &TokenHash) -> String {
    cache::hex(hash).chars().take(12).collect()
}

/// Sends an RFC 6750 reply to the current request.
pub fn send_denial(host: &dyn Host, denial: &Denial, realm: &str) {
    let reply = denial.reply(realm);
    let challenge = reply.challenge.as_deref().map(|c| ("www-authenticate", c));
    crate::host::send_json(host, reply.status, challenge.as_slice(), Some(&reply.body));
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
