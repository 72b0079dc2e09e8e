//! JSON-constrained decoding: a byte-level JSON recognizer and the token mask it implies.
//!
//! [`JsonConstraint`] tracks a JSON document as it is generated and, before each step, works out
//! which tokens of the vocabulary keep the text a valid JSON prefix; the host then samples only
//! among those ([`Session::sample`] with a [`TokenMask`]). End-of-generation tokens are allowed
//! only once the document is complete, so the output always parses.
//!
//! [`generate_json`] runs the whole loop.

use crate::{Error, Model, SamplingParams, Session, TextDecoder, TokenMask, emit};

/// Where the recognizer is inside the document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Expecting a value.
    Value,
    /// After `[`: a value or `]`.
    ArrFirst,
    /// After `{`: a key or `}`.
    ObjFirst,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value: `,`, a closing bracket, or (at the top level) the end.
    After,
    /// Inside a string; `esc` = 0 normal, 1 after a backslash, 2..=5 hex digits of `\u` left + 1.
    Str {
        key: bool,
        esc: u8,
    },
    Num(Num),
    /// Inside `true` / `false` / `null`: which word and how many bytes matched.
    Lit {
        word: u8,
        pos: u8,
    },
    /// The top-level value is complete.
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigit,
}

const WORDS: [&[u8]; 3] = [b"true", b"false", b"null"];
/// Longest run of whitespace allowed between tokens: enough for pretty-printing, not enough
/// for a model to stall on blank lines forever.
const MAX_WS_RUN: u8 = 12;

/// The recognizer's state. The container stack is kept outside so that trial runs over many
/// tokens can share it without copying (see [`Trial`]).
#[derive(Clone, Debug)]
struct Cursor {
    mode: Mode,
    ws_run: u8,
}

/// A run of bytes over a base stack: pops reach into `base`, pushes go to `extra`.
struct Trial<'a> {
    base: &'a [u8],
    depth: usize,
    extra: &'a mut Vec<u8>,
    object_only: bool,
}

