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
use cudarc::driver::{CudaGraph, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::matmul::{GEMM_MIN_ROWS, MatPath, MatWork, grow, ptr};
use super::{CudaError, Device, DeviceMatrix};
use crate::backend::{Backend, BackendError};
use crate::graph::{Activation, Graph, Op, OpHook, Pass, Weight, WeightSet};
use crate::kv::{KvError, KvLayout, KvStorage};

/// Threads of the attention kernels (`ATTN_TILE` of the reference one, `ATTN_WARPS` warps of the
/// fast one in ops.cu, which takes heads of a multiple of 64 dimensions) and the largest head
/// they take.
const ATTN_TILE: u32 = 128;
const ATTN_WARPS_THREADS: u32 = 4 * 32;
const MAX_HEAD_DIM: usize = 512;

fn dev_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> BackendError + '_ {
    move |e| BackendError::Device(format!("CUDA {what}: {e}"))
}

/// A weight in device memory.
enum DeviceWeight {
    Matrix(DeviceMatrix),
    Vector(CudaSlice<f32>),
}

/// Device buffers reused across passes (grown, never shrunk), and the CUDA graphs recorded over
/// them.
#[derive(Default)]
struct Scratch {
    /// One per graph buffer.
    bufs: Vec<Option<CudaSlice<f32>>>,
    /// The pass's description, one upload: token ids `[n]`, positions `[n]`, each row's page
    /// table offset `[n]`, wanted rows `[n_out]`, per RoPE of the graph its (cos, sin) table
    /// `[n][n_dims / 2][2]` (f32 bits), then every sequence's page table (last: its length varies
    /// while the rest's layout depends on `n` and `n_out` only).
    desc: Option<CudaSlice<u32>>,
    /// The products' scratch.
    work: MatWork,
    /// Bumped whenever a buffer above moves: recorded graphs hold addresses.
    generation: u64,
    /// Recorded decode steps.
    graphs: std::collections::HashMap<GraphKey, Recorded>,
    /// A capture failed: every pass launches op by op from then on.
    capture_failed: bool,
}

/// What a recorded graph depends on besides the model: the pass's shape, the KV pool and the
/// scratch buffers' addresses.
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
struct GraphKey {
    n: usize,
    n_out: usize,
    kv: u64,
    generation: u64,
}

/// A captured CUDA graph.
struct Recorded(CudaGraph);

// SAFETY: a CUDA graph may be used from any thread as long as calls on it are serialized; the
// backend only touches its graphs while holding the scratch mutex.
unsafe impl Send for Recorded {}

/// Decode steps of up to this many rows are recorded as CUDA graphs and replayed (a step of a
/// model launches a few hundred small kernels; a graph launches them for ~1 µs each instead of
/// ~3 µs). Larger passes are prefill, where launch costs are noise. Part of the fast kernel set
/// (`REALM_CUDA_KERNELS=fast`, see matmul.rs).
const GRAPH_MAX_ROWS: usize = GEMM_MIN_ROWS;
/// Recorded graphs kept at most (one per batch size and output count in use).
const MAX_GRAPHS: usize = 128;

/// Device addresses of a pass's buffers.
struct Addrs {
    bufs: Vec<CUdeviceptr>,
    tokens: CUdeviceptr,
    pos: CUdeviceptr,
    page_off: CUdeviceptr,
    out_rows: CUdeviceptr,
    rope: Vec<CUdeviceptr>,
    pages: CUdeviceptr,
}

/// Unique ids of KV pools (a recorded graph is tied to one pool's buffers).
static NEXT_KV_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub struct CudaBackend {
    dev: Device,
    weights: Vec<DeviceWeight>,
    scratch: Mutex<Scratch>,
    /// Whether decode steps are recorded and replayed as CUDA graphs (`REALM_CUDA_GRAPHS=0`
    /// turns it off, to measure what graphs save or to rule them out when chasing a bug).
    graphs: bool,
}

