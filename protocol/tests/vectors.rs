//! The golden vectors (`tests/vectors/frames.txt`), and the checks that keep
//! PROTOCOL.md, the vectors and the code in sync.
//!
//! - Every `ok` vector decodes (all at once and one byte at a time) to
//!   exactly one frame equal to the value written out below, re-encodes to
//!   the same bytes, and every strict prefix of it is `truncated` at end of
//!   stream.
//! - Every `err` vector fails with its `DecodeError::kind()` and error code.
//! - PROTOCOL.md's frame diagrams (headers, directions, fields), error table
//!   and limits agree with the decoder, `ErrorCode` and `Limits::default()`,
//!   and every header of each direction has an `ok` vector.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;

use bytes::BytesMut;
use notesync_protocol::vectors::{Dir, Expect, FRAMES, Vector, parse_vectors};
use notesync_protocol::*;

const SPEC: &str = include_str!("../../PROTOCOL.md");

/// The vectors file, parsed.
fn vectors() -> Vec<Vector> {
    parse_vectors(FRAMES).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------
// The values the ok vectors stand for, written from their descriptions
// ---------------------------------------------------------------------------

const D: u128 = 0x0123456789abcdef_fedcba9876543210;
const R: u128 = 0x00112233445566778899aabbccddeeff;
const T: u64 = 1_700_000_000_000_000;

/// A pid from `(site, ident)` levels, in wire order.
fn pid(levels: &[(u8, u32)]) -> Pid {
    let levels: Vec<Level> = levels
        .iter()
        .map(|&(site, ident)| Level { site, ident })
        .collect();
    Pid::from_levels(&levels)
}

/// `n` copies of `(site, ident)`, then `last`.
fn deep(n: usize, level: (u8, u32), last: (u8, u32)) -> Vec<(u8, u32)> {
    let mut l = vec![level; n];
    l.push(last);
    l
}

fn atom(data: &str, levels: &[(u8, u32)]) -> Atom {
    Atom::new(data, pid(levels)).unwrap()
}

fn pids(list: &[&[(u8, u32)]]) -> PidList {
    let mut b = PidListBuilder::new();
    for levels in list {
        b.push(&pid(levels)).unwrap();
    }
    b.finish()
}

fn name(s: &str) -> DocName {
    DocName::new(s).unwrap()
}

fn insert(site: u8, data: &str, levels: &[(u8, u32)]) -> SessionInsert {
    SessionInsert {
        site,
        atom: atom(data, levels),
    }
}

fn delete(site: u8, levels: &[(u8, u32)]) -> SessionDelete {
    SessionDelete {
        site,
        pid: pid(levels),
    }
}

/// A version-3 item: an atom or a run.
enum It<'a> {
    A(&'a str, &'a [(u8, u32)]),
    R(&'a [(u8, u32)], &'a str),
}

