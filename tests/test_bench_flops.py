"""The benchmarks' analytic FLOP counts against torch's FlopCounterMode on real models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from common import (  # noqa: E402
    cache_speedup_bound,
    forward_flops,
    per_token_flops,
    prefill_flops,
    step_text_flops,
    training_step_flops,
)

from univigu.config import TransformerConfig  # noqa: E402
from univigu.flow.paths import MixtureTextPath  # noqa: E402
from univigu.flow.samplers import TextSamplerOptions, sample_text  # noqa: E402
from univigu.models.transformer import UniViGUTransformer  # noqa: E402

aten = torch.ops.aten


def _model_head(*shapes):
    """The shapes at the model's head size: the few dimensions attention.py appends to carry the
    attention policy as a logit offset are not model FLOPs (no more than a recomputation is)."""
    return [tuple(shape[:-1]) + (CONFIG.attention_head_dim,) for shape in shapes]


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(*_model_head(query, key, value))


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return 2 * sdpa_flop_count(*_model_head(query, key, value))  # model FLOPs: no recomputation of the scores


# torch's counter has no formula for the CPU flash-attention kernels; give it the standard ones.
MAPPING = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
           aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward}

CONFIG = TransformerConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                           text_dim=24, freq_dim=16, ffn_dim=48, text_ffn_dim=40, num_layers=2,
                           vocab_size=50, text_length=8, attention_policy="clean_isolated")
B, LC, L = 2, 5, 8
N = 2 * 2 * 3  # latent frames 2, 4x6 pixels, patch 1x2x2


def counted(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=MAPPING) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UniViGUTransformer(CONFIG).eval()


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(1)
    video = torch.randn(B, 4, 2, 4, 6, generator=gen)
    text = torch.randint(0, 50, (B, L), generator=gen)
    condition = torch.randn(B, LC, 24, generator=gen)
    return video, text, condition


@pytest.mark.parametrize("video_t", [0.0, 500.0])  # clean video (isolation mask) and noisy
def test_forward_flops_match_counter(model, inputs, video_t):
    video, text, condition = inputs
    with torch.no_grad():
        got = counted(lambda: model(video, text, torch.full((B,), video_t), torch.full((B,), 300.0), condition))
        video_only = counted(lambda: model(video, None, torch.full((B,), 300.0), None, condition))
    assert got == forward_flops(CONFIG, B, N, L, LC)
    assert video_only == forward_flops(CONFIG, B, N, 0, LC)


def test_cached_protocol_flops_match_counter(model, inputs):
    video, text, condition = inputs
    with torch.no_grad():
        cache = model.prefill(clean="video", video=video, condition=condition)
        assert counted(lambda: model.prefill(clean="video", video=video, condition=condition)) == \
            prefill_flops(CONFIG, B, N, LC)
        assert counted(lambda: model.step_text(text, torch.full((B,), 300.0), cache)) == \
            step_text_flops(CONFIG, B, L, N, LC)


@pytest.mark.parametrize("use_cache", [True, False])
def test_sampler_flops_are_prefill_plus_steps_or_joint_forwards(model, inputs, use_cache):
    video, _, condition = inputs
    path = MixtureTextPath(vocab_size=50, source="mask", special_ids=(0, 1, 2))
    steps = 3
    options = TextSamplerOptions(steps=steps, sampler="confidence", use_cache=use_cache)
    with torch.no_grad():
        got = counted(lambda: sample_text(model, video, condition, path, L, eos_id=2, options=options, seeds=[0, 1]))
    if use_cache:
        expected = prefill_flops(CONFIG, B, N, LC) + steps * step_text_flops(CONFIG, B, L, N, LC)
    else:
        expected = steps * forward_flops(CONFIG, B, N, L, LC)
    assert got == expected


def test_training_step_flops_match_counter_ours(inputs):
    video, text, condition = inputs
    torch.manual_seed(0)
    model = UniViGUTransformer(CONFIG).train()

    def joint_step():
        velocity, logits = model(video, text, torch.full((B,), 500.0), torch.full((B,), 300.0), condition)
        (velocity.square().mean() + logits.square().mean()).backward()

    def video_step():
        model(video, None, torch.full((B,), 500.0), None, condition)[0].square().mean().backward()

    assert counted(joint_step) == training_step_flops(CONFIG, B, N, L, LC)
    assert counted(video_step) == training_step_flops(CONFIG, B, N, 0, LC)


def test_training_step_flops_match_counter_diffusers(inputs):
    diffusers = pytest.importorskip("diffusers")
    from univigu.models.convert import config_to_diffusers

    video_config = TransformerConfig(**{**CONFIG.__dict__, "vocab_size": 0, "text_ffn_dim": None})
    fields = {k: v for k, v in config_to_diffusers(video_config).items() if not k.startswith("_")}
    torch.manual_seed(0)
    reference = diffusers.WanTransformer3DModel(**fields)
    video, _, condition = inputs

    def step():
        out = reference(hidden_states=video, timestep=torch.full((B,), 500.0), encoder_hidden_states=condition,
                        return_dict=False)[0]
        out.square().mean().backward()

    assert counted(step) == training_step_flops(video_config, B, N, 0, LC)


def test_text_token_pays_for_the_vocabulary_head():
    big_vocab = TransformerConfig(**{**CONFIG.__dict__, "vocab_size": 1050})
    extra = per_token_flops(big_vocab, "text", 20, LC) - per_token_flops(CONFIG, "text", 20, LC)
    assert extra == 2 * CONFIG.inner_dim * 1000
    # attention work grows by 4 D per extra key
    assert per_token_flops(CONFIG, "video", 21, LC) - per_token_flops(CONFIG, "video", 20, LC) == \
        4 * CONFIG.inner_dim * CONFIG.num_layers


def test_bound_limits():
    # One step: nothing to save. Text-free video: the cache saves every step but the first.
    assert cache_speedup_bound(1, 100, 10, 3.0, 5.0) == pytest.approx(1.0)
    assert cache_speedup_bound(16, 10**9, 1, 1.0, 1.0) == pytest.approx(16.0, rel=1e-6)
    # Equal per-token cost: S (N + L) / (N + S L).
    assert cache_speedup_bound(4, 30, 10, 2.0, 2.0) == pytest.approx(4 * 40 / (30 + 40))


def test_gpu_step_dry_run_runs_on_cpu():
    import gpu_step

    result = gpu_step.main(["--dry-run", "--steps", "1", "--warmup", "1"])
    model = result["model"]
    assert result["training_step_flops"] == training_step_flops(
        TransformerConfig(**gpu_step.MODEL_DRY), 1, model["video_tokens"], model["text_tokens"],
        model["condition_length"])
    assert result["step_s"] > 0 and result["mfu"] is None  # no known peak for a CPU


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA GeForce RTX 4090", None)])
def test_gpu_peak_by_name(name, peak):
    import gpu_step

    assert gpu_step.peak_bf16(name) == peak
