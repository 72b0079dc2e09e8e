//! AVX-512 (F/BW/VL + VNNI) kernels, for the formats where they beat the AVX2 ones: Q5_0,
//! Q6_K, Q8_K and F16. Every other format runs its AVX2 kernel at this level.
//!
//! VNNI's `vpdpbusd` (u8·i8 summed straight into i32, no 16-bit saturation step) replaces the
//! `maddubs`+`madd` pair: Q5_0 puts two blocks in each 512-bit vector and applies the 5th bits
//! through a mask register; Q6_K handles 64 quants per vector and applies its 16-element scales
//! with `vpmaddubsw` + `vpdpwssd`. The integer sums are the same as `scalar.rs`'s.
//!
//! Without VNNI (Skylake-X) the AVX-512 level uses the AVX2 kernels throughout.
//!
//! Soundness: as in `avx2.rs`, the `#[target_feature]` bodies are reached only through private
//! safe wrappers that [`vec_dot_fn`] hands out after checking the CPU features, and those
//! wrappers validate the slice lengths first.

use std::arch::x86_64::*;

use crate::quant::avx2;
use crate::quant::avx2::gemv_prefetch_loop;
use crate::quant::scalar::{check_vec_dot, gemm_loop};
use crate::quant::{GemmFn, GemvFn, GgmlType, VecDotFn};

pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

pub(super) fn vnni_available() -> bool {
    available() && is_x86_feature_detected!("avx512vnni")
}

/// The AVX-512 vec_dot for `ty`, if there is one and this CPU can run it.
pub(super) fn vec_dot_fn(ty: GgmlType) -> Option<VecDotFn> {
    // The kernels below also use AVX2/FMA/F16C helpers.
    if !(vnni_available() && avx2::available()) {
        return None;
    }
    // Only formats whose AVX-512 kernel measured faster than the AVX2 one on an AVX-512 Xeon
    // are listed. 512-bit vectors did not pay off for Q4_0/Q4_1/Q5_1 (the nibble unpacking is
    // shuffle-bound, and only one port shuffles), for Q4_K/Q5_K (2 sub-blocks per vector with
    // `vpdpwssd` scaling: 5-15% slower), nor for Q8_0 (two blocks per vector, or one block per
    // 256-bit `vpdpbusd`: equal or slower than AVX2's `maddubs`), so those use AVX2.
    Some(match ty {
        GgmlType::F16 => dot_f16,
        GgmlType::Q5_0 => dot_q5_0,
        GgmlType::Q6K => dot_q6k,
        GgmlType::Q8K => dot_q8k,
        _ => return None,
    })
}

/// A loop over the AVX-512 vec_dot of `ty`, for the formats that have one; the dispatcher
/// prefers AVX2's tiled gemm where that exists.
pub(super) fn gemm_fn(ty: GgmlType) -> Option<GemmFn> {
    vec_dot_fn(ty)?;
    Some(match ty {
        GgmlType::F16 => gemm_f16,
        GgmlType::Q5_0 => gemm_q5_0,
        GgmlType::Q6K => gemm_q6k,
        GgmlType::Q8K => gemm_q8k,
        _ => return None,
    })
}

/// A prefetching loop over the AVX-512 vec_dot of `ty`, for the formats that have one.
pub(super) fn gemv_fn(ty: GgmlType) -> Option<GemvFn> {
    vec_dot_fn(ty)?;
    Some(match ty {
        GgmlType::F16 => gemv_f16,
        GgmlType::Q5_0 => gemv_q5_0,
        GgmlType::Q6K => gemv_q6k,
        GgmlType::Q8K => gemv_q8k,
        _ => return None,
    })
}

gemv_prefetch_loop!(gemv_f16, dot_f16);
gemv_prefetch_loop!(gemv_q5_0, dot_q5_0);
gemv_prefetch_loop!(gemv_q6k, dot_q6k);
gemv_prefetch_loop!(gemv_q8k, dot_q8k);

gemm_loop!(gemm_f16, dot_f16, GgmlType::F16);
gemm_loop!(gemm_q5_0, dot_q5_0, GgmlType::Q5_0);
gemm_loop!(gemm_q6k, dot_q6k, GgmlType::Q6K);
gemm_loop!(gemm_q8k, dot_q8k, GgmlType::Q8K);

macro_rules! entry {
    ($safe:ident, $imp:ident, $ty:expr) => {
        fn $safe(n: usize, w: &[u8], a: &[u8]) -> f32 {
            let nb = check_vec_dot($ty, n, w, a);
            // SAFETY: this private fn is handed out only by `vec_dot_fn` after it confirmed
            // AVX-512 F/BW/VL/VNNI and AVX2/FMA/F16C, and `check_vec_dot` proved that `w` and
            // `a` hold `nb` whole blocks of the weight and activation types, which is all
            // `$imp` reads.
            unsafe { $imp(nb, w.as_ptr(), a.as_ptr()) }
        }
    };
}

