//! The op log's durable form, `<note>.md.latest_ops`: the record codec
//! (format in the docs of [`crate::oplog`]) and [`LogFile`], which appends
//! with fsync, drops a torn tail on open and compacts by atomic rewrite.
//! Touches only its own file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::{Buf, BufMut, BytesMut};
use notesync_protocol::{Atom, FrameDecoder, Level, Pid, ServerFrame};

use super::Record;
use crate::fsutil::{next_frame, put_frame};

/// Payload kinds (the format is in the docs of [`crate::oplog`]).
const INSERT: u8 = 1;
const DELETE: u8 = 2;
const CANCEL: u8 = 3;
const MARK_SENT: u8 = 4;
const RENAME: u8 = 5;
const INSERT_RUN: u8 = 6;
const DELETE_RANGE: u8 = 7;
const CANCEL_RANGE: u8 = 8;
const MORE_INSERTS: u8 = 9;
const MORE_IDS: u8 = 10;

/// Flag bits of kinds 6-10.
const SENT: u8 = 1;
const BACKWARDS: u8 = 2;

/// The most bytes of text (runs) or ids (ranges) one record holds.
const MAX_RUN_BYTES: usize = u16::MAX as usize;
const MAX_RANGE: usize = u16::MAX as usize;

/// Which op a record of one id (or a run or range of them) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Insert,
    Delete,
    Cancel,
}

/// The log's last record, when it is one that a kind 9 or 10 may
/// continue: its op, its last id and its sent flag.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tail {
    op: Op,
    last: Pid,
    sent: bool,
}

/// A record of one id that a run or range may hold: a one-char insert, a
/// delete, a cancel (sent: false).
fn single(r: &Record) -> Option<(Op, &Pid, bool)> {
    match r {
        Record::Insert { atom, sent } if atom.data().chars().nth(1).is_none() => {
            Some((Op::Insert, atom.pid(), *sent))
        }
        Record::Delete { pid, sent } => Some((Op::Delete, pid, *sent)),
        Record::Cancel { pid } => Some((Op::Cancel, pid, false)),
        _ => None,
    }
}

/// The id one step from `pid` (same prefix and site, last ident +-1).
fn step(pid: &Pid, backwards: bool) -> Option<Pid> {
    let i = pid.last().ident;
    let next = if backwards {
        i.checked_sub(1)
    } else {
        i.checked_add(1)
    };
    next.map(|i| pid.with_last_ident(i))
}

/// Whether `r` is the op `op` at the id one step from `prev`, with the
/// same sent flag.
fn continues(prev: (Op, &Pid, bool), backwards: bool, r: &Record) -> bool {
    single(r).is_some_and(|(op, pid, sent)| {
        op == prev.0
            && sent == prev.2
            && if backwards {
                prev.1.follows(pid)
            } else {
                pid.follows(prev.1)
            }
    })
}

/// How many of `records` (from the first) join a run or range record
/// when each steps from the one before it (the first from `from`), the
/// record already holding `held` records of `held_bytes` bytes of text.
fn group_len(
    records: &[Record],
    from: (Op, &Pid, bool),
    backwards: bool,
    held: usize,
    held_bytes: usize,
) -> usize {
    let mut prev = from;
    let (mut n, mut bytes) = (held, held_bytes);
    for r in records {
        if n == MAX_RANGE || !continues(prev, backwards, r) {
            break;
        }
        if let Record::Insert { atom, .. } = r {
            if bytes + atom.data().len() > MAX_RUN_BYTES {
                break;
            }
            bytes += atom.data().len();
        }
        prev = single(r).expect("continues");
        n += 1;
    }
    n - held
}

/// Bytes of text a record adds to a run.
fn text_len(r: &Record) -> usize {
    match r {
        Record::Insert { atom, .. } => atom.data().len(),
        _ => 0,
    }
}

