//! The store data of one guest call and the host side of the `realm:llm` interfaces.

use std::sync::Arc;
use std::time::Duration;

use realm_engine::sample::{Sampler, SamplingParams, StopMatcher, TokenMask};
use realm_engine::sched::{SchedError, Sequence};
use realm_engine::template::ChatMessage;
use realm_engine::tokenizer::StreamDecoder;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{Store, StoreContextMut, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::limits::{CpuMeter, LimitHit, LimitKind, LimitTrap, Limiter};
use crate::{Guest, GuestError, Inner, InvokeContext, ModelEntry};

pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "guest",
        imports: { default: async | trappable },
        exports: { default: async },
        trappable_error_type: { "realm:llm/types.error" => super::HostError },
        with: {
            "realm:llm/llm.model": super::ModelRes,
            "realm:llm/llm.session": super::SessionRes,
        },
    });
}

use bindings::realm::llm::types::{
    self as wit, FinishReason, GenerateParams, Generation, ModelInfo as WitModelInfo,
    SpecialTokens, TokenLogprob,
};

/// Stderr kept per call, for the message of a trap (a Rust panic prints there).
const STDERR_CAPTURE: usize = 64 << 10;

/// A host call's failure: an error value for the guest, or a trap that ends the call.
pub enum HostError {
    Guest(wit::Error),
    Trap(wasmtime::Error),
}

impl From<wit::Error> for HostError {
    fn from(e: wit::Error) -> Self {
        HostError::Guest(e)
    }
}

impl From<SchedError> for HostError {
    fn from(e: SchedError) -> Self {
        HostError::Guest(match &e {
            SchedError::TooManySessions { .. }
            | SchedError::KvQuota { .. }
            | SchedError::PoolTooSmall { .. } => wit::Error::Limit(e.to_string()),
            SchedError::BadToken { .. } | SchedError::BadTruncate { .. } => {
                wit::Error::Invalid(e.to_string())
            }
            _ => wit::Error::Engine(e.to_string()),
        })
    }
}

type HResult<T> = Result<T, HostError>;

fn invalid<T>(msg: impl Into<String>) -> HResult<T> {
    Err(HostError::Guest(wit::Error::Invalid(msg.into())))
}

/// An open model handle.
pub struct ModelRes {
    entry: Arc<ModelEntry>,
}

/// One KV-cache sequence and the host-side state that goes with it.
pub struct SessionRes {
    entry: Arc<ModelEntry>,
    seq: Sequence,
    tokens: Vec<u32>,
    /// Logits after the last token, if known (cleared by truncation).
    logits: Option<Vec<f32>>,
    /// The generator of the last sampling parameters used, so that a seed gives a sequence of
    /// draws rather than one draw repeated.
    sampler: Option<Sampler>,
}

