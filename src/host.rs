//! What tokengate asks of Envoy, in one trait: the time, the tick, callouts
//! and their answers, and the request being handled (its headers, body,
//! reply and resumption). `Envoy` answers it with proxy-wasm host calls; the
//! tests' `fake::FakeHost` records every call and lets a test deliver callout
//! answers and ticks in any order, so the worker's state machines run on the
//! host. Shared data has its own seam (`store::Store`).

use crate::headers::HeaderMap;
use std::time::Duration;

pub trait Host {
    /// Unix time in milliseconds.
    fn now_ms(&self) -> u64;
    fn set_tick_period(&self, period: Duration);

    /// Sends a callout to an Envoy cluster; its token id, or why not.
    fn dispatch(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout: Duration) -> Result<u32, String>;
    /// The `:status` of the callout answer being handled (`None`: no
    /// headers, as after a reset or a refused connection).
    fn callout_status(&self, num_headers: usize) -> Option<u32>;
    /// The body of the callout answer being handled.
    fn callout_body(&self, body_size: usize) -> Vec<u8>;

    /// Makes paused request `ctx` the one the calls below act on; false if
    /// it went away.
    fn set_effective_context(&self, ctx: u32) -> bool;
    /// The current request's headers, read in place.
    fn request_headers(&self) -> Option<HeaderMap>;
    fn request_body(&self, size: usize) -> Vec<u8>;
    fn add_request_header(&self, name: &str, value: &str);
    fn set_request_header(&self, name: &str, value: &str);
    fn remove_request_header(&self, name: &str);
    /// Answers the current request locally.
    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: Option<&[u8]>);
    /// Lets the current (paused) request go on to the upstream.
    fn resume_request(&self);
    /// A property of the current request (as `xds.route_metadata…`), if set.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
}

/// Answers the current request with a JSON body (or none), never cached:
/// the one reply builder of denials and of the admin API.
pub fn send_json(host: &dyn Host, status: u32, headers: &[(&str, &str)], body: Option<&str>) {
    let mut all: Vec<(&str, &str)> = vec![("cache-control", "no-store")];
    if body.is_some() {
        all.push(("content-type", "application/json"));
    }
    all.extend_from_slice(headers);
    host.send_reply(status, &all, body.map(str::as_bytes));
}

/// The host calls of the proxy-wasm ABI.
pub struct Envoy;

