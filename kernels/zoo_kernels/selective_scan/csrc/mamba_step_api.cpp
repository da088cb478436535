// Torch binding of the fused Mamba-1 decode step (mamba_step.cu): checks, allocation, launch on the current
// stream. Python (zoo_kernels.selective_scan.fused_step) decides when the step may take this path; the checks
// here make a wrong call an error rather than a wrong result.
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "mamba_step.h"

namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

zoo_ms::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return zoo_ms::kFloat32;
    case at::kBFloat16: return zoo_ms::kBFloat16;
    case at::kHalf: return zoo_ms::kFloat16;
    default: TORCH_CHECK(false, "mamba_step: unsupported dtype ", t.scalar_type());
  }
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

void check(const Tensor& t, const char* name, at::ScalarType dtype, std::vector<int64_t> shape) {
  TORCH_CHECK(t.is_cuda(), "mamba_step: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "mamba_step: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "mamba_step: ", name, " must be contiguous");
  TORCH_CHECK(t.sizes().vec() == shape, "mamba_step: ", name, " has shape ", t.sizes(), ", expected ",
              at::IntArrayRef(shape));
}

// Whether `rows` rows per CTA of `kernel` fit: the shared memory under the device's opt-in limit; for the slots kernel
// rows x dim / kCluster (row, channel) items for the conv step's per-thread arrays, for the register-rows kernel
// its sizes (register_rows_fit) and 2 or 4 rows.
bool fits(int64_t dim, int64_t nstate, int64_t rank, int64_t width, int64_t elem_bytes, int rows, size_t* smem,
          int kernel = zoo_ms::kSlots) {
  *smem = zoo_ms::step_smem_bytes(int(dim), int(nstate), int(rank), int(width), rows, int(elem_bytes), kernel);
  int smem_block = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_block, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        c10::cuda::current_device()));
  if (int64_t(*smem) > smem_block) return false;
  if (kernel == zoo_ms::kRegisterRows)
    return (rows == 2 || rows == 4) &&
           zoo_ms::register_rows_fit(int(dim), int(nstate), int(rank), int(width), int(elem_bytes));
  return rows * dim / zoo_ms::kCluster <= zoo_ms::kMaxRowChannels;
}

zoo_ms::DType dtype_of_size(int64_t elem_bytes) {
  return elem_bytes == 4 ? zoo_ms::kFloat32 : zoo_ms::kBFloat16;  // fp16 has bf16's sizes
}

// Rows per CTA: the smallest power of two (<= kAutoMaxRows) whose clusters are all resident at once (the occupancy
// API's count for the kernel and its shared memory: a cluster's 8 CTAs must share a GPC, so this is less than
// SMs x CTAs per SM / 8), so that the step runs in one wave; 0 when none does, and the caller takes the unfused
// step. kAutoMaxRows is 1: on an H200 (benchmarks/mamba_step.py, 130M shapes) one row per CTA beat the unfused step
// (7.0 vs 7.8 us at batch 1, 9.0 vs 9.8 at batch 16), but every CTA's time grows by ~1.7 us per further row (batch
// 1 with 2 / 4 / 8 rows: 8.6 / 12.1 / 19.0 us), and from batch 32 on the unfused step won at every rows per CTA
// (batch 32: 13.0 vs 10.6 us; batch 64: 22.6 vs 14.3 us).
constexpr int kAutoMaxRows = 1;

int64_t rows_for(int64_t batch, int64_t dim, int64_t nstate, int64_t rank, int64_t width, int64_t elem_bytes) {
  for (int rows : {1, 2, 4, 8}) {
    size_t smem = 0;
    if (rows > kAutoMaxRows || !fits(dim, nstate, rank, width, elem_bytes, rows, &smem)) break;
    if ((batch + rows - 1) / rows <= zoo_ms::max_active_clusters(dtype_of_size(elem_bytes), rows, smem)) return rows;
  }
  return 0;
}

// The register-rows kernel's rows per CTA for this batch: the fewest (2 or 4) whose clusters are all resident at
// once; 0 where none is (or the sizes do not fit it).
int64_t register_rows_for(int64_t batch, int64_t dim, int64_t nstate, int64_t rank, int64_t width,
                          int64_t elem_bytes) {
  for (int rows : {2, 4}) {
    size_t smem = 0;
    if (!fits(dim, nstate, rank, width, elem_bytes, rows, &smem, zoo_ms::kRegisterRows)) continue;
    if ((batch + rows - 1) / rows <= zoo_ms::max_active_clusters(dtype_of_size(elem_bytes), rows, smem,
                                                                 zoo_ms::kRegisterRows, int(dim)))
      return rows;
  }
  return 0;
}

