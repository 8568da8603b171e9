//! The plugin configuration: JSON in the filter's `configuration`, parsed
//! strictly (unknown keys are errors) and validated with messages that name
//! the key, so a typo stops the plugin instead of silently weakening it.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// RFC 7662 introspection; optional where every token is a JWT of a
    /// configured issuer (`jwt`): other tokens are then 401.
    #[serde(default)]
    pub introspection: Option<Introspection>,
    #[serde(default)]
    pub cache: Cache,
    /// Every one of these must be in the token's `scope` (where no rule matches).
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// The token's `aud` must hold one of these; its `iss` must be one of those.
    #[serde(default)]
    pub audiences: Option<Vec<String>>,
    #[serde(default)]
    pub issuers: Option<Vec<String>>,
    /// Per-route requirements, first match wins (`rules::Policy`).
    #[serde(default)]
    pub rules: Vec<crate::rules::RuleJson>,
    /// Read a route's requirement from its Envoy metadata (wins over `rules`).
    #[serde(default)]
    pub route_metadata: bool,
    /// Let CORS preflights (OPTIONS with Origin and
    /// Access-Control-Request-Method) through without a token.
    #[serde(default)]
    pub pass_cors_preflight: bool,
    /// `rules` and the top-level requirement, compiled at load.
    #[serde(skip)]
    pub(crate) policy: crate::rules::Policy,
    /// Introspection claim name → request header set for the upstream.
    #[serde(default = "default_claims_to_headers")]
    pub claims_to_headers: BTreeMap<String, String>,
    /// Remove `Authorization` (and an accepted query token) before the
    /// request goes upstream.
    #[serde(default)]
    pub hide_credentials: bool,
    /// Also accept the token as `?access_token=` (RFC 6750 §2.3) when the
    /// request has no `Authorization` header. Off: URLs end up in logs.
    #[serde(default)]
    pub allow_query_token: bool,
    /// Longest bearer token accepted (header, query or admin revoke); longer
    /// is `invalid_request`. Rich JWTs (group claims) need more than 4096.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// The realm in `WWW-Authenticate` challenges.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Serve the admin (revocation) API on this listener.
    #[serde(default)]
    pub admin: Option<Admin>,
    /// Bounds of the shared denylist (used where revocations are written).
    #[serde(default)]
    pub denylist: Denylist,
    /// Also revoke at the authorization server (RFC 7009).
    #[serde(default)]
    pub revocation_endpoint: Option<RevocationEndpoint>,
    /// Share revocations with every Envoy through etcd.
    #[serde(default)]
    pub cluster_sync: Option<ClusterSync>,
    /// JWT access tokens verified in the filter (`jwt_verify`).
    #[serde(default)]
    pub jwt: Option<crate::jwt_verify::JwtSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSync {
    /// The Envoy cluster that reaches etcd's client port (v3 JSON gateway).
    pub cluster: String,
    /// `:authority` of the etcd requests.
    pub authority: String,
    /// Every key tokengate writes starts with this.
    #[serde(default = "default_sync_prefix")]
    pub prefix: String,
    /// How often the process's poller reads changes from etcd.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    #[serde(default = "default_sync_timeout_ms")]
    pub timeout_ms: u64,
    /// Bound on changes waiting for etcd while it is unreachable.
    #[serde(default = "default_max_outbox")]
    pub max_outbox: usize,
    /// Answer 503 until the first complete read of etcd after a start, so a
    /// restarted Envoy never lets through what was revoked elsewhere.
    #[serde(default = "default_true")]
    pub require_initial_sync: bool,
    /// Stop waiting for that read after this long and serve with what is
    /// known (counted and logged); 0 waits for ever.
    #[serde(default)]
    pub initial_sync_timeout_s: u64,
}

