//! `sund dm`, `sund room ...` and `sund devices`: DMs and rooms from the command line.
//!
//! Each command starts the device's node, asks for the change, and waits until the change is
//! done (the group has nothing queued any more) or refused, so that the next command sees it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sund_model::address::Address;
use sund_model::ids::{ConversationId, DeviceId, UserId};
use sund_model::mls::device_groups::{DeviceGroups, GroupStatus, Intent};
use sund_model::mls::group_ops::{GroupKind, Role};
use sund_model::node::NodeEvent;
use sund_model::wire::payload::ErrorCode;
use sund_node::device::Device;
use sund_node::driver::{self, GroupRequest, GroupSummary, NodeHandle};

use crate::RoomCommand;

/// How long a command waits for its change to be sequenced.
const GROUP_DEADLINE: Duration = Duration::from_secs(20);

/// Users as people type them (`name`, or `name@domain`; see [`Device::address`]), or the
/// first error.
pub fn addresses(device: &Device, users: &[String]) -> Result<Vec<Address>, String> {
    users.iter().map(|u| device.address(u)).collect()
}

/// The intents adding `users` to a group: one for this device's domain, one per other domain
/// (whose gateway hands out its users' KeyPackages).
fn add_intents(device: &Device, users: &[Address]) -> Vec<Intent> {
    let mut local = Vec::new();
    let mut foreign: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for user in users {
        let id = user.user().to_bytes().into();
        if user.domain() == device.home_domain() {
            local.push(id);
        } else {
            foreign
                .entry(user.domain().to_string())
                .or_default()
                .push(id);
        }
    }
    let local = (!local.is_empty()).then_some(Intent::AddUsers(local));
    local
        .into_iter()
        .chain(
            foreign
                .into_iter()
                .map(|(domain, users)| Intent::AddForeign { domain, users }),
        )
        .collect()
}

/// Member devices and their users, over every group of the device.
pub type Members = BTreeMap<DeviceId, UserId>;

/// The members of every group the running node is in.
pub async fn members(node: &NodeHandle) -> Members {
    node.groups()
        .await
        .unwrap_or_default()
        .into_iter()
        .flat_map(|g| g.members)
        .collect()
}

/// Everyone this device can name: the users this user named, and for the others the
/// addresses members tell in the groups of the running node (see [`Device::user_names_with`]).
pub async fn users(node: &NodeHandle, device: &Device) -> BTreeMap<UserId, String> {
    device.user_names_with(&node.groups().await.unwrap_or_default())
}

/// A device as people read it: `alice (dev:1a2b3c4d)` when the user is known.
pub fn who(device: DeviceId, members: &Members, users: &BTreeMap<UserId, String>) -> String {
    let short = format!("{device}");
    let short = &short[..short.len().min(12)];
    match members.get(&device).and_then(|u| users.get(u).cloned()) {
        Some(name) => format!("{name} ({short})"),
        None => match members.get(&device) {
            Some(user) => format!("{user} ({short})"),
            None => short.to_string(),
        },
    }
}

fn conv_name(conv: ConversationId, names: &BTreeMap<ConversationId, String>) -> String {
    names
        .get(&conv)
        .cloned()
        .unwrap_or_else(|| conv.to_string())
}

