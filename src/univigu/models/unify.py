"""Grow a video-only transformer into the unified model (Uni-ViGU's recipe).

The video generator's weights are kept as they are, so with no text the unified model computes
exactly what the generator did. The text stream is added beside them:

* `init="copy"` (the published recipe): each block's text FFN expert is a copy of its video FFN,
  the text timestep embedding (`time_embedder` + `time_proj`) a copy of the video one and the text
  output modulation table a copy of the video output table, so text tokens start out processed
  like video tokens;
* `init="fresh"`: those parts are randomly initialised like a new model.

In both cases the token embedding is drawn from N(0, 0.02) and the text head's linear layer starts
at zero (uniform logits), as in the published code.

Wan checkpoints enter through the backbone loaders: `unify_video_model(load_diffusers_wan(dir), ...)`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError, TransformerConfig, from_dict, to_dict
from .transformer import UniViGUTransformer

#: Config fields a caller may set for the new text stream; everything else comes from the video model.
TEXT_OPTIONS = ("text_ffn_dim", "text_rope", "text_rope_theta", "text_norm_eps", "attention_policy",
                "text_position_embedding", "text_key_bias", "text_query_projection")


class UnifyError(ValueError):
    """The video model or the options given to `unify_video_model` cannot be combined."""


def unified_config(video_config: TransformerConfig, vocab_size: int, text_length: int,
                   mask_token: bool = True, **text_options) -> TransformerConfig:
    """The video config plus a text stream; `text_options` are limited to `TEXT_OPTIONS`."""
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise UnifyError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if not isinstance(text_length, int) or text_length <= 0:
        raise UnifyError(f"text_length (the canvas L) must be a positive integer, got {text_length!r}")
    unknown = sorted(set(text_options) - set(TEXT_OPTIONS))
    if unknown:
        raise UnifyError(f"unknown text option(s) {unknown}; allowed: {', '.join(TEXT_OPTIONS)} "
                         "(video settings come from the video model)")
    data = {**to_dict(video_config), "vocab_size": vocab_size, "text_length": text_length,
            "mask_token": mask_token, **text_options}
    try:
        return from_dict(TransformerConfig, data)
    except ConfigError as err:
        raise UnifyError(str(err)) from None


@torch.no_grad()
def unify_video_model(video_model: UniViGUTransformer, vocab_size: int, text_length: int,
                      mask_token: bool = True, init: str = "copy", seed: int = 0,
                      **text_options) -> UniViGUTransformer:
    """Return a unified model whose video weights equal `video_model`'s and whose text stream is new.

    Args:
        video_model: a video-only `UniViGUTransformer` (vocab_size 0), e.g. from the Wan loaders.
        vocab_size: V, the text-stream vocabulary (the head predicts V logits).
        text_length: the text canvas length L.
        mask_token: add the mask id V to the embedding (mask source) or not (uniform source).
        init: "copy" (text parts copied from their video counterparts) or "fresh" (random).
        seed: seeds the random parts (token embedding, and the text parts under "fresh").
        **text_options: any of `TEXT_OPTIONS` (text FFN width, text RoPE style/theta, text head
            norm eps, attention policy, the video-to-text attention bias).

    The video model is left untouched; the result lives on its device and dtype.
    """
    if not isinstance(video_model, UniViGUTransformer):
        raise UnifyError(f"video_model must be a UniViGUTransformer, got {type(video_model).__name__}")
    if video_model.has_text_stream:
        raise UnifyError("video_model already has a text stream (vocab_size="
                         f"{video_model.config.vocab_size}); unify a video-only model")
    if init not in ("copy", "fresh"):
        raise UnifyError(f"init must be 'copy' or 'fresh', got {init!r}")
    config = unified_config(video_model.config, vocab_size, text_length, mask_token, **text_options)
    if init == "copy" and (config.text_ffn_dim or config.ffn_dim) != config.ffn_dim:
        raise UnifyError(f"init='copy' needs text_ffn_dim == ffn_dim ({config.ffn_dim}), got "
                         f"{config.text_ffn_dim}; use init='fresh' for a different width")

    # Build on the CPU in fp32 under a private RNG, so the same seed gives the same model whatever
    # the global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UniViGUTransformer(config)
        generator = torch.Generator().manual_seed(seed + 1)
        nn.init.normal_(model.text_stream.token_embedding.weight, std=0.02, generator=generator)
        if config.text_position_embedding:
            nn.init.normal_(model.text_stream.position_embedding, std=0.02, generator=generator)

    video_state = video_model.state_dict()
    missing, unexpected = model.load_state_dict(video_state, strict=False)
    if unexpected or any(model.parameter_group(name) != "text" for name in missing):
        raise UnifyError(f"video model does not fit the unified layout: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")

    if config.text_query_projection:  # under either init: the text queries start as the video's
        for block in model.blocks:
            block.text_to_q1.load_state_dict(block.attn1.to_q.state_dict())
            block.text_to_q2.load_state_dict(block.attn2.to_q.state_dict())
    if init == "copy":
        for block in model.blocks:
            block.text_ffn.load_state_dict(block.ffn.state_dict())
        ts, ce = model.text_stream, model.condition_embedder
        ts.time_embedder.load_state_dict(ce.time_embedder.state_dict())
        ts.time_proj.load_state_dict(ce.time_proj.state_dict())
        ts.scale_shift_table.copy_(model.scale_shift_table)
    # The head starts at zero: uniform text posteriors, no disturbance of the video prior's gradients.
    nn.init.zeros_(model.text_stream.proj_out.weight)
    nn.init.zeros_(model.text_stream.proj_out.bias)

    reference = next(video_model.parameters())
    model.gradient_checkpointing = video_model.gradient_checkpointing
    return model.to(device=reference.device, dtype=reference.dtype).train(video_model.training)