impl Trial<'_> {
    fn top(&self) -> Option<u8> {
        self.extra
            .last()
            .copied()
            .or_else(|| self.depth.checked_sub(1).map(|i| self.base[i]))
    }

    fn pop(&mut self) {
        if self.extra.pop().is_none() {
            self.depth -= 1;
        }
    }

    fn empty(&self) -> bool {
        self.extra.is_empty() && self.depth == 0
    }

    fn end_value(&mut self, c: &mut Cursor) {
        c.mode = if self.empty() {
            Mode::Done
        } else {
            Mode::After
        };
    }

    /// Feed one byte; false if it cannot continue a valid document.
    fn step(&mut self, c: &mut Cursor, b: u8) -> bool {
        let ws = matches!(b, b' ' | b'\n' | b'\t' | b'\r');
        if ws
            && matches!(
                c.mode,
                Mode::Value
                    | Mode::ArrFirst
                    | Mode::ObjFirst
                    | Mode::Key
                    | Mode::Colon
                    | Mode::After
            )
        {
            if c.ws_run >= MAX_WS_RUN {
                return false;
            }
            c.ws_run += 1;
            return true;
        }
        c.ws_run = 0;
        match c.mode {
            Mode::Value | Mode::ArrFirst => {
                if c.mode == Mode::ArrFirst && b == b']' {
                    self.pop();
                    self.end_value(c);
                    return true;
                }
                let top_level = self.empty();
                if top_level && self.object_only && b != b'{' {
                    return false;
                }
                match b {
                    b'{' => {
                        self.extra.push(b'{');
                        c.mode = Mode::ObjFirst;
                    }
                    b'[' => {
                        self.extra.push(b'[');
                        c.mode = Mode::ArrFirst;
                    }
                    b'"' => c.mode = Mode::Str { key: false, esc: 0 },
                    b'-' => c.mode = Mode::Num(Num::Minus),
                    b'0' => c.mode = Mode::Num(Num::Zero),
                    b'1'..=b'9' => c.mode = Mode::Num(Num::Int),
                    b't' => c.mode = Mode::Lit { word: 0, pos: 1 },
                    b'f' => c.mode = Mode::Lit { word: 1, pos: 1 },
                    b'n' => c.mode = Mode::Lit { word: 2, pos: 1 },
                    _ => return false,
                }
                true
            }
            Mode::ObjFirst | Mode::Key => {
                if b == b'"' {
                    c.mode = Mode::Str { key: true, esc: 0 };
                    true
                } else if b == b'}' && c.mode == Mode::ObjFirst {
                    self.pop();
                    self.end_value(c);
                    true
                } else {
                    false
                }
            }
            Mode::Colon => {
                if b == b':' {
                    c.mode = Mode::Value;
                    true
                } else {
                    false
                }
            }
            Mode::After => match (b, self.top()) {
                (b',', Some(b'{')) => {
                    c.mode = Mode::Key;
                    true
                }
                (b',', Some(b'[')) => {
                    c.mode = Mode::Value;
                    true
                }
                (b'}', Some(b'{')) | (b']', Some(b'[')) => {
                    self.pop();
                    self.end_value(c);
                    true
                }
                _ => false,
            },
            Mode::Str { key, esc } => {
                match esc {
                    0 => match b {
                        b'"' => {
                            if key {
                                c.mode = Mode::Colon;
                            } else {
                                self.end_value(c);
                            }
                        }
                        b'\\' => c.mode = Mode::Str { key, esc: 1 },
                        0..=0x1f => return false,
                        _ => {}
                    },
                    1 => match b {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                            c.mode = Mode::Str { key, esc: 0 }
                        }
                        b'u' => c.mode = Mode::Str { key, esc: 5 },
                        _ => return false,
                    },
                    n => {
                        if !b.is_ascii_hexdigit() {
                            return false;
                        }
                        c.mode = Mode::Str {
                            key,
                            esc: if n == 2 { 0 } else { n - 1 },
                        };
                    }
                }
                true
            }
            Mode::Num(n) => {
                let next = match (n, b) {
                    (Num::Minus, b'0') => Some(Num::Zero),
                    (Num::Minus, b'1'..=b'9') => Some(Num::Int),
                    (Num::Int, b'0'..=b'9') => Some(Num::Int),
                    (Num::Zero | Num::Int, b'.') => Some(Num::Dot),
                    (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
                    (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Some(Num::Exp),
                    (Num::Exp, b'+' | b'-') => Some(Num::ExpSign),
                    (Num::Exp | Num::ExpSign | Num::ExpDigit, b'0'..=b'9') => Some(Num::ExpDigit),
                    _ => None,
                };
                match next {
                    Some(n) => {
                        c.mode = Mode::Num(n);
                        true
                    }
                    // The number ends here if it can; the byte then belongs to what follows.
                    None if matches!(n, Num::Zero | Num::Int | Num::Frac | Num::ExpDigit) => {
                        self.end_value(c);
                        if c.mode == Mode::Done {
                            return false;
                        }
                        self.step(c, b)
                    }
                    None => false,
                }
            }
            Mode::Lit { word, pos } => {
                let w = WORDS[word as usize];
                if w[pos as usize] != b {
                    return false;
                }
                if pos as usize + 1 == w.len() {
                    self.end_value(c);
                } else {
                    c.mode = Mode::Lit { word, pos: pos + 1 };
                }
                true
            }
            Mode::Done => false,
        }
    }
}

/// Tracks a JSON document being generated and says which tokens may come next.
#[derive(Clone, Debug)]
pub struct JsonConstraint {
    stack: Vec<u8>,
    cursor: Cursor,
    object_only: bool,
    scratch: Vec<u8>,
}

impl JsonConstraint {
    /// Any JSON value.
    pub fn new() -> Self {
        JsonConstraint {
            stack: Vec::new(),
            cursor: Cursor {
                mode: Mode::Value,
                ws_run: 0,
            },
            object_only: false,
            scratch: Vec::new(),
        }
    }

    /// A JSON object at the top level (OpenAI's `response_format: {"type": "json_object"}`).
    pub fn object() -> Self {
        JsonConstraint {
            object_only: true,
            ..Self::new()
        }
    }

    /// Whether `bytes` may follow the text so far.
    pub fn accepts(&mut self, bytes: &[u8]) -> bool {
        let mut cursor = self.cursor.clone();
        self.scratch.clear();
        let mut t = Trial {
            base: &self.stack,
            depth: self.stack.len(),
            extra: &mut self.scratch,
            object_only: self.object_only,
        };
        !bytes.is_empty() && bytes.iter().all(|&b| t.step(&mut cursor, b))
    }

