//! AVX2 + FMA + F16C kernels.
//!
//! Every kernel computes the same per-(sub-)block integer sums as `scalar.rs` (8-bit products
//! through `maddubs`, which cannot saturate for these value ranges as long as activations stay in
//! -127..=127, which our quantizers guarantee) and only then scales them in f32.
//!
//! Soundness: the `#[target_feature]` bodies are reached only through the private safe wrappers
//! made by `entry!`, and those are handed out only by the `*_fn` getters after [`available`]
//! confirmed the features; the wrappers validate slice lengths before any pointer is read.

use std::arch::x86_64::*;

use crate::quant::scalar::{self, check_gemv, check_vec_dot, gemm_loop};
use crate::quant::{
    DotRowsFn, GemmFn, GemvFn, GgmlType, QK, QK_K, QuantizeActFn, RowElem, VecDotFn, WeightedSumFn,
};

pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// The AVX2 vec_dot for `ty`, if there is one and this CPU can run it.
pub(super) fn vec_dot_fn(ty: GgmlType) -> Option<VecDotFn> {
    if !available() {
        return None;
    }
    Some(match ty {
        GgmlType::F32 => dot_f32,
        GgmlType::F16 => dot_f16,
        GgmlType::BF16 => dot_bf16,
        GgmlType::Q4_0 => dot_q4_0,
        GgmlType::Q4_1 => dot_q4_1,
        GgmlType::Q5_0 => dot_q5_0,
        GgmlType::Q5_1 => dot_q5_1,
        GgmlType::Q8_0 => dot_q8_0,
        GgmlType::Q2K => dot_q2k,
        GgmlType::Q3K => dot_q3k,
        GgmlType::Q4K => dot_q4k,
        GgmlType::Q5K => dot_q5k,
        GgmlType::Q6K => dot_q6k,
        GgmlType::Q8K => dot_q8k,
        GgmlType::Q8_1 => return None,
    })
}

/// The AVX2 gemv for `ty`: Q8_0's four-row kernel, else a prefetching loop over this file's
/// vec_dot; `None` where [`vec_dot_fn`] has none.
pub(super) fn gemv_fn(ty: GgmlType) -> Option<GemvFn> {
    vec_dot_fn(ty)?;
    Some(match ty {
        GgmlType::F32 => gemv_f32,
        GgmlType::F16 => gemv_f16,
        GgmlType::BF16 => gemv_bf16,
        GgmlType::Q4_0 => gemv_q4_0,
        GgmlType::Q4_1 => gemv_q4_1,
        GgmlType::Q5_0 => gemv_q5_0,
        GgmlType::Q5_1 => gemv_q5_1,
        GgmlType::Q8_0 => gemv_q8_0,
        GgmlType::Q2K => gemv_q2k,
        GgmlType::Q3K => gemv_q3k,
        GgmlType::Q4K => gemv_q4k,
        GgmlType::Q5K => gemv_q5k,
        GgmlType::Q6K => gemv_q6k,
        GgmlType::Q8K => gemv_q8k,
        GgmlType::Q8_1 => return None,
    })
}

/// How far ahead of the row being computed a gemv prefetches its weights. Decode reads each
/// weight once per token, straight from memory; on a single core the hardware prefetchers keep
/// too few lines in flight, and a few KiB of software lead measured 10-40% more GB/s (Zen 3).
pub(super) const PREFETCH_AHEAD: usize = 4096;

/// Walks a weight slice issuing prefetches up to a moving end.
pub(super) struct Prefetch<'a> {
    w: &'a [u8],
    next: usize,
}

impl<'a> Prefetch<'a> {
    pub(super) fn new(w: &'a [u8]) -> Self {
        Prefetch { w, next: 0 }
    }

    /// Prefetches every cache line of `w[..end]` not prefetched yet.
    #[inline]
    pub(super) fn upto(&mut self, end: usize) {
        let end = end.min(self.w.len());
        while self.next < end {
            // SAFETY: SSE is part of the x86_64 baseline, a prefetch has no architectural effect,
            // and the address is inside `w` (next < end ≤ len).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.w.as_ptr().add(self.next).cast()) };
            self.next += 64;
        }
    }
}

/// Defines `$name`, a [`GemvFn`] calling the vec_dot `$dot` once per row while prefetching
/// [`PREFETCH_AHEAD`] bytes past the current row.
macro_rules! gemv_prefetch_loop {
    ($name:ident, $dot:expr) => {
        fn $name(k: usize, w: &[u8], w_stride: usize, act: &[u8], out: &mut [f32]) {
            let mut ahead = $crate::quant::avx2::Prefetch::new(w);
            for (r, o) in out.iter_mut().enumerate() {
                ahead.upto((r + 1) * w_stride + $crate::quant::avx2::PREFETCH_AHEAD);
                *o = $dot(k, &w[r * w_stride..], act);
            }
        }
    };
}
pub(super) use gemv_prefetch_loop;

gemv_prefetch_loop!(gemv_f32, dot_f32);
gemv_prefetch_loop!(gemv_f16, dot_f16);
gemv_prefetch_loop!(gemv_bf16, dot_bf16);
gemv_prefetch_loop!(gemv_q4_0, dot_q4_0);
gemv_prefetch_loop!(gemv_q4_1, dot_q4_1);
gemv_prefetch_loop!(gemv_q5_0, dot_q5_0);
gemv_prefetch_loop!(gemv_q5_1, dot_q5_1);
gemv_prefetch_loop!(gemv_q2k, dot_q2k);
gemv_prefetch_loop!(gemv_q3k, dot_q3k);
gemv_prefetch_loop!(gemv_q4k, dot_q4k);
gemv_prefetch_loop!(gemv_q5k, dot_q5k);
gemv_prefetch_loop!(gemv_q6k, dot_q6k);
gemv_prefetch_loop!(gemv_q8k, dot_q8k);

/// Q8_0 rows four at a time (each activation block loaded once for the four), the leftover rows
/// through the one-row kernel; both give the same bits as [`dot_q8_0`].
fn gemv_q8_0(k: usize, w: &[u8], w_stride: usize, act: &[u8], out: &mut [f32]) {
    let rows = out.len();
    let nb = check_gemv(GgmlType::Q8_0, k, w, w_stride, act, rows);
    let mut ahead = Prefetch::new(w);
    let mut r = 0;
    while r + 4 <= rows {
        ahead.upto((r + 4) * w_stride + PREFETCH_AHEAD);
        // SAFETY: `gemv_fn` hands this out only after `available()`; `check_gemv` proved that
        // rows r..r + 4 (nb blocks each, `w_stride` bytes apart) lie inside `w` and that `act`
        // holds nb blocks.
        let v = unsafe { q8_0_rows4(nb, w.as_ptr().add(r * w_stride), w_stride, act.as_ptr()) };
        out[r..r + 4].copy_from_slice(&v);
        r += 4;
    }
    while r < rows {
        ahead.upto((r + 1) * w_stride + PREFETCH_AHEAD);
        // SAFETY: as above, for row r.
        out[r] = unsafe { q8_0_impl(nb, w.as_ptr().add(r * w_stride), act.as_ptr()) };
        r += 1;
    }
}

/// The AVX2 gemm for `ty`: the register-tiled kernel of `avx2_gemm.rs` where there is one, else
/// a loop over this file's vec_dot; `None` if this CPU can't run it or there is no AVX2 vec_dot.
pub(super) fn gemm_fn(ty: GgmlType) -> Option<GemmFn> {
    if !available() {
        return None;
    }
    if let Some(f) = super::avx2_gemm::gemm_fn(ty) {
        return Some(f);
    }
    Some(match ty {
        GgmlType::F32 => gemm_f32,
        GgmlType::F16 => gemm_f16,
        GgmlType::BF16 => gemm_bf16,
        GgmlType::Q4_0 => gemm_q4_0,
        GgmlType::Q4_1 => gemm_q4_1,
        GgmlType::Q5_0 => gemm_q5_0,
        GgmlType::Q5_1 => gemm_q5_1,
        GgmlType::Q8_0 => gemm_q8_0,
        GgmlType::Q2K => gemm_q2k,
        GgmlType::Q3K => gemm_q3k,
        GgmlType::Q4K => gemm_q4k,
        GgmlType::Q5K => gemm_q5k,
        GgmlType::Q6K => gemm_q6k,
        GgmlType::Q8K => gemm_q8k,
        GgmlType::Q8_1 => return None,
    })
}

