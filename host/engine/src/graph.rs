//! The forward pass as data.
//!
//! Each architecture (`model/*.rs`) registers its weights in a [`WeightSet`] and describes its
//! forward pass once, as a [`Graph`]: a list of typed operations over a few named activation
//! buffers. The graph does not depend on the batch — a buffer is `[rows, width]` where the rows
//! are the batch's tokens ([`Rows::Batch`]) or the tokens that want logits ([`Rows::Out`]) — so it
//! is built once at load and every pass runs the same list. What changes from pass to pass (the
//! tokens, their positions, each sequence's KV pages, which rows want logits) is a [`Pass`].
//!
//! A [`crate::backend::Backend`] runs a whole graph at a time: the CPU backend op by op with its
//! SIMD kernels; a device backend can fuse neighbouring ops and capture the fixed list as a
//! device graph, since the buffers are fixed too (one arena, sized by the largest batch).
//!
//! Architectures use the shared helpers of [`GraphBuilder`] (`norm`, `qkv`, `attention`, `ffn`,
//! `logits`) so that each file reads top to bottom like the model's paper description. Nodes can
//! carry debug names in llama.cpp's convention (`attn_norm-3`, `Qcur-3`, `kqv_out-3`, …): an
//! [`OpHook`] sees each named tensor after its op (`REALM_DEBUG_TENSORS=1` prints them in the
//! layout of llama.cpp's `llama-eval-callback`); without a hook they cost nothing.

use crate::Error;
use crate::gguf::{GgufFile, TensorView};

/// A registered weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WeightId(u32);

impl WeightId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A weight as the file holds it.
pub enum Weight {
    /// A matrix of `n_rows` rows of `row_len` values in its GGUF type (quantized blocks stay
    /// quantized): a view into the file's mapping.
    Matrix(TensorView),
    /// A short vector read into f32 at load: norm weights, biases.
    Vector(Vec<f32>),
}

/// Every weight a model's graph refers to, by [`WeightId`]. Backends make them resident once
/// (the CPU reads the mapping in place; a device backend uploads each one).
#[derive(Default)]
pub struct WeightSet {
    names: Vec<String>,
    weights: Vec<Weight>,
}

impl WeightSet {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, name: &str, w: Weight) -> WeightId {
        self.names.push(name.to_string());
        self.weights.push(w);
        WeightId(self.weights.len() as u32 - 1)
    }

    /// Registers the matrix `name` after checking its shape (`[row_len, n_rows]`, GGUF order).
    pub fn matrix(&mut self, f: &GgufFile, name: &str, shape: &[usize]) -> Result<WeightId, Error> {
        Ok(self.push(name, Weight::Matrix(checked(f, name, shape)?)))
    }

    /// Registers the matrix `name` if the file has it, else returns `fallback` (tied weights).
    pub fn matrix_or(
        &mut self,
        f: &GgufFile,
        name: &str,
        shape: &[usize],
        fallback: WeightId,
    ) -> Result<WeightId, Error> {
        match f.tensor(name) {
            Some(_) => self.matrix(f, name, shape),
            None => Ok(fallback),
        }
    }

    /// Registers the 1-D tensor `name` of `len` values, read into f32.
    pub fn vector(&mut self, f: &GgufFile, name: &str, len: usize) -> Result<WeightId, Error> {
        let v = read_vector(f, name, len)?;
        Ok(self.push(name, Weight::Vector(v)))
    }

    pub fn len(&self) -> usize {
        self.weights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    pub fn get(&self, id: WeightId) -> &Weight {
        &self.weights[id.index()]
    }

    pub fn name(&self, id: WeightId) -> &str {
        &self.names[id.index()]
    }

    /// The matrix `id` (the graph builder checked that it is one).
    pub fn matrix_of(&self, id: WeightId) -> &TensorView {
        match self.get(id) {
            Weight::Matrix(t) => t,
            Weight::Vector(_) => panic!("weight {} is a vector", self.name(id)),
        }
    }

    /// The vector `id` (the graph builder checked that it is one).
    pub fn vector_of(&self, id: WeightId) -> &[f32] {
        match self.get(id) {
            Weight::Vector(v) => v,
            Weight::Matrix(_) => panic!("weight {} is a matrix", self.name(id)),
        }
    }

    /// Every weight with its id and name.
    pub fn iter(&self) -> impl Iterator<Item = (WeightId, &str, &Weight)> {
        self.weights
            .iter()
            .zip(&self.names)
            .enumerate()
            .map(|(i, (w, n))| (WeightId(i as u32), n.as_str(), w))
    }
}

