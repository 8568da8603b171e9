//! `admin::route` and `admin::is_admin_path`: the method and path of a request
//! on the admin listener.
#![no_main]
use fuzzkit::{pick, text};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use tokengate::admin::{is_admin_path, route, Route};

/// Prefixes the configuration accepts (`admin.path_prefix`).
const PREFIXES: [&str; 4] = ["/tokengate", "/a", "/ops/token-gate_1.0", "/TokenGate"];
const METHODS: [&str; 6] = ["GET", "POST", "DELETE", "PUT", "post", ""];

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let prefix = *pick(&mut u, &PREFIXES);
    let method = if u.ratio(1, 8).unwrap_or(false) { text(&mut u, 8) } else { pick(&mut u, &METHODS).to_string() };
    // Envoy hands the path as bytes; the filter reads it as UTF-8 or "".
    let raw = u.take_rest();
    let path = std::str::from_utf8(raw).unwrap_or_default();

    let admin = is_admin_path(path, prefix);
    match route(&method, path, prefix) {
        Ok(found) => {
            assert!(admin, "a routed path must be an admin path: {path:?}");
            let bare = path.split(['?', '#']).next().unwrap_or_default();
            match found {
                Route::Revoke => {
                    assert_eq!(bare, format!("{prefix}/revoke"));
                    assert_eq!(method, "POST");
                }
                Route::List { limit, .. } => {
                    assert_eq!(bare, format!("{prefix}/revocations"));
                    assert_eq!(method, "GET");
                    assert!(limit.is_none_or(|l| l > 0));
                }
                Route::Undo(id) => {
                    assert_eq!(method, "DELETE");
                    let encoded = bare.strip_prefix(&format!("{prefix}/revocations/")).expect("canonical undo path");
                    assert!(!encoded.is_empty() && !encoded.contains('/'));
                    // An id may hold an encoded '/', never a dot segment.
                    assert!(!id.split('/').any(|s| s == "." || s == ".."), "{id:?}");
                }
            }
        }
        Err(reply) => {
            assert!(matches!(reply.status, 400 | 404 | 405), "{}", reply.status);
            let body: serde_json::Value = serde_json::from_str(&reply.text().expect("an error reply has a body")).expect("JSON");
            assert!(body["error"].is_string() && body["error_description"].is_string());
            if reply.status == 405 {
                assert!(reply.headers.iter().any(|(n, _)| *n == "allow"));
            }
        }
    }
    // Loosening is idempotent in effect: the canonical admin paths are admin paths.
    assert!(is_admin_path(&format!("{prefix}/revoke"), prefix));
});
