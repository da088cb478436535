// Torch binding of the persistent Mamba layers kernel (mamba_layers.cu). zoo_kernels.selective_scan.fused_layers
// checks every argument in Python first (a TORCH_CHECK that formats a number crashes the process in some toolchains:
// benchmarks/NOTES_selective_scan.md); the checks here only catch a bug of ours, with fixed messages.
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>

#include "mamba_layers.h"

namespace {

using at::Tensor;

zoo_ml::DType dtype_of(const Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              "mamba_layers: activations must be bf16 or fp16");
  return t.scalar_type() == at::kBFloat16 ? zoo_ml::kBFloat16 : zoo_ml::kFloat16;
}

void layers(Tensor res, Tensor resb, Tensor ss, Tensor dbc, Tensor outp, Tensor barrier, Tensor table, int64_t batch,
            int64_t D, int64_t E, int64_t R, int64_t W, int64_t n_layers, int64_t in_parts, double eps,
            bool res_round, bool state_low, std::optional<Tensor> mask, bool pdl,
            std::optional<Tensor> stamps) {
  TORCH_CHECK(res.is_cuda() && resb.is_cuda() && ss.is_cuda() && dbc.is_cuda() && outp.is_cuda() &&
                  barrier.is_cuda() && table.is_cuda(),
              "mamba_layers: tensors must be on CUDA");
  const c10::cuda::CUDAGuard guard(res.device());
  zoo_ml::LayersParams p = {};
  p.batch = int(batch), p.D = int(D), p.E = int(E), p.R = int(R), p.W = int(W), p.layers = int(n_layers);
  p.in_parts = int(in_parts);
  p.eps = float(eps);
  p.res_round = res_round, p.state_low = state_low, p.pdl = pdl;
  p.table = reinterpret_cast<const zoo_ml::LayerPtrs*>(table.data_ptr());
  p.res = res.data_ptr<float>();
  p.resb = resb.data_ptr();
  p.ss = ss.data_ptr<float>();
  p.dbc = reinterpret_cast<unsigned long long*>(dbc.data_ptr());
  p.outp = outp.data_ptr<float>();
  p.barrier = reinterpret_cast<unsigned*>(barrier.data_ptr());
  p.mask = mask ? mask->data_ptr() : nullptr;
  p.mask_stride = mask ? long(mask->stride(0)) : 0;
  p.stamps = stamps ? reinterpret_cast<unsigned long long*>(stamps->data_ptr()) : nullptr;
  const cudaError_t err =
      zoo_ml::launch_layers(p, dtype_of(resb), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "mamba_layers: launch failed: ", cudaGetErrorString(err));
}

void prep(Tensor x, std::optional<Tensor> pending, Tensor res, Tensor resb, Tensor ss, bool res_round, bool pdl) {
  TORCH_CHECK(x.is_cuda() && res.is_cuda() && resb.is_cuda() && ss.is_cuda(), "mamba_layers: tensors must be on CUDA");
  const c10::cuda::CUDAGuard guard(res.device());
  zoo_ml::PrepParams p = {};
  p.batch = int(res.size(0)), p.D = int(res.size(1));
  p.res_round = res_round, p.pdl = pdl;
  p.x_f32 = x.scalar_type() == at::kFloat;
  p.x = x.data_ptr();
  p.pending = pending ? pending->data_ptr() : nullptr;
  p.res = res.data_ptr<float>();
  p.resb = resb.data_ptr();
  p.ss = ss.data_ptr<float>();
  const cudaError_t err = zoo_ml::launch_prep(p, dtype_of(resb), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "mamba_layers: prep launch failed: ", cudaGetErrorString(err));
}

int64_t smem_bytes(int64_t rows, int64_t D, int64_t E, int64_t R, int64_t W) {
  return int64_t(zoo_ml::layers_smem_bytes(int(rows), int(D), int(E), int(R), int(W)));
}

int64_t rows_for(int64_t batch) { return zoo_ml::rows_for(int(batch)); }

int64_t max_active_clusters(bool bf16, bool state_low, int64_t rows, int64_t smem) {
  return zoo_ml::max_active_clusters(bf16 ? zoo_ml::kBFloat16 : zoo_ml::kFloat16, state_low, int(rows),
                                     size_t(smem));
}

int64_t smem_optin() {
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, c10::cuda::current_device()) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return v;
}

int64_t stamps_per_layer() { return zoo_ml::kStamps; }

int64_t ptrs_per_layer() { return int64_t(sizeof(zoo_ml::LayerPtrs) / sizeof(void*)); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("layers", &layers, "a run of Mamba layers, one decode token, in one persistent launch");
  m.def("prep", &prep, "res = x (+ pending), its T copy and sums of squares: the run's input");
  m.def("smem_bytes", &smem_bytes);
  m.def("rows_for", &rows_for);
  m.def("max_active_clusters", &max_active_clusters);
  m.def("smem_optin", &smem_optin);
  m.def("ptrs_per_layer", &ptrs_per_layer);
  m.def("stamps_per_layer", &stamps_per_layer);
}
