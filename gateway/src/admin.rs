//! The operator's requests (`sund-gateway admin …`) and what they print, shared by the two ways
//! of carrying them out: on a stopped gateway's database (`Gateway::run_admin`) and on a running
//! gateway through its control socket ([`crate::control`]).
//!
//! A request is checked ([`AdminRequest::command`]) before anything is changed; a request that
//! changes something becomes one [`AdminCommand`] whose answer is released by its commit, and
//! [`AdminRequest::render`] turns that answer and the gateway's state into the text the operator
//! reads. Nothing rendered holds a secret except the enrolment token the operator asked for.

use std::path::Path;

use serde::{Deserialize, Serialize};

use sund_model::gateway::spanning::Role;
use sund_model::gateway::{AdminAnswer, AdminCommand, Gateway};
use sund_model::identity::DevicePublicKey;
use sund_model::ids::{ConversationId, DeviceId};
use sund_model::time::{format_utc, Instant};

/// The longest user or conversation name a request may carry (bytes).
pub const NAME_MAX: usize = 256;
/// The most member devices one `create-conversation` may name.
pub const MEMBERS_MAX: usize = 4096;

/// One operator request, as typed on the command line (and as sent over the control socket).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AdminRequest {
    /// Issue a one-time enrolment token for a new device of `user`.
    EnrolToken {
        /// The user name (or its whole address, `name@domain`, in this gateway's domain).
        user: String,
    },
    /// List registered devices.
    Devices {
        /// One JSON document instead of lines.
        #[serde(default)]
        json: bool,
    },
    /// Revoke a device, named by its id or its key.
    Revoke {
        /// `dev:` and 32 hex digits, or 64 hex digits of key.
        device: String,
    },
    /// Print the CRL.
    Crl {
        /// One JSON document instead of lines.
        #[serde(default)]
        json: bool,
    },
    /// Create a plain conversation or add members to it.
    CreateConversation {
        /// The conversation's name.
        name: String,
        /// Member device keys (64 hex digits each).
        members: Vec<String>,
    },
    /// Share a conversation homed here with member devices of a federation peer's domain.
    ShareConversation {
        /// The conversation's name.
        name: String,
        /// The peer's domain (a `[[federation.peer]]` of this gateway).
        domain: String,
        /// Member device keys of that domain (64 hex digits each).
        members: Vec<String>,
    },
    /// Hand the authority of a conversation homed here over to a federation peer's gateway
    /// that keeps a copy of it.
    Handover {
        /// The conversation's name.
        name: String,
        /// The peer's domain.
        to: String,
    },
    /// List conversations, users, devices and KeyPackages left.
    List {
        /// One JSON document instead of lines.
        #[serde(default)]
        json: bool,
    },
    /// List enrolment tokens and pairing codes (by id; never their secrets).
    Tokens {
        /// One JSON document instead of lines.
        #[serde(default)]
        json: bool,
    },
    /// Make a token expire now, named by its id (`admin tokens`) or its whole text.
    ExpireToken {
        /// 16 hex digits, or `sund-enrol:…`.
        token: String,
    },
    /// Show this gateway's domain and trust-root fingerprint (what a peer's operator pins) and
    /// each federation link: state, entries numbered, acknowledged, queued and taken.
    Federation {
        /// One JSON document instead of lines.
        #[serde(default)]
        json: bool,
    },
    /// Back up the whole gateway into a new file (an absolute path on the gateway's machine).
    Backup {
        /// Where the backup goes.
        file: String,
    },
}

/// What a request prints: `stdout` holds the answer (a token, a listing), `stderr` what a person
/// should read beside it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Printed {
    /// For standard output.
    pub stdout: String,
    /// For standard error.
    pub stderr: String,
}

