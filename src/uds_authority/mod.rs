//! Normalizes the HTTP/2 `:authority` of requests arriving on writ's Unix
//! sockets. gRPC C-core (so py-spiffe), grpc-java and grpc-swift send the
//! percent-encoded socket path there (`tmp%2Fw.sock`), which the `h2` crate
//! under tonic rejects as malformed, resetting every stream (hyperium/h2#487).
//! On a Unix socket the authority means nothing, so we rewrite it to
//! `localhost` before `h2` sees it: client header blocks are decoded with a
//! decoder that mirrors the client's HPACK state and re-encoded with an
//! encoder whose state `h2`'s decoder mirrors. Every other byte passes through.
//! Huffman-coded strings are unpacked by `raw_strings` before the HPACK
//! decoder sees them.
//!
//! A client that sends a valid authority (tonic, grpc-go) does so on every
//! request: the connection's first header block decides. If it needs no
//! rewrite it is passed on as the client wrote it, and so is everything
//! after it, read straight into `h2`'s buffer; `h2` then decodes the
//! client's own HPACK state, and the per-request decode, re-encode and
//! copies are spared. Should such a client later send a socket path after
//! all, `h2` refuses that one request, as it would without this module.

mod raw_strings;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Every HTTP/2 peer must accept frames this large; we never send larger.
const MAX_OUT_FRAME: usize = 16_384;
/// Bounds what one request's headers may buffer here (h2 enforces its own,
/// smaller header-list limit after us).
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// Frames larger than this are refused rather than buffered.
const MAX_IN_FRAME: usize = 16 * 1024 * 1024;

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// A header block being collected across HEADERS and CONTINUATION frames.
struct PendingHeaders {
    stream_id: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// Whether this connection's header blocks are rewritten.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// No header block has been seen yet.
    Undecided,
    /// The first block needed a rewrite: every block is re-encoded.
    Rewrite,
    /// The first block did not: bytes go to `h2` untouched from then on.
    PassThrough,
}

