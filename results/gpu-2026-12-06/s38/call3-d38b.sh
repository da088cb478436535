#!/bin/bash
# Session 38, call 3: the conv1d kernels with the lane 0 reads inside its row (old = the source before).
export PYTHONPATH=$PWD/kernels:$PWD:$PWD/.baselines/fla ZOO_KERNELS_CACHE=/tmp/zk TRITON_CACHE_DIR=/tmp/tc ZOO_SSD_AUTOTUNE=0 PYTHONUNBUFFERED=1
pip install --no-deps --no-build-isolation -e . > /dev/null 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python -m pytest -q -m cuda -p no:cacheprovider tests/test_conv1d_cuda.py tests/test_odd_shapes_cuda.py -x > $OUT/call3-tests-conv.txt 2>&1; echo "tests rc=$?" >> $OUT/call3-tests-conv.txt; tail -2 $OUT/call3-tests-conv.txt
timeout 200 python benchmarks/probe_conv1d.py --baselines .baselines --variant old=.baselines/conv_main --variant new= > $OUT/call3-probe.txt 2>&1; echo "probe rc=$?" >> $OUT/call3-probe.txt; cat $OUT/call3-probe.txt | tail -12

