//! The local store: a folder of notes, each as three files, plus the store's
//! own state.
//!
//! ```text
//! DIR/
//!   .notesync/state.json     replica id, global last sync time, and per note:
//!                            file name, name, site, whether ids are provisional;
//!                            the ids of notes deleted here that the server
//!                            was not told of yet, and of notes known deleted
//!   .notesync/trash/         the text of notes deleted elsewhere while this
//!                            device had edits of them not yet synced
//!   <file>.md                the text (what editors and people read)
//!   <file>.md.structure      version 3: 8 bytes 89 "NSSTRC" 0A, u8 version
//!                            (3), u128 document_id, u64 last_modified (the
//!                            note's last sync time, from the server), 16
//!                            bytes: the first half of the SHA-256 of the
//!                            note's text (so a sync that changes nothing
//!                            reads each note's header, not its structure;
//!                            version 2, read and rewritten as 3 at the next
//!                            save, is the same without them); then
//!                            the atoms, live or not, in the order of their
//!                            (first) ids, as items until a 0 tag: 1 run: pid
//!                            first (wire form), u16 len, len bytes of text
//!                            (live one-char atoms at first, first+1, ...:
//!                            last ident +1 each); 2 atom: u8 len, data, pid
//!                            (a one-char atom in no run, and every atom of
//!                            two or more chars, live or not; a dead one-char
//!                            atom's text is dropped, as the server drops
//!                            it, its tombstone stays); then the
//!                            deleted ids (atoms, chars of atoms, ids known
//!                            only as deleted: see PROTOCOL.md 1.2) as items
//!                            until a 0 tag: 3 range: pid first, u16 count
//!                            (first, first+1, ...); 4 id: pid (one id);
//!                            then, the same way, the ids received live (or
//!                            acknowledged in a session) after last_modified,
//!                            which the next catch-up reconciles (PROTOCOL.md
//!                            3.2.1); then u32 crc32 of everything before.
//!                            At most 2^26 ids in all. Version 1 (read, never
//!                            written; rewritten as version 3 at the next
//!                            save): u128 document_id, u64 last_modified, u64
//!                            count and every atom (u8 len, data, pid), u64
//!                            count and the deleted ids, u64 count and the
//!                            ids to reconcile. All integers big-endian.
//!   <file>.md.latest_ops     the op log (see `oplog`)
//! ```
//!
//! Crash safety: every whole-file write goes to a temp file that is fsynced
//! and renamed over the old one; the op log is appended and fsynced before
//! an edit returns. A note is saved in the order structure, text, log
//! compaction, so that after a crash at any point the log replayed on the
//! structure gives the latest state (replay is idempotent). A structure file
//! that state.json does not know (a crash while a note was created) is
//! adopted on open.
//!
//! Files: this one (the store: open, the notes' life here, local edits,
//! saving), `remote.rs` (what sync and live sessions do to it), `note.rs`
//! (one note in memory and its rules), `state.rs` (state.json),
//! `structure.rs` (the structure file format), `names.rs` (file names).
//! Nothing outside this module sees a note's fields: sync and sessions call
//! the store's methods, which keep the save order and the op log's
//! durability.

mod names;
mod note;
mod remote;
mod slots;
mod state;
mod structure;
#[cfg(test)]
mod trace_sizes;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use notesync_protocol::{DocId, DocName, Time};

use crate::doc::{EditError, LocalOp};
use names::check_stem;
use slots::{Cold, OnDisk, Slot, Slots};
use state::STATE_DIR;

pub(crate) use names::free_trash_path;
pub use names::safe_stem;
pub(crate) use note::{Note, Outgoing};
pub use slots::MAX_LOADED_VAR;
pub use structure::{read_structure, write_structure};

