//! tokengate: an Envoy proxy-wasm filter that validates OAuth2 bearer tokens
//! by RFC 7662 introspection, caches the answers across workers and refuses
//! revoked tokens at the edge.
//!
//! The request path, module by module:
//! `filter` (Envoy's callbacks for one request) → `bearer` (the credential)
//! → `hash_memo` (the token's SHA-256, once per worker) → `denylist` (revoked
//! tokens, JWT identities, clients, subjects) → `worker` (the local and shared
//! `cache`; `jwt_verify` for JWTs of a configured issuer, verified in the
//! filter with keys inline or fetched by `jwks`; the introspection callouts
//! in flight, kept by `flights`) →
//! `introspection`
//! (RFC 7662 request and answer) → `policy` (active, exp, nbf, claim headers;
//! `rules` chooses the route's requirement first and checks scopes, audience
//! and issuer) → `outcome` (the reply for each denial).
//! On the admin listener, `admin_request` takes the request through `admin`
//! (routes, bodies, the change itself) and its follow-ups: `etcd` (the
//! callouts of `cluster_sync`) and RFC 7009 forwards.
//!
//! Beside the path: `host` is everything asked of Envoy (one trait, with
//! Envoy's implementation and a fake for host tests), `store` the shared-data
//! seam, `headers` reads Envoy's header map in place, `jwt` names a JWT by
//! its issuer and `jti`, `config` parses the plugin configuration, `metrics`
//! declares every counter and gauge, `root` is the per-worker root context.

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
pub mod jwks;
pub mod jwt;
pub mod jwt_verify;
pub mod outcome;
pub mod policy;
pub mod rules;
pub mod store;

mod admin_request;
mod etcd;
mod filter;
mod flights;
mod metrics;
mod root;
mod worker;

use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> { Box::new(root::Root::default()) });
}}
