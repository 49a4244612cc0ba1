//! Runs through the SDK's `Doc` (PROTOCOL.md 1.4): replicas type runs
//! forwards, backwards, and offline in any order (coalesced before they are
//! sent), delete chars of the shared base text, and receive each other's
//! ops one at a time in random order, some twice. Every replica converges,
//! and no run is split by a run whose typist never had one of its chars
//! next to the cursor. And a real two-author history (friendsforever)
//! replayed one replica per agent.

mod common;

use std::collections::{HashMap, HashSet};

use notesync_client::{Doc, LocalOp};
use notesync_protocol::{Allocator, DocName, Pid};
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

struct Typing {
    run: usize,
    forward: bool,
    left: usize,
    /// The last char typed: the cursor is after it (forwards) or before it.
    anchor: Option<char>,
}

struct Replica {
    doc: Doc,
    alloc: Allocator,
    typing: Option<Typing>,
}

struct World {
    reps: Vec<Replica>,
    inbox: Vec<(usize, LocalOp)>,
    /// Every typed char is unique: its run.
    run_of: HashMap<char, usize>,
    touched: Vec<HashSet<usize>>,
    kinds: Vec<&'static str>,
    next_char: u32,
}

fn apply(doc: &mut Doc, op: &LocalOp) {
    match op {
        LocalOp::Insert(a) => {
            doc.apply_insert(a.data(), a.pid());
        }
        LocalOp::Delete(p) => {
            doc.apply_delete(p);
        }
    }
}

impl World {
    fn fresh_char(&mut self) -> char {
        self.next_char += 1;
        char::from_u32(0x4E00 + self.next_char).expect("a CJK char")
    }

    fn send(&mut self, from: usize, ops: Vec<LocalOp>, rng: &mut Rng) {
        for op in ops {
            for to in 0..self.reps.len() {
                if to != from {
                    if rng.below(8) == 0 {
                        self.inbox.push((to, op.clone()));
                    }
                    self.inbox.push((to, op.clone()));
                }
            }
        }
    }

    /// Records the runs of the live chars around char index `at` of `r`.
    fn touch(&mut self, r: usize, run: usize, at: usize) {
        let text: Vec<char> = self.reps[r].doc.text().chars().collect();
        for i in [at.wrapping_sub(1), at] {
            if let Some(o) = text.get(i).and_then(|c| self.run_of.get(c)) {
                if *o != run {
                    self.touched[run].insert(*o);
                }
            }
        }
    }

    fn new_run(&mut self, kind: &'static str) -> usize {
        self.touched.push(HashSet::new());
        self.kinds.push(kind);
        self.touched.len() - 1
    }

    fn keystroke(&mut self, r: usize, rng: &mut Rng) {
        if self.reps[r].typing.is_none() {
            let forward = rng.below(3) > 0;
            let run = self.new_run(if forward { "forward" } else { "backward" });
            self.reps[r].typing = Some(Typing {
                run,
                forward,
                left: 1 + rng.below(12),
                anchor: None,
            });
        }
        let ch = self.fresh_char();
        let rep = &mut self.reps[r];
        let t = rep.typing.as_mut().expect("set above");
        let at = match t.anchor {
            None => rng.below(rep.doc.len_chars() + 1),
            Some(a) => {
                let i = rep
                    .doc
                    .text()
                    .chars()
                    .position(|c| c == a)
                    .expect("own char");
                if t.forward { i + 1 } else { i }
            }
        };
        let run = t.run;
        self.touch(r, run, at);
        let rep = &mut self.reps[r];
        let ops = rep.doc.insert(&mut rep.alloc, at, &ch.to_string()).unwrap();
        self.run_of.insert(ch, run);
        let t = rep.typing.as_mut().expect("set above");
        t.anchor = Some(ch);
        t.left -= 1;
        if t.left == 0 {
            rep.typing = None;
        }
        self.send(r, ops, rng);
    }

