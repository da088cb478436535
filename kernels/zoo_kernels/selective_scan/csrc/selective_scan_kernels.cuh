// Mamba-1 selective scan, forward and backward CUDA kernels.
//
// Layout: one thread block per (batch row, group of kR channels of one B/C group). Inside a warp, each
// channel owns kLanes lanes and each lane owns kS states (kLanes * kS = N padded to a power of two), so
// every lane runs the recurrence h = exp(delta A) h + delta B u sequentially over time with its state in
// registers: no scan across threads, one exp2 per (t, d, n), nothing recomputed in the forward. Time is
// cut into chunks of kChunk steps; a chunk of u, delta, z, B, C is staged in shared memory (fp32) while
// the next one is in flight in registers. The sum y_t = sum_n C h over a channel's lanes goes through a
// [t][lane] transposition buffer every kTile steps. The forward keeps the state after every chunk; the
// backward walks the chunks in reverse, re-runs the forward recurrence of a chunk from that checkpoint
// (keeping the state at tile starts), and per tile re-runs it once more into registers before the
// reverse (adjoint) recurrence g_t = C_t dy_t + a_{t+1} g_{t+1}. Sums over states (for du, ddelta) use
// the same transposition; sums over channels (dB, dC) a block-wide buffer, then one fp32 atomic per
// (t, n, block).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "selective_scan.h"

namespace zoo_ss {

constexpr float kLog2e = 1.4426950408889634f;

template <int kNPad_, int kS_>
struct Cfg {
  static constexpr int kNPad = kNPad_;
  static constexpr int kS = kS_;                          // states per lane
  static constexpr int kLanes = kNPad / kS;               // lanes per channel
  static constexpr int kCPW = 32 / kLanes;                // channels per warp
  static constexpr int kWarps = kCPW >= 2 ? 16 / kCPW : 8;
  static constexpr int kR = kWarps * kCPW;                // channels per block
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kTc = kChunk;
  static constexpr int kTile = 16;                        // steps per transposition
  static constexpr int kTiles = kTc / kTile;
  static constexpr int kP = kTc + 4;                      // pitch of [row][t]: rows 16B aligned, 4 banks apart
  static constexpr int kRedP = 32 + 4;                    // pitch of the [t][lane] transposition buffer
  static constexpr int kOutIters = (kTile * kCPW + 31) / 32;  // transposed outputs per lane and tile
  static constexpr int kDbcP = kTile + 1;                 // pitch of [lane][t] dB/dC partials (odd: no conflicts)
  // Blocks per SM that the register allocation must allow (checked with -Xptxas -v: no or few spills).
  // 640 threads per SM: 96 registers at N = 16 with spills only outside the time loop (768: 80 and spills)
  static constexpr int kFwdMinBlocks = kNPad == 64 ? 1 : 640 / kThreads;
  static constexpr int kBwdMinBlocks = (kNPad == 16 || kNPad == 32) ? 2 : (kNPad == 8 ? 4 : 1);
  static_assert(kTile == 16 && kTc % kTile == 0, "finalize reductions assume 16-lane groups");
  static_assert(kLanes >= 4 && kLanes <= 32, "transposition sums read 4 lanes at a time");
};

// Forward: two states per lane from N = 8 on. Shared memory bounds these kernels (Nsight Compute on the
// H100: L1/shared pipe 86% busy, DRAM 20%, issue 50%): its cost is the bytes the lanes request, broadcast
// or not, at 128 B/clk/SM. Two states per lane halve the per-element share of the delta, delta*u loads and
// of the transposition (0.40 -> 0.32 ms at the 130M shape; benchmarks/NOTES_selective_scan.md).
template <int kNPad>
using FwdCfg = Cfg<kNPad, (kNPad >= 8 ? 2 : 1)>;
// Backward: one state per lane below N = 64 (two would need ~250 registers for the per-tile arrays).
template <int kNPad>
using BwdCfg = Cfg<kNPad, (kNPad == 64 ? 2 : 1)>;

template <int kNPad>
constexpr size_t fwd_smem_bytes() {
  using C = FwdCfg<kNPad>;
  return sizeof(float) * (4 * C::kR * C::kP + 2 * kNPad * C::kP + C::kWarps * C::kTile * C::kRedP + 2 * C::kR + 4);
}

template <int kNPad>
constexpr size_t bwd_smem_bytes() {
  using C = BwdCfg<kNPad>;
  return sizeof(float) * (4 * C::kR * C::kP + 2 * kNPad * C::kP + C::kWarps * 2 * C::kTile * C::kRedP +
                          C::kWarps * 2 * C::kS * 32 * C::kDbcP + 2 * C::kR + 4);
}

// zoo_kernels.selective_scan.cuda.backward_smem_bytes mirrors these (to refuse N > 32 where a block may not have
// 150 KB: compute capability 8.6, 8.9, 12.x): change it with them.
static_assert(bwd_smem_bytes<4>() == 37648 && bwd_smem_bytes<8>() == 57744 && bwd_smem_bytes<16>() == 97936 &&
                  bwd_smem_bytes<32>() == 97872 && bwd_smem_bytes<64>() == 150096,
              "update zoo_kernels.selective_scan.cuda.backward_smem_bytes");

// ---------------------------------------------------------------------------------------------------
// Element conversion and 16-byte packs

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

// Loads the nvalid (<= N) leading elements of ptr, zero-filling the rest; 16 bytes at once when allowed.
template <typename T>
__device__ __forceinline__ void load_pack(Pack<T>& p, const T* ptr, int nvalid, bool vec) {
  constexpr int N = Pack<T>::N;
  if (vec && nvalid >= N) {
    *reinterpret_cast<uint4*>(&p) = __ldg(reinterpret_cast<const uint4*>(ptr));
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p.v[i] = i < nvalid ? ptr[i] : from_f<T>(0.f);
  }
}

template <typename T>
__device__ __forceinline__ void store_pack(T* ptr, const float* src, int nvalid, bool vec) {
  constexpr int N = Pack<T>::N;
  if (nvalid <= 0) return;
  Pack<T> p;
#pragma unroll
  for (int i = 0; i < N; ++i) p.v[i] = from_f<T>(src[i]);
  if (vec && nvalid >= N) {
    *reinterpret_cast<uint4*>(ptr) = *reinterpret_cast<const uint4*>(&p);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < nvalid) ptr[i] = p.v[i];
  }
}

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ void st4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ float comp(const float4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// One MUFU.EX2; inputs are <= 0 in practice, and -inf gives 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1], with log1p(e) = 2 atanh(e / (2 + e)):
// an odd series in w <= 1/3, 8 terms (truncation < 2e-9). Branch-free, unlike log1pf, whose branches
// split the unrolled prologue into serial blocks; max relative error 3e-7 in fp32 over [-90, 90].
__device__ __forceinline__ float softplus_f(float x) {
  const float e = __expf(-fabsf(x));
  const float w = __fdividef(e, 2.f + e);
  const float w2 = w * w;
  float poly = 1.f / 15.f;
  poly = fmaf(poly, w2, 1.f / 13.f);
  poly = fmaf(poly, w2, 1.f / 11.f);
  poly = fmaf(poly, w2, 1.f / 9.f);
  poly = fmaf(poly, w2, 1.f / 7.f);
  poly = fmaf(poly, w2, 1.f / 5.f);
  poly = fmaf(poly, w2, 1.f / 3.f);
  poly = fmaf(poly, w2, 1.f);
  return fmaxf(x, 0.f) + 2.f * w * poly;
}
__device__ __forceinline__ float sigmoid_f(float x) { return __fdividef(1.f, 1.f + __expf(-x)); }

__device__ __forceinline__ void atomic_add4(float* dst, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(dst), v);
#else
  atomicAdd(dst, v.x);
  atomicAdd(dst + 1, v.y);
  atomicAdd(dst + 2, v.z);
  atomicAdd(dst + 3, v.w);
#endif
}

