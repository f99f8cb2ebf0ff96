//! Sessions: every connection and how far it got in the handshake, the device each open session
//! speaks for, and the resume tokens that let a device skip the challenge next time.
//!
//! A connection starts [`Stage::AwaitingHello`]. A `Hello` with a certificate the registry
//! accepts either resumes at once (a valid resume token) or gets a challenge
//! ([`Stage::AwaitingProof`]); a proof signed by the device key opens the session
//! ([`Stage::Open`]). One device has at most one open session: a newer one replaces it. A
//! connection that has not opened a session within `hello_timeout` of being accepted, and a
//! session silent for `session_idle_timeout`, are closed by the gateway's tick.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::env::{scan_all, Entropy, StoreError, StoreRead, Table, WriteBatch};
use crate::identity::DevicePublicKey;
use crate::ids::{ConnectionId, DeviceId, UserId};
use crate::time::Instant;
use crate::wire::payload::{Cursor, ErrorCode};

/// Table of resume tokens: key `token(32)`, value `device(16) ++ expires_at(8)`.
pub const TOKENS_TABLE: Table = Table("resume_tokens");

/// Table of each device's last session number: key `device(16)`, value `u64` LE. A `Hello`
/// must number its session above it (see `Hello::generation`).
pub const GENERATIONS_TABLE: Table = Table("device_generations");

/// What a connection waits for in the handshake.
#[derive(Clone, Debug)]
pub enum Stage {
    /// Connected; no `Hello` yet.
    AwaitingHello,
    /// `Challenge` sent; waiting for the `Proof`.
    AwaitingProof,
    /// Session open for this device.
    Open(DeviceId),
}

/// A challenge in flight: what the `Hello` said, kept until the proof arrives.
#[derive(Clone, Debug)]
pub struct Challenged {
    /// The device the hello claimed.
    pub device: DeviceId,
    /// Its key (checked against the certificate).
    pub key: DevicePublicKey,
    /// The nonce the proof must sign.
    pub nonce: [u8; 32],
    /// The cursors the hello presented.
    pub cursors: Vec<Cursor>,
    /// The user the certificate names.
    pub user: Option<UserId>,
    /// The hello's session number (see `Hello::generation`).
    pub generation: Option<u64>,
    /// The resume token the hello presented, known here or not: it names the run of the
    /// device's last session (see `delivery::Runs`).
    pub token: Option<[u8; 32]>,
}

#[derive(Clone, Debug)]
enum Auth {
    AwaitingHello,
    AwaitingProof(Box<Challenged>),
    Open(DeviceId),
}

#[derive(Clone, Debug)]
struct Session {
    auth: Auth,
    opened_at: Instant,
    last_heard: Instant,
    /// Trust root and CRL requests answered on this connection (bounded: anyone may ask).
    lookups: u32,
}

/// Most trust root and CRL requests a connection gets answered before its session opens, and
/// most trust root requests in all: enough for a device that checks a pin, and no amplifier.
pub const LOOKUPS_MAX: u32 = 4;

/// What a presented resume token is worth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Valid for this device: the session opens without a challenge.
    Valid,
    /// This device's, but expired.
    Expired,
    /// Unknown, or another device's.
    Invalid,
}

/// Counters of the session sub-machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SessionStats {
    /// Sessions opened by a challenge and proof.
    pub authenticated: u64,
    /// Sessions opened by a resume token.
    pub resumed: u64,
}

/// Every connection of the gateway and the resume tokens of its devices.
#[derive(Debug, Default)]
pub struct Sessions {
    sessions: BTreeMap<ConnectionId, Session>,
    online: BTreeMap<DeviceId, ConnectionId>,
    tokens: BTreeMap<[u8; 32], (DeviceId, Instant)>,
    device_tokens: BTreeMap<DeviceId, [u8; 32]>,
    generations: BTreeMap<DeviceId, u64>,
    stats: SessionStats,
}

impl Sessions {
    /// Reads the resume tokens back (sessions themselves do not survive a restart).
    pub fn recover(store: &dyn StoreRead) -> Result<Sessions, StoreError> {
        let mut sessions = Sessions::default();
        scan_all(store, TOKENS_TABLE, |key, value| {
            let corrupt = || StoreError::Corrupt {
                table: TOKENS_TABLE.0,
                reason: format!("token record {} / {} bytes", key.len(), value.len()),
            };
            let token: [u8; 32] = key.try_into().map_err(|_| corrupt())?;
            if value.len() != 24 {
                return Err(corrupt());
            }
            let device = DeviceId::from_bytes(value[..16].try_into().expect("16 bytes"));
            let expires = Instant(u64::from_be_bytes(value[16..].try_into().expect("8 bytes")));
            sessions.tokens.insert(token, (device, expires));
            sessions.device_tokens.insert(device, token);
            Ok(())
        })?;
        scan_all(store, GENERATIONS_TABLE, |key, value| {
            let corrupt = || StoreError::Corrupt {
                table: GENERATIONS_TABLE.0,
                reason: format!("generation record {} / {} bytes", key.len(), value.len()),
            };
            let device = DeviceId::from_bytes(key.try_into().map_err(|_| corrupt())?);
            let last = u64::from_le_bytes(value.try_into().map_err(|_| corrupt())?);
            sessions.generations.insert(device, last);
            Ok(())
        })?;
        Ok(sessions)
    }

