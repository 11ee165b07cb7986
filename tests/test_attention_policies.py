"""The joint attention's policies (clean_isolated, the learned text-key bias) without dense masks:
the low-rank logit offsets give the dense-mask reference's outputs and gradients (the bias's too)
for every policy, task and cached/uncached path, and no attention call receives a score-sized mask."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from univigu.config import TransformerConfig
from univigu.models import attention as attention_module
from univigu.models import layers
from univigu.models.attention import EXCLUDED, LogitOffsets, attention
from univigu.models.transformer import UniViGUTransformer

from tolerances import assert_close_ordered, network_terms

V, L = 20, 6  # text vocabulary, text canvas


def model_for(policy: str, bias: float | None, seed: int = 0) -> UniViGUTransformer:
    config = TransformerConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                               text_dim=8, freq_dim=32, ffn_dim=24, num_layers=2, vocab_size=V, text_length=L,
                               attention_policy=policy, text_key_bias=bias, text_query_projection=True)
    torch.manual_seed(seed)
    model = UniViGUTransformer(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("text_key_bias"):  # per head and block, near the unified preset's start
                p.copy_(bias + torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def inputs(batch: int = 3, frames: int = 2, size: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, 4, frames, size, size, generator=g)
    text = torch.randint(0, V, (batch, L), generator=g)
    condition = torch.randn(batch, 5, 8, generator=g)
    return video, text, condition


# (t_video, t_text) per sample: every task, and all three in one batch.
TASKS = {
    "t2v": ([300.0, 800.0, 50.0], [0.0, 0.0, 0.0]),
    "v2t": ([0.0, 0.0, 0.0], [300.0, 800.0, 50.0]),
    "joint": ([300.0, 800.0, 50.0], [600.0, 100.0, 900.0]),
    "mixed": ([0.0, 500.0, 300.0], [500.0, 0.0, 700.0]),  # V2T, T2V and joint samples in one batch
    "both_clean": ([0.0, 0.0, 500.0], [0.0, 0.0, 0.0]),
}


def run(model, path: str, task: str):
    """(outputs, gradients of every parameter) of one path; the loss weighs every output."""
    video, text, condition = inputs()
    t_video, t_text = (torch.tensor(t) for t in TASKS[task])
    model.zero_grad(set_to_none=True)
    if path == "forward":
        velocity, logits = model(video, text, t_video, t_text, condition)
        outputs = [velocity, logits]
    elif path == "step_text":
        with torch.no_grad():  # as training's V2T path: the clean video's keys without autograd
            cache = model.prefill("video", video=video, condition=condition)
        outputs = [model.step_text(text, t_text, cache)]
    else:
        cache = model.prefill("text", text=text, condition=condition)  # with autograd: bias grads too
        outputs = [model.step_video(video, t_video, cache)]
    g = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outputs)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outputs], grads


CASES = [(policy, bias, path, task)
         for policy in ("clean_isolated", "full") for bias in (None, -2.0)
         for path in ("forward", "step_text", "step_video") for task in TASKS
         if policy == "clean_isolated" or path == "forward"]  # the cache exists under isolation only


@pytest.mark.parametrize("policy,bias,path,task", CASES)
def test_mask_free_equals_the_dense_mask_reference_in_outputs_and_gradients(policy, bias, path, task):
    model = model_for(policy, bias)
    reference = copy.deepcopy(model)
    reference.dense_attention_reference = True
    outputs, grads = run(model, path, task)
    ref_outputs, ref_grads = run(reference, path, task)
    terms = network_terms(model.config)
    for out, ref in zip(outputs, ref_outputs):
        assert_close_ordered(out, ref, terms=terms, dtype=torch.float32)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        # A bias's gradient sums per-token terms that may cancel (a key bias's exactly: softmax does
        # not see a shift shared by all keys), so its rounding follows the size of the terms, which
        # the same layer's weight gradient carries, not the size of the sum.
        layer = name.rsplit(".", 1)[0]
        scale = max(g.abs().max().item() for n, g in ref_grads.items() if n.rsplit(".", 1)[0] == layer)
        assert_close_ordered(grad, ref_grads[name], terms=terms, dtype=torch.float32, scale=scale, msg=name)
    if bias is not None and path != "step_text" and task != "v2t" and task != "both_clean":
        assert any(name.endswith("text_key_bias") and grads[name].abs().sum() > 0 for name in grads)


def test_the_patterns_dense_mask_is_the_isolation_policy_by_definition():
    # The reference itself, checked pair by pair against the policy's words: a clean modality's
    # queries see only their own modality's keys; the other queries see every key.
    model = model_for("clean_isolated", None)
    t_video, t_text = (torch.tensor(t) for t in TASKS["mixed"])
    n_video, n_text = 8, L
    layout = (("video", n_video), ("text", n_text))
    pattern = model._joint_pattern(layout, layout, t_video == 0, t_text == 0, isolate=True)
    mask = pattern.dense_mask(None, torch.float32, torch.device("cpu"))
    kind = ["video"] * n_video + ["text"] * n_text
    for b in range(3):
        clean = {"video": bool(t_video[b] == 0), "text": bool(t_text[b] == 0)}
        for i, qk in enumerate(kind):
            for j, kk in enumerate(kind):
                assert bool(mask[b, 0, i, j]) == (qk == kk or not clean[qk])


# --------------------------------------------------------------------------------- no [S, S] tensor
class AttentionSpy:
    """Records, for every attention call, the largest mask / offset tensor next to Lq * Lk."""

    def __init__(self, monkeypatch):
        self.calls = []
        inner = layers.attention
        sdpa = F.scaled_dot_product_attention

        def spy(q, k, v, mask=None, offsets=None):
            tensors = [mask] if mask is not None else []
            if offsets is not None:
                tensors += [offsets.query, offsets.key]
            self.calls.append((q.shape[2] * k.shape[2], max((t.numel() for t in tensors), default=0)))
            return inner(q, k, v, mask, offsets=offsets)

        def sdpa_spy(*args, attn_mask=None, **kwargs):
            self.sdpa_masks.append(attn_mask)
            return sdpa(*args, attn_mask=attn_mask, **kwargs)

        self.sdpa_masks = []
        monkeypatch.setattr(layers, "attention", spy)
        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa_spy)

    def largest(self) -> float:
        """The largest policy tensor relative to its call's score matrix (1 = score-sized)."""
        return max(size / scores for scores, size in self.calls)


