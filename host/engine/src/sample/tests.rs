use super::*;

/// Logits whose softmax is exactly `probs`.
fn logits_of(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

fn plain(temperature: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed: Some(7),
        ..Default::default()
    }
}

/// The survivors of top-k/top-p/min-p, as a sorted id list.
fn survivors(params: SamplingParams, logits: &[f32]) -> Vec<u32> {
    let mut s = Sampler::new(params);
    s.prepare(logits, None);
    s.filter().unwrap();
    let mut ids: Vec<u32> = s.cands.iter().map(|c| c.0).collect();
    ids.sort();
    ids
}

fn counts(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<usize> {
    let mut c = vec![0; logits.len()];
    for _ in 0..n {
        c[s.sample(logits, None).unwrap() as usize] += 1;
    }
    c
}

/// Pearson's chi-square statistic of observed counts against expected probabilities.
fn chi_square(observed: &[usize], probs: &[f64]) -> f64 {
    let n: usize = observed.iter().sum();
    observed
        .iter()
        .zip(probs)
        .map(|(&o, &p)| {
            let e = p * n as f64;
            (o as f64 - e).powi(2) / e
        })
        .sum()
}

#[test]
fn defaults_are_llama_cpp() {
    let p = SamplingParams::default();
    assert_eq!(
        (p.temperature, p.top_k, p.top_p, p.min_p),
        (0.8, 40, 0.95, 0.05)
    );
    assert_eq!((p.repeat_penalty, p.penalty_last_n), (1.0, 64));
    assert_eq!((p.presence_penalty, p.frequency_penalty), (0.0, 0.0));
    assert!(p.seed.is_none() && p.logit_bias.is_empty());
    // Missing fields take the defaults.
    let q: SamplingParams = serde_json::from_str(r#"{"temperature": 0.2, "seed": 3}"#).unwrap();
    assert_eq!(q.temperature, 0.2);
    assert_eq!(q.top_k, 40);
    assert_eq!(q.seed, Some(3));
}

#[test]
fn greedy_takes_first_maximum() {
    let logits = [1.0, 3.0, 2.0, 3.0];
    let mut s = Sampler::new(SamplingParams::greedy());
    assert_eq!(s.sample(&logits, None).unwrap(), 1);
    // Negative temperatures are greedy too, whatever the other filters say.
    let mut s = Sampler::new(SamplingParams {
        temperature: -1.0,
        top_k: 0,
        ..Default::default()
    });
    for _ in 0..10 {
        assert_eq!(s.sample(&logits, None).unwrap(), 1);
    }
}

#[test]
fn tiny_temperature_is_greedy_huge_is_uniform() {
    let logits = logits_of(&[0.1, 0.6, 0.3]);
    let mut s = Sampler::new(plain(1e-3));
    assert_eq!(counts(&mut s, &logits, 200), vec![0, 200, 0]);
    // Below f32's reciprocal range.
    let mut s = Sampler::new(plain(1e-45));
    assert_eq!(counts(&mut s, &logits, 20), vec![0, 20, 0]);

    let mut s = Sampler::new(plain(1e6));
    let c = counts(&mut s, &logits, 30_000);
    let chi = chi_square(&c, &[1.0 / 3.0; 3]);
    assert!(chi < 13.8, "chi-square {chi} for {c:?} (2 dof, p = 0.001)");
}

#[test]
fn draws_follow_the_softmax() {
    let probs = [0.5, 0.25, 0.125, 0.0625, 0.0625];
    let logits = logits_of(&probs);
    let mut s = Sampler::new(plain(1.0));
    let c = counts(&mut s, &logits, 40_000);
    let chi = chi_square(&c, &probs);
    assert!(chi < 18.47, "chi-square {chi} for {c:?} (4 dof, p = 0.001)");

    // Temperature 2 flattens: p_i ∝ p_i^(1/2).
    let flat: Vec<f64> = probs.iter().map(|p| p.sqrt()).collect();
    let z: f64 = flat.iter().sum();
    let flat: Vec<f64> = flat.iter().map(|p| p / z).collect();
    let mut s = Sampler::new(plain(2.0));
    let c = counts(&mut s, &logits, 40_000);
    let chi = chi_square(&c, &flat);
    assert!(chi < 18.47, "chi-square {chi} for {c:?} at T=2");
}

#[test]
fn top_k_survivors() {
    let logits = logits_of(&[0.05, 0.3, 0.1, 0.4, 0.15]);
    let p = |k| SamplingParams {
        top_k: k,
        ..plain(1.0)
    };
    assert_eq!(survivors(p(1), &logits), vec![3]);
    assert_eq!(survivors(p(2), &logits), vec![1, 3]);
    assert_eq!(survivors(p(4), &logits), vec![1, 2, 3, 4]);
    assert_eq!(survivors(p(0), &logits), vec![0, 1, 2, 3, 4]);
    assert_eq!(survivors(p(99), &logits), vec![0, 1, 2, 3, 4]);
    // Ties at the cut go to the lower id.
    assert_eq!(survivors(p(2), &[1.0, 2.0, 2.0, 2.0]), vec![1, 2]);
    let mut s = Sampler::new(p(1));
    assert_eq!(s.sample(&[1.0, 2.0, 2.0, 2.0], None).unwrap(), 1);
}

#[test]
fn top_p_survivors() {
    let logits = logits_of(&[0.05, 0.3, 0.1, 0.4, 0.15]);
    let p = |top_p| SamplingParams {
        top_p,
        ..plain(1.0)
    };
    // The token that crosses the line is kept.
    assert_eq!(survivors(p(0.1), &logits), vec![3]);
    assert_eq!(survivors(p(0.65), &logits), vec![1, 3]);
    assert_eq!(survivors(p(0.71), &logits), vec![1, 3, 4]);
    assert_eq!(survivors(p(0.9), &logits), vec![1, 2, 3, 4]);
    assert_eq!(survivors(p(0.0), &logits), vec![3]);
    // After top-k the probabilities are renormalised: the top 3 are .4/.85, .3/.85, .15/.85
    // = .47, .35, .18, so 0.8 needs two of them.
    let k3 = SamplingParams {
        top_k: 3,
        top_p: 0.8,
        ..plain(1.0)
    };
    assert_eq!(survivors(k3, &logits), vec![1, 3]);
}

#[test]
fn min_p_survivors() {
    let logits = logits_of(&[0.05, 0.3, 0.1, 0.4, 0.15]);
    let p = |min_p| SamplingParams {
        min_p,
        ..plain(1.0)
    };
    // Threshold 0.3 × 0.4 = 0.12.
    assert_eq!(survivors(p(0.3), &logits), vec![1, 3, 4]);
    // 0.2 × 0.4 = 0.08.
    assert_eq!(survivors(p(0.2), &logits), vec![1, 2, 3, 4]);
    assert_eq!(survivors(p(1.0), &logits), vec![3]);
    // The defaults together: top-k 40, top-p .95 (cumulative .5, .8, .92, .98: four stay),
    // min-p .05 (threshold .025: drops .02 as well).
    let defaults = SamplingParams {
        seed: Some(1),
        ..Default::default()
    };
    let logits = logits_of(&[0.5, 0.3, 0.12, 0.06, 0.02]);
    assert_eq!(survivors(defaults.clone(), &logits), vec![0, 1, 2, 3]);
    let mp = SamplingParams {
        min_p: 0.15,
        ..defaults
    };
    assert_eq!(survivors(mp, &logits), vec![0, 1, 2]);
}

#[test]
fn survivors_only_are_drawn() {
    let logits = logits_of(&[0.05, 0.3, 0.1, 0.4, 0.15]);
    let mut s = Sampler::new(SamplingParams {
        top_k: 3,
        min_p: 0.5,
        ..plain(1.0)
    });
    // top-3 = {3, 1, 4}; min-p 0.5 × 0.4 = 0.2 leaves {3, 1}, drawn in proportion 4:3.
    let c = counts(&mut s, &logits, 14_000);
    assert_eq!((c[0], c[2], c[4]), (0, 0, 0));
    let chi = chi_square(&[c[3], c[1]], &[4.0 / 7.0, 3.0 / 7.0]);
    assert!(chi < 10.83, "chi-square {chi} for {c:?}");
}

#[test]
fn penalties_math() {
    let logits = [2.0, -1.0, 0.5, 3.0];
    let mut s = Sampler::new(SamplingParams {
        repeat_penalty: 2.0,
        frequency_penalty: 0.1,
        presence_penalty: 0.5,
        penalty_last_n: 3,
        ..plain(1.0)
    });
    for t in [3, 0, 1, 0] {
        s.accept(t);
    }
    // The window holds the last 3: [0, 1, 0]; token 3 has left it.
    s.prepare(&logits, None);
    let expect = [
        2.0 / 2.0 - (2.0 * 0.1 + 0.5),
        -2.0 - (0.1 + 0.5), // -1 × 2
        0.5,
        3.0,
    ];
    for (a, b) in s.work.iter().zip(expect) {
        assert!((a - b).abs() < 1e-6, "{:?} vs {expect:?}", s.work);
    }
    // A repeat penalty alone turns the greedy choice.
    let mut g = Sampler::new(SamplingParams {
        repeat_penalty: 1.6,
        ..SamplingParams::greedy()
    });
    assert_eq!(g.sample(&[2.0, 1.5], None).unwrap(), 0);
    g.accept(0);
    assert_eq!(g.sample(&[2.0, 1.5], None).unwrap(), 1);
    // penalty_last_n = 0 turns penalties off.
    let mut off = Sampler::new(SamplingParams {
        repeat_penalty: 1.6,
        penalty_last_n: 0,
        ..SamplingParams::greedy()
    });
    off.accept(0);
    assert_eq!(off.sample(&[2.0, 1.5], None).unwrap(), 0);
    off.reset_history();
}

#[test]
fn logit_bias_and_bans() {
    let logits = [1.0, 3.0, 2.0];
    let mut s = Sampler::new(SamplingParams {
        logit_bias: vec![(1, f32::NEG_INFINITY), (0, 1.5), (99, 5.0)],
        ..SamplingParams::greedy()
    });
    assert_eq!(s.sample(&logits, None).unwrap(), 0);
    let mut s = Sampler::new(SamplingParams {
        logit_bias: vec![(1, f32::NEG_INFINITY)],
        ..plain(1.0)
    });
    let c = counts(&mut s, &logits, 2000);
    assert_eq!(c[1], 0);
    let mut all = Sampler::new(SamplingParams {
        logit_bias: (0..3).map(|i| (i, f32::NEG_INFINITY)).collect(),
        ..plain(1.0)
    });
    assert_eq!(all.sample(&logits, None), Err(SampleError::NothingAllowed));
    all.params.temperature = 0.0;
    assert_eq!(all.sample(&logits, None), Err(SampleError::NothingAllowed));
}

#[test]
fn mask() {
    let mut m = TokenMask::new(130);
    assert!(m.is_empty());
    m.allow_all();
    assert_eq!(m.count(), 130);
    assert!(m.is_allowed(129) && !m.is_allowed(130));
    m.disallow(5);
    assert!(!m.is_allowed(5) && m.is_allowed(4));
    let m = TokenMask::from_ids(130, &[2, 70, 500]);
    assert_eq!(m.count(), 2);

    let mut logits = vec![0.0f32; 130];
    logits[100] = 10.0;
    logits[70] = 1.0;
    let mut g = Sampler::new(SamplingParams::greedy());
    assert_eq!(g.sample(&logits, Some(&m)).unwrap(), 70);
    let mut s = Sampler::new(plain(1.0));
    for _ in 0..500 {
        let t = s.sample(&logits, Some(&m)).unwrap();
        assert!(t == 2 || t == 70);
    }
    assert_eq!(
        s.sample(&logits, Some(&TokenMask::new(130))),
        Err(SampleError::NothingAllowed)
    );
    assert_eq!(
        s.sample(&logits, Some(&TokenMask::new(64))),
        Err(SampleError::MaskSize {
            mask: 64,
            logits: 130
        })
    );
    // A mask whose only allowed token is banned by bias.
    let mut b = Sampler::new(SamplingParams {
        logit_bias: vec![(70, f32::NEG_INFINITY)],
        ..plain(1.0)
    });
    let only70 = TokenMask::from_ids(130, &[70]);
    assert_eq!(
        b.sample(&logits, Some(&only70)),
        Err(SampleError::NothingAllowed)
    );
}

#[test]
fn seed_reproduces_a_generation() {
    let logits: Vec<f32> = (0..1000)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
        .collect();
    let run = |seed| {
        let mut s = Sampler::new(SamplingParams {
            seed: Some(seed),
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            temperature: 1.5,
            ..Default::default()
        });
        (0..200)
            .map(|_| s.sample(&logits, None).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
    let s = Sampler::new(SamplingParams::default());
    let drawn = s.seed();
    let again = Sampler::new(SamplingParams {
        seed: Some(drawn),
        ..Default::default()
    });
    assert_eq!(again.seed(), drawn);
}

#[test]
fn seeded_draws_are_stable() {
    // ChaCha8 is specified, so these ids must not change across platforms or upgrades; if they do,
    // seeds users recorded no longer reproduce their text.
    let logits = logits_of(&[0.1, 0.2, 0.3, 0.4]);
    let mut s = Sampler::new(plain(1.0));
    let got: Vec<u32> = (0..12).map(|_| s.sample(&logits, None).unwrap()).collect();
    assert_eq!(got, STABLE_DRAWS);
}
const STABLE_DRAWS: [u32; 12] = [1, 1, 3, 3, 3, 2, 0, 3, 2, 3, 1, 2];

#[test]
fn bad_params_are_errors() {
    for p in [
        SamplingParams {
            top_p: 1.5,
            ..Default::default()
        },
        SamplingParams {
            min_p: -0.1,
            ..Default::default()
        },
        SamplingParams {
            repeat_penalty: 0.0,
            ..Default::default()
        },
        SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        },
    ] {
        let mut s = Sampler::new(p);
        assert!(matches!(
            s.sample(&[1.0, 2.0], None),
            Err(SampleError::BadParam(_))
        ));
    }
    let mut s = Sampler::new(SamplingParams::default());
    assert_eq!(s.sample(&[], None), Err(SampleError::EmptyLogits));
}

#[test]
fn nan_and_inf_logits() {
    let mut g = Sampler::new(SamplingParams::greedy());
    assert_eq!(g.sample(&[f32::NAN, 1.0, 0.5], None).unwrap(), 1);
    let mut s = Sampler::new(plain(1.0));
    for _ in 0..50 {
        assert_eq!(s.sample(&[0.0, f32::INFINITY, f32::NAN], None).unwrap(), 1);
    }
}

#[test]
fn large_vocab_top_k() {
    // Gemma-sized: the partial select must find the same survivors as a full sort.
    let n = 262_144;
    let logits: Vec<f32> = (0..n as u64)
        .map(|i| ((i.wrapping_mul(2654435761) % 100_003) as f32) / 1000.0)
        .collect();
    let mut sorted: Vec<u32> = (0..n as u32).collect();
    sorted.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    let mut want = sorted[..40].to_vec();
    want.sort();
    let params = SamplingParams {
        top_p: 1.0,
        min_p: 0.0,
        ..plain(1.0)
    };
    assert_eq!(
        survivors(
            SamplingParams {
                top_k: 40,
                ..params.clone()
            },
            &logits
        ),
        want
    );
    let mut s = Sampler::new(SamplingParams {
        top_k: 40,
        ..params
    });
    for _ in 0..20 {
        assert!(want.contains(&s.sample(&logits, None).unwrap()));
    }
}

#[test]
fn top_logprobs() {
    let probs = [0.1, 0.2, 0.3, 0.4];
    let logits: Vec<f32> = probs.iter().map(|p: &f64| p.ln() as f32 + 5.0).collect();
    let top = Sampler::top_logprobs(&logits, 2);
    assert_eq!(top.len(), 2);
    assert_eq!((top[0].0, top[1].0), (3, 2));
    assert!((top[0].1 - 0.4f32.ln()).abs() < 1e-5);
    assert!((top[1].1 - 0.3f32.ln()).abs() < 1e-5);
    assert_eq!(Sampler::top_logprobs(&logits, 10).len(), 4);
    assert!(Sampler::top_logprobs(&[], 3).is_empty());
}

fn stops(s: &[&str]) -> StopMatcher {
    StopMatcher::new(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>())
}

fn out(emit: &str, stopped: bool) -> StopOutcome {
    StopOutcome {
        emit: emit.into(),
        stopped,
    }
}

#[test]
fn stop_across_chunks() {
    let mut m = stops(&["</s>"]);
    assert_eq!(m.push("Hello <"), out("Hello ", false));
    assert_eq!(m.push("/s"), out("", false));
    assert_eq!(m.push(">tail"), out("", true));
    assert!(m.is_stopped());
    assert_eq!(m.push("more"), out("", true));
    assert_eq!(m.flush(), "");

    // A false alarm releases the held text.
    let mut m = stops(&["</s>"]);
    assert_eq!(m.push("a <"), out("a ", false));
    assert_eq!(m.push("/b"), out("</b", false));
    assert_eq!(m.push("<"), out("", false));
    assert_eq!(m.flush(), "<");

    // A match inside one chunk.
    let mut m = stops(&["STOP"]);
    assert_eq!(m.push("abcSTOPdef"), out("abc", true));
}

#[test]
fn overlapping_stops() {
    // "ab" completes first although "abcd" started at the same place.
    let mut m = stops(&["abcd", "ab"]);
    assert_eq!(m.push("xa"), out("x", false));
    assert_eq!(m.push("b"), out("", true));

    // Held back as long as the longer stop is possible, though the shorter one was ruled out.
    let mut m = stops(&["\nUser:", "\n\n"]);
    assert_eq!(m.push("Hi\n"), out("Hi", false));
    assert_eq!(m.push("Us"), out("", false));
    assert_eq!(m.push("er"), out("", false));
    assert_eq!(m.push("!"), out("\nUser!", false));
    assert_eq!(m.push("\n\n"), out("", true));

    // Both complete in one chunk: the earliest in the text wins.
    let mut m = stops(&["cd", "bcde"]);
    assert_eq!(m.push("abcdef"), out("a", true));

    // A suffix that is a prefix of a stop only from a later start.
    let mut m = stops(&["aab"]);
    assert_eq!(m.push("aaa"), out("a", false));
    assert_eq!(m.push("b"), out("", true));
}

#[test]
fn stop_matcher_edge_cases() {
    // No stops, or only empty ones: everything passes at once.
    let mut m = stops(&[""]);
    assert_eq!(m.push("abc"), out("abc", false));
    assert_eq!(m.flush(), "");
    // Multi-byte text is held and released on character boundaries.
    let mut m = stops(&["é!"]);
    assert_eq!(m.push("café"), out("caf", false));
    assert_eq!(m.push("?"), out("é?", false));
    assert_eq!(m.push("é"), out("", false));
    assert_eq!(m.push("!"), out("", true));
    let mut m = stops(&["日本"]);
    assert_eq!(m.push("日"), out("", false));
    assert_eq!(m.flush(), "日");
}

/// Issue 11: `penalty_last_n = u32::MAX` from a guest made `Sampler::new` reserve 16 GiB.
#[test]
fn absurd_sizes_are_bounded_by_what_is_used() {
    let n_vocab = 1000;
    let logits: Vec<f32> = (0..n_vocab).map(|i| (i % 17) as f32 * 0.1).collect();
    let mut biases: Vec<(u32, f32)> = (0..200_000u32).map(|i| (i, -0.5)).collect();
    biases.extend((0..100_000).map(|_| (3u32, 1.0)));
    biases.push((u32::MAX, f32::INFINITY));
    biases.push((5, f32::INFINITY));
    biases.push((5, f32::NEG_INFINITY));
    let params = SamplingParams {
        penalty_last_n: u32::MAX as usize,
        repeat_penalty: 1.3,
        frequency_penalty: 0.5,
        presence_penalty: 0.5,
        top_k: usize::MAX,
        logit_bias: biases,
        ..plain(0.9)
    };
    let mut s = Sampler::new(params);
    assert!(s.history.capacity() < 1024, "{}", s.history.capacity());
    for i in 0..5000u32 {
        let t = s.sample(&logits, None).unwrap();
        assert!((t as usize) < n_vocab && t != 5, "{t}");
        s.accept(t);
        s.accept(i % 7);
    }
    // The history holds what was accepted, nothing more; the bias list what the vocabulary has.
    assert_eq!(s.history.len(), 10_000);
    let bias = &s.bias.as_ref().unwrap().1;
    assert_eq!(bias.len(), n_vocab);
    assert_eq!(bias[3], (3, 100_000.0 - 0.5));
    // +inf - inf is no number: the token is banned, never NaN in the comparisons.
    assert!(bias[5].1.is_nan());
    s.prepare(&logits, None);
    assert_eq!(s.work[5], f32::NEG_INFINITY);
    assert!(s.counts.len() <= 7 + n_vocab);

    // Greedy with top_k past the vocabulary and a history of a million tokens.
    let mut g = Sampler::new(SamplingParams {
        penalty_last_n: usize::MAX,
        repeat_penalty: 2.0,
        top_k: usize::MAX,
        ..SamplingParams::greedy()
    });
    for i in 0..1_000_000u32 {
        g.accept(i % 999);
    }
    assert_eq!(g.history.len(), 1_000_000);
    let t = g.sample(&logits, None).unwrap();
    assert_eq!(t, 999, "every other token is penalised");
}

/// Stop strings come from clients: long ones, many ones and repetitive ones must not make a push
/// cost more than the bytes pushed times the number of stops, and matching must stay exact.
#[test]
fn stop_matcher_agrees_with_a_naive_search_on_hostile_stops() {
    use proptest::prelude::*;
    // A megabyte-long stop: the held text never grows past it and never becomes quadratic.
    let long = "ab".repeat(200_000) + "c";
    let mut m = StopMatcher::new(&[long.clone(), "abx".into()]);
    let mut emitted = 0;
    for _ in 0..300_000 {
        let o = m.push("ab");
        assert!(!o.stopped);
        emitted += o.emit.len();
        assert!(m.pending.len() - m.from < long.len());
    }
    assert_eq!(emitted, 2 * 300_000 - (long.len() - 1));
    let o = m.push("x");
    assert!(o.stopped);
    assert_eq!(o.emit.len(), long.len() - 1 - 2);

    // Against a naive reference on random streams over a tiny alphabet (many near matches).
    let naive = |stops: &[String], chunks: &[String]| -> (String, bool) {
        let all: String = chunks.concat();
        let stops: Vec<&String> = stops.iter().filter(|s| !s.is_empty()).collect();
        // The first chunk at whose end some stop is complete; the earliest start among those.
        let mut end = 0;
        for c in chunks {
            end += c.len();
            if let Some(pos) = stops
                .iter()
                .filter_map(|s| all[..end].find(s.as_str()))
                .min()
            {
                return (all[..pos].to_string(), true);
            }
        }
        (all, false)
    };
    let word = || proptest::string::string_regex("[ab]{0,4}").unwrap();
    proptest!(ProptestConfig::with_cases(500), |(
        stops_in in proptest::collection::vec(word(), 0..4),
        chunks in proptest::collection::vec(word(), 0..12),
    )| {
        let chunks: Vec<String> = chunks;
        let stops_in: Vec<String> = stops_in;
        let mut m = StopMatcher::new(&stops_in);
        let mut out = String::new();
        let mut stopped = false;
        for c in &chunks {
            let o = m.push(c);
            out.push_str(&o.emit);
            if o.stopped {
                stopped = true;
                break;
            }
        }
        if !stopped {
            out.push_str(&m.flush());
        }
        prop_assert_eq!((out, stopped), naive(&stops_in, &chunks));
    });
}
