//! The CPU backend: weights stay in the GGUF mapping, activations are f32, matrix products go
//! through the quantized dot-product kernels of [`crate::quant`] with activations quantized on the
//! fly (as llama.cpp does), and work is spread over a private rayon pool, except for the many
//! short regions of a single-token step, which go to a [`SpinPool`] of the same size.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::backend::spin::SpinPool;
use crate::gguf::TensorView;
use crate::kv::{KvPool, SeqCache};
use crate::quant;

/// Tokens handed to one gemm call: their quantized activations (a few KiB) stay in L1 while the
/// task's weight rows stream past them.
const TOKEN_BLOCK: usize = 64;
/// Key and value elements (each) above which a decode step converts the cache to f32 on all
/// threads rather than on the calling one (about 10 µs of work per thread at the threshold).
pub(crate) const LONG_DECODE_CONVERT: usize = 1 << 16;
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
        })
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
        self.spin.for_each(tasks, |(job, r0, ys)| {
            let (k, rb, wd) = (job.w.row_len(), job.w.row_bytes(), job.w.data());
            let rows = &wd[r0 * rb..(r0 + ys.len()) * rb];
            (job.kern.gemv)(k, rows, rb, &job.xq, ys);
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
        kv: &KvPool,
        layer: usize,
        seq: &SeqCache,
        pos0: usize,
        q: &[f32],
        out: &mut [f32],
        p: &AttnParams,
    ) {
        let hd = p.head_dim;
        let kvd = p.n_head_kv * hd;
        let group = p.n_head / p.n_head_kv;
        let n = out.len() / (p.n_head * hd);
        let lo_of = |pos: usize| match p.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        };
        // Keys and values of every position any query here can see, converted to f32 once
        // rather than once per query and head: [pos - base, kv_dim] each.
        let base = lo_of(pos0);
        let end = pos0 + n;
        let mut keys = vec![0f32; (end - base) * kvd];
        let mut values = vec![0f32; (end - base) * kvd];
        let convert = |(i, (k, v)): (usize, (&mut [f32], &mut [f32]))| {
            let (kr, vr) = kv.read(layer, seq, base + i);
            kr.convert_to_f32_slice(k);
            vr.convert_to_f32_slice(v);
        };
        if n > 1 {
            keys.par_chunks_mut(kvd)
                .zip(values.par_chunks_mut(kvd))
                .enumerate()
                .for_each(convert);
        } else if (end - base) * kvd >= LONG_DECODE_CONVERT {
            // A decode step over a long context: the conversion outweighs the hand-off, so it is
            // spread over the spin pool (rayon's workers would compete with its spinning ones).
            let per = (end - base).div_ceil(4 * self.threads);
            let tasks: Vec<_> = keys
                .chunks_mut(per * kvd)
                .zip(values.chunks_mut(per * kvd))
                .enumerate()
                .collect();
            self.spin.for_each(tasks, |(c, (k, v))| {
                for (i, kv) in k.chunks_mut(kvd).zip(v.chunks_mut(kvd)).enumerate() {
                    convert((c * per + i, kv));
                }
            });
        } else {
            keys.chunks_mut(kvd)
                .zip(values.chunks_mut(kvd))
                .enumerate()
                .for_each(convert);
        }
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
            let qs: Vec<f32> = q[h0 * hd..(h0 + uh) * hd]
                .iter()
                .map(|&v| f16::from_f32(v).to_f32())
                .collect();
            // Key and value rows lo..=pos of this kv head, kv_dim apart.
            let at = (lo - base) * kvd + kvh * hd;
            let mut scores = vec![0f32; uh * len];
            quant::dot_rows(&qs, uh, &keys[at..], kvd, &mut scores);
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
                    // The probabilities meet f16 values, so llama.cpp rounds them to f16 for
                    // the product; doing the same keeps long contexts in step with the reference.
                    *s = f16::from_f32(*s * inv).to_f32();
                }
            }
            quant::weighted_sum(&scores, uh, &values[at..], kvd, o);
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

