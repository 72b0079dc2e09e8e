//! `gemma3`: Gemma 3 (text).
//!
//! Differences from Llama, in the order they appear:
//! - the token embedding is scaled by sqrt(n_embd) and doubles as the output projection;
//! - every sub-block is sandwiched between two RMS norms (pre and post), the post norm applied to
//!   the sub-block's output before the residual add (GGUF norm weights already include Gemma's +1);
//! - Q and K are RMS-normed per head (QK-norm) before NeoX RoPE;
//! - five of every six layers use sliding-window attention with a local RoPE base (10 000 unless
//!   `rope.freq_base_swa` is set); every sixth layer is global and uses `rope.freq_base` (and any
//!   rope scaling);
//! - the FFN is GELU-gated (tanh approximation).

use super::{
    Architecture, Batch, Hparams, SeqInput, attend, debug_tensor, rope_rows, vector, weight,
};
use crate::Error;
use crate::backend::cpu::{self, AttnParams, CpuBackend, Rope};
use crate::gguf::{GgufFile, TensorView};
use crate::kv::KvPool;

/// RoPE base of the sliding layers unless `gemma3.rope.freq_base_swa` says otherwise.
const LOCAL_ROPE_BASE: f32 = 10_000.0;
/// Every this-many-th layer is global; the others slide.
const SWA_PATTERN: usize = 6;

struct Layer {
    attn_norm: Vec<f32>,      // [n_embd]
    wq: TensorView,           // [n_embd] -> [n_head * head_dim]
    wk: TensorView,           // [n_embd] -> [n_head_kv * head_dim]
    wv: TensorView,           // [n_embd] -> [n_head_kv * head_dim]
    q_norm: Vec<f32>,         // [head_dim]
    k_norm: Vec<f32>,         // [head_dim]
    wo: TensorView,           // [n_head * head_dim] -> [n_embd]
    post_attn_norm: Vec<f32>, // [n_embd]
    ffn_norm: Vec<f32>,       // [n_embd]
    w_gate: TensorView,       // [n_embd] -> [n_ff]
    w_up: TensorView,         // [n_embd] -> [n_ff]
    w_down: TensorView,       // [n_ff] -> [n_embd]
    post_ffn_norm: Vec<f32>,  // [n_embd]
    sliding: bool,
}

pub(super) struct Gemma3 {
    hp: Hparams,
    tok_embd: TensorView, // [n_embd] x n_vocab rows; also the output projection
    layers: Vec<Layer>,
    output_norm: Vec<f32>, // [n_embd]
    output: TensorView,    // [n_embd] -> [n_vocab]
    rope_global: Rope,
    rope_local: Rope,
    attn_global: AttnParams,
    attn_local: AttnParams,
}

impl Gemma3 {
    pub(super) fn load(f: &GgufFile, hp: &Hparams) -> Result<Self, Error> {
        let (d, hd, ff) = (hp.n_embd, hp.head_dim, hp.n_ff);
        let (qd, kvd) = (hp.n_head * hd, hp.kv_dim());
        let window = hp
            .sliding_window
            .ok_or_else(|| Error::BadModel("gemma3.attention.sliding_window is missing".into()))?;
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
                q_norm: vector(f, &n("attn_q_norm.weight"), hd)?,
                k_norm: vector(f, &n("attn_k_norm.weight"), hd)?,
                wo: weight(f, &n("attn_output.weight"), &[qd, d])?,
                post_attn_norm: vector(f, &n("post_attention_norm.weight"), d)?,
                ffn_norm: vector(f, &n("ffn_norm.weight"), d)?,
                w_gate: weight(f, &n("ffn_gate.weight"), &[d, ff])?,
                w_up: weight(f, &n("ffn_up.weight"), &[d, ff])?,
                w_down: weight(f, &n("ffn_down.weight"), &[ff, d])?,
                post_ffn_norm: vector(f, &n("post_ffw_norm.weight"), d)?,
                sliding: (i + 1) % SWA_PATTERN != 0,
            });
        }
        let local_base = f
            .opt_f64(&format!("{}.rope.freq_base_swa", hp.arch))?
            .map_or(LOCAL_ROPE_BASE, |v| v as f32);
        let rope_local = Rope::new(hp.rope_dims, local_base, true);
        let (mut attn_global, mut attn_local) = (hp.attn(None), hp.attn(Some(window)));
        // Gemma 3 27B scales queries by 1/sqrt(n_embd / n_head) instead of 1/sqrt(head_dim)
        // (its query_pre_attn_scalar); the GGUF carries no key for it, so it is known by shape.
        if hp.n_layer == 62 {
            let s = 1.0 / ((d / hp.n_head) as f32).sqrt();
            attn_global.scale = s;
            attn_local.scale = s;
        }
        Ok(Gemma3 {
            hp: hp.clone(),
            tok_embd,
            layers,
            output_norm: vector(f, "output_norm.weight", d)?,
            output,
            rope_global: hp.rope(true),
            rope_local,
            attn_global,
            attn_local,
        })
    }
}

