//! Best-of-n: what only token-level control can do cheaply.
//!
//! The prompt is prefilled once; `n` candidates fork from it (their KV pages share the prompt's,
//! copy-on-write), each samples with its own seed, and the guest scores every candidate by the
//! mean log-probability of its tokens under the model. The most confident candidate wins and is
//! streamed to the caller. Candidates advance in lock-step so that a batching engine can run
//! their decode steps together.
//!
//! Input: an OpenAI chat.completions request; `n` (default 4, at most 16) is the number of
//! candidates. Output: a chat.completion with the winner, plus `"candidates"`: every text
//! with its score.

use realm_guest::openai::{ChatCompletion, ChatRequest, chat_prompt};
use realm_guest::{Model, SamplingParams, Session, TextDecoder, emit};
use serde_json::{Value, json};

struct Candidate {
    session: Session,
    params: SamplingParams,
    decoder: TextDecoder,
    text: String,
    tokens: u32,
    logprob: f32,
    finished: Option<&'static str>,
}

fn handle(req: ChatRequest) -> Result<Value, String> {
    let e = |e: realm_guest::Error| e.to_string();
    let n = req.n.unwrap_or(4);
    if !(1..=16).contains(&n) {
        return Err(format!("n must be in 1..=16, got {n}"));
    }
    let model = Model::open(req.model.as_deref().unwrap_or("")).map_err(e)?;
    let info = model.info();
    let base = req.sampling_params()?;
    let max_tokens = req.max_tokens();
    let stops = req.stop_strings();

    let prompt = chat_prompt(&model, &req).map_err(e)?;
    let root = model.new_session().map_err(e)?;
    root.feed(&prompt).map_err(e)?;

    let mut cands = Vec::new();
    for i in 0..n {
        let mut params = base.clone();
        // Distinct, reproducible draws per candidate.
        params.seed = Some(
            base.seed
                .unwrap_or(0x5eed)
                .wrapping_add(i as u64 * 0x9e37_79b9),
        );
        cands.push(Candidate {
            session: root.fork().map_err(e)?,
            params,
            decoder: TextDecoder::new(),
            text: String::new(),
            tokens: 0,
            logprob: 0.0,
            finished: None,
        });
    }
    drop(root);

    while cands.iter().any(|c| c.finished.is_none()) {
        for c in cands.iter_mut().filter(|c| c.finished.is_none()) {
            let tok = c.session.sample(&c.params, None).map_err(e)?;
            if info.special_tokens.is_eog(tok) {
                c.finished = Some("stop");
                continue;
            }
            c.logprob += c.session.logprob(tok).map_err(e)?;
            c.tokens += 1;
            c.text
                .push_str(&c.decoder.push(&model.token_bytes(tok).map_err(e)?));
            if let Some(at) = stops.iter().filter_map(|s| c.text.find(s.as_str())).min() {
                c.text.truncate(at);
                c.finished = Some("stop");
                continue;
            }
            if c.tokens >= max_tokens {
                c.finished = Some("length");
                continue;
            }
            c.session.feed(&[tok]).map_err(e)?;
        }
    }

    let score = |c: &Candidate| c.logprob / c.tokens.max(1) as f32;
    for c in &mut cands {
        let rest = c.decoder.finish();
        c.text.push_str(&rest);
    }
    let best = cands
        .iter()
        .enumerate()
        .max_by(|a, b| score(a.1).total_cmp(&score(b.1)))
        .map(|(i, _)| i)
        .expect("n >= 1");
    emit(&cands[best].text);

    let completion = ChatCompletion::new(
        &info.name,
        cands[best].text.clone(),
        cands[best].finished.unwrap_or("length"),
        prompt.len() as u32,
        cands.iter().map(|c| c.tokens).sum(),
    );
    let mut v = serde_json::to_value(completion).map_err(|e| e.to_string())?;
    v["candidates"] = cands
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"index": i, "text": c.text, "tokens": c.tokens, "mean_logprob": score(c), "finish_reason": c.finished})
        })
        .collect();
    v["best"] = json!(best);
    Ok(v)
}

realm_guest::export!(handle);
