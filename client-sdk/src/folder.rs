//! A folder of `.md` files that people edit with any editor, kept in step
//! with the store that lives in the same folder: the logic of the
//! `notesync` CLI, in the library so that it can be tested and reused.
//!
//! The folder *is* the store ([`crate::Store`]): each note is `<file>.md`
//! beside its `.md.structure` and `.md.latest_ops`. [`Folder::pick_up`]
//! finds what people changed in the `.md` files and turns it into edits of
//! the notes (char diffs, see [`diff`]); [`Folder::write_back`] writes what
//! the store has into the files. Between the two, [`crate::Client::sync_now`]
//! or a live [`Session`] exchanges the edits with the server.
//!
//! The rule that shapes this module: **a file a person changed is never
//! overwritten before its change is picked up.** So the folder takes the
//! `.md` files over from the store ([`crate::Store::set_write_md`]) and
//! remembers, per note, the file name and the text it last read from or
//! wrote to that file: its *base*, kept in `.notesync/cli/<id>.base` so that
//! it survives restarts and crashes. A file that differs from its base was
//! edited. Its edits (base → file) are merged into the store's text, which
//! may have moved on with remote changes (base → store), by position
//! ([`merge`]); only then is the file rewritten, after checking once more,
//! just before the atomic rename, that it has not changed meanwhile.
//!
//! Which files are notes: regular files named `*.md` directly in the folder,
//! except dotfiles (our own temp files, editors' swap files, `.notesync/`)
//! and names starting with `~` or `#` (editors' lock and backup files).
//! `*.md.structure` and `*.md.latest_ops` do not end in `.md`. Every path
//! written is the folder joined with one plain file name, checked here
//! (the store already makes note names into safe file names).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use notesync_protocol::{DocId, DocName};
use similar::{Algorithm, DiffTag, capture_diff_slices_deadline};

use crate::client::{Client, Session};
use crate::fsutil::{sync_dir, write_atomic};
use crate::net::ServerConfig;
use crate::store::{NoteInfo, RemoteDeletion, StoreError, TRASH_DIR, free_trash_path};

/// Where the bases live, inside the store's own folder.
const BASE_DIR: &str = ".notesync/cli";
/// Longest time one diff may take; past it the diff is coarser, never wrong.
const DIFF_TIME: Duration = Duration::from_millis(500);
/// Two char-level changes closer than this many unchanged chars become one
/// (fewer, more readable edits; the chars between are re-typed).
const MIN_GAP: usize = 4;
/// Attempts at writing one file that keeps changing under us.
const WRITE_TRIES: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} is not a folder")]
    NotAFolder(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FolderError + '_ {
    move |source| FolderError::Io {
        path: path.to_owned(),
        source,
    }
}

// ---------------------------------------------------------------------------
// Diffs

/// One changed region: `old` chars were replaced by `new` chars (char
/// indices into the old and the new text; either may be empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hunk {
    pub old: Range<usize>,
    pub new: Range<usize>,
}

/// The changed regions from `old` to `new`, in order, by char index. Lines
/// are compared first, then the chars of changed lines, so a small edit in
/// a big file is a small diff and the work is proportional to what changed.
pub fn diff(old: &str, new: &str) -> Vec<Hunk> {
    if old == new {
        return Vec::new();
    }
    let deadline = Some(Instant::now() + DIFF_TIME);
    let old_lines: Vec<&str> = old.split_inclusive('\n').collect();
    let new_lines: Vec<&str> = new.split_inclusive('\n').collect();
    let (old_at, new_at) = (line_starts(&old_lines), line_starts(&new_lines));
    let mut out: Vec<Hunk> = Vec::new();
    let mut push = |h: Hunk| match out.last_mut() {
        Some(last) if h.old.start - last.old.end < MIN_GAP => {
            last.old.end = h.old.end;
            last.new.end = h.new.end;
        }
        _ => out.push(h),
    };
    for op in capture_diff_slices_deadline(Algorithm::Myers, &old_lines, &new_lines, deadline) {
        let (tag, o, n) = op.as_tag_tuple();
        let (oc, nc) = (
            old_at[o.start]..old_at[o.end],
            new_at[n.start]..new_at[n.end],
        );
        match tag {
            DiffTag::Equal => {}
            DiffTag::Delete | DiffTag::Insert => push(Hunk { old: oc, new: nc }),
            DiffTag::Replace => {
                let a: Vec<char> = old_lines[o].iter().flat_map(|l| l.chars()).collect();
                let b: Vec<char> = new_lines[n].iter().flat_map(|l| l.chars()).collect();
                for op in capture_diff_slices_deadline(Algorithm::Myers, &a, &b, deadline) {
                    let (tag, o, n) = op.as_tag_tuple();
                    if tag != DiffTag::Equal {
                        push(Hunk {
                            old: oc.start + o.start..oc.start + o.end,
                            new: nc.start + n.start..nc.start + n.end,
                        });
                    }
                }
            }
        }
    }
    out
}

