//! The node's side of the session, as `impl Node`: the `Hello` (with the session number that
//! catches a copied data directory), `HelloOk`, what follows a session's opening (vouches,
//! renewal, the CRL), and the gateway's refusals, revocation and reconnects.

use super::*;
use std::time::Duration;

impl Node {
    /// Opens a session with the device's certificate: a `Hello` with the next number, sent
    /// again with the same number if nothing answers it (see [`Link::hello_sent`]).
    pub(super) fn send_hello(&mut self, now: Instant, conn: ConnectionId) {
        let generation = self.link.next_generation(self.fx.writes());
        self.send_hello_numbered(conn, generation);
        let wait = HELLO_OK_GRACE.max(self.round_trip.estimate() * 2);
        self.link.hello_sent(now, wait);
    }

    /// The `Hello` on `conn` went unanswered: the same again (a lost `Hello`, challenge or
    /// proof; the gateway answers a repeated `Hello` with its challenge again).
    pub(super) fn send_hello_again(&mut self, conn: ConnectionId) {
        self.stats.hellos_again += 1;
        self.send_hello_numbered(conn, self.link.generation());
    }

    fn send_hello_numbered(&mut self, conn: ConnectionId, generation: u64) {
        let mut cursors: Vec<Cursor> = self
            .inbox
            .cursors()
            .iter()
            .map(|(c, s)| {
                let token = self.link.resume_token();
                let since = self.inbox.read_since(*c, token.as_ref());
                Cursor {
                    since: since.map(|read| read.since),
                    // The run's stamp only when it is not the token's (the usual case).
                    since_run: since
                        .map(|read| read.stamp)
                        .filter(|stamp| token.is_none_or(|t| t[..16] != stamp[..])),
                    skipped: since
                        .and_then(|read| read.skipped)
                        .map(|(from, to)| [from, to]),
                    ..Cursor::read(*c, *s, self.inbox.last_read(*c))
                }
            })
            .collect();
        cursors.truncate(CURSORS_LEN_MAX);
        let routing = Routing {
            sender: self.config.device,
            ..Routing::default()
        };
        let hello = Hello {
            cursors,
            device_key: self.config.key.public().0,
            resume_token: self.link.resume_token(),
            user: self.config.user.map(UserId::to_bytes),
            certificate: self.trust.hello_certificate().map(Into::into),
            generation: Some(generation),
        };
        self.fx.send(conn, routing, Payload::Hello(hello));
    }

    /// `HelloOk`: the session is open; catch up on what waited for it.
    pub(super) fn opened(&mut self, now: Instant, conn: ConnectionId, ok: HelloOk) {
        self.link.opened(
            now,
            conn,
            ok.resume_token,
            ok.heartbeat_interval_ms,
            self.fx.writes(),
        );
        self.inbox.set_token(Some(&ok.resume_token));
        if let (Some(m), Some(key)) = (&mut self.mls, ok.external_sender) {
            m.set_gateway_key(Vec::from(key), self.fx.writes());
        }
        if let Some(encoded) = ok.peer_roots {
            self.take_peer_roots(now, &encoded);
        }
        if ok.peer_crls.is_some() && ok.peer_crls != self.trust.holder().peer_crls_digest() {
            // Another domain revoked a device while this one was away: catch up at once.
            let fetch = CrlFetch {
                have_version: self.trust.holder().crl_version(),
                peers: Some(true),
            };
            self.fx
                .send(conn, Routing::default(), Payload::CrlFetch(fetch));
        }
        self.stats.sessions += 1;
        self.set_status(ConnectionStatus::Connected);
        // Catch up on revocations made while this device was away.
        let fetch = CrlFetch {
            have_version: self.trust.holder().crl_version(),
            peers: None,
        };
        self.fx
            .send(conn, Routing::default(), Payload::CrlFetch(fetch));
        self.send_pending_vouch(now);
        self.trust.session_opened();
        self.renew_if_due(now, conn);
        self.round_trip.session_opened();
        for msg_id in self.outbox.ids() {
            self.transmit(now, conn, msg_id);
        }
        self.drive_groups(now);
        self.transfers
            .session_opened(now, conn, &self.files, &mut self.fx);
        self.social.session_opened(conn, &mut self.fx);
    }

    pub(super) fn send_pending_vouch(&mut self, now: Instant) {
        let Some(vouch) = self.trust.pending_vouch(now, &mut self.fx) else {
            return;
        };
        if let Some(conn) = self.link.open_conn() {
            self.fx.send(conn, Routing::default(), vouch);
        }
    }

    pub(super) fn renew_if_due(&mut self, now: Instant, conn: ConnectionId) {
        if let Some(renew) = self.trust.renewal_due(now) {
            self.fx.send(conn, Routing::default(), renew);
        }
    }

    /// The gateway's set of other domains' roots: kept if this device's own root signed it
    /// (the MLS layer checks other domains' members against them from then on); a set it did
    /// not sign is refused and reported, and the one held before stays.
    pub(super) fn take_peer_roots(&mut self, now: Instant, encoded: &[u8]) {
        match self
            .trust
            .holder_mut()
            .accept_peer_roots(encoded, self.fx.writes())
        {
            Ok(true) => {
                self.bind_mls_to_trust();
                self.resume_parked(now);
            }
            Ok(false) => {}
            Err(e) => {
                self.stats.peer_roots_refused += 1;
                self.fx.event(NodeEvent::PeerRootsRefused {
                    reason: e.to_string(),
                });
            }
        }
    }

