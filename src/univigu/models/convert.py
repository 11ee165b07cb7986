"""Wan checkpoints <-> UniViGUTransformer.

Three formats meet here:

* **diffusers** `WanTransformer3DModel` directories (config.json + safetensors, sharded with an index
  or not). Our video keys *are* diffusers' keys, so loading only translates the config.
* **original Wan2.1** state dicts (`WanModel` key names, `.pth` or `.safetensors`), renamed on load
  with the map of diffusers' `scripts/convert_wan_to_diffusers.py` -- including the norm2/norm3 swap
  (original norm3 is the cross-attention norm, diffusers calls it norm2).
* our own `save_pretrained` directories (`UniViGUTransformer.from_pretrained`).

Weights are never unpickled: safetensors, or `torch.load(weights_only=True)` for `.pth`.
Only text-to-video Wan models are supported; image-conditioned variants (I2V / FLF2V CLIP image
embeddings, VACE) are refused with a message that says so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_file, atomic_write_text
from ..config import ConfigError, TransformerConfig, from_dict, to_dict
from .transformer import CONFIG_NAME, UniViGUTransformer
from .weights import (PICKLE_SUFFIXES, CheckpointError, check_state_dict, key_list, load_state_dict_from_dir,
                      save_state_dict_to_dir, torch_load_weights_only)

DIFFUSERS_CLASS_NAME = "WanTransformer3DModel"
ORIGINAL_CLASS_NAME = "WanModel"


# ---------------------------------------------------------------------------------------------
# Configs: diffusers WanTransformer3DModel / original WanModel <-> TransformerConfig
# ---------------------------------------------------------------------------------------------

# diffusers' __init__ defaults (the 14B model); a config.json may omit any of them.
DIFFUSERS_DEFAULTS = {
    "patch_size": (1, 2, 2), "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
    "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None,
}
_UNSUPPORTED_DIFFUSERS = {
    "image_dim": "an image-conditioned (I2V/FLF2V) model with a CLIP image embedder",
    "added_kv_proj_dim": "an image-conditioned (I2V/FLF2V) model with extra image key/value projections",
    "pos_embed_seq_len": "a first-last-frame (FLF2V) model with image position embeddings",
}
_VIDEO_FIELDS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                 "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps",
                 "rope_max_seq_len")


def config_from_diffusers(data: Mapping) -> TransformerConfig:
    """A diffusers `WanTransformer3DModel` config dict -> our (video-only) TransformerConfig."""
    data = dict(data)
    name = data.pop("_class_name", DIFFUSERS_CLASS_NAME)
    if name != DIFFUSERS_CLASS_NAME:
        raise CheckpointError(f"config is for {name!r}, not a diffusers {DIFFUSERS_CLASS_NAME}")
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    unknown = sorted(set(data) - set(DIFFUSERS_DEFAULTS))
    if unknown:
        raise CheckpointError(f"unknown {DIFFUSERS_CLASS_NAME} config field(s) {unknown}; this loader knows "
                              f"{sorted(DIFFUSERS_DEFAULTS)}")
    values = {**DIFFUSERS_DEFAULTS, **data}
    for key, what in _UNSUPPORTED_DIFFUSERS.items():
        if values[key] is not None:
            raise CheckpointError(f"{key}={values[key]} means {what}; univigu supports text-to-video Wan only")
    if values["out_channels"] is None:  # diffusers: out_channels = out_channels or in_channels
        values["out_channels"] = values["in_channels"]
    # diffusers builds the across-heads RMSNorm whatever qk_norm says; so do we.
    values["qk_norm"] = DIFFUSERS_DEFAULTS["qk_norm"]
    return _make_config({k: values[k] for k in _VIDEO_FIELDS})


def config_to_diffusers(config: TransformerConfig) -> dict:
    """The diffusers `WanTransformer3DModel` config.json for the video part of `config`."""
    ours = to_dict(config)
    data = {"_class_name": DIFFUSERS_CLASS_NAME, "_diffusers_version": _diffusers_version()}
    data.update({k: ours[k] for k in _VIDEO_FIELDS})
    data.update({"image_dim": None, "added_kv_proj_dim": None, "pos_embed_seq_len": None})
    return data


# original WanModel __init__ defaults (Wan2.1:wan/modules/model.py).
ORIGINAL_DEFAULTS = {
    "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 16, "dim": 2048, "ffn_dim": 8192,
    "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 16, "num_layers": 32, "window_size": (-1, -1),
    "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}


def config_from_original(data: Mapping) -> TransformerConfig:
    """An original Wan2.1/2.2 `WanModel` config dict (dim, num_heads, in_dim, ...) -> TransformerConfig."""
    data = {k: v for k, v in dict(data).items() if not k.startswith("_")}
    unknown = sorted(set(data) - set(ORIGINAL_DEFAULTS))
    if unknown:
        raise CheckpointError(f"unknown {ORIGINAL_CLASS_NAME} config field(s) {unknown}; this loader knows "
                              f"{sorted(ORIGINAL_DEFAULTS)}")
    v = {**ORIGINAL_DEFAULTS, **data}
    if v["model_type"] not in ("t2v", "ti2v"):
        raise CheckpointError(f"model_type={v['model_type']!r}: univigu supports text-to-video Wan (t2v) only")
    if tuple(v["window_size"]) != (-1, -1):
        raise CheckpointError(f"window_size={v['window_size']}: local-window attention is not supported")
    if not v["qk_norm"]:
        raise CheckpointError("qk_norm=False is not supported (diffusers' Wan always has QK RMSNorm)")
    if v["dim"] % v["num_heads"]:
        raise CheckpointError(f"dim={v['dim']} is not divisible by num_heads={v['num_heads']}")
    return _make_config({
        "patch_size": v["patch_size"], "num_attention_heads": v["num_heads"],
        "attention_head_dim": v["dim"] // v["num_heads"], "in_channels": v["in_dim"],
        "out_channels": v["out_dim"], "text_dim": v["text_dim"], "freq_dim": v["freq_dim"],
        "ffn_dim": v["ffn_dim"], "num_layers": v["num_layers"], "cross_attn_norm": v["cross_attn_norm"],
        "eps": v["eps"],
    })


def _make_config(fields: dict) -> TransformerConfig:
    try:
        return from_dict(TransformerConfig, {**to_dict(TransformerConfig()), **fields, "vocab_size": 0})
    except ConfigError as err:
        raise CheckpointError(f"checkpoint config is invalid: {err}") from None


def _diffusers_version() -> str:
    try:
        import diffusers

        return diffusers.__version__
    except ImportError:  # diffusers is optional for writing; the field is informational
        return "0.33.0"


# ---------------------------------------------------------------------------------------------
# Key names: original Wan <-> diffusers (= ours)
# ---------------------------------------------------------------------------------------------

# (original, diffusers) templates; {n} = block index, {p} = weight | bias. One source of truth for
# both directions. The norm pair encodes the swap: original norm3 (cross-attention, affine) is
# diffusers' norm2; original norm2 (FFN, no parameters) would be norm3.
_KEY_TEMPLATES = [
    ("patch_embedding.{p}", "patch_embedding.{p}"),
    ("text_embedding.0.{p}", "condition_embedder.text_embedder.linear_1.{p}"),
    ("text_embedding.2.{p}", "condition_embedder.text_embedder.linear_2.{p}"),
    ("time_embedding.0.{p}", "condition_embedder.time_embedder.linear_1.{p}"),
    ("time_embedding.2.{p}", "condition_embedder.time_embedder.linear_2.{p}"),
    ("time_projection.1.{p}", "condition_embedder.time_proj.{p}"),
    ("head.modulation", "scale_shift_table"),
    ("head.head.{p}", "proj_out.{p}"),
    ("blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),
    ("blocks.{n}.norm3.{p}", "blocks.{n}.norm2.{p}"),
    ("blocks.{n}.norm2.{p}", "blocks.{n}.norm3.{p}"),
    ("blocks.{n}.ffn.0.{p}", "blocks.{n}.ffn.net.0.proj.{p}"),
    ("blocks.{n}.ffn.2.{p}", "blocks.{n}.ffn.net.2.{p}"),
]
for _orig, _ours in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    _KEY_TEMPLATES += [
        (f"blocks.{{n}}.{_orig}.q.{{p}}", f"blocks.{{n}}.{_ours}.to_q.{{p}}"),
        (f"blocks.{{n}}.{_orig}.k.{{p}}", f"blocks.{{n}}.{_ours}.to_k.{{p}}"),
        (f"blocks.{{n}}.{_orig}.v.{{p}}", f"blocks.{{n}}.{_ours}.to_v.{{p}}"),
        (f"blocks.{{n}}.{_orig}.o.{{p}}", f"blocks.{{n}}.{_ours}.to_out.0.{{p}}"),
        (f"blocks.{{n}}.{_orig}.norm_q.weight", f"blocks.{{n}}.{_ours}.norm_q.weight"),
        (f"blocks.{{n}}.{_orig}.norm_k.weight", f"blocks.{{n}}.{_ours}.norm_k.weight"),
    ]


def _template_re(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern)


_ORIGINAL_TO_OURS = [(_template_re(o), d) for o, d in _KEY_TEMPLATES]
_OURS_TO_ORIGINAL = [(_template_re(d), o) for o, d in _KEY_TEMPLATES]
# Original keys of model kinds we refuse, with the reason.
_UNSUPPORTED_ORIGINAL = [
    (re.compile(r"(^|\.)img_emb\.|\.(k_img|v_img|norm_k_img)\."), "an image-conditioned (I2V/FLF2V) model"),
    (re.compile(r"(^|\.)(vace_blocks|vace_patch_embedding|before_proj|after_proj)"), "a VACE model"),
]
_WRAPPER_PREFIXES = ("model.diffusion_model.", "module.", "_orig_mod.")


def _rename(state: Mapping[str, torch.Tensor], table, direction: str) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, value in state.items():
        for pattern, template in table:
            match = pattern.fullmatch(key)
            if match:
                out[template.format(**match.groupdict())] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"cannot map {len(unknown)} key(s) {direction}: {key_list(unknown)}")
    return out


def from_original_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original Wan2.1 `WanModel` state dict to diffusers' (= our) key names."""
    state = dict(state)
    for prefix in _WRAPPER_PREFIXES:  # ComfyUI / DDP / torch.compile wrappers
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    for pattern, what in _UNSUPPORTED_ORIGINAL:
        hits = [k for k in state if pattern.search(k)]
        if hits:
            raise CheckpointError(f"keys {key_list(hits, 3)} belong to {what}; univigu supports text-to-video Wan only")
    if any(k.startswith(("condition_embedder.", "blocks.0.attn1.")) for k in state):
        raise CheckpointError("this state dict already uses diffusers key names; use load_diffusers_wan "
                              "(or UniViGUTransformer.load_state_dict) instead of the original-format loader")
    return _rename(state, _ORIGINAL_TO_OURS, "from the original Wan format")


