//! Model loading and the architecture-independent part of the forward pass.
//!
//! Each architecture lives in its own file (`llama.rs`, `qwen2.rs`, `gemma3.rs`), readable top to
//! bottom: its weights with their shapes, then its forward pass over a [`Batch`]. What they share —
//! hyperparameters from GGUF metadata, batch bookkeeping, the KV-cache write + attention step —
//! is here.

mod gemma3;
mod llama;
mod qwen2;

use std::path::Path;
use std::sync::Arc;

use crate::Error;

use crate::backend::cpu::{AttnParams, CpuBackend, Rope};
use crate::gguf::{GgufFile, TensorView};
use crate::kv::{KvLayout, KvPool, SeqCache};

/// Which rows of logits a sequence wants back from a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsWanted {
    None,
    Last,
    All,
}

/// One sequence's part of a batch: new tokens appended at the end of its cache.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
    pub logits: LogitsWanted,
}

/// Hyperparameters, all read from GGUF metadata (`{arch}.*` keys).
#[derive(Clone, Debug)]
pub struct Hparams {
    pub arch: String,
    pub name: String,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub rms_eps: f32,
    pub rope_dims: usize,
    pub rope_base: f32,
    /// Rope scaling as read from metadata: (type, factor, original context).
    pub rope_scaling: Option<(String, f32, usize)>,
    pub sliding_window: Option<usize>,
}

impl Hparams {
    pub fn from_gguf(f: &GgufFile) -> Result<Self, Error> {
        let arch = f.architecture()?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let n_embd = f.get_u64(&key("embedding_length"))? as usize;
        let n_head = f.get_u64(&key("attention.head_count"))? as usize;
        let n_head_kv = f
            .opt_u64(&key("attention.head_count_kv"))?
            .map_or(n_head, |v| v as usize);
        if n_head == 0 || n_head_kv == 0 || !n_head.is_multiple_of(n_head_kv) {
            return Err(Error::BadModel(format!(
                "head counts {n_head} / {n_head_kv} (query / key-value) are not a valid grouping"
            )));
        }
        let head_dim = f
            .opt_u64(&key("attention.key_length"))?
            .map_or(n_embd / n_head, |v| v as usize);
        let n_vocab = match f.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            Some(t) => t.len(),
            None => f.require_tensor("token_embd.weight")?.n_rows(),
        };
        let rope_scaling = match f.opt_str(&key("rope.scaling.type"))? {
            None | Some("none") => None,
            Some(t) => {
                let factor = f.opt_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0) as f32;
                let orig = f
                    .opt_u64(&key("rope.scaling.original_context_length"))?
                    .unwrap_or(0) as usize;
                Some((t.to_string(), factor, orig))
            }
        };
        let hp = Hparams {
            name: f.opt_str("general.name")?.unwrap_or("unnamed").to_string(),
            n_vocab,
            n_ctx_train: f.get_u64(&key("context_length"))? as usize,
            n_embd,
            n_layer: f.get_u64(&key("block_count"))? as usize,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: f.get_u64(&key("feed_forward_length"))? as usize,
            rms_eps: f.get_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
            rope_dims: f
                .opt_u64(&key("rope.dimension_count"))?
                .map_or(head_dim, |v| v as usize),
            rope_base: f.opt_f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32,
            rope_scaling,
            sliding_window: f
                .opt_u64(&key("attention.sliding_window"))?
                .map(|v| v as usize),
            arch,
        };
        hp.validate()?;
        Ok(hp)
    }

    /// Rejects values no real model has, before anything is sized by them: a hostile file must
    /// not make the loader allocate terabytes or overflow a product.
    fn validate(&self) -> Result<(), Error> {
        const MAX_DIM: usize = 1 << 20;
        const MAX_LAYERS: usize = 1 << 12;
        let dims = [
            ("embedding_length", self.n_embd, MAX_DIM),
            ("block_count", self.n_layer, MAX_LAYERS),
            ("attention.head_count", self.n_head, MAX_DIM),
            ("attention.key_length", self.head_dim, MAX_DIM),
            ("feed_forward_length", self.n_ff, MAX_DIM),
            ("rope.dimension_count", self.rope_dims, MAX_DIM),
            ("vocabulary size", self.n_vocab, 1 << 24),
        ];
        for (what, v, max) in dims {
            if v == 0 || v > max {
                return Err(Error::BadModel(format!(
                    "{}.{what} = {v} is out of range (1 to {max})",
                    self.arch
                )));
            }
        }
        if self
            .n_head
            .checked_mul(self.head_dim)
            .is_none_or(|v| v > MAX_DIM)
        {
            return Err(Error::BadModel(format!(
                "{} heads of {} dimensions is out of range",
                self.n_head, self.head_dim
            )));
        }
        if self.rope_dims > self.head_dim {
            return Err(Error::BadModel(format!(
                "rope.dimension_count {} exceeds the head size {}",
                self.rope_dims, self.head_dim
            )));
        }
        Ok(())
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// The RoPE of global-attention layers, with metadata scaling applied.
    pub fn rope(&self, neox: bool) -> Rope {
        let mut r = Rope::new(self.rope_dims, self.rope_base, neox);
        if let Some((ty, factor, orig)) = &self.rope_scaling {
            match ty.as_str() {
                "linear" => r.freq_scale = 1.0 / factor,
                "yarn" => {
                    r.freq_scale = 1.0 / factor;
                    r.ext_factor = 1.0;
                    r.n_ctx_orig = if *orig > 0 { *orig } else { self.n_ctx_train };
                }
                _ => {}
            }
        }
        r
    }

    pub fn attn(&self, window: Option<usize>) -> AttnParams {
        AttnParams {
            n_head: self.n_head,
            n_head_kv: self.n_head_kv,
            head_dim: self.head_dim,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
            window,
        }
    }
}