// Block coordinates shared by both kernels.
struct BlockPos {
  int b, grp, d0, nch;
};

template <int kR>
__device__ __forceinline__ BlockPos block_pos(const ScanParams& p) {
  const int bpg = (p.dim_per_group + kR - 1) / kR;
  BlockPos bp;
  bp.b = p.first_row + int(blockIdx.y);
  bp.grp = blockIdx.x / bpg;
  bp.d0 = bp.grp * p.dim_per_group + (blockIdx.x % bpg) * kR;
  bp.nch = min(kR, (bp.grp + 1) * p.dim_per_group - bp.d0);
  return bp;
}

// Bit t of the chunk's reset mask: position t0 + t starts a new document (never position 0).
__device__ __forceinline__ bool is_reset(int t, int L, int cur, int prev) { return t > 0 && t < L && cur != prev; }

// ---------------------------------------------------------------------------------------------------
// Forward

template <class Cf, bool kReset>
__device__ __forceinline__ void fwd_chunk(float (&h)[Cf::kS], const float (&A2)[Cf::kS],
                                          const float* s_delta, const float* s_du, float* s_y, float* s_g,
                                          const float* s_B, const float* s_C, float* red, uint64_t mask,
                                          int ntiles, int warp, int lane) {
  constexpr int kS = Cf::kS, kLanes = Cf::kLanes, kCPW = Cf::kCPW, kTile = Cf::kTile, kP = Cf::kP,
                kRedP = Cf::kRedP;
  const int c = lane / kLanes, nl = lane % kLanes, ch = warp * kCPW + c;
  const float* dl = s_delta + ch * kP;
  const float* du = s_du + ch * kP;
  for (int tile = 0; tile < ntiles; ++tile) {
    const int tb = tile * kTile;
    const uint32_t tm = kReset ? uint32_t(mask >> tb) : 0u;
    float pacc[kTile];
#pragma unroll
    for (int j4 = 0; j4 < kTile; j4 += 4) {
      const float4 d4 = ld4(dl + tb + j4);
      const float4 u4 = ld4(du + tb + j4);
      float4 B4[kS], C4[kS];
#pragma unroll
      for (int s = 0; s < kS; ++s) {
        B4[s] = ld4(s_B + (nl + s * kLanes) * kP + tb + j4);
        C4[s] = ld4(s_C + (nl + s * kLanes) * kP + tb + j4);
      }
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const float dlt = comp(d4, jj), dut = comp(u4, jj);
        float acc = 0.f;
#pragma unroll
        for (int s = 0; s < kS; ++s) {
          float a = fast_exp2(dlt * A2[s]);
          if (kReset && ((tm >> (j4 + jj)) & 1u)) a = 0.f;
          h[s] = fmaf(a, h[s], dut * comp(B4[s], jj));
          acc = fmaf(comp(C4[s], jj), h[s], acc);
        }
        pacc[j4 + jj] = acc;
      }
    }
#pragma unroll
    for (int j = 0; j < kTile; ++j) red[j * kRedP + lane] = pacc[j];
    __syncwarp();
#pragma unroll
    for (int it = 0; it < Cf::kOutIters; ++it) {
      const int o = lane + it * 32;
      if ((kTile * kCPW) % 32 == 0 || o < kTile * kCPW) {
        const int co = o / kTile, jo = o % kTile;
        float y = 0.f;
#pragma unroll
        for (int l4 = 0; l4 < kLanes; l4 += 4) {
          const float4 v = ld4(red + jo * kRedP + co * kLanes + l4);
          y += (v.x + v.y) + (v.z + v.w);
        }
        const int idx = (warp * kCPW + co) * kP + tb + jo;
        const float yf = y + s_y[idx];
        s_y[idx] = yf;
        s_g[idx] *= yf;
      }
    }
    __syncwarp();
  }
}

