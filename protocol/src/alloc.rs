//! Allocation of new position ids between two existing ones.
//!
//! The allocator places a new level at the shallowest depth with room, a
//! *fraction of the room* away from one neighbour: at most 1/1024 of it
//! where the gap is open on one side (typing at the end of a level), at most
//! 1/64 where both neighbours bound it (typing inside text). Proportional
//! steps leave wide gaps between early characters, so later revisions fit
//! at the same depth, while a long run of typing still fits (the room shrinks
//! geometrically: ~30,000 characters typed at one end of an open level
//! before it descends). The step within that bound is random, so
//! concurrent typists at one spot rarely pick the same ident.
//!
//! LSEQ chooses boundary+ (near the left neighbour) or boundary- (near the
//! right) per depth, by a hash of (document, depth) so every replica makes
//! the same choice. Measured on the real traces (`examples/trace_ids.rs`),
//! that alternation makes ids about one level deeper, because people type
//! forwards: boundary- inside text leaves no room for the next keystroke.
//! So every depth uses boundary+ (boundary- only where the gap is open to
//! the left), which is trivially the same choice on every replica; the
//! alternation remains available for comparison (`with_alternation`).
//!
//! Invariants (checked by the property tests):
//! - the result is strictly between the two bounds;
//! - the last level carries the allocator's site, so ids made by different
//!   sites never collide;
//! - given the full sequence (tombstones included) and allocating only
//!   between adjacent ids, a site never makes the same id twice.
//!
//! Levels above the last may carry any site, site 0 included: site 0 as a
//! filler is what guarantees that room always exists, e.g. between `[a]` and
//! `[a, (0, 1)]` the id `[a, (0, 0), (x, s)]` fits.

use crate::pid::{Level, Pid};

/// In a gap open on one side, a step takes at most 1/OPEN_DIVISOR of the room.
pub const DEFAULT_OPEN_DIVISOR: u32 = 1024;
/// In a gap bounded on both sides, a step takes at most 1/BOUNDED_DIVISOR of
/// the room.
pub const DEFAULT_BOUNDED_DIVISOR: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("cannot allocate between {0}: the left bound is not below the right bound")]
    NotOrdered(&'static str),
    #[error("site 0 is reserved and cannot allocate ids")]
    ReservedSite,
    #[error("the right bound ends in a level with site 0, which no valid id does")]
    InvalidBound,
}

/// Which side of the gap a depth allocates near.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Near the left neighbour: suits typing forwards.
    BoundaryPlus,
    /// Near the right neighbour: suits typing backwards.
    BoundaryMinus,
}

/// Makes position ids for one site in one document.
#[derive(Debug, Clone)]
pub struct Allocator {
    site: u8,
    doc_seed: u64,
    open_divisor: u32,
    bounded_divisor: u32,
    alternate: bool,
    rng: u64,
}

