//! Replays an editing trace and reports the depth and encoded size of the
//! position ids the allocator makes, and the runs (maximal stretches of
//! consecutive ids) of the final text.
//!
//! cargo run --release -p notesync-protocol --example trace_ids -- \
//!     ../shared/traces/automerge-paper.json.gz [--swap N] [--after-left]
//!
//! Every inserted char becomes its own atom (live typing), deletes leave
//! tombstones, and new ids are allocated between the neighbours in the full
//! sequence (tombstones included), as a real replica must, at the point of
//! a gap of tombstones the SDK's `Doc` would take (see `insert`). The final
//! text is checked against the trace's endContent.
//!
//! - A sequential trace (automerge-paper, seph-blog1) runs on one replica
//!   (site 1); with `--swap N` the typing site alternates between 1 and 2
//!   every N transactions (two authors taking turns in one sequence).
//! - A concurrent trace (`kind: "concurrent"`, friendsforever) runs one
//!   replica per agent (site = agent + 1), each merging the others' ops as
//!   the transactions' `parents` say; `--one-site` replays it on a single
//!   replica in transaction order instead (positions then only match where
//!   the history is linear, so it is not checked against endContent).

use std::collections::HashSet;
use std::io::Read;

use notesync_protocol::{Allocator, Pid};

struct Item {
    pid: Pid,
    ch: char,
    live: bool,
}

/// A chunked list: O(n / CHUNK + CHUNK) to find a live position.
struct Seq {
    chunks: Vec<(Vec<Item>, usize)>,
}

const CHUNK: usize = 512;

impl Seq {
    fn new() -> Self {
        Seq {
            chunks: vec![(Vec::new(), 0)],
        }
    }

    /// (chunk, index) of the `n`-th live item (0-based), or the end.
    fn find_live(&self, mut n: usize) -> (usize, usize) {
        for (c, (items, live)) in self.chunks.iter().enumerate() {
            if n < *live {
                for (i, it) in items.iter().enumerate() {
                    if it.live {
                        if n == 0 {
                            return (c, i);
                        }
                        n -= 1;
                    }
                }
            }
            n -= live;
        }
        self.end()
    }

    /// Where `pid` is (`Ok`) or would go (`Err`).
    fn find_pid(&self, pid: &Pid) -> Result<(usize, usize), (usize, usize)> {
        let c = self
            .chunks
            .partition_point(|(items, _)| items.last().is_some_and(|it| it.pid < *pid));
        if c == self.chunks.len() {
            return Err(self.end());
        }
        self.chunks[c]
            .0
            .binary_search_by(|it| it.pid.cmp(pid))
            .map(|i| (c, i))
            .map_err(|i| (c, i))
    }

    fn end(&self) -> (usize, usize) {
        let c = self.chunks.len() - 1;
        (c, self.chunks[c].0.len())
    }

    fn item(&self, c: usize, i: usize) -> &Item {
        &self.chunks[c].0[i]
    }

    /// The position before (c, i), if any.
    fn prev(&self, c: usize, i: usize) -> Option<(usize, usize)> {
        if i > 0 {
            return Some((c, i - 1));
        }
        (0..c)
            .rev()
            .find(|&k| !self.chunks[k].0.is_empty())
            .map(|k| (k, self.chunks[k].0.len() - 1))
    }

    /// The item before position (c, i) in the full sequence.
    fn before(&self, c: usize, i: usize) -> Option<&Pid> {
        self.prev(c, i).map(|(c, i)| &self.item(c, i).pid)
    }

    fn at(&self, c: usize, i: usize) -> Option<&Pid> {
        if let Some(it) = self.chunks[c].0.get(i) {
            return Some(&it.pid);
        }
        (c + 1..self.chunks.len()).find_map(|k| self.chunks[k].0.first().map(|it| &it.pid))
    }

    fn insert(&mut self, c: usize, i: usize, item: Item) {
        let chunk = &mut self.chunks[c];
        chunk.1 += item.live as usize;
        chunk.0.insert(i, item);
        if chunk.0.len() > 2 * CHUNK {
            let tail = chunk.0.split_off(CHUNK);
            let tail_live = tail.iter().filter(|it| it.live).count();
            chunk.1 -= tail_live;
            self.chunks.insert(c + 1, (tail, tail_live));
        }
    }

