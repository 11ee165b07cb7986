"""A tiny unified model directory for the pipeline and CLI tests.

MiniLM (the real prompt encoder, shipped offline by a PyPI package) takes seconds to load on a busy
2-core machine, so it is loaded once per test session and shared through the pipeline's prompt
encoder cache.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from backbone_helpers import randomize_

from univigu.config import FlowConfig, PromptEncoderConfig, SamplerConfig, TransformerConfig, WorldConfig
from univigu.data.shapesworld import make_samples
from univigu.models.bundle import save_bundle
from univigu.models.text import TextTokenizer
from univigu.models.transformer import UniViGUTransformer
from univigu.models.vae import PixelShuffleCodec
from univigu.pipeline import shared_prompt_encoder

WORLD = WorldConfig(width=16, height=16, frames=5, fps=8)
ENCODER_CONFIG = PromptEncoderConfig(kind="minilm", condition_length=16)
TEXT_LENGTH = 12
# Few steps keep every test fast; guidance on, so the unconditional branches run too.
SAMPLER = SamplerConfig(video_steps=3, video_solver="dpmpp2m", shift=3.0, guidance_scale=2.0, text_steps=4,
                        text_sampler="confidence", text_guidance_scale=1.0, temperature=1.0)


@functools.lru_cache(maxsize=None)
def prompt_encoder():
    """The MiniLM encoder of the tiny model, loaded once per session (kept alive here, so every
    pipeline built in the test run reuses it through `shared_prompt_encoder`)."""
    return shared_prompt_encoder(ENCODER_CONFIG, "cpu")


def corpus(num: int = 24) -> list[str]:
    samples = make_samples(num, seed=0, world=WORLD)
    return [s.prompt for s in samples] + [s.caption for s in samples]


def tiny_model_dir(directory: Path, seed: int = 0, codec: PixelShuffleCodec | None = None,
                   world: WorldConfig = WORLD, attention_policy: str = "clean_isolated") -> Path:
    """Write a tiny unified model directory: 2 layers of 2 heads x 16, a text stream over a word
    vocabulary of ShapesWorld prompts/captions, pixel-shuffle codec (spatial factor 4, 48 channels).
    Every weight is random and non-zero (no zero-initialised head hides a wiring mistake)."""
    tokenizer = TextTokenizer.train_from_corpus(corpus())
    config = TransformerConfig(num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=48,
                               text_dim=384, freq_dim=32, ffn_dim=64, num_layers=2, patch_size=(1, 2, 2),
                               vocab_size=tokenizer.vocab_size, text_length=TEXT_LENGTH,
                               attention_policy=attention_policy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = randomize_(UniViGUTransformer(config), seed).eval()
    null = prompt_encoder().null_condition()[0]
    return save_bundle(directory, model, codec or PixelShuffleCodec(4, 1), ENCODER_CONFIG, null, tokenizer,
                       world, SAMPLER, FlowConfig())
