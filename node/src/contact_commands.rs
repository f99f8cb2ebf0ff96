//! `sund contacts add|remove|block|unblock|list|verify` and `sund presence`: contacts and
//! presence from the command line. Each command starts the device, asks the gateway, waits for
//! its answer and says what changed in words; the gateway holds the truth, the device keeps the
//! names and which users it verified (safety numbers, from the DM's MLS state).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use sund_model::address::Address;
use sund_model::identity::DevicePublicKey;
use sund_model::ids::UserId;
use sund_model::node::{dm_id, ContactList, NodeEvent};
use sund_model::trust::safety_number::SafetyNumber;
use sund_model::wire::payload::{ContactAction, Seen};
use sund_node::device::Device;
use sund_node::driver::{self, GroupSummary, NodeHandle, SocialRequest};

/// How long a command waits for the gateway's answer.
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);
/// How long `sund contacts verify` waits for the device to join a DM it has not joined yet.
const DM_WAIT: Duration = Duration::from_secs(5);
/// How long `sund presence` waits for the state of every watched user.
const PRESENCE_DEADLINE: Duration = Duration::from_secs(10);
/// How long `sund presence` waits, after the gateway's answer, for the states of contacts of
/// other domains that their gateways were asked for.
const ABROAD_WAIT: Duration = Duration::from_secs(3);

fn load(data_dir: &Path) -> Result<Device, String> {
    let device = Device::load(data_dir).map_err(|e| e.to_string())?;
    if device.user.is_none() {
        return Err(
            "this device has no user; set one up with `sund init --user NAME` (contacts are \
             between users)"
                .into(),
        );
    }
    Ok(device)
}

/// A user as this device names them.
fn name_of(user: UserId, names: &BTreeMap<UserId, String>) -> String {
    names
        .get(&user)
        .cloned()
        .unwrap_or_else(|| user.to_string())
}

/// A user named on the command line: a name (`bob`, a user of this device's domain, or
/// `bob@b.example`), or `user:` and the 32 hex digits of an id (as `sund contacts list` shows
/// someone whose name this device does not know yet).
fn parse_user(device: &Device, text: &str) -> Result<(UserId, Option<Address>), String> {
    if let Some(hex) = text.strip_prefix("user:") {
        let bytes = sund_model::hex::decode_array::<16>(hex).ok_or_else(|| {
            format!("`{text}` is not a user id: `user:` and 32 hex digits, as `sund contacts list` shows them")
        })?;
        return Ok((UserId::from_bytes(bytes), None));
    }
    let address = device.address(text)?;
    Ok((address.user(), Some(address)))
}

/// The domain to name with a contact change: the user's if it is not this device's (the
/// gateway cannot tell it from the id).
fn foreign_domain(device: &Device, known: Option<&Address>) -> Option<String> {
    known
        .filter(|a| a.domain() != device.home_domain())
        .map(|a| a.domain().to_string())
}

/// This device's user's name, as another user of its domain types it.
fn own_name(device: &Device) -> String {
    device
        .user
        .as_ref()
        .map(|a| a.name().to_string())
        .unwrap_or_default()
}

/// Sends `request`, waits for the listing that answers it, and keeps its blocks on the device
/// (for `follow`).
async fn ask_and_keep(
    node: &mut NodeHandle,
    device: &Device,
    request: SocialRequest,
) -> Result<ContactList, String> {
    let list = ask(node, request).await?;
    let blocked = list.blocked.iter().copied().collect();
    device
        .set_blocked_users(&blocked)
        .map_err(|e| e.to_string())?;
    Ok(list)
}

