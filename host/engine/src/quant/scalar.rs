//! Portable reference implementation of every format: dequantization, ggml-reference
//! quantization and the integer-exact dot products the SIMD kernels are tested against.

use half::{bf16, f16};

use crate::quant::{GemmFn, GemvFn, GgmlType, QK, QK_K, QuantizeActFn, RowElem, VecDotFn};

/// ggml's `GROUP_MAX_EPS`: below this a group is treated as all zero.
const GROUP_MAX_EPS: f32 = 1e-15;

// ---------------------------------------------------------------------------------------------
// Byte access
// ---------------------------------------------------------------------------------------------

#[inline]
pub(crate) fn rd_f16(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

#[inline]
fn wr_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
}

#[inline]
pub(crate) fn rd_f32(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline]
fn rd_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline]
fn rd_i16(b: &[u8], off: usize) -> i16 {
    i16::from_le_bytes([b[off], b[off + 1]])
}

/// ggml's `nearest_int`: adding 1.5·2^23 makes the FPU round to an integer (half to even), which
/// differs from `f32::round` on ties, so the K-quants must use this to match ggml.
#[inline]
pub(crate) fn nearest_int(fval: f32) -> i32 {
    debug_assert!(fval.abs() <= 4_194_303.0 || fval.is_nan());
    let val = fval + 12_582_912.0;
    (val.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

// ---------------------------------------------------------------------------------------------
// Block layouts (byte offsets inside one block)
// ---------------------------------------------------------------------------------------------

// Q2_K: scales[16] (lo nibble scale, hi nibble min), qs[64], d, dmin.
const Q2K_QS: usize = 16;
const Q2K_D: usize = 80;
const Q2K_DMIN: usize = 82;
// Q3_K: hmask[32], qs[64], scales[12], d.
const Q3K_QS: usize = 32;
const Q3K_SC: usize = 96;
const Q3K_D: usize = 108;
// Q4_K: d, dmin, scales[12], qs[128].  Q5_K: d, dmin, scales[12], qh[32], qs[128].
const K4_SC: usize = 4;
const Q4K_QS: usize = 16;
const Q5K_QH: usize = 16;
const Q5K_QS: usize = 48;
// Q6_K: ql[128], qh[64], scales[16] (i8), d.
const Q6K_QH: usize = 128;
const Q6K_SC: usize = 192;
const Q6K_D: usize = 208;
// Q8_K: d (f32), qs[256], bsums[16] (i16).
const Q8K_QS: usize = 4;
const Q8K_BS: usize = 260;

/// Q4_K/Q5_K 6-bit scale and min of sub-block `j` (ggml's `get_scale_min_k4`).
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q3_K's sixteen 6-bit scales, already offset to -32..=31.
#[inline]
pub(crate) fn q3k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let lo = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
        let hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = (lo | (hi << 4)) as i8 - 32;
    }
    out
}

// Unpackers to one integer per element, in element order. Dequantization and the scalar dot
// products share them so both read the bit layout in exactly one place.

fn unpack_q2k(b: &[u8]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for n in 0..2 {
        for j in 0..4 {
            for l in 0..32 {
                q[128 * n + 32 * j + l] = (b[Q2K_QS + 32 * n + l] >> (2 * j)) & 3;
            }
        }
    }
    q
}

fn unpack_q3k(b: &[u8]) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for n in 0..2 {
        for j in 0..4 {
            for l in 0..32 {
                let low = ((b[Q3K_QS + 32 * n + l] >> (2 * j)) & 3) as i8;
                let high = (b[l] >> (4 * n + j)) & 1;
                q[128 * n + 32 * j + l] = low - if high != 0 { 0 } else { 4 };
            }
        }
    }
    q
}

fn unpack_q4k(b: &[u8]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for c in 0..4 {
        for l in 0..32 {
            let v = b[Q4K_QS + 32 * c + l];
            q[64 * c + l] = v & 0xF;
            q[64 * c + 32 + l] = v >> 4;
        }
    }
    q
}

fn unpack_q5k(b: &[u8]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for c in 0..4 {
        for l in 0..32 {
            let v = b[Q5K_QS + 32 * c + l];
            let h = b[Q5K_QH + l];
            q[64 * c + l] = (v & 0xF) | (((h >> (2 * c)) & 1) << 4);
            q[64 * c + 32 + l] = (v >> 4) | (((h >> (2 * c + 1)) & 1) << 4);
        }
    }
    q
}