/// Everything one call's store holds.
pub struct HostState {
    rt: Arc<Inner>,
    ctx: InvokeContext,
    wasi: WasiCtx,
    table: ResourceTable,
    stderr: MemoryOutputPipe,
    output: tokio::sync::mpsc::UnboundedSender<String>,
    output_bytes: usize,
    limiter: Limiter,
    pub(crate) cpu: CpuMeter,
    limit_hit: Option<LimitHit>,
    sessions: u32,
    handles: u32,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl HostState {
    fn limit(&mut self, kind: LimitKind, detail: String) -> HostError {
        let hit = LimitHit { kind, detail };
        self.limit_hit = Some(hit.clone());
        HostError::Trap(wasmtime::Error::new(LimitTrap(hit)))
    }

    fn check_data(&mut self, what: &str, bytes: usize) -> HResult<()> {
        let cap = self.ctx.limits.max_host_data_bytes;
        if bytes > cap {
            return Err(self.limit(
                LimitKind::HostData,
                format!("{what} passed {bytes} bytes into a host call; the limit is {cap}"),
            ));
        }
        Ok(())
    }

    fn take_handle(&mut self) -> HResult<()> {
        let cap = self.ctx.limits.max_handles;
        if self.handles >= cap {
            return Err(self.limit(
                LimitKind::Handles,
                format!("the guest holds {cap} host handles; the limit is {cap}"),
            ));
        }
        self.handles += 1;
        Ok(())
    }

    fn take_session(&mut self) -> HResult<()> {
        let cap = self.ctx.limits.max_sessions;
        if self.sessions >= cap {
            return Err(self.limit(
                LimitKind::Sessions,
                format!("the guest holds {cap} sessions; the limit is {cap}"),
            ));
        }
        self.take_handle()?;
        self.sessions += 1;
        Ok(())
    }

    fn emit(&mut self, text: &str) -> HResult<()> {
        self.output_bytes += text.len();
        let cap = self.ctx.limits.max_output_bytes;
        if self.output_bytes > cap {
            return Err(self.limit(
                LimitKind::Output,
                format!("the guest streamed more than {cap} bytes of output"),
            ));
        }
        // A caller that stopped listening (client gone) does not stop the guest; its
        // wall-clock deadline or the caller dropping the call does.
        let _ = self.output.send(text.to_string());
        Ok(())
    }

    fn model(&self, r: &Resource<ModelRes>) -> HResult<Arc<ModelEntry>> {
        Ok(self.table.get(r).map_err(trap)?.entry.clone())
    }

    fn session(&mut self, r: &Resource<SessionRes>) -> HResult<&mut SessionRes> {
        self.table.get_mut(r).map_err(trap)
    }

    fn find_model(&self, name: &str) -> HResult<Arc<ModelEntry>> {
        let models = self.rt.models.read().expect("models lock");
        let name = if name.is_empty() {
            match &self.ctx.default_model {
                Some(n) => n.clone(),
                None if models.len() == 1 => models.keys().next().cloned().unwrap_or_default(),
                None => {
                    return Err(HostError::Guest(wit::Error::NotFound(
                        "no default model for this request; open one by name".into(),
                    )));
                }
            }
        } else {
            name.to_string()
        };
        let allowed = self
            .ctx
            .allowed_models
            .as_ref()
            .is_none_or(|a| a.contains(&name));
        match models.get(&name) {
            Some(m) if allowed => Ok(m.clone()),
            _ => Err(HostError::Guest(wit::Error::NotFound(format!(
                "model {name:?} is not available"
            )))),
        }
    }
}

fn trap(e: impl std::error::Error + Send + Sync + 'static) -> HostError {
    HostError::Trap(wasmtime::Error::new(e))
}

fn sampling_params(p: &wit::SamplingParams) -> SamplingParams {
    SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: p.top_p,
        min_p: p.min_p,
        repeat_penalty: p.repeat_penalty,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        penalty_last_n: p.penalty_last_n as usize,
        seed: p.seed,
        logit_bias: p.logit_bias.iter().map(|b| (b.token, b.bias)).collect(),
    }
}

fn token_mask(m: &wit::TokenMask, n_vocab: usize) -> HResult<TokenMask> {
    let check = |ids: &[u32]| match ids.iter().find(|&&t| t as usize >= n_vocab) {
        Some(t) => invalid(format!(
            "mask names token {t}; the vocabulary has {n_vocab}"
        )),
        None => Ok(()),
    };
    Ok(match m {
        wit::TokenMask::Allow(ids) => {
            check(ids)?;
            TokenMask::from_ids(n_vocab, ids)
        }
        wit::TokenMask::Deny(ids) => {
            check(ids)?;
            let mut mask = TokenMask::new(n_vocab);
            mask.allow_all();
            for &t in ids {
                mask.disallow(t);
            }
            mask
        }
        wit::TokenMask::Bits(words) => {
            let mut mask = TokenMask::new(n_vocab);
            for (w, &bits) in words.iter().enumerate() {
                let mut b = bits;
                while b != 0 {
                    let i = w * 64 + b.trailing_zeros() as usize;
                    b &= b - 1;
                    if i < n_vocab {
                        mask.allow(i as u32);
                    }
                }
            }
            mask
        }
    })
}

impl SessionRes {
    /// The logits after the last token, recomputing them after a truncation.
    async fn ensure_logits(&mut self, cpu: &CpuMeter) -> HResult<&[f32]> {
        if self.logits.is_none() {
            let Some(&last) = self.tokens.last() else {
                return invalid("the session is empty: feed tokens before sampling");
            };
            let n = self.tokens.len();
            cpu.pause();
            let r = async {
                self.seq.truncate(n - 1).await?;
                self.seq.feed(vec![last], true).await
            }
            .await;
            cpu.resume();
            self.logits = r?;
        }
        Ok(self.logits.as_deref().expect("logits present"))
    }

