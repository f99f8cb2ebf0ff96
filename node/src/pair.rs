//! `sund pair show` and `sund pair accept`: link a new device to a user from one of the user's
//! devices (see `sund_model::trust::pairing`).

use std::path::Path;
use std::time::Duration;

use qrcode::render::unicode::Dense1x2;
use qrcode::QrCode;
use sund_model::node::{ConnectionStatus, NodeEvent};
use sund_model::trust::pairing::PairingCode;
use sund_model::wire::payload::ErrorCode;
use sund_node::device::Device;
use sund_node::driver::{self, GroupRequest};

use crate::REVOKED;

/// How long `pair show` waits for the gateway to confirm the vouch before saying it is offline.
const VOUCH_WAIT: Duration = Duration::from_secs(8);

/// The code as a QR code drawn with half blocks, two modules per character cell, with a quiet
/// zone, for a phone camera to read off a terminal.
pub fn qr_text(code: &PairingCode) -> Result<String, String> {
    let qr = QrCode::new(code.to_text().as_bytes())
        .map_err(|e| format!("cannot draw the pairing code as a QR code: {e}"))?;
    Ok(qr
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

/// On an existing device: vouch for a new one and show the code it takes.
pub async fn show(data_dir: &Path, wait: Duration, qr: bool) -> Result<(), String> {
    let device = Device::load(data_dir).map_err(|e| e.to_string())?;
    let Some(user_name) = device.user.clone() else {
        return Err("this device belongs to no named user, and pairing links devices of one user; set up devices with `sund init --user NAME`".into());
    };
    let mut node = driver::start(device.options())
        .await
        .map_err(|e| e.to_string())?;
    // Only a registered device can vouch: check before a vouch is made and kept.
    let status = node.status().await.map_err(|e| e.to_string())?;
    if status.certificate.is_none() {
        let _ = node.stop().await;
        return Err("this device has not registered with its gateway yet, so it cannot vouch for another; run `sund status` until it is connected, then try again".into());
    }
    let (offer, root) = node.offer_pairing().await.map_err(|e| e.to_string())?;
    let root = root.expect("a registered device has pinned its root");
    let code = PairingCode {
        secret: offer.secret,
        voucher: device.key.public().0[..16]
            .try_into()
            .expect("16 of 32 bytes"),
        root_fingerprint: root.key.0[..16].try_into().expect("16 of 32 bytes"),
        gateway_pin: device.gateway_pin,
        user: user_name.clone(),
        gateway: device.gateway.to_string(),
    };
    // A QR code is for a camera: only on a terminal, not into files or pipes.
    if qr && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        say!("{}", qr_text(&code)?);
    }
    say!("pairing code for a new device of {user_name} (one use, valid for 10 minutes):");
    say!("{}", code.to_text());
    say!("on the new device: sund pair accept --data-dir DIR CODE");
    say!(
        "it will trust this device: {}",
        &device.key.public().to_hex()[..32]
    );

    let vouch_wait = tokio::time::sleep(VOUCH_WAIT);
    tokio::pin!(vouch_wait);
    let linked_wait = tokio::time::sleep(wait);
    tokio::pin!(linked_wait);
    let mut ready = false;
    let result = loop {
        tokio::select! {
            _ = &mut vouch_wait, if !ready => {
                say!("the gateway cannot be reached now: the code starts working once this device reaches it (any `sund` command, or `sund follow`, takes it there)");
                if wait.is_zero() {
                    break Ok(());
                }
                ready = true; // stop saying so; keep waiting for the new device
            }
            _ = &mut linked_wait, if ready => {
                if !wait.is_zero() {
                    say!("no new device registered with the code while waiting; it stays valid until it expires");
                }
                break Ok(());
            }
            event = node.events.recv() => match event {
                Some(NodeEvent::PairingReady { .. }) => {
                    if !wait.is_zero() {
                        say!(
                            "the gateway holds the code: waiting up to {} s for the new device (Ctrl-C stops waiting; the code stays valid until it expires; `--wait 0` only prints it)",
                            wait.as_secs()
                        );
                    }
                    ready = true;
                    if wait.is_zero() {
                        break Ok(());
                    }
                }
                Some(NodeEvent::DeviceLinked { device: linked }) => {
                    say!("device {linked} is now linked to {user_name}");
                    // The contact book travels in the group of the user's devices: made
                    // first (if missing) so that bringing in adds the new device to it too.
                    let book = sund_node::contact_files::book(&device.data_dir);
                    let sharing = !book.records().is_empty();
                    if sharing {
                        if let Ok(Ok(own)) = node.group(GroupRequest::Own).await {
                            let users = device.user_names();
                            let _ = crate::group_commands::wait_until_done(&mut node, own, &users).await;
                        }
                    }
                    crate::group_commands::bring_in(&mut node, &device, linked).await;
                    if sharing {
                        match crate::contact_sync::share_book(&mut node, &device, &book).await {
                            crate::contact_sync::Shared::Sent(_) => say!(
                                "  the contact book ({} name(s), {} verified user(s)) is on its way to the new device",
                                book.names.len(),
                                book.verified.len()
                            ),
                            other => other.say(),
                        }
                    }
                    break Ok(());
                }
                Some(NodeEvent::PairingRefused { reason }) => {
                    break Err(format!("the gateway refused the pairing code: {reason}"));
                }
                Some(NodeEvent::Revoked) => break Err(REVOKED.into()),
                Some(NodeEvent::Refused { message, .. }) => {
                    break Err(format!("the gateway refused this device: {message}"));
                }
                Some(_) => {}
                None => break Err("the node stopped unexpectedly".into()),
            }
        }
    };
    let stopped = node.stop().await.map_err(|e| e.to_string());
    result.and(stopped)
}

/// On a new device: set it up from a code and register with it.
pub async fn accept(data_dir: &Path, text: &str, wait: Duration) -> Result<(), String> {
    let code = PairingCode::from_text(text).map_err(|e| e.to_string())?;
    let device = Device::init_paired(data_dir, &code).map_err(|e| e.to_string())?;
    say!(
        "device {} set up in {} for {}",
        device.key.device_id(),
        data_dir.display(),
        code.user
    );
    say!(
        "trusting the device that showed the code on first use: {}",
        hex(&code.voucher)
    );
    let mut node = driver::start(device.options())
        .await
        .map_err(|e| e.to_string())?;
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    let mut told_unknown = false;
    let result = loop {
        tokio::select! {
            _ = &mut deadline => {
                if told_unknown {
                    say!("the gateway does not know the code yet: this device registers with it at its next connection, which works once the other device has reached the gateway and while the code is valid (10 minutes from when it was shown); `sund status` says when the pairing is confirmed");
                } else {
                    say!("the gateway at {} cannot be reached: the pairing is kept (trust on first use) and is confirmed when this device next connects, if the code is still valid; `sund status` says when", code.gateway);
                }
                break Ok(());
            }
            event = node.events.recv() => match event {
                Some(NodeEvent::Paired { voucher }) => {
                    say!("paired: the gateway confirmed that device {voucher} vouched for this one");
                }
                Some(NodeEvent::Status(ConnectionStatus::Connected)) => {
                    say!("connected to the gateway as a device of {}", code.user);
                    break Ok(());
                }
                Some(NodeEvent::Refused { code: ErrorCode::EnrolmentTokenInvalid, .. }) if !told_unknown => {
                    // The device that showed the code may not have reached the gateway yet:
                    // the node keeps trying.
                    say!("the gateway does not know this code yet (has the other device reached it?); still trying");
                    told_unknown = true;
                }
                Some(NodeEvent::Refused { code: ErrorCode::EnrolmentTokenInvalid, .. }) => {}
                Some(NodeEvent::Refused { message, .. }) => {
                    break Err(format!("the gateway refused the pairing: {message}; show a new code on your other device (`sund pair show`) and run `sund pair accept` again"));
                }
                Some(NodeEvent::Revoked) => break Err(REVOKED.into()),
                Some(_) => {}
                None => break Err("the node stopped unexpectedly".into()),
            }
        }
    };
    let stopped = node.stop().await.map_err(|e| e.to_string());
    if result.is_err() {
        // A refused pairing leaves no dead device behind: the directory can take the next code.
        forget_device(data_dir);
    }
    result.and(stopped)
}

/// Removes what `Device::init_paired` and the node's first start wrote into `data_dir`, and the
/// directory itself if nothing else is in it.
fn forget_device(data_dir: &Path) {
    for file in ["device.key", "node.toml", "gateway-cert.der", "node.redb"] {
        let _ = std::fs::remove_file(data_dir.join(file));
    }
    // Empty on a device that never held a file chunk.
    let _ = std::fs::remove_dir(data_dir.join("values"));
    let _ = std::fs::remove_dir(data_dir);
}

use sund_model::hex::encode as hex;
