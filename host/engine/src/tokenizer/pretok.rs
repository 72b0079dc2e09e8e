//! Byte-level BPE pre-tokenizers: the word-splitting regexes chosen by `tokenizer.ggml.pre`,
//! applied the way llama.cpp applies them.
//!
//! llama.cpp runs a list of regexes in sequence; each one re-splits every piece the previous ones
//! produced, keeping both the matches and the text between them. The two most common patterns
//! (GPT-2's and Llama 3's) have hand-written splitters there, and so they do here. Every other
//! pattern runs through a backtracking regex engine, over the same "collapsed" text llama.cpp
//! builds: each non-ASCII code point is replaced by one marker character for its category, and
//! `\p{L}`/`\p{N}`/... in the pattern become classes of that marker plus the ASCII members. That
//! reproduces llama.cpp's exact behaviour, quirks included (for example `\p{Lu}` matches any
//! letter).

use fancy_regex::Regex;

use super::unicode::{Flags, flags};

pub(crate) const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_PATTERN_ORIG: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's pattern: Llama 3's with single digits.
pub(crate) const QWEN2_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const PORO_PATTERN: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";
const TEKKEN_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEEPSEEK3_PATTERN: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;
const SEED_CODER_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const BAILINGMOE_PATTERN: &str = r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
const QWEN35_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TINY_AYA_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const STARCODER_PATTERNS: &[&str] = &[r"\p{N}", GPT2_PATTERN];

/// What one `tokenizer.ggml.pre` value means: its regexes and the flags llama.cpp sets with it.
#[derive(Clone, Debug)]
pub(crate) struct PreSpec {
    /// The canonical name of the family (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*`, lower-case).
    pub family: &'static str,
    pub patterns: Vec<&'static str>,
    /// A word that is a whole vocabulary token is emitted as is, without merging.
    pub ignore_merges: bool,
    /// Overrides the BPE default of not adding BOS.
    pub add_bos: bool,
    /// llama.cpp's `clean_spaces` for detokenization.
    pub clean_spaces: bool,
    /// Drop the BOS token id (ChatGLM).
    pub no_bos: bool,
}

