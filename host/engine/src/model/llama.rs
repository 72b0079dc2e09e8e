//! `llama`: Llama 2/3, Mistral, TinyLlama and their many fine-tunes — and `qwen2` (Qwen 2 / 2.5),
//! which is the same block with biases on Q, K and V and NeoX RoPE.
//!
//! Pre-norm decoder: x += Wo·attn(rope(Wq·n(x)), rope(Wk·n(x)), Wv·n(x)); x += W2·(silu(W1·n(x)) ⊙
//! W3·n(x)). Grouped-query attention. Llama uses "normal" RoPE on adjacent pairs (the GGUF
//! converter permutes Q/K rows so that this matches the Hugging Face layout); Qwen 2 rotates
//! element i with i + n_rot/2. Optional `rope_freqs.weight` carries Llama 3.1's per-frequency
//! divisors; `rope.scaling.*` keys select linear or YaRN scaling. Small models tie the output
//! projection to the token embedding (no `output.weight`).

use super::Hparams;
use crate::Error;
use crate::gguf::GgufFile;
use crate::graph::{Activation, Graph, GraphBuilder, Rows, WeightId, WeightSet, read_vector};

/// The two members of the family.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Flavor {
    Llama,
    Qwen2,
}

struct Layer {
    attn_norm: WeightId,         // [n_embd]
    wqkv: [WeightId; 3], // [n_embd] -> [n_head * head_dim], [n_head_kv * head_dim] (K and V)
    bqkv: Option<[WeightId; 3]>, // Qwen 2: [n_head * head_dim], [n_head_kv * head_dim] x 2
    wo: WeightId,        // [n_head * head_dim] -> [n_embd]
    ffn_norm: WeightId,  // [n_embd]
    w_gate: WeightId,    // [n_embd] -> [n_ff]
    w_up: WeightId,      // [n_embd] -> [n_ff]
    w_down: WeightId,    // [n_ff] -> [n_embd]
}

pub(super) fn build(
    f: &GgufFile,
    hp: &Hparams,
    flavor: Flavor,
) -> Result<(WeightSet, Graph), Error> {
    let (d, hd, ff) = (hp.n_embd, hp.head_dim, hp.n_ff);
    let (qd, kvd) = (hp.n_head * hd, hp.kv_dim());
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
            bqkv: match flavor {
                Flavor::Llama => None,
                Flavor::Qwen2 => Some([
                    ws.vector(f, &n("attn_q.bias"), qd)?,
                    ws.vector(f, &n("attn_k.bias"), kvd)?,
                    ws.vector(f, &n("attn_v.bias"), kvd)?,
                ]),
            },
            wo: ws.matrix(f, &n("attn_output.weight"), &[qd, d])?,
            ffn_norm: ws.vector(f, &n("ffn_norm.weight"), d)?,
            w_gate: ws.matrix(f, &n("ffn_gate.weight"), &[d, ff])?,
            w_up: ws.matrix(f, &n("ffn_up.weight"), &[d, ff])?,
            w_down: ws.matrix(f, &n("ffn_down.weight"), &[ff, d])?,
        });
    }
    let output_norm = ws.vector(f, "output_norm.weight", d)?; // [n_embd]
    let output = ws.matrix_or(f, "output.weight", &[d, hp.n_vocab], tok_embd)?; // [n_embd] -> [n_vocab]
    let mut rope = hp.rope(flavor == Flavor::Qwen2);
    if f.tensor("rope_freqs.weight").is_some() {
        rope.freq_factors = Some(read_vector(f, "rope_freqs.weight", hp.rope_dims / 2)?);
    }
    let attn = hp.attn(None);

    let mut g = GraphBuilder::new(&ws);
    let rope = g.rope(rope);
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
    for (il, l) in layers.iter().enumerate() {
        g.layer(Some(il));
        g.norm(x, l.attn_norm, hp.rms_eps, h, "attn_norm");
        g.qkv(h, l.wqkv, l.bqkv, [q, k, v]);
        g.attention(il, rope, attn, q, k, v, a);
        g.matmul(a, &[(l.wo, o)]);
        g.add(x, o);
        g.tap(x, "ffn_inp");

        g.norm(x, l.ffn_norm, hp.rms_eps, h, "ffn_norm");
        g.ffn(h, l.w_gate, l.w_up, l.w_down, Activation::Silu, gu, o);
        g.add(x, o);
        g.tap(x, "l_out");
    }
    let logits = g.logits(x, output_norm, hp.rms_eps, output, xo);
    let graph = g.finish(logits);
    Ok((ws, graph))
}