    /// A run typed offline in random order (cursor anywhere inside what it
    /// typed so far), coalesced, then sent.
    fn offline_run(&mut self, r: usize, rng: &mut Rng) {
        let run = self.new_run("offline");
        let start = rng.below(self.reps[r].doc.len_chars() + 1);
        let n = 1 + rng.below(12);
        let mut held: Vec<LocalOp> = Vec::new();
        for k in 0..n {
            let at = start + rng.below(k + 1);
            self.touch(r, run, at);
            let ch = self.fresh_char();
            self.run_of.insert(ch, run);
            let rep = &mut self.reps[r];
            held.extend(rep.doc.insert(&mut rep.alloc, at, &ch.to_string()).unwrap());
        }
        let unsent: HashSet<Pid> = held
            .iter()
            .filter_map(|op| match op {
                LocalOp::Insert(a) => Some(a.pid().clone()),
                LocalOp::Delete(_) => None,
            })
            .collect();
        let rep = &mut self.reps[r];
        let (removed, added) = rep
            .doc
            .coalesce(&mut rep.alloc, |p| unsent.contains(p), false)
            .unwrap();
        let removed: HashSet<Pid> = removed.into_iter().collect();
        let mut ops: Vec<LocalOp> = held
            .into_iter()
            .filter(|op| !matches!(op, LocalOp::Insert(a) if removed.contains(a.pid())))
            .collect();
        if n > 1 {
            // Whatever order it was typed in, it leaves as one run.
            let mut pids: Vec<&Pid> = added.iter().map(|a| a.pid()).collect();
            pids.extend(ops.iter().filter_map(|op| match op {
                LocalOp::Insert(a) => Some(a.pid()),
                LocalOp::Delete(_) => None,
            }));
            pids.sort();
            assert!(
                pids.windows(2)
                    .all(|w| w[0].offset(1).as_ref() == Some(w[1])),
                "an offline run is one run: {pids:?}"
            );
        }
        ops.extend(added.into_iter().map(LocalOp::Insert));
        self.send(r, ops, rng);
    }

    fn delete_base(&mut self, r: usize, rng: &mut Rng) {
        let rep = &mut self.reps[r];
        let text: Vec<char> = rep.doc.text().chars().collect();
        let base: Vec<usize> = (0..text.len()).filter(|&i| text[i].is_ascii()).collect();
        if base.is_empty() {
            return;
        }
        let i = base[rng.below(base.len())];
        let ops = rep.doc.delete(&mut rep.alloc, i..i + 1).unwrap();
        self.send(r, ops, rng);
    }
}

/// See protocol/tests/runs.rs: every run with chars inside `a`'s span must
/// reach `a` through a chain of "typed next to" among the runs there.
fn split_run(runs: &[Option<usize>], touched: &[HashSet<usize>]) -> Option<(usize, usize)> {
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

fn simulate(sites: &[u8], seed: u64, steps: usize) -> Result<(), String> {
    let mut rng = Rng(seed | 1);
    let mut w = World {
        reps: sites
            .iter()
            .map(|&s| Replica {
                doc: Doc::new(9, DocName::default()),
                alloc: Allocator::new(s, 9, seed).unwrap(),
                typing: None,
            })
            .collect(),
        inbox: Vec::new(),
        run_of: HashMap::new(),
        touched: Vec::new(),
        kinds: Vec::new(),
        next_char: 0,
    };
    let base: String = (0..rng.below(10))
        .map(|i| (b'a' + i as u8) as char)
        .collect();
    let rep = &mut w.reps[0];
    let ops = rep.doc.insert(&mut rep.alloc, 0, &base).unwrap();
    for rep in &mut w.reps[1..] {
        for op in &ops {
            apply(&mut rep.doc, op);
        }
    }
    for _ in 0..steps {
        let r = rng.below(w.reps.len());
        match rng.below(20) {
            0..=9 if !w.inbox.is_empty() => {
                let k = rng.below(w.inbox.len());
                let (to, op) = w.inbox.swap_remove(k);
                apply(&mut w.reps[to].doc, &op);
            }
            10 if w.reps[r].typing.is_none() => w.offline_run(r, &mut rng),
            11 => w.delete_base(r, &mut rng),
            _ => w.keystroke(r, &mut rng),
        }
    }
    while !w.inbox.is_empty() {
        let k = rng.below(w.inbox.len());
        let (to, op) = w.inbox.swap_remove(k);
        apply(&mut w.reps[to].doc, &op);
    }
    let text = w.reps[0].doc.text();
    for (i, rep) in w.reps.iter().enumerate() {
        if rep.doc.text() != text {
            return Err(format!("replica {i} diverged"));
        }
    }
    let runs: Vec<Option<usize>> = text.chars().map(|c| w.run_of.get(&c).copied()).collect();
    split_run(&runs, &w.touched).map_or(Ok(()), |(a, b)| {
        Err(format!(
            "{} run {a} split by {} run {b}",
            w.kinds[a], w.kinds[b]
        ))
    })
}

fn sites() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::subsequence(vec![1u8, 2, 3, 6, 7, 8, 9, 100, 254, 255], 3..=5).prop_shuffle()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn doc_replicas_keep_concurrent_runs_whole(sites in sites(), seed: u64, steps in 10usize..200) {
        if let Err(e) = simulate(&sites, seed, steps) {
            prop_assert!(false, "sites {:?}: {}", sites, e);
        }
    }
}

