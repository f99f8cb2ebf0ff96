//! Files: sealing, the manifest codec and content-defined chunking, as a receiver and an
//! attacker would exercise them.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;

/// Shared with the device's file tests.
pub(crate) use crate::testing::noise;

fn secret(byte: u8) -> FileSecret {
    FileSecret::from_bytes([byte; 32])
}

fn name(text: &str) -> FileName {
    FileName::new(text).unwrap()
}

#[test]
fn a_sealed_chunk_opens_to_its_plaintext_and_only_under_its_own_manifest() {
    let plain = noise(300_000, 1);
    let (entry, sealed) = seal_chunk(&secret(1), &plain);
    assert_eq!(entry.len, 300_000);
    assert_eq!(sealed.id, secret(1).chunk_id(&entry.hash));
    assert_eq!(sealed.ciphertext.len(), sealed_len(plain.len()));
    assert_ne!(
        &sealed.ciphertext[..plain.len()],
        &plain[..],
        "sealed, not copied"
    );
    assert_eq!(
        open_chunk(&secret(1), &entry, sealed.ciphertext.clone()).as_ref(),
        Ok(&plain)
    );
    // Sealed in place, the same bytes come out, without a second buffer.
    let mut buffer = Vec::with_capacity(sealed_len(plain.len()));
    buffer.extend_from_slice(&plain);
    let at = buffer.as_ptr();
    let (in_place_entry, in_place) = seal_chunk_in_place(&secret(1), buffer);
    assert_eq!((in_place_entry, &in_place), (entry, &sealed));
    assert_eq!(in_place.ciphertext.as_ptr(), at, "not reallocated");
    // Another conversation's secret neither finds nor opens it.
    assert_ne!(secret(2).chunk_id(&entry.hash), sealed.id);
    assert!(matches!(
        open_chunk(&secret(2), &entry, sealed.ciphertext),
        Err(ChunkError::Tampered { .. })
    ));
}

#[test]
fn a_flipped_byte_or_a_cut_chunk_is_detected() {
    let plain = noise(5_000, 2);
    let (entry, sealed) = seal_chunk(&secret(1), &plain);
    for at in [0, 2_500, sealed.ciphertext.len() - 1] {
        let mut bad = sealed.ciphertext.clone();
        bad[at] ^= 0x01;
        assert!(
            matches!(
                open_chunk(&secret(1), &entry, bad),
                Err(ChunkError::Tampered { .. })
            ),
            "flip at {at}"
        );
    }
    let mut cut = sealed.ciphertext.clone();
    cut.pop();
    let err = open_chunk(&secret(1), &entry, cut).unwrap_err();
    assert!(matches!(err, ChunkError::WrongLength { got, expected, .. } if got + 1 == expected));
    assert!(err.to_string().contains("fetch it again"), "{err}");
}

#[test]
fn a_member_sealing_other_bytes_under_a_chunks_id_is_caught_by_the_hash() {
    let real = noise(1_000, 3);
    let (entry, sealed) = seal_chunk(&secret(1), &real);
    // A member knows the secret and the entry, so it can seal anything of the same length
    // under the entry's key and id; the plaintext hash still tells.
    let forged_plain = noise(1_000, 4);
    let key = secret(1).chunk_key(&entry.hash);
    let key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key[..]).unwrap(),
    );
    let mut buffer = forged_plain;
    buffer.push(0x80);
    buffer.resize(padded_len(1_000), 0);
    key.seal_in_place_append_tag(
        ring::aead::Nonce::assume_unique_for_key([0; 12]),
        ring::aead::Aad::from(&sealed.id.0),
        &mut buffer,
    )
    .unwrap();
    assert_eq!(
        open_chunk(&secret(1), &entry, buffer),
        Err(ChunkError::WrongContent { id: sealed.id })
    );
}

