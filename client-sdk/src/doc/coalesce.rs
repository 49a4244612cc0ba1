//! Coalescing: the never-sent atoms of a document re-made as one run
//! (consecutive one-char atoms at consecutive idents of one prefix,
//! PROTOCOL.md 1.4) before an upsert, or re-made with a real site when a
//! provisional note gets one.
//!
//! Why runs and not 255-byte atoms: a run is what the version-3 rule makes
//! for forward typing, so an offline paragraph is one run whatever order it
//! was typed in, it costs one prefix and a count on the wire (frame 4), and
//! the text typed after it, online, extends the same run. A multi-char atom
//! would also be contiguous, but typing after it starts a new, deeper run
//! (its virtual ids leave no room for an extension).

use notesync_protocol::{Allocator, Atom, Pid};

use super::entries::Kind;
use super::{Doc, EditError, parent};

impl Doc {
    /// Replaces stretches of adjacent atoms whose ids satisfy `unsent`
    /// (never left the device) by one run of one-char atoms each, with
    /// fresh ids in the gap of the stretch's first atom. A stretch is a run
    /// of entries that are all such atoms or their chars (deleted chars
    /// included: rewriting drops them, and the deletes the log holds for
    /// them) or tombstones of other ids (which stay where they are). Returns (old
    /// ids removed, new atoms), for the op log to swap. A stretch is
    /// rewritten unless it already is one run of live one-char atoms;
    /// `force` rewrites every stretch (to re-make provisional ids with a
    /// real site).
    pub fn coalesce(
        &mut self,
        alloc: &mut Allocator,
        unsent: impl Fn(&Pid) -> bool,
        force: bool,
    ) -> Result<(Vec<Pid>, Vec<Atom>), EditError> {
        // A run: a stretch of entries that are all never-sent atoms or
        // chars of them, collected in position order.
        // Ids are borrowed while scanning: most stretches are left as they
        // are (an import's text is one run already), so only a rewritten
        // one pays for copies.
        #[derive(Default)]
        struct Run<'a> {
            atoms: Vec<&'a Pid>,
            text: String,
            /// Chars per multi-char atom seen in the run (to check that a
            /// rewritten atom takes all of its chars with it).
            chars_seen: std::collections::HashMap<&'a Pid, usize>,
            dead_chars: bool,
            /// Every atom so far is a live one-char atom at the id after
            /// the previous one's.
            one_run: bool,
            last: Option<&'a Pid>,
        }
        let mut runs: Vec<(Vec<Pid>, String)> = Vec::new();
        let mut cur = Run::default();
        let close = |cur: &mut Run, runs: &mut Vec<(Vec<Pid>, String)>, doc: &Doc| {
            let run = std::mem::take(cur);
            if run.atoms.is_empty() {
                return;
            }
            // Every multi-char atom of the run must have all its chars here:
            // otherwise rewriting it would move chars across other entries.
            let whole = run.chars_seen.iter().all(|(p, &seen)| {
                doc.find(p)
                    .is_ok_and(|l| doc.entry(l).data.chars().count() == seen)
            });
            if whole && (force || run.dead_chars || !run.one_run) {
                runs.push((run.atoms.into_iter().cloned().collect(), run.text));
            }
        };
        for e in self.entries() {
            match e.kind {
                // A deleted never-sent atom (the op log forgets them, so
                // only a doc used without one has them) is dropped.
                Kind::Atom if unsent(&e.pid) => {
                    cur.one_run = match &cur.last {
                        None => cur.atoms.is_empty(),
                        Some(p) => cur.one_run && e.pid.follows(p),
                    };
                    cur.last = Some(&e.pid);
                    cur.atoms.push(&e.pid);
                    if e.live {
                        cur.text.push_str(&e.data);
                    } else {
                        cur.dead_chars = true;
                    }
                }
                Kind::Header if unsent(&e.pid) => {
                    cur.one_run = false;
                    cur.atoms.push(&e.pid);
                    cur.chars_seen.insert(&e.pid, 0);
                }
                Kind::Virtual if cur.chars_seen.contains_key(&parent(&e.pid)) => {
                    *cur.chars_seen.get_mut(&parent(&e.pid)).expect("checked") += 1;
                    if e.live {
                        cur.text.push_str(&e.data);
                    } else {
                        cur.dead_chars = true;
                    }
                }
                // A tombstone of a sent or remote id shows nothing: the
                // stretch goes on across it (the text is re-made in the gap
                // of its first atom, which moves no visible char), so text
                // typed around a deleted char still leaves as one run.
                _ if !e.live && !cur.atoms.is_empty() => {}
                _ => close(&mut cur, &mut runs, self),
            }
        }
        close(&mut cur, &mut runs, self);
        let mut removed = Vec::new();
        let mut added = Vec::new();
        // One stretch that is every entry (a note made from a file, getting
        // its site): re-made whole, not forgotten id by id.
        if let [(run, _)] = runs.as_slice()
            && run.len() == self.entry_count()
        {
            let (run, text) = runs.pop().expect("one");
            self.clear();
            self.place_text(alloc, None, None, &text, &mut added)?;
            return Ok((run, added));
        }
        for (run, text) in runs {
            let first = self.find(&run[0]).expect("run ids exist");
            let left = self.pid_before(first).cloned();
            for pid in &run {
                self.forget(pid);
            }
            let right = self
                .pid_at(self.find(&run[0]).expect_err("removed"))
                .cloned();
            self.place_text(alloc, left, right.as_ref(), &text, &mut added)?;
            removed.extend(run);
        }
        Ok((removed, added))
    }
}

