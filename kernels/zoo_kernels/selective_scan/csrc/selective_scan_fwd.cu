// Forward selective scan for every element type, and the dispatch of the backward by element type.
#include "selective_scan_kernels.cuh"

namespace zoo_ss {

cudaError_t scan_fwd(const ScanParams& p, DType dtype, cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return cudaSuccess;  // nothing to do (an empty grid is a launch error)
  switch (dtype) {
    case kFloat32: return scan_fwd_typed<float>(p, stream);
    case kBFloat16: return scan_fwd_typed<__nv_bfloat16>(p, stream);
    case kFloat16: return scan_fwd_typed<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

// Defined (explicitly instantiated) in selective_scan_bwd_<type>.cu, one file per type for parallel builds.
extern template cudaError_t scan_bwd_typed<float>(const ScanParams&, cudaStream_t);
extern template cudaError_t scan_bwd_typed<__nv_bfloat16>(const ScanParams&, cudaStream_t);
extern template cudaError_t scan_bwd_typed<__half>(const ScanParams&, cudaStream_t);

cudaError_t scan_bwd(const ScanParams& p, DType dtype, cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return cudaSuccess;  // nothing to do (an empty grid is a launch error)
  switch (dtype) {
    case kFloat32: return scan_bwd_typed<float>(p, stream);
    case kBFloat16: return scan_bwd_typed<__nv_bfloat16>(p, stream);
    case kFloat16: return scan_bwd_typed<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace zoo_ss
