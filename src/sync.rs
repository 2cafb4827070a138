//! Packed-ternary weights (docs/FORMAT.md, "Packed ternary weights"): BitNet b1.58
//! quantization of a weight tensor, per row or per group, packed five trits a byte.
//!
//! A tensor is cut into groups of `group` consecutive elements (the last may be shorter). Each
//! group gets one f32 scale `s` and one code `t in {-1, 0, 1}` per element:
//!
//! 1. `gamma = mean |w|` over the group (BitNet's absmean), and `t = sign(w)` where
//!    `2 |w| > gamma`, else 0: round-and-clip of `w / gamma` to {-1, 0, 1} (half to even).
//! 2. `s = mean |w|` over the elements with `t != 0` (the least-squares scale of those codes).
//!
//! Both means are taken in fixed point: `|w|` scaled by `2^(30 - e)` (`max |w| < 2^e`), truncated
//! to an integer and summed in u64, so they do not depend on the order of the sum (threads, SIMD,
//! or the torch twin on a GPU all get the same bits), and a group that is already `s * {-1, 0, 1}`
//! comes back as exactly that: its nonzero `|w|` are all `s`, which the scaling keeps whole.
//!
//! Decode is `s * t` in f32, converted to the tensor's dtype with round to nearest even.

use std::fmt;

use rayon::prelude::*;

use crate::codec::Mode;
use half::slice::HalfFloatSliceExt;

use crate::elem::Elem;
use crate::pack::{pack_trits, Tables};

/// First bytes of a serialized packed tensor.
pub const MAGIC: [u8; 4] = *b"TPK3";
/// Version of the serialized form, its byte 4; Python reads it as `_native.SYNC_FORMAT_VERSION`.
pub const VERSION: u8 = 1;
/// Dimensions a serialized tensor may have.
pub const MAX_NDIM: usize = 8;
/// Largest group: the fixed-point sums (below 2^30 an element) must fit a u64.
pub const MAX_GROUP: u64 = 1 << 31;
/// Largest tensor: 2^40 elements.
pub const MAX_NUMEL: u64 = 1 << 40;
/// Bits of the fixed-point magnitudes below the group's maximum.
const FIXED_BITS: i64 = 30;
/// Elements packed or unpacked through the scratch at a time (a multiple of 5).
const CHUNK: usize = 4000;
/// Elements per rayon task, at least.
const MIN_TASK_ELEMS: usize = 1 << 15;

/// dtype codes of the serialized form (as in the gradient payload).
pub const DTYPE_F32: u8 = 0;
pub const DTYPE_F16: u8 = 1;
pub const DTYPE_BF16: u8 = 2;

#[derive(Debug, Clone, PartialEq)]
pub enum SyncError {
    NonFinite,
    BadGroup(u64),
    TooLarge(u64),
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    Corrupt(String),
}

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncError::NonFinite => write!(f, "weights contain NaN or Inf"),
            SyncError::BadGroup(g) => {
                write!(f, "group size {g} is outside 1..=2^31")
            }
            SyncError::TooLarge(n) => {
                write!(
                    f,
                    "tensor of {n} elements exceeds the format's limit of 2^40"
                )
            }
            SyncError::Length {
                what,
                expected,
                got,
            } => write!(f, "{what} has length {got}, expected {expected}"),
            SyncError::Corrupt(why) => write!(f, "corrupted packed weights: {why}"),
        }
    }
}

impl std::error::Error for SyncError {}

/// How the codes of a group are chosen (the decoder does not need to know).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// BitNet b1.58: `t = sign(w)` where `2 |w| > mean |w|`.
    AbsMean,
    /// The better of `AbsMean` and `|w| > max |w| / 2`, by squared error. For deltas: after a
    /// few rounds of error feedback a group's error is heavy-tailed, absmean's scale follows
    /// the many small entries and the few large ones shrink slowly; the max rule takes them.
    Adaptive,
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), SyncError> {
    if expected == got {
        Ok(())
    } else {
        Err(SyncError::Length {
            what,
            expected,
            got,
        })
    }
}

