//! The admin API: revoke (RFC 7009 form or JSON bulk, by client, by
//! subject), list and un-revoke. Served by the filter itself on a listener
//! whose configuration has `admin`; an admin request never goes upstream.
//!
//! Routes under `path_prefix` (default `/tokengate`), all behind
//! `Authorization: Bearer <admin token>`:
//!   POST   {prefix}/revoke             form `token=…` or JSON
//!   GET    {prefix}/revocations
//!   DELETE {prefix}/revocations/{id}   id: token hash hex, client:<id>, sub:<id>

use crate::bearer::{self, Token};
use crate::cache::{hash_token, hex, TokenHash};
use crate::config;
use crate::denylist::{Change, DenyError, Denylist, Kind, Record, Revoked, MAX_PRINCIPAL_CHARS};
use crate::introspection::{is_usable_claim_value, Claims};
use crate::jwt;
use crate::store::Store;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Bulk answers list the revoked ids up to this many.
const MAX_IDS_IN_ANSWER: usize = 1000;

/// An admin route, as its method and path name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A revoke, whose body is still to come.
    Revoke,
    /// `?offset=&limit=` page through the list (default: all of it).
    List {
        offset: usize,
        limit: Option<usize>,
    },
    Undo(String),
}

/// What an admin request asks for, complete: a revoke carries its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Revoke(Revoke),
    List { offset: usize, limit: Option<usize> },
    Undo(String),
}

impl Route {
    /// The command a route is on its own, or the route back when it needs a body.
    pub fn command(self) -> Result<Command, Route> {
        match self {
            Route::Revoke => Err(Route::Revoke),
            Route::List { offset, limit } => Ok(Command::List { offset, limit }),
            Route::Undo(id) => Ok(Command::Undo(id)),
        }
    }
}

/// An admin reply: status, JSON body (none for 204) and extra headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u32,
    pub body: Option<Value>,
    /// A body already serialised (large lists skip the `Value` tree).
    pub serialized: Option<String>,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    /// The body as sent.
    pub fn text(&self) -> Option<String> {
        self.serialized.clone().or_else(|| self.body.as_ref().map(Value::to_string))
    }
}

impl Reply {
    fn ok(body: Value) -> Reply {
        Reply { status: 200, body: Some(body), serialized: None, headers: Vec::new() }
    }

    pub fn error(status: u32, error: &str, description: impl Into<String>) -> Reply {
        let description: String = description.into();
        Reply {
            status,
            body: Some(json!({"error": error, "error_description": description})),
            serialized: None,
            headers: Vec::new(),
        }
    }

    fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }
}

/// The result of a handled request: the reply, and the tokens to also send
/// to the authorization server's revocation endpoint (kept in memory only).
#[derive(Debug)]
pub struct Handled {
    pub reply: Reply,
    pub forward: Vec<Token>,
    /// What changed, for other Envoys (cluster sync).
    pub changes: Vec<Change>,
    pub counts: Counts,
}

/// What a command did, for the `revocations.*` counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub tokens: u64,
    pub principals: u64,
    pub undone: u64,
    /// Commands refused because the denylist is full.
    pub refused: u64,
}

/// Whether a path is meant for the admin API, judged loosely (decoded,
/// case-folded, slashes merged, dot segments resolved) so that a disguised
/// admin path is answered here and never forwarded upstream.
pub fn is_admin_path(path: &str, prefix: &str) -> bool {
    let loose = loosen(path);
    let prefix = loosen(prefix);
    loose == prefix || loose.starts_with(&format!("{prefix}/"))
}

fn loosen(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let decoded: String = percent_decode(path).to_lowercase().replace('\\', "/");
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    format!("/{}", segments.join("/"))
}

fn percent_decode(text: &str) -> String {
    // form_urlencoded would also turn '+' into ' ', which a path must keep.
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes.get(i), hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (Some(b'%'), Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (Some(&b), _) => {
                out.push(b);
                i += 1;
            }
            (None, _) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The reply to a request outside the admin routes on a listener that
/// serves them: such a request carries the admin credential, which must not
/// be checked as an access token (that would send it to the authorization
/// server), so it is answered here. `None` for an admin path.
pub fn outside_admin(path: &str, prefix: &str) -> Option<Reply> {
    (!is_admin_path(path, prefix))
        .then(|| Reply::error(404, "not_found", "this listener serves only the tokengate admin API"))
}

/// Checks the admin credential: a bearer token whose SHA-256 is one of those
/// configured (several while a token is being rotated).
pub fn authorize(authorization: &[&[u8]], token_sha256: &config::AdminTokenHashes) -> Result<(), Reply> {
    let denied = || {
        Reply::error(401, "unauthorized", "the admin API needs its bearer token")
            .with_header("www-authenticate", "Bearer realm=\"tokengate-admin\"")
    };
    let token = bearer::parse(authorization, bearer::DEFAULT_MAX_TOKEN_BYTES).map_err(|_| denied())?;
    let presented = hex(&Sha256::digest(token.as_bytes()).into());
    // Compare every byte of every hash: the time taken says nothing about which one matched.
    let matches = token_sha256.iter().fold(0usize, |n, expected| n + usize::from(same_hex(&presented, expected)));
    if matches > 0 {
        Ok(())
    } else {
        Err(denied())
    }
}

/// Constant-time comparison of a lower-case hex digest with a configured one (any case).
fn same_hex(presented: &str, expected: &str) -> bool {
    presented.len() == expected.len()
        && presented.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b.to_ascii_lowercase())) == 0
}

