//! The thin PyO3 layer: `tritter_comm._native`. Arrays arrive zero-copy from numpy (CPU torch
//! tensors are viewed as numpy arrays; f16/bf16 as u16). All O(n) work runs with the GIL
//! released, on a rayon pool of the requested size.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use half::f16;
use half::slice::HalfBitsSliceExt;
use numpy::{PyReadonlyArray1, PyReadwriteArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::codec::{self, CodecError, Layout, Mode, Params};
use crate::elem::Elem;
use crate::simd;

impl From<CodecError> for PyErr {
    fn from(e: CodecError) -> PyErr {
        PyValueError::new_err(e.to_string())
    }
}

fn pool(threads: usize) -> Result<Arc<rayon::ThreadPool>, CodecError> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(p) = pools.get(&threads) {
        return Ok(p.clone());
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("tritter-comm-{i}"))
        .build()
        .map_err(|_| CodecError::Corrupt("could not start the thread pool"))?;
    let p = Arc::new(p);
    pools.insert(threads, p.clone());
    Ok(p)
}

/// Run `f` without the GIL, on `threads` threads (0: rayon's global pool), mapping errors.
fn run<R: Send>(
    py: Python<'_>,
    threads: usize,
    f: impl FnOnce() -> Result<R, CodecError> + Send,
) -> PyResult<R> {
    py.detach(|| {
        if threads == 0 {
            f()
        } else {
            pool(threads)?.install(f)
        }
    })
    .map_err(PyErr::from)
}

fn params(mode: u8, block_log2: u8, seed: u64, stream: u64, unbiased: bool) -> PyResult<Params> {
    let mode = Mode::from_u8(mode).ok_or(CodecError::BadMode(mode))?;
    if unbiased && mode != Mode::Int2 {
        return Err(PyValueError::new_err(format!(
            "the unbiased scale is int2's (mode 2), got mode {}",
            mode as u8
        )));
    }
    Ok(Params {
        mode,
        block_log2,
        seed,
        stream,
        unbiased,
    })
}

fn contiguous<'a, T: numpy::Element>(
    a: &'a PyReadonlyArray1<'_, T>,
    what: &str,
) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{what} must be contiguous")))
}

fn contiguous_mut<'a, T: numpy::Element>(
    a: &'a mut PyReadwriteArray1<'_, T>,
    what: &str,
) -> PyResult<&'a mut [T]> {
    a.as_slice_mut()
        .map_err(|_| PyValueError::new_err(format!("{what} must be contiguous")))
}

#[allow(clippy::too_many_arguments)]
fn encode_any<T: Elem, S: numpy::Element>(
    py: Python<'_>,
    x: PyReadonlyArray1<'_, S>,
    mut out: PyReadwriteArray1<'_, u8>,
    residual: Option<PyReadwriteArray1<'_, S>>,
    p: Params,
    threads: usize,
    check_finite: bool,
    cast: impl Fn(&[S]) -> &[T],
    cast_mut: impl Fn(&mut [S]) -> &mut [T],
) -> PyResult<()> {
    let x = cast(contiguous(&x, "x")?);
    let out = contiguous_mut(&mut out, "out")?;
    match residual {
        Some(mut r) => {
            let r = cast_mut(contiguous_mut(&mut r, "residual")?);
            run(py, threads, || {
                codec::encode(x, Some(r), &p, out, check_finite)
            })
        }
        None => run(py, threads, || {
            codec::encode(x, None, &p, out, check_finite)
        }),
    }
}

fn decode_any<T: Elem, S: numpy::Element>(
    py: Python<'_>,
    body: PyReadonlyArray1<'_, u8>,
    mut out: PyReadwriteArray1<'_, S>,
    p: Params,
    threads: usize,
    cast_mut: impl Fn(&mut [S]) -> &mut [T],
) -> PyResult<()> {
    let body = contiguous(&body, "payload body")?;
    let out = cast_mut(contiguous_mut(&mut out, "out")?);
    run(py, threads, || codec::decode(body, &p, out))
}

