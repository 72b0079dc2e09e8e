//! Chat templates: Jinja sources published with models (GGUF `tokenizer.chat_template`), rendered
//! with minijinja the way Hugging Face `transformers` renders them (`trim_blocks`,
//! `lstrip_blocks`, Python string/dict methods, `raise_exception`, `tojson` as Python's
//! `json.dumps`, `strftime_now`, loop controls), plus built-in templates for models that ship
//! none.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use serde::{Deserialize, Serialize};

use crate::gguf::GgufFile;

const NAME: &str = "chat_template";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("chat template syntax error{}: {message}", at_line(*line))]
    Syntax {
        message: String,
        line: Option<usize>,
    },
    /// The template itself refused the conversation (`raise_exception`).
    #[error("chat template rejected the conversation: {0}")]
    Raised(String),
    #[error("chat template failed{}: {message}", at_line(*line))]
    Render {
        message: String,
        line: Option<usize>,
    },
    /// Rendering needed more work or produced more text than the conversation's size allows
    /// (see [`ChatTemplate::render`]).
    #[error("chat template rendering exceeded its {what} limit of {limit} for this conversation")]
    Limit { what: &'static str, limit: u64 },
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

/// One message of a conversation, as in OpenAI's and Hugging Face's APIs. `content` is a string
/// or a list of typed parts; anything else (`tool_calls`, `name`, `tool_call_id`, ...) is kept in
/// `extra` and reaches the template as a field of the message.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: serde_json::Value,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: serde_json::Value::String(content.into()),
            extra: serde_json::Map::new(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Templates for models whose GGUF carries none (formats as their model families define them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    /// `<|im_start|>role\n…<|im_end|>\n` (Qwen, many fine-tunes).
    ChatMl,
    /// `<s>[INST] <<SYS>>\n…\n<</SYS>>\n\n… [/INST] … </s>` (Llama 2 chat).
    Llama2,
    /// `<|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>` (Llama 3.x).
    Llama3,
    /// `<start_of_turn>user\n…<end_of_turn>\n`, assistant as `model`, the system prompt merged
    /// into the first user turn (Gemma 1-3).
    Gemma,
    /// `### Instruction:` / `### Response:` blocks.
    Alpaca,
}

impl Builtin {
    pub fn name(self) -> &'static str {
        match self {
            Builtin::ChatMl => "chatml",
            Builtin::Llama2 => "llama2",
            Builtin::Llama3 => "llama3",
            Builtin::Gemma => "gemma",
            Builtin::Alpaca => "alpaca",
        }
    }

    pub fn source(self) -> &'static str {
        match self {
            Builtin::ChatMl => include_str!("chatml.jinja"),
            Builtin::Llama2 => include_str!("llama2.jinja"),
            Builtin::Llama3 => include_str!("llama3.jinja"),
            Builtin::Gemma => include_str!("gemma.jinja"),
            Builtin::Alpaca => include_str!("alpaca.jinja"),
        }
    }
}

/// Where a template came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateSource {
    /// The model's own (`tokenizer.chat_template`) or one given by the caller.
    Custom,
    /// A built-in chosen by name or guessed from the model.
    Builtin(Builtin),
}

/// A compiled chat template with the model's BOS/EOS strings.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    source: TemplateSource,
    /// Whether the template reads list-of-parts content itself; if not, text parts are joined
    /// into one string before rendering (most templates concatenate `message.content`).
    typed_content: bool,
    now: Option<chrono::NaiveDateTime>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

