"""UniViGUTransformer: the Wan2.1 DiT with a text stream in every block.

Video tokens keep Wan's modules and diffusers' parameter names, so a diffusers
`WanTransformer3DModel` checkpoint loads straight in and, with no text stream, this model *is*
Wan. Text tokens join the video tokens in one joint self-attention (3D RoPE on video, 1D RoPE on
text), cross-attend to the prompt like video tokens do, and are routed to their own FFN expert in
every block (the paper's modality-driven MoE). Each modality has its own timestep embedding,
modulation and output head.

Conventions (DESIGN.md section 4): timesteps are floats in [0, 1000] per sample and modality,
1000 = pure noise. Under the `clean_isolated` attention policy a modality at timestep 0 does not
attend to the other one, which makes its per-layer keys/values cacheable (`prefill`/`step_*`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..atomic import atomic_file, atomic_write_text, read_json
from ..config import TransformerConfig, from_dict, to_dict
from ..flow.paths import timestep_to_noise_level
from .attention import EXCLUDED, LogitOffsets
from .layers import (
    FeedForward,
    FP32LayerNorm,
    TextProjection,
    TimestepEmbedding,
    WanAttention,
    compute_dtype,
    sinusoidal_embedding,
    text_rope,
    video_rope,
)
from .weights import CheckpointError, check_state_dict, load_state_dict_from_dir

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
QK_NORM = "rms_norm_across_heads"  # the only query/key norm diffusers' Wan builds
CONFIG_NAME = "config.json"


class ModelInputError(ValueError):
    """An input to the transformer has the wrong shape, dtype or range."""


class ConditionEmbedder(nn.Module):
    """Video timestep embedding + 6-way modulation projection + prompt projection (diffusers names)."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TimestepEmbedding(freq_dim, dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TextProjection(text_dim, dim)


