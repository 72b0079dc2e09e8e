// The non-matrix operations of a forward pass (see host/engine/src/graph.rs for each op's meaning
// and host/engine/src/backend/cpu.rs for its CPU twin). Activations are f32 `[rows][width]`,
// row-major; KV pages are f16 `[n_pages * page_size][kv_dim]` per layer.
//
// Correctness first, like matvec.cu: one straightforward kernel per op, checked end to end by
// `realm eval --backend cuda` against llama.cpp's reference logits. Header-free on purpose (NVRTC
// finds no CUDA headers by itself); common.cuh is prepended.

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float round_f16(float f) { return f16_to_f32(f32_to_f16(f)); }

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
template <typename T>
__device__ T block_sum(T v, T* shared) {
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int nw = blockDim.x / 32;
    T s = lane < nw ? shared[lane] : (T)0;
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    __syncthreads();
    return s;
}

__device__ float block_max(float v, float* shared) {
    for (int off = 16; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int nw = blockDim.x / 32;
    float s = lane < nw ? shared[lane] : NEG_INF;
    for (int off = 16; off > 0; off /= 2) s = fmaxf(s, __shfl_xor_sync(0xffffffffu, s, off));
    __syncthreads();
    return s;
}

// out[c] = x[c] / sqrt(mean(x[c]^2) + eps) * w for each chunk c of `len` values (a row, or one
// head for QK-norm); one block per chunk. Squares summed in f64, as the CPU backend and ggml.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int len,
                                    float eps) {
    __shared__ double partial[32];
    const float* xc = x + (unsigned long long)blockIdx.x * len;
    float* oc = out + (unsigned long long)blockIdx.x * len;
    double ss = 0.0;
    for (int i = threadIdx.x; i < len; i += blockDim.x) ss += (double)(xc[i] * xc[i]);
    ss = block_sum<double>(ss, partial);
    float scale = 1.0f / sqrtf((float)(ss / len) + eps);
    for (int i = threadIdx.x; i < len; i += blockDim.x) oc[i] = xc[i] * scale * w[i];
}

extern "C" __global__ void scale(float* x, float s, unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

extern "C" __global__ void add(float* x, const float* y, unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// x[r][c] += b[c]
extern "C" __global__ void add_bias(float* x, const float* b, int width, unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += b[i % width];
}

// gate = silu(gate) * up
extern "C" __global__ void glu_silu(float* g, const float* u, unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float x = g[i];
        g[i] = x / (1.0f + expf(-x)) * u[i];
    }
}

// gate = gelu(gate) * up, tanh approximation, evaluated as ggml does: on the input rounded to
// f16, the result rounded to f16 (the CPU backend's table); identity above 10, zero below -10.
extern "C" __global__ void glu_gelu(float* g, const float* u, unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float x = g[i], y;
        if (x <= -10.0f) {
            y = 0.0f;
        } else if (x >= 10.0f) {
            y = x;
        } else {
            float h = round_f16(x);
            y = round_f16(0.5f * h * (1.0f + tanhf(0.7978846f * h * (1.0f + 0.044715f * h * h))));
        }
        g[i] = y * u[i];
    }
}

// Rotates each head of each row by the (cos, sin) pairs of its row: table[r][i] = (cos, sin) of
// pair i (n_dims / 2 pairs). neox: element i pairs with i + n_dims/2; else 2i with 2i+1.
// One thread per (row, head, pair).
extern "C" __global__ void rope(float* x, const float* table, int width, int head_dim,
                                int n_dims, int neox, unsigned long long n_pairs_total) {
    unsigned long long t = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n_pairs_total) return;
    int half = n_dims / 2;
    int heads = width / head_dim;
    unsigned long long row = t / ((unsigned long long)heads * half);
    int rem = (int)(t % ((unsigned long long)heads * half));
    int head = rem / half, i = rem % half;
    float c = table[(row * half + i) * 2], s = table[(row * half + i) * 2 + 1];
    float* h = x + row * width + (unsigned long long)head * head_dim;
    int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    float x0 = h[a], x1 = h[b];
    h[a] = x0 * c - x1 * s;
    h[b] = x0 * s + x1 * c;
}

// Where position `pos` of row r's sequence lives: pages[page_off[r] + pos / page_size] etc.
__device__ __forceinline__ unsigned long long slot_of(const u32* pages, u32 page_off, int pos,
                                                      int page_size) {
    return (unsigned long long)pages[page_off + pos / page_size] * page_size + pos % page_size;
}

