//! AVX2 tiled gemm: weight rows × activation rows at once (prefill).
//!
//! `vec_dot` unpacks a weight block every time it meets an activation row and pays for one
//! `cvt` + `fma` (and the f16 scale conversions) per block and row pair. Here both operands are
//! first unpacked once per call into scratch rows of a canonical layout, and a microkernel then
//! takes one weight row × [`NR`] activation rows: the row's unpacked vectors stay in registers
//! and are reused for every activation row, whose vectors are read straight from the scratch as
//! `maddubs` memory operands, so each activation vector has one use and LLVM keeps all the
//! accumulators in registers (wider tiles spilled and measured slower).
//!
//! The layouts are chosen so that several `maddubs` results can be summed in i16 before the one
//! `madd` that widens them (and, for the K-quants, applies the sub-block scale): a 16-bit lane
//! must only ever see quants of one block (one scale group), so consecutive vectors of a group
//! hold the *same* lane positions of *different* parts of the blocks.
//!
//! * Legacy formats (Q4_0 … Q8_0): four blocks a, b, c, d per group of four vectors, vector k
//!   holding the k-th 8-byte piece of each block (a 4×4 transpose of 64-bit pieces). The four
//!   `maddubs` add up in i16 (8 products of ≤ 31 × ≤ 128 each: ≤ 31744), one `madd` gives i32
//!   lanes (a, a, b, b, c, c, d, d) and one `cvt` + `fma` with the scale products covers 128
//!   quants. Weights are unsigned (Q4_0: nibble 0..=15, Q5_0: 0..=31); the offset of Q4_0/Q5_0 is
//!   folded into the i16 sums as `-offset·Σy` over the same quants, precomputed per activation
//!   group (the true sum fits an i16, so the wrapping add is exact), and the min of Q4_1/Q5_1 is
//!   added after the main loop as Σ_block m_w·s_act over f32 vectors of 8 blocks. Q8_0 keeps
//!   signed quants, moves their signs onto the activations (`sign`) and widens each `maddubs` on
//!   its own (two products of 128·127 already fill an i16 lane).
//! * K-quants: the eight 32-byte quant vectors of a super-block are permuted (by 4- or 8-byte
//!   pieces, [`k_chunks`]) into chunks of `G` vectors whose i16 lanes each see one scale group:
//!   `G` = 4 for Q2_K … Q5_K (≤ 8 products of ≤ 31 × ≤ 128 per lane) and 2 for Q6_K (4 products
//!   of ≤ 63 × ≤ 128). One `madd` with the chunk's i16 scale vector then scales and widens.
//!   Offsets stored in the quants (Q3_K: 4, Q6_K: 32) are subtracted as `madd(offset·scale,
//!   bsums)` in the integer domain; mins (Q2_K, Q4_K, Q5_K) are subtracted after the main loop as
//!   Σ (dmin·m)·(d_act·bsum) in f32.
//!
//! The integer sum of every (sub-)block is the same as `scalar.rs`'s (split into exact integer
//! partial sums); only the order and grouping of the f32 products and additions differ.
//!
//! Blocking: activation rows are unpacked [`COL_TILE`] at a time and weight rows in blocks of
//! about [`ROW_BLOCK_BYTES`] of scratch; every group of [`NR`] activation rows then meets every
//! row of the block while both stay in L1 (with one weight row per microkernel, the activation
//! vectors would otherwise stream from L2 at one use per byte). Rows longer than 2048 quants are
//! processed in chunks of that size, adding partial results into `out`.
//!
//! Soundness: the `#[target_feature]` bodies are reached only through the private safe wrappers
//! made by `entry!`, which `gemm_fn` hands out after `avx2::available()`; the wrappers run
//! `check_gemm`, which proves every weight and activation row the kernels read in bounds. The
//! kernels write only to their own scratch vectors and to `out`, through bounds-checked slices.

use std::arch::x86_64::*;

use crate::quant::avx2::{
    self, bytes_from_bits, k4_scales_mins, ld_f16, ld_f32, ld_u32, ld128, ld256, nibbles,
};
use crate::quant::scalar::{self, check_gemm};
use crate::quant::{GemmFn, GgmlType};

/// The tiled AVX2 gemm for `ty`, if there is one and this CPU can run it.
pub(super) fn gemm_fn(ty: GgmlType) -> Option<GemmFn> {
    if !avx2::available() {
        return None;
    }
    Some(match ty {
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
        _ => return None,
    })
}

/// Where the kernels read their operands (`check_gemm` vouched for all of it) and write results.
struct Args<'a> {
    nb: usize,
    w: *const u8,
    w_stride: usize,
    rows: usize,
    act: *const u8,
    act_stride: usize,
    cols: usize,
    out: &'a mut [f32],
    out_stride: usize,
}

macro_rules! entry {
    ($safe:ident, $imp:path, $ty:expr) => {
        #[allow(clippy::too_many_arguments)]
        fn $safe(
            k: usize,
            w: &[u8],
            w_stride: usize,
            rows: usize,
            act: &[u8],
            act_stride: usize,
            cols: usize,
            out: &mut [f32],
            out_stride: usize,
        ) {
            let nb = check_gemm(
                $ty, k, w, w_stride, rows, act, act_stride, cols, out, out_stride,
            );
            if rows == 0 || cols == 0 {
                return;
            }
            if nb == 0 {
                // k = 0: every dot product is the empty sum.
                for r in 0..rows {
                    out[r * out_stride..][..cols].fill(0.0);
                }
                return;
            }
            let a = Args {
                nb,
                w: w.as_ptr(),
                w_stride,
                rows,
                act: act.as_ptr(),
                act_stride,
                cols,
                out,
                out_stride,
            };
            // SAFETY: this private fn is handed out only by `gemm_fn` after `available()`
            // confirmed AVX2/FMA/F16C, and `check_gemm` proved that rows r < rows of `w` (at
            // r·w_stride) and c < cols of `act` (at c·act_stride) hold nb whole blocks of the
            // weight and activation types, which is all `$imp` reads from them.
            unsafe { $imp(a) }
        }
    };
}

