//! `sund chat`: an interactive client in the terminal (ratatui).
//!
//! The node runs as for `follow` (it reconnects across gateway restarts by itself); this loop
//! feeds its events and the user's keys into [`view::ChatView`] and draws it. A message counts
//! as read (taken) only once a frame showing it has been drawn, as `follow` takes a message only
//! once its line is printed.
//!
//! As in `follow`, messages of users this user blocked are hidden (the block list kept on the
//! device, then the gateway's). The user's contacts are watched: their presence changes show as
//! notices, in the gateway's coarse steps only.

mod view;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use ratatui::crossterm::event::{self, Event};
use sund_model::ids::{ConversationId, UserId};
use sund_model::mls::group_ops::GroupKind;
use sund_model::node::{ConnectionStatus, NodeEvent};
use sund_model::wire::payload::Seen;
use sund_node::device::Device;
use sund_node::driver::{self, NodeHandle, SocialRequest};
use tokio::sync::mpsc;

use crate::{group_commands, load, why_stopped, REVOKED};
use view::{Action, ChatView, Connection};

/// `sund chat`.
pub(crate) async fn chat(data_dir: &Path) -> Result<(), String> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(
            "`sund chat` needs a terminal; in scripts use `sund follow --json` and `sund send`"
                .into(),
        );
    }
    let device = load(data_dir)?;
    let node = driver::start(device.options())
        .await
        .map_err(|e| e.to_string())?;
    let mut view = ChatView::new();
    refresh_groups(&node, &device, &mut view).await;
    // Keys are read on a thread of their own (crossterm's reads block) and queued.
    let (keys_tx, keys) = mpsc::channel(64);
    std::thread::spawn(move || read_keys(keys_tx));
    // Restores the terminal on the way out and on a panic.
    let mut terminal = ratatui::init();
    let result = run(&mut terminal, node, &device, view, keys).await;
    ratatui::restore();
    result
}

