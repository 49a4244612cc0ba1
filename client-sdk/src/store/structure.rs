//! The `<file>.md.structure` format (layout in the docs of
//! [`crate::store`]): a note's document, its sync time and the ids to
//! reconcile, written and parsed. Pure: the caller does the file I/O.
//!
//! Version 3 is version 2 with the text's digest in the header (read
//! alone, it says whether a note's text is what a file holds). Version 2
//! (issue 12) stores a run of live one-char atoms
//! at consecutive ids (same prefix and site, last ident +1 each) as its
//! first id and its text, and consecutive deleted ids as a range: a typed
//! note costs about its text, not an id per char. Version 1 (the seed's
//! layout, no header) still opens; the next save rewrites it as version 3.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use bytes::{Buf, BufMut, BytesMut};
use notesync_protocol::{DocId, DocName, FrameDecoder, Level, Pid, ServerFrame, SmallText, Time};

use super::StoreError;
use crate::doc::Doc;

/// Starts every version-2 and version-3 file. A version-1 file starts with its document
/// id, which would have to begin with these 8 bytes to look like one (and
/// a file that then fails to parse as version 2 is tried as version 1).
const MAGIC: [u8; 8] = *b"\x89NSSTRC\n";
const VERSION: u8 = 3;
/// Magic, version, document id, sync time, the text's digest.
pub(super) const HEADER: usize = 8 + 1 + 16 + 8 + DIGEST;
/// Version 2's header: no digest.
pub(super) const HEADER_V2: usize = 8 + 1 + 16 + 8;
/// Bytes of a text's digest.
pub const DIGEST: usize = 16;

/// A note's text digest: the first 16 bytes of its SHA-256. The header
/// carries it so that whether a note's text is what a file holds is known
/// without reading the note (a sync of a large folder where nothing
/// changed reads each note's header only).
pub type Digest = [u8; DIGEST];

pub fn digest(text: &str) -> Digest {
    use sha2::Digest as _;
    let full = sha2::Sha256::digest(text.as_bytes());
    let mut d = [0u8; DIGEST];
    d.copy_from_slice(&full[..DIGEST]);
    d
}

/// Item tags of version 2's sections.
const END: u8 = 0;
const RUN: u8 = 1;
const ATOM: u8 = 2;
const RANGE: u8 = 3;
const ID: u8 = 4;

/// The longest run (bytes of text) and range (ids) one item holds, as on
/// the wire (a `u16`); longer ones take several items.
const MAX_RUN_BYTES: usize = u16::MAX as usize;
const MAX_RANGE: u16 = u16::MAX;

/// The most ids (chars, tombstones, ids to reconcile) a version-2 file
/// may name. A range names up to 65,535 ids in a few bytes, so the file's
/// size alone does not bound what reading it allocates; this does (a
/// document this large would take gigabytes as a `Doc`).
pub const MAX_STRUCTURE_IDS: usize = 1 << 26;

/// An item of the atoms section.
enum AtomItem {
    /// Live one-char atoms at `first`, `first`+1, ...
    Run { first: Pid, text: String },
    /// Any other atom (two or more chars: a live or dead header), whole.
    Atom { pid: Pid, data: SmallText },
}

/// Groups ids into maximal ranges of consecutive ids, in the order their
/// first ids come. The ids of a range need not be adjacent in `ids` (a
/// nested id may sort between two of them): an open range is found by the
/// id it expects next.
fn ranges<'a>(ids: impl IntoIterator<Item = &'a Pid>) -> Vec<(Pid, u16)> {
    let mut out: Vec<(Pid, u16)> = Vec::new();
    let mut open: HashMap<Pid, usize> = HashMap::new();
    for pid in ids {
        let at = match open.remove(pid) {
            Some(i) if out[i].1 < MAX_RANGE => {
                out[i].1 += 1;
                i
            }
            _ => {
                out.push((pid.clone(), 1));
                out.len() - 1
            }
        };
        if let Some(next) = pid.offset(1) {
            open.insert(next, at);
        }
    }
    out
}

