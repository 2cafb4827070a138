//! `lanes` for AVX2 (with BMI2): a vector is two 256-bit registers, the lane bits are expanded
//! into lane masks by a variable shift. Each function is a safe `target_feature` function; the
//! only `unsafe` is the load and store of an array or a table row.

use std::arch::x86_64::*;

use super::{Lanes, Unpacked, UPPER};
use crate::codec::Mode;
use crate::pack::{Tables, MAX_TRIT_BYTE};

pub type V = [__m256; 2];

/// Bit `i` of a lane-bits word moved to the sign bit of lane `i` of each half, by these shifts.
#[inline]
#[target_feature(enable = "avx2,bmi2")]
fn sign_masks(bits: u32) -> [__m256i; 2] {
    let b = _mm256_set1_epi32(bits as i32);
    let lo = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
    let hi = _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16);
    [_mm256_sllv_epi32(b, lo), _mm256_sllv_epi32(b, hi)]
}

#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn load(a: &Lanes) -> V {
    // SAFETY: `a` is 16 readable f32; the loads have no alignment requirement.
    unsafe {
        [
            _mm256_loadu_ps(a.as_ptr()),
            _mm256_loadu_ps(a.as_ptr().add(8)),
        ]
    }
}

#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn store(a: &mut Lanes, v: V) {
    // SAFETY: `a` is 16 writable f32; the stores have no alignment requirement.
    unsafe {
        _mm256_storeu_ps(a.as_mut_ptr(), v[0]);
        _mm256_storeu_ps(a.as_mut_ptr().add(8), v[1]);
    }
}

#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn splat(x: f32) -> V {
    [_mm256_set1_ps(x); 2]
}

#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn add(a: V, b: V) -> V {
    [_mm256_add_ps(a[0], b[0]), _mm256_add_ps(a[1], b[1])]
}

#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn sub(a: V, b: V) -> V {
    [_mm256_sub_ps(a[0], b[0]), _mm256_sub_ps(a[1], b[1])]
}

#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn mul(a: V, b: V) -> V {
    [_mm256_mul_ps(a[0], b[0]), _mm256_mul_ps(a[1], b[1])]
}

#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn abs(a: V) -> V {
    let sign = _mm256_set1_ps(-0.0);
    [_mm256_andnot_ps(sign, a[0]), _mm256_andnot_ps(sign, a[1])]
}

#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn flip(a: V, bits: u32) -> V {
    let m = sign_masks(bits);
    let sign = _mm256_set1_epi32(i32::MIN);
    let f =
        |x: __m256, m: __m256i| _mm256_xor_ps(x, _mm256_castsi256_ps(_mm256_and_si256(m, sign)));
    [f(a[0], m[0]), f(a[1], m[1])]
}

#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn times3(a: V, bits: u32) -> V {
    let m = sign_masks(bits);
    let (one, three) = (_mm256_set1_ps(1.0), _mm256_set1_ps(3.0));
    let f = |x: __m256, m: __m256i| {
        _mm256_mul_ps(x, _mm256_blendv_ps(one, three, _mm256_castsi256_ps(m)))
    };
    [f(a[0], m[0]), f(a[1], m[1])]
}

#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn select(a: V, bits: u32) -> V {
    let m = sign_masks(bits);
    let zero = _mm256_setzero_ps();
    let f = |x: __m256, m: __m256i| _mm256_blendv_ps(zero, x, _mm256_castsi256_ps(m));
    [f(a[0], m[0]), f(a[1], m[1])]
}

#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn mask_gt(a: V, t: f32) -> u32 {
    let t = _mm256_set1_ps(t);
    let m = |x: __m256| _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(x, t)) as u32;
    m(a[0]) | (m(a[1]) << 8)
}

#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn mask_nonneg(a: V) -> u32 {
    let z = _mm256_setzero_ps();
    let m = |x: __m256| _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(x, z)) as u32;
    m(a[0]) | (m(a[1]) << 8)
}