/// Encodes a payload for a group of records: one record, or a run or range
/// of `group` one-id records stepping in one direction. `more`: they
/// continue the log's previous record (kinds 9 and 10).
fn encode_group(group: &[Record], backwards: bool, more: bool, out: &mut BytesMut) {
    let Some((op, first, sent)) = single(&group[0]).filter(|_| more || group.len() > 1) else {
        return encode_payload(&group[0], out);
    };
    let kind = match (more, op) {
        (true, Op::Insert) => MORE_INSERTS,
        (true, _) => MORE_IDS,
        (false, Op::Insert) => INSERT_RUN,
        (false, Op::Delete) => DELETE_RANGE,
        (false, Op::Cancel) => CANCEL_RANGE,
    };
    out.put_u8(kind);
    out.put_u8(if backwards { BACKWARDS } else { 0 } | if sent && !more { SENT } else { 0 });
    if !more {
        first.write_wire(out);
    }
    if op == Op::Insert {
        let text: String = group
            .iter()
            .filter_map(|r| match r {
                Record::Insert { atom, .. } => Some(atom.data()),
                _ => None,
            })
            .collect();
        // A continuation's text is the rest of its payload: the bytes a
        // keystroke costs.
        if !more {
            out.put_u16(text.len() as u16);
        }
        out.put_slice(text.as_bytes());
    } else {
        out.put_u16(group.len() as u16);
    }
}

/// Encodes a record's payload (kinds 1-5).
fn encode_payload(r: &Record, out: &mut BytesMut) {
    match r {
        Record::Insert { atom, sent } => {
            out.put_u8(INSERT);
            out.put_u8(*sent as u8);
            out.put_u8(atom.data().len() as u8);
            out.put_slice(atom.data().as_bytes());
            atom.pid().write_wire(out);
        }
        Record::Delete { pid, sent } => {
            out.put_u8(DELETE);
            out.put_u8(*sent as u8);
            pid.write_wire(out);
        }
        Record::Cancel { pid } => {
            out.put_u8(CANCEL);
            pid.write_wire(out);
        }
        Record::MarkSent => out.put_u8(MARK_SENT),
        Record::Rename { name, sent } => {
            out.put_u8(RENAME);
            out.put_u8(*sent as u8);
            out.put_slice(name.as_str().as_bytes());
            out.put_u8(b'\n');
        }
    }
}

/// The tail a log has after `r`.
fn tail_after(r: &Record) -> Option<Tail> {
    single(r).map(|(op, pid, sent)| Tail {
        op,
        last: pid.clone(),
        sent,
    })
}

/// Encodes records after a log whose last record leaves `tail`; updates it.
/// Consecutive one-char inserts, deletes or cancels at consecutive ids
/// (either way) become one run or range record.
fn encode_after(records: &[Record], tail: &mut Option<Tail>) -> BytesMut {
    let mut out = BytesMut::new();
    let mut payload = BytesMut::new();
    let mut i = 0;
    while i < records.len() {
        let rest = &records[i..];
        let mut pick = None;
        if let Some(t) = tail.as_ref() {
            let from = (t.op, &t.last, t.sent);
            for backwards in [false, true] {
                let n = group_len(rest, from, backwards, 0, 0);
                if n > 0 {
                    pick = Some((n, backwards, true));
                    break;
                }
            }
        }
        if pick.is_none() {
            let n = |backwards| match single(&rest[0]) {
                Some(first) => 1 + group_len(&rest[1..], first, backwards, 1, text_len(&rest[0])),
                None => 1,
            };
            let (fwd, back) = (n(false), n(true));
            pick = Some(if back > fwd {
                (back, true, false)
            } else {
                (fwd, false, false)
            });
        }
        let (n, backwards, more) = pick.expect("picked");
        payload.clear();
        encode_group(&rest[..n], backwards, more, &mut payload);
        put_frame(&mut out, &payload);
        *tail = tail_after(&rest[n - 1]);
        i += n;
    }
    out
}

pub fn encode_records(records: &[Record]) -> BytesMut {
    encode_after(records, &mut None)
}

/// The log as the code before runs wrote it: a record per op (kinds 1-5).
#[cfg(test)]
pub(crate) fn encode_records_v1(records: &[Record]) -> BytesMut {
    let mut out = BytesMut::new();
    for r in records {
        let mut payload = BytesMut::new();
        encode_payload(r, &mut payload);
        put_frame(&mut out, &payload);
    }
    out
}

/// The bytes a log holds after these appends (one per edit) to an empty
/// file: what [`LogFile::append`] writes, without the fsyncs.
#[cfg(test)]
pub(crate) fn appended_len(batches: &[Vec<Record>]) -> usize {
    let mut tail = None;
    batches
        .iter()
        .map(|b| encode_after(b, &mut tail).len())
        .sum()
}

/// Reads a position id in wire form (depth 1..=255, then `site, ident`
/// per level, the last site a replica's), as the protocol's decoder checks
/// it.
fn read_pid(b: &mut &[u8]) -> Option<Pid> {
    let depth = *b.first()? as usize;
    if depth == 0 || b.len() < 1 + depth * 5 {
        return None;
    }
    let mut wire = &b[1..1 + depth * 5];
    *b = &b[1 + depth * 5..];
    let mut levels = Vec::with_capacity(depth);
    for _ in 0..depth {
        let site = wire.get_u8();
        levels.push(Level::new(wire.get_u32(), site));
    }
    (levels[depth - 1].site != 0).then(|| Pid::from_levels(&levels))
}

