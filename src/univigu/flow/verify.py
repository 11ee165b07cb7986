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

`Captioner` is V2T as a whole, the one path the pipeline (`caption`, `joint`'s captions under
`univigu eval`) and training's validation share: draw K captions per video (the first with the
sampler's options, the rest at temperature 1 with seeds of their own), score the distinct ones by
`video_flow_loss`, keep the lowest. It knows the tokenizer and the prompt encoder only as callables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..config import SamplerConfig
from .losses import velocity_mse
from .options import TextSamplerOptions
from .paths import FlowError, MixtureTextPath, RectifiedFlowPath, noise_level_to_timestep
from .randomness import RandomSource
from .samplers import TextSample, sample_text

DEFAULT_LEVELS = SamplerConfig().verify_levels


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
    path = RectifiedFlowPath()
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
            level = torch.full((n,), float(s), device=x.device)
            sample = path.sample(x, level, noise=noise[:, j])
            velocity, _ = model(sample.noisy, None if text is None else text[rows], noise_level_to_timestep(level),
                                text_t, condition[rows])
            losses[rows] += velocity_mse(velocity, sample.target) / len(levels)
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


@dataclass
class Captioner:
    """V2T with verification for one model's vocabulary and prompt encoder.

    Args:
        null_condition: ``[1, Lc, D]`` or ``[Lc, D]``, the condition captions are sampled under.
        path, text_length, eos_id, skip_ids: the text stream's path, canvas length and special ids.
        decode: tokens ``[B, L]`` -> captions.
        encode_prompts: captions -> prompt embeddings ``[B, Lc, D]`` on the model's device.
        encode_text: captions -> clean text-stream tokens ``[B, L]`` (as in T2V, the stream holds
            what the condition encodes), or None for a model without a text stream.
        levels: the noise levels of the flow loss.
    """

    null_condition: torch.Tensor
    path: MixtureTextPath
    text_length: int
    eos_id: int
    decode: Callable[[torch.Tensor], list[str]]
    encode_prompts: Callable[[list[str]], torch.Tensor]
    encode_text: Callable[[list[str]], torch.Tensor] | None = None
    skip_ids: Sequence[int] = ()
    levels: Sequence[float] = DEFAULT_LEVELS

    def sample(self, model, latents: torch.Tensor, seeds: list[int], options: TextSamplerOptions) -> TextSample:
        """One caption per video from the text sampler, under the null condition."""
        null = self.null_condition.reshape(1, *self.null_condition.shape[-2:]).to(latents.device)
        return sample_text(model, latents, null.expand(latents.shape[0], -1, -1), self.path, self.text_length,
                           eos_id=self.eos_id, options=options, seeds=seeds, skip_ids=self.skip_ids)

    def flow_loss(self, model, latents: torch.Tensor, captions: Sequence[str], seeds: Sequence[int],
                  levels: Sequence[float] | None = None) -> torch.Tensor:
        """The text-to-video flow loss ``[B]`` of each clean latent under its caption."""
        captions = list(captions)
        stream = None if self.encode_text is None else self.encode_text(captions)
        return video_flow_loss(model, latents, stream, self.encode_prompts(captions), seeds,
                               levels=self.levels if levels is None else levels)

    def caption(self, model, latents: torch.Tensor, seeds: list[int], options: TextSamplerOptions,
                candidates: int = 1, details: dict | None = None) -> tuple[list[str], TextSample]:
        """(captions, their TextSample): with `candidates` K > 1, per video the one of K drawn that
        the model's own video flow finds most likely. `nfe` counts the sampler's calls only. A
        `details` dict receives each video's "candidates" and their "scores" (the flow loss, None
        where a candidate was not scored)."""
        k = candidates
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise FlowError(f"candidates must be a positive integer, got {k!r}")
        sample = self.sample(model, latents, seeds, options)
        if k == 1:
            captions = self.decode(sample.tokens.cpu())
            if details is not None:
                details.update(candidates=[[c] for c in captions], scores=[[None] for _ in captions])
            return captions, sample
        batch = latents.shape[0]
        # Candidate j of video i: the sampler's caption (j = 0), then posterior samples at
        # temperature 1 with seeds of their own.
        extra = self.sample(model, latents.repeat_interleave(k - 1, 0),
                            [s * k + j for s in seeds for j in range(1, k)], replace(options, temperature=1.0))
        tokens = torch.cat([sample.tokens[:, None], extra.tokens.view(batch, k - 1, -1)], 1).cpu()
        texts = [self.decode(row) for row in tokens]
        scores = [[None] * k for _ in texts]
        chosen = self.choose(model, latents, seeds, texts, scores)
        if details is not None:
            details.update(candidates=texts, scores=scores)
        sequences = [[sample.sequences[i]] + extra.sequences[i * (k - 1):(i + 1) * (k - 1)] for i in range(batch)]
        verified = TextSample(tokens=torch.stack([tokens[i, j] for i, j in enumerate(chosen)]),
                              sequences=[sequences[i][j] for i, j in enumerate(chosen)],
                              nfe=sample.nfe + (k - 1) * extra.nfe)
        return [texts[i][j] for i, j in enumerate(chosen)], verified

    def choose(self, model, latents: torch.Tensor, seeds: list[int], texts: list[list[str]],
               scores: list[list[float | None]] | None = None) -> list[int]:
        """Per video, the index of its candidate caption with the lowest video flow loss; videos
        whose candidates all agree are not scored, and repeated candidates are scored once.
        `scores[i][j]` receives the loss of candidate j of video i where it was computed."""
        rows = [(i, j) for i, row in enumerate(texts) if len(set(row)) > 1
                for j, text in enumerate(row) if text not in row[:j]]
        chosen = [0] * len(texts)
        if not rows:
            return chosen
        owners = [i for i, _ in rows]
        losses = self.flow_loss(model, latents[owners], [texts[i][j] for i, j in rows], [seeds[i] for i in owners])
        if scores is not None:
            for (i, j), loss in zip(rows, losses.tolist()):
                scores[i][j] = loss
        videos = sorted(set(owners))
        position = {v: n for n, v in enumerate(videos)}
        best = pick_lowest(losses.cpu(), [position[i] for i in owners], len(videos))
        for video, b in zip(videos, best):
            chosen[video] = rows[b][1]
        return chosen