entry!(dot_f16, f16_impl, GgmlType::F16);
entry!(dot_q5_0, q5_0_impl, GgmlType::Q5_0);
entry!(dot_q6k, q6k_impl, GgmlType::Q6K);
entry!(dot_q8k, q8k_impl, GgmlType::Q8K);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// # Safety
/// `p` must point to 64 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn ld512(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 64 readable bytes; loadu has no alignment requirement.
    unsafe { _mm512_loadu_si512(p.cast()) }
}

/// The f16 at `p` in all sixteen lanes (a whole-vector result avoids `vpinsrw` false
/// dependencies, see `avx2::bcast_f16`).
///
/// # Safety
/// `p` must point to 2 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn bcast16_f16(p: *const u8) -> __m512 {
    // SAFETY: the caller guarantees 2 readable bytes; the read is unaligned.
    let h = unsafe { p.cast::<i16>().read_unaligned() };
    _mm512_cvtph_ps(_mm256_set1_epi16(h))
}

/// # Safety
/// `p` must point to 4 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn bcast16_f32(p: *const u8) -> __m512 {
    // SAFETY: the caller guarantees 4 readable bytes.
    _mm512_set1_ps(unsafe { avx2::ld_f32(p) })
}

/// 16 f16 at `p` as f32.
///
/// # Safety
/// `p` must point to 32 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn ld16_f16(p: *const u8) -> __m512 {
    // SAFETY: the caller guarantees 32 readable bytes.
    _mm512_cvtph_ps(unsafe { avx2::ld256(p) })
}

/// Σ x·y of signed bytes per 4-byte group. VNNI multiplies unsigned × signed, so x's sign is
/// moved onto y (|x| ≤ 128 read as unsigned is exact; y ≠ -128 as our quantizers guarantee).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_i8(acc: __m512i, x: __m512i, y: __m512i) -> __m512i {
    let neg = _mm512_movepi8_mask(x);
    let sy = _mm512_mask_sub_epi8(y, neg, _mm512_setzero_si512(), y);
    _mm512_dpbusd_epi32(acc, _mm512_abs_epi8(x), sy)
}

/// 32 bytes at `a` in the low half and 32 at `b` in the high half, with a masked second load
/// instead of a lane insert (which would compete for the shuffle port).
///
/// # Safety
/// `a` and `b` must each point to 32 readable bytes, and `a` to 64 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn ld_halves(a: *const u8, b: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 64 bytes at a and 32 at b; the masked load touches only
    // its upper 32 lanes, i.e. b..b + 32 (masked-off lanes are not accessed).
    unsafe {
        _mm512_mask_loadu_epi8(
            _mm512_loadu_si512(a.cast()),
            0xFFFF_FFFF_0000_0000,
            b.sub(32).cast(),
        )
    }
}

/// `vpermps` indices: lanes 0..8 ← 2k, lanes 8..16 ← 2k+1.
static PAIR_IDX: [[i32; 16]; 4] = [
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
    [2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3],
    [4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5],
    [6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7],
];

/// Lanes 0..8 ← lane 2k of `d`, lanes 8..16 ← lane 2k+1 (k < 4).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn pair_scales(d: __m512, k: usize) -> __m512 {
    // SAFETY: PAIR_IDX[k] is 64 readable bytes (the index panics for k >= 4).
    let idx = unsafe { _mm512_loadu_si512(PAIR_IDX[k].as_ptr().cast()) };
    _mm512_permutexvar_ps(idx, d)
}

// ---------------------------------------------------------------------------------------------
// F16
// ---------------------------------------------------------------------------------------------

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn f16_impl(n: usize, x: *const u8, y: *const u8) -> f32 {
    // SAFETY: the caller guarantees n f16 behind x and y; accesses stay below element n.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            for (u, a) in acc.iter_mut().enumerate() {
                let o = 2 * (i + 16 * u);
                *a = _mm512_fmadd_ps(ld16_f16(x.add(o)), ld16_f16(y.add(o)), *a);
            }
            i += 64;
        }
        while i + 16 <= n {
            acc[0] = _mm512_fmadd_ps(ld16_f16(x.add(2 * i)), ld16_f16(y.add(2 * i)), acc[0]);
            i += 16;
        }
        let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let mut sum = _mm512_reduce_add_ps(s);
        while i < n {
            sum += avx2::ld_f16(x.add(2 * i)) * avx2::ld_f16(y.add(2 * i));
            i += 1;
        }
        sum
    }
}

// ---------------------------------------------------------------------------------------------
// Legacy 32-element formats: groups of 8 blocks, 2 blocks per vector
// ---------------------------------------------------------------------------------------------

