//! Golden tests against llama.cpp's tokenizer outputs, plus behaviour tests.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::*;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load(path: &Path) -> Tokenizer {
    let f = GgufFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Tokenizer::from_gguf(&f).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn vocab(name: &str) -> &'static Tokenizer {
    static SPM: OnceLock<Tokenizer> = OnceLock::new();
    static GPT2: OnceLock<Tokenizer> = OnceLock::new();
    static QWEN2: OnceLock<Tokenizer> = OnceLock::new();
    let cell = match name {
        "llama-spm" => &SPM,
        "gpt-2" => &GPT2,
        "qwen2" => &QWEN2,
        _ => panic!("no fixture {name}"),
    };
    cell.get_or_init(|| {
        load(&repo_root().join(format!("tests/fixtures/tokenizer/ggml-vocab-{name}.gguf")))
    })
}

fn gemma_path() -> PathBuf {
    repo_root().join("models/gemma-3-270m-q4_k_m.gguf")
}

/// The real Gemma 3 vocabulary (262k tokens), or `None` (with a note) when the model is absent.
fn gemma() -> Option<&'static Tokenizer> {
    static G: OnceLock<Option<Tokenizer>> = OnceLock::new();
    G.get_or_init(|| {
        let p = gemma_path();
        if p.exists() {
            Some(load(&p))
        } else {
            eprintln!(
                "note: {} is missing (scripts/fetch-model.sh fetches it); skipping Gemma checks",
                p.display()
            );
            None
        }
    })
    .as_ref()
}

