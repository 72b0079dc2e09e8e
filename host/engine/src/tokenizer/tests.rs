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

/// The vocabularies the bounded-encode checks run on: the fixtures plus Gemma when present.
fn all_vocabs() -> Vec<&'static Tokenizer> {
    let mut v = vec![vocab("llama-spm"), vocab("gpt-2"), vocab("qwen2")];
    v.extend(gemma());
    v
}

#[test]
fn max_token_bytes_is_a_lower_bound_for_real_vocabularies() {
    for tok in all_vocabs() {
        let m = tok.max_token_bytes();
        assert!(m < 1024, "{:?}: no finite bound ({m})", tok.pre_family());
        let longest = (0..tok.n_vocab() as u32)
            .map(|i| tok.token_text(i).len())
            .max()
            .unwrap();
        assert_eq!(m, longest);
    }
}

#[test]
fn encode_bounded_rejects_up_front_without_work() {
    let text = "word ".repeat(200_000);
    let polls = std::sync::atomic::AtomicUsize::new(0);
    let stop = || {
        polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        false
    };
    for tok in all_vocabs() {
        let lower = text.len().div_ceil(tok.max_token_bytes());
        let budget = EncodeBudget {
            max_tokens: Some(lower - 1),
            should_stop: Some(&stop),
        };
        assert_eq!(
            tok.encode_bounded(&text, false, false, &budget),
            Err(EncodeError::TooManyTokens { limit: lower - 1 })
        );
    }
    assert_eq!(polls.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn encode_bounded_stops_early_and_polls_regularly() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let text = "Hello world, this is a sentence. ".repeat(8_000);
    for tok in all_vocabs() {
        let polls = AtomicUsize::new(0);
        let stop = || {
            polls.fetch_add(1, Ordering::Relaxed);
            false
        };
        let full = tok
            .encode_bounded(
                &text,
                true,
                false,
                &EncodeBudget {
                    max_tokens: None,
                    should_stop: Some(&stop),
                },
            )
            .unwrap();
        assert_eq!(full, tok.encode(&text, true, false));
        let full_polls = polls.swap(0, Ordering::Relaxed);
        // At least one poll per POLL_EVERY units, and every byte is at least one unit.
        assert!(full_polls >= text.len() / POLL_EVERY, "{full_polls} polls");

        // Exactly enough room succeeds; one token less fails.
        let exact = EncodeBudget {
            max_tokens: Some(full.len()),
            should_stop: None,
        };
        assert_eq!(
            tok.encode_bounded(&text, true, false, &exact).unwrap(),
            full
        );
        let short = EncodeBudget {
            max_tokens: Some(full.len() - 1),
            should_stop: None,
        };
        assert_eq!(
            tok.encode_bounded(&text, true, false, &short),
            Err(EncodeError::TooManyTokens {
                limit: full.len() - 1
            })
        );

        // A limit far below the result (but above the byte bound) stops long before the end
        // where tokens come out as the work goes (byte-level BPE, word by word; SentencePiece
        // merges a fragment between special tokens as a whole, so it stops at their ends).
        let lower = text.len().div_ceil(tok.max_token_bytes());
        let budget = EncodeBudget {
            max_tokens: Some(lower + 10),
            should_stop: Some(&stop),
        };
        if tok.kind() == VocabKind::ByteLevel {
            assert!(full.len() > 4 * (lower + 10));
            assert!(matches!(
                tok.encode_bounded(&text, true, false, &budget),
                Err(EncodeError::TooManyTokens { .. })
            ));
            let early = polls.swap(0, Ordering::Relaxed);
            assert!(early * 2 < full_polls, "{early} of {full_polls} polls");
        }

        // A stop request ends the work at the next poll.
        let left = AtomicUsize::new(3);
        let stop_soon = || left.fetch_sub(1, Ordering::Relaxed) <= 1;
        let budget = EncodeBudget {
            max_tokens: None,
            should_stop: Some(&stop_soon),
        };
        assert_eq!(
            tok.encode_bounded(&text, true, false, &budget),
            Err(EncodeError::Stopped)
        );
    }
}

#[test]
fn encode_bounded_agrees_with_encode() {
    use proptest::prelude::*;
    let pieces = [
        "a",
        "b",
        "the",
        " ",
        "  ",
        "\n",
        "\n\n",
        "\t",
        "é",
        "東京",
        "🦙",
        "<|im_start|>",
        "<|im_end|>",
        "</s>",
        "<s>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<eos>",
        "1",
        "123",
        ",",
        ".",
        "'s",
        "\u{3000}",
        "\r\n",
    ];
    let vocabs = all_vocabs();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 300,
        ..ProptestConfig::default()
    });
    runner
        .run(
            &(
                proptest::collection::vec(0..pieces.len(), 0..40),
                any::<bool>(),
                any::<bool>(),
                0usize..60,
            ),
            |(idx, add_special, parse_special, limit)| {
                let text: String = idx.iter().map(|&i| pieces[i]).collect();
                for tok in &vocabs {
                    let want = tok.encode(&text, add_special, parse_special);
                    let lower = text.len().div_ceil(tok.max_token_bytes());
                    prop_assert!(want.len() >= lower, "{text:?}: {} < {lower}", want.len());
                    let got = tok.encode_bounded(
                        &text,
                        add_special,
                        parse_special,
                        &EncodeBudget {
                            max_tokens: Some(limit),
                            should_stop: None,
                        },
                    );
                    if want.len() <= limit {
                        prop_assert_eq!(got, Ok(want));
                    } else {
                        prop_assert_eq!(got, Err(EncodeError::TooManyTokens { limit }));
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}

/// The streamed partition's fragments, collected.
fn streamed(tok: &Tokenizer, text: &str, parse_special: bool) -> (Vec<Frag>, usize) {
    let mut frags = Vec::new();
    let mut meter = Meter::new(None);
    let peak = tok
        .partition(text, parse_special, &mut meter, &mut |f, _| {
            frags.push(f);
            Ok(())
        })
        .unwrap();
    (frags, peak)
}

#[test]
fn streamed_partition_equals_llama_cpp_partition() {
    use proptest::prelude::*;
    let pieces = [
        "a",
        " ",
        "  ",
        "\n",
        "\n\n",
        "\n\n\n",
        "\t",
        "\t\t",
        "<start_of_turn>",
        "<end_of_turn>",
        "<eos>",
        "<|im_start|>",
        "<|im_end|>",
        "</s>",
        "<s>",
        "<unk>",
        "<mask>",
        "é",
        "<b>",
        "</b>",
        "<table>",
        "<0x0A>",
    ];
    let vocabs = all_vocabs();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 300,
        ..ProptestConfig::default()
    });
    runner
        .run(
            &(
                proptest::collection::vec(0..pieces.len(), 0..60),
                any::<bool>(),
            ),
            |(idx, parse_special)| {
                let text: String = idx.iter().map(|&i| pieces[i]).collect();
                for tok in &vocabs {
                    let want = tok.partition_reference(&text, parse_special);
                    prop_assert_eq!(streamed(tok, &text, parse_special).0, want);
                }
                Ok(())
            },
        )
        .unwrap();
}

/// Issue 11: 15 MiB of whitespace made the partition keep every overlapping match of Gemma's
/// whitespace tokens (~250 bytes per input byte). Its working memory is now a flag per special
/// token and a stack bounded by the number of special tokens, whatever the input's length.
#[test]
fn partition_memory_does_not_grow_with_the_input() {
    let Some(g) = gemma() else { return };
    let unit = " \n\t \n\n  \t\t\n\n\n        \n<start_of_turn>";
    let n_specials = g.specials.len();
    let mut peaks = Vec::new();
    for reps in [1_000, 30_000] {
        let text = unit.repeat(reps);
        let (frags, peak) = streamed(g, &text, true);
        assert!(frags.len() > reps, "the whitespace tokens cut the text");
        // Three entries per special token that occurs: continuation, token, next piece.
        assert!(peak <= 3 * n_specials + 1, "{peak}");
        peaks.push(peak);
        let ws = " \n\t".repeat(reps * 10);
        let (_, peak) = streamed(g, &ws, false);
        peaks.push(peak);
    }
    assert_eq!(
        peaks[0], peaks[2],
        "the stack's peak does not depend on the length"
    );
    assert_eq!(peaks[1], peaks[3]);
    assert!(peaks.iter().all(|&p| p < 400), "{peaks:?}");
    // And the tokens are llama.cpp's.
    let text = unit.repeat(200);
    let want = g.partition_reference(&text, true);
    assert_eq!(streamed(g, &text, true).0, want);
}

/// A small SentencePiece vocabulary: `<unk> <s> </s>`, the 256 byte tokens (when `bytes`), `▁`
/// and `a`, under the model name `name`.
fn tiny_spm(name: &str, bytes: bool) -> Tokenizer {
    use crate::gguf::Value as GValue;
    use crate::gguf::writer::{GgufWriter, f32_array, i32_array, string_array};
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    if bytes {
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        types.extend([6; 256]);
    }
    tokens.extend(["\u{2581}".to_string(), "a".to_string()]);
    types.extend([1, 1]);
    let mut w = GgufWriter::new();
    w.set("general.name", GValue::String(name.into()))
        .set("tokenizer.ggml.model", GValue::String("llama".into()))
        .set("tokenizer.ggml.tokens", string_array(&tokens))
        .set("tokenizer.ggml.scores", f32_array(&vec![0.0; tokens.len()]))
        .set("tokenizer.ggml.token_type", i32_array(&types));
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    Tokenizer::from_gguf(&GgufFile::from_bytes(out).unwrap()).unwrap()
}

#[test]
fn no_byte_bound_where_tokens_swallow_or_drop_input() {
    // Phi-3's special tokens strip the whitespace after them, so no byte bound holds; the same
    // vocabulary under another name keeps it. Limits are honoured exactly either way.
    let phi = tiny_spm("Phi-3-mini", true);
    assert_eq!(phi.max_token_bytes(), usize::MAX);
    let plain = tiny_spm("tiny", true);
    assert_eq!(plain.max_token_bytes(), "<0x00>".len());
    let text = format!("a</s>{}a", " ".repeat(100));
    for tok in [&phi, &plain] {
        let ids = tok.encode(&text, true, true);
        for limit in [0, 1, ids.len() - 1, ids.len(), ids.len() + 5] {
            let got = tok.encode_bounded(
                &text,
                true,
                true,
                &EncodeBudget {
                    max_tokens: Some(limit),
                    should_stop: None,
                },
            );
            if ids.len() <= limit {
                assert_eq!(got.as_ref(), Ok(&ids));
            } else {
                assert_eq!(got, Err(EncodeError::TooManyTokens { limit }));
            }
        }
    }
    // The spaces after `</s>` went into the token on Phi-3.
    assert!(phi.encode(&text, false, true).len() < plain.encode(&text, false, true).len());
}