/// Encode a float32 vector into `out` (`body_nbytes` bytes); with `residual`, encode
/// `x + residual` and leave the new residual in it. NaN or Inf raises `ValueError`; with
/// `check_finite` (the default) the residual is then untouched (it is updated in a second pass
/// once every block is known finite), without it part of it may be updated. `unbiased`: int2's
/// scale is the unbiased `|z|^2 / <z, m>` instead of least squares (`ValueError` in other modes).
#[pyfunction]
#[pyo3(signature = (x, out, mode, block_log2, seed, stream, residual=None, threads=0, check_finite=true, unbiased=false))]
#[allow(clippy::too_many_arguments)]
fn encode_f32(
    py: Python<'_>,
    x: PyReadonlyArray1<'_, f32>,
    out: PyReadwriteArray1<'_, u8>,
    mode: u8,
    block_log2: u8,
    seed: u64,
    stream: u64,
    residual: Option<PyReadwriteArray1<'_, f32>>,
    threads: usize,
    check_finite: bool,
    unbiased: bool,
) -> PyResult<()> {
    let p = params(mode, block_log2, seed, stream, unbiased)?;
    encode_any::<f32, f32>(py, x, out, residual, p, threads, check_finite, |s| s, |s| s)
}

/// Encode a float16 (`half=False`) or bfloat16 (`half=True`) vector given as its u16 bits.
#[pyfunction]
#[pyo3(signature = (x, out, bf16, mode, block_log2, seed, stream, residual=None, threads=0, check_finite=true, unbiased=false))]
#[allow(clippy::too_many_arguments)]
fn encode_u16(
    py: Python<'_>,
    x: PyReadonlyArray1<'_, u16>,
    out: PyReadwriteArray1<'_, u8>,
    bf16: bool,
    mode: u8,
    block_log2: u8,
    seed: u64,
    stream: u64,
    residual: Option<PyReadwriteArray1<'_, u16>>,
    threads: usize,
    check_finite: bool,
    unbiased: bool,
) -> PyResult<()> {
    let p = params(mode, block_log2, seed, stream, unbiased)?;
    if bf16 {
        encode_any::<half::bf16, u16>(
            py,
            x,
            out,
            residual,
            p,
            threads,
            check_finite,
            |s| s.reinterpret_cast::<half::bf16>(),
            |s| s.reinterpret_cast_mut::<half::bf16>(),
        )
    } else {
        encode_any::<f16, u16>(
            py,
            x,
            out,
            residual,
            p,
            threads,
            check_finite,
            |s| s.reinterpret_cast::<f16>(),
            |s| s.reinterpret_cast_mut::<f16>(),
        )
    }
}

/// Decode a payload body into a float32 vector `out`.
#[pyfunction]
#[pyo3(signature = (body, out, mode, block_log2, seed, stream, threads=0))]
#[allow(clippy::too_many_arguments)]
fn decode_f32(
    py: Python<'_>,
    body: PyReadonlyArray1<'_, u8>,
    out: PyReadwriteArray1<'_, f32>,
    mode: u8,
    block_log2: u8,
    seed: u64,
    stream: u64,
    threads: usize,
) -> PyResult<()> {
    let p = params(mode, block_log2, seed, stream, false)?;
    decode_any::<f32, f32>(py, body, out, p, threads, |s| s)
}

/// Decode a payload body into a float16 or bfloat16 vector given as u16 bits.
#[pyfunction]
#[pyo3(signature = (body, out, bf16, mode, block_log2, seed, stream, threads=0))]
#[allow(clippy::too_many_arguments)]
fn decode_u16(
    py: Python<'_>,
    body: PyReadonlyArray1<'_, u8>,
    out: PyReadwriteArray1<'_, u16>,
    bf16: bool,
    mode: u8,
    block_log2: u8,
    seed: u64,
    stream: u64,
    threads: usize,
) -> PyResult<()> {
    let p = params(mode, block_log2, seed, stream, false)?;
    if bf16 {
        decode_any::<half::bf16, u16>(py, body, out, p, threads, |s| {
            s.reinterpret_cast_mut::<half::bf16>()
        })
    } else {
        decode_any::<f16, u16>(py, body, out, p, threads, |s| {
            s.reinterpret_cast_mut::<f16>()
        })
    }
}

/// Bytes of the body (scales and packed blocks) of a vector of `n` elements.
#[pyfunction]
fn body_nbytes(n: usize, mode: u8, block_log2: u8) -> PyResult<usize> {
    let mode = Mode::from_u8(mode).ok_or(CodecError::BadMode(mode))?;
    Ok(Layout::new(n, block_log2, mode)?.body_len())
}