fn items(list: &[It<'_>]) -> ItemList {
    let mut b = ItemListBuilder::new();
    for i in list {
        match i {
            It::A(data, levels) => b.push_atom(data, &pid(levels)).unwrap(),
            It::R(levels, text) => b.push_run(&pid(levels), text).unwrap(),
        }
    }
    b.finish()
}

fn ranges(list: &[(&[(u8, u32)], u16)]) -> RangeList {
    let mut b = RangeListBuilder::new();
    for (levels, count) in list {
        b.push(&pid(levels), *count).unwrap();
    }
    b.finish()
}

fn insert_run(site: u8, levels: &[(u8, u32)], text: &str) -> SessionInsertRun {
    SessionInsertRun {
        site,
        run: Run::new(pid(levels), text).unwrap(),
    }
}

fn delete_range(site: u8, levels: &[(u8, u32)], count: u16) -> SessionDeleteRange {
    SessionDeleteRange {
        site,
        range: IdRange::new(pid(levels), count).unwrap(),
    }
}

fn hello(version: u8, token: &[u8]) -> ClientFrame {
    ClientFrame::Hello(Hello {
        version,
        replica: R,
        token: bytes::Bytes::copy_from_slice(token),
    })
}

fn error(code: ErrorCode, message: &str) -> ServerFrame {
    ServerFrame::Error(ErrorFrame {
        code,
        message: message.to_owned(),
    })
}

fn expected_client() -> Vec<(&'static str, ClientFrame)> {
    use ClientFrame::*;
    let upsert = |name_: &str, since, inserts: Vec<Atom>, deletes| {
        ClientFrame::Upsert(notesync_protocol::Upsert {
            doc: D,
            name: name(name_),
            since,
            inserts: inserts.into_iter().collect(),
            deletes,
        })
    };
    vec![
        ("synclist.never", Synclist { since: 0 }),
        ("synclist.since_t", Synclist { since: T }),
        ("synclist.max_time", Synclist { since: u64::MAX }),
        ("pull.since_t", Pull { doc: D, since: T }),
        ("pull.never", Pull { doc: 1, since: 0 }),
        ("upsert.empty", upsert("", 0, vec![], pids(&[]))),
        (
            "upsert.full",
            upsert(
                "Groceries",
                T,
                vec![atom("milk", &[(1, 1)]), atom("é", &[(0, 0), (1, 2)])],
                pids(&[&[(2, 7)]]),
            ),
        ),
        (
            "upsert.name_255",
            upsert(&"a".repeat(255), 0, vec![], pids(&[])),
        ),
        (
            "upsert.name_255_multibyte",
            upsert(&("é".repeat(127) + "a"), 0, vec![], pids(&[])),
        ),
        (
            "upsert.deletes_only_deep",
            upsert(
                "tasks",
                1,
                vec![],
                pids(&[&[(5, u32::MAX)], &deep(63, (0, 0), (5, 1))]),
            ),
        ),
        ("session_start.since_t", SessionStart { since: T, doc: D }),
        ("session_start.new", SessionStart { since: 0, doc: 2 }),
        ("insert.simple", Insert(insert(1, "x", &[(1, 0)]))),
        (
            "insert.emoji_depth3",
            Insert(insert(5, "🎉", &[(0, 1), (0, 0), (5, 9)])),
        ),
        (
            "insert.atom_255",
            Insert(insert(7, &"b".repeat(255), &[(7, 1)])),
        ),
        (
            "insert.depth_64",
            Insert(insert(3, "z", &deep(63, (3, 5), (3, 6)))),
        ),
        (
            "insert.site_255",
            Insert(insert(255, "x", &[(255, u32::MAX)])),
        ),
        ("delete.simple", Delete(delete(2, &[(2, 7)]))),
        ("delete.site_0", Delete(delete(0, &[(2, 7)]))),
        ("delete.other_site", Delete(delete(2, &[(0, 0), (1, 9)]))),
        ("rename.simple", Rename(name("New name"))),
        ("rename.empty", Rename(name(""))),
        ("rename.multibyte", Rename(name("Ünïcode 🎉"))),
        ("hello.no_token", hello(1, b"")),
        ("hello.token", hello(1, b"secret")),
        ("hello.token_255_binary", hello(1, &[0xff; 255])),
        ("hello.version_2", hello(2, b"")),
        ("hello.version_9", hello(9, b"")),
        ("doc_delete.d", DeleteDoc { doc: D }),
        ("doc_delete.max", DeleteDoc { doc: u128::MAX }),
        ("hello.version_3", hello(3, b"")),
        ("hello.version_4", hello(4, b"")),
        ("feed_subscribe.never", Subscribe { since: 0 }),
        ("feed_subscribe.since_t", Subscribe { since: T }),
        (
            "upsert_runs.empty",
            UpsertRuns(notesync_protocol::UpsertRuns {
                doc: D,
                name: name(""),
                since: 0,
                inserts: items(&[]),
                deletes: ranges(&[]),
            }),
        ),
        (
            "upsert_runs.full",
            UpsertRuns(notesync_protocol::UpsertRuns {
                doc: D,
                name: name("Notes"),
                since: T,
                inserts: items(&[
                    It::R(&[(1, 100)], "hello"),
                    It::A("é!", &[(1, 5)]),
                    It::R(&[(0, 0), (1, 7)], "ab"),
                ]),
                deletes: ranges(&[(&[(1, 200)], 3)]),
            }),
        ),
        (
            "session_insert_run.hello",
            InsertRun(insert_run(1, &[(1, 100)], "hello")),
        ),
        (
            "session_insert_run.multibyte_to_max",
            InsertRun(insert_run(2, &[(0, 1), (2, u32::MAX - 1)], "é€")),
        ),
        (
            "session_delete_range.one",
            DeleteRange(delete_range(2, &[(1, 7)], 1)),
        ),
        (
            "session_delete_range.no_site_to_max",
            DeleteRange(delete_range(0, &[(5, u32::MAX - 15)], 16)),
        ),
    ]
}

fn expected_server() -> Vec<(&'static str, ServerFrame)> {
    use ServerFrame::*;
    let response = |name_: &str, inserts: Vec<Atom>, deletes| {
        DocResponse(notesync_protocol::DocResponse {
            doc: D,
            name: name(name_),
            inserts: inserts.into_iter().collect(),
            deletes,
        })
    };
    vec![
        (
            "synclist_response.empty",
            SynclistResponse(vec![].into_iter().collect()),
        ),
        (
            "feed_changes.empty",
            FeedChanges(vec![].into_iter().collect()),
        ),
        (
            "feed_changes.two",
            FeedChanges(
                [
                    FeedEntry {
                        time: T,
                        doc: D,
                        deleted: false,
                    },
                    FeedEntry {
                        time: T + 1,
                        doc: R,
                        deleted: true,
                    },
                ]
                .into_iter()
                .collect(),
            ),
        ),
        ("feed_heartbeat.t", FeedHeartbeat { time: T }),
        (
            "synclist_response.two",
            SynclistResponse(
                [
                    SyncEntry {
                        modified: T,
                        doc: D,
                    },
                    SyncEntry {
                        modified: T + 1,
                        doc: R,
                    },
                ]
                .into_iter()
                .collect(),
            ),
        ),
        ("doc_response.empty", response("", vec![], pids(&[]))),
        (
            "doc_response.full",
            response(
                "Groceries",
                vec![atom("milk", &[(1, 1)]), atom("dépôt", &[(0, 0), (2, 3)])],
                pids(&[&[(2, 7)]]),
            ),
        ),
        (
            "doc_response.deep_atom",
            response(
                "tasks",
                vec![atom("z", &deep(63, (3, 5), (3, 6)))],
                pids(&[]),
            ),
        ),
        (
            "doc_sync.site_3",
            DocSync {
                doc: D,
                sync_time: T + 1,
                site: 3,
            },
        ),
        (
            "doc_sync.site_0",
            DocSync {
                doc: D,
                sync_time: T + 1,
                site: 0,
            },
        ),
        ("insert.relayed", Insert(insert(1, "x", &[(1, 0)]))),
        (
            "insert.relayed_emoji_depth3",
            Insert(insert(5, "🎉", &[(0, 1), (0, 0), (5, 9)])),
        ),
        ("delete.relayed", Delete(delete(2, &[(2, 7)]))),
        ("delete.relayed_site_0", Delete(delete(0, &[(2, 7)]))),
        ("rename.relayed", Rename(name("Renamed"))),
        ("rename.relayed_255", Rename(name(&"a".repeat(255)))),
        (
            "session_started.site_3",
            SessionStarted {
                session_id: 42,
                site: 3,
                sync_time: T,
            },
        ),
        (
            "session_started.site_0",
            SessionStarted {
                session_id: 1,
                site: 0,
                sync_time: T,
            },
        ),
        ("session_ack.three", SessionAck { count: 3 }),
        ("session_ack.zero", SessionAck { count: 0 }),
        (
            "welcome",
            Welcome {
                version: 1,
                server_time: T,
            },
        ),
        (
            "welcome.version_2",
            Welcome {
                version: 2,
                server_time: T + 1,
            },
        ),
        (
            "doc_deleted.t",
            DocDeleted {
                doc: D,
                deleted_time: T,
            },
        ),
        ("resync.d", Resync { doc: D }),
        (
            "welcome.version_3",
            Welcome {
                version: 3,
                server_time: T + 2,
            },
        ),
        (
            "doc_response_runs.empty",
            DocResponseRuns(notesync_protocol::DocResponseRuns {
                doc: D,
                name: name(""),
                inserts: items(&[]),
                deletes: ranges(&[]),
            }),
        ),
        (
            "doc_response_runs.full",
            DocResponseRuns(notesync_protocol::DocResponseRuns {
                doc: D,
                name: name("Notes"),
                inserts: items(&[It::R(&[(1, 1)], "hi"), It::A("xyz", &[(1, 9)])]),
                deletes: ranges(&[(&[(2, 3)], 5), (&[(1, 1), (2, 0)], 1)]),
            }),
        ),
        (
            "session_insert_run.relayed",
            InsertRun(insert_run(3, &[(3, 10)], "A")),
        ),
        (
            "session_delete_range.relayed",
            DeleteRange(delete_range(0, &[(3, 10)], u16::MAX)),
        ),
        (
            "error.unknown_document",
            error(ErrorCode::UNKNOWN_DOCUMENT, "unknown document"),
        ),
        ("error.empty_message", error(ErrorCode::SHUTTING_DOWN, "")),
        ("error.unknown_code", error(ErrorCode(200), "")),
        (
            "error.multibyte",
            error(ErrorCode::LIMIT_EXCEEDED, "Ünïcode 🎉"),
        ),
    ]
}

// ---------------------------------------------------------------------------
// Checking the vectors
// ---------------------------------------------------------------------------

/// Err records above this size are not also fed one byte at a time (the
/// frame_too_large vector is 28 MB).
const BYTEWISE_LIMIT: usize = 64 * 1024;

fn check_ok<F: Frame + PartialEq + Debug>(v: &Vector, expected: &F) {
    let at = v.at();
    let wire = &v.bytes[..];

    // All at once: exactly one frame, every byte consumed.
    let mut dec = FrameDecoder::<F>::default();
    let mut buf = BytesMut::from(wire);
    let frame = match dec.decode(&mut buf) {
        Ok(Some(f)) => f,
        other => panic!("{at}: expected one frame, got {other:?}"),
    };
    assert!(
        buf.is_empty() && !dec.is_mid_frame(),
        "{at}: {} bytes left after the frame",
        buf.len()
    );
    assert!(
        matches!(dec.decode_eof(&mut buf), Ok(None)),
        "{at}: more than one frame"
    );
    assert_eq!(&frame, expected, "{at}: decoded value differs");

    // Re-encoding gives the same bytes.
    let mut out = BytesMut::new();
    frame.encode(&mut out);
    assert_eq!(&out[..], wire, "{at}: re-encoding differs");

    // One byte at a time: nothing until the last byte, then the same frame.
    let mut dec = FrameDecoder::<F>::default();
    let mut buf = BytesMut::new();
    for (i, &b) in wire.iter().enumerate() {
        buf.extend_from_slice(&[b]);
        let last = i + 1 == wire.len();
        match dec.decode(&mut buf) {
            Ok(None) if !last => {}
            Ok(Some(f)) if last => assert_eq!(f, frame, "{at}: byte-at-a-time frame differs"),
            other => panic!("{at}: byte-at-a-time, after byte {}: {other:?}", i + 1),
        }
    }
    assert!(
        buf.is_empty() && !dec.is_mid_frame(),
        "{at}: byte-at-a-time left bytes"
    );

    // Every strict prefix is a frame cut short: truncated at end of stream.
    for k in 1..wire.len() {
        let mut dec = FrameDecoder::<F>::default();
        let mut buf = BytesMut::from(&wire[..k]);
        assert!(
            matches!(dec.decode(&mut buf), Ok(None)),
            "{at}: the first {k} bytes do not wait for more"
        );
        match dec.decode_eof(&mut buf) {
            Err(DecodeError::Truncated { pending }) if pending == k => {}
            other => panic!("{at}: the first {k} bytes at EOF: {other:?}"),
        }
    }
}

fn check_err<F: Frame + Debug>(v: &Vector, kind: &str, code: &str) {
    let at = v.at();
    let check = |e: &DecodeError, how: &str| {
        assert_eq!(e.kind(), kind, "{at} ({how}): wrong error: {e}");
        assert_eq!(e.code().name(), code, "{at} ({how}): wrong error code: {e}");
    };
    let truncated = kind == "truncated";

    let mut dec = FrameDecoder::<F>::default();
    let mut buf = BytesMut::from(&v.bytes[..]);
    match dec.decode(&mut buf) {
        Err(e) if !truncated => check(&e, "all at once"),
        Ok(None) if truncated => match dec.decode_eof(&mut buf) {
            Err(e) => check(&e, "all at once, at EOF"),
            other => panic!("{at}: expected an error at EOF, got {other:?}"),
        },
        other => panic!("{at}: expected err {kind} from decode, got {other:?}"),
    }

    if v.bytes.len() > BYTEWISE_LIMIT {
        return;
    }
    let mut dec = FrameDecoder::<F>::default();
    let mut buf = BytesMut::new();
    for (i, &b) in v.bytes.iter().enumerate() {
        buf.extend_from_slice(&[b]);
        match dec.decode(&mut buf) {
            Ok(None) => {}
            Err(e) if !truncated => {
                return check(&e, &format!("byte {} of a byte at a time", i + 1));
            }
            other => panic!("{at}: byte-at-a-time, after byte {}: {other:?}", i + 1),
        }
    }
    assert!(truncated, "{at}: byte-at-a-time never failed");
    match dec.decode_eof(&mut buf) {
        Err(e) => check(&e, "byte at a time, at EOF"),
        other => panic!("{at}: byte-at-a-time, expected an error at EOF, got {other:?}"),
    }
}

fn check_vectors<F: Frame + PartialEq + Debug>(dir: Dir, expected: Vec<(&'static str, F)>) {
    let vectors = vectors();
    let mut expected: HashMap<&str, F> = expected.into_iter().collect();
    let mut checked = 0;
    for v in vectors.iter().filter(|v| v.dir == dir) {
        match &v.expect {
            Expect::Ok => {
                let value = expected
                    .remove(v.name.as_str())
                    .unwrap_or_else(|| panic!("{}: no expected value in vectors.rs", v.at()));
                check_ok(v, &value);
            }
            Expect::Err { kind, code } => check_err::<F>(v, kind, code),
        }
        checked += 1;
    }
    let stale: BTreeSet<&str> = expected.keys().copied().collect();
    assert!(
        stale.is_empty(),
        "expected values with no {dir:?} ok vector: {stale:?}"
    );
    assert!(checked > 0);
}

#[test]
fn client_to_server_vectors() {
    check_vectors(Dir::C2s, expected_client());
}

#[test]
fn server_to_client_vectors() {
    check_vectors(Dir::S2c, expected_server());
}

/// The malformed cases PROTOCOL.md names each have a vector.
#[test]
fn every_decode_error_kind_has_a_vector() {
    let vectors = vectors();
    let kinds: BTreeSet<&str> = vectors
        .iter()
        .filter_map(|v| match &v.expect {
            Expect::Err { kind, .. } => Some(kind.as_str()),
            Expect::Ok => None,
        })
        .collect();
    let all = [
        "unknown_header",
        "frame_too_large",
        "too_many_items",
        "empty_atom",
        "zero_depth",
        "depth_limit",
        "reserved_site",
        "invalid_utf8",
        "name_too_long",
        "insert_site_mismatch",
        "empty_run",
        "empty_range",
        "ident_overflow",
        "bad_item_kind",
        "bad_feed_flags",
        "truncated",
    ];
    assert_eq!(kinds, all.into_iter().collect::<BTreeSet<_>>());
}

// ---------------------------------------------------------------------------
// PROTOCOL.md
// ---------------------------------------------------------------------------

/// The lines of the section that starts at the heading line `heading`, up
/// to the next heading of the same or a higher level (code blocks skipped).
fn section<'a>(heading: &str) -> Vec<(usize, &'a str)> {
    let level = heading.chars().take_while(|&c| c == '#').count();
    let mut lines = SPEC.lines().enumerate().map(|(i, l)| (i + 1, l));
    lines
        .by_ref()
        .find(|(_, l)| l.trim_end() == heading)
        .unwrap_or_else(|| panic!("PROTOCOL.md has no heading `{heading}`"));
    let mut out = Vec::new();
    let mut in_code = false;
    for (n, l) in lines {
        if l.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && l.starts_with('#') {
            let l_level = l.chars().take_while(|&c| c == '#').count();
            if l_level <= level {
                break;
            }
        }
        out.push((n, l));
    }
    out
}

/// The cells of a `| a | b |` line, trimmed.
fn cells(line: &str) -> Vec<&str> {
    let line = line.trim();
    let inner = line
        .strip_prefix('|')
        .and_then(|l| l.strip_suffix('|'))
        .unwrap_or_else(|| panic!("not a table or box line: {line}"));
    inner.split('|').map(str::trim).collect()
}

#[derive(Debug)]
struct SpecFrame {
    line: usize,
    name: String,
    dirs: BTreeSet<Dir>,
    fields: Vec<Field>,
}

/// The fields of a frame diagram's box, after the header cell.
fn spec_fields(line: usize, cells: &[&str]) -> Vec<Field> {
    let squash = |s: &str| s.split_whitespace().collect::<String>();
    let mut out = Vec::new();
    let mut i = 0;
    while i < cells.len() {
        let cell = cells[i];
        let next = cells.get(i + 1).copied().unwrap_or("");
        let (field, used) = if cell == "u64 count" && next.starts_with("count x") {
            // The entry layout: time first, then document (as the seed has it).
            assert_eq!(
                squash(next),
                "countx(u64modified,u128document_id)",
                "PROTOCOL.md line {line}: synclist entry layout"
            );
            (Field::EntrySeq, 2)
        } else if cell == "u8 token_len" && next == "token bytes" {
            (Field::Token, 2)
        } else if cell == "u16 message_len" && next == "message (UTF-8)" {
            (Field::Message, 2)
        } else {
            let f = match cell {
                "name ..0A" => Field::Name,
                "list<atom>" => Field::AtomSeq,
                "list<pid>" => Field::PidSeq,
                "list<item>" => Field::ItemSeq,
                "list<range>" => Field::RangeSeq,
                "list<change>" => Field::FeedSeq,
                "run" => Field::OneRun,
                "range" => Field::OneRange,
                "atom" => Field::OneAtom,
                "pid" => Field::OnePid,
                c if c.starts_with("u8 ") => Field::U8,
                c if c.starts_with("u64 ") => Field::U64,
                c if c.starts_with("u128 ") => Field::U128,
                c => panic!("PROTOCOL.md line {line}: unknown field `{c}`"),
            };
            (f, 1)
        };
        out.push(field);
        i += used;
    }
    out
}

/// Section 2.3's diagrams, by header: a title line such as
/// `65 session_insert (C and S, session mode)`, then a box whose first cell
/// is the header in hex.
fn spec_frames() -> BTreeMap<u8, SpecFrame> {
    let lines = section("### 2.3 Frames");
    let mut frames = BTreeMap::new();
    for (idx, &(n, l)) in lines.iter().enumerate() {
        let mut words = l.splitn(3, ' ');
        let (Some(num), Some(name), Some(rest)) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        let Ok(header) = num.parse::<u8>() else {
            continue;
        };
        let Some(paren) = rest.strip_prefix('(') else {
            continue;
        };
        let paren = &paren[..paren
            .find(')')
            .unwrap_or_else(|| panic!("PROTOCOL.md line {n}: no `)`"))];
        let dirs: BTreeSet<Dir> = match paren.split(',').next().unwrap().trim() {
            "C" => [Dir::C2s].into(),
            "S" => [Dir::S2c].into(),
            "C and S" => [Dir::C2s, Dir::S2c].into(),
            d => panic!("PROTOCOL.md line {n}: unknown direction `{d}`"),
        };
        let &(bn, box_line) = lines[idx + 1..]
            .iter()
            .find(|(_, l)| l.starts_with('|'))
            .unwrap_or_else(|| panic!("PROTOCOL.md line {n}: no box"));
        // Anything after the box's last `|` is a note.
        let cells = cells(&box_line[..=box_line.rfind('|').unwrap()]);
        assert_eq!(
            u8::from_str_radix(cells[0], 16).ok(),
            Some(header),
            "PROTOCOL.md line {bn}: the box's header cell is not {header:02X}"
        );
        let frame = SpecFrame {
            line: n,
            name: name.to_owned(),
            dirs,
            fields: spec_fields(bn, &cells[1..]),
        };
        if let Some(old) = frames.insert(header, frame) {
            panic!(
                "PROTOCOL.md line {n}: header {header} already at line {}",
                old.line
            );
        }
    }
    assert!(
        frames.len() >= 10,
        "found only {} frame diagrams",
        frames.len()
    );
    frames
}

fn layout(dir: Dir, h: u8) -> Option<&'static [Field]> {
    match dir {
        Dir::C2s => <ClientFrame as Frame>::layout(h),
        Dir::S2c => <ServerFrame as Frame>::layout(h),
    }
}

