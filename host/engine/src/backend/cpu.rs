//! The CPU backend: weights stay in the GGUF mapping, activations are f32, matrix products go
//! through the quantized dot-product kernels of [`crate::quant`] with activations quantized on the
//! fly (as llama.cpp does), and work is spread over a private rayon pool, except for the many
//! short regions of a single-token step, which go to a [`SpinPool`] of the same size.
//!
//! It runs a graph op by op ([`CpuBackend::execute`]), each op over the whole batch, in one
//! arena of activation buffers reused from pass to pass. KV pages are f16 in host memory
//! ([`CpuKv`]), as llama.cpp's default cache type.

use std::sync::{Arc, Mutex};

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::backend::spin::SpinPool;
use crate::backend::{Arena, Backend, BackendError, HostKv, own_kv, show_taps};
use crate::gguf::TensorView;
use crate::graph::{Activation, AttnParams, Graph, Op, OpHook, Pass, PassSeq, WeightSet};
use crate::kv::{KvLayout, KvStorage};
use crate::quant;

/// Tokens handed to one gemm call: their quantized activations (a few KiB) stay in L1 while the
/// task's weight rows stream past them.
const TOKEN_BLOCK: usize = 64;
/// Weight rows per kernel call in a matrix-matrix product.
const ROW_BLOCK: usize = 256;
/// How long the spin pool's workers keep polling after a region: longer than the gaps between
/// a decode step's regions (norms, rope, short attention), short enough that an idle engine
/// stops burning its cores at once.
const SPIN: std::time::Duration = std::time::Duration::from_millis(1);

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    /// Regions of single-token steps; their caller (running inside `pool`) takes part, so at
    /// most `threads` threads compute at once.
    spin: SpinPool,
    threads: usize,
    weights: Option<Arc<WeightSet>>,
    /// Every product through the gemm kernels, single-token steps included (see
    /// [`CpuBackend::set_batch_invariant`]).
    batch_invariant: bool,
    /// One pass at a time runs (the engine loop owns the model), so this lock is never contended.
    arena: Mutex<Arena>,
}

/// f16 KV pages in host memory: per layer, keys and values `[n_pages * page_size, kv_dim]`.
pub type CpuKv = HostKv<f16>;

impl HostKv<f16> {
    /// Stores one position's keys and values (`kv_dim` each) of `layer` at `slot`.
    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let d = self.layout.kv_dim;
        let at = slot * d;
        self.keys[layer][at..at + d].convert_from_f32_slice(k);
        self.values[layer][at..at + d].convert_from_f32_slice(v);
    }

    /// Keys and values of one position.
    pub fn read(&self, layer: usize, slot: usize) -> (&[f16], &[f16]) {
        let d = self.layout.kv_dim;
        let at = slot * d;
        (
            &self.keys[layer][at..at + d],
            &self.values[layer][at..at + d],
        )
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn threads(&self) -> usize {
        self.threads
    }

    fn load_weights(&mut self, weights: Arc<WeightSet>) -> Result<(), BackendError> {
        self.weights = Some(weights);
        Ok(())
    }

    fn new_kv(&self, layout: KvLayout) -> Result<Box<dyn KvStorage>, BackendError> {
        Ok(Box::new(CpuKv::new(layout)))
    }

    fn execute(
        &self,
        graph: &Graph,
        pass: &Pass<'_>,
        kv: &mut dyn KvStorage,
        mut hook: Option<&mut dyn OpHook>,
    ) -> Result<Vec<f32>, BackendError> {
        let ws = self
            .weights
            .as_deref()
            .ok_or(BackendError::NotLoaded("cpu"))?;
        let kv: &mut CpuKv = own_kv(kv, "cpu")?;
        let mut arena = self.arena.lock().unwrap_or_else(|e| e.into_inner());
        let (n, n_out) = (pass.len(), pass.out_rows.len());
        arena.fit(graph, n, n_out);
        let bufs = &mut arena.bufs;
        let logits = self.install(|| {
            for node in &graph.nodes {
                if graph.rows(node.op.rows_of(), n, n_out) == 0 {
                    continue;
                }
                self.run(graph, ws, pass, kv, bufs, &node.op);
                if let Some(h) = hook.as_deref_mut() {
                    show_taps(graph, node, bufs, (n, n_out), h);
                }
            }
            let len = n_out * graph.buf(graph.logits).width;
            bufs[graph.logits.index()][..len].to_vec()
        });
        self.rest();
        Ok(logits)
    }
}

