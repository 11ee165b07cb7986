"""LoRA adapters through peft on the diffusers-named linear layers of a univigu model.

An adapter is peft's `LoraConfig` injected with `inject_adapter_in_model`: an adapted layer
`blocks.0.attn1.to_q` becomes peft's `lora.Linear` (`base_layer`, `lora_A.<name>`, `lora_B.<name>`),
so the forward, merging and state-dict keys are peft's own. On disk an adapter is peft's format,
a folder with `adapter_config.json` (its `base_model_name_or_path` names the base model) and
`adapter_model.safetensors` (keys `base_model.model.blocks.0.attn1.to_q.lora_A.weight`, as
`PeftModel.save_pretrained` writes them); when parameter groups
trained fully beside the adapters, their weights are in `full_weights.safetensors` next to them.

`load_adapter` also reads the LoRA files others write for Wan, applied to the video and shared
parts of a unified model as to a video-only one:

* diffusers' (`WanLoraLoaderMixin.save_lora_weights`): peft keys with a `transformer.` prefix;
* original Wan key names (`blocks.0.self_attn.q.lora_A.weight`, DiffSynth-Studio's, optionally
  `diffusion_model.`-prefixed, `lora_down` / `lora_up` and `.alpha` entries as kohya writes them),
  renamed through the original-key converter (`convert.from_original_keys`).
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_file, atomic_write_text
from .convert import from_original_keys
from .weights import CheckpointError, key_list

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_WEIGHTS = "full_weights.safetensors"
GROUPS = ("video", "shared", "text")
PEFT_PREFIX = "base_model.model."  # PeftModel's wrapper around the base model
_BLOCK_RE = re.compile(r"^blocks\.\d+\.")


class LoraError(CheckpointError):
    """A LoRA setting or file that does not fit the model."""


def _peft():
    try:
        import peft
    except ImportError:  # pragma: no cover - peft is a dependency
        raise LoraError("LoRA needs peft: pip install peft") from None
    return peft


def parse_targets(targets: Iterable[str]) -> dict[str, list[str]]:
    """["shared:attn1.to_q,attn1.to_k", "video:ffn.*"] -> {"shared": [...], "video": [...]}."""
    out: dict[str, list[str]] = {}
    for entry in targets:
        group, sep, patterns = str(entry).partition(":")
        group = group.strip()
        if not sep or group not in GROUPS:
            raise LoraError(f"LoRA target {entry!r} is not GROUP:PATTERN[,PATTERN...] with GROUP one of "
                            f"{', '.join(GROUPS)}")
        names = [p.strip() for p in patterns.split(",") if p.strip()]
        if not names:
            raise LoraError(f"LoRA target {entry!r} names no layer pattern")
        out.setdefault(group, []).extend(names)
    return out


def target_modules(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Full names of the linear layers the targets select: a layer of group G matches when its name
    inside its block (`attn1.to_q`, `ffn.net.0.proj`; the whole name outside the blocks) fits one of
    G's patterns."""
    wanted = parse_targets(targets)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        patterns = wanted.get(model.parameter_group(f"{name}.weight"), [])
        local = _BLOCK_RE.sub("", name)
        if any(fnmatch.fnmatchcase(local, p) for p in patterns):
            found.append(name)
    if not found:
        raise LoraError(f"LoRA targets {list(targets)} match no linear layer of this model")
    return found


def make_config(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
                targets: Iterable[str] = ()):
    """peft's `LoraConfig` for `model`: rank, alpha (None = rank), dropout, explicit target names."""
    if rank < 1:
        raise LoraError(f"LoRA rank must be at least 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise LoraError(f"LoRA dropout must lie in [0, 1), got {dropout}")
    return _peft().LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                              lora_dropout=float(dropout), target_modules=target_modules(model, targets))


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_names(model: nn.Module) -> list[str]:
    return list(getattr(model, "peft_config", {}) or {})


def add_adapter(model: nn.Module, config, adapter_name: str = "default", train: bool = False) -> nn.Module:
    """Inject adapter `adapter_name` (in place). peft marks only adapters trainable; here the rest
    keeps its `requires_grad`, except the adapted layers' own weights (frozen), and the new adapter
    trains when `train`."""
    if adapter_name in adapter_names(model):
        raise LoraError(f"the model already has an adapter named {adapter_name!r}")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    _peft().inject_adapter_in_model(config, model, adapter_name=adapter_name)
    for name, param in model.named_parameters():
        if is_lora_parameter(name):
            mine = f".{adapter_name}." in name
            param.requires_grad_(train if mine else before.get(name, False))
        elif ".base_layer." in name:
            param.requires_grad_(False)
        else:
            param.requires_grad_(before.get(name, False))
    return model


def adapter_state_dict(model: nn.Module, adapter_name: str = "default",
                       state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors in peft's saved form (`...lora_A.weight`, no adapter name); from
    `state` (a full state dict of the model, e.g. EMA weights) when given."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous().cpu()
            for k, v in get_peft_model_state_dict(model, state_dict=state, adapter_name=adapter_name).items()}