/// CPU features detected at run time.
#[pyfunction]
fn cpu_features() -> Vec<&'static str> {
    simd::cpu_features()
}

/// The instruction set the kernels use: "scalar", "avx2" or "avx512".
#[pyfunction]
fn simd_level() -> &'static str {
    simd::level().name()
}

/// Cap the kernels' instruction set ("scalar", "avx2", "avx512"); returns the level in force.
#[pyfunction]
fn set_simd_level(name: &str) -> PyResult<&'static str> {
    let l = match name {
        "scalar" => simd::Level::Scalar,
        "avx2" => simd::Level::Avx2,
        "avx512" => simd::Level::Avx512,
        _ => {
            return Err(PyValueError::new_err(format!(
                "unknown SIMD level {name:?}"
            )))
        }
    };
    Ok(simd::set_level(l).name())
}

/// Threads in rayon's global pool.
#[pyfunction]
fn default_threads() -> usize {
    rayon::current_num_threads()
}

// -- the gradient predictor of tritter_comm.optim (src/predict.rs) ------------------------------

impl From<crate::predict::PredictError> for PyErr {
    fn from(e: crate::predict::PredictError) -> PyErr {
        PyValueError::new_err(e.to_string())
    }
}

/// Run `f` without the GIL on `threads` threads (0: rayon's global pool).
fn run_predict<R: Send>(
    py: Python<'_>,
    threads: usize,
    f: impl FnOnce() -> Result<R, crate::predict::PredictError> + Send,
) -> PyResult<R> {
    if threads == 0 {
        return py.detach(f).map_err(PyErr::from);
    }
    let p = pool(threads)?;
    py.detach(|| p.install(f)).map_err(PyErr::from)
}

/// Fold the float32 gradient `g`, observed `lag` steps after the previous one, into the
/// predictor's running sums `sum_g` and `sum_tg` (in place), with weight decay `decay`.
/// With `coef=(alpha, beta)`, first measure the prediction `alpha*sum_g + beta*sum_tg` against
/// `g`; returns `(dot, pp, gg)` (f64 sums of p*g, p*p, g*g; zeros without `coef`).
#[pyfunction]
#[pyo3(signature = (g, sum_g, sum_tg, lag, decay, coef=None, threads=0))]
#[allow(clippy::too_many_arguments)]
fn predict_observe(
    py: Python<'_>,
    g: PyReadonlyArray1<'_, f32>,
    mut sum_g: PyReadwriteArray1<'_, f32>,
    mut sum_tg: PyReadwriteArray1<'_, f32>,
    lag: f32,
    decay: f32,
    coef: Option<(f32, f32)>,
    threads: usize,
) -> PyResult<(f64, f64, f64)> {
    let g = contiguous(&g, "g")?;
    let sg = contiguous_mut(&mut sum_g, "sum_g")?;
    let stg = contiguous_mut(&mut sum_tg, "sum_tg")?;
    let q = run_predict(py, threads, || {
        crate::predict::observe(g, sg, stg, lag, decay, coef)
    })?;
    Ok((q.dot, q.pp, q.gg))
}