impl CpuBackend {
    /// `threads == 0` means one per physical core.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let threads = if threads == 0 {
            physical_cores()
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("realm-cpu-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        let spin = SpinPool::new(threads, SPIN)?;
        Ok(CpuBackend {
            pool,
            spin,
            threads,
            weights: None,
            batch_invariant: false,
            arena: Mutex::new(Arena::default()),
        })
    }

    /// Batch invariance: a sequence's logits are bit-identical whether it runs alone or beside
    /// any other sequences. The gemm kernels compute each activation row (each token) the same
    /// way whatever else is in the batch (`quant::tests::gemm_columns_do_not_depend_on_the_batch`),
    /// but a pass of one token takes the gemv kernels, which sum in another order; with this on,
    /// one-token passes take the gemm kernels too (one column, still on the spin pool). Every
    /// other op is per row or per sequence.
    pub fn set_batch_invariant(&mut self, on: bool) {
        self.batch_invariant = on;
    }

    /// One op over the whole batch.
    fn run(
        &self,
        graph: &Graph,
        ws: &WeightSet,
        pass: &Pass<'_>,
        kv: &mut CpuKv,
        bufs: &mut [Vec<f32>],
        op: &Op,
    ) {
        let (n, n_out) = (pass.len(), pass.out_rows.len());
        let len = |b: crate::graph::Buf| graph.rows(b, n, n_out) * graph.buf(b).width;
        // The op's output is taken out of the arena while it runs (a move, no copy), so that it
        // can be written while the inputs are read.
        let take =
            |bufs: &mut [Vec<f32>], b: crate::graph::Buf| std::mem::take(&mut bufs[b.index()]);
        match op {
            Op::Embed { table, out } => {
                let (t, d) = (ws.matrix_of(*table), graph.buf(*out).width);
                let o = &mut bufs[out.index()][..len(*out)];
                for (row, &tok) in o.chunks_exact_mut(d).zip(&pass.tokens) {
                    get_row(t, tok as usize, row);
                }
            }
            Op::Scale { x, by } => scale(&mut bufs[x.index()][..len(*x)], *by),
            Op::RmsNorm {
                x,
                weight,
                eps,
                out,
            } => {
                let w = ws.vector_of(*weight);
                if x == out {
                    rms_norm(&mut bufs[x.index()][..len(*x)], w, *eps);
                } else {
                    let mut o = take(bufs, *out);
                    rms_norm_into(&bufs[x.index()][..len(*x)], w, *eps, &mut o[..len(*out)]);
                    bufs[out.index()] = o;
                }
            }
            Op::MatMul { x, outs } => {
                let rows = graph.rows(*x, n, n_out);
                let mut ys: Vec<Vec<f32>> = outs.iter().map(|(_, b)| take(bufs, *b)).collect();
                let mut jobs: Vec<(&TensorView, &mut [f32])> = outs
                    .iter()
                    .zip(ys.iter_mut())
                    .map(|((w, b), y)| (ws.matrix_of(*w), &mut y[..len(*b)]))
                    .collect();
                self.matmuls(&mut jobs, &bufs[x.index()][..len(*x)], rows);
                for ((_, b), y) in outs.iter().zip(ys) {
                    bufs[b.index()] = y;
                }
            }
            Op::AddBias { x, bias } => {
                self.add_bias(&mut bufs[x.index()][..len(*x)], ws.vector_of(*bias))
            }
            Op::Rope { x, rope, head_dim } => {
                let (rope, w) = (graph.rope(*rope), graph.buf(*x).width);
                for (row, &pos) in bufs[x.index()][..len(*x)]
                    .chunks_exact_mut(w)
                    .zip(&pass.pos)
                {
                    rope.apply(row, *head_dim, &rope.table(pos));
                }
            }
            Op::StoreKv { layer, k, v } => {
                let d = graph.buf(*k).width;
                let (ks, vs) = (&bufs[k.index()], &bufs[v.index()]);
                for s in &pass.seqs {
                    for i in 0..s.len {
                        let r = s.start + i;
                        let slot = s.slot(s.pos0 + i, pass.page_size);
                        kv.write(
                            *layer,
                            slot,
                            &ks[r * d..(r + 1) * d],
                            &vs[r * d..(r + 1) * d],
                        );
                    }
                }
            }
            Op::Attention {
                layer,
                q,
                out,
                params,
            } => {
                let qd = graph.buf(*q).width;
                let mut o = take(bufs, *out);
                let qs = &bufs[q.index()];
                for s in &pass.seqs {
                    let rows = s.start * qd..(s.start + s.len) * qd;
                    self.attention(
                        kv,
                        *layer,
                        s,
                        pass.page_size,
                        &qs[rows.clone()],
                        &mut o[rows],
                        params,
                    );
                }
                bufs[out.index()] = o;
            }
            Op::Add { x, y } => {
                let yv = take(bufs, *y);
                add_in_place(&mut bufs[x.index()][..len(*x)], &yv[..len(*y)]);
                bufs[y.index()] = yv;
            }
            Op::Glu { act, gate, up } => {
                let u = take(bufs, *up);
                let g = &mut bufs[gate.index()][..len(*gate)];
                match act {
                    Activation::Silu => silu_mul(g, &u[..len(*up)]),
                    Activation::GeluTanh => gelu_mul(g, &u[..len(*up)]),
                }
                bufs[up.index()] = u;
            }
            Op::GatherOut { x, out } => {
                let d = graph.buf(*x).width;
                let mut o = take(bufs, *out);
                for (dst, &r) in o.chunks_exact_mut(d).zip(&pass.out_rows) {
                    dst.copy_from_slice(&bufs[x.index()][r * d..(r + 1) * d]);
                }
                bufs[out.index()] = o;
            }
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The end of a forward pass: the spin pool's workers park instead of spinning through
    /// the gap before the next one, which callers spend sampling (on these same cores).
    pub fn rest(&self) {
        self.spin.rest();
    }

    /// Runs `f` inside this backend's thread pool, so that every parallel op it calls uses it.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// y[n, m] = x[n, k] · Wᵀ where W is [m rows, k] in any GGUF type.
    pub fn matmul(&self, w: &TensorView, x: &[f32], n: usize, y: &mut [f32]) {
        let k = w.row_len();
        let m = w.n_rows();
        debug_assert_eq!(x.len(), n * k);
        debug_assert_eq!(y.len(), n * m);
        if n == 1 {
            self.matmuls(&mut [(w, y)], x, 1);
            return;
        }
        let kern = quant::kernels(w.ty);
        let arb = kern
            .act_type
            .row_bytes(k)
            .expect("weight rows are whole blocks");
        let mut xq = vec![0u8; n * arb];
        xq.par_chunks_mut(arb)
            .zip(x.par_chunks(k))
            .for_each(|(d, s)| (kern.quantize_act)(s, d));
        let rb = w.row_bytes();
        let wd = w.data();
        let chunk = rows_per_task(m, self.threads);
        // Each task owns rows [r0, r0 + rows) of the weight, i.e. the same column range of every
        // token's output row: split y that way so tasks write their results straight into place.
        let n_tasks = m.div_ceil(chunk);
        let mut parts: Vec<Vec<&mut [f32]>> = (0..n_tasks).map(|_| Vec::with_capacity(n)).collect();
        for token_row in y.chunks_mut(m) {
            for (t, part) in token_row.chunks_mut(chunk).enumerate() {
                parts[t].push(part);
            }
        }
        parts
            .into_par_iter()
            .enumerate()
            .for_each(|(ci, mut outs)| {
                let r0 = ci * chunk;
                let rows = outs[0].len();
                // The kernel writes [rows, tokens]; a small block of rows at a time stays in cache
                // while it is scattered to the tokens' rows (and its weights stay in L2 across the
                // token tiles). Tile rows are an odd number of cache lines apart: the scatter
                // reads the tile column by column, and at a power-of-two stride (n = 512: 2 KiB)
                // those reads all fall into two L1 sets and miss.
                let ts = (n.div_ceil(16) | 1) * 16;
                let mut tile = vec![0f32; ROW_BLOCK.min(rows) * ts];
                for b0 in (0..rows).step_by(ROW_BLOCK) {
                    let br = ROW_BLOCK.min(rows - b0);
                    let tile = &mut tile[..br * ts];
                    let wrows = &wd[(r0 + b0) * rb..(r0 + b0 + br) * rb];
                    for t0 in (0..n).step_by(TOKEN_BLOCK) {
                        let cols = TOKEN_BLOCK.min(n - t0);
                        (kern.gemm)(
                            k,
                            wrows,
                            rb,
                            br,
                            &xq[t0 * arb..(t0 + cols) * arb],
                            arb,
                            cols,
                            &mut tile[t0..],
                            ts,
                        );
                    }
                    for (t, out) in outs.iter_mut().enumerate() {
                        for (r, o) in out[b0..b0 + br].iter_mut().enumerate() {
                            *o = tile[r * ts + t];
                        }
                    }
                }
            });
    }

    /// Several products of the same input (Q/K/V, gate/up). A decode step's products are small,
    /// so they share one parallel region of the spin pool: each region costs a hand-off to the
    /// workers, which is a visible fraction of a 640-wide layer.
    pub fn matmuls(&self, jobs: &mut [(&TensorView, &mut [f32])], x: &[f32], n: usize) {
        if n > 1 {
            for (w, y) in jobs.iter_mut() {
                self.matmul(w, x, n, y);
            }
            return;
        }
        struct Job<'a> {
            w: &'a TensorView,
            kern: quant::Kernels,
            xq: Vec<u8>,
        }
        let prepared: Vec<Job> = jobs
            .iter()
            .map(|(w, _)| {
                let kern = quant::kernels(w.ty);
                let arb = kern
                    .act_type
                    .row_bytes(w.row_len())
                    .expect("weight rows are whole blocks");
                let mut xq = vec![0u8; arb];
                (kern.quantize_act)(x, &mut xq);
                Job { w, kern, xq }
            })
            .collect();
        let mut tasks: Vec<(&Job, usize, &mut [f32])> = Vec::new();
        for (job, (_, y)) in prepared.iter().zip(jobs.iter_mut()) {
            let chunk = rows_per_task(job.w.n_rows(), self.threads);
            for (ci, ys) in y.chunks_mut(chunk).enumerate() {
                tasks.push((job, ci * chunk, ys));
            }
        }
        let invariant = self.batch_invariant;
        self.spin.for_each(tasks, |(job, r0, ys)| {
            let (k, rb, wd) = (job.w.row_len(), job.w.row_bytes(), job.w.data());
            let rows = &wd[r0 * rb..(r0 + ys.len()) * rb];
            if invariant {
                // The gemm kernels, as a batch's tokens get: the same bits as beside others.
                (job.kern.gemm)(k, rows, rb, ys.len(), &job.xq, job.xq.len(), 1, ys, 1);
            } else {
                (job.kern.gemv)(k, rows, rb, &job.xq, ys);
            }
        });
    }

    /// Adds a bias vector (F32 tensor of length m) to every row of y[n, m].
    pub fn add_bias(&self, y: &mut [f32], bias: &[f32]) {
        for row in y.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }

    /// Causal multi-head attention for `n` consecutive tokens of one sequence starting at `pos0`,
    /// whose keys and values are already in the cache.
    /// q: [n, n_head * head_dim] (already scaled as the architecture wants); out: same shape.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        kv: &CpuKv,
        layer: usize,
        seq: &PassSeq<'_>,
        page_size: usize,
        q: &[f32],
        out: &mut [f32],
        p: &AttnParams,
    ) {
        let hd = p.head_dim;
        let kvd = p.n_head_kv * hd;
        let group = p.n_head / p.n_head_kv;
        let n = out.len() / (p.n_head * hd);
        let pos0 = seq.pos0;
        let lo_of = |pos: usize| p.first_visible(pos);
        let base = lo_of(pos0);
        let end = pos0 + n;
        // The kernels read the f16 pages in place (converting in registers), one run of
        // consecutive slots (at most a page) at a time.
        let (keys, values) = (&kv.keys[layer], &kv.values[layer]);
        // One unit of work: `uh` query heads of one token that share a kv head (their outputs
        // are contiguous), so each key and value row is read once for all of them. A decode
        // step with fewer kv heads than threads splits the groups instead, to use every core.
        let uh = if n == 1 && p.n_head_kv < self.threads {
            1
        } else {
            group
        };
        let work = |(i, o): (usize, &mut [f32])| {
            let h0 = i * uh;
            let (t, kvh) = (h0 / p.n_head, h0 % p.n_head / group);
            let pos = pos0 + t;
            let lo = lo_of(pos);
            let len = pos + 1 - lo;
            // Keys are f16: the queries are rounded to f16 too, as llama.cpp's KQ product does
            // (f16 x f16 products are exact in f32, so only the order of the sum differs).
            let mut q16 = vec![f16::ZERO; uh * hd];
            q16.convert_from_f32_slice(&q[h0 * hd..(h0 + uh) * hd]);
            let mut qs = vec![0f32; uh * hd];
            q16.convert_to_f32_slice(&mut qs);
            // Runs of positions lo..=pos that are consecutive slots: (first position, length,
            // offset of the first row's kv head in the layer's pages).
            let runs = || {
                let mut at = lo;
                std::iter::from_fn(move || {
                    (at <= pos).then(|| {
                        let take = (page_size - at % page_size).min(pos + 1 - at);
                        let run = (at, take, seq.slot(at, page_size) * kvd + kvh * hd);
                        at += take;
                        run
                    })
                })
            };
            let mut scores = vec![0f32; uh * len];
            let mut part = vec![0f32; uh * page_size];
            for (at, take, row) in runs() {
                let part = &mut part[..uh * take];
                quant::dot_rows(&qs, uh, &keys[row..], kvd, part);
                for (h, sc) in part.chunks_exact(take).enumerate() {
                    let j = h * len + at - lo;
                    scores[j..j + take].copy_from_slice(sc);
                }
            }
            let mut p16 = vec![f16::ZERO; len];
            for head in scores.chunks_exact_mut(len) {
                let mut max = f32::NEG_INFINITY;
                for s in head.iter_mut() {
                    *s *= p.scale;
                    max = max.max(*s);
                }
                let mut sum = 0f32;
                for s in head.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                for s in head.iter_mut() {
                    *s *= inv;
                }
                // The probabilities meet f16 values, so llama.cpp rounds them to f16 for the
                // product; doing the same keeps long contexts in step with the reference (both
                // conversions by the F16C instructions where the CPU has them).
                p16.convert_from_f32_slice(head);
                p16.convert_to_f32_slice(head);
            }
            // Each run's terms continue the sums of the runs before it, so the result is the
            // same as one pass over all the rows.
            o.fill(0.0);
            for (at, take, row) in runs() {
                let part = &mut part[..uh * take];
                for (h, w) in part.chunks_exact_mut(take).enumerate() {
                    let j = h * len + at - lo;
                    w.copy_from_slice(&scores[j..j + take]);
                }
                quant::weighted_sum_acc(part, uh, &values[row..], kvd, o);
            }
        };
        // A decode step over a short context is a few microseconds of work: less than waking the
        // other workers costs. Spread it only when there is enough (query, key) pairs.
        let pairs = (out.len() / hd) * (end - base);
        let unit = uh * hd;
        if pairs >= 8192 && out.len() / unit >= 2 {
            if n == 1 {
                // A decode step's other regions run on the spin pool, whose workers may still
                // be spinning: rayon's would compete with them for the cores.
                self.spin
                    .for_each(out.chunks_mut(unit).enumerate().collect(), work);
            } else {
                out.par_chunks_mut(unit).enumerate().for_each(work);
            }
        } else {
            out.chunks_mut(unit).enumerate().for_each(work);
        }
    }
}

