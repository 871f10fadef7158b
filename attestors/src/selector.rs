//! Selectors: the `type:value` facts an attestor states about a process
//! (`unix:uid:1000`, `cgroup:path:/system.slice/x.service`). Registration
//! entries name the selectors a process must have to receive an identity.

use std::fmt;
use std::str::FromStr;

use crate::excerpt::excerpt;

/// One attested fact. `kind` is the attestor (`unix`, `cgroup`, `systemd`,
/// `container`); `value` is everything after the first ':' and may itself
/// contain ':' (`uid:1000`, `path:/a:b`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    kind: String,
    value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("selector {:?} must have the form type:key:value", excerpt(.0))]
    Malformed(String),
    #[error("selector type {:?} must be lowercase letters, digits or '_'", excerpt(.0))]
    BadKind(String),
    #[error("selector {:?} contains a control character", excerpt(.0))]
    ControlChar(String),
}

/// Every `type:key` writ's attestors produce, by type. A selector outside
/// these is no error to parse (a stored one stays readable), but no process
/// could ever carry it.
pub const PRODUCED: &[(&str, &[&str])] = &[
    (
        "unix",
        &[
            "uid",
            "user",
            "gid",
            "group",
            "supplementary_gid",
            "supplementary_group",
            "path",
            "sha256",
        ],
    ),
    ("cgroup", &["path"]),
    ("systemd", &["unit", "slice"]),
    ("container", &["id", "runtime", "pod_uid"]),
];

