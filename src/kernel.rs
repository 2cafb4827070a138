//! The per-block kernels of the codec: `analyze` (docs/FORMAT.md steps 1-5 and packing: the
//! scale and packed codes of one block) and `synth` (step 6: the decoded block, handed to a
//! `Sink` that stores it or turns it into the residual of step 7).
//!
//! Blocks of 128 elements or more run as 16-lane vectors, in few passes over the block while it
//! sits in L1: load, bind and the stages h = 1..64 in registers; the remaining stages three to a
//! pass; then one pass per sum of the quantizer, which packs the codes on its way. The vector
//! kernels are written once (`vector_kernels!`) and compiled per instruction set against the
//! same-named functions of `lanes::portable`, `lanes::avx2` or `lanes::avx512`. The decoder
//! takes the stages within a vector from tables and runs the rest from the largest stride down,
//! which the exact integer arithmetic of its transform allows. Smaller blocks (only a vector's
//! tail can be one) take the literal path of `hadamard::fwht`, `quant::quantize` and
//! `pack::pack`, which the vector path matches bit for bit (tested below).

use crate::codec::{CodecError, Mode};
use crate::elem::Elem;
use crate::hadamard::fwht;
use crate::keys::{bind, StreamKeys};
use crate::lanes::{Lanes, LANES, ZERO};
use crate::pack::{pack, Tables};
use crate::quant::quantize;
use crate::simd;

/// Blocks ahead that the kernels prefetch: the lines of the next block (in the worker's
/// direction) come in while this one computes; a block is a 4 KiB page at the default size, which
/// the hardware prefetchers do not cross.
const PF_AHEAD: usize = 1;

/// Smallest block of the vector path: one group of 8 vectors.
pub const MIN_VEC_BLOCK: usize = 8 * LANES;

/// Scratch buffers of one worker, for blocks of up to `block` elements.
pub struct Scratch {
    /// The block, as vectors (flattened by the literal path's unpacking).
    z: Vec<Lanes>,
    /// Partial tree sums, up to one per 2 vectors.
    parts: Vec<Lanes>,
    /// Key words, one per 32 positions.
    words: Vec<u32>,
    /// One code per element, and 80 bytes of room for `pack_trits`.
    codes: Vec<u8>,
    /// `u` of a tail block, zero-padded; `xhat` of a tail block (allocated at the first tail).
    staged: Vec<f32>,
    /// Scratch of the literal path (allocated at its first block).
    tmp: Vec<f32>,
    /// The order the worker visits its blocks in: +1 forward, -1 backward (for prefetching).
    direction: isize,
    /// int2's scale: unbiased (`|z|^2 / <z, m>`) instead of least squares (`quant::quantize`).
    unbiased: bool,
}

impl Scratch {
    pub fn new(block: usize) -> Self {
        let r = block.div_ceil(LANES);
        Scratch {
            z: vec![ZERO; r],
            parts: vec![ZERO; r.div_ceil(2)],
            words: vec![0; block.div_ceil(32)],
            codes: vec![0; block + 80],
            staged: Vec::new(),
            tmp: Vec::new(),
            direction: 1,
            unbiased: false,
        }
    }

    /// This scratch with int2's scale chosen by `unbiased` (`Params::unbiased`).
    pub fn with_unbiased(self, unbiased: bool) -> Self {
        Scratch { unbiased, ..self }
    }

    /// Scratch for a worker that visits its blocks from the last to the first.
    pub fn backward(block: usize) -> Self {
        Scratch {
            direction: -1,
            ..Scratch::new(block)
        }
    }
}

/// Where `synth` puts the decoded block `xhat`.
pub enum Sink<'a, T> {
    /// `out[i] = cast(xhat[i])`: the decoder.
    Out(&'a mut [T]),
    /// `e[i] = cast((x[i] + e[i]) - xhat[i])`: the residual of error feedback.
    Residual(&'a [T], &'a mut [T]),
}

