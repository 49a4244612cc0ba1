//! The version-3 allocation rule keeps concurrent runs whole (PROTOCOL.md
//! 1.4): replicas type runs forwards and backwards at random spots while
//! their ops are delivered one at a time in random order, then everything
//! is delivered. Every replica ends with the same sequence, and no run is
//! split by the chars of a run whose typist never had one of its chars as a
//! neighbour (a run typed concurrently at that spot, or anywhere else).

use std::collections::{HashMap, HashSet};

use notesync_protocol::{Allocator, Pid, alloc::region};
use proptest::prelude::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A run being typed: its id, direction, chars left, and the last char
/// typed (the cursor is after it forwards, before it backwards).
struct Typing {
    run: usize,
    forward: bool,
    left: usize,
    anchor: Option<Pid>,
}

struct Replica {
    alloc: Allocator,
    seq: Vec<Pid>,
    typing: Option<Typing>,
}

impl Replica {
    fn add(&mut self, p: &Pid) {
        if let Err(i) = self.seq.binary_search(p) {
            self.seq.insert(i, p.clone());
        }
    }
}

struct World {
    reps: Vec<Replica>,
    /// Ops not yet delivered: (to replica, id).
    inbox: Vec<(usize, Pid)>,
    run_of: HashMap<Pid, usize>,
    /// Runs whose chars a run had as a neighbour when it was typed.
    touched: Vec<HashSet<usize>>,
    forward: Vec<bool>,
}

impl World {
    fn keystroke(&mut self, r: usize, rng: &mut Rng) {
        let rep = &mut self.reps[r];
        let t = rep.typing.get_or_insert_with(|| {
            let run = self.touched.len();
            self.touched.push(HashSet::new());
            let forward = rng.below(3) > 0;
            self.forward.push(forward);
            Typing {
                run,
                forward,
                left: 1 + rng.below(12),
                anchor: None,
            }
        });
        let at = match &t.anchor {
            None => rng.below(rep.seq.len() + 1),
            Some(a) => {
                let i = rep.seq.binary_search(a).expect("own char");
                if t.forward { i + 1 } else { i }
            }
        };
        let left = at.checked_sub(1).map(|i| rep.seq[i].clone());
        let right = rep.seq.get(at).cloned();
        for n in left.iter().chain(&right) {
            if let Some(&o) = self.run_of.get(n) {
                if o != t.run {
                    self.touched[t.run].insert(o);
                }
            }
        }
        let p = rep
            .alloc
            .between(left.as_ref(), right.as_ref())
            .expect("room");
        assert!(left.as_ref().is_none_or(|l| *l < p) && right.as_ref().is_none_or(|x| p < *x));
        assert_eq!(p.creator(), rep.alloc.site());
        assert!(region(rep.alloc.site()).unwrap().contains(&p.last().ident));
        assert!(!self.run_of.contains_key(&p), "id made twice: {p:?}");
        rep.seq.insert(at, p.clone());
        self.run_of.insert(p.clone(), t.run);
        t.anchor = Some(p.clone());
        t.left -= 1;
        if t.left == 0 {
            rep.typing = None;
        }
        for o in 0..self.reps.len() {
            if o != r {
                self.inbox.push((o, p.clone()));
            }
        }
    }

    fn deliver(&mut self, k: usize) {
        let (to, p) = self.inbox.swap_remove(k);
        self.reps[to].add(&p);
    }
}

