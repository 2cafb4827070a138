use super::*;
use crate::simd;
use half::{bf16, f16};
use proptest::prelude::*;

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    // Box-Muller on a 64-bit LCG: deterministic and good enough for error statistics.
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (next(), next());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect()
}

fn params(mode: Mode, block_log2: u8) -> Params {
    Params {
        mode,
        block_log2,
        seed: 42,
        stream: 7,
        unbiased: false,
    }
}

fn enc(x: &[f32], e: Option<&mut [f32]>, p: &Params) -> Vec<u8> {
    let lay = Layout::new(x.len(), p.block_log2, p.mode).unwrap();
    let mut out = vec![0u8; lay.body_len()];
    encode(x, e, p, &mut out, true).unwrap();
    out
}

fn dec(body: &[u8], n: usize, p: &Params) -> Vec<f32> {
    let mut out = vec![0f32; n];
    decode(body, p, &mut out).unwrap();
    out
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (num / den).sqrt()
}

const MODES: [(Mode, f64); 3] = [
    (Mode::Ternary, 0.46),
    (Mode::Sign, 0.62),
    (Mode::Int2, 0.36),
];

#[test]
fn error_within_mode_bound_on_gaussian() {
    let x = gaussian(1 << 18, 1);
    for (mode, bound) in MODES {
        for b in [8u8, 10, 12, 16] {
            let p = params(mode, b);
            let y = dec(&enc(&x, None, &p), x.len(), &p);
            let r = rel_err(&x, &y);
            eprintln!("gauss {mode:?} 2^{b}: {r}");
            assert!(r < bound, "{mode:?} 2^{b}: {r}");
        }
    }
}

/// int2's unbiased scale: each decoded block's projection on its input is the input's squared
/// norm (least squares': the decoded block's own), and over fresh streams the mean of the
/// decoded vectors converges to the input, where least squares' stays shrunk (by about 0.88).
#[test]
fn unbiased_int2_scale() {
    let n = 1 << 14;
    let b = 1usize << 10;
    // a block-to-block ramp: not one Gaussian
    let x: Vec<f32> = gaussian(n, 5)
        .iter()
        .enumerate()
        .map(|(i, v)| v * (0.1 + 3.0 * i as f32 / n as f32))
        .collect();
    let k = 200;
    for unbiased in [false, true] {
        let mut mean = vec![0f64; n];
        for step in 0..k {
            let p = Params {
                stream: step,
                unbiased,
                ..params(Mode::Int2, 10)
            };
            let y = dec(&enc(&x, None, &p), n, &p);
            for (xb, yb) in x.chunks(b).zip(y.chunks(b)) {
                let xy: f64 = xb
                    .iter()
                    .zip(yb)
                    .map(|(a, c)| (*a as f64) * (*c as f64))
                    .sum();
                let own: f64 = (if unbiased { xb } else { yb })
                    .iter()
                    .map(|a| (*a as f64).powi(2))
                    .sum();
                assert!(
                    (xy / own - 1.0).abs() < 1e-4,
                    "unbiased={unbiased} {xy} {own}"
                );
            }
            for (m, v) in mean.iter_mut().zip(&y) {
                *m += *v as f64 / k as f64;
            }
        }
        let xx: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
        let proj: f64 = x.iter().zip(&mean).map(|(a, m)| *a as f64 * m).sum::<f64>() / xx;
        if unbiased {
            assert!((proj - 1.0).abs() < 0.01, "{proj}");
        } else {
            assert!(proj < 0.92, "{proj}");
        }
    }
}

#[test]
fn spread_tames_heavy_tails() {
    // A few huge spikes among small values: the spread makes each block near-Gaussian.
    let mut x = gaussian(1 << 16, 2);
    for i in (0..x.len()).step_by(4099) {
        x[i] *= 1000.0;
    }
    for (mode, bound) in MODES {
        let p = params(mode, 10);
        let r = rel_err(&x, &dec(&enc(&x, None, &p), x.len(), &p));
        eprintln!("heavy {mode:?}: {r}");
        assert!(r < bound, "{mode:?}: {r}");
    }
}

