//! Replays the decoder fuzz corpus on stable: every file in
//! `fuzz/corpus/decode/` (the checked-in seeds and a small minimized set)
//! and `fuzz/artifacts-kept/` (crash regressions) goes through
//! `notesync_protocol::fuzzing::decode_target`, the same function the
//! cargo-fuzz target calls.
//!
//! The seeds (`seed-*` files) are written by the ignored test
//! `write_seeds`:
//! `cargo test -p notesync-protocol --test fuzz_corpus -- --ignored write_seeds`.

use std::path::{Path, PathBuf};

use notesync_protocol::fuzzing::{Config, Outcome, decode_target, feed};
use notesync_protocol::*;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = rd
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn replay_corpus_and_kept_artifacts() {
    let corpus = files_in(&fuzz_dir().join("corpus/decode"));
    assert!(
        corpus.len() >= 40,
        "fuzz/corpus/decode has only {} files",
        corpus.len()
    );
    let kept = files_in(&fuzz_dir().join("artifacts-kept"));
    let mut failed = Vec::new();
    for path in corpus.iter().chain(&kept) {
        let data = std::fs::read(path).expect("read corpus file");
        if std::panic::catch_unwind(|| decode_target(&data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(failed.is_empty(), "decode_target failed on: {failed:#?}");
}

/// One seed: a configuration, a stream, and what decoding it must give.
struct Seed {
    name: String,
    cfg: Config,
    stream: Vec<u8>,
    frames: usize,
    error: Option<&'static str>,
}

impl Seed {
    fn bytes(&self) -> Vec<u8> {
        let mut out = self.cfg.prefix();
        out.extend_from_slice(&self.stream);
        out
    }
}

fn cfg(server: bool, pieces: &[usize]) -> Config {
    Config {
        server,
        limits: Limits::default(),
        pieces: pieces.to_vec(),
    }
}

fn limited(server: bool, frame: usize, items: u64, depth: u8, pieces: &[usize]) -> Config {
    Config {
        server,
        limits: Limits {
            max_frame_bytes: frame,
            max_items_per_frame: items,
            max_pid_depth: depth,
        },
        pieces: pieces.to_vec(),
    }
}

fn pid(levels: &[(u32, u8)]) -> Pid {
    let l: Vec<Level> = levels.iter().map(|&(i, s)| Level::new(i, s)).collect();
    Pid::from_levels(&l)
}

fn atoms() -> AtomList {
    let mut b = AtomListBuilder::new();
    b.push_parts("h", &pid(&[(10, 3)])).unwrap();
    b.push_parts("é", &pid(&[(10, 3), (0, 0), (7, 3)])).unwrap();
    b.push_parts("日本", &pid(&[(11, 0), (u32::MAX, 255)]))
        .unwrap();
    b.push_parts(&"x".repeat(255), &pid(&[(12, 9)])).unwrap();
    b.finish()
}

fn deletes() -> PidList {
    let mut b = PidListBuilder::new();
    b.push(&pid(&[(1, 1)])).unwrap();
    b.push(&pid(&[(1, 1), (2, 0), (3, 4)])).unwrap();
    b.finish()
}

fn items() -> ItemList {
    let mut b = ItemListBuilder::new();
    b.push_run(&pid(&[(10, 3)]), "hello").unwrap();
    b.push_atom("日本", &pid(&[(11, 0), (u32::MAX, 255)]))
        .unwrap();
    b.push_run(&pid(&[(12, 9), (u32::MAX - 2, 4)]), "ü€x")
        .unwrap();
    b.finish()
}

fn ranges() -> RangeList {
    let mut b = RangeListBuilder::new();
    b.push(&pid(&[(1, 1)]), 3).unwrap();
    b.push(&pid(&[(1, 1), (u32::MAX, 2)]), 1).unwrap();
    b.finish()
}

fn client_frames() -> Vec<(&'static str, ClientFrame)> {
    vec![
        ("synclist", ClientFrame::Synclist { since: 0 }),
        (
            "pull",
            ClientFrame::Pull {
                doc: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
                since: 1_700_000_000_000_000,
            },
        ),
        (
            "upsert",
            ClientFrame::Upsert(Upsert {
                doc: 7,
                name: DocName::new("shopping list").unwrap(),
                since: 42,
                inserts: atoms(),
                deletes: deletes(),
            }),
        ),
        (
            "upsert-empty",
            ClientFrame::Upsert(Upsert {
                doc: 8,
                name: DocName::default(),
                since: 0,
                inserts: AtomList::default(),
                deletes: PidList::default(),
            }),
        ),
        (
            "session-start",
            ClientFrame::SessionStart { since: 5, doc: 9 },
        ),
        (
            "insert",
            ClientFrame::Insert(SessionInsert::new(
                Atom::new("ü", pid(&[(3, 0), (4, 2)])).unwrap(),
            )),
        ),
        (
            "delete",
            ClientFrame::Delete(SessionDelete {
                site: 0,
                pid: pid(&[(3, 7)]),
            }),
        ),
        (
            "rename",
            ClientFrame::Rename(DocName::new("Ideen für 2026").unwrap()),
        ),
        (
            "rename-max",
            ClientFrame::Rename(DocName::new("n".repeat(255)).unwrap()),
        ),
        (
            "hello",
            ClientFrame::Hello(Hello::new(u128::MAX - 1, &b"secret-token"[..]).unwrap()),
        ),
        (
            "hello-no-token",
            ClientFrame::Hello(Hello::new(1, bytes::Bytes::new()).unwrap()),
        ),
        ("doc-delete", ClientFrame::DeleteDoc { doc: 9 }),
        (
            "upsert-runs",
            ClientFrame::UpsertRuns(UpsertRuns {
                doc: 7,
                name: DocName::new("runs").unwrap(),
                since: 42,
                inserts: items(),
                deletes: ranges(),
            }),
        ),
        (
            "insert-run",
            ClientFrame::InsertRun(SessionInsertRun::new(
                Run::new(pid(&[(3, 0), (4, 2)]), "typed forward").unwrap(),
            )),
        ),
        (
            "delete-range",
            ClientFrame::DeleteRange(SessionDeleteRange {
                site: 2,
                range: IdRange::new(pid(&[(3, 7)]), 40).unwrap(),
            }),
        ),
        (
            "feed-subscribe",
            ClientFrame::Subscribe {
                since: 1_700_000_000_000_000,
            },
        ),
    ]
}

fn server_frames() -> Vec<(&'static str, ServerFrame)> {
    vec![
        (
            "synclist-response",
            ServerFrame::SynclistResponse(
                [(1, 10), (2, 20), (u64::MAX, u128::MAX)]
                    .into_iter()
                    .map(|(modified, doc)| SyncEntry { modified, doc })
                    .collect(),
            ),
        ),
        (
            "synclist-response-empty",
            ServerFrame::SynclistResponse(SyncEntries::default()),
        ),
        (
            "doc-response",
            ServerFrame::DocResponse(DocResponse {
                doc: 7,
                name: DocName::new("shopping list").unwrap(),
                inserts: atoms(),
                deletes: deletes(),
            }),
        ),
        (
            "doc-sync",
            ServerFrame::DocSync {
                doc: 7,
                sync_time: 43,
                site: 3,
            },
        ),
        (
            "insert",
            ServerFrame::Insert(SessionInsert::new(
                Atom::new("a", pid(&[(1, 200)])).unwrap(),
            )),
        ),
        (
            "delete",
            ServerFrame::Delete(SessionDelete {
                site: 4,
                pid: pid(&[(1, 200), (9, 4)]),
            }),
        ),
        (
            "rename",
            ServerFrame::Rename(DocName::new("renamed").unwrap()),
        ),
        (
            "session-started",
            ServerFrame::SessionStarted {
                session_id: 77,
                site: 3,
                sync_time: 44,
            },
        ),
        ("session-ack", ServerFrame::SessionAck { count: 12 }),
        (
            "welcome",
            ServerFrame::Welcome {
                version: PROTOCOL_VERSION,
                server_time: 45,
            },
        ),
        (
            "error",
            ServerFrame::Error(ErrorFrame::new(
                ErrorCode::LIMIT_EXCEEDED,
                "max_frame_bytes (33554432)",
            )),
        ),
        (
            "error-unknown-code",
            ServerFrame::Error(ErrorFrame::new(ErrorCode(200), "")),
        ),
        (
            "doc-deleted",
            ServerFrame::DocDeleted {
                doc: 9,
                deleted_time: 46,
            },
        ),
        ("resync", ServerFrame::Resync { doc: 9 }),
        (
            "doc-response-runs",
            ServerFrame::DocResponseRuns(DocResponseRuns {
                doc: 7,
                name: DocName::new("runs").unwrap(),
                inserts: items(),
                deletes: ranges(),
            }),
        ),
        (
            "insert-run",
            ServerFrame::InsertRun(SessionInsertRun::new(
                Run::new(pid(&[(1, 200)]), "ab").unwrap(),
            )),
        ),
        (
            "delete-range",
            ServerFrame::DeleteRange(SessionDeleteRange {
                site: 0,
                range: IdRange::new(pid(&[(1, 200), (9, 4)]), 2).unwrap(),
            }),
        ),
        (
            "feed-changes",
            ServerFrame::FeedChanges(
                [(1, 10, false), (2, 20, true), (u64::MAX, u128::MAX, false)]
                    .into_iter()
                    .map(|(time, doc, deleted)| FeedEntry { time, doc, deleted })
                    .collect(),
            ),
        ),
        (
            "feed-heartbeat",
            ServerFrame::FeedHeartbeat {
                time: 1_700_000_000_000_000,
            },
        ),
    ]
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn seeds() -> Vec<Seed> {
    let mut out = Vec::new();
    let seed = |name: &str, cfg, stream, frames, error| Seed {
        name: name.to_owned(),
        cfg,
        stream,
        frames,
        error,
    };

    // Every frame of each direction alone, then all of them in one stream
    // fed in odd pieces, then byte by byte.
    let client = client_frames();
    let server = server_frames();
    for (name, f) in &client {
        out.push(seed(
            &format!("client-{name}"),
            cfg(false, &[]),
            f.to_bytes().to_vec(),
            1,
            None,
        ));
    }
    for (name, f) in &server {
        out.push(seed(
            &format!("server-{name}"),
            cfg(true, &[]),
            f.to_bytes().to_vec(),
            1,
            None,
        ));
    }
    let all_client: Vec<u8> = client.iter().flat_map(|(_, f)| f.to_bytes()).collect();
    let all_server: Vec<u8> = server.iter().flat_map(|(_, f)| f.to_bytes()).collect();
    out.push(seed(
        "client-all-split",
        cfg(false, &[1, 7, 64, 3]),
        all_client.clone(),
        client.len(),
        None,
    ));
    out.push(seed(
        "server-all-split",
        cfg(true, &[3, 200, 1]),
        all_server.clone(),
        server.len(),
        None,
    ));
    out.push(seed(
        "client-all-bytewise",
        cfg(false, &[1]),
        all_client.clone(),
        client.len(),
        None,
    ));
    // Truncated: all but the last byte of the stream.
    out.push(seed(
        "client-all-truncated",
        cfg(false, &[5]),
        all_client[..all_client.len() - 1].to_vec(),
        client.len() - 1,
        Some("truncated"),
    ));
    out.push(seed(
        "server-all-truncated",
        cfg(true, &[]),
        all_server[..all_server.len() - 1].to_vec(),
        server.len() - 1,
        Some("truncated"),
    ));

    let upsert = client[2].1.to_bytes();
    let insert = client[5].1.to_bytes();
    let delete = client[6].1.to_bytes();
    let pull = client[1].1.to_bytes();
    let doc_response = server[2].1.to_bytes();

    // Malformed, default limits.
    out.push(seed(
        "client-unknown-header",
        cfg(false, &[]),
        cat(&[&pull, &[6, 0, 0]]),
        1,
        Some("unknown_header"),
    ));
    out.push(seed(
        "client-server-header",
        cfg(false, &[]),
        doc_response.to_vec(),
        0,
        Some("unknown_header"),
    ));
    out.push(seed(
        "server-client-header",
        cfg(true, &[]),
        pull.to_vec(),
        0,
        Some("unknown_header"),
    ));
    out.push(seed(
        "client-reserved-header",
        cfg(false, &[]),
        vec![0xff],
        0,
        Some("unknown_header"),
    ));
    // 65, site 2, atom length 0.
    out.push(seed(
        "client-empty-atom",
        cfg(false, &[2]),
        vec![65, 2, 0, 1, 2, 0, 0, 0, 1],
        0,
        Some("empty_atom"),
    ));
    out.push(seed(
        "client-insert-zero-depth",
        cfg(false, &[]),
        vec![65, 2, 1, b'a', 0],
        0,
        Some("zero_depth"),
    ));
    out.push(seed(
        "client-delete-depth-limit",
        cfg(false, &[]),
        cat(&[&[66, 1, 65], &[1, 0, 0, 0, 1].repeat(65)]),
        0,
        Some("depth_limit"),
    ));
    out.push(seed(
        "client-insert-site-zero",
        cfg(false, &[]),
        vec![65, 0, 1, b'a', 1, 0, 0, 0, 0, 1],
        0,
        Some("reserved_site"),
    ));
    out.push(seed(
        "client-insert-creator-zero",
        cfg(false, &[]),
        vec![65, 2, 1, b'a', 1, 0, 0, 0, 0, 1],
        0,
        Some("reserved_site"),
    ));
    out.push(seed(
        "client-delete-creator-zero",
        cfg(false, &[]),
        vec![66, 2, 2, 1, 0, 0, 0, 1, 0, 0, 0, 0, 2],
        0,
        Some("reserved_site"),
    ));
    out.push(seed(
        "client-insert-site-mismatch",
        cfg(false, &[]),
        vec![65, 2, 1, b'a', 1, 3, 0, 0, 0, 1],
        0,
        Some("insert_site_mismatch"),
    ));
    // Half of a two-byte character, then a valid id.
    out.push(seed(
        "client-insert-bad-utf8",
        cfg(false, &[1]),
        vec![65, 2, 1, 0xc3, 1, 2, 0, 0, 0, 1],
        0,
        Some("invalid_utf8"),
    ));
    out.push(seed(
        "client-rename-bad-utf8",
        cfg(false, &[]),
        vec![67, b'a', 0xff, b'\n'],
        0,
        Some("invalid_utf8"),
    ));
    out.push(seed(
        "client-rename-too-long",
        cfg(false, &[100]),
        cat(&[&[67], &[b'a'; 256], b"\n"]),
        0,
        Some("name_too_long"),
    ));
    let mut too_many = vec![2];
    too_many.extend_from_slice(&7u128.to_be_bytes());
    too_many.extend_from_slice(b"n\n");
    too_many.extend_from_slice(&0u64.to_be_bytes());
    too_many.extend_from_slice(&1_000_001u64.to_be_bytes());
    out.push(seed(
        "client-upsert-too-many-atoms",
        cfg(false, &[]),
        too_many,
        0,
        Some("too_many_items"),
    ));
    let mut huge = vec![32];
    huge.extend_from_slice(&u64::MAX.to_be_bytes());
    out.push(seed(
        "server-synclist-too-many",
        cfg(true, &[]),
        huge,
        0,
        Some("too_many_items"),
    ));
    // 127, code 1, message length 3, bytes that are not UTF-8.
    out.push(seed(
        "server-error-bad-utf8",
        cfg(true, &[2]),
        vec![127, 1, 0, 3, b'o', 0xe2, 0x82],
        0,
        Some("invalid_utf8"),
    ));
    out.push(seed(
        "server-error-truncated",
        cfg(true, &[]),
        vec![127, 1, 0xff, 0xff, b'x'],
        0,
        Some("truncated"),
    ));
    out.push(seed(
        "server-insert-then-garbage",
        cfg(true, &[4]),
        cat(&[&server[4].1.to_bytes(), &[65, 1, 0]]),
        1,
        Some("empty_atom"),
    ));

    // Small limits: frame bytes, items and depth.
    out.push(seed(
        "client-upsert-frame-too-large",
        limited(false, 100, 7, 15, &[16]),
        upsert.to_vec(),
        0,
        Some("frame_too_large"),
    ));
    out.push(seed(
        "client-upsert-fits",
        limited(false, upsert.len(), 7, 15, &[9, 1]),
        upsert.to_vec(),
        1,
        None,
    ));
    out.push(seed(
        "client-upsert-one-byte-over",
        limited(false, upsert.len() - 1, 7, 15, &[]),
        upsert.to_vec(),
        0,
        Some("frame_too_large"),
    ));
    // A count that cannot fit in 200 bytes is refused before its items.
    let mut count_too_big = vec![32];
    count_too_big.extend_from_slice(&7u64.to_be_bytes());
    out.push(seed(
        "server-synclist-count-over-frame",
        limited(true, 100, 7, 15, &[]),
        count_too_big,
        0,
        Some("frame_too_large"),
    ));
    out.push(seed(
        "client-upsert-items-limit",
        limited(false, 4095, 3, 15, &[]),
        upsert.to_vec(),
        0,
        Some("too_many_items"),
    ));
    out.push(seed(
        "client-upsert-depth-limit",
        limited(false, 4095, 7, 2, &[]),
        upsert.to_vec(),
        0,
        Some("depth_limit"),
    ));
    out.push(seed(
        "client-zero-frame-limit",
        limited(false, 0, 7, 15, &[]),
        insert.to_vec(),
        0,
        Some("frame_too_large"),
    ));
    out.push(seed(
        "client-stream-limited",
        limited(false, 64, 7, 3, &[3]),
        cat(&[&insert, &delete, &pull, &insert, &upsert]),
        4,
        Some("frame_too_large"),
    ));
    // Run chars and range ids count toward max_items_per_frame (7 here):
    // one run of 8 chars, one range of 8 ids.
    let long_run = ClientFrame::InsertRun(SessionInsertRun::new(
        Run::new(pid(&[(1, 1)]), "12345678").unwrap(),
    ))
    .to_bytes();
    out.push(seed(
        "client-run-over-items",
        limited(false, 4000, 7, 15, &[2]),
        long_run.to_vec(),
        0,
        Some("too_many_items"),
    ));
    let mut wide = RangeListBuilder::new();
    wide.push(&pid(&[(1, 1)]), 4).unwrap();
    wide.push(&pid(&[(9, 1)]), 4).unwrap();
    let wide = ServerFrame::DocResponseRuns(DocResponseRuns {
        doc: 1,
        name: DocName::default(),
        inserts: ItemList::default(),
        deletes: wide.finish(),
    })
    .to_bytes();
    out.push(seed(
        "server-ranges-over-items",
        limited(true, 4000, 7, 15, &[5]),
        wide.to_vec(),
        0,
        Some("too_many_items"),
    ));
    // A name whose terminator lies past the frame limit: frame_too_large,
    // however the bytes arrive (and whatever the name holds).
    out.push(seed(
        "client-rename-past-limit",
        limited(false, 2, 7, 15, &[1]),
        vec![67, 0xff, b'\n'],
        0,
        Some("frame_too_large"),
    ));
    out.push(seed(
        "server-doc-response-name-past-limit",
        limited(true, 20, 7, 15, &[]),
        doc_response.to_vec(),
        0,
        Some("frame_too_large"),
    ));
    out
}

#[test]
fn seeds_decode_as_intended() {
    for s in seeds() {
        let (frames, error) = if s.cfg.server {
            let o: Outcome<ServerFrame> = feed(s.cfg.limits, &s.stream, &s.cfg.pieces);
            (o.frames.len(), o.error)
        } else {
            let o: Outcome<ClientFrame> = feed(s.cfg.limits, &s.stream, &s.cfg.pieces);
            (o.frames.len(), o.error)
        };
        assert_eq!((frames, error), (s.frames, s.error), "seed {}", s.name);
        decode_target(&s.bytes());
    }
}

#[test]
fn seeds_are_checked_in() {
    let dir = fuzz_dir().join("corpus/decode");
    for s in seeds() {
        let path = dir.join(format!("seed-{}", s.name));
        let on_disk = std::fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == s.bytes(),
            "{} is missing or stale; regenerate with \
             `cargo test -p notesync-protocol --test fuzz_corpus -- --ignored write_seeds`",
            path.display()
        );
    }
}

#[test]
#[ignore = "writes fuzz/corpus/decode/seed-*"]
fn write_seeds() {
    let dir = fuzz_dir().join("corpus/decode");
    std::fs::create_dir_all(&dir).unwrap();
    for s in seeds() {
        std::fs::write(dir.join(format!("seed-{}", s.name)), s.bytes()).unwrap();
    }
}

/// A stable stand-in for a fuzz run over the version-3 and version-4
/// frames: every such seed with bytes flipped, inserted and dropped at
/// pseudo-random places (a fixed xorshift, so it is reproducible), through
/// the same `decode_target` the fuzzer calls.
#[test]
fn mutated_version_3_and_4_seeds_hold() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let v3 = [
        header::SYNC_DOC_UPSERT_RUNS,
        header::SYNC_DOC_RESPONSE_RUNS,
        header::SESSION_INSERT_RUN,
        header::SESSION_DELETE_RANGE,
        header::FEED_SUBSCRIBE,
        header::FEED_CHANGES,
        header::FEED_HEARTBEAT,
    ];
    let mut runs = 0;
    for s in seeds() {
        if !s.stream.first().is_some_and(|h| v3.contains(h)) {
            continue;
        }
        let base = s.bytes();
        for _ in 0..2000 {
            let mut data = base.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % data.len();
                match next() % 3 {
                    0 => data[at] ^= 1 << (next() % 8),
                    1 => data.insert(at, next() as u8),
                    _ if data.len() > 2 => {
                        data.remove(at);
                    }
                    _ => {}
                }
            }
            decode_target(&data);
            runs += 1;
        }
    }
    assert!(runs >= 6 * 2000, "only {runs} mutated inputs");
}