template <typename T, int kNPad>
__global__ void __launch_bounds__(FwdCfg<kNPad>::kThreads, FwdCfg<kNPad>::kFwdMinBlocks)
    scan_fwd_kernel(const ScanParams p) {
  using Cf = FwdCfg<kNPad>;
  constexpr int kVec = Pack<T>::N;
  constexpr int kTc = Cf::kTc, kP = Cf::kP, kR = Cf::kR, kThreads = Cf::kThreads, kS = Cf::kS,
                kLanes = Cf::kLanes, kCPW = Cf::kCPW, kTile = Cf::kTile;
  constexpr int kVPR = kTc / kVec;  // packs per row and chunk
  constexpr int kXItems = kR * kVPR, kXPer = (kXItems + kThreads - 1) / kThreads;
  constexpr int kBCItems = kNPad * kVPR, kBCPer = (kBCItems + kThreads - 1) / kThreads;

  extern __shared__ float4 smem_f4[];
  float* s_delta = reinterpret_cast<float*>(smem_f4);  // [kR][kP] softplus(delta + bias), 0 past L
  float* s_du = s_delta + kR * kP;                      // delta * u
  float* s_y = s_du + kR * kP;                          // D u, then y + D u
  float* s_g = s_y + kR * kP;                           // silu(z), then the output
  float* s_B = s_g + kR * kP;                           // [kNPad][kP]
  float* s_C = s_B + kNPad * kP;
  float* s_red = s_C + kNPad * kP;                      // [kWarps][kTile][kRedP]
  float* s_Dv = s_red + Cf::kWarps * kTile * Cf::kRedP;
  float* s_bias = s_Dv + kR;
  uint32_t* s_mask = reinterpret_cast<uint32_t*>(s_bias + kR);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const BlockPos bp = block_pos<kR>(p);
  const int L = p.len, N = p.nstate, Dm = p.dim, b = bp.b, d0 = bp.d0, nch = bp.nch;
  const int Ls = p.row_len;  // channel stride: the whole row, of which this block scans one segment
  const bool vec = p.vec_ok;
  const size_t seg0 = size_t(b % p.nseg) * L, r = size_t(b / p.nseg);
  const size_t row0 = (r * Dm + d0) * Ls + seg0;
  const T* u = static_cast<const T*>(p.u) + row0;
  const T* delta = static_cast<const T*>(p.delta) + row0;
  const T* z = p.z ? static_cast<const T*>(p.z) + row0 : nullptr;
  const size_t bc0 = (r * p.ngroups + bp.grp) * N * Ls + seg0;
  const T* Bg = static_cast<const T*>(p.B) + bc0;
  const T* Cg = static_cast<const T*>(p.C) + bc0;
  const int* seq = p.seq_idx ? p.seq_idx + r * Ls + seg0 : nullptr;
  T* out = static_cast<T*>(p.out) + row0;
  T* ysave = p.y_save ? static_cast<T*>(p.y_save) + row0 : nullptr;

  if (tid < kR) {
    s_Dv[tid] = (p.D && tid < nch) ? p.D[d0 + tid] : 0.f;
    s_bias[tid] = (p.delta_bias && tid < nch) ? p.delta_bias[d0 + tid] : 0.f;
  }
  if (tid < 2) s_mask[tid] = 0u;

  const int c = lane / kLanes, nl = lane % kLanes, ch = warp * kCPW + c, d = d0 + ch;
  float A2[kS], h[kS];
  bool sok[kS];
#pragma unroll
  for (int s = 0; s < kS; ++s) {
    const int n = nl + s * kLanes;
    sok[s] = ch < nch && n < N;
    A2[s] = sok[s] ? p.A[size_t(d) * N + n] * kLog2e : 0.f;
    h[s] = (sok[s] && p.h0) ? p.h0[(size_t(b) * Dm + d) * N + n] : 0.f;
  }

  Pack<T> pu[kXPer], pd[kXPer], pz[kXPer], pB[kBCPer], pC[kBCPer];
  int sq_cur = 0, sq_prev = 0;

  auto prefetch = [&](int t0) {
#pragma unroll
    for (int k = 0; k < kXPer; ++k) {
      const int i = tid + k * kThreads;
      if (i < kXItems) {
        const int row = i / kVPR, tl = (i % kVPR) * kVec;
        const int nv = row < nch ? L - t0 - tl : 0;
        const size_t off = size_t(row) * Ls + t0 + tl;
        load_pack(pu[k], u + off, nv, vec);
        load_pack(pd[k], delta + off, nv, vec);
        if (z) load_pack(pz[k], z + off, nv, vec);
      }
    }
#pragma unroll
    for (int k = 0; k < kBCPer; ++k) {
      const int i = tid + k * kThreads;
      if (i < kBCItems) {
        const int row = i / kVPR, tl = (i % kVPR) * kVec;
        const int nv = row < N ? L - t0 - tl : 0;
        const size_t off = size_t(row) * Ls + t0 + tl;
        load_pack(pB[k], Bg + off, nv, vec);
        load_pack(pC[k], Cg + off, nv, vec);
      }
    }
    if (seq && tid < kTc) {
      const int t = t0 + tid;
      sq_cur = t < L ? seq[t] : 0;
      sq_prev = (t > 0 && t < L) ? seq[t - 1] : sq_cur;
    }
  };

  auto commit = [&](int t0) {
#pragma unroll
    for (int k = 0; k < kXPer; ++k) {
      const int i = tid + k * kThreads;
      if (i < kXItems) {
        const int row = i / kVPR, tl = (i % kVPR) * kVec;
        const float Dv = s_Dv[row], bias = s_bias[row];
        alignas(16) float fd[kVec], fdu[kVec], fy[kVec], fg[kVec];
        // flag tests outside the element loops: the elements' math interleaves
#pragma unroll
        for (int e = 0; e < kVec; ++e) fd[e] = to_f(pd[k].v[e]) + bias;
        if (p.softplus) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) fd[e] = softplus_f(fd[e]);
        }
#pragma unroll
        for (int e = 0; e < kVec; ++e) fg[e] = 1.f;
        if (z) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float zz = to_f(pz[k].v[e]);
            fg[e] = zz * sigmoid_f(zz);
          }
        }
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const bool ok = row < nch && t0 + tl + e < L;
          const float uu = ok ? to_f(pu[k].v[e]) : 0.f;
          fd[e] = ok ? fd[e] : 0.f;
          fdu[e] = fd[e] * uu;
          fy[e] = Dv * uu;
        }
        const int base = row * kP + tl;
