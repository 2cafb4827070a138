//! Unnormalized Walsh-Hadamard transform in place (docs/FORMAT.md, step 3). The stage order is
//! part of the wire format: stages h = 1, 2, 4, ... in ascending order, butterfly
//! `(a, b) -> (a + b, a - b)`. Two consecutive stages are fused into one pass over memory
//! (radix 4), which performs the same additions in the same order, so the result is bit-identical
//! to the plain radix-2 loop (`fwht_reference`).
//!
//! The block kernels (`kernel.rs`) run the same stages on 16-lane vectors: h = 1..8 inside a
//! vector (`lanes::*::wht16`), h >= 16 between whole vectors, three stages to a pass over memory
//! (`RADIX8_PAIRS`).

/// Reference radix-2 transform, the literal definition.
pub fn fwht_reference(v: &mut [f32]) {
    let n = v.len();
    assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for g in v.chunks_exact_mut(2 * h) {
            let (a, b) = g.split_at_mut(h);
            for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                let (p, q) = (*x, *y);
                *x = p + q;
                *y = p - q;
            }
        }
        h *= 2;
    }
}

/// Stages 1, 2 and 4 on each group of 8 elements.
#[inline(always)]
fn radix8_small(v: &mut [f32]) {
    for g in v.chunks_exact_mut(8) {
        let mut x = [0f32; 8];
        x.copy_from_slice(g);
        // h = 1
        let a = [
            x[0] + x[1],
            x[0] - x[1],
            x[2] + x[3],
            x[2] - x[3],
            x[4] + x[5],
            x[4] - x[5],
            x[6] + x[7],
            x[6] - x[7],
        ];
        // h = 2
        let b = [
            a[0] + a[2],
            a[1] + a[3],
            a[0] - a[2],
            a[1] - a[3],
            a[4] + a[6],
            a[5] + a[7],
            a[4] - a[6],
            a[5] - a[7],
        ];
        // h = 4
        g[0] = b[0] + b[4];
        g[1] = b[1] + b[5];
        g[2] = b[2] + b[6];
        g[3] = b[3] + b[7];
        g[4] = b[0] - b[4];
        g[5] = b[1] - b[5];
        g[6] = b[2] - b[6];
        g[7] = b[3] - b[7];
    }
}

/// Stages h and 2h fused: groups of 4h split in quarters q0..q3.
#[inline(always)]
fn radix4_stage(v: &mut [f32], h: usize) {
    for g in v.chunks_exact_mut(4 * h) {
        let (q01, q23) = g.split_at_mut(2 * h);
        let (q0, q1) = q01.split_at_mut(h);
        let (q2, q3) = q23.split_at_mut(h);
        for i in 0..h {
            let (a0, a1, a2, a3) = (q0[i], q1[i], q2[i], q3[i]);
            // stage h
            let (b0, b1) = (a0 + a1, a0 - a1);
            let (b2, b3) = (a2 + a3, a2 - a3);
            // stage 2h
            q0[i] = b0 + b2;
            q2[i] = b0 - b2;
            q1[i] = b1 + b3;
            q3[i] = b1 - b3;
        }
    }
}

#[inline(always)]
fn radix2_stage(v: &mut [f32], h: usize) {
    for g in v.chunks_exact_mut(2 * h) {
        let (a, b) = g.split_at_mut(h);
        for i in 0..h {
            let (p, q) = (a[i], b[i]);
            a[i] = p + q;
            b[i] = p - q;
        }
    }
}

/// Three consecutive stages h, 2h, 4h on 8 values standing h apart, as butterflies between
/// positions `(i, j)` in this order: `(a_i, a_j) -> (a_i + a_j, a_i - a_j)`.
pub const RADIX8_PAIRS: [(usize, usize); 12] = [
    (0, 1),
    (2, 3),
    (4, 5),
    (6, 7),
    (0, 2),
    (1, 3),
    (4, 6),
    (5, 7),
    (0, 4),
    (1, 5),
    (2, 6),
    (3, 7),
];

/// The transform used by the codec. `v.len()` must be a power of two.
#[inline(always)]
pub fn fwht(v: &mut [f32]) {
    let n = v.len();
    debug_assert!(n.is_power_of_two());
    if n < 8 {
        fwht_reference(v);
        return;
    }
    radix8_small(v);
    let mut h = 8;
    while 4 * h <= n {
        radix4_stage(v, h);
        h *= 4;
    }
    if h < n {
        radix2_stage(v, h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matches_reference_bit_for_bit() {
        for log in 0..=16 {
            let n = 1usize << log;
            let mut a: Vec<f32> = (0..n)
                .map(|i| ((i as f32) * 0.37).sin() * 1e3 + (i % 7) as f32 * 1e-4)
                .collect();
            let mut b = a.clone();
            fwht(&mut a);
            fwht_reference(&mut b);
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "n = {n}"
            );
        }
    }

    #[test]
    fn small_known_answer() {
        let mut v = vec![1.0, 0.0, 0.0, 0.0];
        fwht(&mut v);
        assert_eq!(v, vec![1.0, 1.0, 1.0, 1.0]);
        let mut v = vec![1.0, 2.0, 3.0, 4.0];
        fwht(&mut v);
        assert_eq!(v, vec![10.0, -2.0, -4.0, 0.0]);
    }

    #[test]
    fn radix8_pairs_are_three_stages() {
        let a: Vec<f32> = (0..8).map(|i| (i as f32 * 1.7).sin() * 1e3).collect();
        let mut r = a.clone();
        fwht_reference(&mut r);
        let mut b = a;
        for (i, j) in RADIX8_PAIRS {
            let (p, q) = (b[i], b[j]);
            b[i] = p + q;
            b[j] = p - q;
        }
        assert!(b.iter().zip(&r).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    proptest! {
        #[test]
        fn twice_is_n_times_identity(log in 0u32..12, seed in any::<u64>()) {
            let n = 1usize << log;
            let mut s = seed;
            let orig: Vec<f32> = (0..n).map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            }).collect();
            let mut v = orig.clone();
            fwht(&mut v);
            fwht(&mut v);
            for (x, y) in v.iter().zip(&orig) {
                let back = x / n as f32;
                prop_assert!((back - y).abs() <= 1e-5 * (1.0 + y.abs()) * (log as f32 + 1.0));
            }
        }
    }
}