// Loops over the vec_dots below, for the formats without a tiled gemm.
gemm_loop!(gemm_f32, dot_f32, GgmlType::F32);
gemm_loop!(gemm_f16, dot_f16, GgmlType::F16);
gemm_loop!(gemm_bf16, dot_bf16, GgmlType::BF16);
gemm_loop!(gemm_q4_0, dot_q4_0, GgmlType::Q4_0);
gemm_loop!(gemm_q4_1, dot_q4_1, GgmlType::Q4_1);
gemm_loop!(gemm_q5_0, dot_q5_0, GgmlType::Q5_0);
gemm_loop!(gemm_q5_1, dot_q5_1, GgmlType::Q5_1);
gemm_loop!(gemm_q8_0, dot_q8_0, GgmlType::Q8_0);
gemm_loop!(gemm_q2k, dot_q2k, GgmlType::Q2K);
gemm_loop!(gemm_q3k, dot_q3k, GgmlType::Q3K);
gemm_loop!(gemm_q4k, dot_q4k, GgmlType::Q4K);
gemm_loop!(gemm_q5k, dot_q5k, GgmlType::Q5K);
gemm_loop!(gemm_q6k, dot_q6k, GgmlType::Q6K);
gemm_loop!(gemm_q8k, dot_q8k, GgmlType::Q8K);

/// The AVX2 activation quantizer for `act`, if there is one and this CPU can run it.
pub(super) fn quantize_act_fn(act: GgmlType) -> Option<QuantizeActFn> {
    if !available() {
        return None;
    }
    Some(match act {
        GgmlType::Q8_0 => act_q8_0,
        GgmlType::Q8_1 => act_q8_1,
        GgmlType::Q8K => act_q8k,
        GgmlType::F16 => act_f16,
        GgmlType::BF16 => act_bf16,
        _ => return None,
    })
}

/// A whole-row conversion of 16-bit floats to f32.
pub(super) type RowConvFn = fn(&[u8], &mut [f32]);

pub(super) fn f16_to_f32_fn() -> Option<RowConvFn> {
    available().then_some(f16_to_f32_row as RowConvFn)
}

pub(super) fn bf16_to_f32_fn() -> Option<RowConvFn> {
    available().then_some(bf16_to_f32_row as RowConvFn)
}

pub(super) fn dot_rows_fn<E: RowElem>() -> Option<DotRowsFn<E>> {
    available().then_some(dot_rows::<E> as DotRowsFn<E>)
}

pub(super) fn weighted_sum_fn<E: RowElem>() -> Option<WeightedSumFn<E>> {
    available().then_some(weighted_sum::<E> as WeightedSumFn<E>)
}

pub(super) fn weighted_sum_acc_fn<E: RowElem>() -> Option<WeightedSumFn<E>> {
    available().then_some(weighted_sum_acc::<E> as WeightedSumFn<E>)
}

/// Eight values of a row at `p` (f32, or f16 converted in registers).
///
/// # Safety
/// `p` must point to 8 readable elements of `E`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld8_row<E: RowElem>(p: *const E) -> __m256 {
    // SAFETY: the caller guarantees 8 readable elements (16 bytes for f16, 32 for f32).
    unsafe {
        if E::F16 {
            ld8_f16(p.cast::<u8>())
        } else {
            _mm256_loadu_ps(p.cast::<f32>())
        }
    }
}

macro_rules! entry {
    ($safe:ident, $imp:ident, $ty:expr) => {
        fn $safe(n: usize, w: &[u8], a: &[u8]) -> f32 {
            let nb = check_vec_dot($ty, n, w, a);
            // SAFETY: this private fn is handed out only by `vec_dot_fn` after `available()`
            // confirmed AVX2/FMA/F16C, and `check_vec_dot` proved that `w` and `a` hold `nb`
            // whole blocks of the weight and activation types, which is all `$imp` reads.
            unsafe { $imp(nb, w.as_ptr(), a.as_ptr()) }
        }
    };
}

entry!(dot_f32, f32_impl, GgmlType::F32);
entry!(dot_f16, f16_impl, GgmlType::F16);
entry!(dot_bf16, bf16_impl, GgmlType::BF16);
entry!(dot_q4_0, q4_0_impl, GgmlType::Q4_0);
entry!(dot_q4_1, q4_1_impl, GgmlType::Q4_1);
entry!(dot_q5_0, q5_0_impl, GgmlType::Q5_0);
entry!(dot_q5_1, q5_1_impl, GgmlType::Q5_1);
entry!(dot_q8_0, q8_0_impl, GgmlType::Q8_0);
entry!(dot_q2k, q2k_impl, GgmlType::Q2K);
entry!(dot_q3k, q3k_impl, GgmlType::Q3K);
entry!(dot_q4k, q4k_impl, GgmlType::Q4K);
entry!(dot_q5k, q5k_impl, GgmlType::Q5K);
entry!(dot_q6k, q6k_impl, GgmlType::Q6K);
entry!(dot_q8k, q8k_impl, GgmlType::Q8K);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_ps(v: __m256) -> f32 {
    hsum_ps128(_mm_add_ps(
        _mm256_castps256_ps128(v),
        _mm256_extractf128_ps::<1>(v),
    ))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_ps128(s: __m128) -> f32 {
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hmax_ps(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}

/// # Safety
/// `p` must point to 2 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn ld_f16(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 2 readable bytes; the read is unaligned.
    let h = unsafe { p.cast::<u16>().read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

/// The f16 at `p` in all eight lanes.
///
/// Producing the whole vector (instead of a scalar to broadcast later) matters: for a scalar
/// LLVM loads the f16 with `vpinsrw` into an arbitrary register, which can be a loop
/// accumulator, chaining every block's scale onto the previous block's FMA.
///
/// # Safety
/// `p` must point to 2 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn bcast_f16(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 2 readable bytes; the read is unaligned.
    let h = unsafe { p.cast::<i16>().read_unaligned() };
    _mm256_cvtph_ps(_mm_set1_epi16(h))
}

/// The f32 at `p` in all eight lanes.
///
/// # Safety
/// `p` must point to 4 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn bcast_f32(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 4 readable bytes.
    _mm256_set1_ps(unsafe { ld_f32(p) })
}

/// # Safety
/// `p` must point to 4 readable bytes.
#[inline]
pub(super) unsafe fn ld_f32(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 4 readable bytes; the read is unaligned.
    unsafe { p.cast::<f32>().read_unaligned() }
}

/// # Safety
/// `p` must point to 2 readable bytes.
#[inline]
pub(super) unsafe fn rd_u16(p: *const u8) -> u16 {
    // SAFETY: the caller guarantees 2 readable bytes; the read is unaligned.
    unsafe { p.cast::<u16>().read_unaligned() }
}

/// # Safety
/// `p` must point to 4 readable bytes.
#[inline]
pub(super) unsafe fn ld_u32(p: *const u8) -> u32 {
    // SAFETY: the caller guarantees 4 readable bytes; the read is unaligned.
    unsafe { p.cast::<u32>().read_unaligned() }
}

/// # Safety
/// `p` must point to 32 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn ld256(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes; loadu has no alignment requirement.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// # Safety
/// `p` must point to 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn ld128(p: *const u8) -> __m128i {
    // SAFETY: the caller guarantees 16 readable bytes; loadu has no alignment requirement.
    unsafe { _mm_loadu_si128(p.cast()) }
}

/// Σ x·y over pairs of signed bytes, as eight i32 lanes. `sign` moves x's sign onto y so that
/// `maddubs` (unsigned × signed) sees |x| ≤ 128 and |y| ≤ 127: no saturation.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn mul_sum_i8(x: __m256i, y: __m256i) -> __m256i {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
}

/// Σ u·y for unsigned bytes u ≤ 63 and signed y, as eight i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_sum_u8(u: __m256i, y: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, y), _mm256_set1_epi16(1))
}

/// 16 packed nibbles → 32 bytes: low nibbles (elements 0..16) then high (16..32).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn nibbles(q: __m128i) -> __m256i {
    _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16::<4>(q), q),
        _mm256_set1_epi8(0x0F),
    )
}

/// Bit j of `bits` → byte j = 0xFF if set, else 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn bytes_from_bits(bits: u32) -> __m256i {
    let x = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_setr_epi64x(
            0x0000_0000_0000_0000,
            0x0101_0101_0101_0101,
            0x0202_0202_0202_0202,
            0x0303_0303_0303_0303,
        ),
    );
    // Byte j of each 8-byte group has every bit but (j % 8) set; OR-ing the source byte in
    // gives all-ones exactly when that bit was set.
    let x = _mm256_or_si256(x, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_cmpeq_epi8(x, _mm256_set1_epi64x(-1))
}

