//! Who may use the REST API, as typed settings parsed once with the
//! configuration: which requests need the API token (`WRS_AUTH_RESOURCES`,
//! [`AuthPolicy`]) and which browser origins CORS admits
//! (`WRS_CORS_ORIGINS`, [`CorsOrigins`]). Plain values with no HTTP types:
//! `crate::http` applies them, `crate::healthcheck` asks the policy too.

use std::str::FromStr;

use regex::Regex;

/// The methods a rule may name (case-insensitively), besides `*`.
const METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// One `METHOD:PATH_REGEX` entry.
#[derive(Clone, Debug)]
struct Rule {
    /// An entry of [`METHODS`]; `None` = any method.
    method: Option<&'static str>,
    /// The entry's regex, anchored at the start of the path.
    path: Regex,
}

/// Which requests need the API token: `WRS_AUTH_RESOURCES`, space-separated
/// `METHOD:PATH_REGEX` entries. METHOD is an HTTP method or `*`; the regex
/// must match from the start of the path but need not reach its end, so
/// `DELETE:/channels` covers `DELETE /channels/D679-05F5`. No entries means
/// everything (`*:.*`).
///
/// Cloning is cheap: compiled regexes are shared.
#[derive(Clone, Debug)]
pub struct AuthPolicy {
    rules: Vec<Rule>,
}

/// Why `WRS_AUTH_RESOURCES` cannot be used; names the bad entry.
#[derive(Debug, thiserror::Error)]
pub enum AuthPolicyError {
    #[error("{entry:?} is not METHOD:PATH_REGEX")]
    NotMethodAndPath { entry: String },
    #[error("{entry:?}: unknown method {method:?} (use one of {} or *)", METHODS.join(", "))]
    UnknownMethod { entry: String, method: String },
    #[error("{entry:?}: invalid path regex")]
    PathRegex {
        entry: String,
        #[source]
        source: regex::Error,
    },
}

impl FromStr for AuthPolicy {
    type Err = AuthPolicyError;

    fn from_str(resources: &str) -> Result<Self, Self::Err> {
        let entries: Vec<&str> = resources.split_whitespace().collect();
        let entries = if entries.is_empty() {
            vec!["*:.*"]
        } else {
            entries
        };
        let rules = entries
            .into_iter()
            .map(Rule::parse)
            .collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }
}

impl Rule {
    fn parse(entry: &str) -> Result<Self, AuthPolicyError> {
        let (method, path) =
            entry
                .split_once(':')
                .ok_or_else(|| AuthPolicyError::NotMethodAndPath {
                    entry: entry.to_owned(),
                })?;
        let method = match method {
            "*" => None,
            name => Some(
                METHODS
                    .into_iter()
                    .find(|known| known.eq_ignore_ascii_case(name))
                    .ok_or_else(|| AuthPolicyError::UnknownMethod {
                        entry: entry.to_owned(),
                        method: name.to_owned(),
                    })?,
            ),
        };
        let path =
            Regex::new(&format!("^(?:{path})")).map_err(|source| AuthPolicyError::PathRegex {
                entry: entry.to_owned(),
                source,
            })?;
        Ok(Self { method, path })
    }
}

impl AuthPolicy {
    /// Whether a request needs the API token. `method` is the request's
    /// method as sent (HTTP methods are case-sensitive: `GET`, not `get`).
    pub fn protects(&self, method: &str, path: &str) -> bool {
        self.rules
            .iter()
            .any(|rule| rule.method.is_none_or(|m| m == method) && rule.path.is_match(path))
    }
}

/// The origins CORS admits on the REST API: `WRS_CORS_ORIGINS`, `*` or a
/// comma-separated list such as `https://app.example, http://localhost:3000`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CorsOrigins {
    /// `*`: every origin.
    Any,
    /// Only these, each `http(s)://host[:port]` in visible ASCII; never
    /// empty when parsed.
    List(Vec<String>),
}

/// Why `WRS_CORS_ORIGINS` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CorsOriginsError {
    #[error("{0:?} is not an origin like https://app.example or http://localhost:3000")]
    NotAnOrigin(String),
    #[error("give * or at least one origin")]
    Empty,
}

impl FromStr for CorsOrigins {
    type Err = CorsOriginsError;

