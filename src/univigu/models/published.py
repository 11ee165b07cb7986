"""Load the published Uni-ViGU checkpoint into `UniViGUTransformer`.

The released weights are a PyTorch pickle (`.pth`) holding `{"model": state_dict, "step": ..., ...}`
with the module names of the released `WanUnifiedTransformer` (docs/PUBLISHED_CHECKPOINT.md). This
module reads it without executing pickle, strips FSDP / torch.compile prefixes, renames its keys to
ours, checks the saved text RoPE buffer against the config (ours has no such buffer), optionally
completes a partial checkpoint from a diffusers Wan base directory, and returns the model with the
settings the rest of univigu needs to reproduce the released behaviour:

* the published model's quirks are our config options: uniform text source (no mask id), the `full`
  attention policy, 1D text RoPE in the rotate-half convention, text head LayerNorm eps 1e-5;
* raw (unnormalised) Wan-VAE latents and all-zero captioning conditions are pipeline settings,
  returned as config sections (`codec`, `prompt_encoder`, `flow`) to merge into an ExperimentConfig.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config import ConfigError, TransformerConfig, from_dict, to_dict
from .convert import build_from_state_dict, read_diffusers_wan
from .weights import CheckpointError, load_state_dict_from_dir
from .transformer import UniViGUTransformer

#: Wrapper prefixes that FSDP and torch.compile insert into parameter names.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_orig_mod.")
#: Wan2.1's head width; used to infer the head count when neither a base config nor the text
#: RoPE buffer says otherwise.
WAN_HEAD_DIM = 128
#: The one buffer the released model saves: its text RoPE's frequencies 1 / theta^(2i/d) over the
#: head dim d. Ours computes them from the config, so the buffer is checked and read for d and theta.
TEXT_ROPE_BUFFER = "rotary_emb_text.inv_freq"
#: The released text RoPE's base.
TEXT_ROPE_THETA = 10000.0

# Published top-level names -> ours (prefix rules); blocks are handled by `_BLOCK_RE`.
_PREFIX_MAP = (
    ("vocab_embed.", "text_stream.token_embedding."),
    ("patch_embedding.", "patch_embedding."),
    ("time_embedding_v.time_embedder.", "condition_embedder.time_embedder."),
    ("time_embedding_v.time_proj.", "condition_embedder.time_proj."),
    ("time_embedding_t.time_embedder.", "text_stream.time_embedder."),
    ("time_embedding_t.time_proj.", "text_stream.time_proj."),
    ("cond_text_embedder.", "condition_embedder.text_embedder."),
    ("video_head.norm_out.", "norm_out."),
    ("video_head.proj_out.", "proj_out."),
    ("text_head.norm_final.", "text_stream.norm_out."),
    ("text_head.linear.", "text_stream.proj_out."),
)
_EXACT_MAP = {"scale_shift_table_v": "scale_shift_table", "scale_shift_table_t": "text_stream.scale_shift_table"}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Text parts that the published code initialised as deep copies of Wan's modules: a delta that
# omits them (never trained) is completed from the Wan base.
_TEXT_COPIES = (
    ("text_stream.time_embedder.", "condition_embedder.time_embedder."),
    ("text_stream.time_proj.", "condition_embedder.time_proj."),
    ("text_stream.scale_shift_table", "scale_shift_table"),
)
_VIDEO_FFN_RE = re.compile(r"^(blocks\.\d+\.)ffn\.(.+)$")

_CONVERT_HINT = (
    "To use such a file, convert it once in an environment where you trust it, e.g.\n"
    "  python -c \"import torch, safetensors.torch as st; "
    "ck = torch.load('CKPT.pth', map_location='cpu', weights_only=False); "
    "st.save_file({k: v.contiguous() for k, v in ck['model'].items()}, 'CKPT.safetensors')\"\n"
    "and pass the .safetensors file instead.")


class PublishedCheckpointError(CheckpointError):
    """The published checkpoint cannot be read safely, or does not fit the unified model."""


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _torch_load_safely(path: Path):
    """torch.load that never runs pickled code; refuses with conversion advice when it would have to."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unpickling failed"
        raise PublishedCheckpointError(
            f"refusing to load {path}: it needs code execution to unpickle (torch.load(weights_only=True) "
            f"accepts only tensors and plain containers; torch said: {first}).\n{_CONVERT_HINT}") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise PublishedCheckpointError(f"cannot read {path} as a PyTorch checkpoint: {err}") from None


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove every `_fsdp_wrapped_module.` / `_orig_mod.` from the keys (they may appear mid-key)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        clean = key
        for prefix in WRAPPER_PREFIXES:
            clean = clean.replace(prefix, "")
        if clean in out:
            raise PublishedCheckpointError(f"keys {key!r} and another one both become {clean!r} without prefixes")
        out[clean] = value
    return out


