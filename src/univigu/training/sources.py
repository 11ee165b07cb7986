"""Where a stage's data comes from: the training set, the held-out set and the prompt-embedding
bank. ShapesWorld is generated in memory; a manifest goes through the latent cache, which rank 0
fills first while the other processes wait and then only read it."""

from __future__ import annotations

import torch

from ..config import ExperimentConfig
from .cache import PromptBank, cached_manifest_latents, prompt_lookup
from .data import shapesworld_set


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


def training_set(cfg: ExperimentConfig, codec, cache_dir, device, dist=None, progress=False):
    t = cfg.train
    if t.manifest:
        return rank0_first(dist, lambda compute: cached_manifest_latents(
            t.manifest, codec, cfg.codec, cfg.world, cache_dir, t.buckets, device=device, compute=compute,
            progress=progress))
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
            progress=progress))
    return shapesworld_set(t.eval_samples, t.seed, cfg.world, split="val", progress=False)


def prompt_bank(cfg: ExperimentConfig, prompts: list[str], cache_dir, device, dist=None,
                progress=False) -> tuple[PromptBank, torch.Tensor]:
    """Embeddings of `prompts` and the null condition, through the prompt cache."""
    return rank0_first(dist, lambda compute: prompt_lookup(
        prompts, cfg.prompt_encoder, cache_dir, device=device, compute=compute, progress=progress))
