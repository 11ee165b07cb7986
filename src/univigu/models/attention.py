"""Scaled dot-product attention, with an explicit backward where torch's CPU kernel is slow.

On a CPU, torch's fused flash attention runs its bf16 *backward* slowly: for 320 queries over 32
prompt keys (the small benchmark model's cross-attention) it took 15 ms on two threads where plain
matrix products take 4 ms. So when gradients are wanted, on a CPU, in bf16, the forward still runs
torch's SDPA (same output, no scores kept) and the backward recomputes the scores and takes the
gradients with matrix products: scores and softmax in fp32, the four products of the backward in
bf16 with fp32 accumulation, as flash kernels do. Run eagerly, its elementwise passes over the
[L, S] scores cost as much as flash from about 128 keys on, so eager takes it up to 128 keys; under
torch.compile inductor fuses those passes and it won at every length measured (up to 1024 keys:
56 against 60 ms), so compiled code takes it wherever the scores fit `EXPLICIT_BACKWARD_MAX_SCORES`.
Eagerly it works through the batch and heads in pieces of `EXPLICIT_BACKWARD_CHUNK_SCORES` scores, so
that one piece's scores stay in cache across those passes: 42-53 against 80-93 ms for 1024 queries
over 128 keys (batch 8, 4 heads of 64, one thread), and no slower where the scores were small already.
Everywhere else (GPUs, fp32, no gradients) this is `F.scaled_dot_product_attention`.

Structured logit offsets without a score-sized mask (`LogitOffsets`). The joint self-attention's
policies are offsets of low rank: the learned text-key bias adds b[h] to the scores of every (video
query, text key) pair, and the isolation of a clean modality adds -inf (here `EXCLUDED`) to the
(clean query, other modality's key) pairs of the samples concerned. A dense [B, H, Lq, Lk] mask
would hold them, but costs O(S^2) memory (48.7 GiB per call at Wan's native S = 33k with 12 heads),
gets a gradient of that size when the bias trains, and makes flash kernels ineligible. Instead each
offset is written as a product of a query factor and a key factor,

    scores[b, h, l, s] += sum_r query[l, r] * key[b, h, s, r]      (R <= 2 terms),

and carried by R extra head dimensions: q' = [q, query], k' = [k, key / scale], v' = [v, 0], with the
softmax scale 1/sqrt(D) of the true head size passed explicitly, so q' k'^T * scale = q k^T * scale +
offset exactly (up to the order of one fp32 sum). That is one plain SDPA call with no attn_mask, in
memory linear in S, eligible for flash on a GPU (where the width is rounded up to a multiple of 8:
128 -> 136, about 6% more attention FLOPs; on a CPU it is D + R), and the bias's gradient comes out of
k's own gradient. Exclusion uses a finite offset: EXCLUDED logits make exp(score - max) exactly 0 in
fp32 (it underflows below -104), the same as -inf, while 0 * EXCLUDED stays 0 for the queries it
does not apply to (0 * -inf would be NaN); a query always keeps its own modality's keys, so no row is
all excluded. The alternative routes were weighed: splitting queries by modality and sample needs a
gather per group and up to four calls per block; merging two attentions by their log-sum-exps needs
the log-sum-exp's gradient, which public SDPA does not return; FlexAttention needs compilation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

#: Most keys for which the explicit backward is taken (see above).
EXPLICIT_BACKWARD_MAX_KEYS = 128
#: Largest score matrix (batch x heads x queries x keys) the explicit backward builds: 64 MiB in fp32.
EXPLICIT_BACKWARD_MAX_SCORES = 1 << 24
#: Scores per piece of the eager backward (2 MiB in fp32: a core's L2 cache on the machines measured).
EXPLICIT_BACKWARD_CHUNK_SCORES = 1 << 19
#: The logit offset of an excluded (query, key) pair: exp of it underflows to exactly 0 in fp32 next
#: to any real score, and EXCLUDED * sqrt(D) stays finite in fp16 and bf16 for head sizes up to 1024.
EXCLUDED = -2000.0
#: What the augmented head size is rounded up to, per device type (flash kernels want multiples of 8).
HEAD_DIM_MULTIPLE = {"cpu": 1}
DEFAULT_HEAD_DIM_MULTIPLE = 8


class LogitOffsets(NamedTuple):
    """A logit offset of rank R added to the attention scores without building them:
    scores[b, h, l, s] += sum_r query[l, r] * key[b, h, s, r].

    query: [Lq, R] (the policies use 0/1 indicators); key: [B or 1, H or 1, Lk, R] in logits,
    possibly requiring grad (a learned bias)."""

    query: torch.Tensor
    key: torch.Tensor

    def dense(self) -> torch.Tensor:
        """The same offset as a [B or 1, H or 1, Lq, Lk] float mask: the reference, O(Lq Lk)."""
        return torch.einsum("lr,bhsr->bhls", self.query.to(self.key.dtype), self.key)


def explicit_backward_pays(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `attention` takes the explicit backward for these inputs."""
    wants_grad = any(t is not None and t.requires_grad for t in (q, k, v, mask))
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled() and wants_grad
            and (k.shape[2] <= EXPLICIT_BACKWARD_MAX_KEYS or torch.compiler.is_compiling())
            and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= EXPLICIT_BACKWARD_MAX_SCORES)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              offsets: LogitOffsets | None = None) -> torch.Tensor:
    """SDPA over q [B, H, L, D], k and v [B, H, S, D]; mask broadcast to [B, H, L, S]: bool (True =
    may attend) or an additive float bias (which may be learned); or, without any [L, S] tensor,
    `offsets` (see the module's docstring). The output is SDPA's, whichever backward is used."""
    scale = None
    if offsets is not None:
        if mask is not None:
            raise ValueError("give a mask or offsets, not both")
        head_dim = q.shape[-1]
        q, k, v, scale = _augmented(q, k, v, offsets)
        return _dispatch(q, k, v, None, scale)[..., :head_dim]
    return _dispatch(q, k, v, mask, scale)