/// Serializes a note's structure file (version 2).
pub fn write_structure(doc: &Doc, last_sync: Time, live_since: &BTreeSet<Pid>) -> BytesMut {
    let (atoms, deleted) = doc.to_parts();
    // Both lists are in position order: a merge walk says which atoms are
    // dead.
    let mut dead = deleted.iter().peekable();
    let mut items: Vec<AtomItem> = Vec::new();
    let mut open: HashMap<Pid, usize> = HashMap::new();
    for (pid, data) in atoms {
        while dead.next_if(|d| **d < pid).is_some() {}
        let is_dead = dead.peek().is_some_and(|d| **d == pid);
        let one_char = data.chars().nth(1).is_none();
        if is_dead && one_char {
            // Its tombstone (in `deleted`) is all that is kept: like the
            // server, the store drops the text of a deleted char.
            continue;
        }
        if !one_char || is_dead {
            items.push(AtomItem::Atom { pid, data });
            continue;
        }
        let at = match open.remove(&pid) {
            Some(i) => match &mut items[i] {
                AtomItem::Run { text, .. } if text.len() + data.len() <= MAX_RUN_BYTES => {
                    text.push_str(&data);
                    Some(i)
                }
                _ => None,
            },
            None => None,
        };
        let at = at.unwrap_or_else(|| {
            items.push(AtomItem::Run {
                first: pid.clone(),
                text: data.to_string(),
            });
            items.len() - 1
        });
        if let Some(next) = pid.offset(1) {
            open.insert(next, at);
        }
    }
    let mut out = BytesMut::with_capacity(HEADER + 64 + doc.len_chars() + 16 * items.len());
    out.put_slice(&MAGIC);
    out.put_u8(VERSION);
    out.put_u128(doc.id);
    out.put_u64(last_sync);
    out.put_slice(&digest(&doc.text()));
    for item in &items {
        match item {
            // A lone char is a byte shorter as an atom.
            AtomItem::Run { first, text } if text.chars().nth(1).is_none() => {
                out.put_u8(ATOM);
                out.put_u8(text.len() as u8);
                out.put_slice(text.as_bytes());
                first.write_wire(&mut out);
            }
            AtomItem::Run { first, text } => {
                out.put_u8(RUN);
                first.write_wire(&mut out);
                out.put_u16(text.len() as u16);
                out.put_slice(text.as_bytes());
            }
            AtomItem::Atom { pid, data } => {
                out.put_u8(ATOM);
                out.put_u8(data.len() as u8);
                out.put_slice(data.as_bytes());
                pid.write_wire(&mut out);
            }
        }
    }
    out.put_u8(END);
    for list in [ranges(&deleted), ranges(live_since)] {
        for (first, count) in list {
            // A lone id is two bytes shorter without a count.
            out.put_u8(if count == 1 { ID } else { RANGE });
            first.write_wire(&mut out);
            if count > 1 {
                out.put_u16(count);
            }
        }
        out.put_u8(END);
    }
    let crc = crc32fast::hash(&out);
    out.put_u32(crc);
    out
}

/// What a structure file holds.
struct Parts {
    id: u128,
    last_sync: Time,
    atoms: Vec<(Pid, SmallText)>,
    deleted: Vec<Pid>,
    live_since: Vec<Pid>,
}

/// Parses a structure file: (document, last sync time, ids to reconcile).
/// Either version; a file this code cannot read is a `BadStructure` error
/// saying why, never a panic.
pub fn read_structure(
    path: &Path,
    b: &[u8],
    name: DocName,
) -> Result<(Doc, Time, Vec<Pid>), StoreError> {
    let bad = |why| StoreError::BadStructure {
        path: path.to_owned(),
        why,
    };
    let parts = if b.starts_with(&MAGIC) {
        // A version-1 file whose document id starts with the magic is
        // still read (its id is random: once in 2^64 files).
        read_v2(b).or_else(|why| read_v1(b).map_err(|_| bad(why)))?
    } else {
        read_v1(b).map_err(bad)?
    };
    Ok((
        Doc::from_parts(parts.id, name, parts.atoms, parts.deleted),
        parts.last_sync,
        parts.live_since,
    ))
}