// The step's launch for this batch: (kernel, rows per CTA), (0, 0) for the unfused step. The register-rows kernel
// where it fits and runs in one wave, else one-row CTAs of the slots kernel where they do. On an H200 (130M shapes,
// benchmarks/mamba_step.py, in a CUDA graph) the register-rows kernel was the faster at every batch: 3.64 vs 5.18 us
// at batch 1, 5.13 vs 7.26 at 16, 6.52 vs 10.62 (the slots kernel's best) at 32, 9.15 vs 20.34 at 64, where the
// unfused step took 14.37.
std::vector<int64_t> plan(int64_t batch, int64_t dim, int64_t nstate, int64_t rank, int64_t width,
                          int64_t elem_bytes) {
  if (const int64_t rows = register_rows_for(batch, dim, nstate, rank, width, elem_bytes))
    return {zoo_ms::kRegisterRows, rows};
  if (const int64_t rows = rows_for(batch, dim, nstate, rank, width, elem_bytes)) return {zoo_ms::kSlots, rows};
  return {0, 0};
}

// How many clusters can be resident at once for `rows` rows per CTA of `kernel` at these sizes (benchmarks print
// it); 0 where they do not fit (not asked of the runtime: it would fail).
int64_t cluster_capacity(int64_t dim, int64_t nstate, int64_t rank, int64_t width, int64_t elem_bytes, int64_t rows,
                         int64_t kernel) {
  size_t smem = 0;
  if (!fits(dim, nstate, rank, width, elem_bytes, int(rows), &smem, int(kernel))) return 0;
  return zoo_ms::max_active_clusters(dtype_of_size(elem_bytes), int(rows), smem, int(kernel), int(dim));
}

