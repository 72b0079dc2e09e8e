// The int8 mat-vec kernels' arithmetic (kernels/cuda/mmvq.cu), compiled for the host and checked
// against the f32 kernels' dequantization (kernels/cuda/matvec.cu's `dequant16`, which
// `realm gpu check` verified on a GPU against the CPU's `quant::dequantize_row`): for each format,
// random blocks (sane f16 scales, every other bit random) and random 8-bit activation blocks,
// the sum over a row of every lane's piece (`load` then `dot`) must equal the dot product of the
// dequantized weights with the dequantized activations. This catches a wrong byte offset, nibble
// or bit in any piece on a machine without a GPU (CI); the warp/grid code around the pieces is
// checked on a GPU by `realm gpu check`. Built and run by scripts/test-cuda-host.sh.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;

// The CUDA built-ins the kernel files use, for the host (common.cuh's f16 conversions are
// PTX, skipped under REALM_HOST_TWIN).
#define REALM_HOST_TWIN
#define __device__
#define __global__
#define __forceinline__ inline
#define __restrict__
struct Dim3 { unsigned x, y, z; };
static Dim3 threadIdx, blockIdx, blockDim;  // unused: only the per-block functions run here
template <class T> static T __shfl_xor_sync(unsigned, T v, int) { return v; }
static inline float __uint_as_float(u32 u) { float f; memcpy(&f, &u, 4); return f; }
static inline float f16_to_f32(u16 h) { return _cvtsh_ss(h); }
static inline u16 f32_to_f16(float f) { return _cvtss_sh(f, 0); }
static inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; i++) c += (int)(i8)(a >> (8 * i)) * (int)(i8)(b >> (8 * i));
    return c;
}

// Each file with common.cuh in front of it, as the host compiles them for the GPU.
namespace ref {
#include "../../kernels/cuda/common.cuh"
#include "../../kernels/cuda/matvec.cu"
}
namespace fast {
#include "../../kernels/cuda/common.cuh"
#include "../../kernels/cuda/mmvq.cu"
}

static std::mt19937 rng(42);

// `scales`: byte offsets of the f16 fields of a block (set to sane values: random bits could be
// NaN or infinite).
template <class R, class F>
static bool check(const char* name, std::vector<int> scales) {
    static_assert(R::QK == F::QK && R::BYTES == F::BYTES, "the same format");
    const int ncols = 512, nb = ncols / R::QK;
    double worst = 0;
    for (int trial = 0; trial < 300; trial++) {
        std::vector<u8> w(nb * R::BYTES);
        for (auto& b : w) b = rng() & 0xff;
        std::uniform_real_distribution<float> ud(0.001f, 0.1f);
        for (int b = 0; b < nb; b++) {
            for (int off : scales) {
                u16 h = f32_to_f16(ud(rng));
                memcpy(&w[b * R::BYTES + off], &h, 2);
            }
        }
        std::vector<i8> xq(ncols);
        std::vector<float> xd(ncols / 32);
        for (auto& q : xq) q = (i8)((int)(rng() % 255) - 127);
        for (auto& d : xd) d = ud(rng);
        double exact = 0, mag = 0;
        for (int c = 0; c < ncols / 16; c++) {
            float wv[16];
            R::dequant16(&w[(c / (R::QK / 16)) * R::BYTES], c % (R::QK / 16), wv);
            for (int i = 0; i < 16; i++) {
                int e = 16 * c + i;
                double p = (double)wv[i] * xq[e] * xd[e / 32];
                exact += p;
                mag += std::fabs(p);
            }
        }
        double got = 0;
        for (int b = 0; b < nb; b++) {
            for (int part = 0; part < F::PARTS; part++) {
                auto p = F::load(&w[b * F::BYTES], part);
                got += F::dot(p, part, &xq[b * F::QK], &xd[b * F::QK / 32]);
            }
        }
        worst = std::fmax(worst, std::fabs(got - exact) / (mag + 1e-30));
    }
    bool ok = worst < 1e-6;
    printf("%-5s worst |pieces - reference| / sum|w x| = %.2e  %s\n", name, worst, ok ? "ok" : "FAIL");
    return ok;
}

int main() {
    bool ok = true;
    ok &= check<ref::Q4_0, fast::Q4_0>("q4_0", {0});
    ok &= check<ref::Q5_0, fast::Q5_0>("q5_0", {0});
    ok &= check<ref::Q8_0, fast::Q8_0>("q8_0", {0});
    ok &= check<ref::Q4_K, fast::Q4_K>("q4_k", {0, 2});
    ok &= check<ref::Q5_K, fast::Q5_K>("q5_k", {0, 2});
    ok &= check<ref::Q6_K, fast::Q6_K>("q6_k", {208});
    return ok ? 0 : 1;
}
