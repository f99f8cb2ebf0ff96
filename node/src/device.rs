//! A device's data directory: its key, the gateway it talks to, the pinned certificate.
//!
//! ```text
//! DATA_DIR/device.key        32-byte Ed25519 seed, owner-only permissions
//! DATA_DIR/node.toml         gateway = "HOST:PORT", user, enrolment token or pairing code,
//!                            and for a paired device the gateway pin (owner-only)
//! DATA_DIR/gateway-cert.der  the gateway's certificate, pinned (a paired device pins its
//!                            SHA-256 from the pairing code instead)
//! DATA_DIR/node.redb         outbox, cursors, resume token, MLS state, files' records
//! DATA_DIR/values/           the plaintext chunks of files, one file each (owner-only)
//! DATA_DIR/conversations     local names of conversations: `NAME` or `NAME=ID`, one per line
//! DATA_DIR/contacts          user names this device knows, one per line (see `contact_files`)
//! DATA_DIR/verified          users verified by safety number and their device keys then
//! DATA_DIR/blocked           users this user blocked, as the gateway last listed them
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use sund_model::address::{Address, DEFAULT_DOMAIN};
use sund_model::identity::{DeviceKey, DevicePublicKey};
use sund_model::ids::{ConversationId, UserId};
use sund_model::mls::device::DeviceMlsConfig;
use sund_model::trust::pairing::PairingCode;
use sund_model::trust::EnrolmentToken;
use sund_runtime::entropy::OsEntropy;
use sund_runtime::environment::Production;
use sund_runtime::files::{check_private, private_dir, FileError};
use sund_runtime::tls::{certificate_pin, write_private};

/// The conversation names a `conversations` file's text holds, by id: each line is `NAME`
/// (an operator-made conversation, id derived from the name) or `NAME=ID` (32 hex digits).
pub fn conversation_names_in(text: &str) -> BTreeMap<ConversationId, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter_map(|line| match line.split_once('=') {
            Some((name, hex)) => u128::from_str_radix(hex, 16)
                .ok()
                .map(|id| (ConversationId(id), name.to_string())),
            None => Some((ConversationId::from_name(line), line.to_string())),
        })
        .collect()
}

/// A data directory or secret file that is not private.
fn private(e: FileError) -> DeviceError {
    DeviceError::Private(e.to_string())
}

use crate::contact_files;
use crate::driver::NodeOptions;
use sund_model::node::contact_book::ContactRecord;