    fn sampler(&mut self, params: SamplingParams) -> &mut Sampler {
        if self.sampler.as_ref().is_none_or(|s| *s.params() != params) {
            let mut s = Sampler::new(params);
            let n = s.params().penalty_last_n;
            for &t in &self.tokens[self.tokens.len().saturating_sub(n)..] {
                s.accept(t);
            }
            self.sampler = Some(s);
        }
        self.sampler.as_mut().expect("sampler present")
    }

    async fn feed(&mut self, tokens: Vec<u32>, cpu: &CpuMeter) -> HResult<()> {
        if tokens.is_empty() {
            return Ok(());
        }
        let n_ctx = self.entry.info.n_ctx;
        if self.tokens.len() + tokens.len() > n_ctx {
            return Err(HostError::Guest(wit::Error::Engine(format!(
                "context full: the session has {} tokens, adding {} exceeds the model's {n_ctx}",
                self.tokens.len(),
                tokens.len()
            ))));
        }
        self.logits = None;
        cpu.pause();
        let r = self.seq.feed(tokens.clone(), true).await;
        cpu.resume();
        let logits = r?;
        if let Some(s) = &mut self.sampler {
            for &t in &tokens {
                s.accept(t);
            }
        }
        self.tokens.extend_from_slice(&tokens);
        self.logits = logits;
        Ok(())
    }
}

impl bindings::realm::llm::types::Host for HostState {
    fn convert_error(&mut self, err: HostError) -> wasmtime::Result<wit::Error> {
        match err {
            HostError::Guest(e) => Ok(e),
            HostError::Trap(t) => Err(t),
        }
    }
}

impl bindings::realm::llm::output::Host for HostState {
    async fn emit(&mut self, text: String) -> wasmtime::Result<()> {
        if let Err(e) = self.check_data("output.emit", text.len()) {
            return Err(into_trap(e));
        }
        self.emit(&text).map_err(into_trap)
    }
}

fn into_trap(e: HostError) -> wasmtime::Error {
    match e {
        HostError::Trap(t) => t,
        HostError::Guest(g) => wasmtime::Error::msg(format!("{g:?}")),
    }
}

impl bindings::realm::llm::llm::Host for HostState {
    async fn list_models(&mut self) -> wasmtime::Result<Vec<String>> {
        let models = self.rt.models.read().expect("models lock");
        let mut names: Vec<String> = models
            .keys()
            .filter(|n| {
                self.ctx
                    .allowed_models
                    .as_ref()
                    .is_none_or(|a| a.contains(n))
            })
            .cloned()
            .collect();
        names.sort();
        Ok(names)
    }
}

impl bindings::realm::llm::llm::HostModel for HostState {
    async fn open(&mut self, name: String) -> HResult<Resource<ModelRes>> {
        self.check_data("model name", name.len())?;
        let entry = self.find_model(&name)?;
        self.take_handle()?;
        self.table.push(ModelRes { entry }).map_err(trap)
    }

    async fn info(&mut self, m: Resource<ModelRes>) -> wasmtime::Result<WitModelInfo> {
        let e = self.model(&m).map_err(into_trap)?;
        let i = &e.info;
        Ok(WitModelInfo {
            name: i.name.clone(),
            architecture: i.architecture.clone(),
            vocab_size: i.n_vocab as u32,
            context_length: i.n_ctx as u32,
            special_tokens: SpecialTokens {
                bos: i.bos,
                eos: i.eos,
                eog: i.eog.clone(),
            },
            chat_template: i.chat_template.clone(),
        })
    }

    async fn tokenize(
        &mut self,
        m: Resource<ModelRes>,
        text: String,
        add_special: bool,
        parse_special: bool,
    ) -> HResult<Vec<u32>> {
        self.check_data("tokenize text", text.len())?;
        let e = self.model(&m)?;
        Ok(e.tokenizer.encode(&text, add_special, parse_special))
    }

