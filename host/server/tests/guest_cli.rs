//! `realm guest run` end to end on the tiny fixture model: a built-in guest streams its text and
//! prints its response; a guest that hits a sandbox limit or traps exits non-zero with a message
//! naming what stopped it.

use std::path::PathBuf;
use std::process::Command;

fn model() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/tiny-llama-mixed.gguf")
        .to_string_lossy()
        .into_owned()
}

/// (stdout, stderr, success) of `realm guest run GUEST --model tiny --input INPUT EXTRA...`.
fn guest_run(guest: &str, input: &str, extra: &[&str]) -> (String, String, bool) {
    let m = model();
    let mut args = vec![
        "guest",
        "run",
        guest,
        "--model",
        &m,
        "--threads",
        "1",
        "--kv-tokens",
        "512",
        "--input",
        input,
    ];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_realm"))
        .args(&args)
        .output()
        .unwrap();
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        out.status.success(),
    )
}

/// The testbed guest (hostile behaviours on request) as a file, as a user's upload would be.
fn testbed_file() -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".wasm").tempfile().unwrap();
    std::io::Write::write_all(&mut f, realm_runtime::builtin::TESTBED_WASM).unwrap();
    f
}

#[test]
fn chat_guest_streams_then_prints_its_response() {
    let input =
        r#"{"messages":[{"role":"user","content":"Hello"}],"max_tokens":4,"temperature":0}"#;
    let (out, err, ok) = guest_run("chat", input, &[]);
    assert!(ok, "stderr: {err}");
    // The streamed text, a newline, then the response on its own (last) line.
    let (streamed, last) = out.trim_end_matches('\n').rsplit_once('\n').unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], streamed, "{out}");

    // --no-stream prints the response alone, and greedy decoding repeats itself.
    let (out2, err, ok) = guest_run("chat", input, &["--no-stream"]);
    assert!(ok, "stderr: {err}");
    let v2: serde_json::Value = serde_json::from_str(out2.trim()).unwrap();
    assert_eq!(v2["choices"], v["choices"]);
}

#[test]
fn limits_and_traps_exit_nonzero_naming_the_cause() {
    let tb = testbed_file();
    let tb = tb.path().to_str().unwrap();
    for (input, extra, expect) in [
        (
            r#"{"op":"loop"}"#,
            &["--cpu-ms", "200"][..],
            "CPU time limit",
        ),
        (
            r#"{"op":"alloc","mb":1}"#,
            &["--memory-mb", "8"][..],
            "memory limit",
        ),
        (
            r#"{"op":"sessions","count":100}"#,
            &["--max-sessions", "3"][..],
            "sessions limit",
        ),
        (
            r#"{"op":"trap-mid-generation","prompt":"Hello","tokens":2}"#,
            &[][..],
            "guest trapped",
        ),
        (r#"{"op":"no-such-op"}"#, &[][..], "guest error"),
    ] {
        let (_, err, ok) = guest_run(tb, input, extra);
        assert!(!ok, "{input} should fail");
        assert!(
            err.contains(expect),
            "{input}: expected {expect:?} in: {err}"
        );
    }
}

#[test]
fn bad_guests_and_inputs_are_clear_errors() {
    let (_, err, ok) = guest_run("/no/such/guest.wasm", "{}", &[]);
    assert!(!ok);
    assert!(err.contains("reading guest /no/such/guest.wasm"), "{err}");
    let mut f = tempfile::Builder::new().suffix(".wasm").tempfile().unwrap();
    std::io::Write::write_all(&mut f, b"not wasm at all").unwrap();
    let (_, err, ok) = guest_run(f.path().to_str().unwrap(), "{}", &[]);
    assert!(!ok);
    assert!(err.to_lowercase().contains("component"), "{err}");
    let (_, err, ok) = guest_run("chat", "@/no/such/input.json", &[]);
    assert!(!ok);
    assert!(err.contains("reading /no/such/input.json"), "{err}");
}
