//! The node's MLS state as one value: the device's MLS identity and KeyPackage pool
//! ([`DeviceMls`]) and its groups ([`DeviceGroups`]), present together or not at all; and the
//! node's group commands and the MLS side of its protocol (commits, Welcomes, removals,
//! KeyPackages).

use crate::env::{Entropy, StoreError, StoreRead, WriteBatch};
use crate::identity::DeviceKey;
use crate::ids::{ConnectionId, ConversationId, DeviceId, MsgId, UserId};
use crate::mls::device::{DeviceMls, DeviceMlsConfig};
use crate::mls::device_groups::{DeviceGroups, GroupAction, GroupError, Intent};
use crate::mls::group_ops::{GroupKind, Role};
use crate::time::Instant;
use crate::trust::TrustHolder;
use crate::wire::payload::{
    ErrorCode, FetchedKeyPackage, KeyPackageCount, KeyPackageFetch, KeyPackageUpload, Leave,
};
use crate::wire::{Payload, Routing};

use super::link::NODE_SESSION_TABLE;
use super::{dm_id, Node, NodeEvent};

/// Key of the gateway's external-sender key in the session table.
const GATEWAY_KEY: &[u8] = b"gateway_mls_key";

/// A device's MLS identity, pool and groups. See the module docs.
pub struct NodeMls {
    /// The MLS identity (signature key, provider, KeyPackage pool).
    pub device: DeviceMls,
    /// The groups this device is in or joining.
    pub groups: DeviceGroups,
}

impl core::fmt::Debug for NodeMls {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NodeMls")
            .field("groups", &self.groups)
            .finish_non_exhaustive()
    }
}

impl NodeMls {
    /// Reads the MLS state back (making the identity at first start: its writes go to
    /// `writes`).
    pub fn recover(
        config: DeviceMlsConfig,
        device: DeviceId,
        user: Option<UserId>,
        entropy: &mut dyn Entropy,
        store: &dyn StoreRead,
        writes: &mut WriteBatch,
    ) -> Result<NodeMls, StoreError> {
        let mls = DeviceMls::recover(config, device, entropy, store, NODE_SESSION_TABLE, writes)?;
        let mut groups = DeviceGroups::recover(device, user, store, &mls)?;
        groups.set_gateway_key(store.get(NODE_SESSION_TABLE, GATEWAY_KEY)?);
        Ok(NodeMls {
            device: mls,
            groups,
        })
    }

    /// Gives the MLS layer this device's certificate (its credential binding) and the root and
    /// CRL other members' credentials are checked against.
    pub fn bind(&mut self, key: &DeviceKey, trust: &TrustHolder) {
        if let Some(cert) = trust.certificate() {
            self.device.bind_certificate(key, cert);
        }
        if let Some(root) = trust.root() {
            self.device.set_trust(root.clone(), trust.crl().cloned());
        }
        if let Some(peers) = trust.peer_roots() {
            self.device.set_peer_roots(peers.clone());
        }
        self.device.set_peer_crls(trust.peer_crls().clone());
    }

    /// Keeps the gateway's external-sender key from its `HelloOk`, if it changed.
    pub fn set_gateway_key(&mut self, key: Vec<u8>, writes: &mut WriteBatch) {
        if self.groups.gateway_key() != Some(key.as_slice()) {
            writes.put(NODE_SESSION_TABLE, GATEWAY_KEY.to_vec(), key.clone());
            self.groups.set_gateway_key(Some(key));
        }
    }
}

impl Node {
    /// Starts a DM with every device of `peer` (and this user's other devices). The DM's id
    /// follows from the two users, so both sides name the same conversation; if both create it
    /// at once, the first creating commit wins and the other side joins from its Welcome.
    pub fn create_dm(&mut self, now: Instant, peer: UserId) -> Result<ConversationId, GroupError> {
        let user = self.config.user.ok_or(GroupError::NoIdentity)?;
        let conv = dm_id(user, peer);
        let m = self.mls.as_mut().ok_or(GroupError::NoIdentity)?;
        m.groups
            .create(conv, GroupKind::Dm, &[peer], self.fx.writes())?;
        self.drive_groups(now);
        self.refresh_timers();
        Ok(conv)
    }

