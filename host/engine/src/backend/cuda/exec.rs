//! The CUDA backend: runs a model's [`Graph`] on one GPU.
//!
//! Weights are uploaded once, in their GGUF block format ([`CudaBackend::load_weights`]); KV
//! pages are f16 in device memory ([`CudaKv`]); activations live in an arena of device buffers
//! sized by the largest batch seen, so their addresses do not change from pass to pass. A pass
//! uploads its small description (token ids, positions, page tables, RoPE tables, wanted rows),
//! launches one kernel per op on the device's stream, and reads back the logits.
//!
//! This is the correctness-first executor: each op is one kernel of `kernels/cuda/*.cu`, the
//! products are `matvec.cu` (8 activation rows per launch). Fusion, CUDA graphs and fast
//! kernels are issue 14's, on top of the same graphs.

use std::any::Any;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::{CudaError, Device, DeviceMatrix, MATVEC_WARPS, MAX_NV};
use crate::backend::{Backend, BackendError};
use crate::graph::{Activation, Graph, Op, OpHook, Pass, Weight, WeightSet};
use crate::kv::{KvError, KvLayout, KvStorage};

/// Threads of the attention kernel (`ATTN_TILE` in ops.cu) and the largest head it takes.
const ATTN_TILE: u32 = 128;
const MAX_HEAD_DIM: usize = 512;

fn dev_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> BackendError + '_ {
    move |e| BackendError::Device(format!("CUDA {what}: {e}"))
}

/// A weight in device memory.
enum DeviceWeight {
    Matrix(DeviceMatrix),
    Vector(CudaSlice<f32>),
}

/// Device buffers reused across passes (grown, never shrunk).
#[derive(Default)]
struct Scratch {
    /// One per graph buffer.
    bufs: Vec<Option<CudaSlice<f32>>>,
    /// Token ids `[n]`.
    tokens: Option<CudaSlice<u32>>,
    /// Position of each row `[n]`.
    pos: Option<CudaSlice<i32>>,
    /// Offset of each row's page table in `pages` `[n]`.
    page_off: Option<CudaSlice<u32>>,
    /// Every sequence's page table, concatenated.
    pages: Option<CudaSlice<u32>>,
    /// Rows that want logits `[n_out]`.
    out_rows: Option<CudaSlice<u32>>,
    /// Per RoPE of the graph: `[n][n_dims / 2][2]` (cos, sin).
    rope: Vec<Option<CudaSlice<f32>>>,
}

/// Makes `slot` hold at least `len` elements and copies `data` to its start.
fn upload<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &mut Option<CudaSlice<T>>,
    data: &[T],
) -> Result<(), BackendError> {
    grow(stream, slot, data.len().max(1))?;
    if !data.is_empty() {
        let buf = slot.as_mut().expect("grown");
        stream
            .memcpy_htod(data, &mut buf.slice_mut(..data.len()))
            .map_err(dev_err("upload of a pass's inputs"))?;
    }
    Ok(())
}

fn grow<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<(), BackendError> {
    if slot.as_ref().is_none_or(|b| b.len() < len) {
        *slot = None; // free the old one first
        *slot = Some(
            stream
                .alloc_zeros::<T>(len)
                .map_err(dev_err("allocation of activation memory"))?,
        );
    }
    Ok(())
}

fn ptr<T>(stream: &CudaStream, b: &CudaSlice<T>) -> CUdeviceptr {
    // Event tracking is off (Device::open), so the guard does nothing when dropped.
    b.device_ptr(stream).0
}

pub struct CudaBackend {
    dev: Device,
    weights: Vec<DeviceWeight>,
    scratch: Mutex<Scratch>,
}

impl CudaBackend {
    /// Opens GPU `ordinal` (kernels from the cache at `cache`, compiled on a miss).
    pub fn open(ordinal: usize, cache: Option<&std::path::Path>) -> Result<Self, CudaError> {
        Ok(CudaBackend {
            dev: Device::open(ordinal, cache)?,
            weights: Vec::new(),
            scratch: Mutex::new(Scratch::default()),
        })
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }
}

