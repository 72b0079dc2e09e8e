//! The attacker of the hostile-tenant load test (`scripts/test-attack.sh`,
//! `tests/e2e/attack_load.py`): each request names one attack on the host through its host
//! calls. Whatever the host answers (an error, a trap, a limit) is the guest's result; the test
//! only requires that the server survives and that other tenants do not notice.

use realm_guest::{Model, SamplingParams, Session, emit};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum Op {
    /// Sample with `penalty_last_n = u32::MAX` (the host once allocated for 4 billion entries
    /// and aborted).
    Penalty,
    /// Tokenize `mib` MiB of text; `whitespace` = spaces, tabs and newlines (the special-token
    /// partition's worst case), else ordinary prose.
    Tokenize { mib: usize, whitespace: bool },
    /// Handle misuse: a session used after it was dropped (`after-drop`), a model handle passed
    /// as a session (`model-as-session`), a handle never issued (`forged`).
    Misuse { how: String },
    /// Hold a session with `tokens` prompt tokens fed, then generate `steps` more (KV pages).
    Hog { tokens: usize, steps: u32 },
}

fn text(mib: usize, whitespace: bool) -> String {
    let unit: &str = if whitespace {
        " \t\n  \n\n\t\t   \r\n"
    } else {
        "The quick brown fox jumps over the lazy dog, and then it keeps on running. "
    };
    let n = mib << 20;
    let mut s = unit.repeat(n / unit.len() + 1);
    s.truncate(n);
    s
}

fn handle(op: Op) -> Result<Value, String> {
    let e = |e: realm_guest::Error| e.to_string();
    let model = Model::open("").map_err(e)?;
    match op {
        Op::Penalty => {
            let s = model.new_session().map_err(e)?;
            s.feed(&model.tokenize("Hello there", true, false).map_err(e)?)
                .map_err(e)?;
            let params = SamplingParams {
                repeat_penalty: 1.3,
                presence_penalty: 0.5,
                frequency_penalty: 0.5,
                penalty_last_n: u32::MAX,
                ..SamplingParams::greedy()
            };
            let t = s.sample(&params, None).map_err(e)?;
            Ok(json!({ "token": t }))
        }
        Op::Tokenize { mib, whitespace } => {
            let t = model
                .tokenize(&text(mib, whitespace), false, true)
                .map_err(e)?;
            Ok(json!({ "tokens": t.len() }))
        }
        Op::Misuse { how } => {
            let handle = match how.as_str() {
                "after-drop" => {
                    let s = model.new_session().map_err(e)?;
                    let h = s.handle();
                    drop(s);
                    h
                }
                "model-as-session" => model.handle(),
                _ => 0x7fff_0001,
            };
            // SAFETY (of the guest's own bookkeeping only): the handle is deliberately stale,
            // of the wrong type or forged; the host must refuse it without harm.
            let s = unsafe { Session::from_handle(handle) };
            let len = s.len();
            std::mem::forget(s);
            Ok(json!({ "len": len }))
        }
        Op::Hog { tokens, steps } => {
            let s = model.new_session().map_err(e)?;
            let prompt = model.tokenize(&text(1, false), false, false).map_err(e)?;
            let take = tokens.min(prompt.len());
            for chunk in prompt[..take].chunks(512) {
                s.feed(chunk).map_err(e)?;
            }
            for _ in 0..steps {
                let t = s.sample(&SamplingParams::greedy(), None).map_err(e)?;
                s.feed(&[t]).map_err(e)?;
            }
            emit(".");
            Ok(json!({ "len": s.len() }))
        }
    }
}

realm_guest::export!(handle);
