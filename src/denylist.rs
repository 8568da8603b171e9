//! The denylist: revoked tokens, clients and subjects, in shared data so that
//! every worker sees a revocation as soon as it is written.
//!
//! Keys (fixed, so any configuration of the same `vm_id` reads the same ones;
//! shown without the format prefix `store::KEY_PREFIX`, `tokengate.v1.`):
//! - `tokengate.v1.deny.tokens.<i>`, `i < TOKEN_BUCKETS`: revoked token hashes
//!   and JWT identities (`jwt::identity`), bucketed by hash prefix, each
//!   bucket capped at `bucket_capacity`;
//! - `tokengate.v1.deny.principals`: client and subject records, capped at
//!   `max_principals`;
//! - `tokengate.v1.deny.gen`: a counter bumped after every change, so workers
//!   re-read only when something changed.
//!
//! Expired records are dropped whenever their key is rewritten.

use crate::cache::{hex, TokenHash};
use crate::config;
use crate::introspection::{is_usable_claim_value, Claims};
use crate::store::{shared_key, update, Store, StoreError, KEY_PREFIX};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub const TOKEN_BUCKETS: u64 = 1024;
const PRINCIPALS_KEY: &str = shared_key!("deny.principals");
const GENERATION_KEY: &str = shared_key!("deny.gen");
/// Longest reason kept; longer ones are cut (on a char boundary).
pub const MAX_REASON_CHARS: usize = 200;
/// Longest client id or subject accepted.
pub const MAX_PRINCIPAL_CHARS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    #[serde(rename = "token")]
    Token,
    #[serde(rename = "client")]
    Client,
    #[serde(rename = "sub")]
    Subject,
    /// A JWT by its issuer and `jti`, whatever its encoding.
    #[serde(rename = "jti")]
    Jwt,
}

/// One revocation, as stored and as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Token: hex SHA-256. JWT: `jti:<hex jwt::identity>`. Client:
    /// `client:<id>`. Subject: `sub:<id>`.
    pub id: String,
    pub kind: Kind,
    pub revoked_at: u64,
    pub expires_at: u64,
    pub reason: String,
}

impl Record {
    pub fn principal_id(kind: Kind, name: &str) -> String {
        match kind {
            Kind::Client => format!("client:{name}"),
            Kind::Subject => format!("sub:{name}"),
            Kind::Token => name.to_string(),
            Kind::Jwt => format!("jti:{name}"),
        }
    }

    /// The id of a token (`Kind::Token`) or JWT identity (`Kind::Jwt`) record.
    pub fn hashed_id(kind: Kind, hash: &TokenHash) -> String {
        Record::principal_id(kind, &hex(hash))
    }
}

/// A change to the denylist, as other Envoys learn of it (cluster sync).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    #[serde(rename = "revoked")]
    Revoked(Record),
    #[serde(rename = "undone")]
    Undone { id: String, undone_at: u64 },
}

impl Change {
    pub fn id(&self) -> &str {
        match self {
            Change::Revoked(r) => &r.id,
            Change::Undone { id, .. } => id,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyError {
    /// The bucket or the principal list is at its configured bound.
    Full,
    Store(StoreError),
}

impl From<StoreError> for DenyError {
    fn from(e: StoreError) -> Self {
        DenyError::Store(e)
    }
}

/// What a bulk token revocation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub revoked: Vec<TokenHash>,
    /// Refused because their bucket is full.
    pub full: Vec<TokenHash>,
}

pub fn bucket_capacity(max_tokens: usize) -> usize {
    // Twice the mean plus slack: hashes spread evenly, so a bucket fills up
    // long after the total reaches max_tokens.
    (max_tokens * 2).div_ceil(TOKEN_BUCKETS as usize) + 16
}

fn token_key(hash: &TokenHash) -> String {
    let [a, b, ..] = *hash;
    let index = u64::from(u16::from_be_bytes([a, b])) % TOKEN_BUCKETS;
    format!("{KEY_PREFIX}deny.tokens.{index}")
}

pub fn clip_reason(reason: &str) -> String {
    reason.chars().filter(|c| !c.is_control()).take(MAX_REASON_CHARS).collect()
}

fn decode(bytes: Option<&[u8]>) -> Vec<Record> {
    match bytes {
        None => Vec::new(),
        Some(b) => serde_json::from_slice(b).unwrap_or_else(|e| {
            // Never silently: an unreadable denylist key loses revocations.
            log::error!("unreadable denylist record list dropped: {e}");
            Vec::new()
        }),
    }
}

fn encode(records: &[Record]) -> Vec<u8> {
    serde_json::to_vec(records).unwrap_or_default()
}

pub struct Denylist<'s, S: Store + ?Sized> {
    store: &'s S,
    limits: &'s config::Denylist,
}

impl<'s, S: Store + ?Sized> Denylist<'s, S> {
    pub fn new(store: &'s S, limits: &'s config::Denylist) -> Self {
        Denylist { store, limits }
    }