class TextStream(nn.Module):
    """The parts only text tokens use: embedding, timestep embedding, output table and head."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.token_embedding = nn.Embedding(cfg.vocab_size + int(cfg.mask_token), dim)
        if cfg.text_position_embedding:
            self.position_embedding = nn.Parameter(torch.zeros(cfg.text_length, dim))
        self.time_embedder = TimestepEmbedding(cfg.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.norm_out = FP32LayerNorm(dim, eps=cfg.text_norm_eps, elementwise_affine=True, bias=False)
        self.proj_out = nn.Linear(dim, cfg.vocab_size)


def _time_modulation(t: torch.Tensor, freq_dim: int, embedder: TimestepEmbedding, proj: nn.Linear):
    """(temb [B, D], modulation [B, 6, D]) in fp32, whatever the autocast state."""
    with torch.autocast(t.device.type, enabled=False):
        sinus = sinusoidal_embedding(t, freq_dim).to(embedder.linear_1.weight.dtype)
        temb = embedder(sinus).float()
        mod = proj(nn.functional.silu(temb).to(proj.weight.dtype)).float()
    return temb, mod.unflatten(1, (6, -1))


@functools.lru_cache(maxsize=16)
def _text_rope_tuple(length: int, head_dim: int, theta: float, style: str, device: torch.device) -> tuple:
    """(cos, sin, pairing) of the text stream, cached: every sampler step asks for the same one."""
    with torch.inference_mode(False), torch.no_grad():
        tables = text_rope(length, head_dim, theta, style, device=device)
        if tables is None:  # no rotation: identity tables
            tables = (torch.ones(length, head_dim, device=device), torch.zeros(length, head_dim, device=device))
        pairing = torch.ones(length, device=device) if style == "rotate_half" else None  # None: interleaved
        return (*tables, pairing)


def _output_head(table: torch.Tensor, norm: nn.Module, proj: nn.Linear, h: torch.Tensor,
                 temb: torch.Tensor) -> torch.Tensor:
    """A modality's output projection of its normed states, shifted and scaled by its table plus
    the timestep embedding."""
    shift, scale = (table + temb.float()[:, None]).chunk(2, dim=1)
    return proj(torch.addcmul(shift, norm(h), 1 + scale).to(compute_dtype(proj, h.device.type)))


def _cat_tokens(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate streams along the tokens; a lone stream is passed through (no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class Modulation(NamedTuple):
    """A block's six modulation chunks [B, 1, D] (fp32), named as diffusers names them: shift,
    scale and gate of the self-attention input (msa) and of the feed-forward input (c_*)."""

    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor
    c_shift_msa: torch.Tensor
    c_scale_msa: torch.Tensor
    c_gate_msa: torch.Tensor


def _indicator(segments: tuple, kind: str, device: torch.device) -> torch.Tensor:
    """[L] bool over the segments ((kind, length), ...) in order: True on those of `kind`."""
    return torch.cat([torch.full((n,), k == kind, dtype=torch.bool, device=device) for k, n in segments])


class JointPattern(NamedTuple):
    """Who attends to whom in a joint self-attention, described without any [S, S] tensor.

    queries, keys: ((kind, length), ...) in sequence order, kind "video" or "text".
    video_isolated, text_isolated: [B] bool or None: the samples whose video (text) queries see no
        key of the other modality (`clean_isolated` with that modality clean); None: no sample.
    bias: video queries add the block's `text_key_bias` to text keys.
    dense: build the dense [B, H, Lq, Lk] mask instead (the reference the tests compare against).
    """

    queries: tuple
    keys: tuple
    video_isolated: torch.Tensor | None
    text_isolated: torch.Tensor | None
    bias: bool
    dense: bool = False

    def _meets(self, query_kind: str, key_kind: str) -> bool:
        return (any(k == query_kind and n for k, n in self.queries)
                and any(k == key_kind and n for k, n in self.keys))

    def offsets(self, text_key_bias: torch.Tensor | None, device: torch.device) -> LogitOffsets | None:
        """The pattern as a rank-1 or rank-2 logit offset: a (video query, text key) term carrying the
        bias (or EXCLUDED for isolated samples) and a (text query, video key) term (EXCLUDED for
        isolated samples); None when neither is needed."""
        queries, keys = [], []
        if self._meets("video", "text") and (self.bias or self.video_isolated is not None):
            value = text_key_bias.float()[None] if self.bias else torch.zeros(1, 1, device=device)  # [1, H]
            if self.video_isolated is not None:
                value = torch.where(self.video_isolated[:, None], EXCLUDED, value)  # [B, H]
            queries.append(_indicator(self.queries, "video", device))
            keys.append(torch.where(_indicator(self.keys, "text", device), value[..., None], 0.0))
        if self._meets("text", "video") and self.text_isolated is not None:
            value = torch.where(self.text_isolated, EXCLUDED, 0.0)[:, None]  # [B, 1]
            queries.append(_indicator(self.queries, "text", device))
            keys.append(torch.where(_indicator(self.keys, "video", device), value[..., None], 0.0))
        if not queries:
            return None
        return LogitOffsets(torch.stack(queries, dim=-1).float(), torch.stack(torch.broadcast_tensors(*keys), dim=-1))

    def dense_mask(self, text_key_bias: torch.Tensor | None, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor | None:
        """The reference: the bool mask [B, 1, Lq, Lk] (True = may attend), or with the bias a float
        mask [B or 1, H, Lq, Lk] with -inf where the bool mask blocks. O(Lq Lk) memory."""
        query_video = _indicator(self.queries, "video", device)[:, None]
        key_video = _indicator(self.keys, "video", device)[None, :]
        blocked = None
        for isolated, pairs in ((self.video_isolated, query_video & ~key_video),
                                (self.text_isolated, ~query_video & key_video)):
            if isolated is not None:
                part = isolated[:, None, None] & pairs[None]
                blocked = part if blocked is None else blocked | part
        mask = None if blocked is None else (~blocked)[:, None]
        if not (self.bias and self._meets("video", "text")):
            return mask
        bias = torch.where(query_video & ~key_video, text_key_bias.view(-1, 1, 1), 0.0)  # [H, Lq, Lk]
        bias = bias[None] if mask is None else torch.where(mask, bias, float("-inf"))
        return bias.to(dtype)


class UniViGUBlock(nn.Module):
    """A Wan block whose FFN is routed by modality; attention, cross-attention, norms and the
    modulation table are shared by both streams.

    The residual stream is fp32 whatever the compute dtype, as in Wan's own code (diffusers rounds
    it to bf16 after every residual); the inputs of the linear layers are cast to their compute
    dtype once each (`compute_dtype`)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.eps)
        self.attn2 = WanAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.eps)
        self.norm2 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.norm3 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        if cfg.vocab_size > 0:
            self.text_ffn = FeedForward(dim, cfg.text_ffn_dim or cfg.ffn_dim)
            if cfg.text_query_projection:
                inner = cfg.inner_dim
                self.text_to_q1, self.text_to_q2 = nn.Linear(dim, inner), nn.Linear(dim, inner)
            if cfg.text_key_bias is not None:
                self.text_key_bias = nn.Parameter(torch.full((cfg.num_attention_heads,), float(cfg.text_key_bias)))

    def _attention_inputs(self, pattern: JointPattern | None, q: torch.Tensor) -> dict:
        """The self-attention's policy as `attend`'s keyword arguments: low-rank logit offsets (no
        [S, S] tensor), or under `pattern.dense` the dense reference mask."""
        if pattern is None:
            return {}
        bias = getattr(self, "text_key_bias", None) if pattern.bias else None
        if pattern.dense:
            return {"mask": pattern.dense_mask(bias, q.dtype, q.device)}
        return {"offsets": pattern.offsets(bias, q.device)}

    def _query_linear(self, parts: list[torch.Tensor], streams, attn: WanAttention, text_layer: str):
        """The query projection of each stream's tokens (text ones through their own layer), or None
        (one projection for all) when the block has no text query layers or no text tokens."""
        if not hasattr(self, text_layer) or all(kind == "video" for _, _, kind in streams):
            return None
        text_to_q = getattr(self, text_layer)
        return _cat_tokens([(attn.to_q if kind == "video" else text_to_q)(x)
                            for x, (_, _, kind) in zip(parts, streams)])

    def _modulated_inputs(self, streams):
        """(per-stream `Modulation`s; per-stream normed and modulated self-attention inputs in the
        compute dtype)."""
        mods = [Modulation(*(self.scale_shift_table + mod.float()).chunk(6, dim=1)) for _, mod, _ in streams]
        low = compute_dtype(self.attn1.to_q, streams[0][0].device.type)
        # addcmul: the modulations and gated residuals in one pass each (mul then add is two).
        normed = [torch.addcmul(m.shift_msa, self.norm1(h), 1 + m.scale_msa).to(low)
                  for (h, _, _), m in zip(streams, mods)]
        return mods, normed

    def keys_values(self, streams, rope: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The self-attention keys and values `forward` computes for these tokens, and nothing else."""
        return self.attn1.project_kv(_cat_tokens(self._modulated_inputs(streams)[1]), rope)

    def forward(self, streams: list[tuple[torch.Tensor, torch.Tensor, str]], context: torch.Tensor,
                rope: tuple | None, pattern: JointPattern | None,
                prefix_kv: tuple[torch.Tensor, torch.Tensor] | Callable | None = None,
                context_kv: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Run one block over the token streams present.

        Args:
            streams: [(hidden [B, n, D] fp32, modulation [B, 6, D], "video" | "text")] in sequence order.
            context: projected prompt embedding [B, Lc, D].
            rope: (cos, sin, pairing) tables for the concatenated streams.
            pattern: who attends to whom (isolation, text-key bias), or None: everyone, unbiased.
            prefix_kv: cached keys/values of a clean modality, prepended to the keys; or a function
                (k, v) -> (keys, values) that does the prepending (`ModalityCache.join`).
            context_kv: the cross-attention keys/values of `context`, when already computed.

        Returns:
            (new hidden states per stream, (keys, values) of the processed tokens).
        """
        mods, normed = self._modulated_inputs(streams)
        low = normed[0].dtype  # the compute dtype
        sizes = [h.shape[1] for h, _, _ in streams]
        x = _cat_tokens(normed)
        q = self.attn1.project_q(x, rope, self._query_linear(normed, streams, self.attn1, "text_to_q1"))
        k, v = self.attn1.project_kv(x, rope)
        new_kv = (k, v)
        if callable(prefix_kv):
            k, v = prefix_kv(k, v)
        elif prefix_kv is not None:
            k, v = torch.cat([prefix_kv[0], k], dim=1), torch.cat([prefix_kv[1], v], dim=1)
        attn = self.attn1.attend(q, k, v, **self._attention_inputs(pattern, q)).split(sizes, dim=1)
        hidden = [torch.addcmul(h, a, m.gate_msa) for (h, _, _), a, m in zip(streams, attn, mods)]

        x = _cat_tokens(hidden)
        ck, cv = context_kv if context_kv is not None else self.attn2.project_kv(context)
        y = self.norm2(x).to(low)
        linear = self._query_linear(list(y.split(sizes, dim=1)), streams, self.attn2, "text_to_q2")
        x = x + self.attn2.attend(self.attn2.project_q(y, linear=linear), ck, cv)
        hidden = list(x.split(sizes, dim=1))

        out = []
        for h, (_, _, kind), m in zip(hidden, streams, mods):
            ffn = self.ffn if kind == "video" else self.text_ffn
            y = ffn(torch.addcmul(m.c_shift_msa, self.norm3(h), 1 + m.c_scale_msa).to(low))
            out.append(torch.addcmul(h, y, m.c_gate_msa))
        return out, new_kv


@dataclass
class ModalityCache:
    """Per-layer keys/values of a clean modality plus what a noisy step needs to reuse.

    Not for concurrent use: a step writes its own keys/values into the cache's buffers."""

    clean: str
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    context: torch.Tensor | None = None
    # Per-layer cross-attention keys/values of `context`: the prompt does not change across steps.
    context_kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    rope: tuple | None = None  # tables of the clean tokens (for ordering the joint sequence)
    num_tokens: int = 0
    grid: tuple[int, int, int] | None = None
    # Per layer: (keys, values) buffers [B, num_tokens + room, H, D] whose head is keys[i]/values[i].
    buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def join(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys/values of `layer` followed by the stepped tokens' k, v [B, m, H, D].

        Equal to concatenating them, but a step writes only its m tokens into a buffer that already
        holds the cached ones: a concatenation copies all of them into fresh memory every layer and
        step, which for a long cache and short text costs about as much as the attention itself. The
        result is a view that the next step overwrites. Where autograd tracks any of them, or the
        buffer cannot be written (other dtype, an inference tensor outside inference mode), it
        concatenates.
        """
        head_k, head_v = self.keys[layer], self.values[layer]
        if any(x.requires_grad for x in (head_k, head_v, k, v)) or k.dtype != head_k.dtype or v.dtype != head_v.dtype:
            return torch.cat([head_k, k], dim=1), torch.cat([head_v, v], dim=1)
        n, total = head_k.shape[1], head_k.shape[1] + k.shape[1]
        buf = self.buffers.get(layer)
        if buf is None or buf[0].shape[1] < total:
            buf = self._grow(layer, total)
        if buf[0].is_inference() and not torch.is_inference_mode_enabled():
            return torch.cat([head_k, k], dim=1), torch.cat([head_v, v], dim=1)
        buf[0][:, n:total] = k
        buf[1][:, n:total] = v
        return buf[0][:, :total], buf[1][:, :total]

    def _grow(self, layer: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """New buffers of `total` tokens holding the cached ones; keys/values become their heads
        (so the cache keeps one copy of them)."""
        buf = []
        for head in (self.keys[layer], self.values[layer]):
            b = head.new_empty((head.shape[0], total, *head.shape[2:]))
            b[:, :head.shape[1]] = head
            buf.append(b)
        n = self.keys[layer].shape[1]
        self.keys[layer], self.values[layer] = buf[0][:, :n], buf[1][:, :n]
        self.buffers[layer] = tuple(buf)
        return self.buffers[layer]


class UniViGUTransformer(nn.Module):
    """Wan2.1 DiT + text stream. With `vocab_size == 0` it is exactly the video backbone."""

    _no_split_modules = ["UniViGUBlock"]

    def __init__(self, config: TransformerConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = TransformerConfig()
        if overrides:
            config = from_dict(TransformerConfig, {**to_dict(config), **overrides})
        if config.attention_head_dim % 2:
            raise ModelInputError(f"attention_head_dim must be even, got {config.attention_head_dim}")
        if not 0 < config.sample_prediction_min_t <= 1:
            raise ModelInputError(f"sample_prediction_min_t must lie in (0, 1], got {config.sample_prediction_min_t}")
        # qk_norm and rope_max_seq_len are kept for the diffusers config.json round trip; the one
        # norm built is the across-heads RMSNorm, and RoPE is computed for any length up to the bound.
        if config.qk_norm != QK_NORM:
            raise ModelInputError(f"qk_norm={config.qk_norm!r} is not supported (only {QK_NORM!r}, as diffusers' Wan)")
        if config.rope_max_seq_len < 1:
            raise ModelInputError(f"rope_max_seq_len must be a positive integer, got {config.rope_max_seq_len}")
        self.config = config
        self.gradient_checkpointing = False
        # Express the attention policy as dense [S, S] masks, as the reference the tests compare the
        # mask-free path against (attention.py); never for real use: O(S^2) memory, no flash.
        self.dense_attention_reference = False
        dim = config.inner_dim
        p = tuple(config.patch_size)
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=p, stride=p)
        self.condition_embedder = ConditionEmbedder(dim, config.freq_dim, config.text_dim)
        self.blocks = nn.ModuleList([UniViGUBlock(config) for _ in range(config.num_layers)])
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, config.out_channels * p[0] * p[1] * p[2])
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.text_stream = TextStream(config) if config.vocab_size > 0 else None
        self.reset_parameters()

    # ------------------------------------------------------------------ init / properties
    def reset_parameters(self) -> None:
        """Wan's initialisation: Xavier linears, zero biases, N(0, 0.02) embeddings, zero heads."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        ce = self.condition_embedder
        for lin in (ce.time_embedder.linear_1, ce.time_embedder.linear_2, ce.text_embedder.linear_1,
                    ce.text_embedder.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.zeros_(self.proj_out.weight)
        if self.config.text_key_bias is not None and self.text_stream is not None:
            for block in self.blocks:
                nn.init.constant_(block.text_key_bias, self.config.text_key_bias)
        if self.text_stream is not None:
            ts = self.text_stream
            nn.init.normal_(ts.token_embedding.weight, std=0.02)
            if self.config.text_position_embedding:
                nn.init.normal_(ts.position_embedding, std=0.02)
            for lin in (ts.time_embedder.linear_1, ts.time_embedder.linear_2):
                nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(ts.proj_out.weight)

    @property
    def has_text_stream(self) -> bool:
        return self.text_stream is not None

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def compile_blocks(self, **options) -> None:
        """torch.compile each block in place (parameter names and checkpoints are unchanged)."""
        for block in self.blocks:
            block.compile(**options)

    # ------------------------------------------------------------------ input checks
    def _check_timestep(self, t, batch: int, name: str) -> torch.Tensor:
        if t is None:
            raise ModelInputError(f"{name} is required")
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ModelInputError(f"{name} must have shape [{batch}] (one per sample), got {list(t.shape)}")
        if not torch.isfinite(t).all() or (t < 0).any() or (t > 1000).any():
            raise ModelInputError(f"{name} must lie in [0, 1000] (1000 = pure noise), got {t.tolist()}")
        return t

    def _check_video(self, video: torch.Tensor) -> tuple[int, int, int]:
        cfg = self.config
        if video.ndim != 5:
            raise ModelInputError(f"video latents must be [B, C, F, H, W], got shape {list(video.shape)}")
        if video.shape[1] != cfg.in_channels:
            raise ModelInputError(f"video latents have {video.shape[1]} channels, the model expects {cfg.in_channels}")
        pt, ph, pw = cfg.patch_size
        f, h, w = video.shape[2:]
        if f % pt or h % ph or w % pw:
            raise ModelInputError(
                f"latent frames/height/width {f}x{h}x{w} must be divisible by the patch size {tuple(cfg.patch_size)}")
        grid = (f // pt, h // ph, w // pw)
        if max(grid) > cfg.rope_max_seq_len:  # diffusers' RoPE tables end there
            raise ModelInputError(f"a patch grid of {grid[0]}x{grid[1]}x{grid[2]} exceeds rope_max_seq_len="
                                  f"{cfg.rope_max_seq_len} positions per axis")
        return grid

    def _check_text(self, text: torch.Tensor) -> None:
        if self.text_stream is None:
            raise ModelInputError("this model has no text stream (vocab_size=0); pass text=None")
        if text.ndim != 2 or text.dtype not in (torch.int64, torch.int32):
            raise ModelInputError(f"text must be integer token ids [B, L], got {text.dtype} {list(text.shape)}")
        if text.shape[1] > self.config.text_length:
            raise ModelInputError(f"text has {text.shape[1]} tokens, longer than the canvas L={self.config.text_length}")
        limit = self.config.vocab_size + int(self.config.mask_token)
        if text.numel() and (text.min() < 0 or text.max() >= limit):
            raise ModelInputError(f"token ids must lie in [0, {limit}), got min {int(text.min())} max {int(text.max())}")

    def _check_condition(self, condition: torch.Tensor, batch: int) -> None:
        if condition is None:
            raise ModelInputError("condition (prompt embedding [B, Lc, text_dim]) is required")
        if condition.ndim != 3 or condition.shape[0] != batch or condition.shape[2] != self.config.text_dim:
            raise ModelInputError(
                f"condition must be [{batch}, Lc, {self.config.text_dim}], got {list(condition.shape)}")

    # ------------------------------------------------------------------ stream helpers
    def _embed_video(self, video, t_video):
        grid = self._check_video(video)
        # fp32, the residual stream's dtype (UniViGUBlock), and contiguous: otherwise the stream keeps
        # the conv's [B, D, N] memory layout through every block (elementwise results follow their
        # inputs' strides), slowing norms and GEMMs.
        hv = self.patch_embedding(video).flatten(2).transpose(1, 2)
        hv = hv.to(torch.float32, memory_format=torch.contiguous_format)
        temb, mod = _time_modulation(t_video, self.config.freq_dim, self.condition_embedder.time_embedder,
                                     self.condition_embedder.time_proj)
        cos, sin = video_rope(grid, self.config.attention_head_dim, device=video.device)
        rope = (cos, sin, None)  # pairing None: every token interleaved (apply_rope's fast path)
        return hv, temb, mod, rope, grid

    def _embed_text(self, text, t_text):
        ts = self.text_stream
        ht = ts.token_embedding(text).float()
        if self.config.text_position_embedding:
            ht = ht + ts.position_embedding[: text.shape[1]]
        temb, mod = _time_modulation(t_text, self.config.freq_dim, ts.time_embedder, ts.time_proj)
        rope = _text_rope_tuple(text.shape[1], self.config.attention_head_dim, float(self.config.text_rope_theta),
                                self.config.text_rope, text.device)
        return ht, temb, mod, rope

    def _video_head(self, hv, temb, grid, batch):
        x = _output_head(self.scale_shift_table, self.norm_out, self.proj_out, hv, temb)
        cfg = self.config
        pt, ph, pw = cfg.patch_size
        f, h, w = grid
        x = x.reshape(batch, f, h, w, pt, ph, pw, cfg.out_channels)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(batch, cfg.out_channels, f * pt, h * ph, w * pw).float()

    def _as_velocity(self, out: torch.Tensor, video: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The head's output as a velocity: unchanged, or from a clean-sample prediction."""
        cfg = self.config
        if cfg.video_prediction == "velocity":
            return out
        t = timestep_to_noise_level(timestep.float()).clamp(min=cfg.sample_prediction_min_t)
        return (video.float() - out) / t.view(-1, *([1] * (out.dim() - 1)))

    def _text_head(self, ht, temb):
        ts = self.text_stream
        return _output_head(ts.scale_shift_table, ts.norm_out, ts.proj_out, ht, temb).float()

    def _run_blocks(self, streams, context, rope, pattern: JointPattern | None, prefix=None,
                    store: ModalityCache | None = None, context_kv: list | None = None):
        """The streams' hidden states after every block; with `store` (a prefill), None: only the
        keys/values of every block are kept, in `store`."""
        for i, block in enumerate(self.blocks):
            if store is not None and i == len(self.blocks) - 1:
                # A prefill keeps keys/values only: the last block's outputs would go unused.
                k, v = block.keys_values(streams, rope)
                store.keys.append(k)
                store.values.append(v)
                return None
            kv = None if prefix is None else functools.partial(prefix.join, i)
            ckv = context_kv[i] if context_kv else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden, new_kv = checkpoint(block, streams, context, rope, pattern, kv, ckv, use_reentrant=False)
            else:
                hidden, new_kv = block(streams, context, rope, pattern, kv, ckv)
            streams = [(h, mod, kind) for h, (_, mod, kind) in zip(hidden, streams)]
            if store is not None:
                store.keys.append(new_kv[0])
                store.values.append(new_kv[1])
        return [h for h, _, _ in streams]

    @staticmethod
    def _cat_rope(*ropes):
        ropes = [r for r in ropes if r is not None]
        if len(ropes) == 1:
            return ropes[0]
        cos, sin = (torch.cat([r[i] for r in ropes], dim=0) for i in (0, 1))
        if all(r[2] is None for r in ropes):
            return cos, sin, None
        pairing = torch.cat([r[2] if r[2] is not None else torch.zeros(r[0].shape[0], device=r[0].device)
                             for r in ropes])
        return cos, sin, pairing

    def _joint_pattern(self, queries: tuple, keys: tuple, video_clean: torch.Tensor | None,
                       text_clean: torch.Tensor | None, isolate: bool) -> JointPattern | None:
        """The joint self-attention's pattern: under isolation a clean modality's queries (per sample:
        `*_clean` [B] bool) do not see the other modality's keys; video queries add the learned bias
        to text keys when the model has one. None when nothing departs from full attention."""
        def isolated(clean):
            return clean if isolate and clean is not None and bool(clean.any()) else None

        video_isolated, text_isolated = isolated(video_clean), isolated(text_clean)
        bias = self.config.text_key_bias is not None and self.has_text_stream
        if video_isolated is None and text_isolated is None and not bias:
            return None
        return JointPattern(queries, keys, video_isolated, text_isolated, bias, self.dense_attention_reference)

    # ------------------------------------------------------------------ forward
    def forward(self, video: torch.Tensor | None, text: torch.Tensor | None = None,
                video_timestep: torch.Tensor | None = None, text_timestep: torch.Tensor | None = None,
                condition: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Joint forward.

        Args:
            video: latents [B, C, F, H, W], or None to run the text stream alone (text guidance).
            text: token ids [B, L] (L <= text_length), or None / L == 0 for video only.
            video_timestep, text_timestep: [B] floats in [0, 1000], 1000 = pure noise.
            condition: prompt embedding [B, Lc, text_dim].

        Returns:
            (velocity [B, C, F, H, W] or None, logits [B, L, vocab_size] or None), both fp32.
        """
        if text is not None and text.shape[-1] == 0:
            text = None
        if video is None and text is None:
            raise ModelInputError("give video latents, text tokens or both")
        if text is not None:
            self._check_text(text)
        batch = video.shape[0] if video is not None else text.shape[0]
        if video is not None and text is not None and text.shape[0] != batch:
            raise ModelInputError(f"video batch {batch} and text batch {text.shape[0]} differ")
        self._check_condition(condition, batch)
        context = self.condition_embedder.text_embedder(condition)

        streams, ropes = [], []
        n_video = n_text = 0
        if video is not None:
            t_video = self._check_timestep(video_timestep, batch, "video_timestep")
            hv, temb_v, mod_v, rope_v, grid = self._embed_video(video, t_video)
            streams.append((hv, mod_v, "video"))
            ropes.append(rope_v)
            n_video = hv.shape[1]
        if text is not None:
            t_text = self._check_timestep(text_timestep, batch, "text_timestep")
            ht, temb_t, mod_t, rope_t = self._embed_text(text, t_text)
            streams.append((ht, mod_t, "text"))
            ropes.append(rope_t)
            n_text = ht.shape[1]
        pattern = None
        if n_video and n_text:
            layout = (("video", n_video), ("text", n_text))
            pattern = self._joint_pattern(layout, layout, t_video == 0, t_text == 0,
                                          isolate=self.config.attention_policy == "clean_isolated")
        hidden = self._run_blocks(streams, context, self._cat_rope(*ropes), pattern)

        velocity = logits = None
        if video is not None:
            velocity = self._as_velocity(self._video_head(hidden[0], temb_v, grid, batch), video, t_video)
        if text is not None:
            logits = self._text_head(hidden[-1], temb_t)
        return velocity, logits

    # ------------------------------------------------------------------ cached sampling protocol
    def supports_cache(self, clean: str = "video") -> bool:
        return self.config.attention_policy == "clean_isolated" and (clean == "video" or self.has_text_stream)

    def prefill(self, clean: str, video: torch.Tensor | None = None, text: torch.Tensor | None = None,
                condition: torch.Tensor | None = None) -> ModalityCache:
        """Run the clean modality once (timestep 0) and keep its per-layer keys/values.

        Only exact under `clean_isolated`, where clean tokens never attend to the noisy ones.
        """
        if self.config.attention_policy != "clean_isolated":
            raise ModelInputError(
                "prefill needs attention_policy='clean_isolated': under 'full' clean tokens attend to the "
                "noisy ones, so their keys/values change every step and cannot be cached")
        if clean not in ("video", "text"):
            raise ModelInputError(f"clean must be 'video' or 'text', got {clean!r}")
        source = video if clean == "video" else text
        if source is None:
            raise ModelInputError(f"prefill(clean={clean!r}) needs the {clean} input")
        if clean == "text":
            self._check_text(source)
        batch = source.shape[0]
        self._check_condition(condition, batch)
        cache = ModalityCache(clean=clean, context=self.condition_embedder.text_embedder(condition))
        zeros = torch.zeros(batch, device=source.device)
        if clean == "video":
            h, _, mod, rope, cache.grid = self._embed_video(source, zeros)
            kind = "video"
        else:
            h, _, mod, rope = self._embed_text(source, zeros)
            kind = "text"
        cache.rope, cache.num_tokens = rope, h.shape[1]
        cache.context_kv = [block.attn2.project_kv(cache.context) for block in self.blocks]
        self._run_blocks([(h, mod, kind)], cache.context, rope, None, store=cache, context_kv=cache.context_kv)
        return cache

    @staticmethod
    def _check_cache_batch(batch: int, cache: ModalityCache) -> None:
        cached = cache.context.shape[0]
        if batch != cached:
            raise ModelInputError(f"batch of {batch} does not match the cache's batch of {cached}")

    def step_text(self, text: torch.Tensor, text_timestep: torch.Tensor, cache: ModalityCache) -> torch.Tensor:
        """Text logits for noisy text attending to a cached clean video."""
        if cache.clean != "video":
            raise ModelInputError("step_text needs a cache of the clean video (prefill(clean='video'))")
        self._check_text(text)
        self._check_cache_batch(text.shape[0], cache)
        t = self._check_timestep(text_timestep, text.shape[0], "text_timestep")
        ht, temb, mod, rope = self._embed_text(text, t)
        # Keys are [cached video; own text]; text at t == 0 does not see the video, as in `forward`.
        pattern = self._joint_pattern((("text", ht.shape[1]),), (("video", cache.num_tokens), ("text", ht.shape[1])),
                                      None, t == 0, isolate=True)
        (ht,) = self._run_blocks([(ht, mod, "text")], cache.context, rope, pattern, prefix=cache,
                                 context_kv=cache.context_kv)
        return self._text_head(ht, temb)

    def step_video(self, video: torch.Tensor, video_timestep: torch.Tensor, cache: ModalityCache) -> torch.Tensor:
        """Video velocity for noisy video attending to cached clean text."""
        if cache.clean != "text":
            raise ModelInputError("step_video needs a cache of the clean text (prefill(clean='text'))")
        self._check_cache_batch(video.shape[0], cache)
        t = self._check_timestep(video_timestep, video.shape[0], "video_timestep")
        hv, temb, mod, rope, grid = self._embed_video(video, t)
        # Keys are [cached text; own video]; video at t == 0 does not see the text, as in `forward`.
        pattern = self._joint_pattern((("video", hv.shape[1]),), (("text", cache.num_tokens), ("video", hv.shape[1])),
                                      t == 0, None, isolate=True)
        (hv,) = self._run_blocks([(hv, mod, "video")], cache.context, rope, pattern, prefix=cache,
                                 context_kv=cache.context_kv)
        return self._as_velocity(self._video_head(hv, temb, grid, video.shape[0]), video, t)

    # ------------------------------------------------------------------ parameter groups
    def parameter_group(self, name: str) -> str:
        """Which group a parameter belongs to: 'video' (the pretrained prior's own parts),
        'text' (new text-only parts) or 'shared' (attention, cross-attention, block modulation
        and the prompt projection, used by both streams)."""
        if name.startswith("text_stream.") or any(f".{part}" in name for part in (
                "text_ffn.", "text_to_q1.", "text_to_q2.")) or name.endswith(".text_key_bias"):
            return "text"
        if name.startswith("blocks.") and any(
                f".{part}" in name for part in ("attn1.", "attn2.", "norm2.", "scale_shift_table")):
            return "shared"
        if name.startswith("condition_embedder.text_embedder."):
            return "shared"
        return "video"

    def set_trainable(self, groups: set[str] | str) -> None:
        """Freeze every parameter outside `groups` ({'video', 'text', 'shared'} or 'all')."""
        if groups == "all":
            groups = {"video", "text", "shared"}
        unknown = set(groups) - {"video", "text", "shared"}
        if unknown:
            raise ValueError(f"unknown parameter group(s) {sorted(unknown)}; use video, text, shared")
        for name, param in self.named_parameters():
            param.requires_grad_(self.parameter_group(name) in groups)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_file(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp))
        atomic_write_text(directory / CONFIG_NAME, json.dumps(
            {"_class_name": "UniViGUTransformer", **to_dict(self.config)}, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "UniViGUTransformer":
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        data = read_json(config_path, CheckpointError)
        if not isinstance(data, dict):
            raise CheckpointError(f"{config_path} must hold a JSON object (the transformer's config)")
        data.pop("_class_name", None)
        model = cls(from_dict(TransformerConfig, data))
        state = load_state_dict_from_dir(directory, device=device)  # single file or sharded + index
        check_state_dict(model, state, str(directory))  # CheckpointError naming missing/unexpected keys
        model.load_state_dict(state)
        return model.to(device)
