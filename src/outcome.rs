//! Every way a request can end, in one place: the status code, the RFC 6750
//! challenge, the JSON body and the counter all come from `Denial`.

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No bearer credential (or another scheme): 401, bare challenge.
    MissingToken,
    /// A malformed credential: 400 `invalid_request`.
    InvalidRequest(&'static str),
    /// Unknown, inactive, expired or not yet valid: 401 `invalid_token`.
    InvalidToken(&'static str),
    /// On the denylist: 401 `invalid_token`, counted apart.
    Revoked,
    /// Active, but issued for another API (`audiences`): 401 `invalid_token`, counted apart.
    InvalidAudience,
    /// Active, but from an issuer not in `issuers`: 401 `invalid_token`, counted apart.
    InvalidIssuer,
    /// Active, but without every required scope: 403 `insufficient_scope`.
    InsufficientScope(String),
    /// The authorization server could not give a usable answer: 503, fail closed.
    IdpUnavailable(&'static str),
    /// Cluster sync has not yet loaded the revocations made elsewhere: 503.
    DenylistLoading,
}

/// The pieces of a local reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub challenge: Option<String>,
    pub body: String,
}

impl Denial {
    /// Short name used in counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::MissingToken => "missing_token",
            Denial::InvalidRequest(_) => "invalid_request",
            Denial::InvalidToken(_) => "invalid_token",
            Denial::Revoked => "revoked",
            Denial::InvalidAudience => "invalid_audience",
            Denial::InvalidIssuer => "invalid_issuer",
            Denial::InsufficientScope(_) => "insufficient_scope",
            Denial::IdpUnavailable(_) => "idp_unavailable",
            Denial::DenylistLoading => "denylist_loading",
        }
    }

    pub fn reply(&self, realm: &str) -> Reply {
        let (status, code, description) = match self {
            Denial::MissingToken => (401, None, "a bearer token is required"),
            Denial::InvalidRequest(d) => (400, Some("invalid_request"), *d),
            Denial::InvalidToken(d) => (401, Some("invalid_token"), *d),
            Denial::Revoked => (401, Some("invalid_token"), "the token has been revoked"),
            Denial::InvalidAudience => (401, Some("invalid_token"), "the token is not meant for this audience"),
            Denial::InvalidIssuer => (401, Some("invalid_token"), "the token's issuer is not trusted here"),
            Denial::InsufficientScope(_) => (403, Some("insufficient_scope"), "the token lacks a required scope"),
            Denial::IdpUnavailable(d) => (503, None, *d),
            Denial::DenylistLoading => (503, None, "revocations are still loading from the cluster"),
        };
        let challenge = match (self, code) {
            (Denial::IdpUnavailable(_) | Denial::DenylistLoading, _) => None,
            (_, None) => Some(format!("Bearer realm=\"{realm}\"")),
            (Denial::InsufficientScope(scope), Some(code)) => Some(format!(
                "Bearer realm=\"{realm}\", error=\"{code}\", error_description=\"{description}\", scope=\"{scope}\""
            )),
            (_, Some(code)) => {
                Some(format!("Bearer realm=\"{realm}\", error=\"{code}\", error_description=\"{description}\""))
            }
        };
        let error = match self {
            Denial::MissingToken => "unauthorized",
            Denial::IdpUnavailable(_) | Denial::DenylistLoading => "temporarily_unavailable",
            _ => code.unwrap_or("unauthorized"),
        };
        Reply { status, challenge, body: json_error(error, description) }
    }
}

/// `{"error": …, "error_description": …}`, the body of every local reply.
pub fn json_error(error: &str, description: &str) -> String {
    serde_json::json!({"error": error, "error_description": description}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_token_has_bare_challenge() {
        let r = Denial::MissingToken.reply("api");
        assert_eq!(r.status, 401);
        assert_eq!(r.challenge.as_deref(), Some("Bearer realm=\"api\""));
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["error"], "unauthorized");
    }

    #[test]
    fn each_denial_has_its_status_and_code() {
        let cases = [
            (Denial::InvalidRequest("x"), 400, "error=\"invalid_request\""),
            (Denial::InvalidToken("x"), 401, "error=\"invalid_token\""),
            (Denial::Revoked, 401, "error=\"invalid_token\""),
            (Denial::InvalidAudience, 401, "error_description=\"the token is not meant for this audience\""),
            (Denial::InvalidIssuer, 401, "error_description=\"the token's issuer is not trusted here\""),
            (Denial::InsufficientScope("read write".into()), 403, "scope=\"read write\""),
        ];
        for (d, status, needle) in cases {
            let r = d.reply("tokengate");
            assert_eq!(r.status, status, "{d:?}");
            assert!(r.challenge.unwrap().contains(needle), "{d:?}");
        }
    }

    #[test]
    fn idp_failure_is_503_without_challenge() {
        let r = Denial::IdpUnavailable("the authorization server timed out").reply("tokengate");
        assert_eq!(r.status, 503);
        assert_eq!(r.challenge, None);
        assert!(r.body.contains("temporarily_unavailable"));
    }
}