/// i16 shuffle mask broadcasting lane `a` to the low 128 bits and lane `b` to the high 128.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lane_pair_mask(a: i16, b: i16) -> __m256i {
    _mm256_set_m128i(
        _mm_set1_epi16(((2 * b + 1) << 8) | (2 * b)),
        _mm_set1_epi16(((2 * a + 1) << 8) | (2 * a)),
    )
}

// ---------------------------------------------------------------------------------------------
// Float formats
// ---------------------------------------------------------------------------------------------

/// Shared body for the float formats: `load(p)` turns 8 elements at byte pointer `p` into f32.
macro_rules! float_dot {
    ($name:ident, $esz:expr, $load:expr, $scalar:expr) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name(n: usize, x: *const u8, y: *const u8) -> f32 {
            // SAFETY: the caller guarantees n elements of $esz bytes behind x and y; every
            // access below stays below index n.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i + 32 <= n {
                    for (u, a) in acc.iter_mut().enumerate() {
                        let o = (i + 8 * u) * $esz;
                        *a = _mm256_fmadd_ps($load(x.add(o)), $load(y.add(o)), *a);
                    }
                    i += 32;
                }
                while i + 8 <= n {
                    let o = i * $esz;
                    acc[0] = _mm256_fmadd_ps($load(x.add(o)), $load(y.add(o)), acc[0]);
                    i += 8;
                }
                let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                let mut sum = hsum_ps(s);
                while i < n {
                    sum += $scalar(x.add(i * $esz)) * $scalar(y.add(i * $esz));
                    i += 1;
                }
                sum
            }
        }
    };
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld8_f32(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 32 readable bytes.
    unsafe { _mm256_loadu_ps(p.cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld8_f16(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 16 readable bytes.
    _mm256_cvtph_ps(unsafe { ld128(p) })
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld8_bf16(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 16 readable bytes.
    let v = unsafe { ld128(p) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
}

#[inline]
unsafe fn ld_bf16(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 2 readable bytes.
    let h = unsafe { p.cast::<u16>().read_unaligned() };
    f32::from_bits((h as u32) << 16)
}

float_dot!(f32_impl, 4, ld8_f32, ld_f32);
float_dot!(f16_impl, 2, ld8_f16, ld_f16);
float_dot!(bf16_impl, 2, ld8_bf16, ld_bf16);

fn f16_to_f32_row(src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), 2 * dst.len());
    // SAFETY: handed out only by `f16_to_f32_fn` after the feature check; lengths checked above.
    unsafe { f16_to_f32_impl(src.as_ptr(), dst.as_mut_ptr(), dst.len()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_to_f32_impl(src: *const u8, dst: *mut f32, n: usize) {
    // SAFETY: the caller guarantees 2n readable bytes at src and n writable f32 at dst.
    unsafe {
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(dst.add(i), ld8_f16(src.add(2 * i)));
            i += 8;
        }
        while i < n {
            *dst.add(i) = ld_f16(src.add(2 * i));
            i += 1;
        }
    }
}

fn dot_rows<E: RowElem>(xs: &[f32], nq: usize, rows: &[E], stride: usize, out: &mut [f32]) {
    let (n, m) = scalar::check_rows("dot_rows", nq, xs.len(), out.len(), rows, stride);
    let mut q = 0;
    while q < nq {
        let take = (nq - q).min(4);
        let (x, o) = (xs[q * n..].as_ptr(), out[q * m..].as_mut_ptr());
        // SAFETY: handed out only by `dot_rows_fn` after the feature check; `check_rows`
        // proved that every row j < m has n readable values at rows[j * stride..], and queries
        // q..q + take have n values at xs[q * n..] and m outputs at out[q * m..].
        unsafe {
            match take {
                1 => dot_rows_impl::<E, 1, 4>(x, n, rows.as_ptr(), stride, o, m),
                2 => dot_rows_impl::<E, 2, 4>(x, n, rows.as_ptr(), stride, o, m),
                3 => dot_rows_impl::<E, 3, 2>(x, n, rows.as_ptr(), stride, o, m),
                _ => dot_rows_impl::<E, 4, 2>(x, n, rows.as_ptr(), stride, o, m),
            }
        }
        q += take;
    }
}

/// Attention's query-key scores for `Q` queries that share a key head: `R` rows at a time, so
/// each 8-wide piece of a key row is loaded once for all `Q` queries and `Q · R` independent
/// FMA chains keep both FMA ports busy.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_impl<E: RowElem, const Q: usize, const R: usize>(
    x: *const f32,
    n: usize,
    rows: *const E,
    stride: usize,
    out: *mut f32,
    m: usize,
) {
    // SAFETY: the caller guarantees n readable values at x + q * n for q < Q and at
    // rows + j * stride for j < m, and m writable values at out + q * m.
    unsafe {
        let n8 = n / 8 * 8;
        let tail = |q: usize, j: usize, mut s: f32| {
            for d in n8..n {
                s = (*x.add(q * n + d)).mul_add((*rows.add(j * stride + d)).to_f32(), s);
            }
            s
        };
        let mut j = 0;
        while j + R <= m {
            let mut acc = [[_mm256_setzero_ps(); Q]; R];
            let mut d = 0;
            while d < n8 {
                let xv: [__m256; Q] = std::array::from_fn(|q| _mm256_loadu_ps(x.add(q * n + d)));
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let kv = ld8_row(rows.add((j + r) * stride + d));
                    for (a, xq) in acc_r.iter_mut().zip(&xv) {
                        *a = _mm256_fmadd_ps(*xq, kv, *a);
                    }
                }
                d += 8;
            }
            for (r, acc_r) in acc.iter().enumerate() {
                for (q, a) in acc_r.iter().enumerate() {
                    *out.add(q * m + j + r) = tail(q, j + r, hsum_ps(*a));
                }
            }
            j += R;
        }
        while j < m {
            let mut acc = [_mm256_setzero_ps(); Q];
            let mut d = 0;
            while d < n8 {
                let kv = ld8_row(rows.add(j * stride + d));
                for (q, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(q * n + d)), kv, *a);
                }
                d += 8;
            }
            for (q, a) in acc.iter().enumerate() {
                *out.add(q * m + j) = tail(q, j, hsum_ps(*a));
            }
            j += 1;
        }
    }
}

fn weighted_sum<E: RowElem>(ws: &[f32], nq: usize, rows: &[E], stride: usize, out: &mut [f32]) {
    out.fill(0.0);
    weighted_sum_acc(ws, nq, rows, stride, out)
}

fn weighted_sum_acc<E: RowElem>(ws: &[f32], nq: usize, rows: &[E], stride: usize, out: &mut [f32]) {
    let (n, m) = scalar::check_rows("weighted_sum", nq, out.len(), ws.len(), rows, stride);
    let mut q = 0;
    while q < nq {
        let take = (nq - q).min(4);
        let (w, o) = (ws[q * m..].as_ptr(), out[q * n..].as_mut_ptr());
        // SAFETY: handed out only by `weighted_sum_fn` after the feature check; `check_rows`
        // proved that every row j < m has n readable values at rows[j * stride..], and queries
        // q..q + take have m weights at ws[q * m..] and n outputs at out[q * n..].
        unsafe {
            match take {
                1 => weighted_sum_impl::<E, 1, 8>(w, m, rows.as_ptr(), stride, o, n),
                2 => weighted_sum_impl::<E, 2, 4>(w, m, rows.as_ptr(), stride, o, n),
                3 => weighted_sum_impl::<E, 3, 2>(w, m, rows.as_ptr(), stride, o, n),
                _ => weighted_sum_impl::<E, 4, 2>(w, m, rows.as_ptr(), stride, o, n),
            }
        }
        q += take;
    }
}

/// Attention's probability-weighted sum of value rows for `Q` queries that share a value head,
/// added to `out`. The outputs stay in registers across all rows, `8 · C` columns of each query
/// at a time, so each value is loaded once for all `Q` queries and no partial sum goes through
/// memory; the products are fused (FMA), which rounds once where the scalar twin rounds twice.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum_impl<E: RowElem, const Q: usize, const C: usize>(
    w: *const f32,
    m: usize,
    rows: *const E,
    stride: usize,
    out: *mut f32,
    n: usize,
) {
    // SAFETY: the caller guarantees m readable weights at w + q * m for q < Q, n readable
    // values at rows + j * stride for j < m, and n readable and writable values at out + q * n.
    unsafe {
        let mut d = 0;
        while d + 8 * C <= n {
            let mut acc: [[__m256; C]; Q] = std::array::from_fn(|q| {
                std::array::from_fn(|c| _mm256_loadu_ps(out.add(q * n + d + 8 * c)))
            });
            for j in 0..m {
                let r = rows.add(j * stride + d);
                let v: [__m256; C] = std::array::from_fn(|c| ld8_row(r.add(8 * c)));
                for (q, acc_q) in acc.iter_mut().enumerate() {
                    let wq = _mm256_set1_ps(*w.add(q * m + j));
                    for (a, vc) in acc_q.iter_mut().zip(&v) {
                        *a = _mm256_fmadd_ps(wq, *vc, *a);
                    }
                }
            }
            for (q, acc_q) in acc.iter().enumerate() {
                for (c, a) in acc_q.iter().enumerate() {
                    _mm256_storeu_ps(out.add(q * n + d + 8 * c), *a);
                }
            }
            d += 8 * C;
        }
        while d + 8 <= n {
            let mut acc: [__m256; Q] = std::array::from_fn(|q| _mm256_loadu_ps(out.add(q * n + d)));
            for j in 0..m {
                let v = ld8_row(rows.add(j * stride + d));
                for (q, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(*w.add(q * m + j)), v, *a);
                }
            }
            for (q, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(q * n + d), *a);
            }
            d += 8;
        }
        while d < n {
            for q in 0..Q {
                let mut acc = *out.add(q * n + d);
                for j in 0..m {
                    acc = (*w.add(q * m + j)).mul_add((*rows.add(j * stride + d)).to_f32(), acc);
                }
                *out.add(q * n + d) = acc;
            }
            d += 1;
        }
    }
}