#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn trit_codes(keep: u32, pos: u32, out: &mut [u8]) {
    // One byte a lane: 1 - keep + 2 (keep & pos), with no carry between bytes.
    const ONES: u64 = 0x0101_0101_0101_0101;
    let bytes = |h: u32| {
        let k = _pdep_u64(((keep >> (8 * h)) & 0xff) as u64, ONES);
        let p = _pdep_u64(((keep & pos) >> (8 * h) & 0xff) as u64, ONES);
        (ONES - k + 2 * p).to_le_bytes()
    };
    out[..8].copy_from_slice(&bytes(0));
    out[8..16].copy_from_slice(&bytes(1));
}

#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn interleave(lo: u32, hi: u32) -> u32 {
    _pdep_u32(lo, 0x5555_5555) | _pdep_u32(hi, 0xaaaa_aaaa)
}

/// One stage within each half: `p` holds each lane's partner, `neg` the sign bit of each upper
/// lane; the lower lane gets `b + a`, the upper one `a + (-b)`, IEEE's `a - b`.
#[inline]
#[target_feature(enable = "avx2,bmi2")]
fn lane_stage(v: __m256, p: __m256, neg: __m256) -> __m256 {
    _mm256_add_ps(p, _mm256_xor_ps(v, neg))
}

#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn wht16(v: V) -> V {
    let sign = _mm256_set1_epi32(i32::MIN);
    let neg = |m: __m256i| _mm256_castsi256_ps(_mm256_and_si256(m, sign));
    // Upper lanes of stages 1, 2, 4 within a half: the low byte of UPPER[0..3].
    let n1 = neg(sign_masks(UPPER[0])[0]);
    let n2 = neg(sign_masks(UPPER[1])[0]);
    let n4 = neg(sign_masks(UPPER[2])[0]);
    let half = |x: __m256| {
        let x = lane_stage(x, _mm256_permute_ps::<0b10_11_00_01>(x), n1);
        let x = lane_stage(x, _mm256_permute_ps::<0b01_00_11_10>(x), n2);
        lane_stage(x, _mm256_permute2f128_ps::<0x01>(x, x), n4)
    };
    let (a, b) = (half(v[0]), half(v[1]));
    [_mm256_add_ps(a, b), _mm256_sub_ps(a, b)]
}

#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn hsum(v: V) -> f32 {
    let a = _mm256_add_ps(v[0], v[1]);
    let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
    let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps::<0b01>(c, c)))
}

/// `portable::unpack`, with the ternary levels computed 16 bytes (80 trits, 5 vectors) at a
/// time (`trit_digits`).
#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn unpack(packed: &[u8], mode: Mode, z: &mut [Lanes]) -> Unpacked {
    let t = Tables::get();
    // SAFETY (the loads and stores below): each reads or writes 4 or 8 f32 of a table row or
    // of `z[q]`, at an offset of 0, 4, 8 or 12 in the 16; no alignment requirement.
    match mode {
        Mode::Sign => {
            for (zq, b) in z.iter_mut().zip(packed.chunks_exact(2)) {
                let (lo, hi) = unsafe {
                    (
                        _mm256_loadu_ps(t.wht_sign[b[0] as usize].as_ptr()),
                        _mm256_loadu_ps(t.wht_sign[b[1] as usize].as_ptr()),
                    )
                };
                let p = zq.as_mut_ptr();
                unsafe {
                    _mm256_storeu_ps(p, _mm256_add_ps(lo, hi));
                    _mm256_storeu_ps(p.add(8), _mm256_sub_ps(lo, hi));
                }
            }
            Unpacked::LaneTransformed
        }
        Mode::Int2 => {
            for (zq, b) in z.iter_mut().zip(packed.chunks_exact(4)) {
                let row = |k: usize| t.wht_int2[b[k] as usize].as_ptr();
                let q = unsafe {
                    [
                        _mm_loadu_ps(row(0)),
                        _mm_loadu_ps(row(1)),
                        _mm_loadu_ps(row(2)),
                        _mm_loadu_ps(row(3)),
                    ]
                };
                let (s1, d1) = (_mm_add_ps(q[0], q[1]), _mm_sub_ps(q[0], q[1]));
                let (s2, d2) = (_mm_add_ps(q[2], q[3]), _mm_sub_ps(q[2], q[3]));
                let p = zq.as_mut_ptr();
                unsafe {
                    _mm_storeu_ps(p, _mm_add_ps(s1, s2));
                    _mm_storeu_ps(p.add(4), _mm_add_ps(d1, d2));
                    _mm_storeu_ps(p.add(8), _mm_sub_ps(s1, s2));
                    _mm_storeu_ps(p.add(12), _mm_sub_ps(d1, d2));
                }
            }
            Unpacked::LaneTransformed
        }
        Mode::Ternary => {
            let max = _mm_set1_epi8(MAX_TRIT_BYTE as i8);
            let one = _mm256_set1_epi16(1);
            let mut ok = 0xffffu32;
            for (gi, zg) in z.chunks_mut(5).enumerate() {
                let bytes = trit_group(packed, gi);
                ok &= _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_max_epu8(bytes, max), max)) as u32;
                for (q, zq) in zg.iter_mut().enumerate() {
                    let d = _mm256_sub_epi16(trit_digits(bytes, q), one);
                    let lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(d));
                    let hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(d));
                    let p = zq.as_mut_ptr();
                    unsafe {
                        _mm256_storeu_ps(p, _mm256_cvtepi32_ps(lo));
                        _mm256_storeu_ps(p.add(8), _mm256_cvtepi32_ps(hi));
                    }
                }
            }
            if ok == 0xffff {
                Unpacked::Levels
            } else {
                Unpacked::Invalid
            }
        }
    }
}

