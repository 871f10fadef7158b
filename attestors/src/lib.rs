//! writ-attestors: turns a pinned process into selectors, and nothing else.
//! Who is calling (the socket, the pidfd) is the agent's business; what a
//! caller may receive is decided from these selectors elsewhere.

pub mod attestor;
pub mod cgroup;
pub mod container;
pub mod error;
pub mod excerpt;
pub mod mountinfo;
pub mod process;
mod procfs;
pub mod selector;
pub mod snapshot;
pub mod systemd;
pub mod unix;

pub use attestor::{Attestation, Attestor, AttestorConfig, AttestorSet};
pub use cgroup::{CgroupAttestor, CgroupConfig, TrustedRoots};
pub use container::{ContainerAttestor, ContainerInfo, container_from_cgroup_path};
pub use error::AttestError;
pub use excerpt::{EXCERPT_CHARS, Excerpt, Unshowable, excerpt, find_unshowable};
pub use mountinfo::{Cgroup2Mount, find_cgroup2_mount, parse_cgroup2_mounts};
pub use process::{
    PinnedProcess, ancestors, descends_from, is_descendant_of, namespace_of, parent_of,
};
pub use selector::{Selector, SelectorError};
pub use snapshot::{Credentials, ProcessSnapshot, read_credentials, read_snapshot};
pub use systemd::{SystemdAttestor, SystemdPlacement, systemd_placement};
pub use unix::{UnixAttestor, UnixConfig};
