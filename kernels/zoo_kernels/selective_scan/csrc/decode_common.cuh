// Device helpers shared by the decode kernels (mamba_step.cu, mamba_layers.cu): asynchronous copies into shared
// memory, one m16n8k16 tensor-core tile, recurrent states read and written four at a time, and the conversions
// (zoo_ss's, re-exported, and round_to).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "selective_scan_kernels.cuh"  // to_f, from_f, softplus_f, sigmoid_f

namespace zoo_decode {

using zoo_ss::from_f;
using zoo_ss::sigmoid_f;
using zoo_ss::softplus_f;
using zoo_ss::to_f;

// x rounded to T (the values the unfused step stores in the activations' dtype), back in fp32
template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_f(from_f<T>(x)); }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// D += A B for one m16n8k16 tile (fp32 accumulators): A 16 x 16 row-major, B 16 x 8 col-major, in T (bf16 or fp16)
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// Four consecutive states as fp32, and back: S is fp32 or the activation dtype (ZooConfig.decode_state_dtype "model")
__device__ __forceinline__ float4 load_state4(const float* p) { return *reinterpret_cast<const float4*>(p); }
template <typename S>
__device__ __forceinline__ float4 load_state4(const S* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const S* v = reinterpret_cast<const S*>(&raw);
  return make_float4(to_f(v[0]), to_f(v[1]), to_f(v[2]), to_f(v[3]));
}
__device__ __forceinline__ void store_state4(float* p, float4 h) { *reinterpret_cast<float4*>(p) = h; }
template <typename S>
__device__ __forceinline__ void store_state4(S* p, float4 h) {
  uint2 raw;
  S* v = reinterpret_cast<S*>(&raw);
  v[0] = from_f<S>(h.x), v[1] = from_f<S>(h.y), v[2] = from_f<S>(h.z), v[3] = from_f<S>(h.w);
  *reinterpret_cast<uint2*>(p) = raw;
}

}  // namespace zoo_decode
