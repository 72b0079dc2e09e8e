//! Turning logits into tokens: logit bias, token masks (grammar/JSON constraints plug in here),
//! repetition/presence/frequency penalties, top-k, top-p, min-p, temperature and a seeded draw,
//! in llama.cpp's order (`common_sampler`'s default chain: penalties → top-k → top-p → min-p →
//! temperature → dist). Temperature is applied last, so the top-p and min-p cut-offs are computed
//! on the model's own distribution, as llama.cpp does.
//!
//! Also: log-softmax top-k for `logprobs`, and [`StopMatcher`], which holds back streamed text
//! that might be the start of a stop string.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SampleError {
    #[error("empty logits")]
    EmptyLogits,
    #[error("token mask covers {mask} tokens but the logits have {logits}")]
    MaskSize { mask: usize, logits: usize },
    #[error("no token is allowed (the mask or logit bias bans every token)")]
    NothingAllowed,
    #[error("invalid sampling parameter: {0}")]
    BadParam(String),
}

/// Sampling settings. The defaults are llama.cpp's (`common_params_sampling`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct SamplingParams {
    /// `<= 0` means greedy (argmax after bias, mask and penalties).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 = off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 = off.
    pub min_p: f32,
    /// Divides positive logits and multiplies negative ones of recently seen tokens; 1 = off.
    pub repeat_penalty: f32,
    /// Subtracted once from the logit of every recently seen token (OpenAI semantics); 0 = off.
    pub presence_penalty: f32,
    /// Subtracted from a recently seen token's logit once per occurrence; 0 = off.
    pub frequency_penalty: f32,
    /// How many of the latest accepted tokens the penalties look at; 0 = penalties off.
    pub penalty_last_n: usize,
    /// Seed of the draw; `None` picks a random one (see [`Sampler::seed`]).
    pub seed: Option<u64>,
    /// Added to the logits before anything else; `-inf` bans a token.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            seed: None,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Always the most likely token (after bias, mask and penalties).
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 1,
            top_p: 1.0,
            min_p: 0.0,
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<(), SampleError> {
        let bad = |what: String| Err(SampleError::BadParam(what));
        if self.temperature.is_nan() {
            return bad("temperature is NaN".into());
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return bad(format!("top_p must be in [0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad(format!(
                "repeat_penalty must be positive, got {}",
                self.repeat_penalty
            ));
        }
        if !self.presence_penalty.is_finite() || !self.frequency_penalty.is_finite() {
            return bad("presence/frequency penalties must be finite".into());
        }
        if let Some((id, b)) = self.logit_bias.iter().find(|(_, b)| b.is_nan()) {
            return bad(format!("logit bias for token {id} is NaN ({b})"));
        }
        Ok(())
    }

    fn penalties_active(&self) -> bool {
        self.penalty_last_n > 0
            && (self.repeat_penalty != 1.0
                || self.presence_penalty != 0.0
                || self.frequency_penalty != 0.0)
    }
}

/// A set of allowed token ids (one bit per vocabulary entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenMask {
    bits: Vec<u64>,
    n_vocab: usize,
}

impl TokenMask {
    /// A mask allowing nothing.
    pub fn new(n_vocab: usize) -> Self {
        TokenMask {
            bits: vec![0; n_vocab.div_ceil(64)],
            n_vocab,
        }
    }