/// Marks an error raised by the template's own `raise_exception`.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        Self::build(source, bos_token, eos_token, TemplateSource::Custom)
    }

    pub fn builtin(
        which: Builtin,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Self, TemplateError> {
        Self::build(
            which.source(),
            bos_token,
            eos_token,
            TemplateSource::Builtin(which),
        )
    }

    /// The model's own template if its GGUF has one, else a built-in guessed from the
    /// architecture, name and vocabulary. BOS/EOS strings come from the GGUF vocabulary.
    pub fn for_model(gguf: &GgufFile) -> Result<Self, TemplateError> {
        let tokens = gguf
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .unwrap_or(&[]);
        let token = |key: &str| -> String {
            gguf.get(key)
                .and_then(|v| v.as_u64())
                .and_then(|id| tokens.get(id as usize))
                .and_then(|t| t.as_str())
                .unwrap_or("")
                .to_string()
        };
        let (bos, eos) = (
            token("tokenizer.ggml.bos_token_id"),
            token("tokenizer.ggml.eos_token_id"),
        );
        if let Some(src) = gguf.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
            return Self::new(src, &bos, &eos);
        }
        let arch = gguf
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let name = gguf
            .get("general.name")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let has = |t: &str| tokens.iter().any(|v| v.as_str() == Some(t));
        Self::builtin(guess_builtin(arch, name, has), &bos, &eos)
    }

    fn build(
        source: &str,
        bos: &str,
        eos: &str,
        origin: TemplateSource,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        // As transformers' `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, _> {
            Err(
                minijinja::Error::new(ErrorKind::InvalidOperation, msg.clone())
                    .with_source(Raised(msg)),
            )
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| TemplateError::Syntax {
                message: detail(&e),
                line: e.line(),
            })?;
        let mut t = ChatTemplate {
            env,
            bos_token: bos.to_string(),
            eos_token: eos.to_string(),
            source: origin,
            typed_content: false,
            now: None,
        };
        t.install_now();
        t.typed_content = t.probe_typed_content();
        Ok(t)
    }

    fn install_now(&mut self) {
        let fixed = self.now;
        self.env.add_function(
            "strftime_now",
            move |fmt: String| -> Result<String, minijinja::Error> {
                let now = fixed.unwrap_or_else(|| chrono::Local::now().naive_local());
                let mut out = String::new();
                use std::fmt::Write;
                write!(out, "{}", now.format(&fmt)).map_err(|_| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("strftime_now: invalid format {fmt:?}"),
                    )
                })?;
                Ok(out)
            },
        );
    }

    /// Fixes the time `strftime_now` reports (reproducible prompts, tests).
    pub fn with_now(mut self, now: chrono::NaiveDateTime) -> Self {
        self.now = Some(now);
        self.install_now();
        self
    }

    fn probe_typed_content(&self) -> bool {
        const PROBE: &str = "\u{1}realm-typed-content-probe\u{1}";
        let msg = ChatMessage {
            role: "user".into(),
            content: serde_json::json!([{ "type": "text", "text": PROBE }]),
            extra: Default::default(),
        };
        self.render_raw(&[msg], None, true)
            .map(|s| s.contains(PROBE))
            .unwrap_or(false)
    }

    pub fn source(&self) -> &TemplateSource {
        &self.source
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Renders the conversation. The text may begin with the BOS token's text (most templates
    /// write `bos_token`); a caller whose tokenizer adds BOS itself should strip it first, as
    /// llama.cpp does (see [`ChatTemplate::strip_bos`]).
    ///
    /// Messages and tools come from clients, so the work and the text are bounded by the size of
    /// what was given ([`RenderLimits::for_input`]): a render that runs past either fails with
    /// [`TemplateError::Limit`].
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        if self.typed_content {
            return self.render_raw(messages, tools, add_generation_prompt);
        }
        let flat: Vec<ChatMessage> = messages.iter().map(flatten_text_parts).collect();
        self.render_raw(&flat, tools, add_generation_prompt)
    }

    /// `text` without a leading BOS token string, if it has one.
    pub fn strip_bos<'a>(&self, text: &'a str) -> &'a str {
        if self.bos_token.is_empty() {
            return text;
        }
        text.strip_prefix(self.bos_token.as_str()).unwrap_or(text)
    }

    fn render_raw(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let size = messages
            .iter()
            .map(|m| {
                m.role.len()
                    + json_size(&m.content)
                    + m.extra
                        .iter()
                        .map(|(k, v)| k.len() + json_size(v))
                        .sum::<usize>()
            })
            .sum::<usize>()
            + tools.map_or(0, json_size)
            + self.bos_token.len()
            + self.eos_token.len();
        let limits = RenderLimits::for_input(size);
        // Fuel is a setting of the environment; a clone (shared compiled templates, a few maps
        // of functions) carries this render's.
        let mut env = self.env.clone();
        env.set_fuel(Some(limits.fuel));
        let tmpl = env.get_template(NAME).map_err(render_error)?;
        // transformers passes `tools=None` and `documents=None` when there are none, so both
        // are always defined.
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools.map(Value::from_serialize).unwrap_or(Value::from(())),
            documents => Value::from(()),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        let mut out = CappedWriter {
            buf: Vec::new(),
            cap: limits.output_bytes,
            over: false,
        };
        match tmpl.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.buf).map_err(|_| TemplateError::Render {
                message: "the template produced invalid UTF-8".into(),
                line: None,
            }),
            Err(_) if out.over => Err(TemplateError::Limit {
                what: "output bytes",
                limit: limits.output_bytes as u64,
            }),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(TemplateError::Limit {
                what: "instruction",
                limit: limits.fuel,
            }),
            Err(e) => Err(render_error(e)),
        }
    }
}

/// What one render may spend, from the size of the conversation it renders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RenderLimits {
    /// minijinja instructions (its `fuel`).
    pub fuel: u64,
    /// Bytes of rendered text.
    pub output_bytes: usize,
}

impl RenderLimits {
    /// Room for every real template: a fixed allowance for the template's own text and logic
    /// plus a multiple of the input (templates loop over messages and tools, and `tojson` with
    /// indentation roughly doubles them). `input_bytes` is the size of the messages, tools and
    /// special-token strings, as text.
    pub fn for_input(input_bytes: usize) -> RenderLimits {
        RenderLimits {
            fuel: 2_000_000 + 64 * input_bytes as u64,
            output_bytes: (1 << 20) + 8 * input_bytes,
        }
    }
}

