//! JSON-constrained generation: every sampled token keeps the output a valid JSON prefix (the
//! host samples under an allowed-token mask the guest computes each step), and generation ends
//! only when the document is complete.
//!
//! Input: an OpenAI chat.completions request (the reply is a JSON object), or
//! `{"prompt": "...", "max_tokens": N, "temperature": T, "seed": S, "object": bool}` for raw
//! completion of any JSON value (`object` defaults to true). Output: a chat.completion whose
//! content parses as JSON, plus `"json"`: the parsed value (null if `max_tokens` ran out).

use realm_guest::json::generate_json;
use realm_guest::openai::{ChatCompletion, ChatRequest, chat_prompt};
use realm_guest::{Model, SamplingParams};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(untagged)]
enum Request {
    Chat(ChatRequest),
    Raw {
        prompt: String,
        #[serde(default)]
        model: Option<String>,
        #[serde(default)]
        max_tokens: Option<u32>,
        #[serde(default)]
        temperature: Option<f32>,
        #[serde(default)]
        seed: Option<u64>,
        #[serde(default)]
        object: Option<bool>,
    },
}

fn handle(req: Request) -> Result<Value, String> {
    let e = |e: realm_guest::Error| e.to_string();
    let (model, prompt, params, max_tokens, object) = match &req {
        Request::Chat(chat) => {
            let model = Model::open(chat.model.as_deref().unwrap_or("")).map_err(e)?;
            let prompt = chat_prompt(&model, chat).map_err(e)?;
            (
                model,
                prompt,
                chat.sampling_params()?,
                chat.max_tokens(),
                true,
            )
        }
        Request::Raw {
            prompt,
            model,
            max_tokens,
            temperature,
            seed,
            object,
        } => {
            let model = Model::open(model.as_deref().unwrap_or("")).map_err(e)?;
            let prompt = model.tokenize(prompt, true, true).map_err(e)?;
            let params = SamplingParams {
                temperature: temperature.unwrap_or(0.0),
                seed: *seed,
                ..SamplingParams::default()
            };
            (
                model,
                prompt,
                params,
                max_tokens.unwrap_or(256),
                object.unwrap_or(true),
            )
        }
    };
    let session = model.new_session().map_err(e)?;
    session.feed(&prompt).map_err(e)?;
    let out = generate_json(&model, &session, &params, max_tokens, object, true).map_err(e)?;
    let parsed = if out.complete {
        serde_json::from_str::<Value>(&out.text)
            .map_err(|err| format!("constrained output did not parse ({err}): {}", out.text))?
    } else {
        Value::Null
    };
    let finish = if out.complete { "stop" } else { "length" };
    let completion = ChatCompletion::new(
        &model.info().name,
        out.text,
        finish,
        prompt.len() as u32,
        out.tokens.len() as u32,
    );
    let mut v = serde_json::to_value(completion).map_err(|e| e.to_string())?;
    v["json"] = parsed;
    Ok(v)
}

realm_guest::export!(handle);
