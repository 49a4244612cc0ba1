//! The decoder's fuzz target as a plain function, shared by the cargo-fuzz
//! crate (`fuzz/`, target `decode`) and a stable test
//! (`tests/fuzz_corpus.rs`) that replays the checked-in corpus.
//!
//! Only built with the non-default `fuzzing` feature.
//!
//! # Input layout
//!
//! ```text
//! byte 0        flags: bit 0 = direction (0: client frames, 1: server frames)
//!                      bit 1 = small max_frame_bytes follows
//!                      bit 2 = small max_items_per_frame and max_pid_depth follow
//! [bit 1]       u16 BE: max_frame_bytes = value % 4096
//! [bit 2]       u8: max_items_per_frame = value % 8; u8: max_pid_depth = value % 16
//! next byte     n = value % 8: how many piece sizes follow
//! n bytes       piece sizes, each value + 1 (1..=256), used cyclically;
//!               n = 0 feeds the stream in one piece
//! rest          the byte stream
//! ```
//!
//! # What is checked
//!
//! - Nothing panics.
//! - Every decoded frame re-encodes (`to_bytes`) to exactly the bytes it
//!   was decoded from, is at most `max_frame_bytes` long, and its parts
//!   satisfy the value invariants and the limits (lists are walked item by
//!   item and rebuilt, ids and atoms are rebuilt through the checked
//!   constructors).
//! - Feeding the stream in pieces yields the same frames, at the same
//!   offsets, and the same final error kind (`DecodeError::kind`) as
//!   feeding it all at once.
//! - While a frame is partial (`Ok(None)`), the decoder holds fewer than
//!   `max_frame_bytes` bytes of it: a frame that cannot fit errs by the
//!   time `max_frame_bytes` of it have been fed (plus at most the piece
//!   that brought it there).
//! - With a small `max_frame_bytes`, decoding again with no frame limit
//!   agrees: the same frames up to the first error; a `frame_too_large`
//!   frame there either fails too (any kind, truncation included) or is
//!   longer than the limit; any other error is the same.

use std::fmt::Debug;
use std::ops::Range;

use bytes::{Bytes, BytesMut};

use crate::codec::{Frame, FrameDecoder, Limits};
use crate::frame::*;
use crate::pid::Pid;

/// The fuzz target: parses the configuration prefix of `data` (see the
/// module docs), then decodes the rest and asserts the properties above.
/// Panics when a property does not hold.
pub fn decode_target(data: &[u8]) {
    let Some((cfg, stream)) = Config::parse(data) else {
        return;
    };
    if cfg.server {
        check_stream::<ServerFrame>(&cfg, stream);
    } else {
        check_stream::<ClientFrame>(&cfg, stream);
    }
}

/// How the input asks the stream to be decoded.
#[derive(Debug, Clone)]
pub struct Config {
    /// Decode server frames (else client frames).
    pub server: bool,
    pub limits: Limits,
    /// Piece sizes, used cyclically; empty: one piece.
    pub pieces: Vec<usize>,
}

impl Config {
    /// Splits `data` into its configuration and the stream. `None` if the
    /// prefix is incomplete.
    pub fn parse(data: &[u8]) -> Option<(Config, &[u8])> {
        let (&flags, mut rest) = data.split_first()?;
        let mut limits = Limits::default();
        if flags & 2 != 0 {
            let (b, r) = rest.split_first_chunk::<2>()?;
            limits.max_frame_bytes = u16::from_be_bytes(*b) as usize % 4096;
            rest = r;
        }
        if flags & 4 != 0 {
            let (b, r) = rest.split_first_chunk::<2>()?;
            limits.max_items_per_frame = u64::from(b[0] % 8);
            limits.max_pid_depth = b[1] % 16;
            rest = r;
        }
        let (&n, r) = rest.split_first()?;
        let n = (n % 8) as usize;
        if r.len() < n {
            return None;
        }
        let (sizes, stream) = r.split_at(n);
        let cfg = Config {
            server: flags & 1 != 0,
            limits,
            pieces: sizes.iter().map(|&s| s as usize + 1).collect(),
        };
        Some((cfg, stream))
    }

