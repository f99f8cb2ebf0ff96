//! Sund's MLS layer next to bare openmls, in the same run: processing a commit in a
//! 1,000-member group, creating an add commit for 999 members, joining from that Welcome, and
//! encrypting and decrypting a 1 KiB message.
//!
//! "Sund" is openmls with `MlsProvider` (entropy-drawn randomness with order-independent HPKE
//! ephemeral keys, `MlsStorage` with its write buffer), and every operation's writes taken into a
//! `WriteBatch` as a driver does (without the disk). "Bare" is openmls with its own
//! `OpenMlsRustCrypto` provider and in-memory storage.
//!
//! ```sh
//! cargo bench -p sund-benches --bench mls
//! ```

use std::time::{Duration, Instant};

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use sund_model::env::{Entropy, WriteBatch};
use sund_model::mls::{
    capabilities, group_config, join_config, lifetime, sender_ratchet, LifetimePolicy, MlsProvider,
    MlsStorage, Randomness, CIPHERSUITE,
};

const MEMBERS: usize = 1_000;

/// A fast deterministic entropy for the benchmark (xorshift; not for production).
struct Xorshift(u64);
impl Entropy for Xorshift {
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for b in dest {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

/// One kind of provider under test.
trait Flavour {
    type P: OpenMlsProvider;
    fn name() -> &'static str;
    fn provider(seed: u64) -> Self::P;
    fn signer(provider: &Self::P) -> SignatureKeyPair;
    /// What a driver does after each operation (Sund: take the writes into a batch).
    fn after(provider: &Self::P);
}

struct Sund;
impl Flavour for Sund {
    type P = MlsProvider;
    fn name() -> &'static str {
        "sund"
    }
    fn provider(seed: u64) -> MlsProvider {
        MlsProvider::new(
            Box::new(Xorshift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)),
            Randomness::Simulation,
            MlsStorage::new(),
        )
    }
    fn signer(provider: &MlsProvider) -> SignatureKeyPair {
        provider.new_signer().unwrap()
    }
    fn after(provider: &MlsProvider) {
        let mut batch = WriteBatch::default();
        provider.adopt_pending().commit(&mut batch);
        std::hint::black_box(batch);
    }
}

struct Bare;
impl Flavour for Bare {
    type P = OpenMlsRustCrypto;
    fn name() -> &'static str {
        "bare openmls"
    }
    fn provider(_seed: u64) -> OpenMlsRustCrypto {
        OpenMlsRustCrypto::default()
    }
    fn signer(_provider: &OpenMlsRustCrypto) -> SignatureKeyPair {
        SignatureKeyPair::new(SignatureScheme::ED25519).unwrap()
    }
    fn after(_provider: &OpenMlsRustCrypto) {}
}

struct Member<F: Flavour> {
    provider: F::P,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
}

impl<F: Flavour> Member<F> {
    fn new(i: usize) -> Member<F> {
        let provider = F::provider(i as u64 + 1);
        let signer = F::signer(&provider);
        signer.store(provider.storage()).unwrap();
        let credential = CredentialWithKey {
            credential: BasicCredential::new(format!("member-{i}").into_bytes()).into(),
            signature_key: signer.public().into(),
        };
        Member {
            provider,
            signer,
            credential,
        }
    }

    fn key_package(&self) -> KeyPackage {
        KeyPackage::builder()
            .key_package_lifetime(lifetime(
                LifetimePolicy::Unbounded,
                sund_model::time::Instant(0),
            ))
            .leaf_node_capabilities(capabilities())
            .build(
                CIPHERSUITE,
                &self.provider,
                &self.signer,
                self.credential.clone(),
            )
            .unwrap()
            .key_package()
            .clone()
    }
}

fn config() -> MlsGroupCreateConfig {
    group_config(LifetimePolicy::Unbounded, sund_model::time::Instant(0))
}

fn protocol(bytes: &[u8]) -> ProtocolMessage {
    MlsMessageIn::tls_deserialize_exact(bytes)
        .unwrap()
        .try_into_protocol_message()
        .unwrap()
}