impl Architecture for Gemma3 {
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
        cpu::scale(&mut x, (d as f32).sqrt());
        debug_tensor("inp_scaled", &x, d);
        let mut h = vec![0f32; n * d]; // [n, n_embd] normed input of a sub-block
        let (mut q, mut k, mut v) = (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
        let mut o = vec![0f32; n * d]; // [n, n_embd] sub-block output
        let (mut g, mut u) = (vec![0f32; n * ff], vec![0f32; n * ff]); // [n, n_ff]

        for (il, l) in self.layers.iter().enumerate() {
            let (rope, attn) = if l.sliding {
                (&self.rope_local, &self.attn_local)
            } else {
                (&self.rope_global, &self.attn_global)
            };
            cpu::rms_norm_into(&x, &l.attn_norm, hp.rms_eps, &mut h);
            be.matmuls(
                &mut [(&l.wq, &mut q), (&l.wk, &mut k), (&l.wv, &mut v)],
                &h,
                n,
            );
            debug_tensor(&format!("attn_norm-{il}"), &h, d);
            debug_tensor(&format!("Qcur-{il}"), &q, qd);
            debug_tensor(&format!("Vcur-{il}"), &v, kvd);
            cpu::rms_norm(&mut q, &l.q_norm, hp.rms_eps); // per head: rows of head_dim
            cpu::rms_norm(&mut k, &l.k_norm, hp.rms_eps);
            rope_rows(rope, &mut q, hd, batch);
            rope_rows(rope, &mut k, hd, batch);
            let a = attend(be, kv, il, batch, inputs, &q, &k, &v, attn); // [n, qd]
            debug_tensor(&format!("kqv_out-{il}"), &a, qd);
            be.matmul(&l.wo, &a, n, &mut o);
            debug_tensor(&format!("attn_out-{il}"), &o, d);
            cpu::rms_norm(&mut o, &l.post_attn_norm, hp.rms_eps);
            cpu::add_in_place(&mut x, &o);
            debug_tensor(&format!("sa_out-{il}"), &x, d);

            cpu::rms_norm_into(&x, &l.ffn_norm, hp.rms_eps, &mut h);
            be.matmuls(&mut [(&l.w_gate, &mut g), (&l.w_up, &mut u)], &h, n);
            cpu::gelu_mul(&mut g, &u);
            debug_tensor(&format!("ffn_geglu-{il}"), &g, ff);
            be.matmul(&l.w_down, &g, n, &mut o);
            debug_tensor(&format!("ffn_out-{il}"), &o, d);
            cpu::rms_norm(&mut o, &l.post_ffn_norm, hp.rms_eps);
            cpu::add_in_place(&mut x, &o);
            debug_tensor(&format!("l_out-{il}"), &x, d);
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
