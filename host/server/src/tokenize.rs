//! `realm tokenize`: run a GGUF file's tokenizer on text. Three modes:
//!
//! * `-p TEXT` prints the ids (with `--pieces`, one `id -> piece` line per token);
//! * `--tests FILE.inp` prints one line per test string in the format of llama.cpp's
//!   `test-tokenizer-0` `.out` files (each id preceded by a space), so `diff` against the `.out`
//!   file checks agreement;
//! * `--bench FILE` measures encoding throughput on the file's text, repeated to at least 1 MB.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use realm_engine::gguf::GgufFile;
use realm_engine::tokenizer::Tokenizer;

/// llama.cpp's separator between test strings in `.inp` files.
const TEST_SEPARATOR: &str = "\n__ggml_vocab_test__\n";

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file with `tokenizer.ggml.*` metadata (a model or a vocabulary-only file).
    model: PathBuf,
    /// Text to tokenize.
    #[arg(short = 'p', long = "prompt", conflicts_with_all = ["tests", "bench"])]
    prompt: Option<String>,
    /// A llama.cpp `.inp` file: tokenize each test string (no BOS/EOS; special tokens only with
    /// `--parse-special`).
    #[arg(long, conflicts_with = "bench")]
    tests: Option<PathBuf>,
    /// Measure encoding speed on this file's text (repeated to at least 1 MB).
    #[arg(long)]
    bench: Option<PathBuf>,
    /// Do not add BOS/EOS even where the model asks for them (`-p` only).
    #[arg(long)]
    no_bos: bool,
    /// Turn special-token text such as `<|im_start|>` into those tokens.
    #[arg(long)]
    parse_special: bool,
    /// Print each token with its text (`-p` only).
    #[arg(long)]
    pieces: bool,
    /// Timed repetitions for `--bench` (the best is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

pub fn run(a: Args) -> Result<()> {
    let f = GgufFile::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let t0 = Instant::now();
    let tok = Tokenizer::from_gguf(&f).with_context(|| format!("{}", a.model.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    drop(f);
    for w in tok.warnings() {
        eprintln!("warning: {w}");
    }
    if let Some(path) = &a.tests {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut cases: Vec<&str> = text.split(TEST_SEPARATOR).collect();
        // The file ends with a separator, which leaves an empty piece that is not a test.
        if cases.len() > 1 && cases.last() == Some(&"") {
            cases.pop();
        }
        let mut out = String::new();
        for case in cases {
            for id in tok.encode(case, false, a.parse_special) {
                out.push(' ');
                out.push_str(&id.to_string());
            }
            out.push('\n');
        }
        print!("{out}");
        return Ok(());
    }
    if let Some(path) = &a.bench {
        return bench(&tok, path, a.parse_special, a.runs.max(1), load_s);
    }
    let Some(text) = &a.prompt else {
        bail!("nothing to do: give -p TEXT, --tests FILE.inp or --bench FILE");
    };
    let ids = tok.encode(text, !a.no_bos, a.parse_special);
    if a.pieces {
        for &id in &ids {
            let piece = String::from_utf8_lossy(tok.token_to_piece(id, true));
            println!("{id:>7} -> {piece:?}");
        }
    } else {
        let s: Vec<String> = ids.iter().map(u32::to_string).collect();
        println!("{}", s.join(" "));
    }
    Ok(())
}

fn bench(
    tok: &Tokenizer,
    path: &PathBuf,
    parse_special: bool,
    runs: usize,
    load_s: f64,
) -> Result<()> {
    let base =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if base.is_empty() {
        bail!("{} is empty", path.display());
    }
    let mut text = String::with_capacity((1 << 20) + base.len());
    while text.len() < 1 << 20 {
        text.push_str(&base);
    }
    let mut best = f64::INFINITY;
    let mut n_tokens = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let ids = tok.encode(&text, false, parse_special);
        best = best.min(t.elapsed().as_secs_f64());
        n_tokens = ids.len();
    }
    let mb = text.len() as f64 / 1e6;
    println!(
        "vocab {} ({} tokens, pre {:?}) loaded in {:.0} ms",
        tok.pre_family(),
        tok.n_vocab(),
        tok.pre(),
        load_s * 1e3
    );
    println!(
        "encoded {:.2} MB into {} tokens in {:.3} s (best of {runs}): {:.2} MB/s, {:.0} tokens/s",
        mb,
        n_tokens,
        best,
        mb / best,
        n_tokens as f64 / best
    );
    Ok(())
}
