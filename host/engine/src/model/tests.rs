use std::path::PathBuf;

use super::*;
use crate::Session;
use crate::gguf::writer::GgufWriter;
use crate::gguf::{Value, ValueType};
use crate::kv::SeqCache;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn tiny_llama() -> Model {
    Model::load(
        fixture("tiny-llama-mixed.gguf"),
        &LoadOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Prefill rows go through the tiled gemm kernels and decode rows through vec_dot; both compute
/// the same integer sums but add the f32 block results in a different order, and in this random
/// 6-layer model a one-ulp difference can flip a later 8-bit activation rounding. So the two
/// paths agree to this bound (measured worst: 0.27), and on the winner wherever it is clear.
const PATH_TOLERANCE: f32 = 0.5;

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    let d = max_diff(got, want);
    assert!(d <= PATH_TOLERANCE, "{what}: logits differ by {d}");
    let top = crate::session::top_k(want, 2);
    if top[0].1 - top[1].1 > 2.0 * PATH_TOLERANCE {
        assert_eq!(
            crate::session::argmax(got),
            top[0].0,
            "{what}: different winner"
        );
    }
}

#[test]
fn hparams_come_from_metadata() {
    let m = tiny_llama();
    let hp = &m.hparams;
    assert_eq!(hp.arch, "llama");
    assert_eq!(
        (hp.n_embd, hp.n_layer, hp.n_head, hp.n_head_kv),
        (256, 6, 4, 2)
    );
    assert_eq!((hp.head_dim, hp.n_ff, hp.n_vocab), (64, 512, 32000));
    assert_eq!(hp.rope_base, 10000.0);
}

#[test]
fn batched_sequences_equal_separate_runs() {
    let m = tiny_llama();
    let a: Vec<u32> = vec![1, 450, 382, 2593, 295, 23615];
    let b: Vec<u32> = vec![1, 13, 29909];
    // Separately.
    let mut pool = m.new_kv_pool(64).unwrap();
    let (mut ca, mut cb) = (SeqCache::new(), SeqCache::new());
    let la = m
        .forward(
            &mut pool,
            &mut [SeqInput {
                tokens: &a,
                cache: &mut ca,
                logits: LogitsWanted::Last,
            }],
        )
        .unwrap();
    let lb = m
        .forward(
            &mut pool,
            &mut [SeqInput {
                tokens: &b,
                cache: &mut cb,
                logits: LogitsWanted::Last,
            }],
        )
        .unwrap();
    // Together, in one pass over a fresh pool.
    let mut pool2 = m.new_kv_pool(128).unwrap();
    let (mut ca2, mut cb2) = (SeqCache::new(), SeqCache::new());
    let both = m
        .forward(
            &mut pool2,
            &mut [
                SeqInput {
                    tokens: &a,
                    cache: &mut ca2,
                    logits: LogitsWanted::Last,
                },
                SeqInput {
                    tokens: &b,
                    cache: &mut cb2,
                    logits: LogitsWanted::Last,
                },
            ],
        )
        .unwrap();
    let v = m.hparams.n_vocab;
    assert_eq!(both.len(), 2 * v);
    // Activation quantization is per token row, so batching changes nothing but summation order.
    assert!(
        max_diff(&both[..v], &la) < 1e-3,
        "{}",
        max_diff(&both[..v], &la)
    );
    assert!(max_diff(&both[v..], &lb) < 1e-3);
    // A decode step of one sequence next to a prefill of the other.
    let next = [29901u32];
    let step_alone = m
        .forward(
            &mut pool,
            &mut [SeqInput {
                tokens: &next,
                cache: &mut cb,
                logits: LogitsWanted::Last,
            }],
        )
        .unwrap();
    let mut cc = SeqCache::new();
    let mixed = m
        .forward(
            &mut pool2,
            &mut [
                SeqInput {
                    tokens: &a,
                    cache: &mut cc,
                    logits: LogitsWanted::None,
                },
                SeqInput {
                    tokens: &next,
                    cache: &mut cb2,
                    logits: LogitsWanted::Last,
                },
            ],
        )
        .unwrap();
    assert_eq!(mixed.len(), v);
    assert_close(&mixed, &step_alone, "decode beside a prefill");
    assert_eq!(cc.len(), a.len());
    assert_eq!(cb2.len(), b.len() + 1);
}

#[test]
fn prefill_in_one_batch_equals_token_by_token() {
    let m = tiny_llama();
    let toks: Vec<u32> = vec![1, 450, 382, 2593, 295, 23615, 338, 5982];
    let mut s1 = Session::new(&m, 16).unwrap();
    let all = s1.feed_all_logits(&toks).unwrap();
    let mut s2 = Session::new(&m, 16).unwrap();
    let v = m.hparams.n_vocab;
    for (i, &t) in toks.iter().enumerate() {
        let l = s2.feed(&[t]).unwrap();
        assert_close(&l, &all[i * v..(i + 1) * v], &format!("position {i}"));
    }
}

#[test]
fn decode_over_a_long_context_equals_the_batch() {
    // Long enough that each decode step reads its keys and values over many pages (runs of
    // 32 slots) and spreads its heads over the threads, and tiny-llama's 2 kv heads of 2 query
    // heads each go through the grouped attention kernels.
    let m = tiny_llama();
    let n = 520;
    let toks: Vec<u32> = (0..n as u32).map(|i| 1 + (i * 7919) % 3000).collect();
    let mut batch = Session::new(&m, n).unwrap();
    let all = batch.feed_all_logits(&toks).unwrap();
    let mut steps = Session::new(&m, n).unwrap();
    steps.feed(&toks[..n - 8]).unwrap();
    let v = m.hparams.n_vocab;
    for i in n - 8..n {
        let l = steps.feed(&toks[i..=i]).unwrap();
        assert_close(&l, &all[i * v..(i + 1) * v], &format!("position {i}"));
    }
}

#[test]
fn truncate_then_refeed_reproduces_logits() {
    let m = tiny_llama();
    let toks: Vec<u32> = vec![1, 450, 382, 2593, 295];
    let mut s = Session::new(&m, 16).unwrap();
    let first = s.feed(&toks).unwrap();
    s.truncate(3);
    assert_eq!(s.len(), 3);
    let again = s.feed(&toks[3..]).unwrap();
    assert!(max_diff(&first, &again) < 1e-3);
}

#[test]
fn bad_tokens_and_full_context_are_errors_and_change_nothing() {
    let m = tiny_llama();
    let mut pool = m.new_kv_pool(40).unwrap();
    let mut c = SeqCache::new();
    let e = m
        .forward(
            &mut pool,
            &mut [SeqInput {
                tokens: &[1, 99_999],
                cache: &mut c,
                logits: LogitsWanted::Last,
            }],
        )
        .unwrap_err();
    assert!(matches!(e, Error::BadToken { token: 99_999, .. }), "{e}");
    assert!(c.is_empty());
    let long = vec![5u32; 65];
    let free = pool.free_pages();
    let e = m
        .forward(
            &mut pool,
            &mut [SeqInput {
                tokens: &long,
                cache: &mut c,
                logits: LogitsWanted::Last,
            }],
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::Kv(crate::kv::KvError::OutOfPages { .. })),
        "{e}"
    );
    assert_eq!(pool.free_pages(), free);
    assert!(c.is_empty());
}

