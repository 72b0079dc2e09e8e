//! `realm bench MODEL --tenants N`: what one more tenant costs in memory.
//!
//! Three measurements, each in fresh child processes of this binary (so every figure is a whole
//! process's memory, measured at the same point: after every tenant's guest has generated its
//! reply, while everything is still alive):
//! 1. one process serving 1 tenant;
//! 2. one process serving N tenants at once, each through the built-in chat guest;
//! 3. N processes serving 1 tenant each (the "one process per tenant" deployment).
//!
//! RSS counts every page a process maps, including file-backed model pages shared with other
//! processes; PSS divides shared pages among their sharers, so it is the honest sum for (3).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use realm_engine::sched::{Engine, EngineConfig};
use realm_engine::{LoadOptions, Model};
use realm_runtime::{InvokeContext, Runtime, RuntimeConfig};
use serde_json::{Value, json};

/// Memory of this process, from /proc/self.
fn own_memory() -> Result<Value> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb = |key: &str, text: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    Ok(json!({
        "rss": kb("VmRSS:", &status) * 1024,
        "hwm": kb("VmHWM:", &status) * 1024,
        "pss": kb("Pss:", &rollup) * 1024,
    }))
}

/// Child: serve `tenants` tenants at once, say "ready", wait for a line on stdin, then print
/// this process's memory as JSON and wait for stdin to close.
pub fn child(model_path: &Path, tenants: usize, gen_tokens: usize, threads: usize) -> Result<()> {
    let model = Arc::new(Model::load(
        model_path,
        &LoadOptions {
            threads,
            ..Default::default()
        },
    )?);
    let engine = Engine::start(model, EngineConfig::default())?;
    let runtime = Runtime::new(RuntimeConfig::default())?;
    runtime.add_model("m", engine.clone())?;
    let guest = runtime.load_guest(realm_runtime::builtin::CHAT_WASM)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()?;
    let replies: Vec<String> = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..tenants {
            let (runtime, guest) = (runtime.clone(), guest.clone());
            tasks.spawn(async move {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
                let request = json!({
                    "model": "m",
                    "messages": [{"role": "user", "content": format!("Tenant {i}: tell me a story about the number {i}.")}],
                    "max_tokens": gen_tokens,
                    "temperature": 0,
                });
                let ctx = InvokeContext {
                    tenant: format!("tenant-{i}"),
                    ..Default::default()
                };
                let r = runtime.invoke(&guest, ctx, request.to_string(), tx).await;
                let _ = drain.await;
                r.map_err(|e| anyhow::anyhow!("tenant {i}: {e}"))
            });
        }
        let mut out = Vec::new();
        while let Some(r) = tasks.join_next().await {
            out.push(r??);
        }
        anyhow::Ok(out)
    })?;
    let stats = engine.stats();
    let kv_page_bytes = {
        let hp = &engine.model().hparams;
        2 * hp.n_layer * stats.page_size * hp.kv_dim() * 2
    };
    let completion_tokens: u64 = replies
        .iter()
        .filter_map(|r| serde_json::from_str::<Value>(r).ok())
        .filter_map(|v| v["usage"]["completion_tokens"].as_u64())
        .sum();
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    let mut line = String::new();
    let mut stdin = std::io::stdin().lock();
    stdin.read_line(&mut line)?;
    let mut mem = own_memory()?;
    // Pages held now: sequences are gone after each call, so what remains is the prefix cache;
    // count what the calls used at their peak instead: prompt + reply tokens, in whole pages.
    mem["kv_pages_in_use"] = json!(stats.pages_total - stats.pages_free);
    mem["kv_page_bytes"] = json!(kv_page_bytes);
    mem["completion_tokens"] = json!(completion_tokens);
    writeln!(stdout, "{mem}")?;
    stdout.flush()?;
    // Stay alive (and mapped) until the parent has measured everyone.
    while stdin.read_line(&mut line)? > 0 {}
    Ok(())
}