    /// Kills the `n`-th live item; returns its id.
    fn delete_live(&mut self, n: usize) -> Pid {
        let (c, i) = self.find_live(n);
        let chunk = &mut self.chunks[c];
        chunk.0[i].live = false;
        chunk.1 -= 1;
        chunk.0[i].pid.clone()
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Insert(pid, ch) => {
                if let Err((c, i)) = self.find_pid(pid) {
                    self.insert(
                        c,
                        i,
                        Item {
                            pid: pid.clone(),
                            ch: *ch,
                            live: true,
                        },
                    );
                }
            }
            Op::Delete(pid) => {
                let (c, i) = self.find_pid(pid).expect("a delete follows its insert");
                let chunk = &mut self.chunks[c];
                if chunk.0[i].live {
                    chunk.0[i].live = false;
                    chunk.1 -= 1;
                }
            }
        }
    }

    fn text(&self) -> String {
        self.chunks
            .iter()
            .flat_map(|(items, _)| items.iter().filter(|it| it.live).map(|it| it.ch))
            .collect()
    }

    /// Maximal stretches of live chars whose ids are consecutive (same
    /// prefix and site, last ident + 1), tombstones between them allowed
    /// when they continue the stretch too.
    fn runs(&self) -> usize {
        let mut runs = 0;
        let mut prev: Option<&Pid> = None;
        for it in self.chunks.iter().flat_map(|(items, _)| items.iter()) {
            let continues = prev.is_some_and(|p| p.offset(1).as_ref() == Some(&it.pid));
            if it.live && !continues {
                runs += 1;
            }
            if it.live || continues {
                prev = Some(&it.pid);
            } else {
                prev = None;
            }
        }
        runs
    }
}

#[derive(Clone)]
enum Op {
    Insert(Pid, char),
    Delete(Pid),
}

#[derive(Default)]
struct Stats {
    n: u64,
    depth_sum: u64,
    max_depth: usize,
    bytes: u64,
    hist: [u64; 16],
}

impl Stats {
    fn add(&mut self, pid: &Pid) {
        self.n += 1;
        self.depth_sum += pid.depth() as u64;
        self.max_depth = self.max_depth.max(pid.depth());
        self.bytes += pid.wire_len() as u64;
        self.hist[pid.depth().min(15)] += 1;
    }
}

/// Whether `left`..`right` lets `alloc` extend a forward run.
fn extends(alloc: &Allocator, left: Option<&Pid>, right: Option<&Pid>) -> bool {
    alloc.forward_extension(left, right).is_some()
}

/// Inserts `ch` at live position `pos` of `seq`; returns the op. `last`
/// is the id this replica inserted last (the SDK's `Doc` rule: typing on
/// after it goes right after it; otherwise, in a gap of tombstones, the
/// rightmost pair that continues a forward run, else before the next live
/// char). With `after_left`, always right after the live char before.
fn insert(
    seq: &mut Seq,
    alloc: &mut Allocator,
    stats: &mut Stats,
    last: &mut Option<Pid>,
    pos: usize,
    ch: char,
    after_left: bool,
) -> Op {
    let (mut c, mut i) = seq.find_live(pos);
    // The leftmost point of the gap of tombstones before (c, i).
    let mut start = (c, i);
    while let Some(p) = seq.prev(start.0, start.1) {
        if seq.item(p.0, p.1).live {
            break;
        }
        start = p;
    }
    let left_char = seq.before(start.0, start.1);
    if after_left || (left_char.is_some() && left_char == last.as_ref()) {
        (c, i) = start;
    } else {
        let mut at = (c, i);
        loop {
            if extends(alloc, seq.before(at.0, at.1), seq.at(at.0, at.1)) {
                (c, i) = at;
                break;
            }
            if at == start {
                break;
            }
            at = seq.prev(at.0, at.1).expect("inside the gap");
        }
    }
    let left = seq.before(c, i).cloned();
    let pid = alloc
        .between(left.as_ref(), seq.at(c, i))
        .expect("allocation");
    stats.add(&pid);
    *last = Some(pid.clone());
    seq.insert(
        c,
        i,
        Item {
            pid: pid.clone(),
            ch,
            live: true,
        },
    );
    Op::Insert(pid, ch)
}

fn load(path: &str) -> serde_json::Value {
    let mut json = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).expect("open trace"))
        .read_to_string(&mut json)
        .expect("gunzip trace");
    serde_json::from_str(&json).expect("trace json")
}

fn patches(txn: &serde_json::Value) -> impl Iterator<Item = (usize, usize, &str)> {
    txn["patches"].as_array().expect("patches").iter().map(|p| {
        (
            p[0].as_u64().expect("pos") as usize,
            p[1].as_u64().expect("del") as usize,
            p[2].as_str().expect("text"),
        )
    })
}

/// A sequential trace on one sequence; the typing site alternates between 1
/// and 2 every `swap` transactions (never, if 0).
fn sequential(trace: &serde_json::Value, swap: usize, after_left: bool) -> (Stats, Seq) {
    let mut seq = Seq::new();
    let mut allocs = [
        Allocator::new(1, 1, 7).unwrap(),
        Allocator::new(2, 1, 8).unwrap(),
    ];
    let mut stats = Stats::default();
    let mut last = None;
    let start = trace["startContent"].as_str().unwrap_or("");
    for (k, ch) in start.chars().enumerate() {
        insert(
            &mut seq,
            &mut allocs[0],
            &mut stats,
            &mut last,
            k,
            ch,
            after_left,
        );
    }
    for (t, txn) in trace["txns"].as_array().expect("txns").iter().enumerate() {
        let who = t.checked_div(swap).map_or(0, |k| k % 2);
        for (pos, del, text) in patches(txn) {
            for _ in 0..del {
                seq.delete_live(pos);
            }
            for (k, ch) in text.chars().enumerate() {
                insert(
                    &mut seq,
                    &mut allocs[who],
                    &mut stats,
                    &mut last,
                    pos + k,
                    ch,
                    after_left,
                );
            }
        }
    }
    (stats, seq)
}

