//! openmls's crypto with every random choice taken from the injected entropy.
//!
//! [`SundCrypto`] delegates the deterministic primitives (hashes, HKDF, AEAD, signatures, HPKE
//! open, key derivation) to `openmls_rust_crypto::RustCrypto` and replaces the three methods
//! that draw randomness of their own:
//!
//! - `hpke_seal` and `hpke_setup_sender_and_export`: hpke-rs draws the ephemeral key from an OS
//!   seeded generator and the trait passes no generator in. We run RFC 9180 DHKEM `Encap`
//!   ourselves (DeriveKeyPair on our key material, DH, ExtractAndExpand) and hand the shared
//!   secret to hpke-rs's public key schedule. Receivers keep the stock `hpke_open`, which is
//!   what the interoperability test checks.
//! - `signature_key_gen`: a signing key from the injected entropy.
//!
//! openmls encrypts the path of a commit on a rayon thread pool, so calls to `hpke_seal` arrive
//! in thread order. Under simulation ([`EphemeralKeys::Derived`]) the ephemeral key material is
//! therefore not drawn from a shared stream but derived, independently of call order, as
//! HMAC-SHA256 under a per-device secret (itself drawn from the entropy) over the recipient key,
//! the lengths of info and AAD, and the plaintext. The plaintext of every MLS seal (a path secret, or a
//! Welcome's group secrets) carries a secret that is fresh for every commit, and the recipient
//! keys of one commit differ, so no two seals share those inputs. In production ([`EphemeralKeys::Fresh`]) every seal draws fresh bytes from the
//! injected entropy (the OS), and call order does not matter.

use std::sync::{Arc, Mutex};

use hpke_rs::{Hpke, Mode};
use hpke_rs_crypto::types::{AeadAlgorithm, KdfAlgorithm, KemAlgorithm};
use hpke_rs_crypto::HpkeCrypto;
use hpke_rs_rust_crypto::HpkeRustCrypto;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::types::{
    AeadType, Ciphersuite, CryptoError, ExporterSecret, HashType, HpkeAeadType, HpkeCiphertext,
    HpkeConfig, HpkeKdfType, HpkeKemType, HpkeKeyPair, KemOutput, SignatureScheme,
};
use tls_codec::SecretVLBytes;
use zeroize::Zeroizing;

use super::verified::VerifiedSignatures;
use crate::env::Entropy;

/// The only ciphersuite Sund speaks: X25519, AES-128-GCM, SHA-256, Ed25519 (RFC 9420's mandatory
/// suite). Everything else is refused by [`SundCrypto::supports`].
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// The injected entropy, shared by the crypto and the `OpenMlsRand` of one provider.
pub type SharedEntropy = Arc<Mutex<Box<dyn Entropy + Send>>>;

/// Where HPKE ephemeral keys come from.
pub enum EphemeralKeys {
    /// Fresh bytes from the entropy for every seal (production, where the entropy is the OS).
    Fresh,
    /// Derived from this secret and the seal's inputs, independent of call order (simulation).
    Derived(Zeroizing<[u8; 32]>),
}

/// openmls crypto whose randomness is the injected entropy (see the module docs).
pub struct SundCrypto {
    inner: RustCrypto,
    entropy: SharedEntropy,
    ephemeral: EphemeralKeys,
    /// Signatures verified before, if a memo is configured (see [`VerifiedSignatures`]).
    verified: Option<VerifiedSignatures>,
}

impl SundCrypto {
    /// Crypto drawing from `entropy`, with HPKE ephemeral keys from `ephemeral`.
    pub fn new(entropy: SharedEntropy, ephemeral: EphemeralKeys) -> SundCrypto {
        SundCrypto {
            // Its own generator is seeded from the OS but never used: every method that would
            // draw from it is overridden here.
            inner: RustCrypto::default(),
            entropy,
            ephemeral,
            verified: None,
        }
    }

    /// Answers repeated signature checks from `memo` (see [`VerifiedSignatures`]).
    pub fn set_verified(&mut self, memo: Option<VerifiedSignatures>) {
        self.verified = memo;
    }

    fn fill(&self, dest: &mut [u8]) -> Result<(), CryptoError> {
        let mut entropy = self
            .entropy
            .lock()
            .map_err(|_| CryptoError::InsufficientRandomness)?;
        entropy.fill_bytes(dest);
        Ok(())
    }

