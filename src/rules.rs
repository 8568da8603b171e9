//! Per-route policy: which requirement a request must meet. The plugin's
//! `rules` (first match wins, on path and method), a route's own requirement
//! from Envoy's route metadata, and the top-level requirement for the rest;
//! then the check of an introspected token's scopes, audience and issuer.
//! Pure: the filter hands in the path, the method and the metadata it read.

use crate::config::is_scope_token;
use crate::introspection::Claims;
use crate::outcome::Denial;
use serde::Deserialize;
use std::rc::Rc;

/// Whether a request needs a token at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenMode {
    #[default]
    Required,
    /// No token passes as anonymous; a token present is checked as usual.
    Optional,
    /// Public: no token is asked for or looked at.
    None,
}

/// A requirement as written in `rules[].require` and in route metadata.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequireJson {
    #[serde(default)]
    pub token: TokenMode,
    /// Every one of these scopes.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// Any one of these sets of scopes, each granted whole.
    #[serde(default)]
    pub any_scopes: Option<Vec<Vec<String>>>,
    /// Override the top-level `audiences` / `issuers` for this route.
    #[serde(default)]
    pub audiences: Option<Vec<String>>,
    #[serde(default)]
    pub issuers: Option<Vec<String>>,
}

/// What a rule matches, as written in `rules[].match`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchJson {
    /// Exact path, or a template (`/orders/{id}`, `/orders/*`).
    #[serde(default)]
    pub path: Option<String>,
    /// Any path starting with these bytes (as Envoy's route `prefix`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Upper-case methods; none: every method.
    #[serde(default)]
    pub methods: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleJson {
    #[serde(rename = "match")]
    pub matcher: MatchJson,
    #[serde(default)]
    pub require: RequireJson,
}

/// A requirement, with the top-level audiences and issuers filled in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Requirement {
    pub token: TokenMode,
    /// Any one of these sets, each granted whole; empty: no scope needed.
    pub any_of: Vec<Vec<String>>,
    /// The token's `aud` must hold one of these (empty: not checked).
    pub audiences: Vec<String>,
    /// The token's `iss` must be one of these (empty: not checked).
    pub issuers: Vec<String>,
}

impl Requirement {
    /// Builds a requirement; `at` names the key in errors; the top level's
    /// audiences and issuers apply where the requirement names none.
    pub fn compile(json: &RequireJson, top: Option<&Requirement>, at: &str) -> Result<Requirement, String> {
        let any_of = match (&json.scopes, &json.any_scopes) {
            (Some(_), Some(_)) => return Err(format!("{at}: scopes and any_scopes do not go together")),
            (Some(all), None) => vec![all.clone()],
            (None, Some(sets)) if sets.is_empty() || sets.iter().any(Vec::is_empty) => {
                return Err(format!("{at}.any_scopes: every alternative must name at least one scope"))
            }
            (None, Some(sets)) => sets.clone(),
            (None, None) => Vec::new(),
        };
        for scope in any_of.iter().flatten() {
            if !is_scope_token(scope) {
                return Err(format!("{at}: {scope:?} is not a valid scope token (RFC 6749 §3.3)"));
            }
        }
        let listed = |name: &str, list: &Option<Vec<String>>, inherited: Vec<String>| match list {
            Some(l) if l.is_empty() || l.iter().any(|v| v.is_empty()) => {
                Err(format!("{}{name}: must list at least one non-empty value", key_prefix(at)))
            }
            Some(l) => Ok(l.clone()),
            None => Ok(inherited),
        };
        let audiences = listed("audiences", &json.audiences, top.map(|t| t.audiences.clone()).unwrap_or_default())?;
        let issuers = listed("issuers", &json.issuers, top.map(|t| t.issuers.clone()).unwrap_or_default())?;
        let names_more =
            json.scopes.is_some() || json.any_scopes.is_some() || json.audiences.is_some() || json.issuers.is_some();
        if json.token == TokenMode::None && names_more {
            return Err(format!("{at}: a public requirement (token \"none\") checks nothing else"));
        }
        Ok(Requirement { token: json.token, any_of, audiences, issuers })
    }

