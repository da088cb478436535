// Causal depthwise conv1d (W <= 4), forward and backward, with document resets (seq_idx) and a carried
// history (initial_state). Memory-bound: each thread owns 16 bytes of outputs of one row and loads 16 bytes of
// each input; its window's W-1 neighbours come from the neighbouring lanes by shuffles (lanes 0 and 31 read
// theirs), so DRAM sees x read once and y written once; the backward reads x and dy once and writes dx once,
// and reduces dweight/dbias per block before one atomic per (block, tap). Loading the neighbours from global
// memory instead (a second 16-byte load per input in the backward, W-1 scalar loads) ran at 70% / 50% of the
// copy bandwidth (fwd / fwd+bwd; 75% / 53% with the shuffles; Dao-AILab's causal_conv1d 86% / 77%, H200).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "causal_conv1d.h"

namespace zoo_conv {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

constexpr int kThreads = 128;

// Loads positions [t, t + N) of a row into f (zero outside [0, L)); 16 bytes at once when allowed.
template <typename T>
__device__ __forceinline__ void load_row(float* f, const T* row, int t, int L, bool vec) {
  constexpr int N = Pack<T>::N;
  if (vec && t >= 0 && t + N <= L) {
    Pack<T> p;
    *reinterpret_cast<uint4*>(&p) = *reinterpret_cast<const uint4*>(row + t);
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = to_f(p.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = (t + i >= 0 && t + i < L) ? to_f(row[t + i]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_row(T* row, const float* f, int t, int L, bool vec) {
  constexpr int N = Pack<T>::N;
  Pack<T> p;
#pragma unroll
  for (int i = 0; i < N; ++i) p.v[i] = from_f<T>(f[i]);
  if (vec && t + N <= L) {
    *reinterpret_cast<uint4*>(row + t) = *reinterpret_cast<const uint4*>(&p);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (t + i < L) row[t + i] = p.v[i];
  }
}

// last[i] = the latest document start at or before position t_first + i (or a large negative number),
// for the positions [t_first, t_first + kLen). A tap at position s is valid for output t iff last(t) <= s.
template <int kLen>
__device__ __forceinline__ void last_starts(int (&last)[kLen], const int* seq, int t_first, int L) {
  int lr = -(1 << 30);
  int prev = (t_first - 1 >= 0 && t_first - 1 < L) ? seq[t_first - 1] : 0;
#pragma unroll
  for (int i = 0; i < kLen; ++i) {
    const int t = t_first + i;
    const int cur = (t >= 0 && t < L) ? seq[t] : prev;
    if (t > 0 && t < L && cur != prev) lr = t;
    prev = cur;
    last[i] = lr;
  }
}

template <typename T, int kW>
__global__ void __launch_bounds__(kThreads) conv_fwd_kernel(const ConvParams p) {
  constexpr int kVec = Pack<T>::N, kH = kW - 1;
  const int row = blockIdx.x, L = p.len;
  const int t0 = (blockIdx.y * kThreads + threadIdx.x) * kVec;
  const int d = row % p.dim;
  const T* xr = static_cast<const T*>(p.x) + size_t(row) * L;
  float w[kW];
#pragma unroll
  for (int k = 0; k < kW; ++k) w[k] = p.weight[d * kW + k];
  const float bias = p.bias ? p.bias[d] : 0.f;

  float xw[kH + kVec];  // positions t0 - kH .. t0 + kVec - 1
  load_row(xw + kH, xr, t0, L, p.vec_ok);
  // the kH positions before t0 are the previous lane's last ones; lane 0 reads them itself
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < kH; ++j) xw[j] = __shfl_up_sync(0xffffffffu, xw[kVec + j], 1);
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < kH; ++j) {
      const int s = t0 - kH + j;
      // s past the row's end: a lane 0 past it computes nothing, but its read must stay inside the row
      xw[j] = s >= 0 ? (s < L ? to_f(xr[s]) : 0.f) : (p.init ? p.init[size_t(row) * kH + kH + s] : 0.f);
    }
  }
  if (t0 >= L) return;  // after the shuffles, which want the whole warp
  int last[kH + kVec];  // from t0 - kH: a start just before t0 cuts the first outputs' early taps
  if (p.seq_idx) last_starts<kH + kVec>(last, p.seq_idx + size_t(row / p.dim) * L, t0 - kH, L);
  float y[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    float acc = bias;
#pragma unroll
    for (int k = 0; k < kW; ++k) {
      const bool ok = !p.seq_idx || last[kH + i] <= t0 + i - kH + k;
      acc = fmaf(w[k], ok ? xw[i + k] : 0.f, acc);
    }
    if (p.silu) acc = acc * __fdividef(1.f, 1.f + __expf(-acc));
    y[i] = acc;
  }
  store_row(static_cast<T*>(p.y) + size_t(row) * L, y, t0, L, p.vec_ok);
}

// Blocks per SM the backward is compiled for (a register cap: 65536 / (128 x blocks)). Without document resets
// the kernel needs 48 registers (bf16, W = 4): 10 blocks per SM; with them, 64 and 8 (at 10 it spills 192 bytes).
// Before the two were compiled apart the seq_idx path's 64 registers held both to 8. fwd+bwd at the 130M shape,
// H200 (benchmarks/probe_conv1d.py, RESULTS.md twenty-fifth session): one kernel for both 0.114 ms; apart, 10
// blocks 0.105 (its cuda tests passed on the card), 12 blocks (40 registers, a 4-byte spill) 0.101 (the default
// since the twenty-seventh session: its cuda tests passed on the card; probe there 0.1008 vs 10 blocks 0.1052);
// causal_conv1d 0.077.
#ifndef ZOO_CONV_BWD_MIN_BLOCKS
#define ZOO_CONV_BWD_MIN_BLOCKS 12
#endif
#ifndef ZOO_CONV_BWD_SEQ_MIN_BLOCKS
#define ZOO_CONV_BWD_SEQ_MIN_BLOCKS 8
#endif

// kSeq: p.seq_idx is set (compiled apart: its document bookkeeping costs registers the common case does not need).
template <typename T, int kW, bool kSeq>
__global__ void __launch_bounds__(kThreads, kSeq ? ZOO_CONV_BWD_SEQ_MIN_BLOCKS : ZOO_CONV_BWD_MIN_BLOCKS)
    conv_bwd_kernel(const ConvParams p) {
  constexpr int kVec = Pack<T>::N, kH = kW - 1;
  constexpr int kPre = kVec + kH;  // outputs whose gradient reaches this thread's inputs: t0 .. t0+kVec+kH-1
  const int row = blockIdx.x, L = p.len;
  const int t0 = (blockIdx.y * kThreads + threadIdx.x) * kVec;
  const bool active = t0 < L;
  const int d = row % p.dim;
  const T* xr = static_cast<const T*>(p.x) + size_t(row) * L;
  const T* gr = static_cast<const T*>(p.dy) + size_t(row) * L;
  float w[kW];
#pragma unroll
  for (int k = 0; k < kW; ++k) w[k] = p.weight[d * kW + k];
  const float bias = p.bias ? p.bias[d] : 0.f;

  float dw[kW + 1];  // dweight[0..kW-1], dbias
#pragma unroll
  for (int k = 0; k <= kW; ++k) dw[k] = 0.f;
  // x at t0 - kH .. t0 + kVec + kH - 1 and dy at t0 .. t0 + kVec + kH - 1: each lane loads its own kVec of both
  // (16 bytes each); the kH before come from the previous lane, the kH after from the next, by shuffles (the whole
  // warp, active or not); lanes 0 and 31 read their outer neighbours' themselves.
  float xw[kH + kVec + kH];
  float g[kVec + kH];
  load_row(xw + kH, xr, t0, L, p.vec_ok);
  load_row(g, gr, t0, L, p.vec_ok);
  const int lane_id = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < kH; ++j) {
    xw[j] = __shfl_up_sync(0xffffffffu, xw[kVec + j], 1);
    xw[kH + kVec + j] = __shfl_down_sync(0xffffffffu, xw[kH + j], 1);
    g[kVec + j] = __shfl_down_sync(0xffffffffu, g[j], 1);
  }
  if (lane_id == 0) {
#pragma unroll
    for (int j = 0; j < kH; ++j) {
      const int s = t0 - kH + j;
      // s past the row's end: a lane 0 past it computes nothing, but its read must stay inside the row
      xw[j] = s >= 0 ? (s < L ? to_f(xr[s]) : 0.f) : (p.init ? p.init[size_t(row) * kH + kH + s] : 0.f);
    }
  }
  if (lane_id == 31) {
#pragma unroll
    for (int j = 0; j < kH; ++j) {
      const int s = t0 + kVec + j;
      xw[kH + kVec + j] = s < L ? to_f(xr[s]) : 0.f;
      g[kVec + j] = s < L ? to_f(gr[s]) : 0.f;
    }
  }
  if (active) {
    int last[kH + kPre];  // latest document start at or before t0 - kH + i
    if (kSeq) last_starts<kH + kPre>(last, p.seq_idx + size_t(row / p.dim) * L, t0 - kH, L);
    float dpre[kPre];  // dL/d(pre-activation) at t0 + i
#pragma unroll
    for (int i = 0; i < kPre; ++i) {
      float gi = g[i];
      if (p.silu) {
        float acc = bias;
#pragma unroll
        for (int k = 0; k < kW; ++k) {
          const bool ok = !kSeq || last[kH + i] <= t0 + i - kH + k;
          acc = fmaf(w[k], ok ? xw[i + k] : 0.f, acc);
        }
        const float sg = __fdividef(1.f, 1.f + __expf(-acc));
        gi *= sg * fmaf(acc, 1.f - sg, 1.f);
      }
      dpre[i] = t0 + i < L ? gi : 0.f;
    }
    // dx[s] = sum_k w[k] dpre[s + kH - k] over outputs whose window holds s in the same document.
    float dx[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      float acc = 0.f;
#pragma unroll
      for (int k = 0; k < kW; ++k) {
        const int o = i + kH - k;  // output index (relative to t0) that reads input t0 + i through tap k
        const bool ok = !kSeq || last[kH + o] <= t0 + i;
        acc = fmaf(w[k], ok ? dpre[o] : 0.f, acc);
      }
      dx[i] = acc;
    }
    store_row(static_cast<T*>(p.dx) + size_t(row) * L, dx, t0, L, p.vec_ok);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
#pragma unroll
      for (int k = 0; k < kW; ++k) {
        const bool ok = !kSeq || last[kH + i] <= t0 + i - kH + k;
        dw[k] = fmaf(dpre[i], ok ? xw[i + k] : 0.f, dw[k]);
      }
      dw[kW] += dpre[i];
    }
    if (t0 == 0 && p.dinit) {
      // The history positions -kH .. -1 feed outputs 0 .. kH-1 of the first document only.
#pragma unroll
      for (int j = 0; j < kH; ++j) {
        const int s = j - kH;
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < kW; ++k) {
          const int o = s + kH - k;
          if (o >= 0) {
            const bool ok = !kSeq || last[kH + o] <= s;
            acc = fmaf(w[k], ok ? dpre[o] : 0.f, acc);
          }
        }
        p.dinit[size_t(row) * kH + j] = acc;
      }
    }
  }
  const int lane = threadIdx.x & 31;