/// Checks a weight's shape against what the architecture expects, naming it on mismatch.
pub(crate) fn checked(f: &GgufFile, name: &str, shape: &[usize]) -> Result<TensorView, Error> {
    let t = f.require_tensor(name)?;
    if t.shape != shape {
        return Err(Error::BadModel(format!(
            "tensor {name} has shape {:?}, expected {shape:?}",
            t.shape
        )));
    }
    Ok(t)
}

/// A 1-D tensor of any type read into f32 (they are tiny).
pub(crate) fn read_vector(f: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, Error> {
    let t = checked(f, name, &[len])?;
    let mut out = vec![0f32; len];
    crate::quant::dequantize_row(t.ty, t.row(0), &mut out);
    Ok(out)
}

/// An activation buffer of a graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Buf(u32);

impl Buf {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// How many rows a buffer has in a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// One per token of the batch.
    Batch,
    /// One per token whose logits are wanted.
    Out,
}

#[derive(Clone, Debug)]
pub struct BufDesc {
    pub name: &'static str,
    pub width: usize,
    pub rows: Rows,
}

impl BufDesc {
    /// Rows in a pass of `n` tokens of which `n_out` want logits.
    pub fn rows_in(&self, n: usize, n_out: usize) -> usize {
        match self.rows {
            Rows::Batch => n,
            Rows::Out => n_out,
        }
    }
}

/// Gated activations: `gate = act(gate) * up`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (Llama, Qwen).
    Silu,
    /// GELU, tanh approximation (Gemma), evaluated through an f16 table as ggml does.
    GeluTanh,
}

/// Index of a [`Rope`] in [`Graph::ropes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeId(u32);

impl RopeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Attention parameters of a layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnParams {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Multiplier applied to q·k.
    pub scale: f32,
    /// Sliding window: a query at position p sees keys at positions > p - window.
    pub window: Option<usize>,
}

impl AttnParams {
    /// First position a query at `pos` can see.
    pub fn first_visible(&self, pos: usize) -> usize {
        match self.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        }
    }
}

/// One operation. Buffers named twice (`x` and `out` equal) are updated in place.
#[derive(Clone, Debug)]
pub enum Op {
    /// out[i] = row `tokens[i]` of the matrix `table`, dequantized.
    Embed { table: WeightId, out: Buf },
    /// x *= by.
    Scale { x: Buf, by: f32 },
    /// out = each run of `weight.len()` values of x divided by its root mean square (plus eps
    /// under the root), times the weight: a whole row, or one head when the weight is one head
    /// wide (QK-norm). The sum of squares is taken in f64, as ggml does.
    RmsNorm {
        x: Buf,
        weight: WeightId,
        eps: f32,
        out: Buf,
    },
    /// out_j[n, m_j] = x[n, k] · W_jᵀ for each (W_j, out_j): products of one input, which a
    /// backend may run as one (Q/K/V, gate/up).
    MatMul { x: Buf, outs: Vec<(WeightId, Buf)> },
    /// x += bias, every row.
    AddBias { x: Buf, bias: WeightId },
    /// Rotates each `head_dim`-wide head of each row of x by its row's position.
    Rope {
        x: Buf,
        rope: RopeId,
        head_dim: usize,
    },
    /// Stores every row's keys and values at its position in its sequence's pages of `layer`.
    StoreKv { layer: usize, k: Buf, v: Buf },
    /// Causal attention of each row's query heads over its sequence's cached positions
    /// (the current one included), within the window if any. out has q's shape.
    Attention {
        layer: usize,
        q: Buf,
        out: Buf,
        params: AttnParams,
    },
    /// x += y.
    Add { x: Buf, y: Buf },
    /// gate = act(gate) * up.
    Glu { act: Activation, gate: Buf, up: Buf },
    /// out (`Rows::Out`) = the rows of x whose logits are wanted, in output order.
    GatherOut { x: Buf, out: Buf },
}