fn bf16_to_f32_row(src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), 2 * dst.len());
    // SAFETY: handed out only by `bf16_to_f32_fn` after the feature check; lengths checked above.
    unsafe { bf16_to_f32_impl(src.as_ptr(), dst.as_mut_ptr(), dst.len()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16_to_f32_impl(src: *const u8, dst: *mut f32, n: usize) {
    // SAFETY: the caller guarantees 2n readable bytes at src and n writable f32 at dst.
    unsafe {
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(dst.add(i), ld8_bf16(src.add(2 * i)));
            i += 8;
        }
        while i < n {
            *dst.add(i) = ld_bf16(src.add(2 * i));
            i += 1;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Legacy 32-element formats
//
// Blocks are processed in groups of eight: the sixteen f16 scales of a group are converted with
// two `vcvtph2ps` instead of sixteen, and the 4/5-bit formats handle two blocks per 256-bit
// vector (block a's bytes in the low lane, block b's in the high lane) so unpacking a nibble costs
// half as much. Leftover blocks take the one-block-at-a-time path.
// ---------------------------------------------------------------------------------------------

/// The f16 scales of eight consecutive blocks `S` bytes apart, as f32.
///
/// # Safety
/// `p + k·S` must have 2 readable bytes for k in 0..8.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16x8<const S: usize>(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees the eight 2-byte reads are in bounds.
    unsafe {
        // Start from zero so the first insert doesn't inherit a stale register.
        let mut v = _mm_insert_epi16::<0>(_mm_setzero_si128(), rd_u16(p) as i32);
        v = _mm_insert_epi16::<1>(v, rd_u16(p.add(S)) as i32);
        v = _mm_insert_epi16::<2>(v, rd_u16(p.add(2 * S)) as i32);
        v = _mm_insert_epi16::<3>(v, rd_u16(p.add(3 * S)) as i32);
        v = _mm_insert_epi16::<4>(v, rd_u16(p.add(4 * S)) as i32);
        v = _mm_insert_epi16::<5>(v, rd_u16(p.add(5 * S)) as i32);
        v = _mm_insert_epi16::<6>(v, rd_u16(p.add(6 * S)) as i32);
        v = _mm_insert_epi16::<7>(v, rd_u16(p.add(7 * S)) as i32);
        _mm256_cvtph_ps(v)
    }
}

/// Like [`f16x8`] for the first `r` (< 8) blocks; the other lanes are 0.
///
/// # Safety
/// `p + k·S` must have 2 readable bytes for k in 0..r.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16xn<const S: usize>(p: *const u8, r: usize) -> __m256 {
    // Conditional inserts rather than a stack array: 2-byte stores followed by a 16-byte load
    // would stall on store forwarding. `r` is the same for every row of a matrix, so the
    // branches predict perfectly.
    // SAFETY: lane k is read only when k < r, which the caller vouches for.
    unsafe {
        let mut v = _mm_setzero_si128();
        if r > 0 {
            v = _mm_insert_epi16::<0>(v, rd_u16(p) as i32);
        }
        if r > 1 {
            v = _mm_insert_epi16::<1>(v, rd_u16(p.add(S)) as i32);
        }
        if r > 2 {
            v = _mm_insert_epi16::<2>(v, rd_u16(p.add(2 * S)) as i32);
        }
        if r > 3 {
            v = _mm_insert_epi16::<3>(v, rd_u16(p.add(3 * S)) as i32);
        }
        if r > 4 {
            v = _mm_insert_epi16::<4>(v, rd_u16(p.add(4 * S)) as i32);
        }
        if r > 5 {
            v = _mm_insert_epi16::<5>(v, rd_u16(p.add(5 * S)) as i32);
        }
        if r > 6 {
            v = _mm_insert_epi16::<6>(v, rd_u16(p.add(6 * S)) as i32);
        }
        if r > 7 {
            v = _mm_insert_epi16::<7>(v, rd_u16(p.add(7 * S)) as i32);
        }
        _mm256_cvtph_ps(v)
    }
}

/// f16 scale products of a group of `r` ≤ 8 blocks: lane k = x_k.d · y_k.d (0 past r).
///
/// # Safety
/// `x`/`y` must point to `r` blocks of stride `XS`/`YS` whose scale is at offset `OFF`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn group_scales<const XS: usize, const YS: usize>(
    x: *const u8,
    y: *const u8,
    r: usize,
) -> __m256 {
    // SAFETY: forwarded caller contract.
    unsafe {
        if r == 8 {
            _mm256_mul_ps(f16x8::<XS>(x), f16x8::<YS>(y))
        } else {
            _mm256_mul_ps(f16xn::<XS>(x, r), f16xn::<YS>(y, r))
        }
    }
}

/// `vpermps` indices: lanes 0..4 ← 2k, lanes 4..8 ← 2k+1 (the scales of block pair k).
static PAIR_IDX: [[i32; 8]; 4] = [
    [0, 0, 0, 0, 1, 1, 1, 1],
    [2, 2, 2, 2, 3, 3, 3, 3],
    [4, 4, 4, 4, 5, 5, 5, 5],
    [6, 6, 6, 6, 7, 7, 7, 7],
];

/// Lanes 0..4 ← lane 2k of `d`, lanes 4..8 ← lane 2k+1: the scales of block pair k < 4.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn pair_scales(d: __m256, k: usize) -> __m256 {
    // SAFETY: PAIR_IDX[k] is 32 readable bytes (the index panics for k >= 4).
    let idx = unsafe { _mm256_loadu_si256(PAIR_IDX[k].as_ptr().cast()) };
    _mm256_permutevar8x32_ps(d, idx)
}

/// Packed nibbles of blocks a and b: (low nibbles a | b, high nibbles a | b), i.e. elements
/// 0..16 and 16..32 of each block.
///
/// # Safety
/// `qa` and `qb` must each have 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibble_pair(qa: *const u8, qb: *const u8) -> (__m256i, __m256i) {
    // SAFETY: the caller guarantees 16 readable bytes at each pointer.
    let q = unsafe { _mm256_loadu2_m128i(qb.cast(), qa.cast()) };
    let m4 = _mm256_set1_epi8(0x0F);
    (
        _mm256_and_si256(q, m4),
        _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4),
    )
}

/// Q8 activations of blocks a and b laid out to match [`nibble_pair`].
///
/// # Safety
/// `ya` and `yb` must each have 32 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn act_pair(ya: *const u8, yb: *const u8) -> (__m256i, __m256i) {
    // SAFETY: the caller guarantees 32 readable bytes at each pointer.
    unsafe {
        (
            _mm256_loadu2_m128i(yb.cast(), ya.cast()),
            _mm256_loadu2_m128i(yb.add(16).cast(), ya.add(16).cast()),
        )
    }
}

