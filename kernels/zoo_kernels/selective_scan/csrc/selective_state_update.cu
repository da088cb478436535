// One decoding step of the selective scan: updates the N fp32 states of every (batch row, channel) in place,
//   dt = dt_low W^T (optional: Mamba's dt_proj folded in), dt += dt_bias (optional), dt = softplus(dt) (optional),
//   h = h * exp(dt A) + dt x B, y = sum_n h C, y += D x (optional), y *= z sigmoid(z) (optional),
// in one launch instead of the ten small ones of the torch path. The step moves batch * dim * N * 8 bytes of
// state (read and written once) and little else, so it is bound by how many bytes are in flight to DRAM.
//
// History, H200 (4.8 TB/s), batch 64, dim 1536, N = 16 (12.6 MB of state read and written: the floor is ~2.6 us):
// - one thread per channel looping over its N states, 64 bytes apart between neighbouring threads: 21 us;
// - kLanes = N lanes per channel, one 4-byte state per lane (the scalar kernel below): 17.4 us, 0.7 TB/s
//   (3.2 us at batch 1). By Little's law one 4-byte load in flight per thread is far too little; and its state
//   loads wait for the round trip of dt (they sit in a loop after the softplus).
// - this version (the vector kernel): a lane owns 4 consecutive states of a channel and moves them, and A,
//   with 16-byte accesses (B, C: 16 or 8 bytes when aligned), and from batch 8 on a block takes kRows = 4
//   batch rows of the same channels, issuing all the rows' loads (of the first 4-state group: before dt's
//   arithmetic) ahead of any use: 4 x 16 bytes of state in flight per thread instead of 4 bytes, A read once
//   for the 4 rows. Not timed alone yet: with it and the fused residual add + norm, a Mamba-130M decode step at
//   batch 64 went from 1.31 to 0.80 ms on the H200 (benchmarks/RESULTS.md; the per-kernel profile was not re-run).
// - dt_proj folded in (kLowRank): one launch fewer per layer and step. H200, bf16, Mamba-130M shapes (R = 48),
//   24 layers in a CUDA graph, per layer: batch 64 9.9 us against 2.6 (dt_proj matmul) + 7.4 (this kernel);
//   batch 1 2.4 against 2.6 + 1.7. At batch 64 the dot product's round trips lengthen the kernel by 2.5 us: its
//   loads (every channel of a warp loads the same dt_low rows) need registers that the state group holds.
// The scalar kernel stays for N % 4 != 0 and for state or A not 16-byte aligned.
#include <cstdint>

#include "selective_scan_kernels.cuh"

