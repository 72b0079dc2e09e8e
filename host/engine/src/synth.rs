//! Synthetic models: GGUF files with the exact shapes, metadata and quantization mix of a real
//! architecture, but seeded random weights. They load and run like the real thing, so benchmarks
//! and tests can use an 8B-sized model without downloading one.
//!
//! Weights are generated per tensor, only when the writer reaches that tensor, so a multi-gigabyte
//! file is streamed with at most one tensor (as f32) in memory. Each tensor's values depend only
//! on the seed and the tensor's name, not on the order of generation or the number of threads:
//! the same spec always yields the same bytes, and changing `n_layer` leaves the other tensors as
//! they were.
//!
//! Scales are chosen so that activations stay finite through any depth: matrices are
//! ~N(0, 1/fan_in) (fan_in = the row length, GGUF `shape[0]`), norm weights ~1, biases small. The
//! logits are meaningless but well-behaved.

use std::path::Path;
use std::sync::mpsc;

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use rayon::prelude::*;

use crate::gguf::Value;
use crate::gguf::writer::{GgufWriter, TensorData, WriteError, f32_array, i32_array, string_array};
use crate::quant::GgmlType;
use Arch::{Gemma3, Llama, Qwen2};

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("unknown preset {name:?} (valid: {valid})")]
    UnknownPreset { name: String, valid: String },
    #[error("unknown architecture {name:?} (valid: {valid})")]
    UnknownArch { name: String, valid: String },
    #[error("unknown quantization mix {name:?} (valid: {valid})")]
    UnknownQuant { name: String, valid: String },
    #[error("invalid model shape: {0}")]
    BadSpec(String),
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// The architectures a synthetic model can have (those [`crate::Model`] loads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Gemma3,
}

impl Arch {
    pub const ALL: [Arch; 3] = [Arch::Llama, Arch::Qwen2, Arch::Gemma3];

    /// The `general.architecture` value.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }

    pub fn from_name(s: &str) -> Result<Arch, SynthError> {
        Self::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| SynthError::UnknownArch {
                name: s.to_string(),
                valid: join(Self::ALL.iter().map(|a| a.name())),
            })
    }
}

/// Which tensor types a model is written with, named after llama.cpp's file types.
///
/// The uniform mixes put every matrix in one type (as `llama-quantize --pure`); `q4_k_m` follows
/// llama.cpp's Q4_K_M recipe. In every mix, norms and biases are F32, and a matrix whose rows are
/// not a whole number of blocks of its type falls back to a 32-element type (or F16), as
/// llama.cpp does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantMix {
    F32,
    F16,
    Q8_0,
    Q4_0,
    /// Q4_K, with Q6_K for the output projection and for `attn_v` / `ffn_down` in the layers
    /// llama.cpp gives more bits (the first and last eighth, and every third layer in between).
    Q4KM,
    Q6K,
}

impl QuantMix {
    pub const ALL: [QuantMix; 6] = [
        QuantMix::F32,
        QuantMix::F16,
        QuantMix::Q8_0,
        QuantMix::Q4_0,
        QuantMix::Q4KM,
        QuantMix::Q6K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            QuantMix::F32 => "f32",
            QuantMix::F16 => "f16",
            QuantMix::Q8_0 => "q8_0",
            QuantMix::Q4_0 => "q4_0",
            QuantMix::Q4KM => "q4_k_m",
            QuantMix::Q6K => "q6_k",
        }
    }

    pub fn from_name(s: &str) -> Result<QuantMix, SynthError> {
        Self::ALL
            .into_iter()
            .find(|q| q.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| SynthError::UnknownQuant {
                name: s.to_string(),
                valid: join(Self::ALL.iter().map(|q| q.name())),
            })
    }

    /// llama.cpp's `llama_ftype` number, stored as `general.file_type`.
    pub fn file_type(self) -> u32 {
        match self {
            QuantMix::F32 => 0,
            QuantMix::F16 => 1,
            QuantMix::Q4_0 => 2,
            QuantMix::Q8_0 => 7,
            QuantMix::Q4KM => 15,
            QuantMix::Q6K => 18,
        }
    }

    /// The type of a weight matrix, before any fallback for odd row lengths.
    fn matrix_type(self, role: Role, layer: usize, spec: &SynthSpec) -> GgmlType {
        match self {
            QuantMix::F32 => GgmlType::F32,
            QuantMix::F16 => GgmlType::F16,
            QuantMix::Q8_0 => GgmlType::Q8_0,
            QuantMix::Q4_0 => GgmlType::Q4_0,
            QuantMix::Q6K => GgmlType::Q6K,
            QuantMix::Q4KM => match role {
                // A tied embedding is also the output projection and gets the output's type.
                Role::Output => GgmlType::Q6K,
                Role::TokenEmbd if spec.tied_embeddings => GgmlType::Q6K,
                Role::AttnV | Role::FfnDown if use_more_bits(layer, spec.n_layer) => GgmlType::Q6K,
                _ => GgmlType::Q4K,
            },
        }
    }
}

