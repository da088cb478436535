// A run of Mamba-1 blocks without MLPs (Mamba-130M's 24), one decode token, in one persistent launch.
//
// Per layer, for the residual stream res [batch, D]:
//   h = rmsnorm(res as T) * norm_w                      (as zoo_kernels.add_norm: the norm reads res rounded to T)
//   x, z = h in_w^T;  u = silu(conv(conv_state, x))      (the conv window shifts x in)
//   [dt_low, B, C] = u x_w^T;  dt = softplus(dt_low dt_w^T + dt_b)
//   s = s exp(dt A) + dt u B;  y = (s C + D u) silu(z)
//   res = res + y out_w^T
// with every value the unfused step stores in T rounded to T here too.
//
// Why one launch: at batch 64 the unfused layer is four dependent kernels (add_norm, in_proj, the fused step,
// out_proj) whose launches, ramps and tails cost more than their bytes (27 us per layer against ~5 us of DRAM
// traffic; benchmarks/NOTES_selective_scan.md). Here CTA i of the grid (d_inner / 16 CTAs, one per SM, all
// resident: the launcher checks the occupancy) owns channels [16 i, 16 i + 16) of d_inner for every batch row,
// and output features [8 i, 8 i + 8) of the stream; three grid barriers per layer order its phases:
//   P1  every CTA stages all rows of res (T) and their norms; its 32 rows of in_proj (tensor cores; the norm's
//       weight folded into them, rstd applied to the accumulators)
//   P2  conv and silu of its channels;  P3 its channels' part of x_proj, summed over the 8-CTA cluster through
//       distributed shared memory, then over the clusters by 64-bit integer atomics in 32.32 fixed point (exact,
//       so the sum does not depend on the order the atomics land in)                     -> grid barrier 1
//   P4  dt, the state update and the gate of its channels; y into shared memory
//   P5a the cluster's y gathered (distributed shared memory); its D / 8 features of out_proj over the cluster's
//       128 channels, a part written to global memory                                   -> grid barrier 2
//   P5b its 8 features: the clusters' parts summed in order, the residual add, res's new values and their sums of
//       squares per row (one part per CTA, summed in order by P1)                        -> grid barrier 3
// A layer's weights and states are loaded while the layer before runs (layer 0's before the grid-dependency wait).
//
// Measured (benchmarks/RESULTS.md, fourteenth session): correct, but slower than the model's block-by-block chain
// at every batch (42.2 against 27.8 us per block at batch 64 on an H200): the three barriers alone cost ~7 us per
// block. Experimental: the model does not take it.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "mamba_layers.h"
#include "decode_common.cuh"  // cp.async, mma16816, load_state4 / store_state4

namespace cg = cooperative_groups;

