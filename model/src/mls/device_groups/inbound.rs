//! What comes in from the gateway: Welcomes, removal notices, and every sequenced message of a
//! group (commits checked against their declaration and merged, application messages
//! decrypted, the gateway's proposals kept for a commit).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;

use super::{
    device_of, devices_by_leaf, drawn, mls_error, verify_added_leaf, DeviceGroups, GroupAction,
    GroupEntry, GroupError, GroupStatus, Intent, MlsStep, Processed, NODE_SENT_TABLE,
};
use crate::env::WriteBatch;
use crate::ids::{ConversationId, DeviceId, MsgId, UserId};
use crate::mls::device::DeviceMls;
use crate::mls::group_ops::GroupOps;
use crate::mls::{join_config, sender_ratchet};
use crate::wire::payload::Welcome;

impl DeviceGroups {
    /// A Welcome from our inbox: join the group, unless we are in it already.
    /// `cursor` is how far this device has read the conversation: a Welcome beyond it means a
    /// commit removed the device (its notice was overtaken) and another added it back.
    pub fn on_welcome(
        &mut self,
        conv: ConversationId,
        notice: &Welcome,
        cursor: u64,
        mls: &DeviceMls,
        writes: &mut WriteBatch,
    ) -> Result<GroupAction, GroupError> {
        let (seq, kind, welcome, roster) = (
            notice.seq,
            notice.kind,
            &notice.welcome[..],
            &notice.members[..],
        );
        let joined = GroupAction::Joined {
            conversation: conv,
            seq,
        };
        let member = self.entries.get(&conv).is_some_and(|e| {
            matches!(
                e.status,
                GroupStatus::Synchronized
                    | GroupStatus::PendingCommit {
                        creating: false,
                        ..
                    }
            )
        });
        if member && self.groups.contains_key(&conv) && cursor >= seq {
            return Ok(GroupAction::Acknowledge {
                conversation: conv,
                seq,
            });
        }
        let provider = mls.provider();
        let sampling = mls.decrypt_sample().is_some();
        let transaction = provider.transaction();
        if let Some(mut lost) = self.groups.remove(&conv) {
            // Our own group lost the race to create this conversation: its records make way for
            // the group we join under the same id.
            let _ = lost.delete(provider.storage());
        }
        let result = MlsMessageIn::tls_deserialize_exact(welcome)
            .map_err(mls_error(MlsStep::Decode))
            .and_then(|m| match m.extract() {
                MlsMessageBodyIn::Welcome(w) => Ok(w),
                _ => Err(GroupError::mls(MlsStep::Decode, "not a Welcome")),
            })
            .and_then(|w| {
                StagedWelcome::new_from_welcome(
                    provider,
                    &join_config(sender_ratchet(sampling)),
                    w,
                    None,
                )
                .map_err(mls_error(MlsStep::Join))
            })
            .and_then(|staged| {
                staged
                    .into_group(provider)
                    .map_err(mls_error(MlsStep::Join))
            });
        let group = result?;
        // A member certified by a domain whose root is not vouched for here: the Welcome stays
        // in the inbox (this device's gateway may not have met that domain's yet).
        let unvouched = group.members().find_map(|m| {
            let basic = BasicCredential::try_from(m.credential.clone()).ok()?;
            mls.unvouched_domain(basic.identity())
        });
        if let Some(domain) = unvouched {
            return Err(GroupError::RootNotVouched(domain));
        }
        // Every member of the group joined must be certified and bound to its MLS key; one
        // revoked since it joined is being removed by the group (see `verify_member_at_join`).
        let uncertified = group.members().find_map(|m| {
            let basic = match BasicCredential::try_from(m.credential.clone()) {
                Ok(basic) => basic,
                Err(_) => {
                    return Some((
                        m.index,
                        "a credential that is not a basic credential".into(),
                    ))
                }
            };
            mls.verify_member_at_join(basic.identity(), m.signature_key.as_slice())
                .err()
                .map(|e| (m.index, e))
        });
        if let Some((leaf, reason)) = uncertified {
            return Err(GroupError::mls(
                MlsStep::Verify,
                format!(
                    "the group's member at leaf {} fails its certificate check: {reason}",
                    leaf.u32()
                ),
            ));
        }
        // The roster comes from the gateway's view of the group; a member gateway of another
        // domain than the conversation's home has none, and the members' own certified
        // credentials (checked above) say the same.
        let derived = roster.is_empty().then(|| roster_of(&group, mls));
        transaction.commit(writes);
        self.groups.insert(conv, group);
        let intents = self
            .entries
            .get(&conv)
            .map(|e| e.intents.clone())
            .unwrap_or_default();
        let mut members = derived.unwrap_or_else(|| roster.to_vec());
        members.sort_by_key(|m| *m.device);
        self.entries.insert(
            conv,
            GroupEntry {
                kind,
                status: GroupStatus::Synchronized,
                intents,
                members,
                retry_at_epoch: 0,
                proposals_seen_at: None,
            },
        );
        self.persist(conv, writes);
        Ok(joined)
    }

