//! Quantized tensor formats and the kernels that compute with them.
//!
//! # Formats
//! Every [`GgmlType`] is byte-for-byte the ggml/GGUF block format: a row of `n` elements is
//! `n / block_size` consecutive blocks of `type_size` bytes, little-endian, with no padding and no
//! alignment promise (a 144-byte Q4_K block puts every other block on an odd 16-byte boundary), so
//! kernels read through unaligned loads only. The legacy formats (Q4_0 … Q8_1) pack 32 elements
//! per block behind an f16 scale (and an f16 min or sum); the K-quants pack 256 elements as 8 or 16
//! sub-blocks whose own scales are themselves quantized to 4–8 bits against one or two f16
//! super-scales. Q8_1 and Q8_K exist for activations: they carry the precomputed block sums
//! (`s`, `bsums`) that let a weight format with a min/offset fold it in without touching every
//! element again.
//!
//! # Numerics
//! Quantization follows ggml's reference (`*_ref`) routines step by step, including their rounding
//! quirks (`roundf` half-away-from-zero for Q8_0/Q8_1, the magic-number round-half-even
//! `nearest_int` for the K-quants, and Q8_K's `iscale = -127/max` on the signed value of largest
//! magnitude), so files we write and activations we quantize match ggml's. A dot product first
//! forms the exact integer sum of quant products for each (sub-)block, exactly as ggml's integer
//! pipeline does, and only then scales it in f32; the SIMD kernels produce the same integer sums
//! as the scalar ones and differ from them only in the order the f32 partials are added.
//!
//! # Dispatch
//! `scalar.rs` is the reference for every format. `avx2.rs` and `avx512.rs` hold
//! `#[target_feature]` kernels for the formats that dominate real models; each file hands out
//! function pointers only after checking the CPU features itself, which is what makes calling
//! them through a safe `fn` pointer sound. [`kernels`] picks, per weight type, the best kernel of
//! the ISA level [`detected_isa`] reports (AVX-512 falls back to AVX2 for formats without an
//! AVX-512 kernel, and AVX2 to scalar); the table is built once. `REALM_ISA=scalar|avx2|avx512`
//! caps that level for benchmarking and debugging.
//!
//! A matrix-vector product converts the activation row once with `quantize_act` into
//! `act_type` (= [`GgmlType::vec_dot_type`]) and then runs `gemv` over the weight rows: by
//! definition `vec_dot` once per row, bit for bit. At the SIMD levels it also prefetches the rows
//! a few KiB ahead (decode streams every weight from memory once per token, and the hardware
//! prefetchers alone leave a single core well short of the memory bandwidth), and for Q8_0 it
//! runs four rows at once so that each activation block is loaded once for all four.
//!
//! # Matrix-matrix products
//! A batch of activation rows (prefill) goes through `gemm` instead: it computes a whole tile of
//! weight rows × activation rows and is defined as exactly `vec_dot` for every pair (the same
//! per-block integer sums, scaled the same way; only the order of the f32 additions differs).
//! The scalar level (and any format without a tiled kernel) simply loops over `vec_dot`. The
//! AVX2 kernels (`avx2_gemm.rs`) unpack every weight block and activation block once per call
//! into layouts that let several `maddubs` share one widening `madd` and one f32 scaling, then
//! run a microkernel of one weight row × four activation rows over cache-sized blocks of both, so
//! each unpacked block is reused many times from L1. Callers should hand over many weight rows and
//! up to 64 activation rows per call: the per-call unpacking is amortised over both.

mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_gemm;
#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod tests;

use std::sync::OnceLock;

/// Elements per block of the legacy formats (Q4_0 … Q8_1).
pub const QK: usize = 32;
/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

/// Tensor element types, numbered as in ggml / GGUF.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2K = 10,
    Q3K = 11,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    Q8K = 15,
    BF16 = 30,
}