/// The first example, through `Doc`.
#[test]
fn alice_and_bob_append_at_one_spot() {
    let mut a = Doc::new(1, DocName::default());
    let mut al = Allocator::new(1, 1, 1).unwrap();
    let base = a.insert(&mut al, 0, "# Notes\n").unwrap();
    let mut b = Doc::new(1, DocName::default());
    let mut bl = Allocator::new(2, 1, 2).unwrap();
    for op in &base {
        apply(&mut b, op);
    }
    let mut oa = Vec::new();
    for ch in "hello from alice".chars() {
        let n = a.len_chars();
        oa.extend(a.insert(&mut al, n, &ch.to_string()).unwrap());
    }
    let mut ob = Vec::new();
    for ch in "greetings bob".chars() {
        let n = b.len_chars();
        ob.extend(b.insert(&mut bl, n, &ch.to_string()).unwrap());
    }
    for op in &ob {
        apply(&mut a, op);
    }
    for op in oa.iter().rev() {
        apply(&mut b, op);
    }
    assert_eq!(a.text(), b.text());
    assert_eq!(a.text(), "# Notes\nhello from alicegreetings bob");
}

/// friendsforever, one `Doc` per agent (site = agent + 1), each merging the
/// ops of every ancestor transaction before its own, as `parents` say.
#[test]
fn friendsforever_replays_to_its_end_content() {
    let Some(trace) = common::trace::load_trace("friendsforever.json.gz") else {
        return;
    };
    let txns = trace["txns"].as_array().unwrap();
    let agents = trace["numAgents"].as_u64().unwrap() as usize;
    let mut reps: Vec<(Doc, Allocator, HashSet<usize>)> = (0..agents)
        .map(|a| {
            (
                Doc::new(1, DocName::default()),
                Allocator::new(a as u8 + 1, 1, 0).unwrap(),
                HashSet::new(),
            )
        })
        .collect();
    let mut ops: Vec<Vec<LocalOp>> = Vec::with_capacity(txns.len());
    let parents = |t: usize| -> Vec<usize> {
        txns[t]["parents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap() as usize)
            .collect()
    };
    for (t, txn) in txns.iter().enumerate() {
        let (doc, alloc, seen) = &mut reps[txn["agent"].as_u64().unwrap() as usize];
        let mut todo = parents(t);
        let mut missing = Vec::new();
        while let Some(p) = todo.pop() {
            if seen.insert(p) {
                missing.push(p);
                todo.extend(parents(p));
            }
        }
        missing.sort_unstable();
        for p in missing {
            for op in &ops[p] {
                apply(doc, op);
            }
        }
        let mut mine = Vec::new();
        for patch in txn["patches"].as_array().unwrap() {
            let pos = patch[0].as_u64().unwrap() as usize;
            let del = patch[1].as_u64().unwrap() as usize;
            let ins = patch[2].as_str().unwrap();
            if del > 0 {
                mine.extend(doc.delete(alloc, pos..pos + del).unwrap());
            }
            if !ins.is_empty() {
                mine.extend(doc.insert(alloc, pos, ins).unwrap());
            }
        }
        seen.insert(t);
        ops.push(mine);
    }
    for (doc, _, seen) in &mut reps {
        for (t, txn_ops) in ops.iter().enumerate() {
            if !seen.contains(&t) {
                for op in txn_ops {
                    apply(doc, op);
                }
            }
        }
    }
    let end = trace["endContent"].as_str().unwrap();
    let text = reps[0].0.text();
    for (doc, _, _) in &reps {
        assert_eq!(doc.text(), text, "replicas diverged");
    }
    // At char 3,798 agent 0 (site 1) typed ", hu" and agent 1 (site 2)
    // " The" in one gap without seeing each other: two new runs there, and
    // site 1's region sorts first. Agent 0 then saw only the " " of " The"
    // and typed "h?" right after its "u": a forward extension, still before
    // site 2's run. So the trace's order, ", huh? The"; with the sites
    // swapped it would be " The, huh?", both runs whole either way.
    let around: String = text.chars().skip(3798).take(10).collect();
    assert_eq!(around, ", huh? The");
    assert_eq!(text, end);
}
