//! `lanes` for AVX-512 (F, BW, VL): one register a vector, a mask register for the lane bits.
//! Each function is a safe `target_feature` function; the only `unsafe` is the load and store of
//! an array or a table row. The unpacking of the decoder is `lanes_avx2`'s.

use std::arch::x86_64::*;

use super::{Lanes, LANES, UPPER};

pub use super::avx2::unpack;

pub type V = __m512;
const PF_HINT: i32 = _MM_HINT_T0;

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn load(a: &Lanes) -> V {
    // SAFETY: `a` is 16 readable f32; the load has no alignment requirement.
    unsafe { _mm512_loadu_ps(a.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn store(a: &mut Lanes, v: V) {
    // SAFETY: `a` is 16 writable f32; the store has no alignment requirement.
    unsafe { _mm512_storeu_ps(a.as_mut_ptr(), v) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn splat(x: f32) -> V {
    _mm512_set1_ps(x)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn add(a: V, b: V) -> V {
    _mm512_add_ps(a, b)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn sub(a: V, b: V) -> V {
    _mm512_sub_ps(a, b)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn mul(a: V, b: V) -> V {
    _mm512_mul_ps(a, b)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn abs(a: V) -> V {
    _mm512_abs_ps(a)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn flip(a: V, bits: u32) -> V {
    let a = _mm512_castps_si512(a);
    let sign = _mm512_set1_epi32(i32::MIN);
    _mm512_castsi512_ps(_mm512_mask_xor_epi32(a, bits as __mmask16, a, sign))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn times3(a: V, bits: u32) -> V {
    _mm512_mask_mul_ps(a, bits as __mmask16, a, _mm512_set1_ps(3.0))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn select(a: V, bits: u32) -> V {
    _mm512_maskz_mov_ps(bits as __mmask16, a)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn mask_gt(a: V, t: f32) -> u32 {
    _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, _mm512_set1_ps(t)) as u32
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn mask_nonneg(a: V) -> u32 {
    _mm512_cmp_ps_mask::<_CMP_GE_OQ>(a, _mm512_setzero_ps()) as u32
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn trit_codes(keep: u32, pos: u32, out: &mut [u8]) {
    let out = &mut out[..LANES];
    let c = _mm_mask_mov_epi8(_mm_set1_epi8(1), keep as __mmask16, _mm_setzero_si128());
    let c = _mm_mask_mov_epi8(c, (keep & pos) as __mmask16, _mm_set1_epi8(2));
    // SAFETY: `out` is 16 writable bytes; the store has no alignment requirement.
    unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), c) }
}

/// `portable::pack_trits`, 8 bytes (40 codes) at a time: the 5 codes of each byte are
/// moved into a 64-bit slot of their own (a permute of 64-bit words, then a byte shuffle
/// within 128-bit lanes), weighted by 1, 3, 9, 27, 81 and summed by two multiply-adds.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn pack_trits(codes: &mut [u8], l: usize, out: &mut [u8]) {
    // Lane m of the 8 slots 2m, 2m+1 holds words m, m+1 of the 40 codes (bytes 8m..8m+16);
    // slot 2m needs bytes 10m..10m+5 of them, at 2m.. in the lane, and slot 2m+1 the next 5.
    const SHUF: [i8; 64] = {
        let mut t = [-1i8; 64];
        let mut m = 0;
        while m < 4 {
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
    let perm = _mm512_setr_epi64(0, 1, 1, 2, 2, 3, 3, 4);
    // SAFETY: the table is 64 readable bytes.
    let shuf = unsafe { _mm512_loadu_si512(SHUF.as_ptr().cast()) };
    let weights = _mm512_set1_epi64(i64::from_le_bytes(WEIGHTS.map(|w| w as u8)));
    let ones = _mm512_set1_epi16(1);
    let pack8 = |c: usize| {
        let src = &codes[40 * c..40 * c + 64];
        // SAFETY: `src` is 64 readable bytes; the load has no alignment requirement.
        let v = unsafe { _mm512_loadu_si512(src.as_ptr().cast()) };
        let v = _mm512_shuffle_epi8(_mm512_permutexvar_epi64(perm, v), shuf);
        // [c0 + 3 c1, 9 c2 + 27 c3, 81 c4, 0] per slot, then [c0 + .. + 27 c3, 81 c4].
        let v = _mm512_madd_epi16(_mm512_maddubs_epi16(v, weights), ones);
        let v = _mm512_add_epi32(v, _mm512_srli_epi64::<32>(v));
        _mm_cvtsi128_si64(_mm512_cvtepi64_epi8(v)).to_le_bytes()
    };
    let full = out.len() / 8;
    let mut chunks = out.chunks_exact_mut(8);
    for (c, o) in (&mut chunks).enumerate() {
        o.copy_from_slice(&pack8(c));
    }
    let rest = chunks.into_remainder();
    let n = rest.len();
    if n > 0 {
        rest.copy_from_slice(&pack8(full)[..n]);
    }
}

/// `portable::key_words`, 16 words at a time (`keys::mix32` lane by lane).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn key_words(keys: &crate::keys::StreamKeys, w0: u32, out: &mut [u32]) {
    let mix = |x: __m512i| {
        let x = _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x));
        let x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb_352d));
        let x = _mm512_xor_si512(x, _mm512_srli_epi32::<15>(x));
        let x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x846c_a68b_u32 as i32));
        _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x))
    };
    let (k1, k2) = (
        _mm512_set1_epi32(keys.k1 as i32),
        _mm512_set1_epi32(keys.k2 as i32),
    );
    let step = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut chunks = out.chunks_exact_mut(16);
    let mut w = w0;
    for o in &mut chunks {
        let idx = _mm512_add_epi32(_mm512_set1_epi32(w as i32), step);
        let v = mix(_mm512_add_epi32(mix(_mm512_xor_si512(idx, k1)), k2));
        // SAFETY: `o` is 16 writable u32; the store has no alignment requirement.
        unsafe { _mm512_storeu_si512(o.as_mut_ptr().cast(), v) };
        w = w.wrapping_add(16);
    }
    keys.fill_words(w, chunks.into_remainder());
}

/// A hint that the cache line at `p` will be needed soon.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn prefetch<T>(p: *const T) {
    _mm_prefetch::<PF_HINT>(p.cast())
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,bmi2")]
pub fn interleave(lo: u32, hi: u32) -> u32 {
    _pdep_u32(lo, 0x5555_5555) | _pdep_u32(hi, 0xaaaa_aaaa)
}

/// One stage: `p` holds each lane's partner, `neg` the sign bit of each upper lane. The
/// lower lane gets `b + a` (the same sum as `a + b`), the upper one `a + (-b)`, which IEEE
/// defines as `a - b`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn lane_stage(v: V, p: V, neg: __m512i) -> V {
    _mm512_add_ps(
        p,
        _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), neg)),
    )
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn upper_signs(upper: u32) -> __m512i {
    _mm512_maskz_mov_epi32(upper as __mmask16, _mm512_set1_epi32(i32::MIN))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn wht16(v: V) -> V {
    let v = lane_stage(
        v,
        _mm512_permute_ps::<0b10_11_00_01>(v),
        upper_signs(UPPER[0]),
    );
    let v = lane_stage(
        v,
        _mm512_permute_ps::<0b01_00_11_10>(v),
        upper_signs(UPPER[1]),
    );
    let p = _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v);
    let v = lane_stage(v, p, upper_signs(UPPER[2]));
    let p = _mm512_shuffle_f32x4::<0b01_00_11_10>(v, v);
    lane_stage(v, p, upper_signs(UPPER[3]))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn hsum(v: V) -> f32 {
    let v = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b01_00_11_10>(v, v));
    let v = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v));
    let v = _mm512_add_ps(v, _mm512_permute_ps::<0b01_00_11_10>(v));
    let v = _mm512_add_ps(v, _mm512_permute_ps::<0b10_11_00_01>(v));
    _mm512_cvtss_f32(v)
}
