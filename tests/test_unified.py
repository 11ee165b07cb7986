"""The unified transformer: conversion from a video model, clean_isolated independence, the cached
sampling protocol, parameter groups, determinism, gradient checkpointing and input errors."""

import pytest
import torch

from univigu.config import TransformerConfig
from univigu.models.transformer import ModelInputError, UniViGUTransformer
from univigu.models.unify import UnifyError, unify_video_model

from tolerances import assert_close_ordered, network_terms

VIDEO = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=8,
             freq_dim=32, ffn_dim=24, num_layers=2)
V, L = 20, 6


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter random values, so zero-initialised heads hide nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def backbone(seed: int = 0, **overrides) -> UniViGUTransformer:
    torch.manual_seed(seed)
    return randomize(UniViGUTransformer(TransformerConfig(**{**VIDEO, **overrides})), seed)


def unified(seed: int = 0, policy: str = "clean_isolated", num_layers: int = 2) -> UniViGUTransformer:
    model = unify_video_model(backbone(seed, num_layers=num_layers), V, L, attention_policy=policy)
    return randomize(model, seed + 100)


def inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, 4, 2, 4, 4, generator=g)
    text = torch.randint(0, V, (batch, L), generator=g)
    condition = torch.randn(batch, 5, 8, generator=g)
    return video, text, condition


