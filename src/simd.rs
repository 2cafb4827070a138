//! Runtime choice of the instruction set for the block kernels (`kernel.rs`), which are compiled
//! once per level against the lane functions of `lanes.rs`: portable loops, AVX2 or AVX-512
//! intrinsics. None of them uses fused multiply-add or reassociates sums, so every level gives
//! bit-identical results (tested in `lanes`, `kernel` and `codec::tests`).

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Scalar = 0,
    Avx2 = 1,
    Avx512 = 2,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

const UNSET: u8 = 255;
static LEVEL: AtomicU8 = AtomicU8::new(UNSET);

/// The best level this CPU supports.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        // The kernels of both levels also use BMI2 and POPCNT (every AVX2 CPU has them), and
        // enable FMA (never used for a sum or product, which Rust does not contract).
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("bmi2")
            && is_x86_feature_detected!("popcnt");
        if avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
        {
            return Level::Avx512;
        }
        if avx2 {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// The level in use: `TRITTER_COMM_SIMD=scalar|avx2|avx512` caps it, else the detected one.
pub fn level() -> Level {
    let v = LEVEL.load(Ordering::Relaxed);
    if v != UNSET {
        return from_u8(v);
    }
    let best = detected();
    let chosen = match std::env::var("TRITTER_COMM_SIMD").ok().as_deref() {
        Some("scalar") => Level::Scalar,
        Some("avx2") if best as u8 >= Level::Avx2 as u8 => Level::Avx2,
        _ => best,
    };
    LEVEL.store(chosen as u8, Ordering::Relaxed);
    chosen
}

/// Force a level (capped at what the CPU supports); used by tests and benchmarks.
pub fn set_level(l: Level) -> Level {
    let best = detected();
    let l = if l as u8 > best as u8 { best } else { l };
    LEVEL.store(l as u8, Ordering::Relaxed);
    l
}

fn from_u8(v: u8) -> Level {
    match v {
        2 => Level::Avx512,
        1 => Level::Avx2,
        _ => Level::Scalar,
    }
}

/// CPU features relevant to the kernels, as detected at run time.
pub fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        for (name, on) in [
            ("sse4.2", is_x86_feature_detected!("sse4.2")),
            ("avx", is_x86_feature_detected!("avx")),
            ("avx2", is_x86_feature_detected!("avx2")),
            ("fma", is_x86_feature_detected!("fma")),
            ("bmi2", is_x86_feature_detected!("bmi2")),
            ("popcnt", is_x86_feature_detected!("popcnt")),
            ("avx512f", is_x86_feature_detected!("avx512f")),
            ("avx512bw", is_x86_feature_detected!("avx512bw")),
            ("avx512vl", is_x86_feature_detected!("avx512vl")),
        ] {
            if on {
                v.push(name);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    v.push("neon");
    v
}