    /// Key material for one ephemeral HPKE key: fresh, or derived from the call's inputs.
    fn ephemeral_ikm(&self, parts: &[&[u8]]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        match &self.ephemeral {
            EphemeralKeys::Fresh => {
                let mut ikm = Zeroizing::new(vec![0u8; 32]);
                self.fill(&mut ikm)?;
                Ok(ikm)
            }
            EphemeralKeys::Derived(secret) => {
                let mut message = Vec::new();
                for part in parts {
                    message.extend_from_slice(&(part.len() as u64).to_be_bytes());
                    message.extend_from_slice(part);
                }
                let mac = self
                    .inner
                    .hmac(HashType::Sha2_256, secret.as_slice(), &message)?;
                Ok(Zeroizing::new(mac.as_slice().to_vec()))
            }
        }
    }
}

fn hpke(config: HpkeConfig) -> Result<Hpke<HpkeRustCrypto>, CryptoError> {
    let kem = match config.0 {
        HpkeKemType::DhKem25519 => KemAlgorithm::DhKem25519,
        _ => return Err(CryptoError::UnsupportedCiphersuite),
    };
    let kdf = match config.1 {
        HpkeKdfType::HkdfSha256 => KdfAlgorithm::HkdfSha256,
        _ => return Err(CryptoError::UnsupportedCiphersuite),
    };
    let aead = match config.2 {
        HpkeAeadType::AesGcm128 => AeadAlgorithm::Aes128Gcm,
        HpkeAeadType::ChaCha20Poly1305 => AeadAlgorithm::ChaCha20Poly1305,
        HpkeAeadType::Export => AeadAlgorithm::HpkeExport,
        HpkeAeadType::AesGcm256 => AeadAlgorithm::Aes256Gcm,
    };
    Ok(Hpke::new(Mode::Base, kem, kdf, aead))
}

/// RFC 9180 §4: `LabeledExtract` with the KEM's suite id.
fn labeled_extract(
    suite: &[u8],
    salt: &[u8],
    label: &str,
    ikm: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut labeled = b"HPKE-v1".to_vec();
    labeled.extend_from_slice(suite);
    labeled.extend_from_slice(label.as_bytes());
    labeled.extend_from_slice(ikm);
    HpkeRustCrypto::kdf_extract(KdfAlgorithm::HkdfSha256, salt, &labeled)
        .map_err(|_| CryptoError::CryptoLibraryError)
}

/// RFC 9180 §4: `LabeledExpand` with the KEM's suite id.
fn labeled_expand(
    suite: &[u8],
    prk: &[u8],
    label: &str,
    info: &[u8],
    len: u16,
) -> Result<Vec<u8>, CryptoError> {
    let mut labeled = len.to_be_bytes().to_vec();
    labeled.extend_from_slice(b"HPKE-v1");
    labeled.extend_from_slice(suite);
    labeled.extend_from_slice(label.as_bytes());
    labeled.extend_from_slice(info);
    HpkeRustCrypto::kdf_expand(KdfAlgorithm::HkdfSha256, prk, &labeled, len.into())
        .map_err(|_| CryptoError::CryptoLibraryError)
}

/// RFC 9180 §4.1 DHKEM(X25519, HKDF-SHA256) `Encap` with the ephemeral key derived from `ikm`
/// (`DeriveKeyPair(ikm)`, as `GenerateKeyPair` does with random bytes). Returns
/// `(shared_secret, enc)`.
pub fn encap_x25519(pk_r: &[u8], ikm: &[u8]) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), CryptoError> {
    const KEM: KemAlgorithm = KemAlgorithm::DhKem25519;
    let mut suite = b"KEM".to_vec();
    suite.extend_from_slice(&(KEM as u16).to_be_bytes());
    let hpke = Hpke::<HpkeRustCrypto>::new(
        Mode::Base,
        KEM,
        KdfAlgorithm::HkdfSha256,
        AeadAlgorithm::Aes128Gcm,
    );
    let (sk_e, pk_e) = hpke
        .derive_key_pair(ikm)
        .map_err(|_| CryptoError::CryptoLibraryError)?
        .into_keys();
    let dh = Zeroizing::new(
        HpkeRustCrypto::dh(KEM, pk_r, sk_e.as_slice())
            .map_err(|_| CryptoError::InvalidPublicKey)?,
    );
    let enc = pk_e.as_slice().to_vec();
    let mut kem_context = enc.clone();
    kem_context.extend_from_slice(pk_r);
    let eae_prk = Zeroizing::new(labeled_extract(&suite, &[], "eae_prk", &dh)?);
    let shared = labeled_expand(&suite, &eae_prk, "shared_secret", &kem_context, 32)?;
    Ok((Zeroizing::new(shared), enc))
}