    /// Gives the MLS layer the certificate, root and CRL it checks credentials against.
    pub(super) fn bind_mls_to_trust(&mut self) {
        if let Some(m) = &mut self.mls {
            m.bind(&self.config.key, self.trust.holder());
        }
    }

    /// A CRL from the gateway (pushed on revocation, or answering our fetch).
    pub(super) fn on_crl(&mut self, now: Instant, crl: &[u8]) {
        let outcome = self.trust.on_crl(self.config.device, crl, &mut self.fx);
        match outcome {
            CrlOutcome::Updated { revoked } => {
                self.bind_mls_to_trust();
                if revoked {
                    self.revoked(now);
                }
            }
            CrlOutcome::PeerUpdated => self.bind_mls_to_trust(),
            CrlOutcome::Unchanged => {}
        }
    }

    /// This device is revoked: it stops connecting for good.
    pub(super) fn revoked(&mut self, _now: Instant) {
        if let Some(conn) = self.link.stay_offline() {
            self.fx.hold(NodeOutput::Close(conn));
        }
        self.link.forget_resume_token(self.fx.writes());
        self.set_status(ConnectionStatus::Offline);
        self.fx.event(NodeEvent::Revoked);
    }

    /// True if this copy of the device's data was found stale (another copy was used since):
    /// it never connects again.
    pub fn state_copied(&self) -> bool {
        self.link.state_copied()
    }

    /// The gateway ended the session: tell the user if it refused us, then reconnect.
    pub(super) fn refused(&mut self, now: Instant, conn: ConnectionId, goodbye: &Goodbye) {
        let code = ErrorCode::from_u16(goodbye.code);
        if code == ErrorCode::DeviceRevoked {
            self.revoked(now);
            return;
        }
        if code == ErrorCode::DeviceStateCopied {
            // The refusing connection closes below; no other is open (one session at a time).
            let open = self.link.mark_copied(self.fx.writes());
            debug_assert!(open.is_none_or(|c| c == conn), "one connection at a time");
            self.fx.hold(NodeOutput::Close(conn));
            self.set_status(ConnectionStatus::Offline);
            self.fx.event(NodeEvent::Refused {
                code,
                message: STATE_COPIED.into(),
            });
            return;
        }
        if matches!(
            code,
            ErrorCode::CertificateExpired
                | ErrorCode::CertificateInvalid
                | ErrorCode::ForeignDomain
                | ErrorCode::CertificateRequired
        ) {
            // Register again on the next connection.
            self.trust.forget_certificate(&mut self.fx);
        }
        if matches!(
            code,
            ErrorCode::AuthenticationFailed
                | ErrorCode::DeviceNotAdmitted
                | ErrorCode::UserMismatch
                | ErrorCode::CertificateExpired
                | ErrorCode::CertificateInvalid
                | ErrorCode::CertificateNotYetValid
                | ErrorCode::ForeignDomain
                | ErrorCode::CertificateRequired
                | ErrorCode::EnrolmentTokenInvalid
                | ErrorCode::EnrolmentTokenUsed
                | ErrorCode::EnrolmentTokenExpired
                | ErrorCode::PairingRefused
                | ErrorCode::RegistrationsLimited
        ) {
            self.link.forget_resume_token(self.fx.writes());
            let message = match goodbye.retry_after_ms {
                Some(ms) => format!(
                    "{}; try again in {}",
                    goodbye.message,
                    crate::gateway::limits::describe_wait(Duration::from_millis(ms.into()))
                ),
                None => goodbye.message.clone(),
            };
            self.fx.event(NodeEvent::Refused { code, message });
        }
        self.fx.hold(NodeOutput::Close(conn));
        // A gateway going away on purpose refuses nothing: its hint says when to come back.
        // Counted as a refusal, two restarts in a row would double every wait after them (a
        // device that then finds the gateway still down would wait up to `backoff_max` once
        // it is back).
        if code != ErrorCode::ShuttingDown {
            self.link.refused(now);
        }
        let hint = goodbye
            .retry_after_ms
            .map(|ms| Duration::from_millis(u64::from(ms)));
        self.schedule_reconnect_after(now, hint);
    }

    pub(super) fn schedule_reconnect(&mut self, now: Instant) {
        self.schedule_reconnect_after(now, None);
    }

    /// Backs off before the next connect; with the gateway's retry hint, at least that long.
    fn schedule_reconnect_after(&mut self, now: Instant, hint: Option<Duration>) {
        if self.link.stays_offline() {
            return; // the user asked to stay offline
        }
        self.inbox.connection_lost();
        if let Some(m) = &mut self.mls {
            m.groups.connection_lost();
        }
        let status = match hint {
            Some(hint) => self.link.back_off_for(now, hint, self.entropy.as_mut()),
            None => self.link.back_off(now, self.entropy.as_mut()),
        };
        self.set_status(status);
    }

    pub(super) fn set_status(&mut self, status: ConnectionStatus) {
        if self.link.set_status(status) {
            self.fx.event(NodeEvent::Status(status));
        }
    }
}