    /// Starts a DM with every device of `peer`, a user of another `domain`: the group is made
    /// with this user's other devices first, then the peer's devices are added from the
    /// KeyPackages their own gateway hands to this device's (each checked against that
    /// domain's root as this device's own root vouched for it). The DM's id follows from the
    /// two users, as for a DM within one domain.
    pub fn create_dm_across(
        &mut self,
        now: Instant,
        peer: UserId,
        domain: &str,
    ) -> Result<ConversationId, GroupError> {
        let user = self.config.user.ok_or(GroupError::NoIdentity)?;
        let conv = dm_id(user, peer);
        let m = self.mls.as_mut().ok_or(GroupError::NoIdentity)?;
        m.groups
            .create(conv, GroupKind::Dm, &[], self.fx.writes())?;
        let add = Intent::AddForeign {
            domain: domain.to_string(),
            users: vec![peer.to_bytes().into()],
        };
        m.groups.request(conv, add, self.fx.writes())?;
        self.drive_groups(now);
        self.refresh_timers();
        Ok(conv)
    }

    /// Starts (or finds) the group of this user's own devices, with every other device of the
    /// user. Its id follows from the user; if two devices create it at once, the first
    /// creating commit wins and the other joins from its Welcome.
    pub fn create_own(&mut self, now: Instant) -> Result<ConversationId, GroupError> {
        let user = self.config.user.ok_or(GroupError::NoIdentity)?;
        let conv = super::own_id(user);
        let m = self.mls.as_mut().ok_or(GroupError::NoIdentity)?;
        m.groups
            .create(conv, GroupKind::Own, &[], self.fx.writes())?;
        self.drive_groups(now);
        self.refresh_timers();
        Ok(conv)
    }

    /// Creates a room owned by this device's user, inviting `users`.
    pub fn create_room(
        &mut self,
        now: Instant,
        users: &[UserId],
    ) -> Result<ConversationId, GroupError> {
        let mut id = [0u8; 16];
        self.entropy.fill_bytes(&mut id);
        let conv = ConversationId::from_bytes(id);
        let m = self.mls.as_mut().ok_or(GroupError::NoIdentity)?;
        m.groups
            .create(conv, GroupKind::Room, users, self.fx.writes())?;
        self.drive_groups(now);
        self.refresh_timers();
        Ok(conv)
    }

    /// Queues a change to a group (add users, remove a user or device, update, set a role).
    pub fn change_group(
        &mut self,
        now: Instant,
        conv: ConversationId,
        intent: Intent,
    ) -> Result<(), GroupError> {
        let m = self.mls.as_mut().ok_or(GroupError::NoIdentity)?;
        m.groups.request(conv, intent, self.fx.writes())?;
        self.drive_groups(now);
        self.refresh_timers();
        Ok(())
    }

    /// Leaves a group: the gateway proposes this device's removal, and a member commits it.
    pub fn leave(&mut self, now: Instant, conv: ConversationId) -> Result<(), GroupError> {
        self.change_group(now, conv, Intent::Leave)
    }

    /// Gives `user` a role in a room (the gateway checks that our user owns it).
    pub fn set_role(
        &mut self,
        now: Instant,
        conv: ConversationId,
        user: UserId,
        role: Role,
    ) -> Result<(), GroupError> {
        self.change_group(now, conv, DeviceGroups::role_change(user, role))
    }

    /// Lets every group with a queued change move, if a session is open.
    pub(super) fn drive_groups(&mut self, now: Instant) {
        if !self.link.is_open() {
            return;
        }
        let Some(m) = &mut self.mls else {
            return;
        };
        let entropy = &mut self.entropy;
        let mut next_id = || {
            let mut id = [0u8; 16];
            entropy.fill_bytes(&mut id);
            MsgId::from_bytes(id)
        };
        let patience = self.config.dm_welcome_patience;
        let actions = m
            .groups
            .drive(now, &m.device, patience, &mut next_id, self.fx.writes());
        let again = m.groups.reencrypt_ready(&m.device, self.fx.writes());
        for action in actions {
            self.perform(now, action);
        }
        let mut encrypted_again = std::collections::BTreeSet::new();
        for (msg_id, conv, result) in again {
            match result {
                Ok(body) => {
                    // Same id and place in the sender order, new ciphertext: the gateway never
                    // sequenced the old one.
                    // Not waiting any more (acknowledged, or refused for good since): nothing
                    // to send again; a refused message must not come back out of order.
                    if self.outbox.replace_body(msg_id, body, self.fx.writes()) {
                        encrypted_again.insert(conv);
                    }
                }
                Err(_) => {
                    self.outbox.remove(msg_id, self.fx.writes());
                    if let Some(m) = &mut self.mls {
                        m.groups.forget_sent(msg_id, self.fx.writes());
                    }
                    self.fx.event(NodeEvent::Rejected {
                        msg_id,
                        code: ErrorCode::NotMember,
                    });
                }
            }
        }
        // What waited behind them was turned away out of order meanwhile: all of it goes again,
        // in order.
        for conv in encrypted_again {
            self.retransmit_conversation(now, conv);
        }
    }

