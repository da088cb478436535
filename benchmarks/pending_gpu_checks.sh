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
export out  # (groups write their rows there too)
mkdir -p "$out"
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
# the thirty-ninth session's ZOO_* switch checks in the kernel wrappers (pdl_linear, the fused Mamba step, the SSD
# autotune switch, add_norm, the decode argmax) and the decoders that read them; the captured step's stop-string
# window (an empty stop string); the fused add + norm calling norms that PEFT wrapped (test_modeling, test_hf_usage,
# test_eval); the SSD scan's segment ids at L = 1 and 2 (one new cuda test; the file's others take ~8 minutes); the
# fortieth session's skinny_linear input checks (test_decode_kernels) and SSD state update of a strided state
add tests-s39 540 "python -m pytest -q -m cuda -p no:cacheprovider tests/test_env_switches.py \
tests/test_pdl_linear.py tests/test_mamba_fused_step.py tests/test_static_decode.py tests/test_argmax.py \
tests/test_decode_kernels.py tests/test_modeling.py tests/test_hf_usage.py tests/test_eval.py -rs; \
python -m pytest -q -m cuda -p no:cacheprovider tests/test_static_generate.py -k stop -rs; \
python -m pytest -q -m cuda -p no:cacheprovider tests/test_ssd_triton.py -k 'one_or_two or state_update' -rs"
# the fortieth session's merges on a card: a resume that changes optim.fused (the step counts move to the GPU for the
# fused kernel), a transformers Mamba's A_log not decayed, the saved model's reload, a DoRA adapter in zoo generate
# (these tests are not marked cuda: on the GPU machine they train and load on the GPU); and the micro-benchmarks cut
# short by timeout's SIGTERM keep the rows they measured (exit 130)
add tests-s40 420 "python -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_cli_errors.py tests/test_hf_usage.py \
-k 'fused_adamw or a_log or auto_classes or dora or layer_replication' -rs; \
timeout -s TERM 25 python benchmarks/decode_attention.py --quick --out \$out/s40-decode-attention.jsonl; \
echo decode_attention cut short: rc=\$? rows=\$(cat \$out/s40-decode-attention.jsonl 2>/dev/null | wc -l); \
python benchmarks/argmax.py --out \$out/s40-argmax.jsonl; echo argmax: rc=\$? rows=\$(wc -l < \$out/s40-argmax.jsonl)"
# the forty-first session's merges on a card: ZooForCausalLM.forward names `cache` (zoo.decode.cache_argument now
# passes the cache under that name to zoo models: the static decode, eval, passkey, finetune and train paths that
# feed a cache), and the captured decode of a model whose mixers a checkpoint filled in part
add tests-s41 420 "python -m pytest -q -m cuda -p no:cacheprovider tests/test_static_generate.py \
tests/test_static_decode.py tests/test_eval.py -rs; python -m pytest -q -p no:cacheprovider tests/test_hf_usage.py \
tests/test_modeling.py -k 'prompt or continuous or missing_from_a_checkpoint' -rs"
# the forty-second session's benchmark changes on a card (their options are now checked before the CUDA check, rows
# say why a baseline is missing): generate.py and train_throughput.py end to end on two models each without their
# transformers baselines (the rows' notes name them), and a probe
add bench-s42 420 "python benchmarks/generate.py --models transformerpp mamba --batches 1,4 --prompt-len 128 \
--new-tokens 16 --out \$out/s42-generate.jsonl; echo generate: rc=\$? rows=\$(wc -l < \$out/s42-generate.jsonl); \
python benchmarks/train_throughput.py --models transformerpp mamba --seq-lens 512 --warmup 1 --steps 2 \
--out \$out/s42-train.jsonl; echo train_throughput: rc=\$? rows=\$(wc -l < \$out/s42-train.jsonl); \
grep -h -o 'no baseline: [^;\"]*' \$out/s42-generate.jsonl \$out/s42-train.jsonl | sort | uniq -c; \
python benchmarks/probe_split_decode.py --help > /dev/null && echo probe_split_decode: ok"
order=(tests-s39 tests-s40 tests-s41 bench-s42 tests-fsdp-gpus)

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
