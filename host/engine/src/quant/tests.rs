use half::{bf16, f16};
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::quant::scalar::nearest_int;
use crate::quant::*;

const ISAS: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

fn put_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
}

/// Offsets of the f16 scale fields in a block (f32 for Q8_K), so random blocks keep them finite.
fn scale_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
        _ => &[],
    }
}

/// Random but valid raw row of `nb` blocks of `ty`.
fn random_row(ty: GgmlType, nb: usize, rng: &mut SmallRng) -> Vec<u8> {
    let ts = ty.type_size();
    let mut w = vec![0u8; nb * ts];
    match ty {
        GgmlType::F32 => {
            for c in w.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.random_range(-2.0f32..2.0).to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in w.chunks_exact_mut(2) {
                put_f16(c, 0, rng.random_range(-2.0f32..2.0));
            }
        }
        GgmlType::BF16 => {
            for c in w.chunks_exact_mut(2) {
                let b = bf16::from_f32(rng.random_range(-2.0f32..2.0));
                c.copy_from_slice(&b.to_bits().to_le_bytes());
            }
        }
        _ => {
            rng.fill(&mut w[..]);
            for b in w.chunks_exact_mut(ts) {
                if ty == GgmlType::Q8K {
                    b[..4].copy_from_slice(&rng.random_range(-0.05f32..0.05).to_le_bytes());
                }
                for &off in scale_fields(ty) {
                    put_f16(b, off, rng.random_range(-0.05f32..0.05));
                }
            }
        }
    }
    w
}

/// Activations with a per-row magnitude that varies over orders of magnitude, plus the odd
/// outlier, exact zero and exact tie so the quantizers' edge cases get exercised.
fn random_acts(n: usize, rng: &mut SmallRng) -> Vec<f32> {
    let scale = 10f32.powf(rng.random_range(-3.0f32..2.0));
    let mut x: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-1.0f32..1.0) * scale)
        .collect();
    for _ in 0..n / 16 {
        let i = rng.random_range(0..n);
        x[i] = match rng.random_range(0..4) {
            0 => 0.0,
            1 => scale * 8.0,
            2 => -scale * 8.0,
            _ => (rng.random_range(-20i32..20) as f32 + 0.5) * scale / 16.0,
        };
    }
    x
}

fn deq(ty: GgmlType, b: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    dequantize_row(ty, &b[..ty.row_bytes(n).unwrap()], &mut out);
    out
}

/// Per-element magnitude of the terms a vec_dot adds up: |scale part| + |min part| for the
/// formats with a min, else |value|. The rounding tolerance is relative to Σ parts·|act|.
fn abs_parts(ty: GgmlType, w: &[u8], n: usize) -> Vec<f32> {
    let zeroed = |offs: &[usize]| {
        let mut c = w.to_vec();
        for b in c.chunks_exact_mut(ty.type_size()) {
            for &o in offs {
                b[o] = 0;
                b[o + 1] = 0;
            }
        }
        deq(ty, &c, n)
    };
    let (scale_off, min_off): (&[usize], &[usize]) = match ty {
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => (&[0], &[2]),
        GgmlType::Q2K => (&[80], &[82]),
        _ => return deq(ty, w, n).iter().map(|v| v.abs()).collect(),
    };
    let only_scale = zeroed(min_off);
    let only_min = zeroed(scale_off);
    only_scale
        .iter()
        .zip(&only_min)
        .map(|(a, b)| a.abs() + b.abs())
        .collect()
}

fn quantize_act_ref(act: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut a = vec![0u8; act.row_bytes(x.len()).unwrap()];
    (kernels_for(act, Isa::Scalar).unwrap().quantize_act)(x, &mut a);
    a
}

fn available_isas() -> Vec<Isa> {
    ISAS.into_iter().filter(|i| cpu_supports(*i)).collect()
}

// ---------------------------------------------------------------------------------------------
// Type metadata
// ---------------------------------------------------------------------------------------------

#[test]
fn type_metadata_matches_ggml() {
    let expect = [
        ("F32", 0, 1, 4),
        ("F16", 1, 1, 2),
        ("Q4_0", 2, 32, 18),
        ("Q4_1", 3, 32, 20),
        ("Q5_0", 6, 32, 22),
        ("Q5_1", 7, 32, 24),
        ("Q8_0", 8, 32, 34),
        ("Q8_1", 9, 32, 36),
        ("Q2_K", 10, 256, 84),
        ("Q3_K", 11, 256, 110),
        ("Q4_K", 12, 256, 144),
        ("Q5_K", 13, 256, 176),
        ("Q6_K", 14, 256, 210),
        ("Q8_K", 15, 256, 292),
        ("BF16", 30, 1, 2),
    ];
    for (name, id, bs, ts) in expect {
        let t = GgmlType::from_u32(id).unwrap();
        assert_eq!(t.name(), name);
        assert_eq!(t as u32, id);
        assert_eq!(GgmlType::from_name(name), Some(t));
        assert_eq!(GgmlType::from_name(&name.to_lowercase()), Some(t));
        assert_eq!(t.block_size(), bs);
        assert_eq!(t.type_size(), ts);
        assert_eq!(t.row_bytes(bs * 3), Some(ts * 3));
        assert_eq!(t.is_quantized(), bs > 1);
    }
    assert_eq!(GgmlType::from_u32(4), None);
    assert_eq!(GgmlType::from_u32(16), None);
    assert_eq!(GgmlType::from_name("Q4_2"), None);
    assert_eq!(GgmlType::Q4K.row_bytes(100), None);
    assert_eq!(GgmlType::Q4_0.vec_dot_type(), GgmlType::Q8_0);
    assert_eq!(GgmlType::Q5_1.vec_dot_type(), GgmlType::Q8_1);
    assert_eq!(GgmlType::Q3K.vec_dot_type(), GgmlType::Q8K);
    assert_eq!(GgmlType::BF16.vec_dot_type(), GgmlType::BF16);
}