/// Sends `request` and waits for the listing that answers it.
async fn ask(node: &mut NodeHandle, request: SocialRequest) -> Result<ContactList, String> {
    let id = node
        .social(request)
        .await
        .map_err(|e| e.to_string())?
        .expect("a contact request has an id");
    let deadline = tokio::time::sleep(ANSWER_DEADLINE);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            event = node.events.recv() => match event {
                Some(NodeEvent::Contacts { request: Some(r), contacts }) if r == id => {
                    return Ok(contacts);
                }
                Some(NodeEvent::ContactsRefused { request, code, message, retry_after })
                    if request == id =>
                {
                    let wait = retry_after
                        .map(|d| format!("; try again in {}", sund_model::gateway::limits::describe_wait(d)))
                        .unwrap_or_default();
                    return Err(format!("the gateway refused ({}): {message}{wait}", code.name()));
                }
                Some(NodeEvent::Refused { code, message }) => {
                    return Err(format!("the gateway refused this device ({}): {message}", code.name()));
                }
                Some(_) => {}
                None => return Err("the device stopped".into()),
            },
            _ = &mut deadline => {
                return Err(format!(
                    "no answer from the gateway within {} s; check `sund status`, then run the command again (nothing was changed on this device)",
                    ANSWER_DEADLINE.as_secs()
                ));
            }
        }
    }
}

/// `sund contacts add|remove|block|unblock NAME`.
pub async fn change(data_dir: &Path, name: &str, action: ContactAction) -> Result<(), String> {
    let device = load(data_dir)?;
    let (user, known) = parse_user(&device, name)?;
    if device.user_id() == Some(user) {
        return Err(format!("`{name}` is this device's own user"));
    }
    let domain = foreign_domain(&device, known.as_ref());
    // How the other user names this one: by the whole address from another domain.
    let me = match (&domain, &device.user) {
        (Some(_), Some(own)) => own.to_string(),
        _ => own_name(&device),
    };
    if let Some(known) = known {
        device.remember_user(&known).map_err(|e| e.to_string())?;
    }
    let mut node = driver::start(device.options())
        .await
        .map_err(|e| e.to_string())?;
    let result = ask_and_keep(
        &mut node,
        &device,
        SocialRequest::Change(user, domain, action),
    )
    .await;
    // The names this device knows go to the user's other devices (and anything left over).
    let shared = match &result {
        Ok(_) => crate::contact_sync::share(&mut node, &device, &[]).await,
        Err(_) => crate::contact_sync::Shared::Nothing,
    };
    let _ = node.stop().await;
    let list = result?;
    shared.say();
    match action {
        ContactAction::Add if list.contacts.contains(&user) => say!(
            "{name} and you are contacts: you see each other's presence (`sund presence`)"
        ),
        ContactAction::Add => say!(
            "asked {name} to be contacts; they see it in `sund contacts list` and accept with `sund contacts add {me}`"
        ),
        ContactAction::Remove => {
            say!("{name} is not a contact any more (and any request between you is withdrawn)")
        }
        ContactAction::Block => say!(
            "blocked {name}: they cannot see your presence, start a DM with you or add you to a room, and their requests and their messages in rooms you share are hidden"
        ),
        ContactAction::Unblock => say!(
            "unblocked {name}; you are contacts again only once you both add each other"
        ),
    }
    Ok(())
}