#ifdef ZOO_CONV_BWD_WARP_ATOMICS
  // each warp adds its sums itself (4x the atomics, no block barrier); an A/B knob of benchmarks/probe_conv1d.py
  float mine = 0.f;
#pragma unroll
  for (int k = 0; k <= kW; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dw[k] += __shfl_xor_sync(0xffffffffu, dw[k], off);
    if (lane == k) mine = dw[k];
  }
  if (lane < kW)
    atomicAdd(p.dweight + d * kW + lane, mine);
  else if (lane == kW && p.dbias)
    atomicAdd(p.dbias + d, mine);
#else
  __shared__ float red[kThreads / 32][kW + 1];
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k <= kW; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dw[k] += __shfl_xor_sync(0xffffffffu, dw[k], off);
    if (lane == 0) red[warp][k] = dw[k];
  }
  __syncthreads();
  if (threadIdx.x <= kW) {
    float s = 0.f;
#pragma unroll
    for (int wp = 0; wp < kThreads / 32; ++wp) s += red[wp][threadIdx.x];
    if (threadIdx.x < kW)
      atomicAdd(p.dweight + d * kW + threadIdx.x, s);
    else if (p.dbias)
      atomicAdd(p.dbias + d, s);
  }
#endif
}

template <typename T, int kW>
cudaError_t launch(const ConvParams& p, bool backward, cudaStream_t stream) {
  constexpr int kVec = Pack<T>::N;
  const int segs = (p.len + kThreads * kVec - 1) / (kThreads * kVec);
  const dim3 grid(p.batch * p.dim, segs);
  if (backward && p.seq_idx)
    conv_bwd_kernel<T, kW, true><<<grid, kThreads, 0, stream>>>(p);
  else if (backward)
    conv_bwd_kernel<T, kW, false><<<grid, kThreads, 0, stream>>>(p);
  else
    conv_fwd_kernel<T, kW><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_w(const ConvParams& p, bool backward, cudaStream_t stream) {
  switch (p.width) {
    case 2: return launch<T, 2>(p, backward, stream);
    case 3: return launch<T, 3>(p, backward, stream);
    case 4: return launch<T, 4>(p, backward, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t conv(const ConvParams& p, DType dtype, bool backward, cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return cudaSuccess;  // nothing to do (an empty grid is a launch error)
  switch (dtype) {
    case kFloat32: return launch_w<float>(p, backward, stream);
    case kBFloat16: return launch_w<__nv_bfloat16>(p, backward, stream);
    case kFloat16: return launch_w<__half>(p, backward, stream);
  }
  return cudaErrorInvalidValue;
}

// One thread per (batch row, channel): reads its width - 1 stored inputs and the new one, writes the output and
// shifts the new input into the state. A decode step of a Mamba layer moves 16 bytes of state per channel.
template <typename T>
__global__ void conv_update_kernel(const UpdateParams p) {
  const int d = blockIdx.x * blockDim.x + threadIdx.x, b = p.first_row + int(blockIdx.y);
  if (d >= p.dim) return;
  const int W = p.width;
  float* st = p.state + (size_t(b) * p.dim + d) * (W - 1);
  const float* w = p.weight + size_t(d) * W;
  const float x = to_f(static_cast<const T*>(p.x)[b * p.x_stride + d]);
  float s[3];
  float acc = p.bias ? p.bias[d] : 0.f;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    if (k < W - 1) {
      s[k] = st[k];
      acc = fmaf(w[k], s[k], acc);
    }
  }
  acc = fmaf(w[W - 1], x, acc);
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    if (k < W - 2) st[k] = s[k + 1];
  }
  st[W - 2] = x;
  if (p.silu) acc = acc * __fdividef(1.f, 1.f + __expf(-acc));
  static_cast<T*>(p.out)[b * p.out_stride + d] = from_f<T>(acc);
}

template <typename T>
cudaError_t launch_conv_update(const UpdateParams& p, cudaStream_t stream) {
  constexpr int kThreads = 128, kMaxGridY = 65535;
  for (int b0 = 0; b0 < p.batch; b0 += kMaxGridY) {  // one launch up to 65535 rows
    UpdateParams q = p;
    q.first_row = b0;
    const int rows = p.batch - b0 < kMaxGridY ? p.batch - b0 : kMaxGridY;
    conv_update_kernel<T><<<dim3((p.dim + kThreads - 1) / kThreads, rows), kThreads, 0, stream>>>(q);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t conv_update(const UpdateParams& p, DType dtype, cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return cudaSuccess;  // nothing to do (an empty grid is a launch error)
  switch (dtype) {
    case kFloat32: return launch_conv_update<float>(p, stream);
    case kBFloat16: return launch_conv_update<__nv_bfloat16>(p, stream);
    case kFloat16: return launch_conv_update<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace zoo_conv
