//! `realm guest`: run a guest locally (`run`) and measure the guest runtime (`bench`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use realm_engine::Model;
use realm_engine::sample::{Sampler, SamplingParams};
use realm_engine::sched::{Engine, EngineConfig};
use realm_engine::tokenizer::Tokenizer;
use realm_runtime::{GuestLimits, InvokeContext, Runtime, RuntimeConfig, builtin};
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Run a guest once on a local model and stream its output. The streamed text goes to
    /// stdout as it is produced, then the guest's JSON response on its own line.
    Run(RunArgs),
    /// Measure guest-driven decoding against the engine's native decode loop, and the cost of
    /// instantiating a cached guest.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct Common {
    /// GGUF model file.
    #[arg(long)]
    model: PathBuf,
    /// Worker threads (0 = physical cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    backend: crate::backend_args::BackendArgs,
    /// KV-cache size in tokens.
    #[arg(long, default_value_t = 8192)]
    kv_tokens: usize,
    /// Directory for compiled guests (default: none, compile every time).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// A guest component (.wasm) or a built-in guest: chat, json, best-of-n.
    guest: String,
    #[command(flatten)]
    common: Common,
    /// The request JSON, or @FILE to read it from a file.
    #[arg(long)]
    input: String,
    /// Tenant the call is charged to.
    #[arg(long, default_value = "local")]
    tenant: String,
    /// Guest linear memory limit, MiB.
    #[arg(long, default_value_t = 256)]
    memory_mb: usize,
    /// Guest CPU time limit, milliseconds.
    #[arg(long, default_value_t = 5000)]
    cpu_ms: u64,
    /// Wall-clock limit for the whole call, seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Sessions the guest may hold at once.
    #[arg(long, default_value_t = 64)]
    max_sessions: u32,
    /// Print only the response (no streamed text).
    #[arg(long)]
    no_stream: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    common: Common,
    /// Tokens to decode per run.
    #[arg(long, default_value_t = 64)]
    tokens: u32,
    /// Runs of each decode loop (alternating native and guest); the median counts.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Instantiations to time.
    #[arg(long, default_value_t = 2000)]
    instantiations: usize,
    #[arg(long, default_value = "The history of the printing press")]
    prompt: String,
}

pub fn run(args: Args) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match args.command {
        Command::Run(a) => rt.block_on(run_guest(a)),
        Command::Bench(a) => rt.block_on(bench(a)),
    }
}

fn start(common: &Common) -> Result<(Runtime, Engine)> {
    let model = Model::load(&common.model, &common.backend.load_options(common.threads))
        .with_context(|| format!("loading {}", common.model.display()))?;
    let engine = Engine::start(
        Arc::new(model),
        EngineConfig {
            kv_tokens: common.kv_tokens,
            ..EngineConfig::default()
        },
    )?;
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: common.cache_dir.clone(),
        ..RuntimeConfig::default()
    })?;
    let name = common
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    runtime.add_model(&name, engine.clone())?;
    Ok((runtime, engine))
}

