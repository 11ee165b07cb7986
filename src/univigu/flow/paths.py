"""Probability paths of the unified flow, and every conversion between time conventions.

Our convention (DESIGN.md section 4): each modality has a *noise level* ``s`` in [0, 1] per sample;
``s = 1`` is pure noise (video) or all source tokens (text), ``s = 0`` is data.

* Video: rectified flow ``x_s = (1 - s) x + s eps``, velocity target ``eps - x``.
* Text: the mixture path. Each token is the data token with probability ``kappa(s) = (1 - s)^n`` and a
  source token otherwise (the ``[MASK]`` id ``V``, or a uniform draw over the non-special vocabulary).

Other conventions this module converts to and from (and nothing else in univigu should):

* the model boundary / Wan / diffusers: ``timestep = 1000 s`` (diffusers' flow ``sigma`` equals ``s``);
* facebookresearch/flow_matching: ``t = 1 - s`` (0 = source, 1 = data), ``kappa_t = t^n``;
* MDLM / LLaDA: the mask probability ``1 - kappa`` (equal to ``s`` when ``n = 1``);
* the timestep shift of sampling grids: ``s' = k s / (1 + (k - 1) s)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

TIMESTEP_SCALE = 1000.0


class FlowError(ValueError):
    """Invalid input to a flow path, loss or sampler (shape, range or option)."""


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _check_noise_level(s: torch.Tensor, name: str = "noise level") -> None:
    if not torch.is_tensor(s):
        raise FlowError(f"{name} must be a tensor, got {type(s).__name__}")
    if not s.is_floating_point():
        raise FlowError(f"{name} must be a float tensor, got {s.dtype}")
    if s.numel() and (torch.isnan(s).any() or s.min() < 0 or s.max() > 1):
        raise FlowError(f"{name} must lie in [0, 1], got values in [{s.min().item()}, {s.max().item()}]")


def _check_per_sample(s: torch.Tensor, batch: int, name: str) -> None:
    _check_noise_level(s, name)
    if s.shape != (batch,):
        raise FlowError(f"{name} must have shape [{batch}] (one value per sample), got {list(s.shape)}")


def _check_positive(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise FlowError(f"{name} must be a positive number, got {value!r}")


def _broadcast_per_sample(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] matching `like`'s rank."""
    return s.reshape(s.shape + (1,) * (like.dim() - 1)).to(like.dtype)


# --------------------------------------------------------------------------------------------
# Time conventions
# --------------------------------------------------------------------------------------------


def noise_level_to_timestep(s: torch.Tensor) -> torch.Tensor:
    """Our noise level -> the model's timestep (Wan / diffusers scale, 1000 = pure noise)."""
    _check_noise_level(s)
    return s * TIMESTEP_SCALE


def timestep_to_noise_level(timestep: torch.Tensor) -> torch.Tensor:
    """The model's 0..1000 timestep -> our noise level."""
    if not torch.is_tensor(timestep) or not timestep.is_floating_point():
        raise FlowError("timestep must be a float tensor")
    s = timestep / TIMESTEP_SCALE
    _check_noise_level(s, "timestep / 1000")
    return s


def noise_level_to_fm_time(s: torch.Tensor) -> torch.Tensor:
    """Our noise level -> flow_matching's t (0 = source, 1 = data)."""
    _check_noise_level(s)
    return 1.0 - s


def fm_time_to_noise_level(t: torch.Tensor) -> torch.Tensor:
    """flow_matching's t -> our noise level."""
    _check_noise_level(t, "flow_matching time")
    return 1.0 - t


