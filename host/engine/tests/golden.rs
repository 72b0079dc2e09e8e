//! Golden tests against llama.cpp: for every prompt of a reference file, the top-20 logits after
//! the prompt must agree within a tolerance and the greedy continuation must be identical up to the
//! first near-tie (a step whose best-vs-second gap in the reference is at most `NEAR_TIE`).
//!
//! Tolerances. The references were made by llama.cpp on another machine. The same llama.cpp
//! version built here (AVX2) differs from them by up to 0.19 (tiny-llama), 0.41 (tiny-qwen2) and
//! 1.19 (Gemma 3 270M) on the top-20 logits: 8-bit activation quantization turns one-ulp
//! differences in summation order into flipped roundings, and 18 layers of Gemma's very large
//! activations amplify them. Realm follows llama.cpp's rounding points (x86 activation
//! quantizer, f16 KV cache, f16 query and probabilities, f16 GELU table) and lands at the same
//! distance from the references (0.18, 0.36, 0.90; see docs/benchmarks.md). So each file's
//! logit tolerance is that cross-build floor with a little headroom, and greedy continuations
//! are compared up to the first near-tie: a step whose reference best-vs-second gap is below
//! `NEAR_TIE` (divergences seen so far were at reference gaps of at most 0.27, the qwen2
//! "Emoji" prompt, where llama.cpp built here has a gap of 0.12 and Realm 0.007).

use std::path::{Path, PathBuf};

use realm_engine::session::argmax;
use realm_engine::{LoadOptions, Model, Session};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    prompt: String,
    prompt_tokens: Vec<u32>,
    top_logits: Vec<(u32, f32)>,
    greedy: Vec<u32>,
    greedy_gaps: Vec<f32>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn references(name: &str) -> Vec<Reference> {
    let path = repo_root().join("tests/fixtures/refs").join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

struct Outcome {
    max_logit_diff: f32,
    greedy_checked: usize,
}

/// Reference gaps at or below this are near-ties, past which greedy paths may legitimately part.
const NEAR_TIE: f32 = 0.3;

fn check(model_path: &Path, refs_name: &str, tol: f32) -> Outcome {
    let model = Model::load(model_path, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("loading {}: {e}", model_path.display()));
    let mut max_diff = 0f32;
    let mut greedy_checked = 0;
    for r in references(refs_name) {
        let mut s = Session::new(&model, r.prompt_tokens.len() + r.greedy.len() + 1).unwrap();
        let logits = s.feed(&r.prompt_tokens).unwrap();
        assert_eq!(logits.len(), model.hparams.n_vocab);
        for &(tok, want) in &r.top_logits {
            let got = logits[tok as usize];
            let d = (got - want).abs();
            max_diff = max_diff.max(d);
            assert!(
                d <= tol,
                "{refs_name}: prompt {:?}: logit of token {tok} is {got}, llama.cpp has {want} \
                 (|diff| {d} > {tol})",
                r.prompt
            );
        }
        // Greedy continuation, compared up to the first near-tie.
        let mut logits = logits;
        for (step, (&want, &gap)) in r.greedy.iter().zip(&r.greedy_gaps).enumerate() {
            if gap <= NEAR_TIE {
                break;
            }
            let got = argmax(&logits);
            assert_eq!(
                got, want,
                "{refs_name}: prompt {:?}: greedy step {step} chose {got}, llama.cpp chose {want}",
                r.prompt
            );
            greedy_checked += 1;
            logits = s.feed(&[got]).unwrap();
        }
    }
    println!(
        "{refs_name}: max |logit diff| over top-20 = {max_diff:.5} (tolerance {tol}); \
         {greedy_checked} greedy steps matched"
    );
    Outcome {
        max_logit_diff: max_diff,
        greedy_checked,
    }
}

fn fixture_model(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/models").join(name)
}

#[test]
fn tiny_llama_mixed_quants_match_llama_cpp() {
    let o = check(
        &fixture_model("tiny-llama-mixed.gguf"),
        "tiny-llama-mixed.jsonl",
        0.25,
    );
    assert!(o.greedy_checked >= 10, "too few greedy steps compared");
    assert!(o.max_logit_diff > 0.0);
}

#[test]
fn tiny_qwen2_matches_llama_cpp() {
    let o = check(
        &fixture_model("tiny-qwen2-gpt2vocab.gguf"),
        "tiny-qwen2-gpt2vocab.jsonl",
        0.5,
    );
    assert!(o.greedy_checked >= 25, "too few greedy steps compared");
}

/// The real Gemma 3 270M, fetched by `scripts/fetch-model.sh` (CI runs it first).
#[test]
fn gemma3_270m_matches_llama_cpp() {
    let path = repo_root().join("models/gemma-3-270m-q4_k_m.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model.sh",
        path.display()
    );
    let o = check(&path, "gemma-3-270m-q4_k_m.jsonl", 1.25);
    assert!(o.greedy_checked >= 40, "too few greedy steps compared");
}