/// The rendered text, refusing to grow past `cap` bytes.
struct CappedWriter {
    buf: Vec<u8>,
    cap: usize,
    over: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.cap {
            self.over = true;
            return Err(std::io::Error::other("rendered text too long"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Size of a JSON value as text, roughly (strings and keys by length, everything else a few
/// bytes), without recursion.
fn json_size(v: &serde_json::Value) -> usize {
    use serde_json::Value as J;
    let mut total = 0;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        total += match v {
            J::String(s) => s.len() + 2,
            J::Array(items) => {
                stack.extend(items);
                2 + items.len()
            }
            J::Object(map) => {
                stack.extend(map.values());
                2 + map.keys().map(|k| k.len() + 4).sum::<usize>()
            }
            _ => 8,
        };
    }
    total
}

fn guess_builtin(arch: &str, name: &str, has_token: impl Fn(&str) -> bool) -> Builtin {
    let name = name.to_ascii_lowercase();
    if arch.starts_with("gemma") || name.contains("gemma") || has_token("<start_of_turn>") {
        Builtin::Gemma
    } else if has_token("<|eot_id|>") || has_token("<|start_header_id|>") {
        Builtin::Llama3
    } else if arch.starts_with("qwen") || has_token("<|im_start|>") {
        Builtin::ChatMl
    } else if arch == "llama" || arch == "mistral" {
        Builtin::Llama2
    } else {
        Builtin::ChatMl
    }
}

/// Content made only of text parts becomes one string (parts joined with newlines); anything
/// else (images, ...) is left for the template to handle or reject.
fn flatten_text_parts(m: &ChatMessage) -> ChatMessage {
    let mut m = m.clone();
    if let serde_json::Value::Array(parts) = &m.content {
        let texts: Option<Vec<&str>> = parts
            .iter()
            .map(|p| {
                (p.get("type").and_then(|t| t.as_str()) == Some("text"))
                    .then(|| p.get("text").and_then(|t| t.as_str()))
                    .flatten()
            })
            .collect();
        if let Some(texts) = texts {
            m.content = serde_json::Value::String(texts.join("\n"));
        }
    }
    m
}

fn detail(e: &minijinja::Error) -> String {
    e.detail()
        .map(str::to_string)
        .unwrap_or_else(|| e.kind().to_string())
}

fn render_error(e: minijinja::Error) -> TemplateError {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<Raised>() {
            return TemplateError::Raised(r.0.clone());
        }
        src = s.source();
    }
    if e.kind() == ErrorKind::SyntaxError {
        return TemplateError::Syntax {
            message: detail(&e),
            line: e.line(),
        };
    }
    TemplateError::Render {
        message: detail(&e),
        line: e.line(),
    }
}

/// `tojson` as transformers defines it: Python's `json.dumps(x, ensure_ascii=False, indent=...,
/// separators=..., sort_keys=...)`: `", "` and `": "` separators (`","` between items when
/// indenting), non-ASCII kept, no HTML escaping. minijinja's own filter is compact and escapes
/// `<>&'`, which would change the prompt a model was trained on.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (_, Some(s)) => Some(s.to_string()),
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        },
    };
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ));
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = serde_json::to_value(&value).map_err(|e| {
        minijinja::Error::new(ErrorKind::BadSerialization, "tojson: cannot serialize")
            .with_source(e)
    })?;
    let fmt = PyJson {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    fmt.write(&json, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn write(&self, v: &serde_json::Value, level: usize, out: &mut String) {
        use serde_json::Value as J;
        match v {
            J::Array(items) if !items.is_empty() => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out);
                }
                self.newline(level, out);
                out.push(']');
            }
            J::Object(map) if !map.is_empty() => {
                let mut entries: Vec<(&String, &J)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    out.push_str(&serde_json::to_string(k).expect("string serializes"));
                    out.push_str(&self.key_sep);
                    self.write(item, level + 1, out);
                }
                self.newline(level, out);
                out.push('}');
            }
            J::Number(n) if n.is_f64() => out.push_str(&py_float(n.as_f64().unwrap_or(0.0))),
            other => out.push_str(&serde_json::to_string(other).expect("JSON serializes")),
        }
    }
}

/// Python's `repr(float)`: shortest round-trip digits, always with a `.0` or an exponent.
fn py_float(x: f64) -> String {
    if !x.is_finite() {
        return if x.is_nan() {
            "NaN".into()
        } else if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let abs = x.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Python: 1e+16, 1.5e-05.
        let s = format!("{x:e}");
        let (m, e) = s.split_once('e').expect("exponent form");
        let e: i32 = e.parse().expect("exponent");
        return format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    let s = format!("{x}");
    if s.contains('.') { s } else { format!("{s}.0") }
}

#[cfg(test)]
mod tests;

// The compiled environment is shared between threads by the server.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ChatTemplate>();
};
