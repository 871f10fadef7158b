//! The one place writ uses `unsafe`: handing file descriptors to tokio's
//! reactor, which (since tokio#8587) asks the caller to vouch for them, and
//! the syscalls neither nix nor rustix wraps (`sync_file_range`,
//! `sched_getscheduler`, `sched_setscheduler`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
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

/// Starts writing `len` bytes of `file` at `offset` back to the disk and
/// returns without waiting (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`).
/// It makes nothing durable: a later fdatasync still must, but finds less
/// left to do.
pub fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let too_far = || io::Error::new(io::ErrorKind::InvalidInput, "offset out of range");
    let offset = i64::try_from(offset).map_err(|_| too_far())?;
    let len = i64::try_from(len).map_err(|_| too_far())?;
    // SAFETY: sync_file_range reads only its integer arguments; the
    // descriptor is borrowed from `file`, which stays open for the call.
    let rc = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The scheduling policy of thread `tid` (0: the calling one), such as
/// `SCHED_OTHER` or `SCHED_BATCH`, with `SCHED_RESET_ON_FORK` if it is set.
pub fn scheduling_policy(tid: i32) -> io::Result<i32> {
    // SAFETY: sched_getscheduler takes an integer and touches no memory of
    // ours; an unknown or exited thread is reported through errno.
    let rc = unsafe { libc::sched_getscheduler(tid) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Moves thread `tid` (0: the calling one) to `policy` (which may carry `SCHED_RESET_ON_FORK`)
/// at static priority 0, the only one the non-realtime policies have.
pub fn set_scheduling_policy(tid: i32, policy: i32) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call, which
    // only reads it; the other arguments are integers.
    let rc = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
