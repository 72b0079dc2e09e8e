//! Arbitrary conversations (messages and tools as JSON) through real chat templates (the test
//! fixtures and the built-ins), and arbitrary template sources over a fixed conversation: every
//! render must give text or a `TemplateError` (including the work and output limits), never a
//! panic or an allocation without bound.

#![no_main]

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use realm_engine::template::{Builtin, ChatMessage, ChatTemplate};

fn templates() -> &'static [ChatTemplate] {
    static T: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    T.get_or_init(|| {
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../tests/fixtures/templates");
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        names.sort();
        let fixed = chrono_free_now();
        let mut v: Vec<ChatTemplate> = names
            .iter()
            .map(|p| {
                let src = std::fs::read_to_string(p).expect("template reads");
                ChatTemplate::new(&src, "<s>", "</s>")
                    .expect("fixture template compiles")
                    .with_now(fixed)
            })
            .collect();
        for b in [
            Builtin::ChatMl,
            Builtin::Llama2,
            Builtin::Llama3,
            Builtin::Gemma,
            Builtin::Alpaca,
        ] {
            v.push(ChatTemplate::builtin(b, "<s>", "</s>").expect("built-in compiles"));
        }
        v
    })
}

/// A fixed time for `strftime_now`, so that runs are reproducible.
fn chrono_free_now() -> chrono::NaiveDateTime {
    chrono::NaiveDateTime::default()
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    if sel & 0x80 == 0 {
        // A conversation: `messages` JSON, then optionally a NUL and `tools` JSON.
        let (msgs, tools) = match text.split_once('\0') {
            Some((m, t)) => (m, Some(t)),
            None => (&*text, None),
        };
        let Ok(messages) = serde_json::from_str::<Vec<ChatMessage>>(msgs) else {
            return;
        };
        let tools = tools.and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok());
        let all = templates();
        let t = &all[sel as usize % all.len()];
        let r = t.render(&messages, tools.as_ref(), sel & 0x40 != 0);
        black_box(r.ok());
    } else {
        // A template source over a small fixed conversation.
        let Ok(t) = ChatTemplate::new(&text, "<s>", "</s>") else {
            return;
        };
        let messages = [
            ChatMessage::system("Be brief."),
            ChatMessage::user("Hi {{ 1 }} <s>"),
            ChatMessage::assistant("Hello."),
        ];
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
        black_box(t.render(&messages, Some(&tools), sel & 0x40 != 0).ok());
    }
});
