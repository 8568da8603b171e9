//! The HTTP filter Envoy calls for each request: the request path in order,
//! and the admin API where this listener's configuration has one.

use crate::admin;
use crate::admin_request::AdminRequest;
use crate::bearer::{self, BearerError, Token};
use crate::headers::{self, HeaderMap};
use crate::host::Host;
use crate::outcome::Denial;
use crate::rules::{self, Requirement, TokenMode};
use crate::worker::{send_denial, Found, Worker};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::borrow::Cow;
use std::rc::Rc;

pub struct Filter {
    id: u32,
    /// Envoy; the worker's own when there is one.
    host: Rc<dyn Host>,
    /// `None` when the plugin has no valid configuration: fail closed.
    worker: Option<Rc<Worker>>,
    /// Set when this is a request for the admin API.
    admin: Option<AdminRequest>,
}

impl Filter {
    pub fn new(id: u32, worker: Option<Rc<Worker>>, host: Rc<dyn Host>) -> Filter {
        Filter { id, host, worker, admin: None }
    }

    fn on_request(&mut self, worker: &Worker, end_of_stream: bool) -> Action {
        let headers = match self.host.request_headers() {
            Some(h) => h,
            None => {
                worker.deny(&Denial::IdpUnavailable("tokengate could not read the request"));
                return Action::Pause;
            }
        };
        if let Some(admin) = &worker.config.admin {
            let path = headers.get(":path").unwrap_or_default();
            let request = self.admin.insert(AdminRequest::default());
            if let Some(reply) = admin::outside_admin(path, &admin.path_prefix) {
                worker.metrics.admin_requests.inc();
                return request.reply(worker, reply);
            }
            return request.on_headers(worker, &headers, end_of_stream);
        }
        self.validate(worker, &headers)
    }

    fn validate(&self, worker: &Worker, headers: &HeaderMap) -> Action {
        self.strip_claim_headers(worker, headers);
        let need = match self.requirement(worker, headers) {
            Ok(Some(need)) => need,
            Ok(None) => return Action::Continue,
            Err(denial) => {
                worker.deny(&denial);
                return Action::Pause;
            }
        };
        let token = self.credential(worker, headers);
        if matches!(token, Err(BearerError::Missing)) && need.token == TokenMode::Optional {
            worker.metrics.passed_anonymous.inc();
            return Action::Continue;
        }
        let identified = match &token {
            Ok(token) => worker.identify(token).map(|hash| (hash, &**token)),
            Err(e) => Err(*e),
        };
        let (hash, token) = match identified {
            Ok(found) => found,
            Err(e) => return refuse(worker, e),
        };
        let now = self.host.now_ms();
        if let Err(denial) = worker.screen(&hash, now / 1000) {
            worker.deny(&denial);
            return Action::Pause;
        }
        // A hit needs only the hash; a miss the token itself, to introspect it.
        // A JWT of a configured issuer is verified here, not introspected.
        let known = match worker.local_answer(&hash, now) {
            Some(verdict) => Some(Ok(Found::Ready(verdict))),
            None => worker.verify_jwt(hash, token, self.id, &need, now),
        };
        let found = match known {
            Some(Ok(found)) => found,
            Some(Err(denial)) => {
                worker.deny(&denial);
                return Action::Pause;
            }
            // Only JWTs of configured issuers are accepted without introspection.
            None if worker.config.introspection.is_none() => {
                worker.deny(&Denial::InvalidToken("the token is not a JWT of a configured issuer"));
                return Action::Pause;
            }
            None => match Token::checked(token) {
                Ok(token) => worker.find_or_wait(hash, &token, self.id, now),
                Err(e) => return refuse(worker, e),
            },
        };
        match found {
            Found::Ready(verdict) => {
                if worker.finish(&verdict, &need, now / 1000) {
                    Action::Continue
                } else {
                    Action::Pause
                }
            }
            Found::Wait => {
                worker.park_need(self.id, &need);
                Action::Pause
            }
        }
    }

    /// Claim headers come from the IdP only: drop any the client sent, and
    /// their `_` spellings, which CGI-style upstreams read as the same.
    fn strip_claim_headers(&self, worker: &Worker, headers: &HeaderMap) {
        let claim_headers = &worker.config.claims_to_headers;
        let mut removed: Vec<&[u8]> = Vec::new();
        for (name, _) in headers.iter() {
            if claim_headers.values().any(|h| headers::reads_as(name, h)) && !removed.contains(&name) {
                if let Ok(name) = std::str::from_utf8(name) {
                    self.host.remove_request_header(name);
                }
                removed.push(name);
            }
        }
    }

