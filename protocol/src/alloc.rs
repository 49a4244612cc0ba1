//! Allocation of new position ids between two existing ones (the
//! version-3 rule, PROTOCOL.md 1.4).
//!
//! Why this rule: the order compares `ident` before `site`, so two replicas
//! that take new levels from one shared ident range interleave their
//! concurrent runs wherever those ranges overlap ("hello" and "greetings"
//! typed at one spot merged char by char under the old random-step rule).
//! Every known non-interleaving design (Fugue, position-strings, nilseq)
//! makes the *site* decide where two runs diverge. Here that is done without
//! a new level per run: at every depth each site owns a fixed ident
//! **region**, ordered like the sites, and takes new last levels only from
//! it. Two concurrent runs that start at the same depth under the same
//! prefix then occupy disjoint ident intervals, so neither can land inside
//! the other.
//!
//! A run must also stay one interval, so that nothing concurrent fits
//! between two of its chars. So:
//! - **forward extension**: after an own char `P ++ [(s, i)]` the next id
//!   is `P ++ [(s, i + 1)]` whenever that still fits before the right
//!   neighbour (a forward run is one prefix, a first ident and a count: one
//!   run on the wire);
//! - **backward extension**: before an own char, `P ++ [(s, i - 1)]`;
//! - a **new run** starts at the shallowest depth whose room, restricted to
//!   the region, is not empty, in the *middle* of that room, so it can grow
//!   both ways;
//! - with no room at a depth, it **descends** as the right child of the
//!   left neighbour (copying its level), except before an own char, where
//!   it nests as the left child of the right neighbour (filler `(ident of
//!   its last level, site 0)`, just below it), so a run typed backwards
//!   stays next to the char it grows from, even when that char is itself a
//!   forward extension of the left neighbour. Under a left neighbour that
//!   is a prefix of the right one, the first child `(0, 0)`: never at an
//!   ident of another site's level, which could sit inside its run when
//!   this replica has not seen all of it (ops may arrive in any order).
//!
//! Everything is a function of the two neighbours and the site: no
//! randomness, so every replica (and a third-party client) computes the
//! same ids, and the property tests can replay schedules.
//!
//! Invariants (checked by the unit and property tests):
//! - the result is strictly between the two bounds;
//! - the last level carries the allocator's site and an ident of its region
//!   (so ids made by different sites never collide, and no last ident is
//!   below 255: a reserved virtual char id of PROTOCOL.md 1.2,
//!   `P ++ [(creator, j < 255)]`, is never made);
//! - given the full sequence (tombstones included) and allocating only
//!   between adjacent ids, a site never makes the same id twice (the result
//!   is strictly between two adjacent entries, so it is not one of them).
//!
//! Levels above the last may carry any site, site 0 included: site 0 as a
//! filler is what guarantees that room always exists, e.g. between `[a]` and
//! `[a, (0, 1)]` the id `[a, (0, 0), (x, s)]` fits.

use std::ops::RangeInclusive;

use crate::pid::{Level, Pid};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("cannot allocate between {0}: the left bound is not below the right bound")]
    NotOrdered(&'static str),
    #[error("site 0 is reserved and cannot allocate ids")]
    ReservedSite,
    #[error("the right bound ends in a level with site 0, which no valid id does")]
    InvalidBound,
    #[error("a run of {0} chars does not fit in one site's region")]
    TooLong(u32),
}

/// The idents site `site` takes new last levels from, at every depth
/// (PROTOCOL.md 1.4): sites 1-7 own `2^29` idents each (site 1 from 255,
/// since idents 0..=254 are virtual char ids), sites 8-255 own `2^21` each
/// after them; the top `8 * 2^21` idents belong to nobody. `None` for site 0.
pub fn region(site: u8) -> Option<RangeInclusive<u32>> {
    let s = site as u32;
    match site {
        0 => None,
        1 => Some(255..=(1 << 29) - 1),
        2..=7 => Some((s - 1) << 29..=(s << 29) - 1),
        _ => {
            let base = 7u32 << 29;
            Some(base + ((s - 8) << 21)..=base + ((s - 7) << 21) - 1)
        }
    }
}

/// Makes position ids for one site in one document.
#[derive(Debug, Clone)]
pub struct Allocator {
    site: u8,
    lo: u32,
    hi: u32,
}

impl Allocator {
    /// An allocator for `site`. The rule is deterministic: `doc_id` and
    /// `seed` no longer change any id (they stay in the signature so
    /// callers that keep a per-document, per-install allocator need not
    /// change).
    pub fn new(site: u8, _doc_id: u128, _seed: u64) -> Result<Self, AllocError> {
        let r = region(site).ok_or(AllocError::ReservedSite)?;
        Ok(Allocator {
            site,
            lo: *r.start(),
            hi: *r.end(),
        })
    }

