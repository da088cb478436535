#!/bin/bash
# The whole `pytest -m cuda` suite on the GPU machine in one device call: the five JIT extensions built first, one
# process each, then three pytest processes side by side on the one GPU (the twenty-fourth session's way: 464 s on
# an H200). From the repository root:
#     bash benchmarks/cuda_suite.sh            # logs to $OUT (the device tool's output folder) or ./out/cuda-suite
# Each shard stops at ZOO_SUITE_TIMEOUT seconds (default 500) so that a device call (600 s at most) returns its logs.
set -u
out=${OUT:-out/cuda-suite}
mkdir -p "$out"
export PYTHONPATH=$PWD/kernels:$PWD:$PWD/.baselines/fla ZOO_KERNELS_CACHE=${ZOO_KERNELS_CACHE:-/tmp/zk} \
    TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/tc} ZOO_SSD_AUTOTUNE=0 PYTHONUNBUFFERED=1
limit=${ZOO_SUITE_TIMEOUT:-500}
pip install --no-deps --no-build-isolation -e . > /dev/null 2>&1
start=$(date +%s)
for ext in zoo_kernels.selective_scan.cuda zoo_kernels.selective_scan.fused_step \
           zoo_kernels.selective_scan.fused_layers zoo_kernels.pdl_linear zoo_kernels.conv1d.cuda; do
    python -c "import importlib; e = importlib.import_module('$ext')._EXTENSION; \
print('$ext', 'built' if e.available() else e.why_unavailable())" >> "$out/build.txt" 2>&1 &
done
wait
echo "extensions: $(( $(date +%s) - start )) s"; cat "$out/build.txt"
kernels=(tests/test_decode_kernels.py tests/test_attention_cuda.py tests/test_kernel_limits_cuda.py)
scans=(tests/test_selective_scan_cuda.py tests/test_ssd_triton.py tests/test_gla_fast.py tests/test_conv1d_cuda.py
       tests/test_mamba_fused_step.py tests/test_mamba_layers.py tests/test_pdl_linear.py tests/test_cross_entropy.py
       tests/test_argmax.py)
rest=()
for f in "${kernels[@]}" "${scans[@]}"; do rest+=(--ignore "$f"); done
run() {  # shard name, pytest arguments
    local name=$1; shift
    timeout "$limit" python -m pytest -q -m cuda -p no:cacheprovider -rfEs "$@" > "$out/$name.txt" 2>&1
    echo "rc=$?" >> "$out/$name.txt"
}
run kernels "${kernels[@]}" & run scans "${scans[@]}" & run rest tests "${rest[@]}" &
wait
for name in kernels scans rest; do echo "== $name"; grep -E "passed|failed|error" "$out/$name.txt" | tail -2; \
    tail -1 "$out/$name.txt"; done
echo "suite: $(( $(date +%s) - start )) s"
