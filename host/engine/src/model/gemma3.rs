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

use super::Hparams;
use crate::Error;
use crate::gguf::GgufFile;
use crate::graph::{Activation, Graph, GraphBuilder, Rope, Rows, WeightId, WeightSet};

/// RoPE base of the sliding layers unless `gemma3.rope.freq_base_swa` says otherwise.
const LOCAL_ROPE_BASE: f32 = 10_000.0;
/// Every this-many-th layer is global; the others slide.
const SWA_PATTERN: usize = 6;

struct Layer {
    attn_norm: WeightId,      // [n_embd]
    wqkv: [WeightId; 3],      // [n_embd] -> [n_head * head_dim], [n_head_kv * head_dim] (K and V)
    q_norm: WeightId,         // [head_dim]
    k_norm: WeightId,         // [head_dim]
    wo: WeightId,             // [n_head * head_dim] -> [n_embd]
    post_attn_norm: WeightId, // [n_embd]
    ffn_norm: WeightId,       // [n_embd]
    w_gate: WeightId,         // [n_embd] -> [n_ff]
    w_up: WeightId,           // [n_embd] -> [n_ff]
    w_down: WeightId,         // [n_ff] -> [n_embd]
    post_ffn_norm: WeightId,  // [n_embd]
    sliding: bool,
}

pub(super) fn build(f: &GgufFile, hp: &Hparams) -> Result<(WeightSet, Graph), Error> {
    let (d, hd, ff) = (hp.n_embd, hp.head_dim, hp.n_ff);
    let (qd, kvd) = (hp.n_head * hd, hp.kv_dim());
    let window = hp
        .sliding_window
        .ok_or_else(|| Error::BadModel("gemma3.attention.sliding_window is missing".into()))?;
    let mut ws = WeightSet::new();
    let tok_embd = ws.matrix(f, "token_embd.weight", &[d, hp.n_vocab])?; // [n_embd] x n_vocab rows
    let mut layers = Vec::new();
    for i in 0..hp.n_layer {
        let n = |s: &str| format!("blk.{i}.{s}");
        layers.push(Layer {
            attn_norm: ws.vector(f, &n("attn_norm.weight"), d)?,
            wqkv: [
                ws.matrix(f, &n("attn_q.weight"), &[d, qd])?,
                ws.matrix(f, &n("attn_k.weight"), &[d, kvd])?,
                ws.matrix(f, &n("attn_v.weight"), &[d, kvd])?,
            ],
            q_norm: ws.vector(f, &n("attn_q_norm.weight"), hd)?,
            k_norm: ws.vector(f, &n("attn_k_norm.weight"), hd)?,
            wo: ws.matrix(f, &n("attn_output.weight"), &[qd, d])?,
            post_attn_norm: ws.vector(f, &n("post_attention_norm.weight"), d)?,
            ffn_norm: ws.vector(f, &n("ffn_norm.weight"), d)?,
            w_gate: ws.matrix(f, &n("ffn_gate.weight"), &[d, ff])?,
            w_up: ws.matrix(f, &n("ffn_up.weight"), &[d, ff])?,
            w_down: ws.matrix(f, &n("ffn_down.weight"), &[ff, d])?,
            post_ffn_norm: ws.vector(f, &n("post_ffw_norm.weight"), d)?,
            sliding: (i + 1) % SWA_PATTERN != 0,
        });
    }
    let output_norm = ws.vector(f, "output_norm.weight", d)?; // [n_embd]
    let output = ws.matrix_or(f, "output.weight", &[d, hp.n_vocab], tok_embd)?; // [n_embd] -> [n_vocab]
    let local_base = f
        .opt_f64(&format!("{}.rope.freq_base_swa", hp.arch))?
        .map_or(LOCAL_ROPE_BASE, |v| v as f32);
    let (mut attn_global, mut attn_local) = (hp.attn(None), hp.attn(Some(window)));
    // Gemma 3 27B scales queries by 1/sqrt(n_embd / n_head) instead of 1/sqrt(head_dim)
    // (its query_pre_attn_scalar); the GGUF carries no key for it, so it is known by shape.
    if hp.n_layer == 62 {
        let s = 1.0 / ((d / hp.n_head) as f32).sqrt();
        attn_global.scale = s;
        attn_local.scale = s;
    }

    let mut g = GraphBuilder::new(&ws);
    let rope_global = g.rope(hp.rope(true));
    let rope_local = g.rope(Rope::new(hp.rope_dims, local_base, true));
    let x = g.buf("x", d, Rows::Batch); // [n, n_embd] residual stream
    let h = g.buf("h", d, Rows::Batch); // [n, n_embd] normed input of a sub-block
    let q = g.buf("q", qd, Rows::Batch); // [n, n_head * head_dim]
    let k = g.buf("k", kvd, Rows::Batch); // [n, n_head_kv * head_dim]
    let v = g.buf("v", kvd, Rows::Batch); // [n, n_head_kv * head_dim]
    let a = g.buf("attn", qd, Rows::Batch); // [n, n_head * head_dim] attention output
    let o = g.buf("o", d, Rows::Batch); // [n, n_embd] sub-block output
    let gu = (g.buf("gate", ff, Rows::Batch), g.buf("up", ff, Rows::Batch)); // [n, n_ff] each
    let xo = g.buf("x_out", d, Rows::Out); // [n_out, n_embd] rows that want logits

    g.embed(tok_embd, x);
    g.scale(x, (d as f32).sqrt());
    g.tap(x, "inp_scaled");
    for (il, l) in layers.iter().enumerate() {
        g.layer(Some(il));
        let (rope, attn) = match l.sliding {
            true => (rope_local, attn_local),
            false => (rope_global, attn_global),
        };
        g.norm(x, l.attn_norm, hp.rms_eps, h, "attn_norm");
        g.qkv(h, l.wqkv, None, [q, k, v]);
        g.norm(q, l.q_norm, hp.rms_eps, q, "Qcur_normed"); // per head: rows of head_dim
        g.norm(k, l.k_norm, hp.rms_eps, k, "Kcur_normed");
        g.attention(il, rope, attn, q, k, v, a);
        g.matmul(a, &[(l.wo, o)]);
        g.tap(o, "attn_out");
        g.norm(o, l.post_attn_norm, hp.rms_eps, o, "attn_post_norm");
        g.add(x, o);
        g.tap(x, "sa_out");

        g.norm(x, l.ffn_norm, hp.rms_eps, h, "ffn_norm");
        g.ffn(h, l.w_gate, l.w_up, l.w_down, Activation::GeluTanh, gu, o);
        g.norm(o, l.post_ffn_norm, hp.rms_eps, o, "ffn_post_norm");
        g.add(x, o);
        g.tap(x, "l_out");
    }
    let logits = g.logits(x, output_norm, hp.rms_eps, output, xo);
    let graph = g.finish(logits);
    Ok((ws, graph))
}