/// 0x10 in each byte whose 5th bit is set, laid out to match [`nibble_pair`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn high_bit_pair(qha: u32, qhb: u32) -> (__m256i, __m256i) {
    // Bytes 0..4 of each lane hold qha, 4..8 qhb; the shuffles copy the byte holding bit j of
    // the wanted word into byte j.
    let v = _mm256_set1_epi64x((((qhb as u64) << 32) | qha as u64) as i64);
    let sel_lo = _mm256_setr_epi64x(
        0x0000_0000_0000_0000,
        0x0101_0101_0101_0101,
        0x0404_0404_0404_0404,
        0x0505_0505_0505_0505,
    );
    let sel_hi = _mm256_setr_epi64x(
        0x0202_0202_0202_0202,
        0x0303_0303_0303_0303,
        0x0606_0606_0606_0606,
        0x0707_0707_0707_0707,
    );
    (
        bit_bytes_to_0x10(_mm256_shuffle_epi8(v, sel_lo)),
        bit_bytes_to_0x10(_mm256_shuffle_epi8(v, sel_hi)),
    )
}

/// Byte j (of each 8-byte group) → 0x10 if its bit j % 8 is set, else 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bit_bytes_to_0x10(x: __m256i) -> __m256i {
    let x = _mm256_or_si256(x, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_and_si256(
        _mm256_cmpeq_epi8(x, _mm256_set1_epi64x(-1)),
        _mm256_set1_epi8(0x10),
    )
}

/// Σ (lo·ylo + hi·yhi) − off·Σy per 4-element group, as i32 lanes (low lane block a, high lane
/// block b). `lo`/`hi` are unsigned quants ≤ 31, so no i16 step can overflow.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pair_dot(lo: __m256i, hi: __m256i, ylo: __m256i, yhi: __m256i, off: i8) -> __m256i {
    let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, ylo), _mm256_maddubs_epi16(hi, yhi));
    let p = if off != 0 {
        let o = _mm256_set1_epi8(off);
        let s = _mm256_add_epi16(_mm256_maddubs_epi16(o, ylo), _mm256_maddubs_epi16(o, yhi));
        _mm256_sub_epi16(p, s)
    } else {
        p
    };
    _mm256_madd_epi16(p, _mm256_set1_epi16(1))
}

/// One pair (blocks 2k, 2k+1 of the group at `xg`/`yg`) of [`paired_groups`]: returns
/// `acc + scales · Σ`.
///
/// # Safety
/// Both blocks must be readable behind `xg` and `yg`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
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
    d: __m256,
    acc: __m256,
) -> __m256 {
    // SAFETY: the caller vouches for blocks 2k and 2k+1.
    unsafe {
        let (xa, xb) = (xg.add(2 * k * XS), xg.add((2 * k + 1) * XS));
        let (ya, yb) = (yg.add(2 * k * YS), yg.add((2 * k + 1) * YS));
        let (mut lo, mut hi) = nibble_pair(xa.add(QS), xb.add(QS));
        if QH != 0 {
            let (hl, hh) = high_bit_pair(ld_u32(xa.add(QH)), ld_u32(xb.add(QH)));
            lo = _mm256_or_si256(lo, hl);
            hi = _mm256_or_si256(hi, hh);
        }
        let (ylo, yhi) = act_pair(ya.add(YQ), yb.add(YQ));
        let p = pair_dot(lo, hi, ylo, yhi, OFF);
        _mm256_fmadd_ps(pair_scales(d, k), _mm256_cvtepi32_ps(p), acc)
    }
}

/// Grouped kernel for the paired 4/5-bit formats over the first `nb` (even) blocks. `XS`/`YS`
/// are the block strides, `QS` the offset of the nibbles, `QH` of the high bits (0 = none), `YQ`
/// of the activation quants, `OFF` the quant offset subtracted (8 or 16; 0 for the formats with a
/// min), and `MS` whether to add min·sum (f16 at byte 2 of both blocks).
///
/// # Safety
/// `x` and `y` must hold `nb` blocks of their formats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn paired_groups<
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
    debug_assert!(nb.is_multiple_of(2));
    let mut a0 = _mm256_setzero_ps();
    let mut a1 = _mm256_setzero_ps();
    let mut accm = _mm256_setzero_ps();
    // SAFETY: every access is inside blocks blk..blk + r ≤ nb of x or y, which the caller
    // vouches for.
    unsafe {
        let mut blk = 0;
        while blk < nb {
            let r = (nb - blk).min(8);
            let xg = x.add(XS * blk);
            let yg = y.add(YS * blk);
            let d = group_scales::<XS, YS>(xg, yg, r);
            if MS {
                accm = _mm256_fmadd_ps(
                    f16xn_or_8::<XS>(xg.add(2), r),
                    f16xn_or_8::<YS>(yg.add(2), r),
                    accm,
                );
            }
            // Two named accumulators (not an array indexed by k, which LLVM keeps on the stack
            // and turns into a store-forwarding chain).
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
    hsum_ps(_mm256_add_ps(a0, a1)) + hsum_ps(accm)
}

/// [`f16x8`] when `r == 8`, else [`f16xn`].
///
/// # Safety
/// As [`f16xn`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16xn_or_8<const S: usize>(p: *const u8, r: usize) -> __m256 {
    // SAFETY: forwarded caller contract.
    unsafe {
        if r == 8 {
            f16x8::<S>(p)
        } else {
            f16xn::<S>(p, r)
        }
    }
}