/// Every header the decoders accept is in PROTOCOL.md with the same
/// directions and fields, and every diagram is accepted by the decoders.
#[test]
fn spec_frames_match_the_decoders() {
    let spec = spec_frames();
    for h in 0..=255u8 {
        let code: BTreeSet<Dir> = [Dir::C2s, Dir::S2c]
            .into_iter()
            .filter(|&d| layout(d, h).is_some())
            .collect();
        let documented = spec.get(&h).map(|f| f.dirs.clone()).unwrap_or_default();
        assert_eq!(
            code, documented,
            "header {h}: directions the decoders accept vs PROTOCOL.md 2.3"
        );
        assert!(h < 128 || code.is_empty(), "header {h} is reserved");
    }
    for (h, f) in &spec {
        for &d in &f.dirs {
            // Site: a u8 that must not be 0 (65's site); the vectors check it.
            let code: Vec<Field> = layout(d, *h)
                .unwrap()
                .iter()
                .map(|&x| if x == Field::Site { Field::U8 } else { x })
                .collect();
            assert_eq!(
                code, f.fields,
                "{h} {} ({d:?}): decoder layout vs PROTOCOL.md line {}",
                f.name, f.line
            );
        }
    }
}

/// 0x15 and 0x16 are no frame in either direction (PROTOCOL.md 2.1), the
/// `tls` vectors are exactly the ones that look like TLS records, and no
/// ok vector does.
#[test]
fn tls_record_bytes_are_never_frames() {
    for dir in [Dir::C2s, Dir::S2c] {
        for h in [header::TLS_ALERT, header::TLS_HANDSHAKE] {
            assert!(layout(dir, h).is_none(), "header {h} is reserved ({dir:?})");
        }
    }
    let vectors = vectors();
    let tls: Vec<&Vector> = vectors
        .iter()
        .filter(|v| is_tls_record_start(&v.bytes))
        .collect();
    assert_eq!(
        tls.len(),
        4,
        "{:?}",
        tls.iter().map(|v| v.at()).collect::<Vec<_>>()
    );
    for v in tls {
        assert!(v.name.contains("tls"), "{}", v.at());
        assert!(matches!(v.expect, Expect::Err { .. }), "{}", v.at());
    }
    // The byte alone, or a version that is no TLS version, is not a record.
    assert!(!is_tls_record_start(&[header::TLS_ALERT]));
    assert!(!is_tls_record_start(&[header::TLS_HANDSHAKE, 3]));
    assert!(!is_tls_record_start(&[header::TLS_HANDSHAKE, 2, 0]));
    assert!(!is_tls_record_start(&[header::TLS_ALERT, 3, 5]));
    assert!(!is_tls_record_start(&[header::ERROR, 3, 3]));
}

