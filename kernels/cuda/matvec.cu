// Quantized matrix × activation-rows products, every tensor type the CPU backend supports.
//
//   y[v][r] = sum_c W[r][c] * x[v][c]     W: [nrows][ncols] in its GGUF block format (row_bytes a row)
//                                         x: [nvec][ncols] f32, y: [nvec][nrows] f32, nvec <= MAX_NV
//
// The weights stay in their block format in device memory; each block is dequantized in registers
// (16 elements at a time) and multiplied with up to MAX_NV activation rows, so one pass over the
// weights serves a small batch (decode of several sequences; a prefill is cut into MAX_NV-row
// chunks by the host). One warp computes one output row: its 32 lanes take the row's 16-element
// chunks in turn and the warp reduces the partial sums by shuffles.
//
// This is the correctness-first kernel (the reference the faster ones will be checked against):
// every type has the same loop, and only `dequant16` differs. The block layouts follow ggml's
// byte for byte (see host/engine/src/quant/scalar.rs, which dequantizes identically).
//
// Header-free on purpose (NVRTC finds no CUDA headers by itself); common.cuh is prepended.

#define MAX_NV 8

__device__ __forceinline__ float ldf32(const u8* p) { return __uint_as_float(ld32(p)); }

// Each format: QK elements in BYTES bytes; dequant16(b, c, out) writes elements 16c .. 16c+15 of
// the block at b.

struct F32 {
    static const int QK = 16, BYTES = 64;
    __device__ static void dequant16(const u8* b, int, float* o) {
        for (int i = 0; i < 16; i++) o[i] = ldf32(b + 4 * i);
    }
};

struct F16 {
    static const int QK = 16, BYTES = 32;
    __device__ static void dequant16(const u8* b, int, float* o) {
        for (int i = 0; i < 16; i++) o[i] = ldf16(b + 2 * i);
    }
};

struct BF16 {
    static const int QK = 16, BYTES = 32;
    __device__ static void dequant16(const u8* b, int, float* o) {
        for (int i = 0; i < 16; i++) o[i] = __uint_as_float((u32)ld16(b + 2 * i) << 16);
    }
};

// Q4_0: d (f16), qs[16]: element j = low nibble of qs[j], element 16 + j = high nibble; minus 8.
struct Q4_0 {
    static const int QK = 32, BYTES = 18;
    __device__ static void dequant16(const u8* b, int c, float* o) {
        float d = ldf16(b);
        for (int j = 0; j < 16; j++) o[j] = (float)((int)((b[2 + j] >> (4 * c)) & 0xF) - 8) * d;
    }
};

// Q4_1: d, m (f16), qs[16]: as Q4_0 without the offset, plus m.
struct Q4_1 {
    static const int QK = 32, BYTES = 20;
    __device__ static void dequant16(const u8* b, int c, float* o) {
        float d = ldf16(b), m = ldf16(b + 2);
        for (int j = 0; j < 16; j++) o[j] = (float)((b[4 + j] >> (4 * c)) & 0xF) * d + m;
    }
};

// Q5_0: d (f16), qh (u32: bit j = 5th bit of element j), qs[16]; minus 16.
struct Q5_0 {
    static const int QK = 32, BYTES = 22;
    __device__ static void dequant16(const u8* b, int c, float* o) {
        float d = ldf16(b);
        u32 qh = ld32(b + 2);
        for (int j = 0; j < 16; j++) {
            int q = ((b[6 + j] >> (4 * c)) & 0xF) | (((qh >> (j + 16 * c)) & 1) << 4);
            o[j] = (float)(q - 16) * d;
        }
    }
};

// Q5_1: d, m (f16), qh (u32), qs[16].
struct Q5_1 {
    static const int QK = 32, BYTES = 24;
    __device__ static void dequant16(const u8* b, int c, float* o) {
        float d = ldf16(b), m = ldf16(b + 2);
        u32 qh = ld32(b + 4);
        for (int j = 0; j < 16; j++) {
            int q = ((b[8 + j] >> (4 * c)) & 0xF) | (((qh >> (j + 16 * c)) & 1) << 4);
            o[j] = (float)q * d + m;
        }
    }
};

// Q8_0: d (f16), qs[32] (i8).
struct Q8_0 {
    static const int QK = 32, BYTES = 34;
    __device__ static void dequant16(const u8* b, int c, float* o) {
        float d = ldf16(b);
        for (int j = 0; j < 16; j++) o[j] = (float)(i8)b[2 + 16 * c + j] * d;
    }
};

// Q8_1: d, s (f16), qs[32] (i8).
struct Q8_1 {
    static const int QK = 32, BYTES = 36;
    __device__ static void dequant16(const u8* b, int c, float* o) {
        float d = ldf16(b);
        for (int j = 0; j < 16; j++) o[j] = (float)(i8)b[4 + 16 * c + j] * d;
    }
};

