// One decoding step of a Mamba-1 mixer after its in_proj, in one launch:
//   u = silu(conv(conv_state, x) + conv_b)            (the conv window shifts x in, in place; an optional 0/1 row
//                                                      mask zeroes x and u of padding rows, as the mixer does)
//   [dt_low, B, C] = u x_proj_w^T                       (the reduction over all channels)
//   dt = softplus(dt_low dt_w^T + dt_bias)
//   h = h exp(dt A) + dt u B,  y = (h C + D u) silu(z)  (the state updated in place)
// The unfused step is three kernels and a GEMM (conv update, x_proj, the state update with dt_proj folded in):
// at batch 64 on an H200 they took 2.3 + 3.4-5 + 9.9 us per layer, each bound by its launch and its own
// dependent round trips to DRAM rather than by its bytes (benchmarks/RESULTS.md).
//
// Layout: a cluster of kCluster = 8 CTAs takes `rows` batch rows; CTA c of the cluster owns channels
// [c * dim / 8, (c + 1) * dim / 8). x_proj needs every channel of a row, so each CTA sums its channels' part of
// the R + 2N outputs and the cluster adds the 8 parts through distributed shared memory (every CTA adds them in
// the same order, so all hold the same dt_low, B, C). Everything that does not depend on the step's input is
// copied into shared memory with cp.async at the start, before the first dependent load: this CTA's slices of
// x_proj_w, dt_w, A, D and dt_bias, and the rows' fp32 states; so the state's DRAM round trip overlaps the conv,
// the x_proj sums and the cluster exchange instead of following them.
//
// Measured on an H200 (benchmarks/mamba_step.py, RESULTS.md), 130M shapes in a CUDA graph: 7.0 us against the unfused
// step's 7.8 at batch 1, 9.0 against 9.8 at batch 16. A CTA's time grows by ~1.7 us per further batch row it takes,
// and one-row CTAs fill the resident clusters (30 on the H200) at batch 30, so from batch 32 on the unfused step is
// faster and the launcher's rule (mamba_step_api.cpp) leaves those batches to it.
//
// The register-rows kernel below (states in registers, 2 or 4 rows per CTA) replaced that rule where it fits: it is
// faster at every batch (fp16/bf16, N = 16, dt_rank <= 64, d_inner 1024-2048; the launcher's `plan`).
//
// Values the unfused step stores in the activation dtype are rounded to it here too (u, and x_proj's outputs),
// so both compute the same numbers up to the order of the fp32 sums.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "mamba_step.h"
#include "decode_common.cuh"  // cp.async, mma16816, load_state4 / store_state4
#include "selective_scan_kernels.cuh"  // to_f, from_f, softplus_f, sigmoid_f

namespace cg = cooperative_groups;

