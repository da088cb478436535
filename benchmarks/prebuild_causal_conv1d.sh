#!/bin/bash
# Build Dao-AILab causal_conv1d 1.7.0's extension (the baseline of benchmarks/conv1d.py) ahead of a GPU call, on a
# machine with nvcc and no GPU: for sm_90, against the headers and libraries of the GPU machine's torch wheel
# (2.11.0+cu130) and Python 3.12, with the flags of the package's setup.py. Its four sources take more than 7
# minutes to build on the GPU machine; here they build in parallel, once. The result goes where conv1d.py looks:
#
#   pip download torch==2.11.0 --no-deps -d /tmp/t211 && mkdir -p /tmp/t211x && \
#     (cd /tmp/t211x && unzip -q /tmp/t211/torch-2.11.0-*.whl 'torch/include/*' 'torch/lib/*')
#   TORCH_ROOT=/tmp/t211x/torch PYINC=/path/to/include/python3.12 benchmarks/prebuild_causal_conv1d.sh .baselines
set -euo pipefail
BASELINES=${1:-.baselines}
T=${TORCH_ROOT:?the unpacked torch folder of the GPU machine\'s torch wheel (its include/ and lib/)}
PYINC=${PYINC:?Python.h\'s folder for the GPU machine\'s Python (3.12)}
CUDA=${CUDA_HOME:-/usr/local/cuda}
ARCH=${ARCH:-90}
SRC=$BASELINES/cc/causal_conv1d-1.7.0/csrc
if [ ! -d "$SRC" ]; then
  mkdir -p "$BASELINES/cc" && tar xzf "$BASELINES/causal_conv1d-1.7.0.tar.gz" -C "$BASELINES/cc"
fi
OBJ=$(mktemp -d)
OUT=$BASELINES/cc/prebuilt
mkdir -p "$OUT"
INC="-isystem $T/include -isystem $T/include/torch/csrc/api/include -isystem $CUDA/include -isystem $PYINC -I$SRC"
DEFS="-DTORCH_EXTENSION_NAME=causal_conv1d_cuda -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1"
NVFLAGS="-O3 -std=c++17 -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_BFLOAT16_OPERATORS__
 -U__CUDA_NO_BFLOAT16_CONVERSIONS__ -U__CUDA_NO_BFLOAT162_OPERATORS__ -U__CUDA_NO_BFLOAT162_CONVERSIONS__
 --expt-relaxed-constexpr --expt-extended-lambda --use_fast_math -lineinfo
 -gencode arch=compute_$ARCH,code=sm_$ARCH --compiler-options -fPIC"
pids=()
for f in causal_conv1d_fwd causal_conv1d_bwd causal_conv1d_update; do
  nvcc $DEFS $INC $NVFLAGS -c "$SRC/$f.cu" -o "$OBJ/$f.o" &
  pids+=($!)
done
g++ $DEFS $INC -O3 -std=c++17 -fPIC -c "$SRC/causal_conv1d.cpp" -o "$OBJ/causal_conv1d.o"
for p in "${pids[@]}"; do wait "$p"; done
g++ -shared "$OBJ"/*.o -L"$T/lib" -lc10 -lc10_cuda -ltorch_cpu -ltorch_cuda -ltorch -ltorch_python \
  -L"$CUDA/lib64" -lcudart -o "$OUT/causal_conv1d_cuda.so"
rm -rf "$OBJ"
ls -la "$OUT/causal_conv1d_cuda.so"
