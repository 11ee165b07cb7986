"""Everything that changes how the model runs, not what it computes, applied in one ordered place
(torchtitan's order): activation checkpointing, then compile, then FSDP2 sharding."""

from __future__ import annotations

import torch

from ..config import TrainConfig


def parallelize(model: torch.nn.Module, train: TrainConfig, distributed=None, bf16: bool = False) -> torch.nn.Module:
    """Apply `train.gradient_checkpointing`, `train.compile` and, under torchrun, FSDP2 (in place).

    Compile comes before FSDP2 wraps the blocks; blocks are compiled in place, so parameter names
    and FSDP2's per-block wrapping are unchanged. bf16 parameter all-gathers only on GPUs.
    Build the optimizer afterwards: sharding turns the parameters into DTensors.
    """
    if train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if train.compile:
        model.compile_blocks()
    if distributed is not None:
        distributed.wrap(model, bf16=bf16 and distributed.device.type == "cuda")
    return model
