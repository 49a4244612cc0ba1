//! Encode and decode throughput of the frame codec.
//!
//! `cargo bench -p notesync-benches --bench codec`
//!
//! Groups:
//! - `upsert_1char` / `upsert_200b`: one sync_doc_upsert of 100,000 atoms,
//!   one typed character each (depth 1-3 ids), or coalesced 200-byte atoms.
//!   `decode` (whole frame in one buffer), `decode_4k_chunks` (fed as 4 KiB
//!   socket reads), `encode` (the built frame to bytes, reusing the output
//!   buffer), `build_and_encode` (the atom list built from owned atoms,
//!   then encoded), and `memcpy`, the ceiling: `copy_from_slice` of the same
//!   bytes into a preallocated buffer.
//! - `session_inserts`: 100,000 session_insert frames back to back,
//!   decoded from one buffer and fed as 4 KiB chunks, with `memcpy`.

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use notesync_benches::{atom_parts, session_inserts, upsert};
use notesync_protocol::*;

const ATOMS: usize = 100_000;
const FRAMES: usize = 100_000;
const CHUNK: usize = 4096;

fn memcpy(c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, wire: &[u8]) {
    let mut dst = vec![0u8; wire.len()];
    c.bench_function("memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(wire));
            black_box(&mut dst);
        })
    });
}

/// Feeds `wire` in `CHUNK`-byte reads, decoding after each, as a socket
/// reader would; returns the number of frames.
fn decode_chunked(wire: &[u8]) -> usize {
    let mut dec = FrameDecoder::<ClientFrame>::default();
    let mut buf = BytesMut::with_capacity(2 * CHUNK);
    let mut n = 0;
    for chunk in wire.chunks(CHUNK) {
        buf.extend_from_slice(chunk);
        while let Some(f) = dec.decode(&mut buf).expect("valid frames") {
            black_box(f);
            n += 1;
        }
    }
    assert!(buf.is_empty());
    n
}

fn bench_upsert(c: &mut Criterion, name: &str, atom_bytes: usize) {
    let frame = upsert(ATOMS, atom_bytes, 42);
    let wire: Bytes = frame.to_bytes();
    let parts = atom_parts(&frame);
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(wire.len() as u64))
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));

    g.bench_function("decode", |b| {
        b.iter_batched(
            || BytesMut::from(&wire[..]),
            |mut buf| {
                FrameDecoder::<ClientFrame>::default()
                    .decode(&mut buf)
                    .expect("valid")
                    .expect("whole frame")
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("decode_4k_chunks", |b| {
        b.iter(|| assert_eq!(decode_chunked(black_box(&wire)), 1))
    });
    let mut out = BytesMut::with_capacity(wire.len());
    g.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            black_box(&frame).encode(&mut out);
            black_box(&out);
        })
    });
    g.bench_function("build_and_encode", |b| {
        b.iter(|| {
            let mut list = AtomListBuilder::new();
            for (data, pid) in black_box(&parts) {
                list.push_parts(data, pid).expect("valid atom");
            }
            let ClientFrame::Upsert(u) = &frame else {
                unreachable!()
            };
            ClientFrame::Upsert(Upsert {
                inserts: list.finish(),
                deletes: u.deletes.clone(),
                name: u.name.clone(),
                ..*u
            })
            .to_bytes()
        })
    });
    memcpy(&mut g, &wire);
    g.finish();
}

fn upserts(c: &mut Criterion) {
    bench_upsert(c, "upsert_1char", 1);
    bench_upsert(c, "upsert_200b", 200);
}

fn session_stream(c: &mut Criterion) {
    let wire = session_inserts(FRAMES, 7);
    let mut g = c.benchmark_group("session_inserts");
    g.throughput(Throughput::ElementsAndBytes {
        elements: FRAMES as u64,
        bytes: wire.len() as u64,
    })
    .sample_size(20)
    .warm_up_time(Duration::from_secs(1))
    .measurement_time(Duration::from_secs(4));

    g.bench_function("decode", |b| {
        b.iter_batched(
            || BytesMut::from(&wire[..]),
            |mut buf| {
                let mut dec = FrameDecoder::<ClientFrame>::default();
                let mut n = 0;
                while let Some(f) = dec.decode(&mut buf).expect("valid") {
                    black_box(f);
                    n += 1;
                }
                assert_eq!(n, FRAMES);
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("decode_4k_chunks", |b| {
        b.iter(|| assert_eq!(decode_chunked(black_box(&wire)), FRAMES))
    });
    memcpy(&mut g, &wire);
    g.finish();
}

criterion_group!(benches, upserts, session_stream);
criterion_main!(benches);
