//! Coalescing: the never-sent atoms of a document rewritten as few large
//! ones before an upsert (the seed's rule: bytes sent proportional to the
//! new text), or re-made with a real site when a provisional note gets one.

use notesync_protocol::{Allocator, Atom, MAX_ATOM_BYTES, Pid};

use super::entries::Kind;
use super::{Doc, EditError, parent};

impl Doc {
    /// Replaces runs of adjacent atoms whose ids satisfy `unsent` (never
    /// left the device) by as few atoms as possible (up to 255 bytes each,
    /// never splitting a char), with fresh ids in the same gap. A run is a
    /// stretch of entries that are all such atoms or their chars (deleted
    /// chars included: rewriting drops them, and the deletes the log holds
    /// for them). Returns (old ids removed, new atoms), for the op log to
    /// swap. A run is rewritten when that makes fewer atoms or drops
    /// deleted chars; `force` rewrites every run (to re-make provisional
    /// ids with a real site).
    pub fn coalesce(
        &mut self,
        alloc: &mut Allocator,
        unsent: impl Fn(&Pid) -> bool,
        force: bool,
    ) -> Result<(Vec<Pid>, Vec<Atom>), EditError> {
        // A run: a stretch of entries that are all never-sent atoms or
        // chars of them, collected in position order.
        #[derive(Default)]
        struct Run {
            atoms: Vec<Pid>,
            text: String,
            /// Chars per multi-char atom seen in the run (to check that a
            /// rewritten atom takes all of its chars with it).
            chars_seen: std::collections::HashMap<Pid, usize>,
            dead_chars: bool,
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
            let fewer = run.atoms.len() > run.text.len().div_ceil(MAX_ATOM_BYTES);
            if whole && (force || run.dead_chars || fewer) {
                runs.push((run.atoms, run.text));
            }
        };
        for e in self.entries() {
            match e.kind {
                // A deleted never-sent atom (the op log forgets them, so
                // only a doc used without one has them) is dropped.
                Kind::Atom if unsent(&e.pid) => {
                    cur.atoms.push(e.pid.clone());
                    if e.live {
                        cur.text.push_str(&e.data);
                    } else {
                        cur.dead_chars = true;
                    }
                }
                Kind::Header if unsent(&e.pid) => {
                    cur.atoms.push(e.pid.clone());
                    cur.chars_seen.insert(e.pid.clone(), 0);
                }
                Kind::Virtual if cur.chars_seen.contains_key(&parent(&e.pid)) => {
                    *cur.chars_seen.get_mut(&parent(&e.pid)).expect("checked") += 1;
                    if e.live {
                        cur.text.push_str(&e.data);
                    } else {
                        cur.dead_chars = true;
                    }
                }
                _ => close(&mut cur, &mut runs, self),
            }
        }
        close(&mut cur, &mut runs, self);
        let mut removed = Vec::new();
        let mut added = Vec::new();
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
    fn coalesce_merges_unsent_runs_and_parts_round_trip() {
        let mut a = Doc::new(1, DocName::default());
        let mut al = Allocator::new(1, 1, 1).unwrap();
        for (i, ch) in "abcdef".chars().enumerate() {
            a.insert(&mut al, i, &ch.to_string()).unwrap();
        }
        assert_eq!(a.atom_count(), 6);
        let (removed, added) = a.coalesce(&mut al, |_| true, false).unwrap();
        assert_eq!((removed.len(), added.len()), (6, 1));
        assert_eq!(added[0].data(), "abcdef");
        assert_eq!(a.text(), "abcdef");
        a.delete(&mut al, 2..3).unwrap();
        let (atoms, deleted) = a.to_parts();
        let b = Doc::from_parts(1, DocName::default(), atoms, deleted);
        assert_eq!(b.text(), "abdef");
    }
}