impl AdminRequest {
    /// Its name on the command line, for audit lines.
    pub fn verb(&self) -> &'static str {
        match self {
            AdminRequest::EnrolToken { .. } => "enrol-token",
            AdminRequest::Devices { .. } => "devices",
            AdminRequest::Revoke { .. } => "revoke",
            AdminRequest::Crl { .. } => "crl",
            AdminRequest::CreateConversation { .. } => "create-conversation",
            AdminRequest::ShareConversation { .. } => "share-conversation",
            AdminRequest::Handover { .. } => "handover",
            AdminRequest::List { .. } => "list",
            AdminRequest::Backup { .. } => "backup",
            AdminRequest::Tokens { .. } => "tokens",
            AdminRequest::ExpireToken { .. } => "expire-token",
            AdminRequest::Federation { .. } => "federation",
        }
    }

    /// What it acts on, for audit lines (a user, device or conversation name; never a secret).
    pub fn subject(&self) -> String {
        match self {
            AdminRequest::EnrolToken { user } => user.clone(),
            AdminRequest::Revoke { device } => device.clone(),
            AdminRequest::CreateConversation { name, members } => {
                format!("{name} ({} members)", members.len())
            }
            AdminRequest::ShareConversation {
                name,
                domain,
                members,
            } => format!("{name} with {domain} ({} members)", members.len()),
            AdminRequest::Handover { name, to } => format!("{name} to {to}"),
            AdminRequest::Backup { file } => file.clone(),
            // The id only: a whole token given here is a credential, kept out of audit lines.
            AdminRequest::ExpireToken { token } => match parse_token_id(token) {
                Ok(id) => crate::admin::hex_id(id),
                Err(_) => "(not a token)".into(),
            },
            AdminRequest::Devices { .. }
            | AdminRequest::Crl { .. }
            | AdminRequest::List { .. }
            | AdminRequest::Tokens { .. }
            | AdminRequest::Federation { .. } => String::new(),
        }
    }

    /// Whether it changes the gateway's state (a fresh data directory is created only for these).
    pub fn writes(&self) -> bool {
        matches!(
            self,
            AdminRequest::EnrolToken { .. }
                | AdminRequest::Revoke { .. }
                | AdminRequest::CreateConversation { .. }
                | AdminRequest::ShareConversation { .. }
                | AdminRequest::Handover { .. }
                | AdminRequest::ExpireToken { .. }
        )
    }

    /// Checks the request and returns the state machine's command for one that changes state
    /// (`None` for a listing). The error says what was wrong and what to type instead.
    pub fn command(&self) -> Result<Option<AdminCommand>, String> {
        Ok(Some(match self {
            AdminRequest::EnrolToken { user } => {
                // The gateway's domain is checked by the gateway itself; the name here.
                sund_model::address::Address::parse(user, "localhost")
                    .map_err(|e| e.to_string())?;
                AdminCommand::IssueEnrolmentToken(user.clone())
            }
            AdminRequest::Revoke { device } => AdminCommand::RevokeDevice(parse_device(device)?),
            AdminRequest::CreateConversation { name, members } => {
                check_name("conversation", name)?;
                if members.is_empty() {
                    return Err("name at least one member device with --member KEY".into());
                }
                if members.len() > MEMBERS_MAX {
                    return Err(format!(
                        "{} members in one request: at most {MEMBERS_MAX}; add the rest with another create-conversation",
                        members.len()
                    ));
                }
                let devices = members
                    .iter()
                    .map(|m| parse_key(m).map(|k| k.device_id()))
                    .collect::<Result<Vec<_>, _>>()?;
                AdminCommand::CreateConversation(ConversationId::from_name(name), devices)
            }
            AdminRequest::ShareConversation {
                name,
                domain,
                members,
            } => {
                check_name("conversation", name)?;
                check_name("domain", domain)?;
                if members.is_empty() {
                    return Err(format!(
                        "name at least one member device of {domain} with --member KEY"
                    ));
                }
                if members.len() > MEMBERS_MAX {
                    return Err(format!(
                        "{} members in one request: at most {MEMBERS_MAX}; share the rest with another share-conversation",
                        members.len()
                    ));
                }
                let members = members
                    .iter()
                    .map(|m| parse_key(m).map(|k| k.device_id()))
                    .collect::<Result<Vec<_>, _>>()?;
                AdminCommand::ShareConversation {
                    conversation: ConversationId::from_name(name),
                    domain: domain.clone(),
                    members,
                }
            }
            AdminRequest::Handover { name, to } => {
                check_name("conversation", name)?;
                check_name("domain", to)?;
                AdminCommand::Handover {
                    conversation: conversation_named(name),
                    to: to.clone(),
                }
            }
            AdminRequest::Backup { file } => {
                if !Path::new(file).is_absolute() {
                    return Err(format!(
                        "the backup's path `{}` is not absolute: the gateway may run elsewhere",
                        file.escape_debug()
                    ));
                }
                return Ok(None);
            }
            AdminRequest::ExpireToken { token } => {
                AdminCommand::ExpireToken(parse_token_id(token)?)
            }
            AdminRequest::Devices { .. }
            | AdminRequest::Crl { .. }
            | AdminRequest::List { .. }
            | AdminRequest::Tokens { .. }
            | AdminRequest::Federation { .. } => return Ok(None),
        }))
    }

    /// What the operator reads: for a request that changed state, `answer` is the answer its
    /// commit released; `gateway` is the gateway's state now.
    pub fn render(
        &self,
        gateway: &Gateway,
        now: Instant,
        answer: Option<AdminAnswer>,
    ) -> Result<Printed, String> {
        let mut out = Printed::default();
        match (self, answer) {
            (AdminRequest::EnrolToken { .. }, Some(AdminAnswer::EnrolmentToken(token, user))) => {
                let root = gateway.trust_root();
                out.stdout = format!("{}\n", token.to_text());
                out.stderr = format!(
                    "one device of {user} can register with this token within 7 days; root {} of {}; its id is {} (`admin expire-token {}` withdraws it)\n",
                    root.fingerprint(),
                    root.domain,
                    hex_id(token.id()),
                    hex_id(token.id()),
                );
            }
            (
                AdminRequest::Revoke { .. },
                Some(AdminAnswer::Revoked {
                    device,
                    crl_version,
                    already,
                }),
            ) => {
                out.stdout = if already {
                    format!("{device} was already revoked (CRL version {crl_version})\n")
                } else {
                    format!("revoked {device}: CRL version {crl_version}\n")
                };
            }
            (AdminRequest::Revoke { .. }, Some(AdminAnswer::UnknownDevice(device))) => {
                return Err(format!(
                    "device {device} has no certificate from this gateway; `sund-gateway admin devices` lists those it has"
                ));
            }
            (
                AdminRequest::CreateConversation { name, .. },
                Some(AdminAnswer::ConversationCreated {
                    conversation,
                    members,
                }),
            ) => {
                out.stdout = format!(
                    "conversation `{name}` ({conversation}) has {members} member devices\n"
                );
            }
            (
                AdminRequest::ShareConversation { name, .. },
                Some(AdminAnswer::ConversationShared {
                    conversation,
                    domain,
                    members,
                }),
            ) => {
                out.stdout = format!(
                    "conversation `{name}` ({conversation}) is shared with {members} member devices of {domain}: this gateway sequences it, {domain}'s gateway serves them\n"
                );
            }
            (AdminRequest::EnrolToken { .. }, Some(AdminAnswer::EnrolmentRefused { why })) => {
                return Err(format!("no token issued: {why}"));
            }
            (
                AdminRequest::ShareConversation { name, .. },
                Some(AdminAnswer::ShareRefused { why, .. }),
            ) => {
                return Err(format!("`{name}` was not shared: {why}"));
            }
            (
                AdminRequest::Handover { name, .. },
                Some(AdminAnswer::HandoverStarted {
                    conversation,
                    to,
                    last_seq,
                }),
            ) => {
                out.stdout = format!(
                    "conversation `{name}` ({conversation}) is frozen at seq {last_seq} and handed over to {to}\n"
                );
                out.stderr = format!(
                    "until {to} takes it over, sends to it are answered `authority_moving` and devices send them again; `admin list` shows `homed at {to}` once it has\n"
                );
            }
            (
                AdminRequest::Handover { name, .. },
                Some(AdminAnswer::HandoverRefused { why, .. }),
            ) => {
                return Err(format!("`{name}` was not handed over: {why}"));
            }
            (AdminRequest::ExpireToken { .. }, Some(AdminAnswer::TokenExpired(token))) => {
                out.stdout = if now >= token.expires || token.used.is_some() {
                    format!(
                        "token {} ({}) was already {}; it stays unusable\n",
                        hex_id(token.id),
                        token.user,
                        if token.used.is_some() {
                            "used"
                        } else {
                            "expired"
                        }
                    )
                } else {
                    format!(
                        "token {} ({}) expired now: no device can register with it\n",
                        hex_id(token.id),
                        token.user
                    )
                };
            }
            (AdminRequest::ExpireToken { .. }, Some(AdminAnswer::UnknownToken(id))) => {
                return Err(format!(
                    "no token has the id {}: `sund-gateway admin tokens` lists those the gateway holds (expired ones are forgotten after a while)",
                    hex_id(id)
                ));
            }
            (AdminRequest::Tokens { json: true }, None) => {
                out.stdout = listing_json(&tokens_json(gateway, now))
            }
            (AdminRequest::Tokens { json: false }, None) => {
                let tokens = gateway.registration_authority().tokens();
                if tokens.is_empty() {
                    out.stderr =
                        "no tokens: `sund-gateway admin enrol-token USER` issues one\n".into();
                }
                for t in tokens {
                    let kind = match t.voucher {
                        Some(voucher) => format!(" pairing code vouched by {voucher}"),
                        None => String::new(),
                    };
                    out.stdout.push_str(&format!(
                        "{} {} {} until {}{kind}\n",
                        hex_id(t.id),
                        t.user,
                        token_state(&t, now),
                        format_utc(t.expires.as_micros() / 1_000_000),
                    ));
                }
            }
            (AdminRequest::Devices { json: true }, None) => {
                out.stdout = listing_json(&devices_json(gateway, now))
            }
            (AdminRequest::Crl { json: true }, None) => {
                let crl = gateway.registration_authority().crl();
                out.stdout = listing_json(&serde_json::json!({
                    "version": crl.version,
                    "issued_at": format_utc(crl.issued_at_s),
                    "domain": crl.domain,
                    "revoked": crl.revoked.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
                }));
            }
            (AdminRequest::List { json: true }, None) => {
                out.stdout = listing_json(&list_json(gateway))
            }
            (AdminRequest::Devices { .. }, None) => out.stdout = devices(gateway, now),
            (AdminRequest::Crl { .. }, None) => {
                let crl = gateway.registration_authority().crl();
                out.stdout = format!(
                    "CRL version {} issued at {} for {}: {} revoked\n",
                    crl.version,
                    format_utc(crl.issued_at_s),
                    crl.domain,
                    crl.revoked.len()
                );
                for device in &crl.revoked {
                    out.stdout.push_str(&format!("{device}\n"));
                }
            }
            (AdminRequest::List { .. }, None) => out.stdout = list(gateway),
            (AdminRequest::Federation { json }, None) => {
                let root = gateway.trust_root();
                let links = gateway
                    .federation()
                    .map(|f| f.links(now))
                    .unwrap_or_default();
                // What this gateway holds of each peer's CRL: version and devices revoked.
                let crl_of = |domain: &str| {
                    let held = gateway.peer_crls().crl(domain);
                    held.map_or((0, 0), |crl| (crl.version, crl.revoked.len()))
                };
                if *json {
                    out.stdout = listing_json(&serde_json::json!({
                        "domain": root.domain,
                        "root_fingerprint": root.fingerprint(),
                        "peers": links.iter().map(|l| serde_json::json!({
                            "domain": l.domain,
                            "root_fingerprint": l.root_fingerprint,
                            "state": l.state,
                            "dials": l.dials,
                            "numbered": l.numbered,
                            "acknowledged": l.acknowledged,
                            "queued": l.queued,
                            "taken": l.taken,
                            "failed_attempts": l.failed_attempts,
                            "silent_s": l.silent_for.as_secs(),
                            "crl_version": crl_of(&l.domain).0,
                            "crl_revoked": crl_of(&l.domain).1,
                            "relays_limited": l.relays_limited,
                            "relays_past_hint": l.relays_past_hint,
                        })).collect::<Vec<_>>(),
                    }));
                } else {
                    out.stdout = format!(
                        "this gateway: domain {}, trust root {}\n",
                        root.domain,
                        root.fingerprint()
                    );
                    for l in &links {
                        let (crl_version, crl_revoked) = crl_of(&l.domain);
                        out.stdout.push_str(&format!(
                            "peer {}  root {}  {}{}  numbered {}, acknowledged {}, queued {}, taken {}, heard {} s ago ({} dials), its CRL version {crl_version} ({crl_revoked} revoked){}\n",
                            l.domain,
                            l.root_fingerprint,
                            l.state,
                            if l.failed_attempts > 0 { format!(" after {} failed dial(s)", l.failed_attempts) } else { String::new() },
                            l.numbered,
                            l.acknowledged,
                            l.queued,
                            l.taken,
                            l.silent_for.as_secs(),
                            if l.dials { "this gateway" } else { "the peer" },
                            match (l.relays_limited, l.relays_past_hint) {
                                (0, _) => String::new(),
                                (limited, 0) => format!(", {limited} of its relays refused by [limits] peer_relays_per_second"),
                                (limited, past) => format!(", {limited} of its relays refused by [limits] peer_relays_per_second ({past} of them sent before the time it was told: its link's reading was paused)"),
                            },
                        ));
                    }
                    out.stderr = if links.is_empty() {
                        "this gateway federates with no one: a peer's operator pins the domain and root above; add `[federation] listen = \"ADDR\"` and a `[[federation.peer]]` (domain, address, root_fingerprint) per peer to this gateway's --config file\n".into()
                    } else {
                        String::new()
                    };
                }
            }
            (request, answer) => {
                return Err(format!(
                    "the gateway gave an unexpected answer to `{}`: {answer:?}",
                    request.verb()
                ))
            }
        }
        Ok(out)
    }
}

