//! `realm models` on the fixture models and on a directory of awkward files.

use std::path::{Path, PathBuf};
use std::process::Command;

use realm_engine::gguf::writer::{GgufWriter, TensorData, string_array};
use realm_engine::gguf::{GgufFile, Value};
use realm_engine::quant::GgmlType;
use serde_json::Value as J;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn realm(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> (String, String, bool) {
    let out = Command::new(env!("CARGO_BIN_EXE_realm"))
        .args(args)
        .env_remove("REALM_MODELS")
        .envs(env.iter().copied())
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        out.status.success(),
    )
}

fn json_entries(stdout: &str) -> Vec<J> {
    serde_json::from_str::<J>(stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn by_file<'a>(entries: &'a [J], file: &str) -> &'a J {
    entries
        .iter()
        .find(|e| e["path"].as_str().unwrap().ends_with(file))
        .unwrap_or_else(|| panic!("{file} not listed in {entries:#?}"))
}

#[test]
fn fixture_models() {
    let dir = repo().join("tests/fixtures/models");
    let (out, err, ok) = realm(&["models", "--json", dir.to_str().unwrap()], &[], &repo());
    assert!(ok, "{err}");
    let entries = json_entries(&out);
    let llama = by_file(&entries, "tiny-llama-mixed.gguf");
    let f = GgufFile::open(dir.join("tiny-llama-mixed.gguf")).unwrap();
    let params: u64 = f.tensors().iter().map(|t| t.n_elements()).sum();
    assert_eq!(llama["parameters"].as_u64(), Some(params));
    assert_eq!(llama["architecture"], "llama");
    assert_eq!(llama["vocab_only"], false);
    assert_eq!(llama["file_size"].as_u64(), Some(f.file_size()));
    assert_eq!(
        llama["context_length"].as_u64(),
        f.get("llama.context_length").and_then(|v| v.as_u64())
    );
    // Every tensor type of the mixed fixture is counted.
    let types: Vec<&str> = llama["tensor_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap())
        .collect();
    for t in ["Q4_0", "Q5_1", "Q2_K", "Q6_K", "BF16", "F32"] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
    let n: u64 = llama["tensor_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_u64().unwrap())
        .sum();
    assert_eq!(n as usize, f.tensors().len());
    assert_eq!(
        by_file(&entries, "tiny-qwen2-gpt2vocab.gguf")["architecture"],
        "qwen2"
    );

    // The table lists both with their type histogram.
    let (table, _, ok) = realm(&["models", dir.to_str().unwrap()], &[], &repo());
    assert!(ok);
    assert!(table.starts_with("PATH"), "{table}");
    assert!(table.contains("tiny-llama-mixed.gguf") && table.contains("qwen2"));
    assert!(table.contains("F32×"), "{table}");
}

fn tensor_file(path: &Path, split: Option<(u32, u32)>, n: usize) {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()))
        .set("general.name", Value::String("Split Test".into()))
        .set("llama.context_length", Value::U32(4096));
    if let Some((no, count)) = split {
        w.set("split.no", Value::U16(no as u16))
            .set("split.count", Value::U16(count as u16));
    }
    w.add_tensor(
        format!("t{n}"),
        GgmlType::F32,
        &[n],
        TensorData::Bytes(vec![0; 4 * n]),
    );
    w.write_file(path).unwrap();
}

#[test]
fn awkward_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let sub = root.join("nested/deeper");
    std::fs::create_dir_all(&sub).unwrap();

    // A tokenizer-only file.
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()))
        .set("tokenizer.ggml.model", Value::String("llama".into()))
        .set("tokenizer.ggml.tokens", string_array(&["<s>", "</s>", "a"]));
    w.write_file(sub.join("ggml-vocab-test.gguf")).unwrap();
    // Garbage and a truncated file.
    std::fs::write(root.join("bogus.gguf"), b"this is not a gguf file at all").unwrap();
    std::fs::write(root.join("empty.gguf"), b"").unwrap();
    // Not a .gguf: ignored.
    std::fs::write(root.join("notes.txt"), b"hello").unwrap();
    // A split model, 2 of 3 parts present; and a complete one of 2.
    tensor_file(&root.join("big-00001-of-00003.gguf"), Some((0, 3)), 8);
    tensor_file(&root.join("big-00002-of-00003.gguf"), Some((1, 3)), 16);
    tensor_file(&root.join("pair-00001-of-00002.gguf"), Some((0, 2)), 4);
    tensor_file(&root.join("pair-00002-of-00002.gguf"), Some((1, 2)), 4);

    // Found through $REALM_MODELS from a directory with no ./models.
    let cwd = tempfile::tempdir().unwrap();
    let (out, err, ok) = realm(
        &["models", "--json"],
        &[("REALM_MODELS", root.to_str().unwrap())],
        cwd.path(),
    );
    assert!(ok, "{err}");
    let entries = json_entries(&out);
    assert_eq!(entries.len(), 5, "{entries:#?}");

    let vocab = by_file(&entries, "ggml-vocab-test.gguf");
    assert_eq!(vocab["vocab_only"], true);
    assert_eq!(vocab["parameters"], 0);
    assert!(vocab.get("error").is_none());

    let bogus = by_file(&entries, "bogus.gguf");
    assert!(
        bogus["error"].as_str().unwrap().contains("not a GGUF file"),
        "{bogus}"
    );
    let empty = by_file(&entries, "empty.gguf");
    assert!(empty["error"].as_str().is_some(), "{empty}");

    let big = by_file(&entries, "big-00001-of-00003.gguf");
    assert_eq!(big["parameters"], 24);
    assert_eq!(big["split"]["count"], 3);
    assert_eq!(big["split"]["missing"], serde_json::json!([3]));
    assert_eq!(big["split"]["parts"].as_array().unwrap().len(), 2);
    assert!(
        big["error"]
            .as_str()
            .unwrap()
            .contains("part(s) 3 of 3 missing")
    );
    assert_eq!(big["name"], "Split Test");
    assert_eq!(big["context_length"], 4096);

    let pair = by_file(&entries, "pair-00001-of-00002.gguf");
    assert_eq!(pair["parameters"], 8);
    assert!(pair.get("error").is_none(), "{pair}");
    assert_eq!(pair["tensor_types"], serde_json::json!([["F32", 2]]));

    // The table shows errors inline rather than failing.
    let (table, _, ok) = realm(&["models", root.to_str().unwrap()], &[], cwd.path());
    assert!(ok);
    assert!(table.contains("vocab only"), "{table}");
    assert!(table.contains("error: not a GGUF file"), "{table}");
    assert!(table.contains("(+1 of 3 parts)"), "{table}");

    // A directory named on the command line that does not exist is reported.
    let (out, _, ok) = realm(&["models", "--json", "/nonexistent/realm"], &[], cwd.path());
    assert!(ok);
    let entries = json_entries(&out);
    assert_eq!(entries.len(), 1);
    assert!(entries[0]["error"].as_str().is_some());
}
