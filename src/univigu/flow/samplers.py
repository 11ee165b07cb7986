"""Samplers of the unified flow: video ODE solvers, text samplers, joint T2VT, and guidance.

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

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from tqdm.auto import tqdm

from .paths import (
    FlowError,
    MixtureTextPath,
    RectifiedFlowPath,
    kappa_inverse,
    noise_level_to_timestep,
    sampling_grid,
)

VideoSolver = Literal["euler", "heun", "dpmpp2m"]
TextSampler = Literal["euler", "confidence"]

# Log-probabilities are clamped here before guidance mixes them, so -inf - -inf never makes a NaN;
# exp(-1e4) is 0 in float64, so clamped tokens keep zero probability.
_LOG_PROB_FLOOR = -1e4


# --------------------------------------------------------------------------------------------
# Options and outputs
# --------------------------------------------------------------------------------------------


@dataclass
class VideoSamplerOptions:
    """Video ODE sampling (T2V, and the video half of joint sampling).

    Args:
        steps: solver steps (Heun makes ``2 steps - 1`` evaluations per guidance branch).
        solver: ``euler``, ``heun`` (2nd order) or ``dpmpp2m`` (DPM-Solver++(2M), 2nd order multistep).
        shift: timestep shift of the sampling grid (Wan uses 3-5 for 480p; 1 = uniform grid).
        guidance_scale: classifier-free guidance scale (1 = no guidance, one branch only).
        guidance_interval: guidance is applied where ``lo <= s <= hi``; elsewhere only the
            conditional branch runs.
        batch_guidance: run the conditional and unconditional branches as one batch when possible.
        use_cache: use the model's cached protocol when it offers and allows it.
        progress: show a tqdm progress bar.
    """

    steps: int = 20
    solver: VideoSolver = "dpmpp2m"
    shift: float = 3.0
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    batch_guidance: bool = True
    use_cache: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        _check_steps(self.steps)
        if self.solver not in ("euler", "heun", "dpmpp2m"):
            raise FlowError(f"unknown video solver {self.solver!r} (choose euler, heun or dpmpp2m)")
        if not self.shift > 0:
            raise FlowError(f"shift must be positive, got {self.shift}")
        lo, hi = self.guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise FlowError(f"guidance_interval must satisfy 0 <= lo <= hi <= 1, got {self.guidance_interval}")

    @classmethod
    def from_config(cls, sampler_config, **overrides) -> "VideoSamplerOptions":
        values = dict(steps=sampler_config.video_steps, solver=sampler_config.video_solver,
                      shift=sampler_config.shift, guidance_scale=sampler_config.guidance_scale)
        values.update(overrides)
        return cls(**values)


@dataclass
class TextSamplerOptions:
    """Text sampling (V2T, and the text half of joint sampling).

    Args:
        steps: sampler steps (across all blocks).
        sampler: ``euler`` (the exact discrete Euler step of the mixture path; both sources) or
            ``confidence`` (commit the most confident masked positions, as many per step as the
            kappa schedule unmasks; mask source only).
        temperature: posterior temperature (0 = argmax).
        guidance_scale: text guidance against the branch without video (1 = none).
        block_length: semi-autoregressive blocks of this many positions, left to right (mask
            source only; not in joint sampling). None = one block.
        use_cache: use the model's cached protocol when it offers and allows it.
        progress: show a tqdm progress bar.
    """

    steps: int = 16
    sampler: TextSampler = "confidence"
    temperature: float = 1.0
    guidance_scale: float = 1.0
    block_length: int | None = None
    use_cache: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        _check_steps(self.steps)
        if self.sampler not in ("euler", "confidence"):
            raise FlowError(f"unknown text sampler {self.sampler!r} (choose euler or confidence)")
        if not self.temperature >= 0:
            raise FlowError(f"temperature must be >= 0, got {self.temperature}")
        if self.block_length is not None and (not isinstance(self.block_length, int) or self.block_length < 1):
            raise FlowError(f"block_length must be a positive integer or None, got {self.block_length!r}")

    @classmethod
    def from_config(cls, sampler_config, **overrides) -> "TextSamplerOptions":
        values = dict(steps=sampler_config.text_steps, sampler=sampler_config.text_sampler,
                      temperature=sampler_config.temperature,
                      guidance_scale=sampler_config.text_guidance_scale)
        values.update(overrides)
        return cls(**values)


@dataclass
class JointSamplerOptions:
    """Joint T2VT sampling: one time grid of ``video.steps`` steps for both modalities.

    `text_grid`: ``"video"`` moves text on the video's (shifted) grid, ``"linear"`` on its own
    unshifted grid with the same number of steps. ``text.steps`` and ``text.block_length`` are
    not used (one forward pass per step serves both updates).
    """

    video: VideoSamplerOptions = field(default_factory=VideoSamplerOptions)
    text: TextSamplerOptions = field(default_factory=TextSamplerOptions)
    text_grid: Literal["video", "linear"] = "video"

    def __post_init__(self) -> None:
        if self.text_grid not in ("video", "linear"):
            raise FlowError(f"unknown joint text grid {self.text_grid!r} (choose video or linear)")
        if self.text.block_length is not None:
            raise FlowError("semi-autoregressive blocks are not available in joint sampling")


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


def _check_steps(steps: Any) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise FlowError(f"steps must be a positive integer, got {steps!r}")


# --------------------------------------------------------------------------------------------
# Randomness: one generator for the batch, or one per sample
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Talking to the model
# --------------------------------------------------------------------------------------------


def supports_cache(model: Any, clean: str) -> bool:
    """True when `model` offers the cached protocol and its attention policy allows it for `clean`."""
    check = getattr(model, "supports_cache", None)
    noisy = "text" if clean == "video" else "video"
    if not callable(check) or not hasattr(model, "prefill") or not hasattr(model, f"step_{noisy}"):
        return False
    return bool(check(clean))


@dataclass
class _Branch:
    """The inputs of one forward pass."""

    video: torch.Tensor | None
    text: torch.Tensor | None
    video_timestep: torch.Tensor | None
    text_timestep: torch.Tensor | None
    condition: torch.Tensor

    def signature(self) -> tuple:
        return tuple(None if t is None else (tuple(t.shape[1:]), t.dtype)
                     for t in (self.video, self.text, self.video_timestep, self.text_timestep, self.condition))


def _has_nan(x: torch.Tensor) -> bool:
    """Whether x holds a NaN. Its sum is NaN whenever it does (and where +inf meets -inf), so one
    reduction clears the common case; the elementwise check, a pass that writes a bool per entry
    (1.4 ms for 32 x 30522 logits on one CPU thread against 0.2), runs only to confirm."""
    return bool(torch.isnan(x.sum())) and bool(torch.isnan(x).any())


class _ModelCaller:
    """Calls the model, batches compatible guidance branches, counts calls and checks outputs."""

    def __init__(self, model: Callable, vocab_size: int | None = None):
        self.model = model
        self.vocab_size = vocab_size
        self.nfe = 0

    def _check(self, velocity, logits, branch: _Branch, want_video: bool, want_text: bool):
        if want_video:
            if velocity is None or velocity.shape != branch.video.shape:
                got = None if velocity is None else list(velocity.shape)
                raise FlowError(f"model returned velocity {got}, expected {list(branch.video.shape)}")
            if _has_nan(velocity):
                raise FlowError("model returned NaN velocity")
        if want_text:
            expected = (*branch.text.shape, self.vocab_size)
            if logits is None or tuple(logits.shape) != expected:
                got = None if logits is None else list(logits.shape)
                raise FlowError(f"model returned logits {got}, expected {list(expected)} "
                                "(the vocabulary without the mask id)")
            if _has_nan(logits):
                raise FlowError("model returned NaN logits")

    def forward(self, branches: list[_Branch], want_video: bool, want_text: bool,
                batch: bool = True) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Run each branch; branches with matching shapes go through as one batch."""
        if batch and len(branches) > 1 and len({b.signature() for b in branches}) == 1:
            sizes = [b.condition.shape[0] for b in branches]

            def cat(name):
                parts = [getattr(b, name) for b in branches]
                return None if parts[0] is None else torch.cat(parts)

            merged = _Branch(*(cat(n) for n in ("video", "text", "video_timestep", "text_timestep", "condition")))
            velocity, logits = self._call(merged, want_video, want_text)
            vs = velocity.split(sizes) if velocity is not None else [None] * len(sizes)
            ls = logits.split(sizes) if logits is not None else [None] * len(sizes)
            return list(zip(vs, ls))
        return [self._call(b, want_video, want_text) for b in branches]

    def _call(self, b: _Branch, want_video: bool, want_text: bool):
        out = self.model(b.video, b.text, b.video_timestep, b.text_timestep, b.condition)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise FlowError("the model must return a pair (velocity, logits)")
        self.nfe += 1
        velocity, logits = out
        self._check(velocity, logits, b, want_video, want_text)
        return velocity, logits

    def prefill(self, **kwargs):
        return self.model.prefill(**kwargs)

    def step_video(self, video, timestep, cache):
        self.nfe += 1
        velocity = self.model.step_video(video, timestep, cache)
        self._check(velocity, None, _Branch(video, None, None, None, video), True, False)
        return velocity

    def step_text(self, text, timestep, cache):
        self.nfe += 1
        logits = self.model.step_text(text, timestep, cache)
        self._check(None, logits, _Branch(None, text, None, None, text), False, True)
        return logits


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
# Video: guidance and ODE steps
# --------------------------------------------------------------------------------------------