/// One line about a group event, for `follow`.
pub fn describe_event(
    event: &NodeEvent,
    names: &BTreeMap<ConversationId, String>,
    members: &Members,
    users: &BTreeMap<UserId, String>,
) -> String {
    match event {
        NodeEvent::Joined {
            conversation,
            seq,
            kind,
        } if *kind == GroupKind::Dm && !names.contains_key(conversation) => format!(
            "joined dm {} at seq {seq} (if you know who started it, `sund contact NAME` names them and the DM)",
            conv_name(*conversation, names)
        ),
        NodeEvent::Joined {
            kind: GroupKind::Own,
            ..
        } => "joined the group of your own devices: they share your contact book (names, verified users) through it".to_string(),
        NodeEvent::Joined {
            conversation,
            seq,
            kind,
        } => format!(
            "joined {kind} {} at seq {seq} (name it: sund room name {conversation} NAME)",
            conv_name(*conversation, names)
        ),
        NodeEvent::GroupChanged {
            conversation,
            epoch,
            sender,
            added,
            removed,
            ..
        } => {
            let mut line = format!(
                "{} epoch {epoch} by {}",
                conv_name(*conversation, names),
                who(*sender, members, users)
            );
            for d in added {
                line.push_str(&format!(", added {}", who(*d, members, users)));
            }
            for d in removed {
                line.push_str(&format!(", removed {d}"));
            }
            line
        }
        NodeEvent::RemovedFrom { conversation, .. } => {
            format!(
                "this device was removed from {}",
                conv_name(*conversation, names)
            )
        }
        NodeEvent::Undecryptable {
            conversation,
            seq,
            reason,
            ..
        } => format!(
            "{} seq {seq} could not be read: {reason}",
            conv_name(*conversation, names)
        ),
        NodeEvent::GroupChangeRefused {
            conversation,
            message,
            ..
        } => format!(
            "{}: the gateway refused a change: {message}",
            conv_name(*conversation, names)
        ),
        other => format!("{other:?}"),
    }
}

fn load(data_dir: &Path) -> Result<Device, String> {
    Device::load(data_dir).map_err(|e| e.to_string())
}

/// Starts the node, asks for `request`, waits until the group has nothing queued, stops.
async fn change(device: &Device, request: GroupRequest) -> Result<GroupSummary, String> {
    if device.user.is_none() {
        return Err(
            "this device has no user; set one up with `sund init --user NAME` (DMs and rooms \
             are between users)"
                .into(),
        );
    }
    let mut node = driver::start(device.options())
        .await
        .map_err(|e| e.to_string())?;
    let names = device.user_names();
    let adds_users = matches!(
        &request,
        GroupRequest::Dm(_)
            | GroupRequest::DmAcross(..)
            | GroupRequest::Room(_)
            | GroupRequest::Change(_, Intent::AddUsers(_) | Intent::AddForeign { .. })
    );
    let result = async {
        if let GroupRequest::Change(conv, _) = &request {
            await_membership(&mut node, *conv).await?;
        }
        let conv = node
            .group(request)
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let group = wait_until_done(&mut node, conv, &names).await?;
        if adds_users {
            tell_roster(&mut node, device, &group).await;
        }
        Ok(group)
    }
    .await;
    let _ = node.stop().await;
    result
}

/// Tells a group this device just added users to the addresses it knows of its members, its
/// own included, in one end-to-end-encrypted roster (`sund_model::node::told_names`): members
/// who never named each other (users of another domain, most often) then see names instead
/// of user ids. Best effort: a roster the gateway has not sequenced within a few seconds
/// stays in the outbox and goes with the next command.
async fn tell_roster(node: &mut NodeHandle, device: &Device, group: &GroupSummary) {
    let mut known = sund_node::contact_files::addresses(&device.data_dir);
    if let Some(own) = &device.user {
        known.insert(own.user(), own.clone());
    }
    for (user, address) in &group.names {
        known.entry(*user).or_insert_with(|| address.clone());
    }
    let members: std::collections::BTreeSet<UserId> =
        group.members.iter().map(|(_, u)| *u).collect();
    let roster: Vec<&Address> = members.iter().filter_map(|u| known.get(u)).collect();
    if roster.is_empty() {
        return;
    }
    let body = sund_model::node::told_names::encode_roster(roster);
    let Ok(Ok(id)) = node.send(group.conversation, body).await else {
        return; // not saved: the members' names are told with the next change
    };
    let deadline = tokio::time::sleep(ROSTER_WAIT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return,
            event = node.events.recv() => match event {
                Some(NodeEvent::Accepted { msg_id, .. } | NodeEvent::Rejected { msg_id, .. }) if msg_id == id => return,
                Some(_) => {}
                None => return,
            }
        }
    }
}

/// How long a command waits for the gateway to sequence the roster it sends after a change.
const ROSTER_WAIT: Duration = Duration::from_secs(5);