/// A token id as printed and typed: 16 hex digits.
pub fn hex_id(id: [u8; 8]) -> String {
    sund_model::hex::encode(&id)
}

/// A token named by its id (16 hex digits) or its whole text (`sund-enrol:…`).
fn parse_token_id(text: &str) -> Result<[u8; 8], String> {
    let text = text.trim();
    if let Some(token) = sund_model::trust::EnrolmentToken::from_text(text) {
        return Ok(token.id());
    }
    let bytes = sund_model::hex::decode(text).filter(|b| b.len() == 8);
    bytes
        .map(|b| b.try_into().expect("8 bytes"))
        .ok_or_else(|| {
            format!(
                "`{}` is not a token id: give the 16 hex digits `sund-gateway admin tokens` prints, or the whole token",
                text.chars().take(40).collect::<String>().escape_debug()
            )
        })
}

/// `unused`, `used by DEVICE`, `used` or `expired`.
fn token_state(t: &sund_model::trust::TokenSummary, now: Instant) -> String {
    match t.used {
        Some(Some(device)) => format!("used by {device}"),
        Some(None) => "used".into(),
        None if now >= t.expires => "expired".into(),
        None => "unused".into(),
    }
}

fn tokens_json(gateway: &Gateway, now: Instant) -> serde_json::Value {
    let tokens: Vec<serde_json::Value> = gateway
        .registration_authority()
        .tokens()
        .iter()
        .map(|t| {
            serde_json::json!({
                "id": hex_id(t.id),
                "user": t.user.to_string(),
                "expires": format_utc(t.expires.as_micros() / 1_000_000),
                "state": match t.used {
                    Some(_) => "used",
                    None if now >= t.expires => "expired",
                    None => "unused",
                },
                "used_by": t.used.flatten().map(|d| d.to_string()),
                "pairing_voucher": t.voucher.map(|v| v.to_string()),
            })
        })
        .collect();
    serde_json::Value::Array(tokens)
}