// kc/vc[slot(r)] = f16(k/v[r]); one block per row.
extern "C" __global__ void store_kv(const float* k, const float* v, u16* kc, u16* vc,
                                    const u32* pages, const u32* row_page_off,
                                    const int* row_pos, int page_size, int kv_dim) {
    int r = blockIdx.x;
    unsigned long long slot = slot_of(pages, row_page_off[r], row_pos[r], page_size);
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        kc[slot * kv_dim + i] = f32_to_f16(k[(unsigned long long)r * kv_dim + i]);
        vc[slot * kv_dim + i] = f32_to_f16(v[(unsigned long long)r * kv_dim + i]);
    }
}

#define ATTN_TILE 128

// Causal attention (the reference kernel), one block (ATTN_TILE threads) per (row, query head): the row's query head
// against the keys of positions lo..=pos of its sequence (lo = pos + 1 - window, or 0), through
// its page table, softmax(scale * q.k) weighting the values. Two passes over the keys in tiles of
// ATTN_TILE positions, so any context fits in a few KiB of shared memory: the first finds the
// softmax's max and sum, the second weights the values by each probability rounded to f16 — as
// the CPU backend and llama.cpp do (the query is rounded to f16 too). head_dim <= 512.
__device__ __forceinline__ float attn_score(const float* qs, const u16* kc, const u32* pages,
                                            u32 off, int j, int page_size, int kv_dim, int kvh,
                                            int head_dim, float scale) {
    const u16* kr = kc + slot_of(pages, off, j, page_size) * kv_dim + kvh * head_dim;
    float dot = 0.0f;
    for (int d = 0; d < head_dim; d++) dot += qs[d] * f16_to_f32(kr[d]);
    return dot * scale;
}

extern "C" __global__ void attention(const float* q, const u16* kc, const u16* vc, float* out,
                                     const u32* pages, const u32* row_page_off,
                                     const int* row_pos, int page_size, int n_head, int n_head_kv,
                                     int head_dim, float scale, int window) {
    __shared__ float qs[512];
    __shared__ float p[ATTN_TILE];
    __shared__ float red[32];
    int r = blockIdx.x / n_head, h = blockIdx.x % n_head;
    int kvh = h / (n_head / n_head_kv);
    int kv_dim = n_head_kv * head_dim;
    int pos = row_pos[r];
    int lo = window > 0 ? max(0, pos + 1 - window) : 0;
    u32 off = row_page_off[r];
    const float* qh = q + ((unsigned long long)r * n_head + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) qs[d] = round_f16(qh[d]);
    __syncthreads();

    // Pass 1: the max of the scores, then the sum of exp(score - max).
    float m = NEG_INF;
    for (int t0 = lo; t0 <= pos; t0 += ATTN_TILE) {
        int j = t0 + threadIdx.x;
        float s = j <= pos ? attn_score(qs, kc, pages, off, j, page_size, kv_dim, kvh, head_dim,
                                        scale)
                           : NEG_INF;
        m = fmaxf(m, block_max(s, red));
    }
    float sum = 0.0f;
    for (int t0 = lo; t0 <= pos; t0 += ATTN_TILE) {
        int j = t0 + threadIdx.x;
        float e = j <= pos ? expf(attn_score(qs, kc, pages, off, j, page_size, kv_dim, kvh,
                                             head_dim, scale) - m)
                           : 0.0f;
        sum += block_sum<float>(e, red);
    }
    float inv = 1.0f / sum;

    // Pass 2: out = sum_j round_f16(p_j) * v_j. Each thread owns output dimensions
    // d = threadIdx.x + k * ATTN_TILE.
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int t0 = lo; t0 <= pos; t0 += ATTN_TILE) {
        int j = t0 + threadIdx.x;
        p[threadIdx.x] = j <= pos ? round_f16(expf(attn_score(qs, kc, pages, off, j, page_size,
                                                              kv_dim, kvh, head_dim, scale) -
                                                   m) *
                                              inv)
                                  : 0.0f;
        __syncthreads();
        int n_t = min(ATTN_TILE, pos + 1 - t0);
        for (int k = 0; k < 4; k++) {
            int d = threadIdx.x + k * ATTN_TILE;
            if (d < head_dim) {
                float a = acc[k];
                for (int jj = 0; jj < n_t; jj++) {
                    const u16* vr =
                        vc + slot_of(pages, off, t0 + jj, page_size) * kv_dim + kvh * head_dim;
                    a += p[jj] * f16_to_f32(vr[d]);
                }
                acc[k] = a;
            }
        }
        __syncthreads();
    }
    float* oh = out + ((unsigned long long)r * n_head + h) * head_dim;
    for (int k = 0; k < 4; k++) {
        int d = threadIdx.x + k * ATTN_TILE;
        if (d < head_dim) oh[d] = acc[k];
    }
}

#define ATTN_WARPS 4

