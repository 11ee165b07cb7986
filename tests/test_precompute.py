"""Precomputation helpers: content keys, batched video and prompt encoding."""

import hashlib

import numpy as np
import pytest
import torch

from univigu.models.precompute import content_key, encode_prompts
from univigu.models.text import PromptEncoder


def test_content_key():
    assert content_key("a red circle") == hashlib.sha1(b"str:a red circle").hexdigest()
    assert content_key("a red circle") != content_key("a red circle ")
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    # equal content, different layout: same key
    assert content_key(x) == content_key(x.transpose(1, 2).contiguous().transpose(1, 2))
    assert content_key(x) == content_key(x.clone())
    y = x.clone()
    y[1, 2, 3] += 1
    assert content_key(x) != content_key(y)
    assert content_key(x) != content_key(x.double())  # dtype is part of the content
    assert content_key(x) != content_key(x.reshape(6, 4))  # and the shape
    assert content_key(x.bfloat16()) == content_key(x.bfloat16().clone())
    assert content_key(np.zeros(3)) != content_key(np.zeros(4))
    with pytest.raises(TypeError, match="content_key takes"):
        content_key(3.0)


class BagOfCharsEncoder(PromptEncoder):
    """A deterministic stand-in encoder: one state per character (its code point)."""

    kind = "test"
    embed_dim = 2

    def __init__(self):
        super().__init__(condition_length=6)
        self.calls = 0

    def _token_states(self, prompts):
        self.calls += 1
        return [torch.tensor([[float(ord(c)), 1.0] for c in p[:6]]).reshape(-1, 2)
                for p in prompts]


def test_encode_prompts_matches_encoder_and_dedups():
    enc = BagOfCharsEncoder()
    prompts = ["ab", "xyz", "ab", "", "abcdefgh"]
    out = encode_prompts(enc, prompts, batch_size=2, progress=False)
    assert set(out) == {content_key(p) for p in prompts}
    emb, mask = out[content_key("xyz")]
    assert emb.shape == (6, 2) and mask.tolist() == [True] * 3 + [False] * 3
    assert emb[:3, 0].tolist() == [120.0, 121.0, 122.0] and torch.count_nonzero(emb[3:]) == 0
    assert not out[content_key("")][1].any()
    assert out[content_key("abcdefgh")][1].all()
    with pytest.raises(ValueError, match="no prompts"):
        encode_prompts(enc, [], progress=False)