    async fn detokenize(&mut self, m: Resource<ModelRes>, tokens: Vec<u32>) -> HResult<String> {
        self.check_data("detokenize tokens", tokens.len() * 4)?;
        let e = self.model(&m)?;
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= e.info.n_vocab) {
            return invalid(format!("token {t} is out of range"));
        }
        Ok(e.tokenizer.decode(&tokens))
    }

    async fn token_bytes(&mut self, m: Resource<ModelRes>, token: u32) -> HResult<Vec<u8>> {
        let e = self.model(&m)?;
        if token as usize >= e.info.n_vocab {
            return invalid(format!("token {token} is out of range"));
        }
        Ok(e.tokenizer.piece(token))
    }

    async fn vocab(&mut self, m: Resource<ModelRes>) -> wasmtime::Result<Vec<Vec<u8>>> {
        let e = self.model(&m).map_err(into_trap)?;
        Ok((0..e.info.n_vocab as u32)
            .map(|t| e.tokenizer.piece(t))
            .collect())
    }

    async fn apply_chat_template(
        &mut self,
        m: Resource<ModelRes>,
        messages: String,
        tools: Option<String>,
        add_generation_prompt: bool,
    ) -> HResult<String> {
        self.check_data(
            "chat messages",
            messages.len() + tools.as_ref().map_or(0, |t| t.len()),
        )?;
        let e = self.model(&m)?;
        let Some(template) = &e.template else {
            return invalid(format!(
                "model {:?} has no usable chat template: {}",
                e.info.name,
                e.template_error.as_deref().unwrap_or("none found")
            ));
        };
        let messages: Vec<ChatMessage> = match serde_json::from_str(&messages) {
            Ok(m) => m,
            Err(err) => {
                return invalid(format!("messages are not a JSON array of messages: {err}"));
            }
        };
        let tools: Option<serde_json::Value> = match tools.map(|t| serde_json::from_str(&t)) {
            None => None,
            Some(Ok(v)) => Some(v),
            Some(Err(err)) => return invalid(format!("tools are not JSON: {err}")),
        };
        let text = template
            .render(&messages, tools.as_ref(), add_generation_prompt)
            .map_err(|err| HostError::Guest(wit::Error::Invalid(err.to_string())))?;
        // As llama.cpp does: the tokenizer adds BOS itself, so the template's is dropped.
        Ok(if e.tokenizer.bos().is_some() && e.tokenizer.add_bos() {
            template.strip_bos(&text).to_string()
        } else {
            text
        })
    }

    async fn new_session(&mut self, m: Resource<ModelRes>) -> HResult<Resource<SessionRes>> {
        let entry = self.model(&m)?;
        self.take_session()?;
        let tenant = self.ctx.tenant.clone();
        let cpu = self.cpu.clone();
        cpu.pause();
        let r = entry.engine.open(&tenant).await;
        cpu.resume();
        let seq = match r {
            Ok(s) => s,
            Err(e) => {
                self.sessions -= 1;
                self.handles -= 1;
                return Err(e.into());
            }
        };
        self.table
            .push(SessionRes {
                entry,
                seq,
                tokens: Vec::new(),
                logits: None,
                sampler: None,
            })
            .map_err(trap)
    }

    async fn drop(&mut self, m: Resource<ModelRes>) -> wasmtime::Result<()> {
        self.table.delete(m)?;
        self.handles -= 1;
        Ok(())
    }
}

impl bindings::realm::llm::llm::HostSession for HostState {
    async fn feed(&mut self, s: Resource<SessionRes>, tokens: Vec<u32>) -> HResult<()> {
        self.check_data("feed tokens", tokens.len() * 4)?;
        let cpu = self.cpu.clone();
        self.session(&s)?.feed(tokens, &cpu).await
    }

