//! `realm synth`: writes a random-weight GGUF model of a given architecture and shape, for
//! benchmarks at real model sizes without downloading weights. A preset gives the shape of a real
//! model; any flag overrides one field of it; without a preset the shape starts from the
//! architecture's tiny test preset.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use realm_engine::synth::{self, Arch, PRESETS, QuantMix, SynthSpec};

#[derive(clap::Args)]
pub struct Args {
    /// Shape of a real model (see --list).
    #[arg(long)]
    preset: Option<String>,
    /// Architecture (llama, qwen2, gemma3), for a shape given by flags.
    #[arg(long)]
    arch: Option<String>,
    /// Quantization mix: f32, f16, q8_0, q4_0, q4_k_m or q6_k.
    #[arg(long, default_value = "q4_k_m")]
    quant: String,
    /// Output file (written atomically: it appears only once complete).
    #[arg(short, long, required_unless_present = "list")]
    output: Option<PathBuf>,
    /// Seed of the random weights; equal seeds give byte-identical files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Vocabulary size.
    #[arg(long)]
    vocab: Option<usize>,
    /// Embedding length.
    #[arg(long)]
    dim: Option<usize>,
    /// Number of layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Query heads.
    #[arg(long)]
    heads: Option<usize>,
    /// Key-value heads (default: the preset's if it divides --heads, else --heads).
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Head dimension (default: dim / heads when either is given).
    #[arg(long)]
    head_dim: Option<usize>,
    /// Feed-forward length.
    #[arg(long)]
    ff: Option<usize>,
    /// Training context length.
    #[arg(long)]
    ctx: Option<usize>,
    /// RoPE frequency base.
    #[arg(long)]
    rope_base: Option<f32>,
    /// RMS norm epsilon.
    #[arg(long)]
    eps: Option<f32>,
    /// Sliding window of the local layers (gemma3).
    #[arg(long)]
    window: Option<usize>,
    /// Tie the output projection to the token embedding (true / false).
    #[arg(long)]
    tied: Option<bool>,
    /// `general.name` of the model.
    #[arg(long)]
    name: Option<String>,
    /// List the presets and quantization mixes, then exit.
    #[arg(long)]
    list: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.list {
        return list();
    }
    let spec = spec_from_args(&a)?;
    let path = a.output.clone().context("--output is required")?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let total = spec.file_size()?;
        eprintln!(
            "{}: {} {}, {} layers, dim {}, vocab {}, {} parameters -> {} ({})",
            spec.name,
            spec.arch.name(),
            spec.quant.name(),
            spec.n_layer,
            spec.n_embd,
            spec.n_vocab,
            human_count(spec.n_params()),
            path.display(),
            human_bytes(total)
        );
        let bar = ProgressBar::new(total).with_style(
            ProgressStyle::with_template(concat!(
                "{elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} ",
                "{bytes_per_sec} ETA {eta} {msg}"
            ))?
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    } else {
        ProgressBar::hidden()
    };

    let t0 = Instant::now();
    let summary = synth::write(&spec, &path, &mut |done, total, bytes| {
        bar.set_position(bytes);
        bar.set_message(format!("tensor {done}/{total}"));
    });
    bar.finish_and_clear();
    let summary = summary.with_context(|| format!("writing {}", path.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "wrote {}: {}, {} {}, {} tensors, {} parameters, {} in {secs:.1} s ({}/s)",
        path.display(),
        spec.name,
        spec.arch.name(),
        spec.quant.name(),
        summary.tensors,
        human_count(summary.params),
        human_bytes(summary.bytes),
        human_bytes((summary.bytes as f64 / secs.max(1e-9)) as u64),
    );
    Ok(())
}

/// The preset (or the architecture's tiny preset) with every given flag applied.
fn spec_from_args(a: &Args) -> Result<SynthSpec> {
    let arch = a.arch.as_deref().map(Arch::from_name).transpose()?;
    let mut s = match (&a.preset, arch) {
        (Some(p), _) => SynthSpec::preset(p)?,
        (None, Some(arch)) => {
            let mut s = SynthSpec::preset(&format!("tiny-{}", arch.name()))?;
            s.name = format!("synthetic {}", arch.name());
            s
        }
        (None, None) => bail!(
            "give --preset NAME or --arch ARCH (presets: {})",
            PRESETS
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    if let Some(arch) = arch.filter(|&x| x != s.arch) {
        bail!(
            "--arch {} contradicts preset {:?}, which is {}",
            arch.name(),
            a.preset.as_deref().unwrap_or_default(),
            s.arch.name()
        );
    }
    s.quant = QuantMix::from_name(&a.quant)?;
    s.seed = a.seed;
    let set = |field: &mut usize, v: Option<usize>| {
        if let Some(v) = v {
            *field = v;
        }
    };
    set(&mut s.n_vocab, a.vocab);
    set(&mut s.n_embd, a.dim);
    set(&mut s.n_layer, a.layers);
    set(&mut s.n_ff, a.ff);
    set(&mut s.n_ctx, a.ctx);
    if let Some(h) = a.heads {
        s.n_head = h;
        if a.kv_heads.is_none() && !h.is_multiple_of(s.n_head_kv) {
            s.n_head_kv = h;
        }
    }
    set(&mut s.n_head_kv, a.kv_heads);
    match a.head_dim {
        Some(hd) => s.head_dim = hd,
        // A new width or head count makes the preset's head size meaningless.
        None if a.dim.is_some() || a.heads.is_some() => {
            if s.n_head == 0 || !s.n_embd.is_multiple_of(s.n_head) {
                bail!(
                    "dim {} is not a multiple of {} heads; give --head-dim",
                    s.n_embd,
                    s.n_head
                );
            }
            s.head_dim = s.n_embd / s.n_head;
        }
        None => {}
    }
    if let Some(v) = a.rope_base {
        s.rope_base = v;
    }
    if let Some(v) = a.eps {
        s.rms_eps = v;
    }
    if a.window.is_some() {
        s.sliding_window = a.window;
    }
    if let Some(v) = a.tied {
        s.tied_embeddings = v;
    }
    if let Some(n) = &a.name {
        s.name = n.clone();
    }
    s.validate()?;
    Ok(s)
}

fn list() -> Result<()> {
    println!("presets:");
    for p in PRESETS {
        let s = SynthSpec::preset(p.name)?;
        println!(
            "  {:<16} {:<7} {:>6} params  vocab {:>6}  dim {:>4}  layers {:>2}  heads {:>2}/{:<2} \
             ff {:>5}",
            p.name,
            s.arch.name(),
            human_count(s.n_params()),
            s.n_vocab,
            s.n_embd,
            s.n_layer,
            s.n_head,
            s.n_head_kv,
            s.n_ff
        );
    }
    let mixes: Vec<_> = QuantMix::ALL.iter().map(|q| q.name()).collect();
    println!("quantization mixes: {}", mixes.join(", "));
    Ok(())
}

fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}
