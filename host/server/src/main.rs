//! `realm`: the command-line front end (and, later, the server).

mod backend_args;
mod bench;
mod eval;
mod gpu;
mod guest;
mod models;
mod run;
mod serve;
mod synth;
mod tenants_bench;
mod tokenize;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "realm", version, about = "Multi-tenant LLM inference host")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate prompts: prompt tokens, top logits and the greedy continuation, as JSON lines in
    /// the format of the llama.cpp reference files.
    Eval(eval::Args),
    /// Measure prefill and decode speed (tokens/s, median of several runs) and peak memory.
    Bench(bench::Args),
    /// Write a random-weight GGUF model of a given architecture and shape (for benchmarks).
    Synth(synth::Args),
    /// Generate text from a prompt (streamed), or chat with --chat.
    Run(run::Args),
    /// List the GGUF models under some directories (default ./models and $REALM_MODELS).
    Models(models::Args),
    /// Tokenize text with a GGUF file's tokenizer (ids, llama.cpp test vectors, or throughput).
    Tokenize(tokenize::Args),
    /// Run the HTTP service (OpenAI-compatible tenant API, guests, admin API, metrics).
    Serve(serve::Args),
    /// Run guests locally and benchmark the guest runtime.
    Guest(guest::Args),
    /// The GPUs this binary can use (`gpu info`) and a check of its GPU kernels (`gpu check`).
    Gpu(gpu::Args),
    /// Print a GGUF file's metadata and tensor directory.
    Info {
        model: PathBuf,
        /// Also list every tensor.
        #[arg(long)]
        tensors: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Eval(a) => eval::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Models(a) => models::run(a),
        Command::Tokenize(a) => tokenize::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Run(a) => run::run(a),
        Command::Guest(a) => guest::run(a),
        Command::Gpu(a) => gpu::run(a),
        Command::Info { model, tensors } => info(&model, tensors),
    }
}

fn info(path: &std::path::Path, tensors: bool) -> Result<()> {
    let f = realm_engine::gguf::GgufFile::open(path)?;
    println!(
        "GGUF v{}, {} metadata keys, {} tensors, {} bytes",
        f.version,
        f.metadata().len(),
        f.tensors().len(),
        f.file_size()
    );
    for (k, v) in f.metadata() {
        println!("  {k} = {v}");
    }
    if tensors {
        for t in f.tensors() {
            println!("  {:<40} {:>6} {:?}", t.name, t.ty.name(), t.shape);
        }
    }
    Ok(())
}