/// llama.cpp's choice of layers that get more bits in the `_M` K-quant mixes.
fn use_more_bits(layer: usize, n_layer: usize) -> bool {
    let (layer, n) = (layer as i64, n_layer as i64);
    layer < n / 8 || layer >= 7 * n / 8 || (layer - n / 8).rem_euclid(3) == 2
}

/// `ty` if a row of `row_len` elements is a whole number of its blocks; otherwise llama.cpp's
/// replacement: a 32-element type of similar precision, or F16 when even that doesn't fit.
fn fit_row(ty: GgmlType, row_len: usize) -> GgmlType {
    if row_len.is_multiple_of(ty.block_size()) {
        return ty;
    }
    let alt = match ty {
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        GgmlType::Q6K => GgmlType::Q8_0,
        _ => GgmlType::F16,
    };
    if row_len.is_multiple_of(alt.block_size()) {
        alt
    } else {
        GgmlType::F16
    }
}

/// The shape of a synthetic model. Fields mirror the `{arch}.*` GGUF keys.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthSpec {
    /// `general.name`.
    pub name: String,
    pub arch: Arch,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    /// Training context length (`context_length`): the most positions a session may hold.
    pub n_ctx: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    /// Sliding-window size of the local layers (Gemma 3 only, where it is required).
    pub sliding_window: Option<usize>,
    /// No `output.weight`: the token embedding doubles as the output projection.
    pub tied_embeddings: bool,
    pub quant: QuantMix,
    pub seed: u64,
}

/// A named shape: a real model's hyperparameters, or a tiny one for tests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    pub arch: Arch,
    n_vocab: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    n_ff: usize,
    n_ctx: usize,
    rope_base: f32,
    rms_eps: f32,
    tied_embeddings: bool,
    /// 0: none.
    sliding_window: usize,
}

#[allow(clippy::too_many_arguments)]
const fn p(
    name: &'static str,
    arch: Arch,
    n_vocab: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    n_ff: usize,
    n_ctx: usize,
    rope_base: f32,
    rms_eps: f32,
    tied_embeddings: bool,
    sliding_window: usize,
) -> Preset {
    Preset {
        name,
        arch,
        n_vocab,
        n_embd,
        n_layer,
        n_head,
        n_head_kv,
        head_dim,
        n_ff,
        n_ctx,
        rope_base,
        rms_eps,
        tied_embeddings,
        sliding_window,
    }
}