#[test]
fn error_feedback_loses_nothing() {
    let n = 5000;
    for (mode, _) in MODES {
        let p = params(mode, 8);
        let mut e = vec![0f32; n];
        let mut sum_in = vec![0f64; n];
        let mut sum_out = vec![0f64; n];
        for step in 0..40 {
            let x = gaussian(n, 100 + step);
            let p = Params { stream: step, ..p };
            let body = enc(&x, Some(&mut e), &p);
            let y = dec(&body, n, &p);
            for i in 0..n {
                sum_in[i] += x[i] as f64;
                sum_out[i] += y[i] as f64;
            }
        }
        let mut worst = 0f64;
        for i in 0..n {
            worst = worst.max((sum_in[i] - sum_out[i] - e[i] as f64).abs());
        }
        assert!(worst < 1e-4, "{mode:?}: {worst}");
    }
}

#[test]
fn residual_matches_decode_exactly() {
    // e_new = (x + e_old) - decode(payload), computed in f32 exactly as the decoder would.
    let n = 3000;
    let x = gaussian(n, 3);
    let e0: Vec<f32> = gaussian(n, 4).iter().map(|v| v * 0.1).collect();
    for (mode, _) in MODES {
        let p = params(mode, 9);
        let mut e = e0.clone();
        let body = enc(&x, Some(&mut e), &p);
        let y = dec(&body, n, &p);
        for i in 0..n {
            assert_eq!(e[i], (x[i] + e0[i]) - y[i]);
        }
        assert_eq!(
            body,
            enc(
                &x.iter().zip(&e0).map(|(a, b)| a + b).collect::<Vec<_>>(),
                None,
                &p
            )
        );
    }
}

#[test]
fn identical_across_thread_counts_and_simd_levels() {
    let x = gaussian(300_001, 5);
    let mut results = Vec::new();
    for level in [simd::Level::Scalar, simd::Level::Avx2, simd::Level::Avx512] {
        simd::set_level(level);
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for (mode, _) in MODES {
                let p = params(mode, 8);
                let mut e = vec![0.01f32; x.len()];
                let body = pool.install(|| enc(&x, Some(&mut e), &p));
                let y = pool.install(|| dec(&body, x.len(), &p));
                results.push((
                    mode,
                    body,
                    e,
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                ));
            }
        }
    }
    simd::set_level(simd::detected());
    for r in &results[3..] {
        let first = results.iter().find(|f| f.0 == r.0).unwrap();
        assert!(
            first.1 == r.1 && first.2 == r.2 && first.3 == r.3,
            "{:?} differs",
            r.0
        );
    }
}

#[test]
fn half_precision_inputs() {
    let x = gaussian(10_000, 6);
    let xb: Vec<bf16> = x.iter().map(|v| <bf16 as Elem>::from_f32(*v)).collect();
    let xh: Vec<f16> = x.iter().map(|v| <f16 as Elem>::from_f32(*v)).collect();
    let p = params(Mode::Ternary, 10);
    let lay = Layout::new(x.len(), 10, Mode::Ternary).unwrap();
    let mut body = vec![0u8; lay.body_len()];
    let mut eb = vec![bf16::ZERO; x.len()];
    encode(&xb, Some(&mut eb), &p, &mut body, true).unwrap();
    let mut yb = vec![bf16::ZERO; x.len()];
    decode(&body, &p, &mut yb).unwrap();
    let yf: Vec<f32> = yb.iter().map(|v| v.to_f32()).collect();
    assert!(rel_err(&x, &yf) < 0.46);
    encode(&xh, None, &p, &mut body, true).unwrap();
    let mut yh = vec![f16::ZERO; x.len()];
    decode(&body, &p, &mut yh).unwrap();
    let yf: Vec<f32> = yh.iter().map(|v| v.to_f32()).collect();
    assert!(rel_err(&x, &yf) < 0.46);
}

