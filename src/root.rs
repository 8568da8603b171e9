//! The root context: one per worker (and one on the main thread) for each
//! plugin configuration. It parses the configuration, owns the worker state
//! and receives the ticks and callouts no request owns.

use crate::config::Config;
use crate::filter::Filter;
use crate::host::{Envoy, Host};
use crate::metrics::Metrics;
use crate::store::SharedData;
use crate::worker::Worker;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;

/// A name for this root context, unique within the process (each worker's
/// VM numbers its contexts from 1, so the id alone would collide).
fn instance_name(host: &dyn Host) -> String {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(host.now_ms());
    format!("{:016x}", hasher.finish())
}

pub struct Root {
    host: Rc<dyn Host>,
    worker: Option<Rc<Worker>>,
}

impl Default for Root {
    fn default() -> Root {
        Root { host: Rc::new(Envoy), worker: None }
    }
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
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size).ok().flatten().unwrap_or_default();
        let config = match Config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                // Envoy refuses the plugin; this line says why.
                log::error!("{e}");
                return false;
            }
        };
        let metrics = Metrics::define(config.cluster_sync.is_some());
        let worker =
            Worker::new(config, metrics, self.host.clone(), Rc::new(SharedData)).with_sync(instance_name(&*self.host));
        self.host.set_tick_period(worker.slow_tick());
        self.worker = Some(Rc::new(worker));
        log::info!("configured");
        true
    }

    fn on_tick(&mut self) {
        if let Some(worker) = &self.worker {
            worker.tick();
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter::new(context_id, self.worker.clone(), self.host.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
