//! The facts about the running user that writ's defaults depend on (uid,
//! name, home and XDG directories), gathered once so tests can inject them,
//! and the default paths derived from them.

use std::path::{Path, PathBuf};

/// Who writ runs as, and where that user keeps state and runtime files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    pub uid: u32,
    pub user_name: String,
    pub home: Option<PathBuf>,
    pub xdg_state_home: Option<PathBuf>,
    pub xdg_runtime_dir: Option<PathBuf>,
}

impl Environment {
    /// Reads the real uid, the user's name and home from the password
    /// database, and `HOME`, `XDG_STATE_HOME`, `XDG_RUNTIME_DIR`.
    pub fn current() -> Environment {
        let uid = nix::unistd::getuid();
        // A uid without a passwd entry (common in containers) is still a
        // valid user; it just has no name, so the number stands in for one.
        let user = nix::unistd::User::from_uid(uid).ok().flatten();
        let user_name = user
            .as_ref()
            .map(|user| user.name.clone())
            .unwrap_or_else(|| uid.as_raw().to_string());
        let home = env_path("HOME").or_else(|| user.map(|user| user.dir));
        Environment {
            uid: uid.as_raw(),
            user_name,
            home,
            xdg_state_home: env_path("XDG_STATE_HOME"),
            xdg_runtime_dir: env_path("XDG_RUNTIME_DIR"),
        }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// `/var/lib/writ` for root; otherwise `$XDG_STATE_HOME/writ`, then
    /// `$HOME/.local/state/writ`, then `/tmp/writ-<uid>` for a user with no
    /// home at all (the service must then insist the directory is its own).
    pub fn default_data_dir(&self) -> PathBuf {
        if self.is_root() {
            return PathBuf::from("/var/lib/writ");
        }
        if let Some(state) = absolute(self.xdg_state_home.as_deref()) {
            return state.join("writ");
        }
        if let Some(home) = absolute(self.home.as_deref()) {
            return home.join(".local/state/writ");
        }
        PathBuf::from(format!("/tmp/writ-{}", self.uid))
    }

    /// Where the sockets go when the config does not say: `/run/writ` for
    /// root, `$XDG_RUNTIME_DIR/writ` otherwise, else `<data_dir>/run`. It
    /// takes the data_dir actually in use, so a config that moves data_dir
    /// also moves the fallback socket directory.
    pub fn default_socket_dir(&self, data_dir: &Path) -> PathBuf {
        if self.is_root() {
            return PathBuf::from("/run/writ");
        }
        match absolute(self.xdg_runtime_dir.as_deref()) {
            Some(runtime) => runtime.join("writ"),
            None => data_dir.join("run"),
        }
    }
}

/// The XDG base directory spec says relative values are invalid and must be
/// ignored; the same holds for an empty HOME.
fn absolute(path: Option<&Path>) -> Option<&Path> {
    path.filter(|path| path.is_absolute())
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .filter(|path| path.is_absolute())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(xdg_state: Option<&str>, home: Option<&str>, runtime: Option<&str>) -> Environment {
        Environment {
            uid: 1000,
            user_name: "alice".into(),
            home: home.map(PathBuf::from),
            xdg_state_home: xdg_state.map(PathBuf::from),
            xdg_runtime_dir: runtime.map(PathBuf::from),
        }
    }

    #[test]
    fn current_reports_the_real_uid() {
        let env = Environment::current();
        assert_eq!(env.uid, nix::unistd::getuid().as_raw());
        assert!(!env.user_name.is_empty());
    }

    #[test]
    fn root_uses_system_paths_whatever_xdg_says() {
        let mut env = user(Some("/x/state"), Some("/root"), Some("/run/user/0"));
        env.uid = 0;
        let data_dir = env.default_data_dir();
        assert_eq!(data_dir, Path::new("/var/lib/writ"));
        assert_eq!(env.default_socket_dir(&data_dir), Path::new("/run/writ"));
    }

    #[test]
    fn user_paths_follow_xdg_then_home_then_data_dir() {
        let env = user(
            Some("/x/state"),
            Some("/home/alice"),
            Some("/run/user/1000"),
        );
        assert_eq!(env.default_data_dir(), Path::new("/x/state/writ"));
        assert_eq!(
            env.default_socket_dir(Path::new("/x/state/writ")),
            Path::new("/run/user/1000/writ")
        );

        let env = user(None, Some("/home/alice"), None);
        let data_dir = env.default_data_dir();
        assert_eq!(data_dir, Path::new("/home/alice/.local/state/writ"));
        assert_eq!(
            env.default_socket_dir(&data_dir),
            Path::new("/home/alice/.local/state/writ/run")
        );

        // Relative XDG values are invalid per the spec and are skipped.
        let env = user(Some("state"), Some("/home/alice"), Some("run"));
        let data_dir = env.default_data_dir();
        assert_eq!(data_dir, Path::new("/home/alice/.local/state/writ"));
        assert_eq!(
            env.default_socket_dir(&data_dir),
            Path::new("/home/alice/.local/state/writ/run")
        );

        let env = user(None, None, None);
        assert_eq!(env.default_data_dir(), Path::new("/tmp/writ-1000"));
    }
}
