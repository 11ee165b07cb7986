"""Caption verification by the video flow: the generator checks what the text stream read.

A caption is scored by how well the model denoises the video when the caption is its prompt: the
conditional flow-matching loss of text-to-video, ``|| v(x_s, s, caption) - (eps - x) ||^2``,
averaged over a few noise levels. Its expectation over levels and noise is, up to a constant and a
weighting, a bound on ``-log p(video | caption)``, so among candidate captions of one video the
lowest loss is the one the generator finds most likely. Every candidate of a video sees the same
noise draws, which makes the comparison paired: the noise cancels from the differences.

On ShapesWorld the shipped generator ranks the caption with the true shape first, out of four, for
199-200 of 200 test videos at any single noise level in 0.1-0.5 (benchmarks/bench_verify.py), while
the text stream, reading the same videos, is right about half the time: generation knows more than
the reader has learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .paths import FlowError, noise_level_to_timestep
from .randomness import RandomSource

DEFAULT_LEVELS = (0.3, 0.5)


def video_flow_loss(model: Any, latents: torch.Tensor, text: torch.Tensor | None, condition: torch.Tensor,
                    seeds: Sequence[int], levels: Sequence[float] = DEFAULT_LEVELS,
                    batch_size: int = 256) -> torch.Tensor:
    """Mean flow-matching loss ``[B]`` of each clean video latent under its text.

    Args:
        model: the unified model callable ``model(video, text, video_t, text_t, condition)``.
        latents: clean video latents ``[B, C, F, H, W]``.
        text: clean text-stream tokens ``[B, L]`` (the caption), or None for a video-only model.
        condition: prompt embeddings ``[B, Lc, D]`` (the caption, encoded as a prompt).
        seeds: one per row; rows with the same seed see the same noise (paired comparisons).
        levels: noise levels in (0, 1) at which the loss is taken.
        batch_size: rows per model call.
    """
    batch = latents.shape[0]
    if not levels or not all(0.0 < float(s) < 1.0 for s in levels):
        raise FlowError(f"verification levels must lie in (0, 1), got {list(levels)}")
    if condition.shape[0] != batch or (text is not None and text.shape[0] != batch) or len(seeds) != batch:
        raise FlowError("latents, text, condition and seeds must have one row per candidate")
    losses = torch.zeros(batch, device=latents.device)
    for start in range(0, batch, batch_size):
        rows = slice(start, start + batch_size)
        x = latents[rows].float()
        n = x.shape[0]
        # Each row draws from its own seed, so drawing chunk by chunk gives the same noise as one
        # draw for all rows, without holding all of it at once.
        noise = RandomSource(n, seeds=list(seeds[rows])).randn((n, len(levels), *x.shape[1:]), device=x.device)
        text_t = None if text is None else torch.zeros(n, device=x.device)
        for j, s in enumerate(levels):
            eps = noise[:, j]
            noisy = (1.0 - s) * x + s * eps
            t = noise_level_to_timestep(torch.full((n,), float(s), device=x.device))
            velocity, _ = model(noisy, None if text is None else text[rows], t, text_t, condition[rows])
            losses[rows] += (velocity.float() - (eps - x)).pow(2).flatten(1).mean(1) / len(levels)
    return losses


def pick_lowest(losses: torch.Tensor, owners: Sequence[int], num_videos: int) -> list[int]:
    """For each video, the index (into `losses`) of its candidate with the lowest loss."""
    best: list[int | None] = [None] * num_videos
    for i, (loss, video) in enumerate(zip(losses.tolist(), owners)):
        if best[video] is None or loss < losses[best[video]]:
            best[video] = i
    missing = [v for v, b in enumerate(best) if b is None]
    if missing:
        raise FlowError(f"video {missing[0]} has no candidate caption")
    return best
