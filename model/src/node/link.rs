//! The link: the node's connection to its gateway, from connecting through the handshake to an
//! open session, with heartbeats, the idle timeout, reconnects with exponential backoff and full
//! jitter, and the resume token that lets the next session skip the challenge. A session the
//! gateway refuses (a `Goodbye`) before it has lasted `backoff_max` counts as a failed attempt
//! though it opened, so that a refusal that repeats backs off instead of looping.

use std::time::Duration;

use crate::env::{Entropy, StoreError, StoreRead, Table, WriteBatch};
use crate::ids::ConnectionId;
use crate::time::Instant;
use crate::wire::payload::Heartbeat;

use super::events::ConnectionStatus;
use super::timers::NodeTimer;
use super::NodeConfig;
use crate::timers::TimerTable;

/// The longest wait a gateway's retry hint can impose on a device (a hint beyond it, from a
/// faulty or hostile gateway, is cut to it).
pub const RETRY_HINT_MAX: Duration = Duration::from_secs(60);

/// Table of session state: key `b"resume_token"`, value the token (32); key
/// `b"generation"`, value the number of the last `Hello` (u64 LE); key `b"state_copied"`
/// (empty value) once the gateway said another copy of this device's data was used since.
pub const NODE_SESSION_TABLE: Table = Table("node_session");
const RESUME_TOKEN_KEY: &[u8] = b"resume_token";
const GENERATION_KEY: &[u8] = b"generation";
const STATE_COPIED_KEY: &[u8] = b"state_copied";

/// Where the link is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Not connected; reconnect at `retry_at`, or never if `None` (offline by choice, or
    /// revoked).
    Offline {
        /// When to try again.
        retry_at: Option<Instant>,
    },
    /// `Connect` was emitted; waiting for the transport.
    Connecting,
    /// Connected, `Hello` (or `Register`) sent, waiting for `HelloOk` until `deadline`.
    Handshaking {
        /// The connection.
        conn: ConnectionId,
        /// When the handshake is given up.
        deadline: Instant,
        /// When the `Hello` goes again if nothing answered it (none before a `Hello` left, and
        /// none once frames showed the gateway's session open).
        hello_again: Option<Instant>,
        /// The wait before that resend; it doubles with each.
        hello_wait: Duration,
    },
    /// Session open.
    Open {
        /// The connection.
        conn: ConnectionId,
        /// When the gateway was last heard.
        last_heard: Instant,
        /// When the next heartbeat is due.
        next_heartbeat: Instant,
    },
}

/// What a due link timer asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkDue {
    /// Nothing is due.
    Nothing,
    /// Open a connection now.
    Connect,
    /// The connection is dead (handshake or idle timeout): close it and reconnect later.
    Dead(ConnectionId),
    /// Nothing answered the `Hello` on this connection in time: send it again (same number).
    HelloAgain(ConnectionId),
    /// A heartbeat went out on the open session (its frame is returned by `heartbeat`).
    Heartbeat(ConnectionId, Heartbeat),
}

/// The node's link to its gateway. See the module docs.
#[derive(Clone, Debug)]
pub struct Link {
    state: LinkState,
    attempts: u32,
    /// Sessions in a row that the gateway ended with a refusal (a `Goodbye`) before they had
    /// lasted `backoff_max`: each counts as a failed attempt, though its connect succeeded, so
    /// that a refusal that repeats (a frame this gateway does not understand, a certificate it
    /// no longer takes) backs off instead of reconnecting in a tight loop.
    refusals: u32,
    /// When the open session opened (until it ends).
    open_since: Option<Instant>,
    heartbeat_interval: Duration,
    next_heartbeat_nonce: u64,
    resume_token: Option<[u8; 32]>,
    status: ConnectionStatus,
    idle_timeout: Duration,
    handshake_timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    /// The number of the last `Hello` this device's data sent (durable): the gateway refuses a
    /// `Hello` whose number is not above the last it saw, which only a copy of the data
    /// directory (a clone, or a restored backup) can send.
    generation: u64,
    /// The gateway said another copy of this data was used since: never connect again.
    copied: bool,
}

