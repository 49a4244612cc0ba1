//! The incremental decoder and the tokio codec.
//!
//! Frames are self-delimiting (no length prefix), so the decoder walks each
//! frame's fields as bytes arrive. Invariants:
//! - Resumable: the scan position, the current field and the items left in
//!   a list are kept between calls, so every byte is examined a bounded
//!   number of times however the stream is split (O(frame size) in total).
//! - Validating: every field is checked once, when it is complete; the frame
//!   is then split off the buffer without copying and its lists stay views.
//! - Bounded: counts from the wire are checked against the limits before
//!   anything is trusted, nothing is reserved from a declared size, and a
//!   frame is rejected as soon as a declared length would carry it past
//!   `max_frame_bytes`.

use std::marker::PhantomData;

use bytes::{Buf, Bytes, BytesMut};

use crate::error::{DecodeError, ErrorCode};
use crate::frame::*;
use crate::pid::{LEVEL_BYTES, Pid};

/// Decoder limits. PROTOCOL.md, "Limits", documents the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame, header included.
    pub max_frame_bytes: usize,
    /// Most items in one list of a frame (atoms, deletes, synclist entries).
    pub max_items_per_frame: u64,
    /// Deepest position id.
    pub max_pid_depth: u8,
}

impl Limits {
    pub const DEFAULT_MAX_FRAME_BYTES: usize = 32 * 1024 * 1024;
    pub const DEFAULT_MAX_ITEMS_PER_FRAME: u64 = 1_000_000;
    pub const DEFAULT_MAX_PID_DEPTH: u8 = 64;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: Self::DEFAULT_MAX_FRAME_BYTES,
            max_items_per_frame: Self::DEFAULT_MAX_ITEMS_PER_FRAME,
            max_pid_depth: Self::DEFAULT_MAX_PID_DEPTH,
        }
    }
}

/// The kinds of field a frame is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    U8,
    /// A u8 site that must not be 0.
    Site,
    U64,
    U128,
    /// UTF-8, at most 255 bytes, terminated by 0x0A.
    Name,
    /// u8 length, then that many bytes.
    Token,
    /// u16 length, then that many bytes of UTF-8.
    Message,
    OneAtom,
    OnePid,
    /// u64 count, then atoms.
    AtomSeq,
    /// u64 count, then position ids.
    PidSeq,
    /// u64 count, then (u64 time, u128 document) pairs.
    EntrySeq,
    /// A run (version 3): pid, u16 length, UTF-8.
    OneRun,
    /// A range (version 3): pid, u16 count.
    OneRange,
    /// u64 count, then items (version 3): u8 kind, then an atom or a run.
    ItemSeq,
    /// u64 count, then ranges (version 3).
    RangeSeq,
    /// u64 count, then (u64 time, u128 document, u8 flags) entries
    /// (version 4); flags other than bit 0 are malformed.
    FeedSeq,
}

const MAX_FIELDS: usize = 5;

/// A direction's frame type: which headers it accepts, their layouts, and
/// how to build the value from validated bytes.
pub trait Frame: Sized {
    /// The fields after the header byte, or `None` for a header this
    /// direction does not accept.
    fn layout(header: u8) -> Option<&'static [Field]>;
    /// Builds the frame from bytes the decoder has validated against
    /// `layout(header)`.
    fn build(header: u8, fields: &Fields<'_>) -> Self;
    fn encode(&self, out: &mut BytesMut);
}

/// The validated fields of one frame, as offsets into its bytes.
pub struct Fields<'a> {
    frame: &'a Bytes,
    spans: &'a [(usize, usize); MAX_FIELDS],
}