#[cfg(test)]
mod tests {
    use notesync_protocol::{Allocator, DocName};

    use crate::doc::Doc;

    #[test]
    fn a_document_that_is_all_unsent_is_remade_whole_as_one_run_of_the_new_site() {
        let mut a = Doc::new(1, DocName::default());
        let mut provisional = Allocator::new(255, 1, 1).unwrap();
        a.insert(&mut provisional, 0, "hello").unwrap();
        a.insert(&mut provisional, 0, "> ").unwrap();
        let mut old: Vec<_> = (0..7).map(|i| a.char_id(i).unwrap()).collect();
        let mut real = Allocator::new(3, 1, 1).unwrap();
        let (mut removed, added) = a.coalesce(&mut real, |_| true, true).unwrap();
        old.sort();
        removed.sort();
        assert_eq!(removed, old);
        assert_eq!((a.text().as_str(), a.atom_count()), ("> hello", 7));
        for (i, atom) in added.iter().enumerate() {
            assert_eq!(a.char_id(i).as_ref(), Some(atom.pid()));
            assert_eq!(atom.pid().creator(), 3);
        }
        for w in added.windows(2) {
            assert_eq!(w[0].pid().offset(1).as_ref(), Some(w[1].pid()), "{added:?}");
        }
        // The document goes on as usual after it.
        a.insert(&mut real, 7, "!").unwrap();
        a.delete(&mut real, 0..2).unwrap();
        assert_eq!(a.text(), "hello!");
    }

    #[test]
    fn coalesce_remakes_unsent_text_as_one_run_and_parts_round_trip() {
        let mut a = Doc::new(1, DocName::default());
        let mut al = Allocator::new(1, 1, 1).unwrap();
        // Typed forwards: already one run, nothing to rewrite.
        for (i, ch) in "abc".chars().enumerate() {
            a.insert(&mut al, i, &ch.to_string()).unwrap();
        }
        assert_eq!(a.coalesce(&mut al, |_| true, false).unwrap().0.len(), 0);
        // Typed out of order (backwards, then in the middle): rewritten.
        a.insert(&mut al, 3, "f").unwrap();
        a.insert(&mut al, 3, "d").unwrap();
        a.insert(&mut al, 4, "e").unwrap();
        assert_eq!(a.atom_count(), 6);
        let (removed, added) = a.coalesce(&mut al, |_| true, false).unwrap();
        assert_eq!((removed.len(), added.len()), (6, 6));
        assert_eq!(added.iter().map(|x| x.data()).collect::<String>(), "abcdef");
        for w in added.windows(2) {
            assert_eq!(w[0].pid().offset(1).as_ref(), Some(w[1].pid()), "{added:?}");
        }
        assert_eq!(a.text(), "abcdef");
        a.delete(&mut al, 2..3).unwrap();
        let (atoms, deleted) = a.to_parts();
        let b = Doc::from_parts(1, DocName::default(), atoms, deleted);
        assert_eq!(b.text(), "abdef");
    }
}