#[test]
fn dispatch_is_consistent() {
    assert!(cpu_supports(detected_isa()));
    for ty in GgmlType::ALL {
        let k = kernels(ty);
        assert_eq!(k.weight_type, ty);
        assert_eq!(k.act_type, ty.vec_dot_type());
        assert!(kernels_for(ty, Isa::Scalar).is_some());
    }
    for isa in ISAS {
        assert_eq!(kernels_for(GgmlType::Q4K, isa).is_some(), cpu_supports(isa));
    }
}

#[test]
fn quantize_row_rejects_bad_lengths() {
    let mut dst = vec![0u8; 18];
    assert!(matches!(
        quantize_row(GgmlType::Q4_0, &[0.0; 31], &mut dst),
        Err(QuantError::PartialBlock { .. })
    ));
    assert!(matches!(
        quantize_row(GgmlType::Q4_0, &[0.0; 64], &mut dst),
        Err(QuantError::BadLength {
            expected: 36,
            got: 18,
            ..
        })
    ));
}

#[test]
#[should_panic]
fn vec_dot_rejects_short_rows() {
    let k = kernels(GgmlType::Q4K);
    (k.vec_dot)(512, &[0u8; 144], &[0u8; 2 * 292]);
}

// ---------------------------------------------------------------------------------------------
// Known values
// ---------------------------------------------------------------------------------------------

#[test]
fn nearest_int_rounds_half_to_even() {
    assert_eq!(nearest_int(2.5), 2);
    assert_eq!(nearest_int(3.5), 4);
    assert_eq!(nearest_int(-2.5), -2);
    assert_eq!(nearest_int(-0.4), 0);
    assert_eq!(nearest_int(126.7), 127);
}

#[test]
fn q4_0_nibbles_dequantize_to_minus8_to_7() {
    let mut b = [0u8; 18];
    put_f16(&mut b, 0, 1.0);
    for j in 0..16 {
        b[2 + j] = (j as u8) | ((15 - j as u8) << 4);
    }
    let y = deq(GgmlType::Q4_0, &b, 32);
    for j in 0..16 {
        assert_eq!(y[j], j as f32 - 8.0);
        assert_eq!(y[16 + j], 7.0 - j as f32);
    }
}

/// Activations follow llama.cpp's x86 quantizer (ties to even); weights written to GGUF follow
/// ggml's reference quantizer (ties away from zero).
#[test]
fn q8_0_rounding_of_activations_and_weights() {
    let mut x = [0f32; 32];
    x[0] = 127.0; // amax 127 → d = 1 exactly
    x[1] = 2.5;
    x[2] = -2.5;
    x[3] = 0.5;
    x[4] = -0.5;
    x[5] = 1.49;
    x[6] = -127.0;
    for isa in available_isas() {
        let mut b = [0u8; 34];
        (kernels_for(GgmlType::Q8_0, isa).unwrap().quantize_act)(&x, &mut b);
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), 0x3C00, "{isa:?}");
        let q: Vec<i8> = b[2..9].iter().map(|&v| v as i8).collect();
        assert_eq!(q, [127, 2, -2, 0, 0, 1, -127], "{isa:?}");
    }
    let mut b = [0u8; 34];
    quantize_row(GgmlType::Q8_0, &x, &mut b).unwrap();
    let q: Vec<i8> = b[2..9].iter().map(|&v| v as i8).collect();
    assert_eq!(q, [127, 3, -3, 1, -1, 1, -127]);
}

#[test]
fn q8k_quantization_of_a_ramp() {
    let x: Vec<f32> = (0..256).map(|i| i as f32 - 128.0).collect();
    let iscale = -127.0f32 / -128.0;
    for isa in available_isas() {
        let mut b = vec![0u8; 292];
        (kernels_for(GgmlType::Q8K, isa).unwrap().quantize_act)(&x, &mut b);
        let d = f32::from_le_bytes(b[0..4].try_into().unwrap());
        assert_eq!(d, 1.0 / iscale);
        let q: Vec<i32> = b[4..260].iter().map(|&v| v as i8 as i32).collect();
        assert_eq!(q[0], -127);
        assert_eq!(q[128], 0);
        assert_eq!(q[255], 126);
        for (i, &qi) in q.iter().enumerate() {
            assert_eq!(
                qi,
                (iscale * x[i]).round_ties_even() as i32,
                "{isa:?} element {i}"
            );
        }
        for g in 0..16 {
            let bs = i16::from_le_bytes([b[260 + 2 * g], b[261 + 2 * g]]) as i32;
            assert_eq!(bs, q[16 * g..16 * g + 16].iter().sum::<i32>());
        }
    }
}

#[test]
fn q8k_keeps_sign_of_first_extreme() {
    // +3 and -3 tie for the largest magnitude; ggml keeps the first one it meets.
    // iscale = -127/max, so the first extreme always quantizes to -127 and d takes its sign.
    for first in [-3.0f32, 3.0] {
        let mut x = vec![0.5f32; 256];
        x[10] = first;
        x[20] = -first;
        for isa in available_isas() {
            let mut b = vec![0u8; 292];
            (kernels_for(GgmlType::Q8K, isa).unwrap().quantize_act)(&x, &mut b);
            assert_eq!(b[4 + 10] as i8, -127, "{isa:?}");
            assert_eq!(b[4 + 20] as i8, 127, "{isa:?}");
            let d = f32::from_le_bytes(b[0..4].try_into().unwrap());
            assert_eq!(d.signum(), -first.signum(), "{isa:?}");
        }
    }
}