    /// Records that an authenticated `Hello` of `device` numbered its session `generation`;
    /// `Err` with the last number if it is not above it (a stale copy of the device's data).
    pub fn advance_generation(
        &mut self,
        device: DeviceId,
        generation: u64,
        writes: &mut WriteBatch,
    ) -> Result<(), u64> {
        let last = self.generations.get(&device).copied();
        if let Some(last) = last.filter(|last| generation <= *last) {
            return Err(last);
        }
        self.generations.insert(device, generation);
        writes.put(
            GENERATIONS_TABLE,
            device.to_bytes().to_vec(),
            generation.to_le_bytes().to_vec(),
        );
        Ok(())
    }

    // ---- getters ----

    /// Number of connections (authenticated or not).
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// True if no connection is open.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Where a connection is in the handshake; `None` for a connection that is gone.
    pub fn stage(&self, conn: ConnectionId) -> Option<Stage> {
        self.sessions.get(&conn).map(|s| match s.auth {
            Auth::AwaitingHello => Stage::AwaitingHello,
            Auth::AwaitingProof(_) => Stage::AwaitingProof,
            Auth::Open(device) => Stage::Open(device),
        })
    }

    /// Counts a trust root or CRL request on `conn`; false if the connection has had its share
    /// (see [`LOOKUPS_MAX`]).
    pub fn lookup_allowed(&mut self, conn: ConnectionId) -> bool {
        let Some(session) = self.sessions.get_mut(&conn) else {
            return false;
        };
        session.lookups += 1;
        session.lookups <= LOOKUPS_MAX
    }

    /// The device a connection's open session speaks for.
    pub fn device(&self, conn: ConnectionId) -> Option<DeviceId> {
        match self.sessions.get(&conn)?.auth {
            Auth::Open(device) => Some(device),
            _ => None,
        }
    }

    /// The connection of a device's open session.
    pub fn online(&self, device: DeviceId) -> Option<ConnectionId> {
        self.online.get(&device).copied()
    }

    /// The connections with an open session, in connection order (those news goes to: peer
    /// roots and peer CRLs as the gateway learns them).
    pub fn open_connections(&self) -> Vec<ConnectionId> {
        self.connections()
            .filter_map(|(conn, device)| device.map(|_| conn))
            .collect()
    }