namespace zoo_ml {
namespace {

using namespace zoo_decode;  // cp.async, mma16816, states, to_f / from_f / round_to, softplus_f, sigmoid_f

constexpr float kFixScale = 4294967296.f;       // 2^32: x_proj's sums in 32.32 fixed point
constexpr float kFixClamp = 67108864.f;         // 2^26: a part's magnitude is clamped there (16 parts < 2^62)

// `bytes` (a multiple of 16) from src to dst, both 16-byte aligned, spread over the CTA
__device__ __forceinline__ void copy_bytes(void* dst, const void* src, int bytes) {
  for (int i = threadIdx.x; i < bytes / 16; i += kThreads)
    cp_async16(static_cast<char*>(dst) + 16 * i, static_cast<const char*>(src) + 16 * i);
}
// `rows` rows of `row_bytes` from src (pitch src_pitch bytes) to dst (pitch dst_pitch bytes)
__device__ __forceinline__ void copy_rows(void* dst, int dst_pitch, const void* src, size_t src_pitch, int rows,
                                          int row_bytes) {
  const int per = row_bytes / 16;
  for (int i = threadIdx.x; i < rows * per; i += kThreads) {
    const int r = i / per, q = i - r * per;
    cp_async16(static_cast<char*>(dst) + size_t(r) * dst_pitch + 16 * q,
               static_cast<const char*>(src) + r * src_pitch + 16 * q);
  }
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}
// in_proj's rows come by bulk copies (the copy engine; one thread issues a row) counted on an mbarrier, so that
// waiting for them never waits for the cp.async groups (staged rows, small weights, out_proj's block) or the reverse.
__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_expect(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned phase) {
  asm volatile(
      "{\n .reg .pred done;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra WAIT_%=;\n}\n" ::"r"(smem_addr(bar)),
      "r"(phase)
      : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

// The grid barrier of cooperative groups' grid.sync (every CTA resident: the launcher checks it): CTA 0 adds
// 2^31 - (n - 1), the others 1, so the counter's top bit flips once all n have arrived, whatever its value before.
// Split in two: between the arrival and the wait a CTA issues its next loads (their issue stalls once the memory
// pipe is full, which costs nothing while the barrier's round trip runs). The arrival returns thread 0's ticket.
__device__ __forceinline__ unsigned grid_arrive(unsigned* counter) {
  __syncthreads();
  unsigned old = 0;
  if (threadIdx.x == 0) {
    const unsigned add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
    __threadfence();
    old = atomicAdd(counter, add);
  }
  return old;
}
__device__ __forceinline__ void grid_wait(unsigned* counter, unsigned old) {
  if (threadIdx.x == 0) {
    unsigned now;
    do {
      asm volatile("ld.acquire.gpu.u32 %0, [%1];\n" : "=r"(now) : "l"(counter) : "memory");
    } while (((old ^ now) & 0x80000000u) == 0);
    __threadfence();
  }
  __syncthreads();
}

// Phase stamps (benchmarks/mamba_layers.py --phases): with p.stamps set, thread 0 of every CTA stores the global
// timer at kStamps points of every layer, stamps[(layer * CTAs + cta) * kStamps + k]; one predictable branch each.
__device__ __forceinline__ void stamp(const LayersParams& p, int layer, int k) {
  if (p.stamps != nullptr && threadIdx.x == 0) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    p.stamps[(size_t(layer) * gridDim.x + blockIdx.x) * kStamps + k] = t;
  }
}

// Shared memory, in bytes from the base; every region 16-byte aligned. Pitches pad rows by 16 bytes, which puts
// the 8 rows of an ldmatrix in 8 different bank quads.
struct Layout {
  int pin, pout, pxw, pdt;  // pitches in elements: in_proj and staged rows, out_proj rows and gathered y, x_proj, dt
  size_t win, wout, wx, wdt, A, Dv, dtb, cw, cb, normw, act, xzp, ut, uf, zf, ys, rstd, bars, total;
  __host__ __device__ Layout(int rows, int D, int E, int R, int W, int elem) {
    const int P = R + 2 * kN;
    pin = D + 16 / elem, pout = kCluster * kCh + 16 / elem, pxw = kCh + 16 / elem, pdt = R + 16 / elem;
    size_t o = 0;
    auto take = [&o](size_t bytes) {
      const size_t at = o;
      o += (bytes + 15) / 16 * 16;
      return at;
    };
    win = take(size_t(2 * kCh) * pin * elem);
    wout = take(size_t(D / kCluster) * pout * elem);  // out_proj's rows of this CTA's features in the cluster's part
    wx = take(size_t(P) * pxw * elem);
    wdt = take(size_t(kCh) * pdt * elem);
    A = take(kCh * kN * 4);
    Dv = take(kCh * 4);
    dtb = take(kCh * 4);
    cw = take(kCh * W * 4);
    cb = take(kCh * 4);
    normw = take(size_t(D) * elem);
    size_t act_bytes = size_t(rows) * pin * elem;   // P1: the staged rows
    const size_t parts = size_t(rows) * P * 12;     // P3: x_proj's part; P4: its sums (+ their raw copy)
    const size_t ygather = size_t(rows) * pout * elem;  // P5: the cluster's y
    act_bytes = act_bytes > parts ? act_bytes : parts;
    act_bytes = act_bytes > ygather ? act_bytes : ygather;
    act = take(act_bytes);
    xzp = take(64 * 2 * kCh * 4);          // [K parts][rows][32], K parts x rows = 64
    ut = take(size_t(rows) * pxw * elem);  // u in T: x_proj's A operand
    uf = take(rows * kCh * 4);
    zf = take(rows * kCh * 4);
    ys = take(size_t(rows) * kCh * elem);  // this CTA's y (T), read by the cluster
    rstd = take(rows * 4);
    bars = take(8);                        // the mbarrier of in_w and the norm's weight
    total = o;
  }
};

template <typename T>
__device__ __forceinline__ T* at(unsigned char* base, size_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

// in_proj's rows of this CTA (x and z halves) and the norm's weight, as bulk copies issued by the last warp (lane i
// a row of every 32; not thread 0's warp, which runs the grid barrier) on one mbarrier. Called by every thread.
template <typename T>
__device__ __forceinline__ void issue_in_w(unsigned char* sm, const Layout& L, const LayerPtrs& w, int D, int E,
                                           int c0, uint64_t* bar) {
  if (threadIdx.x < kThreads - 32) return;
  const int lane = threadIdx.x % 32;
  const unsigned row = D * sizeof(T);
  if (lane == 0) {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // (the rows were read by ldmatrix)
    mbar_expect(bar, (2 * kCh + 1) * row);
  }
  __syncwarp();
  const T* in_w = static_cast<const T*>(w.in_w);
  for (int r = lane; r < 2 * kCh; r += 32) {
    const int src = r < kCh ? c0 + r : E + c0 + r - kCh;
    bulk_copy(at<T>(sm, L.win) + r * L.pin, in_w + size_t(src) * D, row, bar);
  }
  if (lane == 31) bulk_copy(at<T>(sm, L.normw), w.norm_w, row, bar);
}
// the small weights of this CTA's channels, by cp.async (one group, committed by the caller)
template <typename T>
__device__ __forceinline__ void load_small(unsigned char* sm, const Layout& L, const LayerPtrs& w, int E, int R,
                                           int W, int c0) {
  const int P = R + 2 * kN;
  copy_rows(at<T>(sm, L.wx), L.pxw * sizeof(T), static_cast<const T*>(w.x_w) + c0, size_t(E) * sizeof(T), P,
            kCh * sizeof(T));
  copy_rows(at<T>(sm, L.wdt), L.pdt * sizeof(T), static_cast<const T*>(w.dt_w) + size_t(c0) * R,
            size_t(R) * sizeof(T), kCh, R * sizeof(T));
  copy_bytes(at<float>(sm, L.A), w.A + size_t(c0) * kN, kCh * kN * 4);
  if (w.D) copy_bytes(at<float>(sm, L.Dv), w.D + c0, kCh * 4);
  if (w.dt_b) copy_bytes(at<float>(sm, L.dtb), w.dt_b + c0, kCh * 4);
  copy_bytes(at<float>(sm, L.cw), w.conv_w + size_t(c0) * W, kCh * W * 4);
  if (w.conv_b) copy_bytes(at<float>(sm, L.cb), w.conv_b + c0, kCh * 4);
}
// out_proj's block of this CTA: its D / 8 features (rank q: [q D/8, (q+1) D/8)) over the cluster's 8 x 16 channels
template <typename T>
__device__ __forceinline__ void load_out_w(unsigned char* sm, const Layout& L, const LayerPtrs& w, int D, int E,
                                           int rank, int cluster_c0) {
  const int rows = D / kCluster;
  copy_rows(at<T>(sm, L.wout), L.pout * sizeof(T),
            static_cast<const T*>(w.out_w) + size_t(rank * rows) * E + cluster_c0, size_t(E) * sizeof(T), rows,
            kCluster * kCh * sizeof(T));
}

// The norm's weight folded into this CTA's in_proj rows (in shared memory): in_proj(x * rstd * w) is
// rstd * (x in_w^T) with in_w's columns scaled by w, so the staged rows need no pass (rstd scales the accumulators)
template <typename T>
__device__ __forceinline__ void fold_norm(unsigned char* sm, const Layout& L, int D) {
  const int per = D / 8;
  const T* nw = at<T>(sm, L.normw);
  for (int i = threadIdx.x; i < 2 * kCh * per; i += kThreads) {
    const int r = i / per, k = (i - r * per) * 8;
    uint4* v = reinterpret_cast<uint4*>(at<T>(sm, L.win) + r * L.pin + k);
    uint4 raw = *v;
    const uint4 wraw = *reinterpret_cast<const uint4*>(nw + k);
    T* e8 = reinterpret_cast<T*>(&raw);
    const T* w8 = reinterpret_cast<const T*>(&wraw);
#pragma unroll
    for (int e = 0; e < 8; ++e) e8[e] = from_f<T>(to_f(e8[e]) * to_f(w8[e]));
    *v = raw;
  }
}

// A layer's states for this thread's (row, channel) items into registers: kMT rows r = j + 16 i of channel c
template <typename S, int kMT>
__device__ __forceinline__ void load_states(float4 (&h)[kMT][4], float (&win)[kMT][3], const LayerPtrs& w,
                                            const LayersParams& p, int c, int j) {
  const int E = p.E, W = p.W;
#pragma unroll
  for (int i = 0; i < kMT; ++i) {
    const int r = j + 16 * i;
#pragma unroll
    for (int q = 0; q < 4; ++q) h[i][q] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int t = 0; t < 3; ++t) win[i][t] = 0.f;
    if (r < p.batch) {
      const S* st = static_cast<const S*>(w.state) + (size_t(r) * E + c) * kN;
#pragma unroll
      for (int q = 0; q < 4; ++q) h[i][q] = load_state4(st + 4 * q);
      const float* cs = w.conv_state + (size_t(r) * E + c) * (W - 1);
#pragma unroll
      for (int t = 0; t < 3; ++t)
        if (t < W - 1) win[i][t] = __ldcg(cs + t);
    }
  }
}

template <typename S, int kMT>
__device__ __forceinline__ void store_states(const float4 (&h)[kMT][4], const LayerPtrs& w, const LayersParams& p,
                                             int c, int j) {
#pragma unroll
  for (int i = 0; i < kMT; ++i) {
    const int r = j + 16 * i;
    if (r < p.batch) {
      S* st = static_cast<S*>(w.state) + (size_t(r) * p.E + c) * kN;
#pragma unroll
      for (int q = 0; q < 4; ++q) store_state4(st + 4 * q, h[i][q]);
    }
  }
}

template <typename T, typename S, int kRows>
__global__ void __launch_bounds__(kThreads, 1) mamba_layers_kernel(const LayersParams p) {
  constexpr int kMT = kRows / 16;     // m-tiles of 16 rows
  constexpr int kKS = 8 / (2 * kMT);  // in_proj's K parts (8 warps = 2 halves x kMT m-tiles x kKS)
  constexpr int kMaxClusters = 16;
  constexpr int kResPer = (kRows * kFeat + kThreads - 1) / kThreads;  // (row, feature) items per thread in P5
  extern __shared__ __align__(16) unsigned char sm[];
  cg::cluster_group cluster = cg::this_cluster();
  const int D = p.D, E = p.E, R = p.R, W = p.W, P = R + 2 * kN;
  const int cta = blockIdx.x, c0 = cta * kCh, f0 = cta * kFeat;
  const int rank = int(cluster.block_rank()), cl = cta / kCluster, clusters = int(gridDim.x) / kCluster;
  const int FC = D / kCluster;  // features of the cluster's out_proj part this CTA computes
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int c = tid % kCh, j = tid / kCh;  // the thread's channel and row slot in P2 and P4
  const int gq = lane / 4, cq = lane % 4;  // mma fragment coordinates
  const Layout L(kRows, D, E, R, W, int(sizeof(T)));
  T* act = at<T>(sm, L.act);
  T* ys = at<T>(sm, L.ys);

  // ---- before the grid-dependency wait: layer 0's weights and states (nothing the kernel before writes)
  float4 h[kMT][4];
  float win[kMT][3];
  uint64_t* bar = at<uint64_t>(sm, L.bars);
  unsigned phase = 0;  // the parity the next wait for in_w expects
  {
    if (tid == 0) {
      mbar_init(bar);
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    const LayerPtrs w0 = p.table[0];
    issue_in_w<T>(sm, L, w0, D, E, c0, bar);
    load_small<T>(sm, L, w0, E, R, W, c0);
    load_out_w<T>(sm, L, w0, D, E, rank, cl * kCluster * kCh);
    cp_async_commit();
    load_states<S, kMT>(h, win, w0, p, c0 + c, j);
    mbar_wait(bar, phase);
    phase ^= 1;
    cp_async_wait<0>();
    __syncthreads();
    fold_norm<T>(sm, L, D);
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");  // res, resb, ss: the kernel before's outputs
#endif

  for (int layer = 0; layer < p.layers; ++layer) {
    const LayerPtrs w = p.table[layer];
    const bool last = layer + 1 == p.layers;
    stamp(p, layer, 0);
    // ---- P1: the rows of resb into shared memory (zero past the batch) and their norms
    copy_rows(act, L.pin * sizeof(T), p.resb, size_t(D) * sizeof(T), p.batch, D * sizeof(T));
    cp_async_commit();
    for (int i = p.batch * L.pin + tid; i < kRows * L.pin; i += kThreads) act[i] = from_f<T>(0.f);
    {
      const int parts = layer == 0 ? p.in_parts : int(gridDim.x);
      const int r = tid / 4, q = tid % 4;
      float s = 0.f;
      if (r < kRows) {
#pragma unroll 8
        for (int k = q; k < parts; k += 4) s += __ldcg(p.ss + size_t(k) * kSsRows + r);
      }
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      if (q == 0 && r < kRows) at<float>(sm, L.rstd)[r] = 1.f / sqrtf(s / float(D) + p.eps);
    }
    cp_async_wait<0>();  // the staged rows (and the small weights and out_proj's block, issued a layer before)
    __syncthreads();
    stamp(p, layer, 1);
    // in_proj on the tensor cores: warp (m-tile mt, half hb: x or z, K part kp), two n-tiles, alternate k-steps
    // into two accumulator sets (shorter dependency chains)
    {
      const int task = warp % (2 * kMT), kp = warp / (2 * kMT);
      const int mt = task % kMT, hb = task / kMT;
      const int steps = D / 16 / kKS, k_begin = kp * steps * 16;
      float d[2][2][4] = {};
      const T* a_ptr = act + (16 * mt + (lane % 8) + 8 * ((lane / 8) % 2)) * L.pin + 8 * (lane / 16);
      const T* b_ptr = at<T>(sm, L.win) + (16 * hb + (lane % 8) + 8 * (lane / 16)) * L.pin + 8 * ((lane / 8) % 2);
#pragma unroll 2
      for (int s = 0; s < steps; s += 2) {  // (steps is even: the launcher asks D % 128 == 0)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int k = k_begin + 16 * (s + e);
          uint32_t a[4], b[4];
          ldsm_x4(a, a_ptr + k);
          ldsm_x4(b, b_ptr + k);
          mma16816<T>(d[e][0], a[0], a[1], a[2], a[3], b[0], b[1]);
          mma16816<T>(d[e][1], a[0], a[1], a[2], a[3], b[2], b[3]);
        }
      }
      float* xzp = at<float>(sm, L.xzp) + size_t(kp) * kRows * 2 * kCh;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int col = 16 * hb + 8 * nt + 2 * cq, row = 16 * mt + gq;
        xzp[row * 2 * kCh + col] = d[0][nt][0] + d[1][nt][0];
        xzp[row * 2 * kCh + col + 1] = d[0][nt][1] + d[1][nt][1];
        xzp[(row + 8) * 2 * kCh + col] = d[0][nt][2] + d[1][nt][2];
        xzp[(row + 8) * 2 * kCh + col + 1] = d[0][nt][3] + d[1][nt][3];
      }
    }
    __syncthreads();
    stamp(p, layer, 2);

    // ---- P2: conv and silu of the thread's items; z; u in T for x_proj
    {
      const float* xzp = at<float>(sm, L.xzp);
      const float* cw = at<float>(sm, L.cw) + c * W;
      const float cbias = w.conv_b ? at<float>(sm, L.cb)[c] : 0.f;
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
        const int r = j + 16 * i;
        float xs = 0.f, zs = 0.f;
#pragma unroll
        for (int kp = 0; kp < kKS; ++kp) {
          xs += xzp[(kp * kRows + r) * 2 * kCh + c];
          zs += xzp[(kp * kRows + r) * 2 * kCh + kCh + c];
        }
        const float rs = at<float>(sm, L.rstd)[r];
        xs = round_to<T>(xs * rs), zs = round_to<T>(zs * rs);
        float u = 0.f;
        if (r < p.batch) {
          const float m = p.mask ? to_f(static_cast<const T*>(p.mask)[size_t(r) * p.mask_stride]) : 1.f;
          const float x = xs * m;
          float acc = cbias;
#pragma unroll
          for (int t = 0; t < 3; ++t)
            if (t < W - 1) acc = fmaf(cw[t], win[i][t], acc);
          acc = fmaf(cw[W - 1], x, acc);
          float* cs = w.conv_state + (size_t(r) * E + c0 + c) * (W - 1);
#pragma unroll
          for (int t = 0; t < 3; ++t)
            if (t < W - 1) cs[t] = t + 1 < W - 1 ? win[i][t + 1] : x;
          u = round_to<T>(acc * sigmoid_f(acc)) * m;
        }
        at<float>(sm, L.uf)[r * kCh + c] = u;
        at<float>(sm, L.zf)[r * kCh + c] = zs;
        at<T>(sm, L.ut)[r * L.pxw + c] = from_f<T>(u);
      }
    }
    __syncthreads();

    // ---- P3: this CTA's part of x_proj, part [rows][P] = u [rows][16] x_w[:, c0:c0+16]^T (one k-step)
    float* part = at<float>(sm, L.act);  // (the staged rows are read)
    {
      const T* a_base = at<T>(sm, L.ut) + ((lane % 8) + 8 * ((lane / 8) % 2)) * L.pxw + 8 * (lane / 16);
      const T* b_base = at<T>(sm, L.wx) + (lane % 8) * L.pxw + 8 * ((lane / 8) % 2);
      for (int task = warp; task < kMT * (P / 8); task += 8) {
        const int mt = task % kMT, nt = task / kMT;
        uint32_t a[4], b[2];
        ldsm_x4(a, a_base + 16 * mt * L.pxw);
        ldsm_x2(b, b_base + 8 * nt * L.pxw);
        float d[4] = {0.f, 0.f, 0.f, 0.f};
        mma16816<T>(d, a[0], a[1], a[2], a[3], b[0], b[1]);
        const int row = 16 * mt + gq, col = 8 * nt + 2 * cq;
        part[row * P + col] = d[0];
        part[row * P + col + 1] = d[1];
        part[(row + 8) * P + col] = d[2];
        part[(row + 8) * P + col + 1] = d[3];
      }
    }
    stamp(p, layer, 3);
    cluster.sync();  // every part of the cluster written and visible
    stamp(p, layer, 4);
    {
      // this CTA's share of the elements: the cluster's parts in rank order, then one atomic per element
      const int total = p.batch * P, share = (total + kCluster - 1) / kCluster;
      const int begin = rank * share, end = min(total, begin + share);
      for (int e = begin + tid; e < end; e += kThreads) {
        float v = 0.f;
#pragma unroll
        for (int q = 0; q < kCluster; ++q) v += cluster.map_shared_rank(part, q)[e];
        v = fminf(fmaxf(v, -kFixClamp), kFixClamp);
        atomicAdd(p.dbc + e, static_cast<unsigned long long>(__float2ll_rn(v * kFixScale)));
      }
    }
    asm volatile("barrier.cluster.arrive.release;\n" ::: "memory");
    stamp(p, layer, 5);
    {
      const unsigned ticket = grid_arrive(p.barrier);  // 1: x_proj's sums are complete
      if (!last) issue_in_w<T>(sm, L, p.table[layer + 1], D, E, c0, bar);  // (in_w is read: P1)
      grid_wait(p.barrier, ticket);
    }
    asm volatile("barrier.cluster.wait.acquire;\n" ::: "memory");  // (peers are done with `part`: they arrived)
    stamp(p, layer, 6);

    // ---- P4: x_proj's outputs rounded to T, dt, the state update, the gate; y into shared memory
    float* dbl = at<float>(sm, L.act);
    {
      // the fixed-point sums into shared memory in one round trip (after dbl's floats), then rounded to T
      unsigned long long* raw = reinterpret_cast<unsigned long long*>(dbl + kRows * P);
      copy_bytes(raw, p.dbc, p.batch * P * 8);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      stamp(p, layer, 7);
      for (int e = tid; e < kRows * P; e += kThreads) {
        float v = 0.f;
        if (e < p.batch * P) v = round_to<T>(float(double(static_cast<long long>(raw[e])) * (1.0 / 4294967296.0)));
        dbl[e] = v;
      }
    }
    __syncthreads();
    stamp(p, layer, 8);
    {
      const T* wdt = at<T>(sm, L.wdt) + c * L.pdt;
      const float bias = w.dt_b ? at<float>(sm, L.dtb)[c] : 0.f;
      const float Dc = w.D ? at<float>(sm, L.Dv)[c] : 0.f;
      constexpr float kLog2e = 1.4426950408889634f;
      float a2[kN];
#pragma unroll
      for (int n = 0; n < kN; ++n) a2[n] = at<float>(sm, L.A)[c * kN + n] * kLog2e;
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
        const int r = j + 16 * i;
        const float* row = dbl + r * P;
        float dt = 0.f;
        for (int k = 0; k < R; k += 2) {
          const float2 wv = make_float2(to_f(wdt[k]), to_f(wdt[k + 1]));
          const float2 xv = *reinterpret_cast<const float2*>(row + k);
          dt = fmaf(wv.x, xv.x, fmaf(wv.y, xv.y, dt));
        }
        dt = softplus_f(dt + bias);
        const float u = at<float>(sm, L.uf)[r * kCh + c], du = dt * u;
        float y = 0.f;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float4 Bv = *reinterpret_cast<const float4*>(row + R + 4 * q);
          const float4 Cv = *reinterpret_cast<const float4*>(row + R + kN + 4 * q);
          float4 hn = h[i][q];
          hn.x = fmaf(hn.x, exp2f(dt * a2[4 * q]), du * Bv.x);
          hn.y = fmaf(hn.y, exp2f(dt * a2[4 * q + 1]), du * Bv.y);
          hn.z = fmaf(hn.z, exp2f(dt * a2[4 * q + 2]), du * Bv.z);
          hn.w = fmaf(hn.w, exp2f(dt * a2[4 * q + 3]), du * Bv.w);
          h[i][q] = hn;
          y = fmaf(hn.x, Cv.x, fmaf(hn.y, Cv.y, fmaf(hn.z, Cv.z, fmaf(hn.w, Cv.w, y))));
        }
        float out = 0.f;
        if (r < p.batch) {
          const float zz = at<float>(sm, L.zf)[r * kCh + c];
          out = fmaf(Dc, u, y) * (zz * sigmoid_f(zz));
        }
        ys[r * kCh + c] = from_f<T>(out);
      }
    }
    stamp(p, layer, 9);
    cluster.sync();  // the cluster's y in its CTAs' shared memory
    // ---- P5a: the cluster's y [rows][8 x 16] gathered, then this CTA's FC features of out_proj over the cluster's
    // channels: a part of out_proj, summed over the clusters in P5b
    T* yc = act;  // (dbl is read)
    for (int i = tid; i < kRows * 2 * kCluster; i += kThreads) {  // 16-byte pieces: (row, peer, half)
      const int r = i / (2 * kCluster), q = (i / 2) % kCluster, half = i % 2;
      const uint4 v = *reinterpret_cast<const uint4*>(cluster.map_shared_rank(ys, q) + r * kCh + 8 * half);
      *reinterpret_cast<uint4*>(yc + r * L.pout + q * kCh + 8 * half) = v;
    }
    asm volatile("barrier.cluster.arrive.release;\n" ::: "memory");  // (this CTA is done with its peers' y)
    __syncthreads();
    stamp(p, layer, 10);
    {
      float* outp = p.outp + size_t(cl) * kRows * D + rank * FC;
      const T* a_base = yc + ((lane % 8) + 8 * ((lane / 8) % 2)) * L.pout + 8 * (lane / 16);
      const T* b_base = at<T>(sm, L.wout) + (lane % 8) * L.pout + 8 * ((lane / 8) % 2);
      for (int task = warp; task < kMT * (FC / 8); task += 8) {
        const int mt = task % kMT, nt = task / kMT;
        float d[2][4] = {};
#pragma unroll
        for (int s = 0; s < kCluster * kCh / 16; ++s) {
          uint32_t a[4], b[2];
          ldsm_x4(a, a_base + 16 * mt * L.pout + 16 * s);
          ldsm_x2(b, b_base + 8 * nt * L.pout + 16 * s);
          mma16816<T>(d[s % 2], a[0], a[1], a[2], a[3], b[0], b[1]);
        }
        const int row = 16 * mt + gq, col = 8 * nt + 2 * cq;
        *reinterpret_cast<float2*>(outp + size_t(row) * D + col) = make_float2(d[0][0] + d[1][0], d[0][1] + d[1][1]);
        *reinterpret_cast<float2*>(outp + size_t(row + 8) * D + col) =
            make_float2(d[0][2] + d[1][2], d[0][3] + d[1][3]);
      }
    }
    stamp(p, layer, 11);
    {
      const unsigned ticket = grid_arrive(p.barrier);  // 2: out_proj's parts are complete; x_proj's sums read
      asm volatile("barrier.cluster.wait.acquire;\n" ::: "memory");
      store_states<S, kMT>(h, w, p, c0 + c, j);  // (private: not needed before the barrier)
      if (!last) {  // (the small weights, dbl and out_w are read: the arrival's __syncthreads)
        const LayerPtrs nx = p.table[layer + 1];
        load_small<T>(sm, L, nx, E, R, W, c0);
        load_out_w<T>(sm, L, nx, D, E, rank, cl * kCluster * kCh);
        cp_async_commit();
        load_states<S, kMT>(h, win, nx, p, c0 + c, j);
      }
      grid_wait(p.barrier, ticket);
    }
    stamp(p, layer, 12);
    {
      const int total = p.batch * P, share = (total + gridDim.x - 1) / gridDim.x;
      const int begin = cta * share, end = min(total, begin + share);
      for (int e = begin + tid; e < end; e += kThreads) p.dbc[e] = 0ull;  // (for the next layer, or launch)
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (last) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif

    // ---- P5b: this CTA's 8 features, the clusters' parts summed in order; the residual add; sums of squares
    {
      float part_sum[kResPer][kMaxClusters];
#pragma unroll
      for (int k = 0; k < kResPer; ++k) {
        const int t = tid + k * kThreads, r = t / kFeat, f = t % kFeat;
#pragma unroll
        for (int q = 0; q < kMaxClusters; ++q)
          part_sum[k][q] = t < kRows * kFeat && r < p.batch && q < clusters
                               ? __ldcg(p.outp + (size_t(q) * kRows + r) * D + f0 + f)
                               : 0.f;
      }
      float resv[kResPer];
#pragma unroll
      for (int k = 0; k < kResPer; ++k) {
        const int t = tid + k * kThreads, r = t / kFeat;
        resv[k] = t < kRows * kFeat && r < p.batch ? __ldcg(p.res + size_t(r) * D + f0 + t % kFeat) : 0.f;
      }
#pragma unroll
      for (int k = 0; k < kResPer; ++k) {  // (whole warps: kRows * kFeat is a multiple of 32)
        const int t = tid + k * kThreads, r = t / kFeat, f = t % kFeat;
        if (t >= kRows * kFeat) break;
        float o = 0.f;
#pragma unroll
        for (int q = 0; q < kMaxClusters; ++q) o += part_sum[k][q];
        o = round_to<T>(o);
        float sq = 0.f;
        if (r < p.batch) {
          const size_t idx = size_t(r) * D + f0 + f;
          float v = resv[k] + o;
          if (p.res_round) v = round_to<T>(v);
          p.res[idx] = v;
          const T vb = from_f<T>(v);
          static_cast<T*>(p.resb)[idx] = vb;
          sq = to_f(vb) * to_f(vb);
        }
        sq += __shfl_xor_sync(0xffffffffu, sq, 1);
        sq += __shfl_xor_sync(0xffffffffu, sq, 2);
        sq += __shfl_xor_sync(0xffffffffu, sq, 4);
        if (f == 0) p.ss[size_t(cta) * kSsRows + r] = sq;
      }
    }
    stamp(p, layer, 13);
    if (!last) {
      const unsigned ticket = grid_arrive(p.barrier);  // 3: res, resb and the sums of squares are complete
      mbar_wait(bar, phase);  // the next layer's in_w and norm weight (issued at barrier 1)
      phase ^= 1;
      __syncthreads();
      fold_norm<T>(sm, L, D);
      grid_wait(p.barrier, ticket);
    }
    stamp(p, layer, 14);
  }
  cp_async_wait<0>();
}

// res = x (+ pending), rounded to T where the stream is; resb and one part of the sums of squares
template <typename T, typename X>
__global__ void __launch_bounds__(kThreads) prep_kernel(const PrepParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (p.pdl) {
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  }
#endif
  __shared__ float red[kThreads / 32];
  const int r = blockIdx.x;
  float sq = 0.f;
  for (int k = threadIdx.x; k < p.D; k += kThreads) {
    const size_t idx = size_t(r) * p.D + k;
    float v = to_f(static_cast<const X*>(p.x)[idx]);
    if (p.pending) v += to_f(static_cast<const T*>(p.pending)[idx]);
    if (p.res_round) v = round_to<T>(v);
    p.res[idx] = v;
    const T vb = from_f<T>(v);
    static_cast<T*>(p.resb)[idx] = vb;
    sq += to_f(vb) * to_f(vb);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sq;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int i = 0; i < kThreads / 32; ++i) s += red[i];
    p.ss[r] = s;
  }
}