namespace zoo_ms {
namespace {

constexpr int kMaxItems = kMaxRowChannels / kThreads;  // (row, channel) items per thread in the conv step

using namespace zoo_decode;  // cp.async, mma16816, states, to_f / from_f / round_to, softplus_f, sigmoid_f

// Phase timing, compiled only with -DZOO_MS_PHASES (benchmarks/probe_mamba_step_phases.py builds such a copy):
// thread 0 of each of the first kPhaseCtas CTAs stores clock64() at the phase boundaries, the globaltimer at the
// start and the end, and its SM. The shipped build has none of it.
#ifdef ZOO_MS_PHASES
__device__ unsigned long long g_phase[kPhaseCtas][kPhaseSlots];
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned smid() {
  unsigned id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}
#define ZOO_MS_STAMP(slot, value)                                                         \
  do {                                                                                    \
    const unsigned cta_ = blockIdx.y * gridDim.x + blockIdx.x;                            \
    if (threadIdx.x == 0 && cta_ < kPhaseCtas) g_phase[cta_][slot] = (value);             \
  } while (0)
#else
#define ZOO_MS_STAMP(slot, value) \
  do {                            \
  } while (0)
#endif
#define ZOO_MS_PHASE(i) ZOO_MS_STAMP(i, clock64())

// two consecutive elements as fp32 (the pointer is aligned to two elements)
__device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load2(const __nv_bfloat16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
__device__ __forceinline__ float2 load2(const __half* p) {
  return __half22float2(*reinterpret_cast<const __half2*>(p));
}

// `count` 16-byte chunks from src to dst (both 16-byte aligned), spread over the CTA's threads
__device__ __forceinline__ void copy_chunks(void* dst, const void* src, int count) {
  for (int i = threadIdx.x; i < count; i += kThreads)
    cp_async16(static_cast<char*>(dst) + 16 * i, static_cast<const char*>(src) + 16 * i);
}

// The shared-memory carve-up, in the order of step_smem_bytes. dc = dim / kCluster channels, P = R + 2N.
template <typename T>
struct Smem {
  T* wx;          // [P][dc]     x_proj_w's columns of this CTA's channels
  T* wdt;         // [dc][R + 16 / sizeof(T)]  dt_w's rows, each padded by 16 bytes (no bank conflicts)
  float* A;       // [dc][N]
  float* st;      // [rows][dc][N]  the states (the rows' slices as they lie in global memory)
  float* cw;      // [dc][W]  conv weights
  float* cb;      // [dc]  conv bias
  float* bias;    // [dc]  dt_bias
  float* Dv;      // [dc]  D
  float* u;       // [rows][dc]  the conv's output
  float* z;       // [rows][dc]
  float* dt;      // [rows][dc]
  float* part;    // [rows][P]  this CTA's part of x_proj (read by the whole cluster)
  float* dbl;     // [rows][P]  x_proj's outputs, the cluster's sum
  __device__ Smem(unsigned char* base, int dc, int N, int R, int W, int rows) {
    const int P = R + 2 * N;
    wx = reinterpret_cast<T*>(base);
    wdt = wx + size_t(P) * dc;
    A = reinterpret_cast<float*>(wdt + size_t(dc) * (R + 16 / sizeof(T)));
    st = A + dc * N;
    cw = st + size_t(rows) * dc * N;
    cb = cw + dc * W;
    bias = cb + dc;
    Dv = bias + dc;
    u = Dv + dc;
    z = u + rows * dc;
    dt = z + rows * dc;
    part = dt + rows * dc;
    dbl = part + rows * P;
  }
};

template <typename T, int kRows>
__global__ void __launch_bounds__(kThreads, 2) mamba_step_kernel(const StepParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  cg::cluster_group cluster = cg::this_cluster();
  const int N = p.nstate, R = p.rank, P = R + 2 * N, W = p.width;
  const int dc = p.dim / kCluster;
  const int c0 = int(cluster.block_rank()) * dc;  // this CTA's first channel
  const int b0 = blockIdx.y * kRows;              // the cluster's first row
  const int tid = threadIdx.x;
  constexpr int kE = 16 / sizeof(T);  // elements per 16-byte chunk
  const int wdt_stride = R + kE;
  Smem<T> s(smem_raw, dc, N, R, W, kRows);
  ZOO_MS_STAMP(kPhases, global_ns());
  ZOO_MS_STAMP(kPhases + 2, smid());
  ZOO_MS_PHASE(0);

  // ---- prefetch of everything the step's input does not decide, in three groups (waited for in order)
  {
    const T* wx = static_cast<const T*>(p.x_proj_w);
    const int per_row = dc / kE;
    for (int i = tid; i < P * per_row; i += kThreads) {
      const int j = i / per_row, q = i - j * per_row;
      cp_async16(s.wx + j * dc + q * kE, wx + size_t(j) * p.dim + c0 + q * kE);
    }
    copy_chunks(s.cw, p.conv_w + size_t(c0) * W, dc * W / 4);
    if (p.conv_b) copy_chunks(s.cb, p.conv_b + c0, dc / 4);
  }
  cp_async_commit();  // group 0: x_proj_w, the conv's weights
  {
    const T* wdt = static_cast<const T*>(p.dt_w) + size_t(c0) * R;
    const int per_row = R / kE;
    for (int i = tid; i < dc * per_row; i += kThreads) {
      const int ch = i / per_row, q = i - ch * per_row;
      cp_async16(s.wdt + ch * wdt_stride + q * kE, wdt + ch * R + q * kE);
    }
    if (p.dt_bias) copy_chunks(s.bias, p.dt_bias + c0, dc / 4);
  }
  cp_async_commit();  // group 1: dt_proj
  copy_chunks(s.A, p.A + size_t(c0) * N, dc * N / 4);
  if (p.D) copy_chunks(s.Dv, p.D + c0, dc / 4);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (b0 + r < p.batch)
      copy_chunks(s.st + r * dc * N, static_cast<float*>(p.state) + (size_t(b0 + r) * p.dim + c0) * N,
                  dc * N / 4);
  }
  cp_async_commit();  // group 2: A, D, the states

  // With programmatic dependent launch the kernel starts while in_proj (the previous kernel) still runs: the copies
  // above read only weights and this layer's states (last written by this kernel one step earlier); x and z
  // are in_proj's outputs, so the rest waits for it to complete.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  ZOO_MS_PHASE(1);
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");  // (see the register-rows kernel)
#endif
  ZOO_MS_PHASE(2);

  // ---- the conv step of every (row, channel) of the CTA: u (rounded to T), z; the window shifts x in. All of a
  // thread's loads first (at most kMaxItems items: rows * dc <= kMaxItems * kThreads), then the arithmetic.
  {
    const T* xp = static_cast<const T*>(p.x);
    const T* zp = static_cast<const T*>(p.z);
    const int items = kRows * dc;
    float xv[kMaxItems], win[kMaxItems][3];
#pragma unroll
    for (int k = 0; k < kMaxItems; ++k) {
      const int i = tid + k * kThreads, r = i / dc, b = b0 + r;
      xv[k] = 0.f;
#pragma unroll
      for (int t = 0; t < 3; ++t) win[k][t] = 0.f;
      if (i < items && b < p.batch) {
        const int d = c0 + i - r * dc;
        xv[k] = to_f(xp[size_t(b) * p.x_stride + d]);
        if (p.mask) xv[k] *= to_f(static_cast<const T*>(p.mask)[size_t(b) * p.mask_stride]);
        s.z[i] = to_f(zp[size_t(b) * p.z_stride + d]);
        const float* cs = p.conv_state + (size_t(b) * p.dim + d) * (W - 1);
#pragma unroll
        for (int t = 0; t < 3; ++t)
          if (t < W - 1) win[k][t] = cs[t];
      } else if (i < items) {
        s.z[i] = 0.f;
      }
    }
    cp_async_wait<2>();  // this thread's copies of group 0
    __syncthreads();     // everyone's
#pragma unroll
    for (int k = 0; k < kMaxItems; ++k) {
      const int i = tid + k * kThreads, r = i / dc, ch = i - r * dc, b = b0 + r;
      if (i >= items) break;
      if (b >= p.batch) {
        s.u[i] = 0.f;
        continue;
      }
      const float* w = s.cw + ch * W;
      float acc = p.conv_b ? s.cb[ch] : 0.f;
#pragma unroll
      for (int t = 0; t < 3; ++t)
        if (t < W - 1) acc = fmaf(w[t], win[k][t], acc);
      acc = fmaf(w[W - 1], xv[k], acc);
      float* cs = p.conv_state + (size_t(b) * p.dim + c0 + ch) * (W - 1);
#pragma unroll
      for (int t = 0; t < 3; ++t)
        if (t < W - 1) cs[t] = t + 1 < W - 1 ? win[k][t + 1] : xv[k];
      float u = round_to<T>(acc * sigmoid_f(acc));
      if (p.mask) u *= to_f(static_cast<const T*>(p.mask)[size_t(b) * p.mask_stride]);
      s.u[i] = u;
    }
  }
  __syncthreads();
  ZOO_MS_PHASE(3);

  // ---- this CTA's part of x_proj: part[r][j] = sum over its channels of u[r][ch] wx[j][ch]. A warp takes kJ
  // consecutive columns j at a time (P is a multiple of 4), its lanes over channel pairs, then warp sums: the kJ x
  // rows sums are independent, so their loads and shuffles overlap.
  {
    constexpr int kJ = 4;
    const int warp = tid / 32, lane = tid % 32, nwarps = kThreads / 32;
    for (int j0 = warp * kJ; j0 < P; j0 += nwarps * kJ) {
      float acc[kJ][kRows];
#pragma unroll
      for (int jj = 0; jj < kJ; ++jj)
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[jj][r] = 0.f;
      for (int q = lane; q < dc / 2; q += 32) {
        float2 u2[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) u2[r] = *reinterpret_cast<const float2*>(s.u + r * dc + 2 * q);
#pragma unroll
        for (int jj = 0; jj < kJ; ++jj) {
          const float2 w2 = load2(s.wx + (j0 + jj) * dc + 2 * q);
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[jj][r] = fmaf(w2.x, u2[r].x, fmaf(w2.y, u2[r].y, acc[jj][r]));
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1)
#pragma unroll
        for (int jj = 0; jj < kJ; ++jj)
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[jj][r] += __shfl_xor_sync(0xffffffffu, acc[jj][r], off);
      if (lane == 0) {
#pragma unroll
        for (int jj = 0; jj < kJ; ++jj)
#pragma unroll
          for (int r = 0; r < kRows; ++r) s.part[r * P + j0 + jj] = acc[jj][r];
      }
    }
  }
  ZOO_MS_PHASE(4);
  cluster.sync();  // every CTA's part is written and visible to the cluster
  ZOO_MS_PHASE(5);

  // ---- x_proj's outputs: the 8 parts in rank order (the same sum in every CTA), rounded to T
  for (int i = tid; i < kRows * P; i += kThreads) {
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < kCluster; ++c) sum += cluster.map_shared_rank(s.part, c)[i];
    s.dbl[i] = round_to<T>(sum);
  }
  // this CTA reads no other CTA's memory from here on; the matching wait (before the exit) keeps every CTA's
  // part alive until the whole cluster has read it
  asm volatile("barrier.cluster.arrive.release;\n" ::: "memory");
  cp_async_wait<1>();
  __syncthreads();
  ZOO_MS_PHASE(6);

  // ---- dt of every (row, channel): softplus(dt_low dt_w^T + dt_bias), fp32 sums
  // (16-byte loads of the padded rows: the 8 threads of a quarter warp hit distinct banks)
  for (int i = tid; i < kRows * dc; i += kThreads) {
    const int r = i / dc, ch = i - r * dc;
    const float* lo = s.dbl + r * P;
    const T* w = s.wdt + ch * wdt_stride;
    float acc = p.dt_bias ? s.bias[ch] : 0.f;
    for (int k = 0; k < R; k += kE) {
      const uint4 raw = *reinterpret_cast<const uint4*>(w + k);
      const T* wk = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < kE; ++e) acc = fmaf(lo[k + e], to_f(wk[e]), acc);
    }
    s.dt[i] = softplus_f(acc);
  }
  cp_async_wait<0>();
  __syncthreads();
  ZOO_MS_PHASE(7);