/// The char index at which each line starts, plus the total.
fn line_starts(lines: &[&str]) -> Vec<usize> {
    let mut at = Vec::with_capacity(lines.len() + 1);
    let mut n = 0;
    at.push(0);
    for l in lines {
        n += l.chars().count();
        at.push(n);
    }
    at
}

/// An edit of a note's text, at char indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    Insert { at: usize, text: String },
    Delete(Range<usize>),
}

/// The edits that bring a person's changes to a file (`base` → `file`)
/// into the store's text `store` (which is `base` plus changes from
/// elsewhere), at `store`'s char indices, in the order to apply them one
/// after the other (from the end backwards, so no index shifts).
///
/// Text the person deleted is deleted where the store still has it; text
/// the store gained meanwhile is kept; text the person typed goes where
/// they typed it, after anything the store gained at that same spot. With
/// `store == base` this is simply the diff from the store's text to the
/// file's.
pub fn merge(base: &str, file: &str, store: &str) -> Vec<Edit> {
    let user = diff(base, file);
    if user.is_empty() {
        return Vec::new();
    }
    let kept = kept_runs(base, store);
    let store_len = store.chars().count();
    let file_at: Vec<usize> = file
        .char_indices()
        .map(|(i, _)| i)
        .chain([file.len()])
        .collect();
    // (position, deletes before inserts at a position, later hunks first)
    let mut edits: Vec<(usize, u8, usize, Edit)> = Vec::new();
    for (k, h) in user.iter().enumerate() {
        for r in map_range(&kept, h.old.clone()) {
            edits.push((r.start, 1, k, Edit::Delete(r)));
        }
        if !h.new.is_empty() {
            let text = file[file_at[h.new.start]..file_at[h.new.end]].to_owned();
            let at = map_pos(&kept, h.old.start, store_len);
            edits.push((at, 0, k, Edit::Insert { at, text }));
        }
    }
    edits.sort_by_key(|e| std::cmp::Reverse((e.0, e.1, e.2)));
    edits.into_iter().map(|e| e.3).collect()
}

/// Runs of `base` chars that `store` still has: (base index, store index,
/// length), in order.
fn kept_runs(base: &str, store: &str) -> Vec<(usize, usize, usize)> {
    let base_len = base.chars().count();
    let mut runs = Vec::new();
    let (mut o, mut n) = (0, 0);
    for h in diff(base, store) {
        if h.old.start > o {
            runs.push((o, n, h.old.start - o));
        }
        o = h.old.end;
        n = h.new.end;
    }
    if base_len > o {
        runs.push((o, n, base_len - o));
    }
    runs
}

/// Where, in the store's text, to put what was typed before base char `p`.
fn map_pos(kept: &[(usize, usize, usize)], p: usize, store_len: usize) -> usize {
    let i = kept.partition_point(|r| r.0 + r.2 <= p);
    match kept.get(i) {
        Some(&(o, n, _)) if o <= p => n + (p - o),
        Some(&(_, n, _)) => n,
        None => store_len,
    }
}

/// The store ranges of the base chars in `r` that the store still has.
fn map_range(kept: &[(usize, usize, usize)], r: Range<usize>) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let first = kept.partition_point(|k| k.0 + k.2 <= r.start);
    for &(o, n, len) in &kept[first..] {
        if o >= r.end {
            break;
        }
        let (s, e) = (r.start.max(o), r.end.min(o + len));
        if s < e {
            out.push(n + (s - o)..n + (e - o));
        }
    }
    out
}

/// Applies edits from [`merge`] to a string (what the store does to a
/// note's text); for tests and previews.
pub fn apply_to(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for e in edits {
        match e {
            Edit::Insert { at, text } => {
                chars.splice(*at..*at, text.chars());
            }
            Edit::Delete(r) => {
                chars.drain(r.clone());
            }
        }
    }
    chars.into_iter().collect()
}

// ---------------------------------------------------------------------------
// Files

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

/// A file's length and modification time: whether it changed since.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
}

