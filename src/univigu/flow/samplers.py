"""The three task samplers of the unified flow: T2V (`sample_video`), V2T (`sample_text`) and joint
T2VT (`sample_joint`), assembled from the solvers (`video_solvers.py`), text updates
(`text_updates.py`) and guidance (`guidance.py`); options in `options.py`.

The samplers know the model only as a callable (DESIGN.md section 2)::

    velocity, logits = model(video, text, video_timestep, text_timestep, condition)

with timesteps ``[B]`` floats in [0, 1000] (1000 = pure noise / all source tokens), ``video=None``
(and ``video_timestep=None``) for a text-only forward, ``text=None`` (and ``text_timestep=None``)
when there is no text stream, and logits over the vocabulary without the mask id. When a model
offers the cached protocol and allows it (``model.supports_cache(clean)`` is True), T2V and V2T
prefill the clean modality once and then run only the noisy modality's tokens::

    cache = model.prefill(clean="text", text=..., condition=...)     # T2V
    velocity = model.step_video(video, video_timestep, cache)
    cache = model.prefill(clean="video", video=..., condition=...)   # V2T
    logits = model.step_text(text, text_timestep, cache)

Guidance (DESIGN.md section 4): the video's unconditional branch gets the null (or negative)
condition *and* a fully noised text stream at ``s_text = 1``; text guidance contrasts against the
branch without video. Categorical draws are made in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .guidance import Branch, ModelCaller, guide, supports_cache
from .options import JointSamplerOptions, TextSamplerOptions, VideoSamplerOptions
from .paths import FlowError, MixtureTextPath, kappa_inverse, noise_level_to_timestep, sampling_grid
from .randomness import RandomSource
from .text_updates import TextUpdater, decode_tokens, text_blocks
from .video_solvers import VideoODESolver

__all__ = ["JointSample", "TextSample", "VideoSample", "sample_joint", "sample_text", "sample_video"]


@dataclass
class VideoSample:
    video: torch.Tensor  # float32 [B, C, F, H, W]
    nfe: int  # model calls made (a batched guidance call counts once)


@dataclass
class TextSample:
    tokens: torch.Tensor  # long [B, L], the whole canvas
    sequences: list[list[int]]  # tokens before the first EOS
    nfe: int


@dataclass
class JointSample:
    video: torch.Tensor
    tokens: torch.Tensor
    sequences: list[list[int]]
    nfe: int


def _timesteps(s: float | torch.Tensor, batch: int, device) -> torch.Tensor:
    """Noise level (scalar or [B]) -> the model's float32 timestep [B]."""
    s = torch.as_tensor(s, dtype=torch.float64)
    return noise_level_to_timestep(s.expand(batch).clone()).to(device=device, dtype=torch.float32)


