//! `sund file send | list | get`: files in DMs and rooms, with progress.
//!
//! Progress goes to stderr: a bar (bytes, rate, ETA) on a terminal, a plain line at each
//! quarter otherwise, so logs and pipes stay readable.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use sund_model::files::{sealed_len, FileId, FileName, FileSecret, ManifestDigest};
use sund_model::ids::{ConversationId, UserId};
use sund_model::node::transfers::OfferState;
use sund_model::node::NodeEvent;
use sund_node::device::Device;
use sund_node::driver::{self, FileSummary, NodeHandle, SentFileSummary};

use crate::{group_commands, stale_copy, why_stopped, REVOKED};

/// How long a transfer may go without progress before the command stops waiting (the
/// transfer itself is durable and goes on with the next command or `sund follow`).
const STALL: Duration = Duration::from_secs(30);

/// A progress display for `total` bytes.
struct Progress {
    bar: ProgressBar,
    plain: Option<(String, u64)>,
    total: u64,
}

impl Progress {
    fn new(what: &str, total: u64) -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_message(what.to_string());
            Progress {
                bar,
                plain: None,
                total,
            }
        } else {
            Progress {
                bar: ProgressBar::hidden(),
                plain: Some((what.to_string(), 0)),
                total,
            }
        }
    }

    fn set(&mut self, done: u64) {
        self.bar.set_position(done);
        if let Some((what, quarter)) = &mut self.plain {
            let now = (done.saturating_mul(4)) / self.total.max(1);
            if now > *quarter {
                *quarter = now;
                esay!("{what}: {} %", now * 25);
            }
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `1.5 MB`, for people.
fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30)),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

pub(crate) fn file_id(digest: ManifestDigest) -> FileId {
    FileId(digest.0[..8].try_into().expect("8 bytes"))
}

async fn open_node(device: &Device) -> Result<NodeHandle, String> {
    let node = driver::start(device.options())
        .await
        .map_err(|e| e.to_string())?;
    if node.status().await.is_ok_and(|s| s.state_copied) {
        let _ = node.stop().await;
        return Err(stale_copy());
    }
    Ok(node)
}