#pragma unroll
        for (int e = 0; e < kVec; e += 4) {
          st4(s_delta + base + e, ld4(fd + e));
          st4(s_du + base + e, ld4(fdu + e));
          st4(s_y + base + e, ld4(fy + e));
          st4(s_g + base + e, ld4(fg + e));
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kBCPer; ++k) {
      const int i = tid + k * kThreads;
      if (i < kBCItems) {
        const int row = i / kVPR, tl = (i % kVPR) * kVec;
        alignas(16) float fb[kVec], fc[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) fb[e] = to_f(pB[k].v[e]), fc[e] = to_f(pC[k].v[e]);
#pragma unroll
        for (int e = 0; e < kVec; e += 4) {
          st4(s_B + row * kP + tl + e, ld4(fb + e));
          st4(s_C + row * kP + tl + e, ld4(fc + e));
        }
      }
    }
    if (seq && tid < kTc) {
      const unsigned m = __ballot_sync(0xffffffffu, is_reset(t0 + tid, L, sq_cur, sq_prev));
      if (lane == 0) s_mask[warp] = m;
    }
  };

  prefetch(0);
  for (int k = 0; k < p.nchunks; ++k) {
    const int t0 = k * kTc;
    __syncthreads();
    commit(t0);
    __syncthreads();
    if (k + 1 < p.nchunks) prefetch(t0 + kTc);
    const uint64_t mask = (uint64_t(s_mask[1]) << 32) | s_mask[0];
    const int ntiles = min(Cf::kTiles, (L - t0 + kTile - 1) / kTile);
    float* red = s_red + warp * kTile * Cf::kRedP;
    if (mask)
      fwd_chunk<Cf, true>(h, A2, s_delta, s_du, s_y, s_g, s_B, s_C, red, mask, ntiles, warp, lane);
    else
      fwd_chunk<Cf, false>(h, A2, s_delta, s_du, s_y, s_g, s_B, s_C, red, mask, ntiles, warp, lane);
    if (p.ckpt && k + 1 < p.nchunks) {
#pragma unroll
      for (int s = 0; s < kS; ++s)
        if (sok[s]) p.ckpt[((size_t(b) * (p.nchunks - 1) + k) * Dm + d) * N + nl + s * kLanes] = h[s];
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kXPer; ++kk) {
      const int i = tid + kk * kThreads;
      if (i < kXItems) {
        const int row = i / kVPR, tl = (i % kVPR) * kVec;
        const int nv = row < nch ? L - t0 - tl : 0;
        const size_t off = size_t(row) * Ls + t0 + tl;
        store_pack(out + off, s_g + row * kP + tl, nv, vec);
        if (ysave) store_pack(ysave + off, s_y + row * kP + tl, nv, vec);
      }
    }
  }
  if (p.final_state) {
#pragma unroll
    for (int s = 0; s < kS; ++s)
      if (sok[s]) p.final_state[(size_t(b) * Dm + d) * N + nl + s * kLanes] = h[s];
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward

template <class Cf>
struct BwdLane {
  static constexpr int kS = Cf::kS, kOut = Cf::kOutIters;
  float A2[kS], An[kS], carry[kS], dA[kS];
  float dD[kOut], ddb[kOut];
};

struct BwdSmem {
  float *delta, *du, *u, *dy, *B, *C, *red, *dbc, *Dv;
};

template <class Cf, bool kReset>
__device__ __forceinline__ void bwd_chunk(BwdLane<Cf>& ln, const float (&hstart)[Cf::kS],
                                          const BwdSmem& sm, uint64_t mask, int ntiles, int t0, int L,
                                          int N, int len_pad, bool softplus, float* dBg, float* dCg,
                                          int warp, int lane, int tid) {
  constexpr int kNPad = Cf::kNPad;
  constexpr int kS = Cf::kS, kLanes = Cf::kLanes, kCPW = Cf::kCPW, kTile = Cf::kTile, kP = Cf::kP,
                kRedP = Cf::kRedP, kTiles = Cf::kTiles, kDbcP = Cf::kDbcP;
  const int c = lane / kLanes, nl = lane % kLanes, ch = warp * kCPW + c;
  const float* dl = sm.delta + ch * kP;
  const float* du = sm.du + ch * kP;
  const float* dyp = sm.dy + ch * kP;

  // Forward sweep over the chunk: the state at the start of every tile.
  float hsub[kTiles][kS];
  {
    float h[kS];
#pragma unroll
    for (int s = 0; s < kS; ++s) h[s] = hstart[s];
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile) {
#pragma unroll
      for (int s = 0; s < kS; ++s) hsub[tile][s] = h[s];
      if (tile + 1 < ntiles) {  // the last tile's end state is not needed
        const int tb = tile * kTile;
        const uint32_t tm = kReset ? uint32_t(mask >> tb) : 0u;
#pragma unroll
        for (int j4 = 0; j4 < kTile; j4 += 4) {
          const float4 d4 = ld4(dl + tb + j4), u4 = ld4(du + tb + j4);
#pragma unroll
          for (int s = 0; s < kS; ++s) {
            const float4 B4 = ld4(sm.B + (nl + s * kLanes) * kP + tb + j4);
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
              float a = fast_exp2(comp(d4, jj) * ln.A2[s]);
              if (kReset && ((tm >> (j4 + jj)) & 1u)) a = 0.f;
              h[s] = fmaf(a, h[s], comp(u4, jj) * comp(B4, jj));
            }
          }
        }
      }
    }
  }

