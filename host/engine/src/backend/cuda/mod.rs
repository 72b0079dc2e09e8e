//! The CUDA device (cargo feature `cuda`): opening a GPU without ever panicking, compiling the
//! kernels in `kernels/cuda/` with NVRTC for the device's own architecture (CUBIN, cached on
//! disk), uploading quantized weights once, and the kernels the backend will be built from.
//!
//! # Start-up never fails the process
//! `cudarc` loads `libcuda`, `libnvrtc` and `libcublas` at run time and *panics* when a library
//! or one of its symbols is missing. [`Device::open`] therefore checks each library's presence
//! first and runs every first touch of the driver inside `catch_unwind`: a machine without a GPU,
//! without a driver or with an older one gets a [`CudaError::Unavailable`] that says why, and the
//! caller falls back to the CPU.
//!
//! # Kernels
//! The CUDA C sources are embedded in the binary (`include_str!`) and compiled on first use by
//! NVRTC straight to a CUBIN for the device's compute capability (`nvrtcGetCUBIN`: no PTX JIT
//! in the driver at load time). The CUBIN is cached under the kernel cache directory, keyed by a
//! hash of the source, the compile options, the architecture, the NVRTC version and the driver
//! version, so a second start loads it in well under a millisecond instead of compiling again.
//! The sources include no headers (NVRTC finds none by itself).

mod check;
mod exec;
mod matmul;

pub use exec::{CudaBackend, CudaKv};
pub use matmul::{GEMM_MIN_ROWS, MMVQ_TYPES, MatPath};

pub use check::{CheckRow, TOLERANCE, check_kernels};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream};

use crate::quant::GgmlType;

/// `kernels/cuda/common.cuh`: types, f16 conversions and block loads every kernel file uses,
/// prepended to each before compiling ([`kernel_source`]).
pub const COMMON_SRC: &str = include_str!("../../../../../kernels/cuda/common.cuh");
/// `kernels/cuda/matvec.cu`: every tensor type's matrix × activation-rows kernel.
pub const MATVEC_SRC: &str = include_str!("../../../../../kernels/cuda/matvec.cu");
/// The other ops of a forward pass (norms, RoPE, KV store, attention, ...).
pub const OPS_SRC: &str = include_str!("../../../../../kernels/cuda/ops.cu");
/// The int8 mat-vec kernels of decode and their activation quantizer.
pub const MMVQ_SRC: &str = include_str!("../../../../../kernels/cuda/mmvq.cu");
/// Every kernel file, by name.
pub const KERNELS: &[(&str, &str)] =
    &[("matvec", MATVEC_SRC), ("ops", OPS_SRC), ("mmvq", MMVQ_SRC)];
/// Names of the kernels in ops.cu.
const OPS_FNS: &[&str] = &[
    "rms_norm",
    "scale",
    "add",
    "add_bias",
    "glu_silu",
    "glu_gelu",
    "rope",
    "store_kv",
    "attention",
    "attention_warps",
    "gather_rows",
];

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No usable GPU: no driver library, no device, a driver too old for the CUDA version the
    /// binary was built against, or the device's start-up failed. The CPU backend takes over.
    #[error("CUDA is not available: {0}")]
    Unavailable(String),
    #[error("CUDA driver error during {what}: {detail}")]
    Driver { what: String, detail: String },
    #[error("NVRTC could not compile {name} for sm_{arch}: {log}")]
    Compile {
        name: String,
        arch: u32,
        log: String,
    },
    #[error("kernel cache {}: {detail}", path.display())]
    Cache { path: PathBuf, detail: String },
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn driver_err(
    what: impl Into<String>,
) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError {
    let what = what.into();
    move |e| CudaError::Driver {
        what,
        detail: e.to_string(),
    }
}

/// What `realm gpu info` prints about a device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability, e.g. (9, 0) for an H100.
    pub compute_capability: (i32, i32),
    pub total_bytes: usize,
    pub free_bytes: usize,
    /// The driver's CUDA version, e.g. 13000 for 13.0.
    pub driver_version: i32,
    /// NVRTC's (major, minor).
    pub nvrtc_version: (i32, i32),
}

