//! Chunk streams: one sealed file chunk per QUIC unidirectional stream, beside the session's
//! message stream, the same for the gateway and the node.
//!
//! A chunk stream carries one frame (a `Chunk` head: upload, id, length), then exactly that many
//! bytes of sealed chunk, then ends (see `sund_model::wire::files`). Because every chunk has a
//! stream of its own, a 4 MiB chunk never queues in front of a message, and QUIC's per-stream
//! flow control gives backpressure on each.
//!
//! Memory is bounded by the stream credit the endpoint grants ([`CHUNK_STREAMS_MAX`] at once
//! per connection) times the largest sealed chunk: the reader reads the head first, and the
//! bytes only if the head is a well-formed `Chunk` whose length a sealed chunk can have.
//! Whatever else arrives is handed to the state machine as it is (the head without the
//! bytes), so that the machine refuses it with a reason the peer reads and counts it.

use bytes::{Bytes, BytesMut};
use sund_model::wire::{Frame, FrameHeader, Payload, HEADER_BYTES};

/// Chunk streams one peer may have open towards the other at once (QUIC stream credit).
pub const CHUNK_STREAMS_MAX: u32 = 4;
/// Largest head payload a chunk stream may open with (a `ChunkHead` is about 70 bytes).
pub const CHUNK_HEAD_PAYLOAD_MAX: u32 = 256;

/// What a chunk stream brought.
#[derive(Debug)]
pub struct ChunkStream {
    /// The head frame's bytes as read (maybe not a valid frame).
    pub head: Bytes,
    /// The sealed chunk: exactly the head's length, or empty when the head was not read on.
    pub body: Bytes,
}

/// Why a chunk stream could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum ChunkStreamError {
    /// The stream ended or was reset before the head and the bytes it announced were in.
    #[error("the chunk stream ended early: {0}")]
    Truncated(String),
    /// More bytes followed the chunk.
    #[error("the chunk stream carried bytes after its chunk")]
    TrailingBytes,
}

