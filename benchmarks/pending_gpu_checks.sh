#!/bin/bash
# What was written after the last GPU session and has not run on a card (see benchmarks/RESULTS.md, the newest
# session's "Changed after the last device call" items). On the GPU machine, from the repository root:
#     bash benchmarks/pending_gpu_checks.sh                 # every group (about 25 minutes at most: split it)
#     bash benchmarks/pending_gpu_checks.sh GROUP [GROUP]   # the groups named (listed with --list)
# A device call runs at most 10 minutes: name groups whose timeouts (below) add up to less. Logs go to $OUT (the
# device tool's output folder) or ./out/pending-gpu, one file per group with its exit status. fla's wheels are
# optional (.baselines/fla, as the README's "GPU machine without internet" says). Kernel builds take about 45 s on
# a fresh machine (the first group pays them).
set -u
out=${OUT:-out/pending-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD/kernels:$PWD:$PWD/.baselines/fla ZOO_KERNELS_CACHE=${ZOO_KERNELS_CACHE:-/tmp/zk} \
    TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/tc} ZOO_SSD_AUTOTUNE=0 PYTHONUNBUFFERED=1

declare -A seconds commands
add() { seconds[$1]=$2; commands[$1]=$3; }
# left-padded rows in the decode-attention kernels and in generate(cuda_graph=True), cuda_graph="reuse", the
# host-loop settings (max_time, ...)
add tests-padded 240 "python -m pytest -q -m cuda -p no:cacheprovider tests/test_static_generate.py \
tests/test_decode_kernels.py -k 'padded or cuda_graph'"
# fla's self-check under torch.inference_mode
add tests-gla-fast 200 "python -m pytest -q -m cuda -p no:cacheprovider tests/test_gla_fast.py"
# test_ssd_triton.py's cuda tests the twenty-ninth session's calls did not reach
add tests-ssd-tail 240 "python -m pytest -q -m cuda -p no:cacheprovider tests/test_ssd_triton.py \
-k 'packed_equals_separate or chunked_equals_whole or chunk_size_does_not_change or state_update_steps'"
# eager generate (the all-ones mask now dropped on transformers 5.17), cuda_graph=True and "reuse", GLA with fla
add timing-eager-vs-graph 300 "python benchmarks/eager_decode_overhead.py --device cuda --dtype bfloat16 \
--cuda-graph --size 130m --new-tokens 128 --prompt-len 512 --repeats 3"
# where an eager 130M step's 14-26 ms go (host launches, syncs): torch.profiler's top operators
add profile-eager-mamba-130m 200 "python benchmarks/eager_decode_overhead.py --device cuda --dtype bfloat16 \
--size 130m --families mamba --new-tokens 16 --prompt-len 64 --profile torch --top 40"
# the decode-attention kernels took a HAS_START flag: Transformer++ at batch 64 against its last figure
add timing-decode-b64 300 "python benchmarks/generate.py --graph only --batches 64 --models transformerpp mamba \
--new-tokens 32 --out $out/results-generate.jsonl"
order=(tests-padded tests-gla-fast tests-ssd-tail timing-eager-vs-graph profile-eager-mamba-130m timing-decode-b64)

if [ "${1:-}" = --list ]; then
    for name in "${order[@]}"; do echo "$name (${seconds[$name]} s)"; done
    exit 0
fi
groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=("${order[@]}")
for name in "${groups[@]}"; do
    if [ -z "${commands[$name]+x}" ]; then
        echo "pending_gpu_checks.sh: no group $name (--list names them)" >&2
        exit 2
    fi
done
pip install --no-deps --no-build-isolation -e . > /dev/null 2>&1
for name in "${groups[@]}"; do
    timeout "${seconds[$name]}" bash -c "${commands[$name]}" > "$out/$name.txt" 2>&1
    echo "rc=$?" >> "$out/$name.txt"
    echo "== $name"; tail -2 "$out/$name.txt"
done
