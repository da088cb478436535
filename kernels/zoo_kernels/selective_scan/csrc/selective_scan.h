// Mamba-1 selective scan: parameters and launchers shared by the CUDA sources and the torch binding.
// This header is torch-free so that the kernels compile with plain nvcc.
#pragma once

#include <cuda_runtime.h>

namespace zoo_ss {

// Element type of u, delta, z, B, C and the outputs (state and accumulation are always fp32).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct ScanParams {
  int batch, dim, len, nstate, ngroups, dim_per_group;
  int nchunks;      // ceil(len / kChunk)
  int len_pad;      // row length of the fp32 dB/dC accumulators (the whole row rounded up to 4)
  int nseg;         // segments per row (>= 1): block row b scans segment b % nseg of row b / nseg
  int first_row;    // the block row at blockIdx.y = 0: rows past gridDim.y's 65535 take further launches
  int row_len;      // the whole row, nseg * len: the stride between channels (and B/C states, seq_idx rows)
  bool softplus;
  bool vec_ok;      // rows of u/delta/z/B/C/outputs start 16-byte aligned (16-byte accesses allowed)
  // inputs: u, delta, z, out, y_save, du, ddelta, dz, dout [batch / nseg, dim, row_len];
  // B, C [batch / nseg, G, N, row_len]; seq_idx [batch / nseg, row_len]. The per-row states (h0, ckpt,
  // final_state, dfinal, dh0) count batch = rows x nseg segment rows.
  const void* u;
  const void* delta;
  const float* A;            // [dim, N]
  const void* B;
  const void* C;
  const float* D;            // [dim] or null
  const void* z;             // or null
  const float* delta_bias;   // [dim] or null
  const int* seq_idx;        // [batch, len] or null
  const float* h0;           // [batch, dim, N] or null
  // forward outputs
  void* out;
  void* y_save;              // y + D u before the gate, kept for dz (null: not kept)
  float* ckpt;               // [batch, nchunks - 1, dim, N]: state after each chunk but the last (null: none)
  float* final_state;        // [batch, dim, N] or null
  // backward
  const void* dout;
  const float* dfinal;       // [batch, dim, N] or null
  void* du;
  void* ddelta;
  void* dz;                  // or null
  float* dA;                 // [dim, N], accumulated
  float* dB;                 // [batch, G, N, len_pad], accumulated
  float* dC;
  float* dD;                 // [dim] or null, accumulated
  float* ddelta_bias;        // [dim] or null, accumulated
  float* dh0;                // [batch, dim, N] or null
};

struct UpdateParams {
  int batch, dim, nstate, ngroups, dim_per_group;
  int dt_rank;               // R, with dt_weight
  bool softplus;
  long x_stride, dt_stride, z_stride, b_stride, c_stride, out_stride;  // batch strides (channel stride is 1)
  float* state;              // [batch, dim, N] fp32, updated in place
  const void* x;
  const void* dt;            // [batch, dim], or with dt_weight the low-rank [batch, R]
  const void* dt_weight;     // [dim, R] row-major in x's dtype: dt = dt_low W^T (Mamba's dt_proj); null: dt given
  const float* A;
  const void* B;             // [batch, G, N], unit stride over N, groups N apart
  const void* C;
  const float* D;
  const void* z;
  const float* dt_bias;
  void* out;                 // [batch, dim]
};

// Time steps per chunk: the forward keeps the state at every chunk end for the backward.
constexpr int kChunk = 64;

// The most blocks a launch may put in gridDim.y (and z).
constexpr int kMaxGridY = 65535;

cudaError_t scan_fwd(const ScanParams& p, DType dtype, cudaStream_t stream);
cudaError_t scan_bwd(const ScanParams& p, DType dtype, cudaStream_t stream);
cudaError_t state_update(const UpdateParams& p, DType dtype, cudaStream_t stream);

}  // namespace zoo_ss