#[test]
fn streaming_cuts_exactly_where_the_in_memory_chunker_does() {
    let data = noise(9 << 20, 5);
    let in_memory: Vec<_> = chunk_ranges(&secret(1), &data).collect();
    let mut offset = 0;
    let streamed: Vec<_> = stream_chunker(&secret(1), std::io::Cursor::new(&data))
        .map(|chunk| {
            let chunk = chunk.unwrap();
            assert_eq!(&chunk[..], &data[offset..offset + chunk.len()]);
            offset += chunk.len();
            offset - chunk.len()..offset
        })
        .collect();
    assert_eq!(in_memory, streamed);
    // They cover the data exactly, within the bounds.
    assert_eq!(in_memory.first().unwrap().start, 0);
    assert_eq!(in_memory.last().unwrap().end, data.len());
    for pair in in_memory.windows(2) {
        assert_eq!(pair[0].end, pair[1].start);
        assert!(pair[0].len() >= CHUNK_BYTES_MIN && pair[0].len() <= CHUNK_BYTES_MAX);
    }
    assert!(chunk_ranges(&secret(1), &[]).next().is_none());
}

#[test]
fn a_byte_inserted_at_the_start_changes_only_the_first_chunks() {
    let original = noise(32 << 20, 6);
    let mut edited = vec![0x42];
    edited.extend_from_slice(&original);
    let (before, _) = seal_file(name("a.bin"), secret(1), &original).unwrap();
    let (after, _) = seal_file(name("a.bin"), secret(1), &edited).unwrap();
    let held: BTreeSet<_> = before.chunks.iter().map(|c| c.hash).collect();
    let moved: u64 = after
        .chunks
        .iter()
        .filter(|c| !held.contains(&c.hash))
        .map(|c| u64::from(c.len))
        .sum();
    // Fixed-size blocks would move all 32 MiB; content-defined chunks move the one around the
    // insertion (at most CHUNK_BYTES_MAX, twice if the cut after it moved).
    assert!(moved <= 2 * CHUNK_BYTES_MAX as u64, "moved {moved} bytes");
    assert!(moved > 0);
}

#[test]
fn the_same_file_under_one_secret_seals_to_the_same_chunks_and_under_two_to_unrelated_ones() {
    let data = noise(6 << 20, 7);
    let (first, sealed_first) = seal_file(name("x"), secret(1), &data).unwrap();
    let (again, sealed_again) = seal_file(name("x"), secret(1), &data).unwrap();
    assert_eq!(first, again);
    assert_eq!(
        sealed_first, sealed_again,
        "deterministic: nothing new to upload"
    );
    let (other, sealed_other) = seal_file(name("x"), secret(2), &data).unwrap();
    let ids: BTreeSet<_> = sealed_first.iter().map(|c| c.id).collect();
    assert!(sealed_other.iter().all(|c| !ids.contains(&c.id)));
    // The boundaries differ too, so the lengths the gateway sees do not match up.
    let lengths = |m: &Manifest| m.chunks.iter().map(|c| c.len).collect::<Vec<_>>();
    assert_ne!(lengths(&first), lengths(&other));
}

#[test]
fn a_whole_file_round_trips_through_its_manifest() {
    let data = noise(3 << 20, 8);
    let (manifest, sealed) = seal_file(name("photo.jpg"), secret(9), &data).unwrap();
    let received = Manifest::decode(&manifest.encode()).unwrap();
    assert_eq!(received, manifest);
    assert_eq!(received.id(), manifest.id());
    let mut out = Vec::new();
    for (i, chunk) in sealed.into_iter().enumerate() {
        assert_eq!(received.chunk_id(i), chunk.id);
        out.extend(open_chunk(&received.secret, &received.chunks[i], chunk.ciphertext).unwrap());
    }
    assert_eq!(out, data);
    assert_eq!(
        FileId::parse(&manifest.id().to_string()),
        Some(manifest.id())
    );
    // The gateway stores a few percent more than the file, never less.
    let sealed_bytes = manifest.sealed_bytes();
    assert!(sealed_bytes > data.len() as u64 && sealed_bytes < data.len() as u64 * 106 / 100);
}