/// Maps a `tokenizer.ggml.pre` value to its pre-tokenizer, or `None` if llama.cpp's list (as far
/// as Realm implements it) does not know it. An empty value means llama.cpp's "default".
pub(crate) fn pre_spec(pre: &str) -> Option<PreSpec> {
    let mut s = PreSpec {
        family: "gpt2",
        patterns: vec![GPT2_PATTERN],
        ignore_merges: false,
        add_bos: false,
        clean_spaces: true,
        no_bos: false,
    };
    let set = |s: &mut PreSpec, family, patterns: &[&'static str]| {
        s.family = family;
        s.patterns = patterns.to_vec();
    };
    match pre {
        "" | "default" => set(
            &mut s,
            "default",
            &[
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_PATTERN,
                r"\p{N}+",
                "[0-9][0-9][0-9]",
            ],
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => {
            set(&mut s, "llama3", &[LLAMA3_PATTERN]);
            s.ignore_merges = true;
            s.add_bos = true;
        }
        "dbrx" => set(&mut s, "dbrx", &[LLAMA3_PATTERN]),
        "smaug-bpe" => set(&mut s, "smaug", &[LLAMA3_PATTERN]),
        "deepseek-llm" => {
            set(
                &mut s,
                "deepseek-llm",
                &[
                    "[\r\n]",
                    // Escaped: several of these letters have canonical equivalents, and a
                    // normalizing editor would silently turn e.g. U+212A KELVIN SIGN into 'K'.
                    r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+",
                    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
                    r"\s+$",
                    "[一-龥ࠀ-一가-퟿]+",
                    r"\p{N}+",
                ],
            );
            s.clean_spaces = false;
        }
        "deepseek-coder" => {
            set(
                &mut s,
                "deepseek-coder",
                &[
                    "[\r\n]",
                    r"\s?\p{L}+",
                    r"\s?\p{P}+",
                    "[一-龥ࠀ-一가-퟿]+",
                    r"\p{N}",
                ],
            );
            s.clean_spaces = false;
        }
        "deepseek-v3" | "hunyuan-dense" | "joyai-llm" | "hy_v4" => {
            set(
                &mut s,
                "deepseek3-llm",
                &[r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK3_PATTERN],
            );
            s.clean_spaces = false;
        }
        "falcon" => set(
            &mut s,
            "falcon",
            &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_PATTERN, "[0-9][0-9][0-9]"],
        ),
        "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
            set(&mut s, "starcoder", STARCODER_PATTERNS)
        }
        "command-r" | "smollm" => {
            set(&mut s, "starcoder", STARCODER_PATTERNS);
            s.clean_spaces = false;
        }
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe"
        | "mpt" | "olmo" | "jais" | "exaone4" => set(&mut s, "gpt2", &[GPT2_PATTERN]),
        "trillion" | "granite-docling" => {
            set(&mut s, "gpt2", &[GPT2_PATTERN]);
            s.clean_spaces = false;
        }
        "stablelm2" => set(&mut s, "qwen2", &[QWEN2_PATTERN]),
        "megrez" => set(&mut s, "qwen2", &[QWEN2_PATTERN]),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "hunyuan" | "solar-open" => {
            set(&mut s, "qwen2", &[QWEN2_PATTERN]);
            s.clean_spaces = false;
        }
        "qwen35" => {
            set(&mut s, "qwen35", &[QWEN35_PATTERN]);
            s.clean_spaces = false;
        }
        "bloom" | "gpt3-finnish" => set(&mut s, "bloom", &[PORO_PATTERN]),
        "poro-chat" => {
            set(&mut s, "bloom", &[PORO_PATTERN]);
            s.clean_spaces = false;
        }
        "glm4" | "chatglm-bpe" => {
            set(&mut s, "chatglm4", &[LLAMA3_PATTERN]);
            s.no_bos = true;
        }
        "viking" => {
            set(&mut s, "viking", &[PORO_PATTERN, r"\p{N}"]);
            s.clean_spaces = false;
        }
        "tekken" => {
            set(&mut s, "tekken", &[TEKKEN_PATTERN]);
            s.clean_spaces = false;
            s.ignore_merges = true;
            s.add_bos = true;
        }
        "chameleon" => {
            set(
                &mut s,
                "chameleon",
                &[
                    "<sentinel:[0-9]+>",
                    "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
                    "([\\t\\n]|    |  )",
                    r"\p{N}",
                    r"[\p{P}!-/:-@\[-`{-~]",
                    GPT2_PATTERN,
                ],
            );
            s.add_bos = true;
            s.clean_spaces = false;
        }
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => {
            set(&mut s, "gpt-4o", &[GPT4O_PATTERN]);
            s.clean_spaces = false;
        }
        "tiny_aya" | "cohere2moe" => {
            // llama.cpp lists the digit-grouping pattern r"\d{1,3}(?=(?:\d{3})*\b)" first, but
            // its std::wregex never matches it (the word boundary inside the lookahead), so
            // the pattern splits nothing there; leaving it out is what agrees with llama.cpp.
            set(&mut s, "tiny-aya", &[TINY_AYA_PATTERN]);
            s.clean_spaces = false;
        }
        "seed-coder" => {
            set(&mut s, "seed-coder", &[SEED_CODER_PATTERN]);
            s.clean_spaces = false;
        }
        "bailingmoe" | "bailingmoe2" | "llada-moe" => {
            set(&mut s, "bailingmoe", &[BAILINGMOE_PATTERN]);
            s.clean_spaces = false;
        }
        "grok-2" => {
            set(&mut s, "grok-2", &[QWEN2_PATTERN]);
            s.clean_spaces = false;
        }
        _ => return None,
    }
    Some(s)
}

/// One compiled step of a pre-tokenizer.
enum Step {
    Gpt2,
    /// Llama 3's splitter; `max_digits` is 3 for Llama 3 and 1 for Qwen 2 (whose pattern differs
    /// only in `\p{N}` versus `\p{N}{1,3}`).
    Llama3 {
        max_digits: usize,
    },
    /// A general pattern over the collapsed text.
    Collapsed(Regex),
    /// A pattern without category classes, over the text with non-ASCII whitespace replaced by
    /// U+000B (what llama.cpp's `std::wregex` path sees).
    Plain(Regex),
}

/// A compiled pre-tokenizer: splits text into words, as code point lengths.
pub(crate) struct PreTokenizer {
    steps: Vec<Step>,
}