/// The body is pasted in (not a closure) so it is compiled with the caller's target features.
macro_rules! two_acc_loop {
    ($nb:expr, |$i:ident: usize, $acc:ident: __m256| $body:block) => {{
        let nb = $nb;
        let mut a0 = _mm256_setzero_ps();
        let mut a1 = _mm256_setzero_ps();
        let mut blk = 0;
        while blk + 2 <= nb {
            a0 = {
                let ($i, $acc) = (blk, a0);
                $body
            };
            a1 = {
                let ($i, $acc) = (blk + 1, a1);
                $body
            };
            blk += 2;
        }
        if blk < nb {
            a0 = {
                let ($i, $acc) = (blk, a0);
                $body
            };
        }
        hsum_ps(_mm256_add_ps(a0, a1))
    }};
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q8_0_impl(nb: usize, x: *const u8, y: *const u8) -> f32 {
    // SAFETY: the caller guarantees nb 34-byte blocks behind both x and y; each group reads
    // blocks blk..blk + r ≤ nb.
    unsafe {
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut blk = 0;
        while blk < nb {
            let r = (nb - blk).min(8);
            let (xg, yg) = (x.add(34 * blk), y.add(34 * blk));
            // Spilling the 8 scales and re-reading each with a broadcast load keeps the
            // per-block scale off the shuffle port, which the dot product itself needs.
            let mut d = [0f32; 8];
            _mm256_storeu_ps(d.as_mut_ptr(), group_scales::<34, 34>(xg, yg, r));
            let step = |b: usize, acc: __m256| {
                let p = mul_sum_i8(ld256(xg.add(34 * b + 2)), ld256(yg.add(34 * b + 2)));
                _mm256_fmadd_ps(_mm256_broadcast_ss(&d[b]), _mm256_cvtepi32_ps(p), acc)
            };
            let mut b = 0;
            while b + 2 <= r {
                a0 = step(b, a0);
                a1 = step(b + 1, a1);
                b += 2;
            }
            if b < r {
                a0 = step(b, a0);
            }
            blk += r;
        }
        hsum_ps(_mm256_add_ps(a0, a1))
    }
}

/// [`q8_0_impl`] of four rows `stride` bytes apart against the same activations, with each row's
/// arithmetic in exactly `q8_0_impl`'s order (so each result has the same bits).
///
/// # Safety
/// Four rows of nb 34-byte blocks at `x + j·stride` (j < 4) and nb blocks behind `y`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_rows4(nb: usize, x: *const u8, stride: usize, y: *const u8) -> [f32; 4] {
    // SAFETY: every access is inside blocks blk..blk + r ≤ nb of one of the four rows or of y.
    unsafe {
        let mut a0 = [_mm256_setzero_ps(); 4];
        let mut a1 = [_mm256_setzero_ps(); 4];
        let mut blk = 0;
        while blk < nb {
            let r = (nb - blk).min(8);
            let yg = y.add(34 * blk);
            let xg = [0, 1, 2, 3].map(|j| x.add(j * stride + 34 * blk));
            let dy = f16xn_or_8::<34>(yg, r);
            // Per-block scale products spilled for broadcast loads, as in `q8_0_impl`.
            let mut d = [[0f32; 8]; 4];
            for j in 0..4 {
                let dx = f16xn_or_8::<34>(xg[j], r);
                _mm256_storeu_ps(d[j].as_mut_ptr(), _mm256_mul_ps(dx, dy));
            }
            let mut b = 0;
            while b + 2 <= r {
                let y0 = ld256(yg.add(34 * b + 2));
                let y1 = ld256(yg.add(34 * b + 36));
                for j in 0..4 {
                    let p0 = mul_sum_i8(ld256(xg[j].add(34 * b + 2)), y0);
                    let s0 = _mm256_broadcast_ss(&d[j][b]);
                    a0[j] = _mm256_fmadd_ps(s0, _mm256_cvtepi32_ps(p0), a0[j]);
                    let p1 = mul_sum_i8(ld256(xg[j].add(34 * b + 36)), y1);
                    let s1 = _mm256_broadcast_ss(&d[j][b + 1]);
                    a1[j] = _mm256_fmadd_ps(s1, _mm256_cvtepi32_ps(p1), a1[j]);
                }
                b += 2;
            }
            if b < r {
                let y0 = ld256(yg.add(34 * b + 2));
                for j in 0..4 {
                    let p0 = mul_sum_i8(ld256(xg[j].add(34 * b + 2)), y0);
                    let s0 = _mm256_broadcast_ss(&d[j][b]);
                    a0[j] = _mm256_fmadd_ps(s0, _mm256_cvtepi32_ps(p0), a0[j]);
                }
            }
            blk += r;
        }
        [0, 1, 2, 3].map(|j| hsum_ps(_mm256_add_ps(a0[j], a1[j])))
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4_0_impl(nb: usize, x: *const u8, y: *const u8) -> f32 {
    let np = nb & !1;
    // SAFETY: the caller guarantees nb 18-byte blocks behind x and nb 34-byte blocks behind y.
    unsafe {
        let head = paired_groups::<18, 34, 2, 0, 2, 8, false>(np, x, y);
        let (x, y) = (x.add(18 * np), y.add(34 * np));
        head + two_acc_loop!(nb - np, |i: usize, acc: __m256| {
            let (xb, yb) = (x.add(18 * i), y.add(34 * i));
            let d = _mm256_mul_ps(bcast_f16(xb), bcast_f16(yb));
            let q = _mm256_sub_epi8(nibbles(ld128(xb.add(2))), _mm256_set1_epi8(8));
            let p = mul_sum_i8(q, ld256(yb.add(2)));
            _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc)
        })
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q5_0_impl(nb: usize, x: *const u8, y: *const u8) -> f32 {
    let np = nb & !1;
    // SAFETY: the caller guarantees nb 22-byte blocks behind x and nb 34-byte blocks behind y.
    unsafe {
        let head = paired_groups::<22, 34, 6, 2, 2, 16, false>(np, x, y);
        let (x, y) = (x.add(22 * np), y.add(34 * np));
        head + two_acc_loop!(nb - np, |i: usize, acc: __m256| {
            let (xb, yb) = (x.add(22 * i), y.add(34 * i));
            let d = _mm256_mul_ps(bcast_f16(xb), bcast_f16(yb));
            // Where the 5th bit is clear, OR-ing 0xF0 into the nibble yields it minus 16 as i8.
            let hi = _mm256_andnot_si256(
                bytes_from_bits(ld_u32(xb.add(2))),
                _mm256_set1_epi8(0xF0u8 as i8),
            );
            let q = _mm256_or_si256(nibbles(ld128(xb.add(6))), hi);
            let p = mul_sum_i8(q, ld256(yb.add(2)));
            _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc)
        })
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4_1_impl(nb: usize, x: *const u8, y: *const u8) -> f32 {
    let np = nb & !1;
    // SAFETY: the caller guarantees nb 20-byte blocks behind x and nb 36-byte blocks behind y.
    unsafe {
        let head = paired_groups::<20, 36, 4, 0, 4, 0, true>(np, x, y);
        let (x, y) = (x.add(20 * np), y.add(36 * np));
        let mut accm = _mm256_setzero_ps();
        let s = two_acc_loop!(nb - np, |i: usize, acc: __m256| {
            let (xb, yb) = (x.add(20 * i), y.add(36 * i));
            let d = _mm256_mul_ps(bcast_f16(xb), bcast_f16(yb));
            accm = _mm256_fmadd_ps(bcast_f16(xb.add(2)), bcast_f16(yb.add(2)), accm);
            let p = mul_sum_u8(nibbles(ld128(xb.add(4))), ld256(yb.add(4)));
            _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc)
        });
        // Every lane of accm holds the same Σ m·s, so an eighth of the lane sum is exact.
        head + s + hsum_ps(accm) * 0.125
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q5_1_impl(nb: usize, x: *const u8, y: *const u8) -> f32 {
    let np = nb & !1;
    // SAFETY: the caller guarantees nb 24-byte blocks behind x and nb 36-byte blocks behind y.
    unsafe {
        let head = paired_groups::<24, 36, 8, 4, 4, 0, true>(np, x, y);
        let (x, y) = (x.add(24 * np), y.add(36 * np));
        let mut accm = _mm256_setzero_ps();
        let s = two_acc_loop!(nb - np, |i: usize, acc: __m256| {
            let (xb, yb) = (x.add(24 * i), y.add(36 * i));
            let d = _mm256_mul_ps(bcast_f16(xb), bcast_f16(yb));
            accm = _mm256_fmadd_ps(bcast_f16(xb.add(2)), bcast_f16(yb.add(2)), accm);
            let hi = _mm256_and_si256(bytes_from_bits(ld_u32(xb.add(4))), _mm256_set1_epi8(0x10));
            let q = _mm256_or_si256(nibbles(ld128(xb.add(8))), hi);
            let p = mul_sum_u8(q, ld256(yb.add(4)));
            _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc)
        });
        head + s + hsum_ps(accm) * 0.125
    }
}

// ---------------------------------------------------------------------------------------------
// K-quants (activations are Q8_K: d f32 @0, qs @4, bsums i16 @260)
// ---------------------------------------------------------------------------------------------

const Q8K_QS: usize = 4;
const Q8K_BS: usize = 260;

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8k_impl(nb: usize, x: *const u8, y: *const u8) -> f32 {
    // SAFETY: the caller guarantees nb 292-byte blocks behind x and y.
    unsafe {
        two_acc_loop!(nb, |i: usize, acc: __m256| {
            let (xb, yb) = (x.add(292 * i), y.add(292 * i));
            let mut sumi = _mm256_setzero_si256();
            for k in 0..8 {
                let o = Q8K_QS + 32 * k;
                sumi = _mm256_add_epi32(sumi, mul_sum_i8(ld256(xb.add(o)), ld256(yb.add(o))));
            }
            let d = _mm256_mul_ps(bcast_f32(xb), bcast_f32(yb));
            _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc)
        })
    }
}

/// Q4_K/Q5_K scales (i16 lanes 0..8) and mins (lanes 8..16) from the 12 packed bytes at `s`.
///
/// # Safety
/// `s` must point to 12 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn k4_scales_mins(s: *const u8) -> __m256i {
    const KM1: u32 = 0x3f3f_3f3f;
    const KM2: u32 = 0x0f0f_0f0f;
    const KM3: u32 = 0x0303_0303;
    // SAFETY: the caller guarantees 12 readable bytes.
    let (u0, u1, u2) = unsafe { (ld_u32(s), ld_u32(s.add(4)), ld_u32(s.add(8))) };
    let sc_lo = u0 & KM1;
    let sc_hi = (u2 & KM2) | (((u0 >> 6) & KM3) << 4);
    let m_lo = u1 & KM1;
    let m_hi = ((u2 >> 4) & KM2) | (((u1 >> 6) & KM3) << 4);
    _mm256_cvtepu8_epi16(_mm_set_epi32(
        m_hi as i32,
        m_lo as i32,
        sc_hi as i32,
        sc_lo as i32,
    ))
}

/// Σ_j mins[j]·(bsums[2j] + bsums[2j+1]) as four i32 lanes.
///
/// # Safety
/// `yb` must point to a whole Q8_K block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn k4_min_dot(mins_scales: __m256i, yb: *const u8) -> __m128i {
    // SAFETY: bsums are the last 32 bytes of the block the caller vouches for.
    let bs = unsafe { ld256(yb.add(Q8K_BS)) };
    let q8s = _mm_hadd_epi16(
        _mm256_castsi256_si128(bs),
        _mm256_extracti128_si256::<1>(bs),
    );
    _mm_madd_epi16(_mm256_extracti128_si256::<1>(mins_scales), q8s)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_impl<const Q5: bool>(nb: usize, x: *const u8, y: *const u8) -> f32 {
    let (bsize, qs_off) = if Q5 { (176, 48) } else { (144, 16) };
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let masks = [
        lane_pair_mask(0, 0),
        lane_pair_mask(1, 1),
        lane_pair_mask(2, 2),
        lane_pair_mask(3, 3),
        lane_pair_mask(4, 4),
        lane_pair_mask(5, 5),
        lane_pair_mask(6, 6),
        lane_pair_mask(7, 7),
    ];
    let mut acc = _mm256_setzero_ps();
    let mut accm = _mm_setzero_ps();
    // SAFETY: the caller guarantees nb blocks of `bsize` bytes behind x and nb Q8_K blocks
    // behind y; all offsets below are inside those blocks.
    unsafe {
        for i in 0..nb {
            let (xb, yb) = (x.add(bsize * i), y.add(292 * i));
            let yd = bcast_f32(yb);
            let d = _mm256_mul_ps(yd, bcast_f16(xb));
            let dmin = _mm256_castps256_ps128(_mm256_mul_ps(yd, bcast_f16(xb.add(2))));
            let ms = k4_scales_mins(xb.add(4));
            accm = _mm_fmadd_ps(dmin, _mm_cvtepi32_ps(k4_min_dot(ms, yb)), accm);
            let scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(ms));
            let mut hb = if Q5 {
                ld256(xb.add(16))
            } else {
                _mm256_setzero_si256()
            };
            let mut sumi = _mm256_setzero_si256();
            let q8 = yb.add(Q8K_QS);
            for j in 0..4 {
                let q4 = ld256(xb.add(qs_off + 32 * j));
                let mut lo = _mm256_and_si256(q4, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), m4);
                if Q5 {
                    let b0 = _mm256_and_si256(hb, one);
                    let b1 = _mm256_and_si256(_mm256_srli_epi16::<1>(hb), one);
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(b0));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16::<4>(b1));
                    hb = _mm256_srli_epi16::<2>(hb);
                }
                let sl = _mm256_shuffle_epi8(scales, masks[2 * j]);
                let sh = _mm256_shuffle_epi8(scales, masks[2 * j + 1]);
                let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, ld256(q8.add(64 * j))), sl);
                let ph =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(hi, ld256(q8.add(64 * j + 32))), sh);
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
            }
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum_ps(acc) - hsum_ps128(accm)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_impl(nb: usize, x: *const u8, y: *const u8) -> f32 {
    // SAFETY: forwarded caller contract.
    unsafe { k4_impl::<false>(nb, x, y) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5k_impl(nb: usize, x: *const u8, y: *const u8) -> f32 {
    // SAFETY: forwarded caller contract.
    unsafe { k4_impl::<true>(nb, x, y) }
}

/// Shuffle masks that, applied to 8 i16 scales duplicated in both halves, give the scales of
/// the k-th 32-element group of a 128-element chunk (16 elements per scale).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn group16_masks() -> [__m256i; 4] {
    [
        lane_pair_mask(0, 1),
        lane_pair_mask(2, 3),
        lane_pair_mask(4, 5),
        lane_pair_mask(6, 7),
    ]
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn half_broadcast<const H: i32>(v: __m256i) -> __m256i {
    _mm256_broadcastsi128_si256(_mm256_extracti128_si256::<H>(v))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_impl(nb: usize, x: *const u8, y: *const u8) -> f32 {
    let m4 = _mm256_set1_epi8(0x0F);
    let m3 = _mm256_set1_epi8(3);
    let masks = group16_masks();
    // SAFETY: the caller guarantees nb 210-byte blocks behind x and nb Q8_K blocks behind y.
    unsafe {
        two_acc_loop!(nb, |i: usize, acc: __m256| {
            let (xb, yb) = (x.add(210 * i), y.add(292 * i));
            let d = _mm256_mul_ps(bcast_f32(yb), bcast_f16(xb.add(208)));
            let sc16 = _mm256_cvtepi8_epi16(ld128(xb.add(192)));
            // The quants are stored +32; subtract 32·Σ scale·bsum once instead of per element.
            let off = _mm256_madd_epi16(sc16, ld256(yb.add(Q8K_BS)));
            let mut sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<5>(off));
            let q8 = yb.add(Q8K_QS);
            for n in 0..2 {
                let scv = if n == 0 {
                    half_broadcast::<0>(sc16)
                } else {
                    half_broadcast::<1>(sc16)
                };
                let qh = ld256(xb.add(128 + 32 * n));
                let ql0 = ld256(xb.add(64 * n));
                let ql1 = ld256(xb.add(64 * n + 32));
                let q = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql0, m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m3)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(qh), m3)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(qh), m3)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(qh), m3)),
                    ),
                ];
                for (k, qk) in q.iter().enumerate() {
                    let p = _mm256_maddubs_epi16(*qk, ld256(q8.add(128 * n + 32 * k)));
                    let s = _mm256_shuffle_epi8(scv, masks[k]);
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
                }
            }
            _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc)
        })
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q3k_impl(nb: usize, x: *const u8, y: *const u8) -> f32 {
    const KM1: u32 = 0x0303_0303;
    const KM2: u32 = 0x0f0f_0f0f;
    let m3 = _mm256_set1_epi8(3);
    let one = _mm256_set1_epi8(1);
    let masks = group16_masks();
    // SAFETY: the caller guarantees nb 110-byte blocks behind x and nb Q8_K blocks behind y.
    unsafe {
        two_acc_loop!(nb, |i: usize, acc: __m256| {
            let (xb, yb) = (x.add(110 * i), y.add(292 * i));
            let d = _mm256_mul_ps(bcast_f32(yb), bcast_f16(xb.add(108)));
            let (a0, a1, a2) = (ld_u32(xb.add(96)), ld_u32(xb.add(100)), ld_u32(xb.add(104)));
            let s0 = (a0 & KM2) | ((a2 & KM1) << 4);
            let s1 = (a1 & KM2) | (((a2 >> 2) & KM1) << 4);
            let s2 = ((a0 >> 4) & KM2) | (((a2 >> 4) & KM1) << 4);
            let s3 = ((a1 >> 4) & KM2) | (((a2 >> 6) & KM1) << 4);
            let sc8 = _mm_sub_epi8(
                _mm_set_epi32(s3 as i32, s2 as i32, s1 as i32, s0 as i32),
                _mm_set1_epi8(32),
            );
            let sc16 = _mm256_cvtepi8_epi16(sc8);
            // Quants are (low2 | hbit<<2) - 4: take the unsigned part and subtract 4·Σ sc·bsum.
            let off = _mm256_madd_epi16(sc16, ld256(yb.add(Q8K_BS)));
            let mut sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<2>(off));
            let mut hb = ld256(xb);
            let q8 = yb.add(Q8K_QS);
            for n in 0..2 {
                let scv = if n == 0 {
                    half_broadcast::<0>(sc16)
                } else {
                    half_broadcast::<1>(sc16)
                };
                let mut bits = ld256(xb.add(32 + 32 * n));
                for (k, mask) in masks.iter().enumerate() {
                    let q = _mm256_or_si256(
                        _mm256_and_si256(bits, m3),
                        _mm256_slli_epi16::<2>(_mm256_and_si256(hb, one)),
                    );
                    bits = _mm256_srli_epi16::<2>(bits);
                    hb = _mm256_srli_epi16::<1>(hb);
                    let p = _mm256_maddubs_epi16(q, ld256(q8.add(128 * n + 32 * k)));
                    let s = _mm256_shuffle_epi8(scv, *mask);
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
                }
            }
            _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc)
        })
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q2k_impl(nb: usize, x: *const u8, y: *const u8) -> f32 {
    let m3 = _mm256_set1_epi8(3);
    let m4 = _mm_set1_epi8(0x0F);
    let masks = group16_masks();
    let mut accm = _mm256_setzero_ps();
    // SAFETY: the caller guarantees nb 84-byte blocks behind x and nb Q8_K blocks behind y.
    let s = unsafe {
        two_acc_loop!(nb, |i: usize, acc: __m256| {
            let (xb, yb) = (x.add(84 * i), y.add(292 * i));
            let yd = bcast_f32(yb);
            let dall = _mm256_mul_ps(yd, bcast_f16(xb.add(80)));
            let dmin = _mm256_mul_ps(yd, bcast_f16(xb.add(82)));
            let sc = ld128(xb);
            let mins16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sc), m4));
            let sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(sc, m4));
            let mprod = _mm256_madd_epi16(mins16, ld256(yb.add(Q8K_BS)));
            accm = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(mprod), accm);
            let mut sumi = _mm256_setzero_si256();
            let q8 = yb.add(Q8K_QS);
            for n in 0..2 {
                let scv = if n == 0 {
                    half_broadcast::<0>(sc16)
                } else {
                    half_broadcast::<1>(sc16)
                };
                let mut bits = ld256(xb.add(16 + 32 * n));
                for (k, mask) in masks.iter().enumerate() {
                    let q = _mm256_and_si256(bits, m3);
                    bits = _mm256_srli_epi16::<2>(bits);
                    let p = _mm256_maddubs_epi16(q, ld256(q8.add(128 * n + 32 * k)));
                    let s = _mm256_shuffle_epi8(scv, *mask);
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
                }
            }
            _mm256_fmadd_ps(dall, _mm256_cvtepi32_ps(sumi), acc)
        })
    };
    s - hsum_ps(accm)
}

