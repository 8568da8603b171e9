//! Issuers' keys fetched from their JWKS endpoints through Envoy callouts,
//! once per Envoy process, not once per worker: one root context at a time
//! holds an issuer's fetch (a lease in shared data), the document it gets
//! lands in a shared key, and every worker parses that key when its version
//! changes. A failed fetch keeps the last good keys; a `kid` the keys lack
//! asks for one refetch, rate-limited for the whole process.

use crate::cache::TokenHash;
use crate::host::Host;
use crate::jwt_verify::{parse_jwks, JwtSection, KeySet};
use crate::metrics::Metrics;
use crate::rules::Requirement;
use crate::store::{update, Store, KEY_PREFIX};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::rc::Rc;
use std::time::Duration;

/// Slack past `timeout_ms` before another root may take over a fetch.
const GRACE_MS: u64 = 1000;
/// Requests one worker holds while keys are fetched; more are answered at once.
pub const MAX_WAITERS: usize = 256;

/// `jwt.issuers[].jwks`: where an issuer publishes its keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// The Envoy cluster that reaches the issuer.
    pub cluster: String,
    pub authority: String,
    /// Path of the JWKS document (the `jwks_uri` of its discovery document).
    pub path: String,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Keys are fetched again this long after the last good fetch.
    #[serde(default = "default_refresh_s")]
    pub refresh_s: u64,
    /// At most one fetch per issuer this often (failures, unknown `kid`s).
    #[serde(default = "default_min_refetch_s")]
    pub min_refetch_s: u64,
    /// A larger document is a failed fetch.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
}

fn default_timeout_ms() -> u64 {
    2000
}
fn default_refresh_s() -> u64 {
    300
}
fn default_min_refetch_s() -> u64 {
    10
}
fn default_max_bytes() -> usize {
    64 * 1024
}

impl Endpoint {
    /// Checks the endpoint; `at` names it in the message.
    pub fn validate(&self, at: &str) -> Result<(), String> {
        let (cluster, authority, path) = (&self.cluster, &self.authority, Some(self.path.as_str()));
        crate::config::Endpoint { section: at, cluster, authority, path, timeout_ms: self.timeout_ms }
            .validate()
            .map_err(|e| e.0)?;
        if !(10..=86_400).contains(&self.refresh_s) {
            return Err(format!("{at}.refresh_s must be between 10 and 86400"));
        }
        if self.min_refetch_s == 0 || self.min_refetch_s > self.refresh_s {
            return Err(format!("{at}.min_refetch_s must be between 1 and refresh_s"));
        }
        if !(1024..=1024 * 1024).contains(&self.max_bytes) {
            return Err(format!("{at}.max_bytes must be between 1024 and 1048576"));
        }
        Ok(())
    }

    /// Names this issuer's endpoint in shared data: another listener's
    /// endpoint for the same issuer keeps its own keys.
    fn id(&self, issuer: &str) -> String {
        let mut d = Sha256::new();
        for text in [issuer, &self.cluster, &self.authority, &self.path] {
            d.update((text.len() as u64).to_be_bytes());
            d.update(text.as_bytes());
        }
        d.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

/// One issuer's fetch as every worker sees it (shared data, JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchState {
    /// The root context fetching now, and until when its lease holds.
    #[serde(default)]
    pub holder: String,
    #[serde(default)]
    pub until_ms: u64,
    /// When the last fetch started and ended, and the last good one ended.
    #[serde(default)]
    pub started_ms: u64,
    #[serde(default)]
    pub ended_ms: u64,
    #[serde(default)]
    pub ok_ms: u64,
    /// When a request last met a `kid` the keys do not have.
    #[serde(default)]
    pub wanted_ms: u64,
}

impl FetchState {
    fn read(bytes: Option<&[u8]>) -> FetchState {
        bytes.and_then(|b| serde_json::from_slice(b).ok()).unwrap_or_default()
    }

    fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn fetching(&self, now_ms: u64) -> bool {
        !self.holder.is_empty() && self.until_ms > now_ms
    }

    /// Whether the rate limit lets a fetch start now.
    pub fn may_fetch(&self, endpoint: &Endpoint, now_ms: u64) -> bool {
        !self.fetching(now_ms)
            && (self.started_ms == 0 || now_ms >= self.started_ms.saturating_add(endpoint.min_refetch_s * 1000))
    }