def shift_noise_level(s: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift ``s' = k s / (1 + (k - 1) s)``; k > 1 spends more steps at high noise."""
    _check_positive(shift, "shift")
    _check_noise_level(s)
    return shift * s / (1.0 + (shift - 1.0) * s)


def unshift_noise_level(s_shifted: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of `shift_noise_level`: ``s = s' / (k - (k - 1) s')``."""
    _check_positive(shift, "shift")
    _check_noise_level(s_shifted, "shifted noise level")
    return s_shifted / (shift - (shift - 1.0) * s_shifted)


def sampling_grid(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """Descending noise levels ``[steps + 1]`` (float64) from 1 to 0, uniform then shifted."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise FlowError(f"steps must be a positive integer, got {steps!r}")
    uniform = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
    return shift_noise_level(uniform, shift)


# --------------------------------------------------------------------------------------------
# The kappa schedule of the text path
# --------------------------------------------------------------------------------------------


def kappa(s: torch.Tensor, exponent: float = 1.0) -> torch.Tensor:
    """Data fraction ``kappa(s) = (1 - s)^n`` (flow_matching's ``t^n`` with ``t = 1 - s``)."""
    _check_positive(exponent, "kappa exponent")
    _check_noise_level(s)
    return (1.0 - s) ** exponent


def kappa_derivative(s: torch.Tensor, exponent: float = 1.0) -> torch.Tensor:
    """``d kappa / dt = n t^(n-1)`` in flow_matching time ``t = 1 - s`` (so ``-d kappa / ds``)."""
    _check_positive(exponent, "kappa exponent")
    _check_noise_level(s)
    return exponent * (1.0 - s) ** (exponent - 1.0)


def kappa_inverse(k: torch.Tensor, exponent: float = 1.0) -> torch.Tensor:
    """The noise level with data fraction `k`: ``s = 1 - k^(1/n)``."""
    _check_positive(exponent, "kappa exponent")
    _check_noise_level(k, "kappa")
    return 1.0 - k ** (1.0 / exponent)


def mask_probability(s: torch.Tensor, exponent: float = 1.0) -> torch.Tensor:
    """MDLM / LLaDA's masking probability ``1 - kappa`` (their time when ``n = 1``)."""
    return 1.0 - kappa(s, exponent)


def jump_rate(s: torch.Tensor, exponent: float = 1.0, min_noise_level: float = 0.0) -> torch.Tensor:
    """``kappa' / (1 - kappa)``: the rate at which a source token jumps to data as ``s`` falls.

    It is also the generalized-KL weight. It diverges at ``s = 0``; `min_noise_level` clamps ``s``
    from below (flow_matching's ``time_epsilon``).
    """
    _check_noise_level(s)
    s = s.clamp(min=min_noise_level)
    return kappa_derivative(s, exponent) / (1.0 - kappa(s, exponent))


def commit_probability(s: torch.Tensor, s_next: torch.Tensor, exponent: float = 1.0) -> torch.Tensor:
    """Probability that a source token becomes data going from `s` down to `s_next`.

    ``(kappa(s') - kappa(s)) / (1 - kappa(s))`` is the exact integral of the jump rate,
    ``1 - exp(-integral of kappa' / (1 - kappa))``, so the step has no time-discretisation error.
    """
    _check_noise_level(s)
    _check_noise_level(s_next, "next noise level")
    k, k_next = kappa(s, exponent), kappa(s_next, exponent)
    if torch.any(s_next > s):
        raise FlowError("commit_probability needs s_next <= s (noise levels decrease while sampling)")
    denom = 1.0 - k
    # s = 0 has nothing left to commit; report 1 so a final step is always a full commit.
    return torch.where(denom > 0, (k_next - k) / denom.clamp(min=torch.finfo(denom.dtype).tiny), torch.ones_like(k))


# --------------------------------------------------------------------------------------------
# Training-time noise-level sampling
# --------------------------------------------------------------------------------------------


def _draw(shape: Sequence[int], generator: torch.Generator | None, kind: str,
          device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """rand / randn on the generator's device, then moved (generators are device bound)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    fn = torch.rand if kind == "rand" else torch.randn
    out = fn(tuple(shape), generator=generator, device=gen_device, dtype=dtype)
    return out.to(device) if device is not None else out


@dataclass
class NoiseLevelSampler:
    """Draws training noise levels ``s`` per sample.

    * ``uniform``: ``s ~ U[0, 1)``.
    * ``logit_normal``: ``s = sigmoid(N(mean, std))`` (SD3 / Wan training).
    * ``shifted``: uniform, then the timestep shift.
    `shift` is applied after every method (``shift = 1`` leaves draws unchanged), so ``shifted`` is
    uniform with a shift and ``logit_normal`` can be shifted too.
    """

    method: Literal["uniform", "logit_normal", "shifted"] = "logit_normal"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in ("uniform", "logit_normal", "shifted"):
            raise FlowError(f"unknown noise-level sampling method {self.method!r} "
                            "(choose uniform, logit_normal or shifted)")
        _check_positive(self.logit_normal_std, "logit_normal_std")
        _check_positive(self.shift, "shift")

    @classmethod
    def from_config(cls, flow_config) -> "NoiseLevelSampler":
        """Video noise-level sampler from a `FlowConfig`."""
        return cls(method=flow_config.video_time_sampling, logit_normal_mean=flow_config.logit_normal_mean,
                   logit_normal_std=flow_config.logit_normal_std, shift=flow_config.train_shift)

    def __call__(self, batch_size: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        if not isinstance(batch_size, int) or batch_size < 0:
            raise FlowError(f"batch_size must be a non-negative integer, got {batch_size!r}")
        if self.method == "logit_normal":
            z = _draw((batch_size,), generator, "randn", device)
            s = torch.sigmoid(z * self.logit_normal_std + self.logit_normal_mean)
        else:
            s = _draw((batch_size,), generator, "rand", device)
        return shift_noise_level(s, self.shift) if self.shift != 1.0 else s


# --------------------------------------------------------------------------------------------
# Video: the rectified-flow path
# --------------------------------------------------------------------------------------------


@dataclass
class VideoPathSample:
    """One draw from the rectified-flow path. Tensors are ``[B, ...]``; `noise_level` is ``[B]``."""

    data: torch.Tensor
    noise: torch.Tensor
    noisy: torch.Tensor  # x_s = (1 - s) x + s eps
    target: torch.Tensor  # velocity eps - x
    noise_level: torch.Tensor

    @property
    def timestep(self) -> torch.Tensor:
        return noise_level_to_timestep(self.noise_level)


class RectifiedFlowPath:
    """``x_s = (1 - s) x + s eps`` with velocity ``d x_s / d s = eps - x`` (Wan / SD3 convention)."""

    def sample(self, data: torch.Tensor, noise_level: torch.Tensor, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> VideoPathSample:
        if not torch.is_tensor(data) or not data.is_floating_point() or data.dim() < 1:
            raise FlowError("video data must be a float tensor [B, ...]")
        _check_per_sample(noise_level, data.shape[0], "video noise level")
        if noise is None:
            noise = _draw(data.shape, generator, "randn", data.device, data.dtype)
        elif noise.shape != data.shape:
            raise FlowError(f"noise shape {list(noise.shape)} does not match data shape {list(data.shape)}")
        s = _broadcast_per_sample(noise_level, data)
        noisy = (1.0 - s) * data + s * noise
        return VideoPathSample(data=data, noise=noise, noisy=noisy, target=noise - data, noise_level=noise_level)

    @staticmethod
    def velocity_to_data(noisy: torch.Tensor, velocity: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        """The data estimate ``x = x_s - s v`` implied by a velocity."""
        return noisy - _broadcast_per_sample(noise_level, noisy) * velocity

    @staticmethod
    def velocity_to_noise(noisy: torch.Tensor, velocity: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        """The noise estimate ``eps = x_s + (1 - s) v`` implied by a velocity."""
        return noisy + (1.0 - _broadcast_per_sample(noise_level, noisy)) * velocity


# --------------------------------------------------------------------------------------------
# Text: the discrete mixture path
# --------------------------------------------------------------------------------------------


@dataclass
class TextPathSample:
    """One draw from the mixture path. Token tensors are ``[B, L]`` long; `noise_level` is ``[B]``."""

    data: torch.Tensor
    noisy: torch.Tensor
    from_data: torch.Tensor  # bool [B, L]: the position holds the data token (not a source draw)
    noise_level: torch.Tensor

    @property
    def timestep(self) -> torch.Tensor:
        return noise_level_to_timestep(self.noise_level)


@dataclass
class MixtureTextPath:
    """The discrete mixture path ``p_s(y) = kappa(s) delta_data + (1 - kappa(s)) p_source``.

    Args:
        vocab_size: V, the text vocabulary *without* the mask id; the model's logits have V entries.
        source: ``"mask"`` (every source token is the mask id ``V``) or ``"uniform"`` (uniform over
            the vocabulary minus `special_ids`).
        special_ids: BOS / EOS / PAD / ... ids, never drawn from the uniform source.
        kappa_exponent: n in ``kappa = (1 - s)^n``.
    """

    vocab_size: int
    source: Literal["mask", "uniform"] = "mask"
    special_ids: tuple[int, ...] = ()
    kappa_exponent: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise FlowError(f"vocab_size must be a positive integer, got {self.vocab_size!r}")
        if self.source not in ("mask", "uniform"):
            raise FlowError(f"unknown text source {self.source!r} (choose mask or uniform)")
        _check_positive(self.kappa_exponent, "kappa exponent")
        self.special_ids = tuple(sorted({int(i) for i in self.special_ids}))
        bad = [i for i in self.special_ids if not 0 <= i <= self.vocab_size]
        if bad:
            raise FlowError(f"special id {bad[0]} is outside the vocabulary [0, {self.vocab_size}]")
        if self.source == "uniform" and not self.source_ids().numel():
            raise FlowError("the uniform source has no ids left once special ids are removed")

    @classmethod
    def from_config(cls, flow_config, vocab_size: int, special_ids: Sequence[int] = ()) -> "MixtureTextPath":
        return cls(vocab_size=vocab_size, source=flow_config.text_source, special_ids=tuple(special_ids),
                   kappa_exponent=flow_config.kappa_exponent)

    @property
    def mask_id(self) -> int:
        """The mask id: one extra id appended to the vocabulary (DESIGN.md section 4)."""
        return self.vocab_size

    def source_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Ids the uniform source draws from."""
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        specials = [i for i in self.special_ids if i < self.vocab_size]
        keep[specials] = False
        return keep.nonzero().flatten().to(device)

    def kappa(self, s: torch.Tensor) -> torch.Tensor:
        return kappa(s, self.kappa_exponent)

    def jump_rate(self, s: torch.Tensor, min_noise_level: float = 0.0) -> torch.Tensor:
        return jump_rate(s, self.kappa_exponent, min_noise_level)

    def commit_probability(self, s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
        return commit_probability(s, s_next, self.kappa_exponent)

    def check_tokens(self, tokens: torch.Tensor, name: str = "text", allow_mask: bool = False) -> None:
        if not torch.is_tensor(tokens) or tokens.dtype != torch.long or tokens.dim() != 2:
            raise FlowError(f"{name} must be a long tensor [B, L]")
        high = self.vocab_size + (1 if allow_mask else 0)
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= high):
            raise FlowError(f"{name} has ids outside [0, {high}): found {tokens.min().item()}..{tokens.max().item()}")

    def sample_source(self, shape: Sequence[int], generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
        """A canvas of source tokens (all mask ids, or uniform non-special ids)."""
        if self.source == "mask":
            return torch.full(tuple(shape), self.mask_id, dtype=torch.long, device=device)
        ids = self.source_ids()
        u = _draw(shape, generator, "rand", dtype=torch.float64)
        pick = (u * ids.numel()).long().clamp(max=ids.numel() - 1)
        return ids[pick].to(device)

    def sample(self, data: torch.Tensor, noise_level: torch.Tensor,
               generator: torch.Generator | None = None) -> TextPathSample:
        """Keep each data token with probability kappa(s), else replace it by a source draw."""
        self.check_tokens(data, "text data")
        _check_per_sample(noise_level, data.shape[0], "text noise level")
        keep_prob = self.kappa(noise_level.to(torch.float64))[:, None]
        u = _draw(data.shape, generator, "rand", dtype=torch.float64).to(data.device)
        from_data = u < keep_prob.to(data.device)
        source = self.sample_source(data.shape, generator, data.device)
        noisy = torch.where(from_data, data, source)
        return TextPathSample(data=data, noisy=noisy, from_data=from_data, noise_level=noise_level)
