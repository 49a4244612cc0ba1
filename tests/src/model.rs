//! A tiny replica of one document, as a client keeps it: every id it has
//! seen, live or deleted (tombstones stay, so ids are never reused), the
//! name, and an allocator for the replica's own site.

use std::collections::BTreeMap;

use notesync_protocol::{Allocator, Atom, DocId, DocResponse, Pid, ServerFrame};

/// One id of the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Empty for a tombstone of an id whose insert was never seen.
    pub data: String,
    pub live: bool,
}

/// What applying an op did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The document changed.
    Changed,
    /// The op was already reflected (an idempotent repeat).
    Unchanged,
}

#[derive(Debug, Clone)]
pub struct DocModel {
    pub id: DocId,
    pub name: String,
    entries: BTreeMap<Pid, Entry>,
    alloc: Option<Allocator>,
}

impl DocModel {
    pub fn new(id: DocId) -> Self {
        DocModel {
            id,
            name: String::new(),
            entries: BTreeMap::new(),
            alloc: None,
        }
    }

    /// Sets this replica's site for the document (from a 34 or 68); local
    /// inserts then make ids of that site. `seed` only varies the steps.
    pub fn set_site(&mut self, site: u8, seed: u64) {
        assert_ne!(site, 0, "site 0 cannot make ids");
        if self.alloc.as_ref().is_some_and(|a| a.site() == site) {
            return;
        }
        self.alloc = Some(Allocator::new(site, self.id, seed).expect("site is not 0"));
    }

    pub fn site(&self) -> Option<u8> {
        self.alloc.as_ref().map(|a| a.site())
    }

    /// Applies an insert idempotently. Panics if the id is known with other
    /// data: ids are unique forever (PROTOCOL.md 1.1 rule 2), so that would
    /// mean the server handed out two atoms with one id.
    pub fn apply_insert(&mut self, data: &str, pid: &Pid) -> Applied {
        match self.entries.get_mut(pid) {
            None => {
                self.entries.insert(
                    pid.clone(),
                    Entry {
                        data: data.to_owned(),
                        live: true,
                    },
                );
                Applied::Changed
            }
            Some(e) if e.data.is_empty() => {
                // A tombstone recorded from a delete that came first: the
                // insert stays deleted.
                e.data = data.to_owned();
                Applied::Unchanged
            }
            Some(e) => {
                assert_eq!(
                    e.data, data,
                    "doc {:#x}: id {pid:?} seen with two different data",
                    self.id
                );
                Applied::Unchanged
            }
        }
    }

    /// Applies a delete idempotently (an unknown id becomes a tombstone).
    pub fn apply_delete(&mut self, pid: &Pid) -> Applied {
        match self.entries.get_mut(pid) {
            None => {
                self.entries.insert(
                    pid.clone(),
                    Entry {
                        data: String::new(),
                        live: false,
                    },
                );
                Applied::Changed
            }
            Some(e) if e.live => {
                e.live = false;
                Applied::Changed
            }
            Some(_) => Applied::Unchanged,
        }
    }

    /// Applies a 33: its name, inserts and deletes.
    pub fn apply_response(&mut self, r: &DocResponse) {
        assert_eq!(r.doc, self.id, "a 33 for another document");
        self.name = r.name.as_str().to_owned();
        for a in r.inserts.iter() {
            self.apply_insert(a.data, &a.pid.to_pid());
        }
        for p in r.deletes.iter() {
            self.apply_delete(&p.to_pid());
        }
    }

    pub fn apply_responses(&mut self, rs: &[DocResponse]) {
        for r in rs {
            self.apply_response(r);
        }
    }

    /// Applies a 33, 65, 66 or 67; `None` for any other frame.
    pub fn apply_frame(&mut self, f: &ServerFrame) -> Option<Applied> {
        Some(match f {
            ServerFrame::DocResponse(r) => {
                self.apply_response(r);
                Applied::Changed
            }
            ServerFrame::Insert(i) => self.apply_insert(i.atom.data(), i.atom.pid()),
            ServerFrame::Delete(d) => self.apply_delete(&d.pid),
            ServerFrame::Rename(n) => {
                self.name = n.as_str().to_owned();
                Applied::Changed
            }
            _ => return None,
        })
    }

    /// The text: live atoms in position order.
    pub fn text(&self) -> String {
        self.entries
            .values()
            .filter(|e| e.live)
            .map(|e| e.data.as_str())
            .collect()
    }

