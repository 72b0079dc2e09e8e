//! Model loading and the forward pass's entry point.
//!
//! Each architecture lives in its own file (`llama.rs` — which also covers Qwen 2 —,
//! `gemma3.rs`), readable top to bottom: its weights with their shapes, registered in a
//! [`crate::graph::WeightSet`], then its forward pass described once as a [`Graph`] built from the shared
//! blocks of [`crate::graph::GraphBuilder`]. A [`Model`] pairs that graph with a
//! [`Backend`] that runs it; what is here is the architecture-independent part: hyperparameters
//! from GGUF metadata, checks and KV reservations before a pass, the [`Pass`] description.

mod gemma3;
mod llama;

use std::path::Path;
use std::sync::Arc;

use crate::Error;

use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::gguf::GgufFile;
use crate::graph::{AttnParams, Graph, OpHook, Pass, PassSeq, PrintTensors, Rope};
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

/// The pass over `inputs`, whose caches have room for their tokens.
fn pass_of<'a>(inputs: &'a [SeqInput<'_>], page_size: usize) -> Pass<'a> {
    let mut p = Pass {
        tokens: Vec::new(),
        pos: Vec::new(),
        seqs: Vec::with_capacity(inputs.len()),
        out_rows: Vec::new(),
        page_size,
    };
    for s in inputs {
        let start = p.tokens.len();
        let pos0 = s.cache.len();
        p.tokens.extend_from_slice(s.tokens);
        p.pos.extend((0..s.tokens.len()).map(|i| pos0 + i));
        p.seqs.push(PassSeq {
            start,
            len: s.tokens.len(),
            pos0,
            pages: s.cache.pages(),
        });
        match s.logits {
            LogitsWanted::None => {}
            LogitsWanted::Last if !s.tokens.is_empty() => {
                p.out_rows.push(start + s.tokens.len() - 1)
            }
            LogitsWanted::Last => {}
            LogitsWanted::All => p.out_rows.extend(start..start + s.tokens.len()),
        }
    }
    p
}

/// Opens the CUDA backend on GPU `ordinal`, with a one-line description of the device.
#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<(Box<dyn Backend>, String), Error> {
    let cache = crate::backend::cuda::default_cache_dir();
    let b = crate::backend::cuda::CudaBackend::open(ordinal, cache.as_deref())
        .map_err(|e| Error::Backend(crate::backend::BackendError::Device(e.to_string())))?;
    let d = b.device();
    let info = format!(
        "{}, {} kernels",
        d.info(),
        if d.fast { "fast" } else { "reference" }
    );
    Ok((Box::new(b), info))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> Result<(Box<dyn Backend>, String), Error> {
    Err(Error::Backend(crate::backend::BackendError::Device(
        "this build has no CUDA support (build with `--features cuda`)".into(),
    )))
}

/// Whether `REALM_DEBUG_TENSORS` asks for every named tensor of every pass on stderr.
fn debug_tensors() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("REALM_DEBUG_TENSORS").is_some())
}

/// Which backend runs a model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The CPU.
    #[default]
    Cpu,
    /// An NVIDIA GPU (builds with the `cuda` feature); an error if none can be used.
    Cuda,
    /// CUDA when a driver and a device are present (and the build has the feature), else the
    /// CPU; [`Model::backend_note`] says which and why.
    Auto,
}

impl BackendChoice {
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "cpu" => Some(Self::Cpu),
            "cuda" => Some(Self::Cuda),
            "auto" => Some(Self::Auto),
            _ => None,
        }
    }
}

/// Options for [`Model::load`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// CPU worker threads; 0 = one per physical core.
    pub threads: usize,
    pub backend: BackendChoice,
    /// Which GPU (CUDA device ordinal) for a GPU backend.
    pub gpu: usize,
    /// CPU backend: make every sequence's logits independent of the rest of the batch
    /// ([`CpuBackend::set_batch_invariant`]).
    pub batch_invariant: bool,
}

/// A loaded model: the mapping, its hyperparameters, its weights, its forward pass and the
/// backend that runs it.
pub struct Model {
    pub hparams: Hparams,
    pub file: Arc<GgufFile>,
    graph: Graph,
    backend: Box<dyn Backend>,
    backend_note: String,
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

