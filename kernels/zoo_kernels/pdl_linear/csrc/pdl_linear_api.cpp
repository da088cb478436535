// Torch binding of the PDL decode projection (pdl_linear.cu): checks, allocation, launch on the current stream.
// Python (zoo_kernels.pdl_linear) decides when a projection may take this path and picks the tiling; the checks here
// make a wrong call an error rather than a wrong result or an out-of-bounds access.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>

#include "pdl_linear.h"

namespace {

using at::Tensor;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// x [M, K] (unit stride over K; the row stride is taken as it is, a multiple of 16 bytes), weight [N, K] contiguous,
// bias [N] or None, all bf16 or all fp16. feature_tiles: 16-feature tiles per cluster (1, 2, 4, 8); cluster: CTAs
// splitting K (1, 2, 4, 8); pdl: launch as a programmatic dependent of the stream's previous kernel; trigger_late:
// let the next kernel launch only once this one waited for its predecessor. Returns y [M, N] contiguous.
Tensor linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, int64_t feature_tiles,
              int64_t cluster, bool pdl, bool trigger_late) {
  TORCH_CHECK(x.is_cuda() && weight.is_cuda() && weight.device() == x.device(),
              "pdl_linear: x and weight must be CUDA tensors on one device");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf, "pdl_linear: x must be bf16 or fp16, got ", dt);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "pdl_linear: x must be [M, K] with unit stride over K");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M <= zoo_pl::kMaxRows, "pdl_linear: at most ", zoo_pl::kMaxRows, " rows, got ", M);
  TORCH_CHECK(K > 0 && K % zoo_pl::kBlockK == 0, "pdl_linear: K must be a positive multiple of ", zoo_pl::kBlockK,
              ", got ", K);
  TORCH_CHECK(weight.scalar_type() == dt && weight.dim() == 2 && weight.size(1) == K && weight.is_contiguous(),
              "pdl_linear: weight must be [N, K] contiguous in x's dtype");
  const int64_t N = weight.size(0);
  TORCH_CHECK(feature_tiles == 1 || feature_tiles == 2 || feature_tiles == 4 || feature_tiles == 8,
              "pdl_linear: feature_tiles must be 1, 2, 4 or 8");
  TORCH_CHECK(cluster == 1 || cluster == 2 || cluster == 4 || cluster == 8, "pdl_linear: cluster must be 1, 2, 4 or 8");
  TORCH_CHECK(N > 0 && N % (16 * feature_tiles) == 0 && N / (16 * feature_tiles) <= 65535,
              "pdl_linear: N = ", N, " must be a positive multiple of 16 * feature_tiles (", 16 * feature_tiles,
              ") and give at most 65535 tiles");
  TORCH_CHECK(N * K < (int64_t(1) << 31), "pdl_linear: the weight has 2^31 elements or more");
  if (bias)
    TORCH_CHECK(bias->is_cuda() && bias->device() == x.device() && bias->scalar_type() == dt && bias->dim() == 1 &&
                    bias->size(0) == N && bias->is_contiguous(),
                "pdl_linear: bias must be [N] contiguous in x's dtype, on x's device");
  // 16-byte loads of x's rows and the weight's, 16-byte loads of the bias
  TORCH_CHECK(aligned16(x.data_ptr()) && (M <= 1 || (x.stride(0) * x.element_size()) % 16 == 0),
              "pdl_linear: x's data and row stride must be 16-byte aligned");
  TORCH_CHECK(aligned16(weight.data_ptr()) && (!bias || aligned16(bias->data_ptr())),
              "pdl_linear: weight and bias must be 16-byte aligned");
  Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  zoo_pl::LinearParams p{};
  p.x = x.data_ptr();
  p.x_stride = M > 1 ? x.stride(0) : K;
  p.weight = weight.data_ptr();
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.M = int(M);
  p.N = int(N);
  p.K = int(K);
  p.feature_tiles = int(feature_tiles);
  p.cluster = int(cluster);
  p.pdl = pdl;
  p.trigger_late = trigger_late;
  const zoo_pl::DType dtype = dt == at::kBFloat16 ? zoo_pl::kBFloat16 : zoo_pl::kFloat16;
  const cudaError_t err = zoo_pl::pdl_linear(p, dtype, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "pdl_linear: launch failed: ", cudaGetErrorString(err));
  return out;
}

int64_t smem_bytes(int64_t M, int64_t K, int64_t feature_tiles, int64_t cluster) {
  return int64_t(zoo_pl::smem_bytes(int(M), int(K), int(feature_tiles), int(cluster)));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x W^T (+ b) for <= 64 rows, launched as a programmatic dependent");
  m.def("smem_bytes", &smem_bytes, "dynamic shared memory of one CTA for these sizes and tiling");
}
