"""Behaviour of the video backbone on its own: determinism, per-sample timesteps, gradient
checkpointing, bf16 autocast on CPU, and one clear error per kind of bad input."""

from __future__ import annotations

import pytest
import torch

from backbone_helpers import randomize_, random_inputs, tiny_config
from tolerances import assert_close_ordered, network_terms
from univigu.models.transformer import ModelInputError, UniViGUTransformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(UniViGUTransformer(tiny_config(num_layers=3)), seed=1)


def test_same_seed_same_model_and_output():
    def build():
        torch.manual_seed(123)
        return UniViGUTransformer(tiny_config())

    a, b = build(), build()
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    torch.manual_seed(124)
    c = UniViGUTransformer(tiny_config())
    assert not torch.equal(a.blocks[0].attn1.to_q.weight, c.blocks[0].attn1.to_q.weight)
    randomize_(a, 5)
    video, t, cond = random_inputs(a.config, frames=2)
    with torch.no_grad():
        first, second = a(video, None, t, None, cond)[0], a(video, None, t, None, cond)[0]
    assert torch.equal(first, second)


def test_zero_initialised_head_gives_zero_velocity():
    """Wan's init zeroes the output projection weight and bias, so a fresh model predicts 0."""
    model = UniViGUTransformer(tiny_config())
    video, t, cond = random_inputs(model.config)
    with torch.no_grad():
        velocity = model(video, None, t, None, cond)[0]
    assert torch.count_nonzero(velocity) == 0


def test_timesteps_act_per_sample(model):
    """A batch with different timesteps per sample equals each sample run alone."""
    video, _, cond = random_inputs(model.config, batch=3, frames=2)
    t = torch.tensor([0.0, 400.0, 1000.0])
    with torch.no_grad():
        batched = model(video, None, t, None, cond)[0]
        for i in range(3):
            alone = model(video[i:i + 1], None, t[i:i + 1], None, cond[i:i + 1])[0]
            assert_close_ordered(batched[i:i + 1], alone, terms=network_terms(model.config))
        other_time = model(video[:1], None, t[2:], None, cond[:1])[0]
    assert (other_time - batched[:1]).abs().max() > 1e-2  # the timestep really changes the output


def test_scalar_timestep_broadcasts(model):
    video, _, cond = random_inputs(model.config)
    with torch.no_grad():
        scalar = model(video, None, torch.tensor(250.0), None, cond)[0]
        per_sample = model(video, None, torch.full((2,), 250.0), None, cond)[0]
    assert torch.equal(scalar, per_sample)


def _grads(model, video, t, cond, checkpointing: bool):
    model.zero_grad(set_to_none=True)
    model.enable_gradient_checkpointing(checkpointing)
    calls = []
    hooks = [block.register_forward_pre_hook(lambda *_: calls.append(1)) for block in model.blocks]
    try:
        velocity = model(video, None, t, None, cond)[0]
        weights = torch.linspace(-1, 1, velocity.numel()).view_as(velocity)
        (velocity * weights).sum().backward()
    finally:
        for hook in hooks:
            hook.remove()
        model.enable_gradient_checkpointing(False)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, video.grad.clone(), len(calls)


def test_gradient_checkpointing_gives_the_same_gradients(model):
    video, t, cond = random_inputs(model.config, frames=2)
    video.requires_grad_(True)
    plain, video_grad, plain_calls = _grads(model, video, t, cond, checkpointing=False)
    video.grad = None
    ckpt, video_grad_ckpt, ckpt_calls = _grads(model, video, t, cond, checkpointing=True)
    # Checkpointing really recomputed every block during backward.
    assert plain_calls == len(model.blocks) and ckpt_calls == 2 * len(model.blocks)
    assert plain.keys() == ckpt.keys() == dict(model.named_parameters()).keys()
    for name in plain:
        assert plain[name].abs().max() > 0, f"{name} got no gradient"
        assert_close_ordered(ckpt[name], plain[name], terms=network_terms(model.config), msg=name)
    assert_close_ordered(video_grad_ckpt, video_grad, terms=network_terms(model.config))


def test_bf16_autocast_runs_on_cpu_and_stays_close(model):
    video, t, cond = random_inputs(model.config, frames=2)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)  # returns None: the output is left alone
        return hook

    hooks = [model.blocks[0].attn1.to_q.register_forward_hook(record("linear")),
             model.blocks[0].norm1.register_forward_hook(record("norm"))]
    try:
        with torch.no_grad():
            reference = model(video, None, t, None, cond)[0]
            seen.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = model(video, None, t, None, cond)[0]
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {"linear": torch.bfloat16, "norm": torch.float32}  # bf16 matmuls, fp32 norms
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert_close_ordered(low, reference, terms=network_terms(model.config), dtype=torch.bfloat16)
    assert not torch.equal(low, reference)  # it really ran in lower precision


