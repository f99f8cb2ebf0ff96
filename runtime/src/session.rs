//! One QUIC session's I/O, the same for the gateway and the node.
//!
//! A session is one connection with one bidirectional stream of Sund frames. [`spawn`] starts
//! two tasks for it and returns the driver's [`SessionHandle`]:
//!
//! - the **reader** reads what the stream brings, splits every whole frame out of each read in
//!   one pass ([`FrameDecoder`]) and hands them to the driver's core as one
//!   [`SessionEvent::Frames`] message; a stream that loses sync, or ends in the middle of a
//!   frame, is closed and reported with its cause;
//! - the **writer** takes every frame queued for the peer and writes them in one gathered write
//!   (`write_all_chunks`), so a burst of deliveries costs one lock and one wake-up of quinn's
//!   connection driver instead of one per frame.
//!
//! A driver may pause the reader ([`SessionHandle::pause_reading`]): the gateway does so for a
//! device refused by a rate limit, so that QUIC's flow control, not the gateway, absorbs what
//! the device sends while told to wait.
//!
//! Closing is always bounded in time. [`SessionHandle::close`] lets the writer flush what is
//! queued (a goodbye), then closes the connection after at most `linger` even if the peer reads
//! nothing; [`SessionHandle::abort`] closes at once, whatever the writer is doing (a peer that
//! reads too slowly). Either way the reader stops and the driver hears
//! [`SessionEvent::Closed`].

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use sund_model::ids::ConnectionId;
use sund_model::wire::{FrameDecoder, WireError, PAYLOAD_BYTES_MAX};
use tokio::sync::{mpsc, watch};

/// Most bytes asked of the stream in one read.
pub const READ_BYTES_MAX: usize = 64 * 1024;
/// Most queued frames written in one gathered write.
pub const WRITE_BATCH_MAX: usize = 256;

/// What a session's tasks tell the driver's core.
#[derive(Debug)]
pub enum SessionEvent {
    /// Whole frames, in stream order (header checked, payload left to the state machine), and
    /// when they were read.
    Frames(ConnectionId, Vec<Bytes>, tokio::time::Instant),
    /// The session is over.
    Closed(ConnectionId, CloseCause),
}

/// Why a session ended, as its reader saw it.
#[derive(Debug)]
pub enum CloseCause {
    /// The stream ended cleanly or the connection closed (by either side, or timed out).
    Ended,
    /// The peer sent bytes that are not a frame: nothing after them can be trusted.
    InvalidFrame(WireError),
    /// The stream ended in the middle of a frame (`bytes` of it had arrived).
    TornFrame {
        /// Bytes of the incomplete frame.
        bytes: usize,
    },
    /// The peer no longer knows the connection (a QUIC stateless reset: it restarted, or
    /// dropped this side while its close could not get through).
    Reset,
    /// The peer closed the connection with a non-zero code, saying why (a gateway whose
    /// storage failed, a peer that found a frame invalid).
    PeerClosed {
        /// The application close code.
        code: u64,
        /// The peer's reason, as text (lossy, bounded by QUIC's frame size).
        reason: String,
    },
}

/// Why the connection ended, if the peer closed it with a non-zero code.
fn peer_closed(error: &quinn::ReadError) -> Option<CloseCause> {
    match error {
        quinn::ReadError::ConnectionLost(quinn::ConnectionError::Reset) => Some(CloseCause::Reset),
        quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(close))
            if close.error_code.into_inner() != 0 =>
        {
            Some(CloseCause::PeerClosed {
                code: close.error_code.into_inner(),
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            })
        }
        _ => None,
    }
}

/// Bounds and manners of one session.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    /// Most frames queued for the peer; beyond it the peer reads too slowly.
    pub writer_queue_max: usize,
    /// How long a graceful close waits for queued frames to reach the peer.
    pub linger: Duration,
    /// The reason given in the close.
    pub reason: &'static [u8],
}

/// The peer does not read fast enough: the frame was not queued.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the peer reads too slowly: {0} frames are queued for it")]
pub struct QueueFull(pub usize);

/// The driver's side of a session: frames to send, pausing the reader, and closing.
#[derive(Debug)]
pub struct SessionHandle {
    frames: mpsc::Sender<Bytes>,
    connection: quinn::Connection,
    limits: SessionLimits,
    /// Until when the reader reads nothing (see [`SessionHandle::pause_reading`]).
    pause: watch::Sender<Option<tokio::time::Instant>>,
}

impl SessionHandle {
    /// Queues a frame for the peer.
    pub fn send(&self, frame: Bytes) -> Result<(), QueueFull> {
        self.frames
            .try_send(frame)
            .map_err(|_| QueueFull(self.limits.writer_queue_max))
    }

