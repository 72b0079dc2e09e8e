//! A guest for the runtime's own tests and benchmarks: each request names one behaviour,
//! including the hostile ones the sandbox must stop (infinite loops, memory bombs, deep
//! recursion, oversized host-call data, session floods, traps mid-generation, forged handles).

use std::hint::black_box;

use realm_guest::{GenerateParams, LogitBias, Model, SamplingParams, Session, TokenMask, emit};
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
    /// Use a session handle after dropping the session.
    UseAfterDrop,
    /// Pass a model handle where a session is expected.
    ModelAsSession,
    /// Panic with a message of several lines.
    Panic { message: String },
    /// Sleep (WASI clocks) for `ms` milliseconds: waiting, not CPU time.
    Sleep { ms: u64 },
    /// Tokenize `text` repeated `repeat` times; report the token count.
    Tokenize {
        text: String,
        repeat: usize,
        #[serde(default)]
        parse_special: bool,
    },
    /// Absurd arguments to every host call that takes sizes or lists: each call's outcome
    /// (`ok ...` or the error value) is reported; none may bring the host down.
    Absurd { prompt: String },
    /// A sequence of host calls with arbitrary arguments (the runtime's fuzz target): each
    /// call's outcome is reported; a forged session handle ends the call with a fault.
    Calls { calls: Vec<HostCall> },
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

/// One host call with its arguments as a fuzzer makes them. Floats travel as their bits (JSON
/// has no NaN or infinity); `session` picks one of the sessions opened so far (modulo their
/// number), or is passed as a raw handle when none is open or it is at least 1 000 000.
#[derive(Deserialize)]
#[serde(tag = "call", rename_all = "kebab-case")]
enum HostCall {
    Tokenize {
        text: String,
        add_special: bool,
        parse_special: bool,
    },
    Detokenize {
        tokens: Vec<u32>,
    },
    TokenBytes {
        token: u32,
    },
    Vocab,
    Template {
        messages: String,
        tools: Option<String>,
        add_generation_prompt: bool,
    },
    NewSession,
    Feed {
        session: u32,
        tokens: Vec<u32>,
    },
    Sample {
        session: u32,
        params: Params,
        mask: Option<Mask>,
    },
    Logprob {
        session: u32,
        token: u32,
    },
    TopLogprobs {
        session: u32,
        k: u32,
    },
    Logits {
        session: u32,
    },
    Fork {
        session: u32,
    },
    Truncate {
        session: u32,
        len: u32,
    },
    Len {
        session: u32,
    },
    Tokens {
        session: u32,
    },
    Generate {
        session: u32,
        params: Params,
        max_tokens: u32,
        stop: Vec<String>,
        stop_at_eog: bool,
        stream: bool,
    },
    Drop {
        session: u32,
    },
    Emit {
        text: String,
    },
}

#[derive(Deserialize)]
struct Params {
    temperature: u32,
    top_k: u32,
    top_p: u32,
    min_p: u32,
    repeat_penalty: u32,
    presence_penalty: u32,
    frequency_penalty: u32,
    penalty_last_n: u32,
    seed: Option<u64>,
    logit_bias: Vec<(u32, u32)>,
}