def to_original_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename our (diffusers-named) video keys to original Wan2.1 names. Text-stream keys have no
    original counterpart and are refused."""
    text = [k for k in state if k.startswith("text_stream.") or ".text_ffn." in k]
    if text:
        raise CheckpointError(f"text-stream keys have no original Wan name: {key_list(text, 3)}; "
                              "pass only the video part")
    return _rename(state, _OURS_TO_ORIGINAL, "to the original Wan format")


# ---------------------------------------------------------------------------------------------
# Building models from state dicts
# ---------------------------------------------------------------------------------------------


def build_from_state_dict(config: TransformerConfig, state: Mapping[str, torch.Tensor], source: str,
                          device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                          copy: bool = False) -> UniViGUTransformer:
    """Create the model without initialising weights (meta device) and adopt `state` (strict)."""
    with torch.device("meta"):
        model = UniViGUTransformer(config)
    check_state_dict(model, state, source)
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype, copy=copy)
             for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"no {path.name} in {path.parent}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


def read_diffusers_wan(directory: str | Path) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """(config, state dict with our key names) of a diffusers WanTransformer3DModel directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config = config_from_diffusers(_read_json(directory / CONFIG_NAME))
    return config, load_state_dict_from_dir(directory)


def load_diffusers_wan(directory: str | Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> UniViGUTransformer:
    """Load a diffusers `WanTransformer3DModel` directory as our video backbone (vocab_size=0)."""
    config, state = read_diffusers_wan(directory)
    return build_from_state_dict(config, state, str(directory), device, dtype)


def read_original_wan(source: Mapping[str, torch.Tensor] | str | Path,
                      config: TransformerConfig | Mapping | None = None
                      ) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """(config, state dict with our key names) of an original-format Wan checkpoint.

    `source` is a state dict, a `.pth`/`.pt`/`.safetensors` file, or a directory with safetensors
    and the original `WanModel` config.json. `config` is our TransformerConfig or an original
    `WanModel` config dict; it may be omitted for a directory with a config.json.
    """
    copy = False
    if isinstance(source, Mapping):
        state, copy = dict(source), True
    else:
        path = Path(source)
        if path.is_dir():
            state = load_state_dict_from_dir(path)
            if config is None:
                config = _read_json(path / CONFIG_NAME)
        elif not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        elif path.suffix == ".safetensors":
            try:
                state = load_file(str(path))
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"cannot read {path}: {err}") from None
        elif path.suffix in PICKLE_SUFFIXES:
            state = torch_load_weights_only(path)
        else:
            raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r} (use .safetensors or .pth)")
    if config is None:
        raise CheckpointError("an original-format state dict carries no config: pass config= (a TransformerConfig "
                              "or the original WanModel config dict)")
    if isinstance(config, Mapping):
        config = config_from_original(config)
    if config.vocab_size:
        raise CheckpointError("a Wan checkpoint holds only the video backbone: use a config with vocab_size=0")
    state = from_original_keys(state)
    if copy:  # do not let the model alias the caller's tensors
        state = {k: v.clone() for k, v in state.items()}
    return config, state