/// Bytes `16 gi .. 16 gi + 16` of a packed ternary block, zero past its end.
#[inline]
#[target_feature(enable = "avx2,bmi2")]
fn trit_group(packed: &[u8], gi: usize) -> __m128i {
    let src = &packed[16 * gi..];
    if src.len() >= 16 {
        // SAFETY: `src` has 16 readable bytes; no alignment requirement.
        unsafe { _mm_loadu_si128(src.as_ptr().cast()) }
    } else {
        let mut buf = [0u8; 16];
        buf[..src.len()].copy_from_slice(src);
        // SAFETY: `buf` is 16 readable bytes; no alignment requirement.
        unsafe { _mm_loadu_si128(buf.as_ptr().cast()) }
    }
}

/// The trits (0, 1, 2) of vector `q` of a group of 16 bytes, as 16-bit lanes: lane k holds
/// trit `d = (16 q + k) % 5` of byte `b`, number `(16 q + k) / 5`, computed as
/// `floor(b / 3^d) - 3 floor(b / 3^(d+1))`, each floor the high half of a 16-bit product
/// `2b ceil(2^15 / 3^d)` (exact for b <= 242, tested for all bytes).
#[inline]
#[target_feature(enable = "avx2,bmi2")]
fn trit_digits(bytes: __m128i, q: usize) -> __m256i {
    type Tables = ([[i8; 16]; 5], [[[u16; 16]; 5]; 2]);
    const fn tables() -> Tables {
        const DIV: [u16; 6] = [32768, 10923, 3641, 1214, 405, 135]; // ceil(2^15 / 3^d)
        let mut idx = [[0i8; 16]; 5];
        let mut mul = [[[0u16; 16]; 5]; 2];
        let mut e = 0;
        while e < 80 {
            idx[e / 16][e % 16] = (e / 5) as i8;
            mul[0][e / 16][e % 16] = DIV[e % 5];
            mul[1][e / 16][e % 16] = DIV[e % 5 + 1];
            e += 1;
        }
        (idx, mul)
    }
    const T: Tables = tables();
    // SAFETY: the tables are 16 readable bytes and 16 readable u16.
    let (idx, m0, m1) = unsafe {
        (
            _mm_loadu_si128(T.0[q].as_ptr().cast()),
            _mm256_loadu_si256(T.1[0][q].as_ptr().cast()),
            _mm256_loadu_si256(T.1[1][q].as_ptr().cast()),
        )
    };
    let b = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(bytes, idx));
    let b2 = _mm256_add_epi16(b, b);
    let (t0, t1) = (_mm256_mulhi_epu16(b2, m0), _mm256_mulhi_epu16(b2, m1));
    _mm256_sub_epi16(t0, _mm256_add_epi16(t1, _mm256_add_epi16(t1, t1)))
}

