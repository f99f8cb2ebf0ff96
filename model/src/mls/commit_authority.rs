//! Commit discipline at a conversation's authority (RFC 9750 §5.2): the first commit for an epoch
//! wins, later ones are refused with `stale_epoch`.
//!
//! The gateway never decrypts. It reads what MLS leaves in the clear in both framings (RFC 9420
//! §6: `PublicMessage` and `PrivateMessage` both carry group id, epoch and content type
//! unencrypted) and orders handshake messages by epoch:
//!
//! - a commit for the current epoch is accepted and advances the epoch;
//! - a commit or proposal for an older epoch is refused as stale: the sender drops it, processes
//!   the winner, and retries its change in the new epoch;
//! - a commit or proposal for a future epoch is refused as well (no member can be ahead of the
//!   authority, which saw every commit);
//! - an application message for an older epoch is refused as stale too: the gateway accepts
//!   application messages for the current epoch only, so every member of the group at the
//!   message's seq (a member added by the commit just before included) can decrypt it; the
//!   sender encrypts it again in the new epoch. One for a future epoch is refused.
//!
//! This module is the decision alone; the gateway applies it to conversations that are MLS
//! groups, after deduplication (a retried commit that was accepted gets its original seq, never
//! `stale_epoch`).

use openmls::framing::{ContentType, MlsMessageIn, ProtocolMessage};
use openmls::prelude::tls_codec::Deserialize as _;

/// What the authority reads from a message's public framing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Framing {
    /// The MLS group id.
    pub group_id: Vec<u8>,
    /// The epoch the message was made in.
    pub epoch: u64,
    /// Application, proposal or commit.
    pub kind: Kind,
}

/// The content type of an MLS message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Encrypted application data.
    Application,
    /// A proposal (add, remove, update, ...).
    Proposal,
    /// A commit, which moves the group to the next epoch.
    Commit,
}

/// Why a body could not be read as an MLS protocol message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not an MLS protocol message: {0}")]
pub struct NotMls(String);

/// Reads group id, epoch and content type from a TLS-encoded `MLSMessage` carrying a
/// `PublicMessage` or a `PrivateMessage`.
pub fn read_framing(body: &[u8]) -> Result<Framing, NotMls> {
    read_message(body).map(|(framing, _)| framing)
}

/// Like [`read_framing`], and also returns the authenticated data of a `PrivateMessage` (Sund's
/// group-operation declaration on commits; empty for a `PublicMessage`, whose authenticated data
/// openmls does not expose before processing).
pub fn read_message(body: &[u8]) -> Result<(Framing, Vec<u8>), NotMls> {
    let message = MlsMessageIn::tls_deserialize_exact(body).map_err(|e| NotMls(e.to_string()))?;
    let protocol = message
        .try_into_protocol_message()
        .map_err(|e| NotMls(e.to_string()))?;
    let aad = match &protocol {
        ProtocolMessage::PrivateMessage(private) => private.aad().to_vec(),
        ProtocolMessage::PublicMessage(_) => Vec::new(),
    };
    let kind = match protocol.content_type() {
        ContentType::Application => Kind::Application,
        ContentType::Proposal => Kind::Proposal,
        ContentType::Commit => Kind::Commit,
    };
    let framing = Framing {
        group_id: protocol.group_id().as_slice().to_vec(),
        epoch: protocol.epoch().as_u64(),
        kind,
    };
    Ok((framing, aad))
}

/// The authority's answer to one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Sequence it; for a commit the epoch advances.
    Accept,
    /// Refuse with `stale_epoch`: the group is at `current`.
    Stale {
        /// The epoch the authority is in.
        current: u64,
    },
    /// Refuse: made in an epoch the authority has not reached.
    Future {
        /// The epoch the authority is in.
        current: u64,
    },
}

/// The epoch an authority holds for one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochAuthority {
    epoch: u64,
}

impl EpochAuthority {
    /// An authority for a group at `epoch` (0 for a group whose creation commit comes next; 1
    /// once its creator's first commit is in).
    pub fn new(epoch: u64) -> EpochAuthority {
        EpochAuthority { epoch }
    }