def assert_cached_equals_uncached(model, video, text, condition, t_video, t_text):
    """Both caches (clean video for text steps, clean text for video steps) match the forward."""
    batch = video.shape[0]
    with torch.no_grad():
        cache = model.prefill("video", video=video, condition=condition)
        torch.testing.assert_close(model.step_text(text, t_text, cache),
                                   model(video, text, torch.zeros(batch), t_text, condition)[1], rtol=1e-5, atol=1e-5)
        cache = model.prefill("text", text=text, condition=condition)
        torch.testing.assert_close(model.step_video(video, t_video, cache),
                                   model(video, text, t_video, torch.zeros(batch), condition)[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("init", ["copy", "fresh"])
def test_text_length_zero_reproduces_the_backbone_exactly(init):
    video_model = backbone()
    model = unify_video_model(video_model, V, L, init=init)
    video, text, condition = inputs()
    t = torch.tensor([0.0, 640.0])
    expected, none = video_model(video, None, t, None, condition)
    assert none is None
    velocity, logits = model(video, text[:, :0], t, t, condition)
    assert logits is None
    assert torch.equal(velocity, expected)
    assert torch.equal(model(video, None, t, None, condition)[0], expected)


def test_copy_init_copies_video_counterparts_and_zeroes_the_head():
    video_model = backbone()
    model = unify_video_model(video_model, V, L, init="copy")
    for block in model.blocks:
        for (name, text_p), (_, video_p) in zip(block.text_ffn.named_parameters(), block.ffn.named_parameters()):
            assert torch.equal(text_p, video_p), name
            assert text_p.data_ptr() != video_p.data_ptr()  # a copy, not a tie
    ts, ce = model.text_stream, model.condition_embedder
    for a, b in [(ts.time_embedder, ce.time_embedder), (ts.time_proj, ce.time_proj)]:
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
    assert torch.equal(ts.scale_shift_table, video_model.scale_shift_table)
    assert not ts.proj_out.weight.any() and not ts.proj_out.bias.any()
    emb = ts.token_embedding.weight
    assert emb.shape == (V + 1, 32)  # mask id V appended
    assert abs(emb.std().item() - 0.02) < 0.004 and abs(emb.mean().item()) < 0.004
    # every video weight is the backbone's, in separate storage
    for name, p in video_model.named_parameters():
        q = model.get_parameter(name)
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    # a zero head gives all-zero logits over exactly V ids
    video, text, condition = inputs()
    _, logits = model(video, text, torch.zeros(2), torch.full((2,), 500.0), condition)
    assert logits.shape == (2, L, V) and not logits.any()


def test_fresh_init_and_options():
    video_model = backbone()
    fresh = unify_video_model(video_model, V, L, mask_token=False, init="fresh", text_ffn_dim=40,
                              text_rope="rotate_half", attention_policy="full")
    assert fresh.text_stream.token_embedding.weight.shape == (V, 32)
    assert fresh.blocks[0].text_ffn.net[0].proj.weight.shape == (40, 32)
    assert not torch.equal(fresh.text_stream.time_proj.weight, fresh.condition_embedder.time_proj.weight)
    assert not fresh.text_stream.proj_out.weight.any()
    assert (fresh.config.text_rope, fresh.config.attention_policy) == ("rotate_half", "full")


def test_unify_rejects_bad_arguments():
    video_model = backbone()
    with pytest.raises(UnifyError, match="already has a text stream"):
        unify_video_model(unify_video_model(video_model, V, L), V, L)
    with pytest.raises(UnifyError, match="init must be"):
        unify_video_model(video_model, V, L, init="zeros")
    with pytest.raises(UnifyError, match="vocab_size"):
        unify_video_model(video_model, 0, L)
    with pytest.raises(UnifyError, match="unknown text option"):
        unify_video_model(video_model, V, L, num_layers=3)
    with pytest.raises(UnifyError, match="text_ffn_dim == ffn_dim"):
        unify_video_model(video_model, V, L, text_ffn_dim=40)
    with pytest.raises(UnifyError, match="text_rope"):
        unify_video_model(video_model, V, L, text_rope="spiral")


# --------------------------------------------------------------------------------- attention policy
def _video_states(model, video, text, t_video, t_text, condition):
    states = []
    hooks = [b.register_forward_hook(lambda m, args, out: states.append(out[0][0].detach().clone()))
             for b in model.blocks]
    try:
        model(video, text, t_video, t_text, condition)
    finally:
        for h in hooks:
            h.remove()
    return states


def test_clean_video_states_do_not_depend_on_text_under_clean_isolated():
    video, text, condition = inputs()
    other_text = (text + 7) % V
    t_video = torch.tensor([0.0, 500.0])  # sample 0 clean, sample 1 noisy
    model = unified(policy="clean_isolated")
    a = _video_states(model, video, text, t_video, torch.tensor([300.0, 300.0]), condition)
    b = _video_states(model, video, other_text, t_video, torch.tensor([900.0, 900.0]), condition)
    assert len(a) == 2
    for sa, sb in zip(a, b):
        torch.testing.assert_close(sa[0], sb[0], rtol=0, atol=1e-6)  # clean sample: independent
        assert (sa[1] - sb[1]).abs().max() > 1e-3  # noisy sample still reads the text
    # under `full` the clean video does read the text
    full = unified(policy="full")
    a = _video_states(full, video, text, t_video, torch.tensor([300.0, 300.0]), condition)
    b = _video_states(full, video, other_text, t_video, torch.tensor([900.0, 900.0]), condition)
    assert (a[-1][0] - b[-1][0]).abs().max() > 1e-3


def test_cached_text_logits_equal_uncached_at_several_noise_levels():
    model = unified()
    assert model.supports_cache("video") and not unified(policy="full").supports_cache("video")
    video, text, condition = inputs(batch=5)
    t_text = torch.tensor([0.0, 1.0, 250.0, 999.0, 1000.0])
    with torch.no_grad():
        cache = model.prefill("video", video=video, condition=condition)
        for shift in (0.0, 0.5):  # several steps against one cache
            t = (t_text * (1 - shift)).clamp(0, 1000)
            cached = model.step_text(text, t, cache)
            uncached = model(video, text, torch.zeros(5), t, condition)[1]
            torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)


def test_cached_video_velocity_equals_uncached_with_clean_text():
    model = unified()
    video, text, condition = inputs(batch=3)
    t_video = torch.tensor([0.0, 400.0, 1000.0])
    with torch.no_grad():
        cache = model.prefill("text", text=text, condition=condition)
        cached = model.step_video(video, t_video, cache)
        uncached = model(video, text, t_video, torch.zeros(3), condition)[0]
    torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)