/// The group structure of a tensor of `n` elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Groups {
    pub n: usize,
    pub group: usize,
}

impl Groups {
    pub fn new(n: u64, group: u64) -> Result<Groups, SyncError> {
        if group == 0 || group > MAX_GROUP {
            return Err(SyncError::BadGroup(group));
        }
        if n > MAX_NUMEL {
            return Err(SyncError::TooLarge(n));
        }
        let n = usize::try_from(n).map_err(|_| SyncError::TooLarge(n))?;
        let group = usize::try_from(group).map_err(|_| SyncError::BadGroup(group))?;
        Ok(Groups { n, group })
    }

    /// Number of groups (and scales).
    pub fn count(&self) -> usize {
        self.n.div_ceil(self.group)
    }

    /// Packed bytes of a full group.
    pub fn group_bytes(&self) -> usize {
        self.group.div_ceil(5)
    }

    /// Packed bytes of all groups: each group starts on a byte of its own.
    pub fn codes_len(&self) -> usize {
        let c = self.count();
        if c == 0 {
            return 0;
        }
        (c - 1) * self.group_bytes() + (self.n - (c - 1) * self.group).div_ceil(5)
    }

    /// Scales (4 bytes each) and packed codes.
    pub fn body_len(&self) -> usize {
        4 * self.count() + self.codes_len()
    }

    fn groups_per_task(&self) -> usize {
        MIN_TASK_ELEMS.div_ceil(self.group).max(1)
    }
}

/// The group of per-row quantization: a row is everything under the first dimension
/// (`numel / shape[0]`); a 1-D tensor is one row, a 0-D tensor a group of 1. Empty tensors
/// get 1 (no groups either way).
pub fn row_group(shape: &[u64]) -> u64 {
    match shape.len() {
        0 => 1,
        1 => shape[0].max(1),
        _ => shape[1..]
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .unwrap_or(0)
            .max(1),
    }
}

/// `2^k` as an f64 (k within the normal range).
fn pow2(k: i64) -> f64 {
    f64::from_bits(((1023 + k) as u64) << 52)
}

/// `2^k` as an f32 (-126 <= k <= 127).
fn pow2f(k: i64) -> f32 {
    f32::from_bits(((127 + k) as u32) << 23)
}

/// Element types of weights and their f32 view: f32 is read in place, f16 and bf16 are
/// converted a chunk at a time (half's slice conversions, F16C where the CPU has it).
pub trait Weight: Elem {
    fn f32s<'a>(s: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
    /// `vals` rounded to `Self` (to nearest even) into `out`.
    fn store(out: &mut [Self], vals: &[f32]);
}

impl Weight for f32 {
    #[inline(always)]
    fn f32s<'a>(s: &'a [f32], _buf: &'a mut [f32]) -> &'a [f32] {
        s
    }
    #[inline(always)]
    fn store(out: &mut [f32], vals: &[f32]) {
        out.copy_from_slice(vals)
    }
}

macro_rules! half_weight {
    ($t:ty) => {
        impl Weight for $t {
            #[inline(always)]
            fn f32s<'a>(s: &'a [$t], buf: &'a mut [f32]) -> &'a [f32] {
                let b = &mut buf[..s.len()];
                s.convert_to_f32_slice(b);
                b
            }
            #[inline(always)]
            fn store(out: &mut [$t], vals: &[f32]) {
                out.convert_from_f32_slice(vals)
            }
        }
    };
}
half_weight!(half::f16);
half_weight!(half::bf16);

/// The fixed-point magnitudes of a group whose largest magnitude is below `2^e`:
/// `floor(|w| * 2^(30 - e))`, below 2^30. Computed in f32 as `(|w| * u1) * u2`, which is exact
/// whenever the result is at least 1 (both factors are powers of two and the first product only
/// scales up or lands below 1), so it equals the f64 arithmetic of the torch twin.
#[derive(Clone, Copy)]
struct Fixed {
    u1: f32,
    u2: f32,
    /// `2^(30 - e)` as an f64.
    u: f64,
}