/// Checks a weight's shape against what the architecture expects, naming it on mismatch.
pub(crate) fn weight(f: &GgufFile, name: &str, shape: &[usize]) -> Result<TensorView, Error> {
    let t = f.require_tensor(name)?;
    if t.shape != shape {
        return Err(Error::BadModel(format!(
            "tensor {name} has shape {:?}, expected {shape:?}",
            t.shape
        )));
    }
    Ok(t)
}

/// A 1-D F32 weight (norms, biases) read into memory (they are tiny).
pub(crate) fn vector(f: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, Error> {
    Ok(crate::backend::cpu::to_f32_vec(&weight(f, name, &[len])?))
}

/// Flattened view of a batch: which sequence and position each token row belongs to.
pub(crate) struct Batch {
    pub tokens: Vec<u32>,
    pub pos: Vec<usize>,
    /// Per sequence: first row, number of rows, position of the first row.
    pub seqs: Vec<(usize, usize, usize)>,
    /// Rows whose logits are wanted, in output order.
    pub out_rows: Vec<usize>,
}

impl Batch {
    fn new(inputs: &[SeqInput<'_>]) -> Self {
        let mut b = Batch {
            tokens: Vec::new(),
            pos: Vec::new(),
            seqs: Vec::new(),
            out_rows: Vec::new(),
        };
        for s in inputs {
            let start = b.tokens.len();
            let pos0 = s.cache.len();
            b.tokens.extend_from_slice(s.tokens);
            b.pos.extend((0..s.tokens.len()).map(|i| pos0 + i));
            b.seqs.push((start, s.tokens.len(), pos0));
            match s.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last if !s.tokens.is_empty() => {
                    b.out_rows.push(start + s.tokens.len() - 1)
                }
                LogitsWanted::Last => {}
                LogitsWanted::All => b.out_rows.extend(start..start + s.tokens.len()),
            }
        }
        b
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Gathers the rows of x[len, width] whose logits are wanted.
    pub fn gather_out(&self, x: &[f32], width: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.out_rows.len() * width);
        for &r in &self.out_rows {
            out.extend_from_slice(&x[r * width..(r + 1) * width]);
        }
        out
    }
}

/// Stores the batch's keys and values in the cache, then runs attention for every sequence.
/// q: [len, n_head*head_dim]; k, v: [len, kv_dim]; returns [len, n_head*head_dim].
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    be: &CpuBackend,
    kv: &mut KvPool,
    layer: usize,
    batch: &Batch,
    inputs: &[SeqInput<'_>],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    p: &AttnParams,
) -> Vec<f32> {
    let kvd = p.n_head_kv * p.head_dim;
    let qd = p.n_head * p.head_dim;
    for (s, &(start, n, pos0)) in inputs.iter().zip(&batch.seqs) {
        for i in 0..n {
            let r = start + i;
            kv.write(
                layer,
                s.cache,
                pos0 + i,
                &k[r * kvd..(r + 1) * kvd],
                &v[r * kvd..(r + 1) * kvd],
            );
        }
    }
    let mut out = vec![0f32; batch.len() * qd];
    for (s, &(start, n, pos0)) in inputs.iter().zip(&batch.seqs) {
        be.attention(
            kv,
            layer,
            s.cache,
            pos0,
            &q[start * qd..(start + n) * qd],
            &mut out[start * qd..(start + n) * qd],
            p,
        );
    }
    out
}

/// Applies RoPE to every row of x [len, n_heads*head_dim] at the row's position.
pub(crate) fn rope_rows(rope: &Rope, x: &mut [f32], head_dim: usize, batch: &Batch) {
    let width = x.len() / batch.len().max(1);
    for (row, &pos) in x.chunks_exact_mut(width).zip(&batch.pos) {
        rope.apply(row, head_dim, &rope.table(pos));
    }
}

/// Prints a tensor's sum and corner values when `REALM_DEBUG_TENSORS` is set, in the layout of
/// llama.cpp's `llama-eval-callback`, so a divergence can be located op by op.
pub(crate) fn debug_tensor(name: &str, x: &[f32], width: usize) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ON.get_or_init(|| std::env::var_os("REALM_DEBUG_TENSORS").is_some()) {
        return;
    }
    let rows: Vec<&[f32]> = x.chunks(width).collect();
    let show = |r: &[f32]| {
        let n = r.len();
        format!(
            "[{:10.4} {:10.4} {:10.4} ... {:10.4} {:10.4} {:10.4}]",
            r[0],
            r[1],
            r[2],
            r[n - 3],
            r[n - 2],
            r[n - 1]
        )
    };
    eprintln!(
        "{name:>16}: {}x{width} first {} last {} sum = {:.6}",
        rows.len(),
        show(rows[0]),
        show(rows[rows.len() - 1]),
        x.iter().map(|&v| v as f64).sum::<f64>()
    );
}