/// How long a command waits, once connected, for the Welcome of a room this device was
/// invited to but has not opened yet.
const WELCOME_GRACE: Duration = Duration::from_secs(3);

/// Returns once this device is a member of `conv`. A room it was invited to while it was not
/// running joins from the Welcome waiting at the gateway, so a command on such a room waits
/// for the connection and then briefly for that Welcome before saying the room is unknown.
pub async fn await_membership(node: &mut NodeHandle, conv: ConversationId) -> Result<(), String> {
    membership(node, conv).await.map_err(|e| e.to_string())
}

/// Why [`membership`] found no DM or room.
#[derive(Debug)]
pub enum NotMember {
    /// Connected, and no Welcome came within the grace: the device was not invited.
    NotInvited(String),
    /// The gateway could not be reached, so a waiting Welcome could not be fetched.
    Unreachable(String),
    /// The gateway refused the device, or the node stopped.
    Failed(String),
}

impl std::fmt::Display for NotMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotMember::NotInvited(s) | NotMember::Unreachable(s) | NotMember::Failed(s) => {
                f.write_str(s)
            }
        }
    }
}

/// As [`await_membership`], telling apart a device not invited from one that could not ask.
pub async fn membership(node: &mut NodeHandle, conv: ConversationId) -> Result<(), NotMember> {
    let member = |groups: &[GroupSummary]| {
        groups.iter().any(|g| {
            g.conversation == conv
                && matches!(
                    g.status,
                    GroupStatus::Synchronized | GroupStatus::PendingCommit { .. }
                )
        })
    };
    let deadline = tokio::time::sleep(GROUP_DEADLINE);
    tokio::pin!(deadline);
    let mut connected_at: Option<tokio::time::Instant> = None;
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    loop {
        let groups = node
            .groups()
            .await
            .map_err(|e| NotMember::Failed(e.to_string()))?;
        if member(&groups) {
            return Ok(());
        }
        let unknown = || {
            format!(
                "{conv} is not a conversation this device is in: `sund devices` lists its DMs and rooms"
            )
        };
        if connected_at.is_some_and(|t| t.elapsed() >= WELCOME_GRACE) {
            return Err(NotMember::NotInvited(unknown()));
        }
        tokio::select! {
            _ = &mut deadline => return Err(NotMember::Unreachable(format!(
                "{}; the gateway could not be reached to fetch invitations (`sund status` says why)",
                unknown()
            ))),
            event = node.events.recv() => match event {
                Some(NodeEvent::Status(sund_model::node::ConnectionStatus::Connected)) => {
                    connected_at.get_or_insert_with(tokio::time::Instant::now);
                }
                Some(NodeEvent::Refused { message, .. }) => {
                    return Err(NotMember::Failed(format!("the gateway refused this device: {message}")));
                }
                Some(NodeEvent::Revoked) => return Err(NotMember::Failed(crate::REVOKED.into())),
                Some(_) => {}
                None => return Err(NotMember::Failed("the node stopped unexpectedly".into())),
            },
            _ = poll.tick() => {}
        }
    }
}

/// The longest rate-limit pause a group command waits out before returning (the change stays
/// queued in the device either way).
const THROTTLE_WAIT_MAX: Duration = Duration::from_secs(15);