/// Where the text of a note deleted elsewhere goes when this device has
/// edits of it that never reached the server.
pub const TRASH_DIR: &str = ".notesync/trash";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("i/o error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a notesync structure file: {why}")]
    BadStructure { path: PathBuf, why: &'static str },
    #[error("{path}: {why}")]
    BadState { path: PathBuf, why: String },
    #[error("{path}: {source}")]
    BadStateJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no note with id {0:032x}")]
    UnknownNote(DocId),
    #[error(transparent)]
    Edit(#[from] EditError),
    #[error("invalid note name: {0}")]
    Name(#[from] notesync_protocol::ValueError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A note's three files in `dir`: (text, structure, op log).
fn note_paths(dir: &Path, stem: &str) -> (PathBuf, PathBuf, PathBuf) {
    let md = dir.join(format!("{stem}.md"));
    let st = dir.join(format!("{stem}.md.structure"));
    let log = dir.join(format!("{stem}.md.latest_ops"));
    (md, st, log)
}

/// A summary of one note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteInfo {
    pub id: DocId,
    pub name: String,
    pub file: PathBuf,
    pub pending_ops: usize,
    pub last_sync: Time,
    pub site: u8,
}

/// A note deleted on another device, removed here (PROTOCOL.md 3.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteDeletion {
    pub id: DocId,
    pub name: String,
    /// The note's `.md` file (removed, unless the app keeps the files).
    pub file: PathBuf,
    /// Where its text was kept, when this device had edits of it that
    /// never reached the server (they are not lost: they are here).
    pub kept: Option<PathBuf>,
}

/// The store: synchronous, file-backed. The async client wraps it.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    replica_id: u128,
    last_sync_time: Time,
    notes: Slots,
    /// Each note's file stem, lowercased (file names are compared without
    /// case: the folder may be on a case-insensitive file system), to the
    /// notes using it: a free name is found without a walk of every note.
    stems: HashMap<String, Vec<DocId>>,
    /// Counts uses of notes (which loaded note was used least recently).
    clock: u64,
    /// Notes read whole from their files after the store opened.
    reads: std::cell::Cell<u64>,
    /// Deleted here, not yet confirmed by the server.
    pending_deletes: BTreeSet<DocId>,
    /// Known deleted on the server.
    deleted: BTreeSet<DocId>,
    /// Whether the store writes (and on renames removes) the `.md` files.
    write_md: bool,
    /// While a sync or an import runs, new notes and sites mark state.json
    /// dirty instead of rewriting it (a rewrite per note made an import of
    /// N notes write O(N^2) bytes); see [`Deferral`]. How many deferrals
    /// run, and how many of them are imports.
    deferrals: u32,
    imports: u32,
    state_dirty: std::cell::Cell<bool>,
    /// Notes added while saves were deferred whose files are in place but
    /// whose folder was not synced yet: state.json is never saved before
    /// it is (a note it lists must have its structure file).
    dir_unsynced: std::cell::Cell<bool>,
    /// Some note's log has unsynced records (a site's swap, see
    /// `Note::swap_coalesced`): synced before state.json is saved.
    logs_unsynced: std::cell::Cell<bool>,
}

/// A random u128 (replica ids, document ids) from the OS.
pub fn random_u128() -> u128 {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source is available");
    u128::from_be_bytes(b)
}

