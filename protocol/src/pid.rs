//! Position ids: the order of atoms in a document.
//!
//! A position id is a non-empty list of levels `(site: u8, ident: u32)`.
//! Order (PROTOCOL.md, "Position order"): level by level, a level by ident
//! then by site, and a proper prefix before every id that extends it.
//!
//! Invariant: [`Pid`] is stored in *key form*: each level as `ident` (u32
//! big-endian) then `site` (u8), concatenated. Byte-wise lexicographic order
//! of the key form is exactly the position order (fixed-width levels, prefix
//! shorter), so `Ord` on `Pid` is a memcmp and the server can use the key
//! form directly as a redb key suffix. The *wire form* is different: it puts
//! `site` before `ident` (the seed's layout) and prefixes the depth.

use std::cmp::Ordering;
use std::fmt;

use smallvec::SmallVec;

/// Bytes of one level, in either form.
pub const LEVEL_BYTES: usize = 5;

/// One level of a position id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Level {
    pub site: u8,
    pub ident: u32,
}

impl Level {
    pub const fn new(ident: u32, site: u8) -> Self {
        Level { site, ident }
    }
}

impl Ord for Level {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.ident, self.site).cmp(&(other.ident, other.site))
    }
}

impl PartialOrd for Level {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// An owned position id, in key form (see the module docs).
///
/// Ids up to four levels deep live inline, without a heap allocation.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pid {
    key: SmallVec<[u8; 4 * LEVEL_BYTES]>,
}

impl Pid {
    /// Builds an id from its levels. Panics on an empty list: an id has at
    /// least one level (callers that take levels from the wire go through the
    /// decoder, which rejects depth 0 with an error).
    pub fn from_levels(levels: &[Level]) -> Self {
        assert!(!levels.is_empty(), "a position id has at least one level");
        let mut key = SmallVec::with_capacity(levels.len() * LEVEL_BYTES);
        for l in levels {
            key.extend_from_slice(&l.ident.to_be_bytes());
            key.push(l.site);
        }
        Pid { key }
    }

    /// Parses the key form. `None` if it is empty or not a whole number of
    /// levels.
    pub fn from_key(key: &[u8]) -> Option<Self> {
        if key.is_empty() || key.len() % LEVEL_BYTES != 0 {
            return None;
        }
        Some(Pid {
            key: SmallVec::from_slice(key),
        })
    }

    /// The key form: byte order equals position order.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    pub fn depth(&self) -> usize {
        self.key.len() / LEVEL_BYTES
    }

    pub fn level(&self, i: usize) -> Level {
        let b = &self.key[i * LEVEL_BYTES..(i + 1) * LEVEL_BYTES];
        Level {
            ident: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            site: b[4],
        }
    }

    pub fn levels(&self) -> impl ExactSizeIterator<Item = Level> + '_ {
        (0..self.depth()).map(|i| self.level(i))
    }

    /// The site of the last level: the replica that created this id.
    pub fn creator(&self) -> u8 {
        self.key[self.key.len() - 1]
    }

    /// The last level: its site is the creator, its ident what a run steps.
    pub fn last(&self) -> Level {
        self.level(self.depth() - 1)
    }

    /// The key form of every level but the last (empty for a one-level id):
    /// the prefix a run's ids share.
    pub fn prefix_key(&self) -> &[u8] {
        &self.key[..self.key.len() - LEVEL_BYTES]
    }

    /// This id with its last ident replaced by `ident` (same prefix, same
    /// site): the ids of a run (PROTOCOL.md 1.4) and of a range.
    pub fn with_last_ident(&self, ident: u32) -> Pid {
        let mut key = self.key.clone();
        let at = key.len() - LEVEL_BYTES;
        key[at..at + 4].copy_from_slice(&ident.to_be_bytes());
        Pid { key }
    }

    /// Whether this id is the one after `prev` in a run (same prefix and
    /// site, last ident + 1), without building that id: scans over runs
    /// ask it per char.
    pub fn follows(&self, prev: &Pid) -> bool {
        self.key.len() == prev.key.len()
            && self.prefix_key() == prev.prefix_key()
            && self.creator() == prev.creator()
            && prev.last().ident.checked_add(1) == Some(self.last().ident)
    }

    /// The id `j` steps after this one in a run: last ident + `j`; `None`
    /// if that overflows `u32`.
    pub fn offset(&self, j: u32) -> Option<Pid> {
        self.last()
            .ident
            .checked_add(j)
            .map(|i| self.with_last_ident(i))
    }

    /// Bytes this id takes on the wire: one depth byte and five per level.
    pub fn wire_len(&self) -> usize {
        1 + self.key.len()
    }

    /// Appends the wire form (depth, then `site, ident` per level).
    pub fn write_wire(&self, out: &mut impl bytes::BufMut) {
        out.put_u8(self.depth() as u8);
        for chunk in self.key.chunks_exact(LEVEL_BYTES) {
            out.put_u8(chunk[4]);
            out.put_slice(&chunk[..4]);
        }
    }

    /// Converts a validated wire-form id (depth byte included) to key form.
    pub(crate) fn from_wire_unchecked(wire: &[u8]) -> Self {
        let mut key = SmallVec::with_capacity(wire.len() - 1);
        for chunk in wire[1..].chunks_exact(LEVEL_BYTES) {
            key.extend_from_slice(&chunk[1..5]);
            key.push(chunk[0]);
        }
        Pid { key }
    }
}