entry!(gemm_q4_0, legacy_gemm::<F_Q4_0>, GgmlType::Q4_0);
entry!(gemm_q4_1, legacy_gemm::<F_Q4_1>, GgmlType::Q4_1);
entry!(gemm_q5_0, legacy_gemm::<F_Q5_0>, GgmlType::Q5_0);
entry!(gemm_q5_1, legacy_gemm::<F_Q5_1>, GgmlType::Q5_1);
entry!(gemm_q8_0, legacy_gemm::<F_Q8_0>, GgmlType::Q8_0);
entry!(gemm_q2k, k_gemm::<F_Q2K>, GgmlType::Q2K);
entry!(gemm_q3k, k_gemm::<F_Q3K>, GgmlType::Q3K);
entry!(gemm_q4k, k_gemm::<F_Q4K>, GgmlType::Q4K);
entry!(gemm_q5k, k_gemm::<F_Q5K>, GgmlType::Q5K);
entry!(gemm_q6k, k_gemm::<F_Q6K>, GgmlType::Q6K);

/// Activation rows unpacked per pass over the weight rows (the CPU backend passes up to 64); their
/// scratch stays in L2 while every weight row meets them.
const COL_TILE: usize = 64;

/// Blocks of a row unpacked at a time: long rows are split into chunks of 2048 quants whose
/// partial dot products are added up in `out`, so that a chunk of a group of activation rows and
/// of a block of weight rows fit in L1 together whatever the row length.
const LEGACY_KC: usize = 64;
const K_KC: usize = 8;

/// A chunk of blocks `b0..b0 + nb` of every row.
#[derive(Clone, Copy)]
struct Span {
    b0: usize,
    nb: usize,
}

/// The chunks of `nb` blocks, `kc` at a time.
fn spans(nb: usize, kc: usize) -> impl Iterator<Item = Span> {
    (0..nb).step_by(kc).map(move |b0| Span {
        b0,
        nb: (nb - b0).min(kc),
    })
}

/// Bytes of unpacked weight rows to keep in L1 at once: a block of weight rows is unpacked, then
/// each group of [`NR`] activation rows (≤ 10 KiB per k-chunk, pulled from L2 once) meets every
/// row of the block while both stay in L1 (32 KiB on Zen 3).
const ROW_BLOCK_BYTES: usize = 16 << 10;

/// Weight rows per block for unpacked rows of `row_bytes` bytes.
fn row_block(row_bytes: usize) -> usize {
    (ROW_BLOCK_BYTES / row_bytes.max(1)).clamp(2, 64)
}

/// Activation rows per microkernel call (each call handles one weight row: its unpacked vectors
/// stay in registers while the activation vectors are read as memory operands, which keeps every
/// accumulator in a register; more weight rows per call measured slower).
const NR: usize = 4;

/// Calls `$f::<n, ...>($args)` for runtime `n` in 1..=NR.
macro_rules! dispatch_n {
    ($n:expr, $f:ident::<$($g:tt),*>($($arg:expr),*)) => {
        match $n {
            4 => $f::<4, $($g),*>($($arg),*),
            3 => $f::<3, $($g),*>($($arg),*),
            2 => $f::<2, $($g),*>($($arg),*),
            1 => $f::<1, $($g),*>($($arg),*),
            _ => unreachable!("microkernel width {}", $n),
        }
    };
}

/// Unpacked rows (weights or activations) of one call: per row, `qs` quant vectors, `ds` f32
/// scales and `vs` f32 correction terms.
struct Rows {
    qs: usize,
    ds: usize,
    vs: usize,
    q: Vec<__m256i>,
    d: Vec<f32>,
    v: Vec<f32>,
}

impl Rows {
    /// Bytes of one unpacked row.
    const fn row_bytes(qs: usize, ds: usize, vs: usize) -> usize {
        32 * qs + 4 * (ds + vs)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn new(rows: usize, qs: usize, ds: usize, vs: usize) -> Self {
        Rows {
            qs,
            ds,
            vs,
            q: vec![_mm256_setzero_si256(); rows * qs],
            d: vec![0f32; rows * ds],
            v: vec![0f32; rows * vs],
        }
    }

    /// The quant vectors, scales and correction terms of row `r`.
    fn row_mut(&mut self, r: usize) -> (&mut [__m256i], &mut [f32], &mut [f32]) {
        (
            &mut self.q[r * self.qs..(r + 1) * self.qs],
            &mut self.d[r * self.ds..(r + 1) * self.ds],
            &mut self.v[r * self.vs..(r + 1) * self.vs],
        )
    }

    /// Pointers to the quant vectors, scales and correction terms of row `r` (< the row count).
    fn row_ptrs(&self, r: usize) -> (*const __m256i, *const f32, *const f32) {
        (
            self.q[r * self.qs..].as_ptr(),
            self.d[r * self.ds..].as_ptr(),
            self.v[r * self.vs..].as_ptr(),
        )
    }
}

/// Writes (or, with `add`, adds) the horizontal sums of the `N` accumulators to `out[..N]`.
///
/// Every accumulator is reduced in the same order whatever `N` and its position (missing
/// neighbours are zero vectors, which no output lane mixes in), so a result does not depend on
/// how the activation rows were grouped into calls: gemm over one activation row gives bit for
/// bit the column of gemm over many.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn store_sums<const N: usize>(acc: &[__m256; N], out: &mut [f32], add: bool) {
    let mut sums = [0f32; N];
    for c0 in (0..N).step_by(4) {
        let v: [__m256; 4] = std::array::from_fn(|i| {
            if c0 + i < N {
                acc[c0 + i]
            } else {
                _mm256_setzero_ps()
            }
        });
        // Four sums at once: two rounds of hadd, then fold the 128-bit halves.
        let h01 = _mm256_hadd_ps(v[0], v[1]);
        let h23 = _mm256_hadd_ps(v[2], v[3]);
        let h = _mm256_hadd_ps(h01, h23);
        let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
        let mut t = [0f32; 4];
        // SAFETY: `t` is 16 writable bytes; storeu has no alignment requirement.
        unsafe { _mm_storeu_ps(t.as_mut_ptr(), s) };
        let n = (N - c0).min(4);
        sums[c0..c0 + n].copy_from_slice(&t[..n]);
    }
    let out = &mut out[..N];
    if add {
        for (v, s) in out.iter_mut().zip(sums) {
            *v += s;
        }
    } else {
        out.copy_from_slice(&sums);
    }
}