impl ClusterSync {
    fn validate_initial_sync(&self) -> Result<(), ConfigError> {
        if self.initial_sync_timeout_s > 86_400 {
            return err("cluster_sync.initial_sync_timeout_s must be at most 86400 (0 waits for ever)");
        }
        if self.initial_sync_timeout_s > 0 && !self.require_initial_sync {
            return err("cluster_sync.initial_sync_timeout_s bounds require_initial_sync, which is off");
        }
        Ok(())
    }
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Routes live under this prefix, e.g. `/tokengate/revoke`.
    #[serde(default = "default_admin_prefix")]
    pub path_prefix: String,
    /// Hex SHA-256 of the admin bearer token, or a list of them so that a new
    /// token can be added before the old one is removed (never the token itself).
    pub token_sha256: AdminTokenHashes,
    /// A larger request body is refused with 413.
    #[serde(default = "default_admin_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Most tokens one bulk revoke may carry (413 beyond).
    #[serde(default = "default_admin_max_bulk_tokens")]
    pub max_bulk_tokens: usize,
}

/// Most admin token hashes accepted at once: enough for a rotation's overlap.
pub const MAX_ADMIN_TOKENS: usize = 8;

/// The admin tokens' SHA-256s: one string, or a list during a rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTokenHashes(Vec<String>);