impl fmt::Debug for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pid[")?;
        for (i, l) in self.levels().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{}@{}", l.ident, l.site)?;
        }
        f.write_str("]")
    }
}

/// The position order, written out level by level as PROTOCOL.md states it.
/// `Pid`'s `Ord` (a memcmp of the key form) must agree with this; the
/// property tests check that it does.
pub fn compare_levels(a: &[Level], b: &[Level]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        match x.cmp(y) {
            Ordering::Equal => continue,
            other => return other,
        }
    }
    a.len().cmp(&b.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_sorts_first_and_ident_before_site() {
        let a = Pid::from_levels(&[Level::new(5, 9)]);
        let b = Pid::from_levels(&[Level::new(5, 9), Level::new(0, 1)]);
        let c = Pid::from_levels(&[Level::new(6, 1)]);
        assert!(a < b && b < c);
        // ident decides before site
        let d = Pid::from_levels(&[Level::new(5, 200)]);
        assert!(a < d && d < c);
    }

    #[test]
    fn wire_and_key_forms_round_trip() {
        let p = Pid::from_levels(&[Level::new(0x01020304, 7), Level::new(9, 255)]);
        let mut wire = Vec::new();
        p.write_wire(&mut wire);
        assert_eq!(wire, [2, 7, 1, 2, 3, 4, 255, 0, 0, 0, 9]);
        assert_eq!(Pid::from_wire_unchecked(&wire), p);
        assert_eq!(Pid::from_key(p.key()), Some(p.clone()));
        assert_eq!(p.creator(), 255);
        assert_eq!(Pid::from_key(&[1, 2, 3]), None);
    }

    #[test]
    fn run_steps_change_only_the_last_ident() {
        let p = Pid::from_levels(&[Level::new(7, 3), Level::new(u32::MAX - 1, 9)]);
        assert_eq!(p.last(), Level::new(u32::MAX - 1, 9));
        assert_eq!(p.prefix_key(), &[0, 0, 0, 7, 3]);
        let q = p.offset(1).expect("fits");
        assert!(p < q);
        assert_eq!(q.last(), Level::new(u32::MAX, 9));
        assert_eq!(p.offset(2), None);
        assert_eq!(p.with_last_ident(5).prefix_key(), p.prefix_key());
    }

    /// `follows` answers as `offset(1)` compared would, for every way two
    /// ids can differ.
    #[test]
    fn follows_is_offset_one() {
        let p = Pid::from_levels(&[Level::new(7, 3), Level::new(40, 9)]);
        let others = [
            p.with_last_ident(41),
            p.with_last_ident(42),
            p.with_last_ident(40),
            p.with_last_ident(39),
            Pid::from_levels(&[Level::new(7, 3), Level::new(41, 8)]),
            Pid::from_levels(&[Level::new(8, 3), Level::new(41, 9)]),
            Pid::from_levels(&[Level::new(7, 3), Level::new(41, 9), Level::new(0, 9)]),
            Pid::from_levels(&[Level::new(41, 9)]),
        ];
        for q in &others {
            assert_eq!(q.follows(&p), p.offset(1).as_ref() == Some(q), "{q:?}");
        }
        assert!(others[0].follows(&p));
        let top = p.with_last_ident(u32::MAX);
        assert!(!p.with_last_ident(0).follows(&top));
    }
}