/// Launches kernel `$name` of ops.cu with `$cfg` and the given arguments.
macro_rules! launch {
    ($self:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let f = &$self.dev.ops[$name];
        let mut b = $self.dev.stream.launch_builder(f);
        $( b.arg($arg); )+
        // SAFETY: each call site passes exactly the arguments of the named kernel in ops.cu
        // (device pointers as u64, sizes as i32/u64, scalars as f32), and sizes its grid so
        // that every index the kernel touches lies inside the buffers it was given: activation
        // buffers hold `rows * width` values of their graph buffer, KV buffers every slot of
        // the pool, and the pass's tables one entry per row.
        unsafe { b.launch($cfg) }
            .map_err(|e| BackendError::Device(format!("CUDA launch of {}: {e}", $name)))
    }};
}

fn grid1(n: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn blocks(n: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// f16 KV pages in device memory: per layer, keys and values `[n_pages * page_size, kv_dim]`.
pub struct CudaKv {
    layout: KvLayout,
    keys: Vec<CudaSlice<u16>>,
    values: Vec<CudaSlice<u16>>,
    stream: Arc<CudaStream>,
}

impl KvStorage for CudaKv {
    fn copy_page(&mut self, from: u32, to: u32) -> Result<(), KvError> {
        let n = self.layout.page_size * self.layout.kv_dim;
        let bytes = n * std::mem::size_of::<u16>();
        let (from, to) = (from as usize * bytes, to as usize * bytes);
        for buf in self.keys.iter().chain(&self.values) {
            let base = ptr(&self.stream, buf);
            // SAFETY: both pages lie inside `buf` (page numbers come from the pool, which has
            // `n_pages` pages of `n` elements per layer) and do not overlap (from != to: a page
            // is copied into a free one); the copy is ordered on the stream every pass uses.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    base + to as u64,
                    base + from as u64,
                    bytes,
                    self.stream.cu_stream(),
                )
            }
            .map_err(|e| KvError::Device(format!("CUDA page copy: {e}")))?;
        }
        Ok(())
    }

    fn bytes(&self) -> usize {
        2 * self.layout.n_layers * self.layout.layer_elems() * std::mem::size_of::<u16>()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn load_weights(&mut self, weights: Arc<WeightSet>) -> Result<(), BackendError> {
        let need: usize = weights
            .iter()
            .map(|(_, _, w)| match w {
                Weight::Matrix(t) => t.data().len(),
                Weight::Vector(v) => 4 * v.len(),
            })
            .sum();
        let (free, total) = self
            .dev
            .mem_info()
            .map_err(|e| BackendError::Device(e.to_string()))?;
        if need > free {
            return Err(BackendError::Device(format!(
                "the model's weights need {:.2} GiB of GPU memory; {:.2} GiB of {:.2} GiB is free",
                need as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            )));
        }
        let mut out = Vec::with_capacity(weights.len());
        for (_, name, w) in weights.iter() {
            out.push(match w {
                Weight::Matrix(t) => DeviceWeight::Matrix(
                    self.dev
                        .upload_matrix(t.ty, t.n_rows(), t.row_len(), t.data())
                        .map_err(|e| BackendError::Device(format!("{name}: {e}")))?,
                ),
                Weight::Vector(v) => DeviceWeight::Vector(
                    self.dev
                        .stream
                        .clone_htod(v)
                        .map_err(dev_err("upload of a weight"))?,
                ),
            });
        }
        self.dev
            .stream
            .synchronize()
            .map_err(dev_err("weight upload"))?;
        self.weights = out;
        Ok(())
    }

    fn new_kv(&self, layout: KvLayout) -> Result<Box<dyn KvStorage>, BackendError> {
        let bytes = 2 * layout.n_layers * layout.layer_elems() * 2;
        let (free, _) = self
            .dev
            .mem_info()
            .map_err(|e| BackendError::Device(e.to_string()))?;
        if bytes > free {
            return Err(BackendError::Device(format!(
                "a KV pool of {} pages needs {:.2} GiB of GPU memory; {:.2} GiB is free",
                layout.n_pages,
                bytes as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64
            )));
        }
        let alloc = || {
            self.dev
                .stream
                .alloc_zeros::<u16>(layout.layer_elems())
                .map_err(dev_err("allocation of KV pages"))
        };
        let keys = (0..layout.n_layers)
            .map(|_| alloc())
            .collect::<Result<_, _>>()?;
        let values = (0..layout.n_layers)
            .map(|_| alloc())
            .collect::<Result<_, _>>()?;
        Ok(Box::new(CudaKv {
            layout,
            keys,
            values,
            stream: self.dev.stream.clone(),
        }))
    }

    fn execute(
        &self,
        graph: &Graph,
        pass: &Pass<'_>,
        kv: &mut dyn KvStorage,
        mut hook: Option<&mut dyn OpHook>,
    ) -> Result<Vec<f32>, BackendError> {
        if self.weights.is_empty() {
            return Err(BackendError::NotLoaded("cuda"));
        }
        let kv: &mut CudaKv = crate::backend::own_kv(kv, "cuda")?;
        let stream = &self.dev.stream;
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        let (n, n_out) = (pass.len(), pass.out_rows.len());

        // The pass's description.
        s.bufs.resize_with(graph.bufs.len(), || None);
        for (i, d) in graph.bufs.iter().enumerate() {
            grow(
                stream,
                &mut s.bufs[i],
                (d.rows_in(n, n_out) * d.width).max(1),
            )?;
        }
        upload(stream, &mut s.tokens, &pass.tokens)?;
        let pos: Vec<i32> = pass.pos.iter().map(|&p| p as i32).collect();
        upload(stream, &mut s.pos, &pos)?;
        let mut pages = Vec::new();
        let mut page_off = vec![0u32; n];
        for q in &pass.seqs {
            let off = pages.len() as u32;
            pages.extend_from_slice(q.pages);
            page_off[q.start..q.start + q.len].fill(off);
        }
        upload(stream, &mut s.pages, &pages)?;
        upload(stream, &mut s.page_off, &page_off)?;
        let out_rows: Vec<u32> = pass.out_rows.iter().map(|&r| r as u32).collect();
        upload(stream, &mut s.out_rows, &out_rows)?;
        s.rope.resize_with(graph.ropes.len(), || None);
        for (i, r) in graph.ropes.iter().enumerate() {
            let mut table = Vec::with_capacity(n * r.n_dims);
            for &p in &pass.pos {
                for (c, sn) in r.table(p) {
                    table.push(c);
                    table.push(sn);
                }
            }
            upload(stream, &mut s.rope[i], &table)?;
        }

        let buf = |b: crate::graph::Buf| ptr(stream, s.bufs[b.index()].as_ref().expect("sized"));
        let rows_of = |b: crate::graph::Buf| graph.rows(b, n, n_out);
        let width = |b: crate::graph::Buf| graph.buf(b).width;
        let matrix = |w: crate::graph::WeightId| match &self.weights[w.index()] {
            DeviceWeight::Matrix(m) => m,
            DeviceWeight::Vector(_) => unreachable!("the graph builder checked the kinds"),
        };
        let vector = |w: crate::graph::WeightId| match &self.weights[w.index()] {
            DeviceWeight::Vector(v) => v,
            DeviceWeight::Matrix(_) => unreachable!("the graph builder checked the kinds"),
        };
        let (tokens, pos_p, pages_p, off_p, out_p) = (
            ptr(stream, s.tokens.as_ref().expect("uploaded")),
            ptr(stream, s.pos.as_ref().expect("uploaded")),
            ptr(stream, s.pages.as_ref().expect("uploaded")),
            ptr(stream, s.page_off.as_ref().expect("uploaded")),
            ptr(stream, s.out_rows.as_ref().expect("uploaded")),
        );
        let page_size = pass.page_size as i32;

        for node in &graph.nodes {
            let rows = rows_of(node.op.rows_of());
            if rows == 0 {
                continue;
            }
            match &node.op {
                Op::Embed { table, out } => {
                    let m = matrix(*table);
                    let f = self.dev.get_rows_fns[m.ty.index()]
                        .as_ref()
                        .expect("loaded");
                    let (w, rb, o, cols) = (
                        ptr(stream, &m.buf),
                        m.row_bytes as u64,
                        buf(*out),
                        m.cols as i32,
                    );
                    let mut b = stream.launch_builder(f);
                    b.arg(&w).arg(&rb).arg(&tokens).arg(&o).arg(&cols);
                    // SAFETY: get_rows_<type>(w, row_bytes, ids, out, ncols): one block per
                    // token, each reading one row of the table (token ids were checked against
                    // the vocabulary) and writing one row of `out` ([n, ncols]).
                    unsafe { b.launch(blocks(n as u32, 128)) }
                        .map_err(dev_err("launch of get_rows"))?;
                }
                Op::Scale { x, by } => {
                    let (p, len) = (buf(*x), (rows * width(*x)) as u64);
                    launch!(self, "scale", grid1(len), &p, by, &len)?;
                }
                Op::RmsNorm {
                    x,
                    weight,
                    eps,
                    out,
                } => {
                    let w = vector(*weight);
                    let len = w.len() as i32;
                    let chunks = (rows * width(*x)) as u32 / len as u32;
                    let (xp, wp, op) = (buf(*x), ptr(stream, w), buf(*out));
                    launch!(
                        self,
                        "rms_norm",
                        blocks(chunks, 256),
                        &xp,
                        &wp,
                        &op,
                        &len,
                        eps
                    )?;
                }
                Op::MatMul { x, outs } => {
                    let xp = buf(*x);
                    for (w, out) in outs {
                        let m = matrix(*w);
                        let f = self.dev.matvec_fns[m.ty.index()].as_ref().expect("loaded");
                        let (wp, rb, yp) = (ptr(stream, &m.buf), m.row_bytes as u64, buf(*out));
                        let (ncols, nrows) = (m.cols as i32, m.rows as i32);
                        let cfg = LaunchConfig {
                            grid_dim: ((m.rows as u32).div_ceil(MATVEC_WARPS), 1, 1),
                            block_dim: (32 * MATVEC_WARPS, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        for v0 in (0..rows).step_by(MAX_NV) {
                            let nv = (rows - v0).min(MAX_NV) as i32;
                            let xs = xp + (v0 * m.cols * 4) as u64;
                            let ys = yp + (v0 * m.rows * 4) as u64;
                            let mut b = stream.launch_builder(f);
                            b.arg(&wp)
                                .arg(&rb)
                                .arg(&xs)
                                .arg(&ys)
                                .arg(&ncols)
                                .arg(&nrows)
                                .arg(&nv);
                            // SAFETY: matvec_<type>(w, row_bytes, x, y, ncols, nrows, nvec):
                            // reads `nrows` weight rows and `nv` rows of x (rows v0.. of the
                            // [rows, ncols] input), writes `nv` rows of y ([rows, nrows]).
                            unsafe { b.launch(cfg) }.map_err(dev_err("launch of matvec"))?;
                        }
                    }
                }
                Op::AddBias { x, bias } => {
                    let (p, bp, w, len) = (
                        buf(*x),
                        ptr(stream, vector(*bias)),
                        width(*x) as i32,
                        (rows * width(*x)) as u64,
                    );
                    launch!(self, "add_bias", grid1(len), &p, &bp, &w, &len)?;
                }
                Op::Rope { x, rope, head_dim } => {
                    let r = graph.rope(*rope);
                    let table = ptr(stream, s.rope[rope.index()].as_ref().expect("uploaded"));
                    let (p, w, hd, nd, neox) = (
                        buf(*x),
                        width(*x) as i32,
                        *head_dim as i32,
                        r.n_dims as i32,
                        i32::from(r.neox),
                    );
                    let total = (rows * (width(*x) / head_dim) * (r.n_dims / 2)) as u64;
                    if total == 0 {
                        continue; // no rotated pairs (n_dims < 2)
                    }
                    launch!(
                        self,
                        "rope",
                        grid1(total),
                        &p,
                        &table,
                        &w,
                        &hd,
                        &nd,
                        &neox,
                        &total
                    )?;
                }
                Op::StoreKv { layer, k, v } => {
                    let (kp, vp) = (buf(*k), buf(*v));
                    let (kc, vc) = (
                        ptr(stream, &kv.keys[*layer]),
                        ptr(stream, &kv.values[*layer]),
                    );
                    let kvd = width(*k) as i32;
                    launch!(
                        self,
                        "store_kv",
                        blocks(n as u32, 256),
                        &kp,
                        &vp,
                        &kc,
                        &vc,
                        &pages_p,
                        &off_p,
                        &pos_p,
                        &page_size,
                        &kvd
                    )?;
                }
                Op::Attention {
                    layer,
                    q,
                    out,
                    params: p,
                } => {
                    if p.head_dim > MAX_HEAD_DIM {
                        return Err(BackendError::Device(format!(
                            "attention heads of {} dimensions (the CUDA kernel takes up to {MAX_HEAD_DIM})",
                            p.head_dim
                        )));
                    }
                    let (qp, op) = (buf(*q), buf(*out));
                    let (kc, vc) = (
                        ptr(stream, &kv.keys[*layer]),
                        ptr(stream, &kv.values[*layer]),
                    );
                    let (nh, nkv, hd) = (p.n_head as i32, p.n_head_kv as i32, p.head_dim as i32);
                    let window = p.window.map_or(0, |w| w as i32);
                    launch!(
                        self,
                        "attention",
                        blocks((n * p.n_head) as u32, ATTN_TILE),
                        &qp,
                        &kc,
                        &vc,
                        &op,
                        &pages_p,
                        &off_p,
                        &pos_p,
                        &page_size,
                        &nh,
                        &nkv,
                        &hd,
                        &p.scale,
                        &window
                    )?;
                }
                Op::Add { x, y } => {
                    let (xp, yp, len) = (buf(*x), buf(*y), (rows * width(*x)) as u64);
                    launch!(self, "add", grid1(len), &xp, &yp, &len)?;
                }
                Op::Glu { act, gate, up } => {
                    let (gp, up, len) = (buf(*gate), buf(*up), (rows * width(*gate)) as u64);
                    let name = match act {
                        Activation::Silu => "glu_silu",
                        Activation::GeluTanh => "glu_gelu",
                    };
                    launch!(self, name, grid1(len), &gp, &up, &len)?;
                }
                Op::GatherOut { x, out } => {
                    let (xp, op, w) = (buf(*x), buf(*out), width(*x) as i32);
                    launch!(
                        self,
                        "gather_rows",
                        blocks(n_out as u32, 256),
                        &xp,
                        &op,
                        &out_p,
                        &w
                    )?;
                }
            }
            if let Some(h) = hook.as_deref_mut() {
                for (b, name) in &node.taps {
                    let len = rows_of(*b) * width(*b);
                    let src = s.bufs[b.index()].as_ref().expect("sized");
                    let mut host = vec![0f32; len];
                    stream
                        .memcpy_dtoh(&src.slice(..len), &mut host)
                        .map_err(dev_err("read-back of a tapped tensor"))?;
                    stream.synchronize().map_err(dev_err("synchronize"))?;
                    h.tensor(name, &host, width(*b));
                }
            }
        }
        let len = n_out * width(graph.logits);
        let mut logits = vec![0f32; len];
        if len > 0 {
            let src = s.bufs[graph.logits.index()].as_ref().expect("sized");
            stream
                .memcpy_dtoh(&src.slice(..len), &mut logits)
                .map_err(dev_err("read-back of the logits"))?;
        }
        stream.synchronize().map_err(dev_err("the pass"))?;
        Ok(logits)
    }
}
