//! A seeded generator for the randomized property tests of the library's own modules (the
//! integration tests have theirs in `tests/common`): deterministic, the seed printed, and
//! `FUZZ_SEED=<n>` to run another.

/// The seed of a randomized test: FUZZ_SEED when set, else `default`; printed so that a failure
/// (or `--nocapture`) shows how to reproduce it.
pub fn prop_seed(default: u64) -> u64 {
    let seed = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    eprintln!("FUZZ_SEED={seed}");
    seed
}

/// xorshift64: small and deterministic.
pub struct PropRng(u64);

impl PropRng {
    /// A generator from `seed` (zero, which xorshift cannot leave, taken as one).
    pub fn new(seed: u64) -> PropRng {
        PropRng(seed.max(1))
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        if n == 0 { 0 } else { (self.0 % n as u64) as usize }
    }

    /// One of `xs`.
    pub fn pick<'a, T: ?Sized>(&mut self, xs: &[&'a T]) -> &'a T {
        xs[self.below(xs.len())]
    }

    /// A char boundary of `s`, uniformly over its bytes (moved back to the char's start).
    pub fn boundary(&mut self, s: &str) -> usize {
        let mut at = self.below(s.len() + 1);
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        at
    }
}