    /// Whether a fetch should start now: never done, due for refresh, or
    /// asked for since the last one started.
    pub fn due(&self, endpoint: &Endpoint, now_ms: u64) -> bool {
        self.may_fetch(endpoint, now_ms)
            && (self.ok_ms == 0
                || now_ms >= self.ok_ms.saturating_add(endpoint.refresh_s * 1000)
                || self.wanted_ms > self.started_ms)
    }
}

/// A request held until its issuer's keys change or a fetch ends.
pub struct Waiter {
    pub ctx: u32,
    pub issuer: usize,
    pub hash: TokenHash,
    /// The token, to verify again (this VM's memory only).
    pub token: Vec<u8>,
    pub need: Rc<Requirement>,
    since_ms: u64,
    deadline_ms: u64,
    version: u64,
}

/// What the shared calls need: Envoy, shared data, the counters, and this
/// root's name among the process's.
pub struct Io<'a> {
    pub host: &'a dyn Host,
    pub store: &'a dyn Store,
    pub metrics: &'a Metrics,
    pub me: &'a str,
}

struct Remote {
    endpoint: Endpoint,
    state_key: String,
    keys_key: String,
    /// The CAS of the document parsed last (parsed or refused).
    parsed: Option<u32>,
    /// This root's fetch in flight: its callout and when to give up on it.
    call: Option<(u32, u64)>,
}

struct Source {
    keys: Rc<KeySet>,
    /// Bumped whenever `keys` change.
    version: u64,
    remote: Option<Remote>,
}

/// One worker's view of every issuer's keys, and the requests waiting for them.
pub struct Jwks {
    sources: Vec<Source>,
    max_keys: usize,
    waiters: Vec<Waiter>,
}

impl Jwks {
    pub fn new(section: Option<&JwtSection>) -> Jwks {
        let sources = section.map(|s| s.issuers.as_slice()).unwrap_or_default().iter().map(|issuer| {
            let remote = issuer.jwks.as_ref().map(|endpoint| {
                let base = format!("{KEY_PREFIX}jwks.{}", endpoint.id(&issuer.issuer));
                Remote {
                    endpoint: endpoint.clone(),
                    state_key: format!("{base}.state"),
                    keys_key: format!("{base}.keys"),
                    parsed: None,
                    call: None,
                }
            });
            Source { keys: issuer.key_set.clone(), version: 0, remote }
        });
        Jwks { sources: sources.collect(), max_keys: section.map_or(0, |s| s.max_keys), waiters: Vec::new() }
    }

    /// The keys of issuer `issuer` as this worker knows them.
    pub fn keys(&self, issuer: usize) -> Rc<KeySet> {
        self.sources.get(issuer).map(|s| s.keys.clone()).unwrap_or_default()
    }

    /// Re-reads the shared documents whose version changed.
    pub fn sync(&mut self, store: &dyn Store) {
        for issuer in 0..self.sources.len() {
            self.sync_one(store, issuer);
        }
    }

    /// Re-reads issuer `issuer`'s shared document if its version changed
    /// (another worker fetched it since this one last looked).
    pub fn sync_one(&mut self, store: &dyn Store, issuer: usize) {
        let max_keys = self.max_keys;
        let Some(source) = self.sources.get_mut(issuer) else { return };
        let Some(remote) = &mut source.remote else { return };
        let Ok(Some(doc)) = store.get(&remote.keys_key) else { return };
        if remote.parsed == Some(doc.cas) {
            return;
        }
        remote.parsed = Some(doc.cas);
        match parse_document(&doc.value, max_keys) {
            Ok(keys) => {
                source.keys = Rc::new(keys);
                source.version += 1;
            }
            // Written by a root with other bounds (another configuration): keep ours.
            Err(e) => log::warn!("JWKS of {}: the shared copy is unusable here: {e}", remote.endpoint.path),
        }
    }

    /// Starts the fetches that are due and gives up on lost ones; returns
    /// the requests that can go on.
    pub fn tick(&mut self, io: &Io<'_>, now_ms: u64) -> Vec<Waiter> {
        for source in &mut self.sources {
            let Some(remote) = &mut source.remote else { continue };
            if let Some((_, deadline)) = remote.call {
                if now_ms < deadline {
                    continue;
                }
                // Envoy answers every callout; this is the safety net.
                remote.call = None;
                io.metrics.jwks_fetch_failures.inc();
                log::error!("JWKS fetch from {} got no answer", remote.endpoint.path);
                end_fetch(io, remote, false, now_ms);
            }
            start_if_due(io, remote, now_ms);
        }
        self.ready(io.store, now_ms)
    }

    /// Whether callout `token_id` is one of this root's fetches.
    pub fn owns(&self, token_id: u32) -> bool {
        self.sources.iter().any(|s| s.remote.as_ref().is_some_and(|r| r.call.is_some_and(|(id, _)| id == token_id)))
    }

