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
// Values the unfused step stores in the activation dtype are rounded to it here too (u, and x_proj's outputs),
// so both compute the same numbers up to the order of the fp32 sums.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "mamba_step.h"
#include "selective_scan_kernels.cuh"  // to_f, from_f, softplus_f, sigmoid_f

namespace cg = cooperative_groups;

namespace zoo_ms {
namespace {

constexpr int kMaxItems = kMaxRowChannels / kThreads;  // (row, channel) items per thread in the conv step

using zoo_ss::from_f;
using zoo_ss::sigmoid_f;
using zoo_ss::softplus_f;
using zoo_ss::to_f;

template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_f(from_f<T>(x)); }

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

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
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
      copy_chunks(s.st + r * dc * N, p.state + (size_t(b0 + r) * p.dim + c0) * N, dc * N / 4);
  }
  cp_async_commit();  // group 2: A, D, the states

  // With programmatic dependent launch the kernel starts while in_proj (the previous kernel) still runs: the copies
  // above read only weights and this layer's states (last written by this kernel one step earlier); x and z
  // are in_proj's outputs, so the rest waits for it to complete.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  ZOO_MS_PHASE(1);
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
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
        *reinterpret_cast<float4*>(p.state + (size_t(b0 + r) * p.dim + c0 + ch) * N + 4 * g) = hn;
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

// The kernel for these sizes, with its dynamic shared-memory limit raised to `smem` (once per device). A failing
// runtime call here also leaves its error as the thread's last error, where the next kernel launch check (torch's)
// would find it and fail an unrelated launch; so every failure below is read back with cudaGetLastError, and
// returned to the caller instead.
template <typename T, int kRows>
cudaError_t prepare(size_t smem, void (**kernel)(StepParams)) {
  *kernel = mamba_step_kernel<T, kRows>;
  static size_t allowed[64] = {};  // per device: the opt-in set so far (raised when a launch needs more)
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return cudaGetLastError();
  if (device >= 64 || smem > allowed[device]) {
    err = cudaFuncSetAttribute(*kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return cudaGetLastError();
    if (device < 64) allowed[device] = smem;
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

template <typename T, int kRows>
cudaError_t launch(const StepParams& p, cudaStream_t stream) {
  const size_t smem = step_smem_bytes(p.dim, p.nstate, p.rank, p.width, kRows, sizeof(T));
  void (*kernel)(StepParams);
  const cudaError_t err = prepare<T, kRows>(smem, &kernel);
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute attr[2];
  const cudaLaunchConfig_t cfg = config(dim3(kCluster, (p.batch + kRows - 1) / kRows), smem, stream, attr, p.pdl);
  return cudaLaunchKernelEx(&cfg, kernel, p) == cudaSuccess ? cudaSuccess : cudaGetLastError();  // (see prepare)
}

template <typename T, int kRows>
int clusters(size_t smem) {
  static size_t asked[64] = {};  // per device: the last query's shared memory and its answer
  static int answer[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (device < 64 && asked[device] == smem) return answer[device];
  void (*kernel)(StepParams);
  if (prepare<T, kRows>(smem, &kernel) != cudaSuccess) return 0;
  cudaLaunchAttribute attr[2];
  const cudaLaunchConfig_t cfg = config(dim3(kCluster, 1), smem, nullptr, attr, false);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, reinterpret_cast<void*>(kernel), &cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // (see prepare)
    n = 0;
  }
  if (device < 64) asked[device] = smem, answer[device] = n;
  return n;
}

template <typename T>
int clusters_rows(int rows, size_t smem) {
  switch (rows) {
    case 1: return clusters<T, 1>(smem);
    case 2: return clusters<T, 2>(smem);
    case 4: return clusters<T, 4>(smem);
    case 8: return clusters<T, 8>(smem);
  }
  return 0;
}

template <typename T>
cudaError_t launch_rows(const StepParams& p, cudaStream_t stream) {
  switch (p.rows) {
    case 1: return launch<T, 1>(p, stream);
    case 2: return launch<T, 2>(p, stream);
    case 4: return launch<T, 4>(p, stream);
    case 8: return launch<T, 8>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

size_t step_smem_bytes(int dim, int nstate, int rank, int width, int rows, int elem_bytes) {
  const size_t dc = dim / kCluster, P = rank + 2 * nstate;
  return P * dc * elem_bytes + dc * (rank * elem_bytes + 16) +
         4 * (dc * nstate + size_t(rows) * dc * nstate + dc * width + 3 * dc + 3 * size_t(rows) * dc +
              2 * size_t(rows) * P);
}

int max_active_clusters(DType dtype, int rows, size_t smem) {
  switch (dtype) {
    case kFloat32: return clusters_rows<float>(rows, smem);
    case kBFloat16: return clusters_rows<__nv_bfloat16>(rows, smem);
    case kFloat16: return clusters_rows<__half>(rows, smem);
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
    case kFloat32: return launch_rows<float>(p, stream);
    case kBFloat16: return launch_rows<__nv_bfloat16>(p, stream);
    case kFloat16: return launch_rows<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace zoo_ms
