#!/bin/bash
# What was written after the last GPU session and has not run on a card (see benchmarks/RESULTS.md, the newest
# session's "Changed after the last device call" items). On the GPU machine, from the repository root:
#     bash benchmarks/pending_gpu_checks.sh [part]     # part: tests | timing | all (default all)
# Logs go to $OUT (the device tool's output folder) or ./out/pending-gpu. fla's wheels are optional
# (.baselines/fla, as the README's "GPU machine without internet" says). Each group runs in its own process
# with a timeout, so one slow group does not starve the rest; kernel builds take about 45 s on a fresh machine.
set -u
out=${OUT:-out/pending-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD/kernels:$PWD:$PWD/.baselines/fla ZOO_KERNELS_CACHE=${ZOO_KERNELS_CACHE:-/tmp/zk} \
    TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/tc} ZOO_SSD_AUTOTUNE=0 PYTHONUNBUFFERED=1
part=${1:-all}
run() {  # run NAME SECONDS COMMAND...: one log per group, its exit status appended
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" "$@" > "$out/$name.txt" 2>&1
    echo "rc=$?" >> "$out/$name.txt"
    tail -2 "$out/$name.txt"
}
if [ "$part" = tests ] || [ "$part" = all ]; then
    # left-padded rows in the decode-attention kernels and in generate(cuda_graph=True); max_time and the other
    # host-loop settings; fla's self-check under inference_mode
    run tests-padded 240 python -m pytest -q -m cuda -p no:cacheprovider tests/test_static_generate.py \
        tests/test_decode_kernels.py -k "padded or cuda_graph"
    run tests-gla-fast 200 python -m pytest -q -m cuda -p no:cacheprovider tests/test_gla_fast.py
    # test_ssd_triton.py's cuda tests the twenty-ninth session's calls did not reach
    run tests-ssd-tail 240 python -m pytest -q -m cuda -p no:cacheprovider tests/test_ssd_triton.py \
        -k "packed_equals_separate or chunked_equals_whole or chunk_size_does_not_change or state_update_steps"
fi
if [ "$part" = timing ] || [ "$part" = all ]; then
    # eager generate (the all-ones mask now dropped on transformers 5.17), cuda_graph=True and "reuse", GLA with fla
    run timing-eager-vs-graph 300 python benchmarks/eager_decode_overhead.py --device cuda --dtype bfloat16 \
        --cuda-graph --size 130m --new-tokens 128 --prompt-len 512 --repeats 3
    # where an eager 130M step's 14-26 ms go (host launches, syncs): torch.profiler's top operators
    run profile-eager-mamba-130m 200 python benchmarks/eager_decode_overhead.py --device cuda --dtype bfloat16 \
        --size 130m --families mamba --new-tokens 16 --prompt-len 64 --profile torch --top 40
    # the decode-attention kernels took a HAS_START flag: Transformer++ at batch 64 against its last figure
    run timing-decode-b64 300 python benchmarks/generate.py --graph only --batches 64 \
        --models transformerpp mamba --new-tokens 32 --out "$out/results-generate.jsonl"
fi