impl Stamp {
    fn of(path: &Path) -> io::Result<Option<Stamp>> {
        match fs::symlink_metadata(path) {
            Ok(m) => Ok(Some(Stamp {
                len: m.len(),
                modified: m.modified().ok(),
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// What a note's file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Read {
    Missing,
    /// Not something we may treat as text (not UTF-8, not a regular file).
    Unusable(String),
    Text(String, Stamp),
}

/// Reads a file with the stamp it had while read (re-read if it changed
/// during the read).
fn read_file(path: &Path) -> Result<Read, FolderError> {
    for _ in 0..WRITE_TRIES {
        let before = match fs::symlink_metadata(path) {
            Ok(m) if !m.is_file() => return Ok(Read::Unusable("not a regular file".into())),
            Ok(_) => Stamp::of(path).map_err(io_err(path))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Read::Missing),
            Err(e) => return Err(io_err(path)(e)),
        };
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Read::Missing),
            Err(e) => return Err(io_err(path)(e)),
        };
        let after = Stamp::of(path).map_err(io_err(path))?;
        if before != after {
            continue;
        }
        return Ok(match (String::from_utf8(bytes), after) {
            (Ok(text), Some(stamp)) => Read::Text(text, stamp),
            (Ok(_), None) => Read::Missing,
            (Err(_), _) => Read::Unusable("not UTF-8 text".into()),
        });
    }
    Ok(Read::Unusable("it keeps changing while being read".into()))
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".notesync-tmp");
    path.with_file_name(name)
}

fn write_temp(path: &Path, text: &str) -> io::Result<PathBuf> {
    let tmp = temp_path(path);
    let mut f = File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(tmp)
}

/// How a guarded write went.
#[derive(Debug, PartialEq, Eq)]
enum Wrote {
    Done,
    /// The file changed (or appeared) since it was read: not written.
    Changed,
}

/// Replaces `path` with `text` if the file still has the stamp it had when
/// it was read (checked just before the atomic rename).
fn replace_if_unchanged(path: &Path, text: &str, stamp: &Stamp) -> Result<Wrote, FolderError> {
    let tmp = write_temp(path, text).map_err(io_err(path))?;
    if Stamp::of(path).map_err(io_err(path))?.as_ref() != Some(stamp) {
        let _ = fs::remove_file(&tmp);
        return Ok(Wrote::Changed);
    }
    fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(path.parent().unwrap_or(Path::new("."))).map_err(io_err(path))?;
    Ok(Wrote::Done)
}

/// Creates `path` with `text`, atomically, unless something is there.
fn create_new(path: &Path, text: &str) -> Result<Wrote, FolderError> {
    let tmp = write_temp(path, text).map_err(io_err(path))?;
    let linked = fs::hard_link(&tmp, path);
    let result = match linked {
        Ok(()) => Ok(Wrote::Done),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Wrote::Changed),
        // No hard links on this file system: check, then rename.
        Err(_) if path.exists() => Ok(Wrote::Changed),
        Err(_) => fs::rename(&tmp, path)
            .map(|()| Wrote::Done)
            .map_err(io_err(path)),
    };
    let _ = fs::remove_file(&tmp);
    if result.as_ref().is_ok_and(|w| *w == Wrote::Done) {
        sync_dir(path.parent().unwrap_or(Path::new("."))).map_err(io_err(path))?;
    }
    result
}

/// Moves `from` to `to` unless `to` exists.
fn move_new(from: &Path, to: &Path) -> Result<Wrote, FolderError> {
    match fs::hard_link(from, to) {
        Ok(()) => {
            fs::remove_file(from).map_err(io_err(from))?;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(Wrote::Changed),
        Err(_) if to.exists() => return Ok(Wrote::Changed),
        Err(_) => fs::rename(from, to).map_err(io_err(to))?,
    }
    sync_dir(to.parent().unwrap_or(Path::new("."))).map_err(io_err(to))?;
    Ok(Wrote::Done)
}

// ---------------------------------------------------------------------------
// The folder

/// What the folder last read from or wrote to a note's file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Base {
    file: String,
    text: String,
}

/// Where the edits of one note go: its live session, or the store.
#[derive(Clone)]
enum Target<'a> {
    Client(Client, DocId),
    Session(&'a Session),
}

impl<'a> Target<'a> {
    fn new(client: &Client, id: DocId, sessions: &'a HashMap<DocId, Session>) -> Self {
        match sessions.get(&id) {
            Some(s) => Target::Session(s),
            None => Target::Client(client.clone(), id),
        }
    }