    /// Every connection with the device of its open session, in connection order.
    pub fn connections(&self) -> impl Iterator<Item = (ConnectionId, Option<DeviceId>)> + '_ {
        self.sessions.iter().map(|(&conn, s)| {
            let device = match s.auth {
                Auth::Open(device) => Some(device),
                _ => None,
            };
            (conn, device)
        })
    }

    /// Counters.
    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    // ---- the handshake ----

    /// A connection was accepted; its hello timeout runs from `now`.
    pub fn accept(&mut self, now: Instant, conn: ConnectionId) {
        let session = Session {
            auth: Auth::AwaitingHello,
            opened_at: now,
            last_heard: now,
            lookups: 0,
        };
        let previous = self.sessions.insert(conn, session);
        debug_assert!(previous.is_none(), "connection ids are unique");
    }

    /// The connection sent something: its idle timeout restarts. Returns its stage, `None` for a
    /// connection that is gone (a frame raced with its close).
    pub fn heard(&mut self, now: Instant, conn: ConnectionId) -> Option<Stage> {
        let session = self.sessions.get_mut(&conn)?;
        debug_assert!(now >= session.opened_at, "time does not run backwards");
        session.last_heard = now;
        self.stage(conn)
    }

    /// What the resume token a `Hello` of `device` presented is worth at `now`.
    pub fn check_resume(&self, now: Instant, device: DeviceId, token: &[u8; 32]) -> Resume {
        match self.tokens.get(token) {
            Some(&(owner, expires)) if owner == device && now < expires => Resume::Valid,
            Some(&(owner, _)) if owner == device => Resume::Expired,
            _ => Resume::Invalid,
        }
    }

    /// A challenge went out on `conn`; the proof must answer it.
    pub fn challenge(&mut self, conn: ConnectionId, challenged: Challenged) {
        let session = self
            .sessions
            .get_mut(&conn)
            .expect("challenging a live session");
        debug_assert!(matches!(session.auth, Auth::AwaitingHello));
        session.auth = Auth::AwaitingProof(Box::new(challenged));
    }

    /// The nonce of the challenge out on `conn` if `device` is the one it challenged: a
    /// `Hello` repeated by a device that heard no challenge (or whose proof was lost) gets the
    /// same challenge again.
    pub fn pending_challenge(&self, conn: ConnectionId, device: DeviceId) -> Option<[u8; 32]> {
        match &self.sessions.get(&conn)?.auth {
            Auth::AwaitingProof(challenged) if challenged.device == device => {
                Some(challenged.nonce)
            }
            _ => None,
        }
    }

    /// The challenge a proof on `conn` answers (the connection goes back to awaiting a hello
    /// until the session opens).
    pub fn take_challenge(&mut self, conn: ConnectionId) -> Option<Challenged> {
        let session = self.sessions.get_mut(&conn)?;
        match std::mem::replace(&mut session.auth, Auth::AwaitingHello) {
            Auth::AwaitingProof(challenged) => Some(*challenged),
            other => {
                session.auth = other;
                None
            }
        }
    }

    /// Counts an opening by proof or by resume token.
    pub fn count_opening(&mut self, resumed: bool) {
        if resumed {
            self.stats.resumed += 1;
        } else {
            self.stats.authenticated += 1;
        }
    }

    /// Opens the session on `conn` for `device`. Returns the connection of the device's
    /// previous session if it is still open: the caller closes it (one session per device).
    pub fn open(&mut self, conn: ConnectionId, device: DeviceId) -> Option<ConnectionId> {
        debug_assert!(device != DeviceId(0), "device ids come from keys");
        let mut replaced = None;
        if let Some(old) = self.online.insert(device, conn) {
            if old != conn && self.device(old) == Some(device) {
                replaced = Some(old);
            }
        }
        let session = self
            .sessions
            .get_mut(&conn)
            .expect("opening a live session");
        session.auth = Auth::Open(device);
        replaced
    }

    /// Forgets a connection that closed or was closed; false if it was already gone.
    pub fn forget(&mut self, conn: ConnectionId) -> bool {
        let Some(session) = self.sessions.remove(&conn) else {
            return false;
        };
        if let Auth::Open(device) = session.auth {
            if self.online.get(&device) == Some(&conn) {
                self.online.remove(&device);
            }
        }
        true
    }

    /// Connections to close at `now`: handshakes not done within `hello_timeout` of being
    /// accepted, and sessions silent for `idle_timeout`; in connection order.
    pub fn timed_out(
        &self,
        now: Instant,
        hello_timeout: Duration,
        idle_timeout: Duration,
    ) -> Vec<(ConnectionId, ErrorCode, &'static str)> {
        let mut to_close = Vec::new();
        for (&conn, session) in &self.sessions {
            match session.auth {
                Auth::Open(_) => {
                    if now.saturating_since(session.last_heard) >= idle_timeout {
                        to_close.push((conn, ErrorCode::HeartbeatTimeout, "no heartbeat in time"));
                    }
                }
                _ => {
                    if now.saturating_since(session.opened_at) >= hello_timeout {
                        to_close.push((
                            conn,
                            ErrorCode::NotAuthenticated,
                            "handshake not completed in time",
                        ));
                    }
                }
            }
        }
        to_close
    }

    // ---- resume tokens ----

    /// Issues the device's new resume token, replacing its old one: `stamp` (the run that
    /// issues it, see `delivery::Runs`) and random bytes after it.
    pub fn issue_token(
        &mut self,
        now: Instant,
        device: DeviceId,
        ttl: Duration,
        stamp: &[u8],
        entropy: &mut dyn Entropy,
        writes: &mut WriteBatch,
    ) -> [u8; 32] {
        assert!(stamp.len() <= 16, "at least 16 random bytes in a token");
        self.drop_device_token(device, writes);
        let mut token = [0u8; 32];
        entropy.fill_bytes(&mut token);
        token[..stamp.len()].copy_from_slice(stamp);
        let expires = now + ttl;
        self.tokens.insert(token, (device, expires));
        self.device_tokens.insert(device, token);
        let mut value = Vec::with_capacity(24);
        value.extend_from_slice(&device.to_bytes());
        value.extend_from_slice(&expires.0.to_be_bytes());
        writes.put(TOKENS_TABLE, token.to_vec(), value);
        debug_assert_eq!(
            self.tokens.len(),
            self.device_tokens.len(),
            "one token per device"
        );
        token
    }

    /// Drops the device's resume token, if it has one (revocation, or a new one replacing it).
    pub fn drop_device_token(&mut self, device: DeviceId, writes: &mut WriteBatch) {
        if let Some(token) = self.device_tokens.get(&device).copied() {
            self.remove_token(token, writes);
        }
    }

    /// Drops up to `max` expired tokens.
    pub fn expire_tokens(&mut self, now: Instant, max: usize, writes: &mut WriteBatch) {
        let expired: Vec<[u8; 32]> = self
            .tokens
            .iter()
            .filter(|(_, (_, expires))| *expires <= now)
            .take(max)
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            self.remove_token(token, writes);
        }
    }

    fn remove_token(&mut self, token: [u8; 32], writes: &mut WriteBatch) {
        if let Some((device, _)) = self.tokens.remove(&token) {
            if self.device_tokens.get(&device) == Some(&token) {
                self.device_tokens.remove(&device);
            }
            writes.delete(TOKENS_TABLE, token.to_vec());
        }
    }
}
