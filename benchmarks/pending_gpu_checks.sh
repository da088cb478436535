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
# (the thirtieth session ran the twenty-ninth's groups: tests-padded, tests-gla-fast, tests-ssd-tail, the eager /
# graph timings and the eager profile: the tests passed, the figures are in benchmarks/RESULTS.md)
# zoo.layers.Linear takes the skinny Triton kernel only inside zoo.decode's steps now: transformers' eager generate()
# runs its one-row projections on cuBLAS. Compare with the thirtieth session's call 5 (eager: Mamba 10.08,
# Transformer++ 12.95, Jamba-style 8.82 ms/token; another machine, not side by side)
add timing-eager-130m 300 "python benchmarks/eager_decode_overhead.py --device cuda --dtype bfloat16 \
--size 130m --families mamba transformerpp jamba --new-tokens 128 --prompt-len 512 --repeats 3"
# generate(cuda_graph=True) with stop_strings: the check between replays, the finished rows the graph reads
add tests-stop-strings 200 "python -m pytest -q -m cuda -p no:cacheprovider tests/test_static_generate.py \
-k stop_strings"
# where the fused Mamba step's 15 us at batch 64 go inside a decode step (issue 9; the probe's --in-model is new)
add phases-in-model 240 "python benchmarks/probe_mamba_step_phases.py --kernel rows --in-model mamba-130m \
--cases 64:4,1:2"
# issue 9's table with bf16 recurrent states for every family in one run (the thirtieth session ran Mamba and
# Jamba-style only; Mamba-2's and GLA's bf16 figures are the H200's)
add timing-decode-b64-bf16-states 300 "python benchmarks/generate.py --graph only --batches 64 --models \
transformerpp mamba jamba gla mamba2 --state-dtype model --new-tokens 32 --out $out/results-generate.jsonl"
# (thirty-first session, no GPU lent) greedy decoding's argmax split into a per-chunk pass and a per-row pick
# (zoo_kernels.argmax): its cuda test, then its time against torch.argmax at batch 1, 16 and 64 (the one-pass
# kernel it replaces took 13.1 us at batch 64 on the H100: results/gpu-2026-12-05/s30/call1-prof-b64.txt)
add tests-argmax 150 "python -m pytest -q -m cuda -p no:cacheprovider tests/test_argmax.py && \
python benchmarks/argmax.py --batches 1,16,64 --out $out/results-argmax.jsonl"
# the FSDP test on one GPU, and on two where the machine has them (nvidia-h100-x2: NCCL across GPUs, never run)
add tests-fsdp-gpus 300 "python -m pytest -q -m cuda -p no:cacheprovider tests/test_train.py -k fsdp_on_gpus -rs"
# cuBLAS's default route against cuBLASLt (TORCH_BLAS_PREFER_CUBLASLT=1) for the decode projections at batch 64
add probe-cublaslt 240 "for p in 0 1; do echo TORCH_BLAS_PREFER_CUBLASLT=\$p; TORCH_BLAS_PREFER_CUBLASLT=\$p \
python benchmarks/generate.py --graph only --batches 64 --models mamba --state-dtype model --new-tokens 32; done"
# (thirty-first session) a pad after a token is no step of Mamba / Mamba-2 / GLA and their conv windows skip pads
# (zoo.layers.lay_out_past_pads): the masked prefill on the CUDA conv and scan kernels, through the padded generate
# tests, and the masked training path's forward and backward on the card
add tests-pads-gpu 300 "python -m pytest -q -m cuda -p no:cacheprovider tests/test_mixers.py \
tests/test_static_generate.py tests/test_finetune_cuda.py tests/test_odd_shapes_cuda.py -k 'pad or mask or prompt'"
# (thirty-second session) a pad fed as a one-token step is no step (the masked step's unfused CUDA path: conv update,
# state update with PAD_DT), and sliding-window attention counting a row's tokens, not its pads, on the GPU backends
# and a bf16 from_pretrained model holding fp32 A_log / D on the scan kernels, the fused step and cuda_graph
add tests-step-pads-window 300 "python -m pytest -q -m cuda -p no:cacheprovider tests/test_modeling.py \
tests/test_attention_cuda.py -k 'one_token_step or window or pad or fp32_ssm'"
# (thirty-third session) decoded constants (Mamba's A and step constants, Mamba-2's A) written afresh into the kept
# tensors at each new sequence: weights changed through .data reach the fused step and a kept cuda_graph="reuse" graph
add tests-decoded-constants 300 "python -m pytest -q -m cuda -p no:cacheprovider tests/test_static_generate.py \
tests/test_mamba_fused_step.py -k 'written_through_data or reuse or fused'"
order=(tests-argmax tests-pads-gpu tests-step-pads-window tests-decoded-constants tests-stop-strings phases-in-model timing-decode-b64-bf16-states timing-eager-130m tests-fsdp-gpus
       probe-cublaslt)

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
