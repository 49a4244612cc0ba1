//! Which notes are in memory. A note's whole model (its document, pending
//! ops and open log) is loaded when something uses it and leaves memory
//! again, least recently used first, once more than [`MAX_LOADED`] notes
//! (or [`MAX_LOADED_VAR`]) are loaded; the rest are *cold*: what the store needs to know of a note
//! without its model (its name, file, site, sync time, how many ops it
//! has pending). So a sync of a large folder reads the structure of the
//! notes it has something to do with, and holds a batch of them in
//! memory, not the folder.
//!
//! Why a note may leave memory: its structure file and its op log, replayed
//! on it, give its state (that is what opening the store does). A note
//! whose every change since its last save is in its log (local edits: an
//! import's new notes) leaves as it is; one with changes the log does not
//! hold (remote ops, acknowledgements, a new sync time: `Note::unlogged`)
//! is saved first, in a batch, as a flush saves.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::OnceLock;

use notesync_protocol::{DocId, DocName, Time};

use super::note::Note;
use super::structure::{self, Digest, digest};
use super::{Store, StoreError, io_err, note_paths};

/// Notes loaded at most, by default; past it, the least recently used
/// leave memory down to three quarters of it. Above a sync's window (32
/// requests in flight, each touching its note at its request and at its
/// reply), so the notes a sync is waiting for stay loaded.
pub(super) const MAX_LOADED: usize = 64;

/// The environment variable that sets another bound (at least 2): less
/// memory, or fewer notes read again; the crash tests set a small one so
/// that notes leave memory at every step of a small import.
pub const MAX_LOADED_VAR: &str = "NOTESYNC_MAX_LOADED";

/// The bound in force, and what a trim keeps.
pub(super) fn bounds() -> (usize, usize) {
    static MAX: OnceLock<usize> = OnceLock::new();
    let max = *MAX.get_or_init(|| {
        std::env::var(MAX_LOADED_VAR)
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(MAX_LOADED, |n: usize| n.max(2))
    });
    (max, max * 3 / 4)
}

/// A note the store knows.
#[derive(Debug)]
pub(super) enum Slot {
    /// Its whole model, and when it was last used (the store's clock).
    Loaded(Box<Note>, u64),
    Cold(Cold),
}

/// A note not in memory: what state.json says of it, its sync time (the
/// structure's header) and what its log holds.
#[derive(Debug)]
pub(super) struct Cold {
    pub name: DocName,
    pub stem: String,
    pub site: u8,
    pub provisional: bool,
    pub last_sync: Time,
    pub pending_ops: usize,
    pub pending_rename: bool,
    /// Its text's digest, if known without reading it (a version-2
    /// structure has none).
    pub digest: Option<Digest>,
    /// Its files lag its log (it left memory with local edits unsaved):
    /// the next flush loads and saves it.
    pub dirty: bool,
    /// Its log may hold unsynced appends (an import's first record, see
    /// `Note::from_file`): [`Store::sync_logs`] still syncs it.
    pub log_unsynced: bool,
}

impl Slot {
    pub fn name(&self) -> &DocName {
        match self {
            Slot::Loaded(n, _) => &n.doc.name,
            Slot::Cold(c) => &c.name,
        }
    }

    pub fn stem(&self) -> &str {
        match self {
            Slot::Loaded(n, _) => &n.stem,
            Slot::Cold(c) => &c.stem,
        }
    }

    pub fn site(&self) -> u8 {
        match self {
            Slot::Loaded(n, _) => n.site,
            Slot::Cold(c) => c.site,
        }
    }

    pub fn provisional(&self) -> bool {
        match self {
            Slot::Loaded(n, _) => n.provisional,
            Slot::Cold(c) => c.provisional,
        }
    }

    pub fn last_sync(&self) -> Time {
        match self {
            Slot::Loaded(n, _) => n.last_sync,
            Slot::Cold(c) => c.last_sync,
        }
    }

    pub fn pending_ops(&self) -> usize {
        match self {
            Slot::Loaded(n, _) => n.pending.len(),
            Slot::Cold(c) => c.pending_ops,
        }
    }

