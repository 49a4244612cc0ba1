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
//!   <file>.md.structure      u128 document_id, u64 last_modified (the note's
//!                            last sync time, from the server), u64 count, then
//!                            every atom, live or deleted, in the seed's layout
//!                            (u8 len, data, pid in wire form), in position
//!                            order; then u64 count and the deleted ids (atoms,
//!                            chars of atoms, ids known only as deleted: see
//!                            PROTOCOL.md 1.2); then u64 count and the ids
//!                            received live (or acknowledged in a session)
//!                            after last_modified, which the next catch-up
//!                            reconciles (PROTOCOL.md 3.2.1). All integers
//!                            big-endian.
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use bytes::{Buf, BufMut, BytesMut};
use notesync_protocol::{
    AllocError, Allocator, AtomList, DocId, DocName, FrameDecoder, PidList, ServerFrame, Time,
};
use serde::{Deserialize, Serialize};

use crate::doc::{Doc, EditError, LocalOp, TextChange};
use crate::fsutil::write_atomic;
use crate::oplog::{LogFile, Pending, Record};

const STATE_DIR: &str = ".notesync";
const STATE_FILE: &str = "state.json";
/// Where the text of a note deleted elsewhere goes when this device has
/// edits of it that never reached the server.
pub const TRASH_DIR: &str = ".notesync/trash";
const STATE_FORMAT: u32 = 1;
/// The site provisional ids use: they never leave the device (see
/// PROTOCOL.md 1.3: a note created offline has no site until its first
/// upsert), so any site would do.
const PROVISIONAL_SITE: u8 = 255;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("i/o error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a notesync structure file: {why}")]
    BadStructure { path: PathBuf, why: &'static str },
    #[error("{path}: {why}")]
    BadState { path: PathBuf, why: String },
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

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NoteState {
    file: String,
    name: String,
    /// 0: none yet.
    site: u8,
    provisional: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format: u32,
    replica_id: String,
    last_sync_time: Time,
    notes: BTreeMap<String, NoteState>,
    /// Notes deleted here; the server is told at the next sync.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pending_deletes: BTreeSet<String>,
    /// Notes known to be deleted on the server: never adopted again.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    deleted: BTreeSet<String>,
}

/// One note in memory.
#[derive(Debug)]
pub(crate) struct Note {
    pub doc: Doc,
    pub pending: Pending,
    log: LogFile,
    /// File name without the `.md`.
    stem: String,
    pub site: u8,
    /// Ids made before the note had a site: re-made before they are sent.
    pub provisional: bool,
    pub last_sync: Time,
    /// Ids that entered the note after `last_sync` without a catch-up
    /// (received live, or own inserts acknowledged in a session).
    pub live_since: std::collections::BTreeSet<notesync_protocol::Pid>,
    alloc: Allocator,
    /// Unsaved changes to the structure or text files.
    dirty: bool,
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
    pub(crate) notes: HashMap<DocId, Note>,
    /// Deleted here, not yet confirmed by the server.
    pending_deletes: BTreeSet<DocId>,
    /// Known deleted on the server.
    deleted: BTreeSet<DocId>,
    /// Whether the store writes (and on renames removes) the `.md` files.
    write_md: bool,
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (std::process::id() as u64).rotate_left(32)
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
        let state_path = state_dir.join(STATE_FILE);
        let state: StateFile = match fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::BadState {
                path: state_path.clone(),
                why: e.to_string(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => StateFile {
                format: STATE_FORMAT,
                replica_id: format!("{:032x}", random_u128()),
                last_sync_time: 0,
                notes: BTreeMap::new(),
                pending_deletes: BTreeSet::new(),
                deleted: BTreeSet::new(),
            },
            Err(e) => return Err(io_err(&state_path)(e)),
        };
        if state.format != STATE_FORMAT {
            return Err(StoreError::BadState {
                path: state_path,
                why: format!(
                    "state format {} is not the supported {}",
                    state.format, STATE_FORMAT
                ),
            });
        }
        let replica_id =
            u128::from_str_radix(&state.replica_id, 16).map_err(|_| StoreError::BadState {
                path: state_path.clone(),
                why: "replica_id is not 32 hex digits".into(),
            })?;
        let ids = |set: &BTreeSet<String>| -> Result<BTreeSet<DocId>, StoreError> {
            set.iter()
                .map(|h| {
                    u128::from_str_radix(h, 16).map_err(|_| StoreError::BadState {
                        path: state_path.clone(),
                        why: format!("deleted note id {h:?} is not hex"),
                    })
                })
                .collect()
        };
        let mut store = Store {
            dir,
            replica_id,
            last_sync_time: state.last_sync_time,
            notes: HashMap::new(),
            pending_deletes: ids(&state.pending_deletes)?,
            deleted: ids(&state.deleted)?,
            write_md: true,
        };
        let mut known = std::collections::HashSet::new();
        for (id_hex, ns) in state.notes {
            let id = u128::from_str_radix(&id_hex, 16).map_err(|_| StoreError::BadState {
                path: state_path.clone(),
                why: format!("note id {id_hex:?} is not hex"),
            })?;
            let stem = ns.file.strip_suffix(".md").unwrap_or(&ns.file).to_owned();
            check_stem(&stem).map_err(|why| StoreError::BadState {
                path: state_path.clone(),
                why: format!("note file {:?}: {why}", ns.file),
            })?;
            known.insert(stem.clone());
            let name = DocName::new(ns.name)?;
            let note = store.load_note(id, name, stem, ns.site, ns.provisional)?;
            store.notes.insert(id, note);
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
        let md = self.dir.join(format!("{stem}.md"));
        let st = self.dir.join(format!("{stem}.md.structure"));
        let log = self.dir.join(format!("{stem}.md.latest_ops"));
        (md, st, log)
    }

    fn load_note(
        &self,
        id: DocId,
        name: DocName,
        stem: String,
        site: u8,
        provisional: bool,
    ) -> Result<Note, StoreError> {
        let (_, st_path, log_path) = self.paths(&stem);
        let (mut doc, last_sync, live_since) = match fs::read(&st_path) {
            Ok(bytes) => read_structure(&st_path, &bytes, name)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => (Doc::new(id, name), 0, Vec::new()),
            Err(e) => return Err(io_err(&st_path)(e)),
        };
        if doc.id != id {
            return Err(StoreError::BadStructure {
                path: st_path,
                why: "its document id differs from the one in state.json",
            });
        }
        let (log, records) = LogFile::open(&log_path).map_err(io_err(&log_path))?;
        let mut pending = Pending::default();
        for r in &records {
            if let Some(p) = pending.replay(r) {
                doc.forget(&p);
            }
            match r {
                Record::Insert { atom, .. } => {
                    doc.apply_insert(atom.data(), atom.pid());
                }
                Record::Delete { pid, .. } => {
                    doc.apply_delete(pid);
                }
                Record::Rename { name, .. } => doc.name = name.clone(),
                Record::Cancel { .. } | Record::MarkSent => {}
            }
        }
        let alloc = make_alloc(id, site, provisional)?;
        Ok(Note {
            doc,
            pending,
            log,
            stem,
            site,
            provisional,
            last_sync,
            live_since: live_since.into_iter().collect(),
            alloc,
            dirty: !records.is_empty(),
        })
    }

    /// Adopts `.md.structure` files that state.json does not list.
    fn adopt_orphans(
        &mut self,
        known: &std::collections::HashSet<String>,
    ) -> Result<(), StoreError> {
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
            let (doc, _, _) = read_structure(&path, &bytes, name.clone())?;
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
            tracing::warn!(file = %path.display(), "adopting a note missing from state.json");
            // Its site is unknown: provisional until the next sync tells it.
            let note = self.load_note(doc.id, name, stem.to_owned(), 0, false)?;
            self.notes.insert(doc.id, note);
        }
        Ok(())
    }

    fn save_state(&self) -> Result<(), StoreError> {
        let state = StateFile {
            format: STATE_FORMAT,
            replica_id: format!("{:032x}", self.replica_id),
            last_sync_time: self.last_sync_time,
            notes: self
                .notes
                .iter()
                .map(|(id, n)| {
                    (
                        format!("{id:032x}"),
                        NoteState {
                            file: format!("{}.md", n.stem),
                            name: n.doc.name.as_str().to_owned(),
                            site: n.site,
                            provisional: n.provisional,
                        },
                    )
                })
                .collect(),
            pending_deletes: self
                .pending_deletes
                .iter()
                .map(|id| format!("{id:032x}"))
                .collect(),
            deleted: self.deleted.iter().map(|id| format!("{id:032x}")).collect(),
        };
        let path = self.dir.join(STATE_DIR).join(STATE_FILE);
        let json = serde_json::to_vec_pretty(&state).expect("state serializes");
        write_atomic(&path, &json).map_err(io_err(&path))
    }

    /// Creates a note (works offline). Its ids are provisional until its
    /// first sync gives it a site.
    pub fn create(&mut self, name: &str) -> Result<DocId, StoreError> {
        let id = random_u128();
        self.create_with_id(id, name)?;
        Ok(id)
    }

    pub(crate) fn create_with_id(&mut self, id: DocId, name: &str) -> Result<(), StoreError> {
        let name = DocName::new(name)?;
        let stem = self.free_stem(name.as_str(), None);
        let (_, _, log_path) = self.paths(&stem);
        let (log, _) = LogFile::open(&log_path).map_err(io_err(&log_path))?;
        let note = Note {
            doc: Doc::new(id, name),
            pending: Pending::default(),
            log,
            stem,
            site: 0,
            provisional: true,
            last_sync: 0,
            live_since: Default::default(),
            alloc: make_alloc(id, 0, true)?,
            dirty: true,
        };
        self.notes.insert(id, note);
        self.save_note(id)?;
        self.save_state()
    }

    /// Adds a note first seen from the server (not provisional).
    pub(crate) fn adopt_remote(
        &mut self,
        id: DocId,
        name: &DocName,
        site: u8,
    ) -> Result<(), StoreError> {
        let stem = self.free_stem(name.as_str(), None);
        let (_, _, log_path) = self.paths(&stem);
        let (log, _) = LogFile::open(&log_path).map_err(io_err(&log_path))?;
        let note = Note {
            doc: Doc::new(id, name.clone()),
            pending: Pending::default(),
            log,
            stem,
            site,
            provisional: false,
            last_sync: 0,
            live_since: Default::default(),
            alloc: make_alloc(id, site, false)?,
            dirty: true,
        };
        self.notes.insert(id, note);
        self.save_note(id)?;
        self.save_state()
    }

    /// A file stem for `name` that no other note uses.
    fn free_stem(&self, name: &str, except: Option<DocId>) -> String {
        let base = safe_stem(name);
        let taken = |s: &str| {
            self.notes
                .iter()
                .any(|(id, n)| Some(*id) != except && n.stem.eq_ignore_ascii_case(s))
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
        self.note(id)?;
        // Even a note that never synced: its first upsert may have reached
        // the server with its reply lost. The server answers
        // unknown_document when it has no such note.
        self.pending_deletes.insert(id);
        self.remove_note(id)
    }

    /// The server confirmed a deletion (35), or has no such note.
    pub(crate) fn delete_confirmed(&mut self, id: DocId) -> Result<(), StoreError> {
        self.pending_deletes.remove(&id);
        self.deleted.insert(id);
        self.save_state()
    }

    /// The server says this note was deleted (35): its files go; if this
    /// device has edits of it that never reached the server, its text is
    /// kept in the trash first (no edit is lost silently). `None` if the
    /// store has no such note (nothing to remove).
    pub(crate) fn apply_remote_deletion(
        &mut self,
        id: DocId,
    ) -> Result<Option<RemoteDeletion>, StoreError> {
        self.pending_deletes.remove(&id);
        self.deleted.insert(id);
        let Some(note) = self.notes.get(&id) else {
            self.save_state()?;
            return Ok(None);
        };
        let name = note.doc.name.as_str().to_owned();
        let file = self.dir.join(format!("{}.md", note.stem));
        let kept = if note.pending.is_empty() {
            None
        } else {
            let trash = self.dir.join(TRASH_DIR);
            fs::create_dir_all(&trash).map_err(io_err(&trash))?;
            let path = free_trash_path(&trash, &note.stem, id);
            write_atomic(&path, note.doc.text().as_bytes()).map_err(io_err(&path))?;
            Some(path)
        };
        self.remove_note(id)?;
        Ok(Some(RemoteDeletion {
            id,
            name,
            file,
            kept,
        }))
    }

    /// Forgets a note (its id is in `pending_deletes` or `deleted`): the
    /// state first (an orphan structure file of a deleted id is removed at
    /// the next open, never adopted), then its files.
    fn remove_note(&mut self, id: DocId) -> Result<(), StoreError> {
        let note = self.notes.remove(&id).ok_or(StoreError::UnknownNote(id))?;
        self.save_state()?;
        let (md, st, log) = self.paths(&note.stem);
        drop(note);
        remove_if_there(&st)?;
        remove_if_there(&log)?;
        if self.write_md {
            remove_if_there(&md)?;
        }
        crate::fsutil::sync_dir(&self.dir).map_err(io_err(&self.dir))
    }

    pub(crate) fn note(&self, id: DocId) -> Result<&Note, StoreError> {
        self.notes.get(&id).ok_or(StoreError::UnknownNote(id))
    }

    pub(crate) fn note_mut(&mut self, id: DocId) -> Result<&mut Note, StoreError> {
        self.notes.get_mut(&id).ok_or(StoreError::UnknownNote(id))
    }

    pub fn list(&self) -> Vec<NoteInfo> {
        let mut v: Vec<NoteInfo> = self
            .notes
            .iter()
            .map(|(id, n)| NoteInfo {
                id: *id,
                name: n.doc.name.as_str().to_owned(),
                file: self.dir.join(format!("{}.md", n.stem)),
                pending_ops: n.pending.len(),
                last_sync: n.last_sync,
                site: n.site,
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        v
    }

    pub fn text(&self, id: DocId) -> Result<String, StoreError> {
        Ok(self.note(id)?.doc.text())
    }

    pub fn name(&self, id: DocId) -> Result<String, StoreError> {
        Ok(self.note(id)?.doc.name.as_str().to_owned())
    }

    /// Inserts text at a char index. Durable (logged and fsynced) on return.
    /// `sent`: the ops go out right away in a live session.
    pub fn insert(
        &mut self,
        id: DocId,
        index: usize,
        text: &str,
        sent: bool,
    ) -> Result<Vec<LocalOp>, StoreError> {
        let note = self.note_mut(id)?;
        let ops = note.doc.insert(&mut note.alloc, index, text)?;
        note.record(ops, sent)
    }

    /// Deletes a char range. Durable on return.
    pub fn delete(
        &mut self,
        id: DocId,
        range: std::ops::Range<usize>,
        sent: bool,
    ) -> Result<Vec<LocalOp>, StoreError> {
        let note = self.note_mut(id)?;
        let ops = note.doc.delete(&mut note.alloc, range)?;
        note.record(ops, sent)
    }

    /// Renames a note; its files move with it.
    pub fn rename(&mut self, id: DocId, name: &str, sent: bool) -> Result<(), StoreError> {
        let name = DocName::new(name)?;
        let record = {
            let note = self.note_mut(id)?;
            note.doc.name = name.clone();
            note.pending.record_rename(name.clone(), sent)
        };
        {
            let note = self.note_mut(id)?;
            note.log
                .append(&[record])
                .map_err(|e| io_err(note.log.path())(e))?;
        }
        self.move_files(id, &name)
    }

    /// Applies a name that came from the server.
    pub(crate) fn apply_remote_name(
        &mut self,
        id: DocId,
        name: &DocName,
    ) -> Result<(), StoreError> {
        let note = self.note_mut(id)?;
        if note.doc.name == *name {
            return Ok(());
        }
        note.doc.name = name.clone();
        note.dirty = true;
        self.move_files(id, name)
    }

    fn move_files(&mut self, id: DocId, name: &DocName) -> Result<(), StoreError> {
        let stem = self.free_stem(name.as_str(), Some(id));
        let old = self.note(id)?.stem.clone();
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
            note.stem = stem;
            note.dirty = true;
        }
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
        let (md, st, _) = {
            let n = self.note(id)?;
            self.paths(&n.stem)
        };
        let write_md = self.write_md;
        let note = self.note_mut(id)?;
        write_atomic(
            &st,
            &write_structure(&note.doc, note.last_sync, &note.live_since),
        )
        .map_err(io_err(&st))?;
        if write_md {
            write_atomic(&md, note.doc.text().as_bytes()).map_err(io_err(&md))?;
        }
        note.pending.structure_saved();
        let records = note.pending.to_records();
        note.log
            .rewrite(&records)
            .map_err(|e| io_err(note.log.path())(e))?;
        note.dirty = false;
        Ok(())
    }

    /// Saves every note with unsaved changes.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        let dirty: Vec<DocId> = self
            .notes
            .iter()
            .filter(|(_, n)| n.dirty)
            .map(|(id, _)| *id)
            .collect();
        for id in dirty {
            self.save_note(id)?;
        }
        self.save_state()
    }

    /// Sets a note's site (from a 34 or 68). A provisional note's pending
    /// inserts are re-made with ids of the new site (they never left the
    /// device); returns whether that happened.
    pub(crate) fn set_site(&mut self, id: DocId, site: u8) -> Result<bool, StoreError> {
        let note = self.note_mut(id)?;
        if site == 0 || (note.site == site && !note.provisional) {
            return Ok(false);
        }
        note.site = site;
        note.alloc = make_alloc(id, site, false)?;
        let rekeyed = note.provisional;
        if note.provisional {
            let Note {
                doc,
                pending,
                alloc,
                ..
            } = note;
            let (removed, added) = doc.coalesce(alloc, |p| pending.is_unsent_insert(p), true)?;
            let records = pending.swap_coalesced(&removed, &added);
            note.provisional = false;
            note.log
                .append(&records)
                .map_err(|e| io_err(note.log.path())(e))?;
            note.dirty = true;
        }
        self.save_state()?;
        Ok(rekeyed)
    }

    /// Before an upsert: merges adjacent never-sent inserts into large
    /// atoms (the seed's rule: bytes sent proportional to the new text).
    pub(crate) fn coalesce(&mut self, id: DocId) -> Result<(), StoreError> {
        let note = self.note_mut(id)?;
        if note.provisional {
            return Ok(());
        }
        let Note {
            doc,
            pending,
            alloc,
            ..
        } = note;
        let (removed, added) = doc.coalesce(alloc, |p| pending.is_unsent_insert(p), false)?;
        if !removed.is_empty() {
            let records = pending.swap_coalesced(&removed, &added);
            note.log
                .append(&records)
                .map_err(|e| io_err(note.log.path())(e))?;
            note.dirty = true;
        }
        Ok(())
    }

    /// Marks every pending op of a note as sent, durably, before it goes out.
    pub(crate) fn mark_sent(&mut self, id: DocId) -> Result<(), StoreError> {
        let note = self.note_mut(id)?;
        note.pending.mark_sent();
        note.log
            .append(&[Record::MarkSent])
            .map_err(|e| io_err(note.log.path())(e))
    }

    /// Applies a server response (33) to a note. Returns the text changes.
    pub(crate) fn apply_response(
        &mut self,
        id: DocId,
        inserts: &AtomList,
        deletes: &PidList,
    ) -> Result<Vec<TextChange>, StoreError> {
        let note = self.note_mut(id)?;
        let mut changes = Vec::new();
        for a in inserts {
            changes.extend(note.doc.apply_insert(a.data, &a.pid.to_pid()));
        }
        for p in deletes {
            changes.extend(note.doc.apply_delete(&p.to_pid()));
        }
        if !inserts.is_empty() || !deletes.is_empty() {
            note.dirty = true;
        }
        Ok(changes)
    }

    /// Applies one remote insert (a live session's 65).
    pub(crate) fn apply_remote_insert(
        &mut self,
        id: DocId,
        data: &str,
        pid: &notesync_protocol::Pid,
    ) -> Result<Vec<TextChange>, StoreError> {
        let note = self.note_mut(id)?;
        let c = note.doc.apply_insert(data, pid);
        note.dirty = true;
        Ok(c)
    }

    /// Applies one remote delete (a live session's 66).
    pub(crate) fn apply_remote_delete(
        &mut self,
        id: DocId,
        pid: &notesync_protocol::Pid,
    ) -> Result<Vec<TextChange>, StoreError> {
        let note = self.note_mut(id)?;
        let c = note.doc.apply_delete(pid);
        note.dirty = true;
        Ok(c)
    }

    /// Remembers an id that entered the note live, after its cursor.
    pub(crate) fn note_live(
        &mut self,
        id: DocId,
        pid: notesync_protocol::Pid,
    ) -> Result<(), StoreError> {
        let note = self.note_mut(id)?;
        note.live_since.insert(pid);
        note.dirty = true;
        Ok(())
    }

    /// After a complete catch-up (every 33 up to its 34 or 68): ids that
    /// entered live after the old cursor and are not among the catch-up's
    /// inserts were deleted meanwhile (PROTOCOL.md 3.2.1).
    pub(crate) fn reconcile_catch_up(
        &mut self,
        id: DocId,
        inserted: &std::collections::HashSet<notesync_protocol::Pid>,
    ) -> Result<Vec<TextChange>, StoreError> {
        let note = self.note_mut(id)?;
        let mut changes = Vec::new();
        for pid in std::mem::take(&mut note.live_since) {
            if !inserted.contains(&pid) && !note.pending.has_insert(&pid) {
                changes.extend(note.doc.apply_delete(&pid));
            }
        }
        note.dirty = true;
        Ok(changes)
    }

    /// After a resync (PROTOCOL.md 3.6: a 36, then the full live state up
    /// to its 34): every live atom of the note that the server did not list
    /// live was deleted there (its tombstone may be gone), so it is deleted
    /// here, except this replica's own inserts not yet acknowledged, which
    /// stay and are sent. Tombstones the note knows stay known (so its ids
    /// are never made again).
    pub(crate) fn reconcile_full(
        &mut self,
        id: DocId,
        inserted: &std::collections::HashSet<notesync_protocol::Pid>,
    ) -> Result<Vec<TextChange>, StoreError> {
        let note = self.note_mut(id)?;
        let mut changes = Vec::new();
        for pid in note.doc.live_atoms() {
            if !inserted.contains(&pid) && !note.pending.has_insert(&pid) {
                changes.extend(note.doc.apply_delete(&pid));
            }
        }
        note.live_since.clear();
        note.dirty = true;
        Ok(changes)
    }

    pub(crate) fn set_note_sync(&mut self, id: DocId, t: Time) -> Result<(), StoreError> {
        let note = self.note_mut(id)?;
        if t > note.last_sync {
            note.last_sync = t;
            note.dirty = true;
        }
        Ok(())
    }
}

impl Note {
    fn record(&mut self, ops: Vec<LocalOp>, sent: bool) -> Result<Vec<LocalOp>, StoreError> {
        let rec = self.pending.record(ops, sent);
        for p in &rec.forget {
            self.doc.forget(p);
        }
        self.log
            .append(&rec.records)
            .map_err(|e| io_err(self.log.path())(e))?;
        self.dirty = true;
        Ok(rec.to_send)
    }
}

fn remove_if_there(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// `<trash>/<stem>.<id>.md`, or with ` (k)` before `.md` if taken.
pub(crate) fn free_trash_path(trash: &Path, stem: &str, id: DocId) -> PathBuf {
    let first = trash.join(format!("{stem}.{id:032x}.md"));
    if !first.exists() {
        return first;
    }
    (2..)
        .map(|k| trash.join(format!("{stem}.{id:032x} ({k}).md")))
        .find(|p| !p.exists())
        .expect("some suffix is free")
}

fn make_alloc(id: DocId, site: u8, provisional: bool) -> Result<Allocator, StoreError> {
    let site = if provisional || site == 0 {
        PROVISIONAL_SITE
    } else {
        site
    };
    Allocator::new(site, id, seed()).map_err(|e: AllocError| StoreError::Edit(EditError::Alloc(e)))
}

/// Serializes a note's structure file.
pub fn write_structure(
    doc: &Doc,
    last_sync: Time,
    live_since: &std::collections::BTreeSet<notesync_protocol::Pid>,
) -> BytesMut {
    let (atoms, deleted) = doc.to_parts();
    let mut out =
        BytesMut::with_capacity(40 + doc.len_chars() + 8 * atoms.len() + 8 * deleted.len());
    out.put_u128(doc.id);
    out.put_u64(last_sync);
    out.put_u64(atoms.len() as u64);
    for (pid, data) in &atoms {
        out.put_u8(data.len() as u8);
        out.put_slice(data.as_bytes());
        pid.write_wire(&mut out);
    }
    out.put_u64(deleted.len() as u64);
    for pid in &deleted {
        pid.write_wire(&mut out);
    }
    out.put_u64(live_since.len() as u64);
    for pid in live_since {
        pid.write_wire(&mut out);
    }
    out
}

/// Parses a structure file: (document, last sync time, ids to reconcile).
/// Its body has the layout of a 33's lists, so the protocol's decoder
/// validates it (counts are checked against the file's size before use, as
/// on the wire).
pub fn read_structure(
    path: &Path,
    b: &[u8],
    name: DocName,
) -> Result<(Doc, Time, Vec<notesync_protocol::Pid>), StoreError> {
    let bad = |why| StoreError::BadStructure {
        path: path.to_owned(),
        why,
    };
    if b.len() < 24 {
        return Err(bad("shorter than its 24-byte header"));
    }
    let mut head = &b[..24];
    let id = head.get_u128();
    let last_sync = head.get_u64();
    // Rebuild the lists as a 33 frame: header, id, empty name, lists.
    let as_33 = |lists: &[u8]| -> Result<(notesync_protocol::DocResponse, BytesMut), StoreError> {
        let mut frame = BytesMut::with_capacity(lists.len() + 18);
        frame.put_u8(33);
        frame.put_u128(id);
        frame.put_u8(b'\n');
        frame.put_slice(lists);
        let limits = notesync_protocol::Limits {
            max_frame_bytes: frame.len().max(1024),
            max_items_per_frame: u64::MAX,
            max_pid_depth: 255,
        };
        match FrameDecoder::<ServerFrame>::new(limits).decode(&mut frame) {
            Ok(Some(ServerFrame::DocResponse(r))) => Ok((r, frame)),
            Ok(Some(_)) => Err(bad("it is not a structure file")),
            Ok(None) => Err(bad("it is cut short")),
            Err(_) => Err(bad("an atom or id in it is malformed")),
        }
    };
    let (r, rest) = as_33(&b[24..])?;
    // The third list (ids to reconcile) is absent in files written before
    // it existed.
    let live_since = if rest.is_empty() {
        Vec::new()
    } else {
        let mut lists = BytesMut::with_capacity(rest.len() + 8);
        lists.put_u64(0);
        lists.put_slice(&rest);
        let (r2, rest2) = as_33(&lists)?;
        if !rest2.is_empty() {
            return Err(bad("it has bytes after its lists"));
        }
        r2.deletes.iter().map(|p| p.to_pid()).collect()
    };
    let atoms = r
        .inserts
        .iter()
        .map(|a| (a.pid.to_pid(), a.data.to_owned()))
        .collect();
    let deleted = r.deletes.iter().map(|p| p.to_pid()).collect();
    Ok((
        Doc::from_parts(id, name, atoms, deleted),
        last_sync,
        live_since,
    ))
}

const RESERVED: &[&str] = &[
    "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
    "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

/// A file stem for a note name that is one plain path component on every
/// OS: no separators or `..`, no control or reserved characters, no
/// leading dot (hidden; and our own `.notesync`), no reserved device names,
/// at most 100 bytes.
pub fn safe_stem(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| match c {
            '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect();
    s = s
        .trim()
        .trim_start_matches('.')
        .trim_end_matches(['.', ' '])
        .to_owned();
    if s.len() > 100 {
        let mut cut = 100;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s = s.trim_end_matches(['.', ' ']).to_owned();
    }
    if s.is_empty() {
        s = "untitled".into();
    }
    let upper = s.split('.').next().unwrap_or("").to_ascii_uppercase();
    if RESERVED.contains(&upper.as_str()) {
        s.insert(0, '_');
    }
    s
}

fn check_stem(stem: &str) -> Result<(), &'static str> {
    if stem.is_empty() || safe_stem(stem) != stem {
        return Err("not a safe file name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_safe_single_components() {
        for (name, want) in [
            ("../../x", "_.._x"),
            ("..", "untitled"),
            ("a/b\\c", "a_b_c"),
            ("CON", "_CON"),
            ("con.txt", "_con.txt"),
            (".notesync", "notesync"),
            ("  spaced. ", "spaced"),
            ("", "untitled"),
            ("ok name", "ok name"),
        ] {
            let s = safe_stem(name);
            assert_eq!(s, want, "{name:?}");
            assert!(!s.contains('/') && !s.contains('\\') && s != ".." && !s.starts_with('.'));
        }
        assert!(safe_stem(&"é".repeat(200)).len() <= 100);
    }

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