/// Finds the route for an admin path, or the reply that refuses it.
pub fn route(method: &str, path: &str, prefix: &str) -> Result<Route, Reply> {
    let raw = path.split(['?', '#']).next().unwrap_or_default();
    let rest = raw.strip_prefix(prefix).and_then(|r| r.strip_prefix('/'));
    let found = match rest {
        Some("revoke") => Some(Route::Revoke),
        Some("revocations") => Some(list_route(path)?),
        Some(r) => match r.strip_prefix("revocations/") {
            // Ids may hold a percent-encoded '/' (SPIFFE or URL client ids).
            Some(id) if !id.is_empty() && !id.contains('/') => {
                let id = percent_decode(id);
                let dot_segment = id.split('/').any(|seg| seg == "." || seg == "..");
                (!dot_segment).then_some(Route::Undo(id))
            }
            _ => None,
        },
        None => None,
    };
    let Some(found) = found else {
        // A known route in disguise is refused as such, the rest is unknown.
        let loose = loosen(raw);
        let known = [format!("{prefix}/revoke"), format!("{prefix}/revocations")];
        if known.iter().any(|k| loose == loosen(k)) || loose.starts_with(&loosen(&format!("{prefix}/revocations/"))) {
            return Err(Reply::error(400, "invalid_request", "the admin path is not in canonical form"));
        }
        return Err(Reply::error(404, "not_found", "no such admin route"));
    };
    let allowed = match found {
        Route::Revoke => "POST",
        Route::List { .. } => "GET",
        Route::Undo(_) => "DELETE",
    };
    if method != allowed {
        return Err(Reply::error(405, "method_not_allowed", format!("use {allowed}")).with_header("allow", allowed));
    }
    Ok(found)
}

/// Most records one list answer carries.
const MAX_LIST_LIMIT: usize = 10_000;

fn list_route(path: &str) -> Result<Route, Reply> {
    let query = path.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let mut route = Route::List { offset: 0, limit: None };
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| Reply::error(400, "invalid_request", format!("`{name}` must be a non-negative integer")))
        };
        match (&mut route, name.as_ref()) {
            (Route::List { offset, .. }, "offset") => *offset = number()?,
            (Route::List { limit, .. }, "limit") => {
                let n = number()?;
                if n == 0 || n > MAX_LIST_LIMIT {
                    return Err(Reply::error(400, "invalid_request", format!("`limit` must be 1 to {MAX_LIST_LIMIT}")));
                }
                *limit = Some(n);
            }
            _ => {}
        }
    }
    Ok(route)
}

#[derive(serde::Serialize)]
struct ListPage<'r> {
    count: usize,
    offset: usize,
    next_offset: Option<usize>,
    revocations: &'r [Record],
}

