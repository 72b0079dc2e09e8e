//! `realm run` end to end on the real model: greedy output must be llama.cpp's, chat must keep
//! history and reuse the cached prefix. Skipped (with a note) when the model is not present.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn model() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/gemma-3-270m-q4_k_m.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipping: {} is missing (scripts/fetch-model.sh fetches it)",
            p.display()
        );
        None
    }
}

fn realm(args: &[&str], stdin: &str) -> (String, String, bool) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_realm"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        out.status.success(),
    )
}

/// (prompt tokens, generated tokens) from each summary line on stderr.
fn summaries(stderr: &str) -> Vec<(usize, usize)> {
    stderr
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("prompt ")?;
            let (p, rest) = rest.split_once(" tokens at ")?;
            let g = rest.split_once("generation ")?.1.split_once(' ')?.0;
            Some((p.parse().ok()?, g.parse().ok()?))
        })
        .collect()
}

#[test]
fn greedy_matches_llama_cpp() {
    let Some(m) = model() else { return };
    let m = m.to_str().unwrap();
    let prompt = "Q: What is the capital of France?\nA:";
    let (out, err, ok) = realm(
        &["run", m, "-p", prompt, "-n", "8", "--temp", "0", "-t", "2"],
        "",
    );
    assert!(ok, "{err}");
    // llama.cpp's greedy continuation: " The capital of France is Paris.\n" (8 tokens).
    assert_eq!(out, " The capital of France is Paris.\n");
    // Nothing but the summary on stderr when it is not a terminal (no spinner, no load line).
    let s = summaries(&err);
    assert_eq!(s, vec![(13, 8)], "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn seeded_sampling_reproduces() {
    let Some(m) = model() else { return };
    let m = m.to_str().unwrap();
    let args = [
        "run",
        m,
        "-p",
        "Once upon a time",
        "-n",
        "12",
        "--temp",
        "1.0",
        "--seed",
        "1234",
        "-t",
        "2",
    ];
    let (a, err, ok) = realm(&args, "");
    assert!(ok, "{err}");
    let (b, _, _) = realm(&args, "");
    assert_eq!(a, b);
    assert!(!a.is_empty());
    assert!(err.contains("(seed 1234)"), "{err}");
}

#[test]
fn chat_keeps_history_and_reuses_the_cache() {
    let Some(m) = model() else { return };
    let m = m.to_str().unwrap();
    let common = ["--temp", "0", "-n", "12", "-t", "2"];
    let mut args = vec![
        "run",
        m,
        "--chat",
        "--system",
        "Answer in one short sentence.",
    ];
    args.extend(common);
    let (out, err, ok) = realm(
        &args,
        "What is the capital of France?\n\nAnd of Italy?\n/exit\nnever read\n",
    );
    assert!(ok, "{err}");
    let s = summaries(&err);
    assert_eq!(s.len(), 2, "two replies expected:\n{err}\n{out}");
    // The second turn evaluates only what the cache lacks: not the whole conversation again
    // (which would be at least the first prompt plus the first reply).
    let (p1, g1) = s[0];
    let (p2, _) = s[1];
    assert!(
        p2 < p1 + g1,
        "second turn re-evaluated {p2} tokens (first: {p1} + {g1})"
    );

    // Each reply must be what a fresh run on the fully rendered conversation gives (Gemma's
    // template; the tokenizer adds BOS): the template, special-token parsing and the reuse of
    // the cached prefix change nothing.
    let fresh = |prompt: &str| {
        let mut a = vec!["run", m, "-p", prompt];
        a.extend(common);
        let (o, e, ok) = realm(&a, "");
        assert!(ok, "{e}");
        o
    };
    let turn1 = "<start_of_turn>user\nAnswer in one short sentence.\n\nWhat is the capital of \
                 France?<end_of_turn>\n<start_of_turn>model\n";
    let reply1 = fresh(turn1);
    let turn2 = format!(
        "{turn1}{}<end_of_turn>\n<start_of_turn>user\nAnd of Italy?<end_of_turn>\n\
         <start_of_turn>model\n",
        reply1.trim()
    );
    let reply2 = fresh(&turn2);
    assert_eq!(out, format!("{reply1}\n{reply2}\n"));

    // End of input ends the chat as /exit does.
    let (_, err, ok) = realm(
        &["run", m, "--chat", "--temp", "0", "-n", "4", "-t", "2"],
        "Hi\n",
    );
    assert!(ok, "{err}");
    assert_eq!(summaries(&err).len(), 1);
}

#[test]
fn bad_arguments_are_errors() {
    let Some(m) = model() else { return };
    let m = m.to_str().unwrap();
    let (_, err, ok) = realm(&["run", m], "");
    assert!(!ok);
    assert!(err.contains("-p"), "{err}");
    let (_, err, ok) = realm(&["run", m, "-p", "x", "--top-p", "2"], "");
    assert!(!ok);
    assert!(err.contains("top_p"), "{err}");
    let long = "word ".repeat(100);
    let (_, err, ok) = realm(&["run", m, "-p", &long, "--ctx", "32"], "");
    assert!(!ok);
    assert!(err.contains("raise --ctx"), "{err}");
}
