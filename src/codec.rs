//! Encode and decode of one flat vector (docs/FORMAT.md). The body is one f32 scale per block
//! followed by the packed blocks; blocks are independent, so they run on rayon's pool and the
//! result does not depend on the thread count. The 32-byte payload header is written and parsed
//! by the Python layer.

use std::fmt;

use rayon::prelude::*;

use crate::elem::Elem;
use crate::hadamard::fwht;
use crate::keys::{bind, StreamKeys};
use crate::pack::{pack, packed_len, Tables};
use crate::quant::quantize;

pub const MIN_BLOCK_LOG2: u8 = 8;
pub const MAX_BLOCK_LOG2: u8 = 16;
/// Positions are hashed in 32-position words indexed by a u32.
pub const MAX_LEN: u64 = 1 << 37;
/// Elements per rayon task, at least.
const MIN_TASK_ELEMS: usize = 1 << 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Ternary = 0,
    Sign = 1,
    Int2 = 2,
}

impl Mode {
    pub fn from_u8(v: u8) -> Option<Mode> {
        match v {
            0 => Some(Mode::Ternary),
            1 => Some(Mode::Sign),
            2 => Some(Mode::Int2),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CodecError {
    Empty,
    TooLong(u64),
    BadMode(u8),
    BadBlockSize(u8),
    NonFinite,
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    Corrupt(&'static str),
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodecError::Empty => write!(f, "cannot encode an empty tensor"),
            CodecError::TooLong(n) => write!(
                f,
                "tensor of {n} elements exceeds the format's limit of 2^37"
            ),
            CodecError::BadMode(m) => write!(f, "unknown mode {m} (0 ternary, 1 sign, 2 int2)"),
            CodecError::BadBlockSize(b) => write!(
                f,
                "block size 2^{b} is outside 2^{MIN_BLOCK_LOG2}..2^{MAX_BLOCK_LOG2} (256 to 65536)"
            ),
            CodecError::NonFinite => write!(
                f,
                "input contains NaN or Inf (or overflows float32 when spread)"
            ),
            CodecError::Length {
                what,
                expected,
                got,
            } => {
                write!(f, "{what} has length {got}, expected {expected}")
            }
            CodecError::Corrupt(why) => write!(f, "corrupted payload: {why}"),
        }
    }
}

impl std::error::Error for CodecError {}

/// What both ends must agree on to encode and decode a vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub mode: Mode,
    pub block_log2: u8,
    pub seed: u64,
    pub stream: u64,
}

/// Block structure of a vector of `n` elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub n: usize,
    pub block: usize,
    pub nfull: usize,
    /// Size of the padded tail block, 0 if none.
    pub tail: usize,
    pub mode: Mode,
}

impl Layout {
    pub fn new(n: usize, block_log2: u8, mode: Mode) -> Result<Layout, CodecError> {
        if n == 0 {
            return Err(CodecError::Empty);
        }
        if n as u64 > MAX_LEN {
            return Err(CodecError::TooLong(n as u64));
        }
        if !(MIN_BLOCK_LOG2..=MAX_BLOCK_LOG2).contains(&block_log2) {
            return Err(CodecError::BadBlockSize(block_log2));
        }
        let block = 1usize << block_log2;
        let nfull = n / block;
        let rem = n % block;
        let tail = if rem == 0 { 0 } else { rem.next_power_of_two() };
        Ok(Layout {
            n,
            block,
            nfull,
            tail,
            mode,
        })
    }

    pub fn nblocks(&self) -> usize {
        self.nfull + (self.tail > 0) as usize
    }

    /// Packed bytes of one full block.
    pub fn packed_block(&self) -> usize {
        packed_len(self.block, self.mode)
    }

    pub fn body_len(&self) -> usize {
        4 * self.nblocks()
            + self.nfull * self.packed_block()
            + if self.tail > 0 {
                packed_len(self.tail, self.mode)
            } else {
                0
            }
    }

