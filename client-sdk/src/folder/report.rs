//! What the folder's operations report: [`PickUp`], [`WriteBack`],
//! [`FileDeletion`], and the per-note [`FileState`] of `status`. Plain data
//! for the CLI to print; no I/O.

use std::path::PathBuf;

use notesync_protocol::DocId;

use crate::store::NoteInfo;

/// What [`super::Folder::pick_up`] found.
#[derive(Debug, Default)]
pub struct PickUp {
    /// Notes whose file a person edited (now edits of the note).
    pub edited: Vec<DocId>,
    /// New notes made from new files (file name as found).
    pub created: Vec<(DocId, String)>,
    /// Notes whose file a person renamed (the note was renamed after it).
    pub renamed: Vec<(DocId, String)>,
    /// Files moved to the name the store gave their note (from, to).
    pub moved: Vec<(String, String)>,
    /// Notes whose file was deleted that never synced: it is written again
    /// from the store (a note is deleted only once the server has it).
    pub missing: Vec<(DocId, String)>,
    /// Notes whose file a person deleted: the notes are deleted (here now,
    /// on the server and every device at the next sync).
    pub deleted: Vec<(DocId, String)>,
    /// Files left alone, with why.
    pub skipped: Vec<(String, String)>,
}

impl PickUp {
    pub fn is_empty(&self) -> bool {
        self.edited.is_empty()
            && self.created.is_empty()
            && self.renamed.is_empty()
            && self.missing.is_empty()
            && self.deleted.is_empty()
    }

    /// The notes this changed.
    pub fn notes(&self) -> impl Iterator<Item = DocId> + '_ {
        self.edited
            .iter()
            .copied()
            .chain(self.created.iter().map(|c| c.0))
            .chain(self.renamed.iter().map(|c| c.0))
    }
}

/// What [`super::Folder::write_back`] did.
#[derive(Debug, Default)]
pub struct WriteBack {
    /// Files written (created, updated, or under a note's new name).
    pub written: Vec<String>,
    /// Files that were in the way of a note's new name, moved aside
    /// (from, to); they become notes of their own at the next pick-up.
    pub moved_aside: Vec<(String, String)>,
    /// Files not written, with why (e.g. not UTF-8: never overwritten).
    pub skipped: Vec<(String, String)>,
}

/// What became of the file of a note deleted on another device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDeletion {
    pub id: DocId,
    pub name: String,
    /// The note's file, as it was named here.
    pub file: String,
    /// Whether the file was removed (it had nothing that was not synced).
    pub removed: bool,
    /// Where text that never reached the server was kept: the store's copy
    /// of the note's unsynced edits, and the file itself if it was edited
    /// after it was last picked up.
    pub kept: Vec<PathBuf>,
    /// Why the file was left as it is, if it was (e.g. not UTF-8).
    pub left: Option<String>,
}

/// How a note's file compares with the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileState {
    /// The file has the note's text.
    InStep,
    /// A person edited the file; not picked up yet.
    Edited,
    /// The store has changes the file does not show yet.
    Behind,
    /// The file is gone: the note is deleted at the next sync (a note that
    /// never synced is written again instead).
    Missing,
    /// The file is not usable text; why.
    Unusable(String),
}

/// One note in [`super::Folder::status`].
#[derive(Debug, Clone)]
pub struct NoteStatus {
    pub info: NoteInfo,
    pub state: FileState,
}

/// Progress of a long pick-up or write-back: (done, total).
pub type Progress = Box<dyn FnMut(usize, usize) + Send>;
