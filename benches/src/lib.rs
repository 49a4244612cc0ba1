//! Benchmarks live in benches/benches; this library makes their inputs,
//! and [`load`] is the load generator behind `notesync-bench`.
//!
//! Everything is deterministic (a fixed-seed splitmix64), so runs compare.

pub mod load;

use bytes::Bytes;
use notesync_protocol::*;

/// A small deterministic generator (splitmix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A position id as typing makes them: depth 1 (60%), 2 (30%) or 3 (10%),
/// with a creator site of 1..=20 and small, growing idents.
pub fn typed_pid(rng: &mut Rng, i: u32) -> Pid {
    let depth = match rng.below(10) {
        0..=5 => 1,
        6..=8 => 2,
        _ => 3,
    };
    let creator = 1 + rng.below(20) as u8;
    let mut levels = Vec::with_capacity(depth);
    for d in 0..depth - 1 {
        // Outer levels: an earlier ident, any site (0 included: fillers).
        let ident = i.saturating_sub(rng.below(1000) as u32 + d as u32);
        levels.push(Level::new(ident, rng.below(21) as u8));
    }
    levels.push(Level::new(i.wrapping_mul(4) + rng.below(4) as u32, creator));
    Pid::from_levels(&levels)
}

/// One character of typed text: mostly ASCII letters and spaces, about 3%
/// two- or three-byte characters.
pub fn typed_char(rng: &mut Rng) -> &'static str {
    const ASCII: &[&str] = &[
        "e", "t", "a", "o", "i", "n", " ", "s", "h", "r", "d", "l", "u", " ", "c", "m", "\n", ".",
    ];
    match rng.below(100) {
        0 => "é",
        1 => "ü",
        2 => "€",
        _ => ASCII[rng.below(ASCII.len() as u64) as usize],
    }
}

/// Text of exactly `len` bytes (ASCII, with a two-byte character now and
/// then, never split).
pub fn typed_text(rng: &mut Rng, len: usize) -> String {
    let mut s = String::with_capacity(len);
    while s.len() < len {
        let c = typed_char(rng);
        if s.len() + c.len() <= len {
            s.push_str(c);
        } else {
            s.push('x');
        }
    }
    s
}

/// A sync_doc_upsert of `atoms` inserts. `atom_bytes == 1`: one typed
/// character per atom (the fine-grained case); otherwise coalesced atoms of
/// `atom_bytes` bytes of text each. 100 deletes ride along.
pub fn upsert(atoms: usize, atom_bytes: usize, seed: u64) -> ClientFrame {
    let mut rng = Rng::new(seed);
    let mut ins = AtomListBuilder::new();
    for i in 0..atoms {
        let pid = typed_pid(&mut rng, i as u32);
        let data = if atom_bytes == 1 {
            typed_char(&mut rng).to_owned()
        } else {
            typed_text(&mut rng, atom_bytes)
        };
        ins.push_parts(&data, &pid).expect("valid atom");
    }
    let mut del = PidListBuilder::new();
    for i in 0..100 {
        del.push(&typed_pid(&mut rng, i)).expect("valid id");
    }
    ClientFrame::Upsert(Upsert {
        doc: 0x5eed_0000_0000_0000_0000_0000_0000_0001,
        name: DocName::new("benchmark notes").expect("valid name"),
        since: 1_700_000_000_000_000,
        inserts: ins.finish(),
        deletes: del.finish(),
    })
}

/// The parts of an upsert's atoms, to measure building the list too.
pub fn atom_parts(frame: &ClientFrame) -> Vec<(String, Pid)> {
    let ClientFrame::Upsert(u) = frame else {
        panic!("not an upsert");
    };
    u.inserts
        .iter()
        .map(|a| (a.data.to_owned(), a.pid.to_pid()))
        .collect()
}

/// `n` session_insert frames, one typed character each, back to back.
pub fn session_inserts(n: usize, seed: u64) -> Bytes {
    let mut rng = Rng::new(seed);
    let mut out = bytes::BytesMut::new();
    for i in 0..n {
        let atom = Atom::new(typed_char(&mut rng), typed_pid(&mut rng, i as u32)).expect("atom");
        ClientFrame::Insert(SessionInsert::new(atom)).encode(&mut out);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn inputs_decode_back() {
        for (atoms, len) in [(1000, 1), (100, 200)] {
            let f = upsert(atoms, len, 1);
            let wire = f.to_bytes();
            let mut buf = BytesMut::from(&wire[..]);
            let got = FrameDecoder::<ClientFrame>::default()
                .decode(&mut buf)
                .unwrap()
                .unwrap();
            assert_eq!(got, f);
            assert!(buf.is_empty());
            assert_eq!(atom_parts(&f).len(), atoms);
        }
        let stream = session_inserts(1000, 2);
        let mut buf = BytesMut::from(&stream[..]);
        let mut dec = FrameDecoder::<ClientFrame>::default();
        let mut n = 0;
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            assert!(matches!(f, ClientFrame::Insert(_)));
            n += 1;
        }
        assert_eq!(n, 1000);
        assert!(buf.is_empty());
    }
}
