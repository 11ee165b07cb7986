"""Configs: YAML round trip, overrides, presets, and one clear error per bad key or type."""

import pytest

from univigu.config import (ConfigError, ExperimentConfig, TransformerConfig, from_dict, list_presets,
                            load_config, save_config, to_dict)


def test_yaml_round_trip_keeps_every_value(tmp_path):
    cfg = load_config(None, ["model.num_layers=3", "train.betas=[0.8, 0.95]", "model.text_ffn_dim=100",
                             "world.width=48", "train.mixture.v2t=0.25"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert again.model.num_layers == 3 and again.train.betas == (0.8, 0.95)
    assert again.train.mixture.v2t == 0.25 and again.model.text_ffn_dim == 100


def test_exponent_notation_override_is_a_number():
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3


def test_partial_file_is_completed_with_defaults(tmp_path):
    (tmp_path / "p.yaml").write_text("model:\n  num_layers: 7\n")
    cfg = load_config(tmp_path / "p.yaml")
    assert cfg.model.num_layers == 7
    assert cfg.model.ffn_dim == TransformerConfig().ffn_dim


@pytest.mark.parametrize("override, fragment", [
    (["model.num_layer=3"], "unknown config key 'model.num_layer'"),
    (["nosection.x=1"], "unknown config key 'nosection'"),
    (["model.num_layers=three"], "'model.num_layers' must be an integer"),
    (["train.lr=fast"], "'train.lr' must be a number"),
    (["model.attention_policy=sometimes"], "'model.attention_policy' must be one of"),
    (["train.bf16=maybe"], "'train.bf16' must be true or false"),
    (["model.patch_size=[1, 2]"], "'model.patch_size' must have 3 items"),
    (["train.mixture=3"], "'train.mixture' must be a mapping"),
    (["no_equals_sign"], "must look like key.subkey=value"),
])
def test_bad_keys_and_types_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_shipped_presets_load_by_name():
    names = list_presets()
    assert {"shapesworld-generator", "shapesworld-unified", "tiny"} <= set(names)
    for name in names:
        assert isinstance(load_config(name), ExperimentConfig)


def test_int_is_accepted_where_a_float_is_expected():
    cfg = from_dict(TransformerConfig, {"eps": 1})
    assert cfg.eps == 1.0 and isinstance(cfg.eps, float)
    assert to_dict(cfg)["patch_size"] == [1, 2, 2]


def test_a_config_file_can_build_on_a_base(tmp_path):
    (tmp_path / "child.yaml").write_text("base: shapesworld-unified\ntrain: {lr: 0.5}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.train.lr == 0.5 and cfg.model.text_key_bias == load_config("shapesworld-unified").model.text_key_bias
    (tmp_path / "a.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
