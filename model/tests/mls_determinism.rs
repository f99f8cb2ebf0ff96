//! openmls through Sund's provider: a group's whole life replays bit-for-bit from a seed, its
//! state survives a restart from the store, and the stock openmls on the other side reads it.

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use sha2::{Digest, Sha256};
use sund_model::env::{Entropy, MemStore, Store, WriteBatch};
use sund_model::mls::{
    group_config, join_config, lifetime, sender_ratchet, LifetimePolicy, MlsProvider, MlsStorage,
    Randomness, CIPHERSUITE,
};
use sund_model::time::Instant;

/// A seeded entropy for tests: SHA-256 in counter mode.
struct Seeded {
    seed: [u8; 32],
    counter: u64,
}

impl Seeded {
    fn new(seed: u64, who: &str) -> Box<Seeded> {
        let mut h = Sha256::new();
        h.update(seed.to_be_bytes());
        h.update(who.as_bytes());
        Box::new(Seeded {
            seed: h.finalize().into(),
            counter: 0,
        })
    }
}

impl Entropy for Seeded {
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(32) {
            let mut h = Sha256::new();
            h.update(self.seed);
            h.update(self.counter.to_be_bytes());
            self.counter += 1;
            chunk.copy_from_slice(&h.finalize()[..chunk.len()]);
        }
    }
}

struct Device {
    provider: MlsProvider,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
    store: MemStore,
}

impl Device {
    fn new(seed: u64, name: &str) -> Device {
        let provider = MlsProvider::new(
            Seeded::new(seed, name),
            Randomness::Simulation,
            MlsStorage::new(),
        );
        let signer = provider.new_signer().unwrap();
        signer.store(provider.storage()).unwrap();
        let credential = CredentialWithKey {
            credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
            signature_key: signer.public().into(),
        };
        let mut device = Device {
            provider,
            signer,
            credential,
            store: MemStore::default(),
        };
        device.commit();
        device
    }

    /// Commits this operation's storage writes, as a driver would after each MLS operation.
    fn commit(&mut self) {
        let mut batch = WriteBatch::default();
        self.provider.adopt_pending().commit(&mut batch);
        self.store.commit(batch).unwrap();
    }

    fn key_package(&mut self) -> KeyPackage {
        let bundle = KeyPackage::builder()
            .key_package_lifetime(lifetime(LifetimePolicy::Unbounded, Instant(0)))
            .build(
                CIPHERSUITE,
                &self.provider,
                &self.signer,
                self.credential.clone(),
            )
            .unwrap();
        self.commit();
        bundle.key_package().clone()
    }

    fn join(&mut self, welcome: &[u8]) -> MlsGroup {
        let MlsMessageBodyIn::Welcome(welcome) = MlsMessageIn::tls_deserialize_exact(welcome)
            .unwrap()
            .extract()
        else {
            panic!("not a welcome")
        };
        let group = StagedWelcome::new_from_welcome(
            &self.provider,
            &join_config(sender_ratchet(false)),
            welcome,
            None,
        )
        .unwrap()
        .into_group(&self.provider)
        .unwrap();
        self.commit();
        group
    }

    /// Processes `bytes`; returns the plaintext of an application message, merges a commit.
    fn receive(&mut self, group: &mut MlsGroup, bytes: &[u8]) -> Option<Vec<u8>> {
        let message = MlsMessageIn::tls_deserialize_exact(bytes)
            .unwrap()
            .try_into_protocol_message()
            .unwrap();
        let processed = group.process_message(&self.provider, message).unwrap();
        let out = match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(m) => Some(m.into_bytes()),
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                group.merge_staged_commit(&self.provider, *staged).unwrap();
                None
            }
            other => panic!("unexpected {other:?}"),
        };
        self.commit();
        out
    }
}