    /// The prefix that [`parse`](Self::parse) reads back as `self`. Limits
    /// must be representable (small ones below 4096 / 8 / 16, or the
    /// defaults) and at most 7 pieces of 1..=256 bytes.
    pub fn prefix(&self) -> Vec<u8> {
        let d = Limits::default();
        let small_frame = self.limits.max_frame_bytes != d.max_frame_bytes;
        let small_items = self.limits.max_items_per_frame != d.max_items_per_frame
            || self.limits.max_pid_depth != d.max_pid_depth;
        let mut out =
            vec![u8::from(self.server) | u8::from(small_frame) << 1 | u8::from(small_items) << 2];
        if small_frame {
            assert!(self.limits.max_frame_bytes < 4096);
            out.extend_from_slice(&(self.limits.max_frame_bytes as u16).to_be_bytes());
        }
        if small_items {
            assert!(self.limits.max_items_per_frame < 8 && self.limits.max_pid_depth < 16);
            out.push(self.limits.max_items_per_frame as u8);
            out.push(self.limits.max_pid_depth);
        }
        assert!(self.pieces.len() < 8);
        out.push(self.pieces.len() as u8);
        for &p in &self.pieces {
            assert!((1..=256).contains(&p));
            out.push((p - 1) as u8);
        }
        out
    }
}

/// A decoded direction's frames, as the checks need them.
pub trait Checked: Frame + PartialEq + Debug {
    /// The frame's wire form.
    fn wire(&self) -> Bytes;
    /// Asserts the value invariants and the limits on the frame's parts.
    fn check_parts(&self, limits: &Limits);
}

impl Checked for ClientFrame {
    fn wire(&self) -> Bytes {
        self.to_bytes()
    }

    fn check_parts(&self, limits: &Limits) {
        match self {
            ClientFrame::Synclist { .. }
            | ClientFrame::Subscribe { .. }
            | ClientFrame::Pull { .. }
            | ClientFrame::DeleteDoc { .. }
            | ClientFrame::SessionStart { .. } => {}
            ClientFrame::Upsert(u) => {
                check_name(&u.name);
                check_atoms(&u.inserts, limits);
                check_pids(&u.deletes, limits);
            }
            ClientFrame::UpsertRuns(u) => {
                check_name(&u.name);
                check_items(&u.inserts, limits);
                check_ranges(&u.deletes, limits);
                check_expansion(&u.inserts, &u.deletes, &u.expand());
            }
            ClientFrame::Insert(i) => check_insert(i, limits),
            ClientFrame::Delete(d) => check_pid(&d.pid, limits),
            ClientFrame::InsertRun(i) => check_insert_run(i, limits),
            ClientFrame::DeleteRange(d) => check_range(&d.range, limits),
            ClientFrame::Rename(n) => check_name(n),
            ClientFrame::Hello(h) => {
                let again = Hello::new(h.replica, h.token.clone()).expect("token within 255 bytes");
                assert_eq!(again.token, h.token);
            }
        }
    }
}

impl Checked for ServerFrame {
    fn wire(&self) -> Bytes {
        self.to_bytes()
    }

    fn check_parts(&self, limits: &Limits) {
        match self {
            ServerFrame::SynclistResponse(e) => {
                assert!(e.len() as u64 <= limits.max_items_per_frame);
                let mut b = SyncEntriesBuilder::new();
                for entry in e {
                    b.push(entry);
                }
                assert_eq!(&b.finish(), e, "synclist entries rebuilt differ");
            }
            ServerFrame::FeedChanges(e) => {
                assert!(e.len() as u64 <= limits.max_items_per_frame);
                let rebuilt: FeedEntries = e.iter().collect();
                assert_eq!(&rebuilt, e, "feed entries rebuilt differ");
            }
            ServerFrame::DocResponse(r) => {
                check_name(&r.name);
                check_atoms(&r.inserts, limits);
                check_pids(&r.deletes, limits);
            }
            ServerFrame::DocResponseRuns(r) => {
                check_name(&r.name);
                check_items(&r.inserts, limits);
                check_ranges(&r.deletes, limits);
            }
            ServerFrame::Insert(i) => check_insert(i, limits),
            ServerFrame::Delete(d) => check_pid(&d.pid, limits),
            ServerFrame::InsertRun(i) => check_insert_run(i, limits),
            ServerFrame::DeleteRange(d) => check_range(&d.range, limits),
            ServerFrame::Rename(n) => check_name(n),
            ServerFrame::Error(e) => {
                let again = ErrorFrame::new(e.code, e.message.clone());
                assert_eq!(&again, e, "error message over 65,535 bytes");
            }
            ServerFrame::DocSync { .. }
            | ServerFrame::DocDeleted { .. }
            | ServerFrame::Resync { .. }
            | ServerFrame::SessionStarted { .. }
            | ServerFrame::SessionAck { .. }
            | ServerFrame::FeedHeartbeat { .. }
            | ServerFrame::Welcome { .. } => {}
        }
    }
}

