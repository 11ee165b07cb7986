"""The attention dispatch: SDPA's output always; on a CPU in bf16 over few keys, an explicit backward
whose gradients must be SDPA's (checked by gradcheck in fp64, and against an fp64 reference in bf16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from univigu.models import attention as attention_module
from univigu.models.attention import _SDPAWithExplicitBackward, attention, explicit_backward_pays
from univigu.models.transformer import UniViGUTransformer

from backbone_helpers import randomize_, random_inputs, tiny_config
from tolerances import assert_close_ordered, network_terms, ordered_tolerance

# A norm-relative error of a sum: its norm grows as fast as its rounding, so one rounding's worth.
BF16_RELATIVE = ordered_tolerance(1.0, terms=1, dtype=torch.bfloat16)


def qkv(batch=2, heads=2, queries=7, keys=5, dim=4, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
            for n in (queries, keys, keys)]


def some_blocked(queries=7, keys=5, seed=1):
    """A bool mask [1, 1, Lq, Lk] that blocks some pairs but leaves every query a key."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(1, 1, queries, keys, generator=gen) > 0.4
    mask[..., 0] = True
    return mask


@pytest.mark.parametrize("kind", ["none", "bool", "learned_bias"])
@pytest.mark.parametrize("piece_scores", [35, 70, None], ids=["a_head_per_piece", "a_sample_per_piece", "one_piece"])
def test_explicit_backward_passes_gradcheck(kind, piece_scores, monkeypatch):
    if piece_scores is not None:  # 7 queries x 5 keys = 35 scores per head, 2 heads per sample
        monkeypatch.setattr(attention_module, "EXPLICIT_BACKWARD_CHUNK_SCORES", piece_scores)
    q, k, v = qkv()
    if kind == "none":
        mask = None
    elif kind == "bool":
        mask = some_blocked()
    else:  # a learned additive bias broadcast over the batch, with blocked pairs at -inf
        bias = torch.randn(1, 2, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        mask = torch.where(some_blocked(), bias, float("-inf")).requires_grad_()
    inputs = (q, k, v, mask)
    if kind != "learned_bias":
        assert torch.autograd.gradcheck(_SDPAWithExplicitBackward.apply, inputs)
        return
    # gradcheck perturbs every entry, the -inf ones too; check the bias gradient against autograd instead.
    assert torch.autograd.gradcheck(lambda q, k, v: _SDPAWithExplicitBackward.apply(q, k, v, mask), (q, k, v))
    grad_out = torch.randn(2, 2, 7, 4, dtype=torch.float64)
    ours = torch.autograd.grad(_SDPAWithExplicitBackward.apply(q, k, v, mask), mask, grad_out)[0]
    reference = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), mask, grad_out)[0]
    finite = torch.isfinite(mask)
    assert_close_ordered(ours[finite], reference[finite], terms=q.shape[-1] + k.shape[-2])  # scores, then keys
    assert torch.all(ours[~finite] == 0)


def test_bf16_output_is_sdpa_and_gradients_are_as_close_to_fp64_as_flash():
    q, k, v = qkv(batch=2, heads=3, queries=40, keys=24, dim=16, dtype=torch.bfloat16)
    mask = some_blocked(40, 24)
    assert explicit_backward_pays(q, k, v, mask)
    grad_out = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(3)).bfloat16()

    ours_out = attention(q, k, v, mask)
    ours = torch.autograd.grad(ours_out, (q, k, v), grad_out)
    flash_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    flash = torch.autograd.grad(flash_out, (q, k, v), grad_out)
    wide = [x.detach().double().requires_grad_() for x in (q, k, v)]
    exact = torch.autograd.grad(F.scaled_dot_product_attention(*wide, attn_mask=mask), wide, grad_out.double())

    assert torch.equal(ours_out, flash_out)  # the forward is SDPA's own
    for o, f, e in zip(ours, flash, exact):
        assert o.dtype == torch.bfloat16
        error = float((o.double() - e).norm() / e.norm())
        flash_error = float((f.double() - e).norm() / e.norm())
        assert error < max(2 * flash_error, BF16_RELATIVE), (error, flash_error)


def test_dispatch_takes_the_explicit_backward_only_where_it_pays():
    q, k, v = qkv(dtype=torch.bfloat16)
    assert explicit_backward_pays(q, k, v, None)
    assert not explicit_backward_pays(*[x.float() for x in (q, k, v)], None)  # fp32: flash is fast
    assert not explicit_backward_pays(*[x.detach() for x in (q, k, v)], None)  # nothing needs a gradient
    with torch.no_grad():
        assert not explicit_backward_pays(q, k, v, None)
    long_q, long_k, long_v = qkv(keys=attention_module.EXPLICIT_BACKWARD_MAX_KEYS + 1, dtype=torch.bfloat16)
    assert not explicit_backward_pays(long_q, long_k, long_v, None)


def test_a_bf16_training_step_of_the_backbone_gets_the_same_gradients_either_way(monkeypatch):
    config = tiny_config()
    video, timestep, condition = random_inputs(config)

    calls = []
    apply = _SDPAWithExplicitBackward.apply
    monkeypatch.setattr(_SDPAWithExplicitBackward, "apply", lambda *args: calls.append(1) or apply(*args))

    def gradients():
        torch.manual_seed(0)
        model = randomize_(UniViGUTransformer(config), seed=0).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(video, None, timestep, None, condition)[0]
        out.float().square().mean().backward()
        return {name: p.grad for name, p in model.named_parameters()}

    explicit = gradients()
    assert len(calls) == 2 * config.num_layers  # self- and cross-attention of every block
    monkeypatch.setattr(attention_module, "EXPLICIT_BACKWARD_MAX_KEYS", 0)  # SDPA's own backward
    flash = gradients()
    assert len(calls) == 2 * config.num_layers
    for name, grad in flash.items():
        assert_close_ordered(explicit[name], grad, terms=network_terms(config), dtype=torch.bfloat16, msg=name)


def test_compiled_code_takes_the_explicit_backward_at_any_length_and_keeps_the_gradients():
    keys = attention_module.EXPLICIT_BACKWARD_MAX_KEYS + 8
    q, k, v = qkv(batch=1, heads=2, queries=16, keys=keys, dim=8, dtype=torch.bfloat16)
    assert not explicit_backward_pays(q, k, v, None)  # eager: flash's backward over this many keys
    takes = torch.compile(lambda q, k, v: q.new_tensor(explicit_backward_pays(q, k, v, None)), fullgraph=True)
    assert bool(takes(q, k, v))  # compiled: inductor fuses the explicit backward, which then pays

    grad_out = torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(4)).bfloat16()
    compiled = torch.autograd.grad(torch.compile(attention, fullgraph=True)(q, k, v), (q, k, v), grad_out)
    wide = [x.detach().double().requires_grad_() for x in (q, k, v)]
    exact = torch.autograd.grad(F.scaled_dot_product_attention(*wide), wide, grad_out.double())
    for c, e in zip(compiled, exact):
        assert float((c.double() - e).norm() / e.norm()) < BF16_RELATIVE
