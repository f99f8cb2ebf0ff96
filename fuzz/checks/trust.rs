// Checks for the trust fuzz targets, shared by `fuzz/fuzz_targets/{certificate,crl,peer_roots}_decode.rs`
// and `model/tests/corpus_replay.rs` through `include!`, so the committed corpora are replayed by
// `cargo test` with exactly the checks the fuzzer ran. Plain (non-doc) comments only: this file is
// spliced into other files. It names the model crate by path only (`sund_model::...`).
//
// Both encodings are canonical (they are signed byte for byte), so whatever decodes must
// re-encode to exactly the input, and decoding that gives the same value back.

/// `certificate_decode`: arbitrary bytes to `DeviceCertificate::decode`.
#[allow(dead_code)]
pub fn check_certificate_decode(data: &[u8]) {
    use sund_model::trust::DeviceCertificate;
    match DeviceCertificate::decode(data) {
        Ok(cert) => {
            let encoded = cert.encode();
            assert_eq!(
                encoded, data,
                "certificate encoding is not canonical: {cert:?}"
            );
            let again = DeviceCertificate::decode(&encoded).unwrap_or_else(|e| {
                panic!("re-encoded certificate does not decode: {e}; certificate {cert:?}")
            });
            assert_eq!(again, cert, "certificate changed in a round trip");
            assert!(
                cert.not_before_s < cert.not_after_s,
                "empty validity period decoded"
            );
            assert!(
                sund_model::trust::valid_domain(&cert.domain),
                "invalid domain decoded"
            );
            let _ = cert.device();
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

/// `crl_decode`: arbitrary bytes to `Crl::decode`.
#[allow(dead_code)]
pub fn check_crl_decode(data: &[u8]) {
    use sund_model::trust::{Crl, CRL_ENTRIES_MAX};
    match Crl::decode(data) {
        Ok(crl) => {
            let encoded = crl.encode();
            assert_eq!(encoded, data, "CRL encoding is not canonical: {crl:?}");
            let again = Crl::decode(&encoded)
                .unwrap_or_else(|e| panic!("re-encoded CRL does not decode: {e}; CRL {crl:?}"));
            assert_eq!(again, crl, "CRL changed in a round trip");
            assert!(
                crl.revoked.len() <= CRL_ENTRIES_MAX,
                "more entries decoded than a CRL may hold"
            );
            assert!(
                sund_model::trust::valid_domain(&crl.domain),
                "invalid domain decoded"
            );
            for &device in &crl.revoked {
                assert!(crl.check(device).is_err(), "a listed device is not revoked");
            }
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

/// `pairing_code_parse`: arbitrary bytes (as text) to `PairingCode::from_text`. The text comes
/// from a QR code or a paste, so anything may arrive.
#[allow(dead_code)]
pub fn check_pairing_code_parse(data: &[u8]) {
    use sund_model::trust::pairing::{PairingCode, PAIRING_CODE_TEXT_MAX, USER_NAME_BYTES_MAX};
    let Ok(text) = core::str::from_utf8(data) else {
        return;
    };
    match PairingCode::from_text(text) {
        Ok(code) => {
            let again = PairingCode::from_text(&code.to_text()).unwrap_or_else(|e| {
                panic!("re-encoded pairing code does not parse: {e}; code {code:?}")
            });
            assert!(again == code, "pairing code changed in a round trip: {code:?}");
            assert!(code.to_text().len() <= PAIRING_CODE_TEXT_MAX, "a code longer than its limit");
            assert!(
                code.user.to_string().len() <= USER_NAME_BYTES_MAX
                    && sund_model::address::Address::parse_full(&code.user.to_string()).as_ref()
                        == Ok(&code.user),
                "a user address out of bounds or not an address decoded"
            );
            let _ = code.enrolment();
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

/// `peer_roots_decode`: arbitrary bytes to `PeerRoots::decode` (a gateway's `HelloOk` carries
/// them, and a device's store keeps them).
#[allow(dead_code)]
pub fn check_peer_roots_decode(data: &[u8]) {
    use sund_model::trust::peer_roots::{PeerRoots, PEER_ROOTS_MAX};
    match PeerRoots::decode(data) {
        Ok(set) => {
            let encoded = set.encode();
            assert_eq!(encoded, data, "peer roots encoding is not canonical: {set:?}");
            let again = PeerRoots::decode(&encoded).unwrap_or_else(|e| {
                panic!("re-encoded peer roots do not decode: {e}; set {set:?}")
            });
            assert_eq!(again, set, "peer roots changed in a round trip");
            assert!(set.roots.len() <= PEER_ROOTS_MAX, "too many roots decoded");
            assert!(
                !set.roots.contains_key(&set.issuer),
                "the issuer's own domain decoded as a peer"
            );
            assert!(
                set.roots.keys().all(|d| sund_model::trust::valid_domain(d)),
                "invalid domain decoded"
            );
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}
