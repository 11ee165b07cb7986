"""Sampler options: what a caller may choose for each task's sampler, checked on construction.

There is one set of defaults, `config.SamplerConfig`'s (also what a model directory's sampler.json
holds when nothing overrides it): the options below read their defaults from it, and
`from_config` builds them from a stored config, so the pipeline and direct callers agree.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import SamplerConfig
from .paths import FlowError

VideoSolver = Literal["euler", "heun", "dpmpp2m"]
TextSampler = Literal["euler", "confidence"]

_DEFAULTS = SamplerConfig()


@dataclass
class VideoSamplerOptions:
    """Video ODE sampling (T2V, and the video half of joint sampling); defaults: `SamplerConfig`'s.

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

    steps: int = _DEFAULTS.video_steps
    solver: VideoSolver = _DEFAULTS.video_solver
    shift: float = _DEFAULTS.shift
    guidance_scale: float = _DEFAULTS.guidance_scale
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    batch_guidance: bool = True
    use_cache: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        _check_steps(self.steps)
        if self.solver not in ("euler", "heun", "dpmpp2m"):
            raise FlowError(f"unknown video solver {self.solver!r} (choose euler, heun or dpmpp2m)")
        if not 0 < self.shift < math.inf:
            raise FlowError(f"shift must be a positive finite number, got {self.shift}")
        if not math.isfinite(self.guidance_scale):
            raise FlowError(f"guidance_scale must be a finite number, got {self.guidance_scale}")
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
    """Text sampling (V2T, and the text half of joint sampling); defaults: `SamplerConfig`'s.

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

    steps: int = _DEFAULTS.text_steps
    sampler: TextSampler = _DEFAULTS.text_sampler
    temperature: float = _DEFAULTS.temperature
    guidance_scale: float = _DEFAULTS.text_guidance_scale
    block_length: int | None = None
    use_cache: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        _check_steps(self.steps)
        if self.sampler not in ("euler", "confidence"):
            raise FlowError(f"unknown text sampler {self.sampler!r} (choose euler or confidence)")
        if not 0 <= self.temperature < math.inf:
            raise FlowError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.guidance_scale):
            raise FlowError(f"text guidance_scale must be a finite number, got {self.guidance_scale}")
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


def _check_steps(steps: Any) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise FlowError(f"steps must be a positive integer, got {steps!r}")
