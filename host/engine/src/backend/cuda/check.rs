//! The per-type kernel check (`realm gpu check`): for every tensor type, random weight rows
//! through the GPU matrix products at batch 1, 2 … 16 and larger sizes, by every path that can
//! compute them ([`Device::paths`]: f32 mat-vec, int8 mat-vec, cuBLAS gemm), against
//! - the exact reference of that path: the same rows dequantized on the CPU
//!   (`quant::dequantize_row`, the scalar twin of the GPU's `dequant16`), the activations as the
//!   path sees them (8-bit blocks of 32 by [`quantize_q8_twin`] for the int8 kernels, f32 for the
//!   f32 mat-vec, both sides rounded to f16 for the gemm), multiplied in f64 — the GPU must match
//!   it to f32 rounding, so a wrong bit in any block layout fails;
//! - the CPU backend's own kernels (activations quantized to the type's `vec_dot_type`, integer
//!   dot products): reported, since the CPU's activation quantization differs by design.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{CudaError, Device, MatPath};
use crate::quant::{self, GgmlType};

/// One (type, batch size) of the check.
#[derive(Clone, Debug)]
pub struct CheckRow {
    pub ty: GgmlType,
    /// Activation rows in the product.
    pub n: usize,
    /// The kernel path that computed it.
    pub path: MatPath,
    /// Largest |gpu - reference| / (Σ|w·x| of that output + 1e-30) over every output.
    pub max_rel_err: f64,
    /// Largest |gpu - cpu kernels| / (Σ|w·x| + 1e-30) (informational).
    pub max_rel_diff_cpu: f64,
    pub ok: bool,
}

/// Largest relative error the GPU may show against the f64 reference of the same dequantized
/// weights and activations: f32 accumulation over a few hundred products is good to a few 1e-7
/// of Σ|w·x| (the tensor cores' accumulation of the gemm path to a few 1e-6).
pub const TOLERANCE: f64 = 2e-5;

/// Batch sizes checked: every decode batch up to 16, the int8 path's largest, and prefill sizes
/// (the gemm path, when cuBLAS is present).
pub const BATCHES: [usize; 20] = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 33, 64, 67, 130,
];

/// The activations the int8 kernels see: blocks of 32 quantized to `round(x / d)`, d = max|x| /
/// 127, as `quantize_q8` in mmvq.cu, returned dequantized (q · d).
pub fn quantize_q8_twin(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for b in x.chunks(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        out.extend(b.iter().map(|&v| {
            let q = if d == 0.0 { 0.0 } else { (v / d).round() };
            q * d
        }));
    }
    out
}

fn round_f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

fn normalish(rng: &mut ChaCha8Rng) -> f32 {
    // The sum of four uniforms: bell-shaped, with the occasional large value quantizers meet.
    (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * 1.7
}

/// Runs the check on `dev` for `types` (all when empty), calling `progress` after each row.
pub fn check_kernels(
    dev: &Device,
    types: &[GgmlType],
    progress: &mut dyn FnMut(&CheckRow),
) -> Result<Vec<CheckRow>, CudaError> {
    // 300 rows: not a multiple of the warps per block, so the grid's tail is exercised. 512
    // columns: two K-quant super-blocks, sixteen legacy blocks, 32 chunks of 16 (one per lane).
    let (rows, cols) = (300usize, 512usize);
    let all: Vec<GgmlType> = if types.is_empty() {
        GgmlType::ALL.to_vec()
    } else {
        types.to_vec()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    let max_n = *BATCHES.iter().max().unwrap();
    let mut out = Vec::new();
    for ty in all {
        let row_bytes = ty.row_bytes(cols).expect("512 is a whole number of blocks");
        let mut wq = vec![0u8; rows * row_bytes];
        let mut wf = vec![0f32; rows * cols];
        for r in 0..rows {
            let src: Vec<f32> = (0..cols).map(|_| normalish(&mut rng)).collect();
            let dst = &mut wq[r * row_bytes..(r + 1) * row_bytes];
            if ty == GgmlType::F32 {
                dst.copy_from_slice(bytemuck::cast_slice(&src));
            } else {
                quant::quantize_row(ty, &src, dst)
                    .map_err(|e| CudaError::Invalid(format!("quantizing {ty}: {e}")))?;
            }
            quant::dequantize_row(ty, dst, &mut wf[r * cols..(r + 1) * cols]);
        }
        let dw = dev.upload_matrix(ty, rows, cols, &wq)?;
        let x: Vec<f32> = (0..max_n * cols).map(|_| normalish(&mut rng)).collect();
        let k = quant::kernels(ty);
        let act_bytes = k.act_type.row_bytes(cols).expect("whole blocks");
        let mut act = vec![0u8; max_n * act_bytes];
        for v in 0..max_n {
            (k.quantize_act)(
                &x[v * cols..(v + 1) * cols],
                &mut act[v * act_bytes..(v + 1) * act_bytes],
            );
        }
        let wf16: Vec<f32> = wf.iter().map(|&v| round_f16(v)).collect();
        let xq: Vec<f32> = quantize_q8_twin(&x);
        let xf16: Vec<f32> = x.iter().map(|&v| round_f16(v)).collect();
        for (&n, path) in BATCHES
            .iter()
            .flat_map(|n| dev.paths(ty).into_iter().map(move |p| (n, p)))
        {
            // The gemm path dequantizes 128 rows at a time here (300 rows: three slices, the
            // last one short), as a pass does with matrices larger than its slice.
            let y = dev.matmul_sliced(path, &dw, &x[..n * cols], n, 128 * cols)?;
            let (w_seen, x_seen) = match path {
                MatPath::Mmvq => (&wf, &xq),
                MatPath::Matvec => (&wf, &x),
                MatPath::Gemm => (&wf16, &xf16),
            };
            let (mut max_rel_err, mut max_rel_diff_cpu) = (0f64, 0f64);
            for v in 0..n {
                let xv = &x_seen[v * cols..(v + 1) * cols];
                for r in 0..rows {
                    let wr = &w_seen[r * cols..(r + 1) * cols];
                    let (mut exact, mut mag) = (0f64, 0f64);
                    for (a, b) in wr.iter().zip(xv) {
                        exact += *a as f64 * *b as f64;
                        mag += (*a as f64 * *b as f64).abs();
                    }
                    let g = y[v * rows + r] as f64;
                    let cpu = (k.vec_dot)(
                        cols,
                        &wq[r * row_bytes..(r + 1) * row_bytes],
                        &act[v * act_bytes..(v + 1) * act_bytes],
                    ) as f64;
                    let scale = mag + 1e-30;
                    let err = if g.is_finite() {
                        (g - exact).abs() / scale
                    } else {
                        f64::INFINITY
                    };
                    max_rel_err = max_rel_err.max(err);
                    max_rel_diff_cpu = max_rel_diff_cpu.max((g - cpu).abs() / scale);
                }
            }
            let row = CheckRow {
                ty,
                n,
                path,
                max_rel_err,
                max_rel_diff_cpu,
                ok: max_rel_err <= TOLERANCE,
            };
            progress(&row);
            out.push(row);
        }
    }
    Ok(out)
}
