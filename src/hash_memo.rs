//! Each worker's memory of the tokens it has already hashed, so that a token
//! seen again costs one keyed pass and one comparison instead of the
//! b64token scan and SHA-256 (17 blocks for a 1 KiB JWT).
//!
//! The raw token is kept here, in this worker's VM memory only: never in
//! shared data, logs or answers. An entry is found by SipHash, with a key
//! drawn at random per VM (an attacker can neither predict nor grind the
//! slots), of the token's length and its first and last `EDGE` bytes, where
//! tokens differ (a JWT's signature; an opaque token is shorter than that),
//! so the slot costs the same for 40 bytes as for 4 KiB; a hit compares the
//! whole token, so a token is never taken for another. At most `cache.hash_memo_entries` tokens; a full memo starts
//! over, so a flood of new tokens costs the hot ones one SHA-256 each.
//! The memo only names a token: whether it is revoked or cached is still
//! looked up by that SHA-256 on every request.

use crate::cache::TokenHash;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

/// Bytes at each end of a token that name its slot.
const EDGE: usize = 32;

pub struct HashMemo {
    /// Per-VM random SipHash key (the host's `random_get`).
    key: RandomState,
    /// Keyed hash of a token → the token and its SHA-256.
    entries: HashMap<u64, (Box<[u8]>, TokenHash), BuildHasherDefault<Keyed>>,
    capacity: usize,
}

impl HashMemo {
    pub fn new(capacity: usize) -> HashMemo {
        HashMemo { key: RandomState::new(), entries: HashMap::default(), capacity }
    }

    /// The SHA-256 of `token`, if this worker has seen exactly these bytes.
    pub fn get(&self, token: &[u8]) -> Option<TokenHash> {
        let (stored, hash) = self.entries.get(&self.slot(token))?;
        same_bytes(stored, token).then_some(*hash)
    }

    /// Remembers a token (already checked to be a b64token) and its SHA-256.
    pub fn insert(&mut self, token: &[u8], hash: TokenHash) {
        if self.capacity == 0 {
            return;
        }
        let slot = self.slot(token);
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&slot) {
            self.entries.clear();
        }
        // Two tokens with one slot (the same ends and length, or 2^-64): the newer one takes it.
        self.entries.insert(slot, (token.into(), hash));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn slot(&self, token: &[u8]) -> u64 {
        let mut h = self.key.build_hasher();
        h.write_usize(token.len());
        if token.len() <= 2 * EDGE {
            h.write(token);
        } else {
            h.write(token.get(..EDGE).unwrap_or_default());
            h.write(token.get(token.len() - EDGE..).unwrap_or_default());
        }
        h.finish()
    }
}

/// The map's own hash of a slot: the slot is already a keyed SipHash.
#[derive(Default)]
struct Keyed(u64);

impl Hasher for Keyed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (the key is a u64); fold anything else in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Whole-token equality eight bytes at a time (the byte loop `==` compiles
/// to in wasm costs several times more on a 4 KiB token).
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (wa, wb) = (a.chunks_exact(8), b.chunks_exact(8));
    let word = |w: &[u8]| u64::from_ne_bytes(w.try_into().unwrap_or_default());
    wa.remainder() == wb.remainder() && wa.zip(wb).all(|(x, y)| word(x) == word(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(n: u8) -> TokenHash {
        [n; 32]
    }

    #[test]
    fn a_token_is_found_only_by_its_exact_bytes() {
        let mut m = HashMemo::new(16);
        let token = vec![b'L'; 4096];
        m.insert(&token, sha(1));
        assert_eq!(m.get(&token), Some(sha(1)));
        for other in [&token[..4095], &[b'L'; 4097][..], b"L", b""] {
            assert_eq!(m.get(other), None, "{} bytes", other.len());
        }
        // One byte different anywhere, in the words or in the tail.
        for at in [0, 7, 8, 2048, 4095] {
            let mut changed = token.clone();
            changed[at] = b'M';
            assert_eq!(m.get(&changed), None, "byte {at}");
        }
    }

    #[test]
    fn tokens_alike_at_both_ends_share_a_slot_but_never_a_hash() {
        let mut m = HashMemo::new(16);
        let a = format!("{}{}{}", "h".repeat(40), "a".repeat(100), "t".repeat(40));
        let b = format!("{}{}{}", "h".repeat(40), "b".repeat(100), "t".repeat(40));
        assert_eq!(m.slot(a.as_bytes()), m.slot(b.as_bytes()));
        m.insert(a.as_bytes(), sha(1));
        assert_eq!(m.get(b.as_bytes()), None, "b is not a");
        m.insert(b.as_bytes(), sha(2));
        assert_eq!((m.get(a.as_bytes()), m.get(b.as_bytes())), (None, Some(sha(2))));
        // Short tokens are named by all their bytes, and the length counts.
        assert_ne!(m.slot(b"abc"), m.slot(b"abd"));
        assert_ne!(m.slot(&[b'x'; 200]), m.slot(&[b'x'; 201]));
    }

    #[test]
    fn the_memo_stays_within_its_bound() {
        let mut m = HashMemo::new(3);
        for n in 0..10u8 {
            m.insert(format!("token-{n}").as_bytes(), sha(n));
            assert!(m.len() <= 3);
        }
        // It started over at the fourth token, so the newest are there.
        assert_eq!(m.get(b"token-9"), Some(sha(9)));
        assert_eq!(m.get(b"token-0"), None);
        // Remembering a token it holds does not start it over.
        let mut m = HashMemo::new(2);
        m.insert(b"a", sha(1));
        m.insert(b"b", sha(2));
        m.insert(b"b", sha(2));
        assert_eq!((m.get(b"a"), m.get(b"b")), (Some(sha(1)), Some(sha(2))));
    }

    #[test]
    fn zero_entries_turns_the_memo_off() {
        let mut m = HashMemo::new(0);
        m.insert(b"a", sha(1));
        assert!(m.is_empty());
        assert_eq!(m.get(b"a"), None);
    }

    #[test]
    fn each_memo_has_its_own_key() {
        let (a, b) = (HashMemo::new(1), HashMemo::new(1));
        let token = b"the same token";
        assert_ne!(a.slot(token), b.slot(token));
    }

    #[test]
    fn same_bytes_compares_every_byte() {
        for len in [0, 1, 7, 8, 9, 15, 16, 17, 1024] {
            let a: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            assert!(same_bytes(&a, &a.clone()));
            for at in 0..len {
                let mut b = a.clone();
                b[at] ^= 1;
                assert!(!same_bytes(&a, &b), "len {len}, byte {at}");
            }
        }
    }
}
