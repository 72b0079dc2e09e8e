use std::path::PathBuf;

use serde_json::json;

use super::*;
use crate::gguf::Value as GValue;
use crate::gguf::writer::{GgufWriter, string_array};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn fixture_template(name: &str) -> String {
    std::fs::read_to_string(fixtures().join("templates").join(name)).unwrap()
}

fn date() -> chrono::NaiveDateTime {
    chrono::NaiveDate::from_ymd_opt(2025, 3, 7)
        .unwrap()
        .and_hms_opt(12, 0, 0)
        .unwrap()
}

fn load(name: &str, bos: &str, eos: &str) -> ChatTemplate {
    ChatTemplate::new(&fixture_template(name), bos, eos)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .with_now(date())
}

fn conversation(system: bool) -> Vec<ChatMessage> {
    let mut m = Vec::new();
    if system {
        m.push(ChatMessage::system("You are terse."));
    }
    m.push(ChatMessage::user("Hi"));
    m.push(ChatMessage::assistant("Hello!"));
    m.push(ChatMessage::user("What is 2+2?"));
    m
}

fn tools() -> serde_json::Value {
    json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name"}},
                "required": ["city"]
            }
        }
    }])
}

/// A conversation with one tool call and its result; `id` is the tool call id.
fn tool_conversation(id: &str) -> Vec<ChatMessage> {
    let call: ChatMessage = serde_json::from_value(json!({
        "role": "assistant",
        "content": "",
        "tool_calls": [{
            "id": id,
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}
        }]
    }))
    .unwrap();
    let result: ChatMessage = serde_json::from_value(json!({
        "role": "tool", "tool_call_id": id, "content": "18°C"
    }))
    .unwrap();
    vec![
        ChatMessage::system("You are terse."),
        ChatMessage::user("Weather in Paris?"),
        call,
        result,
    ]
}

fn render(t: &ChatTemplate, m: &[ChatMessage], gen_prompt: bool) -> String {
    t.render(m, None, gen_prompt).unwrap()
}

#[test]
fn qwen25_exact() {
    let t = load("Qwen-Qwen2.5-7B-Instruct.jinja", "", "<|im_end|>");
    let body = "<|im_start|>system\nYou are terse.<|im_end|>\n\
                <|im_start|>user\nHi<|im_end|>\n\
                <|im_start|>assistant\nHello!<|im_end|>\n\
                <|im_start|>user\nWhat is 2+2?<|im_end|>\n";
    assert_eq!(render(&t, &conversation(true), false), body);
    assert_eq!(
        render(&t, &conversation(true), true),
        format!("{body}<|im_start|>assistant\n")
    );
    // Without a system message Qwen supplies its own.
    assert!(render(&t, &conversation(false), true).starts_with(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
         assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    ));
}