    /// A fetch answered: keeps the document if it is a usable JWKS.
    pub fn on_response(&mut self, io: &Io<'_>, token_id: u32, num_headers: usize, body_size: usize) -> Vec<Waiter> {
        let now_ms = io.host.now_ms();
        let max_keys = self.max_keys;
        let remote = self
            .sources
            .iter_mut()
            .filter_map(|s| s.remote.as_mut())
            .find(|r| r.call.is_some_and(|(id, _)| id == token_id));
        if let Some(remote) = remote {
            remote.call = None;
            let fetched = match io.host.callout_status(num_headers) {
                Some(200) if body_size <= remote.endpoint.max_bytes => {
                    let body = io.host.callout_body(body_size);
                    parse_document(&body, max_keys).map(|_| body)
                }
                Some(200) => Err(format!("the document is over max_bytes ({})", remote.endpoint.max_bytes)),
                Some(status) => Err(format!("status {status}")),
                None => Err("no answer (connection refused or reset)".into()),
            };
            let ok = match fetched {
                Ok(body) => match update(io.store, &remote.keys_key, |_| Some(body.clone())) {
                    Ok(_) => true,
                    Err(e) => {
                        log::error!("JWKS from {}: cannot share it: {e:?}", remote.endpoint.path);
                        false
                    }
                },
                Err(e) => {
                    log::error!("JWKS fetch from {} failed: {e}; the last good keys stay in use", remote.endpoint.path);
                    false
                }
            };
            if !ok {
                io.metrics.jwks_fetch_failures.inc();
            }
            end_fetch(io, remote, ok, now_ms);
        }
        self.ready(io.store, now_ms)
    }

    /// A request met keys that cannot verify it (`kid` unknown, no keys
    /// yet): asks for a refetch. True if one is coming and the request may
    /// wait for it; false when the rate limit says no.
    pub fn want(&mut self, io: &Io<'_>, issuer: usize, now_ms: u64) -> bool {
        let Some(remote) = self.sources.get_mut(issuer).and_then(|s| s.remote.as_mut()) else {
            return false;
        };
        if self.waiters.len() >= MAX_WAITERS {
            return false;
        }
        let endpoint = &remote.endpoint;
        let mut coming = false;
        let asked = update(io.store, &remote.state_key, |current| {
            let mut state = FetchState::read(current);
            coming = state.fetching(now_ms) || state.may_fetch(endpoint, now_ms);
            if !coming || state.fetching(now_ms) || state.wanted_ms > state.started_ms {
                return None;
            }
            state.wanted_ms = now_ms;
            Some(state.bytes())
        });
        if let Err(e) = asked {
            log::warn!("JWKS refetch request not recorded: {e:?}");
            return false;
        }
        coming
    }

    /// Holds request `ctx` until its issuer's keys change or the next fetch ends.
    pub fn park(&mut self, ctx: u32, issuer: usize, hash: TokenHash, token: &[u8], need: Rc<Requirement>, now_ms: u64) {
        let Some(source) = self.sources.get(issuer) else { return };
        let timeout = source.remote.as_ref().map_or(0, |r| r.endpoint.timeout_ms);
        self.waiters.push(Waiter {
            ctx,
            issuer,
            hash,
            token: token.to_vec(),
            need,
            since_ms: now_ms,
            // Room for the fetch to start on the next tick and to time out.
            deadline_ms: now_ms + timeout + 2 * GRACE_MS,
            version: source.version,
        });
    }

    pub fn is_waiting(&self, ctx: u32) -> bool {
        self.waiters.iter().any(|w| w.ctx == ctx)
    }

    pub fn has_waiters(&self) -> bool {
        !self.waiters.is_empty()
    }

    pub fn forget(&mut self, ctx: u32) {
        self.waiters.retain(|w| w.ctx != ctx);
    }

    /// Re-reads the keys that changed, then takes the waiters whose keys
    /// changed, whose fetch ended, or whose time is up.
    fn ready(&mut self, store: &dyn Store, now_ms: u64) -> Vec<Waiter> {
        if self.waiters.is_empty() {
            self.sync(store);
            return Vec::new();
        }
        let ended: Vec<u64> = self
            .sources
            .iter()
            .map(|s| match &s.remote {
                Some(r) => store.get(&r.state_key).ok().flatten().map_or(0, |v| {
                    let state = FetchState::read(Some(&v.value));
                    if state.fetching(now_ms) {
                        0
                    } else {
                        state.ended_ms
                    }
                }),
                None => u64::MAX,
            })
            .collect();
        // Keys after states: a fetch writes its document before it ends, so
        // a waiter whose fetch ended is judged with that fetch's keys.
        self.sync(store);
        let sources = &self.sources;
        let (ready, waiting) = std::mem::take(&mut self.waiters).into_iter().partition(|w: &Waiter| {
            let changed = sources.get(w.issuer).is_none_or(|s| s.version != w.version);
            changed || ended.get(w.issuer).is_none_or(|e| *e >= w.since_ms) || now_ms >= w.deadline_ms
        });
        self.waiters = waiting;
        ready
    }
}