impl Allocator {
    /// An allocator for `site` in the document `doc_id`. `seed` varies the
    /// step sizes only; any value is correct.
    pub fn new(site: u8, doc_id: u128, seed: u64) -> Result<Self, AllocError> {
        if site == 0 {
            return Err(AllocError::ReservedSite);
        }
        let doc_seed = mix((doc_id as u64) ^ mix((doc_id >> 64) as u64));
        Ok(Allocator {
            site,
            doc_seed,
            open_divisor: DEFAULT_OPEN_DIVISOR,
            bounded_divisor: DEFAULT_BOUNDED_DIVISOR,
            alternate: false,
            rng: mix(seed ^ (site as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1,
        })
    }

    /// Step tuning (see the module docs and the trace_ids example).
    pub fn with_steps(mut self, open_divisor: u32, bounded_divisor: u32) -> Self {
        self.open_divisor = open_divisor.max(1);
        self.bounded_divisor = bounded_divisor.max(1);
        self
    }

    /// LSEQ's alternation: choose boundary+ or boundary- per depth by a
    /// hash of (document, depth). Off by default: on the real traces it
    /// makes ids about one level deeper (see the module docs).
    pub fn with_alternation(mut self, on: bool) -> Self {
        self.alternate = on;
        self
    }

    pub fn site(&self) -> u8 {
        self.site
    }

    /// The strategy at `depth` (0-based) for this document: the same on
    /// every replica.
    pub fn strategy(&self, depth: usize) -> Strategy {
        if !self.alternate || mix(self.doc_seed ^ depth as u64) & 1 == 0 {
            Strategy::BoundaryPlus
        } else {
            Strategy::BoundaryMinus
        }
    }

    /// An id strictly between `left` and `right` (`None`: the start or the
    /// end of the document), whose last level carries this site.
    pub fn between(&mut self, left: Option<&Pid>, right: Option<&Pid>) -> Result<Pid, AllocError> {
        let lo: Vec<Level> = left.map(|p| p.levels().collect()).unwrap_or_default();
        let hi: Option<Vec<Level>> = right.map(|p| p.levels().collect());
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
        let mut out: Vec<Level> = Vec::with_capacity(lo.len().max(1) + 1);
        // While `hi_tracked`, `out` equals `hi`'s prefix, so `hi` still bounds
        // the next level; once a level below `hi`'s is placed it stops
        // bounding anything. `lo` likewise bounds only while `out` is its prefix.
        let mut hi_tracked = hi.is_some();
        let mut lo_tracked = true;
        for d in 0.. {
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
                if min <= max {
                    let ident = self.pick(min, max, lo_d.is_some(), hi_d.is_some(), d);
                    out.push(Level::new(ident, self.site));
                    return Ok(Pid::from_levels(&out));
                }
            }
            // No room at this depth for a level with our site: copy a level
            // that keeps `out` between the bounds and go one deeper.
            let filler = match (lo_d, hi_d) {
                (Some(l), _) => l,
                // `lo` is a prefix of `out`; `hi_d` is (0, s) with s <= our
                // site. (0, 0) is below it unless it is (0, 0) itself, in
                // which case we stay on `hi`'s path (it has more levels).
                (None, Some(_)) => Level::new(0, 0),
                (None, None) => unreachable!("an open depth always has room"),
            };
            if hi_d != Some(filler) {
                hi_tracked = false;
            }
            if lo_d != Some(filler) {
                lo_tracked = false;
            }
            out.push(filler);
        }
        unreachable!()
    }

    fn pick(&mut self, min: u32, max: u32, lo_bound: bool, hi_bound: bool, depth: usize) -> u32 {
        let room = (max - min) as u64 + 1;
        let (divisor, strategy) = match (lo_bound, hi_bound) {
            (_, false) => (self.open_divisor, Strategy::BoundaryPlus),
            (false, true) => (self.open_divisor, Strategy::BoundaryMinus),
            (true, true) => (self.bounded_divisor, self.strategy(depth)),
        };
        let span = (room / divisor as u64).max(1);
        let step = self.next() % span; // 0..span, and span <= room
        match strategy {
            Strategy::BoundaryPlus => min + step as u32,
            Strategy::BoundaryMinus => max - step as u32,
        }
    }

    fn next(&mut self) -> u64 {
        // xorshift64*: deterministic, no dependency, good enough for steps.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// splitmix64's finaliser: a fixed, portable hash of a u64.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(levels: &[(u32, u8)]) -> Pid {
        let l: Vec<Level> = levels.iter().map(|&(i, s)| Level::new(i, s)).collect();
        Pid::from_levels(&l)
    }

    #[test]
    fn tight_corners_still_have_room() {
        let mut a = Allocator::new(7, 1, 1).unwrap();
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
        ];
        for (l, r) in cases {
            let p = a.between(l.as_ref(), r.as_ref()).unwrap();
            assert!(l.as_ref().is_none_or(|l| *l < p), "{l:?} < {p:?}");
            assert!(r.as_ref().is_none_or(|r| p < *r), "{p:?} < {r:?}");
            assert_eq!(p.creator(), 7);
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
    fn typing_forwards_stays_at_depth_one() {
        let mut a = Allocator::new(3, 42, 9).unwrap();
        let mut last: Option<Pid> = None;
        for _ in 0..10_000 {
            let p = a.between(last.as_ref(), None).unwrap();
            assert!(last.as_ref().is_none_or(|l| *l < p));
            assert_eq!(p.depth(), 1);
            last = Some(p);
        }
    }
}
