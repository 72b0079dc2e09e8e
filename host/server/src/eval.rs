//! `realm eval`: one JSON object per prompt, in the format of the llama.cpp reference files
//! (`prompt`, `prompt_tokens`, `top_logits`, `greedy`, `greedy_gaps`, `greedy_text`), so that Realm
//! and llama.cpp can be compared on any prompt.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use realm_engine::session::{argmax, top_k};
use realm_engine::tokenizer::Tokenizer;
use realm_engine::{Model, Session};
use serde::Deserialize;
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model file.
    model: PathBuf,
    /// Prompt text (tokenized by the model's own tokenizer).
    #[arg(long)]
    prompt: Option<String>,
    /// Prompt token ids, comma-separated (used as given: no BOS is added).
    #[arg(long, value_delimiter = ',')]
    tokens: Option<Vec<u32>>,
    /// A file of prompts: JSON lines with `prompt` and/or `prompt_tokens` (a reference file
    /// works as is), or a JSON array of such objects or of strings.
    #[arg(long)]
    prompts_file: Option<PathBuf>,
    /// How many of the highest logits to print.
    #[arg(long, default_value_t = 20)]
    top: usize,
    /// How many greedy tokens to generate.
    #[arg(long, default_value_t = 16)]
    greedy: usize,
    /// Print JSON lines (the only format; accepted for compatibility with the documented usage).
    #[arg(long)]
    json: bool,
    /// Worker threads (0 = physical cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    backend: crate::backend_args::BackendArgs,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptEntry {
    Text(String),
    Object {
        #[serde(default)]
        prompt: Option<String>,
        #[serde(default)]
        prompt_tokens: Option<Vec<u32>>,
    },
}

struct Prompt {
    text: Option<String>,
    tokens: Option<Vec<u32>>,
}

fn read_prompts(path: &PathBuf) -> Result<Vec<Prompt>> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let entries: Vec<PromptEntry> = if s.trim_start().starts_with('[') {
        serde_json::from_str(&s).with_context(|| format!("parsing {}", path.display()))?
    } else {
        s.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))
            })
            .collect::<Result<_>>()?
    };
    Ok(entries
        .into_iter()
        .map(|e| match e {
            PromptEntry::Text(t) => Prompt {
                text: Some(t),
                tokens: None,
            },
            PromptEntry::Object {
                prompt,
                prompt_tokens,
            } => Prompt {
                text: prompt,
                tokens: prompt_tokens,
            },
        })
        .collect())
}

pub fn run(a: Args) -> Result<()> {
    let _ = a.json;
    let mut prompts = Vec::new();
    if let Some(t) = a.prompt {
        prompts.push(Prompt {
            text: Some(t),
            tokens: None,
        });
    }
    if let Some(t) = a.tokens {
        prompts.push(Prompt {
            text: None,
            tokens: Some(t),
        });
    }
    if let Some(p) = &a.prompts_file {
        prompts.extend(read_prompts(p)?);
    }
    if prompts.is_empty() {
        bail!("nothing to evaluate: give --prompt, --tokens or --prompts-file");
    }
    let model = Model::load(&a.model, &a.backend.load_options(a.threads))
        .with_context(|| format!("loading {}", a.model.display()))?;
    eprintln!("backend: {}", model.backend_note());
    let tokenizer = Tokenizer::from_gguf(&model.file);
    if let Ok(t) = &tokenizer {
        for w in t.warnings() {
            eprintln!("warning: {w}");
        }
    }
    let n_vocab = model.hparams.n_vocab;
    for p in prompts {
        let tokens = match (p.tokens, &p.text) {
            (Some(t), _) => t,
            // As llama.cpp's tools do: BOS as the model asks, special tokens parsed.
            (None, Some(text)) => match &tokenizer {
                Ok(t) => t.encode(text, true, true),
                Err(e) => bail!("cannot tokenize the prompt: {e}"),
            },
            (None, None) => bail!("a prompt entry has neither `prompt` nor `prompt_tokens`"),
        };
        if tokens.is_empty() {
            bail!("empty prompt");
        }
        let mut s = Session::new(&model, tokens.len() + a.greedy + 1)?;
        let mut logits = s.feed(&tokens)?;
        let top: Vec<(u32, f32)> = top_k(&logits, a.top);
        let mut greedy = Vec::with_capacity(a.greedy);
        let mut gaps = Vec::with_capacity(a.greedy);
        for i in 0..a.greedy {
            let best = top_k(&logits, 2);
            gaps.push(best.first().map_or(0.0, |b| b.1) - best.get(1).map_or(0.0, |b| b.1));
            let t = argmax(&logits);
            greedy.push(t);
            if i + 1 < a.greedy {
                logits = s.feed(&[t])?;
            }
        }
        debug_assert!(logits.len() == n_vocab);
        let round = |x: f32| (x as f64 * 1e6).round() / 1e6;
        let line = json!({
            "prompt": p.text.unwrap_or_default(),
            "prompt_tokens": tokens,
            "top_logits": top.iter().map(|&(t, l)| json!([t, round(l)])).collect::<Vec<_>>(),
            "greedy": greedy,
            "greedy_gaps": gaps.iter().map(|&g| (g as f64 * 1e4).round() / 1e4).collect::<Vec<_>>(),
            "greedy_text": tokenizer.as_ref().map(|t| t.decode(&greedy)).unwrap_or_default(),
        });
        println!("{line}");
    }
    Ok(())
}