def _batched_condition(condition: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if not torch.is_tensor(condition) or not condition.is_floating_point():
        raise FlowError(f"{name} must be a float tensor [B, Lc, D]")
    if condition.dim() == 2:
        condition = condition.unsqueeze(0)
    if condition.dim() != 3 or condition.shape[0] not in (1, batch):
        raise FlowError(f"{name} must be [B, Lc, D] or [1, Lc, D] with B = {batch}, got {list(condition.shape)}")
    return condition.expand(batch, -1, -1)


def _progress(total: int, enabled: bool, desc: str):
    return tqdm(total=total, disable=not enabled, desc=desc, leave=False)


# A per-step callback (diffusers' `callback_on_step_end`): called after step `i` as
# `callback(i, s, state)` with `s` the step's own noise level and `state` a dict of the sampler's
# tensors after the step ("video": the latents, "tokens": the text canvas in joint sampling) and
# "prediction": the clean video the step's velocity predicts, `x_s - s v`. A dict it returns
# replaces those entries (its "video" / "tokens" continue the sampling); None changes nothing.
StepCallback = Callable[[int, float, dict], "dict | None"]


def _step_end(callback: StepCallback | None, step: int, s: float, state: dict) -> dict:
    if callback is not None:
        changed = callback(step, s, state)
        if changed is not None:
            if not isinstance(changed, dict):
                raise FlowError(f"callback_on_step_end must return a dict or None, got {type(changed).__name__}")
            state.update(changed)
    return state


# --------------------------------------------------------------------------------------------
# T2V
# --------------------------------------------------------------------------------------------


def sample_video(
    model: Callable,
    shape: Sequence[int],
    condition: torch.Tensor,
    null_condition: torch.Tensor | None = None,
    *,
    text: torch.Tensor | None = None,
    text_path: MixtureTextPath | None = None,
    options: VideoSamplerOptions | None = None,
    negative_condition: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    seeds: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    callback_on_step_end: StepCallback | None = None,
) -> VideoSample:
    """Text-to-video: integrate the video ODE from noise (``s = 1``) to data with a clean text stream.

    Args:
        model: the unified model callable (see the module docstring).
        shape: latent shape ``[B, C, F, H, W]``.
        condition: prompt embedding ``[B, Lc, D]``.
        null_condition: the unconditional branch's embedding (needed when guidance is on).
        text: clean text-stream tokens ``[B, L]`` (the prompt / caption), or None for a model without
            a text stream.
        text_path: the text path; with guidance it provides the fully noised text of the
            unconditional branch.
        negative_condition: replaces `null_condition` in the unconditional branch.
        generator / seeds: one generator (or one per sample), or per-sample seeds.
        callback_on_step_end: called after each step (see `StepCallback`), e.g. for progress.
    """
    options = options or VideoSamplerOptions()
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise FlowError(f"video shape must be [B, C, F, H, W] with positive sizes, got {list(shape)}")
    batch = shape[0]
    device = torch.device(device) if device is not None else condition.device
    condition = _batched_condition(condition, batch, "condition")
    guided = options.guidance_scale != 1.0
    uncond_condition = negative_condition if negative_condition is not None else null_condition
    if guided and uncond_condition is None:
        raise FlowError("video guidance needs null_condition (or negative_condition)")
    if guided:
        uncond_condition = _batched_condition(uncond_condition, batch, "null/negative condition")
    if text is not None:
        if text.dim() != 2 or text.shape[0] != batch or text.dtype != torch.long:
            raise FlowError(f"text must be a long tensor [{batch}, L], got {list(text.shape)} {text.dtype}")
        if guided and text_path is None:
            raise FlowError("video guidance with a text stream needs text_path (to fully noise the text)")

    rng = RandomSource(batch, generator, seeds)
    x = rng.randn(shape, device=device)
    caller = ModelCaller(model, text_path.vocab_size if text_path is not None else None)

    # The conditional branch: cached when the model allows a clean-text prefill.
    cache = None
    if text is not None and options.use_cache and supports_cache(model, "text"):
        cache = caller.prefill(clean="text", text=text, condition=condition)
    text_clean_t = _timesteps(0.0, batch, device) if text is not None else None
    noised_text = noised_t = None
    if guided and text is not None:
        noised_text = rng.source_tokens(text_path, batch, text.shape[1], device)
        noised_t = _timesteps(1.0, batch, device)

    grid = sampling_grid(options.steps, options.shift)
    lo, hi = options.guidance_interval

    def velocity_at(x_now: torch.Tensor, j: int) -> torch.Tensor:
        s = float(grid[j])
        vt = _timesteps(s, batch, device)
        use_guidance = guided and lo <= s <= hi
        uncond = Branch(x_now, noised_text, vt, noised_t, uncond_condition) if use_guidance else None
        if cache is not None:
            v_cond = caller.step_video(x_now, vt, cache)
            v_uncond = caller.forward([uncond], True, False)[0][0] if use_guidance else None
        else:
            branches = [Branch(x_now, text, vt, text_clean_t, condition)] + ([uncond] if use_guidance else [])
            outs = caller.forward(branches, True, False, batch=options.batch_guidance)
            v_cond, v_uncond = outs[0][0], (outs[1][0] if use_guidance else None)
        v_cond = v_cond.float()
        return guide(v_cond, v_uncond.float(), options.guidance_scale) if use_guidance else v_cond

    solver = VideoODESolver(options.solver, grid)
    with _progress(options.steps, options.progress, "video") as bar:
        for i in range(options.steps):
            if callback_on_step_end is None:
                x = solver.step(i, x, velocity_at(x, i), velocity_at)
            else:
                velocity = velocity_at(x, i)
                s = float(grid[i])
                state = {"video": solver.step(i, x, velocity, velocity_at), "prediction": x - s * velocity}
                x = _step_end(callback_on_step_end, i, s, state)["video"]
            bar.update(1)
    return VideoSample(video=x, nfe=caller.nfe)


# --------------------------------------------------------------------------------------------
# V2T
# --------------------------------------------------------------------------------------------


def sample_text(
    model: Callable,
    video: torch.Tensor | None,
    condition: torch.Tensor,
    path: MixtureTextPath,
    length: int,
    *,
    eos_id: int,
    options: TextSamplerOptions | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    seeds: Sequence[int] | None = None,
    skip_ids: Sequence[int] = (),
) -> TextSample:
    """Video-to-text: run the text sampler on a canvas of `length` tokens, the video clean.

    Args:
        model: the unified model callable.
        video: clean video latents ``[B, C, F, H, W]``, or None for text alone.
        condition: ``[B, Lc, D]`` (the null condition for plain captioning).
        path: the text path (vocabulary, source, special ids, kappa schedule).
        length: canvas length L.
        eos_id: decoding stops at the first EOS.
        options: sampler, steps, temperature, text guidance (against the branch without video),
            semi-autoregressive blocks.
        skip_ids: ids dropped from the decoded sequences (e.g. PAD or BOS).
    """
    options = options or TextSamplerOptions()
    if not isinstance(length, int) or length < 1:
        raise FlowError(f"text length must be a positive integer, got {length!r}")
    if video is not None and (not torch.is_tensor(video) or not video.is_floating_point()):
        raise FlowError("video must be a float tensor [B, C, F, H, W] or None")
    batch = video.shape[0] if video is not None else condition.shape[0]
    device = video.device if video is not None else condition.device
    condition = _batched_condition(condition, batch, "condition")
    guided = options.guidance_scale != 1.0
    if guided and video is None:
        raise FlowError("text guidance contrasts against the branch without video, so it needs a video")

    rng = RandomSource(batch, generator, seeds)
    updater = TextUpdater(path, options, rng)
    caller = ModelCaller(model, path.vocab_size)
    cache = None
    if video is not None and options.use_cache and supports_cache(model, "video"):
        cache = caller.prefill(clean="video", video=video, condition=condition)
    video_clean_t = _timesteps(0.0, batch, device) if video is not None else None

    def logits_at(tokens: torch.Tensor, s_model: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, the no-video branch's logits or None)."""
        tt = _timesteps(s_model, batch, device)
        if cache is not None:
            logits = caller.step_text(tokens, tt, cache)
        else:
            logits = caller.forward([Branch(video, tokens, video_clean_t, tt, condition)], False, True)[0][1]
        uncond = None
        if guided:
            uncond = caller.forward([Branch(None, tokens, None, tt, condition)], False, True)[0][1]
        return logits, uncond

    tokens = rng.source_tokens(path, batch, length, device)
    blocks = text_blocks(length, options.block_length, options.steps)
    positions = torch.arange(length, device=device)
    with _progress(options.steps, options.progress, "text") as bar:
        for start, end, block_steps in blocks:
            eligible = ((positions >= start) & (positions < end)).expand(batch, length)
            grid = sampling_grid(block_steps, 1.0)
            for j in range(block_steps):
                if len(blocks) == 1:
                    s_model = grid[j]
                else:
                    # With blocks the canvas is not on one schedule; tell the model the noise level
                    # whose mask fraction matches the canvas.
                    masked = (tokens == path.mask_id).double().mean(dim=1).cpu()
                    s_model = kappa_inverse(1.0 - masked, path.kappa_exponent)
                tokens = updater.update(tokens, *logits_at(tokens, s_model), float(grid[j]), float(grid[j + 1]),
                                        eligible)
                bar.update(1)
    return TextSample(tokens=tokens, sequences=decode_tokens(tokens, eos_id, skip_ids), nfe=caller.nfe)


# --------------------------------------------------------------------------------------------
# Joint T2VT
# --------------------------------------------------------------------------------------------


def sample_joint(
    model: Callable,
    video_shape: Sequence[int],
    text_length: int,
    condition: torch.Tensor,
    null_condition: torch.Tensor | None = None,
    *,
    path: MixtureTextPath,
    eos_id: int,
    options: JointSamplerOptions | None = None,
    negative_condition: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    seeds: Sequence[int] | None = None,
    skip_ids: Sequence[int] = (),
    device: torch.device | str | None = None,
    callback_on_step_end: StepCallback | None = None,
) -> JointSample:
    """Joint generation: video and text advance together from full noise on one time grid.

    Each step makes one forward pass with both noisy modalities; its velocity drives the video
    ODE step and its logits the text's discrete step. Video guidance uses the null (or negative)
    condition with a fully noised text stream; text guidance (``options.text.guidance_scale``)
    contrasts against the branch without video. Heun's corrector evaluation sees the already
    updated text at the next grid point. `callback_on_step_end` (see `StepCallback`) sees both
    modalities after each step: how video and caption co-evolve.
    """
    options = options or JointSamplerOptions()
    vopt, topt = options.video, options.text
    video_shape = tuple(int(d) for d in video_shape)
    if len(video_shape) < 2 or min(video_shape) < 1:
        raise FlowError(f"video shape must be [B, C, F, H, W] with positive sizes, got {list(video_shape)}")
    if not isinstance(text_length, int) or text_length < 1:
        raise FlowError(f"text length must be a positive integer, got {text_length!r}")
    batch = video_shape[0]
    device = torch.device(device) if device is not None else condition.device
    condition = _batched_condition(condition, batch, "condition")
    guided = vopt.guidance_scale != 1.0
    text_guided = topt.guidance_scale != 1.0
    uncond_condition = negative_condition if negative_condition is not None else null_condition
    if guided:
        if uncond_condition is None:
            raise FlowError("video guidance needs null_condition (or negative_condition)")
        uncond_condition = _batched_condition(uncond_condition, batch, "null/negative condition")

    rng = RandomSource(batch, generator, seeds)
    updater = TextUpdater(path, topt, rng)
    caller = ModelCaller(model, path.vocab_size)
    x = rng.randn(video_shape, device=device)
    tokens = rng.source_tokens(path, batch, text_length, device)
    noised_text = rng.source_tokens(path, batch, text_length, device) if guided else None
    video_grid = sampling_grid(vopt.steps, vopt.shift)
    text_grid = video_grid if options.text_grid == "video" else sampling_grid(vopt.steps, 1.0)
    lo, hi = vopt.guidance_interval
    all_positions = torch.ones(batch, text_length, dtype=torch.bool, device=device)

    def evaluate(x_now, text_now, j, want_text):
        s_v, s_t = float(video_grid[j]), float(text_grid[j])
        vt, tt = _timesteps(s_v, batch, device), _timesteps(s_t, batch, device)
        use_guidance = guided and lo <= s_v <= hi
        branches = [Branch(x_now, text_now, vt, tt, condition)]
        if use_guidance:
            branches.append(Branch(x_now, noised_text, vt, _timesteps(1.0, batch, device), uncond_condition))
        outs = caller.forward(branches, True, want_text, batch=vopt.batch_guidance)
        velocity = outs[0][0].float()
        if use_guidance:
            velocity = guide(velocity, outs[1][0].float(), vopt.guidance_scale)
        logits = None
        if want_text:
            uncond_logits = None
            if text_guided:
                uncond_logits = caller.forward([Branch(None, text_now, None, tt, condition)], False, True)[0][1]
            logits = (outs[0][1], uncond_logits)
        return velocity, logits

    solver = VideoODESolver(vopt.solver, video_grid)
    with _progress(vopt.steps, vopt.progress or topt.progress, "joint") as bar:
        for i in range(vopt.steps):
            velocity, logits = evaluate(x, tokens, i, True)
            tokens_next = updater.update(tokens, *logits, float(text_grid[i]), float(text_grid[i + 1]),
                                         all_positions)
            x_next = solver.step(i, x, velocity, lambda x2, j: evaluate(x2, tokens_next, j, False)[0])
            if callback_on_step_end is not None:
                s = float(video_grid[i])
                state = _step_end(callback_on_step_end, i, s,
                                  {"video": x_next, "tokens": tokens_next, "prediction": x - s * velocity})
                x_next, tokens_next = state["video"], state["tokens"]
            x, tokens = x_next, tokens_next
            bar.update(1)
    return JointSample(video=x, tokens=tokens, sequences=decode_tokens(tokens, eos_id, skip_ids), nfe=caller.nfe)