fn read_u16(b: &mut &[u8]) -> Option<u16> {
    (b.len() >= 2).then(|| b.get_u16())
}

/// Decodes a payload of kind 6-10 into its one-id records. `tail`: what
/// the log's previous record leaves (kinds 9 and 10 continue it).
fn decode_group(kind: u8, p: &[u8], tail: Option<&Tail>) -> Option<Vec<Record>> {
    let (&flags, mut rest) = p.split_first()?;
    let more = matches!(kind, MORE_INSERTS | MORE_IDS);
    let allowed = if more || kind == CANCEL_RANGE {
        BACKWARDS
    } else {
        BACKWARDS | SENT
    };
    if flags & !allowed != 0 {
        return None;
    }
    let backwards = flags & BACKWARDS != 0;
    // The id of the group's first record, its op and sent flag.
    let (mut pid, op, sent) = if more {
        let t = tail?;
        let fits = match kind {
            MORE_INSERTS => t.op == Op::Insert,
            _ => t.op != Op::Insert,
        };
        if !fits {
            return None;
        }
        (step(&t.last, backwards)?, t.op, t.sent)
    } else {
        let op = match kind {
            INSERT_RUN => Op::Insert,
            DELETE_RANGE => Op::Delete,
            _ => Op::Cancel,
        };
        (read_pid(&mut rest)?, op, flags & SENT != 0)
    };
    let n = if kind == MORE_INSERTS {
        rest.len()
    } else {
        read_u16(&mut rest)? as usize
    };
    if n == 0 {
        return None;
    }
    let mut out = Vec::new();
    if op == Op::Insert {
        let text = std::str::from_utf8(rest).ok()?;
        if text.len() != n {
            return None;
        }
        let mut chars = text.chars().peekable();
        while let Some(ch) = chars.next() {
            let atom = Atom::new(ch.encode_utf8(&mut [0; 4]), pid.clone()).ok()?;
            out.push(Record::Insert { atom, sent });
            if chars.peek().is_some() {
                pid = step(&pid, backwards)?;
            }
        }
        return Some(out);
    }
    if !rest.is_empty() {
        return None;
    }
    for j in 0..n {
        if j > 0 {
            pid = step(&pid, backwards)?;
        }
        out.push(match op {
            Op::Delete => Record::Delete {
                pid: pid.clone(),
                sent,
            },
            _ => Record::Cancel { pid: pid.clone() },
        });
    }
    Some(out)
}