fn check_name(n: &DocName) {
    let again = DocName::new(n.as_str()).expect("decoded name is a valid name");
    assert_eq!(&again, n);
}

fn check_pid(p: &Pid, limits: &Limits) {
    assert!((1..=limits.max_pid_depth as usize).contains(&p.depth()));
    assert_ne!(p.creator(), 0, "decoded id ends in site 0");
}

fn check_pid_wire(wire: &[u8], p: &Pid) {
    let mut again = Vec::new();
    p.write_wire(&mut again);
    assert_eq!(again, wire, "id wire form does not round-trip");
}

fn check_insert(i: &SessionInsert, limits: &Limits) {
    assert_eq!(
        i.site,
        i.atom.pid().creator(),
        "insert site is not the creator"
    );
    check_pid(i.atom.pid(), limits);
    let again = Atom::new(i.atom.data(), i.atom.pid().clone()).expect("decoded atom is valid");
    assert_eq!(again, i.atom);
}

fn check_atoms(list: &AtomList, limits: &Limits) {
    assert!(list.len() as u64 <= limits.max_items_per_frame);
    let mut b = AtomListBuilder::new();
    let mut n = 0;
    for a in list {
        let pid = a.pid.to_pid();
        check_pid(&pid, limits);
        check_pid_wire(a.pid.wire(), &pid);
        assert_eq!(a.pid.creator(), pid.creator());
        assert_eq!(a.pid.depth(), pid.depth());
        let owned = a.to_atom();
        assert_eq!(Atom::new(a.data, pid).as_ref(), Ok(&owned));
        b.push_ref(a);
        n += 1;
    }
    assert_eq!(n, list.len());
    assert_eq!(&b.finish(), list, "atom list rebuilt differs");
}

fn check_pids(list: &PidList, limits: &Limits) {
    assert!(list.len() as u64 <= limits.max_items_per_frame);
    let mut b = PidListBuilder::new();
    let mut n = 0;
    for p in list {
        let pid = p.to_pid();
        check_pid(&pid, limits);
        check_pid_wire(p.wire(), &pid);
        b.push(&pid).expect("decoded id is valid");
        n += 1;
    }
    assert_eq!(n, list.len());
    assert_eq!(&b.finish(), list, "pid list rebuilt differs");
}

fn check_run(r: &Run, limits: &Limits) {
    check_pid(r.first(), limits);
    let again = Run::new(r.first().clone(), r.text()).expect("decoded run is valid");
    assert_eq!(&again, r);
    let n = r.char_count() as u64;
    assert!(
        n <= limits.max_items_per_frame,
        "run over max_items_per_frame"
    );
    // Every char is a one-char atom at the next id, none overflowing.
    let mut count = 0u64;
    let mut prev: Option<Pid> = None;
    for (c, pid) in r.atoms() {
        assert_eq!(c.chars().count(), 1);
        Atom::new(c, pid.clone()).expect("a run's char is a valid atom");
        if let Some(p) = &prev {
            assert!(extends(p, 1, &pid) && *p < pid, "run ids do not step");
        }
        prev = Some(pid);
        count += 1;
    }
    assert_eq!(count, n);
}

fn check_range(r: &IdRange, limits: &Limits) {
    check_pid(r.first(), limits);
    assert_ne!(r.count(), 0);
    let again = IdRange::new(r.first().clone(), r.count()).expect("decoded range is valid");
    assert_eq!(&again, r);
    assert_eq!(r.ids().count(), r.count() as usize);
}

fn check_insert_run(i: &SessionInsertRun, limits: &Limits) {
    assert_eq!(
        i.site,
        i.run.first().creator(),
        "run site is not the creator"
    );
    check_run(&i.run, limits);
    assert_eq!(i.expand().count(), i.run.char_count());
}

