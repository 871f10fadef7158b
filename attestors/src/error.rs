//! The one error type every attestor returns. Variants name the PID or the
//! /proc file involved, so a failed attestation can be diagnosed from the log
//! line alone.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The pinned process exited (or its PID now names someone else); anything
    /// read about it must be thrown away. Also: no process had the PID when
    /// it was to be pinned.
    #[error("process {pid} is not running (it has exited, or no process has that PID)")]
    ProcessGone { pid: i32 },

    #[error("PID {pid} is not a valid process id (must be positive)")]
    InvalidPid { pid: i32 },

    #[error("the pidfd given for PID {expected} refers to PID {actual}")]
    PidfdMismatch { expected: i32, actual: i32 },

    #[error("pidfd_open({pid}) failed: {source}")]
    PidfdOpen { pid: i32, source: io::Error },

    #[error("reading {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },

    #[error("parsing {}: {detail}", path.display())]
    Parse { path: PathBuf, detail: String },

    #[error("invalid attestor configuration: {0}")]
    Config(String),
}

impl AttestError {
    /// Whether the failure is writ running short of a resource (file
    /// descriptors, memory) rather than anything about the process: the
    /// same request may succeed once the resource is back.
    pub fn is_resource_exhaustion(&self) -> bool {
        let source = match self {
            AttestError::PidfdOpen { source, .. } | AttestError::Io { source, .. } => source,
            _ => return false,
        };
        matches!(
            source.raw_os_error(),
            Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE || code == nix::libc::ENOMEM
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_resource_exhaustion() {
        let io = |code| AttestError::Io {
            path: PathBuf::from("/proc/1/stat"),
            source: io::Error::from_raw_os_error(code),
        };
        assert!(io(nix::libc::EMFILE).is_resource_exhaustion());
        assert!(io(nix::libc::ENFILE).is_resource_exhaustion());
        assert!(!io(nix::libc::ENOENT).is_resource_exhaustion());
        assert!(!AttestError::ProcessGone { pid: 1 }.is_resource_exhaustion());
    }
}