using LayersFn = void (*)(LayersParams);

template <typename T, typename S>
LayersFn layers_fn(int rows) {
  switch (rows) {
    case 16: return mamba_layers_kernel<T, S, 16>;
    case 32: return mamba_layers_kernel<T, S, 32>;
    case 64: return mamba_layers_kernel<T, S, 64>;
  }
  return nullptr;
}

template <typename T>
LayersFn layers_fn(bool state_low, int rows) {
  return state_low ? layers_fn<T, T>(rows) : layers_fn<T, float>(rows);
}

LayersFn layers_fn(DType dtype, bool state_low, int rows) {
  return dtype == kBFloat16 ? layers_fn<__nv_bfloat16>(state_low, rows) : layers_fn<__half>(state_low, rows);
}

cudaLaunchConfig_t config(dim3 grid, int cluster, size_t smem, cudaStream_t stream, cudaLaunchAttribute* attr,
                          bool pdl) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  int n = 0;
  if (cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster;
    attr[n].val.clusterDim.y = 1;
    attr[n].val.clusterDim.z = 1;
    ++n;
  }
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cfg;
}

// Every failure is read back with cudaGetLastError (so that it is not left for an unrelated launch to find).
cudaError_t prepare(LayersFn fn, size_t smem) {
  if (cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) != cudaSuccess)
    return cudaGetLastError();
  if (cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)
    return cudaGetLastError();
  return cudaSuccess;
}

}  // namespace