impl CudaBackend {
    /// Opens GPU `ordinal` (kernels from the cache at `cache`, compiled on a miss).
    pub fn open(ordinal: usize, cache: Option<&std::path::Path>) -> Result<Self, CudaError> {
        Ok(CudaBackend {
            dev: Device::open(ordinal, cache)?,
            weights: Vec::new(),
            scratch: Mutex::new(Scratch::default()),
            graphs: std::env::var("REALM_CUDA_GRAPHS").map_or(true, |v| v != "0"),
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
    /// Unique among the pools of this process.
    id: u64,
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
        // Recorded graphs hold the old weights' addresses.
        self.scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .graphs
            .clear();
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
            id: NEXT_KV_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
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
        hook: Option<&mut dyn OpHook>,
    ) -> Result<Vec<f32>, BackendError> {
        if self.weights.is_empty() {
            return Err(BackendError::NotLoaded("cuda"));
        }
        let kv: &mut CudaKv = crate::backend::own_kv(kv, "cuda")?;
        let stream = &self.dev.stream;
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        let (n, n_out) = (pass.len(), pass.out_rows.len());
        let dev = |e: CudaError| BackendError::Device(e.to_string());

        // Buffers for this pass's shape.
        let mut moved = false;
        s.bufs.resize_with(graph.bufs.len(), || None);
        for (i, d) in graph.bufs.iter().enumerate() {
            moved |= grow(stream, &mut s.bufs[i], d.rows_in(n, n_out) * d.width).map_err(dev)?;
        }
        // Products' scratch: per path family (gemm or not), the widest input and tallest matrix.
        let (mut max_cols, mut max_rows, mut max_n) = ([0usize; 2], [0usize; 2], [0usize; 2]);
        for node in &graph.nodes {
            if let Op::MatMul { x, outs } = &node.op {
                let rows = graph.rows(*x, n, n_out);
                for (w, _) in outs {
                    let m = self.matrix(*w);
                    let k = usize::from(self.dev.path(m.ty, rows) == MatPath::Gemm);
                    max_cols[k] = max_cols[k].max(graph.buf(*x).width);
                    max_rows[k] = max_rows[k].max(m.rows);
                    max_n[k] = max_n[k].max(rows);
                }
            }
        }
        for k in 0..2 {
            if max_cols[k] > 0 && max_n[k] > 0 {
                moved |= s
                    .work
                    .reserve(&self.dev, k == 1, max_n[k], max_cols[k], max_rows[k])
                    .map_err(dev)?;
            }
        }

        // The pass's description, one upload.
        let mut desc: Vec<u32> = Vec::with_capacity(4 * n + n_out);
        desc.extend_from_slice(&pass.tokens);
        desc.extend(pass.pos.iter().map(|&p| p as u32));
        let mut page_off = vec![0u32; n];
        let mut n_pages = 0u32;
        for q in &pass.seqs {
            page_off[q.start..q.start + q.len].fill(n_pages);
            n_pages += q.pages.len() as u32;
        }
        desc.extend_from_slice(&page_off);
        desc.extend(pass.out_rows.iter().map(|&r| r as u32));
        let mut rope_at = Vec::with_capacity(graph.ropes.len());
        for r in &graph.ropes {
            rope_at.push(desc.len());
            for &p in &pass.pos {
                for (c, sn) in r.table(p) {
                    desc.push(c.to_bits());
                    desc.push(sn.to_bits());
                }
            }
        }
        let pages_at = desc.len();
        for q in &pass.seqs {
            desc.extend_from_slice(q.pages);
        }
        moved |= grow(stream, &mut s.desc, desc.len()).map_err(dev)?;
        let d = s.desc.as_mut().expect("grown");
        stream
            .memcpy_htod(&desc, &mut d.slice_mut(..desc.len()))
            .map_err(dev_err("upload of a pass's description"))?;
        if moved {
            s.generation += 1;
            s.graphs.clear();
        }
        let base = ptr(stream, s.desc.as_ref().expect("grown"));
        let at = |i: usize| base + 4 * i as u64;
        let addrs = Addrs {
            bufs: s
                .bufs
                .iter()
                .map(|b| ptr(stream, b.as_ref().expect("sized")))
                .collect(),
            tokens: at(0),
            pos: at(n),
            page_off: at(2 * n),
            out_rows: at(3 * n),
            rope: rope_at.into_iter().map(at).collect(),
            pages: at(pages_at),
        };

        // Decode steps replay a recorded graph; others (and every pass with a hook) launch.
        let key = GraphKey {
            n,
            n_out,
            kv: kv.id,
            generation: s.generation,
        };
        let replay = hook.is_none()
            && n == n_out
            && n <= GRAPH_MAX_ROWS
            && self.graphs
            && self.dev.fast
            && !s.capture_failed;
        if replay {
            if !s.graphs.contains_key(&key) {
                if s.graphs.len() >= MAX_GRAPHS {
                    s.graphs.clear();
                }
                match self.capture(graph, pass, kv, &addrs, &s.work) {
                    Ok(g) => {
                        s.graphs.insert(key, Recorded(g));
                    }
                    Err(e) => {
                        // Launch op by op from now on, and say so once.
                        eprintln!(
                            "realm: CUDA graph capture failed ({e}); launching every op directly"
                        );
                        s.capture_failed = true;
                        self.record(graph, pass, kv, &addrs, &s.work, None)?;
                    }
                }
            }
            if let Some(g) = s.graphs.get(&key) {
                g.0.launch().map_err(dev_err("launch of a recorded step"))?;
            }
        } else {
            self.record(graph, pass, kv, &addrs, &s.work, hook)?;
        }

        let len = n_out * width_of(graph, graph.logits);
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

fn width_of(graph: &Graph, b: crate::graph::Buf) -> usize {
    graph.buf(b).width
}

impl CudaBackend {
    fn matrix(&self, w: crate::graph::WeightId) -> &DeviceMatrix {
        match &self.weights[w.index()] {
            DeviceWeight::Matrix(m) => m,
            DeviceWeight::Vector(_) => unreachable!("the graph builder checked the kinds"),
        }
    }

    fn vector(&self, w: crate::graph::WeightId) -> &CudaSlice<f32> {
        match &self.weights[w.index()] {
            DeviceWeight::Vector(v) => v,
            DeviceWeight::Matrix(_) => unreachable!("the graph builder checked the kinds"),
        }
    }

    /// Records the pass's launches as a CUDA graph (on the device's own stream, which is never
    /// the legacy default stream; event tracking is off, so nothing but launches is captured).
    fn capture(
        &self,
        graph: &Graph,
        pass: &Pass<'_>,
        kv: &CudaKv,
        addrs: &Addrs,
        work: &MatWork,
    ) -> Result<CudaGraph, BackendError> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        let stream = &self.dev.stream;
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(dev_err("begin of a graph capture"))?;
        let recorded = self.record(graph, pass, kv, addrs, work, None);
        // The capture ends whatever happened, or the stream stays in capture mode.
        let ended = stream
            .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        recorded?;
        ended
            .map_err(dev_err("graph capture"))?
            .ok_or_else(|| BackendError::Device("CUDA graph capture recorded nothing".into()))
    }

    /// Launches the graph's ops on the device's stream (reading tapped tensors back for `hook`).
    fn record(
        &self,
        graph: &Graph,
        pass: &Pass<'_>,
        kv: &CudaKv,
        a: &Addrs,
        work: &MatWork,
        mut hook: Option<&mut dyn OpHook>,
    ) -> Result<(), BackendError> {
        let stream = &self.dev.stream;
        let (n, n_out) = (pass.len(), pass.out_rows.len());
        let dev = |e: CudaError| BackendError::Device(e.to_string());
        let buf = |b: crate::graph::Buf| a.bufs[b.index()];
        let rows_of = |b: crate::graph::Buf| graph.rows(b, n, n_out);
        let width = |b: crate::graph::Buf| graph.buf(b).width;
        let (tokens, pos_p, pages_p, off_p, out_p) =
            (a.tokens, a.pos, a.pages, a.page_off, a.out_rows);
        let page_size = pass.page_size as i32;

        for node in &graph.nodes {
            let rows = rows_of(node.op.rows_of());
            if rows == 0 {
                continue;
            }
            match &node.op {
                Op::Embed { table, out } => {
                    let m = self.matrix(*table);
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
                    let w = self.vector(*weight);
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
                    let (xp, cols) = (buf(*x), width(*x));
                    // One quantization of the input serves every int8 product with it.
                    let q = if outs
                        .iter()
                        .any(|(w, _)| self.dev.path(self.matrix(*w).ty, rows) == MatPath::Mmvq)
                    {
                        Some(self.dev.quantize(xp, rows, cols, work).map_err(dev)?)
                    } else {
                        None
                    };
                    for (w, out) in outs {
                        let m = self.matrix(*w);
                        let path = self.dev.path(m.ty, rows);
                        self.dev
                            .matmul_async(path, m, xp, q, buf(*out), rows, work)
                            .map_err(dev)?;
                    }
                }
                Op::AddBias { x, bias } => {
                    let (p, bp, w, len) = (
                        buf(*x),
                        ptr(stream, self.vector(*bias)),
                        width(*x) as i32,
                        (rows * width(*x)) as u64,
                    );
                    launch!(self, "add_bias", grid1(len), &p, &bp, &w, &len)?;
                }
                Op::Rope { x, rope, head_dim } => {
                    let r = graph.rope(*rope);
                    let table = a.rope[rope.index()];
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
                            "attention heads of {} dimensions (the CUDA kernels take up to \
                             {MAX_HEAD_DIM})",
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
                    // The fast kernel reads two halves per load: heads of a multiple of 64.
                    let (name, threads) = if self.dev.fast && p.head_dim.is_multiple_of(64) {
                        ("attention_warps", ATTN_WARPS_THREADS)
                    } else {
                        ("attention", ATTN_TILE)
                    };
                    launch!(
                        self,
                        name,
                        blocks((n * p.n_head) as u32, threads),
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
                    let mut host = vec![0f32; len];
                    // SAFETY: the tapped buffer holds at least rows * width floats (sized for
                    // this pass); the copy is synchronous on the pass's stream.
                    unsafe {
                        cudarc::driver::result::memcpy_dtoh_async(
                            &mut host,
                            buf(*b),
                            stream.cu_stream(),
                        )
                    }
                    .map_err(dev_err("read-back of a tapped tensor"))?;
                    stream.synchronize().map_err(dev_err("synchronize"))?;
                    h.tensor(name, &host, width(*b));
                }
            }
        }
        Ok(())
    }
}