impl Fixed {
    fn new(max: f32) -> Fixed {
        // max = f * 2^e with f in [0.5, 1) (frexp). The least f32 has e = -148; max == 0
        // (e = -1022) is clamped there, harmlessly: every magnitude is 0.
        let e = ((((max as f64).to_bits() >> 52) & 0x7ff) as i64 - 1022).max(-148);
        let k = FIXED_BITS - e; // -98..=178
        let (u1, u2) = if k <= 127 {
            (pow2f(k), 1.0)
        } else {
            (pow2f(64), pow2f(k - 64))
        };
        Fixed { u1, u2, u: pow2(k) }
    }

    /// `a` is `|w|` of a finite weight of the group: the result lies in [0, 2^30).
    #[inline(always)]
    fn of(&self, a: f32) -> u64 {
        let v = (a * self.u1) * self.u2;
        debug_assert!((0.0..1073741824.0).contains(&v));
        // SAFETY: v is finite and in [0, 2^30) (the group's maximum is below 2^e), so the
        // truncation is defined; unchecked, it vectorizes.
        unsafe { v.to_int_unchecked::<i32>() as u32 as u64 }
    }
}

/// The least f32 `t` with `2 t > gamma` (exactly): `|w| >= t` is the round-and-clip rule.
fn threshold(gamma: f64) -> f32 {
    let mut t = (gamma * 0.5) as f32;
    while 2.0 * (t as f64) <= gamma {
        t = t.next_up();
    }
    while t > 0.0 && 2.0 * (t.next_down() as f64) > gamma {
        t = t.next_down();
    }
    t
}

