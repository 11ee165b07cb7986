"""Precision policy: where bf16 pays, and the one way the project enters bf16 autocast.

Weights stay fp32; bf16 is only the compute dtype of matmuls under autocast (norms, modulation,
RoPE and timestep embeddings keep fp32 inside the model). On AVX2-only CPUs bf16 matmuls are
emulated and ~100x slower than fp32, so bf16 is used only on CUDA with bf16 support or on CPUs
with AVX-512 kernels. fp16 is never used.
"""

from __future__ import annotations

import contextlib

import torch


def bf16_is_fast(device: torch.device) -> bool:
    """True on CUDA with bf16 support and on CPUs with AVX-512 kernels."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def autocast(device: torch.device | str, enabled: bool = True):
    """bf16 autocast on `device`'s type when `enabled`, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
