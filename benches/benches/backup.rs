//! A device backup's sealing (`sund_runtime::sealed`): how fast 64 MiB are sealed and opened
//! again (ChaCha20-Poly1305 in 64 KiB segments, in memory), and what deriving the key costs at
//! the settings backups are written with (Argon2id, 64 MiB, three passes): the fixed price of
//! `sund backup` and `sund restore` before the first byte.

use std::hint::black_box;
use std::io::{Read, Write};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sund_runtime::sealed::{Header, KdfParams, SealReader, SealWriter};

const PASS: &str = "four random words here";
/// The cheapest settings a reader accepts: the stream's cost without Argon2's.
const FAST: KdfParams = KdfParams {
    memory_kib: 8,
    passes: 1,
    lanes: 1,
};

fn sealing(c: &mut Criterion) {
    let plain: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut group = c.benchmark_group("sealed");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(plain.len() as u64));
    group.bench_function("seal 64 MiB", |b| {
        b.iter(|| {
            let mut w = SealWriter::new(
                Vec::with_capacity(plain.len() + (1 << 16)),
                PASS,
                FAST,
                [1; 16],
                [2; 7],
            )
            .unwrap();
            w.write_all(black_box(&plain)).unwrap();
            black_box(w.finish().unwrap())
        })
    });
    let mut w = SealWriter::new(Vec::new(), PASS, FAST, [1; 16], [2; 7]).unwrap();
    w.write_all(&plain).unwrap();
    let sealed = w.finish().unwrap();
    group.bench_function("open 64 MiB", |b| {
        b.iter(|| {
            let mut r = SealReader::open(black_box(&sealed[..]), PASS).unwrap();
            let mut out = Vec::with_capacity(plain.len());
            r.read_to_end(&mut out).unwrap();
            black_box(out)
        })
    });
    group.finish();
    let mut group = c.benchmark_group("backup-key");
    group.sample_size(10);
    let header = Header {
        kdf: KdfParams::BACKUP,
        salt: [3; 16],
        nonce_prefix: [4; 7],
        key_check: [0; 16],
    };
    group.bench_function("argon2id 64 MiB x3", |b| {
        b.iter(|| black_box(header.derive_key(black_box(PASS))))
    });
    group.finish();
}

criterion_group!(benches, sealing);
criterion_main!(benches);
