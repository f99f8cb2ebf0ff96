//! Application messages: encryption, and encrypting again a message the gateway refused as
//! made in an old epoch.

use bytes::Bytes;
use openmls::prelude::*;

use super::{mls_error, DeviceGroups, GroupError, GroupStatus, MlsStep, NODE_SENT_TABLE};
use crate::env::WriteBatch;
use crate::ids::{ConversationId, MsgId};
use crate::mls::device::DeviceMls;

impl DeviceGroups {
    /// Encrypts an application message for `conv`; its plaintext is kept until it comes back
    /// sequenced.
    pub fn encrypt(
        &mut self,
        conv: ConversationId,
        msg_id: MsgId,
        plaintext: &[u8],
        mls: &DeviceMls,
        writes: &mut WriteBatch,
    ) -> Result<Bytes, GroupError> {
        let group = self
            .groups
            .get_mut(&conv)
            .filter(|_| {
                matches!(
                    self.entries.get(&conv).map(|e| &e.status),
                    Some(GroupStatus::Synchronized | GroupStatus::PendingCommit { .. })
                )
            })
            .ok_or(GroupError::NotInGroup(conv))?;
        let transaction = mls.provider().transaction();
        let message = group
            .create_message(mls.provider(), mls.signer(), plaintext)
            .map_err(|e| match e {
                CreateMessageError::GroupStateError(MlsGroupStateError::PendingProposal) => {
                    GroupError::ProposalPending(conv)
                }
                other => mls_error(MlsStep::Encrypt)(other),
            });
        let bytes = message.and_then(|m| m.to_bytes().map_err(mls_error(MlsStep::Encode)))?;
        transaction.commit(writes);
        self.sent.insert(msg_id, Bytes::copy_from_slice(plaintext));
        writes.put(
            NODE_SENT_TABLE,
            msg_id.to_bytes().to_vec(),
            plaintext.to_vec(),
        );
        Ok(Bytes::from(bytes))
    }

    /// True if `msg_id` is one of our application messages not yet back from the gateway.
    pub fn is_own_message(&self, msg_id: MsgId) -> bool {
        self.sent.contains_key(&msg_id)
    }

    /// The gateway refused our application message as made before `epoch`: it is encrypted
    /// again once the group is there ([`DeviceGroups::reencrypt_ready`]). `sent_in` is the epoch
    /// of the copy in the outbox: a refusal of an older copy, already replaced, changes nothing.
    pub fn message_stale(
        &mut self,
        conv: ConversationId,
        msg_id: MsgId,
        epoch: u64,
        sent_in: Option<u64>,
    ) {
        if sent_in.is_some_and(|e| e >= epoch) {
            return;
        }
        self.stale_messages.insert(msg_id, (conv, epoch));
    }

    /// Encrypts again, in the group's current epoch, every stale message whose group has
    /// reached the epoch the gateway named. Returns `(msg_id, conversation, new body)`, or an
    /// error for a message that can no longer be sent (we left the group).
    #[allow(clippy::type_complexity)]
    pub fn reencrypt_ready(
        &mut self,
        mls: &DeviceMls,
        writes: &mut WriteBatch,
    ) -> Vec<(MsgId, ConversationId, Result<Bytes, GroupError>)> {
        let ready: Vec<(MsgId, ConversationId)> = self
            .stale_messages
            .iter()
            .filter(|(_, (conv, epoch))| {
                self.epoch(*conv).is_none_or(|e| e >= *epoch) || !self.is_member(*conv)
            })
            .map(|(id, (conv, _))| (*id, *conv))
            .collect();
        let mut done = Vec::new();
        for (msg_id, conv) in ready {
            let Some(plaintext) = self.sent.get(&msg_id).cloned() else {
                self.stale_messages.remove(&msg_id);
                continue;
            };
            let result = self.encrypt(conv, msg_id, &plaintext, mls, writes);
            if matches!(result, Err(GroupError::ProposalPending(_))) {
                continue; // once the removal is committed
            }
            self.stale_messages.remove(&msg_id);
            done.push((msg_id, conv, result));
        }
        done
    }

    fn is_member(&self, conv: ConversationId) -> bool {
        self.groups.contains_key(&conv)
            && self.entries.get(&conv).is_some_and(|e| {
                matches!(
                    e.status,
                    GroupStatus::Synchronized | GroupStatus::PendingCommit { .. }
                )
            })
    }

    /// Our message `msg_id` will never be sequenced (refused): forget its plaintext.
    pub fn forget_sent(&mut self, msg_id: MsgId, writes: &mut WriteBatch) {
        self.stale_messages.remove(&msg_id);
        if self.sent.remove(&msg_id).is_some() {
            writes.delete(NODE_SENT_TABLE, msg_id.to_bytes().to_vec());
        }
    }
}
