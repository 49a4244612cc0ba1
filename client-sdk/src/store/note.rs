//! One note in memory: its document, its pending ops and their log, and the
//! rules for changing them. Every change that must survive a crash is
//! appended to the note's op log (fsynced) before the call returns; every
//! other change marks the note dirty, for the next save. Only the store
//! module (`mod.rs`, `remote.rs`, `state.rs`) sees a note's fields.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io;
use std::path::Path;

use notesync_protocol::{
    AllocError, Allocator, Atom, AtomList, DocId, DocName, Pid, PidList, Time,
};

use super::structure::{read_structure, write_structure};
use super::{StoreError, io_err, note_paths};
use crate::doc::{Changes, Doc, EditError, LocalOp, TextChange};
use crate::fsutil::write_atomic;
use crate::oplog::{LogFile, OpKey, Pending, PendingOp, Record};

/// The site provisional ids use: they never leave the device (see
/// PROTOCOL.md 1.3: a note created offline has no site until its first
/// upsert), so any site would do.
const PROVISIONAL_SITE: u8 = 255;

/// One note in memory.
#[derive(Debug)]
pub(crate) struct Note {
    pub(super) doc: Doc,
    pub(super) pending: Pending,
    pub(super) log: LogFile,
    /// File name without the `.md`.
    pub(super) stem: String,
    pub(super) site: u8,
    /// Ids made before the note had a site: re-made before they are sent.
    pub(super) provisional: bool,
    pub(super) last_sync: Time,
    /// Ids that entered the note after `last_sync` without a catch-up
    /// (received live, or own inserts acknowledged in a session).
    pub(super) live_since: BTreeSet<Pid>,
    alloc: Allocator,
    /// Unsaved changes to the structure or text files.
    pub(super) dirty: bool,
    /// Some of those changes are in neither the structure nor the log (a
    /// remote op, an acknowledgement, a new sync time): the note must be
    /// saved before it may leave memory (see `slots.rs`).
    pub(super) unlogged: bool,
    /// Made from a file by an import, with no text yet: its first record
    /// (the file's text) is appended unsynced, because until the note's
    /// log is synced that file still holds the text, and a note lost or
    /// found empty after a crash is picked up from it again (the fsync of
    /// the MarkSent before its upsert, a save, or [`super::Store::sync_logs`]
    /// before the folder records the file's base, makes it durable).
    pub(super) from_file: bool,
}

/// A note's pending ops as an upsert carries them.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub inserts: Vec<Atom>,
    pub deletes: Vec<Pid>,
    /// A rename not yet acknowledged.
    pub rename: Option<DocName>,
    /// The name the upsert carries: the pending rename, or the current one.
    pub name: DocName,
    /// The note's sync time (the upsert's `since`).
    pub since: Time,
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (std::process::id() as u64).rotate_left(32)
}

fn make_alloc(id: DocId, site: u8, provisional: bool) -> Result<Allocator, StoreError> {
    let site = if provisional || site == 0 {
        PROVISIONAL_SITE
    } else {
        site
    };
    Allocator::new(site, id, seed()).map_err(|e: AllocError| StoreError::Edit(EditError::Alloc(e)))
}

impl Note {
    /// A note new to this device, with no text yet; its log is opened
    /// (created) at `log_path`.
    pub(super) fn new(
        id: DocId,
        name: DocName,
        stem: String,
        site: u8,
        provisional: bool,
        log_path: &Path,
    ) -> Result<Note, StoreError> {
        let log = LogFile::create(log_path).map_err(io_err(log_path))?;
        Ok(Note {
            doc: Doc::new(id, name),
            pending: Pending::default(),
            log,
            stem,
            site,
            provisional,
            last_sync: 0,
            live_since: BTreeSet::new(),
            alloc: make_alloc(id, site, provisional)?,
            dirty: true,
            unlogged: false,
            from_file: false,
        })
    }