impl DeviceInfo {
    /// `sm_XY` as an integer (90 for compute capability 9.0).
    pub fn arch(&self) -> u32 {
        (self.compute_capability.0 * 10 + self.compute_capability.1) as u32
    }
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const GIB: f64 = (1u64 << 30) as f64;
        write!(
            f,
            "cuda:{} {} (sm_{}), {:.1} GiB free of {:.1} GiB, driver CUDA {}.{}, NVRTC {}.{}",
            self.ordinal,
            self.name,
            self.arch(),
            self.free_bytes as f64 / GIB,
            self.total_bytes as f64 / GIB,
            self.driver_version / 1000,
            self.driver_version % 1000 / 10,
            self.nvrtc_version.0,
            self.nvrtc_version.1,
        )
    }
}

/// Runs `f`, turning a panic (cudarc's answer to a missing library or symbol) into
/// [`CudaError::Unavailable`].
fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T, CudaError>) -> Result<T, CudaError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            Err(CudaError::Unavailable(format!("{what} panicked: {msg}")))
        }
    }
}

/// Checks that NVRTC (the kernel compiler) can be loaded, without touching anything that panics
/// when it cannot.
pub fn nvrtc_present() -> Result<(), CudaError> {
    // SAFETY: `is_culib_present` only tries to dlopen the library under its known names and
    // reports whether one loaded; it calls nothing in it.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::Unavailable(
            "no NVRTC library (libnvrtc.so.13: the CUDA toolkit's, or the nvidia-cuda-nvrtc \
             Python package's) on this machine"
                .into(),
        ))
    }
}

/// Checks that the driver library and NVRTC can be loaded.
pub fn libraries_present() -> Result<(), CudaError> {
    // SAFETY: as in `nvrtc_present`.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::Unavailable(
            "no CUDA driver library (libcuda.so) on this machine".into(),
        ));
    }
    nvrtc_present()
}

/// NVRTC's version.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    nvrtc_present()?;
    no_panic("NVRTC", || {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: both pointers are valid for writes; nvrtcVersion only writes them.
        let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(CudaError::Unavailable(format!(
                "nvrtcVersion failed: {r:?}"
            )));
        }
        Ok((major, minor))
    })
}

/// Number of CUDA devices (0 when there is no usable driver).
pub fn device_count() -> Result<usize, CudaError> {
    libraries_present()?;
    no_panic("the CUDA driver", || {
        CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .map_err(|e| CudaError::Unavailable(format!("the CUDA driver: {e}")))
    })
}

/// The default kernel cache directory: `$REALM_CUDA_CACHE`, else `$XDG_CACHE_HOME/realm/cuda`,
/// else `~/.cache/realm/cuda`; `None` when none of them can be named (then nothing is cached).
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("REALM_CUDA_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("realm/cuda"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/realm/cuda"))
}

/// 64-bit FNV-1a: a stable hash for cache keys (std's hasher may change between releases).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(&[0xff]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// NVRTC options for every kernel (besides the architecture).
const NVRTC_OPTIONS: &[&str] = &["--std=c++17", "-default-device"];

/// What NVRTC compiles for a kernel file: [`COMMON_SRC`], then the file.
pub fn kernel_source(src: &str) -> String {
    format!("{COMMON_SRC}\n{src}")
}