/// What the start of a structure file (its first [`HEADER`] bytes, or
/// fewer) says, unchecked: what a note that is not loaded needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Header {
    pub id: DocId,
    pub last_sync: Time,
    /// Its text's digest (version 3 on).
    pub digest: Option<Digest>,
}

/// The header of a structure file; `None` if it is cut short.
pub(super) fn read_header(b: &[u8]) -> Option<Header> {
    let versioned = b.starts_with(&MAGIC) && b.len() > 8;
    let (mut head, digest) = match versioned.then(|| b[8]) {
        Some(3) if b.len() >= HEADER => {
            let d = b[HEADER_V2..HEADER].try_into().expect("16 bytes");
            (&b[9..HEADER_V2], Some(d))
        }
        Some(2) if b.len() >= HEADER_V2 => (&b[9..HEADER_V2], None),
        _ if b.len() >= 24 => (b, None),
        _ => return None,
    };
    Some(Header {
        id: head.get_u128(),
        last_sync: head.get_u64(),
        digest,
    })
}

/// A bounded reader over a version-2 body: every read says what was cut
/// short rather than panicking.
struct Reader<'a> {
    b: &'a [u8],
    ids: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.b.len() < n {
            return Err("it is cut short inside an item");
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, &'static str> {
        Ok(self.take(2)?.get_u16())
    }

    /// A position id in wire form: depth 1..=255, then `site, ident` per
    /// level; the last level's site is a replica's (not 0).
    fn pid(&mut self) -> Result<Pid, &'static str> {
        let depth = self.u8()? as usize;
        if depth == 0 {
            return Err("a position id in it has depth 0");
        }
        let mut wire = self.take(depth * 5)?;
        let mut levels = Vec::with_capacity(depth);
        for _ in 0..depth {
            let site = wire.get_u8();
            levels.push(Level::new(wire.get_u32(), site));
        }
        if levels[depth - 1].site == 0 {
            return Err("a position id in it ends in the reserved site 0");
        }
        Ok(Pid::from_levels(&levels))
    }

    /// Counts `n` more ids against [`MAX_STRUCTURE_IDS`] before they are
    /// made.
    fn count(&mut self, n: usize) -> Result<(), &'static str> {
        self.ids += n;
        if self.ids > MAX_STRUCTURE_IDS {
            return Err("it names more ids than a structure file may (2^26)");
        }
        Ok(())
    }

    /// The ids of a range section (until its end tag).
    fn ranges(&mut self) -> Result<Vec<Pid>, &'static str> {
        let mut out = Vec::new();
        loop {
            match self.u8()? {
                END => return Ok(out),
                ID => {
                    self.count(1)?;
                    out.push(self.pid()?);
                }
                RANGE => {
                    let first = self.pid()?;
                    let count = self.u16()?;
                    if count == 0 {
                        return Err("a range in it is empty");
                    }
                    if first.offset(u32::from(count) - 1).is_none() {
                        return Err("a range in it runs past the last ident");
                    }
                    self.count(count as usize)?;
                    let start = first.last().ident;
                    out.extend((0..u32::from(count)).map(|j| first.with_last_ident(start + j)));
                }
                _ => return Err("an item in its id lists has an unknown tag"),
            }
        }
    }
}