// ---------------------------------------------------------------------------------------------
// Activation quantizers (byte-identical to the scalar reference)
// ---------------------------------------------------------------------------------------------

fn act_check(ty: GgmlType, src: &[f32], dst: &[u8]) -> usize {
    let need = ty
        .row_bytes(src.len())
        .unwrap_or_else(|| panic!("{ty}: {} activations is not whole blocks", src.len()));
    assert_eq!(
        dst.len(),
        need,
        "{ty}: activation buffer has the wrong length"
    );
    src.len() / ty.block_size()
}

macro_rules! act_entry {
    ($safe:ident, $imp:ident, $ty:expr) => {
        fn $safe(src: &[f32], dst: &mut [u8]) {
            let nb = act_check($ty, src, dst);
            // SAFETY: handed out only by `quantize_act_fn` after `available()`; `act_check`
            // proved `src` holds nb blocks of elements and `dst` exactly nb output blocks.
            unsafe { $imp(nb, src.as_ptr(), dst.as_mut_ptr()) }
        }
    };
}

act_entry!(act_q8_0, q8_0_quant_impl, GgmlType::Q8_0);
act_entry!(act_q8_1, q8_1_quant_impl, GgmlType::Q8_1);
act_entry!(act_q8k, q8k_quant_impl, GgmlType::Q8K);
act_entry!(act_f16, f16_quant_impl, GgmlType::F16);
act_entry!(act_bf16, bf16_quant_impl, GgmlType::BF16);