    /// Checks an active token's claims: issuer and audience (401), then scopes (403).
    pub fn check(&self, claims: &Claims) -> Result<(), Denial> {
        if !self.issuers.is_empty() && !claims.iss().is_some_and(|iss| self.issuers.iter().any(|i| i == iss)) {
            return Err(Denial::InvalidIssuer);
        }
        if !self.audiences.is_empty() && !claims.aud().iter().any(|a| self.audiences.contains(a)) {
            return Err(Denial::InvalidAudience);
        }
        if self.any_of.is_empty() {
            return Ok(());
        }
        let granted = claims.scope.as_deref().unwrap_or_default();
        let has = |s: &String| granted.split(' ').any(|g| g == s);
        if self.any_of.iter().any(|set| set.iter().all(has)) {
            return Ok(());
        }
        // RFC 6750's `scope` names what would do: the first alternative.
        Err(Denial::InsufficientScope(self.any_of.first().map(|s| s.join(" ")).unwrap_or_default()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `{name}`: one non-empty segment.
    Param,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PathMatch {
    Exact(String),
    Prefix(String),
    /// Segments after the leading `/`; `tail`: a trailing `/*` (one or more
    /// further segments, the empty one of `/orders/` included).
    Template {
        segments: Vec<Segment>,
        tail: bool,
    },
}

#[derive(Debug, Clone)]
struct Rule {
    path: PathMatch,
    methods: Vec<String>,
    require: Rc<Requirement>,
}

/// The compiled policy of one plugin configuration.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    pub default: Rc<Requirement>,
}

impl Policy {
    pub fn compile(rules: &[RuleJson], default: Requirement) -> Result<Policy, String> {
        let mut compiled = Vec::with_capacity(rules.len());
        for (i, rule) in rules.iter().enumerate() {
            let at = format!("rules[{i}]");
            let m = &rule.matcher;
            let path = match (&m.path, &m.prefix) {
                (Some(p), None) => compile_path(p, &format!("{at}.match.path"))?,
                (None, Some(p)) if p.starts_with('/') && !p.bytes().any(|b| b <= 0x20 || b == 0x7f || b == b'?') => {
                    PathMatch::Prefix(p.clone())
                }
                (None, Some(_)) => {
                    return Err(format!("{at}.match.prefix must start with '/' and hold no space or '?'"))
                }
                _ => return Err(format!("{at}.match needs exactly one of path and prefix")),
            };
            let methods = m.methods.clone().unwrap_or_default();
            if m.methods.is_some() && methods.is_empty() {
                return Err(format!("{at}.match.methods must not be empty (leave it out for every method)"));
            }
            if let Some(bad) = methods.iter().find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase())) {
                return Err(format!("{at}.match.methods: {bad:?} is not an upper-case method"));
            }
            let require = Requirement::compile(&rule.require, Some(&default), &format!("{at}.require"))?;
            compiled.push(Rule { path, methods, require: Rc::new(require) });
        }
        Ok(Policy { rules: compiled, default: Rc::new(default) })
    }

    pub fn has_rules(&self) -> bool {
        !self.rules.is_empty()
    }

    /// The requirement for a request: the first rule that matches, else the
    /// top level. `path` is `:path` (its query is ignored). A path that could
    /// reach the upstream as another path than the one matched is refused.
    pub fn requirement(&self, method: &[u8], path: &[u8]) -> Result<&Rc<Requirement>, Denial> {
        if self.rules.is_empty() {
            return Ok(&self.default);
        }
        let path = path.split(|&b| b == b'?' || b == b'#').next().unwrap_or_default();
        if let Some(why) = ambiguous(path) {
            return Err(Denial::InvalidRequest(why));
        }
        let rule = self.rules.iter().find(|r| {
            (r.methods.is_empty() || r.methods.iter().any(|m| m.as_bytes() == method)) && r.path.matches(path)
        });
        Ok(rule.map_or(&self.default, |r| &r.require))
    }
}

impl PathMatch {
    fn matches(&self, path: &[u8]) -> bool {
        match self {
            PathMatch::Exact(p) => path == p.as_bytes(),
            PathMatch::Prefix(p) => path.starts_with(p.as_bytes()),
            PathMatch::Template { segments, tail } => {
                let Some(rest) = path.strip_prefix(b"/") else {
                    return false;
                };
                let mut parts = rest.split(|&b| b == b'/');
                for segment in segments {
                    let Some(part) = parts.next() else {
                        return false;
                    };
                    let ok = match segment {
                        Segment::Literal(l) => part == l.as_bytes(),
                        Segment::Param => !part.is_empty(),
                    };
                    if !ok {
                        return false;
                    }
                }
                // With a tail, at least one more segment; without, none.
                parts.next().is_some() == *tail
            }
        }
    }
}

fn compile_path(p: &str, at: &str) -> Result<PathMatch, String> {
    let bad = || format!("{at}: {p:?} is not a path or a template like /orders/{{id}} or /orders/*");
    if !p.starts_with('/') || p.bytes().any(|b| b <= 0x20 || b == 0x7f || b == b'?' || b == b'#') {
        return Err(bad());
    }
    if !p.contains(['{', '}', '*']) {
        return Ok(PathMatch::Exact(p.to_string()));
    }
    let (body, tail) = match p.strip_suffix("/*") {
        Some(body) => (body, true),
        None => (p, false),
    };
    let mut segments = Vec::new();
    // "/*" alone: every path.
    if !body.is_empty() {
        for part in body.get(1..).unwrap_or_default().split('/') {
            let param = part.strip_prefix('{').and_then(|s| s.strip_suffix('}'));
            segments.push(match param {
                Some(name) if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
                    Segment::Param
                }
                Some(_) => return Err(bad()),
                None if part.contains(['{', '}', '*']) => return Err(bad()),
                None => Segment::Literal(part.to_string()),
            });
        }
    }
    Ok(PathMatch::Template { segments, tail })
}

