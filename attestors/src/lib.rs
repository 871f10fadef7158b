//! writ-attestors: turns a pinned process into selectors, and nothing else.
//! Who is calling (the socket, the pidfd) is the agent's business; what a
//! caller may receive is decided from these selectors elsewhere.

pub mod error;
pub mod mountinfo;
pub mod process;
mod procfs;
pub mod selector;
pub mod snapshot;

pub use error::AttestError;
pub use mountinfo::{Cgroup2Mount, find_cgroup2_mount, parse_cgroup2_mounts};
pub use process::{PinnedProcess, is_descendant_of, parent_of};
pub use selector::{Selector, SelectorError};
pub use snapshot::{ProcessSnapshot, read_snapshot};
