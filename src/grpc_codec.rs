//! The codec of writ's gRPC services and clients: prost's, except that each
//! message's buffer is given room for the whole message before it is
//! encoded.
//!
//! A Workload API stream message carries the CRL, tens to hundreds of KiB.
//! tonic encodes into a buffer that starts at 8 KiB and prost writes field
//! by field, so that buffer was grown on the way, once or twice per
//! message: an allocation and a copy of what it held each time.
//!
//! Every call of every service and client goes through it, so the
//! integration tests (real clients: go-spiffe, py-spiffe, the `spiffe`
//! crate, SPIRE's CLI) are its tests.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;

/// `tonic_prost::ProstCodec` with [`SizedProstEncoder`].
#[derive(Debug, Clone)]
pub struct SizedProstCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SizedProstCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SizedProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SizedProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SizedProstEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(buffer_settings())
    }
}

/// Encodes a prost message into a buffer sized for it first.
#[derive(Debug, Clone)]
pub struct SizedProstEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for SizedProstEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }
}

/// Where a call's encode and decode buffers start: small, as most messages
/// are (a task, a request), and a large one has its buffer sized for it
/// anyway. tonic's default, 8 KiB, cost an allocation glibc serves from
/// its large bins, and each such allocation first sweeps the small chunks
/// freed since into them (`malloc_consolidate`): several per task begun
/// and ended.
fn buffer_settings() -> BufferSettings {
    BufferSettings::new(512, YIELD_THRESHOLD)
}

/// tonic's default: a stream's encoded messages are handed on once this
/// much is buffered.
const YIELD_THRESHOLD: usize = 32 * 1024;