impl OpenMlsCrypto for SundCrypto {
    fn supports(&self, ciphersuite: Ciphersuite) -> Result<(), CryptoError> {
        if ciphersuite == CIPHERSUITE {
            Ok(())
        } else {
            Err(CryptoError::UnsupportedCiphersuite)
        }
    }

    fn supported_ciphersuites(&self) -> Vec<Ciphersuite> {
        vec![CIPHERSUITE]
    }

    fn hkdf_extract(
        &self,
        hash_type: HashType,
        salt: &[u8],
        ikm: &[u8],
    ) -> Result<SecretVLBytes, CryptoError> {
        self.inner.hkdf_extract(hash_type, salt, ikm)
    }

    fn hmac(
        &self,
        hash_type: HashType,
        key: &[u8],
        message: &[u8],
    ) -> Result<SecretVLBytes, CryptoError> {
        self.inner.hmac(hash_type, key, message)
    }

    fn hkdf_expand(
        &self,
        hash_type: HashType,
        prk: &[u8],
        info: &[u8],
        okm_len: usize,
    ) -> Result<SecretVLBytes, CryptoError> {
        self.inner.hkdf_expand(hash_type, prk, info, okm_len)
    }

    fn hash(&self, hash_type: HashType, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match &self.verified {
            // Every simulated member hashes the same tree nodes (see `super::verified`).
            Some(memo) => memo.digest(hash_type as u8, data, || self.inner.hash(hash_type, data)),
            None => self.inner.hash(hash_type, data),
        }
    }

    fn aead_encrypt(
        &self,
        alg: AeadType,
        key: &[u8],
        data: &[u8],
        nonce: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.inner.aead_encrypt(alg, key, data, nonce, aad)
    }

    fn aead_decrypt(
        &self,
        alg: AeadType,
        key: &[u8],
        ct_tag: &[u8],
        nonce: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.inner.aead_decrypt(alg, key, ct_tag, nonce, aad)
    }

    fn signature_key_gen(&self, alg: SignatureScheme) -> Result<(Vec<u8>, Vec<u8>), CryptoError> {
        if alg != SignatureScheme::ED25519 {
            return Err(CryptoError::UnsupportedSignatureScheme);
        }
        let mut seed = Zeroizing::new([0u8; 32]);
        self.fill(seed.as_mut_slice())?;
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        Ok((
            key.to_bytes().to_vec(),
            key.verifying_key().to_bytes().to_vec(),
        ))
    }

    fn verify_signature(
        &self,
        alg: SignatureScheme,
        data: &[u8],
        pk: &[u8],
        signature: &[u8],
    ) -> Result<(), CryptoError> {
        let Some(memo) = &self.verified else {
            return self.inner.verify_signature(alg, data, pk, signature);
        };
        let mut outcome = Ok(());
        let verified = memo.signature(alg as u16, pk, data, signature, || {
            outcome = self.inner.verify_signature(alg, data, pk, signature);
            outcome.is_ok()
        });
        debug_assert!(verified || outcome.is_err());
        outcome
    }

    fn sign(&self, alg: SignatureScheme, data: &[u8], key: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.inner.sign(alg, data, key)
    }