async fn run_guest(a: RunArgs) -> Result<()> {
    let wasm = match builtin::by_name(&a.guest) {
        Some(w) => w.to_vec(),
        None => std::fs::read(&a.guest).with_context(|| format!("reading guest {}", a.guest))?,
    };
    let input = match a.input.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => a.input.clone(),
    };
    let (runtime, _engine) = start(&a.common)?;
    let guest = runtime.load_guest(&wasm)?;
    let ctx = InvokeContext {
        tenant: a.tenant.clone(),
        limits: GuestLimits {
            memory_bytes: a.memory_mb << 20,
            cpu_time: Duration::from_millis(a.cpu_ms),
            wall_clock: Duration::from_secs(a.timeout_s),
            max_sessions: a.max_sessions,
            ..GuestLimits::default()
        },
        default_model: None,
        allowed_models: None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stream = !a.no_stream;
    let printer = tokio::spawn(async move {
        let mut out = std::io::stdout();
        while let Some(chunk) = rx.recv().await {
            if stream {
                let _ = out.write_all(chunk.as_bytes());
                let _ = out.flush();
            }
        }
    });
    let result = runtime.invoke(&guest, ctx, input, tx).await;
    printer.await?;
    match result {
        Ok(response) => {
            if stream {
                println!();
            }
            println!("{response}");
            Ok(())
        }
        Err(e) => {
            if stream {
                println!();
            }
            bail!("{e}")
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn bench(a: BenchArgs) -> Result<()> {
    let (runtime, engine) = start(&a.common)?;
    let tok = Tokenizer::from_gguf(&engine.model().file)?;
    let prompt = tok.encode(&a.prompt, true, false);
    let testbed = runtime.load_guest(builtin::TESTBED_WASM)?;
    let limits = GuestLimits {
        cpu_time: Duration::from_secs(60),
        ..GuestLimits::default()
    };
    let ctx = |tenant: &str| InvokeContext {
        tenant: tenant.into(),
        limits: limits.clone(),
        ..InvokeContext::default()
    };

    // Native: the same loop as the guest's (feed one token, sample greedily on the host over
    // the returned logits), driven from Rust.
    let native = |n: u32| {
        let engine = engine.clone();
        let prompt = prompt.clone();
        async move {
            let seq = engine.open("bench-native").await?;
            let mut logits = seq.feed(prompt, true).await?.expect("logits");
            let mut sampler = Sampler::new(SamplingParams::greedy());
            let t = Instant::now();
            let mut out = Vec::new();
            for _ in 0..n {
                let next = sampler.sample(&logits, None)?;
                sampler.accept(next);
                logits = seq.feed(vec![next], true).await?.expect("logits");
                out.push(next);
            }
            anyhow::Ok((t.elapsed().as_secs_f64(), out))
        }
    };
    let input = json!({"op": "decode", "prompt": a.prompt, "tokens": a.tokens}).to_string();
    let guest_run = || {
        let runtime = runtime.clone();
        let testbed = testbed.clone();
        let input = input.clone();
        let ctx = ctx("bench-guest");
        async move {
            let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
            let (r, cpu) = runtime.invoke_metered(&testbed, ctx, input, tx).await;
            let v: serde_json::Value = serde_json::from_str(&r?)?;
            let secs = v["decode_seconds"].as_f64().context("decode_seconds")?;
            let toks: Vec<u32> = serde_json::from_value(v["tokens"].clone())?;
            anyhow::Ok((secs, toks, cpu.as_secs_f64()))
        }
    };

    // Warm up both paths (page faults, caches), then alternate.
    let (_, native_tokens) = native(a.tokens.min(8)).await?;
    let _ = guest_run().await?;
    let (mut tn, mut tg, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..a.runs {
        let (s, n_out) = native(a.tokens).await?;
        tn.push(s);
        let (s, g_out, c) = guest_run().await?;
        tg.push(s);
        cpu.push(c);
        if n_out != g_out {
            bail!("guest-driven and native greedy decoding disagree: {g_out:?} vs {n_out:?}");
        }
    }
    let _ = native_tokens;
    let native_tps = a.tokens as f64 / median(&mut tn);
    let guest_tps = a.tokens as f64 / median(&mut tg);

    // Instantiation of a cached guest (the chat guest: its InstancePre is ready).
    let chat = runtime.load_guest(builtin::CHAT_WASM)?;
    for _ in 0..50 {
        runtime.instantiate_only(&chat, ctx("bench-inst")).await?;
    }
    let mut times = Vec::with_capacity(a.instantiations);
    for _ in 0..a.instantiations {
        let t = Instant::now();
        runtime.instantiate_only(&chat, ctx("bench-inst")).await?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];

    let report = json!({
        "model": a.common.model.display().to_string(),
        "decode_tokens": a.tokens,
        "runs": a.runs,
        "native_decode_tokens_per_s": native_tps,
        "guest_decode_tokens_per_s": guest_tps,
        "guest_over_native": guest_tps / native_tps,
        // Everything the guest path adds to a token, measured rather than inferred from two
        // noisy rates: CPU time in guest code and host-call bodies (host-side sampling
        // included), engine waits excluded, per decoded token (prefill and setup included).
        "guest_cpu_us_per_token": median(&mut cpu) * 1e6 / a.tokens as f64,
        "instantiate_us_p50": pct(0.5),
        "instantiate_us_p99": pct(0.99),
        "instantiations": a.instantiations,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
