//! A single sequence with its own KV pool: the simplest way to drive a model (CLI `eval`, `bench`,
//! tests). The serving engine batches many sequences over one shared pool instead.

use crate::Error;
use crate::kv::{KvPool, SeqCache};
use crate::model::{LogitsWanted, Model, SeqInput};

/// Most tokens a session hands the model in one forward pass (llama.cpp's default `ubatch`): a
/// longer prompt goes in passes of this many, so activation memory stays that of 512 rows however
/// long the prompt (a 8,192-token prompt in one pass would hold ~280 MiB of activations for a
/// 270M model). The passes' results are the same as one pass's: every product's rows are
/// computed independently of the batch, and attention reads the earlier passes' keys and values
/// from the same f16 cache.
pub const MAX_PASS_TOKENS: usize = 512;

pub struct Session<'m> {
    model: &'m Model,
    pool: KvPool,
    seq: SeqCache,
}

impl<'m> Session<'m> {
    /// A session able to hold up to `max_tokens` positions (prompt plus generation); fails if
    /// the backend cannot make that much KV storage.
    pub fn new(model: &'m Model, max_tokens: usize) -> Result<Self, Error> {
        let max_tokens = max_tokens.min(model.hparams.n_ctx_train);
        Ok(Session {
            model,
            pool: model.new_kv_pool(max_tokens)?,
            seq: SeqCache::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.seq.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seq.is_empty()
    }

    /// Appends `tokens` (in passes of at most [`MAX_PASS_TOKENS`]); returns the logits after the
    /// last one. On error the session is as it was before the call.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, Error> {
        self.run(tokens, LogitsWanted::Last)
    }

    /// Appends `tokens`; returns logits for every one of them ([n, n_vocab]). On error the
    /// session is as it was before the call.
    pub fn feed_all_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, Error> {
        self.run(tokens, LogitsWanted::All)
    }

    fn run(&mut self, tokens: &[u32], logits: LogitsWanted) -> Result<Vec<f32>, Error> {
        if tokens.len() <= MAX_PASS_TOKENS {
            return self.pass(tokens, logits);
        }
        let start = self.seq.len();
        let mut out = Vec::new();
        let n = tokens.len().div_ceil(MAX_PASS_TOKENS);
        for (i, chunk) in tokens.chunks(MAX_PASS_TOKENS).enumerate() {
            let want = match logits {
                LogitsWanted::Last if i + 1 < n => LogitsWanted::None,
                w => w,
            };
            match self.pass(chunk, want) {
                Ok(l) => out.extend_from_slice(&l),
                Err(e) => {
                    // Earlier passes advanced the sequence: take them back.
                    self.truncate(start);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    fn pass(&mut self, tokens: &[u32], logits: LogitsWanted) -> Result<Vec<f32>, Error> {
        let mut inputs = [SeqInput {
            tokens,
            cache: &mut self.seq,
            logits,
        }];
        self.model.forward(&mut self.pool, &mut inputs)
    }

    /// Forgets everything from position `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.pool.truncate(&mut self.seq, len);
    }

    pub fn reset(&mut self) {
        self.pool.release(&mut self.seq);
    }
}

/// Index of the largest value (the first one on ties, as llama.cpp's greedy sampler).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The `k` largest (index, value) pairs, best first.
pub fn top_k(v: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    let k = k.min(v.len());
    if k == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(k - 1, |&a, &b| v[b as usize].total_cmp(&v[a as usize]));
    idx.truncate(k);
    idx.sort_by(|&a, &b| v[b as usize].total_cmp(&v[a as usize]).then(a.cmp(&b)));
    idx.into_iter().map(|i| (i, v[i as usize])).collect()
}
