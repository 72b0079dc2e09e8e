//! Tokenizers built from GGUF metadata, agreeing token for token with llama.cpp.
//!
//! Two vocabulary kinds are supported, chosen by `tokenizer.ggml.model`:
//!
//! * `llama` — SentencePiece-style ([`VocabKind::SentencePiece`]; Llama 2, TinyLlama, Gemma):
//!   spaces become `▁`, an optional space is prepended (`tokenizer.ggml.add_space_prefix`), pairs
//!   are merged by token score over the whole text ([`spm`]), and characters that are not tokens
//!   fall back to `<0xNN>` byte tokens.
//! * `gpt2` — byte-level BPE ([`VocabKind::ByteLevel`]; GPT-2, Llama 3, Qwen, ...): a
//!   pre-tokenizer picked by `tokenizer.ggml.pre` splits text into words ([`pretok`]), bytes are
//!   mapped to GPT-2's printable characters, and merges from `tokenizer.ggml.merges` apply by rank
//!   ([`bpe`]).
//!
//! Before either runs, [`Tokenizer::encode`] splits the text on special tokens the way llama.cpp's
//! `tokenizer_st_partition` does: control and unknown tokens only when `parse_special` is set,
//! user-defined tokens always, longest token text first. Token attributes, BOS/EOS defaults, the
//! end-of-generation set and detokenization (including the leading-space and `clean_spaces`
//! rules) follow llama.cpp's `llama-vocab.cpp`; where llama.cpp fixes up metadata by token text
//! (EOT/EOG detection, "unused" control tokens), so does this module.

mod bpe;
mod pretok;
mod spm;
mod unicode;

#[cfg(test)]
mod tests;

use std::collections::HashMap;

use aho_corasick::{AhoCorasick, MatchKind};

use crate::Error;
use crate::gguf::GgufFile;

/// Token types as stored in `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_i64(v: i64) -> Self {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }

    fn attr(self) -> u16 {
        match self {
            TokenType::Undefined => 0,
            TokenType::Normal => attr::NORMAL,
            TokenType::Unknown => attr::UNKNOWN,
            TokenType::Control => attr::CONTROL,
            TokenType::UserDefined => attr::USER_DEFINED,
            TokenType::Unused => attr::UNUSED,
            TokenType::Byte => attr::BYTE,
        }
    }
}

/// llama.cpp's token attribute bits (`llama_token_attr`): a token type plus fix-ups.
mod attr {
    pub const UNKNOWN: u16 = 1 << 0;
    pub const UNUSED: u16 = 1 << 1;
    pub const NORMAL: u16 = 1 << 2;
    pub const CONTROL: u16 = 1 << 3;
    pub const USER_DEFINED: u16 = 1 << 4;
    pub const BYTE: u16 = 1 << 5;
    pub const LSTRIP: u16 = 1 << 7;
    pub const RSTRIP: u16 = 1 << 8;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    /// SentencePiece-style (`llama`): '▁' stands for a space, `<0xNN>` tokens are raw bytes.
    SentencePiece,
    /// Byte-level BPE (`gpt2`): every byte is mapped to a printable code point.
    ByteLevel,
}

/// Older name of [`Tokenizer`], kept so that existing callers keep compiling.
pub type Vocab = Tokenizer;

/// Texts llama.cpp recognises as end-of-turn tokens when `tokenizer.ggml.eot_token_id` is absent.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

/// Texts llama.cpp always treats as end of generation.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];

/// A tokenizer for one model's vocabulary. Cheap to share (`&Tokenizer` is all encoding needs).
pub struct Tokenizer {
    kind: VocabKind,
    pre: String,
    pre_family: &'static str,
    tokens: Vec<Box<str>>,
    scores: Vec<f32>,
    types: Vec<TokenType>,
    attrs: Vec<u16>,
    ids: HashMap<Box<str>, u32>,
    /// Rendered bytes of every token (control tokens as their text), back to back.
    piece_bytes: Vec<u8>,
    piece_ends: Vec<u32>,
    /// SentencePiece byte fallback: the token for each raw byte.
    byte_tokens: [Option<u32>; 256],
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    /// Replace spaces by '▁' before SentencePiece merging.
    escape_whitespaces: bool,
    clean_spaces: bool,
    ignore_merges: bool,
    eog: Vec<u32>,
    /// Control, user-defined and unknown tokens, longest text first.
    specials: Vec<u32>,
    /// Finds which special tokens occur in a text (pattern i is `specials[i]`).
    special_finder: Option<AhoCorasick>,
    merges: bpe::Merges,
    pretok: Option<pretok::PreTokenizer>,
    /// See [`Tokenizer::max_token_bytes`].
    max_token_bytes: usize,
    warnings: Vec<String>,
}

/// Limits for [`Tokenizer::encode_bounded`]. The default sets none.
#[derive(Clone, Copy, Default)]
pub struct EncodeBudget<'a> {
    /// Stop with [`EncodeError::TooManyTokens`] as soon as the result provably exceeds this.
    pub max_tokens: Option<usize>,
    /// Polled regularly (at least every few thousand bytes/merge steps of work); `true` stops
    /// the work with [`EncodeError::Stopped`].
    pub should_stop: Option<&'a (dyn Fn() -> bool + Sync)>,
}

