// Causal depthwise conv1d: parameters and launcher shared by the CUDA source and the torch binding.
#pragma once

#include <cuda_runtime.h>

namespace zoo_conv {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct ConvParams {
  int batch, dim, len, width;  // width in 2..4
  bool silu;
  bool vec_ok;          // rows start 16-byte aligned and len is a multiple of 16 bytes
  const void* x;        // [batch, dim, len]
  const float* weight;  // [dim, width]
  const float* bias;    // [dim] or null
  const int* seq_idx;   // [batch, len] or null
  const float* init;    // [batch, dim, width - 1] or null
  void* y;
  const void* dy;
  void* dx;
  float* dweight;       // [dim, width], accumulated
  float* dbias;         // [dim] or null, accumulated
  float* dinit;         // [batch, dim, width - 1] or null
};

cudaError_t conv(const ConvParams& p, DType dtype, bool backward, cudaStream_t stream);

// One decoding step: y = act(bias + sum_w weight[:, w] * [state, x][:, w]); x enters the state, in place.
struct UpdateParams {
  int batch, dim, width;  // width in 2..4
  int first_row;          // the batch row of blockIdx.y = 0 (past gridDim.y's 65535: further launches)
  bool silu;
  long x_stride, out_stride;  // batch strides (the channel stride is 1)
  float* state;               // [batch, dim, width - 1] fp32, contiguous, updated in place
  const void* x;              // [batch, dim]
  const float* weight;        // [dim, width]
  const float* bias;          // [dim] or null
  void* out;                  // [batch, dim], x's dtype
};

cudaError_t conv_update(const UpdateParams& p, DType dtype, cudaStream_t stream);

}  // namespace zoo_conv