#[test]
fn qwen25_tools_exact() {
    let t = load("Qwen-Qwen2.5-7B-Instruct.jinja", "", "<|im_end|>");
    let got = t
        .render(&tool_conversation("call_1"), Some(&tools()), true)
        .unwrap();
    // `tojson` is Python's json.dumps: ", " and ": " separators, keys in the given order,
    // non-ASCII kept.
    let want = "<|im_start|>system\nYou are terse.\n\n# Tools\n\nYou may call one or more \
        functions to assist with the user query.\n\nYou are provided with function signatures \
        within <tools></tools> XML tags:\n<tools>\n\
        {\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \
        \"Get the weather\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": \
        {\"type\": \"string\", \"description\": \"City name\"}}, \"required\": [\"city\"]}}}\n\
        </tools>\n\nFor each function call, return a json object with function name and \
        arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": \
        <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n\
        <|im_start|>user\nWeather in Paris?<|im_end|>\n\
        <|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \
        {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n\
        <|im_start|>user\n<tool_response>\n18°C\n</tool_response><|im_end|>\n\
        <|im_start|>assistant\n";
    assert_eq!(got, want);
}

#[test]
fn gemma2_exact() {
    let t = load("google-gemma-2-2b-it.jinja", "<bos>", "<eos>");
    let body = "<bos><start_of_turn>user\nHi<end_of_turn>\n\
                <start_of_turn>model\nHello!<end_of_turn>\n\
                <start_of_turn>user\nWhat is 2+2?<end_of_turn>\n";
    assert_eq!(render(&t, &conversation(false), false), body);
    assert_eq!(
        render(&t, &conversation(false), true),
        format!("{body}<start_of_turn>model\n")
    );
    // Gemma 2's template refuses system messages and non-alternating turns itself.
    match t.render(&conversation(true), None, true) {
        Err(TemplateError::Raised(m)) => assert_eq!(m, "System role not supported"),
        other => panic!("expected raise_exception, got {other:?}"),
    }
    let err = t
        .render(
            &[ChatMessage::user("a"), ChatMessage::user("b")],
            None,
            true,
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "chat template rejected the conversation: Conversation roles must alternate \
         user/assistant/user/assistant/..."
    );
}

#[test]
fn smollm3_exact() {
    let t = load("HuggingFaceTB-SmolLM3-3B.jinja", "", "<|im_end|>");
    let want = "<|im_start|>system\n## Metadata\n\nKnowledge Cutoff Date: June 2025\n\
                Reasoning Mode: /think\n\n## Custom Instructions\n\nYou are terse.\n\n\
                <|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
                <|im_start|>assistant\nHello!<|im_end|>\n\
                <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(render(&t, &conversation(true), true), want);
    // `/no_think` in the system prompt switches mode and is removed from it (str.replace,
    // str.rstrip through the Python-compatibility methods).
    let m = [
        ChatMessage::system("Be brief. /no_think"),
        ChatMessage::user("Hi"),
    ];
    let got = render(&t, &m, true);
    assert!(got.contains("Reasoning Mode: /no_think\n\n## Custom Instructions\n\nBe brief.\n\n"));
    assert!(got.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n"));
}

#[test]
fn mistral_small_exact() {
    let t = load("Mistral-Small-3.2-24B-Instruct-2506.jinja", "<s>", "</s>");
    let body = "<s>[SYSTEM_PROMPT]You are terse.[/SYSTEM_PROMPT][INST]Hi[/INST]Hello!</s>\
                [INST]What is 2+2?[/INST]";
    assert_eq!(render(&t, &conversation(true), false), body);
    assert_eq!(render(&t, &conversation(true), true), body);
    // Its default system prompt carries today's date (strftime_now).
    let got = render(&t, &conversation(false), true);
    assert!(got.contains("The current date is 2025-03-07."), "{got}");
    // Tools go before the last user message; tool call ids must be 9 characters.
    let got = t
        .render(&tool_conversation("abcDEF123"), Some(&tools()), true)
        .unwrap();
    assert!(got.starts_with(
        "<s>[SYSTEM_PROMPT]You are terse.[/SYSTEM_PROMPT][AVAILABLE_TOOLS][{\"type\": \
         \"function\", \"function\": {\"name\": \"get_weather\""
    ));
    assert!(got.ends_with(
        "[/AVAILABLE_TOOLS][INST]Weather in Paris?[/INST][TOOL_CALLS]get_weather\
         [CALL_ID]abcDEF123[ARGS]{\"city\": \"Paris\"}</s>\
         [TOOL_RESULTS]abcDEF123[TOOL_CONTENT]18°C[/TOOL_RESULTS]"
    ));
    assert!(matches!(
        t.render(&tool_conversation("short"), Some(&tools()), true),
        Err(TemplateError::Raised(m)) if m.contains("length 9")
    ));
}

#[test]
fn hermes3_tool_use() {
    let t = load(
        "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
        "<|begin_of_text|>",
        "<|eot_id|>",
    );
    let got = t
        .render(&tool_conversation("call_1"), Some(&tools()), true)
        .unwrap();
    assert!(
        got.starts_with(
            "<|begin_of_text|><|im_start|>system\nYou are a function calling AI model."
        )
    );
    assert!(got.contains(
        "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \
         \"get_weather(city: str) - Get the weather\n\n    Args:\n        city(str): City \
         name\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \
         \"string\", \"description\": \"City name\"}}, \"required\": [\"city\"]}} </tools>"
    ));
    assert!(got.contains(
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWeather in \
         Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \
         \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n<|im_start|>tool\n\
         <tool_response>\n18°C\n</tool_response><|im_end|><|im_start|>assistant\n"
    ));
    // A plain conversation needs the tool list too (the template iterates `tools`): with
    // none it still renders, listing no tools.
    let got = t
        .render(&conversation(true), Some(&json!([])), false)
        .unwrap();
    assert!(got.ends_with("<|im_start|>user\nWhat is 2+2?<|im_end|>\n"));
}

#[test]
fn granite33() {
    let t = load(
        "ibm-granite-granite-3.3-2B-Instruct.jinja",
        "<|end_of_text|>",
        "<|end_of_text|>",
    );
    let body = "<|start_of_role|>system<|end_of_role|>You are terse.<|end_of_text|>\n\
                <|start_of_role|>user<|end_of_role|>Hi<|end_of_text|>\n\
                <|start_of_role|>assistant<|end_of_role|>Hello!<|end_of_text|>\n\
                <|start_of_role|>user<|end_of_role|>What is 2+2?<|end_of_text|>\n";
    assert_eq!(render(&t, &conversation(true), false), body);
    assert_eq!(
        render(&t, &conversation(true), true),
        format!("{body}<|start_of_role|>assistant<|end_of_role|>")
    );
    let got = render(&t, &conversation(false), true);
    assert!(got.starts_with(
        "<|start_of_role|>system<|end_of_role|>Knowledge Cutoff Date: April 2024. Today's \
         Date: March 07, 2025. You are Granite, developed by IBM. You are a helpful AI \
         assistant.<|end_of_text|>\n"
    ));
    // Tools are listed with tojson(indent=4).
    let got = t.render(&conversation(true), Some(&tools()), true).unwrap();
    assert!(got.contains(
        "<|start_of_role|>available_tools<|end_of_role|>[\n    {\n        \"type\": \
         \"function\",\n        \"function\": {\n            \"name\": \"get_weather\",\n"
    ));
    assert!(got.contains("\"required\": [\n                    \"city\"\n                ]\n"));
}

#[test]
fn every_fixture_renders() {
    for entry in std::fs::read_dir(fixtures().join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let t = load(&name, "<s>", "</s>");
        let needs_tools = name.contains("tool_use");
        let no_system = name.contains("gemma-2");
        for gen_prompt in [false, true] {
            let conv = conversation(!no_system);
            let tools_arg = needs_tools.then(|| json!([]));
            let out = t
                .render(&conv, tools_arg.as_ref(), gen_prompt)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            for m in &conv {
                assert!(
                    out.contains(m.content.as_str().unwrap()),
                    "{name} lost {:?}:\n{out}",
                    m.content
                );
            }
            assert!(out.contains("What is 2+2?"), "{name}");
        }
        // Templates that know about tools render a tool-calling exchange.
        let src = fixture_template(&name);
        if src.contains("tools") && !no_system {
            let id = "abcDEF123";
            let out = t
                .render(&tool_conversation(id), Some(&tools()), true)
                .unwrap_or_else(|e| panic!("{name} with tools: {e}"));
            assert!(out.contains("get_weather"), "{name}: {out}");
        }
    }
}

#[test]
fn builtins_exact() {
    let conv = conversation(true);
    let chatml = ChatTemplate::builtin(Builtin::ChatMl, "", "<|im_end|>").unwrap();
    let body = "<|im_start|>system\nYou are terse.<|im_end|>\n\
                <|im_start|>user\nHi<|im_end|>\n\
                <|im_start|>assistant\nHello!<|im_end|>\n\
                <|im_start|>user\nWhat is 2+2?<|im_end|>\n";
    assert_eq!(render(&chatml, &conv, false), body);
    assert_eq!(
        render(&chatml, &conv, true),
        format!("{body}<|im_start|>assistant\n")
    );

    let llama2 = ChatTemplate::builtin(Builtin::Llama2, "<s>", "</s>").unwrap();
    let want = "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello! </s>\
                <s>[INST] What is 2+2? [/INST]";
    assert_eq!(render(&llama2, &conv, true), want);
    assert_eq!(render(&llama2, &conv, false), want);
    assert_eq!(
        render(&llama2, &conversation(false), true),
        "<s>[INST] Hi [/INST] Hello! </s><s>[INST] What is 2+2? [/INST]"
    );

    let llama3 = ChatTemplate::builtin(Builtin::Llama3, "<|begin_of_text|>", "<|eot_id|>").unwrap();
    let body = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are \
                terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
                <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
                <|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>";
    assert_eq!(render(&llama3, &conv, false), body);
    assert_eq!(
        render(&llama3, &conv, true),
        format!("{body}<|start_header_id|>assistant<|end_header_id|>\n\n")
    );

    let gemma = ChatTemplate::builtin(Builtin::Gemma, "<bos>", "<eos>").unwrap();
    let body = "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n\
                <start_of_turn>model\nHello!<end_of_turn>\n\
                <start_of_turn>user\nWhat is 2+2?<end_of_turn>\n";
    assert_eq!(render(&gemma, &conv, false), body);
    assert_eq!(
        render(&gemma, &conv, true),
        format!("{body}<start_of_turn>model\n")
    );

    let alpaca = ChatTemplate::builtin(Builtin::Alpaca, "<s>", "</s>").unwrap();
    let body = "<s>You are terse.\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n\
                ### Instruction:\nWhat is 2+2?\n\n";
    assert_eq!(render(&alpaca, &conv, false), body);
    assert_eq!(
        render(&alpaca, &conv, true),
        format!("{body}### Response:\n")
    );
    assert!(matches!(
        alpaca.render(&[ChatMessage::new("tool", "x")], None, true),
        Err(TemplateError::Raised(_))
    ));
}

#[test]
fn typed_content_parts() {
    let parts: ChatMessage = serde_json::from_value(json!({
        "role": "user",
        "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    }))
    .unwrap();
    // Qwen concatenates `message.content`: text parts are joined for it.
    let qwen = load("Qwen-Qwen2.5-7B-Instruct.jinja", "", "<|im_end|>");
    assert!(!qwen.typed_content);
    assert!(
        render(&qwen, std::slice::from_ref(&parts), true)
            .contains("<|im_start|>user\nHi\nthere<|im_end|>")
    );
    // Mistral reads the parts itself.
    let mistral = load("Mistral-Small-3.2-24B-Instruct-2506.jinja", "<s>", "</s>");
    assert!(mistral.typed_content);
    assert!(render(&mistral, &[parts], true).ends_with("[INST]Hithere[/INST]"));
}

#[test]
fn errors_are_clear() {
    let e = ChatTemplate::new("{% for m in messages %}{{ m.content }}", "", "").unwrap_err();
    assert!(matches!(e, TemplateError::Syntax { .. }), "{e:?}");
    assert!(
        e.to_string().starts_with("chat template syntax error"),
        "{e}"
    );
    let e = ChatTemplate::new("line one\n{{ 1 + }}", "", "").unwrap_err();
    assert!(e.to_string().contains("at line 2"), "{e}");

    let t = ChatTemplate::new("{{ raise_exception('no ' + messages[0].role) }}", "", "").unwrap();
    let e = t.render(&[ChatMessage::user("x")], None, true).unwrap_err();
    assert_eq!(
        e.to_string(),
        "chat template rejected the conversation: no user"
    );

    let t = ChatTemplate::new("{{ messages | nosuchfilter }}", "", "").unwrap();
    let e = t.render(&[ChatMessage::user("x")], None, true).unwrap_err();
    assert!(matches!(e, TemplateError::Render { .. }), "{e:?}");
    assert!(e.to_string().contains("nosuchfilter"), "{e}");
}

#[test]
fn tojson_matches_python() {
    let t = ChatTemplate::new(
        "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ y | tojson(sort_keys=true) }}|\
         {{ [] | tojson(indent=2) }}|{{ x | tojson(separators=[',', ':']) }}",
        "",
        "",
    )
    .unwrap();
    let tmpl = t.env.get_template(NAME).unwrap();
    let out = tmpl
        .render(minijinja::context! {
            x => Value::from_serialize(json!({"b": [1, 2.5, "é<&>'"], "a": {}, "c": null, "d": 1e20})),
            y => Value::from_serialize(json!({"b": true, "a": 0.1})),
        })
        .unwrap();
    assert_eq!(
        out,
        "{\"b\": [1, 2.5, \"é<&>'\"], \"a\": {}, \"c\": null, \"d\": 1e+20}|\
         {\n  \"b\": [\n    1,\n    2.5,\n    \"é<&>'\"\n  ],\n  \"a\": {},\n  \"c\": null,\n  \
         \"d\": 1e+20\n}|{\"a\": 0.1, \"b\": true}|[]|{\"b\":[1,2.5,\"é<&>'\"],\"a\":{},\
         \"c\":null,\"d\":1e+20}"
    );
    assert_eq!(py_float(1.0), "1.0");
    assert_eq!(py_float(1.5e-5), "1.5e-05");
    assert_eq!(py_float(123456.0), "123456.0");
}

#[test]
fn pycompat_methods() {
    let t = ChatTemplate::new(
        "{{ ' a b '.strip() }}|{{ 'a,b'.split(',') | join('+') }}|{{ 'abc'.startswith('ab') }}|\
         {% for k, v in {'x': 1}.items() %}{{ k }}={{ v }}{% endfor %}|{{ {'k': 2}.get('k') }}|\
         {% for i in range(5) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 3 %}{% break %}\
         {% endif %}{{ i }}{% endfor %}|{{ bos_token }}{{ eos_token }}",
        "<s>",
        "</s>",
    )
    .unwrap();
    assert_eq!(
        t.render(&[], None, false).unwrap(),
        "a b|a+b|True|x=1|2|02|<s></s>"
    );
}

#[test]
fn strip_bos() {
    let t = ChatTemplate::builtin(Builtin::Gemma, "<bos>", "<eos>").unwrap();
    let s = render(&t, &[ChatMessage::user("Hi")], true);
    assert_eq!(
        t.strip_bos(&s),
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    );
    let none = ChatTemplate::builtin(Builtin::ChatMl, "", "").unwrap();
    assert_eq!(none.strip_bos("abc"), "abc");
}

fn vocab_gguf(arch: &str, name: &str, tokens: &[&str], template: Option<&str>) -> GgufFile {
    let mut w = GgufWriter::new();
    w.set("general.architecture", GValue::String(arch.into()))
        .set("general.name", GValue::String(name.into()))
        .set("tokenizer.ggml.tokens", string_array(tokens))
        .set("tokenizer.ggml.bos_token_id", GValue::U32(0))
        .set("tokenizer.ggml.eos_token_id", GValue::U32(1));
    if let Some(t) = template {
        w.set("tokenizer.chat_template", GValue::String(t.into()));
    }
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    GgufFile::from_bytes(out).unwrap()
}

#[test]
fn for_model_picks_template() {
    let cases: &[(&str, &str, &[&str], Builtin)] = &[
        ("gemma3", "x", &["<bos>", "<eos>"], Builtin::Gemma),
        (
            "llama",
            "x",
            &["<s>", "</s>", "<|eot_id|>"],
            Builtin::Llama3,
        ),
        (
            "llama",
            "x",
            &["<s>", "</s>", "<|im_start|>"],
            Builtin::ChatMl,
        ),
        ("qwen2", "x", &["<s>", "</s>"], Builtin::ChatMl),
        ("llama", "x", &["<s>", "</s>"], Builtin::Llama2),
        ("mistral", "x", &["<s>", "</s>"], Builtin::Llama2),
        ("phi3", "x", &["<s>", "</s>"], Builtin::ChatMl),
    ];
    for (arch, name, tokens, want) in cases {
        let t = ChatTemplate::for_model(&vocab_gguf(arch, name, tokens, None)).unwrap();
        assert_eq!(
            t.source(),
            &TemplateSource::Builtin(*want),
            "{arch} {tokens:?}"
        );
        assert_eq!((t.bos_token(), t.eos_token()), (tokens[0], tokens[1]));
    }
    let own = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}";
    let t =
        ChatTemplate::for_model(&vocab_gguf("llama", "x", &["<s>", "</s>"], Some(own))).unwrap();
    assert_eq!(t.source(), &TemplateSource::Custom);
    assert_eq!(
        render(&t, &conversation(false), true),
        "[user]Hi[assistant]Hello![user]What is 2+2?</s>"
    );
    let bad = vocab_gguf("llama", "x", &["<s>", "</s>"], Some("{% if %}"));
    assert!(matches!(
        ChatTemplate::for_model(&bad),
        Err(TemplateError::Syntax { .. })
    ));
}

#[test]
fn for_model_fixture_models() {
    let dir = fixtures().join("models");
    let llama = GgufFile::open(dir.join("tiny-llama-mixed.gguf")).unwrap();
    let t = ChatTemplate::for_model(&llama).unwrap();
    assert_eq!((t.bos_token(), t.eos_token()), ("<s>", "</s>"));
    let qwen = GgufFile::open(dir.join("tiny-qwen2-gpt2vocab.gguf")).unwrap();
    let t = ChatTemplate::for_model(&qwen).unwrap();
    assert_eq!(t.source(), &TemplateSource::Builtin(Builtin::ChatMl));
}

#[test]
fn gemma3_270m_model() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/gemma-3-270m-q4_k_m.gguf");
    if !path.exists() {
        eprintln!(
            "skipping: {} is missing (scripts/fetch-model.sh)",
            path.display()
        );
        return;
    }
    let f = GgufFile::open(&path).unwrap();
    let t = ChatTemplate::for_model(&f).unwrap();
    // This GGUF carries no `tokenizer.chat_template`; the Gemma built-in stands in.
    assert!(f.get("tokenizer.chat_template").is_none());
    assert_eq!(t.source(), &TemplateSource::Builtin(Builtin::Gemma));
    assert_eq!((t.bos_token(), t.eos_token()), ("<bos>", "<eos>"));
    assert_eq!(
        render(&t, &conversation(true), true),
        "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n\
         <start_of_turn>model\nHello!<end_of_turn>\n\
         <start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
    );
}

#[test]
fn hostile_templates_hit_the_render_limits() {
    let msgs = vec![ChatMessage::user("hi")];
    // An endless amount of work: nested loops of the largest ranges minijinja allows.
    let spin = ChatTemplate::new(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
        "",
        "",
    )
    .unwrap();
    match spin.render(&msgs, None, true) {
        Err(TemplateError::Limit { what, limit }) => {
            assert_eq!(what, "instruction");
            assert_eq!(
                limit,
                RenderLimits::for_input("user".len() + "\"hi\"".len()).fuel
            );
        }
        other => panic!("{other:?}"),
    }
    // Endless text: each step writes 100 MB (minijinja's largest repeated string).
    let flood = ChatTemplate::new(
        "{% for a in range(100000) %}{{ 'x' * 100000000 }}{% endfor %}",
        "",
        "",
    )
    .unwrap();
    let e = flood.render(&msgs, None, true).unwrap_err();
    assert!(
        matches!(
            e,
            TemplateError::Limit {
                what: "output bytes",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("output bytes limit"), "{e}");
}

#[test]
fn hostile_conversations_render_within_limits_on_real_templates() {
    // Many messages, long contents, deep and wide tool schemas: the real templates must still
    // render (the limits scale with the input) and stay proportional to it.
    let mut msgs = Vec::new();
    for i in 0..2000 {
        msgs.push(ChatMessage::user(format!(
            "{i} {}",
            "{{ x }}{% raw %}".repeat(20)
        )));
        msgs.push(ChatMessage::assistant("ok ".repeat(50)));
    }
    let mut deep = json!("leaf");
    for _ in 0..100 {
        deep = json!({ "type": "object", "properties": { "p": deep } });
    }
    let tools = json!([{ "type": "function", "function": {
        "name": "f", "description": "d".repeat(10_000), "parameters": deep } }]);
    let input = serde_json::to_string(&msgs).unwrap().len() + tools.to_string().len();
    for name in [
        "Qwen-Qwen2.5-7B-Instruct.jinja",
        "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
        "HuggingFaceTB-SmolLM3-3B.jinja",
    ] {
        let t = load(name, "<s>", "</s>");
        let out = t
            .render(&msgs, Some(&tools), true)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            out.len() < 8 * input,
            "{name}: {} bytes from {input}",
            out.len()
        );
    }
    for b in [
        Builtin::ChatMl,
        Builtin::Gemma,
        Builtin::Llama2,
        Builtin::Llama3,
    ] {
        let t = ChatTemplate::builtin(b, "<s>", "</s>").unwrap();
        let out = t.render(&msgs, None, true).unwrap();
        assert!(out.len() < 2 * input, "{b:?}");
    }
}