/// Scale and codes of one group (`x`, at most `MAX_GROUP` elements) into `out`
/// (`ceil(len/5)` bytes); `buf` holds `CHUNK` floats, `scratch` `CHUNK + 8` bytes.
#[inline(always)]
fn pack_group<T: Weight>(
    x: &[T],
    rule: Rule,
    buf: &mut [f32],
    scratch: &mut [u8],
    out: &mut [u8],
) -> Result<f32, SyncError> {
    // The largest |w| as the largest of the bits without sign (an integer reduction, which
    // vectorizes); Inf and NaN have the largest.
    let mut mb = 0u32;
    for xc in x.chunks(CHUNK) {
        mb = T::f32s(xc, buf)
            .iter()
            .fold(mb, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
    }
    if mb >= 0x7f80_0000 {
        return Err(SyncError::NonFinite);
    }
    let fx = Fixed::new(f32::from_bits(mb));
    let mut sum = 0u64;
    for xc in x.chunks(CHUNK) {
        sum += T::f32s(xc, buf).iter().map(|v| fx.of(v.abs())).sum::<u64>();
    }
    let gamma = sum as f64 / x.len() as f64 / fx.u;
    let ta = threshold(gamma);
    // Fixed-point sum and count of the magnitudes at or above `t`.
    let mut stats = |t: f32| {
        let (mut snz, mut k) = (0u64, 0u64);
        for xc in x.chunks(CHUNK) {
            for &v in T::f32s(xc, buf) {
                let a = v.abs();
                let nz = a >= t;
                snz += if nz { fx.of(a) } else { 0 };
                k += nz as u64;
            }
        }
        (snz, k)
    };
    let (mut t, (mut snz, mut k)) = (ta, stats(ta));
    if rule == Rule::Adaptive {
        // The second candidate: |w| > max/2. Keep the one that captures more energy,
        // snz^2 / k (the squared error is sum w^2 minus that); ties keep absmean.
        let tb = threshold(f32::from_bits(mb) as f64);
        let (sb, kb) = stats(tb);
        let energy = |s: u64, k: u64| {
            if k == 0 {
                0.0
            } else {
                s as f64 * (s as f64 / k as f64)
            }
        };
        if energy(sb, kb) > energy(snz, k) {
            (t, snz, k) = (tb, sb, kb);
        }
    }
    for (xc, oc) in x.chunks(CHUNK).zip(out.chunks_mut(CHUNK / 5)) {
        for (c, &v) in scratch.iter_mut().zip(T::f32s(xc, buf)) {
            // -1, 0, +1 as the codes 0, 1, 2
            let nz = (v.abs() >= t) as u8;
            *c = 1 + 2 * nz * ((v > 0.0) as u8) - nz;
        }
        pack_trits(scratch, xc.len(), oc);
    }
    Ok(if k == 0 {
        0.0
    } else {
        (snz as f64 / k as f64 / fx.u) as f32
    })
}

/// `$name`: `$inner` compiled for the instruction set `crate::simd::level()` allows (AVX-512,
/// AVX2 or the portable build), with the same arguments. Every operation in the inner functions
/// is exact or correctly rounded (no FMA contraction), so each level gives the same bits.
macro_rules! at_best_level {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $inner:ident) => {
        $(#[$doc])*
        fn $name<T: Weight>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                use crate::simd::Level;
                #[target_feature(enable = "avx2,fma,bmi2")]
                fn avx2<T: Weight>($($arg: $ty),*) -> $ret {
                    $inner($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,bmi2,avx512f,avx512bw,avx512vl")]
                fn avx512<T: Weight>($($arg: $ty),*) -> $ret {
                    $inner($($arg),*)
                }
                match crate::simd::level() {
                    // SAFETY: simd::level() only reports features the CPU has.
                    Level::Avx512 => return unsafe { avx512($($arg),*) },
                    Level::Avx2 => return unsafe { avx2($($arg),*) },
                    Level::Scalar => {}
                }
            }
            $inner($($arg),*)
        }
    };
}

at_best_level! {
    /// `pack_group` for the best instruction set.
    fn pack_group_best(
        x: &[T], rule: Rule, buf: &mut [f32], scratch: &mut [u8], out: &mut [u8]
    ) -> Result<f32, SyncError> = pack_group
}

/// Largest valid last byte of a group of `len` codes, whose padding codes are 0.
fn max_last_byte(len: usize) -> u8 {
    match len % 5 {
        0 => 242,
        r => 3u8.pow(r as u32) - 1,
    }
}

/// Check one group's scale and packed bytes without decoding.
fn check_group(g: usize, scale: f32, len: usize, packed: &[u8]) -> Result<(), SyncError> {
    if !(scale.is_finite() && scale.is_sign_positive()) {
        return Err(SyncError::Corrupt(format!(
            "scale of group {g} is {scale} (must be finite and >= 0)"
        )));
    }
    let Some((last, body)) = packed.split_last() else {
        return Err(SyncError::Corrupt(format!("group {g} has no bytes")));
    };
    if body.iter().fold(0u8, |a, &b| a.max(b)) > 242 || *last > max_last_byte(len) {
        return Err(SyncError::Corrupt(format!(
            "group {g} has a packed byte above 242 or nonzero padding"
        )));
    }
    Ok(())
}

#[inline(always)]
fn unpack_group<T: Weight>(
    g: usize,
    scale: f32,
    packed: &[u8],
    out: &mut [T],
    buf: &mut [f32],
) -> Result<(), SyncError> {
    check_group(g, scale, out.len(), packed)?;
    let tables = Tables::get();
    for (oc, pc) in out.chunks_mut(CHUNK).zip(packed.chunks(CHUNK / 5)) {
        let lv = &mut buf[..oc.len()];
        // Checked above: unpack_levels cannot fail here.
        tables.unpack_levels(pc, Mode::Ternary, lv);
        for l in lv.iter_mut() {
            *l *= scale;
        }
        T::store(oc, lv);
    }
    Ok(())
}

at_best_level! {
    /// `unpack_group` for the best instruction set.
    fn unpack_group_best(
        g: usize, scale: f32, packed: &[u8], out: &mut [T], buf: &mut [f32]
    ) -> Result<(), SyncError> = unpack_group
}

/// Quantize and pack `x` in groups of `group`: one scale per group into `scales`, packed codes
/// into `codes` (`Groups::codes_len` bytes). NaN or Inf raises `NonFinite`. The result does not
/// depend on the number of threads.
pub fn pack<T: Weight>(
    x: &[T],
    group: usize,
    rule: Rule,
    scales: &mut [f32],
    codes: &mut [u8],
) -> Result<(), SyncError> {
    let g = Groups::new(x.len() as u64, group as u64)?;
    check_len("scales", g.count(), scales.len())?;
    check_len("packed codes", g.codes_len(), codes.len())?;
    let k = g.groups_per_task();
    let gb = g.group_bytes();
    scales
        .par_chunks_mut(k)
        .zip(codes.par_chunks_mut(k * gb))
        .zip(x.par_chunks(k * group))
        .try_for_each_init(
            || (vec![0f32; CHUNK], vec![0u8; CHUNK + 8]),
            |(buf, scratch), ((s, c), xs)| {
                for ((sc, xg), cg) in s.iter_mut().zip(xs.chunks(group)).zip(c.chunks_mut(gb)) {
                    *sc = pack_group_best(xg, rule, buf, scratch, cg)?;
                }
                Ok(())
            },
        )
}

/// Decode `scales` and `codes` (groups of `group`) into `out`, validating them: a scale that is
/// not finite and >= 0, a byte above 242 or nonzero padding in a group's last byte is
/// `Corrupt`.
pub fn unpack<T: Weight>(
    scales: &[f32],
    codes: &[u8],
    group: usize,
    out: &mut [T],
) -> Result<(), SyncError> {
    let g = Groups::new(out.len() as u64, group as u64)?;
    check_len("scales", g.count(), scales.len())?;
    check_len("packed codes", g.codes_len(), codes.len())?;
    let k = g.groups_per_task();
    let gb = g.group_bytes();
    out.par_chunks_mut(k * group)
        .zip(codes.par_chunks(k * gb))
        .zip(scales.par_chunks(k))
        .enumerate()
        .try_for_each_init(
            || vec![0f32; CHUNK],
            |scratch, (t, ((o, c), s))| {
                for (i, ((og, cg), &sc)) in o.chunks_mut(group).zip(c.chunks(gb)).zip(s).enumerate()
                {
                    unpack_group_best(t * k + i, sc, cg, og, scratch)?;
                }
                Ok(())
            },
        )
}

/// Validate a body (little-endian f32 scales, then packed codes) without decoding it.
pub fn check_body(g: &Groups, body: &[u8]) -> Result<(), SyncError> {
    check_len("packed body", g.body_len(), body.len())?;
    let (scales, codes) = body.split_at(4 * g.count());
    let k = g.groups_per_task();
    let gb = g.group_bytes();
    scales
        .par_chunks(4 * k)
        .zip(codes.par_chunks(k * gb))
        .enumerate()
        .try_for_each(|(t, (s, c))| {
            for (i, (sb, cg)) in s.chunks_exact(4).zip(c.chunks(gb)).enumerate() {
                let gi = t * k + i;
                let len = g.group.min(g.n - gi * g.group);
                let scale = f32::from_le_bytes([sb[0], sb[1], sb[2], sb[3]]);
                check_group(gi, scale, len, cg)?;
            }
            Ok(())
        })
}

/// The header of a serialized packed tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// `DTYPE_F32`, `DTYPE_F16` or `DTYPE_BF16`: the dtype decode returns.
    pub dtype: u8,
    /// Whether the groups are the rows (`group == row_group(shape)`).
    pub per_row: bool,
    pub group: u64,
    pub shape: Vec<u64>,
}

