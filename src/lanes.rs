//! The 16-lane f32 vector of the block kernels (`kernel.rs`), once per instruction set: the same
//! functions, by the same names, in `portable` (plain arrays, which the compiler vectorizes as it
//! can), `avx2` (two 256-bit registers, `lanes_avx2.rs`) and `avx512` (one 512-bit register,
//! `lanes_avx512.rs`), the last two with `std::arch` intrinsics. Every operation is lane-wise
//! IEEE arithmetic with one rounding, or an exact sign flip or lane move, so all give the same
//! bits: no fused multiply-add, no reassociation (tested below against `portable`).
//!
//! In memory a vector is a `Lanes` array; the kernels load it into a `V`, compute, and store it.

pub const LANES: usize = 16;
/// A vector as stored in the scratch buffers.
pub type Lanes = [f32; LANES];
pub const ZERO: Lanes = [0.0; LANES];

/// Masks of the upper lane of each butterfly of stage h = 1, 2, 4, 8 (lane `i` has bit `i`).
const UPPER: [u32; 4] = [0xaaaa, 0xcccc, 0xf0f0, 0xff00];

/// What `unpack` leaves in a block's vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unpacked {
    /// The levels of the codes.
    Levels,
    /// The levels with the transform's stages within each vector done (h = 1, 2, 4, 8).
    LaneTransformed,
    /// A ternary byte is above 242.
    Invalid,
}

/// Plain arrays. Loops over the lanes rather than closures (`std::array::from_fn`): a closure
/// would be one function shared by the kernels of every instruction set, which the compiler
/// may leave out of line, compiled for none of them.
pub mod portable {
    use super::{Lanes, Unpacked, LANES, ZERO};
    use crate::codec::Mode;
    use crate::pack::Tables;

    pub type V = Lanes;

    #[inline(always)]
    pub fn load(a: &Lanes) -> V {
        *a
    }

    #[inline(always)]
    pub fn store(a: &mut Lanes, v: V) {
        *a = v;
    }

    #[inline(always)]
    pub fn splat(x: f32) -> V {
        [x; LANES]
    }

    #[inline(always)]
    pub fn add(a: V, b: V) -> V {
        let mut r = ZERO;
        for (i, r) in r.iter_mut().enumerate() {
            *r = a[i] + b[i];
        }
        r
    }

    #[inline(always)]
    pub fn sub(a: V, b: V) -> V {
        let mut r = ZERO;
        for (i, r) in r.iter_mut().enumerate() {
            *r = a[i] - b[i];
        }
        r
    }

    #[inline(always)]
    pub fn mul(a: V, b: V) -> V {
        let mut r = ZERO;
        for (i, r) in r.iter_mut().enumerate() {
            *r = a[i] * b[i];
        }
        r
    }

    #[inline(always)]
    pub fn abs(a: V) -> V {
        let mut r = ZERO;
        for (i, r) in r.iter_mut().enumerate() {
            *r = a[i].abs();
        }
        r
    }

    /// Negate lane `i` where bit `i` of `bits` is set (exactly a multiplication by -1).
    #[inline(always)]
    pub fn flip(a: V, bits: u32) -> V {
        let mut r = ZERO;
        for (i, r) in r.iter_mut().enumerate() {
            *r = f32::from_bits(a[i].to_bits() ^ ((bits << (31 - i)) & 0x8000_0000));
        }
        r
    }

    /// `a[i] * 3` where bit `i` of `bits` is set, else `a[i] * 1`.
    #[inline(always)]
    pub fn times3(a: V, bits: u32) -> V {
        let mut r = ZERO;
        for (i, r) in r.iter_mut().enumerate() {
            *r = a[i] * if (bits >> i) & 1 == 1 { 3.0 } else { 1.0 };
        }
        r
    }

    /// Lanes whose bit is set keep their value, the others become 0.
    #[inline(always)]
    pub fn select(a: V, bits: u32) -> V {
        let mut r = ZERO;
        for (i, r) in r.iter_mut().enumerate() {
            *r = if (bits >> i) & 1 == 1 { a[i] } else { 0.0 };
        }
        r
    }

    /// Bits of the lanes with `a[i] > t`.
    #[inline(always)]
    pub fn mask_gt(a: V, t: f32) -> u32 {
        let mut m = 0u32;
        for (i, x) in a.iter().enumerate() {
            m |= ((*x > t) as u32) << i;
        }
        m
    }

