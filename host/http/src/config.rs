//! `realm serve` configuration: a TOML file, overridden by command-line flags and environment
//! variables (the binary applies those), then validated here.
//!
//! ```toml
//! listen = "0.0.0.0:8080"
//! data_dir = "/var/lib/realm"
//! models = ["/models/gemma-3-270m-q4_k_m.gguf"]
//! models_dir = "/models"           # every *.gguf inside is loaded too
//! # admin_token = "..."            # prefer the REALM_ADMIN_TOKEN environment variable
//! # metrics_token = "..."          # for /metrics; prefer REALM_METRICS_TOKEN
//!
//! [limits]
//! max_body_bytes = 4194304
//! max_guest_bytes = 33554432
//! request_timeout_secs = 600
//!
//! [tenant_defaults]                # quotas of newly created tenants
//! requests_per_minute = 600
//! burst = 60
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::Quotas;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Directory for the database and uploaded guests (created if missing).
    pub data_dir: PathBuf,
    /// GGUF models to load at startup; each is served under its file stem.
    pub models: Vec<PathBuf>,
    /// Directory whose `*.gguf` files are loaded at startup; also where relative paths given to
    /// `POST /admin/models` are resolved.
    pub models_dir: Option<PathBuf>,
    /// Bearer token for `/admin/*`. Without one the admin API answers 403 to everyone.
    pub admin_token: Option<String>,
    /// Bearer token for `/metrics` (a scraper's credential, which need not open the admin API).
    /// The admin token is accepted there too; with neither set, `/metrics` answers 403.
    pub metrics_token: Option<String>,
    /// Model used when a request names none (default: the first loaded).
    pub default_model: Option<String>,
    /// CPU threads for the engine (0 = all cores).
    pub threads: usize,
    /// What runs the models: `auto` (CUDA when the build has it and a GPU is usable, else the
    /// CPU; the choice and why are logged per model), `cpu` or `cuda`.
    pub backend: realm_engine::BackendChoice,
    /// Which GPU (CUDA device number) when the backend is a GPU.
    pub gpu: usize,
    /// CPU backend: every sequence's logits bit-identical whatever else shares its batch (a seed
    /// reproduces a completion whatever other tenants do); see docs/architecture.md.
    pub batch_invariant: bool,
    /// `text` (human) or `json` (one object per line) logs.
    pub log_format: LogFormat,
    pub limits: Limits,
    pub engine: EngineSettings,
    /// Quotas given to tenants created without explicit ones.
    pub tenant_defaults: Quotas,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest JSON request body (413 above).
    pub max_body_bytes: usize,
    /// Largest guest upload (413 above).
    pub max_guest_bytes: usize,
    /// Wall-clock limit of one non-streaming request, and of the time a streaming request may
    /// take before its first byte (504 above).
    pub request_timeout_secs: u64,
    /// On shutdown, how long in-flight requests and streams may run before they are cut off.
    pub shutdown_grace_secs: u64,
    /// Largest `n` (completions per request).
    pub max_n: u32,
    /// Largest `max_tokens` a request may ask for when its tenant's quota sets none.
    pub max_tokens: u32,
    /// Guest instances alive at once across all tenants (every request runs in one; a tenant
    /// may hold at most 16). Beyond it requests are answered 429. Each slot reserves address
    /// space (not memory) for a guest's linear memory.
    pub max_guest_instances: u32,
}

/// Settings of each model's engine loop.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSettings {
    /// KV cache capacity per model, in token positions, shared by all sequences.
    pub kv_tokens: usize,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            kv_tokens: realm_engine::sched::EngineConfig::default().kv_tokens,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 << 20,
            max_guest_bytes: 32 << 20,
            request_timeout_secs: 600,
            shutdown_grace_secs: 30,
            max_n: 8,
            max_tokens: 4096,
            max_guest_instances: 256,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().expect("valid literal"),
            data_dir: PathBuf::from("realm-data"),
            models: Vec::new(),
            models_dir: None,
            admin_token: None,
            metrics_token: None,
            default_model: None,
            threads: 0,
            backend: realm_engine::BackendChoice::Auto,
            gpu: 0,
            batch_invariant: BATCH_INVARIANT_DEFAULT,
            log_format: LogFormat::Text,
            limits: Limits::default(),
            engine: EngineSettings::default(),
            tenant_defaults: Quotas::default(),
        }
    }
}

/// Whether `batch_invariant` is on when the config does not say.
pub const BATCH_INVARIANT_DEFAULT: bool = false;