/// Reads one chunk stream whole (see the module docs for what is and is not read).
pub async fn read_chunk_stream(
    recv: &mut quinn::RecvStream,
) -> Result<ChunkStream, ChunkStreamError> {
    let truncated = |e: quinn::ReadExactError| ChunkStreamError::Truncated(e.to_string());
    let mut header = [0u8; HEADER_BYTES];
    recv.read_exact(&mut header).await.map_err(truncated)?;
    let payload_len = match FrameHeader::parse(&header, CHUNK_HEAD_PAYLOAD_MAX) {
        Ok(h) => h.payload_len() as usize,
        // Not a frame the machine could take: it hears the header alone and says why.
        Err(_) => {
            return Ok(ChunkStream {
                head: Bytes::copy_from_slice(&header),
                body: Bytes::new(),
            })
        }
    };
    let mut head = BytesMut::zeroed(HEADER_BYTES + payload_len);
    head[..HEADER_BYTES].copy_from_slice(&header);
    recv.read_exact(&mut head[HEADER_BYTES..])
        .await
        .map_err(truncated)?;
    let head = head.freeze();
    let len = match Frame::decode(&head, CHUNK_HEAD_PAYLOAD_MAX) {
        Ok(Frame {
            payload: Payload::Chunk(chunk),
            ..
        }) if chunk.check_len().is_ok() => chunk.len as usize,
        _ => {
            return Ok(ChunkStream {
                head,
                body: Bytes::new(),
            })
        }
    };
    // Read into spare capacity, never zeroed first: a chunk is up to a few MiB, and zeroing
    // it cost the gateway about as much as the copy.
    let mut body = BytesMut::with_capacity(len);
    let mut rest = tokio::io::AsyncReadExt::take(&mut *recv, len as u64);
    while body.len() < len {
        match tokio::io::AsyncReadExt::read_buf(&mut rest, &mut body).await {
            Ok(0) => {
                return Err(ChunkStreamError::Truncated(format!(
                    "the stream ended {} bytes short of its chunk",
                    len - body.len()
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(ChunkStreamError::Truncated(e.to_string())),
        }
    }
    debug_assert_eq!(body.len(), len);
    match recv.read_chunk(1, true).await {
        Ok(None) => {}
        Ok(Some(_)) => return Err(ChunkStreamError::TrailingBytes),
        Err(e) => return Err(ChunkStreamError::Truncated(e.to_string())),
    }
    Ok(ChunkStream {
        head,
        body: body.freeze(),
    })
}

/// Why a chunk could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum ChunkSendError {
    /// The connection is gone.
    #[error("no stream for the chunk: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The peer stopped the stream, or the connection failed while writing.
    #[error("the chunk stream failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream was already finished or reset.
    #[error("the chunk stream was closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
}

/// Sends one chunk on a new unidirectional stream of `connection`: the head frame, then the
/// bytes, then the end of the stream. Waits for stream credit (backpressure). The body is handed
/// to quinn as it is, not copied.
pub async fn write_chunk_stream(
    connection: &quinn::Connection,
    head: &[u8],
    body: Bytes,
) -> Result<(), ChunkSendError> {
    let mut send = connection.open_uni().await?;
    send.write_all(head).await?;
    send.write_chunk(body).await?;
    send.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use sund_model::wire::payload::ChunkHead;
    use sund_model::wire::Routing;

    use super::*;
    use crate::endpoint;
    use crate::environment::Production;
    use crate::tls::{certificate_pin, TlsIdentity};

    /// A connected pair on loopback: the client's connection and the server's.
    async fn pair() -> (quinn::Connection, quinn::Connection, quinn::Endpoint) {
        let identity = TlsIdentity::from_seed([9; 32]).unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let server = endpoint::server_endpoint(&Production, any, &identity).unwrap();
        let addr = server.local_addr().unwrap();
        let client =
            endpoint::client_endpoint(&Production, certificate_pin(&identity.cert)).unwrap();
        let (client_side, server_side) = tokio::join!(
            async { client.connect(addr, "sund-gateway").unwrap().await.unwrap() },
            async { server.accept().await.unwrap().await.unwrap() }
        );
        (client_side, server_side, server)
    }

    fn head(len: u32) -> Vec<u8> {
        let head = ChunkHead {
            upload: [1; 16],
            id: [2; 32],
            len,
        };
        Frame::new(Routing::default(), Payload::Chunk(head))
            .encode()
            .to_vec()
    }

    /// Sends `head` and then `body` on a new stream, finished, from a task of its own (the
    /// stream's credit may be smaller than the body).
    fn send_raw(connection: &quinn::Connection, head: Vec<u8>, body: Vec<u8>) {
        let connection = connection.clone();
        tokio::spawn(async move {
            let mut send = connection.open_uni().await.unwrap();
            send.write_all(&head).await.unwrap();
            // The reader may stop early and stop the stream: not this test's concern.
            let _ = send.write_all(&body).await;
            let _ = send.finish();
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_arrives_whole_and_a_short_or_long_stream_is_refused() {
        let (client, server, _endpoint) = pair().await;
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();

        // Written while read: the stream's credit is smaller than the chunk.
        let writing = {
            let (client, body) = (client.clone(), Bytes::from(body.clone()));
            tokio::spawn(async move {
                write_chunk_stream(&client, &head(body.len() as u32), body).await
            })
        };
        let got = read_chunk_stream(&mut server.accept_uni().await.unwrap())
            .await
            .unwrap();
        writing.await.unwrap().unwrap();
        assert_eq!(got.head, Bytes::from(head(body.len() as u32)));
        assert_eq!(got.body, Bytes::from(body.clone()));

        // The head promises more than the stream holds.
        send_raw(&client, head(body.len() as u32), body[..1_000_000].to_vec());
        let short = read_chunk_stream(&mut server.accept_uni().await.unwrap()).await;
        assert!(
            matches!(&short, Err(ChunkStreamError::Truncated(why)) if why.contains("2000000 bytes short")),
            "{short:?}"
        );

        // The stream goes on past the chunk.
        send_raw(&client, head(1000), body[..1001].to_vec());
        let long = read_chunk_stream(&mut server.accept_uni().await.unwrap()).await;
        assert!(
            matches!(long, Err(ChunkStreamError::TrailingBytes)),
            "{long:?}"
        );
    }
}