impl Op {
    /// The buffer whose rows decide whether the op has any work (a pass with no wanted logits
    /// skips every op on `Rows::Out` buffers).
    pub fn rows_of(&self) -> Buf {
        match self {
            Op::Embed { out, .. } | Op::GatherOut { out, .. } => *out,
            Op::Scale { x, .. }
            | Op::RmsNorm { x, .. }
            | Op::MatMul { x, .. }
            | Op::AddBias { x, .. }
            | Op::Rope { x, .. }
            | Op::Add { x, .. } => *x,
            Op::StoreKv { k, .. } => *k,
            Op::Attention { q, .. } => *q,
            Op::Glu { gate, .. } => *gate,
        }
    }
}

/// An op with its layer and the tensors it names for the debug hook.
#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    pub layer: Option<usize>,
    /// Buffers to show the hook after this op, with their llama.cpp-style names.
    pub taps: Vec<(Buf, String)>,
}

/// A model's forward pass.
#[derive(Clone, Debug)]
pub struct Graph {
    pub bufs: Vec<BufDesc>,
    pub nodes: Vec<Node>,
    pub ropes: Vec<Rope>,
    /// `[n_out, n_vocab]`: what the pass returns.
    pub logits: Buf,
}

impl Graph {
    pub fn buf(&self, b: Buf) -> &BufDesc {
        &self.bufs[b.index()]
    }

    pub fn rope(&self, r: RopeId) -> &Rope {
        &self.ropes[r.0 as usize]
    }

    /// Rows of `b` in a pass of `n` tokens of which `n_out` want logits.
    pub fn rows(&self, b: Buf, n: usize, n_out: usize) -> usize {
        self.buf(b).rows_in(n, n_out)
    }
}

/// Builds a [`Graph`], checking every op's shapes against its weights and buffers.
pub struct GraphBuilder<'w> {
    weights: &'w WeightSet,
    bufs: Vec<BufDesc>,
    nodes: Vec<Node>,
    ropes: Vec<Rope>,
    layer: Option<usize>,
}

impl<'w> GraphBuilder<'w> {
    pub fn new(weights: &'w WeightSet) -> Self {
        GraphBuilder {
            weights,
            bufs: Vec::new(),
            nodes: Vec::new(),
            ropes: Vec::new(),
            layer: None,
        }
    }

    /// A new activation buffer `[rows, width]`.
    pub fn buf(&mut self, name: &'static str, width: usize, rows: Rows) -> Buf {
        self.bufs.push(BufDesc { name, width, rows });
        Buf(self.bufs.len() as u32 - 1)
    }

    pub fn rope(&mut self, r: Rope) -> RopeId {
        self.ropes.push(r);
        RopeId(self.ropes.len() as u32 - 1)
    }

    /// Ops from here on belong to layer `il` (None: before or after the layers).
    pub fn layer(&mut self, il: Option<usize>) {
        self.layer = il;
    }

    fn width(&self, b: Buf) -> usize {
        self.bufs[b.index()].width
    }

    fn rows_kind(&self, b: Buf) -> Rows {
        self.bufs[b.index()].rows
    }

    fn matrix(&self, w: WeightId) -> &TensorView {
        match self.weights.get(w) {
            Weight::Matrix(t) => t,
            Weight::Vector(_) => panic!("{} used as a matrix", self.weights.name(w)),
        }
    }

    fn vector_len(&self, w: WeightId) -> usize {
        match self.weights.get(w) {
            Weight::Vector(v) => v.len(),
            Weight::Matrix(_) => panic!("{} used as a vector", self.weights.name(w)),
        }
    }

    fn push(&mut self, op: Op) {
        self.nodes.push(Node {
            op,
            layer: self.layer,
            taps: Vec::new(),
        });
    }

    /// Names `b`'s value after the last op for the debug hook (`name-layer` inside a layer).
    pub fn tap(&mut self, b: Buf, name: &str) {
        let name = match self.layer {
            Some(il) => format!("{name}-{il}"),
            None => name.to_string(),
        };
        self.nodes
            .last_mut()
            .expect("a tap follows an op")
            .taps
            .push((b, name));
    }

