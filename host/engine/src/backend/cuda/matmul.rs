//! Quantized matrix × activation rows on the device: which kernel runs a product, and the scratch
//! memory it needs. One place decides, so `realm gpu check` tests exactly what a forward pass runs.
//!
//! | rows `n` | weight type | path |
//! |---|---|---|
//! | ≤ [`GEMM_MIN_ROWS`] | Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K | [`MatPath::Mmvq`]: activations quantized to 8 bits (`quantize_q8`), int8 dot products (`mmvq.cu`), 8 rows a launch |
//! | ≤ [`GEMM_MIN_ROWS`] | the others | [`MatPath::Matvec`]: f32 activations, weights dequantized in registers (`matvec.cu`), 8 rows a launch |
//! | more | any | [`MatPath::Gemm`]: weights dequantized to f16 (a slice of rows at a time), activations rounded to f16, cuBLAS gemm on the tensor cores with f32 accumulation and output |
//!
//! Without cuBLAS (its library missing) every product takes the first two paths.
//!
//! The int8 and gemm paths (and the CUDA graphs and warp-per-key attention of `exec.rs`) are the
//! *fast* kernel set, `REALM_CUDA_KERNELS=fast`: they landed before a GPU was available to run
//! them end to end, so the default is still the *reference* set (every product by
//! [`MatPath::Matvec`], the kernels `realm eval` matched llama.cpp with on an H100). `realm gpu
//! check` tests every path whichever set is chosen.

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::{CudaError, Device, DeviceMatrix, driver_err};
use crate::quant::GgmlType;

/// Activation rows one `mmvq_*` / `matvec_*` launch handles (`MAX_NV` in the sources).
pub const MAX_NV: usize = 8;
/// Warps (= output rows) per thread block of the mat-vec kernels.
pub const MATVEC_WARPS: u32 = 4;
/// Above this many rows a product goes through cuBLAS (below, reading the weights once per 8
/// rows costs less than writing and reading an f16 copy of them).
pub const GEMM_MIN_ROWS: usize = 64;
/// Largest f16 weight slice dequantized at once for a gemm (elements): 128 MiB.
pub const GEMM_SLICE_ELEMS: usize = 64 << 20;

/// The types with an int8 (`mmvq.cu`) kernel.
pub const MMVQ_TYPES: &[GgmlType] = &[
    GgmlType::Q4_0,
    GgmlType::Q5_0,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// How a product is computed (see the module's table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatPath {
    Mmvq,
    Matvec,
    Gemm,
}

impl MatPath {
    pub fn name(self) -> &'static str {
        match self {
            MatPath::Mmvq => "mmvq",
            MatPath::Matvec => "matvec",
            MatPath::Gemm => "gemm",
        }
    }
}

/// Makes `slot` hold at least `len` elements; returns whether it was (re)allocated (its address
/// changed).
pub(crate) fn grow<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<bool, CudaError> {
    if slot.as_ref().is_none_or(|b| b.len() < len) {
        *slot = None; // free the old one first
        *slot = Some(
            stream
                .alloc_zeros::<T>(len.max(1))
                .map_err(driver_err(format!(
                    "allocating {len} elements of scratch memory"
                )))?,
        );
        return Ok(true);
    }
    Ok(false)
}

pub(crate) fn ptr<T>(stream: &CudaStream, b: &CudaSlice<T>) -> CUdeviceptr {
    // Event tracking is off (Device::open), so the guard does nothing when dropped.
    b.device_ptr(stream).0
}

/// Scratch memory of the products (grown, never shrunk).
#[derive(Default)]
pub struct MatWork {
    /// 8-bit activations `[n][cols]` and their scales `[n][cols / 32]`.
    xq: Option<CudaSlice<i8>>,
    xd: Option<CudaSlice<f32>>,
    /// f16 activations `[n][cols]` and a slice of f16 weights.
    x16: Option<CudaSlice<u16>>,
    w16: Option<CudaSlice<u16>>,
    /// Elements of the f16 weight slice (0: [`GEMM_SLICE_ELEMS`]); the kernel check makes it
    /// small so that a matrix takes several slices.
    slice_elems: usize,
}