/// Marker characters standing for non-ASCII code points in collapsed text (one per category).
fn marker(category: u16) -> char {
    let i = match category {
        Flags::NUMBER => 1,
        Flags::LETTER => 2,
        Flags::PUNCTUATION => 3,
        Flags::ACCENT_MARK => 4,
        Flags::SYMBOL => 5,
        _ => 0,
    };
    char::from_u32(0xE000 + i).expect("private use area")
}

const CATEGORY_CLASSES: &[(&str, u16)] = &[
    (r"\p{N}", Flags::NUMBER),
    (r"\p{L}", Flags::LETTER),
    (r"\p{P}", Flags::PUNCTUATION),
    (r"\p{M}", Flags::ACCENT_MARK),
    (r"\p{S}", Flags::SYMBOL),
    (r"\p{Lu}", Flags::LETTER),
    (r"\p{Ll}", Flags::LETTER),
    (r"\p{Lt}", Flags::LETTER),
    (r"\p{Lm}", Flags::LETTER),
    (r"\p{Lo}", Flags::LETTER),
];

/// The ASCII members llama.cpp gives each category class.
fn ascii_members(category: u16) -> &'static str {
    match category {
        Flags::NUMBER => "0-9",
        Flags::LETTER => "A-Za-z",
        Flags::PUNCTUATION => r"!-#%-*,-/:-;?-@\[-\]_\{\}",
        Flags::ACCENT_MARK => "",
        Flags::SYMBOL => r"\$\+<->\^`\|~",
        _ => "",
    }
}

fn uses_categories(pattern: &str) -> bool {
    CATEGORY_CLASSES.iter().any(|(p, _)| pattern.contains(p))
}