fn check_items(list: &ItemList, limits: &Limits) {
    assert!(
        list.units() <= limits.max_items_per_frame,
        "items over the limit"
    );
    let mut b = ItemListBuilder::new();
    for item in list {
        match item {
            ItemRef::Atom(a) => {
                let pid = a.pid.to_pid();
                check_pid(&pid, limits);
                check_pid_wire(a.pid.wire(), &pid);
                b.push_atom(a.data, &pid).expect("decoded atom is valid");
            }
            ItemRef::Run(r) => {
                let run = r.to_run();
                check_pid_wire(r.first.wire(), run.first());
                check_run(&run, limits);
                b.push_run(run.first(), run.text())
                    .expect("decoded run is valid");
            }
        }
    }
    assert_eq!(&b.finish(), list, "item list rebuilt differs");
}

fn check_ranges(list: &RangeList, limits: &Limits) {
    assert!(
        list.units() <= limits.max_items_per_frame,
        "ranges over the limit"
    );
    let mut b = RangeListBuilder::new();
    for r in list {
        let range = r.to_range();
        check_pid_wire(r.first.wire(), range.first());
        check_range(&range, limits);
        b.push(range.first(), range.count())
            .expect("decoded range is valid");
    }
    assert_eq!(&b.finish(), list, "range list rebuilt differs");
}

/// The expanded upsert holds exactly the items' atoms and the ranges' ids.
fn check_expansion(items: &ItemList, ranges: &RangeList, up: &Upsert) {
    assert_eq!(up.inserts.len() as u64, items.units());
    assert_eq!(up.deletes.len() as u64, ranges.units());
    for ((d, p), a) in items.atoms().zip(up.inserts.iter()) {
        assert_eq!((d, p), (a.data, a.pid.to_pid()));
    }
    for (p, q) in ranges.ids().zip(up.deletes.iter()) {
        assert_eq!(p, q.to_pid());
    }
}

/// What decoding a stream produced.
#[derive(Debug)]
pub struct Outcome<F> {
    /// The frames and the stream ranges they were decoded from.
    pub frames: Vec<(F, Range<usize>)>,
    /// The kind of the error that ended decoding, if any.
    pub error: Option<&'static str>,
}

/// Decodes `stream` fed in `pieces` (cyclically; empty: one piece),
/// calling `decode` after each piece and `decode_eof` at the end, and
/// checks each frame and the bound on partial frames as it goes.
pub fn feed<F: Checked>(limits: Limits, stream: &[u8], pieces: &[usize]) -> Outcome<F> {
    let mut dec = FrameDecoder::<F>::new(limits);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    // Stream bytes handed to the decoder, and bytes of whole frames taken.
    let mut fed = 0;
    let mut taken = 0;
    let mut sizes = pieces.iter().cycle();
    let mut take = |f: F, buf: &BytesMut, fed: usize, taken: &mut usize| {
        let end = fed - buf.len();
        let range = *taken..end;
        assert!(range.start < range.end, "a frame of no bytes");
        check_frame(&f, &stream[range.clone()], &limits);
        frames.push((f, range));
        *taken = end;
    };
    while fed < stream.len() {
        let n = sizes
            .next()
            .map_or(stream.len(), |&s| s)
            .min(stream.len() - fed);
        // Bytes of the current (partial) frame held before this piece.
        let held_before = buf.len();
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => take(f, &buf, fed, &mut taken),
                Ok(None) => {
                    check_partial(&dec, &buf, &limits);
                    break;
                }
                Err(e) => {
                    check_error(&e, &dec, &limits, held_before, taken, fed - n);
                    return Outcome {
                        frames,
                        error: Some(e.kind()),
                    };
                }
            }
        }
    }
    // At the end of the stream: whatever is held is a truncated frame.
    let pending = buf.len();
    let error = match dec.decode_eof(&mut buf) {
        Ok(Some(f)) => panic!("decode_eof found a frame decode did not: {f:?}"),
        Ok(None) => {
            assert!(buf.is_empty() && !dec.is_mid_frame());
            None
        }
        Err(crate::DecodeError::Truncated { pending: p }) => {
            assert!(!dec.is_mid_frame());
            assert_eq!(p, pending);
            assert!(p > 0 && p < limits.max_frame_bytes);
            Some("truncated")
        }
        Err(e) => panic!("decode_eof found an error decode did not: {e}"),
    };
    Outcome { frames, error }
}

