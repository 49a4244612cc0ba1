//! A small deterministic generator (splitmix64) so every test replays the
//! same operations from its seed.

#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn next_u128(&mut self) -> u128 {
        ((self.next_u64() as u128) << 64) | self.next_u64() as u128
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0);
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u32) -> bool {
        self.next_u64() % 100 < percent as u64
    }

    /// A short piece of text, 1 to 12 bytes, sometimes with multi-byte
    /// characters (never split).
    pub fn word(&mut self) -> String {
        const PIECES: &[&str] = &[
            "a", "b", "note", " ", "sync", "\n", "é", "日本", "ß", "x", "# ", "-", "ok", "🙂", "z",
        ];
        let n = 1 + self.below(3);
        (0..n).map(|_| PIECES[self.below(PIECES.len())]).collect()
    }
}