fn rows_per_task(m: usize, threads: usize) -> usize {
    // Several tasks per thread so that uneven progress balances out, but not so many that
    // scheduling overhead shows on small matrices.
    let tasks = threads * 8;
    m.div_ceil(tasks).clamp(16, 4096).min(m.max(1))
}

/// Dequantizes row `i` of `w` into `out` (embedding lookup).
pub fn get_row(w: &TensorView, i: usize, out: &mut [f32]) {
    quant::dequantize_row(w.ty, w.row(i), out);
}

/// RMS normalisation of every row of x (width = weight.len()), in place, times the weight.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(weight.len()) {
        // f32 squares summed in f64, exactly as ggml: rows of thousands of values lose bits in an
        // f32 sum, and matching the reference's rounding keeps logits in step with it.
        let ss: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let scale = 1.0 / ((ss / row.len() as f64) as f32 + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * scale * w;
        }
    }
}

/// out = rms_norm(x) (not in place).
pub fn rms_norm_into(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    out.copy_from_slice(x);
    rms_norm(out, weight, eps);
}

pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// SwiGLU: gate = silu(gate) * up.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// GELU (tanh approximation, as Gemma and ggml_gelu) of every value an f16 can hold, itself
/// rounded to f16: ggml evaluates GELU through exactly this table, and the rounding it implies
/// is visible in the logits of models with large activations.
fn gelu_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        (0..=u16::MAX)
            .map(|bits| {
                let x = f16::from_bits(bits).to_f32();
                let y = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh());
                f16::from_f32(y).to_f32()
            })
            .collect()
    })
}

/// GeGLU: gate = gelu(gate) * up.
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    let table = gelu_table();
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        let gx = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x
        } else {
            table[f16::from_f32(x).to_bits() as usize]
        };
        *g = gx * u;
    }
}

pub fn scale(x: &mut [f32], s: f32) {
    for v in x {
        *v *= s;
    }
}

/// Logical cores as a fallback when the physical count can't be read.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    // /proc/cpuinfo lists (physical id, core id) per logical CPU on Linux; SMT siblings share it.
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return logical;
    };
    let mut cores = std::collections::HashSet::new();
    let mut phys = "";
    for line in info.lines() {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim() {
                "physical id" => phys = v.trim(),
                "core id" => {
                    cores.insert((phys.to_string(), v.trim().to_string()));
                }
                _ => {}
            }
        }
    }
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_rows() {
        let mut x = vec![3.0, 4.0, 0.0, 0.0];
        rms_norm(&mut x, &[1.0, 1.0, 1.0, 1.0], 0.0);
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }
}
