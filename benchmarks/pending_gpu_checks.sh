#!/bin/bash
# What was written after the last GPU session and has not run on a card (see benchmarks/RESULTS.md, the newest
# session's "Changed after the last device call" items). On the GPU machine, from the repository root:
#     bash benchmarks/pending_gpu_checks.sh                 # every group
#     bash benchmarks/pending_gpu_checks.sh GROUP [GROUP]   # the groups named (listed with --list)
# A device call runs at most 10 minutes: name groups whose timeouts (below) add up to less. Logs go to $OUT (the
# device tool's output folder) or ./out/pending-gpu, one file per group with its exit status. fla's wheels are
# optional (.baselines/fla, as the README's "GPU machine without internet" says). Kernel builds take about 45 s on
# a fresh machine (the first group pays them).
set -u
out=${OUT:-out/pending-gpu}
export out  # (groups write their rows there too)
export PYTHONPATH=$PWD/kernels:$PWD:$PWD/.baselines/fla ZOO_KERNELS_CACHE=${ZOO_KERNELS_CACHE:-/tmp/zk} \
    TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/tc} ZOO_SSD_AUTOTUNE=0 PYTHONUNBUFFERED=1

declare -A seconds commands
add() { seconds[$1]=$2; commands[$1]=$3; }
# (the thirty-fourth session ran the thirty-first to thirty-third sessions' groups on an H100: tests-argmax,
# tests-pads-gpu, tests-step-pads-window, tests-decoded-constants, tests-stop-strings, phases-in-model, the batch-64
# table with bf16 states, the eager timing, probe-cublaslt: the tests passed, the figures are in
# benchmarks/RESULTS.md)
# the FSDP test on two GPUs (nvidia-h100-x2: NCCL across GPUs, never run; its one-GPU case passed, thirty-fourth session)
add tests-fsdp-gpus 300 "python -m pytest -q -m cuda -p no:cacheprovider tests/test_train.py -k fsdp_on_gpus -rs"
# (tests-ssd-gla, the SSD Triton and GLA kernel tests that did not finish in the thirty-fifth session's calls: 39
# passed in 475 s on an H100 in the thirty-sixth session's first call)
# (tests-static-ring, the windowed static KV ring's cuda tests: 26 passed, thirty-sixth session's call 2)
# (tests-compare-cuda, compare's throughput peak after the warmup steps: 4 passed, thirty-sixth session's call 4)
# (the thirty-seventh session's tests-model-static, tests-state-cuda and timing-decode-b64: 36 and 25 passed at
# 80e24de, issue 9's table unchanged; benchmarks/RESULTS.md)
# (tests-after-s37, the thirty-seventh session's changes merged after its last call: 38 passed in 165 s on an H100,
# thirty-eighth session's call 1)
# (tests-s38, the cuda tests of the thirty-eighth session's merges: 83 passed, 1 skipped on an H100, its call 5)
# (tests-after-s38, the thirty-eighth session's changes merged after its last call: 71 passed, 1 skipped on an H200,
# thirty-ninth session's call 1)
# (tests-s39, tests-s40, tests-s41 and bench-s42, the thirty-ninth to forty-second sessions' changes: all passed on an
# H100 in the forty-third session's calls 1-4, after two tests of tests-s40 that assumed the CPU were fixed; the
# whole cuda suite passed there too, 1059 passed and 1 skipped; benchmarks/RESULTS.md)
# (tests-noncuda, the README's test command on the GPU machine: 29 failures in the forty-third session's call 6, fixed
# after it; in the forty-fourth session 12 failed in call 1 (3110 passed) and, after fixes, 4 in call 2 (3178 passed,
# 187 skipped), all of them again tests that assumed a CPU machine save one product bug: train.precision auto asked
# for bf16 for a run pinned to the CPU on a GPU machine)
# (tests-s44, the four tests fixed after the forty-fourth session's last call, and the whole README test command:
# 3200 passed, 187 skipped, none failed on an H100 in the forty-fifth session's call 1, at da376a3)
# (the forty-fifth and forty-sixth sessions' CPU audits: tests-noncuda at 6031378 in the forty-seventh session's
# call 1 on an H100, 3325 passed and 2 failed, tests that assumed the CPU, fixed after it; tests-cuda-touched in its
# call 2, 304 passed)
# the README's test command on the GPU machine, whole (3-5 minutes with 14 workers on the H100's machine): the
# forty-seventh session's CPU audits merged after its call 2 (and the two fixed tests) have not run on a card
add tests-noncuda 560 "python -m pytest -q -m 'not cuda' -n 14 -p no:cacheprovider -rfE --timeout 300"
# the cuda tests of the files whose modules the forty-fifth to forty-seventh sessions changed on the CPU (the decoding
# steps from grad leaves in zoo/cache.py, attention's empty chunk with seq_idx, cap_state's copies, zoo train's and
# compare's builds, the passkey checks; 304 passed at 6031378, forty-seventh session's call 2: again for the later
# merges)
add tests-cuda-touched 560 "python -m pytest -q -m cuda -p no:cacheprovider -rfE --timeout 300 tests/test_state.py \
    tests/test_static_decode.py tests/test_static_generate.py tests/test_attention_cuda.py tests/test_modeling.py \
    tests/test_mixers.py tests/test_compare.py tests/test_train.py tests/test_finetune_cuda.py"
order=(tests-noncuda tests-cuda-touched tests-fsdp-gpus)

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
mkdir -p "$out"  # (not for --list)
pip install --no-deps --no-build-isolation -e . > /dev/null 2>&1
for name in "${groups[@]}"; do
    timeout "${seconds[$name]}" bash -c "${commands[$name]}" > "$out/$name.txt" 2>&1
    echo "rc=$?" >> "$out/$name.txt"
    echo "== $name"; tail -2 "$out/$name.txt"
done