    /// Size of block `i` (the tail's padded size for the last one).
    fn block_len(&self, i: usize) -> usize {
        if i < self.nfull {
            self.block
        } else {
            self.tail
        }
    }

    fn min_task_blocks(&self) -> usize {
        (MIN_TASK_ELEMS / self.block).max(1)
    }
}

/// Scratch buffers of one worker.
struct Scratch {
    buf: Vec<f32>,
    tmp: Vec<f32>,
    codes: Vec<u8>,
}

impl Scratch {
    fn new(block: usize) -> Self {
        Scratch {
            buf: vec![0.0; block],
            tmp: vec![0.0; block],
            codes: vec![0; block],
        }
    }
}

#[inline(always)]
fn levels_table(mode: Mode) -> [f32; 4] {
    match mode {
        Mode::Ternary => [-1.0, 0.0, 1.0, 0.0],
        Mode::Sign => [-1.0, 1.0, 0.0, 0.0],
        Mode::Int2 => [-3.0, -1.0, 1.0, 3.0],
    }
}

/// Encode one block; with `e`, also leave the new residual in it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn encode_block_impl<T: Elem>(
    x: &[T],
    e: Option<&mut [T]>,
    l: usize,
    offset: u64,
    keys: &StreamKeys,
    mode: Mode,
    s: &mut Scratch,
    data: &mut [u8],
    scale_out: &mut [u8],
) -> Result<(), CodecError> {
    let n_in = x.len();
    let buf = &mut s.buf[..l];
    match &e {
        Some(e) => {
            for ((b, xv), ev) in buf.iter_mut().zip(x).zip(e.iter()) {
                *b = xv.to_f32() + ev.to_f32();
            }
        }
        None => {
            for (b, xv) in buf.iter_mut().zip(x) {
                *b = xv.to_f32();
            }
        }
    }
    buf[n_in..].fill(0.0);
    bind(buf, keys, offset);
    fwht(buf);
    let codes = &mut s.codes[..l];
    let scale = quantize(buf, mode, codes, &mut s.tmp).ok_or(CodecError::NonFinite)?;
    pack(codes, mode, data);
    scale_out.copy_from_slice(&scale.to_le_bytes());
    if let Some(e) = e {
        let lv = levels_table(mode);
        for (b, &c) in buf.iter_mut().zip(codes.iter()) {
            *b = lv[(c & 3) as usize];
        }
        fwht(buf);
        for b in buf.iter_mut() {
            *b *= scale;
        }
        bind(buf, keys, offset);
        for ((ev, xv), xh) in e.iter_mut().zip(x).zip(buf.iter()) {
            let u = xv.to_f32() + ev.to_f32();
            *ev = T::from_f32(u - *xh);
        }
    }
    Ok(())
}

crate::dispatch!(fn encode_block<T: Elem>(
    x: &[T], e: Option<&mut [T]>, l: usize, offset: u64, keys: &StreamKeys, mode: Mode,
    s: &mut Scratch, data: &mut [u8], scale_out: &mut [u8]
) -> Result<(), CodecError> => encode_block_impl);

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decode_block_impl<T: Elem>(
    data: &[u8],
    scale: f32,
    l: usize,
    offset: u64,
    keys: &StreamKeys,
    mode: Mode,
    s: &mut Scratch,
    out: &mut [T],
) -> Result<(), CodecError> {
    let buf = &mut s.buf[..l];
    if !Tables::get().unpack_levels(data, mode, buf) {
        return Err(CodecError::Corrupt("a ternary byte is above 242"));
    }
    fwht(buf);
    for b in buf.iter_mut() {
        *b *= scale;
    }
    bind(buf, keys, offset);
    for (o, b) in out.iter_mut().zip(buf.iter()) {
        *o = T::from_f32(*b);
    }
    Ok(())
}