    pub fn pending_rename(&self) -> bool {
        match self {
            Slot::Loaded(n, _) => n.pending.pending_rename().is_some(),
            Slot::Cold(c) => c.pending_rename,
        }
    }

    pub fn dirty(&self) -> bool {
        match self {
            Slot::Loaded(n, _) => n.dirty,
            Slot::Cold(c) => c.dirty,
        }
    }

    pub fn loaded(&self) -> Option<&Note> {
        match self {
            Slot::Loaded(n, _) => Some(n),
            Slot::Cold(_) => None,
        }
    }
}

/// Every note's slot, and which of them are loaded: a trim looks at the
/// loaded ones only (a walk of every note's slot per load made a sync of
/// N notes cost O(N^2)).
#[derive(Debug, Default)]
pub(super) struct Slots {
    map: HashMap<DocId, Slot>,
    loaded: HashSet<DocId>,
}

impl Slots {
    pub fn insert(&mut self, id: DocId, slot: Slot) -> Option<Slot> {
        if matches!(slot, Slot::Loaded(..)) {
            self.loaded.insert(id);
        } else {
            self.loaded.remove(&id);
        }
        self.map.insert(id, slot)
    }

    pub fn remove(&mut self, id: &DocId) -> Option<Slot> {
        self.loaded.remove(id);
        self.map.remove(id)
    }

    /// A slot to change in place; never its kind (loaded or cold):
    /// [`Slots::insert`] does that, and keeps the loaded set right.
    pub fn get_mut(&mut self, id: &DocId) -> Option<&mut Slot> {
        self.map.get_mut(id)
    }

    pub fn loaded_notes_mut(&mut self) -> impl Iterator<Item = &mut Note> {
        self.map.values_mut().filter_map(|s| match s {
            Slot::Loaded(n, _) => Some(&mut **n),
            Slot::Cold(_) => None,
        })
    }

    /// The loaded notes' ids and when each was last used.
    fn loaded_uses(&self) -> impl Iterator<Item = (DocId, u64)> + '_ {
        self.loaded.iter().filter_map(|id| match self.map.get(id) {
            Some(Slot::Loaded(_, t)) => Some((*id, *t)),
            _ => None,
        })
    }
}

impl std::ops::Deref for Slots {
    type Target = HashMap<DocId, Slot>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

/// What opening the store does with a note it lists.
pub(super) enum OnDisk {
    Cold(Cold),
    Load { rewrite: bool },
}

impl Cold {
    /// A note of state.json as it is on disk, if it can stay cold: its
    /// log is empty (nothing to replay or count) and its structure's
    /// header names it and its text's digest. Otherwise it is to be loaded
    /// (a log to replay, or a header that needs the full read to explain
    /// itself) and, if its structure is of an older version, saved again
    /// (as version 3, so that the next open leaves it cold).
    pub fn from_disk(
        dir: &Path,
        id: DocId,
        name: &DocName,
        stem: &str,
        site: u8,
        provisional: bool,
    ) -> Result<OnDisk, StoreError> {
        let (_, st, log) = note_paths(dir, stem);
        match std::fs::metadata(&log) {
            Ok(m) if m.len() > 0 => return Ok(OnDisk::Load { rewrite: false }),
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&log)(e)),
            _ => {}
        }
        let (last_sync, digest) = match File::open(&st) {
            Ok(f) => {
                let mut head = Vec::with_capacity(structure::HEADER);
                f.take(structure::HEADER as u64)
                    .read_to_end(&mut head)
                    .map_err(io_err(&st))?;
                match structure::read_header(&head) {
                    Some(h) if h.id == id && h.digest.is_some() => (h.last_sync, h.digest),
                    Some(h) if h.id == id => return Ok(OnDisk::Load { rewrite: true }),
                    _ => return Ok(OnDisk::Load { rewrite: false }),
                }
            }
            // Listed, never saved: an empty note.
            Err(e) if e.kind() == io::ErrorKind::NotFound => (0, Some(digest(""))),
            Err(e) => return Err(io_err(&st)(e)),
        };
        Ok(OnDisk::Cold(Cold {
            name: name.clone(),
            stem: stem.to_owned(),
            site,
            provisional,
            last_sync,
            pending_ops: 0,
            pending_rename: false,
            digest,
            dirty: false,
            log_unsynced: false,
        }))
    }

    fn of(n: &Note) -> Cold {
        Cold {
            name: n.doc.name.clone(),
            stem: n.stem.clone(),
            site: n.site,
            provisional: n.provisional,
            last_sync: n.last_sync,
            pending_ops: n.pending.len(),
            pending_rename: n.pending.pending_rename().is_some(),
            digest: Some(digest(&n.doc.text())),
            dirty: n.dirty,
            log_unsynced: n.log.is_unsynced(),
        }
    }
}

