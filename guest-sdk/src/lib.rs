//! Write Realm guests in Rust.
//!
//! A guest is a WebAssembly component (built with `cargo build --target wasm32-wasip2`) that the
//! Realm host runs in a sandbox, once per request. It receives the request as a JSON string and
//! returns a JSON string; in between it drives the host's models through [`Model`] and
//! [`Session`] handles and streams text to the caller with [`emit`].
//!
//! The host does the heavy work: the forward pass, the KV cache and sampling over the whole
//! vocabulary. A guest decides *what* to do with each token.
//!
//! ```ignore
//! use realm_guest::{GenerateParams, Model, SamplingParams};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Request { prompt: String, max_tokens: Option<u32> }
//!
//! #[derive(Serialize)]
//! struct Response { text: String, tokens: usize }
//!
//! fn handle(req: Request) -> Result<Response, realm_guest::Error> {
//!     let model = Model::open("")?; // the request's default model
//!     let session = model.new_session()?; // freed when dropped
//!     session.feed(&model.tokenize(&req.prompt, true, false)?)?;
//!     let out = session.generate(&GenerateParams {
//!         max_tokens: req.max_tokens.unwrap_or(64),
//!         stream: true, // the caller sees the text as it is generated
//!         ..GenerateParams::default()
//!     })?;
//!     Ok(Response { tokens: out.tokens.len(), text: out.text })
//! }
//!
//! realm_guest::export!(handle);
//! ```
//!
//! Token-level control (the reason to write a guest at all) uses [`Session::sample`] with a
//! [`TokenMask`] or logit bias, [`Session::fork`] to branch a sequence cheaply (its KV pages are
//! shared copy-on-write), and [`Session::truncate`] to rewind; see the `json` and `best-of-n`
//! guests in the repository's `guests/` folder.

pub mod json;
pub mod openai;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "guest",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_guest",
        default_bindings_module: "realm_guest::bindings",
    });
}

pub use bindings::realm::llm::llm::{Model, Session, list_models};
pub use bindings::realm::llm::types::{
    Error, FinishReason, GenerateParams, Generation, LogitBias, ModelInfo, SamplingParams,
    SpecialTokens, TokenLogprob, TokenMask,
};

/// Send a chunk of text to whoever called the guest (an SSE stream, the CLI) right away.
pub fn emit(text: &str) {
    if !text.is_empty() {
        bindings::realm::llm::output::emit(text);
    }
}

impl Default for SamplingParams {
    /// llama.cpp's defaults.
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
    /// Always the most likely token.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 1,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplingParams::default()
        }
    }
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            sampling: SamplingParams::default(),
            max_tokens: 256,
            stop: Vec::new(),
            stop_at_eog: true,
            stream: false,
        }
    }
}

impl TokenMask {
    /// A bit set over `n_vocab` tokens, from a predicate.
    pub fn from_fn(n_vocab: usize, mut allowed: impl FnMut(u32) -> bool) -> TokenMask {
        let mut bits = vec![0u64; n_vocab.div_ceil(64)];
        for id in 0..n_vocab as u32 {
            if allowed(id) {
                bits[id as usize / 64] |= 1 << (id % 64);
            }
        }
        TokenMask::Bits(bits)
    }
}

impl SpecialTokens {
    /// Whether `token` ends generation (eos, eot, end_of_turn, ...).
    pub fn is_eog(&self, token: u32) -> bool {
        self.eog.contains(&token) || self.eos == Some(token)
    }
}

/// Turns token bytes into text as they arrive, holding back an incomplete UTF-8 character
/// until its last byte comes (a token may end in the middle of one).
#[derive(Default, Debug, Clone)]
pub struct TextDecoder {
    pending: Vec<u8>,
}

impl TextDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a token's bytes; returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // A cut-off character at the end waits for more bytes; an invalid byte elsewhere
            // is replaced (as the host's detokenizer does).
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.pending.len(),
        };
        let rest = self.pending.split_off(valid);
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        out
    }

    /// Whatever is left (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// What a handler returns: anything serializable, or an error shown to the caller.
#[doc(hidden)]
pub fn __dispatch<Req, Resp, E>(
    f: fn(Req) -> Result<Resp, E>,
    request: String,
) -> Result<String, String>
where
    Req: serde::de::DeserializeOwned,
    Resp: serde::Serialize,
    E: core::fmt::Display,
{
    let req: Req =
        serde_json::from_str(&request).map_err(|e| format!("invalid request JSON: {e}"))?;
    let resp = f(req).map_err(|e| e.to_string())?;
    serde_json::to_string(&resp).map_err(|e| format!("cannot serialize the response: {e}"))
}

/// Export a function as the guest's request handler.
///
/// The function takes any `serde::Deserialize` type (the request JSON is parsed into it; use
/// `serde_json::Value` to take it as is) and returns `Result<R, E>` where `R: Serialize` (the
/// response JSON) and `E: Display` (an error message for the caller).
///
/// ```ignore
/// fn handle(req: serde_json::Value) -> Result<serde_json::Value, String> { Ok(req) }
/// realm_guest::export!(handle);
/// ```
#[macro_export]
macro_rules! export {
    ($handler:path) => {
        const _: () = {
            struct __RealmGuest;
            impl $crate::bindings::exports::realm::llm::handler::Guest for __RealmGuest {
                fn handle(request: String) -> Result<String, String> {
                    $crate::__dispatch($handler, request)
                }
            }
    $crate::bindings::__export_guest!(__RealmGuest with_types_in $crate::bindings);
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_decoder_holds_back_split_characters() {
        let mut d = TextDecoder::new();
        let snow = "é☃".as_bytes();
        assert_eq!(d.push(&snow[..1]), "");
        assert_eq!(d.push(&snow[1..3]), "é");
        assert_eq!(d.push(&snow[3..]), "☃");
        assert_eq!(d.push(b"ok"), "ok");
        assert_eq!(d.push(&[0xe2]), "");
        assert_eq!(d.finish(), "\u{fffd}");
    }
}