pub struct AuthorityFix<S> {
    inner: S,
    mode: Mode,
    /// While undecided, the frames of the header block being collected, as
    /// read: passed on unchanged if the block needs no rewrite.
    raw_block: Vec<u8>,
    /// Raw bytes read from the client and not yet transformed.
    input: Vec<u8>,
    /// Transformed bytes waiting for h2 to read them.
    output: Vec<u8>,
    output_pos: usize,
    preface_left: usize,
    pending: Option<PendingHeaders>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// The header block being decoded, with its strings unpacked; kept to
    /// reuse its allocation.
    unpacked: Vec<u8>,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            mode: Mode::Undecided,
            raw_block: Vec::new(),
            input: Vec::new(),
            output: Vec::new(),
            output_pos: 0,
            preface_left: PREFACE_LEN,
            pending: None,
            decoder: loona_hpack::Decoder::new(),
            encoder: loona_hpack::Encoder::new(),
            unpacked: Vec::new(),
            eof: false,
        }
    }

    /// Moves every complete unit of `input` (preface bytes, whole frames)
    /// into `output`, rewriting header blocks on the way; once the mode is
    /// pass-through, everything left goes as it is.
    fn process(&mut self) -> io::Result<()> {
        let mut consumed = 0;
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.input.len());
            self.output.extend_from_slice(&self.input[..n]);
            self.preface_left -= n;
            consumed = n;
        }
        while self.preface_left == 0 {
            if self.mode == Mode::PassThrough {
                self.output.extend_from_slice(&self.input[consumed..]);
                consumed = self.input.len();
                break;
            }
            let rest = &self.input[consumed..];
            if rest.len() < FRAME_HEADER_LEN {
                break;
            }
            let len =
                (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            if len > MAX_IN_FRAME {
                return Err(invalid("HTTP/2 frame too large"));
            }
            if rest.len() < FRAME_HEADER_LEN + len {
                break;
            }
            let (kind, flags) = (rest[3], rest[4]);
            let stream_id = [rest[5], rest[6], rest[7], rest[8]];
            let whole = FRAME_HEADER_LEN + len;
            let frame = consumed..consumed + whole;
            match kind {
                TYPE_HEADERS | TYPE_CONTINUATION => {
                    let payload = rest[FRAME_HEADER_LEN..whole].to_vec();
                    if self.mode == Mode::Undecided {
                        self.raw_block.extend_from_slice(&self.input[frame]);
                    }
                    if kind == TYPE_HEADERS {
                        self.headers_frame(flags, stream_id, &payload)?;
                    } else {
                        self.continuation_frame(flags, stream_id, &payload)?;
                    }
                }
                _ if self.pending.is_some() => {
                    return Err(invalid("frame interleaved within a header block"));
                }
                _ => self.output.extend_from_slice(&self.input[frame]),
            }
            consumed += whole;
        }
        self.input.drain(..consumed);
        if self.mode == Mode::PassThrough {
            // Nothing is decoded here again: give back what decoding held.
            self.input = Vec::new();
            self.raw_block = Vec::new();
            self.unpacked = Vec::new();
        }
        Ok(())
    }

    fn headers_frame(&mut self, flags: u8, stream_id: [u8; 4], payload: &[u8]) -> io::Result<()> {
        if self.pending.is_some() {
            return Err(invalid("HEADERS within a header block"));
        }
        let mut body = payload;
        let mut pad = 0usize;
        if flags & FLAG_PADDED != 0 {
            let (&p, rest) = body
                .split_first()
                .ok_or_else(|| invalid("short padded HEADERS"))?;
            pad = usize::from(p);
            body = rest;
        }
        let priority = if flags & FLAG_PRIORITY != 0 {
            if body.len() < 5 {
                return Err(invalid("short HEADERS priority"));
            }
            let mut p = [0u8; 5];
            p.copy_from_slice(&body[..5]);
            body = &body[5..];
            Some(p)
        } else {
            None
        };
        if pad > body.len() {
            return Err(invalid("HEADERS padding longer than its payload"));
        }
        let fragment = &body[..body.len() - pad];
        self.pending = Some(PendingHeaders {
            stream_id,
            end_stream: flags & FLAG_END_STREAM != 0,
            priority,
            block: fragment.to_vec(),
        });
        if flags & FLAG_END_HEADERS != 0 {
            self.finish_block()?;
        }
        Ok(())
    }

    fn continuation_frame(
        &mut self,
        flags: u8,
        stream_id: [u8; 4],
        payload: &[u8],
    ) -> io::Result<()> {
        let pending = self
            .pending
            .as_mut()
            .ok_or_else(|| invalid("CONTINUATION without HEADERS"))?;
        if pending.stream_id != stream_id {
            return Err(invalid("CONTINUATION for another stream"));
        }
        if pending.block.len() + payload.len() > MAX_HEADER_BLOCK {
            return Err(invalid("header block too large"));
        }
        pending.block.extend_from_slice(payload);
        if flags & FLAG_END_HEADERS != 0 {
            self.finish_block()?;
        }
        Ok(())
    }

    /// Decodes the collected block, replaces `:authority`, re-encodes, and
    /// emits HEADERS (+ CONTINUATION) frames carrying the new block.
    fn finish_block(&mut self) -> io::Result<()> {
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        self.unpacked.clear();
        raw_strings::unhuffman(&pending.block, &mut self.unpacked)
            .map_err(|e| invalid(&format!("HPACK: {e}")))?;
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = self
            .decoder
            .decode(&self.unpacked)
            .map_err(|e| invalid(&format!("HPACK: {e:?}")))?;
        let mut rewritten = false;
        for (name, value) in headers.iter_mut() {
            if name.as_slice() == b":authority" && !valid_authority(value) {
                *value = b"localhost".to_vec();
                rewritten = true;
            }
        }
        if self.mode == Mode::Undecided {
            if !rewritten {
                self.output.append(&mut self.raw_block);
                self.mode = Mode::PassThrough;
                return Ok(());
            }
            self.raw_block = Vec::new();
            self.mode = Mode::Rewrite;
        }
        let block = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut chunks = block.chunks(MAX_OUT_FRAME).peekable();
        let mut first = true;
        loop {
            let chunk = chunks.next().unwrap_or(&[]);
            let last = chunks.peek().is_none();
            let (kind, mut flags, prefix): (u8, u8, Option<[u8; 5]>) = if first {
                let mut f = 0;
                if pending.end_stream {
                    f |= FLAG_END_STREAM;
                }
                if pending.priority.is_some() {
                    f |= FLAG_PRIORITY;
                }
                (TYPE_HEADERS, f, pending.priority)
            } else {
                (TYPE_CONTINUATION, 0, None)
            };
            if last {
                flags |= FLAG_END_HEADERS;
            }
            let len = chunk.len() + prefix.map_or(0, |p| p.len());
            self.output.extend_from_slice(&[
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                kind,
                flags,
            ]);
            self.output.extend_from_slice(&pending.stream_id);
            if let Some(p) = prefix {
                self.output.extend_from_slice(&p);
            }
            self.output.extend_from_slice(chunk);
            first = false;
            if last {
                return Ok(());
            }
        }
    }
}