/// Why a path could name another resource upstream than the one the rules
/// matched (an encoded slash or backslash, a dot segment), if it could.
fn ambiguous(path: &[u8]) -> Option<&'static str> {
    let lower = |i: usize| path.get(i).map(u8::to_ascii_lowercase);
    for (i, &b) in path.iter().enumerate() {
        if b == b'\\'
            || (b == b'%' && lower(i + 1) == Some(b'2') && lower(i + 2) == Some(b'f'))
            || (b == b'%' && lower(i + 1) == Some(b'5') && lower(i + 2) == Some(b'c'))
        {
            return Some("the path has an encoded slash or a backslash");
        }
    }
    let dot = |s: &[u8]| s == b"." || s == b".." || s.eq_ignore_ascii_case(b"%2e") || is_two_dots(s);
    if path.split(|&b| b == b'/').any(dot) {
        return Some("the path has a dot segment");
    }
    None
}

/// `..` with either dot percent-encoded.
fn is_two_dots(s: &[u8]) -> bool {
    let s = s.to_ascii_lowercase();
    matches!(s.as_slice(), b"%2e%2e" | b".%2e" | b"%2e.")
}

/// `at.` before a key, or nothing at the top level.
fn key_prefix(at: &str) -> String {
    if at.is_empty() {
        String::new()
    } else {
        format!("{at}.")
    }
}

/// A CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`
/// (a plain `OPTIONS` is not one).
pub fn is_preflight(method: &[u8], has_origin: bool, has_request_method: bool) -> bool {
    method == b"OPTIONS" && has_origin && has_request_method
}

/// Requirements read from route metadata, parsed once per distinct text.
#[derive(Debug, Default)]
pub struct RouteMemo {
    entries: Vec<(Vec<u8>, Rc<Requirement>)>,
}

