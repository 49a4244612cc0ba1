//! Crash-safe file writes, and the guarded reads and writes of files that
//! people edit at the same time (the `.md` files of [`crate::folder`]).
//!
//! Every write here goes to a temp file beside its target (`.<name>.tmp`,
//! a dotfile, so never taken for a note), is fsynced, and only then takes
//! the target's name; the folder is fsynced after, so the new name is
//! durable. Each such durable step is also a [`crash_point`].
//!
//! May touch: the files and folders it is given, nothing else.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// An I/O error, with the file it was about.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct FileError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// For `map_err`: an I/O error about `path`.
pub fn at(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError {
        path: path.to_owned(),
        source,
    }
}

/// Appends `payload` framed for an append-only file: `u32 len (BE) |
/// payload | u32 crc32 (BE) of payload` (the op logs and the bases
/// journal), so that a torn or corrupt last append is recognised by
/// [`next_frame`] and dropped, never misread.
pub(crate) fn put_frame(out: &mut impl bytes::BufMut, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("a framed record is under 4 GiB");
    out.put_u32(len);
    out.put_slice(payload);
    out.put_u32(crc32fast::hash(payload));
}

/// The payload of the frame at `at` and where the next one begins; `None`
/// at the end, or where a frame is cut short or fails its checksum.
pub(crate) fn next_frame(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let len = u32::from_be_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?) as usize;
    let end = at.checked_add(4)?.checked_add(len)?;
    let payload = bytes.get(at + 4..end)?;
    let crc = u32::from_be_bytes(bytes.get(end..end.checked_add(4)?)?.try_into().ok()?);
    (crc32fast::hash(payload) == crc).then_some((payload, end + 4))
}

/// Attempts at reading one file that keeps changing under us.
const READ_TRIES: usize = 5;

/// Writes `bytes` to `path` so that after a crash the file holds either its
/// old contents or the new ones, never a mix: write a temp file beside it,
/// fsync it, rename it over, fsync the folder (so the rename is durable).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_file(path, bytes)?;
    sync_dir(parent(path))
}

/// [`write_atomic`] without the folder's fsync: after a crash the file
/// holds its old contents or the new ones, never a mix, but the new ones
/// are durable only once the caller has synced the folder
/// ([`sync_dir`]): one folder fsync for a batch of files.
pub fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if path.file_name().is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path has no file name",
        ));
    }
    let tmp = write_temp(path, bytes)?;
    fs::rename(&tmp, path)?;
    crash_point();
    Ok(())
}

/// Makes a folder's entries (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fsync_dir(dir)?;
    crash_point();
    Ok(())
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The folder a path is in (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `.<name>.tmp` beside `path`.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes and fsyncs the temp file for `path`; returns its path.
fn write_temp(path: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    let tmp = temp_path(path);
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(tmp)
}

/// A file's length and modification time: whether it changed since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
}

impl Stamp {
    /// The file's stamp; `None` if there is no file.
    pub(crate) fn of(path: &Path) -> Result<Option<Stamp>, FileError> {
        match fs::symlink_metadata(path) {
            Ok(m) => Ok(Some(Stamp {
                len: m.len(),
                modified: m.modified().ok(),
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(at(path)(e)),
        }
    }
}

/// What a file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Read {
    Missing,
    /// Not something we may treat as text (not UTF-8, not a regular file).
    Unusable(String),
    Text(String, Stamp),
}

/// Reads a text file with the stamp it had while read (re-read if it
/// changed during the read).
pub(crate) fn read_text(path: &Path) -> Result<Read, FileError> {
    for _ in 0..READ_TRIES {
        let before = match fs::symlink_metadata(path) {
            Ok(m) if !m.is_file() => return Ok(Read::Unusable("not a regular file".into())),
            Ok(_) => Stamp::of(path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Read::Missing),
            Err(e) => return Err(at(path)(e)),
        };
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Read::Missing),
            Err(e) => return Err(at(path)(e)),
        };
        let after = Stamp::of(path)?;
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

/// How a guarded write went.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wrote {
    Done,
    /// The file changed (or appeared) since it was read: not written.
    Changed,
}

/// Replaces `path` with `text` if the file still has the stamp it had when
/// it was read (checked just before the atomic rename).
pub(crate) fn replace_if_unchanged(
    path: &Path,
    text: &str,
    stamp: &Stamp,
) -> Result<Wrote, FileError> {
    let tmp = write_temp(path, text.as_bytes()).map_err(at(path))?;
    if Stamp::of(path)?.as_ref() != Some(stamp) {
        let _ = fs::remove_file(&tmp);
        return Ok(Wrote::Changed);
    }
    fs::rename(&tmp, path).map_err(at(path))?;
    sync_dir(parent(path)).map_err(at(path))?;
    Ok(Wrote::Done)
}

/// Removes `path` if the file still has the stamp it had when it was read.
pub(crate) fn remove_if_unchanged(path: &Path, stamp: &Stamp) -> Result<Wrote, FileError> {
    if Stamp::of(path)?.as_ref() != Some(stamp) {
        return Ok(Wrote::Changed);
    }
    fs::remove_file(path).map_err(at(path))?;
    Ok(Wrote::Done)
}

/// Creates `path` with `text`, atomically, unless something is there.
pub(crate) fn create_new(path: &Path, text: &str) -> Result<Wrote, FileError> {
    let tmp = write_temp(path, text.as_bytes()).map_err(at(path))?;
    let linked = fs::hard_link(&tmp, path);
    let result = match linked {
        Ok(()) => Ok(Wrote::Done),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Wrote::Changed),
        // No hard links on this file system: check, then rename.
        Err(_) if path.exists() => Ok(Wrote::Changed),
        Err(_) => fs::rename(&tmp, path)
            .map(|()| Wrote::Done)
            .map_err(at(path)),
    };
    let _ = fs::remove_file(&tmp);
    if result.as_ref().is_ok_and(|w| *w == Wrote::Done) {
        sync_dir(parent(path)).map_err(at(path))?;
    }
    result
}

/// Moves `from` to `to` unless `to` exists.
pub(crate) fn move_new(from: &Path, to: &Path) -> Result<Wrote, FileError> {
    match fs::hard_link(from, to) {
        Ok(()) => fs::remove_file(from).map_err(at(from))?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(Wrote::Changed),
        Err(_) if to.exists() => return Ok(Wrote::Changed),
        Err(_) => fs::rename(from, to).map_err(at(to))?,
    }
    sync_dir(parent(to)).map_err(at(to))?;
    Ok(Wrote::Done)
}

/// The environment variable that sets a crash point (see [`crash_point`]).
pub const CRASH_AT_VAR: &str = "NOTESYNC_CRASH_AT";

/// Counts a durable step (a write made durable here, or an append to an
/// op log). For crash tests: with
/// `NOTESYNC_CRASH_AT=k` in the environment the process stops dead right
/// after its k-th durable step, says so on stderr (`crash point k`) and
/// waits there to be killed (`SIGKILL`, by the test), so that every step of
/// a run can be the last one. Without the variable this only reads it once.
pub fn crash_point() {
    static AT: OnceLock<Option<u64>> = OnceLock::new();
    static STEPS: AtomicU64 = AtomicU64::new(0);
    let Some(k) = *AT.get_or_init(|| std::env::var(CRASH_AT_VAR).ok()?.parse().ok()) else {
        return;
    };
    if STEPS.fetch_add(1, Ordering::SeqCst) + 1 == k {
        eprintln!("crash point {k}");
        loop {
            std::thread::park();
        }
    }
}
