//! Counter-based bipolar keys (docs/FORMAT.md, "Keys"). No key is stored: every rank derives
//! the same keys from `(seed, stream, position)`. One hash gives the keys of 32 positions.

/// The "lowbias32" integer hash of C. Wellons: a bijection on u32 with low bias.
#[inline(always)]
pub fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The two per-stream keys `(k1, k2)` derived from a 64-bit seed and a 64-bit stream id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamKeys {
    pub k1: u32,
    pub k2: u32,
}

impl StreamKeys {
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut k1 = mix32((seed as u32) ^ 0x9e37_79b9);
        k1 = mix32(k1 ^ (seed >> 32) as u32);
        k1 = mix32(k1 ^ stream as u32);
        k1 = mix32(k1 ^ (stream >> 32) as u32);
        let k2 = mix32(k1 ^ 0x85eb_ca6b);
        StreamKeys { k1, k2 }
    }

    /// The 32 key bits of positions `32 w .. 32 w + 32`; bit `j` set means key -1.
    #[inline(always)]
    pub fn word(&self, w: u32) -> u32 {
        mix32(mix32(w ^ self.k1).wrapping_add(self.k2))
    }

    /// The key words `word(w0)`, `word(w0 + 1)`, ... into `out` (one per 32 positions).
    #[inline(always)]
    pub fn fill_words(&self, w0: u32, out: &mut [u32]) {
        for (k, o) in out.iter_mut().enumerate() {
            *o = self.word(w0.wrapping_add(k as u32));
        }
    }

    /// The key (+1.0 or -1.0) of padded position `p`.
    pub fn key(&self, p: u64) -> f32 {
        if (self.word((p >> 5) as u32) >> (p & 31)) & 1 == 1 {
            -1.0
        } else {
            1.0
        }
    }
}

/// Multiply `v` (the block starting at padded position `offset`, a multiple of 32) by its keys,
/// in place. A sign flip by XOR is exactly a multiplication by -1.
#[inline(always)]
pub fn bind(v: &mut [f32], keys: &StreamKeys, offset: u64) {
    debug_assert_eq!(offset % 32, 0);
    let w0 = (offset >> 5) as u32;
    let mut chunks = v.chunks_exact_mut(32);
    let mut w = w0;
    for c in &mut chunks {
        let k = keys.word(w);
        for (j, x) in c.iter_mut().enumerate() {
            let bit = (k >> j) & 1;
            *x = f32::from_bits(x.to_bits() ^ (bit << 31));
        }
        w = w.wrapping_add(1);
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let k = keys.word(w);
        for (j, x) in rest.iter_mut().enumerate() {
            let bit = (k >> j) & 1;
            *x = f32::from_bits(x.to_bits() ^ (bit << 31));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix32_known_answers() {
        // Computed from the definition with Python integers.
        assert_eq!(mix32(0), 0);
        assert_eq!(mix32(1), 0x6889_90c0);
        assert_eq!(mix32(0x1234_5678), 0xf5e7_1c96);
    }

    #[test]
    fn keys_are_balanced_and_stream_dependent() {
        let a = StreamKeys::new(0, 0);
        let b = StreamKeys::new(0, 1);
        let c = StreamKeys::new(1, 0);
        assert_ne!(a, b);
        assert_ne!(a, c);
        let n = 1 << 16;
        let ones: i64 = (0..n).map(|p| a.key(p) as i64).sum();
        assert!(ones.abs() < 1000, "keys unbalanced: {ones}");
        let agree: i64 = (0..n).map(|p| (a.key(p) * b.key(p)) as i64).sum();
        assert!(agree.abs() < 1000, "streams correlated: {agree}");
    }

    #[test]
    fn bind_twice_is_identity() {
        let k = StreamKeys::new(7, 9);
        let orig: Vec<f32> = (0..100).map(|i| i as f32 - 50.5).collect();
        let mut v = orig.clone();
        bind(&mut v, &k, 64);
        assert_ne!(v, orig);
        for (i, (a, b)) in v.iter().zip(&orig).enumerate() {
            assert_eq!(*a, b * k.key(64 + i as u64));
        }
        bind(&mut v, &k, 64);
        assert_eq!(v, orig);
    }
}