/// Every preset. Llama 3.1's `rope_freqs.weight` (long-context frequency scaling) is left out: it
/// changes no shape and no cost. The tiny ones have 8 layers so that Q4_K_M's per-layer choices
/// show, and rows of 256 so that K-quants apply, except tiny-qwen2, whose rows of 192 exercise the
/// fallback types as the real Qwen2.5 0.5B's 896 does.
#[rustfmt::skip]
pub const PRESETS: &[Preset] = &[
    // name, arch, vocab, dim, layers, heads, kv heads, head dim, ff, context, rope base, rms eps,
    // tied embeddings, sliding window (0: none)
    p("llama-3.1-8b",   Llama,  128256, 4096, 32, 32,  8, 128, 14336, 131072, 5e5, 1e-5, false, 0),
    p("llama-3.2-1b",   Llama,  128256, 2048, 16, 32,  8,  64,  8192, 131072, 5e5, 1e-5,  true, 0),
    p("llama-2-7b",     Llama,   32000, 4096, 32, 32, 32, 128, 11008,   4096, 1e4, 1e-5, false, 0),
    p("tinyllama-1.1b", Llama,   32000, 2048, 22, 32,  4,  64,  5632,   2048, 1e4, 1e-5, false, 0),
    p("qwen2.5-0.5b",   Qwen2,  151936,  896, 24, 14,  2,  64,  4864,  32768, 1e6, 1e-6,  true, 0),
    p("qwen2.5-7b",     Qwen2,  152064, 3584, 28, 28,  4, 128, 18944,  32768, 1e6, 1e-6, false, 0),
    p("gemma3-270m",    Gemma3, 262144,  640, 18,  4,  1, 256,  2048,  32768, 1e6, 1e-6,  true, 512),
    p("gemma3-1b",      Gemma3, 262144, 1152, 26,  4,  1, 256,  6912,  32768, 1e6, 1e-6,  true, 512),
    p("tiny-llama",     Llama,     512,  256,  8,  4,  2,  64,   512,    256, 1e4, 1e-5, false, 0),
    p("tiny-qwen2",     Qwen2,     512,  192,  8,  3,  1,  64,   512,    256, 1e6, 1e-6,  true, 0),
    p("tiny-gemma3",    Gemma3,    512,  256,  8,  4,  1,  64,   512,    256, 1e6, 1e-6,  true, 8),
];

impl SynthSpec {
    /// A named preset (see [`PRESETS`]), with the `q4_k_m` mix and seed 0.
    pub fn preset(name: &str) -> Result<SynthSpec, SynthError> {
        let p = PRESETS
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
            .ok_or_else(|| SynthError::UnknownPreset {
                name: name.to_string(),
                valid: join(PRESETS.iter().map(|p| p.name)),
            })?;
        Ok(SynthSpec {
            name: format!("{} (synthetic)", p.name),
            arch: p.arch,
            n_vocab: p.n_vocab,
            n_embd: p.n_embd,
            n_layer: p.n_layer,
            n_head: p.n_head,
            n_head_kv: p.n_head_kv,
            head_dim: p.head_dim,
            n_ff: p.n_ff,
            n_ctx: p.n_ctx,
            rope_base: p.rope_base,
            rms_eps: p.rms_eps,
            sliding_window: (p.sliding_window > 0).then_some(p.sliding_window),
            tied_embeddings: p.tied_embeddings,
            quant: QuantMix::Q4KM,
            seed: 0,
        })
    }