def _dispatch(q, k, v, mask, scale):
    if explicit_backward_pays(q, k, v, mask):
        return _SDPAWithExplicitBackward.apply(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _augmented(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: LogitOffsets):
    """(q', k', v', scale): q, k and v widened by the offset's R dimensions (then zeros up to the
    device's multiple), so that q' k'^T * scale = q k^T * scale + offset; scale = 1/sqrt(D)."""
    batch, heads, queries, head_dim = q.shape
    keys, rank = k.shape[2], offsets.query.shape[-1]
    multiple = HEAD_DIM_MULTIPLE.get(q.device.type, DEFAULT_HEAD_DIM_MULTIPLE)
    width = -(-(head_dim + rank) // multiple) * multiple
    scale = 1.0 / math.sqrt(head_dim)
    q_extra = offsets.query.to(q.dtype).expand(batch, heads, queries, rank)
    k_extra = (offsets.key * (1.0 / scale)).to(k.dtype).expand(batch, heads, keys, rank)
    pad = width - head_dim - rank
    if pad:
        q_extra = F.pad(q_extra, (0, pad))
        k_extra = F.pad(k_extra, (0, pad))
    return (torch.cat([q, q_extra], dim=-1), torch.cat([k, k_extra], dim=-1),
            F.pad(v, (0, width - head_dim)), scale)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or wider if it already is (fp64 keeps the backward exact enough for gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _scale(q: torch.Tensor, scale: float | None) -> float:
    """The softmax scale: given, or SDPA's default 1/sqrt(D)."""
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                   scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) in fp32 (or wider); scale defaults to 1/sqrt(D)."""
    scores = torch.matmul(_wide(q) * _scale(q, scale), _wide(k).transpose(-1, -2))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(dim=-1)


def _head_groups(q: torch.Tensor, k: torch.Tensor):
    """(batch slice, head slice) pieces whose fp32 scores fit `EXPLICIT_BACKWARD_CHUNK_SCORES`:
    whole heads, several samples per piece when a sample's heads fit, else groups of heads."""
    batch, heads, queries = q.shape[:3]
    per_head = queries * k.shape[2]
    if torch.compiler.is_compiling():  # inductor fuses the passes itself: one piece
        yield slice(None), slice(None)
        return
    group = max(1, min(heads, EXPLICIT_BACKWARD_CHUNK_SCORES // per_head))
    samples = max(1, EXPLICIT_BACKWARD_CHUNK_SCORES // (per_head * heads)) if group == heads else 1
    for b in range(0, batch, samples):
        for h in range(0, heads, group):
            yield slice(b, b + samples), slice(h, h + group)


def _piece(x: torch.Tensor, batch: slice, heads: slice) -> torch.Tensor:
    """x[batch, heads], where x (a mask) may broadcast along either dimension (size 1)."""
    return x[batch if x.shape[0] > 1 else slice(None), heads if x.shape[1] > 1 else slice(None)]


class _SDPAWithExplicitBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale=None):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v, mask, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask, out = ctx.saved_tensors
        grad_out = grad_out.to(v.dtype)
        wants_mask = ctx.needs_input_grad[3]
        pieces = list(_head_groups(q, k))
        if len(pieces) == 1:  # all at once, straight into the returned gradients
            grad_q, grad_k, grad_v, grad_logits = _backward_piece(q, k, v, out, grad_out, mask, ctx.scale)
            # a learned bias: summed over the dimensions it was broadcast along
            grad_mask = grad_logits.sum_to_size(mask.shape).to(mask.dtype) if wants_mask else None
            return (grad_q, grad_k, grad_v, grad_mask, None)[:len(ctx.needs_input_grad)]
        # Piece by piece, so each piece's [L, S] scores stay in cache across the passes over them.
        mask4 = None if mask is None else mask.view(*([1] * (4 - mask.dim())), *mask.shape)  # as SDPA broadcasts
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        grad_mask4 = torch.zeros(mask4.shape, dtype=torch.promote_types(mask.dtype, torch.float32),
                                 device=mask.device) if wants_mask else None  # fp32 or wider, as `_wide`
        for b, h in pieces:
            piece_mask = None if mask4 is None else _piece(mask4, b, h)
            dq, dk, dv, dlogits = _backward_piece(q[b, h], k[b, h], v[b, h], out[b, h], grad_out[b, h], piece_mask,
                                             ctx.scale)
            grad_q[b, h], grad_k[b, h], grad_v[b, h] = dq, dk, dv
            if wants_mask:
                _piece(grad_mask4, b, h).add_(dlogits.sum_to_size(piece_mask.shape))
        grad_mask = grad_mask4.to(mask.dtype).view(mask.shape) if wants_mask else None
        return (grad_q, grad_k, grad_v, grad_mask, None)[:len(ctx.needs_input_grad)]


def _backward_piece(q, k, v, out, grad_out, mask, scale=None):
    """(dq, dk, dv, d loss / d (scores + mask) in fp32) of one piece of the attention."""
    probs = _probabilities(q, k, mask, scale)  # [B, H, L, S] fp32
    grad_v = torch.matmul(probs.to(v.dtype).transpose(-1, -2), grad_out)
    grad_probs = _wide(torch.matmul(grad_out, v.transpose(-1, -2)))
    # Softmax backward: dS = P * (dP - rowsum(dO * O)), the row sum being rowsum(P * dP).
    row = (_wide(grad_out) * _wide(out)).sum(dim=-1, keepdim=True)
    grad_logits = probs.mul_(grad_probs.sub_(row))
    grad_scores = grad_logits.to(q.dtype)
    scale = _scale(q, scale)  # applied to the [L, D] products, not the [L, S] scores
    grad_q = torch.matmul(grad_scores, k).mul_(scale)
    grad_k = torch.matmul(grad_scores.transpose(-1, -2), q).mul_(scale)
    return grad_q, grad_k, grad_v, grad_logits