impl Fields<'_> {
    fn bytes(&self, i: usize) -> &[u8] {
        let (s, e) = self.spans[i];
        &self.frame[s..e]
    }
    fn u8(&self, i: usize) -> u8 {
        self.bytes(i)[0]
    }
    fn u64(&self, i: usize) -> u64 {
        u64::from_be_bytes(self.bytes(i).try_into().expect("8-byte field"))
    }
    fn u128(&self, i: usize) -> u128 {
        u128::from_be_bytes(self.bytes(i).try_into().expect("16-byte field"))
    }
    fn text(&self, i: usize) -> String {
        std::str::from_utf8(self.bytes(i))
            .expect("validated UTF-8")
            .to_owned()
    }
    fn name(&self, i: usize) -> DocName {
        DocName::new_unchecked(self.text(i))
    }
    fn token(&self, i: usize) -> Bytes {
        let (s, e) = self.spans[i];
        self.frame.slice(s..e)
    }
    fn atom(&self, i: usize) -> Atom {
        let list = AtomList::from_validated(1, self.token(i));
        list.iter().next().expect("one atom").to_atom()
    }
    fn pid(&self, i: usize) -> Pid {
        Pid::from_wire_unchecked(self.bytes(i))
    }
    /// A list field: (count, items without the count).
    fn list(&self, i: usize) -> (u64, Bytes) {
        let (s, e) = self.spans[i];
        let count = u64::from_be_bytes(self.frame[s..s + 8].try_into().expect("count"));
        (count, self.frame.slice(s + 8..e))
    }
    fn atoms(&self, i: usize) -> AtomList {
        let (c, b) = self.list(i);
        AtomList::from_validated(c, b)
    }
    fn pids(&self, i: usize) -> PidList {
        let (c, b) = self.list(i);
        PidList::from_validated(c, b)
    }
    fn items(&self, i: usize) -> ItemList {
        let (c, b) = self.list(i);
        ItemList::from_validated(c, b)
    }
    fn ranges(&self, i: usize) -> RangeList {
        let (c, b) = self.list(i);
        RangeList::from_validated(c, b)
    }
    fn run(&self, i: usize) -> Run {
        let mut one = bytes::BytesMut::with_capacity(self.bytes(i).len() + 1);
        one.extend_from_slice(&[item_kind::RUN]);
        one.extend_from_slice(self.bytes(i));
        let list = ItemList::from_validated(1, one.freeze());
        match list.iter().next().expect("one item") {
            ItemRef::Run(r) => r.to_run(),
            ItemRef::Atom(_) => unreachable!("written as a run"),
        }
    }
    fn range(&self, i: usize) -> IdRange {
        let list = RangeList::from_validated(1, self.token(i));
        list.iter().next().expect("one range").to_range()
    }
    fn entries(&self, i: usize) -> SyncEntries {
        let (c, b) = self.list(i);
        SyncEntries::from_validated(c, b)
    }
    fn feed(&self, i: usize) -> FeedEntries {
        let (c, b) = self.list(i);
        FeedEntries::from_validated(c, b)
    }
}

use Field::*;

impl Frame for ClientFrame {
    fn layout(h: u8) -> Option<&'static [Field]> {
        Some(match h {
            header::SYNCLIST => &[U64],
            header::SYNC_DOC_PULL => &[U128, U64],
            header::SYNC_DOC_UPSERT => &[U128, Name, U64, AtomSeq, PidSeq],
            header::DOC_DELETE => &[U128],
            header::SYNC_DOC_UPSERT_RUNS => &[U128, Name, U64, ItemSeq, RangeSeq],
            header::FEED_SUBSCRIBE => &[U64],
            header::SESSION_START => &[U64, U128],
            header::SESSION_INSERT => &[Site, OneAtom],
            header::SESSION_DELETE => &[U8, OnePid],
            header::NAME_CHANGE => &[Name],
            header::SESSION_INSERT_RUN => &[Site, OneRun],
            header::SESSION_DELETE_RANGE => &[U8, OneRange],
            header::HELLO => &[U8, U128, Token],
            _ => return None,
        })
    }

    fn build(h: u8, f: &Fields<'_>) -> Self {
        match h {
            header::SYNCLIST => ClientFrame::Synclist { since: f.u64(0) },
            header::SYNC_DOC_PULL => ClientFrame::Pull {
                doc: f.u128(0),
                since: f.u64(1),
            },
            header::SYNC_DOC_UPSERT => ClientFrame::Upsert(Upsert {
                doc: f.u128(0),
                name: f.name(1),
                since: f.u64(2),
                inserts: f.atoms(3),
                deletes: f.pids(4),
            }),
            header::DOC_DELETE => ClientFrame::DeleteDoc { doc: f.u128(0) },
            header::SYNC_DOC_UPSERT_RUNS => ClientFrame::UpsertRuns(UpsertRuns {
                doc: f.u128(0),
                name: f.name(1),
                since: f.u64(2),
                inserts: f.items(3),
                deletes: f.ranges(4),
            }),
            header::SESSION_INSERT_RUN => ClientFrame::InsertRun(SessionInsertRun {
                site: f.u8(0),
                run: f.run(1),
            }),
            header::SESSION_DELETE_RANGE => ClientFrame::DeleteRange(SessionDeleteRange {
                site: f.u8(0),
                range: f.range(1),
            }),
            header::SESSION_START => ClientFrame::SessionStart {
                since: f.u64(0),
                doc: f.u128(1),
            },
            header::SESSION_INSERT => ClientFrame::Insert(SessionInsert {
                site: f.u8(0),
                atom: f.atom(1),
            }),
            header::SESSION_DELETE => ClientFrame::Delete(SessionDelete {
                site: f.u8(0),
                pid: f.pid(1),
            }),
            header::NAME_CHANGE => ClientFrame::Rename(f.name(0)),
            header::FEED_SUBSCRIBE => ClientFrame::Subscribe { since: f.u64(0) },
            header::HELLO => ClientFrame::Hello(Hello {
                version: f.u8(0),
                replica: f.u128(1),
                token: f.token(2),
            }),
            _ => unreachable!("layout() accepted header {h}"),
        }
    }

    fn encode(&self, out: &mut BytesMut) {
        ClientFrame::encode(self, out)
    }
}

