//! The gradient predictor of the phase-based optimizer wrapper (`tritter_comm/optim/`): an
//! exponentially weighted least-squares line per element over the history of synchronized
//! gradients, kept as running sums, O(D) memory.
//!
//! Time is recentred on the newest observation (its time is 0, older ones are negative), so the
//! sums stay bounded by the decay whatever the step count. Per element the state is
//! `G = Σ w·g` and `TG = Σ w·τ·g` (f32 vectors); the shared scalars `W = Σ w`, `T = Σ w·τ`,
//! `TT = Σ w·τ²` live in f64 on the Python side, which turns them into the two coefficients
//! `(alpha, beta)` of the prediction `alpha·G + beta·TG`. These kernels are the element-wise
//! part only: [`observe`] folds a new gradient into the sums (optionally measuring first how
//! well the current sums predicted it), [`predict`] writes a prediction.
//!
//! The arithmetic is written as the torch backend writes it, one rounding per operation and no
//! fused multiply-add, so both give the same bits: `observe` is `tmp = lag·G; TG = (TG − tmp)·d;
//! G = G·d + g`, `predict` is `alpha·G + beta·TG`. Work is split in fixed chunks of
//! [`CHUNK`] elements; the f64 sums of the measurement are added chunk by chunk in order, so the
//! result does not depend on the number of threads.

use std::fmt;

use rayon::prelude::*;

/// Elements per parallel chunk (fixed: reductions are summed per chunk, then in chunk order).
pub const CHUNK: usize = 1 << 14;

/// Errors of the predictor kernels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PredictError {
    /// Two vectors that must have the same length do not.
    Length {
        what: &'static str,
        got: usize,
        want: usize,
    },
}

impl fmt::Display for PredictError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PredictError::Length { what, got, want } => {
                write!(f, "{what} has {got} elements, expected {want}")
            }
        }
    }
}

impl std::error::Error for PredictError {}

/// How close a prediction `p` came to the gradient `g`: `dot = Σ p·g`, `pp = Σ p²`, `gg = Σ g²`,
/// accumulated in f64.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Quality {
    pub dot: f64,
    pub pp: f64,
    pub gg: f64,
}

impl Quality {
    fn add(self, o: Quality) -> Quality {
        Quality {
            dot: self.dot + o.dot,
            pp: self.pp + o.pp,
            gg: self.gg + o.gg,
        }
    }

    /// Cosine similarity of prediction and gradient (0 when either is zero).
    pub fn cosine(&self) -> f64 {
        let d = (self.pp * self.gg).sqrt();
        if d > 0.0 {
            self.dot / d
        } else {
            0.0
        }
    }
}

fn check(what: &'static str, got: usize, want: usize) -> Result<(), PredictError> {
    if got == want {
        Ok(())
    } else {
        Err(PredictError::Length { what, got, want })
    }
}

#[inline]
fn observe_chunk(
    g: &[f32],
    sg: &mut [f32],
    stg: &mut [f32],
    lag: f32,
    decay: f32,
    coef: Option<(f32, f32)>,
) -> Quality {
    let mut q = Quality::default();
    if let Some((a, b)) = coef {
        for ((&x, &s), &t) in g.iter().zip(sg.iter()).zip(stg.iter()) {
            let p = a * s + b * t;
            let (p, x) = (p as f64, x as f64);
            q.dot += p * x;
            q.pp += p * p;
            q.gg += x * x;
        }
    }
    for ((&x, s), t) in g.iter().zip(sg.iter_mut()).zip(stg.iter_mut()) {
        let tmp = lag * *s;
        *t = (*t - tmp) * decay;
        *s = *s * decay + x;
    }
    q
}

/// Fold the gradient `g`, observed `lag` steps after the previous observation, into the sums:
/// every older time shifts by `-lag`, every weight is multiplied by `decay`, and `g` enters at
/// time 0 with weight 1. With `coef = Some((alpha, beta))`, first measure the prediction
/// `alpha·G + beta·TG` of the sums as they were against `g`.
pub fn observe(
    g: &[f32],
    sum_g: &mut [f32],
    sum_tg: &mut [f32],
    lag: f32,
    decay: f32,
    coef: Option<(f32, f32)>,
) -> Result<Quality, PredictError> {
    check("sum_g", sum_g.len(), g.len())?;
    check("sum_tg", sum_tg.len(), g.len())?;
    let parts: Vec<Quality> = g
        .par_chunks(CHUNK)
        .zip(sum_g.par_chunks_mut(CHUNK))
        .zip(sum_tg.par_chunks_mut(CHUNK))
        .map(|((g, sg), stg)| observe_chunk(g, sg, stg, lag, decay, coef))
        .collect();
    Ok(parts.into_iter().fold(Quality::default(), Quality::add))
}