    /// Bits of the lanes with `a[i] >= 0` (false for NaN).
    #[inline(always)]
    pub fn mask_nonneg(a: V) -> u32 {
        let mut m = 0u32;
        for (i, x) in a.iter().enumerate() {
            m |= ((*x >= 0.0) as u32) << i;
        }
        m
    }

    /// The 16 bytes `if keep { if pos { 2 } else { 0 } } else { 1 }` of the lanes' bits.
    #[inline(always)]
    pub fn trit_codes(keep: u32, pos: u32, out: &mut [u8]) {
        for (i, c) in out[..LANES].iter_mut().enumerate() {
            let (k, p) = ((keep >> i) & 1, (pos >> i) & 1);
            *c = (1 + k * (2 * p) - k) as u8;
        }
    }

    /// The packed codes of a block into its vectors `z`: sign and int2 through tables of the
    /// transform of a byte's levels (`pack::Tables`), combined by the last stages within the
    /// vector (sign: the 8 levels of each half; int2: the 4 of each quarter); ternary as levels,
    /// since the 5 trits of a byte straddle the vectors.
    #[inline(always)]
    pub fn unpack(packed: &[u8], mode: Mode, z: &mut [Lanes]) -> Unpacked {
        let t = Tables::get();
        match mode {
            Mode::Sign => {
                for (zq, b) in z.iter_mut().zip(packed.chunks_exact(2)) {
                    let (lo, hi) = (&t.wht_sign[b[0] as usize], &t.wht_sign[b[1] as usize]);
                    for i in 0..8 {
                        zq[i] = lo[i] + hi[i];
                        zq[i + 8] = lo[i] - hi[i];
                    }
                }
                Unpacked::LaneTransformed
            }
            Mode::Int2 => {
                for (zq, b) in z.iter_mut().zip(packed.chunks_exact(4)) {
                    let q = [0, 1, 2, 3].map(|k| &t.wht_int2[b[k] as usize]);
                    for i in 0..4 {
                        let (s1, d1) = (q[0][i] + q[1][i], q[0][i] - q[1][i]);
                        let (s2, d2) = (q[2][i] + q[3][i], q[2][i] - q[3][i]);
                        zq[i] = s1 + s2;
                        zq[i + 4] = d1 + d2;
                        zq[i + 8] = s1 - s2;
                        zq[i + 12] = d1 - d2;
                    }
                }
                Unpacked::LaneTransformed
            }
            Mode::Ternary => {
                if t.unpack_levels(packed, mode, z.as_flattened_mut()) {
                    Unpacked::Levels
                } else {
                    Unpacked::Invalid
                }
            }
        }
    }

    /// `pack::pack_trits`: the codes `codes[..l]` (with 80 bytes of room past `l`) packed five
    /// to a byte into `out`.
    #[inline(always)]
    pub fn pack_trits(codes: &mut [u8], l: usize, out: &mut [u8]) {
        crate::pack::pack_trits(codes, l, out)
    }

    /// The key words `keys.word(w0 + k)` into `out[k]`.
    #[inline(always)]
    pub fn key_words(keys: &crate::keys::StreamKeys, w0: u32, out: &mut [u32]) {
        keys.fill_words(w0, out)
    }

    /// A hint that the cache line at `p` will be needed soon: none here.
    #[inline(always)]
    pub fn prefetch<T>(_p: *const T) {}

    /// Bit `k` of `lo` to bit `2k`, bit `k` of `hi` to bit `2k + 1` (`k < 16`).
    #[inline(always)]
    pub fn interleave(lo: u32, hi: u32) -> u32 {
        crate::pack::spread_bits(lo) | (crate::pack::spread_bits(hi) << 1)
    }

    /// One stage between lanes `i` and `i + H`: `(a, b) -> (a + b, a - b)`. `H` is a constant
    /// so that the loop unrolls with no branch.
    #[inline(always)]
    fn lane_stage<const H: usize>(v: V) -> V {
        let mut r = ZERO;
        for (i, r) in r.iter_mut().enumerate() {
            *r = if i & H == 0 {
                v[i] + v[i + H]
            } else {
                v[i - H] - v[i]
            };
        }
        r
    }

    /// Walsh-Hadamard stages h = 1, 2, 4, 8 within the vector, in that order.
    #[inline(always)]
    pub fn wht16(v: V) -> V {
        lane_stage::<8>(lane_stage::<4>(lane_stage::<2>(lane_stage::<1>(v))))
    }