fn minimal_gguf(arch: &str, with_tensors: bool) -> GgufFile {
    minimal_gguf_with(arch, with_tensors, &[])
}

fn minimal_gguf_with(arch: &str, with_tensors: bool, extra: &[(&str, Value)]) -> GgufFile {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String(arch.into()));
    for (k, v) in [
        ("context_length", 64u32),
        ("embedding_length", 32),
        ("block_count", 1),
        ("feed_forward_length", 64),
        ("attention.head_count", 2),
    ] {
        w.set(format!("{arch}.{k}"), Value::U32(v));
    }
    w.set(
        format!("{arch}.attention.layer_norm_rms_epsilon"),
        Value::F32(1e-5),
    );
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(
            ValueType::String,
            (0..8).map(|i| Value::String(format!("t{i}"))).collect(),
        ),
    );
    for (k, v) in extra {
        w.set(format!("{arch}.{k}"), v.clone());
    }
    if with_tensors {
        w.add_tensor(
            "token_embd.weight",
            crate::quant::GgmlType::F32,
            &[32, 8],
            crate::gguf::writer::TensorData::F32(vec![0.5; 256]),
        );
    }
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    GgufFile::from_bytes(out).unwrap()
}

#[test]
fn unknown_architecture_is_named() {
    let e = Model::from_gguf(minimal_gguf("mamba9", false), &LoadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("mamba9"), "{e}");
    assert!(e.to_string().contains("supported"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let e = Model::from_gguf(minimal_gguf("llama", true), &LoadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("blk.0.attn_norm.weight"), "{e}");
}

#[test]
fn missing_hyperparameter_is_named() {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("qwen2".into()));
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    let e =
        Model::from_gguf(GgufFile::from_bytes(out).unwrap(), &LoadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("qwen2."), "{e}");
}

/// Found by fuzzing: hyperparameters that size allocations or overflow products are refused
/// up front instead of aborting the process.
#[test]
fn absurd_hyperparameters_are_refused() {
    let cases: [(&str, Value); 4] = [
        ("block_count", Value::U32(u32::MAX)),
        ("attention.key_length", Value::U64(1 << 62)),
        ("feed_forward_length", Value::U32(0)),
        ("embedding_length", Value::U64(u64::MAX)),
    ];
    for (key, value) in cases {
        for arch in ["llama", "qwen2", "gemma3"] {
            let f = minimal_gguf_with(arch, true, &[(key, value.clone())]);
            let e = Model::from_gguf(f, &LoadOptions::default()).unwrap_err();
            assert!(matches!(e, Error::BadModel(_)), "{arch} {key}: {e}");
        }
    }
}

#[test]
fn a_long_feed_goes_in_passes_and_an_error_takes_them_all_back() {
    use crate::session::MAX_PASS_TOKENS;
    let m = tiny_llama();
    let n = (MAX_PASS_TOKENS + 8).min(m.hparams.n_ctx_train);
    assert!(
        n > MAX_PASS_TOKENS,
        "the fixture's context is too short for two passes"
    );
    let toks: Vec<u32> = (0..n as u32).map(|i| 1 + (i * 7919) % 3000).collect();
    let v = m.hparams.n_vocab;
    // Two passes (512 + 8) against one pass of each part fed by hand: the same logits.
    let mut a = Session::new(&m, n).unwrap();
    let all = a.feed_all_logits(&toks).unwrap();
    assert_eq!(all.len(), n * v);
    let mut b = Session::new(&m, n).unwrap();
    let first = b.feed_all_logits(&toks[..MAX_PASS_TOKENS]).unwrap();
    let rest = b.feed_all_logits(&toks[MAX_PASS_TOKENS..]).unwrap();
    assert_eq!(&all[..first.len()], &first[..]);
    assert_eq!(&all[first.len()..], &rest[..]);
    let mut c = Session::new(&m, n).unwrap();
    let last = c.feed(&toks).unwrap();
    // (Only the last row's logits: one output row takes the gemv kernels, not the gemm.)
    assert_close(&last, &all[(n - 1) * v..], "feed against feed_all_logits");
    // A bad token in the second pass: an error, and the first pass taken back.
    let mut bad = toks.clone();
    bad[n - 1] = u32::MAX;
    let mut d = Session::new(&m, n + 3).unwrap();
    d.feed(&toks[..3]).unwrap();
    assert!(d.feed(&bad).is_err());
    assert_eq!(d.len(), 3, "the first pass was not taken back");
    let again = d.feed(&toks[3..]).unwrap();
    assert_close(&again, &last, "after the error");
}