/// A listing as one JSON document on a line of its own.
fn listing_json(value: &serde_json::Value) -> String {
    format!("{value}\n")
}

/// The state of a device's certificate now.
fn certificate_state(
    gateway: &Gateway,
    cert: &sund_model::trust::DeviceCertificate,
    now: Instant,
) -> &'static str {
    if gateway
        .registration_authority()
        .crl()
        .revoked
        .contains(&cert.device())
    {
        "revoked"
    } else if now.as_micros() / 1_000_000 >= cert.not_after_s {
        "expired"
    } else {
        "valid"
    }
}

fn devices_json(gateway: &Gateway, now: Instant) -> serde_json::Value {
    let devices: Vec<serde_json::Value> = gateway
        .registration_authority()
        .certificates()
        .map(|cert| {
            serde_json::json!({
                "device": cert.device().to_string(),
                "user": cert.user.to_string(),
                "serial": cert.serial,
                "valid_from": format_utc(cert.not_before_s),
                "valid_until": format_utc(cert.not_after_s),
                "state": certificate_state(gateway, cert, now),
            })
        })
        .collect();
    serde_json::Value::Array(devices)
}

fn list_json(gateway: &Gateway) -> serde_json::Value {
    let conversations: Vec<serde_json::Value> = gateway
        .conversations()
        .map(|log| {
            let group = gateway.group(log.id());
            serde_json::json!({
                "conversation": log.id().to_string(),
                // `dm` and `room` are MLS groups; `plain` ones an operator created.
                "kind": group.map_or("plain".to_string(), |g| g.kind().to_string()),
                "epoch": group.map(|g| g.epoch()),
                "head": log.head(),
                "retained": log.retained(),
                "members": log.members().len(),
                // Spanning domains: the domain whose gateway orders it (null: this one), and
                // the other domains' member devices of one homed here.
                "home": gateway.replica_of(log.id()),
                // The domain it is being handed over to, while it is frozen here.
                "moving_to": match gateway.spanning_role(log.id()) {
                    Some(Role::Moving { to, .. }) => Some(to.as_str()),
                    _ => None,
                },
                "shared_with": shared_with(gateway, log.id())
                    .map(|(domain, n, _)| (domain.to_string(), n))
                    .collect::<std::collections::BTreeMap<_, _>>(),
                // Of those, the devices each domain revoked (they send through no gateway).
                "shared_revoked": shared_with(gateway, log.id())
                    .map(|(domain, _, revoked)| (domain.to_string(), revoked))
                    .collect::<std::collections::BTreeMap<_, _>>(),
            })
        })
        .collect();
    let mut devices = Vec::new();
    for user in gateway.users() {
        for device in gateway.devices_of(user) {
            devices.push(serde_json::json!({
                "user": user.to_string(),
                "device": device.to_string(),
                "key_packages": gateway.key_packages_left(device),
            }));
        }
    }
    serde_json::json!({ "conversations": conversations, "devices": devices })
}

