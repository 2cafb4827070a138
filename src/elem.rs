//! Element types the codec accepts: f32, f16 and bf16. The codec computes in f32; conversions
//! back round to nearest even, as torch does.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::lanes::{Lanes, LANES};

pub trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// False for NaN and +-Inf.
    fn is_finite(self) -> bool;

    /// The first 16 elements of `s` as f32 lanes.
    #[inline(always)]
    fn load16(s: &[Self]) -> Lanes {
        let mut r = crate::lanes::ZERO;
        for (r, x) in r.iter_mut().zip(&s[..LANES]) {
            *r = x.to_f32();
        }
        r
    }

    /// Store 16 lanes, converted, into the first 16 elements of `d`.
    #[inline(always)]
    fn store16(d: &mut [Self], v: Lanes) {
        for (o, x) in d[..LANES].iter_mut().zip(v) {
            *o = Self::from_f32(x);
        }
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        self.to_bits() & 0x7f80_0000 != 0x7f80_0000
    }
    #[inline(always)]
    fn load16(s: &[Self]) -> Lanes {
        let mut r = crate::lanes::ZERO;
        r.copy_from_slice(&s[..LANES]);
        r
    }
    #[inline(always)]
    fn store16(d: &mut [Self], v: Lanes) {
        d[..LANES].copy_from_slice(&v);
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        // Round to nearest even, as c10::BFloat16 does; NaN stays a quiet NaN.
        let b = v.to_bits();
        if v.is_nan() {
            return bf16::from_bits(((b >> 16) | 0x40) as u16);
        }
        let r = 0x7fff + ((b >> 16) & 1);
        bf16::from_bits((b.wrapping_add(r) >> 16) as u16)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        self.to_bits() & 0x7f80 != 0x7f80
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        self.to_bits() & 0x7c00 != 0x7c00
    }
    // half's slice conversions: F16C 4 or 8 at a time where the CPU has it, the same rounding as
    // the element ones.
    #[inline(always)]
    fn load16(s: &[Self]) -> Lanes {
        let mut r = crate::lanes::ZERO;
        s[..LANES].convert_to_f32_slice(&mut r);
        r
    }
    #[inline(always)]
    fn store16(d: &mut [Self], v: Lanes) {
        d[..LANES].convert_from_f32_slice(&v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(bf16::from_f32_elem(1.0 + 1.0 / 256.0).to_f32(), 1.0);
        assert_eq!(
            bf16::from_f32_elem(1.0 + 3.0 / 256.0).to_f32(),
            1.0 + 4.0 / 256.0
        );
        assert_eq!(<bf16 as Elem>::from_f32(-2.5).to_f32(), -2.5);
        assert!(!<bf16 as Elem>::from_f32(f32::NAN).to_f32().is_finite());
    }

    trait FromF32Elem {
        fn from_f32_elem(v: f32) -> Self;
    }
    impl FromF32Elem for bf16 {
        fn from_f32_elem(v: f32) -> Self {
            <bf16 as Elem>::from_f32(v)
        }
    }

    #[test]
    fn finite_checks() {
        assert!(Elem::is_finite(1.0f32));
        assert!(!Elem::is_finite(f32::INFINITY));
        assert!(!Elem::is_finite(f32::NAN));
        assert!(!Elem::is_finite(f16::INFINITY));
        assert!(Elem::is_finite(f16::MAX));
        assert!(!Elem::is_finite(bf16::NAN));
        assert!(Elem::is_finite(bf16::MAX));
    }
}