/// 4×4 transpose of 64-bit pieces: vector k of the result holds piece k of a, b, c, d.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn transpose_q64(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> [__m256i; 4] {
    let ab0 = _mm256_unpacklo_epi64(a, b); // a0 b0 | a2 b2
    let ab1 = _mm256_unpackhi_epi64(a, b); // a1 b1 | a3 b3
    let cd0 = _mm256_unpacklo_epi64(c, d);
    let cd1 = _mm256_unpackhi_epi64(c, d);
    [
        _mm256_permute2x128_si256::<0x20>(ab0, cd0),
        _mm256_permute2x128_si256::<0x20>(ab1, cd1),
        _mm256_permute2x128_si256::<0x31>(ab0, cd0),
        _mm256_permute2x128_si256::<0x31>(ab1, cd1),
    ]
}

// ---------------------------------------------------------------------------------------------
// Legacy formats
// ---------------------------------------------------------------------------------------------

const F_Q4_0: u8 = 0;
const F_Q4_1: u8 = 1;
const F_Q5_0: u8 = 2;
const F_Q5_1: u8 = 3;
const F_Q8_0: u8 = 4;

/// Weight block bytes of legacy format `F`.
const fn xs(f: u8) -> usize {
    match f {
        F_Q4_0 => 18,
        F_Q4_1 => 20,
        F_Q5_0 => 22,
        F_Q5_1 => 24,
        _ => 34,
    }
}

const fn has_min(f: u8) -> bool {
    matches!(f, F_Q4_1 | F_Q5_1)
}

/// Activation block bytes (Q8_1 for the formats with a min, else Q8_0).
const fn ys(f: u8) -> usize {
    if has_min(f) { 36 } else { 34 }
}

/// The offset subtracted from the unsigned quants (Q4_0: 8, Q5_0: 16; the others have none).
const fn offset(f: u8) -> i8 {
    match f {
        F_Q4_0 => 8,
        F_Q5_0 => 16,
        _ => 0,
    }
}

/// Activation vectors per group of four blocks: the quants, plus (offset formats) the i16
/// correction `-offset·(y_2l + y_2l+1)` summed like the products.
const fn av(f: u8) -> usize {
    if offset(f) != 0 { 5 } else { 4 }
}

/// Weight quant vectors per group of four blocks: the quants, plus (Q8_0) their magnitudes.
const fn qv(f: u8) -> usize {
    if f == F_Q8_0 { 8 } else { 4 }
}

/// The 32 quants of the weight block at `xb` in element order: unsigned with the format's
/// offset for the 4/5-bit formats, signed for Q8_0.
///
/// # Safety
/// `xb` must point to a whole block of format `F`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_legacy<const F: u8>(xb: *const u8) -> __m256i {
    let high = |qh: u32| _mm256_and_si256(bytes_from_bits(qh), _mm256_set1_epi8(0x10));
    // SAFETY: every read is inside the block the caller vouches for.
    unsafe {
        match F {
            F_Q4_0 => nibbles(ld128(xb.add(2))),
            F_Q4_1 => nibbles(ld128(xb.add(4))),
            F_Q5_0 => _mm256_or_si256(nibbles(ld128(xb.add(6))), high(ld_u32(xb.add(2)))),
            F_Q5_1 => _mm256_or_si256(nibbles(ld128(xb.add(8))), high(ld_u32(xb.add(4)))),
            _ => ld256(xb.add(2)),
        }
    }
}

/// The min terms of `ng` groups, padded to whole vectors of 8.
const fn min_len(ng: usize) -> usize {
    (4 * ng).next_multiple_of(8)
}

/// Legacy scratch row strides for `nb` blocks of format `f`: (quant vectors, scales, min
/// terms) for weights (`qv` vectors per group) or activations (`av`).
const fn legacy_strides(f: u8, nb: usize, weights: bool) -> (usize, usize, usize) {
    let ng = nb.div_ceil(4);
    let per = if weights { qv(f) } else { av(f) };
    let mins = if has_min(f) { min_len(ng) } else { 0 };
    (ng * per, 8 * ng, mins)
}

/// The f16 scales at `p[k]` (k < 4; null = 0) as f32, each twice: (p0, p0, p1, p1, …).
///
/// # Safety
/// Each non-null pointer must have 2 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_pairs(p: [*const u8; 4]) -> __m256 {
    // SAFETY: only non-null pointers are read, as the caller vouches.
    let h = p.map(|q| {
        if q.is_null() {
            0
        } else {
            (unsafe { avx2::rd_u16(q) }) as i16
        }
    });
    _mm256_cvtph_ps(_mm_setr_epi16(
        h[0], h[0], h[1], h[1], h[2], h[2], h[3], h[3],
    ))
}