    /// Checks that the shape is one the loaders accept and the writer can encode.
    pub fn validate(&self) -> Result<(), SynthError> {
        let bad = |m: String| Err(SynthError::BadSpec(m));
        let dims = [
            ("vocabulary size", self.n_vocab),
            ("embedding length", self.n_embd),
            ("layer count", self.n_layer),
            ("head count", self.n_head),
            ("key-value head count", self.n_head_kv),
            ("head dimension", self.head_dim),
            ("feed-forward length", self.n_ff),
            ("context length", self.n_ctx),
        ];
        for (what, v) in dims {
            if v == 0 || u32::try_from(v).is_err() {
                return bad(format!("{what} {v} must be between 1 and {}", u32::MAX));
            }
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad(format!(
                "{} query heads cannot be grouped over {} key-value heads",
                self.n_head, self.n_head_kv
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head dimension {} must be even (RoPE rotates pairs)",
                self.head_dim
            ));
        }
        if self.n_vocab < FIRST_FILLER {
            return bad(format!(
                "vocabulary of {} tokens is too small for the 3 special and 256 byte tokens",
                self.n_vocab
            ));
        }
        match (self.arch, self.sliding_window) {
            (Arch::Gemma3, None | Some(0)) => {
                return bad("gemma3 needs a non-zero sliding window".into());
            }
            (Arch::Gemma3, Some(w)) if u32::try_from(w).is_err() => {
                return bad(format!("sliding window {w} does not fit in 32 bits"));
            }
            _ => {}
        }
        if !(self.rope_base.is_finite() && self.rope_base > 0.0) {
            return bad(format!("RoPE base {} must be positive", self.rope_base));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0) {
            return bad(format!("RMS epsilon {} must be positive", self.rms_eps));
        }
        // Every tensor's f32 values must be addressable (the widest rows times n_embd).
        let qd = self.n_head.checked_mul(self.head_dim);
        let fits = [Some(self.n_vocab), qd, Some(self.n_ff)]
            .into_iter()
            .all(|rows| {
                rows.and_then(|r| r.checked_mul(self.n_embd))
                    .is_some_and(|n| n <= isize::MAX as usize / 4)
            });
        if !fits {
            return bad("a tensor would have more elements than fit in memory".into());
        }
        Ok(())
    }

