// One decoding step of the selective scan: one thread per (batch row, channel) updates its N states in place.
// A step moves batch * dim * N * 8 bytes of state; at decode sizes the launch dominates, so the kernel is
// kept to one launch instead of the ten small ones of the torch path.
#include "selective_scan_kernels.cuh"

namespace zoo_ss {

template <typename T>
__global__ void state_update_kernel(const UpdateParams p) {
  const int d = blockIdx.x * blockDim.x + threadIdx.x, b = blockIdx.y;
  if (d >= p.dim) return;
  const int N = p.nstate, g = d / p.dim_per_group;
  const float x = to_f(static_cast<const T*>(p.x)[b * p.x_stride + d]);
  float dt = to_f(static_cast<const T*>(p.dt)[b * p.dt_stride + d]);
  if (p.dt_bias) dt += p.dt_bias[d];
  if (p.softplus) dt = softplus_f(dt);
  const T* Bp = static_cast<const T*>(p.B) + b * p.bc_stride + size_t(g) * N;
  const T* Cp = static_cast<const T*>(p.C) + b * p.bc_stride + size_t(g) * N;
  const float* A = p.A + size_t(d) * N;
  float* st = p.state + (size_t(b) * p.dim + d) * N;
  const float dx = dt * x;
  float y = 0.f;
  for (int n = 0; n < N; ++n) {
    const float hn = fmaf(st[n], expf(dt * A[n]), dx * to_f(Bp[n]));
    st[n] = hn;
    y = fmaf(hn, to_f(Cp[n]), y);
  }
  if (p.D) y = fmaf(p.D[d], x, y);
  if (p.z) {
    const float zz = to_f(static_cast<const T*>(p.z)[b * p.z_stride + d]);
    y *= zz * sigmoid_f(zz);
  }
  static_cast<T*>(p.out)[b * p.out_stride + d] = from_f<T>(y);
}

template <typename T>
cudaError_t launch_update(const UpdateParams& p, cudaStream_t stream) {
  constexpr int kThreads = 128;
  state_update_kernel<T><<<dim3((p.dim + kThreads - 1) / kThreads, p.batch), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t state_update(const UpdateParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32: return launch_update<float>(p, stream);
    case kBFloat16: return launch_update<__nv_bfloat16>(p, stream);
    case kFloat16: return launch_update<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace zoo_ss
