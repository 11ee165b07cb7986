"""Losses of the unified flow: velocity MSE for video, discrete losses for text, the joint loss.

Text losses work on logits ``[B, L, V]`` over the vocabulary *without* the mask id, so the
"mask logit is -inf" half of MDLM's SUBS holds by construction; `apply_carry_over` adds the other
half (a position that is not masked is copied). Every canvas position is a target, EOS and the PAD
tail included, so the model learns where text ends (DESIGN.md section 4).

Normalisation: `joint_loss` returns sums and counts beside the scalar, and accepts global counts, so
a batch split across processes (or gradient-accumulation micro-batches) gives exactly the loss of the
whole batch once the shards' losses are added (see `JointLoss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .paths import FlowError, MixtureTextPath, _check_per_sample

TextLoss = Literal["cross_entropy", "generalized_kl"]


# --------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------


def velocity_mse(velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error ``[B]`` (float32), averaged over all non-batch elements."""
    if velocity.shape != target.shape:
        raise FlowError(f"velocity shape {list(velocity.shape)} does not match target {list(target.shape)}")
    diff = velocity.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _check_text(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 3 or target.dim() != 2 or logits.shape[:2] != target.shape:
        raise FlowError(f"text logits must be [B, L, V] and targets [B, L]; got {list(logits.shape)} "
                        f"and {list(target.shape)}")
    if target.dtype != torch.long:
        raise FlowError(f"text targets must be long token ids, got {target.dtype}")
    vocab = logits.shape[-1]
    if target.numel() and (target.min() < 0 or target.max() >= vocab):
        raise FlowError(f"text targets must lie in [0, {vocab}) (the logits' vocabulary; the mask id is "
                        f"never a target), found {target.min().item()}..{target.max().item()}")


def apply_carry_over(logits: torch.Tensor, noisy: torch.Tensor, mask_id: int) -> torch.Tensor:
    """MDLM's carry-over: positions that are not masked predict their current token with certainty.

    Returns logits where every unmasked position is ``0`` on its token and ``-inf`` elsewhere; masked
    positions keep the model's logits (and gradients flow only through them).
    """
    if noisy.shape != logits.shape[:2]:
        raise FlowError(f"noisy tokens {list(noisy.shape)} do not match logits {list(logits.shape)}")
    unmasked = noisy != mask_id
    if unmasked.any() and noisy[unmasked].max() >= logits.shape[-1]:
        raise FlowError("a non-mask noisy token lies outside the logits' vocabulary")
    copied = torch.full_like(logits, float("-inf"))
    copied.scatter_(-1, torch.where(unmasked, noisy, 0).unsqueeze(-1), 0.0)
    return torch.where(unmasked.unsqueeze(-1), copied, logits)


def text_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy ``-log p(target)`` ``[B, L]`` (float32) on the posterior."""
    _check_text(logits, target)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def generalized_kl(logits: torch.Tensor, target: torch.Tensor, noisy: torch.Tensor,
                   noise_level: torch.Tensor, path: MixtureTextPath,
                   min_noise_level: float = 1e-3) -> torch.Tensor:
    """Per-token generalized KL of the mixture path (the ELBO form) ``[B, L]``.

    ``l = -w(s) [ p(y_s) - 1{y_s = y} + 1{y_s != y} log p(y) ]`` with ``w = kappa' / (1 - kappa)``,
    ``p`` the model posterior, ``y`` the target and ``y_s`` the noisy token (the mask id has ``p = 0``).
    With carry-over and the mask source this equals ``w`` times cross-entropy on masked positions.
    `min_noise_level` bounds the weight, which diverges as ``s -> 0``.
    """
    _check_text(logits, target)
    if noisy.shape != target.shape:
        raise FlowError(f"noisy tokens {list(noisy.shape)} do not match targets {list(target.shape)}")
    _check_per_sample(noise_level, target.shape[0], "text noise level")
    vocab = logits.shape[-1]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    in_vocab = noisy < vocab
    log_p_noisy = log_probs.gather(-1, torch.where(in_vocab, noisy, 0).unsqueeze(-1)).squeeze(-1)
    p_noisy = torch.where(in_vocab, log_p_noisy.exp(), torch.zeros_like(log_p_noisy))
    log_p_target = log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    same = noisy == target
    # where(), not a product: log p(target) may be -inf on carried-over positions.
    bracket = p_noisy - same.float() + torch.where(same, torch.zeros_like(log_p_target), log_p_target)
    weight = path.jump_rate(noise_level.float(), min_noise_level=min_noise_level)
    return -weight[:, None] * bracket


# --------------------------------------------------------------------------------------------
# The joint loss
# --------------------------------------------------------------------------------------------


@dataclass
class JointLoss:
    """The joint loss and the sums and counts it was made of.

    ``loss = video_sum / video_normalizer + text_weight * text_sum / text_normalizer``; the
    normalisers are the local counts unless global ones were passed. Counts: one per noisy video
    sample (each sample's MSE is a mean over its elements) and one per canvas position of every noisy
    text sample. With global counts, shards' losses add up to the whole batch's loss; a trainer whose
    gradient reduction averages over W ranks multiplies its loss by W.
    """

    loss: torch.Tensor
    video_loss: torch.Tensor  # detached mean, for logging
    text_loss: torch.Tensor  # detached mean, for logging
    video_sum: torch.Tensor
    video_count: torch.Tensor
    text_sum: torch.Tensor
    text_count: torch.Tensor


def active_modalities(video_noise_level: torch.Tensor | None,
                      text_noise_level: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-sample masks of the modalities that carry a loss: those that are noisy (``s > 0``)."""
    video = video_noise_level > 0 if video_noise_level is not None else None
    text = text_noise_level > 0 if text_noise_level is not None else None
    return video, text


def count_loss_terms(video_noise_level: torch.Tensor | None, text_noise_level: torch.Tensor | None,
                     text_length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The (video, text) counts `joint_loss` normalises by; known before the forward pass, so they can
    be all-reduced across processes and passed back as `video_normalizer` / `text_normalizer`."""
    video, text = active_modalities(video_noise_level, text_noise_level)
    video_count = video.sum().float() if video is not None else torch.zeros(())
    text_count = text.sum().float() * text_length if text is not None else torch.zeros(())
    return video_count, text_count


def joint_loss(
    *,
    velocity: torch.Tensor | None = None,
    video_target: torch.Tensor | None = None,
    video_noise_level: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    text_target: torch.Tensor | None = None,
    text_noisy: torch.Tensor | None = None,
    text_noise_level: torch.Tensor | None = None,
    path: MixtureTextPath | None = None,
    text_loss: TextLoss = "cross_entropy",
    text_weight: float = 1.0,
    carry_over: bool | None = None,
    video_normalizer: torch.Tensor | float | None = None,
    text_normalizer: torch.Tensor | float | None = None,
    min_noise_level: float = 1e-3,
) -> JointLoss:
    """``L = L_video + lambda L_text`` over the modalities that are noisy in each sample.

    Args:
        velocity, video_target, video_noise_level: prediction, ``eps - x`` and ``s`` ``[B]``; omit all
            three when there is no video loss.
        logits, text_target, text_noisy, text_noise_level: ``[B, L, V]`` logits, clean canvas
            (``[tokens, EOS, PAD...]``), the noisy canvas the model saw, and ``s`` ``[B]``.
        path: the text path (source, kappa schedule); needed when there is a text loss.
        text_loss: ``cross_entropy`` on the posterior or ``generalized_kl`` (ELBO weight
            ``kappa' / (1 - kappa)``).
        carry_over: apply MDLM carry-over (default: on for the mask source; invalid for uniform).
        video_normalizer, text_normalizer: global counts (e.g. all-reduced `count_loss_terms`);
            default the local counts.
    """
    if text_loss not in ("cross_entropy", "generalized_kl"):
        raise FlowError(f"unknown text loss {text_loss!r} (choose cross_entropy or generalized_kl)")
    if text_weight < 0:
        raise FlowError(f"text loss weight must be >= 0, got {text_weight}")
    parts = [velocity, video_target, video_noise_level]
    if any(p is None for p in parts) and any(p is not None for p in parts):
        raise FlowError("video loss needs velocity, video_target and video_noise_level together")
    text_parts = [logits, text_target, text_noisy, text_noise_level]
    if any(p is None for p in text_parts) and any(p is not None for p in text_parts):
        raise FlowError("text loss needs logits, text_target, text_noisy and text_noise_level together")
    has_video, has_text = velocity is not None, logits is not None
    if not (has_video or has_text):
        raise FlowError("joint_loss needs a video or a text prediction")

    zero = torch.zeros((), device=(velocity if has_video else logits).device)
    video_sum, video_count = zero, zero
    if has_video:
        _check_per_sample(video_noise_level, velocity.shape[0], "video noise level")
        active = video_noise_level > 0
        per_sample = velocity_mse(velocity, video_target)
        video_sum = torch.where(active, per_sample, torch.zeros_like(per_sample)).sum()
        video_count = active.sum().float()

    text_sum, text_count = zero, zero
    if has_text:
        if path is None:
            raise FlowError("the text loss needs the text path (source and kappa schedule)")
        _check_per_sample(text_noise_level, logits.shape[0], "text noise level")
        if carry_over is None:
            carry_over = path.source == "mask"
        if carry_over and path.source != "mask":
            raise FlowError("carry-over only applies to the mask source")
        if carry_over:
            logits = apply_carry_over(logits, text_noisy, path.mask_id)
        if text_loss == "cross_entropy":
            per_token = text_cross_entropy(logits, text_target)
        else:
            per_token = generalized_kl(logits, text_target, text_noisy, text_noise_level, path, min_noise_level)
        active = (text_noise_level > 0)[:, None].expand_as(per_token)
        # where(): a clean sample's positions may hold inf/nan terms that must not leak into the sum.
        text_sum = torch.where(active, per_token, torch.zeros_like(per_token)).sum()
        text_count = active.sum().float()

    def normalise(total, local, given):
        denom = local if given is None else torch.as_tensor(given, dtype=total.dtype, device=total.device)
        return total / denom.clamp(min=1.0)

    video_term = normalise(video_sum, video_count, video_normalizer)
    text_term = normalise(text_sum, text_count, text_normalizer)
    return JointLoss(
        loss=video_term + text_weight * text_term,
        video_loss=(video_sum / video_count.clamp(min=1.0)).detach(),
        text_loss=(text_sum / text_count.clamp(min=1.0)).detach(),
        video_sum=video_sum, video_count=video_count, text_sum=text_sum, text_count=text_count,
    )
