//! The request path and its flights on the host: real `Filter`s and
//! `Worker`s over `FakeHost` (Envoy) and `MemoryStore` (shared data), with
//! callout answers, ticks and disconnects delivered in the orders the e2e
//! suite found races in.

use super::*;
use crate::bearer;
use crate::filter::Filter;
use crate::host::fake::{Event, FakeHost};
use crate::store::{MemoryStore, Store};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use sha2::Digest;

const CONFIG: &str = r#"{
    "introspection": {"cluster": "idp", "authority": "idp", "path": "/introspect",
                      "client_id": "gw", "client_secret": "s", "timeout_ms": 1000},
    "required_scopes": ["read"]
}"#;
const T0: u64 = 1_800_000_000_000;
const ACTIVE: &[u8] = br#"{"active": true, "scope": "read", "sub": "alice", "client_id": "app"}"#;

/// One worker (one VM's root context) on a shared store.
struct Rig {
    host: Rc<FakeHost>,
    worker: Rc<Worker>,
}

impl Rig {
    fn new(store: &Rc<MemoryStore>) -> Rig {
        Rig::with_config(store, CONFIG)
    }

    fn with_config(store: &Rc<MemoryStore>, config: &str) -> Rig {
        Rig::on_store(store.clone(), config)
    }

    fn on_store(store: Rc<dyn Store>, config: &str) -> Rig {
        let host = Rc::new(FakeHost::new(T0));
        let config = Config::parse(config.as_bytes()).unwrap();
        let worker = Worker::new(config, Metrics::default(), host.clone(), store);
        Rig { host, worker: Rc::new(worker) }
    }

    /// A request with this token arrives on context `ctx`.
    fn request(&self, ctx: u32, token: &str) -> (Filter, Action) {
        let auth = format!("Bearer {token}");
        self.host.request(ctx, &[(":method", "GET"), (":path", "/"), ("authorization", &auth)]);
        let mut filter = Filter::new(ctx, Some(self.worker.clone()), self.host.clone());
        let action = filter.on_http_request_headers(3, true);
        (filter, action)
    }

    /// The IdP answers callout `id`.
    fn answer(&self, id: u32, status: Option<u32>, body: &[u8]) {
        let (num_headers, body_size) = self.host.answer(status, body);
        self.worker.on_callout_response(id, num_headers, body_size);
    }

    fn callout_ids(&self) -> Vec<u32> {
        self.host.callouts.borrow().iter().map(|c| c.id).collect()
    }

    fn tick_after(&self, ms: u64) {
        self.host.advance(ms);
        self.worker.tick();
    }

    /// Resumed contexts and (context, status) of local replies, in order.
    fn outcomes(&self) -> (Vec<u32>, Vec<(u32, u32)>) {
        let (mut resumed, mut replies) = (Vec::new(), Vec::new());
        for event in self.host.take_events() {
            match event {
                Event::Resume { ctx } => resumed.push(ctx),
                Event::Reply { ctx, status, .. } => replies.push((ctx, status)),
                _ => {}
            }
        }
        (resumed, replies)
    }
}

fn store() -> Rc<MemoryStore> {
    Rc::new(MemoryStore::new())
}

#[test]
fn a_cold_miss_sends_one_introspection_and_resumes_every_waiter_with_its_claims() {
    let rig = Rig::new(&store());
    let (_f1, a1) = rig.request(1, "tok-1");
    let (_f2, a2) = rig.request(2, "tok-1");
    assert_eq!((a1, a2), (Action::Pause, Action::Pause));
    let callout = rig.host.last_callout().unwrap();
    assert_eq!(rig.callout_ids(), vec![callout.id], "the second request joined the flight");
    assert_eq!(callout.cluster, "idp");
    assert_eq!(String::from_utf8_lossy(&callout.body), "token=tok-1&token_type_hint=access_token");
    assert!(callout.headers.contains(&(":path".into(), "/introspect".into())));

    rig.answer(callout.id, Some(200), ACTIVE);
    let events = rig.host.take_events();
    for ctx in [1, 2] {
        assert!(events.contains(&Event::Resume { ctx }), "{events:?}");
        let subject = Event::AddHeader { ctx, name: "x-auth-subject".into(), value: "alice".into() };
        assert!(events.contains(&subject), "{events:?}");
    }
    // Cached: the next request passes at once, with no callout.
    let (_f3, a3) = rig.request(3, "tok-1");
    assert_eq!((a3, rig.callout_ids().len()), (Action::Continue, 1));
}