impl Store {
    /// Opens the store in `dir`, creating it if needed.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let dir = dir.into();
        let state_dir = dir.join(STATE_DIR);
        fs::create_dir_all(&state_dir).map_err(io_err(&state_dir))?;
        let state = state::read(&dir)?;
        let mut store = Store {
            dir,
            replica_id: state.replica_id,
            last_sync_time: state.last_sync_time,
            notes: Slots::default(),
            stems: HashMap::new(),
            clock: 0,
            reads: Default::default(),
            pending_deletes: state.pending_deletes,
            deleted: state.deleted,
            write_md: true,
            deferrals: 0,
            imports: 0,
            state_dirty: std::cell::Cell::new(false),
            dir_unsynced: std::cell::Cell::new(false),
            logs_unsynced: std::cell::Cell::new(false),
        };
        let mut known = HashSet::new();
        for n in state.notes {
            known.insert(n.stem.clone());
            // Only a note with a log to replay is read whole (and may leave
            // memory again at once): the others' structure headers say
            // what the store needs until something uses them.
            let cold = Cold::from_disk(&store.dir, n.id, &n.name, &n.stem, n.site, n.provisional)?;
            store.index_stem(n.id, &n.stem);
            match cold {
                OnDisk::Cold(c) => {
                    store.notes.insert(n.id, Slot::Cold(c));
                }
                OnDisk::Load { rewrite } => {
                    let mut note =
                        Note::load(&store.dir, n.id, n.name, n.stem, n.site, n.provisional)?;
                    // Saved at the next flush; until then it may leave
                    // memory (its files are what it was loaded from).
                    note.dirty |= rewrite;
                    store.insert_loaded(n.id, note)?;
                }
            }
        }
        store.adopt_orphans(&known)?;
        store.save_state()?;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// With `false`, the store never writes or removes a `<file>.md`: the
    /// app keeps them (from [`Store::list`] and [`Store::text`]), e.g. to
    /// never overwrite a file a person edited meanwhile (the notesync CLI).
    /// The structure and op log alone always hold the note.
    pub fn set_write_md(&mut self, on: bool) {
        self.write_md = on;
    }

    pub fn replica_id(&self) -> u128 {
        self.replica_id
    }

    /// The global synclist cursor.
    pub fn last_sync_time(&self) -> Time {
        self.last_sync_time
    }

    pub fn set_last_sync_time(&mut self, t: Time) -> Result<(), StoreError> {
        if t > self.last_sync_time {
            self.last_sync_time = t;
            self.save_state()?;
        }
        Ok(())
    }

    fn paths(&self, stem: &str) -> (PathBuf, PathBuf, PathBuf) {
        note_paths(&self.dir, stem)
    }

    /// Adopts `.md.structure` files that state.json does not list.
    fn adopt_orphans(&mut self, known: &HashSet<String>) -> Result<(), StoreError> {
        let entries = fs::read_dir(&self.dir).map_err(io_err(&self.dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err(&self.dir))?;
            let file = entry.file_name();
            let Some(stem) = file.to_str().and_then(|f| f.strip_suffix(".md.structure")) else {
                continue;
            };
            if known.contains(stem) || check_stem(stem).is_err() {
                continue;
            }
            let path = entry.path();
            let bytes = fs::read(&path).map_err(io_err(&path))?;
            let name = DocName::new(stem).unwrap_or_default();
            let (doc, _, _) = structure::read_structure(&path, &bytes, name.clone())?;
            if self.notes.contains_key(&doc.id) {
                continue;
            }
            if self.is_deleted(doc.id) {
                // A crash while its files were being removed: finish.
                let (_, st, log) = self.paths(stem);
                for p in [st, log] {
                    remove_if_there(&p)?;
                }
                continue;
            }
            // A crash before state.json listed it (its saves are deferred
            // during a sync or an import, see `defer_state_saves`).
            tracing::info!(file = %path.display(), "adopting a note missing from state.json");
            // Its site is unknown: provisional, so the next sync asks the
            // server, which gives a (document, replica) pair the site it
            // gave it before (PROTOCOL.md 1.3); only never-sent inserts are
            // re-made then.
            let note = Note::load(&self.dir, doc.id, name, stem.to_owned(), 0, true)?;
            self.index_stem(doc.id, stem);
            self.insert_loaded(doc.id, note)?;
        }
        Ok(())
    }

    /// Creates a note (works offline). Its ids are provisional until its
    /// first sync gives it a site. Saved (and in state.json) on return.
    pub fn create(&mut self, name: &str) -> Result<DocId, StoreError> {
        let id = random_u128();
        self.add_note(id, DocName::new(name)?, 0, true, false, false)?;
        Ok(id)
    }