/// Unpacks weight rows `r0..r0 + m` of `a` into rows 0..m of `s`.
///
/// # Safety
/// Weight rows r0..r0 + m must be readable (as `Args` promises for rows < a.rows).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_weights<const F: u8>(a: &Args, r0: usize, m: usize, k: Span, s: &mut Rows) {
    let nb = k.nb;
    let ng = nb.div_ceil(4);
    // SAFETY: only blocks k.b0 + i, i < k.nb, of rows r0..r0 + m are read.
    unsafe {
        for r in 0..m {
            let x = a.w.add((r0 + r) * a.w_stride + k.b0 * xs(F));
            let (q, d, v) = s.row_mut(r);
            let groups = q.chunks_exact_mut(qv(F)).zip(d.chunks_exact_mut(8));
            for (g, (qg, dg)) in groups.take(ng).enumerate() {
                // Blocks past the chunk's end are zero (quants, scales and mins).
                let xb: [*const u8; 4] = std::array::from_fn(|j| {
                    let i = 4 * g + j;
                    if i < nb {
                        x.add(i * xs(F))
                    } else {
                        std::ptr::null()
                    }
                });
                let u = xb.map(|p| {
                    if p.is_null() {
                        _mm256_setzero_si256()
                    } else {
                        unpack_legacy::<F>(p)
                    }
                });
                _mm256_storeu_ps(dg.as_mut_ptr(), f16_pairs(xb));
                if has_min(F) {
                    let mn = f16_pairs(xb.map(|p| if p.is_null() { p } else { p.add(2) }));
                    // Lanes 2j hold block j's min.
                    let mut t = [0f32; 8];
                    _mm256_storeu_ps(t.as_mut_ptr(), mn);
                    for j in 0..4 {
                        v[4 * g + j] = t[2 * j];
                    }
                }
                let t = transpose_q64(u[0], u[1], u[2], u[3]);
                if F == F_Q8_0 {
                    for (j, tj) in t.iter().enumerate() {
                        qg[j] = _mm256_sign_epi8(*tj, *tj);
                        qg[4 + j] = *tj;
                    }
                } else {
                    qg.copy_from_slice(&t);
                }
            }
            // The min terms are read 8 at a time: clear what an earlier chunk left.
            let pad = (4 * ng).min(v.len())..min_len(ng).min(v.len());
            v[pad].fill(0.0);
        }
    }
}

/// Repacks activation rows `c0..c0 + n` of `a` into rows 0..n of `s`.
///
/// # Safety
/// Activation rows c0..c0 + n must be readable (as `Args` promises for rows < a.cols).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn repack_acts<const F: u8>(a: &Args, c0: usize, n: usize, k: Span, s: &mut Rows) {
    let nb = k.nb;
    let ng = nb.div_ceil(4);
    let off = _mm256_set1_epi8(offset(F));
    // SAFETY: only blocks k.b0 + i, i < k.nb, of activation rows c0..c0 + n are read.
    unsafe {
        for c in 0..n {
            let y = a.act.add((c0 + c) * a.act_stride + k.b0 * ys(F));
            let (q, d, v) = s.row_mut(c);
            let groups = q.chunks_exact_mut(av(F)).zip(d.chunks_exact_mut(8));
            for (g, (qg, dg)) in groups.take(ng).enumerate() {
                let yb: [*const u8; 4] = std::array::from_fn(|j| {
                    let i = 4 * g + j;
                    if i < nb {
                        y.add(i * ys(F))
                    } else {
                        std::ptr::null()
                    }
                });
                let u = yb.map(|p| {
                    if p.is_null() {
                        _mm256_setzero_si256()
                    } else {
                        ld256(p.add(ys(F) - 32))
                    }
                });
                _mm256_storeu_ps(dg.as_mut_ptr(), f16_pairs(yb));
                if has_min(F) {
                    let sm = f16_pairs(yb.map(|p| if p.is_null() { p } else { p.add(2) }));
                    let mut t = [0f32; 8];
                    _mm256_storeu_ps(t.as_mut_ptr(), sm);
                    for j in 0..4 {
                        v[4 * g + j] = t[2 * j];
                    }
                }
                let t = transpose_q64(u[0], u[1], u[2], u[3]);
                qg[..4].copy_from_slice(&t);
                if offset(F) != 0 {
                    // -offset·Σy over exactly the quants each i16 lane of the main loop's
                    // summed `maddubs` sees (|·| ≤ 16·8·128, so no i16 overflow).
                    let s01 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(off, t[0]),
                        _mm256_maddubs_epi16(off, t[1]),
                    );
                    let s23 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(off, t[2]),
                        _mm256_maddubs_epi16(off, t[3]),
                    );
                    qg[4] = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_add_epi16(s01, s23));
                }
            }
            let pad = (4 * ng).min(v.len())..min_len(ng).min(v.len());
            v[pad].fill(0.0);
        }
    }
}

/// The legacy microkernel: weight scratch row `wr` × activation scratch rows `yc..yc + N`
/// over `ng` groups of four blocks; writes (or, with `add`, adds) the N dot products to
/// `out[..N]`.
///
/// # Safety
/// The scratch rows must exist with the strides of `legacy_strides` for `ng` groups.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn legacy_mk<const N: usize, const F: u8>(
    ng: usize,
    w: &Rows,
    wr: usize,
    y: &Rows,
    yc: usize,
    out: &mut [f32],
    add: bool,
) {
    debug_assert!(ng * qv(F) <= w.qs && 8 * ng <= w.ds && (wr + 1) * w.qs <= w.q.len());
    debug_assert!(ng * av(F) <= y.qs && 8 * ng <= y.ds && (yc + N) * y.qs <= y.q.len());
    debug_assert!(!has_min(F) || (min_len(ng) <= w.vs && min_len(ng) <= y.vs));
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); N];
    let wp = w.row_ptrs(wr);
    let yp: [_; N] = std::array::from_fn(|c| y.row_ptrs(yc + c));
    // SAFETY: group g < ng of every row is inside the scratch (caller); the vectors are
    // 32-byte aligned (Vec<__m256i>) and the f32 reads unaligned loads.
    unsafe {
        for g in 0..ng {
            let wq = wp.0.add(qv(F) * g);
            let dw = _mm256_loadu_ps(wp.1.add(8 * g));
            let w4 = [*wq, *wq.add(1), *wq.add(2), *wq.add(3)];
            for (c, a) in acc.iter_mut().enumerate() {
                let yq = yp[c].0.add(av(F) * g);
                let i = if F == F_Q8_0 {
                    // |w|·(±y) per vector: two products of ≤ 128·127 per i16 lane, so each
                    // `maddubs` is widened on its own.
                    let mut i = _mm256_setzero_si256();
                    for (k, wk) in w4.iter().enumerate() {
                        let sy = _mm256_sign_epi8(*yq.add(k), *wq.add(4 + k));
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(*wk, sy), ones);
                        i = _mm256_add_epi32(i, p);
                    }
                    i
                } else {
                    // Unsigned quants ≤ 31: the four `maddubs` sum to ≤ 8·31·128 per lane.
                    let t01 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(w4[0], *yq),
                        _mm256_maddubs_epi16(w4[1], *yq.add(1)),
                    );
                    let t23 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(w4[2], *yq.add(2)),
                        _mm256_maddubs_epi16(w4[3], *yq.add(3)),
                    );
                    let mut t = _mm256_add_epi16(t01, t23);
                    if offset(F) != 0 {
                        // (q - offset)·y summed per lane: the true value fits an i16, so the
                        // wrapping adds give it exactly.
                        t = _mm256_add_epi16(t, *yq.add(4));
                    }
                    _mm256_madd_epi16(t, ones)
                };
                let s = _mm256_mul_ps(dw, _mm256_loadu_ps(yp[c].1.add(8 * g)));
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), s, *a);
            }
        }
        if has_min(F) {
            for o in (0..min_len(ng)).step_by(8) {
                let u = _mm256_loadu_ps(wp.2.add(o));
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(u, _mm256_loadu_ps(yp[c].2.add(o)), *a);
                }
            }
        }
    }
    store_sums::<N>(&acc, out, add);
}