/// Simulates a schedule; returns a description of the first split run.
fn simulate(sites: &[u8], seed: u64, steps: usize) -> Result<(), String> {
    let mut rng = Rng(seed | 1);
    let mut w = World {
        reps: sites
            .iter()
            .map(|&s| Replica {
                alloc: Allocator::new(s, 1, seed).unwrap(),
                seq: Vec::new(),
                typing: None,
            })
            .collect(),
        inbox: Vec::new(),
        run_of: HashMap::new(),
        touched: Vec::new(),
        forward: Vec::new(),
    };
    // A shared base text, typed forwards by the first replica.
    let base = rng.below(8);
    let mut last: Option<Pid> = None;
    for _ in 0..base {
        let p = w.reps[0].alloc.between(last.as_ref(), None).unwrap();
        for rep in &mut w.reps {
            rep.add(&p);
        }
        last = Some(p);
    }
    for _ in 0..steps {
        if !w.inbox.is_empty() && rng.below(2) == 0 {
            let k = rng.below(w.inbox.len());
            w.deliver(k);
        } else {
            let r = rng.below(w.reps.len());
            w.keystroke(r, &mut rng);
        }
    }
    while !w.inbox.is_empty() {
        let k = rng.below(w.inbox.len());
        w.deliver(k);
    }
    let merged = w.reps[0].seq.clone();
    for (i, rep) in w.reps.iter().enumerate() {
        if rep.seq != merged {
            return Err(format!("replica {i} diverged"));
        }
    }
    let runs: Vec<Option<usize>> = merged.iter().map(|p| w.run_of.get(p).copied()).collect();
    let dir = |r: usize| if w.forward[r] { "forward" } else { "backward" };
    split_run(&runs, &w.touched).map_or(Ok(()), |(a, b)| {
        Err(format!("{} run {a} split by {} run {b}", dir(a), dir(b)))
    })
}

/// The first run split by another that had no business there: for each
/// run `a`, every run with chars between `a`'s first and last must reach
/// `a` through a chain of "typed next to" among the runs in that span (it
/// was typed inside `a`, or inside a run typed inside `a`, ...). A run
/// typed concurrently at `a`'s spot, which never saw `a`, has no such
/// chain.
pub fn split_run(runs: &[Option<usize>], touched: &[HashSet<usize>]) -> Option<(usize, usize)> {
    for a in 0..touched.len() {
        let pos: Vec<usize> = (0..runs.len()).filter(|&i| runs[i] == Some(a)).collect();
        let (Some(&lo), Some(&hi)) = (pos.first(), pos.last()) else {
            continue;
        };
        let inside: HashSet<usize> = runs[lo..=hi]
            .iter()
            .flatten()
            .copied()
            .filter(|&b| b != a)
            .collect();
        let mut allowed: HashSet<usize> = HashSet::from([a]);
        loop {
            let more: Vec<usize> = inside
                .iter()
                .copied()
                .filter(|b| !allowed.contains(b) && touched[*b].iter().any(|t| allowed.contains(t)))
                .collect();
            if more.is_empty() {
                break;
            }
            allowed.extend(more);
        }
        if let Some(&b) = inside.iter().find(|b| !allowed.contains(b)) {
            return Some((a, b));
        }
    }
    None
}

/// Sites at region edges (1 and 7, 7 and 8, the last one) and in between.
fn sites() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::subsequence(vec![1u8, 2, 3, 6, 7, 8, 9, 100, 254, 255], 3..=5).prop_shuffle()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn concurrent_runs_stay_whole_and_replicas_converge(sites in sites(), seed: u64, steps in 10usize..250) {
        if let Err(e) = simulate(&sites, seed, steps) {
            prop_assert!(false, "sites {:?}: {}", sites, e);
        }
    }
}

/// The example: two replicas append at the end of one line without
/// seeing each other; each run comes out whole, in site order.
#[test]
fn two_appends_at_one_spot_do_not_interleave() {
    let mut a = Allocator::new(1, 1, 1).unwrap();
    let mut b = Allocator::new(2, 1, 1).unwrap();
    let mut base: Vec<Pid> = Vec::new();
    for _ in 0.."# Notes\n".len() {
        let p = a.between(base.last(), None).unwrap();
        base.push(p);
    }
    let typed = |al: &mut Allocator, text: &str| {
        let mut out: Vec<(Pid, char)> = Vec::new();
        let mut last = base.last().cloned();
        for ch in text.chars() {
            let p = al.between(last.as_ref(), None).unwrap();
            out.push((p.clone(), ch));
            last = Some(p);
        }
        out
    };
    let ta = typed(&mut a, "hello from alice");
    let tb = typed(&mut b, "greetings bob");
    let mut all: Vec<(Pid, char)> = ta.into_iter().chain(tb).collect();
    all.sort();
    let text: String = all.iter().map(|x| x.1).collect();
    assert_eq!(text, "hello from alicegreetings bob");
}