def save_adapter(directory: str | Path, model: nn.Module, adapter_name: str = "default",
                 base: str | Path | None = None, state: Mapping[str, torch.Tensor] | None = None,
                 full_weights: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write adapter `adapter_name` in peft's format into `directory`; `base` is the base model's
    reference (`base_model_name_or_path`), `full_weights` the fully trained tensors (plain names)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[adapter_name].to_dict()
    config["base_model_name_or_path"] = None if base is None else str(base)
    config["target_modules"] = sorted(config["target_modules"])
    # Keys as peft's own PeftModel.save_pretrained writes them for this model (its wrapper prefix),
    # so PeftModel.from_pretrained(base, directory) loads them.
    tensors = {PEFT_PREFIX + k: v for k, v in adapter_state_dict(model, adapter_name, state).items()}
    with atomic_file(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    if full_weights:
        with atomic_file(directory / FULL_WEIGHTS) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in full_weights.items()}, str(tmp))
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(config, indent=2, default=sorted))
    return directory


# ---------------------------------------------------------------------------------------------
# Reading adapters: ours (peft), diffusers', original key names
# ---------------------------------------------------------------------------------------------

_LORA_KEY_RE = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(\.default)?\.weight$")
_ALPHA_KEY_RE = re.compile(r"^(?P<module>.+?)\.alpha$")
_ORIGINAL_PREFIXES = ("diffusion_model.", "model.diffusion_model.", PEFT_PREFIX)


def _adapter_file(path: Path) -> tuple[Path, Path | None]:
    """(weights file, adapter_config.json or None) of a folder or file."""
    if path.is_dir():
        for name in (ADAPTER_WEIGHTS, "pytorch_lora_weights.safetensors"):
            if (path / name).is_file():
                config = path / ADAPTER_CONFIG
                return path / name, config if config.is_file() else None
        found = sorted(path.glob("*.safetensors"))
        found = [f for f in found if f.name != FULL_WEIGHTS]
        if len(found) != 1:
            raise LoraError(f"{path} holds no {ADAPTER_WEIGHTS} (nor one other .safetensors file)")
        return found[0], None
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: LoRA weights are read from .safetensors files only")
    if not path.is_file():
        raise LoraError(f"LoRA not found: {path}")
    return path, None


def _module_names_from_original(modules: set[str]) -> dict[str, str]:
    """Original Wan module paths -> ours, through the weight-key converter (one key at a time, so
    each new name is known to come from its old one)."""
    names = {}
    for old in modules:
        (new,) = from_original_keys({f"{old}.weight": torch.empty(0)})
        names[old] = new[: -len(".weight")]
    return names


