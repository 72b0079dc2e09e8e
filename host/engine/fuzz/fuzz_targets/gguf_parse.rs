//! Any byte string given to the GGUF reader, and to the model loader on top of it, must yield a
//! value or an error: never a panic, an out-of-bounds read or an unbounded allocation.

#![no_main]

use std::hint::black_box;

use libfuzzer_sys::fuzz_target;
use realm_engine::gguf::{GgufFile, Value};
use realm_engine::model::Hparams;
use realm_engine::tokenizer::Tokenizer;
use realm_engine::{LoadOptions, Model};

/// Reads every part of a metadata value, recursively.
fn touch(v: &Value) -> u64 {
    let scalar = v.as_u64().unwrap_or(0)
        ^ v.as_i64().unwrap_or(0) as u64
        ^ v.as_f64().map_or(0, f64::to_bits)
        ^ v.as_bool().map_or(0, u64::from);
    match v {
        Value::String(s) => s.len() as u64 ^ s.bytes().map(u64::from).sum::<u64>(),
        Value::Array(_, items) => items.iter().map(touch).fold(scalar, u64::wrapping_add),
        _ => scalar,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    let mut acc = 0u64;
    for (key, value) in f.metadata() {
        acc = acc.wrapping_add(key.len() as u64 ^ touch(value));
        // Display summarises long strings and arrays: exercise its char-boundary logic.
        black_box(value.to_string());
        black_box(f.get(key));
    }
    for t in f.tensors() {
        let view = f
            .tensor(&t.name)
            .expect("every listed tensor can be viewed");
        acc = acc.wrapping_add(view.data().iter().map(|&b| u64::from(b)).sum::<u64>());
        if view.n_rows() > 0 {
            acc = acc.wrapping_add(view.row(view.n_rows() - 1).len() as u64);
        }
    }
    black_box(acc);

    if let Ok(tok) = Tokenizer::from_gguf(&f) {
        black_box(tok.decode(&[0, 1, 2, 3, 300, u32::MAX]));
        black_box(tok.encode("Hello, <s> wörld 🦙 1234\n", true, true));
    }
    black_box(Hparams::from_gguf(&f).ok());
    // Loading a valid seed succeeds; anything else must be an error.
    black_box(Model::from_gguf(f, &LoadOptions { threads: 1, ..Default::default() }).ok());
});