fn devices(gateway: &Gateway, now: Instant) -> String {
    let authority = gateway.registration_authority();
    let mut text = String::new();
    for cert in authority.certificates() {
        let state = certificate_state(gateway, cert, now);
        text.push_str(&format!(
            "{} {} serial {} valid from {} until {} {state}\n",
            cert.device(),
            cert.user,
            cert.serial,
            format_utc(cert.not_before_s),
            format_utc(cert.not_after_s)
        ));
    }
    if text.is_empty() {
        text.push_str("no devices registered yet\n");
    }
    text
}

/// The other domains with member devices in `conversation`, homed here, and how many each.
/// Each peer domain a conversation homed here is shared with: its member devices, and how many
/// of them that domain's CRL (as held here) revokes.
fn shared_with(
    gateway: &Gateway,
    conversation: ConversationId,
) -> impl Iterator<Item = (&str, usize, usize)> + '_ {
    let members = match gateway.spanning_role(conversation) {
        Some(Role::Authority(home)) => Some(&home.members),
        _ => None,
    };
    members.into_iter().flat_map(move |m| {
        m.iter().map(move |(domain, devices)| {
            let crls = gateway.peer_crls();
            let revoked = devices.iter().filter(|d| crls.revokes(domain, **d)).count();
            (domain.as_str(), devices.len(), revoked)
        })
    })
}