    /// Revokes tokens (by hash, with the time their record may expire).
    /// A token already revoked keeps its first `revoked_at`.
    pub fn revoke_tokens(&self, items: &[(TokenHash, u64)], reason: &str, now: u64) -> Result<Revoked, DenyError> {
        self.revoke_hashed(Kind::Token, items, reason, now)
    }

    /// Revokes JWTs by `jwt::identity`, as `revoke_tokens` does tokens.
    pub fn revoke_identities(&self, items: &[(TokenHash, u64)], reason: &str, now: u64) -> Result<Revoked, DenyError> {
        self.revoke_hashed(Kind::Jwt, items, reason, now)
    }

    fn revoke_hashed(
        &self,
        kind: Kind,
        items: &[(TokenHash, u64)],
        reason: &str,
        now: u64,
    ) -> Result<Revoked, DenyError> {
        let reason = clip_reason(reason);
        let capacity = bucket_capacity(self.limits.max_tokens);
        let mut by_key: HashMap<String, Vec<(TokenHash, u64)>> = HashMap::new();
        for item in items {
            by_key.entry(token_key(&item.0)).or_default().push(*item);
        }
        let mut result = Revoked::default();
        for (key, group) in by_key {
            let mut refused = Vec::new();
            update(self.store, &key, |current| {
                refused.clear();
                let mut records = decode(current);
                records.retain(|r| r.expires_at > now);
                for (hash, expires_at) in &group {
                    let id = Record::hashed_id(kind, hash);
                    if let Some(r) = records.iter_mut().find(|r| r.id == id) {
                        r.expires_at = r.expires_at.max(*expires_at);
                    } else if records.len() < capacity {
                        records.push(Record {
                            id,
                            kind,
                            revoked_at: now,
                            expires_at: *expires_at,
                            reason: reason.clone(),
                        });
                    } else {
                        refused.push(*hash);
                    }
                }
                Some(encode(&records))
            })?;
            for (hash, _) in &group {
                if refused.contains(hash) {
                    result.full.push(*hash);
                } else {
                    result.revoked.push(*hash);
                }
            }
        }
        self.bump()?;
        Ok(result)
    }

    /// Denies every token of a client or subject issued at or before `now`.
    pub fn revoke_principal(&self, kind: Kind, name: &str, reason: &str, now: u64) -> Result<Record, DenyError> {
        let record = Record {
            id: Record::principal_id(kind, name),
            kind,
            revoked_at: now,
            expires_at: now.saturating_add(self.limits.principal_ttl_s),
            reason: clip_reason(reason),
        };
        let mut full = false;
        update(self.store, PRINCIPALS_KEY, |current| {
            let mut records = decode(current);
            records.retain(|r| r.expires_at > now && r.id != record.id);
            full = records.len() >= self.limits.max_principals;
            if full {
                return None;
            }
            records.push(record.clone());
            Some(encode(&records))
        })?;
        if full {
            return Err(DenyError::Full);
        }
        self.bump()?;
        Ok(record)
    }

    /// Removes a revocation by its admin id. Returns false if there was none.
    pub fn undo(&self, id: &str, now: u64) -> Result<bool, DenyError> {
        let Some(key) = key_for_id(id) else {
            return Ok(false);
        };
        let id = canonical_id(id);
        let mut found = false;
        update(self.store, &key, |current| {
            let mut records = decode(current);
            found = records.iter().any(|r| r.id == id && r.expires_at > now);
            if !found {
                return None;
            }
            records.retain(|r| r.id != id && r.expires_at > now);
            Some(encode(&records))
        })?;
        if found {
            self.bump()?;
        }
        Ok(found)
    }