/// A contact file that could not be written.
fn file_error((path, source): (PathBuf, std::io::Error)) -> DeviceError {
    DeviceError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Why a device directory could not be created or read.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No device was set up here.
    #[error("no device in {0}: run `sund init --data-dir {0} --gateway HOST:PORT --gateway-cert FILE` first")]
    Missing(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The data directory or a secret file in it is accessible to other users.
    #[error("{0}")]
    Private(String),
    /// A file holds something unexpected.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong and what to do.
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// `HOST:PORT` as given to `sund init` (a name is resolved at each start).
    gateway: String,
    /// The user this device belongs to, `name@domain` (its other devices name the same
    /// user; a bare name means the default domain, `localhost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    /// The one-time enrolment token (`sund-gateway admin enrol-token USER`) the device
    /// registers with at its first connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enrolment_token: Option<String>,
    /// For a device set up with `sund pair accept`: the pairing code it registers with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pairing_code: Option<String>,
    /// SHA-256 of the gateway's certificate in hex, for a device set up from a pairing code
    /// (the others pin `gateway-cert.der`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gateway_pin: Option<String>,
}

/// A device set up in a data directory.
pub struct Device {
    /// The directory.
    pub data_dir: PathBuf,
    /// The device key.
    pub key: DeviceKey,
    /// The gateway's address.
    pub gateway: SocketAddr,
    /// SHA-256 of the gateway's certificate, pinned.
    pub gateway_pin: [u8; 32],
    /// The user this device belongs to, if set at `init`.
    pub user: Option<Address>,
    /// The enrolment token given at `init`, if any.
    pub enrolment: Option<EnrolmentToken>,
    /// The pairing code given to `sund pair accept`, if the device was set up with one.
    pub pairing: Option<PairingCode>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DeviceError + '_ {
    move |source| DeviceError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Device {
    /// Sets up a device (a new key unless one exists) pointing at `gateway`, pinning the
    /// certificate read from `cert_file`.
    pub fn init(
        data_dir: &Path,
        gateway: &str,
        cert_file: &Path,
        user: Option<&str>,
        token: Option<&str>,
    ) -> Result<Device, DeviceError> {
        if resolve(gateway).is_none() {
            return Err(DeviceError::Invalid {
                path: "--gateway".into(),
                reason: format!(
                    "`{gateway}` is not HOST:PORT that resolves to an address (for example 192.0.2.7:4433 or gateway.example.org:4433)"
                ),
            });
        }
        let invalid = |reason: String| DeviceError::Invalid {
            path: "--token".into(),
            reason,
        };
        let parsed = match token {
            Some(text) => Some(EnrolmentToken::from_text(text).ok_or_else(|| {
                invalid("not an enrolment token: expected `sund-enrol:...` as `sund-gateway admin enrol-token USER` prints it".into())
            })?),
            None => None,
        };
        // With a token, a bare name is in the token's domain; without one (open enrolment),
        // in the default domain unless given whole.
        let home = parsed
            .as_ref()
            .map_or(DEFAULT_DOMAIN, |t| t.domain.as_str());
        let user = match user {
            Some(text) => Some(
                Address::parse(text, home).map_err(|e| DeviceError::Invalid {
                    path: "--user".into(),
                    reason: e.to_string(),
                })?,
            ),
            None => None,
        };
        if let Some(token) = &parsed {
            let Some(address) = &user else {
                return Err(invalid(
                    "an enrolment token is for a named user: give --user NAME too".into(),
                ));
            };
            if address.domain() != token.domain {
                return Err(invalid(format!(
                    "this token is for a user of {}, not of {}; ask {}'s operator for a token for {address}",
                    token.domain,
                    address.domain(),
                    address.domain()
                )));
            }
            if address.user() != token.user {
                return Err(invalid(format!(
                    "this token is for another user than {address}; ask the operator for a token for `{}`",
                    address.name()
                )));
            }
        }
        let cert = std::fs::read(cert_file).map_err(io(cert_file))?;
        sund_runtime::tls::check_certificate(&cert).map_err(|e| DeviceError::Invalid {
            path: cert_file.display().to_string(),
            reason: format!(
                "{e}: give the gateway's `tls/cert.der` (`sund-gateway cert` prints its path)"
            ),
        })?;
        private_dir(data_dir).map_err(private)?;
        let key_path = data_dir.join("device.key");
        if !key_path.exists() {
            let key = DeviceKey::generate(&mut OsEntropy);
            write_private(&key_path, key.seed()).map_err(io(&key_path))?;
        }
        let cert_path = data_dir.join("gateway-cert.der");
        std::fs::write(&cert_path, &cert).map_err(io(&cert_path))?;
        let settings_path = data_dir.join("node.toml");
        let settings = Settings {
            gateway: gateway.to_string(),
            user: user.map(|u| u.to_string()),
            enrolment_token: token.map(|t| t.trim().to_string()),
            pairing_code: None,
            gateway_pin: None,
        };
        let text = toml::to_string(&settings).expect("settings serialise");
        // The token is a credential until it is used.
        write_private(&settings_path, text.as_bytes()).map_err(io(&settings_path))?;
        Device::load(data_dir)
    }

    /// Sets up a new device from a pairing code another device of the same user showed
    /// (`sund pair show`): a new key, the code's gateway and pin, its user, and the code itself
    /// as the enrolment token. Refuses a directory that already holds a device.
    pub fn init_paired(data_dir: &Path, code: &PairingCode) -> Result<Device, DeviceError> {
        let key_path = data_dir.join("device.key");
        if key_path.exists() {
            return Err(DeviceError::Invalid {
                path: data_dir.display().to_string(),
                reason: "a device is already set up here; pair a new device in a new directory (`--data-dir`)".into(),
            });
        }
        if resolve(&code.gateway).is_none() {
            return Err(DeviceError::Invalid {
                path: "pairing code".into(),
                reason: format!(
                    "its gateway address `{}` does not resolve to an address",
                    code.gateway
                ),
            });
        }
        let gateway = code.gateway.clone();
        private_dir(data_dir).map_err(private)?;
        let key = DeviceKey::generate(&mut OsEntropy);
        write_private(&key_path, key.seed()).map_err(io(&key_path))?;
        let settings = Settings {
            gateway,
            user: Some(code.user.to_string()),
            enrolment_token: None,
            pairing_code: Some(code.to_text()),
            gateway_pin: Some(hex(&code.gateway_pin)),
        };
        let settings_path = data_dir.join("node.toml");
        let text = toml::to_string(&settings).expect("settings serialise");
        write_private(&settings_path, text.as_bytes()).map_err(io(&settings_path))?;
        Device::load(data_dir)
    }

    /// Reads a device set up earlier.
    pub fn load(data_dir: &Path) -> Result<Device, DeviceError> {
        let key_path = data_dir.join("device.key");
        if !key_path.exists() {
            return Err(DeviceError::Missing(data_dir.display().to_string()));
        }
        // The key, the settings (an enrolment token until it is used) and the database (MLS
        // state) are secrets: refused if other users can read them, as ssh refuses its keys.
        check_private(data_dir, 0o700).map_err(private)?;
        for secret in ["device.key", "node.toml"] {
            check_private(&data_dir.join(secret), 0o600).map_err(private)?;
        }
        let seed = std::fs::read(&key_path).map_err(io(&key_path))?;
        let seed: [u8; 32] = seed
            .as_slice()
            .try_into()
            .map_err(|_| DeviceError::Invalid {
                path: key_path.display().to_string(),
                reason: format!(
                    "holds {} bytes, a device key holds 32; restore it from a backup",
                    seed.len()
                ),
            })?;
        let settings_path = data_dir.join("node.toml");
        let text = std::fs::read_to_string(&settings_path).map_err(io(&settings_path))?;
        let settings: Settings = toml::from_str(&text).map_err(|e| DeviceError::Invalid {
            path: settings_path.display().to_string(),
            reason: format!("{e}; rerun `sund init` to rewrite it"),
        })?;
        let invalid = |reason: &str| DeviceError::Invalid {
            path: settings_path.display().to_string(),
            reason: reason.to_string(),
        };
        let gateway_pin = match &settings.gateway_pin {
            Some(text) => unhex32(text).ok_or_else(|| {
                invalid("gateway_pin is not 64 hex digits; pair the device again")
            })?,
            None => {
                let cert_path = data_dir.join("gateway-cert.der");
                let cert = std::fs::read(&cert_path).map_err(io(&cert_path))?;
                certificate_pin(&CertificateDer::from(cert))
            }
        };
        let pairing = match &settings.pairing_code {
            Some(text) => Some(
                PairingCode::from_text(text)
                    .map_err(|e| invalid(&format!("pairing_code: {e}; pair the device again")))?,
            ),
            None => None,
        };
        let enrolment = match &settings.enrolment_token {
            Some(text) => {
                Some(
                    EnrolmentToken::from_text(text).ok_or_else(|| DeviceError::Invalid {
                        path: settings_path.display().to_string(),
                        reason: "enrolment_token is not a token; rerun `sund init --token`".into(),
                    })?,
                )
            }
            None => None,
        };
        Ok(Device {
            enrolment: enrolment.or(pairing.as_ref().map(PairingCode::enrolment)),
            pairing,
            data_dir: data_dir.to_path_buf(),
            key: DeviceKey::from_seed(seed),
            gateway: resolve(&settings.gateway).ok_or_else(|| {
                invalid(&format!(
                    "the gateway address `{}` does not resolve to an address; check the name, or rerun `sund init` with an IP address",
                    settings.gateway
                ))
            })?,
            gateway_pin,
            user: match &settings.user {
                Some(text) => Some(Address::parse(text, DEFAULT_DOMAIN).map_err(|e| {
                    invalid(&format!("user: {e}; rerun `sund init` to rewrite it"))
                })?),
                None => None,
            },
        })
    }

    /// Gives a conversation a local name (DMs and rooms have random or derived ids).
    pub fn name_conversation(&self, name: &str, id: ConversationId) -> Result<(), DeviceError> {
        let mut names = self.conversation_names();
        if names.get(&id).is_some_and(|n| n == name) {
            return Ok(());
        }
        names.retain(|_, n| n != name);
        names.insert(id, name.to_string());
        self.set_conversation_names(&names)
    }

    /// Replaces the conversation names with `names`, at once (a new file renamed over the old,
    /// so a crash leaves one or the other).
    pub fn set_conversation_names(
        &self,
        names: &BTreeMap<ConversationId, String>,
    ) -> Result<(), DeviceError> {
        let path = self.data_dir.join("conversations");
        let new = self.data_dir.join("conversations.new");
        let text: String = names
            .iter()
            .map(|(id, n)| {
                if *id == ConversationId::from_name(n) {
                    format!("{n}\n")
                } else {
                    format!("{n}={:032x}\n", id.0)
                }
            })
            .collect();
        std::fs::write(&new, text).map_err(io(&new))?;
        std::fs::rename(&new, &path).map_err(io(&path))
    }

    /// The conversation names this device knows, by id. Each line of the file is `NAME`
    /// (an operator-made conversation, id derived from the name) or `NAME=ID` (32 hex digits).
    pub fn conversation_names(&self) -> BTreeMap<ConversationId, String> {
        conversation_names_in(
            &std::fs::read_to_string(self.data_dir.join("conversations")).unwrap_or_default(),
        )
    }

    /// The conversation a name stands for: a name this device knows, `@user` for the DM with
    /// that user, a full id (`conv:` and 32 hex digits), or else an operator-made conversation
    /// of that name.
    pub fn resolve_conversation(&self, name: &str) -> ConversationId {
        if let Some((id, _)) = self.conversation_names().iter().find(|(_, n)| *n == name) {
            return *id;
        }
        if let (Some(other), Some(me)) = (name.strip_prefix('@'), &self.user) {
            if let Ok(other) = Address::parse(other, me.domain()) {
                return sund_model::node::dm_id(me.user(), other.user());
            }
        }
        let hex = name.strip_prefix("conv:").unwrap_or("");
        match (hex.len(), u128::from_str_radix(hex, 16)) {
            (32, Ok(id)) => ConversationId(id),
            _ => ConversationId::from_name(name),
        }
    }

    /// Refuses `id` as a place to send messages or files if it is the group of this user's own
    /// devices: that carries the contact book (its messages are records, never shown).
    pub fn check_not_own_group(&self, id: ConversationId) -> Result<(), String> {
        let own = self.user_id().map(sund_model::node::own_id);
        if own == Some(id) {
            return Err(format!(
                "{id} is the group of your own devices: it carries your contact book, not messages; send in a DM or room"
            ));
        }
        Ok(())
    }

    /// The domain a name without one is read in: this device's user's (the default domain,
    /// `localhost`, for a device set up without a user).
    pub fn home_domain(&self) -> &str {
        self.user.as_ref().map_or(DEFAULT_DOMAIN, Address::domain)
    }

    /// This device's user's id, if it was set up for a user.
    pub fn user_id(&self) -> Option<UserId> {
        self.user.as_ref().map(Address::user)
    }

    /// A user as typed on the command line: `name` (a user of this device's domain) or
    /// `name@domain`. The error says what was wrong.
    pub fn address(&self, text: &str) -> Result<Address, String> {
        Address::parse(text, self.home_domain()).map_err(|e| e.to_string())
    }

    /// The users this device knows by name who belong to other domains.
    pub fn users_abroad(&self) -> BTreeSet<UserId> {
        let home = self.home_domain();
        contact_files::addresses(&self.data_dir)
            .into_iter()
            .filter(|(_, address)| address.domain() != home)
            .map(|(user, _)| user)
            .collect()
    }

    /// The request starting a DM with `address`: within this device's domain, or across.
    pub fn dm_request(&self, address: &Address) -> crate::driver::GroupRequest {
        if address.domain() == self.home_domain() {
            crate::driver::GroupRequest::Dm(address.user())
        } else {
            crate::driver::GroupRequest::DmAcross(address.user(), address.domain().to_string())
        }
    }

    /// Remembers a person's address, so that output can show names instead of user ids.
    pub fn remember_user(&self, address: &Address) -> Result<(), DeviceError> {
        let record = ContactRecord::Named {
            user: address.user(),
            name: address.to_string(),
        };
        debug_assert!(record.check().is_ok(), "an address is a valid name record");
        contact_files::apply(&self.data_dir, &[record]).map_err(file_error)?;
        Ok(())
    }

    /// The users this device knows (its own, and everyone it named), by user id, as output
    /// shows them: the bare name for a user of this device's domain, the whole address
    /// otherwise.
    pub fn user_names(&self) -> BTreeMap<UserId, String> {
        let home = self.home_domain().to_string();
        let mut addresses = contact_files::addresses(&self.data_dir);
        if let Some(own) = &self.user {
            addresses.insert(own.user(), own.clone());
        }
        addresses
            .into_iter()
            .map(|(user, address)| (user, address.shown_from(&home)))
            .collect()
    }

    /// [`Device::user_names`], and for users this user never named, the addresses told in
    /// `groups`' rosters (checked against the user id by the model; shown escaped, since
    /// another domain's operator chose the name).
    pub fn user_names_with(
        &self,
        groups: &[crate::driver::GroupSummary],
    ) -> BTreeMap<UserId, String> {
        let home = self.home_domain().to_string();
        let mut names = self.user_names();
        for (user, address) in groups.iter().flat_map(|g| &g.names) {
            names.entry(*user).or_insert_with(|| {
                crate::display::printable(&address.shown_from(&home)).into_owned()
            });
        }
        names
    }

    /// The users this user blocked, as the gateway last listed them to this device (file
    /// `blocked`, one id in 32 hex digits per line): `follow` hides their messages in shared
    /// rooms from its first line on, before the gateway's listing arrives.
    pub fn blocked_users(&self) -> BTreeSet<UserId> {
        let text = std::fs::read_to_string(self.data_dir.join("blocked")).unwrap_or_default();
        text.lines()
            .filter_map(|l| sund_model::hex::decode_array::<16>(l.trim()))
            .map(UserId::from_bytes)
            .collect()
    }

    /// Keeps the gateway's latest list of users this user blocked.
    pub fn set_blocked_users(&self, blocked: &BTreeSet<UserId>) -> Result<(), DeviceError> {
        if *blocked == self.blocked_users() {
            return Ok(());
        }
        let path = self.data_dir.join("blocked");
        let text: String = blocked
            .iter()
            .map(|u| format!("{}\n", sund_model::hex::encode(&u.to_bytes())))
            .collect();
        std::fs::write(&path, text).map_err(io(&path))
    }

    /// The users this user marked verified after comparing safety numbers, with the device
    /// keys they had then (file `verified`, see [`contact_files`]). A user whose devices differ
    /// now is shown as changed, not verified.
    pub fn verified_users(&self) -> BTreeMap<UserId, BTreeSet<DevicePublicKey>> {
        contact_files::verified(&self.data_dir)
    }

    /// Marks `user` verified with these device keys, or (`None`) forgets the mark; the record
    /// that says so, for the user's other devices.
    pub fn set_verified(
        &self,
        user: UserId,
        keys: Option<&BTreeSet<DevicePublicKey>>,
    ) -> Result<ContactRecord, DeviceError> {
        let record = match keys {
            Some(keys) => ContactRecord::Verified {
                user,
                keys: keys.clone(),
            },
            None => ContactRecord::Unverified { user },
        };
        if let Err(e) = record.check() {
            return Err(DeviceError::Invalid {
                path: "verified".into(),
                reason: e.to_string(),
            });
        }
        contact_files::apply(&self.data_dir, std::slice::from_ref(&record)).map_err(file_error)?;
        Ok(record)
    }

    /// The options to start this device's node.
    pub fn options(&self) -> NodeOptions {
        NodeOptions {
            data_dir: self.data_dir.clone(),
            gateway: self.gateway,
            gateway_pin: self.gateway_pin,
            key: self.key.clone(),
            environment: Arc::new(Production),
            user: self.user_id(),
            mls: Some(DeviceMlsConfig::default()),
            enrolment: self.enrolment.clone(),
            pairing_voucher: self.pairing.as_ref().map(|p| p.voucher),
            // What `sund follow` prints is gone if the terminal goes: a message stays on the
            // device until it was printed.
            hold_until_taken: true,
            timers: None,
        }
    }
}

use sund_model::hex::{decode_array as unhex32, encode as hex};

/// `HOST:PORT` to a socket address (an IP address as is, a name through the resolver).
fn resolve(address: &str) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = address.parse() {
        return Some(addr);
    }
    // The client endpoint binds an IPv4 socket: prefer the name's IPv4 addresses.
    let all: Vec<SocketAddr> = address.to_socket_addrs().ok()?.collect();
    all.iter().find(|a| a.is_ipv4()).or(all.first()).copied()
}
