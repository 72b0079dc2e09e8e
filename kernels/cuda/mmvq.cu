// Fast quantized mat-vec for decode: int8 dot products on 8-bit activations.
//
//   y[v][r] = sum_c W[r][c] * x[v][c]     W: [nrows][ncols] in its GGUF block format
//                                         x: [nvec][ncols] as quantized by `quantize_q8` below
//
// The activations are first quantized in blocks of 32 (`quantize_q8`: an int8 per value and a
// scale d = max|x| / 127 per block), so
// the weights' packed integers meet them in `dp4a` (four 8-bit products a cycle) instead of
// being converted to float one by one. This is what llama.cpp's `mmvq` does; the layouts here are
// our own: the activation ints and scales live in separate arrays, so every load of activation
// ints is an aligned 32-bit load. Offsets and minimums take the sum of the ints a piece meets,
// one more dp4a against 0x01010101.
//
// One warp computes one output row for up to MAX_NV activation rows: the row's blocks are cut into
// PARTS pieces each (a piece is what one lane reads: 4 to 16 bytes of packed weights), the 32
// lanes take the pieces in turn, and the warp reduces by shuffles. Each weight piece is loaded
// once and multiplied with every activation row, so a decode step of 8 sequences reads the
// weights once.
//
// The scalar twin is `check.rs` (the same 8-bit activations on the CPU, dot products in f64);
// `realm gpu check` compares them for every type at every batch size. Formats without a kernel
// here use matvec.cu (f32 activations). Header-free on purpose; common.cuh is prepended.

#define MAX_NV 8

// Activation ints: 4-byte aligned (offsets are multiples of 4 from an aligned buffer).
__device__ __forceinline__ int ldx(const i8* p) { return *(const int*)p; }

__device__ __forceinline__ int dp4a(int a, int b, int c) { return __dp4a(a, b, c); }
#define ONES 0x01010101

// ---------------------------------------------------------------------------------------------
// Activation quantization: one warp per block of 32 values. xq: int8 [nvec][ncols]; xd: f32
// [nvec][ncols / 32] (the scales). ncols is a multiple of 32; `total` = nvec * ncols / 32 blocks.
// The CPU twin is `quantize_q8_twin` in check.rs.
extern "C" __global__ void quantize_q8(const float* __restrict__ x, i8* __restrict__ xq,
                                       float* __restrict__ xd, unsigned long long total) {
    unsigned long long b = ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (b >= total) return;
    float v = x[b * 32 + lane];
    float amax = fabsf(v);
    for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    float d = amax / 127.0f;
    int q = d == 0.0f ? 0 : (int)roundf(v / d);
    xq[b * 32 + lane] = (i8)q;
    if (lane == 0) xd[b] = d;
}

// ---------------------------------------------------------------------------------------------
// Each format: QK values in BYTES bytes, PARTS lanes per block; `Piece` holds what one lane loads
// from a block (load once), `dot` multiplies it with one activation row's ints at `xq` (the
// block's first value) and scales at `xd` (the block's first 32-block).

// Q8_0: d (f16), qs[32]. Piece k: qs[8k .. 8k + 8].
struct Q8_0 {
    static const int QK = 32, BYTES = 34, PARTS = 4;
    struct Piece { float d; int q0, q1; };
    __device__ static Piece load(const u8* b, int k) {
        Piece p;
        p.d = ldf16(b);
        p.q0 = (int)ld32(b + 2 + 8 * k);
        p.q1 = (int)ld32(b + 6 + 8 * k);
        return p;
    }
    __device__ static float dot(const Piece& p, int k, const i8* xq, const float* xd) {
        int s = dp4a(p.q0, ldx(xq + 8 * k), dp4a(p.q1, ldx(xq + 8 * k + 4), 0));
        return p.d * xd[0] * (float)s;
    }
};

// Q4_0: d (f16), qs[16]: value j = low nibble of qs[j], value 16 + j = high nibble; minus 8.
// Piece k: qs[4k .. 4k + 4] = values 4k.. and 16 + 4k...
struct Q4_0 {
    static const int QK = 32, BYTES = 18, PARTS = 4;
    struct Piece { float d; int lo, hi; };
    __device__ static Piece load(const u8* b, int k) {
        Piece p;
        p.d = ldf16(b);
        u32 q = ld32(b + 2 + 4 * k);
        p.lo = (int)(q & 0x0F0F0F0Fu);
        p.hi = (int)((q >> 4) & 0x0F0F0F0Fu);
        return p;
    }
    __device__ static float dot(const Piece& p, int k, const i8* xq, const float* xd) {
        int a = ldx(xq + 4 * k), b = ldx(xq + 16 + 4 * k);
        int s = dp4a(p.lo, a, dp4a(p.hi, b, 0));
        int sx = dp4a(ONES, a, dp4a(ONES, b, 0));
        return p.d * xd[0] * (float)(s - 8 * sx);
    }
};

