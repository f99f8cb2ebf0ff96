//! File chunks on QUIC streams of their own: reading the ones devices upload, serving the ones
//! they ask for.
//!
//! Both directions stay out of the core task, which only feeds the machine: a connection's
//! chunk streams are read by tasks of their own (at most `CHUNK_STREAMS_MAX` at once, the
//! stream credit the endpoint grants) and handed over whole; chunks to serve go to a
//! per-connection server task that reads each blob from the store (on a blocking thread, while
//! the commit thread goes on), checks its digest, and writes it on a new stream.
//!
//! Bounds: a connection has at most [`SERVE_QUEUE_MAX`] chunks waiting to be served and
//! `CHUNK_STREAMS_MAX` being read from the store or written; a device that asks for more
//! than that without reading them is disconnected, like a peer that does not read its
//! messages.

use std::sync::Arc;

use sund_model::gateway::transfers::read_chunk;
use sund_model::gateway::ChunkToServe;
use sund_model::ids::ConnectionId;
use sund_runtime::chunk_stream::{
    read_chunk_stream, write_chunk_stream, ChunkStream, CHUNK_STREAMS_MAX,
};
use sund_runtime::store::RedbReader;
use tokio::sync::{mpsc, Semaphore};

use crate::driver::Link;

/// Most chunks one connection may have waiting to be served.
pub const SERVE_QUEUE_MAX: usize = 1024;

/// Reads every chunk stream the device opens on `connection`, each whole, and hands it to
/// the core. Ends with the connection.
pub(crate) async fn accept_chunk_streams(
    conn: ConnectionId,
    connection: quinn::Connection,
    links: mpsc::Sender<Link>,
) {
    while let Ok(mut recv) = connection.accept_uni().await {
        let links = links.clone();
        tokio::spawn(async move {
            match read_chunk_stream(&mut recv).await {
                Ok(ChunkStream { head, body }) => {
                    let _ = links.send(Link::Chunk(conn, head, body)).await;
                }
                Err(e) => {
                    // A device cut off mid-upload: it opens the upload again and sends what
                    // the gateway still lacks.
                    tracing::debug!(?conn, error = %e, "chunk stream not read to its end");
                }
            }
        });
    }
}

/// The sending side of a connection's chunk server.
pub(crate) struct ChunkServer {
    queue: mpsc::Sender<ChunkToServe>,
}

/// Why a chunk could not be queued.
pub(crate) enum QueueRefused {
    /// The device has [`SERVE_QUEUE_MAX`] chunks waiting already.
    Full,
    /// The server is gone (its connection closed).
    Gone,
}

impl ChunkServer {
    /// Starts the server task of one connection.
    pub(crate) fn spawn(
        connection: quinn::Connection,
        reader: RedbReader,
        links: mpsc::Sender<Link>,
    ) -> ChunkServer {
        let (queue, rx) = mpsc::channel(SERVE_QUEUE_MAX);
        tokio::spawn(serve(connection, reader, rx, links));
        ChunkServer { queue }
    }

    /// Queues one chunk.
    pub(crate) fn queue(&self, chunk: ChunkToServe) -> Result<(), QueueRefused> {
        self.queue.try_send(chunk).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => QueueRefused::Full,
            mpsc::error::TrySendError::Closed(_) => QueueRefused::Gone,
        })
    }
}

async fn serve(
    connection: quinn::Connection,
    reader: RedbReader,
    mut queue: mpsc::Receiver<ChunkToServe>,
    links: mpsc::Sender<Link>,
) {
    let slots = Arc::new(Semaphore::new(CHUNK_STREAMS_MAX as usize));
    while let Some(chunk) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        if connection.close_reason().is_some() {
            return;
        }
        let (connection, reader, links) = (connection.clone(), reader.clone(), links.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let read = tokio::task::spawn_blocking(move || {
                let bytes = read_chunk(&reader, &chunk);
                (chunk, bytes)
            })
            .await;
            let Ok((chunk, read)) = read else {
                return; // the runtime is shutting down
            };
            match read {
                Ok(Some(bytes)) => {
                    if let Err(e) =
                        write_chunk_stream(&connection, &chunk.head(), bytes.into()).await
                    {
                        tracing::debug!(conn = ?chunk.conn, error = %e, "chunk not sent");
                    }
                }
                Ok(None) => {
                    let _ = links.send(Link::ChunkDamaged(chunk)).await;
                }
                Err(e) => {
                    tracing::error!(conn = ?chunk.conn, error = %e, "a file chunk could not be read from the store; the device will ask again");
                }
            }
        });
    }
}