impl Link {
    /// The link of a node that just started: it connects at once.
    pub fn recover(
        config: &NodeConfig,
        now: Instant,
        store: &dyn StoreRead,
    ) -> Result<Link, StoreError> {
        assert!(
            config.backoff_initial <= config.backoff_max,
            "backoff_initial <= backoff_max"
        );
        let resume_token =
            match store.get(NODE_SESSION_TABLE, RESUME_TOKEN_KEY)? {
                Some(value) => Some(<[u8; 32]>::try_from(value.as_slice()).map_err(|_| {
                    StoreError::Corrupt {
                        table: NODE_SESSION_TABLE.0,
                        reason: "resume token length".into(),
                    }
                })?),
                None => None,
            };
        let generation = match store.get(NODE_SESSION_TABLE, GENERATION_KEY)? {
            Some(value) => {
                u64::from_le_bytes(<[u8; 8]>::try_from(value.as_slice()).map_err(|_| {
                    StoreError::Corrupt {
                        table: NODE_SESSION_TABLE.0,
                        reason: "generation length".into(),
                    }
                })?)
            }
            None => 0,
        };
        let copied = store.get(NODE_SESSION_TABLE, STATE_COPIED_KEY)?.is_some();
        Ok(Link {
            state: LinkState::Offline {
                retry_at: (!copied).then_some(now),
            },
            attempts: 0,
            refusals: 0,
            open_since: None,
            heartbeat_interval: config.heartbeat_interval,
            next_heartbeat_nonce: 0,
            resume_token,
            status: ConnectionStatus::Reconnecting { attempt: 0 },
            idle_timeout: config.idle_timeout,
            handshake_timeout: config.handshake_timeout,
            backoff_initial: config.backoff_initial,
            backoff_max: config.backoff_max,
            generation,
            copied,
        })
    }

    /// The number for the next `Hello`, one above the last, kept durably before the `Hello`
    /// leaves (its write commits before any output moves).
    pub fn next_generation(&mut self, writes: &mut WriteBatch) -> u64 {
        self.generation += 1;
        writes.put(
            NODE_SESSION_TABLE,
            GENERATION_KEY.to_vec(),
            self.generation.to_le_bytes().to_vec(),
        );
        self.generation
    }

    /// The number of the last `Hello` (a resent `Hello` carries it again).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// True once the gateway said another copy of this device's data was used since.
    pub fn state_copied(&self) -> bool {
        self.copied
    }

    /// Remembers for good that this copy of the device's data is stale: it never connects
    /// again. Returns the connection to close, if any.
    pub fn mark_copied(&mut self, writes: &mut WriteBatch) -> Option<ConnectionId> {
        self.copied = true;
        writes.put(NODE_SESSION_TABLE, STATE_COPIED_KEY.to_vec(), Vec::new());
        self.stay_offline()
    }

    // ---- getters ----

    /// Where the link is.
    pub fn state(&self) -> LinkState {
        self.state
    }

    /// Connection status as the user sees it.
    pub fn status(&self) -> ConnectionStatus {
        self.status
    }

    /// The connection being handshaken or open.
    pub fn current_conn(&self) -> Option<ConnectionId> {
        match self.state {
            LinkState::Handshaking { conn, .. } | LinkState::Open { conn, .. } => Some(conn),
            LinkState::Offline { .. } | LinkState::Connecting => None,
        }
    }

    /// The connection of the open session.
    pub fn open_conn(&self) -> Option<ConnectionId> {
        match self.state {
            LinkState::Open { conn, .. } => Some(conn),
            _ => None,
        }
    }

    /// True while a session is open.
    pub fn is_open(&self) -> bool {
        matches!(self.state, LinkState::Open { .. })
    }

    /// True while the handshake runs.
    pub fn is_handshaking(&self) -> bool {
        matches!(self.state, LinkState::Handshaking { .. })
    }

    /// Frames that only an open session carries came on `conn` before its `HelloOk`: the
    /// gateway opened the session and its `HelloOk` was lost, or is overtaken. Wait for it
    /// until `by` at the latest, not the whole handshake timeout (the gateway meanwhile
    /// delivers into a session this device does not know it has).
    pub fn hello_ok_overdue(&mut self, conn: ConnectionId, by: Instant) {
        if let LinkState::Handshaking {
            conn: waiting,
            deadline,
            hello_again,
            ..
        } = &mut self.state
        {
            if *waiting == conn {
                *deadline = (*deadline).min(by);
                // The gateway's session is open: another `Hello` would only be refused.
                *hello_again = None;
            }
        }
    }

    /// A `Hello` went out on the handshaking connection: unless something answers it within
    /// `wait`, it goes again, each time after twice the wait before (until the handshake's
    /// deadline). A QUIC stream does not lose a `Hello`, but the simulator's frames can, and
    /// a lost `Hello`, challenge or proof otherwise cost the whole handshake timeout.
    pub fn hello_sent(&mut self, now: Instant, wait: Duration) {
        if let LinkState::Handshaking {
            hello_again,
            hello_wait,
            ..
        } = &mut self.state
        {
            *hello_wait = wait;
            *hello_again = Some(now + wait);
        }
    }