namespace zoo_ss {

constexpr int kUpdateThreads = 128;
constexpr int kRowsMinBatch = 8;  // below this many rows one row per block (enough blocks at batch 1)

// The sum of v over the kLanes lanes of a channel, in every one of them. The mask names only those lanes, so
// the channels past dim (which skip the body) need not take part.
template <int kLanes>
__device__ __forceinline__ float channel_sum(float v) {
  unsigned mask = 0xffffffffu;
  if constexpr (kLanes < 32) mask = ((1u << kLanes) - 1) << (threadIdx.x % 32 / kLanes * kLanes);
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(mask, v, offset, kLanes);
  return v;
}

// ---------------------------------------------------------------------------------------------------
// Scalar kernel (any N; any alignment)

// kLanes lanes per channel (a power of two <= 32; 128 / kLanes channels per block): lane l updates states
// l, l + kLanes, ... so that a warp reads and writes whole contiguous rows of the state (N = 16: two channels
// per warp, 128 bytes each), and the lanes of a channel sum their parts of y with shuffles. kLowRank: dt is
// dt_low W^T, lane l taking the terms l, l + kLanes, ... of the dot product.
template <typename T, int kLanes, bool kLowRank>
__global__ void __launch_bounds__(kUpdateThreads) state_update_kernel(const UpdateParams p) {
  constexpr int kChannels = kUpdateThreads / kLanes;
  const int lane = threadIdx.x % kLanes;
  const int d = blockIdx.x * kChannels + threadIdx.x / kLanes, b = blockIdx.y;
  const bool active = d < p.dim;  // no early return: every lane of the warp takes part in the shuffles
  const int N = p.nstate;
  float y = 0.f, x = 0.f;
  if (active) {
    const int g = d / p.dim_per_group;
    x = to_f(static_cast<const T*>(p.x)[b * p.x_stride + d]);
    float dt;
    if constexpr (kLowRank) {
      const T* lo = static_cast<const T*>(p.dt) + b * p.dt_stride;
      const T* W = static_cast<const T*>(p.dt_weight) + size_t(d) * p.dt_rank;
      dt = 0.f;
      for (int k = lane; k < p.dt_rank; k += kLanes) dt = fmaf(to_f(lo[k]), to_f(W[k]), dt);
      dt = channel_sum<kLanes>(dt);
    } else {
      dt = to_f(static_cast<const T*>(p.dt)[b * p.dt_stride + d]);
    }
    if (p.dt_bias) dt += p.dt_bias[d];
    if (p.softplus) dt = softplus_f(dt);
    const T* Bp = static_cast<const T*>(p.B) + b * p.b_stride + size_t(g) * N;
    const T* Cp = static_cast<const T*>(p.C) + b * p.c_stride + size_t(g) * N;
    const float* A = p.A + size_t(d) * N;
    float* st = p.state + (size_t(b) * p.dim + d) * N;
    const float dx = dt * x;
    for (int n = lane; n < N; n += kLanes) {
      const float hn = fmaf(st[n], expf(dt * A[n]), dx * to_f(Bp[n]));
      st[n] = hn;
      y = fmaf(hn, to_f(Cp[n]), y);
    }
  }
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset >>= 1) y += __shfl_xor_sync(0xffffffffu, y, offset, kLanes);
  if (!active || lane != 0) return;
  if (p.D) y = fmaf(p.D[d], x, y);
  if (p.z) {
    const float zz = to_f(static_cast<const T*>(p.z)[b * p.z_stride + d]);
    y *= zz * sigmoid_f(zz);
  }
  static_cast<T*>(p.out)[b * p.out_stride + d] = from_f<T>(y);
}

// ---------------------------------------------------------------------------------------------------
// Vector kernel (N % 4 == 0; state and A 16-byte aligned)

// Four consecutive elements of B or C as fp32: one 16-byte (fp32) or 8-byte (bf16, fp16) load when kVec (the
// pointer is then aligned to 4 elements), else four scalar ones. A template argument rather than a runtime
// flag, so that a kernel holds one of the two load paths (with both, ptxas interleaved their predicated loads
// with the arithmetic).
template <bool kVec, typename T>
__device__ __forceinline__ float4 load4(const T* ptr) {
  return make_float4(to_f(ptr[0]), to_f(ptr[1]), to_f(ptr[2]), to_f(ptr[3]));
}
template <>
__device__ __forceinline__ float4 load4<true, float>(const float* ptr) {
  return __ldg(reinterpret_cast<const float4*>(ptr));
}
template <>
__device__ __forceinline__ float4 load4<true, __nv_bfloat16>(const __nv_bfloat16* ptr) {
  const uint2 u = __ldg(reinterpret_cast<const uint2*>(ptr));
  const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
  const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}
template <>
__device__ __forceinline__ float4 load4<true, __half>(const __half* ptr) {
  const uint2 u = __ldg(reinterpret_cast<const uint2*>(ptr));
  const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
  const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}

__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
  return fmaf(a.x, b.x, fmaf(a.y, b.y, fmaf(a.z, b.z, fmaf(a.w, b.w, acc))));
}

__device__ __forceinline__ float step(float h, float a, float dt, float dx, float b) {
  return fmaf(h, expf(dt * a), dx * b);
}