  // ---- the state update: a thread per 4 consecutive states of a (row, channel); the N / 4 lanes of a channel
  // are consecutive threads of one warp and sum y with shuffles
  {
    const int lanes = N / 4;  // a power of two <= 32 (checked by the launcher)
    const int total = kRows * dc * lanes;
    const int per_row = dc * lanes;
    for (int base = 0; base < total; base += kThreads) {  // uniform trip count: every lane reaches the shuffles
      const int i = base + tid;
      const bool active = i < total;
      const int r = active ? i / per_row : 0;
      const int rem = i - r * per_row;
      const int ch = rem / lanes, g = rem - ch * lanes;
      const bool valid = active && b0 + r < p.batch;
      float y = 0.f;
      if (valid) {
        const int rc = r * dc + ch;
        const float dt = s.dt[rc], u = s.u[rc], du = dt * u;
        const float4 h = *reinterpret_cast<const float4*>(s.st + 4 * size_t(i));
        const float4 a = *reinterpret_cast<const float4*>(s.A + ch * N + 4 * g);
        const float4 Bv = *reinterpret_cast<const float4*>(s.dbl + r * P + R + 4 * g);
        const float4 Cv = *reinterpret_cast<const float4*>(s.dbl + r * P + R + N + 4 * g);
        float4 hn;
        hn.x = fmaf(h.x, expf(dt * a.x), du * Bv.x);
        hn.y = fmaf(h.y, expf(dt * a.y), du * Bv.y);
        hn.z = fmaf(h.z, expf(dt * a.z), du * Bv.z);
        hn.w = fmaf(h.w, expf(dt * a.w), du * Bv.w);
        float* st = static_cast<float*>(p.state) + (size_t(b0 + r) * p.dim + c0 + ch) * N + 4 * g;
        *reinterpret_cast<float4*>(st) = hn;
        y = fmaf(hn.x, Cv.x, fmaf(hn.y, Cv.y, fmaf(hn.z, Cv.z, hn.w * Cv.w)));
      }
      for (int off = lanes / 2; off > 0; off >>= 1) y += __shfl_xor_sync(0xffffffffu, y, off);
      if (valid && g == 0) {
        const int rc = r * dc + ch;
        if (p.D) y = fmaf(s.Dv[ch], s.u[rc], y);
        const float zz = s.z[rc];
        y *= zz * sigmoid_f(zz);
        static_cast<T*>(p.out)[size_t(b0 + r) * p.out_stride + c0 + ch] = from_f<T>(y);
      }
    }
  }
  ZOO_MS_PHASE(8);
  asm volatile("barrier.cluster.wait.acquire;\n" ::: "memory");
  ZOO_MS_PHASE(9);
  ZOO_MS_STAMP(kPhases + 1, global_ns());
}

// ---- The register-rows kernel (kRegisterRows): 2 or 4 rows per CTA, one wave of clusters.
//
// The slots kernel's CTA time grows by ~1.7 us per row slot, empty or not (phase stamps, NOTES_selective_scan.md):
// each phase loops over (row, channel) items with runtime divisions and a dependent chain per iteration, and the
// states take shared memory (one CTA per SM at 4 rows, so 16 clusters of 8 do not fit the 15 resident). Here every
// loop has compile-time bounds: N = 16, dc = 64 x kItems channels per CTA, kRows rows. A thread owns kItems
// (channel, 4-state group) items for all kRows rows; their states (kItems x kRows float4) and conv windows are
// loaded into registers before the grid-dependency wait, so their DRAM round trip overlaps in_proj; shared memory
// holds only the weights' slices (2 CTAs per SM). x_proj's part runs on the tensor cores (one m16n8k16 tile per 16
// columns and 16 channels, the rows padded to 8); dt's rank-R dot product is split over the 4 lanes of a channel;
// y's 4-lane sums are reduced by halving (each shuffle level halves the values a lane holds).
//
// Measured on an H200 (benchmarks/mamba_step.py, 130M shapes, CUDA graph): 3.64 / 5.13 / 6.52 / 9.15 us at batch 1 /
// 16 / 32 / 64 against the slots kernel's best 5.18 / 7.26 / 10.62 / 20.34 and the unfused step's 7.71 / 9.80 /
// 10.74 / 14.37. Phase stamps at batch 64 (benchmarks/probe_mamba_step_phases.py --kernel rows, median CTA, us):
// copies issued 1.9, conv 1.7 (waiting for x_proj_w's copy), x_proj part 0.4 (2.2 with per-warp shuffle sums before
// the mma), cluster sync 0.4, cluster sum 0.8, dt 1.3, state update 1.6: latency-bound chains at 8 warps per SM
// (NOTES_selective_scan.md).
template <typename T>
struct RowsSmem {
  static constexpr int kPad = 16 / sizeof(T);  // wx and ut rows are padded by 16 bytes: conflict-free fragment loads
  T* wx;        // [P][dc + kPad]  x_proj_w's columns of this CTA's channels
  T* wdt;       // [dc][R + 16 / sizeof(T)]  dt_w's rows, padded by 16 bytes
  float* A;     // [dc][16]
  float* cw;    // [dc][W]
  float* cb;    // [dc]
  float* bias;  // [dc]
  float* Dv;    // [dc]
  float* u;     // [rows][dc]
  float* z;     // [rows][dc]
  float* part;  // [rows][P]
  float* dbl;   // [rows][P]
  T* ut;        // [8][dc + kPad]  u in T (x_proj's mma operand), rows >= `rows` zero
  __device__ RowsSmem(unsigned char* base, int dc, int R, int W, int rows) {
    const int P = R + 2 * kRegN;
    wx = reinterpret_cast<T*>(base);
    wdt = wx + size_t(P) * (dc + kPad);
    A = reinterpret_cast<float*>(wdt + size_t(dc) * (R + 16 / sizeof(T)));
    cw = A + dc * kRegN;
    cb = cw + dc * W;
    bias = cb + dc;
    Dv = bias + dc;
    u = Dv + dc;
    z = u + rows * dc;
    part = z + rows * dc;
    dbl = part + rows * P;
    ut = reinterpret_cast<T*>(dbl + rows * P);
  }
};

template <typename T>
__device__ __forceinline__ uint32_t lds32(const T* p) { return *reinterpret_cast<const uint32_t*>(p); }

template <typename T, typename S, int kRows, int kItems>
__global__ void __launch_bounds__(kThreads, 2) mamba_step_rows_kernel(const StepParams p) {
  constexpr int N = kRegN, kLanes = N / 4, dc = 64 * kItems;
  constexpr int kE = 16 / sizeof(T);                              // elements per 16-byte chunk
  constexpr int kConv = (kRows * dc + kThreads - 1) / kThreads;   // conv (row, channel) items per thread
  constexpr int kPitch = dc + RowsSmem<T>::kPad;                  // wx's and ut's row pitch
  extern __shared__ __align__(16) unsigned char smem_raw[];
  cg::cluster_group cluster = cg::this_cluster();
  const int R = p.rank, P = R + 2 * N, W = p.width;
  const int c0 = int(cluster.block_rank()) * dc;
  const int b0 = blockIdx.y * kRows;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wdt_stride = R + kE;
  RowsSmem<T> s(smem_raw, dc, R, W, kRows);
  ZOO_MS_STAMP(kPhases, global_ns());
  ZOO_MS_STAMP(kPhases + 2, smid());
  ZOO_MS_PHASE(0);

  // ---- before the wait: the weights' slices into shared memory, the states and conv windows into registers
  {
    const T* wx = static_cast<const T*>(p.x_proj_w);
    constexpr int per_row = dc / kE;
    for (int i = tid; i < P * per_row; i += kThreads) {
      const int j = i / per_row, q = i - j * per_row;
      cp_async16(s.wx + j * kPitch + q * kE, wx + size_t(j) * p.dim + c0 + q * kE);
    }
    copy_chunks(s.cw, p.conv_w + size_t(c0) * W, dc * W / 4);
    if (p.conv_b) copy_chunks(s.cb, p.conv_b + c0, dc / 4);
  }
  cp_async_commit();  // group 0: x_proj_w, the conv's weights
  for (int i = kRows * kPitch + tid; i < 8 * kPitch; i += kThreads) s.ut[i] = from_f<T>(0.f);  // the mma's pad rows
  {
    const T* wdt = static_cast<const T*>(p.dt_w) + size_t(c0) * R;
    const int per_row = R / kE;
    for (int i = tid; i < dc * per_row; i += kThreads) {
      const int ch = i / per_row, q = i - ch * per_row;
      cp_async16(s.wdt + ch * wdt_stride + q * kE, wdt + ch * R + q * kE);
    }
    if (p.dt_bias) copy_chunks(s.bias, p.dt_bias + c0, dc / 4);
    copy_chunks(s.A, p.A + size_t(c0) * N, dc * N / 4);
    if (p.D) copy_chunks(s.Dv, p.D + c0, dc / 4);
  }
  cp_async_commit();  // group 1: dt_proj, A, D

  // item q of this thread: channel ch(q) = (q * kThreads + tid) / kLanes, states 4g..4g+3, g = tid % kLanes
  const int g = tid % kLanes;
  float4 h[kItems][kRows];
#pragma unroll
  for (int q = 0; q < kItems; ++q) {
    const int ch = (q * kThreads + tid) / kLanes;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      h[q][r] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (b0 + r < p.batch)
        h[q][r] = load_state4(static_cast<const S*>(p.state) + (size_t(b0 + r) * p.dim + c0 + ch) * N + 4 * g);
    }
  }
  float win[kConv][3];
#pragma unroll
  for (int k = 0; k < kConv; ++k) {
    const int i = tid + k * kThreads, r = i / dc, b = b0 + r;
#pragma unroll
    for (int t = 0; t < 3; ++t) win[k][t] = 0.f;
    if (i < kRows * dc && b < p.batch) {
      const float* cs = p.conv_state + (size_t(b) * p.dim + c0 + i - r * dc) * (W - 1);
#pragma unroll
      for (int t = 0; t < 3; ++t)
        if (t < W - 1) win[k][t] = cs[t];
    }
  }