/// Parses a version-2 or version-3 file (the same but for the digest in
/// the header).
fn read_v2(b: &[u8]) -> Result<Parts, &'static str> {
    if b.len() < HEADER_V2 + 4 {
        return Err("it is cut short inside its header");
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32fast::hash(body) != (&crc[..]).get_u32() {
        return Err("its checksum does not match (corrupt, or cut short)");
    }
    let header = match body[8] {
        2 => HEADER_V2,
        3 if body.len() >= HEADER => HEADER,
        3 => return Err("it is cut short inside its header"),
        _ => return Err("it has a format version this build does not know"),
    };
    let mut head = &body[9..HEADER_V2];
    let id = head.get_u128();
    let last_sync = head.get_u64();
    let mut r = Reader {
        b: &body[header..],
        ids: 0,
    };
    let mut atoms = Vec::new();
    loop {
        match r.u8()? {
            END => break,
            RUN => {
                let first = r.pid()?;
                let len = r.u16()? as usize;
                let text = std::str::from_utf8(r.take(len)?)
                    .map_err(|_| "a run's text in it is not UTF-8")?;
                if text.is_empty() {
                    return Err("a run in it is empty");
                }
                let start = first.last().ident;
                for (j, ch) in text.chars().enumerate() {
                    r.count(1)?;
                    let ident = u32::try_from(j)
                        .ok()
                        .and_then(|j| start.checked_add(j))
                        .ok_or("a run in it runs past the last ident")?;
                    atoms.push((first.with_last_ident(ident), SmallText::from_char(ch)));
                }
            }
            ATOM => {
                let len = r.u8()? as usize;
                let data =
                    std::str::from_utf8(r.take(len)?).map_err(|_| "an atom in it is not UTF-8")?;
                if data.is_empty() {
                    return Err("an atom in it is empty");
                }
                let pid = r.pid()?;
                r.count(1 + data.chars().count())?;
                atoms.push((pid, SmallText::new(data)));
            }
            _ => return Err("an item in its atoms has an unknown tag"),
        }
    }
    let deleted = r.ranges()?;
    let live_since = r.ranges()?;
    if !r.b.is_empty() {
        return Err("it has bytes after its lists");
    }
    Ok(Parts {
        id,
        last_sync,
        atoms,
        deleted,
        live_since,
    })
}