/// Compiles kernel file `src` (with [`COMMON_SRC`] prepended) to a CUBIN for `sm_{arch}` with
/// NVRTC. Works without a GPU (only NVRTC is needed): CI compiles every kernel this way.
pub fn compile_cubin(name: &str, src: &str, arch: u32) -> Result<Vec<u8>, CudaError> {
    let src = kernel_source(src);
    use cudarc::nvrtc::{result, sys};
    nvrtc_present()?;
    let fail = |log: String| CudaError::Compile {
        name: name.to_string(),
        arch,
        log,
    };
    no_panic("NVRTC", || {
        let csrc =
            std::ffi::CString::new(src).map_err(|_| fail("NUL byte in the source".into()))?;
        let cname =
            std::ffi::CString::new(name).map_err(|_| fail("NUL byte in the name".into()))?;
        let prog = result::create_program(&csrc, Some(&cname))
            .map_err(|e| fail(format!("nvrtcCreateProgram: {e:?}")))?;
        let mut opts: Vec<String> = NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect();
        opts.push(format!("--gpu-architecture=sm_{arch}"));
        // SAFETY: `prog` is a live program created above and destroyed below, once, after its
        // last use; every pointer passed to NVRTC points into a buffer of the size it asked for.
        unsafe {
            let compiled = result::compile_program(prog, &opts);
            let log = result::get_program_log(prog)
                .map(|l| {
                    let bytes: Vec<u8> =
                        l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
                    String::from_utf8_lossy(&bytes).trim().to_string()
                })
                .unwrap_or_default();
            let out = match compiled {
                Err(e) => Err(fail(if log.is_empty() {
                    format!("{e:?}")
                } else {
                    log
                })),
                Ok(()) => {
                    let mut size = 0usize;
                    let r = sys::nvrtcGetCUBINSize(prog, &mut size);
                    if r != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
                        Err(fail(format!("nvrtcGetCUBINSize: {r:?}")))
                    } else {
                        let mut cubin = vec![0u8; size];
                        let r = sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast());
                        if r == sys::nvrtcResult::NVRTC_SUCCESS {
                            Ok(cubin)
                        } else {
                            Err(fail(format!("nvrtcGetCUBIN: {r:?}")))
                        }
                    }
                }
            };
            let _ = result::destroy_program(prog);
            out
        }
    })
}