/// `sund contacts list`.
pub async fn list(data_dir: &Path, json: bool) -> Result<(), String> {
    let device = load(data_dir)?;
    let mut node = driver::start(device.options())
        .await
        .map_err(|e| e.to_string())?;
    let result = ask_and_keep(&mut node, &device, SocialRequest::Fetch).await;
    let groups = node.groups().await.unwrap_or_default();
    let _ = node.stop().await;
    let list = result?;
    // Someone who asked and was never named here may have been told in a shared group.
    let names = device.user_names_with(&groups);
    let named =
        |users: &[UserId]| -> Vec<String> { users.iter().map(|u| name_of(*u, &names)).collect() };
    let me = device.user_id().unwrap_or_default();
    let verified = device.verified_users();
    let check = |user: UserId| -> Verification {
        let now = dm_keys(&groups, me, user).map(|(_, theirs)| theirs);
        Verification::of(verified.get(&user), now.as_ref())
    };
    if json {
        let verification: BTreeMap<String, &str> = list
            .contacts
            .iter()
            .map(|u| (name_of(*u, &names), check(*u).word()))
            .collect();
        let doc = serde_json::json!({
            "contacts": named(&list.contacts),
            "verification": verification,
            "incoming": named(&list.incoming),
            "outgoing": named(&list.outgoing),
            "blocked": named(&list.blocked),
            "invisible": list.invisible,
        });
        say!("{doc}");
        return Ok(());
    }
    let line = |label: &str, users: &[UserId]| {
        let shown = named(users);
        if shown.is_empty() {
            say!("{label}: none");
        } else {
            say!("{label}: {}", shown.join(", "));
        }
    };
    let contacts: Vec<String> = list
        .contacts
        .iter()
        .map(|u| match check(*u) {
            Verification::Unverified => name_of(*u, &names),
            other => format!("{} ({})", name_of(*u, &names), other.word()),
        })
        .collect();
    if contacts.is_empty() {
        say!("contacts: none");
    } else {
        say!("contacts: {}", contacts.join(", "));
    }
    line(
        "asked you (accept with `sund contacts add NAME`, or the id shown)",
        &list.incoming,
    );
    line("you asked", &list.outgoing);
    line("blocked", &list.blocked);
    say!(
        "you are {}",
        if list.invisible {
            "invisible: offline to everyone (`sund presence --visible` to show again)"
        } else {
            "visible to your contacts"
        }
    );
    Ok(())
}

/// Whether a user is verified on this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verification {
    /// Never marked.
    Unverified,
    /// Marked, and the DM holds the same devices of theirs now.
    Verified,
    /// Marked, but their devices in the DM differ now (or there is no DM to tell).
    Changed,
}

impl Verification {
    fn of(
        marked: Option<&BTreeSet<DevicePublicKey>>,
        now: Option<&BTreeSet<DevicePublicKey>>,
    ) -> Verification {
        match (marked, now) {
            (None, _) => Verification::Unverified,
            (Some(then), Some(now)) if then == now => Verification::Verified,
            (Some(_), _) => Verification::Changed,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Verification::Unverified => "not verified",
            Verification::Verified => "verified",
            Verification::Changed => "devices changed since verified: compare safety numbers again",
        }
    }
}

/// The device keys of `me` and of `other` in this device's DM with `other` (as its MLS state
/// holds them), or `None` if this device is not in such a DM.
fn dm_keys(
    groups: &[GroupSummary],
    me: UserId,
    other: UserId,
) -> Option<(BTreeSet<DevicePublicKey>, BTreeSet<DevicePublicKey>)> {
    let dm = groups.iter().find(|g| g.conversation == dm_id(me, other))?;
    let mut mine = BTreeSet::new();
    let mut theirs = BTreeSet::new();
    for (device, user) in &dm.members {
        let Some(key) = dm.keys.get(device) else {
            continue;
        };
        if *user == me {
            mine.insert(*key);
        } else if *user == other {
            theirs.insert(*key);
        }
    }
    (!theirs.is_empty() && !mine.is_empty()).then_some((mine, theirs))
}

/// What `sund contacts verify` does besides showing the number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyAction {
    /// Only show the number and whether the user is verified.
    Show,
    /// The user compared the numbers and they match: mark verified.
    Matches,
    /// Compare with the number the other device shows, typed in; mark verified if equal.
    Compare(String),
    /// Forget the mark.
    Forget,
}