/// A concurrent trace: one replica per agent, merging as `parents` say.
fn concurrent(trace: &serde_json::Value, after_left: bool) -> (Stats, Seq) {
    let txns = trace["txns"].as_array().expect("txns");
    let agents = trace["numAgents"].as_u64().expect("numAgents") as usize;
    let mut reps: Vec<(Seq, Allocator, HashSet<usize>, Option<Pid>)> = (0..agents)
        .map(|a| {
            (
                Seq::new(),
                Allocator::new(a as u8 + 1, 1, 0).unwrap(),
                HashSet::new(),
                None,
            )
        })
        .collect();
    let mut ops: Vec<Vec<Op>> = Vec::with_capacity(txns.len());
    let mut stats = Stats::default();
    for (t, txn) in txns.iter().enumerate() {
        let agent = txn["agent"].as_u64().expect("agent") as usize;
        let (seq, alloc, seen, last) = &mut reps[agent];
        // Merge every ancestor not seen yet, in transaction order.
        let mut todo: Vec<usize> = txn["parents"]
            .as_array()
            .expect("parents")
            .iter()
            .map(|p| p.as_u64().expect("parent") as usize)
            .collect();
        let mut missing = Vec::new();
        while let Some(p) = todo.pop() {
            if seen.insert(p) {
                missing.push(p);
                todo.extend(
                    txns[p]["parents"]
                        .as_array()
                        .expect("parents")
                        .iter()
                        .map(|q| q.as_u64().expect("parent") as usize),
                );
            }
        }
        missing.sort_unstable();
        for p in missing {
            for op in &ops[p] {
                seq.apply(op);
            }
        }
        let mut mine = Vec::new();
        for (pos, del, text) in patches(txn) {
            for _ in 0..del {
                mine.push(Op::Delete(seq.delete_live(pos)));
            }
            for (k, ch) in text.chars().enumerate() {
                mine.push(insert(
                    seq,
                    alloc,
                    &mut stats,
                    last,
                    pos + k,
                    ch,
                    after_left,
                ));
            }
        }
        seen.insert(t);
        ops.push(mine);
    }
    // Every replica merges everything.
    let mut out = Seq::new();
    for txn_ops in &ops {
        for op in txn_ops {
            out.apply(op);
        }
    }
    for (seq, _, seen, _) in &mut reps {
        for (t, txn_ops) in ops.iter().enumerate() {
            if !seen.contains(&t) {
                for op in txn_ops {
                    seq.apply(op);
                }
            }
        }
        assert_eq!(seq.text(), out.text(), "replicas diverged");
    }
    (stats, out)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .expect("usage: trace_ids TRACE.json.gz [--swap N] [--after-left] [--one-site]");
    let mut after_left = false;
    let mut swap = 0usize;
    let mut one_site = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--after-left" => after_left = true,
            "--one-site" => one_site = true,
            "--swap" => swap = args.next().and_then(|v| v.parse().ok()).expect("--swap N"),
            other => panic!("unknown argument {other}"),
        }
    }
    let trace = load(&path);
    let is_concurrent = trace["kind"].as_str() == Some("concurrent");
    let (stats, seq) = if is_concurrent && !one_site {
        concurrent(&trace, after_left)
    } else {
        sequential(&trace, swap, after_left)
    };
    let end = trace["endContent"].as_str().expect("endContent");
    let text = seq.text();
    let matches = text == end;
    if !(is_concurrent && one_site) {
        // A concurrent trace may end with concurrent inserts at one spot in
        // the other order (see client-sdk/tests/trace_concurrent.rs).
        if !is_concurrent {
            assert!(matches, "replay diverged");
        }
    }
    let mode = if is_concurrent && !one_site {
        "one replica per agent".to_string()
    } else if swap > 0 {
        format!("sites 1 and 2 alternating every {swap} txns")
    } else {
        "one replica".to_string()
    };
    println!("trace {path}, {mode}");
    println!(
        "{:>8} {:>10} {:>6} {:>12} {:>8} {:>9}  depth histogram 1..",
        "ids", "mean depth", "max", "mean bytes", "runs", "endContent"
    );
    let h: Vec<String> = stats.hist[1..=stats.max_depth.min(15)]
        .iter()
        .map(|c| c.to_string())
        .collect();
    println!(
        "{:>8} {:>10.3} {:>6} {:>12.2} {:>8} {:>9}  {}",
        stats.n,
        stats.depth_sum as f64 / stats.n as f64,
        stats.max_depth,
        stats.bytes as f64 / stats.n as f64,
        seq.runs(),
        matches,
        h.join(" ")
    );
}