#[test]
fn another_worker_waits_for_the_marker_instead_of_asking_again() {
    let shared = store();
    let (a, b) = (Rig::new(&shared), Rig::new(&shared));
    let (_fa, _) = rig_request(&a, 1, "tok-2");
    let (_fb, action) = rig_request(&b, 7, "tok-2");
    assert_eq!(action, Action::Pause);
    assert!(b.callout_ids().is_empty(), "B saw A's Pending marker");
    assert_eq!(b.host.tick.get(), Some(FAST_TICK), "B polls while it waits");

    a.answer(a.callout_ids()[0], Some(200), ACTIVE);
    assert_eq!(a.outcomes(), (vec![1], vec![]));
    b.tick_after(10);
    assert_eq!(b.outcomes(), (vec![7], vec![]));
    assert!(b.callout_ids().is_empty());
    assert_eq!(b.host.tick.get(), Some(SLOW_TICK), "nothing left to poll for");
}

fn rig_request(rig: &Rig, ctx: u32, token: &str) -> (Filter, Action) {
    rig.request(ctx, token)
}

#[test]
fn a_marker_that_never_resolves_is_taken_over() {
    let shared = store();
    let (a, b) = (Rig::new(&shared), Rig::new(&shared));
    let (_fa, _) = a.request(1, "tok-3");
    let (_fb, _) = b.request(7, "tok-3");
    // A's VM dies with the callout out: its marker lives timeout + grace.
    b.tick_after(500);
    assert!(b.callout_ids().is_empty(), "still A's turn");
    b.tick_after(1_000 + GRACE_MS);
    let ids = b.callout_ids();
    assert_eq!(ids.len(), 1, "B took over once");
    b.answer(ids[0], Some(200), ACTIVE);
    assert_eq!(b.outcomes(), (vec![7], vec![]));
}

#[test]
fn a_sender_that_disconnects_leaves_the_call_to_the_root() {
    let rig = Rig::new(&store());
    let (mut sender, _) = rig.request(1, "tok-4");
    let (_waiter, _) = rig.request(2, "tok-4");
    let first = rig.callout_ids()[0];
    sender.on_done(); // Envoy cancels the sender's callout with it
    assert_eq!(rig.host.tick.get(), Some(FAST_TICK));
    rig.tick_after(10);
    let ids = rig.callout_ids();
    assert_eq!(ids.len(), 2, "re-sent from the root");
    // The cancelled call's answer, should one still come, belongs to nobody.
    rig.answer(first, Some(200), ACTIVE);
    assert_eq!(rig.outcomes(), (vec![], vec![]));
    rig.answer(ids[1], Some(200), ACTIVE);
    assert_eq!(rig.outcomes(), (vec![2], vec![]));
}

#[test]
fn a_sender_that_disconnects_alone_releases_the_marker() {
    let shared = store();
    let (a, b) = (Rig::new(&shared), Rig::new(&shared));
    let (mut sender, _) = a.request(1, "tok-5");
    sender.on_done();
    a.tick_after(10);
    assert_eq!(a.callout_ids().len(), 1, "nobody waits: no re-send");
    // Another worker asks at once instead of waiting for a marker nobody answers.
    let (_fb, _) = b.request(7, "tok-5");
    assert_eq!(b.callout_ids().len(), 1);
}

#[test]
fn a_token_revoked_while_its_requests_wait_is_refused_when_the_answer_comes() {
    let rig = Rig::new(&store());
    let (_f, _) = rig.request(1, "tok-6");
    let token = bearer::parse(&[b"Bearer tok-6"], 4096).unwrap();
    let hash = cache::hash_token(&token);
    rig.worker.denylist().revoke_tokens(&[(hash, T0 / 1000 + 60)], "leak", T0 / 1000).unwrap();
    rig.answer(rig.callout_ids()[0], Some(200), ACTIVE);
    assert_eq!(rig.outcomes(), (vec![], vec![(1, 401)]));
}

#[test]
fn an_answer_after_its_deadline_is_ignored_and_the_waiters_got_503() {
    let rig = Rig::new(&store());
    let (_f1, _) = rig.request(1, "tok-7");
    let (_f2, _) = rig.request(2, "tok-7");
    let id = rig.callout_ids()[0];
    rig.tick_after(1_000 + GRACE_MS + 1);
    assert_eq!(rig.outcomes(), (vec![], vec![(1, 503), (2, 503)]));
    rig.answer(id, Some(200), ACTIVE);
    assert_eq!(rig.outcomes(), (vec![], vec![]), "no second answer to anyone");
    // Nothing was cached from the failure: the next request asks again.
    let (_f3, _) = rig.request(3, "tok-7");
    assert_eq!(rig.callout_ids().len(), 2);
}

#[test]
fn a_failed_introspection_reaches_the_waiters_on_other_workers_as_503() {
    let shared = store();
    let (a, b) = (Rig::new(&shared), Rig::new(&shared));
    let (_fa, _) = a.request(1, "tok-8");
    let (_fb, _) = b.request(7, "tok-8");
    a.answer(a.callout_ids()[0], Some(500), b"oops");
    assert_eq!(a.outcomes(), (vec![], vec![(1, 503)]));
    b.tick_after(10);
    assert_eq!(b.outcomes(), (vec![], vec![(7, 503)]));
    assert!(b.callout_ids().is_empty(), "B does not retry a failure it waited for");
}