/// One group's life: create, add two members, talk, update, remove. Returns a hash of every
/// byte that went over the wire, and the epoch authenticator the survivors agree on.
fn life(seed: u64) -> ([u8; 32], Vec<u8>) {
    let mut wire = Sha256::new();
    let mut alice = Device::new(seed, "alice");
    let mut bob = Device::new(seed, "bob");
    let mut carol = Device::new(seed, "carol");
    let bob_kp = bob.key_package();
    let carol_kp = carol.key_package();
    wire.update(bob_kp.tls_serialize_detached().unwrap());

    let config = group_config(LifetimePolicy::Unbounded, Instant(0));
    let mut a = MlsGroup::new(
        &alice.provider,
        &alice.signer,
        &config,
        alice.credential.clone(),
    )
    .unwrap();
    let (commit, welcome, _) = a
        .add_members(&alice.provider, &alice.signer, &[bob_kp, carol_kp])
        .unwrap();
    a.merge_pending_commit(&alice.provider).unwrap();
    alice.commit();
    let welcome = welcome.to_bytes().unwrap();
    wire.update(commit.to_bytes().unwrap());
    wire.update(&welcome);
    let mut b = bob.join(&welcome);
    let mut c = carol.join(&welcome);

    let hello = a
        .create_message(&alice.provider, &alice.signer, b"hello")
        .unwrap()
        .to_bytes()
        .unwrap();
    alice.commit();
    wire.update(&hello);
    assert_eq!(bob.receive(&mut b, &hello).as_deref(), Some(&b"hello"[..]));
    assert_eq!(
        carol.receive(&mut c, &hello).as_deref(),
        Some(&b"hello"[..])
    );

    // Bob updates his leaf: a path encrypted (in parallel) to both others.
    let update = b
        .self_update(&bob.provider, &bob.signer, LeafNodeParameters::default())
        .unwrap()
        .into_commit()
        .to_bytes()
        .unwrap();
    b.merge_pending_commit(&bob.provider).unwrap();
    bob.commit();
    wire.update(&update);
    alice.receive(&mut a, &update);
    carol.receive(&mut c, &update);

    // Carol removes Alice: one member-specific proposal per commit (Sund's commit policy).
    let alice_leaf = a.own_leaf_index();
    let (remove, _, _) = c
        .remove_members(&carol.provider, &carol.signer, &[alice_leaf])
        .unwrap();
    c.merge_pending_commit(&carol.provider).unwrap();
    carol.commit();
    let remove = remove.to_bytes().unwrap();
    wire.update(&remove);
    bob.receive(&mut b, &remove);
    alice.receive(&mut a, &remove);
    assert!(!a.is_active(), "alice learns she was removed");

    assert_eq!(b.epoch(), c.epoch());
    assert_eq!(
        b.epoch_authenticator().as_slice(),
        c.epoch_authenticator().as_slice()
    );

    // Bob restarts: his state comes back from his store alone.
    let storage = MlsStorage::recover(&bob.store).unwrap();
    let provider = MlsProvider::new(
        Seeded::new(seed ^ 1, "bob again"),
        Randomness::Simulation,
        storage,
    );
    let mut b2 = MlsGroup::load(provider.storage(), b.group_id())
        .unwrap()
        .expect("the group is in the store");
    assert_eq!(b2.epoch(), b.epoch());
    let after = c
        .create_message(&carol.provider, &carol.signer, b"after the restart")
        .unwrap()
        .to_bytes()
        .unwrap();
    carol.commit();
    wire.update(&after);
    let message = MlsMessageIn::tls_deserialize_exact(after.as_slice())
        .unwrap()
        .try_into_protocol_message()
        .unwrap();
    let ProcessedMessageContent::ApplicationMessage(m) = b2
        .process_message(&provider, message)
        .unwrap()
        .into_content()
    else {
        panic!("an application message")
    };
    assert_eq!(m.into_bytes(), b"after the restart");

    (
        wire.finalize().into(),
        b.epoch_authenticator().as_slice().to_vec(),
    )
}

#[test]
fn a_group_life_replays_bit_for_bit_from_its_seed() {
    let (first, auth1) = life(7);
    let (second, auth2) = life(7);
    assert_eq!(first, second, "same seed, same wire bytes");
    assert_eq!(auth1, auth2);
    let (other, _) = life(8);
    assert_ne!(first, other, "another seed, other bytes");
}