#pragma unroll
  for (int tile = kTiles - 1; tile >= 0; --tile) {
    if (tile >= ntiles) continue;  // block-uniform: the tile lies past the end of the sequence
    const int tb = tile * kTile;
    const uint32_t tm = kReset ? uint32_t(mask >> tb) : 0u;
    float a[kS][kTile], hb[kS][kTile];
    {
      float h[kS];
#pragma unroll
      for (int s = 0; s < kS; ++s) h[s] = hsub[tile][s];
#pragma unroll
      for (int j4 = 0; j4 < kTile; j4 += 4) {
        const float4 d4 = ld4(dl + tb + j4), u4 = ld4(du + tb + j4);
#pragma unroll
        for (int s = 0; s < kS; ++s) {
          const float4 B4 = ld4(sm.B + (nl + s * kLanes) * kP + tb + j4);
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            float av = fast_exp2(comp(d4, jj) * ln.A2[s]);
            if (kReset && ((tm >> (j4 + jj)) & 1u)) av = 0.f;
            h[s] = fmaf(av, h[s], comp(u4, jj) * comp(B4, jj));
            a[s][j4 + jj] = av;
            hb[s][j4 + jj] = h[s];
          }
        }
      }
    }
    float* red0 = sm.red + (warp * 2) * kTile * kRedP;
    float* red1 = red0 + kTile * kRedP;
    float* dbcB = sm.dbc + (warp * 2 * kS) * 32 * kDbcP;
    float* dbcC = dbcB + kS * 32 * kDbcP;
#pragma unroll
    for (int j4 = kTile - 4; j4 >= 0; j4 -= 4) {
      const float4 d4 = ld4(dl + tb + j4), u4 = ld4(du + tb + j4), y4 = ld4(dyp + tb + j4);
      float4 B4[kS], C4[kS];
#pragma unroll
      for (int s = 0; s < kS; ++s) {
        B4[s] = ld4(sm.B + (nl + s * kLanes) * kP + tb + j4);
        C4[s] = ld4(sm.C + (nl + s * kLanes) * kP + tb + j4);
      }
#pragma unroll
      for (int jj = 3; jj >= 0; --jj) {
        const int j = j4 + jj;
        const float dlt = comp(d4, jj), dut = comp(u4, jj), dyt = comp(y4, jj);
        float s1 = 0.f, s2 = 0.f;
#pragma unroll
        for (int s = 0; s < kS; ++s) {
          const float g = fmaf(comp(C4[s], jj), dyt, ln.carry[s]);  // dL/dh_t
          const float hprev = j > 0 ? hb[s][j > 0 ? j - 1 : 0] : hsub[tile][s];
          const float q = g * (a[s][j] * hprev);                    // dL/da_t * a_t
          ln.dA[s] = fmaf(q, dlt, ln.dA[s]);
          s1 = fmaf(g, comp(B4[s], jj), s1);
          s2 = fmaf(q, ln.An[s], s2);
          dbcB[(s * 32 + lane) * kDbcP + j] = g * dut;
          dbcC[(s * 32 + lane) * kDbcP + j] = dyt * hb[s][j];
          ln.carry[s] = a[s][j] * g;
        }
        red0[j * kRedP + lane] = s1;
        red1[j * kRedP + lane] = s2;
      }
    }
    __syncthreads();
    // du = delta * sum_n g B + D dy; ddelta = u * sum_n g B + sum_n q A (times softplus').
#pragma unroll
    for (int it = 0; it < Cf::kOutIters; ++it) {
      const int o = lane + it * 32;
      if ((kTile * kCPW) % 32 == 0 || o < kTile * kCPW) {
        const int co = o / kTile, jo = o % kTile;
        float S1 = 0.f, S2 = 0.f;
#pragma unroll
        for (int l4 = 0; l4 < kLanes; l4 += 4) {
          const float4 v1 = ld4(red0 + jo * kRedP + co * kLanes + l4);
          const float4 v2 = ld4(red1 + jo * kRedP + co * kLanes + l4);
          S1 += (v1.x + v1.y) + (v1.z + v1.w);
          S2 += (v2.x + v2.y) + (v2.z + v2.w);
        }
        const int cho = warp * kCPW + co, idx = cho * kP + tb + jo;
        const float dlt = sm.delta[idx], uu = sm.u[idx], dyt = sm.dy[idx];
        const float dU = fmaf(dlt, S1, sm.Dv[cho] * dyt);
        float dDl = fmaf(uu, S1, S2);
        if (softplus) dDl *= -expm1f(-dlt);  // sigmoid(x) = 1 - exp(-softplus(x))
        if (t0 + tb + jo < L) {
          ln.dD[it] = fmaf(dyt, uu, ln.dD[it]);
          ln.ddb[it] += dDl;
        }
        sm.u[idx] = dU;
        sm.dy[idx] = dDl;
      }
    }
    // dB, dC: sum the block's channels, then one 16-byte atomic per (4 steps, n).
    constexpr int kQ4 = kTile / 4, kQ = 2 * kNPad * kQ4;