    /// A notice from our inbox: the commit at `seq` removed this device. Returns the
    /// acknowledgement to send, and whether this is news (not a repeated notice).
    pub fn on_removed(
        &mut self,
        conv: ConversationId,
        seq: u64,
        mls: &DeviceMls,
        writes: &mut WriteBatch,
    ) -> (GroupAction, bool) {
        let ack = GroupAction::Acknowledge {
            conversation: conv,
            seq,
        };
        let Some(entry) = self.entries.get_mut(&conv) else {
            return (ack, false);
        };
        if matches!(entry.status, GroupStatus::Removed { .. }) {
            return (ack, false);
        }
        entry.status = GroupStatus::Removed { seq };
        entry.intents.clear();
        if let Some(mut group) = self.groups.remove(&conv) {
            let transaction = mls.provider().transaction();
            let _ = group.delete(mls.provider().storage());
            transaction.commit(writes);
        }
        self.persist(conv, writes);
        (ack, true)
    }

    /// Processes the message sequenced at `seq` in a group conversation.
    #[allow(clippy::too_many_arguments)]
    pub fn on_deliver(
        &mut self,
        conv: ConversationId,
        seq: u64,
        sender: DeviceId,
        msg_id: MsgId,
        body: &[u8],
        mls: &DeviceMls,
        writes: &mut WriteBatch,
    ) -> Processed {
        if sender == self.device {
            return self.on_own_message(conv, msg_id, mls, writes);
        }
        let Some(group) = self.groups.get_mut(&conv) else {
            return Processed::Nothing;
        };
        let provider = mls.provider();
        let message = match MlsMessageIn::tls_deserialize_exact(body)
            .map_err(mls_error(MlsStep::Decode))
            .and_then(|m| {
                m.try_into_protocol_message()
                    .map_err(mls_error(MlsStep::Decode))
            }) {
            Ok(message) => message,
            Err(e) => return Processed::Failed(e.to_string()),
        };
        if let Some(sample) = mls.decrypt_sample() {
            // The roster's size (counting MLS members would copy every leaf).
            let members = self.entries.get(&conv).map_or(1, |e| e.members.len()) as u64;
            if message.content_type() == ContentType::Application
                && !drawn(conv, seq, self.device, members, sample)
            {
                return Processed::Skipped;
            }
        }
        // A commit adding a device of a domain whose root is not vouched for here yet: wait
        // before processing it (processing spends its key, so it could not be tried again).
        let commit = message.content_type() == ContentType::Commit;
        if let Some(Ok((framing, aad))) =
            commit.then(|| crate::mls::commit_authority::read_message(body))
        {
            if framing.kind == crate::mls::commit_authority::Kind::Commit {
                let unvouched = GroupOps::decode(&aad)
                    .ok()
                    .and_then(|ops| ops.domains)
                    .into_iter()
                    .flatten()
                    .find(|d| !mls.vouches_for(&d.domain));
                if let Some(d) = unvouched {
                    return Processed::Wait(format!(
                        "a commit by {sender} adds a device certified by {}, whose root this device's gateway has not vouched for yet",
                        d.domain
                    ));
                }
            }
        }
        let epoch_before = group.epoch().as_u64();
        let transaction = provider.transaction();
        let processed = match group.process_message(provider, message) {
            Ok(processed) => processed,
            Err(e) => return Processed::Failed(format!("processing a message: {e}")),
        };
        let aad = processed.aad().to_vec();
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(m) => {
                transaction.commit(writes);
                Processed::Message(Bytes::from(m.into_bytes()))
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let ops = match GroupOps::decode(&aad) {
                    Ok(ops) => ops,
                    Err(e) => {
                        return Processed::Failed(e.to_string());
                    }
                };
                let members: BTreeMap<LeafNodeIndex, DeviceId> = devices_by_leaf(group);
                let added: BTreeSet<DeviceId> = staged
                    .add_proposals()
                    .filter_map(|p| {
                        device_of(p.add_proposal().key_package().leaf_node().credential())
                    })
                    .collect();
                let removed: BTreeSet<DeviceId> = staged
                    .remove_proposals()
                    .filter_map(|p| members.get(&p.remove_proposal().removed()).copied())
                    .collect();
                let declared_added: BTreeSet<DeviceId> =
                    ops.added_devices().map(|(d, _)| d).collect();
                // Every device added must be certified, bound to its MLS key and of the user the
                // commit declares; one revoked since the commit was made passes (see
                // `verify_added_leaf`).
                let declared_users: BTreeMap<DeviceId, UserId> = ops.added_devices().collect();
                for p in staged.add_proposals() {
                    let leaf = p.add_proposal().key_package().leaf_node();
                    let device = device_of(leaf.credential());
                    let checked =
                        verify_added_leaf(mls, leaf.credential(), leaf.signature_key().as_slice());
                    let refusal = match (device, checked) {
                        (_, Err(e)) => Some(e),
                        (Some(d), Ok(Some(user))) if declared_users.get(&d) != Some(&user) => {
                            Some(format!("{d} is certified for another user than declared"))
                        }
                        _ => None,
                    };
                    if let Some(reason) = refusal {
                        return Processed::Failed(format!(
                            "a commit by {sender} adds a device that fails its certificate check: {reason}"
                        ));
                    }
                }
                let declared_removed: BTreeSet<DeviceId> = ops.removed_devices().collect();
                if added != declared_added || removed != declared_removed {
                    return Processed::Failed(format!(
                        "a commit by {sender} declares other membership changes than it makes"
                    ));
                }
                // The gateway admits commits by what they declare: a change of the group's
                // external sender must be declared exactly (see `gateway::handover`).
                let external_change: Vec<Option<[u8; 32]>> = staged
                    .queued_proposals()
                    .filter_map(|p| match p.proposal() {
                        Proposal::GroupContextExtensions(gce) => {
                            Some(proposed_external_sender(gce.extensions()))
                        }
                        _ => None,
                    })
                    .collect();
                let declared_external = ops.external_sender.as_ref().map(|k| **k);
                let matches = match (&external_change[..], declared_external) {
                    ([], None) => true,
                    ([Some(key)], Some(declared)) => *key == declared,
                    _ => false,
                };
                if !matches {
                    return Processed::Failed(format!(
                        "a commit by {sender} declares another change of the external sender than it makes"
                    ));
                }
                let self_removed = staged.self_removed();
                // Another member's commit for this epoch won over ours: drop ours, retry later.
                let entry = self.entries.get_mut(&conv).expect("group has an entry");
                if matches!(entry.status, GroupStatus::PendingCommit { .. }) {
                    let _ = group.clear_pending_commit(provider.storage());
                    entry.status = GroupStatus::Synchronized;
                }
                if let Err(e) = group.merge_staged_commit(provider, *staged) {
                    return Processed::Failed(format!("merging a commit: {e}"));
                }
                transaction.commit(writes);
                entry.apply_ops(&ops);
                // The gateway addresses its removals by the leaves commits declare.
                let leaves: BTreeMap<DeviceId, u32> = devices_by_leaf(group)
                    .into_iter()
                    .map(|(leaf, device)| (device, leaf.u32()))
                    .collect();
                let wrong_leaf = ops
                    .added
                    .iter()
                    .find(|a| {
                        a.leaf.is_some()
                            && leaves.get(&DeviceId::from_bytes(*a.device)).copied() != a.leaf
                    })
                    .map(|a| DeviceId::from_bytes(*a.device));
                let epoch = group.epoch().as_u64();
                debug_assert_eq!(epoch, epoch_before + 1, "a commit advances one epoch");
                if self_removed {
                    entry.status = GroupStatus::Removed { seq: 0 };
                    entry.intents.clear();
                    self.groups.remove(&conv);
                }
                self.persist(conv, writes);
                if let Some(device) = wrong_leaf {
                    return Processed::Failed(format!(
                        "a commit by {sender} declares another leaf for {device} than it gives it"
                    ));
                }
                Processed::Commit {
                    epoch,
                    added: declared_added.into_iter().collect(),
                    removed: declared_removed.into_iter().collect(),
                }
            }
            ProcessedMessageContent::ProposalMessage(queued)
                if matches!(queued.sender(), Sender::External(_)) =>
            {
                let members: BTreeMap<LeafNodeIndex, DeviceId> = devices_by_leaf(group);
                let (removed, device) = match queued.proposal() {
                    Proposal::Remove(remove) => {
                        let removed = remove.removed();
                        let Some(&device) = members.get(&removed) else {
                            return Processed::Failed("a removal of an empty leaf".into());
                        };
                        (Some(removed), Some(device))
                    }
                    // The conversation's authority moved to another gateway: the old one
                    // names the new one as the group's only external sender.
                    Proposal::GroupContextExtensions(gce)
                        if proposed_external_sender(gce.extensions()).is_some() =>
                    {
                        (None, None)
                    }
                    _ => {
                        return Processed::Failed(
                            "the gateway proposes removals and a new external sender only".into(),
                        )
                    }
                };
                if let Err(e) = group.store_pending_proposal(provider.storage(), *queued) {
                    return Processed::Failed(format!("keeping the gateway's proposal: {e}"));
                }
                transaction.commit(writes);
                // One member commits it: the one with the lowest leaf, other than the leaver.
                let committer = members.iter().find(|(leaf, _)| Some(**leaf) != removed);
                let entry = self.entries.get_mut(&conv).expect("group has an entry");
                if committer.is_some_and(|(_, d)| *d == self.device)
                    && entry.intents.front() != Some(&Intent::CommitPending)
                {
                    entry.intents.push_front(Intent::CommitPending);
                    self.persist(conv, writes);
                }
                match device {
                    Some(device) => Processed::RemovalProposed { device },
                    None => Processed::ExternalSenderProposed,
                }
            }
            other => Processed::Failed(format!(
                "{} messages are not used by Sund",
                match other {
                    ProcessedMessageContent::ProposalMessage(_) => "member proposal",
                    ProcessedMessageContent::ExternalJoinProposalMessage(_) => "join proposal",
                    _ => "such",
                }
            )),
        }
    }

    /// Our own message came back sequenced: a commit is applied now (echo before apply); an
    /// application message is handed back from the sent table.
    fn on_own_message(
        &mut self,
        conv: ConversationId,
        msg_id: MsgId,
        mls: &DeviceMls,
        writes: &mut WriteBatch,
    ) -> Processed {
        if let Some(plaintext) = self.sent.remove(&msg_id) {
            writes.delete(NODE_SENT_TABLE, msg_id.to_bytes().to_vec());
            return Processed::Message(plaintext);
        }
        let Some(entry) = self.entries.get_mut(&conv) else {
            return Processed::Nothing;
        };
        let GroupStatus::PendingCommit {
            msg_id: pending,
            ops,
            intent,
            ..
        } = &entry.status
        else {
            return Processed::Nothing;
        };
        if **pending != msg_id.to_bytes() {
            return Processed::Nothing;
        }
        let carried = intent.clone();
        let ops = GroupOps::decode(ops).unwrap_or_default();
        let Some(group) = self.groups.get_mut(&conv) else {
            return Processed::Nothing;
        };
        let provider = mls.provider();
        let transaction = provider.transaction();
        if let Err(e) = group.merge_pending_commit(provider) {
            return Processed::Failed(format!("merging our own commit: {e}"));
        }
        transaction.commit(writes);
        entry.apply_ops(&ops);
        entry.status = GroupStatus::Synchronized;
        entry.retry_at_epoch = 0;
        // The intent the commit carried out is done (a user removal goes on until none of the
        // user's devices is left); a commit of the gateway's proposals settles the request to
        // commit them.
        let done = match carried {
            Some(Intent::RemoveUser(_)) => None,
            Some(intent) => Some(intent),
            None => Some(Intent::CommitPending),
        };
        if let Some(done) = done {
            if let Some(at) = entry.intents.iter().position(|i| *i == done) {
                entry.intents.remove(at);
            }
        }
        let epoch = group.epoch().as_u64();
        self.persist(conv, writes);
        Processed::Commit {
            epoch,
            added: ops.added_devices().map(|(d, _)| d).collect(),
            removed: ops.removed_devices().collect(),
        }
    }
}

