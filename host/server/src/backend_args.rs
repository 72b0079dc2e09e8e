//! `--backend` and `--gpu`, shared by the commands that load a model.

use realm_engine::{BackendChoice, LoadOptions};

#[derive(clap::Args, Clone, Debug)]
pub struct BackendArgs {
    /// What runs the model: `cuda` (an NVIDIA GPU; needs a build with `--features cuda`), `cpu`,
    /// or `auto` (CUDA when a driver and a GPU are present, else the CPU; the choice and its
    /// reason are printed on stderr).
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    pub backend: String,
    /// Which GPU (CUDA device number) for `--backend cuda|auto`.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// CPU backend: make each sequence's logits bit-identical whatever else shares its batch.
    #[arg(long)]
    pub batch_invariant: bool,
}

impl BackendArgs {
    pub fn load_options(&self, threads: usize) -> LoadOptions {
        LoadOptions {
            threads,
            backend: BackendChoice::from_name(&self.backend).expect("clap checked the value"),
            gpu: self.gpu,
            batch_invariant: self.batch_invariant,
        }
    }
}
