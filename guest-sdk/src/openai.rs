//! OpenAI chat.completions request and response shapes, and their mapping onto the host's
//! sampling parameters.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{LogitBias, SamplingParams};

/// A `POST /v1/chat/completions` body. Unknown fields are ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation (chat.completions). Ignored when `prompt` is given.
    #[serde(default)]
    pub messages: Vec<Value>,
    /// Raw text to continue without a chat template (completions; the host sets it).
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub tools: Option<Value>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Not OpenAI's, but common (llama.cpp, vLLM).
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub repeat_penalty: Option<f32>,
    /// Token id (as a string) → bias in [-100, 100]; -100 bans the token.
    #[serde(default)]
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    /// Candidates to generate (the best-of-n guest); the chat guest supports 1.
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
}

/// Default completion length when the request names none.
pub const DEFAULT_MAX_TOKENS: u32 = 512;

impl ChatRequest {
    pub fn max_tokens(&self) -> u32 {
        self.max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS)
    }

    pub fn stop_strings(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }

    /// Whether the caller asked for a JSON object (`response_format.type` = `json_object`).
    pub fn wants_json(&self) -> bool {
        self.response_format
            .as_ref()
            .is_some_and(|f| f.kind == "json_object")
    }

    /// The host sampling parameters for this request. OpenAI's defaults are temperature 1 and
    /// top_p 1 with no top-k or min-p.
    pub fn sampling_params(&self) -> Result<SamplingParams, String> {
        let mut logit_bias = Vec::new();
        for (k, &v) in self.logit_bias.iter().flatten() {
            let token: u32 = k
                .parse()
                .map_err(|_| format!("logit_bias key {k:?} is not a token id"))?;
            if !(-100.0..=100.0).contains(&v) {
                return Err(format!("logit_bias value {v} is outside [-100, 100]"));
            }
            // OpenAI: -100 should ban the token, 100 should force it.
            let bias = if v <= -100.0 { f32::NEG_INFINITY } else { v };
            logit_bias.push(LogitBias { token, bias });
        }
        let presence = self.presence_penalty.unwrap_or(0.0);
        let frequency = self.frequency_penalty.unwrap_or(0.0);
        Ok(SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0),
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repeat_penalty: self.repeat_penalty.unwrap_or(1.0),
            presence_penalty: presence,
            frequency_penalty: frequency,
            penalty_last_n: if presence != 0.0 || frequency != 0.0 || self.repeat_penalty.is_some()
            {
                64
            } else {
                0
            },
            seed: self.seed,
            logit_bias,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub finish_reason: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl ChatCompletion {
    /// A one-choice completion. `created` is left 0: guests see no clock (the host may fill it).
    pub fn new(
        model: &str,
        content: String,
        finish_reason: &'static str,
        prompt: u32,
        completion: u32,
    ) -> Self {
        ChatCompletion {
            id: "chatcmpl-realm".to_string(),
            object: "chat.completion",
            created: 0,
            model: model.to_string(),
            choices: vec![Choice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content,
                },
                finish_reason,
            }],
            usage: Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                total_tokens: prompt + completion,
            },
        }
    }
}

/// Render the messages with the model's chat template and tokenize the prompt the way
/// llama.cpp does (special tokens parsed; a BOS the template already wrote is not doubled).
/// A request with a raw `prompt` (the completions endpoint) is tokenized as is, with BOS.
pub fn chat_prompt(model: &crate::Model, req: &ChatRequest) -> Result<Vec<u32>, crate::Error> {
    if let Some(prompt) = &req.prompt {
        // A completion: the text as given, with the model's BOS (as llama.cpp's server does).
        return model.tokenize(prompt, true, true);
    }
    let messages = Value::Array(req.messages.clone()).to_string();
    let tools = req.tools.as_ref().map(|t| t.to_string());
    let text = model.apply_chat_template(&messages, tools.as_deref(), true)?;
    let mut tokens = model.tokenize(&text, true, true)?;
    let bos = model.info().special_tokens.bos;
    if bos.is_some() && tokens.len() >= 2 && tokens[0] == tokens[1] && Some(tokens[0]) == bos {
        tokens.remove(0);
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_openai_parameters() {
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.2, "top_p": 0.9, "max_tokens": 10, "max_completion_tokens": 7,
            "stop": "END", "seed": 42, "logit_bias": {"17": -100, "3": 2.5},
            "response_format": {"type": "json_object"}
        }))
        .unwrap();
        assert_eq!(req.max_tokens(), 7);
        assert_eq!(req.stop_strings(), vec!["END"]);
        assert!(req.wants_json());
        let p = req.sampling_params().unwrap();
        assert_eq!(
            (p.temperature, p.top_p, p.top_k, p.seed),
            (0.2, 0.9, 0, Some(42))
        );
        assert_eq!(p.logit_bias.len(), 2);
        assert!(
            p.logit_bias
                .iter()
                .any(|b| b.token == 17 && b.bias == f32::NEG_INFINITY)
        );
        assert!(p.logit_bias.iter().any(|b| b.token == 3 && b.bias == 2.5));
    }

    #[test]
    fn rejects_bad_logit_bias() {
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "messages": [], "logit_bias": {"x": 1}
        }))
        .unwrap();
        assert!(req.sampling_params().is_err());
    }
}