    fn from_str(origins: &str) -> Result<Self, Self::Err> {
        if origins.trim() == "*" {
            return Ok(Self::Any);
        }
        let list = origins
            .split(',')
            .map(str::trim)
            .filter(|origin| !origin.is_empty())
            .map(|origin| {
                if is_origin(origin) {
                    Ok(origin.to_owned())
                } else {
                    Err(CorsOriginsError::NotAnOrigin(origin.to_owned()))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if list.is_empty() {
            return Err(CorsOriginsError::Empty);
        }
        Ok(Self::List(list))
    }
}

/// `http://` or `https://`, then a host (and port) with no path; visible
/// ASCII only, as a browser's `Origin` header is.
fn is_origin(text: &str) -> bool {
    text.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme, "http" | "https")
            && !rest.is_empty()
            && rest.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(resources: &str) -> AuthPolicy {
        resources
            .parse()
            .unwrap_or_else(|e| panic!("{resources:?}: {e}"))
    }

    #[test]
    fn empty_protects_everything() {
        for resources in ["", "  \t "] {
            let p = policy(resources);
            for (method, path) in [
                ("GET", "/"),
                ("POST", "/channels"),
                ("DELETE", "/reset"),
                ("GET", "/healthz"),
            ] {
                assert!(p.protects(method, path), "{resources:?}: {method} {path}");
            }
        }
    }

    #[test]
    fn rules_match_method_and_path_prefix() {
        let p = policy("POST:/channels DELETE:/channels *:/cluster.* *:/reset");
        assert!(p.protects("POST", "/channels"));
        assert!(p.protects("DELETE", "/channels/D679-05F5"));
        assert!(p.protects("GET", "/cluster"));
        assert!(p.protects("DELETE", "/reset"));
        assert!(!p.protects("GET", "/channels"));
        assert!(!p.protects("GET", "/channels/D679-05F5/connect"));
        assert!(!p.protects("GET", "/service"));
        // Anchored at the start: a path merely containing the text is free.
        assert!(!p.protects("GET", "/docs/cluster"));
    }

    #[test]
    fn methods_are_case_insensitive_in_rules_and_checked() {
        let p = policy("get:/channels/.*/connect");
        assert!(p.protects("GET", "/channels/AB12-CD34/connect"));
        assert!(!p.protects("GET", "/channels/AB12-CD34"));
        assert!(!p.protects("POST", "/channels/AB12-CD34/connect"));
        // A request's method is matched as sent.
        assert!(!p.protects("get", "/channels/AB12-CD34/connect"));
    }

    #[test]
    fn bad_entries_are_named_in_the_error() {
        let error = |resources: &str| resources.parse::<AuthPolicy>().unwrap_err();
        assert!(matches!(
            error("POST:/channels FETCH:/x"),
            AuthPolicyError::UnknownMethod { entry, method } if entry == "FETCH:/x" && method == "FETCH"
        ));
        assert_eq!(
            error("FETCH:/x").to_string(),
            r#""FETCH:/x": unknown method "FETCH" (use one of GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS or *)"#
        );
        assert_eq!(
            error("GET/x").to_string(),
            r#""GET/x" is not METHOD:PATH_REGEX"#
        );
        let regex = error("GET:([");
        assert_eq!(regex.to_string(), r#""GET:([": invalid path regex"#);
        assert!(
            std::error::Error::source(&regex).is_some(),
            "keeps the regex error"
        );
    }

    #[test]
    fn cors_origins_are_any_or_a_list() {
        let parse = |text: &str| text.parse::<CorsOrigins>();
        assert_eq!(parse("*").unwrap(), CorsOrigins::Any);
        assert_eq!(parse(" * ").unwrap(), CorsOrigins::Any);
        assert_eq!(
            parse("https://a.example, http://b.example:3000,").unwrap(),
            CorsOrigins::List(vec![
                "https://a.example".to_owned(),
                "http://b.example:3000".to_owned()
            ])
        );
    }

    #[test]
    fn cors_origins_must_be_origins() {
        let error = |text: &str| text.parse::<CorsOrigins>().unwrap_err().to_string();
        assert_eq!(error(""), "give * or at least one origin");
        assert_eq!(error(" , "), "give * or at least one origin");
        assert_eq!(
            error("https://a.example, not a url"),
            r#""not a url" is not an origin like https://app.example or http://localhost:3000"#
        );
        for bad in [
            "*, https://a.example",
            "ftp://a.example",
            "https://",
            "https://a.example/",
            "https://a.example/app",
            "https://a b",
            "https://bücher.example",
        ] {
            assert!(
                matches!(
                    bad.parse::<CorsOrigins>(),
                    Err(CorsOriginsError::NotAnOrigin(_))
                ),
                "{bad:?} was accepted"
            );
        }
    }
}
