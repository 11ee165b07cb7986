"""Text updates of the mixture path: the exact discrete Euler step and the confidence-ordered
commit, on the positions a step may change only, plus semi-autoregressive blocks and decoding."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .categorical import draw_categorical
from .guidance import guide_logits
from .options import TextSamplerOptions
from .paths import FlowError, MixtureTextPath
from .randomness import RandomSource


def discrete_euler_step(tokens: torch.Tensor, log_probs: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor,
                        path: MixtureTextPath, rng: RandomSource, temperature: float = 1.0,
                        eligible: torch.Tensor | None = None) -> torch.Tensor:
    """The exact discrete Euler step of the mixture path from noise level `s` to `s_next` ([B]).

    Every position draws a candidate from the posterior and jumps to it with probability
    ``(kappa(s') - kappa(s)) / (1 - kappa(s))`` (the integrated jump rate ``kappa' / (1 - kappa)``).
    With the mask source only masked positions move (carry-over); with the uniform source any
    position may. `eligible` ([B, L] bool) restricts the positions that may move (blocks).
    """
    rows = _movable_positions(tokens, path, eligible)
    return _euler_rows(tokens, log_probs[rows.to(log_probs.device)], rows, s, s_next, path, rng, temperature)


def confidence_step(tokens: torch.Tensor, log_probs: torch.Tensor, commit: torch.Tensor,
                    eligible: torch.Tensor, rng: RandomSource, temperature: float = 1.0) -> torch.Tensor:
    """Commit the `commit[b]` most confident eligible positions of each sample (LLaDA / MaskGIT).

    Candidates are drawn from the tempered posterior; confidence is their untempered posterior
    probability; ties go to the leftmost position.
    """
    return _confidence_rows(tokens, log_probs[eligible.to(log_probs.device)], commit, eligible, rng, temperature)


def _movable_positions(tokens: torch.Tensor, path: MixtureTextPath, eligible: torch.Tensor | None) -> torch.Tensor:
    """[B, L] bool: the positions a text step may change: eligible ones, and with the mask source
    only those still masked. Only their posteriors are needed."""
    rows = torch.ones_like(tokens, dtype=torch.bool) if eligible is None else eligible.to(tokens.device)
    return rows & (tokens == path.mask_id) if path.source == "mask" else rows


# The steps work on the log-probabilities of the positions `rows` only ([M, V], in row-major order of
# the [B, L] mask): the others would be drawn and thrown away, and with a real vocabulary those
# draws cost more than the model's step. Every position still consumes its uniforms, so the tokens
# are the same as drawing everywhere.


def _draw_rows(tokens, log_probs, rows, rng, temperature, confidence=False):
    """(tokens with a candidate drawn at each of `rows`, the drawn ids' untempered probabilities [M]
    when `confidence`, else None); one uniform per position, used or not."""
    uniforms = rng.rand(tokens.shape)
    drawn, probability = draw_categorical(log_probs, uniforms[rows.to(uniforms.device)], temperature, confidence)
    candidates = tokens.clone()
    candidates[rows] = drawn.to(tokens.device)
    return candidates, probability


def _euler_rows(tokens, log_probs, rows, s, s_next, path, rng, temperature):
    candidates = _draw_rows(tokens, log_probs, rows, rng, temperature)[0]
    q = path.commit_probability(s.to(torch.float64), s_next.to(torch.float64)).to(tokens.device)
    jump = rows & (rng.rand(tokens.shape).to(tokens.device) < q[:, None])
    return torch.where(jump, candidates, tokens)


def _confidence_rows(tokens, log_probs, commit, eligible, rng, temperature):
    batch, length = tokens.shape
    candidates, probability = _draw_rows(tokens, log_probs, eligible, rng, temperature, confidence=True)
    confidence = torch.full((batch, length), -math.inf, dtype=torch.float64, device=tokens.device)
    confidence[eligible] = probability.to(tokens.device)
    order = confidence.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(length, device=order.device).expand(batch, length))
    chosen = eligible & (rank < commit.to(rank.device)[:, None])
    return torch.where(chosen, candidates, tokens)


def decode_tokens(tokens: torch.Tensor, eos_id: int, skip_ids: Sequence[int] = ()) -> list[list[int]]:
    """Token ids before the first EOS of each row (the whole row when it has none), minus `skip_ids`."""
    if tokens.dim() != 2:
        raise FlowError(f"tokens must be [B, L], got {list(tokens.shape)}")
    skip = set(int(i) for i in skip_ids)
    out = []
    for row in tokens.tolist():
        if eos_id in row:
            row = row[: row.index(eos_id)]
        out.append([t for t in row if t not in skip])
    return out


def text_blocks(length: int, block_length: int | None, steps: int) -> list[tuple[int, int, int]]:
    """(start, end, steps) per semi-autoregressive block; steps spread as evenly as possible."""
    size = length if block_length is None else min(block_length, length)
    starts = list(range(0, length, size))
    if steps < len(starts):
        raise FlowError(f"{steps} text steps cannot cover {len(starts)} blocks of length {size}; "
                        "use at least one step per block")
    base, extra = divmod(steps, len(starts))
    return [(a, min(a + size, length), base + (1 if k < extra else 0)) for k, a in enumerate(starts)]


class TextUpdater:
    """Applies one text update (Euler or confidence) between two noise levels of a block."""

    def __init__(self, path: MixtureTextPath, options: TextSamplerOptions, rng: RandomSource):
        if options.sampler == "confidence" and path.source != "mask":
            raise FlowError("the confidence sampler needs the mask source (uniform-source text has no masks)")
        if options.block_length is not None and path.source != "mask":
            raise FlowError("semi-autoregressive blocks need the mask source")
        self.path, self.options, self.rng = path, options, rng

    def update(self, tokens: torch.Tensor, logits: torch.Tensor, uncond_logits: torch.Tensor | None,
               s: float, s_next: float, eligible: torch.Tensor) -> torch.Tensor:
        """One step of `tokens` [B, L] from the model's logits [B, L, V] (and the unguided branch's,
        with text guidance); only the positions the step may change are turned into probabilities."""
        batch = tokens.shape[0]
        rows = _movable_positions(tokens, self.path, eligible)
        at = rows.to(logits.device)
        if uncond_logits is None or self.options.guidance_scale == 1.0:
            # The draws take unnormalised log-probabilities; all rows: a view, not a copy.
            log_probs = logits.flatten(0, 1) if bool(at.all()) else logits[at]
        else:
            log_probs = guide_logits(logits[at], uncond_logits[at], self.options.guidance_scale)
        if self.options.sampler == "euler":
            return _euler_rows(tokens, log_probs, rows, torch.full((batch,), s, dtype=torch.float64),
                               torch.full((batch,), s_next, dtype=torch.float64), self.path, self.rng,
                               self.options.temperature)
        # The masked count after the step follows the schedule: round(n_block * (1 - kappa(s'))).
        block_size = eligible.sum(dim=1)  # eligible = the block's positions here
        still_masked = rows.sum(dim=1)  # rows = the block's masked positions
        k_next = self.path.kappa(torch.tensor(s_next, dtype=torch.float64)).item()
        target = torch.round(block_size.double() * (1.0 - k_next)).long()
        commit = (still_masked - target).clamp(min=0)
        return _confidence_rows(tokens, log_probs, commit, rows, self.rng, self.options.temperature)