/// `sund contacts verify NAME [--matches | --compare NUMBER | --forget]`.
pub async fn verify(data_dir: &Path, name: &str, action: VerifyAction) -> Result<(), String> {
    let device = load(data_dir)?;
    let (user, known) = parse_user(&device, name)?;
    let me = device.user_id().unwrap_or_default();
    if me == user {
        return Err(format!(
            "`{name}` is this device's own user: verify someone else"
        ));
    }
    if let Some(known) = known {
        device.remember_user(&known).map_err(|e| e.to_string())?;
    }
    let typed = match &action {
        VerifyAction::Compare(text) => Some(SafetyNumber::parse(text).ok_or_else(|| {
            format!(
                "`{text}` is not a safety number: 60 digits, as `sund contacts verify {}` shows them on {name}'s device",
                own_name(&device)
            )
        })?),
        _ => None,
    };
    let mut node = driver::start(device.options())
        .await
        .map_err(|e| e.to_string())?;
    if action == VerifyAction::Forget {
        let result = device.set_verified(user, None).map_err(|e| e.to_string());
        let shared = match &result {
            Ok(record) => {
                crate::contact_sync::share(&mut node, &device, std::slice::from_ref(record)).await
            }
            Err(_) => crate::contact_sync::Shared::Nothing,
        };
        let _ = node.stop().await;
        result?;
        say!("{name} is not marked verified any more");
        shared.say();
        return Ok(());
    }
    // A Welcome into the DM may still wait at the gateway: give the device a moment to
    // connect and join before saying there is none.
    let deadline = tokio::time::Instant::now() + DM_WAIT;
    let keys = loop {
        let groups = match node.groups().await {
            Ok(groups) => groups,
            Err(e) => {
                let _ = node.stop().await;
                return Err(e.to_string());
            }
        };
        let keys = dm_keys(&groups, me, user);
        if keys.is_some() || tokio::time::Instant::now() >= deadline {
            break keys;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let Some((mine, theirs)) = keys else {
        let _ = node.stop().await;
        return Err(format!(
            "this device is not in a DM with {name} yet, and safety numbers come from the DM's devices: start one with `sund dm {name}` (or wait for {name}'s)"
        ));
    };
    let mine_list: Vec<DevicePublicKey> = mine.iter().copied().collect();
    let theirs_list: Vec<DevicePublicKey> = theirs.iter().copied().collect();
    let number = SafetyNumber::of(me, &mine_list, user, &theirs_list);
    let plural = |n: usize| if n == 1 { "device" } else { "devices" };
    say!(
        "safety number with {name} (your {} {} and their {} {} in your DM):",
        mine.len(),
        plural(mine.len()),
        theirs.len(),
        plural(theirs.len())
    );
    for line in number.lines() {
        say!("    {line}");
    }
    let marked = device.verified_users().remove(&user);
    let outcome = match (action, typed) {
        (VerifyAction::Compare(_), Some(typed)) if typed != number => Err(format!(
            "the numbers differ: the devices in your DM are not the ones {name}'s device sees. Do not trust this conversation with secrets until you find out why (a new device of theirs, or of yours, not yet in the DM changes it too)"
        )),
        (VerifyAction::Compare(_) | VerifyAction::Matches, _) => {
            match device.set_verified(user, Some(&theirs)) {
                Ok(record) => {
                    say!(
                        "{name} is verified: `sund contacts list` says so until their devices change"
                    );
                    crate::contact_sync::share(&mut node, &device, &[record])
                        .await
                        .say();
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        }
        _ => {
            let me_name = own_name(&device);
            let verification = Verification::of(marked.as_ref(), Some(&theirs));
            say!("{name}: {}", verification.word());
            if verification != Verification::Verified {
                say!(
                    "compare it with what `sund contacts verify {me_name}` shows on {name}'s device, in person or over a call you trust; if they are the same, run `sund contacts verify {name} --matches`"
                );
            }
            Ok(())
        }
    };
    let _ = node.stop().await;
    outcome
}

/// `sund presence [NAME...] [--invisible | --visible]`.
pub async fn presence(
    data_dir: &Path,
    users: &[String],
    invisible: Option<bool>,
) -> Result<(), String> {
    let device = load(data_dir)?;
    for name in users {
        parse_user(&device, name)?;
    }
    let mut node = driver::start(device.options())
        .await
        .map_err(|e| e.to_string())?;
    let result = presence_with(&mut node, &device, users, invisible).await;
    let _ = node.stop().await;
    result
}

async fn presence_with(
    node: &mut NodeHandle,
    device: &Device,
    users: &[String],
    invisible: Option<bool>,
) -> Result<(), String> {
    if let Some(on) = invisible {
        let list = ask_and_keep(node, device, SocialRequest::Invisible(on)).await?;
        if list.invisible {
            say!("you appear offline to everyone now, while this device works as usual (`sund presence --visible` to show again)");
        } else {
            say!("your contacts see you online again");
        }
        return Ok(());
    }
    let mut watched: Vec<UserId> = Vec::new();
    for text in users {
        let (user, known) = parse_user(device, text)?;
        if let Some(known) = known {
            device.remember_user(&known).map_err(|e| e.to_string())?;
        }
        watched.push(user);
    }
    let names = device.user_names();
    if users.is_empty() {
        watched = ask_and_keep(node, device, SocialRequest::Fetch)
            .await?
            .contacts;
    }
    if watched.is_empty() {
        say!("no contacts yet: add one with `sund contacts add NAME`");
        return Ok(());
    }
    node.social(SocialRequest::Watch(watched.clone()))
        .await
        .map_err(|e| e.to_string())?;
    let mut seen: BTreeMap<UserId, Seen> = BTreeMap::new();
    let deadline = tokio::time::sleep(PRESENCE_DEADLINE);
    tokio::pin!(deadline);
    // Contacts of other domains are asked of their gateways: once every state is in, wait
    // a moment more for those still being asked.
    let mut answered = false;
    while seen.len() < watched.len() || seen.values().any(|s| *s == Seen::Asking) {
        tokio::select! {
            event = node.events.recv() => match event {
                Some(NodeEvent::Presence { user, seen: state }) => {
                    seen.insert(user, state);
                    if !answered && seen.len() == watched.len() {
                        answered = true;
                        let wait = tokio::time::Instant::now() + ABROAD_WAIT;
                        if wait < deadline.deadline() {
                            deadline.as_mut().reset(wait);
                        }
                    }
                }
                Some(NodeEvent::ContactsRefused { code, message, retry_after, .. }) => {
                    let wait = retry_after
                        .map(|d| format!("; try again in {}", sund_model::gateway::limits::describe_wait(d)))
                        .unwrap_or_default();
                    return Err(format!("the gateway refused the watchlist ({}): {message}{wait}", code.name()));
                }
                Some(NodeEvent::Refused { code, message }) => {
                    return Err(format!("the gateway refused this device ({}): {message}", code.name()));
                }
                Some(_) => {}
                None => return Err("the device stopped".into()),
            },
            _ = &mut deadline => break,
        }
    }
    if seen.is_empty() {
        return Err(format!(
            "no answer from the gateway within {} s; check `sund status`",
            PRESENCE_DEADLINE.as_secs()
        ));
    }
    let abroad = device.users_abroad();
    for user in watched {
        let state = seen.get(&user).copied().unwrap_or(Seen::Unknown);
        let words = match state {
            Seen::Unknown if abroad.contains(&user) => {
                "unknown (not a contact of yours, invisible, not sharing it, or their domain's gateway cannot be reached now)"
            }
            Seen::Asking => {
                "not known yet: their domain's gateway has not answered (try again in a moment)"
            }
            Seen::Unknown => "unknown (not a contact of yours, invisible, or not sharing it)",
            other => other.describe(),
        };
        say!("{}: {words}", name_of(user, &names));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(seeds: &[u8]) -> BTreeSet<DevicePublicKey> {
        seeds.iter().map(|s| DevicePublicKey([*s; 32])).collect()
    }

    #[test]
    fn a_verified_user_whose_devices_changed_is_shown_as_changed_not_verified() {
        let then = keys(&[1, 2]);
        assert_eq!(
            Verification::of(None, Some(&then)),
            Verification::Unverified
        );
        assert_eq!(
            Verification::of(Some(&then), Some(&keys(&[2, 1]))),
            Verification::Verified
        );
        for now in [keys(&[1]), keys(&[1, 2, 3]), keys(&[1, 4])] {
            assert_eq!(
                Verification::of(Some(&then), Some(&now)),
                Verification::Changed
            );
        }
        assert_eq!(
            Verification::of(Some(&then), None),
            Verification::Changed,
            "no DM to tell from: not shown as verified"
        );
    }
}