#[test]
fn a_manifest_noted_from_hashes_is_the_one_sealing_builds() {
    let data = noise(5 << 20, 11);
    let (sealed, _) = seal_file(name("notes.txt"), secret(4), &data).unwrap();
    let mut builder = ManifestBuilder::new(name("notes.txt"), secret(4));
    for range in chunk_ranges(&secret(4), &data) {
        let plain = &data[range];
        builder
            .push_hashed(plain.len(), ContentHash::of(plain))
            .unwrap();
    }
    let noted = builder.finish();
    assert_eq!(noted, sealed);
    assert_eq!(noted.digest(), sealed.digest());
    // The same limits hold: a chunk past the largest is refused and nothing is noted.
    let mut builder = ManifestBuilder::new(name("big"), secret(4));
    assert_eq!(
        builder.push_hashed(CHUNK_BYTES_MAX + 1, ContentHash::of(b"x")),
        Err(ManifestError::ChunkLength {
            index: 0,
            len: CHUNK_BYTES_MAX as u32 + 1,
            max: CHUNK_BYTES_MAX
        })
    );
    assert_eq!(builder.finish().chunks.len(), 0);
}

#[test]
fn an_empty_file_has_no_chunks() {
    let (manifest, sealed) = seal_file(name("empty"), secret(1), &[]).unwrap();
    assert!(sealed.is_empty());
    assert_eq!(manifest.size, 0);
    assert_eq!(Manifest::decode(&manifest.encode()).unwrap(), manifest);
}

#[test]
fn the_manifest_encoding_is_stable() {
    let manifest = Manifest {
        name: name("notes.txt"),
        size: 70_000,
        secret: secret(0x5e),
        chunks: vec![
            ChunkEntry {
                hash: ContentHash([1; 32]),
                len: 65_536,
            },
            ChunkEntry {
                hash: ContentHash([2; 32]),
                len: 4_464,
            },
        ],
    };
    insta::assert_snapshot!(crate::hex::encode(&manifest.encode()));
    insta::assert_snapshot!(
        "manifest_digest",
        format!("{:?} {}", manifest.digest(), manifest.id())
    );
}

fn small_manifest() -> Manifest {
    let (manifest, _) = seal_file(name("a"), secret(1), &noise(1_000, 10)).unwrap();
    manifest
}

#[test]
fn unsafe_names_are_refused_with_a_reason() {
    for (bad, words) in [
        ("", "cannot be empty"),
        (".", "is not a file name"),
        ("..", "is not a file name"),
        ("../../.ssh/authorized_keys", "path separator"),
        ("/etc/passwd", "path separator"),
        ("C:\\Windows\\x", "path separator"),
        ("a\0b", "control"),
        ("line\nbreak", "control"),
        ("invoice\u{202E}fdp.exe", "invisible formatting"),
        ("zero\u{200B}width", "invisible formatting"),
        ("a:stream", "every system accepts"),
        ("what?", "every system accepts"),
        ("trailing.", "every system accepts"),
        ("trailing ", "every system accepts"),
        ("CON", "device name"),
        ("lpt1.txt", "device name"),
    ] {
        let err = FileName::new(bad).unwrap_err();
        assert!(err.to_string().contains(words), "{bad:?}: {err}");
    }
    assert!(FileName::new(&"é".repeat(128)).is_err(), "256 bytes");
    assert!(FileName::new(&"e".repeat(255)).is_ok());
    assert!(FileName::new("..hidden").is_ok());
    assert!(FileName::new("console.log").is_ok());
    assert!(FileName::new("COM10").is_ok());
    assert!(FileName::new("f\u{e9}vrier \u{1f4c4}.pdf").is_ok());

    // The same names inside a received manifest.
    let mut bytes = small_manifest().encode();
    let at = 3 + 1 + 8 + 32;
    assert_eq!(bytes[at], 1);
    bytes[at + 1] = b'/';
    assert!(matches!(
        Manifest::decode(&bytes),
        Err(ManifestError::Name(FileNameError::Separator(_)))
    ));
}

