// Backward selective scan for __half inputs.
#include "selective_scan_kernels.cuh"

namespace zoo_ss {
template cudaError_t scan_bwd_typed<__half>(const ScanParams&, cudaStream_t);
}  // namespace zoo_ss
