"""Tiny training configs and shared fixtures for the training tests.

One prompt-embedding cache per test session: the MiniLM prompt encoder (seconds to load) runs once,
every later trainer reads the cached embeddings.
"""

from __future__ import annotations

import pytest

from univigu.config import load_config

TINY = [
    "world.width=16", "world.height=16", "world.frames=5",
    "model.num_attention_heads=2", "model.attention_head_dim=16", "model.num_layers=2", "model.ffn_dim=64",
    "model.text_length=24", "codec.spatial_factor=4", "prompt_encoder.condition_length=16",
    "train.num_train_videos=32", "train.batch_size=8", "train.steps=4", "train.warmup_steps=1",
    "train.log_every=1", "train.save_every=0", "train.eval_samples=8", "train.oracle_eval=false",
    "train.tensorboard=false", "sampler.video_steps=3", "sampler.text_steps=3",
    # fp32 everywhere: the comparisons below are exact, and on AVX-512 CPUs the trainer would
    # otherwise autocast to bf16.
    "train.bf16=false",
]
TEXT_MIXTURE = ["train.mixture.t2v=0.4", "train.mixture.v2t=0.4", "train.mixture.joint=0.2",
                "train.mixture.video_dropout=0.25"]


def tiny_overrides(output_dir, cache_dir, *overrides, stage="generator", init_from=None) -> list[str]:
    """`key=value` strings of a tiny run (for `load_config` or the `univigu train` command line)."""
    extra = [f"train.output_dir={output_dir}", f"train.cache_dir={cache_dir}", f"train.stage={stage}"]
    if stage != "generator":
        extra += TEXT_MIXTURE
    if init_from is not None:
        extra.append(f"train.init_from={init_from}")
    return TINY + extra + list(overrides)


def tiny_config(output_dir, cache_dir, *overrides, stage="generator", init_from=None):
    return load_config(None, tiny_overrides(output_dir, cache_dir, *overrides, stage=stage, init_from=init_from))


@pytest.fixture(scope="session")
def training_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("training-cache")


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory, training_cache):
    """A tiny generator export (4 steps): the init of the text stages."""
    from univigu.training.trainer import Trainer

    out = tmp_path_factory.mktemp("tiny-generator")
    return Trainer(tiny_config(out, training_cache), progress=False).run()