    fn hpke_seal(
        &self,
        config: HpkeConfig,
        pk_r: &[u8],
        info: &[u8],
        aad: &[u8],
        ptxt: &[u8],
    ) -> Result<HpkeCiphertext, CryptoError> {
        let hpke = hpke(config)?;
        // Info and AAD enter only by length: MLS puts its context into the info, and in a
        // Welcome that is the encrypted GroupInfo (with the ratchet tree: hundreds of kilobytes
        // at 1,000 members); hashing it once per recipient cost more than the encryption.
        // Recipient key and plaintext already make the inputs unique: the plaintext carries a
        // secret that is fresh for every commit.
        let info_len = (info.len() as u64).to_be_bytes();
        let aad_len = (aad.len() as u64).to_be_bytes();
        let ikm = self.ephemeral_ikm(&[b"seal", pk_r, &info_len, &aad_len, ptxt])?;
        let (shared, enc) = encap_x25519(pk_r, &ikm)?;
        let mut context = hpke
            .key_schedule(&shared, info, &[], &[])
            .map_err(|_| CryptoError::CryptoLibraryError)?;
        let ciphertext = context
            .seal(aad, ptxt)
            .map_err(|_| CryptoError::CryptoLibraryError)?;
        Ok(HpkeCiphertext {
            kem_output: enc.into(),
            ciphertext: ciphertext.into(),
        })
    }

    fn hpke_open(
        &self,
        config: HpkeConfig,
        input: &HpkeCiphertext,
        sk_r: &[u8],
        info: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.inner.hpke_open(config, input, sk_r, info, aad)
    }

    fn hpke_setup_sender_and_export(
        &self,
        config: HpkeConfig,
        pk_r: &[u8],
        info: &[u8],
        exporter_context: &[u8],
        exporter_length: usize,
    ) -> Result<(KemOutput, ExporterSecret), CryptoError> {
        let hpke = hpke(config)?;
        let length = (exporter_length as u64).to_be_bytes();
        let ikm = self.ephemeral_ikm(&[b"export", pk_r, info, exporter_context, &length])?;
        let (shared, enc) = encap_x25519(pk_r, &ikm)?;
        let context = hpke
            .key_schedule(&shared, info, &[], &[])
            .map_err(|_| CryptoError::CryptoLibraryError)?;
        let exported = context
            .export(exporter_context, exporter_length)
            .map_err(|_| CryptoError::ExporterError)?;
        Ok((enc, exported.into()))
    }

    fn hpke_setup_receiver_and_export(
        &self,
        config: HpkeConfig,
        enc: &[u8],
        sk_r: &[u8],
        info: &[u8],
        exporter_context: &[u8],
        exporter_length: usize,
    ) -> Result<ExporterSecret, CryptoError> {
        self.inner.hpke_setup_receiver_and_export(
            config,
            enc,
            sk_r,
            info,
            exporter_context,
            exporter_length,
        )
    }

