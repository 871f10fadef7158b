//! The `Attestor` trait and `AttestorSet`, which runs every attestor over one
//! snapshot and only then checks, through the pidfd, that the process it
//! read is still the pinned one.

use std::path::{Path, PathBuf};

use crate::cgroup::{CgroupAttestor, CgroupConfig, TrustedRoots};
use crate::container::ContainerAttestor;
use crate::error::AttestError;
use crate::mountinfo::find_cgroup2_mount;
use crate::process::PinnedProcess;
use crate::selector::Selector;
use crate::snapshot::{ProcessSnapshot, read_snapshot};
use crate::systemd::SystemdAttestor;
use crate::unix::{UnixAttestor, UnixConfig};

/// One source of selectors. Attestors work from the snapshot; they touch
/// /proc themselves only for what the snapshot cannot hold (the binary's
/// contents).
pub trait Attestor: Send + Sync {
    fn name(&self) -> &'static str;
    fn attest(
        &self,
        process: &PinnedProcess,
        snapshot: &ProcessSnapshot,
        out: &mut Vec<Selector>,
    ) -> Result<(), AttestError>;
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttestorConfig {
    pub unix: UnixConfig,
    pub cgroup: CgroupConfig,
}

/// What is known about a process, valid as of the pidfd check that ended
/// the attestation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attestation {
    pub snapshot: ProcessSnapshot,
    /// Sorted and free of duplicates.
    pub selectors: Vec<Selector>,
}

pub struct AttestorSet {
    attestors: Vec<Box<dyn Attestor>>,
    cgroup_mount: Option<PathBuf>,
}

impl std::fmt::Debug for AttestorSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttestorSet")
            .field(
                "attestors",
                &self.attestors.iter().map(|a| a.name()).collect::<Vec<_>>(),
            )
            .field("cgroup_mount", &self.cgroup_mount)
            .finish()
    }
}

impl AttestorSet {
    pub fn new(config: AttestorConfig) -> Result<Self, AttestError> {
        let roots = TrustedRoots::new(&config.cgroup.trusted_roots)?;
        let cgroup_mount = match config.cgroup.mount {
            Some(mount) => Some(mount),
            None => find_cgroup2_mount()?,
        };
        if cgroup_mount.is_none() {
            tracing::warn!("no cgroup2 mount found; cgroup-bound tasks cannot be watched");
        }
        Ok(Self {
            attestors: vec![
                Box::new(UnixAttestor::new(config.unix)),
                Box::new(CgroupAttestor::new(roots.clone())),
                Box::new(SystemdAttestor::new(roots.clone())),
                Box::new(ContainerAttestor::new(roots)),
            ],
            cgroup_mount,
        })
    }

    /// Reads the snapshot, runs every attestor, then confirms via the pidfd
    /// that the process is still alive. Alive at the end means alive
    /// throughout, so its PID was never reused and every read was about it;
    /// if it exited, everything is discarded and `ProcessGone` returned.
    pub fn attest(&self, process: &PinnedProcess) -> Result<Attestation, AttestError> {
        let snapshot = read_snapshot(process).map_err(|e| gone_if_exited(process, e))?;
        let mut selectors = Vec::with_capacity(16);
        for attestor in &self.attestors {
            attestor
                .attest(process, &snapshot, &mut selectors)
                .map_err(|e| gone_if_exited(process, e))?;
        }
        if process.has_exited() {
            return Err(AttestError::ProcessGone { pid: process.pid() });
        }
        selectors.sort_unstable();
        selectors.dedup();
        Ok(Attestation {
            snapshot,
            selectors,
        })
    }

    /// Where cgroup v2 is mounted, for watching `cgroup.events`.
    pub fn cgroup_mount(&self) -> Option<&Path> {
        self.cgroup_mount.as_deref()
    }
}

/// A read that failed because the process died is reported as such, not as
/// an I/O problem.
fn gone_if_exited(process: &PinnedProcess, error: AttestError) -> AttestError {
    if !matches!(error, AttestError::ProcessGone { .. }) && process.has_exited() {
        AttestError::ProcessGone { pid: process.pid() }
    } else {
        error
    }
}