/// # Safety
/// As the entry wrappers: `a` describes readable rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn legacy_gemm<const F: u8>(a: Args) {
    let kc = a.nb.min(LEGACY_KC);
    let ct = a.cols.min(COL_TILE);
    let (qs, ds, vs) = legacy_strides(F, kc, false);
    let mut ys = Rows::new(ct, qs, ds, vs);
    let (qs, ds, vs) = legacy_strides(F, kc, true);
    let rb = row_block(Rows::row_bytes(qs, ds, vs));
    let mut ws = Rows::new(rb.min(a.rows), qs, ds, vs);
    // SAFETY: rows, columns and blocks passed on are < a.rows / a.cols / a.nb; the scratch
    // rows exist and hold kc blocks.
    unsafe {
        for c0 in (0..a.cols).step_by(COL_TILE) {
            let nc = (a.cols - c0).min(COL_TILE);
            for k in spans(a.nb, kc) {
                let ng = k.nb.div_ceil(4);
                repack_acts::<F>(&a, c0, nc, k, &mut ys);
                for r0 in (0..a.rows).step_by(rb) {
                    let nr = (a.rows - r0).min(rb);
                    unpack_weights::<F>(&a, r0, nr, k, &mut ws);
                    for c in (0..nc).step_by(NR) {
                        let n = (nc - c).min(NR);
                        for r in 0..nr {
                            let out = &mut a.out[(r0 + r) * a.out_stride + c0 + c..];
                            let add = k.b0 > 0;
                            dispatch_n!(n, legacy_mk::<F>(ng, &ws, r, &ys, c, out, add));
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// K-quants (activations Q8_K: d f32 @0, qs @4, bsums i16 @260)
// ---------------------------------------------------------------------------------------------

const Q8K_SIZE: usize = 292;
const Q8K_QS: usize = 4;
const Q8K_BS: usize = 260;

const F_Q2K: u8 = 0;
const F_Q3K: u8 = 1;
const F_Q4K: u8 = 2;
const F_Q5K: u8 = 3;
const F_Q6K: u8 = 4;

/// Weight block bytes of K format `F`.
const fn kxs(f: u8) -> usize {
    match f {
        F_Q2K => 84,
        F_Q3K => 110,
        F_Q4K => 144,
        F_Q5K => 176,
        _ => 210,
    }
}

/// Quant vectors per chunk (summed in i16 before their scale `madd`).
const fn k_g(f: u8) -> usize {
    if f == F_Q6K { 2 } else { 4 }
}

/// Chunks (and so scale vectors) per super-block.
const fn k_nch(f: u8) -> usize {
    8 / k_g(f)
}

/// Whether `F` stores an offset in its quants (subtracted through `cw`).
const fn k_cw(f: u8) -> bool {
    matches!(f, F_Q3K | F_Q6K)
}

/// Mins per super-block (scaled by dmin and subtracted after the main loop).
const fn k_mins(f: u8) -> usize {
    match f {
        F_Q2K => 16,
        F_Q4K | F_Q5K => 8,
        _ => 0,
    }
}

/// Weight vectors per super-block: 8 quant vectors, the chunk scales, `cw`.
const fn kw(f: u8) -> usize {
    8 + k_nch(f) + 1
}

/// Activation vectors per super-block: 8 quant vectors and the bsums.
const KA: usize = 9;

/// Permutes the 8 natural-order quant vectors of a super-block into chunks of `k_g` vectors in
/// which every 16-bit lane position holds quants of one scale group only (see
/// [`k_lane_group`]), so that the chunk's `maddubs` results can be summed before the scale.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn k_chunks<const F: u8>(q: [__m256i; 8]) -> [__m256i; 8] {
    let mut o = q;
    match F {
        F_Q4K | F_Q5K => {
            // Groups of 32 = whole vectors: a 4×4 transpose of 8-byte pieces puts piece p of
            // group 4ch + p at qword p of every vector of the chunk.
            for ch in 0..2 {
                let t = transpose_q64(q[4 * ch], q[4 * ch + 1], q[4 * ch + 2], q[4 * ch + 3]);
                o[4 * ch..4 * ch + 4].copy_from_slice(&t);
            }
        }
        F_Q6K => {
            // Groups of 16 = 128-bit halves; chunks of two vectors X, Y (64 quants): qwords
            // (X0, Y0 | X2, Y2) and (X1, Y1 | X3, Y3) hold groups 0, 2 | 1, 3 of the chunk.
            for ch in 0..4 {
                let (x, y) = (q[2 * ch], q[2 * ch + 1]);
                o[2 * ch] = _mm256_unpacklo_epi64(x, y);
                o[2 * ch + 1] = _mm256_unpackhi_epi64(x, y);
            }
        }
        _ => {
            // Groups of 16, chunks of four vectors: a 4×4 transpose of 4-byte pieces within
            // each 128-bit half puts group 2s (low half of X_s) at dword s < 4 and group
            // 2s + 1 (high half) at dword s + 4.
            for ch in 0..2 {
                let x = &q[4 * ch..4 * ch + 4];
                let t0 = _mm256_unpacklo_epi32(x[0], x[1]);
                let t1 = _mm256_unpackhi_epi32(x[0], x[1]);
                let t2 = _mm256_unpacklo_epi32(x[2], x[3]);
                let t3 = _mm256_unpackhi_epi32(x[2], x[3]);
                o[4 * ch] = _mm256_unpacklo_epi64(t0, t2);
                o[4 * ch + 1] = _mm256_unpackhi_epi64(t0, t2);
                o[4 * ch + 2] = _mm256_unpacklo_epi64(t1, t3);
                o[4 * ch + 3] = _mm256_unpackhi_epi64(t1, t3);
            }
        }
    }
    o
}

/// The scale group (within the super-block) whose quants i16 lane `l` of chunk `ch` of
/// [`k_chunks`] sees.
const fn k_lane_group(f: u8, ch: usize, l: usize) -> usize {
    match f {
        F_Q4K | F_Q5K => 4 * ch + l / 4,
        F_Q6K => 4 * ch + [0, 2, 1, 3][l / 4],
        _ => {
            let s = l / 2;
            8 * ch + if s < 4 { 2 * s } else { 2 * (s - 4) + 1 }
        }
    }
}

/// The 128-bit half of the natural-order i16 scales (`sc16`: 16 lanes, scale g in lane g) that
/// holds the scales of chunk `ch`.
const fn k_scale_half(f: u8, ch: usize) -> usize {
    match f {
        F_Q4K | F_Q5K => 0,
        F_Q6K => ch / 2,
        _ => ch,
    }
}

/// `pshufb` masks turning the broadcast half [`k_scale_half`] of the natural-order scales into
/// the scale vector of each chunk.
#[target_feature(enable = "avx2,fma,f16c")]
fn k_scale_masks<const F: u8>() -> [__m256i; 4] {
    std::array::from_fn(|ch| {
        if ch >= k_nch(F) {
            return _mm256_setzero_si256();
        }
        let m: [u8; 32] = std::array::from_fn(|b| {
            let g = k_lane_group(F, ch, b / 2) - 8 * k_scale_half(F, ch);
            (2 * g + b % 2) as u8
        });
        // SAFETY: `m` is 32 readable bytes.
        unsafe { _mm256_loadu_si256(m.as_ptr().cast()) }
    })
}

/// Chunk `ch`'s scale vector from the natural-order i16 scales.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn k_chunk_scales<const F: u8>(sc16: __m256i, ch: usize, masks: &[__m256i; 4]) -> __m256i {
    let half = if k_scale_half(F, ch) == 0 {
        _mm256_permute2x128_si256::<0x00>(sc16, sc16)
    } else {
        _mm256_permute2x128_si256::<0x11>(sc16, sc16)
    };
    _mm256_shuffle_epi8(half, masks[ch])
}

/// A K super-block in natural order: quants, i16 scales (`sc16`, lane g = scale of group g;
/// Q4_K/Q5_K: lanes 0..8 scales, 8..16 mins), the quant offset times the scales (`cw`, for the
/// formats storing an offset), the mins times dmin as f32 (`mins`, 16 for Q2_K, 8 for
/// Q4_K/Q5_K), and d.
struct KBlock {
    q: [__m256i; 8],
    sc16: __m256i,
    cw: __m256i,
    mins: [__m256; 2],
    d: f32,
}

/// i16 lanes → f32 times `s`: (lanes 0..8, lanes 8..16).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn i16_to_f32_scaled(v: __m256i, s: f32) -> [__m256; 2] {
    let sv = _mm256_set1_ps(s);
    let lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)));
    let hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(v)));
    [_mm256_mul_ps(lo, sv), _mm256_mul_ps(hi, sv)]
}

