//! Per-block quantization of the spread vector `z` (docs/FORMAT.md, step 5): the codes and the
//! one scale per block. Sums are tree sums (`tree_sum`), whose order is part of the format, so the
//! torch codec reproduces them bit for bit.

use crate::codec::Mode;

/// Threshold of the ternary mode, relative to mean |z|. For a Gaussian block the
/// least-squares-optimal threshold is 0.612 sigma = 0.767 mean|z|; 0.75 is within 0.1% of its
/// error (relative L2 error 0.436).
pub const TERNARY_TAU: f32 = 0.75;
/// Threshold of int2 on z^2 relative to mean z^2: (0.9957 sigma)^2, the optimal uniform
/// 4-level quantizer of a Gaussian.
pub const INT2_TAU2: f32 = 0.99142;

/// The tree sum of the format: `while len > 1 { v = v[..len/2] + v[len/2..] }`. Destroys `v`.
#[inline(always)]
pub fn tree_sum(v: &mut [f32]) -> f32 {
    let mut len = v.len();
    debug_assert!(len.is_power_of_two());
    while len > 1 {
        let h = len / 2;
        let (a, b) = v[..len].split_at_mut(h);
        for (x, y) in a.iter_mut().zip(b.iter()) {
            *x += *y;
        }
        len = h;
    }
    v[0]
}

/// int2's unbiased scale `|z|^2 / <z, m>` (DRIVE/EDEN): the decoded block's projection on `z`
/// is `z` itself, where least squares' `<z, m> / <m, m>` shrinks it by the cosine squared of `z`
/// and its levels `m`. With fresh keys every step the decoded vector is then an unbiased
/// estimate of the input, which is what an exchange without error feedback wants. `q2` is
/// TS(z * z), `num` TS(|z| * m) = <z, m>; 0 for a zero block.
#[inline(always)]
pub fn unbiased_scale(q2: f32, num: f32, lf: f32) -> f32 {
    if num == 0.0 {
        0.0
    } else {
        (q2 / num) / lf
    }
}

/// Quantize block `z` (length L, a power of two) into `codes`; returns the scale, or `None` if a
/// sum is not finite. `tmp` is scratch of length L. `unbiased`: int2's scale is
/// `unbiased_scale` instead of least squares (the other modes ignore it: `Params` refuses it).
#[inline(always)]
pub fn quantize(
    z: &[f32],
    mode: Mode,
    unbiased: bool,
    codes: &mut [u8],
    tmp: &mut [f32],
) -> Option<f32> {
    let l = z.len();
    let lf = l as f32;
    let tmp = &mut tmp[..l];
    let codes = &mut codes[..l];
    match mode {
        Mode::Ternary => {
            for (t, x) in tmp.iter_mut().zip(z) {
                *t = x.abs();
            }
            let s = tree_sum(tmp);
            if !s.is_finite() {
                return None;
            }
            let thr = TERNARY_TAU * (s / lf);
            let mut cnt = 0u32;
            for ((t, c), x) in tmp.iter_mut().zip(codes.iter_mut()).zip(z) {
                let a = x.abs();
                let keep = a > thr;
                cnt += keep as u32;
                *t = if keep { a } else { 0.0 };
                // sign(z) + 1 when kept, else 1 (z != 0 when kept, since thr >= 0).
                *c = if keep {
                    if *x > 0.0 {
                        2
                    } else {
                        0
                    }
                } else {
                    1
                };
            }
            if cnt == 0 {
                return Some(0.0);
            }
            let sel = tree_sum(tmp);
            Some((sel / cnt as f32) / lf)
        }
        Mode::Sign => {
            for ((t, c), x) in tmp.iter_mut().zip(codes.iter_mut()).zip(z) {
                *t = x.abs();
                *c = (*x >= 0.0) as u8;
            }
            let s = tree_sum(tmp);
            if !s.is_finite() {
                return None;
            }
            Some((s / lf) / lf)
        }
        Mode::Int2 => {
            for (t, x) in tmp.iter_mut().zip(z) {
                *t = x * x;
            }
            let q2 = tree_sum(tmp);
            if !q2.is_finite() {
                return None;
            }
            // Start from the Gaussian-optimal threshold, then one Lloyd step: re-split at the
            // midpoint 2a between the levels a and 3a of the least-squares scale a. On a
            // Gaussian block this changes little; on a bimodal one (a spike spread over the
            // block) it halves the error.
            let thr2 = INT2_TAU2 * (q2 / lf);
            for (c, x) in codes.iter_mut().zip(z) {
                *c = int2_code(*x, x * x > thr2);
            }
            let (num, den) = int2_sums(z, codes, tmp);
            let thr = 2.0 * (num / den);
            for (c, x) in codes.iter_mut().zip(z) {
                *c = int2_code(*x, x.abs() > thr);
            }
            let (num, den) = int2_sums(z, codes, tmp);
            Some(if unbiased {
                unbiased_scale(q2, num, lf)
            } else {
                (num / den) / lf
            })
        }
    }
}

#[inline(always)]
fn int2_code(x: f32, big: bool) -> u8 {
    match (x >= 0.0, big) {
        (false, true) => 0,
        (false, false) => 1,
        (true, false) => 2,
        (true, true) => 3,
    }
}

/// The least-squares sums of int2: TS(|z| * m) and TS(m * m), m = 3 or 1.
#[inline(always)]
fn int2_sums(z: &[f32], codes: &[u8], tmp: &mut [f32]) -> (f32, f32) {
    for ((t, c), x) in tmp.iter_mut().zip(codes).zip(z) {
        let m = if *c == 0 || *c == 3 { 3.0f32 } else { 1.0 };
        *t = x.abs() * m;
    }
    let num = tree_sum(tmp);
    for (t, c) in tmp.iter_mut().zip(codes) {
        *t = if *c == 0 || *c == 3 { 9.0 } else { 1.0 };
    }
    (num, tree_sum(tmp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_sum_order() {
        // (1e8 + 1) + (-1e8 + 1): the tree pairs v[0] with v[2] and v[1] with v[3].
        let mut v = [1e8f32, 1e8, 1.0, -1e8 - 0.0];
        let s = tree_sum(&mut v);
        assert_eq!(s, (1e8f32 + 1.0) + (1e8f32 + -1e8));
    }

    #[test]
    fn ternary_of_ternary_is_exact() {
        let z = [3.0f32, -3.0, 0.0, 3.0, 0.0, 0.0, -3.0, 3.0];
        let mut codes = [0u8; 8];
        let mut tmp = [0f32; 8];
        let s = quantize(&z, Mode::Ternary, false, &mut codes, &mut tmp).unwrap();
        assert_eq!(codes, [2, 0, 1, 2, 1, 1, 0, 2]);
        assert_eq!(s * 8.0, 3.0);
    }

    #[test]
    fn zero_block_has_zero_scale() {
        let z = [0f32; 16];
        let mut codes = [0u8; 16];
        let mut tmp = [0f32; 16];
        for m in [Mode::Ternary, Mode::Sign, Mode::Int2] {
            assert_eq!(quantize(&z, m, false, &mut codes, &mut tmp), Some(0.0));
        }
    }
}