def normalize_lora_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Any supported LoRA layout -> (peft's saved keys on our module names, alpha per module when the
    file gives one)."""
    state = dict(state)
    prefixed = [k for k in state if k.startswith("transformer.")]
    if prefixed:
        others = [k for k in state if not k.startswith("transformer.")]
        if others:
            raise LoraError(f"this LoRA also adapts other components ({key_list(others, 3)}); only the "
                            "transformer's can be applied")
        state = {k[len("transformer."):]: v for k, v in state.items()}
    for prefix in _ORIGINAL_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    tensors: dict[tuple[str, str], torch.Tensor] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, value in state.items():
        match = _LORA_KEY_RE.match(key)
        if match:
            kind = {"lora_down": "lora_A", "lora_up": "lora_B"}.get(match["kind"], match["kind"])
            tensors[(match["module"], kind)] = value
            continue
        match = _ALPHA_KEY_RE.match(key)
        if match:
            alphas[match["module"]] = float(value)
            continue
        unknown.append(key)
    if unknown:
        raise LoraError(f"{len(unknown)} key(s) are not LoRA weights: {key_list(unknown, 3)}")
    if not tensors:
        raise LoraError("the file holds no LoRA weights")
    modules = {m for m, _ in tensors}
    original = any(re.search(r"\.(self_attn|cross_attn)\.[qkvo]$|\.ffn\.[02]$", m) for m in modules)
    if original:
        names = _module_names_from_original(modules)
        tensors = {(names[m], kind): v for (m, kind), v in tensors.items()}
        alphas = {names.get(m, m): a for m, a in alphas.items()}
    incomplete = sorted(m for m, _ in tensors if (m, "lora_A") not in tensors or (m, "lora_B") not in tensors)
    if incomplete:
        raise LoraError(f"LoRA weights without their pair (lora_A / lora_B): {key_list(incomplete, 3)}")
    return {f"{m}.{kind}.weight": v for (m, kind), v in tensors.items()}, alphas


def _config_from_weights(state: dict[str, torch.Tensor], alphas: dict[str, float], metadata: dict | None):
    """A LoraConfig for weights without adapter_config.json: diffusers' metadata when the file has
    it, else ranks from lora_A's shape and alpha from the file's `.alpha` entries (else the rank,
    as diffusers assumes too)."""
    peft = _peft()
    if metadata:  # diffusers' lora_adapter_metadata: the LoraConfig, its keys under "transformer."
        config = {k.removeprefix("transformer."): v for k, v in metadata.items()
                  if not k.startswith(("text_encoder", "unet."))}
        config.pop("peft_type", None)
        config["target_modules"] = sorted({k.rsplit(".lora_", 1)[0] for k in state})
        return peft.LoraConfig(**{k: v for k, v in config.items() if k in peft.LoraConfig.__dataclass_fields__})
    ranks = {k[: -len(".lora_A.weight")]: v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight")}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha_of = {m: alphas.get(m, float(r)) for m, r in ranks.items()}
    common_alpha = max(set(alpha_of.values()), key=list(alpha_of.values()).count)
    return peft.LoraConfig(r=int(rank), lora_alpha=common_alpha, target_modules=sorted(ranks),
                           rank_pattern={f"^{re.escape(m)}$": int(r) for m, r in ranks.items() if r != rank},
                           alpha_pattern={f"^{re.escape(m)}$": a for m, a in alpha_of.items() if a != common_alpha})


def read_adapter(path: str | Path) -> tuple[object, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LoraConfig, peft-keyed adapter tensors, full weights) of a LoRA folder or file."""
    peft = _peft()
    path = Path(path)
    weights, config_file = _adapter_file(path)
    try:
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
        raw = load_file(str(weights))
    except Exception as err:  # safetensors raises several kinds
        raise LoraError(f"{weights} is not a readable safetensors file: {err}") from None
    state, alphas = normalize_lora_state(raw)
    if config_file is not None:
        config = peft.LoraConfig.from_pretrained(str(config_file.parent))
    else:
        metadata = meta.get("lora_adapter_metadata")
        config = _config_from_weights(state, alphas, json.loads(metadata) if metadata else None)
    full = {}
    full_file = weights.parent / FULL_WEIGHTS if path.is_dir() else None
    if full_file is not None and full_file.is_file():
        full = load_file(str(full_file))
    return config, state, full


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default", scale: float = 1.0) -> str:
    """Apply the LoRA at `path` to `model` as adapter `adapter_name` (in place, frozen), at `scale`;
    fully trained weights saved beside it replace the model's. Returns the adapter name."""
    config, state, full = read_adapter(path)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    linears |= {n for n, _ in lora_layers(model)}
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    missing = [t for t in targets if t not in linears]
    if missing:
        raise LoraError(f"{path} adapts layers this model does not have: {key_list(missing, 3)}")
    config.target_modules = set(targets)
    config.inference_mode = True
    active = active_adapters(model)
    add_adapter(model, config, adapter_name, train=False)
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = [k for k in result.unexpected_keys if is_lora_parameter(k)]
    if unexpected:
        raise LoraError(f"{path}: tensors that fit no adapted layer: {key_list(unexpected, 3)}")
    if full:
        own = dict(model.named_parameters())
        names = {n.replace(".base_layer.", "."): n for n in own}
        absent = [k for k in full if k not in names]
        if absent:
            raise LoraError(f"{path}: full weights for parameters the model lacks: {key_list(absent, 3)}")
        with torch.no_grad():
            for key, value in full.items():
                own[names[key]].copy_(value.to(own[names[key]].dtype))
    set_adapters(model, [*active, adapter_name], None, {adapter_name: scale})
    return adapter_name


def active_adapters(model: nn.Module) -> list[str]:
    layers = lora_layers(model)
    return list(layers[0][1].active_adapters) if layers else []


def set_adapters(model: nn.Module, names: list[str], weights: list[float] | None = None,
                 scales: dict[str, float] | None = None) -> None:
    """Activate the adapters `names` (their outputs add up), each at its weight (default 1)."""
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LoraError(f"unknown adapter(s) {unknown}; the model has {known}")
    weights = list(weights) if weights is not None else [None] * len(names)
    if len(weights) != len(names):
        raise LoraError(f"{len(names)} adapter names but {len(weights)} weights")
    scales = dict(scales or {})
    for name, weight in zip(names, weights):
        if weight is not None:
            scales[name] = float(weight)
    for _, layer in lora_layers(model):
        if layer.merged:
            raise LoraError("unfuse the LoRA before changing the active adapters")
        layer.set_adapter([n for n in names if n in layer.lora_A])
        for name, scale in scales.items():
            if name in layer.lora_A:
                layer.set_scale(name, scale)
    for name, param in model.named_parameters():  # set_adapter makes the active ones trainable
        if is_lora_parameter(name):
            param.requires_grad_(False)


def fuse(model: nn.Module, adapters: list[str] | None = None) -> None:
    """Merge the active (or the named) adapters into the base weights; `unfuse` takes them out."""
    for _, layer in lora_layers(model):
        layer.merge(adapter_names=adapters)


def unfuse(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every adapted layer by its base layer (with the active adapters merged in when
    `merge`): a plain model with the original parameter names."""
    for name, layer in lora_layers(model):
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model