impl Host for Envoy {
    fn now_ms(&self) -> u64 {
        proxy_wasm::hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn set_tick_period(&self, period: Duration) {
        let _ = proxy_wasm::hostcalls::set_tick_period(period);
    }

    fn dispatch(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout: Duration) -> Result<u32, String> {
        proxy_wasm::hostcalls::dispatch_http_call(cluster, headers.to_vec(), Some(body), vec![], timeout)
            .map_err(|status| format!("{status:?}"))
    }

    fn callout_status(&self, num_headers: usize) -> Option<u32> {
        if num_headers == 0 {
            return None;
        }
        let status =
            proxy_wasm::hostcalls::get_map_value_bytes(proxy_wasm::types::MapType::HttpCallResponseHeaders, ":status")
                .ok()
                .flatten()?;
        std::str::from_utf8(&status).ok()?.parse().ok()
    }

    fn callout_body(&self, body_size: usize) -> Vec<u8> {
        proxy_wasm::hostcalls::get_buffer(proxy_wasm::types::BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn set_effective_context(&self, ctx: u32) -> bool {
        proxy_wasm::hostcalls::set_effective_context(ctx).is_ok()
    }

    fn request_headers(&self) -> Option<HeaderMap> {
        crate::headers::read(proxy_wasm::types::MapType::HttpRequestHeaders)
    }

    fn request_body(&self, size: usize) -> Vec<u8> {
        proxy_wasm::hostcalls::get_buffer(proxy_wasm::types::BufferType::HttpRequestBody, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn add_request_header(&self, name: &str, value: &str) {
        let _ = proxy_wasm::hostcalls::add_map_value(proxy_wasm::types::MapType::HttpRequestHeaders, name, value);
    }

    fn set_request_header(&self, name: &str, value: &str) {
        let _ = proxy_wasm::hostcalls::set_map_value(proxy_wasm::types::MapType::HttpRequestHeaders, name, Some(value));
    }

    fn remove_request_header(&self, name: &str) {
        let _ = proxy_wasm::hostcalls::remove_map_value(proxy_wasm::types::MapType::HttpRequestHeaders, name);
    }

    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: Option<&[u8]>) {
        let _ = proxy_wasm::hostcalls::send_http_response(status, headers.to_vec(), body);
    }

    fn resume_request(&self) {
        let _ = proxy_wasm::hostcalls::resume_http_request();
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        proxy_wasm::hostcalls::get_property(path.to_vec()).ok().flatten()
    }
}

/// A host for unit tests: records what the code under test did, and lets the
/// test set the time and deliver callout answers.
#[cfg(test)]
pub mod fake {
    use super::Host;
    use crate::headers::HeaderMap;
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;
    use std::time::Duration;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Callout {
        pub id: u32,
        pub cluster: String,
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
        pub timeout: Duration,
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Event {
        Reply { ctx: u32, status: u32, headers: Vec<(String, String)>, body: String },
        Resume { ctx: u32 },
        AddHeader { ctx: u32, name: String, value: String },
        SetHeader { ctx: u32, name: String, value: String },
        RemoveHeader { ctx: u32, name: String },
    }

    #[derive(Default)]
    pub struct FakeHost {
        pub now: Cell<u64>,
        pub tick: Cell<Option<Duration>>,
        next_id: Cell<u32>,
        pub callouts: RefCell<Vec<Callout>>,
        /// Refuse the next dispatches (as Envoy does for an unknown cluster).
        pub refuse_dispatch: Cell<bool>,
        /// The answer `callout_status`/`callout_body` read: set by `answer`.
        answer: RefCell<(Option<u32>, Vec<u8>)>,
        /// Contexts that went away (`set_effective_context` fails for them).
        pub gone: RefCell<Vec<u32>>,
        /// The request the calls act on.
        pub current: Cell<u32>,
        pub headers: RefCell<HashMap<u32, Vec<(String, String)>>>,
        pub bodies: RefCell<HashMap<u32, Vec<u8>>>,
        pub events: RefCell<Vec<Event>>,
        /// Properties by their path joined with '.'.
        pub properties: RefCell<HashMap<String, Vec<u8>>>,
    }

    impl FakeHost {
        pub fn new(now_ms: u64) -> FakeHost {
            let host = FakeHost::default();
            host.now.set(now_ms);
            host.next_id.set(1);
            host
        }

        pub fn advance(&self, ms: u64) {
            self.now.set(self.now.get() + ms);
        }

        /// Makes `ctx` the current request, with these headers.
        pub fn request(&self, ctx: u32, headers: &[(&str, &str)]) {
            let owned = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
            self.headers.borrow_mut().insert(ctx, owned);
            self.current.set(ctx);
        }

        /// The answer the next `callout_status`/`callout_body` read; returns
        /// `(num_headers, body_size)` to hand to the code under test.
        pub fn answer(&self, status: Option<u32>, body: &[u8]) -> (usize, usize) {
            *self.answer.borrow_mut() = (status, body.to_vec());
            (usize::from(status.is_some()) * 3, body.len())
        }

        pub fn take_events(&self) -> Vec<Event> {
            std::mem::take(&mut *self.events.borrow_mut())
        }

        pub fn last_callout(&self) -> Option<Callout> {
            self.callouts.borrow().last().cloned()
        }

        fn event(&self, event: Event) {
            self.events.borrow_mut().push(event);
        }
    }

    impl Host for FakeHost {
        fn now_ms(&self) -> u64 {
            self.now.get()
        }

        fn set_tick_period(&self, period: Duration) {
            self.tick.set(Some(period));
        }

        fn dispatch(
            &self,
            cluster: &str,
            headers: &[(&str, &str)],
            body: &[u8],
            timeout: Duration,
        ) -> Result<u32, String> {
            if self.refuse_dispatch.get() {
                return Err("BadArgument".into());
            }
            let id = self.next_id.get();
            self.next_id.set(id + 1);
            self.callouts.borrow_mut().push(Callout {
                id,
                cluster: cluster.into(),
                headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
                body: body.to_vec(),
                timeout,
            });
            Ok(id)
        }

        fn callout_status(&self, num_headers: usize) -> Option<u32> {
            if num_headers == 0 {
                return None;
            }
            self.answer.borrow().0
        }

        fn callout_body(&self, body_size: usize) -> Vec<u8> {
            self.answer.borrow().1.iter().copied().take(body_size).collect()
        }

        fn set_effective_context(&self, ctx: u32) -> bool {
            if self.gone.borrow().contains(&ctx) {
                return false;
            }
            self.current.set(ctx);
            true
        }

        fn request_headers(&self) -> Option<HeaderMap> {
            let headers = self.headers.borrow();
            let pairs = headers.get(&self.current.get())?;
            Some(HeaderMap::from_pairs(pairs.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes()))))
        }

        fn request_body(&self, size: usize) -> Vec<u8> {
            let bodies = self.bodies.borrow();
            bodies.get(&self.current.get()).map(|b| b.iter().copied().take(size).collect()).unwrap_or_default()
        }

        fn add_request_header(&self, name: &str, value: &str) {
            let ctx = self.current.get();
            self.event(Event::AddHeader { ctx, name: name.into(), value: value.into() });
        }

        fn set_request_header(&self, name: &str, value: &str) {
            let ctx = self.current.get();
            self.event(Event::SetHeader { ctx, name: name.into(), value: value.into() });
        }

        fn remove_request_header(&self, name: &str) {
            let ctx = self.current.get();
            self.event(Event::RemoveHeader { ctx, name: name.into() });
        }

        fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: Option<&[u8]>) {
            let body = String::from_utf8_lossy(body.unwrap_or_default()).into_owned();
            let headers = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
            self.event(Event::Reply { ctx: self.current.get(), status, headers, body });
        }

        fn resume_request(&self) {
            self.event(Event::Resume { ctx: self.current.get() });
        }

        fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
            self.properties.borrow().get(&path.join(".")).cloned()
        }
    }
}