    pub fn from_ids(n_vocab: usize, ids: &[u32]) -> Self {
        let mut m = TokenMask::new(n_vocab);
        for &id in ids {
            m.allow(id);
        }
        m
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Ids at or past `n_vocab` are ignored: they can never be sampled anyway.
    pub fn allow(&mut self, id: u32) {
        let i = id as usize;
        if i < self.n_vocab {
            self.bits[i / 64] |= 1 << (i % 64);
        }
    }

    pub fn disallow(&mut self, id: u32) {
        let i = id as usize;
        if i < self.n_vocab {
            self.bits[i / 64] &= !(1 << (i % 64));
        }
    }

    pub fn allow_all(&mut self) {
        self.bits.fill(u64::MAX);
        let tail = self.n_vocab % 64;
        if tail != 0 {
            *self.bits.last_mut().unwrap() = (1u64 << tail) - 1;
        }
    }

    pub fn is_allowed(&self, id: u32) -> bool {
        let i = id as usize;
        i < self.n_vocab && self.bits[i / 64] >> (i % 64) & 1 == 1
    }

    pub fn count(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }
}

/// Draws tokens under one [`SamplingParams`], keeping the penalty history and the RNG state, so a
/// seed reproduces a whole generation.
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    // `new` cannot fail (the API others code against), so bad parameters surface on `sample`.
    invalid: Option<SampleError>,
    // ChaCha8 rather than `SmallRng`/`StdRng`: its output is specified and portable, so a seed
    // keeps reproducing the same text across platforms and dependency upgrades.
    rng: ChaCha8Rng,
    history: std::collections::VecDeque<u32>,
    // Reused between calls: a copy of the logits and the candidate list (262k entries for Gemma).
    work: Vec<f32>,
    cands: Vec<(u32, f32)>,
    counts: Vec<(u32, u32)>,
    /// `params.logit_bias` for this vocabulary: ids inside it, ascending, one entry per id (the
    /// biases of a repeated id summed); built on the first `sample`.
    bias: Option<(usize, Vec<(u32, f32)>)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Sampler {
            seed,
            invalid: params.validate().err(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            // The history grows with the tokens accepted, never to `penalty_last_n` up front: a
            // guest may ask for `u32::MAX` of them.
            history: std::collections::VecDeque::new(),
            params,
            work: Vec::new(),
            cands: Vec::new(),
            counts: Vec::new(),
            bias: None,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed in use (the drawn one when the params had none).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Records a token in the penalty history (generated tokens; prompt tokens too if the caller
    /// wants them penalised, as llama.cpp does).
    pub fn accept(&mut self, token: u32) {
        let n = self.params.penalty_last_n;
        if n == 0 {
            return;
        }
        if self.history.len() == n {
            self.history.pop_front();
        }
        self.history.push_back(token);
    }

    /// Forgets the penalty history (the RNG state is kept).
    pub fn reset_history(&mut self) {
        self.history.clear();
    }

    /// Picks the next token. Bias, mask and penalties first, then (unless greedy) top-k, top-p,
    /// min-p, temperature and a draw from what is left.
    pub fn sample(&mut self, logits: &[f32], mask: Option<&TokenMask>) -> Result<u32, SampleError> {
        if let Some(e) = &self.invalid {
            return Err(e.clone());
        }
        if logits.is_empty() {
            return Err(SampleError::EmptyLogits);
        }
        if let Some(m) = mask {
            if m.n_vocab() != logits.len() {
                return Err(SampleError::MaskSize {
                    mask: m.n_vocab(),
                    logits: logits.len(),
                });
            }
            if m.is_empty() {
                return Err(SampleError::NothingAllowed);
            }
        }
        self.prepare(logits, mask);
        if self.params.temperature <= 0.0 {
            return self.greedy();
        }
        self.filter()?;
        let inv_t = 1.0 / self.params.temperature;
        if inv_t.is_infinite() {
            // A temperature so small that 1/t overflows is greedy in all but name.
            return Ok(first_max(&self.cands));
        }
        let max = self
            .cands
            .iter()
            .map(|c| c.1)
            .fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0f64;
        for c in self.cands.iter_mut() {
            let w = (((c.1 - max) * inv_t) as f64).exp();
            c.1 = w as f32;
            total += w;
        }
        let target = self.rng.random::<f64>() * total;
        let mut acc = 0f64;
        for c in &self.cands {
            acc += c.1 as f64;
            if acc > target {
                return Ok(c.0);
            }
        }
        // Rounding left `target` just past the last sum: the last candidate with any weight.
        Ok(self
            .cands
            .iter()
            .rev()
            .find(|c| c.1 > 0.0)
            .unwrap_or(&self.cands[0])
            .0)
    }

    /// Fills `cands` with the survivors of top-k, top-p and min-p (logits before temperature).
    fn filter(&mut self) -> Result<(), SampleError> {
        self.cands.clear();
        self.cands.extend(
            self.work
                .iter()
                .enumerate()
                .filter(|(_, l)| **l > f32::NEG_INFINITY)
                .map(|(i, &l)| (i as u32, l)),
        );
        if self.cands.is_empty() {
            return Err(SampleError::NothingAllowed);
        }
        let p = &self.params;
        // Higher logit first; the lower id on ties, so survivor sets are deterministic.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < self.cands.len() {
            // A partial select: with top-k set, the 262k-entry vocabulary is never fully sorted.
            self.cands.select_nth_unstable_by(p.top_k - 1, order);
            self.cands.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            self.cands.sort_unstable_by(order);
            top_p(&mut self.cands, p.top_p);
        }
        if p.min_p > 0.0 {
            min_p(&mut self.cands, p.min_p);
        }
        Ok(())
    }

    /// Fills `work` with the logits after bias, mask and penalties (banned tokens at `-inf`).
    fn prepare(&mut self, logits: &[f32], mask: Option<&TokenMask>) {
        self.work.clear();
        self.work.extend_from_slice(logits);
        let work = &mut self.work;
        for l in work.iter_mut() {
            // NaN would poison every comparison; +inf every softmax.
            if l.is_nan() {
                *l = f32::NEG_INFINITY;
            } else if *l == f32::INFINITY {
                *l = f32::MAX;
            }
        }
        let n_vocab = work.len();
        if self.bias.as_ref().is_none_or(|b| b.0 != n_vocab) {
            self.bias = Some((n_vocab, compact_bias(&self.params.logit_bias, n_vocab)));
        }
        let bias = &self.bias.as_ref().expect("just built").1;
        for &(id, b) in bias {
            let l = &mut work[id as usize];
            *l += b;
            // `-inf + inf` and `x + inf` must not reach the comparisons either.
            if l.is_nan() {
                *l = f32::NEG_INFINITY;
            } else if *l == f32::INFINITY {
                *l = f32::MAX;
            }
        }
        if let Some(m) = mask {
            for (w, l) in m.bits.iter().zip(work.chunks_mut(64)) {
                if *w == u64::MAX {
                    continue;
                }
                for (j, x) in l.iter_mut().enumerate() {
                    if w >> j & 1 == 0 {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
        if self.params.penalties_active() && !self.history.is_empty() {
            // Occurrences per token by sorting (the history holds at most as many tokens as
            // were accepted, and a linear search per token would be quadratic in it).
            self.counts.clear();
            self.counts.extend(self.history.iter().map(|&t| (t, 1)));
            self.counts.sort_unstable_by_key(|c| c.0);
            self.counts.dedup_by(|next, first| {
                if next.0 == first.0 {
                    first.1 += 1;
                    true
                } else {
                    false
                }
            });
            let p = &self.params;
            for &(t, n) in &self.counts {
                let Some(l) = work.get_mut(t as usize) else {
                    continue;
                };
                if *l == f32::NEG_INFINITY {
                    continue;
                }
                if *l <= 0.0 {
                    *l *= p.repeat_penalty;
                } else {
                    *l /= p.repeat_penalty;
                }
                *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
            }
        }
    }

    fn greedy(&self) -> Result<u32, SampleError> {
        let mut best = None;
        let mut best_l = f32::NEG_INFINITY;
        for (i, &l) in self.work.iter().enumerate() {
            if l > best_l {
                best_l = l;
                best = Some(i as u32);
            }
        }
        best.ok_or(SampleError::NothingAllowed)
    }

    /// The `k` most likely tokens with their log-probabilities (log-softmax of the raw logits),
    /// best first.
    pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if logits.is_empty() || max == f32::NEG_INFINITY || max.is_nan() {
            return Vec::new();
        }
        let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let lse = max as f64 + sum.ln();
        crate::session::top_k(logits, k)
            .into_iter()
            .map(|(i, l)| (i, (l as f64 - lse) as f32))
            .collect()
    }
}

/// The biases that apply to a vocabulary of `n_vocab` tokens: ids outside it dropped, one
/// entry per id (repeated ids' biases summed in list order), ascending, so its size is bounded by
/// the vocabulary however long the caller's list is.
fn compact_bias(list: &[(u32, f32)], n_vocab: usize) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = list
        .iter()
        .copied()
        .filter(|&(id, _)| (id as usize) < n_vocab)
        .collect();
    v.sort_by_key(|b| b.0);
    v.dedup_by(|next, first| {
        if next.0 == first.0 {
            first.1 += next.1;
            true
        } else {
            false
        }
    });
    v
}

fn first_max(cands: &[(u32, f32)]) -> u32 {
    let mut best = cands[0];
    for &c in &cands[1..] {
        if c.1 > best.1 || (c.1 == best.1 && c.0 < best.0) {
            best = c;
        }
    }
    best.0
}

/// `cands` sorted best first. Keeps the shortest prefix whose probability reaches `p` (the token
/// that crosses the line stays, as in llama.cpp).
fn top_p(cands: &mut Vec<(u32, f32)>, p: f32) {
    let max = cands[0].1;
    let total: f64 = cands.iter().map(|c| ((c.1 - max) as f64).exp()).sum();
    let mut acc = 0f64;
    let target = p as f64 * total;
    for (i, c) in cands.iter().enumerate() {
        acc += ((c.1 - max) as f64).exp();
        if acc >= target {
            cands.truncate(i + 1);
            return;
        }
    }
}

/// Keeps tokens whose probability is at least `p` times the best one's, compared in logit space
/// (`logit >= max + ln p`) as llama.cpp does; the best token always stays.
fn min_p(cands: &mut Vec<(u32, f32)>, p: f32) {
    let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let threshold = max + p.ln();
    cands.retain(|c| c.1 >= threshold);
}

/// What [`StopMatcher::push`] lets through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutcome {
    /// Text that is safe to stream now.
    pub emit: String,
    /// A stop string was found; `emit` holds what preceded it and generation should end.
    pub stopped: bool,
}

/// Finds stop strings in streamed text. Text that could still turn out to be the start of a stop
/// string is held back until it is ruled out; on a match the text before it is emitted and the
/// stop string itself never is. When two stops could match, the first complete one found wins
/// (generation ends as soon as any stop is certain), and among those the earliest in the text.
///
/// Each stop string is followed by a Knuth-Morris-Pratt automaton fed the streamed bytes once, so
/// a push costs O(stops × pushed bytes) and the memory is O(total stop length), however long or
/// numerous the (client-supplied) stop strings are.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<Stop>,
    /// Text streamed and not yet emitted is `pending[from..]`; the emitted prefix is dropped
    /// once it is the larger part, so a push never moves the held text.
    pending: String,
    from: usize,
    stopped: bool,
}

#[derive(Debug, Clone)]
struct Stop {
    text: Box<[u8]>,
    /// KMP failure function: `fail[i]` is the length of the longest proper prefix of
    /// `text[..=i]` that is also its suffix.
    fail: Box<[u32]>,
    /// Length of the longest prefix of `text` that ends the text streamed so far.
    state: usize,
}

impl Stop {
    fn new(text: &str) -> Stop {
        let t = text.as_bytes();
        let mut fail = vec![0u32; t.len()];
        let mut k = 0usize;
        for i in 1..t.len() {
            while k > 0 && t[i] != t[k] {
                k = fail[k - 1] as usize;
            }
            if t[i] == t[k] {
                k += 1;
            }
            fail[i] = k as u32;
        }
        Stop {
            text: t.into(),
            fail: fail.into(),
            state: 0,
        }
    }

    /// Feeds one byte; true when the whole stop string has just been seen.
    #[inline]
    fn step(&mut self, b: u8) -> bool {
        let mut k = self.state;
        if k == self.text.len() {
            k = self.fail[k - 1] as usize;
        }
        while k > 0 && self.text[k] != b {
            k = self.fail[k - 1] as usize;
        }
        if self.text[k] == b {
            k += 1;
        }
        self.state = k;
        k == self.text.len()
    }
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| Stop::new(s))
                .collect(),
            pending: String::new(),
            from: 0,
            stopped: false,
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome {
                emit: String::new(),
                stopped: true,
            };
        }
        let base = self.pending.len();
        self.pending.push_str(text);
        // The earliest start among the stops completed by this text. What is pending always
        // covers every stop's partial match (see the hold below), so starts fall inside it.
        let mut first: Option<usize> = None;
        for stop in &mut self.stops {
            for (j, &b) in text.as_bytes().iter().enumerate() {
                if stop.step(b) {
                    let start = (base + j + 1).saturating_sub(stop.text.len());
                    first = Some(first.map_or(start, |f| f.min(start)));
                    break;
                }
            }
        }
        if let Some(pos) = first {
            self.stopped = true;
            let emit = self.pending[self.from.min(pos)..pos].to_string();
            self.pending.clear();
            self.from = 0;
            return StopOutcome {
                emit,
                stopped: true,
            };
        }
        // Hold the longest suffix that is a proper prefix of some stop string. It starts on a
        // character boundary: it begins with a stop string's first byte.
        let held = self.stops.iter().map(|s| s.state).max().unwrap_or(0);
        let upto = self.pending.len() - held;
        let emit = self.pending[self.from..upto].to_string();
        self.from = upto;
        if self.from > 4096 && self.from * 2 > self.pending.len() {
            self.pending.drain(..self.from);
            self.from = 0;
        }
        StopOutcome {
            emit,
            stopped: false,
        }
    }

    /// The end of generation: whatever was held back is text after all.
    pub fn flush(&mut self) -> String {
        for s in &mut self.stops {
            s.state = 0;
        }
        let from = std::mem::take(&mut self.from);
        let mut rest = std::mem::take(&mut self.pending);
        if self.stopped {
            return String::new();
        }
        rest.drain(..from);
        rest
    }
}

#[cfg(test)]
mod tests;