/// Routes are few; past this many distinct texts the oldest is dropped.
const ROUTE_MEMO_ENTRIES: usize = 256;

impl RouteMemo {
    /// The requirement written as JSON in a route's metadata.
    pub fn get(&mut self, text: &[u8], top: &Requirement) -> Result<Rc<Requirement>, String> {
        if let Some((_, r)) = self.entries.iter().find(|(t, _)| t == text) {
            return Ok(r.clone());
        }
        let json: RequireJson =
            serde_json::from_slice(text).map_err(|e| format!("route metadata tokengate.require: {e}"))?;
        let require = Rc::new(Requirement::compile(&json, Some(top), "route metadata tokengate.require")?);
        if self.entries.len() >= ROUTE_MEMO_ENTRIES {
            self.entries.remove(0);
        }
        self.entries.push((text.to_vec(), require.clone()));
        Ok(require)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: &str, top_scopes: &[&str]) -> Policy {
        let rules: Vec<RuleJson> = serde_json::from_str(rules).unwrap();
        let top =
            Requirement { any_of: vec![top_scopes.iter().map(|s| s.to_string()).collect()], ..Default::default() };
        Policy::compile(&rules, top).unwrap()
    }

    fn error(rules: &str) -> String {
        match serde_json::from_str::<Vec<RuleJson>>(rules) {
            Err(e) => e.to_string(),
            Ok(r) => Policy::compile(&r, Requirement::default()).unwrap_err(),
        }
    }

    fn scopes(r: &Requirement) -> String {
        match r.token {
            TokenMode::None => "public".into(),
            TokenMode::Optional => {
                format!("optional:{}", r.any_of.iter().map(|s| s.join("+")).collect::<Vec<_>>().join("|"))
            }
            TokenMode::Required => r.any_of.iter().map(|s| s.join("+")).collect::<Vec<_>>().join("|"),
        }
    }

