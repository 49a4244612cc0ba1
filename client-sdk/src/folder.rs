//! A folder of `.md` files that people edit with any editor, kept in step
//! with the store that lives in the same folder: the logic of the
//! `notesync` CLI, in the library so that it can be tested and reused.
//!
//! The folder *is* the store ([`crate::Store`]): each note is `<file>.md`
//! beside its `.md.structure` and `.md.latest_ops`. [`Folder::pick_up`]
//! finds what people changed in the `.md` files and turns it into edits of
//! the notes (char diffs, see [`crate::merge`]); [`Folder::write_back`]
//! writes what the store has into the files. Between the two,
//! [`crate::Client::sync_now`] or a live [`Session`] exchanges the edits
//! with the server.
//!
//! The rule that shapes this module: **a file a person changed is never
//! overwritten before its change is picked up.** So the folder takes the
//! `.md` files over from the store ([`crate::Store::set_write_md`]) and
//! remembers, per note, the file name and the text it last read from or
//! wrote to that file: its *base*, kept in `.notesync/cli/<id>.base` so that
//! it survives restarts and crashes. A file that differs from its base was
//! edited. Its edits (base → file) are merged into the store's text, which
//! may have moved on with remote changes (base → store), by position
//! ([`crate::merge::merge`]), and taken into the note so that a crash
//! neither loses nor doubles them ([`take`]); only then is the file
//! rewritten, after checking once more, just before the atomic rename, that
//! it has not changed meanwhile.
//!
//! Which files are notes: regular files named `*.md` directly in the folder,
//! except dotfiles (our own temp files, editors' swap files, `.notesync/`)
//! and names starting with `~` or `#` (editors' lock and backup files).
//! `*.md.structure` and `*.md.latest_ops` do not end in `.md`. Every path
//! written is the folder joined with one plain file name, checked here
//! (the store already makes note names into safe file names).
//!
//! The parts: [`bases`] (what the folder remembers of each file), [`import`]
//! (new files' text given at their notes' first sync), [`take`]
//! (a file's edits into its note), [`write_back`] (notes into files, and
//! `status`), [`report`] (what the operations return); the file I/O itself
//! is [`crate::fsutil`]. This file: opening the folder, picking up files,
//! and the files of notes deleted elsewhere.
//!
//! May touch: the folder's `.md` files, `.notesync/cli/` (through
//! [`bases`]) and the trash; the store only through [`Client`], a note's
//! [`Session`], or the store lock they hand out.

mod bases;
mod import;
mod report;
mod take;
mod write_back;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use notesync_protocol::{DocId, DocName};

use self::bases::Bases;
pub use self::report::{FileDeletion, FileState, NoteStatus, PickUp, Progress, WriteBack};
use self::take::Target;
use crate::client::{Client, Session};
use crate::fsutil::{
    FileError, Read, Wrote, at, move_new, read_text, remove_if_unchanged, sync_dir,
};
use crate::net::ServerConfig;
use crate::store::{
    Deferral, DeferredState, NoteInfo, RemoteDeletion, StoreError, TRASH_DIR, free_trash_path,
};

/// Attempts at writing one file that keeps changing under us.
const WRITE_TRIES: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] FileError),
    #[error("{0} is not a folder")]
    NotAFolder(PathBuf),
}

/// Whether a file name is one the folder treats as a note's text.
pub fn is_note_file(name: &str) -> bool {
    name.len() > 3
        && name.ends_with(".md")
        && !name.starts_with(['.', '~', '#'])
        && is_plain_name(name)
}

