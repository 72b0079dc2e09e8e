//! Compute backends: what runs a model's [`Graph`].
//!
//! A backend makes a model's weights resident once ([`Backend::load_weights`]), owns the memory
//! of its KV pages ([`Backend::new_kv`]), and executes one whole forward pass at a time
//! ([`Backend::execute`]), returning the logits of the rows that want them. Everything else —
//! page tables, reference counts, the prefix cache, scheduling — is the engine's and the same
//! for every backend.
//!
//! - [`cpu`]: the reference and the default: weights read in place from the mapping, quantized
//!   SIMD kernels picked at run time, f16 KV pages in host memory.
//! - [`reference`]: a second, deliberately plain execution of the same graphs (scalar f32
//!   arithmetic, its own f32 KV pages): tests run every architecture through it to check that
//!   the seam carries everything a pass needs and nothing CPU-specific leaks through it.
//! - `cuda` (feature `cuda`): NVIDIA GPUs through the driver API and NVRTC.

use std::sync::Arc;

use std::any::Any;

use crate::graph::{Graph, Node, OpHook, Pass, WeightSet};
use crate::kv::{KvError, KvLayout, KvStorage};

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;
pub mod spin;

/// What a backend can fail with during a pass or while making memory.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("the KV pool was made by another backend than {0}")]
    ForeignKv(&'static str),
    #[error("the {0} backend has no weights loaded")]
    NotLoaded(&'static str),
    #[error("{0}")]
    Device(String),
}

/// Runs forward passes of one model.
pub trait Backend: Send + Sync {
    /// Short name: `cpu`, `reference`, `cuda`.
    fn name(&self) -> &'static str;

    /// Threads the backend computes with (the CPU's pool; 1 elsewhere).
    fn threads(&self) -> usize {
        1
    }

    /// Makes the model's weights resident, once (a device backend uploads them here).
    fn load_weights(&mut self, weights: Arc<WeightSet>) -> Result<(), BackendError>;

    /// Page storage for a KV pool of `layout`, in this backend's memory.
    fn new_kv(&self, layout: KvLayout) -> Result<Box<dyn KvStorage>, BackendError>;

    /// Runs `graph` over `pass`, reading and writing the pages of `kv` (made by [`Backend::new_kv`]),
    /// and returns the logits buffer (`[pass.out_rows.len(), n_vocab]`). `hook` sees every
    /// tensor the graph names, after its op.
    fn execute(
        &self,
        graph: &Graph,
        pass: &Pass<'_>,
        kv: &mut dyn KvStorage,
        hook: Option<&mut dyn OpHook>,
    ) -> Result<Vec<f32>, BackendError>;
}

/// Activation buffers of one graph, allocated once and grown to the largest pass seen: passes
/// after the first allocate nothing.
#[derive(Default)]
pub(crate) struct Arena {
    pub bufs: Vec<Vec<f32>>,
}

impl Arena {
    /// Sizes every buffer of `graph` for `n` rows (`n_out` for output rows); buffers only grow.
    pub fn fit(&mut self, graph: &Graph, n: usize, n_out: usize) {
        self.bufs.resize_with(graph.bufs.len(), Vec::new);
        for (i, b) in self.bufs.iter_mut().enumerate() {
            let d = &graph.bufs[i];
            let len = d.rows_in(n, n_out) * d.width;
            if b.len() < len {
                b.resize(len, 0.0);
            }
        }
    }
}

/// KV pages in host memory with elements of type `T` (f16 on the CPU backend, f32 on the
/// reference one): per layer, keys and values `[n_pages * page_size, kv_dim]`.
pub struct HostKv<T> {
    pub(crate) layout: KvLayout,
    pub(crate) keys: Vec<Vec<T>>,
    pub(crate) values: Vec<Vec<T>>,
}

impl<T: Copy + Default + Send + 'static> HostKv<T> {
    pub fn new(layout: KvLayout) -> Self {
        let zeros = || vec![T::default(); layout.layer_elems()];
        HostKv {
            layout,
            keys: (0..layout.n_layers).map(|_| zeros()).collect(),
            values: (0..layout.n_layers).map(|_| zeros()).collect(),
        }
    }
}

impl<T: Copy + Default + Send + 'static> KvStorage for HostKv<T> {
    fn copy_page(&mut self, from: u32, to: u32) -> Result<(), KvError> {
        let n = self.layout.page_size * self.layout.kv_dim;
        let (from, to) = (from as usize * n, to as usize * n);
        for layer in 0..self.layout.n_layers {
            self.keys[layer].copy_within(from..from + n, to);
            self.values[layer].copy_within(from..from + n, to);
        }
        Ok(())
    }

    fn bytes(&self) -> usize {
        2 * self.layout.n_layers * self.layout.layer_elems() * std::mem::size_of::<T>()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// `kv` as the storage type of the backend `name`, which made it; another backend's is an error.
pub(crate) fn own_kv<'a, T: 'static>(
    kv: &'a mut dyn KvStorage,
    name: &'static str,
) -> Result<&'a mut T, BackendError> {
    kv.as_any_mut()
        .downcast_mut::<T>()
        .ok_or(BackendError::ForeignKv(name))
}

/// Shows `hook` the tensors `node` names, from host-memory buffers (`bufs`, one per graph
/// buffer) of a pass of `n` rows of which `n_out` want logits.
pub(crate) fn show_taps(
    graph: &Graph,
    node: &Node,
    bufs: &[Vec<f32>],
    (n, n_out): (usize, usize),
    hook: &mut dyn OpHook,
) {
    for (b, name) in &node.taps {
        let (rows, w) = (graph.rows(*b, n, n_out), graph.buf(*b).width);
        hook.tensor(name, &bufs[b.index()][..rows * w], w);
    }
}
