"""LoRA through peft: adapters on the video, shared and text parts; training only them (and the
groups configured to train fully); zero-initialised adapters change nothing; merged equals
unmerged; adapter-only files in peft's format that load into a fresh base, into plain peft, and
from diffusers' and original Wan key layouts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from backbone_helpers import randomize_, tiny_config as tiny_model_config
from tolerances import assert_close_ordered, network_terms
from univigu.models import lora
from univigu.models.bundle import load_bundle
from univigu.models.transformer import UniViGUTransformer
from univigu.training import checkpoint as ckpt
from univigu.training.trainer import Trainer, TrainingError
from training_helpers import tiny_config, tiny_generator, training_cache  # noqa: F401 (fixtures)

SHARED_ATTENTION = "shared:attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0"


def _unified(seed=0, **overrides) -> UniViGUTransformer:
    config = tiny_model_config(vocab_size=17, text_length=6, text_query_projection=True, **overrides)
    return randomize_(UniViGUTransformer(config), seed).eval()


def _inputs(model, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    video = torch.randn(batch, c.in_channels, 1, 4, 6, generator=g)
    text = torch.randint(0, c.vocab_size, (batch, c.text_length), generator=g)
    ts = torch.tensor([300.0, 800.0])[:batch]
    cond = torch.randn(batch, 5, c.text_dim, generator=g)
    return video, text, ts, ts.flip(0), cond


def _randomize_adapters(model, seed=3, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _close(actual, expected, config):
    for a, e in zip(actual, expected):
        assert_close_ordered(a, e, terms=network_terms(config))


# --------------------------------------------------------------------------------------------
# Targets, zero init, merging
# --------------------------------------------------------------------------------------------


def test_targets_select_layers_by_group_and_pattern():
    model = _unified()
    names = lora.target_modules(model, [SHARED_ATTENTION, "video:ffn.*", "text:text_ffn.net.2"])
    blocks = model.config.num_layers
    assert len(names) == blocks * (4 + 2 + 1)
    assert "blocks.0.attn1.to_out.0" in names and "blocks.0.ffn.net.0.proj" in names
    assert "blocks.0.text_ffn.net.2" in names and "blocks.0.text_ffn.net.0.proj" not in names
    assert not any("attn2" in n or "text_to_q" in n for n in names)
    # a pattern only matches inside its own group: ffn.* of the text group is nothing
    with pytest.raises(lora.LoraError, match="match no linear layer"):
        lora.target_modules(model, ["text:ffn.*"])
    with pytest.raises(lora.LoraError, match="GROUP:PATTERN"):
        lora.target_modules(model, ["attn1.to_q"])


def test_zero_initialised_adapters_leave_outputs_unchanged_and_merged_equals_unmerged():
    model = _unified()
    inputs = _inputs(model)
    with torch.no_grad():
        base = model(*inputs)
        config = lora.make_config(model, 4, 8, targets=[SHARED_ATTENTION, "video:ffn.*", "text:text_ffn.*"])
        lora.add_adapter(model, config)
        zero = model(*inputs)
        assert all(torch.equal(a, b) for a, b in zip(zero, base))
        _randomize_adapters(model)
        unmerged = model(*inputs)
        assert (unmerged[0] - base[0]).abs().max() > 1e-3 and (unmerged[1] - base[1]).abs().max() > 1e-3
        lora.fuse(model)
        merged = model(*inputs)
        _close(merged, unmerged, model.config)
        lora.unfuse(model)
        _close(model(*inputs), unmerged, model.config)
        lora.unload(model, merge=True)
        assert not lora.lora_layers(model)
        assert set(model.state_dict()) == set(_unified().state_dict())
        _close(model(*inputs), unmerged, model.config)


# --------------------------------------------------------------------------------------------
# Training with adapters
# --------------------------------------------------------------------------------------------

LORA_RUN = ("train.trainable=text", "train.lora.rank=4", "train.lora.alpha=8", f"train.lora.targets=[{SHARED_ATTENTION!r}]",
            "train.eval_samples=0", "train.lr=0.003")


def _lora_trainer(tmp_path, training_cache, tiny_generator, *extra, name="run"):
    cfg = tiny_config(tmp_path / name, training_cache, *LORA_RUN, *extra, stage="knowledge_recall",
                      init_from=tiny_generator)
    return Trainer(cfg, progress=False)


def test_only_adapters_and_configured_groups_train_and_the_export_merges_them(tmp_path, training_cache,
                                                                              tiny_generator):
    trainer = _lora_trainer(tmp_path, training_cache, tiny_generator, "train.steps=2")
    model = trainer.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if lora.is_lora_parameter(n)}
    assert adapters and all(".attn1." in n for n in adapters)
    assert all(lora.is_lora_parameter(n) or model.parameter_group(n) == "text" for n in trainable)
    assert {n for n, p in model.named_parameters() if model.parameter_group(n) == "text"} <= trainable
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".base_layer." in n)
    trainer.train_step()
    with_grad = set()  # set_to_none: gradients are gone after the step; optimizer state shows who stepped
    state = trainer.optimizer.state
    names = {id(p): n for n, p in model.named_parameters()}
    with_grad = {names[id(p)] for p in state}
    assert with_grad == trainable
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable
    assert any(".lora_B." in k for k in changed)  # B starts at zero and moves

    out = trainer.run()
    adapter_dir = tmp_path / "run" / "adapter"
    config = json.loads((adapter_dir / lora.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(tiny_generator.resolve())
    saved = load_file(str(adapter_dir / lora.ADAPTER_WEIGHTS))
    assert all(lora.is_lora_parameter(k) and ".default." not in k for k in saved)
    full = load_file(str(adapter_dir / lora.FULL_WEIGHTS))
    assert set(full) == {n for n in trainable if not lora.is_lora_parameter(n)}

    merged = load_bundle(out).transformer.eval()  # a plain model directory
    assert not lora.lora_layers(merged)
    unmerged = trainer.ema_model(merge_lora=False)
    assert lora.lora_layers(unmerged)
    inputs = _inputs(merged)
    inputs = (torch.randn(2, merged.config.in_channels, 1, 4, 4), *inputs[1:])
    with torch.no_grad():
        _close(merged(*inputs), unmerged(*inputs), merged.config)


def test_lora_settings_are_checked(tmp_path, training_cache, tiny_generator):
    with pytest.raises(TrainingError, match="match no linear layer"):
        _lora_trainer(tmp_path, training_cache, tiny_generator, "train.lora.targets=['video:nothing.*']")
    # only adapters train: trainable=none is enough with LoRA, nothing without
    trainer = _lora_trainer(tmp_path, training_cache, tiny_generator, "train.trainable=none", name="none")
    assert all(lora.is_lora_parameter(n) for n, p in trainer.model.named_parameters() if p.requires_grad)
    with pytest.raises(TrainingError, match="leaves nothing to train"):
        _lora_trainer(tmp_path, training_cache, tiny_generator, "train.trainable=none", "train.lora.rank=0",
                      name="nothing")
