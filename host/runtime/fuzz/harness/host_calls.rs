//! The host-call harness shared by the cargo-fuzz target `host_calls` (coverage-guided, with
//! sanitizers: `scripts/fuzz.sh`) and the randomized test `tests/host_calls_random.rs` (CI's
//! short run: seeded random inputs through the same harness, built with the workspace).
//!
//! Arbitrary arguments to every `realm:llm` host function, through the real WIT boundary: an
//! input becomes a list of host calls (token lists, masks, logit biases, sampling and generate
//! parameters with any float bits, strings, session handles, forged ones included) that the
//! `testbed` guest makes against a tiny model written in-process by `realm_engine::synth`. Every
//! call must end in a value, an error value, a limit or a guest fault: never a panic of the host,
//! a runtime failure or an unbounded allocation.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use realm_engine::sched::{Engine, EngineConfig};
use realm_engine::synth::{Arch, QuantMix, SynthSpec};
use realm_engine::{LoadOptions, Model};
use realm_runtime::{
    Guest, GuestError, GuestLimits, InvokeContext, Runtime, RuntimeConfig, builtin,
};
use serde::Serialize;

/// The JSON shape of the testbed guest's `calls` op (see `guests/testbed/src/lib.rs`).
#[derive(Arbitrary, Serialize, Debug)]
#[serde(tag = "call", rename_all = "kebab-case")]
pub enum HostCall {
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

/// Sampling parameters; floats as their bits (NaN and infinities included).
#[derive(Arbitrary, Serialize, Debug)]
pub struct Params {
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

#[derive(Arbitrary, Serialize, Debug)]
#[serde(tag = "kind", content = "v", rename_all = "kebab-case")]
pub enum Mask {
    Allow(Vec<u32>),
    Deny(Vec<u32>),
    Bits(Vec<u64>),
}

struct World {
    tokio: tokio::runtime::Runtime,
    rt: Runtime,
    guest: Guest,
    /// Kept alive for the runtime's model.
    _engine: Engine,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let spec = SynthSpec {
            name: "fuzz".into(),
            arch: Arch::Llama,
            n_vocab: 300,
            n_embd: 32,
            n_layer: 1,
            n_head: 2,
            n_head_kv: 1,
            head_dim: 16,
            n_ff: 32,
            n_ctx: 64,
            rope_base: 10000.0,
            rms_eps: 1e-5,
            sliding_window: None,
            tied_embeddings: false,
            quant: QuantMix::Q8_0,
            seed: 1,
        };
        let path = std::env::temp_dir().join(format!("realm-fuzz-{}.gguf", std::process::id()));
        realm_engine::synth::write(&spec, &path, &mut |_, _, _| {}).expect("synth model");
        let model = Model::load(
            &path,
            &LoadOptions {
                threads: 1,
                ..Default::default()
            },
        )
        .expect("load synth model");
        let _ = std::fs::remove_file(&path);
        let engine = Engine::start(
            Arc::new(model),
            EngineConfig {
                kv_tokens: 1024,
                ..EngineConfig::default()
            },
        )
        .expect("start the engine");
        let rt = Runtime::new(RuntimeConfig {
            max_instances: 4,
            max_memory_bytes: 64 << 20,
            host_work_threads: 2,
            ..RuntimeConfig::default()
        })
        .expect("runtime");
        rt.add_model("fuzz", engine.clone()).expect("add model");
        let guest = rt.load_guest(builtin::TESTBED_WASM).expect("testbed loads");
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio");
        World {
            tokio,
            rt,
            guest,
            _engine: engine,
        }
    })
}

/// Runs one input's calls through the testbed guest; panics on a host failure.
pub fn run_calls(calls: Vec<HostCall>) {
    let w = world();
    let input = serde_json::json!({ "op": "calls", "calls": calls }).to_string();
    let limits = GuestLimits {
        memory_bytes: 64 << 20,
        cpu_time: Duration::from_secs(2),
        wall_clock: Duration::from_secs(10),
        max_host_data_bytes: 1 << 20,
        max_output_bytes: 1 << 20,
        ..GuestLimits::default()
    };
    let ctx = InvokeContext {
        tenant: "fuzz".into(),
        limits,
        ..InvokeContext::default()
    };
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let r = w.tokio.block_on(w.rt.invoke(&w.guest, ctx, input, tx));
    match r {
        Ok(_) | Err(GuestError::Guest(_) | GuestError::Limit { .. } | GuestError::Fault(_)) => {}
        // A trap is the guest's own (it parses and drives everything itself); the host's
        // failures would show as a runtime error or a panic here.
        Err(GuestError::Trap(m)) => assert!(!m.contains("host work failed"), "{m}"),
        Err(e @ GuestError::Runtime(_)) => panic!("the runtime failed: {e}"),
    }
}
