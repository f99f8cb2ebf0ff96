//! Sharing the contact book with the user's other devices: records made by a command (a name
//! learnt, a user verified or no longer) go as MLS application messages into the group of the
//! user's own devices, created on first use; `pair show` sends the whole book to the device it
//! brought in. Records that cannot go now (the group is not ready, the gateway is away) wait in
//! the data directory and go with the next share. Receiving is the node's (the driver applies
//! what arrives in that group to the files; see `sund_node::contact_files`).

use sund_model::node::contact_book::{self, ContactBook, ContactRecord};
use sund_model::node::NodeEvent;
use sund_node::contact_files;
use sund_node::device::Device;
use sund_node::driver::{GroupRequest, NodeHandle};

/// What became of records to share.
#[derive(Debug, PartialEq, Eq)]
pub enum Shared {
    /// In the durable outbox, on their way to the user's other devices.
    Sent(usize),
    /// Not sent yet, and why; kept, they go with the next share.
    Waiting(String),
    /// Nothing to share.
    Nothing,
}

impl Shared {
    /// A line for the user, or nothing worth saying.
    pub fn say(&self) {
        if let Shared::Waiting(why) = self {
            esay!("not shared with your other devices yet ({why}); it goes with the next contacts command");
        }
    }
}

/// Shares every name this device knows (names only grow, so a stale list takes nothing away)
/// and `marks` (verification marks set or taken away), after anything still waiting, with the
/// user's other devices.
pub async fn share(node: &mut NodeHandle, device: &Device, marks: &[ContactRecord]) -> Shared {
    let mut records: Vec<ContactRecord> = contact_files::names(&device.data_dir)
        .into_iter()
        .map(|(user, name)| ContactRecord::Named { user, name })
        .filter(|r| r.check().is_ok())
        .collect();
    records.extend(marks.iter().cloned());
    share_records(node, device, &records).await
}

/// Shares the whole book (names and every mark) with a device just brought in.
pub async fn share_book(node: &mut NodeHandle, device: &Device, book: &ContactBook) -> Shared {
    share_records(node, device, &book.records()).await
}

async fn share_records(
    node: &mut NodeHandle,
    device: &Device,
    records: &[ContactRecord],
) -> Shared {
    let mut messages = contact_files::outgoing(&device.data_dir);
    messages.extend(contact_book::encode(records));
    if messages.is_empty() {
        return Shared::Nothing;
    }
    let outcome = send_all(node, device, &messages).await;
    let left = match &outcome {
        Ok(()) => Vec::new(),
        Err((sent, _)) => messages[*sent..].to_vec(),
    };
    if let Err((path, e)) = contact_files::set_outgoing(&device.data_dir, &left) {
        return Shared::Waiting(format!("{}: {e}", path.display()));
    }
    match outcome {
        Ok(()) => Shared::Sent(messages.len()),
        Err((_, why)) => Shared::Waiting(why),
    }
}

/// Sends the messages in order; on failure how many went and why the rest did not.
async fn send_all(
    node: &mut NodeHandle,
    device: &Device,
    messages: &[Vec<u8>],
) -> Result<(), (usize, String)> {
    let conv = match node.group(GroupRequest::Own).await {
        Ok(Ok(conv)) => conv,
        Ok(Err(e)) => return Err((0, e.to_string())),
        Err(e) => return Err((0, e.to_string())),
    };
    let names = device.user_names();
    crate::group_commands::wait_until_done(node, conv, &names)
        .await
        .map_err(|e| (0, e))?;
    let mut waiting = std::collections::BTreeSet::new();
    for (i, message) in messages.iter().enumerate() {
        match node.send(conv, message.clone().into()).await {
            Ok(Ok(id)) => {
                waiting.insert(id);
            }
            Ok(Err(e)) => return Err((i, e.to_string())),
            Err(e) => return Err((i, e.to_string())),
        }
    }
    // In the durable outbox now; wait until the gateway sequenced them, so that "shared"
    // means the other devices can fetch them (if not, they go with the next command).
    let deadline = tokio::time::sleep(ACCEPT_WAIT);
    tokio::pin!(deadline);
    while !waiting.is_empty() {
        tokio::select! {
            _ = &mut deadline => {
                esay!("the gateway has not confirmed the contact book's records yet; they wait on this device and go with the next `sund` command");
                break;
            }
            event = node.events.recv() => match event {
                Some(NodeEvent::Accepted { msg_id, .. }) => {
                    waiting.remove(&msg_id);
                }
                Some(NodeEvent::Rejected { msg_id, code }) if waiting.contains(&msg_id) => {
                    esay!("the gateway refused a contact-book record ({}); it is not shared", code.name());
                    waiting.remove(&msg_id);
                }
                Some(_) => {}
                None => break,
            }
        }
    }
    Ok(())
}

/// How long a share waits for the gateway to sequence its records.
const ACCEPT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
