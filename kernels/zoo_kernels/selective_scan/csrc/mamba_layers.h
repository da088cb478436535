// A run of Mamba-1 blocks (no MLP) decoding one token, in one persistent launch (mamba_layers.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace zoo_ml {

enum DType { kBFloat16 = 1, kFloat16 = 2 };

constexpr int kThreads = 256;  // threads per CTA
constexpr int kCh = 16;        // d_inner channels per CTA: the grid is d_inner / kCh CTAs, all resident at once
constexpr int kN = 16;         // d_state
constexpr int kFeat = 8;       // d_model features of out_proj per CTA (d_model = kFeat x CTAs: expand 2)
constexpr int kCluster = 8;    // CTAs per cluster: x_proj's parts and out_proj's inputs are shared within one
constexpr int kSsRows = 64;    // the row pitch of the per-CTA sums of squares (ss: [parts][kSsRows])
constexpr int kStamps = 15;    // phase stamps per layer and CTA (LayersParams::stamps)

// One layer's tensors (device pointers, as the kernel reads them from a table in global memory: 12 x 8 bytes).
struct LayerPtrs {
  const void* norm_w;   // [D] (T): the block's RMSNorm weight
  const void* in_w;     // [2E, D] (T)
  const float* conv_w;  // [E, W] fp32
  const float* conv_b;  // [E] fp32 or null
  const void* x_w;      // [R + 2N, E] (T)
  const void* dt_w;     // [E, R] (T)
  const float* dt_b;    // [E] fp32 or null
  const float* A;       // [E, N] fp32 (-exp(A_log))
  const float* D;       // [E] fp32 or null
  const void* out_w;    // [D, E] (T)
  float* conv_state;    // [batch, E, W - 1] fp32, contiguous, updated in place
  void* state;          // [batch, E, N] fp32 or T, contiguous, updated in place
};

struct LayersParams {
  int batch, D, E, R, W, layers, in_parts;
  float eps;
  bool res_round;          // the residual stream is kept in T: round every sum to T (residual_in_fp32 off)
  bool state_low;          // states in T
  bool pdl;
  const LayerPtrs* table;  // [layers], device memory
  float* res;              // [batch, D] fp32: the residual stream, in and out
  void* resb;              // [batch, D] (T): res rounded to T, in and out
  float* ss;               // [parts, kSsRows] fp32: per-part sums of squares of resb's rows, in and out
  unsigned long long* dbc; // [rows, R + 2N] x_proj's sums in 32.32 fixed point; zero before and after
  float* outp;             // [CTAs / kCluster, rows, D] fp32 scratch: each cluster's part of out_proj
  unsigned* barrier;       // the grid barrier's counter (any value; one launch at a time uses it)
  const void* mask;        // [batch] (T; 1 = token, 0 = padding) or null
  long mask_stride;
  unsigned long long* stamps;  // [layers, CTAs, kStamps] global timer stamps, or null (benchmarks only)
};

struct PrepParams {
  int batch, D;
  bool res_round, x_f32, pdl;
  const void* x;        // [batch, D] fp32 or T (row stride D)
  const void* pending;  // [batch, D] (T) or null
  float* res;
  void* resb;
  float* ss;            // part 0 written
};

// Dynamic shared memory of the layers kernel, in bytes.
size_t layers_smem_bytes(int rows, int D, int E, int R, int W);

// The kernel's rows (16, 32 or 64) for a batch, 0 when the batch is larger than 64.
int rows_for(int batch);

// How many clusters of `cluster` CTAs of the kernel can be resident at once (0 on error).
int max_active_clusters(DType dtype, bool state_low, int rows, size_t smem);

cudaError_t launch_layers(const LayersParams& p, DType dtype, cudaStream_t stream);
cudaError_t launch_prep(const PrepParams& p, DType dtype, cudaStream_t stream);

}  // namespace zoo_ml
