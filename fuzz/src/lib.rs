//! Helpers shared by the fuzz targets.

use libfuzzer_sys::arbitrary::Unstructured;
use tokengate::bearer;
use tokengate::cache::{hash_token, TokenHash};

/// A few fixed tokens, so that pre-filled records and later operations meet.
pub const POOL: [&str; 4] = ["tok-a", "tok-b", "tok-c+/=", "tok-d"];

pub fn pool_hash(i: usize) -> TokenHash {
    hash_token(&bearer::from_admin(POOL[i % POOL.len()]))
}

/// A byte from the input, or 0 when it is used up.
pub fn byte(u: &mut Unstructured) -> u8 {
    u.arbitrary().unwrap_or(0)
}

pub fn int(u: &mut Unstructured, lo: u64, hi: u64) -> u64 {
    u.int_in_range(lo..=hi).unwrap_or(lo)
}

pub fn pick<'a, T>(u: &mut Unstructured, items: &'a [T]) -> &'a T {
    u.choose(items).unwrap_or(&items[0])
}

/// Short text: from the input, lossily UTF-8.
pub fn text(u: &mut Unstructured, max: usize) -> String {
    let len = int(u, 0, max as u64) as usize;
    let bytes = u.bytes(len.min(u.len())).unwrap_or_default();
    String::from_utf8_lossy(bytes).into_owned()
}

pub mod jwt;
