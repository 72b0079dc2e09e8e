//! `llama`: Llama 2/3, Mistral, TinyLlama and their many fine-tunes.
//!
//! Pre-norm decoder: x += Wo·attn(rope(Wq·n(x)), rope(Wk·n(x)), Wv·n(x)); x += W2·(silu(W1·n(x)) ⊙
//! W3·n(x)). Grouped-query attention; "normal" RoPE on adjacent pairs (the GGUF converter permutes
//! Q/K rows so that this matches the Hugging Face layout). Optional `rope_freqs.weight` carries
//! Llama 3.1's per-frequency divisors; `rope.scaling.*` keys select linear or YaRN scaling.

use super::{Architecture, Batch, Hparams, SeqInput, attend, rope_rows, vector, weight};
use crate::Error;
use crate::backend::cpu::{self, AttnParams, CpuBackend, Rope};
use crate::gguf::{GgufFile, TensorView};
use crate::kv::KvPool;

struct Layer {
    attn_norm: Vec<f32>, // [n_embd]
    wq: TensorView,      // [n_embd] -> [n_head * head_dim]
    wk: TensorView,      // [n_embd] -> [n_head_kv * head_dim]
    wv: TensorView,      // [n_embd] -> [n_head_kv * head_dim]
    wo: TensorView,      // [n_head * head_dim] -> [n_embd]
    ffn_norm: Vec<f32>,  // [n_embd]
    w_gate: TensorView,  // [n_embd] -> [n_ff]
    w_up: TensorView,    // [n_embd] -> [n_ff]
    w_down: TensorView,  // [n_ff] -> [n_embd]
}

pub(super) struct Llama {
    hp: Hparams,
    tok_embd: TensorView, // [n_embd] x n_vocab rows
    layers: Vec<Layer>,
    output_norm: Vec<f32>, // [n_embd]
    output: TensorView,    // [n_embd] -> [n_vocab] (token_embd when tied)
    rope: Rope,
    attn: AttnParams,
}

impl Llama {
    pub(super) fn load(f: &GgufFile, hp: &Hparams) -> Result<Self, Error> {
        let (d, qd, kvd, ff) = (hp.n_embd, hp.n_head * hp.head_dim, hp.kv_dim(), hp.n_ff);
        let tok_embd = weight(f, "token_embd.weight", &[d, hp.n_vocab])?;
        let output = match f.tensor("output.weight") {
            Some(_) => weight(f, "output.weight", &[d, hp.n_vocab])?,
            None => tok_embd.clone(),
        };
        let mut layers = Vec::new();
        for i in 0..hp.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            layers.push(Layer {
                attn_norm: vector(f, &n("attn_norm.weight"), d)?,
                wq: weight(f, &n("attn_q.weight"), &[d, qd])?,
                wk: weight(f, &n("attn_k.weight"), &[d, kvd])?,
                wv: weight(f, &n("attn_v.weight"), &[d, kvd])?,
                wo: weight(f, &n("attn_output.weight"), &[qd, d])?,
                ffn_norm: vector(f, &n("ffn_norm.weight"), d)?,
                w_gate: weight(f, &n("ffn_gate.weight"), &[d, ff])?,
                w_up: weight(f, &n("ffn_up.weight"), &[d, ff])?,
                w_down: weight(f, &n("ffn_down.weight"), &[ff, d])?,
            });
        }
        let mut rope = hp.rope(false);
        if f.tensor("rope_freqs.weight").is_some() {
            rope.freq_factors = Some(vector(f, "rope_freqs.weight", hp.rope_dims / 2)?);
        }
        Ok(Llama {
            hp: hp.clone(),
            tok_embd,
            layers,
            output_norm: vector(f, "output_norm.weight", d)?,
            output,
            rope,
            attn: hp.attn(None),
        })
    }
}

impl Architecture for Llama {
    fn forward(
        &self,
        be: &CpuBackend,
        kv: &mut KvPool,
        batch: &Batch,
        inputs: &[SeqInput<'_>],
    ) -> Vec<f32> {
        let hp = &self.hp;
        let (n, d, hd) = (batch.len(), hp.n_embd, hp.head_dim);
        let (qd, kvd, ff) = (hp.n_head * hd, hp.kv_dim(), hp.n_ff);

        let mut x = vec![0f32; n * d]; // [n, n_embd] residual stream
        for (row, &t) in x.chunks_exact_mut(d).zip(&batch.tokens) {
            cpu::get_row(&self.tok_embd, t as usize, row);
        }
        let mut h = vec![0f32; n * d]; // [n, n_embd] normed input of a sub-block
        let (mut q, mut k, mut v) = (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
        let mut o = vec![0f32; n * d]; // [n, n_embd] sub-block output
        let (mut g, mut u) = (vec![0f32; n * ff], vec![0f32; n * ff]); // [n, n_ff]

        for (il, l) in self.layers.iter().enumerate() {
            cpu::rms_norm_into(&x, &l.attn_norm, hp.rms_eps, &mut h);
            be.matmuls(
                &mut [(&l.wq, &mut q), (&l.wk, &mut k), (&l.wv, &mut v)],
                &h,
                n,
            );
            rope_rows(&self.rope, &mut q, hd, batch);
            rope_rows(&self.rope, &mut k, hd, batch);
            let a = attend(be, kv, il, batch, inputs, &q, &k, &v, &self.attn); // [n, qd]
            be.matmul(&l.wo, &a, n, &mut o);
            cpu::add_in_place(&mut x, &o);

            cpu::rms_norm_into(&x, &l.ffn_norm, hp.rms_eps, &mut h);
            be.matmuls(&mut [(&l.w_gate, &mut g), (&l.w_up, &mut u)], &h, n);
            cpu::silu_mul(&mut g, &u);
            be.matmul(&l.w_down, &g, n, &mut o);
            cpu::add_in_place(&mut x, &o);
        }

        let mut xo = batch.gather_out(&x, d); // [n_out, n_embd]
        cpu::rms_norm(&mut xo, &self.output_norm, hp.rms_eps);
        let n_out = batch.out_rows.len();
        let mut logits = vec![0f32; n_out * hp.n_vocab];
        if n_out > 0 {
            be.matmul(&self.output, &xo, n_out, &mut logits);
        }
        logits
    }
}
