//! `realm run`: generate text from a prompt on the terminal, streaming tokens as they come, or
//! chat interactively (`--chat`) with the model's chat template. Text goes to stdout; progress,
//! prompts and timings go to stderr, so the output can be piped.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use realm_engine::sample::{Sampler, SamplingParams};
use realm_engine::template::{ChatMessage, ChatTemplate};
use realm_engine::tokenizer::{StreamDecoder, Tokenizer};
use realm_engine::{LoadOptions, Model, Session};

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model file.
    model: PathBuf,
    /// Prompt text (special tokens such as `<start_of_turn>` are parsed). With --chat, the
    /// first user message.
    #[arg(short, long)]
    prompt: Option<String>,
    /// Tokens to generate (per reply with --chat); generation also ends at an end-of-generation
    /// token or when the context is full.
    #[arg(short = 'n', long = "n-predict", default_value_t = 256)]
    n_predict: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    temperature: f32,
    /// Seed of the sampler (default: random; printed with the timings).
    #[arg(long)]
    seed: Option<u64>,
    /// Top-k cut-off (0 = off).
    #[arg(long = "top-k", default_value_t = 40)]
    top_k: usize,
    /// Top-p (nucleus) cut-off (1 = off).
    #[arg(long = "top-p", default_value_t = 0.95)]
    top_p: f32,
    /// Min-p cut-off (0 = off).
    #[arg(long = "min-p", default_value_t = 0.05)]
    min_p: f32,
    /// Repetition penalty over the last --repeat-last-n tokens (1 = off).
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    repeat_last_n: usize,
    /// Interactive chat using the model's chat template (ends on `/exit` or end of input).
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    /// Worker threads (0 = physical cores).
    #[arg(short = 't', long, default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    backend: crate::backend_args::BackendArgs,
    /// Context size in tokens (capped at the model's training context).
    #[arg(long = "ctx", default_value_t = 4096)]
    ctx: usize,
}

impl Args {
    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            penalty_last_n: self.repeat_last_n,
            seed: self.seed,
            ..Default::default()
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    if !a.chat && a.prompt.is_none() {
        bail!("give a prompt with -p, or use --chat");
    }
    if a.ctx == 0 {
        bail!("--ctx must be at least 1");
    }
    let params = a.sampling();
    params.validate()?;
    let model = load(&a.model, &a.backend.load_options(a.threads))?;
    let tok = Tokenizer::from_gguf(&model.file).context("reading the model's tokenizer")?;
    let mut generator = Generator {
        session: Session::new(&model, a.ctx)?,
        ctx: a.ctx.min(model.hparams.n_ctx_train),
        cached: Vec::new(),
        sampler: Sampler::new(params),
        tok: &tok,
        n_predict: a.n_predict,
    };
    if a.chat {
        chat(&a, &model, &mut generator)
    } else {
        let prompt = a.prompt.as_deref().unwrap_or_default();
        let tokens = tok.encode(prompt, true, true);
        let (stats, _) = generator.generate(&tokens, &mut std::io::stdout())?;
        if std::io::stdout().is_terminal() {
            println!();
        }
        stats.report(generator.sampler.seed());
        Ok(())
    }
}

/// Loads the model; on a terminal with a spinner naming the file, and a line saying how long it
/// took. Nothing is printed when stderr is not a terminal.
fn load(path: &Path, opts: &LoadOptions) -> Result<Model> {
    let tty = std::io::stderr().is_terminal();
    let spinner = tty.then(|| {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .expect("static template"),
        );
        pb.set_message(format!(
            "loading {} ({})",
            path.display(),
            crate::models::human_bytes(size)
        ));
        pb.enable_steady_tick(Duration::from_millis(100));
        pb
    });
    let t0 = Instant::now();
    let model = Model::load(path, opts).with_context(|| format!("loading {}", path.display()));
    if let Some(pb) = spinner {
        pb.finish_and_clear();
    }
    let model = model?;
    if tty {
        eprintln!(
            "loaded {} ({}, {} layers) in {:.2} s",
            path.display(),
            model.hparams.arch,
            model.hparams.n_layer,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(model)
}

/// One sequence's generation state: the KV session, the tokens it holds, and the sampler.
struct Generator<'m> {
    session: Session<'m>,
    ctx: usize,
    /// Exactly the tokens in the session's KV cache, in order.
    cached: Vec<u32>,
    sampler: Sampler,
    tok: &'m Tokenizer,
    n_predict: usize,
}

#[derive(Default)]
struct Stats {
    prompt_tokens: usize,
    prompt_time: Duration,
    gen_tokens: usize,
    gen_time: Duration,
}

