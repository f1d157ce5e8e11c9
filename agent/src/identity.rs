//! SPIFFE identities. Knows nothing of TLS: policy and cluster code depend on this module only.
//!
//! Parsing follows the SPIFFE ID specification
//! (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>): scheme `spiffe`,
//! a trust domain of lowercase letters, digits, `.`, `-` and `_`, and an optional path of
//! non-empty segments of letters, digits, `.`, `-` and `_`, none of them `.` or `..`.

pub mod ca;
pub mod store;
pub mod svid;

use std::fmt;

/// The longest SPIFFE ID accepted, in bytes (the specification's limit for URI SANs).
pub const MAX_ID_LEN: usize = 2048;
/// The longest trust domain accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("empty SPIFFE ID")]
    Empty,
    #[error("SPIFFE ID is {len} bytes long; the limit is {MAX_ID_LEN}")]
    TooLong { len: usize },
    #[error("scheme must be `spiffe://`")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain is {len} bytes long; the limit is {MAX_TRUST_DOMAIN_LEN}")]
    TrustDomainTooLong { len: usize },
    #[error(
        "trust domain has the character {ch:?} at byte {pos}; only lowercase letters, digits, `.`, `-` and `_` are allowed"
    )]
    BadTrustDomainChar { ch: char, pos: usize },
    #[error(
        "a SPIFFE ID may not carry a port, user info, query or fragment ({ch:?} at byte {pos})"
    )]
    ForbiddenPart { ch: char, pos: usize },
    #[error("path has an empty segment (`//`) at byte {pos}")]
    EmptySegment { pos: usize },
    #[error("path ends with `/`")]
    TrailingSlash,
    #[error("path segment `{segment}` is not allowed (`.` and `..` are relative references)")]
    DotSegment { segment: String },
    #[error(
        "path has the character {ch:?} at byte {pos}; only letters, digits, `.`, `-` and `_` are allowed"
    )]
    BadPathChar { ch: char, pos: usize },
}

/// A validated SPIFFE ID such as `spiffe://cluster.local/ns/default/sa/web`. Cloning shares the
/// text: cluster state holds one per workload, and the pods of a service account share theirs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: std::sync::Arc<str>,
    /// Byte offset where the path starts (== `id.len()` when there is none).
    path_start: usize,
}

const SCHEME: &str = "spiffe://";

fn trust_domain_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

fn path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

/// Checks a trust domain name on its own (as written in configuration).
pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong { len: td.len() });
    }
    for (pos, ch) in td.char_indices() {
        if matches!(ch, ':' | '@' | '?' | '#') {
            return Err(SpiffeIdError::ForbiddenPart { ch, pos });
        }
        if !trust_domain_char(ch) {
            return Err(SpiffeIdError::BadTrustDomainChar { ch, pos });
        }
    }
    Ok(())
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: s.len() });
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let td_end = rest.find('/').unwrap_or(rest.len());
        validate_trust_domain(&rest[..td_end]).map_err(|e| shift(e, SCHEME.len()))?;
        let path_start = SCHEME.len() + td_end;
        let path = &s[path_start..];
        if !path.is_empty() {
            if path.ends_with('/') {
                return Err(SpiffeIdError::TrailingSlash);
            }
            let mut offset = path_start + 1;
            for segment in path[1..].split('/') {
                if segment.is_empty() {
                    return Err(SpiffeIdError::EmptySegment { pos: offset });
                }
                if segment == "." || segment == ".." {
                    return Err(SpiffeIdError::DotSegment {
                        segment: segment.to_owned(),
                    });
                }
                for (i, ch) in segment.char_indices() {
                    if matches!(ch, '?' | '#') {
                        return Err(SpiffeIdError::ForbiddenPart {
                            ch,
                            pos: offset + i,
                        });
                    }
                    if !path_char(ch) {
                        return Err(SpiffeIdError::BadPathChar {
                            ch,
                            pos: offset + i,
                        });
                    }
                }
                offset += segment.len() + 1;
            }
        }
        Ok(Self {
            id: s.into(),
            path_start,
        })
    }

    /// The identity Kubernetes workloads get: `spiffe://<td>/ns/<namespace>/sa/<account>`.
    pub fn for_service_account(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!(
            "{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..self.path_start]
    }

    #[cfg(test)]
    #[must_use]
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The text, shared (for indexes keyed by it).
    #[must_use]
    pub fn shared(&self) -> &std::sync::Arc<str> {
        &self.id
    }
}

fn shift(e: SpiffeIdError, by: usize) -> SpiffeIdError {
    match e {
        SpiffeIdError::BadTrustDomainChar { ch, pos } => {
            SpiffeIdError::BadTrustDomainChar { ch, pos: pos + by }
        }
        SpiffeIdError::ForbiddenPart { ch, pos } => {
            SpiffeIdError::ForbiddenPart { ch, pos: pos + by }
        }
        other => other,
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_parse_and_print_unchanged() {
        for s in [
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/default/sa/web",
            "spiffe://a-b_c.example/x/Y.z-_/1",
        ] {
            let id = SpiffeId::parse(s).unwrap();
            assert_eq!(id.to_string(), s);
        }
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        assert_eq!(id.trust_domain(), "td");
        assert_eq!(id.path(), "/ns/a/sa/b");
        assert_eq!(SpiffeId::for_service_account("td", "a", "b").unwrap(), id);
    }

    #[test]
    fn invalid_ids_are_rejected_with_their_defect() {
        use SpiffeIdError as E;
        let long = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        let long_td = format!("spiffe://{}", "a".repeat(256));
        let cases: &[(&str, E)] = &[
            ("", E::Empty),
            ("http://td/a", E::WrongScheme),
            ("SPIFFE://td/a", E::WrongScheme),
            ("spiffe:/td/a", E::WrongScheme),
            ("spiffe://", E::MissingTrustDomain),
            ("spiffe:///a", E::MissingTrustDomain),
            (
                "spiffe://Cluster.local",
                E::BadTrustDomainChar { ch: 'C', pos: 9 },
            ),
            ("spiffe://td:8080/a", E::ForbiddenPart { ch: ':', pos: 11 }),
            ("spiffe://user@td/a", E::ForbiddenPart { ch: '@', pos: 13 }),
            ("spiffe://td/a?x=1", E::ForbiddenPart { ch: '?', pos: 13 }),
            ("spiffe://td/a#f", E::ForbiddenPart { ch: '#', pos: 13 }),
            ("spiffe://td/a//b", E::EmptySegment { pos: 14 }),
            ("spiffe://td/a/", E::TrailingSlash),
            ("spiffe://td/", E::TrailingSlash),
            (
                "spiffe://td/a/./b",
                E::DotSegment {
                    segment: ".".into(),
                },
            ),
            (
                "spiffe://td/..",
                E::DotSegment {
                    segment: "..".into(),
                },
            ),
            ("spiffe://td/a%20b", E::BadPathChar { ch: '%', pos: 13 }),
            ("spiffe://td/ä", E::BadPathChar { ch: 'ä', pos: 12 }),
            (&long, E::TooLong { len: long.len() }),
            (&long_td, E::TrustDomainTooLong { len: 256 }),
        ];
        for (input, want) in cases {
            assert_eq!(
                SpiffeId::parse(input).as_ref(),
                Err(want),
                "input {input:?}"
            );
        }
    }
}
