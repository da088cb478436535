// Torch binding of the selective-scan kernels: checks, allocation, launch on the current stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "selective_scan.h"

namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

zoo_ss::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return zoo_ss::kFloat32;
    case at::kBFloat16: return zoo_ss::kBFloat16;
    case at::kHalf: return zoo_ss::kFloat16;
    default: TORCH_CHECK(false, "selective_scan: unsupported dtype ", t.scalar_type());
  }
}

void check(const Tensor& t, const char* name, at::ScalarType dtype, std::vector<int64_t> shape) {
  TORCH_CHECK(t.is_cuda(), "selective_scan: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "selective_scan: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "selective_scan: ", name, " must be contiguous");
  TORCH_CHECK(t.sizes().vec() == shape, "selective_scan: ", name, " has shape ", t.sizes(), ", expected ",
              at::IntArrayRef(shape));
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

template <typename T>
const T* ptr_or_null(const OptT& t) {
  return t.has_value() ? static_cast<const T*>(t->data_ptr()) : nullptr;
}

// Fills the fields common to forward and backward and checks every input.
zoo_ss::ScanParams make_params(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                               const Tensor& C, const OptT& D, const OptT& z, const OptT& delta_bias,
                               bool softplus, const OptT& h0, const OptT& seq_idx, int64_t nseg) {
  TORCH_CHECK(u.dim() == 3, "selective_scan: u must be [batch, dim, len]");
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2);
  TORCH_CHECK(nseg >= 1 && len % nseg == 0, "selective_scan: nseg ", nseg, " must divide len ", len);
  TORCH_CHECK(nseg == 1 || (len / nseg) % 4 == 0,
              "selective_scan: with nseg > 1 the segment length must be a multiple of 4, got ", len / nseg);
  const int64_t seg_len = len / nseg, rows = batch * nseg;  // the kernel's rows: segments of the rows
  TORCH_CHECK(B.dim() == 4, "selective_scan: B must be [batch, G, N, len]");
  const int64_t groups = B.size(1), nstate = B.size(2);
  TORCH_CHECK(nstate >= 1 && nstate <= 64, "selective_scan: the CUDA kernel supports N <= 64, got ", nstate);
  TORCH_CHECK(groups >= 1 && dim % groups == 0, "selective_scan: dim ", dim, " not divisible by G ", groups);
  TORCH_CHECK(len >= 1, "selective_scan: empty sequence");
  const auto dt = u.scalar_type();
  check(u, "u", dt, {batch, dim, len});
  check(delta, "delta", dt, {batch, dim, len});
  check(A, "A", at::kFloat, {dim, nstate});
  check(B, "B", dt, {batch, groups, nstate, len});
  check(C, "C", dt, {batch, groups, nstate, len});
  if (D) check(*D, "D", at::kFloat, {dim});
  if (z) check(*z, "z", dt, {batch, dim, len});
  if (delta_bias) check(*delta_bias, "delta_bias", at::kFloat, {dim});
  if (h0) check(*h0, "initial_state", at::kFloat, {rows, dim, nstate});
  if (seq_idx) check(*seq_idx, "seq_idx", at::kInt, {batch, len});

  zoo_ss::ScanParams p{};
  p.batch = int(rows);
  p.dim = int(dim);
  p.len = int(seg_len);
  p.nseg = int(nseg);
  p.row_len = int(len);
  p.nstate = int(nstate);
  p.ngroups = int(groups);
  p.dim_per_group = int(dim / groups);
  p.nchunks = int((seg_len + zoo_ss::kChunk - 1) / zoo_ss::kChunk);
  p.len_pad = int((len + 3) / 4 * 4);
  p.softplus = softplus;
  const int vec_elems = 16 / int(u.element_size());
  p.vec_ok = seg_len % vec_elems == 0 && aligned16(u) && aligned16(delta) && aligned16(B) && aligned16(C) &&
             (!z || aligned16(*z));
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.A = A.data_ptr<float>();
  p.B = B.data_ptr();
  p.C = C.data_ptr();
  p.D = ptr_or_null<float>(D);
  p.z = z ? z->data_ptr() : nullptr;
  p.delta_bias = ptr_or_null<float>(delta_bias);
  p.seq_idx = ptr_or_null<int>(seq_idx);
  p.h0 = ptr_or_null<float>(h0);
  return p;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "selective_scan ", what, " kernel failed: ", cudaGetErrorString(err));
}