/// `portable::pack_trits`, 4 bytes (20 codes) at a time: the 5 codes of each byte are moved
/// into a 64-bit slot of their own (a permute of 64-bit words, then a byte shuffle within
/// 128-bit lanes), weighted by 1, 3, 9, 27, 81 and summed by two multiply-adds.
#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn pack_trits(codes: &mut [u8], l: usize, out: &mut [u8]) {
    // Lane m of slots 2m, 2m+1 holds words m, m+1 of the 20 codes (bytes 8m..8m+16); slot 2m
    // needs bytes 10m..10m+5 of them, at 2m.. in the lane, and slot 2m+1 the next 5.
    const SHUF: [i8; 32] = {
        let mut t = [-1i8; 32];
        let mut m = 0;
        while m < 2 {
            let mut k = 0;
            while k < 5 {
                t[16 * m + k] = (2 * m + k) as i8;
                t[16 * m + 8 + k] = (2 * m + 5 + k) as i8;
                k += 1;
            }
            m += 1;
        }
        t
    };
    const WEIGHTS: [i8; 8] = [1, 3, 9, 27, 81, 0, 0, 0];
    codes[l..l + 8].fill(0);
    // SAFETY: the table is 32 readable bytes.
    let shuf = unsafe { _mm256_loadu_si256(SHUF.as_ptr().cast()) };
    let weights = _mm256_set1_epi64x(i64::from_le_bytes(WEIGHTS.map(|w| w as u8)));
    let ones = _mm256_set1_epi16(1);
    // Byte 0 of each 64-bit slot to bytes 0, 1 of its lane.
    let gather = _mm256_setr_epi8(
        0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 8, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1,
    );
    let pack4 = |c: usize| {
        let src = &codes[20 * c..20 * c + 32];
        // SAFETY: `src` is 32 readable bytes; the load has no alignment requirement.
        let v = unsafe { _mm256_loadu_si256(src.as_ptr().cast()) };
        let v = _mm256_shuffle_epi8(_mm256_permute4x64_epi64::<0b10_01_01_00>(v), shuf);
        let v = _mm256_madd_epi16(_mm256_maddubs_epi16(v, weights), ones);
        let v = _mm256_shuffle_epi8(_mm256_add_epi32(v, _mm256_srli_epi64::<32>(v)), gather);
        let (a, b) = (
            _mm256_extract_epi16::<0>(v) as u16,
            _mm256_extract_epi16::<8>(v) as u16,
        );
        (a as u32 | ((b as u32) << 16)).to_le_bytes()
    };
    let full = out.len() / 4;
    let mut chunks = out.chunks_exact_mut(4);
    for (c, o) in (&mut chunks).enumerate() {
        o.copy_from_slice(&pack4(c));
    }
    let rest = chunks.into_remainder();
    let n = rest.len();
    if n > 0 {
        rest.copy_from_slice(&pack4(full)[..n]);
    }
}

/// `portable::key_words`, 8 words at a time (`keys::mix32` lane by lane).
#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn key_words(keys: &crate::keys::StreamKeys, w0: u32, out: &mut [u32]) {
    let mix = |x: __m256i| {
        let x = _mm256_xor_si256(x, _mm256_srli_epi32::<16>(x));
        let x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb_352d));
        let x = _mm256_xor_si256(x, _mm256_srli_epi32::<15>(x));
        let x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x846c_a68b_u32 as i32));
        _mm256_xor_si256(x, _mm256_srli_epi32::<16>(x))
    };
    let (k1, k2) = (
        _mm256_set1_epi32(keys.k1 as i32),
        _mm256_set1_epi32(keys.k2 as i32),
    );
    let step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut chunks = out.chunks_exact_mut(8);
    let mut w = w0;
    for o in &mut chunks {
        let idx = _mm256_add_epi32(_mm256_set1_epi32(w as i32), step);
        let v = mix(_mm256_add_epi32(mix(_mm256_xor_si256(idx, k1)), k2));
        // SAFETY: `o` is 8 writable u32; the store has no alignment requirement.
        unsafe { _mm256_storeu_si256(o.as_mut_ptr().cast(), v) };
        w = w.wrapping_add(8);
    }
    keys.fill_words(w, chunks.into_remainder());
}

/// A hint that the cache line at `p` will be needed soon.
#[inline]
#[target_feature(enable = "avx2,bmi2")]
pub fn prefetch<T>(p: *const T) {
    _mm_prefetch::<_MM_HINT_T0>(p.cast())
}