def read_published_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with published names and no wrapper prefixes, metadata such as {"step": ...}).

    Accepts the released `.pth` (`{"model": state_dict, ...}` or a bare state dict), a
    `.safetensors` file, or a directory of safetensors (sharded or not).
    """
    path = Path(path)
    metadata: dict = {}
    if path.is_dir():
        state = load_state_dict_from_dir(path)
    elif not path.is_file():
        raise PublishedCheckpointError(f"checkpoint {path} does not exist")
    elif path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise PublishedCheckpointError(f"cannot read {path}: {err}") from None
    else:
        obj = _torch_load_safely(path)
        if isinstance(obj, dict) and isinstance(obj.get("model"), Mapping):
            metadata = {k: v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
                        for k, v in obj.items() if k != "model"}
            metadata = {k: v for k, v in metadata.items() if isinstance(v, (int, float, str))}
            state = dict(obj["model"])
        else:
            state = obj
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        top = sorted(map(str, state))[:8] if isinstance(state, Mapping) else type(state).__name__
        raise PublishedCheckpointError(f"{path} holds no state dict of tensors (expected a dict with key "
                                       f"'model' or a flat name -> tensor dict; found {top})")
    return strip_wrapper_prefixes(state), metadata


# ---------------------------------------------------------------------------------------------
# Renaming
# ---------------------------------------------------------------------------------------------


def published_key_to_ours(key: str) -> str | None:
    """Our name for a published key, or None when the published model has no such parameter."""
    if key in _EXACT_MAP:
        return _EXACT_MAP[key]
    block = _BLOCK_RE.match(key)
    if block:
        index, rest = block.groups()
        if rest.startswith("ffn_t."):
            rest = "text_ffn." + rest[len("ffn_t."):]
        return f"blocks.{index}.{rest}"
    for theirs, ours in _PREFIX_MAP:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return None


def ours_key_to_published(key: str) -> str:
    """The published name of one of our keys (for messages)."""
    for theirs, ours in _EXACT_MAP.items():
        if key == ours:
            return theirs
    block = re.match(r"^blocks\.(\d+)\.text_ffn\.(.+)$", key)
    if block:
        return f"blocks.{block.group(1)}.ffn_t.{block.group(2)}"
    if key.startswith("blocks."):
        return key
    for theirs, ours in _PREFIX_MAP:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def rename_published(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state with our names, our name -> published name). Unknown names raise one clear error."""
    renamed, origin, unknown = {}, {}, []
    for key, value in state.items():
        ours = published_key_to_ours(key)
        if ours is None:
            unknown.append(key)
            continue
        renamed[ours], origin[ours] = value, key
    if unknown:
        raise PublishedCheckpointError(
            f"{len(unknown)} key(s) are not part of the published Uni-ViGU model: {sorted(unknown)[:5]}")
    return renamed, origin


# ---------------------------------------------------------------------------------------------
# Config and settings
# ---------------------------------------------------------------------------------------------


