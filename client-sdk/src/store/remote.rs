//! What sync (`crate::sync`) and live sessions (`crate::client`) do to the
//! store: the notes they ask about, the ops they send and see
//! acknowledged, and what the server sends back. Each method names one step
//! of the protocol; the rules for a note are in `note.rs`.

use std::collections::HashSet;
use std::fs;

use notesync_protocol::{AtomList, DocId, DocName, Pid, PidList, Time};

use super::{Outgoing, RemoteDeletion, Store, StoreError, TRASH_DIR, free_trash_path, io_err};
use crate::doc::TextChange;
use crate::fsutil::write_atomic;
use crate::oplog::{OpKey, PendingOp};

impl Store {
    /// Whether the store has this note.
    pub(crate) fn contains(&self, id: DocId) -> bool {
        self.notes.contains_key(&id)
    }

    /// Notes whose ids are still provisional (never synced), with their
    /// names: each needs a site before its edits can be sent.
    pub(crate) fn provisional_notes(&self) -> Vec<(DocId, DocName)> {
        self.notes
            .iter()
            .filter(|(_, n)| n.provisional())
            .map(|(id, n)| (*id, n.name().clone()))
            .collect()
    }

    /// Notes with pending ops that can be sent (they have a site).
    pub(crate) fn notes_to_upsert(&self) -> Vec<DocId> {
        self.notes
            .iter()
            .filter(|(_, n)| !n.provisional() && n.site() != 0 && n.pending_ops() > 0)
            .map(|(id, _)| *id)
            .collect()
    }

    /// A note's sync time (its cursor: the `since` of a pull or session).
    pub(crate) fn note_sync_time(&self, id: DocId) -> Result<Time, StoreError> {
        Ok(self.slot(id)?.last_sync())
    }

    /// Whether a note's ids are still provisional (none can be sent).
    pub(crate) fn is_provisional(&self, id: DocId) -> Result<bool, StoreError> {
        Ok(self.slot(id)?.provisional())
    }

    /// Whether a local rename of the note is not yet acknowledged.
    pub(crate) fn has_pending_rename(&self, id: DocId) -> Result<bool, StoreError> {
        Ok(self.slot(id)?.pending_rename())
    }

    /// Ops of the note not yet acknowledged.
    pub(crate) fn pending_ops(&self, id: DocId) -> Result<usize, StoreError> {
        Ok(self.slot(id)?.pending_ops())
    }

    /// A note's pending ops made after sequence number `after`, in order
    /// (a live session's "not yet sent on this connection").
    pub(crate) fn ops_since(
        &self,
        id: DocId,
        after: u64,
    ) -> Result<Vec<(u64, PendingOp)>, StoreError> {
        self.with_note(id, |n| n.ops_since(after))
    }