// Q5_0: d (f16), qh (u32: bit j = 5th bit of value j), qs[16] as Q4_0; minus 16.
struct Q5_0 {
    static const int QK = 32, BYTES = 22, PARTS = 4;
    struct Piece { float d; int lo, hi; };
    __device__ static Piece load(const u8* b, int k) {
        Piece p;
        p.d = ldf16(b);
        u32 qh = ld32(b + 2), q = ld32(b + 6 + 4 * k);
        u32 lo = q & 0x0F0F0F0Fu, hi = (q >> 4) & 0x0F0F0F0Fu;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            lo |= ((qh >> (4 * k + i)) & 1u) << (8 * i + 4);
            hi |= ((qh >> (16 + 4 * k + i)) & 1u) << (8 * i + 4);
        }
        p.lo = (int)lo;
        p.hi = (int)hi;
        return p;
    }
    __device__ static float dot(const Piece& p, int k, const i8* xq, const float* xd) {
        int a = ldx(xq + 4 * k), b = ldx(xq + 16 + 4 * k);
        int s = dp4a(p.lo, a, dp4a(p.hi, b, 0));
        int sx = dp4a(ONES, a, dp4a(ONES, b, 0));
        return p.d * xd[0] * (float)(s - 16 * sx);
    }
};

// K-quant 6-bit scales and mins of sub-block j (ggml's get_scale_min_k4).
__device__ __forceinline__ void scale_min_k4(int j, const u8* q, int* sc, int* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Q4_K and Q5_K pieces: 8 values of sub-block 2p (lo0, lo1: four 8-bit values each) and 8 of
// sub-block 2p + 1 (hi0, hi1), with each sub-block's scale and min (times d, dmin). Piece t (16 a
// block): p = t / 4, values o = 8 (t % 4) .. o + 8 of both sub-blocks.
struct KPiece { float a0, m0, a1, m1; u32 lo0, lo1, hi0, hi1; };

__device__ __forceinline__ void k_scales(const u8* b, int pair, KPiece* p) {
    int sc, m;
    float d = ldf16(b), dmin = ldf16(b + 2);
    scale_min_k4(2 * pair, b + 4, &sc, &m);
    p->a0 = d * (float)sc;
    p->m0 = dmin * (float)m;
    scale_min_k4(2 * pair + 1, b + 4, &sc, &m);
    p->a1 = d * (float)sc;
    p->m1 = dmin * (float)m;
}

__device__ __forceinline__ float k_dot(const KPiece& p, int t, const i8* xq, const float* xd) {
    int pair = t / 4, o = 8 * (t % 4);
    const i8* x0 = xq + 64 * pair + o;  // sub-block 2p
    const i8* x1 = x0 + 32;             // sub-block 2p + 1
    int a0 = ldx(x0), a1 = ldx(x0 + 4), b0 = ldx(x1), b1 = ldx(x1 + 4);
    int s0 = dp4a((int)p.lo0, a0, dp4a((int)p.lo1, a1, 0));
    int s1 = dp4a((int)p.hi0, b0, dp4a((int)p.hi1, b1, 0));
    int x0s = dp4a(ONES, a0, dp4a(ONES, a1, 0));
    int x1s = dp4a(ONES, b0, dp4a(ONES, b1, 0));
    float d0 = xd[2 * pair], d1 = xd[2 * pair + 1];
    return d0 * (p.a0 * (float)s0 - p.m0 * (float)x0s) + d1 * (p.a1 * (float)s1 - p.m1 * (float)x1s);
}

// Q4_K: d, dmin (f16), scales[12], qs[128]; sub-block 2p + h (32 values) is the low (h = 0) or
// high (h = 1) nibbles of qs[32p .. 32p + 32].
struct Q4_K {
    static const int QK = 256, BYTES = 144, PARTS = 16;
    typedef KPiece Piece;
    __device__ static Piece load(const u8* b, int t) {
        Piece p;
        int pair = t / 4, o = 8 * (t % 4);
        k_scales(b, pair, &p);
        u32 q0 = ld32(b + 16 + 32 * pair + o), q1 = ld32(b + 20 + 32 * pair + o);
        p.lo0 = q0 & 0x0F0F0F0Fu;
        p.lo1 = q1 & 0x0F0F0F0Fu;
        p.hi0 = (q0 >> 4) & 0x0F0F0F0Fu;
        p.hi1 = (q1 >> 4) & 0x0F0F0F0Fu;
        return p;
    }
    __device__ static float dot(const Piece& p, int t, const i8* xq, const float* xd) {
        return k_dot(p, t, xq, xd);
    }
};

// Q5_K: d, dmin (f16), scales[12], qh[32] (bit sb of qh[l] = 5th bit of value 32 sb + l),
// qs[128] as Q4_K.
struct Q5_K {
    static const int QK = 256, BYTES = 176, PARTS = 16;
    typedef KPiece Piece;
    __device__ static Piece load(const u8* b, int t) {
        Piece p;
        int pair = t / 4, o = 8 * (t % 4);
        k_scales(b, pair, &p);
        u32 q0 = ld32(b + 48 + 32 * pair + o), q1 = ld32(b + 52 + 32 * pair + o);
        u32 h0 = ld32(b + 16 + o), h1 = ld32(b + 20 + o);
        int s0 = 2 * pair, s1 = 2 * pair + 1;
        p.lo0 = (q0 & 0x0F0F0F0Fu) | (((h0 >> s0) & ONES) << 4);
        p.lo1 = (q1 & 0x0F0F0F0Fu) | (((h1 >> s0) & ONES) << 4);
        p.hi0 = ((q0 >> 4) & 0x0F0F0F0Fu) | (((h0 >> s1) & ONES) << 4);
        p.hi1 = ((q1 >> 4) & 0x0F0F0F0Fu) | (((h1 >> s1) & ONES) << 4);
        return p;
    }
    __device__ static float dot(const Piece& p, int t, const i8* xq, const float* xd) {
        return k_dot(p, t, xq, xd);
    }
};

// Q6_K: ql[128], qh[64], scales[16] (i8), d (f16). Value 128n + 32k + l (k < 4): low 4 bits from
// ql[64n + 32(k % 2) + l] (low nibble for k < 2, high for k >= 2), high 2 bits from bits 2k, 2k+1
// of qh[32n + l]; minus 32; scale scales[(128n + 32k + l) / 16]. Piece t (16 a block): n = t / 8,
// l = 4 (t % 8) .. + 4, every k: 16 values.
struct Q6_K {
    static const int QK = 256, BYTES = 210, PARTS = 16;
    struct Piece { float a[4]; int q[4]; };
    __device__ static Piece load(const u8* b, int t) {
        Piece p;
        int n = t / 8, l = 4 * (t % 8);
        u32 ql0 = ld32(b + 64 * n + l), ql1 = ld32(b + 64 * n + 32 + l);
        u32 qh = ld32(b + 128 + 32 * n + l);
        float d = ldf16(b + 208);
        const i8* sc = (const i8*)(b + 192 + 8 * n + l / 16);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            u32 lo = (k % 2 == 0 ? ql0 : ql1) >> (4 * (k / 2));
            p.q[k] = (int)((lo & 0x0F0F0F0Fu) | (((qh >> (2 * k)) & 0x03030303u) << 4));
            p.a[k] = d * (float)sc[2 * k];
        }
        return p;
    }
    __device__ static float dot(const Piece& p, int t, const i8* xq, const float* xd) {
        int n = t / 8, l = 4 * (t % 8);
        float acc = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            int a = ldx(xq + 128 * n + 32 * k + l);
            int s = dp4a(p.q[k], a, 0) - 32 * dp4a(ONES, a, 0);
            acc += xd[4 * n + k] * p.a[k] * (float)s;
        }
        return acc;
    }
};