    /// The gateway answered the handshake (a challenge): the next resend of the `Hello`, if
    /// the proof or what answers it is lost, waits a whole wait from now.
    pub fn handshake_answered(&mut self, now: Instant) {
        if let LinkState::Handshaking {
            hello_again: Some(at),
            hello_wait,
            ..
        } = &mut self.state
        {
            *at = now + *hello_wait;
        }
    }

    /// True if the user asked to stay offline (or the device was revoked).
    pub fn stays_offline(&self) -> bool {
        matches!(self.state, LinkState::Offline { retry_at: None })
    }

    /// The resume token to present in the next `Hello`.
    pub fn resume_token(&self) -> Option<[u8; 32]> {
        self.resume_token
    }

    /// Arms the link's timers in `timers` from its state (and clears the others).
    pub fn arm(&self, timers: &mut TimerTable<NodeTimer>) {
        let (mut reconnect, mut handshake, mut idle, mut heartbeat) = (None, None, None, None);
        match self.state {
            LinkState::Offline { retry_at } => reconnect = retry_at,
            LinkState::Connecting => {}
            LinkState::Handshaking {
                deadline,
                hello_again,
                ..
            } => handshake = Some(hello_again.map_or(deadline, |at| at.min(deadline))),
            LinkState::Open {
                last_heard,
                next_heartbeat,
                ..
            } => {
                idle = Some(last_heard + self.idle_timeout);
                heartbeat = Some(next_heartbeat);
            }
        }
        timers.set_or_clear(NodeTimer::Reconnect, reconnect);
        timers.set_or_clear(NodeTimer::Handshake, handshake);
        timers.set_or_clear(NodeTimer::Idle, idle);
        timers.set_or_clear(NodeTimer::Heartbeat, heartbeat);
    }

    // ---- transitions ----

    /// The transport connected; false if no connection was asked for (the caller closes it).
    pub fn connected(&mut self, now: Instant, conn: ConnectionId) -> bool {
        if self.state != LinkState::Connecting {
            return false;
        }
        self.state = LinkState::Handshaking {
            conn,
            deadline: now + self.handshake_timeout,
            hello_again: None,
            hello_wait: Duration::ZERO,
        };
        true
    }

    /// True if a connection attempt is in flight (a failure report concerns it).
    pub fn is_connecting(&self) -> bool {
        self.state == LinkState::Connecting
    }

    /// The gateway was heard on the open session.
    pub fn heard(&mut self, now: Instant) {
        if let LinkState::Open { last_heard, .. } = &mut self.state {
            *last_heard = now;
        }
    }

    /// `HelloOk`: the session is open. Stores a new resume token and takes the gateway's
    /// heartbeat interval.
    pub fn opened(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        resume_token: [u8; 32],
        heartbeat_interval_ms: u32,
        writes: &mut WriteBatch,
    ) {
        debug_assert!(self.is_handshaking(), "a session opens after a handshake");
        if self.resume_token != Some(resume_token) {
            self.resume_token = Some(resume_token);
            writes.put(
                NODE_SESSION_TABLE,
                RESUME_TOKEN_KEY.to_vec(),
                resume_token.to_vec(),
            );
        }
        if heartbeat_interval_ms > 0 {
            self.heartbeat_interval = Duration::from_millis(heartbeat_interval_ms.into());
        }
        self.state = LinkState::Open {
            conn,
            last_heard: now,
            next_heartbeat: now + self.heartbeat_interval,
        };
        self.attempts = 0;
        self.open_since = Some(now);
    }

    /// True if the open session (if any) has lasted long enough to count as a success.
    fn lasted(&self, now: Instant) -> bool {
        self.open_since
            .is_some_and(|since| now >= since + self.backoff_max)
    }

    /// The gateway ended the session (or the handshake) with a refusal; the caller backs off
    /// next. A refusal soon after the session opened makes the next wait as long as after one
    /// more failed connect; one after the session had lasted starts the count anew.
    pub fn refused(&mut self, now: Instant) {
        if self.lasted(now) {
            self.refusals = 0;
        }
        self.open_since = None;
        self.refusals = self.refusals.saturating_add(1);
    }

    /// Forgets the resume token (the gateway refused it, or refused this device).
    pub fn forget_resume_token(&mut self, writes: &mut WriteBatch) {
        if self.resume_token.take().is_some() {
            writes.delete(NODE_SESSION_TABLE, RESUME_TOKEN_KEY.to_vec());
        }
    }