// kLanes lanes per channel (the number of 4-state groups rounded up to a power of two, at most 32;
// 128 / kLanes channels per block): lane l updates states 4l..4l+3, then 4(l + kLanes)..., so a warp reads and
// writes whole contiguous rows of the state with 16-byte accesses (N = 16: 8 channels per warp, 512 bytes).
// A block takes kRows consecutive batch rows of its channels; rows past the batch (in the last blocks) re-read
// the last row, so no access is out of bounds, and write nothing. kVecBC: B, C rows (with kLowRank also the rows
// of dt_low and W) allow 4-element loads.
// kLowRank: dt is dt_low W^T (Mamba's dt_proj folded in). The lanes of a channel split the dot product (4 terms
// per load with kVecBC: R = 48 at N = 16 is 12 terms, 3 loads of W, per lane) and sum it with shuffles; each
// W element a lane loads serves the block's kRows rows. Its loads go out after the first state group's, so that
// the state's round trip overlaps the dot product's.
// 5 blocks per SM for kRows = 4: 96 registers and no spills (ptxas alone takes 128: 4 blocks; 6 blocks spill).
template <typename T, int kLanes, int kRows, bool kVecBC, bool kLowRank>
__global__ void __launch_bounds__(kUpdateThreads, kRows == 1 ? 1 : 5)
    state_update_vec_kernel(const UpdateParams p) {
  constexpr int kChannels = kUpdateThreads / kLanes;
  const int lane = threadIdx.x % kLanes;
  const int d = blockIdx.x * kChannels + threadIdx.x / kLanes, b0 = blockIdx.y * kRows;
  const bool active = d < p.dim;  // no early return: every lane of the warp takes part in the shuffles
  const int N = p.nstate;
  float y[kRows], x[kRows], zv[kRows];
  float Dd = 0.f;
#pragma unroll
  for (int r = 0; r < kRows; ++r) y[r] = x[r] = zv[r] = 0.f;
  if (active) {
    const int g = d / p.dim_per_group;
    const T* xp = static_cast<const T*>(p.x);
    const T* dtp = static_cast<const T*>(p.dt);
    const T* zp = static_cast<const T*>(p.z);
    const float bias = p.dt_bias ? p.dt_bias[d] : 0.f;
    if (p.D) Dd = p.D[d];
    // the per-row scalars first, then the state's loads, then the arithmetic on dt
    int row[kRows];
    float dt[kRows], dx[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      row[r] = min(b0 + r, p.batch - 1);
      x[r] = to_f(xp[row[r] * p.x_stride + d]);
      if constexpr (!kLowRank) dt[r] = to_f(dtp[row[r] * p.dt_stride + d]);
      if (p.z) zv[r] = to_f(zp[row[r] * p.z_stride + d]);  // z now: its load overlaps the state's
    }
    const float* Ad = p.A + size_t(d) * N;
    const T* Bb = static_cast<const T*>(p.B) + size_t(g) * N;
    const T* Cb = static_cast<const T*>(p.C) + size_t(g) * N;
    float4 a, h[kRows], bv[kRows], cv[kRows];
    auto load_bc = [&](int r, int n) {
      bv[r] = load4<kVecBC>(Bb + row[r] * p.b_stride + n);
      cv[r] = load4<kVecBC>(Cb + row[r] * p.c_stride + n);
    };
    // all loads of a group of 4 states of all rows, before any arithmetic on them (B, C unless with_bc is false)
    auto load_group = [&](int n, bool with_bc) {
      a = __ldg(reinterpret_cast<const float4*>(Ad + n));
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        h[r] = ld4(p.state + (size_t(row[r]) * p.dim + d) * N + n);
        if (with_bc) load_bc(r, n);
      }
    };
    // the first group's loads go out before dt is needed (in the loop they would wait for dt's round trip); with
    // the low-rank dt and kRows = 4, B and C only after the dot product's loads, for which they would leave too
    // few registers (ptxas then issued those one or two at a time)
    constexpr bool kLateBC = kLowRank && kRows > 1;
    int n = 4 * lane;
    if (n < N) load_group(n, !kLateBC);
    if constexpr (kLowRank) {
      const T* W = static_cast<const T*>(p.dt_weight) + size_t(d) * p.dt_rank;
#pragma unroll
      for (int r = 0; r < kRows; ++r) dt[r] = 0.f;
      if constexpr (kVecBC) {
#pragma unroll 2
        for (int k = 4 * lane; k < p.dt_rank; k += 4 * kLanes) {
          const float4 w = load4<true>(W + k);
#pragma unroll
          for (int r = 0; r < kRows; ++r) dt[r] = dot4(load4<true>(dtp + row[r] * p.dt_stride + k), w, dt[r]);
        }
      } else {
#pragma unroll 1
        for (int k = lane; k < p.dt_rank; k += kLanes) {
          const float w = to_f(W[k]);
#pragma unroll
          for (int r = 0; r < kRows; ++r) dt[r] = fmaf(to_f(dtp[row[r] * p.dt_stride + k]), w, dt[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) dt[r] = channel_sum<kLanes>(dt[r]);
      if (kLateBC && n < N) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) load_bc(r, n);
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (p.dt_bias) dt[r] += bias;
      if (p.softplus) dt[r] = softplus_f(dt[r]);
      dx[r] = dt[r] * x[r];
    }
    while (n < N) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float4 hn;
        hn.x = step(h[r].x, a.x, dt[r], dx[r], bv[r].x);
        hn.y = step(h[r].y, a.y, dt[r], dx[r], bv[r].y);
        hn.z = step(h[r].z, a.z, dt[r], dx[r], bv[r].z);
        hn.w = step(h[r].w, a.w, dt[r], dx[r], bv[r].w);
        if (kRows == 1 || b0 + r < p.batch) st4(p.state + (size_t(b0 + r) * p.dim + d) * N + n, hn);
        y[r] = fmaf(hn.x, cv[r].x, y[r]);
        y[r] = fmaf(hn.y, cv[r].y, y[r]);
        y[r] = fmaf(hn.z, cv[r].z, y[r]);
        y[r] = fmaf(hn.w, cv[r].w, y[r]);
      }
      n += 4 * kLanes;  // N > 4 * 32: the next groups of this lane
      if (n < N) load_group(n, true);
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset >>= 1)
      y[r] += __shfl_xor_sync(0xffffffffu, y[r], offset, kLanes);
  }
  if (!active) return;
  // every lane of a channel holds the sums: lane r % kLanes writes row r
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (lane != r % kLanes || b0 + r >= p.batch) continue;
    float yr = y[r];
    if (p.D) yr = fmaf(Dd, x[r], yr);
    if (p.z) yr *= zv[r] * sigmoid_f(zv[r]);
    static_cast<T*>(p.out)[(b0 + r) * p.out_stride + d] = from_f<T>(yr);
  }
}

