//! The folder's memory of each note's file: its *base*, the file name and
//! text the folder last read from or wrote to it, and the record of a take
//! in progress (see [`super::take`]).
//!
//! On disk, in `.notesync/cli/` inside the store's folder:
//!
//! ```text
//! bases       the journal: records u32 len (BE) | payload | u32 crc32 (BE)
//!             of payload; payload u8 kind, 16-byte note id (BE), then
//!             kind 1 (base): u32 file name length (BE), file name, text;
//!             kind 2 (gone): nothing. The last record of an id wins.
//! <id>.take   file name, "\n", byte length of the file's text, "\n",
//!             the file's text, then the note's text once the take is done
//! <id>.base   (before the journal: one file per base, "name\ntext"; read
//!             once, moved into the journal, removed)
//! ```
//!
//! (`<id>`: the note's id, 32 hex digits.) Why one journal: a batch of
//! files picked up or written back is one append and one fsync
//! ([`Bases::sync`]), not a file, an fsync and a folder entry per note.
//! Records wait in memory until then; lost in a crash, a base is only
//! older than its file, and the folder's rules recover from that (a file
//! that already holds its note's text is taken as its base). A record
//! cut short or failing its checksum ends the journal (a torn last
//! append); the journal is rewritten compacted, atomically, when its dead
//! records outweigh the live ones. A `.take` is written atomically and
//! exists only while a file's edits are being taken into its note.
//!
//! May touch: that folder only.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use notesync_protocol::DocId;

use super::is_note_file;
use crate::fsutil::{FileError, at, crash_point, next_frame, put_frame, sync_dir, write_atomic};

/// Where the bases live, inside the store's own folder.
const BASE_DIR: &str = ".notesync/cli";

/// The journal's file name in [`BASE_DIR`].
const JOURNAL: &str = "bases";

const KIND_BASE: u8 = 1;
const KIND_GONE: u8 = 2;

/// A record's frame around its payload: length and checksum.
const FRAME: usize = 8;

/// The journal is compacted once it is larger than this many times its
/// live records (plus [`COMPACT_SLACK`]).
const COMPACT_RATIO: u64 = 3;
const COMPACT_SLACK: u64 = 1 << 20;

/// What the folder last read from or wrote to a note's file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Base {
    pub file: String,
    pub text: String,
}

/// A take that had begun when the process stopped: the file `file` held
/// `text`, and its note's text was to become `want`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Take {
    pub id: DocId,
    pub file: String,
    pub text: String,
    pub want: String,
}

/// Every note's base, in memory and in the journal.
#[derive(Debug)]
pub(super) struct Bases {
    dir: PathBuf,
    bases: HashMap<DocId, Base>,
    /// Notes whose base changed since it was last written to the journal
    /// (their record is made from `bases` when written: the latest wins).
    queued: BTreeSet<DocId>,
    /// The length of the journal's valid part.
    journal_len: u64,
    /// What the live bases take in the journal ([`record_len`] each).
    live_len: u64,
}