/// Decodes a payload, reusing the protocol decoder's validation for atoms,
/// ids and names (a 65/66/67 frame has the same layout after its header).
fn decode_payload(p: &[u8]) -> Option<Record> {
    let (&kind, rest) = p.split_first()?;
    // `site`: the byte a 65 or 66 has after its header, which the log
    // does not store.
    let frame = |header: u8, site: Option<u8>, body: &[u8]| -> Option<ServerFrame> {
        let mut buf = BytesMut::with_capacity(body.len() + 2);
        buf.put_u8(header);
        if let Some(site) = site {
            buf.put_u8(site);
        }
        buf.put_slice(body);
        let f = FrameDecoder::<ServerFrame>::default()
            .decode(&mut buf)
            .ok()??;
        buf.is_empty().then_some(f)
    };
    // A pid as a 66 lays it out, after the site byte (0: the log keeps no
    // site for it).
    let pid = |body: &[u8]| match frame(66, Some(0), body)? {
        ServerFrame::Delete(d) => Some(d.pid),
        _ => None,
    };
    let sent = |b: u8| match b {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    };
    match kind {
        1 => {
            let (&s, body) = rest.split_first()?;
            let creator_site = {
                // 65's site byte must equal the atom's creator; rebuild it.
                let len = *body.first()? as usize;
                let depth = *body.get(1 + len)? as usize;
                *body.get(1 + len + 1 + (depth.checked_sub(1)?) * 5)?
            };
            match frame(65, Some(creator_site), body)? {
                ServerFrame::Insert(i) => Some(Record::Insert {
                    atom: i.atom,
                    sent: sent(s)?,
                }),
                _ => None,
            }
        }
        2 => {
            let (&s, body) = rest.split_first()?;
            Some(Record::Delete {
                pid: pid(body)?,
                sent: sent(s)?,
            })
        }
        3 => Some(Record::Cancel { pid: pid(rest)? }),
        4 if rest.is_empty() => Some(Record::MarkSent),
        5 => {
            let (&s, body) = rest.split_first()?;
            match frame(67, None, body)? {
                ServerFrame::Rename(name) => Some(Record::Rename {
                    name,
                    sent: sent(s)?,
                }),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Decodes a whole log. Returns the records and the length of the valid
/// prefix; anything after it is a torn or corrupt tail.
pub fn decode_records(bytes: &[u8]) -> (Vec<Record>, usize) {
    let (records, valid, _) = decode_with_tail(bytes);
    (records, valid)
}

/// [`decode_records`], and what the valid prefix's last record leaves for
/// the next append to continue.
fn decode_with_tail(bytes: &[u8]) -> (Vec<Record>, usize, Option<Tail>) {
    let mut out = Vec::new();
    let mut tail = None;
    let mut valid = 0;
    while let Some((payload, next)) = next_frame(bytes, valid) {
        let group = match payload.split_first() {
            Some((&kind, rest)) if kind >= INSERT_RUN => decode_group(kind, rest, tail.as_ref()),
            _ => decode_payload(payload).map(|r| vec![r]),
        };
        match group {
            Some(records) => {
                tail = records.last().and_then(tail_after);
                out.extend(records);
            }
            None => break,
        }
        valid = next;
    }
    (out, valid, tail)
}

/// The durable op log file of one document.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: File,
    /// What the file's last record leaves for the next append to continue
    /// (`None` when unknown: then the next append starts afresh).
    tail: Option<Tail>,
    /// Records were written by [`LogFile::append_unsynced`] and not yet
    /// fsynced (a `Cell`: syncing needs only `&self`).
    unsynced: std::cell::Cell<bool>,
}

impl LogFile {
    /// Opens (or creates) the log, dropping a torn tail. Returns the file
    /// and the records in it.
    pub fn open(path: &Path) -> io::Result<(LogFile, Vec<Record>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (records, valid, tail) = decode_with_tail(&bytes);
        if valid < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                dropped = bytes.len() - valid,
                "op log had a torn or corrupt tail; dropped it"
            );
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        Ok((
            LogFile {
                path: path.to_owned(),
                file,
                tail,
                unsynced: Default::default(),
            },
            records,
        ))
    }

    /// Creates an empty log for a note new to this device. A file already
    /// at `path` belongs to no note the store knows (a crash before a new
    /// note reached state.json: its edits were picked up from a file,
    /// which is picked up again), so it is emptied: replayed into the new
    /// note, its records would be another note's text.
    pub fn create(path: &Path) -> io::Result<LogFile> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if file.metadata()?.len() > 0 {
            tracing::info!(path = %path.display(), "emptied an op log no note owns");
            file.set_len(0)?;
            file.sync_data()?;
        }
        Ok(LogFile {
            path: path.to_owned(),
            file,
            tail: None,
            unsynced: Default::default(),
        })
    }

    /// Appends records and fsyncs: only then is an edit reported done.
    pub fn append(&mut self, records: &[Record]) -> io::Result<()> {
        if records.is_empty() {
            return self.sync();
        }
        self.write(records)?;
        self.file.sync_data()?;
        self.unsynced.set(false);
        crate::fsutil::crash_point();
        Ok(())
    }

    /// Appends records without an fsync, for what may be lost in a crash
    /// as long as nothing depends on it before the next [`LogFile::sync`]
    /// or fsynced append (which makes these durable too: an fsync covers
    /// every earlier write of the file, so the log never has a hole).
    pub fn append_unsynced(&mut self, records: &[Record]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        self.write(records)?;
        self.unsynced.set(true);
        Ok(())
    }

    /// Whether records were appended unsynced and not yet fsynced.
    pub fn is_unsynced(&self) -> bool {
        self.unsynced.get()
    }

    /// Says that the file may hold writes not yet fsynced (made through
    /// another handle of it, since dropped), so that the next
    /// [`LogFile::sync`] fsyncs.
    pub fn mark_unsynced(&self) {
        self.unsynced.set(true);
    }

    /// Makes what [`LogFile::append_unsynced`] wrote durable.
    pub fn sync(&self) -> io::Result<()> {
        if self.unsynced.get() {
            self.file.sync_data()?;
            self.unsynced.set(false);
            crate::fsutil::crash_point();
        }
        Ok(())
    }

    fn write(&mut self, records: &[Record]) -> io::Result<()> {
        let mut tail = self.tail.take();
        // Typing char by char appends one record per char: a char that
        // continues the last record's run takes a few bytes (kind 9).
        let bytes = encode_after(records, &mut tail);
        // Until the write succeeds the file's last record is unknown (a
        // failed write may have left part of one): `self.tail` stays None.
        self.file.write_all(&bytes)?;
        self.tail = tail;
        Ok(())
    }

    /// Replaces the whole log atomically (compaction). To nothing, the
    /// file is truncated in place without an fsync (see below), or left
    /// alone when it is empty already: what every save of a note without
    /// pending ops does. The folder's fsync of a non-empty rewrite is the
    /// caller's ([`LogFile::rewrite`] through `write_atomic` syncs it;
    /// `rewrite_in_batch` leaves it).
    pub fn rewrite(&mut self, records: &[Record]) -> io::Result<()> {
        self.rewrite_with(records, crate::fsutil::write_atomic)
    }

    /// [`LogFile::rewrite`], leaving a non-empty rewrite's folder fsync to
    /// the caller (once for a batch of notes).
    pub fn rewrite_in_batch(&mut self, records: &[Record]) -> io::Result<()> {
        self.rewrite_with(records, crate::fsutil::replace_file)
    }

    fn rewrite_with(
        &mut self,
        records: &[Record],
        replace: fn(&Path, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        if records.is_empty() {
            if self.file.metadata()?.len() > 0 {
                // Not fsynced (one fsync per imported note fewer): it is
                // called once the structure holds every op, so an empty
                // log means every op was acknowledged or cancelled. If a
                // power loss brings the old log back, it replays on that
                // structure to the same text: its inserts are there
                // already (replay is idempotent), its cancels drop ids
                // the structure no longer has, and every acknowledged op
                // it holds is marked sent in it (the MarkSent was fsynced
                // before the op went out), so it is re-sent as it was,
                // never cancelled or re-made, and the server takes a
                // re-send as a no-op (PROTOCOL.md 3.1) unless it comes
                // more than the tombstone horizon after another device
                // deleted the text (3.6's limit, which a lost reply hits
                // the same way). The next fsync of this file (an
                // append's) makes the truncation durable with it, so the
                // log never has a hole; nothing else waits on it
                // (`unsynced` stays for what does).
                self.file.set_len(0)?;
            }
            self.tail = None;
            self.unsynced.set(false);
            return Ok(());
        }
        let mut tail = None;
        let bytes = encode_after(records, &mut tail);
        self.tail = None;
        replace(&self.path, &bytes)?;
        self.file = OpenOptions::new()
            .append(true)
            .read(true)
            .open(&self.path)?;
        self.tail = tail;
        self.unsynced.set(false);
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the log with its note (a rename of the note's files).
    pub fn rename_to(&mut self, to: &Path) -> io::Result<()> {
        fs::rename(&self.path, to)?;
        self.path = to.to_owned();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notesync_protocol::{Atom, DocName, Level, Pid};

    fn pid(i: u32) -> Pid {
        Pid::from_levels(&[Level::new(i, 1)])
    }

    /// An id at depth 2 under `[(7, 2)]`, made by site 3.
    fn deep(i: u32) -> Pid {
        Pid::from_levels(&[Level::new(7, 2), Level::new(i, 3)])
    }

    fn ins(p: Pid, ch: &str, sent: bool) -> Record {
        Record::Insert {
            atom: Atom::new(ch, p).unwrap(),
            sent,
        }
    }

    fn del(p: Pid, sent: bool) -> Record {
        Record::Delete { pid: p, sent }
    }

    /// Where each record frame of a log ends.
    fn frame_ends(mut b: &[u8]) -> Vec<usize> {
        let total = b.len();
        let mut ends = Vec::new();
        while b.len() >= 4 {
            let len = (&b[..4]).get_u32() as usize;
            b = &b[8 + len..];
            ends.push(total - b.len());
        }
        ends
    }

    /// Typing "forwards", then "drawkcab" before one spot, deleting,
    /// backspacing (cancels), with a sent flag changing and other records
    /// between.
    fn mixed() -> Vec<Record> {
        let mut r = Vec::new();
        for (j, ch) in "forwards é✓".chars().enumerate() {
            r.push(ins(deep(100 + j as u32), &ch.to_string(), false));
        }
        r.push(ins(deep(111), "x", true));
        r.push(ins(deep(112), "y", true));
        for (j, ch) in "drawkcab".chars().enumerate() {
            r.push(ins(pid(500 - j as u32), &ch.to_string(), false));
        }
        r.push(Record::MarkSent);
        r.extend((0..5).map(|j| del(deep(103 + j), true)));
        r.extend((0..4).map(|j| del(pid(500 - j), false)));
        r.push(Record::Cancel { pid: pid(9) });
        r.extend((0..3).map(|j| Record::Cancel { pid: deep(50 - j) }));
        r.push(ins(pid(1), "multi", false));
        r.push(Record::Rename {
            name: DocName::new("n").unwrap(),
            sent: false,
        });
        r.push(del(pid(1), false));
        r
    }

    #[test]
    fn runs_and_ranges_round_trip_in_few_records() {
        let records = mixed();
        let bytes = encode_records(&records);
        assert_eq!(decode_records(&bytes), (records.clone(), bytes.len()));
        // forwards run, sent run, backward run, mark, delete range,
        // backward delete range, cancel, cancel range, multi, rename, delete.
        assert_eq!(frame_ends(&bytes).len(), 11);
        assert!(bytes.len() * 2 < encode_records_v1(&records).len());
        // A cut anywhere drops exactly the records of the frame it cuts.
        let ends = frame_ends(&bytes);
        for cut in 0..bytes.len() {
            let (got, valid) = decode_records(&bytes[..cut]);
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            assert_eq!(valid, if whole == 0 { 0 } else { ends[whole - 1] });
            assert!(records.starts_with(&got));
            assert_eq!(encode_records(&got), bytes[..valid]);
        }
    }

    #[test]
    fn runs_and_ranges_split_at_their_limits() {
        // 70,000 chars of 2 bytes and 70,000 deletes: 3 runs, 2 ranges.
        let mut records: Vec<Record> = (0..70_000).map(|j| ins(pid(10 + j), "é", false)).collect();
        records.extend((0..70_000).map(|j| del(deep(10 + j), true)));
        let bytes = encode_records(&records);
        assert_eq!(frame_ends(&bytes).len(), 5);
        assert_eq!(decode_records(&bytes), (records, bytes.len()));
        // 65,536 one-byte chars: the first run holds 65,535 bytes.
        let records: Vec<Record> = (0..65_536).map(|j| ins(pid(10 + j), "a", false)).collect();
        let bytes = encode_records(&records);
        assert_eq!(frame_ends(&bytes).len(), 2);
        assert_eq!(decode_records(&bytes), (records, bytes.len()));
    }

    #[test]
    fn a_log_written_before_runs_still_reads() {
        let records = mixed();
        let old = encode_records_v1(&records);
        assert_eq!(decode_records(&old), (records.clone(), old.len()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.md.latest_ops");
        fs::write(&path, &old).unwrap();
        let (mut log, recs) = LogFile::open(&path).unwrap();
        assert_eq!(recs, records);
        // Appends go after it (continuing its last record, a delete).
        log.append(&[del(pid(2), false)]).unwrap();
        drop(log);
        let (_, recs) = LogFile::open(&path).unwrap();
        assert_eq!(recs.len(), records.len() + 1);
        assert_eq!(
            frame_ends(&fs::read(&path).unwrap()).len(),
            records.len() + 1
        );
    }

    #[test]
    fn appends_of_one_char_each_continue_the_last_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.md.latest_ops");
        let (mut log, _) = LogFile::open(&path).unwrap();
        let mut all = Vec::new();
        let text = "typed one keystroke at a time";
        for (j, ch) in text.chars().enumerate() {
            let r = ins(deep(1000 + j as u32), &ch.to_string(), false);
            log.append(std::slice::from_ref(&r)).unwrap();
            all.push(r);
        }
        // Backspacing the last three: cancels stepping backwards.
        for j in 0..3 {
            let r = Record::Cancel {
                pid: deep(1000 + text.len() as u32 - 1 - j),
            };
            log.append(std::slice::from_ref(&r)).unwrap();
            all.push(r);
        }
        let bytes = fs::read(&path).unwrap();
        // The first char (23 bytes) and the first cancel (20) are whole
        // records; every other append is 11 bytes (a kind 9 record, one
        // ASCII char) or 12 (kind 10), whatever the id's depth.
        assert_eq!(bytes.len(), 23 + (text.len() - 1) * 11 + 20 + 2 * 12);
        assert_eq!(decode_records(&bytes).0, all);
        drop(log);
        // After a reopen, appends still continue the file's last record.
        let (mut log, recs) = LogFile::open(&path).unwrap();
        assert_eq!(recs, all);
        let r = Record::Cancel {
            pid: deep(1000 + text.len() as u32 - 4),
        };
        log.append(std::slice::from_ref(&r)).unwrap();
        all.push(r);
        assert_eq!(fs::read(&path).unwrap().len(), bytes.len() + 12);
        // A torn continuation is dropped on open, and the next append
        // continues what is left.
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0, 0, 0, 5, MORE_IDS, BACKWARDS]).unwrap();
        drop(f);
        let (mut log, recs) = LogFile::open(&path).unwrap();
        assert_eq!(recs, all);
        let r = Record::Cancel {
            pid: deep(1000 + text.len() as u32 - 5),
        };
        log.append(std::slice::from_ref(&r)).unwrap();
        all.push(r);
        // Compaction rewrites the log; appends continue its last record.
        log.rewrite(&all[..5]).unwrap();
        let r = ins(deep(1005), "!", false);
        log.append(std::slice::from_ref(&r)).unwrap();
        drop(log);
        let (_, recs) = LogFile::open(&path).unwrap();
        assert_eq!(recs, [&all[..5], &[r]].concat());
        assert_eq!(frame_ends(&fs::read(&path).unwrap()).len(), 2);
    }

    /// A log of these payloads, each framed and checksummed.
    fn framed(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            out.extend_from_slice(&(p.len() as u32).to_be_bytes());
            out.extend_from_slice(p);
            out.extend_from_slice(&crc32fast::hash(p).to_be_bytes());
        }
        out
    }

    #[test]
    fn malformed_runs_and_ranges_end_the_log() {
        let one = encode_records(&[ins(pid(5), "a", false)]);
        let first: &[u8] = &one[4..one.len() - 4];
        let pid_max: &[u8] = &[1, 1, 0xff, 0xff, 0xff, 0xff];
        let bad: Vec<Vec<u8>> = vec![
            // Continuations of the wrong op, or empty.
            vec![MORE_IDS, 0, 0, 1],
            vec![MORE_INSERTS, 0],
            // Unknown flag bits; the sent bit on a continuation or cancel.
            [&[INSERT_RUN, 4], pid_max, &[0, 1, b'a']].concat(),
            vec![MORE_INSERTS, SENT, b'b'],
            [&[CANCEL_RANGE, SENT], pid_max, &[0, 1]].concat(),
            // Empty, cut short, too long, not UTF-8, past the last ident.
            [&[DELETE_RANGE, 0], pid_max, &[0, 0]].concat(),
            [&[DELETE_RANGE, 0], pid_max, &[0]].concat(),
            [&[DELETE_RANGE, 0], pid_max, &[0, 1, 0]].concat(),
            [&[INSERT_RUN, 0], pid_max, &[0, 2, b'a']].concat(),
            [&[INSERT_RUN, 0], pid_max, &[0, 2, 0xc3, 0x28]].concat(),
            [&[INSERT_RUN, 0], pid_max, &[0, 2, b'a', b'b']].concat(),
            [&[DELETE_RANGE, 0], pid_max, &[0, 2]].concat(),
            vec![DELETE_RANGE, 0, 1, 0, 0, 0, 0, 9, 0, 1],
            vec![DELETE_RANGE, 0, 0, 0, 1],
            vec![11, 0],
        ];
        for p in &bad {
            let log = framed(&[first, p]);
            let (recs, valid) = decode_records(&log);
            assert_eq!((recs.len(), valid), (1, first.len() + 8), "{p:?}");
        }
        // A continuation with nothing before it, or after a delete.
        for p in [&[MORE_INSERTS, 0, b'b'][..], &[MORE_IDS, 0, 0, 1]] {
            assert_eq!(decode_records(&framed(&[p])), (Vec::new(), 0));
        }
        let d = encode_records(&[del(pid(5), false)]);
        let log = framed(&[&d[4..d.len() - 4], &[MORE_INSERTS, 0, b'b']]);
        assert_eq!(decode_records(&log).0.len(), 1);
        // After an insert, it continues it.
        let log = framed(&[first, &[MORE_INSERTS, 0, b'b']]);
        let (recs, _) = decode_records(&log);
        assert_eq!(recs, [ins(pid(5), "a", false), ins(pid(6), "b", false)]);
        // A backward run down from ident 0 cannot be.
        let zero: &[u8] = &[1, 1, 0, 0, 0, 0];
        let log = framed(&[&[&[INSERT_RUN, BACKWARDS], zero, &[0, 2, b'a', b'b']].concat()]);
        assert_eq!(decode_records(&log), (Vec::new(), 0));
    }

    #[test]
    fn records_round_trip_and_torn_tails_are_dropped() {
        let records = vec![
            Record::Insert {
                atom: Atom::new("héllo", pid(5)).unwrap(),
                sent: false,
            },
            Record::Delete {
                pid: pid(9),
                sent: true,
            },
            Record::Cancel { pid: pid(5) },
            Record::MarkSent,
            Record::Rename {
                name: DocName::new("a note").unwrap(),
                sent: false,
            },
        ];
        let bytes = encode_records(&records);
        assert_eq!(decode_records(&bytes), (records.clone(), bytes.len()));
        // Every cut inside the last record drops exactly that record.
        let last = encode_records(&records[..4]).len();
        for cut in last..bytes.len() {
            let (got, valid) = decode_records(&bytes[..cut]);
            assert_eq!(got, records[..4]);
            assert_eq!(valid, last);
        }
        // A flipped bit in the last record's payload is caught by the crc.
        let mut bad = bytes.to_vec();
        bad[last + 6] ^= 0x40;
        assert_eq!(decode_records(&bad).0, records[..4]);
    }

    #[test]
    fn log_file_survives_reopen_and_truncates_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.md.latest_ops");
        let (mut log, recs) = LogFile::open(&path).unwrap();
        assert!(recs.is_empty());
        let r = vec![Record::Delete {
            pid: pid(1),
            sent: false,
        }];
        log.append(&r).unwrap();
        drop(log);
        // A torn write: half a record at the end.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&encode_records(&r)[..5]).unwrap();
        drop(f);
        let (_, recs) = LogFile::open(&path).unwrap();
        assert_eq!(recs, r);
        assert_eq!(fs::read(&path).unwrap(), &encode_records(&r)[..]);
    }

    /// One op of a generated log: the step from the previous id (0: a
    /// fresh id), what it is, and whether it ends its append.
    fn gen_records(ops: &[(i8, u8, bool)]) -> Vec<Vec<Record>> {
        let mut batches = vec![Vec::new()];
        let mut ident: u32 = 1000;
        let mut fresh = 0u32;
        for &(step, what, end) in ops {
            let p = if step == 0 {
                fresh += 1;
                ident = 1000;
                Pid::from_levels(&[Level::new(fresh, 2), Level::new(ident, 3)])
            } else {
                ident = ident.saturating_add_signed(i32::from(step.signum()));
                Pid::from_levels(&[Level::new(fresh, 2), Level::new(ident, 3)])
            };
            let r = match what % 8 {
                0 | 1 => ins(p, "a", false),
                2 => ins(p, "✓", true),
                3 => del(p, what & 8 != 0),
                4 => Record::Cancel { pid: p },
                5 => Record::MarkSent,
                6 => ins(p, "ab", false),
                _ => del(p, true),
            };
            batches.last_mut().expect("one").push(r);
            if end {
                batches.push(Vec::new());
            }
        }
        batches
    }

    proptest::proptest! {
        #[test]
        fn any_records_in_any_appends_read_back_whole(
            ops in proptest::collection::vec((-1i8..=1, 0u8..16, proptest::bool::ANY), 0..80),
            cut in 0usize..4000,
        ) {
            let batches = gen_records(&ops);
            let all: Vec<Record> = batches.concat();
            // In one go (compaction) and append by append (edits).
            let whole = encode_records(&all);
            proptest::prop_assert_eq!(decode_records(&whole), (all.clone(), whole.len()));
            let mut tail = None;
            let mut appended = BytesMut::new();
            let mut ends = Vec::new();
            for b in &batches {
                appended.extend_from_slice(&encode_after(b, &mut tail));
                ends.push((appended.len(), b.len()));
            }
            proptest::prop_assert_eq!(appended.len(), appended_len(&batches));
            let (got, valid, t) = decode_with_tail(&appended);
            proptest::prop_assert_eq!(&got, &all);
            proptest::prop_assert_eq!(valid, appended.len());
            proptest::prop_assert_eq!(t, tail);
            // A torn append loses at most that append's records.
            let cut = cut % (appended.len() + 1);
            let (part, _) = decode_records(&appended[..cut]);
            let before: usize = ends.iter().filter(|e| e.0 <= cut).map(|e| e.1).sum();
            proptest::prop_assert!(all.starts_with(&part));
            proptest::prop_assert!(part.len() >= before);
        }
    }
}