/// Every header of each direction has at least one ok vector.
#[test]
fn every_header_has_an_ok_vector() {
    let vectors = vectors();
    let covered: BTreeSet<(Dir, u8)> = vectors
        .iter()
        .filter(|v| matches!(v.expect, Expect::Ok))
        .map(|v| (v.dir, v.bytes[0]))
        .collect();
    let spec = spec_frames();
    let mut missing = Vec::new();
    for dir in [Dir::C2s, Dir::S2c] {
        for h in 0..=255u8 {
            let accepted = layout(dir, h).is_some();
            let documented = spec.get(&h).is_some_and(|f| f.dirs.contains(&dir));
            if (accepted || documented) && !covered.contains(&(dir, h)) {
                missing.push((dir, h));
            }
        }
    }
    assert!(missing.is_empty(), "headers with no ok vector: {missing:?}");
}

/// Section 4's table equals `ErrorCode::ALL`: number, name, closes.
#[test]
fn spec_error_table_matches_error_codes() {
    let mut spec = BTreeMap::new();
    for (n, l) in section("## 4. Errors") {
        if !l.starts_with('|') {
            continue;
        }
        let c = cells(l);
        let Ok(code) = c[0].parse::<u8>() else {
            continue;
        };
        assert_eq!(c.len(), 4, "PROTOCOL.md line {n}: expected 4 cells");
        let name = c[1]
            .strip_prefix('`')
            .and_then(|s| s.strip_suffix('`'))
            .unwrap_or_else(|| panic!("PROTOCOL.md line {n}: name not in backticks"));
        let closes = match c[2] {
            "yes" => true,
            "no" => false,
            x => panic!("PROTOCOL.md line {n}: closes is `{x}`, not yes or no"),
        };
        assert!(
            spec.insert(code, (name.to_owned(), closes)).is_none(),
            "PROTOCOL.md line {n}: code {code} listed twice"
        );
    }
    let mut code = BTreeMap::new();
    for e in ErrorCode::ALL {
        assert!(
            code.insert(e.0, (e.name().to_owned(), e.closes_connection()))
                .is_none(),
            "ErrorCode::ALL lists {e:?} twice"
        );
    }
    for (c, (name, closes)) in &code {
        assert_eq!(
            Some(&(name.clone(), *closes)),
            spec.get(c),
            "error code {c}: (name, closes) in the code vs PROTOCOL.md section 4"
        );
    }
    assert_eq!(
        spec.keys().collect::<Vec<_>>(),
        code.keys().collect::<Vec<_>>(),
        "codes in PROTOCOL.md section 4 vs ErrorCode::ALL"
    );
    // "A client that receives an unknown code treats it as closing."
    for c in 0..=255u8 {
        if !code.contains_key(&c) {
            assert!(ErrorCode(c).closes_connection(), "unknown code {c}");
        }
    }
}