#[test]
fn q4k_hand_built_block() {
    let mut b = [0u8; 144];
    put_f16(&mut b, 0, 1.0);
    put_f16(&mut b, 2, 0.5);
    // Sub-block j: scale j+1, min j (all < 16, so the 6-bit high parts stay zero).
    for j in 0..4 {
        b[4 + j] = j as u8 + 1;
        b[8 + j] = j as u8;
        b[12 + j] = (j as u8 + 5) | ((j as u8 + 4) << 4);
    }
    for c in 0..4 {
        for l in 0..32 {
            b[16 + 32 * c + l] = 3 | (7 << 4);
        }
    }
    let y = deq(GgmlType::Q4K, &b, 256);
    for (e, v) in y.iter().enumerate() {
        let j = e / 32;
        let q = if (e / 32) % 2 == 0 { 3.0 } else { 7.0 };
        assert_eq!(*v, (j as f32 + 1.0) * q - 0.5 * j as f32, "element {e}");
    }
}

#[test]
fn q6k_hand_built_block() {
    // Element e holds (e % 64) - 32 with all scales 1 and d = 0.5, packed per ggml's layout.
    let l: Vec<u8> = (0..256).map(|e| (e % 64) as u8).collect();
    let mut b = [0u8; 210];
    for n in 0..2 {
        for i in 0..32 {
            let q = |k: usize| l[128 * n + i + 32 * k];
            b[64 * n + i] = (q(0) & 0xF) | ((q(2) & 0xF) << 4);
            b[64 * n + 32 + i] = (q(1) & 0xF) | ((q(3) & 0xF) << 4);
            b[128 + 32 * n + i] =
                (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
    b[192..208].fill(1);
    put_f16(&mut b, 208, 0.5);
    let y = deq(GgmlType::Q6K, &b, 256);
    for (e, v) in y.iter().enumerate() {
        assert_eq!(*v, 0.5 * ((e % 64) as f32 - 32.0), "element {e}");
    }
}

#[test]
fn q3k_and_q2k_decode_extremes() {
    // Q3_K with every scale at +31 (raw 63), all low bits 3 and high bits set: 31·3·d.
    let mut b = [0u8; 110];
    b[..32].fill(0xFF);
    b[32..96].fill(0xFF);
    b[96..108].fill(0xFF);
    put_f16(&mut b, 108, 0.25);
    assert!(
        deq(GgmlType::Q3K, &b, 256)
            .iter()
            .all(|&v| v == 0.25 * 31.0 * 3.0)
    );
    // ...and with the high bits clear the quants are 3 - 4 = -1.
    b[..32].fill(0);
    assert!(
        deq(GgmlType::Q3K, &b, 256)
            .iter()
            .all(|&v| v == -0.25 * 31.0)
    );
    // Q2_K: scale 15, min 15, quant 3 → 15·3·d - 15·dmin.
    let mut b = [0u8; 84];
    b[..80].fill(0xFF);
    put_f16(&mut b, 80, 0.5);
    put_f16(&mut b, 82, 0.25);
    assert!(
        deq(GgmlType::Q2K, &b, 256)
            .iter()
            .all(|&v| v == 0.5 * 45.0 - 0.25 * 15.0)
    );
}

// ---------------------------------------------------------------------------------------------
// Quantize → dequantize round trips
// ---------------------------------------------------------------------------------------------

fn gaussianish(n: usize, rng: &mut SmallRng) -> Vec<f32> {
    (0..n)
        .map(|_| (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum::<f32>() * 0.02)
        .collect()
}

#[test]
fn round_trip_error_bounds() {
    let mut rng = SmallRng::seed_from_u64(7);
    let x = gaussianish(4096, &mut rng);
    let bounds = [
        (GgmlType::F32, 0.0),
        (GgmlType::F16, 0.001),
        (GgmlType::BF16, 0.005),
        (GgmlType::Q8_0, 0.01),
        (GgmlType::Q8_1, 0.01),
        (GgmlType::Q8K, 0.01),
        (GgmlType::Q6K, 0.025),
        (GgmlType::Q5_0, 0.06),
        (GgmlType::Q5_1, 0.05),
        (GgmlType::Q5K, 0.04),
        (GgmlType::Q4_0, 0.12),
        (GgmlType::Q4_1, 0.10),
        (GgmlType::Q4K, 0.08),
        (GgmlType::Q3K, 0.20),
        (GgmlType::Q2K, 0.40),
    ];
    for (ty, bound) in bounds {
        let mut q = vec![0u8; ty.row_bytes(x.len()).unwrap()];
        quantize_row(ty, &x, &mut q).unwrap();
        let y = deq(ty, &q, x.len());
        let err: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let norm: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
        let rel = (err / norm).sqrt();
        assert!(rel <= bound, "{ty}: relative RMSE {rel:.4} > {bound}");
    }
}

#[test]
fn quantizers_handle_zero_and_constant_rows() {
    for ty in GgmlType::ALL {
        let n = 2 * ty.block_size().max(32);
        for fill in [0.0f32, 0.37, -2.0] {
            let x = vec![fill; n];
            let mut q = vec![0u8; ty.row_bytes(n).unwrap()];
            quantize_row(ty, &x, &mut q).unwrap();
            let y = deq(ty, &q, n);
            for v in &y {
                assert!(
                    (v - fill).abs() <= 0.08 * fill.abs() + 1e-6,
                    "{ty}: {fill} -> {v}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SIMD against scalar
// ---------------------------------------------------------------------------------------------

fn check_simd_vec_dot(ty: GgmlType, seed: u64, nb: usize) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let n = nb * ty.block_size() * if ty.block_size() == 1 { 37 } else { 1 };
    let w = random_row(ty, n / ty.block_size(), &mut rng);
    let act_ty = ty.vec_dot_type();
    let a = quantize_act_ref(act_ty, &random_acts(n, &mut rng));
    let reference = (kernels_for(ty, Isa::Scalar).unwrap().vec_dot)(n, &w, &a);
    let parts = abs_parts(ty, &w, n);
    let av = deq(act_ty, &a, n);
    let mag: f64 = parts
        .iter()
        .zip(&av)
        .map(|(p, a)| (p * a.abs()) as f64)
        .sum();
    for isa in available_isas() {
        let got = (kernels_for(ty, isa).unwrap().vec_dot)(n, &w, &a);
        let diff = (got as f64 - reference as f64).abs();
        assert!(
            diff <= 1e-5 * mag + 1e-30,
            "{ty} {isa:?}: {got} vs scalar {reference} (|terms| {mag})"
        );
    }
}

fn check_act_quantizers(act: GgmlType, seed: u64, nb: usize) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let n = nb * act.block_size() * if act.block_size() == 1 { 37 } else { 1 };
    let x = random_acts(n, &mut rng);
    let reference = quantize_act_ref(act, &x);
    for isa in available_isas() {
        let mut got = vec![0u8; reference.len()];
        (kernels_for(act, isa).unwrap().quantize_act)(&x, &mut got);
        assert!(
            got == reference,
            "{act} {isa:?}: SIMD quantization differs from scalar"
        );
    }
}

/// Quantized-activation dot product against the exact f64 dot of dequantized weights with the
/// original activations; the bound is the worst case of 8-bit (or f16/bf16) activation rounding.
fn check_against_float(ty: GgmlType, seed: u64, nb: usize) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let bs = ty.block_size();
    let n = nb * bs * if bs == 1 { 37 } else { 1 };
    let w = random_row(ty, n / bs, &mut rng);
    let x = random_acts(n, &mut rng);
    let wf = deq(ty, &w, n);
    let parts = abs_parts(ty, &w, n);
    let exact: f64 = wf.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
    let act = ty.vec_dot_type();
    let abs = act.block_size().max(1);
    let mut bound = 0f64;
    for (blk, (wb, xb)) in wf.chunks(abs).zip(x.chunks(abs)).enumerate() {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        for (i, (wi, xi)) in wb.iter().zip(xb).enumerate() {
            let e = match act {
                GgmlType::F32 => 0.0,
                GgmlType::F16 => xi.abs() as f64 * 2f64.powi(-10),
                GgmlType::BF16 => xi.abs() as f64 * 2f64.powi(-7),
                _ => 0.6 * amax / 127.0,
            };
            let p = parts[blk * abs + i] as f64;
            // Q4_1/Q5_1 fold the min in through the activation's f16-rounded block sum.
            let sum_rounding = if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                2e-3
            } else {
                0.0
            };
            bound += wi.abs() as f64 * e + (sum_rounding + 1e-5) * p * xi.abs() as f64;
        }
    }
    for isa in available_isas() {
        let k = kernels_for(ty, isa).unwrap();
        let mut a = vec![0u8; act.row_bytes(n).unwrap()];
        (k.quantize_act)(&x, &mut a);
        let got = (k.vec_dot)(n, &w, &a) as f64;
        assert!(
            (got - exact).abs() <= bound + 1e-30,
            "{ty} {isa:?}: {got} vs exact {exact} (bound {bound})"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn simd_vec_dot_matches_scalar(seed: u64, nb in 1usize..9) {
        for ty in GgmlType::ALL {
            check_simd_vec_dot(ty, seed, nb);
        }
    }

    #[test]
    fn simd_act_quantizers_are_byte_exact(seed: u64, nb in 1usize..9) {
        for act in [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8K, GgmlType::F16, GgmlType::BF16, GgmlType::F32] {
            check_act_quantizers(act, seed, nb);
        }
    }

    #[test]
    fn vec_dot_matches_float_dot(seed: u64, nb in 1usize..5) {
        for ty in GgmlType::ALL {
            check_against_float(ty, seed, nb);
        }
    }
}

#[test]
fn long_rows_match_scalar() {
    // Rows as long as real hidden sizes, so unrolled main loops and their tails both run.
    for ty in GgmlType::ALL {
        for nb in [16, 17, 63] {
            check_simd_vec_dot(ty, 1000 + nb as u64, nb);
        }
    }
}

#[test]
fn unaligned_rows() {
    // Rows starting at odd addresses (as 144-byte Q4_K rows do inside a tensor).
    let mut rng = SmallRng::seed_from_u64(3);
    for ty in GgmlType::ALL {
        let n = 4 * ty.block_size().max(64);
        let w = random_row(ty, n / ty.block_size(), &mut rng);
        let a = quantize_act_ref(ty.vec_dot_type(), &random_acts(n, &mut rng));
        let reference = (kernels_for(ty, Isa::Scalar).unwrap().vec_dot)(n, &w, &a);
        let mut wbuf = vec![0u8; w.len() + 1];
        wbuf[1..].copy_from_slice(&w);
        let mut abuf = vec![0u8; a.len() + 3];
        abuf[3..].copy_from_slice(&a);
        for isa in available_isas() {
            let got = (kernels_for(ty, isa).unwrap().vec_dot)(n, &wbuf[1..], &abuf[3..]);
            assert!(
                (got - reference).abs() <= 1e-4 * reference.abs().max(1e-3),
                "{ty} {isa:?}"
            );
        }
    }
}

#[test]
fn f16_and_bf16_row_helpers() {
    let mut rng = SmallRng::seed_from_u64(11);
    let x: Vec<f32> = (0..77)
        .map(|_| rng.random_range(-100.0f32..100.0))
        .collect();
    let mut h = vec![0u8; 154];
    quantize_row(GgmlType::F16, &x, &mut h).unwrap();
    let mut y = vec![0f32; 77];
    f16_to_f32_row(&h, &mut y);
    for (a, b) in x.iter().zip(&y) {
        assert_eq!(*b, f16::from_f32(*a).to_f32());
    }
    quantize_row(GgmlType::BF16, &x, &mut h).unwrap();
    bf16_to_f32_row(&h, &mut y);
    for (a, b) in x.iter().zip(&y) {
        assert_eq!(*b, bf16::from_f32(*a).to_f32());
    }
}

// ---------------------------------------------------------------------------------------------
// gemm against vec_dot
// ---------------------------------------------------------------------------------------------

/// A gemm problem: `rows` weight rows and `cols` activation rows of `nb` blocks, stored with
/// padded strides at odd offsets inside their buffers.
struct GemmCase {
    ty: GgmlType,
    k: usize,
    rows: usize,
    cols: usize,
    w: Vec<u8>,
    w_off: usize,
    w_stride: usize,
    a: Vec<u8>,
    a_off: usize,
    a_stride: usize,
}

impl GemmCase {
    fn new(ty: GgmlType, nb: usize, rows: usize, cols: usize, rng: &mut SmallRng) -> Self {
        let k = nb * ty.block_size();
        let act = ty.vec_dot_type();
        let (wrb, arb) = (ty.row_bytes(k).unwrap(), act.row_bytes(k).unwrap());
        let (w_off, a_off) = (rng.random_range(0..8), rng.random_range(0..8));
        let w_stride = wrb + rng.random_range(0..3) * 7;
        let a_stride = arb + rng.random_range(0..3) * 5;
        let mut w = vec![0xA5u8; w_off + rows * w_stride];
        for r in 0..rows {
            let o = w_off + r * w_stride;
            w[o..o + wrb].copy_from_slice(&random_row(ty, nb, rng));
        }
        let mut a = vec![0x5Au8; a_off + cols * a_stride];
        for c in 0..cols {
            let o = a_off + c * a_stride;
            a[o..o + arb].copy_from_slice(&quantize_act_ref(act, &random_acts(k, rng)));
        }
        GemmCase {
            ty,
            k,
            rows,
            cols,
            w,
            w_off,
            w_stride,
            a,
            a_off,
            a_stride,
        }
    }

    fn w_row(&self, r: usize) -> &[u8] {
        let o = self.w_off + r * self.w_stride;
        &self.w[o..o + self.ty.row_bytes(self.k).unwrap()]
    }

    fn a_row(&self, c: usize) -> &[u8] {
        let o = self.a_off + c * self.a_stride;
        &self.a[o..o + self.ty.vec_dot_type().row_bytes(self.k).unwrap()]
    }

    /// Runs `k.gemm` into an output with `pad` spare columns per row, filled with a sentinel.
    fn run(&self, k: &Kernels, pad: usize) -> (Vec<f32>, usize) {
        let stride = self.cols + pad;
        let mut out = vec![f32::NAN; self.rows * stride];
        (k.gemm)(
            self.k,
            &self.w[self.w_off..],
            self.w_stride,
            self.rows,
            &self.a[self.a_off..],
            self.a_stride,
            self.cols,
            &mut out,
            stride,
        );
        (out, stride)
    }
}

/// Every ISA's gemm against the scalar vec_dot of every (row, column), within 1e-5 of the sum
/// of the magnitudes of the terms; the scalar gemm must be bit-identical to it.
fn check_gemm(ty: GgmlType, seed: u64, nb: usize, rows: usize, cols: usize) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let case = GemmCase::new(ty, nb, rows, cols, &mut rng);
    let act = ty.vec_dot_type();
    let scalar = kernels_for(ty, Isa::Scalar).unwrap();
    let mut reference = vec![0f32; rows * cols];
    let mut mag = vec![0f64; rows * cols];
    let acts: Vec<Vec<f32>> = (0..cols).map(|c| deq(act, case.a_row(c), case.k)).collect();
    for r in 0..rows {
        let parts = abs_parts(ty, case.w_row(r), case.k);
        for c in 0..cols {
            reference[r * cols + c] = (scalar.vec_dot)(case.k, case.w_row(r), case.a_row(c));
            mag[r * cols + c] = parts
                .iter()
                .zip(&acts[c])
                .map(|(p, a)| (p * a.abs()) as f64)
                .sum();
        }
    }
    let pad = rng.random_range(0..3);
    for isa in available_isas() {
        let k = kernels_for(ty, isa).unwrap();
        let (out, stride) = case.run(&k, pad);
        for r in 0..rows {
            for c in 0..cols {
                let (got, want) = (out[r * stride + c], reference[r * cols + c]);
                if isa == Isa::Scalar {
                    assert_eq!(got.to_bits(), want.to_bits(), "{ty} scalar gemm ({r}, {c})");
                }
                let diff = (got as f64 - want as f64).abs();
                assert!(
                    diff <= 1e-5 * mag[r * cols + c] + 1e-30,
                    "{ty} {isa:?} gemm {rows}×{cols}, nb {nb}, ({r}, {c}): {got} vs vec_dot \
                     {want} (|terms| {})",
                    mag[r * cols + c]
                );
            }
            for c in cols..stride {
                assert!(
                    out[r * stride + c].is_nan(),
                    "{ty} {isa:?}: wrote past column {c}"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn gemm_matches_vec_dot(
        seed: u64,
        nb in 1usize..6,
        rows in 1usize..10,
        cols in 1usize..12,
    ) {
        for ty in GgmlType::ALL {
            let nb = if ty.block_size() == 1 { nb * 8 } else { nb };
            check_gemm(ty, seed, nb, rows, cols);
        }
    }
}

#[test]
fn gemm_small_and_edge_shapes() {
    // 1×1, a single block, and shapes straddling every microkernel remainder.
    for ty in GgmlType::ALL {
        for (i, (nb, rows, cols)) in [(1, 1, 1), (1, 7, 5), (2, 1, 9), (3, 4, 1), (1, 6, 8)]
            .into_iter()
            .enumerate()
        {
            check_gemm(ty, 77 + i as u64, nb, rows, cols);
        }
    }
}

#[test]
fn gemm_large_tiles() {
    // Real row lengths (Gemma 3 270M: 640 and 2048) and more columns than one column tile.
    for ty in GgmlType::ALL {
        if !ty.is_quantized() || ty == GgmlType::Q8_1 {
            continue;
        }
        let nb = if ty.block_size() == QK { 20 } else { 8 };
        check_gemm(ty, 500, nb, 13, 70);
        check_gemm(ty, 501, nb + 1, 32, 17);
    }
}

#[test]
fn gemm_long_rows() {
    // Rows longer than the kernels' k-chunk (2048 quants), ending in a partial chunk.
    for ty in GgmlType::ALL {
        if !ty.is_quantized() || ty == GgmlType::Q8_1 {
            continue;
        }
        let nb = if ty.block_size() == QK { 131 } else { 17 };
        check_gemm(ty, 600, nb, 5, 6);
    }
}

#[test]
fn gemm_of_empty_rows_is_zero() {
    for ty in GgmlType::ALL {
        for isa in available_isas() {
            let k = kernels_for(ty, isa).unwrap();
            let mut out = [7.0f32; 7];
            (k.gemm)(0, &[], 0, 2, &[], 0, 3, &mut out, 4);
            assert_eq!(out, [0.0, 0.0, 0.0, 7.0, 0.0, 0.0, 0.0], "{ty} {isa:?}");
        }
    }
}

#[test]
fn gemm_does_not_depend_on_how_columns_are_grouped() {
    // Each result must be the same bits whether its activation row came alone, in a small group
    // or among many (so a decode step through gemm reproduces the prefill exactly).
    let mut rng = SmallRng::seed_from_u64(21);
    for ty in GgmlType::ALL {
        let nb = if ty.block_size() == 1 { 64 } else { 3 };
        let case = GemmCase::new(ty, nb, 6, 11, &mut rng);
        for isa in available_isas() {
            let k = kernels_for(ty, isa).unwrap();
            let (all, stride) = case.run(&k, 0);
            for split in [1, 2, 3, 5] {
                for c0 in (0..case.cols).step_by(split) {
                    let n = split.min(case.cols - c0);
                    let mut out = vec![0f32; case.rows * n];
                    let a = &case.a[case.a_off + c0 * case.a_stride..];
                    let w = &case.w[case.w_off..];
                    (k.gemm)(
                        case.k,
                        w,
                        case.w_stride,
                        case.rows,
                        a,
                        case.a_stride,
                        n,
                        &mut out,
                        n,
                    );
                    for r in 0..case.rows {
                        for c in 0..n {
                            assert_eq!(
                                out[r * n + c].to_bits(),
                                all[r * stride + c0 + c].to_bits(),
                                "{ty} {isa:?}: row {r}, column {} in groups of {split}",
                                c0 + c
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn gemm_of_nothing_is_a_no_op() {
    for ty in GgmlType::ALL {
        for isa in available_isas() {
            let k = kernels_for(ty, isa).unwrap();
            let mut out = [7.0f32; 4];
            (k.gemm)(ty.block_size(), &[], 0, 0, &[], 0, 3, &mut out, 3);
            (k.gemm)(ty.block_size(), &[], 0, 2, &[], 0, 0, &mut out, 0);
            assert_eq!(out, [7.0; 4], "{ty} {isa:?}");
        }
    }
}

#[test]
fn gemm_rejects_short_slices() {
    let ty = GgmlType::Q5_0;
    let mut rng = SmallRng::seed_from_u64(9);
    let case = GemmCase::new(ty, 2, 3, 2, &mut rng);
    for isa in available_isas() {
        let k = kernels_for(ty, isa).unwrap();
        let w = &case.w[case.w_off..];
        let a = &case.a[case.a_off..];
        let short_w = &w[..2 * case.w_stride + 43];
        let short_a = &a[..case.a_stride + 67];
        let calls: [(&[u8], &[u8], usize); 3] = [(short_w, a, 6), (w, short_a, 6), (w, a, 5)];
        for (wi, ai, out_len) in calls {
            let r = std::panic::catch_unwind(|| {
                let mut out = vec![0f32; out_len];
                (k.gemm)(64, wi, case.w_stride, 3, ai, case.a_stride, 2, &mut out, 2);
            });
            assert!(r.is_err(), "{isa:?}: short slice accepted");
        }
    }
}

#[test]
fn tiled_gemm_where_expected() {
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ] {
        assert_eq!(gemm_is_tiled(ty, Isa::Scalar), Some(false));
        if cpu_supports(Isa::Avx2) {
            assert_eq!(gemm_is_tiled(ty, Isa::Avx2), Some(true), "{ty}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// gemv against vec_dot
// ---------------------------------------------------------------------------------------------

/// Every ISA's gemv against the same ISA's vec_dot of every row: bit-identical (decode through
/// gemv must give exactly the logits a per-row loop gives), and nothing written past the end.
fn check_gemv(ty: GgmlType, seed: u64, nb: usize, rows: usize) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let case = GemmCase::new(ty, nb, rows, 1, &mut rng);
    for isa in available_isas() {
        let k = kernels_for(ty, isa).unwrap();
        let mut out = vec![f32::NAN; rows + 1];
        (k.gemv)(
            case.k,
            &case.w[case.w_off..],
            case.w_stride,
            case.a_row(0),
            &mut out[..rows],
        );
        for (r, got) in out[..rows].iter().enumerate() {
            let want = (k.vec_dot)(case.k, case.w_row(r), case.a_row(0));
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{ty} {isa:?} gemv of {rows} rows, nb {nb}, row {r}: {got} vs vec_dot {want}"
            );
        }
        assert!(out[rows].is_nan(), "{ty} {isa:?}: gemv wrote past its rows");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    // Rows around the Q8_0 kernel's 4-row step; blocks around its 8-block scale groups.
    #[test]
    fn gemv_matches_vec_dot_bit_for_bit(seed: u64, nb in 1usize..26, rows in 0usize..11) {
        for ty in GgmlType::ALL {
            let nb = if ty.block_size() == 1 { nb * 8 } else { nb };
            check_gemv(ty, seed, nb, rows);
        }
    }
}

#[test]
fn gemv_of_a_long_matrix_matches_vec_dot() {
    // Longer than the prefetch distance, so the prefetcher's end-of-slice clamp is exercised.
    for ty in [GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q4K, GgmlType::Q6K] {
        let nb = if ty.block_size() == QK { 20 } else { 3 };
        check_gemv(ty, 31, nb, 203);
    }
}

#[test]
fn gemv_rejects_short_slices() {
    for ty in [GgmlType::Q8_0, GgmlType::Q5_0] {
        let mut rng = SmallRng::seed_from_u64(10);
        let case = GemmCase::new(ty, 3, 9, 1, &mut rng);
        for isa in available_isas() {
            let k = kernels_for(ty, isa).unwrap();
            let w = &case.w[case.w_off..];
            let a = case.a_row(0);
            let short_w = &w[..8 * case.w_stride + ty.row_bytes(case.k).unwrap() - 1];
            let short_a = &a[..a.len() - 1];
            for (wi, ai) in [(short_w, a), (w, short_a)] {
                let r = std::panic::catch_unwind(|| {
                    let mut out = vec![0f32; 9];
                    (k.gemv)(case.k, wi, case.w_stride, ai, &mut out);
                });
                assert!(r.is_err(), "{ty} {isa:?}: short slice accepted");
            }
        }
    }
}

/// Relative tolerance of a SIMD sum against the scalar twin: FMA and another summation order
/// change only the rounding, bounded by a few ulps of the sum of magnitudes.
fn assert_sum_close(got: f32, want: f32, mag: f32, what: &str) {
    assert!(
        (got - want).abs() <= 1e-6 * mag.max(1.0),
        "{what}: {got} vs {want}"
    );
}

#[test]
fn weighted_sum_simd_matches_scalar() {
    let mut rng = SmallRng::seed_from_u64(77);
    // Query counts 1-6 (the kernels take up to four at a time); widths that exercise the
    // register blocks, the 8-wide blocks and the scalar tail; strides equal to and wider than
    // the row, as attention's values use them (kv_dim >= head_dim).
    let shapes: [(usize, usize, usize); 6] = [
        (1, 64, 0),
        (7, 256, 0),
        (37, 256, 768),
        (5, 130, 3),
        (3, 5, 1),
        (0, 16, 0),
    ];
    for nq in 1..=6 {
        for (m, n, extra) in shapes {
            let stride = n + extra;
            let ws: Vec<f32> = (0..nq * m).map(|_| rng.random::<f32>()).collect();
            let rows = gaussianish(m.saturating_sub(1) * stride + n, &mut rng);
            let mut want = vec![f32::NAN; nq * n];
            weighted_sum_for(Isa::Scalar).unwrap()(&ws, nq, &rows, stride, &mut want);
            for q in 0..nq {
                for d in 0..n {
                    let exact: f64 = (0..m)
                        .map(|j| ws[q * m + j] as f64 * rows[j * stride + d] as f64)
                        .sum();
                    assert!(
                        (want[q * n + d] as f64 - exact).abs() < 1e-5,
                        "scalar {q} {d}"
                    );
                }
            }
            for isa in available_isas() {
                let mut got = vec![f32::NAN; nq * n];
                weighted_sum_for(isa).unwrap()(&ws, nq, &rows, stride, &mut got);
                for q in 0..nq {
                    for d in 0..n {
                        let mag: f32 = (0..m)
                            .map(|j| (ws[q * m + j] * rows[j * stride + d]).abs())
                            .sum();
                        let what = format!("{isa:?} nq={nq} m={m} n={n} q={q} col {d}");
                        assert_sum_close(got[q * n + d], want[q * n + d], mag, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn weighted_sum_rejects_bad_shapes() {
    for isa in available_isas() {
        let f = weighted_sum_for(isa).unwrap();
        for (ws, nq, rows, out) in [
            (vec![1.0; 2], 1, 15, 8), // two rows of 8 at stride 8 need 16 values
            (vec![1.0; 3], 2, 64, 8), // 3 weights do not split into 2 queries
            (vec![1.0; 2], 2, 64, 7), // nor do 7 outputs
            (vec![1.0; 2], 0, 64, 8), // no queries
        ] {
            let r = std::panic::catch_unwind(|| {
                let mut out = vec![0f32; out];
                f(&ws, nq, &vec![0.0; rows], 8, &mut out);
            });
            assert!(r.is_err(), "{isa:?}: bad shape accepted");
        }
    }
}

#[test]
fn dot_rows_simd_matches_scalar() {
    let mut rng = SmallRng::seed_from_u64(78);
    // Query counts 1-6; row counts that exercise the row blocks and the single-row tail;
    // lengths with and without a scalar tail; strides equal to and wider than the row.
    let shapes: [(usize, usize, usize); 6] = [
        (1, 8, 0),
        (4, 256, 0),
        (37, 256, 768),
        (6, 130, 3),
        (3, 5, 1),
        (0, 8, 0),
    ];
    for nq in 1..=6 {
        for (m, n, extra) in shapes {
            let stride = n + extra;
            let xs = gaussianish(nq * n, &mut rng);
            let rows = gaussianish(m.saturating_sub(1) * stride + n, &mut rng);
            let mut want = vec![f32::NAN; nq * m];
            dot_rows_for(Isa::Scalar).unwrap()(&xs, nq, &rows, stride, &mut want);
            for q in 0..nq {
                for j in 0..m {
                    let exact: f64 = (0..n)
                        .map(|d| xs[q * n + d] as f64 * rows[j * stride + d] as f64)
                        .sum();
                    assert!(
                        (want[q * m + j] as f64 - exact).abs() < 1e-4,
                        "scalar {q} {j}"
                    );
                }
            }
            for isa in available_isas() {
                let mut got = vec![f32::NAN; nq * m];
                dot_rows_for(isa).unwrap()(&xs, nq, &rows, stride, &mut got);
                for q in 0..nq {
                    for j in 0..m {
                        let mag: f32 = (0..n)
                            .map(|d| (xs[q * n + d] * rows[j * stride + d]).abs())
                            .sum();
                        let what = format!("{isa:?} nq={nq} m={m} n={n} q={q} row {j}");
                        assert_sum_close(got[q * m + j], want[q * m + j], mag, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn dot_rows_rejects_bad_shapes() {
    for isa in available_isas() {
        let f = dot_rows_for(isa).unwrap();
        for (xs, nq, rows, out) in [
            (8, 1, 15, 2),  // two rows of 8 at stride 8 need 16 values
            (12, 2, 64, 3), // 3 outputs do not split into 2 queries
            (9, 2, 64, 2),  // nor do 9 query values
            (8, 0, 64, 2),  // no queries
        ] {
            let r = std::panic::catch_unwind(|| {
                let mut out = vec![0f32; out];
                f(&vec![1.0; xs], nq, &vec![0.0; rows], 8, &mut out);
            });
            assert!(
                r.is_err(),
                "{isa:?}: xs={xs} nq={nq} rows={rows} out={out} accepted"
            );
        }
    }
}

/// Batch invariance, kernel level: a column of a gemm has the same bits whatever else is in the
/// batch (alone, or at any place among other columns), at every ISA level this CPU runs.
#[test]
fn gemm_columns_do_not_depend_on_the_batch() {
    let mut rng = SmallRng::seed_from_u64(4242);
    let mut report = Vec::new();
    for ty in GgmlType::ALL {
        let case = GemmCase::new(ty, 3, 9, 17, &mut rng);
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
            let Some(k) = kernels_for(ty, isa) else {
                continue;
            };
            let (full, stride) = case.run(&k, 0);
            let mut same_as_alone = true;
            let mut same_as_gemv = true;
            for c in 0..case.cols {
                let mut alone = vec![f32::NAN; case.rows];
                (k.gemm)(
                    case.k,
                    &case.w[case.w_off..],
                    case.w_stride,
                    case.rows,
                    case.a_row(c),
                    case.a_stride,
                    1,
                    &mut alone,
                    1,
                );
                let mut gv = vec![f32::NAN; case.rows];
                (k.gemv)(
                    case.k,
                    &case.w[case.w_off..],
                    case.w_stride,
                    case.a_row(c),
                    &mut gv,
                );
                for r in 0..case.rows {
                    same_as_alone &= full[r * stride + c].to_bits() == alone[r].to_bits();
                    same_as_gemv &= full[r * stride + c].to_bits() == gv[r].to_bits();
                }
            }
            assert!(
                same_as_alone,
                "{ty} {isa:?}: a gemm column's bits depend on the other columns"
            );
            // Not a requirement: the gemv kernels may sum in another order (why the batch
            // invariance switch sends one-token passes through gemm too).
            report.push(format!("{ty} {isa:?}: same bits as gemv: {same_as_gemv}"));
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// Attention reads the CPU backend's f16 KV pages in place: over f16 rows the kernels must give
/// exactly what they give over the same values widened to f32 (the conversion is exact and the
/// order of operations the same), at every ISA level.
#[test]
fn attention_kernels_over_f16_rows_equal_the_f32_ones() {
    let mut rng = SmallRng::seed_from_u64(79);
    let shapes: [(usize, usize, usize, usize); 4] = [
        (1, 37, 256, 0),
        (4, 33, 256, 768),
        (2, 5, 130, 3),
        (3, 9, 64, 64),
    ];
    for (nq, m, n, extra) in shapes {
        let stride = n + extra;
        let rows16: Vec<f16> = gaussianish(m.saturating_sub(1) * stride + n, &mut rng)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let rows32: Vec<f32> = rows16.iter().map(|v| v.to_f32()).collect();
        let xs = gaussianish(nq * n, &mut rng);
        let ws: Vec<f32> = (0..nq * m).map(|_| rng.random::<f32>()).collect();
        for isa in available_isas() {
            let what = format!("{isa:?} nq={nq} m={m} n={n}");
            let (mut a, mut b) = (vec![0f32; nq * m], vec![0f32; nq * m]);
            dot_rows_for::<f16>(isa).unwrap()(&xs, nq, &rows16, stride, &mut a);
            dot_rows_for::<f32>(isa).unwrap()(&xs, nq, &rows32, stride, &mut b);
            assert_eq!(a, b, "dot_rows {what}");
            let (mut a, mut b) = (vec![f32::NAN; nq * n], vec![f32::NAN; nq * n]);
            weighted_sum_for::<f16>(isa).unwrap()(&ws, nq, &rows16, stride, &mut a);
            weighted_sum_for::<f32>(isa).unwrap()(&ws, nq, &rows32, stride, &mut b);
            assert_eq!(a, b, "weighted_sum {what}");
        }
    }
}

/// A weighted sum taken in runs of rows (attention over KV pages) with `weighted_sum_acc` adds
/// the same terms in the same order as one call over all the rows: the results are identical.
#[test]
fn weighted_sum_in_runs_equals_one_call() {
    let mut rng = SmallRng::seed_from_u64(80);
    for (nq, m, n, stride) in [(1, 70, 256, 256), (4, 45, 256, 512), (3, 7, 20, 21)] {
        let rows: Vec<f16> = gaussianish((m - 1) * stride + n, &mut rng)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let ws: Vec<f32> = (0..nq * m).map(|_| rng.random::<f32>()).collect();
        for isa in available_isas() {
            let mut whole = vec![0f32; nq * n];
            weighted_sum_for::<f16>(isa).unwrap()(&ws, nq, &rows, stride, &mut whole);
            let mut runs = vec![0f32; nq * n];
            let mut j = 0;
            for take in [1, 16, 5, 32].into_iter().cycle() {
                if j >= m {
                    break;
                }
                let take = take.min(m - j);
                let part: Vec<f32> = (0..nq)
                    .flat_map(|q| ws[q * m + j..q * m + j + take].to_vec())
                    .collect();
                weighted_sum_acc_for::<f16>(isa).unwrap()(
                    &part,
                    nq,
                    &rows[j * stride..],
                    stride,
                    &mut runs,
                );
                j += take;
            }
            assert_eq!(runs, whole, "{isa:?} nq={nq} m={m} n={n}");
        }
    }
}