impl MatWork {
    /// Makes room for products of `n` rows of up to `cols` columns with matrices of up to
    /// `max_rows` rows, by the gemm path or the others; returns whether any buffer moved.
    pub fn reserve(
        &mut self,
        dev: &Device,
        gemm: bool,
        n: usize,
        cols: usize,
        max_rows: usize,
    ) -> Result<bool, CudaError> {
        let s = &dev.stream;
        let mut moved = false;
        if !gemm {
            let nq = n * cols;
            moved |= grow(s, &mut self.xq, nq)?;
            moved |= grow(s, &mut self.xd, nq.div_ceil(32))?;
        } else {
            moved |= grow(s, &mut self.x16, n * cols)?;
            let elems = if self.slice_elems == 0 {
                GEMM_SLICE_ELEMS
            } else {
                self.slice_elems
            };
            let slice = (elems / cols.max(1)).max(1).min(max_rows) * cols;
            moved |= grow(s, &mut self.w16, slice)?;
        }
        Ok(moved)
    }
}

/// An activation input quantized for the int8 kernels (valid until the next `quantize`).
#[derive(Clone, Copy)]
pub struct QuantizedX {
    xq: CUdeviceptr,
    xd: CUdeviceptr,
}

fn cfg_1d(n: u64, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(threads as u64) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Device {
    /// The path a product of `n` rows with a `ty` matrix takes in a forward pass.
    pub fn path(&self, ty: GgmlType, n: usize) -> MatPath {
        if !self.fast {
            MatPath::Matvec
        } else if n > GEMM_MIN_ROWS && self.blas.is_some() {
            MatPath::Gemm
        } else if self.mmvq_fns[ty.index()].is_some() {
            MatPath::Mmvq
        } else {
            MatPath::Matvec
        }
    }

    /// Every path that can compute a product with a `ty` matrix (what `realm gpu check` tests).
    pub fn paths(&self, ty: GgmlType) -> Vec<MatPath> {
        let mut p = vec![MatPath::Matvec];
        if self.mmvq_fns[ty.index()].is_some() {
            p.push(MatPath::Mmvq);
        }
        if self.blas.is_some() {
            p.push(MatPath::Gemm);
        }
        p
    }

    /// Quantizes `n` rows of `cols` f32 activations at `x` for [`MatPath::Mmvq`] (`work` reserved
    /// for them).
    pub(crate) fn quantize(
        &self,
        x: CUdeviceptr,
        n: usize,
        cols: usize,
        work: &MatWork,
    ) -> Result<QuantizedX, CudaError> {
        let (Some(xq), Some(xd)) = (&work.xq, &work.xd) else {
            return Err(CudaError::Invalid("matmul scratch not reserved".into()));
        };
        if xq.len() < n * cols || !cols.is_multiple_of(32) {
            return Err(CudaError::Invalid(format!(
                "quantizing {n} x {cols} activations: scratch of {} (or columns not a multiple of 32)",
                xq.len()
            )));
        }
        let q = QuantizedX {
            xq: ptr(&self.stream, xq),
            xd: ptr(&self.stream, xd),
        };
        let total = (n * cols / 32) as u64;
        let mut b = self.stream.launch_builder(&self.quantize_q8);
        b.arg(&x).arg(&q.xq).arg(&q.xd).arg(&total);
        // SAFETY: quantize_q8(x, xq, xd, total): one warp per block of 32 values; reads
        // n * cols floats of x, writes as many ints to xq and n * cols / 32 scales to xd, all
        // inside the buffers (checked above).
        unsafe { b.launch(cfg_1d(total * 32, 256)) }
            .map_err(driver_err("launching quantize_q8"))?;
        Ok(q)
    }

    /// `y = x · Wᵀ` by `path`: `x` is `n × w.cols` f32 at a device address, `y` is `n × w.rows`
    /// f32. For [`MatPath::Mmvq`], `q` must hold `x` quantized by [`Device::quantize`] (one
    /// quantization serves every matrix multiplied with the same input). Asynchronous, on the
    /// device's stream.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul_async(
        &self,
        path: MatPath,
        w: &DeviceMatrix,
        x: CUdeviceptr,
        q: Option<QuantizedX>,
        y: CUdeviceptr,
        n: usize,
        work: &MatWork,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let (ncols, nrows) = (w.cols as i32, w.rows as i32);
        let row_bytes = w.row_bytes as u64;
        let wp = ptr(&self.stream, &w.buf);
        let cfg = LaunchConfig {
            grid_dim: ((w.rows as u32).div_ceil(MATVEC_WARPS), 1, 1),
            block_dim: (32 * MATVEC_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        match path {
            MatPath::Mmvq => {
                let q =
                    q.ok_or_else(|| CudaError::Invalid("mmvq without 8-bit activations".into()))?;
                let f = self.mmvq_fns[w.ty.index()]
                    .as_ref()
                    .ok_or_else(|| CudaError::Invalid(format!("no int8 kernel for {}", w.ty)))?;
                for v0 in (0..n).step_by(MAX_NV) {
                    let nv = (n - v0).min(MAX_NV) as i32;
                    let xq = q.xq + (v0 * w.cols) as u64;
                    let xd = q.xd + (v0 * w.cols / 32 * 4) as u64;
                    let ys = y + (v0 * w.rows * 4) as u64;
                    let mut b = self.stream.launch_builder(f);
                    b.arg(&wp).arg(&row_bytes).arg(&xq).arg(&xd).arg(&ys);
                    b.arg(&ncols).arg(&nrows).arg(&nv);
                    // SAFETY: mmvq_<type>(w, row_bytes, xq, xd, y, ncols, nrows, nvec): reads
                    // `nrows` weight rows, `nv` rows of 8-bit activations (rows v0.. of the
                    // quantized [n, ncols] input and its scales), writes `nv` rows of y.
                    unsafe { b.launch(cfg) }.map_err(driver_err("launching mmvq"))?;
                }
            }
            MatPath::Matvec => {
                let f = self.matvec_fns[w.ty.index()]
                    .as_ref()
                    .expect("loaded at open");
                for v0 in (0..n).step_by(MAX_NV) {
                    let nv = (n - v0).min(MAX_NV) as i32;
                    let xs = x + (v0 * w.cols * 4) as u64;
                    let ys = y + (v0 * w.rows * 4) as u64;
                    let mut b = self.stream.launch_builder(f);
                    b.arg(&wp).arg(&row_bytes).arg(&xs).arg(&ys);
                    b.arg(&ncols).arg(&nrows).arg(&nv);
                    // SAFETY: matvec_<type>(w, row_bytes, x, y, ncols, nrows, nvec): reads
                    // `nrows` weight rows and `nv` rows of x (rows v0.. of the [n, ncols]
                    // input), writes `nv` rows of y ([n, nrows]).
                    unsafe { b.launch(cfg) }.map_err(driver_err("launching matvec"))?;
                }
            }
            MatPath::Gemm => self.gemm(w, x, y, n, work)?,
        }
        Ok(())
    }

    /// The cuBLAS path: x → f16 once, then per slice of weight rows: dequantize to f16, gemm.
    fn gemm(
        &self,
        w: &DeviceMatrix,
        x: CUdeviceptr,
        y: CUdeviceptr,
        n: usize,
        work: &MatWork,
    ) -> Result<(), CudaError> {
        use cudarc::cublas::sys::{
            cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType,
        };
        let blas = self
            .blas
            .as_ref()
            .ok_or_else(|| CudaError::Invalid("the gemm path needs cuBLAS".into()))?;
        let (Some(x16), Some(w16)) = (&work.x16, &work.w16) else {
            return Err(CudaError::Invalid("gemm scratch not reserved".into()));
        };
        let cols = w.cols;
        let slice_rows = (w16.len() / cols).min(w.rows);
        if x16.len() < n * cols || slice_rows == 0 {
            return Err(CudaError::Invalid(format!(
                "gemm of {n} x {cols}: scratch of {} and {} elements",
                x16.len(),
                w16.len()
            )));
        }
        let (x16p, w16p) = (ptr(&self.stream, x16), ptr(&self.stream, w16));
        let len = (n * cols) as u64;
        let mut b = self.stream.launch_builder(&self.to_f16);
        b.arg(&x).arg(&x16p).arg(&len);
        // SAFETY: to_f16(x, out, n): converts `len` floats of x into x16 (which holds at least
        // n * cols values, checked above).
        unsafe { b.launch(cfg_1d(len, 256)) }.map_err(driver_err("launching to_f16"))?;
        let deq = self.dequant_fns[w.ty.index()]
            .as_ref()
            .expect("loaded at open");
        let (alpha, beta) = (1.0f32, 0.0f32);
        for r0 in (0..w.rows).step_by(slice_rows) {
            let rows = slice_rows.min(w.rows - r0);
            let chunks = (rows * cols / 16) as u64;
            let src = ptr(&self.stream, &w.buf) + (r0 * w.row_bytes) as u64;
            let (rb, nc) = (w.row_bytes as u64, cols as i32);
            let mut b = self.stream.launch_builder(deq);
            b.arg(&src).arg(&rb).arg(&w16p).arg(&nc).arg(&chunks);
            // SAFETY: dequant_f16_<type>(w, row_bytes, out, ncols, nchunks): reads `rows`
            // weight rows from r0 (inside the matrix) and writes rows * cols halves to w16
            // (slice_rows * cols fit, checked above).
            unsafe { b.launch(cfg_1d(chunks, 256)) }
                .map_err(driver_err("launching dequant_f16"))?;
            // Column-major view: C[rows x n] (ldc = w.rows, from row r0) = A^T B with
            // A = the slice [cols x rows] (ld cols), B = x16 [cols x n] (ld cols).
            let c = y + (r0 * 4) as u64;
            // SAFETY: every pointer is a live device buffer on the handle's stream with the
            // extents given (A: rows * cols halves, B: n * cols halves, C: n columns of
            // w.rows floats starting at row r0); alpha and beta are host f32 (pointer mode
            // host, the default) as the f32 compute type requires.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *blas.handle(),
                    cublasOperation_t::CUBLAS_OP_T,
                    cublasOperation_t::CUBLAS_OP_N,
                    rows as i32,
                    n as i32,
                    cols as i32,
                    (&alpha as *const f32).cast(),
                    w16p as *const std::ffi::c_void,
                    cudaDataType::CUDA_R_16F,
                    cols as i32,
                    x16p as *const std::ffi::c_void,
                    cudaDataType::CUDA_R_16F,
                    cols as i32,
                    (&beta as *const f32).cast(),
                    c as *mut std::ffi::c_void,
                    cudaDataType::CUDA_R_32F,
                    w.rows as i32,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
                )
            }
            .map_err(|e| CudaError::Driver {
                what: "cuBLAS gemm".into(),
                detail: format!("{e:?}"),
            })?;
        }
        Ok(())
    }

    /// `y = x · Wᵀ` for `n` host activation rows by `path`: `x` is `n × w.cols`, the result
    /// `n × w.rows` (row-major, as the CPU backend's `matmul`). Synchronous: returns when the
    /// result is on the host.
    pub fn matmul(
        &self,
        path: MatPath,
        w: &DeviceMatrix,
        x: &[f32],
        n: usize,
    ) -> Result<Vec<f32>, CudaError> {
        self.matmul_sliced(path, w, x, n, 0)
    }

    /// [`Device::matmul`] with the gemm path's weights dequantized `slice_elems` elements at a
    /// time (0: the default), so a check can make one matrix take several slices.
    pub fn matmul_sliced(
        &self,
        path: MatPath,
        w: &DeviceMatrix,
        x: &[f32],
        n: usize,
        slice_elems: usize,
    ) -> Result<Vec<f32>, CudaError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        if x.len() != n * w.cols {
            return Err(CudaError::Invalid(format!(
                "matmul: {n} rows of {} take {} values, got {}",
                w.cols,
                n * w.cols,
                x.len()
            )));
        }
        let dx = self
            .stream
            .clone_htod(x)
            .map_err(driver_err("uploading activations"))?;
        let dy = self
            .stream
            .alloc_zeros::<f32>(n * w.rows)
            .map_err(driver_err("allocating the output"))?;
        let mut work = MatWork {
            slice_elems,
            ..MatWork::default()
        };
        work.reserve(self, path == MatPath::Gemm, n, w.cols, w.rows)?;
        let (xp, yp) = (ptr(&self.stream, &dx), ptr(&self.stream, &dy));
        let q = match path {
            MatPath::Mmvq => Some(self.quantize(xp, n, w.cols, &work)?),
            _ => None,
        };
        self.matmul_async(path, w, xp, q, yp, n, &work)?;
        self.stream
            .clone_dtoh(&dy)
            .map_err(driver_err("reading the result back"))
    }
}