    async fn sample(
        &mut self,
        s: Resource<SessionRes>,
        params: wit::SamplingParams,
        mask: Option<wit::TokenMask>,
    ) -> HResult<u32> {
        let data = params.logit_bias.len() * 8
            + match &mask {
                Some(wit::TokenMask::Allow(v) | wit::TokenMask::Deny(v)) => v.len() * 4,
                Some(wit::TokenMask::Bits(v)) => v.len() * 8,
                None => 0,
            };
        self.check_data("sampling parameters and mask", data)?;
        let cpu = self.cpu.clone();
        let sess = self.session(&s)?;
        let n_vocab = sess.entry.info.n_vocab;
        let mask = mask.map(|m| token_mask(&m, n_vocab)).transpose()?;
        let params = sampling_params(&params);
        sess.ensure_logits(&cpu).await?;
        // Taken out for the call so that the sampler (also in the session) can be borrowed.
        let logits = sess.logits.take().expect("logits present");
        let r = sess.sampler(params).sample(&logits, mask.as_ref());
        sess.logits = Some(logits);
        r.map_err(|e| HostError::Guest(wit::Error::Invalid(e.to_string())))
    }

    async fn logprob(&mut self, s: Resource<SessionRes>, token: u32) -> HResult<f32> {
        let cpu = self.cpu.clone();
        let sess = self.session(&s)?;
        let logits = sess.ensure_logits(&cpu).await?;
        let Some(&x) = logits.get(token as usize) else {
            return invalid(format!("token {token} is out of range"));
        };
        Ok(x - log_sum_exp(logits))
    }

    async fn top_logprobs(
        &mut self,
        s: Resource<SessionRes>,
        k: u32,
    ) -> HResult<Vec<TokenLogprob>> {
        let cpu = self.cpu.clone();
        let sess = self.session(&s)?;
        let logits = sess.ensure_logits(&cpu).await?;
        Ok(Sampler::top_logprobs(logits, k as usize)
            .into_iter()
            .map(|(token, logprob)| TokenLogprob { token, logprob })
            .collect())
    }

    async fn logits(&mut self, s: Resource<SessionRes>) -> HResult<Vec<f32>> {
        let cpu = self.cpu.clone();
        let sess = self.session(&s)?;
        Ok(sess.ensure_logits(&cpu).await?.to_vec())
    }

    async fn fork(&mut self, s: Resource<SessionRes>) -> HResult<Resource<SessionRes>> {
        self.take_session()?;
        let cpu = self.cpu.clone();
        let sess = self.session(&s)?;
        cpu.pause();
        let r = sess.seq.fork().await;
        cpu.resume();
        let seq = match r {
            Ok(seq) => seq,
            Err(e) => {
                self.sessions -= 1;
                self.handles -= 1;
                return Err(e.into());
            }
        };
        let child = SessionRes {
            entry: sess.entry.clone(),
            seq,
            tokens: sess.tokens.clone(),
            logits: sess.logits.clone(),
            sampler: None,
        };
        self.table.push(child).map_err(trap)
    }

    async fn truncate(&mut self, s: Resource<SessionRes>, len: u32) -> HResult<()> {
        let cpu = self.cpu.clone();
        let sess = self.session(&s)?;
        let len = len as usize;
        if len > sess.tokens.len() {
            return invalid(format!(
                "cannot truncate a session of {} tokens to {len}",
                sess.tokens.len()
            ));
        }
        if len == sess.tokens.len() {
            return Ok(());
        }
        cpu.pause();
        let r = sess.seq.truncate(len).await;
        cpu.resume();
        r?;
        sess.tokens.truncate(len);
        sess.logits = None;
        sess.sampler = None;
        Ok(())
    }

    async fn len(&mut self, s: Resource<SessionRes>) -> wasmtime::Result<u32> {
        Ok(self.session(&s).map_err(into_trap)?.tokens.len() as u32)
    }