def test_text_key_bias_hides_new_text_from_the_video_and_zero_bias_changes_nothing():
    video_model = backbone()
    video, text, condition = inputs()
    t_video, t_text = torch.tensor([300.0, 900.0]), torch.tensor([500.0, 0.0])
    expected = video_model(video, None, t_video, None, condition)[0]
    hidden = unify_video_model(video_model, V, L, text_key_bias=-1e4)  # exp(-1e4) is 0 in fp32
    assert all(torch.equal(b.text_key_bias, torch.full((2,), -1e4)) for b in hidden.blocks)
    torch.testing.assert_close(hidden(video, text, t_video, t_text, condition)[0], expected, rtol=1e-5, atol=1e-5)
    without = unified()
    with_zero = unify_video_model(backbone(), V, L, text_key_bias=0.0)
    with_zero.load_state_dict(without.state_dict(), strict=False)  # same weights, bias parameters at 0
    args = (video, text, t_video, t_text, condition)
    for a, b in zip(with_zero(*args), without(*args)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    unbiased = unify_video_model(backbone(), V, L)
    assert not any(n.endswith("text_key_bias") for n, _ in unbiased.named_parameters())


def test_text_key_bias_is_a_trained_text_parameter_and_cached_equals_uncached():
    model = randomize(unify_video_model(backbone(), V, L, text_key_bias=-2.0), 7)  # random bias per head
    assert all(model.parameter_group(f"blocks.{i}.text_key_bias") == "text" for i in range(2))
    video, text, condition = inputs(batch=3)
    t_video = torch.tensor([0.0, 400.0, 1000.0])
    velocity, logits = model(video, text, t_video, torch.tensor([0.0, 200.0, 1000.0]), condition)
    (velocity.square().mean() + logits.square().mean()).backward()
    assert all(b.text_key_bias.grad is not None and b.text_key_bias.grad.abs().sum() > 0 for b in model.blocks)
    assert_cached_equals_uncached(model, video, text, condition, t_video, torch.tensor([1.0, 500.0, 1000.0]))


def test_text_query_projection_starts_as_the_shared_one_and_only_moves_text_queries():
    video, text, condition = inputs(batch=3)
    t_video, t_text = torch.tensor([0.0, 400.0, 1000.0]), torch.tensor([0.0, 200.0, 1000.0])
    shared = randomize(unify_video_model(backbone(), V, L), 5)
    own = unify_video_model(backbone(), V, L, text_query_projection=True)
    missing, unexpected = own.load_state_dict(shared.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == sorted(
        f"blocks.{i}.text_to_q{n}.{w}" for i in range(2) for n in (1, 2) for w in ("weight", "bias"))
    assert all(own.parameter_group(name) == "text" for name in missing)
    with torch.no_grad():  # copies of the shared query layers: the same model
        for block in own.blocks:
            block.text_to_q1.load_state_dict(block.attn1.to_q.state_dict())
            block.text_to_q2.load_state_dict(block.attn2.to_q.state_dict())
    args = (video, text, t_video, t_text, condition)
    for a, b in zip(own(*args), shared(*args)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    fresh = unify_video_model(backbone(), V, L, text_query_projection=True)  # unify copies them too
    assert all(torch.equal(b.text_to_q1.weight, b.attn1.to_q.weight) and
               torch.equal(b.text_to_q2.bias, b.attn2.to_q.bias) for b in fresh.blocks)

    randomize(own, 9)  # now the text queries differ from the video's
    velocity, logits = own(*args)
    shared.load_state_dict({k: v for k, v in own.state_dict().items() if ".text_to_q" not in k})
    # Video queries are the shared ones: a clean video (isolated from the text) or a video without
    # text is untouched; the text reads differently.
    torch.testing.assert_close(velocity[0], shared(*args)[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(own(video, None, t_video, None, condition)[0],
                               shared(video, None, t_video, None, condition)[0], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(logits, shared(*args)[1])
    (velocity.square().mean() + logits.square().mean()).backward()
    assert all(b.text_to_q1.weight.grad.abs().sum() > 0 and b.text_to_q2.weight.grad.abs().sum() > 0
               for b in own.blocks)
    assert_cached_equals_uncached(own, video, text, condition, t_video, t_text)


def test_one_cache_serves_steps_of_several_text_lengths_and_modes():
    # The cache writes each step's keys/values into buffers after the cached ones: a step of any
    # length, shorter or longer than the last, and in any grad mode must still see exactly
    # [cached; own] keys.
    model = unified()
    video, text, condition = inputs(batch=2)
    t = torch.tensor([0.0, 600.0])
    with torch.inference_mode():
        cache = model.prefill("video", video=video, condition=condition)
        for n in (2, L, 4):  # the buffers grow once, then serve shorter steps
            cached = model.step_text(text[:, :n], t, cache)
            uncached = model(video, text[:, :n], torch.zeros(2), t, condition)[1]
            torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)
        assert len(cache.buffers) == 2 and cache.buffers[0][0].shape[1] == cache.num_tokens + L
    with torch.no_grad():  # an inference-mode cache outside inference mode: not written
        torch.testing.assert_close(model.step_text(text, t, cache),
                                   model(video, text, torch.zeros(2), t, condition)[1], rtol=1e-5, atol=1e-5)
    grad_cache = model.prefill("video", video=video, condition=condition)  # autograd: concatenated
    logits = model.step_text(text, t, grad_cache)
    logits.square().sum().backward()
    assert model.blocks[0].attn1.to_k.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(logits, model(video, text, torch.zeros(2), t, condition)[1],
                                   rtol=1e-5, atol=1e-5)


def test_text_rope_tables_are_cached_per_length_style_and_device():
    from univigu.models.layers import text_rope

    with torch.inference_mode():
        first = text_rope(5, 16)
    assert not first[0].is_inference()  # usable by training later
    assert text_rope(5, 16)[0] is first[0]
    for length in (3, 7):
        cos, sin = text_rope(length, 16)
        angles = torch.arange(length, dtype=torch.float64)[:, None] * 10000.0 ** (
            -torch.arange(0, 16, 2, dtype=torch.float64) / 16)
        torch.testing.assert_close(cos, angles.repeat_interleave(2, dim=-1).cos().float())
        torch.testing.assert_close(sin, angles.repeat_interleave(2, dim=-1).sin().float())
    half = text_rope(5, 16, style="rotate_half")[0]
    assert not torch.equal(half, first[0]) and torch.equal(half[:, :8], half[:, 8:])
    assert text_rope(5, 16, device="meta")[0].device.type == "meta"
    assert text_rope(5, 16, style="none") is None
    with pytest.raises(ValueError, match="spiral"):
        text_rope(5, 16, style="spiral")


def test_sample_prediction_is_the_velocity_of_the_predicted_clean_video():
    # Same weights: the velocity head's raw output is the clean-sample estimate x0_hat, and the
    # sample-prediction model must return (x_t - x0_hat) / max(t, min_t).
    velocity_model = backbone(3)
    sample_model = backbone(3, video_prediction="sample", sample_prediction_min_t=0.1)
    video, _, condition = inputs(batch=3)
    t = torch.tensor([0.0, 500.0, 1000.0])
    with torch.no_grad():
        x0_hat = velocity_model(video, None, t, None, condition)[0]
        velocity = sample_model(video, None, t, None, condition)[0]
    expected = (video - x0_hat) / torch.tensor([0.1, 0.5, 1.0]).view(3, 1, 1, 1, 1)
    torch.testing.assert_close(velocity, expected, rtol=1e-5, atol=1e-5)


def test_sample_prediction_cached_equals_uncached():
    model = unify_video_model(backbone(4, video_prediction="sample"), V, L)
    randomize(model, 5)
    video, text, condition = inputs(batch=2)
    t_video = torch.tensor([30.0, 700.0])
    with torch.no_grad():
        cached = model.step_video(video, t_video, model.prefill("text", text=text, condition=condition))
        uncached = model(video, text, t_video, torch.zeros(2), condition)[0]
    # At t = 0.03 the velocity is the head's output over t: values and rounding both ~30x larger.
    assert_close_ordered(cached, uncached, terms=network_terms(model.config))


def test_text_alone_forward_equals_clean_text_in_a_joint_forward():
    # Under clean_isolated a clean text does not attend to the video, so its logits must be those
    # of the text-alone forward (the text-guidance branch).
    model = unified()
    video, text, condition = inputs()
    none, alone = model(None, text, None, torch.zeros(2), condition)
    assert none is None and alone.shape == (2, L, V)
    joint = model(video, text, torch.tensor([200.0, 1000.0]), torch.zeros(2), condition)[1]
    torch.testing.assert_close(alone, joint, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- parameter groups
def expected_groups(num_layers: int) -> dict[str, set[str]]:
    """The groups spelled out by hand (DESIGN: video prior / new text parts / shared attention)."""
    wb = (".weight", ".bias")
    video = {f"patch_embedding{s}" for s in wb} | {"scale_shift_table"} | {f"proj_out{s}" for s in wb}
    video |= {f"condition_embedder.{m}{s}" for m in ("time_embedder.linear_1", "time_embedder.linear_2",
                                                      "time_proj") for s in wb}
    text = {"text_stream.token_embedding.weight", "text_stream.position_embedding", "text_stream.scale_shift_table",
            "text_stream.norm_out.weight"}
    text |= {f"text_stream.{m}{s}" for m in ("time_embedder.linear_1", "time_embedder.linear_2", "time_proj",
                                             "proj_out") for s in wb}
    shared = {f"condition_embedder.text_embedder.linear_{i}{s}" for i in (1, 2) for s in wb}
    for n in range(num_layers):
        video |= {f"blocks.{n}.ffn.net.{i}{s}" for i in ("0.proj", "2") for s in wb}
        text |= {f"blocks.{n}.text_ffn.net.{i}{s}" for i in ("0.proj", "2") for s in wb}
        shared |= {f"blocks.{n}.scale_shift_table"} | {f"blocks.{n}.norm2{s}" for s in wb}
        for attn in ("attn1", "attn2"):
            shared |= {f"blocks.{n}.{attn}.{p}{s}" for p in ("to_q", "to_k", "to_v", "to_out.0") for s in wb}
            shared |= {f"blocks.{n}.{attn}.norm_q.weight", f"blocks.{n}.{attn}.norm_k.weight"}
    return {"video": video, "text": text, "shared": shared}


@pytest.mark.parametrize("group", ["video", "text", "shared"])
def test_freezing_by_group_freezes_exactly_that_group(group):
    model = unified(policy="full", num_layers=1)
    groups = expected_groups(1)
    names = dict(model.named_parameters())
    assert set().union(*groups.values()) == set(names) and sum(map(len, groups.values())) == len(names)
    assert all(model.parameter_group(n) == g for g, ns in groups.items() for n in ns)

    model.set_trainable({group})
    assert {n for n, p in names.items() if p.requires_grad} == groups[group]
    before = {n: p.detach().clone() for n, p in names.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    video, text, condition = inputs()
    g = torch.Generator().manual_seed(1)
    velocity, logits = model(video, text, torch.tensor([300.0, 700.0]), torch.tensor([500.0, 900.0]), condition)
    loss = ((velocity * torch.randn(velocity.shape, generator=g)).sum()
            + (logits * torch.randn(logits.shape, generator=g)).sum())
    loss.backward()
    optimizer.step()
    for n, p in names.items():
        if n in groups[group]:
            assert not torch.equal(p, before[n]), f"{n} should have been trained"
        else:
            assert p.grad is None and torch.equal(p, before[n]), f"{n} should be frozen"
    model.set_trainable("all")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="unknown parameter group"):
        model.set_trainable({"vision"})


# --------------------------------------------------------------------------------- determinism, checkpointing
def test_determinism():
    video_model = backbone()
    a = unify_video_model(video_model, V, L, init="fresh", seed=3)
    torch.manual_seed(12345)  # the global RNG must not matter
    b = unify_video_model(video_model, V, L, init="fresh", seed=3)
    c = unify_video_model(video_model, V, L, init="fresh", seed=4)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    key = "text_stream.token_embedding.weight"
    assert not torch.equal(sa[key], c.state_dict()[key])
    model = unified()
    video, text, condition = inputs()
    args = (video, text, torch.tensor([10.0, 900.0]), torch.tensor([700.0, 30.0]), condition)
    first, second = model(*args), model(*args)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_gradient_checkpointing_gives_the_same_gradients():
    video, text, condition = inputs()
    args = (video, text, torch.tensor([0.0, 600.0]), torch.tensor([800.0, 200.0]), condition)
    grads, calls = [], []
    for enabled in (False, True):
        model = unified()
        model.enable_gradient_checkpointing(enabled)
        block_forward = model.blocks[0].forward  # count calls (checkpoint recomputes skip hooks)
        model.blocks[0].forward = lambda *a, _f=block_forward, _e=enabled: (calls.append(_e), _f(*a))[1]
        velocity, logits = model(*args)
        (velocity.square().mean() + logits.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert calls.count(False) == 1 and calls.count(True) == 2  # recomputed in backward
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


# --------------------------------------------------------------------------------- bad input
def test_bad_input_gives_one_clear_error_each():
    model = unified()
    video, text, condition = inputs()
    t = torch.tensor([100.0, 200.0])
    too_long = torch.zeros(2, L + 1, dtype=torch.long)
    with pytest.raises(ModelInputError, match="longer than the canvas"):
        model(video, too_long, t, t, condition)
    for bad_id in (V + 1, -1):  # V itself is the mask id and is allowed
        bad = text.clone()
        bad[0, 0] = bad_id
        with pytest.raises(ModelInputError, match=r"token ids must lie in \[0, 21\)"):
            model(video, bad, t, t, condition)
    model(video, torch.full_like(text, V), t, t, condition)
    with pytest.raises(ModelInputError, match="batch"):
        model(video, torch.cat([text, text]), t, torch.cat([t, t]), condition)
    for bad_t in (1000.5, -1.0, float("nan")):
        with pytest.raises(ModelInputError, match=r"text_timestep must lie in \[0, 1000\]"):
            model(video, text, t, torch.tensor([bad_t, 0.0]), condition)
        with pytest.raises(ModelInputError, match=r"video_timestep must lie in \[0, 1000\]"):
            model(video, text, torch.tensor([0.0, bad_t]), t, condition)
    with pytest.raises(ModelInputError, match="one per sample"):
        model(video, text, torch.zeros(3), t, condition)
    with pytest.raises(ModelInputError, match="clean_isolated"):
        unified(policy="full").prefill("video", video=video, condition=condition)
    cache = model.prefill("video", video=video, condition=condition)
    with pytest.raises(ModelInputError, match="cache's batch"):
        model.step_text(text[:1], t[:1], cache)
    with pytest.raises(ModelInputError, match="clean text"):
        model.step_video(video, t, cache)
