//! Encode and decode of one flat vector (docs/FORMAT.md). The body is one f32 scale per block
//! followed by the packed blocks; blocks are independent, so they run on rayon's pool and the
//! result does not depend on the thread count. The 32-byte payload header is written and parsed
//! by the Python layer.

use std::fmt;

use rayon::prelude::*;

use crate::elem::Elem;
use crate::kernel::{analyze, synth, Scratch, Sink};
use crate::keys::StreamKeys;
use crate::pack::packed_len;

/// Version of the payload format (docs/FORMAT.md, "Payload"): the header's byte 4, which
/// `tritter_comm/codec.py` writes and checks. Python reads it as `_native.FORMAT_VERSION`.
pub const FORMAT_VERSION: u8 = 1;
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
    /// Encoding only: int2's unbiased scale (`quant::unbiased_scale`). The decoder reads the
    /// scale from the body either way.
    pub unbiased: bool,
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
/// part of `x + residual` the payload does not carry.
///
/// NaN or Inf in the inputs (or a block that overflows f32 when spread) is an error, found at no
/// cost: one such element makes every spread value of its block, and so the block's sums,
/// non-finite. With `check_finite` the residual is then left as it was: every block is encoded
/// first, and the residuals are updated in a second pass over the blocks only once all are
/// finite (it reads `x` and `residual` twice). Without it, each block's residual is updated
/// right after the block is encoded, and an error leaves the blocks before it updated. `out` may
/// be partly written on error either way.
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
    let keys = StreamKeys::new(p.seed, p.stream);
    let b = lay.block;
    let mode = p.mode;
    let unbiased = p.unbiased;
    let min_len = lay.min_task_blocks();
    let (scales, data) = out.split_at_mut(4 * lay.nblocks());
    let blocks = x
        .par_chunks(b)
        .zip(data.par_chunks_mut(lay.packed_block()))
        .zip(scales.par_chunks_mut(4))
        .enumerate()
        .with_min_len(min_len);
    match residual {
        None => blocks.try_for_each_init(
            || Scratch::new(b).with_unbiased(unbiased),
            |s, (i, ((xb, db), sb))| {
                let (l, o) = (lay.block_len(i), (i * b) as u64);
                analyze(xb, None, l, o, &keys, mode, s, db, sb)
            },
        ),
        Some(e) if !check_finite => blocks.zip(e.par_chunks_mut(b)).try_for_each_init(
            || Scratch::new(b).with_unbiased(unbiased),
            |s, ((i, ((xb, db), sb)), eb)| {
                let (l, o) = (lay.block_len(i), (i * b) as u64);
                analyze(xb, Some(&*eb), l, o, &keys, mode, s, db, sb)?;
                synth(
                    db,
                    scale_of(sb),
                    l,
                    o,
                    &keys,
                    mode,
                    s,
                    Sink::Residual(xb, eb),
                )
            },
        ),
        Some(e) => {
            blocks.zip(e.par_chunks(b)).try_for_each_init(
                || Scratch::new(b).with_unbiased(unbiased),
                |s, ((i, ((xb, db), sb)), eb)| {
                    let (l, o) = (lay.block_len(i), (i * b) as u64);
                    analyze(xb, Some(eb), l, o, &keys, mode, s, db, sb)
                },
            )?;
            // Backward: the blocks the first pass read last are the likeliest still in cache.
            let (scales, data) = (&*scales, &*data);
            x.par_chunks(b)
                .zip(e.par_chunks_mut(b))
                .zip(data.par_chunks(lay.packed_block()))
                .zip(scales.par_chunks(4))
                .enumerate()
                .rev()
                .with_min_len(min_len)
                .try_for_each_init(
                    || Scratch::backward(b),
                    |s, (i, (((xb, eb), db), sb))| {
                        let (l, o) = (lay.block_len(i), (i * b) as u64);
                        synth(
                            db,
                            scale_of(sb),
                            l,
                            o,
                            &keys,
                            mode,
                            s,
                            Sink::Residual(xb, eb),
                        )
                    },
                )
        }
    }
}

fn scale_of(sb: &[u8]) -> f32 {
    f32::from_le_bytes([sb[0], sb[1], sb[2], sb[3]])
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
                let (l, o) = (lay.block_len(i), (i * b) as u64);
                synth(db, scale_of(sb), l, o, &keys, mode, s, Sink::Out(ob))
            },
        )
}

#[cfg(test)]
mod tests;