/// A JWKS document this filter can use: JSON with at least one usable key.
fn parse_document(body: &[u8], max_keys: usize) -> Result<KeySet, String> {
    let doc: serde_json::Value = serde_json::from_slice(body).map_err(|_| "the document is not JSON".to_string())?;
    let keys = parse_jwks(&doc, max_keys)?;
    if keys.keys.is_empty() {
        return Err("the document has no usable signing key".into());
    }
    Ok(keys)
}

/// Takes the fetch lease if a fetch is due and no other root holds it, then
/// sends the request.
fn start_if_due(io: &Io<'_>, remote: &mut Remote, now_ms: u64) {
    let endpoint = &remote.endpoint;
    let lease_until = now_ms + endpoint.timeout_ms + GRACE_MS;
    let mut taken = false;
    let result = update(io.store, &remote.state_key, |bytes| {
        let mut state = FetchState::read(bytes);
        taken = state.due(endpoint, now_ms);
        if !taken {
            return None;
        }
        state.holder = io.me.to_string();
        state.until_ms = lease_until;
        state.started_ms = now_ms;
        Some(state.bytes())
    });
    if result.is_err() || !taken {
        return;
    }
    io.metrics.jwks_fetches.inc();
    let headers = [
        (":method", "GET"),
        (":path", endpoint.path.as_str()),
        (":authority", endpoint.authority.as_str()),
        ("accept", "application/json"),
    ];
    match io.host.dispatch(&endpoint.cluster, &headers, b"", Duration::from_millis(endpoint.timeout_ms)) {
        Ok(token_id) => remote.call = Some((token_id, lease_until)),
        Err(status) => {
            io.metrics.jwks_fetch_failures.inc();
            log::error!("cannot fetch the JWKS (cluster {:?}): {status}", endpoint.cluster);
            end_fetch(io, remote, false, now_ms);
        }
    }
}

/// Releases the lease and records how the fetch ended.
fn end_fetch(io: &Io<'_>, remote: &Remote, ok: bool, now_ms: u64) {
    let ended = update(io.store, &remote.state_key, |bytes| {
        let mut state = FetchState::read(bytes);
        if state.holder == io.me {
            state.holder.clear();
            state.until_ms = 0;
        }
        state.ended_ms = now_ms;
        if ok {
            state.ok_ms = now_ms;
        }
        Some(state.bytes())
    });
    if let Err(e) = ended {
        log::warn!("JWKS fetch state not recorded: {e:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Endpoint {
        serde_json::from_str(
            r#"{"cluster": "c", "authority": "a", "path": "/jwks", "refresh_s": 60, "min_refetch_s": 5}"#,
        )
        .unwrap()
    }

    #[test]
    fn a_fetch_is_due_when_never_done_when_stale_or_when_asked_for_within_the_rate_limit() {
        let e = endpoint();
        let never = FetchState::default();
        assert!(never.due(&e, 1));
        let fresh = FetchState { started_ms: 1000, ended_ms: 1100, ok_ms: 1100, ..Default::default() };
        assert!(!fresh.due(&e, 30_000), "fresh keys");
        assert!(fresh.due(&e, 61_100), "refresh_s after the last good fetch");
        let asked = FetchState { wanted_ms: 2000, ..fresh.clone() };
        assert!(!asked.due(&e, 5_999), "min_refetch_s after the last start");
        assert!(asked.due(&e, 6_000));
        let failed = FetchState { started_ms: 1000, ended_ms: 1100, ..Default::default() };
        assert!(!failed.due(&e, 5_999) && failed.due(&e, 6_000), "no keys: retried every min_refetch_s");
        // Another root's lease holds, however long ago its fetch started.
        let held = FetchState { holder: "other".into(), until_ms: 20_000, ..failed.clone() };
        assert!(!held.due(&e, 19_999) && !held.may_fetch(&e, 19_999));
        assert!(held.due(&e, 20_000), "a lease that ran out is taken over");
    }

    #[test]
    fn endpoints_of_one_issuer_get_their_own_keys() {
        let e = endpoint();
        let other = Endpoint { path: "/other".into(), ..endpoint() };
        assert_ne!(e.id("https://idp"), other.id("https://idp"));
        assert_ne!(e.id("https://idp"), e.id("https://idp2"));
        assert_eq!(e.id("https://idp").len(), 16);
    }
}
