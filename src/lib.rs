//! tokengate: an Envoy proxy-wasm filter that validates OAuth2 bearer tokens
//! by RFC 7662 introspection, caches the answers across workers and refuses
//! revoked tokens at the edge.
//!
//! The request path, module by module:
//! `filter` (Envoy's callbacks) → `bearer` (the credential) → `hash_memo`
//! (the token's SHA-256, once per worker) → `cache` (shared
//! and per-worker answers) → `worker` (coalesced introspection callouts) →
//! `introspection` (RFC 7662 request and answer) → `policy` (active, exp,
//! nbf, scopes, claim headers) → `outcome` (the reply for each denial).
//! `jwt` names a JWT by its issuer and `jti`, so that a revocation covers
//! every encoding of it. `headers` reads Envoy's header map in place, `config` parses the plugin configuration, `store` is the shared-data seam,
//! `metrics` the counters, `root` the per-worker root context.

pub mod admin;
pub mod bearer;
pub mod cache;
pub mod cluster_sync;
pub mod config;
pub mod denylist;
pub mod hash_memo;
pub mod headers;
pub mod host;
pub mod introspection;
pub mod jwt;
pub mod outcome;
pub mod policy;
pub mod store;

mod admin_request;
mod etcd;
mod filter;
mod metrics;
mod root;
mod worker;

use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> { Box::new(root::Root::default()) });
}}
