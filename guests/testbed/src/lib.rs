//! A guest for the runtime's own tests and benchmarks: each request names one behaviour,
//! including the hostile ones the sandbox must stop (infinite loops, memory bombs, deep
//! recursion, oversized host-call data, session floods, traps mid-generation, forged handles).

use std::hint::black_box;

use realm_guest::{GenerateParams, Model, SamplingParams, Session, emit};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum Op {
    /// Emit `text` and return it.
    Echo { text: String },
    /// Spin forever.
    Loop,
    /// Allocate (and touch) `mb` MiB per step until something gives.
    Alloc { mb: usize },
    /// Recurse without end: with `shadow`, frames hold arrays in linear memory (Rust's shadow
    /// stack runs out); without, frames are scalars on the wasm stack (its limit traps).
    Recurse { shadow: bool },
    /// Pass a string of `mb` MiB into a host call (`via`: "emit" or "open").
    BigString { mb: usize, via: String },
    /// Open sessions without dropping them.
    Sessions { count: u32 },
    /// Prefill, generate `tokens` tokens, then panic with the sessions still open.
    TrapMidGeneration { prompt: String, tokens: u32 },
    /// Open a session, feed `prompt`, and report its handle and length; then spin on host
    /// calls `spins` times (to stay alive while another guest runs).
    Hold { prompt: String, spins: u32 },
    /// Use a session handle this instance never received.
    Probe { handle: u32 },
    /// What the sandbox exposes: environment, files, arguments.
    Wasi,
    /// Guest-driven decoding: one `sample` + one `feed` host call per token.
    Decode { prompt: String, tokens: u32 },
    /// Host-driven decoding (`session.generate`), for comparison.
    Generate { prompt: String, tokens: u32 },
    /// Report what the model looks like.
    Info,
    /// Fork and rewind: a session forked after the prompt continues identically to the
    /// original, and a truncated session regenerates the same token.
    ForkRewind { prompt: String, tokens: u32 },
}

#[allow(unconditional_recursion)]
fn recurse(depth: u64, pad: [u64; 16]) -> u64 {
    let p = black_box(pad);
    recurse(depth + 1, p).wrapping_add(p[(depth % 16) as usize])
}

#[allow(unconditional_recursion)]
fn recurse_scalar(depth: u64) -> u64 {
    black_box(recurse_scalar(black_box(depth + 1))) ^ depth
}

fn open() -> Result<Model, String> {
    Model::open("").map_err(|e| e.to_string())
}

fn greedy_steps(s: &Session, n: u32) -> Result<Vec<u32>, String> {
    let params = SamplingParams::greedy();
    let mut out = Vec::new();
    for _ in 0..n {
        let t = s.sample(&params, None).map_err(|e| e.to_string())?;
        s.feed(&[t]).map_err(|e| e.to_string())?;
        out.push(t);
    }
    Ok(out)
}