/// Every member of `group` as its certified credential names it (device and user).
fn roster_of(group: &MlsGroup, mls: &DeviceMls) -> Vec<crate::wire::payload::RosterEntry> {
    group
        .members()
        .filter_map(|m| {
            let basic = BasicCredential::try_from(m.credential.clone()).ok()?;
            let device = crate::trust::credential::device_of_identity(basic.identity())?;
            let user = mls
                .verify_member_at_join(basic.identity(), m.signature_key.as_slice())
                .ok()
                .flatten()?;
            Some(crate::wire::payload::RosterEntry {
                device: device.to_bytes().into(),
                user: user.to_bytes().into(),
            })
        })
        .collect()
}

/// The key a proposed group context names as the group's external sender, if it holds just
/// that: one external sender, with the gateway's credential (what a handover proposes).
pub(super) fn proposed_external_sender(extensions: &Extensions<GroupContext>) -> Option<[u8; 32]> {
    use openmls::prelude::tls_codec::Serialize as _;
    let all: Vec<&Extension> = extensions.iter().collect();
    let [Extension::ExternalSenders(senders)] = all[..] else {
        return None;
    };
    let [sender] = &senders[..] else {
        return None;
    };
    // Its fields are not public: read the key from its encoding (a one-byte length, then
    // the key), and check the whole against the sender that key makes.
    let bytes = sender.tls_serialize_detached().ok()?;
    let (&len, rest) = bytes.split_first()?;
    if len != 32 || rest.len() < 32 {
        return None;
    }
    let key: [u8; 32] = rest[..32].try_into().ok()?;
    let expected = ExternalSender::new(
        key.to_vec().into(),
        BasicCredential::new(crate::mls::GATEWAY_CREDENTIAL.to_vec()).into(),
    );
    (expected == *sender).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn senders(senders: Vec<ExternalSender>) -> Extensions<GroupContext> {
        Extensions::single(Extension::ExternalSenders(senders)).unwrap()
    }

    fn gateway(key: [u8; 32], identity: &[u8]) -> ExternalSender {
        ExternalSender::new(
            key.to_vec().into(),
            BasicCredential::new(identity.to_vec()).into(),
        )
    }

    #[test]
    fn only_a_single_gateway_external_sender_is_taken_from_a_proposal() {
        let key = [0x42; 32];
        let id = crate::mls::GATEWAY_CREDENTIAL;
        assert_eq!(
            proposed_external_sender(&senders(vec![gateway(key, id)])),
            Some(key)
        );
        // Another credential, two senders, none, or a key of another length: not ours.
        assert_eq!(
            proposed_external_sender(&senders(vec![gateway(key, b"someone")])),
            None
        );
        assert_eq!(
            proposed_external_sender(&senders(vec![gateway(key, id), gateway([1; 32], id)])),
            None
        );
        assert_eq!(proposed_external_sender(&senders(vec![])), None);
        let short = ExternalSender::new(
            vec![7u8; 31].into(),
            BasicCredential::new(id.to_vec()).into(),
        );
        assert_eq!(proposed_external_sender(&senders(vec![short])), None);
        assert_eq!(proposed_external_sender(&Extensions::empty()), None);
    }
}