    fn derive_hpke_keypair(
        &self,
        config: HpkeConfig,
        ikm: &[u8],
    ) -> Result<HpkeKeyPair, CryptoError> {
        self.inner.derive_hpke_keypair(config, ikm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    // RFC 9180 Appendix A.1.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, Base mode.
    const INFO: &str = "4f6465206f6e2061204772656369616e2055726e";
    const IKM_E: &str = "7268600d403fce431561aef583ee1613527cff655c1343f29812e66706df3234";
    const PK_RM: &str = "3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d";
    const SK_RM: &str = "4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8";
    const ENC: &str = "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431";
    const SHARED_SECRET: &str = "fe0e18c9f024ce43799ae393c7e8fe8fce9d218875e8227b0187c04e7d2ea1fc";
    const PT: &str = "4265617574792069732074727574682c20747275746820626561757479";
    const AAD_0: &str = "436f756e742d30";
    const CT_0: &str = "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a";

    #[test]
    fn encap_matches_the_rfc_9180_test_vector() {
        let (shared, enc) = encap_x25519(&hex(PK_RM), &hex(IKM_E)).unwrap();
        assert_eq!(enc, hex(ENC));
        assert_eq!(shared.as_slice(), hex(SHARED_SECRET).as_slice());
        let hpke = Hpke::<HpkeRustCrypto>::new(
            Mode::Base,
            KemAlgorithm::DhKem25519,
            KdfAlgorithm::HkdfSha256,
            AeadAlgorithm::Aes128Gcm,
        );
        let mut context = hpke.key_schedule(&shared, &hex(INFO), &[], &[]).unwrap();
        assert_eq!(context.seal(&hex(AAD_0), &hex(PT)).unwrap(), hex(CT_0));
        // And the stock receiver opens the vector's ciphertext with the vector's private key.
        let config = HpkeConfig(
            HpkeKemType::DhKem25519,
            HpkeKdfType::HkdfSha256,
            HpkeAeadType::AesGcm128,
        );
        let sealed = HpkeCiphertext {
            kem_output: enc.into(),
            ciphertext: hex(CT_0).into(),
        };
        let opened = RustCrypto::default()
            .hpke_open(config, &sealed, &hex(SK_RM), &hex(INFO), &hex(AAD_0))
            .unwrap();
        assert_eq!(opened, hex(PT));
    }

    struct Counter(u8);
    impl Entropy for Counter {
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for b in dest {
                self.0 = self.0.wrapping_add(1);
                *b = self.0;
            }
        }
    }

    fn crypto(ephemeral: EphemeralKeys) -> SundCrypto {
        SundCrypto::new(Arc::new(Mutex::new(Box::new(Counter(0)))), ephemeral)
    }

    fn config() -> HpkeConfig {
        HpkeConfig(
            HpkeKemType::DhKem25519,
            HpkeKdfType::HkdfSha256,
            HpkeAeadType::AesGcm128,
        )
    }

    #[test]
    fn a_seal_opens_with_the_stock_hpke_open_and_is_deterministic_when_derived() {
        let derived = || crypto(EphemeralKeys::Derived(Zeroizing::new([9; 32])));
        let a = derived();
        let receiver = a.derive_hpke_keypair(config(), &[5; 32]).unwrap();
        let sealed = a
            .hpke_seal(config(), &receiver.public, b"info", b"aad", b"path secret")
            .unwrap();
        let stock = RustCrypto::default();
        let opened = stock
            .hpke_open(config(), &sealed, &receiver.private, b"info", b"aad")
            .unwrap();
        assert_eq!(opened, b"path secret");
        // Same secret and inputs, another provider: the same bytes, whatever the call order.
        let b = derived();
        let other = b
            .hpke_seal(
                config(),
                &receiver.public,
                b"info",
                b"aad",
                b"something else",
            )
            .unwrap();
        let again = b
            .hpke_seal(config(), &receiver.public, b"info", b"aad", b"path secret")
            .unwrap();
        assert_eq!(again, sealed);
        assert_ne!(
            other.kem_output, sealed.kem_output,
            "other inputs, other ephemeral key"
        );
    }

    #[test]
    fn fresh_ephemeral_keys_differ_on_every_seal() {
        let c = crypto(EphemeralKeys::Fresh);
        let receiver = c.derive_hpke_keypair(config(), &[5; 32]).unwrap();
        let one = c
            .hpke_seal(config(), &receiver.public, b"i", b"a", b"p")
            .unwrap();
        let two = c
            .hpke_seal(config(), &receiver.public, b"i", b"a", b"p")
            .unwrap();
        assert_ne!(one.kem_output, two.kem_output);
    }

    #[test]
    fn exported_secrets_agree_between_sender_and_stock_receiver() {
        let c = crypto(EphemeralKeys::Derived(Zeroizing::new([1; 32])));
        let receiver = c.derive_hpke_keypair(config(), &[7; 32]).unwrap();
        let (enc, sent) = c
            .hpke_setup_sender_and_export(config(), &receiver.public, b"info", b"ctx", 32)
            .unwrap();
        let got = RustCrypto::default()
            .hpke_setup_receiver_and_export(config(), &enc, &receiver.private, b"info", b"ctx", 32)
            .unwrap();
        assert_eq!(&*sent, &*got);
    }

    #[test]
    fn only_the_sund_ciphersuite_is_supported() {
        let c = crypto(EphemeralKeys::Fresh);
        assert!(c.supports(CIPHERSUITE).is_ok());
        assert!(c
            .supports(Ciphersuite::MLS_128_DHKEMP256_AES128GCM_SHA256_P256)
            .is_err());
        assert!(c
            .signature_key_gen(SignatureScheme::ECDSA_SECP256R1_SHA256)
            .is_err());
    }

    #[test]
    fn signature_keys_come_from_the_entropy() {
        let (sk1, pk1) = crypto(EphemeralKeys::Fresh)
            .signature_key_gen(SignatureScheme::ED25519)
            .unwrap();
        let (sk2, pk2) = crypto(EphemeralKeys::Fresh)
            .signature_key_gen(SignatureScheme::ED25519)
            .unwrap();
        assert_eq!((sk1, pk1), (sk2, pk2), "same entropy, same key");
    }
}