crate::dispatch!(fn decode_block<T: Elem>(
    data: &[u8], scale: f32, l: usize, offset: u64, keys: &StreamKeys, mode: Mode,
    s: &mut Scratch, out: &mut [T]
) -> Result<(), CodecError> => decode_block_impl);

fn all_finite<T: Elem>(x: &[T]) -> bool {
    x.par_chunks(MIN_TASK_ELEMS)
        .all(|c| c.iter().fold(true, |ok, v| ok & v.is_finite()))
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), CodecError> {
    if expected == got {
        Ok(())
    } else {
        Err(CodecError::Length {
            what,
            expected,
            got,
        })
    }
}

/// Encode `x` (plus `residual` when given) into `out`, which must be
/// `Layout::new(x.len(), ..).body_len()` bytes. With a residual, it is updated in place to the
/// part of `x + residual` the payload does not carry. With `check_finite`, NaN or Inf in the
/// inputs is an error raised before anything is written.
pub fn encode<T: Elem>(
    x: &[T],
    residual: Option<&mut [T]>,
    p: &Params,
    out: &mut [u8],
    check_finite: bool,
) -> Result<(), CodecError> {
    let lay = Layout::new(x.len(), p.block_log2, p.mode)?;
    check_len("output buffer", lay.body_len(), out.len())?;
    if let Some(e) = &residual {
        check_len("residual", x.len(), e.len())?;
    }
    if check_finite && !(all_finite(x) && residual.as_deref().is_none_or(all_finite)) {
        return Err(CodecError::NonFinite);
    }
    let keys = StreamKeys::new(p.seed, p.stream);
    let (scales, data) = out.split_at_mut(4 * lay.nblocks());
    let b = lay.block;
    let pb = lay.packed_block();
    let mode = p.mode;
    let work = x
        .par_chunks(b)
        .zip(data.par_chunks_mut(pb))
        .zip(scales.par_chunks_mut(4))
        .enumerate()
        .with_min_len(lay.min_task_blocks());
    match residual {
        Some(e) => work.zip(e.par_chunks_mut(b)).try_for_each_init(
            || Scratch::new(b),
            |s, ((i, ((xb, db), sb)), eb)| {
                encode_block(
                    xb,
                    Some(eb),
                    lay.block_len(i),
                    (i * b) as u64,
                    &keys,
                    mode,
                    s,
                    db,
                    sb,
                )
            },
        ),
        None => work.try_for_each_init(
            || Scratch::new(b),
            |s, (i, ((xb, db), sb))| {
                encode_block(
                    xb,
                    None,
                    lay.block_len(i),
                    (i * b) as u64,
                    &keys,
                    mode,
                    s,
                    db,
                    sb,
                )
            },
        ),
    }
}

/// Decode a body made by `encode` with the same params into `out` (`n` elements).
pub fn decode<T: Elem>(body: &[u8], p: &Params, out: &mut [T]) -> Result<(), CodecError> {
    let lay = Layout::new(out.len(), p.block_log2, p.mode)?;
    check_len("payload body", lay.body_len(), body.len())?;
    let keys = StreamKeys::new(p.seed, p.stream);
    let (scales, data) = body.split_at(4 * lay.nblocks());
    let b = lay.block;
    let mode = p.mode;
    out.par_chunks_mut(b)
        .zip(data.par_chunks(lay.packed_block()))
        .zip(scales.par_chunks(4))
        .enumerate()
        .with_min_len(lay.min_task_blocks())
        .try_for_each_init(
            || Scratch::new(b),
            |s, (i, ((ob, db), sb))| {
                let scale = f32::from_le_bytes([sb[0], sb[1], sb[2], sb[3]]);
                decode_block(
                    db,
                    scale,
                    lay.block_len(i),
                    (i * b) as u64,
                    &keys,
                    mode,
                    s,
                    ob,
                )
            },
        )
}

#[cfg(test)]
mod tests;