    /// The epoch the next commit must be made in.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Decides on one message and, for an accepted commit, advances the epoch.
    pub fn admit(&mut self, epoch: u64, kind: Kind) -> Admission {
        let current = self.epoch;
        match kind {
            Kind::Commit | Kind::Proposal if epoch < current => Admission::Stale { current },
            Kind::Commit | Kind::Proposal if epoch > current => Admission::Future { current },
            Kind::Commit => {
                self.epoch += 1;
                Admission::Accept
            }
            Kind::Proposal => Admission::Accept,
            Kind::Application if epoch > current => Admission::Future { current },
            Kind::Application if epoch < current => Admission::Stale { current },
            Kind::Application => Admission::Accept,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::Entropy;
    use crate::ids::DeviceId;
    use crate::mls::key_packages::{credential_with_key, generate};
    use crate::mls::{
        group_config, join_config, sender_ratchet, LifetimePolicy, MlsProvider, MlsStorage,
        Randomness,
    };
    use crate::time::Instant;
    use openmls::prelude::*;
    use openmls_basic_credential::SignatureKeyPair;

    struct Counter(u64);
    impl Entropy for Counter {
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for b in dest {
                self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1);
                *b = (self.0 >> 56) as u8;
            }
        }
    }

    struct Member {
        provider: MlsProvider,
        signer: SignatureKeyPair,
        device: DeviceId,
    }

    fn member(n: u64) -> Member {
        let provider = MlsProvider::new(
            Box::new(Counter(n)),
            Randomness::Simulation,
            MlsStorage::new(),
        );
        let signer = provider.new_signer().unwrap();
        Member {
            provider,
            signer,
            device: DeviceId(u128::from(n)),
        }
    }

    fn key_package(m: &Member) -> KeyPackage {
        let (packages, _) = generate(
            &m.provider,
            &m.signer,
            &m.device.to_bytes(),
            LifetimePolicy::Unbounded,
            Instant(0),
            1,
            false,
        )
        .unwrap();
        KeyPackageIn::tls_deserialize_exact(&packages[0])
            .unwrap()
            .validate(m.provider.crypto(), ProtocolVersion::Mls10)
            .unwrap()
    }