def every_path(model):
    video, text, condition = inputs(batch=2, frames=4, size=8)  # 64 video + 6 text tokens
    for t_video, t_text in ((0.0, 500.0), (500.0, 0.0), (400.0, 600.0), (0.0, 0.0)):
        tv, tt = torch.tensor([t_video, 300.0]), torch.tensor([t_text, 0.0])
        velocity, logits = model(video, text, tv, tt, condition)
        (velocity.sum() + logits.sum()).backward()  # training: forward and backward
    with torch.no_grad():
        model(None, text, None, torch.tensor([500.0, 0.0]), condition)  # text alone (guidance branch)
        cache = model.prefill("video", video=video, condition=condition)
        model.step_text(text, torch.tensor([500.0, 0.0]), cache)
        cache = model.prefill("text", text=text, condition=condition)
        model.step_video(video, torch.tensor([500.0, 0.0]), cache)


@pytest.mark.parametrize("bias", [None, -8.0])
@pytest.mark.parametrize("policy", ["clean_isolated", "full"])
def test_no_attention_call_receives_a_score_sized_mask_or_bias(policy, bias, monkeypatch):
    model = model_for(policy, bias)
    spy = AttentionSpy(monkeypatch)
    every_path(model) if policy == "clean_isolated" else model(*_forward_args())
    assert spy.calls
    assert spy.largest() < 0.5, spy.calls
    assert all(m is None for m in spy.sdpa_masks)  # mask-free SDPA: eligible for flash on a GPU


def _forward_args():
    video, text, condition = inputs(batch=2, frames=4, size=8)
    return video, text, torch.tensor([0.0, 300.0]), torch.tensor([500.0, 0.0]), condition


def test_the_spy_sees_the_dense_reference(monkeypatch):
    # The test above has teeth: the dense reference's masks are score-sized and are caught.
    model = model_for("clean_isolated", -8.0)
    model.dense_attention_reference = True
    spy = AttentionSpy(monkeypatch)
    every_path(model)
    assert spy.largest() >= 1
    assert any(m is not None for m in spy.sdpa_masks)


