//! The default chat guest: an OpenAI chat.completions request in, a chat.completion out.
//!
//! The prompt comes from the model's own chat template; generation runs in the host's loop
//! (`session.generate`), which streams text as it goes. `response_format: {"type":
//! "json_object"}` switches to token-level JSON-constrained decoding (the SDK's `json` module).

use realm_guest::json::generate_json;
use realm_guest::openai::{ChatCompletion, ChatRequest, chat_prompt};
use realm_guest::{FinishReason, GenerateParams, Model};

fn handle(req: ChatRequest) -> Result<ChatCompletion, String> {
    if req.n.unwrap_or(1) != 1 {
        return Err("this guest generates one choice (n = 1); use the best-of-n guest".into());
    }
    let model = Model::open(req.model.as_deref().unwrap_or("")).map_err(|e| e.to_string())?;
    let name = model.info().name;
    let sampling = req.sampling_params()?;
    let prompt = chat_prompt(&model, &req).map_err(|e| e.to_string())?;
    let session = model.new_session().map_err(|e| e.to_string())?;
    session.feed(&prompt).map_err(|e| e.to_string())?;

    let (content, completion_tokens, finish) = if req.wants_json() {
        let out = generate_json(&model, &session, &sampling, req.max_tokens(), true, true)
            .map_err(|e| e.to_string())?;
        let finish = if out.complete { "stop" } else { "length" };
        (out.text, out.tokens.len() as u32, finish)
    } else {
        let out = session
            .generate(&GenerateParams {
                sampling,
                max_tokens: req.max_tokens(),
                stop: req.stop_strings(),
                stop_at_eog: true,
                stream: true,
            })
            .map_err(|e| e.to_string())?;
        let finish = match out.finish_reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        };
        (out.text, out.tokens.len() as u32, finish)
    };
    Ok(ChatCompletion::new(
        &name,
        content,
        finish,
        prompt.len() as u32,
        completion_tokens,
    ))
}

realm_guest::export!(handle);
