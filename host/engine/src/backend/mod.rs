//! Compute backends. The CPU backend is the reference; device backends (CUDA, wgpu) sit behind
//! cargo features and implement the same operations over device-resident weights and KV.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod spin;
