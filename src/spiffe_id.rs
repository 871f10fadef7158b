//! SPIFFE IDs and trust domain names, parsed and validated per the SPIFFE ID
//! specification. Every other module takes these typed values rather than
//! strings, so an identity that reached them has already been checked.

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "spiffe://";
/// The spec caps trust domain names at 255 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// The spec asks implementations to support IDs of at least 2048 bytes; we
/// accept exactly that much, which also bounds what a caller can make us store.
const MAX_SPIFFE_ID_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID must start with \"spiffe://\" (scheme is lowercase)")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error(
        "trust domain contains {0:?}: only lowercase letters, digits, '.', '-' and '_' are allowed"
    )]
    BadTrustDomainChar(char),
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("path has an empty segment (\"//\" or a trailing \"/\")")]
    EmptySegment,
    #[error("path has a \".\" or \"..\" segment")]
    DotSegment,
    #[error("path contains {0:?}: only letters, digits, '.', '-' and '_' are allowed in segments")]
    BadPathChar(char),
    #[error("SPIFFE ID is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error("expected a trust domain ID without a path")]
    UnexpectedPath,
}

/// A trust domain name such as `example.org` (no scheme, no path).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Accepts a bare name (`example.org`) or a trust domain ID
    /// (`spiffe://example.org`), as SPIRE's configuration does.
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        let bare = match name.strip_prefix(SCHEME) {
            Some(rest) => {
                if rest.contains('/') {
                    return Err(SpiffeIdError::UnexpectedPath);
                }
                rest
            }
            None => name,
        };
        validate_trust_domain(bare)?;
        Ok(Self(bare.to_owned()))
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// `spiffe://<name>`, the key used for bundle maps on the Workload API.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }

    /// Builds `spiffe://<td><path>` from a path that must start with '/'.
    pub fn spiffe_id(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::from_parts(self.clone(), path)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A SPIFFE ID: `spiffe://<trust domain><path>`; the path may be empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    path: String,
}