impl std::fmt::Debug for EncodeBudget<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodeBudget")
            .field("max_tokens", &self.max_tokens)
            .field("should_stop", &self.should_stop.is_some())
            .finish()
    }
}

/// Why [`Tokenizer::encode_bounded`] gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("the text is longer than {limit} tokens")]
    TooManyTokens { limit: usize },
    #[error("tokenization was stopped before it finished")]
    Stopped,
}

/// Units of work (bytes scanned, symbols built, merges done) between two polls of
/// [`EncodeBudget::should_stop`].
const POLL_EVERY: usize = 4096;

/// Counts the work of one encode and polls the caller's stop flag every [`POLL_EVERY`] units.
pub(crate) struct Meter<'a> {
    should_stop: Option<&'a (dyn Fn() -> bool + Sync)>,
    work: usize,
}

impl<'a> Meter<'a> {
    fn new(should_stop: Option<&'a (dyn Fn() -> bool + Sync)>) -> Self {
        Meter {
            should_stop,
            work: 0,
        }
    }

    /// Adds `n` units of work; polls the stop flag when enough has accumulated.
    #[inline]
    pub(crate) fn tick(&mut self, n: usize) -> Result<(), EncodeError> {
        self.work += n;
        if self.work >= POLL_EVERY {
            self.work = 0;
            self.poll()?;
        }
        Ok(())
    }