fn handle(op: Op) -> Result<Value, String> {
    let e = |e: realm_guest::Error| e.to_string();
    match op {
        Op::Echo { text } => {
            emit(&text);
            Ok(json!({ "text": text }))
        }
        Op::Loop => {
            let mut x = 0u64;
            loop {
                x = black_box(x.wrapping_add(1));
            }
        }
        Op::Alloc { mb } => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; mb << 20]);
                black_box(&hoard);
            }
        }
        Op::Recurse { shadow: true } => Ok(json!(recurse(0, [1; 16]))),
        Op::Recurse { shadow: false } => Ok(json!(recurse_scalar(0))),
        Op::BigString { mb, via } => {
            let s = "x".repeat(mb << 20);
            match via.as_str() {
                "emit" => emit(&s),
                _ => {
                    Model::open(&s).map_err(e)?;
                }
            }
            Ok(json!({ "passed": s.len() }))
        }
        Op::Sessions { count } => {
            let model = open()?;
            let mut held = Vec::new();
            for _ in 0..count {
                held.push(model.new_session().map_err(e)?);
            }
            Ok(json!({ "sessions": held.len() }))
        }
        Op::TrapMidGeneration { prompt, tokens } => {
            let model = open()?;
            let a = model.new_session().map_err(e)?;
            a.feed(&model.tokenize(&prompt, true, false).map_err(e)?)
                .map_err(e)?;
            let _b = a.fork().map_err(e)?;
            a.generate(&GenerateParams {
                sampling: SamplingParams::greedy(),
                max_tokens: tokens,
                stop_at_eog: false,
                stream: true,
                ..GenerateParams::default()
            })
            .map_err(e)?;
            panic!("deliberate trap after generating {tokens} tokens");
        }
        Op::Hold { prompt, spins } => {
            let model = open()?;
            let s = model.new_session().map_err(e)?;
            s.feed(&model.tokenize(&prompt, true, false).map_err(e)?)
                .map_err(e)?;
            let mut len = 0;
            for _ in 0..spins {
                len = s.len();
            }
            Ok(json!({ "handle": s.handle(), "len": len, "tokens": s.tokens() }))
        }
        Op::Probe { handle } => {
            // SAFETY (of the guest's own bookkeeping only): the handle is deliberately forged;
            // the host's component runtime must refuse it.
            let s = unsafe { Session::from_handle(handle) };
            let len = s.len();
            std::mem::forget(s);
            Ok(json!({ "len": len }))
        }
        Op::Wasi => {
            let env: Vec<(String, String)> = std::env::vars().collect();
            let args: Vec<String> = std::env::args().collect();
            let root = std::fs::read_dir("/")
                .map(|d| d.count())
                .map_err(|e| e.to_string());
            let cwd = std::env::current_dir().map_err(|e| e.to_string());
            let file = std::fs::read("/etc/passwd")
                .map(|b| b.len())
                .map_err(|e| e.to_string());
            Ok(json!({
                "env": env, "args": args,
                "root_dir": format!("{root:?}"), "cwd": format!("{cwd:?}"),
                "etc_passwd": format!("{file:?}"),
            }))
        }
        Op::Decode { prompt, tokens } => {
            let model = open()?;
            let s = model.new_session().map_err(e)?;
            s.feed(&model.tokenize(&prompt, true, false).map_err(e)?)
                .map_err(e)?;
            // The guest's clock (WASI monotonic clock) times the decode loop alone.
            let t = std::time::Instant::now();
            let out = greedy_steps(&s, tokens)?;
            let secs = t.elapsed().as_secs_f64();
            Ok(json!({ "tokens": out, "decode_seconds": secs }))
        }
        Op::Generate { prompt, tokens } => {
            let model = open()?;
            let s = model.new_session().map_err(e)?;
            s.feed(&model.tokenize(&prompt, true, false).map_err(e)?)
                .map_err(e)?;
            let g = s
                .generate(&GenerateParams {
                    sampling: SamplingParams::greedy(),
                    max_tokens: tokens,
                    stop_at_eog: false,
                    ..GenerateParams::default()
                })
                .map_err(e)?;
            Ok(json!({ "tokens": g.tokens, "text": g.text }))
        }
        Op::Info => {
            let model = open()?;
            let i = model.info();
            Ok(json!({
                "name": i.name, "architecture": i.architecture, "vocab_size": i.vocab_size,
                "context_length": i.context_length, "bos": i.special_tokens.bos,
                "eos": i.special_tokens.eos, "eog": i.special_tokens.eog,
                "has_template": i.chat_template.is_some(),
                "models": realm_guest::list_models(),
            }))
        }
        Op::ForkRewind { prompt, tokens } => {
            let model = open()?;
            let a = model.new_session().map_err(e)?;
            let p = model.tokenize(&prompt, true, false).map_err(e)?;
            a.feed(&p).map_err(e)?;
            let b = a.fork().map_err(e)?;
            let from_a = greedy_steps(&a, tokens)?;
            let from_b = greedy_steps(&b, tokens)?;
            // Rewind a to the prompt plus one token and regenerate the rest.
            a.truncate(p.len() as u32 + 1).map_err(e)?;
            let again = greedy_steps(&a, tokens - 1)?;
            let top = b.top_logprobs(3).map_err(e)?;
            let logits = b.logits().map_err(e)?;
            Ok(json!({
                "a": from_a, "b": from_b, "again": again, "len_a": a.len(), "len_b": b.len(),
                "top": top.iter().map(|t| json!([t.token, t.logprob])).collect::<Vec<_>>(),
                "logits_len": logits.len(),
                "argmax": logits.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).map(|x| x.0),
            }))
        }
    }
}

realm_guest::export!(handle);