/// What every architecture implements.
pub(crate) trait Architecture: Send + Sync {
    /// Runs the batch; returns logits [batch.out_rows.len(), n_vocab].
    fn forward(
        &self,
        be: &CpuBackend,
        kv: &mut KvPool,
        batch: &Batch,
        inputs: &[SeqInput<'_>],
    ) -> Vec<f32>;
}

/// Options for [`Model::load`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Worker threads; 0 = one per physical core.
    pub threads: usize,
}

/// A loaded model: the mapping, its hyperparameters, its weights and a CPU backend.
pub struct Model {
    pub hparams: Hparams,
    pub file: Arc<GgufFile>,
    arch: Box<dyn Architecture>,
    backend: CpuBackend,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("hparams", &self.hparams)
            .finish()
    }
}

/// Tokens per KV page.
pub const KV_PAGE_SIZE: usize = 32;

impl Model {
    pub fn load(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self, Error> {
        let file = GgufFile::open(path)?;
        Self::from_gguf(file, opts)
    }

    pub fn from_gguf(file: GgufFile, opts: &LoadOptions) -> Result<Self, Error> {
        let hp = Hparams::from_gguf(&file)?;
        let arch: Box<dyn Architecture> = match hp.arch.as_str() {
            "llama" | "mistral" => Box::new(llama::Llama::load(&file, &hp)?),
            "qwen2" => Box::new(qwen2::Qwen2::load(&file, &hp)?),
            "gemma3" => Box::new(gemma3::Gemma3::load(&file, &hp)?),
            other => return Err(Error::UnsupportedArchitecture(other.to_string())),
        };
        let backend = CpuBackend::new(opts.threads).map_err(Error::Threads)?;
        Ok(Model {
            hparams: hp,
            file: Arc::new(file),
            arch,
            backend,
        })
    }

    pub fn threads(&self) -> usize {
        self.backend.threads()
    }

    /// A KV pool able to hold `tokens` positions in total (rounded up to whole pages).
    pub fn new_kv_pool(&self, tokens: usize) -> KvPool {
        KvPool::new(KvLayout {
            n_layers: self.hparams.n_layer,
            kv_dim: self.hparams.kv_dim(),
            page_size: KV_PAGE_SIZE,
            n_pages: tokens.div_ceil(KV_PAGE_SIZE).max(1),
        })
    }

    /// One forward pass over a batch of sequences. Returns the wanted logits rows, in input order,
    /// concatenated ([rows, n_vocab]). On error no sequence has advanced.
    pub fn forward(&self, kv: &mut KvPool, inputs: &mut [SeqInput<'_>]) -> Result<Vec<f32>, Error> {
        let max_ctx = self.hparams.n_ctx_train;
        for s in inputs.iter() {
            if let Some(&t) = s
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.hparams.n_vocab)
            {
                return Err(Error::BadToken {
                    token: t,
                    n_vocab: self.hparams.n_vocab,
                });
            }
            if s.cache.len() + s.tokens.len() > max_ctx {
                return Err(crate::kv::KvError::ContextFull {
                    len: s.cache.len(),
                    adding: s.tokens.len(),
                    max: max_ctx,
                }
                .into());
            }
        }
        // Reserve for all sequences first so a failure leaves nothing half-done.
        for i in 0..inputs.len() {
            let (tokens, cache) = (inputs[i].tokens.len(), &mut *inputs[i].cache);
            if let Err(e) = kv.reserve(cache, tokens) {
                for s in inputs[..i].iter_mut() {
                    kv.trim(s.cache);
                }
                return Err(e.into());
            }
        }
        let batch = Batch::new(inputs);
        if batch.len() == 0 {
            return Ok(Vec::new());
        }
        let logits = self
            .backend
            .install(|| self.arch.forward(&self.backend, kv, &batch, inputs));
        self.backend.rest();
        for s in inputs.iter_mut() {
            kv.advance(s.cache, s.tokens.len());
        }
        Ok(logits)
    }
}

#[cfg(test)]
mod tests;
