//! MLS (RFC 9420) through openmls, made deterministic under simulation.
//!
//! openmls is pure computation, but it reaches for the operating system in several places. What
//! this module does about each (measured on openmls 0.9.2):
//!
//! 1. Its stock crypto provider seeds a generator from the OS: [`provider::EntropyRand`] draws
//!    from the injected [`crate::env::Entropy`] instead.
//! 2. HPKE seal draws its ephemeral key from OS entropy inside hpke-rs:
//!    [`crypto::SundCrypto`] runs the DHKEM encapsulation itself (checked against RFC 9180's
//!    test vector) with key material from the entropy.
//! 3. Path encryption runs on rayon threads, so seals arrive in thread order: under simulation
//!    each ephemeral key is derived from a per-device secret and the seal's own inputs, not from
//!    a shared stream ([`provider::Randomness`]).
//! 4. `SignatureKeyPair::new` uses the OS generator: [`provider::MlsProvider::new_signer`] builds
//!    the key from the entropy.
//! 5. `Lifetime::new` reads the wall clock: [`lifetime`] computes lifetimes from the model's
//!    clock, or makes them unbounded under simulation, because openmls validates lifetimes
//!    against the wall clock and a simulated clock would otherwise have to track real time.
//! 6. `ProposalQueue::filter_proposals` iterates a std hash map, so a commit holding two or more
//!    member-specific proposals (removes, updates) is ordered by the process's hash seed. Sund's
//!    commit policy is that a commit carries at most one member-specific proposal; the state
//!    machines enforce it.
//! 7. Stored state contains wall-clock times (past epoch secrets): stored bytes stay out of the
//!    simulation's trace hash, which covers wire bytes only.
//!
//! All of openmls's storage writes for one operation are buffered by [`storage::MlsStorage`] and
//! leave in one [`crate::env::WriteBatch`].

pub mod commit_authority;
pub mod crypto;
pub mod device;
pub mod device_groups;
pub mod group_ops;
pub mod key_packages;
pub mod provider;
pub mod storage;
pub mod verified;

use std::time::Duration;

use openmls::prelude::{
    BasicCredential, Capabilities, Extension, ExtensionType, Extensions, ExternalSender, Lifetime,
    MlsGroupCreateConfig, MlsGroupJoinConfig, SenderRatchetConfiguration,
};

use crate::time::Instant;

pub use crypto::CIPHERSUITE;
pub use provider::{MlsProvider, Randomness};
pub use storage::{MlsStorage, MLS_TABLE};

/// How long KeyPackages and leaf nodes are valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifetimePolicy {
    /// From an hour before `now` (clock skew) for `validity`; `now` is the model's clock in
    /// microseconds since the Unix epoch (production).
    FromClock {
        /// How long after `now` the lifetime ends.
        validity: Duration,
    },
    /// Valid at every time (simulation: openmls checks lifetimes against the wall clock, which a
    /// reproducible run cannot follow).
    Unbounded,
}

impl Default for LifetimePolicy {
    fn default() -> Self {
        // openmls's own default: 12 weeks.
        LifetimePolicy::FromClock {
            validity: Duration::from_secs(12 * 7 * 24 * 3600),
        }
    }
}

/// Skew allowed before `now` when a lifetime starts.
pub const LIFETIME_MARGIN: Duration = Duration::from_secs(3600);

/// The lifetime of a KeyPackage or leaf node created at `now` under `policy`.
pub fn lifetime(policy: LifetimePolicy, now: Instant) -> Lifetime {
    match policy {
        LifetimePolicy::Unbounded => Lifetime::init(0, u64::MAX),
        LifetimePolicy::FromClock { validity } => {
            let now_s = now.0 / 1_000_000;
            Lifetime::init(
                now_s.saturating_sub(LIFETIME_MARGIN.as_secs()),
                now_s.saturating_add(validity.as_secs()),
            )
        }
    }
}