/// One normal path component: never `..`, a separator, or a root.
fn is_plain_name(name: &str) -> bool {
    let mut c = Path::new(name).components();
    matches!((c.next(), c.next()), (Some(Component::Normal(n)), None) if n == name)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A store folder that people edit as plain files.
pub struct Folder {
    dir: PathBuf,
    client: Client,
    bases: Bases,
    progress: Option<Progress>,
    /// New notes left blank by [`Folder::pick_up_for_sync`], by id: the
    /// file that holds their text (see [`import`]).
    blank: HashMap<DocId, String>,
}

impl Folder {
    /// Opens the store in `dir` (which must exist) and takes its `.md`
    /// files over from it.
    pub fn open(dir: &Path, server: ServerConfig) -> Result<Folder, FolderError> {
        if !dir.is_dir() {
            return Err(FolderError::NotAFolder(dir.to_owned()));
        }
        let dir = dir.canonicalize().map_err(at(dir))?;
        let client = Client::open(&dir, server)?;
        client
            .store()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_write_md(false);
        let (bases, takes) = Bases::load(&dir)?;
        let mut folder = Folder {
            dir,
            client,
            bases,
            progress: None,
            blank: HashMap::new(),
        };
        folder.finish_takes(takes)?;
        // A note deleted elsewhere whose file was not dealt with yet (a
        // crash right after the sync that removed it from the store).
        let orphans: Vec<DocId> = {
            let store = folder
                .client
                .store()
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            folder
                .bases
                .ids()
                .filter(|id| store.is_deleted(*id) && !store.contains(*id))
                .collect()
        };
        for id in orphans {
            folder.remove_deleted_file(id, String::new(), None)?;
        }
        Ok(folder)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Reports progress of long pick-ups and write-backs.
    pub fn set_progress(&mut self, p: Option<Progress>) {
        self.progress = p;
    }

    fn report_progress(&mut self, done: usize, total: usize) {
        if let Some(p) = self.progress.as_mut() {
            p(done, total);
        }
    }

    /// The path of a file name in the folder; refuses anything but a plain
    /// name, so nothing is ever written outside the folder.
    fn path(&self, name: &str) -> Result<PathBuf, FolderError> {
        if !is_plain_name(name) {
            let not_plain = io::Error::new(io::ErrorKind::InvalidInput, "not a plain file name");
            return Err(at(&self.dir.join(name))(not_plain).into());
        }
        Ok(self.dir.join(name))
    }

    fn info(&self, id: DocId) -> Result<NoteInfo, FolderError> {
        Ok(self.client.info(id)?)
    }

    /// The `.md` files in the folder that could be notes, by name.
    fn note_files(&self) -> Result<Vec<String>, FolderError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(at(&self.dir))? {
            let entry = entry.map_err(at(&self.dir))?;
            if let Some(name) = entry.file_name().to_str()
                && is_note_file(name)
            {
                out.push(name.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Finds what people changed in the files and makes it edits of the
    /// notes: edited files are diffed into their note (through its live
    /// session when `sessions` has one), new files become notes (named
    /// after the file), a file renamed by a person renames its note.
    /// `only`: look at these file names only (from file-change events);
    /// `None`: every file.
    pub fn pick_up(
        &mut self,
        only: Option<&HashSet<String>>,
        sessions: &HashMap<DocId, Session>,
    ) -> Result<PickUp, FolderError> {
        self.fill_blank_notes()?;
        self.pick_up_with(only, sessions, false)
    }

    /// [`Folder::pick_up`] of every file, before [`Folder::sync_reporting`]:
    /// a new file's note is made blank, and its text goes in once the note
    /// has its site (see [`import`]).
    pub fn pick_up_for_sync(&mut self) -> Result<PickUp, FolderError> {
        self.pick_up_with(None, &HashMap::new(), true)
    }

    fn pick_up_with(
        &mut self,
        only: Option<&HashSet<String>>,
        sessions: &HashMap<DocId, Session>,
        leave_blank: bool,
    ) -> Result<PickUp, FolderError> {
        // Many new files: state.json once, not once per note.
        let store = self.client.store().clone();
        let deferred = DeferredState::begin(&store, Deferral::Import);
        let report = self.pick_up_files(only, sessions, leave_blank)?;
        // A new note's first insert is not synced yet (its file holds the
        // text): its base waits for its log, made durable by its upsert.
        self.sync_bases(false)?;
        deferred.end()?;
        Ok(report)
    }

    /// Makes the bases set since the last call durable, in one append and
    /// fsync of the journal; but never before their note's log: a base
    /// says its note holds the file's text, and an import's first insert
    /// is appended unsynced ([`crate::Store::sync_logs`]). `force`: sync
    /// those logs now; otherwise their bases wait, in memory, for a later
    /// call after the log was synced (by the MarkSent before its upsert).
    fn sync_bases(&mut self, force: bool) -> Result<(), FolderError> {
        let mut store = self
            .client
            .store()
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if force {
            store.sync_logs(&self.bases.unsynced())?;
        }
        Ok(self.bases.sync(|id| store.log_synced(id))?)
    }

    fn pick_up_files(
        &mut self,
        only: Option<&HashSet<String>>,
        sessions: &HashMap<DocId, Session>,
        leave_blank: bool,
    ) -> Result<PickUp, FolderError> {
        let in_scope = |name: &str| only.is_none_or(|s| s.contains(name));
        let notes = self.client.list();
        let mut report = PickUp::default();
        let mut claimed: HashSet<String> = HashSet::new();
        let mut missing: Vec<DocId> = Vec::new();
        // By name: notes whose file was never written.
        let mut unwritten: HashMap<String, Vec<DocId>> = HashMap::new();
        let total = notes.len();
        for (k, info) in notes.iter().enumerate() {
            let cur = file_name(&info.file);
            let held = self.bases.get(info.id).map(|b| b.file.clone());
            claimed.insert(cur.clone());
            claimed.extend(held.clone());
            if !in_scope(&cur) && !held.as_deref().is_some_and(in_scope) {
                continue;
            }
            let target = Target::new(&self.client, info.id, sessions);
            match self.pick_up_note(info, &target)? {
                Found::Unchanged => {}
                Found::Unwritten => unwritten
                    .entry(info.name.clone())
                    .or_default()
                    .push(info.id),
                Found::Edited => report.edited.push(info.id),
                Found::Missing(f) => {
                    missing.push(info.id);
                    report.missing.push((info.id, f));
                }
                Found::Unusable(f, why) => report.skipped.push((f, why)),
            }
            if only.is_none() && k % 64 == 63 {
                self.report_progress(k + 1, total);
            }
        }
        let candidates: Vec<String> = match only {
            Some(names) => {
                let mut v: Vec<String> =
                    names.iter().filter(|n| is_note_file(n)).cloned().collect();
                v.sort();
                v
            }
            None => self.note_files()?,
        };
        for name in candidates {
            if claimed.contains(&name) {
                continue;
            }
            let path = self.path(&name)?;
            let text = match read_text(&path)? {
                Read::Missing => continue,
                Read::Unusable(why) => {
                    report.skipped.push((name, why));
                    continue;
                }
                Read::Text(t, _) => t,
            };
            let stem = &name[..name.len() - 3];
            // A note whose file vanished, and a new file with its text: the
            // person renamed the file.
            let renamed_from = missing.iter().position(|id| {
                self.bases.get(*id).is_some_and(|b| b.text == text)
                    || self.client.text(*id).is_ok_and(|t| t == text)
            });
            // A note made from this very file (its name; its text, or none
            // yet) whose file had not moved to the note's name when a crash
            // came.
            let made_from = unwritten.get_mut(stem).and_then(|ids| {
                let (i, empty) = ids.iter().enumerate().find_map(|(i, id)| {
                    let t = self.client.text(*id).ok()?;
                    (t == text || t.is_empty()).then_some((i, t.is_empty()))
                })?;
                Some((ids.remove(i), empty))
            });
            let mut new_note = false;
            let id = if let Some((id, empty)) = made_from {
                if empty && !text.is_empty() {
                    self.client.insert(id, 0, &text)?;
                }
                id
            } else if let Some(i) = renamed_from {
                let id = missing.remove(i);
                report.missing.retain(|m| m.0 != id);
                let target = Target::new(&self.client, id, sessions);
                if DocName::new(stem).is_err() {
                    report
                        .skipped
                        .push((name, "its name cannot be a note's name".into()));
                    continue;
                }
                target.rename(stem)?;
                report.renamed.push((id, stem.to_owned()));
                id
            } else {
                if DocName::new(stem).is_err() {
                    report
                        .skipped
                        .push((name, "its name cannot be a note's name".into()));
                    continue;
                }
                // This file is the note's own: its name may be taken.
                let id = self.client.create_for_file(stem)?;
                new_note = true;
                report.created.push((id, name.clone()));
                id
            };
            // The store may have made the name safe (`CON`, `a:b`) or
            // unique (`note (2)`): the file follows its note.
            let file = file_name(&self.info(id)?.file);
            if file != name {
                let to = self.path(&file)?;
                if move_new(&path, &to)? == Wrote::Done {
                    report.moved.push((name.clone(), file.clone()));
                } else {
                    // Something is at the note's file already: leave this
                    // one, write the note's file from the store.
                    if new_note && !text.is_empty() {
                        self.client.insert(id, 0, &text)?;
                    }
                    report.skipped.push((
                        name.clone(),
                        format!("its note's file {file} is taken; it was left as it is"),
                    ));
                    continue;
                }
            }
            // A crash before the text is in leaves a blank note beside its
            // file: the next pick-up takes the file's text into it.
            if new_note && !text.is_empty() {
                if leave_blank {
                    self.blank.insert(id, file);
                    continue;
                }
                self.client.insert(id, 0, &text)?;
            }
            self.bases.set(id, &file, &text);
        }
        // Files a person deleted (not renamed, see above): a note the server
        // has is deleted; one that never synced is written again.
        for id in missing {
            let Some(i) = report.missing.iter().position(|m| m.0 == id) else {
                continue;
            };
            if self.info(id)?.last_sync == 0 {
                continue;
            }
            let (_, file) = report.missing.remove(i);
            // A live session on it stops working: the caller closes it.
            self.client.delete_note(id)?;
            self.bases.drop(id);
            report.deleted.push((id, file));
        }
        Ok(report)
    }

    /// Deals with the files of notes deleted on another device (from
    /// [`crate::SyncReport::deleted`] or [`crate::SessionEvent::Deleted`]):
    /// a file that holds what was last picked up from it is removed; a file
    /// edited since (its edits never reached the store) is moved to the
    /// trash, never lost.
    pub fn apply_remote_deletions(
        &mut self,
        deletions: &[RemoteDeletion],
    ) -> Result<Vec<FileDeletion>, FolderError> {
        let mut out = Vec::new();
        for d in deletions {
            out.push(self.remove_deleted_file(d.id, d.name.clone(), d.kept.clone())?);
        }
        self.sync_bases(true)?;
        Ok(out)
    }

    fn remove_deleted_file(
        &mut self,
        id: DocId,
        name: String,
        kept: Option<PathBuf>,
    ) -> Result<FileDeletion, FolderError> {
        let base = self.bases.get(id).cloned();
        let mut done = FileDeletion {
            id,
            name,
            file: base.as_ref().map(|b| b.file.clone()).unwrap_or_default(),
            removed: false,
            kept: kept.into_iter().collect(),
            left: None,
        };
        if let Some(base) = &base {
            let path = self.path(&base.file)?;
            match read_text(&path)? {
                Read::Missing => {}
                Read::Unusable(why) => done.left = Some(why),
                Read::Text(t, stamp) if t == base.text => {
                    // Unless it changed in the last instant.
                    if remove_if_unchanged(&path, &stamp)? == Wrote::Done {
                        sync_dir(&self.dir).map_err(at(&self.dir))?;
                        done.removed = true;
                    } else {
                        done.left = Some("it changed while being removed".into());
                    }
                }
                Read::Text(..) => {
                    let trash = self.dir.join(TRASH_DIR);
                    fs::create_dir_all(&trash).map_err(at(&trash))?;
                    let stem = base.file.strip_suffix(".md").unwrap_or(&base.file);
                    let to = free_trash_path(&trash, stem, id);
                    if move_new(&path, &to)? == Wrote::Done {
                        done.kept.push(to);
                    } else {
                        done.left = Some("the trash file name is taken".into());
                    }
                }
            }
        }
        self.bases.drop(id);
        Ok(done)
    }

    fn pick_up_note(&mut self, info: &NoteInfo, target: &Target<'_>) -> Result<Found, FolderError> {
        let cur = file_name(&info.file);
        let base = self.bases.get(info.id).cloned();
        // The file that holds the note: the one last read or written (the
        // store may have renamed the note since; the file follows at the
        // write-back).
        let held = base.as_ref().map_or(cur.clone(), |b| b.file.clone());
        let path = self.path(&held)?;
        let text = match read_text(&path)? {
            Read::Text(t, _) => t,
            Read::Unusable(why) => return Ok(Found::Unusable(held, why)),
            // Never written: not a deletion (its file may be under the
            // name it came with, see `Found::Unwritten`).
            Read::Missing if base.is_none() => return Ok(Found::Unwritten),
            // Already moved to the new name: not a deletion.
            Read::Missing if held != cur && info.file.exists() => {
                return Ok(Found::Unchanged);
            }
            Read::Missing => return Ok(Found::Missing(held)),
        };
        // The file as it was last read or written: the note is not read.
        if base.as_ref().is_some_and(|b| b.text == text) {
            return Ok(Found::Unchanged);
        }
        let store = self.client.text(info.id)?;
        let base_text = base.as_ref().map_or(&store, |b| &b.text);
        if text == *base_text {
            self.bases.set(info.id, &held, &text);
            return Ok(Found::Unchanged);
        }
        // The file has the note's text already: nothing to take (a crash
        // after a write-back wrote the file and before its base was saved).
        if text == store {
            self.bases.set(info.id, &held, &text);
            return Ok(Found::Unchanged);
        }
        self.take_edits(target, &held, base_text, &text)?;
        Ok(Found::Edited)
    }
}

enum Found {
    Unchanged,
    /// The note's file was never written: a note from elsewhere not yet
    /// written out, or one made from a file that was to move to the
    /// note's (safe or free) name when a crash came first.
    Unwritten,
    Edited,
    Missing(String),
    Unusable(String, String),
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn only_plain_md_names_are_notes() {
        for ok in ["a.md", "note (2).md", "_CON.md", "é.md"] {
            assert!(is_note_file(ok), "{ok}");
        }
        for no in [
            ".md",
            "a.md.structure",
            "a.md.latest_ops",
            ".a.md.tmp",
            ".a.md",
            "~a.md",
            "#a.md",
            "a.txt",
            "a/b.md",
            "..md",
        ] {
            assert!(!is_note_file(no), "{no}");
        }
    }

    pub(super) fn offline(dir: &Path) -> Folder {
        Folder::open(dir, ServerConfig::new("127.0.0.1:1")).unwrap()
    }

    pub(super) fn only_note(f: &Folder) -> NoteInfo {
        let notes = f.client().list();
        assert_eq!(notes.len(), 1, "{notes:?}");
        notes.into_iter().next().unwrap()
    }

    /// An offline folder with one file, `name` holding `text`, picked up:
    /// a new note.
    pub(super) fn one_note(name: &str, text: &str) -> (tempfile::TempDir, Folder, DocId) {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(name), text).unwrap();
        let mut f = offline(dir.path());
        let p = f.pick_up(None, &HashMap::new()).unwrap();
        assert_eq!(p.created.len(), 1, "{p:?}");
        let id = only_note(&f).id;
        (dir, f, id)
    }

    #[test]
    fn renamed_and_deleted_files() {
        let (dir, mut f, id) = one_note("a.md", "text of a");
        let none = HashMap::new();
        // A person renames the file: the note follows, no new note.
        fs::rename(dir.path().join("a.md"), dir.path().join("b.md")).unwrap();
        let p = f.pick_up(None, &none).unwrap();
        assert_eq!(p.renamed, vec![(id, "b".to_owned())]);
        assert!(p.created.is_empty() && p.missing.is_empty(), "{p:?}");
        assert_eq!(f.client().name(id).unwrap(), "b");
        assert_eq!(file_name(&only_note(&f).file), "b.md");
        // A person deletes it: reported, and written again.
        fs::remove_file(dir.path().join("b.md")).unwrap();
        assert_eq!(f.status().unwrap().0[0].state, FileState::Missing);
        let p = f.pick_up(None, &none).unwrap();
        assert_eq!(p.missing, vec![(id, "b.md".to_owned())]);
        f.write_back(None, &none).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("b.md")).unwrap(),
            "text of a"
        );
        // Not-UTF-8 files are left alone, never overwritten.
        fs::write(dir.path().join("b.md"), [0xff, 0xfe]).unwrap();
        let p = f.pick_up(None, &none).unwrap();
        assert_eq!(p.skipped.len(), 1, "{p:?}");
        f.client().insert(id, 0, "more ").unwrap();
        let w = f.write_back(None, &none).unwrap();
        assert_eq!(w.skipped.len(), 1, "{w:?}");
        assert_eq!(fs::read(dir.path().join("b.md")).unwrap(), [0xff, 0xfe]);
    }
}
