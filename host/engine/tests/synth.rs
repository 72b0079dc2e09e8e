//! Synthetic models are real models: they load, run, and are written with the tensor types their
//! quantization mix promises, deterministically per seed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use realm_engine::gguf::GgufFile;
use realm_engine::quant::GgmlType;
use realm_engine::synth::{self, QuantMix, SynthSpec};
use realm_engine::tokenizer::{TokenType, Tokenizer};
use realm_engine::{LoadOptions, Model, Session};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "realm-synth-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spec(preset: &str, quant: QuantMix, seed: u64) -> SynthSpec {
    let mut s = SynthSpec::preset(preset).unwrap();
    s.quant = quant;
    s.seed = seed;
    s
}

fn write(spec: &SynthSpec, path: &Path) -> synth::Summary {
    synth::write(spec, path, &mut |_, _, _| {}).unwrap()
}

/// Whether llama.cpp's Q4_K_M gives layer `i` of 8 more bits (first and last eighth, every third).
fn more_bits_of_8(i: usize) -> bool {
    [0, 3, 6, 7].contains(&i)
}

/// The type each tensor must have, stated independently of the implementation for the tiny
/// presets: tiny-llama and tiny-gemma3 have 256-wide rows, tiny-qwen2 192-wide ones (which no
/// K-quant fits, so Q4_K becomes Q5_0 and Q6_K becomes Q8_0), and every ffn_down row is 512 wide.
fn expected_type(preset: &str, quant: QuantMix, name: &str, shape: &[usize]) -> GgmlType {
    use GgmlType::*;
    if shape.len() == 1 {
        return F32;
    }
    let narrow = !shape[0].is_multiple_of(256);
    let k = |ty: GgmlType| match (ty, narrow) {
        (Q4K, true) => Q5_0,
        (Q6K, true) => Q8_0,
        (ty, _) => ty,
    };
    let layer: Option<usize> = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .map(|i| i.parse().unwrap());
    let tied = preset != "tiny-llama";
    match quant {
        QuantMix::F32 => F32,
        QuantMix::F16 => F16,
        QuantMix::Q8_0 => Q8_0,
        QuantMix::Q4_0 => Q4_0,
        QuantMix::Q6K => k(Q6K),
        QuantMix::Q4KM => {
            let more = layer.is_some_and(more_bits_of_8)
                && (name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight"));
            let output = name == "output.weight" || (tied && name == "token_embd.weight");
            k(if more || output { Q6K } else { Q4K })
        }
    }
}

/// Writes, checks the types and metadata, loads, and runs a few tokens.
fn check_model(preset: &str, quant: QuantMix) {
    let dir = TempDir::new();
    let path = dir.path("m.gguf");
    let spec = spec(preset, quant, 3);
    let summary = write(&spec, &path);
    let what = format!("{preset} {}", quant.name());

    let f = GgufFile::open(&path).unwrap();
    assert_eq!(summary.bytes, f.file_size(), "{what}");
    assert_eq!(summary.tensors, f.tensors().len(), "{what}");
    let plan = spec.tensors();
    assert_eq!(plan.len(), f.tensors().len(), "{what}");
    for (t, p) in f.tensors().iter().zip(&plan) {
        assert_eq!(
            (&t.name, &t.shape, t.ty),
            (&p.name, &p.shape, p.ty),
            "{what}"
        );
        let want = expected_type(preset, quant, &t.name, &t.shape);
        assert_eq!(t.ty, want, "{what}: {} {:?}", t.name, t.shape);
    }
    assert_eq!(f.architecture().unwrap(), spec.arch.name());
    assert_eq!(
        f.get_u64("general.file_type").unwrap(),
        quant.file_type() as u64
    );
    assert_eq!(f.tensor("output.weight").is_none(), spec.tied_embeddings);

    let vocab = Tokenizer::from_gguf(&f).unwrap();
    assert_eq!(vocab.n_vocab(), spec.n_vocab);
    assert_eq!(
        (vocab.bos(), vocab.eos(), vocab.add_bos()),
        (Some(1), Some(2), true)
    );
    assert_eq!(vocab.token_type(3 + 0x41), Some(TokenType::Byte));
    assert_eq!(vocab.decode(&[1, 3 + 0x68, 3 + 0x69, 2]), "hi");
    // The filler vocabulary has no letters, so text (after the "▁" space prefix) falls back to
    // byte tokens.
    assert_eq!(
        vocab.encode("hi", true, false),
        [1, 3 + 0xE2, 3 + 0x96, 3 + 0x81, 3 + 0x68, 3 + 0x69]
    );
    drop(f);

    let model = Model::load(
        &path,
        &LoadOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(model.hparams.n_vocab, spec.n_vocab);
    assert_eq!(model.hparams.n_layer, spec.n_layer);
    assert_eq!(model.hparams.head_dim, spec.head_dim);
    let mut s = Session::new(&model, 64).unwrap();
    // Longer than tiny-gemma3's sliding window of 8, so local attention actually slides.
    let prompt: Vec<u32> = (0..12).map(|i| [1, 7, 300, 511, 42][i % 5]).collect();
    let logits = s.feed(&prompt).unwrap();
    let next = realm_engine::session::argmax(&logits);
    let logits2 = s.feed(&[next]).unwrap();
    for l in [&logits, &logits2] {
        assert_eq!(l.len(), spec.n_vocab, "{what}");
        assert!(l.iter().all(|x| x.is_finite()), "{what}: non-finite logits");
        let (lo, hi) = l
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(hi - lo > 1e-3, "{what}: flat logits {lo}..{hi}");
    }
}

#[test]
fn tiny_llama_models_load_and_run() {
    for q in [QuantMix::F32, QuantMix::Q8_0, QuantMix::Q4KM] {
        check_model("tiny-llama", q);
    }
}

#[test]
fn tiny_qwen2_models_load_and_run() {
    for q in [QuantMix::F16, QuantMix::Q4_0, QuantMix::Q4KM] {
        check_model("tiny-qwen2", q);
    }
}

#[test]
fn tiny_gemma3_models_load_and_run() {
    for q in [QuantMix::Q6K, QuantMix::Q4KM] {
        check_model("tiny-gemma3", q);
    }
}

#[test]
fn seeds_decide_the_bytes() {
    let dir = TempDir::new();
    let (a, b, c) = (dir.path("a.gguf"), dir.path("b.gguf"), dir.path("c.gguf"));
    write(&spec("tiny-llama", QuantMix::Q8_0, 1), &a);
    write(&spec("tiny-llama", QuantMix::Q8_0, 1), &b);
    write(&spec("tiny-llama", QuantMix::Q8_0, 2), &c);
    let (a, b, c) = (
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        std::fs::read(&c).unwrap(),
    );
    assert_eq!(a, b, "same seed, different bytes");
    assert_eq!(a.len(), c.len());
    let (fa, fc) = (
        GgufFile::from_bytes(a).unwrap(),
        GgufFile::from_bytes(c).unwrap(),
    );
    for t in fa.tensors() {
        let (x, y) = (fa.tensor(&t.name).unwrap(), fc.tensor(&t.name).unwrap());
        assert_ne!(
            x.data(),
            y.data(),
            "{} is the same under seeds 1 and 2",
            t.name
        );
    }
    // Metadata is not random.
    assert_eq!(fa.metadata(), fc.metadata());
}

#[test]
fn tensors_keep_their_values_when_layers_are_added() {
    let dir = TempDir::new();
    let (a, b) = (dir.path("a.gguf"), dir.path("b.gguf"));
    let mut s = spec("tiny-llama", QuantMix::F16, 5);
    write(&s, &a);
    s.n_layer = 2;
    write(&s, &b);
    let (fa, fb) = (GgufFile::open(&a).unwrap(), GgufFile::open(&b).unwrap());
    for name in ["token_embd.weight", "blk.1.ffn_up.weight", "output.weight"] {
        assert_eq!(
            fa.tensor(name).unwrap().data(),
            fb.tensor(name).unwrap().data(),
            "{name}"
        );
    }
}

#[test]
fn progress_is_reported_and_the_write_is_atomic() {
    let dir = TempDir::new();
    let path = dir.path("p.gguf");
    let spec = spec("tiny-gemma3", QuantMix::Q4_0, 0);
    let mut calls = Vec::new();
    let summary = synth::write(&spec, &path, &mut |done, total, bytes| {
        calls.push((done, total, bytes))
    })
    .unwrap();
    let n = spec.tensors().len();
    assert_eq!(calls.len(), n + 1);
    assert!(
        calls
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].2 <= w[1].2)
    );
    assert_eq!(calls.last(), Some(&(n, n, summary.bytes)));
    assert_eq!(spec.file_size().unwrap(), summary.bytes);
    let left: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["p.gguf"], "temporary files left behind");
}