    /// Applies changes made on another Envoy. A revocation keeps its
    /// original times; an un-revoke removes only a record revoked at or
    /// before it. Returns how many changes took effect.
    pub fn apply(&self, changes: &[Change], now: u64) -> Result<usize, DenyError> {
        let mut by_key: HashMap<String, Vec<&Change>> = HashMap::new();
        for change in changes {
            let Some(key) = key_for_id(change.id()) else {
                log::warn!("ignoring a synced revocation with a malformed id");
                continue;
            };
            by_key.entry(key).or_default().push(change);
        }
        let capacity = bucket_capacity(self.limits.max_tokens);
        let mut applied = 0;
        for (key, group) in by_key {
            let limit = if key == PRINCIPALS_KEY { self.limits.max_principals } else { capacity };
            // Times, not batch order, decide between a revocation and an un-revoke of one id.
            let undone = latest_undone(&group);
            let group: Vec<&Change> = group.into_iter().filter(|c| !undone_since(c, &undone)).collect();
            let mut changed = 0;
            update(self.store, &key, |current| {
                changed = 0;
                let mut records = decode(current);
                records.retain(|r| r.expires_at > now);
                for change in &group {
                    if apply_one(&mut records, change, limit, now) {
                        changed += 1;
                    }
                }
                (changed > 0).then(|| encode(&records))
            })?;
            applied += changed;
        }
        if applied > 0 {
            self.bump()?;
        }
        Ok(applied)
    }

    /// The live record for a token, if it is revoked.
    pub fn token_record(&self, hash: &TokenHash, now: u64) -> Result<Option<Record>, StoreError> {
        self.hashed_record(Kind::Token, hash, now)
    }

    /// The live record of a token (`Kind::Token`) or JWT identity (`Kind::Jwt`).
    pub fn hashed_record(&self, kind: Kind, hash: &TokenHash, now: u64) -> Result<Option<Record>, StoreError> {
        let id = Record::hashed_id(kind, hash);
        let value = self.store.get(&token_key(hash))?;
        let records = decode(value.as_ref().map(|v| v.value.as_slice()).filter(|b| !b.is_empty()));
        Ok(records.into_iter().find(|r| r.id == id && r.expires_at > now))
    }

    pub fn principals(&self, now: u64) -> Result<Vec<Record>, StoreError> {
        let value = self.store.get(PRINCIPALS_KEY)?;
        let records = decode(value.as_ref().map(|v| v.value.as_slice()).filter(|b| !b.is_empty()));
        Ok(records.into_iter().filter(|r| r.expires_at > now).collect())
    }

    /// Every live record, newest first.
    pub fn list(&self, now: u64) -> Result<Vec<Record>, StoreError> {
        let mut all = self.principals(now)?;
        for i in 0..TOKEN_BUCKETS {
            if let Some(v) = self.store.get(&format!("{KEY_PREFIX}deny.tokens.{i}"))? {
                let records = decode(Some(v.value.as_slice()).filter(|b| !b.is_empty()));
                all.extend(records.into_iter().filter(|r| r.expires_at > now));
            }
        }
        all.sort_by(|a, b| b.revoked_at.cmp(&a.revoked_at).then_with(|| a.id.cmp(&b.id)));
        Ok(all)
    }

    /// The change counter workers compare against their view.
    /// It is the CAS number of an empty key: every request reads it, and an
    /// empty value costs Envoy no copy into the module.
    pub fn generation(&self) -> Result<u64, StoreError> {
        Ok(self.store.get(GENERATION_KEY)?.map_or(0, |v| u64::from(v.cas)))
    }

    fn bump(&self) -> Result<(), StoreError> {
        // Any write gives the key a new CAS number.
        update(self.store, GENERATION_KEY, |_| Some(Vec::new()))?;
        Ok(())
    }
}

/// The shared-data key that holds a record with this admin id.
fn key_for_id(id: &str) -> Option<String> {
    if let Some(hash) = crate::cache::parse_hex(id.strip_prefix("jti:").unwrap_or(id)) {
        return Some(token_key(&hash));
    }
    (id.starts_with("client:") || id.starts_with("sub:")).then(|| PRINCIPALS_KEY.to_string())
}

/// The latest un-revoke time of each id a batch un-revokes.
fn latest_undone<'a>(batch: &[&'a Change]) -> HashMap<&'a str, u64> {
    let mut latest: HashMap<&str, u64> = HashMap::new();
    for change in batch {
        if let Change::Undone { id, undone_at } = change {
            let at = latest.entry(id.as_str()).or_default();
            *at = (*at).max(*undone_at);
        }
    }
    latest
}