// Causal attention (the fast kernel, `REALM_CUDA_KERNELS=fast` until a GPU run has checked it
// end to end), one block (ATTN_WARPS warps) per (row, query head): the row's query head
// against the keys of positions lo..=pos of its sequence (lo = pos + 1 - window, or 0), through
// its page table, softmax(scale * q.k) weighting the values. The warps take the positions in
// turn; a warp's lanes own head_dim / 32 consecutive dimensions each, so a key or value row is
// read by one coalesced warp load and a score is one warp reduction. Two passes over the keys:
// the first finds the softmax's max and sum (online, per warp, then across warps), the second
// weights the values by each probability rounded to f16, as the CPU backend and llama.cpp do (the
// query is rounded to f16 too). head_dim is a multiple of 64 (each lane's dimensions are an even
// count, read two halves at a time), at most 512; the host takes the reference kernel otherwise.
__device__ __forceinline__ float warp_sum(float v) {
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// The lane's `per` dimensions of row `r` of f16 pages (per is even: two halves per 32-bit load);
// out[i] for i >= per is left as it was (callers bound their loops by per).
__device__ __forceinline__ void load_dims(const u16* r, int per, float* out) {
#pragma unroll
    for (int i = 0; i < 16; i += 2) {
        if (i < per) {
            u32 two = *(const u32*)(r + i);
            out[i] = f16_to_f32((u16)(two & 0xffff));
            out[i + 1] = f16_to_f32((u16)(two >> 16));
        }
    }
}

extern "C" __global__ void attention_warps(const float* q, const u16* kc, const u16* vc,
                                           float* out, const u32* pages,
                                           const u32* row_page_off, const int* row_pos,
                                           int page_size, int n_head, int n_head_kv,
                                           int head_dim, float scale, int window) {
    __shared__ float wm[ATTN_WARPS], wl[ATTN_WARPS];
    __shared__ float acc_s[ATTN_WARPS][512];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r = blockIdx.x / n_head, h = blockIdx.x % n_head;
    const int kvh = h / (n_head / n_head_kv);
    const int kv_dim = n_head_kv * head_dim;
    const int per = head_dim / 32, d0 = lane * per;
    const int pos = row_pos[r];
    const int lo = window > 0 ? max(0, pos + 1 - window) : 0;
    const u32 off = row_page_off[r];
    const float* qh = q + ((unsigned long long)r * n_head + h) * head_dim + d0;
    float qr[16], kr[16];
#pragma unroll
    for (int i = 0; i < 16; i++) qr[i] = i < per ? round_f16(qh[i]) : 0.0f;
    const unsigned long long head_off = (unsigned long long)kvh * head_dim + d0;

    // Pass 1: per warp, the running max and sum of exp(score - max); then across warps.
    float m = NEG_INF, l = 0.0f;
    for (int j = lo + warp; j <= pos; j += ATTN_WARPS) {
        load_dims(kc + slot_of(pages, off, j, page_size) * kv_dim + head_off, per, kr);
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            if (i < per) dot += qr[i] * kr[i];
        }
        float sc = warp_sum(dot) * scale;
        float mn = fmaxf(m, sc);
        l = l * expf(m - mn) + expf(sc - mn);
        m = mn;
    }
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
    __syncthreads();
    float gm = NEG_INF;
    for (int w = 0; w < ATTN_WARPS; w++) gm = fmaxf(gm, wm[w]);
    float gl = 0.0f;
    for (int w = 0; w < ATTN_WARPS; w++) {
        if (wl[w] > 0.0f) gl += wl[w] * expf(wm[w] - gm);
    }
    const float inv = 1.0f / gl;

    // Pass 2: out = sum_j round_f16(p_j) * v_j, each warp over its positions, then summed.
    float acc[16];
#pragma unroll
    for (int i = 0; i < 16; i++) acc[i] = 0.0f;
    for (int j = lo + warp; j <= pos; j += ATTN_WARPS) {
        unsigned long long slot = slot_of(pages, off, j, page_size) * kv_dim + head_off;
        load_dims(kc + slot, per, kr);
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            if (i < per) dot += qr[i] * kr[i];
        }
        float p = round_f16(expf(warp_sum(dot) * scale - gm) * inv);
        load_dims(vc + slot, per, kr);
#pragma unroll
        for (int i = 0; i < 16; i++) {
            if (i < per) acc[i] += p * kr[i];
        }
    }
#pragma unroll
    for (int i = 0; i < 16; i++) {
        if (i < per) acc_s[warp][d0 + i] = acc[i];
    }
    __syncthreads();
    float* oh = out + ((unsigned long long)r * n_head + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float sum = 0.0f;
        for (int w = 0; w < ATTN_WARPS; w++) sum += acc_s[w][d];
        oh[d] = sum;
    }
}

// out[i] = x[rows[i]], rows of `width`; one block per output row.
extern "C" __global__ void gather_rows(const float* x, float* out, const u32* rows, int width) {
    const float* src = x + (unsigned long long)rows[blockIdx.x] * width;
    float* dst = out + (unsigned long long)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}
