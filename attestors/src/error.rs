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