struct Child {
    proc: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

fn spawn(model: &Path, tenants: usize, gen_tokens: usize, threads: usize) -> Result<Child> {
    let exe = std::env::current_exe()?;
    let mut proc = Command::new(exe)
        .arg("bench")
        .arg(model)
        .args(["--tenants-child", &tenants.to_string()])
        .args(["--gen-tokens", &gen_tokens.to_string()])
        .args(["--threads", &threads.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting a benchmark child")?;
    let out = BufReader::new(proc.stdout.take().expect("piped"));
    Ok(Child { proc, out })
}

fn read_line(c: &mut Child) -> Result<String> {
    let mut s = String::new();
    if c.out.read_line(&mut s)? == 0 {
        bail!(
            "a benchmark child exited early (status {:?})",
            c.proc.wait()?
        );
    }
    Ok(s.trim().to_string())
}

/// Starts `children`, waits until all are ready, measures all, then lets them go.
fn measure(children: Vec<Child>) -> Result<Vec<Value>> {
    let mut children = children;
    for c in children.iter_mut() {
        let l = read_line(c)?;
        if l != "ready" {
            bail!("unexpected child output: {l}");
        }
    }
    for c in children.iter_mut() {
        writeln!(c.proc.stdin.as_mut().expect("piped"), "measure")?;
    }
    let mut out = Vec::new();
    for c in children.iter_mut() {
        out.push(serde_json::from_str(&read_line(c)?)?);
    }
    for mut c in children {
        drop(c.proc.stdin.take());
        c.proc.wait()?;
    }
    Ok(out)
}

pub fn run(
    model: &PathBuf,
    tenants: usize,
    gen_tokens: usize,
    threads: usize,
    json_out: bool,
) -> Result<()> {
    let mib = |b: u64| b as f64 / 1048576.0;
    let one = measure(vec![spawn(model, 1, gen_tokens, threads)?])?.remove(0);
    let many = measure(vec![spawn(model, tenants, gen_tokens, threads)?])?.remove(0);
    let separate = measure(
        (0..tenants)
            .map(|_| spawn(model, 1, gen_tokens, threads))
            .collect::<Result<_>>()?,
    )?;
    let get = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let sum = |k: &str| separate.iter().map(|v| get(v, k)).sum::<u64>();
    let extra = get(&many, "hwm").saturating_sub(get(&one, "hwm"));
    let per_tenant = extra as f64 / (tenants.max(2) - 1) as f64;
    let report = json!({
        "tenants": tenants,
        "gen_tokens": gen_tokens,
        "one_process_one_tenant": one,
        "one_process_n_tenants": many,
        "n_processes_rss_sum": sum("hwm"),
        "n_processes_pss_sum": sum("pss"),
        "extra_bytes_per_tenant": per_tenant,
        "ratio_rss": sum("hwm") as f64 / get(&many, "hwm") as f64,
        "ratio_pss": sum("pss") as f64 / get(&many, "pss").max(1) as f64,
    });
    if json_out {
        println!("{report}");
        return Ok(());
    }
    println!(
        "model file: {:.1} MiB; {} tenants, chat guest, {} tokens each",
        mib(std::fs::metadata(model)?.len()),
        tenants,
        gen_tokens
    );
    println!(
        "one process, 1 tenant:          peak RSS {:8.1} MiB  PSS {:8.1} MiB",
        mib(get(&one, "hwm")),
        mib(get(&one, "pss"))
    );
    println!(
        "one process, {tenants:>2} tenants:        peak RSS {:8.1} MiB  PSS {:8.1} MiB  (+{:.1} MiB per extra tenant)",
        mib(get(&many, "hwm")),
        mib(get(&many, "pss")),
        per_tenant / 1048576.0
    );
    println!(
        "{tenants:>2} processes, 1 tenant each:  sum RSS  {:8.1} MiB  PSS {:8.1} MiB",
        mib(sum("hwm")),
        mib(sum("pss"))
    );
    println!(
        "ratio ({tenants} processes / one process): {:.1}x by RSS, {:.1}x by PSS",
        report["ratio_rss"].as_f64().unwrap_or(0.0),
        report["ratio_pss"].as_f64().unwrap_or(0.0)
    );
    Ok(())
}