/// Unpacks the super-block at `xb`.
///
/// # Safety
/// `xb` must point to a whole block of format `F`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_k<const F: u8>(xb: *const u8) -> KBlock {
    let m4 = _mm256_set1_epi8(0x0F);
    let m3 = _mm256_set1_epi8(3);
    let one = _mm256_set1_epi8(1);
    let zero = _mm256_setzero_si256();
    let mut q = [zero; 8];
    // SAFETY: every read is inside the block the caller vouches for.
    unsafe {
        match F {
            F_Q2K => {
                for n in 0..2 {
                    let mut bits = ld256(xb.add(16 + 32 * n));
                    for k in 0..4 {
                        q[4 * n + k] = _mm256_and_si256(bits, m3);
                        bits = _mm256_srli_epi16::<2>(bits);
                    }
                }
                let sm = ld128(xb);
                let m4x = _mm_set1_epi8(0x0F);
                let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sm), m4x));
                KBlock {
                    q,
                    sc16: _mm256_cvtepu8_epi16(_mm_and_si128(sm, m4x)),
                    cw: zero,
                    mins: i16_to_f32_scaled(mins, ld_f16(xb.add(82))),
                    d: ld_f16(xb.add(80)),
                }
            }
            F_Q3K => {
                let mut hb = ld256(xb);
                for n in 0..2 {
                    let mut bits = ld256(xb.add(32 + 32 * n));
                    for k in 0..4 {
                        q[4 * n + k] = _mm256_or_si256(
                            _mm256_and_si256(bits, m3),
                            _mm256_slli_epi16::<2>(_mm256_and_si256(hb, one)),
                        );
                        bits = _mm256_srli_epi16::<2>(bits);
                        hb = _mm256_srli_epi16::<1>(hb);
                    }
                }
                let sc = scalar::q3k_scales(std::slice::from_raw_parts(xb.add(96), 12));
                let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc.as_ptr().cast()));
                // Quants are stored +4.
                KBlock {
                    q,
                    sc16,
                    cw: _mm256_slli_epi16::<2>(sc16),
                    mins: [_mm256_setzero_ps(); 2],
                    d: ld_f16(xb.add(108)),
                }
            }
            F_Q4K | F_Q5K => {
                let q5 = F == F_Q5K;
                let qs = if q5 { 48 } else { 16 };
                let mut hb = if q5 { ld256(xb.add(16)) } else { zero };
                for j in 0..4 {
                    let q4 = ld256(xb.add(qs + 32 * j));
                    let mut lo = _mm256_and_si256(q4, m4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), m4);
                    if q5 {
                        let b0 = _mm256_and_si256(hb, one);
                        let b1 = _mm256_and_si256(_mm256_srli_epi16::<1>(hb), one);
                        lo = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(b0));
                        hi = _mm256_or_si256(hi, _mm256_slli_epi16::<4>(b1));
                        hb = _mm256_srli_epi16::<2>(hb);
                    }
                    q[2 * j] = lo;
                    q[2 * j + 1] = hi;
                }
                let ms = k4_scales_mins(xb.add(4));
                let mins = _mm256_permute2x128_si256::<0x11>(ms, ms);
                KBlock {
                    q,
                    sc16: ms,
                    cw: zero,
                    mins: i16_to_f32_scaled(mins, ld_f16(xb.add(2))),
                    d: ld_f16(xb),
                }
            }
            _ => {
                for n in 0..2 {
                    let qh = ld256(xb.add(128 + 32 * n));
                    let ql0 = ld256(xb.add(64 * n));
                    let ql1 = ld256(xb.add(64 * n + 32));
                    let hi2 = |s: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(s, m3));
                    q[4 * n] = _mm256_or_si256(_mm256_and_si256(ql0, m4), hi2(qh));
                    q[4 * n + 1] =
                        _mm256_or_si256(_mm256_and_si256(ql1, m4), hi2(_mm256_srli_epi16::<2>(qh)));
                    q[4 * n + 2] = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                        hi2(_mm256_srli_epi16::<4>(qh)),
                    );
                    q[4 * n + 3] = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                        hi2(_mm256_srli_epi16::<6>(qh)),
                    );
                }
                let sc16 = _mm256_cvtepi8_epi16(ld128(xb.add(192)));
                // Quants are stored +32.
                KBlock {
                    q,
                    sc16,
                    cw: _mm256_slli_epi16::<5>(sc16),
                    mins: [_mm256_setzero_ps(); 2],
                    d: ld_f16(xb.add(208)),
                }
            }
        }
    }
}