  ZOO_MS_PHASE(1);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");  // x and z are in_proj's outputs
  // The next kernel (out_proj), if launched as this one's dependent, may start now and prefetch its weights; it
  // waits for this grid to complete before it reads y. Not before the wait: then a kernel two launches on could
  // start while in_proj's predecessor still runs, and its own early loads (weights are safe, states would not be)
  // would race that kernel's writes. Triggered after the wait, early loads only overlap the kernel just before.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  ZOO_MS_PHASE(2);

  // ---- the conv step: u (rounded to T) and z into shared memory, the window shifts x in
  {
    const T* xp = static_cast<const T*>(p.x);
    const T* zp = static_cast<const T*>(p.z);
    float xv[kConv], zv[kConv], mv[kConv];
#pragma unroll
    for (int k = 0; k < kConv; ++k) {
      const int i = tid + k * kThreads, r = i / dc, b = b0 + r, d = c0 + i - r * dc;
      xv[k] = zv[k] = 0.f;
      mv[k] = 1.f;
      if (i < kRows * dc && b < p.batch) {
        xv[k] = to_f(xp[size_t(b) * p.x_stride + d]);
        zv[k] = to_f(zp[size_t(b) * p.z_stride + d]);
        if (p.mask) mv[k] = to_f(static_cast<const T*>(p.mask)[size_t(b) * p.mask_stride]);
      }
    }
    cp_async_wait<1>();  // this thread's copies of group 0
    __syncthreads();     // everyone's
#pragma unroll
    for (int k = 0; k < kConv; ++k) {
      const int i = tid + k * kThreads, r = i / dc, ch = i - r * dc, b = b0 + r;
      if (i >= kRows * dc) break;
      float u = 0.f;
      if (b < p.batch) {
        const float x = xv[k] * mv[k];
        const float* w = s.cw + ch * W;
        float acc = p.conv_b ? s.cb[ch] : 0.f;
#pragma unroll
        for (int t = 0; t < 3; ++t)
          if (t < W - 1) acc = fmaf(w[t], win[k][t], acc);
        acc = fmaf(w[W - 1], x, acc);
        float* cs = p.conv_state + (size_t(b) * p.dim + c0 + ch) * (W - 1);
#pragma unroll
        for (int t = 0; t < 3; ++t)
          if (t < W - 1) cs[t] = t + 1 < W - 1 ? win[k][t + 1] : x;
        u = round_to<T>(acc * sigmoid_f(acc)) * mv[k];
      }
      s.u[i] = u;
      s.ut[r * kPitch + ch] = from_f<T>(u);  // exact: u is rounded to T already
      s.z[i] = zv[k];
    }
  }
  __syncthreads();
  ZOO_MS_PHASE(3);

