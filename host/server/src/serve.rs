//! `realm serve`: the HTTP service. Settings come from an optional TOML file (`--config`),
//! overridden by flags, which clap also reads from `REALM_*` environment variables; the admin
//! token is read from `REALM_ADMIN_TOKEN` (or the file) only, never from a flag, so that it does
//! not show up in process listings; so is the metrics token (`REALM_METRICS_TOKEN`). Relative
//! paths (flags or file) are resolved against the current directory at startup.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use realm_http::Config;
use realm_http::config::LogFormat;

#[derive(clap::Args)]
pub struct Args {
    /// TOML configuration file (see docs/http.md); flags override its settings.
    #[arg(long, short, env = "REALM_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "REALM_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory for the database and uploaded guests [default: ./realm-data]; a relative path
    /// is resolved against the current directory.
    #[arg(long, env = "REALM_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A GGUF model to load (repeatable); served under its file stem.
    #[arg(long = "model", short)]
    models: Vec<PathBuf>,
    /// Load every *.gguf in this directory.
    #[arg(long, env = "REALM_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Model for requests that name none [default: the first loaded].
    #[arg(long)]
    default_model: Option<String>,
    /// Engine CPU threads (0 = all cores).
    #[arg(long, env = "REALM_THREADS")]
    threads: Option<usize>,
    /// What runs the models: auto (CUDA when usable, else the CPU), cpu or cuda [default: auto].
    #[arg(long, env = "REALM_BACKEND", value_parser = ["auto", "cpu", "cuda"])]
    backend: Option<String>,
    /// Which GPU (CUDA device number) [default: 0].
    #[arg(long)]
    gpu: Option<usize>,
    /// Largest JSON request body, in bytes.
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Largest guest upload, in bytes.
    #[arg(long)]
    max_guest_bytes: Option<usize>,
    /// Time limit of one request, in seconds.
    #[arg(long)]
    request_timeout: Option<u64>,
    /// Log format.
    #[arg(long, env = "REALM_LOG_FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
}

/// The effective configuration: file, then flags and environment.
pub fn config(a: Args) -> Result<Config> {
    let mut c = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(v) = a.listen {
        c.listen = v;
    }
    if let Some(v) = a.data_dir {
        c.data_dir = v;
    }
    c.models.extend(a.models);
    if let Some(v) = a.models_dir {
        c.models_dir = Some(v);
    }
    if let Some(v) = a.default_model {
        c.default_model = Some(v);
    }
    if let Some(v) = a.threads {
        c.threads = v;
    }
    if let Some(v) = a.backend {
        c.backend = realm_engine::BackendChoice::from_name(&v).expect("clap checked the value");
    }
    if let Some(v) = a.gpu {
        c.gpu = v;
    }
    if let Some(v) = a.max_body_bytes {
        c.limits.max_body_bytes = v;
    }
    if let Some(v) = a.max_guest_bytes {
        c.limits.max_guest_bytes = v;
    }
    if let Some(v) = a.request_timeout {
        c.limits.request_timeout_secs = v;
    }
    if let Some(v) = a.log_format {
        c.log_format = if v == "json" {
            LogFormat::Json
        } else {
            LogFormat::Text
        };
    }
    if let Ok(t) = std::env::var("REALM_ADMIN_TOKEN")
        && !t.is_empty()
    {
        c.admin_token = Some(t);
    }
    if let Ok(t) = std::env::var("REALM_METRICS_TOKEN")
        && !t.is_empty()
    {
        c.metrics_token = Some(t);
    }
    c.make_paths_absolute()?;
    c.validate()?;
    Ok(c)
}

fn init_logs(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("REALM_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,tower_http=info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => b.json().with_current_span(true).init(),
        LogFormat::Text => b.init(),
    }
}

pub fn run(a: Args) -> Result<()> {
    let c = config(a)?;
    init_logs(c.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        if c.admin_token.is_none() {
            tracing::warn!("no admin token (REALM_ADMIN_TOKEN): the admin API is disabled");
        }
        if c.admin_token.is_none() && c.metrics_token.is_none() {
            tracing::warn!("no metrics or admin token (REALM_METRICS_TOKEN): /metrics is disabled");
        }
        let listen = c.listen;
        let state = realm_http::AppState::open(c).context("opening the data directory")?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        tracing::info!(addr = %listener.local_addr()?, "listening");
        realm_http::app::load_models_in_background(state.clone());
        realm_http::serve(state, listener, realm_http::shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}
