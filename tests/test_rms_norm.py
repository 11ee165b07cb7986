"""models/rms_norm.py: the CPU RMSNorm with a closed-form backward, against torch's own."""

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_ordered

from univigu.models.layers import FP32RMSNorm
from univigu.models.rms_norm import rms_norm


def test_gradients_match_autograd_in_float64():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))


@pytest.mark.parametrize("shape", [(4, 7, 32), (2, 3, 5, 96)])
def test_fp32_matches_torch_rms_norm(shape):
    """Output and both gradients within fp32 rounding of F.rms_norm's (composite) ones."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    w = 1.0 + 0.3 * torch.randn(shape[-1], generator=gen)
    grad = torch.randn(shape, generator=gen)
    results = []
    for fn in (lambda a, b: F.rms_norm(a, a.shape[-1:], b, 1e-6), lambda a, b: rms_norm(a, b, 1e-6)):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(a, b)
        out.backward(grad)
        results.append((out.detach(), a.grad, b.grad))
    terms = shape[-1] + x[..., 0].numel()  # the mean square over the last dim, the weight's gradient over rows
    for ours, theirs in zip(results[1], results[0]):
        assert_close_ordered(ours, theirs, terms=terms)


def test_no_grad_and_unweighted_paths():
    x = torch.randn(6, 40)
    before = x.clone()
    with torch.no_grad():
        assert_close_ordered(rms_norm(x, torch.full((40,), 2.0), 1e-6), 2 * F.rms_norm(x, (40,), None, 1e-6), terms=40)
    assert_close_ordered(rms_norm(x, None, 1e-6), F.rms_norm(x, (40,), None, 1e-6), terms=40)
    assert torch.equal(x, before)  # the in-place scaling works on a fresh tensor, not the input


def test_only_the_weight_wants_a_gradient():
    x = torch.randn(5, 12)
    w = torch.ones(12, requires_grad=True)
    rms_norm(x, w, 1e-6).sum().backward()
    assert_close_ordered(w.grad, F.rms_norm(x, (12,), None, 1e-6).sum(0), terms=12 + 5)


def test_fp32_norm_module_keeps_the_input_dtype_and_learns():
    norm = FP32RMSNorm(24, eps=1e-6)
    x = torch.randn(2, 3, 24, dtype=torch.bfloat16, requires_grad=True)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and norm.weight.grad is not None


def test_backward_inside_autocast_stays_fp32():
    """A backward run inside a bf16 autocast region gives the same gradients as outside it."""
    x = torch.randn(4, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    grads = []
    for enabled in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=enabled):
            rms_norm(x, w, 1e-6).square().sum().backward()
        grads.append((x.grad.clone(), w.grad.clone()))
        x.grad = w.grad = None
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("with_grad", [False, True])
def test_bf16_input_is_widened_inside_exactly_as_an_upcast_first(with_grad):
    """A bf16 input normalises to fp32 without a separate upcast pass, and gives the output and
    gradients of upcasting it first, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 48, generator=gen).bfloat16()
    w = 1.0 + 0.3 * torch.randn(48, generator=gen)
    grad = torch.randn(3, 10, 48, generator=gen)
    results = []
    for widen in (lambda a: a, lambda a: a.float()):
        a, b = x.clone().requires_grad_(with_grad), w.clone().requires_grad_(with_grad)
        with torch.set_grad_enabled(with_grad):
            out = rms_norm(widen(a), b, 1e-6)
        assert out.dtype == torch.float32
        if with_grad:
            out.backward(grad)
            assert a.grad.dtype == torch.bfloat16
            results.append((out.detach(), a.grad, b.grad))
        else:
            results.append((out,))
    assert all(torch.equal(ours, upcast) for ours, upcast in zip(*results))
