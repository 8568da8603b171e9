//! bench-noop: the floor of any proxy-wasm filter, for `make bench`.
//!
//! With an empty plugin configuration it does what every bearer-token filter
//! must do at the least: read the `Authorization` header and one shared-data
//! key, then continue. That is variant B of the benchmark.
//!
//! The plugin configuration may name extra steps (comma-separated) that copy,
//! one by one, what tokengate does on a cache hit. The benchmark's profile
//! ladder adds them cumulatively and measures Envoy CPU per request after each,
//! so tokengate's cost beyond the floor can be attributed:
//!
//! | step      | what it copies from tokengate's hit path                           |
//! | --------- | ------------------------------------------------------------------ |
//! | `map`     | reads the whole request header map (`get_map_bytes`) instead of one header |
//! | `sha256`  | SHA-256 of the token                                               |
//! | `time`    | `get_current_time` in on_request_headers                           |
//! | `done`    | `get_current_time` again in `on_done`                              |
//! | `metrics` | two counter increments (`cache.hit.local`, `requests.allowed`)     |
//! | `headers` | three `replace_header` calls (the claim headers)                   |
//! | `add`     | with `headers`: `add_header` instead (the headers are known absent) |
//! | `nokey`   | skips the shared-data read (prices that read against the floor)    |
//! | `keyempty`| reads a key whose value is empty (no copy into wasm memory)        |
//! | `keyabsent`| reads a key that does not exist                                   |
//!
//! One more step is not on the hit path but is the floor of a miss:
//! `callout` sends an introspection-shaped HTTP callout to cluster `idp` on
//! every request, pauses, reads the answer's `:status` and body, and resumes.
//!
//! Nothing here can panic on the request path: every host call's error is ignored.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use std::time::Duration;
use sha2::{Digest, Sha256};
use std::rc::Rc;
use std::time::UNIX_EPOCH;

/// The one shared-data key read per request (tokengate reads its denylist
/// generation counter on every request).
const KEY: &str = "bench.noop.generation";
/// Written with an empty value: a generation carried by the CAS number alone.
const EMPTY_KEY: &str = "bench.noop.empty";
/// Never written.
const ABSENT_KEY: &str = "bench.noop.absent";

#[derive(Default, Clone, Copy)]
struct Steps {
    map: bool,
    sha256: bool,
    time: bool,
    done: bool,
    metrics: bool,
    headers: bool,
    add: bool,
    nokey: bool,
    keyempty: bool,
    keyabsent: bool,
    callout: bool,
}

impl Steps {
    fn parse(text: &str) -> Steps {
        let mut s = Steps::default();
        for step in text.split(',').map(str::trim) {
            match step {
                "map" => s.map = true,
                "sha256" => s.sha256 = true,
                "time" => s.time = true,
                "done" => s.done = true,
                "metrics" => s.metrics = true,
                "headers" => s.headers = true,
                "add" => s.add = true,
                "nokey" => s.nokey = true,
                "keyempty" => s.keyempty = true,
                "keyabsent" => s.keyabsent = true,
                "callout" => s.callout = true,
                "all" => {
                    s = Steps { map: true, sha256: true, time: true, done: true, metrics: true, headers: true, ..s };
                }
                _ => {}
            }
        }
        s
    }
}

struct Shared {
    steps: Steps,
    counters: [u32; 2],
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { shared: None }) });
}}

struct Root {
    shared: Option<Rc<Shared>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size).ok().flatten().unwrap_or_default();
        let steps = Steps::parse(std::str::from_utf8(&config).unwrap_or_default());
        // The key exists, as tokengate's generation counter does once anything was revoked.
        let _ = hostcalls::set_shared_data(KEY, Some(b"1"), None);
        let _ = hostcalls::set_shared_data(EMPTY_KEY, Some(b""), None);
        let counter = |name: &str| hostcalls::define_metric(MetricType::Counter, name).unwrap_or(0);
        let counters = if steps.metrics { [counter("bench_noop.a"), counter("bench_noop.b")] } else { [0, 0] };
        self.shared = Some(Rc::new(Shared { steps, counters }));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        Some(Box::new(Noop { shared }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Noop {
    shared: Rc<Shared>,
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

impl Context for Noop {
    fn on_http_call_response(&mut self, _token_id: u32, _num_headers: usize, body_size: usize, _trailers: usize) {
        let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status").ok().flatten();
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten();
        std::hint::black_box((status, body));
        let _ = hostcalls::resume_http_request();
    }

    fn on_done(&mut self) -> bool {
        if self.shared.steps.done {
            std::hint::black_box(now_ms());
        }
        true
    }
}

impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let steps = self.shared.steps;
        let authorization: Option<Vec<u8>> = if steps.map {
            let headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default();
            headers.into_iter().find(|(n, _)| n == "authorization").map(|(_, v)| v)
        } else {
            hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "authorization").ok().flatten()
        };
        let key = if steps.keyempty {
            EMPTY_KEY
        } else if steps.keyabsent {
            ABSENT_KEY
        } else {
            KEY
        };
        let generation = if steps.nokey { None } else { hostcalls::get_shared_data(key).ok() };
        std::hint::black_box((&authorization, &generation));
        if steps.sha256 {
            let token = authorization.as_deref().unwrap_or_default();
            let token = token.get(7..).unwrap_or_default();
            let hash: [u8; 32] = Sha256::digest(token).into();
            std::hint::black_box(hash);
        }
        if steps.time {
            std::hint::black_box(now_ms());
        }
        if steps.metrics {
            for id in self.shared.counters {
                if id != 0 {
                    let _ = hostcalls::increment_metric(id, 1);
                }
            }
        }
        if steps.headers {
            let claims = [("x-auth-subject", "bench-user"), ("x-auth-client-id", "bench-client"), ("x-auth-scope", "read")];
            for (name, value) in claims {
                let _ = if steps.add {
                    hostcalls::add_map_value(MapType::HttpRequestHeaders, name, value)
                } else {
                    hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value))
                };
            }
        }
        if steps.callout {
            let headers = vec![
                (":method", "POST"),
                (":path", "/oauth2/introspect"),
                (":authority", "idp.local"),
                ("content-type", "application/x-www-form-urlencoded"),
                ("accept", "application/json"),
                ("authorization", "Basic Z2F0ZXdheTpnYXRld2F5LXNlY3JldA=="),
            ];
            let body = b"token=bench-callout-floor&token_type_hint=access_token";
            match hostcalls::dispatch_http_call("idp", headers, Some(body), vec![], Duration::from_secs(2)) {
                Ok(_) => return Action::Pause,
                Err(_) => {
                    let _ = hostcalls::send_http_response(503, vec![], Some(b"callout failed"));
                    return Action::Pause;
                }
            }
        }
        Action::Continue
    }
}
