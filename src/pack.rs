//! Packing of quantization codes (docs/FORMAT.md, "Packing"): ternary codes 5 to a byte in base
//! 3 (1.6 bits a code), 2-bit codes 4 to a byte, sign bits 8 to a byte. Unpacking goes straight to
//! the f32 levels the decoder transforms, through lookup tables.

use crate::codec::Mode;

/// Bytes that `len` codes of `mode` pack into.
pub const fn packed_len(len: usize, mode: Mode) -> usize {
    match mode {
        Mode::Ternary => len.div_ceil(5),
        Mode::Int2 => len.div_ceil(4),
        Mode::Sign => len.div_ceil(8),
    }
}

/// Largest valid base-3 byte: 3^5 - 1.
pub const MAX_TRIT_BYTE: u8 = 242;

/// Pack codes (each < the mode's radix) into `out` (`packed_len(codes.len())` bytes).
#[inline(always)]
pub fn pack(codes: &[u8], mode: Mode, out: &mut [u8]) {
    debug_assert_eq!(out.len(), packed_len(codes.len(), mode));
    match mode {
        Mode::Ternary => {
            let mut it = codes.chunks_exact(5);
            for (o, c) in out.iter_mut().zip(&mut it) {
                *o = c[0] + 3 * c[1] + 9 * c[2] + 27 * c[3] + 81 * c[4];
            }
            let rest = it.remainder();
            if !rest.is_empty() {
                let mut b = 0u8;
                let mut m = 1u8;
                for &c in rest {
                    b += c * m;
                    m = m.wrapping_mul(3);
                }
                *out.last_mut().unwrap() = b;
            }
        }
        Mode::Int2 => {
            let mut it = codes.chunks_exact(4);
            for (o, c) in out.iter_mut().zip(&mut it) {
                *o = c[0] | (c[1] << 2) | (c[2] << 4) | (c[3] << 6);
            }
            let rest = it.remainder();
            if !rest.is_empty() {
                let b = rest
                    .iter()
                    .enumerate()
                    .fold(0u8, |b, (k, &c)| b | (c << (2 * k)));
                *out.last_mut().unwrap() = b;
            }
        }
        Mode::Sign => {
            let mut it = codes.chunks_exact(8);
            for (o, c) in out.iter_mut().zip(&mut it) {
                *o = c[0]
                    | (c[1] << 1)
                    | (c[2] << 2)
                    | (c[3] << 3)
                    | (c[4] << 4)
                    | (c[5] << 5)
                    | (c[6] << 6)
                    | (c[7] << 7);
            }
            let rest = it.remainder();
            if !rest.is_empty() {
                let b = rest.iter().enumerate().fold(0u8, |b, (k, &c)| b | (c << k));
                *out.last_mut().unwrap() = b;
            }
        }
    }
}

/// Lookup tables from a packed byte to the levels it holds.
pub struct Tables {
    trit: Vec<[f32; 5]>,
    int2: [[f32; 4]; 256],
    sign: [[f32; 8]; 256],
}

impl Tables {
    fn build() -> Self {
        let mut trit = vec![[0f32; 5]; 243];
        for (b, t) in trit.iter_mut().enumerate() {
            let mut v = b;
            for x in t.iter_mut() {
                *x = (v % 3) as f32 - 1.0;
                v /= 3;
            }
        }
        const LEVELS: [f32; 4] = [-3.0, -1.0, 1.0, 3.0];
        let mut int2 = [[0f32; 4]; 256];
        let mut sign = [[0f32; 8]; 256];
        for (b, (i2, sg)) in int2.iter_mut().zip(sign.iter_mut()).enumerate() {
            for (k, v) in i2.iter_mut().enumerate() {
                *v = LEVELS[(b >> (2 * k)) & 3];
            }
            for (k, v) in sg.iter_mut().enumerate() {
                *v = if (b >> k) & 1 == 1 { 1.0 } else { -1.0 };
            }
        }
        Tables { trit, int2, sign }
    }