def load_original_wan(source: Mapping[str, torch.Tensor] | str | Path,
                      config: TransformerConfig | Mapping | None = None,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> UniViGUTransformer:
    """Load an original-format Wan2.1 checkpoint (see `read_original_wan`) as our video backbone."""
    config, state = read_original_wan(source, config)
    name = source if not isinstance(source, Mapping) else "state dict"
    return build_from_state_dict(config, state, str(name), device, dtype)


def load_wan(source: str | Path, config: TransformerConfig | Mapping | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> UniViGUTransformer:
    """Load any supported Wan checkpoint: a diffusers directory, an original-format directory or
    file, or a univigu `save_pretrained` directory (told apart by config.json's `_class_name`)."""
    path = Path(source)
    if path.is_dir():
        name = _read_json(path / CONFIG_NAME).get("_class_name")
        if name == DIFFUSERS_CLASS_NAME:
            return load_diffusers_wan(path, device, dtype)
        if name == "UniViGUTransformer":
            return UniViGUTransformer.from_pretrained(path, device=device).to(dtype)
    return load_original_wan(path, config, device, dtype)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def video_state_dict(model: UniViGUTransformer) -> dict[str, torch.Tensor]:
    """The video part of the model's state dict (diffusers names), without the text stream."""
    return {k: v for k, v in model.state_dict().items() if model.parameter_group(k) != "text"}


def export_diffusers(model: UniViGUTransformer, directory: str | Path, dtype: torch.dtype | None = None,
                     max_shard_size: int | str | None = "10GB") -> Path:
    """Write the video part of `model` as a diffusers `WanTransformer3DModel` directory
    (config.json + safetensors, sharded above `max_shard_size`) that
    `WanTransformer3DModel.from_pretrained(directory)` loads."""
    directory = Path(directory)
    state = video_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_state_dict_to_dir(state, directory, max_shard_size)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config_to_diffusers(model.config), indent=2))
    return directory


def export_original(model: UniViGUTransformer, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the video part of `model` with original Wan2.1 key names to one `.safetensors` file."""
    state = to_original_keys(video_state_dict(model))
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in state.items()}
    path = Path(path)
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return path