    /// The tree sum (docs/FORMAT.md, step 4) of the lanes: halves 8, 4, 2, 1.
    #[inline(always)]
    pub fn hsum(v: V) -> f32 {
        let mut a = [0f32; 8];
        for (i, a) in a.iter_mut().enumerate() {
            *a = v[i] + v[i + 8];
        }
        let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
        let c = [b[0] + b[2], b[1] + b[3]];
        c[0] + c[1]
    }
}

#[cfg(target_arch = "x86_64")]
#[path = "lanes_avx2.rs"]
pub mod avx2;

// AVX-512 target features and intrinsics are stable since Rust 1.89, above the crate's declared
// `rust-version` (the AVX-512 dispatch of the kernels always needed 1.89).
#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
#[path = "lanes_avx512.rs"]
pub mod avx512;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Mode;
    use crate::pack::MAX_TRIT_BYTE;

    fn arr(f: impl Fn(usize) -> f32) -> Lanes {
        std::array::from_fn(f)
    }

    #[test]
    fn portable_wht16_matches_reference() {
        let v = arr(|i| (i as f32 * 0.77).sin() * 1e3 + i as f32 * 1e-3);
        let mut r = v.to_vec();
        crate::hadamard::fwht_reference(&mut r);
        let w = portable::wht16(v);
        assert!(w.iter().zip(&r).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn portable_hsum_is_the_tree_sum() {
        let v = arr(|i| [1e8f32, 1.0, -1e8, 3.5][i % 4] * (i + 1) as f32);
        let mut t = v;
        assert_eq!(
            portable::hsum(v).to_bits(),
            crate::quant::tree_sum(&mut t).to_bits()
        );
    }

    #[test]
    fn portable_masks_and_flip() {
        use portable::*;
        let v = arr(|i| i as f32 - 7.5);
        assert_eq!(mask_nonneg(v), 0xff00);
        assert_eq!(mask_gt(v, 6.0), 0xc000);
        let f = flip(v, 0x0001);
        assert_eq!(f[0], 7.5);
        assert_eq!(&f[1..], &v[1..]);
        assert_eq!(select(v, 0x8000)[15], 7.5);
        assert_eq!(select(v, 0x8000)[14], 0.0);
        assert_eq!(times3(v, 0x8000)[15], 22.5);
        let mut c = [0u8; 16];
        trit_codes(0b0110, 0b1100, &mut c);
        assert_eq!(&c[..5], &[1, 0, 2, 1, 1]);
        assert_eq!(interleave(0b01, 0b11), 0b1011);
    }

    /// Every function of `$m` against the portable one, bit for bit, on a CPU with `$level`.
    macro_rules! matches_portable {
        ($test:ident, $m:ident, $level:expr, $features:literal) => {
            #[cfg(target_arch = "x86_64")]
            #[test]
            fn $test() {
                #[target_feature(enable = $features)]
                fn inner() {
                    use portable as p;
                    use $m as a;
                    let bits = |x: a::V| {
                        let mut o = ZERO;
                        a::store(&mut o, x);
                        o.map(f32::to_bits)
                    };
                    let same = |x: a::V, y: p::V| bits(x) == y.map(f32::to_bits);
                    for seed in 0..50u32 {
                        let v = arr(|i| {
                            let k = (seed as usize * 16 + i) as f32;
                            [(k * 0.37).sin() * 1e3, -0.0, 0.0, 1e-40, 7.0][(seed as usize + i) % 5]
                                * if i % 3 == 0 { -1.0 } else { 1.0 }
                        });
                        let w = arr(|i| ((seed as usize + i) as f32 * 1.3).cos());
                        let m = seed.wrapping_mul(0x9e37_79b9) >> 16;
                        let (av, aw) = (a::load(&v), a::load(&w));
                        assert!(same(a::add(av, aw), p::add(v, w)));
                        assert!(same(a::sub(av, aw), p::sub(v, w)));
                        assert!(same(a::mul(av, aw), p::mul(v, w)));
                        assert!(same(a::abs(av), p::abs(v)));
                        assert!(same(a::flip(av, m), p::flip(v, m)));
                        assert!(same(a::times3(av, m), p::times3(v, m)));
                        assert!(same(a::select(av, m), p::select(v, m)));
                        assert!(same(a::wht16(av), p::wht16(v)));
                        assert!(same(a::splat(v[0]), p::splat(v[0])));
                        assert_eq!(a::hsum(av).to_bits(), p::hsum(v).to_bits());
                        assert_eq!(a::mask_gt(av, w[0]), p::mask_gt(v, w[0]));
                        assert_eq!(a::mask_nonneg(av), p::mask_nonneg(v));
                        let (mut c1, mut c2) = ([0u8; 16], [0u8; 16]);
                        a::trit_codes(m, m >> 3, &mut c1);
                        p::trit_codes(m, m >> 3, &mut c2);
                        assert_eq!(c1, c2);
                        assert_eq!(a::interleave(m, m ^ 0x5a5a), p::interleave(m, m ^ 0x5a5a));
                    }
                    // unpack: every byte value in every position, for every mode; short tails too
                    let bytes: Vec<u8> =
                        (0..=255u8).chain((0..=255u8).rev()).chain(0..80).collect();
                    for mode in [Mode::Ternary, Mode::Int2, Mode::Sign] {
                        for r in [1usize, 4, 5, 6, 64, 65] {
                            let len = crate::pack::packed_len(16 * r, mode);
                            for start in (0..bytes.len() - len).step_by(7) {
                                let mut packed = bytes[start..start + len].to_vec();
                                if mode == Mode::Ternary {
                                    packed.iter_mut().for_each(|b| *b = (*b).min(MAX_TRIT_BYTE));
                                }
                                let (mut za, mut zp) = (vec![ZERO; r], vec![ZERO; r]);
                                let want = p::unpack(&packed, mode, &mut zp);
                                assert_ne!(want, Unpacked::Invalid);
                                assert_eq!(a::unpack(&packed, mode, &mut za), want);
                                assert!(za == zp, "wht {mode:?} r={r} start={start}");
                            }
                        }
                    }
                    // pack_trits: all code patterns of a byte, at every length
                    for l in (1..300usize).chain([1215, 1216, 1300]) {
                        let mut codes: Vec<u8> = (0..l + 80)
                            .map(|i| ((i * 7 + i / 3 + l) % 3) as u8)
                            .collect();
                        codes[..l.min(243 * 5)]
                            .iter_mut()
                            .enumerate()
                            .for_each(|(i, c)| {
                                *c = ((i / 5 * 7 % 243) / 3usize.pow((i % 5) as u32) % 3) as u8
                            });
                        let len = crate::pack::packed_len(l, Mode::Ternary);
                        let (mut oa, mut op) = (vec![0u8; len], vec![0u8; len]);
                        let mut ca = codes.clone();
                        a::pack_trits(&mut ca, l, &mut oa);
                        p::pack_trits(&mut codes, l, &mut op);
                        assert_eq!(oa, op, "l={l}");
                    }
                    // key words, at every length and across the wrap of the word index
                    let keys = crate::keys::StreamKeys::new(11, 12);
                    for (w0, n) in [
                        (0u32, 1usize),
                        (5, 16),
                        (u32::MAX - 20, 40),
                        (1 << 20, 2048),
                    ] {
                        let (mut wa, mut wp) = (vec![0u32; n], vec![0u32; n]);
                        a::key_words(&keys, w0, &mut wa);
                        p::key_words(&keys, w0, &mut wp);
                        assert_eq!(wa, wp);
                    }
                    let mut z = vec![ZERO; 7];
                    let mut packed =
                        vec![MAX_TRIT_BYTE; crate::pack::packed_len(16 * 7, Mode::Ternary)];
                    assert_eq!(a::unpack(&packed, Mode::Ternary, &mut z), Unpacked::Levels);
                    *packed.last_mut().unwrap() = MAX_TRIT_BYTE + 1;
                    assert_eq!(a::unpack(&packed, Mode::Ternary, &mut z), Unpacked::Invalid);
                }
                if crate::simd::detected() as u8 >= $level as u8 {
                    // SAFETY: the CPU has the features (checked above).
                    unsafe { inner() }
                }
            }
        };
    }

    matches_portable!(
        avx2_matches_portable,
        avx2,
        crate::simd::Level::Avx2,
        "avx2,bmi2"
    );
    matches_portable!(
        avx512_matches_portable,
        avx512,
        crate::simd::Level::Avx512,
        "avx512f,avx512bw,avx512vl,bmi2"
    );
}