/// [low nibbles a, high nibbles a, low nibbles b, high nibbles b]: elements 0..32 of block a
/// then of block b, matching two consecutive Q8 blocks' quants.
///
/// # Safety
/// `qa` and `qb` must each point to 16 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn nibble_pair(qa: *const u8, qb: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 16 readable bytes at each pointer.
    let t = unsafe { _mm256_loadu2_m128i(qb.cast(), qa.cast()) };
    let v = _mm512_permutexvar_epi64(
        _mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3),
        _mm512_castsi256_si512(t),
    );
    // Shift only the copies in 128-bit lanes 1 and 3 (16-bit lanes 8..16 and 24..32).
    let v = _mm512_mask_srli_epi16::<4>(v, 0xFF00_FF00, v);
    _mm512_and_si512(v, _mm512_set1_epi8(0x0F))
}

/// One pair (blocks 2k, 2k+1 of the group at `xg`/`yg`) of [`paired_groups`]: returns
/// `acc + scales · Σ`.
///
/// # Safety
/// Both blocks must be readable behind `xg` and `yg`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn pair_step<
    const XS: usize,
    const YS: usize,
    const QS: usize,
    const QH: usize,
    const YQ: usize,
    const OFF: i8,
>(
    xg: *const u8,
    yg: *const u8,
    k: usize,
    d: __m512,
    acc: __m512,
) -> __m512 {
    // SAFETY: the caller vouches for blocks 2k and 2k+1.
    unsafe {
        let (xa, xb) = (xg.add(2 * k * XS), xg.add((2 * k + 1) * XS));
        let (ya, yb) = (yg.add(2 * k * YS), yg.add((2 * k + 1) * YS));
        let mut q = nibble_pair(xa.add(QS), xb.add(QS));
        if QH != 0 {
            let bits =
                (avx2::ld_u32(xa.add(QH)) as u64) | ((avx2::ld_u32(xb.add(QH)) as u64) << 32);
            q = _mm512_mask_add_epi8(q, bits, q, _mm512_set1_epi8(16));
        }
        // Block b starts right after a, so 64 bytes from a's quants are readable.
        let yv = ld_halves(ya.add(YQ), yb.add(YQ));
        let mut p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, yv);
        if OFF != 0 {
            let o = _mm512_set1_epi8(OFF);
            p = _mm512_sub_epi32(p, _mm512_dpbusd_epi32(_mm512_setzero_si512(), o, yv));
        }
        _mm512_fmadd_ps(pair_scales(d, k), _mm512_cvtepi32_ps(p), acc)
    }
}

/// Grouped kernel for the 4/5-bit formats over the first `nb` (even) blocks; parameters as in
/// `avx2::paired_groups`.
///
/// # Safety
/// `x` and `y` must hold `nb` blocks of their formats.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn paired_groups<
    const XS: usize,
    const YS: usize,
    const QS: usize,
    const QH: usize,
    const YQ: usize,
    const OFF: i8,
    const MS: bool,
>(
    nb: usize,
    x: *const u8,
    y: *const u8,
) -> f32 {
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut accm = _mm256_setzero_ps();
    // SAFETY: every access is inside blocks blk..blk + r ≤ nb of x or y, which the caller
    // vouches for.
    unsafe {
        let mut blk = 0;
        while blk < nb {
            let r = (nb - blk).min(8);
            let xg = x.add(XS * blk);
            let yg = y.add(YS * blk);
            let d = _mm512_castps256_ps512(avx2::group_scales::<XS, YS>(xg, yg, r));
            if MS {
                accm = _mm256_fmadd_ps(
                    avx2::f16xn_or_8::<XS>(xg.add(2), r),
                    avx2::f16xn_or_8::<YS>(yg.add(2), r),
                    accm,
                );
            }
            let np = r / 2;
            let mut k = 0;
            while k + 2 <= np {
                a0 = pair_step::<XS, YS, QS, QH, YQ, OFF>(xg, yg, k, d, a0);
                a1 = pair_step::<XS, YS, QS, QH, YQ, OFF>(xg, yg, k + 1, d, a1);
                k += 2;
            }
            if k < np {
                a0 = pair_step::<XS, YS, QS, QH, YQ, OFF>(xg, yg, k, d, a0);
            }
            blk += r;
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + avx2::hsum_ps(accm)
}

macro_rules! paired_impl {
    ($name:ident, $tail:ident, $xs:expr, $ys:expr, $qs:expr, $qh:expr, $yq:expr, $off:expr, $ms:expr) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        unsafe fn $name(nb: usize, x: *const u8, y: *const u8) -> f32 {
            let np = nb & !1;
            // SAFETY: the caller guarantees nb blocks behind x and y; the pairs cover blocks
            // 0..np and the AVX2 kernel the odd last one.
            unsafe {
                paired_groups::<$xs, $ys, $qs, $qh, $yq, $off, $ms>(np, x, y)
                    + avx2::$tail(nb - np, x.add($xs * np), y.add($ys * np))
            }
        }
    };
}

paired_impl!(q5_0_impl, q5_0_impl, 22, 34, 6, 2, 2, 16, false);

// ---------------------------------------------------------------------------------------------
// K-quants (activations are Q8_K: d f32 @0, qs @4, bsums i16 @260)
// ---------------------------------------------------------------------------------------------

const Q8K_QS: usize = 4;
const Q8K_BS: usize = 260;

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q8k_impl(nb: usize, x: *const u8, y: *const u8) -> f32 {
    let mut acc = _mm512_setzero_ps();
    // SAFETY: the caller guarantees nb 292-byte blocks behind x and y.
    unsafe {
        for i in 0..nb {
            let (xb, yb) = (x.add(292 * i), y.add(292 * i));
            let mut sumi = _mm512_setzero_si512();
            for k in 0..4 {
                let o = Q8K_QS + 64 * k;
                sumi = dot_i8(sumi, ld512(xb.add(o)), ld512(yb.add(o)));
            }
            let d = _mm512_mul_ps(bcast16_f32(xb), bcast16_f32(yb));
            acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), acc);
        }
    }
    _mm512_reduce_add_ps(acc)
}

