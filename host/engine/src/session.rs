//! A single sequence with its own KV pool: the simplest way to drive a model (CLI `eval`, `bench`,
//! tests). The serving engine batches many sequences over one shared pool instead.

use crate::Error;
use crate::kv::{KvPool, SeqCache};
use crate::model::{LogitsWanted, Model, SeqInput};

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

    /// Appends `tokens` in one batch; returns the logits after the last one.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, Error> {
        self.run(tokens, LogitsWanted::Last)
    }

    /// Appends `tokens` in one batch; returns logits for every one of them ([n, n_vocab]).
    pub fn feed_all_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, Error> {
        self.run(tokens, LogitsWanted::All)
    }

    fn run(&mut self, tokens: &[u32], logits: LogitsWanted) -> Result<Vec<f32>, Error> {
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