// ---------------------------------------------------------------------------------------------------
// Launchers

// Calls launch(q) for the batch, rows_per_block rows per block of gridDim.y: once with q = p up to 65535 blocks,
// else for slices of at most that many blocks' rows, q's batch pointers moved to the slice's first row (every
// offset a multiple of 4 elements where the rows were, so the kernels' alignment choices hold). Returns the first
// launch error.
template <typename T, typename Launch>
cudaError_t launch_rows(const UpdateParams& p, int rows_per_block, Launch launch) {
  const int rows_per_launch = kMaxGridY / rows_per_block * rows_per_block;
  for (int b0 = 0; b0 < p.batch; b0 += rows_per_launch) {
    UpdateParams q = p;
    q.batch = p.batch - b0 < rows_per_launch ? p.batch - b0 : rows_per_launch;
    q.state = p.state + size_t(b0) * p.dim * p.nstate;
    q.x = static_cast<const T*>(p.x) + b0 * p.x_stride;
    q.dt = static_cast<const T*>(p.dt) + b0 * p.dt_stride;
    q.B = static_cast<const T*>(p.B) + b0 * p.b_stride;
    q.C = static_cast<const T*>(p.C) + b0 * p.c_stride;
    if (p.z) q.z = static_cast<const T*>(p.z) + b0 * p.z_stride;
    q.out = static_cast<T*>(p.out) + b0 * p.out_stride;
    launch(q);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T, int kLanes, bool kLowRank>
cudaError_t launch_lanes(const UpdateParams& p, cudaStream_t stream) {
  constexpr int kChannels = kUpdateThreads / kLanes;
  return launch_rows<T>(p, 1, [&](const UpdateParams& q) {
    state_update_kernel<T, kLanes, kLowRank>
        <<<dim3((q.dim + kChannels - 1) / kChannels, q.batch), kUpdateThreads, 0, stream>>>(q);
  });
}

template <typename T, int kLanes, int kRows, bool kVecBC, bool kLowRank>
cudaError_t launch_vec_rows(const UpdateParams& p, cudaStream_t stream) {
  constexpr int kChannels = kUpdateThreads / kLanes;
  return launch_rows<T>(p, kRows, [&](const UpdateParams& q) {
    const dim3 grid((q.dim + kChannels - 1) / kChannels, (q.batch + kRows - 1) / kRows);
    state_update_vec_kernel<T, kLanes, kRows, kVecBC, kLowRank><<<grid, kUpdateThreads, 0, stream>>>(q);
  });
}

template <typename T, int kLanes, bool kLowRank>
cudaError_t launch_vec(const UpdateParams& p, bool vec_bc, cudaStream_t stream) {
  if (p.batch < kRowsMinBatch)
    return vec_bc ? launch_vec_rows<T, kLanes, 1, true, kLowRank>(p, stream)
                  : launch_vec_rows<T, kLanes, 1, false, kLowRank>(p, stream);
  return vec_bc ? launch_vec_rows<T, kLanes, 4, true, kLowRank>(p, stream)
                : launch_vec_rows<T, kLanes, 4, false, kLowRank>(p, stream);
}

inline bool aligned_to(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <typename T, bool kLowRank>
cudaError_t launch_update(const UpdateParams& p, cudaStream_t stream) {
  const int N = p.nstate;
  if (N % 4 == 0 && aligned_to(p.state, 16) && aligned_to(p.A, 16)) {
    // rows of B, C: g * N and n are multiples of 4, so 4-element loads need the bases and batch strides aligned;
    // likewise the rows of dt_low and W (R a multiple of 4). One flag for all: in the mixer they are columns of
    // one x_proj output, B's starting at R, so they are aligned or not together.
    auto rows_vec = [&](const void* ptr, long stride) {
      return aligned_to(ptr, 4 * sizeof(T)) && (p.batch == 1 || stride % 4 == 0);
    };
    const bool vec_bc = rows_vec(p.B, p.b_stride) && rows_vec(p.C, p.c_stride) &&
                        (!kLowRank || (p.dt_rank % 4 == 0 && rows_vec(p.dt, p.dt_stride) &&
                                       aligned_to(p.dt_weight, 4 * sizeof(T))));
    const int groups = N / 4;
    if (groups <= 1) return launch_vec<T, 1, kLowRank>(p, vec_bc, stream);
    if (groups <= 2) return launch_vec<T, 2, kLowRank>(p, vec_bc, stream);
    if (groups <= 4) return launch_vec<T, 4, kLowRank>(p, vec_bc, stream);
    if (groups <= 8) return launch_vec<T, 8, kLowRank>(p, vec_bc, stream);
    if (groups <= 16) return launch_vec<T, 16, kLowRank>(p, vec_bc, stream);
    return launch_vec<T, 32, kLowRank>(p, vec_bc, stream);
  }
  if (N <= 4) return launch_lanes<T, 4, kLowRank>(p, stream);
  if (N <= 8) return launch_lanes<T, 8, kLowRank>(p, stream);
  if (N <= 16) return launch_lanes<T, 16, kLowRank>(p, stream);
  return launch_lanes<T, 32, kLowRank>(p, stream);
}

template <typename T>
cudaError_t launch_dtype(const UpdateParams& p, cudaStream_t stream) {
  return p.dt_weight ? launch_update<T, true>(p, stream) : launch_update<T, false>(p, stream);
}

cudaError_t state_update(const UpdateParams& p, DType dtype, cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return cudaSuccess;  // nothing to do (an empty grid is a launch error)
  switch (dtype) {
    case kFloat32: return launch_dtype<float>(p, stream);
    case kBFloat16: return launch_dtype<__nv_bfloat16>(p, stream);
    case kFloat16: return launch_dtype<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace zoo_ss
