//! The request's headers, read from Envoy in one host call and looked at in
//! place: the hit path reads the whole map (to find client-sent claim
//! headers), and copying each header into its own allocation cost more than
//! the look itself.

/// A header map as the proxy-wasm ABI serialises it: a little-endian `u32`
/// count, a (name length, value length) `u32` pair per header, then each
/// name and each value followed by a NUL.
#[derive(Debug, Default)]
pub struct HeaderMap {
    buf: Vec<u8>,
}

impl HeaderMap {
    /// Takes a serialised map; `None` when it is malformed (a bad length
    /// would otherwise be found one header at a time).
    pub fn parse(buf: Vec<u8>) -> Option<HeaderMap> {
        let map = HeaderMap { buf };
        let well_formed = map.raw_iter()?.all(|entry| entry.is_some());
        well_formed.then_some(map)
    }

    /// A map of these headers, serialised as Envoy would (tests and fuzzing).
    pub fn from_pairs<'a>(headers: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> HeaderMap {
        let headers: Vec<_> = headers.into_iter().collect();
        let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
        let mut buf = len(headers.len()).to_vec();
        for (n, v) in &headers {
            buf.extend(len(n.len()));
            buf.extend(len(v.len()));
        }
        for (n, v) in &headers {
            buf.extend(*n);
            buf.push(0);
            buf.extend(*v);
            buf.push(0);
        }
        HeaderMap { buf }
    }

    /// Every header in Envoy's order, repeated names included.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.raw_iter().into_iter().flatten().map_while(|e| e)
    }

    /// The first value of `name` (lower case, as Envoy keeps names), if it is UTF-8.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| *n == name.as_bytes()).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Every value of `name`.
    pub fn all(&self, name: &str) -> Vec<&[u8]> {
        self.iter().filter(|(n, _)| *n == name.as_bytes()).map(|(_, v)| v).collect()
    }

    fn raw_iter(&self) -> Option<RawIter<'_>> {
        if self.buf.is_empty() {
            // Envoy answers an empty map with no buffer at all.
            return Some(RawIter { buf: &self.buf, count: 0, index: 0, data: 0 });
        }
        let count = usize::try_from(read_u32(&self.buf, 0)?).ok()?;
        let data = count.checked_mul(8)?.checked_add(4)?;
        (data <= self.buf.len()).then_some(RawIter { buf: &self.buf, count, index: 0, data })
    }
}

struct RawIter<'a> {
    buf: &'a [u8],
    count: usize,
    index: usize,
    /// Where the next name starts.
    data: usize,
}

impl<'a> Iterator for RawIter<'a> {
    /// `None` inside marks a malformed entry; iteration stops after it.
    type Item = Option<(&'a [u8], &'a [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.index >= self.count {
            return None;
        }
        let entry = self.entry();
        self.index = if entry.is_some() { self.index + 1 } else { self.count };
        Some(entry)
    }
}

impl<'a> RawIter<'a> {
    fn entry(&mut self) -> Option<(&'a [u8], &'a [u8])> {
        let at = self.index.checked_mul(8)?.checked_add(4)?;
        let name_len = usize::try_from(read_u32(self.buf, at)?).ok()?;
        let value_len = usize::try_from(read_u32(self.buf, at.checked_add(4)?)?).ok()?;
        let name = self.take(name_len)?;
        let value = self.take(value_len)?;
        Some((name, value))
    }

    /// The next `len` bytes and their NUL terminator.
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let end = self.data.checked_add(len)?;
        let bytes = self.buf.get(self.data..end)?;
        if self.buf.get(end) != Some(&0) {
            return None;
        }
        self.data = end + 1;
        Some(bytes)
    }
}