/// What `admin list` adds after a domain a conversation spans that is no peer of this gateway.
fn not_a_peer(gateway: &Gateway, domain: &str) -> &'static str {
    if gateway.federates_with(domain) {
        ""
    } else {
        " [not a peer in this gateway's config: nothing reaches it]"
    }
}

fn list(gateway: &Gateway) -> String {
    let mut text = String::new();
    for log in gateway.conversations() {
        let mut spans: String = shared_with(gateway, log.id())
            .map(|(domain, n, revoked)| {
                let shared = match revoked {
                    0 => format!(" shared with {domain} ({n} devices)"),
                    r => format!(" shared with {domain} ({n} devices, {r} revoked by {domain})"),
                };
                format!("{shared}{}", not_a_peer(gateway, domain))
            })
            .collect();
        if let Some(home) = gateway.replica_of(log.id()) {
            spans = format!(
                " homed at {home}, which orders it (this gateway keeps a copy for its devices){}",
                not_a_peer(gateway, home)
            );
        }
        if let Some(Role::Moving { to, .. }) = gateway.spanning_role(log.id()) {
            spans = format!(" moving to {to} (frozen until it takes over)");
        }
        text.push_str(&format!(
            "{} head {} retained {} members {}{spans}\n",
            log.id(),
            log.head(),
            log.retained(),
            log.members().len()
        ));
    }
    for user in gateway.users() {
        for device in gateway.devices_of(user) {
            text.push_str(&format!(
                "{user} device {device} key_packages {}\n",
                gateway.key_packages_left(device)
            ));
        }
    }
    text
}

