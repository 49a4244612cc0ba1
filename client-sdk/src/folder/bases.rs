//! The folder's memory of each note's file: its *base*, the file name and
//! text the folder last read from or wrote to it, and the record of a take
//! in progress (see [`super::take`]).
//!
//! On disk, in `.notesync/cli/` inside the store's folder:
//!
//! ```text
//! <id>.base   file name, "\n", text
//! <id>.take   file name, "\n", byte length of the file's text, "\n",
//!             the file's text, then the note's text once the take is done
//! ```
//!
//! (`<id>`: the note's id, 32 hex digits.) Each is written atomically; a
//! `.take` exists only while a file's edits are being taken into its note.
//!
//! May touch: that folder only.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use notesync_protocol::DocId;

use super::is_note_file;
use crate::fsutil::{FileError, at, replace_file, sync_dir, write_atomic};

/// Where the bases live, inside the store's own folder.
const BASE_DIR: &str = ".notesync/cli";

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

/// Every note's base, in memory and on disk.
#[derive(Debug)]
pub(super) struct Bases {
    dir: PathBuf,
    bases: HashMap<DocId, Base>,
    /// [`Bases::set_first`] renamed base files into place and the folder
    /// was not synced since.
    unsynced: bool,
}

impl Bases {
    fn new(dir: PathBuf, bases: HashMap<DocId, Base>) -> Bases {
        Bases {
            dir,
            bases,
            unsynced: false,
        }
    }

    /// Loads the bases of the store in `store_dir`, and the takes that had
    /// begun and not ended.
    pub fn load(store_dir: &Path) -> Result<(Bases, Vec<Take>), FileError> {
        let dir = store_dir.join(BASE_DIR);
        let mut bases = HashMap::new();
        let mut takes = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok((Bases::new(dir, bases), takes));
            }
            Err(e) => return Err(at(&dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(at(&dir))?;
            let name = entry.file_name();
            let Some((id, kind)) = name.to_str().and_then(parse_name) else {
                continue;
            };
            let path = entry.path();
            let bytes = fs::read(&path).map_err(at(&path))?;
            let Ok(s) = String::from_utf8(bytes) else {
                continue;
            };
            // A base that does not parse is dropped: the file is then
            // compared with the store's text instead. (Both are written
            // atomically: only a person's meddling makes one not parse.)
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
        Ok((Bases::new(dir, bases), takes))
    }

    pub fn get(&self, id: DocId) -> Option<&Base> {
        self.bases.get(&id)
    }

    pub fn ids(&self) -> impl Iterator<Item = DocId> + '_ {
        self.bases.keys().copied()
    }

    fn path(&self, id: DocId, kind: &str) -> PathBuf {
        self.dir.join(format!("{id:032x}.{kind}"))
    }

    fn write(
        &mut self,
        id: DocId,
        kind: &str,
        parts: &[&str],
        replace: fn(&Path, &[u8]) -> io::Result<()>,
    ) -> Result<(), FileError> {
        fs::create_dir_all(&self.dir).map_err(at(&self.dir))?;
        let path = self.path(id, kind);
        replace(&path, parts.concat().as_bytes()).map_err(at(&path))
    }

    pub fn set(&mut self, id: DocId, file: &str, text: &str) -> Result<(), FileError> {
        self.put(id, file, text, write_atomic)?;
        // The folder's fsync covered the batch's renames too.
        self.unsynced = false;
        Ok(())
    }

    /// [`Bases::set`] for a note that has no base yet, durable only at
    /// the next [`Bases::sync`] (one folder fsync for a batch): lost in a
    /// crash, the note has no base again, and its file is then compared
    /// with the note's own text, which is what this base holds.
    pub fn set_first(&mut self, id: DocId, file: &str, text: &str) -> Result<(), FileError> {
        debug_assert!(!self.bases.contains_key(&id), "a base is replaced durably");
        self.put(id, file, text, replace_file)?;
        self.unsynced = true;
        Ok(())
    }

    fn put(
        &mut self,
        id: DocId,
        file: &str,
        text: &str,
        replace: fn(&Path, &[u8]) -> io::Result<()>,
    ) -> Result<(), FileError> {
        if self
            .bases
            .get(&id)
            .is_some_and(|b| b.file == file && b.text == text)
        {
            return Ok(());
        }
        self.write(id, "base", &[file, "\n", text], replace)?;
        let (file, text) = (file.to_owned(), text.to_owned());
        self.bases.insert(id, Base { file, text });
        Ok(())
    }

    /// Makes the bases [`Bases::set_first`] wrote durable.
    pub fn sync(&mut self) -> Result<(), FileError> {
        if self.unsynced {
            sync_dir(&self.dir).map_err(at(&self.dir))?;
            self.unsynced = false;
        }
        Ok(())
    }

    pub fn drop(&mut self, id: DocId) -> Result<(), FileError> {
        self.bases.remove(&id);
        remove_if_there(&self.path(id, "base"))
    }

    /// Durably records that the file `file`, holding `text`, is being taken
    /// into its note, whose text is then `want`.
    pub fn begin_take(&mut self, take: &Take) -> Result<(), FileError> {
        let len = take.text.len().to_string();
        let parts = [&take.file, "\n", &len, "\n", &take.text, &take.want];
        self.write(take.id, "take", &parts, write_atomic)?;
        self.unsynced = false;
        Ok(())
    }

    /// Durably forgets a take (done, or nothing left to do).
    pub fn end_take(&mut self, id: DocId) -> Result<(), FileError> {
        remove_if_there(&self.path(id, "take"))?;
        sync_dir(&self.dir).map_err(at(&self.dir))?;
        self.unsynced = false;
        Ok(())
    }
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
