//! Gathers the frames of a large message into one `write` on the socket.
//! h2 hands the socket one DATA frame at a time and flushes after each, and
//! a frame is at most 16 KiB (all a peer must accept), so a stream message
//! carrying a 77 KiB CRL cost five `writev` calls, each waking the reader.
//! Here a flush right after a whole 16 KiB frame is deferred, since the
//! message most likely goes on; the flush after its shorter last frame sends
//! everything at once. Small messages are not held at all. A deferred flush
//! also wakes the connection's task, so if no frame follows (a message that
//! ends on a whole frame, or one stopped by flow control) the bytes go out
//! when the task next touches the socket, which on its next pass is straight
//! away (h2 reads before anything else, and ends every pass with a flush).

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes held back; a write beyond it first sends what is held. Enough
/// for several messages with a large CRL, small beside a socket's buffer.
const HELD_LIMIT: usize = 256 * 1024;

/// A write this large is a whole DATA frame of the size every peer accepts
/// (or larger, for a peer that allows it): more of its message may follow.
const WHOLE_FRAME: usize = 16 * 1024;

/// Room kept for the next pass once everything held is sent. A pass that
/// carried a large message gives the rest back, so thousands of idle
/// connections do not each keep the most they ever held.
const KEPT_CAPACITY: usize = 4 * 1024;

/// Buffers of `HELD_LIMIT` bytes that passes with a large message gave
/// back, for the next such pass on any connection. Growing a small buffer
/// frame by frame instead copied what it held at every doubling (more than
/// the message itself for an 85 KiB CRL), and a buffer this size freed at
/// every pass would be mapped and unmapped again each time.
static SPARE_LARGE_BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Most spare buffers kept: enough for the connections one pass of the
/// runtime's workers sends on, little memory (pages never written to are
/// never backed).
const MAX_SPARE_LARGE_BUFFERS: usize = 4;

fn spare_large_buffers() -> std::sync::MutexGuard<'static, Vec<Vec<u8>>> {
    // The list holds no invariant a panic could break.
    SPARE_LARGE_BUFFERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An empty buffer with room for `HELD_LIMIT` bytes.
fn take_large_buffer() -> Vec<u8> {
    spare_large_buffers()
        .pop()
        .unwrap_or_else(|| Vec::with_capacity(HELD_LIMIT))
}

/// Keeps `buffer` for another pass, if few are kept.
fn give_back_large_buffer(mut buffer: Vec<u8>) {
    buffer.clear();
    let mut spare = spare_large_buffers();
    if spare.len() < MAX_SPARE_LARGE_BUFFERS {
        spare.push(buffer);
    }
}

pub struct Coalesced<S> {
    inner: S,
    held: Vec<u8>,
    /// How much of `held` the socket has already taken.
    sent: usize,
    /// The last write was a whole frame, so a flush now is likely
    /// mid-message.
    mid_message: bool,
    /// A failure sending held bytes while reading, reported by the next
    /// write or flush (the read itself reports what it finds).
    send_error: Option<io::Error>,
}

impl<S> Coalesced<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            held: Vec::new(),
            sent: 0,
            mid_message: false,
            send_error: None,
        }
    }

    fn holding(&self) -> bool {
        self.sent < self.held.len()
    }
}

