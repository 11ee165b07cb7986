"""Tolerances for one value computed in two orders (cached vs uncached, fused vs reference, ours vs
diffusers, bf16 vs fp32, chunked vs whole), derived from the dtype's epsilon and the values' size.

Rounding each partial sum of n terms costs up to eps * |partial|; in another order the errors differ.
They add like a random walk, so two orders typically differ by about sqrt(n) * eps * max|term|
(n * eps in the worst case, which floating point almost never reaches). Through a network the
error of each block's reductions is carried to the output at the output's own scale, so n counts
every rounding on the longest path (a reduction of k terms: k; a chain of k operations: k; see
`network_terms`) and max|expected| stands in for max|term|. SAFETY covers the constant of the random walk and the network's gain: fixed, not
tuned per test. Which SIMD kernels run (AVX-512, AVX2) changes the order, never the bound. A real
error stays outside it: tests/test_unified.py breaks one layer's cached keys by 1e-3 and the
cached == uncached comparison fails.
"""

from __future__ import annotations

import math

import torch

SAFETY = 4.0


def ordered_tolerance(expected: torch.Tensor | float, *, terms: int, dtype: torch.dtype | None = None,
                      scale: float | None = None) -> float:
    """SAFETY * sqrt(terms) * eps(dtype) * scale, scale defaulting to max|expected|.

    `terms`: the reductions' total length on the longest path. `dtype`: the precision the two
    computations round to (default: expected's; bf16 under bf16 autocast). `scale`: the size the
    terms have, where it is not the result's (a sum that cancels, a mean over a large tensor).
    """
    expected = torch.as_tensor(expected)
    eps = torch.finfo(dtype or (expected.dtype if expected.is_floating_point() else torch.float32)).eps
    if scale is None:
        scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    return SAFETY * math.sqrt(terms) * eps * scale


def assert_close_ordered(actual: torch.Tensor, expected: torch.Tensor, *, terms: int,
                         dtype: torch.dtype | None = None, scale: float | None = None, msg: str | None = None):
    """torch.testing.assert_close with atol = `ordered_tolerance` (rtol 0: the bound already scales)."""
    atol = ordered_tolerance(expected, terms=terms, dtype=dtype, scale=scale)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=(lambda m: f"{msg}: {m}") if msg else None)


def network_terms(config) -> int:
    """The reductions' length through a transformer `config`: its widest one, once per block."""
    width = config.num_attention_heads * config.attention_head_dim
    return config.num_layers * max(width, config.ffn_dim)