size_t layers_smem_bytes(int rows, int D, int E, int R, int W) { return Layout(rows, D, E, R, W, 2).total; }

int rows_for(int batch) { return batch <= 16 ? 16 : batch <= 32 ? 32 : batch <= 64 ? 64 : 0; }

int max_active_clusters(DType dtype, bool state_low, int rows, size_t smem) {
  const int cluster = kCluster;
  const LayersFn fn = layers_fn(dtype, state_low, rows);
  if (fn == nullptr || prepare(fn, smem) != cudaSuccess) return 0;
  cudaLaunchAttribute attr[2];
  const cudaLaunchConfig_t cfg = config(dim3(cluster), cluster, smem, nullptr, attr, false);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, reinterpret_cast<void*>(fn), &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

cudaError_t launch_layers(const LayersParams& p, DType dtype, cudaStream_t stream) {
  const int cluster = kCluster;
  if (p.batch == 0 || p.layers == 0) return cudaSuccess;
  const int rows = rows_for(p.batch);
  const LayersFn fn = layers_fn(dtype, p.state_low, rows);
  if (fn == nullptr) return cudaErrorInvalidValue;
  const size_t smem = layers_smem_bytes(rows, p.D, p.E, p.R, p.W);
  const cudaError_t err = prepare(fn, smem);
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute attr[2];
  const cudaLaunchConfig_t cfg = config(dim3(p.E / kCh), cluster, smem, stream, attr, p.pdl);
  return cudaLaunchKernelEx(&cfg, fn, p) == cudaSuccess ? cudaSuccess : cudaGetLastError();
}

cudaError_t launch_prep(const PrepParams& p, DType dtype, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  void (*fn)(PrepParams) = nullptr;
  if (dtype == kBFloat16)
    fn = p.x_f32 ? prep_kernel<__nv_bfloat16, float> : prep_kernel<__nv_bfloat16, __nv_bfloat16>;
  else
    fn = p.x_f32 ? prep_kernel<__half, float> : prep_kernel<__half, __half>;
  cudaLaunchAttribute attr[2];
  const cudaLaunchConfig_t cfg = config(dim3(p.batch), 1, 0, stream, attr, p.pdl);
  return cudaLaunchKernelEx(&cfg, fn, p) == cudaSuccess ? cudaSuccess : cudaGetLastError();
}

}  // namespace zoo_ml
