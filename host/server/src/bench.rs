//! `realm bench`: prefill and decode throughput (median of several runs) and peak RSS, measured
//! the way llama-bench does: `pp` evaluates a prompt of N tokens in one batch from an empty
//! cache, `tg` generates M tokens one at a time from an empty cache.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use realm_engine::session::argmax;
use realm_engine::{LoadOptions, Model, Session};
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
    /// Worker threads (0 = physical cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Timed repetitions of each test (after one untimed warm-up).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
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
    let t0 = Instant::now();
    let model = Model::load(&a.model, &LoadOptions { threads: a.threads })
        .with_context(|| format!("loading {}", a.model.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let hp = &model.hparams;
    let n_vocab = hp.n_vocab as u32;
    // A deterministic pseudo-random prompt, away from special tokens at the start of the vocab.
    let prompt: Vec<u32> = (0..a.prompt_tokens as u32)
        .map(|i| 1000 + (i.wrapping_mul(2_654_435_761) % (n_vocab - 1000).max(1)))
        .collect();
    let mut session = Session::new(&model, a.prompt_tokens.max(a.gen_tokens + 1));

    let mut pp = Vec::new();
    if a.prompt_tokens > 0 {
        for run in 0..=a.runs {
            session.reset();
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
            session.reset();
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
                "load_s": load_s,
                "prompt_tokens": a.prompt_tokens,
                "gen_tokens": a.gen_tokens,
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
        if a.prompt_tokens > 0 {
            println!("pp{:<5} {:>10.1} tokens/s", a.prompt_tokens, pp_med);
        }
        if a.gen_tokens > 0 {
            println!("tg{:<5} {:>10.1} tokens/s", a.gen_tokens, tg_med);
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