#[test]
fn a_manifest_that_lies_is_refused() {
    let manifest = small_manifest();
    let mut lies = manifest.clone();
    lies.size += 1;
    assert!(matches!(
        Manifest::decode(&lies.encode()),
        Err(ManifestError::SizeMismatch {
            stated: 1_001,
            sum: 1_000
        })
    ));
    let mut empty_chunk = manifest.clone();
    empty_chunk.chunks.push(ChunkEntry {
        hash: ContentHash([0; 32]),
        len: 0,
    });
    assert!(matches!(
        Manifest::decode(&empty_chunk.encode()),
        Err(ManifestError::ChunkLength {
            index: 1,
            len: 0,
            ..
        })
    ));
    let mut huge = manifest.clone();
    huge.size = FILE_BYTES_MAX + 1;
    assert!(matches!(
        Manifest::decode(&huge.encode()),
        Err(ManifestError::TooLarge { .. })
    ));
    // A count the input cannot hold is refused before anything is allocated for it.
    let mut bytes = manifest.encode();
    let count_at = bytes.len() - 4 - 36;
    bytes[count_at..count_at + 4].copy_from_slice(&(CHUNKS_MAX as u32).to_be_bytes());
    assert!(matches!(
        Manifest::decode(&bytes),
        Err(ManifestError::Malformed(_))
    ));
    bytes[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        Manifest::decode(&bytes),
        Err(ManifestError::TooManyChunks { .. })
    ));
    let mut twice = manifest.clone();
    twice.chunks.push(ChunkEntry {
        hash: manifest.chunks[0].hash,
        len: 1,
    });
    twice.size += 1;
    assert_eq!(
        Manifest::decode(&twice.encode()),
        Err(ManifestError::InconsistentChunk { index: 1 })
    );
    let mut trailing = manifest.encode();
    trailing.push(0);
    assert!(Manifest::decode(&trailing).is_err());
    assert!(matches!(
        Manifest::decode(&vec![0; MANIFEST_BYTES_MAX + 1]),
        Err(ManifestError::TooLong { .. })
    ));
    assert!(Manifest::decode(b"SDF\x02").is_err());
}

#[test]
fn the_secret_is_never_printed() {
    let manifest = small_manifest();
    let debug = format!("{manifest:?}");
    assert!(debug.contains("FileSecret(..)"));
    assert!(!debug.contains(&format!("{:?}", [1u8; 32])));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decoding_any_bytes_never_panics_and_what_decodes_reencodes_to_itself(
        bytes in proptest::collection::vec(any::<u8>(), 0..600)
    ) {
        if let Ok(manifest) = Manifest::decode(&bytes) {
            prop_assert_eq!(manifest.encode(), bytes);
        }
    }

    #[test]
    fn every_manifest_round_trips(
        name_text in "[a-zA-Z0-9 ._-]{1,40}",
        lens in proptest::collection::vec(1u32..=CHUNK_BYTES_MAX as u32, 0..50),
        seed in any::<u8>(),
    ) {
        prop_assume!(FileName::new(&name_text).is_ok());
        let chunks: Vec<_> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| ChunkEntry { hash: ContentHash([i as u8; 32]), len })
            .collect();
        let manifest = Manifest {
            name: FileName::new(&name_text).unwrap(),
            size: lens.iter().map(|&l| u64::from(l)).sum(),
            secret: secret(seed),
            chunks,
        };
        let bytes = manifest.encode();
        prop_assert!(bytes.len() <= MANIFEST_BYTES_MAX);
        prop_assert_eq!(Manifest::decode(&bytes), Ok(manifest));
    }

    #[test]
    fn a_chunk_changed_anywhere_never_opens(
        len in 1usize..3_000,
        flip_at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let plain = noise(len, len as u64);
        let (entry, sealed) = seal_chunk(&secret(3), &plain);
        let mut bad = sealed.ciphertext;
        let at = flip_at.index(bad.len());
        bad[at] ^= 1 << bit;
        prop_assert!(open_chunk(&secret(3), &entry, bad).is_err());
    }
}