/// A compiled kernel file: from the cache when an entry with the same key exists, else compiled
/// and stored. Returns the CUBIN and whether it came from the cache.
fn cached_cubin(
    cache: Option<&Path>,
    name: &str,
    src: &str,
    info: &DeviceInfo,
) -> Result<(Vec<u8>, bool), CudaError> {
    let arch = info.arch();
    let key = fnv1a(&[
        COMMON_SRC.as_bytes(),
        src.as_bytes(),
        NVRTC_OPTIONS.join(" ").as_bytes(),
        &arch.to_le_bytes(),
        &info.nvrtc_version.0.to_le_bytes(),
        &info.nvrtc_version.1.to_le_bytes(),
        &info.driver_version.to_le_bytes(),
    ]);
    let file = cache.map(|d| d.join(format!("{name}-sm_{arch}-{key:016x}.cubin")));
    if let Some(f) = &file
        && let Ok(bytes) = std::fs::read(f)
        && !bytes.is_empty()
    {
        return Ok((bytes, true));
    }
    let cubin = compile_cubin(name, src, arch)?;
    if let (Some(dir), Some(f)) = (cache, &file) {
        // Written under a temporary name and renamed: a concurrent start never reads half a file.
        let tmp = f.with_extension(format!("tmp{}", std::process::id()));
        let io = |e: std::io::Error| CudaError::Cache {
            path: dir.to_path_buf(),
            detail: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::write(&tmp, &cubin).map_err(io)?;
        std::fs::rename(&tmp, f).map_err(io)?;
    }
    Ok((cubin, false))
}

/// An open GPU: its context, one stream, and the loaded kernels.
pub struct Device {
    info: DeviceInfo,
    ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    /// Every loaded kernel file, kept alive for its functions.
    _modules: Vec<Arc<CudaModule>>,
    /// `matvec_*` per [`GgmlType::index`].
    pub(crate) matvec_fns: Vec<Option<CudaFunction>>,
    /// `get_rows_*` (embedding lookup) per [`GgmlType::index`].
    pub(crate) get_rows_fns: Vec<Option<CudaFunction>>,
    /// `dequant_f16_*` (the gemm path's weight slices) per [`GgmlType::index`].
    pub(crate) dequant_fns: Vec<Option<CudaFunction>>,
    /// `mmvq_*` for the types of [`MMVQ_TYPES`], per [`GgmlType::index`].
    pub(crate) mmvq_fns: Vec<Option<CudaFunction>>,
    pub(crate) quantize_q8: CudaFunction,
    pub(crate) to_f16: CudaFunction,
    /// cuBLAS, when its library loads (else prefill products use the mat-vec kernels).
    pub(crate) blas: Option<cudarc::cublas::CudaBlas>,
    /// Why there is no cuBLAS, for `realm gpu info`.
    pub blas_note: Option<String>,
    /// The kernels of ops.cu by name.
    pub(crate) ops: std::collections::HashMap<&'static str, CudaFunction>,
    /// Whether the kernels came from the disk cache (else they were compiled now).
    pub kernels_cached: bool,
    /// The fast kernel set (`REALM_CUDA_KERNELS=fast`: int8 mat-vec, cuBLAS prefill, CUDA
    /// graphs, warp-per-key attention) rather than the reference set (see matmul.rs).
    pub fast: bool,
}

/// The kernel set `REALM_CUDA_KERNELS` asks for: `reference` (default) or `fast`.
pub fn fast_kernels_requested() -> Result<bool, CudaError> {
    match std::env::var("REALM_CUDA_KERNELS").as_deref() {
        Err(_) | Ok("") | Ok("reference") => Ok(false),
        Ok("fast") => Ok(true),
        Ok(other) => Err(CudaError::Invalid(format!(
            "REALM_CUDA_KERNELS={other:?}: expected `reference` (the default) or `fast`"
        ))),
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Kernel-name suffix of a type.
fn type_suffix(ty: GgmlType) -> String {
    ty.name().to_ascii_lowercase()
}

impl Device {
    /// Opens device `ordinal`, compiling (or loading from `cache`) its kernels.
    pub fn open(ordinal: usize, cache: Option<&Path>) -> Result<Device, CudaError> {
        libraries_present()?;
        let fast = fast_kernels_requested()?;
        let nvrtc_version = nvrtc_version()?;
        no_panic("CUDA start-up", || {
            let n = CudaContext::device_count()
                .map_err(|e| CudaError::Unavailable(format!("the CUDA driver: {e}")))?;
            if n <= 0 {
                return Err(CudaError::Unavailable(
                    "the driver reports no CUDA device".into(),
                ));
            }
            if ordinal >= n as usize {
                return Err(CudaError::Unavailable(format!(
                    "no CUDA device {ordinal} (this machine has {n})"
                )));
            }
            let ctx = CudaContext::new(ordinal).map_err(|e| {
                CudaError::Unavailable(format!("opening CUDA device {ordinal}: {e}"))
            })?;
            let mut driver_version = 0;
            // SAFETY: the pointer is valid for one write; the driver library is loaded (the
            // context above exists).
            unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) };
            let (free_bytes, total_bytes) =
                ctx.mem_get_info().map_err(driver_err("cuMemGetInfo"))?;
            let info = DeviceInfo {
                ordinal,
                name: ctx.name().map_err(driver_err("cuDeviceGetName"))?,
                compute_capability: ctx
                    .compute_capability()
                    .map_err(driver_err("reading the compute capability"))?,
                total_bytes,
                free_bytes,
                driver_version,
                nvrtc_version,
            };
            let mut kernels_cached = true;
            let mut modules = Vec::new();
            for (name, src) in KERNELS {
                let (cubin, cached) = cached_cubin(cache, name, src, &info)?;
                kernels_cached &= cached;
                modules.push(
                    ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
                        .map_err(driver_err(format!("loading the {name} kernels")))?,
                );
            }
            let load = |m: &Arc<CudaModule>, f: &str| {
                m.load_function(f)
                    .map_err(driver_err(format!("loading kernel {f}")))
            };
            let mut matvec_fns = vec![None; GgmlType::ALL.len()];
            let mut get_rows_fns = vec![None; GgmlType::ALL.len()];
            let mut dequant_fns = vec![None; GgmlType::ALL.len()];
            let mut mmvq_fns = vec![None; GgmlType::ALL.len()];
            for ty in GgmlType::ALL {
                let t = type_suffix(ty);
                matvec_fns[ty.index()] = Some(load(&modules[0], &format!("matvec_{t}"))?);
                get_rows_fns[ty.index()] = Some(load(&modules[0], &format!("get_rows_{t}"))?);
                dequant_fns[ty.index()] = Some(load(&modules[0], &format!("dequant_f16_{t}"))?);
            }
            for &ty in MMVQ_TYPES {
                mmvq_fns[ty.index()] =
                    Some(load(&modules[2], &format!("mmvq_{}", type_suffix(ty)))?);
            }
            let mut ops = std::collections::HashMap::new();
            for f in OPS_FNS {
                ops.insert(*f, load(&modules[1], f)?);
            }
            // SAFETY: every buffer of a device backend is used on its one stream, in order, so
            // cudarc's cross-stream events are not needed (and they would stop graph capture).
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.new_stream().map_err(driver_err("creating a stream"))?;
            // SAFETY: as in `nvrtc_present`: only tries to dlopen the library.
            let (blas, blas_note) = if unsafe { cudarc::cublas::sys::is_culib_present() } {
                match no_panic("cuBLAS", || {
                    cudarc::cublas::CudaBlas::new(stream.clone())
                        .map_err(|e| CudaError::Unavailable(format!("cuBLAS: {e:?}")))
                }) {
                    Ok(b) => (Some(b), None),
                    Err(e) => (None, Some(e.to_string())),
                }
            } else {
                (
                    None,
                    Some("no cuBLAS library (libcublas.so.13) on this machine".into()),
                )
            };
            Ok(Device {
                info,
                ctx,
                stream,
                quantize_q8: load(&modules[2], "quantize_q8")?,
                to_f16: load(&modules[0], "to_f16")?,
                _modules: modules,
                matvec_fns,
                get_rows_fns,
                dequant_fns,
                mmvq_fns,
                blas,
                blas_note,
                ops,
                kernels_cached,
                fast,
            })
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Device memory (free, total) now.
    pub fn mem_info(&self) -> Result<(usize, usize), CudaError> {
        self.ctx.mem_get_info().map_err(driver_err("cuMemGetInfo"))
    }

    /// Uploads a weight matrix of `rows` rows × `cols` elements, kept in its block format.
    pub fn upload_matrix(
        &self,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &[u8],
    ) -> Result<DeviceMatrix, CudaError> {
        let row_bytes = ty.row_bytes(cols).ok_or_else(|| {
            CudaError::Invalid(format!(
                "{ty}: {cols} columns is not a multiple of the block size {}",
                ty.block_size()
            ))
        })?;
        if !cols.is_multiple_of(16) {
            return Err(CudaError::Invalid(format!(
                "{ty}: the GPU kernels take rows of a multiple of 16 elements, not {cols}"
            )));
        }
        if data.len() != rows * row_bytes {
            return Err(CudaError::Invalid(format!(
                "{ty}: {rows} x {cols} takes {} bytes, got {}",
                rows * row_bytes,
                data.len()
            )));
        }
        let buf = self
            .stream
            .clone_htod(data)
            .map_err(driver_err(format!("uploading {} bytes", data.len())))?;
        Ok(DeviceMatrix {
            ty,
            rows,
            cols,
            row_bytes,
            buf,
        })
    }
}

/// A weight matrix in device memory, in its GGUF block format.
pub struct DeviceMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub(crate) row_bytes: usize,
    pub(crate) buf: CudaSlice<u8>,
}

impl DeviceMatrix {
    pub fn bytes(&self) -> usize {
        self.rows * self.row_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_changes_with_every_input() {
        let a = fnv1a(&[b"src", b"opt"]);
        assert_ne!(a, fnv1a(&[b"src", b"opt2"]));
        assert_ne!(
            a,
            fnv1a(&[b"sr", b"copt"]),
            "part boundaries are part of the key"
        );
        assert_eq!(a, fnv1a(&[b"src", b"opt"]));
    }

    /// On a machine without CUDA (CI), opening a device is an error, never a panic.
    #[test]
    fn open_without_a_gpu_is_an_error_not_a_panic() {
        match Device::open(0, None) {
            Ok(d) => eprintln!("a GPU is present: {}", d.info()),
            Err(e) => eprintln!("as expected without a GPU: {e}"),
        }
        let _ = device_count();
    }

    /// Every kernel file compiles with NVRTC for sm_90 (skipped, saying so, without NVRTC).
    #[test]
    fn kernels_compile_with_nvrtc() {
        if let Err(e) = nvrtc_present() {
            eprintln!("skipped: {e} (scripts/nvrtc.sh installs one)");
            return;
        }
        for (name, src) in KERNELS {
            let cubin = compile_cubin(name, src, 90).unwrap_or_else(|e| panic!("{name}.cu: {e}"));
            assert_eq!(&cubin[..4], b"\x7fELF", "a CUBIN is an ELF image");
        }
    }
}
