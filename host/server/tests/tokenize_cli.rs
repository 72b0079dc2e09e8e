//! `realm tokenize` against llama.cpp's tokenizer test vectors: the `--tests` output must equal
//! the `.out` file byte for byte.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer")
}

fn realm(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_realm"))
        .args(args)
        .output()
        .expect("run realm");
    assert!(
        out.status.success(),
        "realm {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn tests_mode_reproduces_llama_cpp_out_files() {
    for vocab in ["llama-spm", "gpt-2", "qwen2"] {
        let gguf = fixtures().join(format!("ggml-vocab-{vocab}.gguf"));
        let inp = fixtures().join(format!("ggml-vocab-{vocab}.gguf.inp"));
        let want = std::fs::read_to_string(fixtures().join(format!("ggml-vocab-{vocab}.gguf.out")))
            .unwrap();
        let got = realm(&[
            "tokenize",
            gguf.to_str().unwrap(),
            "--tests",
            inp.to_str().unwrap(),
        ]);
        assert_eq!(got, want, "{vocab}");
    }
}

#[test]
fn prompt_mode_prints_ids_and_pieces() {
    let gguf = fixtures().join("ggml-vocab-llama-spm.gguf");
    let g = gguf.to_str().unwrap();
    assert_eq!(
        realm(&["tokenize", g, "-p", "Hello world"]),
        "1 15043 3186\n"
    );
    assert_eq!(
        realm(&["tokenize", g, "-p", "Hello world", "--no-bos"]),
        "15043 3186\n"
    );
    let pieces = realm(&[
        "tokenize",
        g,
        "-p",
        "Hello</s>",
        "--parse-special",
        "--pieces",
    ]);
    let lines: Vec<&str> = pieces.lines().collect();
    assert_eq!(lines.len(), 3, "{pieces}");
    assert!(
        lines[1].contains("15043") && lines[1].contains("\" Hello\""),
        "{pieces}"
    );
    assert!(lines[2].contains("\"</s>\""), "{pieces}");
}
