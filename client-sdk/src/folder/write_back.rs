//! Writing the notes' texts into their files ([`Folder::write_back`]) and
//! comparing the two ([`Folder::status`]). A file a person changed since it
//! was read is picked up first, never overwritten: every write is guarded
//! by the stamp the file had when read.
//!
//! May touch: the `.md` files of the folder, the bases; the store only by
//! picking up a file's edits.

use std::collections::{HashMap, HashSet};
use std::io;

use notesync_protocol::DocId;

use super::take::Target;
use super::{FileState, Folder, FolderError, NoteStatus, WRITE_TRIES, WriteBack, file_name};
use crate::client::Session;
use crate::fsutil::{
    Read, Wrote, at, create_new, move_new, read_text, remove_if_unchanged, replace_if_unchanged,
};
use crate::store::NoteInfo;

impl Folder {
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
        self.sync_bases(true)?;
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
            let base = self.bases.get(id).cloned();
            let held = base.as_ref().map_or(cur.clone(), |b| b.file.clone());
            let held_path = self.path(&held)?;
            // In step (the usual case): a note not in memory is not read.
            if let Some(b) = &base
                && b.file == cur
                && self.client.text_is(id, &b.text)?
                && held_path.exists()
            {
                return Ok(());
            }
            let store = self.client.text(id)?;
            let found = read_text(&held_path)?;
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
                match read_text(&cur_path)? {
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
                    remove_if_unchanged(&held_path, stamp)?;
                }
            }
            self.bases.set(id, &cur, &store);
            return Ok(());
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
            .ok_or_else(|| at(&self.dir)(io::Error::other("no free name")).into())
    }

    /// How each note's file compares with the store, and the `.md` files
    /// that are not notes yet.
    pub fn status(&self) -> Result<(Vec<NoteStatus>, Vec<String>), FolderError> {
        let mut claimed = HashSet::new();
        let mut notes = Vec::new();
        for info in self.client.list() {
            let cur = file_name(&info.file);
            let base = self.bases.get(info.id);
            let held = base.map_or(cur.clone(), |b| b.file.clone());
            claimed.insert(cur.clone());
            claimed.insert(held.clone());
            let store = self.client.text(info.id)?;
            let state = match read_text(&self.path(&held)?)? {
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

#[cfg(test)]
mod tests {
    use std::fs;

    use super::super::tests::{offline, one_note, only_note};
    use super::*;

    #[test]
    fn a_file_edited_before_the_write_back_is_merged_not_overwritten() {
        let (dir, mut f, id) = one_note("a.md", "hello\n");
        let none = HashMap::new();
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
    fn a_store_rename_moves_the_file_after_picking_up_its_edits() {
        let (dir, mut f, id) = one_note("old.md", "one");
        let none = HashMap::new();
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
}