impl Header {
    /// Bytes of the header: 16 and 8 a dimension.
    pub fn header_len(&self) -> usize {
        16 + 8 * self.shape.len()
    }

    /// Elements of the tensor, checked against the format's limit.
    pub fn numel(&self) -> Result<u64, SyncError> {
        let n = self.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        match n {
            Some(n) if n <= MAX_NUMEL => Ok(n),
            _ => Err(SyncError::Corrupt(format!(
                "shape {:?} has more than 2^40 elements",
                self.shape
            ))),
        }
    }

    pub fn groups(&self) -> Result<Groups, SyncError> {
        Groups::new(self.numel()?, self.group)
    }

    pub fn write(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.header_len());
        b.extend_from_slice(&MAGIC);
        b.push(VERSION);
        b.push(self.dtype);
        b.push(self.shape.len() as u8);
        b.push(self.per_row as u8);
        b.extend_from_slice(&self.group.to_le_bytes());
        for d in &self.shape {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b
    }

    /// Parse and check a header at the start of `b` (the body is not looked at).
    pub fn parse(b: &[u8]) -> Result<Header, SyncError> {
        let bad = |why: String| Err(SyncError::Corrupt(why));
        if b.len() < 16 {
            return bad(format!(
                "{} bytes is shorter than the 16-byte header",
                b.len()
            ));
        }
        if b[..4] != MAGIC {
            return bad(format!(
                "magic {:?} is not {:?} (not packed ternary weights)",
                &b[..4],
                std::str::from_utf8(&MAGIC).unwrap_or("")
            ));
        }
        if b[4] != VERSION {
            return bad(format!(
                "format version {}, this build reads version {VERSION}",
                b[4]
            ));
        }
        let dtype = b[5];
        if dtype > DTYPE_BF16 {
            return bad(format!("unknown dtype code {dtype}"));
        }
        let ndim = b[6] as usize;
        if ndim > MAX_NDIM {
            return bad(format!("{ndim} dimensions (at most {MAX_NDIM})"));
        }
        let per_row = match b[7] {
            0 => false,
            1 => true,
            f => return bad(format!("unknown flags {f:#x}")),
        };
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(w)
        };
        let group = u64_at(8);
        if b.len() < 16 + 8 * ndim {
            return bad(format!(
                "{} bytes is shorter than the header of a {ndim}-D tensor",
                b.len()
            ));
        }
        let shape: Vec<u64> = (0..ndim).map(|i| u64_at(16 + 8 * i)).collect();
        let h = Header {
            dtype,
            per_row,
            group,
            shape,
        };
        h.groups().map_err(|e| match e {
            SyncError::BadGroup(_) => SyncError::Corrupt(e.to_string()),
            e => e,
        })?;
        if per_row && group != row_group(&h.shape) {
            return bad(format!(
                "per-row group {group} does not match shape {:?}",
                h.shape
            ));
        }
        Ok(h)
    }
}