#[test]
fn a_callout_envoy_refuses_answers_503_at_once() {
    let rig = Rig::new(&store());
    rig.host.refuse_dispatch.set(true);
    let (_f, action) = rig.request(1, "tok-9");
    assert_eq!(action, Action::Pause);
    assert_eq!(rig.outcomes(), (vec![], vec![(1, 503)]));
    // The marker was released: once Envoy takes calls again, the token is asked about.
    rig.host.refuse_dispatch.set(false);
    let (_f, _) = rig.request(2, "tok-9");
    assert_eq!(rig.callout_ids().len(), 1);
}

#[test]
fn an_inactive_answer_is_401_and_is_remembered_for_negative_ttl_s() {
    let rig = Rig::new(&store());
    let (_f, _) = rig.request(1, "tok-10");
    rig.answer(rig.callout_ids()[0], Some(200), br#"{"active": false}"#);
    assert_eq!(rig.outcomes(), (vec![], vec![(1, 401)]));
    let (_f, _) = rig.request(2, "tok-10");
    assert_eq!((rig.callout_ids().len(), rig.outcomes().1), (1, vec![(2, 401)]));
    rig.host.advance(5_000);
    let (_f, _) = rig.request(3, "tok-10");
    assert_eq!(rig.callout_ids().len(), 2, "forgotten after negative_ttl_s");
}

#[test]
fn an_answer_over_max_entry_bytes_is_used_and_asked_again_next_time() {
    let config = r#"{"introspection": {"cluster": "idp", "authority": "idp", "path": "/i"},
        "claims_to_headers": {"sub": "x-auth-subject", "group": "x-auth-group"},
        "cache": {"max_entry_bytes": 256}}"#;
    let rig = Rig::with_config(&store(), config);
    let big = format!(r#"{{"active": true, "sub": "alice", "group": "{}"}}"#, "g".repeat(400));
    let (_f, _) = rig.request(1, "tok-11");
    rig.answer(rig.callout_ids()[0], Some(200), big.as_bytes());
    assert_eq!(rig.outcomes(), (vec![1], vec![]));
    let (_f, _) = rig.request(2, "tok-11");
    assert_eq!(rig.callout_ids().len(), 2, "neither the shared nor the worker's cache kept it");
}

/// Shared data that fails on demand, as Envoy's host call can.
#[derive(Default)]
struct FlakyStore {
    inner: MemoryStore,
    fail_reads: std::cell::Cell<bool>,
    fail_writes: std::cell::Cell<bool>,
}

impl Store for FlakyStore {
    fn get(&self, key: &str) -> Result<Option<crate::store::Versioned>, crate::store::StoreError> {
        if self.fail_reads.get() {
            return Err(crate::store::StoreError::Host);
        }
        self.inner.get(key)
    }

    fn set(&self, key: &str, value: &[u8], guard: crate::store::Guard) -> Result<(), crate::store::StoreError> {
        if self.fail_writes.get() {
            return Err(crate::store::StoreError::Host);
        }
        self.inner.set(key, value, guard)
    }
}

fn flaky_rig(config: &str) -> (Rig, Rc<FlakyStore>) {
    let store = Rc::new(FlakyStore::default());
    (Rig::on_store(store.clone(), config), store)
}

#[test]
fn a_shared_cache_that_cannot_be_written_still_serves_the_request() {
    let (rig, store) = flaky_rig(CONFIG);
    store.fail_writes.set(true);
    let (_f, _) = rig.request(1, "tok-12");
    rig.answer(rig.callout_ids()[0], Some(200), ACTIVE);
    assert_eq!(rig.outcomes(), (vec![1], vec![]));
}

#[test]
fn a_denylist_that_cannot_be_read_fails_closed_with_503() {
    let (rig, store) = flaky_rig(CONFIG);
    store.fail_reads.set(true);
    let (_f, action) = rig.request(1, "tok-13");
    assert_eq!(action, Action::Pause);
    let events = rig.host.take_events();
    let [Event::Reply { status: 503, headers, body, .. }] = events.as_slice() else { panic!("{events:?}") };
    assert!(body.contains("temporarily_unavailable"), "{body}");
    assert!(headers.iter().all(|(n, _)| n != "www-authenticate"), "no challenge on a 503");
    assert!(rig.callout_ids().is_empty(), "nothing is asked of the IdP for an unproven revocation state");
}

#[test]
fn an_admin_change_that_cannot_be_written_is_503_with_retry_after() {
    let admin_hash: String = sha2::Sha256::digest(b"admin-token").iter().map(|b| format!("{b:02x}")).collect();
    let config = format!(
        r#"{{"introspection": {{"cluster": "idp", "authority": "idp", "path": "/i"}},
            "admin": {{"token_sha256": "{admin_hash}"}}}}"#
    );
    let (rig, store) = flaky_rig(&config);
    store.fail_writes.set(true);
    rig.host.request(
        1,
        &[
            (":method", "DELETE"),
            (":path", "/tokengate/revocations/client:app"),
            ("authorization", "Bearer admin-token"),
        ],
    );
    let mut filter = Filter::new(1, Some(rig.worker.clone()), rig.host.clone());
    // The undo reads first: reading works, there is nothing to undo.
    filter.on_http_request_headers(3, true);
    let events = rig.host.take_events();
    assert!(matches!(events.as_slice(), [Event::Reply { status: 404, .. }]), "{events:?}");
    // A revocation must write: it cannot, so the admin is told to retry.
    let body = "token=tok-14";
    let length = body.len().to_string();
    rig.host.request(
        2,
        &[
            (":method", "POST"),
            (":path", "/tokengate/revoke"),
            ("authorization", "Bearer admin-token"),
            ("content-type", "application/x-www-form-urlencoded"),
            ("content-length", &length),
        ],
    );
    rig.host.bodies.borrow_mut().insert(2, body.as_bytes().to_vec());
    let mut filter = Filter::new(2, Some(rig.worker.clone()), rig.host.clone());
    filter.on_http_request_headers(5, false);
    filter.on_http_request_body(body.len(), true);
    let events = rig.host.take_events();
    let Some(Event::Reply { status: 503, headers, body, .. }) =
        events.iter().find(|e| matches!(e, Event::Reply { .. }))
    else {
        panic!("{events:?}")
    };
    assert!(headers.contains(&("retry-after".into(), "1".into())), "{headers:?}");
    assert!(body.contains("temporarily_unavailable"), "{body}");
}