    pub fn site(&self) -> u8 {
        self.site
    }

    fn in_region(&self, ident: u32) -> bool {
        (self.lo..=self.hi).contains(&ident)
    }

    /// The forward extension of `left`'s run, if the rule allows one here:
    /// `left` is this site's, its last ident + 1 is in the region and the
    /// result is below `right`. An editor that may choose among several
    /// adjacent pairs (a gap holding tombstones) uses this to continue a
    /// run.
    pub fn forward_extension(&self, left: Option<&Pid>, right: Option<&Pid>) -> Option<Pid> {
        let l = left?;
        let last = l.last();
        if last.site != self.site {
            return None;
        }
        let i = last.ident.checked_add(1).filter(|&i| self.in_region(i))?;
        let p = l.with_last_ident(i);
        right.is_none_or(|r| p < *r).then_some(p)
    }

    /// The backward extension of `right`'s run: `right` is this site's, its
    /// last ident - 1 is in the region and the result is above `left`.
    pub fn backward_extension(&self, left: Option<&Pid>, right: Option<&Pid>) -> Option<Pid> {
        let r = right?;
        let last = r.last();
        if last.site != self.site {
            return None;
        }
        let i = last.ident.checked_sub(1).filter(|&i| self.in_region(i))?;
        let p = r.with_last_ident(i);
        left.is_none_or(|l| p > *l).then_some(p)
    }

    /// An id strictly between `left` and `right` (`None`: the start or the
    /// end of the document), whose last level carries this site.
    pub fn between(&mut self, left: Option<&Pid>, right: Option<&Pid>) -> Result<Pid, AllocError> {
        self.run_between(left, right, 1)
    }

    /// The first id of a run of `n` chars placed at once (a paste, text
    /// made offline) strictly between `left` and `right`: the run is that id
    /// and the `n - 1` after it (last ident + 1 each), all between the
    /// bounds and in this site's region. For `n = 1` this is [`between`].
    /// A forward extension of `left` is taken if all `n` fit, else the `n`
    /// idents just below an own `right`, else a new run of `n` at the
    /// shallowest depth with room for all of them, centred in that room.
    ///
    /// [`between`]: Allocator::between
    pub fn run_between(
        &self,
        left: Option<&Pid>,
        right: Option<&Pid>,
        n: u32,
    ) -> Result<Pid, AllocError> {
        let n = n.max(1);
        if let (Some(l), Some(r)) = (left, right) {
            if l >= r {
                return Err(AllocError::NotOrdered("two ids"));
            }
        }
        if let Some(r) = right {
            if r.creator() == 0 {
                return Err(AllocError::InvalidBound);
            }
        }
        let fits = |first: &Pid| {
            first.last().ident.checked_add(n - 1).is_some_and(|e| {
                self.in_region(e) && right.is_none_or(|r| first.with_last_ident(e) < *r)
            })
        };
        if let Some(p) = self.forward_extension(left, right).filter(|p| fits(p)) {
            return Ok(p);
        }
        if let Some(p) = self.backward_extension(left, right) {
            if n == 1 {
                return Ok(p);
            }
            let first = p
                .last()
                .ident
                .checked_sub(n - 1)
                .filter(|&i| self.in_region(i));
            if let Some(p) = first.map(|i| p.with_last_ident(i)) {
                if left.is_none_or(|l| p > *l) {
                    return Ok(p);
                }
            }
        }
        self.new_run(left, right, n)
    }