fn check_frame<F: Checked>(f: &F, bytes: &[u8], limits: &Limits) {
    assert!(
        bytes.len() <= limits.max_frame_bytes,
        "a {}-byte frame decoded under max_frame_bytes {}",
        bytes.len(),
        limits.max_frame_bytes
    );
    let wire = f.wire();
    assert_eq!(
        &wire[..],
        bytes,
        "re-encoding differs from the decoded bytes: {f:?}"
    );
    f.check_parts(limits);
    // Debug walks every list item.
    let _ = format!("{f:?}");
}

/// After `Ok(None)`: what is held is one partial frame, shorter than the
/// frame limit (else the decoder should have erred).
fn check_partial<F: Frame>(dec: &FrameDecoder<F>, buf: &BytesMut, limits: &Limits) {
    if buf.is_empty() {
        return;
    }
    assert!(
        dec.is_mid_frame(),
        "Ok(None) with bytes held but no frame started"
    );
    assert!(
        buf.len() < limits.max_frame_bytes,
        "decoder holds {} bytes of a partial frame under max_frame_bytes {}",
        buf.len(),
        limits.max_frame_bytes
    );
}

fn check_error<F: Frame>(
    e: &crate::DecodeError,
    dec: &FrameDecoder<F>,
    limits: &Limits,
    held_before: usize,
    taken: usize,
    fed_before: usize,
) {
    assert!(
        !dec.is_mid_frame(),
        "decoder still mid-frame after an error"
    );
    // Display and the error code must not panic.
    let _ = (e.to_string(), e.code(), e.code().closes_connection());
    assert!(!matches!(
        e,
        crate::DecodeError::Truncated { .. } | crate::DecodeError::Io(_)
    ));
    if matches!(e, crate::DecodeError::FrameTooLarge { .. }) {
        // Of the failing frame, fewer than max_frame_bytes were fed before
        // the piece that made it fail.
        let of_frame_before = fed_before.saturating_sub(taken);
        assert!(of_frame_before <= held_before);
        assert!(
            of_frame_before == 0 || of_frame_before < limits.max_frame_bytes,
            "frame_too_large only after {of_frame_before} bytes (max {})",
            limits.max_frame_bytes
        );
    }
}

/// Runs every check of [`decode_target`] on one configuration.
pub fn check_stream<F: Checked>(cfg: &Config, stream: &[u8]) {
    let whole = feed::<F>(cfg.limits, stream, &[]);
    if !cfg.pieces.is_empty() {
        let split = feed::<F>(cfg.limits, stream, &cfg.pieces);
        assert_eq!(
            split.frames, whole.frames,
            "split feeding ({:?}) decoded other frames than one piece",
            cfg.pieces
        );
        assert_eq!(
            split.error, whole.error,
            "split feeding ({:?}) ended with another error than one piece",
            cfg.pieces
        );
    }
    // Feeding byte by byte is the harshest split; keep it for short inputs.
    if stream.len() <= 64 {
        let bytewise = feed::<F>(cfg.limits, stream, &[1]);
        assert_eq!(
            bytewise.frames, whole.frames,
            "byte-by-byte feeding differs"
        );
        assert_eq!(bytewise.error, whole.error, "byte-by-byte feeding differs");
    }
    if cfg.limits.max_frame_bytes != Limits::default().max_frame_bytes {
        check_frame_limit::<F>(cfg.limits, stream, &whole);
    }
}

/// Lifting the frame limit changes nothing before the first frame that
/// exceeded it.
fn check_frame_limit<F: Checked>(limits: Limits, stream: &[u8], limited: &Outcome<F>) {
    let free = Limits {
        max_frame_bytes: usize::MAX,
        ..limits
    };
    let unlimited = feed::<F>(free, stream, &[]);
    let n = limited.frames.len();
    assert!(
        unlimited.frames.len() >= n,
        "lifting the frame limit lost frames"
    );
    assert_eq!(&unlimited.frames[..n], &limited.frames[..]);
    match limited.error {
        None => assert!(unlimited.frames.len() == n && unlimited.error.is_none()),
        Some("frame_too_large") => {
            if let Some((_, r)) = unlimited.frames.get(n) {
                assert!(
                    r.len() > limits.max_frame_bytes,
                    "frame_too_large for a {}-byte frame (max {})",
                    r.len(),
                    limits.max_frame_bytes
                );
            } else {
                assert!(unlimited.error.is_some());
            }
        }
        Some(kind) => {
            assert_eq!(unlimited.frames.len(), n);
            assert_eq!(
                unlimited.error,
                Some(kind),
                "the frame limit changed the error"
            );
        }
    }
}