/// The leading number of a cell such as `33,554,432 (32 MiB)`.
fn number(cell: &str) -> u64 {
    let digits: String = cell
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(|c| *c != ',')
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number in `{cell}`"))
}

/// Section 5's table states `Limits::default()` and the wire maxima.
#[test]
fn spec_limits_match_the_defaults() {
    let rows: HashMap<String, String> = section("## 5. Limits")
        .into_iter()
        .filter(|(_, l)| l.starts_with('|'))
        .map(|(_, l)| {
            let c = cells(l);
            (c[0].trim_matches('`').to_owned(), c[1].to_owned())
        })
        .collect();
    let row = |k: &str| {
        rows.get(k)
            .unwrap_or_else(|| panic!("PROTOCOL.md section 5 has no `{k}` row"))
            .as_str()
    };
    let d = Limits::default();
    assert_eq!(
        number(row("max_frame_bytes")),
        d.max_frame_bytes as u64,
        "max_frame_bytes"
    );
    assert_eq!(
        number(row("max_items_per_frame")),
        d.max_items_per_frame,
        "max_items_per_frame"
    );
    assert_eq!(
        number(row("max_pid_depth")),
        u64::from(d.max_pid_depth),
        "max_pid_depth"
    );
    assert_eq!(number(row("name")), MAX_NAME_BYTES as u64, "name");
    assert_eq!(number(row("token")), MAX_TOKEN_BYTES as u64, "token");
    assert_eq!(
        number(row("error message")),
        u64::from(u16::MAX),
        "error message"
    );
    let (lo, hi) = row("atom data")
        .split_once("..")
        .expect("atom data is a range");
    assert_eq!(
        (number(lo), number(hi)),
        (1, MAX_ATOM_BYTES as u64),
        "atom data"
    );
}
