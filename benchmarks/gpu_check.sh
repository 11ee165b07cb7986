#!/usr/bin/env bash
# The native-size GPU check (benchmarks/gpu_check.py): attention, training step, inference, Wan VAE,
# UMT5-XXL and torchrun/FSDP2/DCP at 480x832x81 on one H100 or H200, each section in its own
# process under its own time limit; under 8 minutes in all.
#   benchmarks/gpu_check.sh                    # on a GPU machine
#   benchmarks/gpu_check.sh --only attn train  # some sections
#   benchmarks/gpu_check.sh --dry-run          # toy sizes on a CPU, to check the script
# Rows go to $OUT/gpu_check_native.json(l) when $OUT is set (an output folder, e.g. one copied back
# from a remote GPU machine), else to benchmarks/results/gpu/ (a dry run: a temporary folder).
# Packages missing on the GPU machine are installed from benchmarks/wheels/ (pip --no-index) when
# that folder exists; see benchmarks/README.md, "GPU check".
set -euo pipefail
cd "$(dirname "$0")/.."

. benchmarks/python_env.sh
export HF_HUB_OFFLINE=1

if [[ " $* " != *" --dry-run "* ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# The sections' limits add up to 465 s; this one only stops a launcher that hangs itself.
exec timeout 540 "$PY" benchmarks/gpu_check.py "$@"
