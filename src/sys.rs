//! The one place writ uses `unsafe`: handing file descriptors to tokio's
//! reactor, which (since tokio#8587) asks the caller to vouch for them.

use std::io;
use std::os::fd::OwnedFd;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Registers `fd` with the reactor for readiness notifications.
pub fn async_fd(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: tokio requires the descriptor to stay open and name the same
    // file description for the AsyncFd's whole life. We move an OwnedFd into
    // the AsyncFd: nothing else can close or replace it, and its raw value
    // never changes until the AsyncFd drops it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}