    /// The first id of a new run (see the module docs).
    fn new_run(&self, left: Option<&Pid>, right: Option<&Pid>, n: u32) -> Result<Pid, AllocError> {
        let lo: Vec<Level> = left.map(|p| p.levels().collect()).unwrap_or_default();
        let hi: Option<Vec<Level>> = right.map(|p| p.levels().collect());
        // Before an own char: nest under it, not under the left neighbour,
        // so a run typed backwards stays next to the char it grows from
        // (whoever else nests under the left neighbour sorts before it).
        // Also when the left neighbour is own too: the char before the
        // right one may be the first char of this very run, a forward
        // extension of the left one.
        let backward = right.is_some_and(|r| r.creator() == self.site);
        let mut out: Vec<Level> = Vec::with_capacity(lo.len().max(1) + 1);
        // While `hi_tracked`, `out` equals `hi`'s prefix, so `hi` still bounds
        // the next level; once a level below `hi`'s is placed it stops
        // bounding anything. `lo` likewise bounds only while `out` is its prefix.
        let mut hi_tracked = hi.is_some();
        let mut lo_tracked = true;
        loop {
            let d = out.len();
            let lo_d = if lo_tracked { lo.get(d).copied() } else { None };
            let hi_d = if hi_tracked {
                match hi.as_ref().and_then(|h| h.get(d).copied()) {
                    Some(h) => Some(h),
                    // `hi` would be a prefix of `out`: only reachable if the
                    // bounds were not ordered.
                    None => return Err(AllocError::NotOrdered("ids where the right is a prefix")),
                }
            } else {
                None
            };
            let min = match lo_d {
                None => Some(0u32),
                Some(l) if self.site > l.site => Some(l.ident),
                Some(l) => l.ident.checked_add(1),
            };
            let max = match hi_d {
                None => Some(u32::MAX),
                Some(h) if self.site < h.site => Some(h.ident),
                Some(h) => h.ident.checked_sub(1),
            };
            if let (Some(min), Some(max)) = (min, max) {
                let (min, max) = (min.max(self.lo), max.min(self.hi));
                if min <= max && max - min >= n - 1 {
                    out.push(Level::new(min + (max - min - (n - 1)) / 2, self.site));
                    return Ok(Pid::from_levels(&out));
                }
            }
            // No room at this depth: copy a level that keeps `out` between
            // the bounds and go one deeper.
            let hi_last = hi.as_ref().is_some_and(|h| h.len() == d + 1);
            let filler = match (lo_d, hi_d) {
                // Both bounds share this level: stay on their common path.
                (Some(l), Some(h)) if l == h => l,
                // Left child of an own right neighbour: `(ident, 0)` sorts
                // just below its last level and, being >= the left level,
                // above `lo`. Only at its last level (or on a site-0 filler
                // of its path): a level of another site there would be a
                // char between the bounds, unless this replica has not seen
                // it yet, and nesting at its ident could then land inside
                // that site's run.
                (l, Some(h))
                    if backward
                        && (hi_last || h.site == 0)
                        && l.is_none_or(|l| l <= Level::new(h.ident, 0)) =>
                {
                    Level::new(h.ident, 0)
                }
                // Right child of the left neighbour.
                (Some(l), _) => l,
                // `lo` is a prefix of `out`: the first child of `lo`, which
                // sorts below everything else under it ((0, 0) unless `hi`
                // is on that very filler path, then stay on it).
                (None, Some(_)) => Level::new(0, 0),
                (None, None) => return Err(AllocError::TooLong(n)),
            };
            if hi_d != Some(filler) {
                hi_tracked = false;
            }
            if lo_d != Some(filler) {
                lo_tracked = false;
            }
            out.push(filler);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(levels: &[(u32, u8)]) -> Pid {
        let l: Vec<Level> = levels.iter().map(|&(i, s)| Level::new(i, s)).collect();
        Pid::from_levels(&l)
    }

    fn check(a: &mut Allocator, l: Option<&Pid>, r: Option<&Pid>) -> Pid {
        let p = a.between(l, r).unwrap();
        assert!(l.is_none_or(|l| *l < p), "{l:?} < {p:?}");
        assert!(r.is_none_or(|r| p < *r), "{p:?} < {r:?}");
        assert_eq!(p.creator(), a.site());
        assert!(region(a.site()).unwrap().contains(&p.last().ident), "{p:?}");
        p
    }

    #[test]
    fn tight_corners_still_have_room() {
        for site in [1, 2, 7, 8, 200, 255] {
            let mut a = Allocator::new(site, 1, 1).unwrap();
            let (r0, r1) = {
                let r = region(site).unwrap();
                (*r.start(), *r.end())
            };
            let cases = [
                (Some(pid(&[(5, 9)])), Some(pid(&[(5, 9), (0, 1)]))),
                (None, Some(pid(&[(0, 1)]))),
                (None, Some(pid(&[(0, 0), (0, 0), (0, 1)]))),
                (Some(pid(&[(u32::MAX, 255)])), None),
                (Some(pid(&[(5, 3)])), Some(pid(&[(5, 7)]))),
                (Some(pid(&[(5, 7)])), Some(pid(&[(6, 7)]))),
                (
                    Some(pid(&[(5, 7), (u32::MAX, 9)])),
                    Some(pid(&[(5, 7), (u32::MAX, 9), (0, 3)])),
                ),
                // Own chars at the edges of the region, adjacent.
                (Some(pid(&[(r1, site)])), None),
                (None, Some(pid(&[(r0, site)]))),
                (Some(pid(&[(r0, site)])), Some(pid(&[(r0 + 1, site)]))),
                (Some(pid(&[(r1 - 1, site)])), Some(pid(&[(r1, site)]))),
                // Another site's char just below ours, and own left child.
                (Some(pid(&[(r0, 0), (9, 3)])), Some(pid(&[(r0, site)]))),
                (Some(pid(&[(r0, 0)])), Some(pid(&[(r0, site)]))),
                (
                    Some(pid(&[(r0, site)])),
                    Some(pid(&[(r0, site), (0, 0), (1, 1)])),
                ),
            ];
            for (l, r) in cases {
                check(&mut a, l.as_ref(), r.as_ref());
            }
        }
    }

    #[test]
    fn rejects_bad_bounds() {
        assert_eq!(
            Allocator::new(0, 1, 1).unwrap_err(),
            AllocError::ReservedSite
        );
        let mut a = Allocator::new(1, 1, 1).unwrap();
        let x = pid(&[(5, 1)]);
        assert!(a.between(Some(&x), Some(&x)).is_err());
        assert_eq!(
            a.between(None, Some(&pid(&[(5, 0)]))),
            Err(AllocError::InvalidBound)
        );
    }

    #[test]
    fn regions_are_ordered_like_sites_and_disjoint() {
        assert_eq!(region(0), None);
        assert_eq!(*region(1).unwrap().start(), 255);
        for s in 1..255u8 {
            let (a, b) = (region(s).unwrap(), region(s + 1).unwrap());
            assert_eq!(*a.end() + 1, *b.start(), "sites {s} and {}", s + 1);
        }
        assert_eq!(*region(255).unwrap().end(), u32::MAX - (8 << 21));
    }

    #[test]
    fn typing_forwards_stays_at_depth_one_with_consecutive_idents() {
        let mut a = Allocator::new(3, 42, 9).unwrap();
        let mut last: Option<Pid> = None;
        for _ in 0..10_000 {
            let p = check(&mut a, last.as_ref(), None);
            assert_eq!(p.depth(), 1);
            if let Some(l) = &last {
                assert_eq!(p.last().ident, l.last().ident + 1);
            }
            last = Some(p);
        }
    }

    #[test]
    fn typing_backwards_makes_descending_consecutive_idents() {
        let mut a = Allocator::new(2, 1, 1).unwrap();
        let other = pid(&[(300, 1)]);
        let mut first = check(&mut a, Some(&other), None);
        for _ in 0..1000 {
            let p = check(&mut a, Some(&other), Some(&first));
            assert_eq!(p.prefix_key(), first.prefix_key());
            assert_eq!(p.last().ident + 1, first.last().ident);
            first = p;
        }
    }

    #[test]
    fn a_new_run_starts_in_the_middle_of_its_room() {
        let mut a = Allocator::new(2, 1, 1).unwrap();
        let r = region(2).unwrap();
        let p = check(&mut a, None, None);
        assert_eq!(p.last().ident, r.start() + (r.end() - r.start()) / 2);
        // Between two chars of another site with no room: under the left.
        let l = pid(&[(400, 1)]);
        let p = check(&mut a, Some(&l), Some(&pid(&[(401, 1)])));
        assert_eq!(p.prefix_key(), l.key());
    }

    #[test]
    fn backwards_before_an_own_char_nests_as_its_left_child() {
        let mut a = Allocator::new(2, 1, 1).unwrap();
        let r0 = *region(2).unwrap().start();
        // The own char is at the region's start: no backward extension.
        let right = pid(&[(r0, 2)]);
        let left = pid(&[(400, 1)]);
        let p = check(&mut a, Some(&left), Some(&right));
        assert_eq!(p.level(0), Level::new(r0, 0), "{p:?}");
        // The left neighbour is another site's char nested under an own one.
        let right = pid(&[(r0 + 10, 2)]);
        let left = pid(&[(r0 + 9, 2), (5, 7)]);
        let p = check(&mut a, Some(&left), Some(&right));
        assert_eq!(p.level(0), Level::new(r0 + 10, 0), "{p:?}");
        assert_eq!(p.depth(), 2);
    }

    #[test]
    fn the_rule_is_deterministic() {
        let mut a = Allocator::new(9, 1, 1).unwrap();
        let mut b = Allocator::new(9, 77, 12345).unwrap();
        let l = pid(&[(12, 1), (99, 4)]);
        let r = pid(&[(12, 1), (99, 4), (3, 8)]);
        assert_eq!(a.between(Some(&l), Some(&r)), b.between(Some(&l), Some(&r)));
    }
}