    /// [`Store::create`] for an app that keeps the `.md` files
    /// ([`Store::set_write_md`]) and makes a note of one of them: the note
    /// may take the name of the existing `<name>.md` (it is the note's own
    /// file; `name` must be a safe file stem for that), where `create`
    /// avoids every existing file. During an import ([`Deferral::Import`])
    /// the note is saved only at its end, when it keeps the file's name:
    /// lost in a crash, it is picked up again from that file (a note
    /// whose file must move, to a safe or a free name, is saved at once,
    /// so that a crash after the move cannot make it a note of the new
    /// name).
    pub fn create_for_file(&mut self, name: &str) -> Result<DocId, StoreError> {
        let id = random_u128();
        let deferred = self.imports > 0;
        self.add_note(id, DocName::new(name)?, 0, true, deferred, true)?;
        Ok(id)
    }

    /// Adds a note new to this device under a free file name. Saved at
    /// once, or (`deferred`, while saves are deferred) only in memory: its
    /// files and state.json entry wait for the deferral's end or the next
    /// flush.
    fn add_note(
        &mut self,
        id: DocId,
        name: DocName,
        site: u8,
        provisional: bool,
        deferred: bool,
        own_file: bool,
    ) -> Result<(), StoreError> {
        // Only the file named exactly `<name>.md` is the note's own; a
        // name made safe (`CON` -> `_CON`) may name someone else's file.
        let stem = if own_file && safe_stem(name.as_str()) == name.as_str() {
            self.free_stem_among_notes(name.as_str())
        } else {
            self.free_stem(name.as_str(), None)
        };
        let (_, _, log_path) = self.paths(&stem);
        let keeps_name = stem == name.as_str();
        let mut note = Note::new(id, name, stem, site, provisional, &log_path)?;
        note.from_file = deferred && self.deferrals > 0 && keeps_name;
        self.index_stem(id, &note.stem.clone());
        self.insert_loaded(id, note)?;
        if deferred && self.deferrals > 0 && keeps_name {
            // Its log file was created: state.json must not list the note
            // before the folder's entry for it is durable.
            self.dir_unsynced.set(true);
            self.state_dirty.set(true);
            return Ok(());
        }
        // state.json first (its log's folder entry synced before it), so a
        // crash never leaves the note to be adopted from its structure file
        // alone, under its file's name (`CON` as `_CON`); a listed note
        // without a structure file loads as empty, with its log replayed.
        self.dir_unsynced.set(true);
        self.save_state()?;
        self.save_note(id)
    }

    /// Starts a deferral of state.json saves (see [`Deferral`]); each
    /// start is ended by [`Store::end_deferred_state`]. Everything else
    /// (renames, deletions, the cursor) still saves at once, and writes
    /// what was deferred with it.
    pub fn defer_state_saves(&mut self, kind: Deferral) {
        self.deferrals += 1;
        if kind == Deferral::Import {
            self.imports += 1;
        }
    }

    /// Ends one [`Store::defer_state_saves`]; the last one saves state.json
    /// if it changed (the notes' folder fsynced first).
    pub fn end_deferred_state(&mut self, kind: Deferral) -> Result<(), StoreError> {
        self.deferrals = self.deferrals.saturating_sub(1);
        if kind == Deferral::Import {
            self.imports = self.imports.saturating_sub(1);
            if self.imports == 0 {
                // Only an import's own first insert may go unsynced.
                for n in self.notes.loaded_notes_mut() {
                    n.from_file = false;
                }
            }
        }
        if self.deferrals == 0 && (self.state_dirty.get() || self.dir_unsynced.get()) {
            self.save_state()?;
        }
        Ok(())
    }

    /// Saves state.json now, or marks it dirty while saves are deferred.
    fn save_state_soon(&self) -> Result<(), StoreError> {
        if self.deferrals > 0 {
            self.state_dirty.set(true);
            return Ok(());
        }
        self.save_state()
    }