    /// The model on the backend `opts` asks for.
    pub fn from_gguf(file: GgufFile, opts: &LoadOptions) -> Result<Self, Error> {
        let cpu = || -> Result<Box<dyn Backend>, Error> {
            let mut b = CpuBackend::new(opts.threads).map_err(Error::Threads)?;
            b.set_batch_invariant(opts.batch_invariant);
            Ok(Box::new(b))
        };
        let (backend, note) = match opts.backend {
            BackendChoice::Cpu => (cpu()?, "cpu (asked for)".to_string()),
            BackendChoice::Cuda => {
                let (b, info) = open_cuda(opts.gpu)?;
                (b, format!("cuda (asked for): {info}"))
            }
            BackendChoice::Auto => match open_cuda(opts.gpu) {
                Ok((b, info)) => (b, format!("cuda (auto): {info}")),
                Err(e) => (cpu()?, format!("cpu (auto: {e})")),
            },
        };
        let mut m = Self::with_backend(file, backend)?;
        m.backend_note = note;
        Ok(m)
    }

    /// The model on `backend`, which receives its weights here.
    pub fn with_backend(file: GgufFile, mut backend: Box<dyn Backend>) -> Result<Self, Error> {
        let hp = Hparams::from_gguf(&file)?;
        let (weights, graph) = match hp.arch.as_str() {
            "llama" | "mistral" => llama::build(&file, &hp, llama::Flavor::Llama)?,
            "qwen2" => llama::build(&file, &hp, llama::Flavor::Qwen2)?,
            "gemma3" => gemma3::build(&file, &hp)?,
            other => return Err(Error::UnsupportedArchitecture(other.to_string())),
        };
        backend.load_weights(Arc::new(weights))?;
        let backend_note = backend.name().to_string();
        Ok(Model {
            hparams: hp,
            file: Arc::new(file),
            graph,
            backend,
            backend_note,
        })
    }

    /// Which backend runs the model and why (`cuda (auto): cuda:0 NVIDIA H100 ...`, or
    /// `cpu (auto: no CUDA driver library ...)`): one line for logs.
    pub fn backend_note(&self) -> &str {
        &self.backend_note
    }

    pub fn threads(&self) -> usize {
        self.backend.threads()
    }

    /// The backend running this model (`cpu`, `reference`, `cuda`).
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// The forward pass, as its backend runs it.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// A KV pool able to hold `tokens` positions in total (rounded up to whole pages), its pages
    /// in the backend's memory.
    pub fn new_kv_pool(&self, tokens: usize) -> Result<KvPool, Error> {
        let layout = KvLayout {
            n_layers: self.hparams.n_layer,
            kv_dim: self.hparams.kv_dim(),
            page_size: KV_PAGE_SIZE,
            n_pages: tokens.div_ceil(KV_PAGE_SIZE).max(1),
        };
        Ok(KvPool::new(layout, self.backend.new_kv(layout)?))
    }

    /// One forward pass over a batch of sequences. Returns the wanted logits rows, in input order,
    /// concatenated ([rows, n_vocab]). On error no sequence has advanced.
    pub fn forward(&self, kv: &mut KvPool, inputs: &mut [SeqInput<'_>]) -> Result<Vec<f32>, Error> {
        let mut print = debug_tensors().then_some(PrintTensors);
        self.run(kv, inputs, print.as_mut().map(|p| p as &mut dyn OpHook))
    }

    /// [`Model::forward`], showing `hook` every tensor the graph names (llama.cpp's names:
    /// `attn_norm-0`, `Qcur-0`, …, `result_output`) after the op that computed it.
    pub fn forward_with_hook(
        &self,
        kv: &mut KvPool,
        inputs: &mut [SeqInput<'_>],
        hook: &mut dyn OpHook,
    ) -> Result<Vec<f32>, Error> {
        self.run(kv, inputs, Some(hook))
    }

    fn run(
        &self,
        kv: &mut KvPool,
        inputs: &mut [SeqInput<'_>],
        hook: Option<&mut dyn OpHook>,
    ) -> Result<Vec<f32>, Error> {
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
        let page_size = kv.layout().page_size;
        let pass = pass_of(inputs, page_size);
        if pass.is_empty() {
            return Ok(Vec::new());
        }
        let result = self
            .backend
            .execute(&self.graph, &pass, kv.storage_mut(), hook);
        drop(pass);
        match result {
            Ok(logits) => {
                for s in inputs.iter_mut() {
                    kv.advance(s.cache, s.tokens.len());
                }
                Ok(logits)
            }
            Err(e) => {
                for s in inputs.iter_mut() {
                    kv.trim(s.cache);
                }
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests;