impl GgmlType {
    /// Every supported type, in ggml id order.
    pub const ALL: [GgmlType; 15] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8K,
        GgmlType::BF16,
    ];

    pub fn from_u32(v: u32) -> Option<GgmlType> {
        Self::ALL.iter().copied().find(|t| *t as u32 == v)
    }

    /// ggml's spelling of the type name.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Q8K => "Q8_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Inverse of [`GgmlType::name`], ignoring ASCII case.
    pub fn from_name(s: &str) -> Option<GgmlType> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1 => QK,
            GgmlType::Q2K
            | GgmlType::Q3K
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
            | GgmlType::Q8K => QK_K,
        }
    }

    /// Bytes per block, exactly ggml's `sizeof(block_*)`.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q8_1 => 36,
            GgmlType::Q2K => 84,
            GgmlType::Q3K => 110,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
            GgmlType::Q8K => 292,
        }
    }

    /// Bytes of a row of `n` elements; `None` unless `n` is a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.type_size())
    }

    pub fn is_quantized(self) -> bool {
        !matches!(self, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
    }

    /// The format activations are converted to before a dot product with weights of this type.
    pub fn vec_dot_type(self) -> GgmlType {
        match self {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => GgmlType::Q8_0,
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 => GgmlType::Q8_1,
            GgmlType::Q2K
            | GgmlType::Q3K
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
            | GgmlType::Q8K => GgmlType::Q8K,
            GgmlType::F32 => GgmlType::F32,
            GgmlType::F16 => GgmlType::F16,
            GgmlType::BF16 => GgmlType::BF16,
        }
    }

    pub(crate) fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|t| *t == self)
            .expect("ALL lists every variant")
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// No quantizer for this format (none today; see [`quantize_row`]).
    #[error("quantizing to {0} is not supported")]
    UnsupportedQuantize(GgmlType),
    #[error("{ty}: {what} has length {got}, expected {expected}")]
    BadLength {
        ty: GgmlType,
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{ty}: {n} elements is not a multiple of the block size {block}")]
    PartialBlock {
        ty: GgmlType,
        n: usize,
        block: usize,
    },
}

/// Dequantizes one row. `dst.len()` is the element count (a multiple of the block size) and
/// `src` must hold exactly `row_bytes(dst.len())` bytes; anything else panics.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let need = ty.row_bytes(dst.len()).unwrap_or_else(|| {
        panic!(
            "{ty}: {} elements is not a whole number of blocks",
            dst.len()
        )
    });
    assert_eq!(
        src.len(),
        need,
        "{ty}: source row has the wrong byte length"
    );
    match ty {
        GgmlType::F16 => f16_to_f32_row(src, dst),
        GgmlType::BF16 => bf16_to_f32_row(src, dst),
        _ => scalar::dequantize(ty, src, dst),
    }
}

/// Reference-quality quantization of one row, as ggml's `quantize_row_*_ref` (no importance
/// matrix). Every [`GgmlType`] is supported (Q2_K…Q6_K included); `UnsupportedQuantize` is
/// kept for formats added later without a quantizer.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    let need = ty.row_bytes(src.len()).ok_or(QuantError::PartialBlock {
        ty,
        n: src.len(),
        block: ty.block_size(),
    })?;
    if dst.len() != need {
        return Err(QuantError::BadLength {
            ty,
            what: "destination row",
            expected: need,
            got: dst.len(),
        });
    }
    match ty {
        // These activation quantizers are byte-identical to the reference one, so use the fast
        // ones. Q8_0 and Q8_1 activations follow llama.cpp's x86 rounding instead, which is not
        // the reference quantizer that weights are written with.
        GgmlType::Q8K | GgmlType::F16 | GgmlType::BF16 => (kernels(ty).quantize_act)(src, dst),
        _ => scalar::quantize(ty, src, dst),
    }
    Ok(())
}

/// Instruction-set level of a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    pub fn from_name(s: &str) -> Option<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(s.trim()))
    }
}

