//! Every counter tokengate exports, declared together. They show in Envoy's
//! `/stats` as `tokengate.*`.

use crate::introspection::IntrospectionError;
use crate::outcome::Denial;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::cell::Cell;

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    allowed: HotCounter,
    denied_missing_token: Counter,
    denied_invalid_request: Counter,
    denied_invalid_token: Counter,
    denied_revoked: Counter,
    denied_invalid_audience: Counter,
    denied_invalid_issuer: Counter,
    /// Requests let through without a token: public rules, optional rules
    /// without one, CORS preflights.
    pub passed_public: Counter,
    pub passed_anonymous: Counter,
    pub passed_preflight: Counter,
    denied_insufficient_scope: Counter,
    denied_idp_unavailable: Counter,
    denied_denylist_loading: Counter,
    pub cache_hit_local: HotCounter,
    pub cache_hit_shared: Counter,
    pub cache_miss: Counter,
    pub cache_coalesced: Counter,
    pub cache_uncacheable: Counter,
    pub jwt_verified: Counter,
    pub jwt_refused: Counter,
    pub jwks_fetches: Counter,
    pub jwks_fetch_failures: Counter,
    pub cache_store_errors: Counter,
    pub cache_stale_served: Counter,
    pub claims_refused: Counter,
    pub introspection_calls: Counter,
    failure_dispatch: Counter,
    failure_transport: Counter,
    failure_timeout: Counter,
    failure_unauthorized: Counter,
    failure_status: Counter,
    failure_too_large: Counter,
    failure_not_json: Counter,
    failure_bad_answer: Counter,
    pub revocations_tokens: Counter,
    pub revocations_principals: Counter,
    pub revocations_undone: Counter,
    pub revocations_refused: Counter,
    pub revocations_forward_ok: Counter,
    pub revocations_forward_failed: Counter,
    pub admin_requests: Counter,
    pub admin_rejected: Counter,
    pub sync_failures: Counter,
    pub sync_applied: Counter,
    pub sync_queued: Counter,
    pub sync_dropped: Counter,
    pub sync_initial_sync_timeouts: Counter,
    /// Cluster sync's gauges: defined only where `cluster_sync` is configured.
    pub sync_lag_ms: Gauge,
    pub sync_revision: Gauge,
    pub sync_outbox: Gauge,
    pub sync_initial_wait_ms: Gauge,
}

/// A counter id; 0 means "not defined" and increments are dropped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counter(u32);

impl Counter {
    fn define(name: &str) -> Counter {
        match hostcalls::define_metric(MetricType::Counter, name) {
            Ok(id) => Counter(id),
            Err(status) => {
                log::warn!("cannot define metric {name}: {status:?}");
                Counter(0)
            }
        }
    }