# --------------------------------------------------------------------------------- the primitive
def random_offsets(batch, heads, queries, keys, *, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = (torch.rand(queries, 2, generator=g) > 0.5).to(dtype)
    key = torch.randn(batch, heads, keys, 2, generator=g, dtype=torch.float64).to(dtype) * 3
    key[0, :, : keys // 2, 1] = EXCLUDED  # some excluded pairs
    return LogitOffsets(query, key.requires_grad_())


@pytest.mark.parametrize("multiple", [1, 8], ids=["cpu_width", "gpu_width"])
def test_offsets_equal_their_dense_mask_in_outputs_and_gradients(multiple, monkeypatch):
    monkeypatch.setitem(attention_module.HEAD_DIM_MULTIPLE, "cpu", multiple)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g, dtype=torch.float64).requires_grad_() for n in (9, 11, 11))
    offsets = random_offsets(2, 3, 9, 11)
    grad_out = torch.randn(2, 3, 9, 16, generator=g, dtype=torch.float64)
    ours = attention(q, k, v, offsets=offsets)
    ours_grads = torch.autograd.grad(ours, (q, k, v, offsets.key), grad_out)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=offsets.dense())
    ref_grads = torch.autograd.grad(ref, (q, k, v, offsets.key), grad_out)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_excluded_pairs_get_exactly_zero_weight():
    # EXCLUDED is as good as -inf: the output is that of attention over the kept keys alone.
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (5, 7, 7))
    key = torch.zeros(1, 2, 7, 1)
    key[..., 4:, 0] = EXCLUDED
    out = attention(q, k, v, offsets=LogitOffsets(torch.ones(5, 1), key))
    kept = F.scaled_dot_product_attention(q, k[:, :, :4], v[:, :, :4])
    assert_close_ordered(out, kept, terms=8)
    # weights exactly 0: values of the excluded keys do not reach the output at all
    v_changed = v.clone()
    v_changed[:, :, 4:] = 1e6
    assert torch.equal(attention(q, k, v_changed, offsets=LogitOffsets(torch.ones(5, 1), key)), out)


def test_bf16_explicit_backward_with_offsets_matches_the_dense_reference():
    # On a CPU in bf16 over few keys the explicit backward runs, now at the widened head size with
    # the true size's softmax scale.
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g).bfloat16().requires_grad_() for n in (24, 30, 30))
    offsets = random_offsets(2, 2, 24, 30, dtype=torch.float32)
    grad_out = torch.randn(2, 2, 24, 16, generator=g).bfloat16()
    assert attention_module.explicit_backward_pays(q, k, v, None)
    ours = attention(q, k, v, offsets=offsets)
    ours_grads = torch.autograd.grad(ours, (q, k, v, offsets.key), grad_out)
    wide = [x.detach().double().requires_grad_() for x in (q, k, v)]
    key = offsets.key.detach().double().requires_grad_()
    exact_out = F.scaled_dot_product_attention(*wide, attn_mask=LogitOffsets(offsets.query.double(), key).dense())
    exact = torch.autograd.grad(exact_out, (*wide, key), grad_out.double())
    for o, e in zip((ours, *ours_grads), (exact_out, *exact)):
        error = float((o.double() - e).norm() / e.norm())
        assert error < 1e-2, error


def test_bf16_training_step_equals_the_dense_reference_through_the_explicit_backward(monkeypatch):
    # Under bf16 autocast on a CPU, short sequences take the explicit backward (attention.py) at
    # the widened head size; outputs and every gradient, the bias's too, match the dense masks.
    calls = []
    apply = attention_module._SDPAWithExplicitBackward.apply
    monkeypatch.setattr(attention_module._SDPAWithExplicitBackward, "apply",
                        lambda *args: calls.append(args[0].shape[-1]) or apply(*args))
    model = model_for("clean_isolated", -2.0)
    reference = copy.deepcopy(model)
    reference.dense_attention_reference = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs, grads = run(model, "forward", "mixed")
        ref_outputs, ref_grads = run(reference, "forward", "mixed")
    assert 16 + 2 in calls  # the self-attention, widened by the rank-2 offset
    terms = network_terms(model.config)
    for out, ref in zip(outputs, ref_outputs):
        assert_close_ordered(out, ref, terms=terms, dtype=torch.bfloat16)
    for name, grad in grads.items():
        assert_close_ordered(grad, ref_grads[name], terms=terms, dtype=torch.bfloat16, msg=name)