  // ---- this CTA's part of x_proj on the tensor cores: part^T [P, rows] = wx [P, dc] u^T [dc, 8 (rows, zero-padded)],
  // warp w the 16 columns of tile w (P / 16 tiles), two accumulators over alternate k-steps
  {
    const int gq = lane / 4, cq = lane % 4;
    for (int jt = warp; jt < P / 16; jt += kThreads / 32) {
      float d[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      const T* a_lo = s.wx + (16 * jt + gq) * kPitch + 2 * cq;  // rows g and g + 8 of the tile, k 2c..2c+1
      const T* a_hi = a_lo + 8 * kPitch;
      const T* bp = s.ut + gq * kPitch + 2 * cq;  // column g (a batch row) of u^T
#pragma unroll
      for (int k = 0; k < dc; k += 16)
        mma16816<T>(d[(k / 16) % 2], lds32(a_lo + k), lds32(a_hi + k), lds32(a_lo + k + 8), lds32(a_hi + k + 8),
                    lds32(bp + k), lds32(bp + k + 8));
      // d: (column g, row 2c), (g, 2c + 1), (g + 8, 2c), (g + 8, 2c + 1)
      const int j = 16 * jt + gq, r = 2 * cq;
      if (r < kRows) {
        s.part[r * P + j] = d[0][0] + d[1][0];
        s.part[r * P + j + 8] = d[0][2] + d[1][2];
      }
      if (r + 1 < kRows) {
        s.part[(r + 1) * P + j] = d[0][1] + d[1][1];
        s.part[(r + 1) * P + j + 8] = d[0][3] + d[1][3];
      }
    }
  }
  ZOO_MS_PHASE(4);
  cluster.sync();  // every CTA's part is written and visible to the cluster
  ZOO_MS_PHASE(5);

  // ---- x_proj's outputs: the 8 parts in rank order (the same sum in every CTA), rounded to T
  for (int i = tid; i < kRows * P; i += kThreads) {
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < kCluster; ++c) sum += cluster.map_shared_rank(s.part, c)[i];
    s.dbl[i] = round_to<T>(sum);
  }
  asm volatile("barrier.cluster.arrive.release;\n" ::: "memory");  // (wait before the exit, as the slots kernel)
  cp_async_wait<0>();
  __syncthreads();
  ZOO_MS_PHASE(6);