#pragma unroll
    for (int o0 = 0; o0 < kQ; o0 += Cf::kThreads) {
      const int o = o0 + tid;
      if (kQ % Cf::kThreads == 0 || o < kQ) {
        const int j4 = o % kQ4, n = (o / kQ4) % kNPad, q = o / (kQ4 * kNPad);
        const int s = n / kLanes, nn = n % kLanes;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int w = 0; w < Cf::kWarps; ++w) {
#pragma unroll
          for (int cc = 0; cc < kCPW; ++cc) {
            const float* src = sm.dbc + (((w * 2 + q) * kS + s) * 32 + cc * kLanes + nn) * kDbcP + j4 * 4;
            acc.x += src[0];
            acc.y += src[1];
            acc.z += src[2];
            acc.w += src[3];
          }
        }
        const int t = t0 + tb + j4 * 4;
        if (n < N && t < L) atomic_add4((q ? dCg : dBg) + size_t(n) * len_pad + t, acc);
      }
    }
    __syncthreads();
  }
}

template <typename T, int kNPad>
__global__ void __launch_bounds__(BwdCfg<kNPad>::kThreads, BwdCfg<kNPad>::kBwdMinBlocks)
    scan_bwd_kernel(const ScanParams p) {
  using Cf = BwdCfg<kNPad>;
  constexpr int kVec = Pack<T>::N;
  constexpr int kTc = Cf::kTc, kP = Cf::kP, kR = Cf::kR, kThreads = Cf::kThreads, kS = Cf::kS,
                kLanes = Cf::kLanes, kCPW = Cf::kCPW, kTile = Cf::kTile;
  constexpr int kVPR = kTc / kVec;
  constexpr int kXItems = kR * kVPR, kXPer = (kXItems + kThreads - 1) / kThreads;
  constexpr int kBCItems = kNPad * kVPR, kBCPer = (kBCItems + kThreads - 1) / kThreads;

  extern __shared__ float4 smem_f4[];
  BwdSmem sm;
  sm.delta = reinterpret_cast<float*>(smem_f4);  // [kR][kP]
  sm.du = sm.delta + kR * kP;                    // delta * u
  sm.u = sm.du + kR * kP;                        // u, then du
  sm.dy = sm.u + kR * kP;                        // dout * silu(z), then ddelta
  sm.B = sm.dy + kR * kP;                        // [kNPad][kP]
  sm.C = sm.B + kNPad * kP;
  sm.red = sm.C + kNPad * kP;                    // [kWarps][2][kTile][kRedP]
  sm.dbc = sm.red + Cf::kWarps * 2 * kTile * Cf::kRedP;  // [kWarps][2][kS][32][kDbcP]
  sm.Dv = sm.dbc + Cf::kWarps * 2 * kS * 32 * Cf::kDbcP;
  float* s_bias = sm.Dv + kR;
  uint32_t* s_mask = reinterpret_cast<uint32_t*>(s_bias + kR);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const BlockPos bp = block_pos<kR>(p);
  const int L = p.len, N = p.nstate, Dm = p.dim, b = bp.b, d0 = bp.d0, nch = bp.nch;
  const int Ls = p.row_len;  // channel stride: the whole row, of which this block scans one segment
  const bool vec = p.vec_ok;
  const size_t seg0 = size_t(b % p.nseg) * L, r = size_t(b / p.nseg);
  const size_t row0 = (r * Dm + d0) * Ls + seg0;
  const T* u = static_cast<const T*>(p.u) + row0;
  const T* delta = static_cast<const T*>(p.delta) + row0;
  const T* z = p.z ? static_cast<const T*>(p.z) + row0 : nullptr;
  const T* ysave = p.z ? static_cast<const T*>(p.y_save) + row0 : nullptr;
  const T* dout = static_cast<const T*>(p.dout) + row0;
  T* dz = p.z ? static_cast<T*>(p.dz) + row0 : nullptr;
  T* du_out = static_cast<T*>(p.du) + row0;
  T* dd_out = static_cast<T*>(p.ddelta) + row0;
  const size_t bc0 = (r * p.ngroups + bp.grp) * N * Ls + seg0;
  const T* Bg = static_cast<const T*>(p.B) + bc0;
  const T* Cg = static_cast<const T*>(p.C) + bc0;
  const size_t dbc0 = (r * p.ngroups + bp.grp) * N * p.len_pad + seg0;
  float* dBg = p.dB + dbc0;
  float* dCg = p.dC + dbc0;
  const int* seq = p.seq_idx ? p.seq_idx + r * Ls + seg0 : nullptr;

  if (tid < kR) {
    sm.Dv[tid] = (p.D && tid < nch) ? p.D[d0 + tid] : 0.f;
    s_bias[tid] = (p.delta_bias && tid < nch) ? p.delta_bias[d0 + tid] : 0.f;
  }
  if (tid < 2) s_mask[tid] = 0u;

  const int c = lane / kLanes, nl = lane % kLanes, ch = warp * kCPW + c, d = d0 + ch;
  BwdLane<Cf> ln;
  bool sok[kS];
#pragma unroll
  for (int s = 0; s < kS; ++s) {
    const int n = nl + s * kLanes;
    sok[s] = ch < nch && n < N;
    ln.An[s] = sok[s] ? p.A[size_t(d) * N + n] : 0.f;
    ln.A2[s] = ln.An[s] * kLog2e;
    ln.carry[s] = (sok[s] && p.dfinal) ? p.dfinal[(size_t(b) * Dm + d) * N + n] : 0.f;
    ln.dA[s] = 0.f;
  }
#pragma unroll
  for (int it = 0; it < Cf::kOutIters; ++it) ln.dD[it] = 0.f, ln.ddb[it] = 0.f;

  Pack<T> pu[kXPer], pd[kXPer], pz[kXPer], py[kXPer], pg[kXPer], pB[kBCPer], pC[kBCPer];
  int sq_cur = 0, sq_prev = 0;

  auto prefetch = [&](int t0) {
#pragma unroll
    for (int k = 0; k < kXPer; ++k) {
      const int i = tid + k * kThreads;
      if (i < kXItems) {
        const int row = i / kVPR, tl = (i % kVPR) * kVec;
        const int nv = row < nch ? L - t0 - tl : 0;
        const size_t off = size_t(row) * Ls + t0 + tl;
        load_pack(pu[k], u + off, nv, vec);
        load_pack(pd[k], delta + off, nv, vec);
        load_pack(pg[k], dout + off, nv, vec);
        if (z) {
          load_pack(pz[k], z + off, nv, vec);
          load_pack(py[k], ysave + off, nv, vec);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kBCPer; ++k) {
      const int i = tid + k * kThreads;
      if (i < kBCItems) {
        const int row = i / kVPR, tl = (i % kVPR) * kVec;
        const int nv = row < N ? L - t0 - tl : 0;
        const size_t off = size_t(row) * Ls + t0 + tl;
        load_pack(pB[k], Bg + off, nv, vec);
        load_pack(pC[k], Cg + off, nv, vec);
      }
    }
    if (seq && tid < kTc) {
      const int t = t0 + tid;
      sq_cur = t < L ? seq[t] : 0;
      sq_prev = (t > 0 && t < L) ? seq[t - 1] : sq_cur;
    }
  };

  auto commit = [&](int t0) {
#pragma unroll
    for (int k = 0; k < kXPer; ++k) {
      const int i = tid + k * kThreads;
      if (i < kXItems) {
        const int row = i / kVPR, tl = (i % kVPR) * kVec;
        const float bias = s_bias[row];
        alignas(16) float fd[kVec], fdu[kVec], fu[kVec], fdy[kVec], fdz[kVec];
        // flag tests outside the element loops: the elements' math interleaves
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          fd[e] = to_f(pd[k].v[e]) + bias;
          fdy[e] = to_f(pg[k].v[e]);
        }
        if (p.softplus) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) fd[e] = softplus_f(fd[e]);
        }
        if (z) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float zz = to_f(pz[k].v[e]), sg = sigmoid_f(zz);
            fdz[e] = fdy[e] * to_f(py[k].v[e]) * sg * fmaf(zz, 1.f - sg, 1.f);
            fdy[e] *= zz * sg;
          }
        }
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const bool ok = row < nch && t0 + tl + e < L;
          const float uu = ok ? to_f(pu[k].v[e]) : 0.f;
          fd[e] = ok ? fd[e] : 0.f;
          fdy[e] = ok ? fdy[e] : 0.f;
          fdu[e] = fd[e] * uu;
          fu[e] = uu;
        }
        const int base = row * kP + tl;
