// y = x W^T (+ b) for x [M, K] with M <= 64 rows (a decode step's projections), W [N, K], bf16 or fp16, fp32 sums.
//
// Why: inside a CUDA-graph decode step every projection (cuBLAS or the Triton skinny kernel) took 3.4-5 us at batch
// 64 on an H200 while its weight's bytes need ~1-1.5 us (benchmarks/RESULTS.md, decode_linear): a graph node's launch
// ramp and its dependent DRAM round trips, not bandwidth. Launched as a programmatic dependent (PDL) of the stream's
// previous kernel, this kernel's CTAs start while that kernel still runs; the weight, which no kernel of the step
// writes, is loaded into registers before `griddepcontrol.wait`, and only x (the previous kernel's output) after it.
//
// Layout (swap AB): out^T[n, m] = sum_k W[n, k] x[m, k] with mma.m16n8k16.row.col: A = 16 rows of W as they lie
// (row-major), B = x^T (col-major = x row-major), an n-tile = 8 rows of x; M <= 64 is kTiles <= 8 n-tiles.
// k is permuted the same way for A and B (the sum over k does not see it) so that every load is 16 bytes: in a
// 32-wide k block, lane c = lane % 4 holds k = 8c..8c+7 of its rows, and uses k 8c+{0,1} / 8c+{2,3} as the mma's
// (2c, 2c+1) / (2c+8, 2c+9) pairs of the block's first k-step and 8c+{4,5} / 8c+{6,7} as those of the second.
//
// Work split: a cluster of `cluster` CTAs takes 16 * kFeatureTiles output features; its CTAs split K (contiguous
// ranges of 32-wide blocks), each CTA's 8 warps are kFeatureTiles feature tiles x kKGroups k groups (a warp: one
// 16-feature tile, every kKGroups-th block of its CTA's range). Changed from one CTA per 16 features, warps splitting
// K, x straight into registers: each CTA reads x [M, its K range] once, so CTAs of 16 features read x N/16 times in
// all: at M = 64 that is 4x the weight's bytes (in_proj 768 -> 3072: 19 MB of L2 reads for a 4.7 MB weight, ~140 KB
// into every SM). Wider CTAs read x fewer times and the cluster's K split keeps their count near the SM count; x is
// staged in shared memory (cp.async, 16 bytes) where the kFeatureTiles warps of a k group share it, instead of
// kFeatureTiles copies in registers.
//
// Measured on the H200 (benchmarks/decode_linear.py --sweep, in a CUDA graph): at 1 and 16 rows the fastest tiling had
// no cluster and the fewest features per CTA that keep one CTA per SM (the host's rule now, pdl_linear._config):
// Mamba-130M's in_proj 2.3 us and out_proj 2.1 us at one row against cuBLAS's 3.4 and 5.8. Past 16 rows the rule asks
// for a tiling whose K range fits one chunk (thirteenth session). At 16 rows in_proj 2.7 us against cuBLAS's 3.4, at
// 64 rows 6.1 against 3.6 (Nsight Compute had found each n-tile's mma's serialized behind a per-tile branch, since
// removed: 8.6 us before); at 64 rows every CTA still reads all of x from L2. zoo.layers.Linear takes the kernel up
// to 32 rows.
//
// Per CTA: launch_dependents (unless trigger_late); the warp's W fragments of its first chunk into registers (at most
// 64 registers: 8 per block, kBlocks blocks); griddepcontrol.wait; then per chunk x [rows, chunk] into shared memory
// (all 8 * kTiles rows, zeros from M on), and the mma's of every n-tile (a K range longer than a chunk loops, its
// later chunks' W loaded after the wait: correct, slower).
// The warps' partial [16, 8 * kTiles] tiles are summed over the k groups in shared memory (fp32), then across the
// cluster through distributed shared memory, the bias added, and each CTA of the cluster stores a share of the
// [M, 16 * kFeatureTiles] output tile as 16-byte rows segments. Rows >= M of x are zeros in shared memory and never
// stored. Every CTA executes griddepcontrol.wait before it writes or exits: a chain of such kernels is only ordered
// if each one completes after the kernel before it.
//
// Trigger: launch_dependents at the start lets the next kernel launch as soon as this grid is resident, possibly while
// this one still waits for its own predecessor; so the next kernel's loads before its wait overlap both, which is
// safe for weights (no kernel of a step writes them) and is what lets a chain of projections stream weight after
// weight. A dependent that prefetches data a recent kernel writes (states) needs the late trigger (trigger_late,
// $ZOO_PDL_LINEAR_TRIGGER=late: after the wait, as in the fused Mamba step), whose overlap is this kernel's alone.
//
// Occupancy: __launch_bounds__(256, 2) caps a thread at 128 registers (ptxas: 88-125, no spills, in every
// instantiation), so that an SM holds this kernel's CTA and the next one's (its dependent, launched early) at once;
// the shared memory is at most ~70 KB per CTA for the same reason. The host picks a grid of at most one CTA per SM
// where it can, so the early CTAs of the next kernel find a free slot on every SM.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "pdl_linear.h"