    /// Polls the stop flag now.
    pub(crate) fn poll(&self) -> Result<(), EncodeError> {
        match self.should_stop {
            Some(stop) if stop() => Err(EncodeError::Stopped),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("pre", &self.pre)
            .field("n_vocab", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

fn tok_err(msg: impl Into<String>) -> Error {
    Error::Tokenizer(msg.into())
}

/// Reads an array of numbers (either integers or floats) of at least `n` elements, or nothing.
fn number_array(f: &GgufFile, key: &str, n: usize) -> Result<Option<Vec<f64>>, Error> {
    let Some(v) = f.get(key) else {
        return Ok(None);
    };
    let arr = v
        .as_array()
        .ok_or_else(|| tok_err(format!("{key} is not an array")))?;
    if arr.len() < n {
        return Err(tok_err(format!(
            "{key} has {} entries for {n} tokens",
            arr.len()
        )));
    }
    arr[..n]
        .iter()
        .map(|x| {
            x.as_f64()
                .ok_or_else(|| tok_err(format!("{key} holds a non-number")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.*`).
    pub fn from_gguf(f: &GgufFile) -> Result<Tokenizer, Error> {
        let model = f.get_str("tokenizer.ggml.model")?;
        let kind = match model {
            "llama" => VocabKind::SentencePiece,
            "gpt2" => VocabKind::ByteLevel,
            other => {
                return Err(tok_err(format!(
                    "unsupported tokenizer model {other:?} (supported: llama, gpt2)"
                )));
            }
        };
        let pre = f.opt_str("tokenizer.ggml.pre")?.unwrap_or("").to_string();
        let mut warnings = Vec::new();

        let mut spec = None;
        if kind == VocabKind::ByteLevel {
            if pre.is_empty() {
                warnings.push(
                    "tokenizer.ggml.pre is missing; using llama.cpp's 'default' pre-tokenizer \
                     (tokenization quality may suffer)"
                        .to_string(),
                );
            }
            spec = Some(pretok::pre_spec(&pre).unwrap_or_else(|| {
                warnings.push(format!(
                    "unknown pre-tokenizer {pre:?}; falling back to GPT-2's (tokens may differ \
                     from the model's own tokenizer)"
                ));
                pretok::pre_spec("gpt-2").expect("gpt-2 is known")
            }));
        }

        // Defaults per vocabulary kind, as llama.cpp sets them before reading metadata.
        let (mut bos, mut eos, mut unk) = match kind {
            VocabKind::SentencePiece => (Some(1), Some(2), Some(0)),
            VocabKind::ByteLevel => (Some(11), Some(11), None),
        };
        let (mut add_bos, mut add_space_prefix, clean_spaces, ignore_merges, escape_whitespaces) =
            match &spec {
                None => (true, true, false, false, true),
                Some(s) => {
                    if s.no_bos {
                        bos = None;
                    }
                    (s.add_bos, false, s.clean_spaces, s.ignore_merges, false)
                }
            };
        let mut add_eos = false;
        if let Some(v) = f.opt_bool("tokenizer.ggml.add_space_prefix")? {
            add_space_prefix = v;
        }

        let token_values = f
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .ok_or_else(|| tok_err("tokenizer.ggml.tokens is missing"))?;
        let n = token_values.len();
        if n == 0 || n > u32::MAX as usize {
            return Err(tok_err(format!("vocabulary of {n} tokens")));
        }
        let mut tokens: Vec<Box<str>> = Vec::with_capacity(n);
        for (i, v) in token_values.iter().enumerate() {
            let s = v
                .as_str()
                .ok_or_else(|| tok_err(format!("token {i} is not a string")))?;
            tokens.push(if s.is_empty() {
                format!("[EMPTY_{i}]").into()
            } else {
                s.into()
            });
        }
        let scores: Vec<f32> = number_array(f, "tokenizer.ggml.scores", n)?.map_or_else(
            || vec![0.0; n],
            |v| v.into_iter().map(|x| x as f32).collect(),
        );
        let types: Vec<TokenType> = number_array(f, "tokenizer.ggml.token_type", n)?.map_or_else(
            || vec![TokenType::Normal; n],
            |v| {
                v.into_iter()
                    .map(|x| TokenType::from_i64(x as i64))
                    .collect()
            },
        );
        let mut attrs: Vec<u16> = types.iter().map(|t| t.attr()).collect();

        let mut ids: HashMap<Box<str>, u32> = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            if let Some(&first) = ids.get(t) {
                warnings.push(format!(
                    "duplicate token {t:?} (ids {first} and {i}); the first one wins"
                ));
            } else {
                ids.insert(t.clone(), i as u32);
            }
        }

        // Special token ids: a default outside the vocabulary is dropped; metadata outside it
        // is ignored with a warning.
        let in_range = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
        bos = in_range(bos);
        eos = in_range(eos);
        unk = in_range(unk);
        let (mut eot, mut eom) = (None, None);
        let (mut fim_pre, mut fim_suf, mut fim_mid) = (None, None, None);
        let (mut fim_pad, mut fim_rep, mut fim_sep) = (None, None, None);
        for (key, slot) in [
            ("tokenizer.ggml.bos_token_id", &mut bos),
            ("tokenizer.ggml.eos_token_id", &mut eos),
            ("tokenizer.ggml.eot_token_id", &mut eot),
            ("tokenizer.ggml.eom_token_id", &mut eom),
            ("tokenizer.ggml.unknown_token_id", &mut unk),
            ("tokenizer.ggml.fim_pre_token_id", &mut fim_pre),
            ("tokenizer.ggml.fim_suf_token_id", &mut fim_suf),
            ("tokenizer.ggml.fim_mid_token_id", &mut fim_mid),
            ("tokenizer.ggml.fim_pad_token_id", &mut fim_pad),
            ("tokenizer.ggml.fim_rep_token_id", &mut fim_rep),
            ("tokenizer.ggml.fim_sep_token_id", &mut fim_sep),
        ] {
            if let Some(v) = f.opt_u64(key)? {
                if (v as usize) < n {
                    *slot = Some(v as u32);
                } else {
                    warnings.push(format!("{key} = {v} is outside the vocabulary; ignored"));
                }
            }
        }
        for (key, slot) in [
            ("tokenizer.ggml.prefix_token_id", &mut fim_pre),
            ("tokenizer.ggml.suffix_token_id", &mut fim_suf),
            ("tokenizer.ggml.middle_token_id", &mut fim_mid),
        ] {
            if let Some(v) = f.opt_u64(key)?
                && (v as usize) < n
            {
                *slot = Some(v as u32);
            }
        }
        if let Some(v) = f.opt_bool("tokenizer.ggml.add_bos_token")? {
            add_bos = v;
        }
        if let Some(v) = f.opt_bool("tokenizer.ggml.add_eos_token")? {
            add_eos = v;
        }
        if add_bos && bos.is_none() {
            return Err(tok_err(
                "tokenizer.ggml.add_bos_token is true, but there is no BOS token",
            ));
        }
        if add_eos && eos.is_none() {
            return Err(tok_err(
                "tokenizer.ggml.add_eos_token is true, but there is no EOS token",
            ));
        }

        // llama.cpp's fix-ups by token text. Found tokens become control tokens.
        let find_first = |texts: &[&str]| -> Option<u32> {
            texts.iter().filter_map(|t| ids.get(*t).copied()).min()
        };
        for (slot, texts) in [
            (&mut eot, EOT_TEXTS),
            (&mut eom, &["<|eom_id|>"][..]),
            (&mut fim_pre, FIM_PRE_TEXTS),
            (&mut fim_suf, FIM_SUF_TEXTS),
            (&mut fim_mid, FIM_MID_TEXTS),
            (&mut fim_pad, FIM_PAD_TEXTS),
            (&mut fim_rep, FIM_REP_TEXTS),
            (&mut fim_sep, FIM_SEP_TEXTS),
        ] {
            if slot.is_none()
                && let Some(id) = find_first(texts)
            {
                *slot = Some(id);
                attrs[id as usize] |= attr::CONTROL;
            }
        }
        for (i, t) in tokens.iter().enumerate() {
            if attrs[i] & attr::CONTROL != 0 && t.contains("unused") {
                attrs[i] |= attr::UNUSED;
            }
        }
        let mut eog: Vec<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
        for t in EOG_TEXTS {
            if let Some(&id) = ids.get(*t) {
                eog.push(id);
                attrs[id as usize] |= attr::CONTROL;
            }
        }
        // gpt-oss renders these structural tokens always.
        for t in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(&id) = ids.get(t) {
                attrs[id as usize] = attr::USER_DEFINED;
            }
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        eog.sort_unstable();
        eog.dedup();
        let has = |eog: &[u32], t: &str| ids.get(t).is_some_and(|id| eog.contains(id));
        // o200k_harmony and solar-open: "<|end|>" ends a message, not the generation.
        if ((has(&eog, "<|return|>") && has(&eog, "<|call|>"))
            || (has(&eog, "<|calls|>") && has(&eog, "<|flush|>")))
            && has(&eog, "<|end|>")
        {
            let id = ids["<|end|>"];
            eog.retain(|&e| e != id);
            attrs[id as usize] = attr::USER_DEFINED;
        }
        if has(&eog, "<|tool_response>") && has(&eog, "</s>") {
            let id = ids["</s>"];
            eog.retain(|&e| e != id);
            attrs[id as usize] = attr::NORMAL;
        }

        // Per-model strip attributes llama.cpp sets by name.
        let model_name = f
            .opt_str("general.name")?
            .unwrap_or("")
            .to_ascii_lowercase();
        let arch = f.opt_str("general.architecture")?.unwrap_or("");
        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                attrs[i as usize] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0
            })
            .collect();
        specials.sort_by_key(|&i| std::cmp::Reverse(tokens[i as usize].len()));
        if ["jina-v2-de", "jina-v2-es", "jina-v2-code"]
            .iter()
            .any(|p| pre.contains(p))
            || ["nomic-bert-moe", "jina-bert-v3"]
                .iter()
                .any(|a| arch.contains(a))
        {
            if let Some(&id) = ids.get("<mask>") {
                attrs[id as usize] |= attr::LSTRIP;
            }
        } else if model_name.contains("phi-3") || model_name.contains("phi3") {
            for &id in &specials {
                attrs[id as usize] |= attr::RSTRIP;
            }
            if let Some(&id) = ids.get("</s>") {
                attrs[id as usize] |= attr::RSTRIP;
            }
            for t in ["<unk>", "<s>", "<|endoftext|>"] {
                if let Some(&id) = ids.get(t) {
                    attrs[id as usize] &= !attr::RSTRIP;
                }
            }
        } else if model_name.contains("modern-bert")
            && let Some(&id) = ids.get("[MASK]")
        {
            attrs[id as usize] |= attr::LSTRIP;
        }

        let special_finder = if specials.is_empty() {
            None
        } else {
            let pats: Vec<&str> = specials.iter().map(|&i| &*tokens[i as usize]).collect();
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::Standard)
                    .build(&pats)
                    .map_err(|e| tok_err(format!("special token matcher: {e}")))?,
            )
        };

        let (merges, pretok, pre_family) = match &spec {
            None => (bpe::Merges::default(), None, "spm"),
            Some(s) => {
                let lines = f
                    .get("tokenizer.ggml.merges")
                    .and_then(|v| v.as_array())
                    .ok_or_else(|| tok_err("tokenizer.ggml.merges is missing"))?;
                let lines: Vec<&str> = lines
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .ok_or_else(|| tok_err("tokenizer.ggml.merges holds a non-string"))
                    })
                    .collect::<Result<_, _>>()?;
                let merges = bpe::Merges::build(&lines, |t| ids.get(t).copied());
                let pt = pretok::PreTokenizer::new(&s.patterns).map_err(tok_err)?;
                (merges, Some(pt), s.family)
            }
        };

        let mut byte_tokens = [None; 256];
        if kind == VocabKind::SentencePiece {
            for (b, slot) in byte_tokens.iter_mut().enumerate() {
                *slot = ids
                    .get(format!("<0x{b:02X}>").as_str())
                    .copied()
                    .or_else(|| {
                        if b < 0x80 {
                            ids.get(char::from(b as u8).to_string().as_str()).copied()
                        } else {
                            None
                        }
                    });
            }
        }

        let mut t = Tokenizer {
            kind,
            pre,
            pre_family,
            tokens,
            scores,
            types,
            attrs,
            ids,
            piece_bytes: Vec::new(),
            piece_ends: Vec::new(),
            byte_tokens,
            bos,
            eos,
            eot,
            eom,
            unk,
            add_bos,
            add_eos,
            add_space_prefix,
            escape_whitespaces,
            clean_spaces,
            ignore_merges,
            eog,
            specials,
            special_finder,
            merges,
            pretok,
            max_token_bytes: usize::MAX,
            warnings,
        };
        t.build_pieces();
        t.max_token_bytes = t.compute_max_token_bytes();
        Ok(t)
    }

    fn build_pieces(&mut self) {
        let mut bytes = Vec::with_capacity(self.tokens.len() * 6);
        let mut ends = Vec::with_capacity(self.tokens.len());
        for id in 0..self.tokens.len() {
            self.render(id, &mut bytes);
            ends.push(bytes.len() as u32);
        }
        self.piece_bytes = bytes;
        self.piece_ends = ends;
    }

    /// llama.cpp's `token_to_piece` with `special = true`.
    fn render(&self, id: usize, out: &mut Vec<u8>) {
        let a = self.attrs[id];
        let text = &*self.tokens[id];
        if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
            out.extend_from_slice(text.as_bytes());
        } else if a & attr::NORMAL != 0 {
            match self.kind {
                VocabKind::SentencePiece => {
                    out.extend_from_slice(text.replace('\u{2581}', " ").as_bytes())
                }
                VocabKind::ByteLevel => {
                    for c in text.chars() {
                        match unicode::char_to_byte(c) {
                            Some(b) => out.push(b),
                            None => {
                                // What llama.cpp prints for a character that is no byte.
                                let mut u = [0u8; 4];
                                out.extend_from_slice(b"[UNK_BYTE_0x");
                                for b in c.encode_utf8(&mut u).bytes() {
                                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                                }
                                out.extend_from_slice(text.as_bytes());
                                out.push(b']');
                            }
                        }
                    }
                }
            }
        } else if a & attr::BYTE != 0
            && let Some(b) = text.get(3..5).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
        }
    }

    /// The longest token text when every input byte provably ends up in some token that covers
    /// at most that many input bytes; `usize::MAX` otherwise (see [`Tokenizer::max_token_bytes`]).
    fn compute_max_token_bytes(&self) -> usize {
        // Special tokens that strip whitespace around them cover any number of input bytes.
        if self
            .specials
            .iter()
            .any(|&id| self.attrs[id as usize] & (attr::LSTRIP | attr::RSTRIP) != 0)
        {
            return usize::MAX;
        }
        let lossless = match self.kind {
            // Every symbol that is no token falls back to one token per byte.
            VocabKind::SentencePiece => (0..=255u8).all(|b| self.byte_token(b).is_some()),
            // The fallback keeps only ASCII bytes, so every symbol must be a token: all 256 byte
            // characters and every merge result.
            VocabKind::ByteLevel => {
                (0..=255u8).all(|b| self.lookup(&unicode::byte_to_char(b).to_string()).is_some())
                    && self.merges.all_results_are_tokens(self)
            }
        };
        if !lossless {
            return usize::MAX;
        }
        // SentencePiece writes a space as the 3-byte '▁' and byte-level BPE a byte as a 1- or
        // 2-byte character, so a token's text is never shorter than the input it covers.
        self.tokens
            .iter()
            .map(|t| t.len())
            .max()
            .unwrap_or(1)
            .max(1)
    }

    /// Byte length of the longest token's text: every token covers at most this many input
    /// bytes, so `text.len().div_ceil(max_token_bytes())` is a lower bound on its token count
    /// (for a text that yields any token). `usize::MAX` where no such bound holds: vocabularies
    /// that drop input they cannot tokenize, or whose special tokens strip the whitespace around
    /// them (Phi-3).
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// The least number of tokens `bytes` bytes of input can become (0 where no bound holds).
    fn min_tokens(&self, bytes: usize) -> usize {
        if self.max_token_bytes == usize::MAX {
            0
        } else {
            bytes.div_ceil(self.max_token_bytes)
        }
    }

    #[inline]
    fn lookup(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// SentencePiece byte fallback; the unknown token where the vocabulary has no such byte.
    #[inline]
    fn byte_token(&self, b: u8) -> Option<u32> {
        self.byte_tokens[b as usize].or(self.unk)
    }

    /// Text to token ids. `add_special` adds BOS/EOS as the model asks (`add_bos`/`add_eos`);
    /// `parse_special` lets control tokens written in the text (e.g. `<start_of_turn>`) become
    /// those tokens instead of being tokenized as plain text. User-defined tokens are always
    /// matched, as in llama.cpp.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        match self.encode_bounded(text, add_special, parse_special, &EncodeBudget::default()) {
            Ok(ids) => ids,
            Err(e) => unreachable!("an unbounded encode cannot fail: {e}"),
        }
    }

    /// [`Tokenizer::encode`] within a budget: with `max_tokens`, a text whose lower bound
    /// ([`Tokenizer::max_token_bytes`]) already exceeds it is rejected before any work, and the
    /// work stops as soon as the tokens produced (plus EOS) exceed it; `should_stop` is polled
    /// every few thousand units of work. When it succeeds, the result is exactly `encode`'s.
    pub fn encode_bounded(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
        budget: &EncodeBudget<'_>,
    ) -> Result<Vec<u32>, EncodeError> {
        let limit = budget.max_tokens.unwrap_or(usize::MAX);
        let too_many = || EncodeError::TooManyTokens { limit };
        let bos = (add_special && self.add_bos && self.bos.is_some()) as usize;
        let eos = (add_special && self.add_eos && self.eos.is_some()) as usize;
        if self.min_tokens(text.len()) + bos + eos > limit {
            return Err(too_many());
        }
        let mut meter = Meter::new(budget.should_stop);
        meter.poll()?;
        let mut out = Vec::with_capacity((text.len() / 3 + 2).min(limit.saturating_add(1)));
        if bos == 1
            && let Some(b) = self.bos
        {
            out.push(b);
        }
        // After each fragment: the tokens so far, EOS and the least the rest can become.
        let check = |out: &Vec<u32>, rest: usize| {
            if out.len() + eos + self.min_tokens(rest) > limit {
                Err(too_many())
            } else {
                Ok(())
            }
        };
        match self.kind {
            VocabKind::SentencePiece => {
                let mut prev_special = true;
                let mut buf = String::new();
                self.partition(text, parse_special, &mut meter, &mut |f, meter| match f {
                    Frag::Text(s, e) => {
                        buf.clear();
                        if self.add_space_prefix && prev_special {
                            buf.push(if self.escape_whitespaces {
                                '\u{2581}'
                            } else {
                                ' '
                            });
                        }
                        if self.escape_whitespaces {
                            for c in text[s..e].chars() {
                                buf.push(if c == ' ' { '\u{2581}' } else { c });
                            }
                        } else {
                            buf.push_str(&text[s..e]);
                        }
                        meter.tick(e - s)?;
                        spm::tokenize(self, &buf, &mut out, meter)?;
                        prev_special = false;
                        check(&out, text.len() - e)
                    }
                    Frag::Token(id) => {
                        out.push(id);
                        prev_special = true;
                        check(&out, 0)
                    }
                })?;
            }
            VocabKind::ByteLevel => {
                let pretok = self
                    .pretok
                    .as_ref()
                    .expect("byte-level has a pre-tokenizer");
                let mut session = bpe::Session::default();
                let mut cpts = Vec::new();
                self.partition(text, parse_special, &mut meter, &mut |f, meter| match f {
                    Frag::Text(s, e) => {
                        let frag = &text[s..e];
                        cpts.clear();
                        cpts.extend(frag.chars());
                        meter.tick(e - s)?;
                        let mut at = 0;
                        let mut ci = 0;
                        for len in pretok.split(&cpts) {
                            let bytes: usize =
                                cpts[ci..ci + len].iter().map(|c| c.len_utf8()).sum();
                            session.word(
                                self,
                                &self.merges,
                                &frag[at..at + bytes],
                                &mut out,
                                meter,
                            )?;
                            at += bytes;
                            ci += len;
                            check(&out, text.len() - (s + at))?;
                        }
                        Ok(())
                    }
                    Frag::Token(id) => {
                        out.push(id);
                        check(&out, 0)
                    }
                })?;
            }
        }
        if eos == 1
            && let Some(e) = self.eos
        {
            out.push(e);
        }
        Ok(out)
    }

    /// Splits `text` on special tokens as llama.cpp's `tokenizer_st_partition` does — for each
    /// special token, longest first, every occurrence in every remaining text fragment is cut
    /// out — and hands the fragments to `emit` in text order.
    ///
    /// llama.cpp materializes the whole fragment list once per special token; this walks the same
    /// cuts depth first instead: a text piece left between two occurrences of token `k` is cut by
    /// token `k + 1` (and so on) before the scan for token `k` goes on. The pieces each token sees
    /// are the same, so the fragments are too, but the working memory is one scan position per
    /// special token that occurs in the text (plus a flag per special token), never a list as
    /// long as the text. Returns the deepest that stack of positions got (tests check the bound).
    fn partition(
        &self,
        text: &str,
        parse_special: bool,
        meter: &mut Meter<'_>,
        emit: &mut dyn FnMut(Frag, &mut Meter<'_>) -> Result<(), EncodeError>,
    ) -> Result<usize, EncodeError> {
        if text.is_empty() {
            return Ok(0);
        }
        // Only tokens that occur somewhere in the text can split a fragment of it. One flag per
        // special token (the matches themselves are not kept: overlapping runs of Gemma's
        // whitespace tokens give dozens per byte).
        let mut levels: Vec<(u32, u16)> = Vec::new();
        if let Some(finder) = &self.special_finder {
            let mut seen = vec![false; self.specials.len()];
            for m in finder.find_overlapping_iter(text) {
                seen[m.pattern().as_usize()] = true;
                meter.tick(1)?;
            }
            for (i, &id) in self.specials.iter().enumerate() {
                let a = self.attrs[id as usize];
                if seen[i] && (parse_special || a & (attr::CONTROL | attr::UNKNOWN) == 0) {
                    levels.push((id, a));
                }
            }
        }
        enum Step {
            /// Cut `levels[level]` out of `text[s..e]`.
            Scan {
                level: usize,
                s: usize,
                e: usize,
            },
            Emit(Frag),
        }
        let bytes = text.as_bytes();
        let mut stack = vec![Step::Scan {
            level: 0,
            s: 0,
            e: text.len(),
        }];
        let mut peak = 1;
        // A text piece goes to the next token's scan, or out when no token is left.
        let piece = |level: usize, s: usize, e: usize| {
            if level + 1 < levels.len() {
                Step::Scan {
                    level: level + 1,
                    s,
                    e,
                }
            } else {
                Step::Emit(Frag::Text(s, e))
            }
        };
        while let Some(step) = stack.pop() {
            let (level, s, e) = match step {
                Step::Emit(f) => {
                    emit(f, meter)?;
                    continue;
                }
                Step::Scan { level, s, e } if level >= levels.len() => {
                    emit(Frag::Text(s, e), meter)?;
                    continue;
                }
                Step::Scan { level, s, e } => (level, s, e),
            };
            let (id, a) = levels[level];
            let pat = &*self.tokens[id as usize];
            let found = text[s..e].find(pat);
            meter.tick(found.map_or(e - s, |p| p + pat.len()))?;
            let Some(pos) = found else {
                stack.push(piece(level, s, e));
                continue;
            };
            let m = s + pos;
            let mut left_end = m;
            if a & attr::LSTRIP != 0 {
                while left_end > s && bytes[left_end - 1].is_ascii_whitespace_c() {
                    left_end -= 1;
                }
            }
            let mut r = m + pat.len();
            if a & attr::RSTRIP != 0 {
                while r < e && bytes[r].is_ascii_whitespace_c() {
                    r += 1;
                }
            }
            // Last in, first out: the piece before the token, the token, then the rest.
            if r < e {
                stack.push(Step::Scan { level, s: r, e });
            }
            stack.push(Step::Emit(Frag::Token(id)));
            if left_end > s {
                stack.push(piece(level, s, left_end));
            }
            peak = peak.max(stack.len());
        }
        Ok(peak)
    }

    /// The partition as llama.cpp writes it (and as this module did before [`Self::partition`]
    /// streamed): every fragment list materialized once per special token. Tests compare the two.
    #[cfg(test)]
    fn partition_reference(&self, text: &str, parse_special: bool) -> Vec<Frag> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut frags = vec![Frag::Text(0, text.len())];
        let Some(finder) = &self.special_finder else {
            return frags;
        };
        // Only tokens that occur somewhere in the text can split a fragment of it.
        let mut seen = vec![false; self.specials.len()];
        for m in finder.find_overlapping_iter(text) {
            seen[m.pattern().as_usize()] = true;
        }
        let present: Vec<usize> = (0..seen.len()).filter(|&i| seen[i]).collect();
        if present.is_empty() {
            return frags;
        }
        let bytes = text.as_bytes();
        for idx in present {
            let id = self.specials[idx];
            let a = self.attrs[id as usize];
            if !parse_special && a & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            let pat = &*self.tokens[id as usize];
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                let Frag::Text(mut s, e) = f else {
                    next.push(f);
                    continue;
                };
                loop {
                    let Some(pos) = text[s..e].find(pat) else {
                        next.push(Frag::Text(s, e));
                        break;
                    };
                    let m = s + pos;
                    let mut left_end = m;
                    if a & attr::LSTRIP != 0 {
                        while left_end > s && bytes[left_end - 1].is_ascii_whitespace_c() {
                            left_end -= 1;
                        }
                    }
                    if left_end > s {
                        next.push(Frag::Text(s, left_end));
                    }
                    next.push(Frag::Token(id));
                    let mut r = m + pat.len();
                    if a & attr::RSTRIP != 0 {
                        while r < e && bytes[r].is_ascii_whitespace_c() {
                            r += 1;
                        }
                    }
                    if r >= e {
                        break;
                    }
                    s = r;
                }
            }
            frags = next;
        }
        frags
    }

    /// Bytes of one token as rendered: control and unknown tokens render as their text only
    /// when `special` is set; byte tokens are their byte; `▁`/GPT-2 characters become bytes.
    pub fn token_to_piece(&self, id: u32, special: bool) -> &[u8] {
        let i = id as usize;
        if i >= self.tokens.len()
            || (!special && self.attrs[i] & (attr::UNKNOWN | attr::CONTROL) != 0)
        {
            return &[];
        }
        let start = if i == 0 {
            0
        } else {
            self.piece_ends[i - 1] as usize
        };
        &self.piece_bytes[start..self.piece_ends[i] as usize]
    }

    /// Bytes of one token as rendered in normal output (control tokens render as nothing).
    pub fn piece(&self, id: u32) -> Vec<u8> {
        self.token_to_piece(id, false).to_vec()
    }

    /// The token's raw vocabulary string ("" for ids outside the vocabulary).
    pub fn token_text(&self, id: u32) -> &str {
        self.tokens.get(id as usize).map_or("", |s| s)
    }

    /// Ids to text as llama.cpp's `llama_detokenize` (with `remove_special = false`) produces it:
    /// SentencePiece vocabularies drop the space their encoder prepended when the first token
    /// starts with one, and vocabularies with `clean_spaces` undo the tokenizer's spacing around
    /// punctuation. Invalid UTF-8 is replaced only after all pieces are joined.
    pub fn detokenize(&self, ids: &[u32], special: bool) -> String {
        String::from_utf8_lossy(&self.detokenize_bytes(ids, special)).into_owned()
    }

    /// [`Tokenizer::detokenize`] without the final UTF-8 conversion.
    pub fn detokenize_bytes(&self, ids: &[u32], special: bool) -> Vec<u8> {
        let mut t: Vec<u8> = Vec::with_capacity(ids.len() * 4);
        let mut remove_space = self.add_space_prefix;
        for &id in ids {
            let mut p = self.token_to_piece(id, special);
            if remove_space && p.first() == Some(&b' ') {
                p = &p[1..];
            }
            remove_space = false;
            t.extend_from_slice(p);
        }
        if self.clean_spaces {
            clean_spaces(&mut t);
        }
        t
    }

    /// [`Tokenizer::detokenize`] without rendering control tokens.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.detokenize(ids, false)
    }

    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    /// Same as [`Tokenizer::n_vocab`].
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-turn token (`tokenizer.ggml.eot_token_id`, or found by text as llama.cpp does).
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// End-of-message token (`<|eom_id|>`).
    pub fn eom(&self) -> Option<u32> {
        self.eom
    }

    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    pub fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// Whether generation should stop at this token (EOS, EOT, EOM and llama.cpp's list of
    /// end-of-generation texts such as `<end_of_turn>`, `<|im_end|>`, `<|eot_id|>`).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation tokens, ascending.
    pub fn eog_tokens(&self) -> &[u32] {
        &self.eog
    }

    /// Control or user-defined token.
    pub fn is_special(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|a| a & (attr::CONTROL | attr::USER_DEFINED) != 0)
    }

    /// Control token (after llama.cpp's fix-ups by text).
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|a| a & attr::CONTROL != 0)
    }

    /// The type stored in the file for this token.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    pub fn score(&self, id: u32) -> Option<f32> {
        self.scores.get(id as usize).copied()
    }

    /// The id whose vocabulary string is exactly `text`.
    pub fn find_token(&self, text: &str) -> Option<u32> {
        self.lookup(text)
    }

    pub fn kind(&self) -> VocabKind {
        self.kind
    }

    /// `tokenizer.ggml.pre` as stored ("" when absent).
    pub fn pre(&self) -> &str {
        &self.pre
    }

    /// The pre-tokenizer family in use ("spm" for SentencePiece vocabularies), after aliases and
    /// the fallback for unknown values are resolved.
    pub fn pre_family(&self) -> &str {
        self.pre_family
    }

    /// Number of BPE merges (0 for SentencePiece).
    pub fn n_merges(&self) -> usize {
        self.merges.len()
    }

    /// Problems found while loading that did not stop it (an unknown pre-tokenizer, say).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frag {
    /// Byte range of the input text.
    Text(usize, usize),
    Token(u32),
}

trait CSpace {
    fn is_ascii_whitespace_c(&self) -> bool;
}

impl CSpace for u8 {
    /// C's `isspace` (includes vertical tab, unlike `u8::is_ascii_whitespace`).
    fn is_ascii_whitespace_c(&self) -> bool {
        matches!(*self, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
    }
}

/// llama.cpp's `clean_spaces` passes, kept byte-for-byte (including editing in place, which the
/// second pass relies on).
fn clean_spaces(t: &mut Vec<u8>) {
    let mut total = t.len();
    // " ?", " !", " .", " ," lose the space.
    let total1 = total;
    total = usize::from(total > 0);
    for i in 1..total1 {
        let x = t[i];
        if t[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        t[total] = x;
        total += 1;
    }
    // " ' " loses both spaces.
    let total2 = total;
    total = usize::from(total > 0);
    let mut i = 1;
    while i < total2 {
        let x = t[i];
        if x == b'\'' && i + 1 < total2 && t[i - 1] == b' ' && t[i + 1] == b' ' {
            total -= 1;
            i += 1;
            t[i] = 0;
        }
        t[total] = x;
        total += 1;
        i += 1;
    }
    // " 's", " 'm", " 're", " 've" lose the space.
    let total3 = total;
    total = usize::from(total > 0);
    for i in 1..total3 {
        let x = t[i];
        if t[i - 1] == b' ' && x == b'\'' && i + 1 < total3 {
            let x1 = t[i + 1];
            let contraction = matches!(x1, b's' | b'm')
                || (matches!(x1, b'r' | b'v') && i + 2 < total3 && t[i + 2] == b'e');
            if contraction {
                total -= 1;
            }
        }
        t[total] = x;
        total += 1;
    }
    t.truncate(total);
}

/// Turns a stream of generated tokens into text without ever splitting a UTF-8 character:
/// bytes of an incomplete character are held until the token that completes it arrives. Pieces
/// are rendered like llama.cpp's server streams them (no leading-space removal, no
/// `clean_spaces`); bytes that can never form a character become U+FFFD.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    special: bool,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that renders control tokens as their text.
    pub fn with_special(special: bool) -> Self {
        StreamDecoder {
            pending: Vec::new(),
            special,
        }
    }

    /// Adds one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.pending
            .extend_from_slice(tok.token_to_piece(id, self.special));
        let mut out = String::new();
        let mut start = 0;
        while start < self.pending.len() {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[start..start + valid])
                            .expect("valid prefix"),
                    );
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            start += valid;
                            break;
                        }
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            start += valid + bad;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }

    /// Flushes what is held back (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }

    /// Bytes held back waiting for the rest of a character.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}