#pragma unroll
        for (int e = 0; e < kVec; e += 4) {
          st4(sm.delta + base + e, ld4(fd + e));
          st4(sm.du + base + e, ld4(fdu + e));
          st4(sm.u + base + e, ld4(fu + e));
          st4(sm.dy + base + e, ld4(fdy + e));
        }
        if (z) store_pack(dz + size_t(row) * Ls + t0 + tl, fdz, row < nch ? L - t0 - tl : 0, vec);
      }
    }
#pragma unroll
    for (int k = 0; k < kBCPer; ++k) {
      const int i = tid + k * kThreads;
      if (i < kBCItems) {
        const int row = i / kVPR, tl = (i % kVPR) * kVec;
        alignas(16) float fb[kVec], fc[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) fb[e] = to_f(pB[k].v[e]), fc[e] = to_f(pC[k].v[e]);
#pragma unroll
        for (int e = 0; e < kVec; e += 4) {
          st4(sm.B + row * kP + tl + e, ld4(fb + e));
          st4(sm.C + row * kP + tl + e, ld4(fc + e));
        }
      }
    }
    if (seq && tid < kTc) {
      const unsigned m = __ballot_sync(0xffffffffu, is_reset(t0 + tid, L, sq_cur, sq_prev));
      if (lane == 0) s_mask[warp] = m;
    }
  };

  prefetch((p.nchunks - 1) * kTc);
  for (int k = p.nchunks - 1; k >= 0; --k) {
    const int t0 = k * kTc;
    float hstart[kS];
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      const int n = nl + s * kLanes;
      float v = 0.f;
      if (sok[s]) {
        if (k > 0)
          v = p.ckpt[((size_t(b) * (p.nchunks - 1) + k - 1) * Dm + d) * N + n];
        else if (p.h0)
          v = p.h0[(size_t(b) * Dm + d) * N + n];
      }
      hstart[s] = v;
    }
    __syncthreads();
    commit(t0);
    __syncthreads();
    if (k > 0) prefetch(t0 - kTc);
    const uint64_t mask = (uint64_t(s_mask[1]) << 32) | s_mask[0];
    const int ntiles = min(Cf::kTiles, (L - t0 + kTile - 1) / kTile);
    if (mask)
      bwd_chunk<Cf, true>(ln, hstart, sm, mask, ntiles, t0, L, N, p.len_pad, p.softplus, dBg, dCg, warp,
                             lane, tid);
    else
      bwd_chunk<Cf, false>(ln, hstart, sm, mask, ntiles, t0, L, N, p.len_pad, p.softplus, dBg, dCg, warp,
                              lane, tid);
    // bwd_chunk ends with a block barrier: du and ddelta of the chunk are complete in shared memory.