/// Write the prediction `alpha·G + beta·TG` into `out`.
pub fn predict(
    sum_g: &[f32],
    sum_tg: &[f32],
    alpha: f32,
    beta: f32,
    out: &mut [f32],
) -> Result<(), PredictError> {
    check("sum_g", sum_g.len(), out.len())?;
    check("sum_tg", sum_tg.len(), out.len())?;
    out.par_chunks_mut(CHUNK)
        .zip(sum_g.par_chunks(CHUNK))
        .zip(sum_tg.par_chunks(CHUNK))
        .for_each(|((o, s), t)| {
            for ((o, &s), &t) in o.iter_mut().zip(s).zip(t) {
                *o = alpha * s + beta * t;
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The least-squares line, fitted directly over an explicit history (f64 reference).
    fn reference(hist: &[(f64, f64)], decay: f64, t_next: f64) -> f64 {
        let n = hist.len();
        let (mut w, mut t, mut tt, mut g, mut tg) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (i, &(ti, gi)) in hist.iter().enumerate() {
            let wi = decay.powi((n - 1 - i) as i32);
            w += wi;
            t += wi * ti;
            tt += wi * ti * ti;
            g += wi * gi;
            tg += wi * ti * gi;
        }
        let d = w * tt - t * t;
        if d <= 1e-9 * w * w {
            return g / w;
        }
        let b = (w * tg - t * g) / d;
        (g - b * t) / w + b * t_next
    }

    /// The scalar side as tritter_comm/optim/_predictor.py computes it.
    struct Scalars {
        w: f64,
        t: f64,
        tt: f64,
    }

    impl Scalars {
        fn observe(&mut self, lag: f64, decay: f64) {
            let (w, t, tt) = (self.w, self.t, self.tt);
            self.w = decay * w + 1.0;
            self.t = decay * (t - lag * w);
            self.tt = decay * (tt - 2.0 * lag * t + lag * lag * w);
        }
        fn coef(&self, h: f64) -> (f32, f32) {
            let d = self.w * self.tt - self.t * self.t;
            if d <= 1e-9 * self.w * self.w {
                return ((1.0 / self.w) as f32, 0.0);
            }
            let m = h - self.t / self.w;
            (
                (1.0 / self.w - m * self.t / d) as f32,
                (m * self.w / d) as f32,
            )
        }
    }

    #[test]
    fn fits_a_line_exactly() {
        // g = 3 + 0.5 t: any weighting recovers the line, and the prediction extrapolates it.
        let decay = 0.9f32;
        let mut sg = vec![0.0f32; 1];
        let mut stg = vec![0.0f32; 1];
        let mut s = Scalars {
            w: 0.0,
            t: 0.0,
            tt: 0.0,
        };
        for step in 0..20 {
            let g = 3.0 + 0.5 * step as f32;
            observe(&[g], &mut sg, &mut stg, 1.0, decay, None).unwrap();
            s.observe(1.0, decay as f64);
        }
        let (a, b) = s.coef(1.0);
        let mut out = [0.0f32];
        predict(&sg, &stg, a, b, &mut out).unwrap();
        assert!((out[0] - (3.0 + 0.5 * 20.0)).abs() < 1e-3, "{}", out[0]);
    }

    #[test]
    fn one_observation_predicts_itself() {
        let mut sg = vec![0.0f32; 3];
        let mut stg = vec![0.0f32; 3];
        let mut s = Scalars {
            w: 0.0,
            t: 0.0,
            tt: 0.0,
        };
        observe(&[1.0, -2.0, 0.5], &mut sg, &mut stg, 1.0, 0.8, None).unwrap();
        s.observe(1.0, 0.8);
        let (a, b) = s.coef(1.0);
        let mut out = [0.0f32; 3];
        predict(&sg, &stg, a, b, &mut out).unwrap();
        assert_eq!(out, [1.0, -2.0, 0.5]);
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let mut sg = vec![0.0f32; 2];
        let mut stg = vec![0.0f32; 3];
        let e = observe(&[1.0, 2.0, 3.0], &mut sg, &mut stg, 1.0, 0.9, None).unwrap_err();
        assert_eq!(e.to_string(), "sum_g has 2 elements, expected 3");
        let mut out = [0.0f32; 3];
        assert!(predict(&sg, &stg, 1.0, 0.0, &mut out).is_err());
    }

    #[test]
    fn result_does_not_depend_on_thread_count() {
        let n = 5 * CHUNK + 123;
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 333.0 - 1.5)
            .collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut sg = vec![0.25f32; n];
                let mut stg = vec![-0.5f32; n];
                let q = observe(&g, &mut sg, &mut stg, 2.0, 0.9, Some((0.7, 0.1))).unwrap();
                (q, sg, stg)
            })
        };
        let (q1, a1, b1) = run(1);
        let (q3, a3, b3) = run(3);
        assert_eq!(q1, q3);
        assert_eq!(a1, a3);
        assert_eq!(b1, b3);
    }

    proptest! {
        #[test]
        fn matches_the_direct_weighted_fit(
            gs in proptest::collection::vec(-10.0f64..10.0, 1..30),
            lags in proptest::collection::vec(1u32..4, 30),
            decay in 0.5f64..0.99,
            h in 1u32..4,
        ) {
            let mut sg = vec![0.0f32; 1];
            let mut stg = vec![0.0f32; 1];
            let mut s = Scalars { w: 0.0, t: 0.0, tt: 0.0 };
            let mut hist = Vec::new();
            let mut time = 0.0f64;
            for (i, &g) in gs.iter().enumerate() {
                time += lags[i] as f64;
                hist.push((time, g));
                observe(&[g as f32], &mut sg, &mut stg, lags[i] as f32, decay as f32, None).unwrap();
                s.observe(lags[i] as f64, decay as f32 as f64);
            }
            let (a, b) = s.coef(h as f64);
            let mut out = [0.0f32];
            predict(&sg, &stg, a, b, &mut out).unwrap();
            let want = reference(&hist, decay as f32 as f64, time + h as f64);
            let scale = 1.0 + gs.iter().fold(0.0f64, |m, g| m.max(g.abs())) * 50.0;
            prop_assert!((out[0] as f64 - want).abs() <= 2e-3 * scale,
                         "got {} want {}", out[0], want);
        }
    }
}