/// A token of the largest size accepted, as JWT access tokens come close to.
fn large_token(last: char) -> String {
    let mut token = "L".repeat(bearer::DEFAULT_MAX_TOKEN_BYTES - 1);
    token.push(last);
    token
}

fn sha256(token: &str) -> TokenHash {
    cache::hash_token(&bearer::parse(&[format!("Bearer {token}").as_bytes()], bearer::DEFAULT_MAX_TOKEN_BYTES).unwrap())
}

#[test]
fn a_token_every_worker_has_hashed_is_refused_on_the_next_request_once_revoked() {
    let shared = store();
    let (a, b) = (Rig::new(&shared), Rig::new(&shared));
    let token = large_token('A');
    let (_f, _) = a.request(1, &token);
    a.answer(a.callout_ids()[0], Some(200), ACTIVE);
    let (_f, _) = b.request(2, &token);
    assert_eq!((a.outcomes().0, b.outcomes().0), (vec![1], vec![]), "B's is a shared hit: resumed in place");
    for (rig, ctx) in [(&a, 3), (&b, 4)] {
        let (_f, action) = rig.request(ctx, &token);
        assert_eq!(action, Action::Continue);
        assert_eq!(rig.worker.memo.borrow().get(token.as_bytes()), Some(sha256(&token)), "the worker remembers it");
    }
    a.worker.denylist().revoke_tokens(&[(sha256(&token), T0 / 1000 + 60)], "leak", T0 / 1000).unwrap();
    for (rig, ctx) in [(&a, 5), (&b, 6)] {
        let (_f, action) = rig.request(ctx, &token);
        assert_eq!((action, rig.outcomes()), (Action::Pause, (vec![], vec![(ctx, 401)])));
    }
    assert_eq!(a.callout_ids().len() + b.callout_ids().len(), 1, "one introspection in all");
}