/// Whether this CPU can run kernels of level `isa` (ignores `REALM_ISA`).
pub fn cpu_supports(isa: Isa) -> bool {
    match isa {
        Isa::Scalar => true,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::available(),
        #[cfg(target_arch = "x86_64")]
        // The AVX-512 table borrows AVX2 kernels for the formats it has none for.
        Isa::Avx512 => avx2::available() && avx512::available(),
        #[cfg(not(target_arch = "x86_64"))]
        _ => false,
    }
}

/// Whether the AVX-512 level uses VNNI kernels here; without VNNI it runs the AVX2 kernels.
pub fn avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        cpu_supports(Isa::Avx512) && avx512::vnni_available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Best ISA level of this CPU, lowered by `REALM_ISA` if set; detected once.
pub fn detected_isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let hw = [Isa::Avx512, Isa::Avx2, Isa::Scalar]
            .into_iter()
            .find(|i| cpu_supports(*i))
            .unwrap_or(Isa::Scalar);
        // An unknown value is ignored rather than fatal: it only ever lowers the level.
        match std::env::var("REALM_ISA")
            .ok()
            .as_deref()
            .and_then(Isa::from_name)
        {
            Some(cap) => cap.min(hw),
            None => hw,
        }
    })
}

/// `n` elements; `w` = one weight row of the kernel's weight type; `act` = activations already in
/// its `act_type`. Both slices may be longer than the row; they are checked to be long enough.
pub type VecDotFn = fn(n: usize, w: &[u8], act: &[u8]) -> f32;
/// `out[r] = vec_dot(k, &w[r * w_stride..], act)` for every `r < out.len()`, bit-identical to
/// the same level's `vec_dot` (same integer sums, same f32 accumulation order per row). `w_stride`
/// is in bytes; panics unless every row fits in `w` and `act` holds a whole activation row.
pub type GemvFn = fn(k: usize, w: &[u8], w_stride: usize, act: &[u8], out: &mut [f32]);
/// See [`dot_rows`] (rows of `E`: f32, or f16 as in the CPU backend's KV pages).
pub type DotRowsFn<E = f32> = fn(xs: &[f32], nq: usize, rows: &[E], stride: usize, out: &mut [f32]);
/// See [`weighted_sum`] and [`weighted_sum_acc`].
pub type WeightedSumFn<E = f32> =
    fn(ws: &[f32], nq: usize, rows: &[E], stride: usize, out: &mut [f32]);

/// The element types attention's kernels read rows of: f32, and f16 (the CPU backend's KV pages,
/// converted in registers).
pub trait RowElem: Copy + Send + Sync + 'static {
    /// Whether the type is f16 (the SIMD kernels pick their loads by it, at compile time).
    const F16: bool;
    fn to_f32(self) -> f32;
}

impl RowElem for f32 {
    const F16: bool = false;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
}

impl RowElem for half::f16 {
    const F16: bool = true;
    #[inline]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}
/// f32 activations → `act_type` bytes (`dst` exactly `act_type.row_bytes(src.len())` long).
pub type QuantizeActFn = fn(src: &[f32], dst: &mut [u8]);
/// Tiled matrix product of `rows` weight rows with `cols` activation rows:
/// `out[r * out_stride + c] = vec_dot(k, &w[r * w_stride..], &act[c * act_stride..])` for
/// `r < rows`, `c < cols`, with exactly the same integer sums as `vec_dot` (the f32 results may
/// differ only by the order of accumulation). Strides are in bytes for `w`/`act` and in elements
/// for `out`; slices need not be aligned. Panics unless every row named fits in its slice; other
/// entries of `out` are left untouched. `rows` or `cols` of 0 does nothing.
pub type GemmFn = fn(
    k: usize,
    w: &[u8],
    w_stride: usize,
    rows: usize,
    act: &[u8],
    act_stride: usize,
    cols: usize,
    out: &mut [f32],
    out_stride: usize,
);

#[derive(Clone, Copy)]
pub struct Kernels {
    pub weight_type: GgmlType,
    pub act_type: GgmlType,
    pub vec_dot: VecDotFn,
    /// Many weight rows against one activation row (decode); see [`GemvFn`].
    pub gemv: GemvFn,
    pub quantize_act: QuantizeActFn,
    /// Weight rows × activation rows at once (prefill); see [`GemmFn`].
    pub gemm: GemmFn,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels")
            .field("weight_type", &self.weight_type)
            .field("act_type", &self.act_type)
            .finish_non_exhaustive()
    }
}

