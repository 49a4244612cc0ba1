//! The offline op log: what this replica changed and the server has not yet
//! acknowledged, for one document.
//!
//! Two halves: [`Pending`] is the in-memory state and its rules (sans-IO);
//! [`LogFile`] is its durable form, `<note>.md.latest_ops`.
//!
//! Rules (the seed's: bytes sent are proportional to the new text):
//! - An insert followed by a delete of that same atom, while the insert has
//!   never been sent, cancels out: neither is ever sent, and the atom is
//!   forgotten as if it never existed.
//! - Once an op may have left the device it is *sent*: it is re-sent exactly
//!   as it was until the server acknowledges it (the server applies re-sends
//!   idempotently). Sentness is made durable before the bytes leave, so a
//!   crash can never make a sent insert look cancellable.
//! - An op leaves the log only when acknowledged (34 after an upsert, 69 in
//!   a session).
//!
//! File format: a sequence of records `u32 len (BE) | payload | u32 crc32
//! (BE) of payload`. A record that is cut short or fails its checksum ends
//! the log: it and everything after it are dropped (a torn last write),
//! never misread. Payload: `u8 kind` then
//! 1 insert: `u8 sent, u8 len, data, pid (wire form)`;
//! 2 delete: `u8 sent, pid`;
//! 3 cancel: `pid` (forget a never-sent insert);
//! 4 mark_sent: nothing (every op so far is sent);
//! 5 rename: `u8 sent, name ..0A`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::{Buf, BufMut, BytesMut};
use notesync_protocol::{Atom, DocName, FrameDecoder, Pid, ServerFrame};

use crate::doc::LocalOp;

/// One durable record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Insert { atom: Atom, sent: bool },
    Delete { pid: Pid, sent: bool },
    Cancel { pid: Pid },
    MarkSent,
    Rename { name: DocName, sent: bool },
}

/// Pending ops of one document, in memory.
#[derive(Debug, Clone, Default)]
pub struct Pending {
    /// Inserts not yet acknowledged: id -> (data, sent).
    inserts: BTreeMap<Pid, (String, bool)>,
    /// Deletes not yet acknowledged: id -> sent.
    deletes: BTreeMap<Pid, bool>,
    rename: Option<(DocName, bool)>,
    /// Cancels not yet reflected in the structure file.
    cancels: Vec<Pid>,
    /// Every pending op in the order it was made, so a live session sends
    /// only what is newer than what it already sent (not a full snapshot
    /// per keystroke).
    order: BTreeMap<u64, OpKey>,
    seq_of: std::collections::HashMap<OpKey, u64>,
    next_seq: u64,
}

/// Names one pending op.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OpKey {
    Insert(Pid),
    Delete(Pid),
    Rename,
}

/// One pending op, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PendingOp {
    Insert(Atom),
    Delete(Pid),
    Rename(DocName),
}

/// What recording local ops did.
#[derive(Debug, Default)]
pub struct Recorded {
    /// Append these to the log (then fsync) before reporting the edit done.
    pub records: Vec<Record>,
    /// Ids to remove from the document: never-sent inserts now cancelled.
    pub forget: Vec<Pid>,
    /// The ops that remain to be sent (cancelled pairs removed).
    pub to_send: Vec<LocalOp>,
}

impl Pending {
    fn enqueue(&mut self, key: OpKey) {
        self.dequeue(&key);
        self.next_seq += 1;
        self.order.insert(self.next_seq, key.clone());
        self.seq_of.insert(key, self.next_seq);
    }

    fn dequeue(&mut self, key: &OpKey) {
        if let Some(seq) = self.seq_of.remove(key) {
            self.order.remove(&seq);
        }
    }

    /// Pending ops made after sequence number `after`, in order, with their
    /// sequence numbers (a live session's "not yet sent on this connection").
    pub fn ops_since(&self, after: u64) -> Vec<(u64, PendingOp)> {
        self.order
            .range(after + 1..)
            .filter_map(|(&seq, key)| {
                let op = match key {
                    OpKey::Insert(p) => {
                        let (d, _) = self.inserts.get(p)?;
                        PendingOp::Insert(
                            Atom::new(d.clone(), p.clone()).expect("pending atoms are valid"),
                        )
                    }
                    OpKey::Delete(p) => PendingOp::Delete(p.clone()),
                    OpKey::Rename => PendingOp::Rename(self.rename.as_ref()?.0.clone()),
                };
                Some((seq, op))
            })
            .collect()
    }