#[test]
fn bad_inputs_are_errors() {
    let p = params(Mode::Ternary, 8);
    let mut out = vec![0u8; 100];
    assert_eq!(
        encode::<f32>(&[], None, &p, &mut out, true),
        Err(CodecError::Empty)
    );
    let bad = Params { block_log2: 7, ..p };
    assert_eq!(
        encode(&[1.0f32], None, &bad, &mut out, true),
        Err(CodecError::BadBlockSize(7))
    );
    let bad = Params {
        block_log2: 17,
        ..p
    };
    assert_eq!(
        encode(&[1.0f32], None, &bad, &mut out, true),
        Err(CodecError::BadBlockSize(17))
    );
    // wrong output length
    assert!(matches!(
        encode(&[1.0f32; 10], None, &p, &mut out, true),
        Err(CodecError::Length { .. })
    ));
    // NaN: error, and the residual is untouched
    let mut x = gaussian(1000, 7);
    x[999] = f32::NAN;
    let lay = Layout::new(1000, 8, Mode::Ternary).unwrap();
    let mut out = vec![0u8; lay.body_len()];
    let mut e = vec![0.5f32; 1000];
    assert_eq!(
        encode(&x, Some(&mut e), &p, &mut out, true),
        Err(CodecError::NonFinite)
    );
    assert!(e.iter().all(|v| *v == 0.5));
    x[999] = f32::INFINITY;
    assert_eq!(
        encode(&x, None, &p, &mut out, true),
        Err(CodecError::NonFinite)
    );
    // NaN in the residual
    x[999] = 0.0;
    e[0] = f32::NAN;
    assert_eq!(
        encode(&x, Some(&mut e), &p, &mut out, true),
        Err(CodecError::NonFinite)
    );
    // corrupted body: an invalid base-3 byte, and a truncated one
    e[0] = 0.0;
    encode(&x, None, &p, &mut out, true).unwrap();
    let mut y = vec![0f32; 1000];
    let last = out.len() - 1;
    out[last] = 250;
    assert!(matches!(
        decode(&out, &p, &mut y),
        Err(CodecError::Corrupt(_))
    ));
    assert!(matches!(
        decode(&out[..last], &p, &mut y),
        Err(CodecError::Length { .. })
    ));
}

#[test]
fn overflow_when_spread_leaves_residual_untouched() {
    // Finite inputs whose spread overflows f32 (a block sum of 1024 values near f32::MAX): an
    // error found in the first pass, after the blocks before it were encoded; with the check the
    // residual is untouched, without it the blocks before the bad one are updated.
    let n = 4096;
    let mut x = gaussian(n, 8);
    x[3000..3100].fill(3e38);
    for mode in [Mode::Ternary, Mode::Sign, Mode::Int2] {
        let p = params(mode, 10);
        let lay = Layout::new(n, 10, mode).unwrap();
        let mut out = vec![0u8; lay.body_len()];
        let mut e = vec![0.25f32; n];
        assert_eq!(
            encode(&x, Some(&mut e), &p, &mut out, true),
            Err(CodecError::NonFinite)
        );
        assert!(e.iter().all(|v| *v == 0.25), "{mode:?}");
        assert_eq!(
            encode(&x, Some(&mut e), &p, &mut out, false),
            Err(CodecError::NonFinite)
        );
        assert!(e[..1024].iter().any(|v| *v != 0.25), "{mode:?}");
    }
}

#[test]
fn compression_ratio() {
    for (mode, bits) in [(Mode::Ternary, 1.6), (Mode::Sign, 1.0), (Mode::Int2, 2.0)] {
        let lay = Layout::new(1 << 20, 12, mode).unwrap();
        let per = lay.body_len() as f64 * 8.0 / (1 << 20) as f64;
        assert!(per < bits + 0.02, "{mode:?}: {per} bits/element");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn round_trip_any_length(n in 1usize..5000, b in 8u8..11, m in 0u8..3, seed in any::<u64>(),
                             stream in any::<u64>()) {
        let mode = Mode::from_u8(m).unwrap();
        let p = Params { mode, block_log2: b, seed, stream, unbiased: false };
        let x = gaussian(n, seed);
        let body = enc(&x, None, &p);
        let y = dec(&body, n, &p);
        // least squares never does worse than sending zeros
        let err: f64 = x.iter().zip(&y).map(|(a, c)| ((a - c) as f64).powi(2)).sum();
        let tot: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
        prop_assert!(err <= tot * 1.0001 + 1e-9);
        if n >= 256 {
            prop_assert!((err / tot).sqrt() < 0.7);
        }
        // decode(encode(decode(encode(x)))) is a fixed point for ternary and sign: the decoded
        // vector spreads back to exactly representable levels.
        let rem = n % (1usize << b);
        if mode != Mode::Int2 && (rem == 0 || rem.is_power_of_two()) {
            let body2 = enc(&y, None, &p);
            let y2 = dec(&body2, n, &p);
            let d: f64 = y.iter().zip(&y2).map(|(a, c)| ((a - c) as f64).powi(2)).sum();
            prop_assert!(d <= 1e-8 * tot + 1e-12, "not a fixed point: {}", d);
        }
    }

    #[test]
    fn decode_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600),
                                           n in 1usize..1200, m in 0u8..3) {
        let p = Params { mode: Mode::from_u8(m).unwrap(), block_log2: 8, seed: 1, stream: 2, unbiased: false };
        let mut out = vec![0f32; n];
        let _ = decode(&bytes, &p, &mut out);
    }
}
