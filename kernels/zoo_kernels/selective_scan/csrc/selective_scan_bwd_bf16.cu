// Backward selective scan for __nv_bfloat16 inputs.
#include "selective_scan_kernels.cuh"

namespace zoo_ss {
template cudaError_t scan_bwd_typed<__nv_bfloat16>(const ScanParams&, cudaStream_t);
}  // namespace zoo_ss