/// The conversation an operator names: its id as printed (`conv:` and 32 hex digits, the
/// id of an MLS room or DM, which has no name here), or an operator-made one's name.
fn conversation_named(name: &str) -> ConversationId {
    let hex = name.strip_prefix("conv:").unwrap_or("");
    let digits = hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    match u128::from_str_radix(hex, 16) {
        Ok(id) if digits => ConversationId(id),
        _ => ConversationId::from_name(name),
    }
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_MAX || name.chars().any(char::is_control) {
        return Err(format!(
            "`{}` is not a {what} name: use 1 to {NAME_MAX} bytes without control characters",
            name.escape_debug()
        ));
    }
    Ok(())
}

fn parse_key(text: &str) -> Result<DevicePublicKey, String> {
    DevicePublicKey::from_hex(text.trim()).ok_or_else(|| {
        format!(
            "`{}` is not a device key: expected 64 hex digits as `sund init` prints them",
            text.escape_debug()
        )
    })
}

/// A device named by its id (`dev:` and 32 hex digits, or the 32 digits) or by its key.
fn parse_device(text: &str) -> Result<DeviceId, String> {
    let text = text.trim();
    if let Some(key) = DevicePublicKey::from_hex(text) {
        return Ok(key.device_id());
    }
    let hex = text.strip_prefix("dev:").unwrap_or(text);
    match (hex.len(), u128::from_str_radix(hex, 16)) {
        (32, Ok(id)) if hex.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(DeviceId(id)),
        _ => Err(format!(
            "`{}` is not a device: give its id as `admin devices` prints it (dev: and 32 hex digits) or its key (64 hex digits)",
            text.escape_debug()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_is_named_by_its_id_or_its_key_and_nothing_else() {
        let id = "dev:0123456789abcdef0123456789abcdef";
        assert_eq!(
            parse_device(id),
            Ok(DeviceId(0x0123456789abcdef0123456789abcdef))
        );
        assert_eq!(parse_device(&id[4..]), parse_device(id));
        // `from_str_radix` takes a leading sign; a device id never has one.
        assert!(parse_device("+123456789abcdef0123456789abcdef").is_err());
        let err = parse_device("laptop").unwrap_err();
        assert!(err.contains("admin devices"), "{err}");
    }

    #[test]
    fn bad_requests_are_refused_before_anything_changes() {
        let refused = |r: AdminRequest| r.command().unwrap_err();
        assert!(refused(AdminRequest::EnrolToken { user: "".into() }).contains("user name"));
        assert!(refused(AdminRequest::EnrolToken {
            user: "a\nb".into()
        })
        .contains("control characters"));
        assert!(refused(AdminRequest::EnrolToken {
            user: "x".repeat(65)
        })
        .contains("1 to 64 bytes"));
        assert!(refused(AdminRequest::EnrolToken {
            user: "alice@B_X".into()
        })
        .contains("not a domain name"));
        assert!(refused(AdminRequest::CreateConversation {
            name: "team".into(),
            members: vec![]
        })
        .contains("--member"));
        assert!(refused(AdminRequest::CreateConversation {
            name: "team".into(),
            members: vec!["zz".into()]
        })
        .contains("64 hex digits"));
        assert_eq!(AdminRequest::List { json: false }.command(), Ok(None));
    }

    /// Runs a request as the offline `admin` does, on a gateway in memory.
    fn ask(
        gateway: &mut Gateway,
        store: &mut sund_model::env::MemStore,
        now: Instant,
        request: AdminRequest,
    ) -> Result<Printed, String> {
        let answer = request
            .command()?
            .map(|command| gateway.run_admin(now, command, store).unwrap().0);
        request.render(gateway, now, answer)
    }

    #[test]
    fn tokens_are_listed_by_id_and_expire_by_id_or_text_never_showing_a_secret() {
        let now = Instant(1_700_000_000_000_000);
        let mut store = sund_model::env::MemStore::default();
        let mut gateway = Gateway::recover(
            sund_model::gateway::GatewayConfig::default(),
            now,
            &store,
            Box::new(sund_model::testing::TestEntropy(1)),
        )
        .unwrap();
        let issued = ask(
            &mut gateway,
            &mut store,
            now,
            AdminRequest::EnrolToken {
                user: "alice".into(),
            },
        )
        .unwrap();
        let text = issued.stdout.trim().to_string();
        let token = sund_model::trust::EnrolmentToken::from_text(&text).unwrap();
        let id = hex_id(token.id());
        assert!(issued.stderr.contains(&id), "{issued:?}");
        assert!(issued.stderr.contains("of alice@localhost"), "{issued:?}");
        assert!(token.is_for("alice"));
        let foreign = ask(
            &mut gateway,
            &mut store,
            now,
            AdminRequest::EnrolToken {
                user: "bob@b.example".into(),
            },
        )
        .unwrap_err();
        assert_eq!(
            foreign,
            "no token issued: bob@b.example is a user of b.example, and this gateway enrols users of localhost: its own gateway's operator issues tokens for it"
        );
        let secret = sund_model::hex::encode(&token.secret);
        let listed = ask(
            &mut gateway,
            &mut store,
            now,
            AdminRequest::Tokens { json: false },
        )
        .unwrap();
        assert!(
            listed.stdout.starts_with(&format!("{id} user:")),
            "{listed:?}"
        );
        assert!(listed.stdout.contains(" unused until "), "{listed:?}");
        assert!(!listed.stdout.contains(&secret), "no secret in a listing");
        // Expired by its whole text; the audit subject is the id, not the credential.
        let request = AdminRequest::ExpireToken {
            token: text.clone(),
        };
        assert_eq!(request.subject(), id);
        let later = Instant(now.0 + 1_000_000);
        let done = ask(&mut gateway, &mut store, later, request.clone()).unwrap();
        assert!(done.stdout.contains("expired now"), "{done:?}");
        let again = ask(
            &mut gateway,
            &mut store,
            later,
            AdminRequest::ExpireToken { token: id.clone() },
        )
        .unwrap();
        assert!(again.stdout.contains("was already expired"), "{again:?}");
        let json = ask(
            &mut gateway,
            &mut store,
            later,
            AdminRequest::Tokens { json: true },
        )
        .unwrap();
        let json: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
        assert_eq!(json[0]["id"], id.as_str());
        assert_eq!(json[0]["state"], "expired");
        assert!(!json.to_string().contains(&secret));
        let unknown = ask(
            &mut gateway,
            &mut store,
            later,
            AdminRequest::ExpireToken {
                token: "00".repeat(8),
            },
        );
        assert!(unknown.unwrap_err().contains("no token has the id"));
        let bad = AdminRequest::ExpireToken {
            token: "laptop".into(),
        }
        .command();
        assert!(bad.unwrap_err().contains("16 hex digits"));
    }
}