impl Config {
    /// How models are loaded: threads, backend and GPU.
    pub fn load_options(&self) -> realm_engine::model::LoadOptions {
        realm_engine::model::LoadOptions {
            threads: self.threads,
            backend: self.backend,
            gpu: self.gpu,
            batch_invariant: self.batch_invariant,
        }
    }

    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.max_body_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "limits.max_body_bytes must be at least 1024".into(),
            ));
        }
        if l.max_guest_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "limits.max_guest_bytes must be at least 1024".into(),
            ));
        }
        if l.request_timeout_secs == 0
            || l.max_n == 0
            || l.max_tokens == 0
            || l.max_guest_instances == 0
        {
            return Err(ConfigError::Invalid(
                "limits.request_timeout_secs, max_n, max_tokens and max_guest_instances must be \
                 positive"
                    .into(),
            ));
        }
        for (what, token) in [
            ("admin", &self.admin_token),
            ("metrics", &self.metrics_token),
        ] {
            if let Some(t) = token
                && t.len() < 16
            {
                return Err(ConfigError::Invalid(format!(
                    "the {what} token must be at least 16 characters"
                )));
            }
        }
        self.tenant_defaults
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("tenant_defaults: {e}")))?;
        Ok(())
    }

    /// Makes `data_dir`, `models` and `models_dir` absolute, resolving relative ones against the
    /// current directory (as the process sees them now), so that nothing later depends on the
    /// working directory; the guest runtime's compilation cache, for one, accepts only an
    /// absolute path.
    pub fn make_paths_absolute(&mut self) -> Result<(), ConfigError> {
        let abs = |p: &Path| {
            std::path::absolute(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        self.data_dir = abs(&self.data_dir)?;
        for m in &mut self.models {
            *m = abs(m)?;
        }
        if let Some(d) = &self.models_dir {
            self.models_dir = Some(abs(d)?);
        }
        Ok(())
    }

    /// Every model file to load at startup: `models` then the `*.gguf` files of `models_dir`
    /// in name order, without duplicates.
    pub fn model_paths(&self) -> Result<Vec<PathBuf>, ConfigError> {
        let mut out: Vec<PathBuf> = self.models.clone();
        if let Some(dir) = &self.models_dir {
            let rd = std::fs::read_dir(dir).map_err(|source| ConfigError::Read {
                path: dir.clone(),
                source,
            })?;
            let mut found: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
                .collect();
            found.sort();
            for p in found {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }
}

/// The name a model file is served under: its file stem.
pub fn model_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_deploy_config_is_valid() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/realm.toml"
        ));
        let c = Config::load(path).unwrap();
        c.validate().unwrap();
        assert_eq!(c.data_dir, Path::new("/var/lib/realm"));
        assert_eq!(c.models_dir.as_deref(), Some(Path::new("/models")));
        assert_eq!(c.listen.port(), 8080);
    }

    #[test]
    fn parses_full_file_and_rejects_unknown_keys() {
        let c = Config::from_toml(
            r#"
            listen = "0.0.0.0:9000"
            data_dir = "/var/lib/realm"
            models = ["/m/a.gguf"]
            admin_token = "0123456789abcdef"
            log_format = "json"
            [limits]
            max_body_bytes = 2048
            [tenant_defaults]
            requests_per_minute = 10
            max_kv_pages = 100
            "#,
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.limits.max_body_bytes, 2048);
        assert_eq!(c.limits.max_n, Limits::default().max_n);
        assert_eq!(c.tenant_defaults.requests_per_minute, 10);
        assert_eq!(c.tenant_defaults.max_kv_pages, Some(100));
        assert_eq!(c.log_format, LogFormat::Json);
        c.validate().unwrap();

        let e = Config::from_toml("listn = \"x\"", Path::new("bad.toml")).unwrap_err();
        assert!(e.to_string().contains("bad.toml"), "{e}");
        let c = Config {
            admin_token: Some("short".into()),
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn relative_paths_become_absolute() {
        let mut c = Config {
            models: vec!["models/m.gguf".into(), "/abs/n.gguf".into()],
            models_dir: Some("models".into()),
            ..Config::default()
        };
        assert!(c.data_dir.is_relative());
        c.make_paths_absolute().unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(c.data_dir, cwd.join("realm-data"));
        assert_eq!(c.models[0], cwd.join("models/m.gguf"));
        assert_eq!(c.models[1], Path::new("/abs/n.gguf"));
        assert_eq!(c.models_dir.as_deref(), Some(cwd.join("models").as_path()));
        // Serving a model under its file stem is unchanged by the resolution.
        assert_eq!(model_name(&c.models[0]), "m");
    }

    #[test]
    fn short_metrics_token_is_rejected() {
        let c = Config {
            metrics_token: Some("short".into()),
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("metrics token"), "{e}");
    }

    #[test]
    fn models_dir_is_scanned() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("b.gguf"), b"").unwrap();
        std::fs::write(d.path().join("a.gguf"), b"").unwrap();
        std::fs::write(d.path().join("notes.txt"), b"").unwrap();
        let c = Config {
            models: vec![d.path().join("b.gguf")],
            models_dir: Some(d.path().to_path_buf()),
            ..Config::default()
        };
        let names: Vec<String> = c
            .model_paths()
            .unwrap()
            .iter()
            .map(|p| model_name(p))
            .collect();
        assert_eq!(names, ["b", "a"]);
    }
}
