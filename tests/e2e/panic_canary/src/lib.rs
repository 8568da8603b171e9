//! Passes every request, except one with an `x-panic` header: that one hits
//! an out-of-bounds index, the panic every Rust filter risks.
//! Each answer carries `x-vm-requests` (requests this VM has seen, lost with
//! the VM) and `x-shared-requests` (a shared-data count, kept by the host), so
//! a test can see what a reloaded VM forgets and what it keeps.
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::Cell;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

const SHARED_COUNT: &str = "panic_canary.requests";

thread_local! {
    static VM_REQUESTS: Cell<u64> = const { Cell::new(0) };
}

struct Root;
impl Context for Root {}
impl RootContext for Root {
    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request::default()))
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

#[derive(Default)]
struct Request {
    counts: Option<(u64, u64)>,
}

impl Request {
    /// Adds one to the shared count (CAS loop) and answers the new value.
    fn bump_shared(&self) -> u64 {
        loop {
            let (value, cas) = self.get_shared_data(SHARED_COUNT);
            let n = value.and_then(|v| String::from_utf8(v).ok()).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) + 1;
            if self.set_shared_data(SHARED_COUNT, Some(n.to_string().as_bytes()), cas).is_ok() {
                return n;
            }
        }
    }
}

impl Context for Request {}
impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        if let Some(value) = self.get_http_request_header("x-panic") {
            let empty: Vec<u8> = Vec::new();
            std::hint::black_box(empty[value.len()]);
        }
        let local = VM_REQUESTS.with(|c| {
            c.set(c.get() + 1);
            c.get()
        });
        self.counts = Some((local, self.bump_shared()));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if let Some((local, shared)) = self.counts {
            self.set_http_response_header("x-vm-requests", Some(&local.to_string()));
            self.set_http_response_header("x-shared-requests", Some(&shared.to_string()));
        }
        Action::Continue
    }
}