pub(crate) async fn wait_until_done(
    node: &mut NodeHandle,
    conv: ConversationId,
    names: &BTreeMap<UserId, String>,
) -> Result<GroupSummary, String> {
    let deadline = tokio::time::sleep(GROUP_DEADLINE);
    tokio::pin!(deadline);
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    let mut waited = 0u32;
    // Why the change waits, as the gateway said it (another domain's gateway out of reach).
    let mut delayed: Option<String> = None;
    loop {
        tokio::select! {
            _ = &mut deadline => {
                let why = match &delayed {
                    Some(message) => format!("({message})"),
                    None => "(is the gateway reachable? `sund status`)".to_string(),
                };
                return Err(format!(
                    "the change to {conv} was not done within {GROUP_DEADLINE:?}; it stays queued \
                     and goes on with the next `sund` command {why}"
                ));
            }
            event = node.events.recv() => match event {
                Some(NodeEvent::GroupChangeDelayed { conversation, code, message }) if conversation == conv => {
                    if delayed.as_ref() != Some(&message) {
                        esay!("the change waits ({}): {message}; this device asks again by itself", code.name());
                        delayed = Some(message);
                    }
                }
                Some(NodeEvent::GroupChangeRefused { conversation, code: ErrorCode::UnknownUser, message }) if conversation == conv => {
                    let mut message = message;
                    for (id, name) in names {
                        message = message.replace(&id.to_string(), &format!("`{name}`"));
                    }
                    let hint = if message.contains("offered by the gateway of ") || message.contains("could be checked") {
                        "check the address; each domain's operator enrols its own users"
                    } else {
                        "check the name; the gateway's operator enrols users with `sund-gateway admin enrol-token USER`"
                    };
                    return Err(format!("{message}: {hint}"));
                }
                Some(NodeEvent::GroupChangeRefused { conversation, message, .. }) if conversation == conv => {
                    return Err(format!("the gateway refused the change: {message}"));
                }
                Some(NodeEvent::Refused { message, .. }) => {
                    return Err(format!("the gateway refused this device: {message}"));
                }
                Some(NodeEvent::Throttled { code, retry_after, message }) => {
                    let wait = sund_model::gateway::limits::describe_wait(retry_after);
                    if retry_after > THROTTLE_WAIT_MAX {
                        return Err(format!(
                            "the gateway is pacing this user ({}): {message}; the change stays queued and goes out with the next `sund` command after {wait}",
                            code.name()
                        ));
                    }
                    esay!("the gateway is pacing this user ({}): {message}; trying again in {wait}", code.name());
                    deadline.as_mut().reset(tokio::time::Instant::now() + retry_after + GROUP_DEADLINE);
                }
                Some(NodeEvent::Revoked) => {
                    return Err("this device was revoked by the gateway's operator and cannot connect again".into());
                }
                Some(_) => {}
                None => return Err("the node stopped unexpectedly".into()),
            },
            _ = poll.tick() => {
                waited += 1;
                if waited == 30 {
                    esay!("waiting for the gateway to sequence the change (up to {GROUP_DEADLINE:?}; `sund status` says whether it is reachable)…");
                }
                let groups = node.groups().await.map_err(|e| e.to_string())?;
                if let Some(g) = groups.into_iter().find(|g| g.conversation == conv) {
                    match g.status {
                        GroupStatus::Synchronized if g.queued == 0 && g.epoch.is_some() => return Ok(g),
                        GroupStatus::Removed { .. } => {
                            return Err(format!("this device is no longer in {conv}"));
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// `sund contact NAME`: this device shows NAME for that user (names are hashed on the wire and
/// in certificates, so a device learns them only from its user), and `@NAME` for the DM with
/// them.
pub fn contact(data_dir: &Path, name: &str) -> Result<(), String> {
    let device = load(data_dir)?;
    let address = device.address(name)?;
    device.remember_user(&address).map_err(|e| e.to_string())?;
    let user = address.user();
    let shown = address.shown_from(device.home_domain());
    match &device.user {
        // The DM's id comes from the two user ids, which the whole addresses make: the same
        // whatever the domains.
        Some(me) if *me != address => {
            let dm = sund_model::node::dm_id(me.user(), user);
            device
                .name_conversation(&format!("@{shown}"), dm)
                .map_err(|e| e.to_string())?;
            say!("{address} = {user}; your DM with them is @{shown} ({dm})");
        }
        _ => say!("{address} = {user}"),
    }
    Ok(())
}

/// Attempts to add a newly linked device of this user to its user's conversations (its
/// KeyPackages may still be on their way, so a few times, a few seconds apart).
const BRING_IN_ATTEMPTS: u32 = 5;

/// Adds `linked`, a new device of this device's user, to every DM and room this device is in
/// (as Signal's linked devices join their user's conversations), and says for each whether it
/// got in, and what to run where it did not.
pub async fn bring_in(node: &mut NodeHandle, device: &Device, linked: DeviceId) {
    let Some(user_name) = device.user.as_ref().map(|a| a.name().to_string()) else {
        return;
    };
    let me = device.user_id().expect("a device with a user");
    let mut names = device.conversation_names();
    names.insert(
        sund_model::node::own_id(me),
        "your devices' contact book".into(),
    );
    let users = device.user_names();
    let mut pending: Vec<ConversationId> = match node.groups().await {
        Ok(groups) => groups
            .into_iter()
            .filter(|g| {
                matches!(
                    g.status,
                    GroupStatus::Synchronized | GroupStatus::PendingCommit { .. }
                )
            })
            .map(|g| g.conversation)
            .collect(),
        Err(_) => return,
    };
    if pending.is_empty() {
        return;
    }
    say!(
        "adding the new device to {}'s {} conversation(s)…",
        user_name,
        pending.len()
    );
    for attempt in 1..=BRING_IN_ATTEMPTS {
        // The new device uploads its KeyPackages once its first session opens.
        tokio::time::sleep(Duration::from_secs(if attempt == 1 { 1 } else { 3 })).await;
        let mut still = Vec::new();
        for conv in pending {
            let request = GroupRequest::Change(conv, Intent::AddUsers(vec![me.to_bytes().into()]));
            let outcome = match node.group(request).await {
                Ok(Ok(_)) => wait_until_done(node, conv, &users).await,
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(g) if g.members.iter().any(|(d, _)| *d == linked) => {
                    say!(
                        "  {}: added",
                        crate::display::printable(&conv_name(conv, &names))
                    );
                    // The new device reads only what comes after its Welcome, so the names
                    // told before it joined never reach it: tell them again (members of
                    // another domain would show as user ids on it otherwise).
                    if g.members.iter().any(|(_, user)| *user != me) {
                        tell_roster(node, device, &g).await;
                    }
                }
                Ok(_) => still.push(conv),
                Err(e) => {
                    say!(
                        "  {}: not added ({e})",
                        crate::display::printable(&conv_name(conv, &names))
                    );
                }
            }
        }
        pending = still;
        if pending.is_empty() {
            return;
        }
    }
    for conv in pending {
        say!(
            "  {}: not added yet (the new device has not shown its keys to the gateway); once it has connected, run here: sund room invite {} {user_name}",
            crate::display::printable(&conv_name(conv, &names)),
            crate::display::printable(&conv_name(conv, &names))
        );
    }
}

fn print_group(name: &str, g: &GroupSummary, users: &BTreeMap<UserId, String>, me: DeviceId) {
    let epoch = g.epoch.map_or("-".to_string(), |e| e.to_string());
    let state = match &g.status {
        GroupStatus::Synchronized => "in sync".to_string(),
        GroupStatus::PendingCommit { .. } => "committing".to_string(),
        GroupStatus::PendingWelcome => "waiting for its Welcome".to_string(),
        GroupStatus::Removed { .. } => "removed".to_string(),
    };
    let queued = if g.queued > 0 {
        format!(", {} change(s) queued", g.queued)
    } else {
        String::new()
    };
    say!(
        "{} {name} ({}) epoch {epoch}, {state}{queued}",
        g.kind,
        g.conversation
    );
    let mut by_user: BTreeMap<UserId, Vec<DeviceId>> = BTreeMap::new();
    for (d, u) in &g.members {
        by_user.entry(*u).or_default().push(*d);
    }
    for (user, devices) in by_user {
        let name = users
            .get(&user)
            .cloned()
            .unwrap_or_else(|| user.to_string());
        let list: Vec<String> = devices
            .iter()
            .map(|d| {
                if *d == me {
                    format!("{d} (this device)")
                } else {
                    d.to_string()
                }
            })
            .collect();
        say!("  {name}: {}", list.join(", "));
    }
}

/// `sund dm USER`.
pub async fn dm(data_dir: &Path, user: &str) -> Result<(), String> {
    let device = load(data_dir)?;
    let address = device.address(user)?;
    if device.user.as_ref() == Some(&address) {
        return Err(format!(
            "`{user}` is this device's own user; name the person to write to"
        ));
    }
    device.remember_user(&address).map_err(|e| e.to_string())?;
    let group = change(&device, device.dm_request(&address)).await?;
    let user = address.shown_from(device.home_domain());
    let name = format!("@{user}");
    device
        .name_conversation(&name, group.conversation)
        .map_err(|e| e.to_string())?;
    print_group(
        &name,
        &group,
        &device.user_names_with(std::slice::from_ref(&group)),
        device.key.device_id(),
    );
    if !group.members.iter().any(|(_, u)| *u == address.user()) {
        say!(
            "  {user} has no device with KeyPackages at {} yet; add them later with \
             `sund room invite {name} {user}`",
            gateway_of(&address, device.home_domain())
        );
    }
    say!("write with: sund send {name} MESSAGE");
    Ok(())
}

/// Says which invited users have no device in the group (none had KeyPackages at their
/// gateway).
fn note_missing(name: &str, invited: &[Address], home: &str, group: &GroupSummary) {
    for address in invited {
        let id = address.user();
        let user = address.shown_from(home);
        if !group.members.iter().any(|(_, u)| *u == id) {
            say!(
                "  {user} has no device with KeyPackages at {} (never connected, or not \
                 a user there); invite them again once they have run sund: \
                 sund room invite {name} {user}",
                gateway_of(address, home)
            );
        }
    }
}

/// "the gateway", or "the gateway of DOMAIN" for a user of another domain than `home`.
fn gateway_of(address: &Address, home: &str) -> String {
    if address.domain() == home {
        "the gateway".to_string()
    } else {
        format!("the gateway of {}", address.domain())
    }
}

fn parse_role(role: &str) -> Result<Role, String> {
    match role {
        "owner" => Ok(Role::Owner),
        "admin" => Ok(Role::Admin),
        "member" => Ok(Role::Member),
        other => Err(format!(
            "unknown role `{other}`; use owner, admin or member"
        )),
    }
}

fn known_group(device: &Device, name: &str) -> Result<ConversationId, String> {
    let id = device.resolve_conversation(name);
    if device.conversation_names().contains_key(&id) || name.starts_with("conv:") {
        Ok(id)
    } else {
        Err(format!(
            "this device knows no room `{name}`; `sund devices` lists its rooms, and \
             `sund room name conv:ID {name}` names one it joined"
        ))
    }
}

/// `sund room ...`.
pub async fn room(command: RoomCommand) -> Result<(), String> {
    match command {
        RoomCommand::Create {
            data_dir,
            name,
            invite,
        } => {
            let device = load(&data_dir)?;
            let invite = addresses(&device, &invite)?;
            if device.conversation_names().values().any(|n| *n == name) {
                return Err(format!(
                    "this device already has a conversation named `{name}`"
                ));
            }
            for user in &invite {
                device.remember_user(user).map_err(|e| e.to_string())?;
            }
            let users = invite
                .iter()
                .filter(|a| a.domain() == device.home_domain())
                .map(Address::user)
                .collect();
            let mut group = change(&device, GroupRequest::Room(users)).await?;
            device
                .name_conversation(&name, group.conversation)
                .map_err(|e| e.to_string())?;
            // Users of other domains join by a commit each domain's packages make.
            let foreign: Vec<Address> = invite
                .iter()
                .filter(|a| a.domain() != device.home_domain())
                .cloned()
                .collect();
            for intent in add_intents(&device, &foreign) {
                group = change(&device, GroupRequest::Change(group.conversation, intent)).await?;
            }
            print_group(
                &name,
                &group,
                &device.user_names_with(std::slice::from_ref(&group)),
                device.key.device_id(),
            );
            note_missing(&name, &invite, device.home_domain(), &group);
            Ok(())
        }
        RoomCommand::Invite {
            data_dir,
            name,
            users,
        } => {
            let device = load(&data_dir)?;
            let users = addresses(&device, &users)?;
            let conv = known_group(&device, &name)?;
            for user in &users {
                device.remember_user(user).map_err(|e| e.to_string())?;
            }
            let mut group = None;
            for intent in add_intents(&device, &users) {
                group = Some(change(&device, GroupRequest::Change(conv, intent)).await?);
            }
            let Some(group) = group else {
                return Err("name at least one user to invite".into());
            };
            print_group(
                &name,
                &group,
                &device.user_names_with(std::slice::from_ref(&group)),
                device.key.device_id(),
            );
            note_missing(&name, &users, device.home_domain(), &group);
            Ok(())
        }
        RoomCommand::Remove {
            data_dir,
            name,
            user,
        } => {
            let device = load(&data_dir)?;
            let address = device.address(&user)?;
            let conv = known_group(&device, &name)?;
            let intent = Intent::RemoveUser(address.user().to_bytes().into());
            let group = change(&device, GroupRequest::Change(conv, intent)).await?;
            print_group(
                &name,
                &group,
                &device.user_names_with(std::slice::from_ref(&group)),
                device.key.device_id(),
            );
            Ok(())
        }
        RoomCommand::Role {
            data_dir,
            name,
            user,
            role,
        } => {
            let device = load(&data_dir)?;
            let address = device.address(&user)?;
            let conv = known_group(&device, &name)?;
            let role = parse_role(&role)?;
            let intent = DeviceGroups::role_change(address.user(), role);
            change(&device, GroupRequest::Change(conv, intent)).await?;
            say!("{user} is now {role} of {name}");
            Ok(())
        }
        RoomCommand::Leave { data_dir, name } => {
            let device = load(&data_dir)?;
            let conv = known_group(&device, &name)?;
            match leave(&device, conv).await? {
                Left::Removed => say!("this device left {name}"),
                Left::Proposed => say!(
                    "this device left {name}: the gateway sequenced its removal and it sends nothing more there; the removal's commit comes from the next member of the room to come online"
                ),
            }
            Ok(())
        }
        RoomCommand::Name { data_dir, id, name } => {
            let device = load(&data_dir)?;
            let hex = id.strip_prefix("conv:").unwrap_or(&id);
            let parsed = u128::from_str_radix(hex, 16)
                .ok()
                .filter(|_| hex.len() == 32)
                .ok_or_else(|| {
                    format!("`{id}` is not a conversation id (conv: and 32 hex digits)")
                })?;
            device
                .name_conversation(&name, ConversationId(parsed))
                .map_err(|e| e.to_string())?;
            say!("{name} = {}", ConversationId(parsed));
            Ok(())
        }
    }
}

/// How long `leave` waits for a member to commit the removal once the gateway has sequenced
/// it, before saying that it completes later.
const COMMIT_GRACE: Duration = Duration::from_secs(5);

/// How a leave ended: removed by a member's commit, or sequenced by the gateway as a proposal
/// that the next member to come online commits.
enum Left {
    Removed,
    Proposed,
}

/// Asks to leave and waits until the gateway has sequenced the removal (and briefly for the
/// commit that completes it).
async fn leave(device: &Device, conv: ConversationId) -> Result<Left, String> {
    let me = device.key.device_id();
    let mut node = driver::start(device.options())
        .await
        .map_err(|e| e.to_string())?;
    let result = async {
        await_membership(&mut node, conv).await?;
        node.group(GroupRequest::Change(conv, Intent::Leave))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        esay!("asked the gateway to remove this device; waiting for it to sequence the removal…");
        let deadline = tokio::time::sleep(GROUP_DEADLINE);
        tokio::pin!(deadline);
        let grace = tokio::time::sleep(GROUP_DEADLINE);
        tokio::pin!(grace);
        let mut proposed = false;
        loop {
            tokio::select! {
                _ = &mut deadline, if !proposed => return Err(format!(
                    "the gateway did not sequence this device's removal within {GROUP_DEADLINE:?} (`sund status` says whether it can be reached); the request is kept and sent again at the next start of this device"
                )),
                _ = &mut grace, if proposed => return Ok(Left::Proposed),
                event = node.events.recv() => match event {
                    Some(NodeEvent::RemovedFrom { conversation, .. }) if conversation == conv => return Ok(Left::Removed),
                    Some(NodeEvent::RemovalProposed { conversation, device, .. })
                        if conversation == conv && device == me && !proposed =>
                    {
                        proposed = true;
                        grace.as_mut().reset(tokio::time::Instant::now() + COMMIT_GRACE);
                    }
                    Some(_) => {}
                    None => return Err("the node stopped unexpectedly".into()),
                },
            }
        }
    }
    .await;
    let _ = node.stop().await;
    result
}

/// `sund devices`.
pub async fn devices(data_dir: &Path, json: bool) -> Result<(), String> {
    let device = load(data_dir)?;
    let node = driver::start(device.options())
        .await
        .map_err(|e| e.to_string())?;
    let groups = node.groups().await.map_err(|e| e.to_string())?;
    let _ = node.stop().await;
    let names = device.conversation_names();
    let users = device.user_names_with(&groups);
    if json {
        let report: Vec<GroupReport> = groups
            .iter()
            .map(|g| GroupReport::new(g, &names, &users, device.key.device_id()))
            .collect();
        let text = serde_json::to_string_pretty(&report).expect("a group report encodes");
        say!("{text}");
        return Ok(());
    }
    if groups.is_empty() {
        say!("this device is in no DM or room yet: `sund dm USER` or `sund room create NAME`");
    }
    let me = device.user_id();
    for g in &groups {
        // An unnamed DM is shown as `send` and `follow` take it: `@` and the other user's
        // address, when this device knows it.
        let with = g.members.iter().map(|(_, u)| *u).find(|u| Some(*u) != me);
        let name = names
            .get(&g.conversation)
            .cloned()
            .unwrap_or_else(|| match g.kind {
                GroupKind::Dm => match with.and_then(|u| users.get(&u)) {
                    Some(address) => format!("@{address}"),
                    None => "(unnamed DM)".to_string(),
                },
                GroupKind::Room => "(unnamed room)".to_string(),
                GroupKind::Own => "(your devices: the contact book)".to_string(),
            });
        print_group(&name, g, &users, device.key.device_id());
    }
    Ok(())
}

/// One DM or room in `sund devices --json`.
#[derive(serde::Serialize)]
struct GroupReport {
    conversation_id: String,
    /// The name this device gave it, if any.
    name: Option<String>,
    /// `dm` or `room`.
    kind: String,
    /// The MLS epoch, once the group is joined.
    epoch: Option<u64>,
    /// `in_sync`, `committing`, `waiting_for_welcome` or `removed`.
    state: &'static str,
    /// Membership changes still queued on this device.
    queued: usize,
    members: Vec<MemberReport>,
}

/// One member device in `sund devices --json`.
#[derive(serde::Serialize)]
struct MemberReport {
    device: String,
    user_id: String,
    /// The user's name, when this device knows it.
    user: Option<String>,
    this_device: bool,
}

impl GroupReport {
    fn new(
        g: &GroupSummary,
        names: &BTreeMap<ConversationId, String>,
        users: &BTreeMap<UserId, String>,
        me: DeviceId,
    ) -> GroupReport {
        GroupReport {
            conversation_id: g.conversation.to_string(),
            name: names.get(&g.conversation).cloned(),
            kind: g.kind.to_string(),
            epoch: g.epoch,
            state: match g.status {
                GroupStatus::Synchronized => "in_sync",
                GroupStatus::PendingCommit { .. } => "committing",
                GroupStatus::PendingWelcome => "waiting_for_welcome",
                GroupStatus::Removed { .. } => "removed",
            },
            queued: g.queued,
            members: g
                .members
                .iter()
                .map(|(d, u)| MemberReport {
                    device: d.to_string(),
                    user_id: u.to_string(),
                    user: users.get(u).cloned(),
                    this_device: *d == me,
                })
                .collect(),
        }
    }
}