/// Packs 4×8 i32 (each in i8 range) into 32 i8 in order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pack_i32x32(i: [__m256i; 4]) -> __m256i {
    let p01 = _mm256_packs_epi32(i[0], i[1]);
    let p23 = _mm256_packs_epi32(i[2], i[3]);
    let p = _mm256_packs_epi16(p01, p23);
    // packs interleave 128-bit lanes; put the 4-byte groups back in element order.
    _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// Quantizes 32 floats at `x` Q8_0-style to `q` (32 bytes); returns (d, Σq).
///
/// # Safety
/// `x` must have 32 readable f32 and `q` 32 writable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_block(x: *const f32, q: *mut u8) -> (f32, i32) {
    let sign = _mm256_set1_ps(-0.0);
    // SAFETY: the caller guarantees 32 readable f32 at x and 32 writable bytes at q.
    unsafe {
        let v = [
            _mm256_loadu_ps(x),
            _mm256_loadu_ps(x.add(8)),
            _mm256_loadu_ps(x.add(16)),
            _mm256_loadu_ps(x.add(24)),
        ];
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
            _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
        );
        let (d, id) = scalar::q8_act_scale(hmax_ps(m));
        let idv = _mm256_set1_ps(id);
        // cvtps rounds half to even under the default MXCSR, as llama.cpp's x86 quantizer.
        let iv = [
            _mm256_cvtps_epi32(_mm256_mul_ps(v[0], idv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[1], idv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[2], idv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[3], idv)),
        ];
        _mm256_storeu_si256(q.cast(), pack_i32x32(iv));
        let s = _mm256_add_epi32(
            _mm256_add_epi32(iv[0], iv[1]),
            _mm256_add_epi32(iv[2], iv[3]),
        );
        (d, hsum_epi32(s))
    }
}

#[inline]
unsafe fn st_u16(p: *mut u8, v: u16) {
    // SAFETY: the caller guarantees 2 writable bytes.
    unsafe { p.cast::<u16>().write_unaligned(v.to_le()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_quant_impl(nb: usize, x: *const f32, y: *mut u8) {
    // SAFETY: the caller guarantees nb·32 floats at x and nb 34-byte blocks at y.
    unsafe {
        for i in 0..nb {
            let yb = y.add(34 * i);
            let (d, _) = q8_block(x.add(QK * i), yb.add(2));
            st_u16(yb, scalar::f16_bits(d));
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_1_quant_impl(nb: usize, x: *const f32, y: *mut u8) {
    // SAFETY: the caller guarantees nb·32 floats at x and nb 36-byte blocks at y.
    unsafe {
        for i in 0..nb {
            let yb = y.add(36 * i);
            let (d, s) = q8_block(x.add(QK * i), yb.add(4));
            st_u16(yb, scalar::f16_bits(d));
            st_u16(yb.add(2), scalar::f16_bits(s as f32 * d));
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8k_quant_impl(nb: usize, x: *const f32, y: *mut u8) {
    let sign = _mm256_set1_ps(-0.0);
    // SAFETY: the caller guarantees nb·256 floats at x and nb 292-byte blocks at y; all
    // offsets below stay inside the current block.
    unsafe {
        for i in 0..nb {
            let xb = x.add(QK_K * i);
            let yb = y.add(292 * i);
            let mut m = _mm256_setzero_ps();
            for k in 0..32 {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb.add(8 * k))));
            }
            let amax = hmax_ps(m);
            if amax == 0.0 {
                std::ptr::write_bytes(yb, 0, 292);
                continue;
            }
            // ggml keeps the sign of the first element reaching the max magnitude.
            let target = _mm256_set1_ps(amax);
            let mut max = amax;
            for k in 0..32 {
                let a = _mm256_andnot_ps(sign, _mm256_loadu_ps(xb.add(8 * k)));
                let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(a, target));
                if hit != 0 {
                    max = *xb.add(8 * k + hit.trailing_zeros() as usize);
                    break;
                }
            }
            let iscale = -127.0f32 / max;
            yb.cast::<f32>().write_unaligned(1.0 / iscale);
            let isv = _mm256_set1_ps(iscale);
            let cap = _mm256_set1_epi32(127);
            for g in 0..4 {
                let mut iv = [_mm256_setzero_si256(); 8];
                for (k, v) in iv.iter_mut().enumerate() {
                    let f = _mm256_mul_ps(isv, _mm256_loadu_ps(xb.add(64 * g + 8 * k)));
                    // cvtps rounds half-to-even under the default MXCSR, like nearest_int.
                    *v = _mm256_min_epi32(_mm256_cvtps_epi32(f), cap);
                }
                let q = yb.add(Q8K_QS + 64 * g);
                _mm256_storeu_si256(q.cast(), pack_i32x32([iv[0], iv[1], iv[2], iv[3]]));
                _mm256_storeu_si256(q.add(32).cast(), pack_i32x32([iv[4], iv[5], iv[6], iv[7]]));
                let a = [
                    _mm256_add_epi32(iv[0], iv[1]),
                    _mm256_add_epi32(iv[2], iv[3]),
                    _mm256_add_epi32(iv[4], iv[5]),
                    _mm256_add_epi32(iv[6], iv[7]),
                ];
                let h =
                    _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
                let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
                _mm_storel_epi64(yb.add(Q8K_BS + 8 * g).cast(), _mm_packs_epi32(s, s));
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_quant_impl(n: usize, x: *const f32, y: *mut u8) {
    // SAFETY: the caller guarantees n floats at x and 2n writable bytes at y.
    unsafe {
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(x.add(i)));
            _mm_storeu_si128(y.add(2 * i).cast(), h);
            i += 8;
        }
        while i < n {
            st_u16(y.add(2 * i), scalar::f16_bits(*x.add(i)));
            i += 1;
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16_quant_impl(n: usize, x: *const f32, y: *mut u8) {
    // SAFETY: the caller guarantees n floats at x and 2n writable bytes at y.
    unsafe {
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_loadu_ps(x.add(i));
            let u = _mm256_castps_si256(v);
            // Round to nearest even on the dropped 16 bits; NaNs are truncated and made quiet.
            let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(u), _mm256_set1_epi32(1));
            let r = _mm256_srli_epi32::<16>(_mm256_add_epi32(
                u,
                _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb),
            ));
            let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
            let qn = _mm256_or_si256(_mm256_srli_epi32::<16>(u), _mm256_set1_epi32(0x40));
            let r = _mm256_blendv_epi8(r, qn, nan);
            let h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r));
            _mm_storeu_si128(y.add(2 * i).cast(), h);
            i += 8;
        }
        while i < n {
            st_u16(y.add(2 * i), half::bf16::from_f32(*x.add(i)).to_bits());
            i += 1;
        }
    }
}