/// `sund file send CONVERSATION PATH`.
pub(crate) async fn send(data_dir: &Path, conversation: &str, path: &Path) -> Result<(), String> {
    let device = Device::load(data_dir).map_err(|e| e.to_string())?;
    let metadata =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !metadata.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{} has no file name Sund can send", path.display()))?;
    let name = FileName::new(name).map_err(|e| {
        format!("the name of {} cannot be sent as it is ({e}): rename the file or copy it under another name", path.display())
    })?;
    let source =
        std::fs::canonicalize(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let source = source
        .to_str()
        .ok_or_else(|| format!("{} is not a UTF-8 path; move the file", source.display()))?
        .to_string();
    let id = device.resolve_conversation(conversation);
    device.check_not_own_group(id)?;
    let mut node = open_node(&device).await?;
    if let Err(e) = group_commands::await_membership(&mut node, id).await {
        let _ = node.stop().await;
        return Err(format!("cannot send into `{conversation}`: {e}"));
    }
    // Files do not cross domains yet: members of other domains fetch from their own gateway,
    // which never holds this one's chunks. Said before anything moves, not found out by them.
    let groups = node.groups().await.unwrap_or_default();
    let (abroad, at_home) = members_abroad(&groups, id, &device);
    if !abroad.is_empty() {
        let who = abroad.join(", ");
        if at_home == 0 {
            let _ = node.stop().await;
            return Err(format!(
                "files do not reach members of other domains yet, and every other member of `{conversation}` is of another domain ({who}): nothing was sent; share it with them another way"
            ));
        }
        esay!(
            "files do not reach members of other domains yet: {who} will see that {} was sent but cannot fetch it",
            name.as_str()
        );
    }

    // Cut and hash the file once to learn its chunks; the node's driver reads, hashes again
    // and seals each chunk when the gateway asks for it.
    let secret = FileSecret::for_conversation(&device.key, id);
    let total = metadata.len();
    let mut reading = Progress::new(&format!("reading {}", name.as_str()), total);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader_path = PathBuf::from(&source);
    let cut = tokio::task::spawn_blocking(move || {
        sund_node::cutting::cut_and_hash(&reader_path, name, secret, |done| {
            let _ = tx.send(done);
        })
    });
    tokio::pin!(cut);
    let manifest = loop {
        tokio::select! {
            done = rx.recv() => if let Some(done) = done { reading.set(done) },
            result = &mut cut => break result.map_err(|e| e.to_string())?,
        }
    };
    reading.finish();
    let manifest = match manifest {
        Ok(m) => m,
        Err(e) => {
            let _ = node.stop().await;
            return Err(e);
        }
    };
    let file_name = manifest.name.as_str().to_string();
    // What the gateway holds of the file is counted in sealed bytes of distinct chunks.
    let mut distinct = std::collections::BTreeSet::new();
    let sealed_total: u64 = manifest
        .chunks
        .iter()
        .filter(|c| distinct.insert(c.hash))
        .map(|c| sealed_len(c.len as usize) as u64)
        .sum();
    let upload = match node.send_file(id, manifest, Bytes::from(source)).await {
        Ok(Ok(upload)) => upload,
        Ok(Err(e)) => {
            let _ = node.stop().await;
            return Err(format!("cannot send the file: {e}"));
        }
        Err(_) => return Err(format!("this device stopped ({})", why_stopped(node).await)),
    };
    let mut uploading = Progress::new(&format!("sending {file_name}"), total);
    let mut first_missing = None;
    let mut file_msg = None;
    loop {
        let event = match tokio::time::timeout(STALL, node.events.recv()).await {
            Ok(event) => event,
            Err(_) => {
                uploading.finish();
                let why = match node.status().await.ok().and_then(|s| s.last_problem) {
                    Some(problem) => format!(" ({problem})"),
                    None => String::new(),
                };
                let _ = node.stop().await;
                return Err(format!("no progress for {} s{why}; the upload is saved on this device and goes on with the next `sund follow` or `sund file send`", STALL.as_secs()));
            }
        };
        match event {
            Some(NodeEvent::UploadProgress {
                upload: u,
                remaining_bytes,
                ..
            }) if u == upload => {
                first_missing.get_or_insert(remaining_bytes);
                let moved = sealed_total.saturating_sub(remaining_bytes);
                uploading.set(total.saturating_mul(moved) / sealed_total.max(1));
            }
            Some(NodeEvent::FileSent {
                upload: u, msg_id, ..
            }) if u == upload => {
                uploading.set(total);
                file_msg = Some(msg_id);
            }
            Some(NodeEvent::Accepted { msg_id, seq, .. }) if Some(msg_id) == file_msg => {
                uploading.finish();
                let missing = first_missing.unwrap_or(sealed_total);
                let held = sealed_total.saturating_sub(missing);
                if missing == 0 {
                    say!(
                        "sent {file_name} ({}) to {conversation}: seq {seq}; the gateway held all of it already, so nothing moved",
                        size(total)
                    );
                } else if held > 0 {
                    say!(
                        "sent {file_name} ({}) to {conversation}: seq {seq}; {} of it was at the gateway already and did not move",
                        size(total),
                        size(total.saturating_mul(held) / sealed_total.max(1))
                    );
                } else {
                    say!("sent {file_name} ({}) to {conversation}: seq {seq}", size(total));
                }
                break;
            }
            Some(NodeEvent::FileSendFailed {
                upload: u,
                code,
                message,
                ..
            }) if u == upload => {
                uploading.finish();
                let _ = node.stop().await;
                return Err(format!("the file was refused ({code:?}): {message}"));
            }
            Some(NodeEvent::Refused { message, .. }) => {
                let _ = node.stop().await;
                return Err(format!("the gateway refused this device: {message}"));
            }
            Some(NodeEvent::Revoked) => {
                let _ = node.stop().await;
                return Err(REVOKED.into());
            }
            Some(_) => {}
            None => {
                return Err(format!(
                    "this device stopped ({}); the upload is saved and goes on with the next `sund follow`",
                    why_stopped(node).await
                ))
            }
        }
    }
    node.stop().await.map_err(|e| e.to_string())
}

fn state(file: &FileSummary) -> String {
    match file.state {
        OfferState::Offered if file.missing_bytes == 0 => "held".into(),
        OfferState::Offered => "offered".into(),
        OfferState::Fetching => format!("fetching, {} to go", size(file.missing_bytes)),
        OfferState::Complete => "complete".into(),
        OfferState::Failed => "failed".into(),
    }
}

/// How a receipt reads: `bob (dev:1a2b3c4d), verified`.
pub(crate) fn receipt_words(who: &str, verified: bool) -> String {
    if verified {
        format!("{who}, verified")
    } else {
        format!("{who}, not verified (no certificate key to check its signature)")
    }
}

/// `sund file list [CONVERSATION]`.
pub(crate) async fn list(data_dir: &Path, conversation: Option<&str>) -> Result<(), String> {
    let device = Device::load(data_dir).map_err(|e| e.to_string())?;
    let names = device.conversation_names();
    let only = conversation.map(|c| device.resolve_conversation(c));
    let node = open_node(&device).await?;
    let files = node.files().await.map_err(|e| e.to_string());
    let sent = node.sent_files().await.map_err(|e| e.to_string());
    let members = group_commands::members(&node).await;
    let users = group_commands::users(&node, &device).await;
    let _ = node.stop().await;
    let files: Vec<FileSummary> = files?
        .into_iter()
        .filter(|f| only.is_none_or(|c| c == f.conversation))
        .collect();
    let sent: Vec<SentFileSummary> = sent?
        .into_iter()
        .filter(|f| only.is_none_or(|c| c == f.conversation))
        .collect();
    if files.is_empty() && sent.is_empty() {
        say!("no files yet");
        return Ok(());
    }
    let line = |conversation: ConversationId, digest, bytes, state: &str, name: &str| {
        let conv = names
            .get(&conversation)
            .cloned()
            .unwrap_or_else(|| conversation.to_string());
        format!(
            "{}  {:>10}  {state:<24}  {}  in {conv}",
            file_id(digest),
            size(bytes),
            sund_node::display::printable(name),
        )
    };
    for file in sent {
        let (c, d, n) = (file.conversation, file.digest, file.size);
        say!("{}", line(c, d, n, "sent by this device", &file.name));
        let receipts: Vec<String> = file
            .receipts
            .iter()
            .map(|&(d, verified)| {
                let who = group_commands::who(d, &members, &users);
                receipt_words(&sund_node::display::printable(&who), verified)
            })
            .collect();
        if receipts.is_empty() {
            say!("    no device has said it holds it yet");
        } else {
            say!("    delivered to {}", receipts.join("; "));
        }
    }
    for file in files {
        let (c, d, n) = (file.conversation, file.digest, file.size);
        say!("{}", line(c, d, n, &state(&file), &file.name));
    }
    Ok(())
}

/// `sund file get ID [--out DIR]`.
pub(crate) async fn get(data_dir: &Path, id: &str, out: &Path) -> Result<(), String> {
    let wanted = FileId::parse(id).ok_or_else(|| {
        format!("`{id}` is not a file id: give the 16 hex digits `sund file list` shows")
    })?;
    if !out.is_dir() {
        return Err(format!(
            "{} is not a directory: create it or give another with --out",
            out.display()
        ));
    }
    let device = Device::load(data_dir).map_err(|e| e.to_string())?;
    let mut node = open_node(&device).await?;
    // A second round only if the first found a chunk of this device's copy missing or
    // damaged: the node dropped it, so the file lacks it and is fetched again.
    for round in 0..2 {
        let files = node.files().await.map_err(|e| e.to_string())?;
        let Some(file) = files.into_iter().find(|f| file_id(f.digest) == wanted) else {
            let _ = node.stop().await;
            return Err(format!("this device knows no file {id}: `sund file list` shows the ones it knows (a file sent while this device was away arrives with `sund follow`)"));
        };
        // Files do not cross domains yet: this device's gateway never holds chunks another
        // domain's device sent (said before asking it for them).
        if round == 0 {
            let groups = node.groups().await.unwrap_or_default();
            if let Some(address) = sender_abroad(&groups, &file, &device) {
                let _ = node.stop().await;
                return Err(format!(
                    "{} was sent by {address}, of another domain, and files do not cross domains yet: this device's gateway does not hold it; ask them to share it another way",
                    sund_node::display::printable(&file.name)
                ));
            }
        }
        // Refused before anything is fetched, not after.
        if let Err(why) = sund_node::driver::save_target(out, &file.name) {
            let _ = node.stop().await;
            return Err(why);
        }
        let saved = match fetch_and_save(&mut node, &file, id, out).await {
            Ok(saved) => saved,
            Err(FetchEnded::Stopped) => {
                return Err(format!("this device stopped ({})", why_stopped(node).await))
            }
            Err(FetchEnded::Failed(why)) => {
                let _ = node.stop().await;
                return Err(why);
            }
        };
        match saved {
            Ok(path) => {
                let _ = node.stop().await;
                say!("saved {} ({})", path.display(), size(file.size));
                return Ok(());
            }
            Err(why) if round == 0 && lacks_chunks(&node, file.digest).await => {
                esay!("{why}: fetching it again");
            }
            Err(why) => {
                let _ = node.stop().await;
                return Err(why);
            }
        }
    }
    unreachable!("the second round returns")
}

/// The domain of `user` as this device knows them (the address its user typed, or the one a
/// member told in the group's roster), if it is another than this device's.
fn domain_abroad(
    names: &BTreeMap<UserId, String>,
    user: UserId,
    device: &Device,
) -> Option<String> {
    let home = device.home_domain();
    let shown = names.get(&user)?;
    let address = sund_model::address::Address::parse(shown, home).ok()?;
    (address.domain() != home).then(|| shown.clone())
}

/// The members of `conv` of another domain than this device's (by address), and how many of
/// its other member devices are of this domain (or not known to be of another).
fn members_abroad(
    groups: &[driver::GroupSummary],
    conv: ConversationId,
    device: &Device,
) -> (Vec<String>, usize) {
    let Some(group) = groups.iter().find(|g| g.conversation == conv) else {
        return (Vec::new(), 0);
    };
    let names = device.user_names_with(groups);
    let me = device.key.device_id();
    let mut abroad: Vec<String> = Vec::new();
    let mut at_home = 0;
    for (_, user) in group.members.iter().filter(|(d, _)| *d != me) {
        match domain_abroad(&names, *user, device) {
            Some(shown) if !abroad.contains(&shown) => abroad.push(shown),
            Some(_) => {}
            None => at_home += 1,
        }
    }
    (abroad, at_home)
}

/// The address of the sender of `file` if it is a user of another domain than this device's.
fn sender_abroad(
    groups: &[driver::GroupSummary],
    file: &FileSummary,
    device: &Device,
) -> Option<String> {
    let group = groups
        .iter()
        .find(|g| g.conversation == file.conversation)?;
    let user = group
        .members
        .iter()
        .find(|(d, _)| *d == file.sender)
        .map(|(_, u)| *u)?;
    domain_abroad(&device.user_names_with(groups), user, device)
}

/// True if this device's file `digest` lacks chunks (after a save found one lost).
pub(crate) async fn lacks_chunks(node: &NodeHandle, digest: ManifestDigest) -> bool {
    node.files().await.is_ok_and(|files| {
        files
            .iter()
            .any(|f| f.digest == digest && f.missing_bytes > 0)
    })
}

/// Why a fetch ended before its file was whole.
enum FetchEnded {
    /// The node stopped (it says why when stopped).
    Stopped,
    /// In words for the user.
    Failed(String),
}

/// Fetches what `file` lacks, saving it into `out` as it arrives: the save's outcome, or why
/// the fetch ended first.
async fn fetch_and_save(
    node: &mut NodeHandle,
    file: &FileSummary,
    id: &str,
    out: &Path,
) -> Result<Result<PathBuf, String>, FetchEnded> {
    let (conv, digest) = (file.conversation, file.digest);
    if file.missing_bytes == 0 {
        return node
            .save_file(conv, digest, out.to_path_buf())
            .await
            .map_err(|_| FetchEnded::Stopped);
    }
    // The file is written as its chunks arrive, so that it is whole moments after the last one
    // instead of after a second pass over all of it. If the fetch fails, stopping the node
    // ends the save, which removes what it wrote.
    let saving = node
        .save_file_as_it_arrives(conv, digest, out.to_path_buf())
        .await
        .map_err(|_| FetchEnded::Stopped)?;
    match node.fetch_file(conv, digest).await {
        Ok(true) => {}
        Ok(false) => {
            return Err(FetchEnded::Failed(format!(
                "this device knows no file {id}"
            )))
        }
        Err(_) => return Err(FetchEnded::Stopped),
    }
    let mut fetching = Progress::new(&format!("getting {}", file.name), file.size);
    fetching.set(file.size - file.missing_bytes);
    loop {
        let event = match tokio::time::timeout(STALL, node.events.recv()).await {
            Ok(event) => event,
            Err(_) => {
                fetching.finish();
                return Err(FetchEnded::Failed(format!("no progress for {} s; what arrived is kept, and `sund file get {id}` goes on from there", STALL.as_secs())));
            }
        };
        match event {
            Some(NodeEvent::FileProgress {
                digest: d,
                remaining_bytes,
                ..
            }) if d == digest => fetching.set(file.size - remaining_bytes),
            Some(NodeEvent::FileComplete { digest: d, .. }) if d == digest => break,
            Some(NodeEvent::FileFailed {
                digest: d, reason, ..
            }) if d == digest => {
                fetching.finish();
                return Err(FetchEnded::Failed(reason));
            }
            Some(NodeEvent::Revoked) => return Err(FetchEnded::Failed(REVOKED.into())),
            Some(_) => {}
            None => return Err(FetchEnded::Stopped),
        }
    }
    fetching.finish();
    saving.finished().await.map_err(|_| FetchEnded::Stopped)
}

/// What `sund follow` prints for a file offered to this device.
pub(crate) fn offered_line(
    conversation: &str,
    from: &str,
    digest: ManifestDigest,
    name: &str,
    bytes: u64,
) -> String {
    format!(
        "[{conversation}] {from} sent a file: {} ({}) — sund file get {}",
        sund_node::display::printable(name),
        size(bytes),
        file_id(digest)
    )
}