    pub fn add(self, n: u64) {
        if self.0 != 0 && n > 0 {
            increment(self.0, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn inc(self) {
        if self.0 != 0 {
            increment(self.0, 1);
        }
    }
}

// A lost increment is not worth failing a request over. Host builds (the
// unit tests) have no Envoy: their metrics are never defined (id 0), and
// these are not linked against host calls that do not exist there.
#[cfg(target_arch = "wasm32")]
fn increment(id: u32, n: i64) {
    let _ = hostcalls::increment_metric(id, n);
}

#[cfg(target_arch = "wasm32")]
fn record(id: u32, value: u64) {
    let _ = hostcalls::record_metric(id, value);
}

#[cfg(not(target_arch = "wasm32"))]
fn increment(_id: u32, _n: i64) {}

#[cfg(not(target_arch = "wasm32"))]
fn record(_id: u32, _value: u64) {}

/// A gauge id; 0 means "not defined" and values are dropped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauge(u32);

impl Gauge {
    fn define(name: &str) -> Gauge {
        Gauge(hostcalls::define_metric(MetricType::Gauge, name).unwrap_or(0))
    }

    pub fn record(self, value: u64) {
        if self.0 != 0 {
            record(self.0, value);
        }
    }
}

/// A counter bumped on every cached hit. Envoy's increment is a host call
/// that costs more than the rest of the count, so the worker keeps the count
/// in its own memory and hands it over every `HOT_BATCH` counts and on each
/// tick: `/stats` is at most one tick (a second) behind.
#[derive(Debug, Clone, Default)]
pub struct HotCounter {
    counter: Counter,
    pending: Cell<u32>,
}

const HOT_BATCH: u32 = 1024;

impl HotCounter {
    fn define(name: &str) -> HotCounter {
        HotCounter { counter: Counter::define(name), pending: Cell::new(0) }
    }

    pub fn inc(&self) {
        let n = self.pending.get() + 1;
        if n >= HOT_BATCH {
            self.pending.set(0);
            self.counter.add(u64::from(n));
        } else {
            self.pending.set(n);
        }
    }

    fn flush(&self) {
        self.counter.add(u64::from(self.pending.replace(0)));
    }
}

impl Metrics {
    /// Hands the counts kept in wasm memory to Envoy (each tick).
    pub fn flush(&self) {
        self.allowed.flush();
        self.cache_hit_local.flush();
    }

    /// Defines every metric with Envoy; cluster sync's gauges only `with_sync`.
    pub fn define(with_sync: bool) -> Metrics {
        let c = |name: &str| Counter::define(&format!("tokengate.{name}"));
        let g = |name: &str| if with_sync { Gauge::define(&format!("tokengate.{name}")) } else { Gauge::default() };
        let hot = |name: &str| HotCounter::define(&format!("tokengate.{name}"));
        Metrics {
            allowed: hot("requests.allowed"),
            denied_missing_token: c("requests.denied.missing_token"),
            denied_invalid_request: c("requests.denied.invalid_request"),
            denied_invalid_token: c("requests.denied.invalid_token"),
            denied_revoked: c("requests.denied.revoked"),
            denied_invalid_audience: c("requests.denied.invalid_audience"),
            denied_invalid_issuer: c("requests.denied.invalid_issuer"),
            passed_public: c("requests.passed.public"),
            passed_anonymous: c("requests.passed.anonymous"),
            passed_preflight: c("requests.passed.preflight"),
            denied_insufficient_scope: c("requests.denied.insufficient_scope"),
            denied_idp_unavailable: c("requests.denied.idp_unavailable"),
            denied_denylist_loading: c("requests.denied.denylist_loading"),
            cache_hit_local: hot("cache.hit.local"),
            cache_hit_shared: c("cache.hit.shared"),
            cache_miss: c("cache.miss"),
            cache_coalesced: c("cache.coalesced"),
            cache_uncacheable: c("cache.uncacheable"),
            jwt_verified: c("jwt.verified"),
            jwt_refused: c("jwt.refused"),
            jwks_fetches: c("jwt.jwks_fetches"),
            jwks_fetch_failures: c("jwt.jwks_fetch_failures"),
            cache_store_errors: c("cache.store_errors"),
            cache_stale_served: c("cache.stale_served"),
            claims_refused: c("claims.refused"),
            introspection_calls: c("introspection.calls"),
            failure_dispatch: c("introspection.failures.dispatch"),
            failure_transport: c("introspection.failures.transport"),
            failure_timeout: c("introspection.failures.timeout"),
            failure_unauthorized: c("introspection.failures.unauthorized"),
            failure_status: c("introspection.failures.status"),
            failure_too_large: c("introspection.failures.too_large"),
            failure_not_json: c("introspection.failures.not_json"),
            failure_bad_answer: c("introspection.failures.bad_answer"),
            revocations_tokens: c("revocations.tokens"),
            revocations_principals: c("revocations.principals"),
            revocations_undone: c("revocations.undone"),
            revocations_refused: c("revocations.refused"),
            revocations_forward_ok: c("revocations.forward.ok"),
            revocations_forward_failed: c("revocations.forward.failed"),
            admin_requests: c("admin.requests"),
            admin_rejected: c("admin.rejected"),
            sync_failures: c("sync.failures"),
            sync_applied: c("sync.applied"),
            sync_queued: c("sync.queued"),
            sync_dropped: c("sync.dropped"),
            sync_initial_sync_timeouts: c("sync.initial_sync_timeouts"),
            sync_lag_ms: g("sync.lag_ms"),
            sync_revision: g("sync.revision"),
            sync_outbox: g("sync.outbox"),
            sync_initial_wait_ms: g("sync.initial_wait_ms"),
        }
    }

    pub fn allowed(&self) {
        self.allowed.inc();
    }

    pub fn denied(&self, denial: &Denial) {
        match denial {
            Denial::MissingToken => self.denied_missing_token,
            Denial::InvalidRequest(_) => self.denied_invalid_request,
            Denial::InvalidToken(_) => self.denied_invalid_token,
            Denial::Revoked => self.denied_revoked,
            Denial::InvalidAudience => self.denied_invalid_audience,
            Denial::InvalidIssuer => self.denied_invalid_issuer,
            Denial::InsufficientScope(_) => self.denied_insufficient_scope,
            Denial::IdpUnavailable(_) => self.denied_idp_unavailable,
            Denial::DenylistLoading => self.denied_denylist_loading,
        }
        .inc();
    }

    pub fn introspection_failed(&self, error: &IntrospectionError) {
        match error {
            IntrospectionError::Dispatch => self.failure_dispatch,
            IntrospectionError::Transport => self.failure_transport,
            IntrospectionError::Timeout => self.failure_timeout,
            IntrospectionError::Unauthorized(_) => self.failure_unauthorized,
            IntrospectionError::Status(_) => self.failure_status,
            IntrospectionError::TooLarge => self.failure_too_large,
            IntrospectionError::NotJson => self.failure_not_json,
            IntrospectionError::BadAnswer(_) => self.failure_bad_answer,
            // Counted by the worker whose call failed.
            IntrospectionError::PeerFailed => Counter(0),
        }
        .inc();
    }
}