#[derive(Clone, Copy, Debug)]
pub struct AttnParams {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Multiplier applied to q·k.
    pub scale: f32,
    /// Sliding window: a query at position p sees keys at positions > p - window.
    pub window: Option<usize>,
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

/// Reads a 1-D F32 (or any-type) tensor fully into f32.
pub fn to_f32_vec(w: &TensorView) -> Vec<f32> {
    let n = w.row_len() * w.n_rows();
    let mut out = vec![0f32; n];
    let rl = w.row_len();
    for (i, chunk) in out.chunks_exact_mut(rl).enumerate() {
        quant::dequantize_row(w.ty, w.row(i), chunk);
    }
    out
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

/// Rotary position embedding, with ggml's conventions (`normal` rotates adjacent pairs, `neox`
/// rotates element i with i + n_dims/2) and its YaRN / linear-scaling formula.
#[derive(Clone, Debug)]
pub struct Rope {
    pub n_dims: usize,
    pub base: f32,
    /// 1 / linear scaling factor.
    pub freq_scale: f32,
    pub neox: bool,
    /// YaRN extrapolation mix (0 disables YaRN).
    pub ext_factor: f32,
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
    pub n_ctx_orig: usize,
    /// Per-dimension-pair divisors of the frequency (Llama 3.1's `rope_freqs.weight`).
    pub freq_factors: Option<Vec<f32>>,
}

impl Rope {
    pub fn new(n_dims: usize, base: f32, neox: bool) -> Self {
        Rope {
            n_dims,
            base,
            freq_scale: 1.0,
            neox,
            ext_factor: 0.0,
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            n_ctx_orig: 0,
            freq_factors: None,
        }
    }

    fn corr_dims(&self) -> (f32, f32) {
        let n = self.n_dims as f32;
        let corr = |rot: f32| {
            n * (self.n_ctx_orig as f32 / (rot * 2.0 * std::f32::consts::PI)).ln()
                / (2.0 * self.base.ln())
        };
        let start = corr(self.beta_fast).floor().max(0.0);
        let end = corr(self.beta_slow).ceil().min(n - 1.0);
        (start, end)
    }

    /// (cos, sin) for each of the n_dims/2 rotated pairs at position `pos`.
    pub fn table(&self, pos: usize) -> Vec<(f32, f32)> {
        let half = self.n_dims / 2;
        let theta_scale = self.base.powf(-2.0 / self.n_dims as f32);
        let corr = if self.ext_factor != 0.0 {
            self.corr_dims()
        } else {
            (0.0, 0.0)
        };
        let mut out = Vec::with_capacity(half);
        // Repeated multiplication in f32, exactly as ggml, so positions far into the context get
        // the same angles as the reference.
        let mut theta_base = pos as f32;
        for i in 0..half {
            let ff = self.freq_factors.as_ref().map_or(1.0, |f| f[i]);
            let theta_extrap = theta_base / ff;
            let theta_interp = self.freq_scale * theta_extrap;
            let mut theta = theta_interp;
            let mut mscale = self.attn_factor;
            if self.ext_factor != 0.0 {
                let y = (i as f32 - corr.0) / (corr.1 - corr.0).max(0.001);
                let ramp = 1.0 - y.clamp(0.0, 1.0);
                let mix = ramp * self.ext_factor;
                theta = theta_interp * (1.0 - mix) + theta_extrap * mix;
                mscale *= 1.0 + 0.1 * (1.0 / self.freq_scale).ln();
            }
            out.push((theta.cos() * mscale, theta.sin() * mscale));
            theta_base *= theta_scale;
        }
        out
    }

    /// Rotates every head of one token's vector x [n_heads * head_dim].
    pub fn apply(&self, x: &mut [f32], head_dim: usize, table: &[(f32, f32)]) {
        let half = self.n_dims / 2;
        for head in x.chunks_exact_mut(head_dim) {
            for (i, &(c, s)) in table.iter().enumerate() {
                let (a, b) = if self.neox {
                    (i, i + half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
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
    fn rope_matches_direct_formula_at_small_positions() {
        let r = Rope::new(8, 10000.0, false);
        let t = r.table(3);
        for (i, &(c, s)) in t.iter().enumerate() {
            let theta = 3.0f64 * 10000f64.powf(-2.0 * i as f64 / 8.0);
            assert!((c as f64 - theta.cos()).abs() < 1e-5);
            assert!((s as f64 - theta.sin()).abs() < 1e-5);
        }
    }

    #[test]
    fn rope_normal_and_neox_pairings() {
        let mut x: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let r = Rope::new(8, 10000.0, false);
        // A quarter turn on the first pair only (theta = pos for i = 0).
        let table = vec![(0.0, 1.0), (1.0, 0.0), (1.0, 0.0), (1.0, 0.0)];
        r.apply(&mut x, 8, &table);
        assert_eq!(&x[..2], &[-1.0, 0.0]);
        let mut y: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let n = Rope::new(8, 10000.0, true);
        n.apply(&mut y, 8, &table);
        assert_eq!((y[0], y[4]), (-4.0, 0.0));
    }

    #[test]
    fn rms_norm_unit_rows() {
        let mut x = vec![3.0, 4.0, 0.0, 0.0];
        rms_norm(&mut x, &[1.0, 1.0, 1.0, 1.0], 0.0);
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }
}