#pragma unroll
    for (int kk = 0; kk < kXPer; ++kk) {
      const int i = tid + kk * kThreads;
      if (i < kXItems) {
        const int row = i / kVPR, tl = (i % kVPR) * kVec;
        const int nv = row < nch ? L - t0 - tl : 0;
        const size_t off = size_t(row) * Ls + t0 + tl;
        store_pack(du_out + off, sm.u + row * kP + tl, nv, vec);
        store_pack(dd_out + off, sm.dy + row * kP + tl, nv, vec);
      }
    }
  }

#pragma unroll
  for (int s = 0; s < kS; ++s) {
    if (!sok[s]) continue;
    const int n = nl + s * kLanes;
    if (p.dh0) p.dh0[(size_t(b) * Dm + d) * N + n] = ln.carry[s];
    atomicAdd(p.dA + size_t(d) * N + n, ln.dA[s]);
  }
#pragma unroll
  for (int it = 0; it < Cf::kOutIters; ++it) {
    float v1 = ln.dD[it], v2 = ln.ddb[it];
#pragma unroll
    for (int off = kTile / 2; off > 0; off >>= 1) {  // sum over the 16 lanes that share a channel
      v1 += __shfl_xor_sync(0xffffffffu, v1, off);
      v2 += __shfl_xor_sync(0xffffffffu, v2, off);
    }
    const int o = lane + it * 32, cho = warp * kCPW + o / kTile;
    if (o % kTile == 0 && o < kTile * kCPW && cho < nch) {
      if (p.dD) atomicAdd(p.dD + d0 + cho, v1);
      if (p.ddelta_bias) atomicAdd(p.ddelta_bias + d0 + cho, v2);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Launchers

// Raises the kernel's dynamic shared-memory limit once per device. `done` must be owned by the caller's
// instantiation: every kernel here has the same function-pointer type.
template <typename Kernel>
cudaError_t raise_smem_limit(Kernel kernel, size_t smem, bool (&done)[64]) {
  if (smem <= 48 * 1024) return cudaSuccess;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 64 && done[dev]) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err == cudaSuccess && dev < 64) done[dev] = true;
  return err;
}

// Launches `kernel` over p's block rows (p.batch of them), at most 65535 in gridDim.y a launch: the rows past it take
// further launches, ScanParams.first_row saying where each starts.
template <typename Kernel>
cudaError_t launch_rows(Kernel kernel, const ScanParams& p, int grid_x, int threads, size_t smem,
                        cudaStream_t stream) {
  for (int r0 = 0; r0 < p.batch; r0 += kMaxGridY) {
    ScanParams q = p;
    q.first_row = r0;
    const int rows = p.batch - r0 < kMaxGridY ? p.batch - r0 : kMaxGridY;
    kernel<<<dim3(grid_x, rows), threads, smem, stream>>>(q);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T, int kNPad>
cudaError_t launch_fwd_n(const ScanParams& p, cudaStream_t stream) {
  using Cf = FwdCfg<kNPad>;
  constexpr size_t smem = fwd_smem_bytes<kNPad>();
  auto kernel = &scan_fwd_kernel<T, kNPad>;
  static bool done[64] = {false};
  cudaError_t err = raise_smem_limit(kernel, smem, done);
  if (err != cudaSuccess) return err;
  const int bpg = (p.dim_per_group + Cf::kR - 1) / Cf::kR;
  return launch_rows(kernel, p, p.ngroups * bpg, Cf::kThreads, smem, stream);
}

template <typename T, int kNPad>
cudaError_t launch_bwd_n(const ScanParams& p, cudaStream_t stream) {
  using Cf = BwdCfg<kNPad>;
  constexpr size_t smem = bwd_smem_bytes<kNPad>();
  auto kernel = &scan_bwd_kernel<T, kNPad>;
  static bool done[64] = {false};
  cudaError_t err = raise_smem_limit(kernel, smem, done);
  if (err != cudaSuccess) return err;
  const int bpg = (p.dim_per_group + Cf::kR - 1) / Cf::kR;
  return launch_rows(kernel, p, p.ngroups * bpg, Cf::kThreads, smem, stream);
}

template <typename T>
cudaError_t scan_fwd_typed(const ScanParams& p, cudaStream_t stream) {
  if (p.nstate <= 4) return launch_fwd_n<T, 4>(p, stream);
  if (p.nstate <= 8) return launch_fwd_n<T, 8>(p, stream);
  if (p.nstate <= 16) return launch_fwd_n<T, 16>(p, stream);
  if (p.nstate <= 32) return launch_fwd_n<T, 32>(p, stream);
  if (p.nstate <= 64) return launch_fwd_n<T, 64>(p, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t scan_bwd_typed(const ScanParams& p, cudaStream_t stream) {
  if (p.nstate <= 4) return launch_bwd_n<T, 4>(p, stream);
  if (p.nstate <= 8) return launch_bwd_n<T, 8>(p, stream);
  if (p.nstate <= 16) return launch_bwd_n<T, 16>(p, stream);
  if (p.nstate <= 32) return launch_bwd_n<T, 32>(p, stream);
  if (p.nstate <= 64) return launch_bwd_n<T, 64>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace zoo_ss