    pub fn get() -> &'static Tables {
        static T: std::sync::OnceLock<Tables> = std::sync::OnceLock::new();
        T.get_or_init(Tables::build)
    }

    /// Unpack `out.len()` levels from `packed`. Returns false if a ternary byte is invalid.
    #[inline(always)]
    pub fn unpack_levels(&self, packed: &[u8], mode: Mode, out: &mut [f32]) -> bool {
        match mode {
            Mode::Ternary => {
                let mut bad = 0u8;
                let mut it = out.chunks_exact_mut(5);
                for (o, &b) in (&mut it).zip(packed) {
                    bad |= (b > MAX_TRIT_BYTE) as u8;
                    o.copy_from_slice(&self.trit[b.min(MAX_TRIT_BYTE) as usize]);
                }
                let rest = it.into_remainder();
                if !rest.is_empty() {
                    let b = packed[packed.len() - 1];
                    bad |= (b > MAX_TRIT_BYTE) as u8;
                    let n = rest.len();
                    rest.copy_from_slice(&self.trit[b.min(MAX_TRIT_BYTE) as usize][..n]);
                }
                bad == 0
            }
            Mode::Int2 => {
                let mut it = out.chunks_exact_mut(4);
                for (o, &b) in (&mut it).zip(packed) {
                    o.copy_from_slice(&self.int2[b as usize]);
                }
                let rest = it.into_remainder();
                if !rest.is_empty() {
                    let n = rest.len();
                    rest.copy_from_slice(&self.int2[packed[packed.len() - 1] as usize][..n]);
                }
                true
            }
            Mode::Sign => {
                let mut it = out.chunks_exact_mut(8);
                for (o, &b) in (&mut it).zip(packed) {
                    o.copy_from_slice(&self.sign[b as usize]);
                }
                let rest = it.into_remainder();
                if !rest.is_empty() {
                    let n = rest.len();
                    rest.copy_from_slice(&self.sign[packed[packed.len() - 1] as usize][..n]);
                }
                true
            }
        }
    }
}

/// The level a code stands for.
pub fn level(code: u8, mode: Mode) -> f32 {
    match mode {
        Mode::Ternary => code as f32 - 1.0,
        Mode::Int2 => [-3.0, -1.0, 1.0, 3.0][code as usize],
        Mode::Sign => {
            if code == 1 {
                1.0
            } else {
                -1.0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn radix(mode: Mode) -> u8 {
        match mode {
            Mode::Ternary => 3,
            Mode::Int2 => 4,
            Mode::Sign => 2,
        }
    }

    proptest! {
        #[test]
        fn pack_unpack_round_trip(codes in prop::collection::vec(0u8..12, 0..200), m in 0u8..3) {
            let mode = Mode::from_u8(m).unwrap();
            let codes: Vec<u8> = codes.iter().map(|c| c % radix(mode)).collect();
            let mut packed = vec![0u8; packed_len(codes.len(), mode)];
            pack(&codes, mode, &mut packed);
            let mut levels = vec![0f32; codes.len()];
            prop_assert!(Tables::get().unpack_levels(&packed, mode, &mut levels));
            for (c, l) in codes.iter().zip(&levels) {
                prop_assert_eq!(level(*c, mode), *l);
            }
        }
    }

    #[test]
    fn trits_known_answer() {
        let mut out = [0u8; 2];
        pack(&[2, 2, 2, 2, 2, 1], Mode::Ternary, &mut out);
        assert_eq!(out, [242, 1]);
    }

    #[test]
    fn invalid_trit_byte_is_reported() {
        let mut levels = [0f32; 5];
        assert!(!Tables::get().unpack_levels(&[243], Mode::Ternary, &mut levels));
        assert!(Tables::get().unpack_levels(&[242], Mode::Ternary, &mut levels));
    }
}