    /// Acknowledges one op (a session ack covers ops one by one).
    pub fn acknowledge_one(&mut self, key: &OpKey, rename: Option<&DocName>) {
        match key {
            OpKey::Insert(p) => self.acknowledge(std::slice::from_ref(p), &[], None),
            OpKey::Delete(p) => self.acknowledge(&[], std::slice::from_ref(p), None),
            OpKey::Rename => self.acknowledge(&[], &[], rename),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.inserts.is_empty() && self.deletes.is_empty() && self.rename.is_none()
    }

    pub fn len(&self) -> usize {
        self.inserts.len() + self.deletes.len() + self.rename.is_some() as usize
    }

    pub fn has_insert(&self, pid: &Pid) -> bool {
        self.inserts.contains_key(pid)
    }

    /// A rename not yet acknowledged.
    pub fn pending_rename(&self) -> Option<&DocName> {
        self.rename.as_ref().map(|r| &r.0)
    }

    pub fn is_unsent_insert(&self, pid: &Pid) -> bool {
        self.inserts.get(pid).is_some_and(|(_, sent)| !sent)
    }

    /// Records local ops. `sent`: they are about to be sent right away (a
    /// live session), so they must never be cancelled.
    pub fn record(&mut self, ops: Vec<LocalOp>, sent: bool) -> Recorded {
        let mut out = Recorded::default();
        for op in ops {
            match op {
                LocalOp::Insert(atom) => {
                    self.inserts
                        .insert(atom.pid().clone(), (atom.data().to_owned(), sent));
                    self.enqueue(OpKey::Insert(atom.pid().clone()));
                    out.records.push(Record::Insert {
                        atom: atom.clone(),
                        sent,
                    });
                    out.to_send.push(LocalOp::Insert(atom));
                }
                LocalOp::Delete(pid) => {
                    if self.is_unsent_insert(&pid) {
                        let (data, _) = self.inserts.remove(&pid).expect("checked");
                        self.dequeue(&OpKey::Insert(pid.clone()));
                        // Deletes of its chars (PROTOCOL.md 1.2) go with it.
                        if data.chars().nth(1).is_some() {
                            self.drop_char_deletes(std::slice::from_ref(&pid));
                        }
                        self.cancels.push(pid.clone());
                        out.records.push(Record::Cancel { pid: pid.clone() });
                        // It may be in this very batch's to_send.
                        out.to_send
                            .retain(|op| !matches!(op, LocalOp::Insert(a) if *a.pid() == pid));
                        out.forget.push(pid);
                    } else {
                        self.deletes.insert(pid.clone(), sent);
                        self.enqueue(OpKey::Delete(pid.clone()));
                        out.records.push(Record::Delete {
                            pid: pid.clone(),
                            sent,
                        });
                        out.to_send.push(LocalOp::Delete(pid));
                    }
                }
            }
        }
        out
    }

    pub fn record_rename(&mut self, name: DocName, sent: bool) -> Record {
        self.rename = Some((name.clone(), sent));
        self.enqueue(OpKey::Rename);
        Record::Rename { name, sent }
    }

    /// Replays a record read back from the log. Returns an id to forget.
    pub fn replay(&mut self, r: &Record) -> Option<Pid> {
        match r {
            Record::Insert { atom, sent } => {
                self.inserts
                    .insert(atom.pid().clone(), (atom.data().to_owned(), *sent));
                self.enqueue(OpKey::Insert(atom.pid().clone()));
                None
            }
            Record::Delete { pid, sent } => {
                let was_sent = self.deletes.get(pid).copied().unwrap_or(false);
                self.deletes.insert(pid.clone(), *sent || was_sent);
                if !self.seq_of.contains_key(&OpKey::Delete(pid.clone())) {
                    self.enqueue(OpKey::Delete(pid.clone()));
                }
                None
            }
            Record::Cancel { pid } => {
                self.inserts.remove(pid);
                self.dequeue(&OpKey::Insert(pid.clone()));
                self.cancels.push(pid.clone());
                Some(pid.clone())
            }
            Record::MarkSent => {
                self.mark_sent();
                None
            }
            Record::Rename { name, sent } => {
                self.rename = Some((name.clone(), *sent));
                self.enqueue(OpKey::Rename);
                None
            }
        }
    }

    /// Every pending op is now (about to be) sent.
    pub fn mark_sent(&mut self) {
        self.inserts.values_mut().for_each(|v| v.1 = true);
        self.deletes.values_mut().for_each(|v| *v = true);
        if let Some(r) = &mut self.rename {
            r.1 = true;
        }
    }

    /// The ops to send in an upsert: every pending insert and delete.
    pub fn snapshot(&self) -> (Vec<Atom>, Vec<Pid>, Option<DocName>) {
        let inserts = self
            .inserts
            .iter()
            .map(|(p, (d, _))| Atom::new(d.clone(), p.clone()).expect("pending atoms are valid"))
            .collect();
        let deletes = self.deletes.keys().cloned().collect();
        (inserts, deletes, self.rename.as_ref().map(|r| r.0.clone()))
    }

    /// The server acknowledged these ops (an upsert's 34, or a session ack).
    pub fn acknowledge(&mut self, inserts: &[Pid], deletes: &[Pid], rename: Option<&DocName>) {
        for p in inserts {
            if self.inserts.remove(p).is_some() {
                self.dequeue(&OpKey::Insert(p.clone()));
            }
        }
        for p in deletes {
            if self.deletes.remove(p).is_some() {
                self.dequeue(&OpKey::Delete(p.clone()));
            }
        }
        if rename.is_some() && self.rename.as_ref().map(|r| &r.0) == rename {
            self.rename = None;
            self.dequeue(&OpKey::Rename);
        }
    }

    /// Drops pending deletes of the chars of these atoms (ids that never
    /// left the device, so neither do their chars).
    fn drop_char_deletes(&mut self, atoms: &[Pid]) {
        for atom in atoms {
            // An atom's char ids extend its id, so in key order they follow
            // it directly: a range, not a scan.
            let chars: Vec<Pid> = self
                .deletes
                .range(atom.clone()..)
                .map(|(d, _)| d)
                .take_while(|d| d.key().starts_with(atom.key()))
                .filter(|d| d.depth() == atom.depth() + 1)
                .cloned()
                .collect();
            for d in chars {
                self.deletes.remove(&d);
                self.dequeue(&OpKey::Delete(d));
            }
        }
    }

    /// Swaps coalesced inserts: `removed` (never sent) become `added`.
    pub fn swap_coalesced(&mut self, removed: &[Pid], added: &[Atom]) -> Vec<Record> {
        let mut records = Vec::with_capacity(removed.len() + added.len());
        for p in removed {
            self.inserts.remove(p);
            self.dequeue(&OpKey::Insert(p.clone()));
            self.cancels.push(p.clone());
            records.push(Record::Cancel { pid: p.clone() });
        }
        // Deletes of chars of atoms that never left the device go with them.
        self.drop_char_deletes(removed);
        for a in added {
            self.inserts
                .insert(a.pid().clone(), (a.data().to_owned(), false));
            self.enqueue(OpKey::Insert(a.pid().clone()));
            records.push(Record::Insert {
                atom: a.clone(),
                sent: false,
            });
        }
        records
    }

    /// The structure file now reflects every cancel: they can be dropped.
    pub fn structure_saved(&mut self) {
        self.cancels.clear();
    }

    /// The records that rebuild this state from the last saved structure
    /// (for compacting the log file).
    pub fn to_records(&self) -> Vec<Record> {
        let mut out: Vec<Record> = self
            .cancels
            .iter()
            .map(|p| Record::Cancel { pid: p.clone() })
            .collect();
        for (p, (d, sent)) in &self.inserts {
            out.push(Record::Insert {
                atom: Atom::new(d.clone(), p.clone()).expect("pending atoms are valid"),
                sent: *sent,
            });
        }
        for (p, sent) in &self.deletes {
            out.push(Record::Delete {
                pid: p.clone(),
                sent: *sent,
            });
        }
        if let Some((name, sent)) = &self.rename {
            out.push(Record::Rename {
                name: name.clone(),
                sent: *sent,
            });
        }
        out
    }
}

/// Encodes a record's payload.
fn encode_payload(r: &Record, out: &mut BytesMut) {
    match r {
        Record::Insert { atom, sent } => {
            out.put_u8(1);
            out.put_u8(*sent as u8);
            out.put_u8(atom.data().len() as u8);
            out.put_slice(atom.data().as_bytes());
            atom.pid().write_wire(out);
        }
        Record::Delete { pid, sent } => {
            out.put_u8(2);
            out.put_u8(*sent as u8);
            pid.write_wire(out);
        }
        Record::Cancel { pid } => {
            out.put_u8(3);
            pid.write_wire(out);
        }
        Record::MarkSent => out.put_u8(4),
        Record::Rename { name, sent } => {
            out.put_u8(5);
            out.put_u8(*sent as u8);
            out.put_slice(name.as_str().as_bytes());
            out.put_u8(b'\n');
        }
    }
}

pub fn encode_records(records: &[Record]) -> BytesMut {
    let mut out = BytesMut::new();
    let mut payload = BytesMut::new();
    for r in records {
        payload.clear();
        encode_payload(r, &mut payload);
        out.put_u32(payload.len() as u32);
        out.put_slice(&payload);
        out.put_u32(crc32fast::hash(&payload));
    }
    out
}

/// Decodes a payload, reusing the protocol decoder's validation for atoms,
/// ids and names (a 65/66/67 frame has the same layout after its header).
fn decode_payload(p: &[u8]) -> Option<Record> {
    let (&kind, rest) = p.split_first()?;
    let frame = |header: u8, body: &[u8]| -> Option<ServerFrame> {
        let mut buf = BytesMut::with_capacity(body.len() + 1);
        buf.put_u8(header);
        buf.put_slice(body);
        let f = FrameDecoder::<ServerFrame>::default()
            .decode(&mut buf)
            .ok()??;
        buf.is_empty().then_some(f)
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
            let mut b = vec![creator_site];
            b.extend_from_slice(body);
            match frame(65, &b)? {
                ServerFrame::Insert(i) => Some(Record::Insert {
                    atom: i.atom,
                    sent: sent(s)?,
                }),
                _ => None,
            }
        }
        2 => {
            let (&s, body) = rest.split_first()?;
            let mut b = vec![0];
            b.extend_from_slice(body);
            match frame(66, &b)? {
                ServerFrame::Delete(d) => Some(Record::Delete {
                    pid: d.pid,
                    sent: sent(s)?,
                }),
                _ => None,
            }
        }
        3 => {
            let mut b = vec![0];
            b.extend_from_slice(rest);
            match frame(66, &b)? {
                ServerFrame::Delete(d) => Some(Record::Cancel { pid: d.pid }),
                _ => None,
            }
        }
        4 if rest.is_empty() => Some(Record::MarkSent),
        5 => {
            let (&s, body) = rest.split_first()?;
            match frame(67, body)? {
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
pub fn decode_records(mut bytes: &[u8]) -> (Vec<Record>, usize) {
    let total = bytes.len();
    let mut out = Vec::new();
    loop {
        let valid = total - bytes.len();
        if bytes.len() < 4 {
            return (out, valid);
        }
        let len = (&bytes[..4]).get_u32() as usize;
        if bytes.len() < 4 + len + 4 {
            return (out, valid);
        }
        let payload = &bytes[4..4 + len];
        let crc = (&bytes[4 + len..8 + len]).get_u32();
        if crc32fast::hash(payload) != crc {
            return (out, valid);
        }
        match decode_payload(payload) {
            Some(r) => out.push(r),
            None => return (out, valid),
        }
        bytes = &bytes[8 + len..];
    }
}

/// The durable op log file of one document.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: File,
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
        let (records, valid) = decode_records(&bytes);
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
            },
            records,
        ))
    }

    /// Appends records and fsyncs: only then is an edit reported done.
    pub fn append(&mut self, records: &[Record]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        self.file.write_all(&encode_records(records))?;
        self.file.sync_data()
    }

    /// Replaces the whole log atomically (compaction).
    pub fn rewrite(&mut self, records: &[Record]) -> io::Result<()> {
        crate::fsutil::write_atomic(&self.path, &encode_records(records))?;
        self.file = OpenOptions::new()
            .append(true)
            .read(true)
            .open(&self.path)?;
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
    use notesync_protocol::Level;

    fn pid(i: u32) -> Pid {
        Pid::from_levels(&[Level::new(i, 1)])
    }

    fn ins(i: u32, d: &str) -> LocalOp {
        LocalOp::Insert(Atom::new(d, pid(i)).unwrap())
    }

    #[test]
    fn unsent_insert_then_delete_cancels_out() {
        let mut p = Pending::default();
        p.record(vec![ins(1, "a"), ins(2, "b")], false);
        let r = p.record(vec![LocalOp::Delete(pid(1))], false);
        assert_eq!(r.forget, vec![pid(1)]);
        assert!(r.to_send.is_empty());
        let (inserts, deletes, _) = p.snapshot();
        assert_eq!(inserts.len(), 1);
        assert!(deletes.is_empty());
        // Within one batch too.
        let r = p.record(vec![ins(3, "c"), LocalOp::Delete(pid(3))], false);
        assert!(r.to_send.is_empty());
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn sent_insert_is_never_cancelled() {
        let mut p = Pending::default();
        p.record(vec![ins(1, "a")], false);
        p.mark_sent();
        let r = p.record(vec![LocalOp::Delete(pid(1))], false);
        assert!(r.forget.is_empty());
        assert_eq!(r.to_send, vec![LocalOp::Delete(pid(1))]);
        let (inserts, deletes, _) = p.snapshot();
        assert_eq!((inserts.len(), deletes.len()), (1, 1));
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
}
