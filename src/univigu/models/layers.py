"""Building blocks of the Wan DiT: attention, norms, RoPE, timestep embedding.

Parameter names follow diffusers' `WanTransformer3DModel` so that its checkpoints load directly.
Norms, modulation, RoPE and the timestep embedding are computed in fp32 even under bf16 autocast.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import LogitOffsets, attention
from .rms_norm import rms_norm


# The norms need no autocast-disabled region: autocast never lowers layer_norm / rms_norm, so fp32
# inputs and weights keep them in fp32 (and entering a disabled region costs more than the norm
# itself on small tensors).
class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (Wan's norm1/norm2/norm3/norm_out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class FP32RMSNorm(nn.RMSNorm):
    """RMSNorm over the full hidden size (across heads), in fp32, output in the input dtype (or
    `dtype`)."""

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        eps = self.eps if self.eps is not None else torch.finfo(torch.float32).eps
        return rms_norm(x, weight, eps).to(dtype or x.dtype)


def compute_dtype(layer: nn.Linear, device_type: str) -> torch.dtype:
    """The dtype `layer` multiplies in: autocast's where autocast is on, else its weight's. The
    fp32 residual stream is cast to it once before the layers that read it (autocast would cast it
    again in every one of them)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return layer.weight.dtype


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos | sin] sinusoidal embedding of float timesteps [B] -> [B, dim] (fp32)."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear (diffusers' TimestepEmbedding: linear_1, linear_2)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class TextProjection(nn.Module):
    """Prompt-embedding projection: Linear -> GELU(tanh) -> Linear (PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class GELUProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Wan FFN with diffusers' key layout: net.0.proj (in + GELU-tanh), net.1 dropout, net.2 out."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProjection(dim, inner_dim), nn.Dropout(0.0), nn.Linear(inner_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings. Tables are (cos, sin) pairs shaped [L, head_dim] in fp32, so the
# rotation works for any mix of video and text tokens: concatenate the tables along L.
# ---------------------------------------------------------------------------------------------


def _axis_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Angles [L, dim/2] of one axis: pos * theta^(-2j/dim), computed in float64."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim))
    return positions.double()[:, None] * freqs[None, :]


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Wan's per-axis rotary widths (t, h, w): d - 4(d//6), 2(d//6), 2(d//6)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def video_rope(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
               device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE for a (frames, rows, cols) token grid in frame-major order; interleaved pairs.

    The tables depend only on the grid, so they are cached (every forward and every sampling step
    reuses them); callers must not modify them in place.
    """
    return _video_rope_tables(tuple(int(n) for n in grid), int(head_dim), float(theta),
                              torch.device(device if device is not None else "cpu"))