/// Parses a version-1 file: `u128 id, u64 last_sync`, then the lists of a
/// 33 frame, so the protocol's decoder validates them (counts are checked
/// against the file's size before use, as on the wire).
fn read_v1(b: &[u8]) -> Result<Parts, &'static str> {
    if b.len() < 24 {
        return Err("shorter than its 24-byte header");
    }
    let mut head = &b[..24];
    let id = head.get_u128();
    let last_sync = head.get_u64();
    // Rebuild the lists as a 33 frame: header, id, empty name, lists.
    let as_33 = |lists: &[u8]| -> Result<(notesync_protocol::DocResponse, BytesMut), &'static str> {
        let mut frame = BytesMut::with_capacity(lists.len() + 18);
        frame.put_u8(33);
        frame.put_u128(id);
        frame.put_u8(b'\n');
        frame.put_slice(lists);
        let limits = notesync_protocol::Limits {
            max_frame_bytes: frame.len().max(1024),
            max_items_per_frame: u64::MAX,
            max_pid_depth: 255,
        };
        match FrameDecoder::<ServerFrame>::new(limits).decode(&mut frame) {
            Ok(Some(ServerFrame::DocResponse(r))) => Ok((r, frame)),
            Ok(Some(_)) => Err("it is not a structure file"),
            Ok(None) => Err("it is cut short"),
            Err(_) => Err("an atom or id in it is malformed"),
        }
    };
    let (r, rest) = as_33(&b[24..])?;
    // The third list (ids to reconcile) is absent in files written before
    // it existed.
    let live_since = if rest.is_empty() {
        Vec::new()
    } else {
        let mut lists = BytesMut::with_capacity(rest.len() + 8);
        lists.put_u64(0);
        lists.put_slice(&rest);
        let (r2, rest2) = as_33(&lists)?;
        if !rest2.is_empty() {
            return Err("it has bytes after its lists");
        }
        r2.deletes.iter().map(|p| p.to_pid()).collect()
    };
    let atoms = r
        .inserts
        .iter()
        .map(|a| (a.pid.to_pid(), SmallText::new(a.data)))
        .collect();
    let deleted = r.deletes.iter().map(|p| p.to_pid()).collect();
    Ok(Parts {
        id,
        last_sync,
        atoms,
        deleted,
        live_since,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::doc::virtual_id;

    /// The seed's writer (version 1), as main wrote it before version 2.
    pub(crate) fn write_structure_v1(
        doc: &Doc,
        last_sync: Time,
        live_since: &BTreeSet<Pid>,
    ) -> BytesMut {
        let (atoms, deleted) = doc.to_parts();
        let mut out = BytesMut::new();
        out.put_u128(doc.id);
        out.put_u64(last_sync);
        out.put_u64(atoms.len() as u64);
        for (pid, data) in &atoms {
            out.put_u8(data.len() as u8);
            out.put_slice(data.as_bytes());
            pid.write_wire(&mut out);
        }
        out.put_u64(deleted.len() as u64);
        for pid in &deleted {
            pid.write_wire(&mut out);
        }
        out.put_u64(live_since.len() as u64);
        for pid in live_since {
            pid.write_wire(&mut out);
        }
        out
    }

    fn p(levels: &[(u32, u8)]) -> Pid {
        let l: Vec<Level> = levels.iter().map(|&(i, s)| Level::new(i, s)).collect();
        Pid::from_levels(&l)
    }

    /// A document with every kind of entry: a forward run of 40 chars at
    /// `[(1000+j, 3)]` with a nested run inside it and some chars deleted,
    /// a run at depth 2 from another site, a multi-char atom with one char
    /// deleted, a dead multi-char atom, and ids known only as deleted.
    fn mixed() -> (Doc, BTreeSet<Pid>) {
        let mut atoms = Vec::new();
        let text = "Hello, wörld: a run typed forwards ✓ end";
        for (j, ch) in text.chars().enumerate() {
            atoms.push((p(&[(1000 + j as u32, 3)]), ch.to_string()));
        }
        // Nested under char 10 (sorts between chars 10 and 11).
        for (j, ch) in "nested".chars().enumerate() {
            atoms.push((p(&[(1010, 3), (500 + j as u32, 4)]), ch.to_string()));
        }
        atoms.push((p(&[(5000, 7)]), "a multi-char atom".to_owned()));
        atoms.push((p(&[(6000, 7)]), "dead atom".to_owned()));
        let mut deleted: Vec<Pid> = (20..25).map(|j| p(&[(1000 + j, 3)])).collect();
        deleted.push(p(&[(1002, 3)]));
        deleted.push(p(&[(1010, 3), (502, 4)]));
        deleted.push(virtual_id(&p(&[(5000, 7)]), 3));
        deleted.push(p(&[(6000, 7)]));
        deleted.extend((0..300).map(|j| p(&[(9000 + j, 9)])));
        let doc = Doc::from_parts(42, DocName::new("n").unwrap(), atoms, deleted);
        let live_since = (1000..1010).map(|j| p(&[(j, 3)])).collect();
        (doc, live_since)
    }

    /// What survives a version-2 round trip: everything but the text of a
    /// dead one-char atom (its tombstone stays).
    fn kept(doc: &Doc) -> (Vec<(Pid, SmallText)>, Vec<Pid>) {
        let (atoms, deleted) = doc.to_parts();
        let dead: std::collections::HashSet<&Pid> = deleted.iter().collect();
        let atoms = atoms
            .into_iter()
            .filter(|(pid, data)| data.chars().nth(1).is_some() || !dead.contains(pid))
            .collect();
        (atoms, deleted)
    }

    fn read(b: &[u8]) -> Result<(Doc, Time, Vec<Pid>), StoreError> {
        read_structure(Path::new("n.md.structure"), b, DocName::new("n").unwrap())
    }

    fn why(b: &[u8]) -> &'static str {
        match read(b) {
            Err(StoreError::BadStructure { why, .. }) => why,
            other => panic!("expected BadStructure, got {other:?}"),
        }
    }

    #[test]
    fn runs_ranges_and_other_atoms_round_trip() {
        let (doc, live_since) = mixed();
        let b = write_structure(&doc, 77, &live_since);
        assert!(b.starts_with(&MAGIC));
        let (back, t, ls) = read(&b).unwrap();
        assert_eq!(t, 77);
        assert_eq!(back.id, 42);
        assert_eq!(back.text(), doc.text());
        assert_eq!(kept(&back), kept(&doc));
        assert_eq!(ls, live_since.iter().cloned().collect::<Vec<_>>());
        // Written again, it is the same file.
        let again = write_structure(&back, 77, &ls.into_iter().collect());
        assert_eq!(again, b);
        // Runs and ranges: far smaller than an id per entry.
        let v1 = write_structure_v1(&doc, 77, &live_since);
        assert!(b.len() * 3 < v1.len(), "{} vs {}", b.len(), v1.len());
    }

    #[test]
    fn the_header_says_the_text_digest_and_a_version_2_file_still_opens() {
        let (doc, live_since) = mixed();
        let b = write_structure(&doc, 77, &live_since);
        let h = read_header(&b[..HEADER]).unwrap();
        assert_eq!(
            h,
            Header {
                id: doc.id,
                last_sync: 77,
                digest: Some(digest(&doc.text()))
            }
        );
        assert_eq!(
            read_header(&b[..HEADER - 1]).map(|h| h.digest),
            Some(None),
            "cut: as v1"
        );
        // The same file as version 2 wrote it: no digest.
        let mut v2 = b[..b.len() - 4].to_vec();
        v2.drain(HEADER_V2..HEADER);
        v2[8] = 2;
        let crc = crc32fast::hash(&v2);
        v2.extend_from_slice(&crc.to_be_bytes());
        let h = read_header(&v2).unwrap();
        assert_eq!((h.id, h.last_sync, h.digest), (doc.id, 77, None));
        let (back, t, ls) = read(&v2).unwrap();
        assert_eq!((kept(&back), t), (kept(&doc), 77));
        assert_eq!(ls, live_since.iter().cloned().collect::<Vec<_>>());
    }

    #[test]
    fn an_empty_note_round_trips() {
        let doc = Doc::new(7, DocName::new("n").unwrap());
        let b = write_structure(&doc, 0, &BTreeSet::new());
        assert_eq!(b.len(), HEADER + 3 + 4);
        let (back, t, ls) = read(&b).unwrap();
        assert_eq!(
            (back.id, back.text(), t, ls.len()),
            (7, String::new(), 0, 0)
        );
    }

    #[test]
    fn long_runs_and_ranges_split_at_the_item_limit() {
        let n = 70_000u32;
        let atoms = (0..n)
            .map(|j| (p(&[(10 + j, 2)]), "é".to_owned()))
            .collect();
        let deleted = (0..n).map(|j| p(&[((1 << 20) + j, 2)])).collect();
        let doc = Doc::from_parts(1, DocName::new("n").unwrap(), atoms, deleted);
        let b = write_structure(&doc, 0, &BTreeSet::new());
        // Three runs (2 bytes a char) and two ranges.
        assert!(b.len() < 2 * n as usize + 200, "{}", b.len());
        let (back, _, _) = read(&b).unwrap();
        assert_eq!(kept(&back), kept(&doc));
    }

    #[test]
    fn a_version_1_file_opens_with_every_atom_and_tombstone() {
        let (doc, live_since) = mixed();
        let v1 = write_structure_v1(&doc, 5, &live_since);
        let (back, t, ls) = read(&v1).unwrap();
        assert_eq!(t, 5);
        // Version 1 keeps dead atoms' text too: all of it comes back.
        assert_eq!(back.to_parts(), doc.to_parts());
        assert_eq!(ls, live_since.iter().cloned().collect::<Vec<_>>());
        // A version-1 file from before the third list existed.
        let mut older = v1.clone();
        older.truncate(v1.len() - 8 - live_since.len() * 6);
        let (back, _, ls) = read(&older).unwrap();
        assert_eq!(back.to_parts(), doc.to_parts());
        assert!(ls.is_empty());
    }

    #[test]
    fn a_version_1_file_whose_id_looks_like_the_magic_still_opens() {
        let id = u128::from_be_bytes(
            [MAGIC.as_slice(), &[2; 8]]
                .concat()
                .try_into()
                .expect("16 bytes"),
        );
        let atoms = vec![(p(&[(3, 1)]), "x".to_owned())];
        let doc = Doc::from_parts(id, DocName::new("n").unwrap(), atoms, Vec::new());
        let v1 = write_structure_v1(&doc, 9, &BTreeSet::new());
        assert!(v1.starts_with(&MAGIC));
        let (back, t, _) = read(&v1).unwrap();
        assert_eq!((back.id, back.text(), t), (id, "x".to_owned(), 9));
    }

    #[test]
    fn cut_or_flipped_files_give_clear_errors() {
        let (doc, live_since) = mixed();
        let b = write_structure(&doc, 77, &live_since);
        for cut in 0..b.len() {
            let why = why(&b[..cut]);
            assert!(
                why.contains("cut short") || why.contains("checksum") || why.contains("header"),
                "cut at {cut}: {why}"
            );
        }
        for at in [0, 8, 9, 30, HEADER + 1, b.len() / 2, b.len() - 1] {
            let mut bad = b.to_vec();
            bad[at] ^= 0x10;
            // Damage to the magic makes it a (bad) version-1 file.
            assert!(read(&bad).is_err(), "flipped byte {at}");
        }
        let mut bad = b.to_vec();
        bad[HEADER + 5] ^= 1;
        assert_eq!(
            why(&bad),
            "its checksum does not match (corrupt, or cut short)"
        );
    }

    /// A version-2 file with this body (after the header), checksummed.
    fn v2_file(version: u8, body: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.push(version);
        out.extend_from_slice(&9u128.to_be_bytes());
        out.extend_from_slice(&1u64.to_be_bytes());
        out.extend_from_slice(body);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    #[test]
    fn malformed_items_are_named() {
        let pid = [1, 4, 0, 0, 0, 9];
        let item = |tag: u8, rest: &[u8]| [&[tag][..], &pid, rest].concat();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                v2_file(4, &[0, 0, 0]),
                "it has a format version this build does not know",
            ),
            (
                v2_file(2, &[9, 0, 0, 0]),
                "an item in its atoms has an unknown tag",
            ),
            (
                v2_file(2, &[0, 1, 0, 0]),
                "an item in its id lists has an unknown tag",
            ),
            (v2_file(2, &[0, 0, 0, 0]), "it has bytes after its lists"),
            (v2_file(2, &[0, 0]), "it is cut short inside an item"),
            (
                v2_file(2, &[&item(RUN, &[0, 0]), &[0, 0, 0][..]].concat()),
                "a run in it is empty",
            ),
            (
                v2_file(
                    2,
                    &[&item(RUN, &[0, 2, 0xc3, 0x28]), &[0, 0, 0][..]].concat(),
                ),
                "a run's text in it is not UTF-8",
            ),
            (
                v2_file(2, &[&item(RUN, &[0, 9, b'a']), &[0, 0, 0][..]].concat()),
                "it is cut short inside an item",
            ),
            (
                v2_file(2, &[&[0], &item(RANGE, &[0, 0])[..], &[0, 0]].concat()),
                "a range in it is empty",
            ),
            (
                v2_file(2, &[RUN, 0, 0, 1, b'a', 0, 0, 0]),
                "a position id in it has depth 0",
            ),
            (
                v2_file(2, &[RUN, 1, 0, 0, 0, 0, 9, 0, 1, b'a', 0, 0, 0]),
                "a position id in it ends in the reserved site 0",
            ),
            (
                v2_file(
                    2,
                    &[&[0, RANGE, 1, 4, 0xff, 0xff, 0xff, 0xfe, 0, 3][..], &[0, 0]].concat(),
                ),
                "a range in it runs past the last ident",
            ),
            (
                v2_file(
                    2,
                    &[
                        &[RUN, 1, 4, 0xff, 0xff, 0xff, 0xff, 0, 2, b'a', b'b'][..],
                        &[0, 0, 0],
                    ]
                    .concat(),
                ),
                "a run in it runs past the last ident",
            ),
        ];
        for (file, want) in cases {
            assert_eq!(why(&file), want, "{file:?}");
        }
    }

    #[test]
    fn ranges_never_make_more_ids_than_the_limit() {
        // 1,024 ranges of 65,535 ids each name more than 2^26 ids in ~10 KB:
        // reading stops at the limit (ids are counted before they are made).
        let mut body = vec![0];
        for k in 0..1025u32 {
            body.push(RANGE);
            body.extend_from_slice(&[1, 4]);
            body.extend_from_slice(&(k << 16).to_be_bytes());
            body.extend_from_slice(&u16::MAX.to_be_bytes());
        }
        body.extend_from_slice(&[0, 0]);
        let mut r = Reader {
            b: &body[1..],
            ids: MAX_STRUCTURE_IDS - 100_000,
        };
        assert_eq!(
            r.ranges(),
            Err("it names more ids than a structure file may (2^26)")
        );
    }

    proptest::proptest! {
        /// Any mix of runs (ids stepping by one under a few prefixes, some
        /// nested), lone chars, multi-char atoms, deletes and ids known only
        /// as deleted round-trips.
        #[test]
        fn any_document_round_trips(
            ops in proptest::collection::vec((0u8..3, 0u32..40, 0u8..10), 0..200),
            last_sync in 0u64..1000,
        ) {
            let mut atoms = Vec::new();
            let mut deleted = Vec::new();
            let mut live_since = BTreeSet::new();
            for (prefix, i, what) in ops {
                let id = match prefix {
                    0 => p(&[(100 + i, 3)]),
                    1 => p(&[(110, 3), (i, 4)]),
                    _ => p(&[(110, 3), (5, 4), (i, 3)]),
                };
                match what {
                    0..=4 => atoms.push((id.clone(), "é".to_owned())),
                    5 => atoms.push((id.clone(), "abc".to_owned())),
                    6 => {
                        atoms.push((id.clone(), "x".to_owned()));
                        deleted.push(id.clone());
                    }
                    7 => deleted.push(id.clone()),
                    8 => deleted.push(virtual_id(&id, 1)),
                    _ => {}
                }
                if what % 3 == 0 {
                    live_since.insert(id);
                }
            }
            let doc = Doc::from_parts(3, DocName::new("n").unwrap(), atoms, deleted);
            let b = write_structure(&doc, last_sync, &live_since);
            let (back, t, ls) = read(&b).unwrap();
            proptest::prop_assert_eq!(t, last_sync);
            proptest::prop_assert_eq!(back.text(), doc.text());
            proptest::prop_assert_eq!(kept(&back), kept(&doc));
            // In any order: the caller keeps them as a set.
            proptest::prop_assert_eq!(ls.into_iter().collect::<BTreeSet<_>>(), live_since.clone());
            // At worst a byte more per item than version 1 (its tag), and
            // the digest in the header.
            let (a, d) = doc.to_parts();
            let v1 = write_structure_v1(&doc, last_sync, &live_since).len();
            let items = a.len() + d.len() + live_since.len();
            proptest::prop_assert!(b.len() <= v1 + items + DIGEST);
            let h = read_header(&b).unwrap();
            proptest::prop_assert_eq!(h.digest, Some(digest(&doc.text())));
        }
    }
}