    fn index_stem(&mut self, id: DocId, stem: &str) {
        self.stems
            .entry(stem.to_ascii_lowercase())
            .or_default()
            .push(id);
    }

    fn unindex_stem(&mut self, id: DocId, stem: &str) {
        let key = stem.to_ascii_lowercase();
        if let Some(ids) = self.stems.get_mut(&key) {
            ids.retain(|x| *x != id);
            if ids.is_empty() {
                self.stems.remove(&key);
            }
        }
    }

    /// Whether a note other than `except` uses this stem (without case).
    fn stem_taken(&self, stem: &str, except: Option<DocId>) -> bool {
        self.stems
            .get(&stem.to_ascii_lowercase())
            .is_some_and(|ids| ids.iter().any(|id| Some(*id) != except))
    }

    /// A file stem for `name` that no note uses (a file of that name may
    /// exist: see [`Store::create_for_file`]).
    fn free_stem_among_notes(&self, name: &str) -> String {
        let base = safe_stem(name);
        let taken = |s: &str| self.stem_taken(s, None);
        if !taken(&base) {
            return base;
        }
        (2..)
            .map(|k| format!("{base} ({k})"))
            .find(|s| !taken(s) && !self.dir.join(format!("{s}.md")).exists())
            .expect("some suffix is free")
    }

    /// A file stem for `name` that no other note uses.
    fn free_stem(&self, name: &str, except: Option<DocId>) -> String {
        let base = safe_stem(name);
        let taken = |s: &str| {
            self.stem_taken(s, except)
                || (except.is_none() && self.dir.join(format!("{s}.md")).exists())
        };
        if !taken(&base) {
            return base;
        }
        (2..)
            .map(|k| format!("{base} ({k})"))
            .find(|s| !taken(s))
            .expect("some suffix is free")
    }

    /// Whether a note was deleted (here, or on the server).
    pub fn is_deleted(&self, id: DocId) -> bool {
        self.deleted.contains(&id) || self.pending_deletes.contains(&id)
    }

    /// Notes deleted here that the server has not confirmed yet.
    pub fn pending_deletes(&self) -> Vec<DocId> {
        self.pending_deletes.iter().copied().collect()
    }

    /// Deletes a note: its files go now, and the next sync deletes it on
    /// the server, which removes it from every device (PROTOCOL.md 3.5).
    /// Its edits not yet sent are dropped with it (deleting is the user's
    /// decision). Works offline.
    pub fn delete_note(&mut self, id: DocId) -> Result<(), StoreError> {
        self.slot(id)?;
        // Even a note that never synced: its first upsert may have reached
        // the server with its reply lost. The server answers
        // unknown_document when it has no such note.
        self.pending_deletes.insert(id);
        self.remove_note(id)
    }

    /// Forgets a note (its id is in `pending_deletes` or `deleted`): the
    /// state first (an orphan structure file of a deleted id is removed at
    /// the next open, never adopted), then its files.
    fn remove_note(&mut self, id: DocId) -> Result<(), StoreError> {
        let note = self.notes.remove(&id).ok_or(StoreError::UnknownNote(id))?;
        self.unindex_stem(id, note.stem());
        self.save_state()?;
        let (md, st, log) = self.paths(note.stem());
        drop(note);
        remove_if_there(&st)?;
        remove_if_there(&log)?;
        if self.write_md {
            remove_if_there(&md)?;
        }
        crate::fsutil::sync_dir(&self.dir).map_err(io_err(&self.dir))
    }

    /// What the store knows of a note, loaded or not.
    fn slot(&self, id: DocId) -> Result<&Slot, StoreError> {
        self.notes.get(&id).ok_or(StoreError::UnknownNote(id))
    }

    pub fn list(&self) -> Vec<NoteInfo> {
        let mut v: Vec<NoteInfo> = self
            .notes
            .iter()
            .map(|(id, n)| Self::info_of(&self.dir, *id, n))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        v
    }

