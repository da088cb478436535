// y = x W^T (+ b) for a decode step's few rows (pdl_linear.cu): the weight's loads issued before the kernel waits
// for the previous one (programmatic dependent launch, compute capability 9.0 and newer).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace zoo_pl {

enum DType { kBFloat16 = 0, kFloat16 = 1 };

constexpr int kThreads = 256;  // threads per CTA: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRows = 64;  // rows of x, at most (8 mma n-tiles of 8)
constexpr int kBlockK = 32;   // k per block: one 16-byte load per thread and row, two mma k-steps

struct LinearParams {
  const void* x;        // [M, K] (T), unit stride over K
  long x_stride;        // x's row stride, in elements
  const void* weight;   // [N, K] (T), contiguous; read before the grid-dependency wait
  const void* bias;     // [N] (T) or null
  void* out;            // [M, N] (T), contiguous
  int M, N, K;          // M <= kMaxRows, N % (16 * feature_tiles) == 0, K % kBlockK == 0
  int feature_tiles;    // 16-feature tiles per CTA: 1, 2, 4 or 8 (its warps: feature tiles x k groups)
  int cluster;          // CTAs of a thread-block cluster splitting K: 1, 2, 4 or 8
  int x_pitch;          // elements per row of x's chunk in shared memory (set by pdl_linear)
  bool pdl;             // launch as a programmatic dependent of the stream's previous kernel
  bool trigger_late;    // let the next kernel launch only once this one passed its wait (else at its start)
};

// Dynamic shared memory of one CTA for these sizes, in bytes.
size_t smem_bytes(int M, int K, int feature_tiles, int cluster);

// Launches y = x W^T (+ b) on `stream` (the caller checked shapes and 16-byte alignments).
cudaError_t pdl_linear(LinearParams p, DType dtype, cudaStream_t stream);

}  // namespace zoo_pl
