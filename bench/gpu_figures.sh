#!/usr/bin/env bash
# Issue 23's GPU figures in one call on a lent GPU machine: bench.gpu_engine for
# each model shape, its whole output kept in $OUT/<shape>.txt as it is written.
# The shapes share one time budget: each may take the time left divided by the
# shapes still to run, so a quick shape leaves its time to the slower
# ones after it, and a shape that runs long costs only its own later figures.
#
# Those machines have torch and transformers but not llguidance, which the
# batcher imports, and they cannot download. Here, first:
#   python -m pip download --no-deps --only-binary=:all: -d .whl llguidance==1.9.1
# then run this with `.whl` carried (.gitignore keeps it out of git). That wheel
# is cp39-abi3, manylinux_2_31: it installs on their Python 3.12 as it is, and a
# download that names their platforms must name manylinux_2_31_x86_64 too.
#
#   SHAPES="qwen3-0.6b" BUDGET_S=240 PYTHON=python3 bench/gpu_figures.sh [gpu_engine options]
#
# The shapes run in the order of what the issue asks first: qwen3-0.6b holds
# the nano-vllm target, and the embedded model's shape was measured before.
# Options given here go after the defaults (--loop-requests 2: the walkthrough
# loop is the baseline, and slow), so they win.
set -u
started=$SECONDS
budget=${BUDGET_S:-560}  # within a device call's 600 s, installs included
out=${OUT:-/tmp/gpu-figures}
python=${PYTHON:-python3}  # the device image's holds torch
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .whl/*.whl || exit
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
# One line that names what is missing, rather than every shape failing alike.
"$python" -c "import sys, torch, transformers, tokenizers, safetensors, numpy, jinja2, llguidance
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      'transformers', transformers.__version__)" || exit
read -r -a shapes <<< "${SHAPES:-qwen3-0.6b qwen2.5-0.5b llama3.2-1b smollm2-135m}"
left=${#shapes[@]}
for shape in "${shapes[@]}"; do
    limit=$(( (budget - (SECONDS - started)) / left ))
    left=$(( left - 1 ))
    if (( limit < 1 )); then
        echo "$shape: skipped, the budget of ${budget} s is spent"
        continue
    fi
    timeout "$limit" "$python" -m bench.gpu_engine --shape "$shape" --loop-requests 2 "$@" \
        > "$out/$shape.txt" 2>&1
    echo "$shape: exit $? after $(( SECONDS - started )) s of the budget (limit ${limit} s)"
    grep -E "^device|same greedy|the same with|first token|GPU memory|nano-vllm|workload again|prompt alone|^kept pages" \
        "$out/$shape.txt"
    grep -E "attention alone|GPU kernels|fused and torch|^streamed|^\| (1|64|256) \|" "$out/$shape.txt"
done