impl Frame for ServerFrame {
    fn layout(h: u8) -> Option<&'static [Field]> {
        Some(match h {
            header::SYNCLIST_RESPONSE => &[EntrySeq],
            header::SYNC_DOC_RESPONSE => &[U128, Name, AtomSeq, PidSeq],
            header::DOC_SYNC => &[U128, U64, U8],
            header::DOC_DELETED => &[U128, U64],
            header::RESYNC => &[U128],
            header::SYNC_DOC_RESPONSE_RUNS => &[U128, Name, ItemSeq, RangeSeq],
            header::FEED_CHANGES => &[FeedSeq],
            header::FEED_HEARTBEAT => &[U64],
            header::SESSION_INSERT => &[Site, OneAtom],
            header::SESSION_DELETE => &[U8, OnePid],
            header::NAME_CHANGE => &[Name],
            header::SESSION_STARTED => &[U64, U8, U64],
            header::SESSION_ACK => &[U64],
            header::SESSION_INSERT_RUN => &[Site, OneRun],
            header::SESSION_DELETE_RANGE => &[U8, OneRange],
            header::WELCOME => &[U8, U64],
            header::ERROR => &[U8, Message],
            _ => return None,
        })
    }

    fn build(h: u8, f: &Fields<'_>) -> Self {
        match h {
            header::SYNCLIST_RESPONSE => ServerFrame::SynclistResponse(f.entries(0)),
            header::SYNC_DOC_RESPONSE => ServerFrame::DocResponse(DocResponse {
                doc: f.u128(0),
                name: f.name(1),
                inserts: f.atoms(2),
                deletes: f.pids(3),
            }),
            header::DOC_SYNC => ServerFrame::DocSync {
                doc: f.u128(0),
                sync_time: f.u64(1),
                site: f.u8(2),
            },
            header::DOC_DELETED => ServerFrame::DocDeleted {
                doc: f.u128(0),
                deleted_time: f.u64(1),
            },
            header::RESYNC => ServerFrame::Resync { doc: f.u128(0) },
            header::FEED_CHANGES => ServerFrame::FeedChanges(f.feed(0)),
            header::FEED_HEARTBEAT => ServerFrame::FeedHeartbeat { time: f.u64(0) },
            header::SYNC_DOC_RESPONSE_RUNS => ServerFrame::DocResponseRuns(DocResponseRuns {
                doc: f.u128(0),
                name: f.name(1),
                inserts: f.items(2),
                deletes: f.ranges(3),
            }),
            header::SESSION_INSERT_RUN => ServerFrame::InsertRun(SessionInsertRun {
                site: f.u8(0),
                run: f.run(1),
            }),
            header::SESSION_DELETE_RANGE => ServerFrame::DeleteRange(SessionDeleteRange {
                site: f.u8(0),
                range: f.range(1),
            }),
            header::SESSION_INSERT => ServerFrame::Insert(SessionInsert {
                site: f.u8(0),
                atom: f.atom(1),
            }),
            header::SESSION_DELETE => ServerFrame::Delete(SessionDelete {
                site: f.u8(0),
                pid: f.pid(1),
            }),
            header::NAME_CHANGE => ServerFrame::Rename(f.name(0)),
            header::SESSION_STARTED => ServerFrame::SessionStarted {
                session_id: f.u64(0),
                site: f.u8(1),
                sync_time: f.u64(2),
            },
            header::SESSION_ACK => ServerFrame::SessionAck { count: f.u64(0) },
            header::WELCOME => ServerFrame::Welcome {
                version: f.u8(0),
                server_time: f.u64(1),
            },
            header::ERROR => ServerFrame::Error(ErrorFrame {
                code: ErrorCode(f.u8(0)),
                message: f.text(1),
            }),
            _ => unreachable!("layout() accepted header {h}"),
        }
    }

    fn encode(&self, out: &mut BytesMut) {
        ServerFrame::encode(self, out)
    }
}