    /// One note's summary (what [`Store::list`] says of it).
    pub fn info(&self, id: DocId) -> Result<NoteInfo, StoreError> {
        Ok(Self::info_of(&self.dir, id, self.slot(id)?))
    }

    fn info_of(dir: &Path, id: DocId, n: &Slot) -> NoteInfo {
        NoteInfo {
            id,
            name: n.name().as_str().to_owned(),
            file: dir.join(format!("{}.md", n.stem())),
            pending_ops: n.pending_ops(),
            last_sync: n.last_sync(),
            site: n.site(),
        }
    }

    pub fn text(&self, id: DocId) -> Result<String, StoreError> {
        self.with_note(id, |n| n.doc.text())
    }

    pub fn name(&self, id: DocId) -> Result<String, StoreError> {
        Ok(self.slot(id)?.name().as_str().to_owned())
    }

    /// Inserts text at a char index. Durable (logged and fsynced) on return,
    /// but for the first insert into a note [`Store::create_for_file`] made
    /// during an import: its file holds that text until the log is synced
    /// (by the note's next fsynced append, its upsert's MarkSent, or
    /// [`Store::sync_logs`]).
    /// `sent`: the ops go out right away in a live session.
    pub fn insert(
        &mut self,
        id: DocId,
        index: usize,
        text: &str,
        sent: bool,
    ) -> Result<Vec<LocalOp>, StoreError> {
        self.note_mut(id)?.insert(index, text, sent)
    }

    /// Deletes a char range. Durable on return.
    pub fn delete(
        &mut self,
        id: DocId,
        range: std::ops::Range<usize>,
        sent: bool,
    ) -> Result<Vec<LocalOp>, StoreError> {
        self.note_mut(id)?.delete(range, sent)
    }

    /// Renames a note; its files move with it.
    pub fn rename(&mut self, id: DocId, name: &str, sent: bool) -> Result<(), StoreError> {
        let name = DocName::new(name)?;
        self.note_mut(id)?.rename(name.clone(), sent)?;
        self.move_files(id, &name)
    }

    fn move_files(&mut self, id: DocId, name: &DocName) -> Result<(), StoreError> {
        let stem = self.free_stem(name.as_str(), Some(id));
        let old = self.slot(id)?.stem().to_owned();
        if stem == old {
            return self.save_state();
        }
        let (old_md, old_st, _) = self.paths(&old);
        let (new_md, new_st, new_log) = self.paths(&stem);
        // Move the log first: it is what must never be lost; then write the
        // note under its new name and drop the old files.
        {
            let note = self.note_mut(id)?;
            note.log.rename_to(&new_log).map_err(io_err(&new_log))?;
            note.stem = stem.clone();
            note.changed();
        }
        self.unindex_stem(id, &old);
        self.index_stem(id, &stem);
        self.save_note(id)?;
        self.save_state()?;
        let old_md = Some(old_md).filter(|_| self.write_md);
        for p in old_md.into_iter().chain([old_st]) {
            if p != new_md && p != new_st {
                let _ = fs::remove_file(p);
            }
        }
        crate::fsutil::sync_dir(&self.dir).map_err(io_err(&self.dir))
    }

    /// Writes a note's structure and text, then compacts its log.
    pub fn save_note(&mut self, id: DocId) -> Result<(), StoreError> {
        let (md, st, _) = self.paths(self.slot(id)?.stem());
        let md = Some(md).filter(|_| self.write_md);
        self.note_mut(id)?.save(&st, md.as_deref())
    }