    /// The live atoms in order.
    pub fn live(&self) -> Vec<(Pid, String)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.live)
            .map(|(p, e)| (p.clone(), e.data.clone()))
            .collect()
    }

    pub fn live_len(&self) -> usize {
        self.entries.values().filter(|e| e.live).count()
    }

    pub fn get(&self, pid: &Pid) -> Option<&Entry> {
        self.entries.get(pid)
    }

    pub fn is_live(&self, pid: &Pid) -> bool {
        self.entries.get(pid).is_some_and(|e| e.live)
    }

    /// Every id known, live or not.
    pub fn len_with_tombstones(&self) -> usize {
        self.entries.len()
    }

    /// Inserts `data` so that it becomes live atom number `index` (0 ..=
    /// live_len), with a fresh id of this replica's site between its two
    /// neighbours in the full sequence (tombstones included). Returns the
    /// atom to send.
    pub fn local_insert(&mut self, index: usize, data: &str) -> Atom {
        let live: Vec<&Pid> = self
            .entries
            .iter()
            .filter(|(_, e)| e.live)
            .map(|(p, _)| p)
            .collect();
        assert!(index <= live.len(), "insert index {index} past the end");
        let left = if index == 0 {
            None
        } else {
            Some(live[index - 1].clone())
        };
        let right = match &left {
            None => self.entries.keys().next().cloned(),
            Some(l) => self
                .entries
                .range::<Pid, _>((std::ops::Bound::Excluded(l), std::ops::Bound::Unbounded))
                .next()
                .map(|(p, _)| p.clone()),
        };
        self.insert_between(left, right, data)
    }

    /// Appends `data` at the end of the text (without walking the whole
    /// document: between the last live atom and whatever id follows it).
    pub fn local_append(&mut self, data: &str) -> Atom {
        let left = self
            .entries
            .iter()
            .rev()
            .find(|(_, e)| e.live)
            .map(|(p, _)| p.clone());
        let right = match &left {
            None => self.entries.keys().next().cloned(),
            Some(l) => self
                .entries
                .range::<Pid, _>((std::ops::Bound::Excluded(l), std::ops::Bound::Unbounded))
                .next()
                .map(|(p, _)| p.clone()),
        };
        self.insert_between(left, right, data)
    }

    fn insert_between(&mut self, left: Option<Pid>, right: Option<Pid>, data: &str) -> Atom {
        let alloc = self
            .alloc
            .as_mut()
            .expect("a local insert needs a site: call set_site first");
        let pid = alloc
            .between(left.as_ref(), right.as_ref())
            .expect("allocate between adjacent ids");
        assert!(
            !self.entries.contains_key(&pid),
            "allocator made an id already taken: {pid:?}"
        );
        let atom = Atom::new(data, pid.clone()).expect("valid atom");
        self.apply_insert(data, &pid);
        atom
    }

    /// Deletes live atom number `index`; returns its id.
    pub fn local_delete(&mut self, index: usize) -> Pid {
        let pid = self
            .entries
            .iter()
            .filter(|(_, e)| e.live)
            .nth(index)
            .map(|(p, _)| p.clone())
            .expect("delete index within the live atoms");
        self.apply_delete(&pid);
        pid
    }
}

/// The text and name a sequence of 33s describes, applied to an empty
/// document (e.g. a pull since 0).
pub fn model_of(doc: DocId, rs: &[DocResponse]) -> DocModel {
    let mut m = DocModel::new(doc);
    m.apply_responses(rs);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use notesync_protocol::Level;

    fn pid(ident: u32, site: u8) -> Pid {
        Pid::from_levels(&[Level::new(ident, site)])
    }

    #[test]
    fn applies_idempotently_and_a_delete_before_its_insert_wins() {
        let mut m = DocModel::new(1);
        assert_eq!(m.apply_insert("b", &pid(20, 1)), Applied::Changed);
        assert_eq!(m.apply_insert("a", &pid(10, 2)), Applied::Changed);
        assert_eq!(m.apply_insert("a", &pid(10, 2)), Applied::Unchanged);
        assert_eq!(m.text(), "ab");
        assert_eq!(m.apply_delete(&pid(10, 2)), Applied::Changed);
        assert_eq!(m.apply_delete(&pid(10, 2)), Applied::Unchanged);
        assert_eq!(m.apply_delete(&pid(30, 1)), Applied::Changed);
        assert_eq!(m.apply_insert("c", &pid(30, 1)), Applied::Unchanged);
        assert_eq!(m.text(), "b");
        assert_eq!(m.len_with_tombstones(), 3);
    }

    #[test]
    #[should_panic(expected = "two different data")]
    fn the_same_id_with_other_data_is_a_bug() {
        let mut m = DocModel::new(1);
        m.apply_insert("a", &pid(1, 1));
        m.apply_insert("b", &pid(1, 1));
    }

    #[test]
    fn local_edits_land_where_asked_and_never_reuse_an_id() {
        let mut m = DocModel::new(7);
        m.set_site(3, 1);
        let mut made = std::collections::BTreeSet::new();
        for (i, w) in ["a", "c", "e"].iter().enumerate() {
            assert!(made.insert(m.local_insert(i, w).pid().clone()));
        }
        assert!(made.insert(m.local_insert(1, "b").pid().clone()));
        assert_eq!(m.text(), "abce");
        let gone = m.local_delete(2);
        assert!(!m.is_live(&gone));
        assert_eq!(m.text(), "abe");
        // Insert where the tombstone was, many times: ids stay fresh and
        // the text stays in order.
        for _ in 0..50 {
            let a = m.local_insert(2, "d");
            assert!(made.insert(a.pid().clone()), "id reused: {:?}", a.pid());
            assert_eq!(a.pid().creator(), 3);
            m.local_delete(2);
        }
        m.local_insert(2, "d");
        assert_eq!(m.text(), "abde");
    }
}