/// Rewrites category classes into marker-plus-ASCII classes, tracking `[...]` the way llama.cpp
/// does (classes do not nest in these patterns).
fn collapse_pattern(pattern: &str) -> String {
    let b = pattern.as_bytes();
    let mut out = String::with_capacity(pattern.len() * 2);
    let mut inside = false;
    let mut i = 0;
    while i < b.len() {
        let escaped = i > 0 && b[i - 1] == b'\\';
        if b[i] == b'[' && !escaped {
            out.push('[');
            inside = true;
            i += 1;
            continue;
        }
        if inside && b[i] == b']' && !escaped {
            out.push(']');
            inside = false;
            i += 1;
            continue;
        }
        if b[i] == b'\\'
            && let Some(&(p, cat)) = CATEGORY_CLASSES
                .iter()
                .find(|(p, _)| pattern[i..].starts_with(p))
        {
            if !inside {
                out.push('[');
            }
            out.push_str(&format!("\\x{{{:X}}}", marker(cat) as u32));
            out.push_str(ascii_members(cat));
            if !inside {
                out.push(']');
            }
            i += p.len();
            continue;
        }
        // Copy one whole character (patterns may hold non-ASCII literals).
        let ch = pattern[i..].chars().next().expect("in bounds");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

impl PreTokenizer {
    pub fn new(patterns: &[&str]) -> Result<Self, String> {
        let mut steps = Vec::with_capacity(patterns.len());
        for &p in patterns {
            let step = if p == GPT2_PATTERN {
                Step::Gpt2
            } else if p == LLAMA3_PATTERN || p == LLAMA3_PATTERN_ORIG {
                Step::Llama3 { max_digits: 3 }
            } else if p == QWEN2_PATTERN {
                Step::Llama3 { max_digits: 1 }
            } else {
                let collapsed = uses_categories(p);
                let src = if collapsed {
                    collapse_pattern(p)
                } else {
                    p.to_string()
                };
                let re = fancy_regex::RegexBuilder::new(&src)
                    .backtrack_limit(10_000_000)
                    .build()
                    .map_err(|e| format!("pre-tokenizer pattern {p:?}: {e}"))?;
                if collapsed {
                    Step::Collapsed(re)
                } else {
                    Step::Plain(re)
                }
            };
            steps.push(step);
        }
        Ok(PreTokenizer { steps })
    }

    /// Forces the general regex engine even where a hand-written splitter exists (tests compare
    /// the two).
    #[cfg(test)]
    pub fn new_regex_only(patterns: &[&str]) -> Self {
        let steps = patterns
            .iter()
            .map(|p| {
                let re = Regex::new(&collapse_pattern(p)).expect("valid");
                if uses_categories(p) {
                    Step::Collapsed(re)
                } else {
                    Step::Plain(re)
                }
            })
            .collect();
        PreTokenizer { steps }
    }

    /// Splits `cpts` into words; returns their lengths in code points (summing to `cpts.len()`).
    pub fn split(&self, cpts: &[char]) -> Vec<usize> {
        let mut offsets = if cpts.is_empty() {
            Vec::new()
        } else {
            vec![cpts.len()]
        };
        let mut collapsed: Option<(String, Vec<usize>)> = None;
        let mut plain: Option<(String, Vec<usize>)> = None;
        for step in &self.steps {
            offsets = match step {
                Step::Gpt2 => split_gpt2(cpts, &offsets),
                Step::Llama3 { max_digits } => split_llama3(cpts, &offsets, *max_digits),
                Step::Collapsed(re) => {
                    let (hay, pos) = collapsed.get_or_insert_with(|| haystack(cpts, true));
                    split_regex(re, hay, pos, &offsets)
                }
                Step::Plain(re) => {
                    let (hay, pos) = plain.get_or_insert_with(|| haystack(cpts, false));
                    split_regex(re, hay, pos, &offsets)
                }
            };
        }
        offsets
    }
}

/// The text a regex step searches, and the byte position of each code point in it (plus the end).
fn haystack(cpts: &[char], collapse: bool) -> (String, Vec<usize>) {
    let mut s = String::with_capacity(cpts.len() + cpts.len() / 2);
    let mut pos = Vec::with_capacity(cpts.len() + 1);
    for &c in cpts {
        pos.push(s.len());
        if (c as u32) < 0x80 {
            s.push(c);
            continue;
        }
        let f = flags(c);
        if f.is_whitespace() {
            s.push('\u{0B}');
        } else if collapse {
            s.push(marker(f.category()));
        } else {
            s.push(c);
        }
    }
    pos.push(s.len());
    (s, pos)
}

fn split_regex(re: &Regex, hay: &str, pos: &[usize], offsets: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(offsets.len());
    let cp_at = |byte: usize| pos.partition_point(|&p| p < byte);
    let mut start = 0;
    for &len in offsets {
        let (b0, b1) = (pos[start], pos[start + len]);
        let piece = &hay[b0..b1];
        let mut last = start;
        for m in re.find_iter(piece) {
            // A pattern that exhausts its backtracking budget leaves the rest of the piece whole.
            let Ok(m) = m else { break };
            if m.start() == m.end() {
                continue;
            }
            let (ms, me) = (cp_at(b0 + m.start()), cp_at(b0 + m.end()));
            if ms > last {
                out.push(ms - last);
            }
            out.push(me - ms);
            last = me;
        }
        if start + len > last {
            out.push(start + len - last);
        }
        start += len;
    }
    out
}

/// Walks one piece of text with llama.cpp's bounds convention: outside the piece, characters are
/// `None` and flags are empty.
struct Cursor<'a> {
    cpts: &'a [char],
    ini: usize,
    end: usize,
}

impl Cursor<'_> {
    #[inline]
    fn cpt(&self, p: usize) -> Option<char> {
        if self.ini <= p && p < self.end {
            Some(self.cpts[p])
        } else {
            None
        }
    }
    #[inline]
    fn flags(&self, p: usize) -> Flags {
        match self.cpt(p) {
            Some(c) => flags(c),
            None => Flags::NONE,
        }
    }
}