    /// Saves every note with unsaved changes, as [`Store::save_note`] does
    /// one (structure, text, then log), in two passes with one folder
    /// fsync between them (and one after): a sync's flush of many notes
    /// costs each a temp file's fsync (or two), not two more for folders.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        let mut dirty: Vec<(bool, DocId)> = self
            .notes
            .iter()
            .filter(|(_, n)| n.dirty())
            .map(|(id, n)| (n.loaded().is_none(), *id))
            .collect();
        // Cold notes among them are loaded to be saved: after the loaded
        // ones, a batch at a time, so memory stays bounded.
        dirty.sort_unstable();
        let dirty: Vec<DocId> = dirty.into_iter().map(|(_, id)| id).collect();
        for batch in dirty.chunks(slots::bounds().1) {
            self.save_batch(batch)?;
        }
        self.save_state()
    }

    /// Saves these notes as [`Store::save_note`] does one, in two passes
    /// with one folder fsync after each.
    fn save_batch(&mut self, ids: &[DocId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        for &id in ids {
            let (md, st, _) = self.paths(self.slot(id)?.stem());
            let md = Some(md).filter(|_| self.write_md);
            let replace = crate::fsutil::replace_file;
            self.note_mut(id)?.save_files(&st, md.as_deref(), replace)?;
        }
        self.sync_dir()?;
        for &id in ids {
            self.note_mut(id)?.compact_log(true)?;
        }
        self.sync_dir()
    }

    /// Makes the notes' folder's entries durable.
    fn sync_dir(&self) -> Result<(), StoreError> {
        crate::fsutil::sync_dir(&self.dir).map_err(io_err(&self.dir))?;
        self.dir_unsynced.set(false);
        Ok(())
    }
}

/// What may wait for state.json while a deferral runs. Each is safe
/// because a crash before the save loses nothing that is not recovered:
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferral {
    /// A sync: a site given by the server (a note state.json still calls
    /// provisional asks again, and the server gives a (document, replica)
    /// pair the site it gave before, PROTOCOL.md 1.3; only never-sent
    /// inserts are re-made then), and a note first seen from the server
    /// (pulled again: the cursor moves only after the save).
    Sync,
    /// An import of files as new notes (the folder's pick-up): also
    /// [`Store::create_for_file`] of a note that keeps its file's name,
    /// because a note lost whole is picked up again from that file. Its ops cannot reach the server before the deferral
    /// ends (a sync ends with state saved, and the import's notes are
    /// then durable).
    Import,
}

/// [`Store::defer_state_saves`] for as long as it lives: ended on drop
/// too, so a sync or an import cut short (an error, or its future
/// dropped) still saves. Never dropped while its store is locked.
pub struct DeferredState<'a> {
    store: &'a Mutex<Store>,
    kind: Deferral,
    ended: bool,
}

impl<'a> DeferredState<'a> {
    pub fn begin(store: &'a Mutex<Store>, kind: Deferral) -> Self {
        lock(store).defer_state_saves(kind);
        DeferredState {
            store,
            kind,
            ended: false,
        }
    }

    pub fn end(mut self) -> Result<(), StoreError> {
        self.ended = true;
        lock(self.store).end_deferred_state(self.kind)
    }
}

impl Drop for DeferredState<'_> {
    fn drop(&mut self) {
        if !self.ended
            && let Err(e) = lock(self.store).end_deferred_state(self.kind)
        {
            tracing::warn!(error = %e, "state.json could not be saved after a sync or an import was cut short");
        }
    }
}

/// A store's lock. A panic while holding it would leave the store as it
/// was after its last completed call (every call writes its files before
/// it returns), so a poisoned lock is safe to keep using.
pub(crate) fn lock(store: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(|e| e.into_inner())
}

