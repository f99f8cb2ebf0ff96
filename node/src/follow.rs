//! `sund follow`: print messages as they arrive, as lines for a person or, with `--json`, as
//! one JSON object per line for scripts.
//!
//! Both forms see the same events in the same order. A message is marked taken only once its
//! line is written, so one a closed pipe or a crash kept from the reader is shown by the next
//! `follow`. In JSON every event goes to stdout (a script reads one stream); as lines, the
//! messages go to stdout and the news around them (status, receipts, group changes) to stderr.

use std::io::Write;
use std::path::Path;

use serde::Serialize;
use sund_model::files::{FileMessage, ManifestError};
use sund_model::ids::{ConversationId, DeviceId};
use sund_model::node::{ConnectionStatus, NodeEvent};
use sund_node::display;
use sund_node::driver;

use crate::{describe, file_commands, group_commands, load, why_stopped, REVOKED};

/// One event of `sund follow --json`. Text written by others (bodies, file names) is given as
/// is, unescaped: JSON's own escaping keeps it on its line, and the reader decides how to show
/// it. Every record names its conversation by id, and by the name this device gave it if any.
#[derive(Serialize, Debug)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum FollowRecord {
    /// A message of a conversation.
    Message {
        #[serde(flatten)]
        at: Place,
        /// The sending device and its user's name as this device knows it.
        from: String,
        sender: String,
        /// The body, as UTF-8 (bytes that are not become U+FFFD).
        text: String,
    },
    /// A file offered in a conversation (`own`: sent from this device).
    File {
        #[serde(flatten)]
        at: Place,
        from: String,
        sender: String,
        file_id: String,
        name: String,
        size: u64,
        own: bool,
    },
    /// A file message this device refuses to offer (a bad manifest), and why.
    BadFile {
        #[serde(flatten)]
        at: Place,
        from: String,
        sender: String,
        reason: String,
    },
    /// Messages expired on the gateway before this device fetched them.
    Gap {
        conversation_id: String,
        from: u64,
        to: u64,
    },
    /// Messages the gateway lost (its disk lost writes it had reported durable).
    HistoryLost {
        conversation_id: String,
        from: u64,
        to: u64,
    },
    /// What this device read up to `upto` differs from what the gateway holds now.
    HistoryDiverged { conversation_id: String, upto: u64 },
    /// A fetched file saved (with `--fetch-into`).
    Saved { file_id: String, path: String },
    /// A fetched file not saved, and whether it is being fetched again.
    NotSaved {
        file_id: String,
        reason: String,
        refetching: bool,
    },
    /// A transfer that failed.
    FileFailed { file_id: String, reason: String },
    /// A member's device received one of this device's files.
    Receipt {
        conversation_id: String,
        conversation: Option<String>,
        file_id: String,
        by: String,
        verified: bool,
    },
    /// The connection changed: `connected`, `reconnecting` (with its attempt) or `offline`.
    Status {
        connection: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
    },
    /// The gateway refused this device (it keeps retrying).
    Refused { message: String },
    /// The gateway's rate limit paused this device's sending (it sends again by itself).
    Throttled {
        /// The error code's name (`sends_limited`, `conversations_limited`).
        limit: String,
        /// Milliseconds until sending goes on.
        retry_after_ms: u64,
        message: String,
    },
    /// A membership change, a join, a removal, or a message that could not be read.
    Group {
        kind: &'static str,
        conversation_id: String,
        conversation: Option<String>,
        text: String,
    },
}

/// Where a message is: its conversation's id and local name, and its seq.
#[derive(Serialize, Debug)]
pub(crate) struct Place {
    conversation_id: String,
    conversation: Option<String>,
    seq: u64,
}

/// How follow writes: as lines for a person, or as JSON lines.
struct Output {
    json: bool,
}