    /// Every tensor of the model, in file order, with its shape and type.
    pub fn tensors(&self) -> Vec<TensorPlan> {
        let (d, qd, kvd, ff, hd) = (
            self.n_embd,
            self.n_head * self.head_dim,
            self.n_head_kv * self.head_dim,
            self.n_ff,
            self.head_dim,
        );
        let mut out = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, role: Role, layer: usize| {
            let ty = match role {
                Role::Norm | Role::Bias => GgmlType::F32,
                _ => fit_row(self.quant.matrix_type(role, layer, self), shape[0]),
            };
            out.push(TensorPlan {
                name,
                shape,
                ty,
                role,
            });
        };
        add(
            "token_embd.weight".into(),
            vec![d, self.n_vocab],
            Role::TokenEmbd,
            0,
        );
        for i in 0..self.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            add(n("attn_norm.weight"), vec![d], Role::Norm, i);
            add(n("attn_q.weight"), vec![d, qd], Role::AttnQ, i);
            add(n("attn_k.weight"), vec![d, kvd], Role::AttnK, i);
            add(n("attn_v.weight"), vec![d, kvd], Role::AttnV, i);
            if self.arch == Arch::Qwen2 {
                add(n("attn_q.bias"), vec![qd], Role::Bias, i);
                add(n("attn_k.bias"), vec![kvd], Role::Bias, i);
                add(n("attn_v.bias"), vec![kvd], Role::Bias, i);
            }
            if self.arch == Arch::Gemma3 {
                add(n("attn_q_norm.weight"), vec![hd], Role::Norm, i);
                add(n("attn_k_norm.weight"), vec![hd], Role::Norm, i);
            }
            add(n("attn_output.weight"), vec![qd, d], Role::AttnOut, i);
            if self.arch == Arch::Gemma3 {
                add(n("post_attention_norm.weight"), vec![d], Role::Norm, i);
            }
            add(n("ffn_norm.weight"), vec![d], Role::Norm, i);
            add(n("ffn_gate.weight"), vec![d, ff], Role::FfnGate, i);
            add(n("ffn_up.weight"), vec![d, ff], Role::FfnUp, i);
            add(n("ffn_down.weight"), vec![ff, d], Role::FfnDown, i);
            if self.arch == Arch::Gemma3 {
                add(n("post_ffw_norm.weight"), vec![d], Role::Norm, i);
            }
        }
        add("output_norm.weight".into(), vec![d], Role::Norm, 0);
        if !self.tied_embeddings {
            add(
                "output.weight".into(),
                vec![d, self.n_vocab],
                Role::Output,
                0,
            );
        }
        out
    }

    /// Number of weights (elements over all tensors).
    pub fn n_params(&self) -> u64 {
        self.tensors().iter().map(|t| t.n_elements()).sum()
    }

    fn metadata(&self, w: &mut GgufWriter) {
        let arch = self.arch.name();
        let key = |k: &str| format!("{arch}.{k}");
        let u32v = |v: usize| Value::U32(v as u32); // validate() bounds every dimension
        w.set("general.architecture", Value::String(arch.into()))
            .set("general.type", Value::String("model".into()))
            .set("general.name", Value::String(self.name.clone()))
            .set("general.file_type", Value::U32(self.quant.file_type()))
            .set("general.quantization_version", Value::U32(2))
            .set(key("context_length"), u32v(self.n_ctx))
            .set(key("embedding_length"), u32v(self.n_embd))
            .set(key("block_count"), u32v(self.n_layer))
            .set(key("feed_forward_length"), u32v(self.n_ff))
            .set(key("attention.head_count"), u32v(self.n_head))
            .set(key("attention.head_count_kv"), u32v(self.n_head_kv))
            .set(key("attention.key_length"), u32v(self.head_dim))
            .set(key("attention.value_length"), u32v(self.head_dim))
            .set(
                key("attention.layer_norm_rms_epsilon"),
                Value::F32(self.rms_eps),
            )
            .set(key("rope.freq_base"), Value::F32(self.rope_base))
            .set(key("rope.dimension_count"), u32v(self.head_dim));
        if self.arch == Arch::Llama {
            w.set(key("vocab_size"), u32v(self.n_vocab));
        }
        if let Some(win) = self.sliding_window.filter(|_| self.arch == Arch::Gemma3) {
            w.set(key("attention.sliding_window"), u32v(win));
        }

        // A SentencePiece-style vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then filler.
        let mut tokens = Vec::with_capacity(self.n_vocab);
        let mut types = Vec::with_capacity(self.n_vocab);
        let mut scores = Vec::with_capacity(self.n_vocab);
        for (tok, ty) in [
            ("<unk>", TOKEN_UNKNOWN),
            ("<s>", TOKEN_CONTROL),
            ("</s>", TOKEN_CONTROL),
        ] {
            tokens.push(tok.to_string());
            types.push(ty);
            scores.push(0.0);
        }
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(TOKEN_BYTE);
            scores.push(0.0);
        }
        for i in FIRST_FILLER..self.n_vocab {
            tokens.push(format!("tok_{i}"));
            types.push(TOKEN_NORMAL);
            scores.push(-((i - FIRST_FILLER) as f32));
        }
        w.set("tokenizer.ggml.model", Value::String("llama".into()))
            .set("tokenizer.ggml.pre", Value::String("default".into()))
            .set("tokenizer.ggml.tokens", string_array(&tokens))
            .set("tokenizer.ggml.scores", f32_array(&scores))
            .set("tokenizer.ggml.token_type", i32_array(&types))
            .set("tokenizer.ggml.unknown_token_id", Value::U32(0))
            .set("tokenizer.ggml.bos_token_id", Value::U32(1))
            .set("tokenizer.ggml.eos_token_id", Value::U32(2))
            .set("tokenizer.ggml.add_bos_token", Value::Bool(true))
            .set("tokenizer.ggml.add_eos_token", Value::Bool(false));
    }

    /// A writer holding the metadata and one lazy generator per tensor. Each generator sends its
    /// tensor's index on `started` (if given) when the writer calls it.
    fn writer(&self, started: Option<mpsc::Sender<usize>>) -> GgufWriter {
        let mut w = GgufWriter::new();
        self.metadata(&mut w);
        for (i, t) in self.tensors().into_iter().enumerate() {
            let seed = tensor_seed(self.seed, &t.name);
            let n = t.n_elements() as usize;
            let init = t.init();
            let started = started.clone();
            let gen_fn = move || {
                if let Some(tx) = started {
                    // The receiver only goes away if the caller is unwinding; nothing to report to.
                    let _ = tx.send(i);
                }
                generate(seed, n, init)
            };
            w.add_tensor(&t.name, t.ty, &t.shape, TensorData::Lazy(Box::new(gen_fn)));
        }
        w
    }

    /// Size in bytes of the file [`write`] produces for this spec.
    pub fn file_size(&self) -> Result<u64, SynthError> {
        self.validate()?;
        let crate::gguf::writer::Header {
            bytes: header,
            offsets,
            sizes,
        } = self.writer(None).header()?;
        let align = crate::gguf::DEFAULT_ALIGNMENT;
        let data = match (offsets.last(), sizes.last()) {
            (Some(o), Some(s)) => (o + s).div_ceil(align) * align,
            _ => 0,
        };
        Ok(header.len() as u64 + data)
    }
}