/// Write the prediction `alpha*sum_g + beta*sum_tg` into the float32 vector `out`.
#[pyfunction]
#[pyo3(signature = (sum_g, sum_tg, alpha, beta, out, threads=0))]
fn predict_apply(
    py: Python<'_>,
    sum_g: PyReadonlyArray1<'_, f32>,
    sum_tg: PyReadonlyArray1<'_, f32>,
    alpha: f32,
    beta: f32,
    mut out: PyReadwriteArray1<'_, f32>,
    threads: usize,
) -> PyResult<()> {
    let sg = contiguous(&sum_g, "sum_g")?;
    let stg = contiguous(&sum_tg, "sum_tg")?;
    let out = contiguous_mut(&mut out, "out")?;
    run_predict(py, threads, || {
        crate::predict::predict(sg, stg, alpha, beta, out)
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // One constant per format (docs/FORMAT.md): the payload's and the packed weights'.
    m.add("FORMAT_VERSION", codec::FORMAT_VERSION)?;
    m.add("SYNC_FORMAT_VERSION", wsync::VERSION)?;
    m.add("SYNC_MAGIC", PyBytes::new(m.py(), &wsync::MAGIC))?;
    m.add_function(wrap_pyfunction!(encode_f32, m)?)?;
    m.add_function(wrap_pyfunction!(encode_u16, m)?)?;
    m.add_function(wrap_pyfunction!(decode_f32, m)?)?;
    m.add_function(wrap_pyfunction!(decode_u16, m)?)?;
    m.add_function(wrap_pyfunction!(body_nbytes, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_features, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(default_threads, m)?)?;
    m.add_function(wrap_pyfunction!(sync_pack_f32, m)?)?;
    m.add_function(wrap_pyfunction!(sync_pack_u16, m)?)?;
    m.add_function(wrap_pyfunction!(sync_unpack_f32, m)?)?;
    m.add_function(wrap_pyfunction!(sync_unpack_u16, m)?)?;
    m.add_function(wrap_pyfunction!(sync_header, m)?)?;
    m.add_function(wrap_pyfunction!(sync_check, m)?)?;
    m.add_function(wrap_pyfunction!(sync_nbytes, m)?)?;
    m.add_function(wrap_pyfunction!(sync_row_group, m)?)?;
    m.add_function(wrap_pyfunction!(predict_observe, m)?)?;
    m.add_function(wrap_pyfunction!(predict_apply, m)?)?;
    Ok(())
}

// ------------------------------------------------------------------ packed-ternary weights

use crate::sync::{self as wsync, SyncError};
use pyo3::types::PyBytes;

impl From<SyncError> for PyErr {
    fn from(e: SyncError) -> PyErr {
        PyValueError::new_err(e.to_string())
    }
}

/// `run` for the weight-sync core: without the GIL, on `threads` threads (0: global pool).
fn run_sync<R: Send>(
    py: Python<'_>,
    threads: usize,
    f: impl FnOnce() -> Result<R, SyncError> + Send,
) -> PyResult<R> {
    py.detach(|| {
        if threads == 0 {
            f().map_err(PyErr::from)
        } else {
            pool(threads)
                .map_err(PyErr::from)?
                .install(f)
                .map_err(PyErr::from)
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn sync_pack_any<T: wsync::Weight, S: numpy::Element>(
    py: Python<'_>,
    x: PyReadonlyArray1<'_, S>,
    group: usize,
    mut scales: PyReadwriteArray1<'_, f32>,
    mut codes: PyReadwriteArray1<'_, u8>,
    threads: usize,
    adaptive: bool,
    cast: impl Fn(&[S]) -> &[T],
) -> PyResult<()> {
    let x = cast(contiguous(&x, "w")?);
    let scales = contiguous_mut(&mut scales, "scales")?;
    let codes = contiguous_mut(&mut codes, "codes")?;
    let rule = if adaptive {
        wsync::Rule::Adaptive
    } else {
        wsync::Rule::AbsMean
    };
    run_sync(py, threads, || wsync::pack(x, group, rule, scales, codes))
}

fn sync_unpack_any<T: wsync::Weight, S: numpy::Element>(
    py: Python<'_>,
    scales: PyReadonlyArray1<'_, f32>,
    codes: PyReadonlyArray1<'_, u8>,
    group: usize,
    mut out: PyReadwriteArray1<'_, S>,
    threads: usize,
    cast_mut: impl Fn(&mut [S]) -> &mut [T],
) -> PyResult<()> {
    let scales = contiguous(&scales, "scales")?;
    let codes = contiguous(&codes, "codes")?;
    let out = cast_mut(contiguous_mut(&mut out, "out")?);
    run_sync(py, threads, || wsync::unpack(scales, codes, group, out))
}

/// Quantize a flat float32 tensor to ternary in groups of `group` (BitNet b1.58 absmean) and
/// pack it: one scale a group into `scales`, five trits a byte into `codes`. `adaptive`: the
/// better of absmean and max/2 thresholds per group (for deltas).
#[pyfunction]
#[pyo3(signature = (w, group, scales, codes, threads=0, adaptive=false))]
fn sync_pack_f32(
    py: Python<'_>,
    w: PyReadonlyArray1<'_, f32>,
    group: usize,
    scales: PyReadwriteArray1<'_, f32>,
    codes: PyReadwriteArray1<'_, u8>,
    threads: usize,
    adaptive: bool,
) -> PyResult<()> {
    sync_pack_any::<f32, f32>(py, w, group, scales, codes, threads, adaptive, |s| s)
}

/// `sync_pack_f32` of a float16 (`bf16=False`) or bfloat16 tensor given as its u16 bits.
#[pyfunction]
#[pyo3(signature = (w, bf16, group, scales, codes, threads=0, adaptive=false))]
#[allow(clippy::too_many_arguments)]
fn sync_pack_u16(
    py: Python<'_>,
    w: PyReadonlyArray1<'_, u16>,
    bf16: bool,
    group: usize,
    scales: PyReadwriteArray1<'_, f32>,
    codes: PyReadwriteArray1<'_, u8>,
    threads: usize,
    adaptive: bool,
) -> PyResult<()> {
    if bf16 {
        sync_pack_any::<half::bf16, u16>(py, w, group, scales, codes, threads, adaptive, |s| {
            s.reinterpret_cast::<half::bf16>()
        })
    } else {
        sync_pack_any::<f16, u16>(py, w, group, scales, codes, threads, adaptive, |s| {
            s.reinterpret_cast::<f16>()
        })
    }
}

/// Decode packed ternary weights into a float32 vector `out`, validating scales and bytes.
#[pyfunction]
#[pyo3(signature = (scales, codes, group, out, threads=0))]
fn sync_unpack_f32(
    py: Python<'_>,
    scales: PyReadonlyArray1<'_, f32>,
    codes: PyReadonlyArray1<'_, u8>,
    group: usize,
    out: PyReadwriteArray1<'_, f32>,
    threads: usize,
) -> PyResult<()> {
    sync_unpack_any::<f32, f32>(py, scales, codes, group, out, threads, |s| s)
}

/// Decode packed ternary weights into a float16 or bfloat16 vector given as u16 bits.
#[pyfunction]
#[pyo3(signature = (scales, codes, group, out, bf16, threads=0))]
fn sync_unpack_u16(
    py: Python<'_>,
    scales: PyReadonlyArray1<'_, f32>,
    codes: PyReadonlyArray1<'_, u8>,
    group: usize,
    out: PyReadwriteArray1<'_, u16>,
    bf16: bool,
    threads: usize,
) -> PyResult<()> {
    if bf16 {
        sync_unpack_any::<half::bf16, u16>(py, scales, codes, group, out, threads, |s| {
            s.reinterpret_cast_mut::<half::bf16>()
        })
    } else {
        sync_unpack_any::<f16, u16>(py, scales, codes, group, out, threads, |s| {
            s.reinterpret_cast_mut::<f16>()
        })
    }
}

/// The header of a serialized packed tensor (docs/FORMAT.md, "Packed ternary weights").
#[pyfunction]
fn sync_header<'py>(
    py: Python<'py>,
    dtype: u8,
    per_row: bool,
    group: u64,
    shape: Vec<u64>,
) -> PyResult<Bound<'py, PyBytes>> {
    let h = wsync::Header {
        dtype,
        per_row,
        group,
        shape,
    };
    if h.shape.len() > wsync::MAX_NDIM {
        return Err(PyValueError::new_err(format!(
            "{} dimensions, the format holds at most {}",
            h.shape.len(),
            wsync::MAX_NDIM
        )));
    }
    Ok(PyBytes::new(py, &h.write()))
}

/// Validate a whole serialized packed tensor; returns `(dtype, per_row, group, shape,
/// header_nbytes)`. Anything malformed raises `ValueError`.
#[pyfunction]
#[pyo3(signature = (b, threads=0))]
fn sync_check(
    py: Python<'_>,
    b: &[u8],
    threads: usize,
) -> PyResult<(u8, bool, u64, Vec<u64>, usize)> {
    let h = run_sync(py, threads, || wsync::check(b))?;
    let hl = h.header_len();
    Ok((h.dtype, h.per_row, h.group, h.shape, hl))
}

/// Serialized bytes of a tensor of `shape` in groups of `group` (None: per row).
#[pyfunction]
#[pyo3(signature = (shape, group=None))]
fn sync_nbytes(shape: Vec<u64>, group: Option<u64>) -> PyResult<u64> {
    Ok(wsync::nbytes(&shape, group)?)
}

/// The per-row group of `shape`: `numel / shape[0]` (a 1-D tensor is one row).
#[pyfunction]
fn sync_row_group(shape: Vec<u64>) -> u64 {
    wsync::row_group(&shape)
}