/// A revocation request, whatever its encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoke {
    Tokens {
        tokens: Vec<String>,
        reason: String,
    },
    Principal {
        kind: Kind,
        name: String,
        reason: String,
    },
    /// A JWT by its issuer and `jti`, without the token itself.
    Jwt {
        iss: String,
        jti: String,
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeJson {
    #[serde(default)]
    tokens: Option<Vec<String>>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// Parses the body of `POST {prefix}/revoke`.
pub fn parse_revoke(
    content_type: Option<&str>,
    body: &[u8],
    cfg: &config::Admin,
    max_token_bytes: usize,
) -> Result<Revoke, Reply> {
    let media =
        content_type.and_then(|c| c.split(';').next()).map(|c| c.trim().to_ascii_lowercase()).unwrap_or_default();
    if body.len() > cfg.max_body_bytes {
        return Err(too_large(cfg));
    }
    if body.is_empty() {
        return Err(Reply::error(400, "invalid_request", "the request body is empty"));
    }
    let request = match media.as_str() {
        "application/x-www-form-urlencoded" => parse_form(body)?,
        "application/json" => parse_json(body)?,
        _ => {
            return Err(Reply::error(
                415,
                "unsupported_media_type",
                "send application/x-www-form-urlencoded (RFC 7009) or application/json",
            ))
        }
    };
    if let Revoke::Tokens { tokens, .. } = &request {
        if tokens.len() > cfg.max_bulk_tokens {
            return Err(Reply::error(
                413,
                "too_many_tokens",
                format!("at most {} tokens per request (admin.max_bulk_tokens)", cfg.max_bulk_tokens),
            ));
        }
        if let Some(bad) = tokens.iter().position(|t| !bearer::is_presentable(t, max_token_bytes)) {
            return Err(Reply::error(
                400,
                "invalid_request",
                format!("tokens[{bad}] is not a bearer token (RFC 6750 b64token, at most {max_token_bytes} bytes)"),
            ));
        }
    }
    Ok(request)
}

pub fn too_large(cfg: &config::Admin) -> Reply {
    Reply::error(
        413,
        "request_too_large",
        format!("the body exceeds {} bytes (admin.max_body_bytes)", cfg.max_body_bytes),
    )
}

fn parse_form(body: &[u8]) -> Result<Revoke, Reply> {
    let mut token = None;
    let mut reason = String::from("rfc7009");
    for (name, value) in form_urlencoded::parse(body) {
        match name.as_ref() {
            "token" if token.is_some() => {
                return Err(Reply::error(400, "invalid_request", "`token` is given more than once"))
            }
            "token" => token = Some(value.into_owned()),
            "reason" => reason = value.into_owned(),
            // token_type_hint and extensions: RFC 7009 lets the server ignore them.
            _ => {}
        }
    }
    let token = token.ok_or_else(|| Reply::error(400, "invalid_request", "the form has no `token`"))?;
    Ok(Revoke::Tokens { tokens: vec![token], reason })
}

fn parse_json(body: &[u8]) -> Result<Revoke, Reply> {
    let r: RevokeJson = serde_json::from_slice(body)
        .map_err(|e| Reply::error(400, "invalid_request", format!("bad JSON body: {e}")))?;
    let reason = r.reason.unwrap_or_default();
    let jwt = match (r.iss, r.jti) {
        (None, None) => None,
        (Some(iss), Some(jti)) => Some((iss, jti)),
        _ => return Err(Reply::error(400, "invalid_request", "`iss` and `jti` go together")),
    };
    match (r.tokens, r.client_id, r.sub, jwt) {
        (Some(tokens), None, None, None) if !tokens.is_empty() => Ok(Revoke::Tokens { tokens, reason }),
        (Some(_), None, None, None) => Err(Reply::error(400, "invalid_request", "`tokens` is empty")),
        (None, Some(name), None, None) => principal(Kind::Client, name, reason),
        (None, None, Some(name), None) => principal(Kind::Subject, name, reason),
        (None, None, None, Some((iss, jti))) => jwt_id(iss, jti, reason),
        _ => {
            Err(Reply::error(400, "invalid_request", "give exactly one of `tokens`, `client_id`, `sub`, `iss` + `jti`"))
        }
    }
}

/// A JWT named by `iss` + `jti`: the `jti` must be there, the issuer may be
/// empty (a JWT without `iss` has that identity).
fn jwt_id(iss: String, jti: String, reason: String) -> Result<Revoke, Reply> {
    let fits = |text: &str| text.chars().count() <= MAX_PRINCIPAL_CHARS * 4 && !text.chars().any(char::is_control);
    if jti.is_empty() || !fits(&jti) || !fits(&iss) {
        let limit = MAX_PRINCIPAL_CHARS * 4;
        let message =
            format!("`jti` must be 1 to {limit} characters and `iss` at most {limit}, without control characters");
        return Err(Reply::error(400, "invalid_request", message));
    }
    Ok(Revoke::Jwt { iss, jti, reason })
}

fn principal(kind: Kind, name: String, reason: String) -> Result<Revoke, Reply> {
    // A name no token's claim can match (see `is_usable_claim_value`) would revoke nothing.
    if !is_usable_claim_value(&name) || name.chars().count() > MAX_PRINCIPAL_CHARS || name.chars().any(char::is_control)
    {
        return Err(Reply::error(
            400,
            "invalid_request",
            format!(
                "the client id or subject must be 1 to {MAX_PRINCIPAL_CHARS} printable characters, \
                 without leading or trailing spaces"
            ),
        ));
    }
    Ok(Revoke::Principal { kind, name, reason })
}

/// Carries out an admin command against the denylist.
/// `cached` gives a token's active answer when the cache knows it (its
/// `exp` bounds the record, its JWT identity is revoked with it).
pub fn handle<S: Store + ?Sized>(
    command: Command,
    limits: &config::Denylist,
    store: &S,
    now: u64,
    cached: &dyn Fn(&TokenHash) -> Option<Claims>,
) -> Handled {
    let list = Denylist::new(store, limits);
    match command {
        Command::Revoke(Revoke::Tokens { tokens, reason }) => {
            revoke_tokens(&list, limits, tokens, &reason, now, cached)
        }
        Command::Revoke(Revoke::Principal { kind, name, reason }) => revoke_principal(&list, kind, &name, &reason, now),
        Command::Revoke(Revoke::Jwt { iss, jti, reason }) => {
            let identity = jwt::identity(&iss, &jti);
            revoke_identity(&list, identity, now.saturating_add(limits.token_ttl_s), &reason, now)
        }
        Command::List { offset, limit } => Handled::from(list_page(&list, offset, limit, now)),
        Command::Undo(id) => undo(&list, &id, now),
    }
}

impl From<Reply> for Handled {
    /// A reply that changed nothing.
    fn from(reply: Reply) -> Handled {
        Handled { reply, forward: Vec::new(), changes: Vec::new(), counts: Counts::default() }
    }
}

/// Revokes tokens by hash, and the JWTs among them by identity.
fn revoke_tokens<S: Store + ?Sized>(
    list: &Denylist<'_, S>,
    limits: &config::Denylist,
    mut tokens: Vec<String>,
    reason: &str,
    now: u64,
    cached: &dyn Fn(&TokenHash) -> Option<Claims>,
) -> Handled {
    // A token given twice is one revocation.
    let mut seen = std::collections::HashSet::new();
    tokens.retain(|t| seen.insert(t.clone()));
    let mut identities: Vec<(TokenHash, u64)> = Vec::new();
    let items: Vec<(TokenHash, u64)> = tokens
        .iter()
        .map(|t| {
            let token = bearer::from_admin(t);
            let hash = hash_token(&token);
            let known = cached(&hash);
            let exp = known.as_ref().and_then(|c| c.exp).filter(|&e| e > now);
            let expires = exp.unwrap_or(now.saturating_add(limits.token_ttl_s));
            // Every encoding of a JWT is denied through its identity.
            let identity = jwt::payload_identity(token.as_bytes()).or(known.and_then(|c| c.identity));
            if let Some(id) = identity.filter(|id| !identities.iter().any(|(i, _)| i == id)) {
                identities.push((id, expires));
            }
            (hash, expires)
        })
        .collect();
    let revoked = list
        .revoke_tokens(&items, reason, now)
        .and_then(|tokens| Ok((tokens, list.revoke_identities(&identities, reason, now)?)));
    let (tokens_done, jwts) = match revoked {
        Ok(both) => both,
        Err(e) => return Handled::from(store_failure(e)),
    };
    let reason = crate::denylist::clip_reason(reason);
    if tokens_done.full.is_empty() && jwts.full.is_empty() {
        log::info!("{}", revoked_tokens_line(&tokens_done, &jwts, &reason));
    } else {
        log::error!("{}", revoked_tokens_line(&tokens_done, &jwts, &reason));
    }
    let record = |kind: Kind, hash: &TokenHash, expires_at: u64| {
        let id = Record::hashed_id(kind, hash);
        Change::Revoked(Record { id, kind, revoked_at: now, expires_at, reason: reason.clone() })
    };
    let token_records = items.iter().filter(|(h, _)| tokens_done.revoked.contains(h)).map(|(h, e)| (Kind::Token, h, e));
    let jwt_records = identities.iter().filter(|(h, _)| jwts.revoked.contains(h)).map(|(h, e)| (Kind::Jwt, h, e));
    let changes = token_records.chain(jwt_records).map(|(kind, hash, expires)| record(kind, hash, *expires)).collect();
    let forward = tokens.iter().map(|t| bearer::from_admin(t)).collect();
    let refused = !tokens_done.full.is_empty() || !jwts.full.is_empty();
    let counts = Counts { tokens: tokens_done.revoked.len() as u64, refused: u64::from(refused), ..Counts::default() };
    let reply = revoked_tokens_reply(&tokens_done, &jwts);
    Handled { reply, forward, changes, counts }
}

/// 200 with the revoked ids, or 507 naming those that found no room.
fn revoked_tokens_reply(tokens: &Revoked, jwts: &Revoked) -> Reply {
    let ids: Vec<String> = tokens.revoked.iter().take(MAX_IDS_IN_ANSWER).map(hex).collect();
    let jti_ids: Vec<String> =
        jwts.revoked.iter().take(MAX_IDS_IN_ANSWER).map(|h| Record::hashed_id(Kind::Jwt, h)).collect();
    if tokens.full.is_empty() && jwts.full.is_empty() {
        if jti_ids.is_empty() {
            return Reply::ok(json!({"revoked": tokens.revoked.len(), "ids": ids}));
        }
        return Reply::ok(json!({"revoked": tokens.revoked.len(), "ids": ids, "jti_ids": jti_ids}));
    }
    // A JWT whose identity found no room is not fully revoked either.
    let jwts_refused = jwts.full.iter().map(|h| Record::hashed_id(Kind::Jwt, h));
    let refused: Vec<String> = tokens.full.iter().map(hex).chain(jwts_refused).take(MAX_IDS_IN_ANSWER).collect();
    Reply {
        status: 507,
        serialized: None,
        body: Some(json!({
            "error": "denylist_full",
            "error_description": "some tokens were not revoked: raise denylist.max_tokens",
            "revoked": tokens.revoked.len(), "ids": ids, "refused": refused,
        })),
        headers: Vec::new(),
    }
}

/// Revokes one JWT identity, as a token revocation would with the token.
fn revoke_identity<S: Store + ?Sized>(
    list: &Denylist<'_, S>,
    identity: TokenHash,
    expires_at: u64,
    reason: &str,
    now: u64,
) -> Handled {
    let done = match list.revoke_identities(&[(identity, expires_at)], reason, now) {
        Ok(done) => done,
        Err(e) => return Handled::from(store_failure(e)),
    };
    let id = Record::hashed_id(Kind::Jwt, &identity);
    if done.revoked.is_empty() {
        let message = "the JWT was not revoked: raise denylist.max_tokens";
        let mut handled = Handled::from(Reply::error(507, "denylist_full", message));
        handled.counts.refused = 1;
        return handled;
    }
    let mut handled = Handled::from(Reply::ok(json!({"revoked": 1, "jti_ids": [id]})));
    let reason = crate::denylist::clip_reason(reason);
    log::info!("revoked {id} reason={reason:?}");
    handled.changes.push(Change::Revoked(Record { id, kind: Kind::Jwt, revoked_at: now, expires_at, reason }));
    handled.counts.tokens = 1;
    handled
}

fn revoke_principal<S: Store + ?Sized>(
    list: &Denylist<'_, S>,
    kind: Kind,
    name: &str,
    reason: &str,
    now: u64,
) -> Handled {
    match list.revoke_principal(kind, name, reason, now) {
        Ok(record) => {
            log::info!("revoked {} reason={:?}", record.id, record.reason);
            let mut done = Handled::from(Reply::ok(json!({"revoked": 1, "revocation": record})));
            done.changes.push(Change::Revoked(record));
            done.counts.principals = 1;
            done
        }
        Err(DenyError::Full) => {
            let message = "too many client and subject revocations: raise denylist.max_principals";
            let mut done = Handled::from(Reply::error(507, "denylist_full", message));
            done.counts.refused = 1;
            done
        }
        Err(e) => Handled::from(store_failure(e)),
    }
}

fn list_page<S: Store + ?Sized>(list: &Denylist<'_, S>, offset: usize, limit: Option<usize>, now: u64) -> Reply {
    let records = match list.list(now) {
        Ok(records) => records,
        Err(e) => return store_failure(DenyError::Store(e)),
    };
    let start = offset.min(records.len());
    let end = limit.map_or(records.len(), |l| start.saturating_add(l).min(records.len()));
    let page = ListPage {
        count: records.len(),
        offset: start,
        next_offset: (end < records.len()).then_some(end),
        revocations: records.get(start..end).unwrap_or_default(),
    };
    // Serialised straight from the records: a JSON tree of a large list
    // would grow this worker's memory for good.
    Reply { status: 200, body: None, serialized: serde_json::to_string(&page).ok(), headers: Vec::new() }
}

fn undo<S: Store + ?Sized>(list: &Denylist<'_, S>, id: &str, now: u64) -> Handled {
    match list.undo(id, now) {
        Ok(true) => {
            log::info!("revocation {id} undone");
            let mut done = Handled::from(Reply { status: 204, body: None, serialized: None, headers: Vec::new() });
            done.changes.push(Change::Undone { id: crate::denylist::canonical_id(id), undone_at: now });
            done.counts.undone = 1;
            done
        }
        Ok(false) => Handled::from(Reply::error(404, "not_found", "no such revocation")),
        Err(e) => Handled::from(store_failure(e)),
    }
}

/// Ids one log line names; the rest are counted.
const MAX_IDS_IN_LOG: usize = 8;

/// The one log line of a token revocation, however many tokens it held:
/// its size is bounded by `MAX_IDS_IN_LOG` and the clipped reason.
fn revoked_tokens_line(done: &Revoked, jwts: &Revoked, clipped_reason: &str) -> String {
    let mut ids: Vec<String> = done.revoked.iter().take(MAX_IDS_IN_LOG).map(|h| format!("sha256:{}", hex(h))).collect();
    if done.revoked.len() > MAX_IDS_IN_LOG {
        ids.push(format!("and {} more", done.revoked.len() - MAX_IDS_IN_LOG));
    }
    let mut line = format!("revoked {} token(s) [{}] reason={clipped_reason:?}", done.revoked.len(), ids.join(", "));
    if !jwts.revoked.is_empty() {
        line.push_str(&format!("; {} JWT identities (jti:)", jwts.revoked.len()));
    }
    let refused = done.full.len() + jwts.full.len();
    if refused > 0 {
        line.push_str(&format!("; {refused} refused: the denylist is full"));
    }
    line
}

fn store_failure(e: DenyError) -> Reply {
    log::error!("denylist write failed: {e:?}");
    Reply::error(503, "temporarily_unavailable", "the denylist could not be updated; nothing was changed or retry")
        .with_header("retry-after", "1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const PREFIX: &str = "/tokengate";

    fn admin_cfg() -> config::Admin {
        config::Admin {
            path_prefix: PREFIX.into(),
            token_sha256: config::AdminTokenHashes::new([hex(&Sha256::digest(b"admin-secret").into())]),
            max_body_bytes: 4096,
            max_bulk_tokens: 3,
        }
    }

    #[test]
    fn admin_paths_are_recognised_in_disguise() {
        for p in [
            "/tokengate/revoke",
            "//tokengate/revoke",
            "/TokenGate/revoke",
            "/tokengate%2Frevoke",
            "/x/../tokengate/revoke",
            "/tokengate/./revocations",
            "/%74okengate/revoke",
            "/tokengate",
            "/tokengate?x=1",
        ] {
            assert!(is_admin_path(p, PREFIX), "{p}");
        }
        for p in ["/", "/api", "/tokengatex/revoke", "/api/tokengate/revoke"] {
            assert!(!is_admin_path(p, PREFIX), "{p}");
        }
    }

    #[test]
    fn paths_outside_the_admin_routes_are_answered_404_on_the_admin_listener() {
        for p in ["/tokengate-v2/revoke", "/api/tokengate/revoke", "/", "/elsewhere", "/tokengatex"] {
            let reply = outside_admin(p, PREFIX).unwrap_or_else(|| panic!("{p} is not an admin path"));
            assert_eq!(reply.status, 404, "{p}");
            assert_eq!(reply.body.as_ref().unwrap()["error"], "not_found");
        }
        // Admin paths, disguised ones included, go to the admin API (which checks the credential first).
        for p in
            ["/tokengate/revoke", "/tokengate/revocations", "//tokengate/revoke", "/TOKENGATE/revoke", "/tokengate"]
        {
            assert_eq!(outside_admin(p, PREFIX), None, "{p}");
        }
    }

    #[test]
    fn routes_need_their_canonical_path_and_method() {
        assert_eq!(route("POST", "/tokengate/revoke", PREFIX), Ok(Route::Revoke));
        assert_eq!(route("GET", "/tokengate/revocations?x", PREFIX), Ok(Route::List { offset: 0, limit: None }));
        assert_eq!(
            route("GET", "/tokengate/revocations?offset=5&limit=2", PREFIX),
            Ok(Route::List { offset: 5, limit: Some(2) })
        );
        assert_eq!(route("GET", "/tokengate/revocations?limit=0", PREFIX).unwrap_err().status, 400);
        assert_eq!(route("GET", "/tokengate/revocations?offset=x", PREFIX).unwrap_err().status, 400);
        assert_eq!(
            route("DELETE", "/tokengate/revocations/client:a%20b", PREFIX),
            Ok(Route::Undo("client:a b".into()))
        );
        let status = |m: &str, p: &str| route(m, p, PREFIX).unwrap_err().status;
        assert_eq!(status("GET", "/tokengate/revoke"), 405);
        assert_eq!(status("POST", "/tokengate/nope"), 404);
        assert_eq!(status("POST", "/tokengate"), 404);
        assert_eq!(
            route("DELETE", "/tokengate/revocations/client%3Aspiffe%3A%2F%2Fex.org%2Fapp", PREFIX),
            Ok(Route::Undo("client:spiffe://ex.org/app".into()))
        );
        assert_eq!(status("POST", "/tokengate/revocations/..%2Frevoke"), 400);
        for p in [
            "//tokengate/revoke",
            "/TOKENGATE/revoke",
            "/tokengate%2Frevoke",
            "/tokengate/x/../revoke",
            "/tokengate/revocations/a/b",
        ] {
            assert!(matches!(status("POST", p), 400 | 404), "{p}");
        }
        assert_eq!(status("POST", "//tokengate/revoke"), 400);
    }

    #[test]
    fn admin_token_is_checked_by_hash() {
        let cfg = admin_cfg();
        assert!(authorize(&[b"Bearer admin-secret"], &cfg.token_sha256).is_ok());
        let upper = config::AdminTokenHashes::new(cfg.token_sha256.iter().map(str::to_uppercase));
        assert!(authorize(&[b"bearer admin-secret"], &upper).is_ok());
        for bad in [
            &[][..],
            &[&b"Bearer wrong"[..]],
            &[&b"Basic YWRtaW4="[..]],
            &[&b"Bearer admin-secret"[..], &b"Bearer x"[..]],
        ] {
            let r = authorize(bad, &cfg.token_sha256).unwrap_err();
            assert_eq!(r.status, 401);
            assert!(r.headers.iter().any(|(n, _)| *n == "www-authenticate"));
        }
    }

    #[test]
    fn any_configured_admin_token_is_accepted_during_a_rotation() {
        let digest = |t: &[u8]| hex(&Sha256::digest(t).into());
        let both = config::AdminTokenHashes::new([digest(b"old-token"), digest(b"new-token")]);
        assert!(authorize(&[b"Bearer old-token"], &both).is_ok());
        assert!(authorize(&[b"Bearer new-token"], &both).is_ok());
        assert_eq!(authorize(&[b"Bearer other-token"], &both).unwrap_err().status, 401);
        let new_only = config::AdminTokenHashes::new([digest(b"new-token")]);
        assert_eq!(authorize(&[b"Bearer old-token"], &new_only).unwrap_err().status, 401);
    }

    #[test]
    fn revoke_bodies_parse_or_say_why() {
        let cfg = admin_cfg();
        let form = parse_revoke(
            Some("application/x-www-form-urlencoded"),
            b"token=a%2Bb&token_type_hint=access_token",
            &cfg,
            4096,
        );
        assert_eq!(form, Ok(Revoke::Tokens { tokens: vec!["a+b".into()], reason: "rfc7009".into() }));
        let json = parse_revoke(
            Some("application/json; charset=utf-8"),
            br#"{"tokens": ["a", "b"], "reason": "leak"}"#,
            &cfg,
            4096,
        );
        assert_eq!(json, Ok(Revoke::Tokens { tokens: vec!["a".into(), "b".into()], reason: "leak".into() }));
        let client = parse_revoke(Some("application/json"), br#"{"client_id": "app"}"#, &cfg, 4096);
        assert_eq!(client, Ok(Revoke::Principal { kind: Kind::Client, name: "app".into(), reason: String::new() }));
        let status = |ct: Option<&str>, body: &[u8]| parse_revoke(ct, body, &cfg, 4096).unwrap_err().status;
        assert_eq!(status(Some("text/plain"), b"token=a"), 415);
        assert_eq!(status(None, b"token=a"), 415);
        assert_eq!(status(Some("application/json"), b""), 400);
        assert_eq!(status(Some("application/json"), b"{"), 400);
        assert_eq!(status(Some("application/json"), br#"{"tokens": []}"#), 400);
        assert_eq!(status(Some("application/json"), br#"{"tokens": ["a"], "sub": "x"}"#), 400);
        assert_eq!(status(Some("application/json"), br#"{"token": "a"}"#), 400);
        assert_eq!(status(Some("application/json"), br#"{"tokens": ["a b"]}"#), 400);
        assert_eq!(status(Some("application/json"), br#"{"tokens": ["a","b","c","d"]}"#), 413);
        assert_eq!(status(Some("application/json"), br#"{"sub": ""}"#), 400);
        // A claim value with surrounding spaces is never matched: revoking it would revoke nothing.
        for name in [" admin", "admin ", " admin ", " "] {
            let body = json!({"sub": name}).to_string();
            assert_eq!(status(Some("application/json"), body.as_bytes()), 400, "{name:?}");
            let body = json!({"client_id": name}).to_string();
            assert_eq!(status(Some("application/json"), body.as_bytes()), 400, "{name:?}");
        }
        assert!(parse_revoke(Some("application/json"), br#"{"sub": "Ada Lovelace"}"#, &cfg, 4096).is_ok());
        assert_eq!(status(Some("application/x-www-form-urlencoded"), b"token_type_hint=x"), 400);
        assert_eq!(status(Some("application/x-www-form-urlencoded"), b"token=a&token=b"), 400);
        assert_eq!(status(Some("application/json"), &vec![b' '; 5000]), 413);
        // The revoke bound is the data path's `max_token_bytes`, not a fixed 4096.
        let cfg = config::Admin { max_body_bytes: 65_536, ..admin_cfg() };
        let sized = |n: usize| {
            let body = json!({"tokens": ["a".repeat(n)]}).to_string();
            parse_revoke(Some("application/json"), body.as_bytes(), &cfg, 5000)
        };
        assert!(sized(5000).is_ok());
        assert_eq!(sized(5001).unwrap_err().status, 400);
    }

    #[test]
    fn handle_revokes_lists_and_undoes() {
        let store = MemoryStore::new();
        let limits = config::Denylist::default();
        let no_exp = |_: &TokenHash| None;
        let revoke = Revoke::Tokens { tokens: vec!["tok-1".into()], reason: "leak".into() };
        let done = handle(Command::Revoke(revoke), &limits, &store, 100, &no_exp);
        assert_eq!(done.reply.status, 200);
        assert_eq!(done.reply.body.as_ref().unwrap()["revoked"], 1);
        assert_eq!(done.forward.len(), 1);
        let id = hex(&hash_token(&bearer::from_admin("tok-1")));

        let all = Command::List { offset: 0, limit: None };
        let listed: Value =
            serde_json::from_str(&handle(all.clone(), &limits, &store, 101, &no_exp).reply.text().unwrap()).unwrap();
        let text = listed.to_string();
        assert!(!text.contains("tok-1"), "the raw token never appears");
        assert_eq!(listed["revocations"][0]["id"], id);
        assert_eq!(listed["revocations"][0]["kind"], "token");
        assert_eq!(listed["revocations"][0]["revoked_at"], 100);
        assert_eq!(listed["revocations"][0]["expires_at"], 100 + limits.token_ttl_s);

        assert_eq!(handle(Command::Undo(id.clone()), &limits, &store, 102, &no_exp).reply.status, 204);
        assert_eq!(handle(Command::Undo(id), &limits, &store, 102, &no_exp).reply.status, 404);
    }

    #[test]
    fn a_jwt_is_revoked_by_iss_and_jti_without_the_token() {
        let cfg = admin_cfg();
        let parse = |body: &str| parse_revoke(Some("application/json"), body.as_bytes(), &cfg, 4096);
        let jwt = parse(r#"{"iss": "https://idp", "jti": "j-1", "reason": "leak"}"#).unwrap();
        assert_eq!(jwt, Revoke::Jwt { iss: "https://idp".into(), jti: "j-1".into(), reason: "leak".into() });
        for bad in [
            r#"{"jti": "j-1"}"#,
            r#"{"iss": "x"}"#,
            r#"{"iss": "x", "jti": ""}"#,
            r#"{"iss": "x", "jti": "a
b"}"#,
            r#"{"iss": "x", "jti": "j", "sub": "alice"}"#,
        ] {
            assert_eq!(parse(bad).unwrap_err().status, 400, "{bad}");
        }
        let store = MemoryStore::new();
        let limits = config::Denylist::default();
        let done = handle(Command::Revoke(jwt), &limits, &store, 100, &|_| None);
        let id = Record::hashed_id(Kind::Jwt, &jwt::identity("https://idp", "j-1"));
        assert_eq!(done.reply.body, Some(json!({"revoked": 1, "jti_ids": [id.clone()]})));
        assert_eq!(done.counts.tokens, 1);
        let [Change::Revoked(record)] = &done.changes[..] else { panic!("{:?}", done.changes) };
        assert_eq!(
            (record.kind, &record.id, record.expires_at, record.reason.as_str()),
            (Kind::Jwt, &id, 100 + limits.token_ttl_s, "leak")
        );
        // The same identity a revoked token of that issuer and jti gets: either undoes it.
        assert_eq!(handle(Command::Undo(id), &limits, &store, 101, &|_| None).reply.status, 204);
    }

    #[test]
    fn revoking_a_jwt_also_revokes_its_identity() {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = format!("{}.{}.c2ln", b64(r#"{"alg":"ES256"}"#), b64(r#"{"iss":"https://idp","jti":"j-1"}"#));
        let store = MemoryStore::new();
        let limits = config::Denylist::default();
        let revoke = Revoke::Tokens { tokens: vec![token.clone()], reason: "leak".into() };
        let done = handle(Command::Revoke(revoke), &limits, &store, 100, &|_| None);
        let jti_id = Record::hashed_id(Kind::Jwt, &jwt::identity("https://idp", "j-1"));
        assert_eq!(done.reply.body.as_ref().unwrap()["jti_ids"], json!([jti_id]));
        assert_eq!(done.changes.len(), 2, "the token and its identity reach etcd");
        let listed: Value = serde_json::from_str(
            &handle(Command::List { offset: 0, limit: None }, &limits, &store, 101, &|_| None).reply.text().unwrap(),
        )
        .unwrap();
        let records = listed["revocations"].as_array().unwrap();
        let jti = records.iter().find(|r| r["kind"] == "jti").unwrap();
        assert_eq!((jti["id"].as_str(), jti["reason"].as_str()), (Some(jti_id.as_str()), Some("leak")));
        assert!(!listed.to_string().contains(&token), "the raw token never appears");

        // An opaque token whose cached answer carried a jti: that identity is revoked too.
        let known = Claims { identity: Some(jwt::identity("https://idp", "j-2")), ..Default::default() };
        let revoke = Revoke::Tokens { tokens: vec!["opaque".into()], reason: String::new() };
        let done = handle(Command::Revoke(revoke), &limits, &store, 100, &|_| Some(known.clone()));
        let expected = Record::hashed_id(Kind::Jwt, &jwt::identity("https://idp", "j-2"));
        assert_eq!(done.reply.body.unwrap()["jti_ids"], json!([expected]));
        // Undone by its id, in any case.
        let upper = format!("jti:{}", expected.trim_start_matches("jti:").to_ascii_uppercase());
        assert_eq!(handle(Command::Undo(upper), &limits, &store, 102, &|_| None).reply.status, 204);
    }

    #[test]
    fn known_exp_bounds_the_record() {
        let store = MemoryStore::new();
        let limits = config::Denylist::default();
        let revoke = Revoke::Tokens { tokens: vec!["tok".into()], reason: String::new() };
        handle(Command::Revoke(revoke), &limits, &store, 100, &|_| {
            Some(Claims { exp: Some(500), ..Default::default() })
        });
        let all = Command::List { offset: 0, limit: None };
        let listed: Value =
            serde_json::from_str(&handle(all.clone(), &limits, &store, 101, &|_| None).reply.text().unwrap()).unwrap();
        assert_eq!(listed["revocations"][0]["expires_at"], 500);
    }

    #[test]
    fn list_pages() {
        let store = MemoryStore::new();
        let limits = config::Denylist::default();
        let tokens: Vec<String> = (0..5).map(|i| format!("t{i}")).collect();
        handle(Command::Revoke(Revoke::Tokens { tokens, reason: String::new() }), &limits, &store, 1, &|_| None);
        let page = |offset, limit| -> Value {
            let r = handle(Command::List { offset, limit }, &limits, &store, 2, &|_| None).reply;
            serde_json::from_str(&r.text().unwrap()).unwrap()
        };
        let first = page(0, Some(2));
        assert_eq!((first["count"].as_u64(), first["revocations"].as_array().unwrap().len()), (Some(5), 2));
        assert_eq!(first["next_offset"], 2);
        let last = page(4, Some(2));
        assert_eq!(last["revocations"].as_array().unwrap().len(), 1);
        assert!(last["next_offset"].is_null());
        assert_eq!(page(9, None)["revocations"].as_array().unwrap().len(), 0);
    }

    /// Found by fuzz/config: `denylist.token_ttl_s` has no upper bound, and
    /// `now + token_ttl_s` overflows for a large one. The wasm release build
    /// has no overflow checks: the record's `expires_at` wraps into the past,
    /// the admin gets 200 `{"revoked": 1}` and the token is not revoked.
    #[test]
    fn a_huge_token_ttl_still_revokes() {
        let store = MemoryStore::new();
        let limits = config::Denylist { token_ttl_s: u64::MAX, ..Default::default() };
        let now = 1_800_000_000;
        let revoke = Revoke::Tokens { tokens: vec!["tok".into()], reason: String::new() };
        let done = handle(Command::Revoke(revoke), &limits, &store, now, &|_| None);
        assert_eq!(done.reply.status, 200);
        let hash = hash_token(&bearer::from_admin("tok"));
        assert!(Denylist::new(&store, &limits).token_record(&hash, now + 1).unwrap().is_some());
    }

    #[test]
    fn a_bulk_revocation_is_one_bounded_log_line_with_the_clipped_reason() {
        let done = Revoked {
            revoked: (0..200u32).map(|n| Sha256::digest(n.to_be_bytes()).into()).collect(),
            full: Vec::new(),
        };
        let reason = crate::denylist::clip_reason(&"x".repeat(50_000));
        let line = revoked_tokens_line(&done, &Revoked::default(), &reason);
        assert!(line.starts_with("revoked 200 token(s) [sha256:"), "{line}");
        assert!(line.contains(&format!("sha256:{}", hex(&done.revoked[7]))));
        assert!(!line.contains(&hex(&done.revoked[8])), "ids past the first 8 are counted, not listed");
        assert!(line.contains("and 192 more"), "{line}");
        assert!(line.ends_with(&format!("reason=\"{}\"", "x".repeat(crate::denylist::MAX_REASON_CHARS))), "{line}");
        assert!(line.len() < 1000, "{} bytes", line.len());

        // The worst reason: every kept character escaped by the log's quoting.
        let worst = crate::denylist::clip_reason(&"\u{200b}".repeat(50_000));
        let with_refusals = Revoked { full: done.revoked.clone(), ..done };
        let line = revoked_tokens_line(&with_refusals, &Revoked::default(), &worst);
        assert!(line.ends_with("; 200 refused: the denylist is full"), "{line}");
        assert!(line.len() < 3000, "{} bytes", line.len());
    }

    #[test]
    fn a_bulk_answer_lists_at_most_a_thousand_ids() {
        let store = MemoryStore::new();
        let limits = config::Denylist::default();
        let tokens: Vec<String> = (0..1_001).map(|n| format!("bulk-{n}")).collect();
        let done =
            handle(Command::Revoke(Revoke::Tokens { tokens, reason: String::new() }), &limits, &store, 1, &|_| None);
        let body = done.reply.body.unwrap();
        assert_eq!(body["revoked"], 1_001);
        assert_eq!(body["ids"].as_array().map(Vec::len), Some(MAX_IDS_IN_ANSWER));
        assert_eq!(done.changes.len(), 1_001, "every revocation reaches etcd, listed or not");
    }

    #[test]
    fn a_full_denylist_is_507_denylist_full_and_counted() {
        let store = MemoryStore::new();
        let limits = config::Denylist { max_principals: 1, ..Default::default() };
        let principal = |name: &str| {
            Command::Revoke(Revoke::Principal { kind: Kind::Client, name: name.into(), reason: String::new() })
        };
        let first = handle(principal("a"), &limits, &store, 100, &|_| None);
        assert_eq!((first.reply.status, first.counts.principals), (200, 1));
        let full = handle(principal("b"), &limits, &store, 100, &|_| None);
        assert_eq!(full.reply.status, 507);
        assert_eq!(full.reply.body.as_ref().unwrap()["error"], "denylist_full");
        assert_eq!(full.counts, Counts { refused: 1, ..Counts::default() });
        assert!(full.changes.is_empty(), "nothing to sync");

        // Tokens: a bucket at its capacity refuses the rest, and the answer names them.
        let limits = config::Denylist { max_tokens: 1, ..Default::default() };
        let capacity = crate::denylist::bucket_capacity(1);
        let mut same_bucket = Vec::new();
        let mut n = 0u32;
        while same_bucket.len() <= capacity {
            let token = format!("t{n}");
            let hash = hash_token(&bearer::from_admin(&token));
            if u16::from_be_bytes([hash[0], hash[1]]) % 1024 == 0 {
                same_bucket.push(token);
            }
            n += 1;
        }
        let done = handle(
            Command::Revoke(Revoke::Tokens { tokens: same_bucket, reason: String::new() }),
            &limits,
            &store,
            100,
            &|_| None,
        );
        let body = done.reply.body.unwrap();
        assert_eq!((done.reply.status, body["revoked"].as_u64()), (507, Some(capacity as u64)));
        assert_eq!(body["refused"].as_array().map(Vec::len), Some(1));
        assert_eq!(done.counts, Counts { tokens: capacity as u64, refused: 1, ..Counts::default() });
    }

    #[test]
    fn principal_revocation_is_listed_with_its_prefix() {
        let store = MemoryStore::new();
        let limits = config::Denylist::default();
        let revoke = Revoke::Principal { kind: Kind::Subject, name: "alice".into(), reason: "left".into() };
        let r = handle(Command::Revoke(revoke), &limits, &store, 100, &|_| None).reply;
        assert_eq!(r.body.unwrap()["revocation"]["id"], "sub:alice");
    }
}