def guide(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``u + w (c - u)`` (scale 1 returns the conditional exactly)."""
    if scale == 1.0:
        return conditional
    return unconditional + scale * (conditional - unconditional)


def _lambda(s: float) -> float:
    """Half log-SNR of the rectified-flow path, ``log((1 - s) / s)``."""
    if s >= 1.0:
        return -math.inf
    if s <= 0.0:
        return math.inf
    return math.log1p(-s) - math.log(s)


class VideoODESolver:
    """Steps ``x_s`` down a descending grid of noise levels with Euler, Heun or DPM-Solver++(2M).

    The final step to ``s = 0`` is always first order, so the model is never evaluated on a clean
    video (which a ``clean_isolated`` model treats as a clean modality).
    """

    def __init__(self, solver: VideoSolver, grid: torch.Tensor):
        self.solver = solver
        self.grid = [float(v) for v in grid]
        self._previous: tuple[torch.Tensor, float] | None = None  # (data estimate, h) of the last step

    def step(self, i: int, x: torch.Tensor, velocity: torch.Tensor,
             evaluate: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        """One step from ``grid[i]`` to ``grid[i + 1]``; `velocity` is the (guided) velocity at x.

        `evaluate(x, j)` returns the velocity at grid point ``j`` (Heun's corrector needs it).
        """
        s, s_next = self.grid[i], self.grid[i + 1]
        if self.solver == "euler":
            return x + (s_next - s) * velocity
        if self.solver == "heun":
            predicted = x + (s_next - s) * velocity
            if s_next <= 0.0:
                return predicted
            return x + (s_next - s) * 0.5 * (velocity + evaluate(predicted, i + 1))
        return self._dpmpp2m(x, velocity, s, s_next)

    def _dpmpp2m(self, x, velocity, s, s_next):
        # Data prediction with alpha = 1 - s, sigma = s; the first-order update is exact Euler.
        data = RectifiedFlowPath.velocity_to_data(x, velocity, torch.full(x.shape[:1], s, dtype=x.dtype))
        if s_next <= 0.0:
            self._previous = None
            return data
        h = _lambda(s_next) - _lambda(s)
        estimate = data
        if self._previous is not None and math.isfinite(self._previous[1]) and math.isfinite(h):
            r = self._previous[1] / h
            estimate = (1.0 + 0.5 / r) * data - (0.5 / r) * self._previous[0]
        self._previous = (data, h)
        ratio = s_next / s
        coefficient = (1.0 - s_next) - (1.0 - s) * ratio  # alpha_next (1 - e^{-h})
        return ratio * x + coefficient * estimate


# --------------------------------------------------------------------------------------------
# Text: categorical draws, discrete steps, decoding
# --------------------------------------------------------------------------------------------


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


def guide_logits(conditional: torch.Tensor, unconditional: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Guided float64 log-probabilities ``(1 - w) log p_u + w log p_c`` (unnormalised)."""
    cond = _log_probs(conditional)
    if unconditional is None or scale == 1.0:
        return cond
    uncond = _log_probs(unconditional)
    return guide(cond.clamp(min=_LOG_PROB_FLOOR), uncond.clamp(min=_LOG_PROB_FLOOR), scale)


# Rows of [M, V] drawn together: their float64 work fits about 4 MiB, so it stays in cache and the
# allocator reuses one block from row block to row block (a fresh [M, V] float64 tensor per step
# costs its page faults, about as much as the arithmetic).
_DRAW_BLOCK_ELEMENTS = 1 << 19


def _categorical(log_weights: torch.Tensor, uniforms: torch.Tensor, temperature: float,
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
    parts = [_categorical_block(flat[i:i + block], flat_u[i:i + block], temperature, confidence)
             for i in range(0, max(flat.shape[0], 1), block)]  # one (empty) block when no rows
    idx = torch.cat([p[0] for p in parts]).view(lead)
    return idx, (torch.cat([p[1] for p in parts]).view(lead) if confidence else None)


def _categorical_block(log_weights, uniforms, temperature, confidence):
    """`_categorical` for rows [m, V]."""
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
    return _categorical(log_probs, uniforms, temperature)[0]


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
    drawn, probability = _categorical(log_probs, uniforms[rows.to(uniforms.device)], temperature, confidence)
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


def _blocks(length: int, block_length: int | None, steps: int) -> list[tuple[int, int, int]]:
    """(start, end, steps) per semi-autoregressive block; steps spread as evenly as possible."""
    size = length if block_length is None else min(block_length, length)
    starts = list(range(0, length, size))
    if steps < len(starts):
        raise FlowError(f"{steps} text steps cannot cover {len(starts)} blocks of length {size}; "
                        "use at least one step per block")
    base, extra = divmod(steps, len(starts))
    return [(a, min(a + size, length), base + (1 if k < extra else 0)) for k, a in enumerate(starts)]


class _TextUpdater:
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
    caller = _ModelCaller(model, text_path.vocab_size if text_path is not None else None)

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
        uncond = _Branch(x_now, noised_text, vt, noised_t, uncond_condition) if use_guidance else None
        if cache is not None:
            v_cond = caller.step_video(x_now, vt, cache)
            v_uncond = caller.forward([uncond], True, False)[0][0] if use_guidance else None
        else:
            branches = [_Branch(x_now, text, vt, text_clean_t, condition)] + ([uncond] if use_guidance else [])
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
    updater = _TextUpdater(path, options, rng)
    caller = _ModelCaller(model, path.vocab_size)
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
            logits = caller.forward([_Branch(video, tokens, video_clean_t, tt, condition)], False, True)[0][1]
        uncond = None
        if guided:
            uncond = caller.forward([_Branch(None, tokens, None, tt, condition)], False, True)[0][1]
        return logits, uncond

    tokens = rng.source_tokens(path, batch, length, device)
    blocks = _blocks(length, options.block_length, options.steps)
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
    updater = _TextUpdater(path, topt, rng)
    caller = _ModelCaller(model, path.vocab_size)
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
        branches = [_Branch(x_now, text_now, vt, tt, condition)]
        if use_guidance:
            branches.append(_Branch(x_now, noised_text, vt, _timesteps(1.0, batch, device), uncond_condition))
        outs = caller.forward(branches, True, want_text, batch=vopt.batch_guidance)
        velocity = outs[0][0].float()
        if use_guidance:
            velocity = guide(velocity, outs[1][0].float(), vopt.guidance_scale)
        logits = None
        if want_text:
            uncond_logits = None
            if text_guided:
                uncond_logits = caller.forward([_Branch(None, text_now, None, tt, condition)], False, True)[0][1]
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