# ------------------------------------------------------------------ bad input: one clear error each
def _call(model, video=None, t=None, cond=None):
    base_video, base_t, base_cond = random_inputs(model.config)
    model(base_video if video is None else video, None, base_t if t is None else t, None,
          base_cond if cond is None else cond)


@pytest.mark.parametrize("make_video, words", [
    (lambda c: torch.randn(2, c.in_channels + 1, 1, 4, 6), ["channels", "expects 4"]),
    (lambda c: torch.randn(2, c.in_channels, 1, 5, 6), ["divisible", "patch"]),
    (lambda c: torch.randn(2, c.in_channels, 1, 4, 7), ["divisible", "patch"]),
    (lambda c: torch.randn(2, c.in_channels, 4, 6), ["[B, C, F, H, W]"]),
])
def test_bad_video_latents(model, make_video, words):
    with pytest.raises(ModelInputError) as err:
        _call(model, video=make_video(model.config))
    for word in words:
        assert word in str(err.value)


def test_mismatched_batch_sizes(model):
    video, t, cond = random_inputs(model.config, batch=2)
    with pytest.raises(ModelInputError, match=r"condition must be \[2, Lc, 16\], got \[3, 5, 16\]"):
        model(video, None, t, None, torch.randn(3, 5, 16))
    with pytest.raises(ModelInputError, match=r"video_timestep must have shape \[2\]"):
        model(video, None, torch.tensor([1.0, 2.0, 3.0]), None, cond)


@pytest.mark.parametrize("bad", [-1.0, 1000.5, float("nan"), float("inf")])
def test_timestep_out_of_range(model, bad):
    with pytest.raises(ModelInputError, match=r"video_timestep must lie in \[0, 1000\]"):
        _call(model, t=torch.tensor([10.0, bad]))


def test_wrong_condition_width_and_missing_inputs(model):
    video, t, cond = random_inputs(model.config)
    with pytest.raises(ModelInputError, match="condition must be"):
        model(video, None, t, None, torch.randn(2, 5, 7))
    with pytest.raises(ModelInputError, match="condition"):
        model(video, None, t, None, None)
    with pytest.raises(ModelInputError, match="video_timestep is required"):
        model(video, None, None, None, cond)
    with pytest.raises(ModelInputError, match="no text stream"):
        model(video, torch.zeros(2, 3, dtype=torch.long), t, t, cond)
    assert issubclass(ModelInputError, ValueError)


# ------------------------------------------------------------------ precision policy and RoPE paths
def test_norms_stay_fp32_under_autocast():
    """The fp32 norms give bit-identical results with and without bf16 autocast."""
    from univigu.models.layers import FP32LayerNorm, FP32RMSNorm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 24, generator=gen).to(torch.bfloat16)
    for norm in (FP32LayerNorm(24, eps=1e-6, elementwise_affine=True), FP32RMSNorm(24, eps=1e-6)):
        randomize_(norm, 1)
        plain = norm(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = norm(x)
        assert auto.dtype == plain.dtype and torch.equal(auto, plain)
    reference = torch.nn.functional.layer_norm(x.float(), (24,), eps=1e-6)
    assert torch.equal(FP32LayerNorm(24, eps=1e-6, elementwise_affine=False)(x), reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_interleaved_rope_equals_the_general_rotation(dtype, monkeypatch):
    """pairing=None (complex multiply in eager, real form under torch.compile) rotates exactly like
    the general per-token path with every token interleaved, and like the rotation formula."""
    from univigu.models import layers

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3 * 2 * 5, 2, 16, generator=gen).to(dtype)
    cos, sin = layers.video_rope((3, 2, 5), 16)
    general = layers.apply_rope(x, cos, sin, torch.zeros(x.shape[1]))
    fast = layers.apply_rope(x, cos, sin, None)
    # Independent formula: pair (x0, x1) -> (x0 c - x1 s, x0 s + x1 c).
    x0, x1 = x.float()[..., 0::2], x.float()[..., 1::2]
    c, s = cos[None, :, None, 0::2], sin[None, :, None, 0::2]
    expected = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).to(dtype)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiled_form = layers.apply_rope(x, cos, sin, None)
    for out in (fast, general, compiled_form):
        assert out.dtype == dtype
        assert_close_ordered(out, expected, terms=2)  # x0 c - x1 s: two terms


def test_cached_rope_tables_survive_inference_mode(model):
    """Tables first built under inference_mode must still serve a later training step."""
    from univigu.models import layers

    layers._video_rope_tables.cache_clear()
    video, t, cond = random_inputs(model.config, frames=3)
    with torch.inference_mode():
        model(video, None, t, None, cond)
    cos, _ = layers.video_rope((3, 2, 3), model.config.attention_head_dim)
    assert not cos.is_inference()
    model.zero_grad(set_to_none=True)
    model(video, None, t, None, cond)[0].square().mean().backward()
    assert model.patch_embedding.weight.grad is not None
    model.zero_grad(set_to_none=True)
