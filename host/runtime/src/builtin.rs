//! The guests that ship inside the binary, built from `guests/` by the build script.

/// The default chat guest (`guests/chat`): OpenAI chat.completions in, chat.completion out.
pub const CHAT_WASM: &[u8] = include_bytes!(concat!(env!("REALM_GUESTS_DIR"), "/chat.wasm"));

/// JSON-constrained output (`guests/json`).
pub const JSON_WASM: &[u8] = include_bytes!(concat!(env!("REALM_GUESTS_DIR"), "/json.wasm"));

/// Best-of-n over forked sessions (`guests/best-of-n`).
pub const BEST_OF_N_WASM: &[u8] =
    include_bytes!(concat!(env!("REALM_GUESTS_DIR"), "/best_of_n.wasm"));

/// The runtime's test and benchmark guest (`guests/testbed`): hostile behaviours for sandbox
/// tests, and guest-driven decoding for `realm guest bench`. Not for serving.
pub const TESTBED_WASM: &[u8] = include_bytes!(concat!(env!("REALM_GUESTS_DIR"), "/testbed.wasm"));

/// A guest importing an interface no host grants (`guests/bad-import`), for tests of loading.
#[doc(hidden)]
pub const BAD_IMPORT_WASM: &[u8] =
    include_bytes!(concat!(env!("REALM_GUESTS_DIR"), "/bad_import.wasm"));

/// A built-in guest by name: `chat`, `json`, `best-of-n` (and `testbed`).
pub fn by_name(name: &str) -> Option<&'static [u8]> {
    match name {
        "chat" => Some(CHAT_WASM),
        "json" => Some(JSON_WASM),
        "best-of-n" => Some(BEST_OF_N_WASM),
        "testbed" => Some(TESTBED_WASM),
        _ => None,
    }
}

/// Names of the guests meant for serving.
pub const NAMES: [&str; 3] = ["chat", "json", "best-of-n"];
