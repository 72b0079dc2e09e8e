//! Realm's inference engine: GGUF files, quantized kernels, model architectures and the CPU
//! backend. Knows nothing of wasmtime or HTTP; everything above it talks to it through plain Rust
//! types.

pub mod backend;
pub mod gguf;
pub mod graph;
pub mod kv;
pub mod model;
pub mod quant;
pub mod sample;
pub mod sched;
pub mod session;
pub mod synth;
pub mod template;
pub mod tokenizer;

pub use model::{BackendChoice, LoadOptions, LogitsWanted, Model, SeqInput};
pub use session::Session;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error(transparent)]
    Write(#[from] gguf::writer::WriteError),
    #[error(transparent)]
    Quant(#[from] quant::QuantError),
    #[error(transparent)]
    Kv(#[from] kv::KvError),
    #[error("unsupported architecture {0:?} (supported: llama, mistral, qwen2, gemma3)")]
    UnsupportedArchitecture(String),
    #[error("invalid model: {0}")]
    BadModel(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("token id {token} is out of range (vocabulary has {n_vocab} tokens)")]
    BadToken { token: u32, n_vocab: usize },
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error("could not start worker threads: {0}")]
    Threads(#[source] std::io::Error),
}