    // ---- single ops ----

    pub fn embed(&mut self, table: WeightId, out: Buf) {
        assert_eq!(self.matrix(table).row_len(), self.width(out), "embed width");
        assert_eq!(self.rows_kind(out), Rows::Batch);
        self.push(Op::Embed { table, out });
    }

    pub fn scale(&mut self, x: Buf, by: f32) {
        self.push(Op::Scale { x, by });
    }

    pub fn rms_norm(&mut self, x: Buf, weight: WeightId, eps: f32, out: Buf) {
        let len = self.vector_len(weight);
        assert!(
            self.width(x).is_multiple_of(len) && self.width(x) == self.width(out),
            "rms_norm of width {} by a weight of {len}",
            self.width(x)
        );
        assert_eq!(self.rows_kind(x), self.rows_kind(out));
        self.push(Op::RmsNorm {
            x,
            weight,
            eps,
            out,
        });
    }

    pub fn matmul(&mut self, x: Buf, outs: &[(WeightId, Buf)]) {
        for &(w, out) in outs {
            let t = self.matrix(w);
            assert_eq!(t.row_len(), self.width(x), "{} input", self.weights.name(w));
            assert_eq!(
                t.n_rows(),
                self.width(out),
                "{} output",
                self.weights.name(w)
            );
            assert_eq!(self.rows_kind(x), self.rows_kind(out));
            assert!(out != x, "a product cannot be in place");
        }
        self.push(Op::MatMul {
            x,
            outs: outs.to_vec(),
        });
    }

    pub fn add_bias(&mut self, x: Buf, bias: WeightId) {
        assert_eq!(self.vector_len(bias), self.width(x), "bias width");
        self.push(Op::AddBias { x, bias });
    }

    pub fn rope_rows(&mut self, x: Buf, rope: RopeId, head_dim: usize) {
        assert!(self.width(x).is_multiple_of(head_dim));
        assert!(self.ropes[rope.0 as usize].n_dims <= head_dim);
        self.push(Op::Rope { x, rope, head_dim });
    }

    pub fn store_kv(&mut self, layer: usize, k: Buf, v: Buf) {
        assert_eq!(self.width(k), self.width(v));
        self.push(Op::StoreKv { layer, k, v });
    }

    pub fn attend(&mut self, layer: usize, q: Buf, out: Buf, params: AttnParams) {
        assert_eq!(self.width(q), params.n_head * params.head_dim);
        assert_eq!(self.width(out), self.width(q));
        assert!(q != out);
        assert!(params.n_head_kv > 0 && params.n_head.is_multiple_of(params.n_head_kv));
        self.push(Op::Attention {
            layer,
            q,
            out,
            params,
        });
    }

    pub fn add(&mut self, x: Buf, y: Buf) {
        assert_eq!(self.width(x), self.width(y));
        assert_eq!(self.rows_kind(x), self.rows_kind(y));
        self.push(Op::Add { x, y });
    }

    pub fn glu(&mut self, act: Activation, gate: Buf, up: Buf) {
        assert_eq!(self.width(gate), self.width(up));
        self.push(Op::Glu { act, gate, up });
    }

    pub fn gather_out(&mut self, x: Buf, out: Buf) {
        assert_eq!(self.width(x), self.width(out));
        assert_eq!(
            (self.rows_kind(x), self.rows_kind(out)),
            (Rows::Batch, Rows::Out)
        );
        self.push(Op::GatherOut { x, out });
    }

    // ---- the blocks every architecture is made of ----

    /// out = rms_norm(x) · weight, tapped as `name`.
    pub fn norm(&mut self, x: Buf, weight: WeightId, eps: f32, out: Buf, name: &str) {
        self.rms_norm(x, weight, eps, out);
        self.tap(out, name);
    }

    /// The Q, K and V projections of h, with their biases when the architecture has them.
    pub fn qkv(&mut self, h: Buf, w: [WeightId; 3], bias: Option<[WeightId; 3]>, qkv: [Buf; 3]) {
        let [q, k, v] = qkv;
        self.matmul(h, &[(w[0], q), (w[1], k), (w[2], v)]);
        if let Some(b) = bias {
            for (x, b) in qkv.into_iter().zip(b) {
                self.add_bias(x, b);
            }
        }
        self.tap(q, "Qcur");
        self.tap(k, "Kcur");
        self.tap(v, "Vcur");
    }