// Returns {out, final_state, ckpt, y_save}; the last three are empty tensors when not asked for. With nseg > 1
// every row is scanned as nseg segments in parallel, each from its own h0 ([batch * nseg, dim, N], segment rows
// in row-major order): out and y_save are whole rows, final_state and ckpt per segment row.
std::vector<Tensor> scan_fwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                             const Tensor& C, const OptT& D, const OptT& z, const OptT& delta_bias,
                             bool softplus, const OptT& h0, const OptT& seq_idx, bool save_for_backward,
                             bool return_final_state, int64_t nseg) {
  const c10::cuda::CUDAGuard guard(u.device());
  zoo_ss::ScanParams p = make_params(u, delta, A, B, C, D, z, delta_bias, softplus, h0, seq_idx, nseg);
  const auto f32 = u.options().dtype(at::kFloat);
  Tensor out = at::empty_like(u);
  Tensor final_state = return_final_state ? at::empty({p.batch, p.dim, p.nstate}, f32) : at::empty({0}, f32);
  Tensor ckpt = save_for_backward ? at::empty({p.batch, p.nchunks - 1, p.dim, p.nstate}, f32) : at::empty({0}, f32);
  Tensor y_save = (save_for_backward && z) ? at::empty_like(u) : at::empty({0}, u.options());
  p.vec_ok = p.vec_ok && aligned16(out) && (y_save.numel() == 0 || aligned16(y_save));
  p.out = out.data_ptr();
  p.y_save = y_save.numel() ? y_save.data_ptr() : nullptr;
  p.ckpt = ckpt.numel() ? ckpt.data_ptr<float>() : nullptr;
  p.final_state = return_final_state ? final_state.data_ptr<float>() : nullptr;
  check_launch(zoo_ss::scan_fwd(p, dtype_of(u), c10::cuda::getCurrentCUDAStream().stream()), "forward");
  return {out, final_state, ckpt, y_save};
}

// Returns {du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0} (empty where not applicable); dB and dC are
// fp32 [batch, G, N, len rounded up to 4]. With nseg > 1 (as the forward): h0, ckpt, dfinal and dh0 are per
// segment row, everything else whole rows.
std::vector<Tensor> scan_bwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                             const Tensor& C, const OptT& D, const OptT& z, const OptT& delta_bias,
                             bool softplus, const OptT& h0, const OptT& seq_idx, const Tensor& ckpt,
                             const OptT& y_save, const Tensor& dout, const OptT& dfinal, bool need_dh0,
                             int64_t nseg) {
  const c10::cuda::CUDAGuard guard(u.device());
  zoo_ss::ScanParams p = make_params(u, delta, A, B, C, D, z, delta_bias, softplus, h0, seq_idx, nseg);
  const int64_t batch = u.size(0);
  check(dout, "dout", u.scalar_type(), {batch, p.dim, p.row_len});
  check(ckpt, "ckpt", at::kFloat, {p.batch, p.nchunks - 1, p.dim, p.nstate});
  if (z) {
    TORCH_CHECK(y_save.has_value(), "selective_scan backward: y_save is required with z");
    check(*y_save, "y_save", u.scalar_type(), {batch, p.dim, p.row_len});
  }
  if (dfinal) check(*dfinal, "dfinal", at::kFloat, {p.batch, p.dim, p.nstate});
  const auto f32 = u.options().dtype(at::kFloat);
  Tensor du = at::empty_like(u), ddelta = at::empty_like(u);
  Tensor dz = z ? at::empty_like(u) : at::empty({0}, u.options());
  Tensor dA = at::zeros({p.dim, p.nstate}, f32);
  Tensor dB = at::zeros({batch, p.ngroups, p.nstate, p.len_pad}, f32);
  Tensor dC = at::zeros({batch, p.ngroups, p.nstate, p.len_pad}, f32);
  Tensor dD = D ? at::zeros({p.dim}, f32) : at::empty({0}, f32);
  Tensor ddb = delta_bias ? at::zeros({p.dim}, f32) : at::empty({0}, f32);
  Tensor dh0 = need_dh0 ? at::empty({p.batch, p.dim, p.nstate}, f32) : at::empty({0}, f32);
  p.vec_ok = p.vec_ok && aligned16(dout) && aligned16(du) && aligned16(ddelta) && (!z || aligned16(dz)) &&
             (!z || aligned16(*y_save));
  p.y_save = z ? y_save->data_ptr() : nullptr;
  p.ckpt = ckpt.numel() ? ckpt.data_ptr<float>() : nullptr;
  p.dout = dout.data_ptr();
  p.dfinal = ptr_or_null<float>(dfinal);
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dz = z ? dz.data_ptr() : nullptr;
  p.dA = dA.data_ptr<float>();
  p.dB = dB.data_ptr<float>();
  p.dC = dC.data_ptr<float>();
  p.dD = D ? dD.data_ptr<float>() : nullptr;
  p.ddelta_bias = delta_bias ? ddb.data_ptr<float>() : nullptr;
  p.dh0 = need_dh0 ? dh0.data_ptr<float>() : nullptr;
  check_launch(zoo_ss::scan_bwd(p, dtype_of(u), c10::cuda::getCurrentCUDAStream().stream()), "backward");
  return {du, ddelta, dA, dB, dC, dD, dz, ddb, dh0};
}