/// Where the scan of the current frame stands.
#[derive(Debug, Clone)]
struct Scan {
    header: u8,
    layout: &'static [Field],
    /// Index of the field being scanned.
    field: usize,
    /// Offset (from the header byte) of the first byte not yet validated.
    pos: usize,
    /// Items left in the list being scanned; `None` before its count.
    list_left: Option<u64>,
    /// Bytes of a name already searched for its terminator.
    name_scanned: usize,
    /// Atoms, run chars or range ids counted so far in the list being
    /// scanned (they count toward `max_items_per_frame`).
    units: u64,
    spans: [(usize, usize); MAX_FIELDS],
}

/// Sans-IO decoder for one direction's frames.
#[derive(Debug)]
pub struct FrameDecoder<F> {
    limits: Limits,
    scan: Option<Scan>,
    _frame: PhantomData<fn() -> F>,
}

impl<F: Frame> Default for FrameDecoder<F> {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

/// What scanning one field found.
enum Step {
    /// The field is complete and ends at this offset.
    Done(usize),
    /// More bytes are needed.
    Partial,
}

impl<F: Frame> FrameDecoder<F> {
    pub fn new(limits: Limits) -> Self {
        FrameDecoder {
            limits,
            scan: None,
            _frame: PhantomData,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Changes the limits for the frames that follow (e.g. small before
    /// authentication, the full ones after). A frame in progress is held
    /// to the new limits as it continues.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Whether a frame has been started but not finished.
    pub fn is_mid_frame(&self) -> bool {
        self.scan.is_some()
    }

    /// Decodes the next frame from the front of `src`, removing its bytes.
    /// `Ok(None)`: more bytes are needed (nothing is consumed until a frame
    /// is complete). After an error the stream cannot be resynchronised and
    /// the connection must be closed.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<F>, DecodeError> {
        match self.step(src) {
            Ok(Some(f)) => Ok(Some(f)),
            Ok(None) => Ok(None),
            Err(e) => {
                self.scan = None;
                Err(e)
            }
        }
    }

    /// As [`decode`](Self::decode), at the end of the stream: leftover bytes
    /// are a [`DecodeError::Truncated`].
    pub fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<F>, DecodeError> {
        match self.decode(src)? {
            Some(f) => Ok(Some(f)),
            None if src.is_empty() => Ok(None),
            None => {
                self.scan = None;
                Err(DecodeError::Truncated { pending: src.len() })
            }
        }
    }

    fn step(&mut self, src: &mut BytesMut) -> Result<Option<F>, DecodeError> {
        if self.scan.is_none() {
            let Some(&h) = src.first() else {
                return Ok(None);
            };
            let layout = F::layout(h).ok_or(DecodeError::UnknownHeader { header: h })?;
            self.scan = Some(Scan {
                header: h,
                layout,
                field: 0,
                pos: 1,
                list_left: None,
                name_scanned: 0,
                units: 0,
                spans: [(0, 0); MAX_FIELDS],
            });
        }
        let limits = self.limits;
        let scan = self.scan.as_mut().expect("set above");
        let buf: &[u8] = src;
        while scan.field < scan.layout.len() {
            let start = scan.pos;
            match scan_field(scan, buf, &limits)? {
                Step::Partial => return Ok(None),
                Step::Done(end) => {
                    let span_start = if scan.layout[scan.field].is_list() {
                        scan.spans[scan.field].0
                    } else {
                        start
                    };
                    scan.spans[scan.field] = (span_start, end);
                    scan.pos = end;
                    scan.field += 1;
                    scan.list_left = None;
                    scan.name_scanned = 0;
                    scan.units = 0;
                }
            }
        }
        let scan = self.scan.take().expect("set above");
        if scan.header == header::SESSION_INSERT || scan.header == header::SESSION_INSERT_RUN {
            let site = buf[scan.spans[0].0];
            let (s, e) = scan.spans[1];
            let pid = if scan.header == header::SESSION_INSERT {
                &buf[s + 1 + buf[s] as usize..e]
            } else {
                // A run starts with its first id.
                &buf[s..s + 1 + buf[s] as usize * LEVEL_BYTES]
            };
            let creator = PidRef::new_unchecked(pid).creator();
            if site != creator {
                return Err(DecodeError::InsertSiteMismatch { site, creator });
            }
        }
        let frame = src.split_to(scan.pos).freeze();
        let spans = shift_spans(&scan.spans, scan.layout);
        Ok(Some(F::build(
            scan.header,
            &Fields {
                frame: &frame,
                spans: &spans,
            },
        )))
    }
}

/// Names are stored with their terminator in the span; the built value
/// leaves it out.
fn shift_spans(
    spans: &[(usize, usize); MAX_FIELDS],
    layout: &[Field],
) -> [(usize, usize); MAX_FIELDS] {
    let mut out = *spans;
    for (i, f) in layout.iter().enumerate() {
        match f {
            Name => out[i].1 -= 1,
            Token => out[i].0 += 1,
            Message => out[i].0 += 2,
            _ => {}
        }
    }
    out
}

impl Field {
    fn is_list(self) -> bool {
        matches!(
            self,
            AtomSeq | PidSeq | EntrySeq | ItemSeq | RangeSeq | FeedSeq
        )
    }
}

/// `Err` if a field ending at `end` would make the frame too large,
/// `Ok(false)` if the bytes are not all here yet.
fn have(buf: &[u8], end: usize, limits: &Limits) -> Result<bool, DecodeError> {
    if end > limits.max_frame_bytes {
        return Err(DecodeError::FrameTooLarge {
            max: limits.max_frame_bytes,
        });
    }
    Ok(end <= buf.len())
}

macro_rules! need {
    ($buf:expr, $end:expr, $limits:expr) => {
        if !have($buf, $end, $limits)? {
            return Ok(Step::Partial);
        }
    };
}

fn scan_field(scan: &mut Scan, buf: &[u8], limits: &Limits) -> Result<Step, DecodeError> {
    let pos = scan.pos;
    match scan.layout[scan.field] {
        U8 => fixed(buf, pos, 1, limits),
        Site => {
            need!(buf, pos + 1, limits);
            if buf[pos] == 0 {
                return Err(DecodeError::ReservedSite {
                    field: "session_insert site",
                });
            }
            Ok(Step::Done(pos + 1))
        }
        U64 => fixed(buf, pos, 8, limits),
        U128 => fixed(buf, pos, 16, limits),
        Name => {
            // Search only bytes not searched before, never past 256, and
            // never at or past max_frame_bytes (a terminator there ends the
            // frame too late): the outcome must not depend on how the bytes
            // arrive.
            let window_end = buf
                .len()
                .min(pos + MAX_NAME_BYTES + 1)
                .min(limits.max_frame_bytes.max(pos));
            let from = pos + scan.name_scanned;
            match buf[from.min(window_end)..window_end]
                .iter()
                .position(|&b| b == b'\n')
            {
                Some(i) => {
                    let nl = from + i;
                    std::str::from_utf8(&buf[pos..nl]).map_err(|_| DecodeError::InvalidUtf8 {
                        field: "document name",
                    })?;
                    // The terminator is inside the span; `shift_spans` drops it.
                    need!(buf, nl + 1, limits);
                    Ok(Step::Done(nl + 1))
                }
                None if window_end - pos > MAX_NAME_BYTES => Err(DecodeError::NameTooLong),
                None => {
                    scan.name_scanned = window_end - pos;
                    have(buf, window_end + 1, limits)?;
                    Ok(Step::Partial)
                }
            }
        }
        Token => {
            need!(buf, pos + 1, limits);
            fixed(buf, pos, 1 + buf[pos] as usize, limits)
        }
        Message => {
            need!(buf, pos + 2, limits);
            let len = u16::from_be_bytes([buf[pos], buf[pos + 1]]) as usize;
            need!(buf, pos + 2 + len, limits);
            std::str::from_utf8(&buf[pos + 2..pos + 2 + len]).map_err(|_| {
                DecodeError::InvalidUtf8 {
                    field: "error message",
                }
            })?;
            Ok(Step::Done(pos + 2 + len))
        }
        OneAtom => atom(buf, pos, limits),
        OnePid => pid(buf, pos, "position id", limits),
        OneRun => {
            let (step, chars) = run(buf, pos, limits)?;
            if chars > limits.max_items_per_frame {
                return Err(DecodeError::TooManyItems {
                    field: "run chars",
                    count: chars,
                    max: limits.max_items_per_frame,
                });
            }
            Ok(step)
        }
        OneRange => Ok(range(buf, pos, limits)?.0),
        list @ (AtomSeq | PidSeq | EntrySeq | ItemSeq | RangeSeq | FeedSeq) => {
            let (min_item, what) = match list {
                AtomSeq => (1 + 1 + 1 + LEVEL_BYTES, "inserted atoms"),
                PidSeq => (1 + LEVEL_BYTES, "deleted ids"),
                // kind, then the smallest atom (a run is one byte longer).
                ItemSeq => (1 + 1 + 1 + 1 + LEVEL_BYTES, "inserted atoms and run chars"),
                RangeSeq => (1 + LEVEL_BYTES + 2, "deleted range ids"),
                FeedSeq => (FEED_ENTRY_BYTES, "feed entries"),
                _ => (SYNC_ENTRY_BYTES, "synclist entries"),
            };
            let mut at = pos;
            let mut left = match scan.list_left {
                Some(left) => left,
                None => {
                    need!(buf, pos + 8, limits);
                    let count = u64::from_be_bytes(buf[pos..pos + 8].try_into().expect("8 bytes"));
                    if count > limits.max_items_per_frame {
                        return Err(DecodeError::TooManyItems {
                            field: what,
                            count,
                            max: limits.max_items_per_frame,
                        });
                    }
                    // Reject early a count that cannot fit in a frame.
                    let least = (count as usize)
                        .saturating_mul(min_item)
                        .saturating_add(pos + 8);
                    if least > limits.max_frame_bytes {
                        return Err(DecodeError::FrameTooLarge {
                            max: limits.max_frame_bytes,
                        });
                    }
                    scan.spans[scan.field].0 = pos;
                    scan.units = 0;
                    at = pos + 8;
                    count
                }
            };
            while left > 0 {
                let (step, units) = match list {
                    AtomSeq => (atom(buf, at, limits)?, 1),
                    PidSeq => (pid(buf, at, "deleted id", limits)?, 1),
                    ItemSeq => item(buf, at, limits)?,
                    RangeSeq => range(buf, at, limits)?,
                    FeedSeq => (feed_entry(buf, at, limits)?, 1),
                    _ => (fixed(buf, at, SYNC_ENTRY_BYTES, limits)?, 1),
                };
                match step {
                    Step::Done(end) => {
                        at = end;
                        left -= 1;
                        // Every atom, run char and range id counts, so a
                        // version-3 list never expands past what a version-1
                        // list may carry.
                        scan.units += units;
                        if scan.units > limits.max_items_per_frame {
                            return Err(DecodeError::TooManyItems {
                                field: what,
                                count: scan.units,
                                max: limits.max_items_per_frame,
                            });
                        }
                    }
                    Step::Partial => {
                        scan.pos = at;
                        scan.list_left = Some(left);
                        return Ok(Step::Partial);
                    }
                }
            }
            Ok(Step::Done(at))
        }
    }
}

/// An item at `pos`: its kind byte, then an atom or a run. Returns the step
/// and the ids it holds.
fn item(buf: &[u8], pos: usize, limits: &Limits) -> Result<(Step, u64), DecodeError> {
    if !have(buf, pos + 1, limits)? {
        return Ok((Step::Partial, 0));
    }
    match buf[pos] {
        item_kind::ATOM => Ok((atom(buf, pos + 1, limits)?, 1)),
        item_kind::RUN => run(buf, pos + 1, limits),
        kind => Err(DecodeError::BadItemKind { kind }),
    }
}

/// The last ident of the pid whose wire form ends at `end`.
fn last_ident(buf: &[u8], end: usize) -> u32 {
    u32::from_be_bytes(buf[end - 4..end].try_into().expect("4 bytes"))
}

/// A run at `pos`: pid, u16 length, UTF-8. Returns the step and its chars.
fn run(buf: &[u8], pos: usize, limits: &Limits) -> Result<(Step, u64), DecodeError> {
    let Some(pid_end) = pid_header(buf, pos, limits)? else {
        return Ok((Step::Partial, 0));
    };
    if !have(buf, pid_end + 2, limits)? {
        return Ok((Step::Partial, 0));
    }
    let len = u16::from_be_bytes([buf[pid_end], buf[pid_end + 1]]) as usize;
    if len == 0 {
        return Err(DecodeError::EmptyRun);
    }
    let end = pid_end + 2 + len;
    // Validated only once whole, so a long run is examined once however
    // its bytes arrive.
    if !have(buf, end, limits)? {
        return Ok((Step::Partial, 0));
    }
    check_levels(&buf[pos..pid_end], "a run's first id")?;
    let text = &buf[pid_end + 2..end];
    simdutf8::basic::from_utf8(text).map_err(|_| DecodeError::InvalidUtf8 { field: "run text" })?;
    // Chars = bytes that do not continue a char.
    let chars = text.iter().filter(|&&b| (b as i8) >= -0x40).count() as u64;
    check_span(last_ident(buf, pid_end), chars)?;
    Ok((Step::Done(end), chars))
}

/// A range at `pos`: pid, u16 count. Returns the step and its ids.
fn range(buf: &[u8], pos: usize, limits: &Limits) -> Result<(Step, u64), DecodeError> {
    let Some(pid_end) = pid_header(buf, pos, limits)? else {
        return Ok((Step::Partial, 0));
    };
    if !have(buf, pid_end + 2, limits)? {
        return Ok((Step::Partial, 0));
    }
    check_levels(&buf[pos..pid_end], "a range's first id")?;
    let count = u64::from(u16::from_be_bytes([buf[pid_end], buf[pid_end + 1]]));
    if count == 0 {
        return Err(DecodeError::EmptyRange);
    }
    check_span(last_ident(buf, pid_end), count)?;
    Ok((Step::Done(pid_end + 2), count))
}

/// `n` ids from last ident `first` must all fit in `u32`.
fn check_span(first: u32, n: u64) -> Result<(), DecodeError> {
    if u64::from(first) + n - 1 > u64::from(u32::MAX) {
        return Err(DecodeError::IdentOverflow { first, count: n });
    }
    Ok(())
}

/// A feed entry at `pos`: u64 time, u128 document, u8 flags (only bit 0,
/// deleted, may be set: a later version may give the others a meaning, so
/// a receiver must not guess at them).
fn feed_entry(buf: &[u8], pos: usize, limits: &Limits) -> Result<Step, DecodeError> {
    need!(buf, pos + FEED_ENTRY_BYTES, limits);
    let flags = buf[pos + FEED_ENTRY_BYTES - 1];
    if flags & !FEED_FLAG_DELETED != 0 {
        return Err(DecodeError::BadFeedFlags { flags });
    }
    Ok(Step::Done(pos + FEED_ENTRY_BYTES))
}

fn fixed(buf: &[u8], pos: usize, n: usize, limits: &Limits) -> Result<Step, DecodeError> {
    need!(buf, pos + n, limits);
    Ok(Step::Done(pos + n))
}

fn atom(buf: &[u8], pos: usize, limits: &Limits) -> Result<Step, DecodeError> {
    need!(buf, pos + 1, limits);
    let len = buf[pos] as usize;
    if len == 0 {
        return Err(DecodeError::EmptyAtom);
    }
    let depth_at = pos + 1 + len;
    // The pid's depth byte arrives after the data; ask for both so the
    // data is validated only once it is whole.
    match pid_header(buf, depth_at, limits)? {
        None => Ok(Step::Partial),
        Some(end) => {
            need!(buf, end, limits);
            let data = &buf[pos + 1..depth_at];
            // Short ASCII atoms (typed characters) are UTF-8: they skip the
            // out-of-line validator call. Longer atoms (coalesced text, the
            // bulk of a big upsert) go to a SIMD validator: about half of
            // bulk decoding was std's scalar UTF-8 check.
            if data.len() > 16 || !data.is_ascii() {
                simdutf8::basic::from_utf8(data)
                    .map_err(|_| DecodeError::InvalidUtf8 { field: "atom data" })?;
            }
            check_levels(&buf[depth_at..end], "an atom's position id")?;
            Ok(Step::Done(end))
        }
    }
}

fn pid(buf: &[u8], pos: usize, what: &'static str, limits: &Limits) -> Result<Step, DecodeError> {
    match pid_header(buf, pos, limits)? {
        None => Ok(Step::Partial),
        Some(end) => {
            need!(buf, end, limits);
            check_levels(&buf[pos..end], what)?;
            Ok(Step::Done(end))
        }
    }
}

/// Reads a pid's depth byte at `pos`; returns where the pid ends.
fn pid_header(buf: &[u8], pos: usize, limits: &Limits) -> Result<Option<usize>, DecodeError> {
    if !have(buf, pos + 1, limits)? {
        return Ok(None);
    }
    let depth = buf[pos];
    if depth == 0 {
        return Err(DecodeError::ZeroDepth);
    }
    if depth > limits.max_pid_depth {
        return Err(DecodeError::DepthLimit {
            depth,
            max: limits.max_pid_depth,
        });
    }
    Ok(Some(pos + 1 + depth as usize * LEVEL_BYTES))
}

/// The last level's site is the creator's and must not be 0.
fn check_levels(wire: &[u8], what: &'static str) -> Result<(), DecodeError> {
    if wire[wire.len() - LEVEL_BYTES] == 0 {
        return Err(DecodeError::ReservedSite {
            field: match what {
                "deleted id" => "a deleted id's last level",
                "position id" => "a position id's last level",
                "a run's first id" => "a run's first id's last level",
                "a range's first id" => "a range's first id's last level",
                _ => "an atom's position id's last level",
            },
        });
    }
    Ok(())
}

/// A `tokio_util::codec` codec: decodes `In`, encodes `Out`.
#[derive(Debug)]
pub struct Codec<In, Out> {
    decoder: FrameDecoder<In>,
    _out: PhantomData<fn(Out)>,
}

/// The server's codec: decodes client frames, encodes server frames.
pub type ServerCodec = Codec<ClientFrame, ServerFrame>;
/// The client's codec: decodes server frames, encodes client frames.
pub type ClientCodec = Codec<ServerFrame, ClientFrame>;

impl<In: Frame, Out: Frame> Codec<In, Out> {
    pub fn new(limits: Limits) -> Self {
        Codec {
            decoder: FrameDecoder::new(limits),
            _out: PhantomData,
        }
    }

    pub fn decoder(&self) -> &FrameDecoder<In> {
        &self.decoder
    }

    pub fn decoder_mut(&mut self) -> &mut FrameDecoder<In> {
        &mut self.decoder
    }
}

impl<In: Frame, Out: Frame> Default for Codec<In, Out> {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl<In: Frame, Out: Frame> tokio_util::codec::Decoder for Codec<In, Out> {
    type Item = In;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, DecodeError> {
        self.decoder.decode(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<In>, DecodeError> {
        self.decoder.decode_eof(src)
    }
}

impl<In: Frame, Out: Frame> tokio_util::codec::Encoder<Out> for Codec<In, Out> {
    type Error = std::io::Error;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        item.encode(dst);
        Ok(())
    }
}

/// Pre-encoded frames (one encoding fanned out to many connections).
impl<In: Frame, Out: Frame> tokio_util::codec::Encoder<Bytes> for Codec<In, Out> {
    type Error = std::io::Error;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        dst.extend_from_slice(item.chunk());
        Ok(())
    }
}