    /// Runs the link's due timer, if one is due at `now`.
    pub fn on_timeout(&mut self, now: Instant) -> LinkDue {
        match self.state {
            LinkState::Offline { retry_at: Some(at) } if now >= at => {
                self.state = LinkState::Connecting;
                LinkDue::Connect
            }
            LinkState::Handshaking { conn, deadline, .. } if now >= deadline => LinkDue::Dead(conn),
            LinkState::Handshaking {
                conn,
                deadline,
                hello_again: Some(at),
                hello_wait,
            } if now >= at => {
                let wait = hello_wait * 2;
                self.state = LinkState::Handshaking {
                    conn,
                    deadline,
                    hello_again: Some(now + wait),
                    hello_wait: wait,
                };
                LinkDue::HelloAgain(conn)
            }
            LinkState::Open {
                conn,
                last_heard,
                next_heartbeat,
            } => {
                if now >= last_heard + self.idle_timeout {
                    return LinkDue::Dead(conn);
                }
                if now < next_heartbeat {
                    return LinkDue::Nothing;
                }
                self.next_heartbeat_nonce += 1;
                self.state = LinkState::Open {
                    conn,
                    last_heard,
                    next_heartbeat: now + self.heartbeat_interval,
                };
                let beat = Heartbeat {
                    nonce: self.next_heartbeat_nonce,
                    crl_version: None,
                    presence: None,
                    peer_roots: None,
                    peer_crls: None,
                    contacts: None,
                };
                LinkDue::Heartbeat(conn, beat)
            }
            _ => LinkDue::Nothing,
        }
    }

    /// The connection failed or died: try again after a random delay below a cap that doubles
    /// per failed attempt (full jitter). Returns the new status.
    pub fn back_off(&mut self, now: Instant, entropy: &mut dyn Entropy) -> ConnectionStatus {
        debug_assert!(!self.stays_offline(), "the caller checks");
        // A session that lasted, then failed for any other reason, forgets earlier refusals.
        if self.lasted(now) {
            self.refusals = 0;
        }
        self.open_since = None;
        let failures = self.attempts.saturating_add(self.refusals);
        let cap = self
            .backoff_initial
            .saturating_mul(1u32 << failures.min(20))
            .min(self.backoff_max);
        let cap_us = u64::try_from(cap.as_micros()).unwrap_or(u64::MAX);
        // At least a microsecond, so that a timer that fired is never due again at once.
        let delay = Duration::from_micros(entropy.below_inclusive(cap_us).max(1));
        debug_assert!(delay <= self.backoff_max, "the delay stays below the cap");
        self.attempts = self.attempts.saturating_add(1);
        self.state = LinkState::Offline {
            retry_at: Some(now + delay),
        };
        ConnectionStatus::Reconnecting {
            attempt: self.attempts,
        }
    }

    /// The gateway said it is going away on purpose and when to come back: back off as after
    /// a failure, but wait at least `hint` plus a random share of it (`hint` capped at
    /// [`RETRY_HINT_MAX`]), so that a restarting gateway's devices return spread over a window
    /// as wide as the hint instead of all at once. Returns the new status.
    pub fn back_off_for(
        &mut self,
        now: Instant,
        hint: Duration,
        entropy: &mut dyn Entropy,
    ) -> ConnectionStatus {
        let status = self.back_off(now, entropy);
        let hint = hint.min(RETRY_HINT_MAX);
        let hint_us = u64::try_from(hint.as_micros()).unwrap_or(u64::MAX);
        let at = now + hint + Duration::from_micros(entropy.below_inclusive(hint_us));
        if let LinkState::Offline {
            retry_at: Some(retry_at),
        } = &mut self.state
        {
            *retry_at = (*retry_at).max(at);
        }
        status
    }

    /// The user goes offline (or the device is revoked): no more reconnects. Returns the
    /// connection to close, if any.
    pub fn stay_offline(&mut self) -> Option<ConnectionId> {
        let conn = self.current_conn();
        self.state = LinkState::Offline { retry_at: None };
        conn
    }

    /// The user goes online again after `stay_offline`: connect at once. False if the link
    /// was not offline.
    pub fn go_online(&mut self, now: Instant) -> bool {
        if !matches!(self.state, LinkState::Offline { .. }) {
            return false;
        }
        self.attempts = 0;
        self.state = LinkState::Offline {
            retry_at: Some(now),
        };
        true
    }

    /// Records a status change; true if it is news for the application.
    pub fn set_status(&mut self, status: ConnectionStatus) -> bool {
        if self.status == status {
            return false;
        }
        self.status = status;
        true
    }
}
