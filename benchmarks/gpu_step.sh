#!/usr/bin/env bash
# One bf16 training step of the 1.3B-shaped unified model on a GPU: step time and MFU.
#   benchmarks/gpu_step.sh              # on a GPU machine; finishes in under 5 minutes
#   benchmarks/gpu_step.sh --dry-run    # toy sizes on a CPU, to check the script
# Extra arguments go to benchmarks/gpu_step.py (--steps, --latent C F H W, --peak-tflops, ...).
# The JSON is named after the setting: gpu_step[_compiled|_compiled_blocks][_profile].json
# (`--compile model`, `--compile blocks`, `--profile`). It goes to $OUT/NAME when $OUT is set (an
# output folder, e.g. one copied back from a remote GPU machine), else to
# benchmarks/results/gpu/NAME (not written for a dry run unless --out is given).
set -euo pipefail
cd "$(dirname "$0")/.."

. benchmarks/python_env.sh

dry=0
[[ " $* " == *" --dry-run "* ]] && dry=1
name=gpu_step
prev=
for a in "$@"; do
    [ "$prev" = --compile ] && a="--compile=$a"
    case "$a" in
        --compile=model) name+=_compiled ;;
        --compile=blocks) name+=_compiled_blocks ;;
    esac
    prev=$a
done
[[ " $* " == *" --profile "* ]] && name+=_profile
out_args=()
if [[ " $* " != *" --out "* ]]; then
    if [ -n "${OUT:-}" ]; then
        out_args=(--out "$OUT/$name.json")
    elif [ "$dry" = 0 ]; then
        out_args=(--out "benchmarks/results/gpu/$name.json")
    fi
fi

if [ "$dry" = 0 ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 290 "$PY" benchmarks/gpu_step.py "${out_args[@]}" "$@"
