"""RMSNorm in fp32 with fewer passes over memory, for eager CPU code.

`F.rms_norm` is a composite on the CPU: the square, the mean, the scaling and the weight each run
as a separate op with a full-size temporary, and autograd keeps several of them for a backward of
as many ops again. Memory-bound ops like these cost what they read and write, so this version
reduces a row to its norm in one pass (`vector_norm`), scales in two, keeps only the normalised
input for the backward, and takes the gradients in closed form:

    x_hat = x r,  r = (mean(x^2) + eps)^(-1/2),  y = x_hat w
    dx = r (g w - x_hat mean(g w x_hat)),  dw = sum over rows of g x_hat

Its outputs differ from `F.rms_norm` by rounding only. A bf16 input is read as it is and widened
inside the first two passes (a separate upcast would be one more pass each way). GPUs have a fused
kernel and inductor fuses the composite itself, so there (and off the CPU) this is `F.rms_norm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., D] over its last dimension, times `weight` [D] when given; in fp32 (or
    x's dtype, if wider) whatever x's dtype."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.rms_norm(_wide(x), x.shape[-1:], weight, eps)
    if weight is not None and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    x_hat = _normalise(x, eps)[0]
    return x_hat if weight is None else x_hat.mul_(weight)


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _normalise(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x r, r) in fp32 (or wider) with r = (mean(x^2) + eps)^(-1/2) per row [..., 1]."""
    wide = torch.promote_types(x.dtype, torch.float32)
    norm = torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True, dtype=wide)
    inverse_rms = norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    return x * inverse_rms, inverse_rms


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x_hat, inverse_rms = _normalise(x, eps)
        ctx.save_for_backward(x_hat, inverse_rms, weight)
        return x_hat * weight

    @staticmethod
    def backward(ctx, grad_out):
        x_hat, inverse_rms, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        # A backward called inside autocast would run vecdot in bf16; it stays fp32 here.
        with torch.autocast("cpu", enabled=False):
            if ctx.needs_input_grad[0]:
                grad_scaled = grad_out * weight
                mean_dot = torch.linalg.vecdot(grad_scaled, x_hat, dim=-1).unsqueeze(-1).div_(x_hat.shape[-1])
                grad_x = grad_scaled.addcmul_(x_hat, mean_dot, value=-1).mul_(inverse_rms)
            if ctx.needs_input_grad[1]:
                grad_weight = (grad_out * x_hat).flatten(0, -2).sum(dim=0)
        return grad_x, grad_weight, None
