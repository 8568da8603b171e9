//! The root context: one per worker (and one on the main thread) for each
//! plugin configuration. It parses the configuration, owns the worker state
//! and receives the ticks and callouts no request owns.

use crate::config::Config;
use crate::filter::Filter;
use crate::metrics::Metrics;
use crate::worker::Worker;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};
use std::rc::Rc;
use std::time::Duration;

#[derive(Default)]
pub struct Root {
    worker: Option<Rc<Worker>>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        if let Some(worker) = &self.worker {
            worker.on_callout_response(token_id, num_headers, body_size);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let config = match Config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                // Envoy refuses the plugin; this line says why.
                log::error!("{e}");
                return false;
            }
        };
        self.worker = Some(Rc::new(Worker::new(config, Metrics::define())));
        let _ = hostcalls::set_tick_period(Duration::from_millis(1000));
        log::info!("configured");
        true
    }

    fn on_tick(&mut self) {
        if let Some(worker) = &self.worker {
            worker.tick();
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter::new(context_id, self.worker.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