impl Params {
    fn to_wit(&self) -> SamplingParams {
        let f = f32::from_bits;
        SamplingParams {
            temperature: f(self.temperature),
            top_k: self.top_k,
            top_p: f(self.top_p),
            min_p: f(self.min_p),
            repeat_penalty: f(self.repeat_penalty),
            presence_penalty: f(self.presence_penalty),
            frequency_penalty: f(self.frequency_penalty),
            penalty_last_n: self.penalty_last_n,
            seed: self.seed,
            logit_bias: self
                .logit_bias
                .iter()
                .map(|&(token, bias)| LogitBias {
                    token,
                    bias: f(bias),
                })
                .collect(),
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "kind", content = "v", rename_all = "kebab-case")]
enum Mask {
    Allow(Vec<u32>),
    Deny(Vec<u32>),
    Bits(Vec<u64>),
}

impl Mask {
    fn to_wit(&self) -> TokenMask {
        match self {
            Mask::Allow(v) => TokenMask::Allow(v.clone()),
            Mask::Deny(v) => TokenMask::Deny(v.clone()),
            Mask::Bits(v) => TokenMask::Bits(v.clone()),
        }
    }
}

fn run_calls(calls: Vec<HostCall>) -> Result<Value, String> {
    let model = open()?;
    let mut held: Vec<Session> = Vec::new();
    let mut out = Vec::new();
    for c in calls {
        let r = run_call(&model, &mut held, c);
        out.push(json!(r.unwrap_or_else(|e| format!("err {e}"))));
    }
    Ok(json!({ "results": out, "sessions": held.len() }))
}

/// The session `i` names (see [`HostCall`]); a forged one is never dropped by the guest.
fn pick(held: &[Session], i: u32) -> std::mem::ManuallyDrop<Session> {
    if held.is_empty() || i >= 1_000_000 {
        // SAFETY (of the guest's own bookkeeping only): deliberately forged; the host must
        // refuse it, and ManuallyDrop keeps the guest from dropping it.
        std::mem::ManuallyDrop::new(unsafe { Session::from_handle(i) })
    } else {
        let h = held[i as usize % held.len()].handle();
        // SAFETY: a handle this guest holds in `held`; ManuallyDrop keeps it owned there.
        std::mem::ManuallyDrop::new(unsafe { Session::from_handle(h) })
    }
}

fn run_call(
    model: &Model,
    held: &mut Vec<Session>,
    c: HostCall,
) -> Result<String, realm_guest::Error> {
    Ok(match c {
        HostCall::Tokenize {
            text,
            add_special,
            parse_special,
        } => format!(
            "{:?}",
            model.tokenize(&text, add_special, parse_special)?.len()
        ),
        HostCall::Detokenize { tokens } => model.detokenize(&tokens)?.len().to_string(),
        HostCall::TokenBytes { token } => model.token_bytes(token)?.len().to_string(),
        HostCall::Vocab => model.vocab().len().to_string(),
        HostCall::Template {
            messages,
            tools,
            add_generation_prompt,
        } => model
            .apply_chat_template(&messages, tools.as_deref(), add_generation_prompt)?
            .len()
            .to_string(),
        HostCall::NewSession => {
            held.push(model.new_session()?);
            held.len().to_string()
        }
        HostCall::Feed { session, tokens } => {
            pick(held, session).feed(&tokens)?;
            "fed".into()
        }
        HostCall::Sample {
            session,
            params,
            mask,
        } => pick(held, session)
            .sample(&params.to_wit(), mask.as_ref().map(Mask::to_wit).as_ref())?
            .to_string(),
        HostCall::Logprob { session, token } => pick(held, session).logprob(token)?.to_string(),
        HostCall::TopLogprobs { session, k } => {
            pick(held, session).top_logprobs(k)?.len().to_string()
        }
        HostCall::Logits { session } => pick(held, session).logits()?.len().to_string(),
        HostCall::Fork { session } => {
            let f = pick(held, session).fork()?;
            held.push(f);
            held.len().to_string()
        }
        HostCall::Truncate { session, len } => {
            pick(held, session).truncate(len)?;
            "truncated".into()
        }
        HostCall::Len { session } => pick(held, session).len().to_string(),
        HostCall::Tokens { session } => pick(held, session).tokens().len().to_string(),
        HostCall::Generate {
            session,
            params,
            max_tokens,
            stop,
            stop_at_eog,
            stream,
        } => {
            let g = pick(held, session).generate(&GenerateParams {
                sampling: params.to_wit(),
                max_tokens,
                stop,
                stop_at_eog,
                stream,
            })?;
            format!("{} {}", g.tokens.len(), g.text.len())
        }
        HostCall::Drop { session } => {
            if !held.is_empty() && session < 1_000_000 {
                let i = session as usize % held.len();
                drop(held.swap_remove(i));
            }
            held.len().to_string()
        }
        HostCall::Emit { text } => {
            emit(&text);
            text.len().to_string()
        }
    })
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
        Op::UseAfterDrop => {
            let model = open()?;
            let s = model.new_session().map_err(e)?;
            let handle = s.handle();
            drop(s);
            // SAFETY (of the guest's own bookkeeping only): the handle was just dropped.
            let s = unsafe { Session::from_handle(handle) };
            let len = s.len();
            std::mem::forget(s);
            Ok(json!({ "len": len }))
        }
        Op::ModelAsSession => {
            let model = open()?;
            // SAFETY (of the guest's own bookkeeping only): a model handle, deliberately
            // passed as a session.
            let s = unsafe { Session::from_handle(model.handle()) };
            let len = s.len();
            std::mem::forget(s);
            Ok(json!({ "len": len }))
        }
        Op::Panic { message } => panic!("{message}"),
        Op::Sleep { ms } => {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            Ok(json!({ "slept_ms": ms }))
        }
        Op::Tokenize {
            text,
            repeat,
            parse_special,
        } => {
            let model = open()?;
            let t = text.repeat(repeat);
            let n = model.tokenize(&t, false, parse_special).map_err(e)?.len();
            Ok(json!({ "bytes": t.len(), "tokens": n }))
        }
        Op::Absurd { prompt } => absurd(&prompt),
        Op::Calls { calls } => run_calls(calls),
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

/// The outcomes of host calls with absurd arguments, by name.
fn absurd(prompt: &str) -> Result<Value, String> {
    let e = |e: realm_guest::Error| e.to_string();
    let model = open()?;
    let info = model.info();
    let n_vocab = info.vocab_size;
    let s = model.new_session().map_err(e)?;
    s.feed(&model.tokenize(prompt, true, false).map_err(e)?)
        .map_err(e)?;
    let mut out = serde_json::Map::new();
    let mut put = |name: &str, r: Result<String, realm_guest::Error>| {
        out.insert(
            name.into(),
            json!(r.unwrap_or_else(|err| format!("err {err}"))),
        );
    };
    let huge = SamplingParams {
        temperature: 0.8,
        top_k: u32::MAX,
        penalty_last_n: u32::MAX,
        repeat_penalty: 1.1,
        presence_penalty: 0.5,
        frequency_penalty: 0.5,
        seed: Some(1),
        ..SamplingParams::default()
    };
    put(
        "sample_penalty_last_n_max",
        s.sample(&huge, None).map(|t| format!("ok {t}")),
    );
    let bias: Vec<LogitBias> = (0..1_000_000u32)
        .map(|i| LogitBias {
            token: u32::MAX - i,
            bias: 1.0,
        })
        .collect();
    put(
        "sample_bias_out_of_range",
        s.sample(
            &SamplingParams {
                logit_bias: bias,
                ..SamplingParams::greedy()
            },
            None,
        )
        .map(|t| format!("ok {t}")),
    );
    let repeated: Vec<LogitBias> = (0..n_vocab as usize * 2)
        .map(|i| LogitBias {
            token: i as u32 % n_vocab,
            bias: 0.0,
        })
        .collect();
    put(
        "sample_bias_longer_than_vocab",
        s.sample(
            &SamplingParams {
                logit_bias: repeated,
                ..SamplingParams::greedy()
            },
            None,
        )
        .map(|t| format!("ok {t}")),
    );
    let ids: Vec<u32> = (0..3_000_000u32).map(|i| i % n_vocab).collect();
    put(
        "sample_mask_allow_3m",
        s.sample(&SamplingParams::greedy(), Some(&TokenMask::Allow(ids)))
            .map(|t| format!("ok {t}")),
    );
    put(
        "sample_mask_bits_2m_words",
        s.sample(
            &SamplingParams::greedy(),
            Some(&TokenMask::Bits(vec![u64::MAX; 2_000_000])),
        )
        .map(|t| format!("ok {t}")),
    );
    put(
        "sample_mask_out_of_range",
        s.sample(
            &SamplingParams::greedy(),
            Some(&TokenMask::Deny(vec![u32::MAX])),
        )
        .map(|t| format!("ok {t}")),
    );
    put(
        "sample_nan_temperature",
        s.sample(
            &SamplingParams {
                temperature: f32::NAN,
                ..SamplingParams::default()
            },
            None,
        )
        .map(|t| format!("ok {t}")),
    );
    put(
        "top_logprobs_max",
        s.top_logprobs(u32::MAX).map(|v| format!("ok {}", v.len())),
    );
    put(
        "logprob_max",
        s.logprob(u32::MAX).map(|p| format!("ok {p}")),
    );
    put("truncate_max", s.truncate(u32::MAX).map(|()| "ok".into()));
    put(
        "detokenize_1m",
        model
            .detokenize(&vec![n_vocab - 1; 1_000_000])
            .map(|t| format!("ok {}", t.len())),
    );
    put(
        "detokenize_out_of_range",
        model.detokenize(&[u32::MAX]).map(|t| format!("ok {t}")),
    );
    put(
        "token_bytes_max",
        model
            .token_bytes(u32::MAX)
            .map(|b| format!("ok {}", b.len())),
    );
    put(
        "feed_out_of_range",
        s.feed(&[u32::MAX]).map(|()| "ok".into()),
    );
    put(
        "feed_past_context",
        s.feed(&vec![1; info.context_length as usize + 1])
            .map(|()| "ok".into()),
    );
    let stops: Vec<String> = (0..100_000).map(|i| format!("stop {i}")).collect();
    put(
        "generate_many_stops",
        s.generate(&GenerateParams {
            sampling: huge.clone(),
            max_tokens: 4,
            stop: stops,
            ..GenerateParams::default()
        })
        .map(|g| format!("ok {}", g.tokens.len())),
    );
    put(
        "generate_long_stop",
        s.generate(&GenerateParams {
            sampling: huge.clone(),
            max_tokens: 4,
            stop: vec!["y".repeat(8 << 20)],
            ..GenerateParams::default()
        })
        .map(|g| format!("ok {}", g.tokens.len())),
    );
    put(
        "generate_max_tokens_max",
        s.generate(&GenerateParams {
            sampling: huge,
            max_tokens: u32::MAX,
            stop_at_eog: false,
            ..GenerateParams::default()
        })
        .map(|g| format!("ok {}", g.tokens.len())),
    );
    put(
        "apply_chat_template_bad_json",
        model
            .apply_chat_template("{not json", Some("[1, 2"), true)
            .map(|t| format!("ok {}", t.len())),
    );
    let forks: Vec<Session> = (0..8).filter_map(|_| s.fork().ok()).collect();
    put("fork", Ok(format!("ok {}", forks.len())));
    put("len", Ok(format!("ok {}", s.len())));
    Ok(Value::Object(out))
}

realm_guest::export!(handle);