/// host[:port] with the characters an authority may hold; anything with a
/// '/' or '%' (a socket path, raw or encoded) is not one.
fn valid_authority(value: &[u8]) -> bool {
    !value.is_empty()
        && value.iter().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']' | b'@')
        })
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.output_pos < this.output.len() {
                let n = (this.output.len() - this.output_pos).min(buf.remaining());
                buf.put_slice(&this.output[this.output_pos..this.output_pos + n]);
                this.output_pos += n;
                if this.output_pos == this.output.len() {
                    if this.mode == Mode::PassThrough {
                        this.output = Vec::new();
                    } else {
                        this.output.clear();
                    }
                    this.output_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.mode == Mode::PassThrough {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if read.filled().is_empty() {
                        this.eof = true;
                        continue;
                    }
                    this.input.extend_from_slice(read.filled());
                    this.process()?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    async fn run(input: Vec<u8>) -> io::Result<Vec<u8>> {
        let mut fix = AuthorityFix::new(std::io::Cursor::new(input));
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await?;
        Ok(out)
    }

    fn decode_headers(out: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut at = PREFACE_LEN;
        let mut block = Vec::new();
        while at < out.len() {
            let len = (usize::from(out[at]) << 16)
                | (usize::from(out[at + 1]) << 8)
                | usize::from(out[at + 2]);
            let (kind, flags) = (out[at + 3], out[at + 4]);
            let payload = &out[at + 9..at + 9 + len];
            if kind == TYPE_HEADERS || kind == TYPE_CONTINUATION {
                let body = if kind == TYPE_HEADERS && flags & FLAG_PRIORITY != 0 {
                    &payload[5..]
                } else {
                    payload
                };
                block.extend_from_slice(body);
                if flags & FLAG_END_HEADERS != 0 {
                    blocks.push(decoder.decode(&block).unwrap());
                    block.clear();
                }
            }
            at += 9 + len;
        }
        blocks
    }

    #[tokio::test]
    async fn rewrites_a_socket_path_authority_and_keeps_everything_else() {
        let mut client = loona_hpack::Encoder::new();
        let request = |authority: &[u8]| -> Vec<(Vec<u8>, Vec<u8>)> {
            vec![
                (b":method".to_vec(), b"POST".to_vec()),
                (b":scheme".to_vec(), b"http".to_vec()),
                (
                    b":path".to_vec(),
                    b"/SpiffeWorkloadAPI/FetchX509SVID".to_vec(),
                ),
                (b":authority".to_vec(), authority.to_vec()),
                (b"workload.spiffe.io".to_vec(), b"true".to_vec()),
            ]
        };
        let first = request(b"tmp%2Fw.sock");
        let second = request(b"localhost:1234");
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let block = client.encode(first.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        // Split the first block across HEADERS + CONTINUATION, with padding.
        let (a, b) = block.split_at(block.len() / 2);
        let mut padded = vec![3u8];
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(TYPE_HEADERS, FLAG_PADDED, 1, &padded));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b));
        input.extend(frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0")); // DATA
        // The second request reuses the client's dynamic table entries.
        let block = client.encode(second.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            3,
            &block,
        ));

        let out = run(input).await.unwrap();
        assert_eq!(&out[..PREFACE_LEN], PREFACE);
        let blocks = decode_headers(&out);
        let authority = |h: &Vec<(Vec<u8>, Vec<u8>)>| {
            h.iter()
                .find(|(n, _)| n == b":authority")
                .unwrap()
                .1
                .clone()
        };
        assert_eq!(authority(&blocks[0]), b"localhost");
        assert_eq!(
            authority(&blocks[1]),
            b"localhost:1234",
            "a valid authority is left alone"
        );
        assert_eq!(blocks[0].len(), 5);
        assert!(blocks[0].contains(&(b"workload.spiffe.io".to_vec(), b"true".to_vec())));
        // SETTINGS and DATA frames pass through byte for byte.
        let settings = frame(0x4, 0, 0, &[]);
        assert_eq!(
            &out[PREFACE_LEN..PREFACE_LEN + settings.len()],
            &settings[..]
        );
        let data = frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0");
        assert!(out.windows(data.len()).any(|w| w == &data[..]));
    }

    /// Hands out what it holds a few bytes at a time, so frames arrive
    /// split across reads.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = 7.min(self.data.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    /// A first request with a valid authority puts the connection in
    /// pass-through: every byte reaches `h2` as the client sent it, the
    /// first header block included (so `h2` decodes the client's own HPACK
    /// state), whether the bytes arrive at once or a few at a time.
    #[tokio::test]
    async fn a_valid_first_authority_passes_the_whole_connection_through() {
        let mut client = loona_hpack::Encoder::new();
        let request = |authority: &[u8]| -> Vec<(Vec<u8>, Vec<u8>)> {
            vec![
                (b":method".to_vec(), b"POST".to_vec()),
                (
                    b":path".to_vec(),
                    b"/writ.admin.v1.Tasks/BeginTask".to_vec(),
                ),
                (b":authority".to_vec(), authority.to_vec()),
            ]
        };
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let block = client.encode(
            request(b"localhost")
                .iter()
                .map(|(n, v)| (n.as_slice(), v.as_slice())),
        );
        let (a, b) = block.split_at(block.len() / 2);
        let mut padded = vec![2u8];
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0]);
        input.extend(frame(TYPE_HEADERS, FLAG_PADDED, 1, &padded));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b));
        input.extend(frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0")); // DATA
        // Later blocks are not looked at, not even a socket path (h2 then
        // refuses that request, as it would without the fix).
        let later = client.encode(
            request(b"tmp%2Fw.sock")
                .iter()
                .map(|(n, v)| (n.as_slice(), v.as_slice())),
        );
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &later));
        input.extend(frame(0x0, 0, 3, &[9u8; 3000]));

        assert_eq!(run(input.clone()).await.unwrap(), input);
        let mut fix = AuthorityFix::new(Trickle {
            data: input.clone(),
            at: 0,
        });
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, input);
        assert_eq!(fix.mode, Mode::PassThrough);
        assert!(fix.input.capacity() == 0 && fix.raw_block.capacity() == 0);
    }

    #[tokio::test]
    async fn large_header_blocks_are_split_into_continuations() {
        let mut client = loona_hpack::Encoder::new();
        let big = vec![b'x'; 40_000];
        let headers = [
            (b":authority".as_slice(), b"a%2Fb".as_slice()),
            (b"x-big".as_slice(), big.as_slice()),
        ];
        let block = client.encode(headers.iter().copied());
        let mut input = PREFACE.to_vec();
        for (i, chunk) in block.chunks(16_000).enumerate() {
            let last = (i + 1) * 16_000 >= block.len();
            let kind = if i == 0 {
                TYPE_HEADERS
            } else {
                TYPE_CONTINUATION
            };
            input.extend(frame(
                kind,
                if last { FLAG_END_HEADERS } else { 0 },
                1,
                chunk,
            ));
        }
        let out = run(input).await.unwrap();
        let blocks = decode_headers(&out);
        assert_eq!(blocks[0][0].1, b"localhost");
        assert_eq!(blocks[0][1].1.len(), 40_000);
    }

    #[tokio::test]
    async fn malformed_framing_is_an_error_not_a_pass_through() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b"\x82"));
        assert!(run(input).await.is_err());
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            b"\xff\xff\xff\xff\xff",
        ));
        assert!(run(input).await.is_err(), "garbage HPACK");
    }
}
