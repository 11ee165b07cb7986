"""Random draws for a sampler's batch: one generator for the batch, or one per sample."""

from __future__ import annotations

from typing import Sequence

import torch

from .paths import FlowError, MixtureTextPath


class RandomSource:
    """Random draws for a batch from one generator, a list of generators, or a list of seeds.

    With per-sample generators (or seeds) sample ``i`` only ever consumes generator ``i``, so its
    result does not depend on what else is in the batch.
    """

    def __init__(self, batch_size: int, generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 seeds: Sequence[int] | None = None):
        if generator is not None and seeds is not None:
            raise FlowError("pass either generator or seeds, not both")
        self.batch_size = batch_size
        self.generators: list[torch.Generator] | None = None
        self.generator: torch.Generator | None = None
        if seeds is not None:
            seeds = list(seeds)
            if len(seeds) != batch_size:
                raise FlowError(f"got {len(seeds)} seeds for a batch of {batch_size}")
            self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        elif isinstance(generator, (list, tuple)):
            if len(generator) != batch_size:
                raise FlowError(f"got {len(generator)} generators for a batch of {batch_size}")
            self.generators = list(generator)
        else:
            self.generator = generator

    def _draw(self, fn, shape: Sequence[int], device, dtype) -> torch.Tensor:
        shape = tuple(shape)
        if shape[0] != self.batch_size:
            raise FlowError(f"random draw of batch {shape[0]} from a source for batch {self.batch_size}")
        if self.generators is None:
            gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
            return fn(shape, generator=self.generator, device=gen_device, dtype=dtype).to(device)
        return torch.stack([fn(shape[1:], generator=g, device=g.device, dtype=dtype).to(device)
                            for g in self.generators])

    def randn(self, shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
        return self._draw(torch.randn, shape, device, dtype)

    def rand(self, shape: Sequence[int], device=None, dtype=torch.float64) -> torch.Tensor:
        return self._draw(torch.rand, shape, device, dtype)

    def source_tokens(self, path: MixtureTextPath, batch: int, length: int, device=None) -> torch.Tensor:
        """A fully noised canvas ``[B, L]`` (all mask ids, or uniform non-special draws)."""
        if path.source == "mask":
            return torch.full((batch, length), path.mask_id, dtype=torch.long, device=device)
        ids = path.source_ids()
        pick = (self.rand((batch, length)) * ids.numel()).long().clamp(max=ids.numel() - 1)
        return ids[pick].to(device)