// The K-quants: 256 elements. Element e = 128n + 32j + l (n < 2, j < 4, l < 32) for the 2- and
// 3-bit formats; chunk c (16 elements) is n = c / 8, j = (c % 8) / 2, l = 16 (c % 2) + i.

// Q2_K: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin (f16).
struct Q2_K {
    static const int QK = 256, BYTES = 84;
    __device__ static void dequant16(const u8* b, int c, float* o) {
        float d = ldf16(b + 80), dmin = ldf16(b + 82);
        float dl = d * (float)(b[c] & 0xF), ml = dmin * (float)(b[c] >> 4);
        int n = c / 8, j = (c % 8) / 2, l0 = 16 * (c % 2);
        const u8* qs = b + 16 + 32 * n + l0;
        for (int i = 0; i < 16; i++) o[i] = dl * (float)((qs[i] >> (2 * j)) & 3) - ml;
    }
};

// Q3_K: hmask[32], qs[64], scales[12] (sixteen 6-bit scales, offset 32), d (f16).
struct Q3_K {
    static const int QK = 256, BYTES = 110;
    __device__ static void dequant16(const u8* b, int c, float* o) {
        const u8* s = b + 96;
        int lo = c < 8 ? (s[c] & 0xF) : (s[c - 8] >> 4);
        int hi = (s[8 + c % 4] >> (2 * (c / 4))) & 3;
        float dl = ldf16(b + 108) * (float)((lo | (hi << 4)) - 32);
        int n = c / 8, j = (c % 8) / 2, l0 = 16 * (c % 2);
        const u8* qs = b + 32 + 32 * n + l0;
        const u8* hm = b + l0;
        for (int i = 0; i < 16; i++) {
            int q = ((qs[i] >> (2 * j)) & 3) - (((hm[i] >> (4 * n + j)) & 1) ? 0 : 4);
            o[i] = dl * (float)q;
        }
    }
};

// Q4_K / Q5_K: eight sub-blocks of 32 with 6-bit scales and mins (ggml's get_scale_min_k4).
__device__ __forceinline__ void scale_min_k4(int j, const u8* q, int* sc, int* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Q4_K: d, dmin (f16), scales[12], qs[128]: sub-block sb = 2p + h holds the low (h = 0) or high
// (h = 1) nibbles of qs[32p .. 32p + 32].
struct Q4_K {
    static const int QK = 256, BYTES = 144;
    __device__ static void dequant16(const u8* b, int c, float* o) {
        int sb = c / 2, sc, m;
        scale_min_k4(sb, b + 4, &sc, &m);
        float dl = ldf16(b) * (float)sc, ml = ldf16(b + 2) * (float)m;
        const u8* qs = b + 16 + 32 * (sb / 2) + 16 * (c % 2);
        int shift = 4 * (sb % 2);
        for (int i = 0; i < 16; i++) o[i] = dl * (float)((qs[i] >> shift) & 0xF) - ml;
    }
};

// Q5_K: d, dmin (f16), scales[12], qh[32] (bit sb of qh[l] = 5th bit of element 32 sb + l),
// qs[128] as Q4_K.
struct Q5_K {
    static const int QK = 256, BYTES = 176;
    __device__ static void dequant16(const u8* b, int c, float* o) {
        int sb = c / 2, sc, m;
        scale_min_k4(sb, b + 4, &sc, &m);
        float dl = ldf16(b) * (float)sc, ml = ldf16(b + 2) * (float)m;
        int l0 = 16 * (c % 2);
        const u8* qs = b + 48 + 32 * (sb / 2) + l0;
        const u8* qh = b + 16 + l0;
        int shift = 4 * (sb % 2);
        for (int i = 0; i < 16; i++) {
            int q = ((qs[i] >> shift) & 0xF) | (((qh[i] >> sb) & 1) << 4);
            o[i] = dl * (float)q - ml;
        }
    }
};

// Q6_K: ql[128], qh[64], scales[16] (i8), d (f16). Element 128n + 32k + l (k < 4): low 4 bits
// from ql[64n + 32(k % 2) + l] (low nibble for k < 2, high for k >= 2), high 2 bits from bits
// 2k .. 2k+1 of qh[32n + l]; minus 32.
struct Q6_K {
    static const int QK = 256, BYTES = 210;
    __device__ static void dequant16(const u8* b, int c, float* o) {
        float dl = ldf16(b + 208) * (float)(i8)b[192 + c];
        int n = c / 8, k = (c % 8) / 2, l0 = 16 * (c % 2);
        const u8* ql = b + 64 * n + 32 * (k % 2) + l0;
        const u8* qh = b + 128 + 32 * n + l0;
        int lshift = 4 * (k / 2);
        for (int i = 0; i < 16; i++) {
            int q = ((ql[i] >> lshift) & 0xF) | (((qh[i] >> (2 * k)) & 3) << 4);
            o[i] = dl * (float)(q - 32);
        }
    }
};

// Q8_K: d (f32), qs[256] (i8), bsums[16].
struct Q8_K {
    static const int QK = 256, BYTES = 292;
    __device__ static void dequant16(const u8* b, int c, float* o) {
        float d = ldf32(b);
        for (int i = 0; i < 16; i++) o[i] = d * (float)(i8)b[4 + 16 * c + i];
    }
};

// One warp per output row; blockDim.x = 32 * warps, grid.x = ceil(nrows / warps).
// ncols is a multiple of the format's QK (the host checks).
template <class T>
__device__ void matvec(const u8* __restrict__ w, unsigned long long row_bytes,
                       const float* __restrict__ x, float* __restrict__ y, int ncols, int nrows,
                       int nvec) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= nrows) return;
    const u8* wr = w + (unsigned long long)row * row_bytes;
    const int per_block = T::QK / 16;
    const int nchunks = ncols / 16;
    float acc[MAX_NV];