impl AdminTokenHashes {
    pub fn new<S: Into<String>>(hashes: impl IntoIterator<Item = S>) -> Self {
        AdminTokenHashes(hashes.into_iter().map(Into::into).collect())
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

impl<'de> Deserialize<'de> for AdminTokenHashes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        match OneOrMany::deserialize(d).map_err(|_| {
            serde::de::Error::custom("admin.token_sha256 must be a hex SHA-256 string or a list of them")
        })? {
            OneOrMany::One(h) => Ok(AdminTokenHashes(vec![h])),
            OneOrMany::Many(list) => Ok(AdminTokenHashes(list)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Denylist {
    /// Bound on revoked tokens held at once (expired records make room).
    #[serde(default = "default_denylist_max_tokens")]
    pub max_tokens: usize,
    /// Bound on client and subject revocations held at once.
    #[serde(default = "default_denylist_max_principals")]
    pub max_principals: usize,
    /// Life of a token record when the token's `exp` is unknown.
    #[serde(default = "default_denylist_token_ttl_s")]
    pub token_ttl_s: u64,
    /// Life of a client or subject record.
    #[serde(default = "default_denylist_principal_ttl_s")]
    pub principal_ttl_s: u64,
    /// How far the authorization server's clock (a token's `iat`) may run
    /// ahead of Envoy's, for client and subject revocations.
    #[serde(default = "default_denylist_clock_skew_s")]
    pub clock_skew_s: u64,
}

impl Default for Denylist {
    fn default() -> Self {
        Denylist {
            max_tokens: default_denylist_max_tokens(),
            max_principals: default_denylist_max_principals(),
            token_ttl_s: default_denylist_token_ttl_s(),
            principal_ttl_s: default_denylist_principal_ttl_s(),
            clock_skew_s: default_denylist_clock_skew_s(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationEndpoint {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub client_secret: Option<String>,
    #[serde(default)]
    pub client_secret_env: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Introspection {
    /// The Envoy cluster that reaches the authorization server.
    pub cluster: String,
    /// `:authority` of the introspection request.
    pub authority: String,
    /// Path of the RFC 7662 endpoint.
    pub path: String,
    /// Credentials for `client_secret_basic`; no `Authorization` when absent.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub client_secret: Option<String>,
    /// The VM environment variable holding the secret instead (kept out of
    /// config dumps); read once, when the configuration is loaded.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Sent as `token_type_hint`; empty sends none.
    #[serde(default = "default_token_type_hint")]
    pub token_type_hint: String,
    /// A larger answer is treated as an IdP failure (503).
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cache {
    /// Upper bound on how long an active answer is trusted (also capped by `exp`).
    #[serde(default = "default_max_ttl_s")]
    pub max_ttl_s: u64,
    /// How long an inactive answer is remembered; 0 disables.
    #[serde(default = "default_negative_ttl_s")]
    pub negative_ttl_s: u64,
    /// Bound on cached answers in shared data (all workers together).
    #[serde(default = "default_max_entries")]
    pub max_entries: u64,
    /// Bound on the per-worker copy of hot answers; 0 disables it.
    #[serde(default = "default_local_entries")]
    pub local_entries: usize,
    /// Bound on the tokens whose SHA-256 each worker remembers; 0 disables.
    #[serde(default = "default_hash_memo_entries")]
    pub hash_memo_entries: usize,
    /// A cached answer larger than this is not cached (it is still used).
    #[serde(default = "default_max_entry_bytes")]
    pub max_entry_bytes: usize,
    /// While the IdP fails, an active answer may be used this long past its
    /// cache lifetime (never past `exp`); 0 disables.
    #[serde(default)]
    pub stale_if_error_s: u64,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            max_ttl_s: default_max_ttl_s(),
            negative_ttl_s: default_negative_ttl_s(),
            max_entries: default_max_entries(),
            local_entries: default_local_entries(),
            hash_memo_entries: default_hash_memo_entries(),
            max_entry_bytes: default_max_entry_bytes(),
            stale_if_error_s: 0,
        }
    }
}

fn default_claims_to_headers() -> BTreeMap<String, String> {
    [("sub", "x-auth-subject"), ("client_id", "x-auth-client-id"), ("scope", "x-auth-scope")]
        .into_iter()
        .map(|(c, h)| (c.to_string(), h.to_string()))
        .collect()
}
fn default_admin_prefix() -> String {
    "/tokengate".to_string()
}
fn default_admin_max_body_bytes() -> usize {
    1024 * 1024
}
fn default_admin_max_bulk_tokens() -> usize {
    10_000
}
fn default_denylist_max_tokens() -> usize {
    100_000
}
fn default_denylist_max_principals() -> usize {
    1_000
}
fn default_denylist_token_ttl_s() -> u64 {
    86_400
}
fn default_denylist_principal_ttl_s() -> u64 {
    86_400
}
fn default_denylist_clock_skew_s() -> u64 {
    60
}
fn default_sync_prefix() -> String {
    "tokengate/".to_string()
}
fn default_poll_ms() -> u64 {
    500
}
fn default_sync_timeout_ms() -> u64 {
    1000
}
fn default_max_outbox() -> usize {
    10_000
}
fn default_max_token_bytes() -> usize {
    crate::bearer::DEFAULT_MAX_TOKEN_BYTES
}
fn default_realm() -> String {
    "tokengate".to_string()
}
fn default_timeout_ms() -> u64 {
    2000
}
fn default_token_type_hint() -> String {
    "access_token".to_string()
}
fn default_max_response_bytes() -> usize {
    64 * 1024
}
fn default_max_ttl_s() -> u64 {
    300
}
fn default_negative_ttl_s() -> u64 {
    5
}
fn default_max_entries() -> u64 {
    100_000
}
fn default_local_entries() -> usize {
    4096
}
fn default_hash_memo_entries() -> usize {
    1024
}
fn default_max_entry_bytes() -> usize {
    4096
}

/// A configuration error, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid tokengate configuration: {}", self.0)
    }
}

/// A client secret given inline or named by `client_secret_env`, never both.
fn secret(
    section: &str,
    inline: Option<String>,
    var: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, ConfigError> {
    match (inline, var) {
        (Some(_), Some(_)) => err(format!("{section}: give client_secret or client_secret_env, not both")),
        (inline, None) => Ok(inline),
        (None, Some(var)) => match env(var).filter(|v| !v.is_empty()) {
            Some(value) => Ok(Some(value)),
            None => err(format!(
                "{section}.client_secret_env names {var:?}, which is not set in the wasm VM's environment \
                 (vm_config.environment_variables)"
            )),
        },
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Largest `denylist.clock_skew_s`: an hour covers any clock that is merely wrong.
const MAX_CLOCK_SKEW_S: u64 = 3600;

/// Headers the filter owns; a claim may not be mapped onto them.
const RESERVED_HEADERS: &[&str] = &["authorization", "host", "content-length", "transfer-encoding", "connection"];

impl Config {
    /// Parses the plugin configuration; `*_env` secrets come from the VM's
    /// environment (`vm_config.environment_variables`).
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        Config::parse_with_env(bytes, &|name| std::env::var(name).ok())
    }

    pub fn parse_with_env(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return err("the plugin configuration is empty; `introspection` or `jwt` is required");
        }
        // serde_json's message names the unknown or missing key and its position.
        let mut config: Config = serde_json::from_slice(bytes).map_err(|e| ConfigError(e.to_string()))?;
        if let Some(i) = &mut config.introspection {
            i.client_secret = secret("introspection", i.client_secret.take(), i.client_secret_env.as_deref(), env)?;
        }
        if let Some(r) = &mut config.revocation_endpoint {
            r.client_secret =
                secret("revocation_endpoint", r.client_secret.take(), r.client_secret_env.as_deref(), env)?;
        }
        config.validate()?;
        if let Some(jwt) = &mut config.jwt {
            jwt.compile().map_err(ConfigError)?;
        }
        config.policy = config.compile_policy().map_err(ConfigError)?;
        Ok(config)
    }

    fn compile_policy(&self) -> Result<crate::rules::Policy, String> {
        let top = crate::rules::RequireJson {
            scopes: Some(self.required_scopes.clone()).filter(|s| !s.is_empty()),
            audiences: self.audiences.clone(),
            issuers: self.issuers.clone(),
            ..Default::default()
        };
        let top = crate::rules::Requirement::compile(&top, None, "")?;
        crate::rules::Policy::compile(&self.rules, top)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        match &self.introspection {
            Some(i) => i.validate()?,
            None if self.jwt.is_none() => {
                return err("`introspection` is required unless `jwt` verifies every token in the filter")
            }
            None => {}
        }
        self.cache.validate()?;
        for s in &self.required_scopes {
            if !is_scope_token(s) {
                return err(format!("required_scopes: {s:?} is not a valid scope token (RFC 6749 §3.3)"));
            }
        }
        for (claim, header) in &self.claims_to_headers {
            if claim.is_empty() {
                return err("claims_to_headers: a claim name must not be empty");
            }
            if !is_header_name(header) {
                return err(format!("claims_to_headers.{claim}: {header:?} is not a lower-case header name"));
            }
            if RESERVED_HEADERS.contains(&header.as_str()) || header.starts_with(':') {
                return err(format!("claims_to_headers.{claim}: {header:?} is reserved"));
            }
        }
        if let Some(a) = &self.admin {
            a.validate()?;
        }
        self.denylist.validate()?;
        if let Some(r) = &self.revocation_endpoint {
            r.validate()?;
        }
        if let Some(c) = &self.cluster_sync {
            c.validate()?;
        }
        self.validate_token_size()?;
        if self.realm.is_empty() || !self.realm.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') {
            return err("realm must be non-empty printable ASCII without '\"' or '\\'");
        }
        Ok(())
    }

    /// The token bound, and what it costs each worker's hash memo.
    fn validate_token_size(&self) -> Result<(), ConfigError> {
        let ceiling = crate::bearer::MAX_TOKEN_BYTES_CEILING;
        if !(256..=ceiling).contains(&self.max_token_bytes) {
            return err(format!("max_token_bytes must be between 256 and {ceiling}"));
        }
        if self.cache.hash_memo_entries.saturating_mul(self.max_token_bytes) > MAX_HASH_MEMO_BYTES {
            return err(format!(
                "cache.hash_memo_entries x max_token_bytes must be at most {MAX_HASH_MEMO_BYTES} \
                 (the tokens each worker's hash memo may hold)"
            ));
        }
        Ok(())
    }
}

/// What every callout target has (an Envoy cluster, an `:authority`, a path
/// for HTTP endpoints, a timeout), checked one way for every section.
pub(crate) struct Endpoint<'a> {
    pub section: &'a str,
    pub cluster: &'a str,
    pub authority: &'a str,
    pub path: Option<&'a str>,
    pub timeout_ms: u64,
}

impl Endpoint<'_> {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let section = self.section;
        // These become headers of callouts: a control character would make
        // every callout fail instead of the configuration.
        for (key, value) in
            [("cluster", self.cluster), ("authority", self.authority), ("path", self.path.unwrap_or(""))]
        {
            if value.bytes().any(|b| b < 0x20 || b == 0x7f) {
                return err(format!("{section}.{key} must not contain control characters"));
            }
        }
        if self.cluster.trim().is_empty() {
            return err(format!("{section}.cluster must not be empty"));
        }
        if self.authority.trim().is_empty() {
            return err(format!("{section}.authority must not be empty"));
        }
        if self.path.is_some_and(|p| !p.starts_with('/')) {
            return err(format!("{section}.path must start with '/'"));
        }
        if self.timeout_ms == 0 || self.timeout_ms > 60_000 {
            return err(format!("{section}.timeout_ms must be between 1 and 60000 (0 would mean no timeout)"));
        }
        Ok(())
    }
}

/// `client_secret_basic` needs both halves.
fn validate_client(section: &str, id: &Option<String>, secret: &Option<String>) -> Result<(), ConfigError> {
    if id.is_some() != secret.is_some() {
        return err(format!(
            "{section}.client_id and {section}.client_secret go together (client_secret may come from client_secret_env)"
        ));
    }
    Ok(())
}

impl Introspection {
    fn validate(&self) -> Result<(), ConfigError> {
        let (cluster, authority, path) = (&self.cluster, &self.authority, Some(self.path.as_str()));
        Endpoint { section: "introspection", cluster, authority, path, timeout_ms: self.timeout_ms }.validate()?;
        validate_client("introspection", &self.client_id, &self.client_secret)?;
        if self.max_response_bytes == 0 || self.max_response_bytes > 1024 * 1024 {
            return err("introspection.max_response_bytes must be between 1 and 1048576");
        }
        Ok(())
    }
}

impl RevocationEndpoint {
    fn validate(&self) -> Result<(), ConfigError> {
        let (cluster, authority, path) = (&self.cluster, &self.authority, Some(self.path.as_str()));
        Endpoint { section: "revocation_endpoint", cluster, authority, path, timeout_ms: self.timeout_ms }
            .validate()?;
        validate_client("revocation_endpoint", &self.client_id, &self.client_secret)
    }
}

impl Cache {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_entries == 0 || self.max_entries > 10_000_000 {
            return err("cache.max_entries must be between 1 and 10000000");
        }
        if self.max_ttl_s > 86_400 {
            return err("cache.max_ttl_s must be at most 86400");
        }
        if self.negative_ttl_s > 3600 {
            return err("cache.negative_ttl_s must be at most 3600");
        }
        if self.stale_if_error_s > 86_400 {
            return err("cache.stale_if_error_s must be at most 86400");
        }
        if self.local_entries > 1_000_000 {
            return err("cache.local_entries must be at most 1000000");
        }
        if self.hash_memo_entries > 65_536 {
            return err("cache.hash_memo_entries must be at most 65536");
        }
        if self.max_entry_bytes < 256 || self.max_entry_bytes > 65_536 {
            return err("cache.max_entry_bytes must be between 256 and 65536");
        }
        Ok(())
    }
}

impl Admin {
    fn validate(&self) -> Result<(), ConfigError> {
        let prefix = &self.path_prefix;
        if !prefix.starts_with('/')
            || prefix.len() < 2
            || prefix.ends_with('/')
            || prefix.contains("//")
            || !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b))
        {
            return err("admin.path_prefix must look like \"/tokengate\" (letters, digits, - _ . and inner /)");
        }
        let hashes = &self.token_sha256.0;
        if hashes.is_empty() || hashes.len() > MAX_ADMIN_TOKENS {
            return err(format!("admin.token_sha256 must list 1 to {MAX_ADMIN_TOKENS} hashes"));
        }
        if hashes.iter().any(|h| h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit())) {
            return err("admin.token_sha256 must be the 64 hex digits of the admin token's SHA-256");
        }
        if self.max_body_bytes < 1024 || self.max_body_bytes > 64 * 1024 * 1024 {
            return err("admin.max_body_bytes must be between 1024 and 67108864");
        }
        if self.max_bulk_tokens == 0 || self.max_bulk_tokens > 1_000_000 {
            return err("admin.max_bulk_tokens must be between 1 and 1000000");
        }
        Ok(())
    }
}

