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

/// `TRIT_MUL * w` has in byte 4 `c0 + 3 c1 + 9 c2 + 27 c3 + 81 c4` for the bytes `c0..c7` of
/// `w` (codes below 3): the coefficients of 2^0..2^24 stay below 256, so nothing carries into
/// byte 4, and bytes 5..7 only reach higher bytes.
const TRIT_MUL: u64 = 81 | 27 << 8 | 9 << 16 | 3 << 24 | 1 << 32;

/// `pack` of ternary codes `codes[..l]` into `out` (`packed_len(l)` bytes); `codes` must hold
/// `l + 8` bytes, of which the 8 past `l` are zeroed here.
#[inline(always)]
pub fn pack_trits(codes: &mut [u8], l: usize, out: &mut [u8]) {
    codes[l..l + 8].fill(0);
    for (j, o) in out.iter_mut().enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&codes[5 * j..5 * j + 8]);
        *o = (u64::from_le_bytes(w).wrapping_mul(TRIT_MUL) >> 32) as u8;
    }
}

/// Bit `k` of `m` (k < 16) moved to bit `2 k`.
#[inline(always)]
pub fn spread_bits(m: u32) -> u32 {
    let mut x = m & 0xffff;
    x = (x | (x << 8)) & 0x00ff_00ff;
    x = (x | (x << 4)) & 0x0f0f_0f0f;
    x = (x | (x << 2)) & 0x3333_3333;
    (x | (x << 1)) & 0x5555_5555
}

/// Lookup tables from a packed byte to the levels it holds, and to their Walsh-Hadamard
/// transform (exact: small integers), with which the decoder skips the transform's first stages.
pub struct Tables {
    trit: Vec<[f32; 5]>,
    int2: [[f32; 4]; 256],
    sign: [[f32; 8]; 256],
    /// The transform of the 4 int2 levels of a byte.
    pub wht_int2: [[f32; 4]; 256],
    /// The transform of the 8 sign levels (+-1) of a byte.
    pub wht_sign: [[f32; 8]; 256],
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
        let wht = |v: &[f32]| {
            let mut v = v.to_vec();
            crate::hadamard::fwht_reference(&mut v);
            v
        };
        let mut wht_int2 = [[0f32; 4]; 256];
        let mut wht_sign = [[0f32; 8]; 256];
        for b in 0..256 {
            wht_int2[b].copy_from_slice(&wht(&int2[b]));
            wht_sign[b].copy_from_slice(&wht(&sign[b]));
        }
        Tables {
            trit,
            int2,
            sign,
            wht_int2,
            wht_sign,
        }
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

    proptest! {
        #[test]
        fn pack_trits_matches_pack(codes in prop::collection::vec(0u8..3, 1..300)) {
            let l = codes.len();
            let mut padded = codes.clone();
            padded.extend([7u8; 8]);
            let mut a = vec![0u8; packed_len(l, Mode::Ternary)];
            let mut b = a.clone();
            pack(&codes, Mode::Ternary, &mut a);
            pack_trits(&mut padded, l, &mut b);
            prop_assert_eq!(a, b);
        }

        #[test]
        fn spread_bits_interleaves(m in 0u32..0x10000) {
            for k in 0..32 {
                let want = k % 2 == 0 && (m >> (k / 2)) & 1 == 1;
                prop_assert_eq!((spread_bits(m) >> k) & 1 == 1, want);
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
