//! Throughput benchmark, ignored by default. Run optimised:
//! `cargo test --release -- --ignored --nocapture quant_bench`
//! (`QUANT_BENCH_TYPES=Q4_K,Q8_0` limits the types).
//!
//! Reports GB/s of weight bytes streamed through `vec_dot` on one thread (best of 7 trials):
//! "hot" keeps the weight matrix in L2 (the kernel's own speed; n = 640 is Gemma 3 270M's row
//! length), "cold" streams 64 MiB from memory (what decode of a model larger than the caches
//! sees).

use std::hint::black_box;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::quant::*;

fn random_weights(ty: GgmlType, bytes: usize, rng: &mut SmallRng) -> Vec<u8> {
    let n = 2048;
    let rb = ty.row_bytes(n).unwrap();
    let rows = (bytes / rb).max(1);
    // Real-looking weights: quantize a few random rows and tile them (quantizing 64 MiB of
    // K-quants with the reference search would dominate the run).
    let mut tile = Vec::new();
    for _ in 0..8 {
        let x: Vec<f32> = (0..n).map(|_| rng.random_range(-0.05f32..0.05)).collect();
        let mut q = vec![0u8; rb];
        quantize_row(ty, &x, &mut q).unwrap();
        tile.extend_from_slice(&q);
    }
    tile.iter().copied().cycle().take(rows * rb).collect()
}

/// GB/s of weight bytes for `rows` rows of `n` elements: the best of several short trials, so
/// that a noisy (shared, virtualized) machine reports what the kernel can do rather than what
/// its neighbours left over.
fn measure(k: &Kernels, n: usize, w: &[u8], a: &[u8]) -> f64 {
    let rb = k.weight_type.row_bytes(n).unwrap();
    let rows = w.len() / rb;
    let mut sink = 0.0f32;
    for r in 0..rows {
        sink += (k.vec_dot)(n, &w[r * rb..], a);
    }
    let mut best = 0f64;
    for _ in 0..7 {
        let start = Instant::now();
        let mut passes = 0usize;
        while start.elapsed() < Duration::from_millis(40) {
            for r in 0..rows {
                sink += (k.vec_dot)(n, &w[r * rb..(r + 1) * rb], a);
            }
            passes += 1;
        }
        let gbs = (passes * rows * rb) as f64 / start.elapsed().as_secs_f64() / 1e9;
        best = best.max(gbs);
    }
    black_box(sink);
    best
}

#[test]
#[ignore]
fn quant_bench() {
    let only: Option<Vec<GgmlType>> = std::env::var("QUANT_BENCH_TYPES")
        .ok()
        .map(|s| s.split(',').filter_map(GgmlType::from_name).collect());
    let isas: Vec<Isa> = [Isa::Scalar, Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|i| cpu_supports(*i))
        .collect();
    println!(
        "detected {:?} (avx512 vnni: {}); GB/s of weight bytes, one thread",
        detected_isa(),
        avx512_vnni()
    );
    println!(
        "{:<6} {:<8} {:>10} {:>10} {:>12}",
        "type", "isa", "hot n=2048", "hot n=640", "cold n=2048"
    );
    let mut rng = SmallRng::seed_from_u64(1);
    for ty in GgmlType::ALL {
        if ty == GgmlType::Q8_1 || only.as_ref().is_some_and(|o| !o.contains(&ty)) {
            continue;
        }
        let hot = random_weights(ty, 256 << 10, &mut rng);
        let cold = random_weights(ty, 64 << 20, &mut rng);
        let short = ty.block_size() <= 32;
        let hot640 = if short {
            let rb = ty.row_bytes(640).unwrap();
            hot[..(hot.len() / rb) * rb].to_vec()
        } else {
            Vec::new()
        };
        for &isa in &isas {
            let k = kernels_for(ty, isa).unwrap();
            let src = vec_dot_isa(ty, isa).unwrap();
            if src != isa {
                continue; // same kernel as a lower level
            }
            let x: Vec<f32> = (0..2048).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let mut a = vec![0u8; k.act_type.row_bytes(2048).unwrap()];
            (k.quantize_act)(&x, &mut a);
            let h = measure(&k, 2048, &hot, &a);
            let h640 = if short {
                format!("{:10.1}", measure(&k, 640, &hot640, &a))
            } else {
                format!("{:>10}", "-")
            };
            let c = measure(&k, 2048, &cold, &a);
            println!(
                "{:<6} {:<8} {:10.1} {} {:12.1}",
                ty.name(),
                isa.name(),
                h,
                h640,
                c
            );
        }
    }
    println!("\nactivation quantization, M elements/s (n = 4096)");
    for act in [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8K, GgmlType::F16] {
        for &isa in &isas {
            let k = kernels_for(act, isa).unwrap();
            let x: Vec<f32> = (0..4096).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let mut a = vec![0u8; act.row_bytes(4096).unwrap()];
            let start = Instant::now();
            let mut iters = 0usize;
            while start.elapsed() < Duration::from_millis(100) {
                (k.quantize_act)(black_box(&x), &mut a);
                iters += 1;
            }
            black_box(&a);
            let rate = (iters * 4096) as f64 / start.elapsed().as_secs_f64() / 1e6;
            println!("{:<6} {:<8} {:10.0}", act.name(), isa.name(), rate);
        }
    }
}
