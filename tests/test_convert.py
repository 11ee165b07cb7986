"""Checkpoint files and formats: single / sharded directories, original key names, configs, and one
clear CheckpointError for each broken checkpoint. (Numerical parity with diffusers is in
test_backbone_parity.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from backbone_helpers import randomize_, random_inputs, tiny_config
from univigu.models.convert import (
    config_from_diffusers,
    config_from_original,
    export_diffusers,
    export_original,
    from_original_keys,
    load_diffusers_wan,
    load_original_wan,
    load_wan,
    to_original_keys,
)
from univigu.models.transformer import UniViGUTransformer
from univigu.models.weights import (
    CheckpointError,
    find_weight_files,
    load_state_dict_from_dir,
    parse_byte_size,
    save_state_dict_to_dir,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(UniViGUTransformer(tiny_config()), seed=2)


def velocity(model):
    video, t, cond = random_inputs(model.config, frames=2)
    with torch.no_grad():
        return model(video, None, t, None, cond)[0]


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------ directories and shards
def test_single_and_sharded_directories_hold_the_same_tensors(model, tmp_path):
    state = model.state_dict()
    single = save_state_dict_to_dir(state, tmp_path / "single")
    shards = save_state_dict_to_dir(state, tmp_path / "sharded", max_shard_size="8KB")
    assert [p.name for p in single] == ["diffusion_pytorch_model.safetensors"]
    assert len(shards) > 2
    for path in shards:  # every shard respects the limit unless it holds one big tensor
        tensors = load_file(str(path))
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 8000
    index = json.loads((tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    for directory in ("single", "sharded"):
        loaded = load_state_dict_from_dir(tmp_path / directory)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_rewriting_a_directory_removes_stale_shards(model, tmp_path):
    save_state_dict_to_dir(model.state_dict(), tmp_path, max_shard_size="8KB")
    save_state_dict_to_dir(model.state_dict(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusion_pytorch_model.safetensors"]


def test_transformers_style_and_unindexed_shard_names(model, tmp_path):
    state = model.state_dict()
    save_file(state, str(tmp_path / "model.safetensors"))
    assert find_weight_files(tmp_path) == ([tmp_path / "model.safetensors"], None)
    other = tmp_path / "noindex"
    save_state_dict_to_dir(state, other, max_shard_size="8KB")
    (other / "diffusion_pytorch_model.safetensors.index.json").unlink()
    files, index = find_weight_files(other)
    assert index is None and [p.name for p in files] == sorted(p.name for p in other.glob("*.safetensors"))
    assert load_state_dict_from_dir(other).keys() == state.keys()


def test_missing_shard_is_named(model, tmp_path):
    paths = save_state_dict_to_dir(model.state_dict(), tmp_path, max_shard_size="8KB")
    paths[1].unlink()
    with pytest.raises(CheckpointError, match=f"missing: {paths[1].name}"):
        load_state_dict_from_dir(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"shard\(s\) \[2\] of \d+ .* missing"):
        load_state_dict_from_dir(tmp_path)


def test_index_listing_a_key_no_shard_holds(model, tmp_path):
    save_state_dict_to_dir(model.state_dict(), tmp_path, max_shard_size="8KB")
    index_path = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["blocks.9.ghost.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="blocks.9.ghost.weight"):
        load_state_dict_from_dir(tmp_path)


def test_directories_without_usable_weights(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict_from_dir(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no weights in"):
        load_state_dict_from_dir(tmp_path)
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_state_dict_from_dir(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state_dict_from_dir(tmp_path)


def test_parse_byte_size():
    assert parse_byte_size("20KB") == 20_000 and parse_byte_size("1GiB") == 2**30 and parse_byte_size(123) == 123
    assert parse_byte_size("1.5MB") == 1_500_000
    with pytest.raises(ValueError, match="cannot read size"):
        parse_byte_size("lots")


# ------------------------------------------------------------------ our save/load and export
def test_save_pretrained_round_trip_single_and_sharded(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = UniViGUTransformer.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert_same_weights(loaded, model)
    # from_pretrained also reads a sharded directory (written here by the shard writer).
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    save_state_dict_to_dir(model.state_dict(), tmp_path, max_shard_size="8KB")
    assert_same_weights(UniViGUTransformer.from_pretrained(tmp_path), model)


def test_unified_model_round_trip_keeps_the_text_stream(tmp_path):
    torch.manual_seed(1)
    unified = randomize_(UniViGUTransformer(tiny_config(vocab_size=9)), 3)
    unified.save_pretrained(tmp_path)
    assert_same_weights(UniViGUTransformer.from_pretrained(tmp_path), unified)


def test_export_then_load_gives_the_same_model(model, tmp_path):
    export_diffusers(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "WanTransformer3DModel" and config["image_dim"] is None
    loaded = load_diffusers_wan(tmp_path)
    assert loaded.config == model.config
    assert_same_weights(loaded, model)
    assert torch.equal(velocity(loaded), velocity(model))
    assert_same_weights(load_wan(tmp_path), model)  # load_wan recognises the diffusers directory


def test_export_in_bf16(model, tmp_path):
    export_diffusers(model, tmp_path, dtype=torch.bfloat16)
    stored = load_state_dict_from_dir(tmp_path)
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    loaded = load_diffusers_wan(tmp_path)  # loads back in fp32 by default
    assert loaded.proj_out.weight.dtype == torch.float32
    assert torch.equal(loaded.proj_out.weight, model.proj_out.weight.to(torch.bfloat16).float())  # bf16 -> fp32 is exact


# ------------------------------------------------------------------ broken diffusers directories
def _break(tmp_path, model, edit):
    export_diffusers(model, tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_missing_keys_are_named(model, tmp_path):
    _break(tmp_path, model, lambda s: (s.pop("blocks.1.attn2.to_k.weight"), s.pop("proj_out.bias")))
    with pytest.raises(CheckpointError, match=r"2 missing key\(s\): blocks.1.attn2.to_k.weight, proj_out.bias"):
        load_diffusers_wan(tmp_path)


def test_unexpected_keys_are_named(model, tmp_path):
    _break(tmp_path, model, lambda s: s.update({"blocks.0.attn2.add_k_proj.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): blocks.0.attn2.add_k_proj.weight"):
        load_diffusers_wan(tmp_path)


def test_config_that_does_not_match_the_weights(model, tmp_path):
    export_diffusers(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["ffn_dim"] = 40
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*blocks.0.ffn.net.0.proj.bias \[32\] \(model: \[40\]\)"):
        load_diffusers_wan(tmp_path)


def test_our_directory_with_missing_keys(model, tmp_path):
    model.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    del state["blocks.0.norm2.weight"]
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="missing key.*blocks.0.norm2.weight"):
        UniViGUTransformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, words", [
    ({"image_dim": 1280}, "image-conditioned (I2V"),
    ({"added_kv_proj_dim": 24}, "image-conditioned (I2V"),
    ({"pos_embed_seq_len": 514}, "FLF2V"),
    ({"window_size": [4, 4]}, "unknown WanTransformer3DModel config field(s) ['window_size']"),
    ({"_class_name": "AutoencoderKLWan"}, "not a diffusers WanTransformer3DModel"),
    ({"num_layers": "two"}, "config is invalid"),
])
def test_unsupported_diffusers_configs(model, tmp_path, change, words):
    export_diffusers(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_diffusers_wan(tmp_path)
    assert words in str(err.value)


def test_missing_config_json(model, tmp_path):
    export_diffusers(model, tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_diffusers_wan(tmp_path)


def test_diffusers_config_fills_out_channels_like_diffusers():
    cfg = config_from_diffusers({"in_channels": 36, "out_channels": None, "num_layers": 1})
    assert cfg.out_channels == 36 and cfg.vocab_size == 0


# ------------------------------------------------------------------ original Wan format
def test_original_names_follow_the_wan_layout(model):
    original = to_original_keys(model.state_dict())
    expected_some = {"patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.bias",
                     "time_embedding.0.weight", "time_projection.1.weight", "head.head.weight", "head.modulation",
                     "blocks.0.modulation", "blocks.0.self_attn.q.weight", "blocks.0.self_attn.o.bias",
                     "blocks.0.self_attn.norm_k.weight", "blocks.1.cross_attn.v.weight", "blocks.0.norm3.weight",
                     "blocks.0.norm3.bias", "blocks.0.ffn.0.weight", "blocks.1.ffn.2.bias"}
    assert expected_some <= original.keys()
    assert len(original) == len(model.state_dict())
    back = from_original_keys(original)
    assert back.keys() == model.state_dict().keys()


def test_original_directory_with_original_config(model, tmp_path):
    """The Wan-AI original layout: original keys in safetensors + a WanModel config.json."""
    export_original(model, tmp_path / "diffusion_pytorch_model.safetensors")
    cfg = model.config
    (tmp_path / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v", "text_len": 512,
        "dim": cfg.inner_dim, "num_heads": cfg.num_attention_heads, "in_dim": cfg.in_channels,
        "out_dim": cfg.out_channels, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "text_dim": cfg.text_dim,
        "num_layers": cfg.num_layers, "eps": cfg.eps}))
    assert_same_weights(load_original_wan(tmp_path), model)
    assert_same_weights(load_wan(tmp_path), model)


def test_wrapped_original_state_dict_and_no_aliasing(model):
    original = {f"model.diffusion_model.{k}": v for k, v in to_original_keys(model.state_dict()).items()}
    loaded = load_original_wan(original, model.config)
    assert_same_weights(loaded, model)
    with torch.no_grad():
        loaded.proj_out.weight.add_(1.0)
    assert not torch.equal(loaded.proj_out.weight, model.proj_out.weight)  # caller's tensors untouched


def test_pth_is_loaded_only_as_weights(model, tmp_path):
    path = tmp_path / "wan.pth"
    torch.save({"state_dict": to_original_keys(model.state_dict())}, path)  # nested, as trainers save
    assert_same_weights(load_original_wan(path, model.config), model)
    torch.save({"weights": to_original_keys(model.state_dict()), "hook": _NotATensor()}, path)
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        load_original_wan(path, model.config)


class _NotATensor:
    """A pickled object that torch.load(weights_only=True) must refuse to build."""


@pytest.mark.parametrize("extra, words", [
    ({"img_emb.proj.0.weight": torch.zeros(2)}, "image-conditioned (I2V/FLF2V)"),
    ({"blocks.0.cross_attn.k_img.weight": torch.zeros(2)}, "image-conditioned (I2V/FLF2V)"),
    ({"vace_blocks.0.before_proj.weight": torch.zeros(2)}, "VACE"),
    ({"blocks.0.mystery.weight": torch.zeros(2)}, "cannot map 1 key(s) from the original Wan format: "
                                                  "blocks.0.mystery.weight"),
])
def test_bad_original_keys(model, extra, words):
    original = {**to_original_keys(model.state_dict()), **extra}
    with pytest.raises(CheckpointError) as err:
        load_original_wan(original, model.config)
    assert words in str(err.value)


def test_original_format_errors(model, tmp_path):
    original = to_original_keys(model.state_dict())
    del original["blocks.0.norm3.weight"]
    with pytest.raises(CheckpointError, match=r"missing key\(s\): blocks.0.norm2.weight"):
        load_original_wan(original, model.config)
    with pytest.raises(CheckpointError, match="pass config="):
        load_original_wan(to_original_keys(model.state_dict()))
    with pytest.raises(CheckpointError, match="already uses diffusers key names"):
        load_original_wan(model.state_dict(), model.config)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_original_wan(tmp_path / "missing.pth", model.config)
    with pytest.raises(CheckpointError, match="vocab_size=0"):
        load_original_wan(to_original_keys(model.state_dict()), tiny_config(vocab_size=5))
    with pytest.raises(CheckpointError, match="text-stream keys have no original Wan name"):
        to_original_keys({"text_stream.proj_out.weight": torch.zeros(1)})


@pytest.mark.parametrize("change, words", [
    ({"model_type": "i2v"}, "text-to-video Wan (t2v) only"),
    ({"window_size": [8, 8]}, "local-window attention"),
    ({"qk_norm": False}, "qk_norm=False"),
    ({"dim": 30, "num_heads": 4}, "not divisible"),
    ({"hidden": 3}, "unknown WanModel config field(s) ['hidden']"),
])
def test_unsupported_original_configs(change, words):
    with pytest.raises(CheckpointError) as err:
        config_from_original({"dim": 24, "num_heads": 2, **change})
    assert words in str(err.value)


def test_original_config_translation():
    cfg = config_from_original({"dim": 1536, "num_heads": 12, "ffn_dim": 8960, "num_layers": 30, "in_dim": 16,
                                "out_dim": 16, "model_type": "t2v", "text_len": 512})
    assert (cfg.num_attention_heads, cfg.attention_head_dim, cfg.ffn_dim, cfg.num_layers) == (12, 128, 8960, 30)
    assert (cfg.text_dim, cfg.freq_dim, tuple(cfg.patch_size), cfg.cross_attn_norm) == (4096, 256, (1, 2, 2), True)