#[test]
fn a_welcome_from_sund_is_read_by_stock_openmls() {
    // The joiner uses openmls's own provider (OS randomness, in-memory storage).
    let stock = openmls_rust_crypto::OpenMlsRustCrypto::default();
    let signer = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
    signer.store(stock.storage()).unwrap();
    let credential = CredentialWithKey {
        credential: BasicCredential::new(b"stock".to_vec()).into(),
        signature_key: signer.public().into(),
    };
    let kp = KeyPackage::builder()
        .build(CIPHERSUITE, &stock, &signer, credential)
        .unwrap();
    let alice = Device::new(1, "alice");
    let config = group_config(LifetimePolicy::Unbounded, Instant(0));
    let mut a = MlsGroup::new(
        &alice.provider,
        &alice.signer,
        &config,
        alice.credential.clone(),
    )
    .unwrap();
    let (_, welcome, _) = a
        .add_members(&alice.provider, &alice.signer, &[kp.key_package().clone()])
        .unwrap();
    a.merge_pending_commit(&alice.provider).unwrap();
    let MlsMessageBodyIn::Welcome(welcome) =
        MlsMessageIn::tls_deserialize_exact(welcome.to_bytes().unwrap().as_slice())
            .unwrap()
            .extract()
    else {
        panic!()
    };
    let mut joined =
        StagedWelcome::new_from_welcome(&stock, &join_config(sender_ratchet(false)), welcome, None)
            .unwrap()
            .into_group(&stock)
            .unwrap();
    let bytes = a
        .create_message(&alice.provider, &alice.signer, b"interop")
        .unwrap()
        .to_bytes()
        .unwrap();
    let message = MlsMessageIn::tls_deserialize_exact(bytes.as_slice())
        .unwrap()
        .try_into_protocol_message()
        .unwrap();
    let ProcessedMessageContent::ApplicationMessage(m) = joined
        .process_message(&stock, message)
        .unwrap()
        .into_content()
    else {
        panic!()
    };
    assert_eq!(m.into_bytes(), b"interop");
}

/// A 24-member group: one add commit, then two updates whose paths openmls encrypts on its rayon
/// pool. Returns a hash of every wire byte.
fn crowd(seed: u64) -> [u8; 32] {
    let mut wire = Sha256::new();
    let mut owner = Device::new(seed, "owner");
    let mut members: Vec<Device> = (0..23)
        .map(|i| Device::new(seed, &format!("member-{i}")))
        .collect();
    let packages: Vec<KeyPackage> = members.iter_mut().map(|m| m.key_package()).collect();
    let config = group_config(LifetimePolicy::Unbounded, Instant(0));
    let mut group = MlsGroup::new(
        &owner.provider,
        &owner.signer,
        &config,
        owner.credential.clone(),
    )
    .unwrap();
    let (commit, welcome, _) = group
        .add_members(&owner.provider, &owner.signer, &packages)
        .unwrap();
    group.merge_pending_commit(&owner.provider).unwrap();
    owner.commit();
    wire.update(commit.to_bytes().unwrap());
    let welcome = welcome.to_bytes().unwrap();
    wire.update(&welcome);
    let mut joined: Vec<MlsGroup> = members.iter_mut().map(|m| m.join(&welcome)).collect();
    for round in 0..2 {
        let who = round * 7;
        let update = joined[who]
            .self_update(
                &members[who].provider,
                &members[who].signer,
                LeafNodeParameters::default(),
            )
            .unwrap()
            .into_commit()
            .to_bytes()
            .unwrap();
        joined[who]
            .merge_pending_commit(&members[who].provider)
            .unwrap();
        members[who].commit();
        wire.update(&update);
        owner.receive(&mut group, &update);
        for (i, (m, g)) in members.iter_mut().zip(joined.iter_mut()).enumerate() {
            if i != who {
                m.receive(g, &update);
            }
        }
    }
    let authenticator = group.epoch_authenticator().as_slice().to_vec();
    for g in &joined {
        assert_eq!(g.epoch_authenticator().as_slice(), authenticator.as_slice());
    }
    wire.update(&authenticator);
    wire.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Set in a child process: print the hashes instead of checking them.
const CHILD: &str = "SUND_MLS_DETERMINISM_CHILD";

#[test]
fn the_same_seed_gives_the_same_bytes_in_another_process() {
    let here = format!("{}/{}", hex(&life(11).0), hex(&crowd(11)));
    if std::env::var_os(CHILD).is_some() {
        println!("HASHES={here}");
        return;
    }
    // Another process has another std hash seed and another rayon schedule.
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "the_same_seed_gives_the_same_bytes_in_another_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .expect("running the test binary again");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let there = stdout
        .split("HASHES=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("the child printed no hashes: {stdout}"));
    assert_eq!(here, there);
    assert_eq!(crowd(11), crowd(11));
    assert_ne!(crowd(11), crowd(12));
}