    /// Adds a note first seen from the server (not provisional).
    pub(crate) fn adopt_remote(
        &mut self,
        id: DocId,
        name: &DocName,
        site: u8,
    ) -> Result<(), StoreError> {
        self.add_note(id, name.clone(), site, false, true, false)
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
        if !self.notes.contains_key(&id) {
            self.save_state()?;
            return Ok(None);
        }
        let dir = self.dir.clone();
        let note = self.note_mut(id)?;
        let name = note.doc.name.as_str().to_owned();
        let file = dir.join(format!("{}.md", note.stem));
        let kept = if note.pending.is_empty() {
            None
        } else {
            let trash = dir.join(TRASH_DIR);
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
        note.changed();
        self.move_files(id, name)
    }

    /// Sets a note's site (from a 34 or 68). A provisional note's pending
    /// inserts are re-made with ids of the new site (they never left the
    /// device).
    pub(crate) fn set_site(&mut self, id: DocId, site: u8) -> Result<(), StoreError> {
        if self.note_mut(id)?.set_site(site)? {
            self.logs_unsynced.set(true);
            self.save_state_soon()?;
        }
        Ok(())
    }

    /// A new note's text, given once its site came (see
    /// [`crate::Client::sync_now_filling`]): made with the site's ids at
    /// once, and appended to the log unsynced, as an import's first insert
    /// is (`Note::from_file`): the upsert that follows at once fsyncs it
    /// with its MarkSent, and until then the text is where the caller got
    /// it. Only into a blank note ([`Store::is_blank`]), which a crash
    /// leaves as it was.
    pub(crate) fn fill_new_note(&mut self, id: DocId, text: &str) -> Result<(), StoreError> {
        let note = self.note_mut(id)?;
        debug_assert!(note.doc.len_chars() == 0 && note.pending.is_empty());
        note.from_file = true;
        note.insert(0, text, false)?;
        self.logs_unsynced.set(true);
        Ok(())
    }

    /// Before an upsert: coalesces the note's never-sent inserts, marks
    /// every pending op sent (durably, before it goes out) and returns
    /// them, with the name and `since` the upsert carries.
    pub(crate) fn outgoing(&mut self, id: DocId) -> Result<Outgoing, StoreError> {
        self.note_mut(id)?.outgoing()
    }

    /// Marks every pending op of a note as sent, durably, before it goes out.
    pub(crate) fn mark_sent(&mut self, id: DocId) -> Result<(), StoreError> {
        self.note_mut(id)?.mark_sent()
    }

    /// The server acknowledged these ops (an upsert's 34): they leave the
    /// note's log at its next save.
    pub(crate) fn acknowledge(
        &mut self,
        id: DocId,
        inserts: &[Pid],
        deletes: &[Pid],
        rename: Option<&DocName>,
    ) -> Result<(), StoreError> {
        self.note_mut(id)?.acknowledge(inserts, deletes, rename);
        Ok(())
    }

    /// A session ack (69) covered one op. A rename is acknowledged only if
    /// it is still the pending one (not replaced by a newer rename). An
    /// insert is then stored after this note's cursor (3.2.1) -- unless
    /// this connection's catch-up already showed it stored (`caught_up`): a
    /// re-send after lost acks is stored before the cursor, and the next
    /// catch-up would wrongly delete it here.
    pub(crate) fn acknowledge_session_op(
        &mut self,
        id: DocId,
        key: &OpKey,
        rename: Option<&DocName>,
        caught_up: &HashSet<Pid>,
    ) -> Result<(), StoreError> {
        self.note_mut(id)?
            .acknowledge_session_op(key, rename, caught_up);
        Ok(())
    }

    /// Applies a server response (33) to a note. Returns the text changes.
    pub(crate) fn apply_response(
        &mut self,
        id: DocId,
        inserts: &AtomList,
        deletes: &PidList,
    ) -> Result<Vec<TextChange>, StoreError> {
        Ok(self.note_mut(id)?.apply_response(inserts, deletes))
    }

    /// Applies one insert received live (a session's 65), after the note's
    /// cursor: its id is remembered for the next catch-up to reconcile.
    pub(crate) fn apply_live_insert(
        &mut self,
        id: DocId,
        data: &str,
        pid: Pid,
    ) -> Result<Vec<TextChange>, StoreError> {
        Ok(self.note_mut(id)?.apply_live_insert(data, pid))
    }

    /// Applies one remote delete (a live session's 66).
    pub(crate) fn apply_remote_delete(
        &mut self,
        id: DocId,
        pid: &Pid,
    ) -> Result<Vec<TextChange>, StoreError> {
        Ok(self.note_mut(id)?.apply_remote_delete(pid))
    }

    /// After a complete catch-up (every 33 up to its 34 or 68), whose
    /// inserts were `inserted`:
    /// - a delta (`full` false): ids that entered live after the old cursor
    ///   and are not among the inserts were deleted meanwhile (PROTOCOL.md
    ///   3.2.1);
    /// - the full state (`full`: after a resync, PROTOCOL.md 3.6: a 36, then
    ///   the full live state up to its 34): every live atom of the note that
    ///   the server did not list live was deleted there (its tombstone may
    ///   be gone), so it is deleted here, except this replica's own inserts
    ///   not yet acknowledged, which stay and are sent. Tombstones the note
    ///   knows stay known (so its ids are never made again).
    pub(crate) fn reconcile(
        &mut self,
        id: DocId,
        inserted: &HashSet<Pid>,
        full: bool,
    ) -> Result<Vec<TextChange>, StoreError> {
        let note = self.note_mut(id)?;
        Ok(if full {
            note.reconcile_full(inserted)
        } else {
            note.reconcile_catch_up(inserted)
        })
    }

    /// Moves a note's cursor forward to `t` (never back).
    pub(crate) fn set_note_sync(&mut self, id: DocId, t: Time) -> Result<(), StoreError> {
        self.note_mut(id)?.set_sync(t);
        Ok(())
    }
}