fn unpack_q6k(b: &[u8]) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for n in 0..2 {
        for l in 0..32 {
            let h = b[Q6K_QH + 32 * n + l];
            let l0 = b[64 * n + l];
            let l1 = b[64 * n + 32 + l];
            q[128 * n + l] = ((l0 & 0xF) | ((h & 3) << 4)) as i8 - 32;
            q[128 * n + 32 + l] = ((l1 & 0xF) | (((h >> 2) & 3) << 4)) as i8 - 32;
            q[128 * n + 64 + l] = ((l0 >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
            q[128 * n + 96 + l] = ((l1 >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    q
}

// ---------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------

pub(crate) fn f16_to_f32_row(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
    }
}

/// Checks a call of [`dot_rows`](crate::quant::dot_rows) or
/// [`weighted_sum`](crate::quant::weighted_sum) and returns (row length, rows): `rows` must hold
/// `nrows` rows of `len` values `stride` apart, and `nq` must divide both per-query slices.
pub(crate) fn check_rows<E>(
    what: &str,
    nq: usize,
    len_total: usize,
    nrows_total: usize,
    rows: &[E],
    stride: usize,
) -> (usize, usize) {
    assert!(nq > 0, "{what}: no queries");
    assert!(
        len_total.is_multiple_of(nq) && nrows_total.is_multiple_of(nq),
        "{what}: {len_total} and {nrows_total} values do not split into {nq} queries"
    );
    let (len, nrows) = (len_total / nq, nrows_total / nq);
    if let Some(last) = nrows.checked_sub(1) {
        let need = last
            .checked_mul(stride)
            .and_then(|v| v.checked_add(len))
            .unwrap_or_else(|| panic!("{what}: size overflows"));
        assert!(
            rows.len() >= need,
            "{what}: {nrows} rows of {len} at stride {stride} need {need} values, got {}",
            rows.len()
        );
    }
    (len, nrows)
}

/// `out[q · m + j] = Σ_d xs[q · n + d] · rows[j · stride + d]`, each sum taken in order of `d`.
pub(crate) fn dot_rows<E: RowElem>(
    xs: &[f32],
    nq: usize,
    rows: &[E],
    stride: usize,
    out: &mut [f32],
) {
    let (n, m) = check_rows("dot_rows", nq, xs.len(), out.len(), rows, stride);
    for (x, out) in xs
        .chunks_exact(n.max(1))
        .zip(out.chunks_exact_mut(m.max(1)))
    {
        for (j, o) in out.iter_mut().enumerate() {
            let row = &rows[j * stride..j * stride + n];
            *o = x
                .iter()
                .zip(row)
                .fold(0.0, |acc, (a, b)| acc + a * b.to_f32());
        }
    }
    if n == 0 {
        out.fill(0.0);
    }
}

/// `out[q · n + d] = Σ_j ws[q · m + j] · rows[j · stride + d]`, each term added in order of `j`.
pub(crate) fn weighted_sum<E: RowElem>(
    ws: &[f32],
    nq: usize,
    rows: &[E],
    stride: usize,
    out: &mut [f32],
) {
    out.fill(0.0);
    weighted_sum_acc(ws, nq, rows, stride, out)
}

/// [`weighted_sum`] added to what `out` holds (the terms continue its sums, in order of `j`).
pub(crate) fn weighted_sum_acc<E: RowElem>(
    ws: &[f32],
    nq: usize,
    rows: &[E],
    stride: usize,
    out: &mut [f32],
) {
    let (n, m) = check_rows("weighted_sum", nq, out.len(), ws.len(), rows, stride);
    for (w, out) in ws
        .chunks_exact(m.max(1))
        .zip(out.chunks_exact_mut(n.max(1)))
    {
        for (j, &wj) in w.iter().enumerate() {
            let row = &rows[j * stride..j * stride + n];
            for (o, v) in out.iter_mut().zip(row) {
                *o += wj * v.to_f32();
            }
        }
    }
}

pub(crate) fn bf16_to_f32_row(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = bf16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
    }
}

/// Lengths are validated by the caller.
pub(crate) fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let ts = ty.type_size();
    match ty {
        GgmlType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = rd_f32(s, 0);
            }
        }
        GgmlType::F16 => f16_to_f32_row(src, dst),
        GgmlType::BF16 => bf16_to_f32_row(src, dst),
        GgmlType::Q4_0 => {
            for (b, y) in src.chunks_exact(ts).zip(dst.chunks_exact_mut(QK)) {
                let d = rd_f16(b, 0);
                for j in 0..16 {
                    y[j] = ((b[2 + j] & 0xF) as i32 - 8) as f32 * d;
                    y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (b, y) in src.chunks_exact(ts).zip(dst.chunks_exact_mut(QK)) {
                let (d, m) = (rd_f16(b, 0), rd_f16(b, 2));
                for j in 0..16 {
                    y[j] = (b[4 + j] & 0xF) as f32 * d + m;
                    y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q5_0 => {
            for (b, y) in src.chunks_exact(ts).zip(dst.chunks_exact_mut(QK)) {
                let d = rd_f16(b, 0);
                let qh = rd_u32(b, 2);
                for j in 0..16 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    y[j] = (((b[6 + j] & 0xF) | h0) as i32 - 16) as f32 * d;
                    y[j + 16] = (((b[6 + j] >> 4) | h1) as i32 - 16) as f32 * d;
                }
            }
        }
        GgmlType::Q5_1 => {
            for (b, y) in src.chunks_exact(ts).zip(dst.chunks_exact_mut(QK)) {
                let (d, m) = (rd_f16(b, 0), rd_f16(b, 2));
                let qh = rd_u32(b, 4);
                for j in 0..16 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    y[j] = ((b[8 + j] & 0xF) | h0) as f32 * d + m;
                    y[j + 16] = ((b[8 + j] >> 4) | h1) as f32 * d + m;
                }
            }
        }
        GgmlType::Q8_0 | GgmlType::Q8_1 => {
            let off = if ty == GgmlType::Q8_0 { 2 } else { 4 };
            for (b, y) in src.chunks_exact(ts).zip(dst.chunks_exact_mut(QK)) {
                let d = rd_f16(b, 0);
                for (j, v) in y.iter_mut().enumerate() {
                    *v = b[off + j] as i8 as f32 * d;
                }
            }
        }
        GgmlType::Q2K => {
            for (b, y) in src.chunks_exact(ts).zip(dst.chunks_exact_mut(QK_K)) {
                let (d, dmin) = (rd_f16(b, Q2K_D), rd_f16(b, Q2K_DMIN));
                let q = unpack_q2k(b);
                for (g, (yg, qg)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
                    let dl = d * (b[g] & 0xF) as f32;
                    let ml = dmin * (b[g] >> 4) as f32;
                    for (v, &qv) in yg.iter_mut().zip(qg) {
                        *v = dl * qv as f32 - ml;
                    }
                }
            }
        }
        GgmlType::Q3K => {
            for (b, y) in src.chunks_exact(ts).zip(dst.chunks_exact_mut(QK_K)) {
                let d = rd_f16(b, Q3K_D);
                let sc = q3k_scales(&b[Q3K_SC..Q3K_SC + 12]);
                let q = unpack_q3k(b);
                for (g, (yg, qg)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
                    let dl = d * sc[g] as f32;
                    for (v, &qv) in yg.iter_mut().zip(qg) {
                        *v = dl * qv as f32;
                    }
                }
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            for (b, y) in src.chunks_exact(ts).zip(dst.chunks_exact_mut(QK_K)) {
                let (d, dmin) = (rd_f16(b, 0), rd_f16(b, 2));
                let q = if ty == GgmlType::Q4K {
                    unpack_q4k(b)
                } else {
                    unpack_q5k(b)
                };
                for (g, (yg, qg)) in y.chunks_exact_mut(32).zip(q.chunks_exact(32)).enumerate() {
                    let (sc, m) = scale_min_k4(g, &b[K4_SC..K4_SC + 12]);
                    let (dl, ml) = (d * sc as f32, dmin * m as f32);
                    for (v, &qv) in yg.iter_mut().zip(qg) {
                        *v = dl * qv as f32 - ml;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for (b, y) in src.chunks_exact(ts).zip(dst.chunks_exact_mut(QK_K)) {
                let d = rd_f16(b, Q6K_D);
                let q = unpack_q6k(b);
                for (g, (yg, qg)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
                    let dl = d * b[Q6K_SC + g] as i8 as f32;
                    for (v, &qv) in yg.iter_mut().zip(qg) {
                        *v = dl * qv as f32;
                    }
                }
            }
        }
        GgmlType::Q8K => {
            for (b, y) in src.chunks_exact(ts).zip(dst.chunks_exact_mut(QK_K)) {
                let d = rd_f32(b, 0);
                for (j, v) in y.iter_mut().enumerate() {
                    *v = d * b[Q8K_QS + j] as i8 as f32;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quantization (ggml `quantize_row_*_ref`)
// ---------------------------------------------------------------------------------------------

/// Lengths are validated by the caller.
pub(crate) fn quantize(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    let ts = ty.type_size();
    let bs = ty.block_size();
    let f: fn(&[f32], &mut [u8]) = match ty {
        GgmlType::F32 => {
            for (d, s) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&s.to_le_bytes());
            }
            return;
        }
        GgmlType::F16 => return quantize_f16(src, dst),
        GgmlType::BF16 => return quantize_bf16(src, dst),
        GgmlType::Q4_0 => quantize_block_q4_0,
        GgmlType::Q4_1 => quantize_block_q4_1,
        GgmlType::Q5_0 => quantize_block_q5_0,
        GgmlType::Q5_1 => quantize_block_q5_1,
        GgmlType::Q8_0 => quantize_block_q8_0,
        GgmlType::Q8_1 => quantize_block_q8_1,
        GgmlType::Q2K => quantize_block_q2k,
        GgmlType::Q3K => quantize_block_q3k,
        GgmlType::Q4K => quantize_block_q4k,
        GgmlType::Q5K => quantize_block_q5k,
        GgmlType::Q6K => quantize_block_q6k,
        GgmlType::Q8K => quantize_block_q8k,
    };
    for (x, y) in src.chunks_exact(bs).zip(dst.chunks_exact_mut(ts)) {
        f(x, y);
    }
}

fn quantize_f16(src: &[f32], dst: &mut [u8]) {
    for (d, s) in dst.chunks_exact_mut(2).zip(src) {
        d.copy_from_slice(&f16::from_f32(*s).to_bits().to_le_bytes());
    }
}

fn quantize_bf16(src: &[f32], dst: &mut [u8]) {
    // half's conversion rounds to nearest-even and keeps NaNs quiet, as ggml's does.
    for (d, s) in dst.chunks_exact_mut(2).zip(src) {
        d.copy_from_slice(&bf16::from_f32(*s).to_bits().to_le_bytes());
    }
}

/// (absolute max, the signed value that has it — first one wins on ties, as in ggml).
#[inline]
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

fn quantize_block_q4_0(x: &[f32], y: &mut [u8]) {
    let (_, max) = signed_absmax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    wr_f16(y, 0, d);
    for j in 0..16 {
        // `as i8` truncates toward zero like C's float->int8 conversion.
        let x0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let x1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        y[2 + j] = x0 | (x1 << 4);
    }
}

fn minmax(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn quantize_block_q4_1(x: &[f32], y: &mut [u8]) {
    let (min, max) = minmax(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    wr_f16(y, 0, d);
    wr_f16(y, 2, min);
    for j in 0..16 {
        let x0 = ((((x[j] - min) * id) + 0.5) as i8).min(15) as u8;
        let x1 = ((((x[j + 16] - min) * id) + 0.5) as i8).min(15) as u8;
        y[4 + j] = x0 | (x1 << 4);
    }
}

fn quantize_block_q5_0(x: &[f32], y: &mut [u8]) {
    let (_, max) = signed_absmax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    wr_f16(y, 0, d);
    let mut qh = 0u32;
    for j in 0..16 {
        let x0 = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let x1 = ((x[j + 16] * id + 16.5) as i8).min(31) as u8;
        y[6 + j] = (x0 & 0xF) | ((x1 & 0xF) << 4);
        qh |= (((x0 & 0x10) >> 4) as u32) << j;
        qh |= (((x1 & 0x10) >> 4) as u32) << (j + 16);
    }
    y[2..6].copy_from_slice(&qh.to_le_bytes());
}

fn quantize_block_q5_1(x: &[f32], y: &mut [u8]) {
    let (min, max) = minmax(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    wr_f16(y, 0, d);
    wr_f16(y, 2, min);
    let mut qh = 0u32;
    for j in 0..16 {
        // ggml clamps nothing here: (max-min)*id + 0.5 never exceeds 31.5.
        let x0 = (((x[j] - min) * id) + 0.5) as u8;
        let x1 = (((x[j + 16] - min) * id) + 0.5) as u8;
        y[8 + j] = (x0 & 0xF) | ((x1 & 0xF) << 4);
        qh |= (((x0 & 0x10) >> 4) as u32) << j;
        qh |= (((x1 & 0x10) >> 4) as u32) << (j + 16);
    }
    y[4..8].copy_from_slice(&qh.to_le_bytes());
}

/// Q8_0's scale and reciprocal as ggml's reference quantizer computes them (weights).
#[inline]
pub(crate) fn q8_scale(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (d, id)
}

/// f32 → f16 bits, round to nearest even (the SIMD quantizers' scale encoding).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn f16_bits(v: f32) -> u16 {
    f16::from_f32(v).to_bits()
}

/// The scale and reciprocal llama.cpp's x86 kernels use when quantizing *activations*: the
/// reciprocal is 127/amax rather than 1/d, and values round half to even. One-ulp differences
/// in the reciprocal flip the rounding of a few values per row, which shows in the logits of
/// models with large activations, so activations follow the x86 path exactly; weights (the
/// writer) follow ggml's reference quantizer above.
#[inline]
pub(crate) fn q8_act_scale(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    (d, id)
}

fn act_block_q8_0(x: &[f32], y: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let (d, id) = q8_act_scale(amax);
    wr_f16(y, 0, d);
    for j in 0..QK {
        y[2 + j] = (x[j] * id).round_ties_even() as i8 as u8;
    }
}

fn act_block_q8_1(x: &[f32], y: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let (d, id) = q8_act_scale(amax);
    wr_f16(y, 0, d);
    let mut sum = 0i32;
    for j in 0..QK {
        let q = (x[j] * id).round_ties_even() as i8;
        y[4 + j] = q as u8;
        sum += q as i32;
    }
    wr_f16(y, 2, sum as f32 * d);
}

fn quantize_block_q8_0(x: &[f32], y: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let (d, id) = q8_scale(amax);
    wr_f16(y, 0, d);
    for j in 0..QK {
        // f32::round is half-away-from-zero, i.e. C's roundf.
        y[2 + j] = (x[j] * id).round() as i8 as u8;
    }
}

fn quantize_block_q8_1(x: &[f32], y: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let (d, id) = q8_scale(amax);
    wr_f16(y, 0, d);
    let mut sum = 0i32;
    for j in 0..QK {
        let q = (x[j] * id).round() as i8;
        y[4 + j] = q as u8;
        sum += q as i32;
    }
    wr_f16(y, 2, sum as f32 * d);
}

fn quantize_block_q8k(x: &[f32], y: &mut [u8]) {
    let (amax, max) = signed_absmax(x);
    if amax == 0.0 {
        y.fill(0);
        return;
    }
    let iscale = -127.0 / max;
    for j in 0..QK_K {
        y[Q8K_QS + j] = nearest_int(iscale * x[j]).min(127) as i8 as u8;
    }
    for g in 0..16 {
        let s: i32 = y[Q8K_QS + 16 * g..Q8K_QS + 16 * g + 16]
            .iter()
            .map(|&q| q as i8 as i32)
            .sum();
        y[Q8K_BS + 2 * g..Q8K_BS + 2 * g + 2].copy_from_slice(&(s as i16).to_le_bytes());
    }
    y[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}

/// ggml's `make_qkx2_quants`: fits `scale*L + min` (min <= 0) by a small grid search over the
/// scale. Returns (scale, -min).
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    l_aux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out[..n].fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        let diff = if use_mad { diff.abs() } else { diff * diff };
        best_error += weights[i] * diff;
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            l_aux[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * l_aux[i] as f32 + this_min - x[i];
                let diff = if use_mad { diff.abs() } else { diff * diff };
                cur_error += weights[i] * diff;
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&l_aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with `rmse_type == 1` and no importance weights (weights = x²):
/// symmetric quants in `[-nmax, nmax)`, stored offset by `nmax`. Returns the scale.
fn make_qx_quants(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let (amax, max) = signed_absmax_gt(x);
    if amax < GROUP_MAX_EPS {
        l_out[..x.len()].fill(0);
        return 0.0;
    }
    let q = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (i, &v) in x.iter().enumerate() {
        let l = q(iscale, v);
        l_out[i] = (l + nmax) as i8;
        let w = v * v;
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let l = q(iscale, v);
            let w = v * v;
            sumlx += w * v * l as f32;
            suml2 += w * l as f32 * l as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                l_out[i] = (q(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Like [`signed_absmax`] but with ggml's `ax > amax` comparison used by the K-quant helpers.
#[inline]
fn signed_absmax_gt(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    (amax, max)
}

/// ggml's `make_q3_quants` with `do_rmse`: symmetric quants in `[-nmax, nmax)` refined by
/// coordinate descent on the weighted error, stored offset by `nmax`.
fn make_q3_quants(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let n = x.len();
    let (amax, max) = signed_absmax_gt(x);
    if amax < GROUP_MAX_EPS {
        l_out[..n].fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let mut l = [0i32; 16];
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..n {
        let li = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l[i] = li;
        let w = x[i] * x[i];
        sumlx += w * x[i] * li as f32;
        suml2 += w * li as f32 * li as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = x[i] * x[i];
            let mut slx = sumlx - w * x[i] * l[i] as f32;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * l[i] as f32 * l[i] as f32;
                let new_l = nearest_int(x[i] * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != l[i] {
                    slx += w * x[i] * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    for i in 0..n {
        l_out[i] = (l[i] + nmax) as i8;
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for j in (0..QK_K).step_by(128) {
        for i in 0..32 {
            qs[j / 4 + i] =
                l[j + i] | (l[j + i + 32] << 2) | (l[j + i + 64] << 4) | (l[j + i + 96] << 6);
        }
    }
}

fn quantize_block_q2k(x: &[f32], y: &mut [u8]) {
    const Q4SCALE: f32 = 15.0;
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 16];
    let mut weights = [0f32; 16];
    let mut mins = [0f32; 16];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = v.abs();
        }
        let (s, m) = make_qkx2_quants(
            3,
            xs,
            &weights,
            &mut l[16 * j..16 * j + 16],
            &mut laux,
            -0.5,
            0.1,
            15,
            true,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    if max_scale > 0.0 {
        let iscale = Q4SCALE / max_scale;
        for j in 0..16 {
            y[j] = nearest_int(iscale * scales[j]) as u8;
        }
        wr_f16(y, Q2K_D, max_scale / Q4SCALE);
    } else {
        y[..16].fill(0);
        wr_f16(y, Q2K_D, 0.0);
    }
    if max_min > 0.0 {
        let iscale = Q4SCALE / max_min;
        for j in 0..16 {
            y[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
        }
        wr_f16(y, Q2K_DMIN, max_min / Q4SCALE);
    } else {
        wr_f16(y, Q2K_DMIN, 0.0);
    }
    let (dd, dm) = (rd_f16(y, Q2K_D), rd_f16(y, Q2K_DMIN));
    for j in 0..16 {
        let d = dd * (y[j] & 0xF) as f32;
        if d == 0.0 {
            continue;
        }
        let m = dm * (y[j] >> 4) as f32;
        for ii in 0..16 {
            l[16 * j + ii] = nearest_int((x[16 * j + ii] + m) / d).clamp(0, 3) as u8;
        }
    }
    pack_2bit(&l, &mut y[Q2K_QS..Q2K_QS + 64]);
}

fn quantize_block_q3k(x: &[f32], y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut amax, mut max_scale) = (0.0f32, 0.0f32);
    for j in 0..16 {
        scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
        let s = scales[j].abs();
        if s > amax {
            amax = s;
            max_scale = scales[j];
        }
    }
    let sc = &mut y[Q3K_SC..Q3K_SC + 12];
    sc.fill(0);
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..16 {
            // ggml narrows to int8_t before clamping.
            let li = (nearest_int(iscale * scales[j]) as i8).clamp(-32, 31) + 32;
            if j < 8 {
                sc[j] = (li & 0xF) as u8;
            } else {
                sc[j - 8] |= ((li & 0xF) << 4) as u8;
            }
            sc[8 + j % 4] |= ((li >> 4) << (2 * (j / 4))) as u8;
        }
        wr_f16(y, Q3K_D, 1.0 / iscale);
    } else {
        wr_f16(y, Q3K_D, 0.0);
    }
    let dd = rd_f16(y, Q3K_D);
    let scs = q3k_scales(&y[Q3K_SC..Q3K_SC + 12]);
    for j in 0..16 {
        let d = dd * scs[j] as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            l[16 * j + ii] = (nearest_int(x[16 * j + ii] / d).clamp(-4, 3) + 4) as i8;
        }
    }
    // The high bit of quant j goes to hmask[j % 32], bit j / 32.
    y[..32].fill(0);
    let mut lu = [0u8; QK_K];
    for j in 0..QK_K {
        let mut v = l[j] as u8;
        if v > 3 {
            y[j % 32] |= 1 << (j / 32);
            v -= 4;
        }
        lu[j] = v;
    }
    pack_2bit(&lu, &mut y[Q3K_QS..Q3K_QS + 64]);
}

/// Packs the eight 6-bit (scale, min) pairs of Q4_K/Q5_K into their 12 bytes.
fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8], s: &mut [u8]) {
    s.fill(0);
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
}

/// Shared body of Q4_K / Q5_K reference quantization; returns the quant levels 0..=nmax.
fn quantize_k4_common(
    x: &[f32],
    y: &mut [u8],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> [u8; QK_K] {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let mut mins = [0f32; 8];
    let mut scales = [0f32; 8];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2: f32 = xs.iter().fold(0.0, |a, v| a + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            &mut laux,
            rmin,
            rdelta,
            nstep,
            false,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    pack_scale_min_k4(&ls, &lm, &mut y[K4_SC..K4_SC + 12]);
    wr_f16(y, 0, max_scale / 63.0);
    wr_f16(y, 2, max_min / 63.0);
    let (dd, dm) = (rd_f16(y, 0), rd_f16(y, 2));
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &y[K4_SC..K4_SC + 12]);
        let d = dd * sc as f32;
        if d == 0.0 {
            continue;
        }
        let m = dm * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + m) / d).clamp(0, nmax) as u8;
        }
    }
    l
}

fn quantize_block_q4k(x: &[f32], y: &mut [u8]) {
    let l = quantize_k4_common(x, y, 15, -1.0, 0.1, 20);
    let qs = &mut y[Q4K_QS..Q4K_QS + 128];
    for c in 0..4 {
        for i in 0..32 {
            qs[32 * c + i] = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
        }
    }
}

fn quantize_block_q5k(x: &[f32], y: &mut [u8]) {
    let l = quantize_k4_common(x, y, 31, -0.5, 0.1, 15);
    y[Q5K_QH..Q5K_QH + 32].fill(0);
    for c in 0..4 {
        for i in 0..32 {
            let mut l1 = l[64 * c + i];
            let mut l2 = l[64 * c + 32 + i];
            if l1 > 15 {
                l1 -= 16;
                y[Q5K_QH + i] |= 1 << (2 * c);
            }
            if l2 > 15 {
                l2 -= 16;
                y[Q5K_QH + i] |= 1 << (2 * c + 1);
            }
            y[Q5K_QS + 32 * c + i] = l1 | (l2 << 4);
        }
    }
}

fn quantize_block_q6k(x: &[f32], y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for ib in 0..16 {
        let s = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        y.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    wr_f16(y, Q6K_D, 1.0 / iscale);
    for ib in 0..16 {
        y[Q6K_SC + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    let dd = rd_f16(y, Q6K_D);
    for j in 0..16 {
        let d = dd * y[Q6K_SC + j] as i8 as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            l[16 * j + ii] = (nearest_int(x[16 * j + ii] / d).clamp(-32, 31) + 32) as i8;
        }
    }
    for n in 0..2 {
        let j = 128 * n;
        for i in 0..32 {
            let q = |k: usize| l[j + i + 32 * k] as u8;
            y[64 * n + i] = (q(0) & 0xF) | ((q(2) & 0xF) << 4);
            y[64 * n + 32 + i] = (q(1) & 0xF) | ((q(3) & 0xF) << 4);
            y[Q6K_QH + 32 * n + i] =
                (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantizers (as `QuantizeActFn`)
// ---------------------------------------------------------------------------------------------

fn act_len_check(ty: GgmlType, src: &[f32], dst: &[u8]) {
    let need = ty
        .row_bytes(src.len())
        .unwrap_or_else(|| panic!("{ty}: {} activations is not whole blocks", src.len()));
    assert_eq!(
        dst.len(),
        need,
        "{ty}: activation buffer has the wrong length"
    );
}

fn act_f32(src: &[f32], dst: &mut [u8]) {
    act_len_check(GgmlType::F32, src, dst);
    quantize(GgmlType::F32, src, dst);
}
fn act_f16(src: &[f32], dst: &mut [u8]) {
    act_len_check(GgmlType::F16, src, dst);
    quantize_f16(src, dst);
}
fn act_bf16(src: &[f32], dst: &mut [u8]) {
    act_len_check(GgmlType::BF16, src, dst);
    quantize_bf16(src, dst);
}
fn act_q8_0(src: &[f32], dst: &mut [u8]) {
    act_len_check(GgmlType::Q8_0, src, dst);
    for (x, y) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(34)) {
        act_block_q8_0(x, y);
    }
}
fn act_q8_1(src: &[f32], dst: &mut [u8]) {
    act_len_check(GgmlType::Q8_1, src, dst);
    for (x, y) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(36)) {
        act_block_q8_1(x, y);
    }
}
fn act_q8k(src: &[f32], dst: &mut [u8]) {
    act_len_check(GgmlType::Q8K, src, dst);
    quantize(GgmlType::Q8K, src, dst);
}

/// Reference quantizer for an activation type (any type works; non-activation formats fall
/// back to their weight quantizer).
pub(crate) fn quantize_act_fn(act: GgmlType) -> QuantizeActFn {
    match act {
        GgmlType::F32 => act_f32,
        GgmlType::F16 => act_f16,
        GgmlType::BF16 => act_bf16,
        GgmlType::Q8_0 => act_q8_0,
        GgmlType::Q8_1 => act_q8_1,
        GgmlType::Q8K => act_q8k,
        // No weight type maps to these as its activation type.
        _ => act_f32,
    }
}

// ---------------------------------------------------------------------------------------------
// Dot products
// ---------------------------------------------------------------------------------------------

/// Checks a vec_dot call and returns the number of blocks.
#[inline]
pub(crate) fn check_vec_dot(ty: GgmlType, n: usize, w: &[u8], act: &[u8]) -> usize {
    let bs = ty.block_size();
    assert!(
        n.is_multiple_of(bs),
        "{ty}: n = {n} is not a multiple of {bs}"
    );
    let nb = n / bs;
    let at = ty.vec_dot_type();
    assert!(
        w.len() >= nb * ty.type_size() && act.len() >= nb * at.type_size(),
        "{ty}: vec_dot of {n} elements got {} weight / {} activation bytes",
        w.len(),
        act.len()
    );
    nb
}

/// Bytes spanned by `n` rows of `len` bytes `stride` apart (`None` on overflow).
fn span(n: usize, stride: usize, len: usize) -> Option<usize> {
    match n {
        0 => Some(0),
        _ => (n - 1).checked_mul(stride)?.checked_add(len),
    }
}

/// Checks a gemm call (see [`GemmFn`]) and returns the number of blocks per row. Everything a
/// kernel reads or writes is proven in bounds here (a call with no rows or no columns reads and
/// writes nothing, so only `k` is checked); strides shorter than a row (overlapping
/// rows) are allowed by the contract but almost surely a bug, hence only debug-asserted.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_gemm(
    ty: GgmlType,
    k: usize,
    w: &[u8],
    w_stride: usize,
    rows: usize,
    act: &[u8],
    act_stride: usize,
    cols: usize,
    out: &[f32],
    out_stride: usize,
) -> usize {
    let bs = ty.block_size();
    assert!(
        k.is_multiple_of(bs),
        "{ty}: k = {k} is not a multiple of {bs}"
    );
    let nb = k / bs;
    if rows == 0 || cols == 0 {
        return nb; // nothing is read or written
    }
    let wrb = nb * ty.type_size();
    let arb = nb * ty.vec_dot_type().type_size();
    debug_assert!(rows <= 1 || w_stride >= wrb, "{ty}: weight rows overlap");
    debug_assert!(
        cols <= 1 || act_stride >= arb,
        "{ty}: activation rows overlap"
    );
    debug_assert!(rows <= 1 || out_stride >= cols, "{ty}: output rows overlap");
    let ok = |need: Option<usize>, have: usize| need.is_some_and(|n| n <= have);
    assert!(
        ok(span(rows, w_stride, wrb), w.len()),
        "{ty}: gemm of {rows} rows × k = {k} (stride {w_stride}) got {} weight bytes",
        w.len()
    );
    assert!(
        ok(span(cols, act_stride, arb), act.len()),
        "{ty}: gemm of {cols} activation rows × k = {k} (stride {act_stride}) got {} bytes",
        act.len()
    );
    assert!(
        ok(span(rows, out_stride, cols), out.len()),
        "{ty}: gemm output of {rows} × {cols} (stride {out_stride}) got {} floats",
        out.len()
    );
    nb
}

/// Activation rows per pass over the weight rows in [`gemm_by_vec_dot`]: the same blocking the
/// CPU backend used before gemm existed.
const GEMM_LOOP_TOKENS: usize = 16;

/// A [`GemmFn`] that calls `vec_dot` once per (row, column): the reference definition of gemm,
/// and the gemm of every format without a tiled kernel.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_by_vec_dot(
    vec_dot: VecDotFn,
    ty: GgmlType,
    k: usize,
    w: &[u8],
    w_stride: usize,
    rows: usize,
    act: &[u8],
    act_stride: usize,
    cols: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let nb = check_gemm(
        ty, k, w, w_stride, rows, act, act_stride, cols, out, out_stride,
    );
    let wrb = nb * ty.type_size();
    let arb = nb * ty.vec_dot_type().type_size();
    for c0 in (0..cols).step_by(GEMM_LOOP_TOKENS) {
        let c1 = (c0 + GEMM_LOOP_TOKENS).min(cols);
        for r in 0..rows {
            let wr = &w[r * w_stride..r * w_stride + wrb];
            for c in c0..c1 {
                out[r * out_stride + c] =
                    vec_dot(k, wr, &act[c * act_stride..c * act_stride + arb]);
            }
        }
    }
}

/// Defines `$name`, a [`GemmFn`] looping over the vec_dot `$dot` of weight type `$ty`.
macro_rules! gemm_loop {
    ($name:ident, $dot:expr, $ty:expr) => {
        #[allow(clippy::too_many_arguments)]
        fn $name(
            k: usize,
            w: &[u8],
            w_stride: usize,
            rows: usize,
            act: &[u8],
            act_stride: usize,
            cols: usize,
            out: &mut [f32],
            out_stride: usize,
        ) {
            $crate::quant::scalar::gemm_by_vec_dot(
                $dot, $ty, k, w, w_stride, rows, act, act_stride, cols, out, out_stride,
            )
        }
    };
}
pub(crate) use gemm_loop;

gemm_loop!(gemm_f32, dot_f32, GgmlType::F32);
gemm_loop!(gemm_f16, dot_f16, GgmlType::F16);
gemm_loop!(gemm_bf16, dot_bf16, GgmlType::BF16);
gemm_loop!(gemm_q4_0, dot_q4_0, GgmlType::Q4_0);
gemm_loop!(gemm_q4_1, dot_q4_1, GgmlType::Q4_1);
gemm_loop!(gemm_q5_0, dot_q5_0, GgmlType::Q5_0);
gemm_loop!(gemm_q5_1, dot_q5_1, GgmlType::Q5_1);
gemm_loop!(gemm_q8_0, dot_q8_0, GgmlType::Q8_0);
gemm_loop!(gemm_q8_1, dot_q8_1, GgmlType::Q8_1);
gemm_loop!(gemm_q2k, dot_q2k, GgmlType::Q2K);
gemm_loop!(gemm_q3k, dot_q3k, GgmlType::Q3K);
gemm_loop!(gemm_q4k, dot_q4k, GgmlType::Q4K);
gemm_loop!(gemm_q5k, dot_q5k, GgmlType::Q5K);
gemm_loop!(gemm_q6k, dot_q6k, GgmlType::Q6K);
gemm_loop!(gemm_q8k, dot_q8k, GgmlType::Q8K);

/// Checks a gemv call (see [`GemvFn`](crate::quant::GemvFn)) of `rows` rows and returns the
/// number of blocks per row.
pub(crate) fn check_gemv(
    ty: GgmlType,
    k: usize,
    w: &[u8],
    w_stride: usize,
    act: &[u8],
    rows: usize,
) -> usize {
    let bs = ty.block_size();
    assert!(
        k.is_multiple_of(bs),
        "{ty}: k = {k} is not a multiple of {bs}"
    );
    let nb = k / bs;
    let wrb = nb * ty.type_size();
    let arb = nb * ty.vec_dot_type().type_size();
    debug_assert!(rows <= 1 || w_stride >= wrb, "{ty}: weight rows overlap");
    assert!(
        span(rows, w_stride, wrb).is_some_and(|n| n <= w.len()) && act.len() >= arb,
        "{ty}: gemv of {rows} rows × k = {k} (stride {w_stride}) got {} weight / {} activation \
         bytes",
        w.len(),
        act.len()
    );
    nb
}

/// Defines `$name`, a [`GemvFn`](crate::quant::GemvFn) calling the vec_dot `$dot` once per row.
macro_rules! gemv_loop {
    ($name:ident, $dot:expr) => {
        fn $name(k: usize, w: &[u8], w_stride: usize, act: &[u8], out: &mut [f32]) {
            for (r, o) in out.iter_mut().enumerate() {
                *o = $dot(k, &w[r * w_stride..], act);
            }
        }
    };
}

gemv_loop!(gemv_f32, dot_f32);
gemv_loop!(gemv_f16, dot_f16);
gemv_loop!(gemv_bf16, dot_bf16);
gemv_loop!(gemv_q4_0, dot_q4_0);
gemv_loop!(gemv_q4_1, dot_q4_1);
gemv_loop!(gemv_q5_0, dot_q5_0);
gemv_loop!(gemv_q5_1, dot_q5_1);
gemv_loop!(gemv_q8_0, dot_q8_0);
gemv_loop!(gemv_q8_1, dot_q8_1);
gemv_loop!(gemv_q2k, dot_q2k);
gemv_loop!(gemv_q3k, dot_q3k);
gemv_loop!(gemv_q4k, dot_q4k);
gemv_loop!(gemv_q5k, dot_q5k);
gemv_loop!(gemv_q6k, dot_q6k);
gemv_loop!(gemv_q8k, dot_q8k);

/// The scalar gemv of `ty`: a loop over its scalar vec_dot.
pub(crate) fn gemv_fn(ty: GgmlType) -> GemvFn {
    match ty {
        GgmlType::F32 => gemv_f32,
        GgmlType::F16 => gemv_f16,
        GgmlType::BF16 => gemv_bf16,
        GgmlType::Q4_0 => gemv_q4_0,
        GgmlType::Q4_1 => gemv_q4_1,
        GgmlType::Q5_0 => gemv_q5_0,
        GgmlType::Q5_1 => gemv_q5_1,
        GgmlType::Q8_0 => gemv_q8_0,
        GgmlType::Q8_1 => gemv_q8_1,
        GgmlType::Q2K => gemv_q2k,
        GgmlType::Q3K => gemv_q3k,
        GgmlType::Q4K => gemv_q4k,
        GgmlType::Q5K => gemv_q5k,
        GgmlType::Q6K => gemv_q6k,
        GgmlType::Q8K => gemv_q8k,
    }
}

/// The scalar gemm of `ty`: a loop over its scalar vec_dot.
pub(crate) fn gemm_fn(ty: GgmlType) -> GemmFn {
    match ty {
        GgmlType::F32 => gemm_f32,
        GgmlType::F16 => gemm_f16,
        GgmlType::BF16 => gemm_bf16,
        GgmlType::Q4_0 => gemm_q4_0,
        GgmlType::Q4_1 => gemm_q4_1,
        GgmlType::Q5_0 => gemm_q5_0,
        GgmlType::Q5_1 => gemm_q5_1,
        GgmlType::Q8_0 => gemm_q8_0,
        GgmlType::Q8_1 => gemm_q8_1,
        GgmlType::Q2K => gemm_q2k,
        GgmlType::Q3K => gemm_q3k,
        GgmlType::Q4K => gemm_q4k,
        GgmlType::Q5K => gemm_q5k,
        GgmlType::Q6K => gemm_q6k,
        GgmlType::Q8K => gemm_q8k,
    }
}

pub(crate) fn vec_dot_fn(ty: GgmlType) -> VecDotFn {
    match ty {
        GgmlType::F32 => dot_f32,
        GgmlType::F16 => dot_f16,
        GgmlType::BF16 => dot_bf16,
        GgmlType::Q4_0 => dot_q4_0,
        GgmlType::Q4_1 => dot_q4_1,
        GgmlType::Q5_0 => dot_q5_0,
        GgmlType::Q5_1 => dot_q5_1,
        GgmlType::Q8_0 => dot_q8_0,
        GgmlType::Q8_1 => dot_q8_1,
        GgmlType::Q2K => dot_q2k,
        GgmlType::Q3K => dot_q3k,
        GgmlType::Q4K => dot_q4k,
        GgmlType::Q5K => dot_q5k,
        GgmlType::Q6K => dot_q6k,
        GgmlType::Q8K => dot_q8k,
    }
}

// The float formats accumulate in f64 like ggml's scalar path (`ggml_float`).
fn dot_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_vec_dot(GgmlType::F32, n, w, a);
    let mut s = 0.0f64;
    for (x, y) in w.chunks_exact(4).zip(a.chunks_exact(4)).take(n) {
        s += (rd_f32(x, 0) * rd_f32(y, 0)) as f64;
    }
    s as f32
}

fn dot_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_vec_dot(GgmlType::F16, n, w, a);
    let mut s = 0.0f64;
    for (x, y) in w.chunks_exact(2).zip(a.chunks_exact(2)).take(n) {
        s += (rd_f16(x, 0) * rd_f16(y, 0)) as f64;
    }
    s as f32
}

fn dot_bf16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_vec_dot(GgmlType::BF16, n, w, a);
    let rd = |b: &[u8]| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    let mut s = 0.0f64;
    for (x, y) in w.chunks_exact(2).zip(a.chunks_exact(2)).take(n) {
        s += (rd(x) * rd(y)) as f64;
    }
    s as f32
}

#[inline]
fn i8s(b: &[u8]) -> impl Iterator<Item = i32> + '_ {
    b.iter().map(|&v| v as i8 as i32)
}

fn dot_q4_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_vec_dot(GgmlType::Q4_0, n, w, a);
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(18).zip(a.chunks_exact(34)).take(nb) {
        let mut sumi = 0i32;
        for j in 0..16 {
            let v0 = (x[2 + j] & 0xF) as i32 - 8;
            let v1 = (x[2 + j] >> 4) as i32 - 8;
            sumi += v0 * y[2 + j] as i8 as i32 + v1 * y[18 + j] as i8 as i32;
        }
        sumf += sumi as f32 * (rd_f16(x, 0) * rd_f16(y, 0));
    }
    sumf
}

fn dot_q4_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_vec_dot(GgmlType::Q4_1, n, w, a);
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(20).zip(a.chunks_exact(36)).take(nb) {
        let mut sumi = 0i32;
        for j in 0..16 {
            sumi += (x[4 + j] & 0xF) as i32 * y[4 + j] as i8 as i32
                + (x[4 + j] >> 4) as i32 * y[20 + j] as i8 as i32;
        }
        sumf += (rd_f16(x, 0) * rd_f16(y, 0)) * sumi as f32 + rd_f16(x, 2) * rd_f16(y, 2);
    }
    sumf
}

fn dot_q5_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_vec_dot(GgmlType::Q5_0, n, w, a);
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(22).zip(a.chunks_exact(34)).take(nb) {
        let qh = rd_u32(x, 2);
        let mut sumi = 0i32;
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            let v0 = ((x[6 + j] & 0xF) as u32 | h0) as i32 - 16;
            let v1 = ((x[6 + j] >> 4) as u32 | h1) as i32 - 16;
            sumi += v0 * y[2 + j] as i8 as i32 + v1 * y[18 + j] as i8 as i32;
        }
        sumf += sumi as f32 * (rd_f16(x, 0) * rd_f16(y, 0));
    }
    sumf
}

fn dot_q5_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_vec_dot(GgmlType::Q5_1, n, w, a);
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(24).zip(a.chunks_exact(36)).take(nb) {
        let qh = rd_u32(x, 4);
        let mut sumi = 0i32;
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            let v0 = ((x[8 + j] & 0xF) as u32 | h0) as i32;
            let v1 = ((x[8 + j] >> 4) as u32 | h1) as i32;
            sumi += v0 * y[4 + j] as i8 as i32 + v1 * y[20 + j] as i8 as i32;
        }
        sumf += (rd_f16(x, 0) * rd_f16(y, 0)) * sumi as f32 + rd_f16(x, 2) * rd_f16(y, 2);
    }
    sumf
}

fn dot_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_vec_dot(GgmlType::Q8_0, n, w, a);
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(34).zip(a.chunks_exact(34)).take(nb) {
        let sumi: i32 = i8s(&x[2..34]).zip(i8s(&y[2..34])).map(|(p, q)| p * q).sum();
        sumf += sumi as f32 * (rd_f16(x, 0) * rd_f16(y, 0));
    }
    sumf
}

fn dot_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_vec_dot(GgmlType::Q8_1, n, w, a);
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(36).zip(a.chunks_exact(36)).take(nb) {
        let sumi: i32 = i8s(&x[4..36]).zip(i8s(&y[4..36])).map(|(p, q)| p * q).sum();
        sumf += sumi as f32 * (rd_f16(x, 0) * rd_f16(y, 0));
    }
    sumf
}

#[inline]
fn q8k_parts(y: &[u8]) -> (f32, &[u8], [i32; 16]) {
    let mut bs = [0i32; 16];
    for (g, b) in bs.iter_mut().enumerate() {
        *b = rd_i16(y, Q8K_BS + 2 * g) as i32;
    }
    (rd_f32(y, 0), &y[Q8K_QS..Q8K_QS + QK_K], bs)
}

/// Σ_g scale[g] · Σ_{i in group g} q[i]·y[i] over groups of `gs` elements.
#[inline]
fn grouped_isum<T: Copy + Into<i32>>(
    q: &[T],
    y: &[u8],
    scale: impl Fn(usize) -> i32,
    gs: usize,
) -> i32 {
    q.chunks_exact(gs)
        .zip(y.chunks_exact(gs))
        .enumerate()
        .map(|(g, (qg, yg))| {
            let s: i32 = qg.iter().zip(i8s(yg)).map(|(&a, b)| a.into() * b).sum();
            scale(g) * s
        })
        .sum()
}

fn dot_q2k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_vec_dot(GgmlType::Q2K, n, w, a);
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(84).zip(a.chunks_exact(292)).take(nb) {
        let (yd, q8, bsums) = q8k_parts(y);
        let summs: i32 = (0..16).map(|g| bsums[g] * (x[g] >> 4) as i32).sum();
        let q = unpack_q2k(x);
        let isum = grouped_isum(&q, q8, |g| (x[g] & 0xF) as i32, 16);
        let dall = yd * rd_f16(x, Q2K_D);
        let dmin = yd * rd_f16(x, Q2K_DMIN);
        sumf += dall * isum as f32 - dmin * summs as f32;
    }
    sumf
}

fn dot_q3k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_vec_dot(GgmlType::Q3K, n, w, a);
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(110).zip(a.chunks_exact(292)).take(nb) {
        let (yd, q8, _) = q8k_parts(y);
        let sc = q3k_scales(&x[Q3K_SC..Q3K_SC + 12]);
        let q = unpack_q3k(x);
        let isum = grouped_isum(&q, q8, |g| sc[g] as i32, 16);
        sumf += rd_f16(x, Q3K_D) * yd * isum as f32;
    }
    sumf
}

fn dot_k4(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_vec_dot(ty, n, w, a);
    let ts = ty.type_size();
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(ts).zip(a.chunks_exact(292)).take(nb) {
        let (yd, q8, bsums) = q8k_parts(y);
        let s = &x[K4_SC..K4_SC + 12];
        let q = if ty == GgmlType::Q4K {
            unpack_q4k(x)
        } else {
            unpack_q5k(x)
        };
        let isum = grouped_isum(&q, q8, |g| scale_min_k4(g, s).0 as i32, 32);
        let msum: i32 = (0..8)
            .map(|g| scale_min_k4(g, s).1 as i32 * (bsums[2 * g] + bsums[2 * g + 1]))
            .sum();
        let d = yd * rd_f16(x, 0);
        let dmin = yd * rd_f16(x, 2);
        sumf += d * isum as f32 - dmin * msum as f32;
    }
    sumf
}

fn dot_q4k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    dot_k4(GgmlType::Q4K, n, w, a)
}

fn dot_q5k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    dot_k4(GgmlType::Q5K, n, w, a)
}

fn dot_q6k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_vec_dot(GgmlType::Q6K, n, w, a);
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(210).zip(a.chunks_exact(292)).take(nb) {
        let (yd, q8, _) = q8k_parts(y);
        let q = unpack_q6k(x);
        let isum = grouped_isum(&q, q8, |g| x[Q6K_SC + g] as i8 as i32, 16);
        sumf += rd_f16(x, Q6K_D) * yd * isum as f32;
    }
    sumf
}

fn dot_q8k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = check_vec_dot(GgmlType::Q8K, n, w, a);
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(292).zip(a.chunks_exact(292)).take(nb) {
        let sumi: i32 = i8s(&x[Q8K_QS..Q8K_QS + QK_K])
            .zip(i8s(&y[Q8K_QS..Q8K_QS + QK_K]))
            .map(|(p, q)| p * q)
            .sum();
        sumf += rd_f32(x, 0) * rd_f32(y, 0) * sumi as f32;
    }
    sumf
}
