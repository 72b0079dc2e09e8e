//! The reference backend: the plainest execution of a [`Graph`] — one thread, scalar kernels
//! (`Isa::Scalar` dot products, one weight row and one token at a time), attention written out
//! as its formula over f32 KV pages of its own ([`RefKv`]).
//!
//! It exists to keep the backend seam honest. Tests run every architecture through it and the
//! CPU backend and compare logits: anything a pass needs that the graph and [`Pass`] do not
//! carry, or any assumption about the KV storage's type, shows up as a failure here before a
//! device backend trips over it. It is also a second opinion when a fast kernel is suspect
//! (`Model::with_backend(file, Box::new(ReferenceBackend::new()))`). It is slow: use it on the
//! small fixture models.

use std::sync::{Arc, Mutex};

use crate::backend::cpu::{add_in_place, gelu_mul, rms_norm, scale, silu_mul};
use crate::backend::{Arena, Backend, BackendError, HostKv, own_kv, show_taps};
use crate::graph::{Activation, Buf, Graph, Op, OpHook, Pass, WeightSet};
use crate::kv::{KvLayout, KvStorage};
use crate::quant::{self, Isa};

#[derive(Default)]
pub struct ReferenceBackend {
    weights: Option<Arc<WeightSet>>,
    arena: Mutex<Arena>,
}

impl ReferenceBackend {
    pub fn new() -> Self {
        Self::default()
    }
}

/// f32 KV pages: per layer, keys and values `[n_pages * page_size, kv_dim]`.
pub type RefKv = HostKv<f32>;

impl Backend for ReferenceBackend {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn load_weights(&mut self, weights: Arc<WeightSet>) -> Result<(), BackendError> {
        self.weights = Some(weights);
        Ok(())
    }

    fn new_kv(&self, layout: KvLayout) -> Result<Box<dyn KvStorage>, BackendError> {
        Ok(Box::new(RefKv::new(layout)))
    }

    fn execute(
        &self,
        graph: &Graph,
        pass: &Pass<'_>,
        kv: &mut dyn KvStorage,
        mut hook: Option<&mut dyn OpHook>,
    ) -> Result<Vec<f32>, BackendError> {
        let ws = self
            .weights
            .as_deref()
            .ok_or(BackendError::NotLoaded("reference"))?;
        let kv: &mut RefKv = own_kv(kv, "reference")?;
        let mut arena = self.arena.lock().unwrap_or_else(|e| e.into_inner());
        let (n, n_out) = (pass.len(), pass.out_rows.len());
        arena.fit(graph, n, n_out);
        let bufs = &mut arena.bufs;
        for node in &graph.nodes {
            if graph.rows(node.op.rows_of(), n, n_out) == 0 {
                continue;
            }
            run(graph, ws, pass, kv, bufs, &node.op);
            if let Some(h) = hook.as_deref_mut() {
                show_taps(graph, node, bufs, (n, n_out), h);
            }
        }
        let len = n_out * graph.buf(graph.logits).width;
        Ok(bufs[graph.logits.index()][..len].to_vec())
    }
}

