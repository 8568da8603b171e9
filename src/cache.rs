//! What is remembered of introspection answers, and for how long.
//!
//! Shared cache (every worker of the Envoy process): proxy-wasm shared data
//! never frees a key, so the key space is fixed up front. A token's SHA-256
//! picks one of `ceil(max_entries / SLOTS)` buckets,
//! `tokengate.v1.cache.<partition>.<B>.<i>`; each bucket is a JSON list of at
//! most `SLOTS` entries rewritten with CAS. The partition is a digest of
//! everything that shapes an answer (the introspection endpoint and client,
//! the claims kept, the cache lifetimes), so listeners sharing a `vm_id` with
//! another IdP or client never use, or wait for, each other's answers.
//! A full bucket evicts the expired, then failed, then negative, then pending,
//! then the soonest-expiring active entry, and an entry never evicts one that
//! ranks above it: a flood of unknown tokens only displaces its own kind.
//! Memory stays at `max_entries × max_entry_bytes` per partition whatever the
//! number of distinct tokens.
//!
//! A bucket entry is an answer, or a marker that one worker is introspecting
//! the token right now (`Pending`) or just failed to (`Failed`); the markers
//! make a cold burst cost one introspection per process, not one per worker.
//!
//! Local cache (one per worker and configuration): a bounded map of hot
//! active answers, so a cache hit needs no shared-data read at all. Negative
//! answers stay in the shared cache only, so unknown tokens cannot push the
//! hot ones out.

use crate::bearer::Token;
use crate::config;
use crate::introspection::Answer;
use crate::store::{update, Store, StoreError, KEY_PREFIX};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::rc::Rc;

/// SHA-256 of the token: the only name a token has inside tokengate.
pub type TokenHash = [u8; 32];

pub fn hash_token(token: &Token) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