/// i16 lane indices [a ×8, a+1 ×8, a+2 ×8, a+3 ×8] for `vpermw`: 16 quants per scale.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn quarters(a: i16) -> __m512i {
    let v = _mm512_mask_blend_epi16(0x0000_FF00, _mm512_set1_epi16(a), _mm512_set1_epi16(a + 1));
    let v = _mm512_mask_blend_epi16(0x00FF_0000, v, _mm512_set1_epi16(a + 2));
    _mm512_mask_blend_epi16(0xFF00_0000, v, _mm512_set1_epi16(a + 3))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q6k_impl(nb: usize, x: *const u8, y: *const u8) -> f32 {
    let m4 = _mm512_set1_epi8(0x0F);
    let m30 = _mm512_set1_epi8(0x30);
    // Per 16-bit lane shift counts: the low half of a vector holds quants l, the high half
    // l + 32, whose 2 high bits sit 2 bits further up in qh.
    let shl = _mm512_mask_blend_epi16(0xFFFF_0000, _mm512_set1_epi16(4), _mm512_set1_epi16(2));
    let shr = _mm512_mask_blend_epi16(0xFFFF_0000, _mm512_set1_epi16(0), _mm512_set1_epi16(2));
    let idx = [quarters(0), quarters(4), quarters(8), quarters(12)];
    let mut acc = _mm512_setzero_ps();
    // SAFETY: the caller guarantees nb 210-byte blocks behind x and nb Q8_K blocks behind y.
    unsafe {
        for i in 0..nb {
            let (xb, yb) = (x.add(210 * i), y.add(292 * i));
            let d = _mm512_mul_ps(bcast16_f32(yb), bcast16_f16(xb.add(208)));
            let sc16 = _mm256_cvtepi8_epi16(avx2::ld128(xb.add(192)));
            // Quants are stored +32: subtract 32·Σ scale·bsum once.
            let off = _mm256_madd_epi16(sc16, avx2::ld256(yb.add(Q8K_BS)));
            let mut sumi = _mm512_zextsi256_si512(_mm256_sub_epi32(
                _mm256_setzero_si256(),
                _mm256_slli_epi32::<5>(off),
            ));
            let sc = _mm512_castsi256_si512(sc16);
            for n in 0..2 {
                let ql = ld512(xb.add(64 * n));
                let qh = _mm512_broadcast_i64x4(avx2::ld256(xb.add(128 + 32 * n)));
                let hl = _mm512_and_si512(_mm512_sllv_epi16(qh, shl), m30);
                let hh = _mm512_and_si512(_mm512_srlv_epi16(qh, shr), m30);
                // (ql & 0x0F) | h as one ternary-logic op: 0xEA = (A & B) | C.
                let lo = _mm512_ternarylogic_epi32::<0xEA>(ql, m4, hl);
                let hi = _mm512_ternarylogic_epi32::<0xEA>(_mm512_srli_epi16::<4>(ql), m4, hh);
                let q8 = yb.add(Q8K_QS + 128 * n);
                let p0 = _mm512_maddubs_epi16(lo, ld512(q8));
                let p1 = _mm512_maddubs_epi16(hi, ld512(q8.add(64)));
                sumi = _mm512_dpwssd_epi32(sumi, p0, _mm512_permutexvar_epi16(idx[2 * n], sc));
                sumi = _mm512_dpwssd_epi32(sumi, p1, _mm512_permutexvar_epi16(idx[2 * n + 1], sc));
            }
            acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), acc);
        }
    }
    _mm512_reduce_add_ps(acc)
}