/// The keys typed, until the receiver is gone.
fn read_keys(keys: mpsc::Sender<event::KeyEvent>) {
    loop {
        match event::read() {
            Ok(Event::Key(key)) => {
                if keys.blocking_send(key).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

async fn run(
    terminal: &mut ratatui::DefaultTerminal,
    mut node: NodeHandle,
    device: &Device,
    mut view: ChatView,
    mut keys: mpsc::Receiver<event::KeyEvent>,
) -> Result<(), String> {
    let mut users = group_commands::users(&node, device).await;
    let mut members = group_commands::members(&node).await;
    let mut delays_told = std::collections::BTreeSet::new();
    let mut blocked = crate::blocked::Blocked::load(device);
    let mut watched: Vec<UserId> = Vec::new();
    let mut presence: BTreeMap<UserId, Seen> = BTreeMap::new();
    // The gateway's listing (blocks, and the contacts to watch) answers this.
    let _ = node.social(SocialRequest::Fetch).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Messages drawn into the view but not yet on the screen: taken after the next draw.
    let mut to_take: Vec<(ConversationId, u64)> = Vec::new();
    loop {
        terminal
            .draw(|f| view.draw(f))
            .map_err(|e| format!("cannot draw on the terminal: {e}"))?;
        for (conversation, seq) in to_take.drain(..) {
            node.taken(conversation, seq)
                .await
                .map_err(|e| e.to_string())?;
        }
        tokio::select! {
            key = keys.recv() => {
                let Some(key) = key else { break };
                match view.key(key) {
                    Action::None => {}
                    Action::Quit => break,
                    Action::Send(conversation, text) => match node.send(conversation, Bytes::from(text.clone())).await {
                        Ok(Ok(msg_id)) => view.sent(conversation, msg_id, &text),
                        Ok(Err(e)) => view.notice(format!("not sent: {e}")),
                        Err(_) => break,
                    },
                    Action::Dm(user) => start_dm(&node, device, &mut view, &user).await,
                }
            }
            _ = tick.tick() => {
                if let Ok(status) = node.status().await {
                    view.pending(status.outbox);
                }
            }
            event = node.events.recv() => match event {
                Some(NodeEvent::Contacts { contacts, .. }) => {
                    if let Err(e) = blocked.update(device, &contacts) {
                        view.notice(e);
                    }
                    if contacts.contacts != watched {
                        watched = contacts.contacts.clone();
                        presence.retain(|user, _| watched.contains(user));
                        let _ = node.social(SocialRequest::Watch(watched.clone())).await;
                    }
                }
                Some(NodeEvent::Presence { user, seen }) => {
                    let before = presence.insert(user, seen);
                    // Nothing to say of unknown, nor of a contact of another domain whose
                    // gateway is still being asked (its answer follows).
                    if before != Some(seen) && !matches!(seen, Seen::Unknown | Seen::Asking) {
                        let name = users.get(&user).cloned().unwrap_or_else(|| user.to_string());
                        view.notice(format!("{name} is {}", seen.describe()));
                    }
                }
                Some(NodeEvent::Delivered { conversation, seq, sender, .. })
                    if blocked.hides(sender, &members) =>
                {
                    if let Some(notice) = blocked.notice() {
                        view.notice(notice);
                    }
                    to_take.push((conversation, seq));
                }
                Some(NodeEvent::Delivered { conversation, seq, sender, msg_id, body }) => {
                    if sund_model::node::files::Receipt::decode_message(&body).is_some() {
                        node.taken(conversation, seq).await.map_err(|e| e.to_string())?;
                        continue;
                    }
                    if sund_model::node::told_names::is_roster(&body) {
                        // Members' addresses (the node took them): names for what follows.
                        node.taken(conversation, seq).await.map_err(|e| e.to_string())?;
                        users = group_commands::users(&node, device).await;
                        continue;
                    }
                    let from = if sender == device.key.device_id() {
                        "me".to_string()
                    } else {
                        group_commands::who(sender, &members, &users)
                    };
                    let text = match sund_model::files::FileMessage::decode(&body) {
                        Some(Ok(file)) => format!(
                            "[file] {} ({} bytes): sund file get {}",
                            file.manifest.name.as_str(),
                            file.manifest.size,
                            crate::file_commands::file_id(file.manifest.digest())
                        ),
                        Some(Err(e)) => format!("[a file this device refuses: {e}]"),
                        None => String::from_utf8_lossy(&body).into_owned(),
                    };
                    view.delivered(conversation, seq, msg_id, &from, &text);
                    to_take.push((conversation, seq));
                }
                Some(NodeEvent::Accepted { msg_id, seq, .. }) => view.accepted(msg_id, seq),
                Some(NodeEvent::Rejected { msg_id, code }) => view.rejected(msg_id, &format!("{code:?}")),
                Some(NodeEvent::Status(status)) => view.connection(match status {
                    ConnectionStatus::Connected => Connection::Connected,
                    ConnectionStatus::Reconnecting { attempt } => Connection::Reconnecting(attempt),
                    ConnectionStatus::Offline => Connection::Offline,
                }),
                Some(NodeEvent::Refused { message, .. }) => view.notice(format!("refused by the gateway: {message}")),
                Some(NodeEvent::Throttled { retry_after, .. }) => view.notice(format!(
                    "sending too fast for the gateway: the rest goes in {:.1} s",
                    retry_after.as_secs_f64()
                )),
                Some(NodeEvent::Revoked) => {
                    let _ = node.stop().await;
                    return Err(REVOKED.into());
                }
                Some(NodeEvent::GroupChangeDelayed { conversation, message, .. }) => {
                    // Once per reason and conversation: the device asks again every few seconds.
                    if delays_told.insert((conversation, message.clone())) {
                        view.notice(format!("a change to {conversation} waits: {message}; this device asks again by itself"));
                    }
                }
                Some(NodeEvent::RemovedFrom { conversation, .. }) => {
                    view.remove_conversation(conversation);
                    view.notice(format!("this device was removed from {conversation}"));
                }
                Some(NodeEvent::Gap { conversation, from, to }) => view.notice(format!(
                    "{conversation}: seqs {from}..={to} are gone: the gateway no longer kept them for this device (it was away longer than the gateway keeps messages, or more waited for it than the gateway keeps per device)"
                )),
                Some(NodeEvent::HistoryLost { conversation, from, to }) => view.notice(format!(
                    "{conversation}: seqs {from}..={to} were lost by the gateway; tell its operator"
                )),
                Some(event @ (NodeEvent::Joined { .. } | NodeEvent::GroupChanged { .. } | NodeEvent::Undecryptable { .. } | NodeEvent::GroupChangeRefused { .. })) => {
                    members = group_commands::members(&node).await;
                    users = group_commands::users(&node, device).await;
                    refresh_groups(&node, device, &mut view).await;
                    if matches!(event, NodeEvent::Undecryptable { .. } | NodeEvent::GroupChangeRefused { .. }) {
                        let names = device.conversation_names();
                        view.notice(group_commands::describe_event(&event, &names, &members, &users));
                    }
                }
                Some(_) => {}
                None => {
                    let why = why_stopped(node).await;
                    return Err(format!("this device stopped: {why}"));
                }
            }
        }
    }
    node.stop().await.map_err(|e| e.to_string())
}

/// Lists the device's DMs and rooms in the view, by the names this device gave them.
async fn refresh_groups(node: &NodeHandle, device: &Device, view: &mut ChatView) {
    let names = device.conversation_names();
    // The group of the user's own devices carries the contact book, not messages to show.
    for g in node
        .groups()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|g| g.kind != GroupKind::Own)
    {
        let name = names
            .get(&g.conversation)
            .cloned()
            .unwrap_or_else(|| format!("{} {}", g.kind, g.conversation));
        view.conversation(g.conversation, &name, g.epoch);
    }
}

/// `/dm USER`: asks the node for the DM (the commit goes out in the background; the DM lists
/// itself at once and its epoch shows once the gateway sequenced it).
async fn start_dm(node: &NodeHandle, device: &Device, view: &mut ChatView, user: &str) {
    let address = match device.address(user) {
        Ok(address) => address,
        Err(e) => {
            view.notice(e);
            return;
        }
    };
    if device.user.as_ref() == Some(&address) {
        view.notice(format!(
            "`{user}` is this device's own user; name the person to write to"
        ));
        return;
    }
    if let Err(e) = device.remember_user(&address) {
        view.notice(e.to_string());
        return;
    }
    let user = address.shown_from(device.home_domain());
    match node.group(device.dm_request(&address)).await {
        Ok(Ok(conversation)) => {
            let name = format!("@{user}");
            if let Err(e) = device.name_conversation(&name, conversation) {
                view.notice(e.to_string());
            }
            view.conversation(conversation, &name, None);
            view.select(conversation);
            view.notice(format!("DM with {user} started"));
        }
        Ok(Err(e)) => view.notice(format!("no DM with {user}: {e}")),
        Err(e) => view.notice(e.to_string()),
    }
}