fn run(
    graph: &Graph,
    ws: &WeightSet,
    pass: &Pass<'_>,
    kv: &mut RefKv,
    bufs: &mut [Vec<f32>],
    op: &Op,
) {
    let (n, n_out) = (pass.len(), pass.out_rows.len());
    let width = |b: Buf| graph.buf(b).width;
    let len = |b: Buf| graph.rows(b, n, n_out) * width(b);
    // Reads come from a copy of the input: simple, and this backend is not about speed.
    let read = |bufs: &[Vec<f32>], b: Buf| bufs[b.index()][..len(b)].to_vec();
    match op {
        Op::Embed { table, out } => {
            let t = ws.matrix_of(*table);
            let d = width(*out);
            let o = &mut bufs[out.index()][..len(*out)];
            for (row, &tok) in o.chunks_exact_mut(d).zip(&pass.tokens) {
                quant::dequantize_row(t.ty, t.row(tok as usize), row);
            }
        }
        Op::Scale { x, by } => scale(&mut bufs[x.index()][..len(*x)], *by),
        Op::RmsNorm {
            x,
            weight,
            eps,
            out,
        } => {
            let src = read(bufs, *x);
            let o = &mut bufs[out.index()][..len(*out)];
            o.copy_from_slice(&src);
            rms_norm(o, ws.vector_of(*weight), *eps);
        }
        Op::MatMul { x, outs } => {
            let src = read(bufs, *x);
            let k = width(*x);
            for (w, out) in outs {
                let t = ws.matrix_of(*w);
                let kern = quant::kernels_for(t.ty, Isa::Scalar).expect("scalar kernels exist");
                let m = width(*out);
                let arb = kern.act_type.row_bytes(k).expect("whole blocks");
                let mut act = vec![0u8; arb];
                let o = &mut bufs[out.index()][..len(*out)];
                for (xr, yr) in src.chunks_exact(k).zip(o.chunks_exact_mut(m)) {
                    (kern.quantize_act)(xr, &mut act);
                    for (r, y) in yr.iter_mut().enumerate() {
                        *y = (kern.vec_dot)(k, t.row(r), &act);
                    }
                }
            }
        }
        Op::AddBias { x, bias } => {
            let b = ws.vector_of(*bias);
            for row in bufs[x.index()][..len(*x)].chunks_exact_mut(b.len()) {
                add_in_place(row, b);
            }
        }
        Op::Rope { x, rope, head_dim } => {
            let (rope, w) = (graph.rope(*rope), width(*x));
            for (row, &pos) in bufs[x.index()][..len(*x)]
                .chunks_exact_mut(w)
                .zip(&pass.pos)
            {
                rope.apply(row, *head_dim, &rope.table(pos));
            }
        }
        Op::StoreKv { layer, k, v } => {
            let d = width(*k);
            for s in &pass.seqs {
                for i in 0..s.len {
                    let (r, slot) = (s.start + i, s.slot(s.pos0 + i, pass.page_size));
                    kv.keys[*layer][slot * d..(slot + 1) * d]
                        .copy_from_slice(&bufs[k.index()][r * d..(r + 1) * d]);
                    kv.values[*layer][slot * d..(slot + 1) * d]
                        .copy_from_slice(&bufs[v.index()][r * d..(r + 1) * d]);
                }
            }
        }
        Op::Attention {
            layer,
            q,
            out,
            params: p,
        } => {
            let (hd, qd) = (p.head_dim, width(*q));
            let kvd = p.n_head_kv * hd;
            let group = p.n_head / p.n_head_kv;
            let qs = read(bufs, *q);
            let o = &mut bufs[out.index()][..len(*out)];
            let (keys, values) = (&kv.keys[*layer], &kv.values[*layer]);
            for s in &pass.seqs {
                for i in 0..s.len {
                    let (r, pos) = (s.start + i, s.pos0 + i);
                    let visible: Vec<usize> = (p.first_visible(pos)..=pos)
                        .map(|j| s.slot(j, pass.page_size))
                        .collect();
                    for h in 0..p.n_head {
                        let qh = &qs[r * qd + h * hd..r * qd + (h + 1) * hd];
                        let kh = (h / group) * hd;
                        let scores: Vec<f32> = visible
                            .iter()
                            .map(|&slot| {
                                let kr = &keys[slot * kvd + kh..slot * kvd + kh + hd];
                                p.scale * qh.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>()
                            })
                            .collect();
                        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                        let sum: f32 = exps.iter().sum();
                        let oh = &mut o[r * qd + h * hd..r * qd + (h + 1) * hd];
                        oh.fill(0.0);
                        for (&slot, e) in visible.iter().zip(&exps) {
                            let vr = &values[slot * kvd + kh..slot * kvd + kh + hd];
                            for (acc, v) in oh.iter_mut().zip(vr) {
                                *acc += e / sum * v;
                            }
                        }
                    }
                }
            }
        }
        Op::Add { x, y } => {
            let yv = read(bufs, *y);
            add_in_place(&mut bufs[x.index()][..len(*x)], &yv);
        }
        Op::Glu { act, gate, up } => {
            let u = read(bufs, *up);
            let g = &mut bufs[gate.index()][..len(*gate)];
            match act {
                Activation::Silu => silu_mul(g, &u),
                Activation::GeluTanh => gelu_mul(g, &u),
            }
        }
        Op::GatherOut { x, out } => {
            let d = width(*x);
            let src = read(bufs, *x);
            let o = &mut bufs[out.index()][..len(*out)];
            for (dst, &r) in o.chunks_exact_mut(d).zip(&pass.out_rows) {
                dst.copy_from_slice(&src[r * d..(r + 1) * d]);
            }
        }
    }
}
