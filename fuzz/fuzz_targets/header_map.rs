//! `headers::HeaderMap`: Envoy's serialised header map, as the filter reads
//! it on every request (any bytes must be refused or read, never panic).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tokengate::headers::{reads_as, HeaderMap};

fn serialise(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = (entries.len() as u32).to_le_bytes().to_vec();
    for (n, v) in entries {
        out.extend((n.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (n, v) in entries {
        out.extend(*n);
        out.push(0);
        out.extend(*v);
        out.push(0);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    // The bytes as a serialised map: read consistently or refused.
    if let Some(map) = HeaderMap::parse(data.to_vec()) {
        let entries: Vec<(&[u8], &[u8])> = map.iter().collect();
        let again = HeaderMap::parse(serialise(&entries)).expect("a map re-serialised from its entries parses");
        assert_eq!(again.iter().collect::<Vec<_>>(), entries);
        for (name, value) in &entries {
            if let Ok(name) = std::str::from_utf8(name) {
                assert!(map.all(name).contains(value));
                assert!(reads_as(name.as_bytes(), name));
            }
        }
    }
    // The bytes as header entries (split at NULs into names and values): always read back as given.
    let parts: Vec<&[u8]> = data.split(|&b| b == 0).collect();
    let entries: Vec<(&[u8], &[u8])> = parts.chunks_exact(2).map(|c| (c[0], c[1])).collect();
    let map = HeaderMap::parse(serialise(&entries)).expect("a well-formed map parses");
    assert_eq!(map.iter().collect::<Vec<_>>(), entries);
});