fn split_gpt2(cpts: &[char], offsets: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(offsets.len() + cpts.len() / 4);
    let mut start = 0;
    for &len in offsets {
        let c = Cursor {
            cpts,
            ini: start,
            end: start + len,
        };
        start += len;
        let mut prev_end = c.ini;
        let mut add = |end: usize, out: &mut Vec<usize>| -> usize {
            let n = end - prev_end;
            if n > 0 {
                out.push(n);
            }
            prev_end = end;
            n
        };
        let mut pos = c.ini;
        while pos < c.end {
            let cpt = c.cpt(pos).expect("in range");
            let f = c.flags(pos);
            // 's|'t|'re|'ve|'m|'ll|'d
            if cpt == '\'' && pos + 1 < c.end {
                let n1 = c.cpt(pos + 1);
                if matches!(n1, Some('s' | 't' | 'm' | 'd')) {
                    pos += add(pos + 2, &mut out);
                    continue;
                }
                if pos + 2 < c.end {
                    let n2 = c.cpt(pos + 2);
                    if matches!(
                        (n1, n2),
                        (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l'))
                    ) {
                        pos += add(pos + 3, &mut out);
                        continue;
                    }
                }
            }
            let space = cpt == ' ';
            let mut f2 = if space { c.flags(pos + 1) } else { f };
            // ' ?\p{L}+'
            if f2.is_letter() {
                pos += space as usize;
                while f2.is_letter() {
                    pos += 1;
                    f2 = c.flags(pos);
                }
                add(pos, &mut out);
                continue;
            }
            // ' ?\p{N}+'
            if f2.is_number() {
                pos += space as usize;
                while f2.is_number() {
                    pos += 1;
                    f2 = c.flags(pos);
                }
                add(pos, &mut out);
                continue;
            }
            // ' ?[^\s\p{L}\p{N}]+'
            let other =
                |f: Flags| !(f.is_whitespace() || f.is_letter() || f.is_number()) && f.any();
            if other(f2) {
                pos += space as usize;
                while other(f2) {
                    pos += 1;
                    f2 = c.flags(pos);
                }
                add(pos, &mut out);
                continue;
            }
            let mut n_ws = 0;
            while c.flags(pos + n_ws).is_whitespace() {
                n_ws += 1;
            }
            // '\s+(?!\S)'
            if n_ws > 1 && c.cpt(pos + n_ws).is_some() {
                pos += n_ws - 1;
                add(pos, &mut out);
                continue;
            }
            // '\s+'
            if n_ws > 0 {
                pos += n_ws;
                add(pos, &mut out);
                continue;
            }
            pos += 1;
            add(pos, &mut out);
        }
    }
    out
}

fn split_llama3(cpts: &[char], offsets: &[usize], max_digits: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(offsets.len() + cpts.len() / 4);
    let mut start = 0;
    let lower = |c: Option<char>| c.map(|c| c.to_ascii_lowercase());
    for &len in offsets {
        let c = Cursor {
            cpts,
            ini: start,
            end: start + len,
        };
        start += len;
        let mut prev_end = c.ini;
        let mut add = |end: usize, out: &mut Vec<usize>| -> usize {
            let n = end - prev_end;
            if n > 0 {
                out.push(n);
            }
            prev_end = end;
            n
        };
        let mut pos = c.ini;
        while pos < c.end {
            let cpt = c.cpt(pos).expect("in range");
            let f = c.flags(pos);
            // (?i:'s|'t|'re|'ve|'m|'ll|'d)
            if cpt == '\'' && pos + 1 < c.end {
                let n1 = lower(c.cpt(pos + 1));
                if matches!(n1, Some('s' | 't' | 'm' | 'd')) {
                    pos += add(pos + 2, &mut out);
                    continue;
                }
                if pos + 2 < c.end {
                    let n2 = lower(c.cpt(pos + 2));
                    if matches!(
                        (n1, n2),
                        (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l'))
                    ) {
                        pos += add(pos + 3, &mut out);
                        continue;
                    }
                }
            }
            // [^\r\n\p{L}\p{N}]?\p{L}+
            if !(cpt == '\r' || cpt == '\n' || f.is_number())
                && (f.is_letter() || c.flags(pos + 1).is_letter())
            {
                pos += 1;
                while c.flags(pos).is_letter() {
                    pos += 1;
                }
                add(pos, &mut out);
                continue;
            }
            // \p{N}{1,max}
            if f.is_number() {
                let mut ini = pos;
                while c.flags(pos).is_number() {
                    pos += 1;
                    if pos - ini >= max_digits {
                        add(pos, &mut out);
                        ini = pos;
                    }
                }
                add(pos, &mut out);
                continue;
            }
            // ' ?[^\s\p{L}\p{N}]+[\r\n]*' (llama.cpp tests the first character's own flags for
            // "inside the text", which only differs from testing the next one at the very end)
            let space = cpt == ' ';
            let mut f2 = if space { c.flags(pos + 1) } else { f };
            let other = |f: Flags| !(f.is_whitespace() || f.is_letter() || f.is_number());
            if other(f2) && f.any() {
                pos += space as usize;
                while other(f2) && f2.any() {
                    pos += 1;
                    f2 = c.flags(pos);
                }
                while matches!(c.cpt(pos), Some('\r' | '\n')) {
                    pos += 1;
                }
                add(pos, &mut out);
                continue;
            }
            let mut n_ws = 0;
            let mut last_rn = 0;
            while c.flags(pos + n_ws).is_whitespace() {
                if matches!(c.cpt(pos + n_ws), Some('\r' | '\n')) {
                    last_rn = pos + n_ws + 1;
                }
                n_ws += 1;
            }
            // \s*[\r\n]+
            if last_rn > 0 {
                pos = last_rn;
                add(pos, &mut out);
                continue;
            }
            // \s+(?!\S)
            if n_ws > 1 && c.cpt(pos + n_ws).is_some() {
                pos += n_ws - 1;
                add(pos, &mut out);
                continue;
            }
            // \s+
            if n_ws > 0 {
                pos += n_ws;
                add(pos, &mut out);
                continue;
            }
            pos += 1;
            add(pos, &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pt: &PreTokenizer, s: &str) -> Vec<String> {
        let cpts: Vec<char> = s.chars().collect();
        let mut at = 0;
        pt.split(&cpts)
            .into_iter()
            .map(|n| {
                let w: String = cpts[at..at + n].iter().collect();
                at += n;
                w
            })
            .collect()
    }

    #[test]
    fn gpt2_splits_like_the_regex() {
        let pt = PreTokenizer::new(&[GPT2_PATTERN]).unwrap();
        assert_eq!(
            words(&pt, "Hello world's  3.14 ok!!   end  "),
            [
                "Hello", " world", "'s", " ", " 3", ".", "14", " ok", "!!", "  ", " end", "  "
            ]
        );
    }

    #[test]
    fn llama3_groups_digits_by_three() {
        let pt = PreTokenizer::new(&[LLAMA3_PATTERN]).unwrap();
        assert_eq!(
            words(&pt, "I'VE 1234567 apples\n\n  x"),
            [
                "I", "'VE", " ", "123", "456", "7", " apples", "\n\n", " ", " x"
            ]
        );
    }

    #[test]
    fn symbol_class_includes_tilde_like_llama_cpp() {
        let spec = pre_spec("deepseek-v3").unwrap();
        let pt = PreTokenizer::new(&spec.patterns).unwrap();
        assert_eq!(words(&pt, " ~'(z 12345"), [" ~'(", "z", " ", "123", "45"]);
    }

    #[test]
    fn every_supported_pattern_compiles() {
        for pre in [
            "default",
            "llama3",
            "deepseek-llm",
            "deepseek-coder",
            "deepseek-v3",
            "falcon",
            "starcoder",
            "gpt-2",
            "qwen2",
            "qwen35",
            "bloom",
            "chatglm-bpe",
            "viking",
            "tekken",
            "chameleon",
            "gpt-4o",
            "tiny_aya",
            "seed-coder",
            "bailingmoe",
            "grok-2",
        ] {
            let spec = pre_spec(pre).unwrap();
            PreTokenizer::new(&spec.patterns).unwrap_or_else(|e| panic!("{pre}: {e}"));
            PreTokenizer::new_regex_only(&spec.patterns);
        }
        assert!(pre_spec("no-such-pre").is_none());
    }

    /// The hand-written splitters must agree with the general regex path on the same patterns.
    #[test]
    fn custom_splitters_match_regex_engine() {
        use proptest::prelude::*;
        let alphabet: Vec<char> =
            "aZé中 \t\n\r'sStTmMdDlLrRvVeE09٣½.,!?~$_-\u{3000}\u{85}\u{301}😀\u{E000}"
                .chars()
                .collect();
        let cases = [GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN];
        let fast: Vec<_> = cases
            .iter()
            .map(|p| PreTokenizer::new(&[p]).unwrap())
            .collect();
        let slow: Vec<_> = cases
            .iter()
            .map(|p| PreTokenizer::new_regex_only(&[p]))
            .collect();
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 3000,
            ..ProptestConfig::default()
        });
        runner
            .run(
                &proptest::collection::vec(0..alphabet.len(), 0..24),
                |idx| {
                    let s: String = idx.iter().map(|&i| alphabet[i]).collect();
                    for (i, p) in cases.iter().enumerate() {
                        prop_assert_eq!(
                            words(&fast[i], &s),
                            words(&slow[i], &s),
                            "pattern {} on {:?}",
                            p,
                            s
                        );
                    }
                    Ok(())
                },
            )
            .unwrap();
    }
}
