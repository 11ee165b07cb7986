#!/usr/bin/env bash
# One bf16 training step of the 1.3B-shaped unified model on a GPU: step time and MFU.
#   benchmarks/gpu_check.sh              # on a lent GPU machine; finishes in under 5 minutes
#   benchmarks/gpu_check.sh --dry-run    # toy sizes on a CPU, to check the script
# Extra arguments go to benchmarks/gpu_check.py (--steps, --latent C F H W, --peak-tflops, ...).
# The JSON goes to $OUT/gpu_check.json when $OUT is set (the device tool's folder), else to
# benchmarks/results/gpu_check.json (not written for a dry run unless --out is given).
set -euo pipefail
cd "$(dirname "$0")/.."

# The project's venv here; on a GPU machine the system python3 holds CUDA torch, and the
# package is used from the source tree.
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
    PY=.venv/bin/python
else
    PY=python3
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

dry=0
[[ " $* " == *" --dry-run "* ]] && dry=1
out_args=()
if [[ " $* " != *" --out "* ]]; then
    if [ -n "${OUT:-}" ]; then
        out_args=(--out "$OUT/gpu_check.json")
    elif [ "$dry" = 0 ]; then
        out_args=(--out benchmarks/results/gpu_check.json)
    fi
fi

if [ "$dry" = 0 ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 290 "$PY" benchmarks/gpu_check.py "${out_args[@]}" "$@"