/// One tensor of a synthetic model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorPlan {
    pub name: String,
    /// GGUF order: `shape[0]` is the row (input) length.
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    role: Role,
}

impl TensorPlan {
    pub fn n_elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    fn init(&self) -> Init {
        match self.role {
            Role::Norm => Init {
                mean: 1.0,
                std: 0.05,
            },
            Role::Bias => Init {
                mean: 0.0,
                std: 0.02,
            },
            _ => Init {
                mean: 0.0,
                std: 1.0 / (self.shape[0] as f32).sqrt(),
            },
        }
    }
}

/// What a tensor is for: decides its type in a mix and how its values are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    TokenEmbd,
    Output,
    Norm,
    Bias,
    AttnQ,
    AttnK,
    AttnV,
    AttnOut,
    FfnGate,
    FfnUp,
    FfnDown,
}

#[derive(Clone, Copy, Debug)]
struct Init {
    mean: f32,
    std: f32,
}

// llama.cpp's token_type codes.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_BYTE: i32 = 6;
/// Id of the first filler token, after <unk>, <s>, </s> and the 256 byte tokens.
const FIRST_FILLER: usize = 3 + 256;

/// Elements generated from one RNG stream. Fixed (not derived from the thread count) so that the
/// values do not depend on how many threads generated them.
const CHUNK: usize = 1 << 16;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Seed of a tensor's streams: the spec's seed and the tensor's name (FNV-1a), so that a tensor
/// keeps its values whatever else is in the file.
fn tensor_seed(seed: u64, name: &str) -> u64 {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    splitmix64(seed ^ splitmix64(h))
}

fn generate(seed: u64, n: usize, init: Init) -> Vec<f32> {
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = SmallRng::seed_from_u64(splitmix64(seed ^ splitmix64(i as u64)));
            fill_normal(&mut rng, chunk, init);
        });
    out
}

/// Approximately normal values: the sum of four 16-bit uniforms (Irwin–Hall), rescaled to unit
/// variance. One RNG draw per value and no transcendental functions, so an 8B model's worth is
/// cheap; the tails are cut at ±3.5σ, which weights don't miss.
fn fill_normal(rng: &mut SmallRng, out: &mut [f32], init: Init) {
    // The sum of four U[0, 1) has mean 2 and variance 4/12.
    let scale = init.std * 3f32.sqrt() / 65536.0;
    for v in out.iter_mut() {
        let r = rng.next_u64();
        let sum = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
        // + 2 moves each term to the middle of its cell, so the sum is centred on 2 * 65536.
        *v = init.mean + (sum as f32 + 2.0 - 2.0 * 65536.0) * scale;
    }
}

fn join<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}

/// What [`write`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
}

