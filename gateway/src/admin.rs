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

use sund_model::gateway::{AdminAnswer, AdminCommand, Gateway};
use sund_model::identity::DevicePublicKey;
use sund_model::ids::{ConversationId, DeviceId, UserId};
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
        /// The user name.
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
    /// List conversations, users, devices and KeyPackages left.
    List {
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
            AdminRequest::List { .. } => "list",
            AdminRequest::Backup { .. } => "backup",
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
            AdminRequest::Backup { file } => file.clone(),
            AdminRequest::Devices { .. } | AdminRequest::Crl { .. } | AdminRequest::List { .. } => {
                String::new()
            }
        }
    }

    /// Whether it changes the gateway's state (a fresh data directory is created only for these).
    pub fn writes(&self) -> bool {
        matches!(
            self,
            AdminRequest::EnrolToken { .. }
                | AdminRequest::Revoke { .. }
                | AdminRequest::CreateConversation { .. }
        )
    }

    /// Checks the request and returns the state machine's command for one that changes state
    /// (`None` for a listing). The error says what was wrong and what to type instead.
    pub fn command(&self) -> Result<Option<AdminCommand>, String> {
        Ok(Some(match self {
            AdminRequest::EnrolToken { user } => {
                check_name("user", user)?;
                AdminCommand::IssueEnrolmentToken(UserId::from_name(user))
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
            AdminRequest::Backup { file } => {
                if !Path::new(file).is_absolute() {
                    return Err(format!(
                        "the backup's path `{}` is not absolute: the gateway may run elsewhere",
                        file.escape_debug()
                    ));
                }
                return Ok(None);
            }
            AdminRequest::Devices { .. } | AdminRequest::Crl { .. } | AdminRequest::List { .. } => {
                return Ok(None)
            }
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
            (AdminRequest::EnrolToken { user }, Some(AdminAnswer::EnrolmentToken(token))) => {
                let root = gateway.trust_root();
                out.stdout = format!("{}\n", token.to_text());
                out.stderr = format!(
                    "one device of `{user}` can register with this token within 7 days; root {} of {}\n",
                    root.fingerprint(),
                    root.domain
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
            serde_json::json!({
                "conversation": log.id().to_string(),
                "head": log.head(),
                "retained": log.retained(),
                "members": log.members().len(),
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

fn list(gateway: &Gateway) -> String {
    let mut text = String::new();
    for log in gateway.conversations() {
        text.push_str(&format!(
            "{} head {} retained {} members {}\n",
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
            user: "x".repeat(NAME_MAX + 1)
        })
        .contains("1 to 256 bytes"));
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
}