// Updates state [batch, dim, N] (fp32, contiguous) in place; returns y [batch, dim] in x's dtype. With dt_weight
// [dim, R] (contiguous, x's dtype) dt is the low-rank [batch, R] and the kernel computes dt W^T itself.
Tensor state_update(Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B,
                    const Tensor& C, const OptT& D, const OptT& z, const OptT& dt_bias, bool softplus,
                    const OptT& dt_weight) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "selective_state_update: x must be [batch, dim], unit stride");
  const int64_t batch = x.size(0), dim = x.size(1);
  TORCH_CHECK(B.dim() == 3 && C.dim() == 3 && B.sizes() == C.sizes(), "selective_state_update: B, C [batch, G, N]");
  const int64_t groups = B.size(1), nstate = B.size(2);
  for (const Tensor* t : {&B, &C})
    TORCH_CHECK(t->stride(2) == 1 && (groups == 1 || t->stride(1) == nstate),
                "selective_state_update: B, C need unit stride over N and groups N apart (a batch stride is free)");
  TORCH_CHECK(dim % groups == 0, "selective_state_update: dim not divisible by G");
  check(state, "state", at::kFloat, {batch, dim, nstate});
  check(A, "A", at::kFloat, {dim, nstate});
  const auto dtp = x.scalar_type();
  TORCH_CHECK(dt.scalar_type() == dtp && B.scalar_type() == dtp && C.scalar_type() == dtp &&
                  (!z || z->scalar_type() == dtp),
              "selective_state_update: x, dt, z, B, C must share a dtype");
  if (dt_weight) {
    TORCH_CHECK(dt.dim() == 2 && dt.size(0) == batch && dt.stride(1) == 1,
                "selective_state_update: with dt_weight, dt must be [batch, R], unit stride over R");
    check(*dt_weight, "dt_weight", dtp, {dim, dt.size(1)});
  } else {
    TORCH_CHECK(dt.sizes() == x.sizes() && dt.stride(1) == 1, "selective_state_update: dt must be [batch, dim]");
  }
  if (z) TORCH_CHECK(z->sizes() == x.sizes() && z->stride(1) == 1, "selective_state_update: z must be [batch, dim]");
  if (D) check(*D, "D", at::kFloat, {dim});
  if (dt_bias) check(*dt_bias, "dt_bias", at::kFloat, {dim});
  Tensor out = at::empty({batch, dim}, x.options());
  zoo_ss::UpdateParams p{};
  p.batch = int(batch);
  p.dim = int(dim);
  p.nstate = int(nstate);
  p.ngroups = int(groups);
  p.dim_per_group = int(dim / groups);
  p.dt_rank = dt_weight ? int(dt.size(1)) : 0;
  p.softplus = softplus;
  p.x_stride = x.stride(0);
  p.dt_stride = dt.stride(0);
  p.z_stride = z ? z->stride(0) : 0;
  p.b_stride = B.stride(0);
  p.c_stride = C.stride(0);
  p.out_stride = dim;
  p.state = state.data_ptr<float>();
  p.x = x.data_ptr();
  p.dt = dt.data_ptr();
  p.dt_weight = dt_weight ? dt_weight->data_ptr() : nullptr;
  p.A = A.data_ptr<float>();
  p.B = B.data_ptr();
  p.C = C.data_ptr();
  p.D = ptr_or_null<float>(D);
  p.z = z ? z->data_ptr() : nullptr;
  p.dt_bias = ptr_or_null<float>(dt_bias);
  p.out = out.data_ptr();
  check_launch(zoo_ss::state_update(p, dtype_of(x), c10::cuda::getCurrentCUDAStream().stream()), "state update");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &scan_fwd, "selective scan forward");
  m.def("bwd", &scan_bwd, "selective scan backward");
  m.def("state_update", &state_update, "selective scan single-step state update");
}
