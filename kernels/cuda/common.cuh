// Prepended to every kernel file of kernels/cuda/ before NVRTC compiles it (see
// host/engine/src/backend/cuda/mod.rs, `kernel_source`): the integer types, f16 conversions and
// the packed-block loads the files share. Header-free on purpose: NVRTC finds no CUDA headers by
// itself, so f16 conversion is one PTX instruction each way.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;

#ifndef REALM_HOST_TWIN  // tests/cuda-host supplies host versions
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

// Quantized blocks start at any even offset (Q4_0 is 18 bytes, Q6_K 210), so their multi-byte
// fields are read as 16-bit halves (every block size and field offset is even).
__device__ __forceinline__ u16 ld16(const u8* p) { return *(const u16*)p; }
__device__ __forceinline__ u32 ld32(const u8* p) { return (u32)ld16(p) | ((u32)ld16(p + 2) << 16); }
__device__ __forceinline__ float ldf16(const u8* p) { return f16_to_f32(ld16(p)); }
