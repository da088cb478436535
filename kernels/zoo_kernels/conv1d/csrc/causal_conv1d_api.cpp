// Torch binding of the causal depthwise conv1d kernels.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "causal_conv1d.h"

namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

zoo_conv::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return zoo_conv::kFloat32;
    case at::kBFloat16: return zoo_conv::kBFloat16;
    case at::kHalf: return zoo_conv::kFloat16;
    default: TORCH_CHECK(false, "causal_conv1d: unsupported dtype ", t.scalar_type());
  }
}

void check(const Tensor& t, const char* name, at::ScalarType dtype, std::vector<int64_t> shape) {
  TORCH_CHECK(t.is_cuda(), "causal_conv1d: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "causal_conv1d: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "causal_conv1d: ", name, " must be contiguous");
  TORCH_CHECK(t.sizes().vec() == shape, "causal_conv1d: ", name, " has shape ", t.sizes(), ", expected ",
              at::IntArrayRef(shape));
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

zoo_conv::ConvParams make_params(const Tensor& x, const Tensor& weight, const OptT& bias, const OptT& seq_idx,
                                 const OptT& init, bool silu) {
  TORCH_CHECK(x.dim() == 3, "causal_conv1d: x must be [batch, dim, len]");
  const int64_t batch = x.size(0), dim = x.size(1), len = x.size(2), width = weight.size(1);
  TORCH_CHECK(width >= 2 && width <= 4, "causal_conv1d: the CUDA kernel supports widths 2..4, got ", width);
  TORCH_CHECK(len >= 1, "causal_conv1d: empty sequence");
  check(x, "x", x.scalar_type(), {batch, dim, len});
  check(weight, "weight", at::kFloat, {dim, width});
  if (bias) check(*bias, "bias", at::kFloat, {dim});
  if (seq_idx) check(*seq_idx, "seq_idx", at::kInt, {batch, len});
  if (init) check(*init, "initial_state", at::kFloat, {batch, dim, width - 1});
  zoo_conv::ConvParams p{};
  p.batch = int(batch);
  p.dim = int(dim);
  p.len = int(len);
  p.width = int(width);
  p.silu = silu;
  p.vec_ok = (len * x.element_size()) % 16 == 0 && aligned16(x);
  p.x = x.data_ptr();
  p.weight = weight.data_ptr<float>();
  p.bias = bias ? bias->data_ptr<float>() : nullptr;
  p.seq_idx = seq_idx ? seq_idx->data_ptr<int>() : nullptr;
  p.init = init ? init->data_ptr<float>() : nullptr;
  return p;
}

Tensor conv_fwd(const Tensor& x, const Tensor& weight, const OptT& bias, const OptT& seq_idx, const OptT& init,
                bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  zoo_conv::ConvParams p = make_params(x, weight, bias, seq_idx, init, silu);
  Tensor y = at::empty_like(x);
  p.vec_ok = p.vec_ok && aligned16(y);
  p.y = y.data_ptr();
  const cudaError_t err = zoo_conv::conv(p, dtype_of(x), false, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "causal_conv1d forward kernel failed: ", cudaGetErrorString(err));
  return y;
}

// Returns {dx, dweight, dbias, dinit} (fp32 except dx; empty where not applicable).
std::vector<Tensor> conv_bwd(const Tensor& x, const Tensor& weight, const OptT& bias, const OptT& seq_idx,
                             const OptT& init, const Tensor& dy, bool silu, bool need_dinit) {
  const c10::cuda::CUDAGuard guard(x.device());
  zoo_conv::ConvParams p = make_params(x, weight, bias, seq_idx, init, silu);
  check(dy, "dy", x.scalar_type(), {p.batch, p.dim, p.len});
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = at::empty_like(x);
  Tensor dweight = at::zeros({p.dim, p.width}, f32);
  Tensor dbias = bias ? at::zeros({p.dim}, f32) : at::empty({0}, f32);
  Tensor dinit = need_dinit ? at::empty({p.batch, p.dim, p.width - 1}, f32) : at::empty({0}, f32);
  p.vec_ok = p.vec_ok && aligned16(dy) && aligned16(dx);
  p.dy = dy.data_ptr();
  p.dx = dx.data_ptr();
  p.dweight = dweight.data_ptr<float>();
  p.dbias = bias ? dbias.data_ptr<float>() : nullptr;
  p.dinit = need_dinit ? dinit.data_ptr<float>() : nullptr;
  const cudaError_t err = zoo_conv::conv(p, dtype_of(x), true, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "causal_conv1d backward kernel failed: ", cudaGetErrorString(err));
  return {dx, dweight, dbias, dinit};
}

// One decoding step; shifts x [batch, dim] (unit channel stride) into state [batch, dim, width - 1] (fp32,
// contiguous) in place and returns y [batch, dim] in x's dtype.
Tensor conv_update(Tensor& state, const Tensor& x, const Tensor& weight, const OptT& bias, bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "causal_conv1d_update: x must be [batch, dim], unit "
              "channel stride, on CUDA");
  const int64_t batch = x.size(0), dim = x.size(1), width = weight.size(1);
  TORCH_CHECK(width >= 2 && width <= 4, "causal_conv1d_update: the CUDA kernel supports widths 2..4, got ", width);
  check(weight, "weight", at::kFloat, {dim, width});
  if (bias) check(*bias, "bias", at::kFloat, {dim});
  check(state, "conv_state", at::kFloat, {batch, dim, width - 1});
  Tensor out = at::empty({batch, dim}, x.options());
  zoo_conv::UpdateParams p{};
  p.batch = int(batch);
  p.dim = int(dim);
  p.width = int(width);
  p.silu = silu;
  p.x_stride = x.stride(0);
  p.out_stride = dim;
  p.state = state.data_ptr<float>();
  p.x = x.data_ptr();
  p.weight = weight.data_ptr<float>();
  p.bias = bias ? bias->data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  const cudaError_t err = zoo_conv::conv_update(p, dtype_of(x), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "causal_conv1d_update kernel failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &conv_fwd, "causal depthwise conv1d forward");
  m.def("bwd", &conv_bwd, "causal depthwise conv1d backward");
  m.def("update", &conv_update, "causal depthwise conv1d single-step update");
}