/// Writes `spec` as a GGUF file at `path`, atomically (nothing appears at `path` unless the file
/// is complete). `progress(done_tensors, total_tensors, bytes_written)` is called from this thread
/// before each tensor is generated and once at the end.
pub fn write(
    spec: &SynthSpec,
    path: impl AsRef<Path>,
    progress: &mut dyn FnMut(usize, usize, u64),
) -> Result<Summary, SynthError> {
    let path = path.as_ref();
    spec.validate()?;
    let (tx, rx) = mpsc::channel();
    let writer = spec.writer(Some(tx));
    let crate::gguf::writer::Header {
        bytes: header,
        offsets,
        sizes,
    } = writer.header()?;
    let header_len = header.len() as u64;
    drop(header);
    let total = offsets.len();

    // The writer reaches tensor i only once tensors 0..i are written; it says so by calling
    // tensor i's generator. Running it on its own thread turns those calls into `progress` calls
    // here, without asking the callback to be Send or 'static.
    let result = std::thread::scope(|s| {
        let worker = s.spawn(move || writer.write_file(path));
        for i in rx {
            let bytes = match i.checked_sub(1) {
                None => header_len,
                Some(prev) => header_len + offsets[prev] + sizes[prev],
            };
            progress(i, total, bytes);
        }
        worker.join()
    });
    match result {
        Ok(r) => r?,
        Err(panic) => std::panic::resume_unwind(panic),
    }
    let bytes = std::fs::metadata(path)
        .map_err(|e| SynthError::Write(WriteError::Io(e)))?
        .len();
    progress(total, total, bytes);
    Ok(Summary {
        tensors: total,
        params: spec.n_params(),
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_valid() {
        for p in PRESETS {
            let s = SynthSpec::preset(p.name).unwrap();
            s.validate().unwrap_or_else(|e| panic!("{}: {e}", p.name));
        }
        let e = SynthSpec::preset("llama-9000").unwrap_err().to_string();
        assert!(
            e.contains("llama-3.1-8b") && e.contains("tiny-gemma3"),
            "{e}"
        );
    }

    #[test]
    fn more_bits_layers_match_llama_cpp() {
        // Gemma 3 270M Q4_K_M as published: attn_v / ffn_down are Q8_0 / Q6_K in these layers.
        let more: Vec<usize> = (0..18).filter(|&i| use_more_bits(i, 18)).collect();
        assert_eq!(more, [0, 1, 4, 7, 10, 13, 15, 16, 17]);
    }

    #[test]
    fn fallback_types() {
        assert_eq!(fit_row(GgmlType::Q4K, 640), GgmlType::Q5_0);
        assert_eq!(fit_row(GgmlType::Q6K, 896), GgmlType::Q8_0);
        assert_eq!(fit_row(GgmlType::Q4K, 1024), GgmlType::Q4K);
        assert_eq!(fit_row(GgmlType::Q4_0, 100), GgmlType::F16);
    }

    #[test]
    fn gemma3_270m_q4_k_m_types_match_the_published_file() {
        let s = SynthSpec::preset("gemma3-270m").unwrap();
        let ty = |name: &str| s.tensors().into_iter().find(|t| t.name == name).unwrap().ty;
        assert_eq!(ty("token_embd.weight"), GgmlType::Q8_0);
        assert_eq!(ty("blk.0.attn_q.weight"), GgmlType::Q5_0);
        assert_eq!(ty("blk.0.attn_v.weight"), GgmlType::Q8_0);
        assert_eq!(ty("blk.2.attn_v.weight"), GgmlType::Q5_0);
        assert_eq!(ty("blk.0.attn_output.weight"), GgmlType::Q4K);
        assert_eq!(ty("blk.0.ffn_down.weight"), GgmlType::Q6K);
        assert_eq!(ty("blk.2.ffn_down.weight"), GgmlType::Q4K);
        assert_eq!(ty("blk.0.attn_k_norm.weight"), GgmlType::F32);
    }

    #[test]
    fn normal_ish_values() {
        let v = generate(
            7,
            200_000,
            Init {
                mean: 0.5,
                std: 2.0,
            },
        );
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.02, "std {}", var.sqrt());
        assert_eq!(
            v,
            generate(
                7,
                200_000,
                Init {
                    mean: 0.5,
                    std: 2.0
                }
            )
        );
    }
}