/// Kernels for weights of type `ty` at the best detected ISA level.
pub fn kernels(ty: GgmlType) -> Kernels {
    static TABLE: OnceLock<Vec<Kernels>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let isa = detected_isa();
        GgmlType::ALL
            .iter()
            .map(|t| kernels_for(*t, isa).expect("the detected ISA is supported"))
            .collect()
    })[ty.index()]
}

/// Kernels of exactly level `isa` (falling back to lower levels per format that has no kernel
/// of its own at `isa`); `None` if this CPU cannot run `isa`.
pub fn kernels_for(ty: GgmlType, isa: Isa) -> Option<Kernels> {
    if !cpu_supports(isa) {
        return None;
    }
    let act_type = ty.vec_dot_type();
    #[allow(unused_mut)]
    let mut k = Kernels {
        weight_type: ty,
        act_type,
        vec_dot: scalar::vec_dot_fn(ty),
        gemv: scalar::gemv_fn(ty),
        quantize_act: scalar::quantize_act_fn(act_type),
        gemm: scalar::gemm_fn(ty),
    };
    #[cfg(target_arch = "x86_64")]
    {
        if isa >= Isa::Avx2 {
            if let Some(f) = avx2::vec_dot_fn(ty) {
                k.vec_dot = f;
            }
            if let Some(f) = avx2::gemv_fn(ty) {
                k.gemv = f;
            }
            if let Some(f) = avx2::quantize_act_fn(act_type) {
                k.quantize_act = f;
            }
            if let Some(f) = avx2::gemm_fn(ty) {
                k.gemm = f;
            }
        }
        if isa >= Isa::Avx512
            && let Some(f) = avx512::vec_dot_fn(ty)
        {
            k.vec_dot = f;
            k.gemv = avx512::gemv_fn(ty).expect("every AVX-512 vec_dot has a gemv");
            // Formats with a tiled AVX2 gemm keep it (it is 3-7x a loop over the AVX2 vec_dot,
            // more than the AVX-512 vec_dots gain; not measured on AVX-512 hardware); the
            // others loop over the AVX-512 vec_dot.
            if avx2_gemm::gemm_fn(ty).is_none()
                && let Some(g) = avx512::gemm_fn(ty)
            {
                k.gemm = g;
            }
        }
    }
    Some(k)
}

/// Little-endian f16 bytes → f32 (`src.len() == 2 * dst.len()`).
pub fn f16_to_f32_row(src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), 2 * dst.len(), "f16 row: byte length mismatch");
    #[cfg(target_arch = "x86_64")]
    if detected_isa() >= Isa::Avx2
        && let Some(f) = avx2::f16_to_f32_fn()
    {
        return f(src, dst);
    }
    scalar::f16_to_f32_row(src, dst)
}

/// Attention's probability-weighted sum of value rows for `nq` queries that share a value head:
/// `out[q · n + d] = Σ_j ws[q · m + j] · rows[j · stride + d]` for every query `q`, column
/// `d < n = out.len() / nq` and row `j < m = ws.len() / nq`, overwriting `out` (`rows` in
/// elements, one row per weight, `stride` apart). The SIMD level fuses each multiply-add, so
/// results differ from the scalar twin by rounding only. Panics unless `nq` divides both slices
/// and `rows` holds every row named.
pub fn weighted_sum<E: RowElem>(ws: &[f32], nq: usize, rows: &[E], stride: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if detected_isa() >= Isa::Avx2
        && let Some(f) = avx2::weighted_sum_fn::<E>()
    {
        return f(ws, nq, rows, stride, out);
    }
    scalar::weighted_sum(ws, nq, rows, stride, out)
}