/// K scratch row strides for `nsb` super-blocks: (vectors, scales, mins) for weights
/// (`weights`) or activations.
const fn k_strides(f: u8, nsb: usize, weights: bool) -> (usize, usize, usize) {
    let per = if weights { kw(f) } else { KA };
    // The scales are read 8 at a time (zero-padded).
    (nsb * per, nsb.next_multiple_of(8), nsb * k_mins(f))
}

/// Unpacks weight rows `r0..r0 + m` of `a` into rows 0..m of `s`: per super-block the quants
/// in chunks, the chunk scale vectors and `cw`; d; and dmin·min per min.
///
/// # Safety
/// Weight rows r0..r0 + m must be readable (as `Args` promises for rows < a.rows).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_k_rows<const F: u8>(a: &Args, r0: usize, m: usize, k: Span, s: &mut Rows) {
    let masks = k_scale_masks::<F>();
    let nm = k_mins(F);
    // SAFETY: only blocks k.b0 + i, i < k.nb, of rows r0..r0 + m are read; the f32 stores
    // are into `v` slices of exactly nm (8 or 16) floats.
    unsafe {
        for r in 0..m {
            let x = a.w.add((r0 + r) * a.w_stride + k.b0 * kxs(F));
            let (q, d, v) = s.row_mut(r);
            for (i, o) in q.chunks_exact_mut(kw(F)).take(k.nb).enumerate() {
                let b = unpack_k::<F>(x.add(i * kxs(F)));
                o[..8].copy_from_slice(&k_chunks::<F>(b.q));
                for ch in 0..k_nch(F) {
                    o[8 + ch] = k_chunk_scales::<F>(b.sc16, ch, &masks);
                }
                o[8 + k_nch(F)] = b.cw;
                d[i] = b.d;
                for (h, mv) in v[nm * i..nm * (i + 1)].chunks_exact_mut(8).enumerate() {
                    _mm256_storeu_ps(mv.as_mut_ptr(), b.mins[h]);
                }
            }
        }
    }
}

/// Repacks Q8_K activation rows `c0..c0 + n` of `a` into rows 0..n of `s`: per super-block the
/// quants in chunks like the weights' and the bsums; d; and d·bsum per weight min.
///
/// # Safety
/// Activation rows c0..c0 + n must be readable (as `Args` promises for rows < a.cols).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn repack_k_acts<const F: u8>(a: &Args, c0: usize, n: usize, k: Span, s: &mut Rows) {
    let nm = k_mins(F);
    // SAFETY: only blocks k.b0 + i, i < k.nb, of activation rows c0..c0 + n are read; the
    // f32 stores are into `v` slices of exactly nm (8 or 16) floats.
    unsafe {
        for c in 0..n {
            let y = a.act.add((c0 + c) * a.act_stride + k.b0 * Q8K_SIZE);
            let (q, d, v) = s.row_mut(c);
            for (i, o) in q.chunks_exact_mut(KA).take(k.nb).enumerate() {
                let yb = y.add(i * Q8K_SIZE);
                let nat: [__m256i; 8] = std::array::from_fn(|k| ld256(yb.add(Q8K_QS + 32 * k)));
                o[..8].copy_from_slice(&k_chunks::<F>(nat));
                let bs = ld256(yb.add(Q8K_BS));
                o[8] = bs;
                let yd = ld_f32(yb);
                d[i] = yd;
                let vm = &mut v[nm * i..nm * (i + 1)];
                if nm == 16 {
                    let [lo, hi] = i16_to_f32_scaled(bs, yd);
                    _mm256_storeu_ps(vm.as_mut_ptr(), lo);
                    _mm256_storeu_ps(vm[8..].as_mut_ptr(), hi);
                } else if nm == 8 {
                    // Q4_K/Q5_K mins cover 32 quants, two bsums.
                    let pairs = _mm256_madd_epi16(bs, _mm256_set1_epi16(1));
                    let f = _mm256_mul_ps(_mm256_cvtepi32_ps(pairs), _mm256_set1_ps(yd));
                    _mm256_storeu_ps(vm.as_mut_ptr(), f);
                }
            }
        }
    }
}