/// Whether `change` revokes an id un-revoked at or after that time.
fn undone_since(change: &Change, undone: &HashMap<&str, u64>) -> bool {
    matches!(change, Change::Revoked(r) if undone.get(r.id.as_str()).is_some_and(|at| *at >= r.revoked_at))
}

fn apply_one(records: &mut Vec<Record>, change: &Change, limit: usize, now: u64) -> bool {
    match change {
        Change::Revoked(r) if r.expires_at <= now => false,
        Change::Revoked(r) => {
            if let Some(x) = records.iter_mut().find(|x| x.id == r.id) {
                // A later revocation of a client or subject covers more tokens.
                if matches!(x.kind, Kind::Client | Kind::Subject) && x.revoked_at < r.revoked_at {
                    *x = r.clone();
                    return true;
                }
                if x.expires_at < r.expires_at {
                    x.expires_at = r.expires_at;
                    return true;
                }
                return false;
            }
            if records.len() >= limit {
                log::error!("denylist full: a synced revocation of {} was dropped", r.id);
                return false;
            }
            records.push(r.clone());
            true
        }
        Change::Undone { id, undone_at } => {
            let before = records.len();
            records.retain(|x| !(x.id == *id && x.revoked_at <= *undone_at));
            records.len() != before
        }
    }
}

/// An admin id as records store it: token hashes and JWT identities in
/// lower-case hex, client and subject ids as given.
pub fn canonical_id(id: &str) -> String {
    match id.strip_prefix("jti:") {
        Some(hash) if crate::cache::parse_hex(hash).is_some() => format!("jti:{}", hash.to_ascii_lowercase()),
        _ if crate::cache::parse_hex(id).is_some() => id.to_ascii_lowercase(),
        _ => id.to_string(),
    }
}

/// One worker's memo of the denylist, refreshed when the generation moves.
pub struct DenyView {
    generation: Option<u64>,
    /// (kind, name) → revoked_at, expires_at.
    principals: HashMap<(Kind, String), (u64, u64)>,
    /// Token hash → revoked until (0: not revoked), as last read.
    tokens: HashMap<TokenHash, u64>,
    /// JWT identity → revoked until, likewise.
    identities: HashMap<TokenHash, u64>,
    /// Bound on `tokens`; it starts over when full.
    memo_entries: usize,
}

impl DenyView {
    pub fn new(memo_entries: usize) -> DenyView {
        DenyView {
            generation: None,
            principals: HashMap::new(),
            tokens: HashMap::new(),
            identities: HashMap::new(),
            memo_entries,
        }
    }

    /// Re-reads the principal list if anything changed since the last call.
    pub fn refresh<S: Store + ?Sized>(&mut self, list: &Denylist<'_, S>, now: u64) -> Result<(), StoreError> {
        let generation = list.generation()?;
        if self.generation == Some(generation) {
            return Ok(());
        }
        self.tokens.clear();
        self.identities.clear();
        self.principals = list
            .principals(now)?
            .into_iter()
            .filter_map(|r| {
                let (kind, name) = match r.kind {
                    Kind::Client => (Kind::Client, r.id.strip_prefix("client:")?),
                    Kind::Subject => (Kind::Subject, r.id.strip_prefix("sub:")?),
                    Kind::Token | Kind::Jwt => return None,
                };
                Some(((kind, name.to_string()), (r.revoked_at, r.expires_at)))
            })
            .collect();
        self.generation = Some(generation);
        Ok(())
    }

    /// Whether the token itself is revoked. Call `refresh` first.
    pub fn token_revoked<S: Store + ?Sized>(
        &mut self,
        list: &Denylist<'_, S>,
        hash: &TokenHash,
        now: u64,
    ) -> Result<bool, StoreError> {
        self.hashed_revoked(list, Kind::Token, hash, now)
    }

    /// Whether a JWT identity (`Claims::identity`) is revoked. Call `refresh` first.
    pub fn identity_revoked<S: Store + ?Sized>(
        &mut self,
        list: &Denylist<'_, S>,
        identity: &TokenHash,
        now: u64,
    ) -> Result<bool, StoreError> {
        self.hashed_revoked(list, Kind::Jwt, identity, now)
    }

    fn hashed_revoked<S: Store + ?Sized>(
        &mut self,
        list: &Denylist<'_, S>,
        kind: Kind,
        hash: &TokenHash,
        now: u64,
    ) -> Result<bool, StoreError> {
        let memo = if kind == Kind::Jwt { &mut self.identities } else { &mut self.tokens };
        if let Some(&until) = memo.get(hash) {
            return Ok(until > now);
        }
        let until = list.hashed_record(kind, hash, now)?.map_or(0, |r| r.expires_at);
        if memo.len() >= self.memo_entries {
            memo.clear();
        }
        memo.insert(*hash, until);
        Ok(until > now)
    }