impl Output {
    /// Writes a message line (stdout) or its record; false when stdout is gone.
    fn message(&self, line: &str, record: FollowRecord) -> bool {
        let text = if self.json {
            encode(&record)
        } else {
            line.to_string()
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{text}").and_then(|()| out.flush()).is_ok()
    }

    /// Writes news around the messages: stderr as words, stdout as a record.
    fn news(&self, line: &str, record: impl FnOnce() -> FollowRecord) {
        if self.json {
            let text = encode(&record());
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}").and_then(|()| out.flush());
        } else {
            esay!("{line}");
        }
    }

    /// A hint for a person only (scripts are not told how to type commands).
    fn hint(&self, line: &str) {
        if !self.json {
            esay!("{line}");
        }
    }
}

fn encode(record: &FollowRecord) -> String {
    serde_json::to_string(record).expect("a follow record encodes")
}

fn connection(status: ConnectionStatus) -> (&'static str, Option<u32>) {
    match status {
        ConnectionStatus::Connected => ("connected", None),
        ConnectionStatus::Reconnecting { attempt } => ("reconnecting", Some(attempt)),
        ConnectionStatus::Offline => ("offline", None),
    }
}

/// `sund follow`.
pub(crate) async fn follow(
    data_dir: &Path,
    count: Option<u64>,
    conversations: &[String],
    fetch_into: Option<&Path>,
    json: bool,
) -> Result<(), String> {
    if let Some(dir) = fetch_into.filter(|d| !d.is_dir()) {
        return Err(format!(
            "{} is not a directory: create it or give another with --fetch-into",
            dir.display()
        ));
    }
    let output = Output { json };
    let device = load(data_dir)?;
    for name in conversations {
        // `@user` is the DM with that user; other names as `send` takes them.
        device
            .name_conversation(name, device.resolve_conversation(name))
            .map_err(|e| e.to_string())?;
    }
    let names = device.conversation_names();
    let name_of = |id: ConversationId| names.get(&id).cloned();
    let mut node = driver::start(device.options())
        .await
        .map_err(|e| e.to_string())?;
    let mut members = group_commands::members(&node).await;
    let mut users = group_commands::users(&node, &device).await;
    let mut unnamed = std::collections::BTreeSet::new();
    let mut delays_told = std::collections::BTreeSet::new();
    // Messages of users this user blocked are not shown (in rooms shared with them): the list
    // kept on the device from the start, then the gateway's.
    let mut blocked = crate::blocked::Blocked::load(&device);
    node.social(driver::SocialRequest::Fetch)
        .await
        .map_err(|e| e.to_string())?;
    let mut seen = 0;
    let mut stop = stop_signal();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            event = node.events.recv() => match event {
                Some(NodeEvent::Contacts { contacts, .. }) => blocked.update(&device, &contacts)?,
                Some(NodeEvent::Delivered { conversation: id, seq, sender, .. })
                    if blocked.hides(sender, &members) =>
                {
                    if let Some(notice) = blocked.notice() {
                        output.hint(notice);
                    }
                    node.taken(id, seq).await.map_err(|e| e.to_string())?;
                }
                Some(NodeEvent::Delivered { conversation: id, seq, body, .. })
                    if sund_model::node::told_names::is_roster(&body) =>
                {
                    // Members' addresses, which the node took as it read them: not a line of
                    // the conversation, but names for the lines after it.
                    node.taken(id, seq).await.map_err(|e| e.to_string())?;
                    users = group_commands::users(&node, &device).await;
                    // A DM this device joined unnamed: now it knows with whom.
                    if name_of(id).is_none() {
                        let groups = node.groups().await.unwrap_or_default();
                        let me = device.user_id();
                        let with = groups
                            .iter()
                            .find(|g| g.conversation == id && g.kind == sund_model::mls::group_ops::GroupKind::Dm)
                            .and_then(|g| g.names.iter().find(|(u, _)| Some(**u) != me));
                        if let Some((user, address)) = with {
                            if unnamed.insert(*user) {
                                let address = display::printable(&address.shown_from(device.home_domain())).into_owned();
                                output.hint(&format!("{id} is your DM with {address}: `sund contact {address}` names them and the DM"));
                            }
                        }
                    }
                }
                Some(NodeEvent::Delivered { conversation: id, seq, sender, body, .. }) => {
                    let conversation = name_of(id).unwrap_or_else(|| id.to_string());
                    let from = group_commands::who(sender, &members, &users);
                    if let Some(user) = members.get(&sender).filter(|u| !users.contains_key(u)) {
                        if unnamed.insert(*user) {
                            output.hint(&format!("{user} is not named on this device: if you know who it is, `sund contact NAME` shows their name"));
                        }
                    }
                    // A receipt is the sender's news (shown below as `FileReceipt`), not a
                    // line of the conversation.
                    if sund_model::node::files::Receipt::decode_message(&body).is_some() {
                        node.taken(id, seq).await.map_err(|e| e.to_string())?;
                        continue;
                    }
                    let file = sund_model::files::FileMessage::decode(&body);
                    // Files from others (its own are not offered to this device: the answer
                    // is then false, and nothing happens).
                    if let (Some(Ok(file)), Some(_)) = (&file, fetch_into) {
                        let digest = file.manifest.digest();
                        node.fetch_file(id, digest).await.map_err(|e| e.to_string())?;
                    }
                    let at = Place { conversation_id: id.to_string(), conversation: name_of(id), seq };
                    let (line, record) = message_line(&conversation, &from, sender, device.key.device_id(), &body, file, at);
                    // Taken only once printed: a message a closed pipe (`| head -1`) or a
                    // crash kept from the screen is shown by the next `follow`.
                    if !output.message(&line, record) {
                        break;
                    }
                    node.taken(id, seq).await.map_err(|e| e.to_string())?;
                    seen += 1;
                    if count.is_some_and(|c| seen >= c) {
                        break;
                    }
                }
                Some(NodeEvent::Gap { conversation, from, to }) => output.news(
                    &format!("{conversation}: seqs {from}..={to} are gone: the gateway no longer kept them for this device (it was away longer than the gateway keeps messages, or more waited for it than the gateway keeps per device)"),
                    || FollowRecord::Gap { conversation_id: conversation.to_string(), from, to },
                ),
                Some(NodeEvent::HistoryDiverged { conversation, upto }) => output.news(
                    &format!("{conversation}: the gateway lost messages this device had read (its disk lost writes it had reported durable) and gave their seqs, up to {upto}, to other messages, which this device cannot show. What it shows is kept. Tell the gateway's operator"),
                    || FollowRecord::HistoryDiverged { conversation_id: conversation.to_string(), upto },
                ),
                Some(NodeEvent::HistoryLost { conversation, from, to }) => output.news(
                    &format!("{conversation}: seqs {from}..={to} were lost (the gateway's disk lost writes it had reported durable, or the conversation's home, a gateway of another domain, did not send them here while it did not federate with this one); they cannot be fetched. Tell the gateway's operator"),
                    || FollowRecord::HistoryLost { conversation_id: conversation.to_string(), from, to },
                ),
                Some(NodeEvent::FileComplete { conversation, digest }) if fetch_into.is_some() => {
                    let dir = fetch_into.expect("matched").to_path_buf();
                    let file_id = file_commands::file_id(digest);
                    match node.save_file(conversation, digest, dir).await.map_err(|e| e.to_string())? {
                        Ok(path) => output.news(
                            &format!("saved {}", path.display()),
                            || FollowRecord::Saved { file_id: file_id.to_string(), path: path.display().to_string() },
                        ),
                        Err(why) => {
                            // A chunk of this device's copy was lost and dropped: fetched
                            // again, and saved when it completes.
                            let refetching = file_commands::lacks_chunks(&node, digest).await;
                            output.news(&format!("file {file_id} not saved: {why}"), || FollowRecord::NotSaved {
                                file_id: file_id.to_string(),
                                reason: why.clone(),
                                refetching,
                            });
                            if refetching {
                                output.hint(&format!("file {file_id}: fetching it again"));
                                node.fetch_file(conversation, digest).await.map_err(|e| e.to_string())?;
                            }
                        }
                    }
                }
                Some(NodeEvent::FileFailed { digest, reason, .. }) => {
                    let file_id = file_commands::file_id(digest);
                    output.news(&format!("file {file_id}: {reason}"), || FollowRecord::FileFailed { file_id: file_id.to_string(), reason: reason.clone() });
                }
                Some(NodeEvent::FileReceipt { conversation, digest, device: holder, verified }) => {
                    let shown = name_of(conversation).unwrap_or_else(|| conversation.to_string());
                    let who = group_commands::who(holder, &members, &users);
                    let words = file_commands::receipt_words(&display::printable(&who), verified);
                    let file_id = file_commands::file_id(digest);
                    output.news(
                        &format!("{}: file {file_id} delivered to {words}", display::printable(&shown)),
                        || FollowRecord::Receipt {
                            conversation_id: conversation.to_string(),
                            conversation: name_of(conversation),
                            file_id: file_id.to_string(),
                            by: who.clone(),
                            verified,
                        },
                    );
                }
                Some(NodeEvent::Status(status)) => output.news(&format!("status: {}", describe(status)), || {
                    let (connection, attempt) = connection(status);
                    FollowRecord::Status { connection, attempt }
                }),
                Some(NodeEvent::Refused { message, .. }) => output.news(
                    &format!("refused by the gateway: {message}"),
                    || FollowRecord::Refused { message: message.clone() },
                ),
                Some(NodeEvent::Throttled { code, retry_after, message }) => output.news(
                    &format!(
                        "the gateway is pacing this device ({}): {message}; sending again in {:.1} s",
                        code.name(),
                        retry_after.as_secs_f64()
                    ),
                    || FollowRecord::Throttled {
                        limit: code.name(),
                        retry_after_ms: u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX),
                        message: message.clone(),
                    },
                ),
                Some(NodeEvent::Revoked) => {
                    let _ = node.stop().await;
                    return Err(REVOKED.into());
                }
                Some(NodeEvent::GroupChangeDelayed { conversation, message, .. }) => {
                    // Once per reason and conversation: the device asks again every few seconds.
                    if delays_told.insert((conversation, message.clone())) {
                        let name = name_of(conversation).unwrap_or_else(|| conversation.to_string());
                        output.hint(&format!("a change to {name} waits: {message}; this device asks again by itself"));
                    }
                }
                Some(event @ (NodeEvent::Joined { .. } | NodeEvent::GroupChanged { .. } | NodeEvent::RemovedFrom { .. } | NodeEvent::Undecryptable { .. } | NodeEvent::GroupChangeRefused { .. })) => {
                    members = group_commands::members(&node).await;
                    users = group_commands::users(&node, &device).await;
                    let text = group_commands::describe_event(&event, &names, &members, &users);
                    let (kind, id) = group_event(&event);
                    output.news(&text, || FollowRecord::Group {
                        kind,
                        conversation_id: id.to_string(),
                        conversation: name_of(id),
                        text: text.clone(),
                    });
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

/// The line and the record of a delivered message (a file offer, a refused file, or text).
fn message_line(
    conversation: &str,
    from: &str,
    sender: DeviceId,
    me: DeviceId,
    body: &[u8],
    file: Option<Result<FileMessage, ManifestError>>,
    at: Place,
) -> (String, FollowRecord) {
    let shown = display::printable(conversation);
    let from_shown = display::printable(from);
    let seq = at.seq;
    match file {
        Some(Ok(file)) => {
            let manifest = &file.manifest;
            let own = sender == me;
            let line = if own {
                // Its own file (sent from this device): nothing to get.
                format!(
                    "[{shown}] this device sent a file: {} — `sund file list` shows who has it",
                    display::printable(manifest.name.as_str()),
                )
            } else {
                file_commands::offered_line(
                    &shown,
                    &from_shown,
                    manifest.digest(),
                    manifest.name.as_str(),
                    manifest.size,
                )
            };
            let record = FollowRecord::File {
                at,
                from: from.to_string(),
                sender: sender.to_string(),
                file_id: file_commands::file_id(manifest.digest()).to_string(),
                name: manifest.name.as_str().to_string(),
                size: manifest.size,
                own,
            };
            (line, record)
        }
        Some(Err(e)) => (
            format!("{shown} seq {seq} from {from_shown}: a file this device refuses ({e})"),
            FollowRecord::BadFile {
                at,
                from: from.to_string(),
                sender: sender.to_string(),
                reason: e.to_string(),
            },
        ),
        None => (
            format!(
                "{shown} seq {seq} from {from_shown}: {}",
                display::body(body)
            ),
            FollowRecord::Message {
                at,
                from: from.to_string(),
                sender: sender.to_string(),
                text: String::from_utf8_lossy(body).into_owned(),
            },
        ),
    }
}

/// The kind of a group event, and its conversation.
fn group_event(event: &NodeEvent) -> (&'static str, ConversationId) {
    match event {
        NodeEvent::Joined { conversation, .. } => ("joined", *conversation),
        NodeEvent::GroupChanged { conversation, .. } => ("changed", *conversation),
        NodeEvent::RemovedFrom { conversation, .. } => ("removed", *conversation),
        NodeEvent::Undecryptable { conversation, .. } => ("undecryptable", *conversation),
        NodeEvent::GroupChangeRefused { conversation, .. } => ("change_refused", *conversation),
        _ => unreachable!("only group events are described here"),
    }
}

/// Resolves when the user or a supervisor asks `follow` to stop: Ctrl-C (SIGINT), or SIGTERM
/// (`kill`, `systemctl stop`, `docker stop`). Either way the device says goodbye, so its
/// contacts see it go at once rather than when its session lapses.
fn stop_signal() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => Box::pin(async move {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }),
            Err(_) => Box::pin(async {
                let _ = tokio::signal::ctrl_c().await;
            }),
        }
    }
    #[cfg(not(unix))]
    Box::pin(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_record_is_one_line_with_its_text_unescaped() {
        let at = Place {
            conversation_id: "conv:00".into(),
            conversation: Some("@bob".into()),
            seq: 7,
        };
        let me = DeviceId(0x0101);
        let alice = DeviceId(0x0202);
        let (line, record) =
            message_line("@bob", "alice", alice, me, b"hi\nthere \x1b[31m", None, at);
        assert_eq!(line, "@bob seq 7 from alice: hi\\nthere \\u{1b}[31m");
        let json = encode(&record);
        assert!(!json.contains('\n'), "{json}");
        insta::assert_snapshot!(json, @r#"{"event":"message","conversation_id":"conv:00","conversation":"@bob","seq":7,"from":"alice","sender":"dev:00000000000000000000000000000202","text":"hi\nthere \u001b[31m"}"#);
    }

    #[test]
    fn status_and_gap_records_name_their_fields() {
        let (connection, attempt) = connection(ConnectionStatus::Reconnecting { attempt: 3 });
        insta::assert_snapshot!(
            encode(&FollowRecord::Status { connection, attempt }),
            @r#"{"event":"status","connection":"reconnecting","attempt":3}"#
        );
        let (connection, attempt) = super::connection(ConnectionStatus::Connected);
        insta::assert_snapshot!(
            encode(&FollowRecord::Status { connection, attempt }),
            @r#"{"event":"status","connection":"connected"}"#
        );
        insta::assert_snapshot!(
            encode(&FollowRecord::Gap { conversation_id: "conv:01".into(), from: 3, to: 9 }),
            @r#"{"event":"gap","conversation_id":"conv:01","from":3,"to":9}"#
        );
    }
}