fn welcome(bytes: &[u8]) -> Welcome {
    match MlsMessageIn::tls_deserialize_exact(bytes)
        .unwrap()
        .extract()
    {
        MlsMessageBodyIn::Welcome(w) => w,
        _ => panic!("not a welcome"),
    }
}

/// Medians (and the sample counts) of each measured operation for one flavour.
struct Figures {
    add_999: Duration,
    join: Duration,
    commit_create: Duration,
    commit_process: Duration,
    encrypt_1k: Duration,
    decrypt_1k: Duration,
}

impl Figures {
    fn min(self, other: &Figures) -> Figures {
        Figures {
            add_999: self.add_999.min(other.add_999),
            join: self.join.min(other.join),
            commit_create: self.commit_create.min(other.commit_create),
            commit_process: self.commit_process.min(other.commit_process),
            encrypt_1k: self.encrypt_1k.min(other.encrypt_1k),
            decrypt_1k: self.decrypt_1k.min(other.decrypt_1k),
        }
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn run<F: Flavour>(add_rounds: usize, commit_rounds: usize, message_rounds: usize) -> Figures {
    let owner = Member::<F>::new(0);
    let members: Vec<Member<F>> = (1..MEMBERS).map(Member::new).collect();

    // Creating the add commit for 999 members (each round on a fresh group).
    let mut add_samples = Vec::new();
    let mut last = None;
    for _ in 0..add_rounds {
        let packages: Vec<KeyPackage> = members.iter().map(|m| m.key_package()).collect();
        let mut group = MlsGroup::new(
            &owner.provider,
            &owner.signer,
            &config(),
            owner.credential.clone(),
        )
        .unwrap();
        F::after(&owner.provider);
        let started = Instant::now();
        let (_, welcome_out, _) = group
            .add_members(&owner.provider, &owner.signer, &packages)
            .unwrap();
        group.merge_pending_commit(&owner.provider).unwrap();
        F::after(&owner.provider);
        add_samples.push(started.elapsed());
        last = Some((group, welcome_out.to_bytes().unwrap()));
    }
    let (mut group, welcome_bytes) = last.expect("at least one round");
    for m in &members {
        F::after(&m.provider);
    }

    // Joining from that Welcome (members 1 and 2; their key packages of the last round).
    let join = |m: &Member<F>| {
        let started = Instant::now();
        let g = StagedWelcome::new_from_welcome(
            &m.provider,
            &join_config(sender_ratchet(false)),
            welcome(&welcome_bytes),
            None,
        )
        .unwrap()
        .into_group(&m.provider)
        .unwrap();
        F::after(&m.provider);
        (g, started.elapsed())
    };
    let (mut committer, join1) = join(&members[0]);
    let (mut receiver, join2) = join(&members[1]);
    let joins = vec![join1, join2];

    // The committer updates; the receiver (and the owner, to stay in step) processes.
    let mut create = Vec::new();
    let mut process = Vec::new();
    for _ in 0..commit_rounds {
        let started = Instant::now();
        let commit = committer
            .self_update(
                &members[0].provider,
                &members[0].signer,
                LeafNodeParameters::default(),
            )
            .unwrap()
            .into_commit()
            .to_bytes()
            .unwrap();
        committer
            .merge_pending_commit(&members[0].provider)
            .unwrap();
        F::after(&members[0].provider);
        create.push(started.elapsed());

        let started = Instant::now();
        let processed = receiver
            .process_message(&members[1].provider, protocol(&commit))
            .unwrap();
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            panic!("a commit")
        };
        receiver
            .merge_staged_commit(&members[1].provider, *staged)
            .unwrap();
        F::after(&members[1].provider);
        process.push(started.elapsed());

        let processed = group
            .process_message(&owner.provider, protocol(&commit))
            .unwrap();
        if let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() {
            group.merge_staged_commit(&owner.provider, *staged).unwrap();
        }
        F::after(&owner.provider);
    }

    let body = vec![0x42u8; 1024];
    let mut encrypt = Vec::new();
    let mut decrypt = Vec::new();
    for _ in 0..message_rounds {
        let started = Instant::now();
        let message = committer
            .create_message(&members[0].provider, &members[0].signer, &body)
            .unwrap()
            .to_bytes()
            .unwrap();
        F::after(&members[0].provider);
        encrypt.push(started.elapsed());
        let started = Instant::now();
        let processed = receiver
            .process_message(&members[1].provider, protocol(&message))
            .unwrap();
        F::after(&members[1].provider);
        decrypt.push(started.elapsed());
        assert!(matches!(
            processed.into_content(),
            ProcessedMessageContent::ApplicationMessage(_)
        ));
    }
    Figures {
        add_999: median(add_samples),
        join: median(joins),
        commit_create: median(create),
        commit_process: median(process),
        encrypt_1k: median(encrypt),
        decrypt_1k: median(decrypt),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is configurable.
    let (add_rounds, commit_rounds, message_rounds) = (3, 30, 2_000);
    println!("{MEMBERS}-member group; medians; each flavour built and measured in this run");
    // For profiling: SUND_MLS_BENCH=sund (or bare) runs one side alone; =seal times 2,000 HPKE
    // seals of each crypto provider.
    let only = std::env::var("SUND_MLS_BENCH").unwrap_or_default();
    if only == "seal" {
        let sund = Sund::provider(1);
        let bare = OpenMlsRustCrypto::default();
        let receiver = bare
            .crypto()
            .derive_hpke_keypair(CIPHERSUITE.hpke_config(), &[7; 32])
            .unwrap();
        for (name, crypto) in [
            ("bare", bare.crypto() as &dyn std::any::Any),
            ("sund", sund.crypto() as &dyn std::any::Any),
        ] {
            let started = Instant::now();
            for i in 0..2000u32 {
                let ptxt = i.to_be_bytes();
                if let Some(c) = crypto.downcast_ref::<openmls_rust_crypto::RustCrypto>() {
                    c.hpke_seal(
                        CIPHERSUITE.hpke_config(),
                        &receiver.public,
                        b"info",
                        b"aad",
                        &ptxt,
                    )
                    .unwrap();
                } else if let Some(c) = crypto.downcast_ref::<sund_model::mls::crypto::SundCrypto>()
                {
                    c.hpke_seal(
                        CIPHERSUITE.hpke_config(),
                        &receiver.public,
                        b"info",
                        b"aad",
                        &ptxt,
                    )
                    .unwrap();
                }
            }
            println!("{name}: {:?} per seal", started.elapsed() / 2000);
        }
        return;
    }
    if !only.is_empty() {
        let f = if only == "bare" {
            run::<Bare>(1, commit_rounds, message_rounds)
        } else {
            run::<Sund>(1, commit_rounds, message_rounds)
        };
        println!(
            "{only}: add {:?}, process {:?}",
            f.add_999, f.commit_process
        );
        return;
    }
    // Interleaved twice (bare, sund, bare, sund), keeping each operation's better median, so
    // that neither side gains from running first or last.
    let bare1 = run::<Bare>(add_rounds, commit_rounds, message_rounds);
    let sund1 = run::<Sund>(add_rounds, commit_rounds, message_rounds);
    let bare = run::<Bare>(add_rounds, commit_rounds, message_rounds).min(&bare1);
    let sund = run::<Sund>(add_rounds, commit_rounds, message_rounds).min(&sund1);
    let rows = [
        ("add commit for 999 members", bare.add_999, sund.add_999),
        ("join from the Welcome", bare.join, sund.join),
        (
            "create an update commit",
            bare.commit_create,
            sund.commit_create,
        ),
        ("process a commit", bare.commit_process, sund.commit_process),
        ("encrypt 1 KiB", bare.encrypt_1k, sund.encrypt_1k),
        ("decrypt 1 KiB", bare.decrypt_1k, sund.decrypt_1k),
    ];
    println!(
        "{:<30} {:>14} {:>14} {:>9}",
        "operation",
        Bare::name(),
        Sund::name(),
        "overhead"
    );
    for (name, b, s) in rows {
        let overhead = 100.0 * (s.as_secs_f64() / b.as_secs_f64() - 1.0);
        println!("{name:<30} {b:>14.2?} {s:>14.2?} {overhead:>8.1}%");
    }
}