    pub(super) fn perform(&mut self, now: Instant, action: GroupAction) {
        let Some(conn) = self.link.current_conn() else {
            return;
        };
        match action {
            GroupAction::Submit {
                conversation,
                msg_id,
                body,
                welcome,
            } => self.enqueue(now, conversation, msg_id, false, body, welcome),
            GroupAction::Fetch {
                request,
                users,
                domain,
            } => {
                let fetch = KeyPackageFetch {
                    users: users.iter().map(|u| u.to_bytes().into()).collect(),
                    domain,
                };
                let routing = Routing {
                    seq: request,
                    ..Routing::default()
                };
                self.fx.send(conn, routing, Payload::KeyPackageFetch(fetch));
            }
            GroupAction::Joined { conversation, seq } => {
                self.inbox.set_cursor(conversation, seq, self.fx.writes());
                self.ack(conn, conversation, seq);
            }
            GroupAction::Acknowledge { conversation, seq } => self.ack(conn, conversation, seq),
            GroupAction::Leave(conversation) => {
                let routing = Routing {
                    conversation,
                    ..Routing::default()
                };
                self.fx.send(conn, routing, Payload::Leave(Leave {}));
            }
        }
    }

    pub(super) fn on_key_packages(
        &mut self,
        now: Instant,
        request: u64,
        found: Vec<FetchedKeyPackage>,
        exhausted: usize,
    ) {
        let msg_id = self.new_msg_id();
        let Some(m) = &mut self.mls else {
            return;
        };
        let outcome = m.groups.on_key_packages(
            now,
            request,
            &found,
            exhausted,
            &m.device,
            msg_id,
            self.fx.writes(),
        );
        match outcome {
            Ok(Some(action)) => self.perform(now, action),
            Ok(None) => {}
            Err(refusal) => {
                let names: Vec<String> = refusal.users.iter().map(ToString::to_string).collect();
                let at = match &refusal.domain {
                    Some(domain) => format!("the gateway of {domain}"),
                    None => "this gateway".to_string(),
                };
                let message = match refusal.why {
                    // A block is not told apart from no device: the user is not shown who
                    // blocked them, but is not sent looking for a mistake either.
                    None => format!(
                        "no device of {} was offered by {at} (none is registered there, or they do not accept invitations from you)",
                        names.join(", ")
                    ),
                    Some(why) => format!(
                        "no device of {} could be checked, so none was added: {why}",
                        names.join(", ")
                    ),
                };
                self.fx.event(NodeEvent::GroupChangeRefused {
                    conversation: refusal.conversation,
                    code: ErrorCode::UnknownUser,
                    message,
                });
            }
        }
        self.drive_groups(now);
    }

