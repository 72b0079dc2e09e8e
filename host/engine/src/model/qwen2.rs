//! `qwen2`: Qwen 2 / 2.5.
//!
//! The Llama block with three differences: Q, K and V projections carry biases, RoPE is NeoX-style
//! (element i rotates with i + n_rot/2), and small models tie the output projection to the token
//! embedding (no `output.weight`).

use super::{Architecture, Batch, Hparams, SeqInput, attend, rope_rows, vector, weight};
use crate::Error;
use crate::backend::cpu::{self, AttnParams, CpuBackend, Rope};
use crate::gguf::{GgufFile, TensorView};
use crate::kv::KvPool;

struct Layer {
    attn_norm: Vec<f32>, // [n_embd]
    wq: TensorView,      // [n_embd] -> [n_head * head_dim]
    bq: Vec<f32>,        // [n_head * head_dim]
    wk: TensorView,      // [n_embd] -> [n_head_kv * head_dim]
    bk: Vec<f32>,        // [n_head_kv * head_dim]
    wv: TensorView,      // [n_embd] -> [n_head_kv * head_dim]
    bv: Vec<f32>,        // [n_head_kv * head_dim]
    wo: TensorView,      // [n_head * head_dim] -> [n_embd]
    ffn_norm: Vec<f32>,  // [n_embd]
    w_gate: TensorView,  // [n_embd] -> [n_ff]
    w_up: TensorView,    // [n_embd] -> [n_ff]
    w_down: TensorView,  // [n_ff] -> [n_embd]
}

pub(super) struct Qwen2 {
    hp: Hparams,
    tok_embd: TensorView, // [n_embd] x n_vocab rows
    layers: Vec<Layer>,
    output_norm: Vec<f32>, // [n_embd]
    output: TensorView,    // [n_embd] -> [n_vocab] (token_embd when tied)
    rope: Rope,
    attn: AttnParams,
}

impl Qwen2 {
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
                bq: vector(f, &n("attn_q.bias"), qd)?,
                wk: weight(f, &n("attn_k.weight"), &[d, kvd])?,
                bk: vector(f, &n("attn_k.bias"), kvd)?,
                wv: weight(f, &n("attn_v.weight"), &[d, kvd])?,
                bv: vector(f, &n("attn_v.bias"), kvd)?,
                wo: weight(f, &n("attn_output.weight"), &[qd, d])?,
                ffn_norm: vector(f, &n("ffn_norm.weight"), d)?,
                w_gate: weight(f, &n("ffn_gate.weight"), &[d, ff])?,
                w_up: weight(f, &n("ffn_up.weight"), &[d, ff])?,
                w_down: weight(f, &n("ffn_down.weight"), &[ff, d])?,
            });
        }
        Ok(Qwen2 {
            hp: hp.clone(),
            tok_embd,
            layers,
            output_norm: vector(f, "output_norm.weight", d)?,
            output,
            rope: hp.rope(true),
            attn: hp.attn(None),
        })
    }
}

impl Architecture for Qwen2 {
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
            be.add_bias(&mut q, &l.bq);
            be.add_bias(&mut k, &l.bk);
            be.add_bias(&mut v, &l.bv);
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
