//! New files' text into their notes at the sync that gives the notes their
//! sites ([`Folder::sync_reporting`]).
//!
//! Why: text inserted into a note that has no site yet is made with
//! provisional ids, which the note's first sync re-makes with its site
//! (PROTOCOL.md 1.3): every char is logged, forgotten and logged again, and
//! the note is read back from its log in between. An import of thousands
//! of files spent a third of its time there. So [`Folder::pick_up_for_sync`]
//! makes a new file's note blank, and the sync asks for its text once the
//! server gave it its site, right before its upsert.
//!
//! Why it is crash-safe: until its text is in and durable, the note is
//! blank and its file still holds the text, with no base; a pick-up of a
//! note in that state takes the file's text into it (the merge of base ""
//! into the file), whether a crash came before the sync, during it, or
//! before the text's log append was synced by the upsert's MarkSent. The
//! base is set only once the text is in the note, and made durable only
//! after the note's log (`Folder::sync_bases`).
//!
//! May touch: the `.md` files (read only), the bases; the store only
//! through [`crate::Client`].

use std::collections::HashMap;

use notesync_protocol::DocId;

use super::{Folder, FolderError};
use crate::fsutil::{Read, read_text};
use crate::sync::{SyncError, SyncProgress, SyncReport};

impl Folder {
    /// Syncs every note once (as [`crate::Client::sync_now_reporting`]),
    /// giving the notes [`Folder::pick_up_for_sync`] left blank their
    /// files' text once they have their sites. Those the sync did not get
    /// to (offline, refused) get it after, with provisional ids, as a
    /// plain pick-up would have given it. The outer error is the folder's
    /// (the text could not go in), the inner one the sync's.
    pub async fn sync_reporting(
        &mut self,
        progress: impl FnMut(SyncProgress) + Send,
    ) -> Result<Result<SyncReport, SyncError>, FolderError> {
        let blank = std::mem::take(&mut self.blank);
        let mut filled: Vec<(DocId, String)> = Vec::new();
        let dir = &self.dir;
        let synced = self
            .client
            .sync_now_filling(progress, |id| {
                let file = blank.get(&id)?;
                match read_text(&dir.join(file)) {
                    Ok(Read::Text(t, _)) if !t.is_empty() => {
                        filled.push((id, t.clone()));
                        Some(t)
                    }
                    // Gone or unreadable: left to the steps below.
                    _ => None,
                }
            })
            .await;
        let mut rest = blank;
        for (id, text) in filled {
            let file = rest.remove(&id).expect("filled from this map");
            self.bases.set(id, &file, &text);
        }
        self.blank = rest;
        self.fill_blank_notes()?;
        Ok(synced)
    }

    /// Gives the notes still blank from [`Folder::pick_up_for_sync`] their
    /// files' text now; a note whose file is gone meanwhile goes too (its
    /// text was never taken).
    pub(super) fn fill_blank_notes(&mut self) -> Result<(), FolderError> {
        let blank: HashMap<DocId, String> = std::mem::take(&mut self.blank);
        for (id, file) in blank {
            if !self.client.is_blank(id)? {
                continue;
            }
            match read_text(&self.path(&file)?)? {
                Read::Text(t, _) => {
                    if !t.is_empty() {
                        self.client.insert(id, 0, &t)?;
                    }
                    self.bases.set(id, &file, &t);
                }
                Read::Missing => self.client.delete_note(id)?,
                // Left blank: the next pick-up reports the file.
                Read::Unusable(..) => {}
            }
        }
        self.sync_bases(false)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::super::tests::offline;
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn an_import_that_cannot_sync_still_takes_every_files_text() {
        let dir = tempfile::tempdir().unwrap();
        let files = [("a.md", "text of a\n"), ("empty.md", ""), ("CON.md", "con")];
        for (name, text) in files {
            fs::write(dir.path().join(name), text).unwrap();
        }
        let mut f = offline(dir.path());
        let p = f.pick_up_for_sync().unwrap();
        assert_eq!(p.created.len(), 3, "{p:?}");
        assert!(
            f.client()
                .list()
                .iter()
                .all(|n| f.client().is_blank(n.id).unwrap())
        );
        let synced = block_on(f.sync_reporting(|_| {})).unwrap();
        assert!(synced.is_err(), "no server there");
        let texts = |f: &Folder| {
            let mut v: Vec<(String, String)> = f
                .client()
                .list()
                .iter()
                .map(|n| (n.name.clone(), f.client().text(n.id).unwrap()))
                .collect();
            v.sort();
            v
        };
        let want = vec![
            ("CON".to_owned(), "con".to_owned()),
            ("a".to_owned(), "text of a\n".to_owned()),
            ("empty".to_owned(), String::new()),
        ];
        assert_eq!(texts(&f), want);
        assert_eq!(
            fs::read_to_string(dir.path().join("_CON.md")).unwrap(),
            "con"
        );
        // Their bases are set and durable: nothing to pick up, after a
        // restart too.
        drop(f);
        let mut f = offline(dir.path());
        let p = f.pick_up(None, &HashMap::new()).unwrap();
        assert!(p.created.is_empty() && p.edited.is_empty(), "{p:?}");
        assert_eq!(texts(&f), want);
    }

    #[test]
    fn a_file_gone_before_its_text_was_taken_takes_its_note_with_it() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.md"), "text of a").unwrap();
        fs::write(dir.path().join("b.md"), "text of b").unwrap();
        let mut f = offline(dir.path());
        f.pick_up_for_sync().unwrap();
        fs::remove_file(dir.path().join("a.md")).unwrap();
        block_on(f.sync_reporting(|_| {})).unwrap().unwrap_err();
        let notes = f.client().list();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert_eq!(f.client().text(notes[0].id).unwrap(), "text of b");
    }

    #[test]
    fn a_pick_up_after_one_for_sync_fills_its_blank_notes_first() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.md"), "text of a").unwrap();
        let mut f = offline(dir.path());
        f.pick_up_for_sync().unwrap();
        let p = f.pick_up(None, &HashMap::new()).unwrap();
        assert!(p.created.is_empty() && p.edited.is_empty(), "{p:?}");
        let id = f.client().list()[0].id;
        assert_eq!(f.client().text(id).unwrap(), "text of a");
    }
}
