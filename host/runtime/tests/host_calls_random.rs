//! CI's short run of the host-call fuzzer: the harness of the cargo-fuzz target `host_calls`
//! (`fuzz/harness/host_calls.rs`: arbitrary arguments to every `realm:llm` host function through
//! the testbed guest) on the committed seed corpus, then on random inputs for
//! `REALM_FUZZ_SECS` seconds (default 20), decoded exactly as libFuzzer's typed inputs are
//! (`Arbitrary::arbitrary_take_rest`). It is built with the workspace (no second, instrumented
//! build of wasmtime), so in CI's time it runs hundreds of inputs where the sanitizer build runs
//! a handful; coverage-guided runs with sanitizers stay `scripts/fuzz.sh` (docs/fuzzing.md).
//! A failure prints the seed: `REALM_FUZZ_SEED=N` replays the same inputs.

#[path = "../fuzz/harness/host_calls.rs"]
mod harness;

use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn run_bytes(data: &[u8]) {
    if let Ok(calls) = Vec::<harness::HostCall>::arbitrary_take_rest(Unstructured::new(data)) {
        harness::run_calls(calls);
    }
}

#[test]
fn host_calls_on_random_arguments_never_fail_the_host() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/host_calls");
    let mut seeds: Vec<_> = std::fs::read_dir(dir)
        .expect("the seed corpus")
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {dir}");
    for s in &seeds {
        run_bytes(&std::fs::read(s).expect("seed"));
    }

    let secs: u64 = std::env::var("REALM_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("REALM_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("host_calls_random: seed {seed} (REALM_FUZZ_SEED={seed} replays), {secs} s");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut runs = 0usize;
    while Instant::now() < deadline {
        // Mostly short inputs (a few calls), sometimes long ones, as libFuzzer's -max_len 4096.
        let len = if rng.random_bool(0.8) {
            rng.random_range(0..256)
        } else {
            rng.random_range(256..4096)
        };
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        run_bytes(&data);
        runs += 1;
    }
    eprintln!(
        "host_calls_random: {} seeds and {runs} random inputs, no host failure",
        seeds.len()
    );
}