impl<S: AsyncWrite + Unpin> Coalesced<S> {
    /// Sends everything held, as few writes as the socket allows.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.holding() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if self.held.capacity() >= HELD_LIMIT {
            give_back_large_buffer(std::mem::take(&mut self.held));
        } else {
            self.held.clear();
            self.held.shrink_to(KEPT_CAPACITY);
        }
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    fn take_send_error(&mut self) -> io::Result<()> {
        self.send_error.take().map_or(Ok(()), Err)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // A pass begins with a read: what the last pass held back goes now.
        // A full socket leaves it held, with this task woken when it drains.
        if this.holding()
            && this.send_error.is_none()
            && let Poll::Ready(Err(e)) = this.poll_send_held(cx)
        {
            this.send_error = Some(e);
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.take_send_error()?;
        if this.held.len() - this.sent >= HELD_LIMIT {
            ready!(this.poll_send_held(cx))?;
        }
        if this.sent > 0 {
            // Only after a partial send: keep the unsent tail at the front.
            this.held.drain(..this.sent);
            this.sent = 0;
        }
        let mut room = HELD_LIMIT.saturating_sub(this.held.len());
        let offered: usize = bufs.iter().map(|b| b.len()).sum();
        if offered >= WHOLE_FRAME && this.held.capacity() < HELD_LIMIT {
            // The start of a large message: room for all of it at once.
            let mut large = take_large_buffer();
            large.extend_from_slice(&this.held);
            this.held = large;
        }
        let mut taken = 0;
        for slice in bufs {
            let part = &slice[..slice.len().min(room)];
            this.held.extend_from_slice(part);
            taken += part.len();
            room -= part.len();
            if room == 0 {
                break;
            }
        }
        this.mid_message = taken >= WHOLE_FRAME;
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.take_send_error()?;
        if this.mid_message {
            // More frames most likely follow. Should none, the wake-up
            // brings the connection back for these bytes.
            this.mid_message = false;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.take_send_error()?;
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A socket stand-in: records each write, takes at most `per_write`
    /// bytes at a time, and is full (Pending) once `accepts` writes are
    /// used up.
    #[derive(Default)]
    struct Socket {
        writes: Vec<Vec<u8>>,
        per_write: Option<usize>,
        /// How many more writes it takes before it is full.
        accepts: Option<usize>,
        fail: bool,
        to_read: Vec<u8>,
    }

    impl Socket {
        fn received(&self) -> Vec<u8> {
            self.writes.concat()
        }
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.fail {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            match &mut self.accepts {
                Some(0) => return Poll::Pending,
                Some(left) => *left -= 1,
                None => {}
            }
            let n = self
                .per_write
                .map_or(buf.len(), |limit| limit.min(buf.len()));
            self.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Socket {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.to_read.is_empty() {
                return Poll::Pending;
            }
            let n = self.to_read.len().min(buf.remaining());
            buf.put_slice(&self.to_read[..n]);
            self.to_read.drain(..n);
            Poll::Ready(Ok(()))
        }
    }

    struct CountingWaker(AtomicUsize);

    impl futures::task::ArcWake for CountingWaker {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Harness {
        conn: Coalesced<Socket>,
        wakes: Arc<CountingWaker>,
    }

    impl Harness {
        fn new(socket: Socket) -> Self {
            Self {
                conn: Coalesced::new(socket),
                wakes: Arc::new(CountingWaker(AtomicUsize::new(0))),
            }
        }
        fn with_cx<T>(
            &mut self,
            f: impl FnOnce(Pin<&mut Coalesced<Socket>>, &mut Context<'_>) -> T,
        ) -> T {
            let waker = futures::task::waker(self.wakes.clone());
            let mut cx = Context::from_waker(&waker);
            f(Pin::new(&mut self.conn), &mut cx)
        }
        /// As h2 hands over one frame: a header and a payload, then a flush.
        fn frame(&mut self, header: &[u8], payload: &[u8]) {
            let written = self.with_cx(|conn, cx| {
                conn.poll_write_vectored(cx, &[io::IoSlice::new(header), io::IoSlice::new(payload)])
            });
            assert!(matches!(written, Poll::Ready(Ok(n)) if n == header.len() + payload.len()));
            let flushed = self.with_cx(|conn, cx| conn.poll_flush(cx));
            assert!(matches!(flushed, Poll::Ready(Ok(()))));
        }
        fn flush(&mut self) -> Poll<io::Result<()>> {
            self.with_cx(|conn, cx| conn.poll_flush(cx))
        }
        fn read(&mut self) -> Poll<io::Result<Vec<u8>>> {
            let mut space = [0u8; 64];
            self.with_cx(|conn, cx| {
                let mut buf = ReadBuf::new(&mut space);
                conn.poll_read(cx, &mut buf)
                    .map_ok(|()| buf.filled().to_vec())
            })
        }
        fn wakes(&self) -> usize {
            self.wakes.0.load(Ordering::SeqCst)
        }
        fn socket(&mut self) -> &mut Socket {
            &mut self.conn.inner
        }
    }

    /// The bytes `frames` make on the wire, in order.
    fn on_the_wire(frames: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        frames
            .iter()
            .flat_map(|(header, payload)| [header.as_slice(), payload].concat())
            .collect()
    }

    fn frames(count: u8) -> Vec<(Vec<u8>, Vec<u8>)> {
        (0..count)
            .map(|i| (vec![i; 9], vec![i.wrapping_add(100); 16 * 1024]))
            .collect()
    }

    #[test]
    fn the_frames_of_a_large_message_reach_the_socket_in_one_write() {
        let mut h = Harness::new(Socket::default());
        let mut frames = frames(4);
        frames.push((vec![9; 9], vec![10; 3000]));
        for (header, payload) in &frames[..4] {
            h.frame(header, payload);
        }
        assert!(h.socket().writes.is_empty(), "nothing is sent mid-message");
        let (header, payload) = &frames[4];
        h.frame(header, payload);
        assert_eq!(h.socket().writes.len(), 1, "the last frame sends them all");
        assert_eq!(h.socket().received(), on_the_wire(&frames));
    }

    #[test]
    fn small_messages_are_not_held() {
        let mut h = Harness::new(Socket::default());
        h.frame(b"head", b"body");
        h.frame(b"trailers", b"");
        assert_eq!(h.socket().received(), b"headbodytrailers");
        assert_eq!(h.wakes(), 0);
    }

    #[test]
    fn a_message_ending_on_a_whole_frame_goes_out_on_the_next_pass() {
        let mut h = Harness::new(Socket::default());
        let frames = frames(5);
        for (header, payload) in &frames {
            h.frame(header, payload);
        }
        assert!(h.socket().writes.is_empty());
        assert!(
            h.wakes() >= 1,
            "the connection is woken to send what it holds"
        );
        // The next pass ends with a flush that follows no new writes.
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.socket().writes.len(), 1);
        assert_eq!(h.socket().received(), on_the_wire(&frames));
    }

    #[test]
    fn the_next_pass_sends_held_bytes_when_it_reads() {
        let mut h = Harness::new(Socket {
            to_read: b"ping".to_vec(),
            ..Socket::default()
        });
        let (header, payload) = frames(1).remove(0);
        h.frame(&header, &payload);
        assert!(h.socket().writes.is_empty());
        assert_eq!(h.wakes(), 1);
        let read = h.read();
        assert_eq!(
            h.socket().received(),
            [header, payload].concat(),
            "sent before the read"
        );
        assert!(matches!(read, Poll::Ready(Ok(bytes)) if bytes == b"ping"));
        // Nothing is held any more, so a quiet pass neither writes nor wakes.
        assert!(matches!(h.read(), Poll::Pending));
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.socket().writes.len(), 1);
        assert_eq!(h.wakes(), 1);
    }

    #[test]
    fn a_full_socket_keeps_every_byte_in_order() {
        let mut h = Harness::new(Socket {
            per_write: Some(1000),
            accepts: Some(2),
            ..Socket::default()
        });
        let frames = frames(3);
        for (header, payload) in &frames {
            h.frame(header, payload);
        }
        // Two writes get through, then the socket is full.
        assert!(matches!(h.flush(), Poll::Pending));
        assert_eq!(h.socket().received().len(), 2000);
        // Meanwhile h2 hands over another frame: it goes behind the rest.
        let written = h.with_cx(|conn, cx| conn.poll_write(cx, b"lateframe"));
        assert!(matches!(written, Poll::Ready(Ok(9))));
        h.socket().accepts = None;
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        let expected = [on_the_wire(&frames), b"lateframe".to_vec()].concat();
        assert_eq!(h.socket().received(), expected);
    }

    #[test]
    fn writing_past_the_limit_sends_what_is_held_first() {
        let mut h = Harness::new(Socket::default());
        let payload = vec![7u8; HELD_LIMIT];
        let written = h.with_cx(|conn, cx| conn.poll_write(cx, &payload));
        assert!(matches!(written, Poll::Ready(Ok(n)) if n == HELD_LIMIT));
        assert!(h.socket().writes.is_empty());
        let more = h.with_cx(|conn, cx| conn.poll_write(cx, b"more"));
        assert!(matches!(more, Poll::Ready(Ok(4))));
        assert_eq!(
            h.socket().received(),
            payload,
            "the full buffer went out first"
        );
        // While the socket is full, a write at the limit waits.
        let mut h = Harness::new(Socket {
            accepts: Some(0),
            ..Socket::default()
        });
        let _ = h.with_cx(|conn, cx| conn.poll_write(cx, &payload));
        assert!(matches!(
            h.with_cx(|conn, cx| conn.poll_write(cx, b"x")),
            Poll::Pending
        ));
    }

    #[test]
    fn a_large_message_is_held_in_one_buffer_from_its_first_frame() {
        let mut h = Harness::new(Socket::default());
        h.frame(b"small", b"request");
        let frames = frames(5);
        h.frame(&frames[0].0, &frames[0].1);
        let first = (h.conn.held.as_ptr(), h.conn.held.capacity());
        assert!(first.1 >= HELD_LIMIT, "room for the whole message at once");
        for (header, payload) in &frames[1..] {
            h.frame(header, payload);
            assert_eq!(
                (h.conn.held.as_ptr(), h.conn.held.capacity()),
                first,
                "never moved or grown mid-message"
            );
        }
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        let mut expected = b"smallrequest".to_vec();
        expected.extend(on_the_wire(&frames));
        assert_eq!(h.socket().received(), expected);
    }

    #[test]
    fn a_large_pass_does_not_leave_its_room_behind() {
        let mut h = Harness::new(Socket::default());
        for (header, payload) in &frames(5) {
            h.frame(header, payload);
        }
        assert!(h.conn.held.capacity() > KEPT_CAPACITY);
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert!(
            h.conn.held.capacity() <= KEPT_CAPACITY,
            "{} bytes kept",
            h.conn.held.capacity()
        );
    }

    #[test]
    fn shutdown_sends_what_is_held() {
        let mut h = Harness::new(Socket::default());
        let (header, payload) = frames(1).remove(0);
        h.frame(&header, &payload);
        assert!(h.socket().writes.is_empty());
        let shut = h.with_cx(|conn, cx| conn.poll_shutdown(cx));
        assert!(matches!(shut, Poll::Ready(Ok(()))));
        assert_eq!(h.socket().received(), [header, payload].concat());
    }

    #[test]
    fn a_failed_send_during_a_read_is_reported_by_the_next_write() {
        let mut h = Harness::new(Socket {
            to_read: b"data".to_vec(),
            ..Socket::default()
        });
        let (header, payload) = frames(1).remove(0);
        h.frame(&header, &payload);
        h.socket().fail = true;
        assert!(
            matches!(h.read(), Poll::Ready(Ok(_))),
            "the read reports its own result"
        );
        let flushed = h.flush();
        assert!(
            matches!(&flushed, Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::BrokenPipe),
            "{flushed:?}"
        );
    }

    /// Over a real socket pair, with the pattern h2 follows (write and flush
    /// each frame, then wait to read): the peer gets every byte without
    /// anything else happening on the connection.
    #[tokio::test]
    async fn held_bytes_reach_the_peer_with_no_further_traffic() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        let mut conn = Coalesced::new(ours);
        let frames = frames(5);
        let expected = on_the_wire(&frames);
        let server = tokio::spawn(async move {
            for (header, payload) in &frames {
                conn.write_all(header).await.unwrap();
                conn.write_all(payload).await.unwrap();
                conn.flush().await.unwrap();
            }
            // Like h2 between messages: waiting for the peer, nothing more.
            let mut byte = [0u8; 1];
            conn.read_exact(&mut byte).await.unwrap();
            byte[0]
        });
        let mut got = vec![0u8; expected.len()];
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            theirs.read_exact(&mut got),
        )
        .await
        .expect("held bytes were never sent")
        .unwrap();
        assert_eq!(got, expected);
        theirs.write_all(&[42]).await.unwrap();
        assert_eq!(server.await.unwrap(), 42);
    }
}
