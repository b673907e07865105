#!/usr/bin/env bash
# Issue 23's GPU figures in one call on a lent GPU machine: bench.gpu_engine for
# each model shape, each under a time limit of its own, its whole output kept
# in $OUT/<shape>.txt as it is written, so a shape that runs long costs only
# its own figures.
#
# Those machines have torch and transformers but not llguidance, which the
# batcher imports, and they cannot download. Here, first:
#   python -m pip download --no-deps --only-binary=:all: -d .whl llguidance==1.9.1
# then run this with `.whl` carried (.gitignore keeps it out of git).
#
#   SHAPES="qwen3-0.6b" SHAPE_TIMEOUT_S=240 PYTHON=python3 bench/gpu_figures.sh [gpu_engine options]
set -u
out=${OUT:-/tmp/gpu-figures}
python=${PYTHON:-python3}  # the device image's holds torch
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .whl/*.whl || exit
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
for shape in ${SHAPES:-smollm2-135m qwen3-0.6b qwen2.5-0.5b llama3.2-1b}; do
    timeout "${SHAPE_TIMEOUT_S:-140}" "$python" -m bench.gpu_engine --shape "$shape" "$@" \
        > "$out/$shape.txt" 2>&1
    echo "$shape: exit $?"
    grep -E "^device|same greedy|the same with|first token|GPU memory|nano-vllm|prompt alone" \
        "$out/$shape.txt"
    grep -E "attention alone|GPU kernels|fused and torch|^streamed|^\| (1|64|256) \|" "$out/$shape.txt"
done