#[test]
fn bad_names_and_shapes_are_explained() {
    let e = SynthSpec::preset("llama-4").unwrap_err().to_string();
    assert!(e.contains("llama-3.1-8b") && e.contains("gemma3-1b"), "{e}");
    let e = synth::Arch::from_name("gpt2").unwrap_err().to_string();
    assert!(e.contains("llama, qwen2, gemma3"), "{e}");
    let e = QuantMix::from_name("q3_k").unwrap_err().to_string();
    assert!(e.contains("q4_k_m"), "{e}");

    let mut s = SynthSpec::preset("tiny-llama").unwrap();
    s.n_head_kv = 3;
    assert!(s.validate().is_err());
    let dir = TempDir::new();
    let path = dir.path("never.gguf");
    assert!(synth::write(&s, &path, &mut |_, _, _| {}).is_err());
    assert!(!path.exists());
    let mut s = SynthSpec::preset("tiny-gemma3").unwrap();
    s.sliding_window = None;
    assert!(s.validate().is_err());
}

#[test]
fn big_presets_have_the_real_shapes() {
    let s = SynthSpec::preset("llama-3.1-8b").unwrap();
    // 8.03 B parameters, as published.
    assert_eq!(s.n_params(), 8_030_261_248);
    let s = SynthSpec::preset("qwen2.5-0.5b").unwrap();
    assert_eq!(s.n_params(), 494_032_768);
    let s = SynthSpec::preset("gemma3-270m").unwrap();
    assert_eq!(s.n_params(), 268_098_176);
}
