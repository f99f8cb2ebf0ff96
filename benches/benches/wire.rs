//! Wire format throughput: header parse + validate, whole-frame decode, encode.
//!
//! Target: at least 25 million headers per second on the 2-core CI machine.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sund_model::ids::{ConversationId, DeviceId};
use sund_model::wire::payload::{Cursor, Deliver, Hello};
use sund_model::wire::{Frame, FrameDecoder, FrameHeader, Payload, Routing, PAYLOAD_BYTES_MAX};

fn deliver_frame(body: usize) -> Frame {
    let routing = Routing {
        conversation: ConversationId(7),
        sender: DeviceId(9),
        seq: 123_456,
        epoch: 3,
    };
    Frame::new(
        routing,
        Payload::Deliver(Deliver {
            msg_id: [0xab; 16],
            body: vec![0x5a; body],
        }),
    )
}

fn headers(c: &mut Criterion) {
    let bytes = deliver_frame(200).encode();
    let mut group = c.benchmark_group("header");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_and_validate", |b| {
        b.iter(|| {
            let h = FrameHeader::parse(black_box(&bytes), PAYLOAD_BYTES_MAX).unwrap();
            black_box(h.seq())
        })
    });
    // 1024 different headers in a row, so the branch predictor and cache see a realistic stream.
    let stream: Vec<bytes::Bytes> = (0..1024).map(|i| deliver_frame(i % 300).encode()).collect();
    group.throughput(Throughput::Elements(stream.len() as u64));
    group.bench_function("parse_and_validate_1024_distinct", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for f in &stream {
                sum = sum.wrapping_add(
                    FrameHeader::parse(black_box(f), PAYLOAD_BYTES_MAX)
                        .unwrap()
                        .seq(),
                );
            }
            sum
        })
    });
    group.finish();
}

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Elements(1));
    let deliver = deliver_frame(200).encode();
    group.bench_function("decode_deliver_200B", |b| {
        b.iter(|| Frame::decode(black_box(&deliver), PAYLOAD_BYTES_MAX).unwrap())
    });
    let hello = Frame::new(
        Routing {
            sender: DeviceId(1),
            ..Routing::default()
        },
        Payload::Hello(Hello {
            cursors: (0..64)
                .map(|i| Cursor::new(ConversationId(i), i as u64 * 10))
                .collect(),
            device_key: [7; 32],
            resume_token: Some([9; 32]),
            user: None,
            certificate: Some(vec![0xce; 160].into()),
            generation: Some(7),
        }),
    )
    .encode();
    group.bench_function("decode_hello_64_cursors", |b| {
        b.iter(|| Frame::decode(black_box(&hello), PAYLOAD_BYTES_MAX).unwrap())
    });
    let frame = deliver_frame(200);
    group.bench_function("encode_deliver_200B", |b| {
        b.iter(|| black_box(&frame).encode())
    });
    let stream: Vec<u8> = (0..256).flat_map(|_| deliver.to_vec()).collect();
    group.throughput(Throughput::Elements(256));
    group.bench_function("stream_decode_256_frames_4KiB_chunks", |b| {
        b.iter_batched(
            || FrameDecoder::new(PAYLOAD_BYTES_MAX),
            |mut d| {
                let mut n = 0;
                for chunk in stream.chunks(4096) {
                    d.push(chunk);
                    while d.next_frame().unwrap().is_some() {
                        n += 1;
                    }
                }
                assert_eq!(n, 256);
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, headers, frames);
criterion_main!(benches);