impl Denylist {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_tokens == 0 || self.max_tokens > 10_000_000 {
            return err("denylist.max_tokens must be between 1 and 10000000");
        }
        if self.max_principals == 0 || self.max_principals > 100_000 {
            return err("denylist.max_principals must be between 1 and 100000");
        }
        const TEN_YEARS_S: u64 = 10 * 365 * 86_400;
        if !(1..=TEN_YEARS_S).contains(&self.token_ttl_s) || !(1..=TEN_YEARS_S).contains(&self.principal_ttl_s) {
            return err("denylist.token_ttl_s and denylist.principal_ttl_s must be between 1 and 315360000");
        }
        if self.clock_skew_s > MAX_CLOCK_SKEW_S {
            return err(format!("denylist.clock_skew_s must be at most {MAX_CLOCK_SKEW_S}"));
        }
        Ok(())
    }
}

impl ClusterSync {
    fn validate(&self) -> Result<(), ConfigError> {
        let (cluster, authority) = (&self.cluster, &self.authority);
        Endpoint { section: "cluster_sync", cluster, authority, path: None, timeout_ms: self.timeout_ms }.validate()?;
        if self.prefix.is_empty() || !self.prefix.ends_with('/') || self.prefix.chars().any(char::is_control) {
            return err("cluster_sync.prefix must be non-empty and end with '/'");
        }
        if !(50..=60_000).contains(&self.poll_ms) {
            return err("cluster_sync.poll_ms must be between 50 and 60000");
        }
        if self.max_outbox == 0 || self.max_outbox > 1_000_000 {
            return err("cluster_sync.max_outbox must be between 1 and 1000000");
        }
        self.validate_initial_sync()
    }
}

