//! cgroup attestor and the trusted-root rule shared by every attestor that
//! reads meaning into a cgroup path. Only subtrees administered by root are
//! trusted: elsewhere an unprivileged user can create look-alike names.

use std::path::PathBuf;
use std::sync::Arc;

use crate::attestor::Attestor;
use crate::error::AttestError;
use crate::process::PinnedProcess;
use crate::selector::{Selector, is_normalized_path};
use crate::snapshot::ProcessSnapshot;

pub const DEFAULT_TRUSTED_ROOTS: [&str; 6] = [
    "/system.slice",
    "/writ.slice",
    "/machine.slice",
    "/kubepods.slice",
    "/kubepods",
    "/docker",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupConfig {
    /// cgroup v2 subtrees whose names only root can choose. A process outside
    /// all of them gets no cgroup, systemd or container selectors.
    pub trusted_roots: Vec<String>,
    /// Where cgroup2 is mounted; `None` discovers it from mountinfo.
    pub mount: Option<PathBuf>,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        Self {
            trusted_roots: DEFAULT_TRUSTED_ROOTS
                .iter()
                .map(|r| (*r).to_owned())
                .collect(),
            mount: None,
        }
    }
}

/// The validated set of trusted cgroup roots.
#[derive(Debug, Clone)]
pub struct TrustedRoots {
    roots: Arc<[String]>,
}

impl TrustedRoots {
    pub fn new<S: AsRef<str>>(roots: &[S]) -> Result<Self, AttestError> {
        let mut validated: Vec<String> = Vec::with_capacity(roots.len());
        for root in roots {
            let root = root.as_ref();
            if !is_normalized_path(root) {
                return Err(AttestError::Config(format!(
                    "trusted cgroup root {root:?} must be an absolute cgroup path \
                     without empty, '.' or '..' components or a trailing '/'"
                )));
            }
            if !validated.iter().any(|r| r == root) {
                validated.push(root.to_owned());
            }
        }
        Ok(Self {
            roots: validated.into(),
        })
    }

    pub fn roots(&self) -> &[String] {
        &self.roots
    }

    /// The outermost trusted root that `path` lies under, comparing whole
    /// segments (`/system.slice2` is not under `/system.slice`). `None` for
    /// untrusted or malformed paths.
    pub fn root_of(&self, path: &str) -> Option<&str> {
        if !is_normalized_path(path) {
            return None;
        }
        self.roots
            .iter()
            .filter(|root| is_under(path, root))
            .min_by_key(|root| root.len())
            .map(String::as_str)
    }

    /// The snapshot's cgroup path if it lies under a trusted root.
    pub fn trusted_path<'a>(&self, snapshot: &'a ProcessSnapshot) -> Option<(&'a str, &str)> {
        let path = snapshot.cgroup_path.as_deref()?;
        self.root_of(path).map(|root| (path, root))
    }
}

/// Whole-segment prefix test.
pub fn is_under(path: &str, root: &str) -> bool {
    if root == "/" {
        return path.starts_with('/');
    }
    path.strip_prefix(root)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `path` and each ancestor down to and including `root`, innermost first.
/// `root` must be one `path` lies under.
pub fn path_and_ancestors<'a>(path: &'a str, root: &str) -> impl Iterator<Item = &'a str> {
    let stop_len = root.len();
    let mut next = Some(path);
    std::iter::from_fn(move || {
        let current = next?;
        next = if current.len() <= stop_len {
            None
        } else {
            match current.rfind('/') {
                Some(0) => Some("/"),
                Some(cut) => Some(&current[..cut]),
                None => None,
            }
        };
        Some(current)
    })
}

/// Emits `cgroup:path:<p>` for the process's cgroup and each ancestor down to
/// its trusted root, so an entry naming a cgroup matches its whole subtree by
/// exact string comparison, anchored at the hierarchy root.
#[derive(Debug, Clone)]
pub struct CgroupAttestor {
    roots: TrustedRoots,
}

impl CgroupAttestor {
    pub fn new(roots: TrustedRoots) -> Self {
        Self { roots }
    }
}

impl Attestor for CgroupAttestor {
    fn name(&self) -> &'static str {
        "cgroup"
    }

    fn attest(
        &self,
        _process: &PinnedProcess,
        snapshot: &ProcessSnapshot,
        out: &mut Vec<Selector>,
    ) -> Result<(), AttestError> {
        if let Some((path, root)) = self.roots.trusted_path(snapshot) {
            out.extend(
                path_and_ancestors(path, root)
                    .map(|p| Selector::new("cgroup", format!("path:{p}"))),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> TrustedRoots {
        TrustedRoots::new(&CgroupConfig::default().trusted_roots).unwrap()
    }

    #[test]
    fn whole_segment_prefixes_only() {
        let roots = defaults();
        assert_eq!(roots.root_of("/system.slice"), Some("/system.slice"));
        assert_eq!(
            roots.root_of("/system.slice/x.service"),
            Some("/system.slice")
        );
        assert_eq!(roots.root_of("/system.slice2/x.service"), None);
        assert_eq!(
            roots.root_of("/user.slice/user-1000.slice/system.slice/x.service"),
            None
        );
        assert_eq!(roots.root_of("/kubepods/burstable"), Some("/kubepods"));
        assert_eq!(roots.root_of("/kubepodsx"), None);
        assert_eq!(roots.root_of("/"), None);
    }

    #[test]
    fn malformed_paths_are_never_trusted() {
        let roots = defaults();
        for path in [
            "system.slice/x.service",
            "/system.slice/",
            "/system.slice//x",
            "/system.slice/../user.slice",
            "/system.slice/./x",
            "/system.slice/x\u{1b}.service",
            "",
        ] {
            assert_eq!(roots.root_of(path), None, "{path:?}");
        }
    }

    #[test]
    fn outermost_root_wins() {
        let roots = TrustedRoots::new(&["/a/b", "/a", "/a"]).unwrap();
        assert_eq!(roots.roots(), ["/a/b", "/a"]);
        assert_eq!(roots.root_of("/a/b/c"), Some("/a"));
    }

    #[test]
    fn bad_roots_are_config_errors() {
        for root in ["", "relative", "/a/", "/a//b", "/a/..", "/a/\n"] {
            assert!(
                matches!(TrustedRoots::new(&[root]), Err(AttestError::Config(_))),
                "{root:?}"
            );
        }
    }

    #[test]
    fn ancestors_stop_at_the_root() {
        let got: Vec<_> =
            path_and_ancestors("/system.slice/a.service/sub", "/system.slice").collect();
        assert_eq!(
            got,
            [
                "/system.slice/a.service/sub",
                "/system.slice/a.service",
                "/system.slice"
            ]
        );
        let only: Vec<_> = path_and_ancestors("/docker", "/docker").collect();
        assert_eq!(only, ["/docker"]);
        let from_slash: Vec<_> = path_and_ancestors("/a/b", "/").collect();
        assert_eq!(from_slash, ["/a/b", "/a", "/"]);
    }
}