impl Store {
    /// A note, loaded if it was cold.
    pub(super) fn note_mut(&mut self, id: DocId) -> Result<&mut Note, StoreError> {
        self.clock += 1;
        let now = self.clock;
        let cold = match self.notes.get(&id) {
            None => return Err(StoreError::UnknownNote(id)),
            Some(Slot::Loaded(..)) => None,
            Some(Slot::Cold(c)) => Some((
                c.name.clone(),
                c.stem.clone(),
                c.site,
                c.provisional,
                c.log_unsynced,
            )),
        };
        if let Some((name, stem, site, provisional, log_unsynced)) = cold {
            self.trim(Some(id))?;
            self.reads.set(self.reads.get() + 1);
            let note = Note::load(&self.dir, id, name, stem, site, provisional)?;
            if log_unsynced {
                note.log.mark_unsynced();
            }
            self.notes.insert(id, Slot::Loaded(Box::new(note), now));
        }
        match self.notes.get_mut(&id) {
            Some(Slot::Loaded(n, used)) => {
                *used = now;
                Ok(n)
            }
            _ => unreachable!("loaded above"),
        }
    }

    /// A note's model for reading: the loaded one, or one read from disk
    /// for this call (a cold note stays cold).
    pub(super) fn with_note<R>(
        &self,
        id: DocId,
        f: impl FnOnce(&Note) -> R,
    ) -> Result<R, StoreError> {
        match self.notes.get(&id) {
            None => Err(StoreError::UnknownNote(id)),
            Some(Slot::Loaded(n, _)) => Ok(f(n)),
            Some(Slot::Cold(c)) => {
                self.reads.set(self.reads.get() + 1);
                let n = Note::load(
                    &self.dir,
                    id,
                    c.name.clone(),
                    c.stem.clone(),
                    c.site,
                    c.provisional,
                )?;
                Ok(f(&n))
            }
        }
    }

    /// Whether a note's text is `text`: a cold note with a digest is not
    /// read.
    pub fn text_is(&self, id: DocId, text: &str) -> Result<bool, StoreError> {
        match self.notes.get(&id) {
            Some(Slot::Cold(Cold {
                digest: Some(d), ..
            })) => Ok(*d == digest(text)),
            _ => self.with_note(id, |n| n.doc.text() == text),
        }
    }

    /// Whether a note has no text and no pending op (a cold note with a
    /// digest is not read).
    pub fn is_blank(&self, id: DocId) -> Result<bool, StoreError> {
        Ok(self.slot(id)?.pending_ops() == 0 && self.text_is(id, "")?)
    }