/// Absolute, no empty/`.`/`..` components, no trailing '/' (but "/"
/// itself), no control characters: the form the kernel writes a cgroup or
/// an executable's path in.
pub(crate) fn is_normalized_path(path: &str) -> bool {
    if path == "/" {
        return true;
    }
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    !path.chars().any(char::is_control)
        && rest
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Why a `type:key` selector's value is not one an attestor could produce,
/// for the keys whose values have one fixed form.
fn produced_form(kind: &str, key: &str, value: &str) -> Option<String> {
    let form = match (kind, key) {
        // The kernel's ids, in decimal: "007" or "+7" is never produced.
        ("unix", "uid" | "gid" | "supplementary_gid") => {
            if value.is_empty()
                || !value.bytes().all(|b| b.is_ascii_digit())
                || (value.len() > 1 && value.starts_with('0'))
            {
                "a decimal number without leading zeros"
            } else if value.parse::<u32>().is_err() {
                // Well formed but too big: saying "not a number" would
                // send the reader looking for a typo that is not there.
                return Some(format!(
                    "{} is out of range for a {kind}:{key} value (ids are at most {})",
                    excerpt(value),
                    u32::MAX
                ));
            } else {
                return None;
            }
        }
        ("unix", "sha256") => {
            let hex = value.len() == 64
                && value
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            if hex {
                return None;
            }
            "64 lowercase hex digits"
        }
        // Attestors read these paths from the kernel, which writes each in
        // one canonical form: "/a/./b", "/a/" or "/a//b" would never match.
        ("unix", "path") | ("cgroup", "path") => {
            if is_normalized_path(value) {
                return None;
            }
            "an absolute path without empty, '.' or '..' segments or a trailing '/'"
        }
        _ => return None,
    };
    Some(format!(
        "a {kind}:{key} value is {form}, as attestors produce it"
    ))
}

impl Selector {
    /// Why no process could ever carry this selector (a type or key no
    /// attestor produces, most likely a typo), or `None` if one could.
    pub fn unmatchable(&self) -> Option<String> {
        let key = self.value.split_once(':').map_or("", |(key, _)| key);
        let Some((_, keys)) = PRODUCED.iter().find(|(kind, _)| *kind == self.kind) else {
            let kinds: Vec<&str> = PRODUCED.iter().map(|(kind, _)| *kind).collect();
            return Some(format!(
                "selector {:?}: no attestor produces type {:?} (types: {})",
                excerpt(&self.to_string()),
                excerpt(&self.kind),
                kinds.join(", ")
            ));
        };
        if !keys.contains(&key) {
            return Some(format!(
                "selector {:?}: {} selectors have no key {:?} (keys: {})",
                excerpt(&self.to_string()),
                self.kind,
                excerpt(key),
                keys.join(", ")
            ));
        }
        let value = self.value.split_once(':').map_or("", |(_, value)| value);
        produced_form(&self.kind, key, value)
            .map(|why| format!("selector {:?}: {why}", excerpt(&self.to_string())))
    }

    pub fn new(kind: &str, value: impl Into<String>) -> Self {
        Self {
            kind: kind.to_owned(),
            value: value.into(),
        }
    }

    /// Shorthand for the common `kind:key:value` shape.
    pub fn with_key(kind: &str, key: &str, value: impl fmt::Display) -> Self {
        Self::new(kind, format!("{key}:{value}"))
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.chars().any(char::is_control) {
            return Err(SelectorError::ControlChar(s.to_owned()));
        }
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| SelectorError::Malformed(s.to_owned()))?;
        // Every selector writ's attestors produce is kind:key:value; demanding
        // the key here turns a typo like "unix:1000" into an error instead of
        // an entry that silently never matches.
        let (key, rest) = value
            .split_once(':')
            .ok_or_else(|| SelectorError::Malformed(s.to_owned()))?;
        if key.is_empty() || rest.is_empty() {
            return Err(SelectorError::Malformed(s.to_owned()));
        }
        if kind.is_empty()
            || !kind
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(SelectorError::BadKind(kind.to_owned()));
        }
        Ok(Self::new(kind, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_keeps_colons_in_value() {
        let s: Selector = "cgroup:path:/a:b/c.service".parse().unwrap();
        assert_eq!(s.kind(), "cgroup");
        assert_eq!(s.value(), "path:/a:b/c.service");
        assert_eq!(s.to_string(), "cgroup:path:/a:b/c.service");
        assert_eq!(
            Selector::with_key("unix", "uid", 1000).to_string(),
            "unix:uid:1000"
        );
    }

    #[test]
    fn only_what_an_attestor_produces_can_match() {
        let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        for good in [
            "unix:uid:0",
            "unix:gid:4294967295",
            "unix:supplementary_gid:27",
            &format!("unix:sha256:{digest}"),
            "unix:path:/usr/bin/python3 (deleted)",
            "unix:path:/opt/a..b/.x/...",
            "cgroup:path:/a",
            "cgroup:path:/",
            "systemd:slice:a.slice",
            "container:pod_uid:x",
        ] {
            let s: Selector = good.parse().unwrap();
            assert_eq!(s.unmatchable(), None, "{good}");
        }
        // A value of a form no attestor writes: the entry would never match.
        for (bad, form) in [
            ("unix:uid:abc", "a decimal number"),
            ("unix:uid:007", "without leading zeros"),
            ("unix:gid:-1", "a decimal number"),
            // Out of range is said as such, not as a malformed number.
            ("unix:uid:4294967296", "out of range"),
            ("unix:gid:99999999999999999999", "at most 4294967295"),
            ("unix:supplementary_gid:4294967296", "at most 4294967295"),
            ("unix:sha256:ab", "64 lowercase hex digits"),
            (
                &format!("unix:sha256:{}", digest.to_uppercase()),
                "64 lowercase hex",
            ),
            ("unix:path:usr/bin/python3", "an absolute path"),
            ("cgroup:path:system.slice/x.service", "an absolute path"),
            // Nor a path the kernel would write otherwise.
            ("unix:path:/a/../b", "'..' segments"),
            ("unix:path:/a/./b", "'.' or '..'"),
            ("unix:path:/usr/bin/", "a trailing '/'"),
            ("unix:path:/usr//bin/x", "empty"),
            ("cgroup:path:/system.slice/", "a trailing '/'"),
            ("cgroup:path:/a//b", "empty"),
            ("cgroup:path:/a/..", "'..' segments"),
        ] {
            let s: Selector = bad.parse().unwrap();
            let why = s.unmatchable().unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(why.contains(form) && why.contains(bad), "{why}");
        }
        let typo: Selector = "unix:usr:alice".parse().unwrap();
        let why = typo.unmatchable().unwrap();
        assert!(
            why.contains("no key \"usr\"") && why.contains("user"),
            "{why}"
        );
        let foreign: Selector = "k8s:ns:default".parse().unwrap();
        let why = foreign.unmatchable().unwrap();
        assert!(
            why.contains("type \"k8s\"") && why.contains("systemd"),
            "{why}"
        );
    }

    /// A refusal is sent as a gRPC status header: a value copied whole could
    /// make it larger than the client accepts.
    #[test]
    fn errors_show_a_long_selector_shortened() {
        let long = "9".repeat(20_000);
        for text in [
            format!("unix:{long}"),
            format!("unix:uid:{long}\u{1b}"),
            format!("K{long}:uid:1"),
        ] {
            let err = text.parse::<Selector>().unwrap_err().to_string();
            assert!(err.len() < 400 && err.contains("(20"), "{err}");
        }
        for text in [
            format!("unix:uid:{long}"),
            format!("unix:{long}:1"),
            format!("k{long}:uid:1"),
            format!("unix:path:{long}"),
        ] {
            let why = text.parse::<Selector>().unwrap().unmatchable().unwrap();
            assert!(why.len() < 800 && why.contains("bytes)"), "{why}");
        }
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "unix",
            "unix:1000",
            ":uid:1",
            "unix::1",
            "unix:uid:",
            "Unix:uid:1",
            "unix:uid:1\n",
        ] {
            assert!(bad.parse::<Selector>().is_err(), "{bad:?}");
        }
    }
}
