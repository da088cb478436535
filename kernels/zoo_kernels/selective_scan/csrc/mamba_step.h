// The fused Mamba-1 decode step (mamba_step.cu): conv update, x_proj, dt_proj, state update and gate of one
// token in one launch of 8-CTA thread-block clusters (Hopper and newer).
#pragma once

#include <cuda_runtime.h>

namespace zoo_ms {

enum DType { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kCluster = 8;    // CTAs per cluster: each takes dim / kCluster channels of the same rows
constexpr int kThreads = 256;  // threads per CTA
constexpr int kMaxRowChannels = 8 * kThreads;  // rows per CTA x dim / kCluster, at most

// The two kernels. kSlots: states in shared memory, any shapes the launcher's checks allow, every phase looping over
// its row slots (fast at one row per CTA). kRegisterRows: 2 or 4 rows per CTA in one wave, the states in registers,
// N = 16, dt_rank a multiple of 16 up to 64, dim / kCluster = 64 x kItems channels per CTA (kItems 2-4), fp16/bf16
// activations, the state in fp32 or in the activations' dtype.
enum Kernel { kSlots = 1, kRegisterRows = 2 };
constexpr int kRegN = 16;         // the register-rows kernel's N
constexpr int kRegMaxRank = 64;   // and its largest dt_rank (Mamba-130M: 48, 370M: 64)

// Whether the register-rows kernel takes these sizes (its rows per CTA aside).
bool register_rows_fit(int dim, int nstate, int rank, int width, int elem_bytes);

struct StepParams {
  int batch, dim, nstate, rank, width;  // rank R: dt_proj's input width; width W: the conv's taps (<= 4)
  int rows;                             // batch rows per CTA (the kernel's template argument)
  int kernel;                           // kSlots or kRegisterRows (above)
  bool pdl;                             // launch as a programmatic dependent of the previous kernel
  const void* x;                        // [batch, dim] (activation dtype T), unit stride over dim
  const void* z;                        // [batch, dim] (T), unit stride over dim
  const void* mask;                     // [batch] (T; 1 = token, 0 = padding: x and u zeroed) or null
  long mask_stride;
  long x_stride, z_stride, out_stride;  // batch strides, in elements
  float* conv_state;                    // [batch, dim, W - 1] fp32, contiguous; updated in place
  const float* conv_w;                  // [dim, W] fp32
  const float* conv_b;                  // [dim] fp32 or null
  const void* x_proj_w;                 // [R + 2N, dim] (T)
  const void* dt_w;                     // [dim, R] (T)
  const float* dt_bias;                 // [dim] fp32 or null
  const float* A;                       // [dim, N] fp32
  const float* D;                       // [dim] fp32 or null
  void* state;                          // [batch, dim, N] fp32 (or T: register-rows kernel), contiguous; in place
  bool state_low;                       // the state is in T, not fp32
  void* out;                            // [batch, dim] (T)
};

// Dynamic shared memory of one CTA for these sizes and `rows` rows per CTA, in bytes.
size_t step_smem_bytes(int dim, int nstate, int rank, int width, int rows, int elem_bytes, int kernel = kSlots);

// How many clusters of the kernel for `rows` rows per CTA and `smem` bytes can be resident at once (0 on error);
// dim only matters to kRegisterRows (its template argument kItems).
int max_active_clusters(DType dtype, int rows, size_t smem, int kernel = kSlots, int dim = 0);

#ifdef ZOO_MS_PHASES
// Phase timing (a build with -DZOO_MS_PHASES only): per CTA (the first kPhaseCtas, blockIdx.y * gridDim.x +
// blockIdx.x), slots 0..kPhases-1: clock64() of thread 0 at the phase boundaries (start, copies issued, after the
// grid-dependency wait, conv, x_proj part, cluster sync, cluster sum, dt, state update, end); kPhases: globaltimer
// (ns) at the start, kPhases + 1: at the end, kPhases + 2: the SM. Left from the last launch.
constexpr int kPhases = 10, kPhaseSlots = kPhases + 3, kPhaseCtas = 1024;
cudaError_t read_phases(unsigned long long* host);  // kPhaseCtas x kPhaseSlots values
#endif

// Launches the step on `stream` (the caller checked the shapes, alignments and that the smem fits).
cudaError_t mamba_step(const StepParams& p, DType dtype, cudaStream_t stream);

}  // namespace zoo_ms
