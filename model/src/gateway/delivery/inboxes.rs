//! Device inboxes, as `impl Delivery`: the Welcomes, removal and divergence notices a device
//! gets before (or instead of) a conversation's log, kept until it acknowledges them (table `inbox`), sent
//! when its session opens and again when they stall, and held for a departing device until it
//! has read up to its removal.

use super::*;

impl Delivery {
    /// Sends everything waiting in the inbox of a device whose session just opened.
    pub fn send_inbox(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        groups: &Groups,
        fx: &mut Fx,
    ) {
        let waiting: Vec<(ConversationId, InboxItem)> = self
            .inbox
            .range((device, ConversationId(0))..=(device, ConversationId(u128::MAX)))
            .map(|((_, conv), item)| (*conv, item.clone()))
            .collect();
        for (conv, item) in waiting {
            if self.held_for_departure(device, conv) {
                continue; // its new Welcome waits until it has read up to its removal
            }
            self.inbox_sent.insert((device, conv), now);
            send_inbox_item(conn, conv, &item, groups.get(conv), fx);
        }
    }

    /// Puts an item in a device's inbox (replacing an older one for the conversation) and sends
    /// it at once if the device is online.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn put_inbox(
        &mut self,
        now: Instant,
        device: DeviceId,
        conv: ConversationId,
        item: InboxItem,
        group: Option<&GroupState>,
        sessions: &Sessions,
        fx: &mut Fx,
    ) {
        fx.put(INBOX_TABLE, pair_key(device.0, conv.0), item.encode());
        self.inbox.insert((device, conv), item.clone());
        self.inbox_sent.remove(&(device, conv));
        if let Some(conn) = sessions.online(device) {
            self.inbox_sent.insert((device, conv), now);
            send_inbox_item(conn, conv, &item, group, fx);
        }
    }

    /// Sends again every inbox item of an online device that has waited `redeliver_after` for
    /// its acknowledgement (frames can be lost).
    pub fn resend_inbox(
        &mut self,
        now: Instant,
        sessions: &Sessions,
        groups: &Groups,
        fx: &mut Fx,
    ) {
        let due: Vec<(ConnectionId, DeviceId, ConversationId)> = self
            .inbox
            .keys()
            .filter_map(|&(device, conv)| {
                if self.held_for_departure(device, conv) {
                    return None;
                }
                let conn = sessions.online(device)?;
                let sent = self.inbox_sent.get(&(device, conv)).copied();
                let due =
                    sent.is_none_or(|t| now.saturating_since(t) >= self.limits.redeliver_after);
                due.then_some((conn, device, conv))
            })
            .collect();
        for (conn, device, conv) in due {
            let item = self.inbox[&(device, conv)].clone();
            self.inbox_sent.insert((device, conv), now);
            send_inbox_item(conn, conv, &item, groups.get(conv), fx);
        }
    }

    /// The device acknowledged `seq` in `conv`: an inbox item up to it is done. Returns true if
    /// the item was a removal notice (the device has no stream left there).
    pub(super) fn settle_inbox(
        &mut self,
        device: DeviceId,
        conv: ConversationId,
        seq: u64,
        writes: &mut WriteBatch,
    ) -> bool {
        match self.inbox.get(&(device, conv)) {
            // The conversation's delivery waits behind a divergence notice: any
            // acknowledgement there answers it.
            Some(item) if item.seq() <= seq || matches!(item, InboxItem::Diverged { .. }) => {
                let removed = matches!(item, InboxItem::Removed { .. });
                self.inbox.remove(&(device, conv));
                self.inbox_sent.remove(&(device, conv));
                writes.delete(INBOX_TABLE, pair_key(device.0, conv.0));
                removed
            }
            _ => false,
        }
    }
}

/// Sends one inbox item (a Welcome, with the group's roster, or a removal notice) on `conn`.
pub(super) fn send_inbox_item(
    conn: ConnectionId,
    conv: ConversationId,
    item: &InboxItem,
    group: Option<&GroupState>,
    fx: &mut Fx,
) {
    let routing = Routing {
        conversation: conv,
        seq: item.seq(),
        ..Routing::default()
    };
    fx.send(conn, routing, item.payload(group));
}