impl Bases {
    /// Loads the bases of the store in `store_dir`, and the takes that had
    /// begun and not ended; moves the bases of the one-file-per-base form
    /// into the journal.
    pub fn load(store_dir: &Path) -> Result<(Bases, Vec<Take>), FileError> {
        let dir = store_dir.join(BASE_DIR);
        let mut bases = Bases {
            dir,
            bases: HashMap::new(),
            queued: BTreeSet::new(),
            journal_len: 0,
            live_len: 0,
        };
        let mut takes = Vec::new();
        let entries = match fs::read_dir(&bases.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((bases, takes)),
            Err(e) => return Err(at(&bases.dir)(e)),
        };
        let mut legacy = Vec::new();
        for entry in entries {
            let entry = entry.map_err(at(&bases.dir))?;
            let name = entry.file_name();
            let Some((id, kind)) = name.to_str().and_then(parse_name) else {
                continue;
            };
            let path = entry.path();
            let bytes = fs::read(&path).map_err(at(&path))?;
            legacy.extend((kind == "base").then(|| path.clone()));
            let Ok(s) = String::from_utf8(bytes) else {
                continue;
            };
            // One that does not parse is dropped: the file is then compared
            // with the store's text instead. (Both were written atomically:
            // only a person's meddling makes one not parse.)
            let Some((file, rest)) = s.split_once('\n').filter(|(f, _)| is_note_file(f)) else {
                continue;
            };
            if kind == "base" {
                let (file, text) = (file.to_owned(), rest.to_owned());
                bases.insert(id, Base { file, text });
            } else if let Some((len, rest)) = rest.split_once('\n')
                && let Ok(len) = len.parse::<usize>()
                && rest.is_char_boundary(len)
            {
                let (text, want) = rest.split_at(len);
                takes.push(Take {
                    id,
                    file: file.to_owned(),
                    text: text.to_owned(),
                    want: want.to_owned(),
                });
            }
        }
        // The journal is newer than any base file left beside it (a crash
        // while they were being removed).
        let journal = bases.journal_path();
        match fs::read(&journal) {
            Ok(bytes) => {
                let valid = bases.replay(&bytes);
                bases.journal_len = valid as u64;
                if valid < bytes.len() {
                    tracing::warn!(
                        path = %journal.display(),
                        dropped = bytes.len() - valid,
                        "the bases journal had a torn or corrupt tail; dropped it"
                    );
                }
                if valid < bytes.len() || bases.wants_compacting() {
                    bases.compact()?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(at(&journal)(e)),
        }
        if !legacy.is_empty() {
            bases.compact()?;
            for path in &legacy {
                remove_if_there(path)?;
            }
            sync_dir(&bases.dir).map_err(at(&bases.dir))?;
        }
        Ok((bases, takes))
    }

    /// Applies the journal's records; returns the length of its valid part.
    fn replay(&mut self, bytes: &[u8]) -> usize {
        let mut at = 0;
        while let Some((kind, id, body, next)) = next_record(bytes, at) {
            match kind {
                KIND_BASE => {
                    let Some(base) = decode_base(body) else { break };
                    self.insert(id, base);
                }
                KIND_GONE if body.is_empty() => {
                    self.remove(id);
                }
                _ => break,
            }
            at = next;
        }
        at
    }

    pub fn get(&self, id: DocId) -> Option<&Base> {
        self.bases.get(&id)
    }

    pub fn ids(&self) -> impl Iterator<Item = DocId> + '_ {
        self.bases.keys().copied()
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL)
    }

    fn take_path(&self, id: DocId) -> PathBuf {
        self.dir.join(format!("{id:032x}.take"))
    }

    /// Makes `text` in `file` the note's base, durable at the next
    /// [`Bases::sync`].
    pub fn set(&mut self, id: DocId, file: &str, text: &str) {
        if self
            .bases
            .get(&id)
            .is_some_and(|b| b.file == file && b.text == text)
        {
            return;
        }
        self.queued.insert(id);
        let (file, text) = (file.to_owned(), text.to_owned());
        self.insert(id, Base { file, text });
    }

    fn insert(&mut self, id: DocId, base: Base) {
        self.live_len += record_len(&base);
        if let Some(old) = self.bases.insert(id, base) {
            self.live_len -= record_len(&old);
        }
    }

    fn remove(&mut self, id: DocId) -> bool {
        let old = self.bases.remove(&id);
        if let Some(old) = &old {
            self.live_len -= record_len(old);
        }
        old.is_some()
    }

    /// Forgets a note's base, durably at the next [`Bases::sync`].
    pub fn drop(&mut self, id: DocId) {
        if self.remove(id) {
            self.queued.insert(id);
        }
    }

    /// The notes whose bases wait for [`Bases::sync`].
    pub fn unsynced(&self) -> Vec<DocId> {
        self.queued.iter().copied().collect()
    }