impl Stats {
    fn report(&self, seed: u64) {
        let rate = |n: usize, t: Duration| {
            if t.is_zero() {
                0.0
            } else {
                n as f64 / t.as_secs_f64()
            }
        };
        eprintln!(
            "prompt {} tokens at {:.1} t/s, generation {} tokens at {:.1} t/s (seed {seed})",
            self.prompt_tokens,
            rate(self.prompt_tokens, self.prompt_time),
            self.gen_tokens,
            rate(self.gen_tokens, self.gen_time),
        );
    }
}

impl Generator<'_> {
    /// Brings the cache to `tokens` (reusing the longest common prefix it already holds: in a
    /// chat, only the new part of the conversation is evaluated), then generates, writing text
    /// to `out` as it becomes complete. Returns the timings and the generated text.
    fn generate(&mut self, tokens: &[u32], out: &mut impl Write) -> Result<(Stats, String)> {
        if tokens.is_empty() {
            bail!("the prompt is empty (no tokens)");
        }
        if tokens.len() >= self.ctx {
            bail!(
                "the prompt has {} tokens; the context holds {} (raise --ctx)",
                tokens.len(),
                self.ctx
            );
        }
        // At least one token must be fed to get logits.
        let keep = common_prefix(&self.cached, tokens).min(tokens.len() - 1);
        self.session.truncate(keep);
        self.cached.truncate(keep);
        let mut stats = Stats {
            prompt_tokens: tokens.len() - keep,
            ..Default::default()
        };
        for &t in &tokens[keep..] {
            self.sampler.accept(t);
        }
        let t0 = Instant::now();
        let mut logits = self.session.feed(&tokens[keep..])?;
        stats.prompt_time = t0.elapsed();
        self.cached.extend_from_slice(&tokens[keep..]);

        let t1 = Instant::now();
        let mut dec = StreamDecoder::new();
        let mut text = String::new();
        for i in 0..self.n_predict {
            let id = self.sampler.sample(&logits, None)?;
            if self.tok.is_eog(id) {
                break;
            }
            self.sampler.accept(id);
            stats.gen_tokens += 1;
            let piece = dec.push(self.tok, id);
            out.write_all(piece.as_bytes())?;
            out.flush()?;
            text.push_str(&piece);
            // The last token needs no forward pass unless another will follow.
            if i + 1 == self.n_predict || self.cached.len() + 1 >= self.ctx {
                break;
            }
            logits = self.session.feed(&[id])?;
            self.cached.push(id);
        }
        let rest = dec.finish();
        out.write_all(rest.as_bytes())?;
        out.flush()?;
        text.push_str(&rest);
        stats.gen_time = t1.elapsed();
        Ok((stats, text))
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn chat(a: &Args, model: &Model, generator: &mut Generator<'_>) -> Result<()> {
    let template = ChatTemplate::for_model(&model.file).context("the model's chat template")?;
    let interactive = std::io::stdin().is_terminal();
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(ChatMessage::system(s.clone()));
    }
    let mut first = a.prompt.clone();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut stdout = std::io::stdout();
    if interactive {
        eprintln!("chat: type a message, /exit or Ctrl-D to leave");
    }
    loop {
        let input = match first.take() {
            Some(p) => p,
            None => {
                if interactive {
                    eprint!("> ");
                    std::io::stderr().flush()?;
                }
                match lines.next() {
                    None => break,
                    Some(l) => l?,
                }
            }
        };
        let input = input.trim_end_matches(['\r', '\n']);
        if input.trim() == "/exit" {
            break;
        }
        if input.trim().is_empty() {
            continue;
        }
        messages.push(ChatMessage::user(input));
        let rendered = template.render(&messages, None, true)?;
        // The tokenizer adds BOS itself where the model wants one; a template's BOS text would
        // double it.
        let text = if generator.tok.add_bos() {
            template.strip_bos(&rendered)
        } else {
            &rendered
        };
        let tokens = generator.tok.encode(text, true, true);
        let (stats, reply) = match generator.generate(&tokens, &mut stdout) {
            Ok(r) => r,
            Err(e) => {
                // Most likely the conversation outgrew the context: say so and start over.
                eprintln!("error: {e:#}; the conversation is cleared");
                messages.retain(|m| m.role == "system");
                continue;
            }
        };
        writeln!(stdout)?;
        stdout.flush()?;
        stats.report(generator.sampler.seed());
        messages.push(ChatMessage::assistant(reply.trim().to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_len() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
    }
}
