//! A device's data directory: its key, the gateway it talks to, the pinned certificate.
//!
//! ```text
//! DATA_DIR/device.key        32-byte Ed25519 seed, owner-only permissions
//! DATA_DIR/node.toml         gateway = "HOST:PORT"
//! DATA_DIR/gateway-cert.der  the gateway's certificate, pinned
//! DATA_DIR/node.redb         outbox, cursors, resume token
//! DATA_DIR/conversations     names of conversations this device used, one per line
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use sund_gateway::committer::CommitMode;
use sund_gateway::entropy::{EntropySource, OsEntropy};
use sund_gateway::quic::write_private;
use sund_gateway::quic::Socket;
use sund_model::identity::DeviceKey;
use sund_model::ids::{ConversationId, UserId};
use sund_model::mls::device::DeviceMlsConfig;

use crate::driver::NodeOptions;

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
    gateway: SocketAddr,
    /// The user this device belongs to (its other devices name the same user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
}

/// A device set up in a data directory.
pub struct Device {
    /// The directory.
    pub data_dir: PathBuf,
    /// The device key.
    pub key: DeviceKey,
    /// The gateway's address.
    pub gateway: SocketAddr,
    /// The gateway's certificate.
    pub gateway_cert: CertificateDer<'static>,
    /// The user this device belongs to, if set at `init`.
    pub user: Option<String>,
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
        gateway: SocketAddr,
        cert_file: &Path,
        user: Option<&str>,
    ) -> Result<Device, DeviceError> {
        std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
        let cert = std::fs::read(cert_file).map_err(io(cert_file))?;
        let key_path = data_dir.join("device.key");
        if !key_path.exists() {
            let key = DeviceKey::generate(&mut OsEntropy);
            write_private(&key_path, key.seed()).map_err(io(&key_path))?;
        }
        let cert_path = data_dir.join("gateway-cert.der");
        std::fs::write(&cert_path, &cert).map_err(io(&cert_path))?;
        let settings_path = data_dir.join("node.toml");
        let settings = Settings {
            gateway,
            user: user.map(str::to_string),
        };
        let text = toml::to_string(&settings).expect("settings serialise");
        std::fs::write(&settings_path, text).map_err(io(&settings_path))?;
        Device::load(data_dir)
    }

    /// Reads a device set up earlier.
    pub fn load(data_dir: &Path) -> Result<Device, DeviceError> {
        let key_path = data_dir.join("device.key");
        if !key_path.exists() {
            return Err(DeviceError::Missing(data_dir.display().to_string()));
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
        let cert_path = data_dir.join("gateway-cert.der");
        let cert = std::fs::read(&cert_path).map_err(io(&cert_path))?;
        Ok(Device {
            data_dir: data_dir.to_path_buf(),
            key: DeviceKey::from_seed(seed),
            gateway: settings.gateway,
            gateway_cert: CertificateDer::from(cert),
            user: settings.user,
        })
    }

    /// Remembers a conversation name, so that `follow` can print it instead of its id.
    pub fn remember_conversation(&self, name: &str) -> Result<(), DeviceError> {
        let path = self.data_dir.join("conversations");
        let mut names = self.conversation_names();
        if names.values().any(|n| n == name) {
            return Ok(());
        }
        names.insert(ConversationId::from_name(name), name.to_string());
        let text: String = names.values().map(|n| format!("{n}\n")).collect();
        std::fs::write(&path, text).map_err(io(&path))
    }

    /// The conversation names this device knows, by id.
    pub fn conversation_names(&self) -> BTreeMap<ConversationId, String> {
        let text = std::fs::read_to_string(self.data_dir.join("conversations")).unwrap_or_default();
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|n| (ConversationId::from_name(n), n.to_string()))
            .collect()
    }

    /// The options to start this device's node.
    pub fn options(&self) -> NodeOptions {
        NodeOptions {
            data_dir: self.data_dir.clone(),
            gateway: self.gateway,
            gateway_cert: self.gateway_cert.clone(),
            key: self.key.clone(),
            socket: Socket::Bind("0.0.0.0:0".parse().expect("a valid address")),
            entropy: EntropySource::Os,
            clock: None,
            commit: CommitMode::Pipelined,
            user: self.user.as_deref().map(UserId::from_name),
            mls: Some(DeviceMlsConfig::default()),
        }
    }
}
