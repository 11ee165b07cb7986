"""The published Uni-ViGU checkpoint as the released training code saves it.

The released model registers its text RoPE's frequencies as a persistent buffer, so its
`state_dict()` carries `rotary_emb_text.inv_freq` (reference notes, section 12) beside the weights.
"""

from __future__ import annotations

import pytest
import torch
from test_published_checkpoint import (HEADS, D, L, assert_matches_reference, published_shapes, random_state,
                                       wrap_prefixes)

from univigu.models.published import TEXT_ROPE_BUFFER, PublishedCheckpointError, load_published_univigu


def inv_freq(head_dim: int, theta: float = 10000.0, dtype=torch.float32) -> torch.Tensor:
    """The released 1D rotary's buffer, written from the reference notes: 1 / theta^(2i/d)."""
    return (1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)).to(dtype)


# --------------------------------------------------------------------------------------------
# The text RoPE buffer
# --------------------------------------------------------------------------------------------


def test_the_rope_buffer_is_accepted_and_the_forward_still_matches_the_reference(tmp_path):
    P = random_state(published_shapes(), seed=11)
    path = tmp_path / "with_buffer.pth"
    torch.save({"model": wrap_prefixes({**P, TEXT_ROPE_BUFFER: inv_freq(D // HEADS)}), "step": 3}, path)
    # No num_attention_heads: width 32 is no multiple of Wan's 128-wide heads, so only the
    # buffer's 8 frequencies (head dim 16) can tell the head count.
    model, settings = load_published_univigu(path, text_length=L)
    assert model.config.num_attention_heads == HEADS and model.config.text_rope_theta == 10000.0
    assert settings["checkpoint"]["text_rope_buffer"] is True
    assert len(model.state_dict()) == len(P)  # the buffer is not a parameter of ours
    assert_matches_reference(model, P)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rope_base_is_read_from_the_buffer_at_its_own_precision(tmp_path, dtype):
    P = random_state(published_shapes(), seed=12)
    for theta in (10000.0, 500000.0):
        path = tmp_path / f"theta{theta:g}.pth"
        torch.save({"model": {**P, TEXT_ROPE_BUFFER: inv_freq(D // HEADS, theta, dtype)}}, path)
        model, _ = load_published_univigu(path, text_length=L)
        assert model.config.text_rope_theta == pytest.approx(theta, rel=1e-3 if dtype == torch.bfloat16 else 1e-6)


def test_a_rope_buffer_that_does_not_fit_is_refused_clearly(tmp_path):
    P = random_state(published_shapes(), seed=13)
    torch.save({"model": {**P, TEXT_ROPE_BUFFER: inv_freq(D // HEADS)}}, tmp_path / "a.pth")
    with pytest.raises(PublishedCheckpointError, match=r"inv_freq has shape \[8\].*head dim 8 has \[4\]"):
        load_published_univigu(tmp_path / "a.pth", num_attention_heads=4, text_length=L)
    scrambled = inv_freq(D // HEADS)[torch.tensor([0, 3, 1, 2, 4, 5, 7, 6])]
    torch.save({"model": {**P, TEXT_ROPE_BUFFER: scrambled}}, tmp_path / "b.pth")
    with pytest.raises(PublishedCheckpointError, match="not 1 / theta"):
        load_published_univigu(tmp_path / "b.pth", text_length=L)