/// llama.cpp's `test-tokenizer-0` vectors: each input string (no BOS/EOS, no special parsing)
/// must give exactly the ids in the `.out` file.
fn check_vocab_vectors(name: &str) {
    let tok = vocab(name);
    let dir = repo_root().join("tests/fixtures/tokenizer");
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    let inputs: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let expected: Vec<&str> = out.split('\n').collect();
    assert_eq!(inputs.len(), expected.len(), "{name}: .inp/.out sizes");
    assert!(inputs.len() > 40, "{name}: too few vectors");
    let mut failures = Vec::new();
    for (text, want) in inputs.iter().zip(&expected) {
        let want: Vec<u32> = want
            .split_whitespace()
            .map(|t| t.parse().unwrap())
            .collect();
        let got = tok.encode(text, false, false);
        if got != want {
            failures.push(format!("{text:?}\n  want {want:?}\n  got  {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {} of {} vectors differ:\n{}",
        failures.len(),
        inputs.len(),
        failures.join("\n")
    );
}

#[test]
fn llama_spm_vectors() {
    check_vocab_vectors("llama-spm");
}

#[test]
fn gpt2_vectors() {
    check_vocab_vectors("gpt-2");
}

#[test]
fn qwen2_vectors() {
    check_vocab_vectors("qwen2");
}

#[derive(serde::Deserialize)]
struct RefLine {
    prompt: String,
    prompt_tokens: Vec<u32>,
}

/// Every `prompt_tokens` in the llama.cpp reference files (tokenized with BOS as the model asks
/// and special tokens parsed, as `llama-cli` does).
fn check_refs(stem: &str, tok: &Tokenizer) {
    let path = repo_root().join(format!("tests/fixtures/refs/{stem}.jsonl"));
    let text = std::fs::read_to_string(&path).unwrap();
    let mut n = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let r: RefLine = serde_json::from_str(line).unwrap();
        let got = tok.encode(&r.prompt, true, true);
        assert_eq!(got, r.prompt_tokens, "{stem}: {:?}", r.prompt);
        n += 1;
    }
    assert!(n > 0, "{stem}: no reference lines");
}

#[test]
fn reference_prompts_tiny_models() {
    for stem in ["tiny-llama-mixed", "tiny-qwen2-gpt2vocab"] {
        let tok = load(&repo_root().join(format!("tests/fixtures/models/{stem}.gguf")));
        check_refs(stem, &tok);
    }
}

#[test]
fn reference_prompts_gemma() {
    let Some(tok) = gemma() else { return };
    check_refs("gemma-3-270m-q4_k_m", tok);
}

#[test]
fn metadata_and_defaults() {
    let spm = vocab("llama-spm");
    assert_eq!(spm.kind(), VocabKind::SentencePiece);
    assert_eq!(
        (spm.bos(), spm.eos(), spm.unk()),
        (Some(1), Some(2), Some(0))
    );
    assert!(spm.add_bos() && !spm.add_eos() && spm.add_space_prefix());
    assert_eq!(spm.token_type(3 + 0x41), Some(TokenType::Byte));
    assert_eq!(spm.encode("Hello", true, false)[0], 1);

    let gpt2 = vocab("gpt-2");
    assert_eq!(gpt2.kind(), VocabKind::ByteLevel);
    assert_eq!((gpt2.pre(), gpt2.pre_family()), ("gpt-2", "gpt2"));
    assert!(
        !gpt2.add_bos(),
        "byte-level BPE does not add BOS unless told to"
    );
    assert_eq!(gpt2.n_merges(), 50000);
    assert!(gpt2.is_eog(50256), "<|endoftext|> ends generation");
    assert!(gpt2.warnings().is_empty(), "{:?}", gpt2.warnings());

    let qwen = vocab("qwen2");
    let im_end = qwen.find_token("<|im_end|>").unwrap();
    assert!(qwen.is_eog(im_end) && qwen.is_eog(151643));
    assert!(qwen.is_special(im_end));
    assert_eq!(qwen.eos(), Some(151643));
    assert!(qwen.eog_tokens().windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn gemma_vocabulary() {
    let Some(g) = gemma() else { return };
    assert_eq!(g.n_vocab(), 262144);
    assert_eq!(g.kind(), VocabKind::SentencePiece);
    assert!(!g.add_space_prefix());
    assert_eq!((g.bos(), g.eos()), (Some(2), Some(1)));
    let eot = g.find_token("<end_of_turn>").unwrap();
    assert!(g.is_eog(eot) && g.is_eog(1));
    assert_eq!(g.eot(), Some(eot));
    // Chat markup is one token each when parsed, plain text otherwise.
    let sot = g.find_token("<start_of_turn>").unwrap();
    let parsed = g.encode("<start_of_turn>user\nHi<end_of_turn>", false, true);
    assert_eq!(parsed.first(), Some(&sot));
    assert_eq!(parsed.last(), Some(&eot));
    let plain = g.encode("<start_of_turn>user", false, false);
    assert!(!plain.contains(&sot) && plain.len() > 2);
    assert_eq!(g.decode(&plain), "<start_of_turn>user");
    assert_eq!(g.decode(&parsed), "user\nHi");
    assert_eq!(
        g.detokenize(&parsed, true),
        "<start_of_turn>user\nHi<end_of_turn>"
    );
    let text = "Emoji 🦙 naïve café — 東京 ok\n\n  done";
    assert_eq!(g.decode(&g.encode(text, false, false)), text);
}

#[test]
fn special_parsing_on_and_off() {
    let qwen = vocab("qwen2");
    let im_start = qwen.find_token("<|im_start|>").unwrap();
    let im_end = qwen.find_token("<|im_end|>").unwrap();
    let text = "<|im_start|>user\nhello<|im_end|>";
    let on = qwen.encode(text, false, true);
    assert_eq!(on[0], im_start);
    assert_eq!(*on.last().unwrap(), im_end);
    assert_eq!(
        on[1..on.len() - 1],
        qwen.encode("user\nhello", false, false)[..]
    );
    let off = qwen.encode(text, false, false);
    assert!(!off.contains(&im_start) && !off.contains(&im_end));
    assert_eq!(qwen.decode(&off), text);
    // Control tokens render only when asked.
    assert_eq!(qwen.decode(&on), "user\nhello");
    assert_eq!(qwen.detokenize(&on, true), text);
    assert!(qwen.piece(im_end).is_empty());
    assert_eq!(qwen.token_to_piece(im_end, true), b"<|im_end|>");

    // SentencePiece: text after a special token gets the space prefix again.
    let spm = vocab("llama-spm");
    let ids = spm.encode("a</s>b", false, true);
    assert_eq!(ids[1], 2);
    assert_eq!(
        ids,
        [
            spm.encode("a", false, false),
            vec![2],
            spm.encode("b", false, false)
        ]
        .concat()
    );
    assert!(!spm.encode("a</s>b", false, false).contains(&2));
}

#[test]
fn round_trip_byte_level() {
    let texts = [
        "Hello, world! How's it going?",
        "naïve café — Ünïcödé, 東京タワー, Ελληνικά, русский, العربية, हिन्दी, 한국어",
        "emoji 🦙🚀😶‍🌫️ ✅ and flags 🇫🇷",
        "  leading and trailing spaces  \n\t tabs\r\n crlf \u{3000} ideographic",
        "numbers 1234567890 3.14159 ١٢٣ ½",
        "code: fn main() { println!(\"{}\", x >> 2); } // <tag attr='v'>",
        "\u{0}\u{1}\u{7f}\u{ad}\u{200b}\u{feff}\u{E000}\u{10FFFF}",
        "",
    ];
    for name in ["qwen2", "gpt-2"] {
        let tok = vocab(name);
        for t in texts {
            let ids = tok.encode(t, false, false);
            let back = tok.decode(&ids);
            if name == "gpt-2" {
                // GPT-2's clean_spaces rewrites " ," and friends; compare without them.
                let mut raw = Vec::new();
                for &id in &ids {
                    raw.extend_from_slice(tok.token_to_piece(id, false));
                }
                assert_eq!(String::from_utf8(raw).unwrap(), t, "{name}");
            } else {
                assert_eq!(back, t, "{name}");
            }
        }
    }
}

#[test]
fn clean_spaces_matches_llama_cpp() {
    let gpt2 = vocab("gpt-2");
    let ids = gpt2.encode("Hello , world ! I 'm here . It ' s", false, false);
    assert_eq!(gpt2.decode(&ids), "Hello, world! I'm here. It's");
}

#[test]
fn spm_leading_space_is_dropped_only_at_the_start() {
    let spm = vocab("llama-spm");
    let ids = spm.encode("Hello world", false, false);
    assert_eq!(spm.decode(&ids), "Hello world");
    // After BOS the first piece keeps its space, as in llama.cpp's detokenizer.
    let with_bos = spm.encode("Hello world", true, false);
    assert_eq!(spm.decode(&with_bos), " Hello world");
}

#[test]
fn stream_decoder_holds_partial_characters() {
    let spm = vocab("llama-spm");
    // "🦙" is not in the Llama 2 vocabulary: it becomes four byte tokens.
    let ids = spm.encode("🦙!", false, false);
    let byte_ids: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&i| spm.token_type(i) == Some(TokenType::Byte))
        .collect();
    assert_eq!(byte_ids.len(), 4, "{ids:?}");
    let mut d = StreamDecoder::new();
    let mut chunks = Vec::new();
    for &id in &ids {
        chunks.push(d.push(spm, id));
    }
    chunks.push(d.finish());
    assert_eq!(chunks.concat(), " 🦙!");
    assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
    // The character appears whole with its last byte, never before.
    let at = chunks.iter().position(|c| c.contains('🦙')).unwrap();
    assert!(chunks[..at].concat().trim().is_empty());

    // Bytes that can never form a character are replaced, not held forever.
    let mut d = StreamDecoder::new();
    let bad = spm.find_token("<0xFF>").unwrap();
    assert_eq!(d.push(spm, bad), "\u{FFFD}");
    let lead = spm.find_token("<0xE6>").unwrap();
    assert_eq!(d.push(spm, lead), "");
    assert_eq!(d.pending(), 1);
    assert_eq!(d.finish(), "\u{FFFD}");
}

#[test]
fn long_inputs_without_spaces_stay_fast_and_exact() {
    // Quadratic merging would make these take minutes.
    let text: String = "abcdefghij".repeat(20_000);
    for tok in [vocab("llama-spm"), vocab("qwen2"), vocab("gpt-2")] {
        let ids = tok.encode(&text, false, false);
        assert!(ids.len() < text.len() / 2);
        let back = tok.decode(&ids);
        assert_eq!(back.trim_start(), text);
    }
    let digits = "7".repeat(100_000);
    let ids = vocab("qwen2").encode(&digits, false, false);
    assert_eq!(ids.len(), 100_000, "Qwen 2 splits digits one by one");
}

#[test]
fn clean_spaces_edge_cases() {
    let run = |s: &str| {
        let mut v = s.as_bytes().to_vec();
        clean_spaces(&mut v);
        String::from_utf8(v).unwrap()
    };
    assert_eq!(run(""), "");
    assert_eq!(run(" ?"), "?");
    assert_eq!(run("a ' b"), "a'b");
    assert_eq!(run("a 't b 'd c 'll"), "a 't b 'd c 'll");
    assert_eq!(run("we 're you 've"), "we're you've");
}