    /// Append text that [`accepts`](Self::accepts) allowed. Returns false (and changes nothing)
    /// if it is not a valid continuation.
    pub fn advance(&mut self, bytes: &[u8]) -> bool {
        if !self.accepts(bytes) {
            return false;
        }
        let mut extra = Vec::new();
        let mut t = Trial {
            base: &self.stack,
            depth: self.stack.len(),
            extra: &mut extra,
            object_only: self.object_only,
        };
        for &b in bytes {
            t.step(&mut self.cursor, b);
        }
        let depth = t.depth;
        self.stack.truncate(depth);
        self.stack.extend_from_slice(&extra);
        true
    }

    /// Whether the text so far is a complete document (a top-level number may still grow,
    /// but is complete).
    pub fn is_complete(&self) -> bool {
        match self.cursor.mode {
            Mode::Done => true,
            Mode::Num(n) => {
                self.stack.is_empty()
                    && matches!(n, Num::Zero | Num::Int | Num::Frac | Num::ExpDigit)
            }
            _ => false,
        }
    }

    /// Whether nothing more can be added.
    pub fn is_closed(&self) -> bool {
        self.cursor.mode == Mode::Done
    }

    /// The tokens that may come next, given every token's bytes (`Model::vocab`) and the
    /// end-of-generation tokens (allowed only when the document is complete).
    pub fn mask(&mut self, vocab: &VocabIndex, eog: &[u32]) -> TokenMask {
        let mut bits = vec![0u64; vocab.tokens.len().div_ceil(64)];
        let mut set = |id: u32| bits[id as usize / 64] |= 1 << (id % 64);
        for first in 0..=255u8 {
            let bucket = &vocab.by_first_byte[first as usize];
            if bucket.is_empty() || !self.accepts(&[first]) {
                continue;
            }
            for &id in bucket {
                if self.accepts(&vocab.tokens[id as usize]) {
                    set(id);
                }
            }
        }
        if self.is_complete() {
            for &id in eog {
                if (id as usize) < vocab.tokens.len() {
                    set(id);
                }
            }
        }
        TokenMask::Bits(bits)
    }
}

impl Default for JsonConstraint {
    fn default() -> Self {
        Self::new()
    }
}

/// Every token's bytes, grouped by first byte so that a mask skips whole groups at once.
pub struct VocabIndex {
    tokens: Vec<Vec<u8>>,
    by_first_byte: Vec<Vec<u32>>,
}

impl VocabIndex {
    /// `tokens[id]` = the bytes of token `id` (from `Model::vocab`). Tokens with no bytes
    /// (control tokens) are never allowed by a mask.
    pub fn new(tokens: Vec<Vec<u8>>, special: &[u32]) -> Self {
        let mut by_first_byte = vec![Vec::new(); 256];
        for (id, t) in tokens.iter().enumerate() {
            if let Some(&b) = t.first()
                && !special.contains(&(id as u32))
            {
                by_first_byte[b as usize].push(id as u32);
            }
        }
        VocabIndex {
            tokens,
            by_first_byte,
        }
    }