fn remove_if_there(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_survives_reopen_with_pending_ops_and_collisions() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b);
        {
            let mut s = Store::open(dir.path()).unwrap();
            a = s.create("note").unwrap();
            b = s.create("note").unwrap();
            s.insert(a, 0, "hello", false).unwrap();
            s.insert(b, 0, "world", false).unwrap();
            s.delete(a, 1..2, false).unwrap();
            // No flush: the op log alone must carry the edits.
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.text(a).unwrap(), "hllo");
        assert_eq!(s.text(b).unwrap(), "world");
        let files: Vec<_> = s.list().into_iter().map(|n| n.file).collect();
        assert_eq!(files.len(), 2);
        assert_ne!(files[0], files[1]);
        assert!(files.iter().all(|f| f.starts_with(dir.path())));
    }

    /// A compaction to an empty log is not fsynced: a power loss may
    /// bring the log back as it was at its last fsync (the MarkSent before
    /// the upsert). Replayed on the saved structure it must give the same
    /// text, with the acknowledged ops pending again as sent: re-sent with
    /// their ids (a no-op on the server), never cancelled or re-made.
    #[test]
    fn an_old_log_back_after_its_compaction_changes_nothing_and_is_resent_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let a;
        let log;
        let (old_log, sent);
        {
            let mut s = Store::open(dir.path()).unwrap();
            a = s.create("note").unwrap();
            s.insert(a, 0, "hello world", false).unwrap();
            s.set_site(a, 3).unwrap();
            let out = s.outgoing(a).unwrap();
            sent = out
                .inserts
                .iter()
                .map(|x| x.pid().clone())
                .collect::<Vec<_>>();
            assert_eq!(sent.len(), 11);
            log = note_paths(dir.path(), "note").2;
            assert_eq!(s.info(a).unwrap().file, note_paths(dir.path(), "note").0);
            old_log = fs::read(&log).unwrap();
            s.acknowledge(a, &sent, &[], None).unwrap();
            s.flush().unwrap();
            assert_eq!(fs::metadata(&log).unwrap().len(), 0, "compacted");
        }
        fs::write(&log, &old_log).unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        assert_eq!(s.text(a).unwrap(), "hello world");
        let again = s.outgoing(a).unwrap();
        let again: Vec<_> = again.inserts.iter().map(|x| x.pid().clone()).collect();
        assert_eq!(again, sent, "the same ids, re-sent");
        // Sent: deleting one of them is a delete to send, not a cancel.
        s.delete(a, 0..1, false).unwrap();
        assert_eq!(s.text(a).unwrap(), "ello world");
        let out = s.outgoing(a).unwrap();
        assert_eq!(
            (out.inserts.len(), out.deletes),
            (11, vec![sent[0].clone()])
        );
    }

    #[test]
    fn a_version_1_structure_opens_and_is_rewritten_at_the_next_save() {
        let dir = tempfile::tempdir().unwrap();
        let a;
        let st = note_paths(dir.path(), "old").1;
        {
            let mut s = Store::open(dir.path()).unwrap();
            a = s.create("old").unwrap();
            s.insert(a, 0, "hello world", false).unwrap();
            s.delete(a, 2..4, false).unwrap();
            s.flush().unwrap();
            let note = s.note_mut(a).unwrap();
            let v1 = structure::tests::write_structure_v1(&note.doc, 12, &note.live_since);
            std::fs::write(&st, &v1).unwrap();
        }
        let mut s = Store::open(dir.path()).unwrap();
        assert_eq!(s.text(a).unwrap(), "heo world");
        assert_eq!(s.info(a).unwrap().last_sync, 12);
        assert!(!fs::read(&st).unwrap().starts_with(b"\x89NSSTRC\n"));
        s.insert(a, 0, "> ", false).unwrap();
        s.flush().unwrap();
        assert!(fs::read(&st).unwrap().starts_with(b"\x89NSSTRC\n"));
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.text(a).unwrap(), "> heo world");
    }

    #[test]
    fn rename_moves_files_and_a_traversal_name_stays_inside() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let a = s.create("first").unwrap();
        s.insert(a, 0, "text", false).unwrap();
        s.flush().unwrap();
        s.rename(a, "../../escape", false).unwrap();
        let info = &s.list()[0];
        assert_eq!(info.file.parent().unwrap(), dir.path());
        assert!(!dir.path().join("first.md").exists());
        assert_eq!(fs::read_to_string(&info.file).unwrap(), "text");
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.name(a).unwrap(), "../../escape");
        assert_eq!(s.text(a).unwrap(), "text");
    }
}
