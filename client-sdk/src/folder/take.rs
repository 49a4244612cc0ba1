//! Taking a person's edits of a file into its note, so that a crash at any
//! point neither loses them nor takes them twice.
//!
//! The edits (base → file, merged into the note's text) are many op-log
//! appends, one per insert or delete, and the new base is a file of its
//! own: no single write makes both durable. Were the base saved after the
//! edits with nothing between, a crash between the two would leave the old
//! base, and the next run would take the same edits again (a paragraph
//! twice); saved before them, a crash would lose the edits. So a take runs
//! in five steps, with the store locked throughout (nothing else, not even
//! a live session's remote edits, changes the note meanwhile):
//!
//! 1. the note is saved, so that its durable text is `before`, the text
//!    the edits are merged into (a live session's remote edits may be in
//!    memory only: a crash would drop them, and the log would replay onto
//!    a text without them);
//! 2. `.take` records the file's text and `want`, the note's text with
//!    the edits (written atomically);
//! 3. the edits are appended to the op log;
//! 4. the new base (the file's text) is saved;
//! 5. `.take` is removed, durably.
//!
//! After a crash the next open finds the `.take` of 2-5 and finishes it
//! ([`Folder::finish_takes`]): by 1 and the lock, the note's text is then
//! `before` with some first part of the edits of 3 (any part: a torn
//! append keeps a prefix of its records), so the diff from that text to
//! `want` is exactly what was not taken yet. Once the base is the file's
//! text (4) the take is over whatever the note says: a `.take` found
//! beside such a base (a crash in 5) is only removed. Never the other way
//! round: the old base differs from the file's text, or nothing would be
//! taken. Finishing is itself a take from the note's text to `want`, so a
//! crash while finishing is finished the same way. (Edits that merge into
//! nothing, text the note had deleted already, need no steps but 4.)
//!
//! May touch: the note (through the store, or its live session), the
//! bases.

use std::collections::HashMap;
use std::sync::PoisonError;

use notesync_protocol::DocId;

use super::bases::Take;
use super::{Folder, FolderError};
use crate::client::{Client, Session};
use crate::merge::{Edit, apply_to, merge};
use crate::store::{Store, StoreError};

/// Where the edits of one note go: its live session, or the store.
#[derive(Clone)]
pub(super) enum Target<'a> {
    Client(Client, DocId),
    Session(&'a Session),
}

impl<'a> Target<'a> {
    pub fn new(client: &Client, id: DocId, sessions: &'a HashMap<DocId, Session>) -> Self {
        match sessions.get(&id) {
            Some(s) => Target::Session(s),
            None => Target::Client(client.clone(), id),
        }
    }

    pub fn rename(&self, name: &str) -> Result<(), StoreError> {
        match self {
            Target::Client(c, id) => c.rename(*id, name),
            Target::Session(s) => s.rename(name),
        }
    }

    /// Runs `f` with the store locked; it gets whether ops it records are
    /// sent at once (a connected live session; which is then woken).
    fn locked<R>(&self, f: impl FnOnce(&mut Store, bool) -> R) -> R {
        match self {
            Target::Client(c, _) => f(
                &mut c.store().lock().unwrap_or_else(PoisonError::into_inner),
                false,
            ),
            Target::Session(s) => s.with_store(f),
        }
    }

    fn id(&self) -> DocId {
        match self {
            Target::Client(_, id) => *id,
            Target::Session(s) => s.doc(),
        }
    }
}

/// Applies edits from [`merge`] to a note, each durable on return.
fn apply(store: &mut Store, id: DocId, edits: &[Edit], sent: bool) -> Result<(), StoreError> {
    for e in edits {
        match e {
            Edit::Insert { at, text } => store.insert(id, *at, text, sent)?,
            Edit::Delete(r) => store.delete(id, r.clone(), sent)?,
        };
    }
    Ok(())
}

impl Folder {
    /// Takes the edits of the file `file` (`base` → `text`) into its note
    /// (steps 1-5 above) and makes `text` the file's base.
    pub(super) fn take_edits(
        &mut self,
        target: &Target<'_>,
        file: &str,
        base: &str,
        text: &str,
    ) -> Result<(), FolderError> {
        let id = target.id();
        let bases = &mut self.bases;
        target.locked(|store, sent| {
            let before = store.text(id)?;
            let edits = merge(base, text, &before);
            if edits.is_empty() {
                bases.set(id, file, text);
                return Ok(());
            }
            store.save_note(id)?;
            let take = Take {
                id,
                file: file.to_owned(),
                text: text.to_owned(),
                want: apply_to(&before, &edits),
            };
            bases.begin_take(&take)?;
            apply(store, id, &edits, sent)?;
            bases.set(id, file, text);
            store.sync_logs(&bases.unsynced())?;
            Ok(bases.end_take(id)?)
        })
    }

    /// Finishes the takes a crash interrupted (see above). Run on open,
    /// before anything else changes the store.
    pub(super) fn finish_takes(&mut self, takes: Vec<Take>) -> Result<(), FolderError> {
        for take in takes {
            let over = self
                .bases
                .get(take.id)
                .is_some_and(|b| b.file == take.file && b.text == take.text);
            let mut store = self
                .client
                .store()
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !over && let Ok(now) = store.text(take.id) {
                apply(&mut store, take.id, &merge(&now, &take.want, &now), false)?;
                self.bases.set(take.id, &take.file, &take.text);
            }
            // Over, or its note is gone (nothing to take it into).
            store.sync_logs(&self.bases.unsynced())?;
            self.bases.end_take(take.id)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::fs;

    use super::super::tests::{offline, one_note};
    use super::*;

    /// A crash mid-take, after `taken` chars of its insert reached the op
    /// log (any cut: a torn append keeps a prefix), and maybe after the
    /// new base was saved too: the next open finishes it, once.
    #[test]
    fn a_take_cut_short_anywhere_is_finished_once_on_open() {
        let file = "hello, big world\n";
        let typed = ", big world";
        for base_saved in [false, true] {
            for taken in 0..=typed.len() {
                let (dir, mut f, id) = one_note("a.md", "hello\n");
                fs::write(dir.path().join("a.md"), file).unwrap();
                let take = Take {
                    id,
                    file: "a.md".into(),
                    text: file.into(),
                    want: file.into(),
                };
                f.bases.begin_take(&take).unwrap();
                f.client().insert(id, 5, &typed[..taken]).unwrap();
                if base_saved {
                    f.client().insert(id, 5 + taken, &typed[taken..]).unwrap();
                    f.bases.set(id, "a.md", file);
                    f.bases.sync(|_| true).unwrap();
                }
                drop(f);
                let mut f = offline(dir.path());
                assert_eq!(f.client().text(id).unwrap(), file, "{taken} taken");
                let p = f.pick_up(None, &HashMap::new()).unwrap();
                assert!(p.is_empty(), "{taken} taken: {p:?}");
                assert_eq!(f.client().text(id).unwrap(), file, "{taken} taken");
                let left = fs::read_dir(dir.path().join(".notesync/cli")).unwrap();
                let names: Vec<_> = left.map(|e| e.unwrap().file_name()).collect();
                assert_eq!(names, ["bases"]);
            }
        }
    }
}