// x, z: [batch, dim] (may be column slices of in_proj's output); conv_state [batch, dim, W - 1] fp32; conv_w
// [dim, W] fp32; x_proj_w [R + 2N, dim] and dt_w [dim, R] in x's dtype; A [dim, N] fp32; state [batch, dim, N]
// fp32, or in x's dtype where the register-rows kernel runs (the plan's, or forced). Returns y [batch, dim] in x's dtype; conv_state and state are updated in place. pdl: launch as a
// programmatic dependent of the stream's previous kernel (the weights' and states' copies overlap its end).
// mask [batch] (1 = token, 0 = padding) zeroes x and u of padding rows. kernel_asked: kSlots or kRegisterRows, 0 =
// plan's; rows_asked: rows per CTA, 0 = the kernel's rule (plan, rows_for or register_rows_for).
Tensor step(const Tensor& x, const Tensor& z, Tensor& conv_state, const Tensor& conv_w, const OptT& conv_b,
            const Tensor& x_proj_w, const Tensor& dt_w, const OptT& dt_bias, const Tensor& A, const OptT& D,
            Tensor& state, const OptT& mask, bool pdl, int64_t rows_asked, int64_t kernel_asked) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && z.sizes() == x.sizes() && z.stride(1) == 1,
              "mamba_step: x and z must be [batch, dim] with unit stride over dim");
  const int64_t batch = x.size(0), dim = x.size(1);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, "mamba_step: A must be [dim, N]");
  const int64_t nstate = A.size(1);
  TORCH_CHECK(dt_w.dim() == 2 && dt_w.size(0) == dim, "mamba_step: dt_w must be [dim, R]");
  const int64_t rank = dt_w.size(1);
  TORCH_CHECK(conv_w.dim() == 2 && conv_w.size(0) == dim && conv_w.size(1) >= 1 && conv_w.size(1) <= 4,
              "mamba_step: conv_w must be [dim, W] with W <= 4");
  const int64_t width = conv_w.size(1);
  const auto dt = x.scalar_type();
  const int64_t eb = x.element_size(), per_chunk = 16 / eb;
  TORCH_CHECK(dim % (8 * zoo_ms::kCluster) == 0, "mamba_step: dim must be a multiple of ", 8 * zoo_ms::kCluster);
  TORCH_CHECK(nstate % 4 == 0 && nstate / 4 <= 32 && ((nstate / 4) & (nstate / 4 - 1)) == 0,
              "mamba_step: N must be 4 times a power of two, at most 128");
  TORCH_CHECK(rank >= 1 && rank % per_chunk == 0, "mamba_step: R must be a multiple of ", per_chunk);
  TORCH_CHECK(z.scalar_type() == dt, "mamba_step: x and z must share a dtype");
  check(conv_state, "conv_state", at::kFloat, {batch, dim, width - 1});
  check(conv_w, "conv_w", at::kFloat, {dim, width});
  if (conv_b) check(*conv_b, "conv_b", at::kFloat, {dim});
  check(x_proj_w, "x_proj_w", dt, {rank + 2 * nstate, dim});
  check(dt_w, "dt_w", dt, {dim, rank});
  if (dt_bias) check(*dt_bias, "dt_bias", at::kFloat, {dim});
  check(A, "A", at::kFloat, {dim, nstate});
  if (D) check(*D, "D", at::kFloat, {dim});
  if (mask)
    TORCH_CHECK(mask->is_cuda() && mask->dim() == 1 && mask->size(0) == batch && mask->scalar_type() == dt,
                "mamba_step: mask must be [batch] in x's dtype");
  const bool state_low = state.scalar_type() != at::kFloat;
  check(state, "state", state_low ? dt : at::kFloat, {batch, dim, nstate});
  for (const Tensor* t : {&x_proj_w, &dt_w, &A, static_cast<const Tensor*>(&state)})
    TORCH_CHECK(aligned16(*t), "mamba_step: tensors must be 16-byte aligned");
  TORCH_CHECK(aligned16(conv_w), "mamba_step: tensors must be 16-byte aligned");
  for (const OptT* t : {&dt_bias, &D, &conv_b})
    TORCH_CHECK(!t->has_value() || aligned16(**t), "mamba_step: tensors must be 16-byte aligned");
  int kernel = int(kernel_asked), rows = int(rows_asked);
  TORCH_CHECK(kernel >= 0 && kernel <= zoo_ms::kRegisterRows, "mamba_step: unknown kernel ", kernel);
  if (kernel == 0 && rows == 0) {
    const std::vector<int64_t> chosen = plan(batch, dim, nstate, rank, width, eb);
    kernel = int(chosen[0]), rows = int(chosen[1]);
    TORCH_CHECK(rows > 0, "mamba_step: no kernel runs these sizes in one wave");
  }
  if (kernel == 0) kernel = zoo_ms::kSlots;
  if (rows == 0) {
    rows = int(kernel == zoo_ms::kSlots ? rows_for(batch, dim, nstate, rank, width, eb)
                                         : register_rows_for(batch, dim, nstate, rank, width, eb));
    TORCH_CHECK(rows > 0, "mamba_step: no rows per CTA runs these sizes in one wave");
  }
  size_t smem = 0;
  TORCH_CHECK(rows == 1 || rows == 2 || rows == 4 || rows == 8, "mamba_step: rows per CTA must be 1, 2, 4 or 8");
  TORCH_CHECK(fits(dim, nstate, rank, width, eb, rows, &smem, kernel), "mamba_step: ", rows,
              " rows per CTA do not fit kernel ", kernel, " at these sizes");
  TORCH_CHECK(!state_low || kernel == zoo_ms::kRegisterRows,
              "mamba_step: a state in the activations' dtype needs the register-rows kernel (fp32 otherwise)");
  Tensor out = at::empty({batch, dim}, x.options());
  zoo_ms::StepParams p{};
  p.batch = int(batch);
  p.dim = int(dim);
  p.nstate = int(nstate);
  p.rank = int(rank);
  p.width = int(width);
  p.rows = rows;
  p.kernel = kernel;
  p.pdl = pdl;
  p.x = x.data_ptr();
  p.z = z.data_ptr();
  p.x_stride = x.stride(0);
  p.z_stride = z.stride(0);
  p.mask = mask ? mask->data_ptr() : nullptr;
  p.mask_stride = mask ? mask->stride(0) : 0;
  p.out_stride = out.stride(0);
  p.conv_state = conv_state.data_ptr<float>();
  p.conv_w = conv_w.data_ptr<float>();
  p.conv_b = conv_b ? conv_b->data_ptr<float>() : nullptr;
  p.x_proj_w = x_proj_w.data_ptr();
  p.dt_w = dt_w.data_ptr();
  p.dt_bias = dt_bias ? dt_bias->data_ptr<float>() : nullptr;
  p.A = A.data_ptr<float>();
  p.D = D ? D->data_ptr<float>() : nullptr;
  p.state = state.data_ptr();
  p.state_low = state_low;
  p.out = out.data_ptr();
  const cudaError_t err = zoo_ms::mamba_step(p, dtype_of(x), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "mamba_step: launch failed: ", cudaGetErrorString(err));
  return out;
}

#ifdef ZOO_MS_PHASES
// The phase stamps of the last launch: [kPhaseCtas, kPhaseSlots] int64 (see mamba_step.h).
Tensor phases() {
  Tensor out = at::empty({zoo_ms::kPhaseCtas, zoo_ms::kPhaseSlots}, at::kLong);
  const cudaError_t err = zoo_ms::read_phases(reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()));
  TORCH_CHECK(err == cudaSuccess, "mamba_step: reading the phase stamps failed: ", cudaGetErrorString(err));
  return out;
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step", &step, "fused Mamba-1 decode step (conv, x_proj, dt_proj, state update, gate)");
  m.def("rows_for", &rows_for, "one-row slots kernel's rows per CTA for these sizes (0: it does not run in one wave)");
  m.def("register_rows_for", &register_rows_for, "the register-rows kernel's rows per CTA (0: none in one wave)");
  m.def("plan", &plan, "(kernel, rows per CTA) the step takes for these sizes ((0, 0): the unfused step)");
#ifdef ZOO_MS_PHASES
  m.def("phases", &phases, "phase stamps of the last launch (a -DZOO_MS_PHASES build only)");
#endif
  m.def("cluster_capacity", &cluster_capacity, "resident clusters at once for these sizes and rows per CTA");
}