    /// Whether the token's client or subject was revoked after it was issued
    /// (see `covers`). A client id or subject that is no usable claim value
    /// is matched by nothing, as it reaches no header.
    pub fn principal_revoked(&self, claims: &Claims, now: u64, skew_s: u64) -> bool {
        if self.principals.is_empty() {
            return false;
        }
        let hit = |kind: Kind, name: &Option<String>| {
            name.as_deref().filter(|n| is_usable_claim_value(n)).is_some_and(|n| {
                self.principals.get(&(kind, n.to_string())).is_some_and(|&(revoked_at, expires_at)| {
                    expires_at > now && covers(revoked_at, claims.iat, now, skew_s)
                })
            })
        };
        hit(Kind::Client, &claims.client_id) || hit(Kind::Subject, &claims.sub)
    }
}

/// Whether a client or subject revocation made at `revoked_at` (Envoy's
/// clock) covers a token issued at `iat` (the authorization server's clock),
/// allowing that clock to run up to `skew_s` ahead. A token without `iat`, or
/// with an `iat` further in the future than the skew allows, counts as
/// issued before: its issue time proves nothing.
pub fn covers(revoked_at: u64, iat: Option<u64>, now: u64, skew_s: u64) -> bool {
    match iat {
        None => true,
        Some(iat) => iat <= revoked_at.saturating_add(skew_s) || iat > now.saturating_add(skew_s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn limits() -> config::Denylist {
        config::Denylist::default()
    }

    fn h(n: u32) -> TokenHash {
        use sha2::Digest;
        sha2::Sha256::digest(n.to_be_bytes()).into()
    }

    #[test]
    fn revoked_identity_is_seen_by_the_view_and_synced_like_a_token() {
        let s = MemoryStore::new();
        let l = limits();
        let d = Denylist::new(&s, &l);
        let mut view = DenyView::new(16);
        view.refresh(&d, 100).unwrap();
        assert!(!view.identity_revoked(&d, &h(7), 100).unwrap());
        d.revoke_identities(&[(h(7), 500)], "", 100).unwrap();
        view.refresh(&d, 100).unwrap();
        assert!(view.identity_revoked(&d, &h(7), 100).unwrap());
        assert!(!view.token_revoked(&d, &h(7), 100).unwrap(), "an identity record is not a token's");
        assert!(!view.identity_revoked(&d, &h(7), 500).unwrap(), "expired");
        // Another Envoy applies the same record by its id.
        let other = MemoryStore::new();
        let record = d.list(100).unwrap().remove(0);
        assert_eq!((record.kind, record.id.clone()), (Kind::Jwt, format!("jti:{}", hex(&h(7)))));
        let o = Denylist::new(&other, &l);
        assert_eq!(o.apply(&[Change::Revoked(record.clone())], 100).unwrap(), 1);
        assert_eq!(o.list(100).unwrap(), vec![record]);
        assert!(o.undo(&format!("jti:{}", hex(&h(7))), 101).unwrap());
        assert!(o.list(101).unwrap().is_empty());
    }

    #[test]
    fn keys_carry_the_format_version_and_another_format_is_never_read() {
        let s = MemoryStore::new();
        let l = limits();
        let d = Denylist::new(&s, &l);
        d.revoke_tokens(&[(h(1), 500)], "", 100).unwrap();
        d.revoke_principal(Kind::Client, "ci", "", 100).unwrap();
        let keys = s.keys();
        assert!(keys.iter().all(|k| k.starts_with("tokengate.v1.")), "{keys:?}");
        // Records written by a module of another format (here the unversioned one) stay unseen.
        let other = MemoryStore::new();
        let old = Denylist::new(&other, &l);
        old.revoke_tokens(&[(h(2), 500)], "", 100).unwrap();
        for key in other.keys() {
            let legacy = key.replacen(KEY_PREFIX, "tokengate.", 1);
            let value = other.get(&key).unwrap().unwrap().value;
            s.set(&legacy, &value, crate::store::Guard::Absent).unwrap();
        }
        assert_eq!(d.token_record(&h(2), 100).unwrap(), None);
        assert_eq!(d.list(100).unwrap().len(), 2);
    }

    #[test]
    fn revoked_token_is_seen_with_its_record() {
        let s = MemoryStore::new();
        let l = limits();
        let d = Denylist::new(&s, &l);
        let out = d.revoke_tokens(&[(h(1), 500)], "leaked", 100).unwrap();
        assert_eq!(out.revoked, vec![h(1)]);
        let r = d.token_record(&h(1), 100).unwrap().unwrap();
        assert_eq!((r.id.as_str(), r.kind, r.revoked_at, r.expires_at), (hex(&h(1)).as_str(), Kind::Token, 100, 500));
        assert_eq!(r.reason, "leaked");
        assert_eq!(d.token_record(&h(2), 100).unwrap(), None);
        // The record ends with the token.
        assert_eq!(d.token_record(&h(1), 500).unwrap(), None);
    }

    #[test]
    fn revoking_again_keeps_the_first_revoked_at() {
        let s = MemoryStore::new();
        let l = limits();
        let d = Denylist::new(&s, &l);
        d.revoke_tokens(&[(h(1), 500)], "first", 100).unwrap();
        d.revoke_tokens(&[(h(1), 900)], "second", 200).unwrap();
        let r = d.token_record(&h(1), 300).unwrap().unwrap();
        assert_eq!((r.revoked_at, r.expires_at, r.reason.as_str()), (100, 900, "first"));
    }

    #[test]
    fn undo_removes_and_reports_unknown() {
        let s = MemoryStore::new();
        let l = limits();
        let d = Denylist::new(&s, &l);
        d.revoke_tokens(&[(h(1), 500)], "", 100).unwrap();
        d.revoke_principal(Kind::Client, "app", "", 100).unwrap();
        assert!(d.undo(&hex(&h(1)).to_uppercase(), 101).unwrap());
        assert!(!d.undo(&hex(&h(1)), 101).unwrap());
        assert!(d.undo("client:app", 101).unwrap());
        assert!(!d.undo("client:app", 101).unwrap());
        assert!(!d.undo("nonsense", 101).unwrap());
        assert!(d.list(101).unwrap().is_empty());
    }

    #[test]
    fn generation_moves_on_every_change() {
        let s = MemoryStore::new();
        let l = limits();
        let d = Denylist::new(&s, &l);
        let mut seen = vec![d.generation().unwrap()];
        d.revoke_tokens(&[(h(1), 500)], "", 100).unwrap();
        seen.push(d.generation().unwrap());
        d.revoke_principal(Kind::Subject, "alice", "", 100).unwrap();
        seen.push(d.generation().unwrap());
        assert!(!d.undo("sub:nobody", 100).unwrap());
        assert_eq!(d.generation().unwrap(), seen[2], "no change, no new generation");
        d.undo("sub:alice", 100).unwrap();
        seen.push(d.generation().unwrap());
        let distinct: std::collections::HashSet<_> = seen.iter().collect();
        assert_eq!(distinct.len(), 4, "{seen:?}");
        assert_eq!(s.get(GENERATION_KEY).unwrap().unwrap().value, b"");
    }

    /// A worker's view of a denylist holding one client or subject revocation.
    fn view_of_principal_revoked(kind: Kind, name: &str, at: u64) -> DenyView {
        let s = MemoryStore::new();
        let l = limits();
        let d = Denylist::new(&s, &l);
        d.revoke_principal(kind, name, "", at).unwrap();
        let mut view = DenyView::new(16);
        view.refresh(&d, at).unwrap();
        view
    }

    #[test]
    fn principal_revocation_covers_tokens_issued_until_then() {
        let view = view_of_principal_revoked(Kind::Client, "app", 1000);
        let claims =
            |client: &str, iat: Option<u64>| Claims { client_id: Some(client.into()), iat, ..Default::default() };
        assert!(view.principal_revoked(&claims("app", Some(999)), 1001, 0));
        assert!(view.principal_revoked(&claims("app", Some(1000)), 1001, 0));
        assert!(view.principal_revoked(&claims("app", None), 1001, 0));
        assert!(!view.principal_revoked(&claims("app", Some(1001)), 1001, 0));
        assert!(!view.principal_revoked(&claims("other", Some(1)), 1001, 0));
        let sub = Claims { sub: Some("app".into()), iat: Some(1), ..Default::default() };
        assert!(!view.principal_revoked(&sub, 1001, 0), "a client id is not a subject");
        // With a skew allowance, a token the IdP stamped up to that much later is covered too.
        assert!(view.principal_revoked(&claims("app", Some(1060)), 1001, 60));
        assert!(!view.principal_revoked(&claims("app", Some(1061)), 1001, 60));
    }

    #[test]
    fn a_revocation_allows_for_the_idp_clock_running_ahead() {
        // Revoked at 1000 (Envoy's clock), checked at now = 1010, 60 s allowed.
        let covered = |iat| covers(1000, iat, 1010, 60);
        assert!(covered(None), "no iat: counts as issued before");
        assert!(covered(Some(0)));
        assert!(covered(Some(1000)));
        assert!(covered(Some(1060)), "stamped by an IdP 60 s ahead, just before the revocation");
        assert!(!covered(Some(1061)), "issued after the revocation, even by a clock 60 s ahead");
        assert!(!covered(Some(1070)), "as late as now + skew: a later token, not a forged time");
        assert!(covered(Some(1071)), "further in the future than the skew allows: its iat proves nothing");
        assert!(covered(Some(u64::MAX)));
        // Without an allowance the clocks are taken as equal.
        assert!(covers(1000, Some(1000), 1010, 0));
        assert!(!covers(1000, Some(1001), 1010, 0));
        assert!(covers(1000, Some(1011), 1010, 0));
        // Nothing overflows at the ends of time.
        assert!(covers(u64::MAX, Some(u64::MAX), u64::MAX, u64::MAX));
        assert!(!covers(0, Some(1), u64::MAX, 0));
    }

    #[test]
    fn unusable_client_ids_and_subjects_are_matched_by_nothing() {
        let view = view_of_principal_revoked(Kind::Subject, "admin", 1000);
        let sub = |name: &str| Claims { sub: Some(name.into()), iat: Some(1), ..Default::default() };
        assert!(view.principal_revoked(&sub("admin"), 1001, 0));
        for refused in [" admin", "admin ", " admin ", ""] {
            assert!(!view.principal_revoked(&sub(refused), 1001, 0), "{refused:?}");
        }
    }

    #[test]
    fn memo_stays_within_its_bound_and_still_answers_right() {
        let s = MemoryStore::new();
        let l = limits();
        let d = Denylist::new(&s, &l);
        d.revoke_tokens(&[(h(7), 500)], "", 0).unwrap();
        let mut view = DenyView::new(16);
        view.refresh(&d, 0).unwrap();
        for round in 0..3 {
            for n in 0..100 {
                assert_eq!(view.token_revoked(&d, &h(n), 0).unwrap(), n == 7, "token {n}, round {round}");
                assert!(view.tokens.len() <= 16);
            }
        }
    }

    #[test]
    fn view_sees_changes_through_the_generation() {
        let s = MemoryStore::new();
        let l = limits();
        let d = Denylist::new(&s, &l);
        let mut view = DenyView::new(16);
        view.refresh(&d, 0).unwrap();
        assert!(!view.token_revoked(&d, &h(1), 0).unwrap());
        d.revoke_tokens(&[(h(1), 500)], "", 0).unwrap();
        // Memoised until the generation moves.
        view.refresh(&d, 0).unwrap();
        assert!(view.token_revoked(&d, &h(1), 0).unwrap());
        d.undo(&hex(&h(1)), 0).unwrap();
        view.refresh(&d, 0).unwrap();
        assert!(!view.token_revoked(&d, &h(1), 0).unwrap());
    }

    #[test]
    fn principals_are_bounded() {
        let s = MemoryStore::new();
        let l = config::Denylist { max_principals: 2, ..limits() };
        let d = Denylist::new(&s, &l);
        d.revoke_principal(Kind::Client, "a", "", 0).unwrap();
        d.revoke_principal(Kind::Client, "b", "", 0).unwrap();
        assert_eq!(d.revoke_principal(Kind::Client, "c", "", 0), Err(DenyError::Full));
        // Re-revoking an existing one is an update, not a new record.
        assert!(d.revoke_principal(Kind::Client, "a", "", 5).is_ok());
    }

    #[test]
    fn ten_thousand_tokens_stay_within_the_bound() {
        let s = MemoryStore::new();
        let l = config::Denylist { max_tokens: 10_000, ..limits() };
        let d = Denylist::new(&s, &l);
        let items: Vec<(TokenHash, u64)> = (0..10_000).map(|n| (h(n), 10_000)).collect();
        let out = d.revoke_tokens(&items, "bulk", 1).unwrap();
        assert_eq!(out.revoked.len(), 10_000);
        assert!(out.full.is_empty());
        assert!(s.key_count() as u64 <= TOKEN_BUCKETS + 2);
        let bound = TOKEN_BUCKETS as usize * bucket_capacity(10_000) * 200;
        assert!(s.bytes() < bound, "{} >= {bound}", s.bytes());
        assert_eq!(d.list(2).unwrap().len(), 10_000);
    }

    #[test]
    fn a_full_bucket_refuses_and_says_so() {
        let s = MemoryStore::new();
        let l = config::Denylist { max_tokens: 1, ..limits() };
        let d = Denylist::new(&s, &l);
        let cap = bucket_capacity(1);
        // Find cap + 1 hashes that land in one bucket.
        let key = token_key(&h(0));
        let same: Vec<(TokenHash, u64)> =
            (0..).map(h).filter(|x| token_key(x) == key).take(cap + 1).map(|x| (x, 99)).collect();
        let out = d.revoke_tokens(&same, "", 1).unwrap();
        assert_eq!(out.revoked.len(), cap);
        assert_eq!(out.full.len(), 1);
        // Expired records make room again.
        let out = d.revoke_tokens(&same[cap..], "", 99).unwrap();
        assert_eq!(out.revoked.len(), 1);
    }

    #[test]
    fn synced_changes_apply_once_and_in_order() {
        let s = MemoryStore::new();
        let l = limits();
        let d = Denylist::new(&s, &l);
        let rec = |id: String, kind, at| Record { id, kind, revoked_at: at, expires_at: 1000, reason: "r".into() };
        let token = rec(hex(&h(1)), Kind::Token, 10);
        let client = rec("client:app".into(), Kind::Client, 10);
        let changes = vec![Change::Revoked(token.clone()), Change::Revoked(client.clone())];
        assert_eq!(d.apply(&changes, 20).unwrap(), 2);
        assert_eq!(d.apply(&changes, 20).unwrap(), 0, "idempotent");
        assert_eq!(d.token_record(&h(1), 20).unwrap(), Some(token.clone()));
        // An un-revoke older than the revocation does not remove it.
        assert_eq!(d.apply(&[Change::Undone { id: token.id.clone(), undone_at: 5 }], 20).unwrap(), 0);
        assert_eq!(d.apply(&[Change::Undone { id: token.id.clone(), undone_at: 15 }], 20).unwrap(), 1);
        assert_eq!(d.token_record(&h(1), 20).unwrap(), None);
        // A newer client revocation replaces the older one.
        let newer = rec("client:app".into(), Kind::Client, 30);
        assert_eq!(d.apply(&[Change::Revoked(newer.clone())], 40).unwrap(), 1);
        assert_eq!(d.principals(40).unwrap(), vec![newer]);
        assert_eq!(d.apply(&[Change::Undone { id: "garbage".into(), undone_at: 1 }], 40).unwrap(), 0);
    }

    #[test]
    fn a_batch_naming_an_id_twice_applies_by_time_not_by_order() {
        // A range page lists keys in key order, so `revoked/` comes before `undone/` whatever happened first.
        let l = limits();
        let rec = |at| Record {
            id: "client:app".into(),
            kind: Kind::Client,
            revoked_at: at,
            expires_at: 1000,
            reason: "r".into(),
        };
        let undone = |at| Change::Undone { id: "client:app".into(), undone_at: at };
        for (revoked_at, undone_at, stays) in [(10, 12, false), (10, 10, false), (12, 10, true)] {
            let batch = [Change::Revoked(rec(revoked_at)), undone(undone_at)];
            let reversed = [undone(undone_at), Change::Revoked(rec(revoked_at))];
            for changes in [batch, reversed] {
                let s = MemoryStore::new();
                let d = Denylist::new(&s, &l);
                assert_eq!(
                    d.apply(&changes, 20).unwrap(),
                    usize::from(stays),
                    "revoked {revoked_at}, undone {undone_at}"
                );
                assert_eq!(d.apply(&changes, 20).unwrap(), 0, "applying twice changes nothing");
                assert_eq!(d.principals(20).unwrap(), if stays { vec![rec(revoked_at)] } else { vec![] });
            }
        }
    }

    #[test]
    fn reasons_are_clipped_and_cleaned() {
        assert_eq!(clip_reason("a\nb"), "ab");
        assert_eq!(clip_reason(&"é".repeat(300)).chars().count(), MAX_REASON_CHARS);
    }
}
