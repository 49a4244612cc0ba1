//! Replays an editing trace through one replica and reports the depth and
//! encoded size of the position ids the allocator makes.
//!
//! cargo run --release -p notesync-protocol --example trace_ids -- \
//!     ../shared/traces/automerge-paper.json.gz [--open-divisor N] [--bounded-divisor N] [--alternate] [--after-left] [--docs N]
//!
//! Every inserted char becomes its own atom (live typing), deletes leave
//! tombstones, and new ids are allocated between the neighbours in the full
//! sequence (tombstones included), as a real replica must. The final text is
//! checked against the trace's endContent.

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

    fn end(&self) -> (usize, usize) {
        let c = self.chunks.len() - 1;
        (c, self.chunks[c].0.len())
    }

    /// The item before position (c, i) in the full sequence.
    fn before(&self, c: usize, i: usize) -> Option<&Pid> {
        if i > 0 {
            return Some(&self.chunks[c].0[i - 1].pid);
        }
        (0..c)
            .rev()
            .find_map(|k| self.chunks[k].0.last().map(|it| &it.pid))
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

    fn delete_live(&mut self, n: usize) {
        let (c, i) = self.find_live(n);
        let chunk = &mut self.chunks[c];
        chunk.0[i].live = false;
        chunk.1 -= 1;
    }

    fn text(&self) -> String {
        self.chunks
            .iter()
            .flat_map(|(items, _)| items.iter().filter(|it| it.live).map(|it| it.ch))
            .collect()
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: trace_ids TRACE.json.gz [--open-divisor N] [--bounded-divisor N] [--alternate] [--after-left] [--docs N]");
    let mut after_left = false;
    let mut ndocs = 8u128;
    let mut open_div = notesync_protocol::alloc::DEFAULT_OPEN_DIVISOR;
    let mut bounded_div = notesync_protocol::alloc::DEFAULT_BOUNDED_DIVISOR;
    let mut alternate = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--after-left" => after_left = true,
            "--open-divisor" => {
                open_div = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--open-divisor N")
            }
            "--bounded-divisor" => {
                bounded_div = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--bounded-divisor N")
            }
            "--alternate" => alternate = true,
            "--docs" => ndocs = args.next().and_then(|v| v.parse().ok()).expect("--docs N"),
            other => panic!("unknown argument {other}"),
        }
    }
    let mut json = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&path).expect("open trace"))
        .read_to_string(&mut json)
        .expect("gunzip trace");
    let trace: serde_json::Value = serde_json::from_str(&json).expect("trace json");

    let mut seq = Seq {
        chunks: vec![(Vec::new(), 0)],
    };
    // Several documents: the per-depth strategy is a hash of the document id.
    let docs: Vec<u128> = (1..=ndocs)
        .map(|d| d * 0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
        .collect();
    let mut results = Vec::new();
    for &doc in &docs {
        seq.chunks = vec![(Vec::new(), 0)];
        let mut alloc = Allocator::new(1, doc, 7)
            .unwrap()
            .with_steps(open_div, bounded_div)
            .with_alternation(alternate);
        let (mut n, mut depth_sum, mut max_depth, mut bytes) = (0u64, 0u64, 0usize, 0u64);
        let mut hist = [0u64; 16];
        let mut last: Option<Pid> = None;
        let (mut seq_n, mut seq_deeper, mut jump_n, mut jump_deeper) = (0u64, 0u64, 0u64, 0u64);
        let mut insert = |seq: &mut Seq, pos: usize, ch: char| {
            let (c, i) = if after_left && pos > 0 {
                let (c, i) = seq.find_live(pos - 1);
                (c, i + 1)
            } else {
                seq.find_live(pos)
            };
            let left = seq.before(c, i).cloned();
            let pid = alloc
                .between(left.as_ref(), seq.at(c, i))
                .expect("allocation");
            let ld = left.as_ref().map_or(0, |l| l.depth());
            if left.is_some() && left == last {
                seq_n += 1;
                seq_deeper += (pid.depth() > ld) as u64;
            } else {
                jump_n += 1;
                jump_deeper += (pid.depth() > ld) as u64;
            }
            last = Some(pid.clone());
            n += 1;
            depth_sum += pid.depth() as u64;
            max_depth = max_depth.max(pid.depth());
            bytes += pid.wire_len() as u64;
            hist[pid.depth().min(15)] += 1;
            seq.insert(
                c,
                i,
                Item {
                    pid,
                    ch,
                    live: true,
                },
            );
        };
        let start: Vec<char> = trace["startContent"]
            .as_str()
            .unwrap_or("")
            .chars()
            .collect();
        for (k, ch) in start.into_iter().enumerate() {
            insert(&mut seq, k, ch);
        }
        for txn in trace["txns"].as_array().expect("txns") {
            for patch in txn["patches"].as_array().expect("patches") {
                let pos = patch[0].as_u64().expect("pos") as usize;
                let del = patch[1].as_u64().expect("del") as usize;
                for _ in 0..del {
                    seq.delete_live(pos);
                }
                for (k, ch) in patch[2].as_str().expect("text").chars().enumerate() {
                    insert(&mut seq, pos + k, ch);
                }
            }
        }
        if std::env::var("DEBUG_IDS").is_ok() {
            eprintln!(
                "sequential inserts {seq_n} (deeper than left: {seq_deeper}), jumps {jump_n} (deeper: {jump_deeper})"
            );
        }
        assert_eq!(
            seq.text(),
            trace["endContent"].as_str().expect("endContent"),
            "replay diverged"
        );
        results.push((
            doc,
            n,
            depth_sum as f64 / n as f64,
            max_depth,
            bytes as f64 / n as f64,
            hist,
        ));
    }
    println!(
        "trace {path}, open divisor {open_div}, bounded divisor {bounded_div}, alternation {alternate}, insert {}",
        if after_left {
            "after left live char"
        } else {
            "before next live char"
        }
    );
    println!(
        "{:>34} {:>8} {:>10} {:>6} {:>12}  depth histogram 1..",
        "document", "ids", "mean depth", "max", "mean bytes"
    );
    for (doc, n, mean, max, b, hist) in &results {
        let h: Vec<String> = hist[1..=max.min(&15).to_owned()]
            .iter()
            .map(|c| c.to_string())
            .collect();
        println!(
            "{doc:>34x} {n:>8} {mean:>10.3} {max:>6} {b:>12.2}  {}",
            h.join(" ")
        );
    }
    let k = results.len() as f64;
    println!(
        "mean over documents: depth {:.3}, bytes {:.2}; worst max depth {}",
        results.iter().map(|r| r.2).sum::<f64>() / k,
        results.iter().map(|r| r.4).sum::<f64>() / k,
        results.iter().map(|r| r.3).max().unwrap_or(0)
    );
}
