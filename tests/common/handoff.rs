//! Passing a connected socket between processes (SCM_RIGHTS), so a test can
//! hold a connection whose kernel-recorded peer is another process.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};

/// Sends `fd` over a fresh connection to the listener at `handoff`.
pub fn send_fd(handoff: &Path, fd: impl AsFd) {
    let carrier = UnixStream::connect(handoff).unwrap();
    let fds = [fd.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
    sendmsg(
        &carrier,
        &[IoSlice::new(b"x")],
        &mut control,
        SendFlags::empty(),
    )
    .unwrap();
}

/// Accepts one connection on `listener` and returns the fd it carries.
pub fn recv_fd(listener: &UnixListener) -> OwnedFd {
    let (carrier, _) = listener.accept().unwrap();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    recvmsg(
        &carrier,
        &mut [std::io::IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::empty(),
    )
    .unwrap();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = message
            && let Some(fd) = fds.next()
        {
            return fd;
        }
    }
    panic!("no file descriptor received");
}

/// A gRPC channel over one already-connected socket, such as one received
/// with `recv_fd`: writ sees whoever connected it as the peer, not the test.
pub async fn channel_over(
    fd: OwnedFd,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let std_stream = UnixStream::from(fd);
    std_stream.set_nonblocking(true).unwrap();
    let slot = std::sync::Mutex::new(Some(std_stream));
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let taken = slot.lock().unwrap().take();
            async move {
                let s = taken.ok_or_else(|| std::io::Error::other("connection already used"))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::from_std(s)?,
                ))
            }
        }))
        .await
}