    const API: &str = r#"[
        {"match": {"path": "/healthz"}, "require": {"token": "none"}},
        {"match": {"prefix": "/.well-known/"}, "require": {"token": "none"}},
        {"match": {"path": "/orders/{id}", "methods": ["GET"]}, "require": {"scopes": ["orders:read"]}},
        {"match": {"path": "/orders", "methods": ["GET"]}, "require": {"scopes": ["orders:read"]}},
        {"match": {"path": "/orders", "methods": ["POST"]}, "require": {"any_scopes": [["orders:write"], ["admin"]]}},
        {"match": {"path": "/orders/*"}, "require": {"scopes": ["orders:admin"]}},
        {"match": {"path": "/catalog/*"}, "require": {"token": "optional"}}
    ]"#;

    #[test]
    fn first_matching_rule_wins_and_the_rest_get_the_top_level() {
        let p = policy(API, &["read"]);
        let cases: &[(&str, &str, &str)] = &[
            ("GET", "/healthz", "public"),
            ("POST", "/healthz", "public"),
            ("GET", "/healthz/", "read"),
            ("GET", "/healthz.", "read"),
            ("GET", "/Healthz", "read"),
            ("GET", "/healthz?probe=1", "public"),
            ("GET", "/.well-known/openid-configuration", "public"),
            ("GET", "/.well-known", "read"),
            ("GET", "/orders/42", "orders:read"),
            ("GET", "/orders/42?x=/", "orders:read"),
            ("DELETE", "/orders/42", "orders:admin"),
            ("GET", "/orders/", "orders:admin"),
            ("GET", "/orders/42/items", "orders:admin"),
            ("GET", "/orders", "orders:read"),
            ("POST", "/orders", "orders:write|admin"),
            ("PUT", "/orders", "read"),
            ("get", "/orders", "read"),
            ("GET", "/ordersX", "read"),
            ("GET", "/catalog/1", "optional:"),
            ("GET", "/", "read"),
        ];
        for (method, path, want) in cases {
            let got = p.requirement(method.as_bytes(), path.as_bytes()).unwrap();
            assert_eq!(scopes(got), *want, "{method} {path}");
        }
    }

    #[test]
    fn paths_that_could_mean_another_resource_are_refused() {
        let p = policy(API, &["read"]);
        for path in [
            "/.well-known/..%2Forders",
            "/.well-known/%2e%2e/orders",
            "/.well-known/../orders",
            "/orders/1%2f2",
            "/orders/1%5C2",
            "/a\\b",
            "/./healthz",
            "/x/.%2E/orders",
        ] {
            assert!(matches!(p.requirement(b"GET", path.as_bytes()), Err(Denial::InvalidRequest(_))), "{path}");
        }
        // Dots inside a segment are ordinary, and the query is not the path.
        assert!(p.requirement(b"GET", b"/orders/v1.2").is_ok());
        assert!(p.requirement(b"GET", b"/orders/1?next=..%2F").is_ok());
        // Without rules nothing is matched, so nothing is refused.
        assert!(policy("[]", &[]).requirement(b"GET", b"/a/../b").is_ok());
    }

    #[test]
    fn templates() {
        let p = policy(
            r#"[{"match": {"path": "/a/{x}/b"}, "require": {"scopes": ["one"]}},
                {"match": {"path": "/*"}, "require": {"scopes": ["all"]}}]"#,
            &["top"],
        );
        for (path, want) in [("/a/1/b", "one"), ("/a//b", "all"), ("/a/1/b/", "all"), ("/a/1", "all"), ("/", "all")] {
            assert_eq!(scopes(p.requirement(b"GET", path.as_bytes()).unwrap()), want, "{path}");
        }
        assert_eq!(scopes(p.requirement(b"GET", b"").unwrap()), "top");
    }

    #[test]
    fn configuration_errors_name_the_key() {
        for (rules, says) in [
            (r#"[{"match": {"path": "/a"}, "require": {"scope": ["x"]}}]"#, "unknown field `scope`"),
            (r#"[{"match": {"pth": "/a"}}]"#, "unknown field `pth`"),
            (r#"[{"match": {}}]"#, "rules[0].match needs exactly one of path and prefix"),
            (r#"[{"match": {"path": "/a", "prefix": "/a"}}]"#, "rules[0].match needs exactly one"),
            (r#"[{"match": {"path": "/a/{id"}}]"#, "rules[0].match.path"),
            (r#"[{"match": {"path": "/a/*/b"}}]"#, "rules[0].match.path"),
            (r#"[{"match": {"path": "/a/x{id}"}}]"#, "rules[0].match.path"),
            (r#"[{"match": {"path": "a"}}]"#, "rules[0].match.path"),
            (r#"[{"match": {"prefix": "a"}}]"#, "rules[0].match.prefix"),
            (r#"[{"match": {"path": "/a", "methods": []}}]"#, "rules[0].match.methods"),
            (r#"[{"match": {"path": "/a", "methods": ["get"]}}]"#, "rules[0].match.methods"),
            (
                r#"[{"match": {"path": "/a"}}, {"match": {"path": "/b"}, "require": {"scopes": ["a b"]}}]"#,
                "rules[1].require",
            ),
            (r#"[{"match": {"path": "/a"}, "require": {"scopes": ["a\"b"]}}]"#, "not a valid scope token"),
            (r#"[{"match": {"path": "/a"}, "require": {"any_scopes": [[]]}}]"#, "rules[0].require.any_scopes"),
            (
                r#"[{"match": {"path": "/a"}, "require": {"scopes": ["a"], "any_scopes": [["b"]]}}]"#,
                "do not go together",
            ),
            (r#"[{"match": {"path": "/a"}, "require": {"token": "none", "scopes": ["a"]}}]"#, "checks nothing else"),
            (r#"[{"match": {"path": "/a"}, "require": {"token": "maybe"}}]"#, "unknown variant `maybe`"),
            (r#"[{"match": {"path": "/a"}, "require": {"audiences": []}}]"#, "rules[0].require.audiences"),
        ] {
            let e = error(rules);
            assert!(e.contains(says), "{rules}: {e}");
        }
    }

    fn claims(scope: &str, aud: &[&str], iss: Option<&str>) -> Claims {
        let issued = crate::introspection::Issued {
            iss: iss.map(str::to_string),
            aud: aud.iter().map(|a| a.to_string()).collect(),
        };
        Claims { scope: Some(scope.into()), issued: Some(Box::new(issued)), ..Default::default() }
    }

    #[test]
    fn issuer_and_audience_are_checked_before_scopes() {
        let top = Requirement {
            audiences: vec!["orders-api".into()],
            issuers: vec!["https://idp".into()],
            ..Default::default()
        };
        let json: RequireJson = serde_json::from_str(r#"{"scopes": ["orders:read"]}"#).unwrap();
        let r = Requirement::compile(&json, Some(&top), "x").unwrap();
        let ok = claims("orders:read", &["other", "orders-api"], Some("https://idp"));
        assert_eq!(r.check(&ok), Ok(()));
        assert_eq!(r.check(&claims("orders:read", &["other"], Some("https://idp"))), Err(Denial::InvalidAudience));
        assert_eq!(r.check(&claims("orders:read", &[], Some("https://idp"))), Err(Denial::InvalidAudience));
        assert_eq!(r.check(&claims("", &["orders-api"], Some("https://evil"))), Err(Denial::InvalidIssuer));
        assert_eq!(r.check(&claims("", &["orders-api"], None)), Err(Denial::InvalidIssuer));
        assert_eq!(
            r.check(&claims("orders", &["orders-api"], Some("https://idp"))),
            Err(Denial::InsufficientScope("orders:read".into()))
        );
        // A rule's own audiences replace the top level's.
        let json: RequireJson = serde_json::from_str(r#"{"audiences": ["billing"]}"#).unwrap();
        let r = Requirement::compile(&json, Some(&top), "x").unwrap();
        assert_eq!(r.check(&claims("", &["billing"], Some("https://idp"))), Ok(()));
        assert_eq!(r.check(&ok), Err(Denial::InvalidAudience));
    }

    #[test]
    fn any_one_alternative_is_enough() {
        let p = policy(API, &[]);
        let r = p.requirement(b"POST", b"/orders").unwrap();
        assert_eq!(r.check(&claims("admin", &[], None)), Ok(()));
        assert_eq!(r.check(&claims("orders:write x", &[], None)), Ok(()));
        assert_eq!(r.check(&claims("orders:read", &[], None)), Err(Denial::InsufficientScope("orders:write".into())));
    }

    #[test]
    fn preflight_is_options_with_origin_and_request_method() {
        assert!(is_preflight(b"OPTIONS", true, true));
        assert!(!is_preflight(b"OPTIONS", true, false));
        assert!(!is_preflight(b"OPTIONS", false, true));
        assert!(!is_preflight(b"GET", true, true));
    }

    #[test]
    fn route_metadata_is_parsed_once_and_errors_are_named() {
        let mut memo = RouteMemo::default();
        let top = Requirement { issuers: vec!["https://idp".into()], ..Default::default() };
        let a = memo.get(br#"{"scopes": ["orders:read"]}"#, &top).unwrap();
        let b = memo.get(br#"{"scopes": ["orders:read"]}"#, &top).unwrap();
        assert!(Rc::ptr_eq(&a, &b));
        assert_eq!(a.issuers, vec!["https://idp".to_string()]);
        assert!(memo.get(br#"{"scope": []}"#, &top).unwrap_err().contains("unknown field `scope`"));
        for i in 0..(ROUTE_MEMO_ENTRIES + 10) {
            memo.get(format!(r#"{{"scopes": ["s{i}"]}}"#).as_bytes(), &top).unwrap();
        }
        assert_eq!(memo.entries.len(), ROUTE_MEMO_ENTRIES);
    }
}