    fn apply(&self, edits: &[Edit]) -> Result<(), StoreError> {
        for e in edits {
            match (self, e) {
                (Target::Client(c, id), Edit::Insert { at, text }) => c.insert(*id, *at, text)?,
                (Target::Client(c, id), Edit::Delete(r)) => c.delete(*id, r.clone())?,
                (Target::Session(s), Edit::Insert { at, text }) => s.insert(*at, text)?,
                (Target::Session(s), Edit::Delete(r)) => s.delete(r.clone())?,
            }
        }
        Ok(())
    }

    fn rename(&self, name: &str) -> Result<(), StoreError> {
        match self {
            Target::Client(c, id) => c.rename(*id, name),
            Target::Session(s) => s.rename(name),
        }
    }
}

/// What [`Folder::pick_up`] found.
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

/// What [`Folder::write_back`] did.
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

/// One note in [`Folder::status`].
#[derive(Debug, Clone)]
pub struct NoteStatus {
    pub info: NoteInfo,
    pub state: FileState,
}

/// Progress of a long pick-up or write-back: (done, total).
pub type Progress = Box<dyn FnMut(usize, usize) + Send>;

/// A store folder that people edit as plain files.
pub struct Folder {
    dir: PathBuf,
    client: Client,
    bases: HashMap<DocId, Base>,
    progress: Option<Progress>,
}