/// Parse and validate a whole serialized tensor; returns its header. Sizes come from the
/// header and are checked against `b.len()` before anything is read, so nothing is allocated
/// from a crafted size.
pub fn check(b: &[u8]) -> Result<Header, SyncError> {
    let h = Header::parse(b)?;
    let g = h.groups()?;
    check_body(&g, &b[h.header_len()..])?;
    Ok(h)
}

/// Serialized bytes of a tensor of `shape` in groups of `group` (`None`: per row): the
/// format's size function.
pub fn nbytes(shape: &[u64], group: Option<u64>) -> Result<u64, SyncError> {
    if shape.len() > MAX_NDIM {
        return Err(SyncError::Corrupt(format!(
            "{} dimensions (at most {MAX_NDIM})",
            shape.len()
        )));
    }
    let h = Header {
        dtype: DTYPE_F32,
        per_row: group.is_none(),
        group: group.unwrap_or_else(|| row_group(shape)),
        shape: shape.to_vec(),
    };
    Ok((h.header_len() + h.groups()?.body_len()) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(x: &[f32], group: usize) -> (Vec<f32>, Vec<u8>, Vec<f32>) {
        let g = Groups::new(x.len() as u64, group as u64).unwrap();
        let mut scales = vec![0f32; g.count()];
        let mut codes = vec![0u8; g.codes_len()];
        pack(x, group, Rule::AbsMean, &mut scales, &mut codes).unwrap();
        let mut out = vec![0f32; x.len()];
        unpack(&scales, &codes, group, &mut out).unwrap();
        (scales, codes, out)
    }

    /// Reference pack: one group at a time, f64 throughout (as the torch twin).
    fn reference(x: &[f32], group: usize, rule: Rule) -> Vec<f32> {
        let mut out = Vec::new();
        for xg in x.chunks(group) {
            let m = xg.iter().fold(0f32, |a, v| a.max(v.abs()));
            let e = (((m as f64).to_bits() >> 52) & 0x7ff) as i64 - 1022;
            let u = pow2(FIXED_BITS - e.max(-148));
            let q: Vec<u64> = xg.iter().map(|v| (v.abs() as f64 * u) as u64).collect();
            let gamma = q.iter().sum::<u64>() as f64 / xg.len() as f64 / u;
            let cand = |th: f64| {
                let nz: Vec<bool> = xg.iter().map(|v| 2.0 * v.abs() as f64 > th).collect();
                let k = nz.iter().filter(|&&b| b).count() as u64;
                let snz: u64 = q.iter().zip(&nz).filter(|(_, &b)| b).map(|(q, _)| q).sum();
                let en = if k == 0 {
                    0.0
                } else {
                    snz as f64 * (snz as f64 / k as f64)
                };
                (nz, k, snz, en)
            };
            let mut c = cand(gamma);
            if rule == Rule::Adaptive {
                let b = cand(m as f64);
                if b.3 > c.3 {
                    c = b;
                }
            }
            let (nz, k, snz, _) = c;
            let s = if k == 0 {
                0.0
            } else {
                (snz as f64 / k as f64 / u) as f32
            };
            for (v, &b) in xg.iter().zip(&nz) {
                out.push(if b { s * v.signum() } else { 0.0 });
            }
        }
        out
    }

    fn round_trip_rule(x: &[f32], group: usize, rule: Rule) -> Vec<f32> {
        let g = Groups::new(x.len() as u64, group as u64).unwrap();
        let mut scales = vec![0f32; g.count()];
        let mut codes = vec![0u8; g.codes_len()];
        pack(x, group, rule, &mut scales, &mut codes).unwrap();
        let mut out = vec![0f32; x.len()];
        unpack(&scales, &codes, group, &mut out).unwrap();
        out
    }

    proptest! {
        #[test]
        fn ternary_weights_round_trip_exactly(
            t in prop::collection::vec(-1i8..=1, 1..600),
            s in prop::collection::vec(1e-30f32..1e30, 1..8),
            group in 1usize..130,
        ) {
            let x: Vec<f32> = t.iter().enumerate()
                .map(|(i, &c)| s[(i / group) % s.len()] * c as f32).collect();
            for rule in [Rule::AbsMean, Rule::Adaptive] {
                prop_assert_eq!(&round_trip_rule(&x, group, rule), &x);
            }
        }

        #[test]
        fn matches_the_reference_at_any_magnitude(
            m in prop::collection::vec((-1f32..1.0, 0u32..12), 1..400),
            base in 0i32..254,
            group in 1usize..500,
        ) {
            // Groups whose largest magnitude lies anywhere from subnormal to 2^127.
            let x: Vec<f32> = m.iter()
                .map(|&(f, e)| f * f32::from_bits(((base + 1 - e as i32).max(1) as u32) << 23))
                .map(|v| if v.is_finite() { v } else { 0.0 })
                .collect();
            for rule in [Rule::AbsMean, Rule::Adaptive] {
                prop_assert_eq!(round_trip_rule(&x, group, rule), reference(&x, group, rule));
            }
        }

        #[test]
        fn matches_the_reference(x in prop::collection::vec(-10f32..10.0, 1..3000),
                                 group in 1usize..5000) {
            for rule in [Rule::AbsMean, Rule::Adaptive] {
                prop_assert_eq!(round_trip_rule(&x, group, rule), reference(&x, group, rule));
            }
        }


    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]
        #[test]
        fn mutated_serialization_never_panics(
            x in prop::collection::vec(-1f32..1.0, 1..300),
            rows in 1u64..4,
            flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            let n = x.len() as u64 / rows * rows;
            prop_assume!(n > 0);
            let h = Header { dtype: 0, per_row: true, group: n / rows, shape: vec![rows, n / rows] };
            let g = h.groups().unwrap();
            let mut scales = vec![0f32; g.count()];
            let mut codes = vec![0u8; g.codes_len()];
            pack(&x[..n as usize], h.group as usize, Rule::Adaptive, &mut scales, &mut codes).unwrap();
            let mut b = h.write();
            b.extend(scales.iter().flat_map(|s| s.to_le_bytes()));
            b.extend(&codes);
            prop_assert_eq!(check(&b), Ok(h));
            for (i, v) in flips {
                let i = i % b.len();
                b[i] = v;
            }
            let _ = check(&b);
            b.truncate(cut % (b.len() + 1));
            let _ = check(&b);
        }
    }

    // Malformed input (the reliability issue): 20,000 arbitrary byte strings, most starting with
    // a valid header prefix so that they get past the magic, and 5,000 mutated serializations.
    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]
        #[test]
        fn arbitrary_bytes_never_panic(
            b in prop::collection::vec(any::<u8>(), 0..200),
            prefix in any::<bool>(),
        ) {
            let mut b = b;
            if prefix && b.len() >= 8 {
                b[..5].copy_from_slice(b"TPK3\x01");
                b[5] %= 4;
                b[6] %= 4;
                b[7] %= 2;
            }
            let _ = check(&b);
        }
    }

    #[test]
    fn threads_do_not_change_the_result() {
        let x: Vec<f32> = (0..300_001)
            .map(|i| ((i * 7919) % 1000) as f32 - 500.0)
            .collect();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let four = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        for group in [7, 4096, 300_001] {
            let a = one.install(|| round_trip(&x, group));
            let b = four.install(|| round_trip(&x, group));
            assert_eq!(a.1, b.1);
            assert_eq!(a.0, b.0);
        }
    }

    #[test]
    fn absmean_threshold_and_known_answer() {
        // mean |w| = 0.8: |w| > 0.4 becomes +-1, the scale is the mean of those magnitudes.
        let x = [0.3f32, -0.6, 2.2, 0.0, -0.9];
        let (s, c, out) = round_trip(&x, 5);
        let want = (0.6f32 as f64 + 2.2f32 as f64 + 0.9f32 as f64) / 3.0;
        assert_eq!(s, vec![want as f32]);
        // codes 1, 0, 2, 1, 0 -> 1 + 0 + 18 + 27 + 0
        assert_eq!(c, vec![46]);
        assert_eq!(out, vec![0.0, -s[0], s[0], 0.0, -s[0]]);
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut s = [0f32; 1];
        let mut c = [0u8; 1];
        assert_eq!(
            pack(&[1.0, f32::NAN], 2, Rule::AbsMean, &mut s, &mut c),
            Err(SyncError::NonFinite)
        );
        assert!(matches!(
            pack(&[1.0f32], 0, Rule::AbsMean, &mut s, &mut c),
            Err(SyncError::BadGroup(0))
        ));
        let mut out = [0f32; 2];
        assert!(unpack(&[1.0], &[243], 2, &mut out).is_err());
        assert!(unpack(&[1.0], &[9], 2, &mut out).is_err()); // padding code not 0
        assert!(unpack(&[1.0], &[8], 2, &mut out).is_ok());
        assert!(unpack(&[-1.0], &[8], 2, &mut out).is_err());
        assert!(unpack(&[f32::NAN], &[8], 2, &mut out).is_err());
    }

    #[test]
    fn header_round_trip_and_limits() {
        let h = Header {
            dtype: 2,
            per_row: true,
            group: 4096,
            shape: vec![11008, 4096],
        };
        assert_eq!(Header::parse(&h.write()), Ok(h.clone()));
        let mut b = h.write();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Header::parse(&b).is_err());
        assert_eq!(nbytes(&[4096, 4096], None).unwrap(), 32 + 4096 * (4 + 820));
        assert!(nbytes(&[1 << 41], Some(1)).is_err());
    }
}
