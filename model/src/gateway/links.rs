//! The gateway's federation links (see [`crate::federation`]): its link identity, kept in its
//! store, and the [`Federation`] machine it drives beside its own sub-machines, sharing its
//! commits.
//!
//! The link key is made once, from the gateway's entropy, and certified by the gateway's own
//! trust root; a certificate with less than [`LINK_RENEWAL_WINDOW`] left (or for another root
//! or domain) is replaced at start. Nothing here runs, and nothing is drawn from the entropy,
//! when no peer is configured.

use core::time::Duration;

use crate::env::{Entropy, StoreError, StoreRead, Table, WriteBatch};
use crate::federation::certificate::GatewayCertificate;
use crate::federation::handshake::LinkIdentity;
use crate::federation::Federation;
use crate::identity::DeviceKey;
use crate::mls::device::SeededStream;
use crate::time::Instant;
use crate::trust::RegistrationAuthority;

use super::config::GatewayConfig;

/// The link key's seed and its certificate: key `link`, value seed (32) | certificate.
pub const FEDERATION_IDENTITY_TABLE: Table = Table("federation_identity");
const IDENTITY_KEY: &[u8] = b"link";
/// A link certificate with less than this left is replaced at start.
pub const LINK_RENEWAL_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);

/// Starts the federation links if peers are configured: the identity from `store` (made and
/// written to `writes` if missing or due), then the links' outboxes and cursors.
pub(super) fn start(
    config: &GatewayConfig,
    authority: &RegistrationAuthority,
    store: &dyn StoreRead,
    now: Instant,
    entropy: &mut dyn Entropy,
    writes: &mut WriteBatch,
) -> Result<Option<Federation>, StoreError> {
    if config.federation_peers.is_empty() {
        return Ok(None);
    }
    debug_assert!(
        config
            .federation_peers
            .iter()
            .all(|p| p.domain != config.domain),
        "a gateway does not federate with its own domain"
    );
    let root = authority.root();
    let stored = store
        .get(FEDERATION_IDENTITY_TABLE, IDENTITY_KEY)?
        .and_then(|value| {
            let seed: [u8; 32] = value.get(..32)?.try_into().ok()?;
            let certificate = GatewayCertificate::decode(&value[32..]).ok()?;
            let key = DeviceKey::from_seed(seed);
            let due = now + LINK_RENEWAL_WINDOW;
            let usable = certificate.link_key == key.public()
                && certificate.verify(root, now).is_ok()
                && certificate.verify(root, due).is_ok();
            usable.then_some((key, certificate))
        });
    let (key, certificate) = match stored {
        Some(kept) => kept,
        None => {
            let mut seed = zeroize::Zeroizing::new([0u8; 32]);
            entropy.fill_bytes(seed.as_mut_slice());
            let key = DeviceKey::from_seed(*seed);
            let certificate = authority.issue_gateway_certificate(key.public(), now);
            let mut value = seed.to_vec();
            value.extend_from_slice(&certificate.encode());
            writes.put(FEDERATION_IDENTITY_TABLE, IDENTITY_KEY.to_vec(), value);
            (key, certificate)
        }
    };
    let identity = LinkIdentity {
        domain: config.domain.clone(),
        key,
        certificate,
        root: root.key,
    };
    let federation = Federation::recover(
        identity,
        config.federation_peers.clone(),
        config.federation_timers,
        Box::new(SeededStream::new(entropy)),
        store,
        now,
    )?;
    Ok(Some(federation))
}
