//! cargo-fuzz target: arbitrary arguments to every `realm:llm` host function (see
//! `../harness/host_calls.rs`, shared with the randomized test `tests/host_calls_random.rs`).
//! libFuzzer's `-rss_limit_mb` / `-malloc_limit_mb` report unbounded allocations.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness/host_calls.rs"]
mod harness;

fuzz_target!(|calls: Vec<harness::HostCall>| harness::run_calls(calls));
