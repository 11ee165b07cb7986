"""Typed configs: dataclasses with YAML load/save, `a.b=value` overrides and validation.

Every part of univigu is configured by one of the dataclasses below. `load_config` reads YAML,
applies overrides and checks every key and type, so a typo fails at start-up with one line that
names the key instead of deep inside a run.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .atomic import atomic_write_text


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or an invalid value."""


# --------------------------------------------------------------------------------------------
# Component configs
# --------------------------------------------------------------------------------------------


@dataclass
class WorldConfig:
    """ShapesWorld: procedural captioned videos with known ground truth."""

    width: int = 32
    height: int = 32
    frames: int = 9  # 4n+1 like Wan
    fps: int = 8
    min_objects: int = 1
    max_objects: int = 1
    # Fraction of (shape, colour) combinations held out of training for the held-out split.
    holdout_fraction: float = 0.0


@dataclass
class TransformerConfig:
    """The unified transformer. Video fields use diffusers' `WanTransformer3DModel` names."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 2
    attention_head_dim: int = 64
    in_channels: int = 48
    out_channels: int = 48
    text_dim: int = 384  # width of the prompt embedding (UMT5: 4096, MiniLM: 384)
    freq_dim: int = 256
    ffn_dim: int = 512
    num_layers: int = 4
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    # Text stream (vocab_size 0 = video-only backbone).
    vocab_size: int = 0
    mask_token: bool = True  # one extra id `vocab_size` for the mask source
    text_length: int = 32  # canvas length L
    text_ffn_dim: int | None = None  # None = ffn_dim
    text_rope: Literal["interleaved", "rotate_half", "none"] = "interleaved"
    text_rope_theta: float = 10000.0
    text_norm_eps: float = 1e-5
    # A learned absolute position embedding for text tokens (ours; the published model has none).
    # It lets an all-[MASK] canvas tell its positions apart from the first layer on.
    text_position_embedding: bool = True
    attention_policy: Literal["full", "clean_isolated"] = "clean_isolated"
    # A learned per-head, per-block logit bias that video queries add to text keys in the joint
    # self-attention, starting at this value (ours; None = no bias, as in the published model).
    # New text tokens dilute the pretrained video's attention (a model grown from the shipped
    # generator lost most of its T2V accuracy before any training; docs/EXPERIMENTS.md). A large
    # negative start hides them, so the prior is kept, and training can open the path.
    text_key_bias: float | None = None
    # Text tokens form their attention queries (self- and cross-attention) with their own linear
    # projections, copies of the shared `to_q` at unification (ours; the published model shares
    # them). Frozen shared queries left a text token's attention over the video and the prompt near
    # uniform (docs/EXPERIMENTS.md). Keys, values and the video's queries stay shared: the model starts
    # as the one without them, and a video with no text computes what the generator did.
    text_query_projection: bool = False
    # What the video head predicts. Wan predicts the velocity. "sample" predicts the clean latents
    # and converts them to a velocity, (x_t - x0_hat) / max(t, min_t): a denoiser whose token holds
    # more values than its width (pixel latents: 192 per token) cannot pass the noise through, but
    # the clean video lies on a low-dimensional set it can reach (Li & He 2025, "Back to Basics").
    video_prediction: Literal["velocity", "sample"] = "velocity"
    sample_prediction_min_t: float = 0.05

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclass
class CodecConfig:
    """Latent codec: pixels <-> latents."""

    kind: Literal["pixel_shuffle", "wan_vae"] = "pixel_shuffle"
    spatial_factor: int = 4
    temporal_factor: int = 1
    path: str | None = None  # local AutoencoderKLWan directory for kind=wan_vae
    normalize: bool = True  # Wan VAE: per-channel mean/std (False = the published raw latents)


@dataclass
class PromptEncoderConfig:
    """Prompt encoder: text -> condition embedding [B, Lc, D]."""

    kind: Literal["minilm", "umt5"] = "minilm"
    path: str | None = None  # local directory (UMT5; MiniLM defaults to the installed package)
    condition_length: int = 32  # Lc: embeddings are trimmed to real tokens and zero-padded to this
    null_condition: Literal["empty", "zeros"] = "empty"
    # MiniLM only: add this multiple of the input (word + position) embeddings to the last hidden
    # states. The last layer blurs lexical identity: cos(left, right) is 0.88 there, 0.50 at the input.
    lexical_weight: float = 0.0


@dataclass
class TokenizerConfig:
    """The text-stream tokenizer."""

    # auto: trimmed (a vocabulary of the training texts) on ShapesWorld; on a manifest of real videos
    # a subword tokenizer: UMT5's tokenizer.json when the prompt encoder is UMT5, else MiniLM's WordPiece.
    kind: Literal["auto", "trimmed", "minilm", "file"] = "auto"
    path: str | None = None  # tokenizer.json for kind=file


@dataclass
class FlowConfig:
    """Unified flow: noise-level sampling, the text path and the loss."""

    video_time_sampling: Literal["uniform", "logit_normal", "shifted"] = "logit_normal"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    train_shift: float = 1.0
    text_source: Literal["mask", "uniform"] = "mask"
    kappa_exponent: float = 1.0
    text_loss: Literal["cross_entropy", "generalized_kl"] = "cross_entropy"
    text_loss_weight: float = 1.0  # lambda in L = L_video + lambda * L_text


@dataclass
class SamplerConfig:
    """Sampling defaults stored with a pipeline."""

    video_steps: int = 20
    video_solver: Literal["euler", "heun", "dpmpp2m"] = "dpmpp2m"
    shift: float = 3.0
    guidance_scale: float = 3.0
    text_steps: int = 16
    text_sampler: Literal["euler", "confidence"] = "confidence"
    text_guidance_scale: float = 1.0
    temperature: float = 1.0
    # V2T draws this many captions per video (the first at `temperature`, the rest at temperature 1)
    # and keeps the one under which the model's own text-to-video flow loss is lowest (flow/verify.py).
    caption_candidates: int = 1
    verify_levels: tuple[float, ...] = (0.3, 0.5)  # noise levels of that loss


TASKS = ("t2v", "v2t", "joint")  # text-to-video, video-to-text, both from one prompt


@dataclass
class TaskMixture:
    """Per-sample task probabilities and dropout for guidance (DESIGN.md section 4)."""

    t2v: float = 1.0
    v2t: float = 0.0
    joint: float = 0.0
    joint_unconditional: float = 0.5  # share of joint samples with the null condition
    joint_tied: float = 0.5  # share of joint samples with one noise level for both modalities
    condition_dropout: float = 0.1
    video_dropout: float = 0.1  # V2T samples that drop the video (text guidance branch)


@dataclass
class LoraTrainConfig:
    """Low-rank adapters (peft's LoRA) on the diffusers-named linear layers; `rank` 0 = none.

    `targets`: one entry per parameter group, "GROUP:PATTERN,PATTERN,...", the patterns matched
    (fnmatch) against a linear layer's name inside its block, e.g. "shared:attn1.to_q,attn1.to_k",
    "video:ffn.*", "text:text_ffn.*". An adapted layer's own weights are frozen, whatever
    `train.trainable` says; the adapters train at `lr_scale` x `train.lr`."""

    rank: int = 0
    alpha: float | None = None  # None = rank (scale 1)
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["shared:attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0"])
    lr_scale: float = 1.0


@dataclass
class TrainConfig:
    stage: Literal["generator", "knowledge_recall", "capability_refinement"] = "generator"
    init_from: str | None = None  # previous stage's directory, or a Wan checkpoint directory
    output_dir: str = "runs/generator"
    manifest: str | None = None  # JSONL manifest; None = ShapesWorld generated on the fly
    num_train_videos: int = 20000
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup_steps: int = 100
    bf16: bool = True
    trainable: Literal["all", "text", "text_and_shared", "none"] = "all"  # none: only LoRA adapters train
    # Learning-rate multipliers for the pretrained video parts and the shared attention/modulation
    # (the new text parts get train.lr): keep the generator's prior while the text stream learns.
    lr_scale_video: float = 1.0
    lr_scale_shared: float = 1.0
    gradient_checkpointing: bool = False
    # torch.compile every transformer block (as torchtitan does): fuses the elementwise work around
    # the matrix products. Each new token layout (task) costs a compile (~20 s on a CPU) the first time.
    compile: bool = False
    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)
    mixture: TaskMixture = field(default_factory=TaskMixture)
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2
    eval_every: int = 0  # validation every N steps; 0 = only at the end
    eval_samples: int = 64  # held-out samples for the fixed-noise losses and the ShapesWorld oracle
    oracle_eval: bool = True  # ShapesWorld data: also sample T2V / V2T and score them with the oracle
    best_metric: str = "val.loss"  # kept in output_dir/best; *loss* = lower is better, else higher
    val_manifest: str | None = None  # held-out manifest for real data (ShapesWorld: its val split)
    sample_every: int = 0  # sample GIFs + captions into output_dir/samples every N steps; 0 = never
    num_samples: int = 4  # fixed prompts / videos per sample dump
    tensorboard: bool = True  # also write TensorBoard scalars when tensorboard is installed
    cache_dir: str | None = None  # latent / prompt-embedding cache; None = $UNIVIGU_CACHE_DIR or ~/.cache/univigu
    buckets: list[tuple[int, int, int]] = field(default_factory=list)  # [width, height, frames]; [] = world size
    # Manifest data: processes reading the cached latents and prompt embeddings of the next steps
    # ahead of the loop (a torch DataLoader); 0 = read in the loop. ShapesWorld is always in memory.
    loader_workers: int = 2
    # The most clips missing from the cache a run encodes itself (rank 0, while the others wait);
    # above it the run stops at once and names `univigu data cache`.
    inline_cache_limit: int = 512


@dataclass
class ExperimentConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    model: TransformerConfig = field(default_factory=TransformerConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    prompt_encoder: PromptEncoderConfig = field(default_factory=PromptEncoderConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------------------------
# Generic (de)serialisation with validation
# --------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict:
    """Dataclass -> plain dict (tuples become lists, so YAML and JSON stay plain)."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a type annotation, converting only where it is lossless."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return from_dict(annotation, value, prefix=key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"config key '{key}' has an invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"config key '{key}' must be one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}' must have {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__}")
        return [_coerce(v, args[0], key) for v in value] if args else list(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{key}' must be null, got {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or cls.__name__}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key '{where}{unknown[0]}' (known keys: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _parse_scalar(raw: str) -> Any:
    """YAML scalar parsing, plus the numbers YAML 1.1 leaves as strings ("1e-3")."""
    if not raw.strip():
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict, overrides: list[str], sections: dict | None = None) -> dict:
    """Apply `a.b=value` strings to a nested dict; values are parsed as YAML scalars. With
    `sections` (the defaults as a nested dict), an override that names a whole section
    (`train=5`) is refused with its own name."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.subkey=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}' must look like key.subkey=value")
        node, known = data, sections
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a config section")
            known = known.get(part) if isinstance(known, dict) else None
        if isinstance(known, dict) and isinstance(known.get(parts[-1]), dict):
            raise ConfigError(f"override '{item}': '{dotted.strip()}' must be a mapping (it is a config section: "
                              f"set one of its keys, e.g. {dotted.strip()}.{next(iter(known[parts[-1]]))}=...)")
        node[parts[-1]] = _parse_scalar(raw)
    return data


PRESETS_DIR = Path(__file__).parent / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_preset(path: str | Path) -> Path:
    """A YAML file path, or the name of a shipped preset (`univigu/presets/NAME.yaml`)."""
    path = Path(path)
    if path.is_file():
        return path
    preset = PRESETS_DIR / f"{path.stem}.yaml"
    if preset.is_file() and path.parent == Path("."):
        return preset
    raise ConfigError(f"config file not found: {path} (shipped presets: {', '.join(list_presets())})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type = ExperimentConfig) -> Any:
    """Load a YAML config (or the defaults when `path` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        data = _read_yaml(resolve_preset(path))
    defaults = to_dict(cls())
    data = apply_overrides(data, list(overrides or []), sections=defaults)
    # Round-trip through the defaults so partial files are completed.
    merged = _merge(defaults, data)
    cfg = from_dict(cls, merged)
    check_values(cfg)
    return cfg


# Ranges of the values that have one: (section, key) -> (lowest, highest or None). The learning-rate
# scales are checked where they are used (training/optim.py).
_RANGES = {
    ("world", "width"): (1, None), ("world", "height"): (1, None), ("world", "frames"): (1, None),
    ("world", "fps"): (1, None), ("world", "holdout_fraction"): (0, 1),
    ("train", "steps"): (1, None), ("train", "num_train_videos"): (1, None), ("train", "batch_size"): (1, None),
    ("train", "grad_accum"): (1, None), ("train", "warmup_steps"): (0, None), ("train", "min_lr_ratio"): (0, 1),
    ("train", "ema_decay"): (0, 1), ("train", "ema_warmup_steps"): (0, None), ("train", "weight_decay"): (0, None),
    ("train", "log_every"): (1, None), ("train", "save_every"): (0, None), ("train", "keep_last"): (1, None),
    ("train", "loader_workers"): (0, None), ("train", "inline_cache_limit"): (0, None),
    ("train", "eval_every"): (0, None), ("train", "eval_samples"): (0, None), ("train", "sample_every"): (0, None),
    ("train", "num_samples"): (0, None),
    ("sampler", "video_steps"): (1, None), ("sampler", "text_steps"): (1, None),
    ("sampler", "caption_candidates"): (1, None), ("sampler", "temperature"): (0, None),
}
_POSITIVE = {("train", "lr"), ("train", "grad_clip"), ("sampler", "shift")}


def check_values(cfg: Any) -> None:
    """Every number finite and every count, step and rate in its range, before any work; one
    ConfigError naming the key otherwise. Configs that are not an ExperimentConfig pass."""
    if not isinstance(cfg, ExperimentConfig):
        return
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for item in dataclasses.fields(values):
            key, value = (section.name, item.name), getattr(values, item.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = f"{section.name}.{item.name}"
            if not math.isfinite(value):
                raise ConfigError(f"config key '{name}' must be a finite number, got {value}")
            if key in _POSITIVE and value <= 0:
                raise ConfigError(f"config key '{name}' must be > 0, got {value}")
            if key in _RANGES:
                low, high = _RANGES[key]
                if value < low or (high is not None and value > high):
                    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
                    raise ConfigError(f"config key '{name}' must be {bound}, got {value}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML config; a top-level `base: NAME|FILE` is read first and this file's keys override it."""
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: its `base` chain loops back to it")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (world:, model:, train:, ...), "
                          f"got a {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(_read_yaml(resolve_preset(str(base)), (*seen, path.resolve())), data)
    return data


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