// One warp per output row; blockDim.x = 32 * warps, grid.x = ceil(nrows / warps). ncols is a
// multiple of the format's QK (and of 32); nvec <= MAX_NV.
template <class T>
__device__ void mmvq(const u8* __restrict__ w, unsigned long long row_bytes,
                     const i8* __restrict__ xq, const float* __restrict__ xd,
                     float* __restrict__ y, int ncols, int nrows, int nvec) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= nrows) return;
    const u8* wr = w + (unsigned long long)row * row_bytes;
    const int items = ncols / T::QK * T::PARTS;
    const int nb32 = ncols / 32;
    float acc[MAX_NV];
#pragma unroll
    for (int v = 0; v < MAX_NV; v++) acc[v] = 0.0f;
    for (int it = lane; it < items; it += 32) {
        const int b = it / T::PARTS, part = it % T::PARTS;
        const typename T::Piece p = T::load(wr + (unsigned long long)b * T::BYTES, part);
        const int x0 = b * T::QK, s0 = b * (T::QK / 32);
#pragma unroll
        for (int v = 0; v < MAX_NV; v++) {
            if (v < nvec) {
                acc[v] += T::dot(p, part, xq + (unsigned long long)v * ncols + x0,
                                 xd + (unsigned long long)v * nb32 + s0);
            }
        }
    }
#pragma unroll
    for (int v = 0; v < MAX_NV; v++) {
        float s = acc[v];
        for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0 && v < nvec) y[(unsigned long long)v * nrows + row] = s;
    }
}

#define MMVQ(name, T)                                                                          \
    extern "C" __global__ void mmvq_##name(const u8* w, unsigned long long row_bytes,          \
                                           const i8* xq, const float* xd, float* y, int ncols, \
                                           int nrows, int nvec) {                              \
        mmvq<T>(w, row_bytes, xq, xd, y, ncols, nrows, nvec);                                  \
    }

MMVQ(q4_0, Q4_0)
MMVQ(q5_0, Q5_0)
MMVQ(q8_0, Q8_0)
MMVQ(q4_k, Q4_K)
MMVQ(q5_k, Q5_K)
MMVQ(q6_k, Q6_K)