namespace cg = cooperative_groups;

namespace zoo_pl {
namespace {

constexpr int kXSmemBytes = 100 * 1024;  // x's chunk in shared memory, at most (+ one 64-byte pad per row)
constexpr int kMaxWeightBlocks = 8;     // blocks of W a thread holds: 8 registers each
// Registers of a thread's W fragments (8 per block) and accumulators (rows / 2) together, at most: within the 128 of
// __launch_bounds__(256, 2) without spills (at 64 rows: 6 blocks, 48 + 32 registers; 7 blocks just fit, 8 spilled)
constexpr int kFragmentRegs = 80;

__host__ __device__ constexpr int min_of(int a, int b) { return a < b ? a : b; }

// Blocks of 32 k per warp and chunk: bounded by the registers and by x's chunk in shared memory.
__host__ __device__ constexpr int blocks_per_warp(int rows, int kgroups) {
  return min_of(min_of(kMaxWeightBlocks, (kFragmentRegs - rows / 2) / 8),
                kXSmemBytes / (rows * kgroups * kBlockK * 2));
}

__host__ __device__ constexpr int n_tiles(int M) { return M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 ? 4 : 8; }

// Row pitch of x's chunk in shared memory: the chunk's width, plus 32 elements where the width is a multiple of 128
// bytes, so that the pitch is 64 mod 128 bytes and the two rows of 64 bytes that a quarter warp's 16-byte B loads
// read hit distinct banks.
__host__ __device__ constexpr int x_pitch_of(int chunk_blocks) {
  return chunk_blocks * kBlockK + (chunk_blocks % 2 == 0 ? kBlockK : 0);
}

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  }
};
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t v) {
    return __half22float2(*reinterpret_cast<const __half2*>(&v));
  }
};

