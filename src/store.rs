//! The `Store` trait: the slice of proxy-wasm shared data the logic needs,
//! so caches and the denylist are tested on the host against `MemoryStore`,
//! which copies Envoy's rules.
//!
//! Envoy's rules (proxy-wasm-cpp-host `SharedData`): one map per `vm_id`,
//! every value carries a CAS number that changes on each write, a write with
//! a CAS is refused when the key exists with another CAS, a write to a
//! missing key always succeeds, and nothing is ever evicted or deleted.

use std::cell::RefCell;
use std::collections::HashMap;

/// Names a shared-data key of this module's record format: `tokengate.v1.<name>`.
/// Bump the version whenever a record's encoding or meaning changes, so that a
/// module of another format (same `vm_id`, after an upgrade or a rollback)
/// starts on keys of its own instead of misreading these.
macro_rules! shared_key {
    ($name:literal) => {
        concat!("tokengate.v1.", $name)
    };
}
pub(crate) use shared_key;

/// What every tokengate shared-data key starts with (format version included).
pub const KEY_PREFIX: &str = shared_key!("");

/// A value and the CAS number it was read with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub cas: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Someone else wrote the key since we read it.
    CasMismatch,
    /// The host refused the call.
    Host,
    /// A CAS loop kept losing; the caller decides what that means.
    Contended,
}

/// How a write is guarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Only if the key still carries this CAS.
    Cas(u32),
    /// Only if the key does not exist yet. Envoy checks a CAS only on an
    /// existing key, so a CAS no live key carries turns a write into an
    /// atomic create.
    Absent,
}

/// Envoy numbers CAS values from 1 upwards and skips 0; no key reaches this.
const CREATE_ONLY_CAS: u32 = u32::MAX;

pub trait Store {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;
    fn set(&self, key: &str, value: &[u8], guard: Guard) -> Result<(), StoreError>;
}

/// How many times a read-modify-write retries before giving up.
const MAX_CAS_ROUNDS: usize = 64;

/// Read-modify-write one key with CAS until it sticks. `change` sees the
/// current value (`None` when the key is missing or empty) and returns the new
/// value, or `None` to leave the key as it is. Returns what `change` returned.
pub fn update<S, F>(store: &S, key: &str, mut change: F) -> Result<Option<Vec<u8>>, StoreError>
where
    S: Store + ?Sized,
    F: FnMut(Option<&[u8]>) -> Option<Vec<u8>>,
{
    for _ in 0..MAX_CAS_ROUNDS {
        let current = store.get(key)?;
        let (value, guard) = match &current {
            Some(v) => (Some(v.value.as_slice()).filter(|b| !b.is_empty()), Guard::Cas(v.cas)),
            None => (None, Guard::Absent),
        };
        let Some(next) = change(value) else {
            return Ok(None);
        };
        match store.set(key, &next, guard) {
            Ok(()) => return Ok(Some(next)),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Contended)
}

/// Proxy-wasm shared data.
pub struct SharedData;

impl Store for SharedData {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        match proxy_wasm::hostcalls::get_shared_data(key) {
            Ok((Some(value), Some(cas))) => Ok(Some(Versioned { value, cas })),
            Ok((None, Some(cas))) => Ok(Some(Versioned { value: Vec::new(), cas })),
            Ok((_, None)) => Ok(None),
            Err(_) => Err(StoreError::Host),
        }
    }

    fn set(&self, key: &str, value: &[u8], guard: Guard) -> Result<(), StoreError> {
        let cas = match guard {
            Guard::Cas(cas) => cas,
            Guard::Absent => CREATE_ONLY_CAS,
        };
        match proxy_wasm::hostcalls::set_shared_data(key, Some(value), Some(cas)) {
            Ok(()) => Ok(()),
            Err(proxy_wasm::types::Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Host),
        }
    }
}

/// An in-memory store with Envoy's rules, for host tests.
#[derive(Default)]
pub struct MemoryStore {
    map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: RefCell<u32>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys ever created: what Envoy would hold in memory forever.
    pub fn key_count(&self) -> usize {
        self.map.borrow().len()
    }

    /// Every key ever created, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.map.borrow().keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Total bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.map.borrow().iter().map(|(k, (v, _))| k.len() + v.len()).sum()
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self.map.borrow().get(key).map(|(value, cas)| Versioned { value: value.clone(), cas: *cas }))
    }

    fn set(&self, key: &str, value: &[u8], guard: Guard) -> Result<(), StoreError> {
        let cas = match guard {
            Guard::Cas(cas) => cas,
            Guard::Absent => CREATE_ONLY_CAS,
        };
        let mut map = self.map.borrow_mut();
        if let Some((_, current)) = map.get(key) {
            if cas != 0 && cas != *current {
                return Err(StoreError::CasMismatch);
            }
        }
        let mut next = self.next_cas.borrow_mut();
        *next = next.wrapping_add(1).max(1);
        map.insert(key.to_string(), (value.to_vec(), *next));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_cas_is_refused() {
        let s = MemoryStore::new();
        s.set("k", b"a", Guard::Absent).unwrap();
        let v = s.get("k").unwrap().unwrap();
        s.set("k", b"b", Guard::Cas(v.cas)).unwrap();
        assert_eq!(s.set("k", b"c", Guard::Cas(v.cas)), Err(StoreError::CasMismatch));
        assert_eq!(s.get("k").unwrap().unwrap().value, b"b");
    }

    #[test]
    fn absent_guard_creates_once() {
        let s = MemoryStore::new();
        s.set("k", b"first", Guard::Absent).unwrap();
        assert_eq!(s.set("k", b"second", Guard::Absent), Err(StoreError::CasMismatch));
        assert_eq!(s.get("k").unwrap().unwrap().value, b"first");
    }

    #[test]
    fn update_retries_until_it_sticks() {
        let s = MemoryStore::new();
        let mut rounds = 0;
        let out = update(&s, "k", |cur| {
            rounds += 1;
            if rounds == 1 {
                // Another writer sneaks in between our read and our write.
                s.set("k", b"other", Guard::Absent).unwrap();
            }
            let mut v = cur.map(|c| c.to_vec()).unwrap_or_default();
            v.push(b'!');
            Some(v)
        })
        .unwrap();
        assert_eq!(rounds, 2);
        assert_eq!(out.unwrap(), b"other!");
        assert_eq!(s.get("k").unwrap().unwrap().value, b"other!");
    }

    #[test]
    fn update_can_decline() {
        let s = MemoryStore::new();
        assert_eq!(update(&s, "k", |_| None).unwrap(), None);
        assert_eq!(s.key_count(), 0);
    }
}