/// Whether an upstream that reads headers CGI-style (`_` and `-` alike, as
/// `HTTP_X_USER`) would take header `name` for `header`.
pub fn reads_as(name: &[u8], header: &str) -> bool {
    name.len() == header.len() && name.iter().zip(header.as_bytes()).all(|(&a, &b)| a == b || (a == b'_' && b == b'-'))
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = buf.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

/// Reads one of Envoy's header maps; `None` if Envoy refuses or the map is
/// malformed. (Host builds, which run only the unit tests, have no Envoy.)
#[cfg(not(target_arch = "wasm32"))]
pub fn read(_map: proxy_wasm::types::MapType) -> Option<HeaderMap> {
    None
}

/// Reads one of Envoy's header maps; `None` if Envoy refuses or the map is
/// malformed.
#[cfg(target_arch = "wasm32")]
pub fn read(map: proxy_wasm::types::MapType) -> Option<HeaderMap> {
    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_get_header_map_pairs(map_type: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    }
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the proxy-wasm ABI call; on success the host hands over a
    // buffer of `size` bytes it allocated through the SDK's
    // `proxy_on_memory_allocate` (a boxed slice), which we now own.
    let status = unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
    if status != 0 {
        return None;
    }
    if data.is_null() {
        return Some(HeaderMap::default());
    }
    // SAFETY: see above: `data` is a `Box<[u8]>` of length `size`.
    let buf = unsafe { Vec::from_raw_parts(data, size, size) };
    HeaderMap::parse(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serialise(headers: &[(&str, &str)]) -> Vec<u8> {
        HeaderMap::from_pairs(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes()))).buf
    }

    #[test]
    fn reads_headers_in_order_with_repeats() {
        let map = HeaderMap::parse(serialise(&[
            (":path", "/x"),
            ("authorization", "Bearer a"),
            ("x-empty", ""),
            ("authorization", "Bearer b"),
        ]))
        .unwrap();
        assert_eq!(map.get(":path"), Some("/x"));
        assert_eq!(map.get("x-empty"), Some(""));
        assert_eq!(map.get("host"), None);
        assert_eq!(map.all("authorization"), vec![b"Bearer a".as_slice(), b"Bearer b".as_slice()]);
        assert_eq!(map.iter().count(), 4);
    }

    #[test]
    fn empty_buffer_is_an_empty_map() {
        let map = HeaderMap::parse(Vec::new()).unwrap();
        assert_eq!(map.iter().count(), 0);
        assert!(HeaderMap::parse(serialise(&[])).unwrap().all("a").is_empty());
    }

    #[test]
    fn non_utf8_value_is_not_returned_as_text() {
        let mut buf = serialise(&[("x", "ab")]);
        let at = buf.len() - 3;
        buf[at] = 0xff;
        let map = HeaderMap::parse(buf).unwrap();
        assert_eq!(map.get("x"), None);
        assert_eq!(map.all("x"), vec![[0xff, b'b'].as_slice()]);
    }

    #[test]
    fn underscore_spellings_read_as_the_claim_header() {
        assert!(reads_as(b"x-auth-sub", "x-auth-sub"));
        assert!(reads_as(b"x_auth_sub", "x-auth-sub"));
        assert!(reads_as(b"x_auth-sub", "x-auth-sub"));
        assert!(!reads_as(b"x-auth-sub", "x_auth_sub"));
        assert!(reads_as(b"x_auth_sub", "x_auth_sub"));
        assert!(!reads_as(b"x-auth-su", "x-auth-sub"));
        assert!(!reads_as(b"x-auth-subs", "x-auth-sub"));
        assert!(!reads_as(b"x.auth-sub", "x-auth-sub"));
    }

    #[test]
    fn malformed_maps_are_refused() {
        let good = serialise(&[("a", "1"), ("bb", "22")]);
        // Every truncation of a valid map is malformed, never a panic.
        for cut in 1..good.len() {
            assert!(HeaderMap::parse(good[..cut].to_vec()).is_none(), "cut at {cut}");
        }
        let mut huge_count = good.clone();
        huge_count[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(HeaderMap::parse(huge_count).is_none());
        let mut huge_len = good.clone();
        huge_len[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(HeaderMap::parse(huge_len).is_none());
        let mut no_nul = good;
        let first_nul = 4 + 16 + 1;
        no_nul[first_nul] = b'x';
        assert!(HeaderMap::parse(no_nul).is_none());
    }
}