    async fn tokens(&mut self, s: Resource<SessionRes>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.session(&s).map_err(into_trap)?.tokens.clone())
    }

    async fn generate(
        &mut self,
        s: Resource<SessionRes>,
        params: GenerateParams,
    ) -> HResult<Generation> {
        let data = params.sampling.logit_bias.len() * 8
            + params.stop.iter().map(|s| s.len()).sum::<usize>();
        self.check_data("generate parameters", data)?;
        let cpu = self.cpu.clone();
        let sampling = sampling_params(&params.sampling);
        let mut stop = StopMatcher::new(&params.stop);
        let mut decoder = StreamDecoder::new();
        let mut out = Generation {
            text: String::new(),
            tokens: Vec::new(),
            finish_reason: FinishReason::Length,
        };
        loop {
            let sess = self.session(&s)?;
            if out.tokens.len() as u32 >= params.max_tokens
                || sess.tokens.len() >= sess.entry.info.n_ctx
            {
                break;
            }
            sess.ensure_logits(&cpu).await?;
            let logits = sess.logits.take().expect("logits present");
            let tok = sess
                .sampler(sampling.clone())
                .sample(&logits, None)
                .map_err(|e| HostError::Guest(wit::Error::Invalid(e.to_string())));
            sess.logits = Some(logits);
            let tok = tok?;
            if params.stop_at_eog && sess.entry.tokenizer.is_eog(tok) {
                out.finish_reason = FinishReason::Stop;
                break;
            }
            out.tokens.push(tok);
            let piece = decoder.push(&sess.entry.tokenizer, tok);
            let o = stop.push(&piece);
            let stopped = o.stopped;
            if !stopped {
                sess.feed(vec![tok], &cpu).await?;
            }
            out.text.push_str(&o.emit);
            if params.stream {
                self.emit(&o.emit)?;
            }
            if stopped {
                out.finish_reason = FinishReason::Stop;
                break;
            }
        }
        if out.finish_reason == FinishReason::Length {
            let rest = decoder.finish();
            let mut tail = stop.push(&rest).emit;
            tail.push_str(&stop.flush());
            out.text.push_str(&tail);
            if params.stream {
                self.emit(&tail)?;
            }
        }
        Ok(out)
    }

    async fn drop(&mut self, s: Resource<SessionRes>) -> wasmtime::Result<()> {
        // Dropping the sequence frees its KV pages in the engine right away.
        self.table.delete(s)?;
        self.sessions -= 1;
        self.handles -= 1;
        Ok(())
    }
}

fn log_sum_exp(xs: &[f32]) -> f32 {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = xs.iter().map(|&x| ((x - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// A store for one call, with limits and the epoch callback in place.
fn new_store(
    rt: &Arc<Inner>,
    ctx: InvokeContext,
    output: tokio::sync::mpsc::UnboundedSender<String>,
) -> Store<HostState> {
    let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
    // No preopened directories, environment, arguments or sockets; stdin is empty.
    let wasi = WasiCtx::builder().stderr(stderr.clone()).build();
    let memory_bytes = ctx.limits.memory_bytes.min(rt.cfg.max_memory_bytes);
    let state = HostState {
        rt: rt.clone(),
        ctx,
        wasi,
        table: ResourceTable::new(),
        stderr,
        output,
        output_bytes: 0,
        limiter: Limiter {
            memory_bytes,
            hit: None,
        },
        cpu: CpuMeter::new(),
        limit_hit: None,
        sessions: 0,
        handles: 0,
    };
    let mut store = Store::new(&rt.engine, state);
    store.limiter(|s| &mut s.limiter);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|mut cx: StoreContextMut<'_, HostState>| {
        let s = cx.data_mut();
        let used = s.cpu.used();
        let cap = s.ctx.limits.cpu_time;
        if used > cap {
            let hit = LimitHit {
                kind: LimitKind::CpuTime,
                detail: format!(
                    "the guest ran for {} ms of CPU time; the limit is {} ms",
                    used.as_millis(),
                    cap.as_millis()
                ),
            };
            s.limit_hit = Some(hit.clone());
            return Err(wasmtime::Error::new(LimitTrap(hit)));
        }
        // Let other tasks on this thread run; the time spent waiting is not the guest's.
        let cpu = s.cpu.clone();
        cpu.pause();
        Ok(UpdateDeadline::YieldCustom(
            1,
            Box::pin(async move {
                tokio::task::yield_now().await;
                cpu.resume();
            }),
        ))
    });
    store
}

/// Reserves one of the tenant's instance slots for the life of the guard.
struct InstanceSlot {
    rt: Arc<Inner>,
    tenant: String,
}

impl InstanceSlot {
    fn take(rt: &Arc<Inner>, tenant: &str, cap: u32) -> Result<InstanceSlot, GuestError> {
        let mut m = rt.instances.lock().expect("instances lock");
        let n = m.entry(tenant.to_string()).or_insert(0);
        if *n >= cap {
            return Err(GuestError::Limit {
                limit: LimitKind::Instances,
                detail: format!("tenant {tenant:?} already runs {cap} guest instances"),
            });
        }
        *n += 1;
        Ok(InstanceSlot {
            rt: rt.clone(),
            tenant: tenant.to_string(),
        })
    }
}

impl Drop for InstanceSlot {
    fn drop(&mut self) {
        let mut m = self.rt.instances.lock().expect("instances lock");
        if let Some(n) = m.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.tenant);
            }
        }
    }
}