def _shape(state: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Size:
    if key not in state:
        raise PublishedCheckpointError(f"{source} lacks {key!r}, needed to infer the model size "
                                       "(pass wan_base_dir= if the checkpoint is a partial delta)")
    return state[key].shape


def text_rope_theta(inv_freq: torch.Tensor, head_dim: int, source: str = "checkpoint") -> float:
    """The base theta of a saved text RoPE buffer, checked to be `1 / theta^(2i/d)` over `head_dim`.

    The buffer may have been cast with the model (bf16), so it is compared at its own precision.
    """
    if inv_freq.ndim != 1 or 2 * inv_freq.numel() != head_dim:
        raise PublishedCheckpointError(
            f"{source}: {TEXT_ROPE_BUFFER} has shape {list(inv_freq.shape)}, but a text RoPE over the "
            f"model's head dim {head_dim} has [{head_dim // 2}] (check num_attention_heads)")
    freqs = inv_freq.double()
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    candidates = [TEXT_ROPE_THETA]
    if bool((freqs > 0).all()) and freqs.numel() > 1:
        # least squares through the origin: log f_i = -e_i log theta
        fitted = math.exp(-float((exponents * freqs.log()).sum() / exponents.square().sum()))
        candidates += [float(f"{fitted:.6g}"), fitted]
    rtol = 8 * torch.finfo(inv_freq.dtype).eps if inv_freq.is_floating_point() else 0.0
    for theta in candidates:
        expected = (1.0 / theta ** exponents).to(inv_freq.dtype).double()
        if torch.allclose(freqs, expected, rtol=rtol, atol=0.0):
            return theta
    raise PublishedCheckpointError(
        f"{source}: {TEXT_ROPE_BUFFER} is not 1 / theta^(2i/{head_dim}) for any theta (starts "
        f"{[round(v, 6) for v in freqs[:3].tolist()]}), so it is not the released text RoPE")


def published_config(state: Mapping[str, torch.Tensor], text_length: int, masked: bool = False,
                     video_config: TransformerConfig | None = None,
                     num_attention_heads: int | None = None, source: str = "checkpoint",
                     text_inv_freq: torch.Tensor | None = None) -> TransformerConfig:
    """Our TransformerConfig for a (renamed, complete) published state dict.

    Video fields come from `video_config` (the Wan base's config) when given, else from the tensor
    shapes (heads: `num_attention_heads`, else the head dim the text RoPE buffer `text_inv_freq`
    spans, else width / 128 as in Wan2.1). Text fields always come from the shapes, plus the
    published model's fixed choices; the RoPE base comes from the buffer when there is one.
    """
    embed_rows, dim = _shape(state, "text_stream.token_embedding.weight", source)
    vocab = embed_rows - int(masked)
    head_rows = _shape(state, "text_stream.proj_out.weight", source)[0]
    if vocab <= 0 or head_rows != embed_rows:
        kind = "mask source (masked=True)" if masked else "uniform source (masked=False)"
        raise PublishedCheckpointError(
            f"{source}: the token embedding has {embed_rows} rows and the text head {head_rows}; for a {kind} "
            f"both should be {vocab + int(masked)} -- check the `masked` option")
    if video_config is None:
        patch_weight = _shape(state, "patch_embedding.weight", source)
        patch = tuple(int(p) for p in patch_weight[2:])
        heads = num_attention_heads
        if heads is None and text_inv_freq is not None and text_inv_freq.numel() \
                and dim % (2 * text_inv_freq.numel()) == 0:
            heads = dim // (2 * text_inv_freq.numel())
        if heads is None:
            if dim % WAN_HEAD_DIM:
                raise PublishedCheckpointError(
                    f"{source}: width {dim} is not a multiple of Wan's head dim {WAN_HEAD_DIM}; "
                    "pass num_attention_heads=")
            heads = dim // WAN_HEAD_DIM
        if dim % heads:
            raise PublishedCheckpointError(f"{source}: width {dim} is not divisible by {heads} heads")
        layers = {int(m.group(1)) for m in map(_BLOCK_RE.match, state) if m}
        if not layers:
            raise PublishedCheckpointError(f"{source} has no transformer blocks")
        video = dict(
            patch_size=patch, num_attention_heads=heads, attention_head_dim=dim // heads,
            in_channels=int(patch_weight[1]),
            out_channels=_shape(state, "proj_out.weight", source)[0] // math.prod(patch),
            text_dim=_shape(state, "condition_embedder.text_embedder.linear_1.weight", source)[1],
            freq_dim=_shape(state, "condition_embedder.time_embedder.linear_1.weight", source)[1],
            ffn_dim=_shape(state, "blocks.0.ffn.net.0.proj.weight", source)[0],
            num_layers=max(layers) + 1, cross_attn_norm="blocks.0.norm2.weight" in state)
    else:
        video = {k: v for k, v in to_dict(video_config).items()
                 if k not in ("vocab_size", "mask_token", "text_length", "text_ffn_dim", "text_rope",
                              "text_rope_theta", "text_norm_eps", "attention_policy")}
    text_ffn = _shape(state, "blocks.0.text_ffn.net.0.proj.weight", source)[0]
    theta = TEXT_ROPE_THETA if text_inv_freq is None else \
        text_rope_theta(text_inv_freq, video["attention_head_dim"], source)
    data = {**to_dict(TransformerConfig()), **video,
            "vocab_size": vocab, "mask_token": masked, "text_length": text_length,
            "text_ffn_dim": None if text_ffn == video["ffn_dim"] else text_ffn,
            "text_rope": "rotate_half", "text_rope_theta": theta, "text_norm_eps": 1e-5,
            "attention_policy": "full", "text_position_embedding": False}
    try:
        return from_dict(TransformerConfig, data)
    except ConfigError as err:
        raise PublishedCheckpointError(f"{source}: inferred config is invalid: {err}") from None


def published_settings(masked: bool = False) -> dict:
    """Pipeline settings that reproduce the released behaviour, as ExperimentConfig sections."""
    return {
        "codec": {"kind": "wan_vae", "normalize": False},  # it fed raw VAE latents
        "prompt_encoder": {"kind": "umt5", "condition_length": 512, "null_condition": "zeros"},
        "flow": {"text_source": "mask" if masked else "uniform", "kappa_exponent": 1.0},
        # The released inference: Euler on a shift-3 grid with video guidance 5, and the discrete
        # Euler solver for text (the confidence sampler needs the mask source).
        "sampler": {"video_solver": "euler", "video_steps": 50, "shift": 3.0, "guidance_scale": 5.0,
                    "text_sampler": "euler", "text_steps": 50},
    }


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_published_univigu(checkpoint_path: str | Path, wan_base_dir: str | Path | None = None, *,
                           text_length: int = 256, masked: bool = False, num_attention_heads: int | None = None,
                           device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                           ) -> tuple[UniViGUTransformer, dict]:
    """Load the published Uni-ViGU weights as a `UniViGUTransformer`.

    Args:
        checkpoint_path: the released `.pth` (read with `torch.load(weights_only=True)` only), a
            `.safetensors` file or a safetensors directory.
        wan_base_dir: a diffusers `WanTransformer3DModel` directory (or a Wan pipeline directory
            with one in `transformer/`). When given, the checkpoint may be
            partial: keys it lacks come from the base (and text parts the released code created as
            copies of Wan's -- text FFNs, text timestep embedding, text output table -- from their Wan
            originals). When None, the checkpoint must be complete.
        text_length: the text canvas L (the released inference used 256 to 1024 tokens).
        masked: the checkpoint was trained with a mask source (one extra id); the released one was not.
        num_attention_heads: head count when there is no base config (default: the head dim the
            saved text RoPE buffer spans, else width / 128).

    Returns:
        (model, settings): `settings` holds `codec` / `prompt_encoder` / `flow` / `sampler` config
        sections for the pipeline and a `checkpoint` section (path, training step, which keys came
        from the base, whether the text RoPE buffer was there).
    """
    source = str(checkpoint_path)
    if not isinstance(text_length, int) or text_length <= 0:
        raise PublishedCheckpointError(f"text_length must be a positive integer, got {text_length!r}")
    published, metadata = read_published_checkpoint(checkpoint_path)
    inv_freq = published.pop(TEXT_ROPE_BUFFER, None)
    state, origin = rename_published(published)

    from_base: list[str] = []
    filled: list[str] = []
    video_config = None
    if wan_base_dir is not None:
        video_config, base = read_diffusers_wan(_transformer_dir(Path(wan_base_dir)))
        from_base = sorted(base.keys() - state.keys())
        state = {**{k: base[k] for k in from_base}, **state}
        filled = _fill_text_copies(state, base)

    config = published_config(state, text_length, masked, video_config, num_attention_heads, source, inv_freq)
    if masked:
        # Our head never predicts the mask id (DESIGN: its logit is -inf), so its row is dropped.
        for key in ("text_stream.proj_out.weight", "text_stream.proj_out.bias"):
            if key in state:
                state[key] = state[key][:-1]
    with torch.device("meta"):
        expected = UniViGUTransformer(config).state_dict()
    _check_keys(expected, state, origin, source, wan_base_dir is not None)
    model = build_from_state_dict(config, state, source, device, dtype)

    settings = published_settings(masked)
    settings["checkpoint"] = {"path": source, "step": metadata.get("step"), "from_base": from_base,
                              "filled_from_wan_copies": filled, "mask_logit_dropped": masked,
                              "text_rope_buffer": inv_freq is not None}
    return model, settings


def _transformer_dir(directory: Path) -> Path:
    """Accept a whole diffusers Wan pipeline directory as well as its `transformer/` folder."""
    if not (directory / "config.json").is_file() and (directory / "transformer" / "config.json").is_file():
        return directory / "transformer"
    return directory


def _fill_text_copies(state: dict[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> list[str]:
    """Add text parts the checkpoint lacks as clones of their Wan originals (the released init)."""
    filled = []
    wanted = {}
    for text_prefix, video_prefix in _TEXT_COPIES:
        for key in base:
            if key.startswith(video_prefix):
                wanted[text_prefix + key[len(video_prefix):]] = key
    for key in base:
        match = _VIDEO_FFN_RE.match(key)
        if match:
            wanted[f"{match.group(1)}text_ffn.{match.group(2)}"] = key
    for text_key, video_key in sorted(wanted.items()):
        if text_key not in state:
            state[text_key] = base[video_key].clone()  # a copy, never an alias of the video weight
            filled.append(text_key)
    return filled


def _check_keys(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                origin: Mapping[str, str], source: str, has_base: bool) -> None:
    """One error listing missing keys, unexpected keys and shape mismatches, in published names."""
    def name(key):
        return origin.get(key) or ours_key_to_published(key)

    missing = sorted(name(k) for k in expected.keys() - state.keys())
    unexpected = sorted(name(k) for k in state.keys() - expected.keys())
    shapes = [f"{name(k)} {list(state[k].shape)} (expected {list(v.shape)})"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        hint = "" if has_base else " (a partial checkpoint needs wan_base_dir=)"
        problems.append(f"{len(missing)} missing key(s){hint}: {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {unexpected[:5]}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {shapes[:5]}")
    if problems:
        raise PublishedCheckpointError(f"{source} does not fit the unified model: " + "; ".join(problems))
