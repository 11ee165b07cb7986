"""Where a stage's data comes from: the training set, the held-out set and the prompt-embedding
bank. ShapesWorld is generated in memory; a manifest goes through the latent cache, which rank 0
fills first while the other processes wait and then only read it. That inline fill is for small
sets (train.inline_cache_limit clips, INLINE_FILL_SECONDS under torchrun); larger ones are
cached beforehand by `univigu data cache` (training/fill.py)."""

from __future__ import annotations

import torch

from ..config import ExperimentConfig
from .cache import PromptBank, cached_manifest_latents, prompt_lookup
from .data import shapesworld_set


# The longest the other processes wait at a barrier for rank 0's inline fill: a quarter of the
# process group's 60-minute timeout (distributed_context), so the fill fails first, with its fix.
INLINE_FILL_SECONDS = 15 * 60


def rank0_first(dist, fill):
    """Run `fill(compute)`: rank 0 computes and writes the cache, the others then only read."""
    if dist is None:
        return fill(True)
    if dist.is_main:
        result = fill(True)
        dist.barrier()
        return result
    dist.barrier()
    return fill(False)


def _bounds(t, dist) -> dict:
    """How much of a manifest a run encodes itself (above it: `univigu data cache`)."""
    return dict(limit=t.inline_cache_limit, deadline_s=None if dist is None else INLINE_FILL_SECONDS)


def training_set(cfg: ExperimentConfig, codec, cache_dir, device, dist=None, progress=False):
    t = cfg.train
    if t.manifest:
        return rank0_first(dist, lambda compute: cached_manifest_latents(
            t.manifest, codec, cfg.codec, cfg.world, cache_dir, t.buckets, device=device, compute=compute,
            progress=progress, **_bounds(t, dist)))
    return shapesworld_set(t.num_train_videos, t.seed, cfg.world, progress=progress)


def validation_set(cfg: ExperimentConfig, codec, cache_dir, device, dist=None, progress=False):
    """The held-out set, or None when the stage validates nothing."""
    t = cfg.train
    if t.eval_samples <= 0:
        return None
    if t.manifest:
        if not t.val_manifest:
            return None
        return rank0_first(dist, lambda compute: cached_manifest_latents(
            t.val_manifest, codec, cfg.codec, cfg.world, cache_dir, device=device, compute=compute,
            progress=progress, **_bounds(t, dist)))
    return shapesworld_set(t.eval_samples, t.seed, cfg.world, split="val", progress=False)


def prompt_bank(cfg: ExperimentConfig, prompts: list[str], cache_dir, device, dist=None,
                progress=False) -> tuple[PromptBank, torch.Tensor]:
    """Embeddings of `prompts` and the null condition, through the prompt cache."""
    return rank0_first(dist, lambda compute: prompt_lookup(
        prompts, cfg.prompt_encoder, cache_dir, device=device, compute=compute, progress=progress))
