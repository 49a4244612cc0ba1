//! The op log's durable form, `<note>.md.latest_ops`: the record codec
//! (format in the docs of [`crate::oplog`]) and [`LogFile`], which appends
//! with fsync, drops a torn tail on open and compacts by atomic rewrite.
//! Touches only its own file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::{Buf, BufMut, BytesMut};
use notesync_protocol::{FrameDecoder, ServerFrame};

use super::Record;

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
        self.file.sync_data()?;
        crate::fsutil::crash_point();
        Ok(())
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
    use notesync_protocol::{Atom, DocName, Level, Pid};

    fn pid(i: u32) -> Pid {
        Pid::from_levels(&[Level::new(i, 1)])
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