    /// Reads nothing more from the peer for `pause` (from now; a later pause replaces an
    /// earlier one if it ends later). What the peer sends meanwhile waits in QUIC's receive
    /// window, and once that is full the peer cannot send: flow control holds it back at no
    /// cost here. Reading resumes where it stopped; nothing is dropped or reordered.
    pub fn pause_reading(&self, pause: Duration) {
        let until = tokio::time::Instant::now() + pause;
        self.pause.send_if_modified(|current| {
            if current.is_some_and(|c| c >= until) {
                return false;
            }
            *current = Some(until);
            true
        });
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// Closes after the frames already queued reach the peer, or after `linger` whatever the
    /// peer does.
    pub fn close(self) {
        let SessionHandle {
            frames,
            connection,
            limits,
            ..
        } = self;
        drop(frames); // the writer flushes, finishes the stream and closes
        tokio::spawn(async move {
            // Whichever comes first: the writer closed, or the linger ran out.
            tokio::select! {
                biased; // no random branch order: simulated runs repeat
                _ = connection.closed() => {}
                _ = tokio::time::sleep(limits.linger) => {
                    connection.close(0u32.into(), limits.reason);
                }
            }
        });
    }

    /// Closes now, dropping whatever is queued or being written.
    pub fn abort(self, reason: &str) {
        self.connection.close(1u32.into(), reason.as_bytes());
    }
}

/// Starts the reader and writer of a session whose stream is open, reporting to `events`.
///
/// `events` is the driver's own queue (any type a [`SessionEvent`] converts into), so that a
/// driver can put what it learns of a connection before its stream (that it connected) in the
/// same queue, ahead of the connection's frames: one queue, one order per connection.
pub fn spawn<E: From<SessionEvent> + Send + 'static>(
    conn: ConnectionId,
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    events: mpsc::Sender<E>,
    limits: SessionLimits,
) -> SessionHandle {
    assert!(limits.writer_queue_max > 0, "a session can queue a frame");
    let (frames_tx, frames_rx) = mpsc::channel(limits.writer_queue_max);
    let (pause_tx, pause_rx) = watch::channel(None);
    tokio::spawn(write_frames(send, frames_rx, connection.clone(), limits));
    tokio::spawn(read_frames(
        conn,
        recv,
        connection.clone(),
        events,
        pause_rx,
    ));
    SessionHandle {
        frames: frames_tx,
        connection,
        limits,
        pause: pause_tx,
    }
}

/// The writer: every queued frame in one gathered write, until the driver drops its handle;
/// then finish the stream, let the peer read it (at most `linger`), and close.
async fn write_frames(
    mut send: quinn::SendStream,
    mut frames: mpsc::Receiver<Bytes>,
    connection: quinn::Connection,
    limits: SessionLimits,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH_MAX);
    loop {
        if frames.recv_many(&mut batch, WRITE_BATCH_MAX).await == 0 {
            break;
        }
        if send.write_all_chunks(&mut batch).await.is_err() {
            return; // the connection is gone (closed, aborted, reset)
        }
        batch.clear();
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(limits.linger, send.stopped()).await;
    connection.close(0u32.into(), limits.reason);
}

/// The reader: whole frames to the core, in batches of what one read brought; then why the
/// session ended.
async fn read_frames<E: From<SessionEvent>>(
    conn: ConnectionId,
    mut recv: quinn::RecvStream,
    connection: quinn::Connection,
    events: mpsc::Sender<E>,
    pause: watch::Receiver<Option<tokio::time::Instant>>,
) {
    let mut decoder = FrameDecoder::new(PAYLOAD_BYTES_MAX);
    let cause = loop {
        // Paused by the driver (a rate limit): read on once the pause is over. Bounded (the
        // driver pauses for seconds at most), so a close is noticed soon after.
        let resume = *pause.borrow();
        if let Some(at) = resume.filter(|at| *at > tokio::time::Instant::now()) {
            tokio::time::sleep_until(at).await;
        }
        match recv.read_chunk(READ_BYTES_MAX, true).await {
            Ok(Some(chunk)) => decoder.push(&chunk.bytes),
            Ok(None) if decoder.buffered() > 0 => {
                break CloseCause::TornFrame {
                    bytes: decoder.buffered(),
                }
            }
            Err(e) => break peer_closed(&e).unwrap_or(CloseCause::Ended),
            Ok(None) => break CloseCause::Ended,
        }
        let mut frames = Vec::new();
        let invalid = loop {
            match decoder.next_frame_bytes() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        if !frames.is_empty()
            && events
                .send(SessionEvent::Frames(conn, frames, tokio::time::Instant::now()).into())
                .await
                .is_err()
        {
            return; // the driver is gone
        }
        if let Some(e) = invalid {
            // The stream lost sync: nothing after this can be trusted.
            connection.close(1u32.into(), e.to_string().as_bytes());
            break CloseCause::InvalidFrame(e);
        }
    };
    let _ = events.send(SessionEvent::Closed(conn, cause).into()).await;
}
