// Checks for the `federation_handshake` fuzz target, shared with `model/tests/corpus_replay.rs`
// through `include!`. Plain (non-doc) comments only: this file is spliced into other files.
//
// A federation handshake message arrives from any host that can open a connection to the
// gateway, before anything is authenticated, and carries a gateway certificate. Whatever the
// bytes, neither the certificate decoder nor any handshake step may panic; a certificate that
// decodes must be canonical (it is signed byte for byte); and no bytes but a real peer's may
// complete a handshake.

/// `federation_handshake`: arbitrary bytes as a gateway certificate, a hello, a reply and a
/// finish.
#[allow(dead_code)]
pub fn check_federation_handshake(data: &[u8]) {
    use sund_model::federation::certificate::GatewayCertificate;
    use sund_model::federation::handshake::{answer, dial, peer_of, test_identity};
    use sund_model::testing::TestEntropy;
    use sund_model::time::Instant;

    if let Ok(cert) = GatewayCertificate::decode(data) {
        assert_eq!(cert.encode(), data, "gateway certificate encoding is not canonical");
        assert!(cert.not_before_s < cert.not_after_s);
    }
    let now = Instant(1_000_000_000);
    let a = test_identity("a.example", 1);
    let b = test_identity("b.example", 2);
    // Not the entropy the committed seeds were made with, so a seed reply answers another
    // hello than this check's.
    let mut entropy = TestEntropy(0x5eed);
    // As a hello at b: only a hello from a.example's real key can be answered, and then the
    // reply is b's own.
    if let Ok((answering, _)) = answer(&b, &[peer_of(&a)], data, [0x42; 32], now, &mut entropy) {
        assert_eq!(answering.peer(), "a.example");
    }
    // As a reply to a's dial: forged bytes never verify (they would need b's link key).
    let (dialing, _) = dial(&a, &peer_of(&b), [0x42; 32], &mut entropy);
    assert!(
        dialing.finish(&a, data, now).is_err(),
        "arbitrary bytes finished a handshake as b"
    );
    // As a finish to b's reply to a real hello: forged bytes never verify.
    let (_, hello) = dial(&a, &peer_of(&b), [0x42; 32], &mut entropy);
    let (answering, _) = answer(&b, &[peer_of(&a)], &hello, [0x42; 32], now, &mut entropy)
        .expect("a real hello is answered");
    assert!(answering.finish(data).is_err(), "arbitrary bytes finished a handshake as a");
}

/// `federation_entry_decode`: arbitrary bytes as the body of a federation link entry (what an
/// authenticated peer gateway queues: relayed messages, sequenced messages, answers, opens).
/// The decoder never panics, and an entry that decodes reads back as itself after encoding.
#[allow(dead_code)]
pub fn check_federation_entry_decode(data: &[u8]) {
    use sund_model::federation::entry::Entry;

    if let Ok(entry) = Entry::decode(data) {
        let again = Entry::decode(&entry.encode()).expect("an encoded entry decodes");
        assert_eq!(again, entry, "an entry changed through encode and decode");
    }
}
