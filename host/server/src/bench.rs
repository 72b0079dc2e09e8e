//! `realm bench`: prefill and decode throughput (median of several runs) and peak RSS, measured
//! the way llama-bench does: `pp` evaluates a prompt of N tokens in one batch, `tg` generates M
//! tokens one at a time, both from an empty cache or, with `--depth D` (llama-bench's `-d`),
//! from a cache already holding D tokens (filled before the clock starts).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use realm_engine::session::argmax;
use realm_engine::{Model, Session};
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model file.
    model: PathBuf,
    /// Prompt length for the prefill test (0 skips it).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens to generate in the decode test (0 skips it).
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Tokens already in the cache when each test starts (filled untimed; llama-bench's
    /// `--n-depth`): measures prefill and decode over a long context.
    #[arg(long, default_value_t = 0)]
    depth: usize,
    /// Worker threads (0 = physical cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    backend: crate::backend_args::BackendArgs,
    /// Timed repetitions of each test (after one untimed warm-up).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Instead of pp/tg, measure the serving engine: for each N in the list, N sequences each
    /// prefill `--prompt-tokens` and then decode `--gen-tokens` concurrently, batched by the
    /// engine loop (llama-batched-bench's pp/tg with N parallel sequences).
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Instead of pp/tg, measure memory per tenant: N tenants each running the chat guest in one
    /// process, against one process per tenant (see tenants_bench.rs).
    #[arg(long)]
    tenants: Option<usize>,
    #[arg(long, hide = true)]
    tenants_child: Option<usize>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Peak resident set size of this process in bytes (Linux VmHWM).
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(a: Args) -> Result<()> {
    if let Some(n) = a.tenants_child {
        return crate::tenants_bench::child(&a.model, n, a.gen_tokens, a.threads);
    }
    if let Some(n) = a.tenants {
        if a.depth > 0 {
            anyhow::bail!("--depth applies to the single-sequence pp/tg tests, not to --tenants");
        }
        return crate::tenants_bench::run(&a.model, n.max(1), a.gen_tokens, a.threads, a.json);
    }
    if a.depth > 0 && !a.concurrency.is_empty() {
        anyhow::bail!("--depth applies to the single-sequence pp/tg tests, not to --concurrency");
    }
    let t0 = Instant::now();
    let model = Model::load(&a.model, &a.backend.load_options(a.threads))
        .with_context(|| format!("loading {}", a.model.display()))?;
    eprintln!("backend: {}", model.backend_note());
    let load_s = t0.elapsed().as_secs_f64();
    if !a.concurrency.is_empty() {
        return concurrent(a, model, load_s);
    }
    let hp = &model.hparams;
    let n_vocab = hp.n_vocab as u32;
    // Deterministic pseudo-random tokens, away from special tokens at the start of the vocab:
    // the context the tests start from, then the prompt.
    let pseudo = |i: u32| 1000 + (i.wrapping_mul(2_654_435_761) % (n_vocab - 1000).max(1));
    let context: Vec<u32> = (0..a.depth as u32).map(|i| pseudo(i + 1_000_000)).collect();
    let prompt: Vec<u32> = (0..a.prompt_tokens as u32).map(pseudo).collect();
    let need = a.depth + a.prompt_tokens.max(a.gen_tokens + 1);
    if need > hp.n_ctx_train {
        anyhow::bail!(
            "--depth {} with {} prompt / {} generated tokens needs {need} positions; the model's \
             context is {}",
            a.depth,
            a.prompt_tokens,
            a.gen_tokens,
            hp.n_ctx_train
        );
    }
    let mut session = Session::new(&model, need)?;
    // Back to the state each test starts from: the cache holds `context`, nothing else.
    let start = |session: &mut Session| -> Result<()> {
        session.reset();
        if !context.is_empty() {
            session.feed(&context)?;
        }
        Ok(())
    };

    let mut pp = Vec::new();
    if a.prompt_tokens > 0 {
        for run in 0..=a.runs {
            start(&mut session)?;
            let t = Instant::now();
            session.feed(&prompt)?;
            if run > 0 {
                pp.push(a.prompt_tokens as f64 / t.elapsed().as_secs_f64());
            }
        }
    }
    let mut tg = Vec::new();
    if a.gen_tokens > 0 {
        for run in 0..=a.runs {
            start(&mut session)?;
            let mut tok = prompt.first().copied().unwrap_or(1000);
            let t = Instant::now();
            for _ in 0..a.gen_tokens {
                tok = argmax(&session.feed(&[tok])?);
            }
            if run > 0 {
                tg.push(a.gen_tokens as f64 / t.elapsed().as_secs_f64());
            }
        }
    }
    let (pp_med, tg_med) = (median(pp), median(tg));
    let rss = peak_rss().unwrap_or(0);
    let file = model.file.file_size();
    if a.json {
        println!(
            "{}",
            json!({
                "model": a.model.display().to_string(),
                "name": hp.name,
                "arch": hp.arch,
                "threads": model.threads(),
                "backend": model.backend_name(),
                "load_s": load_s,
                "prompt_tokens": a.prompt_tokens,
                "gen_tokens": a.gen_tokens,
                "depth": a.depth,
                "runs": a.runs,
                "prefill_tok_s": pp_med,
                "decode_tok_s": tg_med,
                "peak_rss_bytes": rss,
                "file_bytes": file,
                "peak_rss_over_file": rss as f64 / file as f64,
            })
        );
    } else {
        println!(
            "model: {} ({}, {} threads, loaded in {:.2}s)",
            hp.name,
            hp.arch,
            model.threads(),
            load_s
        );
        // llama-bench's labels: "pp512", or "pp512 @ d4096" from a filled cache.
        let at = if a.depth > 0 {
            format!(" @ d{}", a.depth)
        } else {
            String::new()
        };
        if a.prompt_tokens > 0 {
            let test = format!("pp{}{at}", a.prompt_tokens);
            println!("{test:<12} {pp_med:>10.1} tokens/s");
        }
        if a.gen_tokens > 0 {
            let test = format!("tg{}{at}", a.gen_tokens);
            println!("{test:<12} {tg_med:>10.1} tokens/s");
        }
        println!(
            "peak RSS {:.1} MiB ({:.2}x the {:.1} MiB file)",
            rss as f64 / 1048576.0,
            rss as f64 / file as f64,
            file as f64 / 1048576.0
        );
    }
    Ok(())
}

/// One concurrency level's figures.
struct Level {
    n: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    total_s: f64,
}

/// Aggregate throughput of N concurrent sequences through the engine loop, as llama.cpp's
/// batched-bench reports it: S_PP = all prompt tokens / prefill time, S_TG = all generated
/// tokens / decode time (decode starts when the last prompt is done).
fn concurrent(a: Args, model: Model, load_s: f64) -> Result<()> {
    use realm_engine::sched::{Engine, EngineConfig};
    let hp = model.hparams.clone();
    let threads = model.threads();
    let max_n = a.concurrency.iter().copied().max().unwrap_or(1);
    let cfg = EngineConfig {
        kv_tokens: max_n * (a.prompt_tokens + a.gen_tokens + 64),
        ..EngineConfig::default()
    };
    let engine = Engine::start(std::sync::Arc::new(model), cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()?;
    let n_vocab = hp.n_vocab as u32;
    let mut levels = Vec::new();
    for &n in &a.concurrency {
        let mut best: Option<Level> = None;
        for run in 0..=a.runs.min(3) {
            let level = rt.block_on(async {
                let mut seqs = Vec::new();
                for i in 0..n {
                    // Distinct prompts: no prefix-cache hits between sequences.
                    let prompt: Vec<u32> = (0..a.prompt_tokens as u32)
                        .map(|j| {
                            1000 + ((j + 7919 * i as u32).wrapping_mul(2_654_435_761)
                                % (n_vocab - 1000).max(1))
                        })
                        .collect();
                    seqs.push((engine.open(&format!("bench{run}-{i}")).await?, prompt));
                }
                let t = Instant::now();
                let mut tasks = tokio::task::JoinSet::new();
                for (seq, prompt) in seqs {
                    tasks.spawn(async move {
                        let logits = seq.feed(prompt, true).await?.expect("asked for logits");
                        anyhow::Ok((seq, argmax(&logits)))
                    });
                }
                let mut ready = Vec::new();
                while let Some(r) = tasks.join_next().await {
                    ready.push(r??);
                }
                let prefill_s = t.elapsed().as_secs_f64();
                let t = Instant::now();
                let n_gen = a.gen_tokens;
                for (seq, first) in ready {
                    tasks.spawn(async move {
                        let mut tok = first;
                        for _ in 0..n_gen {
                            let logits = seq.feed(vec![tok], true).await?.expect("logits");
                            tok = argmax(&logits);
                        }
                        anyhow::Ok((seq, tok))
                    });
                }
                while let Some(r) = tasks.join_next().await {
                    r??;
                }
                let decode_s = t.elapsed().as_secs_f64();
                if std::env::var_os("REALM_BENCH_DEBUG").is_some() {
                    let st = engine.stats();
                    eprintln!("n={n}: steps {} tokens {}", st.steps, st.tokens_processed);
                }
                anyhow::Ok(Level {
                    n,
                    prefill_tok_s: (n * a.prompt_tokens) as f64 / prefill_s,
                    decode_tok_s: (n * n_gen) as f64 / decode_s,
                    total_s: prefill_s + decode_s,
                })
            })?;
            // The first run warms up; keep the best of the rest (least disturbed by neighbours).
            if run > 0
                && best
                    .as_ref()
                    .is_none_or(|b| level.decode_tok_s > b.decode_tok_s)
            {
                best = Some(level);
            }
        }
        levels.push(best.expect("at least one timed run"));
    }
    let single = levels.iter().find(|l| l.n == 1).map(|l| l.decode_tok_s);
    let rss = peak_rss().unwrap_or(0);
    if a.json {
        let rows: Vec<_> = levels
            .iter()
            .map(|l| {
                json!({
                    "concurrency": l.n,
                    "prefill_tok_s": l.prefill_tok_s,
                    "decode_tok_s": l.decode_tok_s,
                    "decode_vs_single": single.map(|s| l.decode_tok_s / s),
                    "total_s": l.total_s,
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "model": a.model.display().to_string(),
                "name": hp.name,
                "threads": threads,
                "load_s": load_s,
                "prompt_tokens": a.prompt_tokens,
                "gen_tokens": a.gen_tokens,
                "levels": rows,
                "peak_rss_bytes": rss,
            })
        );
    } else {
        println!(
            "model: {} ({}, {} threads, loaded in {:.2}s); pp{} tg{} per sequence",
            hp.name, hp.arch, threads, load_s, a.prompt_tokens, a.gen_tokens
        );
        println!(
            "{:>5} {:>14} {:>14} {:>10}",
            "N", "S_PP tok/s", "S_TG tok/s", "vs N=1"
        );
        for l in &levels {
            let ratio = single.map_or(String::from("-"), |s| format!("{:.2}x", l.decode_tok_s / s));
            println!(
                "{:>5} {:>14.1} {:>14.1} {:>10}",
                l.n, l.prefill_tok_s, l.decode_tok_s, ratio
            );
        }
        println!("peak RSS {:.1} MiB", rss as f64 / 1048576.0);
    }
    Ok(())
}