/// What every Sund leaf node declares it supports: Sund's ciphersuite and the last-resort
/// KeyPackage extension (openmls refuses a package carrying an extension its leaf does not list).
pub fn capabilities() -> Capabilities {
    Capabilities::new(
        None,
        Some(&[CIPHERSUITE]),
        Some(&[ExtensionType::LastResort]),
        None,
        None,
    )
}

/// How many past epochs' secrets a member keeps: none. The gateway sequences an application
/// message only in the epoch it was made in (see `authority`), and members process the log in
/// seq order, so a member is always in the epoch of the message it reads. Keeping past epochs
/// would only cost: openmls stores all of them in one record, rewritten on every message.
pub const MAX_PAST_EPOCHS: usize = 0;
/// How far out of order one sender's messages may arrive (a node resends its outbox in id
/// order, not in the order it encrypted the messages).
pub const OUT_OF_ORDER_TOLERANCE: u32 = 1024;
/// The out-of-order tolerance of a member that skips most messages by design (decryption
/// sampling in simulated large rooms). openmls keeps the key of every skipped generation, up to
/// the tolerance, in the secret tree, and rewrites the whole tree on every decrypted message: a
/// sampling member of a 1,000-member room would end up storing some 360 keys per sender. The
/// small window still covers a sender's outbox resent out of encryption order.
pub const SAMPLED_OUT_OF_ORDER_TOLERANCE: u32 = 16;
/// How far ahead in one sender's chain a message may be.
pub const MAXIMUM_FORWARD_DISTANCE: u32 = 10_000;

/// The sender ratchet limits of a member: [`OUT_OF_ORDER_TOLERANCE`], or
/// [`SAMPLED_OUT_OF_ORDER_TOLERANCE`] for a member that samples what it decrypts.
pub fn sender_ratchet(sampling: bool) -> SenderRatchetConfiguration {
    let tolerance = if sampling {
        SAMPLED_OUT_OF_ORDER_TOLERANCE
    } else {
        OUT_OF_ORDER_TOLERANCE
    };
    SenderRatchetConfiguration::new(tolerance, MAXIMUM_FORWARD_DISTANCE)
}

/// How Sund creates every group: its ciphersuite and capabilities, the creator's leaf lifetime
/// under `policy`, the ratchet tree inside Welcomes (joiners need no separate tree fetch), and
/// the member-side limits above.
pub fn group_config(policy: LifetimePolicy, now: Instant) -> MlsGroupCreateConfig {
    group_config_with_external_sender(policy, now, None, sender_ratchet(false))
}

/// [`group_config`] naming the gateway's signature key as the group's external sender, so that
/// the gateway can propose removals (RFC 9420 §12.1.8.1).
pub fn group_config_with_external_sender(
    policy: LifetimePolicy,
    now: Instant,
    gateway_key: Option<&[u8]>,
    ratchet: SenderRatchetConfiguration,
) -> MlsGroupCreateConfig {
    let mut builder = MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .capabilities(capabilities())
        .lifetime(lifetime(policy, now))
        .use_ratchet_tree_extension(true)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(ratchet);
    if let Some(key) = gateway_key {
        let sender = ExternalSender::new(
            key.to_vec().into(),
            BasicCredential::new(GATEWAY_CREDENTIAL.to_vec()).into(),
        );
        let extensions = Extensions::single(Extension::ExternalSenders(vec![sender]))
            .expect("external senders belong in a group context");
        builder = builder.with_group_context_extensions(extensions);
    }
    builder.build()
}

/// The identity in the gateway's external-sender credential.
pub const GATEWAY_CREDENTIAL: &[u8] = b"sund-gateway";

/// How a Sund device joins a group from a Welcome (the tree comes in the Welcome), with the
/// same member-side limits as [`group_config`] (`ratchet`: see [`sender_ratchet`]).
pub fn join_config(ratchet: SenderRatchetConfiguration) -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(ratchet)
        .build()
}