    /// Makes these notes' logs durable (what an import appended unsynced,
    /// see `Note::from_file`), before something that relies on their text
    /// (a file's base) is made durable.
    pub fn sync_logs(&mut self, ids: &[DocId]) -> Result<(), StoreError> {
        for id in ids {
            match self.notes.get_mut(id) {
                Some(Slot::Loaded(n, _)) => n.sync_log()?,
                Some(Slot::Cold(c)) if c.log_unsynced => {
                    let (_, _, log) = note_paths(&self.dir, &c.stem);
                    File::open(&log)
                        .and_then(|f| f.sync_data())
                        .map_err(io_err(&log))?;
                    c.log_unsynced = false;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether a note's log holds nothing unsynced (see
    /// [`Store::sync_logs`]); a note the store does not know has none.
    pub fn log_synced(&self, id: DocId) -> bool {
        match self.notes.get(&id) {
            Some(Slot::Loaded(n, _)) => !n.log.is_unsynced(),
            Some(Slot::Cold(c)) => !c.log_unsynced,
            None => true,
        }
    }

    /// A note new to this device (it is loaded).
    pub(super) fn insert_loaded(&mut self, id: DocId, note: Note) -> Result<(), StoreError> {
        self.trim(Some(id))?;
        self.clock += 1;
        self.notes
            .insert(id, Slot::Loaded(Box::new(note), self.clock));
        Ok(())
    }

    /// How many notes are in memory (loaded whole).
    pub fn notes_in_memory(&self) -> usize {
        self.loaded_count()
    }

    /// How many times a note was read whole from its files since the
    /// store opened (opening reads only the notes with logs to replay).
    pub fn notes_read(&self) -> u64 {
        self.reads.get()
    }

    fn loaded_count(&self) -> usize {
        self.notes.loaded.len()
    }

    /// Past the bound ([`bounds`]) of loaded notes (not counting `except`,
    /// about to be used), the least recently used leave memory down to
    /// three quarters of it: those with changes their log does not hold are
    /// saved first, together (one folder fsync per pass, as in a flush).
    pub(super) fn trim(&mut self, except: Option<DocId>) -> Result<(), StoreError> {
        let (max, keep) = bounds();
        if self.loaded_count() < max {
            return Ok(());
        }
        let mut used: Vec<(u64, DocId)> = self
            .notes
            .loaded_uses()
            .filter(|&(id, _)| Some(id) != except)
            .map(|(id, t)| (t, id))
            .collect();
        used.sort_unstable();
        let leave: Vec<DocId> = used
            .iter()
            .take(used.len().saturating_sub(keep))
            .map(|&(_, id)| id)
            .collect();
        self.evict(&leave)
    }

    fn evict(&mut self, ids: &[DocId]) -> Result<(), StoreError> {
        let unsaved: Vec<DocId> = ids
            .iter()
            .copied()
            .filter(|id| matches!(self.notes.get(id), Some(Slot::Loaded(n, _)) if n.unlogged))
            .collect();
        self.save_batch(&unsaved)?;
        for id in ids {
            if let Some(Slot::Loaded(n, _)) = self.notes.get(id) {
                debug_assert!(!n.unlogged, "saved above");
                let cold = Cold::of(n);
                self.notes.insert(*id, Slot::Cold(cold));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Deferral;

    fn loaded(s: &Store) -> usize {
        s.loaded_count()
    }

    /// An import's first insert is the one append left unsynced; the note
    /// says so in memory and once cold, until `sync_logs`; the import's
    /// end leaves later edits fsynced as ever.
    #[test]
    fn an_imports_first_insert_waits_for_sync_logs_even_after_leaving_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        s.defer_state_saves(Deferral::Import);
        let n = bounds().0 + 4;
        let ids: Vec<DocId> = (0..n)
            .map(|i| {
                let id = s.create_for_file(&format!("n{i}")).unwrap();
                s.insert(id, 0, "text", false).unwrap();
                id
            })
            .collect();
        assert!(ids.iter().all(|&id| !s.log_synced(id)));
        assert!(
            matches!(s.notes.get(&ids[0]), Some(Slot::Cold(_))),
            "left memory"
        );
        s.sync_logs(&ids[..2]).unwrap();
        assert!(s.log_synced(ids[0]) && s.log_synced(ids[1]) && !s.log_synced(ids[2]));
        // Any later fsynced append of the log covers the first.
        s.insert(ids[3], 4, "!", false).unwrap();
        assert!(s.log_synced(ids[3]), "an fsynced append covers the first");
        assert_eq!(s.text(ids[2]).unwrap(), "text");
        s.end_deferred_state(Deferral::Import).unwrap();
        let id = s.create_for_file("later").unwrap();
        s.insert(id, 0, "typed", false).unwrap();
        assert!(
            s.log_synced(id),
            "outside an import every append is fsynced"
        );
    }

    #[test]
    fn notes_past_the_bound_leave_memory_and_come_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let n = bounds().0 * 2 + 10;
        let mut ids = Vec::new();
        {
            let mut s = Store::open(dir.path()).unwrap();
            for i in 0..n {
                let id = s.create(&format!("n{i}")).unwrap();
                s.insert(id, 0, &format!("text of {i}"), false).unwrap();
                ids.push(id);
                assert!(loaded(&s) <= bounds().0, "{} loaded", loaded(&s));
            }
            // A change the log does not hold: a note must be saved before
            // it leaves memory, or it would lose its new sync time.
            for (i, &id) in ids.iter().enumerate() {
                s.set_note_sync(id, 100 + i as u64).unwrap();
                assert!(loaded(&s) <= bounds().0);
            }
            // Edits of notes that left memory load them again.
            s.insert(ids[0], 0, "> ", false).unwrap();
            assert_eq!(s.text(ids[0]).unwrap(), "> text of 0");
            let info = s.info(ids[1]).unwrap();
            assert_eq!((info.pending_ops, info.last_sync), (9, 101));
            // It was saved as it left memory.
            let (_, st, _) = s.paths("n1");
            let head = std::fs::read(st).unwrap();
            let h = structure::read_header(&head).unwrap();
            assert_eq!((h.id, h.last_sync), (ids[1], 101));
            assert_eq!(h.digest, Some(digest("text of 1")));
            s.flush().unwrap();
            // Edits after the flush are in their logs alone.
            s.insert(ids[2], 0, "> ", false).unwrap();
        }
        let mut s = Store::open(dir.path()).unwrap();
        assert!(loaded(&s) <= bounds().0);
        for (i, &id) in ids.iter().enumerate() {
            let want = match i {
                0 | 2 => format!("> text of {i}"),
                _ => format!("text of {i}"),
            };
            assert_eq!(s.text(id).unwrap(), want);
            let info = s.info(id).unwrap();
            assert_eq!(info.pending_ops, want.chars().count(), "note {i}");
            assert_eq!(info.last_sync, 100 + i as u64, "note {i}");
        }
        s.flush().unwrap();
        assert!(loaded(&s) <= bounds().0);
        assert_eq!(s.notes_to_upsert().len(), 0, "all provisional still");
        assert_eq!(s.provisional_notes().len(), n);
    }

    #[test]
    fn a_note_with_an_empty_log_opens_cold_with_its_sync_time() {
        let dir = tempfile::tempdir().unwrap();
        let id;
        {
            let mut s = Store::open(dir.path()).unwrap();
            id = s.create("quiet").unwrap();
            s.set_note_sync(id, 42).unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert!(matches!(s.notes.get(&id), Some(Slot::Cold(_))));
        assert_eq!(s.note_sync_time(id).unwrap(), 42);
        assert_eq!(s.text(id).unwrap(), "");
        assert!(
            matches!(s.notes.get(&id), Some(Slot::Cold(_))),
            "reading keeps it cold"
        );
    }

    #[test]
    fn a_version_2_structure_is_read_once_then_saved_as_version_3() {
        let dir = tempfile::tempdir().unwrap();
        let id;
        let (_, st, _) = note_paths(dir.path(), "old");
        {
            let mut s = Store::open(dir.path()).unwrap();
            id = s.create("old").unwrap();
            s.insert(id, 0, "kept", false).unwrap();
            // As if acknowledged: the log empties at the flush.
            s.note_mut(id).unwrap().pending = Default::default();
            s.set_note_sync(id, 9).unwrap();
            s.flush().unwrap();
        }
        // As version 2 wrote it: no digest.
        let v3 = std::fs::read(&st).unwrap();
        let mut v2 = v3[..v3.len() - 4].to_vec();
        v2.drain(structure::HEADER_V2..structure::HEADER);
        v2[8] = 2;
        let crc = crc32fast::hash(&v2);
        v2.extend_from_slice(&crc.to_be_bytes());
        std::fs::write(&st, &v2).unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        assert!(matches!(s.notes.get(&id), Some(Slot::Loaded(..))));
        assert_eq!(s.text(id).unwrap(), "kept");
        s.flush().unwrap();
        assert_eq!(std::fs::read(&st).unwrap(), v3, "saved as version 3");
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert!(matches!(s.notes.get(&id), Some(Slot::Cold(_))));
        assert!(s.text_is(id, "kept").unwrap());
        assert!(!s.text_is(id, "kept!").unwrap());
        assert_eq!(s.notes_read(), 0, "the digest answered");
    }
}
