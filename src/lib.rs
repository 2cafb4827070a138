//! tritter-comm's codec core: VSA spread (bipolar keys + Walsh-Hadamard) and ternary
//! quantization packed five trits a byte, with error feedback. The wire format is specified in
//! `docs/FORMAT.md`; every module here is pure Rust, and `python.rs` is the only PyO3 code.

pub mod codec;
pub mod elem;
pub mod hadamard;
mod kernel;
pub mod keys;
mod lanes;
pub mod pack;
pub mod predict;
pub mod quant;
pub mod simd;
pub mod sync;

#[cfg(feature = "python")]
mod python;

pub use codec::{decode, encode, CodecError, DType, Layout, Mode, Params};
