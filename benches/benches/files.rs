//! Files: the sender's pipeline (content-defined chunking, BLAKE3, Padmé, AES-256-GCM) and
//! the receiver's (open, unpad, hash check) on one core, stage by stage, plus the bytes an
//! edit moves.
//!
//! The figures that matter: the sender's pipeline in GiB/s (aim ≥ 1 GiB/s on one core), and
//! the share of a 1 GiB file that moves when one byte is inserted at its start or when the
//! receiver already holds it (aim ≤ 1 %; printed once, not timed).

use std::collections::BTreeSet;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sund_model::files::{
    chunk_ranges, open_chunk, seal_chunk, seal_file, ContentHash, FileName, FileSecret,
    ManifestBuilder,
};

const BYTES: usize = 64 << 20;

/// Incompressible bytes (xorshift64), the same every run.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn secret() -> FileSecret {
    FileSecret::from_bytes([7; 32])
}

fn pipeline(c: &mut Criterion) {
    let data = noise(BYTES, 1);
    let ranges: Vec<_> = chunk_ranges(&secret(), &data).collect();
    let mut group = c.benchmark_group("files");
    group.throughput(Throughput::Bytes(BYTES as u64));
    group.sample_size(10);
    group.bench_function("send_pipeline_64MiB", |b| {
        b.iter(|| {
            let mut builder = ManifestBuilder::new(FileName::new("bench.bin").unwrap(), secret());
            let mut sealed_bytes = 0;
            for range in chunk_ranges(&secret(), &data) {
                sealed_bytes += builder.push(&data[range]).unwrap().ciphertext.len();
            }
            black_box((builder.finish(), sealed_bytes))
        })
    });
    group.bench_function("chunk_only_64MiB", |b| {
        b.iter(|| black_box(chunk_ranges(&secret(), &data).count()))
    });
    group.bench_function("blake3_only_64MiB", |b| {
        b.iter(|| {
            for range in &ranges {
                black_box(ContentHash::of(&data[range.clone()]));
            }
        })
    });
    group.bench_function("seal_only_64MiB", |b| {
        b.iter(|| {
            for range in &ranges {
                black_box(seal_chunk(&secret(), &data[range.clone()]));
            }
        })
    });
    let sealed: Vec<_> = ranges
        .iter()
        .map(|range| seal_chunk(&secret(), &data[range.clone()]))
        .collect();
    group.bench_function("receive_open_verify_64MiB", |b| {
        b.iter(|| {
            for (entry, chunk) in &sealed {
                black_box(open_chunk(&secret(), entry, chunk.ciphertext.clone()).unwrap());
            }
        })
    });
    group.finish();
}

/// Not timed: what an edit moves, over a 1 GiB file.
fn bytes_moved(_: &mut Criterion) {
    let original = noise(1 << 30, 2);
    let name = || FileName::new("big.bin").unwrap();
    let (before, _) = seal_file(name(), secret(), &original).unwrap();
    let held: BTreeSet<_> = before.chunks.iter().map(|c| c.hash).collect();
    let moved = |data: &[u8]| {
        let (after, _) = seal_file(name(), secret(), data).unwrap();
        let new: u64 = after
            .chunks
            .iter()
            .filter(|c| !held.contains(&c.hash))
            .map(|c| u64::from(c.len))
            .sum();
        (new, after.chunks.len())
    };
    let (again, chunks) = moved(&original);
    let mut inserted = vec![0x42];
    inserted.extend_from_slice(&original);
    let (insert, _) = moved(&inserted);
    let mut flipped = original.clone();
    flipped[1 << 29] ^= 1;
    let (flip, _) = moved(&flipped);
    let pct = |n: u64| n as f64 * 100.0 / (1u64 << 30) as f64;
    println!(
        "files/bytes_moved 1 GiB, {chunks} chunks (manifest {} bytes): held already {again} B ({:.3} %), one byte inserted at the start {insert} B ({:.3} %), one byte changed mid-file {flip} B ({:.3} %)",
        before.encode().len(),
        pct(again),
        pct(insert),
        pct(flip),
    );
}

criterion_group!(benches, pipeline, bytes_moved);
criterion_main!(benches);