#pragma unroll
    for (int v = 0; v < MAX_NV; v++) acc[v] = 0.0f;
    float wv[16];
    for (int k = lane; k < nchunks; k += 32) {
        T::dequant16(wr + (unsigned long long)(k / per_block) * T::BYTES, k % per_block, wv);
        const float* xk = x + 16 * k;
#pragma unroll
        for (int v = 0; v < MAX_NV; v++) {
            if (v < nvec) {
                float s = 0.0f;
#pragma unroll
                for (int i = 0; i < 16; i++) s += wv[i] * xk[(unsigned long long)v * ncols + i];
                acc[v] += s;
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

// Embedding lookup: out[i] = row ids[i] of W, dequantized (the twin of quant::dequantize_row).
// One block per output row; each thread dequantizes 16-element chunks.
template <class T>
__device__ void get_rows(const u8* __restrict__ w, unsigned long long row_bytes,
                         const u32* __restrict__ ids, float* __restrict__ out, int ncols) {
    const u8* wr = w + (unsigned long long)ids[blockIdx.x] * row_bytes;
    float* o = out + (unsigned long long)blockIdx.x * ncols;
    const int per_block = T::QK / 16;
    float wv[16];
    for (int k = threadIdx.x; k < ncols / 16; k += blockDim.x) {
        T::dequant16(wr + (unsigned long long)(k / per_block) * T::BYTES, k % per_block, wv);
        for (int i = 0; i < 16; i++) o[16 * k + i] = wv[i];
    }
}

// The whole matrix dequantized to f16 (row-major [nrows][ncols]), the input of a cuBLAS gemm for
// prefill: one thread per 16-value chunk.
template <class T>
__device__ void dequant_f16(const u8* __restrict__ w, unsigned long long row_bytes,
                            u16* __restrict__ out, int ncols, unsigned long long nchunks) {
    unsigned long long t = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= nchunks) return;
    const int per_row = ncols / 16, per_block = T::QK / 16;
    unsigned long long row = t / per_row;
    int k = (int)(t % per_row);
    float wv[16];
    T::dequant16(w + row * row_bytes + (unsigned long long)(k / per_block) * T::BYTES,
                 k % per_block, wv);
    u16* o = out + row * ncols + 16 * k;
#pragma unroll
    for (int i = 0; i < 16; i += 2) {
        *(u32*)(o + i) = (u32)f32_to_f16(wv[i]) | ((u32)f32_to_f16(wv[i + 1]) << 16);
    }
}

// x rounded to f16 (the activations of a cuBLAS gemm).
extern "C" __global__ void to_f16(const float* __restrict__ x, u16* __restrict__ out,
                                  unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f32_to_f16(x[i]);
}

#define MATVEC(name, T)                                                                        \
    extern "C" __global__ void matvec_##name(const u8* w, unsigned long long row_bytes,         \
                                             const float* x, float* y, int ncols, int nrows,    \
                                             int nvec) {                                        \
        matvec<T>(w, row_bytes, x, y, ncols, nrows, nvec);                                     \
    }                                                                                          \
    extern "C" __global__ void get_rows_##name(const u8* w, unsigned long long row_bytes,       \
                                               const u32* ids, float* out, int ncols) {         \
        get_rows<T>(w, row_bytes, ids, out, ncols);                                            \
    }                                                                                          \
    extern "C" __global__ void dequant_f16_##name(const u8* w, unsigned long long row_bytes,   \
                                                  u16* out, int ncols,                         \
                                                  unsigned long long nchunks) {                \
        dequant_f16<T>(w, row_bytes, out, ncols, nchunks);                                     \
    }

MATVEC(f32, F32)
MATVEC(f16, F16)
MATVEC(bf16, BF16)
MATVEC(q4_0, Q4_0)
MATVEC(q4_1, Q4_1)
MATVEC(q5_0, Q5_0)
MATVEC(q5_1, Q5_1)
MATVEC(q8_0, Q8_0)
MATVEC(q8_1, Q8_1)
MATVEC(q2_k, Q2_K)
MATVEC(q3_k, Q3_K)
MATVEC(q4_k, Q4_K)
MATVEC(q5_k, Q5_K)
MATVEC(q6_k, Q6_K)
MATVEC(q8_k, Q8_K)
