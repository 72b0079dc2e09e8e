//! Throughput benchmarks, ignored by default. Run optimised:
//! `cargo test --release -p realm-engine --lib -- --ignored --nocapture quant_bench`
//! (`gemm_bench` for the matrix-matrix kernels; `QUANT_BENCH_TYPES=Q4_K,Q8_0` limits the types).
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

/// `rows` rows of `k` elements of `ty`: a few quantized random rows, tiled.
fn weight_matrix(ty: GgmlType, k: usize, rows: usize, rng: &mut SmallRng) -> Vec<u8> {
    let rb = ty.row_bytes(k).unwrap();
    let mut tile = Vec::new();
    for _ in 0..8 {
        let x: Vec<f32> = (0..k).map(|_| rng.random_range(-0.05f32..0.05)).collect();
        let mut q = vec![0u8; rb];
        quantize_row(ty, &x, &mut q).unwrap();
        tile.extend_from_slice(&q);
    }
    tile.iter().copied().cycle().take(rows * rb).collect()
}

/// Best GMAC/s (k·rows·cols multiply-adds per second) of each of `fs` over several trials. The
/// variants take turns, so that load from other processes on a shared machine hits all of them
/// alike, and the best trial of each is what the kernel can do.
fn gmacs<const V: usize>(macs: usize, fs: [&mut dyn FnMut(); V]) -> [f64; V] {
    let mut fs = fs;
    for f in fs.iter_mut() {
        f();
    }
    let mut best = [0f64; V];
    for _ in 0..9 {
        for (f, b) in fs.iter_mut().zip(best.iter_mut()) {
            let start = Instant::now();
            let mut passes = 0usize;
            while passes < 2 || start.elapsed() < Duration::from_millis(60) {
                f();
                passes += 1;
            }
            *b = b.max((passes * macs) as f64 / start.elapsed().as_secs_f64() / 1e9);
        }
    }
    best
}

/// Prefill matmul throughput, one thread: (a) `vec_dot` per (row, token), tokens in blocks of
/// 16 per weight row (the CPU backend's loop before gemm), against (b) `gemm` over the whole
/// matrix in one call and (c) `gemm` called on 64-row × 64-token tiles.
#[test]
#[ignore]
fn gemm_bench() {
    let only: Option<Vec<GgmlType>> = std::env::var("QUANT_BENCH_TYPES")
        .ok()
        .map(|s| s.split(',').filter_map(GgmlType::from_name).collect());
    println!(
        "detected {:?}; GMAC/s = k·rows·cols / time, one thread, best of 5",
        detected_isa()
    );
    println!(
        "{:<6} {:>5} {:>5} {:>5} {:>10} {:>10} {:>10} {:>8}",
        "type", "k", "rows", "cols", "vec_dot", "gemm", "gemm 64²", "speedup"
    );
    let mut rng = SmallRng::seed_from_u64(2);
    let shapes = [
        (GgmlType::Q5_0, 640, 2048, 128),
        (GgmlType::Q8_0, 640, 2048, 128),
        (GgmlType::Q4_0, 640, 2048, 128),
        (GgmlType::Q4_1, 640, 2048, 128),
        (GgmlType::Q5_1, 640, 2048, 128),
        (GgmlType::Q8_0, 2048, 640, 128),
        (GgmlType::Q4K, 2048, 640, 128),
        (GgmlType::Q6K, 2048, 640, 128),
        (GgmlType::Q5K, 2048, 640, 128),
        (GgmlType::Q3K, 2048, 640, 128),
        (GgmlType::Q2K, 2048, 640, 128),
        // One token (decode): gemm over a single activation row against the plain matvec.
        (GgmlType::Q5_0, 640, 2048, 1),
        (GgmlType::Q8_0, 640, 2048, 1),
        (GgmlType::Q4K, 2048, 640, 1),
        (GgmlType::Q6K, 2048, 640, 1),
    ];
    for (ty, k, rows, cols) in shapes {
        if only.as_ref().is_some_and(|o| !o.contains(&ty)) {
            continue;
        }
        let kern = kernels(ty);
        let w = weight_matrix(ty, k, rows, &mut rng);
        let wrb = ty.row_bytes(k).unwrap();
        let arb = kern.act_type.row_bytes(k).unwrap();
        let mut a = vec![0u8; cols * arb];
        for row in a.chunks_exact_mut(arb) {
            let x: Vec<f32> = (0..k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            (kern.quantize_act)(&x, row);
        }
        let mut out = vec![0f32; rows * cols];
        let macs = k * rows * cols;
        let mut out2 = out.clone();
        let mut out3 = out.clone();
        let mut looped = || {
            for t0 in (0..cols).step_by(16) {
                for r in 0..rows {
                    let wr = &w[r * wrb..(r + 1) * wrb];
                    for t in t0..(t0 + 16).min(cols) {
                        out[r * cols + t] = (kern.vec_dot)(k, wr, &a[t * arb..(t + 1) * arb]);
                    }
                }
            }
            black_box(&mut out);
        };
        let mut whole = || {
            (kern.gemm)(k, &w, wrb, rows, &a, arb, cols, &mut out2, cols);
            black_box(&mut out2);
        };
        let mut tiled = || {
            for r0 in (0..rows).step_by(64) {
                let nr = (rows - r0).min(64);
                for c0 in (0..cols).step_by(64) {
                    let nc = (cols - c0).min(64);
                    (kern.gemm)(
                        k,
                        &w[r0 * wrb..],
                        wrb,
                        nr,
                        &a[c0 * arb..],
                        arb,
                        nc,
                        &mut out3[r0 * cols + c0..],
                        cols,
                    );
                }
            }
            black_box(&mut out3);
        };
        let [looped, whole, tiled] = gmacs(macs, [&mut looped, &mut whole, &mut tiled]);
        println!(
            "{:<6} {:>5} {:>5} {:>5} {:10.1} {:10.1} {:10.1} {:7.2}x",
            ty.name(),
            k,
            rows,
            cols,
            looped,
            whole,
            tiled,
            whole.max(tiled) / looped
        );
    }
}
