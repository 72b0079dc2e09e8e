//! `realm bench` on the tiny fixture model: the JSON report carries every figure, `--depth`
//! starts the tests from a filled cache, and impossible requests are refused with a clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-llama-mixed.gguf")
}

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_realm"))
        .arg("bench")
        .arg(model())
        .args(["--threads", "2", "--runs", "1"])
        .args(args)
        .output()
        .expect("run realm bench")
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = bench(args);
    assert!(
        out.status.success(),
        "realm bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn json_report_has_rates_and_memory() {
    let r = json(&["--prompt-tokens", "16", "--gen-tokens", "4", "--json"]);
    assert_eq!(r["prompt_tokens"], 16);
    assert_eq!(r["gen_tokens"], 4);
    assert_eq!(r["depth"], 0);
    assert!(r["prefill_tok_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["decode_tok_s"].as_f64().unwrap() > 0.0, "{r}");
    let file = r["file_bytes"].as_u64().unwrap();
    assert_eq!(file, std::fs::metadata(model()).unwrap().len());
    assert!(r["peak_rss_bytes"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn depth_starts_from_a_filled_cache() {
    let args = [
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--depth",
        "300",
    ];
    let r = json(&[&args[..], &["--json"]].concat());
    assert_eq!(r["depth"], 300);
    assert!(r["prefill_tok_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["decode_tok_s"].as_f64().unwrap() > 0.0, "{r}");
    // The table labels the tests the way llama-bench does.
    let text = String::from_utf8(bench(&args).stdout).unwrap();
    assert!(text.contains("pp8 @ d300"), "{text}");
    assert!(text.contains("tg4 @ d300"), "{text}");
}

#[test]
fn depth_beyond_the_context_is_refused() {
    // tiny-llama's context is 4096 positions.
    let out = bench(&[
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--depth",
        "5000",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs 5008 positions") && err.contains("4096"),
        "{err}"
    );
    let out = bench(&["--depth", "8", "--concurrency", "1,2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--concurrency"));
}