// 16 bytes of the weight, kept out of L1 (read once per step). Not ld.global.nc: ptxas moved some of those past
// griddepcontrol.wait (a read-only load may go anywhere), plain loads it keeps before it (checked in the SASS).
__device__ __forceinline__ uint4 load_weight(const void* p) {
  uint4 v;
  asm volatile("ld.global.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}

__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Returns once the stream's previous kernel completed and its writes are visible (at once without PDL).
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// The warp's W fragments of the chunk's blocks [cb, ce): block kg + kKGroups * i of the chunk in a[i]
template <int kBlocks, int kKGroups>
__device__ __forceinline__ void load_weights(uint4 (&lo)[kBlocks], uint4 (&hi)[kBlocks], const char* w_lo,
                                             const char* w_hi, int kg, int cb, int ce) {
#pragma unroll
  for (int i = 0; i < kBlocks; ++i) {
    const int b = cb + kg + kKGroups * i;
    if (b < ce) {
      lo[i] = load_weight(w_lo + size_t(b) * kBlockK * 2);
      hi[i] = load_weight(w_hi + size_t(b) * kBlockK * 2);
    }
  }
}

// One 32-wide k block of a warp's feature tile against every n-tile, four n-tiles at a time: their B fragments first
// (row 8j + g, k 8c..8c+7 of the block: one 16-byte shared-memory load each), then the two k-steps' mma's over
// independent accumulators, so that no mma waits on the one before (four at a time: eight fragments at once cost
// 64 rows' instantiations their last registers).
template <typename T, int kTiles>
__device__ __forceinline__ void mma_block(float (&acc)[kTiles][4], const uint4& lo, const uint4& hi, const T* xb,
                                          int pitch) {
  constexpr int kGroup = kTiles < 4 ? kTiles : 4;
#pragma unroll
  for (int j0 = 0; j0 < kTiles; j0 += kGroup) {
    uint4 v[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) v[j] = *reinterpret_cast<const uint4*>(xb + (j0 + j) * 8 * pitch);
#pragma unroll
    for (int j = 0; j < kGroup; ++j) Mma<T>::run(acc[j0 + j], lo.x, hi.x, lo.y, hi.y, v[j].x, v[j].y);
#pragma unroll
    for (int j = 0; j < kGroup; ++j) Mma<T>::run(acc[j0 + j], lo.z, hi.z, lo.w, hi.w, v[j].z, v[j].w);
  }
}

template <typename T, int kTiles, int kFeatureTiles>
__global__ void __launch_bounds__(kThreads, 2) pdl_linear_kernel(const LinearParams p) {
  constexpr int kKGroups = kWarps / kFeatureTiles;
  constexpr int kRows = 8 * kTiles;
  constexpr int kBlocks = blocks_per_warp(kRows, kKGroups);  // per warp and chunk
  constexpr int kChunk = kKGroups * kBlocks;                 // blocks per chunk
  constexpr int kF = 16 * kFeatureTiles;                     // output features per cluster
  constexpr int kPartPitch = kF + 4;  // floats: rows 2c apart land 8c banks apart, so the fragment stores are conflict-free
  static_assert(sizeof(T) == 2, "bf16 or fp16");
  extern __shared__ __align__(16) unsigned char smem_raw[];

  if (!p.trigger_late) launch_dependents();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int ft = warp % kFeatureTiles, kg = warp / kFeatureTiles;
  const int rank = blockIdx.x;  // the cluster spans gridDim.x = p.cluster
  const int n0 = blockIdx.y * kF;
  const int kblocks = p.K / kBlockK;
  const int cb0 = rank * kblocks / p.cluster, cb1 = (rank + 1) * kblocks / p.cluster;  // this CTA's blocks

  // rows g and g + 8 of the warp's feature tile, from element 8c of a block
  const char* w_lo = static_cast<const char*>(p.weight) + (size_t(n0 + 16 * ft + g) * p.K + 8 * c) * 2;
  const char* w_hi = w_lo + size_t(8) * p.K * 2;
  uint4 a_lo[kBlocks], a_hi[kBlocks];
#pragma unroll
  for (int i = 0; i < kBlocks; ++i) a_lo[i] = a_hi[i] = make_uint4(0u, 0u, 0u, 0u);
  load_weights<kBlocks, kKGroups>(a_lo, a_hi, w_lo, w_hi, kg, cb0, min(cb0 + kChunk, cb1));

  grid_dependency_wait();  // x is the previous kernel's output
  if (p.trigger_late) launch_dependents();

  float acc[kTiles][4];
#pragma unroll
  for (int j = 0; j < kTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  T* xs = reinterpret_cast<T*>(smem_raw);  // [kRows][x_pitch]: x's rows (zeros from row M on), the chunk's columns
  const T* x = static_cast<const T*>(p.x);
  const int pitch = p.x_pitch;
  for (int cb = cb0; cb < cb1; cb += kChunk) {
    const int ce = min(cb + kChunk, cb1);
    if (cb != cb0) {
      __syncthreads();  // every warp is done with the last chunk's x
      load_weights<kBlocks, kKGroups>(a_lo, a_hi, w_lo, w_hi, kg, cb, ce);
    }
    // x [kRows, chunk] into shared memory, rows from M on zeros: warp w takes rows w, w + 8, ..., its lanes the
    // row's 16-byte pieces
    const int pieces = (ce - cb) * (kBlockK / 8);
#pragma unroll
    for (int r = warp; r < kRows; r += kWarps) {
      T* dst = xs + r * pitch;
      if (r < p.M) {
        const T* src = x + r * p.x_stride + cb * kBlockK;
        for (int q = lane; q < pieces; q += 32) cp_async16(dst + 8 * q, src + 8 * q);
      } else {
        for (int q = lane; q < pieces; q += 32) *reinterpret_cast<uint4*>(dst + 8 * q) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
    __syncthreads();
    // Every n-tile, also those past M (zero rows: cheaper than a branch per tile, which serialized each tile's
    // shared-memory load and its two dependent mma's; 64 rows took twice cuBLAS's time with those branches). The
    // block guard is uniform over the warp; a full chunk (the common case) takes the loop without it.
    // (the operand: row g, k 8c..8c+7 of the warp's i-th block)
    if (ce - cb == kChunk) {
#pragma unroll
      for (int i = 0; i < kBlocks; ++i)
        mma_block<T, kTiles>(acc, a_lo[i], a_hi[i], xs + g * pitch + (kg + kKGroups * i) * kBlockK + 8 * c,
                             pitch);
    } else {
#pragma unroll
      for (int i = 0; i < kBlocks; ++i)
        if (cb + kg + kKGroups * i < ce)
          mma_block<T, kTiles>(acc, a_lo[i], a_hi[i], xs + g * pitch + (kg + kKGroups * i) * kBlockK + 8 * c,
                               pitch);
    }
  }

  // ---- the sum over k groups: part[kg][m][f] (f: the cluster's features), then the sum into part[0]
  __syncthreads();  // x's shared memory takes the partial sums
  float* part = reinterpret_cast<float*>(smem_raw);
  {
    // accumulator (c0, c1, c2, c3) = out^T[g, 2c], [g, 2c + 1], [g + 8, 2c], [g + 8, 2c + 1] of the n-tile
    float* mine = part + size_t(kg) * kRows * kPartPitch + 16 * ft + g;
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      const int m = 8 * j + 2 * c;
      mine[m * kPartPitch] = acc[j][0];
      mine[(m + 1) * kPartPitch] = acc[j][1];
      mine[m * kPartPitch + 8] = acc[j][2];
      mine[(m + 1) * kPartPitch + 8] = acc[j][3];
    }
  }
  __syncthreads();
  if (kKGroups > 1) {
    for (int i = threadIdx.x; i < p.M * (kF / 4); i += kThreads) {
      const int m = i / (kF / 4), f = 4 * (i - m * (kF / 4));
      float4* dst = reinterpret_cast<float4*>(part + m * kPartPitch + f);
      float4 s = *dst;
#pragma unroll
      for (int k = 1; k < kKGroups; ++k) {
        const float4 v = *reinterpret_cast<const float4*>(part + (k * kRows + m) * kPartPitch + f);
        s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
      }
      *dst = s;
    }
  }
  cg::cluster_group cluster = cg::this_cluster();
  if (p.cluster > 1)
    cluster.sync();  // every CTA's sum is in its shared memory, visible to the cluster
  else
    __syncthreads();

  // ---- the cluster's sum (ranks in order), the bias, 8 features per item; the CTAs of the cluster share the items
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  constexpr int kOctets = kF / 8;
  for (int i = rank * kThreads + threadIdx.x; i < p.M * kOctets; i += p.cluster * kThreads) {
    const int m = i / kOctets, f = 8 * (i - m * kOctets);
    float* local = part + m * kPartPitch + f;
    float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int q = 0; q < p.cluster; ++q) {
      const float* src = p.cluster > 1 ? cluster.map_shared_rank(local, q) : local;
      const float4 s0 = *reinterpret_cast<const float4*>(src), s1 = *reinterpret_cast<const float4*>(src + 4);
      v[0] += s0.x, v[1] += s0.y, v[2] += s0.z, v[3] += s0.w, v[4] += s1.x, v[5] += s1.y, v[6] += s1.z, v[7] += s1.w;
    }
    if (bias) {
      const uint4 b = *reinterpret_cast<const uint4*>(bias + n0 + f);
      const float2 b0 = Mma<T>::unpack(b.x), b1 = Mma<T>::unpack(b.y), b2 = Mma<T>::unpack(b.z),
                   b3 = Mma<T>::unpack(b.w);
      v[0] += b0.x, v[1] += b0.y, v[2] += b1.x, v[3] += b1.y, v[4] += b2.x, v[5] += b2.y, v[6] += b3.x, v[7] += b3.y;
    }
    uint4 o;
    o.x = Mma<T>::pack(v[0], v[1]);
    o.y = Mma<T>::pack(v[2], v[3]);
    o.z = Mma<T>::pack(v[4], v[5]);
    o.w = Mma<T>::pack(v[6], v[7]);
    *reinterpret_cast<uint4*>(out + size_t(m) * p.N + n0 + f) = o;
  }
  if (p.cluster > 1) cluster.sync();  // no CTA leaves while another still reads its shared memory
}

// The kernel, with its dynamic shared-memory limit raised to `smem` (once per device). A failing runtime call here
// also leaves its error as the thread's last error, where the next kernel launch check (torch's) would find it and
// fail an unrelated launch; so every failure is read back with cudaGetLastError, and returned to the caller instead.
template <typename T, int kTiles, int kFeatureTiles>
cudaError_t launch(const LinearParams& p, size_t smem, cudaStream_t stream) {
  void (*kernel)(LinearParams) = pdl_linear_kernel<T, kTiles, kFeatureTiles>;
  static size_t allowed[64] = {};  // per device: the opt-in set so far (raised when a launch needs more)
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return cudaGetLastError();
  if (smem > 48 * 1024 && (device >= 64 || smem > allowed[device])) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return cudaGetLastError();
    if (device < 64) allowed[device] = smem;
  }
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (p.cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = p.cluster;
    attr[n].val.clusterDim.y = 1;
    attr[n].val.clusterDim.z = 1;
    ++n;
  }
  if (p.pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(p.cluster, p.N / (16 * kFeatureTiles));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, p) == cudaSuccess ? cudaSuccess : cudaGetLastError();
}

template <typename T, int kTiles>
cudaError_t launch_features(const LinearParams& p, size_t smem, cudaStream_t stream) {
  switch (p.feature_tiles) {
    case 1: return launch<T, kTiles, 1>(p, smem, stream);
    case 2: return launch<T, kTiles, 2>(p, smem, stream);
    case 4: return launch<T, kTiles, 4>(p, smem, stream);
    case 8: return launch<T, kTiles, 8>(p, smem, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_tiles(const LinearParams& p, size_t smem, cudaStream_t stream) {
  switch (n_tiles(p.M)) {
    case 1: return launch_features<T, 1>(p, smem, stream);
    case 2: return launch_features<T, 2>(p, smem, stream);
    case 4: return launch_features<T, 4>(p, smem, stream);
    case 8: return launch_features<T, 8>(p, smem, stream);
  }
  return cudaErrorInvalidValue;
}

// Blocks of x's chunk: a CTA's K range (the longest of the cluster's), at most a chunk.
int chunk_blocks(int M, int K, int feature_tiles, int cluster) {
  const int kgroups = kWarps / feature_tiles;
  const int chunk = kgroups * blocks_per_warp(8 * n_tiles(M), kgroups);
  const int range = (K / kBlockK + cluster - 1) / cluster;
  return range < chunk ? range : chunk;
}

}  // namespace

size_t smem_bytes(int M, int K, int feature_tiles, int cluster) {
  const int rows = 8 * n_tiles(M);
  const size_t x = size_t(rows) * x_pitch_of(chunk_blocks(M, K, feature_tiles, cluster)) * 2;
  const size_t part = size_t(kWarps / feature_tiles) * rows * (16 * feature_tiles + 4) * sizeof(float);
  return x > part ? x : part;
}

cudaError_t pdl_linear(LinearParams p, DType dtype, cudaStream_t stream) {
  p.x_pitch = x_pitch_of(chunk_blocks(p.M, p.K, p.feature_tiles, p.cluster));
  const size_t smem = smem_bytes(p.M, p.K, p.feature_tiles, p.cluster);
  return dtype == kBFloat16 ? launch_tiles<__nv_bfloat16>(p, smem, stream) : launch_tiles<__half>(p, smem, stream);
}

}  // namespace zoo_pl