    /// RoPE on q and k, the KV-cache write of k and v, and attention: out = attn(q, K, V).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &mut self,
        layer: usize,
        rope: RopeId,
        params: AttnParams,
        q: Buf,
        k: Buf,
        v: Buf,
        out: Buf,
    ) {
        self.rope_rows(q, rope, params.head_dim);
        self.rope_rows(k, rope, params.head_dim);
        self.store_kv(layer, k, v);
        self.attend(layer, q, out, params);
        self.tap(out, "kqv_out");
    }

    /// The gated feed-forward block: out = W_down · (act(W_gate · h) ⊙ W_up · h); g and u are
    /// its `[rows, n_ff]` scratch buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn ffn(
        &mut self,
        h: Buf,
        gate: WeightId,
        up: WeightId,
        down: WeightId,
        act: Activation,
        (g, u): (Buf, Buf),
        out: Buf,
    ) {
        self.matmul(h, &[(gate, g), (up, u)]);
        self.glu(act, g, u);
        self.tap(g, "ffn_gate_par");
        self.matmul(g, &[(down, out)]);
        self.tap(out, "ffn_out");
    }

    /// The head: the wanted rows of x, normed, times the output projection, into `logits`
    /// (`[n_out, n_vocab]`); xo is its `[n_out, n_embd]` scratch.
    pub fn logits(&mut self, x: Buf, norm: WeightId, eps: f32, output: WeightId, xo: Buf) -> Buf {
        self.layer(None);
        self.gather_out(x, xo);
        self.rms_norm(xo, norm, eps, xo);
        self.tap(xo, "result_norm");
        let n_vocab = self.matrix(output).n_rows();
        let logits = self.buf("logits", n_vocab, Rows::Out);
        self.matmul(xo, &[(output, logits)]);
        self.tap(logits, "result_output");
        logits
    }

    pub fn finish(self, logits: Buf) -> Graph {
        assert_eq!(self.bufs[logits.index()].rows, Rows::Out);
        Graph {
            bufs: self.bufs,
            nodes: self.nodes,
            ropes: self.ropes,
            logits,
        }
    }
}

/// What one pass runs on: the batch's tokens and where each sequence keeps its KV.
pub struct Pass<'a> {
    /// `[n]` token ids.
    pub tokens: Vec<u32>,
    /// `[n]` position of each token in its sequence.
    pub pos: Vec<usize>,
    /// The sequences, in row order.
    pub seqs: Vec<PassSeq<'a>>,
    /// Rows whose logits are wanted, in output order.
    pub out_rows: Vec<usize>,
    /// Positions per KV page.
    pub page_size: usize,
}

/// One sequence's rows in a pass.
#[derive(Clone, Copy, Debug)]
pub struct PassSeq<'a> {
    /// First row of the batch.
    pub start: usize,
    /// Rows (new tokens).
    pub len: usize,
    /// Position of the first row (tokens already cached).
    pub pos0: usize,
    /// The page table, covering positions `0..pos0 + len`.
    pub pages: &'a [u32],
}

impl PassSeq<'_> {
    /// Slot (page * page_size + offset) of position `pos`.
    pub fn slot(&self, pos: usize, page_size: usize) -> usize {
        self.pages[pos / page_size] as usize * page_size + pos % page_size
    }
}

impl Pass<'_> {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// Sees every tensor a graph names (see [`GraphBuilder::tap`]), after the op that wrote it.
pub trait OpHook: Send {
    /// `data` is `[rows, width]`, on the host.
    fn tensor(&mut self, name: &str, data: &[f32], width: usize);
}

/// Prints each tensor's sum and corner values in the layout of llama.cpp's `llama-eval-callback`,
/// so a divergence can be located op by op (`REALM_DEBUG_TENSORS=1`).
pub struct PrintTensors;

impl OpHook for PrintTensors {
    fn tensor(&mut self, name: &str, x: &[f32], width: usize) {
        if x.is_empty() || width < 3 {
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
}