    pub fn bytes(&self, id: u32) -> &[u8] {
        self.tokens.get(id as usize).map_or(&[], |t| t)
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// What [`generate_json`] produced.
pub struct JsonOutput {
    pub text: String,
    pub tokens: Vec<u32>,
    /// False if `max_tokens` ran out first (the text is then an incomplete document).
    pub complete: bool,
}

/// Generate one JSON document (an object if `object_only`) from the session's current
/// position, sampling each token on the host under the constraint's mask. Streams the text
/// with [`emit`] if `stream`.
pub fn generate_json(
    model: &Model,
    session: &Session,
    params: &SamplingParams,
    max_tokens: u32,
    object_only: bool,
    stream: bool,
) -> Result<JsonOutput, Error> {
    let special = model.info().special_tokens;
    let mut eog = special.eog.clone();
    eog.extend(special.eos);
    let vocab = VocabIndex::new(model.vocab(), &eog);
    let mut constraint = if object_only {
        JsonConstraint::object()
    } else {
        JsonConstraint::new()
    };
    let mut decoder = TextDecoder::new();
    let mut out = JsonOutput {
        text: String::new(),
        tokens: Vec::new(),
        complete: false,
    };
    while (out.tokens.len() as u32) < max_tokens {
        let mask = constraint.mask(&vocab, &eog);
        let tok = session.sample(params, Some(&mask))?;
        if eog.contains(&tok) {
            out.complete = true;
            break;
        }
        let bytes = vocab.bytes(tok);
        if !constraint.advance(bytes) {
            return Err(Error::Engine(format!(
                "the host sampled token {tok}, which the mask did not allow"
            )));
        }
        out.tokens.push(tok);
        let piece = decoder.push(bytes);
        if stream {
            emit(&piece);
        }
        out.text.push_str(&piece);
        session.feed(&[tok])?;
        if constraint.is_closed() {
            out.complete = true;
            break;
        }
    }
    let rest = decoder.finish();
    if stream {
        emit(&rest);
    }
    out.text.push_str(&rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts_all(doc: &str, object_only: bool) -> bool {
        let mut c = if object_only {
            JsonConstraint::object()
        } else {
            JsonConstraint::new()
        };
        doc.bytes().all(|b| c.advance(&[b])) && c.is_complete()
    }

    #[test]
    fn accepts_valid_documents() {
        for doc in [
            r#"{"a": [1, -2.5e+3, true, false, null, "x\"\u00e9y"], "b": {}}"#,
            "[]",
            "0",
            "-0.5",
            r#""str""#,
            "{\n  \"k\": [\n    {}\n  ]\n}",
        ] {
            assert!(accepts_all(doc, false), "{doc}");
        }
        assert!(accepts_all(r#"{"a":1}"#, true));
    }

    #[test]
    fn rejects_invalid_documents() {
        for doc in [
            "{",
            r#"{"a" 1}"#,
            "[1,]",
            "01",
            "tru",
            r#"{"a":1,}"#,
            "[1 2]",
            "\"a\nb\"",
            "{}}",
            "1.",
            "-",
        ] {
            assert!(!accepts_all(doc, false), "{doc}");
        }
        assert!(!accepts_all("[1]", true));
        assert!(!accepts_all("\"s\"", true));
    }

    #[test]
    fn multi_byte_tokens_and_stack_sharing() {
        let mut c = JsonConstraint::new();
        assert!(c.advance(b"{\"a\": [["));
        assert!(c.accepts(b"]]}"));
        assert!(!c.accepts(b"]}}"));
        assert!(c.accepts(b"1], 2]}"));
        // Trials leave the state alone.
        assert!(c.advance(b"1]]"));
        assert!(c.advance(b"}"));
        assert!(c.is_closed());
        assert!(!c.accepts(b" "));
    }

    #[test]
    fn top_level_number_ends_the_document() {
        let mut c = JsonConstraint::new();
        assert!(c.advance(b"12"));
        assert!(c.is_complete() && !c.is_closed());
        assert!(c.accepts(b"3"));
        assert!(!c.accepts(b","));
    }

    #[test]
    fn mask_allows_exactly_the_valid_tokens() {
        let toks: Vec<Vec<u8>> = ["{", "}", "\"", "a", "\":", " 1", "1}", "<eos>", "x", "{\"a"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        let eos = 7;
        let vocab = VocabIndex::new(toks, &[eos]);
        let allowed = |m: &TokenMask| -> Vec<u32> {
            let TokenMask::Bits(b) = m else { panic!() };
            (0..vocab.len() as u32)
                .filter(|&i| b[i as usize / 64] >> (i % 64) & 1 == 1)
                .collect()
        };
        let mut c = JsonConstraint::object();
        assert_eq!(allowed(&c.mask(&vocab, &[eos])), vec![0, 9]);
        c.advance(b"{\"a");
        // Inside a string, anything printable goes.
        assert_eq!(
            allowed(&c.mask(&vocab, &[eos])),
            vec![0, 1, 2, 3, 4, 5, 6, 8]
        );
        c.advance(b"\":");
        assert_eq!(allowed(&c.mask(&vocab, &[eos])), vec![0, 2, 4, 5, 6, 9]);
        c.advance(b"1}");
        assert_eq!(allowed(&c.mask(&vocab, &[eos])), vec![eos]);
    }
}