/// Turns a failed call into the error the caller sees.
fn classify(store: &Store<HostState>, err: wasmtime::Error) -> GuestError {
    let s = store.data();
    if let Some(hit) = s.limit_hit.clone().or_else(|| s.limiter.hit.clone()) {
        return GuestError::Limit {
            limit: hit.kind,
            detail: hit.detail,
        };
    }
    if let Some(t) = err.downcast_ref::<LimitTrap>() {
        return GuestError::Limit {
            limit: t.0.kind,
            detail: t.0.detail.clone(),
        };
    }
    let stderr = String::from_utf8_lossy(&s.stderr.contents())
        .trim()
        .to_string();
    match err.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::StackOverflow) => GuestError::Limit {
            limit: LimitKind::Stack,
            detail: "the guest overflowed its wasm stack (runaway recursion?)".into(),
        },
        Some(t) => {
            let mut msg = t.to_string();
            if !stderr.is_empty() {
                msg = format!("{msg}; guest stderr: {}", tail(&stderr, 2000));
            }
            GuestError::Trap(msg)
        }
        None => {
            let mut msg = format!("{err:#}");
            if !stderr.is_empty() {
                msg = format!("{msg}; guest stderr: {}", tail(&stderr, 2000));
            }
            GuestError::Trap(msg)
        }
    }
}

fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

fn wall_clock_error(d: Duration) -> GuestError {
    GuestError::Limit {
        limit: LimitKind::WallClock,
        detail: format!("the call did not finish within {} ms", d.as_millis()),
    }
}

pub(crate) async fn invoke(
    rt: &Arc<Inner>,
    guest: &Guest,
    ctx: InvokeContext,
    input: String,
    output: tokio::sync::mpsc::UnboundedSender<String>,
) -> (Result<String, GuestError>, Duration) {
    let wall = ctx.limits.wall_clock;
    let _slot = match InstanceSlot::take(rt, &ctx.tenant, ctx.limits.max_instances) {
        Ok(s) => s,
        Err(e) => return (Err(e), Duration::ZERO),
    };
    let mut store = new_store(rt, ctx, output);
    let meter = store.data().cpu.clone();
    let pre = guest.inner.pre.clone();
    let run = async {
        store.data().cpu.resume();
        let instance = match pre.instantiate_async(&mut store).await {
            Ok(i) => i,
            Err(e) => return Err(instantiate_error(&store, e)),
        };
        let r = instance
            .realm_llm_handler()
            .call_handle(&mut store, &input)
            .await;
        store.data().cpu.pause();
        match r {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(msg)) => Err(GuestError::Guest(msg)),
            Err(e) => Err(classify(&store, e)),
        }
    };
    // Dropping the future on timeout abandons the guest's fiber; dropping the store then
    // frees its sessions (and so their KV pages).
    let result = match tokio::time::timeout(wall, run).await {
        Ok(r) => r,
        Err(_) => Err(wall_clock_error(wall)),
    };
    (result, meter.used())
}

fn instantiate_error(store: &Store<HostState>, e: wasmtime::Error) -> GuestError {
    if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
    {
        return GuestError::Limit {
            limit: LimitKind::Instances,
            detail: format!("the runtime's instance pool is full: {e:#}"),
        };
    }
    match classify(store, e) {
        GuestError::Trap(m) => GuestError::Runtime(format!("instantiation failed: {m}")),
        other => other,
    }
}

pub(crate) async fn instantiate_only(
    rt: &Arc<Inner>,
    guest: &Guest,
    ctx: InvokeContext,
) -> Result<(), GuestError> {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let _slot = InstanceSlot::take(rt, &ctx.tenant, ctx.limits.max_instances)?;
    let mut store = new_store(rt, ctx, tx);
    guest
        .inner
        .pre
        .instantiate_async(&mut store)
        .await
        .map(|_| ())
        .map_err(|e| instantiate_error(&store, e))
}