/// The K microkernel: weight scratch row `wr` × activation scratch rows `yc..yc + N` over
/// `nsb` super-blocks; writes (or, with `add`, adds) the N dot products to `out[..N]`.
///
/// # Safety
/// The scratch rows must exist with the strides of `k_strides` for `nsb` super-blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn k_mk<const N: usize, const F: u8>(
    nsb: usize,
    w: &Rows,
    wr: usize,
    y: &Rows,
    yc: usize,
    out: &mut [f32],
    add: bool,
) {
    debug_assert!(nsb * kw(F) <= w.qs && (wr + 1) * w.qs <= w.q.len());
    debug_assert!(nsb * KA <= y.qs && (yc + N) * y.qs <= y.q.len());
    debug_assert!(nsb.next_multiple_of(8) <= w.ds.min(y.ds));
    debug_assert!(k_mins(F) * nsb <= w.vs.min(y.vs));
    let (g, nch) = (k_g(F), k_nch(F));
    let mut acc = [_mm256_setzero_ps(); N];
    let wp = w.row_ptrs(wr);
    let yp: [_; N] = std::array::from_fn(|c| y.row_ptrs(yc + c));
    // SAFETY: super-block sb < nsb of every row is inside the scratch (caller), the scale
    // arrays are zero-padded to a multiple of 8, and the vectors are 32-byte aligned.
    unsafe {
        let mut dd = [[0f32; 8]; N];
        for sb in 0..nsb {
            if sb % 8 == 0 {
                // d_w·d_act of the next 8 super-blocks for every column at once, read back
                // below with broadcast loads.
                let dw = _mm256_loadu_ps(wp.1.add(sb));
                for (c, d) in dd.iter_mut().enumerate() {
                    let p = _mm256_mul_ps(dw, _mm256_loadu_ps(yp[c].1.add(sb)));
                    _mm256_storeu_ps(d.as_mut_ptr(), p);
                }
            }
            let wb = wp.0.add(kw(F) * sb);
            let mut isum = [_mm256_setzero_si256(); N];
            for ch in 0..nch {
                let sc = *wb.add(8 + ch);
                let wq = wb.add(g * ch);
                let w4 = [*wq, *wq.add(1), *wq.add(g - 2), *wq.add(g - 1)];
                for (c, is) in isum.iter_mut().enumerate() {
                    let yq = yp[c].0.add(KA * sb + g * ch);
                    let mut t = _mm256_add_epi16(
                        _mm256_maddubs_epi16(w4[0], *yq),
                        _mm256_maddubs_epi16(w4[1], *yq.add(1)),
                    );
                    if g == 4 {
                        t = _mm256_add_epi16(
                            t,
                            _mm256_add_epi16(
                                _mm256_maddubs_epi16(w4[2], *yq.add(2)),
                                _mm256_maddubs_epi16(w4[3], *yq.add(3)),
                            ),
                        );
                    }
                    *is = _mm256_add_epi32(*is, _mm256_madd_epi16(t, sc));
                }
            }
            for (c, (a, is)) in acc.iter_mut().zip(isum).enumerate() {
                let mut i = is;
                if k_cw(F) {
                    let bs = *yp[c].0.add(KA * sb + 8);
                    i = _mm256_sub_epi32(i, _mm256_madd_epi16(*wb.add(8 + nch), bs));
                }
                let d = _mm256_broadcast_ss(&dd[c][sb % 8]);
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), d, *a);
            }
        }
        if k_mins(F) > 0 {
            for o in (0..k_mins(F) * nsb).step_by(8) {
                let u = _mm256_loadu_ps(wp.2.add(o));
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fnmadd_ps(u, _mm256_loadu_ps(yp[c].2.add(o)), *a);
                }
            }
        }
    }
    store_sums::<N>(&acc, out, add);
}

/// # Safety
/// As the entry wrappers: `a` describes readable rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_gemm<const F: u8>(a: Args) {
    let kc = a.nb.min(K_KC);
    let ct = a.cols.min(COL_TILE);
    let (qs, ds, vs) = k_strides(F, kc, false);
    let mut ys = Rows::new(ct, qs, ds, vs);
    let (qs, ds, vs) = k_strides(F, kc, true);
    let rb = row_block(Rows::row_bytes(qs, ds, vs));
    let mut ws = Rows::new(rb.min(a.rows), qs, ds, vs);
    // SAFETY: rows, columns and blocks passed on are < a.rows / a.cols / a.nb; the scratch
    // rows exist and hold kc super-blocks.
    unsafe {
        for c0 in (0..a.cols).step_by(COL_TILE) {
            let nc = (a.cols - c0).min(COL_TILE);
            for k in spans(a.nb, kc) {
                repack_k_acts::<F>(&a, c0, nc, k, &mut ys);
                for r0 in (0..a.rows).step_by(rb) {
                    let nr = (a.rows - r0).min(rb);
                    unpack_k_rows::<F>(&a, r0, nr, k, &mut ws);
                    for c in (0..nc).step_by(NR) {
                        let n = (nc - c).min(NR);
                        for r in 0..nr {
                            let out = &mut a.out[(r0 + r) * a.out_stride + c0 + c..];
                            let add = k.b0 > 0;
                            dispatch_n!(n, k_mk::<F>(k.nb, &ws, r, &ys, c, out, add));
                        }
                    }
                }
            }
        }
    }
}