    /// Loads a note from `dir`: its structure file (none yet: an empty
    /// document), then its op log replayed on it.
    pub(super) fn load(
        dir: &Path,
        id: DocId,
        name: DocName,
        stem: String,
        site: u8,
        provisional: bool,
    ) -> Result<Note, StoreError> {
        let (_, st_path, log_path) = note_paths(dir, &stem);
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
            unlogged: false,
            from_file: false,
        })
    }

    fn append(&mut self, records: &[Record]) -> Result<(), StoreError> {
        self.log
            .append(records)
            .map_err(|e| io_err(self.log.path())(e))
    }

    /// Inserts text at a char index; durable (logged) on return.
    pub(super) fn insert(
        &mut self,
        index: usize,
        text: &str,
        sent: bool,
    ) -> Result<Vec<LocalOp>, StoreError> {
        let ops = self.doc.insert(&mut self.alloc, index, text)?;
        self.record(ops, sent)
    }

    /// Deletes a char range; durable on return.
    pub(super) fn delete(
        &mut self,
        range: std::ops::Range<usize>,
        sent: bool,
    ) -> Result<Vec<LocalOp>, StoreError> {
        let ops = self.doc.delete(&mut self.alloc, range)?;
        self.record(ops, sent)
    }

    fn record(&mut self, ops: Vec<LocalOp>, sent: bool) -> Result<Vec<LocalOp>, StoreError> {
        let rec = self.pending.record(ops, sent);
        for p in &rec.forget {
            self.doc.forget(p);
        }
        if std::mem::take(&mut self.from_file) {
            self.log
                .append_unsynced(&rec.records)
                .map_err(|e| io_err(self.log.path())(e))?;
        } else {
            self.append(&rec.records)?;
        }
        self.dirty = true;
        Ok(rec.to_send)
    }

    /// A local rename, logged (its files are the store's to move).
    pub(super) fn rename(&mut self, name: DocName, sent: bool) -> Result<(), StoreError> {
        self.doc.name = name.clone();
        let record = self.pending.record_rename(name, sent);
        self.append(&[record])
    }

    /// Writes the structure, then the text (`md`, unless the app keeps the
    /// `.md` files), then compacts the log: in that order, so that the log
    /// replayed on whatever structure a crash left gives the latest state.
    pub(super) fn save(&mut self, st: &Path, md: Option<&Path>) -> Result<(), StoreError> {
        self.save_files(st, md, write_atomic)?;
        self.compact_log(false)
    }

    /// The first half of [`Note::save`]: the structure, then the text,
    /// each replaced atomically by `replace` (with or without the folder's
    /// fsync: a batch syncs the folder once, before its logs are compacted).
    pub(super) fn save_files(
        &mut self,
        st: &Path,
        md: Option<&Path>,
        replace: fn(&Path, &[u8]) -> io::Result<()>,
    ) -> Result<(), StoreError> {
        replace(
            st,
            &write_structure(&self.doc, self.last_sync, &self.live_since),
        )
        .map_err(io_err(st))?;
        if let Some(md) = md {
            replace(md, self.doc.text().as_bytes()).map_err(io_err(md))?;
        }
        Ok(())
    }

    /// The second half of [`Note::save`], once the structure is durable:
    /// the log keeps only what the structure does not hold. `in_batch`:
    /// a non-empty log's folder fsync is the caller's.
    pub(super) fn compact_log(&mut self, in_batch: bool) -> Result<(), StoreError> {
        self.pending.structure_saved();
        let records = self.pending.to_records();
        let done = if in_batch {
            self.log.rewrite_in_batch(&records)
        } else {
            self.log.rewrite(&records)
        };
        done.map_err(|e| io_err(self.log.path())(e))?;
        self.dirty = false;
        self.unlogged = false;
        Ok(())
    }

    /// Sets the note's site; a provisional note's pending inserts are
    /// re-made with ids of the new site (they never left the device).
    /// Returns whether anything changed (state.json is then to be saved).
    pub(super) fn set_site(&mut self, site: u8) -> Result<bool, StoreError> {
        if site == 0 || (self.site == site && !self.provisional) {
            return Ok(false);
        }
        self.site = site;
        self.alloc = make_alloc(self.doc.id, site, false)?;
        if self.provisional {
            self.swap_coalesced(true)?;
            self.provisional = false;
        }
        Ok(true)
    }

    /// Merges adjacent never-sent inserts into large atoms (`force`: every
    /// run, to re-make provisional ids) and swaps them in the log.
    fn swap_coalesced(&mut self, force: bool) -> Result<(), StoreError> {
        let Note {
            doc,
            pending,
            alloc,
            ..
        } = self;
        let (removed, added) = doc.coalesce(alloc, |p| pending.is_unsent_insert(p), force)?;
        if force || !removed.is_empty() {
            let records = self.pending.swap_coalesced(&removed, &added);
            // Unsynced: the swapped ids never left the device, and the
            // fsync of the MarkSent before they go out covers this record
            // too. Lost in a crash, the note (still provisional, or with
            // its inserts unmerged) swaps again; state.json, which would
            // call it sited, is saved only after its log is synced
            // (`Store::save_state`).
            self.log
                .append_unsynced(&records)
                .map_err(|e| io_err(self.log.path())(e))?;
            self.changed();
        }
        Ok(())
    }

    /// A change the log does not hold: saved before the note may leave
    /// memory.
    pub(super) fn changed(&mut self) {
        self.dirty = true;
        self.unlogged = true;
    }

    /// The server acknowledged these ops (an upsert's 34); they leave the
    /// log at the next save.
    pub(super) fn acknowledge(
        &mut self,
        inserts: &[Pid],
        deletes: &[Pid],
        rename: Option<&DocName>,
    ) {
        self.pending.acknowledge(inserts, deletes, rename);
        self.changed();
    }

    /// Makes the log's unsynced records durable.
    pub(super) fn sync_log(&self) -> Result<(), StoreError> {
        self.log.sync().map_err(|e| io_err(self.log.path())(e))
    }

    /// Before an upsert: coalesces the never-sent inserts (the seed's rule:
    /// bytes sent proportional to the new text), marks every pending op
    /// sent, durably, before it goes out, and returns them.
    pub(super) fn outgoing(&mut self) -> Result<Outgoing, StoreError> {
        if !self.provisional {
            self.swap_coalesced(false)?;
        }
        self.mark_sent()?;
        let (inserts, deletes, rename) = self.pending.snapshot();
        let name = rename.clone().unwrap_or_else(|| self.doc.name.clone());
        Ok(Outgoing {
            inserts,
            deletes,
            rename,
            name,
            since: self.last_sync,
        })
    }

    /// Marks every pending op as sent, durably, before it goes out.
    pub(super) fn mark_sent(&mut self) -> Result<(), StoreError> {
        self.pending.mark_sent();
        self.append(&[Record::MarkSent])
    }

    /// Pending ops made after sequence number `after` (see
    /// [`Pending::ops_since`]).
    pub(super) fn ops_since(&self, after: u64) -> Vec<(u64, PendingOp)> {
        self.pending.ops_since(after)
    }

    /// Applies a server response (33). Returns the text changes.
    pub(super) fn apply_response(
        &mut self,
        inserts: &AtomList,
        deletes: &PidList,
    ) -> Vec<TextChange> {
        let mut changes = Changes::default();
        for a in inserts {
            changes.extend(self.doc.apply_insert(a.data, &a.pid.to_pid()));
        }
        for p in deletes {
            changes.extend(self.doc.apply_delete(&p.to_pid()));
        }
        if !inserts.is_empty() || !deletes.is_empty() {
            self.changed();
        }
        changes.into_vec()
    }

    /// Applies one insert received live (a session's 65), remembering its
    /// id: it entered the note after its cursor.
    pub(super) fn apply_live_insert(&mut self, data: &str, pid: Pid) -> Vec<TextChange> {
        let c = self.doc.apply_insert(data, &pid);
        self.live_since.insert(pid);
        self.changed();
        c
    }

    /// Applies one remote delete (a live session's 66).
    pub(super) fn apply_remote_delete(&mut self, pid: &Pid) -> Vec<TextChange> {
        let c = self.doc.apply_delete(pid);
        self.changed();
        c
    }

    /// Deletes the ids `stale` yields that are neither in `inserted` nor
    /// this replica's own inserts not yet acknowledged.
    fn delete_unlisted(&mut self, stale: Vec<Pid>, inserted: &HashSet<Pid>) -> Vec<TextChange> {
        let mut changes = Vec::new();
        for pid in stale {
            if !inserted.contains(&pid) && !self.pending.has_insert(&pid) {
                changes.extend(self.doc.apply_delete(&pid));
            }
        }
        self.changed();
        changes
    }

    /// After a complete catch-up: ids that entered live after the old
    /// cursor and are not among the catch-up's inserts were deleted
    /// meanwhile (PROTOCOL.md 3.2.1).
    pub(super) fn reconcile_catch_up(&mut self, inserted: &HashSet<Pid>) -> Vec<TextChange> {
        let stale = std::mem::take(&mut self.live_since).into_iter().collect();
        self.delete_unlisted(stale, inserted)
    }

    /// After a resync (PROTOCOL.md 3.6): every live atom the server did not
    /// list live was deleted there.
    pub(super) fn reconcile_full(&mut self, inserted: &HashSet<Pid>) -> Vec<TextChange> {
        let stale = self.doc.live_atoms();
        let changes = self.delete_unlisted(stale, inserted);
        self.live_since.clear();
        changes
    }

    pub(super) fn set_sync(&mut self, t: Time) {
        if t > self.last_sync {
            self.last_sync = t;
            self.changed();
        }
    }

    /// A session ack covered one op (see `Store::acknowledge_session_op`).
    pub(super) fn acknowledge_session_op(
        &mut self,
        key: &OpKey,
        rename: Option<&DocName>,
        caught_up: &HashSet<Pid>,
    ) {
        self.pending.acknowledge_one(key, rename);
        self.changed();
        if let OpKey::Insert(p) = key
            && !caught_up.contains(p)
        {
            self.live_since.insert(p.clone());
        }
    }
}
