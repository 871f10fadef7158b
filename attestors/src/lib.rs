//! writ-attestors: turns a pinned process into selectors, and nothing else.
//! Who is calling (the socket, the pidfd) is the agent's business; what a
//! caller may receive is decided from these selectors elsewhere.

pub mod selector;

pub use selector::{Selector, SelectorError};