  // ---- dt = softplus(dt_low dt_w^T + dt_bias) of the thread's items, all rows: lane g of a channel sums the
  // pairs k = 8i + 2g, +1 of the rank, then the channel's 4 lanes add up
  // (bounded by kRegMaxRank at compile time and unrolled, so that each item's loads issue together)
  float dts[kItems][kRows];
#pragma unroll
  for (int q = 0; q < kItems; ++q) {
    const int ch = (q * kThreads + tid) / kLanes;
#pragma unroll
    for (int r = 0; r < kRows; ++r) dts[q][r] = 0.f;
    float2 w2[kRegMaxRank / (2 * kLanes)];
#pragma unroll
    for (int i = 0; i < kRegMaxRank / (2 * kLanes); ++i) {
      const int k = 2 * g + 2 * kLanes * i;
      w2[i] = k < R ? load2(s.wdt + ch * wdt_stride + k) : make_float2(0.f, 0.f);
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int i = 0; i < kRegMaxRank / (2 * kLanes); ++i) {
        const int k = 2 * g + 2 * kLanes * i;
        if (k < R) {
          const float2 lo = *reinterpret_cast<const float2*>(s.dbl + r * P + k);
          dts[q][r] = fmaf(w2[i].x, lo.x, fmaf(w2[i].y, lo.y, dts[q][r]));
        }
      }
    }
  }