/// [`weighted_sum`] added to what `out` holds (each column's sum continues from its value: a
/// sum over rows split into runs, as attention over KV pages takes them, adds the same terms in
/// the same order as one call over all the rows).
pub fn weighted_sum_acc<E: RowElem>(
    ws: &[f32],
    nq: usize,
    rows: &[E],
    stride: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if detected_isa() >= Isa::Avx2
        && let Some(f) = avx2::weighted_sum_acc_fn::<E>()
    {
        return f(ws, nq, rows, stride, out);
    }
    scalar::weighted_sum_acc(ws, nq, rows, stride, out)
}

/// [`weighted_sum`] at exactly level `isa`; `None` if this CPU cannot run it (for tests and
/// benchmarks that compare levels).
pub fn weighted_sum_for<E: RowElem>(isa: Isa) -> Option<WeightedSumFn<E>> {
    if !cpu_supports(isa) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        return avx2::weighted_sum_fn::<E>();
    }
    Some(scalar::weighted_sum::<E>)
}

/// [`weighted_sum_acc`] at exactly level `isa`.
pub fn weighted_sum_acc_for<E: RowElem>(isa: Isa) -> Option<WeightedSumFn<E>> {
    if !cpu_supports(isa) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        return avx2::weighted_sum_acc_fn::<E>();
    }
    Some(scalar::weighted_sum_acc::<E>)
}

/// Attention's query-key scores for `nq` queries that share a key head:
/// `out[q · m + j] = Σ_d xs[q · n + d] · rows[j · stride + d]` for every query `q`, row
/// `j < m = out.len() / nq` and `d < n = xs.len() / nq` (key rows `stride` apart). The SIMD
/// level fuses the multiply-adds and sums in another order, so results differ from the scalar
/// twin by rounding only. Panics unless `nq` divides both slices and `rows` holds every row named.
pub fn dot_rows<E: RowElem>(xs: &[f32], nq: usize, rows: &[E], stride: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if detected_isa() >= Isa::Avx2
        && let Some(f) = avx2::dot_rows_fn::<E>()
    {
        return f(xs, nq, rows, stride, out);
    }
    scalar::dot_rows(xs, nq, rows, stride, out)
}

/// [`dot_rows`] at exactly level `isa`; `None` if this CPU cannot run it.
pub fn dot_rows_for<E: RowElem>(isa: Isa) -> Option<DotRowsFn<E>> {
    if !cpu_supports(isa) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        return avx2::dot_rows_fn::<E>();
    }
    Some(scalar::dot_rows::<E>)
}

/// Little-endian bf16 bytes → f32 (`src.len() == 2 * dst.len()`).
pub fn bf16_to_f32_row(src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), 2 * dst.len(), "bf16 row: byte length mismatch");
    #[cfg(target_arch = "x86_64")]
    if detected_isa() >= Isa::Avx2
        && let Some(f) = avx2::bf16_to_f32_fn()
    {
        return f(src, dst);
    }
    scalar::bf16_to_f32_row(src, dst)
}

/// Whether `ty`'s gemm at level `isa` is a register-tiled kernel (rather than a loop over
/// `vec_dot`); `None` if this CPU cannot run `isa`. For reports and benches.
pub fn gemm_is_tiled(ty: GgmlType, isa: Isa) -> Option<bool> {
    if !cpu_supports(isa) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        Some(isa >= Isa::Avx2 && avx2_gemm::gemm_fn(ty).is_some())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        Some(false)
    }
}

/// Which ISA level actually provides `ty`'s vec_dot at level `isa` (for reports and benches).
pub fn vec_dot_isa(ty: GgmlType, isa: Isa) -> Option<Isa> {
    if !cpu_supports(isa) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if isa >= Isa::Avx512 && avx512::vec_dot_fn(ty).is_some() {
            return Some(Isa::Avx512);
        }
        if isa >= Isa::Avx2 && avx2::vec_dot_fn(ty).is_some() {
            return Some(Isa::Avx2);
        }
    }
    let _ = ty;
    Some(Isa::Scalar)
}