    /// Makes the queued records of the notes `ready` says may have them
    /// (their logs are durable) durable, in one append and one fsync; the
    /// others stay queued.
    pub fn sync(&mut self, ready: impl Fn(DocId) -> bool) -> Result<(), FileError> {
        let (now, later): (BTreeSet<DocId>, BTreeSet<DocId>) = std::mem::take(&mut self.queued)
            .into_iter()
            .partition(|id| ready(*id));
        self.queued = later;
        if now.is_empty() {
            return Ok(());
        }
        let path = self.journal_path();
        let new = self.journal_len == 0;
        if new {
            fs::create_dir_all(&self.dir).map_err(at(&self.dir))?;
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(at(&path))?;
        // A torn tail left by a failed append would hide what follows it.
        if f.metadata().map_err(at(&path))?.len() != self.journal_len {
            f.set_len(self.journal_len).map_err(at(&path))?;
        }
        // Record by record through a small buffer: the batch's texts are
        // never copied whole.
        let mut out = BufWriter::new(&mut f);
        let mut rec = Vec::new();
        let mut written = 0;
        for id in now {
            rec.clear();
            match self.bases.get(&id) {
                Some(b) => push_record(
                    &mut rec,
                    KIND_BASE,
                    id,
                    &[&encode_base(&b.file), b.text.as_bytes()],
                ),
                None => push_record(&mut rec, KIND_GONE, id, &[]),
            }
            out.write_all(&rec).map_err(at(&path))?;
            written += rec.len();
        }
        out.flush().map_err(at(&path))?;
        drop(out);
        f.sync_data().map_err(at(&path))?;
        if new {
            sync_dir(&self.dir).map_err(at(&self.dir))?;
        }
        crash_point();
        self.journal_len += written as u64;
        if self.wants_compacting() {
            self.compact()?;
        }
        Ok(())
    }

    fn wants_compacting(&self) -> bool {
        self.journal_len > COMPACT_RATIO * self.live_len + COMPACT_SLACK
    }

    /// Rewrites the journal with the live bases only, atomically; only
    /// while nothing is queued (a queued base may not be durable yet).
    fn compact(&mut self) -> Result<(), FileError> {
        if !self.queued.is_empty() {
            return Ok(());
        }
        let mut out = Vec::new();
        let mut ids: Vec<&DocId> = self.bases.keys().collect();
        ids.sort_unstable();
        for id in ids {
            let b = &self.bases[id];
            push_record(
                &mut out,
                KIND_BASE,
                *id,
                &[&encode_base(&b.file), b.text.as_bytes()],
            );
        }
        debug_assert_eq!(
            out.len() as u64,
            self.live_len,
            "record_len is each record's size"
        );
        fs::create_dir_all(&self.dir).map_err(at(&self.dir))?;
        let path = self.journal_path();
        write_atomic(&path, &out).map_err(at(&path))?;
        self.journal_len = out.len() as u64;
        Ok(())
    }

    /// Durably records that the file `file`, holding `text`, is being taken
    /// into its note, whose text is then `want`.
    pub fn begin_take(&mut self, take: &Take) -> Result<(), FileError> {
        let len = take.text.len().to_string();
        let parts = [&take.file, "\n", &len, "\n", &take.text, &take.want];
        fs::create_dir_all(&self.dir).map_err(at(&self.dir))?;
        let path = self.take_path(take.id);
        write_atomic(&path, parts.concat().as_bytes()).map_err(at(&path))
    }

    /// Durably forgets a take (done, or nothing left to do), after making
    /// every queued base durable (the caller has synced the logs of
    /// [`Bases::unsynced`]): the take's new base must outlive its record.
    pub fn end_take(&mut self, id: DocId) -> Result<(), FileError> {
        self.sync(|_| true)?;
        remove_if_there(&self.take_path(id))?;
        sync_dir(&self.dir).map_err(at(&self.dir))
    }
}

/// The bytes a base's record takes in the journal.
fn record_len(b: &Base) -> u64 {
    (FRAME + 1 + 16 + 4 + b.file.len() + b.text.len()) as u64
}

/// A base record's body before its text: the file name's length (BE) and
/// the file name.
fn encode_base(file: &str) -> Vec<u8> {
    let len = u32::try_from(file.len()).expect("a file name is short");
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(file.as_bytes());
    out
}

fn decode_base(body: &[u8]) -> Option<Base> {
    let len = u32::from_be_bytes(body.get(..4)?.try_into().ok()?) as usize;
    let file = std::str::from_utf8(body.get(4..4 + len)?).ok()?;
    let text = std::str::from_utf8(body.get(4 + len..)?).ok()?;
    is_note_file(file).then(|| Base {
        file: file.to_owned(),
        text: text.to_owned(),
    })
}

/// Appends one framed record: kind, id, then `parts` concatenated.
fn push_record(out: &mut Vec<u8>, kind: u8, id: DocId, parts: &[&[u8]]) {
    let mut payload = Vec::with_capacity(17 + parts.iter().map(|p| p.len()).sum::<usize>());
    payload.push(kind);
    payload.extend_from_slice(&id.to_be_bytes());
    for p in parts {
        payload.extend_from_slice(p);
    }
    put_frame(out, &payload);
}

/// The record at `at`: its kind, id, body and where the next begins;
/// `None` at the end, or where a record is cut short or fails its check.
fn next_record(bytes: &[u8], at: usize) -> Option<(u8, DocId, &[u8], usize)> {
    let (payload, next) = next_frame(bytes, at)?;
    let (&kind, rest) = payload.split_first()?;
    let id = DocId::from_be_bytes(rest.get(..16)?.try_into().ok()?);
    Some((kind, id, &rest[16..], next))
}

/// `<32 hex digits>.base` or `.take`: the id and which.
fn parse_name(name: &str) -> Option<(DocId, &'static str)> {
    let (hex, kind) = name.split_once('.')?;
    let kind = ["base", "take"].into_iter().find(|k| *k == kind)?;
    let id = u128::from_str_radix(hex, 16)
        .ok()
        .filter(|_| hex.len() == 32)?;
    Some((id, kind))
}

fn remove_if_there(path: &Path) -> Result<(), FileError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(at(path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(dir: &Path) -> PathBuf {
        dir.join(BASE_DIR).join(JOURNAL)
    }

    fn load(dir: &Path) -> Bases {
        Bases::load(dir).unwrap().0
    }

    fn base(file: &str, text: &str) -> Base {
        Base {
            file: file.into(),
            text: text.into(),
        }
    }

    #[test]
    fn bases_survive_a_reopen_once_synced_and_only_once_ready() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = load(dir.path());
        b.set(1, "a.md", "one");
        b.set(2, "b.md", "two");
        b.set(3, "c.md", "three");
        b.drop(3);
        // Note 2's log is not durable yet: its base waits.
        b.sync(|id| id != 2).unwrap();
        assert_eq!(b.unsynced(), [2]);
        let again = load(dir.path());
        assert_eq!(again.get(1), Some(&base("a.md", "one")));
        assert_eq!(again.get(2), None);
        assert_eq!(again.get(3), None);
        b.set(1, "a.md", "one more");
        b.sync(|_| true).unwrap();
        assert!(b.unsynced().is_empty());
        let again = load(dir.path());
        assert_eq!(again.get(1), Some(&base("a.md", "one more")));
        assert_eq!(again.get(2), Some(&base("b.md", "two")));
        // Unsynced records are only in memory: lost, the base is older.
        b.set(2, "b.md", "lost");
        drop(b);
        assert_eq!(load(dir.path()).get(2), Some(&base("b.md", "two")));
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_the_next_append_follows_the_valid_part() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = load(dir.path());
        b.set(1, "a.md", "one");
        b.sync(|_| true).unwrap();
        let valid = fs::metadata(journal(dir.path())).unwrap().len();
        b.set(2, "b.md", "two");
        b.sync(|_| true).unwrap();
        // Cut the second record short, and a record failing its check.
        for tail in [&b"\0\0\0\x20\x01\x02"[..], &[0, 0, 0, 1, 9, 0, 0, 0, 0]] {
            let mut bytes = fs::read(journal(dir.path())).unwrap();
            bytes.truncate(valid as usize);
            bytes.extend_from_slice(tail);
            fs::write(journal(dir.path()), &bytes).unwrap();
            let mut b = load(dir.path());
            assert_eq!(b.get(1), Some(&base("a.md", "one")));
            assert_eq!(b.get(2), None);
            b.set(3, "c.md", "three");
            b.sync(|_| true).unwrap();
            let again = load(dir.path());
            assert_eq!(again.get(1), Some(&base("a.md", "one")));
            assert_eq!(again.get(3), Some(&base("c.md", "three")));
        }
    }

    #[test]
    fn one_file_per_base_moves_into_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let cli = dir.path().join(BASE_DIR);
        fs::create_dir_all(&cli).unwrap();
        let id: DocId = 0xabc;
        fs::write(cli.join(format!("{id:032x}.base")), "a.md\nold text\n").unwrap();
        fs::write(cli.join("junk.base"), "x").unwrap();
        let b = load(dir.path());
        assert_eq!(b.get(id), Some(&base("a.md", "old text\n")));
        assert!(!cli.join(format!("{id:032x}.base")).exists());
        drop(b);
        assert_eq!(load(dir.path()).get(id), Some(&base("a.md", "old text\n")));
    }

    #[test]
    fn a_journal_of_mostly_dead_records_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = load(dir.path());
        let text = "x".repeat(4096);
        for k in 0..600 {
            b.set(1, "a.md", &format!("{k}{text}"));
            b.sync(|_| true).unwrap();
        }
        // 600 records of 4 KiB: past three times one live record plus
        // 1 MiB, so it was rewritten along the way.
        let len = fs::metadata(journal(dir.path())).unwrap().len();
        assert!(len < COMPACT_SLACK + 5 * 4096, "{len}");
        assert_eq!(
            load(dir.path()).get(1),
            Some(&base("a.md", &format!("599{text}")))
        );
    }
}