    /// What this request must show (`rules`): `None` lets it through with
    /// no token (a public route, a CORS preflight where configured).
    fn requirement(&self, worker: &Worker, headers: &HeaderMap) -> Result<Option<Rc<Requirement>>, Denial> {
        let config = &worker.config;
        if !config.pass_cors_preflight && !config.route_metadata && !config.policy.has_rules() {
            return Ok(Some(config.policy.default.clone()));
        }
        let method = headers.get(":method").unwrap_or_default().as_bytes();
        if config.pass_cors_preflight
            && rules::is_preflight(
                method,
                headers.get("origin").is_some(),
                headers.get("access-control-request-method").is_some(),
            )
        {
            worker.metrics.passed_preflight.inc();
            return Ok(None);
        }
        let route = match config.route_metadata {
            true => self.host.property(&["xds", "route_metadata", "filter_metadata", "tokengate", "require"]),
            false => None,
        };
        let need = match route {
            Some(text) => worker.routes.borrow_mut().get(&text, &config.policy.default).map_err(|e| {
                log::error!("{e}");
                Denial::IdpUnavailable("the route's tokengate requirement is invalid")
            })?,
            None => config.policy.requirement(method, headers.get(":path").unwrap_or_default().as_bytes())?.clone(),
        };
        if need.token == TokenMode::None {
            worker.metrics.passed_public.inc();
            return Ok(None);
        }
        Ok(Some(need))
    }

    /// The bearer token: the `Authorization` header, or where configured the
    /// `access_token` query parameter (never both: RFC 6750 §2).
    /// Its characters are checked by `Worker::identify`, once per worker.
    fn credential<'h>(&self, worker: &Worker, headers: &'h HeaderMap) -> Result<Cow<'h, [u8]>, BearerError> {
        let authorization = headers.all("authorization");
        let max = worker.config.max_token_bytes;
        if !worker.config.allow_query_token {
            return bearer::locate(&authorization, max).map(Cow::Borrowed);
        }
        let path = headers.get(":path").unwrap_or_default();
        match (bearer::from_query(path, max)?, authorization.is_empty()) {
            (None, _) => bearer::locate(&authorization, max).map(Cow::Borrowed),
            (Some(_), false) => Err(BearerError::Malformed("the token is in both the header and the query")),
            (Some(token), true) => {
                if worker.config.hide_credentials {
                    let stripped = bearer::strip_query_token(path);
                    self.host.set_request_header(":path", &stripped);
                }
                Ok(Cow::Owned(token.as_bytes().to_vec()))
            }
        }
    }

    /// Body and trailers must not slip past a request still being checked.
    fn hold_while_waiting(&self) -> Action {
        // An admin request never continues upstream.
        if self.admin.is_some() || self.worker.as_ref().is_some_and(|w| w.is_waiting(self.id)) {
            Action::Pause
        } else {
            Action::Continue
        }
    }
}

/// The reply to a request without a usable bearer token.
fn refuse(worker: &Worker, error: BearerError) -> Action {
    worker.deny(&match error {
        BearerError::Missing => Denial::MissingToken,
        BearerError::Malformed(why) => Denial::InvalidRequest(why),
    });
    Action::Pause
}

impl Context for Filter {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        let Some(worker) = self.worker.clone() else {
            return;
        };
        let admin = self.admin.as_mut().is_some_and(|a| a.on_callout(&worker, token_id, num_headers, body_size));
        if !admin {
            worker.on_callout_response(token_id, num_headers, body_size);
        }
    }

    fn on_done(&mut self) -> bool {
        if let Some(worker) = self.worker.clone() {
            worker.forget(self.id);
            if let Some(admin) = self.admin.as_mut() {
                admin.on_done(&worker);
            }
        }
        true
    }
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        match self.worker.clone() {
            Some(worker) => self.on_request(&worker, end_of_stream),
            None => {
                send_denial(&*self.host, &Denial::IdpUnavailable("tokengate is not configured"), "tokengate");
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let (Some(admin), Some(worker)) = (self.admin.as_mut().filter(|a| a.awaits_body()), self.worker.clone()) {
            return admin.on_body(&worker, body_size, end_of_stream);
        }
        self.hold_while_waiting()
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.hold_while_waiting()
    }
}