    /// One real commit (a lone member's update), made once.
    fn sample_commit() -> &'static [u8] {
        static COMMIT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        COMMIT.get_or_init(|| {
            let alice = member(9);
            let config = group_config(LifetimePolicy::Unbounded, Instant(0));
            let mut a = MlsGroup::new(
                &alice.provider,
                &alice.signer,
                &config,
                credential_with_key(&alice.device.to_bytes(), &alice.signer),
            )
            .unwrap();
            a.self_update(
                &alice.provider,
                &alice.signer,
                LeafNodeParameters::default(),
            )
            .unwrap()
            .into_commit()
            .to_bytes()
            .unwrap()
        })
    }

    #[test]
    fn a_lone_members_commit_is_read_as_a_commit_for_epoch_zero() {
        let framing = read_framing(sample_commit()).unwrap();
        assert_eq!((framing.epoch, framing.kind), (0, Kind::Commit));
    }

    /// Alice creates a group with Bob; both then commit an update in the same epoch.
    #[test]
    fn the_first_commit_for_an_epoch_wins_and_the_second_is_stale() {
        let alice = member(1);
        let bob = member(2);
        let config = group_config(LifetimePolicy::Unbounded, Instant(0));
        let mut a = MlsGroup::new(
            &alice.provider,
            &alice.signer,
            &config,
            credential_with_key(&alice.device.to_bytes(), &alice.signer),
        )
        .unwrap();
        let (add, welcome, _) = a
            .add_members(&alice.provider, &alice.signer, &[key_package(&bob)])
            .unwrap();
        a.merge_pending_commit(&alice.provider).unwrap();
        let add = read_framing(&add.to_bytes().unwrap()).unwrap();
        assert_eq!((add.epoch, add.kind), (0, Kind::Commit));
        let mut authority = EpochAuthority::new(0);
        assert_eq!(authority.admit(add.epoch, add.kind), Admission::Accept);
        assert_eq!(authority.epoch(), 1);

        let MlsMessageBodyIn::Welcome(welcome) =
            MlsMessageIn::tls_deserialize_exact(welcome.to_bytes().unwrap().as_slice())
                .unwrap()
                .extract()
        else {
            panic!("a welcome")
        };
        let mut b = StagedWelcome::new_from_welcome(
            &bob.provider,
            &join_config(sender_ratchet(false)),
            welcome,
            None,
        )
        .unwrap()
        .into_group(&bob.provider)
        .unwrap();

        let from_alice = a
            .self_update(
                &alice.provider,
                &alice.signer,
                LeafNodeParameters::default(),
            )
            .unwrap()
            .into_commit()
            .to_bytes()
            .unwrap();
        let from_bob = b
            .self_update(&bob.provider, &bob.signer, LeafNodeParameters::default())
            .unwrap()
            .into_commit()
            .to_bytes()
            .unwrap();
        let fa = read_framing(&from_alice).unwrap();
        let fb = read_framing(&from_bob).unwrap();
        assert_eq!(fa.group_id, fb.group_id);
        assert_eq!((fa.epoch, fb.epoch), (1, 1));
        assert_eq!(authority.admit(fa.epoch, fa.kind), Admission::Accept);
        assert_eq!(
            authority.admit(fb.epoch, fb.kind),
            Admission::Stale { current: 2 },
            "bob lost the race"
        );

        // An application message from the old epoch is refused as stale too (Bob encrypts it
        // again); Bob's retried commit, made after processing Alice's, is for the new epoch and
        // wins.
        let late = b
            .create_message(
                &bob.provider,
                &bob.signer,
                b"sent before the commit arrived",
            )
            .unwrap()
            .to_bytes()
            .unwrap();
        let late = read_framing(&late).unwrap();
        assert_eq!((late.epoch, late.kind), (1, Kind::Application));
        assert_eq!(
            authority.admit(late.epoch, late.kind),
            Admission::Stale { current: 2 }
        );
        b.clear_pending_commit(bob.provider.storage()).unwrap();
        let message = MlsMessageIn::tls_deserialize_exact(from_alice.as_slice())
            .unwrap()
            .try_into_protocol_message()
            .unwrap();
        let processed = b.process_message(&bob.provider, message).unwrap();
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            panic!("a commit")
        };
        b.merge_staged_commit(&bob.provider, *staged).unwrap();
        let retry = b
            .self_update(&bob.provider, &bob.signer, LeafNodeParameters::default())
            .unwrap()
            .into_commit()
            .to_bytes()
            .unwrap();
        let retry = read_framing(&retry).unwrap();
        assert_eq!(authority.admit(retry.epoch, retry.kind), Admission::Accept);
        assert_eq!(authority.epoch(), 3);
    }

    #[test]
    fn messages_from_the_future_are_refused() {
        let mut authority = EpochAuthority::new(4);
        assert_eq!(
            authority.admit(5, Kind::Commit),
            Admission::Future { current: 4 }
        );
        assert_eq!(
            authority.admit(5, Kind::Application),
            Admission::Future { current: 4 }
        );
        assert_eq!(
            authority.admit(3, Kind::Proposal),
            Admission::Stale { current: 4 }
        );
        assert_eq!(authority.admit(4, Kind::Proposal), Admission::Accept);
        assert_eq!(authority.epoch(), 4, "only commits advance the epoch");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..2048)) {
            let _ = read_framing(&body);
        }

        /// A real commit with one byte changed is read or refused, never a panic.
        #[test]
        fn corrupted_commits_never_panic(at in 0usize..1 << 16, byte in proptest::arbitrary::any::<u8>()) {
            let mut body = sample_commit().to_vec();
            let i = at % body.len();
            body[i] = byte;
            let _ = read_framing(&body);
        }
    }

    #[test]
    fn bodies_that_are_not_mls_are_reported() {
        assert!(read_framing(b"plain text").is_err());
        assert!(read_framing(&[]).is_err());
    }
}