pub fn hex(hash: &TokenHash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_hex(text: &str) -> Option<TokenHash> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The shared-cache partition of a configuration: the first 8 bytes (hex)
/// of a SHA-256 over everything that decides what is cached for a token.
/// The secret is in it because a client with a wrong secret gets no answer.
pub fn partition(cfg: &config::Config) -> String {
    let c = &cfg.cache;
    let mut d = Sha256::new();
    // Each field length-prefixed, so no two configurations hash alike by shifting bytes.
    let mut field = |bytes: &[u8]| {
        d.update((bytes.len() as u64).to_be_bytes());
        d.update(bytes);
    };
    if let Some(i) = &cfg.introspection {
        for text in [&i.cluster, &i.authority, &i.path, &i.token_type_hint] {
            field(text.as_bytes());
        }
        field(i.client_id.as_deref().unwrap_or_default().as_bytes());
        field(i.client_secret.as_deref().unwrap_or_default().as_bytes());
        field(&i.max_response_bytes.to_be_bytes());
    }
    for claim in cfg.claims_to_headers.keys() {
        field(claim.as_bytes());
    }
    // Answers from a JWT issuer whose keys or audiences changed are stale.
    if let Some(jwt) = &cfg.jwt {
        for issuer in &jwt.issuers {
            field(issuer.issuer.as_bytes());
            match (&issuer.keys, &issuer.jwks) {
                (Some(keys), _) => field(keys.to_string().as_bytes()),
                (None, Some(e)) => {
                    for text in [&e.cluster, &e.authority, &e.path] {
                        field(text.as_bytes());
                    }
                }
                (None, None) => {}
            }
            for alg in &issuer.algorithms {
                field(format!("{alg:?}").as_bytes());
            }
            field(&issuer.clock_skew_s.to_be_bytes());
            for aud in &issuer.audiences {
                field(aud.as_bytes());
            }
        }
    }
    // Answers keep `iss` and `aud` since the audiences/issuers checks.
    field(b"claims+iss+aud");
    field(b"cache");
    for n in [c.max_ttl_s, c.negative_ttl_s, c.stale_if_error_s, c.max_entry_bytes as u64] {
        field(&n.to_be_bytes());
    }
    d.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Entries per bucket: small enough that a bucket read stays cheap.
pub const SLOTS: usize = 8;
/// How long other workers trust a `Failed` marker: long enough for their
/// waiters to see it, short enough that it is not a cached failure.
const FAILED_VISIBLE_MS: u64 = 2000;

/// How long an answer may be cached, or `None` if it must not be.
pub fn cache_until_ms(answer: &Answer, cfg: &config::Cache, now_ms: u64) -> Option<u64> {
    let ttl_ms = match answer {
        Answer::Active(claims) => {
            let max = cfg.max_ttl_s.saturating_mul(1000);
            match claims.exp {
                // Never past `exp`: the entry ends when the token does.
                Some(exp) => max.min(exp.saturating_mul(1000).saturating_sub(now_ms)),
                None => max,
            }
        }
        Answer::Inactive => cfg.negative_ttl_s.saturating_mul(1000),
    };
    (ttl_ms > 0).then(|| now_ms.saturating_add(ttl_ms))
}

/// Until when an active answer may stand in for an IdP that fails
/// (`stale_if_error_s` past its cache lifetime, never past `exp`); 0: never.
pub fn stale_until_ms(answer: &Answer, cfg: &config::Cache, until_ms: u64) -> u64 {
    match answer {
        Answer::Active(claims) if cfg.stale_if_error_s > 0 => {
            let stale = until_ms.saturating_add(cfg.stale_if_error_s.saturating_mul(1000));
            claims.exp.map_or(stale, |exp| stale.min(exp.saturating_mul(1000)))
        }
        _ => 0,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum State {
    #[serde(rename = "a")]
    Answer(Answer),
    /// A worker is introspecting this token now.
    #[serde(rename = "p")]
    Pending,
    /// The last introspection failed at `at` ms.
    #[serde(rename = "f")]
    Failed { at: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Slot {
    #[serde(rename = "h")]
    hash: String,
    /// Unix ms after which the slot means nothing.
    #[serde(rename = "u")]
    until: u64,
    #[serde(rename = "s")]
    state: State,
    /// Unix ms until which the last active answer may stand in for a
    /// failing IdP (0: not at all).
    #[serde(rename = "z", default, skip_serializing_if = "is_zero")]
    stale_until: u64,
    /// That answer, while the state is a marker.
    #[serde(rename = "k", default, skip_serializing_if = "Option::is_none")]
    kept: Option<Answer>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Slot {
    fn new(hash: String, until: u64, state: State) -> Slot {
        Slot { hash, until, state, stale_until: 0, kept: None }
    }

    /// Whether the slot still means anything at `now`.
    fn alive(&self, now: u64) -> bool {
        self.until > now || self.stale_until > now
    }

    /// The answer that may stand in for a failing IdP at `now`.
    fn stale_answer(&self, now: u64) -> Option<&Answer> {
        if self.stale_until <= now {
            return None;
        }
        match &self.state {
            State::Answer(a) => Some(a),
            _ => self.kept.as_ref(),
        }
    }

    /// A marker that keeps this slot's stand-in answer, if any.
    fn marker(hash: String, until: u64, state: State, previous: Option<&Slot>, now: u64) -> Slot {
        let mut slot = Slot::new(hash, until, state);
        if let Some(answer) = previous.and_then(|p| p.stale_answer(now)) {
            slot.kept = Some(answer.clone());
            slot.stale_until = previous.map_or(0, |p| p.stale_until);
        }
        slot
    }
}

/// What the shared cache knows of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Hit {
        answer: Answer,
        until_ms: u64,
    },
    /// Another worker is introspecting it.
    Pending,
    /// The last introspection failed at this time.
    Failed {
        at_ms: u64,
    },
    Miss,
}

/// The result of trying to become the one worker that introspects a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// We hold the marker: introspect now.
    Owner,
    /// Someone else does: wait for their answer.
    Pending,
    /// Someone answered meanwhile.
    Hit { answer: Answer, until_ms: u64 },
}

pub struct SharedCache<'s, S: Store + ?Sized> {
    store: &'s S,
    /// `partition(config)`: answers of other configurations are not ours.
    partition: &'s str,
    buckets: u64,
    max_entry_bytes: usize,
}

/// What became of an answer given to the shared cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Cached,
    /// Larger than `max_entry_bytes`: used, not cached.
    TooLarge,
    /// The bucket holds only entries that outrank it (a negative answer
    /// among active ones): not cached, and nothing was evicted for it.
    Outranked,
}

impl<'s, S: Store + ?Sized> SharedCache<'s, S> {
    pub fn new(store: &'s S, cfg: &config::Cache, partition: &'s str) -> Self {
        SharedCache { store, partition, buckets: bucket_count(cfg.max_entries), max_entry_bytes: cfg.max_entry_bytes }
    }

    fn key(&self, hash: &TokenHash) -> String {
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(hash.get(..8).unwrap_or(&[0; 8]));
        let index = u64::from_be_bytes(prefix) % self.buckets;
        // The bucket count is in the key: a config with another size uses its own keys.
        format!("{KEY_PREFIX}cache.{}.{}.{index}", self.partition, self.buckets)
    }

    fn read(&self, hash: &TokenHash) -> Result<Vec<Slot>, StoreError> {
        let value = self.store.get(&self.key(hash))?;
        Ok(value.map(|v| decode(&v.value)).unwrap_or_default())
    }

    pub fn lookup(&self, hash: &TokenHash, now_ms: u64) -> Result<Lookup, StoreError> {
        let hex = hex(hash);
        let slots = self.read(hash)?;
        let Some(slot) = slots.into_iter().find(|s| s.hash == hex && s.until > now_ms) else {
            return Ok(Lookup::Miss);
        };
        Ok(match slot.state {
            State::Answer(answer) => Lookup::Hit { answer, until_ms: slot.until },
            State::Pending => Lookup::Pending,
            State::Failed { at } => Lookup::Failed { at_ms: at },
        })
    }

    /// Marks the token as being introspected by us until `pending_until_ms`,
    /// unless an answer or another live marker is there.
    pub fn claim(&self, hash: &TokenHash, now_ms: u64, pending_until_ms: u64) -> Result<Claim, StoreError> {
        let hex = hex(hash);
        let mut outcome = Claim::Owner;
        update(self.store, &self.key(hash), |current| {
            let mut slots = current.map(decode).unwrap_or_default();
            if let Some(live) = slots.iter().find(|s| s.hash == hex && s.until > now_ms) {
                match &live.state {
                    State::Answer(answer) => {
                        outcome = Claim::Hit { answer: answer.clone(), until_ms: live.until };
                        return None;
                    }
                    State::Pending => {
                        outcome = Claim::Pending;
                        return None;
                    }
                    State::Failed { .. } => {}
                }
            }
            outcome = Claim::Owner;
            let previous = slots.iter().find(|s| s.hash == hex).cloned();
            let marker = Slot::marker(hex.clone(), pending_until_ms, State::Pending, previous.as_ref(), now_ms);
            // No room without evicting an answer: introspect without a marker
            // (other workers may then ask too, which beats losing a hot answer).
            put(&mut slots, marker, now_ms).then(|| encode(&slots))
        })?;
        Ok(outcome)
    }

    /// Stores an answer until `until_ms` (and as a stand-in until
    /// `stale_until_ms`). When it is not cached, our marker is cleared instead.
    pub fn store_answer(
        &self,
        hash: &TokenHash,
        answer: &Answer,
        until_ms: u64,
        stale_until_ms: u64,
        now_ms: u64,
    ) -> Result<Stored, StoreError> {
        let mut slot = Slot::new(hex(hash), until_ms, State::Answer(answer.clone()));
        slot.stale_until = stale_until_ms;
        let fits = encode(std::slice::from_ref(&slot)).len() <= self.max_entry_bytes;
        if !fits {
            self.release(hash, now_ms)?;
            return Ok(Stored::TooLarge);
        }
        let mut stored = Stored::Cached;
        update(self.store, &self.key(hash), |current| {
            let mut slots = current.map(decode).unwrap_or_default();
            stored = Stored::Cached;
            if put(&mut slots, slot.clone(), now_ms) {
                return Some(encode(&slots));
            }
            stored = Stored::Outranked;
            None
        })?;
        if stored == Stored::Outranked {
            self.release(hash, now_ms)?;
        }
        Ok(stored)
    }

    /// Replaces our marker with a short-lived `Failed`, so waiters on other
    /// workers answer 503 now instead of trying again; new requests retry.
    pub fn fail(&self, hash: &TokenHash, now_ms: u64) -> Result<(), StoreError> {
        let hex = hex(hash);
        update(self.store, &self.key(hash), |current| {
            let mut slots = current.map(decode).unwrap_or_default();
            if slots.iter().any(|s| s.hash == hex && matches!(s.state, State::Answer(_)) && s.until > now_ms) {
                return None;
            }
            let previous = slots.iter().find(|s| s.hash == hex).cloned();
            let until = now_ms + FAILED_VISIBLE_MS;
            let slot = Slot::marker(hex.clone(), until, State::Failed { at: now_ms }, previous.as_ref(), now_ms);
            put(&mut slots, slot, now_ms).then(|| encode(&slots))
        })?;
        Ok(())
    }

    /// Drops our `Pending` marker without an answer.
    pub fn release(&self, hash: &TokenHash, now_ms: u64) -> Result<(), StoreError> {
        let hex = hex(hash);
        update(self.store, &self.key(hash), |current| {
            let mut slots = current.map(decode).unwrap_or_default();
            let before = slots.clone();
            slots.retain(|s| s.alive(now_ms));
            for slot in slots.iter_mut().filter(|s| s.hash == hex && s.state == State::Pending) {
                // Keep the stand-in answer (no longer fresh) for the outage.
                match slot.kept.take() {
                    Some(answer) => {
                        slot.state = State::Answer(answer);
                        slot.until = now_ms;
                    }
                    None => slot.until = 0,
                }
            }
            slots.retain(|s| s.alive(now_ms));
            (slots != before).then(|| encode(&slots))
        })?;
        Ok(())
    }

    /// An active answer past its cache lifetime that may still stand in
    /// while the IdP fails (`cache.stale_if_error_s`).
    pub fn lookup_stale(&self, hash: &TokenHash, now_ms: u64) -> Result<Option<Answer>, StoreError> {
        let hex = hex(hash);
        let slots = self.read(hash)?;
        Ok(slots.iter().find(|s| s.hash == hex).and_then(|s| s.stale_answer(now_ms)).cloned())
    }
}

pub fn bucket_count(max_entries: u64) -> u64 {
    max_entries.div_ceil(SLOTS as u64).max(1)
}

/// Replaces the token's slot, making room if the bucket is full. Returns
/// false, changing nothing, when every slot outranks the new one.
fn put(slots: &mut Vec<Slot>, slot: Slot, now_ms: u64) -> bool {
    let mut kept: Vec<Slot> = slots.iter().filter(|s| s.hash != slot.hash && s.alive(now_ms)).cloned().collect();
    let incoming = eviction_rank(&slot.state);
    while kept.len() >= SLOTS {
        // Stale-only stand-ins go first, then by rank, then the soonest to expire.
        let victim = kept.iter().enumerate().min_by_key(|(_, s)| (s.until > now_ms, eviction_rank(&s.state), s.until));
        match victim {
            Some((_, s)) if s.until > now_ms && eviction_rank(&s.state) > incoming => return false,
            // `remove`, not `swap_remove`: the order of the others stays, so a
            // lookup (first slot of a hash) finds what it found before.
            Some((i, _)) => {
                kept.remove(i);
            }
            None => break,
        }
    }
    kept.push(slot);
    *slots = kept;
    true
}

/// Lower goes first, and never makes way for a lower one: unknown tokens
/// (negative answers, their in-flight markers) evict their own kind, never
/// an active answer.
fn eviction_rank(state: &State) -> u8 {
    match state {
        State::Failed { .. } => 0,
        State::Answer(Answer::Inactive) => 1,
        State::Pending => 2,
        State::Answer(Answer::Active(_)) => 3,
    }
}

/// A bucket that does not decode is treated as empty (and rewritten on the
/// next write): a cache may forget, never fail a request.
fn decode(bytes: &[u8]) -> Vec<Slot> {
    if bytes.is_empty() {
        return Vec::new();
    }
    match serde_json::from_slice::<Vec<Slot>>(bytes) {
        Ok(mut slots) => {
            slots.truncate(SLOTS);
            slots
        }
        Err(e) => {
            log::warn!("unreadable cache bucket dropped: {e}");
            Vec::new()
        }
    }
}

fn encode(slots: &[Slot]) -> Vec<u8> {
    serde_json::to_vec(slots).unwrap_or_default()
}

/// The per-worker copy of hot answers.
pub struct LocalCache {
    map: HashMap<TokenHash, LocalEntry>,
    capacity: usize,
}

#[derive(Clone)]
pub struct LocalEntry {
    pub answer: Rc<Answer>,
    pub until_ms: u64,
}

impl LocalCache {
    pub fn new(capacity: usize) -> Self {
        LocalCache { map: HashMap::new(), capacity }
    }

    pub fn get(&self, hash: &TokenHash, now_ms: u64) -> Option<&LocalEntry> {
        self.map.get(hash).filter(|e| e.until_ms > now_ms)
    }

    /// Keeps an active answer; negative ones are left to the shared cache.
    pub fn insert(&mut self, hash: TokenHash, answer: Rc<Answer>, until_ms: u64, now_ms: u64) {
        if self.capacity == 0 || !matches!(*answer, Answer::Active(_)) {
            return;
        }
        if self.map.len() >= self.capacity && !self.map.contains_key(&hash) {
            self.map.retain(|_, e| e.until_ms > now_ms);
            if self.map.len() >= self.capacity {
                // Full of live entries: start over rather than track recency
                // on every hit; the shared cache still has them all.
                self.map.clear();
            }
        }
        self.map.insert(hash, LocalEntry { answer, until_ms });
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bearer;
    use crate::introspection::Claims;
    use crate::store::MemoryStore;

    fn cfg(max_entries: u64) -> config::Cache {
        config::Cache { max_entries, ..Default::default() }
    }

    fn h(n: u32) -> TokenHash {
        let t = bearer::parse(&[format!("Bearer token-{n}").as_bytes()], 4096).unwrap();
        hash_token(&t)
    }

    fn active(exp: Option<u64>) -> Answer {
        Answer::Active(Claims { scope: Some("read".into()), sub: Some("alice".into()), exp, ..Default::default() })
    }

    #[test]
    fn hash_is_sha256_hex() {
        let t = bearer::parse(&[b"Bearer abc"], 4096).unwrap();
        assert_eq!(hex(&hash_token(&t)), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(parse_hex(&hex(&hash_token(&t))), Some(hash_token(&t)));
        assert_eq!(parse_hex("zz"), None);
    }

    #[test]
    fn positive_ttl_is_capped_by_exp_and_max() {
        let c = cfg(10);
        let now = 1_000_000;
        assert_eq!(cache_until_ms(&active(None), &c, now), Some(now + 300_000));
        assert_eq!(cache_until_ms(&active(Some(1003)), &c, now), Some(1_003_000));
        assert_eq!(cache_until_ms(&active(Some(999)), &c, now), None);
        assert_eq!(cache_until_ms(&active(Some(1000)), &c, now), None);
        assert_eq!(cache_until_ms(&Answer::Inactive, &c, now), Some(now + 5_000));
        let no_negative = config::Cache { negative_ttl_s: 0, ..c };
        assert_eq!(cache_until_ms(&Answer::Inactive, &no_negative, now), None);
    }

    #[test]
    fn stored_answer_is_a_hit_until_it_expires() {
        let s = MemoryStore::new();
        let c = SharedCache::new(&s, &cfg(100), "p");
        assert_eq!(c.lookup(&h(1), 0).unwrap(), Lookup::Miss);
        assert_eq!(c.store_answer(&h(1), &active(None), 5_000, 0, 0).unwrap(), Stored::Cached);
        assert_eq!(c.lookup(&h(1), 4_999).unwrap(), Lookup::Hit { answer: active(None), until_ms: 5_000 });
        assert_eq!(c.lookup(&h(1), 5_000).unwrap(), Lookup::Miss);
        assert_eq!(c.lookup(&h(2), 0).unwrap(), Lookup::Miss);
    }

    #[test]
    fn only_one_claimant_becomes_owner() {
        let s = MemoryStore::new();
        let c = SharedCache::new(&s, &cfg(100), "p");
        assert_eq!(c.claim(&h(1), 0, 3_000).unwrap(), Claim::Owner);
        assert_eq!(c.claim(&h(1), 10, 3_000).unwrap(), Claim::Pending);
        assert_eq!(c.lookup(&h(1), 10).unwrap(), Lookup::Pending);
        // A marker whose owner vanished expires, and the next one takes over.
        assert_eq!(c.claim(&h(1), 3_000, 6_000).unwrap(), Claim::Owner);
        c.store_answer(&h(1), &active(None), 9_000, 0, 3_100).unwrap();
        assert_eq!(c.claim(&h(1), 3_200, 6_000).unwrap(), Claim::Hit { answer: active(None), until_ms: 9_000 });
    }

    #[test]
    fn making_room_keeps_the_order_of_the_other_slots() {
        // A bucket another writer left with two slots for one hash: a lookup
        // sees the first, and must go on seeing it after an eviction.
        let active = || State::Answer(Answer::Active(Claims::default()));
        // Past their lifetime, kept only as stand-ins for a failing IdP: the first to go.
        let stand_in =
            |i| Slot { stale_until: 20_000, ..Slot::new(format!("n{i}"), 500, State::Answer(Answer::Inactive)) };
        let mut slots: Vec<Slot> = (0..5).map(stand_in).collect();
        slots.push(Slot::new("dup".into(), 3_000, active()));
        slots.push(Slot::new("x".into(), 3_000, active()));
        slots.push(Slot::new("dup".into(), 3_000, State::Answer(Answer::Inactive)));
        assert!(put(&mut slots, Slot::new("new".into(), 2_500, State::Failed { at: 1_000 }), 1_000));
        assert_eq!(slots.len(), SLOTS);
        let first_dup = slots.iter().find(|s| s.hash == "dup").map(|s| &s.state);
        assert_eq!(first_dup, Some(&active()), "{slots:?}");
    }

    #[test]
    fn failure_is_seen_briefly_and_never_cached() {
        let s = MemoryStore::new();
        let c = SharedCache::new(&s, &cfg(100), "p");
        c.claim(&h(1), 0, 3_000).unwrap();
        c.fail(&h(1), 100).unwrap();
        assert_eq!(c.lookup(&h(1), 200).unwrap(), Lookup::Failed { at_ms: 100 });
        // The next request introspects again rather than reusing the failure.
        assert_eq!(c.claim(&h(1), 200, 3_000).unwrap(), Claim::Owner);
        c.release(&h(1), 300).unwrap();
        assert_eq!(c.lookup(&h(1), 300).unwrap(), Lookup::Miss);
    }

    #[test]
    fn oversized_answers_are_not_cached() {
        let s = MemoryStore::new();
        let c = SharedCache::new(&s, &config::Cache { max_entry_bytes: 256, ..cfg(100) }, "p");
        let big = Answer::Active(Claims { scope: Some("x".repeat(300)), ..Default::default() });
        c.claim(&h(1), 0, 3_000).unwrap();
        assert_eq!(c.store_answer(&h(1), &big, 9_000, 0, 0).unwrap(), Stored::TooLarge);
        assert_eq!(c.lookup(&h(1), 1).unwrap(), Lookup::Miss);
    }

    #[test]
    fn a_million_tokens_stay_within_max_entries() {
        let s = MemoryStore::new();
        let c = SharedCache::new(&s, &cfg(1_000), "p");
        for n in 0..20_000 {
            c.store_answer(&h(n), &active(None), u64::MAX, 0, 0).unwrap();
        }
        assert_eq!(s.key_count() as u64, bucket_count(1_000));
        let held: usize = (0..20_000).filter(|n| c.lookup(&h(*n), 1).unwrap() != Lookup::Miss).count();
        assert!(held <= 1_000, "{held}");
        assert!(held > 900, "buckets should fill up: {held}");
        // Every entry is at most max_entry_bytes, so the bytes are bounded too.
        assert!(s.bytes() <= 1_000 * config::Cache::default().max_entry_bytes);
    }

    #[test]
    fn full_bucket_evicts_negative_before_positive() {
        let mut slots = Vec::new();
        for i in 0..SLOTS {
            let state = if i == 3 { State::Answer(Answer::Inactive) } else { State::Answer(active(None)) };
            assert!(put(&mut slots, Slot::new(format!("{i}"), 100 + i as u64, state), 0));
        }
        assert!(put(&mut slots, Slot::new("new".into(), 50, State::Answer(active(None))), 0));
        assert_eq!(slots.len(), SLOTS);
        assert!(slots.iter().all(|s| s.hash != "3"));
        assert!(slots.iter().any(|s| s.hash == "new"));
    }

    #[test]
    fn garbage_bucket_reads_as_empty() {
        let s = MemoryStore::new();
        let c = SharedCache::new(&s, &cfg(8), "p");
        s.set(&c.key(&h(1)), b"\xff{not json", crate::store::Guard::Absent).unwrap();
        assert_eq!(c.lookup(&h(1), 0).unwrap(), Lookup::Miss);
        assert_eq!(c.store_answer(&h(1), &active(None), 10, 0, 0).unwrap(), Stored::Cached);
        assert!(matches!(c.lookup(&h(1), 0).unwrap(), Lookup::Hit { .. }));
    }

    #[test]
    fn stale_answer_outlives_the_cache_lifetime_and_survives_markers() {
        let s = MemoryStore::new();
        let cfg = config::Cache { stale_if_error_s: 10, ..cfg(100) };
        let c = SharedCache::new(&s, &cfg, "p");
        let answer = active(Some(100));
        assert_eq!(stale_until_ms(&answer, &cfg, 5_000), 15_000);
        // Never past exp.
        assert_eq!(stale_until_ms(&answer, &cfg, 95_000), 100_000);
        assert_eq!(stale_until_ms(&Answer::Inactive, &cfg, 5_000), 0);
        c.store_answer(&h(1), &answer, 5_000, 15_000, 0).unwrap();
        assert_eq!(c.lookup(&h(1), 6_000).unwrap(), Lookup::Miss, "no longer fresh");
        assert_eq!(c.lookup_stale(&h(1), 6_000).unwrap(), Some(answer.clone()));
        // The refresh's marker and its failure keep the stand-in.
        assert_eq!(c.claim(&h(1), 6_000, 9_000).unwrap(), Claim::Owner);
        assert_eq!(c.lookup_stale(&h(1), 6_500).unwrap(), Some(answer.clone()));
        c.fail(&h(1), 7_000).unwrap();
        assert_eq!(c.lookup_stale(&h(1), 7_500).unwrap(), Some(answer.clone()));
        assert_eq!(c.lookup_stale(&h(1), 15_000).unwrap(), None);
        let off = SharedCache::new(&s, &cfg, "p");
        off.store_answer(&h(2), &answer, 5_000, 0, 0).unwrap();
        assert_eq!(off.lookup_stale(&h(2), 6_000).unwrap(), None);
    }

    /// Found by fuzz/cache_store: `release` (a request that went away while
    /// it refreshed the token, or a send that failed) drops the `Pending`
    /// marker together with the stand-in answer it kept, so the requests that
    /// follow during the outage get 503 instead of the stale answer.
    #[test]
    fn release_keeps_the_stand_in() {
        let s = MemoryStore::new();
        let cfg = config::Cache { stale_if_error_s: 10, ..cfg(100) };
        let c = SharedCache::new(&s, &cfg, "p");
        let answer = active(Some(100));
        c.store_answer(&h(1), &answer, 5_000, 15_000, 0).unwrap();
        assert_eq!(c.claim(&h(1), 6_000, 9_000).unwrap(), Claim::Owner);
        c.release(&h(1), 6_100).unwrap();
        assert_eq!(c.lookup_stale(&h(1), 6_200).unwrap(), Some(answer));
        assert_eq!(c.lookup(&h(1), 6_200).unwrap(), Lookup::Miss, "no marker is left behind");
    }

    /// The security review's reproduction: six unknown tokens in flight and
    /// their negative answers emptied a bucket of eight active answers.
    #[test]
    fn unknown_tokens_never_evict_active_answers() {
        let s = MemoryStore::new();
        let c = SharedCache::new(&s, &cfg(SLOTS as u64), "p");
        for n in 0..SLOTS as u32 {
            assert_eq!(c.store_answer(&h(n), &active(None), 60_000, 0, 0).unwrap(), Stored::Cached);
        }
        for n in 100..120 {
            // In flight: still the owner (it must introspect), but no marker displaces an answer.
            assert_eq!(c.claim(&h(n), 10, 3_000).unwrap(), Claim::Owner);
            assert_eq!(c.lookup(&h(n), 11).unwrap(), Lookup::Miss);
            assert_eq!(c.store_answer(&h(n), &Answer::Inactive, 5_000, 0, 20).unwrap(), Stored::Outranked);
            c.fail(&h(n), 30).unwrap();
        }
        for n in 0..SLOTS as u32 {
            assert!(matches!(c.lookup(&h(n), 40).unwrap(), Lookup::Hit { .. }), "active answer {n} evicted");
        }
        // A new active answer still makes room, in place of the soonest to expire.
        assert_eq!(c.store_answer(&h(50), &active(None), 70_000, 0, 50).unwrap(), Stored::Cached);
        assert!(matches!(c.lookup(&h(50), 60).unwrap(), Lookup::Hit { .. }));
    }

    #[test]
    fn unknown_tokens_evict_their_own_kind_first() {
        let mut slots = Vec::new();
        for i in 0..SLOTS {
            let state = match i {
                0 => State::Answer(Answer::Inactive),
                1 => State::Pending,
                _ => State::Answer(active(None)),
            };
            assert!(put(&mut slots, Slot::new(format!("{i}"), 100, state), 0));
        }
        assert!(put(&mut slots, Slot::new("neg".into(), 100, State::Answer(Answer::Inactive)), 0));
        assert!(slots.iter().all(|s| s.hash != "0"), "the older negative answer went");
        assert!(put(&mut slots, Slot::new("p".into(), 100, State::Pending), 0));
        assert!(slots.iter().all(|s| s.hash != "neg"), "a marker outranks a negative answer");
        assert!(!put(&mut slots, Slot::new("neg2".into(), 100, State::Answer(Answer::Inactive)), 0));
        assert_eq!(slots.iter().filter(|s| matches!(s.state, State::Answer(Answer::Active(_)))).count(), SLOTS - 2);
    }

    fn config_json(extra: &str) -> config::Config {
        let json = format!(
            r#"{{"introspection": {{"cluster": "idp", "authority": "a", "path": "/i", "client_id": "gw", "client_secret": "s"}}{extra}}}"#
        );
        config::Config::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn partition_follows_what_shapes_an_answer() {
        let base = partition(&config_json(""));
        assert_eq!(base.len(), 16);
        assert_eq!(base, partition(&config_json("")), "stable");
        // The denylist and admin API are shared by design: they do not split the cache.
        let same = [r#", "required_scopes": ["read"]"#, r#", "realm": "r""#, r#", "cache": {"max_entries": 64}"#];
        for extra in same {
            assert_eq!(partition(&config_json(extra)), base, "{extra}");
        }
        let other = config_json("");
        let mut differ = Vec::new();
        for change in [
            |c: &mut config::Config| c.introspection.as_mut().unwrap().cluster = "idp-b".into(),
            |c: &mut config::Config| c.introspection.as_mut().unwrap().authority = "b".into(),
            |c: &mut config::Config| c.introspection.as_mut().unwrap().path = "/j".into(),
            |c: &mut config::Config| c.introspection.as_mut().unwrap().client_id = Some("other".into()),
            |c: &mut config::Config| c.introspection.as_mut().unwrap().client_secret = Some("t".into()),
            |c: &mut config::Config| {
                c.claims_to_headers.insert("tenant".into(), "x-auth-tenant".into());
            },
            |c: &mut config::Config| c.cache.max_ttl_s = 1,
            |c: &mut config::Config| c.cache.negative_ttl_s = 0,
        ] {
            let mut c = other.clone();
            change(&mut c);
            differ.push(partition(&c));
        }
        for p in &differ {
            assert_ne!(p, &base);
        }
    }

    #[test]
    fn partitions_share_neither_answers_nor_markers() {
        let s = MemoryStore::new();
        let a = SharedCache::new(&s, &cfg(100), "aaaa");
        let b = SharedCache::new(&s, &cfg(100), "bbbb");
        a.store_answer(&h(1), &active(None), 9_000, 0, 0).unwrap();
        assert_eq!(b.lookup(&h(1), 1).unwrap(), Lookup::Miss);
        assert_eq!(a.claim(&h(2), 0, 3_000).unwrap(), Claim::Owner);
        assert_eq!(b.claim(&h(2), 0, 3_000).unwrap(), Claim::Owner, "B asks its own IdP");
    }

    #[test]
    fn local_cache_keeps_active_answers_only() {
        let mut l = LocalCache::new(3);
        l.insert(h(1), Rc::new(active(None)), 100, 0);
        for n in 10..1_000 {
            l.insert(h(n), Rc::new(Answer::Inactive), 100, 0);
        }
        assert_eq!(l.len(), 1, "unknown tokens neither fill nor flush it");
        assert!(l.get(&h(1), 50).is_some());
    }

    #[test]
    fn local_cache_is_bounded() {
        let mut l = LocalCache::new(3);
        for n in 0..10 {
            l.insert(h(n), Rc::new(active(None)), 100, 0);
            assert!(l.len() <= 3);
        }
        assert!(l.get(&h(9), 99).is_some());
        assert!(l.get(&h(9), 100).is_none());
    }
}