#[test]
fn a_remembered_token_never_answers_for_one_a_byte_away() {
    let rig = Rig::new(&store());
    let (_f, _) = rig.request(1, &large_token('A'));
    rig.answer(rig.callout_ids()[0], Some(200), ACTIVE);
    let (_f, action) = rig.request(2, &large_token('A'));
    assert_eq!(action, Action::Continue);
    let (_f, action) = rig.request(3, &large_token('B'));
    assert_eq!((action, rig.callout_ids().len()), (Action::Pause, 2), "introspected, not taken from the memo");
    rig.answer(rig.callout_ids()[1], Some(200), br#"{"active": false}"#);
    assert_eq!(rig.outcomes(), (vec![1], vec![(3, 401)]));
    // And a malformed token the same length as a remembered one is still refused.
    let (_f, _) = rig.request(4, &large_token(','));
    assert_eq!(rig.outcomes(), (vec![], vec![(4, 400)]));
}

#[test]
fn the_hash_memo_holds_at_most_hash_memo_entries_tokens() {
    let config = CONFIG.replace(r#""required_scopes""#, r#""cache": {"hash_memo_entries": 2}, "required_scopes""#);
    let rig = Rig::with_config(&store(), &config);
    for (ctx, token) in (1..).zip(["tok-a", "tok-b", "tok-c", "tok-a"]) {
        let (_f, _) = rig.request(ctx, token);
        assert!(rig.worker.memo.borrow().len() <= 2);
    }
    assert_eq!(rig.worker.memo.borrow().get(b"tok-a"), Some(sha256("tok-a")));
    // 0 turns it off: every request hashes its token.
    let config = CONFIG.replace(r#""required_scopes""#, r#""cache": {"hash_memo_entries": 0}, "required_scopes""#);
    let rig = Rig::with_config(&store(), &config);
    let (_f, _) = rig.request(1, "tok-a");
    rig.answer(rig.callout_ids()[0], Some(200), ACTIVE);
    let (_f, action) = rig.request(2, "tok-a");
    assert_eq!((action, rig.worker.memo.borrow().is_empty()), (Action::Continue, true));
}

/// Per-route policy (`rules`, route metadata, preflights) on the request path.
mod routes {
    use super::*;

    const RULES: &str = r#"{
        "introspection": {"cluster": "idp", "authority": "idp", "path": "/introspect", "timeout_ms": 1000},
        "required_scopes": ["read"],
        "audiences": ["orders-api"],
        "pass_cors_preflight": true,
        "route_metadata": true,
        "rules": [
            {"match": {"path": "/healthz"}, "require": {"token": "none"}},
            {"match": {"path": "/orders", "methods": ["POST"]}, "require": {"scopes": ["orders:write"]}},
            {"match": {"prefix": "/catalog"}, "require": {"token": "optional"}}
        ]
    }"#;

    fn rig() -> Rig {
        let host = Rc::new(FakeHost::new(T0));
        let config = Config::parse(RULES.as_bytes()).unwrap();
        let worker = Worker::new(config, Metrics::default(), host.clone(), store());
        Rig { host, worker: Rc::new(worker) }
    }

    fn send(rig: &Rig, ctx: u32, headers: &[(&str, &str)]) -> Action {
        rig.host.request(ctx, headers);
        Filter::new(ctx, Some(rig.worker.clone()), rig.host.clone()).on_http_request_headers(headers.len(), true)
    }

    #[test]
    fn a_waiting_request_is_judged_by_its_own_rule_not_the_top_level() {
        let rig = rig();
        let read = |ctx| [(":method", "GET"), (":path", "/orders"), ("authorization", "Bearer t"), ("x", ctx)];
        let write = [(":method", "POST"), (":path", "/orders"), ("authorization", "Bearer t")];
        assert_eq!(send(&rig, 1, &read("1")), Action::Pause);
        assert_eq!(send(&rig, 2, &write), Action::Pause);
        let id = rig.host.last_callout().unwrap().id;
        rig.answer(id, Some(200), br#"{"active": true, "scope": "read", "aud": ["orders-api"]}"#);
        // The GET meets the top level; the POST lacks orders:write.
        assert_eq!(rig.outcomes(), (vec![1], vec![(2, 403)]));
        // And again from the cache.
        assert_eq!(send(&rig, 3, &write), Action::Pause);
        assert_eq!(rig.outcomes(), (vec![], vec![(3, 403)]));
    }

    #[test]
    fn a_token_for_another_audience_is_invalid() {
        let rig = rig();
        let get = [(":method", "GET"), (":path", "/orders"), ("authorization", "Bearer t")];
        send(&rig, 1, &get);
        let id = rig.host.last_callout().unwrap().id;
        rig.answer(id, Some(200), br#"{"active": true, "scope": "read", "aud": "billing-api"}"#);
        let replies: Vec<_> = rig.host.take_events().into_iter().filter(|e| matches!(e, Event::Reply { .. })).collect();
        let body = r#"{"error":"invalid_token","error_description":"the token is not meant for this audience"}"#;
        let [Event::Reply { ctx: 1, status: 401, headers, body: sent }] = replies.as_slice() else {
            panic!("{replies:?}")
        };
        assert_eq!(sent, body);
        let challenge = headers.iter().find(|(n, _)| n == "www-authenticate").map(|(_, v)| v.as_str());
        assert_eq!(
            challenge,
            Some(
                r#"Bearer realm="tokengate", error="invalid_token", error_description="the token is not meant for this audience""#
            )
        );
    }

    #[test]
    fn public_optional_and_preflight_requests_pass_without_a_token_but_lose_client_claim_headers() {
        let rig = rig();
        for (ctx, method, path, extra) in [
            (1, "GET", "/healthz", None),
            (2, "GET", "/catalog/1", None),
            (3, "OPTIONS", "/orders", Some(("access-control-request-method", "POST"))),
        ] {
            let mut headers = vec![(":method", method), (":path", path), ("x-auth-subject", "root"), ("origin", "o")];
            headers.extend(extra);
            assert_eq!(send(&rig, ctx, &headers), Action::Continue, "{path}");
            let removed = Event::RemoveHeader { ctx, name: "x-auth-subject".into() };
            assert_eq!(rig.host.take_events(), vec![removed], "{path}");
        }
        // A plain OPTIONS is no preflight, and an optional route checks a token it is given.
        assert_eq!(send(&rig, 4, &[(":method", "OPTIONS"), (":path", "/orders")]), Action::Pause);
        assert_eq!(rig.outcomes(), (vec![], vec![(4, 401)]));
        let with_token = [(":method", "GET"), (":path", "/catalog/1"), ("authorization", "Bearer bad")];
        assert_eq!(send(&rig, 5, &with_token), Action::Pause);
        rig.answer(rig.host.last_callout().unwrap().id, Some(200), br#"{"active": false}"#);
        assert_eq!(rig.outcomes(), (vec![], vec![(5, 401)]));
    }

    #[test]
    fn route_metadata_wins_over_the_rules() {
        let rig = rig();
        let key = "xds.route_metadata.filter_metadata.tokengate.require";
        rig.host.properties.borrow_mut().insert(key.into(), br#"{"token": "none"}"#.to_vec());
        assert_eq!(send(&rig, 1, &[(":method", "POST"), (":path", "/orders")]), Action::Continue);
        rig.host.properties.borrow_mut().insert(key.into(), br#"{"scopes": ["x"], "oops": 1}"#.to_vec());
        assert_eq!(send(&rig, 2, &[(":method", "GET"), (":path", "/healthz")]), Action::Pause);
        assert_eq!(rig.outcomes(), (vec![], vec![(2, 503)]));
    }
}

#[test]
fn max_token_bytes_bounds_the_token_a_request_may_carry() {
    let config = CONFIG.replace(r#""required_scopes""#, r#""max_token_bytes": 8192, "required_scopes""#);
    let rig = Rig::with_config(&store(), &config);
    let (_f1, at_bound) = rig.request(1, &"J".repeat(8192));
    assert_eq!((at_bound, rig.callout_ids().len()), (Action::Pause, 1), "a token of exactly the bound is introspected");
    let (_f2, over) = rig.request(2, &"J".repeat(8193));
    assert_eq!(over, Action::Pause);
    assert_eq!(rig.outcomes(), (vec![], vec![(2, 400)]), "one byte more is invalid_request, never introspected");
    assert_eq!(rig.callout_ids().len(), 1);
}

#[test]
fn initial_sync_timeout_s_ends_the_wait_for_an_unreachable_etcd_and_serves_with_what_is_known() {
    let sync =
        r#""cluster_sync": {"cluster": "etcd", "authority": "etcd", "initial_sync_timeout_s": 2}, "required_scopes""#;
    let config = CONFIG.replace(r#""required_scopes""#, sync);
    let host = Rc::new(FakeHost::new(T0));
    let worker = Worker::new(Config::parse(config.as_bytes()).unwrap(), Metrics::default(), host.clone(), store());
    let rig = Rig { host: host.clone(), worker: Rc::new(worker.with_sync("root-1".into())) };
    host.refuse_dispatch.set(true);
    rig.worker.tick();
    let (_f1, _) = rig.request(1, "tok-wait");
    assert_eq!(rig.outcomes(), (vec![], vec![(1, 503)]), "etcd never read: denylist_loading");
    rig.tick_after(1_900);
    let (_f2, _) = rig.request(2, "tok-wait");
    assert_eq!(rig.outcomes(), (vec![], vec![(2, 503)]), "still within the bound");
    rig.tick_after(200);
    host.refuse_dispatch.set(false);
    let (_f3, action) = rig.request(3, "tok-wait");
    assert_eq!((action, rig.outcomes()), (Action::Pause, (vec![], vec![])), "past the bound: introspected");
    assert_eq!(rig.host.last_callout().unwrap().cluster, "idp");
}

/// Keys fetched from a JWKS endpoint (`jwt.issuers[].jwks`): once per
/// process, shared by every worker, last good keys kept, unknown `kid`s refetched.
mod jwks_fetch {
    use super::*;
    use crate::jwt_verify::tests::{claims, jwks, token, ISS};

    fn config() -> String {
        format!(
            r#"{{"introspection": {{"cluster": "idp", "authority": "idp", "path": "/introspect", "timeout_ms": 1000}},
                "jwt": {{"issuers": [{{"issuer": "{ISS}", "audiences": ["api"], "algorithms": ["ES256", "EdDSA"],
                         "jwks": {{"cluster": "keys", "authority": "idp", "path": "/jwks", "timeout_ms": 1000,
                                   "refresh_s": 60, "min_refetch_s": 5}}}}]}}}}"#
        )
    }

    /// The test keys whose `kid` is listed, as a JWKS document.
    fn jwks_of(kids: &[&str]) -> Vec<u8> {
        let all = jwks();
        let keys: Vec<_> = all["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| kids.contains(&k["kid"].as_str().unwrap()))
            .cloned()
            .collect();
        serde_json::json!({ "keys": keys }).to_string().into_bytes()
    }

    /// A token valid at T0, signed by test key `kid` (`d1` EdDSA, any other ES256).
    fn jwt(kid: &str, jti: &str) -> String {
        let mut c = claims();
        c["exp"] = serde_json::json!(T0 / 1000 + 600);
        c["iat"] = serde_json::json!(T0 / 1000 - 10);
        c["jti"] = serde_json::json!(jti);
        token(if kid == "d1" { "EdDSA" } else { "ES256" }, kid, &c)
    }

    fn fetches(rig: &Rig) -> Vec<u32> {
        rig.host.callouts.borrow().iter().filter(|c| c.cluster == "keys").map(|c| c.id).collect()
    }

    #[test]
    fn keys_are_fetched_once_per_process_and_every_worker_uses_them() {
        let shared = store();
        let (a, b) = (Rig::with_config(&shared, &config()), Rig::with_config(&shared, &config()));
        a.tick_after(1000);
        b.tick_after(1000);
        let ids = fetches(&a);
        assert_eq!((ids.len(), fetches(&b).len()), (1, 0), "B saw A's lease");
        let call = a.host.last_callout().unwrap();
        for header in [(":method", "GET"), (":path", "/jwks"), (":authority", "idp")] {
            assert!(call.headers.contains(&(header.0.into(), header.1.into())), "{:?}", call.headers);
        }
        a.answer(ids[0], Some(200), &jwks_of(&["e1"]));
        b.tick_after(1000);
        let (_f, action) = b.request(1, &jwt("e1", "j1"));
        assert_eq!(action, Action::Continue);
        assert!(b.callout_ids().is_empty(), "B neither fetched keys nor introspected");
        // Ticks before refresh_s fetch nothing more, on either worker.
        for _ in 0..50 {
            a.tick_after(1000);
            b.tick_after(1000);
        }
        assert_eq!((fetches(&a).len(), fetches(&b).len()), (1, 0));
        // Past refresh_s one of them fetches again.
        a.tick_after(10_000);
        b.tick_after(10_000);
        assert_eq!(fetches(&a).len() + fetches(&b).len(), 2);
    }

    #[test]
    fn keys_another_worker_fetched_are_used_before_this_worker_ticks() {
        let shared = store();
        let (a, b) = (Rig::with_config(&shared, &config()), Rig::with_config(&shared, &config()));
        a.tick_after(1000);
        a.answer(fetches(&a)[0], Some(200), &jwks_of(&["e1"]));
        // B has not ticked since: it reads the shared keys on the request itself.
        assert_eq!(b.request(1, &jwt("e1", "j1")).1, Action::Continue);
        assert!(fetches(&b).is_empty());
    }

    #[test]
    fn a_request_before_the_first_fetch_waits_for_the_keys() {
        let rig = Rig::with_config(&store(), &config());
        let (_f, action) = rig.request(1, &jwt("e1", "j1"));
        assert_eq!(action, Action::Pause);
        assert_eq!(rig.host.tick.get(), Some(FAST_TICK), "the fetch starts on the next tick");
        rig.tick_after(10);
        let ids = fetches(&rig);
        assert_eq!(ids.len(), 1);
        assert!(rig.worker.is_waiting(1));
        rig.answer(ids[0], Some(200), &jwks_of(&["e1"]));
        assert_eq!(rig.outcomes(), (vec![1], vec![]));
        assert!(!rig.worker.is_waiting(1));
    }

    #[test]
    fn no_keys_at_all_is_503_and_a_failed_refresh_keeps_the_last_good_keys() {
        let rig = Rig::with_config(&store(), &config());
        let (_f1, _) = rig.request(1, &jwt("e1", "j1"));
        rig.tick_after(10);
        rig.answer(fetches(&rig)[0], Some(503), b"down");
        assert_eq!(rig.outcomes(), (vec![], vec![(1, 503)]), "fail closed: no keys");
        // Within min_refetch_s: answered at once, no new fetch.
        let (_f2, action) = rig.request(2, &jwt("e1", "j2"));
        assert_eq!((action, fetches(&rig).len()), (Action::Pause, 1));
        assert_eq!(rig.outcomes(), (vec![], vec![(2, 503)]));
        // The endpoint is back: the next fetch (min_refetch_s later) gets keys.
        rig.tick_after(5000);
        rig.answer(*fetches(&rig).last().unwrap(), Some(200), &jwks_of(&["e1"]));
        assert_eq!(rig.request(3, &jwt("e1", "j3")).1, Action::Continue);
        // Down again at the refresh: the keys it had stay in use.
        rig.tick_after(60_000);
        assert_eq!(fetches(&rig).len(), 3);
        rig.answer(*fetches(&rig).last().unwrap(), None, b"");
        assert_eq!(rig.request(4, &jwt("e1", "j4")).1, Action::Continue);
        let too_large = vec![b' '; 70_000];
        rig.tick_after(5000);
        rig.answer(*fetches(&rig).last().unwrap(), Some(200), &too_large);
        assert_eq!(rig.request(5, &jwt("e1", "j5")).1, Action::Continue, "an oversized document is a failed fetch");
        rig.tick_after(5000);
        rig.answer(*fetches(&rig).last().unwrap(), Some(200), br#"{"keys": []}"#);
        assert_eq!(rig.request(6, &jwt("e1", "j6")).1, Action::Continue, "an empty key set is a failed fetch");
        assert_eq!(fetches(&rig).len(), 5);
    }

    #[test]
    fn an_unknown_kid_fetches_once_and_the_rate_limit_answers_the_rest_at_once() {
        let rig = Rig::with_config(&store(), &config());
        rig.tick_after(1000);
        rig.answer(fetches(&rig)[0], Some(200), &jwks_of(&["e1"]));
        // The IdP rotated: a token signed with a key published since.
        rig.tick_after(5000);
        let (_f1, action) = rig.request(1, &jwt("d1", "j1"));
        let (_f2, _) = rig.request(2, &jwt("d1", "j2"));
        assert_eq!(action, Action::Pause);
        rig.tick_after(10);
        assert_eq!(fetches(&rig).len(), 2, "one refetch for both requests");
        rig.answer(fetches(&rig)[1], Some(200), &jwks_of(&["e1", "d1"]));
        assert_eq!(rig.outcomes(), (vec![1, 2], vec![]));
        assert_eq!(rig.request(3, &jwt("e1", "j3")).1, Action::Continue, "the old key is still published");
        // A kid nobody publishes: the next refetch is not allowed yet, 401 at once.
        let (_f4, _) = rig.request(4, &jwt("x9", "j4"));
        let (resumed, replies) = rig.outcomes();
        assert_eq!((resumed, replies), (vec![], vec![(4, 401)]));
        assert_eq!(fetches(&rig).len(), 2);
    }

    #[test]
    fn a_waiting_request_that_goes_away_is_forgotten() {
        let rig = Rig::with_config(&store(), &config());
        let (_f, _) = rig.request(1, &jwt("e1", "j1"));
        rig.worker.forget(1);
        assert!(!rig.worker.is_waiting(1));
        rig.tick_after(10);
        rig.answer(fetches(&rig)[0], Some(200), &jwks_of(&["e1"]));
        assert_eq!(rig.outcomes(), (vec![], vec![]));
    }

    #[test]
    fn without_introspection_only_jwts_of_configured_issuers_pass() {
        let inline = config().replace(
            r#""introspection": {"cluster": "idp", "authority": "idp", "path": "/introspect", "timeout_ms": 1000},"#,
            "",
        );
        let inline = inline.replace(
            r#""jwks": {"cluster": "keys", "authority": "idp", "path": "/jwks", "timeout_ms": 1000,
                                   "refresh_s": 60, "min_refetch_s": 5}"#,
            &format!(r#""keys": {}"#, String::from_utf8(jwks_of(&["e1"])).unwrap()),
        );
        let rig = Rig::with_config(&store(), &inline);
        assert_eq!(rig.request(1, &jwt("e1", "j1")).1, Action::Continue);
        let (_f, _) = rig.request(2, "an-opaque-token");
        let events = rig.host.take_events();
        let reply = events.iter().find_map(|e| match e {
            Event::Reply { ctx: 2, status, headers, .. } => Some((*status, headers.clone())),
            _ => None,
        });
        let (status, headers) = reply.unwrap();
        assert_eq!(status, 401);
        let challenge = headers.iter().find(|(n, _)| n == "www-authenticate").unwrap();
        assert!(
            challenge.1.contains(r#"error="invalid_token""#)
                && challenge.1.contains("not a JWT of a configured issuer"),
            "{challenge:?}"
        );
        assert!(rig.callout_ids().is_empty(), "nothing to introspect with");
    }

    #[test]
    fn section_errors_name_the_key() {
        let bad = |jwks: &str| {
            let c = config().replace(r#""refresh_s": 60, "min_refetch_s": 5"#, jwks);
            Config::parse(c.as_bytes()).unwrap_err().0
        };
        assert!(bad(r#""refresh_s": 5"#).contains("jwt.issuers[0].jwks.refresh_s"));
        assert!(bad(r#""min_refetch_s": 400"#).contains("jwt.issuers[0].jwks.min_refetch_s"));
        assert!(bad(r#""max_bytes": 10"#).contains("jwt.issuers[0].jwks.max_bytes"));
        let both = config().replace(r#""jwks": {"#, r#""keys": {"keys": []}, "jwks": {"#);
        assert!(Config::parse(both.as_bytes()).unwrap_err().0.contains("either `keys`"));
        let path = config().replace(r#""path": "/jwks""#, r#""path": "jwks""#);
        assert!(Config::parse(path.as_bytes()).unwrap_err().0.contains("jwt.issuers[0].jwks.path must start with '/'"));
    }
}