#pragma unroll
  for (int q = 0; q < kItems; ++q) {
    const int ch = (q * kThreads + tid) / kLanes;
    const float bias = p.dt_bias ? s.bias[ch] : 0.f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float v = dts[q][r];
#pragma unroll
      for (int o = 1; o < kLanes; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      dts[q][r] = softplus_f(v + bias);
    }
  }

  ZOO_MS_PHASE(7);

  // ---- the state update and y = h C (partial over the lane's 4 states), the states stored as they are done
  float y[kItems * kRows];
#pragma unroll
  for (int q = 0; q < kItems; ++q) {
    const int ch = (q * kThreads + tid) / kLanes;
    float4 a = *reinterpret_cast<const float4*>(s.A + ch * N + 4 * g);
    constexpr float kLog2e = 1.4426950408889634f;  // exp(dt A) = exp2(dt A log2 e): one MUFU.EX2 per state
    a.x *= kLog2e, a.y *= kLog2e, a.z *= kLog2e, a.w *= kLog2e;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float dt = dts[q][r], du = dt * s.u[r * dc + ch];
      const float4 Bv = *reinterpret_cast<const float4*>(s.dbl + r * P + R + 4 * g);
      const float4 Cv = *reinterpret_cast<const float4*>(s.dbl + r * P + R + N + 4 * g);
      float4 hn = h[q][r];
      hn.x = fmaf(hn.x, exp2f(dt * a.x), du * Bv.x);
      hn.y = fmaf(hn.y, exp2f(dt * a.y), du * Bv.y);
      hn.z = fmaf(hn.z, exp2f(dt * a.z), du * Bv.z);
      hn.w = fmaf(hn.w, exp2f(dt * a.w), du * Bv.w);
      if (b0 + r < p.batch)
        store_state4(static_cast<S*>(p.state) + (size_t(b0 + r) * p.dim + c0 + ch) * N + 4 * g, hn);
      y[q * kRows + r] = fmaf(hn.x, Cv.x, fmaf(hn.y, Cv.y, fmaf(hn.z, Cv.z, hn.w * Cv.w)));
    }
  }
  // the channel's 4 lanes add up their y (halving: each lane ends with a quarter of the values), then the gate
  {
    int base = 0, n = kItems * kRows;
#pragma unroll
    for (int o = 1; o < kLanes; o <<= 1) {
      if (n % 2 == 0) {
        const int hh = n / 2;
        const bool hi = lane & o;
#pragma unroll
        for (int i = 0; i < kItems * kRows / 2; ++i) {
          if (i < hh) {
            const float send = hi ? y[i] : y[i + hh];
            const float keep = hi ? y[i + hh] : y[i];
            y[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
          }
        }
        if (hi) base += hh;
        n = hh;
      } else {
#pragma unroll
        for (int i = 0; i < kItems * kRows; ++i)
          if (i < n) y[i] += __shfl_xor_sync(0xffffffffu, y[i], o);
      }
    }
    // lanes of a channel that summed the same values whole (odd counts) write the same y: benign
#pragma unroll
    for (int i = 0; i < kItems * kRows; ++i) {
      if (i >= n) break;
      const int idx = base + i, q = idx / kRows, r = idx % kRows;
      const int ch = (q * kThreads + tid) / kLanes;
      if (b0 + r >= p.batch) continue;
      const int rc = r * dc + ch;
      float v = y[i];
      if (p.D) v = fmaf(s.Dv[ch], s.u[rc], v);
      const float zz = s.z[rc];
      v *= zz * sigmoid_f(zz);
      static_cast<T*>(p.out)[size_t(b0 + r) * p.out_stride + c0 + ch] = from_f<T>(v);
    }
  }
  ZOO_MS_PHASE(8);
  asm volatile("barrier.cluster.wait.acquire;\n" ::: "memory");
  ZOO_MS_PHASE(9);
  ZOO_MS_STAMP(kPhases + 1, global_ns());
}

using KernelFn = void (*)(StepParams);

// A kernel with its dynamic shared-memory limit raised to `smem` (once per device and kernel). A failing runtime
// call here also leaves its error as the thread's last error, where the next kernel launch check (torch's) would
// find it and fail an unrelated launch; so every failure below is read back with cudaGetLastError, and returned to
// the caller instead.
struct KernelState {
  KernelFn fn;
  size_t allowed[64];  // per device: the opt-in shared memory so far (raised when a launch needs more)
  size_t asked[64];    // per device: the last occupancy query's shared memory and its answer
  int answer[64];
};
KernelState* state_of(KernelFn fn) {
  static KernelState table[64] = {};  // every instantiation below (24 of them) has its entry
  for (KernelState& s : table) {
    if (s.fn == fn) return &s;
    if (s.fn == nullptr) {
      s.fn = fn;
      return &s;
    }
  }
  return nullptr;
}

cudaError_t prepare(KernelFn fn, size_t smem) {
  KernelState* st = state_of(fn);
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return cudaGetLastError();
  if (st == nullptr || device >= 64 || smem > st->allowed[device]) {
    err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return cudaGetLastError();
    if (st != nullptr && device < 64) st->allowed[device] = smem;
  }
  return cudaSuccess;
}

cudaLaunchConfig_t config(dim3 grid, size_t smem, cudaStream_t stream, cudaLaunchAttribute* attr, bool pdl) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kCluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 2 : 1;
  return cfg;
}

