"""Scale-out under torchrun: process group, DeviceMesh, FSDP2 wrapping, data sharding, collectives.

`distributed_context(device)` yields None for a plain single process, and a `DistributedContext`
when the process was started by torchrun (`torchrun --nproc_per_node=N -m univigu train ...`):
gloo on CPU, NCCL on CUDA, one 1-D DeviceMesh over all ranks. The trainer then

* wraps the model with `ctx.wrap` (FSDP2 `fully_shard` per block, then the root),
* trains on `ctx.shard(global_batch)` (this rank's contiguous part of every global batch),
* normalises the loss by global counts (`ctx.all_reduce_sum`) and multiplies it by the world size,
  because FSDP's gradient reduce-scatter averages over ranks: W processes x B/W samples then give
  the gradient of one process x B samples,
* saves sharded checkpoints with torch.distributed.checkpoint (`training/checkpoint.py`) and
  gathers full weights on rank 0 only for export (`gather_full_state`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# Small modules that must stay in fp32 under bf16 parameter casting (DESIGN.md section 5: timestep
# embeddings and modulation in fp32). They get their own FSDP unit with an fp32 policy.
FP32_MODULES = ("condition_embedder.time_embedder", "condition_embedder.time_proj",
                "text_stream.time_embedder", "text_stream.time_proj")


class DistributedError(ValueError):
    """A distributed setting cannot work (e.g. fewer samples per batch than processes)."""


def launched_by_torchrun() -> bool:
    """True under torchrun (also with one process, which then runs the FSDP path)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def is_dtensor(value) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: object  # torch.distributed.device_mesh.DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ model
    def wrap(self, model: nn.Module, bf16: bool = False) -> nn.Module:
        """FSDP2: `fully_shard` every transformer block, then the root (in place; returns `model`).

        fp32 unless `bf16` (meant for CUDA, with bf16 autocast around the forward): then parameters
        are all-gathered in bf16 and gradients reduced in fp32 (`MixedPrecisionPolicy`), except the
        timestep embeddings, which keep fp32 (`FP32_MODULES`).
        Build the optimizer after wrapping: the parameters become sharded DTensors.
        """
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # Our blocks return split views that are never modified in place; FSDP warns on every one.
        warnings.filterwarnings("ignore", message=r".*FSDP2-wrapped module .* returned a view tensor")
        if bf16:
            # Inputs are not cast: timesteps and modulation must reach the model in fp32; the
            # trainer's bf16 autocast runs the matmuls in bf16.
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                          cast_forward_inputs=False)
            fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                        cast_forward_inputs=False)
            modules = dict(model.named_modules())
            for name in FP32_MODULES:
                if name in modules:
                    fully_shard(modules[name], mesh=self.mesh, mp_policy=fp32)
        else:
            policy = MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mesh=self.mesh, mp_policy=policy)
        fully_shard(model, mesh=self.mesh, mp_policy=policy)
        return model

    # ------------------------------------------------------------------ data
    def shard(self, indices: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of a global batch (sizes differ by at most one)."""
        indices = np.asarray(indices)
        if len(indices) < self.world_size:
            raise DistributedError(f"a global batch of {len(indices)} samples cannot be split over "
                                   f"{self.world_size} processes: raise train.batch_size")
        return np.array_split(indices, self.world_size)[self.rank]

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (returned on the tensor's original device)."""
        home = tensor.device
        work = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(home)

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        home = tensor.device
        work = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(work, op=dist.ReduceOp.MAX)
        return work.to(home)

    def any(self, flag: bool) -> bool:
        """True when `flag` is True on any rank."""
        return bool(self.all_reduce_max(torch.tensor([float(flag)])).item() > 0)

    def broadcast_object(self, obj, src: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()


def gather_full_state(state: dict, ctx: DistributedContext | None) -> dict | None:
    """Full CPU tensors of a (possibly sharded) state dict: on rank 0; None on other ranks.

    Every rank must call it (DTensors are all-gathered one at a time, bounding the memory).
    """
    keep = ctx is None or ctx.is_main
    out = {}
    for name, value in state.items():
        full = value.full_tensor() if is_dtensor(value) else value
        if keep:
            out[name] = full.detach().to("cpu", copy=True)
        del full
    return out if keep else None


@contextlib.contextmanager
def distributed_context(device: str | torch.device = "cpu", timeout_minutes: float = 60.0):
    """Yield None for a single process; under torchrun initialise the process group (gloo on CPU,
    NCCL on CUDA) and a DeviceMesh, yield a `DistributedContext`, and tear it down at the end."""
    if not launched_by_torchrun():
        yield None
        return
    from torch.distributed.device_mesh import init_device_mesh

    device = torch.device(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise DistributedError(f"distributed training runs on cpu or cuda, not {device.type}")
    owns_group = not dist.is_initialized()
    if owns_group:
        # A long validation on rank 0 keeps the others waiting at their next collective.
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    try:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
        ctx = DistributedContext(rank=rank, world_size=world, local_rank=local_rank, device=device, mesh=mesh)
        yield ctx
        # Leave together: a rank that tears gloo down while a peer is still busy (rank 0 exporting)
        # can abort at exit. Only on success; after an error torchrun stops the other ranks.
        ctx.barrier()
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
