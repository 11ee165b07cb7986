"""Categorical draws in float64 by inverting the CDF, with the drawn ids' confidences."""

from __future__ import annotations

import torch


# Rows of [M, V] drawn together: their float64 work fits about 4 MiB, so it stays in cache and the
# allocator reuses one block from row block to row block (a fresh [M, V] float64 tensor per step
# costs its page faults, about as much as the arithmetic).
_DRAW_BLOCK_ELEMENTS = 1 << 19


def draw_categorical(log_weights: torch.Tensor, uniforms: torch.Tensor, temperature: float,
                     confidence: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse-CDF draws in float64 from ``softmax(log_weights / T)`` (``T = 0``: the argmax), and,
    with `confidence`, each drawn id's untempered probability ``softmax(log_weights)`` (else None).

    `log_weights` [..., V] may be off by a constant per row (logits will do); `uniforms` has their
    leading shape. The CDF is built on ``exp((x - max) / T)`` as it is and the uniform scaled to
    its total: normalising first would cost a softmax's passes over the whole vocabulary, which
    with a real vocabulary cost more than the model's step.
    """
    lead, vocab = log_weights.shape[:-1], log_weights.shape[-1]
    flat, flat_u = log_weights.reshape(-1, vocab), uniforms.reshape(-1)
    block = max(1, _DRAW_BLOCK_ELEMENTS // vocab)
    parts = [_draw_block(flat[i:i + block], flat_u[i:i + block], temperature, confidence)
             for i in range(0, max(flat.shape[0], 1), block)]  # one (empty) block when no rows
    idx = torch.cat([p[0] for p in parts]).view(lead)
    return idx, (torch.cat([p[1] for p in parts]).view(lead) if confidence else None)


def _draw_block(log_weights, uniforms, temperature, confidence):
    """`draw_categorical` for rows [m, V]."""
    peak = log_weights.amax(dim=-1, keepdim=True).to(torch.float64)  # exact in any dtype
    total = None  # of the weights exp((x - max) / T) the draw used
    if temperature == 0:
        idx = log_weights.argmax(dim=-1)
    else:
        idx, total = _inverse_cdf(log_weights, peak, uniforms, temperature)
    if not confidence:
        return idx, None
    if temperature != 1:  # the untempered probability: its own total
        total = torch.exp(log_weights - peak).sum(dim=-1)
    chosen = torch.exp(log_weights.gather(-1, idx.unsqueeze(-1)).to(torch.float64) - peak).squeeze(-1)
    return idx, chosen / total


def _inverse_cdf(log_weights, peak, uniforms, temperature):
    """(ids drawn by inverting the CDF of exp((x - max) / T), the total weight) for rows [m, V]."""
    weights = torch.sub(log_weights, peak)  # float64
    if temperature != 1:
        weights.div_(temperature)
    cdf = weights.exp_().cumsum_(dim=-1)
    total = cdf[..., -1]
    u = uniforms.to(device=cdf.device, dtype=torch.float64) * total
    idx = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1)
    # Rounding can put u on the top of the CDF (idx past the end); fall back to the last id with
    # mass. Any other idx has mass (the CDF rises there), so the fallback is looked up only then.
    past_end = idx == cdf.shape[-1]
    if past_end.any():
        rises = torch.diff(cdf, dim=-1, prepend=torch.zeros_like(cdf[..., :1])) > 0
        last_with_mass = cdf.shape[-1] - 1 - rises.flip(-1).to(torch.int8).argmax(dim=-1)
        idx = torch.where(past_end, last_with_mass, idx)
    return idx, total


def sample_categorical(log_probs: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Draw one id per position from ``softmax(log_probs / T)`` in float64 by inverting the CDF.

    `uniforms` are U[0, 1) draws with the leading shape of `log_probs`; ``T = 0`` returns the argmax.
    `log_probs` may be unnormalised (logits will do).
    """
    return draw_categorical(log_probs, uniforms, temperature)[0]
