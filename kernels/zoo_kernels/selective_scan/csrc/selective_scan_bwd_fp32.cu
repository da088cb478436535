// Backward selective scan for float inputs.
#include "selective_scan_kernels.cuh"

namespace zoo_ss {
template cudaError_t scan_bwd_typed<float>(const ScanParams&, cudaStream_t);
}  // namespace zoo_ss