impl Folder {
    /// Opens the store in `dir` (which must exist) and takes its `.md`
    /// files over from it.
    pub fn open(dir: &Path, server: ServerConfig) -> Result<Folder, FolderError> {
        if !dir.is_dir() {
            return Err(FolderError::NotAFolder(dir.to_owned()));
        }
        let dir = dir.canonicalize().map_err(io_err(dir))?;
        let client = Client::open(&dir, server)?;
        client
            .store()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_write_md(false);
        let bases = load_bases(&dir.join(BASE_DIR))?;
        let mut folder = Folder {
            dir,
            client,
            bases,
            progress: None,
        };
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
                .keys()
                .copied()
                .filter(|id| store.is_deleted(*id) && store.note(*id).is_err())
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
            return Err(FolderError::Io {
                path: self.dir.join(name),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a plain file name"),
            });
        }
        Ok(self.dir.join(name))
    }

    fn info(&self, id: DocId) -> Result<NoteInfo, FolderError> {
        self.client
            .list()
            .into_iter()
            .find(|n| n.id == id)
            .ok_or(FolderError::Store(StoreError::UnknownNote(id)))
    }

    fn set_base(&mut self, id: DocId, file: String, text: String) -> Result<(), FolderError> {
        let base = Base { file, text };
        if self.bases.get(&id) == Some(&base) {
            return Ok(());
        }
        let dir = self.dir.join(BASE_DIR);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join(format!("{id:032x}.base"));
        let mut bytes = Vec::with_capacity(base.file.len() + 1 + base.text.len());
        bytes.extend_from_slice(base.file.as_bytes());
        bytes.push(b'\n');
        bytes.extend_from_slice(base.text.as_bytes());
        write_atomic(&path, &bytes).map_err(io_err(&path))?;
        self.bases.insert(id, base);
        Ok(())
    }

    /// The `.md` files in the folder that could be notes, by name.
    fn note_files(&self) -> Result<Vec<String>, FolderError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
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
        let in_scope = |name: &str| only.is_none_or(|s| s.contains(name));
        let notes = self.client.list();
        let mut report = PickUp::default();
        let mut claimed: HashSet<String> = HashSet::new();
        let mut missing: Vec<DocId> = Vec::new();
        let total = notes.len();
        for (k, info) in notes.iter().enumerate() {
            let cur = file_name(&info.file);
            let held = self.bases.get(&info.id).map(|b| b.file.clone());
            claimed.insert(cur.clone());
            claimed.extend(held.clone());
            if !in_scope(&cur) && !held.as_deref().is_some_and(in_scope) {
                continue;
            }
            let target = Target::new(&self.client, info.id, sessions);
            match self.pick_up_note(info, &target)? {
                Found::Unchanged => {}
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
            let text = match read_file(&path)? {
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
                self.bases.get(id).is_some_and(|b| b.text == text)
                    || self.client.text(*id).is_ok_and(|t| t == text)
            });
            let id = if let Some(i) = renamed_from {
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
                let id = self.client.create(stem)?;
                // The store avoids names of existing files; this file is the
                // note's own, so take its name back (when it is a safe one).
                if file_name(&self.info(id)?.file) != name && crate::store::safe_stem(stem) == stem
                {
                    self.client.rename(id, stem)?;
                }
                if !text.is_empty() {
                    self.client.insert(id, 0, &text)?;
                }
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
                    report.skipped.push((
                        name.clone(),
                        format!("its note's file {file} is taken; it was left as it is"),
                    ));
                    continue;
                }
            }
            self.set_base(id, file, text)?;
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
            self.drop_base(id)?;
            report.deleted.push((id, file));
        }
        Ok(report)
    }

    fn drop_base(&mut self, id: DocId) -> Result<(), FolderError> {
        self.bases.remove(&id);
        let path = self.dir.join(BASE_DIR).join(format!("{id:032x}.base"));
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
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
        Ok(out)
    }

    fn remove_deleted_file(
        &mut self,
        id: DocId,
        name: String,
        kept: Option<PathBuf>,
    ) -> Result<FileDeletion, FolderError> {
        let base = self.bases.get(&id).cloned();
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
            match read_file(&path)? {
                Read::Missing => {}
                Read::Unusable(why) => done.left = Some(why),
                Read::Text(t, stamp) if t == base.text => {
                    // Unless it changed in the last instant.
                    if Stamp::of(&path).map_err(io_err(&path))?.as_ref() == Some(&stamp) {
                        fs::remove_file(&path).map_err(io_err(&path))?;
                        sync_dir(&self.dir).map_err(io_err(&self.dir))?;
                        done.removed = true;
                    } else {
                        done.left = Some("it changed while being removed".into());
                    }
                }
                Read::Text(..) => {
                    let trash = self.dir.join(TRASH_DIR);
                    fs::create_dir_all(&trash).map_err(io_err(&trash))?;
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
        self.drop_base(id)?;
        Ok(done)
    }

    fn pick_up_note(&mut self, info: &NoteInfo, target: &Target<'_>) -> Result<Found, FolderError> {
        let cur = file_name(&info.file);
        let base = self.bases.get(&info.id).cloned();
        // The file that holds the note: the one last read or written (the
        // store may have renamed the note since; the file follows at the
        // write-back).
        let held = base.as_ref().map_or(cur.clone(), |b| b.file.clone());
        let path = self.path(&held)?;
        let text = match read_file(&path)? {
            Read::Text(t, _) => t,
            Read::Unusable(why) => return Ok(Found::Unusable(held, why)),
            // Never written, or already moved to the new name: not a
            // deletion.
            Read::Missing if base.is_none() || (held != cur && info.file.exists()) => {
                return Ok(Found::Unchanged);
            }
            Read::Missing => return Ok(Found::Missing(held)),
        };
        let store = self.client.text(info.id)?;
        let base_text = base.as_ref().map_or(&store, |b| &b.text);
        if text == *base_text {
            if base.is_none() {
                self.set_base(info.id, held, text)?;
            }
            return Ok(Found::Unchanged);
        }
        let edited = text != store;
        if edited {
            target.apply(&merge(base_text, &text, &store))?;
        }
        // Only once the edits are durable: a crash before this picks them
        // up again (and `text == store` keeps that from doubling them).
        self.set_base(info.id, held, text)?;
        Ok(if edited {
            Found::Edited
        } else {
            Found::Unchanged
        })
    }

    /// Writes the store's text into the notes' files (`only` these notes,
    /// or all), creating missing files and following renames. A file a
    /// person changed since it was read is picked up first, never
    /// overwritten.
    pub fn write_back(
        &mut self,
        only: Option<&HashSet<DocId>>,
        sessions: &HashMap<DocId, Session>,
    ) -> Result<WriteBack, FolderError> {
        let mut report = WriteBack::default();
        let notes: Vec<NoteInfo> = self
            .client
            .list()
            .into_iter()
            .filter(|n| only.is_none_or(|o| o.contains(&n.id)))
            .collect();
        let total = notes.len();
        for (k, info) in notes.iter().enumerate() {
            let target = Target::new(&self.client, info.id, sessions);
            self.write_back_note(info.id, &target, &mut report)?;
            if only.is_none() && k % 64 == 63 {
                self.report_progress(k + 1, total);
            }
        }
        Ok(report)
    }

    fn write_back_note(
        &mut self,
        id: DocId,
        target: &Target<'_>,
        report: &mut WriteBack,
    ) -> Result<(), FolderError> {
        for _ in 0..WRITE_TRIES {
            let info = self.info(id)?;
            let cur = file_name(&info.file);
            let store = self.client.text(id)?;
            let base = self.bases.get(&id).cloned();
            let held = base.as_ref().map_or(cur.clone(), |b| b.file.clone());
            let held_path = self.path(&held)?;
            if base
                .as_ref()
                .is_some_and(|b| b.file == cur && b.text == store)
                && held_path.exists()
            {
                return Ok(());
            }
            let found = read_file(&held_path)?;
            match &found {
                Read::Unusable(why) => {
                    report.skipped.push((held, why.clone()));
                    return Ok(());
                }
                // Changed since we read it: pick that up first.
                Read::Text(t, _) if *t != store && base.as_ref().is_none_or(|b| b.text != *t) => {
                    self.pick_up_note(&info, target)?;
                    continue;
                }
                _ => {}
            }
            if held == cur {
                let wrote = match &found {
                    Read::Text(t, _) if *t == store => Wrote::Done,
                    Read::Text(_, stamp) => replace_if_unchanged(&held_path, &store, stamp)?,
                    _ => create_new(&held_path, &store)?,
                };
                if wrote == Wrote::Changed {
                    continue;
                }
                if !matches!(&found, Read::Text(t, _) if *t == store) {
                    report.written.push(cur.clone());
                }
            } else {
                // The note was renamed: write its new file, then drop the
                // old one.
                let cur_path = self.path(&cur)?;
                match read_file(&cur_path)? {
                    Read::Text(t, _) if t == store => {}
                    Read::Missing => {
                        if create_new(&cur_path, &store)? == Wrote::Changed {
                            continue;
                        }
                        report.written.push(cur.clone());
                    }
                    _ => {
                        let aside = self.free_name(&cur)?;
                        if move_new(&cur_path, &self.path(&aside)?)? == Wrote::Changed {
                            continue;
                        }
                        report.moved_aside.push((cur.clone(), aside));
                        if create_new(&cur_path, &store)? == Wrote::Changed {
                            continue;
                        }
                        report.written.push(cur.clone());
                    }
                }
                if let Read::Text(_, stamp) = &found {
                    // Unless it changed in the last instant: then it stays,
                    // and becomes a note of its own.
                    if Stamp::of(&held_path).map_err(io_err(&held_path))?.as_ref() == Some(stamp) {
                        fs::remove_file(&held_path).map_err(io_err(&held_path))?;
                    }
                }
            }
            return self.set_base(id, cur, store);
        }
        report.skipped.push((
            file_name(&self.info(id)?.file),
            "it kept changing while being written; it is picked up next time".into(),
        ));
        Ok(())
    }

    /// A free `<stem> (conflict N).md` beside `name`.
    fn free_name(&self, name: &str) -> Result<String, FolderError> {
        let stem = name.strip_suffix(".md").unwrap_or(name);
        let taken: HashSet<String> = self
            .client
            .list()
            .iter()
            .map(|n| file_name(&n.file))
            .collect();
        (1..)
            .map(|k| format!("{stem} (conflict {k}).md"))
            .find(|n| !taken.contains(n) && !self.dir.join(n).exists())
            .ok_or_else(|| io_err(&self.dir)(io::Error::other("no free name")))
    }

    /// How each note's file compares with the store, and the `.md` files
    /// that are not notes yet.
    pub fn status(&self) -> Result<(Vec<NoteStatus>, Vec<String>), FolderError> {
        let mut claimed = HashSet::new();
        let mut notes = Vec::new();
        for info in self.client.list() {
            let cur = file_name(&info.file);
            let base = self.bases.get(&info.id);
            let held = base.map_or(cur.clone(), |b| b.file.clone());
            claimed.insert(cur.clone());
            claimed.insert(held.clone());
            let store = self.client.text(info.id)?;
            let state = match read_file(&self.path(&held)?)? {
                Read::Missing if base.is_some() && !(held != cur && info.file.exists()) => {
                    FileState::Missing
                }
                Read::Missing => FileState::Behind,
                Read::Unusable(why) => FileState::Unusable(why),
                Read::Text(t, _) if t == store && held == cur => FileState::InStep,
                Read::Text(t, _) if base.is_some_and(|b| b.text == t) || t == store => {
                    FileState::Behind
                }
                Read::Text(..) => FileState::Edited,
            };
            notes.push(NoteStatus { info, state });
        }
        let new = self
            .note_files()?
            .into_iter()
            .filter(|n| !claimed.contains(n))
            .collect();
        Ok((notes, new))
    }
}

enum Found {
    Unchanged,
    Edited,
    Missing(String),
    Unusable(String, String),
}

fn load_bases(dir: &Path) -> Result<HashMap<DocId, Base>, FolderError> {
    let mut out = HashMap::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".base"))
            .filter(|h| h.len() == 32)
            .and_then(|h| u128::from_str_radix(h, 16).ok())
        else {
            continue;
        };
        let path = entry.path();
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        let Ok(s) = String::from_utf8(bytes) else {
            continue;
        };
        // A base that does not parse is dropped: the file is then compared
        // with the store's text instead.
        if let Some((file, text)) = s.split_once('\n')
            && is_note_file(file)
        {
            out.insert(
                id,
                Base {
                    file: file.to_owned(),
                    text: text.to_owned(),
                },
            );
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Live sessions for notes that keep changing

/// When to open and close live sessions in `notesync watch`: a note whose
/// file changes twice within `window` gets a session (its edits then go
/// out as they are picked up); a session with no change either way for
/// `quiet` is closed.
#[derive(Debug)]
pub struct Liveness {
    pub window: Duration,
    pub quiet: Duration,
    last_change: HashMap<DocId, Instant>,
    last_activity: HashMap<DocId, Instant>,
}

impl Liveness {
    pub fn new(window: Duration, quiet: Duration) -> Self {
        Liveness {
            window,
            quiet,
            last_change: HashMap::new(),
            last_activity: HashMap::new(),
        }
    }

    /// A note's file changed at `now`; true when a session should open
    /// (it changed before, within the window).
    pub fn file_changed(&mut self, id: DocId, now: Instant) -> bool {
        self.last_activity.insert(id, now);
        let prev = self.last_change.insert(id, now);
        prev.is_some_and(|p| now.saturating_duration_since(p) <= self.window)
    }

    /// Something happened on a note's session (a remote edit).
    pub fn touched(&mut self, id: DocId, now: Instant) {
        self.last_activity.insert(id, now);
    }

    /// Of `open`, the notes quiet for `quiet` at `now`.
    pub fn quiet_ones(&self, open: impl IntoIterator<Item = DocId>, now: Instant) -> Vec<DocId> {
        open.into_iter()
            .filter(|id| {
                self.last_activity
                    .get(id)
                    .is_none_or(|t| now.saturating_duration_since(*t) >= self.quiet)
            })
            .collect()
    }

    /// Forgets a closed session's note.
    pub fn closed(&mut self, id: DocId) {
        self.last_activity.remove(&id);
        self.last_change.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_small_edit_in_a_big_file_is_a_small_diff() {
        let old: String = (0..5000)
            .map(|i| format!("line {i}: some text\n"))
            .collect();
        let new = old.replacen("line 2500: some text", "line 2500: some more text", 1);
        let hunks = diff(&old, &new);
        assert_eq!(hunks.len(), 1, "{hunks:?}");
        assert_eq!(hunks[0].old.len(), 0);
        assert_eq!(hunks[0].new.len(), 5);
        let edits = merge(&old, &new, &old);
        assert_eq!(edits.len(), 1, "{edits:?}");
        assert_eq!(apply_to(&old, &edits), new);
    }

    #[test]
    fn char_indices_not_bytes() {
        let (old, new) = ("héllo wörld ✓", "héllo, wörld ✓✓");
        assert_eq!(apply_to(old, &merge(old, new, old)), new);
    }

    #[test]
    fn edits_merge_with_the_stores_changes() {
        let base = "alpha beta gamma\ndelta\n";
        let file = "alpha BETA gamma\ndelta epsilon\n"; // the person
        let store = "zero alpha beta gamma\ndelta\nomega\n"; // remote
        let out = apply_to(store, &merge(base, file, store));
        assert_eq!(out, "zero alpha BETA gamma\ndelta epsilon\nomega\n");
        // Deleting text the store also deleted, around text it added.
        let base = "one two three";
        let file = "one three";
        let store = "one t[x]wo three";
        let out = apply_to(store, &merge(base, file, store));
        assert!(out.contains("[x]"), "{out:?}");
        assert_eq!(out.replace("[x]", ""), "one three");
    }

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

    #[test]
    fn liveness_opens_on_the_second_change_and_closes_when_quiet() {
        let mut l = Liveness::new(Duration::from_secs(10), Duration::from_secs(30));
        let t0 = Instant::now();
        assert!(!l.file_changed(1, t0));
        assert!(!l.file_changed(2, t0));
        assert!(l.file_changed(1, t0 + Duration::from_secs(3)));
        assert!(!l.file_changed(2, t0 + Duration::from_secs(20)));
        l.touched(1, t0 + Duration::from_secs(25));
        assert_eq!(
            l.quiet_ones([1], t0 + Duration::from_secs(50)),
            Vec::<u128>::new()
        );
        assert_eq!(l.quiet_ones([1], t0 + Duration::from_secs(56)), vec![1]);
    }

    fn offline(dir: &Path) -> Folder {
        Folder::open(dir, ServerConfig::new("127.0.0.1:1")).unwrap()
    }

    fn only_note(f: &Folder) -> NoteInfo {
        let notes = f.client().list();
        assert_eq!(notes.len(), 1, "{notes:?}");
        notes.into_iter().next().unwrap()
    }

    #[test]
    fn a_file_edited_before_the_write_back_is_merged_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let none = HashMap::new();
        fs::write(dir.path().join("a.md"), "hello\n").unwrap();
        let mut f = offline(dir.path());
        let p = f.pick_up(None, &none).unwrap();
        assert_eq!(p.created.len(), 1);
        let id = only_note(&f).id;
        assert_eq!(f.client().text(id).unwrap(), "hello\n");
        assert_eq!(file_name(&only_note(&f).file), "a.md");
        // A change from elsewhere reaches the store; meanwhile the person
        // edits the file.
        f.client().insert(id, 0, "REMOTE ").unwrap();
        fs::write(dir.path().join("a.md"), "hello world\n").unwrap();
        let w = f.write_back(None, &none).unwrap();
        assert_eq!(w.written, vec!["a.md".to_owned()]);
        let want = "REMOTE hello world\n";
        assert_eq!(fs::read_to_string(dir.path().join("a.md")).unwrap(), want);
        assert_eq!(f.client().text(id).unwrap(), want);
        // The base survives a restart: nothing is picked up twice.
        drop(f);
        let mut f = offline(dir.path());
        let p = f.pick_up(None, &none).unwrap();
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(f.client().text(id).unwrap(), want);
        assert_eq!(f.status().unwrap().0[0].state, FileState::InStep);
    }

    #[test]
    fn renamed_and_deleted_files() {
        let dir = tempfile::tempdir().unwrap();
        let none = HashMap::new();
        fs::write(dir.path().join("a.md"), "text of a").unwrap();
        let mut f = offline(dir.path());
        f.pick_up(None, &none).unwrap();
        let id = only_note(&f).id;
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

    #[test]
    fn a_store_rename_moves_the_file_after_picking_up_its_edits() {
        let dir = tempfile::tempdir().unwrap();
        let none = HashMap::new();
        fs::write(dir.path().join("old.md"), "one").unwrap();
        let mut f = offline(dir.path());
        f.pick_up(None, &none).unwrap();
        let id = only_note(&f).id;
        // A rename arrives (here: through the API); the person edits the
        // old file before the write-back.
        f.client().rename(id, "../../new").unwrap();
        fs::write(dir.path().join("old.md"), "one two").unwrap();
        f.write_back(None, &none).unwrap();
        let file = only_note(&f).file;
        assert_eq!(file.parent().unwrap(), f.dir());
        assert_eq!(file_name(&file), "_.._new.md");
        assert_eq!(fs::read_to_string(&file).unwrap(), "one two");
        assert!(!dir.path().join("old.md").exists());
    }

    fn text() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop_oneof!["a", "b", "\n", "é", "xy"], 0..40)
            .prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn the_diff_turns_old_into_new(old in text(), new in text()) {
            prop_assert_eq!(apply_to(&old, &merge(&old, &new, &old)), new);
        }

        #[test]
        fn merged_edits_keep_what_both_sides_added(
            base in text(), a in "[PQZ]{0,6}", b in "[PQZ]{0,6}", pa in 0usize..50, pb in 0usize..50
        ) {
            // Both sides insert one marked piece into the base.
            let at = |p: usize| base.char_indices().map(|(i, _)| i).chain([base.len()]).nth(p % (base.chars().count() + 1)).unwrap();
            let (ia, ib) = (at(pa), at(pb));
            let file = format!("{}[A{a}]{}", &base[..ia], &base[ia..]);
            let store = format!("{}[B{b}]{}", &base[..ib], &base[ib..]);
            let out = apply_to(&store, &merge(&base, &file, &store));
            let a_mark = format!("[A{a}]");
            let b_mark = format!("[B{b}]");
            prop_assert!(out.contains(&a_mark), "{:?}", out);
            prop_assert!(out.contains(&b_mark), "{:?}", out);
            prop_assert_eq!(out.chars().count(), store.chars().count() + a.chars().count() + 3);
        }
    }
}
