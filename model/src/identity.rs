//! Device identity: an Ed25519 key pair per device, the device id derived from its public key,
//! and the domain-separated messages a device signs.
//!
//! A gateway trusts a device key through the certificate its registration authority issued for
//! it (`trust`). The session proof binds the signature to the gateway's nonce and the device id,
//! so a recorded proof can never open another session.

use core::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::ids::DeviceId;

/// Domain separator of device ids.
const DEVICE_ID_CONTEXT: &[u8] = b"sund/device-id/v1";
/// Domain separator of session proofs.
const SESSION_PROOF_CONTEXT: &[u8] = b"sund/session-proof/v1";

/// A device's public key (Ed25519, 32 bytes).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevicePublicKey(pub [u8; 32]);

impl DevicePublicKey {
    /// The device id: the first 16 bytes of SHA-256 over a context string and the key.
    pub fn device_id(&self) -> DeviceId {
        let digest = Sha256::new()
            .chain_update(DEVICE_ID_CONTEXT)
            .chain_update(self.0)
            .finalize();
        DeviceId::from_bytes(digest[..16].try_into().expect("16 of 32 bytes"))
    }

    /// True if `signature` is this key's strict Ed25519 signature over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        key.verify_strict(message, &Signature::from_bytes(signature))
            .is_ok()
    }

    /// Lower-case hex, for people and logs.
    pub fn to_hex(&self) -> String {
        crate::hex::encode(&self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Option<DevicePublicKey> {
        crate::hex::decode_array(text.trim()).map(DevicePublicKey)
    }
}

impl fmt::Debug for DevicePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key:{}", &self.to_hex()[..16])
    }
}

/// A device's secret signing key. The secret is wiped from memory when dropped (ed25519-dalek's
/// `zeroize` feature) and never printed.
#[derive(Clone)]
pub struct DeviceKey {
    /// Kept whole, public half included: rebuilding it from the seed for every signature cost a
    /// second base-point multiplication each time, half of what a signature costs.
    signing: SigningKey,
    public: DevicePublicKey,
}

impl DeviceKey {
    /// The key pair for a 32-byte secret seed (from the entropy source, or read from disk).
    pub fn from_seed(seed: [u8; 32]) -> DeviceKey {
        let seed = Zeroizing::new(seed);
        let signing = SigningKey::from_bytes(&seed);
        let public = DevicePublicKey(signing.verifying_key().to_bytes());
        DeviceKey { signing, public }
    }

    /// A new key from an entropy source.
    pub fn generate(entropy: &mut dyn crate::env::Entropy) -> DeviceKey {
        let mut seed = Zeroizing::new([0u8; 32]);
        entropy.fill_bytes(seed.as_mut());
        DeviceKey::from_seed(*seed)
    }

    /// The secret seed, for writing the key file. Handle with care.
    pub fn seed(&self) -> &[u8; 32] {
        self.signing.as_bytes()
    }

    /// The public key.
    pub fn public(&self) -> DevicePublicKey {
        self.public
    }

    /// The device id of this key.
    pub fn device_id(&self) -> DeviceId {
        self.public.device_id()
    }

    /// Signs `message` (Ed25519 signing is deterministic: no randomness needed).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// The bytes a device signs to prove it holds its key for one session: a context string, the
/// gateway's nonce and the device id.
pub fn session_proof_message(nonce: &[u8; 32], device: DeviceId) -> Vec<u8> {
    let mut message = Vec::with_capacity(SESSION_PROOF_CONTEXT.len() + 48);
    message.extend_from_slice(SESSION_PROOF_CONTEXT);
    message.extend_from_slice(nonce);
    message.extend_from_slice(&device.to_bytes());
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8032, section 7.1, test 1: the empty message.
    #[test]
    fn signatures_match_the_rfc_8032_test_vector() {
        let seed: [u8; 32] =
            hex32("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
        let key = DeviceKey::from_seed(seed);
        assert_eq!(
            key.public().to_hex(),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        let sig = key.sign(b"");
        let expected = "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b";
        assert_eq!(crate::hex::encode(&sig), expected);
        assert!(key.public().verify(b"", &sig));
    }

    #[test]
    fn a_tampered_message_or_signature_does_not_verify() {
        let key = DeviceKey::from_seed([7; 32]);
        let nonce = [1; 32];
        let message = session_proof_message(&nonce, key.device_id());
        let mut sig = key.sign(&message);
        assert!(key.public().verify(&message, &sig));
        assert!(
            !key.public()
                .verify(&session_proof_message(&[2; 32], key.device_id()), &sig),
            "another nonce"
        );
        sig[0] ^= 1;
        assert!(!key.public().verify(&message, &sig));
        assert!(
            !DeviceKey::from_seed([8; 32])
                .public()
                .verify(&message, &key.sign(&message)),
            "another key"
        );
    }

    #[test]
    fn device_ids_are_stable_and_distinct() {
        let a = DeviceKey::from_seed([1; 32]);
        let b = DeviceKey::from_seed([2; 32]);
        assert_eq!(a.device_id(), DeviceKey::from_seed([1; 32]).device_id());
        assert_ne!(a.device_id(), b.device_id());
        assert_eq!(
            DevicePublicKey::from_hex(&a.public().to_hex()),
            Some(a.public())
        );
        assert_eq!(DevicePublicKey::from_hex("zz"), None);
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let key = DeviceKey::from_seed([0xab; 32]);
        assert!(!format!("{key:?}").contains("abab"));
    }

    fn hex32(text: &str) -> [u8; 32] {
        DevicePublicKey::from_hex(text).unwrap().0
    }
}
