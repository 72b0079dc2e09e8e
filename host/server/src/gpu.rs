//! `realm gpu`: the GPUs this binary can use and a check of its GPU kernels against the CPU.
//!
//! - `realm gpu info` lists the CUDA devices (name, architecture, memory, driver and NVRTC
//!   versions) or says why none can be used (no driver library, no device, no NVRTC, a binary
//!   built without the `cuda` feature). Exit status 0 either way: no GPU is a normal case.
//! - `realm gpu check` compiles (or loads from the cache) the kernels on a device and runs every
//!   tensor type's matrix kernel at batch 1 … 16 and a prefill size against the CPU's dequantized
//!   reference (see `realm_engine::backend::cuda::check`); exit status 1 if any is off.

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// List the CUDA devices, or say why there are none.
    Info,
    /// Check every tensor type's GPU matrix kernel against the CPU reference.
    Check {
        /// The device's ordinal.
        #[arg(long, default_value_t = 0)]
        gpu: usize,
        /// Only these types (ggml names, e.g. Q4_K,Q8_0); default all.
        #[arg(long, value_delimiter = ',')]
        types: Vec<String>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[cfg(not(feature = "cuda"))]
pub fn run(args: Args) -> Result<()> {
    match args.command {
        Cmd::Info => {
            println!("no GPU support in this build (build with `cargo build --features cuda`)");
            Ok(())
        }
        Cmd::Check { .. } => {
            anyhow::bail!("no GPU support in this build (build with `cargo build --features cuda`)")
        }
    }
}

#[cfg(feature = "cuda")]
pub fn run(args: Args) -> Result<()> {
    use realm_engine::backend::cuda;
    use realm_engine::quant::GgmlType;

    match args.command {
        Cmd::Info => {
            let n = match cuda::device_count() {
                Ok(n) => n,
                Err(e) => {
                    println!("no usable GPU: {e}");
                    return Ok(());
                }
            };
            if n == 0 {
                println!("no usable GPU: the CUDA driver reports no device");
            }
            let cache = cuda::default_cache_dir();
            for i in 0..n {
                match cuda::Device::open(i, cache.as_deref()) {
                    Ok(d) => println!(
                        "{} [kernels {}, {} set; {}]",
                        d.info(),
                        if d.kernels_cached {
                            "from the cache"
                        } else {
                            "compiled now"
                        },
                        if d.fast { "fast" } else { "reference" },
                        d.blas_note
                            .as_deref()
                            .unwrap_or("cuBLAS for prefill products")
                    ),
                    Err(e) => println!("cuda:{i}: unusable: {e}"),
                }
            }
            Ok(())
        }
        Cmd::Check { gpu, types, json } => {
            let types = types
                .iter()
                .map(|t| {
                    GgmlType::ALL
                        .into_iter()
                        .find(|g| g.name().eq_ignore_ascii_case(t))
                        .ok_or_else(|| anyhow::anyhow!("unknown tensor type {t:?}"))
                })
                .collect::<Result<Vec<_>>>()?;
            let cache = cuda::default_cache_dir();
            let t0 = std::time::Instant::now();
            let dev = cuda::Device::open(gpu, cache.as_deref())?;
            eprintln!(
                "{}; kernels {} in {:.0} ms",
                dev.info(),
                if dev.kernels_cached {
                    "loaded from the cache"
                } else {
                    "compiled"
                },
                t0.elapsed().as_secs_f64() * 1e3
            );
            if !json {
                println!(
                    "{:<6} {:>5} {:<6} {:>12} {:>14}  result",
                    "type", "batch", "path", "max rel err", "vs CPU kernels"
                );
            }
            let rows = cuda::check_kernels(&dev, &types, &mut |r| {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "type": r.ty.name(), "batch": r.n, "path": r.path.name(),
                            "max_rel_err": r.max_rel_err,
                            "max_rel_diff_cpu": r.max_rel_diff_cpu, "ok": r.ok,
                        })
                    );
                } else {
                    println!(
                        "{:<6} {:>5} {:<6} {:>12.2e} {:>14.2e}  {}",
                        r.ty.name(),
                        r.n,
                        r.path.name(),
                        r.max_rel_err,
                        r.max_rel_diff_cpu,
                        if r.ok { "ok" } else { "FAIL" }
                    );
                }
            })?;
            let bad: Vec<String> = rows
                .iter()
                .filter(|r| !r.ok)
                .map(|r| format!("{} x{}", r.ty.name(), r.n))
                .collect();
            if !bad.is_empty() {
                anyhow::bail!(
                    "{} of {} kernel checks off by more than {:e}: {}",
                    bad.len(),
                    rows.len(),
                    cuda::TOLERANCE,
                    bad.join(", ")
                );
            }
            eprintln!(
                "all {} kernel checks within {:e}",
                rows.len(),
                cuda::TOLERANCE
            );
            Ok(())
        }
    }
}