@functools.lru_cache(maxsize=16)
def _video_rope_tables(grid: tuple[int, int, int], head_dim: int, theta: float,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Normal tensors even when first called under inference_mode, so training can use them later.
    with torch.inference_mode(False), torch.no_grad():
        return _compute_video_rope(grid, head_dim, theta, device)


def _compute_video_rope(grid, head_dim, theta, device):
    f, h, w = grid
    dims = rope_split(head_dim)
    axes = [torch.arange(n, device=device) for n in (f, h, w)]
    parts = [_axis_angles(pos, d, theta) for pos, d in zip(axes, dims)]
    angles = torch.cat([
        parts[0][:, None, None, :].expand(f, h, w, -1),
        parts[1][None, :, None, :].expand(f, h, w, -1),
        parts[2][None, None, :, :].expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, head_dim // 2)
    angles = angles.repeat_interleave(2, dim=-1)  # pair (2i, 2i+1) shares one angle
    return angles.cos().float(), angles.sin().float()


def text_rope(length: int, head_dim: int, theta: float = 10000.0, style: str = "interleaved",
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """1D RoPE over the full head dim for positions 0..L-1.

    `interleaved` pairs channels (2i, 2i+1) like Wan; `rotate_half` pairs (i, i + d/2) like the
    published Uni-ViGU text stream. The table layout encodes the convention, so one rotation
    function serves both (see `apply_rope`). Tables are cached per (length, head_dim, theta, style,
    device); callers must not modify them in place.
    """
    if style not in ("interleaved", "rotate_half", "none"):
        raise ValueError(f"unknown text RoPE style {style!r}")
    if style == "none":
        return None
    # Cached like the video tables: the sampler asks for the same table at every step.
    return _text_rope_tables(int(length), int(head_dim), float(theta), style,
                             torch.device(device if device is not None else "cpu"))


@functools.lru_cache(maxsize=16)
def _text_rope_tables(length: int, head_dim: int, theta: float, style: str,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode(False), torch.no_grad():
        angles = _axis_angles(torch.arange(length, device=device), head_dim, theta)
        if style == "interleaved":
            angles = angles.repeat_interleave(2, dim=-1)
        else:
            angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().float(), angles.sin().float()


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of fp32 x [B, L, H, D] by the angles of tables [L, D]."""
    c, s = cos[:, 0::2], sin[:, 0::2]  # one angle per pair (the tables repeat it)
    if torch.compiler.is_compiling() or x.device.type not in ("cpu", "cuda"):
        # Real form: inductor fuses it into one kernel; complex tensors are not lowered (nor on MPS).
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = c[None, :, None, :], s[None, :, None, :]
        return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    # Eager: one complex multiply is a single pass over x (several times faster than the real form).
    rotation = torch.complex(c, s)[None, :, None, :]
    pairs = torch.view_as_complex(x.contiguous().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               pairing: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x [B, L, H, D] by per-token tables [L, D].

    `pairing` [L] is 0 for interleaved tokens and 1 for rotate-half tokens, so one joint sequence
    can mix Wan's video convention and the published text convention. None means every token is
    interleaved (Wan's video; the default text stream), which takes a faster path.
    """
    if pairing is None:
        return _rotate_interleaved(x.float(), cos, sin).to(x.dtype)
    xf = x.float()
    inter = torch.stack([-xf[..., 1::2], xf[..., 0::2]], dim=-1).flatten(-2)
    half = xf.shape[-1] // 2
    rot_half = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    rotated = torch.where(pairing.view(1, -1, 1, 1).bool(), rot_half, inter)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.to(x.dtype)


class WanAttention(nn.Module):
    """Multi-head attention with QK RMSNorm across heads (diffusers' WanAttention layout)."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.norm_q = FP32RMSNorm(inner, eps=eps)
        self.norm_k = FP32RMSNorm(inner, eps=eps)

    def _heads(self, norm: FP32RMSNorm, y: torch.Tensor, rope: tuple | None) -> torch.Tensor:
        """norm(y) split into heads [B, L, H, D] and rotated when a rope table is given; in y's
        dtype, but fp32 from the norm through the rotation (one rounding, not three)."""
        if rope is None:
            return norm(y).unflatten(-1, (self.heads, self.head_dim))
        heads = norm(y, dtype=torch.float32).unflatten(-1, (self.heads, self.head_dim))
        return apply_rope(heads, *rope).to(y.dtype)

    def project_kv(self, x: torch.Tensor, rope: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, L, H, D] of the tokens x (rotated when a rope table is given)."""
        v = self.to_v(x).unflatten(-1, (self.heads, self.head_dim))
        return self._heads(self.norm_k, self.to_k(x), rope), v

    def project_q(self, x: torch.Tensor, rope: tuple | None = None, linear: torch.Tensor | None = None) -> torch.Tensor:
        """Queries [B, L, H, D] of the tokens x; `linear`: their `to_q` output when already computed
        (the unified block projects text tokens with their own layer)."""
        return self._heads(self.norm_q, self.to_q(x) if linear is None else linear, rope)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None, offsets: LogitOffsets | None = None) -> torch.Tensor:
        """SDPA over [B, L, H, D] tensors; mask [B, 1, Lq, Lk] bool (True = may attend) or a float
        bias, or `offsets` (a low-rank logit offset, no [Lq, Lk] tensor: `attention.LogitOffsets`)."""
        out = attention(q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype), mask,
                        offsets=offsets)
        out = out.transpose(1, 2).flatten(2)
        return self.to_out[1](self.to_out[0](out))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, rope: tuple | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        source = x if context is None else context
        q = self.project_q(x, rope)
        k, v = self.project_kv(source, rope if context is None else None)
        return self.attend(q, k, v, mask)
