"""qk_norm and rope_max_seq_len are stored for the diffusers config.json round trip; a value the
model cannot honour is refused instead of ignored."""

from __future__ import annotations

import pytest
import torch

from backbone_helpers import random_inputs, tiny_config
from univigu.models.transformer import ModelInputError, UniViGUTransformer


def test_an_unsupported_qk_norm_is_refused():
    with pytest.raises(ModelInputError, match="qk_norm='layer_norm' is not supported"):
        UniViGUTransformer(tiny_config(qk_norm="layer_norm"))


def test_a_patch_grid_beyond_rope_max_seq_len_is_refused():
    model = UniViGUTransformer(tiny_config(rope_max_seq_len=2))
    video, timestep, condition = random_inputs(model.config, height=4, width=6)  # grid 1 x 2 x 3
    with pytest.raises(ModelInputError, match="exceeds rope_max_seq_len=2"):
        model(video, None, timestep, None, condition)
    with torch.no_grad():
        model(video[..., :4], None, timestep, None, condition)  # grid 1 x 2 x 2 fits