impl SpiffeId {
    fn from_parts(trust_domain: TrustDomain, path: &str) -> Result<Self, SpiffeIdError> {
        validate_path(path)?;
        if SCHEME.len() + trust_domain.0.len() + path.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        Ok(Self {
            trust_domain,
            path: path.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, starting with '/', or empty for a trust domain ID.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Appends one or more segments (`"task/t-42"`), validating them.
    pub fn join(&self, segments: &str) -> Result<SpiffeId, SpiffeIdError> {
        let path = format!("{}/{}", self.path, segments);
        Self::from_parts(self.trust_domain.clone(), &path)
    }

    pub fn is_trust_domain_id(&self) -> bool {
        self.path.is_empty()
    }

    /// Whether this ID is `ancestor` or lies below it, segment by segment:
    /// `/a/b` is below `/a`, but `/ab` is not (a string prefix is not a
    /// path prefix). Every ID of a trust domain is at or below its trust
    /// domain ID.
    pub fn is_at_or_below(&self, ancestor: &SpiffeId) -> bool {
        self.trust_domain == ancestor.trust_domain
            && self
                .path
                .strip_prefix(ancestor.path.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain.0, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        Self::from_parts(TrustDomain(td.to_owned()), path)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    // Uppercase, ports (':'), userinfo ('@'), queries and fragments all fall
    // out here, since none of them is in the allowed set.
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(SpiffeIdError::BadTrustDomainChar(c)),
        None => Ok(()),
    }
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(body) = path.strip_prefix('/') else {
        // from_str splits at the first '/', so only join/spiffe_id get here.
        return Err(SpiffeIdError::EmptySegment);
    };
    for segment in body.split('/') {
        if segment.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(SpiffeIdError::BadPathChar(c));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_or_below_goes_by_whole_path_segments() {
        let id = |s: &str| s.parse::<SpiffeId>().unwrap();
        let task = id("spiffe://writ.test/root/task/t1");
        assert!(id("spiffe://writ.test/root/task/t1").is_at_or_below(&task));
        assert!(id("spiffe://writ.test/root/task/t1/task/x").is_at_or_below(&task));
        assert!(!id("spiffe://writ.test/root/task/t10").is_at_or_below(&task));
        assert!(!id("spiffe://writ.test/root/task").is_at_or_below(&task));
        assert!(!id("spiffe://other.test/root/task/t1/x").is_at_or_below(&task));
        assert!(task.is_at_or_below(&id("spiffe://writ.test")));
    }

    #[test]
    fn accepts_valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/agent/researcher",
            "spiffe://a_b-c.d/A.b-C_9/x",
            "spiffe://writ.test/agent/r/task/01JBX",
        ] {
            let id: SpiffeId = s.parse().unwrap();
            assert_eq!(id.to_string(), s);
        }
    }

    #[test]
    fn rejects_invalid_ids_with_the_reason() {
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", SpiffeIdError::Empty),
            ("http://example.org/a", SpiffeIdError::WrongScheme),
            ("SPIFFE://example.org/a", SpiffeIdError::WrongScheme),
            ("spiffe:///a", SpiffeIdError::MissingTrustDomain),
            (
                "spiffe://Example.org/a",
                SpiffeIdError::BadTrustDomainChar('E'),
            ),
            (
                "spiffe://example.org:443/a",
                SpiffeIdError::BadTrustDomainChar(':'),
            ),
            (
                "spiffe://user@example.org/a",
                SpiffeIdError::BadTrustDomainChar('@'),
            ),
            ("spiffe://example.org/", SpiffeIdError::EmptySegment),
            ("spiffe://example.org//a", SpiffeIdError::EmptySegment),
            ("spiffe://example.org/a/", SpiffeIdError::EmptySegment),
            ("spiffe://example.org/a/./b", SpiffeIdError::DotSegment),
            ("spiffe://example.org/..", SpiffeIdError::DotSegment),
            (
                "spiffe://example.org/a%20b",
                SpiffeIdError::BadPathChar('%'),
            ),
            (
                "spiffe://example.org/a?x=1",
                SpiffeIdError::BadPathChar('?'),
            ),
            ("spiffe://example.org/a#f", SpiffeIdError::BadPathChar('#')),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<SpiffeId>().unwrap_err(), *want, "{input}");
        }
    }

    #[test]
    fn enforces_length_limits() {
        let long_td = "a".repeat(256);
        assert_eq!(
            TrustDomain::new(&long_td).unwrap_err(),
            SpiffeIdError::TrustDomainTooLong
        );
        let td = TrustDomain::new("example.org").unwrap();
        let ok_path = format!("/{}", "a".repeat(MAX_SPIFFE_ID_LEN - 9 - 11 - 1));
        assert_eq!(td.spiffe_id(&ok_path).unwrap().to_string().len(), 2048);
        let too_long = format!("{ok_path}b");
        assert_eq!(td.spiffe_id(&too_long).unwrap_err(), SpiffeIdError::TooLong);
    }

    #[test]
    fn trust_domain_accepts_bare_name_or_id() {
        assert_eq!(TrustDomain::new("spiffe://x.org").unwrap().name(), "x.org");
        assert_eq!(
            TrustDomain::new("x.org").unwrap().id_string(),
            "spiffe://x.org"
        );
        assert_eq!(
            TrustDomain::new("spiffe://x.org/a").unwrap_err(),
            SpiffeIdError::UnexpectedPath
        );
    }

    #[test]
    fn join_validates_segments() {
        let id: SpiffeId = "spiffe://x.org/agent/r".parse().unwrap();
        assert_eq!(
            id.join("task/t-42").unwrap().to_string(),
            "spiffe://x.org/agent/r/task/t-42"
        );
        assert_eq!(id.join("task/../x").unwrap_err(), SpiffeIdError::DotSegment);
        assert_eq!(id.join("").unwrap_err(), SpiffeIdError::EmptySegment);
    }
}