int clusters(KernelFn fn, size_t smem) {
  KernelState* st = state_of(fn);
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (st != nullptr && device < 64 && st->asked[device] == smem) return st->answer[device];
  if (prepare(fn, smem) != cudaSuccess) return 0;
  cudaLaunchAttribute attr[2];
  const cudaLaunchConfig_t cfg = config(dim3(kCluster, 1), smem, nullptr, attr, false);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, reinterpret_cast<void*>(fn), &cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // (see prepare)
    n = 0;
  }
  if (st != nullptr && device < 64) st->asked[device] = smem, st->answer[device] = n;
  return n;
}

int register_items(int dim) { return dim / kCluster / 64; }

template <typename T, typename S>
KernelFn rows_kernel_for(int rows, int dim) {
  switch (rows * 16 + register_items(dim)) {
    case 2 * 16 + 2: return mamba_step_rows_kernel<T, S, 2, 2>;
    case 2 * 16 + 3: return mamba_step_rows_kernel<T, S, 2, 3>;
    case 2 * 16 + 4: return mamba_step_rows_kernel<T, S, 2, 4>;
    case 4 * 16 + 2: return mamba_step_rows_kernel<T, S, 4, 2>;
    case 4 * 16 + 3: return mamba_step_rows_kernel<T, S, 4, 3>;
    case 4 * 16 + 4: return mamba_step_rows_kernel<T, S, 4, 4>;
  }
  return nullptr;
}

// The kernel of these template arguments, or null where none is built (a state in T: the register-rows kernel only).
template <typename T>
KernelFn kernel_for(int kernel, int rows, int dim, bool state_low) {
  if (kernel == kSlots && !state_low) {
    switch (rows) {
      case 1: return mamba_step_kernel<T, 1>;
      case 2: return mamba_step_kernel<T, 2>;
      case 4: return mamba_step_kernel<T, 4>;
      case 8: return mamba_step_kernel<T, 8>;
    }
    return nullptr;
  }
  if constexpr (sizeof(T) == 2) {
    if (kernel == kRegisterRows)
      return state_low ? rows_kernel_for<T, T>(rows, dim) : rows_kernel_for<T, float>(rows, dim);
  }
  return nullptr;
}

template <typename T>
cudaError_t launch(const StepParams& p, cudaStream_t stream) {
  const KernelFn fn = kernel_for<T>(p.kernel, p.rows, p.dim, p.state_low);
  if (fn == nullptr) return cudaErrorInvalidValue;
  const size_t smem = step_smem_bytes(p.dim, p.nstate, p.rank, p.width, p.rows, int(sizeof(T)), p.kernel);
  const cudaError_t err = prepare(fn, smem);
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute attr[2];
  const cudaLaunchConfig_t cfg = config(dim3(kCluster, (p.batch + p.rows - 1) / p.rows), smem, stream, attr, p.pdl);
  return cudaLaunchKernelEx(&cfg, fn, p) == cudaSuccess ? cudaSuccess : cudaGetLastError();  // (see prepare)
}

template <typename T>
int clusters_of(int kernel, int rows, size_t smem, int dim) {
  const KernelFn fn = kernel_for<T>(kernel, rows, dim, false);  // (the state's dtype changes no resource)
  return fn == nullptr ? 0 : clusters(fn, smem);
}

}  // namespace

bool register_rows_fit(int dim, int nstate, int rank, int width, int elem_bytes) {
  const int items = dim % (64 * kCluster) == 0 ? register_items(dim) : 0;
  return elem_bytes == 2 && nstate == kRegN && items >= 2 && items <= 4 && width >= 1 && width <= 4 &&
         rank >= 16 && rank % 16 == 0 && rank <= kRegMaxRank;
}

size_t step_smem_bytes(int dim, int nstate, int rank, int width, int rows, int elem_bytes, int kernel) {
  const size_t dc = dim / kCluster, P = rank + 2 * nstate;
  if (kernel == kRegisterRows)
    return P * (dc * elem_bytes + 16) + dc * (rank * elem_bytes + 16) +
           4 * (dc * nstate + dc * width + 3 * dc + 2 * size_t(rows) * dc + 2 * size_t(rows) * P) +
           8 * (dc * elem_bytes + 16);
  return P * dc * elem_bytes + dc * (rank * elem_bytes + 16) +
         4 * (dc * nstate + size_t(rows) * dc * nstate + dc * width + 3 * dc + 3 * size_t(rows) * dc +
              2 * size_t(rows) * P);
}

int max_active_clusters(DType dtype, int rows, size_t smem, int kernel, int dim) {
  switch (dtype) {
    case kFloat32: return clusters_of<float>(kernel, rows, smem, dim);
    case kBFloat16: return clusters_of<__nv_bfloat16>(kernel, rows, smem, dim);
    case kFloat16: return clusters_of<__half>(kernel, rows, smem, dim);
  }
  return 0;
}

#ifdef ZOO_MS_PHASES
cudaError_t read_phases(unsigned long long* host) {
  return cudaMemcpyFromSymbol(host, g_phase, sizeof(g_phase));
}
#endif

cudaError_t mamba_step(const StepParams& p, DType dtype, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  switch (dtype) {
    case kFloat32: return launch<float>(p, stream);
    case kBFloat16: return launch<__nv_bfloat16>(p, stream);
    case kFloat16: return launch<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace zoo_ms