    pub(super) fn on_welcome(
        &mut self,
        now: Instant,
        conv: ConversationId,
        welcome: crate::wire::payload::Welcome,
    ) {
        let Some(m) = &mut self.mls else {
            return;
        };
        let cursor = self.inbox.cursor(conv);
        let result = m
            .groups
            .on_welcome(conv, &welcome, cursor, &m.device, self.fx.writes());
        match result {
            Ok(action) => {
                if let GroupAction::Joined { seq, .. } = action {
                    self.fx.event(NodeEvent::Joined {
                        conversation: conv,
                        seq,
                        kind: GroupKind::from_u8(welcome.kind).unwrap_or(GroupKind::Room),
                    });
                }
                self.perform(now, action);
                self.drive_groups(now);
            }
            Err(GroupError::RootNotVouched(domain)) => {
                // Not undecryptable: not checkable yet. The gateway sends the Welcome again,
                // and the device joins once its gateway vouches for that domain's root.
                self.stats.welcomes_waiting_for_roots += 1;
                self.fx.event(NodeEvent::JoinWaiting {
                    conversation: conv,
                    reason: format!(
                        "a member is certified by {domain}, whose root this device's gateway has not vouched for yet"
                    ),
                });
            }
            Err(e) => {
                // A Welcome we cannot use stays in the inbox; tell the application once per
                // session, without the Welcome's bytes.
                self.fx.event(NodeEvent::Undecryptable {
                    conversation: conv,
                    seq: welcome.seq,
                    sender: DeviceId(0),
                    reason: format!("cannot join from this Welcome: {e}"),
                });
            }
        }
    }

    /// The gateway refused our message `msg_id`; for a commit, the group drops or retries it.
    pub(super) fn group_message_refused(
        &mut self,
        now: Instant,
        routing: Routing,
        msg_id: MsgId,
        code: ErrorCode,
        message: &str,
    ) {
        let Some(m) = &mut self.mls else {
            return;
        };
        m.groups.forget_sent(msg_id, self.fx.writes());
        let conv = routing.conversation;
        let stale = code == ErrorCode::StaleEpoch;
        let forbidden = code == ErrorCode::Forbidden;
        let refused = m.groups.on_commit_refused(
            conv,
            msg_id,
            stale,
            forbidden,
            routing.epoch,
            &m.device,
            self.fx.writes(),
        );
        if refused.is_some() {
            self.fx.event(NodeEvent::GroupChangeRefused {
                conversation: conv,
                code,
                message: message.to_string(),
            });
        }
        self.drive_groups(now);
    }

    /// Tops up this device's KeyPackage pool when the gateway says it runs low.
    pub(super) fn replenish(&mut self, now: Instant, conn: ConnectionId, count: KeyPackageCount) {
        let Some(m) = &mut self.mls else {
            return; // a device without MLS keeps no pool
        };
        let result = m.device.on_count(
            now,
            count.remaining as usize,
            count.last_resort,
            count.replenish_below as usize,
            self.fx.writes(),
        );
        // Settled unless an upload goes out now: the gateway answers it with a new count.
        self.key_packages_settled_on = Some(conn);
        match result {
            Ok(Some((packages, last_resort))) => {
                self.key_packages_settled_on = None;
                self.stats.key_packages_uploaded += packages.len() as u64;
                let upload = KeyPackageUpload {
                    packages: packages.into_iter().map(|p| p.to_vec().into()).collect(),
                    last_resort: last_resort.map(|p| p.to_vec().into()),
                };
                // Held until the commit that carries the packages' private keys.
                self.fx
                    .send(conn, Routing::default(), Payload::KeyPackageUpload(upload));
            }
            Ok(None) => {}
            Err(_) => self.stats.key_package_failures += 1,
        }
    }

    /// A commit at `seq` removed this device from `conv`.
    pub(super) fn on_removed(&mut self, now: Instant, conv: ConversationId, seq: u64) {
        // A removal this device has read past is news of an earlier membership, overtaken by
        // the Welcome of a later one (the gateway sends the two back to back, and frames may
        // overtake each other): applying it would throw the current membership away, and with
        // it what arrives next (found by the simulator's swarm). A removed device never reads
        // up to the commit that removed it, and a later membership's Welcome comes after that
        // commit, so such news is always behind the cursor. One current notice is *at* the
        // cursor: a group's last member that leaves is removed at the head it has read (no
        // one is left to commit its removal); ignoring that one left it asking to leave for
        // ever (swarm seed 2026120600452).
        if seq < self.inbox.cursor(conv) {
            return;
        }
        let Some(m) = &mut self.mls else {
            return;
        };
        let (action, news) = m.groups.on_removed(conv, seq, &m.device, self.fx.writes());
        if news {
            self.fx.event(NodeEvent::RemovedFrom {
                conversation: conv,
                seq,
            });
            self.transfers.conversation_left(conv, &mut self.fx);
        }
        self.perform(now, action);
    }
}