/// The tree sum of the vectors `$f` for `$i` in `0..$r` (`$r >= 8`, a power of two),
/// evaluating `$f` once for each. The first three levels of the tree pair vectors `r/2`, `r/4`
/// and `r/8` apart, so the eight vectors `i + k r/8` sum in registers into one partial; the
/// partials (`$parts`) are then halved in place, and the last one's lanes summed. The same
/// additions as `quant::tree_sum`, so the same result. It calls the lane functions (`splat`,
/// `add`, `store`) and `halve_all` of the module it expands in.
macro_rules! tree_sum_by {
    ($r:expr, $parts:expr, |$i:ident| $f:expr) => {{
        let g = $r / 8;
        let parts = &mut $parts[..g];
        for (i0, p) in parts.iter_mut().enumerate() {
            let mut a = [splat(0.0); 8];
            for (k, a) in a.iter_mut().enumerate() {
                let $i = i0 + k * g;
                *a = $f;
            }
            store(p, tree8(&a));
        }
        halve_all(parts)
    }};
}

/// The vector kernels, written against the lane functions in scope (`V`, `load`, `add`, ...),
/// each function carrying the attributes given (the instruction set's `target_feature`).
macro_rules! vector_kernels {
    ($(#[$attr:meta])*) => {
        use crate::codec::{CodecError, Mode};
        use crate::elem::Elem;
        use crate::hadamard::RADIX8_PAIRS;
        use crate::keys::StreamKeys;
        use crate::lanes::{Lanes, Unpacked, LANES};
        use crate::quant::{unbiased_scale, INT2_TAU2, TERNARY_TAU};

        use super::{First, Scratch, Sink, PF_AHEAD};

        /// Elements of one group of 8 vectors.
        const GROUP: usize = 8 * LANES;

        /// The bind bits of vector `i` of a block, from its key words.
        #[inline(always)]
        fn vec_bits(words: &[u32], i: usize) -> u32 {
            words[i / 2] >> (16 * (i & 1))
        }

        /// Three stages (pairs `k, k+1`, then `k, k+2`, then `k, k+4`) across 8 vectors.
        $(#[$attr])*
        fn radix8(a: &mut [V; 8]) {
            for (i, j) in RADIX8_PAIRS {
                let (p, q) = (a[i], a[j]);
                a[i] = add(p, q);
                a[j] = sub(p, q);
            }
        }

        /// Two stages across 4 vectors, one across 2: the first pairs of `RADIX8_PAIRS`.
        $(#[$attr])*
        fn radix4(a: &mut [V; 4]) {
            for (i, j) in [(0, 1), (2, 3), (0, 2), (1, 3)] {
                let (p, q) = (a[i], a[j]);
                a[i] = add(p, q);
                a[j] = sub(p, q);
            }
        }

        /// The first three levels of a tree sum over vectors `i + k r/8`, `a[k]`.
        $(#[$attr])*
        fn tree8(a: &[V; 8]) -> V {
            add(add(add(a[0], a[4]), add(a[2], a[6])), add(add(a[1], a[5]), add(a[3], a[7])))
        }

        /// The tree sum of the vectors `v` (a power of two of them), then of the last one's
        /// lanes.
        $(#[$attr])*
        fn halve_all(v: &mut [Lanes]) -> f32 {
            let mut len = v.len();
            while len > 1 {
                let h = len / 2;
                let (a, b) = v[..len].split_at_mut(h);
                for (x, y) in a.iter_mut().zip(b.iter()) {
                    store(x, add(load(x), load(y)));
                }
                len = h;
            }
            hsum(load(&v[0]))
        }

        /// A radix-8 pass over `z` at vector stride `h`: stages 16 h, 32 h and 64 h.
        $(#[$attr])*
        fn pass8(z: &mut [Lanes], h: usize) {
            for g in z.chunks_exact_mut(8 * h) {
                for i in 0..h {
                    let mut a = [splat(0.0); 8];
                    for (k, a) in a.iter_mut().enumerate() {
                        *a = load(&g[i + k * h]);
                    }
                    radix8(&mut a);
                    for (k, a) in a.iter().enumerate() {
                        store(&mut g[i + k * h], *a);
                    }
                }
            }
        }

        /// `first` of vector `v` (vector `i` of the block), storing its sign bits if asked.
        $(#[$attr])*
        fn reduce(v: V, first: First, sign: &mut Option<&mut [u8]>, i: usize) -> V {
            if let Some(packed) = sign {
                let m = mask_nonneg(v) as u16;
                packed[2 * i..2 * i + 2].copy_from_slice(&m.to_le_bytes());
            }
            match first {
                First::Abs => abs(v),
                First::Square => mul(v, v),
            }
        }

        /// The stages between vectors from vector stride 8 on (ascending, three to a pass), and
        /// the tree sum of `first(z)` over the block in their last pass: the vectors a pass
        /// holds together, `i + k r/2^s` for its `s` stages, are those that the first `s` levels
        /// of the tree sum pair. With `sign`, also the sign bits of z (the packed codes of the
        /// sign mode).
        $(#[$attr])*
        fn stages_and_sum(
            z: &mut [Lanes],
            parts: &mut [Lanes],
            first: First,
            mut sign: Option<&mut [u8]>,
        ) -> f32 {
            let n = z.len();
            let mut h = 8;
            let stages = (n / h).trailing_zeros();
            if stages == 0 {
                return tree_sum_by!(n, parts, |i| reduce(load(&z[i]), first, &mut sign, i));
            }
            let last = match stages % 3 {
                0 => 3,
                s => s,
            };
            for _ in 0..(stages - last) / 3 {
                pass8(z, h);
                h *= 8;
            }
            let parts = &mut parts[..h];
            for (i, p) in parts.iter_mut().enumerate() {
                let f = match last {
                    3 => {
                        let mut a = [splat(0.0); 8];
                        for (k, a) in a.iter_mut().enumerate() {
                            *a = load(&z[i + k * h]);
                        }
                        radix8(&mut a);
                        let mut f = [splat(0.0); 8];
                        for (k, (a, f)) in a.iter().zip(f.iter_mut()).enumerate() {
                            store(&mut z[i + k * h], *a);
                            *f = reduce(*a, first, &mut sign, i + k * h);
                        }
                        tree8(&f)
                    }
                    2 => {
                        let mut a = [splat(0.0); 4];
                        for (k, a) in a.iter_mut().enumerate() {
                            *a = load(&z[i + k * h]);
                        }
                        radix4(&mut a);
                        let mut f = [splat(0.0); 4];
                        for (k, (a, f)) in a.iter().zip(f.iter_mut()).enumerate() {
                            store(&mut z[i + k * h], *a);
                            *f = reduce(*a, first, &mut sign, i + k * h);
                        }
                        add(add(f[0], f[2]), add(f[1], f[3]))
                    }
                    _ => {
                        let (a, b) = (load(&z[i]), load(&z[i + h]));
                        let (a, b) = (add(a, b), sub(a, b));
                        store(&mut z[i], a);
                        store(&mut z[i + h], b);
                        add(reduce(a, first, &mut sign, i), reduce(b, first, &mut sign, i + h))
                    }
                };
                store(p, f);
            }
            halve_all(parts)
        }

        /// Steps 1-3 up to the stages between vectors: `u = x (+ e)`, bound, and the stages
        /// h = 1..64 in registers, 8 vectors at a time, into `z`.
        $(#[$attr])*
        fn spread<T: Elem>(
            x: &[T],
            e: Option<&[T]>,
            ahead: isize,
            words: &[u32],
            z: &mut [Lanes],
        ) {
            for (g, zg) in z.chunks_exact_mut(8).enumerate() {
                let xg = &x[GROUP * g..][..GROUP];
                let eg = e.map(|e| &e[GROUP * g..][..GROUP]);
                let mut a = [splat(0.0); 8];
                for (k, a) in a.iter_mut().enumerate() {
                    let pf = ahead + (LANES * k) as isize;
                    prefetch(xg.as_ptr().wrapping_offset(pf));
                    let xv = load(&T::load16(&xg[LANES * k..]));
                    let u = match eg {
                        Some(eg) => {
                            prefetch(eg.as_ptr().wrapping_offset(pf));
                            add(xv, load(&T::load16(&eg[LANES * k..])))
                        }
                        None => xv,
                    };
                    *a = wht16(flip(u, vec_bits(words, 8 * g + k)));
                }
                radix8(&mut a);
                for (zk, a) in zg.iter_mut().zip(a) {
                    store(zk, a);
                }
            }
        }

        /// `quant::quantize` and `pack::pack` of the block `z`, spread up to its stages between
        /// vectors, which run here with the first sum; the packed codes go to `packed`. The
        /// scale, or `None` if a sum is not finite.
        $(#[$attr])*
        fn quantize(
            z: &mut [Lanes],
            mode: Mode,
            unbiased: bool,
            parts: &mut [Lanes],
            codes: &mut [u8],
            packed: &mut [u8],
        ) -> Option<f32> {
            let r = z.len();
            let l = r * LANES;
            let lf = l as f32;
            match mode {
                Mode::Ternary => {
                    let s = stages_and_sum(z, parts, First::Abs, None);
                    if !s.is_finite() {
                        return None;
                    }
                    let thr = TERNARY_TAU * (s / lf);
                    let mut cnt = 0u32;
                    let sel = tree_sum_by!(r, parts, |i| {
                        let v = load(&z[i]);
                        let a = abs(v);
                        let keep = mask_gt(a, thr);
                        cnt += keep.count_ones();
                        // sign(z) + 1 when kept, else 1 (z != 0 when kept, since thr >= 0).
                        trit_codes(keep, mask_gt(v, 0.0), &mut codes[LANES * i..]);
                        select(a, keep)
                    });
                    pack_trits(codes, l, packed);
                    if cnt == 0 {
                        return Some(0.0);
                    }
                    Some((sel / cnt as f32) / lf)
                }
                Mode::Sign => {
                    let s = stages_and_sum(z, parts, First::Abs, Some(packed));
                    if !s.is_finite() {
                        return None;
                    }
                    Some((s / lf) / lf)
                }
                Mode::Int2 => {
                    let q2 = stages_and_sum(z, parts, First::Square, None);
                    if !q2.is_finite() {
                        return None;
                    }
                    // As in `quant::quantize`: the Gaussian-optimal split, then one Lloyd step.
                    // TS(m * m) sums ones and nines exactly (every partial sum is an integer
                    // below 2^24), so it is L + 8 #big.
                    let thr2 = INT2_TAU2 * (q2 / lf);
                    let mut nbig = 0u32;
                    let num = tree_sum_by!(r, parts, |i| {
                        let v = load(&z[i]);
                        let big = mask_gt(mul(v, v), thr2);
                        nbig += big.count_ones();
                        times3(abs(v), big)
                    });
                    let den = (l as u32 + 8 * nbig) as f32;
                    let thr = 2.0 * (num / den);
                    let mut nbig = 0u32;
                    let num = tree_sum_by!(r, parts, |i| {
                        let v = load(&z[i]);
                        let a = abs(v);
                        let big = mask_gt(a, thr);
                        let nonneg = mask_nonneg(v);
                        nbig += big.count_ones();
                        // int2_code: bit 1 is z >= 0, bit 0 is (z >= 0) == big.
                        let w = interleave(!(nonneg ^ big) & 0xffff, nonneg);
                        packed[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
                        times3(a, big)
                    });
                    let den = (l as u32 + 8 * nbig) as f32;
                    Some(if unbiased { unbiased_scale(q2, num, lf) } else { (num / den) / lf })
                }
            }
        }

        /// Steps 1-5 on a full block of `l >= MIN_VEC_BLOCK` elements `x` (plus `e`).
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        pub fn analyze<T: Elem>(
            x: &[T],
            e: Option<&[T]>,
            l: usize,
            offset: u64,
            keys: &StreamKeys,
            mode: Mode,
            s: &mut Scratch,
            data: &mut [u8],
        ) -> Option<f32> {
            let r = l / LANES;
            let z = &mut s.z[..r];
            let words = &mut s.words[..l / 32];
            key_words(keys, (offset >> 5) as u32, words);
            spread(x, e, s.direction * (PF_AHEAD * l) as isize, words, z);
            quantize(z, mode, s.unbiased, &mut s.parts, &mut s.codes, data)
        }

        /// Step 6 on a full block of `l >= MIN_VEC_BLOCK` elements, into `sink`. The transform
        /// of the integer levels is exact in f32 whatever the order of its additions (every
        /// partial sum is an integer below 3 l <= 2^18): the stages within a vector come from
        /// tables at unpacking (sign, int2), the stages between vectors run from the largest
        /// stride down, and the last pass (strides 1, 2, 4: 8 vectors in a row, and the stages
        /// within each vector for ternary) is fused with the scale, the bind and the sink.
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        pub fn synth<T: Elem>(
            data: &[u8],
            scale: f32,
            l: usize,
            offset: u64,
            keys: &StreamKeys,
            mode: Mode,
            s: &mut Scratch,
            sink: Sink<'_, T>,
        ) -> Result<(), CodecError> {
            let r = l / LANES;
            let z = &mut s.z[..r];
            let in_vector = match unpack(data, mode, z) {
                Unpacked::Invalid => return Err(CodecError::Corrupt("a ternary byte is above 242")),
                Unpacked::Levels => true,
                Unpacked::LaneTransformed => false,
            };
            let words = &mut s.words[..l / 32];
            key_words(keys, (offset >> 5) as u32, words);
            let mut h = 8;
            while 8 * h <= r {
                pass8(z, h);
                h *= 8;
            }
            if 4 * h <= r {
                for i in 0..h {
                    let mut a = [splat(0.0); 4];
                    for (k, a) in a.iter_mut().enumerate() {
                        *a = load(&z[i + k * h]);
                    }
                    radix4(&mut a);
                    for (k, a) in a.iter().enumerate() {
                        store(&mut z[i + k * h], *a);
                    }
                }
            } else if 2 * h <= r {
                let (lo, hi) = z.split_at_mut(h);
                for (p, q) in lo.iter_mut().zip(hi.iter_mut()) {
                    let (a, b) = (load(p), load(q));
                    store(p, add(a, b));
                    store(q, sub(a, b));
                }
            }
            let sv = splat(scale);
            let ahead = s.direction * (PF_AHEAD * l) as isize;
            let mut buf = [0f32; LANES];
            match sink {
                Sink::Out(out) => {
                    let groups = z.chunks_exact(8).zip(out.chunks_exact_mut(GROUP));
                    for (g, (zg, og)) in groups.enumerate() {
                        let xhat = synth8(zg, g, words, sv, in_vector);
                        for (o, v) in og.chunks_exact_mut(LANES).zip(xhat) {
                            prefetch(o.as_ptr().wrapping_offset(ahead));
                            store(&mut buf, v);
                            T::store16(o, buf);
                        }
                    }
                }
                Sink::Residual(x, e) => {
                    let groups = z.chunks_exact(8).zip(x.chunks_exact(GROUP));
                    let groups = groups.zip(e.chunks_exact_mut(GROUP));
                    for (g, ((zg, xg), eg)) in groups.enumerate() {
                        let xhat = synth8(zg, g, words, sv, in_vector);
                        for k in 0..8 {
                            let pf = ahead + (LANES * k) as isize;
                            prefetch(xg.as_ptr().wrapping_offset(pf));
                            prefetch(eg.as_ptr().wrapping_offset(pf));
                            let xk = &xg[LANES * k..][..LANES];
                            let ek = &mut eg[LANES * k..][..LANES];
                            let u = add(load(&T::load16(xk)), load(&T::load16(ek)));
                            store(&mut buf, sub(u, xhat[k]));
                            T::store16(ek, buf);
                        }
                    }
                }
            }
            Ok(())
        }

        /// The stages between the 8 vectors in a row of group `g` (strides 1, 2, 4), and those
        /// within each vector if `in_vector`, scaled and bound: `xhat` of vectors `8 g..8 g + 8`.
        $(#[$attr])*
        fn synth8(zg: &[Lanes], g: usize, words: &[u32], scale: V, in_vector: bool) -> [V; 8] {
            let mut a = [splat(0.0); 8];
            for (a, zk) in a.iter_mut().zip(zg) {
                *a = if in_vector { wht16(load(zk)) } else { load(zk) };
            }
            radix8(&mut a);
            for (k, a) in a.iter_mut().enumerate() {
                *a = flip(mul(*a, scale), vec_bits(words, 8 * g + k));
            }
            a
        }
    };
}

/// The first sum of a quantizer: of |z| (ternary, sign) or of z^2 (int2).
#[derive(Clone, Copy)]
enum First {
    Abs,
    Square,
}

mod portable_kernels {
    use crate::lanes::portable::*;
    vector_kernels!(#[inline(always)]);
}

#[cfg(target_arch = "x86_64")]
mod avx2_kernels {
    use crate::lanes::avx2::*;
    vector_kernels!(#[inline] #[target_feature(enable = "avx2,fma,bmi2,popcnt")]);
}

#[cfg(target_arch = "x86_64")]
mod avx512_kernels {
    use crate::lanes::avx512::*;
    vector_kernels!(
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,bmi2,popcnt")]
    );
}

/// `analyze` of the vector path at the active instruction set.
#[allow(clippy::too_many_arguments)]
fn analyze_vec<T: Elem>(
    x: &[T],
    e: Option<&[T]>,
    l: usize,
    offset: u64,
    keys: &StreamKeys,
    mode: Mode,
    s: &mut Scratch,
    data: &mut [u8],
) -> Option<f32> {
    match simd::level() {
        // SAFETY: the level is only ever set to one the CPU reported (`simd::set_level`).
        #[cfg(target_arch = "x86_64")]
        simd::Level::Avx512 => unsafe {
            avx512_kernels::analyze(x, e, l, offset, keys, mode, s, data)
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        simd::Level::Avx2 => unsafe { avx2_kernels::analyze(x, e, l, offset, keys, mode, s, data) },
        _ => portable_kernels::analyze(x, e, l, offset, keys, mode, s, data),
    }
}

/// `synth` of the vector path at the active instruction set.
#[allow(clippy::too_many_arguments)]
fn synth_vec<T: Elem>(
    data: &[u8],
    scale: f32,
    l: usize,
    offset: u64,
    keys: &StreamKeys,
    mode: Mode,
    s: &mut Scratch,
    sink: Sink<'_, T>,
) -> Result<(), CodecError> {
    match simd::level() {
        // SAFETY: the level is only ever set to one the CPU reported (`simd::set_level`).
        #[cfg(target_arch = "x86_64")]
        simd::Level::Avx512 => unsafe {
            avx512_kernels::synth(data, scale, l, offset, keys, mode, s, sink)
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        simd::Level::Avx2 => unsafe {
            avx2_kernels::synth(data, scale, l, offset, keys, mode, s, sink)
        },
        _ => portable_kernels::synth(data, scale, l, offset, keys, mode, s, sink),
    }
}

/// Steps 1-5 by the literal path, on `u` already in `s.staged[..l]`.
fn analyze_literal(
    l: usize,
    offset: u64,
    keys: &StreamKeys,
    mode: Mode,
    s: &mut Scratch,
    data: &mut [u8],
) -> Option<f32> {
    let buf = &mut s.staged[..l];
    bind(buf, keys, offset);
    fwht(buf);
    let codes = &mut s.codes[..l];
    s.tmp.resize(l, 0.0);
    let scale = quantize(buf, mode, s.unbiased, codes, &mut s.tmp)?;
    pack(codes, mode, data);
    Some(scale)
}

/// Step 6 by the literal path, leaving `xhat` in `s.staged[..l]`.
fn synth_literal(
    data: &[u8],
    scale: f32,
    l: usize,
    offset: u64,
    keys: &StreamKeys,
    mode: Mode,
    s: &mut Scratch,
) -> Result<(), CodecError> {
    let buf = &mut s.staged[..l];
    if !Tables::get().unpack_levels(data, mode, buf) {
        return Err(CodecError::Corrupt("a ternary byte is above 242"));
    }
    fwht(buf);
    for b in buf.iter_mut() {
        *b *= scale;
    }
    bind(buf, keys, offset);
    Ok(())
}

/// Encode one block (`x` and `e` are its elements, `l` its padded size) into its packed codes
/// `data` and scale `scale_out`, writing nothing else.
#[allow(clippy::too_many_arguments)]
pub fn analyze<T: Elem>(
    x: &[T],
    e: Option<&[T]>,
    l: usize,
    offset: u64,
    keys: &StreamKeys,
    mode: Mode,
    s: &mut Scratch,
    data: &mut [u8],
    scale_out: &mut [u8],
) -> Result<(), CodecError> {
    let scale = if l >= MIN_VEC_BLOCK && x.len() == l {
        analyze_vec(x, e, l, offset, keys, mode, s, data)
    } else {
        // A tail block: stage u zero-padded, then the vector path if it is long enough.
        s.staged.resize(s.staged.len().max(l), 0.0);
        let staged = &mut s.staged[..l];
        match e {
            Some(e) => {
                for ((u, xv), ev) in staged.iter_mut().zip(x).zip(e) {
                    *u = xv.to_f32() + ev.to_f32();
                }
            }
            None => {
                for (u, xv) in staged.iter_mut().zip(x) {
                    *u = xv.to_f32();
                }
            }
        }
        staged[x.len()..].fill(0.0);
        if l >= MIN_VEC_BLOCK {
            let staged = std::mem::take(&mut s.staged);
            let scale = analyze_vec::<f32>(&staged[..l], None, l, offset, keys, mode, s, data);
            s.staged = staged;
            scale
        } else {
            analyze_literal(l, offset, keys, mode, s, data)
        }
    }
    .ok_or(CodecError::NonFinite)?;
    scale_out.copy_from_slice(&scale.to_le_bytes());
    Ok(())
}

/// Decode one block from its packed codes `data` and `scale` into `sink`.
#[allow(clippy::too_many_arguments)]
pub fn synth<T: Elem>(
    data: &[u8],
    scale: f32,
    l: usize,
    offset: u64,
    keys: &StreamKeys,
    mode: Mode,
    s: &mut Scratch,
    sink: Sink<'_, T>,
) -> Result<(), CodecError> {
    let n = match &sink {
        Sink::Out(o) => o.len(),
        Sink::Residual(_, e) => e.len(),
    };
    if l >= MIN_VEC_BLOCK && n == l {
        return synth_vec(data, scale, l, offset, keys, mode, s, sink);
    }
    // A tail block: xhat into `staged`, then cast or subtract element by element.
    s.staged.resize(s.staged.len().max(l), 0.0);
    if l >= MIN_VEC_BLOCK {
        let mut staged = std::mem::take(&mut s.staged);
        let res = synth_vec(
            data,
            scale,
            l,
            offset,
            keys,
            mode,
            s,
            Sink::Out(&mut staged[..l]),
        );
        s.staged = staged;
        res?;
    } else {
        synth_literal(data, scale, l, offset, keys, mode, s)?;
    }
    let xhat = &s.staged[..n];
    match sink {
        Sink::Out(out) => {
            for (o, v) in out.iter_mut().zip(xhat) {
                *o = T::from_f32(*v);
            }
        }
        Sink::Residual(x, e) => {
            for ((ev, xv), v) in e.iter_mut().zip(x).zip(xhat) {
                let u = xv.to_f32() + ev.to_f32();
                *ev = T::from_f32(u - *v);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(l: usize, seed: u64, kind: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..l)
            .map(|i| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let u = ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                match kind {
                    0 => u,
                    // one spike among small values: bimodal after the spread
                    1 => {
                        if i == 3 {
                            1e4
                        } else {
                            u * 1e-3
                        }
                    }
                    // few distinct values: ties at the thresholds
                    2 => [0.0, 1.0, -1.0, 0.5][(s >> 62) as usize],
                    _ => 0.0,
                }
            })
            .collect()
    }

    /// The vector path at every instruction set against the literal one, block by block, for
    /// every block size it takes.
    #[test]
    fn vector_path_matches_literal_path() {
        let keys = StreamKeys::new(3, 4);
        let levels = [simd::Level::Scalar, simd::Level::Avx2, simd::Level::Avx512];
        for log in 7..=16 {
            let l = 1usize << log;
            for kind in 0..4 {
                let u = data(l, log as u64 + 10 * kind, kind);
                for (mode, unbiased) in [
                    (Mode::Ternary, false),
                    (Mode::Sign, false),
                    (Mode::Int2, false),
                    (Mode::Int2, true),
                ] {
                    let mut s = Scratch::new(l).with_unbiased(unbiased);
                    let len = crate::pack::packed_len(l, mode);
                    let offset = (l as u64) * 5;
                    let mut want = vec![0u8; len];
                    s.staged.resize(l, 0.0);
                    s.staged[..l].copy_from_slice(&u);
                    let scale = analyze_literal(l, offset, &keys, mode, &mut s, &mut want).unwrap();
                    synth_literal(&want, scale, l, offset, &keys, mode, &mut s).unwrap();
                    let xhat = s.staged[..l].to_vec();
                    for level in levels {
                        let level = simd::set_level(level);
                        let what =
                            format!("{mode:?} unbiased={unbiased} l={l} kind={kind} {level:?}");
                        let mut got = vec![0u8; len];
                        let a =
                            analyze_vec::<f32>(&u, None, l, offset, &keys, mode, &mut s, &mut got)
                                .unwrap();
                        assert_eq!(a.to_bits(), scale.to_bits(), "{what}");
                        assert!(got == want, "{what}");
                        let mut y = vec![0f32; l];
                        synth_vec(&got, a, l, offset, &keys, mode, &mut s, Sink::Out(&mut y))
                            .unwrap();
                        assert!(
                            y.iter().zip(&xhat).all(|(p, q)| p.to_bits() == q.to_bits()),
                            "{what}"
                        );
                    }
                    simd::set_level(simd::detected());
                }
            }
        }
    }
}