/// An RFC 6749 §3.3 scope token (for `required_scopes` and the rules).
pub fn is_scope_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_scope_char)
}

/// Most token bytes one worker's hash memo may hold (65536 tokens of 4 KiB).
const MAX_HASH_MEMO_BYTES: usize = 256 * 1024 * 1024;

/// RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
fn is_scope_char(b: u8) -> bool {
    b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b)
}

/// Lower-case RFC 7230 token, as Envoy stores header names.
fn is_header_name(h: &str) -> bool {
    !h.is_empty() && h.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"introspection": {"cluster": "idp", "authority": "idp.local", "path": "/introspect"}}"#;

    fn error_of(json: &str) -> String {
        Config::parse(json.as_bytes()).unwrap_err().0
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL.as_bytes()).unwrap();
        assert_eq!(c.introspection.as_ref().unwrap().timeout_ms, 2000);
        assert_eq!(c.introspection.as_ref().unwrap().token_type_hint, "access_token");
        assert_eq!(c.cache.max_ttl_s, 300);
        assert_eq!(c.cache.negative_ttl_s, 5);
        assert_eq!(c.cache.max_entries, 100_000);
        assert!(c.required_scopes.is_empty());
        assert_eq!(c.claims_to_headers.get("sub").map(String::as_str), Some("x-auth-subject"));
        assert!(!c.hide_credentials);
        assert_eq!(c.realm, "tokengate");
        assert_eq!(c.denylist.clock_skew_s, 60);
        assert_eq!(c.max_token_bytes, 4096);
    }

    #[test]
    fn client_secret_can_come_from_the_vm_environment() {
        let json = |extra: &str| {
            format!(
                r#"{{"introspection": {{"cluster": "idp", "authority": "a", "path": "/i", "client_id": "gw"{extra}}},
                    "revocation_endpoint": {{"cluster": "idp", "authority": "a", "path": "/r", "client_id": "gw",
                                             "client_secret_env": "REVOKE_SECRET"}}}}"#
            )
        };
        let env = |name: &str| match name {
            "INTROSPECT_SECRET" => Some("s3cret".to_string()),
            "REVOKE_SECRET" => Some("other".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        let parse = |extra: &str| Config::parse_with_env(json(extra).as_bytes(), &env).map_err(|e| e.0);
        let c = parse(r#", "client_secret_env": "INTROSPECT_SECRET""#).unwrap();
        assert_eq!(c.introspection.as_ref().unwrap().client_secret.as_deref(), Some("s3cret"));
        assert_eq!(c.revocation_endpoint.unwrap().client_secret.as_deref(), Some("other"));
        let inline = parse(r#", "client_secret": "inline""#).unwrap();
        assert_eq!(inline.introspection.as_ref().unwrap().client_secret.as_deref(), Some("inline"));
        for (extra, says) in [
            (r#", "client_secret_env": "MISSING""#, "\"MISSING\", which is not set"),
            (r#", "client_secret_env": "EMPTY""#, "\"EMPTY\", which is not set"),
            (r#", "client_secret": "x", "client_secret_env": "INTROSPECT_SECRET""#, "not both"),
            ("", "go together"),
        ] {
            let e = parse(extra).unwrap_err();
            assert!(e.contains(says), "{extra}: {e}");
            assert!(!e.contains("s3cret"), "a secret in an error: {e}");
        }
    }

    #[test]
    fn admin_token_sha256_is_one_hash_or_a_list() {
        let (a, b) = ("a".repeat(64), "B".repeat(64));
        let admin = |value: &str| {
            let json = format!(
                r#"{{"introspection": {{"cluster": "c", "authority": "a", "path": "/i"}}, "admin": {{"token_sha256": {value}}}}}"#
            );
            Config::parse(json.as_bytes()).map(|c| c.admin.map(|a| a.token_sha256)).map_err(|e| e.0)
        };
        assert_eq!(admin(&format!("{a:?}")).unwrap(), Some(AdminTokenHashes::new([a.clone()])));
        assert_eq!(admin(&format!("[{a:?}, {b:?}]")).unwrap(), Some(AdminTokenHashes::new([a.clone(), b.clone()])));
        let nine = vec![format!("{a:?}"); 9].join(", ");
        assert!(admin(&format!("[{nine}]")).unwrap_err().contains("1 to 8"));
        assert!(admin(&format!("[{a:?}, \"00\"]")).unwrap_err().contains("64 hex digits"));
    }

    #[test]
    fn shipped_config_parses() {
        let text = include_str!("../envoy/tokengate.json");
        let c = Config::parse(text.as_bytes()).unwrap();
        assert_eq!(c.required_scopes, vec!["read".to_string()]);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = error_of(r#"{"introspection": {"cluster": "idp", "authority": "a", "path": "/i", "timeout": 5}}"#);
        assert!(e.contains("unknown field `timeout`"), "{e}");
        let e = error_of(r#"{"introspection": {"cluster": "idp", "authority": "a", "path": "/i"}, "scopes": []}"#);
        assert!(e.contains("unknown field `scopes`"), "{e}");
    }

    #[test]
    fn missing_required_keys_are_named() {
        assert!(
            error_of(r#"{"introspection": {"cluster": "idp", "path": "/i"}}"#).contains("missing field `authority`")
        );
        assert!(error_of("{}").contains("`introspection` is required unless `jwt`"));
        assert!(error_of("").contains("empty"));
        assert!(error_of("not json").contains("expected"));
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (r#""cluster": "", "authority": "a", "path": "/i""#, "introspection.cluster"),
            (r#""cluster": "c", "authority": "a", "path": "i""#, "introspection.path"),
            (r#""cluster": "c", "authority": "a", "path": "/i", "timeout_ms": 0"#, "introspection.timeout_ms"),
            (r#""cluster": "c", "authority": "a", "path": "/i", "client_id": "x""#, "client_secret"),
        ];
        for (inner, key) in cases {
            let e = error_of(&format!(r#"{{"introspection": {{{inner}}}}}"#));
            assert!(e.contains(key), "{inner}: {e}");
        }
        let base = r#""introspection": {"cluster": "c", "authority": "a", "path": "/i"}"#;
        let cases = [
            (r#""cache": {"max_entries": 0}"#, "cache.max_entries"),
            (r#""cache": {"hash_memo_entries": 65537}"#, "cache.hash_memo_entries must be at most 65536"),
            (r#""required_scopes": ["a b"]"#, "required_scopes"),
            (r#""audiences": []"#, "audiences: must list"),
            (r#""issuers": [""]"#, "issuers: must list"),
            (r#""rules": [{"match": {"path": "/a/{id"}}]"#, "rules[0].match.path"),
            (r#""rules": [{"match": {"path": "/a"}, "require": {"scopes": ["é"]}}]"#, "rules[0].require"),
            (r#""rules": [{"match": {"path": "/a"}, "when": 1}]"#, "unknown field `when`"),
            (r#""claims_to_headers": {"sub": "X-Sub"}"#, "claims_to_headers.sub"),
            (r#""claims_to_headers": {"sub": "authorization"}"#, "reserved"),
            (r#""realm": "a\"b""#, "realm"),
            (r#""max_token_bytes": 255"#, "max_token_bytes must be between 256 and 61440"),
            (r#""max_token_bytes": 61441"#, "max_token_bytes must be between 256 and 61440"),
            (
                r#""max_token_bytes": 61440, "cache": {"hash_memo_entries": 4370}"#,
                "cache.hash_memo_entries x max_token_bytes",
            ),
            (r#""hide_credentials": "yes""#, "invalid type"),
            (r#""admin": {"token_sha256": "abc"}"#, "admin.token_sha256"),
            (r#""admin": {"token_sha256": []}"#, "admin.token_sha256 must list 1 to 8"),
            (r#""admin": {"token_sha256": 7}"#, "admin.token_sha256 must be a hex SHA-256 string or a list"),
            (r#""admin": {"path_prefix": "/a/", "token_sha256": "00"}"#, "admin.path_prefix"),
            (r#""admin": {"path": "/a"}"#, "unknown field `path`"),
            (r#""denylist": {"max_tokens": 0}"#, "denylist.max_tokens"),
            (r#""denylist": {"clock_skew_s": 3601}"#, "denylist.clock_skew_s"),
            (r#""denylist": {"clock_skew_s": -1}"#, "invalid value"),
            (r#""cluster_sync": {"cluster": "etcd", "authority": "e", "prefix": "x"}"#, "cluster_sync.prefix"),
            (r#""cluster_sync": {"cluster": "etcd", "authority": "e", "poll_ms": 1}"#, "cluster_sync.poll_ms"),
            (r#""cluster_sync": {"cluster": "e", "authority": "e", "initial_sync_timeout_s": 86401}"#, "at most 86400"),
            (
                r#""cluster_sync": {"cluster": "e", "authority": "e", "require_initial_sync": false, "initial_sync_timeout_s": 5}"#,
                "require_initial_sync, which is off",
            ),
            (r#""revocation_endpoint": {"cluster": "idp", "authority": "a", "path": "x"}"#, "revocation_endpoint"),
        ];
        for (extra, key) in cases {
            let e = error_of(&format!("{{{base}, {extra}}}"));
            assert!(e.contains(key), "{extra}: {e}");
        }
    }

    /// Found by fuzz/config: a CR, LF or other control character in a value
    /// that becomes a header of the introspection callout (`path`,
    /// `authority`) is accepted, and the callout can then never be sent:
    /// every request gets 503 instead of the plugin refusing its configuration.
    #[test]
    fn control_characters_in_callout_headers_are_refused() {
        for inner in [
            r#""cluster": "c", "authority": "a", "path": "/i\r\nx: y""#,
            r#""cluster": "c", "authority": "a\nb", "path": "/i""#,
            r#""cluster": "c", "authority": "a", "path": "/i\u0000""#,
        ] {
            let json = format!(r#"{{"introspection": {{{inner}}}}}"#);
            assert!(Config::parse(json.as_bytes()).is_err(), "{json}");
        }
    }
}
