"""Shared helpers for the video-backbone tests: tiny configs, random weights, random inputs."""

from __future__ import annotations

import torch

from univigu.config import TransformerConfig


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give *every* parameter random non-zero values, including those zero at init (output
    projection, biases) and the norm weights (ones at init), so no part can hide in a comparison."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            fan_in = param[0].numel() if param.ndim >= 2 else param.numel()
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.ndim >= 2 and "scale_shift_table" not in name:
                param.copy_(noise * fan_in ** -0.5)
            elif name.endswith(".weight") and "norm" in name:
                param.copy_(1.0 + 0.3 * noise)  # norms stay positive-ish but far from 1
            else:
                param.copy_(0.3 * noise)
    return module


def tiny_config(**overrides) -> TransformerConfig:
    """A video-only backbone small enough for a CPU test."""
    fields = dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
                  freq_dim=32, ffn_dim=32, num_layers=2, patch_size=(1, 2, 2), rope_max_seq_len=64)
    fields.update(overrides)
    return TransformerConfig(**fields)


def random_inputs(config: TransformerConfig, batch: int = 2, frames: int = 1, height: int = 4, width: int = 6,
                  condition_length: int = 5, seed: int = 0):
    """(video latents, per-sample different timesteps, condition) for `config`."""
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, config.in_channels, frames, height, width, generator=gen)
    timestep = torch.linspace(13.25, 987.5, batch)  # every sample its own noise level
    condition = torch.randn(batch, condition_length, config.text_dim, generator=gen)
    return video, timestep, condition
